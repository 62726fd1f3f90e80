//! `strata bench`: FlexLLMGen's benchmark workload (an effective batch of dummy prompts of `--prompt-len` tokens,
//! `--gen-len` tokens each, EOS ignored) under an offloading policy, reporting what FlexLLMGen reports: sizes,
//! prefill / decode / total latency and throughput, and every tier's peak bytes as the runtime's ledger recorded
//! them next to the placement's (equal: the plan is the allocation), with the tiers' own counters and, where the
//! backend gives one, wgpu's allocator report as independent witnesses.

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use strata_runtime::config::DType;
use strata_runtime::generate::{GenerateOptions, Generator, Sampling};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::offload::ledger::AllocatorCheck;
use strata_runtime::offload::placement::{DeviceLimits, Placement, Workload};
use strata_runtime::offload::policy::format_bytes;
use strata_runtime::weights::WeightSource;

use super::auto::resolve_auto;
use super::bench_predict::{Phases, Prediction};
use super::bench_transfers::{phase_json, phase_text, Ceiling};
use super::checks;
use super::headings;
use super::model_arg;
use super::policy_args::PolicyArgs;
use super::process::outln;

/// `strata bench`: the workload (`--model ...`), or `strata bench kernels`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Command {
    #[command(subcommand)]
    what: Option<What>,
    #[command(flatten)]
    workload: Args,
}

#[derive(clap::Subcommand)]
enum What {
    /// Time each kernel on fixed shapes (GEMM, opt-6.7b's linears and attention) on this GPU.
    Kernels(super::bench_kernels::Args),
    /// Throughput and latency percentiles of `strata serve` under N concurrent clients (`bench serve -- SERVE_ARGS`).
    Serve(super::bench_serve::Args),
}

/// Runs `strata bench` or `strata bench kernels`.
pub fn dispatch(command: Command) -> anyhow::Result<()> {
    match command.what {
        Some(What::Kernels(args)) => super::bench_kernels::run(args),
        Some(What::Serve(args)) => super::bench_serve::run(args),
        None => run(command.workload),
    }
}

/// Arguments of `strata bench` (the workload).
#[derive(clap::Args)]
pub struct Args {
    /// A model name such as `opt-1.3b` (or a model directory with config.json).
    #[arg(short, long, value_name = "NAME_OR_DIR", required = true, help_heading = headings::MODEL)]
    model: Option<String>,
    /// Checkpoint directory for a model given by name (default: dummy weights).
    #[arg(long, value_name = "DIR", conflicts_with = "dummy", help_heading = headings::MODEL)]
    weights: Option<PathBuf>,
    /// Use synthetic weights (the default when no checkpoint is given).
    #[arg(long, help_heading = headings::MODEL)]
    dummy: bool,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512, value_name = "N", help_heading = headings::PROMPTS)]
    prompt_len: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 32, value_name = "N", help_heading = headings::PROMPTS)]
    gen_len: usize,
    /// Store weights on the GPU as f16 or f32 (default: the checkpoint's dtype).
    #[arg(long, value_name = "f16|f32", value_parser = parse_dtype, help_heading = headings::MODEL)]
    dtype: Option<DType>,
    /// Use the first GPU adapter whose name contains this.
    #[arg(long, value_name = "NAME", help_heading = headings::MODEL)]
    adapter: Option<String>,
    /// A packed checkpoint to load the quantised weights from (needs --compress-weight, with the bits and group size
    /// it was written with), as `generate --packed-weights`: written from the model first when FILE does not exist,
    /// otherwise checked to come from the model's weights, so later runs skip quantising.
    #[arg(long, value_name = "FILE", help_heading = headings::MODEL)]
    packed_weights: Option<PathBuf>,
    /// With `--policy auto`: the most sequences one block (gpu batch size x GPU batches) may hold.
    #[arg(long, default_value_t = 64, value_name = "N", help_heading = headings::POLICY)]
    max_batch: usize,
    /// The hardware profile whose bandwidths give the PCIe-bound ceiling and whose speeds give the cost model's
    /// prediction (default: the adapter's cached one, which `strata profile` and `--policy auto` write).
    #[arg(long, value_name = "FILE")]
    pcie_profile: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// First run the same prompts for two tokens (prefill and one decode step) untimed, as FlexLLMGen's benchmark
    /// does, so the figures exclude compiling pipelines and other first-use costs.
    #[arg(long, help_heading = headings::OUTPUT)]
    warmup: bool,
    /// Print one JSON object instead of text.
    #[arg(long, help_heading = headings::OUTPUT)]
    json: bool,
    /// Run once per value, in a process each, and write PATH.csv, PATH.json and PATH.svg (throughput and latency
    /// against the batch): gpu-batch-size=1,4,16,64, num-gpu-batches=1,2,4, or percent=gpu,weights-cpu,... (presets:
    /// gpu, weights-cpu, weights-half-cpu, cache-cpu, all-cpu, weights-disk, flexllmgen-30b, flexllmgen-175b; or
    /// six percents as 20:80:0:100:0:100). Repeat for a grid.
    #[arg(long, value_name = "PARAM=V1,V2,...", help_heading = headings::OUTPUT)]
    sweep: Vec<String>,
    /// Where --sweep writes (PATH.csv, PATH.json, PATH.svg; default strata-sweep).
    #[arg(long, value_name = "PATH", requires = "sweep", help_heading = headings::OUTPUT)]
    sweep_out: Option<PathBuf>,
    #[command(flatten)]
    pipeline: super::pipeline::PipelineArgs,
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    match DType::parse(text) {
        Some(d @ (DType::F16 | DType::F32)) => Ok(d),
        _ => Err(format!("`{text}` is not a storage dtype: use f16 or f32")),
    }
}

fn open_source(args: &Args) -> anyhow::Result<Box<dyn WeightSource>> {
    let Some(model) = &args.model else {
        bail!("--model is required: the model to benchmark (e.g. --model opt-1.3b)");
    };
    model_arg::resolve(model, args.weights.as_deref(), args.dummy)?.open(args.dummy)
}

/// The benchmark's prompts: `count` deterministic sequences of `len` tokens, each starting with BOS.
fn dummy_prompts(count: usize, len: usize, vocab: usize, bos: u32) -> Vec<Vec<u32>> {
    let span = vocab.saturating_sub(4).max(1);
    (0..count)
        .map(|i| {
            std::iter::once(bos)
                .chain((1..len).map(|j| (4 + (i * 31 + j * 17) % span) as u32))
                .collect()
        })
        .collect()
}

fn bar(len: usize, what: &str) -> ProgressBar {
    // indicatif draws to stderr only when it is a terminal.
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.sweep.is_empty() {
        return super::sweep::run(
            &args.sweep,
            args.sweep_out.as_deref(),
            args.policy.is_auto(),
            args.json,
        );
    }
    if args.prompt_len == 0 || args.gen_len == 0 {
        bail!("--prompt-len and --gen-len must be at least 1");
    }
    if let Some(path) = &args.packed_weights {
        checks::output_file("--packed-weights", path)?;
        if !args.policy.compress_weight {
            bail!(
                "--packed-weights holds quantised weights: add --compress-weight (with the --compress-weight-bits \
                 and --compress-weight-group-size the file is, or is to be, packed with)"
            );
        }
    }
    if args.pipeline.pipeline {
        let setup = super::pipeline::BenchSetup {
            source: open_source(&args)?,
            prompt_len: args.prompt_len,
            gen_len: args.gen_len,
            policy: &args.policy,
            adapter: args.adapter.as_deref(),
            dtype: args.dtype,
            max_batch: args.max_batch,
            json: args.json,
            prompts: dummy_prompts,
        };
        return super::pipeline::bench(setup, &args.pipeline);
    }
    let source = open_source(&args)?;
    let config = *source.config();
    let workload = Workload {
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
    };
    let seq_len = args.prompt_len.saturating_add(args.gen_len);
    // Checked before the GPU is opened: sizes that fit their types, a plan the planner accepts.
    let explicit = if args.policy.is_auto() {
        None
    } else {
        let policy = args.policy.to_policy()?;
        checks::effective_batch(
            &config,
            policy.gpu_batch_size,
            policy.num_gpu_batches,
            seq_len,
        )?;
        // Device limits only split matrices into chunks; what fails here fails on every device.
        Placement::new(&config, &policy, workload, &DeviceLimits::UNBOUNDED)?;
        Some(policy)
    };
    checks::dead_runs(args.policy.offload_dir.as_deref());
    let gpu = Gpu::new(&GpuOptions {
        adapter: args.adapter.clone(),
        max_binding_override: None,
    })?;
    let policy = match explicit {
        Some(policy) => policy,
        None => resolve_auto(
            &gpu,
            &config,
            args.prompt_len,
            args.gen_len,
            args.max_batch,
            &args.policy,
        )?,
    };
    let policy = strata_runtime::offload::policy::Policy {
        weight_dtype: args.dtype,
        ..policy
    };
    let placement = Placement::new(&config, &policy, workload, &DeviceLimits::of(&gpu))?;
    placement.check_caps().map_err(|e| anyhow::anyhow!("{e}"))?;
    let memory = placement.plan();
    // Before any weight is read: the plan against the memory this device and host really have.
    checks::memory_fits(&gpu, memory.peak(), policy.gpu_mem)?;
    let adapter = gpu.describe();
    if !args.json {
        eprintln!("strata bench: {} on {adapter}", config.name);
    }
    let source = match &args.packed_weights {
        Some(path) => super::generate::packed_source(path, source, policy.compress_weight_config)?,
        None => source,
    };
    let loading = bar(config.num_hidden_layers, "weights");
    let generator = Generator::with_policy(&gpu, source.as_ref(), &policy, &|_| loading.inc(1))?;
    loading.finish_and_clear();
    drop(source);

    let batch = policy.effective_batch();
    // How CPU-resident weights reach the decode kernels on this device (prefill always copies them).
    let decode_transfer = if generator.decode_zero_copy(policy.num_gpu_batches) {
        "zero-copy"
    } else {
        "copy"
    };
    let weight_passes = generator.decode_weight_passes(&placement);
    let prompts = dummy_prompts(
        batch,
        args.prompt_len,
        config.vocab_size,
        config.bos_token_id,
    );
    if args.warmup {
        let warming = bar(2.min(args.gen_len), "warm-up");
        generator
            .generate_with_progress(
                &prompts,
                &GenerateOptions {
                    max_new_tokens: 2.min(args.gen_len),
                    sampling: Sampling::Greedy,
                    ignore_eos: true,
                    record_logits: false,
                },
                &|_| warming.inc(1),
            )
            .context("warming up")?;
        warming.finish_and_clear();
    }
    let generating = bar(args.gen_len, "generate");
    // After the prefill every buffer of the run is held: compare the ledger with wgpu's own allocator report then.
    let allocator: std::cell::RefCell<Option<AllocatorCheck>> = Default::default();
    // What the tiers moved, split into prefill (up to the first token) and decode.
    let moved_start = generator.tiers().moved();
    let after_prefill = std::cell::Cell::new(None);
    let output = generator
        .generate_with_progress(
            &prompts,
            &GenerateOptions {
                max_new_tokens: args.gen_len,
                sampling: Sampling::Greedy,
                ignore_eos: true,
                record_logits: false,
            },
            &|t| {
                generating.inc(1);
                if t == 0 {
                    after_prefill.set(Some(generator.tiers().moved()));
                    *allocator.borrow_mut() = gpu
                        .device
                        .generate_allocator_report()
                        .map(|r| generator.ledger().compare_allocator(&r));
                }
            },
        )
        .context("running the benchmark")?;
    generating.finish_and_clear();
    let allocator = allocator.into_inner();
    let moved_end = generator.tiers().moved();
    let after_prefill = after_prefill.get().unwrap_or(moved_end);
    let (prefill_moved, decode_moved) = (
        after_prefill.since(&moved_start),
        moved_end.since(&after_prefill),
    );

    let prefill = output.step_seconds.first().copied().unwrap_or(0.0);
    let decode: f64 = output.step_seconds.iter().skip(1).sum();
    let n = batch as f64;
    let per_sec = |tokens: f64, secs: f64| if secs > 0.0 { tokens / secs } else { 0.0 };
    let prefill_tput = per_sec(n * args.prompt_len as f64, prefill);
    let decode_tput = per_sec(n * (args.gen_len - 1) as f64, decode);
    let total_tput = per_sec(n * args.gen_len as f64, prefill + decode);
    let seq_len = (args.prompt_len + args.gen_len) as u64;
    let model_bytes = config.model_bytes();
    let cache_bytes = config.cache_bytes(batch as u64, seq_len);
    let hidden_bytes = config.hidden_bytes(batch as u64, seq_len);
    // What the packed formats really allocate (the policy was validated, so the const fns' checks hold).
    let compressed_model_bytes = policy.compress_weight.then(|| {
        let c = policy.compress_weight_config;
        config.compressed_model_bytes(c.bits.into(), c.group_size as u64)
    });
    let compressed_cache_bytes = policy.compress_cache.then(|| {
        let c = policy.compress_cache_config;
        config.compressed_cache_bytes(batch as u64, seq_len, c.bits.into(), c.group_size as u64)
    });
    let report = generator.tiers().report();
    let peak_gpu_pool = report.gpu.allocated.peak_bytes;
    // What the run held at most, as the ledger recorded each buffer where it was made: weights resident for the
    // whole run (outside the layers plus the layers' GPU share), homes, slots, working buffers, kernel staging.
    let peak = generator.ledger().peak();
    let gpu_weights = generator.model().gpu_bytes() + generator.layers().resident_bytes();
    let planned = memory.allocated();
    let profile = match &args.pcie_profile {
        Some(path) => Some(strata_runtime::hardware::HardwareProfile::load(path)?),
        None => Ceiling::profile(&gpu.info.name),
    };
    let ceiling = profile
        .as_ref()
        .and_then(|p| Ceiling::of(p, &decode_moved, args.gen_len - 1, batch));
    let measured = Phases {
        prefill_s: prefill,
        decode_s: decode,
        prefill_tok_s: prefill_tput,
        decode_tok_s: decode_tput,
        total_tok_s: total_tput,
    };
    // A policy the model cannot describe (it prices every placement the runtime runs) is reported, not fatal.
    let prediction = profile
        .as_ref()
        .map(|p| Prediction::of(&config, workload, p, &policy));
    if args.json {
        let object = serde_json::json!({
            "schema_version": super::JSON_SCHEMA_VERSION,
            "model": config.name,
            "adapter": adapter,
            "policy": policy.to_flags(),
            "prompts": batch,
            "prompt_len": args.prompt_len,
            "gen_len": args.gen_len,
            "model_bytes": model_bytes,
            "cache_bytes": cache_bytes,
            "hidden_bytes": hidden_bytes,
            "compressed_model_bytes": compressed_model_bytes,
            "compressed_cache_bytes": compressed_cache_bytes,
            "prefill_latency_s": prefill,
            "prefill_throughput_tok_s": prefill_tput,
            "decode_latency_s": decode,
            "decode_throughput_tok_s": decode_tput,
            "total_latency_s": prefill + decode,
            "total_throughput_tok_s": total_tput,
            "transfer": {
                "setting": policy.transfer.as_str(),
                "prefill": "copy",
                "decode": decode_transfer,
                "decode_weight_passes": weight_passes,
            },
            "transfers": {
                "prefill": phase_json(&prefill_moved, prefill),
                "decode": phase_json(&decode_moved, decode),
            },
            // Decode's token rate if every step took only its PCIe bytes' time at the cached profile's bandwidths.
            "pcie_ceiling": ceiling.as_ref().map(|c| serde_json::json!({
                "profile": c.profile,
                "ctog_gib_s": c.gib_s.0,
                "gtoc_gib_s": c.gib_s.1,
                "decode_tok_s": c.tok_s,
                "fraction": decode_tput / c.tok_s,
            })),
            // strata's cost model at this policy, from the same profile, beside the measured figures.
            "prediction": match &prediction {
                Some(Ok(p)) => p.json(&measured),
                Some(Err(e)) => serde_json::json!({"error": e.to_string()}),
                None => serde_json::Value::Null,
            },
            "peak_bytes": {
                "gpu": peak.gpu,
                "gpu_weights": gpu_weights,
                "gpu_pool": peak_gpu_pool,
                "cpu": peak.cpu,
                "disk": peak.disk,
            },
            "planned_peak_bytes": {"gpu": planned.gpu, "cpu": planned.cpu, "disk": planned.disk},
            // What the measured GPU figures correspond to in the plan.
            "planned_gpu_weights": memory.weights.gpu,
            "planned_gpu_pool_slots": placement.pool_bytes(),
            // Host memory transfers borrow for a moment (not a buffer of the run); the caps leave room for it.
            "planned_staging_bytes": {"cpu": memory.staging.cpu},
            // The tiers' own counters: CPU and disk homes, the GPU pool (slots and GPU homes).
            "tier_peak_bytes": {"gpu_pool": peak_gpu_pool, "cpu": report.cpu.peak_bytes, "disk": report.disk.peak_bytes},
            "allocator_report": allocator.as_ref().map(|a| serde_json::json!({
                "recorded_buffers": a.recorded_buffers,
                "matched_buffers": a.matched_buffers,
                "recorded_bytes": a.recorded_bytes,
                "matched_allocation_bytes": a.matched_allocation_bytes,
                "other_bytes": a.other.values().sum::<u64>(),
                "total_allocated_bytes": a.report_total,
                "agrees": a.agrees(),
            })),
        });
        outln!("{object}");
    } else {
        outln!("model: {}  adapter: {adapter}", config.name);
        outln!("policy: {}", policy.to_flags());
        outln!(
            "model size: {}  cache size: {}  hidden size (prefill): {}",
            format_bytes(model_bytes),
            format_bytes(cache_bytes),
            format_bytes(hidden_bytes)
        );
        if let Some(bytes) = compressed_model_bytes {
            outln!("compressed model size: {}", format_bytes(bytes));
        }
        if let Some(bytes) = compressed_cache_bytes {
            outln!("compressed cache size: {}", format_bytes(bytes));
        }
        outln!(
            "prompts: {batch} x {} tokens, generating {}",
            args.prompt_len,
            args.gen_len
        );
        outln!("prefill latency: {prefill:.3} s  prefill throughput: {prefill_tput:.3} token/s");
        outln!("decode latency: {decode:.3} s  decode throughput: {decode_tput:.3} token/s");
        outln!(
            "total latency: {:.3} s  total throughput: {total_tput:.3} token/s",
            prefill + decode
        );
        outln!(
            "transfer: --transfer {}: prefill copies CPU weights into weight slots, decode {}",
            policy.transfer,
            match (decode_transfer, weight_passes) {
                ("zero-copy", 1) if placement.batches.len() > 1 =>
                    "reads them in place over PCIe (zero-copy), each layer once over the whole block",
                ("zero-copy", 1) => "reads them in place over PCIe (zero-copy)",
                ("zero-copy", _) =>
                    "reads them in place over PCIe (zero-copy), once per GPU batch",
                _ => "copies them into weight slots",
            }
        );
        outln!("{}", phase_text("prefill", &prefill_moved, prefill));
        outln!("{}", phase_text("decode", &decode_moved, decode));
        match &ceiling {
            Some(c) => outln!(
                "PCIe-bound decode ceiling: {:.3} token/s ({:.1} GiB/s up, {:.1} GiB/s down, profile {}); measured {:.1}% of it",
                c.tok_s,
                c.gib_s.0,
                c.gib_s.1,
                c.profile,
                100.0 * decode_tput / c.tok_s
            ),
            None => outln!(
                "PCIe-bound decode ceiling: none (nothing crossed PCIe at decode, or no cached profile: `strata profile`)"
            ),
        }
        match &prediction {
            Some(Ok(p)) => outln!("{}", p.text(&measured)),
            Some(Err(e)) => outln!("predicted: the cost model cannot price this policy: {e}"),
            None => outln!("predicted: no cached hardware profile (`strata profile`)"),
        }
        outln!(
            "peak tier bytes: gpu {} (resident weights {}, pool {})  cpu {}  disk {}",
            format_bytes(peak.gpu),
            format_bytes(gpu_weights),
            format_bytes(peak_gpu_pool),
            format_bytes(peak.cpu),
            format_bytes(peak.disk)
        );
        outln!(
            "planned peak bytes: gpu {}  cpu {}  disk {}",
            format_bytes(planned.gpu),
            format_bytes(planned.cpu),
            format_bytes(planned.disk)
        );
        if let Some(a) = &allocator {
            println!(
                "wgpu allocator report: {} of {} recorded GPU buffers found, {} allocated for their {}",
                a.matched_buffers,
                a.recorded_buffers,
                format_bytes(a.matched_allocation_bytes),
                format_bytes(a.recorded_bytes)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_prompts_have_the_requested_shape_and_valid_ids() {
        let p = dummy_prompts(3, 5, 50, 2);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|s| s.len() == 5 && s[0] == 2));
        assert!(p.iter().flatten().all(|&id| (id as usize) < 50));
    }
}
