//! Group-wise low-bit compression of weights and KV cache (FlexLLMGen's 4-bit scheme, laid out for strata's kernels).
//!
//! A 2-D tensor `[rows, cols]` is cut, row by row, into groups of [`CompressionConfig::group_size`] consecutive
//! elements along `cols` (the contiguous axis: a linear weight's input features, a cache row's head_dim). Each group
//! stores its `min` and `step = (max - min) / (2^bits - 1)` (the reciprocal of FlexLLMGen's `scale`) as fp16 and each
//! element as `q = clamp(round((x - min) / step), 0, 2^bits - 1)`; it decodes as `x' = q * step + min`.
//! Compressed tensors stay compressed in every tier (GPU, CPU, disk) and move as one blob: the kernels in
//! `kernels/q4_*.wgsl` ([`GEMV_WGSL`], [`GEMM_WGSL`], [`DEQUANT_WGSL`], [`ATTENTION_WGSL`]) read the packed words
//! directly, and [`QUANTIZE_WGSL`] packs new cache rows on the GPU. Each kernel's header documents its bindings,
//! uniform (mirrored here by a `#[repr(C)]` params struct with its dispatch grid) and the `BITS` pipeline constant.
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
//! Why this layout: a GEMV workgroup owns a few output rows and its threads stride along the row's words, so
//! neighbouring threads read neighbouring words (coalesced); each word lies inside one group (`group_size` is a
//! multiple of `vpw`) and needs exactly one scale word; keeping data and scales in separate sections keeps every
//! group's data words contiguous and aligned (8 words, 32 bytes, at the default 4 bits / 64).
//!
//! `min` is rounded *down* and `step` *up* to fp16, so the stored grid always covers `[min, max]` and the error per
//! element is at most `step / 2`: `(max - min) / 30` at 4 bits, up to fp16 rounding of the group's min and step
//! (none when `min` is an fp16 value, as in an fp16 checkpoint, and `step` is too). A constant group stores
//! `step = 0` and decodes exactly to its (fp16) value. Stored values are never fp16 subnormals (some GPUs flush
//! them): a subnormal min becomes 0 or -2^-14 and a subnormal step 2^-14, still covering `[min, max]`.
//!
//! Which tensors are compressed ([`is_compressed`]): every 2-D tensor, as in FlexLLMGen (linear weights, the token
//! embedding, which is also the tied LM head, the positional table, project_in/out, an untied LM head). Biases and
//! layer norms stay at the model's dtype. The KV cache `[seq * batch * heads, head_dim]` is grouped along head_dim:
//! [`PackedTensor::write_rows`] (CPU) or `q4_quantize.wgsl` (GPU) append a decode step's rows, and
//! [`decode_attention`] (CPU) or `q4_attention.wgsl` (GPU) attend over the packed cache without unpacking it.
//!
//! # Files
//!
//! A packed checkpoint is a safetensors file: each packed tensor is a 1-D `U32` array of its words, dense tensors
//! are ordinary entries, and one metadata key `strata` holds the format name, [`FORMAT_VERSION`] and every packed
//! tensor's rows, cols, bits and group size. [`write_packed_model`] converts a [`WeightSource`] tensor by tensor;
//! [`PackedCheckpoint`] maps a file and lends packed tensors as bytes (the disk tier); [`to_packed_bytes`],
//! [`save_packed_file`], [`from_packed_bytes`] and [`load_packed_file`] handle in-memory sets of tensors. A tensor
//! larger than one GPU binding is split by rows with [`PackedTensor::row_block`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::f16;
use rayon::prelude::*;

use crate::config::DType;
use crate::weights::{model_tensors, HostTensor, TensorRole, WeightError, WeightSource};

/// WGSL of the packed GEMV (decode): see the file's header for bindings, uniform layout and dispatch grid.
pub const GEMV_WGSL: &str = include_str!("kernels/q4_gemv.wgsl");
/// WGSL of the packed tiled GEMM (prefill): see the file's header for bindings, uniform layout and dispatch grid.
pub const GEMM_WGSL: &str = include_str!("kernels/q4_gemm.wgsl");
/// WGSL that dequantises rows of a packed tensor (a range of cache rows, or gathered embedding rows by id).
pub const DEQUANT_WGSL: &str = include_str!("kernels/q4_dequant.wgsl");
/// WGSL that packs f32 rows on the GPU (new K/V rows into a packed cache), by the same rule as [`quantize`].
pub const QUANTIZE_WGSL: &str = include_str!("kernels/q4_quantize.wgsl");
/// WGSL of decode attention reading a packed K/V cache directly.
pub const ATTENTION_WGSL: &str = include_str!("kernels/q4_attention.wgsl");

/// Version of the packed layout and of the file format written by [`save_packed_file`].
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

/// Whether strata stores a tensor of this role compressed (every 2-D tensor; biases and layer norms never).
pub const fn is_compressed(role: TensorRole) -> bool {
    match role {
        TensorRole::TokenEmbedding | TensorRole::PositionEmbedding | TensorRole::LinearWeight => {
            true
        }
        TensorRole::Bias | TensorRole::LayerNorm => false,
    }
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
    /// The weight source could not provide a tensor.
    #[error(transparent)]
    Weight(#[from] WeightError),
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
        let cols = self.layout.cols;
        if cols == 0 {
            return Ok(());
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
        if end > self.layout.rows {
            return Err(CompressError::Rows {
                start: first_row,
                end,
                rows: self.layout.rows,
            });
        }
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

    fn decode_row(&self, r: usize, out: &mut [f32]) {
        let l = &self.layout;
        let vpw = self.config.values_per_word();
        let bits = self.config.bits as u32;
        let mask = self.config.max_level();
        let data = &self.words[r * l.words_per_row..(r + 1) * l.words_per_row];
        let scales = &self.words[l.scale_offset + r * l.groups_per_row..][..l.groups_per_row];
        for (w, chunk) in out.chunks_mut(vpw).enumerate() {
            let (step, min) = unpack_scale(scales[w / l.words_per_group]);
            let word = data[w];
            for (j, x) in chunk.iter_mut().enumerate() {
                let q = (word >> (j as u32 * bits)) & mask;
                *x = q as f32 * step + min;
            }
        }
    }
}

/// The uniform of `q4_gemv.wgsl` and `q4_gemm.wgsl` (48 bytes, `#[repr(C)]`, field order as in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    /// Output features (rows of the packed weight).
    pub rows: u32,
    /// Input features.
    pub cols: u32,
    /// Rows of x and y (decode tokens, or m of the GEMM).
    pub batch: u32,
    /// Data words per weight row.
    pub words_per_row: u32,
    /// Scale words per weight row.
    pub groups_per_row: u32,
    /// Data words per group.
    pub words_per_group: u32,
    /// Word index of the scale section.
    pub scale_offset: u32,
    /// 1 when binding 3 holds a bias to add, else 0.
    pub has_bias: u32,
    /// Elements between rows of x.
    pub x_stride: u32,
    /// Elements between rows of y.
    pub y_stride: u32,
    /// Padding to 16-byte alignment.
    pub pad: [u32; 2],
}

impl MatmulParams {
    /// The uniform for `batch` dense rows of x (`x_stride = cols`, `y_stride = rows`) times `layout`'s weight.
    /// `None` when a dimension does not fit the kernels' 32-bit indices.
    pub fn new(layout: &PackedLayout, batch: usize, has_bias: bool) -> Option<MatmulParams> {
        let u = |v: usize| u32::try_from(v).ok();
        u(layout.total_words)?;
        u(batch.checked_mul(layout.cols.max(layout.rows))?)?;
        Some(MatmulParams {
            rows: u(layout.rows)?,
            cols: u(layout.cols)?,
            batch: u(batch)?,
            words_per_row: u(layout.words_per_row)?,
            groups_per_row: u(layout.groups_per_row)?,
            words_per_group: u(layout.words_per_group)?,
            scale_offset: u(layout.scale_offset)?,
            has_bias: has_bias as u32,
            x_stride: u(layout.cols)?,
            y_stride: u(layout.rows)?,
            pad: [0; 2],
        })
    }

    /// Workgroups for `q4_gemv.wgsl`: `ceil(rows / 4)` spread over x and y (at most 65535 per dimension).
    pub fn gemv_grid(&self) -> (u32, u32, u32) {
        let n = self.rows.div_ceil(4);
        (n.clamp(1, 65535), n.div_ceil(65535).max(1), 1)
    }

    /// Workgroups for `q4_gemm.wgsl`: 64 x 64 output tiles.
    pub fn gemm_grid(&self) -> (u32, u32, u32) {
        (
            self.rows.div_ceil(64).max(1),
            self.batch.div_ceil(64).max(1),
            1,
        )
    }
}

/// The uniform of `q4_dequant.wgsl` (48 bytes, `#[repr(C)]`, field order as in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DequantParams {
    /// Rows to produce.
    pub out_rows: u32,
    /// Elements per row.
    pub cols: u32,
    /// Data words per packed row.
    pub words_per_row: u32,
    /// Scale words per packed row.
    pub groups_per_row: u32,
    /// Data words per group.
    pub words_per_group: u32,
    /// Word index of the scale section.
    pub scale_offset: u32,
    /// Source row of output row 0 when `use_ids` is 0.
    pub first_row: u32,
    /// 1: output row r decodes packed row `ids[r]` (ids must be below the tensor's rows); 0: a range of rows.
    pub use_ids: u32,
    /// Elements between output rows.
    pub out_stride: u32,
    /// Padding to 16-byte alignment.
    pub pad: [u32; 3],
}

impl DequantParams {
    /// The uniform for decoding `out_rows` rows of `layout`, from `first_row` on, or by id when `first_row` is
    /// `None`. `None` when the range leaves the tensor or a dimension does not fit 32-bit indices.
    pub fn new(
        layout: &PackedLayout,
        out_rows: usize,
        first_row: Option<usize>,
    ) -> Option<DequantParams> {
        let u = |v: usize| u32::try_from(v).ok();
        u(layout.total_words)?;
        u(out_rows.checked_mul(layout.cols)?)?;
        if let Some(first) = first_row {
            if first.checked_add(out_rows)? > layout.rows {
                return None;
            }
        }
        Some(DequantParams {
            out_rows: u(out_rows)?,
            cols: u(layout.cols)?,
            words_per_row: u(layout.words_per_row)?,
            groups_per_row: u(layout.groups_per_row)?,
            words_per_group: u(layout.words_per_group)?,
            scale_offset: u(layout.scale_offset)?,
            first_row: u(first_row.unwrap_or(0))?,
            use_ids: first_row.is_none() as u32,
            out_stride: u(layout.cols)?,
            pad: [0; 3],
        })
    }

    /// Workgroups for `q4_dequant.wgsl`: one thread per data word of each output row.
    pub fn grid(&self, config: CompressionConfig) -> (u32, u32, u32) {
        let words = self.cols.div_ceil(config.values_per_word() as u32);
        (words.div_ceil(64).max(1), self.out_rows.max(1), 1)
    }
}

/// The uniform of `q4_quantize.wgsl` (48 bytes, `#[repr(C)]`, field order as in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct QuantizeParams {
    /// Input rows to pack.
    pub rows: u32,
    /// Elements per row.
    pub cols: u32,
    /// Data words per packed row.
    pub words_per_row: u32,
    /// Scale words per packed row.
    pub groups_per_row: u32,
    /// Data words per group.
    pub words_per_group: u32,
    /// Elements per group.
    pub group_size: u32,
    /// Word index of the scale section.
    pub scale_offset: u32,
    /// Packed row receiving input row 0.
    pub first_row: u32,
    /// Packed rows between consecutive input rows.
    pub row_stride: u32,
    /// Elements between input rows.
    pub in_stride: u32,
    /// Padding to 16-byte alignment.
    pub pad: [u32; 2],
}

impl QuantizeParams {
    /// The uniform for packing `rows` dense input rows into packed rows `first_row + r * row_stride` of a tensor
    /// with `layout` and `config`; `None` when a destination row is outside the tensor or an index overflows u32.
    pub fn new(
        layout: &PackedLayout,
        config: CompressionConfig,
        rows: usize,
        first_row: usize,
        row_stride: usize,
    ) -> Option<QuantizeParams> {
        let u = |v: usize| u32::try_from(v).ok();
        u(layout.total_words)?;
        u(rows.checked_mul(layout.cols)?)?;
        if rows > 0 && first_row.checked_add((rows - 1).checked_mul(row_stride)?)? >= layout.rows {
            return None;
        }
        Some(QuantizeParams {
            rows: u(rows)?,
            cols: u(layout.cols)?,
            words_per_row: u(layout.words_per_row)?,
            groups_per_row: u(layout.groups_per_row)?,
            words_per_group: u(layout.words_per_group)?,
            group_size: u(config.group_size)?,
            scale_offset: u(layout.scale_offset)?,
            first_row: u(first_row)?,
            row_stride: u(row_stride)?,
            in_stride: u(layout.cols)?,
            pad: [0; 2],
        })
    }

    /// Workgroups for `q4_quantize.wgsl`: one thread per group of each input row.
    pub fn grid(&self) -> (u32, u32, u32) {
        (self.groups_per_row.div_ceil(64).max(1), self.rows.max(1), 1)
    }
}

/// Where decode attention finds its cache rows: `batch * heads` (sequence, head) pairs, each with `seq_len`
/// cached positions; position `t` of pair `bh` is cache row `t * token_stride + bh * bh_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Heads per sequence.
    pub heads: usize,
    /// Elements per head (the cache's columns).
    pub head_dim: usize,
    /// Positions attended over.
    pub seq_len: usize,
    /// Cache rows between consecutive positions of one pair (`batch * heads` in FlexLLMGen's layout).
    pub token_stride: usize,
    /// Cache rows between consecutive pairs at one position (1 in FlexLLMGen's layout).
    pub bh_stride: usize,
}

impl AttentionShape {
    /// FlexLLMGen's cache layout `[seq, batch * heads, head_dim]`.
    pub fn flexllmgen(
        batch: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
    ) -> AttentionShape {
        AttentionShape {
            batch,
            heads,
            head_dim,
            seq_len,
            token_stride: batch * heads,
            bh_stride: 1,
        }
    }

    fn check(&self, k: &PackedTensor, v: &PackedTensor) -> Result<(), CompressError> {
        if k.layout != v.layout || k.config != v.config {
            return Err(CompressError::Config(
                "K and V caches must have the same shape and config".into(),
            ));
        }
        if k.cols() != self.head_dim {
            return Err(CompressError::Config(format!(
                "cache rows have {} elements but head_dim is {}",
                k.cols(),
                self.head_dim
            )));
        }
        let overflow = || CompressError::Config(format!("attention shape {self:?} overflows"));
        let pairs = self.batch.checked_mul(self.heads).ok_or_else(overflow)?;
        pairs
            .checked_mul(self.seq_len.max(self.head_dim))
            .ok_or_else(overflow)?;
        if pairs > 0 && self.seq_len > 0 {
            let last = (self.seq_len - 1)
                .checked_mul(self.token_stride)
                .zip((pairs - 1).checked_mul(self.bh_stride))
                .and_then(|(a, b)| a.checked_add(b))
                .ok_or_else(overflow)?;
            if last >= k.rows() {
                return Err(CompressError::Rows {
                    start: 0,
                    end: last + 1,
                    rows: k.rows(),
                });
            }
        }
        Ok(())
    }
}

/// The uniform of `q4_attention.wgsl` (64 bytes, `#[repr(C)]`, field order as in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    /// (sequence, head) pairs.
    pub batch_heads: u32,
    /// Heads per sequence.
    pub heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Positions attended over.
    pub seq_len: u32,
    /// Cache rows between consecutive positions of one pair.
    pub token_stride: u32,
    /// Cache rows between consecutive pairs at one position.
    pub bh_stride: u32,
    /// Data words per cache row.
    pub words_per_row: u32,
    /// Scale words per cache row.
    pub groups_per_row: u32,
    /// Data words per group.
    pub words_per_group: u32,
    /// Word index of the scale section.
    pub scale_offset: u32,
    /// 1 when binding 4 holds a mask.
    pub has_mask: u32,
    /// Mask elements between sequences.
    pub mask_stride: u32,
    /// Score multiplier.
    pub scale: f32,
    /// Padding to 16-byte alignment.
    pub pad: [u32; 3],
}

impl AttentionParams {
    /// The uniform for `shape` over caches `k` and `v`, with a mask of `mask_stride` entries per sequence (`None`:
    /// attend to every position). Checks that every addressed row is inside the caches and head_dim <= 256.
    pub fn new(
        shape: &AttentionShape,
        k: &PackedTensor,
        v: &PackedTensor,
        mask_stride: Option<usize>,
        scale: f32,
    ) -> Result<AttentionParams, CompressError> {
        shape.check(k, v)?;
        if shape.head_dim == 0 || shape.head_dim > 256 {
            return Err(CompressError::Config(format!(
                "q4_attention supports head_dim 1..=256, not {}",
                shape.head_dim
            )));
        }
        let l = k.layout;
        let too_big = || CompressError::Config("attention shape overflows 32-bit indices".into());
        let u = |v: usize| u32::try_from(v).map_err(|_| too_big());
        u(l.total_words)?;
        u(shape.batch * shape.heads * shape.seq_len.max(shape.head_dim))?;
        Ok(AttentionParams {
            batch_heads: u(shape.batch * shape.heads)?,
            heads: u(shape.heads)?,
            head_dim: u(shape.head_dim)?,
            seq_len: u(shape.seq_len)?,
            token_stride: u(shape.token_stride)?,
            bh_stride: u(shape.bh_stride)?,
            words_per_row: u(l.words_per_row)?,
            groups_per_row: u(l.groups_per_row)?,
            words_per_group: u(l.words_per_group)?,
            scale_offset: u(l.scale_offset)?,
            has_mask: mask_stride.is_some() as u32,
            mask_stride: u(mask_stride.unwrap_or(0))?,
            scale,
            pad: [0; 3],
        })
    }

    /// Workgroups: one per (sequence, head) pair, spread over x and y.
    pub fn grid(&self) -> (u32, u32, u32) {
        let n = self.batch_heads;
        (n.clamp(1, 65535), n.div_ceil(65535).max(1), 1)
    }
}

/// Decode attention on the CPU over packed K/V caches, as `q4_attention.wgsl` computes it (FlexLLMGen's
/// cpu_cache_compute path, without unpacking the cache): `query` is `[batch * heads, head_dim]`, `mask`
/// `[batch, mask_stride]` (nonzero = attend) or `None`; returns `[batch * heads, head_dim]`, zeros for a fully
/// masked sequence.
pub fn decode_attention(
    query: &[f32],
    k: &PackedTensor,
    v: &PackedTensor,
    shape: &AttentionShape,
    mask: Option<(&[u32], usize)>,
    scale: f32,
) -> Result<Vec<f32>, CompressError> {
    shape.check(k, v)?;
    let (hd, pairs) = (shape.head_dim, shape.batch * shape.heads);
    if query.len() != pairs * hd {
        return Err(CompressError::Length {
            what: "attention query",
            expected: pairs * hd,
            found: query.len(),
        });
    }
    if let Some((mask, stride)) = mask {
        let need = if shape.batch == 0 {
            0
        } else {
            (shape.batch - 1) * stride + shape.seq_len
        };
        if mask.len() < need || stride < shape.seq_len {
            return Err(CompressError::Length {
                what: "attention mask",
                expected: need.max(shape.batch * shape.seq_len),
                found: mask.len(),
            });
        }
    }
    let mut out = vec![0f32; pairs * hd];
    if hd == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(hd).enumerate().for_each(|(bh, out)| {
        let b = bh / shape.heads;
        let q = &query[bh * hd..(bh + 1) * hd];
        let mut key = vec![0f32; hd];
        let mut weights = Vec::with_capacity(shape.seq_len);
        for t in 0..shape.seq_len {
            let attend = mask.is_none_or(|(m, stride)| m[b * stride + t] != 0);
            if attend {
                let row = t * shape.token_stride + bh * shape.bh_stride;
                k.decode_row(row, &mut key);
                let s: f32 = q.iter().zip(&key).map(|(a, b)| a * b).sum();
                weights.push((row, s * scale));
            }
        }
        let Some(max) = weights.iter().map(|w| w.1).reduce(f32::max) else {
            return;
        };
        let mut total = 0.0;
        for w in &mut weights {
            w.1 = (w.1 - max).exp();
            total += w.1;
        }
        let mut value = vec![0f32; hd];
        for &(row, w) in &weights {
            v.decode_row(row, &mut value);
            for (o, x) in out.iter_mut().zip(&value) {
                *o += w * x;
            }
        }
        for o in out.iter_mut() {
            *o /= total;
        }
    });
    Ok(out)
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

/// FlexLLMGen's own scheme, for comparison: groups of `group_size` along dim 0 (down a column of a `[out, in]`
/// weight), fp16 `scale = (2^bits - 1) / (max - min)` and `min` rounded to nearest, values packed `8 / bits` to a
/// byte in group order. Decodes as `q / scale + min`.
#[derive(Clone, Debug, PartialEq)]
pub struct FlexPacked {
    /// Rows of the original tensor.
    pub rows: usize,
    /// Columns of the original tensor.
    pub cols: usize,
    /// Bits and group size used.
    pub config: CompressionConfig,
    /// Quantised values: group `(g, c)` (rows `g * group_size..`, column `c`) at element `(g * cols + c) *
    /// group_size + i`, `8 / bits` elements per byte, low bits first.
    pub data: Vec<u8>,
    /// `(scale, min)` per group `(g, c)` at index `g * cols + c`.
    pub scales: Vec<(f16, f16)>,
}

/// Compresses `[rows, cols]` the way FlexLLMGen does for weights (groups along dim 0; rows padded to a whole group).
pub fn flexllmgen_quantize(
    values: &[f32],
    rows: usize,
    cols: usize,
    config: CompressionConfig,
) -> Result<FlexPacked, CompressError> {
    config.validate()?;
    if values.len() != rows * cols {
        return Err(CompressError::Length {
            what: "tensor to quantize",
            expected: rows * cols,
            found: values.len(),
        });
    }
    if let Some(i) = values
        .iter()
        .position(|x| !(x.is_finite() && x.abs() <= F16_MAX))
    {
        return Err(CompressError::Value {
            row: i / cols,
            col: i % cols,
            value: values[i],
        });
    }
    let g = config.group_size;
    let groups = rows.div_ceil(g);
    let per_byte = 8 / config.bits as usize;
    let levels = config.max_level() as f32;
    let bytes_per_group = g.div_ceil(per_byte);
    let mut data = vec![0u8; groups * cols * bytes_per_group];
    let mut scales = vec![(f16::ZERO, f16::ZERO); groups * cols];
    data.par_chunks_mut(bytes_per_group)
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each(|(index, (bytes, scale))| {
            let (gi, c) = (index / cols, index % cols);
            let members = (gi * g..((gi + 1) * g).min(rows)).map(|r| values[r * cols + c]);
            let (mn, mx) = members
                .clone()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
                    (a.min(x), b.max(x))
                });
            let min = f16::from_f32(mn);
            let s = f16::from_f32(levels / (mx - mn));
            *scale = (s, min);
            let (s, min) = (s.to_f32(), min.to_f32());
            for (i, x) in members.enumerate() {
                // An infinite scale (a constant group) stores 0 and decodes to min.
                let q = if s.is_finite() {
                    ((x - min) * s).round().clamp(0.0, levels) as u8
                } else {
                    0
                };
                bytes[i / per_byte] |= q << ((i % per_byte) * config.bits as usize);
            }
        });
    Ok(FlexPacked {
        rows,
        cols,
        config,
        data,
        scales,
    })
}

/// Decodes [`flexllmgen_quantize`]'s output to a row-major f32 `[rows, cols]`.
pub fn flexllmgen_dequantize(packed: &FlexPacked) -> Vec<f32> {
    let (rows, cols) = (packed.rows, packed.cols);
    let g = packed.config.group_size;
    let bits = packed.config.bits as usize;
    let per_byte = 8 / bits;
    let mask = packed.config.max_level() as u8;
    let bytes_per_group = g.div_ceil(per_byte);
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (gi, i) = (r / g, r % g);
            for (c, x) in row.iter_mut().enumerate() {
                let index = gi * cols + c;
                let (s, min) = packed.scales[index];
                let (s, min) = (s.to_f32(), min.to_f32());
                let byte = packed.data[index * bytes_per_group + i / per_byte];
                let q = (byte >> ((i % per_byte) * bits)) & mask;
                *x = if s.is_finite() {
                    q as f32 / s + min
                } else {
                    min
                };
            }
        });
    out
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
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let view = match tensor {
            StoredTensor::Packed(p) => {
                let meta = PackedMeta {
                    rows: p.rows(),
                    cols: p.cols(),
                    bits: p.config.bits,
                    group_size: p.config.group_size,
                };
                if header.packed.insert(name.clone(), meta).is_some() {
                    return Err(CompressError::Format(format!(
                        "tensor `{name}` appears twice"
                    )));
                }
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::U32,
                    vec![p.words.len()],
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
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
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
/// tensor ([`is_compressed`]) is loaded, converted to f32, packed and written before the next is read, so peak
/// memory is about one tensor in f32, never the whole model. Biases and layer norms are copied at their stored
/// dtype. The file is written beside `path` and renamed into place when complete. Returns the file's size.
pub fn write_packed_model(
    path: &Path,
    source: &dyn WeightSource,
    config: CompressionConfig,
) -> Result<u64, CompressError> {
    use std::io::Write;
    config.validate()?;
    let specs = model_tensors(source.config());
    let io = |source: std::io::Error| CompressError::Io {
        path: path.display().to_string(),
        source,
    };
    // The header needs every tensor's offsets before any data: packed sizes follow from the shapes, dense sizes
    // from the dtype the source stores, which the first load of each dense tensor confirms.
    let dense_dtype = source.config().dtype;
    let mut header = serde_json::Map::new();
    let mut packed_meta = BTreeMap::new();
    let mut offset = 0u64;
    for spec in &specs {
        let (dtype, shape, bytes) = if is_compressed(spec.role) {
            let [rows, cols] = spec.shape[..] else {
                return Err(CompressError::Format(format!(
                    "`{}` is not 2-D: {:?}",
                    spec.name, spec.shape
                )));
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
        header.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let file_header = FileHeader {
        format: FORMAT_NAME.to_owned(),
        format_version: FORMAT_VERSION,
        packed: packed_meta,
    };
    let meta =
        serde_json::to_string(&file_header).map_err(|e| CompressError::Format(e.to_string()))?;
    header.insert(
        "__metadata__".to_owned(),
        serde_json::json!({ META_KEY: meta }),
    );
    let mut json = serde_json::to_vec(&header).map_err(|e| CompressError::Format(e.to_string()))?;
    // safetensors aligns the data section to 8 bytes by padding the header with spaces.
    json.resize(json.len().next_multiple_of(8), b' ');

    let partial = path.with_extension("partial");
    let write = || -> Result<(), CompressError> {
        let file = std::fs::File::create(&partial).map_err(io)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&json).map_err(io)?;
        for spec in &specs {
            let tensor = source.load(spec)?;
            if is_compressed(spec.role) {
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
                    )));
                }
                out.write_all(&tensor.bytes).map_err(io)?;
            }
        }
        out.flush().map_err(io)?;
        drop(out);
        std::fs::rename(&partial, path).map_err(io)
    };
    if let Err(e) = write() {
        // Best effort: a half-written file must not be mistaken for a checkpoint.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(8 + json.len() as u64 + offset)
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

/// A packed tensor borrowed from a [`PackedCheckpoint`].
#[derive(Clone, Copy, Debug)]
pub struct PackedRef<'a> {
    /// Its layout.
    pub layout: PackedLayout,
    /// Bits and group size.
    pub config: CompressionConfig,
    /// The packed words' bytes, as in [`PackedTensor::as_bytes`].
    pub bytes: &'a [u8],
}

impl PackedCheckpoint {
    /// Opens and validates the header of a file written by [`save_packed_file`] or [`write_packed_model`].
    pub fn open(path: &Path) -> Result<PackedCheckpoint, CompressError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| CompressError::Io {
            path: shown.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; like every checkpoint reader, strata assumes nobody truncates the file
        // while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| CompressError::Io {
            path: shown.clone(),
            source,
        })?;
        let bad = |reason: String| CompressError::Format(format!("{shown}: {reason}"));
        let (n, metadata) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
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
}
