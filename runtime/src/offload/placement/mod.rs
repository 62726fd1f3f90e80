//! The placement: where every byte of a run lives, computed once, before anything is allocated, from the model's
//! config, the policy, the workload and the device's limits.
//!
//! A [`Placement`] holds every decision the offloading runtime makes about memory:
//! - per decoder layer, each tensor's tier (every layer is placed alike: the layers have the same tensors);
//! - per GPU batch, which sequences keep their KV cache and their hidden rows on the GPU, in CPU memory or on disk,
//!   and whether the batch attends on the CPU at decode;
//! - the cache's row layout ([`CacheRows`]);
//! - and the named list of every buffer the run holds ([`Placement::buffers`]): weights, cache and activation homes,
//!   weight / cache / activation slots, the forward pass's working buffers and the kernels' scratch, each with its
//!   tier and exact size.
//!
//! The memory plan ([`Placement::plan`]), the cap check, `strata bench`'s planned figures and the cost model's byte
//! counts ([`linear_terms`]) are read from it; the runtime's stores allocate exactly its list through
//! [`crate::offload::ledger::Ledger`], which records every allocation, so "the plan is the allocation" is checked
//! to the byte (tests/plan_matches_runtime.rs).
//!
//! Placement rules (FlexLLMGen's, generalised), each written once, here:
//! - The tensors outside the decoder layers (token and position embeddings, project_in/out, the final layer norm,
//!   an untied LM head) stay on the GPU under every policy: every GPU batch reads them at the start and end of every
//!   step, so streaming them would move the largest matrix twice per step. The weight percents place the layers.
//! - Decoder weights are placed per placement group (a layer, or its attention and MLP halves with `sep_layer`) by
//!   cumulative size: a tensor goes to the tier its midpoint falls in, the first `w_disk`% of the group's bytes on
//!   disk, the next `w_cpu`% in CPU memory, the rest on the GPU ([`place_by_midpoint`]).
//! - The KV cache and the activations are split by whole sequences, the same way in every GPU batch: the first
//!   `gpu`% of a batch's sequences on the GPU, the next `cpu`% in CPU memory, the rest on disk ([`sequence_tier`]).
//!   A batch whose sequences all stay on the GPU keeps its own buffers; any other has one home per sequence and
//!   computes in a slot (cache slots twice with overlap; one activation slot). Offloaded activations have no
//!   resident residual stream: their batch computes in the activation slot.
//! - A batch attends on the CPU at decode when `cpu_cache_compute` is on, every one of its sequences' cache lives in
//!   CPU memory and the cache is uncompressed, or packed with dense attention (attn_sparsity 1: the CPU routine
//!   over packed rows has no top-k) ([`BatchPlacement::cpu_attention`]).
//! - Sizes: every buffer is whole 4-byte words ([`crate::gpu::buffer_size`]); activations are [`act_dtype`], the
//!   cache [`CacheDtype::for_model`] or packed; a matrix is row chunks of at most one binding
//!   ([`crate::gpu::tensor::chunk_rows`]), vectors are f32; the kernels' staging follows the `*_staging` formulas of
//!   [`crate::gpu::kernels`].

mod buffers;
mod cache_rows;
mod linear;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

pub use buffers::{BufferId, BufferSpec, CpuAttnPart, InputPart, Kind, Kv, ScratchPart, WorkPart};
pub use cache_rows::{CacheRange, CacheRows};
pub use linear::{linear_terms, linear_terms_with, Affine, WeightSummary};

use super::policy::{format_bytes, Policy, PolicyError, TierSplit, Transfer};
use crate::compress::{CompressionConfig, PackedLayout};
use crate::config::{ConfigError, DType, OptConfig};
use crate::gpu::buffer_size;
use crate::gpu::kernels::{
    attention_scratch_bytes, dequantize_rows_staging, quantize_rows_staging,
    sparse_attention_scratch_bytes, split_k_scratch_bytes, staging_buffer_bytes, ActDtype,
    AttentionShape, CacheDtype, ATTENTION_SLOT, GEMV_MAX_ROWS, SPLIT_K_SLOT, STAGING_SLOTS,
};
use crate::gpu::tensor::{chunk_rows, WeightFormat};
use crate::gpu::Gpu;
use crate::tiers::Tier;
use crate::weights::{
    layer_tensor_kinds, layer_tensor_spec, model_tensor_spec, outside_layer_tensors, LayerPart,
    LayerTensor, ModelTensor, TensorId, TensorSpec,
};

/// How activations (hidden rows, projections, attention output, FFN intermediate) are stored on the GPU and in every
/// tier: the one rule every activation byte count reads (homes, slots, working buffers, the cost model) and the
/// kernels a run compiles ([`crate::gpu::kernels::KernelOptions::act`]).
///
/// Activations follow the checkpoint: halves for an f16 checkpoint on a device with SHADER_F16 (arithmetic and
/// accumulation stay f32; only what goes through memory is rounded), f32 otherwise: f32 checkpoints, bf16
/// checkpoints (which compute as f32), devices without shader-f16, and `--dtype f32` (weights widened to f32 compute
/// with f32 activations; `--dtype f16` on an f32 checkpoint keeps f32 activations, since the checkpoint is f32).
/// A head_dim that is odd keeps f32 too: rows and heads move in whole 4-byte words (copies, homes, q4 pieces).
pub fn act_dtype(config: &OptConfig, policy: &Policy, limits: &DeviceLimits) -> ActDtype {
    let f16_checkpoint = config.dtype == DType::F16 && policy.weight_dtype != Some(DType::F32);
    let whole_words =
        config.n_head > 0 && config.hidden_size % config.n_head == 0 && config.head_dim() % 2 == 0;
    if f16_checkpoint && whole_words && limits.shader_f16 {
        ActDtype::F16
    } else {
        ActDtype::F32
    }
}

/// How a run stores its weight matrices: packed under weight compression, else the policy's `weight_dtype` or the
/// checkpoint's (bf16 becomes f32). Vectors (biases, layer norms) are f32 whatever the format.
pub fn weight_format(config: &OptConfig, policy: &Policy) -> WeightFormat {
    if policy.compress_weight {
        WeightFormat::Packed(policy.compress_weight_config)
    } else {
        WeightFormat::choose(config.dtype, policy.weight_dtype)
    }
}

/// Prompt and generation lengths of a run (every sequence padded to the same prompt length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per sequence.
    pub gen_len: usize,
}

impl Workload {
    /// Positions the KV cache holds per sequence.
    pub fn seq_len(&self) -> usize {
        self.prompt_len + self.gen_len
    }
}

/// The most sequences one placement lists: it names every sequence's cache and activation homes per layer, so its
/// size grows with the block; this keeps planning an absurd batch a quick refusal instead of an enumeration that
/// never ends.
pub const MAX_BLOCK_SEQUENCES: usize = 1 << 16;

/// What the device allows: the placement splits matrices into row chunks that each fit one binding and refuses any
/// other buffer that would not; whether it has SHADER_F16 decides the activation dtype ([`act_dtype`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// The largest storage binding (and buffer) strata creates, in bytes ([`Gpu::max_binding`]).
    pub max_binding: u64,
    /// The device has `wgpu::Features::SHADER_F16` (f16 storage and arithmetic in WGSL).
    pub shader_f16: bool,
}

impl DeviceLimits {
    /// Nothing limits: no binding limit (a matrix is one chunk) and every feature, for planning without a device
    /// (the cost model, `policy`): an f16 checkpoint is planned with f16 activations, as every GPU strata targets
    /// runs it.
    pub const UNBOUNDED: DeviceLimits = DeviceLimits {
        // The largest multiple of 4.
        max_binding: !3,
        shader_f16: true,
    };

    /// The limits of `gpu`.
    pub fn of(gpu: &Gpu) -> DeviceLimits {
        DeviceLimits {
            max_binding: gpu.max_binding(),
            shader_f16: gpu.features.contains(wgpu::Features::SHADER_F16),
        }
    }
}

/// Bytes on each tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierBytes {
    /// On the GPU.
    pub gpu: u64,
    /// In CPU memory.
    pub cpu: u64,
    /// On disk.
    pub disk: u64,
}

impl TierBytes {
    /// The bytes on `tier`.
    pub fn get(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Gpu => self.gpu,
            Tier::Cpu => self.cpu,
            Tier::Disk => self.disk,
        }
    }

    /// Adds `bytes` on `tier`.
    pub fn add_to(&mut self, tier: Tier, bytes: u64) {
        match tier {
            Tier::Gpu => self.gpu += bytes,
            Tier::Cpu => self.cpu += bytes,
            Tier::Disk => self.disk += bytes,
        }
    }

    /// Takes `bytes` off `tier`.
    pub fn sub_from(&mut self, tier: Tier, bytes: u64) {
        match tier {
            Tier::Gpu => self.gpu -= bytes,
            Tier::Cpu => self.cpu -= bytes,
            Tier::Disk => self.disk -= bytes,
        }
    }

    /// Sum over tiers.
    pub fn total(&self) -> u64 {
        self.gpu + self.cpu + self.disk
    }

    /// Tier by tier.
    pub fn plus(self, o: TierBytes) -> TierBytes {
        TierBytes {
            gpu: self.gpu + o.gpu,
            cpu: self.cpu + o.cpu,
            disk: self.disk + o.disk,
        }
    }

    /// The larger of the two, tier by tier.
    pub fn max(self, o: TierBytes) -> TierBytes {
        TierBytes {
            gpu: self.gpu.max(o.gpu),
            cpu: self.cpu.max(o.cpu),
            disk: self.disk.max(o.disk),
        }
    }
}

/// Per-tier memory caps in bytes (`None`: no cap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// GPU cap.
    pub gpu: Option<u64>,
    /// CPU cap.
    pub cpu: Option<u64>,
    /// Disk cap.
    pub disk: Option<u64>,
}

impl Caps {
    /// The caps a policy carries.
    pub fn of(policy: &Policy) -> Caps {
        Caps {
            gpu: policy.gpu_mem,
            cpu: policy.cpu_mem,
            disk: policy.disk_mem,
        }
    }

    /// The cap of `tier`.
    pub fn get(&self, tier: Tier) -> Option<u64> {
        match tier {
            Tier::Gpu => self.gpu,
            Tier::Cpu => self.cpu,
            Tier::Disk => self.disk,
        }
    }
}

/// One tier over its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapExceeded {
    /// The tier.
    pub tier: Tier,
    /// Bytes the plan needs there.
    pub needed: u64,
    /// Its cap.
    pub cap: u64,
}

impl fmt::Display for CapExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let advice = match self.tier {
            Tier::Gpu => "lower the GPU shares in --percent, --gpu-batch-size or --num-gpu-batches, or raise --gpu-mem",
            Tier::Cpu => "move CPU shares in --percent to disk (with --offload-dir), lower --num-gpu-batches, or raise --cpu-mem",
            Tier::Disk => "keep more on GPU/CPU in --percent, lower --num-gpu-batches, or raise --disk-mem",
        };
        write!(
            f,
            "{} memory: the plan needs {} but {} is {} ({} over); {advice}",
            self.tier,
            format_bytes(self.needed),
            self.tier.cap_flag(),
            format_bytes(self.cap),
            format_bytes(self.needed - self.cap)
        )
    }
}

/// A plan over one or more caps.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct CapError(pub Vec<CapExceeded>);

/// Why a run cannot be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The model config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A zero prompt or generation length.
    #[error("--prompt-len ({prompt_len}) and --gen-len ({gen_len}) must both be at least 1")]
    EmptyWorkload {
        /// Tokens per prompt.
        prompt_len: usize,
        /// Tokens to generate.
        gen_len: usize,
    },
    /// Prompt plus generated tokens exceed the model's context.
    #[error("--prompt-len {prompt_len} + --gen-len {gen_len} = {} exceeds {model}'s context of {context} tokens", prompt_len + gen_len)]
    TooLong {
        /// Tokens per prompt.
        prompt_len: usize,
        /// Tokens to generate.
        gen_len: usize,
        /// The model's name.
        model: String,
        /// Its context (max_seq_len).
        context: usize,
    },
    /// More prompts than the policy's effective batch (or none).
    #[error(
        "{prompts} prompts exceed the effective batch of {} ({gpu_batch_size} x {num_gpu_batches}): raise \
         --num-gpu-batches or --gpu-batch-size, or pass fewer prompts",
        gpu_batch_size * num_gpu_batches
    )]
    TooManyPrompts {
        /// Prompts given.
        prompts: usize,
        /// The policy's GPU batch size.
        gpu_batch_size: usize,
        /// The policy's number of GPU batches.
        num_gpu_batches: usize,
    },
    /// A run needs at least one sequence.
    #[error("no prompts: a run needs at least one sequence")]
    NoSequences,
    /// More sequences in one block than a placement lists (it names every sequence's homes).
    #[error(
        "{sequences} sequences in one block is more than strata plans at once ({max}); lower --gpu-batch-size or \
         --num-gpu-batches (a block of a few hundred sequences already reaches FlexLLMGen's throughput)"
    )]
    BlockTooLarge {
        /// Sequences asked for.
        sequences: usize,
        /// [`MAX_BLOCK_SEQUENCES`].
        max: usize,
    },
    /// A buffer larger than one binding.
    #[error("{what} needs a buffer of {bytes} bytes, more than this device allows ({limit} bytes); {hint}")]
    Binding {
        /// What the buffer holds.
        what: String,
        /// Its size.
        bytes: u64,
        /// The device's binding limit.
        limit: u64,
        /// What to do about it.
        hint: &'static str,
    },
    /// A packed embedding table must be one binding (q4_dequant looks ids up in one buffer).
    #[error("the packed embedding table [{rows}, {cols}] needs {bytes} bytes, more than one GPU binding ({limit} bytes)")]
    PackedTable {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Its packed size.
        bytes: u64,
        /// The device's binding limit.
        limit: u64,
    },
    /// The plan goes over a memory cap.
    #[error(transparent)]
    OverCap(#[from] CapError),
}

/// Every tier's bytes under one placement, summed by what they hold.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Weights' homes.
    pub weights: TierBytes,
    /// KV cache homes (whole sequences).
    pub cache: TierBytes,
    /// Activations' homes (whole sequences, prompt length: the prefill peak).
    pub activations: TierBytes,
    /// Buffers that hold no home (GPU only): weight, cache and activation slots, CPU attention's GPU scratch, the
    /// step inputs, the forward pass's scratch, the logits and the kernels' staging.
    pub working: TierBytes,
    /// Host memory the transfers borrow for a moment (disk reads on their way to the GPU, CPU attention's keys and
    /// values): not a buffer of the run, counted so the caps leave room for it.
    pub staging: TierBytes,
    /// Sequences whose cache lives on GPU, CPU, disk.
    pub cache_sequences: [usize; 3],
    /// Sequences whose activations live on GPU, CPU, disk.
    pub act_sequences: [usize; 3],
}

impl MemoryPlan {
    /// Every buffer the run holds, per tier: what its allocations add up to at their peak.
    pub fn allocated(&self) -> TierBytes {
        self.weights
            .plus(self.cache)
            .plus(self.activations)
            .plus(self.working)
    }

    /// The most the run needs of each tier: its buffers plus transfer staging. The caps are checked against this.
    pub fn peak(&self) -> TierBytes {
        self.allocated().plus(self.staging)
    }

    /// Refuses the plan if any tier's peak exceeds its cap, naming every tier over, by how much, and what to change.
    pub fn check(&self, caps: &Caps) -> Result<(), CapError> {
        let peak = self.peak();
        let over: Vec<CapExceeded> = Tier::ALL
            .iter()
            .filter_map(|&tier| {
                let cap = caps.get(tier)?;
                let needed = peak.get(tier);
                (needed > cap).then_some(CapExceeded { tier, needed, cap })
            })
            .collect();
        if over.is_empty() {
            Ok(())
        } else {
            Err(CapError(over))
        }
    }
}

/// One GPU batch's sequences: where each keeps its cache and its hidden rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlacement {
    /// Sequences in the batch (the last batch of a run may be smaller than the GPU batch size).
    pub sequences: usize,
    /// Each sequence's cache tier.
    pub cache: Vec<Tier>,
    /// Each sequence's activation tier.
    pub act: Vec<Tier>,
    /// Decode attention of this batch runs on the CPU ([`crate::offload::cpu_attention`]).
    pub cpu_attention: bool,
}

impl BatchPlacement {
    /// Every sequence's cache stays on the GPU: the batch keeps its own cache buffers.
    pub fn cache_resident(&self) -> bool {
        self.cache.iter().all(|&t| t == Tier::Gpu)
    }

    /// Every sequence's hidden rows stay on the GPU: the batch keeps its own residual stream.
    pub fn act_resident(&self) -> bool {
        self.act.iter().all(|&t| t == Tier::Gpu)
    }
}

/// The tier of sequence `index` of a GPU batch of `gbs` sequences under `split`: whole sequences, the first `gpu`%
/// on the GPU, the next `cpu`% in CPU memory, the rest on disk.
pub fn sequence_tier(split: TierSplit, gbs: usize, index: usize) -> Tier {
    let [g, c, _] = split_sequences(gbs, split);
    if index < g {
        Tier::Gpu
    } else if index < g + c {
        Tier::Cpu
    } else {
        Tier::Disk
    }
}

/// How many of `n` sequences go to the GPU, CPU and disk under `split`.
fn split_sequences(n: usize, split: TierSplit) -> [usize; 3] {
    let g = ((n as f64 * split.gpu / 100.0).round() as usize).min(n);
    let gc = ((n as f64 * (split.gpu + split.cpu) / 100.0).round() as usize).clamp(g, n);
    [g, gc - g, n - gc]
}

/// The tier of each of a group's tensors (sizes in order) by cumulative size: a tensor goes where its midpoint falls,
/// the first `split.disk()`% of the group's bytes on disk, the next `split.cpu`% in CPU memory, the rest on the GPU.
pub fn place_by_midpoint(sizes: &[u64], split: TierSplit) -> Vec<Tier> {
    let total: u64 = sizes.iter().sum();
    let mut cum = 0u64;
    sizes
        .iter()
        .map(|&size| {
            let mid = if total == 0 {
                0.0
            } else {
                (cum as f64 + size as f64 / 2.0) / total as f64 * 100.0
            };
            cum += size;
            if mid < split.disk() {
                Tier::Disk
            } else if mid < split.disk() + split.cpu {
                Tier::Cpu
            } else {
                Tier::Gpu
            }
        })
        .collect()
}

/// A tensor's GPU buffers, each as its home holds it: a matrix's row chunks (at most one binding each, in the weight
/// format), or one f32 vector.
fn tensor_buffers(
    spec: &TensorSpec,
    format: WeightFormat,
    limits: &DeviceLimits,
) -> Result<Vec<u64>, PlacementError> {
    let limit = limits.max_binding;
    match spec.shape[..] {
        [rows, cols] => {
            let row_bytes = format.row_bytes(cols);
            let per =
                chunk_rows(limit, rows, cols, format).ok_or_else(|| PlacementError::Binding {
                    what: format!("one row of {}", spec.name),
                    bytes: row_bytes,
                    limit,
                    hint: "this adapter cannot hold a single row of this tensor in one binding",
                })?;
            let mut out = Vec::new();
            let mut row0 = 0;
            while row0 < rows {
                let n = per.min(rows - row0);
                out.push(buffer_size(n as u64 * row_bytes));
                row0 += n;
            }
            let table = matches!(
                spec.id,
                TensorId::Model(ModelTensor::EmbedTokens | ModelTensor::EmbedPositions)
            );
            if table && format.compression().is_some() && out.len() > 1 {
                return Err(PlacementError::PackedTable {
                    rows,
                    cols,
                    bytes: rows as u64 * row_bytes,
                    limit,
                });
            }
            Ok(out)
        }
        _ => {
            let bytes = 4 * spec.numel() as u64;
            check_binding(&spec.name, bytes, limits, "vectors must fit one binding")?;
            Ok(vec![buffer_size(bytes)])
        }
    }
}

fn check_binding(
    what: &str,
    bytes: u64,
    limits: &DeviceLimits,
    hint: &'static str,
) -> Result<(), PlacementError> {
    if bytes > limits.max_binding {
        return Err(PlacementError::Binding {
            what: what.to_owned(),
            bytes,
            limit: limits.max_binding,
            hint,
        });
    }
    Ok(())
}

/// Every weight buffer's size: the tensors outside the layers, and one decoder layer's (every layer's is the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WeightSizes {
    /// Outside the layers, in [`outside_layer_tensors`] order (embeddings first, then the tail).
    pub outside: Vec<(ModelTensor, Vec<u64>)>,
    /// One decoder layer, in checkpoint order.
    pub layer: Vec<(LayerTensor, Vec<u64>)>,
}

impl WeightSizes {
    pub(crate) fn new(
        config: &OptConfig,
        format: WeightFormat,
        limits: &DeviceLimits,
    ) -> Result<WeightSizes, PlacementError> {
        let (head, tail) = outside_layer_tensors(config);
        let outside = head
            .into_iter()
            .chain(tail)
            .map(|t| {
                Ok((
                    t,
                    tensor_buffers(&model_tensor_spec(config, t), format, limits)?,
                ))
            })
            .collect::<Result<_, PlacementError>>()?;
        let layer = if config.num_hidden_layers == 0 {
            Vec::new()
        } else {
            layer_tensor_kinds(config)
                .into_iter()
                .map(|t| {
                    let spec = layer_tensor_spec(config, 0, t);
                    Ok((t, tensor_buffers(&spec, format, limits)?))
                })
                .collect::<Result<_, PlacementError>>()?
        };
        Ok(WeightSizes { outside, layer })
    }

    /// Bytes of the buffers outside the layers.
    pub(crate) fn outside_bytes(&self) -> u64 {
        self.outside.iter().flat_map(|(_, b)| b).sum()
    }

    /// Bytes of one decoder layer's buffers.
    pub(crate) fn layer_bytes(&self) -> u64 {
        self.layer.iter().flat_map(|(_, b)| b).sum()
    }

    /// Each layer tensor's tier under the weight split: by cumulative size within each placement group.
    fn layer_tiers(&self, split: TierSplit, sep_layer: bool) -> BTreeMap<LayerTensor, Tier> {
        let groups: Vec<Vec<&(LayerTensor, Vec<u64>)>> = if sep_layer {
            let (attn, mlp) = self.layer.iter().partition(|(t, _)| t.part.is_attention());
            vec![attn, mlp]
        } else {
            vec![self.layer.iter().collect()]
        };
        let mut out = BTreeMap::new();
        for group in groups {
            let sizes: Vec<u64> = group.iter().map(|(_, b)| b.iter().sum()).collect();
            for ((t, _), tier) in group.iter().zip(place_by_midpoint(&sizes, split)) {
                out.insert(*t, tier);
            }
        }
        out
    }
}

/// The per-batch shape a run computes with.
#[derive(Clone, Debug)]
struct Shape {
    /// Sequences per GPU batch (the largest batch).
    gbs: usize,
    /// Each GPU batch's sequences.
    sizes: Vec<usize>,
    /// Tokens per prompt (the prefill step's rows per sequence).
    s: usize,
    /// Cached tokens per sequence.
    capacity: usize,
    /// Decode steps run each layer once over the whole block ([`block_decode`]): the scratch holds the block's rows
    /// and the block has its own residual stream.
    block_decode: bool,
}

impl Shape {
    fn prompts(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// Rows of x the shared scratch holds: a GPU batch's prefill, or a block decode step's whole block.
    fn work_rows(&self) -> usize {
        let prefill = self.gbs * self.s;
        if self.block_decode {
            prefill.max(self.prompts())
        } else {
            prefill
        }
    }
}

/// Activation slots a run needs: none when every GPU batch keeps its hidden rows on the GPU; else one, which the
/// offloaded batches take in turn, or two with overlap when several GPU batches attend on the CPU, so that a batch's
/// projections (in one slot) run on the GPU while the CPU attends for the batch before it (whose rest of the layer
/// then runs in the other).
pub fn act_slots(policy: &Policy, batches: &[BatchPlacement]) -> usize {
    let offloaded = batches.iter().filter(|b| !b.act_resident()).count();
    let pipelined = batches
        .iter()
        .filter(|b| !b.act_resident() && b.cpu_attention)
        .count();
    match offloaded {
        0 => 0,
        _ if policy.overlap && pipelined > 1 => 2,
        _ => 1,
    }
}

/// Whether decode steps run each decoder layer once over every GPU batch of the block, one dispatch per linear
/// ([`crate::model::decoder_block_layer`]), rather than once per GPU batch: zero-copy's form for several GPU
/// batches, in which a CPU-resident weight read in place crosses PCIe once per step, as the copy path moves it.
///
/// It takes `--transfer zero-copy` with several GPU batches, some layer weights in CPU memory, and every batch
/// keeping its cache (uncompressed, in its activations' dtype or f16) and hidden rows on the GPU with attention there.
/// (`--transfer auto` keeps copying for several GPU batches until GPU measurements say which is faster.) Whether the
/// device can bind CPU memory is the runtime's question: without it decode copies and the block's buffers stay idle.
///
/// `policy` is the run's (its `num_gpu_batches` the batches placed).
pub fn block_decode(
    policy: &Policy,
    workload: Workload,
    layer_tiers: &BTreeMap<LayerTensor, Tier>,
    batches: &[BatchPlacement],
    act: ActDtype,
    cache: CacheDtype,
) -> bool {
    block_decode_asked(policy, workload)
        && layer_tiers.values().any(|&t| t == Tier::Cpu)
        && (cache.bytes() == act.bytes() || cache == CacheDtype::F16)
        && batches
            .iter()
            .all(|b| b.cache_resident() && b.act_resident() && !b.cpu_attention)
}

/// What the policy and workload alone say of [`block_decode`]: zero-copy, several GPU batches, an uncompressed
/// cache, decode steps to run. The cost model's relaxation, which cannot tell where caches and activations go, counts
/// the block's buffers whenever this holds.
pub(super) fn block_decode_asked(policy: &Policy, workload: Workload) -> bool {
    policy.transfer == Transfer::ZeroCopy
        && policy.num_gpu_batches > 1
        && !policy.compress_cache
        && workload.gen_len > 1
}

/// The forward pass's buffers that do not depend on where homes live: step inputs, scratch, logits, and the packed
/// cache's scratch. `(id, bytes)` in allocation order.
fn fixed_working(
    config: &OptConfig,
    policy: &Policy,
    shape: &Shape,
    act: ActDtype,
) -> Vec<(BufferId, u64)> {
    let act = act.bytes() as u64;
    let (h, f, p) = (
        config.hidden_size as u64,
        config.ffn_embed_dim as u64,
        config.word_embed_proj_dim as u64,
    );
    let (g, s, cap) = (shape.gbs as u64, shape.s as u64, shape.capacity as u64);
    let mut out = Vec::new();
    for (k, &b) in shape.sizes.iter().enumerate() {
        let b = b as u64;
        for (part, bytes) in [
            (InputPart::Ids, b * s * 4),
            (InputPart::Positions, b * s * 4),
            (InputPart::Mask, b * cap * 4),
        ] {
            out.push((BufferId::Input { batch: k, part }, buffer_size(bytes)));
        }
    }
    let rows = shape.work_rows() as u64;
    for (part, elements) in [
        (WorkPart::Norm, rows * h),
        (WorkPart::Q, rows * h),
        (WorkPart::Attn, rows * h),
        (WorkPart::Mid, rows * f),
        (
            WorkPart::Embed,
            if config.has_projection() { rows * p } else { 1 },
        ),
        (WorkPart::Last, g * h),
        (WorkPart::LastNorm, g * h),
        (WorkPart::LastProj, g * p),
    ] {
        out.push((BufferId::Work(part), buffer_size(elements * act)));
    }
    if shape.block_decode {
        let block = shape.prompts() as u64 * h;
        out.push((BufferId::Work(WorkPart::Block), buffer_size(block * act)));
    }
    let n = shape.prompts() as u64;
    out.push((
        BufferId::Logits,
        buffer_size(n * config.vocab_size as u64 * 4),
    ));
    out.push((BufferId::NextIds, buffer_size(n * 4)));
    if policy.compress_cache {
        // The packed cache's kernels read and write activations: its keys and values pass through as `act`; the
        // scores stay f32.
        let kv = buffer_size(g * cap * h * act);
        for (part, bytes) in [
            (ScratchPart::K, kv),
            (ScratchPart::V, kv),
            (ScratchPart::Pairs, kv),
            (
                ScratchPart::Scores,
                buffer_size(g * config.n_head as u64 * cap * 4),
            ),
        ] {
            out.push((BufferId::CacheScratch(part), bytes));
        }
    }
    out
}

/// What the binding limit error says about a buffer that would not fit: what it holds and what to change.
fn binding_note(id: &BufferId) -> (&'static str, &'static str) {
    const SEQ: &str = "use a smaller GPU batch or shorter sequences";
    const PROMPT: &str = "use a smaller GPU batch or shorter prompts";
    match id {
        BufferId::Cache { .. } | BufferId::CacheHome { .. } => ("one layer's KV cache", SEQ),
        BufferId::CacheSlot { .. } => ("one layer's KV cache slot", SEQ),
        BufferId::CacheScratch(_) => ("one layer's uncompressed KV scratch", SEQ),
        BufferId::Hidden { .. } | BufferId::ActHome { .. } | BufferId::ActSlot { .. } => {
            ("the residual stream", PROMPT)
        }
        BufferId::Work(WorkPart::Mid) | BufferId::CpuAttention(CpuAttnPart::Mid) => {
            ("the feed-forward activations", PROMPT)
        }
        BufferId::Work(WorkPart::Embed) => ("the token embeddings", PROMPT),
        BufferId::Logits | BufferId::NextIds => ("the logits", "generate fewer sequences at once"),
        BufferId::Input { .. } => ("the step inputs", PROMPT),
        _ => ("the activations", PROMPT),
    }
}

/// The kernels' staging the run's forward pass asks for, per slot, sized as the kernels would grow them: for a
/// packed cache its quantise and (sparse decode) dequantise passes; attention's scratch (split-keys partials of a
/// decode step over a dense cache, or the sparse decode attention's scores) for the batches that attend on the GPU;
/// split-K partial sums of every linear layer at each batch's prefill and decode row counts (the tiled kernels bind
/// the slot even unsplit).
fn kernel_scratch(
    config: &OptConfig,
    policy: &Policy,
    workload: Workload,
    shape: &Shape,
    limits: &DeviceLimits,
    act: ActDtype,
    gpu_attending: &[usize],
) -> [u64; STAGING_SLOTS] {
    let mut want = [0u64; STAGING_SLOTS];
    let mut ask = |slot: usize, bytes: u64| want[slot] = want[slot].max(bytes);
    let decode = workload.gen_len > 1;
    let format = weight_format(config, policy);
    let (h, p) = (config.hidden_size, config.word_embed_proj_dim);
    // (rows of x, weight shape) of every linear layer a step runs, per GPU batch.
    let mut matrices: Vec<(usize, [usize; 2])> = Vec::new();
    for &size in &shape.sizes {
        let mut rows = vec![size * shape.s];
        if decode {
            rows.push(size);
        }
        for &m in &rows {
            matrices.extend(
                LayerPart::ALL
                    .iter()
                    .filter(|part| part.is_linear())
                    .map(|part| (m, part.shape(config))),
            );
            if config.has_projection() {
                matrices.push((m, [h, p]));
            }
        }
        if decode && shape.block_decode {
            // A block decode step's layers run once over the whole block.
            let m = shape.prompts();
            matrices.extend(
                LayerPart::ALL
                    .iter()
                    .filter(|part| part.is_linear())
                    .map(|part| (m, part.shape(config))),
            );
        }
        // The head runs on each sequence's last row.
        if config.has_projection() {
            matrices.push((size, [p, h]));
        }
        matrices.push((size, [config.vocab_size, p]));
    }
    for (m, [out, cols]) in matrices {
        if m <= GEMV_MAX_ROWS {
            continue;
        }
        let widest = chunk_rows(limits.max_binding, out, cols, format)
            .unwrap_or(out)
            .max(1);
        let mut chunks = vec![widest; out / widest];
        if out % widest != 0 {
            chunks.push(out % widest);
        }
        for rows in chunks {
            ask(SPLIT_K_SLOT, split_k_scratch_bytes(m, rows, cols).max(16));
        }
    }
    let heads = config.n_head;
    let gpu_decode_batch = gpu_attending.iter().copied().max().unwrap_or(0);
    let attends = decode && gpu_decode_batch > 0;
    let sparse = attends && policy.attn_sparsity < 1.0;
    let decode_shape = |batch: usize| AttentionShape {
        batch,
        s_new: 1,
        past: shape.capacity.saturating_sub(1),
        capacity: shape.capacity,
        hidden: h,
        n_head: heads,
    };
    if policy.compress_cache {
        let hd = config.head_dim();
        ask(
            1,
            quantize_rows_staging(shape.gbs * heads * shape.capacity, hd, act),
        );
        if attends {
            ask(1, quantize_rows_staging(gpu_decode_batch * heads, hd, act));
        }
        if sparse {
            ask(
                0,
                dequantize_rows_staging(gpu_decode_batch * heads * shape.capacity, hd, act),
            );
        }
    }
    if sparse {
        ask(
            ATTENTION_SLOT,
            sparse_attention_scratch_bytes(&decode_shape(gpu_decode_batch)),
        );
    } else if attends && !policy.compress_cache {
        for &batch in gpu_attending {
            ask(
                ATTENTION_SLOT,
                attention_scratch_bytes(&decode_shape(batch)),
            );
        }
    }
    want.map(|bytes| {
        if bytes == 0 {
            0
        } else {
            staging_buffer_bytes(bytes, limits.max_binding)
        }
    })
}

/// Host memory transfers borrow: one layer's disk-resident weights and one GPU batch's disk-resident cache and
/// hidden rows on their way to the GPU (twice with overlap), and CPU attention's f32 keys, values and scores.
fn host_staging(
    config: &OptConfig,
    policy: &Policy,
    layer_disk: u64,
    batch: &BatchPlacement,
    cache_home: u64,
    act_home: u64,
    capacity: usize,
) -> u64 {
    let slots = if policy.overlap { 2 } else { 1 };
    let on_disk = |tiers: &[Tier]| tiers.iter().filter(|&&t| t == Tier::Disk).count() as u64;
    let mut bytes = slots
        * (layer_disk + on_disk(&batch.cache) * 2 * cache_home + on_disk(&batch.act) * act_home);
    if policy.cpu_cache_compute {
        let g = batch.sequences as u64;
        bytes += 4 * g * (config.n_head as u64 * capacity as u64 + config.hidden_size as u64);
    }
    bytes
}

/// The most sequences per GPU batch whose activations and caches each fit one binding: the all-GPU generator's
/// batch when none is given.
pub fn largest_gpu_batch(
    config: &OptConfig,
    policy: &Policy,
    limits: &DeviceLimits,
    workload: Workload,
) -> usize {
    let widest = config
        .ffn_embed_dim
        .max(config.hidden_size)
        .max(config.word_embed_proj_dim);
    let act = act_dtype(config, policy, limits).bytes();
    // A sequence's widest activation rows, or its cache rows of one layer counted as f32 (the widest a cache value).
    let per_seq =
        (workload.prompt_len * widest * act).max(workload.seq_len() * config.hidden_size * 4);
    (limits.max_binding / per_seq.max(1) as u64) as usize
}

/// Where every byte of one run lives. See the module documentation.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The model.
    pub config: OptConfig,
    /// The run's policy: the given one, with `gpu_batch_size` no larger than the prompts and `num_gpu_batches` the
    /// GPU batches the prompts fill.
    pub policy: Policy,
    /// Prompt and generation lengths.
    pub workload: Workload,
    /// The device's limits.
    pub limits: DeviceLimits,
    /// How matrices are stored.
    pub weight_format: WeightFormat,
    /// How activations are stored ([`act_dtype`]).
    pub act_dtype: ActDtype,
    /// How an uncompressed cache stores values ([`CacheDtype::for_model`]).
    pub cache_dtype: CacheDtype,
    /// The cache's row layout in homes and slots.
    pub cache_rows: CacheRows,
    /// Each layer tensor's tier (the same in every decoder layer).
    pub layer_tiers: BTreeMap<LayerTensor, Tier>,
    /// Each GPU batch's sequences.
    pub batches: Vec<BatchPlacement>,
    /// Zero-copy decode steps run each layer once over the whole block ([`block_decode`]).
    pub block_decode: bool,
    buffers: Vec<BufferSpec>,
    index: HashMap<BufferId, usize>,
    staging: TierBytes,
}

impl Placement {
    /// The placement of a run of the policy's whole effective batch.
    pub fn new(
        config: &OptConfig,
        policy: &Policy,
        workload: Workload,
        limits: &DeviceLimits,
    ) -> Result<Placement, PlacementError> {
        Placement::for_prompts(config, policy, workload, limits, policy.effective_batch())
    }

    /// The placement of a run of `prompts` sequences (at most the policy's effective batch): GPU batches of
    /// `min(gpu_batch_size, prompts)` sequences, the last one taking the rest.
    pub fn for_prompts(
        config: &OptConfig,
        policy: &Policy,
        workload: Workload,
        limits: &DeviceLimits,
        prompts: usize,
    ) -> Result<Placement, PlacementError> {
        config.validate()?;
        policy.validate_placement()?;
        if workload.prompt_len == 0 || workload.gen_len == 0 {
            return Err(PlacementError::EmptyWorkload {
                prompt_len: workload.prompt_len,
                gen_len: workload.gen_len,
            });
        }
        // The last generated token is never fed back, so it needs no position.
        if workload.seq_len() - 1 > config.max_seq_len {
            return Err(PlacementError::TooLong {
                prompt_len: workload.prompt_len,
                gen_len: workload.gen_len,
                model: config.name.to_string(),
                context: config.max_seq_len,
            });
        }
        if prompts == 0 {
            return Err(PlacementError::NoSequences);
        }
        if prompts > MAX_BLOCK_SEQUENCES {
            return Err(PlacementError::BlockTooLarge {
                sequences: prompts,
                max: MAX_BLOCK_SEQUENCES,
            });
        }
        if prompts > policy.effective_batch() {
            return Err(PlacementError::TooManyPrompts {
                prompts,
                gpu_batch_size: policy.gpu_batch_size,
                num_gpu_batches: policy.num_gpu_batches,
            });
        }
        let gbs = policy.gpu_batch_size.min(prompts);
        let shape = Shape {
            gbs,
            sizes: (0..prompts)
                .step_by(gbs)
                .map(|start| gbs.min(prompts - start))
                .collect(),
            s: workload.prompt_len,
            capacity: workload.seq_len(),
            // Decided by the builder once the batches are placed.
            block_decode: false,
        };
        let run_policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: shape.sizes.len(),
            ..policy.clone()
        };
        Builder::new(config, run_policy, workload, limits, shape)?.build()
    }

    /// Every buffer of the run, in allocation order.
    pub fn buffers(&self) -> &[BufferSpec] {
        &self.buffers
    }

    /// The buffer `id`, if the run has it.
    pub fn spec(&self, id: BufferId) -> Option<&BufferSpec> {
        self.index.get(&id).map(|&i| &self.buffers[i])
    }

    /// Sequences per GPU batch.
    pub fn gpu_batch_size(&self) -> usize {
        self.policy.gpu_batch_size
    }

    /// Weight slots (two with overlap when some layer tensor is off the GPU, else none).
    pub fn weight_slots(&self) -> usize {
        if self.layer_tiers.values().any(|&t| t != Tier::Gpu) {
            self.slot_count()
        } else {
            0
        }
    }

    /// Cache slots (two with overlap when some GPU batch's cache has homes, else none).
    pub fn cache_slots(&self) -> usize {
        if self.batches.iter().any(|b| !b.cache_resident()) {
            self.slot_count()
        } else {
            0
        }
    }

    fn slot_count(&self) -> usize {
        if self.policy.overlap {
            2
        } else {
            1
        }
    }

    /// The kernels' staging buffers of the run, per slot (`None`: the slot is never used).
    pub fn kernel_scratch(&self) -> [Option<&BufferSpec>; STAGING_SLOTS] {
        std::array::from_fn(|slot| self.spec(BufferId::KernelScratch { slot }))
    }

    /// The buffers summed by what they hold and where, with the transfers' host staging.
    pub fn plan(&self) -> MemoryPlan {
        let mut plan = MemoryPlan {
            weights: TierBytes::default(),
            cache: TierBytes::default(),
            activations: TierBytes::default(),
            working: TierBytes::default(),
            staging: self.staging,
            cache_sequences: [0; 3],
            act_sequences: [0; 3],
        };
        for b in &self.buffers {
            let sum = match b.id.kind() {
                Kind::Weights => &mut plan.weights,
                Kind::Cache => &mut plan.cache,
                Kind::Hidden => &mut plan.activations,
                Kind::Working => &mut plan.working,
            };
            sum.add_to(b.tier, b.bytes);
        }
        let at = |t: Tier| Tier::ALL.iter().position(|&x| x == t).unwrap_or(0);
        for batch in &self.batches {
            for &t in &batch.cache {
                plan.cache_sequences[at(t)] += 1;
            }
            for &t in &batch.act {
                plan.act_sequences[at(t)] += 1;
            }
        }
        plan
    }

    /// Every buffer's bytes per tier: what the run's allocations add up to.
    pub fn allocated(&self) -> TierBytes {
        let mut t = TierBytes::default();
        for b in &self.buffers {
            t.add_to(b.tier, b.bytes);
        }
        t
    }

    /// The plan against the policy's caps.
    pub fn check_caps(&self) -> Result<(), CapError> {
        self.plan().check(&Caps::of(&self.policy))
    }

    /// Bytes of the buffers the GPU tier's pool lends ([`from_pool`]).
    pub fn pool_bytes(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| from_pool(b))
            .map(|b| b.bytes)
            .sum()
    }
}

/// Whether a buffer is lent by the GPU tier's pool (slots, and homes in the GPU tier of batches that stream) rather
/// than made for its owner alone: the ledger takes it from the pool, and the pool's peak counts it.
pub fn from_pool(spec: &BufferSpec) -> bool {
    matches!(
        spec.id,
        BufferId::WeightSlot { .. }
            | BufferId::CacheSlot { .. }
            | BufferId::ActSlot { .. }
            | BufferId::CpuAttention(_)
            | BufferId::CacheHome { .. }
            | BufferId::ActHome { .. }
    ) && spec.tier == Tier::Gpu
}

/// Builds a [`Placement`]'s list, rule by rule.
struct Builder<'a> {
    config: &'a OptConfig,
    policy: Policy,
    workload: Workload,
    limits: &'a DeviceLimits,
    shape: Shape,
    weights: WeightSizes,
    buffers: Vec<BufferSpec>,
}

impl<'a> Builder<'a> {
    fn new(
        config: &'a OptConfig,
        policy: Policy,
        workload: Workload,
        limits: &'a DeviceLimits,
        shape: Shape,
    ) -> Result<Builder<'a>, PlacementError> {
        let weights = WeightSizes::new(config, weight_format(config, &policy), limits)?;
        Ok(Builder {
            config,
            policy,
            workload,
            limits,
            shape,
            weights,
            buffers: Vec::new(),
        })
    }

    /// Adds a buffer, refusing a GPU buffer larger than one binding.
    fn push(&mut self, id: BufferId, tier: Tier, bytes: u64) -> Result<(), PlacementError> {
        if tier == Tier::Gpu && !matches!(id, BufferId::Weight { .. }) {
            let (what, hint) = binding_note(&id);
            check_binding(what, bytes, self.limits, hint)?;
        }
        self.buffers.push(BufferSpec { id, tier, bytes });
        Ok(())
    }

    fn build(mut self) -> Result<Placement, PlacementError> {
        let c = self.config;
        let p = self.policy.clone();
        let slots = if p.overlap { 2 } else { 1 };
        let gbs = self.shape.gbs;

        // Weights: outside the layers on the GPU, each layer tensor where its group's split puts it, and one weight
        // slot buffer per off-GPU layer buffer (every layer's copy of it streams through the same slot).
        let layer_tiers = self.weights.layer_tiers(p.percent.weights, p.sep_layer);
        let outside = self.weights.outside.clone();
        for (t, chunks) in outside {
            for (chunk, bytes) in chunks.into_iter().enumerate() {
                let tensor = TensorId::Model(t);
                self.push(BufferId::Weight { tensor, chunk }, Tier::Gpu, bytes)?;
            }
        }
        let layer = self.weights.layer.clone();
        for i in 0..c.num_hidden_layers {
            for (t, chunks) in &layer {
                for (chunk, &bytes) in chunks.iter().enumerate() {
                    let tensor = TensorId::Layer(i, *t);
                    self.push(BufferId::Weight { tensor, chunk }, layer_tiers[t], bytes)?;
                }
            }
        }
        if layer_tiers.values().any(|&t| t != Tier::Gpu) {
            for slot in 0..slots {
                for (t, chunks) in &layer {
                    if layer_tiers[t] == Tier::Gpu {
                        continue;
                    }
                    for (chunk, &bytes) in chunks.iter().enumerate() {
                        let id = BufferId::WeightSlot {
                            slot,
                            tensor: *t,
                            chunk,
                        };
                        self.push(id, Tier::Gpu, bytes)?;
                    }
                }
            }
        }

        // Each GPU batch's sequences, split the same way.
        let cache_dtype = CacheDtype::for_model(c);
        let cache_compression = p.compress_cache.then_some(p.compress_cache_config);
        let cache_rows =
            CacheRows::new(c, gbs, self.shape.capacity, cache_dtype, cache_compression);
        let batches: Vec<BatchPlacement> = self
            .shape
            .sizes
            .iter()
            .map(|&b| {
                let cache: Vec<Tier> = (0..b)
                    .map(|i| sequence_tier(p.percent.cache, gbs, i))
                    .collect();
                // A packed cache attends on the CPU too, over its packed rows, but only with every key
                // (compress::decode_attention has no top-k); sparse attention over a packed cache stays on the GPU.
                let cpu_attention = p.cpu_cache_compute
                    && (!p.compress_cache || p.attn_sparsity >= 1.0)
                    && cache.iter().all(|&t| t == Tier::Cpu);
                BatchPlacement {
                    sequences: b,
                    act: (0..b)
                        .map(|i| sequence_tier(p.percent.act, gbs, i))
                        .collect(),
                    cache,
                    cpu_attention,
                }
            })
            .collect();

        // KV cache: a resident batch's K and V per layer, else one home per sequence; cache slots for a whole batch
        // when some batch streams its cache (prefill attends on the GPU even with cpu_cache_compute).
        let (h, cap) = (c.hidden_size as u64, self.shape.capacity as u64);
        for j in 0..c.num_hidden_layers {
            for (k, batch) in batches.iter().enumerate() {
                if batch.cache_resident() {
                    let b = batch.sequences;
                    let bytes = match cache_compression {
                        Some(cc) => {
                            PackedLayout::new(b * c.n_head * self.shape.capacity, c.head_dim(), cc)
                                .bytes()
                        }
                        None => b as u64 * cap * h * cache_dtype.bytes() as u64,
                    };
                    for kv in Kv::BOTH {
                        let id = BufferId::Cache {
                            layer: j,
                            batch: k,
                            kv,
                        };
                        self.push(id, Tier::Gpu, buffer_size(bytes))?;
                    }
                } else {
                    for (i, &tier) in batch.cache.iter().enumerate() {
                        for kv in Kv::BOTH {
                            let id = BufferId::CacheHome {
                                layer: j,
                                batch: k,
                                seq: i,
                                kv,
                            };
                            self.push(id, tier, cache_rows.home_bytes())?;
                        }
                    }
                }
            }
        }
        if batches.iter().any(|b| !b.cache_resident()) {
            for slot in 0..slots {
                for kv in Kv::BOTH {
                    let id = BufferId::CacheSlot { slot, kv };
                    self.push(id, Tier::Gpu, buffer_size(cache_rows.slot_bytes(gbs)))?;
                }
            }
        }

        // Activations: a resident batch's residual stream, else one home per sequence and one activation slot.
        let act_dtype = act_dtype(c, &p, self.limits);
        let act = act_dtype.bytes() as u64;
        let s = self.shape.s as u64;
        let act_home = buffer_size(s * h * act);
        for (k, batch) in batches.iter().enumerate() {
            if batch.act_resident() {
                let bytes = buffer_size(batch.sequences as u64 * s * h * act);
                self.push(BufferId::Hidden { batch: k }, Tier::Gpu, bytes)?;
            } else {
                for (i, &tier) in batch.act.iter().enumerate() {
                    self.push(BufferId::ActHome { batch: k, seq: i }, tier, act_home)?;
                }
            }
        }
        for slot in 0..act_slots(&p, &batches) {
            let bytes = buffer_size(gbs as u64 * s * h * act);
            self.push(BufferId::ActSlot { slot }, Tier::Gpu, bytes)?;
        }

        // The forward pass's working buffers.
        self.shape.block_decode = block_decode(
            &p,
            self.workload,
            &layer_tiers,
            &batches,
            act_dtype,
            cache_dtype,
        );
        for (id, bytes) in fixed_working(c, &p, &self.shape, act_dtype) {
            self.push(id, Tier::Gpu, bytes)?;
        }
        if batches.iter().any(|b| b.cpu_attention) {
            let g = gbs as u64;
            for (part, elements) in [
                (CpuAttnPart::Norm, g * h),
                (CpuAttnPart::Q, g * h),
                (CpuAttnPart::K, g * h),
                (CpuAttnPart::V, g * h),
                (CpuAttnPart::Attn, g * h),
                (CpuAttnPart::Mid, g * c.ffn_embed_dim as u64),
            ] {
                let id = BufferId::CpuAttention(part);
                self.push(id, Tier::Gpu, buffer_size(elements * act))?;
            }
        }
        let gpu_attending: Vec<usize> = batches
            .iter()
            .filter(|b| !b.cpu_attention)
            .map(|b| b.sequences)
            .collect();
        let scratch = kernel_scratch(
            c,
            &p,
            self.workload,
            &self.shape,
            self.limits,
            act_dtype,
            &gpu_attending,
        );
        for (slot, bytes) in scratch.into_iter().enumerate() {
            if bytes > 0 {
                self.push(BufferId::KernelScratch { slot }, Tier::Gpu, bytes)?;
            }
        }

        // Host staging of the transfers, bounded by the first (largest) batch and the heaviest layer.
        let layer_disk: u64 = layer
            .iter()
            .filter(|(t, _)| layer_tiers[t] == Tier::Disk)
            .flat_map(|(_, b)| b)
            .sum();
        let staging = TierBytes {
            cpu: batches.first().map_or(0, |b| {
                host_staging(
                    c,
                    &p,
                    layer_disk,
                    b,
                    cache_rows.home_bytes(),
                    act_home,
                    self.shape.capacity,
                )
            }),
            ..TierBytes::default()
        };

        let index = self
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.id, i))
            .collect();
        Ok(Placement {
            block_decode: self.shape.block_decode,
            config: *c,
            weight_format: weight_format(c, &p),
            act_dtype,
            cache_dtype,
            cache_rows,
            layer_tiers,
            batches,
            buffers: self.buffers,
            index,
            staging,
            workload: self.workload,
            limits: *self.limits,
            policy: p,
        })
    }
}

/// Stored bytes of the weights outside the decoder layers (embeddings, project_in/out, the final layer norm, an
/// untied LM head), which stay on the GPU under every policy.
pub fn outside_layer_bytes(config: &OptConfig, compress: Option<CompressionConfig>) -> u64 {
    let policy = Policy {
        compress_weight: compress.is_some(),
        compress_weight_config: compress.unwrap_or_default(),
        ..Policy::default()
    };
    WeightSizes::new(
        config,
        weight_format(config, &policy),
        &DeviceLimits::UNBOUNDED,
    )
    .map_or(0, |w| w.outside_bytes())
}

/// The memory plan of `policy` running `config` on `workload` for the whole effective batch, with no binding limit
/// (planning without a device). Caps are not checked here (see [`MemoryPlan::check`]).
pub fn plan(
    config: &OptConfig,
    policy: &Policy,
    workload: Workload,
) -> Result<MemoryPlan, PlacementError> {
    Ok(Placement::new(config, policy, workload, &DeviceLimits::UNBOUNDED)?.plan())
}

#[cfg(test)]
mod tests;
