//! GPU time spent in transfer submits, from timestamps the GPU writes itself (`TIMESTAMP_QUERY`): an empty compute
//! pass at the start and at the end of each transfer encoder writes one timestamp each. wgpu has one queue, so this
//! is time the GPU ran copies instead of compute; what zero-copy kernels read in place is inside their compute and
//! never shows here (hidden). Collected once per step, behind the step's last submit.

use std::sync::Mutex;

use super::{lock, Result, TierError};

/// Timestamp pairs one step can time; transfer submits past this are not timed (a step of opt-175b's 96 layers and
/// two GPU batches has about 400).
const PAIRS: u32 = 1024;

/// The query set and how many of its pairs this step has used.
#[derive(Debug)]
pub(crate) struct TransferClock {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    state: Mutex<ClockState>,
}

#[derive(Debug, Default)]
struct ClockState {
    /// Pairs begun this step.
    used: u32,
    /// Whether the last pair begun is waiting for its end.
    open: bool,
}

impl TransferClock {
    /// A clock on `device`, or `None` without `TIMESTAMP_QUERY`.
    pub(crate) fn new(device: &wgpu::Device) -> Option<TransferClock> {
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        let queries = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("transfer timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * PAIRS,
        });
        let resolved = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("resolved transfer timestamps"),
            size: 16 * u64::from(PAIRS),
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(TransferClock {
            queries,
            resolved,
            state: Mutex::new(ClockState::default()),
        })
    }

    /// Writes the start timestamp of a transfer encoder (before its copies), while pairs remain.
    pub(crate) fn begin(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut s = lock(&self.state);
        if s.open || s.used >= PAIRS {
            return;
        }
        self.pass(encoder, Some(2 * s.used), None);
        s.open = true;
    }

    /// Writes the end timestamp of the encoder [`TransferClock::begin`] started (after its copies).
    pub(crate) fn end(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut s = lock(&self.state);
        if !s.open {
            return;
        }
        self.pass(encoder, None, Some(2 * s.used + 1));
        s.open = false;
        s.used += 1;
    }

    fn pass(&self, encoder: &mut wgpu::CommandEncoder, begin: Option<u32>, end: Option<u32>) {
        drop(encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("transfer timestamp"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.queries,
                beginning_of_pass_write_index: begin,
                end_of_pass_write_index: end,
            }),
        }));
    }

    /// Records the resolve of this step's pairs into `encoder` and starts a new step; returns how many pairs to read
    /// from [`TransferClock::resolved`] once it has run.
    pub(crate) fn resolve(&self, encoder: &mut wgpu::CommandEncoder) -> u32 {
        let mut s = lock(&self.state);
        let pairs = s.used;
        if pairs > 0 {
            encoder.resolve_query_set(&self.queries, 0..2 * pairs, &self.resolved, 0);
        }
        *s = ClockState::default();
        pairs
    }

    /// The buffer the timestamps resolve into.
    pub(crate) fn resolved(&self) -> &wgpu::Buffer {
        &self.resolved
    }
}

/// Seconds inside the `pairs` (start, end) pairs of resolved timestamp `bytes`, at `period_ns` per tick.
pub(crate) fn paired_seconds(bytes: &[u8], pairs: u32, period_ns: f32) -> Result<f64> {
    let need = 16 * pairs as usize;
    let ticks: &[u8] = bytes.get(..need).ok_or(TierError::Size {
        what: "resolved transfer timestamps",
        expected: need as u64,
        found: bytes.len() as u64,
    })?;
    let total: u64 = ticks
        .chunks_exact(16)
        .map(|p| {
            let t0 = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
            let t1 = u64::from_le_bytes(p[8..].try_into().unwrap_or_default());
            t1.saturating_sub(t0)
        })
        .sum();
    Ok(total as f64 * f64::from(period_ns) * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_each_pair_at_the_period() {
        let mut bytes = Vec::new();
        for (a, b) in [(100u64, 150u64), (1000, 1010), (7, 5)] {
            bytes.extend(a.to_le_bytes());
            bytes.extend(b.to_le_bytes());
        }
        // 50 + 10 + 0 (a reversed pair counts nothing) ticks of 2 ns.
        assert!((paired_seconds(&bytes, 3, 2.0).unwrap() - 120e-9).abs() < 1e-15);
        assert!(paired_seconds(&bytes, 4, 2.0).is_err());
    }
}
