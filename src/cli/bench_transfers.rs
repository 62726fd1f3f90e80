//! What `strata bench` says about transfers: per phase, the bytes each tier pair moved (counted by the tiers where
//! they record each copy), the average rate over the phase, the seconds the host waited for GPU -> host copies, the
//! GPU's own time in transfer submits (timestamps, where the device writes them), and
//! the PCIe-bound ceiling of the decode phase from the adapter's cached hardware profile (`strata profile`).

use strata_runtime::hardware::{default_profile_path, HardwareProfile};
use strata_runtime::offload::policy::format_bytes;
use strata_runtime::tiers::{Moved, Tier};

const GIB: f64 = (1u64 << 30) as f64;

/// One phase's transfers as JSON: bytes per pair (`"cpu->gpu"`), PCIe bytes, GB/s over the phase, readback waits.
pub fn phase_json(moved: &Moved, secs: f64) -> serde_json::Value {
    let pairs: serde_json::Map<String, serde_json::Value> = moved
        .pairs()
        .into_iter()
        .map(|(from, to, n)| (format!("{}->{}", from.key(), to.key()), n.into()))
        .collect();
    serde_json::json!({
        "bytes": pairs,
        "pcie_bytes": moved.pcie_bytes(),
        "pcie_gb_s": rate(moved.pcie_bytes(), secs),
        "readback_wait_s": moved.readback_wait_s,
        // GPU seconds in transfer submits (GPU timestamps; null where the device has none): time the one queue
        // spent copying rather than computing. In-place (zero-copy) reads are inside compute: hidden, not here.
        "gpu_transfer_s": moved.gpu_transfer_s,
        "in_place_bytes": moved.in_place_bytes,
    })
}

/// One phase's transfers as a line of text.
pub fn phase_text(name: &str, moved: &Moved, secs: f64) -> String {
    let pairs: Vec<String> = moved
        .pairs()
        .into_iter()
        .map(|(from, to, n)| {
            format!(
                "{from}->{to} {} ({:.2} GB/s)",
                format_bytes(n),
                rate(n, secs)
            )
        })
        .collect();
    let pairs = if pairs.is_empty() {
        "nothing moved".to_string()
    } else {
        pairs.join(", ")
    };
    let in_place = match moved.in_place_bytes {
        0 => String::new(),
        n => format!(
            " ({} of CPU->GPU read in place by the kernels, inside their compute)",
            format_bytes(n)
        ),
    };
    let gpu = match moved.gpu_transfer_s {
        Some(s) => format!("the GPU spent {s:.3} s in transfer submits"),
        None => "no GPU timestamps for transfer submits on this device".to_string(),
    };
    format!(
        "{name} transfers: {pairs}{in_place}; host waited {:.3} s on GPU->host copies; {gpu}",
        moved.readback_wait_s
    )
}

/// GB/s of `bytes` over `secs` (0 without time).
fn rate(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// The decode phase's PCIe-bound ceiling: the token rate if every decode step took only the time its PCIe bytes need
/// at the profile's bandwidths (each direction on its own: PCIe is full duplex).
#[derive(Clone, Debug, PartialEq)]
pub struct Ceiling {
    /// Where the bandwidths come from.
    pub profile: String,
    /// Host -> GPU and GPU -> host bandwidth, GiB/s.
    pub gib_s: (f64, f64),
    /// Token/s at that ceiling.
    pub tok_s: f64,
}

impl Ceiling {
    /// The ceiling of a decode phase that moved `decode` in `steps` steps of `batch` tokens each, from `profile`;
    /// `None` when nothing crossed PCIe.
    pub fn of(
        profile: &HardwareProfile,
        decode: &Moved,
        steps: usize,
        batch: usize,
    ) -> Option<Ceiling> {
        let to_gpu: u64 = [Tier::Cpu, Tier::Disk]
            .iter()
            .map(|&t| decode.bytes(t, Tier::Gpu))
            .sum();
        let from_gpu: u64 = [Tier::Cpu, Tier::Disk]
            .iter()
            .map(|&t| decode.bytes(Tier::Gpu, t))
            .sum();
        if steps == 0 || to_gpu + from_gpu == 0 || profile.ctog <= 0.0 || profile.gtoc_cache <= 0.0
        {
            return None;
        }
        let secs = (to_gpu as f64 / (profile.ctog * GIB))
            .max(from_gpu as f64 / (profile.gtoc_cache * GIB));
        Some(Ceiling {
            profile: profile.name.clone(),
            gib_s: (profile.ctog, profile.gtoc_cache),
            tok_s: (steps * batch) as f64 / secs,
        })
    }

    /// The adapter's cached profile, if `strata profile` (or `--policy auto`) has measured one.
    pub fn profile(adapter: &str) -> Option<HardwareProfile> {
        let path = default_profile_path(adapter)?;
        HardwareProfile::load(&path).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_is_the_slower_direction_at_the_profiles_bandwidth() {
        let profile = HardwareProfile {
            ctog: 50.0,
            gtoc_cache: 25.0,
            ..HardwareProfile::t4()
        };
        assert_eq!(Ceiling::of(&profile, &Moved::default(), 3, 8), None);
        // 10 GiB up and 1 GiB down per 3 steps: up takes 0.2 s, down 0.04 s, so 24 tokens in 0.2 s.
        let moved = Moved::from_pairs(&[
            (Tier::Cpu, Tier::Gpu, 6 << 30),
            (Tier::Disk, Tier::Gpu, 4 << 30),
            (Tier::Gpu, Tier::Cpu, 1 << 30),
            (Tier::Gpu, Tier::Gpu, 100 << 30),
        ]);
        let c = Ceiling::of(&profile, &moved, 3, 8).unwrap();
        assert!((c.tok_s - 120.0).abs() < 1e-9, "{c:?}");
        // Downloads bound it once they take longer.
        let moved = Moved::from_pairs(&[
            (Tier::Cpu, Tier::Gpu, 1 << 30),
            (Tier::Gpu, Tier::Disk, 5 << 30),
        ]);
        let c = Ceiling::of(&profile, &moved, 1, 1).unwrap();
        assert!((c.tok_s - 5.0).abs() < 1e-9, "{c:?}");
    }
}
