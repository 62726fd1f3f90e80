//! `strata generate`: prompts in, generated tokens (and optionally their text and every step's logits) out.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use strata_runtime::config::DType;
use strata_runtime::generate::{GenerateError, Generator};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::offload::placement::{largest_gpu_batch, DeviceLimits, Placement, Workload};
use strata_runtime::tokenizer::Tokenizer;
use strata_runtime::weights::WeightSource;

use super::auto::resolve_auto;
use super::checks;
use super::complete::{run_block, Control, Delta, Request};
use super::headings;
use super::job;
use super::model_arg;
use super::pipeline::{self, PipelineArgs, Rank};
use super::policy_args::PolicyArgs;
use super::process::{out, outln, pause_point};
use super::sampling_args::{choice_json, SamplingArgs};
use super::JSON_SCHEMA_VERSION;

/// Arguments of `strata generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory (with config.json), or a model name such as `opt-1.3b` (then --weights or --dummy).
    #[arg(short, long, value_name = "NAME_OR_DIR", help_heading = headings::MODEL)]
    model: String,
    /// A text prompt (needs a tokenizer in the model directory). Repeat for a batch.
    #[arg(short, long, value_name = "TEXT", help_heading = headings::PROMPTS)]
    prompt: Vec<String>,
    /// A prompt as comma-separated token ids, e.g. `2,31414,232`. Repeat for a batch; follows the text prompts.
    #[arg(long, value_name = "IDS", value_parser = parse_ids, help_heading = headings::PROMPTS)]
    prompt_ids: Vec<Vec<u32>>,
    /// Tokens to generate per prompt (with --input: for lines without `max_new_tokens`).
    #[arg(short = 'n', long, value_name = "N", required_unless_present = "input", help_heading = headings::PROMPTS)]
    max_new_tokens: Option<usize>,
    /// A batch job: one JSON object per line (`id`, `prompt` or `prompt_ids`, optional `max_new_tokens`,
    /// `temperature`, `top_p`, `top_k`, `repetition_penalty`, `seed`, `stop`); needs --output. Rerunning resumes.
    #[arg(long, value_name = "FILE.jsonl", requires = "output",
          conflicts_with_all = ["prompt", "prompt_ids", "json", "stream_json", "dump_logits"],
          help_heading = headings::PROMPTS)]
    input: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Keep generating after the end-of-sequence token.
    #[arg(long, help_heading = headings::SAMPLING)]
    ignore_eos: bool,
    /// Use synthetic weights instead of a checkpoint.
    #[arg(long, conflicts_with = "weights", help_heading = headings::MODEL)]
    dummy: bool,
    /// Checkpoint directory for a model given by name.
    #[arg(long, value_name = "DIR", help_heading = headings::MODEL)]
    weights: Option<PathBuf>,
    /// Store weights on the GPU as f16 or f32 (default: the checkpoint's dtype; bf16 becomes f32).
    #[arg(long, value_name = "f16|f32", value_parser = parse_dtype, help_heading = headings::MODEL)]
    dtype: Option<DType>,
    /// Use the first GPU adapter whose name contains this (default: WGPU_ADAPTER_NAME, else the fastest).
    #[arg(long, value_name = "NAME", help_heading = headings::MODEL)]
    adapter: Option<String>,
    /// A packed checkpoint to load the quantised weights from (needs --compress-weight, with the bits and group size
    /// it was written with). Written from the model first when FILE does not exist, so later runs skip quantising.
    #[arg(long, value_name = "FILE", help_heading = headings::MODEL)]
    packed_weights: Option<PathBuf>,
    /// Offloading policy; without placement or batching flags everything stays on the GPU.
    #[command(flatten)]
    policy: PolicyArgs,
    /// Where a batch job appends one result line per prompt (docs/json.md); ids already there are skipped.
    #[arg(long, value_name = "FILE.jsonl", requires = "input", help_heading = headings::OUTPUT)]
    output: Option<PathBuf>,
    /// Print one JSON document at the end: ids, text, finish reasons, timings, model, seed, policy (docs/json.md).
    #[arg(long, conflicts_with = "stream_json", help_heading = headings::OUTPUT)]
    json: bool,
    /// Print one JSON event per line as tokens are produced, then the --json document as the last event.
    #[arg(long, help_heading = headings::OUTPUT)]
    stream_json: bool,
    /// Write every step's logits as a float32 .npy array [steps, batch, vocab].
    #[arg(long, value_name = "FILE.npy", help_heading = headings::OUTPUT)]
    dump_logits: Option<PathBuf>,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

/// The weight source that serves `packed`'s words: the file at `path`, written from `source` first when missing, and
/// otherwise checked to have been packed from `source`'s weights (a stale file is refused, never used). `source`
/// still gives the config; its tensors are read to write or check the file.
pub(super) fn packed_source(
    path: &Path,
    source: Box<dyn WeightSource>,
    packed: strata_runtime::compress::CompressionConfig,
) -> anyhow::Result<Box<dyn WeightSource>> {
    let existed = path.exists();
    if !existed {
        if let Some(bytes) = strata_runtime::checkpoint::packed::abandoned_partial(path) {
            eprintln!(
                "strata: {}.part ({}) was left by a run that did not finish; writing it anew",
                path.display(),
                strata_runtime::offload::policy::format_bytes(bytes)
            );
        }
        eprintln!(
            "strata: writing packed weights ({} bits, groups of {}) to {}",
            packed.bits,
            packed.group_size,
            path.display()
        );
        strata_runtime::checkpoint::write_packed_model_with_progress(
            path,
            source.as_ref(),
            packed,
            &|_| pause_point("packed-write"),
        )
        .with_context(|| format!("writing packed weights to {}", path.display()))?;
    }
    let weights = strata_runtime::checkpoint::PackedWeights::open(path, source.config(), packed)
        .with_context(|| format!("--packed-weights {}", path.display()))?;
    if existed {
        weights
            .check_source(source.as_ref())
            .with_context(|| format!("--packed-weights {}", path.display()))?;
    }
    Ok(Box::new(weights))
}

/// The packed format `--compress-weight` / `--compress-cache` ask for, checked (`None` when the flag is off).
fn compression(
    on: bool,
    bits: u8,
    group_size: usize,
    flag: &str,
) -> anyhow::Result<Option<strata_runtime::compress::CompressionConfig>> {
    if !on {
        return Ok(None);
    }
    let config = strata_runtime::compress::CompressionConfig::new(bits, group_size)
        .with_context(|| format!("{flag} with {bits} bits in groups of {group_size}"))?;
    Ok(Some(config))
}

fn parse_ids(text: &str) -> Result<Vec<u32>, String> {
    text.split(',')
        .map(|part| {
            part.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{part}` is not a token id: expected comma-separated integers like 2,31414,232"))
        })
        .collect()
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    match DType::parse(text) {
        Some(d @ (DType::F16 | DType::F32)) => Ok(d),
        _ => Err(format!("`{text}` is not a storage dtype: use f16 or f32")),
    }
}

/// The weights and, when the model directory has one, the tokenizer. Reads configs and headers, no weights.
fn open_model(args: &Args) -> anyhow::Result<(Box<dyn WeightSource>, Option<Tokenizer>)> {
    let choice = model_arg::resolve(&args.model, args.weights.as_deref(), args.dummy)?;
    let source = choice.open_for_text(args.dummy)?;
    let tokenizer = match choice.dir() {
        Some(dir) => match Tokenizer::from_dir(dir) {
            Ok(t) => Some(t),
            Err(e) if args.prompt.is_empty() && args.sampling.stop.is_empty() => {
                // Token-id prompts need no tokenizer; say why there is no text.
                if args.json || args.stream_json {
                    eprintln!("note: no text output: {e}");
                }
                None
            }
            Err(e) => {
                let flag = if args.prompt.is_empty() {
                    "--stop"
                } else {
                    "--prompt"
                };
                return Err(e).context(format!("{flag} needs the model's tokenizer"));
            }
        },
        None => None,
    };
    Ok((source, tokenizer))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.pipeline.pipeline {
        if args.input.is_some() {
            bail!(
                "--pipeline runs prompts given as flags; a batch job (--input) runs in one process"
            );
        }
        let flags = args.pipeline.clone();
        return pipeline::run("generate", &flags, |rank| run_as(args, Some(rank)));
    }
    run_as(args, None)
}

/// `generate`, alone or as pipeline stage `rank` (only the last stage prints and writes the logits).
fn run_as(mut args: Args, rank: Option<&Rank>) -> anyhow::Result<()> {
    let quiet = rank.is_some_and(|r| !r.prints());
    if quiet {
        args.json = true;
        args.stream_json = false;
        args.dump_logits = None;
    }
    // Everything that can be checked without reading a weight or opening the GPU is checked first.
    if args.prompt.is_empty() && args.prompt_ids.is_empty() && args.input.is_none() {
        bail!("no prompts: pass --prompt TEXT or --prompt-ids 2,31414,232 (repeat for a batch)");
    }
    if let Some(path) = &args.dump_logits {
        checks::output_file("--dump-logits", path)?;
    }
    if let Some(path) = &args.packed_weights {
        checks::output_file("--packed-weights", path)?;
    }
    if let Some(path) = &args.output {
        checks::output_file("--output", path)?;
    }
    let settings = args.sampling.settings()?;
    let p = &args.policy;
    let compress_weight = compression(
        p.compress_weight,
        p.compress_weight_bits,
        p.compress_weight_group_size,
        "--compress-weight",
    )?;
    // Checked here, before the model is opened; the policy carries the setting.
    compression(
        p.compress_cache,
        p.compress_cache_bits,
        p.compress_cache_group_size,
        "--compress-cache",
    )?;
    if args.packed_weights.is_some() && compress_weight.is_none() {
        bail!(
            "--packed-weights holds quantised weights: add --compress-weight (with the --compress-weight-bits and \
             --compress-weight-group-size the file is, or is to be, packed with)"
        );
    }
    let (source, tokenizer) = open_model(&args)?;
    let config = *source.config();
    // A pipeline stage plans, checks and places only its own layers.
    let range = rank.map(|r| r.range(&config)).transpose()?;
    let config = match &range {
        Some(r) => strata::OptConfig {
            num_hidden_layers: r.layers.len(),
            ..config
        },
        None => config,
    };
    let mut prompts = Vec::new();
    for text in &args.prompt {
        let tokenizer = tokenizer
            .as_ref()
            .context("--prompt needs a tokenizer: give a model directory with tokenizer.json, or use --prompt-ids")?;
        prompts.push(tokenizer.encode(text)?);
    }
    prompts.extend(args.prompt_ids.iter().cloned());
    if !settings.stop.is_empty() && tokenizer.is_none() {
        bail!("--stop needs the model's tokenizer: give a model directory with tokenizer.json");
    }
    // A job's prompts are read, and the output's finished ids skipped, before the GPU opens.
    let job = match (&args.input, &args.output) {
        (Some(input), Some(output)) => {
            let done = job::done_ids(output)?;
            let job = job::read_job(
                input,
                &done,
                &config,
                tokenizer.as_ref(),
                args.max_new_tokens,
                &settings,
            )?;
            if job.pending.is_empty() {
                eprintln!(
                    "strata: all {} prompts of {} are already in {}: nothing to do",
                    job.total,
                    input.display(),
                    output.display()
                );
                return Ok(());
            }
            Some(job)
        }
        _ => None,
    };
    let (longest, max_new_tokens, count) = match &job {
        Some(job) => {
            let (longest, gen) = job.workload();
            (longest, gen, job.pending.len())
        }
        None => {
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            let n = args
                .max_new_tokens
                .context("--max-new-tokens N is required")?;
            checks::new_tokens(&config, longest, n)?;
            checks::prompt_ids(&config, &prompts)?;
            (longest, n, prompts.len())
        }
    };
    let offload = !args.policy.placement_flags_given().is_empty()
        || args.policy.offload_dir.is_some()
        || args.policy.gpu_mem.is_some()
        || args.policy.cpu_mem.is_some();
    let explicit_policy = if !args.policy.is_auto() {
        let mut policy = args.policy.to_policy()?;
        // Without an explicit batching, one GPU batch holds every prompt (all on the GPU, the batch is split below
        // where one binding cannot hold it).
        if args.policy.gpu_batch_size.is_none() && args.policy.num_gpu_batches.is_none() {
            policy.gpu_batch_size = count;
        }
        checks::effective_batch(
            &config,
            policy.gpu_batch_size,
            policy.num_gpu_batches,
            longest + max_new_tokens,
        )?;
        Some(policy)
    } else {
        None
    };

    checks::dead_runs(args.policy.offload_dir.as_deref());
    let gpu = match rank {
        Some(r) => r.gpu(args.adapter.as_deref())?,
        None => Gpu::new(&GpuOptions {
            adapter: args.adapter.clone(),
            max_binding_override: None,
        })?,
    };
    match (rank, &range) {
        (Some(r), Some(range)) => {
            // One write: the launcher interleaves the ranks' stderr at each write.
            let line = format!(
                "strata: rank {} of {}: layers {}..{} of {} on {}\n",
                r.rank,
                r.size,
                range.layers.start,
                range.layers.end,
                config.name,
                gpu.describe()
            );
            eprint!("{line}");
        }
        _ => eprintln!("strata: {} on {}", config.name, gpu.describe()),
    }
    let mut policy = match explicit_policy {
        Some(mut policy) => {
            // With everything on the GPU and no explicit batching: GPU batches of as many prompts as fit one binding.
            if !offload
                && args.policy.gpu_batch_size.is_none()
                && args.policy.num_gpu_batches.is_none()
            {
                let workload = Workload {
                    prompt_len: longest,
                    gen_len: max_new_tokens,
                };
                let fit = largest_gpu_batch(&config, &policy, &DeviceLimits::of(&gpu), workload);
                policy.gpu_batch_size = fit.clamp(1, count.max(1));
                // A job runs blocks of one GPU batch; plain prompts run all at once.
                policy.num_gpu_batches = if job.is_some() {
                    1
                } else {
                    count.div_ceil(policy.gpu_batch_size).max(1)
                };
            }
            policy
        }
        None => {
            let mut policy =
                resolve_auto(&gpu, &config, longest, max_new_tokens, count, &args.policy)?;
            // The search may choose a block smaller than the batch; every prompt must run, so add GPU batches (the
            // placement checks the caps again before anything is allocated). A job runs the chosen blocks.
            if job.is_none() {
                policy.num_gpu_batches = policy
                    .num_gpu_batches
                    .max(count.div_ceil(policy.gpu_batch_size));
            }
            policy
        }
    };
    policy.weight_dtype = args.dtype;
    if let Some(r) = rank {
        pipeline::same_batching(r, &policy)?;
    }
    // Before any weight is read: the run's placement against the memory this device and host really have.
    let block = match &job {
        Some(_) => policy.effective_batch().min(count),
        None => count,
    };
    if max_new_tokens > 0 {
        let workload = Workload {
            prompt_len: longest,
            gen_len: max_new_tokens,
        };
        let placement =
            Placement::for_prompts(&config, &policy, workload, &DeviceLimits::of(&gpu), block)?;
        checks::memory_fits(&gpu, placement.plan().peak(), args.policy.gpu_mem)?;
    }
    let source = match (&args.packed_weights, compress_weight) {
        (Some(path), Some(packed)) => packed_source(path, source, packed)?,
        _ => source,
    };
    if settings.samples() {
        eprintln!(
            "strata: sampling with seed {} (--seed {} repeats this run)",
            settings.seed, settings.seed
        );
    }
    let load_started = Instant::now();
    let staged = range
        .clone()
        .map(|r| strata_runtime::pipeline::StageWeights::new(source.as_ref(), r));
    let weights: &dyn WeightSource = match &staged {
        Some(s) => s,
        None => source.as_ref(),
    };
    let mut generator = Generator::with_policy(&gpu, weights, &policy, &|_| {
        pause_point("load");
        test_lose_device(&gpu, "load");
    })?;
    drop(source);
    if let (Some(r), Some(range)) = (rank, range) {
        pipeline::join_stage(r, &mut generator, range, args.pipeline.pipeline_timeout)?;
    }
    let load_s = load_started.elapsed().as_secs_f64();
    if let (Some(job), Some(output)) = (job, &args.output) {
        return job::run_job(
            &generator,
            tokenizer.as_ref(),
            job,
            block,
            args.ignore_eos,
            output,
        );
    }
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt_ids: p.clone(),
            max_new_tokens,
            choice: settings.choice,
            stop: settings.stop.clone(),
        })
        .collect();
    let mut printer = Printer::new(&args, tokenizer.as_ref(), &prompts)?;
    let block = run_block(
        &generator,
        tokenizer.as_ref(),
        &requests,
        args.ignore_eos,
        true,
        args.dump_logits.is_some(),
        &mut |step, seconds, deltas| {
            pause_point(if step == 0 { "prefill" } else { "decode" });
            test_lose_device(&gpu, &step.to_string());
            printer.step(step, seconds, deltas)
        },
    );
    let streamed = printer.streams();
    if quiet {
        // The last stage prints; this one only reports its own failure.
        return block.map(|_| ());
    }
    let block = match block {
        Ok(block) => block,
        Err(e) => {
            let e = match e.downcast::<GenerateError>() {
                Ok(GenerateError::Stopped {
                    generated_ids,
                    steps,
                    source,
                }) => {
                    // A run that fails halfway still hands over what it generated.
                    let _ = printer.finish();
                    eprintln!(
                        "strata: the run failed after {steps} tokens; the tokens generated so far:"
                    );
                    if !streamed {
                        print_tokens(&args, tokenizer.as_ref(), &prompts, &generated_ids)?;
                    }
                    anyhow::Error::new(*source).context(format!(
                        "generation stopped after {steps} tokens (printed above)"
                    ))
                }
                Ok(other) => other.into(),
                Err(e) => e,
            };
            return Err(e);
        }
    };
    printer.finish()?;
    let ids: Vec<Vec<u32>> = block.completions.iter().map(|c| c.ids.clone()).collect();
    let texts: Option<Vec<String>> = block.completions.iter().map(|c| c.text.clone()).collect();
    // The tokens first: a failure to write the logits below must not lose them.
    if args.json || args.stream_json {
        let generated: usize = ids.iter().map(Vec::len).sum();
        let prefill_s = block.step_seconds.first().copied().unwrap_or(0.0);
        let decode_s: f64 = block.step_seconds.iter().skip(1).sum();
        let per_s = |tokens: usize, s: f64| (s > 0.0).then(|| tokens as f64 / s);
        let mut object = serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "model": config.name,
            "adapter": gpu.describe(),
            "policy": policy.to_flags(),
            "seed": settings.seed,
            "sampling": choice_json(&settings.choice),
            "stop": settings.stop,
            "prompt_ids": prompts,
            "generated_ids": ids,
            "finish_reasons": block.completions.iter().map(|c| c.finish.as_str()).collect::<Vec<_>>(),
            "tokens": {
                "prompt": prompts.iter().map(Vec::len).sum::<usize>(),
                "generated": generated,
            },
            "timings": {
                "load_s": load_s,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "generate_s": prefill_s + decode_s,
                "steps": block.step_seconds.len(),
            },
            "tokens_per_s": {
                "prefill": per_s(prompts.iter().map(Vec::len).sum(), prefill_s),
                "decode": per_s(generated.saturating_sub(prompts.len()), decode_s),
                "generated": per_s(generated, prefill_s + decode_s),
            },
        });
        if let Some(texts) = &texts {
            object["text"] = serde_json::json!(texts);
        }
        if args.stream_json {
            object["event"] = serde_json::json!("done");
        }
        outln!("{object}");
    } else if !streamed {
        for (i, ids) in ids.iter().enumerate() {
            match (&texts, &tokenizer) {
                (Some(texts), Some(t)) => {
                    outln!("[{i}] {}{}", t.decode(&prompts[i], true)?, texts[i])
                }
                _ => outln!("[{i}] {ids:?}"),
            }
        }
    }
    if let (Some(path), Some(logits)) = (&args.dump_logits, &block.logits) {
        let shape = [block.step_seconds.len(), prompts.len(), config.vocab_size];
        strata_runtime::npy::write_f32(path, &shape, logits).with_context(|| {
            format!(
                "writing the logits to {} (the tokens are above)",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// What `generate` prints while tokens are produced: one prompt's text (or ids) as it grows, or `--stream-json`'s
/// events; nothing for `--json` or several prompts (printed at the end).
struct Printer<'a> {
    tokenizer: Option<&'a Tokenizer>,
    mode: PrintMode,
    /// A write failed (a closed stdout): every sequence is ended and the error returned after the step.
    failed: Option<std::io::Error>,
    /// Ids printed so far (the id form of one prompt).
    printed_ids: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum PrintMode {
    Quiet,
    Plain,
    Events,
}

impl<'a> Printer<'a> {
    fn new(
        args: &Args,
        tokenizer: Option<&'a Tokenizer>,
        prompts: &[Vec<u32>],
    ) -> anyhow::Result<Self> {
        let mode = if args.stream_json {
            PrintMode::Events
        } else if args.json || prompts.len() != 1 {
            PrintMode::Quiet
        } else {
            PrintMode::Plain
        };
        let printer = Printer {
            tokenizer,
            mode,
            failed: None,
            printed_ids: 0,
        };
        if mode == PrintMode::Plain {
            match tokenizer {
                Some(t) => out!("[0] {}", t.decode(&prompts[0], true)?),
                None => out!("[0] ["),
            }
            std::io::stdout().flush()?;
        }
        Ok(printer)
    }

    fn streams(&self) -> bool {
        self.mode == PrintMode::Plain
    }

    fn step(&mut self, step: usize, seconds: f64, deltas: &[Option<Delta>]) -> Control {
        if self.failed.is_some() || self.mode == PrintMode::Quiet {
            return Control::default();
        }
        if let Err(e) = self.write_step(step, seconds, deltas) {
            self.failed = Some(e);
            return Control {
                cancel: (0..deltas.len()).collect(),
            };
        }
        Control::default()
    }

    fn write_step(
        &mut self,
        step: usize,
        seconds: f64,
        deltas: &[Option<Delta>],
    ) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        match self.mode {
            PrintMode::Quiet => {}
            PrintMode::Plain => {
                if let Some(Some(delta)) = deltas.first() {
                    if self.tokenizer.is_some() {
                        write!(stdout, "{}", delta.text)?;
                    } else {
                        let comma = if self.printed_ids > 0 { ", " } else { "" };
                        write!(stdout, "{comma}{}", delta.id)?;
                        self.printed_ids += 1;
                    }
                }
            }
            PrintMode::Events => {
                let tokens: Vec<serde_json::Value> = deltas
                    .iter()
                    .map(|d| match d {
                        None => serde_json::Value::Null,
                        Some(d) => {
                            let mut v = serde_json::json!({"id": d.id});
                            if self.tokenizer.is_some() {
                                v["text"] = serde_json::json!(d.text);
                            }
                            if let Some(f) = d.finish {
                                v["finish_reason"] = serde_json::json!(f.as_str());
                            }
                            v
                        }
                    })
                    .collect();
                let event = serde_json::json!({
                    "schema_version": JSON_SCHEMA_VERSION,
                    "event": "step",
                    "step": step,
                    "seconds": seconds,
                    "tokens": tokens,
                });
                writeln!(stdout, "{event}")?;
            }
        }
        stdout.flush()
    }

    /// Ends the streamed line; returns a failed write.
    fn finish(self) -> anyhow::Result<()> {
        if let Some(e) = self.failed {
            return Err(e.into());
        }
        if self.mode == PrintMode::Plain {
            if self.tokenizer.is_some() {
                outln!();
            } else {
                outln!("]");
            }
        }
        Ok(())
    }
}

/// Prints each prompt's generated tokens (as text when there is a tokenizer), or one JSON object with `--json`.
fn print_tokens(
    args: &Args,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    generated: &[Vec<u32>],
) -> anyhow::Result<()> {
    let texts = match tokenizer {
        Some(t) => Some(
            generated
                .iter()
                .map(|ids| t.decode(ids, true))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    if args.json {
        let mut object = serde_json::json!({
            "prompt_ids": prompts,
            "generated_ids": generated,
        });
        if let Some(texts) = &texts {
            object["text"] = serde_json::json!(texts);
        }
        outln!("{object}");
    } else {
        for (i, ids) in generated.iter().enumerate() {
            match (&texts, tokenizer) {
                (Some(texts), Some(t)) => {
                    outln!("[{i}] {}{}", t.decode(&prompts[i], true)?, texts[i])
                }
                _ => outln!("[{i}] {ids:?}"),
            }
        }
    }
    Ok(())
}

/// Test-only: `STRATA_TEST_LOSE_DEVICE_AT=load` (after the first layer is placed) or `=STEP` (after step STEP, 0 =
/// prefill) destroys the GPU device, as a driver reset or an unplugged GPU would, for the fault-injection tests.
/// Does nothing unset.
fn test_lose_device(gpu: &Gpu, at: &str) {
    if std::env::var("STRATA_TEST_LOSE_DEVICE_AT").is_ok_and(|v| v == at) && gpu.lost().is_none() {
        eprintln!("strata: destroying the GPU device (STRATA_TEST_LOSE_DEVICE_AT)");
        gpu.device.destroy();
        // wgpu reports a destroyed device at its next poll (a real loss is reported at once).
        let _ = gpu.lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_and_dtypes_parse_or_explain() {
        assert_eq!(parse_ids("2, 31414,232"), Ok(vec![2, 31414, 232]));
        assert!(parse_ids("2,,3").unwrap_err().contains("is not a token id"));
        assert_eq!(parse_dtype("fp16"), Ok(DType::F16));
        assert!(parse_dtype("bf16").unwrap_err().contains("use f16 or f32"));
    }
}
