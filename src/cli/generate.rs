//! `strata generate`: prompts in, generated tokens (and optionally their text and every step's logits) out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use strata::config::DType;
use strata::generate::{GenerateOptions, Generator, Sampling};
use strata::gpu::{Gpu, GpuOptions};
use strata::offload::placement::{largest_gpu_batch, DeviceLimits, Placement, Workload};
use strata::tokenizer::Tokenizer;
use strata::weights::WeightSource;

use super::auto::resolve_auto;
use super::checks;
use super::model_arg::{self, ModelChoice};
use super::policy_args::PolicyArgs;
use super::process::{outln, pause_point};

/// Arguments of `strata generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory (with config.json), or a model name such as `opt-1.3b` (then --weights or --dummy).
    #[arg(long, value_name = "NAME_OR_DIR")]
    model: String,
    /// A text prompt (needs a tokenizer in the model directory). Repeat for a batch.
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// A prompt as comma-separated token ids, e.g. `2,31414,232`. Repeat for a batch; follows the text prompts.
    #[arg(long, value_name = "IDS", value_parser = parse_ids)]
    prompt_ids: Vec<Vec<u32>>,
    /// Tokens to generate per prompt.
    #[arg(long, value_name = "N")]
    max_new_tokens: usize,
    /// Greedy decoding (the default).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    greedy: bool,
    /// Sample with this softmax temperature instead of greedy decoding.
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Sample from the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object: prompt_ids, generated_ids (and text when a tokenizer is present).
    #[arg(long)]
    json: bool,
    /// Write every step's logits as a float32 .npy array [steps, batch, vocab].
    #[arg(long, value_name = "FILE.npy")]
    dump_logits: Option<PathBuf>,
    /// Use synthetic weights instead of a checkpoint.
    #[arg(long, conflicts_with = "weights")]
    dummy: bool,
    /// Checkpoint directory for a model given by name.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Store weights on the GPU as f16 or f32 (default: the checkpoint's dtype; bf16 becomes f32).
    #[arg(long, value_name = "f16|f32", value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Use the first GPU adapter whose name contains this (default: WGPU_ADAPTER_NAME, else the fastest).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Offloading policy; without placement or batching flags everything stays on the GPU.
    /// A packed checkpoint to load the quantised weights from (needs --compress-weight, with the bits and group size
    /// it was written with). Written from the model first when FILE does not exist, so later runs skip quantising.
    #[arg(long, value_name = "FILE")]
    packed_weights: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The weight source that serves `packed`'s words: the file at `path`, written from `source` first when missing, and
/// otherwise checked to have been packed from `source`'s weights (a stale file is refused, never used). `source`
/// still gives the config; its tensors are read to write or check the file.
pub(super) fn packed_source(
    path: &Path,
    source: Box<dyn WeightSource>,
    packed: strata::compress::CompressionConfig,
) -> anyhow::Result<Box<dyn WeightSource>> {
    let existed = path.exists();
    if !existed {
        eprintln!(
            "strata: writing packed weights ({} bits, groups of {}) to {}",
            packed.bits,
            packed.group_size,
            path.display()
        );
        strata::checkpoint::write_packed_model_with_progress(
            path,
            source.as_ref(),
            packed,
            &|_| pause_point("packed-write"),
        )
        .with_context(|| format!("writing packed weights to {}", path.display()))?;
    }
    let weights = strata::checkpoint::PackedWeights::open(path, source.config(), packed)
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
) -> anyhow::Result<Option<strata::compress::CompressionConfig>> {
    if !on {
        return Ok(None);
    }
    let config = strata::compress::CompressionConfig::new(bits, group_size)
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
    if let ModelChoice::Named {
        config,
        weights: None,
    } = &choice
    {
        if !args.dummy {
            bail!(
                "`{}` is a built-in model: add --weights DIR (its checkpoint) or --dummy (synthetic weights)",
                config.name
            );
        }
    }
    let source = choice.open(args.dummy)?;
    let tokenizer = match choice.dir() {
        Some(dir) => match Tokenizer::from_dir(dir) {
            Ok(t) => Some(t),
            Err(e) if args.prompt.is_empty() => {
                // Token-id prompts need no tokenizer; say why there is no text.
                if args.json {
                    eprintln!("note: no text output: {e}");
                }
                None
            }
            Err(e) => return Err(e).context("--prompt needs the model's tokenizer"),
        },
        None => None,
    };
    Ok((source, tokenizer))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything that can be checked without reading a weight or opening the GPU is checked first.
    if args.prompt.is_empty() && args.prompt_ids.is_empty() {
        bail!("no prompts: pass --prompt TEXT or --prompt-ids 2,31414,232 (repeat for a batch)");
    }
    if let Some(path) = &args.dump_logits {
        checks::output_file("--dump-logits", path)?;
    }
    if let Some(path) = &args.packed_weights {
        checks::output_file("--packed-weights", path)?;
    }
    let sampling = if args.temperature.is_some() || args.top_p.is_some() || args.seed.is_some() {
        Sampling::Sample {
            temperature: args.temperature.unwrap_or(1.0),
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed.unwrap_or(0),
        }
    } else {
        Sampling::Greedy
    };
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
    let mut prompts = Vec::new();
    for text in &args.prompt {
        let tokenizer = tokenizer
            .as_ref()
            .context("--prompt needs a tokenizer: give a model directory with tokenizer.json, or use --prompt-ids")?;
        prompts.push(tokenizer.encode(text)?);
    }
    prompts.extend(args.prompt_ids.iter().cloned());
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    checks::new_tokens(&config, longest, args.max_new_tokens)?;
    checks::prompt_ids(&config, &prompts)?;
    if let Sampling::Sample {
        temperature, top_p, ..
    } = sampling
    {
        if !(temperature > 0.0 && temperature.is_finite()) {
            bail!("--temperature {temperature}: must be a positive number");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p {top_p}: must be in (0, 1]");
        }
    }
    let offload = !args.policy.placement_flags_given().is_empty()
        || args.policy.offload_dir.is_some()
        || args.policy.gpu_mem.is_some()
        || args.policy.cpu_mem.is_some();
    let explicit_policy = if !args.policy.is_auto() {
        let mut policy = args.policy.to_policy()?;
        // Without an explicit batching, one GPU batch holds every prompt (all on the GPU, the batch is split below
        // where one binding cannot hold it).
        if args.policy.gpu_batch_size.is_none() && args.policy.num_gpu_batches.is_none() {
            policy.gpu_batch_size = prompts.len();
        }
        checks::effective_batch(
            &config,
            policy.gpu_batch_size,
            policy.num_gpu_batches,
            longest + args.max_new_tokens,
        )?;
        Some(policy)
    } else {
        None
    };

    let gpu = Gpu::new(&GpuOptions {
        adapter: args.adapter.clone(),
        max_binding_override: None,
    })?;
    eprintln!("strata: {} on {}", config.name, gpu.describe());
    let mut policy = match explicit_policy {
        Some(mut policy) => {
            // With everything on the GPU and no explicit batching: GPU batches of as many prompts as fit one binding.
            if !offload
                && args.policy.gpu_batch_size.is_none()
                && args.policy.num_gpu_batches.is_none()
            {
                let workload = Workload {
                    prompt_len: longest,
                    gen_len: args.max_new_tokens,
                };
                let fit = largest_gpu_batch(&config, &policy, &DeviceLimits::of(&gpu), workload);
                policy.gpu_batch_size = fit.clamp(1, prompts.len().max(1));
                policy.num_gpu_batches = prompts.len().div_ceil(policy.gpu_batch_size).max(1);
            }
            policy
        }
        None => {
            let mut policy = resolve_auto(
                &gpu,
                &config,
                longest,
                args.max_new_tokens,
                prompts.len(),
                &args.policy,
            )?;
            // The search may choose a block smaller than the batch; every prompt must run, so add GPU batches (the
            // placement checks the caps again before anything is allocated).
            policy.num_gpu_batches = policy
                .num_gpu_batches
                .max(prompts.len().div_ceil(policy.gpu_batch_size));
            policy
        }
    };
    policy.weight_dtype = args.dtype;
    // Before any weight is read: the run's placement against the memory this device and host really have.
    if args.max_new_tokens > 0 {
        let workload = Workload {
            prompt_len: longest,
            gen_len: args.max_new_tokens,
        };
        let placement = Placement::for_prompts(
            &config,
            &policy,
            workload,
            &DeviceLimits::of(&gpu),
            prompts.len(),
        )?;
        checks::memory_fits(&gpu, placement.plan().peak(), args.policy.gpu_mem)?;
    }
    let source = match (&args.packed_weights, compress_weight) {
        (Some(path), Some(packed)) => packed_source(path, source, packed)?,
        _ => source,
    };
    let generator =
        Generator::with_policy(&gpu, source.as_ref(), &policy, &|_| pause_point("load"))?;
    drop(source);
    let output = generator.generate_with_progress(
        &prompts,
        &GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            sampling,
            ignore_eos: args.ignore_eos,
            record_logits: args.dump_logits.is_some(),
        },
        &|step| pause_point(if step == 0 { "prefill" } else { "decode" }),
    )?;
    let texts = match &tokenizer {
        Some(t) => Some(
            output
                .generated_ids
                .iter()
                .map(|ids| t.decode(ids, true))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    // The tokens first: a failure to write the logits below must not lose them.
    if args.json {
        let mut object = serde_json::json!({
            "prompt_ids": prompts,
            "generated_ids": output.generated_ids,
        });
        if let Some(texts) = &texts {
            object["text"] = serde_json::json!(texts);
        }
        outln!("{object}");
    } else {
        for (i, ids) in output.generated_ids.iter().enumerate() {
            match (&texts, &tokenizer) {
                (Some(texts), Some(t)) => {
                    outln!("[{i}] {}{}", t.decode(&prompts[i], true)?, texts[i])
                }
                _ => outln!("[{i}] {ids:?}"),
            }
        }
    }
    if let (Some(path), Some(logits)) = (&args.dump_logits, &output.logits) {
        let shape = [output.steps, prompts.len(), generator.config().vocab_size];
        strata::npy::write_f32(path, &shape, logits).with_context(|| {
            format!(
                "writing the logits to {} (the tokens are above)",
                path.display()
            )
        })?;
    }
    Ok(())
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
