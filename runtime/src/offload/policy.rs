//! The offloading policy: how big the batches are, which tier holds what share of the weights, KV cache and
//! activations, how tensors are stored (compression, weight dtype) and which optimisations run.
//!
//! [`Policy`] has FlexLLMGen's fields plus memory caps per tier and the weight dtype: every setting of a run but
//! the generation options (sampling, lengths; [`crate::generate::GenerateOptions`]). It carries no command-line
//! parsing (the `strata` binary's `PolicyArgs` builds one), but [`Policy::to_flags`] prints it as the flags
//! `strata bench` takes, so a policy chosen by `strata policy` can be pasted into a benchmark run.

use std::fmt;
use std::path::PathBuf;

pub use crate::compress::CompressionConfig;
use crate::config::DType;

/// How a policy splits one kind of tensor (weights, KV cache or activations) between the tiers, in percent.
/// Disk gets `100 - gpu - cpu`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierSplit {
    /// Percent on the GPU.
    pub gpu: f64,
    /// Percent in CPU memory.
    pub cpu: f64,
}

impl TierSplit {
    /// Everything on the GPU.
    pub const ALL_GPU: TierSplit = TierSplit {
        gpu: 100.0,
        cpu: 0.0,
    };

    /// Percent on disk (the rest). What floating point leaves of a whole split is none: 100 - 21.04 - 78.96 is
    /// 1.4e-14, not a disk share.
    pub fn disk(&self) -> f64 {
        let rest = 100.0 - self.gpu - self.cpu;
        if rest < 1e-9 {
            0.0
        } else {
            rest
        }
    }
}

/// The six `--percent` numbers: weights, KV cache and activations, each on GPU and on CPU (disk gets the rest).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent {
    /// Weights.
    pub weights: TierSplit,
    /// KV cache.
    pub cache: TierSplit,
    /// Activations (hidden states between layers).
    pub act: TierSplit,
}

impl Percent {
    /// Everything on the GPU (`--percent 100 0 100 0 100 0`).
    pub const ALL_GPU: Percent = Percent {
        weights: TierSplit::ALL_GPU,
        cache: TierSplit::ALL_GPU,
        act: TierSplit::ALL_GPU,
    };

    /// Builds the split from FlexLLMGen's order: `w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu`.
    pub const fn from_array(p: [f64; 6]) -> Percent {
        Percent {
            weights: TierSplit {
                gpu: p[0],
                cpu: p[1],
            },
            cache: TierSplit {
                gpu: p[2],
                cpu: p[3],
            },
            act: TierSplit {
                gpu: p[4],
                cpu: p[5],
            },
        }
    }

    /// The six numbers in FlexLLMGen's order.
    pub const fn to_array(&self) -> [f64; 6] {
        [
            self.weights.gpu,
            self.weights.cpu,
            self.cache.gpu,
            self.cache.cpu,
            self.act.gpu,
            self.act.cpu,
        ]
    }

    /// Whether any kind of tensor has a share on disk.
    pub fn uses_disk(&self) -> bool {
        [self.weights, self.cache, self.act]
            .iter()
            .any(|s| s.disk() > 0.0)
    }
}

/// How offloaded weights in CPU memory reach the decode kernels (prefill, compute-bound and re-reading weight tiles,
/// always copies them into weight slots; disk-resident weights are always copied).
///
/// wgpu has one queue and its barriers are stage-wide, so a copy recorded beside compute does not run beside it. With
/// zero-copy the decode linears bind the CPU tier's host buffers (the DMA path: `MAP_READ | COPY_SRC | COPY_DST |
/// STORAGE`, host memory) and read the weights over PCIe while they compute: a memory-bound decode linear then runs
/// at PCIe speed with its compute hidden. With several GPU batches whose caches and hidden rows all stay on the GPU,
/// each decode layer runs once over the whole block ([`super::placement::block_decode`]), so each weight byte still
/// crosses once per step; otherwise each GPU batch's dispatch reads the weights again, `num_gpu_batches` times per
/// step where the copy path moves them once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transfer {
    /// Zero-copy at decode where the device has the DMA path and the block is one GPU batch (each weight byte then
    /// crosses PCIe once per step); copy otherwise. Under `--policy auto` the cost model instead prices each path
    /// (block decode included) at the hardware profile's measured rates and names the fastest in the policy.
    #[default]
    Auto,
    /// Copy each layer's offloaded weights into a weight slot before it computes.
    Copy,
    /// Zero-copy at decode wherever the device has the DMA path, whatever the number of GPU batches (over the whole
    /// block at once where the placement allows).
    ZeroCopy,
}

impl Transfer {
    /// The flag's spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transfer::Auto => "auto",
            Transfer::Copy => "copy",
            Transfer::ZeroCopy => "zero-copy",
        }
    }

    /// Whether decode steps read CPU-resident weights in place: `dma` says the CPU tier's tensors are host buffers
    /// the kernels can bind.
    pub const fn decode_zero_copy(self, dma: bool, num_gpu_batches: usize) -> bool {
        match self {
            Transfer::Auto => dma && num_gpu_batches == 1,
            Transfer::Copy => false,
            Transfer::ZeroCopy => dma,
        }
    }
}

impl fmt::Display for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Transfer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Transfer::Auto),
            "copy" => Ok(Transfer::Copy),
            "zero-copy" => Ok(Transfer::ZeroCopy),
            other => Err(format!("{other:?}: expected auto, copy or zero-copy")),
        }
    }
}

/// An offloading policy: FlexLLMGen's fields plus per-tier memory caps and the offload directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Sequences the GPU computes at once.
    pub gpu_batch_size: usize,
    /// GPU batches that share one load of a layer's weights; effective batch = `gpu_batch_size * num_gpu_batches`.
    pub num_gpu_batches: usize,
    /// Where each kind of tensor lives.
    pub percent: Percent,
    /// Load the next layer's weights and the next batch's cache while the current one computes.
    pub overlap: bool,
    /// Treat attention and MLP as separate layers for placement and scheduling.
    pub sep_layer: bool,
    /// Keep CPU-resident weights in memory the GPU reads directly (pinned / mappable).
    pub pin_weight: bool,
    /// Run decode attention on the CPU over a CPU-resident cache instead of moving the cache to the GPU.
    pub cpu_cache_compute: bool,
    /// How CPU-resident weights reach the decode kernels.
    pub transfer: Transfer,
    /// Fraction of attention positions kept (top-k by weight); 1.0 keeps all.
    pub attn_sparsity: f64,
    /// Store weights quantised.
    pub compress_weight: bool,
    /// Quantisation of weights, when `compress_weight`.
    pub compress_weight_config: CompressionConfig,
    /// Store the KV cache quantised.
    pub compress_cache: bool,
    /// Quantisation of the KV cache, when `compress_cache`.
    pub compress_cache_config: CompressionConfig,
    /// Store weight matrices as this dtype (f16 or f32) instead of the checkpoint's (`--dtype`; `None`: the
    /// checkpoint's, bf16 as f32). Vectors stay f32; packed weights ignore it.
    pub weight_dtype: Option<DType>,
    /// Most GPU memory the run may use, if capped.
    pub gpu_mem: Option<u64>,
    /// Most CPU memory the run may use, if capped.
    pub cpu_mem: Option<u64>,
    /// Most disk space the run may use, if capped.
    pub disk_mem: Option<u64>,
    /// Directory for disk-resident tensors; required when any share is on disk.
    pub offload_dir: Option<PathBuf>,
}

impl Default for Policy {
    /// FlexLLMGen's defaults: everything on the GPU, batch 4 x 1, overlap, separate layers, pinned weights.
    fn default() -> Self {
        Policy {
            gpu_batch_size: 4,
            num_gpu_batches: 1,
            percent: Percent::ALL_GPU,
            overlap: true,
            sep_layer: true,
            pin_weight: true,
            cpu_cache_compute: false,
            transfer: Transfer::Auto,
            attn_sparsity: 1.0,
            compress_weight: false,
            compress_weight_config: CompressionConfig::DEFAULT,
            compress_cache: false,
            compress_cache_config: CompressionConfig::DEFAULT,
            weight_dtype: None,
            gpu_mem: None,
            cpu_mem: None,
            disk_mem: None,
            offload_dir: None,
        }
    }
}

/// A policy that cannot run, with what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A batch size of zero.
    #[error("{flag} must be at least 1")]
    ZeroBatch {
        /// The flag concerned.
        flag: &'static str,
    },
    /// A percent that is negative, not a number, or a GPU + CPU share above 100.
    #[error("--percent: {what}: {reason}")]
    Percent {
        /// Which tensor kind (`weights`, `cache`, `activations`).
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// attn_sparsity outside (0, 1].
    #[error("--attn-sparsity must be in (0, 1] (1 keeps every position), found {0}")]
    AttnSparsity(f64),
    /// A compression setting strata cannot store.
    #[error("{flag}: {reason}")]
    Compression {
        /// The flag concerned.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Weights stored as bfloat16, which the kernels cannot read.
    #[error("unsupported model: bfloat16 storage: choose f16 or f32")]
    WeightDtype,
    /// Something goes to disk but no directory was given.
    #[error("--percent puts {0} on disk (GPU + CPU share below 100) but no --offload-dir was given: name a directory on a fast disk, or raise the GPU/CPU shares to 100")]
    NoOffloadDir(String),
}

impl Policy {
    /// Sequences processed per pass over the layers: `gpu_batch_size * num_gpu_batches`.
    pub fn effective_batch(&self) -> usize {
        self.gpu_batch_size * self.num_gpu_batches
    }

    /// Checks every field, returning the first problem with the flag to change.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.validate_placement()?;
        if self.offload_dir.is_none() {
            let on_disk: Vec<&str> = [
                ("weights", self.percent.weights),
                ("cache", self.percent.cache),
                ("activations", self.percent.act),
            ]
            .iter()
            .filter(|(_, s)| s.disk() > 1e-6)
            .map(|(what, _)| *what)
            .collect();
            if !on_disk.is_empty() {
                return Err(PolicyError::NoOffloadDir(on_disk.join(", ")));
            }
        }
        Ok(())
    }

    /// Checks everything but the offload directory: what planning memory needs (a cost model plans policies
    /// before any directory is chosen).
    pub fn validate_placement(&self) -> Result<(), PolicyError> {
        if self.gpu_batch_size == 0 {
            return Err(PolicyError::ZeroBatch {
                flag: "--gpu-batch-size",
            });
        }
        if self.num_gpu_batches == 0 {
            return Err(PolicyError::ZeroBatch {
                flag: "--num-gpu-batches",
            });
        }
        let kinds = [
            ("weights", self.percent.weights),
            ("cache", self.percent.cache),
            ("activations", self.percent.act),
        ];
        for (what, split) in kinds {
            for (tier, v) in [("GPU", split.gpu), ("CPU", split.cpu)] {
                if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                    return Err(PolicyError::Percent {
                        what,
                        reason: format!("{tier} share {v} is not between 0 and 100"),
                    });
                }
            }
            // A little slack for percents printed with a few decimals (33.33 + 66.67).
            if split.gpu + split.cpu > 100.0 + 1e-6 {
                return Err(PolicyError::Percent {
                    what,
                    reason: format!(
                        "GPU {} + CPU {} = {} exceeds 100 (disk gets 100 minus both)",
                        split.gpu,
                        split.cpu,
                        split.gpu + split.cpu
                    ),
                });
            }
        }
        if !(self.attn_sparsity > 0.0 && self.attn_sparsity <= 1.0) {
            return Err(PolicyError::AttnSparsity(self.attn_sparsity));
        }
        if self.weight_dtype == Some(DType::BF16) {
            return Err(PolicyError::WeightDtype);
        }
        for (on, flag, c) in [
            (
                self.compress_weight,
                "--compress-weight",
                self.compress_weight_config,
            ),
            (
                self.compress_cache,
                "--compress-cache",
                self.compress_cache_config,
            ),
        ] {
            if !on {
                continue;
            }
            c.validate().map_err(|e| PolicyError::Compression {
                flag,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// The policy as the flags `strata bench` (and `strata generate`) accept. Flags at their default are left out,
    /// except the batch sizes and `--percent`, which are always printed.
    pub fn to_flags(&self) -> String {
        let d = Policy::default();
        let mut f = vec![
            format!("--gpu-batch-size {}", self.gpu_batch_size),
            format!("--num-gpu-batches {}", self.num_gpu_batches),
            format!(
                "--percent {}",
                self.percent
                    .to_array()
                    .iter()
                    .map(|p| format_percent(*p))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ];
        for (name, value, default) in [
            ("--overlap", self.overlap, d.overlap),
            ("--sep-layer", self.sep_layer, d.sep_layer),
            ("--pin-weight", self.pin_weight, d.pin_weight),
        ] {
            if value != default {
                f.push(format!("{name} {value}"));
            }
        }
        if self.cpu_cache_compute {
            f.push("--cpu-cache-compute".into());
        }
        if self.transfer != d.transfer {
            f.push(format!("--transfer {}", self.transfer));
        }
        if self.attn_sparsity != 1.0 {
            f.push(format!("--attn-sparsity {}", self.attn_sparsity));
        }
        if let Some(dtype) = self.weight_dtype {
            f.push(format!("--dtype {dtype}"));
        }
        for (on, name, c) in [
            (self.compress_weight, "weight", self.compress_weight_config),
            (self.compress_cache, "cache", self.compress_cache_config),
        ] {
            if !on {
                continue;
            }
            f.push(format!("--compress-{name}"));
            if c.bits != CompressionConfig::DEFAULT.bits {
                f.push(format!("--compress-{name}-bits {}", c.bits));
            }
            if c.group_size != CompressionConfig::DEFAULT.group_size {
                f.push(format!("--compress-{name}-group-size {}", c.group_size));
            }
        }
        for (name, cap) in [
            ("--gpu-mem", self.gpu_mem),
            ("--cpu-mem", self.cpu_mem),
            ("--disk-mem", self.disk_mem),
        ] {
            if let Some(bytes) = cap {
                f.push(format!("{name} {}", format_bytes_exact(bytes)));
            }
        }
        if let Some(dir) = &self.offload_dir {
            f.push(format!(
                "--offload-dir {}",
                shell_quote(&dir.to_string_lossy())
            ));
        }
        f.join(" ")
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_flags())
    }
}

/// A percent with at most two decimals and no trailing zeros (`20`, `33.33`).
fn format_percent(p: f64) -> String {
    let s = format!("{:.2}", p);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// Quotes a word for a POSIX shell when it holds anything but safe characters.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A byte size that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read `{input}` as a size: {reason} (write e.g. 16GiB, 200GB, 1.5TiB, 512MiB or a plain number of bytes)")]
pub struct ByteSizeError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses a byte size: a number (decimals allowed) and an optional unit, case-insensitive, spaces allowed between.
/// Binary units KiB, MiB, GiB, TiB are powers of 1024; decimal KB, MB, GB, TB powers of 1000; `B` or no unit is
/// bytes. A bare `K`/`M`/`G`/`T` is refused as ambiguous.
///
/// Hand-written on purpose: `byte-unit` (which formats sizes here) and `bytesize` read a bare `G` as GB, round a
/// fraction up or through f64, and take `1.5` bytes; a memory cap must be exactly what was written.
pub fn parse_bytes(input: &str) -> Result<u64, ByteSizeError> {
    let err = |reason: &str| ByteSizeError {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(err("it does not start with a number"));
    }
    let multiplier: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "m" | "g" | "t" => {
            return Err(err(&format!(
                "unit `{}` is ambiguous: write {}iB (powers of 1024) or {}B (powers of 1000)",
                unit.trim(),
                unit.trim().to_ascii_uppercase(),
                unit.trim().to_ascii_uppercase()
            )))
        }
        other => return Err(err(&format!("unknown unit `{other}`"))),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
        return Err(err(&format!("`{number}` is not a number")));
    }
    if multiplier == 1 && !fraction.is_empty() {
        return Err(err("a number of bytes must be whole"));
    }
    // Exact integer arithmetic (f64 would round sizes past 2^53): whole * multiplier, plus the fraction's share of
    // the multiplier rounded half up. 24 fraction digits keep numerator * multiplier inside u128.
    if fraction.len() > 24 {
        return Err(err("it has more than 24 decimal places"));
    }
    let too_large = || err("it is too large");
    let mut bytes: u128 = 0;
    for digit in whole.bytes() {
        bytes = bytes
            .checked_mul(10)
            .and_then(|b| b.checked_add(u128::from(digit - b'0')))
            .filter(|&b| b <= u128::from(u64::MAX))
            .ok_or_else(too_large)?;
    }
    bytes = bytes.checked_mul(multiplier).ok_or_else(too_large)?;
    if !fraction.is_empty() {
        let numerator: u128 = fraction
            .bytes()
            .fold(0, |n, digit| n * 10 + u128::from(digit - b'0'));
        let denominator = 10u128.pow(fraction.len() as u32);
        bytes += (numerator * multiplier + denominator / 2) / denominator;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// A size for people in the largest binary unit it reaches: `15.00 GiB`, `512.00 MiB`, `1.50 TiB`, `100 B`.
pub fn format_bytes(bytes: u64) -> String {
    let adjusted =
        byte_unit::Byte::from_u64(bytes).get_appropriate_unit(byte_unit::UnitType::Binary);
    format!("{adjusted:.2}")
}

/// A size that [`parse_bytes`] reads back to exactly `bytes`: the largest binary unit that divides it, else bytes.
pub fn format_bytes_exact(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_split_in_floating_point_leaves_nothing_on_disk() {
        let p = Percent::from_array([21.04, 78.96, 100.0, 0.0, 30.0, 70.0]);
        assert!(!p.uses_disk());
        assert_eq!(p.weights.disk(), 0.0);
        let q = Percent::from_array([21.04, 78.0, 100.0, 0.0, 100.0, 0.0]);
        assert!((q.weights.disk() - 0.96).abs() < 1e-9 && q.uses_disk());
    }

    #[test]
    fn byte_sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_bytes("200GB").unwrap(), 200_000_000_000);
        assert_eq!(parse_bytes("1.5TiB").unwrap(), 3 << 39);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("512 mib").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("123456").unwrap(), 123_456);
        assert_eq!(parse_bytes(" 7b ").unwrap(), 7);
    }

    #[test]
    fn bad_byte_sizes_say_what_is_wrong() {
        let e = parse_bytes("16G").unwrap_err();
        assert!(e.reason.contains("ambiguous"), "{e}");
        assert!(e.to_string().contains("GiB"), "{e}");
        assert!(parse_bytes("GiB").unwrap_err().reason.contains("number"));
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .reason
            .contains("unknown unit `parsecs`"));
        assert!(parse_bytes("1.2.3GiB")
            .unwrap_err()
            .reason
            .contains("not a number"));
        assert!(parse_bytes("1.5").unwrap_err().reason.contains("whole"));
        assert!(parse_bytes("99999999999TiB")
            .unwrap_err()
            .reason
            .contains("too large"));
        assert!(parse_bytes("18446744073709551616")
            .unwrap_err()
            .reason
            .contains("too large"));
        assert!(parse_bytes(".")
            .unwrap_err()
            .reason
            .contains("not a number"));
    }

    #[test]
    fn byte_sizes_are_exact_past_two_to_the_53() {
        // f64 has a 53-bit mantissa: each of these would round to a neighbour.
        assert_eq!(parse_bytes("9007199254740993").unwrap(), (1 << 53) + 1);
        assert_eq!(parse_bytes("18446744073709551615").unwrap(), u64::MAX);
        assert_eq!(parse_bytes("8388608.0000000000001TiB").unwrap(), 1 << 63);
        assert_eq!(
            parse_bytes("16777215TiB").unwrap(),
            u64::MAX - (1 << 40) + 1
        );
        assert_eq!(
            parse_bytes("4503599627370495.5KiB").unwrap(),
            (1 << 62) - 512
        );
        assert_eq!(parse_bytes("0.5KiB").unwrap(), 512);
        assert_eq!(parse_bytes(".5KiB").unwrap(), 512);
        assert_eq!(parse_bytes("1.0005KB").unwrap(), 1001);
        assert_eq!(parse_bytes("2.1GB").unwrap(), 2_100_000_000);
        assert!(parse_bytes("16777216TiB")
            .unwrap_err()
            .reason
            .contains("too large"));
    }

    #[test]
    fn exact_format_round_trips() {
        for b in [
            0,
            1,
            1000,
            1 << 10,
            3 << 39,
            (15 << 30) + 1,
            200_000_000_000,
        ] {
            assert_eq!(parse_bytes(&format_bytes_exact(b)).unwrap(), b);
        }
        assert_eq!(format_bytes(15 << 30), "15.00 GiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(3 << 39), "1.50 TiB");
        assert_eq!(format_bytes(5 << 50), "5.00 PiB");
    }

    #[test]
    fn validation_catches_each_bad_field() {
        let ok = Policy::default();
        assert!(ok.validate().is_ok());
        let bad = |p: Policy| p.validate().unwrap_err().to_string();
        assert!(bad(Policy {
            gpu_batch_size: 0,
            ..ok.clone()
        })
        .contains("--gpu-batch-size"));
        assert!(bad(Policy {
            num_gpu_batches: 0,
            ..ok.clone()
        })
        .contains("--num-gpu-batches"));
        let over = Policy {
            percent: Percent::from_array([60.0, 50.0, 100.0, 0.0, 100.0, 0.0]),
            ..ok.clone()
        };
        assert!(bad(over).contains("weights: GPU 60 + CPU 50 = 110 exceeds 100"));
        let negative = Policy {
            percent: Percent::from_array([100.0, 0.0, 100.0, 0.0, -1.0, 0.0]),
            ..ok.clone()
        };
        assert!(bad(negative).contains("activations"));
        for s in [0.0, 1.5, f64::NAN] {
            assert!(bad(Policy {
                attn_sparsity: s,
                ..ok.clone()
            })
            .contains("--attn-sparsity"));
        }
        let disk = Policy {
            percent: Percent::from_array([20.0, 30.0, 100.0, 0.0, 100.0, 0.0]),
            ..ok.clone()
        };
        assert!(bad(disk.clone()).contains("puts weights on disk"));
        assert!(Policy {
            offload_dir: Some("/tmp/x".into()),
            ..disk
        }
        .validate()
        .is_ok());
        let bits = Policy {
            compress_weight: true,
            compress_weight_config: CompressionConfig {
                bits: 9,
                group_size: 64,
            },
            ..ok
        };
        let e = bad(bits);
        assert!(
            e.contains("--compress-weight") && e.contains("bits = 9"),
            "{e}"
        );
    }

    #[test]
    fn flags_print_only_what_differs_from_the_defaults() {
        let p = Policy {
            gpu_batch_size: 48,
            num_gpu_batches: 3,
            percent: Percent::from_array([20.0, 80.0, 0.0, 100.0, 0.0, 100.0]),
            cpu_cache_compute: true,
            pin_weight: false,
            compress_weight: true,
            gpu_mem: Some(15 << 30),
            offload_dir: Some("/mnt/my ssd".into()),
            ..Policy::default()
        };
        assert_eq!(
            p.to_flags(),
            "--gpu-batch-size 48 --num-gpu-batches 3 --percent 20 80 0 100 0 100 --pin-weight false \
             --cpu-cache-compute --compress-weight --gpu-mem 15GiB --offload-dir '/mnt/my ssd'"
        );
        assert_eq!(format_percent(33.3333), "33.33");
        assert_eq!(format_percent(12.5), "12.5");
    }
}
