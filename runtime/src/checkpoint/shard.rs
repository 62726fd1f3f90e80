//! One memory-mapped `.safetensors` file, with its header parsed and every length checked before any slicing.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensorError, TensorInfo};
use safetensors::SafeTensors;

use crate::weights::WeightError;

/// The 8-byte little-endian header length that opens every safetensors file.
const LEN_BYTES: usize = 8;

/// A mapped safetensors file. Tensor bytes are slices of the map, so loading a tensor copies nothing.
pub(crate) struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section (after the length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("bytes", &self.map.len())
            .finish()
    }
}

fn corrupt(path: &Path, reason: String) -> WeightError {
    WeightError::Corrupt {
        path: path.display().to_string(),
        reason,
    }
}

impl Shard {
    /// Maps `path` and parses its header. A file shorter (or longer) than its header describes is an error naming the
    /// file, so later slices of the map can never run past its end.
    pub(crate) fn open(path: &Path) -> Result<Shard, WeightError> {
        let io = |source| WeightError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is only read, and every slice taken from it is bounds-checked against the length the file
        // had when it was mapped. Another process truncating the file while it is mapped could still fault on access;
        // `Checkpoint::validate_all` re-checks the lengths just before upload to narrow that window.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (n, metadata) = read_header(&map).map_err(|problem| {
            let advice = match problem {
                HeaderProblem::Tensor(_) | HeaderProblem::Trailing { .. } => "the file is corrupt",
                _ => "download it again",
            };
            corrupt(path, format!("{problem}; {advice}"))
        })?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            data_start: LEN_BYTES + n,
            metadata,
        })
    }

    /// The file this shard maps.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the tensors in this file.
    pub(crate) fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// Header entry of `name`, if the file has it.
    pub(crate) fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// The bytes of a tensor of this file, bounds-checked (the header was validated at open, but a slice out of range
    /// must be an error, never a panic).
    pub(crate) fn bytes(&self, name: &str, info: &TensorInfo) -> Result<&[u8], WeightError> {
        let (start, end) = info.data_offsets;
        let range = self
            .data_start
            .checked_add(start)
            .zip(self.data_start.checked_add(end));
        range
            .and_then(|(s, e)| self.map.get(s..e))
            .ok_or_else(|| {
                corrupt(
                    &self.path,
                    format!(
                        "tensor `{name}` lies at bytes {start}..{end} of the data section, past the end of the {}-byte file",
                        self.map.len()
                    ),
                )
            })
    }

    /// Errors if the file on disk is no longer the length it had when mapped (rewritten or truncated since).
    pub(crate) fn check_unchanged(&self) -> Result<(), WeightError> {
        let len = std::fs::metadata(&self.path)
            .map_err(|source| WeightError::Io {
                path: self.path.display().to_string(),
                source,
            })?
            .len();
        if len != self.map.len() as u64 {
            return Err(corrupt(
                &self.path,
                format!(
                    "file changed size since it was opened ({} bytes then, {len} now); open the checkpoint again",
                    self.map.len()
                ),
            ));
        }
        Ok(())
    }
}

/// What is wrong with a file that should be safetensors, found from its header alone. The message says what the
/// file is; the caller adds what to do (download again, rebuild).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderProblem {
    /// Shorter than the 8-byte length that opens every safetensors file.
    #[error("file is truncated: {len} bytes, too short for a safetensors header")]
    TooShort {
        /// The file's length.
        len: u64,
    },
    /// The bytes are not a safetensors header at all (another format, random bytes).
    #[error("not a safetensors file: {0}")]
    NotSafetensors(String),
    /// A well-formed start, cut short.
    #[error(
        "file is truncated: its header describes {described} bytes but the file has only {len}"
    )]
    Truncated {
        /// What the header describes (length prefix, header and data).
        described: u64,
        /// The file's length.
        len: u64,
    },
    /// Bytes after the last tensor.
    #[error("file has {} bytes after the last tensor its header describes ({described} bytes expected, {len} found)", len - described)]
    Trailing {
        /// What the header describes.
        described: u64,
        /// The file's length.
        len: u64,
    },
    /// One tensor's entry is inconsistent (shape, dtype and offsets disagree, or it overlaps another).
    #[error("{0}")]
    Tensor(String),
}

/// safetensors' own bound on the JSON header (its `MAX_HEADER_SIZE`): a larger length prefix is not a header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Parses the header of a whole safetensors file held in `bytes`: the JSON length and the metadata, with every
/// tensor's offsets checked against its shape and dtype and the data section against the file's length.
pub(crate) fn read_header(bytes: &[u8]) -> Result<(usize, Metadata), HeaderProblem> {
    let len = bytes.len() as u64;
    let Some((prefix, rest)) = bytes.split_first_chunk::<LEN_BYTES>() else {
        return Err(HeaderProblem::TooShort { len });
    };
    let header_len = u64::from_le_bytes(*prefix);
    // Every safetensors header is a JSON object; anything else (random bytes, another format) is no header, however
    // its first 8 bytes read as a length.
    if rest.first().is_some_and(|&b| b != b'{') || header_len > MAX_HEADER_BYTES {
        return Err(HeaderProblem::NotSafetensors(format!(
            "its first 8 bytes give a header length of {header_len}, and no JSON header follows"
        )));
    }
    if header_len > len - LEN_BYTES as u64 {
        return Err(HeaderProblem::Truncated {
            described: LEN_BYTES as u64 + header_len,
            len,
        });
    }
    let header = &rest[..header_len as usize];
    SafeTensors::read_metadata(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer => match described_len(header) {
            Some(data) => {
                let described = LEN_BYTES as u64 + header_len + data;
                if described > len {
                    HeaderProblem::Truncated { described, len }
                } else {
                    HeaderProblem::Trailing { described, len }
                }
            }
            None => HeaderProblem::NotSafetensors(e.to_string()),
        },
        SafeTensorError::InvalidOffset(_)
        | SafeTensorError::TensorInvalidInfo
        | SafeTensorError::MisalignedSlice
        | SafeTensorError::ValidationOverflow => HeaderProblem::Tensor(
            bad_entry(header).unwrap_or_else(|| format!("invalid header: {e}")),
        ),
        other => HeaderProblem::NotSafetensors(other.to_string()),
    })
}

/// One header entry as written, for naming the tensor safetensors' validation rejected.
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: safetensors::Dtype,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The first tensor (in data order) whose entry is wrong, and why; `None` when the header does not parse.
fn bad_entry(header: &[u8]) -> Option<String> {
    let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<(String, RawEntry)> = raw
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, v)| Some((name, serde_json::from_value(v).ok()?)))
        .collect();
    entries.sort_by_key(|(name, e)| (e.data_offsets, name.clone()));
    let mut expected_start = 0u64;
    for (name, e) in &entries {
        let (start, end) = e.data_offsets;
        if start != expected_start || end < start {
            return Some(format!(
                "tensor `{name}` lies at data bytes {start}..{end}, but the previous tensor ends at {expected_start}: \
                 tensors must follow each other without gaps or overlaps"
            ));
        }
        let bits = e
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(e.dtype.bitsize() as u64));
        let needed = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if needed != Some(end - start) {
            let needs =
                needed.map_or_else(|| "an impossible number of".to_owned(), |n| n.to_string());
            return Some(format!(
                "tensor `{name}`: shape {:?} of {:?} needs {needs} bytes, but its data_offsets {start}..{end} hold {}",
                e.shape,
                e.dtype,
                end - start
            ));
        }
        expected_start = end;
    }
    None
}

/// Total data bytes a header describes (the largest end offset), if the header is readable JSON.
fn described_len(header: &[u8]) -> Option<u64> {
    let entries: HashMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    entries
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .or(Some(0))
}
