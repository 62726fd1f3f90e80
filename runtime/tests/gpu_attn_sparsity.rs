//! Top-k sparse decode attention (`--attn-sparsity`): the GPU kernel and the CPU path of `--cpu-cache-compute`
//! against the reference's `sparse_attention`, with left padding, ties, k = 0, k = 1 and k = every candidate.

mod common;

use common::{encode, gpu, max_abs_diff, round_to, Rng};
use strata_runtime::config::DType;
use strata_runtime::gpu::kernels::{
    sparse_top_k, ActDtype, AttentionShape, CacheDtype, CacheDtype::F32, KernelOptions, Kernels,
};
use strata_runtime::gpu::Gpu;
use strata_runtime::offload::cpu_attention::{cpu_attention, SeqRows};
use strata_runtime::reference;

/// One decode step's inputs: `batch` sequences whose new token sits at row `past` of caches of `capacity` rows.
struct Case {
    hidden: usize,
    n_head: usize,
    past: usize,
    capacity: usize,
    /// Padding rows at the front of each sequence.
    pads: Vec<usize>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<u32>,
}

impl Case {
    /// Random q, k, v; padded rows and rows after the new token hold NaN, which no path may read.
    fn random(hidden: usize, n_head: usize, past: usize, pads: &[usize], seed: u64) -> Case {
        let batch = pads.len();
        let capacity = past + 3;
        let mut rng = Rng(seed);
        let q = rng.vec(batch * hidden, 1.5);
        let mut k = rng.vec(batch * capacity * hidden, 1.5);
        let mut v = rng.vec(batch * capacity * hidden, 1.0);
        let mut mask = vec![1u32; batch * capacity];
        for (b, &pad) in pads.iter().enumerate() {
            mask[b * capacity..b * capacity + pad].fill(0);
            for t in (0..pad).chain(past + 1..capacity) {
                let row = (b * capacity + t) * hidden;
                k[row..row + hidden].fill(f32::NAN);
                v[row..row + hidden].fill(f32::NAN);
            }
        }
        Case {
            hidden,
            n_head,
            past,
            capacity,
            pads: pads.to_vec(),
            q,
            k,
            v,
            mask,
        }
    }

    fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Rows `0..=past` of sequence `b` of a cache.
    fn rows(&self, cache: &[f32], b: usize) -> Vec<f32> {
        let h = self.hidden;
        cache[b * self.capacity * h..(b * self.capacity + self.past + 1) * h].to_vec()
    }

    /// The reference: the new token's row of `reference::sparse_attention` over the unpadded sequence.
    fn reference(&self, sparsity: f32) -> Vec<f32> {
        let h = self.hidden;
        let mut out = Vec::new();
        for b in 0..self.batch() {
            let len = self.past + 1;
            let mut q = vec![0.0; len * h];
            q[self.past * h..].copy_from_slice(&self.q[b * h..(b + 1) * h]);
            let visible: Vec<bool> = (0..len)
                .map(|t| self.mask[b * self.capacity + t] != 0)
                .collect();
            let all = reference::sparse_attention(
                &q,
                &self.rows(&self.k, b),
                &self.rows(&self.v, b),
                len,
                h,
                self.n_head,
                &visible,
                self.past,
                sparsity,
            );
            out.extend_from_slice(&all[self.past * h..]);
        }
        out
    }

    fn gpu(&self, gpu: &Gpu, kernels: &Kernels, sparsity: Option<f32>) -> Vec<f32> {
        let upload = |values: &[f32]| {
            gpu.storage_buffer_init("test input", bytemuck::cast_slice(values))
                .unwrap()
        };
        let (qb, kb, vb) = (upload(&self.q), upload(&self.k), upload(&self.v));
        let maskb = gpu
            .storage_buffer_init("mask", bytemuck::cast_slice(&self.mask))
            .unwrap();
        let n = self.batch() * self.hidden;
        let out = upload(&vec![f32::NAN; n]);
        let shape = AttentionShape {
            batch: self.batch(),
            s_new: 1,
            past: self.past,
            capacity: self.capacity,
            hidden: self.hidden,
            n_head: self.n_head,
        };
        let mut rec = kernels.recorder();
        match sparsity {
            Some(s) => rec.sparse_attention(F32, &qb, &kb, &vb, &maskb, &out, shape, s),
            None => rec.attention(F32, &qb, &kb, &vb, &maskb, &out, shape),
        }
        rec.submit();
        gpu.read_f32(&out, 0, n).unwrap()
    }

    fn cpu(&self, sparsity: f32) -> Vec<f32> {
        let keys: Vec<Vec<f32>> = (0..self.batch()).map(|b| self.rows(&self.k, b)).collect();
        let values: Vec<Vec<f32>> = (0..self.batch()).map(|b| self.rows(&self.v, b)).collect();
        let masks: Vec<&[u32]> = (0..self.batch())
            .map(|b| &self.mask[b * self.capacity..(b + 1) * self.capacity])
            .collect();
        let seqs: Vec<SeqRows> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| SeqRows {
                keys: bytemuck::cast_slice(k),
                values: bytemuck::cast_slice(v),
            })
            .collect();
        cpu_attention(
            &self.q,
            &seqs,
            CacheDtype::F32,
            &masks,
            self.n_head,
            self.past + 1,
            sparsity,
        )
    }

    /// GPU and CPU against the reference at `sparsity`; returns how far the result is from dense attention.
    fn check(&self, gpu: &Gpu, kernels: &Kernels, sparsity: f32, what: &str) -> f32 {
        let want = self.reference(sparsity);
        let got = self.gpu(gpu, kernels, Some(sparsity));
        assert!(got.iter().all(|x| x.is_finite()), "{what}: NaN or inf");
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{what}, sparsity {sparsity}: GPU differs by {diff}"
        );
        let cpu = self.cpu(sparsity);
        let diff = max_abs_diff(&cpu, &want);
        assert!(
            diff < 1e-5,
            "{what}, sparsity {sparsity}: CPU differs by {diff}"
        );
        max_abs_diff(&want, &self.reference(1.0))
    }
}

#[test]
fn top_k_is_the_floor_of_the_fraction_of_candidates() {
    assert_eq!(sparse_top_k(0.5, 4), 2);
    assert_eq!(sparse_top_k(0.5, 5), 2);
    assert_eq!(sparse_top_k(0.3, 10), 3);
    assert_eq!(sparse_top_k(1.0, 7), 7);
    assert_eq!(sparse_top_k(0.99, 7), 6);
    assert_eq!(sparse_top_k(0.01, 50), 0);
    assert_eq!(sparse_top_k(0.5, 0), 0);
}

/// Random scores with left padding, for head sizes 8 to 256 and caches longer than one 64-key block.
#[test]
fn sparse_attention_matches_the_reference_with_padding() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    let cases: [(usize, usize, usize, &[usize]); 4] = [
        (24, 3, 9, &[0, 4, 8]),
        (160, 2, 150, &[0, 70]),
        (256, 1, 70, &[3, 0]),
        (32, 4, 1, &[0, 0]),
    ];
    for (i, &(hidden, n_head, past, pads)) in cases.iter().enumerate() {
        let case = Case::random(hidden, n_head, past, pads, 17 + i as u64);
        let what = format!("hidden {hidden} heads {n_head} past {past} pads {pads:?}");
        let mut changed = 0.0f32;
        for sparsity in [0.5, 0.25, 0.9, 0.001] {
            changed = changed.max(case.check(&gpu, &kernels, sparsity, &what));
        }
        if past > 1 {
            // Dropping keys changes the result: the comparison above is not between two dense computations.
            assert!(changed > 1e-3, "{what}: sparsity made no difference");
        }
        // Every candidate kept is dense attention.
        assert_eq!(case.check(&gpu, &kernels, 1.0, &what), 0.0);
        let dense = case.gpu(&gpu, &kernels, None);
        let sparse = case.gpu(&gpu, &kernels, Some(1.0));
        let diff = max_abs_diff(&dense, &sparse);
        assert!(
            diff < 1e-5,
            "{what}: sparsity 1 differs from dense by {diff}"
        );
    }
}

/// k = 1 and k = 0: only the best earlier key (or none) joins the new token.
#[test]
fn one_or_no_earlier_key_is_kept_at_small_sparsity() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    let case = Case::random(16, 2, 10, &[0, 2], 5);
    // 10 and 8 candidates: 0.125 keeps 1 of each; 0.05 keeps none.
    assert_eq!(sparse_top_k(0.125, 10), 1);
    assert_eq!(sparse_top_k(0.125, 8), 1);
    case.check(&gpu, &kernels, 0.125, "k = 1");
    case.check(&gpu, &kernels, 0.05, "k = 0");
    // With k = 0 the output is the new token's value row times its softmax weight, direction unchanged.
    let got = case.gpu(&gpu, &kernels, Some(0.05));
    let d = 8;
    for b in 0..2 {
        for head in 0..2 {
            let at = b * 16 + head * d;
            let v_new = &case.v[(b * case.capacity + 10) * 16 + head * d..][..d];
            let o = &got[at..at + d];
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
            let weight = dot(o, v_new) / dot(v_new, v_new);
            assert!(
                weight > 0.0 && weight < 1.0,
                "weight {weight} outside (0, 1)"
            );
            for e in 0..d {
                assert!((o[e] - weight * v_new[e]).abs() < 1e-5);
            }
        }
    }
}

/// Equal scores: the earlier positions are kept. Keys repeat with period 3 (scores tie exactly in f32 and f64), and a
/// zero query ties every key.
#[test]
fn ties_go_to_the_earlier_position() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    let (hidden, n_head, past) = (8, 2, 20);
    let mut case = Case::random(hidden, n_head, past, &[0, 5], 99);
    for b in 0..2 {
        for t in case.pads[b]..past {
            let base = (b * case.capacity + case.pads[b] + (t - case.pads[b]) % 3) * hidden;
            let row = (b * case.capacity + t) * hidden;
            let first: Vec<f32> = case.k[base..base + hidden].to_vec();
            case.k[row..row + hidden].copy_from_slice(&first);
        }
    }
    for sparsity in [0.5, 0.3, 0.75, 0.1] {
        case.check(&gpu, &kernels, sparsity, "repeated keys");
    }
    case.q[..hidden].fill(0.0);
    for sparsity in [0.5, 0.3] {
        case.check(&gpu, &kernels, sparsity, "zero query");
    }
    // The zero query of sequence 0 weighs its 21 keys equally: 0.5 keeps keys 0..10 and the new token, 20.
    let got = case.gpu(&gpu, &kernels, Some(0.5));
    for (e, &g) in got[..hidden].iter().enumerate() {
        let want: f32 = (0..10)
            .chain([past])
            .map(|t| case.v[t * hidden + e])
            .sum::<f32>()
            / 21.0;
        assert!((g - want).abs() < 1e-5, "element {e}: {g} vs {want}");
    }
}

/// An f16 cache (halves read four at a time, or one at a time where head rows are not 8-byte aligned) with f32 and
/// f16 activations: the kernel against the reference over the values as stored, its output rounded to halves when
/// activations are.
#[test]
fn sparse_attention_reads_f16_caches_and_activations() {
    let gpu = gpu();
    for (act, hidden, n_head) in [
        (ActDtype::F16, 64, 2),
        (ActDtype::F32, 30, 5),
        (ActDtype::F16, 42, 6),
    ] {
        let kernels = Kernels::with_options(&gpu, KernelOptions::default().with_act(act));
        assert_eq!(kernels.act(), act, "lavapipe has SHADER_F16");
        let act_dtype = match act {
            ActDtype::F32 => DType::F32,
            ActDtype::F16 => DType::F16,
        };
        let mut case = Case::random(hidden, n_head, 40, &[0, 9], 31);
        case.k = round_to(&case.k, DType::F16);
        case.v = round_to(&case.v, DType::F16);
        case.q = round_to(&case.q, act_dtype);
        let upload = |values: &[f32], dtype| {
            gpu.storage_buffer_init("test input", &encode(values, dtype))
                .unwrap()
        };
        let (kb, vb) = (upload(&case.k, DType::F16), upload(&case.v, DType::F16));
        let qb = upload(&case.q, act_dtype);
        let maskb = gpu
            .storage_buffer_init("mask", bytemuck::cast_slice(&case.mask))
            .unwrap();
        let n = case.batch() * hidden;
        let out = upload(&vec![0.0; n], act_dtype);
        let shape = AttentionShape {
            batch: case.batch(),
            s_new: 1,
            past: case.past,
            capacity: case.capacity,
            hidden,
            n_head,
        };
        for sparsity in [0.5, 0.1] {
            let mut rec = kernels.recorder();
            let f16 = CacheDtype::F16;
            rec.sparse_attention(f16, &qb, &kb, &vb, &maskb, &out, shape, sparsity);
            rec.submit();
            let got: Vec<f32> = match act {
                ActDtype::F32 => gpu.read_f32(&out, 0, n).unwrap(),
                ActDtype::F16 => gpu.read_back(&[(&out, 0, 2 * n as u64)]).unwrap()[0]
                    .chunks_exact(2)
                    .map(|p| half::f16::from_le_bytes([p[0], p[1]]).to_f32())
                    .collect(),
            };
            let want = case.reference(sparsity);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let tol = match act {
                    ActDtype::F32 => 1e-5,
                    ActDtype::F16 => 1e-5 + w.abs() / 2048.0,
                };
                assert!(
                    (g - w).abs() <= tol,
                    "{act:?} activations, hidden {hidden}, sparsity {sparsity}: element {i} is {g}, \
                     reference {w}"
                );
            }
        }
    }
}
