//! The GPU tier: a pool of device buffers reused across steps.
//!
//! Creating (and first binding) a wgpu buffer is expensive, and a decode step touches every layer, so the schedule
//! must not allocate per step. [`GpuPool::reserve`] creates buffers once at start-up; [`GpuPool::acquire`] hands out
//! the smallest free buffer that fits (within a factor of two of the request, so a small request does not pin a big
//! buffer) and a [`GpuSlot`] returns its buffer to the pool when dropped. Only when nothing fits does the pool create
//! a buffer, rounded up to a size class (at most 25% larger than asked) so that similar requests share it later;
//! [`GpuStats::buffers_created`] lets a test check that a warmed-up loop creates none.
//!
//! Every buffer is `STORAGE | COPY_SRC | COPY_DST`: kernels bind it, and transfers copy into and out of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{create_buffer, lock, padded, ByteCounter, Result, TierStats, COPY_ALIGN};

/// The label of pool buffers made without a name of their own.
const POOL_LABEL: &str = "strata gpu tier";

/// Usage of every pool buffer.
pub const POOL_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A pool of device buffers. Cloning gives another handle to the same pool.
#[derive(Clone, Debug)]
pub struct GpuPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    device: wgpu::Device,
    /// Free buffers by size.
    free: Mutex<BTreeMap<u64, Vec<wgpu::Buffer>>>,
    /// Device memory the pool holds (free and handed out).
    allocated: ByteCounter,
    /// Bytes of buffers handed out.
    in_use: ByteCounter,
    created: AtomicU64,
}

/// Bytes the GPU pool holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuStats {
    /// Device memory held by the pool, free buffers included: what the GPU really has allocated for tiers.
    pub allocated: TierStats,
    /// Bytes of buffers handed out as slots.
    pub in_use: TierStats,
    /// Buffers created since the pool was made.
    pub buffers_created: u64,
}

/// The size a new buffer for a request of `len` bytes gets: `len` rounded up to a quarter of its power of two (so
/// at most 25% waste), and to the copy alignment.
pub fn size_class(len: u64) -> u64 {
    let len = padded(len).max(COPY_ALIGN);
    let quarter = (len.next_power_of_two() / 4).max(COPY_ALIGN);
    len.div_ceil(quarter) * quarter
}

impl GpuPool {
    /// An empty pool on `device`.
    pub fn new(device: &wgpu::Device) -> Self {
        GpuPool {
            inner: Arc::new(PoolInner {
                device: device.clone(),
                free: Mutex::new(BTreeMap::new()),
                allocated: ByteCounter::default(),
                in_use: ByteCounter::default(),
                created: AtomicU64::new(0),
            }),
        }
    }

    /// Creates `count` buffers able to hold `len` bytes each, up front, so the schedule's slots never allocate.
    pub fn reserve(&self, len: u64, count: usize) -> Result<()> {
        let size = self.new_size(len);
        for _ in 0..count {
            let buffer = self.create(size)?;
            lock(&self.inner.free).entry(size).or_default().push(buffer);
        }
        Ok(())
    }

    /// A slot of at least `len` bytes: a free buffer if one fits, else a new one.
    pub fn acquire(&self, len: u64) -> Result<GpuSlot> {
        let want = padded(len).max(COPY_ALIGN);
        let class = size_class(len);
        let reused = {
            let mut free = lock(&self.inner.free);
            let key = free
                .range_mut(want..=class.saturating_mul(2))
                .find(|(_, buffers)| !buffers.is_empty())
                .map(|(k, _)| *k);
            key.and_then(|k| free.get_mut(&k).and_then(Vec::pop))
        };
        let buffer = match reused {
            Some(b) => b,
            None => self.create(self.new_size(len))?,
        };
        self.inner.in_use.add(buffer.size());
        Ok(GpuSlot {
            buffer: Some(buffer),
            pool: Arc::clone(&self.inner),
        })
    }

    /// A slot of exactly `padded(len)` bytes: a free buffer of that size if there is one, else a new one. For
    /// buffers a kernel binds whole (a KV cache slot, the residual stream), which must stay within the device's
    /// binding limit that a size class could pass.
    pub fn acquire_exact(&self, len: u64) -> Result<GpuSlot> {
        self.acquire_exact_labelled(len, POOL_LABEL)
    }

    /// [`GpuPool::acquire_exact`], a new buffer labelled `label` (what wgpu's allocator report names it by).
    pub fn acquire_exact_labelled(&self, len: u64, label: &str) -> Result<GpuSlot> {
        let size = crate::gpu::buffer_size(len);
        let reused = lock(&self.inner.free).get_mut(&size).and_then(Vec::pop);
        let buffer = match reused {
            Some(b) => b,
            None => self.create_labelled(size, label)?,
        };
        self.inner.in_use.add(buffer.size());
        Ok(GpuSlot {
            buffer: Some(buffer),
            pool: Arc::clone(&self.inner),
        })
    }

    /// Frees every buffer not handed out (after a phase that needed more memory than the next).
    pub fn trim(&self) {
        let drained = std::mem::take(&mut *lock(&self.inner.free));
        for buffer in drained.into_values().flatten() {
            // Dropped, not destroyed: a copy already recorded into an encoder may still use it.
            self.inner.allocated.sub(buffer.size());
        }
    }

    /// Bytes held and handed out, now and at peak.
    pub fn stats(&self) -> GpuStats {
        GpuStats {
            allocated: self.inner.allocated.stats(),
            in_use: self.inner.in_use.stats(),
            buffers_created: self.inner.created.load(Ordering::Relaxed),
        }
    }

    /// The size of a new buffer for `len` bytes: its size class, unless that would pass the device limit while the
    /// request itself fits.
    fn new_size(&self, len: u64) -> u64 {
        let class = size_class(len);
        if class > self.inner.device.limits().max_buffer_size {
            padded(len).max(COPY_ALIGN)
        } else {
            class
        }
    }

    fn create(&self, size: u64) -> Result<wgpu::Buffer> {
        self.create_labelled(size, POOL_LABEL)
    }

    fn create_labelled(&self, size: u64, label: &str) -> Result<wgpu::Buffer> {
        let buffer = create_buffer(&self.inner.device, label, size, POOL_USAGE, false)?;
        self.inner.allocated.add(size);
        self.inner.created.fetch_add(1, Ordering::Relaxed);
        Ok(buffer)
    }
}

/// A device buffer lent by a [`GpuPool`]; it goes back to the pool when dropped (its contents are kept, but the
/// next holder must not rely on them).
#[derive(Debug)]
pub struct GpuSlot {
    buffer: Option<wgpu::Buffer>,
    pool: Arc<PoolInner>,
}

impl GpuSlot {
    /// The buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("a slot holds its buffer until dropped")
    }

    /// Capacity in bytes (at least what was asked for).
    pub fn size(&self) -> u64 {
        self.buffer().size()
    }
}

impl Drop for GpuSlot {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.in_use.sub(buffer.size());
            lock(&self.pool.free)
                .entry(buffer.size())
                .or_default()
                .push(buffer);
        }
    }
}

/// Two slots of the same size for streaming: the schedule computes layer j from [`DoubleBuffer::front`] while it
/// fetches layer j+1 into [`DoubleBuffer::back`], then [`DoubleBuffer::swap`]s. wgpu runs one queue in order, so
/// the fetch into the back slot must be recorded after the last use of what that slot held two layers ago.
#[derive(Debug)]
pub struct DoubleBuffer {
    slots: [GpuSlot; 2],
    front: usize,
}

impl DoubleBuffer {
    /// Two slots of at least `len` bytes from `pool`.
    pub fn new(pool: &GpuPool, len: u64) -> Result<Self> {
        Ok(DoubleBuffer {
            slots: [pool.acquire(len)?, pool.acquire(len)?],
            front: 0,
        })
    }

    /// The slot the current step computes from.
    pub fn front(&self) -> &GpuSlot {
        &self.slots[self.front]
    }

    /// The slot the next step's data streams into.
    pub fn back(&self) -> &GpuSlot {
        &self.slots[1 - self.front]
    }

    /// Makes the back slot the front one.
    pub fn swap(&mut self) {
        self.front = 1 - self.front;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_bound_waste_and_alignment() {
        for len in [
            1u64,
            3,
            4,
            5,
            255,
            1000,
            4097,
            65_537,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let c = size_class(len);
            assert!(c >= len, "{len} -> {c}");
            assert_eq!(c % 4, 0, "{len} -> {c}");
            // At most a quarter of the next power of two above the request.
            assert!(
                c - len <= (len.next_power_of_two() / 4).max(4),
                "{len} -> {c}"
            );
        }
        assert_eq!(size_class(1000), 1024);
        assert_eq!(size_class(5000), 6144);
    }
}
