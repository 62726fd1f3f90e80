//! `strata policy`: choose the fastest offloading policy for a model, workload and memory budget (or, with
//! `--evaluate`, predict a given policy), and print it as the flags `strata bench` takes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;
use strata_runtime::config::OptConfig;
use strata_runtime::cost_model::{
    self, Choice, CostModelKind, Problem, SearchKind, DEFAULT_MAX_BLOCK,
};
use strata_runtime::hardware::HardwareProfile;
use strata_runtime::offload::placement::{outside_layer_bytes, Caps, TierBytes, Workload};
use strata_runtime::offload::policy::{format_bytes, format_bytes_exact, parse_bytes, Policy};
use strata_runtime::offload::Tier;

use super::headings;
use super::policy_args::PolicyArgs;
use super::process::{out, outln, text_table};

/// Arguments of `strata policy`.
#[derive(clap::Args)]
pub struct Args {
    /// Model name (opt-125m ... opt-175b, galactica-30b; an organisation prefix like facebook/ is dropped).
    #[arg(short, long, value_name = "NAME", help_heading = headings::MODEL)]
    pub model: String,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512, value_name = "N", help_heading = headings::PROMPTS)]
    pub prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 32, value_name = "N", help_heading = headings::PROMPTS)]
    pub gen_len: usize,
    /// Hardware profile: a built-in name (t4) or a TOML file written by `strata profile`.
    #[arg(long, default_value = "t4", value_name = "t4|FILE")]
    pub hardware: String,
    /// Which runtime the cost model describes.
    #[arg(long, default_value = "strata", value_name = "strata|flexllmgen")]
    pub cost_model: String,
    /// Search FlexLLMGen's way exactly instead of strata's wider search.
    #[arg(long, help_heading = headings::POLICY)]
    pub exact_search: bool,
    /// Fraction of each memory cap the plan may use.
    #[arg(long, default_value_t = 0.8, value_name = "FRACTION", help_heading = headings::MEMORY_CAPS)]
    pub headroom: f64,
    /// Most sequences per block (gpu batch size x number of GPU batches): the prompts you have.
    #[arg(long, default_value_t = DEFAULT_MAX_BLOCK, value_name = "N", help_heading = headings::POLICY)]
    pub max_batch: usize,
    /// Predict the policy given by the flags instead of searching.
    #[arg(long, help_heading = headings::POLICY)]
    pub evaluate: bool,
    /// Caps, compression, offload directory, and (with --evaluate) the policy itself.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print one JSON object instead of text.
    #[arg(long, help_heading = headings::OUTPUT)]
    pub json: bool,
    /// Also draw the placement (bytes per tier) and the predicted time split as an SVG.
    #[arg(long, value_name = "FILE.svg", help_heading = headings::OUTPUT)]
    pub plot: Option<PathBuf>,
    /// Plan one stage of a pipeline of N identical stages (`generate --pipeline`): each runs ceil(layers / N) of the
    /// decoder layers on its own GPU with these caps; with micro-batches filling the pipeline its throughput is one
    /// stage's (hidden rows between stages, small beside the weights, are not modelled).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = headings::POLICY)]
    pub pipeline: Option<u64>,
}

/// The policy's flags with its memory caps in readable units (`--cpu-mem 14.52GiB`, not `--cpu-mem 15223424KiB`).
/// `--json` keeps the exact sizes.
pub fn readable_flags(policy: &Policy) -> String {
    let mut flags = policy.to_flags();
    for (flag, cap) in [
        ("--gpu-mem", policy.gpu_mem),
        ("--cpu-mem", policy.cpu_mem),
        ("--disk-mem", policy.disk_mem),
    ] {
        if let Some(bytes) = cap {
            flags = flags.replacen(
                &format!("{flag} {}", format_bytes_exact(bytes)),
                &format!("{flag} {}", readable_size(bytes)),
                1,
            );
        }
    }
    flags
}

/// `bytes` in the largest binary unit it reaches with the fewest decimals (at most 3) that read back to at least
/// `bytes` and at most 0.1% more: a cap echoed this way never shrinks and stays what was planned. Sizes no such
/// rounding fits are printed exactly.
pub fn readable_size(bytes: u64) -> String {
    let exact = format_bytes_exact(bytes);
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes < 1u64 << shift {
            continue;
        }
        let value = bytes as f64 / (1u64 << shift) as f64;
        for decimals in 0..=3 {
            let scale = 10f64.powi(decimals);
            let text = format!(
                "{:.*}{unit}",
                decimals as usize,
                (value * scale).ceil() / scale
            );
            let close = parse_bytes(&text)
                .is_ok_and(|back| back >= bytes && (back - bytes) as f64 <= bytes as f64 * 1e-3);
            if close {
                // The exact form when it is no longer (`16GiB`, `512MiB`).
                return if exact.len() <= text.len() {
                    exact
                } else {
                    text
                };
            }
        }
        break;
    }
    exact
}

/// The architecture for a spec name (organisation prefix, case and `-iml(-max)` variants resolved).
pub fn resolve_model(name: &str) -> anyhow::Result<OptConfig> {
    strata::get_opt_config(name).map_err(super::model_arg::unknown_model)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = resolve_model(&args.model)?;
    // FlexLLMGen's distributed formulation: every stage is the same problem over its share of the layers.
    let config = match args.pipeline {
        Some(n) if n as usize > config.num_hidden_layers => bail!(
            "--pipeline {n}: {} has only {} decoder layers, one stage each at most",
            config.name,
            config.num_hidden_layers
        ),
        Some(n) => config.with_num_hidden_layers(config.num_hidden_layers.div_ceil(n as usize)),
        None => config,
    };
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
        if let Some(n) = args.pipeline {
            object["pipeline"] = json!({ "stages": n, "stage_layers": config.num_hidden_layers });
        }
        object["time_split"] = super::policy_plot::split_json(&split);
        let text = serde_json::to_string_pretty(&object)?;
        // A closed pipe (`| head`) is an error to report, not a panic.
        writeln!(std::io::stdout().lock(), "{text}").context("writing to stdout")?;
    } else {
        if let Some(n) = args.pipeline {
            outln!(
                "pipeline of {n} stages: each plans {} decoder layers (the figures below are one stage's; the \
                 pipeline's throughput is one stage's once micro-batches fill it)",
                config.num_hidden_layers
            );
        }
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
    outln!("  {}", readable_flags(&c.policy));
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
    let row = |name: &str, t: TierBytes| {
        vec![
            name.to_owned(),
            format_bytes(t.gpu),
            format_bytes(t.cpu),
            format_bytes(t.disk),
        ]
    };
    let cap = |t: Tier| caps.get(t).map_or("unlimited".to_string(), format_bytes);
    let rows = [
        row("weights", c.plan.weights),
        row("kv cache", c.plan.cache),
        row("activations", c.plan.activations),
        // Slots, scratch and logits on the GPU; on the CPU, the host staging of transfers.
        row("working", c.plan.working.plus(c.plan.staging)),
        row("peak", peak),
        vec![
            "cap".into(),
            cap(Tier::Gpu),
            cap(Tier::Cpu),
            cap(Tier::Disk),
        ],
    ];
    out!(
        "{}",
        text_table(&["memory", "GPU", "CPU", "disk"], &[1, 2, 3], rows)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_sizes_read_back_to_at_least_the_planned_bytes() {
        assert_eq!(readable_size(15_223_424 << 10), "14.52GiB");
        assert_eq!(readable_size(16 << 30), "16GiB");
        assert_eq!(readable_size(512), "512");
        let mut bytes = 1u64;
        while bytes < 1 << 60 {
            for b in [bytes, bytes + 1, bytes * 3 + 7, bytes / 3 * 2 + 1] {
                let text = readable_size(b);
                let back = parse_bytes(&text).unwrap();
                assert!(
                    back >= b && (back - b) as f64 <= b as f64 * 1e-3,
                    "{b} -> {text} -> {back}"
                );
            }
            bytes = bytes * 5 / 3 + 1;
        }
    }

    #[test]
    fn readable_flags_parse_back_to_the_policy_with_caps_at_least_as_large() {
        let policy = Policy {
            gpu_mem: Some(15 << 30),
            cpu_mem: Some(15_223_424 << 10),
            disk_mem: Some(1_234_567_890_123),
            ..Policy::default()
        };
        let flags = readable_flags(&policy);
        assert!(flags.contains("--cpu-mem 14.52GiB"), "{flags}");
        let args = std::iter::once("policy")
            .chain(["--model", "opt-125m"])
            .chain(flags.split_whitespace());
        let parsed = <Args as clap::FromArgMatches>::from_arg_matches(
            &<Args as clap::Args>::augment_args(clap::Command::new("policy"))
                .get_matches_from(args),
        )
        .unwrap();
        let back = parsed.policy.to_policy().unwrap();
        for (planned, read) in [
            (policy.gpu_mem, back.gpu_mem),
            (policy.cpu_mem, back.cpu_mem),
            (policy.disk_mem, back.disk_mem),
        ] {
            let (planned, read) = (planned.unwrap(), read.unwrap());
            assert!(
                read >= planned && read - planned <= planned / 1000,
                "{planned} -> {read}"
            );
        }
        assert_eq!(
            Policy {
                gpu_mem: None,
                cpu_mem: None,
                disk_mem: None,
                ..back
            },
            Policy {
                gpu_mem: None,
                cpu_mem: None,
                disk_mem: None,
                ..policy
            }
        );
    }
}
