use super::*;
use crate::offload::policy::Percent;

const W: Workload = Workload {
    prompt_len: 512,
    gen_len: 32,
};

fn placement(c: &OptConfig, p: &Policy) -> Placement {
    Placement::new(c, p, W, &DeviceLimits::UNBOUNDED).unwrap()
}

/// Bytes of the listed buffers `pick` selects.
fn bytes(p: &Placement, pick: impl Fn(&BufferId) -> bool) -> u64 {
    p.buffers()
        .iter()
        .filter(|b| pick(&b.id))
        .map(|b| b.bytes)
        .sum()
}

/// Extra bytes of an f16 model's vectors, which the GPU holds as f32: two per element.
fn f32_vectors_extra(c: &OptConfig) -> u64 {
    let (h, f) = (c.hidden_size as u64, c.ffn_embed_dim as u64);
    2 * (c.num_hidden_layers as u64 * (9 * h + f) + 2 * h)
}

#[test]
fn all_gpu_placement_holds_model_cache_activations_and_the_forward_pass_buffers() {
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let p = Policy {
        gpu_batch_size: 8,
        num_gpu_batches: 2,
        ..Policy::default()
    };
    let pl = placement(&c, &p);
    let plan = pl.plan();
    // FlexLLMGen's model bytes count biases and norms at f16; strata keeps them as f32.
    assert_eq!(plan.weights.gpu, c.model_bytes() + f32_vectors_extra(&c));
    assert_eq!(plan.cache.gpu, c.cache_bytes(16, 544));
    // An f16 checkpoint computes with f16 activations: FlexLLMGen's fp16 hidden bytes.
    assert_eq!(pl.act_dtype, ActDtype::F16);
    assert_eq!(plan.activations.gpu, c.hidden_bytes(16, 512));
    assert_eq!(plan.allocated().cpu + plan.allocated().disk, 0);
    assert_eq!(plan.staging, TierBytes::default());
    // Nothing streams: no slots of any kind.
    assert_eq!(pl.weight_slots() + pl.cache_slots(), 0);
    assert!(pl.spec(BufferId::ActSlot { slot: 0 }).is_none());
    // The kernels' staging: no packed cache rows (slots 0, 1); the split-keys partials of a decode step of 8
    // sequences over 544 keys (slot 2); the 16 bytes the tiled prefill kernels bind for split-K partials, which the
    // decode rows (8, GEMV) never split (slot 3).
    let decode = AttentionShape {
        batch: 8,
        s_new: 1,
        past: 543,
        capacity: 544,
        hidden: 4096,
        n_head: 32,
    };
    let sizes = pl.kernel_scratch().map(|s| s.map(|s| s.bytes));
    assert_eq!(
        sizes,
        [
            None,
            None,
            Some(attention_scratch_bytes(&decode).next_power_of_two()),
            Some(16)
        ]
    );
    // The working buffers, one by one: two batches' inputs, the f16 scratch of one batch of 8 x 512 rows (no
    // projection: a one-element embedding buffer, one word), the f32 logits of all 16 sequences, the kernels' staging.
    let (h, f, v) = (4096u64, 16384u64, c.vocab_size as u64);
    let rows = 8 * 512;
    let inputs = 2 * (2 * 8 * 512 * 4 + 8 * 544 * 4);
    let work = 2 * (3 * rows * h + rows * f + 3 * 8 * h) + 4;
    let staging: u64 = sizes.iter().flatten().sum();
    assert_eq!(
        plan.working.gpu,
        inputs + work + 16 * v * 4 + 16 * 4 + staging
    );
    assert_eq!(
        plan.peak().gpu,
        plan.weights.gpu + plan.cache.gpu + plan.activations.gpu + plan.working.gpu
    );
    // The summary the cost model uses: the tied LM head is the token embedding.
    let summary = WeightSummary::new(&c, &p);
    assert_eq!(summary.total, plan.weights.gpu);
    assert_eq!(summary.head, (c.vocab_size * c.hidden_size) as u64 * 2);
}

#[test]
fn weights_split_by_cumulative_size_per_layer() {
    let c = OptConfig::opt("opt-30b", 48, 56, 7168, 28672);
    let p = Policy {
        percent: Percent::from_array([20.0, 80.0, 0.0, 100.0, 0.0, 100.0]),
        sep_layer: false,
        ..Policy::default()
    };
    let pl = placement(&c, &p);
    let plan = pl.plan();
    assert_eq!(plan.weights.disk, 0);
    // Per layer: k,v,q,out are 1/3 of the layer bytes, fc1 and fc2 1/3 each. Midpoints at 4.2%..29% (attention), 50%
    // (fc1), 83% (fc2): with 80% CPU, fc2 and the final layer norm alone stay on the GPU.
    let (h, f) = (c.hidden_size as u64, c.ffn_embed_dim as u64);
    let fc2 = h * f * 2 + h * 4;
    let ln = 2 * h * 4;
    // Outside the layers (tied embedding, positions, final layer norm): always on the GPU, whatever the percents.
    let outside = ((c.vocab_size + c.num_positions()) * c.hidden_size) as u64 * 2 + ln;
    assert_eq!(outside_layer_bytes(&c, None), outside);
    assert_eq!(plan.weights.gpu, 48 * (fc2 + ln) + outside);
    let layer = WeightSummary::new(&c, &p).layer;
    assert_eq!(plan.weights.cpu, 48 * (layer - fc2 - ln));
    assert_eq!(plan.cache.cpu, c.cache_bytes(4, 544), "default batch 4 x 1");
    assert_eq!(plan.activations.cpu, c.hidden_bytes(4, 512));
    assert_eq!(
        plan.activations.gpu, 0,
        "offloaded activations hold no GPU bytes"
    );
    // Double-buffered slots for one layer's off-GPU part.
    let weight_slots = bytes(&pl, |id| matches!(id, BufferId::WeightSlot { .. }));
    assert_eq!(weight_slots, 2 * (layer - fc2 - ln));
    // The whole GPU batch's K and V of one layer, double-buffered, and the activation slot.
    let cache_slots = bytes(&pl, |id| matches!(id, BufferId::CacheSlot { .. }));
    assert_eq!(cache_slots, 2 * c.cache_bytes(4, 544) / 48);
    assert_eq!(
        pl.spec(BufferId::ActSlot { slot: 0 }).map(|s| s.bytes),
        Some(c.hidden_bytes(4, 512))
    );
    assert_eq!(bytes(&pl, |id| matches!(id, BufferId::CpuAttention(_))), 0);
    assert_eq!(bytes(&pl, |id| matches!(id, BufferId::Hidden { .. })), 0);
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
    let pl = placement(&c, &p);
    let plan = pl.plan();
    // Each GPU batch of 4: 2 cache on GPU, 1 on CPU, 1 on disk; activations 2 and 2.
    assert_eq!(plan.cache_sequences, [6, 3, 3]);
    assert_eq!(plan.act_sequences, [6, 6, 0]);
    assert_eq!(plan.cache.disk, c.cache_bytes(3, 544));
    assert_eq!(plan.activations.cpu, c.hidden_bytes(6, 512));
    // Slots for the whole batch of 4 (the runtime computes the batch in one slot), double-buffered.
    let cache_slots = bytes(&pl, |id| matches!(id, BufferId::CacheSlot { .. }));
    assert_eq!(cache_slots, 2 * c.cache_bytes(4, 544) / 24);
    // Two sequences' activations are off the GPU: the activation slot holds the batch, and the GPU share lives in
    // homes, not in a residual stream per batch.
    assert_eq!(
        pl.spec(BufferId::ActSlot { slot: 0 }).map(|s| s.bytes),
        Some(c.hidden_bytes(4, 512))
    );
    assert_eq!(bytes(&pl, |id| matches!(id, BufferId::Hidden { .. })), 0);
    // CPU staging for one GPU batch's disk cache (1 sequence, one layer), double-buffered.
    assert_eq!(plan.staging.cpu, 2 * c.cache_bytes(1, 544) / 24);
}

#[test]
fn fewer_prompts_fill_smaller_batches() {
    let c = OptConfig::opt("opt-125m", 12, 12, 768, 3072);
    let p = Policy {
        gpu_batch_size: 4,
        num_gpu_batches: 2,
        percent: Percent::from_array([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]),
        ..Policy::default()
    };
    let limits = DeviceLimits::UNBOUNDED;
    let five = Placement::for_prompts(&c, &p, W, &limits, 5).unwrap();
    let sizes: Vec<usize> = five.batches.iter().map(|b| b.sequences).collect();
    assert_eq!(sizes, [4, 1]);
    // The lone sequence of the second batch is the first of its batch: its cache stays on the GPU, the batch keeps
    // its own cache buffers.
    assert!(five.batches[1].cache_resident() && !five.batches[0].cache_resident());
    assert_eq!(five.plan().cache_sequences, [3, 2, 0]);
    // Three prompts: one batch of three, the split taken over three.
    let three = Placement::for_prompts(&c, &p, W, &limits, 3).unwrap();
    assert_eq!(three.gpu_batch_size(), 3);
    assert_eq!(three.batches.len(), 1);
    let err = Placement::for_prompts(&c, &p, W, &limits, 9).unwrap_err();
    assert!(matches!(
        err,
        PlacementError::TooManyPrompts { prompts: 9, .. }
    ));
    assert!(err.to_string().contains("--num-gpu-batches"), "{err}");
}

#[test]
fn every_buffer_is_listed_once_and_fits_a_binding() {
    let c = OptConfig::opt("opt-125m", 12, 12, 768, 3072);
    let p = Policy {
        gpu_batch_size: 3,
        num_gpu_batches: 2,
        percent: Percent::from_array([30.0, 40.0, 30.0, 40.0, 30.0, 40.0]),
        compress_weight: true,
        compress_cache: true,
        attn_sparsity: 0.5,
        ..Policy::default()
    };
    // A binding of 2 MiB splits the f16 embedding (50272 x 768) of an unpacked model into chunks of whole rows...
    let limits = DeviceLimits {
        max_binding: 2 << 20,
        shader_f16: true,
    };
    let dense = Policy {
        compress_weight: false,
        compress_cache: false,
        ..p.clone()
    };
    let short = Workload {
        prompt_len: 8,
        gen_len: 4,
    };
    let pl = Placement::new(&c, &dense, short, &limits).unwrap();
    let ids: std::collections::HashSet<_> = pl.buffers().iter().map(|b| b.id).collect();
    assert_eq!(ids.len(), pl.buffers().len(), "every id once");
    let chunks = pl
        .buffers()
        .iter()
        .filter(|b| {
            matches!(
                b.id,
                BufferId::Weight {
                    tensor: TensorId::Model(ModelTensor::EmbedTokens),
                    ..
                }
            )
        })
        .count();
    let rows_per_chunk = (2 << 20) / (768 * 2);
    assert_eq!(chunks, 50272usize.div_ceil(rows_per_chunk));
    assert!(pl
        .buffers()
        .iter()
        .all(|b| b.tier != Tier::Gpu || b.bytes <= limits.max_binding));
    assert_eq!(pl.allocated().total(), bytes(&pl, |_| true));
    // ...and refuses a GPU batch whose residual stream would not fit.
    let big = Policy {
        gpu_batch_size: 64,
        num_gpu_batches: 1,
        ..Policy::default()
    };
    let err = Placement::new(&c, &big, W, &limits).unwrap_err();
    assert!(
        matches!(err, PlacementError::Binding { .. }),
        "{err}: a typed error a caller can match"
    );
    // Packed weights and cache, sparse decode: the linear kernels read packed weights without staging, and no packed
    // cache pass needs more than one dispatch, so slots 0 and 1 stay unused; slot 2 holds the sparse scores.
    let packed = Placement::new(&c, &p, W, &DeviceLimits::UNBOUNDED).unwrap();
    let scratch = packed.kernel_scratch();
    assert!(scratch[0].is_none() && scratch[1].is_none());
    // Slot 2: the sparse scores of 3 sequences x 12 heads over 544 keys.
    let scores = sparse_attention_scratch_bytes(&AttentionShape {
        batch: 3,
        s_new: 1,
        past: 543,
        capacity: 544,
        hidden: c.hidden_size,
        n_head: 12,
    });
    assert_eq!(
        scratch[2].map(|s| s.bytes),
        Some(scores.next_power_of_two())
    );
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
    let pl = placement(&c, &p);
    assert!(pl.batches.iter().all(|b| b.cpu_attention));
    // Prefill attends on the GPU: one (no overlap) K and V slot for the batch of 4.
    let cache_slots = bytes(&pl, |id| matches!(id, BufferId::CacheSlot { .. }));
    assert_eq!(cache_slots, c.cache_bytes(4, 544) / 24);
    assert!(pl.spec(BufferId::ActSlot { slot: 0 }).is_none());
    // norm, q, k, v, attention rows and the MLP's intermediate rows of 4 sequences, f16 activations.
    let scratch = bytes(&pl, |id| matches!(id, BufferId::CpuAttention(_)));
    assert_eq!(scratch, 2 * 4 * (5 * 2048 + 8192));
    // A cache only partly in CPU memory attends on the GPU: no CPU attention scratch.
    let partly = Policy {
        percent: Percent::from_array([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]),
        ..p.clone()
    };
    let pl = placement(&c, &partly);
    assert!(pl.batches.iter().all(|b| !b.cpu_attention));
    assert_eq!(bytes(&pl, |id| matches!(id, BufferId::CpuAttention(_))), 0);
}

#[test]
fn a_packed_cache_in_cpu_memory_attends_on_the_cpu_unless_sparse() {
    let c = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
    let p = Policy {
        gpu_batch_size: 4,
        num_gpu_batches: 2,
        percent: Percent::from_array([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]),
        cpu_cache_compute: true,
        compress_cache: true,
        ..Policy::default()
    };
    let pl = placement(&c, &p);
    assert!(pl.batches.iter().all(|b| b.cpu_attention));
    // The same scratch as an unpacked cache: k and v come back as activations.
    let scratch = bytes(&pl, |id| matches!(id, BufferId::CpuAttention(_)));
    assert_eq!(scratch, 2 * 4 * (5 * 2048 + 8192));
    // The CPU routine over packed rows has no top-k: sparse attention stays on the GPU.
    let sparse = Policy {
        attn_sparsity: 0.5,
        ..p.clone()
    };
    let pl = placement(&c, &sparse);
    assert!(pl.batches.iter().all(|b| !b.cpu_attention));
    assert_eq!(bytes(&pl, |id| matches!(id, BufferId::CpuAttention(_))), 0);
}

#[test]
fn compression_shrinks_weights_about_three_and_a_half_times() {
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let p = Policy {
        compress_weight: true,
        ..Policy::default()
    };
    let plan = placement(&c, &p).plan();
    let ratio = c.model_bytes() as f64 / plan.weights.gpu as f64;
    assert!((3.4..3.56).contains(&ratio), "{ratio}");
    // Exactly the packed bytes the tiers allocate (vectors as f32); the kernels read packed weights.
    assert_eq!(
        plan.weights.gpu,
        c.compressed_model_bytes(4, 64) + f32_vectors_extra(&c)
    );
}

#[test]
fn a_compressed_cache_counts_its_packed_homes_and_its_scratch() {
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let p = Policy {
        gpu_batch_size: 4,
        num_gpu_batches: 2,
        percent: Percent::from_array([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]),
        compress_cache: true,
        compress_cache_config: CompressionConfig::new(4, 32).unwrap(),
        ..Policy::default()
    };
    let pl = placement(&c, &p);
    let plan = pl.plan();
    assert_eq!(plan.cache.gpu, c.compressed_cache_bytes(4, 544, 4, 32));
    assert_eq!(plan.cache.cpu, c.compressed_cache_bytes(4, 544, 4, 32));
    let ratio = c.cache_bytes(8, 544) as f64 / plan.cache.total() as f64;
    assert!((3.0..3.6).contains(&ratio), "{ratio}");
    let (g, t, h) = (4u64, 544u64, 4096u64);
    // Keys, values and their pair-major copy as (f16) activations; the scores f32.
    let scratch = bytes(&pl, |id| matches!(id, BufferId::CacheScratch(_)));
    assert_eq!(scratch, 3 * 2 * g * t * h + 4 * g * 32 * t);
}

#[test]
fn caps_are_checked_with_tier_amount_and_flag() {
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let p = Policy {
        gpu_batch_size: 32,
        ..Policy::default()
    };
    let plan = placement(&c, &p).plan();
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
    // The last generated token is never fed back: it needs no position.
    let edge = Workload {
        prompt_len: 2000,
        gen_len: 49,
    };
    assert!(plan(&c, &Policy::default(), edge).is_ok());
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
fn linear_terms_match_the_placement_where_no_rounding_happens() {
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
        let exact = placement(&c, &p);
        let peak = exact.plan().peak();
        // The relaxation counts the whole-batch cache and activation slots even when nothing is off the GPU (the
        // runtime's step at 100% cannot be affine): exactly that much over, never under.
        let full = placement(
            &c,
            &Policy {
                percent: Percent::from_array([100.0, 0.0, 0.0, 100.0, 0.0, 100.0]),
                ..p.clone()
            },
        );
        let slots = |pl: &Placement| {
            bytes(pl, |id| {
                matches!(id, BufferId::CacheSlot { .. } | BufferId::ActSlot { .. })
            })
        };
        let gpu_over = slots(&full) - slots(&exact);
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
            ("gpu", g, peak.gpu + gpu_over),
            ("cpu", cpu, peak.cpu),
            ("disk", d, peak.disk),
        ] {
            let v = lin.eval(&f);
            assert!(
                (v - ex as f64).abs() <= 1e-9 * ex as f64 + 1.0,
                "{percent:?} {tier}: {v} vs {ex}"
            );
        }
    }
}

#[test]
fn one_midpoint_rule_places_tensors_and_one_split_places_sequences() {
    // A group of sizes 1, 1, 2 (midpoints at 12.5%, 37.5%, 75%): 30% disk, 40% CPU.
    let split = TierSplit {
        gpu: 30.0,
        cpu: 40.0,
    };
    assert_eq!(
        place_by_midpoint(&[1, 1, 2], split),
        [Tier::Disk, Tier::Cpu, Tier::Gpu]
    );
    // 8 sequences at 30 / 40: 2 GPU (2.4 rounds down), 4 CPU (5.6 rounds up to 6 in all), 2 disk.
    let tiers: Vec<Tier> = (0..8).map(|i| sequence_tier(split, 8, i)).collect();
    assert_eq!(
        tiers,
        [
            Tier::Gpu,
            Tier::Gpu,
            Tier::Cpu,
            Tier::Cpu,
            Tier::Cpu,
            Tier::Cpu,
            Tier::Disk,
            Tier::Disk
        ]
    );
}

#[test]
fn activation_dtype_follows_the_checkpoint_and_the_device() {
    let f16 = OptConfig::opt("opt-125m", 12, 12, 768, 3072);
    let default = Policy::default();
    let no_f16 = DeviceLimits {
        shader_f16: false,
        ..DeviceLimits::UNBOUNDED
    };
    let with_dtype = |dtype| Policy {
        weight_dtype: Some(dtype),
        ..Policy::default()
    };
    let compressed = Policy {
        compress_weight: true,
        compress_cache: true,
        ..Policy::default()
    };
    let unbounded = &DeviceLimits::UNBOUNDED;
    // An f16 checkpoint (packed or not) on a device with shader-f16: halves.
    assert_eq!(act_dtype(&f16, &default, unbounded), ActDtype::F16);
    assert_eq!(
        act_dtype(&f16, &with_dtype(DType::F16), unbounded),
        ActDtype::F16
    );
    assert_eq!(act_dtype(&f16, &compressed, unbounded), ActDtype::F16);
    // Everything else: f32.
    assert_eq!(act_dtype(&f16, &default, &no_f16), ActDtype::F32);
    assert_eq!(
        act_dtype(&f16, &with_dtype(DType::F32), unbounded),
        ActDtype::F32
    );
    for dtype in [DType::F32, DType::BF16] {
        let c = f16.with_dtype(dtype);
        assert_eq!(act_dtype(&c, &default, unbounded), ActDtype::F32);
        assert_eq!(
            act_dtype(&c, &with_dtype(DType::F16), unbounded),
            ActDtype::F32
        );
    }
    // An odd head_dim (rows of heads not in whole words) keeps f32.
    let odd = OptConfig {
        hidden_size: 36,
        n_head: 12,
        ..f16
    };
    assert_eq!(act_dtype(&odd, &default, unbounded), ActDtype::F32);

    // The placement counts what the rule says: the same run without shader-f16 holds twice the activation bytes.
    let p = Policy {
        gpu_batch_size: 8,
        percent: Percent::from_array([100.0, 0.0, 100.0, 0.0, 50.0, 50.0]),
        ..Policy::default()
    };
    let halves = Placement::new(&f16, &p, W, unbounded).unwrap();
    let singles = Placement::new(&f16, &p, W, &no_f16).unwrap();
    assert_eq!(
        (halves.act_dtype, singles.act_dtype),
        (ActDtype::F16, ActDtype::F32)
    );
    let (a, b) = (halves.plan(), singles.plan());
    assert_eq!(a.activations.total(), f16.hidden_bytes(8, 512));
    assert_eq!(b.activations.total(), 2 * a.activations.total());
    for id in [BufferId::ActSlot { slot: 0 }, BufferId::Work(WorkPart::Mid)] {
        let size = |pl: &Placement| pl.spec(id).map(|s| s.bytes);
        assert_eq!(size(&singles), size(&halves).map(|b| 2 * b), "{id}");
    }
    // The logits stay f32 whatever the activations.
    assert_eq!(
        halves.spec(BufferId::Logits),
        singles.spec(BufferId::Logits)
    );
}

/// Issue 10's workload: opt-6.7b all on an H200-like GPU (a binding of 2,147,483,644 bytes), one GPU batch of 64
/// sequences of 512 prompt tokens. fc1's output is 64 x 512 x 16384 values: 2^30 bytes as halves, one binding; as
/// f32 it is 2^31 bytes, 4 over the binding limit, so f32 activations are refused (or, choosing batches to fit,
/// split in two).
#[test]
fn opt_6_7b_at_batch_64_by_prompt_512_fits_an_h200_with_f16_activations() {
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let h200 = DeviceLimits {
        max_binding: 2_147_483_644,
        shader_f16: true,
    };
    let p = Policy {
        gpu_batch_size: 64,
        ..Policy::default()
    };
    let pl = Placement::new(&c, &p, W, &h200).unwrap();
    assert_eq!(pl.act_dtype, ActDtype::F16);
    assert_eq!(pl.batches.len(), 1);
    let mid = pl.spec(BufferId::Work(WorkPart::Mid)).unwrap();
    assert_eq!(mid.bytes, 1 << 30);
    // Every byte of the run fits the H200's 139 GiB with room to spare.
    let peak = pl.plan().peak().gpu;
    assert!(peak < 60 << 30, "{peak}");
    // Batches sized to fit one binding: all 64 in one.
    assert!(largest_gpu_batch(&c, &p, &h200, W) >= 64);

    // The same device without shader-f16 (f32 activations): fc1's output is 2^31 bytes, over the binding.
    let f32_device = DeviceLimits {
        shader_f16: false,
        ..h200
    };
    match Placement::new(&c, &p, W, &f32_device) {
        Err(PlacementError::Binding {
            what, bytes, limit, ..
        }) => {
            assert_eq!(what, "the feed-forward activations");
            assert_eq!((bytes, limit), (1 << 31, 2_147_483_644));
        }
        other => panic!("f32 activations must not fit: {other:?}"),
    }
    assert_eq!(largest_gpu_batch(&c, &p, &f32_device, W), 63);
}

#[test]
fn cpu_attention_batches_with_offloaded_activations_pipeline_through_two_activation_slots() {
    // FlexLLMGen's opt-30b policy: cache and activations in CPU memory, attention there, 2 GPU batches.
    let c = OptConfig::opt("opt-30b", 48, 56, 7168, 28672);
    let policy = |overlap: bool, ngb: usize| Policy {
        gpu_batch_size: 24,
        num_gpu_batches: ngb,
        percent: Percent::from_array([20.0, 80.0, 0.0, 100.0, 0.0, 100.0]),
        cpu_cache_compute: true,
        overlap,
        ..Policy::default()
    };
    let slot_bytes = Some(c.hidden_bytes(24, 512));
    for (overlap, ngb, slots) in [(true, 2, 2), (false, 2, 1), (true, 1, 1)] {
        let pl = placement(&c, &policy(overlap, ngb));
        assert!(pl.batches.iter().all(|b| b.cpu_attention));
        assert_eq!(act_slots(&pl.policy, &pl.batches), slots);
        for slot in 0..2 {
            let want = if slot < slots { slot_bytes } else { None };
            assert_eq!(
                pl.spec(BufferId::ActSlot { slot }).map(|s| s.bytes),
                want,
                "overlap {overlap}, {ngb} GPU batches: slot {slot}"
            );
        }
    }
}
