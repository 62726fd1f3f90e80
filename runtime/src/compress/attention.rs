//! Decode attention over packed K/V caches on the CPU (the GPU version is `q4_attention.wgsl`).

use rayon::prelude::*;

use super::{unpack_scale, CompressError, PackedLayout, PackedRows};

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

    pub(super) fn check<P: PackedRows>(&self, k: &P, v: &P) -> Result<(), CompressError> {
        let (layout, rows) = (k.layout(), k.layout().rows);
        if layout != v.layout() || k.config() != v.config() {
            return Err(CompressError::Config(
                "K and V caches must have the same shape and config".into(),
            ));
        }
        if layout.cols != self.head_dim {
            return Err(CompressError::Config(format!(
                "cache rows have {} elements but head_dim is {}",
                layout.cols, self.head_dim
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
            if last >= rows {
                return Err(CompressError::Rows {
                    start: 0,
                    end: last + 1,
                    rows,
                });
            }
        }
        Ok(())
    }
}

/// Decode attention on the CPU over packed K/V caches, as `q4_attention.wgsl` computes it (FlexLLMGen's
/// cpu_cache_compute path, without unpacking the cache): `query` is `[batch * heads, head_dim]`, `mask`
/// `[batch, mask_stride]` (nonzero = attend) or `None`; returns `[batch * heads, head_dim]`, zeros for a fully
/// masked sequence. The caches are read where they are stored ([`PackedRows`]: owned, or borrowed bytes).
pub fn decode_attention<P: PackedRows>(
    query: &[f32],
    k: &P,
    v: &P,
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
    let bits = k.config().bits;
    out.par_chunks_mut(hd).enumerate().for_each(|(bh, out)| {
        let b = bh / shape.heads;
        let q = &query[bh * hd..(bh + 1) * hd];
        let rows = (0..shape.seq_len)
            .filter(|&t| mask.is_none_or(|(m, stride)| m[b * stride + t] != 0))
            .map(|t| t * shape.token_stride + bh * shape.bh_stride);
        // The bit width as a constant, so each word's values unpack in an unrolled loop.
        match bits {
            2 => attend_pair::<P, 2>(q, k, v, rows, scale, out),
            4 => attend_pair::<P, 4>(q, k, v, rows, scale, out),
            _ => attend_pair::<P, 8>(q, k, v, rows, scale, out),
        }
    });
    Ok(out)
}

/// One (sequence, head) pair's attention over the packed rows `rows` of `k` and `v` (`BITS` bits per value), into
/// `out`, reading the packed words directly: each group's scale once, each word's values unpacked in an unrolled
/// loop and used as `level * step + min` where they are read, with no row decoded to f32 first. The arithmetic and
/// its order are the GPU kernel's (`q4_attention.wgsl`), so both paths agree to rounding.
fn attend_pair<P: PackedRows, const BITS: u32>(
    q: &[f32],
    k: &P,
    v: &P,
    rows: impl Iterator<Item = usize>,
    scale: f32,
    out: &mut [f32],
) {
    let rows_of = RowWords::<BITS>::new(k.layout(), k.config().group_size);
    let group = rows_of.group;
    let mut weights: Vec<(usize, f32)> = rows
        .map(|row| {
            let mut s = 0.0;
            for (g, qg) in q.chunks(group).enumerate() {
                let (step, min, first) = rows_of.group(k, row, g);
                for (w, qw) in qg.chunks(RowWords::<BITS>::PER_WORD).enumerate() {
                    let word = k.word(first + w);
                    for (j, &x) in qw.iter().enumerate() {
                        s += x * (level::<BITS>(word, j) * step + min);
                    }
                }
            }
            (row, s * scale)
        })
        .collect();
    let Some(max) = weights.iter().map(|w| w.1).reduce(f32::max) else {
        return;
    };
    let mut total = 0.0;
    for w in &mut weights {
        w.1 = (w.1 - max).exp();
        total += w.1;
    }
    for &(row, w) in &weights {
        for (g, og) in out.chunks_mut(group).enumerate() {
            let (step, min, first) = rows_of.group(v, row, g);
            for (i, ow) in og.chunks_mut(RowWords::<BITS>::PER_WORD).enumerate() {
                let word = v.word(first + i);
                for (j, o) in ow.iter_mut().enumerate() {
                    *o += w * (level::<BITS>(word, j) * step + min);
                }
            }
        }
    }
    for o in out.iter_mut() {
        *o /= total;
    }
}

/// Where a packed row's groups lie, for values of `BITS` bits.
struct RowWords<const BITS: u32> {
    layout: PackedLayout,
    group: usize,
    words_per_group: usize,
}

impl<const BITS: u32> RowWords<BITS> {
    const PER_WORD: usize = 32 / BITS as usize;

    fn new(layout: PackedLayout, group: usize) -> Self {
        RowWords {
            layout,
            group,
            words_per_group: group / Self::PER_WORD,
        }
    }

    /// Group `g` of row `row`: its step, its min and the index of its first data word.
    #[inline(always)]
    fn group<P: PackedRows>(&self, p: &P, row: usize, g: usize) -> (f32, f32, usize) {
        let l = &self.layout;
        let (step, min) = unpack_scale(p.word(l.scale_offset + row * l.groups_per_row + g));
        (step, min, row * l.words_per_row + g * self.words_per_group)
    }
}

/// Value `j` of a data word.
#[inline(always)]
fn level<const BITS: u32>(word: u32, j: usize) -> f32 {
    ((word >> (j as u32 * BITS)) & ((1u32 << BITS) - 1)) as f32
}
