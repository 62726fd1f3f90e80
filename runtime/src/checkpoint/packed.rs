//! Packed checkpoints: safetensors files holding packed tensors as `U32` blobs plus a `strata` metadata entry
//! (the format is [`crate::compress`]'s), and [`PackedWeights`], the weight source that serves a model from one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::f16;
use rayon::prelude::*;

use crate::checkpoint::{read_header, HeaderProblem};
use crate::compress::{
    packed_bytes, quantize, CompressError, CompressionConfig, PackedLayout, PackedRef,
    PackedTensor, FORMAT_NAME, FORMAT_VERSION,
};
use crate::config::{DType, OptConfig};
use crate::weights::{model_tensors, HostTensor, TensorSpec, WeightError, WeightSource};

/// Why a model could not be packed from a weight source, or a packed file does not serve the source's model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackedError {
    /// Packing, or the packed file, failed.
    #[error(transparent)]
    Compress(#[from] CompressError),
    /// The weight source could not provide a tensor.
    #[error(transparent)]
    Weight(#[from] WeightError),
}

/// One tensor of a packed checkpoint: compressed, or kept at its dtype (biases, layer norms).
#[derive(Clone, Debug)]
pub enum StoredTensor {
    /// A compressed tensor.
    Packed(PackedTensor),
    /// An uncompressed tensor.
    Dense(HostTensor<'static>),
}

/// Metadata of one packed tensor.
#[derive(serde::Serialize, serde::Deserialize)]
struct PackedMeta {
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
}

/// The JSON stored under the single metadata key [`META_KEY`] (one key, so the header's bytes are deterministic).
#[derive(serde::Serialize, serde::Deserialize)]
struct FileHeader {
    format: String,
    format_version: u32,
    packed: BTreeMap<String, PackedMeta>,
    /// What [`write_packed_model`] packed the file from; absent in files of in-memory tensors ([`save_packed_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<SourceDigest>,
}

/// The weights and settings a packed model was made from, so a file made from other weights (a fine-tune, a merged
/// adapter, a new download of the same architecture) or by another strata is refused instead of used.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SourceDigest {
    /// The strata version that packed the file (quantisation may change between versions).
    tool: String,
    /// Bits per packed value.
    bits: u8,
    /// Values per group.
    group_size: usize,
    /// [`tensor_digest`] of every source tensor, by canonical name.
    tensors: BTreeMap<String, String>,
}

/// The version recorded in (and required of) a packed model's [`SourceDigest`].
const TOOL: &str = concat!("strata ", env!("CARGO_PKG_VERSION"));

/// A tensor's fingerprint: xxh3-128 of its dtype, shape and bytes, as 32 hex digits (fixed width, so a header can be
/// written with placeholders and overwritten in place once the data has been hashed).
fn tensor_digest(tensor: &HostTensor<'_>) -> String {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(tensor.dtype.to_string().as_bytes());
    for &d in &tensor.shape {
        hasher.update(&(d as u64).to_le_bytes());
    }
    hasher.update(&tensor.bytes);
    format!("{:032x}", hasher.digest128())
}

/// Every tensor of `source`'s model, fingerprinted in parallel (each read from the memory map or synthesised once).
fn source_digests(source: &dyn WeightSource) -> Result<BTreeMap<String, String>, WeightError> {
    model_tensors(source.config())
        .par_iter()
        .map(|spec| Ok((spec.name.clone(), tensor_digest(&source.load(spec)?))))
        .collect()
}

/// `FILE.part` files being written by [`write_packed_model`], for [`remove_partial_files`].
static PARTIAL_FILES: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn partial_files() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    PARTIAL_FILES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every `FILE.part` a [`write_packed_model`] of this process is writing, returning how many it removed. For
/// signal handlers, beside [`crate::tiers::cleanup_all`]: exit right after, since the writer's next write goes to the
/// removed file.
pub fn remove_partial_files() -> usize {
    std::mem::take(&mut *partial_files())
        .iter()
        .filter(|path| std::fs::remove_file(path).is_ok())
        .count()
}

/// A `FILE.part` being written: registered for [`remove_partial_files`] while it lives, removed on drop unless
/// [`PartialFile::commit`] renamed it into place (so an error or a panic never leaves it behind).
pub(crate) struct PartialFile {
    pub(crate) path: PathBuf,
    committed: bool,
}

impl PartialFile {
    pub(crate) fn new(path: PathBuf) -> PartialFile {
        partial_files().insert(path.clone());
        PartialFile {
            path,
            committed: false,
        }
    }

    pub(crate) fn commit(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a half-written file must not be mistaken for a checkpoint, nor fill the disk.
            let _ = std::fs::remove_file(&self.path);
        }
        partial_files().remove(&self.path);
    }
}

/// The safetensors metadata key holding [`FileHeader`].
const META_KEY: &str = "strata";

fn to_safetensors_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F32 => safetensors::Dtype::F32,
    }
}

type Views<'a> = Vec<(&'a str, safetensors::tensor::TensorView<'a>)>;

fn views(
    tensors: &[(String, StoredTensor)],
) -> Result<(Views<'_>, HashMap<String, String>), CompressError> {
    let mut header = FileHeader {
        format: FORMAT_NAME.to_owned(),
        format_version: FORMAT_VERSION,
        packed: BTreeMap::new(),
        source: None,
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let view = match tensor {
            StoredTensor::Packed(p) => {
                let meta = PackedMeta {
                    rows: p.rows(),
                    cols: p.cols(),
                    bits: p.config().bits,
                    group_size: p.config().group_size,
                };
                if header.packed.insert(name.clone(), meta).is_some() {
                    return Err(CompressError::Format(format!(
                        "tensor `{name}` appears twice"
                    )));
                }
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::U32,
                    vec![p.words().len()],
                    p.as_bytes(),
                )
            }
            StoredTensor::Dense(t) => safetensors::tensor::TensorView::new(
                to_safetensors_dtype(t.dtype),
                t.shape.clone(),
                &t.bytes,
            ),
        }
        .map_err(|e| CompressError::Format(format!("tensor `{name}`: {e}")))?;
        out.push((name.as_str(), view));
    }
    let json = serde_json::to_string(&header).map_err(|e| CompressError::Format(e.to_string()))?;
    Ok((out, HashMap::from([(META_KEY.to_owned(), json)])))
}

/// Serialises named tensors into a packed checkpoint in memory: a safetensors file whose packed tensors are 1-D
/// `U32` arrays of the packed words (one blob, copied as-is into a GPU buffer), with one metadata key `strata`
/// holding `{"format":"strata-packed","format_version":1,"packed":{name:{"rows","cols","bits","group_size"}}}`.
/// Dense tensors are ordinary safetensors entries. The same tensors always give the same bytes.
pub fn to_packed_bytes(tensors: &[(String, StoredTensor)]) -> Result<Vec<u8>, CompressError> {
    let (views, metadata) = views(tensors)?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| CompressError::Format(e.to_string()))
}

/// Writes [`to_packed_bytes`]'s format to `path`, streaming tensor by tensor.
pub fn save_packed_file(
    path: &Path,
    tensors: &[(String, StoredTensor)],
) -> Result<(), CompressError> {
    let (views, metadata) = views(tensors)?;
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => CompressError::Io {
            path: path.display().to_string(),
            source,
        },
        other => CompressError::Format(format!("{}: {other}", path.display())),
    })
}

/// Reads and checks the `strata` metadata entry of a packed checkpoint.
fn parse_header(metadata: Option<&HashMap<String, String>>) -> Result<FileHeader, CompressError> {
    let bad = |reason: String| CompressError::Format(reason);
    let Some(json) = metadata.and_then(|m| m.get(META_KEY)) else {
        return Err(bad(format!(
            "no `{META_KEY}` metadata: this is not a strata packed checkpoint (convert the model with strata)"
        )));
    };
    let header: FileHeader =
        serde_json::from_str(json).map_err(|e| bad(format!("metadata `{META_KEY}`: {e}")))?;
    if header.format != FORMAT_NAME {
        return Err(bad(format!(
            "format is \"{}\", expected \"{FORMAT_NAME}\": this is not a strata packed checkpoint",
            header.format
        )));
    }
    if header.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} is not supported: this build reads version {FORMAT_VERSION}; \
             re-create the file with this strata",
            header.format_version
        )));
    }
    Ok(header)
}

/// Reads a packed checkpoint from memory, in name order.
pub fn from_packed_bytes(bytes: &[u8]) -> Result<Vec<(String, StoredTensor)>, CompressError> {
    let bad = |reason: String| CompressError::Format(reason);
    let (_, metadata) = read_header(bytes).map_err(|e| bad(e.to_string()))?;
    let header = parse_header(metadata.metadata().as_ref())?;
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.iter() {
        let tensor = match header.packed.get(name) {
            Some(meta) => {
                if view.dtype() != safetensors::Dtype::U32 {
                    return Err(bad(format!(
                        "packed tensor `{name}` has dtype {:?}, expected U32",
                        view.dtype()
                    )));
                }
                let config = CompressionConfig {
                    bits: meta.bits,
                    group_size: meta.group_size,
                };
                StoredTensor::Packed(
                    PackedTensor::from_bytes(meta.rows, meta.cols, config, view.data())
                        .map_err(|e| bad(format!("packed tensor `{name}`: {e}")))?,
                )
            }
            None => {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F32 => DType::F32,
                    other => {
                        return Err(bad(format!(
                            "dense tensor `{name}` has dtype {other:?}; expected F16, BF16 or F32"
                        )))
                    }
                };
                StoredTensor::Dense(HostTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec().into(),
                })
            }
        };
        out.insert(name.to_owned(), tensor);
    }
    if let Some(name) = header.packed.keys().find(|n| !out.contains_key(*n)) {
        return Err(bad(format!(
            "metadata describes packed tensor `{name}` but the file has no such tensor"
        )));
    }
    Ok(out.into_iter().collect())
}

/// Reads a packed checkpoint written by [`save_packed_file`].
pub fn load_packed_file(path: &Path) -> Result<Vec<(String, StoredTensor)>, CompressError> {
    let bytes = std::fs::read(path).map_err(|source| CompressError::Io {
        path: path.display().to_string(),
        source,
    })?;
    from_packed_bytes(&bytes).map_err(|e| match e {
        CompressError::Format(reason) => {
            CompressError::Format(format!("{}: {reason}", path.display()))
        }
        other => other,
    })
}

/// A tensor's elements as f32 (fp16, bf16 and f32 sources; little-endian bytes).
pub fn host_tensor_to_f32(tensor: &HostTensor<'_>) -> Result<Vec<f32>, CompressError> {
    let numel: usize = tensor.shape.iter().product();
    let size = tensor.dtype.size_bytes() as usize;
    if tensor.bytes.len() != numel * size {
        return Err(CompressError::Length {
            what: "tensor bytes",
            expected: numel * size,
            found: tensor.bytes.len(),
        });
    }
    let chunks = tensor.bytes.par_chunks_exact(size);
    Ok(match tensor.dtype {
        DType::F16 => chunks
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => chunks
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F32 => chunks
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    })
}

fn safetensors_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
    }
}

/// Writes every tensor of `source`'s model to a packed checkpoint at `path`, one tensor at a time: each 2-D
/// tensor ([`TensorRole::is_compressed`](crate::weights::TensorRole::is_compressed)) is loaded, converted to f32, packed and written before the next is read, so peak
/// memory is about one tensor in f32, never the whole model. Biases and layer norms are copied at their stored
/// dtype. The header records a fingerprint of every source tensor, this strata's version and the settings
/// ([`PackedWeights::check_source`] compares them). The file is written as `path` + `.part` and renamed into place
/// when complete, so an interrupted write never leaves a file at `path`; an error removes the `.part`, and
/// [`remove_partial_files`] removes it from a signal handler. Returns the file's size.
pub fn write_packed_model(
    path: &Path,
    source: &dyn WeightSource,
    config: CompressionConfig,
) -> Result<u64, PackedError> {
    write_packed_model_with_progress(path, source, config, &|_| {})
}

/// [`write_packed_model`], calling `progress(i)` after the `i`-th tensor (in [`model_tensors`] order) is written.
pub fn write_packed_model_with_progress(
    path: &Path,
    source: &dyn WeightSource,
    config: CompressionConfig,
    progress: &dyn Fn(usize),
) -> Result<u64, PackedError> {
    use std::io::{Seek, Write};
    config.validate()?;
    let specs = model_tensors(source.config());
    let io = |source: std::io::Error| CompressError::Io {
        path: path.display().to_string(),
        source,
    };
    // The header needs every tensor's offsets before any data: packed sizes follow from the shapes, dense sizes
    // from the dtype the source stores, which the first load of each dense tensor confirms.
    let dense_dtype = source.config().dtype;
    let mut entries = serde_json::Map::new();
    let mut packed_meta = BTreeMap::new();
    let mut offset = 0u64;
    for spec in &specs {
        let (dtype, shape, bytes) = if spec.role.is_compressed() {
            let [rows, cols] = spec.shape[..] else {
                return Err(CompressError::Format(format!(
                    "`{}` is not 2-D: {:?}",
                    spec.name, spec.shape
                ))
                .into());
            };
            packed_meta.insert(
                spec.name.clone(),
                PackedMeta {
                    rows,
                    cols,
                    bits: config.bits,
                    group_size: config.group_size,
                },
            );
            let bytes = packed_bytes(rows, cols, config);
            ("U32", vec![bytes as usize / 4], bytes)
        } else {
            let bytes = spec.numel() as u64 * dense_dtype.size_bytes();
            (
                safetensors_dtype_name(dense_dtype),
                spec.shape.clone(),
                bytes,
            )
        };
        entries.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut file_header = FileHeader {
        format: FORMAT_NAME.to_owned(),
        format_version: FORMAT_VERSION,
        packed: packed_meta,
        source: Some(SourceDigest {
            tool: TOOL.to_owned(),
            bits: config.bits,
            group_size: config.group_size,
            // Placeholders of the digests' fixed width: the header is rewritten in place once the data is hashed.
            tensors: specs
                .iter()
                .map(|spec| (spec.name.clone(), tensor_digest_placeholder()))
                .collect(),
        }),
    };
    let header_json = |file_header: &FileHeader| -> Result<Vec<u8>, CompressError> {
        let meta =
            serde_json::to_string(file_header).map_err(|e| CompressError::Format(e.to_string()))?;
        let mut header = entries.clone();
        header.insert(
            "__metadata__".to_owned(),
            serde_json::json!({ META_KEY: meta }),
        );
        let mut json =
            serde_json::to_vec(&header).map_err(|e| CompressError::Format(e.to_string()))?;
        // safetensors aligns the data section to 8 bytes by padding the header with spaces.
        json.resize(json.len().next_multiple_of(8), b' ');
        Ok(json)
    };
    let json = header_json(&file_header)?;

    // `FILE.part` beside `FILE` (not a replaced extension, so `a.x` and `a.y` never share one).
    let mut partial = path.as_os_str().to_owned();
    partial.push(".part");
    let partial = PathBuf::from(partial);
    // Opened without truncating and locked first: another strata writing the same file now holds the lock, and
    // its `.part` must be neither truncated nor removed. Once locked, what is in it was left by a dead run.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(io)?;
    if let Err(e) = fs4::FileExt::try_lock(&file) {
        return Err(CompressError::Format(format!(
            "{} is being written by another strata process now (its {} is locked: {e}); wait for it to finish \
             and run again, or pass another path",
            path.display(),
            partial.display()
        ))
        .into());
    }
    let partial = PartialFile::new(partial);
    file.set_len(0).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    let mut digests = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let tensor = source.load(spec)?;
        digests.insert(spec.name.clone(), tensor_digest(&tensor));
        crate::fault::check_write(crate::fault::WriteKind::Packed).map_err(io)?;
        if spec.role.is_compressed() {
            let values = host_tensor_to_f32(&tensor)?;
            let packed = quantize(&values, spec.shape[0], spec.shape[1], config).map_err(|e| match e {
                CompressError::Value { row, col, value } => CompressError::Format(format!(
                    "`{}` element ({row}, {col}) = {value}: only finite values within +-65504 can be packed",
                    spec.name
                )),
                other => other,
            })?;
            drop(values);
            out.write_all(packed.as_bytes()).map_err(io)?;
        } else {
            if tensor.dtype != dense_dtype {
                return Err(CompressError::Format(format!(
                    "`{}` is stored as {} but the config says {dense_dtype}; convert the checkpoint's dtype first",
                    spec.name, tensor.dtype
                ))
                .into());
            }
            out.write_all(&tensor.bytes).map_err(io)?;
        }
        progress(i);
    }
    if let Some(source) = file_header.source.as_mut() {
        source.tensors = digests;
    }
    let final_json = header_json(&file_header)?;
    if final_json.len() != json.len() {
        return Err(CompressError::Format(
            "the header changed length once the digests were filled in".into(),
        )
        .into());
    }
    let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.seek(std::io::SeekFrom::Start(8)).map_err(io)?;
    file.write_all(&final_json).map_err(io)?;
    file.sync_all().map_err(io)?;
    // Renamed while still locked (where an open file can be renamed), so no other writer can take the `.part`
    // between the last write and the rename.
    #[cfg(windows)]
    drop(file);
    partial.commit(path).map_err(io)?;
    Ok(8 + json.len() as u64 + offset)
}

/// The size of `path`'s `.part` file when one is there that no live process is writing: what a write of `path` that
/// died (SIGKILL, a power cut) left behind, which the next [`write_packed_model`] of `path` replaces.
pub fn abandoned_partial(path: &Path) -> Option<u64> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".part");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(PathBuf::from(partial))
        .ok()?;
    fs4::FileExt::try_lock(&file).ok()?;
    file.metadata().ok().map(|m| m.len())
}

/// A digest of the width [`tensor_digest`] writes, before the tensor is hashed.
fn tensor_digest_placeholder() -> String {
    "0".repeat(32)
}

/// A packed checkpoint opened by memory map: tensors are read on demand, packed ones as borrowed byte ranges that
/// can be copied straight into a GPU buffer (the disk tier never unpacks them).
pub struct PackedCheckpoint {
    path: String,
    map: memmap2::Mmap,
    data_start: usize,
    metadata: safetensors::tensor::Metadata,
    header: FileHeader,
}

impl PackedCheckpoint {
    /// Opens and validates the header of a file written by [`save_packed_file`] or [`write_packed_model`].
    pub fn open(path: &Path) -> Result<PackedCheckpoint, CompressError> {
        let shown = path.display().to_string();
        let io = |source| CompressError::Io {
            path: shown.clone(),
            source,
        };
        let bad = |reason: String| CompressError::Format(format!("{shown}: {reason}"));
        if std::fs::metadata(path).map_err(io)?.is_dir() {
            return Err(bad(
                "is a directory; --packed-weights names a file (e.g. DIR/model-q4.safetensors), which strata \
                 writes when it does not exist"
                    .into(),
            ));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every checkpoint reader, strata assumes nobody truncates the file
        // while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let (n, metadata) = read_header(&map).map_err(|problem| {
            let advice = match problem {
                HeaderProblem::NotSafetensors(_) => {
                    "this is not a packed checkpoint; delete it, or pass another path, and strata writes one there"
                }
                _ => "was its write interrupted? Delete it and run again to rebuild it",
            };
            bad(format!("{problem}; {advice}"))
        })?;
        let header = parse_header(metadata.metadata().as_ref()).map_err(|e| bad(e.to_string()))?;
        Ok(PackedCheckpoint {
            path: shown,
            data_start: 8 + n,
            map,
            metadata,
            header,
        })
    }

    /// Names of every tensor in the file.
    pub fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    fn info(&self, name: &str) -> Result<(&safetensors::tensor::TensorInfo, &[u8]), CompressError> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| CompressError::Format(format!("{}: no tensor `{name}`", self.path)))?;
        let (a, b) = info.data_offsets;
        Ok((info, &self.map[self.data_start + a..self.data_start + b]))
    }

    /// The packed tensor `name`, borrowed from the map.
    pub fn packed(&self, name: &str) -> Result<PackedRef<'_>, CompressError> {
        let meta = self.header.packed.get(name).ok_or_else(|| {
            CompressError::Format(format!("{}: `{name}` is not a packed tensor", self.path))
        })?;
        let (_, bytes) = self.info(name)?;
        let config = CompressionConfig {
            bits: meta.bits,
            group_size: meta.group_size,
        };
        config.validate()?;
        let layout = PackedLayout::new(meta.rows, meta.cols, config);
        if bytes.len() as u64 != layout.bytes() {
            return Err(CompressError::Format(format!(
                "{}: packed tensor `{name}` has {} bytes, its shape needs {}",
                self.path,
                bytes.len(),
                layout.bytes()
            )));
        }
        Ok(PackedRef {
            layout,
            config,
            bytes,
        })
    }

    /// The tensor `name`, packed or dense, copied out of the map.
    pub fn tensor(&self, name: &str) -> Result<StoredTensor, CompressError> {
        if self.header.packed.contains_key(name) {
            let r = self.packed(name)?;
            return Ok(StoredTensor::Packed(PackedTensor::from_bytes(
                r.layout.rows,
                r.layout.cols,
                r.config,
                r.bytes,
            )?));
        }
        let (info, bytes) = self.info(name)?;
        let dtype = match info.dtype {
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(CompressError::Format(format!(
                    "{}: dense tensor `{name}` has dtype {other:?}; expected F16, BF16 or F32",
                    self.path
                )))
            }
        };
        Ok(StoredTensor::Dense(HostTensor {
            dtype,
            shape: info.shape.clone(),
            bytes: bytes.to_vec().into(),
        }))
    }
}

/// A [`WeightSource`] serving a model from a packed checkpoint ([`write_packed_model`]'s file): matrices as their
/// packed words ([`WeightSource::packed`], copied into GPU buffers without quantising again), biases and layer norms
/// borrowed from the map at their stored dtype. [`WeightSource::load`] of a matrix decodes its words to f32 (the
/// values the kernels compute with), for consumers that want numbers, e.g. the CPU reference.
pub struct PackedWeights {
    file: PackedCheckpoint,
    config: OptConfig,
    compression: CompressionConfig,
}

fn shape_text(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl PackedWeights {
    /// Opens the packed checkpoint at `path` for the model `config`, whose matrices must be packed under
    /// `compression`. The whole header is checked before any weight is read: a file made with other bits or group
    /// size, or for another model (a tensor missing, extra, or of another shape), is an error naming the file and
    /// what differs.
    pub fn open(
        path: &Path,
        config: &OptConfig,
        compression: CompressionConfig,
    ) -> Result<PackedWeights, CompressError> {
        let file = PackedCheckpoint::open(path)?;
        let differs = |what: String| {
            CompressError::Format(format!(
                "{}: {what}; delete the file to write it again for this model and settings",
                file.path
            ))
        };
        let model = &config.name;
        let specs = model_tensors(config);
        for spec in &specs {
            let name = &spec.name;
            let Some(info) = file.metadata.info(name) else {
                return Err(differs(format!(
                    "it has no tensor `{name}`, which {model} needs (shape {}): it was written for another model",
                    shape_text(&spec.shape)
                )));
            };
            match (spec.role.is_compressed(), file.header.packed.get(name)) {
                (true, Some(meta)) => {
                    if meta.bits != compression.bits || meta.group_size != compression.group_size {
                        return Err(differs(format!(
                            "it is packed with {} bits in groups of {}, but this run asks for {} bits in groups \
                             of {} (`{name}`)",
                            meta.bits, meta.group_size, compression.bits, compression.group_size
                        )));
                    }
                    if [meta.rows, meta.cols][..] != spec.shape[..] {
                        return Err(differs(format!(
                            "`{name}` is [{}, {}] there, but {model} needs {}: it was written for another model",
                            meta.rows,
                            meta.cols,
                            shape_text(&spec.shape)
                        )));
                    }
                    // Checks that the blob's length matches its shape.
                    file.packed(name)?;
                }
                (true, None) => {
                    return Err(differs(format!(
                    "`{name}` is stored uncompressed there; a packed checkpoint packs every matrix"
                )))
                }
                (false, Some(_)) => {
                    return Err(differs(format!(
                        "`{name}` is packed there; biases and layer norms are never compressed"
                    )))
                }
                (false, None) => {
                    if info.shape != spec.shape {
                        return Err(differs(format!(
                            "`{name}` is {} there, but {model} needs {}: it was written for another model",
                            shape_text(&info.shape),
                            shape_text(&spec.shape)
                        )));
                    }
                }
            }
        }
        let needed: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        if let Some(extra) = file
            .metadata
            .tensors()
            .into_keys()
            .find(|n| !needed.contains(n.as_str()))
        {
            return Err(differs(format!(
                "it has tensor `{extra}`, which {model} does not have: it was written for another model"
            )));
        }
        Ok(PackedWeights {
            file,
            config: *config,
            compression,
        })
    }

    /// Checks that the file was packed from `source`'s weights by this strata with these settings: every source
    /// tensor's fingerprint (xxh3 of the memory-mapped bytes, computed in parallel) must equal the one recorded when
    /// the file was written. A file packed from other weights of the same architecture (a fine-tune, a merged adapter,
    /// a new download), by another strata version, or by a strata that recorded no fingerprints is an error naming
    /// the file, what differs and what to do.
    pub fn check_source(&self, source: &dyn WeightSource) -> Result<(), PackedError> {
        let stale = |what: String| -> PackedError {
            CompressError::Format(format!(
                "{}: {what}; delete the file (or pass another path) and strata packs it again from these weights",
                self.file.path
            ))
            .into()
        };
        let Some(recorded) = &self.file.header.source else {
            return Err(stale(
                "it does not record which weights it was packed from (an older strata wrote it)"
                    .into(),
            ));
        };
        if recorded.tool != TOOL {
            return Err(stale(format!(
                "it was packed by {}, this is {TOOL}",
                recorded.tool
            )));
        }
        if (recorded.bits, recorded.group_size)
            != (self.compression.bits, self.compression.group_size)
        {
            return Err(stale(format!(
                "it was packed with {} bits in groups of {}, this run asks for {} in groups of {}",
                recorded.bits,
                recorded.group_size,
                self.compression.bits,
                self.compression.group_size
            )));
        }
        let current = source_digests(source)?;
        for (name, digest) in &current {
            match recorded.tensors.get(name) {
                Some(was) if was == digest => {}
                Some(_) => {
                    return Err(stale(format!(
                        "`{name}` has changed since the file was packed (a fine-tune, a merged adapter or a new \
                         download?): the file holds other weights"
                    )))
                }
                None => {
                    return Err(stale(format!(
                        "it records no fingerprint of `{name}`: it was packed from another model"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The settings every matrix of the file is packed with.
    pub fn compression(&self) -> CompressionConfig {
        self.compression
    }

    /// The file's path, as shown in messages.
    pub fn path(&self) -> &str {
        &self.file.path
    }

    /// A [`CompressError`] from the file as a [`WeightError`] (its message already names the file).
    fn weight_error(&self, e: CompressError) -> WeightError {
        let text = e.to_string();
        let prefix = format!("{}: ", self.file.path);
        WeightError::Corrupt {
            path: self.file.path.clone(),
            reason: text.strip_prefix(&prefix).unwrap_or(&text).to_owned(),
        }
    }

    fn check_shape(&self, spec: &TensorSpec, found: &[usize]) -> Result<(), WeightError> {
        if found != spec.shape {
            return Err(WeightError::Shape {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }
}

impl WeightSource for PackedWeights {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        if self.file.header.packed.contains_key(&spec.name) {
            let packed = self
                .file
                .packed(&spec.name)
                .map_err(|e| self.weight_error(e))?;
            self.check_shape(spec, &[packed.layout.rows, packed.layout.cols])?;
            let tensor = PackedTensor::from_bytes(
                packed.layout.rows,
                packed.layout.cols,
                packed.config,
                packed.bytes,
            )
            .map_err(|e| self.weight_error(e))?;
            let values = crate::compress::dequantize(&tensor);
            return Ok(HostTensor {
                dtype: DType::F32,
                shape: spec.shape.clone(),
                bytes: bytemuck::cast_slice::<f32, u8>(&values).to_vec().into(),
            });
        }
        let Some(info) = self.file.metadata.info(&spec.name) else {
            return Err(WeightError::Missing {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
            });
        };
        self.check_shape(spec, &info.shape)?;
        let dtype = match info.dtype {
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(WeightError::DType {
                    name: spec.name.clone(),
                    found: format!("{other:?}"),
                })
            }
        };
        let (_, bytes) = self
            .file
            .info(&spec.name)
            .map_err(|e| self.weight_error(e))?;
        Ok(HostTensor {
            dtype,
            shape: spec.shape.clone(),
            bytes: bytes.into(),
        })
    }

    fn packed(
        &self,
        spec: &TensorSpec,
        config: CompressionConfig,
    ) -> Option<Result<PackedRef<'_>, WeightError>> {
        if !self.file.header.packed.contains_key(&spec.name) {
            return None;
        }
        Some((|| {
            let packed = self
                .file
                .packed(&spec.name)
                .map_err(|e| self.weight_error(e))?;
            if packed.config != config {
                return Err(WeightError::Corrupt {
                    path: self.file.path.clone(),
                    reason: format!(
                        "`{}` is packed with {} bits in groups of {}, but {} bits in groups of {} were asked for",
                        spec.name, packed.config.bits, packed.config.group_size, config.bits, config.group_size
                    ),
                });
            }
            self.check_shape(spec, &[packed.layout.rows, packed.layout.cols])?;
            Ok(packed)
        })())
    }
}
