//! Group-wise low-bit compression of weights and KV cache (FlexLLMGen's 4-bit scheme, laid out for strata's kernels).
//!
//! A 2-D tensor `[rows, cols]` is cut, row by row, into groups of [`CompressionConfig::group_size`] consecutive
//! elements along `cols` (the contiguous axis: a linear weight's input features, a cache row's head_dim). Each group
//! stores its `min` and `step = (max - min) / (2^bits - 1)` (the reciprocal of FlexLLMGen's `scale`) as fp16 and each
//! element as `q = clamp(round((x - min) / step), 0, 2^bits - 1)`; it decodes as `x' = q * step + min`.
//! Compressed tensors stay compressed in every tier (GPU, CPU, disk) and move as one blob: the linear kernels read
//! packed weights directly through `gpu/kernels/weights_packed.wgsl`; the cache kernels in `gpu/kernels/q4_*.wgsl`
//! ([`DEQUANT_WGSL`], [`ATTENTION_WGSL`]) read the packed words directly, and [`QUANTIZE_WGSL`] packs new cache rows
//! on the GPU. Each q4 kernel's header documents its bindings, uniform (mirrored here by a `#[repr(C)]` params struct
//! with its dispatch grid) and the `BITS` pipeline constant.
//!
//! # Packed layout (format version 1)
//!
//! One little-endian `u32` array, data section first, then the scale section:
//!
//! - `vpw = 32 / bits` values per word; `words_per_group = group_size / vpw`; `groups_per_row = ceil(cols /
//!   group_size)`; `words_per_row = groups_per_row * words_per_group`.
//! - Data: word `r * words_per_row + c / vpw` holds element `(r, c)` in bits `[(c % vpw) * bits, .. + bits)`
//!   (element `c` of a word at the low end). The last group of a row is padded with `q = 0`.
//! - Scales: word `rows * words_per_row + r * groups_per_row + c / group_size` holds two fp16 values: `step` in the
//!   low half and `min` in the high half, so WGSL's `unpack2x16float(word)` yields `vec2(step, min)`.
//!
//! Why this layout: a GEMV workgroup owns a few output rows and its threads stride along the rows, so neighbouring
//! threads read neighbouring words (coalesced); each word lies inside one group (`group_size` is a multiple of
//! `vpw`, itself a multiple of 4) and needs exactly one scale word, so the kernels decode 4 values at a time from one
//! data word and one scale word; keeping data and scales in separate sections keeps every
//! group's data words contiguous and aligned (8 words, 32 bytes, at the default 4 bits / 64).
//!
//! `min` is rounded *down* and `step` *up* to fp16, so the stored grid always covers `[min, max]` and the error per
//! element is at most `step / 2`: `(max - min) / 30` at 4 bits, up to fp16 rounding of the group's min and step
//! (none when `min` is an fp16 value, as in an fp16 checkpoint, and `step` is too). A constant group stores
//! `step = 0` and decodes exactly to its (fp16) value. Stored values are never fp16 subnormals (some GPUs flush
//! them): a subnormal min becomes 0 or -2^-14 and a subnormal step 2^-14, still covering `[min, max]`.
//!
//! Which tensors are compressed ([`TensorRole::is_compressed`](crate::weights::TensorRole::is_compressed)): every 2-D tensor, as in FlexLLMGen (linear weights, the token
//! embedding, which is also the tied LM head, the positional table, project_in/out, an untied LM head). Biases and
//! layer norms stay at the model's dtype. The KV cache `[seq * batch * heads, head_dim]` is grouped along head_dim:
//! [`PackedTensor::write_rows`] (CPU) or `q4_quantize.wgsl` (GPU) append a decode step's rows, and
//! [`decode_attention`] (CPU) or `q4_attention.wgsl` (GPU) attend over the packed cache without unpacking it.
//!
//! # Files
//!
//! A packed checkpoint is a safetensors file: each packed tensor is a 1-D `U32` array of its words, dense tensors
//! are ordinary entries, and one metadata key `strata` holds the format name, [`FORMAT_VERSION`] and every packed
//! tensor's rows, cols, bits and group size. The files themselves live with the other checkpoint formats, in
//! [`crate::checkpoint::packed`]: `write_packed_model` converts a
//! [`WeightSource`](crate::weights::WeightSource) tensor by tensor; `PackedCheckpoint` maps a file and lends packed
//! tensors as bytes (the disk tier); `to_packed_bytes`, `save_packed_file`, `from_packed_bytes` and
//! `load_packed_file` handle in-memory sets of tensors. A tensor larger than one GPU binding is split by rows with
//! [`PackedTensor::row_block`].
//!
//! # Code map
//!
//! This file: the config, the layout, [`PackedTensor`], [`quantize`] / [`dequantize`]. `kernels.rs`: the WGSL
//! sources and their uniforms. `attention.rs`: CPU decode attention over packed caches. `checkpoint/packed.rs`
//! (another module): packed checkpoints. `flexllmgen.rs`: FlexLLMGen's column-grouped scheme, for comparison only.

mod attention;
mod flexllmgen;
mod kernels;

pub use attention::{decode_attention, AttentionShape};
pub use flexllmgen::{flexllmgen_dequantize, flexllmgen_quantize, FlexPacked};
pub use kernels::{
    AttentionParams, DequantParams, QuantizeParams, ATTENTION_WGSL, DEQUANT_WGSL, QUANTIZE_WGSL,
};

use half::f16;
use rayon::prelude::*;

/// Version of the packed layout and of the file format written by `checkpoint::packed::save_packed_file`.
pub const FORMAT_VERSION: u32 = 1;
/// Value of the `format` field of a packed checkpoint's metadata.
pub const FORMAT_NAME: &str = "strata-packed";

/// Largest finite fp16 value: the stored `min` and `step` must fit.
const F16_MAX: f32 = 65504.0;

/// How tensors are compressed: bits per element and elements per group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompressionConfig {
    /// Bits per element: 2, 4 or 8 (a divisor of 32, so a word holds whole elements).
    pub bits: u8,
    /// Consecutive elements along the contiguous axis sharing one min and step: a positive multiple of `32 / bits`.
    pub group_size: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl CompressionConfig {
    /// FlexLLMGen's setting: 4 bits, groups of 64.
    pub const DEFAULT: CompressionConfig = CompressionConfig {
        bits: 4,
        group_size: 64,
    };

    /// A checked config: `bits` in {2, 4, 8} and `group_size` a positive multiple of `32 / bits`.
    pub fn new(bits: u8, group_size: usize) -> Result<Self, CompressError> {
        let config = CompressionConfig { bits, group_size };
        config.validate()?;
        Ok(config)
    }

    /// Checks `bits` and `group_size`, saying which is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), CompressError> {
        if !matches!(self.bits, 2 | 4 | 8) {
            return Err(CompressError::Config(format!(
                "bits = {} is not supported; use 2, 4 or 8",
                self.bits
            )));
        }
        let vpw = self.values_per_word();
        if self.group_size == 0 || self.group_size % vpw != 0 || self.group_size > 1 << 20 {
            return Err(CompressError::Config(format!(
                "group_size = {} must be a positive multiple of {vpw} (values per 32-bit word at {} bits), \
                 at most 1048576",
                self.group_size, self.bits
            )));
        }
        Ok(())
    }

    /// Elements per `u32` word.
    pub const fn values_per_word(&self) -> usize {
        32 / self.bits as usize
    }

    /// Largest quantised value, `2^bits - 1`.
    pub const fn max_level(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Data words per group.
    pub const fn words_per_group(&self) -> usize {
        self.group_size / self.values_per_word()
    }
}

/// The shape of a packed `[rows, cols]` tensor: where each section and row starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackedLayout {
    /// Rows (a weight's output features, or cache rows).
    pub rows: usize,
    /// Elements per row (a weight's input features, or head_dim).
    pub cols: usize,
    /// Groups in one row (`ceil(cols / group_size)`; the last is padded).
    pub groups_per_row: usize,
    /// Data words in one group.
    pub words_per_group: usize,
    /// Data words in one row.
    pub words_per_row: usize,
    /// Word index where the scale section starts (`rows * words_per_row`).
    pub scale_offset: usize,
    /// Total words (data and scales).
    pub total_words: usize,
}

impl PackedLayout {
    /// The layout of a `[rows, cols]` tensor under `config` (which must be valid).
    pub const fn new(rows: usize, cols: usize, config: CompressionConfig) -> PackedLayout {
        let groups_per_row = cols.div_ceil(config.group_size);
        let words_per_group = config.words_per_group();
        let words_per_row = groups_per_row * words_per_group;
        let scale_offset = rows * words_per_row;
        PackedLayout {
            rows,
            cols,
            groups_per_row,
            words_per_group,
            words_per_row,
            scale_offset,
            total_words: scale_offset + rows * groups_per_row,
        }
    }

    /// [`PackedLayout::new`] for shapes from outside (a file header, a caller): validates `config` and refuses
    /// shapes whose word count overflows.
    pub fn checked(
        rows: usize,
        cols: usize,
        config: CompressionConfig,
    ) -> Result<PackedLayout, CompressError> {
        config.validate()?;
        let words_per_row = cols
            .div_ceil(config.group_size)
            .checked_mul(config.words_per_group());
        let total = words_per_row
            .and_then(|w| w.checked_add(cols.div_ceil(config.group_size)))
            .and_then(|w| w.checked_mul(rows))
            .and_then(|w| w.checked_mul(4));
        if total.is_none() {
            return Err(CompressError::Config(format!(
                "a packed [{rows}, {cols}] tensor does not fit in memory"
            )));
        }
        Ok(PackedLayout::new(rows, cols, config))
    }

    /// Total bytes.
    pub const fn bytes(&self) -> u64 {
        4 * self.total_words as u64
    }
}

/// Bytes of a packed `[rows, cols]` tensor: `4 * rows * ceil(cols / group_size) * (group_size * bits / 32 + 1)`.
pub const fn packed_bytes(rows: usize, cols: usize, config: CompressionConfig) -> u64 {
    PackedLayout::new(rows, cols, config).bytes()
}

/// A packed tensor borrowed from where it is stored (a packed checkpoint's memory map, a CPU-resident packed cache).
#[derive(Clone, Copy, Debug)]
pub struct PackedRef<'a> {
    /// Its layout.
    pub layout: PackedLayout,
    /// Bits and group size.
    pub config: CompressionConfig,
    /// The packed words' bytes, as in [`PackedTensor::as_bytes`].
    pub bytes: &'a [u8],
}

impl<'a> PackedRef<'a> {
    /// The `[rows, cols]` tensor of `config` stored in `bytes`, which must be exactly its packed bytes.
    pub fn new(
        rows: usize,
        cols: usize,
        config: CompressionConfig,
        bytes: &'a [u8],
    ) -> Result<PackedRef<'a>, CompressError> {
        let layout = checked_bytes(rows, cols, config, bytes.len())?;
        Ok(PackedRef {
            layout,
            config,
            bytes,
        })
    }
}

/// Packed rows a reader decodes one row at a time ([`decode_attention`]): an owned [`PackedTensor`] or a borrowed
/// [`PackedRef`], read where it is stored.
pub trait PackedRows: Sync {
    /// The layout.
    fn layout(&self) -> PackedLayout;
    /// Bits and group size.
    fn config(&self) -> CompressionConfig;
    /// Word `i` of the packed array (data, then scales).
    fn word(&self, i: usize) -> u32;

    /// Decodes row `r` into `out` (`cols` values).
    fn decode_row(&self, r: usize, out: &mut [f32]) {
        let l = self.layout();
        let config = self.config();
        let vpw = config.values_per_word();
        let bits = config.bits as u32;
        let mask = config.max_level();
        let (data, scales) = (r * l.words_per_row, l.scale_offset + r * l.groups_per_row);
        for (w, chunk) in out.chunks_mut(vpw).enumerate() {
            let (step, min) = unpack_scale(self.word(scales + w / l.words_per_group));
            let word = self.word(data + w);
            for (j, x) in chunk.iter_mut().enumerate() {
                let q = (word >> (j as u32 * bits)) & mask;
                *x = q as f32 * step + min;
            }
        }
    }
}

impl PackedRows for PackedTensor {
    fn layout(&self) -> PackedLayout {
        self.layout
    }

    fn config(&self) -> CompressionConfig {
        self.config
    }

    #[inline]
    fn word(&self, i: usize) -> u32 {
        self.words[i]
    }
}

impl PackedRows for PackedRef<'_> {
    fn layout(&self) -> PackedLayout {
        self.layout
    }

    fn config(&self) -> CompressionConfig {
        self.config
    }

    #[inline]
    fn word(&self, i: usize) -> u32 {
        let b = &self.bytes[4 * i..4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// A packed tensor borrowed mutably where it is stored (a CPU-resident packed KV cache's home): a decode step's new
/// rows are quantised into its bytes in place, with no copy of the rest.
#[derive(Debug)]
pub struct PackedMut<'a> {
    layout: PackedLayout,
    config: CompressionConfig,
    bytes: &'a mut [u8],
}

impl<'a> PackedMut<'a> {
    /// The `[rows, cols]` tensor of `config` stored in `bytes`, which must be exactly its packed bytes.
    pub fn new(
        rows: usize,
        cols: usize,
        config: CompressionConfig,
        bytes: &'a mut [u8],
    ) -> Result<PackedMut<'a>, CompressError> {
        let layout = checked_bytes(rows, cols, config, bytes.len())?;
        Ok(PackedMut {
            layout,
            config,
            bytes,
        })
    }

    /// Quantises `values` (whole rows, row-major) into rows `first_row..` as [`PackedTensor::write_rows`] does.
    pub fn write_rows(&mut self, first_row: usize, values: &[f32]) -> Result<(), CompressError> {
        let count = rows_to_write(&self.layout, first_row, values)?;
        let l = self.layout;
        let (wpr, gpr) = (l.words_per_row, l.groups_per_row);
        let (mut data, mut scales) = (vec![0u32; wpr], vec![0u32; gpr]);
        for (i, row) in values.chunks(l.cols.max(1)).take(count).enumerate() {
            let r = first_row + i;
            quantize_row(row, self.config, &mut data, &mut scales)
                .map_err(|(col, value)| CompressError::Value { row: r, col, value })?;
            for (at, words) in [(r * wpr, &data), (l.scale_offset + r * gpr, &scales)] {
                let out = &mut self.bytes[4 * at..4 * (at + words.len())];
                for (o, w) in out.chunks_exact_mut(4).zip(words.iter()) {
                    o.copy_from_slice(&w.to_le_bytes());
                }
            }
        }
        Ok(())
    }
}

/// The layout of a `[rows, cols]` tensor of `config` whose packed bytes should be `len` long.
fn checked_bytes(
    rows: usize,
    cols: usize,
    config: CompressionConfig,
    len: usize,
) -> Result<PackedLayout, CompressError> {
    config.validate()?;
    let layout = PackedLayout::checked(rows, cols, config)?;
    if len as u64 != layout.bytes() {
        return Err(CompressError::Length {
            what: "packed bytes",
            expected: layout.bytes() as usize,
            found: len,
        });
    }
    Ok(layout)
}

/// How many whole rows `values` holds, checked to fit from `first_row` on.
fn rows_to_write(
    layout: &PackedLayout,
    first_row: usize,
    values: &[f32],
) -> Result<usize, CompressError> {
    let cols = layout.cols;
    if cols == 0 {
        return Ok(0);
    }
    if values.len() % cols != 0 {
        return Err(CompressError::Length {
            what: "rows to write",
            expected: values.len().next_multiple_of(cols),
            found: values.len(),
        });
    }
    let count = values.len() / cols;
    let end = first_row + count;
    if end > layout.rows {
        return Err(CompressError::Rows {
            start: first_row,
            end,
            rows: layout.rows,
        });
    }
    Ok(count)
}

/// Why a tensor could not be compressed, decompressed, saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// Bits or group size not supported.
    #[error("invalid compression config: {0}")]
    Config(String),
    /// A buffer's length does not match the shape it claims.
    #[error("{what}: expected {expected} elements for the given shape, found {found}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Length the shape implies.
        expected: usize,
        /// Length given.
        found: usize,
    },
    /// An element is NaN or infinite, or beyond what fp16 min/step can represent.
    #[error("element ({row}, {col}) = {value} cannot be compressed: values must be finite and within +-65504 (fp16)")]
    Value {
        /// Row of the element.
        row: usize,
        /// Column of the element.
        col: usize,
        /// Its value.
        value: f32,
    },
    /// A row range outside the tensor.
    #[error("rows {start}..{end} are outside a tensor of {rows} rows")]
    Rows {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows in the tensor.
        rows: usize,
    },
    /// A packed file or byte buffer that does not follow the format.
    #[error("packed checkpoint: {0}")]
    Format(String),
    /// An I/O error on a packed file.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A tensor in strata's packed format (see the module docs for the exact layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedTensor {
    layout: PackedLayout,
    config: CompressionConfig,
    words: Vec<u32>,
}

impl PackedTensor {
    /// A packed tensor whose every element decodes to 0 (all groups constant 0): an empty KV cache to write rows into.
    pub fn zeros(
        rows: usize,
        cols: usize,
        config: CompressionConfig,
    ) -> Result<PackedTensor, CompressError> {
        config.validate()?;
        let layout = PackedLayout::checked(rows, cols, config)?;
        Ok(PackedTensor {
            layout,
            config,
            words: vec![0; layout.total_words],
        })
    }

    /// Wraps words already in the packed layout (e.g. read back from a GPU buffer), checking their count.
    pub fn from_words(
        rows: usize,
        cols: usize,
        config: CompressionConfig,
        words: Vec<u32>,
    ) -> Result<PackedTensor, CompressError> {
        config.validate()?;
        let layout = PackedLayout::checked(rows, cols, config)?;
        if words.len() != layout.total_words {
            return Err(CompressError::Length {
                what: "packed words",
                expected: layout.total_words,
                found: words.len(),
            });
        }
        Ok(PackedTensor {
            layout,
            config,
            words,
        })
    }

    /// Reads the packed layout from little-endian bytes (a file region, a GPU readback).
    pub fn from_bytes(
        rows: usize,
        cols: usize,
        config: CompressionConfig,
        bytes: &[u8],
    ) -> Result<PackedTensor, CompressError> {
        if bytes.len() % 4 != 0 {
            return Err(CompressError::Format(format!(
                "{} bytes is not a whole number of 32-bit words",
                bytes.len()
            )));
        }
        let words = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::from_words(rows, cols, config, words)
    }

    /// The layout: section offsets and row strides, as the kernels' uniforms need them.
    pub fn layout(&self) -> PackedLayout {
        self.layout
    }

    /// Bits and group size.
    pub fn config(&self) -> CompressionConfig {
        self.config
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    /// Elements per row.
    pub fn cols(&self) -> usize {
        self.layout.cols
    }

    /// Every word, data then scales: what is uploaded to a GPU buffer or written to disk.
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// The data section.
    pub fn data_words(&self) -> &[u32] {
        &self.words[..self.layout.scale_offset]
    }

    /// The scale section (`step` low half, `min` high half, fp16 each).
    pub fn scale_words(&self) -> &[u32] {
        &self.words[self.layout.scale_offset..]
    }

    /// The packed words as bytes (little-endian on every platform strata runs on).
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.words)
    }

    /// Bytes of the packed tensor.
    pub fn byte_len(&self) -> u64 {
        self.layout.bytes()
    }

    /// `(step, min)` of group `g` of row `r`.
    pub fn group_params(&self, row: usize, group: usize) -> (f32, f32) {
        let word = self.words[self.layout.scale_offset + row * self.layout.groups_per_row + group];
        unpack_scale(word)
    }

    /// Rows `first_row..first_row + count` as a packed tensor of their own (same config), e.g. to split a tensor
    /// larger than one GPU binding; a GEMV over the block computes outputs `first_row..first_row + count`.
    pub fn row_block(&self, first_row: usize, count: usize) -> Result<PackedTensor, CompressError> {
        let end = first_row
            .checked_add(count)
            .filter(|&e| e <= self.layout.rows)
            .ok_or(CompressError::Rows {
                start: first_row,
                end: first_row.saturating_add(count),
                rows: self.layout.rows,
            })?;
        let (wpr, gpr) = (self.layout.words_per_row, self.layout.groups_per_row);
        let mut words = Vec::with_capacity(count * (wpr + gpr));
        words.extend_from_slice(&self.words[first_row * wpr..end * wpr]);
        let scales = &self.words[self.layout.scale_offset..];
        words.extend_from_slice(&scales[first_row * gpr..end * gpr]);
        PackedTensor::from_words(count, self.layout.cols, self.config, words)
    }

    /// Quantises `values` (`count` whole rows, row-major) into rows `first_row..first_row + count`, e.g. a
    /// decode step's new K or V rows appended to a packed cache.
    pub fn write_rows(&mut self, first_row: usize, values: &[f32]) -> Result<(), CompressError> {
        let count = rows_to_write(&self.layout, first_row, values)?;
        if count == 0 {
            return Ok(());
        }
        let (cols, end) = (self.layout.cols, first_row + count);
        let (wpr, gpr) = (self.layout.words_per_row, self.layout.groups_per_row);
        let (data, scales) = self.words.split_at_mut(self.layout.scale_offset);
        let config = self.config;
        data[first_row * wpr..end * wpr]
            .par_chunks_mut(wpr.max(1))
            .zip(scales[first_row * gpr..end * gpr].par_chunks_mut(gpr.max(1)))
            .zip(values.par_chunks(cols))
            .enumerate()
            .try_for_each(|(i, ((data, scales), row))| {
                quantize_row(row, config, data, scales).map_err(|(col, value)| {
                    CompressError::Value {
                        row: first_row + i,
                        col,
                        value,
                    }
                })
            })
    }

    /// Decodes rows `first_row..first_row + count` to f32, row-major.
    pub fn dequantize_rows(
        &self,
        first_row: usize,
        count: usize,
    ) -> Result<Vec<f32>, CompressError> {
        let end = first_row + count;
        if end > self.layout.rows {
            return Err(CompressError::Rows {
                start: first_row,
                end,
                rows: self.layout.rows,
            });
        }
        let cols = self.layout.cols;
        let mut out = vec![0f32; count * cols];
        if cols == 0 {
            return Ok(out);
        }
        out.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
            self.decode_row(first_row + i, row);
        });
        Ok(out)
    }
}

/// Compresses a row-major `[rows, cols]` f32 tensor, in parallel over rows. Works on one tensor at a time, so a
/// checkpoint can be converted tensor by tensor without holding the whole model.
pub fn quantize(
    values: &[f32],
    rows: usize,
    cols: usize,
    config: CompressionConfig,
) -> Result<PackedTensor, CompressError> {
    let expected = rows.checked_mul(cols).ok_or_else(|| {
        CompressError::Config(format!(
            "shape [{rows}, {cols}] overflows the address space"
        ))
    })?;
    if values.len() != expected {
        return Err(CompressError::Length {
            what: "tensor to quantize",
            expected,
            found: values.len(),
        });
    }
    let mut packed = PackedTensor::zeros(rows, cols, config)?;
    packed.write_rows(0, values)?;
    Ok(packed)
}

/// Decodes a whole packed tensor to a row-major f32 `[rows, cols]`.
pub fn dequantize(packed: &PackedTensor) -> Vec<f32> {
    packed
        .dequantize_rows(0, packed.rows())
        .expect("the full row range is always inside the tensor")
}

/// Compresses KV cache rows: `values` is `[n, head_dim]` row-major (one row per token and head, as FlexLLMGen's
/// `[seq, batch * heads, head_dim]` cache flattens), grouped along head_dim.
pub fn quantize_cache(
    values: &[f32],
    head_dim: usize,
    config: CompressionConfig,
) -> Result<PackedTensor, CompressError> {
    if head_dim == 0 || values.len() % head_dim != 0 {
        return Err(CompressError::Length {
            what: "cache rows (a multiple of head_dim)",
            expected: values.len().next_multiple_of(head_dim.max(1)),
            found: values.len(),
        });
    }
    quantize(values, values.len() / head_dim, head_dim, config)
}

/// Bytes of a packed KV cache: K and V of every layer, `batch * seq * heads` rows of head_dim per layer each.
pub const fn packed_cache_bytes(
    layers: usize,
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    config: CompressionConfig,
) -> u64 {
    2 * layers as u64 * packed_bytes(batch * seq * heads, head_dim, config)
}

fn unpack_scale(word: u32) -> (f32, f32) {
    (
        f16::from_bits(word as u16).to_f32(),
        f16::from_bits((word >> 16) as u16).to_f32(),
    )
}

/// Whether an fp16 is subnormal (some GPUs flush those to zero when unpacking, so none is ever stored).
fn is_subnormal(h: f16) -> bool {
    h.to_bits() & 0x7c00 == 0 && h.to_bits() & 0x03ff != 0
}

/// The largest normal (or zero) fp16 not above `x` (finite `x` within the fp16 range): a subnormal result becomes
/// 0 when positive and -2^-14 when negative.
fn f16_down(x: f32) -> f16 {
    let mut h = f16::from_f32(x);
    if h.to_f32() > x {
        h = f16_step(h, false);
    }
    if is_subnormal(h) {
        h = if h.is_sign_negative() {
            f16::from_bits(0x8400)
        } else {
            f16::ZERO
        };
    }
    h
}

/// The smallest normal fp16 not below `x` (positive `x` within the fp16 range): a subnormal result becomes 2^-14.
fn f16_up(x: f32) -> f16 {
    let mut h = f16::from_f32(x);
    if h.to_f32() < x {
        h = f16_step(h, true);
    }
    if is_subnormal(h) {
        h = f16::MIN_POSITIVE;
    }
    h
}

/// The fp16 next to `h` upwards or downwards (finite, not at the range's edge).
fn f16_step(h: f16, up: bool) -> f16 {
    let bits = h.to_bits();
    let magnitude = bits & 0x7fff;
    if magnitude == 0 {
        return f16::from_bits(if up { 0x0001 } else { 0x8001 });
    }
    // Moving away from zero grows the magnitude: up for positives, down for negatives.
    let grow = up == (bits & 0x8000 == 0);
    let magnitude = if grow { magnitude + 1 } else { magnitude - 1 };
    f16::from_bits((bits & 0x8000) | magnitude)
}

/// Quantises one row into its data words and scale words; an unrepresentable element is `Err((col, value))`.
fn quantize_row(
    row: &[f32],
    config: CompressionConfig,
    data: &mut [u32],
    scales: &mut [u32],
) -> Result<(), (usize, f32)> {
    if let Some((col, &value)) = row
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() && x.abs() <= F16_MAX))
    {
        return Err((col, value));
    }
    let vpw = config.values_per_word();
    let bits = config.bits as u32;
    let levels = config.max_level();
    let wpg = config.words_per_group();
    for ((group, words), scale) in row
        .chunks(config.group_size)
        .zip(data.chunks_mut(wpg))
        .zip(scales.iter_mut())
    {
        let (mn, mx) = group
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let min = f16_down(mn);
        let min_f = min.to_f32();
        let range = mx - min_f;
        let step = if range > 0.0 {
            f16_up(range / levels as f32)
        } else {
            f16::ZERO
        };
        let step_f = step.to_f32();
        *scale = step.to_bits() as u32 | (min.to_bits() as u32) << 16;
        words.fill(0);
        for (i, &x) in group.iter().enumerate() {
            let q = if step_f > 0.0 {
                ((x - min_f) / step_f).round().clamp(0.0, levels as f32) as u32
            } else {
                0
            };
            words[i / vpw] |= q << ((i % vpw) as u32 * bits);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_directed_rounding_brackets_the_value() {
        for x in [
            0.1f32,
            -0.1,
            1.0 / 3.0,
            -7.77,
            65504.0,
            -65504.0,
            6.2e-5,
            -6.2e-5,
        ] {
            let (d, u) = (f16_down(x).to_f32(), f16_up(x).to_f32());
            assert!(d <= x && x <= u, "{x}: {d} {u}");
            assert!(u - d <= x.abs() / 512.0, "{x}: {d} {u} are not neighbours");
        }
        // Never subnormal: tiny values round to zero or the smallest normal, still on the right side.
        let tiny = f16::MIN_POSITIVE.to_f32();
        for x in [1e-6f32, 3e-8, 0.0] {
            assert_eq!(f16_down(x).to_f32(), 0.0, "{x}");
            assert_eq!(f16_down(-x - 1e-9).to_f32(), -tiny, "{x}");
            assert_eq!(f16_up(x + 1e-9).to_f32(), tiny, "{x}");
        }
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_reason() {
        assert!(CompressionConfig::new(3, 64)
            .unwrap_err()
            .to_string()
            .contains("use 2, 4 or 8"));
        let err = CompressionConfig::new(4, 12).unwrap_err().to_string();
        assert!(err.contains("multiple of 8"), "{err}");
        assert!(CompressionConfig::new(8, 4).is_ok());
    }

    #[test]
    fn layout_matches_the_documented_formula() {
        let c = CompressionConfig::DEFAULT;
        let l = PackedLayout::new(3, 100, c);
        assert_eq!(
            (l.groups_per_row, l.words_per_group, l.words_per_row),
            (2, 8, 16)
        );
        assert_eq!(l.scale_offset, 48);
        assert_eq!(l.total_words, 54);
        assert_eq!(packed_bytes(3, 100, c), 4 * 3 * 2 * (64 * 4 / 32 + 1));
    }

    #[test]
    fn borrowed_packed_bytes_read_and_take_rows_as_an_owned_tensor_does() {
        let (rows, cols) = (6, 100);
        for config in [
            CompressionConfig::DEFAULT,
            CompressionConfig::new(8, 4).unwrap(),
        ] {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut owned = quantize(&values, rows, cols, config).unwrap();
            let mut bytes = owned.as_bytes().to_vec();
            // Two new rows written in place into the bytes, and into the owned tensor.
            let new: Vec<f32> = (0..2 * cols)
                .map(|i| (i as f32 * 0.37).sin() * 3.0)
                .collect();
            PackedMut::new(rows, cols, config, &mut bytes)
                .unwrap()
                .write_rows(3, &new)
                .unwrap();
            owned.write_rows(3, &new).unwrap();
            assert_eq!(bytes, owned.as_bytes(), "{config:?}");
            let borrowed = PackedRef::new(rows, cols, config, &bytes).unwrap();
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                PackedRows::decode_row(&borrowed, r, &mut a);
                PackedRows::decode_row(&owned, r, &mut b);
                assert_eq!(a, b, "{config:?}: row {r}");
            }
            // Bytes of another shape, and rows past the end, are refused.
            assert!(PackedRef::new(rows + 1, cols, config, &bytes).is_err());
            let mut short = bytes[4..].to_vec();
            assert!(PackedMut::new(rows, cols, config, &mut short).is_err());
            let mut packed = PackedMut::new(rows, cols, config, &mut bytes).unwrap();
            assert!(matches!(
                packed.write_rows(5, &new),
                Err(CompressError::Rows {
                    start: 5,
                    end: 7,
                    ..
                })
            ));
        }
    }
}
