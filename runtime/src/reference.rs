//! A plain CPU implementation of OPT's forward pass in f32: the oracle the GPU kernels and the offloading runtime
//! are tested against. It runs one unpadded sequence at a time and recomputes the whole prefix for every token (no
//! KV cache), so it shares no code path with the GPU runtime. Slow; meant for tiny models.
//!
//! It stores values as the runtime does: keys and values as the KV cache holds them, and, with
//! [`ReferenceModel::with_act`], every activation the runtime writes to memory rounded to its activation dtype (sums
//! stay f64/f32, as the kernels accumulate in f32).

use std::collections::HashMap;

use crate::compress::{dequantize, quantize_cache, CompressError, CompressionConfig};
use crate::config::{Activation, OptConfig};
use crate::gpu::kernels::ActDtype;
use crate::gpu::tensor::to_f32;
use crate::weights::{
    model_tensors, LayerPart, LayerTensor, ModelTensor, Param, TensorId, WeightError, WeightSource,
};

/// `y[m, n] = sum_k x[m, k] * w[n, k]` (a linear layer without bias; `w` is `[n, k]`), accumulated in f64.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0; m * n];
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let wr = &w[c * k..(c + 1) * k];
            y[r * n + c] = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

/// Layer norm of each row of `x` (`width` wide), with an optional `(gamma, beta)`.
pub fn layer_norm(x: &[f32], width: usize, affine: Option<(&[f32], &[f32])>, eps: f32) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (i, &v) in row.iter().enumerate() {
            let mut n = (v as f64 - mean) * rstd;
            if let Some((g, b)) = affine {
                n = n * g[i] as f64 + b[i] as f64;
            }
            y.push(n as f32);
        }
    }
    y
}

/// erf in f64, to about 1e-12: the Maclaurin series for |x| < 3, else 1 - erfc(|x|) with erfc from its continued
/// fraction (accurate there, where the series would cancel badly).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...)))) evaluated from the tail backwards.
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// The exact GELU, `x/2 (1 + erf(x / sqrt 2))`.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// Causal attention for one sequence of `len` tokens: q, k, v are `[len, hidden]`; `visible[j]` says whether key j
/// is a real token. A query that sees no key yields zeros.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    hidden: usize,
    n_head: usize,
    visible: &[bool],
) -> Vec<f32> {
    let d = hidden / n_head;
    let scale = (d as f64).powf(-0.5);
    let mut out = vec![0.0; len * hidden];
    for h in 0..n_head {
        for i in 0..len {
            let qi = &q[i * hidden + h * d..i * hidden + (h + 1) * d];
            let scores: Vec<Option<f64>> = (0..len)
                .map(|j| {
                    (j <= i && visible[j]).then(|| {
                        let kj = &k[j * hidden + h * d..j * hidden + (h + 1) * d];
                        qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                })
                .collect();
            let max = scores
                .iter()
                .flatten()
                .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
            if total == 0.0 {
                continue;
            }
            for (j, s) in scores.iter().enumerate() {
                if let Some(s) = s {
                    let p = (s - max).exp() / total;
                    for e in 0..d {
                        out[i * hidden + h * d + e] +=
                            (p * v[j * hidden + h * d + e] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

/// [`attention`] with FlexLLMGen's top-k attention sparsity on the query rows from `dense_rows` on (the decode
/// steps; rows before it are the prompt, attended densely). For such a row i and head: the softmax is over every
/// visible key `j <= i`; the output sums the value rows of key i itself and of the `floor(sparsity * n)` (in f32)
/// highest-scoring of the n visible keys before it (equal scores, -0 = +0: the earlier position), each weighted by its
/// softmax probability, not renormalised. With sparsity 1 every key counts.
#[allow(clippy::too_many_arguments)] // attention's inputs plus the sparsity and where it starts
pub fn sparse_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    hidden: usize,
    n_head: usize,
    visible: &[bool],
    dense_rows: usize,
    sparsity: f32,
) -> Vec<f32> {
    let d = hidden / n_head;
    let scale = (d as f64).powf(-0.5);
    let mut out = vec![0.0; len * hidden];
    for h in 0..n_head {
        for i in 0..len {
            let qi = &q[i * hidden + h * d..i * hidden + (h + 1) * d];
            let score = |j: usize| {
                let kj = &k[j * hidden + h * d..j * hidden + (h + 1) * d];
                qi.iter()
                    .zip(kj)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale
            };
            let keys: Vec<(usize, f64)> = (0..=i)
                .filter(|&j| visible[j])
                .map(|j| (j, score(j)))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let max = keys.iter().fold(f64::NEG_INFINITY, |a, &(_, s)| a.max(s));
            let total: f64 = keys.iter().map(|&(_, s)| (s - max).exp()).sum();
            // The candidates, best first; ties keep position order (a stable sort over ascending positions).
            let mut earlier: Vec<(usize, f64)> =
                keys.iter().copied().filter(|&(j, _)| j < i).collect();
            let n = earlier.len();
            let top = if i < dense_rows {
                n
            } else {
                ((sparsity * n as f32).floor() as usize).min(n)
            };
            // Adding 0 turns -0 into +0: zero scores tie whatever their sign.
            earlier.sort_by(|a, b| (b.1 + 0.0).total_cmp(&(a.1 + 0.0)));
            let mut kept: Vec<(usize, f64)> = earlier[..top].to_vec();
            kept.extend(keys.iter().copied().filter(|&(j, _)| j == i));
            // Summed in position order, as attention() does.
            kept.sort_by_key(|&(j, _)| j);
            for (j, s) in kept {
                let p = (s - max).exp() / total;
                for e in 0..d {
                    out[i * hidden + h * d + e] += (p * v[j * hidden + h * d + e] as f64) as f32;
                }
            }
        }
    }
    out
}

/// What a packed KV cache does to keys or values (`[len, hidden]`): quantise, then decode.
type RoundTrip<'a> = &'a dyn Fn(&[f32]) -> Vec<f32>;

/// An OPT model's weights in f32 on the CPU.
#[derive(Debug)]
pub struct ReferenceModel {
    /// The architecture.
    pub config: OptConfig,
    /// How activations are stored between operations (f32 unless [`ReferenceModel::with_act`]).
    pub act: ActDtype,
    weights: HashMap<String, Vec<f32>>,
}

impl ReferenceModel {
    /// Reads every tensor of `source` into f32.
    pub fn new(source: &dyn WeightSource) -> Result<Self, WeightError> {
        let config = *source.config();
        let mut weights = HashMap::new();
        for spec in model_tensors(&config) {
            let t = source.load(&spec)?;
            weights.insert(spec.name.clone(), to_f32(t.dtype, &t.bytes));
        }
        Ok(ReferenceModel {
            config,
            act: ActDtype::F32,
            weights,
        })
    }

    /// The same model storing activations as `act` (a generator's [`crate::generate::Generator::act_dtype`]): each
    /// value the runtime writes to an activation buffer (embeddings, layer-norm outputs, projections, attention
    /// output, the residual stream after each add, the FFN's intermediate) is rounded to it; logits stay f32.
    pub fn with_act(self, act: ActDtype) -> Self {
        ReferenceModel { act, ..self }
    }

    /// `x` as an activation buffer holds it.
    fn stored(&self, mut x: Vec<f32>) -> Vec<f32> {
        if self.act == ActDtype::F16 {
            x.iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
        }
        x
    }

    /// Tensor `id`'s values (names come from the tensor table, like every other reader's).
    fn t(&self, id: TensorId) -> &[f32] {
        self.w(&id.name())
    }

    /// Tensor `param` of part `part` of decoder layer `layer`.
    fn layer_t(&self, layer: usize, part: LayerPart, param: Param) -> &[f32] {
        self.t(TensorId::Layer(layer, LayerTensor { part, param }))
    }

    fn w(&self, name: &str) -> &[f32] {
        // model_tensors lists every name this module asks for, so a miss is a bug in this file.
        self.weights
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("reference model has no {name}"))
    }

    fn linear(&self, x: &[f32], rows: usize, layer: usize, part: LayerPart) -> Vec<f32> {
        let [out_dim, in_dim] = part.shape(&self.config);
        let weight = self.layer_t(layer, part, Param::Weight);
        let mut y = matmul_t(x, rows, in_dim, weight, out_dim);
        if self.config.enable_bias {
            let b = self.layer_t(layer, part, Param::Bias);
            for row in y.chunks_exact_mut(out_dim) {
                row.iter_mut().zip(b).for_each(|(v, &bb)| *v += bb);
            }
        }
        y
    }

    /// Keys or values as the runtime's KV cache holds them: rounded to halves for an f16 model (see
    /// `CacheDtype::for_model`), unchanged otherwise.
    fn cached(&self, mut x: Vec<f32>) -> Vec<f32> {
        if crate::gpu::kernels::CacheDtype::for_model(&self.config).bytes() == 2 {
            x.iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
        }
        x
    }

    /// Layer norm with the affine `(weight, bias)` (when the config has one).
    fn norm(&self, x: &[f32], affine: [TensorId; 2]) -> Vec<f32> {
        let c = &self.config;
        let affine = c
            .layer_norm_elementwise_affine
            .then(|| (self.t(affine[0]), self.t(affine[1])));
        layer_norm(x, c.hidden_size, affine, c.layer_norm_eps)
    }

    /// Decoder layer `layer`'s norm `part`.
    fn layer_norm(&self, x: &[f32], layer: usize, part: LayerPart) -> Vec<f32> {
        let id = |param| TensorId::Layer(layer, LayerTensor { part, param });
        self.norm(x, [id(Param::Weight), id(Param::Bias)])
    }

    /// The next-token logits after `tokens` (one unpadded sequence).
    pub fn next_logits(&self, tokens: &[u32]) -> Vec<f32> {
        self.forward(tokens, tokens.len(), 1.0, None)
    }

    /// The next-token logits after `tokens` whose first `prompt_len` were the prompt, as a generator with
    /// `--attn-sparsity sparsity` computes them: the prompt's rows attend densely (prefill), every later row with
    /// [`sparse_attention`] (one decode step each).
    pub fn next_logits_sparse(&self, tokens: &[u32], prompt_len: usize, sparsity: f32) -> Vec<f32> {
        self.forward(tokens, prompt_len, sparsity, None)
    }

    /// The forward pass: rows from `dense_rows` on attend with `sparsity` (dense when it is 1) and, when `packed` is
    /// given, over keys and values passed through it (a packed cache's round trip); earlier rows attend densely
    /// over the f32 keys and values (a prefill).
    fn forward(
        &self,
        tokens: &[u32],
        dense_rows: usize,
        sparsity: f32,
        packed: Option<RoundTrip>,
    ) -> Vec<f32> {
        let c = &self.config;
        let (h, p, len) = (c.hidden_size, c.word_embed_proj_dim, tokens.len());
        let embed = self.t(TensorId::Model(ModelTensor::EmbedTokens));
        let mut e: Vec<f32> = self.stored(
            tokens
                .iter()
                .flat_map(|&t| embed[t as usize * p..(t as usize + 1) * p].iter().copied())
                .collect(),
        );
        if c.has_projection() {
            e = self.stored(matmul_t(
                &e,
                len,
                p,
                self.t(TensorId::Model(ModelTensor::ProjectIn)),
                h,
            ));
        }
        let pos = self.t(TensorId::Model(ModelTensor::EmbedPositions));
        let mut x: Vec<f32> = self.stored(
            e.chunks_exact(h)
                .enumerate()
                .flat_map(|(i, row)| {
                    row.iter()
                        .zip(&pos[(i + 2) * h..(i + 3) * h])
                        .map(|(a, b)| a + b)
                        .collect::<Vec<_>>()
                })
                .collect(),
        );
        let visible = vec![true; len];
        // The residual add of a linear layer's epilogue: `x + y`, stored.
        let add = |x: &mut Vec<f32>, y: &[f32]| {
            x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
            *x = self.stored(std::mem::take(x));
        };
        for l in 0..c.num_hidden_layers {
            let a_in = if c.do_layer_norm_before {
                self.stored(self.layer_norm(&x, l, LayerPart::SelfAttnLayerNorm))
            } else {
                x.clone()
            };
            let q = self.stored(self.linear(&a_in, len, l, LayerPart::QProj));
            let (mut k, mut v) = (
                self.stored(self.linear(&a_in, len, l, LayerPart::KProj)),
                self.stored(self.linear(&a_in, len, l, LayerPart::VProj)),
            );
            if packed.is_none() {
                // A dense cache holds them as the runtime stores them (a packed one: round_trip below).
                (k, v) = (self.cached(k), self.cached(v));
            }
            let attend = |k: &[f32], v: &[f32]| {
                if sparsity < 1.0 {
                    sparse_attention(&q, k, v, len, h, c.n_head, &visible, dense_rows, sparsity)
                } else {
                    attention(&q, k, v, len, h, c.n_head, &visible)
                }
            };
            let mut a = attend(&k, &v);
            if let (Some(round_trip), true) = (packed, len > dense_rows) {
                // Decoded values pass through the scratch as activations.
                let (k, v) = (self.stored(round_trip(&k)), self.stored(round_trip(&v)));
                let decoded = attend(&k, &v);
                a[dense_rows * h..].copy_from_slice(&decoded[dense_rows * h..]);
            }
            let a = self.stored(a);
            add(&mut x, &self.linear(&a, len, l, LayerPart::OutProj));
            if !c.do_layer_norm_before {
                x = self.stored(self.layer_norm(&x, l, LayerPart::SelfAttnLayerNorm));
            }
            let f_in = if c.do_layer_norm_before {
                self.stored(self.layer_norm(&x, l, LayerPart::FinalLayerNorm))
            } else {
                x.clone()
            };
            let mut mid = self.linear(&f_in, len, l, LayerPart::Fc1);
            for v in &mut mid {
                *v = match c.activation {
                    Activation::Relu => v.max(0.0),
                    Activation::Gelu => gelu(*v),
                };
            }
            let mid = self.stored(mid);
            add(&mut x, &self.linear(&mid, len, l, LayerPart::Fc2));
            if !c.do_layer_norm_before {
                x = self.stored(self.layer_norm(&x, l, LayerPart::FinalLayerNorm));
            }
        }
        let mut last = x[(len - 1) * h..].to_vec();
        if c.has_final_layer_norm() {
            last = self.stored(self.norm(
                &last,
                [
                    TensorId::Model(ModelTensor::FinalLayerNormWeight),
                    TensorId::Model(ModelTensor::FinalLayerNormBias),
                ],
            ));
        }
        if c.has_projection() {
            last = self.stored(matmul_t(
                &last,
                1,
                h,
                self.t(TensorId::Model(ModelTensor::ProjectOut)),
                p,
            ));
        }
        let head = if c.tie_word_embeddings {
            embed
        } else {
            self.t(TensorId::Model(ModelTensor::LmHead))
        };
        matmul_t(&last, 1, p, head, c.vocab_size)
    }

    /// The logits after each prefix `prompt + continuation[..t]`, for t in 0..=continuation.len() - 1: what a
    /// generator that produced `continuation` saw at each step.
    pub fn step_logits(&self, prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
        (0..continuation.len())
            .map(|t| {
                let mut tokens = prompt.to_vec();
                tokens.extend_from_slice(&continuation[..t]);
                self.next_logits(&tokens)
            })
            .collect()
    }

    /// [`ReferenceModel::step_logits_sparse`] with the KV cache packed under `cache` (`--compress-cache`): the prompt
    /// attends over f32 keys and values (a prefill computes before it packs), every generated token over keys and
    /// values quantised and decoded by [`crate::compress`]'s CPU functions (groups along head_dim).
    pub fn step_logits_packed_cache(
        &self,
        prompt: &[u32],
        continuation: &[u32],
        sparsity: f32,
        cache: CompressionConfig,
    ) -> Result<Vec<Vec<f32>>, CompressError> {
        let head_dim = self.config.head_dim();
        // Every later call quantises whole rows of head_dim: if one row works, all do.
        quantize_cache(&vec![0.0; head_dim], head_dim, cache)?;
        let round_trip = |values: &[f32]| {
            dequantize(&quantize_cache(values, head_dim, cache).expect("checked on one row above"))
        };
        Ok((0..continuation.len())
            .map(|t| {
                let mut tokens = prompt.to_vec();
                tokens.extend_from_slice(&continuation[..t]);
                self.forward(&tokens, prompt.len(), sparsity, Some(&round_trip))
            })
            .collect())
    }

    /// [`ReferenceModel::step_logits`] under `--attn-sparsity sparsity` ([`ReferenceModel::next_logits_sparse`]).
    pub fn step_logits_sparse(
        &self,
        prompt: &[u32],
        continuation: &[u32],
        sparsity: f32,
    ) -> Vec<Vec<f32>> {
        (0..continuation.len())
            .map(|t| {
                let mut tokens = prompt.to_vec();
                tokens.extend_from_slice(&continuation[..t]);
                self.next_logits_sparse(&tokens, prompt.len(), sparsity)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A fixed, irregular sequence in [-1, 1).
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / (1 << 23) as f32
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn sparse_attention_at_one_is_dense_attention() {
        let (len, hidden, heads) = (9, 12, 3);
        let (q, k, v) = (
            values(len * hidden, 1),
            values(len * hidden, 2),
            values(len * hidden, 3),
        );
        let visible: Vec<bool> = (0..len).map(|j| j != 2).collect();
        let dense = attention(&q, &k, &v, len, hidden, heads, &visible);
        let sparse = sparse_attention(&q, &k, &v, len, hidden, heads, &visible, 0, 1.0);
        assert_eq!(dense, sparse);
    }

    /// One head, head_dim 1: scores are q * k, so the kept keys are plain to see.
    #[test]
    fn sparse_attention_keeps_the_new_token_and_the_top_earlier_keys() {
        let scale = 1.0f64; // head_dim 1
        let k = [0.5f32, 2.0, -1.0, 2.0, 0.0, 1.0];
        let v = [1.0f32, 10.0, 100.0, 1000.0, 10_000.0, 100_000.0];
        let q = [1.0f32; 6];
        let visible = [true, true, true, false, true, true];
        // Row 5 (the last): candidates 0, 1, 2, 4 (3 is masked); 0.5 keeps floor(0.5 * 4) = 2: keys 1 (2.0) and
        // 0 (0.5); key 5 is the new token.
        let out = sparse_attention(&q, &k, &v, 6, 1, 1, &visible, 5, 0.5);
        let e = |s: f64| (s * scale).exp();
        let total = e(0.5) + e(2.0) + e(-1.0) + e(0.0) + e(1.0);
        let want = (e(0.5) * 1.0 + e(2.0) * 10.0 + e(1.0) * 100_000.0) / total;
        assert!(
            (out[5] as f64 - want).abs() < 1e-3 * want,
            "{} vs {want}",
            out[5]
        );
        // Rows before dense_rows are dense.
        let dense = attention(&q, &k, &v, 6, 1, 1, &visible);
        assert_eq!(out[..5], dense[..5]);
    }
}
