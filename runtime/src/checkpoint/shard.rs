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
        let len = file.metadata().map_err(io)?.len();
        if len < LEN_BYTES as u64 {
            return Err(corrupt(
                path,
                format!(
                    "file is truncated: {len} bytes, too short for a safetensors header; download it again"
                ),
            ));
        }
        // SAFETY: the map is only read, and every slice taken from it is bounds-checked against the length the file
        // had when it was mapped. Another process truncating the file while it is mapped could still fault on access;
        // `Checkpoint::validate_all` re-checks the lengths just before upload to narrow that window.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut len_bytes = [0u8; LEN_BYTES];
        len_bytes.copy_from_slice(&map[..LEN_BYTES]);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > len - LEN_BYTES as u64 {
            return Err(corrupt(
                path,
                format!(
                    "file is truncated: its header length says {header_len} header bytes follow, but the file has only {len} bytes in all; download it again"
                ),
            ));
        }
        let (n, metadata) = SafeTensors::read_metadata(&map[..]).map_err(|e| match e {
            SafeTensorError::MetadataIncompleteBuffer => {
                let described = described_len(&map[LEN_BYTES..LEN_BYTES + header_len as usize])
                    .map(|data| LEN_BYTES as u64 + header_len + data);
                match described {
                    Some(want) if want > len => corrupt(
                        path,
                        format!(
                            "file is truncated: its header describes {want} bytes but the file has only {len}; download it again"
                        ),
                    ),
                    Some(want) => corrupt(
                        path,
                        format!(
                            "file has {} bytes after the last tensor its header describes ({want} bytes expected, {len} found); the file is corrupt",
                            len - want
                        ),
                    ),
                    None => corrupt(path, format!("not a valid safetensors file: {e}")),
                }
            }
            other => corrupt(path, format!("not a valid safetensors file: {other}")),
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
