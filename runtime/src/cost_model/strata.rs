//! strata's own formulation: a model of strata's runtime rather than FlexLLMGen's.
//!
//! Differences from FlexLLMGen's formulation, each following from how strata runs:
//! - One GPU queue (wgpu): copies to and from the GPU and the GPU's compute serialise, so a layer costs at least
//!   `gpu copies + gpu compute`; only disk I/O and CPU attention (CPU threads) overlap with the GPU queue. A layer's
//!   time is `max(disk + CPU work, GPU copies + GPU compute)` instead of FlexLLMGen's max over each direction.
//! - Activations may be split over all three tiers (FlexLLMGen forces them onto one device and never onto disk).
//! - Compression divides the bytes moved and stored by the real ratio (4 bits + two fp16 per 64 values: /3.56 at
//!   fp16), for weights and, when enabled, the KV cache.
//! - Decode reads CPU-resident weights as `--transfer auto` does on a device with the DMA path: in place (zero-copy)
//!   when the block is one GPU batch, so the CPU share of a layer's linears runs at PCIe speed with its compute
//!   hidden (`max(bytes / ctog, compute)`), and copied into weight slots before the layer with several GPU batches
//!   (where reading in place would move the weights once per batch), serial with the compute. Prefill always copies.
//! - `cpu_cache_compute` is a choice: either the off-GPU cache streams up and attention runs on the GPU, or the CPU
//!   attends over it (q, new K/V down, output up). The search solves both and keeps the faster.
//! - The logits are part of the model: every step multiplies by the LM head (the tied token embedding, as large as a
//!   layer of opt-6.7b); its FLOPs are spread evenly over the layers. Like every tensor outside the decoder layers,
//!   the head stays resident on the GPU (a constant in the GPU's memory row, no transfer time): every GPU batch
//!   reads it at the end of every step, so streaming it would move the largest matrix per batch and step. The
//!   weight fractions place the decoder layers only.
//! - Memory is [`crate::offload::placement::linear_terms_with`], the continuous form of the placement that every run
//!   is allocated from, so a chosen policy is one the runtime accepts. Every byte count here (activations, cache
//!   values, a layer's weights) comes from the placement's rules.

use super::flexllmgen::add_memory_row;
use super::lp::{coef, Lp, CAP, NV, TGEN, TPRE};
use super::{CapMode, Problem, CC, CG, CN, HC, HG, HN, WC, WG, WN};
use crate::gpu::kernels::GEMV_MAX_ROWS;
use crate::hardware::{HardwareProfile, Rates};
use crate::offload::placement::{linear_terms_with, WeightSummary};
use crate::offload::policy::Policy;

/// Seconds of one decode dispatch of a linear over `weight_bytes` doing `flops_per_row` for each of `rows` rows. Where
/// the profile has the affine fit of the GEMV kernel's time (`strata profile`) and the rows are the GEMV kernel's:
/// a rows-independent part (reading and converting the weights, the dispatch) plus a per-row part; otherwise (and
/// for the GEMM kernel's larger batches) FLOPs at `mm_flops_g`. The two agree at [`GEMV_MAX_ROWS`] rows, where the
/// profile measured both.
pub(crate) fn decode_linear_s(
    hw: &HardwareProfile,
    rows: usize,
    weight_bytes: f64,
    flops_per_row: f64,
) -> f64 {
    let flops = rows as f64 * flops_per_row;
    match (hw.gemv_weight_gib_s, hw.mm_flops_g_row) {
        (Some(bw), Some(row)) if rows <= GEMV_MAX_ROWS => {
            weight_bytes / HardwareProfile::bytes_per_s(bw)
                + flops / HardwareProfile::flop_per_s(row)
        }
        _ => flops / HardwareProfile::flop_per_s(hw.mm_flops_g),
    }
}

/// The policy skeleton a formulation evaluates: batch sizes and flags, percents left at their default.
pub(crate) fn skeleton(p: &Problem, gbs: usize, ngb: usize, cpu_cache_compute: bool) -> Policy {
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: ngb,
        cpu_cache_compute,
        compress_weight: p.compress_weight,
        compress_weight_config: p.compress_weight_config,
        compress_cache: p.compress_cache,
        compress_cache_config: p.compress_cache_config,
        transfer: p.transfer,
        ..Policy::default()
    }
}

/// Builds the linear program for one `(gbs, num_gpu_batches)` and choice of `cpu_cache_compute`. `block_decode`: the
/// placement runs each decode layer once over the whole block ([`crate::offload::placement::block_decode`]), which
/// keeps every cache and hidden row on the GPU: the program then holds those fractions at 1.
pub(crate) fn build(
    p: &Problem,
    weights: &WeightSummary,
    gbs: usize,
    ngb: usize,
    cpu_cache_compute: bool,
    block_decode: bool,
    caps: CapMode,
) -> Lp {
    let c = p.config;
    let hw = p.hardware;
    let s = p.workload.prompt_len as f64;
    let n = p.workload.gen_len as f64;
    let l = c.num_hidden_layers as f64;
    let h = c.hidden_size as f64;
    let f = c.ffn_embed_dim as f64;
    let b = (gbs * ngb) as f64;
    // Activations and the cache at the bytes the placement gives them.
    // Planned without a device or a policy: the checkpoint's dtype on a device with every feature.
    let act_bytes = crate::offload::placement::act_dtype(
        c,
        &crate::offload::policy::Policy::default(),
        &crate::offload::placement::DeviceLimits::UNBOUNDED,
    )
    .bytes() as f64;
    let Rates {
        ctog,
        gtoc_cache,
        gtoc_hidden,
        dtoc,
        ctod_cache_p,
        ctod_hidden_p,
        ctod_g,
        mm_p,
        mm_g: _,
        bmm_p,
        bmm_g,
    } = hw.rates();
    let cpu_rate = hw.cpu_rate(gbs, c.hidden_size);

    // A layer's weights: what streams when offloaded (the LM head and embeddings are resident on the GPU).
    let wl = weights.layer as f64;
    let v = c.vocab_size as f64;
    let head_flops_per_layer = 2.0 * b * h * v / l;
    // Bytes per cached value: fp16, or packed nibbles plus per-group scale and minimum.
    let cv = if p.compress_cache {
        let c = p.compress_cache_config;
        crate::compress::packed_bytes(1, c.group_size, c) as f64 / c.group_size as f64
    } else {
        crate::gpu::kernels::CacheDtype::for_model(c).bytes() as f64
    };

    let mut lp = Lp::default();
    lp.objective[TPRE] = l / b;
    lp.objective[TGEN] = (n - 1.0) * l / b;
    lp.eq(coef(&[(WG, 1.0), (WC, 1.0), (WN, 1.0)]), 1.0);
    if block_decode {
        lp.eq(coef(&[(CG, 1.0)]), 1.0);
        lp.eq(coef(&[(HG, 1.0)]), 1.0);
    }
    lp.eq(coef(&[(CG, 1.0), (CC, 1.0), (CN, 1.0)]), 1.0);
    lp.eq(coef(&[(HG, 1.0), (HC, 1.0), (HN, 1.0)]), 1.0);

    // Prefill, per layer. GPU queue: weights and input activations up, output activations and new cache down,
    // then compute. CPU side: disk reads of weights and activations, disk writes of activations and cache.
    let act_p = s * h * act_bytes * b;
    let kv_p = 2.0 * s * h * cv * b;
    // Prefill computes logits at the last position only.
    let comp_p = b * (8.0 * s * h * h + 4.0 * s * h * f) / mm_p
        + 4.0 * b * s * s * h / bmm_p
        + head_flops_per_layer / mm_p;
    let mut gpu_p = coef(&[
        (WC, wl / ctog),
        (WN, wl / ctog),
        (HC, act_p / ctog + act_p / gtoc_hidden),
        (HN, act_p / ctog + act_p / gtoc_hidden),
        (CC, kv_p / gtoc_cache),
        (CN, kv_p / gtoc_cache),
    ]);
    gpu_p[TPRE] = -1.0;
    lp.le(gpu_p, -comp_p);
    let mut disk_p = coef(&[
        (WN, wl / dtoc),
        (HN, act_p / dtoc + act_p / ctod_hidden_p),
        (CN, kv_p / ctod_cache_p),
    ]);
    disk_p[TPRE] = -1.0;
    lp.le(disk_p, 0.0);

    // Decode, per layer and token, over the average context s + n/2.
    let ctx = s + n / 2.0;
    let act_g = h * act_bytes * b;
    let kv_new = 2.0 * h * cv * b;
    let kv_ctx = 2.0 * ctx * h * cv * b;
    let attn_flops = 4.0 * b * ctx * h;
    // Each GPU batch's dispatch of a layer's linears (and of the LM head, spread over the layers) reads the weights
    // once for its rows; a block decode step's one dispatch per linear reads them once for all the block's rows.
    let layer_flops_per_row = 8.0 * h * h + 4.0 * h * f;
    let comp_lin = if block_decode {
        decode_linear_s(hw, gbs * ngb, wl, layer_flops_per_row)
    } else {
        ngb as f64 * decode_linear_s(hw, gbs, wl, layer_flops_per_row)
    };
    let comp_g =
        comp_lin + ngb as f64 * decode_linear_s(hw, gbs, weights.head as f64, 2.0 * h * v) / l;
    let mut gpu_g = coef(&[
        (WC, wl / ctog),
        (WN, wl / ctog),
        (HC, act_g / ctog + act_g / gtoc_hidden),
        (HN, act_g / ctog + act_g / gtoc_hidden),
    ]);
    let mut side_g = coef(&[(WN, wl / dtoc), (HN, act_g / dtoc + act_g / ctod_g)]);
    // Reading the disk part of the cache and writing its new token happen on CPU threads either way.
    side_g[CN] += kv_ctx / dtoc + kv_new / ctod_g;
    if cpu_cache_compute {
        // GPU attends over its own share; the CPU over the rest: q, new K and V down, the output up.
        gpu_g[CG] += attn_flops / bmm_g;
        for v in [CC, CN] {
            gpu_g[v] += 3.0 * act_g / gtoc_hidden + act_g / ctog;
            side_g[v] += attn_flops / cpu_rate;
        }
    } else {
        // The whole cache is attended on the GPU; off-GPU shares stream up and the new token's K/V go down.
        gpu_g[CG] += attn_flops / bmm_g;
        gpu_g[CC] += attn_flops / bmm_g;
        gpu_g[CN] += attn_flops / bmm_g;
        for v in [CC, CN] {
            gpu_g[v] += kv_ctx / ctog + kv_new / gtoc_cache;
        }
    }
    gpu_g[TGEN] = -1.0;
    // Devices are assumed to have the DMA path (the profile prices it where measured).
    if p.transfer.decode_zero_copy(true, ngb) || block_decode {
        // Zero-copy: the linears over the CPU share take max(their bytes over PCIe, their compute), the rest as
        // before; their bytes cross once per GPU batch, or once with block decode.
        let mut compute_bound = gpu_g;
        compute_bound[WC] = 0.0;
        lp.le(compute_bound, -comp_g);
        // The profile's measured in-place rate when it has one (a one-row linear: the least compute per byte).
        let zero_copy = hw.ctog_zero_copy.map_or(ctog, HardwareProfile::bytes_per_s);
        let passes = if block_decode { 1.0 } else { ngb as f64 };
        gpu_g[WC] = passes * wl / zero_copy - comp_lin;
    }
    lp.le(gpu_g, -comp_g);
    side_g[TGEN] = -1.0;
    lp.le(side_g, 0.0);

    // Memory: the placement's affine peaks per tier.
    let policy = skeleton(p, gbs, ngb, cpu_cache_compute);
    let terms = linear_terms_with(c, &policy, p.workload, weights);
    for (tier, t) in terms.iter().enumerate() {
        let mut row = [0.0; NV];
        row[..9].copy_from_slice(&t.coef);
        add_memory_row(&mut lp, tier, row, t.constant, p.headroom, caps);
    }
    if caps.minimise.is_some() {
        lp.objective = coef(&[(CAP, 1.0)]);
    }
    lp
}
