//! `strata specs`: the models compiled into this build, or one model's sizes for a workload.

use super::process::{out, outln, text_table};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use strata::OptConfig;
use strata_runtime::offload::policy::format_bytes;

/// Arguments of `strata specs`.
#[derive(clap::Args)]
pub struct Args {
    /// A model (`opt-30b`, `facebook/opt-iml-max-30b`, an alias); without one, every model is listed.
    pub name: Option<String>,
    /// Sequences in the workload, for the KV cache and hidden-state sizes.
    #[arg(long, requires = "name", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// Tokens per sequence (prompt + generated) in the workload [default: the model's max_seq_len].
    #[arg(long, requires = "name", value_parser = clap::value_parser!(u64).range(1..))]
    pub seq: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(name) = &args.name else {
        // Smallest first, as model families are read.
        let mut all = strata::models::ALL.to_vec();
        all.sort_by_key(|c| (c.params(), c.name));
        if args.json {
            let all: Vec<Value> = all.iter().map(|c| summary(c)).collect();
            let object = json!({"schema_version": super::JSON_SCHEMA_VERSION, "models": all});
            outln!("{}", serde_json::to_string_pretty(&object)?);
        } else {
            out!("{}", table(&all));
        }
        return Ok(());
    };
    let resolved = strata::resolve(name).map_err(super::model_arg::unknown_model)?;
    let config = resolved.config;
    let seq = args.seq.unwrap_or(config.max_seq_len as u64);
    if seq > config.max_seq_len as u64 {
        bail!(
            "--seq {seq} exceeds {}'s max_seq_len of {} (its positional table has no rows beyond it)",
            config.name,
            config.max_seq_len
        );
    }
    let cache = config
        .batch_checked(args.batch, seq)
        .context("the workload's byte counts overflow u64; use a smaller --batch")?;
    if args.json {
        let mut value = summary(&config);
        let object = value.as_object_mut().context("summary is an object")?;
        object.insert("schema_version".into(), json!(super::JSON_SCHEMA_VERSION));
        object.insert("arch".into(), json!(resolved.spec.name));
        object.insert("batch_size".into(), json!(args.batch));
        object.insert("seq_len".into(), json!(seq));
        object.insert("cache_bytes".into(), json!(cache.0));
        object.insert("hidden_bytes".into(), json!(cache.1));
        outln!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        out!(
            "{}",
            details(&config, resolved.spec.name, args.batch, seq, cache)
        );
    }
    Ok(())
}

/// `cache_bytes` and `hidden_bytes` without overflow (the const fns wrap in release builds on absurd workloads).
trait Checked {
    fn batch_checked(&self, batch: u64, seq: u64) -> Option<(u64, u64)>;
}

impl Checked for OptConfig {
    fn batch_checked(&self, batch: u64, seq: u64) -> Option<(u64, u64)> {
        let hidden = batch
            .checked_mul(seq)?
            .checked_mul(self.hidden_size as u64)?
            .checked_mul(self.dtype.size_bytes())?;
        let cache = hidden
            .checked_mul(2)?
            .checked_mul(self.num_hidden_layers as u64)?;
        debug_assert_eq!(
            (cache, hidden),
            (self.cache_bytes(batch, seq), self.hidden_bytes(batch, seq))
        );
        Some((cache, hidden))
    }
}

/// The keys both JSON forms share.
fn summary(c: &OptConfig) -> Value {
    json!({
        "name": c.name,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "n_head": c.n_head,
        "ffn_embed_dim": c.ffn_embed_dim,
        "vocab_size": c.vocab_size,
        "max_seq_len": c.max_seq_len,
        "params": c.params(),
        "model_bytes": c.model_bytes(),
    })
}

fn table(configs: &[&OptConfig]) -> String {
    let header = [
        "model", "layers", "hidden", "heads", "ffn", "vocab", "params", "weights",
    ];
    let rows = configs.iter().map(|c| {
        vec![
            c.name.to_owned(),
            c.num_hidden_layers.to_string(),
            c.hidden_size.to_string(),
            c.n_head.to_string(),
            c.ffn_embed_dim.to_string(),
            c.vocab_size.to_string(),
            count(c.params()),
            format_bytes(c.model_bytes()),
        ]
    });
    text_table(&header, &[1, 2, 3, 4, 5, 6, 7], rows)
}

fn details(c: &OptConfig, arch: &str, batch: u64, seq: u64, (cache, hidden): (u64, u64)) -> String {
    let name = if c.name == arch {
        c.name.to_owned()
    } else {
        format!("{} (architecture {arch})", c.name)
    };
    let layout = [
        c.activation.as_str(),
        if c.do_layer_norm_before {
            "pre-LN"
        } else {
            "post-LN"
        },
        if c.enable_bias { "biases" } else { "no biases" },
        if c.layer_norm_elementwise_affine {
            "affine layer norms"
        } else {
            "plain layer norms"
        },
    ]
    .join(", ");
    let mut rows = vec![
        ("model", name),
        ("layers", c.num_hidden_layers.to_string()),
        ("hidden size", c.hidden_size.to_string()),
        ("heads", format!("{} x {}", c.n_head, c.head_dim())),
        ("ffn", c.ffn_embed_dim.to_string()),
        ("vocab", c.vocab_size.to_string()),
        ("max seq len", c.max_seq_len.to_string()),
        ("layout", layout),
    ];
    if c.has_projection() {
        rows.push((
            "embeddings",
            format!("{} wide, projected in and out", c.word_embed_proj_dim),
        ));
    }
    rows.extend([
        (
            "parameters",
            format!("{} ({})", c.params(), count(c.params())),
        ),
        (
            "weights",
            format!("{} ({})", format_bytes(c.model_bytes()), c.dtype),
        ),
        ("workload", format!("batch {batch} x {seq} tokens")),
        ("KV cache", format_bytes(cache)),
        ("hidden state", format_bytes(hidden)),
    ]);
    rows.iter().map(|(k, v)| format!("{k:<14}{v}\n")).collect()
}

/// A count in decimal units, as model sizes are quoted: `125.24 M`, `1.32 B`.
fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.2} K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(count(125_239_296), "125.24 M");
        assert_eq!(count(174_604_468_224), "174.60 B");
        assert_eq!(count(999), "999");
    }

    #[test]
    #[cfg(feature = "opt-30b")]
    fn checked_sizes_agree_with_the_const_fns_and_catch_overflow() {
        let c = strata::get_opt_config("opt-30b").unwrap();
        assert_eq!(
            c.batch_checked(4, 512),
            Some((c.cache_bytes(4, 512), c.hidden_bytes(4, 512)))
        );
        assert_eq!(c.batch_checked(u64::MAX / 2, 2048), None);
    }
}
