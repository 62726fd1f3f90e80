//! The placement's bytes as affine functions of the nine placement fractions: the continuous relaxation strata's cost
//! model optimises over. Every size comes from the functions the exact placement uses (the weight buffers, the
//! cache's row layout, the activation dtype, the working buffers and the kernels' staging), so the two cannot drift;
//! only the rounding to whole tensors and sequences is relaxed.

use super::{
    act_dtype, block_decode_asked, fixed_working, kernel_scratch, weight_format, CacheRows,
    DeviceLimits, Shape, WeightSizes, Workload,
};
use crate::config::OptConfig;
use crate::gpu::buffer_size;
use crate::gpu::kernels::CacheDtype;
use crate::offload::policy::Policy;
use crate::weights::ModelTensor;

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
    /// Bytes of every weight buffer.
    pub total: u64,
    /// Bytes of the buffers outside the decoder layers, always on the GPU.
    pub outside: u64,
    /// Bytes of one decoder layer's buffers: what the weight percents place, layer by layer.
    pub layer: u64,
    /// The weight slot bytes of a wholly offloaded layer, per slot (its buffers, each a home's size).
    pub layer_slot: u64,
    /// Bytes the logits read every step: the LM head (the token embedding when tied) and project_out. Part of
    /// `outside`: resident on the GPU, so the head costs FLOPs but no transfers.
    pub head: u64,
}

impl WeightSummary {
    /// Summarises `config`'s weights under the placement options of `policy` (weight compression and dtype).
    pub fn new(config: &OptConfig, policy: &Policy) -> WeightSummary {
        let sizes = WeightSizes::new(
            config,
            weight_format(config, policy),
            &DeviceLimits::UNBOUNDED,
        )
        .unwrap_or(WeightSizes {
            outside: Vec::new(),
            layer: Vec::new(),
        });
        let tied = config.tie_word_embeddings;
        let head = sizes
            .outside
            .iter()
            .filter(|(t, _)| {
                matches!(t, ModelTensor::LmHead | ModelTensor::ProjectOut)
                    || (tied && *t == ModelTensor::EmbedTokens)
            })
            .flat_map(|(_, b)| b)
            .sum();
        let outside = sizes.outside_bytes();
        let layer = sizes.layer_bytes();
        WeightSummary {
            total: outside + layer * config.num_hidden_layers as u64,
            outside,
            layer,
            layer_slot: layer,
            head,
        }
    }
}

/// The continuous relaxation of the placement's peak bytes per tier (buffers plus host staging), as affine
/// functions of the placement fractions (`gpu`, `cpu`, `disk`). The weight fractions are those of the decoder
/// layers (the tensors outside them are a GPU constant); off-GPU weight slots scale with a layer's off-GPU share;
/// cache, activation and CPU attention slots are counted whole (see the body). Only the batch sizes, flags and
/// compression of `policy` are read, not its percents.
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
    let w_layers = (weights.total - weights.outside) as f64;
    let w_slot = weights.layer_slot as f64;
    let gbs = policy.gpu_batch_size;
    let shape = Shape {
        gbs,
        sizes: vec![gbs; policy.num_gpu_batches],
        s: workload.prompt_len,
        capacity: workload.seq_len(),
        // Counted whenever the policy may run block decode steps (the relaxation cannot tell where the cache and
        // activations go): conservative by the block's residual stream.
        block_decode: block_decode_asked(policy, workload),
    };
    let act_dtype = act_dtype(config, policy, &DeviceLimits::UNBOUNDED);
    let act = act_dtype.bytes() as u64;
    let h = config.hidden_size as u64;
    let rows = CacheRows::new(
        config,
        gbs,
        shape.capacity,
        CacheDtype::for_model(config),
        policy
            .compress_cache
            .then_some(policy.compress_cache_config),
    );
    let cache_seq_layer = (2 * rows.home_bytes()) as f64;
    let act_seq = buffer_size(shape.s as u64 * h * act) as f64;
    let slots = if policy.overlap { 2.0 } else { 1.0 };
    let b = policy.effective_batch() as f64;
    let layers = config.num_hidden_layers as f64;
    let cache_total = b * layers * cache_seq_layer;
    let act_total = b * act_seq;
    // Inputs, scratch, logits and the packed cache's scratch do not depend on placement; nor do the kernels' staging
    // (counted as if every batch attended on the GPU, which never undercounts).
    let fixed: u64 = fixed_working(config, policy, &shape, act_dtype)
        .iter()
        .map(|(_, bytes)| bytes)
        .sum::<u64>()
        + kernel_scratch(
            config,
            policy,
            workload,
            &shape,
            &DeviceLimits::UNBOUNDED,
            act_dtype,
            &[gbs],
        )
        .iter()
        .sum::<u64>();

    let mut gpu = Affine {
        constant: (weights.outside + fixed) as f64,
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
    // everything stays on the GPU), so every policy the cost model picks passes the placement's check. Likewise CPU
    // attention's GPU scratch with cpu_cache_compute.
    let cache_slot = buffer_size(rows.slot_bytes(gbs)) as f64;
    // Two activation slots where CPU-attention batches pipeline ([`super::act_slots`]).
    let act_slots = if policy.overlap && policy.cpu_cache_compute && policy.num_gpu_batches > 1 {
        2.0
    } else {
        1.0
    };
    let act_slot = buffer_size(gbs as u64 * shape.s as u64 * h * act) as f64;
    gpu.constant += slots * 2.0 * cache_slot + act_slots * act_slot;
    let g = gbs as u64;
    if policy.cpu_cache_compute && (!policy.compress_cache || policy.attn_sparsity >= 1.0) {
        gpu.constant += (5 * buffer_size(g * h * act)
            + buffer_size(g * config.ffn_embed_dim as u64 * act)) as f64;
    }

    // CPU attention's f32 scores and output on the host.
    let mut cpu = Affine {
        constant: if policy.cpu_cache_compute {
            (4 * g * (config.n_head as u64 * shape.capacity as u64 + h)) as f64
        } else {
            0.0
        },
        ..Affine::default()
    };
    cpu.coef[1] += w_layers;
    cpu.coef[4] += cache_total;
    cpu.coef[7] += act_total;
    // Staging for the disk share of a layer and of one GPU batch's cache and activations.
    let gf = gbs as f64;
    cpu.coef[2] += slots * weights.layer as f64;
    cpu.coef[5] += slots * gf * cache_seq_layer;
    cpu.coef[8] += slots * gf * act_seq;

    let mut disk = Affine::default();
    disk.coef[2] += w_layers;
    disk.coef[5] += cache_total;
    disk.coef[8] += act_total;
    [gpu, cpu, disk]
}
