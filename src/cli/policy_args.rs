//! The policy flags `strata bench`, `strata generate` and `strata policy --evaluate` share: add them to a
//! command with `#[command(flatten)] policy: PolicyArgs` and turn them into a [`Policy`] with
//! [`PolicyArgs::to_policy`]. They read what [`Policy::to_flags`] prints.
//!
//! Flags that shape the policy (batch sizes, percents, ...) are `Option`s so a command can tell whether they were
//! given; unset ones take FlexLLMGen's defaults.

use std::path::PathBuf;

use clap::ArgAction;

use super::headings;
use strata_runtime::offload::policy::{
    parse_bytes, CompressionConfig, Percent, Policy, PolicyError, Transfer,
};

/// Reads a byte size (`16GiB`, `200GB`, `1.5TiB`, `512MiB`, plain bytes) for clap.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// How the policy is chosen.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    /// Profile the machine and solve the cost model for the fastest policy that fits.
    Auto,
}

/// The offloading policy as command-line flags (FlexLLMGen's names, plus memory caps).
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct PolicyArgs {
    /// `auto`: measure this machine (once; the profile is cached per adapter) and let the cost model choose batch
    /// sizes and placement within the memory caps. Placement flags cannot be combined with it.
    #[arg(long = "policy", value_enum, value_name = "MODE", help_heading = headings::POLICY)]
    pub mode: Option<PolicyMode>,
    /// Sequences the GPU computes at once [default: 4].
    #[arg(long, value_name = "N", help_heading = headings::POLICY)]
    pub gpu_batch_size: Option<usize>,
    /// GPU batches sharing one load of each layer's weights [default: 1].
    #[arg(long, value_name = "N", help_heading = headings::POLICY)]
    pub num_gpu_batches: Option<usize>,
    /// Percent of weights, KV cache and activations on GPU and on CPU; disk gets the rest of each
    /// (the weight percents place the decoder layers: embeddings and LM head always stay on the GPU)
    /// [default: 100 0 100 0 100 0].
    #[arg(long, num_args = 6, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"], help_heading = headings::POLICY)]
    pub percent: Option<Vec<f64>>,
    /// Overlap weight and cache loads with compute (`--overlap false` to turn off) [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL", help_heading = headings::POLICY)]
    pub overlap: Option<bool>,
    /// Place and schedule attention and MLP as separate layers [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL", help_heading = headings::POLICY)]
    pub sep_layer: Option<bool>,
    /// Keep CPU-resident weights in memory the GPU reads directly [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_name = "BOOL", help_heading = headings::POLICY)]
    pub pin_weight: Option<bool>,
    /// Run decode attention over CPU-resident cache on the CPU.
    #[arg(long, help_heading = headings::POLICY)]
    pub cpu_cache_compute: bool,
    /// How CPU-resident weights reach the decode kernels: auto (zero-copy where the device binds host buffers and
    /// the block is one GPU batch), copy (into weight slots), zero-copy (the kernels read them over PCIe).
    #[arg(long, default_value_t = Transfer::Auto, value_name = "auto|copy|zero-copy", help_heading = headings::POLICY)]
    pub transfer: Transfer,
    /// Fraction of attention positions kept, in (0, 1] [default: 1].
    #[arg(long, value_name = "FRACTION", help_heading = headings::POLICY)]
    pub attn_sparsity: Option<f64>,
    /// Most GPU memory to use (e.g. 15GiB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", help_heading = headings::MEMORY_CAPS)]
    pub gpu_mem: Option<u64>,
    /// Most CPU memory to use (e.g. 200GiB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", help_heading = headings::MEMORY_CAPS)]
    pub cpu_mem: Option<u64>,
    /// Most disk space to use in the offload directory (e.g. 1500GiB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", help_heading = headings::MEMORY_CAPS)]
    pub disk_mem: Option<u64>,
    /// Directory for disk-resident tensors (required when anything goes to disk).
    #[arg(long, value_name = "DIR", help_heading = headings::MEMORY_CAPS)]
    pub offload_dir: Option<PathBuf>,
    /// Store weights quantised (group-wise, 4 bits in groups of 64 unless set below).
    #[arg(long, help_heading = headings::COMPRESSION)]
    pub compress_weight: bool,
    /// Bits per weight value with --compress-weight: 2, 4 or 8.
    #[arg(long, default_value_t = CompressionConfig::DEFAULT.bits, value_name = "BITS", help_heading = headings::COMPRESSION)]
    pub compress_weight_bits: u8,
    /// Values per quantisation group with --compress-weight (a multiple of 32 / bits).
    #[arg(long, default_value_t = CompressionConfig::DEFAULT.group_size, value_name = "N", help_heading = headings::COMPRESSION)]
    pub compress_weight_group_size: usize,
    /// Store the KV cache quantised (group-wise along head_dim, 4 bits in groups of 64 unless set below).
    #[arg(long, help_heading = headings::COMPRESSION)]
    pub compress_cache: bool,
    /// Bits per cache value with --compress-cache: 2, 4 or 8.
    #[arg(long, default_value_t = CompressionConfig::DEFAULT.bits, value_name = "BITS", help_heading = headings::COMPRESSION)]
    pub compress_cache_bits: u8,
    /// Values per quantisation group with --compress-cache (a multiple of 32 / bits).
    #[arg(long, default_value_t = CompressionConfig::DEFAULT.group_size, value_name = "N", help_heading = headings::COMPRESSION)]
    pub compress_cache_group_size: usize,
}

impl PolicyArgs {
    /// The flags that set placement or batching (not caps, compression or the directory), when given; a command
    /// that ignores them can refuse them by name.
    pub fn placement_flags_given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let flags: [(&'static str, bool); 8] = [
            ("--gpu-batch-size", self.gpu_batch_size.is_some()),
            ("--num-gpu-batches", self.num_gpu_batches.is_some()),
            ("--percent", self.percent.is_some()),
            ("--overlap", self.overlap.is_some()),
            ("--sep-layer", self.sep_layer.is_some()),
            ("--pin-weight", self.pin_weight.is_some()),
            ("--cpu-cache-compute", self.cpu_cache_compute),
            ("--attn-sparsity", self.attn_sparsity.is_some()),
        ];
        for (flag, set) in flags {
            if set {
                given.push(flag);
            }
        }
        given
    }

    /// Whether `--policy auto` was given.
    pub fn is_auto(&self) -> bool {
        self.mode == Some(PolicyMode::Auto)
    }

    /// The policy these flags describe, validated (including the offload directory rule).
    pub fn to_policy(&self) -> Result<Policy, PolicyError> {
        let d = Policy::default();
        let percent = match &self.percent {
            // clap enforces six values.
            Some(p) if p.len() == 6 => Percent::from_array([p[0], p[1], p[2], p[3], p[4], p[5]]),
            _ => d.percent,
        };
        let policy = Policy {
            gpu_batch_size: self.gpu_batch_size.unwrap_or(d.gpu_batch_size),
            num_gpu_batches: self.num_gpu_batches.unwrap_or(d.num_gpu_batches),
            percent,
            overlap: self.overlap.unwrap_or(d.overlap),
            sep_layer: self.sep_layer.unwrap_or(d.sep_layer),
            pin_weight: self.pin_weight.unwrap_or(d.pin_weight),
            cpu_cache_compute: self.cpu_cache_compute,
            transfer: self.transfer,
            attn_sparsity: self.attn_sparsity.unwrap_or(d.attn_sparsity),
            compress_weight: self.compress_weight,
            compress_weight_config: CompressionConfig {
                bits: self.compress_weight_bits,
                group_size: self.compress_weight_group_size,
            },
            compress_cache: self.compress_cache,
            compress_cache_config: CompressionConfig {
                bits: self.compress_cache_bits,
                group_size: self.compress_cache_group_size,
            },
            // `--dtype` belongs to bench and generate; they set it.
            weight_dtype: None,
            gpu_mem: self.gpu_mem,
            cpu_mem: self.cpu_mem,
            disk_mem: self.disk_mem,
            offload_dir: self.offload_dir.clone(),
        };
        policy.validate()?;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    fn parse(flags: &str) -> Result<Policy, String> {
        let args = std::iter::once("cmd").chain(flags.split_whitespace());
        let cmd = Cmd::try_parse_from(args).map_err(|e| e.to_string())?;
        cmd.policy.to_policy().map_err(|e| e.to_string())
    }

    #[test]
    fn printed_flags_parse_back_to_the_same_policy() {
        let policies = [
            Policy::default(),
            Policy {
                gpu_batch_size: 48,
                num_gpu_batches: 3,
                percent: Percent::from_array([20.0, 80.0, 0.0, 100.0, 0.0, 100.0]),
                cpu_cache_compute: true,
                overlap: false,
                pin_weight: false,
                attn_sparsity: 0.25,
                compress_weight: true,
                compress_cache: true,
                compress_cache_config: CompressionConfig {
                    bits: 8,
                    group_size: 32,
                },
                gpu_mem: Some(15 << 30),
                cpu_mem: Some(200_000_000_000),
                disk_mem: Some(3 << 39),
                ..Policy::default()
            },
            Policy {
                percent: Percent::from_array([0.0, 50.0, 33.33, 0.0, 0.0, 100.0]),
                sep_layer: false,
                offload_dir: Some("/mnt/nvme/strata".into()),
                ..Policy::default()
            },
        ];
        for p in policies {
            assert_eq!(parse(&p.to_flags()).unwrap(), p, "{}", p.to_flags());
        }
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let e = parse("--gpu-mem 15G").unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("--gpu-mem"), "{e}");
        let e = parse("--percent 50 60 100 0 100 0").unwrap_err();
        assert!(
            e.contains("weights: GPU 50 + CPU 60 = 110 exceeds 100"),
            "{e}"
        );
        let e = parse("--percent 50 0 100 0 100 0").unwrap_err();
        assert!(e.contains("--offload-dir"), "{e}");
        let e = parse("--percent 50 0 100").unwrap_err();
        assert!(e.contains("6 values") || e.contains("W_GPU"), "{e}");
        assert!(parse("--gpu-batch-size 0")
            .unwrap_err()
            .contains("--gpu-batch-size must be at least 1"));
        assert!(parse("--attn-sparsity 2").unwrap_err().contains("(0, 1]"));
        assert!(parse("--overlap").unwrap().overlap);
        assert!(!parse("--overlap false").unwrap().overlap);
    }

    #[test]
    fn given_placement_flags_are_listed() {
        let cmd = Cmd::try_parse_from([
            "cmd",
            "--percent",
            "1",
            "0",
            "1",
            "0",
            "1",
            "0",
            "--gpu-mem",
            "1GiB",
        ])
        .unwrap();
        assert_eq!(cmd.policy.placement_flags_given(), vec!["--percent"]);
    }
}
