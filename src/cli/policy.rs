//! `strata policy`: choose the fastest offloading policy for a model, workload and memory budget (or, with
//! `--evaluate`, predict a given policy), and print it as the flags `strata bench` takes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;
use strata::config::OptConfig;
use strata::cost_model::{self, Choice, CostModelKind, Problem, SearchKind, DEFAULT_MAX_BLOCK};
use strata::hardware::HardwareProfile;
use strata::offload::placement::{outside_layer_bytes, Caps, TierBytes, Workload};
use strata::offload::policy::format_bytes;
use strata::offload::Tier;

use super::policy_args::PolicyArgs;
use super::process::outln;

/// Arguments of `strata policy`.
#[derive(clap::Args)]
pub struct Args {
    /// Model name (opt-125m ... opt-175b, galactica-30b; an organisation prefix like facebook/ is dropped).
    #[arg(long)]
    pub model: String,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    /// Hardware profile: a built-in name (t4) or a TOML file written by `strata profile`.
    #[arg(long, default_value = "t4", value_name = "t4|FILE")]
    pub hardware: String,
    /// Which runtime the cost model describes.
    #[arg(long, default_value = "strata", value_name = "strata|flexllmgen")]
    pub cost_model: String,
    /// Search FlexLLMGen's way exactly instead of strata's wider search.
    #[arg(long)]
    pub exact_search: bool,
    /// Fraction of each memory cap the plan may use.
    #[arg(long, default_value_t = 0.8)]
    pub headroom: f64,
    /// Most sequences per block (gpu batch size x number of GPU batches): the prompts you have.
    #[arg(long, default_value_t = DEFAULT_MAX_BLOCK, value_name = "N")]
    pub max_batch: usize,
    /// Predict the policy given by the flags instead of searching.
    #[arg(long)]
    pub evaluate: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also draw the placement (bytes per tier) and the predicted time split as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Caps, compression, offload directory, and (with --evaluate) the policy itself.
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// The architecture for a spec name (organisation prefix, case and `-iml(-max)` variants resolved).
pub fn resolve_model(name: &str) -> anyhow::Result<OptConfig> {
    Ok(strata::get_opt_config(name)?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = resolve_model(&args.model)?;
    let hardware = HardwareProfile::resolve(&args.hardware)?;
    let kind = CostModelKind::parse(&args.cost_model).with_context(|| {
        format!(
            "--cost-model `{}`: use strata or flexllmgen",
            args.cost_model
        )
    })?;
    let pa = &args.policy;
    if pa.is_auto() {
        bail!(
            "`strata policy` always searches for the best policy: drop --policy auto (it is for bench and generate)"
        );
    }
    if !args.evaluate {
        let given = pa.placement_flags_given();
        if !given.is_empty() {
            bail!(
                "{} only apply with --evaluate (without it, strata policy chooses them)",
                given.join(", ")
            );
        }
    }
    let caps = Caps {
        gpu: pa.gpu_mem,
        cpu: pa.cpu_mem,
        disk: pa.disk_mem,
    };
    if caps.gpu.is_none() && !args.evaluate {
        bail!("--gpu-mem is required: the GPU memory the run may use (e.g. --gpu-mem 15GiB)");
    }
    let workload = Workload {
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
    };
    let mut problem = Problem::new(&config, workload, &hardware, caps);
    problem.kind = kind;
    problem.headroom = args.headroom;
    problem.max_block = args.max_batch;
    problem.compress_weight = pa.compress_weight;
    problem.compress_weight_config.bits = pa.compress_weight_bits;
    problem.compress_weight_config.group_size = pa.compress_weight_group_size;
    problem.compress_cache = pa.compress_cache;
    problem.compress_cache_config.bits = pa.compress_cache_bits;
    problem.compress_cache_config.group_size = pa.compress_cache_group_size;

    if let Some(path) = &args.plot {
        super::checks::output_file("--plot", path)?;
    }
    let start = Instant::now();
    let mut choice = if args.evaluate {
        // Validation of the offload directory waits until we know whether the plan needs one.
        let mut flags = pa.clone();
        flags.offload_dir.get_or_insert_with(|| PathBuf::from("."));
        let mut policy = flags.to_policy()?;
        policy.offload_dir = pa.offload_dir.clone();
        cost_model::evaluate(problem, &policy)?
    } else {
        let search = if args.exact_search {
            SearchKind::FlexLlmGen
        } else {
            SearchKind::Improved
        };
        cost_model::search(problem, search)?
    };
    let elapsed = start.elapsed();
    choice.policy.offload_dir = pa.offload_dir.clone();
    let split = cost_model::time_split(&problem, &choice.candidate);
    if let Some(path) = &args.plot {
        super::policy_plot::write(path, &config, &hardware, &choice, &split)?;
    }

    if args.json {
        let mut object = to_json(&config, &args, &choice, &hardware);
        object["time_split"] = super::policy_plot::split_json(&split);
        let text = serde_json::to_string_pretty(&object)?;
        // A closed pipe (`| head`) is an error to report, not a panic.
        writeln!(std::io::stdout().lock(), "{text}").context("writing to stdout")?;
    } else {
        print_text(&config, &args, &choice, &hardware, elapsed.as_secs_f64())?;
    }
    if let Err(over) = &choice.plan_check {
        eprintln!("warning: strata's memory planner puts this policy over a cap: {over}");
    }
    let peak = choice.plan.peak();
    if peak.disk > 0 && pa.offload_dir.is_none() {
        eprintln!(
            "note: this policy keeps {} on disk: add --offload-dir DIR (a directory on a fast disk) when running it",
            format_bytes(peak.disk)
        );
    }
    Ok(())
}

fn tier_json(t: TierBytes) -> serde_json::Value {
    json!({ "gpu": t.gpu, "cpu": t.cpu, "disk": t.disk })
}

fn to_json(config: &OptConfig, args: &Args, c: &Choice, hw: &HardwareProfile) -> serde_json::Value {
    let p = &c.policy;
    let peak = c.plan.peak();
    json!({
        "schema_version": super::JSON_SCHEMA_VERSION,
        "model": config.name,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "cost_model": c.kind.as_str(),
        "hardware": hw.name,
        "gpu_batch_size": p.gpu_batch_size,
        "num_gpu_batches": p.num_gpu_batches,
        "percent": p.percent.to_array(),
        "cpu_cache_compute": p.cpu_cache_compute,
        "compress_weight": p.compress_weight,
        "compress_cache": p.compress_cache,
        "flags": p.to_flags(),
        "predicted_throughput": c.total_throughput,
        "predicted_prefill_throughput": c.prefill_throughput,
        "predicted_decode_throughput": c.decode_throughput,
        "predicted_prefill_s": c.prefill_s,
        "predicted_decode_s": c.decode_s,
        "peak_bytes": tier_json(peak),
        "weights_bytes": tier_json(c.plan.weights),
        // Part of weights_bytes.gpu under every policy: the percents place the decoder layers only.
        "outside_layer_weight_bytes": outside_layer_bytes(
            config,
            p.compress_weight.then_some(p.compress_weight_config)
        ),
        "cache_bytes": tier_json(c.plan.cache),
        "activation_bytes": tier_json(c.plan.activations),
        "gpu_working_bytes": c.plan.working.gpu,
        "cpu_working_bytes": c.plan.working.cpu + c.plan.staging.cpu,
        "fits_caps": c.plan_check.is_ok(),
        "linear_programs": c.lp_solves,
    })
}

fn print_text(
    config: &OptConfig,
    args: &Args,
    c: &Choice,
    hw: &HardwareProfile,
    secs: f64,
) -> std::io::Result<()> {
    let action = if args.evaluate { "evaluated" } else { "chose" };
    outln!(
        "{} cost model ({} hardware) {action} for {}, prompt {} + gen {} ({} linear programs, {:.2} s):",
        c.kind, hw.name, config.name, args.prompt_len, args.gen_len, c.lp_solves, secs
    );
    outln!("  {}", c.policy.to_flags());
    outln!(
        "predicted throughput: prefill {:.2} token/s, decode {:.2} token/s, total {:.3} token/s",
        c.prefill_throughput,
        c.decode_throughput,
        c.total_throughput
    );
    outln!(
        "predicted time for {} sequences: prefill {:.2} s, decode {:.2} s",
        c.policy.effective_batch(),
        c.prefill_s,
        c.decode_s
    );
    let peak = c.plan.peak();
    let caps = Caps::of(&c.policy);
    outln!("{:<14}{:>14}{:>14}{:>14}", "memory", "GPU", "CPU", "disk");
    let row = |name: &str, t: TierBytes| -> std::io::Result<()> {
        outln!(
            "{:<14}{:>14}{:>14}{:>14}",
            name,
            format_bytes(t.gpu),
            format_bytes(t.cpu),
            format_bytes(t.disk)
        );
        Ok(())
    };
    row("weights", c.plan.weights)?;
    row("kv cache", c.plan.cache)?;
    row("activations", c.plan.activations)?;
    // Slots, scratch and logits on the GPU; on the CPU, the host staging of transfers.
    row("working", c.plan.working.plus(c.plan.staging))?;
    row("peak", peak)?;
    let cap = |t: Tier| caps.get(t).map_or("unlimited".to_string(), format_bytes);
    outln!(
        "{:<14}{:>14}{:>14}{:>14}",
        "cap",
        cap(Tier::Gpu),
        cap(Tier::Cpu),
        cap(Tier::Disk)
    );
    let compress = c
        .policy
        .compress_weight
        .then_some(c.policy.compress_weight_config);
    outln!(
        "the weight percents place the decoder layers; the embeddings, final norm and LM head ({}) stay on the GPU",
        format_bytes(outside_layer_bytes(config, compress))
    );
    Ok(())
}
