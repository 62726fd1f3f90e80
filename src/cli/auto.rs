//! `--policy auto` for `strata bench` and `strata generate`: [`resolve_auto`] turns the shared policy flags (caps,
//! compression, offload directory) into the policy the cost model chooses for this GPU, from the adapter's cached
//! profile (measured with a progress bar the first time).

use anyhow::{bail, Context};
use strata_runtime::config::OptConfig;
use strata_runtime::cost_model::auto::{auto_policy, AutoChoice, AutoOptions, ProfileSource};
use strata_runtime::gpu::Gpu;
use strata_runtime::hardware::measure::{step_count, MeasureOptions};
use strata_runtime::offload::placement::{Caps, Workload};
use strata_runtime::offload::policy::{format_bytes, CompressionConfig, Policy};

use super::policy_args::PolicyArgs;
use super::profile::step_progress;

/// The policy `--policy auto` runs: caps, compression and the offload directory come from `flags` (open caps are
/// filled from the machine), batch sizes and placement from the cost model's search for `config` generating
/// `gen_len` tokens after `prompt_len`-token prompts, with at most `max_batch` sequences per block (the prompts the
/// run has). Placement flags are refused: auto chooses them; `--attn-sparsity` is kept. Prints the choice and its prediction to stderr.
pub fn resolve_auto(
    gpu: &Gpu,
    config: &OptConfig,
    prompt_len: usize,
    gen_len: usize,
    max_batch: usize,
    flags: &PolicyArgs,
) -> anyhow::Result<Policy> {
    // Attention sparsity is the user's accuracy trade-off, not a placement: auto keeps it (and predicts as if
    // attention were dense).
    let given: Vec<&str> = flags
        .placement_flags_given()
        .into_iter()
        .filter(|&f| f != "--attn-sparsity")
        .collect();
    if !given.is_empty() {
        bail!(
            "{} cannot be combined with --policy auto, which chooses them (drop them, or drop --policy auto)",
            given.join(", ")
        );
    }
    if max_batch == 0 {
        bail!("--policy auto needs at least one prompt");
    }
    let options = AutoOptions {
        offload_dir: flags.offload_dir.clone(),
        max_block: max_batch,
        compress_weight: flags.compress_weight.then_some(CompressionConfig {
            bits: flags.compress_weight_bits,
            group_size: flags.compress_weight_group_size,
        }),
        compress_cache: flags.compress_cache.then_some(CompressionConfig {
            bits: flags.compress_cache_bits,
            group_size: flags.compress_cache_group_size,
        }),
        transfer: flags.transfer,
        ..AutoOptions::default()
    };
    let caps = Caps {
        gpu: flags.gpu_mem,
        cpu: flags.cpu_mem,
        disk: flags.disk_mem,
    };
    let workload = Workload {
        prompt_len,
        gen_len,
    };

    // The bar only shows while a profile is being measured (the first run on this adapter).
    let mut measure = MeasureOptions::new(".");
    measure.skip_disk = options.offload_dir.is_none();
    let (bar, mut progress) = step_progress(
        step_count(&measure, true),
        "profiling this machine {bar:30} {pos}/{len} {msg}",
        "",
    );
    let result = auto_policy(gpu, config, workload, caps, &options, &mut progress);
    bar.finish_and_clear();
    let choice = result.context("--policy auto")?;
    eprintln!("{}", describe(config, &choice));
    let mut policy = choice.policy;
    if let Some(sparsity) = flags.attn_sparsity {
        policy.attn_sparsity = sparsity;
    }
    policy.transfer = flags.transfer;
    Ok(policy)
}

/// What auto chose and why, in a few lines.
pub fn describe(config: &OptConfig, c: &AutoChoice) -> String {
    let profile = match &c.source {
        ProfileSource::Cached(p) => format!("profile {}", p.display()),
        ProfileSource::Measured(p) => format!("profile measured now, saved to {}", p.display()),
    };
    let cap = |b: Option<u64>| b.map_or("unlimited".to_string(), format_bytes);
    format!(
        "--policy auto for {} ({profile}; caps GPU {}, CPU {}, disk {}):\n  {}\n  predicted: prefill {:.2} token/s, \
         decode {:.2} token/s, total {:.3} token/s",
        config.name,
        cap(c.caps.gpu),
        cap(c.caps.cpu),
        cap(c.caps.disk),
        c.policy.to_flags(),
        c.prediction.prefill_throughput,
        c.prediction.decode_throughput,
        c.prediction.total_throughput
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_flags_are_refused() {
        let config = strata::get_opt_config("opt-125m").unwrap();
        let flags = PolicyArgs {
            gpu_batch_size: Some(8),
            percent: Some(vec![100.0, 0.0, 100.0, 0.0, 100.0, 0.0]),
            ..PolicyArgs::default()
        };
        // Refused before any GPU work or profile lookup.
        let gpu = Gpu::new(&Default::default()).expect("tests need a GPU adapter (lavapipe works)");
        let e = resolve_auto(&gpu, &config, 16, 4, 4, &flags)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--gpu-batch-size, --percent cannot be combined with --policy auto"),
            "{e}"
        );
    }
}
