//! FlexLLMGen's own compression scheme (groups down the columns of a weight), kept for comparison.

use half::f16;
use rayon::prelude::*;

use super::{CompressError, CompressionConfig, F16_MAX};

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
