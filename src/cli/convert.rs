//! `strata convert DIR [--out DIR2]`: PyTorch `pytorch_model*.bin` weights to safetensors ([`strata::convert`]).

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use strata::convert::{convert_pytorch, ConvertOptions};
use strata_runtime::offload::policy::{format_bytes, parse_bytes};

use super::process::outln;

/// Arguments of `strata convert`.
#[derive(clap::Args)]
pub struct Args {
    /// The model directory holding pytorch_model.bin (or pytorch_model.bin.index.json and its shards).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Write the safetensors (and copies of config.json and the tokenizer files) here instead of into DIR.
    #[arg(long, value_name = "DIR2")]
    out: Option<PathBuf>,
    /// Largest safetensors shard (e.g. 5GB, 2GiB); a larger model is split with model.safetensors.index.json.
    #[arg(long, default_value = "5GB", value_name = "SIZE", value_parser = parse_size)]
    max_shard_size: u64,
}

fn parse_size(text: &str) -> Result<u64, String> {
    match parse_bytes(text) {
        Ok(0) => Err("the shard size must be above zero".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "converting [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let options = ConvertOptions {
        out: args.out.clone(),
        max_shard_bytes: args.max_shard_size,
    };
    let converted = convert_pytorch(&args.dir, &options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    outln!(
        "wrote {} tensors ({}) to {}: {}",
        converted.tensors,
        format_bytes(converted.bytes),
        converted.dir.display(),
        converted
            .files
            .iter()
            .filter_map(|f| f.file_name())
            .map(|f| f.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !converted.dropped.is_empty() {
        outln!(
            "left out (tied to the token embedding): {}",
            converted.dropped.join(", ")
        );
    }
    Ok(())
}
