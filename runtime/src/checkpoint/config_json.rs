//! Reading a Hugging Face OPT `config.json` into an [`OptConfig`].
//!
//! Fields are read one by one from the JSON object (not through a serde struct) so that every error can name the
//! field and say what was found, which serde's positional messages do not.

use std::path::Path;

use serde_json::{Map, Value};

use super::CheckpointError;
use crate::config::{intern_name, Activation, DType, OptConfig};

/// Parses the text of a `config.json` (at `path`, used in messages) for the model directory `dir`.
pub(crate) fn parse_config(
    text: &str,
    path: &Path,
    dir: &Path,
) -> Result<OptConfig, CheckpointError> {
    let value: Value = serde_json::from_str(text).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let Value::Object(map) = value else {
        return Err(field_error(
            path,
            "(top level)",
            "expected a JSON object".into(),
        ));
    };
    let fields = Fields { map: &map, path };

    if let Some(model_type) = fields.string("model_type")? {
        if model_type != "opt" {
            return Err(field_error(
                path,
                "model_type",
                format!("`{model_type}` is not an OPT-family model; strata runs `opt` models only"),
            ));
        }
    }

    let hidden_size = fields.required_usize("hidden_size")?;
    let activation_name = fields
        .string("activation_function")?
        .unwrap_or_else(|| "relu".into());
    let activation = Activation::parse(&activation_name).ok_or_else(|| {
        field_error(
            path,
            "activation_function",
            format!("`{activation_name}` is not supported; OPT-family models use `relu` or `gelu`"),
        )
    })?;
    // Newer transformers write `dtype`, older ones `torch_dtype`; either may be null.
    let dtype = match (fields.string("dtype")?, fields.string("torch_dtype")?) {
        (Some(name), _) => parse_dtype(path, "dtype", &name)?,
        (None, Some(name)) => parse_dtype(path, "torch_dtype", &name)?,
        (None, None) => DType::F16,
    };
    let name = match fields.string("_name_or_path")? {
        Some(name) if !name.trim().is_empty() => last_component(&name),
        _ => dir_name(dir),
    };

    let config = OptConfig {
        name: intern_name(&name),
        num_hidden_layers: fields.required_usize("num_hidden_layers")?,
        hidden_size,
        n_head: fields.required_usize("num_attention_heads")?,
        ffn_embed_dim: fields.required_usize("ffn_dim")?,
        word_embed_proj_dim: fields.usize("word_embed_proj_dim")?.unwrap_or(hidden_size),
        vocab_size: fields.required_usize("vocab_size")?,
        max_seq_len: fields.required_usize("max_position_embeddings")?,
        pad_token_id: fields.token_id("pad_token_id")?.unwrap_or(1),
        bos_token_id: fields.token_id("bos_token_id")?.unwrap_or(2),
        eos_token_id: fields.token_id("eos_token_id")?.unwrap_or(2),
        activation,
        layer_norm_eps: fields.f32("layer_norm_eps")?.unwrap_or(1e-5),
        do_layer_norm_before: fields.bool("do_layer_norm_before")?.unwrap_or(true),
        enable_bias: fields.bool("enable_bias")?.unwrap_or(true),
        layer_norm_elementwise_affine: fields
            .bool("layer_norm_elementwise_affine")?
            .unwrap_or(true),
        remove_final_layer_norm: fields.bool("_remove_final_layer_norm")?.unwrap_or(false),
        tie_word_embeddings: fields.bool("tie_word_embeddings")?.unwrap_or(true),
        dtype,
    };
    config
        .validate()
        .map_err(|source| CheckpointError::Config {
            path: path.to_path_buf(),
            json_field: json_field_name(source.field),
            source,
        })?;
    Ok(config)
}

/// The config.json key behind an [`OptConfig`] field named in a [`ConfigError`].
fn json_field_name(field: &'static str) -> &'static str {
    match field {
        "n_head" => "num_attention_heads",
        "ffn_embed_dim" => "ffn_dim",
        "max_seq_len" => "max_position_embeddings",
        other => other,
    }
}

fn parse_dtype(path: &Path, field: &'static str, name: &str) -> Result<DType, CheckpointError> {
    DType::parse(name).ok_or_else(|| {
        field_error(
            path,
            field,
            format!("`{name}` is not a dtype strata reads (float16, bfloat16 or float32)"),
        )
    })
}

/// `facebook/opt-125m` and `/tmp/models/opt-125m/` both name `opt-125m`.
fn last_component(name: &str) -> String {
    let trimmed = name.trim().trim_end_matches(['/', '\\']);
    trimmed
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(trimmed)
        .to_owned()
}

fn dir_name(dir: &Path) -> String {
    let absolute = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn field_error(path: &Path, field: &str, reason: String) -> CheckpointError {
    CheckpointError::Field {
        path: path.to_path_buf(),
        field: field.to_owned(),
        reason,
    }
}

/// Typed accessors over the config object; a key that is absent or `null` reads as `None`.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, expected: &str, found: &Value) -> CheckpointError {
        field_error(
            self.path,
            key,
            format!("expected {expected}, found {found}"),
        )
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, CheckpointError> {
        match self.u64(key)? {
            None => Ok(None),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| field_error(self.path, key, format!("{n} is too large"))),
        }
    }

    fn required_usize(&self, key: &str) -> Result<usize, CheckpointError> {
        self.usize(key)?.ok_or_else(|| {
            field_error(
                self.path,
                key,
                "missing; an OPT config.json written by transformers always has it".into(),
            )
        })
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>, CheckpointError> {
        match self.u64(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| field_error(self.path, key, format!("{n} is not a valid token id"))),
        }
    }

    fn f32(&self, key: &str) -> Result<Option<f32>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }
}

/// Writes `config` as a Hugging Face style `config.json` text (every field `Checkpoint::open` reads).
pub fn config_to_json(config: &OptConfig) -> String {
    let value = serde_json::json!({
        "_name_or_path": config.name,
        "model_type": "opt",
        "architectures": ["OPTForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "ffn_dim": config.ffn_embed_dim,
        "num_attention_heads": config.n_head,
        "max_position_embeddings": config.max_seq_len,
        "word_embed_proj_dim": config.word_embed_proj_dim,
        "do_layer_norm_before": config.do_layer_norm_before,
        "activation_function": config.activation.as_str(),
        "enable_bias": config.enable_bias,
        "layer_norm_elementwise_affine": config.layer_norm_elementwise_affine,
        "_remove_final_layer_norm": config.remove_final_layer_norm,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "dtype": config.dtype.as_str(),
        "tie_word_embeddings": config.tie_word_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
    });
    // A json! value always serialises.
    serde_json::to_string_pretty(&value).unwrap_or_default()
}
