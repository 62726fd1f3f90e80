//! The GPU: adapter choice, the device and its limits, weight and activation buffers, and the compute kernels.
//!
//! [`Gpu`] owns the wgpu device and queue and knows the limits every buffer must respect; [`tensor`] holds weights
//! in row chunks that each fit one storage binding; [`kernels`] is the one owner of WGSL pipelines and their dispatch
//! code. The model's forward pass ([`crate::model`]) is written against these three.

pub mod kernels;
pub mod memory;
pub mod tensor;
pub(crate) mod timer;

use std::sync::{Arc, Mutex};

/// Why no usable GPU device could be opened, or a GPU operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No adapter at all (no Vulkan/Metal/DX12 driver).
    #[error(
        "no GPU adapter found{backends}. Install a GPU driver with Vulkan support; on Linux without a GPU, \
         `apt-get install mesa-vulkan-drivers libvulkan1` provides the CPU driver lavapipe"
    )]
    NoAdapter {
        /// Which backends were searched, when WGPU_BACKEND restricted them.
        backends: String,
    },
    /// Adapters exist but none matches the requested name.
    #[error("no GPU adapter's name contains {wanted:?}; available adapters: {available}")]
    NoMatchingAdapter {
        /// The requested substring.
        wanted: String,
        /// Names of the adapters found.
        available: String,
    },
    /// The adapter refused to open a device.
    #[error("could not open a device on adapter {adapter:?}: {reason}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// wgpu's reason.
        reason: String,
    },
    /// A buffer is too large for this device.
    #[error("{what} needs a buffer of {bytes} bytes, more than this device allows ({limit} bytes); {hint}")]
    BufferTooLarge {
        /// What the buffer holds.
        what: String,
        /// Requested size.
        bytes: u64,
        /// The device's limit.
        limit: u64,
        /// What to do about it.
        hint: &'static str,
    },
    /// The device was lost: a driver reset or crash, a hung GPU, a removed device.
    #[error(
        "the GPU device was lost ({reason}): its driver reset or crashed, or the GPU was removed; run again, and if it \
         keeps happening, put less on the GPU (--percent) or check the driver's log"
    )]
    DeviceLost {
        /// wgpu's reason and message.
        reason: String,
    },
    /// The device ran out of memory.
    #[error("the GPU ran out of memory while allocating {what}: {reason}; use a smaller model, batch or dtype (--dtype f16)")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// The driver's message.
        reason: String,
    },
    /// Writing a buffer through a mapping failed.
    #[error("uploading to the GPU failed: {0}")]
    Upload(String),
    /// Mapping a buffer for reading failed (device lost, out of memory).
    #[error("reading results back from the GPU failed: {0}")]
    Readback(String),
    /// The device lacks what an operation needs (a kernel variant's features).
    #[error("not supported on this device: {0}")]
    Unsupported(String),
}

/// Bytes of the buffer that holds `len` bytes: whole 4-byte words (wgpu's copy alignment), at least one word. The
/// one rounding rule of every buffer, home and slot (the placement sizes them with it, the allocations follow).
pub const fn buffer_size(len: u64) -> u64 {
    if len < 4 {
        4
    } else {
        len.next_multiple_of(4)
    }
}

/// How to pick and configure the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Pick the first adapter whose name contains this (case-insensitive), or with `#N` adapter N (modulo their
    /// number); `WGPU_ADAPTER_NAME` is used when `None`.
    pub adapter: Option<String>,
    /// Pretend storage bindings can be at most this many bytes (tests use it to force weights into row chunks).
    pub max_binding_override: Option<u64>,
}

/// An open GPU device with the limits and features strata uses.
///
/// Cheap to clone: the device and queue are reference counted.
#[derive(Clone)]
pub struct Gpu {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its one queue: copies and dispatches run in submission order.
    pub queue: wgpu::Queue,
    /// Adapter name, backend and type.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was opened with (the adapter's own).
    pub limits: wgpu::Limits,
    /// The features enabled on the device.
    pub features: wgpu::Features,
    /// The cooperative-matrix (tensor-core) shapes the adapter offers; empty unless
    /// `EXPERIMENTAL_COOPERATIVE_MATRIX` is enabled.
    pub cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    max_binding: u64,
    readback: Arc<Mutex<Option<wgpu::Buffer>>>,
    /// Why the device was lost, once it has been (wgpu's device-lost callback).
    lost: Arc<Mutex<Option<String>>>,
    /// Compiled linear pipelines and kernel-variant choices, shared by every `Kernels` on this device.
    pub(crate) cache: Arc<kernels::DeviceCache>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("max_binding", &self.max_binding)
            .finish()
    }
}

impl Gpu {
    /// Opens a device: the adapter named by `options.adapter`, else `WGPU_ADAPTER_NAME`, else the default
    /// (high-performance) adapter, among the backends `WGPU_BACKEND` allows.
    pub fn new(options: &GpuOptions) -> Result<Gpu, GpuError> {
        pollster::block_on(Self::new_async(options))
    }

    async fn new_async(options: &GpuOptions) -> Result<Gpu, GpuError> {
        // Vulkan, Metal and DX12 by default: the GL backend lacks the compute features the kernels need, and probing
        // it through EGL prints display-server noise on headless machines. WGPU_BACKEND=gl still selects it.
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let wanted = options
            .adapter
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
            .filter(|name| !name.is_empty());
        let backend_note = if std::env::var("WGPU_BACKEND").is_ok() {
            format!(" among backends {backends:?} (WGPU_BACKEND)")
        } else {
            String::new()
        };
        let adapter = match wanted {
            Some(wanted) => {
                let mut adapters = instance.enumerate_adapters(backends).await;
                // `#N` counts real GPUs before CPU adapters (lavapipe installed beside them).
                adapters.sort_by_key(|a| a.get_info().device_type == wgpu::DeviceType::Cpu);
                if adapters.is_empty() {
                    return Err(GpuError::NoAdapter {
                        backends: backend_note,
                    });
                }
                let needle = wanted.to_lowercase();
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                // `#N`: adapter N (GPUs first, then in enumeration order), wrapping around (a pipeline's local rank N
                // on a machine with fewer adapters than ranks), so identical GPUs can be told apart.
                let index = wanted
                    .strip_prefix('#')
                    .and_then(|n| n.parse::<usize>().ok())
                    .map(|n| n % adapters.len());
                match adapters.into_iter().enumerate().find_map(|(i, a)| {
                    let hit = match index {
                        Some(n) => i == n,
                        None => a.get_info().name.to_lowercase().contains(&needle),
                    };
                    hit.then_some(a)
                }) {
                    Some(adapter) => adapter,
                    None => {
                        return Err(GpuError::NoMatchingAdapter {
                            wanted,
                            available: names.join(", "),
                        })
                    }
                }
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    ..Default::default()
                })
                .await
                .map_err(|_| GpuError::NoAdapter {
                    backends: backend_note,
                })?,
        };
        let info = adapter.get_info();
        // The adapter's own limits: wgpu's defaults cap bindings at 128 MiB, far below what GPUs allow.
        let limits = adapter.limits();
        // Subgroups and cooperative matrices (tensor cores) serve device-specific kernel variants, each of which
        // proves itself against the portable kernel before it is used (gpu::kernels::variants).
        let wanted_features = wgpu::Features::SHADER_F16
            | wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
            | wgpu::Features::SUBGROUP
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            // GPU time of a kernel for `strata bench kernels` (gpu::timer).
            | wgpu::Features::TIMESTAMP_QUERY;
        let features = adapter.features() & wanted_features;
        let coop = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let experimental_features = if coop {
            // SAFETY: wgpu asks callers of experimental features to accept that their implementation may have bugs.
            // The only experimental feature requested is cooperative matrices, used by one kernel that is compiled
            // under an error scope and compared with the portable kernel before it computes anything.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let cooperative_matrix = if coop {
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("strata"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| GpuError::RequestDevice {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let device_binding =
            (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size);
        let max_binding = options
            .max_binding_override
            .map_or(device_binding, |o| o.min(device_binding))
            & !3;
        let lost = Arc::new(Mutex::new(None));
        let record = Arc::clone(&lost);
        // After a loss every call fails validation ("... is invalid"); those errors only echo the loss, which the
        // next read-back reports as `GpuError::DeviceLost`. Any other uncaptured error stays fatal, as by default.
        let on_loss = Arc::clone(&lost);
        device.on_uncaptured_error(Arc::new(move |err: wgpu::Error| {
            if on_loss.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
                panic!("wgpu error: {err}");
            }
        }));
        device.set_device_lost_callback(move |reason, message| {
            let why = if message.is_empty() {
                format!("{reason:?}")
            } else {
                format!("{reason:?}: {message}")
            };
            *record.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        });
        Ok(Gpu {
            lost,
            device,
            queue,
            info,
            limits,
            features,
            cooperative_matrix,
            max_binding,
            readback: Arc::new(Mutex::new(None)),
            cache: Arc::default(),
        })
    }

    /// Runs `f`, turning an out-of-memory error of the device during it into [`GpuError::OutOfMemory`] (wgpu would
    /// otherwise report it to its uncaptured-error handler, which panics).
    pub fn catch_oom<T, E: From<GpuError>>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = f();
        match pollster::block_on(scope.pop()) {
            Some(error) => Err(GpuError::OutOfMemory {
                what: what.to_owned(),
                reason: error.to_string(),
            }
            .into()),
            None => result,
        }
    }

    /// The largest storage binding (and buffer) strata creates, in bytes: a multiple of 4.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// One line describing the adapter, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}), max binding {} MiB",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.max_binding >> 20
        )
    }

    /// Checks that a buffer of `bytes` fits one binding, naming `what` otherwise.
    pub fn check_binding(
        &self,
        what: &str,
        bytes: u64,
        hint: &'static str,
    ) -> Result<(), GpuError> {
        if bytes > self.max_binding {
            return Err(GpuError::BufferTooLarge {
                what: what.to_owned(),
                bytes,
                limit: self.max_binding,
                hint,
            });
        }
        Ok(())
    }

    /// A storage buffer of `bytes` (rounded up to 4), usable as a copy source and destination.
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: buffer_size(bytes),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer filled with `bytes` (zero-padded to a multiple of 4) without a staging copy.
    pub fn storage_buffer_init(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        let size = buffer_size(bytes.len() as u64);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        {
            let mut view = buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| GpuError::Upload(format!("{label}: {e}")))?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buffer.unmap();
        Ok(buffer)
    }

    /// Copies `regions` (buffer, offset, bytes; offsets and sizes multiples of 4) into host memory after the GPU
    /// has finished all work submitted so far, through one pooled map-readable buffer.
    pub fn read_back(
        &self,
        regions: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Vec<Vec<u8>>, GpuError> {
        if regions.is_empty() {
            return Ok(Vec::new());
        }
        let mut offsets = Vec::with_capacity(regions.len());
        let mut total = 0u64;
        for &(_, _, size) in regions {
            offsets.push(total);
            total += size.next_multiple_of(wgpu::MAP_ALIGNMENT);
        }
        let mut pool = self.readback.lock().unwrap_or_else(|p| p.into_inner());
        if pool.as_ref().is_none_or(|b| b.size() < total) {
            *pool = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: total.next_power_of_two().max(256),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let staging = pool.as_ref().expect("readback buffer was just created");
        let mut encoder = self.device.create_command_encoder(&Default::default());
        for (&(buffer, offset, size), &dst) in regions.iter().zip(&offsets) {
            encoder.copy_buffer_to_buffer(buffer, offset, staging, dst, size);
        }
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, ..total, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| self.lost_or(GpuError::Readback(e.to_string())))?;
        rx.recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| self.lost_or(GpuError::Readback(e.to_string())))?;
        let out = {
            let view = staging
                .get_mapped_range(..total)
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            regions
                .iter()
                .zip(&offsets)
                .map(|(&(_, _, size), &dst)| view[dst as usize..(dst + size) as usize].to_vec())
                .collect()
        };
        staging.unmap();
        Ok(out)
    }

    /// Why the device was lost, if it was. wgpu reports a loss from a poll, so this polls once first.
    pub fn lost(&self) -> Option<String> {
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// [`GpuError::DeviceLost`] when the device has been lost (a failure's real cause), else `err`.
    pub fn lost_or(&self, err: GpuError) -> GpuError {
        match self.lost() {
            Some(reason) => GpuError::DeviceLost { reason },
            None => err,
        }
    }

    /// Reads `count` f32 values starting at element `offset` of `buffer`.
    pub fn read_f32(
        &self,
        buffer: &wgpu::Buffer,
        offset: usize,
        count: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let bytes = self.read_back(&[(buffer, 4 * offset as u64, 4 * count as u64)])?;
        Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
    }
}
