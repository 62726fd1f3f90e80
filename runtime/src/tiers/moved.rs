//! What the tiers moved: bytes per (source, destination) tier pair, counted where [`super::Tiers`] records each
//! transfer, and the seconds the host waited for GPU -> host copies. A caller takes a [`Moved`] before and after a
//! phase (prefill, decode) and subtracts ([`Moved::since`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Tier;

/// A snapshot of what the tiers moved since they were made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Moved {
    /// `bytes[from][to]`, indexed in [`Tier::ALL`]'s order.
    bytes: [[u64; 3]; 3],
    /// Seconds the host spent blocked on GPU -> host copies (readback maps: new rows for a host-memory or disk home,
    /// CPU attention's q, k, v).
    pub readback_wait_s: f64,
    /// Seconds the GPU spent in transfer submits (copies in and out), from its own timestamps; `None` where the
    /// device writes none. With one queue the GPU computes nothing meanwhile: this is the time it waited for copies.
    pub gpu_transfer_s: Option<f64>,
    /// Of the CPU -> GPU bytes, those kernels read in place (zero-copy decode): they crossed PCIe inside compute,
    /// with no transfer submit.
    pub in_place_bytes: u64,
}

impl Moved {
    /// Bytes moved from `from` to `to` (a disk tensor reaches the GPU through host memory: counted disk -> GPU).
    pub fn bytes(&self, from: Tier, to: Tier) -> u64 {
        self.bytes[index(from)][index(to)]
    }

    /// A snapshot with these bytes per pair (and no waits): for reports and tests.
    pub fn from_pairs(pairs: &[(Tier, Tier, u64)]) -> Moved {
        let mut out = Moved::default();
        for &(from, to, n) in pairs {
            out.bytes[index(from)][index(to)] += n;
        }
        out
    }

    /// Every pair that moved something, in [`Tier::ALL`]'s order.
    pub fn pairs(&self) -> Vec<(Tier, Tier, u64)> {
        let mut out = Vec::new();
        for from in Tier::ALL {
            for to in Tier::ALL {
                let n = self.bytes(from, to);
                if n > 0 {
                    out.push((from, to, n));
                }
            }
        }
        out
    }

    /// Bytes that crossed between the GPU and the host, both directions: what PCIe carried.
    pub fn pcie_bytes(&self) -> u64 {
        Tier::ALL
            .into_iter()
            .filter(|&t| t != Tier::Gpu)
            .map(|t| self.bytes(t, Tier::Gpu) + self.bytes(Tier::Gpu, t))
            .sum()
    }

    /// What moved between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Moved) -> Moved {
        let mut out = Moved {
            readback_wait_s: (self.readback_wait_s - earlier.readback_wait_s).max(0.0),
            gpu_transfer_s: self
                .gpu_transfer_s
                .map(|s| (s - earlier.gpu_transfer_s.unwrap_or(0.0)).max(0.0)),
            in_place_bytes: self.in_place_bytes.saturating_sub(earlier.in_place_bytes),
            ..Moved::default()
        };
        for (f, row) in out.bytes.iter_mut().enumerate() {
            for (t, n) in row.iter_mut().enumerate() {
                *n = self.bytes[f][t].saturating_sub(earlier.bytes[f][t]);
            }
        }
        out
    }
}

const fn index(tier: Tier) -> usize {
    match tier {
        Tier::Gpu => 0,
        Tier::Cpu => 1,
        Tier::Disk => 2,
    }
}

/// The tiers' running counts behind [`Moved`].
#[derive(Debug, Default)]
pub(crate) struct MoveCounter {
    bytes: [[AtomicU64; 3]; 3],
    wait_ns: AtomicU64,
    /// GPU transfer time, ns, plus one once any was collected (0: none).
    gpu_transfer_ns: AtomicU64,
    in_place: AtomicU64,
}

impl MoveCounter {
    pub(crate) fn add(&self, from: Tier, to: Tier, n: u64) {
        self.bytes[index(from)][index(to)].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn waited(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn in_place(&self, n: u64) {
        self.add(Tier::Cpu, Tier::Gpu, n);
        self.in_place.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn gpu_transfer(&self, secs: f64) {
        let ns = (secs * 1e9) as u64;
        // The first collection also adds the 1 that marks "measured".
        let _ = self
            .gpu_transfer_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.max(1).saturating_add(ns))
            });
    }

    pub(crate) fn snapshot(&self) -> Moved {
        let gpu_ns = self.gpu_transfer_ns.load(Ordering::Relaxed);
        let mut out = Moved {
            readback_wait_s: self.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            gpu_transfer_s: (gpu_ns > 0).then(|| (gpu_ns - 1) as f64 * 1e-9),
            in_place_bytes: self.in_place.load(Ordering::Relaxed),
            ..Moved::default()
        };
        for (f, row) in out.bytes.iter_mut().enumerate() {
            for (t, n) in row.iter_mut().enumerate() {
                *n = self.bytes[f][t].load(Ordering::Relaxed);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pairs_and_subtracts_snapshots() {
        let c = MoveCounter::default();
        c.add(Tier::Cpu, Tier::Gpu, 100);
        let first = c.snapshot();
        c.add(Tier::Cpu, Tier::Gpu, 20);
        c.add(Tier::Gpu, Tier::Disk, 7);
        c.add(Tier::Gpu, Tier::Gpu, 1000);
        c.waited(std::time::Duration::from_millis(3));
        let d = c.snapshot().since(&first);
        assert_eq!(d.bytes(Tier::Cpu, Tier::Gpu), 20);
        assert_eq!(d.pcie_bytes(), 27);
        assert_eq!(
            d.pairs(),
            vec![
                (Tier::Gpu, Tier::Gpu, 1000),
                (Tier::Gpu, Tier::Disk, 7),
                (Tier::Cpu, Tier::Gpu, 20)
            ]
        );
        assert!((d.readback_wait_s - 0.003).abs() < 1e-9);
    }
}
