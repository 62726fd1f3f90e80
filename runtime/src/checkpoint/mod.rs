//! Hugging Face OPT checkpoints: `config.json` plus safetensors weights, memory-mapped and served as a
//! [`WeightSource`] without copying.
//!
//! [`Checkpoint::open`] reads the config, finds the weights (one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`), maps every file and checks each header against the file's length, so a truncated
//! download is an error naming the file and no later slice can run past a map's end. Tensor names may carry the
//! `model.` prefix that `OPTForCausalLM` writes or not (`OPTModel`); the prefix is detected once per checkpoint.
//! [`Checkpoint::validate_all`] checks every tensor of [`model_tensors`] (presence, shape, dtype) before the runtime
//! allocates anything on the GPU.

mod config_json;
mod convert;
pub mod packed;
mod shard;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

pub use config_json::config_to_json;
pub use convert::{to_f16_bits, to_f32};
pub use packed::{
    from_packed_bytes, host_tensor_to_f32, load_packed_file, remove_partial_files,
    save_packed_file, to_packed_bytes, write_packed_model, write_packed_model_with_progress,
    PackedCheckpoint, PackedError, PackedWeights, PartialFile, StoredTensor,
};
pub(crate) use shard::read_header;
pub use shard::HeaderProblem;
use shard::Shard;

use crate::config::{ConfigError, DType, OptConfig};
use crate::weights::{model_tensors, HostTensor, TensorSpec, WeightError, WeightSource};

/// The single-file weights name `save_pretrained` writes.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The config file of a model directory.
pub const CONFIG_FILE: &str = "config.json";

/// How to turn a PyTorch-pickle checkpoint into safetensors, quoted in [`CheckpointError::PytorchOnly`]: the
/// binary's own converter (`strata::convert`), which keeps the stored dtype and writes next to the `.bin` files.
pub const CONVERT_HINT: &str = "strata convert 'DIR'";

/// Why a model directory could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The directory does not exist.
    #[error("model directory {} does not exist", dir.display())]
    NotFound {
        /// The path given.
        dir: PathBuf,
    },
    /// The path is a file, not a directory.
    #[error("{} is not a directory; pass the model directory that holds config.json and the weights", path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The directory has no config.json.
    #[error("{} has no config.json; a Hugging Face model directory holds config.json next to its weights (download the whole model repository)", dir.display())]
    MissingConfig {
        /// The model directory.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A config.json field is missing, of the wrong type or unsupported.
    #[error("{}: field `{field}`: {reason}", path.display())]
    Field {
        /// The config file.
        path: PathBuf,
        /// The JSON key.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// config.json's values do not describe a runnable model.
    #[error("{}: field `{json_field}`: {}", path.display(), source.reason)]
    Config {
        /// The config file.
        path: PathBuf,
        /// The config.json key of the offending field.
        json_field: &'static str,
        /// The validation failure.
        #[source]
        source: ConfigError,
    },
    /// Only PyTorch pickle weights are present.
    #[error("{} has only PyTorch pickle weights ({}); strata reads safetensors. Convert them once with: {}",
        dir.display(), files.join(", "), CONVERT_HINT.replace("DIR", &dir.display().to_string()))]
    PytorchOnly {
        /// The model directory.
        dir: PathBuf,
        /// The `.bin` files found.
        files: Vec<String>,
    },
    /// No weights at all.
    #[error("{} has no weights: expected model.safetensors or model.safetensors.index.json (found: {found})", dir.display())]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
        /// What the directory holds.
        found: String,
    },
    /// The shard index is malformed or disagrees with the shards.
    #[error("{}: {reason}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// config.json unties the LM head but the weights lack it.
    #[error("{}: config.json sets tie_word_embeddings = false, but no weight file has `lm_head.weight`; set tie_word_embeddings to true if the head is the token embedding", dir.display())]
    LmHeadMissing {
        /// The model directory.
        dir: PathBuf,
    },
    /// A weight file is unreadable or inconsistent.
    #[error(transparent)]
    Weight(#[from] WeightError),
}

/// An opened Hugging Face OPT model directory: its config and memory-mapped safetensors weights.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: OptConfig,
    shards: Vec<Shard>,
    /// Tensor name as stored in the files -> index into `shards`.
    tensors: HashMap<String, usize>,
    /// `"model."` or `""`: what stands before `decoder.` in this checkpoint's names.
    prefix: &'static str,
}

impl Checkpoint {
    /// Opens the model directory `dir`: parses and validates config.json, maps the safetensors file(s) and checks their
    /// headers against their lengths. Tensors themselves are checked by [`Checkpoint::validate_all`] or on load.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint, CheckpointError> {
        let dir = dir.as_ref();
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::NotFound {
                    dir: dir.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
            Ok(m) if !m.is_dir() => {
                return Err(CheckpointError::NotADirectory {
                    path: dir.to_path_buf(),
                })
            }
            Ok(_) => {}
        }
        let config = read_config(dir)?;
        let files = weight_files(dir)?;
        let shards = files
            .iter()
            .map(|path| Shard::open(path))
            .collect::<Result<Vec<_>, _>>()?;

        let mut tensors = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.names() {
                if let Some(j) = tensors.insert(name.clone(), i) {
                    return Err(WeightError::Corrupt {
                        path: shard.path().display().to_string(),
                        reason: format!(
                            "tensor `{name}` is also in {}; a tensor must be stored once",
                            shards[j].path().display()
                        ),
                    }
                    .into());
                }
            }
        }
        if dir.join(INDEX_FILE).is_file() && !dir.join(SINGLE_FILE).is_file() {
            check_index(dir, &shards, &tensors)?;
        }

        // OPTForCausalLM saves `model.decoder.*`, a bare OPTModel `decoder.*`.
        let prefix = if tensors.contains_key("model.decoder.embed_tokens.weight") {
            "model."
        } else if tensors.contains_key("decoder.embed_tokens.weight") {
            ""
        } else if tensors.keys().any(|k| k.starts_with("model.decoder.")) {
            "model."
        } else {
            ""
        };
        if !config.tie_word_embeddings && !tensors.contains_key("lm_head.weight") {
            return Err(CheckpointError::LmHeadMissing {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
            prefix,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The architecture read from config.json.
    pub fn config(&self) -> &OptConfig {
        &self.config
    }

    /// `"model."` when tensor names carry the prefix `OPTForCausalLM` writes, `""` otherwise.
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// The weight files, in shard order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(Shard::path).collect()
    }

    /// The name a canonical tensor name (no `model.` prefix) has in this checkpoint's files.
    pub fn stored_name(&self, canonical: &str) -> String {
        if canonical.starts_with("decoder.") {
            format!("{}{canonical}", self.prefix)
        } else {
            canonical.to_owned()
        }
    }

    /// The dtype `canonical` is stored in, if the checkpoint has it in a dtype strata reads.
    pub fn stored_dtype(&self, canonical: &str) -> Option<DType> {
        let name = self.stored_name(canonical);
        let shard = &self.shards[*self.tensors.get(&name)?];
        dtype_of(shard.info(&name)?.dtype)
    }

    /// Checks every tensor the config requires (present, right shape, a readable dtype, inside its file) and that no
    /// file changed size since it was opened. Run it before allocating GPU memory: it reads headers only, no data.
    pub fn validate_all(&self) -> Result<(), WeightError> {
        for shard in &self.shards {
            shard.check_unchanged()?;
        }
        for spec in model_tensors(&self.config) {
            self.load(&spec)?;
        }
        Ok(())
    }
}

impl WeightSource for Checkpoint {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        let name = self.stored_name(&spec.name);
        let missing = || WeightError::Missing {
            name: spec.name.clone(),
            expected: spec.shape.clone(),
        };
        let shard = &self.shards[*self.tensors.get(&name).ok_or_else(missing)?];
        let info = shard.info(&name).ok_or_else(missing)?;
        let dtype = dtype_of(info.dtype).ok_or_else(|| WeightError::DType {
            name: spec.name.clone(),
            found: format!("{:?}", info.dtype),
        })?;
        if info.shape != spec.shape {
            return Err(WeightError::Shape {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: info.shape.clone(),
            });
        }
        let bytes = shard.bytes(&name, info)?;
        Ok(HostTensor {
            dtype,
            shape: info.shape.clone(),
            bytes: Cow::Borrowed(bytes),
        })
    }
}

fn dtype_of(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// Reads and validates `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<OptConfig, CheckpointError> {
    if !dir.exists() {
        return Err(CheckpointError::NotFound {
            dir: dir.to_path_buf(),
        });
    }
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingConfig {
                dir: dir.to_path_buf(),
            })
        }
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    config_json::parse_config(&text, &path, dir)
}

/// The safetensors files of `dir`: the single file, or the shards its index names (sorted, each once).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let map = read_index(&index)?;
        let files: BTreeSet<&String> = map.values().collect();
        let mut out = Vec::new();
        for file in files {
            // Shards live next to the index; a path elsewhere would be a malformed (or hostile) index.
            if file.contains(['/', '\\']) || file == ".." || file.is_empty() {
                return Err(CheckpointError::Index {
                    path: index,
                    reason: format!("weight_map names `{file}`, which is not a file name in the model directory"),
                });
            }
            let path = dir.join(file);
            if !path.is_file() {
                return Err(CheckpointError::Index {
                    path: index,
                    reason: format!(
                        "weight_map names shard `{file}`, which is missing from {}",
                        dir.display()
                    ),
                });
            }
            out.push(path);
        }
        if out.is_empty() {
            return Err(CheckpointError::Index {
                path: index,
                reason: "weight_map is empty".into(),
            });
        }
        return Ok(out);
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let bins: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("pytorch_model") && n.ends_with(".bin"))
        .cloned()
        .collect();
    if !bins.is_empty() {
        return Err(CheckpointError::PytorchOnly {
            dir: dir.to_path_buf(),
            files: bins,
        });
    }
    Err(CheckpointError::NoWeights {
        dir: dir.to_path_buf(),
        found: if names.is_empty() {
            "nothing".into()
        } else {
            names.join(", ")
        },
    })
}

/// The `weight_map` of a shard index: tensor name -> shard file name.
fn read_index(path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_index(&text, path)
}

/// Parses a `model.safetensors.index.json` text into its `weight_map` (tensor name -> shard file name). Which files
/// are acceptable shard names is checked when a directory is opened ([`Checkpoint::open`]).
pub fn parse_index_json(text: &str) -> Result<HashMap<String, String>, CheckpointError> {
    parse_index(text, Path::new(INDEX_FILE))
}

/// Parses and validates a `config.json` text (errors name the file as `config.json`).
pub fn parse_config_json(text: &str) -> Result<OptConfig, CheckpointError> {
    config_json::parse_config(text, Path::new(CONFIG_FILE), Path::new("."))
}

/// Checks a whole safetensors file held in memory as [`Checkpoint::open`] checks each weight file (header, every
/// tensor's shape, dtype and offsets, the file's length), returning its tensor names in data order.
pub fn check_safetensors(bytes: &[u8]) -> Result<Vec<String>, HeaderProblem> {
    read_header(bytes).map(|(_, metadata)| metadata.offset_keys())
}

fn parse_index(text: &str, path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| CheckpointError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let index_error = |reason: String| CheckpointError::Index {
        path: path.to_path_buf(),
        reason,
    };
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| index_error("no `weight_map` object".into()))?;
    map.iter()
        .map(|(name, file)| match file.as_str() {
            Some(file) => Ok((name.clone(), file.to_owned())),
            None => Err(index_error(format!(
                "weight_map entry `{name}` is {file}, expected a file name"
            ))),
        })
        .collect()
}

/// Every tensor the index lists must be in the shard it names.
fn check_index(
    dir: &Path,
    shards: &[Shard],
    tensors: &HashMap<String, usize>,
) -> Result<(), CheckpointError> {
    let path = dir.join(INDEX_FILE);
    let map = read_index(&path)?;
    for (name, file) in &map {
        let found = tensors.get(name).map(|&i| shards[i].path());
        if found != Some(dir.join(file).as_path()) {
            return Err(CheckpointError::Index {
                path,
                reason: match found {
                    Some(other) => format!(
                        "weight_map puts `{name}` in {file}, but it is in {}",
                        other.display()
                    ),
                    None => format!(
                        "weight_map puts `{name}` in {file}, but that file has no such tensor"
                    ),
                },
            });
        }
    }
    Ok(())
}
