//! The compute kernels (WGSL in `kernels/*.wgsl`) and the one place that dispatches them.
//!
//! A [`Recorder`] collects one step's work (dispatches and copies) and submits it as one command buffer: a submit
//! costs ~40 us on an H200 and ~118 us on lavapipe, so the forward pass of a step is one submit. Kernel parameters
//! go into one pooled uniform buffer, one 256-byte-aligned slot per dispatch; nothing else is allocated per step.
//! Bind groups are cached by (pipeline, parameter slot, buffers): decode steps record the same dispatches on the
//! same buffers with only parameter values changing, so after the first decode step no bind group is created.
//!
//! All activations are f32; weights are f32, packed f16 or group-wise quantised ([`WeightFormat`]) and every kernel
//! accumulates in f32.
//!
//! Attention sparsity: [`Recorder::sparse_attention`] (`sparse_attention.wgsl`) is the decode attention of
//! `--attn-sparsity` below 1, keeping per (sequence, head) the new token and the [`sparse_top_k`] best-scoring
//! earlier real tokens; its scores go through a third staging slot.
//!
//! # Packed (compressed) weights and caches
//!
//! A [`WeightFormat::Packed`] matrix is read by the compress module's kernels (`runtime/src/kernels/q4_*.wgsl`,
//! compiled here per bit width on first use): [`Recorder::linear`] runs `q4_gemv` (m <= [`GEMV_MAX_ROWS`]) or
//! `q4_gemm` into a staging buffer, then `scatter.wgsl` applies bias, activation, output placement and accumulation
//! with the same epilogue as the dense kernels; [`Recorder::gather`] decodes embedding rows by id with `q4_dequant`.
//! [`Recorder::quantize_rows`] and [`Recorder::packed_attention`] append to and attend over a packed KV cache.
//! The q4 kernels take no input or output offsets, so work beyond one dispatch's grid (65535 rows) goes through
//! staging buffers with buffer-to-buffer copies. Staging buffers are owned by [`Kernels`], grown on demand (the first
//! step sizes them) and shared by every dispatch of a step: the queue runs dispatches one after another.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::compress::{
    CompressionConfig, DequantParams, MatmulParams, PackedLayout, QuantizeParams, ATTENTION_WGSL,
    DEQUANT_WGSL, GEMM_WGSL, GEMV_WGSL, QUANTIZE_WGSL,
};
use crate::gpu::tensor::{GpuMatrix, MatrixChunk, WeightFormat};
use crate::gpu::Gpu;

const ACT_F32: &str = include_str!("kernels/act_f32.wgsl");
const ACT_F16: &str = include_str!("kernels/act_f16.wgsl");
const WEIGHTS_F32: &str = include_str!("kernels/weights_f32.wgsl");
const WEIGHTS_F16: &str = include_str!("kernels/weights_f16.wgsl");
const EPILOGUE: &str = include_str!("kernels/epilogue.wgsl");
const GATHER: &str = include_str!("kernels/gather.wgsl");
const GEMM: &str = include_str!("kernels/gemm.wgsl");
const GEMV: &str = include_str!("kernels/gemv.wgsl");
const LAYER_NORM: &str = include_str!("kernels/layer_norm.wgsl");
const ATTENTION_COMMON: &str = include_str!("kernels/attention_common.wgsl");
const ATTENTION: &str = include_str!("kernels/attention.wgsl");
const SELECT: &str = include_str!("kernels/select.wgsl");
const SCATTER: &str = include_str!("kernels/scatter.wgsl");
const CACHE_ROWS: &str = include_str!("kernels/cache_rows.wgsl");
const SPARSE_ATTENTION: &str = include_str!("kernels/sparse_attention.wgsl");
const CACHE_F32: &str = include_str!("kernels/cache_f32.wgsl");
const CACHE_F16: &str = include_str!("kernels/cache_f16.wgsl");
const CACHE_STORE_F16: &str = include_str!("kernels/cache_store_f16.wgsl");

/// How activations (hidden rows, projections, attention output, FFN intermediate) are stored in GPU memory. Every
/// kernel that reads or writes activations is compiled with [`ActDtype::wgsl`] as the first part of its module and
/// declares those buffers as `array<act>` / `array<act4>`; arithmetic and accumulation stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActDtype {
    /// f32 activations: f32 checkpoints, and devices without SHADER_F16.
    #[default]
    F32,
    /// IEEE halves (`enable f16;`): half the activation bytes in every buffer and transfer.
    F16,
}

impl ActDtype {
    /// Bytes per activation element.
    pub const fn bytes(self) -> usize {
        match self {
            ActDtype::F32 => 4,
            ActDtype::F16 => 2,
        }
    }

    /// The WGSL part that defines the `act`, `act2` and `act4` storage types (first in a module's parts).
    pub fn wgsl(self) -> &'static str {
        match self {
            ActDtype::F32 => ACT_F32,
            ActDtype::F16 => ACT_F16,
        }
    }
}

/// Rows one q4 dispatch handles along its grid's y dimension (the common per-dimension limit).
const MAX_GRID_ROWS: usize = 65535;

/// The compress module's kernels, each compiled per bit width (q4_gemv also per token count: `Kernels::q4_gemv`).
#[derive(Clone, Copy)]
enum Q4 {
    Gemm,
    Dequant,
    Quantize,
    Attention,
}

/// Staging buffers (the kernels' scratch): slot 0 holds packed kernels' outputs, slot 1 their inputs (ids, rows to
/// quantise), slot 2 the sparse attention's scores. What each use asks for is one of the `*_staging` functions
/// below, so a run's placement can size the slots before the first step ([`Kernels::set_staging`]).
pub const STAGING_SLOTS: usize = 3;
/// The staging slot of [`Recorder::sparse_attention`]'s scores.
const SCORES_SLOT: usize = 2;

/// The buffer a staging request of `bytes` gets: a power of two (so a slot is rarely regrown), at most one binding.
pub fn staging_buffer_bytes(bytes: u64, max_binding: u64) -> u64 {
    bytes.max(16).next_power_of_two().min(max_binding)
}

/// Rows of x per pass of a packed linear layer over chunks of at most `widest` rows and `cols` columns, `m` rows in
/// all: a pass's rows of x and its `[piece, chunk rows]` result each fit one binding.
fn packed_linear_piece(m: usize, widest: usize, cols: usize, max_binding: u64) -> usize {
    let widest_row = 4 * widest.max(cols).max(1) as u64;
    ((max_binding / widest_row) as usize).clamp(1, m.max(1))
}

/// Staging `[slot 0, slot 1]` a packed linear layer of `m` rows asks for (0: none): slot 0 holds one pass's dense
/// result, slot 1 a pass's rows of x past the first (the q4 kernels take no x offset).
pub fn packed_linear_staging(m: usize, widest: usize, cols: usize, max_binding: u64) -> [u64; 2] {
    let piece = packed_linear_piece(m, widest, cols, max_binding);
    let x_piece = if m > piece { piece.min(m - piece) } else { 0 };
    [
        (piece * widest.max(1) * 4) as u64,
        (x_piece * cols * 4) as u64,
    ]
}

/// The rows of the largest piece after the first when `rows` rows go through a kernel `MAX_GRID_ROWS` at a time
/// (0 when one piece does).
fn later_piece(rows: usize) -> usize {
    if rows > MAX_GRID_ROWS {
        (rows - MAX_GRID_ROWS).min(MAX_GRID_ROWS)
    } else {
        0
    }
}

/// Staging `[slot 0, slot 1]` a packed embedding gather of `n_ids` rows of `cols` values asks for: decoded rows go
/// through slot 0 when added (`accumulate`) or past the first piece, ids past the first piece through slot 1.
pub fn packed_gather_staging(n_ids: usize, cols: usize, accumulate: bool) -> [u64; 2] {
    let out_rows = if accumulate {
        n_ids.min(MAX_GRID_ROWS)
    } else {
        later_piece(n_ids)
    };
    [
        (out_rows * cols * 4) as u64,
        (later_piece(n_ids) * 4) as u64,
    ]
}

/// Slot-0 staging of [`Recorder::dequantize_rows`] over `rows` rows of `cols` values (pieces past the first).
pub fn dequantize_rows_staging(rows: usize, cols: usize) -> u64 {
    (later_piece(rows) * cols * 4) as u64
}

/// Slot-1 staging of [`Recorder::quantize_rows`] over `rows` rows of `cols` values (pieces past the first).
pub fn quantize_rows_staging(rows: usize, cols: usize) -> u64 {
    (later_piece(rows) * cols * 4) as u64
}

/// Slot-2 staging of [`Recorder::sparse_attention`]: f32 scores of `batch * heads` pairs over `capacity` keys.
pub fn sparse_scores_staging(batch: usize, heads: usize, capacity: usize) -> u64 {
    (batch * heads * capacity * 4) as u64
}

/// Largest number of x rows the GEMV kernel handles (its register array); more rows use the tiled GEMM.
pub const GEMV_MAX_ROWS: usize = 8;
/// Largest head_dim the attention kernel handles (its workgroup memory).
pub const MAX_HEAD_DIM: usize = 256;

/// How many of `candidates` earlier positions top-k sparse attention keeps at `sparsity`:
/// `floor(sparsity * candidates)` computed in f32 exactly as [`Recorder::sparse_attention`]'s kernel does, at most
/// `candidates` (0 for a sparsity that is not positive). FlexLLMGen keeps `int(sparsity * (s - 1))` of the `s - 1`
/// cached positions, padding included; strata counts only real tokens, so padding never changes a sequence's result.
pub fn sparse_top_k(sparsity: f32, candidates: usize) -> usize {
    ((sparsity * candidates as f32).floor() as usize).min(candidates)
}

/// Activation fused into a linear layer's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU, `x/2 (1 + erf(x/sqrt 2))`, with erf approximated to 1.5e-7.
    Gelu,
}

impl Act {
    /// The activation's number in the linear epilogue's parameters.
    fn code(self) -> u32 {
        match self {
            Act::None => 0,
            Act::Relu => 1,
            Act::Gelu => 2,
        }
    }
}

/// Where a linear layer writes output row `r`: element `(r, c)` goes to
/// `(r / seg_len) * seg_stride + (r % seg_len + seg_off) * ldo + c` (in f32 elements).
///
/// [`OutRows::dense`] is a plain `[m, ldo]` matrix; [`OutRows::cache`] scatters the rows of `batch` sequences into a
/// KV cache `[batch, capacity, hidden]` after the `past` rows already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutRows {
    /// Rows per segment (one sequence's new tokens).
    pub seg_len: usize,
    /// Elements between segments.
    pub seg_stride: usize,
    /// Row offset inside a segment.
    pub seg_off: usize,
    /// Elements between rows.
    pub ldo: usize,
}

impl OutRows {
    /// Rows `row0..row0 + m` of a dense matrix with `width` columns.
    pub fn dense(width: usize, row0: usize) -> OutRows {
        OutRows {
            seg_len: usize::MAX >> 1,
            seg_stride: 0,
            seg_off: row0,
            ldo: width,
        }
    }

    /// The cache layout `[batch, capacity, width]`, writing `rows_per_seq` new rows per sequence after `past`.
    pub fn cache(rows_per_seq: usize, past: usize, capacity: usize, width: usize) -> OutRows {
        OutRows {
            seg_len: rows_per_seq,
            seg_stride: capacity * width,
            seg_off: past,
            ldo: width,
        }
    }
}

/// How an uncompressed KV cache stores its values (a compressed one is packed: [`crate::compress`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheDtype {
    /// One f32 per value: what an f32 model's cache needs to match its reference within 1e-4.
    #[default]
    F32,
    /// IEEE halves packed two per u32 (low half first): an f16 model's cache, half the bytes of f32 in every tier
    /// and transfer (FlexLLMGen's cache is fp16 too).
    F16,
}

impl CacheDtype {
    /// The cache an OPT model keeps: halves for an f16 checkpoint (as its reference implementation caches, whatever
    /// storage `--dtype` picks for the weights), f32 otherwise, so f32 checkpoints match their reference within
    /// 1e-4. An odd hidden size keeps f32 (halves are written in pairs). The planner counts the same bytes.
    pub fn for_model(config: &crate::config::OptConfig) -> CacheDtype {
        if config.dtype == crate::config::DType::F16 && config.hidden_size % 2 == 0 {
            CacheDtype::F16
        } else {
            CacheDtype::F32
        }
    }

    /// Bytes per cached value.
    pub const fn bytes(self) -> usize {
        match self {
            CacheDtype::F32 => 4,
            CacheDtype::F16 => 2,
        }
    }

    fn index(self) -> usize {
        match self {
            CacheDtype::F32 => 0,
            CacheDtype::F16 => 1,
        }
    }
}

/// Shape of one attention dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// New tokens per sequence in this step (queries).
    pub s_new: usize,
    /// Tokens already in the cache.
    pub past: usize,
    /// Rows per sequence in the cache and the mask.
    pub capacity: usize,
    /// Model width.
    pub hidden: usize,
    /// Attention heads.
    pub n_head: usize,
}

struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Every compiled pipeline, plus the pooled uniform buffer their parameters go through.
pub struct Kernels {
    gpu: Gpu,
    gather: [Kernel; 2],
    gemm: [Kernel; 2],
    /// Per format, per row count 1..=8 (a pipeline constant), built on first use.
    gemv: [[OnceLock<Kernel>; GEMV_MAX_ROWS]; 2],
    layer_norm: Kernel,
    /// Per [`CacheDtype`].
    attention: [Kernel; 2],
    argmax: Kernel,
    sample: Kernel,
    /// q4 kernels by [`Q4`] and bit width (2, 4, 8), built on first use.
    q4: [[OnceLock<Kernel>; 3]; 4],
    /// q4_gemv by bit width and token count 1..=8 (a pipeline constant), built on first use.
    q4_gemv: [[OnceLock<Kernel>; GEMV_MAX_ROWS]; 3],
    scatter: OnceLock<Kernel>,
    cache_rows: OnceLock<Kernel>,
    /// Per [`CacheDtype`], built on first use.
    sparse_attention: [OnceLock<Kernel>; 2],
    cache_store_f16: OnceLock<Kernel>,
    staging: Mutex<[Option<wgpu::Buffer>; STAGING_SLOTS]>,
    /// Bound where an optional input (bias, layer-norm affine) is absent.
    dummy: wgpu::Buffer,
    uniforms: Mutex<Option<wgpu::Buffer>>,
    slot: u64,
    bind_groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
}

/// What a dispatch's bind group is made of: the pipeline, the parameter buffer and slot, the storage buffers.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    pipeline: wgpu::ComputePipeline,
    uniforms: wgpu::Buffer,
    slot: u64,
    buffers: Vec<(u32, wgpu::Buffer)>,
}

/// Cached bind groups beyond this are dropped wholesale (they keep their buffers alive).
const MAX_CACHED_BIND_GROUPS: usize = 1 << 16;

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("gpu", &self.gpu).finish()
    }
}

/// Index of a bit width's q4 pipelines.
fn bits_index(bits: u8) -> usize {
    match bits {
        2 => 0,
        4 => 1,
        _ => 2,
    }
}

/// Index of a dense format's pipelines (packed matrices take the q4 path before this is asked).
fn format_index(format: WeightFormat) -> usize {
    match format {
        WeightFormat::F32 | WeightFormat::Packed(_) => 0,
        WeightFormat::F16 => 1,
    }
}

impl Kernels {
    /// Compiles every kernel for `gpu`.
    pub fn new(gpu: &Gpu) -> Kernels {
        let build =
            |label: &str, parts: &[&str], entry: &str| build_kernel(gpu, label, parts, entry, &[]);
        let by_format = |label: &str, parts: &[&str]| {
            [WEIGHTS_F32, WEIGHTS_F16].map(|weights| {
                let mut all = vec![weights];
                all.extend_from_slice(parts);
                build(label, &all, "main")
            })
        };
        let slot = (gpu.limits.min_uniform_buffer_offset_alignment as u64).max(256);
        Kernels {
            gather: by_format("gather", &[GATHER]),
            gemm: by_format("gemm", &[EPILOGUE, GEMM]),
            gemv: Default::default(),
            layer_norm: build("layer_norm", &[LAYER_NORM], "main"),
            attention: [CACHE_F32, CACHE_F16]
                .map(|cache| build("attention", &[cache, ATTENTION_COMMON, ATTENTION], "main")),
            argmax: build("argmax", &[SELECT], "argmax"),
            sample: build("sample", &[SELECT], "sample"),
            q4: Default::default(),
            q4_gemv: Default::default(),
            scatter: OnceLock::new(),
            cache_rows: OnceLock::new(),
            sparse_attention: Default::default(),
            cache_store_f16: OnceLock::new(),
            staging: Mutex::new(Default::default()),
            dummy: gpu.storage_buffer("absent input", 16),
            uniforms: Mutex::new(None),
            slot,
            bind_groups: Mutex::new(HashMap::new()),
            gpu: gpu.clone(),
        }
    }

    fn gemv(&self, format: WeightFormat, m: usize) -> &Kernel {
        self.gemv[format_index(format)][m - 1].get_or_init(|| {
            let weights = match format {
                WeightFormat::F32 | WeightFormat::Packed(_) => WEIGHTS_F32,
                WeightFormat::F16 => WEIGHTS_F16,
            };
            build_kernel(
                &self.gpu,
                "gemv",
                &[weights, EPILOGUE, GEMV],
                "main",
                &[("M", m as f64)],
            )
        })
    }

    fn q4(&self, which: Q4, bits: u8) -> &Kernel {
        self.q4[which as usize][bits_index(bits)].get_or_init(|| {
            let (label, source) = match which {
                Q4::Gemm => ("q4_gemm", GEMM_WGSL),
                Q4::Dequant => ("q4_dequant", DEQUANT_WGSL),
                Q4::Quantize => ("q4_quantize", QUANTIZE_WGSL),
                Q4::Attention => ("q4_attention", ATTENTION_WGSL),
            };
            build_kernel(
                &self.gpu,
                label,
                &[source],
                "main",
                &[("BITS", bits as f64)],
            )
        })
    }

    /// q4_gemv for `tokens` (1..=8) rows of x at a time.
    fn q4_gemv(&self, bits: u8, tokens: usize) -> &Kernel {
        self.q4_gemv[bits_index(bits)][tokens - 1].get_or_init(|| {
            build_kernel(
                &self.gpu,
                "q4_gemv",
                &[GEMV_WGSL],
                "main",
                &[("BITS", bits as f64), ("TOKENS", tokens as f64)],
            )
        })
    }

    fn scatter(&self) -> &Kernel {
        self.scatter
            .get_or_init(|| build_kernel(&self.gpu, "scatter", &[EPILOGUE, SCATTER], "main", &[]))
    }

    fn cache_rows(&self) -> &Kernel {
        self.cache_rows
            .get_or_init(|| build_kernel(&self.gpu, "cache_rows", &[CACHE_ROWS], "main", &[]))
    }

    fn sparse_attention(&self, dtype: CacheDtype) -> &Kernel {
        self.sparse_attention[dtype.index()].get_or_init(|| {
            let cache = match dtype {
                CacheDtype::F32 => CACHE_F32,
                CacheDtype::F16 => CACHE_F16,
            };
            build_kernel(
                &self.gpu,
                "sparse_attention",
                &[cache, ATTENTION_COMMON, SPARSE_ATTENTION],
                "main",
                &[],
            )
        })
    }

    fn cache_store_f16(&self) -> &Kernel {
        self.cache_store_f16.get_or_init(|| {
            build_kernel(
                &self.gpu,
                "cache_store_f16",
                &[CACHE_STORE_F16],
                "main",
                &[],
            )
        })
    }

    /// Staging buffer `slot` of at least `bytes` bytes (a new, larger one replaces a smaller one; dispatches
    /// recorded earlier keep the buffer they were given).
    fn staging(&self, slot: usize, bytes: u64) -> wgpu::Buffer {
        let mut pool = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        match &pool[slot] {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                let buffer = self.gpu.storage_buffer(
                    "packed kernels' staging",
                    staging_buffer_bytes(bytes, self.gpu.max_binding()),
                );
                pool[slot] = Some(buffer.clone());
                buffer
            }
        }
    }

    /// Hands the kernels their staging buffers (`None`: none yet), replacing any they hold: a run sizes them from
    /// its placement before the first step, so no dispatch grows one.
    pub fn set_staging(&self, buffers: [Option<wgpu::Buffer>; STAGING_SLOTS]) {
        *self.staging.lock().unwrap_or_else(|p| p.into_inner()) = buffers;
    }

    /// The size of each staging buffer the kernels hold now (0: none).
    pub fn staging_sizes(&self) -> [u64; STAGING_SLOTS] {
        let pool = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        std::array::from_fn(|i| pool[i].as_ref().map_or(0, wgpu::Buffer::size))
    }

    /// Drops every cached bind group, releasing the buffers they reference (call when a run's buffers are freed).
    pub fn release_cached_bindings(&self) {
        self.bind_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The device these kernels run on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Starts recording a step.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            kernels: self,
            ops: Vec::new(),
            uniforms: Vec::new(),
        }
    }
}

fn build_kernel(
    gpu: &Gpu,
    label: &str,
    parts: &[&str],
    entry: &str,
    constants: &[(&str, f64)],
) -> Kernel {
    let source: String = parts.join("\n");
    let module = gpu
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
    let pipeline = gpu
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: None,
        });
    let layout = pipeline.get_bind_group_layout(0);
    Kernel { pipeline, layout }
}

enum Op<'a> {
    Dispatch {
        kernel: &'a Kernel,
        slot: u64,
        bindings: Vec<(u32, wgpu::Buffer)>,
        groups: [u32; 3],
    },
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

/// One step's dispatches and copies, submitted together by [`Recorder::submit`].
///
/// Sizes are in elements; every buffer holds f32 unless it is a weight matrix or a list of token ids (u32).
pub struct Recorder<'a> {
    kernels: &'a Kernels,
    ops: Vec<Op<'a>>,
    uniforms: Vec<u8>,
}

/// An all-zero uniform: a no-op dispatch, for shapes the params constructors refuse (they fit by construction:
/// every dimension is bounded by a binding's size).
fn zeroed<T: bytemuck::Zeroable>() -> T {
    T::zeroed()
}

/// The linear epilogue's parameters (shared by the dense kernels and the packed path's scatter pass): the output
/// shape of one weight chunk, where its rows go, bias, activation, accumulation and the first input row.
#[allow(clippy::too_many_arguments)]
fn epilogue_params(
    m: usize,
    chunk: &MatrixChunk,
    cols: usize,
    rows: OutRows,
    has_bias: bool,
    act_code: u32,
    accumulate: bool,
    first_row: usize,
) -> [u32; 12] {
    [
        u32_of(m),
        u32_of(chunk.rows),
        u32_of(cols),
        u32_of(chunk.row0),
        u32_of(rows.ldo),
        u32_of(rows.seg_len),
        u32_of(rows.seg_stride),
        u32_of(rows.seg_off),
        has_bias as u32,
        act_code,
        accumulate as u32,
        u32_of(first_row),
    ]
}

fn u32_of(n: usize) -> u32 {
    // Shapes are bounded by binding sizes (< 2^32 bytes), so element counts fit in u32.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl<'a> Recorder<'a> {
    fn params(&mut self, words: &[u32]) -> u64 {
        let offset = self.uniforms.len() as u64;
        self.uniforms.extend_from_slice(bytemuck::cast_slice(words));
        self.uniforms
            .resize((offset + self.kernels.slot) as usize, 0);
        offset
    }

    /// Folds `n` workgroups into a grid within the per-dimension limit.
    fn grid(&self, n: usize) -> [u32; 3] {
        let max = self
            .kernels
            .gpu
            .limits
            .max_compute_workgroups_per_dimension
            .max(1) as usize;
        if n <= max {
            [u32_of(n.max(1)), 1, 1]
        } else {
            [u32_of(max), u32_of(n.div_ceil(max)), 1]
        }
    }

    fn dispatch(
        &mut self,
        kernel: &'a Kernel,
        params: &[u32],
        bindings: Vec<(u32, &wgpu::Buffer)>,
        groups: [u32; 3],
    ) {
        let slot = self.params(params);
        self.ops.push(Op::Dispatch {
            kernel,
            slot,
            bindings: bindings.into_iter().map(|(i, b)| (i, b.clone())).collect(),
            groups,
        });
    }

    /// `out[t, :] = table[ids[t], :]` (or `+=` when `accumulate`), for `n_ids` ids: embedding lookups. A packed table
    /// must be one chunk (checked when the model is uploaded); its rows are decoded by `q4_dequant`.
    pub fn gather(
        &mut self,
        table: &'a GpuMatrix,
        ids: &'a wgpu::Buffer,
        n_ids: usize,
        out: &'a wgpu::Buffer,
        accumulate: bool,
    ) {
        if let Some(config) = table.format.compression() {
            self.gather_packed(table, config, ids, n_ids, out, accumulate);
            return;
        }
        let kernel = &self.kernels.gather[format_index(table.format)];
        for chunk in &table.chunks {
            let params = [
                u32_of(n_ids),
                u32_of(table.cols),
                u32_of(chunk.row0),
                u32_of(chunk.rows),
                accumulate as u32,
                0,
                0,
                0,
            ];
            let groups = self.grid((n_ids * table.cols).div_ceil(256));
            self.dispatch(
                kernel,
                &params,
                vec![(1, &chunk.buffer), (2, ids), (3, out)],
                groups,
            );
        }
    }

    /// A linear layer: `out[r, c] (+)= act(x[r, :] . w[c, :] + bias[c])` for the `m` rows of `x` (`[m, w.cols]`),
    /// with output rows placed by `rows`. A GEMV kernel serves `m <= 8` (decode), a tiled GEMM larger `m`.
    #[allow(clippy::too_many_arguments)] // one argument per part of the linear layer; a struct would only rename them
    pub fn linear(
        &mut self,
        x: &'a wgpu::Buffer,
        m: usize,
        w: &'a GpuMatrix,
        bias: Option<&'a wgpu::Buffer>,
        act: Act,
        out: &'a wgpu::Buffer,
        rows: OutRows,
        accumulate: bool,
    ) {
        if let Some(config) = w.format.compression() {
            self.linear_packed(x, m, w, config, bias, act, out, rows, accumulate);
            return;
        }
        let gemv = m <= GEMV_MAX_ROWS;
        let kernel = if gemv {
            self.kernels.gemv(w.format, m.max(1))
        } else {
            &self.kernels.gemm[format_index(w.format)]
        };
        let act_code = act.code();
        let bias_buffer = bias.unwrap_or(&self.kernels.dummy);
        for chunk in &w.chunks {
            let params = epilogue_params(
                m,
                chunk,
                w.cols,
                rows,
                bias.is_some(),
                act_code,
                accumulate,
                0,
            );
            let groups = if gemv {
                self.grid(chunk.rows.div_ceil(4))
            } else {
                self.grid(chunk.rows.div_ceil(64) * m.div_ceil(64))
            };
            self.dispatch(
                kernel,
                &params,
                vec![(1, &chunk.buffer), (2, x), (3, bias_buffer), (4, out)],
                groups,
            );
        }
    }

    #[allow(clippy::too_many_arguments)] // Recorder::linear's arguments plus the config
    fn linear_packed(
        &mut self,
        x: &'a wgpu::Buffer,
        m: usize,
        w: &'a GpuMatrix,
        config: CompressionConfig,
        bias: Option<&'a wgpu::Buffer>,
        act: Act,
        out: &'a wgpu::Buffer,
        rows: OutRows,
        accumulate: bool,
    ) {
        let gemv = m <= GEMV_MAX_ROWS;
        let widest = w.chunks.iter().map(|c| c.rows).max().unwrap_or(0).max(1);
        let max_binding = self.kernels.gpu.max_binding();
        let piece = packed_linear_piece(m, widest, w.cols, max_binding);
        let staging = self
            .kernels
            .staging(0, packed_linear_staging(m, widest, w.cols, max_binding)[0]);
        let x_row_bytes = (w.cols * 4) as u64;
        let act_code = act.code();
        let mut r0 = 0;
        while r0 < m {
            let pm = piece.min(m - r0);
            let kernel = if gemv {
                self.kernels.q4_gemv(config.bits, pm)
            } else {
                self.kernels.q4(Q4::Gemm, config.bits)
            };
            // The q4 kernels take no x offset: a piece past the first is copied to the front of staging slot 1.
            let xs = if r0 == 0 {
                x.clone()
            } else {
                let s = self.kernels.staging(1, pm as u64 * x_row_bytes);
                self.copy_owned(
                    x.clone(),
                    r0 as u64 * x_row_bytes,
                    s.clone(),
                    0,
                    pm as u64 * x_row_bytes,
                );
                s
            };
            self.linear_packed_piece(
                &xs, r0, pm, w, config, kernel, gemv, &staging, bias, act_code, out, rows,
                accumulate,
            );
            r0 += pm;
        }
    }

    /// Rows `r0..r0 + m` of a packed linear layer (`x` holds just those rows) through `staging`.
    #[allow(clippy::too_many_arguments)] // linear_packed's state for one piece of x
    fn linear_packed_piece(
        &mut self,
        x: &wgpu::Buffer,
        r0: usize,
        m: usize,
        w: &'a GpuMatrix,
        config: CompressionConfig,
        kernel: &'a Kernel,
        gemv: bool,
        staging: &wgpu::Buffer,
        bias: Option<&'a wgpu::Buffer>,
        act_code: u32,
        out: &'a wgpu::Buffer,
        rows: OutRows,
        accumulate: bool,
    ) {
        let bias_buffer = bias.unwrap_or(&self.kernels.dummy);
        for chunk in &w.chunks {
            let l = PackedLayout::new(chunk.rows, w.cols, config);
            // Dense [m, chunk.rows] into staging; the scatter pass adds bias and places the rows.
            let params = MatmulParams {
                rows: u32_of(chunk.rows),
                cols: u32_of(w.cols),
                batch: u32_of(m),
                words_per_row: u32_of(l.words_per_row),
                groups_per_row: u32_of(l.groups_per_row),
                words_per_group: u32_of(l.words_per_group),
                scale_offset: u32_of(l.scale_offset),
                has_bias: 0,
                x_stride: u32_of(w.cols),
                y_stride: u32_of(chunk.rows),
                pad: [0; 2],
            };
            let groups = if gemv {
                self.grid(params.gemv_workgroups() as usize)
            } else {
                [
                    u32_of(chunk.rows.div_ceil(64).max(1)),
                    u32_of(m.div_ceil(64).max(1)),
                    1,
                ]
            };
            self.dispatch(
                kernel,
                bytemuck::cast_slice(std::slice::from_ref(&params)),
                vec![
                    (1, &chunk.buffer),
                    (2, x),
                    (3, &self.kernels.dummy),
                    (4, staging),
                ],
                groups,
            );
            let epilogue = epilogue_params(
                m,
                chunk,
                w.cols,
                rows,
                bias.is_some(),
                act_code,
                accumulate,
                r0,
            );
            let groups = self.grid((m * chunk.rows).div_ceil(256));
            self.dispatch(
                self.kernels.scatter(),
                &epilogue,
                vec![(2, staging), (3, bias_buffer), (4, out)],
                groups,
            );
        }
    }

    fn gather_packed(
        &mut self,
        table: &'a GpuMatrix,
        config: CompressionConfig,
        ids: &'a wgpu::Buffer,
        n_ids: usize,
        out: &'a wgpu::Buffer,
        accumulate: bool,
    ) {
        let Some(chunk) = table.chunks.first() else {
            return;
        };
        let l = PackedLayout::new(chunk.rows, table.cols, config);
        let kernel = self.kernels.q4(Q4::Dequant, config.bits);
        let row_bytes = (table.cols * 4) as u64;
        let mut start = 0;
        while start < n_ids {
            let n = (n_ids - start).min(MAX_GRID_ROWS);
            // The kernel has no input or output offset: a piece past the first goes through staging.
            let direct = start == 0 && !accumulate;
            let piece_ids = if start == 0 {
                ids.clone()
            } else {
                let s = self.kernels.staging(1, (n * 4) as u64);
                self.copy_owned(
                    ids.clone(),
                    (start * 4) as u64,
                    s.clone(),
                    0,
                    (n * 4) as u64,
                );
                s
            };
            let target = if direct {
                out.clone()
            } else {
                self.kernels.staging(0, n as u64 * row_bytes)
            };
            let mut params = DequantParams::new(&l, n, None).unwrap_or_else(zeroed);
            params.out_rows = u32_of(n);
            let groups = params.grid(config);
            self.dispatch(
                kernel,
                bytemuck::cast_slice(std::slice::from_ref(&params)),
                vec![(1, &chunk.buffer), (2, &piece_ids), (3, &target)],
                [groups.0, groups.1, groups.2],
            );
            if accumulate {
                self.add(&target, out, start * table.cols, n * table.cols);
            } else if !direct {
                self.copy_owned(
                    target,
                    0,
                    out.clone(),
                    start as u64 * row_bytes,
                    n as u64 * row_bytes,
                );
            }
            start += n;
        }
    }

    /// `dst[dst_off + i] += src[i]` for `i < n`.
    fn add(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, dst_off: usize, n: usize) {
        let params = [0, 0, 0, 0, 0, 0, 2, u32_of(n), u32_of(dst_off), 0, 0, 0];
        let groups = self.grid(n.div_ceil(256));
        self.dispatch(
            self.kernels.cache_rows(),
            &params,
            vec![(1, src), (2, dst)],
            groups,
        );
    }

    /// Moves positions `t0..t0 + t_len` of `batch` sequences between the attention kernel's cache layout
    /// `[batch, capacity, heads * head_dim]` and the pair-major `[batch, heads, capacity, head_dim]` row order of a
    /// packed cache (f32 both): `to_pairs` reads `src` in the former and writes `dst` in the latter.
    #[allow(clippy::too_many_arguments)] // the two buffers and the shape of the move
    pub fn permute_cache(
        &mut self,
        src: &'a wgpu::Buffer,
        dst: &'a wgpu::Buffer,
        batch: usize,
        capacity: usize,
        heads: usize,
        head_dim: usize,
        positions: std::ops::Range<usize>,
        to_pairs: bool,
    ) {
        let t_len = positions.len();
        let n = batch * t_len * heads * head_dim;
        if n == 0 {
            return;
        }
        let params = [
            u32_of(batch),
            u32_of(capacity),
            u32_of(heads),
            u32_of(head_dim),
            u32_of(positions.start),
            u32_of(t_len),
            if to_pairs { 0 } else { 1 },
            u32_of(n),
            0,
            0,
            0,
            0,
        ];
        let groups = self.grid(n.div_ceil(256));
        self.dispatch(
            self.kernels.cache_rows(),
            &params,
            vec![(1, src), (2, dst)],
            groups,
        );
    }

    /// Packs `rows` f32 rows of `input` (`[rows, layout.cols]`, dense) into `packed` (a tensor of `layout` under
    /// `config`): input row `r` becomes packed row `first_row + r * row_stride`, quantised by `q4_quantize` with the
    /// same rule as [`crate::compress::quantize`].
    #[allow(clippy::too_many_arguments)] // the source, the destination and its layout, and the row mapping
    pub fn quantize_rows(
        &mut self,
        input: &'a wgpu::Buffer,
        rows: usize,
        packed: &'a wgpu::Buffer,
        layout: PackedLayout,
        config: CompressionConfig,
        first_row: usize,
        row_stride: usize,
    ) {
        let kernel = self.kernels.q4(Q4::Quantize, config.bits);
        let row_bytes = (layout.cols * 4) as u64;
        let mut start = 0;
        while start < rows {
            let n = (rows - start).min(MAX_GRID_ROWS);
            let src = if start == 0 {
                input.clone()
            } else {
                let s = self.kernels.staging(1, n as u64 * row_bytes);
                self.copy_owned(
                    input.clone(),
                    start as u64 * row_bytes,
                    s.clone(),
                    0,
                    n as u64 * row_bytes,
                );
                s
            };
            let dest_row = first_row + start * row_stride;
            let params = QuantizeParams::new(&layout, config, n, dest_row, row_stride)
                .unwrap_or_else(zeroed);
            let groups = params.grid();
            self.dispatch(
                kernel,
                bytemuck::cast_slice(std::slice::from_ref(&params)),
                vec![(1, &src), (2, packed)],
                [groups.0, groups.1, groups.2],
            );
            start += n;
        }
    }

    /// Decodes rows `0..rows` of `packed` (a tensor of `layout` under `config`) into `out` (`[rows, layout.cols]`
    /// f32) with `q4_dequant`.
    pub fn dequantize_rows(
        &mut self,
        packed: &'a wgpu::Buffer,
        layout: PackedLayout,
        config: CompressionConfig,
        rows: usize,
        out: &'a wgpu::Buffer,
    ) {
        let kernel = self.kernels.q4(Q4::Dequant, config.bits);
        let row_bytes = (layout.cols * 4) as u64;
        let mut start = 0;
        while start < rows {
            let n = (rows - start).min(MAX_GRID_ROWS);
            // The output has no offset: pieces past the first decode into staging and are copied into place.
            let target = if start == 0 {
                out.clone()
            } else {
                self.kernels.staging(0, n as u64 * row_bytes)
            };
            let params = DequantParams::new(&layout, n, Some(start)).unwrap_or_else(zeroed);
            let groups = params.grid(config);
            self.dispatch(
                kernel,
                bytemuck::cast_slice(std::slice::from_ref(&params)),
                vec![(1, packed), (2, &self.kernels.dummy), (3, &target)],
                [groups.0, groups.1, groups.2],
            );
            if start > 0 {
                self.copy_owned(
                    target,
                    0,
                    out.clone(),
                    start as u64 * row_bytes,
                    n as u64 * row_bytes,
                );
            }
            start += n;
        }
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
        params: crate::compress::AttentionParams,
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

    /// Layer norm of `rows` rows of `width`: `y = (x - mean) / sqrt(var + eps)`, then `* gamma + beta` when `affine`
    /// is given. `x` and `y` must be different buffers.
    pub fn layer_norm(
        &mut self,
        x: &'a wgpu::Buffer,
        rows: usize,
        width: usize,
        affine: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer)>,
        eps: f32,
        y: &'a wgpu::Buffer,
    ) {
        let (gamma, beta) = affine.unwrap_or((&self.kernels.dummy, &self.kernels.dummy));
        let params = [
            u32_of(rows),
            u32_of(width),
            eps.to_bits(),
            affine.is_some() as u32,
        ];
        let groups = self.grid(rows);
        self.dispatch(
            &self.kernels.layer_norm,
            &params,
            vec![(1, x), (2, gamma), (3, beta), (4, y)],
            groups,
        );
    }

    /// Writes one step's keys or values `src` (`[batch * s_new, hidden]` f32) into the f16 cache `dst`
    /// (`[batch, capacity, hidden]` halves) at positions `past..past + s_new` of each sequence. (An f32 cache is
    /// written directly by the projection's epilogue, [`OutRows::cache`].)
    pub fn store_cache_rows_f16(
        &mut self,
        src: &'a wgpu::Buffer,
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
            0,
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

    /// Causal attention of `q` (`[batch * s_new, hidden]`) over the caches `k`, `v` (`[batch, capacity, hidden]`
    /// values stored as `dtype`, already holding this step's keys and values) under `mask` (`[batch, capacity]`
    /// u32, 1 = real token), into `out` (`[batch * s_new, hidden]`). Scores are scaled by head_dim^-0.5.
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
        let head_dim = shape.hidden / shape.n_head;
        let rows = shape.batch * shape.s_new;
        let params = [
            u32_of(shape.s_new),
            u32_of(shape.past),
            u32_of(shape.capacity),
            u32_of(shape.hidden),
            u32_of(shape.n_head),
            u32_of(head_dim),
            (head_dim as f32).powf(-0.5).to_bits(),
            u32_of(rows),
        ];
        let groups = self.grid(rows * shape.n_head);
        self.dispatch(
            &self.kernels.attention[dtype.index()],
            &params,
            vec![(1, q), (2, k), (3, v), (4, mask), (5, out)],
            groups,
        );
    }

    /// Top-k sparse decode attention (`--attn-sparsity`): `q` is `[batch, hidden]`, one new token per sequence whose
    /// key and value are already at row `shape.past` of the caches `k`, `v` (`[batch, capacity, hidden]` values
    /// stored as `dtype`), `mask` is
    /// `[batch, capacity]` (1 = real token), `out` is `[batch, hidden]`.
    ///
    /// Per (sequence, head), FlexLLMGen's rule: the softmax is taken over every visible key; the output sums the
    /// value rows of the new token and of the [`sparse_top_k`]`(sparsity, n)` highest-scoring of the `n` visible
    /// keys before it (equal scores: the earlier position first), each weighted by its softmax probability (no
    /// renormalisation). With `sparsity` 1 every key is kept, which [`Recorder::attention`] computes faster.
    /// Scores go through a staging buffer of `batch * heads * capacity` f32 owned by the kernels (sized once per
    /// run). `shape.s_new` must be 1.
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
        let head_dim = shape.hidden / shape.n_head;
        let pairs = shape.batch * shape.n_head;
        let scores = self.kernels.staging(
            SCORES_SLOT,
            sparse_scores_staging(shape.batch, shape.n_head, shape.capacity),
        );
        let params = [
            u32_of(shape.past),
            u32_of(shape.capacity),
            u32_of(shape.hidden),
            u32_of(shape.n_head),
            u32_of(head_dim),
            (head_dim as f32).powf(-0.5).to_bits(),
            u32_of(shape.batch),
            sparsity.to_bits(),
        ];
        let groups = self.grid(pairs);
        self.dispatch(
            self.kernels.sparse_attention(dtype),
            &params,
            vec![(1, q), (2, k), (3, v), (4, mask), (5, &scores), (6, out)],
            groups,
        );
    }

    /// Greedy choice: `next[r] = argmax(logits[r, :])` (lowest id on ties) for `rows` rows of `vocab`.
    pub fn argmax(
        &mut self,
        logits: &'a wgpu::Buffer,
        rows: usize,
        vocab: usize,
        next: &'a wgpu::Buffer,
    ) {
        let params = [u32_of(rows), u32_of(vocab), 0, 0, 0, 0, 0, 0];
        self.dispatch(
            &self.kernels.argmax,
            &params,
            vec![(1, logits), (2, next)],
            [u32_of(rows), 1, 1],
        );
    }

    /// Sampling: softmax(logits / temperature) restricted to the top-p nucleus, drawn with a generator keyed by
    /// `(seed, step, row)`.
    #[allow(clippy::too_many_arguments)] // the sampler's own parameters
    pub fn sample(
        &mut self,
        logits: &'a wgpu::Buffer,
        rows: usize,
        vocab: usize,
        temperature: f32,
        top_p: f32,
        seed: u32,
        step: u32,
        next: &'a wgpu::Buffer,
    ) {
        let params = [
            u32_of(rows),
            u32_of(vocab),
            temperature.to_bits(),
            top_p.to_bits(),
            seed,
            step,
            0,
            0,
        ];
        self.dispatch(
            &self.kernels.sample,
            &params,
            vec![(1, logits), (2, next)],
            [u32_of(rows), 1, 1],
        );
    }

    /// Copies `size` bytes (multiples of 4, like the offsets) between buffers, in order with the dispatches.
    pub fn copy(
        &mut self,
        src: &'a wgpu::Buffer,
        src_offset: u64,
        dst: &'a wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    ) {
        self.copy_owned(src.clone(), src_offset, dst.clone(), dst_offset, size);
    }

    fn copy_owned(
        &mut self,
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    ) {
        self.ops.push(Op::Copy {
            src,
            src_offset,
            dst,
            dst_offset,
            size,
        });
    }

    /// Number of dispatches and copies recorded so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Encodes everything recorded into one command buffer and submits it.
    pub fn submit(self) -> wgpu::SubmissionIndex {
        let kernels = self.kernels;
        let gpu = &kernels.gpu;
        let mut pool = kernels.uniforms.lock().unwrap_or_else(|p| p.into_inner());
        let needed = (self.uniforms.len() as u64).max(kernels.slot);
        if pool.as_ref().is_none_or(|b| b.size() < needed) {
            *pool = Some(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kernel parameters"),
                size: needed.next_power_of_two(),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let uniforms = pool.as_ref().expect("parameter buffer was just created");
        if !self.uniforms.is_empty() {
            gpu.queue.write_buffer(uniforms, 0, &self.uniforms);
        }
        let mut cache = kernels
            .bind_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.len() > MAX_CACHED_BIND_GROUPS {
            cache.clear();
        }
        let bind_groups: Vec<Option<wgpu::BindGroup>> = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Dispatch {
                    kernel,
                    slot,
                    bindings,
                    ..
                } => {
                    let key = BindKey {
                        pipeline: kernel.pipeline.clone(),
                        uniforms: uniforms.clone(),
                        slot: *slot,
                        buffers: bindings.clone(),
                    };
                    let group = cache.entry(key).or_insert_with(|| {
                        let mut entries = vec![wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: uniforms,
                                offset: *slot,
                                size: wgpu::BufferSize::new(kernels.slot.min(256)),
                            }),
                        }];
                        entries.extend(bindings.iter().map(|(binding, buffer)| {
                            wgpu::BindGroupEntry {
                                binding: *binding,
                                resource: buffer.as_entire_binding(),
                            }
                        }));
                        gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: None,
                            layout: &kernel.layout,
                            entries: &entries,
                        })
                    });
                    Some(group.clone())
                }
                Op::Copy { .. } => None,
            })
            .collect();
        drop(cache);
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        let mut i = 0;
        while i < self.ops.len() {
            if let Op::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } = &self.ops[i]
            {
                encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                i += 1;
                continue;
            }
            // One compute pass per run of consecutive dispatches.
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            while let Some(Op::Dispatch { kernel, groups, .. }) = self.ops.get(i) {
                pass.set_pipeline(&kernel.pipeline);
                pass.set_bind_group(0, bind_groups[i].as_ref(), &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                i += 1;
            }
        }
        gpu.queue.submit([encoder.finish()])
    }
}
