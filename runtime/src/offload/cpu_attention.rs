//! Decode attention on the CPU (`--cpu-cache-compute`): for a GPU batch whose KV cache lives wholly in CPU memory
//! (its homes in plain host memory, never a DMA buffer's mapping), q, k and v are projected on the GPU and come back
//! in one small readback, the new k, v rows are written into the homes as the cache stores them, attention runs here
//! over the stored bytes (rayon over sequence x head; a packed cache: [`crate::compress::decode_attention`] over
//! the packed rows) and its output goes back up for the rest of the layer. Which batches do so is
//! the placement's rule ([`super::placement::BatchPlacement::cpu_attention`]); the block schedule runs the layer
//! ([`super::schedule`]).

use half::slice::HalfFloatSliceExt;

use crate::gpu::kernels::CacheDtype;
use crate::tiers::GpuSlot;

/// GPU scratch of the CPU-attention layer path (decode: one row per sequence), made once per run from the run's
/// placement (slots of the GPU tier's pool).
#[derive(Debug)]
pub struct CpuAttn {
    pub(crate) norm: GpuSlot,
    pub(crate) q: GpuSlot,
    pub(crate) k: GpuSlot,
    pub(crate) v: GpuSlot,
    pub(crate) attn: GpuSlot,
    pub(crate) mid: GpuSlot,
    /// Each GPU batch's attention mask, `[batch, capacity]`: generate.rs writes it once per run, at prefill, so the
    /// first decode step reads it back and later ones reuse it.
    pub(crate) masks: Option<Vec<Vec<u32>>>,
}

impl CpuAttn {
    /// The scratch from its slots: layer-normed rows, q, k, v, the attention output (`[rows, hidden]` each) and
    /// fc1's output (`[rows, ffn]`).
    pub fn new(
        norm: GpuSlot,
        q: GpuSlot,
        k: GpuSlot,
        v: GpuSlot,
        attn: GpuSlot,
        mid: GpuSlot,
    ) -> CpuAttn {
        CpuAttn {
            norm,
            q,
            k,
            v,
            attn,
            mid,
            masks: None,
        }
    }
}

/// One sequence's cached keys and values, rows `[0, len)` as the cache stores them (`[len, hidden]` each, in the
/// cache's dtype, little-endian): the CPU attends over the stored bytes, never a converted copy of the cache.
#[derive(Clone, Copy, Debug)]
pub struct SeqRows<'a> {
    /// Keys.
    pub keys: &'a [u8],
    /// Values.
    pub values: &'a [u8],
}

/// Decode attention of one GPU batch on the CPU: `q` `[b, hidden]`, every sequence's cached keys and values (the new
/// token's row last) stored as `dtype`, `masks[i][t]` whether position t of sequence i is a real token.
///
/// Parallel over sequence x head (rayon); each task streams its head's slice of every row, converting a row at a time
/// into a small f32 buffer (half's slice conversion, F16C where the CPU has it), with dot products and the weighted
/// sum in loops the compiler vectorises, so a task reads each cached byte once and the whole call runs at DRAM speed.
///
/// `attn_sparsity` below 1 follows [`Recorder::sparse_attention`]'s rule: softmax over every visible key, output
/// from the new token and the [`crate::gpu::kernels::sparse_top_k`] highest-scoring earlier visible keys (equal
/// scores: the earlier position), weights not renormalised. At 1 every key counts.
///
/// [`Recorder::sparse_attention`]: crate::gpu::kernels::Recorder::sparse_attention
pub fn cpu_attention(
    q: &[f32],
    seqs: &[SeqRows],
    dtype: CacheDtype,
    masks: &[&[u32]],
    n_head: usize,
    len: usize,
    attn_sparsity: f32,
) -> Vec<f32> {
    use rayon::prelude::*;
    let h = if seqs.is_empty() {
        0
    } else {
        q.len() / seqs.len()
    };
    let d = h / n_head.max(1);
    let mut out = vec![0f32; q.len()];
    if d == 0 {
        return out;
    }
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d).enumerate().for_each_init(
        || HeadScratch::new(d),
        |s, (idx, o)| {
            let (i, head) = (idx / n_head, idx % n_head);
            let qh = &q[i * h + head * d..i * h + head * d + d];
            let seq = seqs[i];
            let at = |t: usize| t * h + head * d;
            s.visible.clear();
            s.visible
                .extend((0..len).filter(|&t| masks[i].get(t).is_some_and(|&m| m != 0)));
            s.scores.clear();
            for &t in &s.visible {
                let k = row_f32(seq.keys, dtype, at(t), &mut s.row);
                s.scores.push(dot(qh, k) * scale);
            }
            let m = s.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            s.weights.clear();
            s.weights.extend(s.scores.iter().map(|v| (v - m).exp()));
            let total: f32 = s.weights.iter().sum();
            // Which visible keys contribute: all, or the new token (the last) and the top k before it.
            let before = s.visible.iter().filter(|&&t| t + 1 < len).count();
            let top = crate::gpu::kernels::sparse_top_k(attn_sparsity, before);
            s.keep.clear();
            s.keep.resize(s.visible.len(), true);
            if top < before {
                s.order.clear();
                s.order.extend(0..before);
                let scores = &s.scores;
                // Visible positions ascend, so on equal scores the stable sort keeps the earlier one first.
                // Adding 0 turns -0 into +0: zero scores tie whatever their sign, as in the kernel.
                s.order
                    .sort_by(|&a, &b| (scores[b] + 0.0).total_cmp(&(scores[a] + 0.0)));
                s.keep[..before].fill(false);
                for &r in &s.order[..top] {
                    s.keep[r] = true;
                }
            }
            for (r, &t) in s.visible.iter().enumerate() {
                if !s.keep[r] {
                    continue;
                }
                let p = s.weights[r] / total;
                let v = row_f32(seq.values, dtype, at(t), &mut s.row);
                for (acc, x) in o.iter_mut().zip(v) {
                    *acc += p * x;
                }
            }
        },
    );
    out
}

/// Per-task buffers of [`cpu_attention`], reused across the (sequence, head) pairs a rayon thread runs.
struct HeadScratch {
    row: Vec<f32>,
    visible: Vec<usize>,
    scores: Vec<f32>,
    weights: Vec<f32>,
    keep: Vec<bool>,
    order: Vec<usize>,
}

impl HeadScratch {
    fn new(d: usize) -> HeadScratch {
        HeadScratch {
            row: vec![0.0; d],
            visible: Vec::new(),
            scores: Vec::new(),
            weights: Vec::new(),
            keep: Vec::new(),
            order: Vec::new(),
        }
    }
}

/// Values `[at, at + buf.len())` of cached `bytes` as f32: a view for an aligned f32 cache, else converted into `buf`
/// (half's slice conversion where the bytes are aligned halves).
fn row_f32<'b>(bytes: &'b [u8], dtype: CacheDtype, at: usize, buf: &'b mut [f32]) -> &'b [f32] {
    let n = buf.len();
    let raw = &bytes[at * dtype.bytes()..(at + n) * dtype.bytes()];
    match dtype {
        CacheDtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(raw) {
            Ok(values) if cfg!(target_endian = "little") => values,
            _ => {
                for (o, b) in buf.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                buf
            }
        },
        CacheDtype::F16 => {
            match bytemuck::try_cast_slice::<u8, half::f16>(raw) {
                Ok(halves) if cfg!(target_endian = "little") => halves.convert_to_f32_slice(buf),
                _ => {
                    for (o, b) in buf.iter_mut().zip(raw.chunks_exact(2)) {
                        *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            }
            buf
        }
    }
}

/// `a . b` in eight independent partial sums, which the compiler keeps in SIMD registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// f32 `values` into `out` in the cache's storage `dtype` (round to nearest, as the GPU's pack2x16float);
/// `out` holds exactly `values.len()` values.
pub(crate) fn encode_cache_row(values: &[f32], dtype: CacheDtype, out: &mut [u8]) {
    match dtype {
        CacheDtype::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        CacheDtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention of one (sequence, head) over f32 rows: the definition, for comparison.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[u32],
        h: usize,
        head: usize,
        d: usize,
    ) -> Vec<f64> {
        let len = mask.len();
        let scale = 1.0 / (d as f64).sqrt();
        let scores: Vec<Option<f64>> = (0..len)
            .map(|t| {
                (mask[t] != 0).then(|| {
                    (0..d)
                        .map(|e| f64::from(q[head * d + e]) * f64::from(k[t * h + head * d + e]))
                        .sum::<f64>()
                        * scale
                })
            })
            .collect();
        let m = scores
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().flatten().map(|s| (s - m).exp()).sum();
        (0..d)
            .map(|e| {
                (0..len)
                    .filter_map(|t| {
                        scores[t]
                            .map(|s| (s - m).exp() / total * f64::from(v[t * h + head * d + e]))
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn attends_over_stored_halves_and_floats_as_the_definition_does() {
        let (n_head, d, len, seqs) = (3, 20, 37, 2);
        let h = n_head * d;
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 211) as f32 / 105.0 - 1.0;
        // Values exact in f16, so both dtypes hold the same keys and values.
        let exact = |x: f32| half::f16::from_f32(x).to_f32();
        let keys: Vec<Vec<f32>> = (0..seqs)
            .map(|i| (0..len * h).map(|e| exact(value(e, 2 * i))).collect())
            .collect();
        let values: Vec<Vec<f32>> = (0..seqs)
            .map(|i| (0..len * h).map(|e| exact(value(e, 2 * i + 1))).collect())
            .collect();
        let q: Vec<f32> = (0..seqs * h).map(|e| value(e, 9)).collect();
        // The second sequence is left-padded by five tokens.
        let masks: Vec<Vec<u32>> = (0..seqs)
            .map(|i| (0..len).map(|t| u32::from(t >= 5 * i)).collect())
            .collect();
        let mask_refs: Vec<&[u32]> = masks.iter().map(Vec::as_slice).collect();
        for dtype in [CacheDtype::F32, CacheDtype::F16] {
            let stored = |rows: &[f32]| {
                let mut out = vec![0u8; rows.len() * dtype.bytes()];
                encode_cache_row(rows, dtype, &mut out);
                out
            };
            let (ks, vs): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (
                keys.iter().map(|r| stored(r)).collect(),
                values.iter().map(|r| stored(r)).collect(),
            );
            let rows: Vec<SeqRows> = ks
                .iter()
                .zip(&vs)
                .map(|(k, v)| SeqRows { keys: k, values: v })
                .collect();
            let out = cpu_attention(&q, &rows, dtype, &mask_refs, n_head, len, 1.0);
            for i in 0..seqs {
                for head in 0..n_head {
                    let want = naive(
                        &q[i * h..],
                        &keys[i],
                        &values[i],
                        masks[i].as_slice(),
                        h,
                        head,
                        d,
                    );
                    for (e, w) in want.iter().enumerate() {
                        let got = out[i * h + head * d + e];
                        assert!(
                            (f64::from(got) - w).abs() < 1e-5,
                            "{dtype:?} seq {i} head {head} [{e}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_misaligned_cache_reads_the_same_values() {
        let (n_head, d, len) = (2, 8, 5);
        let h = n_head * d;
        let values: Vec<f32> = (0..len * h).map(|i| (i % 11) as f32 * 0.25 - 1.0).collect();
        let q: Vec<f32> = (0..h).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        let mask = vec![1u32; len];
        for dtype in [CacheDtype::F32, CacheDtype::F16] {
            let mut bytes = vec![0u8; values.len() * dtype.bytes() + 1];
            encode_cache_row(&values, dtype, &mut bytes[1..]);
            let aligned = bytes[1..].to_vec();
            let run = |b: &[u8]| {
                cpu_attention(
                    &q,
                    &[SeqRows { keys: b, values: b }],
                    dtype,
                    &[&mask],
                    n_head,
                    len,
                    1.0,
                )
            };
            assert_eq!(run(&bytes[1..]), run(&aligned), "{dtype:?}");
        }
    }
}
