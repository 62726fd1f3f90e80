//! Memory plans: how many bytes each tier (GPU, CPU, disk) holds at its peak under a policy, computed before
//! anything is allocated so a run that cannot fit is refused up front with the flag to change.
//!
//! Placement follows FlexLLMGen's rules, generalised:
//! - The tensors outside the decoder layers (token and position embeddings, project_in/out, the final layer norm,
//!   an untied LM head) always stay on the GPU, under every policy: every GPU batch reads them at the start and end
//!   of every step, so streaming them would move the largest matrix twice per step. The weight percents apply to the
//!   decoder layers only.
//! - Decoder weights are placed per placement group (a decoder layer, or its attention and MLP halves with
//!   `sep_layer`) by cumulative size: a tensor goes to the tier its midpoint falls in, with the first `w_disk`% of
//!   the group's bytes on disk, the next `w_cpu`% on CPU and the rest on GPU.
//! - The KV cache and the activations are split by whole sequences, the same way in every GPU batch (as FlexLLMGen
//!   splits each GPU batch's cache): of a batch's `gpu_batch_size` sequences, the first `cache_gpu`% keep their cache
//!   on the GPU, the next `cache_cpu`% on CPU, the rest on disk. Unlike FlexLLMGen, activations may be split too.
//! - The GPU also holds working buffers, counted as the runtime allocates them: weight slots for one layer's
//!   off-GPU buffers (twice with `overlap`), cache slots for a whole GPU batch's K and V of one layer (twice with
//!   `overlap`) whenever any cache is off the GPU (also with `cpu_cache_compute`: prefill attends on the GPU), an
//!   activation slot when any activation is off the GPU, CPU attention's GPU scratch, one GPU batch's input/output
//!   activations, attention or MLP scratch, and the logits. The CPU holds staging for whatever streams from disk.
//!
//! [`linear_terms`] gives the same formulas as affine functions of the nine placement fractions, the continuous
//! relaxation strata's cost model optimises over; [`plan`] rounds to whole tensors and sequences.

use std::fmt;

use crate::compress::{packed_bytes, CompressionConfig};
use crate::config::OptConfig;
use crate::gpu::kernels::CacheDtype;
use crate::offload::CacheRows;
use crate::policy::{format_bytes, Policy, PolicyError};
use crate::tiers::padded;
use crate::weights::{layer_tensors, model_tensors, TensorSpec};

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

/// A memory tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// GPU memory.
    Gpu,
    /// CPU (host) memory.
    Cpu,
    /// Disk (the offload directory).
    Disk,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Cpu, Tier::Disk];

    /// The flag that caps this tier.
    pub const fn cap_flag(self) -> &'static str {
        match self {
            Tier::Gpu => "--gpu-mem",
            Tier::Cpu => "--cpu-mem",
            Tier::Disk => "--disk-mem",
        }
    }

    /// Lower-case name (`gpu`, `cpu`, `disk`), as used in JSON output.
    pub const fn key(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Disk => "disk",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Gpu => "GPU",
            Tier::Cpu => "CPU",
            Tier::Disk => "disk",
        })
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

    /// Sum over tiers.
    pub fn total(&self) -> u64 {
        self.gpu + self.cpu + self.disk
    }

    fn add(self, o: TierBytes) -> TierBytes {
        TierBytes {
            gpu: self.gpu + o.gpu,
            cpu: self.cpu + o.cpu,
            disk: self.disk + o.disk,
        }
    }
}

/// The GPU's working buffers (beyond the tensors whose home is the GPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuWorking {
    /// Slots for weights streamed from CPU/disk: one decoder layer's off-GPU buffers (each padded to whole words),
    /// twice with overlap, as `LayerStore` allocates them (from the GPU tier's pool).
    pub weight_slots: u64,
    /// The f32 scratch a compressed KV cache computes through (keys, values and their pair-major copy for one GPU
    /// batch and layer, plus the decode attention's scores); packed weights need none (the kernels read them).
    pub cache_scratch: u64,
    /// One GPU batch's input and output hidden states at the prompt length.
    pub batch_io: u64,
    /// The larger of attention scratch (q, k, v, fp32 scores, output) and MLP scratch, at prefill shapes.
    pub scratch: u64,
    /// Cache slots (from the GPU tier's pool): K and V for a whole GPU batch of one layer, twice with overlap,
    /// whenever any sequence's cache is off the GPU (with `cpu_cache_compute` too: prefill attends on the GPU).
    pub cache_slots: u64,
    /// The activation slot (from the pool): one GPU batch's hidden rows at the prompt length, when any sequence's
    /// activations are off the GPU.
    pub act_slot: u64,
    /// CPU attention's GPU scratch (from the pool; `cpu_cache_compute` with an uncompressed cache wholly in CPU
    /// memory): layer norm, q, k, v and attention output rows plus the MLP's intermediate rows of one GPU batch.
    pub cpu_attention: u64,
    /// fp32 logits of one GPU batch's last positions.
    pub logits: u64,
}

impl GpuWorking {
    /// Sum of the buffers.
    pub fn total(&self) -> u64 {
        self.pool_slots() + self.cache_scratch + self.batch_io + self.scratch + self.logits
    }

    /// The slots the runtime takes from the GPU tier's pool (weight, cache, activation and CPU attention slots):
    /// what the pool's peak holds beyond the GPU-tier homes of partly offloaded GPU batches.
    pub fn pool_slots(&self) -> u64 {
        self.weight_slots + self.cache_slots + self.act_slot + self.cpu_attention
    }
}

/// Every tier's bytes under one policy and workload.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Weights' homes.
    pub weights: TierBytes,
    /// KV cache homes (whole sequences).
    pub cache: TierBytes,
    /// Activations' homes (whole sequences, prompt length: the prefill peak).
    pub activations: TierBytes,
    /// GPU working buffers.
    pub gpu_working: GpuWorking,
    /// CPU staging for disk-resident data, plus CPU attention scratch with cpu_cache_compute.
    pub cpu_working: u64,
    /// Sequences of the effective batch whose cache lives on GPU, CPU, disk (the same split in every GPU batch).
    pub cache_sequences: [usize; 3],
    /// Sequences whose activations live on GPU, CPU, disk.
    pub act_sequences: [usize; 3],
}

impl MemoryPlan {
    /// Peak bytes of each tier: homes plus working buffers.
    pub fn peak(&self) -> TierBytes {
        let homes = self.weights.add(self.cache).add(self.activations);
        TierBytes {
            gpu: homes.gpu + self.gpu_working.total(),
            cpu: homes.cpu + self.cpu_working,
            disk: homes.disk,
        }
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

/// Inputs that cannot be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The model config is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The workload does not fit the model.
    #[error("{0}")]
    Workload(String),
}

fn check_workload(config: &OptConfig, w: Workload) -> Result<(), PlanError> {
    if w.prompt_len == 0 || w.gen_len == 0 {
        return Err(PlanError::Workload(format!(
            "--prompt-len ({}) and --gen-len ({}) must both be at least 1",
            w.prompt_len, w.gen_len
        )));
    }
    if w.seq_len() > config.max_seq_len {
        return Err(PlanError::Workload(format!(
            "--prompt-len {} + --gen-len {} = {} exceeds {}'s context of {} tokens",
            w.prompt_len,
            w.gen_len,
            w.seq_len(),
            config.name,
            config.max_seq_len
        )));
    }
    Ok(())
}

/// Bytes of a weight tensor as stored: a matrix `[rows, cols]` under `compress` in strata's packed layout (groups
/// along each row, the last one padded: exactly what the GPU, CPU and disk tiers allocate), else at the dtype.
pub fn stored_bytes(
    config: &OptConfig,
    spec: &TensorSpec,
    compress: Option<CompressionConfig>,
) -> u64 {
    match (compress, spec.shape.as_slice()) {
        (Some(c), &[rows, cols]) => packed_bytes(rows, cols, c),
        _ => spec.numel() as u64 * config.dtype.size_bytes(),
    }
}

/// Stored bytes of the tensors outside the decoder layers (token and position embeddings, project_in/out, the final
/// layer norm, an untied LM head): they stay on the GPU under every policy.
pub fn outside_layer_bytes(config: &OptConfig, compress: Option<CompressionConfig>) -> u64 {
    model_tensors(config)
        .iter()
        .filter(|t| t.layer().is_none())
        .map(|t| stored_bytes(config, t, compress))
        .sum()
}

/// The placement groups of decoder layer `i` with each tensor's stored bytes: the layer, or its attention and MLP
/// halves with `sep_layer`.
pub fn layer_groups(
    config: &OptConfig,
    i: usize,
    sep_layer: bool,
    compress: Option<CompressionConfig>,
) -> Vec<Vec<u64>> {
    let bytes = |s: &TensorSpec| stored_bytes(config, s, compress);
    let tensors = layer_tensors(config, i);
    if sep_layer {
        let (attn, mlp): (Vec<_>, Vec<_>) =
            tensors.iter().partition(|t| t.name.contains(".self_attn"));
        vec![
            attn.into_iter().map(bytes).collect(),
            mlp.into_iter().map(bytes).collect(),
        ]
    } else {
        vec![tensors.iter().map(bytes).collect()]
    }
}

/// Every tensor's stored bytes by group: the input embeddings, each decoder layer's placement groups
/// ([`layer_groups`]), then the output tensors. Every tensor of [`model_tensors`] is in exactly one group; only the
/// decoder layers' groups are placed by the weight percents (the rest stays on the GPU).
pub fn weight_groups(
    config: &OptConfig,
    sep_layer: bool,
    compress: Option<CompressionConfig>,
) -> Vec<Vec<u64>> {
    let bytes = |s: &TensorSpec| stored_bytes(config, s, compress);
    let all = model_tensors(config);
    let first_layer_tensor = all
        .iter()
        .position(|t| t.layer().is_some())
        .unwrap_or(all.len());
    let mut groups = vec![all[..first_layer_tensor]
        .iter()
        .map(bytes)
        .collect::<Vec<_>>()];
    for i in 0..config.num_hidden_layers {
        groups.extend(layer_groups(config, i, sep_layer, compress));
    }
    let tail: Vec<u64> = all
        .iter()
        .skip(first_layer_tensor)
        .filter(|t| t.layer().is_none())
        .map(bytes)
        .collect();
    groups.push(tail);
    groups.retain(|g| !g.is_empty());
    groups
}

/// Bytes of the buffer (or weight slot) that holds a tensor of `len` bytes: whole 4-byte words, at least one.
fn word_padded(len: u64) -> u64 {
    len.max(4).next_multiple_of(4)
}

/// Splits one group's tensors by cumulative size: each tensor goes where its midpoint falls. Also returns the
/// word-padded bytes of its off-GPU tensors (what their weight slot buffers take).
fn place_group(sizes: &[u64], w_disk: f64, w_cpu: f64) -> (TierBytes, u64) {
    let total: u64 = sizes.iter().sum();
    let mut out = TierBytes::default();
    let mut off_gpu_padded = 0;
    let mut cum = 0u64;
    for &size in sizes {
        let mid = if total == 0 {
            0.0
        } else {
            (cum as f64 + size as f64 / 2.0) / total as f64 * 100.0
        };
        cum += size;
        if mid < w_disk {
            out.disk += size;
            off_gpu_padded += word_padded(size);
        } else if mid < w_disk + w_cpu {
            out.cpu += size;
            off_gpu_padded += word_padded(size);
        } else {
            out.gpu += size;
        }
    }
    (out, off_gpu_padded)
}

/// Splits `n` sequences by percent: the first `gpu`% on GPU, the next `cpu`% on CPU, the rest on disk.
fn split_sequences(n: usize, gpu: f64, cpu: f64) -> [usize; 3] {
    let g = ((n as f64 * gpu / 100.0).round() as usize).min(n);
    let gc = ((n as f64 * (gpu + cpu) / 100.0).round() as usize).clamp(g, n);
    [g, gc - g, n - gc]
}

/// Bytes per activation value: hidden states and scratch are f32 on the GPU and in every tier.
const ACT_BYTES: u64 = 4;

/// Bytes per uncompressed KV cache value as the runtime stores it ([`CacheDtype::for_model`]).
pub fn cache_value_bytes(config: &OptConfig) -> u64 {
    CacheDtype::for_model(config).bytes() as u64
}

/// Per-sequence sizes the formulas share.
struct Sizes {
    /// KV cache bytes of one sequence in one layer (K and V homes over prompt + gen positions).
    cache_seq_layer: u64,
    /// Bytes of one cache slot buffer (K or V) for a whole GPU batch of one layer.
    cache_slot: u64,
    /// Activation bytes of one sequence at the prompt length.
    act_seq: u64,
    /// Bytes of the activation slot (a whole GPU batch).
    act_slot: u64,
    slots: u64,
    gbs: u64,
}

impl Sizes {
    fn new(config: &OptConfig, policy: &Policy, w: Workload) -> Sizes {
        let h = config.hidden_size as u64;
        let gbs = policy.gpu_batch_size;
        // The runtime's own layout: a home holds one sequence's K (or V) rows, dense or packed pair-major.
        let rows = CacheRows::new(
            config,
            gbs,
            w.seq_len(),
            CacheDtype::for_model(config),
            policy
                .compress_cache
                .then_some(policy.compress_cache_config),
        );
        let act_seq = w.prompt_len as u64 * h * ACT_BYTES;
        Sizes {
            cache_seq_layer: 2 * rows.home_bytes(),
            cache_slot: padded(rows.slot_bytes(gbs)),
            act_seq,
            act_slot: padded(gbs as u64 * act_seq),
            slots: if policy.overlap { 2 } else { 1 },
            gbs: gbs as u64,
        }
    }
}

/// GPU buffers that do not depend on placement: compressed-cache scratch, batch I/O, scratch, logits.
fn fixed_gpu_working(config: &OptConfig, policy: &Policy, w: Workload) -> (u64, u64, u64, u64) {
    let g = policy.gpu_batch_size as u64;
    let h = config.hidden_size as u64;
    let f = config.ffn_embed_dim as u64;
    let nh = config.n_head as u64;
    let s = w.prompt_len as u64;
    let t = w.seq_len() as u64;
    let dt = ACT_BYTES;
    // CacheScratch: k, v and their pair-major copy `[gbs, seq, hidden]` f32, scores `[gbs, heads, seq]` f32.
    let cache_scratch = if policy.compress_cache {
        3 * 4 * g * t * h + 4 * g * nh * t
    } else {
        0
    };
    let batch_io = 2 * g * s * h * dt;
    let attention_prefill = 4 * g * s * h * dt + 4 * g * nh * s * s;
    let mlp_prefill = g * s * (f + h) * dt;
    let attention_decode = 4 * g * h * dt + 4 * g * nh * t;
    let scratch = attention_prefill.max(mlp_prefill).max(attention_decode);
    let logits = 4 * g * config.vocab_size as u64;
    (cache_scratch, batch_io, scratch, logits)
}

/// CPU scratch for attention on the CPU: fp32 scores and output of one GPU batch.
fn cpu_attention_scratch(config: &OptConfig, policy: &Policy, w: Workload) -> u64 {
    if !policy.cpu_cache_compute {
        return 0;
    }
    let g = policy.gpu_batch_size as u64;
    4 * g * (config.n_head as u64 * w.seq_len() as u64 + config.hidden_size as u64)
}

/// CPU attention's GPU scratch ([`crate::schedule`]'s `CpuAttn`): layer norm, q, k, v and attention output rows of
/// one GPU batch, plus its MLP intermediate rows, f32.
fn cpu_attention_gpu_scratch(config: &OptConfig, policy: &Policy) -> u64 {
    let g = policy.gpu_batch_size as u64;
    5 * padded(4 * g * config.hidden_size as u64) + padded(4 * g * config.ffn_embed_dim as u64)
}

/// Computes every tier's bytes for `policy` running `config` on `workload`. The policy's placement must be valid
/// (see [`Policy::validate_placement`]); caps are not checked here (see [`MemoryPlan::check`]).
pub fn plan(
    config: &OptConfig,
    policy: &Policy,
    workload: Workload,
) -> Result<MemoryPlan, PlanError> {
    config.validate()?;
    policy.validate_placement()?;
    check_workload(config, workload)?;
    let p = &policy.percent;
    let compress = policy
        .compress_weight
        .then_some(policy.compress_weight_config);

    // Outside the layers: always on the GPU. Each layer's groups by the percents; the weight slots hold one layer's
    // off-GPU buffers (every layer is placed alike, so the largest layer's is every layer's).
    let mut weights = TierBytes {
        gpu: outside_layer_bytes(config, compress),
        ..TierBytes::default()
    };
    let mut max_off_gpu = 0;
    let mut max_on_disk = 0;
    for i in 0..config.num_hidden_layers {
        let mut layer = TierBytes::default();
        let mut off_gpu = 0;
        for group in layer_groups(config, i, policy.sep_layer, compress) {
            let (placed, padded) = place_group(&group, p.weights.disk(), p.weights.cpu);
            layer = layer.add(placed);
            off_gpu += padded;
        }
        max_off_gpu = max_off_gpu.max(off_gpu);
        max_on_disk = max_on_disk.max(layer.disk);
        weights = weights.add(layer);
    }

    let sz = Sizes::new(config, policy, workload);
    let layers = config.num_hidden_layers as u64;
    // Every GPU batch is split the same way, so one batch's split times the number of batches.
    let per_batch_cache = split_sequences(policy.gpu_batch_size, p.cache.gpu, p.cache.cpu);
    let per_batch_act = split_sequences(policy.gpu_batch_size, p.act.gpu, p.act.cpu);
    let cache_sequences = per_batch_cache.map(|n| n * policy.num_gpu_batches);
    let act_sequences = per_batch_act.map(|n| n * policy.num_gpu_batches);
    let per_seq_cache = layers * sz.cache_seq_layer;
    let cache = TierBytes {
        gpu: cache_sequences[0] as u64 * per_seq_cache,
        cpu: cache_sequences[1] as u64 * per_seq_cache,
        disk: cache_sequences[2] as u64 * per_seq_cache,
    };
    let activations = TierBytes {
        gpu: act_sequences[0] as u64 * sz.act_seq,
        cpu: act_sequences[1] as u64 * sz.act_seq,
        disk: act_sequences[2] as u64 * sz.act_seq,
    };

    let (cache_scratch, batch_io, scratch, logits) = fixed_gpu_working(config, policy, workload);
    // What RunHomes takes from the GPU pool: cache slots whenever some cache is off the GPU (prefill and partly-GPU
    // batches attend on the GPU even with cpu_cache_compute), the activation slot whenever some activations are.
    let cache_off_gpu = per_batch_cache[0] < policy.gpu_batch_size;
    let act_off_gpu = per_batch_act[0] < policy.gpu_batch_size;
    let cache_slots = if cache_off_gpu {
        sz.slots * 2 * sz.cache_slot
    } else {
        0
    };
    let act_slot = if act_off_gpu { sz.act_slot } else { 0 };
    // CPU attention runs for a GPU batch whose whole cache is in CPU memory, uncompressed.
    let cpu_attention = if policy.cpu_cache_compute
        && !policy.compress_cache
        && per_batch_cache[1] == policy.gpu_batch_size
    {
        cpu_attention_gpu_scratch(config, policy)
    } else {
        0
    };
    let gpu_working = GpuWorking {
        weight_slots: sz.slots * max_off_gpu,
        cache_scratch,
        batch_io,
        scratch,
        cache_slots,
        act_slot,
        cpu_attention,
        logits,
    };

    // Staging on the CPU for disk reads: a group's disk part, one GPU batch's disk cache and activations.
    let disk_cache_in_batch = per_batch_cache[2] as u64;
    let disk_act_in_batch = per_batch_act[2] as u64;
    let cpu_working = sz.slots
        * (max_on_disk + disk_cache_in_batch * sz.cache_seq_layer + disk_act_in_batch * sz.act_seq)
        + cpu_attention_scratch(config, policy, workload);

    Ok(MemoryPlan {
        weights,
        cache,
        activations,
        gpu_working,
        cpu_working,
        cache_sequences,
        act_sequences,
    })
}

/// An affine function of the nine placement fractions `[wg, wc, wn, cg, cc, cn, hg, hc, hn]` (each in 0..=1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Affine {
    /// The constant term, bytes.
    pub constant: f64,
    /// Bytes per unit of each fraction.
    pub coef: [f64; 9],
}

impl Affine {
    /// The value at `fractions`.
    pub fn eval(&self, fractions: &[f64; 9]) -> f64 {
        self.constant
            + self
                .coef
                .iter()
                .zip(fractions)
                .map(|(c, x)| c * x)
                .sum::<f64>()
    }
}

/// What the affine memory terms need to know about the weights, computed once per model and placement options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightSummary {
    /// Stored bytes of every weight.
    pub total: u64,
    /// Stored bytes of the tensors outside the decoder layers, always on the GPU ([`outside_layer_bytes`]).
    pub outside: u64,
    /// Stored bytes of one decoder layer: what the weight percents place, layer by layer.
    pub layer: u64,
    /// The weight slot bytes of a wholly offloaded layer (its buffers padded to whole words), per slot.
    pub layer_slot: u64,
    /// Stored bytes the logits read every step: the LM head (the token embedding when tied) and project_out. Part
    /// of `outside`: resident on the GPU, so the head costs FLOPs but no transfers.
    pub head: u64,
}

impl WeightSummary {
    /// Summarises `config`'s weights under the placement options of `policy` (weight compression).
    pub fn new(config: &OptConfig, policy: &Policy) -> WeightSummary {
        let compress = policy
            .compress_weight
            .then_some(policy.compress_weight_config);
        let (layer, layer_slot) = if config.num_hidden_layers == 0 {
            (0, 0)
        } else {
            layer_tensors(config, 0)
                .iter()
                .map(|t| stored_bytes(config, t, compress))
                .fold((0, 0), |(l, s), b| (l + b, s + word_padded(b)))
        };
        let tied = config.tie_word_embeddings;
        let head = model_tensors(config)
            .iter()
            .filter(|t| {
                t.name == "lm_head.weight"
                    || t.name == "decoder.project_out.weight"
                    || (tied && t.name == "decoder.embed_tokens.weight")
            })
            .map(|t| stored_bytes(config, t, compress))
            .sum();
        let outside = outside_layer_bytes(config, compress);
        WeightSummary {
            total: outside + layer * config.num_hidden_layers as u64,
            outside,
            layer,
            layer_slot,
            head,
        }
    }
}

/// The continuous relaxation of [`plan`]'s peak bytes per tier, as affine functions of the placement fractions
/// (`gpu`, `cpu`, `disk`). The weight fractions are those of the decoder layers (the tensors outside them are a GPU
/// constant); off-GPU weight slots scale with a layer's off-GPU share; cache, activation and CPU attention slots are
/// counted whole (see the body). Only the batch sizes, flags and compression of `policy` are read, not its percents.
pub fn linear_terms(config: &OptConfig, policy: &Policy, workload: Workload) -> [Affine; 3] {
    linear_terms_with(
        config,
        policy,
        workload,
        &WeightSummary::new(config, policy),
    )
}

/// [`linear_terms`] with the weight summary computed once (a search evaluates thousands of batch sizes).
pub fn linear_terms_with(
    config: &OptConfig,
    policy: &Policy,
    workload: Workload,
    weights: &WeightSummary,
) -> [Affine; 3] {
    // The percents place the decoder layers; the tensors outside them stay on the GPU.
    let w_layers = (weights.total - weights.outside) as f64;
    let w_slot = weights.layer_slot as f64;
    let sz = Sizes::new(config, policy, workload);
    let b = policy.effective_batch() as f64;
    let layers = config.num_hidden_layers as f64;
    let cache_total = b * layers * sz.cache_seq_layer as f64;
    let act_total = b * sz.act_seq as f64;
    let slots = sz.slots as f64;
    let (cache_scratch, batch_io, scratch, logits) = fixed_gpu_working(config, policy, workload);

    let mut gpu = Affine {
        constant: (weights.outside + cache_scratch + batch_io + scratch + logits) as f64,
        ..Affine::default()
    };
    gpu.coef[0] += w_layers;
    gpu.coef[3] += cache_total;
    gpu.coef[6] += act_total;
    // Weight slots for a layer's off-GPU share: slots * layer * (1 - wg).
    gpu.constant += slots * w_slot;
    gpu.coef[0] -= slots * w_slot;
    // Cache and activation slots are whole-batch buffers the runtime allocates as soon as one sequence is off the
    // GPU, a step the relaxation cannot express: counted always (conservative by at most these slots when
    // everything stays on the GPU), so every policy the cost model picks passes the plan's check. Likewise CPU
    // attention's GPU scratch with cpu_cache_compute.
    gpu.constant += (sz.slots * 2 * sz.cache_slot + sz.act_slot) as f64;
    if policy.cpu_cache_compute && !policy.compress_cache {
        gpu.constant += cpu_attention_gpu_scratch(config, policy) as f64;
    }

    let mut cpu = Affine {
        constant: cpu_attention_scratch(config, policy, workload) as f64,
        ..Affine::default()
    };
    cpu.coef[1] += w_layers;
    cpu.coef[4] += cache_total;
    cpu.coef[7] += act_total;
    // Staging for the disk share of a layer and of one GPU batch's cache and activations.
    let g = sz.gbs as f64;
    cpu.coef[2] += slots * weights.layer as f64;
    cpu.coef[5] += slots * g * sz.cache_seq_layer as f64;
    cpu.coef[8] += slots * g * sz.act_seq as f64;

    let mut disk = Affine::default();
    disk.coef[2] += w_layers;
    disk.coef[5] += cache_total;
    disk.coef[8] += act_total;
    [gpu, cpu, disk]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Percent;

    const W: Workload = Workload {
        prompt_len: 512,
        gen_len: 32,
    };

    #[test]
    fn all_gpu_plan_holds_model_cache_and_activations() {
        let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
        let p = Policy {
            gpu_batch_size: 8,
            num_gpu_batches: 2,
            ..Policy::default()
        };
        let plan = plan(&c, &p, W).unwrap();
        assert_eq!(plan.weights.gpu, c.model_bytes());
        assert_eq!(plan.cache.gpu, c.cache_bytes(16, 544));
        // Activations are f32: twice FlexLLMGen's fp16 hidden bytes.
        assert_eq!(plan.activations.gpu, 2 * c.hidden_bytes(16, 512));
        assert_eq!(
            plan.weights.cpu + plan.weights.disk + plan.cache.cpu + plan.activations.disk,
            0
        );
        // Nothing streams: no weight or cache slots, no CPU staging.
        assert_eq!(
            plan.gpu_working.weight_slots + plan.gpu_working.cache_slots,
            0
        );
        assert_eq!(plan.cpu_working, 0);
        let peak = plan.peak();
        assert_eq!(
            peak.gpu,
            c.model_bytes()
                + c.cache_bytes(16, 544)
                + 2 * c.hidden_bytes(16, 512)
                + plan.gpu_working.total()
        );
        // The summary the cost model uses: the tied LM head is the token embedding.
        let summary = WeightSummary::new(&c, &p);
        assert_eq!(summary.total, c.model_bytes());
        assert_eq!(summary.head, (c.vocab_size * c.hidden_size) as u64 * 2);
        assert_eq!(summary.layer, c.layer_bytes());
        // The scratch is the fp32 prefill attention scores of one GPU batch plus q, k, v, output.
        assert_eq!(
            plan.gpu_working.scratch,
            8 * c.hidden_bytes(8, 512) + 4 * 8 * 32 * 512 * 512
        );
    }

    #[test]
    fn weights_split_by_cumulative_size_per_layer() {
        let c = OptConfig::opt("opt-30b", 48, 56, 7168, 28672);
        let p = Policy {
            percent: Percent::from_array([20.0, 80.0, 0.0, 100.0, 0.0, 100.0]),
            sep_layer: false,
            ..Policy::default()
        };
        let plan = plan(&c, &p, W).unwrap();
        assert_eq!(plan.weights.total(), c.model_bytes());
        assert_eq!(plan.weights.disk, 0);
        // Per layer: k,v,q,out are 1/3 of the layer bytes, fc1 and fc2 1/3 each. Midpoints at 4.2%..29%
        // (attention), 50% (fc1), 83% (fc2): with 80% CPU, fc2 alone stays on the GPU.
        let fc2 = (c.hidden_size * c.ffn_embed_dim + c.hidden_size) as u64 * 2;
        let ln = 2 * c.hidden_size as u64 * 2;
        // Outside the layers (tied embedding, positions, final layer norm): always on the GPU, whatever the percents.
        let outside = ((c.vocab_size + c.num_positions() + 2) * c.hidden_size) as u64 * 2;
        assert_eq!(outside_layer_bytes(&c, None), outside);
        assert_eq!(plan.weights.gpu, 48 * (fc2 + ln) + outside);
        assert_eq!(plan.weights.cpu, c.model_bytes() - plan.weights.gpu);
        assert_eq!(plan.cache.cpu, c.cache_bytes(4, 544), "default batch 4 x 1");
        assert_eq!(plan.activations.cpu, 2 * c.hidden_bytes(4, 512));
        // Double-buffered slots for one layer's off-GPU part (everything but fc2 and the final layer norm).
        assert_eq!(
            plan.gpu_working.weight_slots,
            2 * (c.layer_bytes() - fc2 - ln)
        );
        // The whole GPU batch's K and V of one layer, double-buffered, and the activation slot.
        assert_eq!(plan.gpu_working.cache_slots, 2 * c.cache_bytes(4, 544) / 48);
        assert_eq!(plan.gpu_working.act_slot, c.hidden_bytes(4, 512) * 2);
        assert_eq!(plan.gpu_working.cpu_attention, 0);
    }

    #[test]
    fn sequences_split_whole_and_activations_may_mix() {
        let c = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
        let p = Policy {
            gpu_batch_size: 4,
            num_gpu_batches: 3,
            percent: Percent::from_array([100.0, 0.0, 50.0, 25.0, 50.0, 50.0]),
            ..Policy::default()
        };
        let plan = plan(&c, &p, W).unwrap();
        // Each GPU batch of 4: 2 cache on GPU, 1 on CPU, 1 on disk; activations 2 and 2.
        assert_eq!(plan.cache_sequences, [6, 3, 3]);
        assert_eq!(plan.act_sequences, [6, 6, 0]);
        assert_eq!(plan.cache.disk, c.cache_bytes(3, 544));
        assert_eq!(plan.activations.cpu, 2 * c.hidden_bytes(6, 512));
        // Slots for the whole batch of 4 (the runtime computes the batch in one slot), double-buffered.
        assert_eq!(plan.gpu_working.cache_slots, 2 * c.cache_bytes(4, 544) / 24);
        // Two sequences' activations are off the GPU: the activation slot holds the batch.
        assert_eq!(plan.gpu_working.act_slot, 2 * c.hidden_bytes(4, 512));
        // CPU staging for one GPU batch's disk cache (1 sequence, one layer), double-buffered.
        assert_eq!(plan.cpu_working, 2 * c.cache_bytes(1, 544) / 24);
    }

    #[test]
    fn cpu_cache_compute_still_counts_the_cache_slots_and_its_gpu_scratch() {
        let c = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
        let p = Policy {
            gpu_batch_size: 4,
            num_gpu_batches: 2,
            percent: Percent::from_array([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]),
            cpu_cache_compute: true,
            overlap: false,
            ..Policy::default()
        };
        let w = plan(&c, &p, W).unwrap().gpu_working;
        // Prefill attends on the GPU: one (no overlap) K and V slot for the batch of 4.
        assert_eq!(w.cache_slots, c.cache_bytes(4, 544) / 24);
        assert_eq!(w.act_slot, 0);
        // norm, q, k, v, attention rows and the MLP's intermediate rows of 4 sequences, f32.
        assert_eq!(w.cpu_attention, 4 * 4 * (5 * 2048 + 8192));
        // A cache only partly in CPU memory attends on the GPU: no CPU attention scratch.
        let partly = Policy {
            percent: Percent::from_array([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]),
            ..p.clone()
        };
        assert_eq!(plan(&c, &partly, W).unwrap().gpu_working.cpu_attention, 0);
    }

    #[test]
    fn compression_shrinks_weights_about_three_and_a_half_times() {
        let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
        let p = Policy {
            compress_weight: true,
            ..Policy::default()
        };
        let plan = plan(&c, &p, W).unwrap();
        let ratio = c.model_bytes() as f64 / plan.weights.gpu as f64;
        assert!((3.4..3.56).contains(&ratio), "{ratio}");
        // Exactly the packed bytes the tiers allocate; the kernels read packed weights, so no decompression buffer.
        assert_eq!(plan.weights.gpu, c.compressed_model_bytes(4, 64));
        assert_eq!(plan.gpu_working.cache_scratch, 0);
    }

    #[test]
    fn a_compressed_cache_counts_its_packed_homes_and_f32_scratch() {
        let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
        let p = Policy {
            gpu_batch_size: 4,
            num_gpu_batches: 2,
            percent: Percent::from_array([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]),
            compress_cache: true,
            compress_cache_config: CompressionConfig::new(4, 32).unwrap(),
            ..Policy::default()
        };
        let plan = plan(&c, &p, W).unwrap();
        assert_eq!(plan.cache.gpu, c.compressed_cache_bytes(4, 544, 4, 32));
        assert_eq!(plan.cache.cpu, c.compressed_cache_bytes(4, 544, 4, 32));
        let ratio = c.cache_bytes(8, 544) as f64 / plan.cache.total() as f64;
        assert!((3.0..3.6).contains(&ratio), "{ratio}");
        let (g, t, h) = (4u64, 544u64, 4096u64);
        assert_eq!(
            plan.gpu_working.cache_scratch,
            3 * 4 * g * t * h + 4 * g * 32 * t
        );
    }

    #[test]
    fn caps_are_checked_with_tier_amount_and_flag() {
        let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
        let p = Policy {
            gpu_batch_size: 32,
            ..Policy::default()
        };
        let plan = plan(&c, &p, W).unwrap();
        let caps = Caps {
            gpu: Some(15 << 30),
            cpu: Some(1 << 40),
            disk: None,
        };
        let err = plan.check(&caps).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].tier, Tier::Gpu);
        let msg = err.to_string();
        assert!(
            msg.starts_with("GPU memory: the plan needs") && msg.contains("--gpu-mem is 15.00 GiB"),
            "{msg}"
        );
        assert!(msg.contains("over)"), "{msg}");
        assert!(plan.check(&Caps::default()).is_ok());
    }

    #[test]
    fn bad_workloads_are_refused() {
        let c = OptConfig::opt("opt-125m", 12, 12, 768, 3072);
        let e = plan(
            &c,
            &Policy::default(),
            Workload {
                prompt_len: 2000,
                gen_len: 100,
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("exceeds opt-125m's context of 2048"),
            "{e}"
        );
        let e = plan(
            &c,
            &Policy::default(),
            Workload {
                prompt_len: 0,
                gen_len: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
    }

    #[test]
    fn linear_terms_match_the_plan_where_no_rounding_happens() {
        let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
        for percent in [
            [100.0, 0.0, 100.0, 0.0, 100.0, 0.0],
            [0.0, 100.0, 0.0, 100.0, 0.0, 100.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [100.0, 0.0, 50.0, 50.0, 0.0, 0.0],
        ] {
            let p = Policy {
                gpu_batch_size: 4,
                num_gpu_batches: 2,
                percent: Percent::from_array(percent),
                ..Policy::default()
            };
            let exact_plan = plan(&c, &p, W).unwrap();
            let exact = exact_plan.peak();
            // The relaxation counts the whole-batch cache and activation slots even when nothing is off the GPU
            // (the runtime's step at 100% cannot be affine): exactly that much over, never under.
            let w = exact_plan.gpu_working;
            let full = plan(
                &c,
                &Policy {
                    percent: Percent::from_array([100.0, 0.0, 0.0, 100.0, 0.0, 100.0]),
                    ..p.clone()
                },
                W,
            )
            .unwrap()
            .gpu_working;
            let gpu_over = (full.cache_slots - w.cache_slots) + (full.act_slot - w.act_slot);
            let f = [
                percent[0] / 100.0,
                percent[1] / 100.0,
                1.0 - (percent[0] + percent[1]) / 100.0,
                percent[2] / 100.0,
                percent[3] / 100.0,
                1.0 - (percent[2] + percent[3]) / 100.0,
                percent[4] / 100.0,
                percent[5] / 100.0,
                1.0 - (percent[4] + percent[5]) / 100.0,
            ];
            let [g, cpu, d] = linear_terms(&c, &p, W);
            for (tier, lin, ex) in [
                ("gpu", g, exact.gpu + gpu_over),
                ("cpu", cpu, exact.cpu),
                ("disk", d, exact.disk),
            ] {
                let v = lin.eval(&f);
                assert!(
                    (v - ex as f64).abs() <= 1e-9 * ex as f64 + 1.0,
                    "{percent:?} {tier}: {v} vs {ex}"
                );
            }
        }
    }
}
