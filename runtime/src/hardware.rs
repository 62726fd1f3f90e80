//! Hardware profiles: the transfer and compute speeds the cost model needs, stored as TOML.
//!
//! Field names follow FlexLLMGen's cost model (see COST-MODEL.md). Bandwidths are in GiB/s (2^30 bytes per second)
//! and compute rates in TFLOP/s (10^12), the units FlexLLMGen writes its constants in, so a profile file reads like
//! the document. The built-in [`HardwareProfile::t4`] is FlexLLMGen's hand-fitted T4 profile; `strata profile`
//! measures the current machine (see [`measure`]) and writes a file to [`default_profile_path`].

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod gpu_probe;
pub mod measure;

const GIB: f64 = (1u64 << 30) as f64;
const TERA: f64 = 1e12;

/// Transfer and compute speeds of one machine (GPU + CPU + disk).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// What the profile describes, e.g. the GPU adapter's name.
    pub name: String,
    /// Where the numbers come from (`FlexLLMGen's T4 constants`, `measured by strata profile`).
    #[serde(default)]
    pub source: String,
    /// The fields that were measured on this machine; the others were taken from a base profile.
    #[serde(default)]
    pub measured: Vec<String>,
    /// CPU -> GPU bandwidth, GiB/s.
    pub ctog: f64,
    /// GPU -> CPU bandwidth for the KV cache, GiB/s.
    pub gtoc_cache: f64,
    /// GPU -> CPU bandwidth for hidden states, GiB/s.
    pub gtoc_hidden: f64,
    /// Disk -> CPU (read) bandwidth, GiB/s.
    pub dtoc: f64,
    /// CPU -> disk (write) bandwidth for the cache during prefill, GiB/s.
    pub ctod_cache_p: f64,
    /// CPU -> disk bandwidth for hidden states during prefill, GiB/s.
    pub ctod_hidden_p: f64,
    /// CPU -> disk bandwidth during decode, GiB/s.
    pub ctod_g: f64,
    /// GPU matrix-multiply rate during prefill (GEMM), TFLOP/s.
    pub mm_flops_p: f64,
    /// GPU matrix-multiply rate during decode (skinny GEMM / GEMV), TFLOP/s.
    pub mm_flops_g: f64,
    /// GPU batched matmul (attention) rate during prefill, TFLOP/s.
    pub bmm_flops_p: f64,
    /// GPU batched matmul (attention) rate during decode, TFLOP/s.
    pub bmm_flops_g: f64,
    /// CPU attention rate, TFLOP/s (scaled by the c1..c3 correction below).
    pub cpu_flops: f64,
    /// CPU rate correction: coefficient of a*b, a = log2(64/gbs), b = log2(4096/hidden).
    pub c1: f64,
    /// CPU rate correction: coefficient of a.
    pub c2: f64,
    /// CPU rate correction: coefficient of b.
    pub c3: f64,
    /// CPU matrix-vector rate, TFLOP/s (measured by `strata profile`; unused by FlexLLMGen's formulation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_gemv_flops: Option<f64>,
    /// Effective weight bandwidth, GiB/s, of a decode linear reading its weights from the CPU tier in place
    /// (zero-copy, `--transfer zero-copy`), measured by `strata profile` on devices with the DMA path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctog_zero_copy: Option<f64>,
    /// Effective weight bandwidth, GiB/s, of the copy path for the same linear: its weights copied from the CPU tier
    /// into a GPU buffer, then the linear, in one submit (`--transfer copy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctog_copy_linear: Option<f64>,
    /// The part of a decode linear's time that does not grow with its rows (reading and converting the weights,
    /// launching the dispatch), as weight bytes per second, GiB/s: strata's formulation prices a linear of `m <=
    /// GEMV_MAX_ROWS` rows over `W` weight bytes at `W / gemv_weight_gib_s + m * flops_per_row / mm_flops_g_row`,
    /// fitted by `strata profile` to GEMVs of one row and of `GEMV_MAX_ROWS` rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemv_weight_gib_s: Option<f64>,
    /// The rate each further row of a decode linear adds, TFLOP/s (see [`HardwareProfile::gemv_weight_gib_s`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_flops_g_row: Option<f64>,
}

/// A profile that could not be read or is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardwareError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid profile.
    #[error("{path}: not a hardware profile: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with its line and column.
        reason: String,
    },
    /// A value that cannot be a speed.
    #[error("hardware profile `{profile}`: {field} = {value} must be a positive number")]
    Value {
        /// The profile's name.
        profile: String,
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A name that is neither a built-in profile nor an existing file.
    #[error("no hardware profile `{0}`: use a built-in name (t4) or the path of a TOML file written by `strata profile`")]
    Unknown(String),
}

impl HardwareProfile {
    /// FlexLLMGen's constants for an NVIDIA T4 (16 GB, PCIe gen3) with its host and SSD.
    pub fn t4() -> HardwareProfile {
        HardwareProfile {
            name: "t4".into(),
            source: "FlexLLMGen's hand-fitted T4 constants (experimental/cost_model.py)".into(),
            measured: Vec::new(),
            ctog: 12.89,
            gtoc_cache: 0.97,
            gtoc_hidden: 4.82,
            dtoc: 0.473,
            ctod_cache_p: 0.746,
            ctod_hidden_p: 2.015,
            ctod_g: 2.015,
            mm_flops_p: 21.24,
            mm_flops_g: 4.3,
            bmm_flops_p: 9.97,
            bmm_flops_g: 0.079,
            cpu_flops: 0.0123,
            c1: 0.0168,
            c2: 0.0328,
            c3: 0.0621,
            cpu_gemv_flops: None,
            ctog_zero_copy: None,
            ctog_copy_linear: None,
            gemv_weight_gib_s: None,
            mm_flops_g_row: None,
        }
    }

    /// The names of the built-in profiles.
    pub const BUILT_IN: &'static [&'static str] = &["t4"];

    /// A built-in profile by name (case-insensitive), or the profile stored in the file `name_or_path`.
    pub fn resolve(name_or_path: &str) -> Result<HardwareProfile, HardwareError> {
        if name_or_path.eq_ignore_ascii_case("t4") {
            return Ok(Self::t4());
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            Self::load(path)
        } else {
            Err(HardwareError::Unknown(name_or_path.to_string()))
        }
    }

    /// Reads and validates a TOML profile.
    pub fn load(path: &Path) -> Result<HardwareProfile, HardwareError> {
        let text = std::fs::read_to_string(path).map_err(|source| HardwareError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let profile: HardwareProfile = toml::from_str(&text).map_err(|e| HardwareError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        profile.validate()?;
        Ok(profile)
    }

    /// The profile as TOML, with a header comment giving the units.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"));
        format!(
            "# strata hardware profile. Bandwidths in GiB/s (2^30 B/s), compute rates in TFLOP/s (10^12).\n\
             # Field meanings follow FlexLLMGen's cost model; see COST-MODEL.md.\n{body}"
        )
    }

    /// Writes the profile as TOML, creating the parent directory.
    pub fn save(&self, path: &Path) -> Result<(), HardwareError> {
        let io = |source| HardwareError::Io {
            path: path.to_path_buf(),
            source,
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(io)?;
        // Written beside the file (a uniquely named temp file, removed on error) and renamed into place, so an
        // interrupted write never leaves half a profile.
        let mut partial = tempfile::Builder::new()
            .prefix(".strata-profile-")
            .suffix(".part")
            .tempfile_in(parent)
            .map_err(io)?;
        crate::fault::check_write(crate::fault::WriteKind::Profile)
            .and_then(|()| partial.write_all(self.to_toml().as_bytes()))
            .map_err(io)?;
        partial.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// Checks that every speed is a positive finite number and every correction finite.
    pub fn validate(&self) -> Result<(), HardwareError> {
        let speeds = [
            ("ctog", self.ctog),
            ("gtoc_cache", self.gtoc_cache),
            ("gtoc_hidden", self.gtoc_hidden),
            ("dtoc", self.dtoc),
            ("ctod_cache_p", self.ctod_cache_p),
            ("ctod_hidden_p", self.ctod_hidden_p),
            ("ctod_g", self.ctod_g),
            ("mm_flops_p", self.mm_flops_p),
            ("mm_flops_g", self.mm_flops_g),
            ("bmm_flops_p", self.bmm_flops_p),
            ("bmm_flops_g", self.bmm_flops_g),
            ("cpu_flops", self.cpu_flops),
        ];
        let optional = [
            ("cpu_gemv_flops", self.cpu_gemv_flops),
            ("ctog_zero_copy", self.ctog_zero_copy),
            ("ctog_copy_linear", self.ctog_copy_linear),
            ("gemv_weight_gib_s", self.gemv_weight_gib_s),
            ("mm_flops_g_row", self.mm_flops_g_row),
        ]
        .into_iter()
        .filter_map(|(f, v)| v.map(|v| (f, v)));
        for (field, value) in speeds.into_iter().chain(optional) {
            if !(value.is_finite() && value > 0.0) {
                return Err(HardwareError::Value {
                    profile: self.name.clone(),
                    field,
                    value,
                });
            }
        }
        for (field, value) in [("c1", self.c1), ("c2", self.c2), ("c3", self.c3)] {
            if !value.is_finite() {
                return Err(HardwareError::Value {
                    profile: self.name.clone(),
                    field,
                    value,
                });
            }
        }
        Ok(())
    }

    /// Every bandwidth and compute field in SI units, as the cost models use them.
    pub fn rates(&self) -> Rates {
        let (bw, fl) = (Self::bytes_per_s, Self::flop_per_s);
        Rates {
            ctog: bw(self.ctog),
            gtoc_cache: bw(self.gtoc_cache),
            gtoc_hidden: bw(self.gtoc_hidden),
            dtoc: bw(self.dtoc),
            ctod_cache_p: bw(self.ctod_cache_p),
            ctod_hidden_p: bw(self.ctod_hidden_p),
            ctod_g: bw(self.ctod_g),
            mm_p: fl(self.mm_flops_p),
            mm_g: fl(self.mm_flops_g),
            bmm_p: fl(self.bmm_flops_p),
            bmm_g: fl(self.bmm_flops_g),
        }
    }

    /// A bandwidth field in bytes per second.
    pub fn bytes_per_s(gib_per_s: f64) -> f64 {
        gib_per_s * GIB
    }

    /// A compute field in FLOP per second.
    pub fn flop_per_s(tflops: f64) -> f64 {
        tflops * TERA
    }

    /// FlexLLMGen's effective CPU attention rate in FLOP/s for a GPU batch size and hidden width:
    /// `cpu * max(0.1, 1 + c1*a*b - c2*a - c3*b)`, a = max(0, log2(64/gbs)), b = max(0, log2(4096/hidden)).
    pub fn cpu_rate(&self, gpu_batch_size: usize, hidden: usize) -> f64 {
        let a = (64.0 / gpu_batch_size.max(1) as f64).log2().max(0.0);
        let b = (4096.0 / hidden.max(1) as f64).log2().max(0.0);
        let factor = (1.0 + self.c1 * a * b - self.c2 * a - self.c3 * b).max(0.1);
        Self::flop_per_s(self.cpu_flops) * factor
    }
}

/// A [`HardwareProfile`]'s rates in bytes per second and FLOP per second (field names as the profile's; `_p` is
/// prefill, `_g` decode).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// CPU -> GPU.
    pub ctog: f64,
    /// GPU -> CPU, KV cache.
    pub gtoc_cache: f64,
    /// GPU -> CPU, hidden states.
    pub gtoc_hidden: f64,
    /// Disk -> CPU.
    pub dtoc: f64,
    /// CPU -> disk, KV cache at prefill.
    pub ctod_cache_p: f64,
    /// CPU -> disk, hidden states at prefill.
    pub ctod_hidden_p: f64,
    /// CPU -> disk at decode.
    pub ctod_g: f64,
    /// GPU matmul, prefill.
    pub mm_p: f64,
    /// GPU matmul, decode.
    pub mm_g: f64,
    /// GPU batched matmul (attention), prefill.
    pub bmm_p: f64,
    /// GPU batched matmul (attention), decode.
    pub bmm_g: f64,
}

/// A file-name-safe slug of an adapter name: lower-case ASCII letters and digits, runs of others as one `-`.
pub fn adapter_slug(adapter: &str) -> String {
    let mut out = String::new();
    for c in adapter.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "unknown-adapter".into()
    } else {
        out
    }
}

/// The user's cache directory: `$XDG_CACHE_HOME` where set to an absolute path (on every platform, as the XDG spec
/// and Hugging Face's tools read it), else the platform's (`dirs::cache_dir`: `~/.cache` on Linux,
/// `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows). `None` when neither is known.
pub fn user_cache_dir() -> Option<PathBuf> {
    cache_dir_from(
        std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from),
        dirs::cache_dir(),
    )
}

fn cache_dir_from(xdg: Option<PathBuf>, platform: Option<PathBuf>) -> Option<PathBuf> {
    // The XDG spec says relative values are invalid and must be ignored.
    xdg.filter(|p| p.is_absolute()).or(platform)
}

/// Where `strata profile` stores the profile of `adapter` by default: `strata/profiles/<slug>.toml` under
/// [`user_cache_dir`]. `None` when there is no cache directory.
pub fn default_profile_path(adapter: &str) -> Option<PathBuf> {
    user_cache_dir().map(|cache| profile_path_in(&cache, adapter))
}

fn profile_path_in(cache: &Path, adapter: &str) -> PathBuf {
    cache
        .join("strata")
        .join("profiles")
        .join(format!("{}.toml", adapter_slug(adapter)))
}

/// A device's datasheet peaks: what `strata bench kernels` reports each kernel's speed against.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DevicePeak {
    /// The model the adapter's name matched.
    pub device: &'static str,
    /// Dense f16 multiply-add throughput with f32 accumulation (tensor cores where the device has them; Apple GPUs:
    /// their f32/f16 ALU peak), TFLOP/s.
    pub tflops: f64,
    /// Memory bandwidth, GB/s (10^9 bytes per second).
    pub gbps: f64,
}

impl DevicePeak {
    /// The peaks of well-known GPUs by adapter name (vendors' datasheet figures, dense, no sparsity), or `None`:
    /// then pass `--peak-tflops` / `--peak-gbps`. More specific names come first ("h100 pcie" before "h100").
    pub fn known(adapter: &str) -> Option<DevicePeak> {
        const TABLE: &[(&str, &str, f64, f64)] = &[
            ("h200 nvl", "H200 NVL", 835.0, 4800.0),
            ("h200", "H200 SXM", 989.4, 4800.0),
            ("h100 pcie", "H100 PCIe", 756.0, 2000.0),
            ("h100 nvl", "H100 NVL", 835.0, 3900.0),
            ("h100", "H100 SXM", 989.4, 3350.0),
            ("a100-sxm4-80gb", "A100 80GB SXM", 312.0, 2039.0),
            ("a100 80gb pcie", "A100 80GB PCIe", 312.0, 1935.0),
            ("a100", "A100 40GB", 312.0, 1555.0),
            ("l40s", "L40S", 362.0, 864.0),
            ("l40", "L40", 181.0, 864.0),
            ("rtx 4090", "RTX 4090", 165.2, 1008.0),
            ("rtx 3090", "RTX 3090", 71.0, 936.0),
            ("tesla t4", "T4", 65.0, 320.0),
            ("l4", "L4", 121.0, 300.0),
            ("m4 max", "Apple M4 Max", 18.4, 546.0),
            ("m4 pro", "Apple M4 Pro", 9.2, 273.0),
            ("m4", "Apple M4", 4.3, 120.0),
            ("m3 max", "Apple M3 Max", 16.3, 400.0),
            ("m3 pro", "Apple M3 Pro", 7.4, 150.0),
            ("m3", "Apple M3", 4.1, 100.0),
            ("m2 ultra", "Apple M2 Ultra", 27.2, 800.0),
            ("m2 max", "Apple M2 Max", 13.6, 400.0),
            ("m2 pro", "Apple M2 Pro", 6.8, 200.0),
            ("m2", "Apple M2", 3.6, 100.0),
            ("m1 ultra", "Apple M1 Ultra", 21.2, 800.0),
            ("m1 max", "Apple M1 Max", 10.4, 400.0),
            ("m1 pro", "Apple M1 Pro", 5.2, 200.0),
            ("m1", "Apple M1", 2.6, 68.25),
        ];
        let name = adapter.to_ascii_lowercase();
        // Apple's adapters are named "Apple M2 Max": the short needles only count after "apple".
        let apple = name.contains("apple");
        TABLE
            .iter()
            .filter(|(needle, ..)| apple == needle.starts_with('m'))
            .find(|(needle, ..)| name.contains(needle))
            .map(|&(_, device, tflops, gbps)| DevicePeak {
                device,
                tflops,
                gbps,
            })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_devices_match_their_most_specific_name() {
        use super::DevicePeak;
        let peak = |name: &str| DevicePeak::known(name).map(|p| p.device);
        assert_eq!(peak("NVIDIA H200"), Some("H200 SXM"));
        assert_eq!(peak("NVIDIA H100 PCIe"), Some("H100 PCIe"));
        assert_eq!(peak("NVIDIA H100 80GB HBM3"), Some("H100 SXM"));
        assert_eq!(peak("NVIDIA A100-SXM4-80GB"), Some("A100 80GB SXM"));
        assert_eq!(peak("NVIDIA GeForce RTX 4090"), Some("RTX 4090"));
        assert_eq!(peak("NVIDIA L4"), Some("L4"));
        assert_eq!(peak("Apple M2 Max"), Some("Apple M2 Max"));
        assert_eq!(peak("Apple M1"), Some("Apple M1"));
        // "m1"/"m2" inside another vendor's name are not Apple GPUs; lavapipe has no datasheet.
        assert_eq!(peak("NVIDIA RTX A2000 M2"), None);
        assert_eq!(peak("llvmpipe (LLVM 15.0.6, 256 bits)"), None);
    }

    use super::*;

    #[test]
    fn t4_round_trips_through_toml() {
        let t4 = HardwareProfile::t4();
        let text = t4.to_toml();
        assert!(text.contains("ctog = 12.89"), "{text}");
        let back: HardwareProfile = toml::from_str(&text).unwrap();
        assert_eq!(back, t4);
    }

    #[test]
    fn files_load_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/p.toml");
        let mut p = HardwareProfile::t4();
        p.name = "my gpu".into();
        p.cpu_gemv_flops = Some(0.05);
        p.save(&path).unwrap();
        assert_eq!(HardwareProfile::resolve(path.to_str().unwrap()).unwrap(), p);

        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("dtoc = 0.473", "dtoc = -1.0");
        std::fs::write(&path, text).unwrap();
        let e = HardwareProfile::load(&path).unwrap_err().to_string();
        assert!(e.contains("dtoc = -1 must be a positive number"), "{e}");

        std::fs::write(&path, "name = \"x\"\nctog = 1.0\n").unwrap();
        let e = HardwareProfile::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("not a hardware profile") && e.contains("missing field"),
            "{e}"
        );
        let e = HardwareProfile::resolve("v100").unwrap_err().to_string();
        assert!(e.contains("no hardware profile `v100`"), "{e}");
    }

    #[test]
    fn cpu_rate_follows_flexllmgen_correction() {
        let t4 = HardwareProfile::t4();
        // gbs 64 and hidden 4096: a = b = 0, the rate is the constant itself.
        assert!((t4.cpu_rate(64, 4096) - 0.0123e12).abs() < 1.0);
        // gbs 16, hidden 1024: a = 2, b = 2.
        let f = 1.0 + 0.0168 * 4.0 - 0.0328 * 2.0 - 0.0621 * 2.0;
        assert!((t4.cpu_rate(16, 1024) - 0.0123e12 * f).abs() < 1.0);
        // Large batches leave only the width term: hidden 1 gives b = 12.
        assert!((t4.cpu_rate(128, 1) - 0.0123e12 * (1.0 - 0.0621 * 12.0)).abs() < 1.0);
    }

    #[test]
    fn profile_paths_follow_xdg_then_the_platform_cache() {
        assert_eq!(adapter_slug("NVIDIA H200 (Vulkan)"), "nvidia-h200-vulkan");
        assert_eq!(adapter_slug("  "), "unknown-adapter");
        let p = cache_dir_from(Some("/x/cache".into()), Some("/home/u/.cache".into())).unwrap();
        assert_eq!(p, PathBuf::from("/x/cache"));
        let p = cache_dir_from(Some("rel".into()), Some("/home/u/.cache".into())).unwrap();
        assert_eq!(p, PathBuf::from("/home/u/.cache"));
        assert!(cache_dir_from(Some("rel".into()), None).is_none());
        assert!(cache_dir_from(None, None).is_none());
        assert_eq!(
            profile_path_in(Path::new("/c"), "T4"),
            PathBuf::from("/c/strata/profiles/t4.toml")
        );
    }
}
