//! The one place a run's buffers are made. Every weight buffer, home, slot, working buffer and kernel staging buffer
//! the runtime holds is created here from its entry in the [`super::placement::Placement`] and recorded;
//! the [`Receipt`] that comes with it unrecords it when dropped. What the ledger holds at its peak is therefore what
//! the run really allocated, by construction independent of when transfers and disk writes finish, and comparing it
//! with the placement (and with wgpu's own allocator report, [`Ledger::compare_allocator`]) checks that the plan is
//! the allocation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::placement::{BufferId, BufferSpec, Placement, TierBytes};
use super::OffloadError;
use crate::gpu::Gpu;
use crate::tiers::{GpuSlot, TensorHome, Tier, Tiers};

/// The buffers a run holds now, and the most it held.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    book: Arc<Mutex<Book>>,
}

#[derive(Debug, Default)]
struct Book {
    live: HashMap<BufferId, (Tier, u64)>,
    current: TierBytes,
    peak: TierBytes,
}

/// Proof that a buffer is recorded; dropping it (with the buffer) unrecords it.
#[derive(Debug)]
#[must_use = "a receipt lives as long as its buffer; dropping it unrecords the buffer"]
pub struct Receipt {
    book: Arc<Mutex<Book>>,
    id: BufferId,
}

impl Drop for Receipt {
    fn drop(&mut self) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tier, bytes)) = book.live.remove(&self.id) {
            book.current.sub_from(tier, bytes);
        }
    }
}

/// A buffer (or slot, or home) with its receipt.
#[derive(Debug)]
pub struct Recorded<T> {
    /// What was made.
    pub value: T,
    receipt: Receipt,
}

impl<T> Recorded<T> {
    /// Hands the receipt to `keep` (which must live as long as the buffer) and returns the buffer.
    pub fn keep(self, keep: &mut Vec<Receipt>) -> T {
        keep.push(self.receipt);
        self.value
    }
}

impl<T> std::ops::Deref for Recorded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> std::ops::DerefMut for Recorded<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

/// The placement's entry for `id`, which the runtime is about to make.
pub fn planned(placement: &Placement, id: BufferId) -> Result<&BufferSpec, OffloadError> {
    placement.spec(id).ok_or_else(|| OffloadError::Unplanned {
        what: format!("{id} (not in the placement)"),
        planned: 0,
        made: 0,
    })
}

/// A recorded GPU buffer whose size differs from its placement entry: the runtime and the plan disagree.
fn check_size(spec: &BufferSpec, made: u64) -> Result<(), OffloadError> {
    if made != spec.bytes {
        return Err(OffloadError::Unplanned {
            what: spec.id.to_string(),
            planned: spec.bytes,
            made,
        });
    }
    Ok(())
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    fn record<T>(
        &self,
        spec: &BufferSpec,
        bytes: u64,
        value: T,
    ) -> Result<Recorded<T>, OffloadError> {
        check_size(spec, bytes)?;
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if book.live.insert(spec.id, (spec.tier, bytes)).is_some() {
            return Err(OffloadError::Unplanned {
                what: format!("{} (made twice)", spec.id),
                planned: spec.bytes,
                made: bytes,
            });
        }
        book.current.add_to(spec.tier, bytes);
        book.peak = book.peak.max(book.current);
        Ok(Recorded {
            value,
            receipt: Receipt {
                book: Arc::clone(&self.book),
                id: spec.id,
            },
        })
    }

    /// A zeroed GPU storage buffer for `spec` (a working buffer, a resident cache or residual stream).
    pub fn buffer(
        &self,
        gpu: &Gpu,
        spec: &BufferSpec,
    ) -> Result<Recorded<wgpu::Buffer>, OffloadError> {
        let buffer = gpu.storage_buffer(&spec.id.to_string(), spec.bytes);
        let size = buffer.size();
        self.record(spec, size, buffer)
    }

    /// A GPU storage buffer for `spec` holding `bytes` (a resident weight), zero-padded to its size.
    pub fn buffer_init(
        &self,
        gpu: &Gpu,
        spec: &BufferSpec,
        bytes: &[u8],
    ) -> Result<Recorded<wgpu::Buffer>, OffloadError> {
        let buffer = gpu.storage_buffer_init(&spec.id.to_string(), bytes)?;
        let size = buffer.size();
        self.record(spec, size, buffer)
    }

    /// A slot of exactly `spec.bytes` from the GPU tier's pool (a weight, cache or activation slot, CPU attention's
    /// scratch).
    pub fn slot(
        &self,
        tiers: &Tiers,
        spec: &BufferSpec,
    ) -> Result<Recorded<GpuSlot>, OffloadError> {
        let slot = tiers
            .gpu()
            .acquire_exact_labelled(spec.bytes, &spec.id.to_string())?;
        let size = slot.size();
        self.record(spec, size, slot)
    }

    /// A home for `spec` in its tier holding `data` (zero-padded to `spec.bytes`): a weight, or one sequence's
    /// cache or hidden rows.
    pub fn home(
        &self,
        tiers: &Tiers,
        spec: &BufferSpec,
        data: &[u8],
    ) -> Result<Recorded<TensorHome>, OffloadError> {
        self.home_in(tiers, spec, data, false)
    }

    /// [`Ledger::home`] for a CPU-tier home the CPU itself reads and writes (a cache it attends over): plain host
    /// memory whatever the CPU tier's path ([`Tiers::place_host`]). Other tiers' homes are made as usual.
    pub fn host_home(
        &self,
        tiers: &Tiers,
        spec: &BufferSpec,
        data: &[u8],
    ) -> Result<Recorded<TensorHome>, OffloadError> {
        self.home_in(tiers, spec, data, true)
    }

    fn home_in(
        &self,
        tiers: &Tiers,
        spec: &BufferSpec,
        data: &[u8],
        host: bool,
    ) -> Result<Recorded<TensorHome>, OffloadError> {
        let place = |bytes: &[u8]| match (host, spec.tier) {
            (true, Tier::Cpu) => tiers.place_host(bytes),
            _ => tiers.place(spec.tier, &spec.id.to_string(), bytes),
        };
        let home = if data.len() as u64 == spec.bytes {
            place(data)?
        } else {
            let mut padded = data.to_vec();
            padded.resize(spec.bytes.max(data.len() as u64) as usize, 0);
            place(&padded)?
        };
        let size = match &home {
            TensorHome::Gpu(t) => t.buffer().size(),
            other => other.len(),
        };
        self.record(spec, size, home)
    }

    /// Bytes recorded now, per tier.
    pub fn current(&self) -> TierBytes {
        self.book.lock().unwrap_or_else(|p| p.into_inner()).current
    }

    /// The most bytes recorded at once, per tier, since the ledger was made.
    pub fn peak(&self) -> TierBytes {
        self.book.lock().unwrap_or_else(|p| p.into_inner()).peak
    }

    /// Every buffer recorded now, in id order.
    pub fn live(&self) -> Vec<BufferSpec> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<BufferSpec> = book
            .live
            .iter()
            .map(|(&id, &(tier, bytes))| BufferSpec { id, tier, bytes })
            .collect();
        out.sort_by_key(|b| b.id);
        out
    }

    /// Compares the GPU buffers recorded now with wgpu's allocator report taken at the same moment (see
    /// [`AllocatorCheck`]).
    pub fn compare_allocator(&self, report: &wgpu::AllocatorReport) -> AllocatorCheck {
        let recorded: HashMap<String, u64> = self
            .live()
            .into_iter()
            .filter(|b| b.tier == Tier::Gpu)
            .map(|b| (b.id.to_string(), b.bytes))
            .collect();
        let mut check = AllocatorCheck {
            recorded_buffers: recorded.len(),
            recorded_bytes: recorded.values().sum(),
            ..AllocatorCheck::default()
        };
        for a in &report.allocations {
            match recorded.get(&a.name) {
                Some(&bytes) => {
                    check.matched_buffers += 1;
                    check.matched_request_bytes += bytes;
                    check.matched_allocation_bytes += a.size;
                    if a.size < bytes {
                        check.smaller.push(a.name.clone());
                    }
                }
                None => *check.other.entry(a.name.clone()).or_default() += a.size,
            }
        }
        check.report_total = report.total_allocated_bytes;
        check
    }
}

/// The GPU buffers the ledger records against wgpu's allocator report (where the backend gives one: Vulkan, DX12).
/// A recorded buffer is found in the report by its label; the report's sizes are the driver's (a buffer's memory
/// requirement, rounded up to its alignment), so a matched allocation is at least the recorded size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorCheck {
    /// GPU buffers the ledger records.
    pub recorded_buffers: usize,
    /// Their bytes.
    pub recorded_bytes: u64,
    /// Report allocations named like a recorded buffer.
    pub matched_buffers: usize,
    /// The recorded bytes of those.
    pub matched_request_bytes: u64,
    /// The report's bytes of those (driver alignment included).
    pub matched_allocation_bytes: u64,
    /// Matched allocations smaller than recorded (never expected).
    pub smaller: Vec<String>,
    /// Everything else in the report, by label: buffers outside the placement (kernel parameters, read-back and
    /// staging-belt buffers of transfers, CPU-tier buffers on the DMA path, other runs' or tests' buffers).
    pub other: BTreeMap<String, u64>,
    /// The report's total allocated bytes.
    pub report_total: u64,
}

impl AllocatorCheck {
    /// Every recorded GPU buffer was found once in the report, none smaller than recorded.
    pub fn agrees(&self) -> bool {
        self.matched_buffers == self.recorded_buffers
            && self.matched_request_bytes == self.recorded_bytes
            && self.smaller.is_empty()
    }
}
