//! Attention over the KV cache: the dense kernels (flash-style query blocks for prefill, split keys for decode), top-k
//! sparse decode attention, attention over a packed cache, and the f16 cache store, with the pipelines they need.
//!
//! Every kernel reads the cache through a `cache_*.wgsl` part (f32 or f16 storage; vec4 loads when `hidden` and
//! `head_dim` are multiples of 4, else one value at a time), reads queries and writes outputs as the kernels'
//! [`ActDtype`] and computes in f32. Pipelines are compiled on first use per (cache dtype, load width, head-size
//! bucket); a bucket's tiles are pipeline constants sized for its widest head.
//!
//! [`AttentionKernel::QueryBlocks`] (`attention_prefill.wgsl`) stages a block of queries of one (sequence, head) and
//! passes the keys through workgroup memory in tiles, each tile read once per block, with an online softmax per
//! query; tiles above the causal diagonal are skipped. Its tiles fit 32 KiB of workgroup memory (lavapipe's limit,
//! where CI runs them), so a GPU runs exactly the pipelines the tests ran. On a device with less, prefill runs split
//! keys with one split.
//!
//! [`AttentionKernel::SplitKeys`] (`attention_decode.wgsl`) gives each (query, head) `splits` workgroups over
//! consecutive ranges of keys, lanes across head_dim reading K and V rows as vectors; with more than one split a second
//! pass (`attention_combine.wgsl`) merges the partial results, which go through the kernels' staging slot 2
//! ([`split_keys_scratch_bytes`]).

use std::sync::OnceLock;

use super::{
    build_kernel, u32_of, ActDtype, AttentionShape, CacheDtype, Kernel, Kernels, Recorder,
    ShaderModuleSource, ATTENTION_SLOT, Q4,
};
use crate::compress::{AttentionParams, CompressionConfig};

const COMMON: &str = include_str!("attention_common.wgsl");
const QUERY_BLOCKS: &str = include_str!("attention_prefill.wgsl");
const SPLIT_KEYS: &str = include_str!("attention_decode.wgsl");
const COMBINE: &str = include_str!("attention_combine.wgsl");
const SPARSE: &str = include_str!("sparse_attention.wgsl");
const CACHE_STORE_F16: &str = include_str!("cache_store_f16.wgsl");
/// Cache parts by [`CacheDtype`] and load width (scalar, vec4).
const CACHE_PARTS: [[&str; 2]; 2] = [
    [
        include_str!("cache_f32.wgsl"),
        include_str!("cache_f32_vec4.wgsl"),
    ],
    [
        include_str!("cache_f16.wgsl"),
        include_str!("cache_f16_vec4.wgsl"),
    ],
];

/// Threads per workgroup of the dense attention kernels (query blocks, split keys, the combine pass).
pub const ATTENTION_WORKGROUP: usize = 128;

/// Threads per workgroup of sparse attention: its bisection makes ~70 workgroup-wide reductions, each a
/// log2(threads)-step tree.
const SPARSE_WORKGROUP: usize = 64;

/// Head sizes in vec4 columns: a pipeline serves heads up to its bucket's size (the last covers `MAX_HEAD_DIM`).
const BUCKETS: [usize; 4] = [4, 16, 32, 64];

/// The bucket of a head size.
fn bucket(head_dim: usize) -> usize {
    let d4 = head_dim.div_ceil(4);
    BUCKETS
        .iter()
        .position(|&max| d4 <= max)
        .unwrap_or(BUCKETS.len() - 1)
}

/// Whether every head row starts 16-byte aligned in f32 (8-byte in f16), so the cache is read as vec4s.
fn vec4_loads(shape: &AttentionShape) -> bool {
    shape.hidden % 4 == 0 && shape.head_dim() % 4 == 0
}

/// Tiles of [`AttentionKernel::QueryBlocks`] for one head-size bucket (pipeline constants of
/// `attention_prefill.wgsl`, with [`ATTENTION_WORKGROUP`] threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryBlockTiles {
    /// Queries per workgroup (`BQ`).
    pub queries: usize,
    /// Keys per tile staged in workgroup memory (`BK`).
    pub keys: usize,
    /// Score layout: threads across the tile's keys (`TK_S`; the rest go across queries).
    pub score_key_threads: usize,
    /// Output layout: threads across the head's vec4 columns (`T_D`; the rest go across queries).
    pub column_threads: usize,
}

impl QueryBlockTiles {
    /// The tiles for heads of `head_dim`.
    pub fn for_head_dim(head_dim: usize) -> QueryBlockTiles {
        QUERY_BLOCK_TILES[bucket(head_dim)]
    }

    /// Workgroup memory the kernel declares with these tiles for heads of up to `d4_max` vec4 columns.
    const fn workgroup_bytes(self, d4_max: usize) -> usize {
        let stride = d4_max | 1;
        16 * (self.queries + self.keys) * stride
            + 4 * self.queries * (self.keys + 1)
            + 8 * self.queries * self.score_key_threads
            + 4 * self.keys
    }
}

/// Per bucket: at most 32 KiB of workgroup memory (the largest, 64 vec4 columns: 26,592 bytes), and per thread at
/// most the kernel's register arrays hold (checked below).
const QUERY_BLOCK_TILES: [QueryBlockTiles; 4] = [
    QueryBlockTiles {
        queries: 32,
        keys: 32,
        score_key_threads: 8,
        column_threads: 4,
    },
    QueryBlockTiles {
        queries: 32,
        keys: 32,
        score_key_threads: 8,
        column_threads: 16,
    },
    QueryBlockTiles {
        queries: 16,
        keys: 32,
        score_key_threads: 8,
        column_threads: 32,
    },
    QueryBlockTiles {
        queries: 8,
        keys: 16,
        score_key_threads: 16,
        column_threads: 32,
    },
];

// Each tile set fits `attention_prefill.wgsl`'s register arrays: per thread RQ <= 2 query rows and RQ * RK <= 8
// scores in the score layout, RQO <= 4 rows and RQO * RD <= 4 output vec4s in the output layout; the layouts cover
// the tile exactly; and the split-keys lanes leave at most 2 vec4 columns per lane (its register arrays).
const _: () = {
    let mut b = 0;
    while b < BUCKETS.len() {
        let t = QUERY_BLOCK_TILES[b];
        let wg = ATTENTION_WORKGROUP;
        let (tq_s, tq_o) = (wg / t.score_key_threads, wg / t.column_threads);
        assert!(wg % t.score_key_threads == 0 && wg % t.column_threads == 0);
        assert!(
            t.queries % tq_s == 0 && t.keys % t.score_key_threads == 0 && t.queries % tq_o == 0
        );
        let (rq, rk, rqo) = (
            t.queries / tq_s,
            t.keys / t.score_key_threads,
            t.queries / tq_o,
        );
        let rd = BUCKETS[b].div_ceil(t.column_threads);
        assert!(rq >= 1 && rq <= 2 && rq * rk <= 8 && rqo >= 1 && rqo <= 4 && rqo * rd <= 4);
        assert!(t.keys <= wg && t.workgroup_bytes(BUCKETS[b]) <= 32 << 10);
        assert!(BUCKETS[b].div_ceil(SPLIT_LANES[b]) <= 2 && SPLIT_TILE <= wg);
        assert!(
            ATTENTION_WORKGROUP % SPLIT_LANES[b] == 0 && SPARSE_WORKGROUP % SPLIT_LANES[b] == 0
        );
        b += 1;
    }
};

/// Split keys and sparse attention: lanes across the head's vec4 columns per bucket (the other threads of the
/// workgroup form groups that take different keys), and keys per tile.
const SPLIT_LANES: [usize; 4] = [4, 16, 32, 32];
const SPLIT_TILE: usize = 32;

/// Workgroups split-keys attention aims for per dispatch: about 8 per SM of a 132-SM GPU (H100/H200).
pub const SPLIT_TARGET_WORKGROUPS: usize = 1024;
/// Fewest keys a split takes (two tiles of 32), so a split's fixed cost stays small against its keys.
pub const MIN_SPLIT_KEYS: usize = 64;

/// Which dense attention kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Flash-style: one workgroup per (sequence, head, block of [`QueryBlockTiles::queries`] queries), keys
    /// staged tile by tile in workgroup memory (`attention_prefill.wgsl`). [`Recorder::attention`]'s choice when a
    /// step has more than one query per sequence.
    QueryBlocks,
    /// Flash-decoding: each (query, head)'s keys split over `splits` workgroups, merged by a second pass when there
    /// are several (`attention_decode.wgsl`, `attention_combine.wgsl`). [`Recorder::attention`]'s choice for one
    /// query per sequence, with [`decode_splits`].
    SplitKeys {
        /// Workgroups per (query, head), at least 1.
        splits: usize,
    },
}

impl AttentionKernel {
    /// A one-line description of the kernel and its constants for `shape` (for `bench` and `profile` output).
    pub fn describe(self, shape: &AttentionShape) -> String {
        let b = bucket(shape.head_dim());
        let loads = if vec4_loads(shape) { "vec4" } else { "scalar" };
        match self {
            AttentionKernel::QueryBlocks => {
                let t = QUERY_BLOCK_TILES[b];
                format!(
                    "query blocks: {} queries x {}-key tiles, {ATTENTION_WORKGROUP} threads, {loads} loads",
                    t.queries, t.keys
                )
            }
            AttentionKernel::SplitKeys { splits } => format!(
                "split keys: {splits} split(s) of {} keys, {} lanes across head_dim, {ATTENTION_WORKGROUP} threads, \
                 {loads} loads",
                split_chunk(shape.keys(), splits),
                SPLIT_LANES[b]
            ),
        }
    }
}

impl AttentionShape {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.n_head.max(1)
    }

    /// Keys the last query of a sequence sees: the cached ones and this step's.
    pub fn keys(&self) -> usize {
        self.past + self.s_new
    }

    /// Floating-point operations of the causal attention without padding: `q . k` and `p * v` over every visible
    /// key, 2 each per element of the head, `4 * batch * hidden * sum over queries of (past + i + 1)`.
    pub fn flops(&self) -> u64 {
        let s = self.s_new as u64;
        let visible = s * self.past as u64 + s * (s + 1) / 2;
        4 * (self.batch * self.hidden) as u64 * visible
    }

    /// Bytes the attention must move at least: every cached key and value read once, the queries read, the output
    /// written and the mask read.
    pub fn min_bytes(&self, cache: CacheDtype, act: ActDtype) -> u64 {
        let (batch, hidden) = (self.batch as u64, self.hidden as u64);
        let keys = self.keys() as u64;
        2 * batch * keys * hidden * cache.bytes() as u64
            + 2 * batch * self.s_new as u64 * hidden * act.bytes() as u64
            + 4 * batch * keys
    }
}

/// The splits [`Recorder::attention`] gives one query per (sequence, head) over `shape.keys()` keys: enough to reach
/// [`SPLIT_TARGET_WORKGROUPS`], at most one per [`MIN_SPLIT_KEYS`] keys, at least 1. Non-decreasing in `shape.past`.
pub fn decode_splits(shape: &AttentionShape) -> usize {
    let pairs = (shape.batch * shape.s_new * shape.n_head).max(1);
    SPLIT_TARGET_WORKGROUPS
        .div_ceil(pairs)
        .min(shape.keys().div_ceil(MIN_SPLIT_KEYS))
        .max(1)
}

/// Keys per split: the keys spread evenly, rounded up to whole tiles.
fn split_chunk(keys: usize, splits: usize) -> usize {
    keys.div_ceil(splits.max(1))
        .next_multiple_of(SPLIT_TILE)
        .max(SPLIT_TILE)
}

/// Bytes of scratch split-keys attention over `shape` with `splits` splits needs: per (query, head) and split, the
/// unnormalised output (`head_dim` f32) and its running max and sum (2 f32); none with one split, which writes the
/// output directly. It goes through the kernels' staging slot 2, whose buffer is the largest request rounded up to a
/// power of two.
pub fn split_keys_scratch_bytes(shape: &AttentionShape, splits: usize) -> u64 {
    if splits <= 1 {
        return 0;
    }
    let pairs = (shape.batch * shape.s_new * shape.n_head) as u64;
    4 * pairs * splits as u64 * (shape.head_dim() as u64 + 2)
}

/// Scratch bytes [`Recorder::attention`] reserves for `shape`: at one query per sequence, split keys' scratch for the
/// most splits any step up to the cache's capacity takes ([`decode_splits`] at `past = capacity - 1`), so decode
/// steps after the first allocate nothing; none for steps with several queries.
pub fn attention_scratch_bytes(shape: &AttentionShape) -> u64 {
    if shape.s_new != 1 {
        return 0;
    }
    let last = AttentionShape {
        past: shape.capacity.max(shape.keys()) - 1,
        ..*shape
    };
    split_keys_scratch_bytes(&last, decode_splits(&last))
}

/// Scratch bytes [`Recorder::sparse_attention`] takes: one f32 score per (sequence, head, cache row), through the
/// kernels' staging slot 2 (rounded up to a power of two there).
pub fn sparse_attention_scratch_bytes(shape: &AttentionShape) -> u64 {
    4 * (shape.batch * shape.n_head * shape.capacity) as u64
}

/// The attention kernels' shared parameters (`attention_common.wgsl`'s `Params`).
fn params(
    shape: &AttentionShape,
    blocks: usize,
    chunk: usize,
    stats_off: usize,
    sparsity: f32,
) -> [u32; 12] {
    let head_dim = shape.head_dim();
    [
        u32_of(shape.s_new),
        u32_of(shape.past),
        u32_of(shape.capacity),
        u32_of(shape.hidden),
        u32_of(shape.n_head),
        u32_of(head_dim),
        (head_dim as f32).powf(-0.5).to_bits(),
        u32_of(shape.batch),
        u32_of(blocks),
        u32_of(chunk),
        u32_of(stats_off),
        sparsity.to_bits(),
    ]
}

/// The three kernels compiled per (cache dtype, load width, bucket).
#[derive(Clone, Copy)]
enum Dense {
    QueryBlocks,
    SplitKeys,
    Sparse,
}

/// The attention pipelines, built on first use.
#[derive(Default)]
pub(super) struct AttentionKernels {
    /// By [`Dense`], [`CacheDtype`], load width (scalar, vec4) and bucket.
    dense: [[[[OnceLock<Kernel>; 4]; 2]; 2]; 3],
    combine: OnceLock<Kernel>,
    store_f16: OnceLock<Kernel>,
}

/// The module of one dense attention kernel: `which` for a cache of `dtype`, read as vec4 or scalars, for head
/// sizes up to `BUCKETS[bucket] * 4`, with activations stored as `act`.
fn dense_module(
    which: Dense,
    dtype: CacheDtype,
    vec4: bool,
    bucket: usize,
    act: ActDtype,
) -> ShaderModuleSource {
    let d4_max = BUCKETS[bucket] as f64;
    let wg = match which {
        Dense::Sparse => SPARSE_WORKGROUP,
        _ => ATTENTION_WORKGROUP,
    } as f64;
    let (label, source, constants) = match which {
        Dense::QueryBlocks => {
            let t = QUERY_BLOCK_TILES[bucket];
            (
                "attention_prefill",
                QUERY_BLOCKS,
                vec![
                    ("WG", wg),
                    ("BQ", t.queries as f64),
                    ("BK", t.keys as f64),
                    ("D4_MAX", d4_max),
                    ("TK_S", t.score_key_threads as f64),
                    ("T_D", t.column_threads as f64),
                ],
            )
        }
        Dense::SplitKeys | Dense::Sparse => {
            let (label, source) = match which {
                Dense::Sparse => ("sparse_attention", SPARSE),
                _ => ("attention_decode", SPLIT_KEYS),
            };
            (
                label,
                source,
                vec![
                    ("WG", wg),
                    ("D4_MAX", d4_max),
                    ("LANES", SPLIT_LANES[bucket] as f64),
                    ("TK", SPLIT_TILE as f64),
                ],
            )
        }
    };
    let cache = CACHE_PARTS[dtype.index()][vec4 as usize];
    ShaderModuleSource {
        label: label.to_string(),
        source: [act.wgsl(), cache, COMMON, source].join("\n"),
        entry: "main",
        constants,
    }
}

/// Every attention module [`Kernels`] can build, for [`super::shader_modules`].
pub(super) fn attention_modules() -> Vec<ShaderModuleSource> {
    let mut all = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        for which in [Dense::QueryBlocks, Dense::SplitKeys, Dense::Sparse] {
            for dtype in [CacheDtype::F32, CacheDtype::F16] {
                for vec4 in [false, true] {
                    for bucket in 0..BUCKETS.len() {
                        let mut m = dense_module(which, dtype, vec4, bucket, act);
                        m.label =
                            format!("{} {dtype:?} vec4={vec4} bucket {bucket} {act:?}", m.label);
                        all.push(m);
                    }
                }
            }
        }
        for (label, part) in [
            ("attention_combine", COMBINE),
            ("cache_store_f16", CACHE_STORE_F16),
        ] {
            all.push(ShaderModuleSource {
                label: format!("{label} {act:?}"),
                source: [act.wgsl(), part].join("\n"),
                entry: "main",
                constants: vec![],
            });
        }
    }
    all
}

impl Kernels {
    fn dense_attention(
        &self,
        which: Dense,
        dtype: CacheDtype,
        vec4: bool,
        bucket: usize,
    ) -> &Kernel {
        let slot = &self.attention.dense[which as usize][dtype.index()][vec4 as usize][bucket];
        slot.get_or_init(|| {
            let module = dense_module(which, dtype, vec4, bucket, self.act());
            build_kernel(
                &self.gpu,
                &module.label,
                &[&module.source],
                module.entry,
                &module.constants,
            )
        })
    }

    fn attention_combine(&self) -> &Kernel {
        self.attention.combine.get_or_init(|| {
            build_kernel(
                &self.gpu,
                "attention_combine",
                &[self.act().wgsl(), COMBINE],
                "main",
                &[],
            )
        })
    }

    fn cache_store_f16(&self) -> &Kernel {
        self.attention.store_f16.get_or_init(|| {
            build_kernel(
                &self.gpu,
                "cache_store_f16",
                &[self.act().wgsl(), CACHE_STORE_F16],
                "main",
                &[],
            )
        })
    }

    /// Whether this device's workgroup memory holds [`AttentionKernel::QueryBlocks`]'s tiles for `head_dim`.
    pub fn query_blocks_fit(&self, head_dim: usize) -> bool {
        let b = bucket(head_dim);
        QUERY_BLOCK_TILES[b].workgroup_bytes(BUCKETS[b])
            <= self.gpu.limits.max_compute_workgroup_storage_size as usize
    }

    /// The dense attention kernel [`Recorder::attention`] runs for `shape` on this device: split keys
    /// ([`decode_splits`]) for one query per sequence, query blocks for more (split keys with one split where the
    /// device's workgroup memory is too small for them).
    pub fn attention_kernel(&self, shape: &AttentionShape) -> AttentionKernel {
        if shape.s_new == 1 {
            AttentionKernel::SplitKeys {
                splits: decode_splits(shape),
            }
        } else if self.query_blocks_fit(shape.head_dim()) {
            AttentionKernel::QueryBlocks
        } else {
            AttentionKernel::SplitKeys { splits: 1 }
        }
    }
}

impl<'a> Recorder<'a> {
    /// Causal attention of `q` (`[batch * s_new, hidden]` activations) over the caches `k`, `v` (`[batch, capacity,
    /// hidden]` values stored as `dtype`, already holding this step's keys and values) under `mask` (`[batch,
    /// capacity]` u32, 1 = real token), into `out` (`[batch * s_new, hidden]` activations). Query i of a sequence sits
    /// at position `past + i` and sees the real keys at positions up to its own; one that sees none yields zeros.
    /// Scores are scaled by head_dim^-0.5; head_dim is at most [`super::MAX_HEAD_DIM`] (the model checks it). Runs
    /// [`Kernels::attention_kernel`]'s choice.
    #[allow(clippy::too_many_arguments)] // q, k, v, mask, out and the shape are all distinct inputs
    pub fn attention(
        &mut self,
        dtype: CacheDtype,
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        mask: &'a wgpu::Buffer,
        out: &'a wgpu::Buffer,
        shape: AttentionShape,
    ) {
        let kernel = self.kernels.attention_kernel(&shape);
        self.attention_with(kernel, dtype, q, k, v, mask, out, shape);
    }

    /// [`Recorder::attention`] through a given kernel (for benchmarks and tests; both compute the same result).
    /// `QueryBlocks` on a device whose workgroup memory is too small for it ([`Kernels::query_blocks_fit`]) runs
    /// split keys with one split.
    #[allow(clippy::too_many_arguments)] // Recorder::attention's inputs plus the kernel
    pub fn attention_with(
        &mut self,
        kernel: AttentionKernel,
        dtype: CacheDtype,
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        mask: &'a wgpu::Buffer,
        out: &'a wgpu::Buffer,
        shape: AttentionShape,
    ) {
        if shape.batch * shape.s_new * shape.n_head == 0 {
            return;
        }
        let kernels: &'a Kernels = self.kernels;
        let (head_dim, vec4) = (shape.head_dim(), vec4_loads(&shape));
        let b = bucket(head_dim);
        let splits = match kernel {
            AttentionKernel::QueryBlocks if kernels.query_blocks_fit(head_dim) => {
                let blocks = shape.s_new.div_ceil(QUERY_BLOCK_TILES[b].queries);
                let groups = self.grid(shape.batch * shape.n_head * blocks);
                self.dispatch(
                    kernels.dense_attention(Dense::QueryBlocks, dtype, vec4, b),
                    &params(&shape, blocks, 0, 0, 0.0),
                    vec![(1, q), (2, k), (3, v), (4, mask), (5, out)],
                    groups,
                );
                return;
            }
            AttentionKernel::QueryBlocks => 1,
            AttentionKernel::SplitKeys { splits } => splits.clamp(1, shape.keys().max(1)),
        };
        let pairs = shape.batch * shape.s_new * shape.n_head;
        let chunk = split_chunk(shape.keys(), splits);
        let kernel = kernels.dense_attention(Dense::SplitKeys, dtype, vec4, b);
        let groups = self.grid(pairs * splits);
        if splits == 1 {
            self.dispatch(
                kernel,
                &params(&shape, 1, chunk, 0, 0.0),
                vec![
                    (1, q),
                    (2, k),
                    (3, v),
                    (4, mask),
                    (5, out),
                    (6, &kernels.dummy),
                ],
                groups,
            );
            return;
        }
        let bytes = split_keys_scratch_bytes(&shape, splits).max(attention_scratch_bytes(&shape));
        let scratch = kernels.staging(ATTENTION_SLOT, bytes);
        let stats_off = pairs * splits * head_dim;
        self.dispatch(
            kernel,
            &params(&shape, splits, chunk, stats_off, 0.0),
            vec![(1, q), (2, k), (3, v), (4, mask), (5, out), (6, &scratch)],
            groups,
        );
        let combine = [
            u32_of(pairs),
            u32_of(head_dim),
            u32_of(splits),
            u32_of(stats_off),
        ];
        let groups = self.grid((pairs * head_dim).div_ceil(ATTENTION_WORKGROUP));
        self.dispatch(
            kernels.attention_combine(),
            &combine,
            vec![(1, &scratch), (2, out)],
            groups,
        );
    }

    /// Top-k sparse decode attention (`--attn-sparsity`): `q` is `[batch, hidden]` activations, one new token per
    /// sequence whose key and value are already at row `shape.past` of the caches `k`, `v` (`[batch, capacity,
    /// hidden]` values stored as `dtype`), `mask` is `[batch, capacity]` (1 = real token), `out` is `[batch, hidden]`
    /// activations.
    ///
    /// Per (sequence, head), FlexLLMGen's rule: the softmax is taken over every visible key; the output sums the
    /// value rows of the new token and of the [`super::sparse_top_k`]`(sparsity, n)` highest-scoring of the `n`
    /// visible keys before it (equal scores: the earlier position first), each weighted by its softmax probability
    /// (no renormalisation). With `sparsity` 1 every key is kept, which [`Recorder::attention`] computes faster.
    /// Scores go through the kernels' staging slot 2 ([`sparse_attention_scratch_bytes`]). `shape.s_new` must be 1.
    #[allow(clippy::too_many_arguments)] // Recorder::attention's inputs plus the sparsity
    pub fn sparse_attention(
        &mut self,
        dtype: CacheDtype,
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        mask: &'a wgpu::Buffer,
        out: &'a wgpu::Buffer,
        shape: AttentionShape,
        sparsity: f32,
    ) {
        debug_assert_eq!(shape.s_new, 1, "sparse attention is for decode steps");
        let kernels: &'a Kernels = self.kernels;
        let pairs = shape.batch * shape.n_head;
        let scores = kernels.staging(ATTENTION_SLOT, sparse_attention_scratch_bytes(&shape));
        let kernel = kernels.dense_attention(
            Dense::Sparse,
            dtype,
            vec4_loads(&shape),
            bucket(shape.head_dim()),
        );
        let groups = self.grid(pairs);
        self.dispatch(
            kernel,
            &params(&shape, 1, 0, 0, sparsity),
            vec![(1, q), (2, k), (3, v), (4, mask), (5, out), (6, &scores)],
            groups,
        );
    }

    /// Decode attention over a packed K/V cache (`q4_attention`): `q` is `[batch * heads, head_dim]`, the caches
    /// hold `params`' rows, `mask` is `[batch, params.mask_stride]`, `scores` is scratch of at least
    /// `batch * heads * seq_len` f32, `out` is `[batch * heads, head_dim]`.
    #[allow(clippy::too_many_arguments)] // the kernel's bindings
    pub fn packed_attention(
        &mut self,
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        mask: &'a wgpu::Buffer,
        scores: &'a wgpu::Buffer,
        out: &'a wgpu::Buffer,
        config: CompressionConfig,
        params: AttentionParams,
    ) {
        let kernel = self.kernels.q4(Q4::Attention, config.bits);
        let groups = self.grid(params.batch_heads as usize);
        self.dispatch(
            kernel,
            bytemuck::cast_slice(std::slice::from_ref(&params)),
            vec![(1, q), (2, k), (3, v), (4, mask), (5, scores), (6, out)],
            groups,
        );
    }

    /// Writes one step's keys or values `src` (`[batch * s_new, hidden]` activations) into the f16 cache `dst`
    /// (`[batch, capacity, hidden]` halves) at positions `past..past + s_new` of each sequence. (An f32 cache is
    /// written directly by the projection's epilogue, [`super::OutRows::cache`]; so can an f16 cache once
    /// activations are f16, the same halves in the same layout.)
    pub fn store_cache_rows_f16(
        &mut self,
        src: &'a wgpu::Buffer,
        dst: &'a wgpu::Buffer,
        shape: AttentionShape,
    ) {
        self.store_cache_rows_f16_from(src, 0, dst, shape);
    }

    /// [`Recorder::store_cache_rows_f16`] from rows `src_row0..` of `src`.
    fn store_cache_rows_f16_from(
        &mut self,
        src: &'a wgpu::Buffer,
        src_row0: usize,
        dst: &'a wgpu::Buffer,
        shape: AttentionShape,
    ) {
        let n = shape.batch * shape.s_new * shape.hidden / 2;
        if n == 0 {
            return;
        }
        let params = [
            u32_of(shape.batch),
            u32_of(shape.s_new),
            u32_of(shape.past),
            u32_of(shape.capacity),
            u32_of(shape.hidden),
            u32_of(n),
            u32_of(src_row0),
            0,
        ];
        let groups = self.grid(n.div_ceil(256));
        self.dispatch(
            self.kernels.cache_store_f16(),
            &params,
            vec![(1, src), (2, dst)],
            groups,
        );
    }

    /// Writes rows `src_row0..src_row0 + batch * s_new` of `src` (one step's keys or values, projected for a whole
    /// block of GPU batches: `[rows, hidden]` activations) into one batch's cache `dst` (`[batch, capacity, hidden]`
    /// in `cache`'s dtype) at positions `past..past + s_new` of each sequence. An f16 cache beside f32 activations
    /// takes halves; otherwise the cache holds the activations' own dtype and the rows are moved as they are.
    pub fn store_block_cache_rows(
        &mut self,
        cache: CacheDtype,
        src: &'a wgpu::Buffer,
        src_row0: usize,
        dst: &'a wgpu::Buffer,
        shape: AttentionShape,
    ) {
        if cache == CacheDtype::F16 && self.act() == ActDtype::F32 {
            return self.store_cache_rows_f16_from(src, src_row0, dst, shape);
        }
        debug_assert_eq!(
            cache.bytes(),
            self.act().bytes(),
            "a block decode step's cache holds its activations' dtype or f16"
        );
        // cache_rows.wgsl mode 3, one head as wide as the row.
        let (b, cap, h) = (shape.batch, shape.capacity, shape.hidden);
        let positions = [b, cap, 1, h, shape.past, shape.s_new];
        self.cache_rows_pass(src, dst, positions, 3, src_row0 * h);
    }
}
