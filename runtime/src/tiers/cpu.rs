//! The CPU tier: tensors in host memory, and the two ways they reach the GPU.
//!
//! [`CpuPath::DmaBuffer`] (needs `Features::MAPPABLE_PRIMARY_BUFFERS`): a CPU tensor is a wgpu buffer with usage
//! `MAP_READ | COPY_SRC | COPY_DST`. wgpu's Vulkan backend puts `MAP_READ` buffers in host memory (the "GPU to CPU"
//! memory location), and with `COPY_SRC` the GPU's copy engine reads them directly, so a fetch is one
//! `copy_buffer_to_buffer` recorded in the schedule's encoder: 51 GB/s on an H200 (92% of pinned PCIe; see
//! GPU-NOTES.md). Without `MAP_WRITE` the CPU cannot map it for writing, so it is filled through the GPU:
//! `queue.write_buffer_with` copies into a wgpu staging buffer (several threads write it) and the queue copies that
//! into the tensor. Write-back from the GPU is one encoder copy the other way.
//!
//! [`CpuPath::HostMemory`] (any device): a CPU tensor is a `Vec<u8>`. A fetch copies it (several threads) into a
//! `MAP_WRITE | COPY_SRC` staging belt and records the belt -> GPU copy in the encoder; on a discrete GPU that staging
//! is BAR memory, so this path tops out near the CPU's write bandwidth into BAR (18-27 GB/s with 2-8 threads on the
//! H200) and costs GPU memory for the chunks in flight. Write-back goes through a readback buffer and a CPU copy.
//!
//! Reading a CPU tensor on the CPU ([`CpuTier::read`], [`CpuTier::with_bytes`], for CPU-side attention): on the
//! host-memory path it is a plain slice. On the DMA path the buffer must be mapped: `map_async` + device polls until
//! the last submission using the buffer has finished (and the buffer must not be in use by a recorded but
//! unsubmitted encoder meanwhile), then reads through the mapping (host memory, but measured at 0.8-1.2 GB/s on the
//! H200's driver, where it is likely uncached), then an unmap. So a tensor the CPU itself reads and writes (the cache
//! of a batch that attends on the CPU) is made in plain host memory whatever the path ([`CpuTier::alloc_host`]).

use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use wgpu::util::StagingBelt;
use wgpu::WriteOnly;

use super::{
    check_range, check_room, create_buffer, lock, map_read_blocking, padded, record_copy,
    wait_idle, ByteCounter, PendingStore, Readback, ReadbackPool, Result, TierError, TierStats,
    COPY_ALIGN,
};

/// How the CPU tier stores tensors and moves them to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuPath {
    /// Host-memory wgpu buffers the GPU copy engine reads directly (needs `MAPPABLE_PRIMARY_BUFFERS`).
    DmaBuffer,
    /// `Vec<u8>` in host memory, streamed through a mapped staging belt (portable).
    HostMemory,
}

impl CpuPath {
    /// The fastest path a device created with `features` supports.
    pub fn best_for(features: wgpu::Features) -> CpuPath {
        if features.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS) {
            CpuPath::DmaBuffer
        } else {
            CpuPath::HostMemory
        }
    }

    /// Name for logs and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            CpuPath::DmaBuffer => "dma-buffer",
            CpuPath::HostMemory => "host-memory",
        }
    }
}

impl std::fmt::Display for CpuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Usage of a DMA-path CPU tensor. `STORAGE` lets decode kernels bind it and read it over PCIe (zero-copy,
/// [`crate::offload::policy::Transfer`]); wgpu-hal's Vulkan backend picks the memory from the map flags alone
/// (`MAP_READ` without `MAP_WRITE`: gpu-allocator's `GpuToCpu`, host memory), so it stays in host memory.
const DMA_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::MAP_READ
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::STORAGE);

/// Staging belt chunk size; host fetches are split into pieces of at most this size so chunks are reused across
/// tensors of different sizes.
const BELT_CHUNK: u64 = 32 << 20;

/// Bytes of `queue.write_buffer_with` staging allowed in flight before a load-time upload waits for the GPU, so that
/// loading a large model does not hold its whole size in staging memory.
const UPLOAD_FLUSH: u64 = 256 << 20;

/// Pieces smaller than this are copied by one thread.
const PAR_COPY_PIECE: usize = 4 << 20;

/// A tensor in the CPU tier. Dropping it frees its memory.
#[derive(Debug)]
pub struct CpuTensor {
    len: u64,
    store: Store,
    counter: Arc<ByteCounter>,
}

#[derive(Debug)]
enum Store {
    /// A `DMA_USAGE` buffer of `padded(len)` bytes (at least 4).
    Dma {
        buffer: wgpu::Buffer,
        device: wgpu::Device,
    },
    /// Exactly `len` bytes.
    Host(Vec<u8>),
}

impl CpuTensor {
    /// Logical length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, if this tensor lives in plain host memory (the host-memory path); `None` on the DMA path, where
    /// [`CpuTier::with_bytes`] maps the buffer.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.store {
            Store::Host(v) => Some(v),
            Store::Dma { .. } => None,
        }
    }

    /// Mutable bytes on the host-memory path (CPU-side attention appending to a CPU-resident cache).
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.store {
            Store::Host(v) => Some(v),
            Store::Dma { .. } => None,
        }
    }

    /// The wgpu buffer on the DMA path.
    pub fn dma_buffer(&self) -> Option<&wgpu::Buffer> {
        match &self.store {
            Store::Dma { buffer, .. } => Some(buffer),
            Store::Host(_) => None,
        }
    }

    /// Completes a host-memory write-back into `self[offset ..]`: waits for the readback and copies it in.
    pub(crate) fn fill_from_readback(&mut self, readback: Readback, offset: u64) -> Result<()> {
        let end = offset + readback.len();
        match &mut self.store {
            Store::Host(v) if end <= v.len() as u64 => {
                readback.read_into(&mut v[offset as usize..end as usize])
            }
            Store::Host(v) => Err(TierError::Size {
                what: "cpu tier write-back",
                expected: v.len() as u64,
                found: end,
            }),
            Store::Dma { .. } => Err(TierError::Gpu(
                "a DMA-path store never needs a readback".into(),
            )),
        }
    }

    fn stored_bytes(&self) -> u64 {
        match &self.store {
            Store::Dma { buffer, .. } => buffer.size(),
            Store::Host(v) => v.len() as u64,
        }
    }
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        // No `destroy()`: a copy already recorded into an encoder may still use the buffer; wgpu frees it with the
        // last reference.
        self.counter.sub(self.stored_bytes());
    }
}

/// The CPU tier of one device.
#[derive(Debug)]
pub struct CpuTier {
    device: wgpu::Device,
    queue: wgpu::Queue,
    path: CpuPath,
    counter: Arc<ByteCounter>,
    belt: Mutex<StagingBelt>,
    readbacks: Arc<ReadbackPool>,
}

impl CpuTier {
    /// A CPU tier using `path`; [`CpuPath::DmaBuffer`] needs a device created with `MAPPABLE_PRIMARY_BUFFERS`.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, path: CpuPath) -> Result<Self> {
        Self::with_readbacks(device, queue, path, ReadbackPool::new(device))
    }

    pub(crate) fn with_readbacks(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        path: CpuPath,
        readbacks: Arc<ReadbackPool>,
    ) -> Result<Self> {
        if path == CpuPath::DmaBuffer
            && !device
                .features()
                .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
        {
            return Err(TierError::MissingFeature {
                path: path.as_str(),
                feature: "MAPPABLE_PRIMARY_BUFFERS",
            });
        }
        Ok(CpuTier {
            device: device.clone(),
            queue: queue.clone(),
            path,
            counter: Arc::new(ByteCounter::default()),
            belt: Mutex::new(StagingBelt::new(device.clone(), BELT_CHUNK)),
            readbacks,
        })
    }

    /// The path in use.
    pub fn path(&self) -> CpuPath {
        self.path
    }

    /// Bytes held now and at peak.
    pub fn stats(&self) -> TierStats {
        self.counter.stats()
    }

    /// A zero-filled tensor of `len` bytes.
    pub fn alloc(&self, len: u64) -> Result<CpuTensor> {
        self.alloc_on(self.path, len)
    }

    /// A zero-filled tensor of `len` bytes in plain host memory (a `Vec`) whatever the tier's path: for tensors the
    /// CPU itself reads and writes (a cache the CPU attends over), which a DMA buffer's mapping would make slow.
    pub fn alloc_host(&self, len: u64) -> Result<CpuTensor> {
        self.alloc_on(CpuPath::HostMemory, len)
    }

    fn alloc_on(&self, path: CpuPath, len: u64) -> Result<CpuTensor> {
        let store = match path {
            CpuPath::DmaBuffer => Store::Dma {
                // wgpu zero-initialises buffers before first use.
                buffer: create_buffer(
                    &self.device,
                    "strata cpu tier",
                    padded(len).max(COPY_ALIGN),
                    DMA_USAGE,
                    false,
                )?,
                device: self.device.clone(),
            },
            CpuPath::HostMemory => {
                // A failed allocation is an error to report, not an abort: the CPU tier is sized by the user's plan.
                let mut v = Vec::new();
                v.try_reserve_exact(len as usize)
                    .map_err(|_| TierError::OutOfMemory {
                        what: "cpu tier (host memory)".into(),
                        bytes: len,
                    })?;
                v.resize(len as usize, 0);
                Store::Host(v)
            }
        };
        let tensor = CpuTensor {
            len,
            store,
            counter: Arc::clone(&self.counter),
        };
        self.counter.add(tensor.stored_bytes());
        Ok(tensor)
    }

    /// A tensor holding a copy of `data` (load time).
    pub fn upload(&self, data: &[u8]) -> Result<CpuTensor> {
        let mut tensor = self.alloc(data.len() as u64)?;
        self.write(&mut tensor, 0, data)?;
        Ok(tensor)
    }

    /// [`CpuTier::upload`] into plain host memory ([`CpuTier::alloc_host`]).
    pub fn upload_host(&self, data: &[u8]) -> Result<CpuTensor> {
        let mut tensor = self.alloc_host(data.len() as u64)?;
        self.write(&mut tensor, 0, data)?;
        Ok(tensor)
    }

    /// Overwrites `tensor[offset .. offset + data.len()]` from host memory. On the DMA path the write goes through
    /// queue staging and lands before the next submitted command buffer (wgpu's `write_buffer` ordering); `offset`
    /// must be a multiple of 4, and so must `data.len()` unless the write ends at the tensor's end.
    pub fn write(&self, tensor: &mut CpuTensor, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > tensor.len) {
            return Err(TierError::Size {
                what: "cpu tier write (offset + data exceeds the tensor)",
                expected: tensor.len,
                found: offset.saturating_add(len),
            });
        }
        match &mut tensor.store {
            Store::Host(v) => {
                par_copy_slice(&mut v[offset as usize..(offset + len) as usize], data);
                Ok(())
            }
            Store::Dma { buffer, .. } => {
                check_range("cpu tier write", tensor.len, offset, len)?;
                write_staged(&self.device, &self.queue, buffer, offset, data)
            }
        }
    }

    /// Records "copy `tensor` into `dst[dst_offset ..]`" into `encoder`: one DMA copy on the DMA path, the staging
    /// belt on the host-memory path (then call [`CpuTier::prepare_submit`] before finishing the encoder).
    pub fn fetch(
        &self,
        tensor: &CpuTensor,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        self.fetch_range(tensor, 0, tensor.len, dst, dst_offset, encoder)
    }

    /// Records "copy `tensor[offset .. offset + len]` into `dst[dst_offset ..]`" (a slice of a CPU-resident KV
    /// cache, say). Offsets are multiples of 4, and so is `len` unless the range ends at the tensor's end; a trailing
    /// partial word writes `padded(len)` bytes into `dst`.
    pub fn fetch_range(
        &self,
        tensor: &CpuTensor,
        offset: u64,
        len: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        check_range("cpu tier fetch", tensor.len, offset, len)?;
        check_room("cpu tier fetch destination", dst, dst_offset, len)?;
        match &tensor.store {
            Store::Dma { buffer, .. } => {
                record_copy(encoder, buffer, offset, dst, dst_offset, len);
                Ok(())
            }
            Store::Host(v) => self.fetch_host(
                &v[offset as usize..(offset + len) as usize],
                dst,
                dst_offset,
                encoder,
            ),
        }
    }

    /// Records "copy host bytes into `dst[dst_offset ..]`" through the staging belt (several threads fill it).
    /// A trailing partial word is zero-padded; `dst_offset` must be a multiple of 4.
    pub fn fetch_host(
        &self,
        data: &[u8],
        dst: &wgpu::Buffer,
        dst_offset: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        check_room("fetch destination", dst, dst_offset, data.len() as u64)?;
        let mut belt = lock(&self.belt);
        for (i, piece) in data.chunks(BELT_CHUNK as usize).enumerate() {
            let Some(size) = wgpu::BufferSize::new(padded(piece.len() as u64)) else {
                continue;
            };
            let mut view =
                belt.write_buffer(encoder, dst, dst_offset + i as u64 * BELT_CHUNK, size);
            copy_padded(view.slice(..), piece);
        }
        Ok(())
    }

    /// Unmaps the staging belt's chunks for the encoder about to be submitted and has them recycled when that
    /// submission completes. Needed after any host-memory fetch; harmless otherwise.
    pub fn prepare_submit(&self, encoder: &wgpu::CommandEncoder) {
        lock(&self.belt).finish_and_recall_on_submit(encoder);
    }

    /// Records "write `src[src_offset .. src_offset + tensor.len()]` into `tensor`". The DMA path is one encoder
    /// copy ([`PendingStore::Done`]); the host-memory path returns a readback to complete after submitting.
    pub fn write_back(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        tensor: &mut CpuTensor,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingStore> {
        let len = tensor.len;
        self.write_back_range(src, src_offset, tensor, 0, len, encoder)
    }

    /// Records "write `src[src_offset .. src_offset + len]` into `tensor[offset ..]`" (appending a token's K/V to a
    /// CPU-resident cache, say); alignment as in [`CpuTier::fetch_range`].
    pub fn write_back_range(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        tensor: &mut CpuTensor,
        offset: u64,
        len: u64,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<PendingStore> {
        check_range("cpu tier write-back", tensor.len, offset, len)?;
        check_room("cpu tier write-back source", src, src_offset, len)?;
        match &tensor.store {
            Store::Dma { buffer, .. } => {
                record_copy(encoder, src, src_offset, buffer, offset, len);
                Ok(PendingStore::Done)
            }
            Store::Host(_) => Ok(PendingStore::Readback {
                readback: self.readbacks.record(src, src_offset, len, encoder)?,
                offset,
            }),
        }
    }

    /// Runs `f` over the tensor's bytes on the CPU. Host-memory path: no copy. DMA path: maps the buffer, which
    /// waits for the submitted GPU work that uses it (see the module docs for the cost), then unmaps.
    pub fn with_bytes<R>(&self, tensor: &CpuTensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        match &tensor.store {
            Store::Host(v) => Ok(f(v)),
            Store::Dma { buffer, device } => {
                if tensor.len == 0 {
                    return Ok(f(&[]));
                }
                let size = padded(tensor.len);
                map_read_blocking(device, buffer, size)?;
                let result = {
                    let view = buffer
                        .get_mapped_range(0..size)
                        .map_err(|e| TierError::Gpu(e.to_string()))?;
                    f(&view[..tensor.len as usize])
                };
                buffer.unmap();
                Ok(result)
            }
        }
    }

    /// A copy of the tensor's bytes.
    pub fn read(&self, tensor: &CpuTensor) -> Result<Vec<u8>> {
        self.with_bytes(tensor, <[u8]>::to_vec)
    }
}

/// `queue.write_buffer_with` in pieces, each filled by several threads; waits for the GPU every [`UPLOAD_FLUSH`]
/// bytes so staging memory stays bounded. `offset` is a multiple of 4; a trailing partial word is zero-padded.
pub(crate) fn write_staged(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    const PIECE: usize = 64 << 20;
    let mut since_flush = 0u64;
    for (i, piece) in data.chunks(PIECE).enumerate() {
        let Some(size) = wgpu::BufferSize::new(padded(piece.len() as u64)) else {
            continue;
        };
        let mut view = queue
            .write_buffer_with(buffer, offset + (i * PIECE) as u64, size)
            .ok_or_else(|| {
                TierError::Gpu("queue.write_buffer_with refused a staged upload".into())
            })?;
        copy_padded(view.slice(..), piece);
        drop(view);
        since_flush += size.get();
        if since_flush >= UPLOAD_FLUSH {
            // An empty submit starts the pending copies; waiting frees their staging buffers.
            queue.submit(std::iter::empty());
            wait_idle(device)?;
            since_flush = 0;
        }
    }
    Ok(())
}

/// Copies `src` into the front of `dst` (which is `src` rounded up to 4 bytes), zeroing the padding; large copies
/// are split across rayon's threads (one thread cannot saturate writes into BAR/staging memory).
fn copy_padded(dst: WriteOnly<'_, [u8]>, src: &[u8]) {
    let (body, mut tail) = dst.split_at(src.len());
    par_copy(body, src);
    tail.fill(0);
}

fn par_copy(mut dst: WriteOnly<'_, [u8]>, src: &[u8]) {
    if src.len() <= PAR_COPY_PIECE {
        dst.copy_from_slice(src);
        return;
    }
    assert_eq!(
        dst.len(),
        src.len(),
        "staging view and source differ in length"
    );
    // `WriteOnly<[u8]>` is not `Send`, so the pieces are written through its raw pointer.
    let base = SendPtr(dst.as_raw_ptr().as_ptr().cast::<u8>());
    src.par_chunks(PAR_COPY_PIECE)
        .enumerate()
        .for_each(|(i, piece)| {
            // SAFETY: `dst` is a live, exclusively borrowed mapping of `src.len()` bytes (checked above); the pieces are
            // disjoint and in bounds, and the copy only writes to the mapping, never reads it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    piece.as_ptr(),
                    base.get().add(i * PAR_COPY_PIECE),
                    piece.len(),
                )
            }
        });
}

/// A raw pointer shared by the threads of [`par_copy`], each writing its own disjoint range.
struct SendPtr(*mut u8);

// SAFETY: only used by `par_copy`, whose threads write disjoint ranges of one exclusively borrowed mapping.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the whole (Sync) wrapper rather than the raw pointer field.
    fn get(&self) -> *mut u8 {
        self.0
    }
}

/// `dst.copy_from_slice(src)` split across rayon's threads for large copies.
pub(crate) fn par_copy_slice(dst: &mut [u8], src: &[u8]) {
    if src.len() <= PAR_COPY_PIECE {
        dst.copy_from_slice(src);
        return;
    }
    let mid = src.len() / 2;
    let (a, b) = dst.split_at_mut(mid);
    let (sa, sb) = src.split_at(mid);
    rayon::join(|| par_copy_slice(a, sa), || par_copy_slice(b, sb));
}
