//! `strata generate`: prompts in, generated tokens (and optionally their text and every step's logits) out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use strata::checkpoint::{self, Checkpoint};
use strata::config::DType;
use strata::dummy::DummyWeights;
use strata::generate::{GenerateOptions, Generator, GeneratorOptions, Sampling};
use strata::gpu::{Gpu, GpuOptions};
use strata::tokenizer::Tokenizer;
use strata::weights::WeightSource;

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
    /// Quantise weight matrices group-wise while loading and keep them packed on the GPU.
    #[arg(long)]
    compress_weight: bool,
    /// Keep the KV cache group-wise quantised on the GPU.
    #[arg(long)]
    compress_cache: bool,
    /// Bits per element for --compress-weight / --compress-cache (2, 4 or 8).
    #[arg(long, value_name = "BITS", default_value_t = 4)]
    compress_bits: u8,
    /// Elements per quantisation group (a multiple of 32 / bits).
    #[arg(long, value_name = "N", default_value_t = 64)]
    compress_group_size: usize,
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

/// The weights and, when the directory has one, the tokenizer.
fn open_model(args: &Args) -> anyhow::Result<(Box<dyn WeightSource>, Option<Tokenizer>)> {
    let as_dir = Path::new(&args.model);
    let dir = if as_dir.join(checkpoint::CONFIG_FILE).is_file() {
        Some(as_dir.to_path_buf())
    } else {
        args.weights.clone()
    };
    let source: Box<dyn WeightSource> = match (&dir, args.dummy) {
        (Some(dir), true) => Box::new(DummyWeights::new(checkpoint::read_config(dir)?)),
        (None, true) => Box::new(DummyWeights::new(strata::get_opt_config(&args.model)?)),
        (Some(dir), false) => Box::new(Checkpoint::open(dir)?),
        (None, false) => {
            if as_dir.is_dir() {
                bail!(
                    "{} has no config.json: pass a Hugging Face model directory",
                    as_dir.display()
                );
            }
            bail!(
                "`{}` is not a model directory: give a directory with config.json, or a model name with \
                 --weights DIR (a checkpoint) or --dummy (synthetic weights)",
                args.model
            )
        }
    };
    let tokenizer = match &dir {
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
    if args.prompt.is_empty() && args.prompt_ids.is_empty() {
        bail!("no prompts: pass --prompt TEXT or --prompt-ids 2,31414,232 (repeat for a batch)");
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
    let compression =
        strata::compress::CompressionConfig::new(args.compress_bits, args.compress_group_size)
            .context("--compress-bits / --compress-group-size")?;
    let (source, tokenizer) = open_model(&args)?;
    let mut prompts = Vec::new();
    for text in &args.prompt {
        let tokenizer = tokenizer
            .as_ref()
            .context("--prompt needs a tokenizer: give a model directory with tokenizer.json, or use --prompt-ids")?;
        prompts.push(tokenizer.encode(text)?);
    }
    prompts.extend(args.prompt_ids.iter().cloned());

    let gpu = Gpu::new(&GpuOptions {
        adapter: args.adapter.clone(),
        max_binding_override: None,
    })?;
    eprintln!("strata: {} on {}", source.config().name, gpu.describe());
    let generator = Generator::new(
        &gpu,
        source.as_ref(),
        &GeneratorOptions {
            dtype: args.dtype,
            gpu_batch_size: None,
            compress_weight: args.compress_weight.then_some(compression),
            compress_cache: args.compress_cache.then_some(compression),
        },
    )?;
    drop(source);
    let output = generator.generate(
        &prompts,
        &GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            sampling,
            ignore_eos: args.ignore_eos,
            record_logits: args.dump_logits.is_some(),
        },
    )?;
    if let (Some(path), Some(logits)) = (&args.dump_logits, &output.logits) {
        let shape = [output.steps, prompts.len(), generator.config().vocab_size];
        strata::npy::write_f32(path, &shape, logits)
            .with_context(|| format!("writing {}", path.display()))?;
    }
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
    if args.json {
        let mut object = serde_json::json!({
            "prompt_ids": prompts,
            "generated_ids": output.generated_ids,
        });
        if let Some(texts) = &texts {
            object["text"] = serde_json::json!(texts);
        }
        println!("{object}");
    } else {
        for (i, ids) in output.generated_ids.iter().enumerate() {
            match (&texts, &tokenizer) {
                (Some(texts), Some(t)) => {
                    println!("[{i}] {}{}", t.decode(&prompts[i], true)?, texts[i])
                }
                _ => println!("[{i}] {ids:?}"),
            }
        }
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
