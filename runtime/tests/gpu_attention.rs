//! The dense attention kernels (query blocks, split keys with one or several splits, and the choice
//! `Recorder::attention` makes) and the f16 cache store against the CPU reference, over awkward shapes: one query and
//! many (1, 7, 17, 63, 65, 130), with and without cached keys, left padding (fully padded query rows give zeros),
//! heads of 6 to 256 values (scalar and vec4 loads), f32 and f16 caches, f32 and f16 activations.

mod common;

use std::sync::OnceLock;

use common::{encode, gpu, round_to, upload, upload_u32, Rng};
use strata_runtime::config::DType;
use strata_runtime::gpu::kernels::{
    attention_scratch_bytes, decode_splits, split_keys_scratch_bytes, ActDtype, AttentionKernel,
    AttentionShape, CacheDtype, KernelOptions, Kernels,
};
use strata_runtime::gpu::Gpu;
use strata_runtime::reference;
use ActDtype::{F16 as A16, F32 as A32};
use CacheDtype::{F16, F32};

fn cache_dtype(dtype: CacheDtype) -> DType {
    match dtype {
        CacheDtype::F32 => DType::F32,
        CacheDtype::F16 => DType::F16,
    }
}

fn act_dtype(act: ActDtype) -> DType {
    match act {
        ActDtype::F32 => DType::F32,
        ActDtype::F16 => DType::F16,
    }
}

/// A storage buffer holding `values` stored as `dtype`.
fn upload_as(gpu: &Gpu, values: &[f32], dtype: DType) -> wgpu::Buffer {
    gpu.storage_buffer_init("test input", &encode(values, dtype))
        .unwrap()
}

/// The first `count` values of `buffer`, stored as `dtype`.
fn read_as(gpu: &Gpu, buffer: &wgpu::Buffer, count: usize, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => gpu.read_back(&[(buffer, 0, 2 * count as u64)]).unwrap()[0]
            .chunks_exact(2)
            .map(|p| half::f16::from_le_bytes([p[0], p[1]]).to_f32())
            .collect(),
        _ => gpu.read_f32(buffer, 0, count).unwrap(),
    }
}

/// One attention step: `batch` sequences whose first `pads[b]` positions are padding, `past` cached keys and `s_new`
/// new queries (their keys already in the cache), in caches of `past + s_new + 3` rows.
struct Case {
    hidden: usize,
    n_head: usize,
    s_new: usize,
    past: usize,
    pads: Vec<usize>,
    cache: CacheDtype,
    act: ActDtype,
}

impl Case {
    fn shape(&self) -> AttentionShape {
        AttentionShape {
            batch: self.pads.len(),
            s_new: self.s_new,
            past: self.past,
            capacity: self.past + self.s_new + 3,
            hidden: self.hidden,
            n_head: self.n_head,
        }
    }

    /// Runs `Recorder::attention` and each of `others` on the GPU and compares each with the reference.
    fn check(&self, gpu: &Gpu, by_act: &[Kernels; 2], others: &[AttentionKernel]) {
        let shape = self.shape();
        let (batch, hidden, capacity) = (shape.batch, self.hidden, shape.capacity);
        let total = self.past + self.s_new;
        let mut rng = Rng((hidden * 1000 + self.s_new * 10 + self.past) as u64);
        let mut k = round_to(
            &rng.vec(batch * capacity * hidden, 1.5),
            cache_dtype(self.cache),
        );
        let mut v = round_to(
            &rng.vec(batch * capacity * hidden, 1.0),
            cache_dtype(self.cache),
        );
        let q = round_to(
            &rng.vec(batch * self.s_new * hidden, 1.5),
            act_dtype(self.act),
        );
        let mut mask = vec![1u32; batch * capacity];
        for (b, &pad) in self.pads.iter().enumerate() {
            mask[b * capacity..b * capacity + pad].fill(0);
            // Padding and rows past this step hold NaN: no kernel may let them into a result.
            for t in (0..pad).chain(total..capacity) {
                let row = (b * capacity + t) * hidden;
                k[row..row + hidden].fill(f32::NAN);
                v[row..row + hidden].fill(f32::NAN);
            }
        }
        let mut want = Vec::new();
        for b in 0..batch {
            let rows =
                |t: &[f32]| t[b * capacity * hidden..(b * capacity + total) * hidden].to_vec();
            let mut q_full = vec![0.0; total * hidden];
            q_full[self.past * hidden..]
                .copy_from_slice(&q[b * self.s_new * hidden..(b + 1) * self.s_new * hidden]);
            let visible: Vec<bool> = (0..total).map(|j| mask[b * capacity + j] != 0).collect();
            let all = reference::attention(
                &q_full,
                &rows(&k),
                &rows(&v),
                total,
                hidden,
                self.n_head,
                &visible,
            );
            want.extend_from_slice(&all[self.past * hidden..]);
        }

        let kernels_act = &by_act[self.act as usize];
        assert_eq!(kernels_act.act(), self.act, "lavapipe has SHADER_F16");
        let cache = cache_dtype(self.cache);
        let (kb, vb) = (upload_as(gpu, &k, cache), upload_as(gpu, &v, cache));
        let maskb = upload_u32(gpu, &mask);
        let qb = upload_as(gpu, &q, act_dtype(self.act));
        let n = batch * self.s_new * hidden;
        let runs = std::iter::once(None).chain(others.iter().map(|&k| Some(k)));
        for kernel in runs {
            let out = upload_as(gpu, &vec![f32::NAN; n], act_dtype(self.act));
            let mut rec = kernels_act.recorder();
            match kernel {
                None => rec.attention(self.cache, &qb, &kb, &vb, &maskb, &out, shape),
                Some(kernel) => {
                    rec.attention_with(kernel, self.cache, &qb, &kb, &vb, &maskb, &out, shape)
                }
            }
            rec.submit();
            let got = read_as(gpu, &out, n, act_dtype(self.act));
            let what = format!(
                "{:?}, {kernel:?}: {:?} cache, {:?} activations",
                shape, self.cache, self.act
            );
            assert!(got.iter().all(|x| x.is_finite()), "{what}: NaN or inf");
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                // f16 outputs are rounded to halves: half an ulp is 2^-11 of the value.
                let tol = match self.act {
                    ActDtype::F32 => 1e-4,
                    ActDtype::F16 => 1e-4 + w.abs() / 2048.0,
                };
                assert!(
                    (g - w).abs() <= tol,
                    "{what}: element {i} is {g}, reference {w}"
                );
            }
            // A query row whose position is padding sees no key: exactly zero.
            for (b, &pad) in self.pads.iter().enumerate() {
                for i in 0..self.s_new {
                    if self.past + i < pad {
                        let row = (b * self.s_new + i) * hidden;
                        assert!(
                            got[row..row + hidden].iter().all(|&x| x == 0.0),
                            "{what}: padded query {i} of sequence {b} is not zero"
                        );
                    }
                }
            }
        }
    }
}

/// Kernels with f32 and with f16 activations, indexed by `ActDtype as usize`, shared by the tests (each pipeline is
/// compiled once).
fn kernels() -> &'static [Kernels; 2] {
    static KERNELS: OnceLock<[Kernels; 2]> = OnceLock::new();
    KERNELS.get_or_init(|| {
        let gpu = gpu();
        [
            Kernels::with_options(&gpu, KernelOptions::default().with_act(ActDtype::F32)),
            Kernels::with_options(&gpu, KernelOptions::default().with_act(ActDtype::F16)),
        ]
    })
}

const SPLITS_1: AttentionKernel = AttentionKernel::SplitKeys { splits: 1 };
const SPLITS_3: AttentionKernel = AttentionKernel::SplitKeys { splits: 3 };
const NONE: &[AttentionKernel] = &[];
const BLOCKS: AttentionKernel = AttentionKernel::QueryBlocks;

/// One case of the tables below: `(hidden, n_head)`, `(s_new, past)`, left padding per sequence, cache and
/// activation dtypes.
fn case(
    (hidden, n_head): (usize, usize),
    (s_new, past): (usize, usize),
    pads: &[usize],
    cache: CacheDtype,
    act: ActDtype,
) -> Case {
    Case {
        hidden,
        n_head,
        s_new,
        past,
        pads: pads.to_vec(),
        cache,
        act,
    }
}

/// Prompts (no cached keys), with sequences padded partly, wholly and not at all: `Recorder::attention`'s choice
/// (query blocks) on every case, and split keys with one and several splits on the smaller ones.
#[test]
fn prefill_attention_matches_the_reference() {
    let gpu = gpu();
    let cases: [(Case, &[AttentionKernel]); 6] = [
        (
            case((48, 3), (17, 0), &[0, 5, 17], F32, A32),
            &[SPLITS_1, SPLITS_3],
        ),
        (case((128, 2), (65, 0), &[0, 30], F16, A32), &[SPLITS_3]),
        (case((960, 12), (7, 0), &[3], F32, A16), &[SPLITS_1]),
        (case((512, 4), (63, 0), &[0, 20], F16, A16), NONE),
        (case((256, 1), (130, 0), &[0, 3], F16, A32), NONE),
        (case((1280, 5), (17, 0), &[0, 1, 2, 16], F32, A32), NONE),
    ];
    for (case, others) in cases {
        case.check(&gpu, kernels(), others);
    }
}

/// Steps after a prompt: one query (decode: split keys, `Recorder::attention`'s number of splits among them) and
/// several (query blocks), over cached keys with padding, some sequences padded beyond the new queries.
#[test]
fn attention_over_cached_keys_matches_the_reference() {
    let gpu = gpu();
    let cases: [(Case, &[AttentionKernel]); 7] = [
        (
            case((256, 2), (1, 130), &[0, 1, 2, 64, 100], F16, A16),
            &[SPLITS_1, SPLITS_3],
        ),
        (case((512, 2), (1, 300), &[10], F32, A16), &[SPLITS_1]),
        (
            case((64, 1), (1, 63), &[0, 7, 63, 2], F32, A32),
            &[BLOCKS, SPLITS_3],
        ),
        (case((768, 12), (1, 40), &[0, 39, 5], F16, A32), &[SPLITS_3]),
        (case((64, 4), (130, 20), &[0], F32, A32), NONE),
        (case((320, 4), (65, 5), &[0, 8], F16, A32), NONE),
        (case((160, 2), (7, 70), &[0, 72], F32, A16), &[SPLITS_3]),
    ];
    for (case, others) in cases {
        case.check(&gpu, kernels(), others);
    }
}

/// Heads whose rows are not 16-byte aligned (head_dim 6 and 7, odd hidden) take the scalar loads.
#[test]
fn unaligned_heads_match_the_reference() {
    let gpu = gpu();
    let cases: [(Case, &[AttentionKernel]); 3] = [
        (case((30, 5), (7, 3), &[0, 4], F16, A32), &[SPLITS_3]),
        (case((21, 3), (17, 0), &[2, 0], F32, A32), &[SPLITS_1]),
        (case((42, 6), (1, 70), &[0, 3], F16, A32), &[BLOCKS]),
    ];
    for (case, others) in cases {
        case.check(&gpu, kernels(), others);
    }
}

/// Decode splits fill a 132-SM GPU: opt-30b's 56 heads at batch 1 over 544 keys get 9 splits of 64 keys, batch 64
/// one; more keys never mean fewer splits, and the scratch reserved for a run is (head_dim + 2) f32 per (query,
/// head, split) at the splits of its longest step.
#[test]
fn decode_splits_and_their_scratch() {
    let shape = |batch, past, capacity| AttentionShape {
        batch,
        s_new: 1,
        past,
        capacity,
        hidden: 7168,
        n_head: 56,
    };
    assert_eq!(decode_splits(&shape(1, 543, 544)), 9);
    assert_eq!(decode_splits(&shape(8, 543, 544)), 3);
    assert_eq!(decode_splits(&shape(64, 543, 544)), 1);
    assert_eq!(decode_splits(&shape(1, 10, 544)), 1);
    assert_eq!(
        split_keys_scratch_bytes(&shape(1, 543, 544), 9),
        4 * 56 * 9 * (128 + 2)
    );
    assert_eq!(split_keys_scratch_bytes(&shape(2, 100, 544), 1), 0);
    for batch in 1..=64 {
        // Every step of a run reserves the same scratch: its last step's, the most splits any step takes.
        let reserved = attention_scratch_bytes(&shape(batch, 0, 544));
        let mut last = 0;
        for past in 0..544 {
            let step = shape(batch, past, 544);
            let splits = decode_splits(&step);
            assert!(splits >= last, "batch {batch} past {past}: fewer splits");
            last = splits;
            assert!(split_keys_scratch_bytes(&step, splits) <= reserved);
            assert_eq!(attention_scratch_bytes(&step), reserved);
        }
        assert_eq!(
            split_keys_scratch_bytes(&shape(batch, 543, 544), last),
            reserved
        );
    }
    assert_eq!(attention_scratch_bytes(&shape(64, 0, 544)), 0);
    // Prefill takes no scratch.
    let prefill = AttentionShape {
        s_new: 512,
        ..shape(1, 0, 544)
    };
    assert_eq!(attention_scratch_bytes(&prefill), 0);
}

/// One step's rows land at positions past..past + s_new of each sequence of an f16 cache, rounded to halves, and
/// nothing else is written; from f32 and from f16 activations.
#[test]
fn f16_cache_rows_are_stored_at_their_positions() {
    let gpu = gpu();
    let (batch, capacity, hidden) = (3, 7, 10);
    let mut rng = Rng(7);
    for kernels in kernels() {
        for (s_new, past) in [(4, 0), (1, 4), (2, 5)] {
            let before = rng.vec(batch * capacity * hidden, 2.0);
            let rows = rng.vec(batch * s_new * hidden, 3.0);
            let cache = upload_as(&gpu, &before, DType::F16);
            let src = match kernels.act() {
                ActDtype::F32 => upload(&gpu, &rows),
                ActDtype::F16 => upload_as(&gpu, &rows, DType::F16),
            };
            let mut rec = kernels.recorder();
            let shape = AttentionShape {
                batch,
                s_new,
                past,
                capacity,
                hidden,
                n_head: 2,
            };
            rec.store_cache_rows_f16(&src, &cache, shape);
            rec.submit();
            let got = read_as(&gpu, &cache, batch * capacity * hidden, DType::F16);
            let mut want = round_to(&before, DType::F16);
            for b in 0..batch {
                for i in 0..s_new {
                    let at = (b * capacity + past + i) * hidden;
                    let from = (b * s_new + i) * hidden;
                    want[at..at + hidden]
                        .copy_from_slice(&round_to(&rows[from..from + hidden], DType::F16));
                }
            }
            assert_eq!(got, want, "{:?}: s_new {s_new} past {past}", kernels.act());
        }
    }
}

/// A block decode's keys or values (projected for several GPU batches at once) land in one batch's cache: its rows
/// of the block, from `src_row0` on, at positions past..past + s_new of each sequence, and nothing else is written;
/// an f16 cache from f32 and from f16 activations, an f32 cache from f32 activations.
#[test]
fn block_rows_are_stored_into_one_batch_cache() {
    let gpu = gpu();
    let (batch, capacity, hidden, src_row0) = (3, 7, 10, 5);
    let mut rng = Rng(11);
    for kernels in kernels() {
        let act = kernels.act();
        let caches: &[CacheDtype] = match act {
            ActDtype::F32 => &[F16, F32],
            ActDtype::F16 => &[F16],
        };
        for &cache_dtype in caches {
            for (s_new, past) in [(1, 4), (2, 5)] {
                let before = rng.vec(batch * capacity * hidden, 2.0);
                // Rows of other batches before and after this batch's.
                let block_rows = src_row0 + batch * s_new + 2;
                let rows = rng.vec(block_rows * hidden, 3.0);
                let cache = upload_as(&gpu, &before, self::cache_dtype(cache_dtype));
                let src = upload_as(&gpu, &rows, act_dtype(act));
                let mut rec = kernels.recorder();
                let shape = AttentionShape {
                    batch,
                    s_new,
                    past,
                    capacity,
                    hidden,
                    n_head: 2,
                };
                rec.store_block_cache_rows(cache_dtype, &src, src_row0, &cache, shape);
                rec.submit();
                let dtype = self::cache_dtype(cache_dtype);
                let got = read_as(&gpu, &cache, batch * capacity * hidden, dtype);
                let mut want = round_to(&before, dtype);
                let rows = round_to(&rows, act_dtype(act));
                for b in 0..batch {
                    for i in 0..s_new {
                        let at = (b * capacity + past + i) * hidden;
                        let from = (src_row0 + b * s_new + i) * hidden;
                        want[at..at + hidden]
                            .copy_from_slice(&round_to(&rows[from..from + hidden], dtype));
                    }
                }
                assert_eq!(
                    got, want,
                    "{act:?} activations, {cache_dtype:?} cache: s_new {s_new} past {past}"
                );
            }
        }
    }
}

/// The flop and byte counts a benchmark reports: exact for a small causal shape.
#[test]
fn attention_counts_are_exact() {
    let shape = AttentionShape {
        batch: 2,
        s_new: 3,
        past: 4,
        capacity: 9,
        hidden: 8,
        n_head: 2,
    };
    // Queries see 5, 6 and 7 keys: 18 keys x 8 values x 2 (q.k and p*v) x 2 flops x 2 sequences.
    assert_eq!(shape.flops(), 18 * 8 * 2 * 2 * 2);
    // K and V of 7 keys, q and out of 3 rows, the mask of 7 keys, per sequence.
    assert_eq!(
        shape.min_bytes(CacheDtype::F16, ActDtype::F32),
        2 * (2 * 7 * 8 * 2 + 2 * 3 * 8 * 4 + 7 * 4)
    );
}
