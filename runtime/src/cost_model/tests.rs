use super::*;

const GIB: u64 = 1 << 30;

fn flexllmgen_caps() -> Caps {
    Caps {
        gpu: Some(15 * GIB),
        cpu: Some(200 * GIB),
        disk: Some(1500 * GIB),
    }
}

const W: Workload = Workload {
    prompt_len: 512,
    gen_len: 32,
};

/// Compute-bound time per token when everything is on the GPU: prefill GEMMs + attention, decode GEMVs + attention
/// (the formulas of COST-MODEL.md with no transfer terms), worked out here independently of the LP.
fn all_gpu_objective(
    c: &OptConfig,
    hw: &HardwareProfile,
    gbs: usize,
    ngb: usize,
    logits: bool,
) -> f64 {
    let (s, n) = (W.prompt_len as f64, W.gen_len as f64);
    let (h, f, l) = (
        c.hidden_size as f64,
        c.ffn_embed_dim as f64,
        c.num_hidden_layers as f64,
    );
    let b = (gbs * ngb) as f64;
    let tpre = b * (8.0 * s * h * h + 4.0 * s * h * f) / (hw.mm_flops_p * 1e12)
        + 4.0 * b * s * s * h / (hw.bmm_flops_p * 1e12);
    let gemm = b * (8.0 * h * h + 4.0 * h * f) / (hw.mm_flops_g * 1e12);
    let attn = 4.0 * b * (s + n / 2.0) * h / (hw.bmm_flops_g * 1e12);
    // Both formulations charge GEMMs and attention to the same GPU, one after the other.
    let mut tgen = gemm + attn;
    let mut tpre = tpre;
    if logits {
        // strata's also counts the logits (2 * h * V per sequence and step), spread over the layers.
        let head = 2.0 * b * h * c.vocab_size as f64 / l;
        tpre += head / (hw.mm_flops_p * 1e12);
        tgen += head / (hw.mm_flops_g * 1e12);
    }
    (tpre * l + tgen * (n - 1.0) * l) / b
}

#[test]
fn with_room_to_spare_everything_stays_on_the_gpu_at_compute_speed() {
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
    let caps = Caps {
        gpu: Some(80 * GIB),
        cpu: Some(200 * GIB),
        disk: None,
    };
    for kind in [CostModelKind::FlexLlmGen, CostModelKind::Strata] {
        let mut p = Problem::new(&c, W, &hw, caps);
        p.kind = kind;
        let mut ev = Evaluator::new(p);
        let cand = ev.eval(4, 2).unwrap();
        assert!(cand.fractions[WG] > 1.0 - 1e-6, "{kind}: {cand:?}");
        assert!(cand.fractions[CG] > 1.0 - 1e-6, "{kind}: {cand:?}");
        assert!(cand.fractions[HG] > 1.0 - 1e-6, "{kind}: {cand:?}");
        let expected = all_gpu_objective(&c, &hw, 4, 2, kind == CostModelKind::Strata);
        assert!(
            (cand.objective - expected).abs() < 1e-6 * expected,
            "{kind}: {} vs {expected}",
            cand.objective
        );
    }
}

#[test]
fn strata_serialises_copies_with_compute_where_flexllmgen_overlaps_them() {
    // Weights on the CPU: FlexLLMGen's decode takes max-ish(ctog + comp) too, but its prefill overlaps the copy
    // with compute while strata's one queue adds them. Compare prefill per layer at a fixed placement.
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    // 3 GiB: the resident embeddings (about 0.4 GiB), working buffers and whole-batch slots, then a few layers.
    let caps = Caps {
        gpu: Some(3 * GIB),
        cpu: Some(200 * GIB),
        disk: None,
    };
    let mut flex = Problem::new(&c, W, &hw, caps);
    flex.kind = CostModelKind::FlexLlmGen;
    let strata = Problem::new(&c, W, &hw, caps);
    let f = Evaluator::new(flex).eval(8, 1).unwrap();
    let s = Evaluator::new(strata).eval(8, 1).unwrap();
    // With 3 GiB of GPU almost every weight streams; strata's prefill is slower by about the copy time.
    let copy =
        0.9 * (8.0 * 4096f64.powi(2) + 4.0 * 4096.0 * 16384.0) / (hw.ctog * (1u64 << 30) as f64);
    assert!(
        s.prefill_layer_s > f.prefill_layer_s + 0.5 * copy,
        "{s:?} vs {f:?}"
    );
}

#[test]
fn a_model_that_fits_nowhere_says_what_capacity_would_do() {
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-175b", 96, 96, 12288, 49152);
    for kind in [CostModelKind::FlexLlmGen, CostModelKind::Strata] {
        let caps = Caps {
            gpu: Some(15 * GIB),
            cpu: Some(10 * GIB),
            disk: Some(100 * GIB),
        };
        let mut p = Problem::new(&c, W, &hw, caps);
        p.kind = kind;
        let err = search(p, SearchKind::Improved).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("opt-175b does not fit --gpu-mem 15.00 GiB"),
            "{msg}"
        );
        let CostModelError::Infeasible { needed, .. } = err else {
            panic!("{msg}")
        };
        let disk = needed
            .iter()
            .find(|(t, _)| *t == Tier::Disk)
            .expect("more disk helps")
            .1;
        assert!(
            msg.contains(&format!("--disk-mem {}GiB", disk >> 30)),
            "{msg}"
        );
        // The weights alone are 325 GiB; at 80% headroom the disk must hold what the CPU cannot.
        assert!(disk > 300 * GIB, "{disk}");
        // The advice is right: with that much disk the model fits, with 2 GiB less it does not.
        p.caps.disk = Some(disk);
        assert!(search(p, SearchKind::FlexLlmGen).is_ok(), "{kind}: {disk}");
        p.caps.disk = Some(disk - 2 * GIB);
        assert!(search(p, SearchKind::FlexLlmGen).is_err(), "{kind}: {disk}");
    }
}

#[test]
fn a_gpu_too_small_for_working_buffers_is_named() {
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-175b", 96, 96, 12288, 49152);
    let mut caps = Caps {
        gpu: Some(GIB),
        cpu: Some(200 * GIB),
        disk: Some(1500 * GIB),
    };
    let p = Problem::new(&c, W, &hw, caps);
    let err = search(p, SearchKind::Improved).unwrap_err();
    let CostModelError::Infeasible { needed, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(needed.len(), 1, "{err}");
    assert_eq!(needed[0].0, Tier::Gpu);
    assert!(
        err.to_string().contains("it would fit with --gpu-mem"),
        "{err}"
    );
    caps.gpu = Some(needed[0].1);
    assert!(search(Problem::new(&c, W, &hw, caps), SearchKind::FlexLlmGen).is_ok());

    // GPU, CPU and disk all small: only a GPU that holds nearly the whole model (325 GiB of fp16 weights, less
    // the 8.8 GiB CPU and disk may hold, at 80%) does.
    let caps = Caps {
        gpu: Some(GIB),
        cpu: Some(GIB),
        disk: Some(10 * GIB),
    };
    let err = search(Problem::new(&c, W, &hw, caps), SearchKind::Improved).unwrap_err();
    let CostModelError::Infeasible { needed, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(needed.len(), 1, "{err}");
    let floor = (c.model_bytes() as f64 - 0.8 * 11.0 * GIB as f64) / 0.8;
    assert!(
        needed[0].0 == Tier::Gpu && needed[0].1 as f64 > floor,
        "{err}"
    );
}

#[test]
fn bad_headroom_and_workload_are_refused() {
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
    let mut p = Problem::new(&c, W, &hw, flexllmgen_caps());
    p.headroom = 1.5;
    assert!(search(p, SearchKind::Improved)
        .unwrap_err()
        .to_string()
        .contains("--headroom"));
    p.headroom = 0.8;
    p.workload.prompt_len = 4000;
    assert!(search(p, SearchKind::Improved)
        .unwrap_err()
        .to_string()
        .contains("context"));
}

#[test]
fn weight_compression_helps_an_offloaded_model() {
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-30b", 48, 56, 7168, 28672);
    for kind in [CostModelKind::FlexLlmGen, CostModelKind::Strata] {
        let mut p = Problem::new(&c, W, &hw, flexllmgen_caps());
        p.kind = kind;
        let plain = search(p, SearchKind::Improved).unwrap();
        p.compress_weight = true;
        let packed = search(p, SearchKind::Improved).unwrap();
        assert!(packed.policy.compress_weight);
        assert!(packed.total_throughput > plain.total_throughput, "{kind}");
    }
}

#[test]
fn strata_choices_fit_the_planner() {
    let hw = HardwareProfile::t4();
    for c in [
        OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384),
        OptConfig::opt("opt-30b", 48, 56, 7168, 28672),
    ] {
        let choice = search(
            Problem::new(&c, W, &hw, flexllmgen_caps()),
            SearchKind::Improved,
        )
        .unwrap();
        assert!(
            choice.plan_check.is_ok(),
            "{}: {:?}",
            c.name,
            choice.plan_check
        );
        choice.policy.validate_placement().unwrap();
    }
}

#[test]
fn evaluating_the_chosen_policy_predicts_what_the_search_did() {
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-30b", 48, 56, 7168, 28672);
    for kind in [CostModelKind::FlexLlmGen, CostModelKind::Strata] {
        let mut p = Problem::new(&c, W, &hw, flexllmgen_caps());
        p.kind = kind;
        let chosen = search(p, SearchKind::Improved).unwrap();
        let again = evaluate(p, &chosen.policy).unwrap();
        // Percents are rounded to 0.01, so the prediction moves by a hair at most.
        let rel =
            (again.total_throughput - chosen.total_throughput).abs() / chosen.total_throughput;
        assert!(
            rel < 1e-3,
            "{kind}: {} vs {}",
            again.total_throughput,
            chosen.total_throughput
        );
        assert_eq!(again.policy, chosen.policy);
    }
    // FlexLLMGen's formulation has no activations on disk.
    let mut p = Problem::new(&c, W, &hw, flexllmgen_caps());
    p.kind = CostModelKind::FlexLlmGen;
    let on_disk = Policy {
        percent: Percent::from_array([0.0, 100.0, 0.0, 100.0, 0.0, 50.0]),
        ..Policy::default()
    };
    assert!(evaluate(p, &on_disk)
        .unwrap_err()
        .to_string()
        .contains("activations off disk"));
    p.kind = CostModelKind::Strata;
    let e = evaluate(p, &on_disk).unwrap();
    assert!(e.plan.activations.disk > 0 && e.total_throughput > 0.0);
}

#[test]
fn strata_streams_layers_but_keeps_the_lm_head_resident() {
    // Weights on the CPU, cache and activations on the GPU, no caps: one layer's time is its weights' transfer and
    // its compute. The LM head (opt-6.7b's tied embedding, 0.4 GiB) costs FLOPs but never streams: it is resident.
    let hw = HardwareProfile::t4();
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let policy = Policy {
        gpu_batch_size: 4,
        num_gpu_batches: 1,
        percent: crate::offload::policy::Percent::from_array([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]),
        ..Policy::default()
    };
    let (s, n) = (W.prompt_len as f64, W.gen_len as f64);
    let (h, f, l) = (4096.0, 16384.0, 32.0);
    // A layer copies its buffers as the placement sizes them (biases and norms as f32).
    let layer = crate::offload::placement::WeightSummary::new(&c, &policy).layer as f64;
    let copy = layer / (hw.ctog * GIB as f64);
    let close = |a: f64, e: f64| (a - e).abs() <= 1e-9 * e;
    for ngb in [1, 2] {
        let policy = Policy {
            num_gpu_batches: ngb,
            ..policy.clone()
        };
        let choice = evaluate(Problem::new(&c, W, &hw, Caps::default()), &policy).unwrap();
        let b = 4.0 * ngb as f64;
        let head = 2.0 * b * h * c.vocab_size as f64 / l;
        let prefill = b * (8.0 * s * h * h + 4.0 * s * h * f) / (hw.mm_flops_p * 1e12)
            + 4.0 * b * s * s * h / (hw.bmm_flops_p * 1e12)
            + head / (hw.mm_flops_p * 1e12);
        let linears = b * (8.0 * h * h + 4.0 * h * f) / (hw.mm_flops_g * 1e12);
        let decode = linears
            + 4.0 * b * (s + n / 2.0) * h / (hw.bmm_flops_g * 1e12)
            + head / (hw.mm_flops_g * 1e12);
        let cand = choice.candidate;
        assert!(close(cand.prefill_layer_s, copy + prefill), "{cand:?}");
        // One GPU batch reads the weights in place while the linears compute (--transfer auto): the slower of the
        // two; several GPU batches copy them first, once per block.
        let want = match ngb {
            1 => copy.max(linears) + decode - linears,
            _ => copy + decode,
        };
        assert!(
            close(cand.decode_layer_s, want),
            "{ngb} GPU batches: {cand:?}"
        );
    }
    // In memory the head and embeddings are a GPU constant, whatever the weight fractions.
    let [gpu, ..] = crate::offload::placement::linear_terms(&c, &policy, W);
    let mut none_on_gpu = [0.0; 9];
    none_on_gpu[WC] = 1.0;
    none_on_gpu[CG] = 1.0;
    none_on_gpu[HG] = 1.0;
    let outside = crate::offload::placement::outside_layer_bytes(&c, None) as f64;
    assert!(gpu.eval(&none_on_gpu) > outside);
    assert_eq!(
        gpu.coef[WG],
        32.0 * layer - 2.0 * layer,
        "the fraction on the GPU places the layers (minus the two weight slots it saves)"
    );
}

/// The T4 profile with an affine fit of the GEMV kernel: weights at 2 GiB/s, each row's FLOPs at 0.5 TFLOP/s.
fn t4_with_gemv_fit() -> HardwareProfile {
    HardwareProfile {
        gemv_weight_gib_s: Some(2.0),
        mm_flops_g_row: Some(0.5),
        ..HardwareProfile::t4()
    }
}

/// Seconds of one decode dispatch under [`t4_with_gemv_fit`]: `rows` rows over `bytes` of weights.
fn gemv_fit_dispatch_s(rows: f64, bytes: f64, flops_per_row: f64) -> f64 {
    bytes / (2.0 * GIB as f64) + rows * flops_per_row / 0.5e12
}

/// opt-1.3b, with its `(hidden, ffn, layers, vocab)` as f64 for the formulas.
fn opt_1_3b() -> (OptConfig, [f64; 4]) {
    let c = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
    (c, [2048.0, 8192.0, 24.0, c.vocab_size as f64])
}

#[test]
fn decode_linears_follow_the_profiles_affine_gemv_fit_per_gpu_batch() {
    // A profile with the fit: each GPU batch's linears cost their weight bytes at gemv_weight plus each row's FLOPs
    // at mm_flops_g_row, so two batches of two rows cost more than one batch of four (the weights are read twice).
    let hw = t4_with_gemv_fit();
    let (c, [h, f, l, v]) = opt_1_3b();
    let (s, n) = (W.prompt_len as f64, W.gen_len as f64);
    for (gbs, ngb) in [(4, 1), (2, 2), (1, 4)] {
        let policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            ..Policy::default()
        };
        let weights = crate::offload::placement::WeightSummary::new(&c, &policy);
        let choice = evaluate(Problem::new(&c, W, &hw, Caps::default()), &policy).unwrap();
        let per_batch =
            |bytes: f64, flops_per_row: f64| gemv_fit_dispatch_s(gbs as f64, bytes, flops_per_row);
        let b = (gbs * ngb) as f64;
        let want = ngb as f64
            * (per_batch(weights.layer as f64, 8.0 * h * h + 4.0 * h * f)
                + per_batch(weights.head as f64, 2.0 * h * v) / l)
            + 4.0 * b * (s + n / 2.0) * h / (hw.bmm_flops_g * 1e12);
        let got = choice.candidate.decode_layer_s;
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "{gbs} x {ngb}: {got} vs {want}"
        );
    }
    // Beyond the GEMV kernel's rows the GEMM kernel runs: FLOPs at mm_flops_g, as without the fit.
    let big = Policy {
        gpu_batch_size: 16,
        ..Policy::default()
    };
    let with = evaluate(Problem::new(&c, W, &hw, Caps::default()), &big).unwrap();
    let t4 = HardwareProfile::t4();
    let without = evaluate(Problem::new(&c, W, &t4, Caps::default()), &big).unwrap();
    assert_eq!(
        with.candidate.decode_layer_s,
        without.candidate.decode_layer_s
    );
}

#[test]
fn block_decode_reads_cpu_weights_once_per_step() {
    // Weights in CPU memory read in place (zero-copy) by 2 x 2 sequences: with caches and activations on the GPU
    // each decode layer runs once over the block, so its weights cross once, beside one 4-row dispatch per linear.
    let hw = HardwareProfile {
        ctog_zero_copy: Some(10.0),
        ..t4_with_gemv_fit()
    };
    let (c, [h, f, l, v]) = opt_1_3b();
    let (s, n) = (W.prompt_len as f64, W.gen_len as f64);
    let policy = |act: [f64; 2]| Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        percent: Percent::from_array([0.0, 100.0, 100.0, 0.0, act[0], act[1]]),
        transfer: Transfer::ZeroCopy,
        ..Policy::default()
    };
    let block = policy([100.0, 0.0]);
    let weights = crate::offload::placement::WeightSummary::new(&c, &block);
    let wl = weights.layer as f64;
    let choice = evaluate(Problem::new(&c, W, &hw, Caps::default()), &block).unwrap();
    assert!(choice.candidate.block_decode);
    let dispatch = gemv_fit_dispatch_s;
    let in_place = wl / (10.0 * GIB as f64);
    let want = in_place.max(dispatch(4.0, wl, 8.0 * h * h + 4.0 * h * f))
        + 2.0 * dispatch(2.0, weights.head as f64, 2.0 * h * v) / l
        + 4.0 * 4.0 * (s + n / 2.0) * h / (hw.bmm_flops_g * 1e12);
    let got = choice.candidate.decode_layer_s;
    assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
    // Activations in CPU memory: no block steps, and each GPU batch's dispatches read the weights again.
    let per_batch = evaluate(
        Problem::new(&c, W, &hw, Caps::default()),
        &policy([0.0, 100.0]),
    )
    .unwrap();
    assert!(!per_batch.candidate.block_decode);
    assert!(per_batch.candidate.decode_layer_s >= 2.0 * in_place);
}

#[test]
fn an_automatic_policy_takes_the_decode_path_its_profile_prices_fastest() {
    // opt-6.7b's weights do not fit a 15 GiB GPU beside a block of 64 x 512: some go to CPU memory. The profile's
    // in-place (zero-copy) rate decides how they reach the decode kernels.
    let c = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);
    let caps = Caps {
        gpu: Some(15 * GIB),
        cpu: Some(200 * GIB),
        disk: None,
    };
    for (zero_copy_gib_s, want) in [(0.5, Transfer::Copy), (1e3, Transfer::ZeroCopy)] {
        let hw = HardwareProfile {
            ctog_zero_copy: Some(zero_copy_gib_s),
            ..HardwareProfile::t4()
        };
        let mut p = Problem::new(&c, W, &hw, caps);
        p.max_block = 64;
        let chosen = search(p, SearchKind::Improved).unwrap();
        let what = format!(
            "in place at {zero_copy_gib_s} GiB/s: {}",
            chosen.policy.to_flags()
        );
        assert!(chosen.candidate.fractions[WC] > 0.0, "{what}");
        assert_eq!(chosen.policy.transfer, want, "{what}");
        assert_eq!(chosen.candidate.transfer, want, "{what}");
        // Predicting the chosen policy gives what the search priced (its path and, if chosen, block decode).
        let again = evaluate(p, &chosen.policy).unwrap();
        assert_eq!(
            again.candidate.block_decode, chosen.candidate.block_decode,
            "{what}"
        );
        let rel =
            (again.total_throughput - chosen.total_throughput).abs() / chosen.total_throughput;
        assert!(rel < 1e-3, "{what}: {rel}");
    }
    // Two GPU batches of 8 with some weights in CPU memory: a fast in-place rate takes block decode steps (caches and
    // hidden rows on the GPU, the weights read once per step), a slow one copies.
    let two_batches = |zero_copy_gib_s: f64| {
        let hw = HardwareProfile {
            ctog_zero_copy: Some(zero_copy_gib_s),
            ..HardwareProfile::t4()
        };
        let caps = Caps {
            gpu: Some(20 * GIB),
            ..caps
        };
        let mut ev = Evaluator::new(Problem::new(&c, W, &hw, caps));
        let auto = ev.eval(8, 2).unwrap();
        assert!(auto.fractions[WC] > 0.0, "{auto:?}");
        choose_transfer(&mut ev, auto)
    };
    let fast = two_batches(1e3);
    assert_eq!(
        (fast.transfer, fast.block_decode),
        (Transfer::ZeroCopy, true)
    );
    assert_eq!((fast.fractions[CG], fast.fractions[HG]), (1.0, 1.0));
    let slow = two_batches(0.5);
    assert_eq!((slow.transfer, slow.block_decode), (Transfer::Copy, false));
    assert!(fast.objective < slow.objective);

    // An explicit setting is kept.
    let hw = HardwareProfile {
        ctog_zero_copy: Some(1e3),
        ..HardwareProfile::t4()
    };
    let mut p = Problem::new(&c, W, &hw, caps);
    p.max_block = 64;
    p.transfer = Transfer::Copy;
    assert_eq!(
        search(p, SearchKind::Improved).unwrap().policy.transfer,
        Transfer::Copy
    );
}
