//! PyTorch checkpoints (`pytorch_model.bin`, or the shards of `pytorch_model.bin.index.json`) to safetensors, the
//! format [`strata_runtime::checkpoint::Checkpoint`] maps.
//!
//! The pickles are read by `pytorch-reader` (zip archive + pickle, never executing Python); every tensor keeps its
//! name and stored dtype (fp16, bf16 and fp32 weights alike) and is written as Hugging Face's `save_pretrained`
//! does: one `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
//! [`ConvertOptions::max_shard_bytes`] with `model.safetensors.index.json`. Tensor names are kept as stored
//! (`decoder.*` from `OPTModel`, `model.decoder.*` from `OPTForCausalLM`: the loader accepts both); a tied
//! `lm_head.weight` is dropped, as `save_pretrained` drops it (safetensors has no shared storage and the loader reads
//! the head only when config.json unties it). Tensors are read one at a time, so memory holds one tensor, and every
//! file is written as `FILE.part` (removed on error and on a signal) and renamed when complete; the index is written
//! last, so an interrupted conversion never looks like a checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use pytorch_reader::{PytorchError, PytorchReader, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use strata_runtime::checkpoint::{PartialFile, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};

/// The single PyTorch weights file `save_pretrained(safe_serialization=False)` writes.
pub const PYTORCH_FILE: &str = "pytorch_model.bin";
/// The index of sharded PyTorch weights.
pub const PYTORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// How [`convert_pytorch`] writes.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Where the safetensors go; `None`: next to the `.bin` files. Another directory also gets copies of the
    /// source's other files (config.json, tokenizer files), so it is a complete model directory.
    pub out: Option<PathBuf>,
    /// Largest shard (one tensor larger than this gets a shard of its own). Default: 5 GB, `save_pretrained`'s.
    pub max_shard_bytes: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            out: None,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// What [`convert_pytorch`] wrote.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The model directory holding the safetensors.
    pub dir: PathBuf,
    /// The safetensors files, in shard order (plus the index, last, when sharded).
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Tensors left out (a tied `lm_head.weight`).
    pub dropped: Vec<String>,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The path given is not a directory.
    #[error("{} is not a directory; pass the model directory that holds pytorch_model.bin", dir.display())]
    NotADirectory {
        /// The path given.
        dir: PathBuf,
    },
    /// The directory has no `pytorch_model*.bin`.
    #[error("{} has no PyTorch weights (pytorch_model.bin or pytorch_model.bin.index.json); found: {found}", dir.display())]
    NoPytorchWeights {
        /// The directory given.
        dir: PathBuf,
        /// What it holds.
        found: String,
    },
    /// The output directory already holds safetensors weights.
    #[error("{} already has safetensors weights ({file}); remove them to convert again", dir.display())]
    AlreadyConverted {
        /// The output directory.
        dir: PathBuf,
        /// The file found.
        file: String,
    },
    /// A `.bin` file is not a readable PyTorch checkpoint.
    #[error("{}: not a readable PyTorch checkpoint: {source}", path.display())]
    Pytorch {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: PytorchError,
    },
    /// A tensor's bytes could not be read, or disagree with its shape.
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    Tensor {
        /// The `.bin` file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The shard index is malformed or names missing files.
    #[error("{}: {reason}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two `.bin` files hold a tensor of the same name.
    #[error("tensor `{name}` is in both {} and {}", first.display(), second.display())]
    Duplicate {
        /// The tensor.
        name: String,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The PyTorch weight files of `dir`: the shards `pytorch_model.bin.index.json` names, else `pytorch_model.bin`,
/// else every `pytorch_model*.bin`. `Ok(None)` when there are none.
pub fn pytorch_files(dir: &Path) -> Result<Option<Vec<PathBuf>>, ConvertError> {
    if !dir.is_dir() {
        return Err(ConvertError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    let index = dir.join(PYTORCH_INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_error(&index))?;
        let files = index_shards(&text).map_err(|reason| ConvertError::Index {
            path: index.clone(),
            reason,
        })?;
        let mut out = Vec::new();
        for file in files {
            let path = dir.join(&file);
            if !path.is_file() {
                return Err(ConvertError::Index {
                    path: index,
                    reason: format!(
                        "weight_map names `{file}`, which is missing from {}",
                        dir.display()
                    ),
                });
            }
            out.push(path);
        }
        return Ok(Some(out));
    }
    let single = dir.join(PYTORCH_FILE);
    if single.is_file() {
        return Ok(Some(vec![single]));
    }
    let mut bins: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with("pytorch_model") && n.ends_with(".bin"))
                && p.is_file()
        })
        .collect();
    bins.sort();
    Ok((!bins.is_empty()).then_some(bins))
}

/// The distinct shard file names of a `pytorch_model.bin.index.json`, each a plain file name.
pub fn index_shards(text: &str) -> Result<Vec<String>, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no `weight_map` object")?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map[`{name}`] is not a file name"))?;
        // Shards live next to the index; anything else is a malformed (or hostile) index.
        if file.is_empty() || file == ".." || file.contains(['/', '\\']) {
            return Err(format!(
                "weight_map names `{file}`, which is not a file name in the model directory"
            ));
        }
        files.insert(file.to_owned());
    }
    if files.is_empty() {
        return Err("weight_map is empty".into());
    }
    Ok(files.into_iter().collect())
}

fn safetensors_dtype(dtype: pytorch_reader::DType) -> Dtype {
    use pytorch_reader::DType as P;
    match dtype {
        P::F64 => Dtype::F64,
        P::F32 => Dtype::F32,
        P::F16 => Dtype::F16,
        P::BF16 => Dtype::BF16,
        P::I64 => Dtype::I64,
        P::I32 => Dtype::I32,
        P::I16 => Dtype::I16,
        P::I8 => Dtype::I8,
        P::U64 => Dtype::U64,
        P::U32 => Dtype::U32,
        P::U16 => Dtype::U16,
        P::U8 => Dtype::U8,
        P::Bool => Dtype::BOOL,
    }
}

/// Orders names as a person would (`layers.2` before `layers.10`): numeric segments compare as numbers.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|seg| match seg.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, seg.to_owned()),
        })
        .collect()
}

/// Whether config.json (if any) ties the LM head to the token embedding (OPT's default).
fn ties_embeddings(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json.get("tie_word_embeddings").and_then(|v| v.as_bool()))
        .unwrap_or(true)
}

/// One tensor to write: where it comes from and its size.
struct Item {
    name: String,
    source: PathBuf,
    tensor: Tensor,
    bytes: u64,
}

/// Groups `items` (in order) into shards of at most `max` bytes; a larger tensor gets a shard of its own.
fn shard_sizes(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut total) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && total.saturating_add(size) > max {
            shards.push(start..i);
            start = i;
            total = 0;
        }
        total = total.saturating_add(size);
    }
    if start < sizes.len() {
        shards.push(start..sizes.len());
    }
    shards
}

/// Converts the PyTorch weights of `dir` to safetensors (see the module docs). `progress(done, total)` is called
/// with tensor bytes written after each tensor.
pub fn convert_pytorch(
    dir: &Path,
    options: &ConvertOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Converted, ConvertError> {
    let Some(files) = pytorch_files(dir)? else {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(io_error(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        return Err(ConvertError::NoPytorchWeights {
            dir: dir.to_path_buf(),
            found: if names.is_empty() {
                "nothing".into()
            } else {
                names.join(", ")
            },
        });
    };
    let out = options.out.clone().unwrap_or_else(|| dir.to_path_buf());
    for file in [SINGLE_FILE, INDEX_FILE] {
        if out.join(file).exists() {
            return Err(ConvertError::AlreadyConverted {
                dir: out,
                file: file.into(),
            });
        }
    }

    // Every tensor of every file, by name; metadata only, no tensor bytes yet.
    let mut found: HashMap<String, Item> = HashMap::new();
    for path in &files {
        let reader = PytorchReader::new(path).map_err(|source| ConvertError::Pytorch {
            path: path.clone(),
            source,
        })?;
        for (name, tensor) in reader.into_tensors() {
            let bytes = tensor.byte_len() as u64;
            if let Some(first) = found.get(&name) {
                return Err(ConvertError::Duplicate {
                    name,
                    first: first.source.clone(),
                    second: path.clone(),
                });
            }
            let item = Item {
                name: name.clone(),
                source: path.clone(),
                tensor,
                bytes,
            };
            found.insert(name, item);
        }
    }
    let mut dropped = Vec::new();
    let has_embedding = [
        "decoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
    ]
    .iter()
    .any(|n| found.contains_key(*n));
    if has_embedding && ties_embeddings(dir) && found.remove("lm_head.weight").is_some() {
        dropped.push("lm_head.weight".to_owned());
    }
    let mut items: Vec<Item> = found.into_values().collect();
    items.sort_by_cached_key(|item| natural_key(&item.name));

    std::fs::create_dir_all(&out).map_err(io_error(&out))?;
    let sizes: Vec<u64> = items.iter().map(|i| i.bytes).collect();
    let total: u64 = sizes.iter().sum();
    let shards = shard_sizes(&sizes, options.max_shard_bytes.max(1));
    let n = shards.len();
    let mut written = 0u64;
    let mut outputs = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, range) in shards.into_iter().enumerate() {
        let name = if n == 1 {
            SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = out.join(&name);
        let shard = &mut items[range];
        write_shard(&path, shard, &mut |bytes| {
            written += bytes;
            progress(written, total);
        })?;
        for item in shard.iter() {
            weight_map.insert(item.name.clone(), name.clone());
        }
        outputs.push(path);
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let path = out.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).map_err(|e| ConvertError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomically(&path, text.as_bytes())?;
        outputs.push(path);
    }
    // `--out` may name DIR itself under another spelling: never copy a file onto itself (that truncates it).
    let same_dir = match (std::fs::canonicalize(dir), std::fs::canonicalize(&out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => out == dir,
    };
    if !same_dir {
        copy_other_files(dir, &out)?;
    }
    Ok(Converted {
        dir: out,
        files: outputs,
        tensors: items.len(),
        bytes: total,
        dropped,
    })
}

/// Writes `bytes` to `path` through `path.part`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    let partial = PartialFile::new(part_path(path));
    std::fs::write(partial.path(), bytes).map_err(io_error(partial.path()))?;
    partial.commit(path).map_err(io_error(path))
}

fn part_path(path: &Path) -> PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".part");
    PathBuf::from(partial)
}

/// Writes one safetensors file: safetensors' own header type, tensors streamed one at a time, largest alignment
/// first as the safetensors crate orders them (so a mapped tensor is aligned to its element size).
fn write_shard(
    path: &Path,
    items: &mut [Item],
    written: &mut dyn FnMut(u64),
) -> Result<(), ConvertError> {
    items.sort_by(|a, b| {
        let (da, db) = (
            safetensors_dtype(a.tensor.dtype()),
            safetensors_dtype(b.tensor.dtype()),
        );
        db.cmp(&da)
            .then_with(|| natural_key(&a.name).cmp(&natural_key(&b.name)))
    });
    let mut infos = Vec::with_capacity(items.len());
    let mut offset = 0usize;
    for item in items.iter() {
        let len = item.bytes as usize;
        infos.push((
            item.name.clone(),
            TensorInfo {
                dtype: safetensors_dtype(item.tensor.dtype()),
                shape: item.tensor.shape().to_vec(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let format = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let invalid = |reason: String| ConvertError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    };
    let metadata = Metadata::new(Some(format), infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| invalid(e.to_string()))?;
    // The data starts 8-aligned: the header is padded with spaces, as the format allows.
    header.resize(header.len().next_multiple_of(8), b' ');

    let partial = PartialFile::new(part_path(path));
    let file = std::fs::File::create(partial.path()).map_err(io_error(partial.path()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = io_error(partial.path());
    let result = (|| -> Result<(), ConvertError> {
        w.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| w.write_all(&header))
            .map_err(|e| ConvertError::Io {
                path: partial.path().to_path_buf(),
                source: e,
            })?;
        for item in items.iter() {
            let data = item.tensor.read().map_err(|e| ConvertError::Tensor {
                path: item.source.clone(),
                name: item.name.clone(),
                reason: e.to_string(),
            })?;
            if data.len() as u64 != item.bytes {
                return Err(ConvertError::Tensor {
                    path: item.source.clone(),
                    name: item.name.clone(),
                    reason: format!(
                        "read {} bytes for {:?} of {:?}, expected {}",
                        data.len(),
                        item.tensor.shape(),
                        item.tensor.dtype(),
                        item.bytes
                    ),
                });
            }
            w.write_all(&data).map_err(|e| ConvertError::Io {
                path: partial.path().to_path_buf(),
                source: e,
            })?;
            written(item.bytes);
        }
        Ok(())
    })();
    result?;
    let file = w.into_inner().map_err(|e| ConvertError::Io {
        path: partial.path().to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io)?;
    drop(file);
    partial.commit(path).map_err(io_error(path))
}

/// Copies `dir`'s files other than weights into `out` (config, tokenizer, generation config), following links (a
/// Hugging Face cache snapshot holds links to blobs).
fn copy_other_files(dir: &Path, out: &Path) -> Result<(), ConvertError> {
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.starts_with("pytorch_model")
            || name.ends_with(".safetensors")
            || name == INDEX_FILE
            || name.ends_with(".part");
        let from = entry.path();
        if weights || !from.is_file() {
            continue;
        }
        let to = out.join(&name);
        std::fs::copy(&from, &to).map_err(io_error(&to))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_size_limit_and_keep_order() {
        assert_eq!(shard_sizes(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(shard_sizes(&[10, 1, 1], 8), vec![0..1, 1..3]);
        assert_eq!(shard_sizes(&[1, 10, 1], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(shard_sizes(&[3, 3], 100), vec![0..2]);
        assert!(shard_sizes(&[], 8).is_empty());
    }

    #[test]
    fn names_sort_with_numbers_as_numbers() {
        let mut names = vec![
            "decoder.layers.10.fc1.weight",
            "decoder.layers.2.fc1.weight",
            "decoder.embed_tokens.weight",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            vec![
                "decoder.embed_tokens.weight",
                "decoder.layers.2.fc1.weight",
                "decoder.layers.10.fc1.weight"
            ]
        );
    }

    #[test]
    fn index_shard_names_must_be_plain_files() {
        let ok = r#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin", "c": "pytorch_model-00001-of-00002.bin"}}"#;
        assert_eq!(index_shards(ok).unwrap().len(), 2);
        for bad in [
            r#"{"weight_map": {"a": "../x.bin"}}"#,
            r#"{"weight_map": {}}"#,
            r#"{"weight_map": {"a": 3}}"#,
            r#"{}"#,
            "not json",
        ] {
            assert!(index_shards(bad).is_err(), "{bad}");
        }
    }
}
