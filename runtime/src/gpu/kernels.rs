//! The compute kernels (WGSL in `kernels/*.wgsl`) and the one place that dispatches them.
//!
//! A [`Recorder`] collects one step's work (dispatches and copies) and submits it as one command buffer: a submit
//! costs ~40 us on an H200 and ~118 us on lavapipe, so the forward pass of a step is one submit. Kernel parameters
//! go into one pooled uniform buffer, one 256-byte-aligned slot per dispatch; nothing else is allocated per step.
//! Bind groups are cached by (pipeline, parameter slot, buffers): decode steps record the same dispatches on the
//! same buffers with only parameter values changing, so after the first decode step no bind group is created.
//!
//! Activations are stored as [`ActDtype`] (f32, or f16 where the kernels are built with it: [`KernelOptions`]);
//! weights are f32, packed f16 or group-wise quantised ([`crate::gpu::tensor::WeightFormat`]); every kernel
//! computes and accumulates in f32.
//!
//! Linear layers and embedding gathers live in `kernels/linear.rs` (`gemv.wgsl`, `gemm.wgsl`, `gemm_coop.wgsl`,
//! each reading every weight format through a `weights_*.wgsl` part; bias, activation, placement and residual in
//! `linear_common.wgsl`'s epilogue); which variant of them runs on this device, and the self-check a device-specific
//! variant must pass first, in `kernels/variants.rs` ([`Kernels::variants`] reports it).
//!
//! Attention (`kernels/attention.rs`): [`Recorder::attention`] runs flash-style query blocks for a prefill and split
//! keys (flash-decoding) for a decode step ([`AttentionKernel`]); [`Recorder::sparse_attention`]
//! (`sparse_attention.wgsl`) is the decode attention of `--attn-sparsity` below 1, keeping per (sequence, head) the
//! new token and the [`sparse_top_k`] best-scoring earlier real tokens. Split keys' partial results and sparse
//! attention's scores go through a third staging slot.
//!
//! # Packed (compressed) caches
//!
//! Packed weights are read by the linear kernels themselves (`weights_packed.wgsl`). A packed KV cache uses the
//! compress module's kernels (`runtime/src/gpu/kernels/q4_*.wgsl`, compiled here per bit width on first use, after
//! the activation part: the rows they pack, decode, attend with and write are activations):
//! [`Recorder::quantize_rows`] and [`Recorder::packed_attention`] append to and attend over it,
//! [`Recorder::dequantize_rows`] decodes it. The q4 kernels take no input or output offsets, so work beyond one
//! dispatch's grid (65535 rows) goes through staging buffers with buffer-to-buffer copies. Staging buffers are owned
//! by [`Kernels`], grown on demand (the first step sizes them) and shared by every dispatch of a step: the queue runs
//! dispatches one after another.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::compress::{
    CompressionConfig, DequantParams, PackedLayout, QuantizeParams, ATTENTION_WGSL, DEQUANT_WGSL,
    QUANTIZE_WGSL,
};
use crate::gpu::timer::GpuTimer;
use crate::gpu::Gpu;

mod linear;
mod variants;

pub(crate) use linear::DeviceCache;
pub use linear::{
    all_pipeline_keys, compose, max_split_k_scratch_bytes, split_k, split_k_scratch_bytes,
    CoopConfig, LinearCall, LinearKernel, ModuleKind, OutDtype, PipelineKey, SplitK, TileConfig,
    Variant, WeightKind, DECODE_MAX_ROWS, GEMV_MAX_ROWS, SPLIT_K_WORKGROUPS,
};
pub use variants::{
    decode_act, encode_act, Choice, Family, FamilyChoice, KernelOptions, KernelReport,
};

pub mod bench;
pub use bench::{bench_linear, LinearShape, LinearTiming};

mod attention;
pub use attention::{
    attention_scratch_bytes, decode_splits, sparse_attention_scratch_bytes,
    split_keys_scratch_bytes, AttentionKernel, QueryBlockTiles, ATTENTION_WORKGROUP,
    MIN_SPLIT_KEYS, SPLIT_TARGET_WORKGROUPS,
};

const ACT_F32: &str = include_str!("kernels/act_f32.wgsl");
const ACT_F16: &str = include_str!("kernels/act_f16.wgsl");
const LAYER_NORM: &str = include_str!("kernels/layer_norm.wgsl");
const SELECT: &str = include_str!("kernels/select.wgsl");
const CACHE_ROWS: &str = include_str!("kernels/cache_rows.wgsl");

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

/// The compress module's cache kernels, each compiled per bit width.
#[derive(Clone, Copy)]
enum Q4 {
    Dequant,
    Quantize,
    Attention,
}

/// Staging buffers (the kernels' scratch), each grown on demand or handed over sized by a run's placement
/// ([`Kernels::set_staging`]) so no dispatch grows one: slot 0 holds dequantised cache rows past a dispatch's grid
/// ([`dequantize_rows_staging`]), slot 1 rows to quantise past it ([`quantize_rows_staging`]), slot 2 attention's
/// scratch (split-keys partials, sparse attention's scores: [`attention_scratch_bytes`],
/// [`sparse_attention_scratch_bytes`]), slot 3 split-K partial sums ([`split_k_scratch_bytes`]).
pub const STAGING_SLOTS: usize = 4;
/// The staging slot of attention's scratch.
pub const ATTENTION_SLOT: usize = 2;
/// The staging slot of split-K partial sums.
pub const SPLIT_K_SLOT: usize = 3;

/// The buffer a staging request of `bytes` gets: a power of two (so a slot is rarely regrown), at least 16 bytes,
/// at most one binding.
pub fn staging_buffer_bytes(bytes: u64, max_binding: u64) -> u64 {
    bytes.max(16).next_power_of_two().min(max_binding)
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

/// Slot-0 staging of [`Recorder::dequantize_rows`] over `rows` rows of `cols` values stored as `act` (pieces past
/// the first).
pub fn dequantize_rows_staging(rows: usize, cols: usize, act: ActDtype) -> u64 {
    (later_piece(rows) * cols * act.bytes()) as u64
}

/// Slot-1 staging of [`Recorder::quantize_rows`] over `rows` rows of `cols` values stored as `act` (pieces past the
/// first).
pub fn quantize_rows_staging(rows: usize, cols: usize, act: ActDtype) -> u64 {
    (later_piece(rows) * cols * act.bytes()) as u64
}

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

    /// The cache dtype that reads values stored as activations of `act` (the same bytes: an f16 cache's halves are
    /// an `array<f16>`): for the packed cache's scratch, which holds keys and values as activations.
    pub const fn of_act(act: ActDtype) -> CacheDtype {
        match act {
            ActDtype::F32 => CacheDtype::F32,
            ActDtype::F16 => CacheDtype::F16,
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

#[derive(Clone)]
struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Every compiled pipeline, plus the pooled uniform buffer their parameters go through.
pub struct Kernels {
    gpu: Gpu,
    options: KernelOptions,
    /// Each linear family's variant, chosen once ([`variants`]).
    resolved: variants::Resolved,
    layer_norm: Kernel,
    argmax: Kernel,
    sample: Kernel,
    /// q4 kernels by [`Q4`] and bit width (2, 4, 8), built on first use.
    q4: [[OnceLock<Kernel>; 3]; 3],
    cache_rows: OnceLock<Kernel>,
    attention: attention::AttentionKernels,
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

impl Kernels {
    /// Compiles the kernels for `gpu` with [`KernelOptions::default`]: f32 activations, each family's variant
    /// chosen on first use unless `STRATA_KERNELS=portable`.
    pub fn new(gpu: &Gpu) -> Kernels {
        Kernels::with_options(gpu, KernelOptions::default())
    }

    /// Compiles the kernels for `gpu` with `options` (activation dtype, variant choices). Linear pipelines are
    /// compiled on first use; a device-specific variant is self-checked the first time its family is needed.
    pub fn with_options(gpu: &Gpu, options: KernelOptions) -> Kernels {
        // f16 activations need shader-f16; elsewhere they stay f32 (callers read `act()`).
        let options = if gpu.features.contains(wgpu::Features::SHADER_F16) {
            options
        } else {
            options.with_act(ActDtype::F32)
        };
        let build =
            |label: &str, parts: &[&str], entry: &str| build_kernel(gpu, label, parts, entry, &[]);
        let slot = (gpu.limits.min_uniform_buffer_offset_alignment as u64).max(256);
        Kernels {
            options,
            resolved: Default::default(),
            layer_norm: build("layer_norm", &[options.act.wgsl(), LAYER_NORM], "main"),
            argmax: build("argmax", &[SELECT], "argmax"),
            sample: build("sample", &[SELECT], "sample"),
            q4: Default::default(),
            cache_rows: OnceLock::new(),
            attention: Default::default(),
            staging: Mutex::new(Default::default()),
            dummy: gpu.storage_buffer("absent input", 16),
            uniforms: Mutex::new(None),
            slot,
            bind_groups: Mutex::new(HashMap::new()),
            gpu: gpu.clone(),
        }
    }

    fn q4(&self, which: Q4, bits: u8) -> &Kernel {
        self.q4[which as usize][bits_index(bits)].get_or_init(|| {
            let (label, source) = match which {
                Q4::Dequant => ("q4_dequant", DEQUANT_WGSL),
                Q4::Quantize => ("q4_quantize", QUANTIZE_WGSL),
                Q4::Attention => ("q4_attention", ATTENTION_WGSL),
            };
            build_kernel(
                &self.gpu,
                label,
                &[self.act().wgsl(), source],
                "main",
                &[("BITS", bits as f64)],
            )
        })
    }

    fn cache_rows(&self) -> &Kernel {
        self.cache_rows.get_or_init(|| {
            build_kernel(
                &self.gpu,
                "cache_rows",
                &[self.act().wgsl(), CACHE_ROWS],
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
                    "kernel staging",
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

/// One WGSL module the runtime can compile, as handed to wgpu: for tests that validate every module with naga.
#[derive(Clone, Debug)]
pub struct ShaderModuleSource {
    /// What it is (kernel and specialisation).
    pub label: String,
    /// The concatenated parts.
    pub source: String,
    /// The entry point.
    pub entry: &'static str,
    /// Pipeline-overridable constants and their values.
    pub constants: Vec<(&'static str, f64)>,
}

/// Every WGSL module [`Kernels`] can build: each linear-family pipeline (for both activation dtypes, the
/// tensor-core kernels for subgroups of 4 to 128 invocations) and every other kernel with each of its
/// specialisations. A kernel added to [`Kernels`] must be listed here, so a naga failure or invalid shader fails CI.
pub fn shader_modules() -> Vec<ShaderModuleSource> {
    let module = |label: String, parts: &[&str], entry, constants: Vec<(&'static str, f64)>| {
        ShaderModuleSource {
            label,
            source: parts.join("\n"),
            entry,
            constants,
        }
    };
    let mut all = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        for key in all_pipeline_keys(&[4, 8, 16, 32, 64, 128]) {
            let (source, constants) = compose(act, &key);
            all.push(ShaderModuleSource {
                label: format!("{key:?} {act:?}"),
                source,
                entry: "main",
                constants,
            });
        }
        all.push(module(
            format!("layer_norm {act:?}"),
            &[act.wgsl(), LAYER_NORM],
            "main",
            vec![],
        ));
    }
    all.extend(attention::attention_modules());
    for entry in ["argmax", "sample"] {
        all.push(module(entry.into(), &[SELECT], entry, vec![]));
    }
    for act in [ActDtype::F32, ActDtype::F16] {
        all.push(module(
            format!("cache_rows {act:?}"),
            &[act.wgsl(), CACHE_ROWS],
            "main",
            vec![],
        ));
        for (name, source) in [
            ("q4_dequant", DEQUANT_WGSL),
            ("q4_quantize", QUANTIZE_WGSL),
            ("q4_attention", ATTENTION_WGSL),
        ] {
            for bits in [2u8, 4, 8] {
                all.push(module(
                    format!("{name} {bits} bits {act:?}"),
                    &[act.wgsl(), source],
                    "main",
                    vec![("BITS", bits as f64)],
                ));
            }
        }
    }
    all
}

/// The kernel of `parts` (concatenated) at `entry` with `constants`, compiled once per device: lavapipe takes up to
/// hundreds of milliseconds per pipeline, and every generator, policy run and probe builds its own [`Kernels`].
fn build_kernel(
    gpu: &Gpu,
    label: &str,
    parts: &[&str],
    entry: &str,
    constants: &[(&str, f64)],
) -> Kernel {
    let key = format!("{entry} {constants:?}\n{}", parts.concat());
    if let Some(found) = gpu
        .cache
        .modules
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
    {
        return found.clone();
    }
    // Compiled outside the lock, like the linear pipelines.
    let kernel = compile_kernel(gpu, label, parts, entry, constants);
    gpu.cache
        .modules
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert(kernel)
        .clone()
}

/// Compiles a kernel (no cache: [`build_kernel`]).
fn compile_kernel(
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

enum Op {
    Dispatch {
        kernel: Kernel,
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
/// Sizes are in elements. Activations (inputs and outputs of linear layers, gather and layer norm) are stored as the
/// kernels' [`ActDtype`]; other buffers hold f32 unless they are weight matrices, caches or token ids (u32).
pub struct Recorder<'a> {
    kernels: &'a Kernels,
    ops: Vec<Op>,
    uniforms: Vec<u8>,
}

/// An all-zero uniform: a no-op dispatch, for shapes the params constructors refuse (they fit by construction:
/// every dimension is bounded by a binding's size).
fn zeroed<T: bytemuck::Zeroable>() -> T {
    T::zeroed()
}

fn u32_of(n: usize) -> u32 {
    // Shapes are bounded by binding sizes (< 2^32 bytes), so element counts fit in u32.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl<'a> Recorder<'a> {
    /// How the kernels recording here store activations ([`Kernels::act`]).
    pub fn act(&self) -> ActDtype {
        self.kernels.act()
    }

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
        kernel: &Kernel,
        params: &[u32],
        bindings: Vec<(u32, &wgpu::Buffer)>,
        groups: [u32; 3],
    ) {
        self.dispatch_owned(kernel.clone(), params, bindings, groups);
    }

    fn dispatch_owned(
        &mut self,
        kernel: Kernel,
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

    /// Moves positions `t0..t0 + t_len` of `batch` sequences between the attention kernel's cache layout
    /// `[batch, capacity, heads * head_dim]` and the pair-major `[batch, heads, capacity, head_dim]` row order of a
    /// packed cache (activations, [`Kernels::act`], both): `to_pairs` reads `src` in the former and writes `dst` in the latter.
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
        let shape = [
            batch,
            capacity,
            heads,
            head_dim,
            positions.start,
            positions.len(),
        ];
        self.cache_rows_pass(src, dst, shape, if to_pairs { 0 } else { 1 }, 0);
    }

    /// One pass of `cache_rows.wgsl` in `mode` (its header lists them) over positions `t0..t0 + t_len` of the
    /// `[batch, capacity, heads * head_dim]` layout, `shape = [batch, capacity, heads, head_dim, t0, t_len]`; `off` is
    /// the mode's element offset.
    fn cache_rows_pass(
        &mut self,
        src: &'a wgpu::Buffer,
        dst: &'a wgpu::Buffer,
        shape: [usize; 6],
        mode: u32,
        off: usize,
    ) {
        let [batch, _, heads, head_dim, _, t_len] = shape;
        let n = batch * t_len * heads * head_dim;
        if n == 0 {
            return;
        }
        let mut params = [0u32; 12];
        for (p, v) in params.iter_mut().zip(shape) {
            *p = u32_of(v);
        }
        params[6] = mode;
        params[7] = u32_of(n);
        params[8] = u32_of(off);
        let groups = self.grid(n.div_ceil(256));
        self.dispatch(
            self.kernels.cache_rows(),
            &params,
            vec![(1, src), (2, dst)],
            groups,
        );
    }

    /// Packs `rows` rows of `input` (`[rows, layout.cols]` activations, dense) into `packed` (a tensor of `layout` under
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
        let row_bytes = (layout.cols * self.act().bytes()) as u64;
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
    /// activations) with `q4_dequant`.
    pub fn dequantize_rows(
        &mut self,
        packed: &'a wgpu::Buffer,
        layout: PackedLayout,
        config: CompressionConfig,
        rows: usize,
        out: &'a wgpu::Buffer,
    ) {
        let kernel = self.kernels.q4(Q4::Dequant, config.bits);
        let row_bytes = (layout.cols * self.act().bytes()) as u64;
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
        self.submit_with(None)
    }

    /// [`Recorder::submit`], with the GPU's timestamps written at the start of the first compute pass and the end of
    /// the last (read them with [`GpuTimer::seconds`] once it has run). For benchmarks: the step should begin and end
    /// with a dispatch, since copies before the first pass or after the last are not timed.
    pub fn submit_timed(self, timer: &GpuTimer) -> wgpu::SubmissionIndex {
        self.submit_with(Some(timer))
    }

    fn submit_with(self, timer: Option<&GpuTimer>) -> wgpu::SubmissionIndex {
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
        let first_dispatch = self
            .ops
            .iter()
            .position(|op| matches!(op, Op::Dispatch { .. }));
        let last_dispatch = self
            .ops
            .iter()
            .rposition(|op| matches!(op, Op::Dispatch { .. }));
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
            let end = self.ops[i..]
                .iter()
                .position(|op| !matches!(op, Op::Dispatch { .. }))
                .map_or(self.ops.len(), |n| i + n);
            let timestamp_writes = timer
                .filter(|_| Some(i) == first_dispatch || Some(end - 1) == last_dispatch)
                .map(|t| wgpu::ComputePassTimestampWrites {
                    query_set: &t.queries,
                    beginning_of_pass_write_index: (Some(i) == first_dispatch).then_some(0),
                    end_of_pass_write_index: (Some(end - 1) == last_dispatch).then_some(1),
                });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes,
            });
            while let Some(Op::Dispatch { kernel, groups, .. }) = self.ops.get(i) {
                pass.set_pipeline(&kernel.pipeline);
                pass.set_bind_group(0, bind_groups[i].as_ref(), &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                i += 1;
            }
        }
        if let Some(timer) = timer {
            timer.resolve(&mut encoder);
        }
        gpu.queue.submit([encoder.finish()])
    }
}
