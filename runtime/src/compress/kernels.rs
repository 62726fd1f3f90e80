//! The packed KV cache's WGSL kernels (q4_dequant, q4_quantize, q4_attention) and their `#[repr(C)]` uniforms,
//! mirroring each WGSL `Params` struct, with their dispatch grids. Packed weights are read by the linear kernels
//! themselves (`gpu/kernels/weights_packed.wgsl`).
//!
//! Like every kernel that touches activations, each source follows the activation part in its module
//! ([`crate::gpu::kernels::ActDtype::wgsl`]: the rows they read and write are `act`, f32 or f16).

use super::{AttentionShape, CompressError, CompressionConfig, PackedLayout, PackedTensor};

/// WGSL that dequantises rows of a packed tensor (a range of cache rows, or gathered embedding rows by id).
pub const DEQUANT_WGSL: &str = include_str!("../gpu/kernels/q4_dequant.wgsl");
/// WGSL that packs rows of activations on the GPU (new K/V rows into a packed cache), by the same rule as [`quantize`](super::quantize).
pub const QUANTIZE_WGSL: &str = include_str!("../gpu/kernels/q4_quantize.wgsl");
/// WGSL of decode attention reading a packed K/V cache directly.
pub const ATTENTION_WGSL: &str = include_str!("../gpu/kernels/q4_attention.wgsl");

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
