//! Memory tiers: where a tensor (a weight, a slice of the KV cache, an activation) lives between uses, and the
//! transfers that bring it to the GPU and take it back.
//!
//! Three tiers, as in FlexLLMGen:
//! - [`gpu`]: a pool of device buffers reused across steps ([`gpu::GpuPool`]), handed out as [`gpu::GpuSlot`]s; a
//!   [`gpu::DoubleBuffer`] streams the next layer's weights while the current one computes.
//! - [`cpu`]: host memory. Where the device offers `MAPPABLE_PRIMARY_BUFFERS` a CPU tensor is a wgpu buffer in host
//!   memory that the copy engine reads directly, so CPU -> GPU is one `copy_buffer_to_buffer` (DMA); elsewhere it is
//!   a plain `Vec<u8>` streamed through a staging belt. [`cpu::CpuPath`] says which.
//! - [`disk`]: one file per tensor in an offload directory, read and written by a small thread pool so disk I/O
//!   overlaps GPU work ([`disk::DiskTier::prefetch`] returns a [`disk::Ticket`]); files are removed on drop, on
//!   error, and by [`disk::cleanup_all`] from a Ctrl-C handler.
//!
//! [`Tiers`] ties them together behind one handle type, [`TensorHome`]. Transfers to and from the GPU are *recorded*
//! into the caller's `wgpu::CommandEncoder` so they run in submission order with the compute that uses them; the
//! caller calls [`Tiers::prepare_submit`] before finishing an encoder that received transfers, and completes any
//! [`PendingStore`] after submitting it.
//!
//! A loop over layers that streams weights into a double buffer (the disk read of layer j+1 runs on the I/O threads
//! while the GPU computes layer j; copies and kernels run in queue order) and writes a KV cache slice back:
//!
//! ```no_run
//! # use strata_runtime::tiers::*;
//! # fn step(tiers: &Tiers, weights: &[TensorHome], cache: &mut TensorHome, kv: &wgpu::Buffer) -> Result<()> {
//! let mut slots = DoubleBuffer::new(tiers.gpu(), 64 << 20)?;
//! let mut ticket = tiers.prefetch(&weights[0], Vec::new())?; // starts a disk read, if weights[0] is on disk
//! for j in 0..weights.len() {
//!     let mut enc = tiers.device().create_command_encoder(&Default::default());
//!     match ticket.take() {
//!         Some(t) => tiers.fetch_host(&t.wait()?, slots.back().buffer(), 0, &mut enc)?,
//!         None => tiers.fetch(&weights[j], slots.back().buffer(), 0, &mut enc)?,
//!     }
//!     if let Some(next) = weights.get(j + 1) {
//!         ticket = tiers.prefetch(next, Vec::new())?; // the disk works while the GPU computes layer j
//!     }
//!     slots.swap();
//!     // ... record layer j's kernels reading slots.front() and writing `kv` ...
//!     let pending = tiers.store_range(kv, 0, cache, 0, 4096, &mut enc)?;
//!     tiers.prepare_submit(&enc);
//!     tiers.queue().submit([enc.finish()]);
//!     pending.complete(tiers, cache)?;
//! }
//! # Ok(()) }
//! ```
//!
//! Sizes: every buffer is padded to a multiple of 4 bytes (wgpu's copy alignment); a tensor remembers its logical
//! length and every read returns exactly that many bytes.

pub(crate) mod bandwidth;
mod clock;
pub(crate) mod cpu;
pub(crate) mod disk;
pub(crate) mod gpu;
mod moved;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use bandwidth::{measure_bandwidth, BandwidthReport};
pub use cpu::{CpuPath, CpuTensor, CpuTier};
pub use disk::{cleanup_all, remove_dead_runs, DeadRun, DiskOptions, DiskTensor, DiskTier, Ticket};
pub use gpu::{DoubleBuffer, GpuPool, GpuSlot, GpuStats};
pub use moved::Moved;

use moved::MoveCounter;

/// wgpu's copy alignment: buffer sizes, copy offsets and copy sizes are multiples of it.
pub const COPY_ALIGN: u64 = wgpu::COPY_BUFFER_ALIGNMENT;

/// `len` rounded up to [`COPY_ALIGN`]: the size of the buffer that holds a tensor of `len` bytes.
pub const fn padded(len: u64) -> u64 {
    len.div_ceil(COPY_ALIGN) * COPY_ALIGN
}

/// Where a tensor lives: the one tier type of the runtime (placement, stores, plans and caps all use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Device memory.
    Gpu,
    /// Host memory.
    Cpu,
    /// A file in the offload directory.
    Disk,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Cpu, Tier::Disk];

    /// The flag that caps this tier.
    pub const fn cap_flag(self) -> &'static str {
        match self {
            Tier::Gpu => "--gpu-mem",
            Tier::Cpu => "--cpu-mem",
            Tier::Disk => "--disk-mem",
        }
    }

    /// Lower-case name (`gpu`, `cpu`, `disk`), as used in JSON output.
    pub const fn key(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Disk => "disk",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Gpu => "GPU",
            Tier::Cpu => "CPU",
            Tier::Disk => "disk",
        })
    }
}

/// Why a tier operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    /// The offload directory cannot be used.
    #[error("offload dir {path}: {reason}; pass a writable directory with --offload-dir")]
    OffloadDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The disk holding the offload directory is full (or the user's quota is spent).
    #[error("disk full while writing {path} ({bytes} bytes wanted): free space on that disk, point --offload-dir at a larger one, or offload less to disk")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// Bytes the write needed.
        bytes: u64,
    },
    /// A write went past the process's file size limit (`ulimit -f`, RLIMIT_FSIZE).
    #[error("{path}: the file size limit of this process (ulimit -f) was reached; raise it (`ulimit -f unlimited`) or offload less to disk")]
    FileSizeLimit {
        /// The file being written.
        path: PathBuf,
    },
    /// Any other I/O error on an offload file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`create`, `write`, `read`, ...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Disk tier operations were requested but no offload directory was configured.
    #[error(
        "a tensor was placed on disk but no offload directory is configured; pass --offload-dir"
    )]
    NoDisk,
    /// The device lacks a feature the requested path needs.
    #[error("the {path} CPU tier path needs wgpu feature {feature}, which this device was not created with; request it from the adapter (see tiers::wanted_features) or use the host-memory path")]
    MissingFeature {
        /// The path asked for.
        path: &'static str,
        /// The feature's name.
        feature: &'static str,
    },
    /// A buffer larger than the device allows.
    #[error("{what}: {bytes} bytes exceeds the device's max_buffer_size of {max}; split the tensor or request the adapter's limits")]
    TooLarge {
        /// What was being allocated.
        what: String,
        /// Bytes requested.
        bytes: u64,
        /// The device limit.
        max: u64,
    },
    /// The device (or, for the host-memory CPU tier, the host) could not allocate memory.
    #[error("{what}: out of memory allocating {bytes} bytes; put less on this tier (--percent)")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes requested.
        bytes: u64,
    },
    /// Two sizes that must agree do not.
    #[error("{what}: expected {expected} bytes, got {found}")]
    Size {
        /// The operation.
        what: &'static str,
        /// Bytes expected.
        expected: u64,
        /// Bytes given.
        found: u64,
    },
    /// An offset or length is not aligned as wgpu requires.
    #[error("{what}: offset {offset} and length {len} must be multiples of {align} (a trailing partial word is allowed only at the tensor's end)")]
    Alignment {
        /// The operation.
        what: &'static str,
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// The required alignment.
        align: u64,
    },
    /// wgpu reported an error (mapping failed, device lost, poll failed).
    #[error("wgpu: {0}")]
    Gpu(String),
    /// A background disk job vanished without an answer (its thread panicked).
    #[error("a disk I/O job ended without a result (its thread panicked)")]
    JobLost,
}

/// Result of tier operations.
pub type Result<T, E = TierError> = std::result::Result<T, E>;

/// Current and peak bytes a tier holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Bytes held now.
    pub current_bytes: u64,
    /// Most bytes held at once since creation.
    pub peak_bytes: u64,
}

/// A thread-safe current/peak byte counter.
#[derive(Debug, Default)]
pub(crate) struct ByteCounter {
    current: AtomicU64,
    peak: AtomicU64,
}

impl ByteCounter {
    pub(crate) fn add(&self, n: u64) {
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, n: u64) {
        self.current.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> TierStats {
        TierStats {
            current_bytes: self.current.load(Ordering::Relaxed),
            peak_bytes: self.peak.load(Ordering::Relaxed),
        }
    }
}

/// Locks a mutex, ignoring poisoning: every structure guarded here stays consistent across a panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The features the tiers can use on `adapter`: request them (with the rest of what the runtime needs) when creating
/// the device, so [`CpuPath::best_for`] can pick the fast CPU tier path.
pub fn wanted_features(adapter: &wgpu::Adapter) -> wgpu::Features {
    adapter.features() & wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
}

/// Creates a buffer, turning an over-limit size and an out-of-memory into errors instead of wgpu's uncaptured-error
/// panic.
pub(crate) fn create_buffer(
    device: &wgpu::Device,
    what: &str,
    size: u64,
    usage: wgpu::BufferUsages,
    mapped_at_creation: bool,
) -> Result<wgpu::Buffer> {
    let max = device.limits().max_buffer_size;
    if size > max {
        return Err(TierError::TooLarge {
            what: what.to_owned(),
            bytes: size,
            max,
        });
    }
    let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(what),
        size,
        usage,
        mapped_at_creation,
    });
    // On native backends the scope's future is ready at once.
    if let Some(error) = pollster::block_on(scope.pop()) {
        return Err(match error {
            wgpu::Error::OutOfMemory { .. } => TierError::OutOfMemory {
                what: what.to_owned(),
                bytes: size,
            },
            other => TierError::Gpu(other.to_string()),
        });
    }
    Ok(buffer)
}

/// Checks that `offset .. offset + len` lies in a tensor of `tensor_len` bytes and is aligned for wgpu copies:
/// `offset` a multiple of 4, and `len` too unless the range ends at the tensor's end (whose padding absorbs the rest).
pub(crate) fn check_range(
    what: &'static str,
    tensor_len: u64,
    offset: u64,
    len: u64,
) -> Result<()> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > tensor_len) {
        return Err(TierError::Size {
            what,
            expected: tensor_len,
            found: offset.saturating_add(len),
        });
    }
    if offset % COPY_ALIGN != 0 || (len % COPY_ALIGN != 0 && offset + len != tensor_len) {
        return Err(TierError::Alignment {
            what,
            offset,
            len,
            align: COPY_ALIGN,
        });
    }
    Ok(())
}

/// Checks that a copy of `padded(len)` bytes at `offset` fits in `buffer`, so that a bad offset is an error rather
/// than a wgpu validation panic.
pub(crate) fn check_room(
    what: &'static str,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: u64,
) -> Result<()> {
    if offset % COPY_ALIGN != 0 {
        return Err(TierError::Alignment {
            what,
            offset,
            len,
            align: COPY_ALIGN,
        });
    }
    let end = offset.saturating_add(padded(len));
    if end > buffer.size() {
        return Err(TierError::Size {
            what,
            expected: buffer.size(),
            found: end,
        });
    }
    Ok(())
}

/// Records "copy `src[src_offset ..]` into `dst[dst_offset ..]`" of `len` bytes, rounded up to whole words as
/// wgpu requires; nothing for an empty range. Callers check both ranges first ([`check_range`], [`check_room`]).
pub(crate) fn record_copy(
    encoder: &mut wgpu::CommandEncoder,
    src: &wgpu::Buffer,
    src_offset: u64,
    dst: &wgpu::Buffer,
    dst_offset: u64,
    len: u64,
) {
    if len > 0 {
        encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, padded(len));
    }
}

/// Blocks until the GPU has finished all submitted work (and mapping callbacks have run).
pub(crate) fn wait_idle(device: &wgpu::Device) -> Result<()> {
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| TierError::Gpu(e.to_string()))
}

/// Maps `buffer[..size]` for reading and blocks until the mapping is ready. The caller unmaps.
///
/// wgpu maps a buffer once the last submission using it completes, so this waits for the copy that filled it, not
/// for everything queued after it (a `poll(Wait)` would wait for the latest submission and stall the schedule's
/// overlap): it polls without blocking, backing off from 10 us to 0.5 ms between polls.
pub(crate) fn map_read_blocking(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    size: u64,
) -> Result<()> {
    use std::sync::mpsc::TryRecvError;
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, 0..size, move |r| {
        let _ = tx.send(r);
    });
    let mut pause = std::time::Duration::from_micros(10);
    loop {
        device
            .poll(wgpu::PollType::Poll)
            .map_err(|e| TierError::Gpu(e.to_string()))?;
        match rx.try_recv() {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                return Err(TierError::Gpu(format!(
                    "mapping a buffer for reading failed: {e}"
                )))
            }
            Err(TryRecvError::Disconnected) => {
                return Err(TierError::Gpu("a buffer mapping was never answered".into()))
            }
            Err(TryRecvError::Empty) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_micros(500));
            }
        }
    }
}

/// Free readback buffers of one size always kept for reuse (more after a step that needed more at once).
const READBACKS_KEPT: usize = 16;

/// Buffers the CPU can read (`MAP_READ | COPY_DST`), kept by size and reused so that steady-state write-backs do not
/// allocate: the pool keeps, per size, as many free buffers as were ever lent at once (at least
/// [`READBACKS_KEPT`]), so a schedule that repeats the same stores every step (a packed cache's per-head ranges,
/// many sequences' rows) allocates only in its first steps. What it keeps is bounded by what a step had in flight.
#[derive(Debug)]
pub(crate) struct ReadbackPool {
    device: wgpu::Device,
    /// What the tiers sharing this pool moved, and how long their readbacks waited.
    moves: MoveCounter,
    free: Mutex<BTreeMap<u64, Vec<wgpu::Buffer>>>,
    /// Buffers lent now, the most ever lent at once, and buffers created.
    lent: Mutex<(usize, usize, usize)>,
}

impl ReadbackPool {
    pub(crate) fn new(device: &wgpu::Device) -> Arc<Self> {
        Arc::new(ReadbackPool {
            device: device.clone(),
            moves: MoveCounter::default(),
            free: Mutex::new(BTreeMap::new()),
            lent: Mutex::new((0, 0, 0)),
        })
    }

    /// Readback buffers created so far (a steady-state step creates none).
    pub(crate) fn created(&self) -> usize {
        lock(&self.lent).2
    }

    /// Records a copy of `src[src_offset .. src_offset + padded(len)]` into a readback buffer.
    pub(crate) fn record(
        self: &Arc<Self>,
        src: &wgpu::Buffer,
        src_offset: u64,
        len: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<Readback> {
        let want = padded(len).max(COPY_ALIGN);
        let class = gpu::size_class(len);
        let reused = {
            let mut free = lock(&self.free);
            let key = free
                .range(want..=class.saturating_mul(2))
                .find(|(_, buffers)| !buffers.is_empty())
                .map(|(k, _)| *k);
            key.and_then(|k| free.get_mut(&k).and_then(Vec::pop))
        };
        {
            let mut lent = lock(&self.lent);
            lent.0 += 1;
            lent.1 = lent.1.max(lent.0);
            if reused.is_none() {
                lent.2 += 1;
            }
        }
        let buffer = match reused {
            Some(b) => b,
            None => create_buffer(
                &self.device,
                "strata readback",
                if class > self.device.limits().max_buffer_size {
                    want
                } else {
                    class
                },
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                false,
            )?,
        };
        record_copy(encoder, src, src_offset, &buffer, 0, len);
        Ok(Readback {
            buffer: Some(buffer),
            len,
            pool: Arc::clone(self),
        })
    }
}

/// A GPU -> CPU copy recorded into an encoder; after the encoder is submitted, [`Readback::read_into`] waits for it
/// and copies the bytes out.
#[derive(Debug)]
#[must_use = "a readback does nothing until it is read after submitting its encoder"]
pub struct Readback {
    buffer: Option<wgpu::Buffer>,
    len: u64,
    pool: Arc<ReadbackPool>,
}

impl Readback {
    /// Bytes this readback returns.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it returns no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waits for the GPU (the encoder must have been submitted) and copies the bytes into `out`.
    pub fn read_into(mut self, out: &mut [u8]) -> Result<()> {
        if out.len() as u64 != self.len {
            return Err(TierError::Size {
                what: "readback",
                expected: self.len,
                found: out.len() as u64,
            });
        }
        let Some(buffer) = self.buffer.take() else {
            return Err(TierError::Gpu("readback already consumed".into()));
        };
        if self.len > 0 {
            let size = padded(self.len);
            let start = std::time::Instant::now();
            map_read_blocking(&self.pool.device, &buffer, size)?;
            self.pool.moves.waited(start.elapsed());
            {
                let view = buffer
                    .get_mapped_range(0..size)
                    .map_err(|e| TierError::Gpu(e.to_string()))?;
                out.copy_from_slice(&view[..self.len as usize]);
            }
            buffer.unmap();
        }
        self.buffer = Some(buffer);
        Ok(())
    }

    /// Waits for the GPU and returns the bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len as usize];
        self.read_into(&mut out)?;
        Ok(out)
    }
}

impl Drop for Readback {
    fn drop(&mut self) {
        let most_lent = {
            let mut lent = lock(&self.pool.lent);
            lent.0 = lent.0.saturating_sub(1);
            lent.1
        };
        if let Some(buffer) = self.buffer.take() {
            // Only unmapped buffers get here: `read_into` unmaps before putting its buffer back and drops it on error.
            let mut free = lock(&self.pool.free);
            let same_size = free.entry(buffer.size()).or_default();
            // Per size, as many stay as were ever lent at once, so the next step's stores (prefill's large rows,
            // decode's small ones) find theirs; the rest are freed.
            if same_size.len() < READBACKS_KEPT.max(most_lent) {
                same_size.push(buffer);
            }
        }
    }
}

/// How [`Tiers::new`] sets up each tier.
#[derive(Clone, Debug, Default)]
pub struct TierOptions {
    /// Force a CPU tier path; `None` picks the fastest the device supports ([`CpuPath::best_for`]).
    pub cpu_path: Option<CpuPath>,
    /// The disk tier's settings; `None` means no disk tier (placing a tensor on disk is then an error).
    pub disk: Option<DiskOptions>,
}

/// A tensor in the GPU tier: a pool slot and the tensor's logical length.
#[derive(Debug)]
pub struct GpuTensor {
    slot: GpuSlot,
    len: u64,
}

impl GpuTensor {
    /// The device buffer holding the tensor (possibly larger than it).
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.slot.buffer()
    }

    /// Logical length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a tensor lives, owning its storage: dropping a `TensorHome` frees the GPU slot (back to the pool), the
/// host memory, or deletes the file.
#[derive(Debug)]
pub enum TensorHome {
    /// On the GPU.
    Gpu(GpuTensor),
    /// In host memory.
    Cpu(CpuTensor),
    /// In a file.
    Disk(DiskTensor),
}

impl TensorHome {
    /// The tier it lives in.
    pub fn tier(&self) -> Tier {
        match self {
            TensorHome::Gpu(_) => Tier::Gpu,
            TensorHome::Cpu(_) => Tier::Cpu,
            TensorHome::Disk(_) => Tier::Disk,
        }
    }

    /// Logical length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            TensorHome::Gpu(t) => t.len(),
            TensorHome::Cpu(t) => t.len(),
            TensorHome::Disk(t) => t.len(),
        }
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A write-back recorded into an encoder that needs a step on the CPU once the encoder has been submitted.
#[derive(Debug)]
#[must_use = "complete a pending store after submitting its encoder, or the data never arrives"]
pub enum PendingStore {
    /// Nothing left to do: the copy in the encoder was the whole store.
    Done,
    /// The bytes come back through a readback buffer, then go into host memory or a file at `offset`.
    Readback {
        /// The GPU -> host copy.
        readback: Readback,
        /// Where in the home the bytes go.
        offset: u64,
    },
}

impl PendingStore {
    /// Finishes the store into `home` (the same home given to [`Tiers::store`]); the encoder must be submitted.
    /// Blocks on the readback and, for a disk home, on the write.
    pub fn complete(self, tiers: &Tiers, home: &mut TensorHome) -> Result<()> {
        let PendingStore::Readback { readback, offset } = self else {
            return Ok(());
        };
        match home {
            TensorHome::Gpu(_) => Err(TierError::Gpu("a GPU store never needs a readback".into())),
            TensorHome::Cpu(t) => t.fill_from_readback(readback, offset),
            TensorHome::Disk(t) => {
                let bytes = readback.wait()?;
                tiers.disk()?.write_at(t, offset, &bytes)
            }
        }
    }
}

impl PendingStore {
    /// Like [`PendingStore::complete`], but a disk home's write runs on the disk tier's threads: waits for the
    /// readback only and returns the write's ticket (which gives the staging bytes back for reuse). CPU and GPU homes
    /// complete at once and return `None`.
    pub fn complete_in_background(
        self,
        tiers: &Tiers,
        home: &mut TensorHome,
    ) -> Result<Option<Ticket<Vec<u8>>>> {
        match (self, home) {
            (PendingStore::Readback { readback, offset }, TensorHome::Disk(t)) => {
                let disk = tiers.disk()?;
                let bytes = readback.wait()?;
                Ok(Some(disk.write_at_async(t, offset, bytes)))
            }
            (pending, home) => pending.complete(tiers, home).map(|()| None),
        }
    }
}

/// What each tier holds now, as a report for the profiler and the planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierReport {
    /// The CPU tier path in use.
    pub cpu_path: CpuPath,
    /// GPU pool bytes.
    pub gpu: GpuStats,
    /// CPU tier bytes.
    pub cpu: TierStats,
    /// Disk tier bytes (zero without a disk tier).
    pub disk: TierStats,
}

/// The three tiers of one device.
#[derive(Debug)]
pub struct Tiers {
    device: wgpu::Device,
    queue: wgpu::Queue,
    gpu: GpuPool,
    cpu: CpuTier,
    disk: Option<DiskTier>,
    readbacks: Arc<ReadbackPool>,
    /// GPU timestamps around transfer submits, where the device writes them.
    clock: Option<clock::TransferClock>,
}

impl Tiers {
    /// Sets up the tiers on `device`. Fails if a forced CPU path needs a missing feature or the offload dir is
    /// unusable.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, options: TierOptions) -> Result<Self> {
        let readbacks = ReadbackPool::new(device);
        let path = options
            .cpu_path
            .unwrap_or_else(|| CpuPath::best_for(device.features()));
        let cpu = CpuTier::with_readbacks(device, queue, path, Arc::clone(&readbacks))?;
        let disk = options.disk.map(DiskTier::new).transpose()?;
        Ok(Tiers {
            device: device.clone(),
            queue: queue.clone(),
            gpu: GpuPool::new(device),
            cpu,
            disk,
            readbacks,
            clock: clock::TransferClock::new(device),
        })
    }

    /// The GPU pool.
    pub fn gpu(&self) -> &GpuPool {
        &self.gpu
    }

    /// The CPU tier.
    pub fn cpu(&self) -> &CpuTier {
        &self.cpu
    }

    /// The disk tier, or [`TierError::NoDisk`].
    pub fn disk(&self) -> Result<&DiskTier> {
        self.disk.as_ref().ok_or(TierError::NoDisk)
    }

    /// Stores `data` in `tier` (load time): an exactly sized GPU slot labelled `name` filled by
    /// `queue.write_buffer`, a CPU tensor, or a file named after `name`.
    pub fn place(&self, tier: Tier, name: &str, data: &[u8]) -> Result<TensorHome> {
        Ok(match tier {
            Tier::Gpu => {
                let len = data.len() as u64;
                // Exact: a home lives as long as its run, so a size class would only waste memory.
                let slot = self.gpu.acquire_exact_labelled(len, name)?;
                cpu::write_staged(&self.device, &self.queue, slot.buffer(), 0, data)?;
                TensorHome::Gpu(GpuTensor { slot, len })
            }
            Tier::Cpu => TensorHome::Cpu(self.cpu.upload(data)?),
            Tier::Disk => TensorHome::Disk(self.disk()?.write(name, data)?),
        })
    }

    /// Stores `data` in the CPU tier in plain host memory whatever the tier's path ([`CpuTier::alloc_host`]).
    pub fn place_host(&self, data: &[u8]) -> Result<TensorHome> {
        Ok(TensorHome::Cpu(self.cpu.upload_host(data)?))
    }

    /// Records "copy `src[src_offset .. src_offset + len]` into a pooled readback buffer" into `encoder`; after
    /// submitting it, [`Readback::read_into`] waits for that submission only, not for the whole queue.
    pub fn readback(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        len: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<Readback> {
        check_room("readback source", src, src_offset, len)?;
        self.readbacks.moves.add(Tier::Gpu, Tier::Cpu, len);
        self.readbacks.record(src, src_offset, len, encoder)
    }

    /// Writes host bytes into `dst[dst_offset ..]` through the queue (lands before the next submit): a few rows
    /// the CPU computed, such as CPU attention's output. `dst_offset` and `data.len()` are multiples of 4.
    pub fn upload(&self, dst: &wgpu::Buffer, dst_offset: u64, data: &[u8]) -> Result<()> {
        check_room("upload destination", dst, dst_offset, data.len() as u64)?;
        self.readbacks
            .moves
            .add(Tier::Cpu, Tier::Gpu, data.len() as u64);
        self.queue.write_buffer(dst, dst_offset, data);
        Ok(())
    }

    /// Marks the start of a transfer encoder's copies (a GPU timestamp, where the device writes them): call it on a
    /// fresh transfer encoder and [`Tiers::end_transfers`] on it before submitting.
    pub fn begin_transfers(&self, encoder: &mut wgpu::CommandEncoder) {
        if let Some(c) = &self.clock {
            c.begin(encoder);
        }
    }

    /// Marks the end of the transfer encoder [`Tiers::begin_transfers`] started.
    pub fn end_transfers(&self, encoder: &mut wgpu::CommandEncoder) {
        if let Some(c) = &self.clock {
            c.end(encoder);
        }
    }

    /// Adds the GPU time of this step's timed transfer submits to [`Moved::gpu_transfer_s`]: one submit resolving
    /// the timestamps, queued after everything submitted so far, and a wait for it (call once per step, after its
    /// last submit).
    pub fn collect_transfer_time(&self) -> Result<()> {
        let Some(c) = &self.clock else {
            return Ok(());
        };
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("strata transfer timestamps"),
            });
        let pairs = c.resolve(&mut encoder);
        if pairs == 0 {
            return Ok(());
        }
        let read = self
            .readbacks
            .record(c.resolved(), 0, 16 * u64::from(pairs), &mut encoder)?;
        self.queue.submit([encoder.finish()]);
        let bytes = read.wait()?;
        let secs = clock::paired_seconds(&bytes, pairs, self.queue.get_timestamp_period())?;
        self.readbacks.moves.gpu_transfer(secs);
        Ok(())
    }

    /// Counts `bytes` of CPU-tier buffers that kernels read in place (zero-copy): they crossed PCIe too.
    pub fn note_direct_read(&self, bytes: u64) {
        self.readbacks.moves.in_place(bytes);
    }

    /// What the tiers moved since they were made ([`Moved::since`] gives a phase's share).
    pub fn moved(&self) -> Moved {
        self.readbacks.moves.snapshot()
    }

    /// Records "copy `home` into `dst[dst_offset..]`" into `encoder`. GPU and DMA-capable CPU tensors are one
    /// buffer copy; host-memory CPU tensors go through the staging belt; a disk tensor is read now (blocking; the
    /// schedule should rather [`DiskTier::prefetch`] it and pass the bytes to [`Tiers::fetch_host`]).
    pub fn fetch(
        &self,
        home: &TensorHome,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        self.fetch_range(home, 0, home.len(), dst, dst_offset, encoder)
    }

    /// [`Tiers::fetch`] of `home[offset .. offset + len]`. Offsets are multiples of 4, and so is `len` unless the
    /// range ends at the tensor's end; a trailing partial word writes `padded(len)` bytes into `dst`.
    pub fn fetch_range(
        &self,
        home: &TensorHome,
        offset: u64,
        len: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        self.readbacks.moves.add(home.tier(), Tier::Gpu, len);
        match home {
            TensorHome::Gpu(t) => {
                check_range("gpu tier fetch", t.len, offset, len)?;
                check_room("gpu tier fetch destination", dst, dst_offset, len)?;
                record_copy(encoder, t.buffer(), offset, dst, dst_offset, len);
                Ok(())
            }
            TensorHome::Cpu(t) => self
                .cpu
                .fetch_range(t, offset, len, dst, dst_offset, encoder),
            TensorHome::Disk(t) => {
                check_range("disk tier fetch", t.len(), offset, len)?;
                let mut bytes = vec![0u8; len as usize];
                self.disk()?.read_at(t, offset, &mut bytes)?;
                self.cpu.fetch_host(&bytes, dst, dst_offset, encoder)
            }
        }
    }

    /// Records "copy these host bytes (a finished disk prefetch) into `dst[dst_offset..]`" through the staging belt.
    pub fn fetch_host(
        &self,
        bytes: &[u8],
        dst: &wgpu::Buffer,
        dst_offset: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        self.readbacks
            .moves
            .add(Tier::Disk, Tier::Gpu, bytes.len() as u64);
        self.cpu.fetch_host(bytes, dst, dst_offset, encoder)
    }

    /// Starts reading a disk tensor in the background (see [`DiskTier::prefetch_into`]); `None` for tensors in other
    /// tiers, which need no prefetch.
    pub fn prefetch(&self, home: &TensorHome, buf: Vec<u8>) -> Result<Option<Ticket<Vec<u8>>>> {
        match home {
            TensorHome::Disk(t) => Ok(Some(self.disk()?.prefetch_into(t, buf))),
            _ => Ok(None),
        }
    }

    /// Must be called on an encoder that received fetches before it is finished and submitted (it unmaps the staging
    /// belt's buffers and has them recycled when the submission completes). One encoder with fetches at a time.
    pub fn prepare_submit(&self, encoder: &wgpu::CommandEncoder) {
        self.cpu.prepare_submit(encoder);
    }

    /// Records "write `src[src_offset .. src_offset + home.len()]` back into `home`". A GPU or DMA-capable CPU home is
    /// one encoder copy; host-memory CPU and disk homes come back through a readback buffer: complete the returned
    /// [`PendingStore`] after submitting `encoder`.
    pub fn store(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        home: &mut TensorHome,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingStore> {
        let len = home.len();
        self.store_range(src, src_offset, home, 0, len, encoder)
    }

    /// [`Tiers::store`] of `len` bytes into `home[offset ..]` (appending a token's K/V to an offloaded cache);
    /// alignment as in [`Tiers::fetch_range`].
    pub fn store_range(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        home: &mut TensorHome,
        offset: u64,
        len: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingStore> {
        self.readbacks.moves.add(Tier::Gpu, home.tier(), len);
        match home {
            TensorHome::Gpu(t) => {
                check_range("gpu tier store", t.len, offset, len)?;
                check_room("gpu tier store source", src, src_offset, len)?;
                record_copy(encoder, src, src_offset, t.buffer(), offset, len);
                Ok(PendingStore::Done)
            }
            TensorHome::Cpu(t) => self
                .cpu
                .write_back_range(src, src_offset, t, offset, len, encoder),
            TensorHome::Disk(t) => {
                self.disk()?;
                check_range("disk tier store", t.len(), offset, len)?;
                check_room("disk tier store source", src, src_offset, len)?;
                Ok(PendingStore::Readback {
                    readback: self.readbacks.record(src, src_offset, len, encoder)?,
                    offset,
                })
            }
        }
    }

    /// Reads a tensor's bytes into host memory, wherever it lives (a GPU tensor waits for the GPU).
    pub fn read(&self, home: &TensorHome) -> Result<Vec<u8>> {
        match home {
            TensorHome::Gpu(t) => {
                let mut encoder =
                    self.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("strata read"),
                        });
                let readback = self.readbacks.record(t.buffer(), 0, t.len, &mut encoder)?;
                self.queue.submit([encoder.finish()]);
                readback.wait()
            }
            TensorHome::Cpu(t) => self.cpu.read(t),
            TensorHome::Disk(t) => self.disk()?.read(t),
        }
    }

    /// Moves a tensor to another tier (through host memory), returning its new home; the old storage is freed.
    pub fn move_to(&self, home: TensorHome, tier: Tier, name: &str) -> Result<TensorHome> {
        if home.tier() == tier {
            return Ok(home);
        }
        let bytes = self.read(&home)?;
        drop(home);
        self.place(tier, name, &bytes)
    }

    /// Readback buffers (GPU -> host copies for host-memory and disk stores) created so far: a run that repeats
    /// the same steps creates them in its first steps only.
    pub fn readbacks_created(&self) -> usize {
        self.readbacks.created()
    }

    /// Bytes held by each tier now and at peak.
    pub fn report(&self) -> TierReport {
        TierReport {
            cpu_path: self.cpu.path(),
            gpu: self.gpu.stats(),
            cpu: self.cpu.stats(),
            disk: self.disk.as_ref().map(DiskTier::stats).unwrap_or_default(),
        }
    }

    /// The device the tiers allocate on.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue transfers are submitted on.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
}
