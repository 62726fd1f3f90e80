//! Decode attention on the CPU (`--cpu-cache-compute`): for a GPU batch whose KV cache lives wholly in CPU memory,
//! q, k and v are projected on the GPU and read back, the new k, v rows appended to the CPU homes, attention runs
//! here (rayon over sequence x head) and its output goes back up for the rest of the layer. Which batches do so is
//! the placement's rule ([`super::placement::BatchPlacement::cpu_attention`]); the block schedule runs the layer
//! ([`super::schedule`]).

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

/// Decode attention of one GPU batch on the CPU: `q` `[b, hidden]`, every sequence's keys and values
/// `[len, hidden]` (the new token last), `masks[i][t]` whether position t of sequence i is a real token.
///
/// `attn_sparsity` below 1 follows [`Recorder::sparse_attention`]'s rule: softmax over every visible key, output
/// from the new token and the [`crate::gpu::kernels::sparse_top_k`] highest-scoring earlier visible keys (equal
/// scores: the earlier position), weights not renormalised. At 1 every key counts.
pub fn cpu_attention(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    masks: &[&[u32]],
    n_head: usize,
    len: usize,
    attn_sparsity: f32,
) -> Vec<f32> {
    use rayon::prelude::*;
    let h = if keys.is_empty() {
        0
    } else {
        q.len() / keys.len()
    };
    let d = h / n_head.max(1);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(d.max(1))
        .enumerate()
        .for_each(|(idx, o)| {
            let (i, head) = (idx / n_head, idx % n_head);
            let qh = &q[i * h + head * d..i * h + head * d + d];
            let visible: Vec<usize> = (0..len).filter(|&t| masks[i][t] != 0).collect();
            let scores: Vec<f32> = visible
                .iter()
                .map(|&t| {
                    let kr = &keys[i][t * h + head * d..t * h + head * d + d];
                    qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f32 = weights.iter().sum();
            // Which visible keys contribute: all, or the new token (the last) and the top k before it.
            let mut keep = vec![true; visible.len()];
            let before = visible.iter().filter(|&&t| t + 1 < len).count();
            let top = crate::gpu::kernels::sparse_top_k(attn_sparsity, before);
            if top < before {
                let mut order: Vec<usize> = (0..before).collect();
                // Visible positions ascend, so on equal scores the stable sort keeps the earlier one first.
                // Adding 0 turns -0 into +0: zero scores tie whatever their sign, as in the kernel.
                order.sort_by(|&a, &b| (scores[b] + 0.0).total_cmp(&(scores[a] + 0.0)));
                keep[..before].fill(false);
                for &r in &order[..top] {
                    keep[r] = true;
                }
            }
            for ((&t, w), _) in visible
                .iter()
                .zip(&weights)
                .zip(&keep)
                .filter(|(_, &kept)| kept)
            {
                let vr = &values[i][t * h + head * d..t * h + head * d + d];
                for (acc, v) in o.iter_mut().zip(vr) {
                    *acc += w / total * v;
                }
            }
        });
    out
}

/// Cached values `bytes` (stored as `dtype`) as f32.
pub(crate) fn decode_cache_values(bytes: &[u8], dtype: CacheDtype) -> Vec<f32> {
    match dtype {
        CacheDtype::F32 => bytemuck::pod_collect_to_vec(bytes),
        CacheDtype::F16 => bytes
            .chunks_exact(2)
            .map(|p| half::f16::from_le_bytes([p[0], p[1]]).to_f32())
            .collect(),
    }
}

/// f32 values `bytes` in the cache's storage `dtype` (round to nearest, as the GPU's pack2x16float).
pub(crate) fn encode_cache_values(bytes: &[u8], dtype: CacheDtype) -> Vec<u8> {
    match dtype {
        CacheDtype::F32 => bytes.to_vec(),
        CacheDtype::F16 => bytes
            .chunks_exact(4)
            .flat_map(|v| {
                half::f16::from_f32(f32::from_le_bytes([v[0], v[1], v[2], v[3]])).to_le_bytes()
            })
            .collect(),
    }
}
