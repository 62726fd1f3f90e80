//! Issue 5's validation: the cost model's predicted throughput, from a profile measured in this same run with the
//! runtime's own probe, against the measured throughput of real generation through the offloading schedule (the
//! engine `strata bench` drives), for a few policies of a small OPT model: all on GPU at three batchings, weights
//! streamed from the CPU tier, and a mixed placement. The printed ratios are the information; the assertion is a
//! sanity bound, not the accuracy claim.
//!
//! Bound: measured / predicted within [0.2, 5]. On a quiet machine strata's formulation predicts a dummy opt-125m on
//! lavapipe within 25% (BENCHMARKS.md, with the commands); this test runs a smaller model, where the fixed costs the
//! model leaves out (layer norms, embedding, sampling, per-dispatch and per-submit costs) weigh more, on shared CI
//! machines whose other jobs slowed runs 3-4x against a profile measured moments before (2026-12-05, 2 cores:
//! ratios 0.5-0.7 with the earlier model at load 8-10, 0.7-1.1 with the GEMV fit at load 4). A ratio outside the
//! bound means a unit or formula error (per-layer vs per-model, rows vs sequences, FLOPs counted twice), not noise.

use std::time::Instant;

use strata_runtime::config::{DType, OptConfig};
use strata_runtime::cost_model::{evaluate, Problem};
use strata_runtime::dummy::DummyWeights;
use strata_runtime::generate::{GenerateOptions, Generator, Sampling};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::hardware::gpu_probe::RuntimeProbe;
use strata_runtime::hardware::measure::{profile_machine, MeasureOptions};
use strata_runtime::hardware::HardwareProfile;
use strata_runtime::offload::placement::{Caps, Workload};
use strata_runtime::offload::policy::{Percent, Policy};

/// opt-125m's layer structure at a third of its width, 2 layers and a small vocabulary, so a run takes seconds on
/// lavapipe.
fn small_opt() -> OptConfig {
    OptConfig {
        vocab_size: 2048,
        max_seq_len: 128,
        ..OptConfig::opt("small-opt", 2, 4, 256, 1024)
    }
}

#[test]
fn measured_throughput_is_within_a_stated_factor_of_the_prediction() {
    let gpu = Gpu::new(&GpuOptions::default()).expect("tests need a GPU adapter (lavapipe works)");
    let start = Instant::now();
    let mut probe = RuntimeProbe::new(&gpu).unwrap();
    let mut options = MeasureOptions::new(std::env::temp_dir());
    // No policy below moves anything to disk: its speed does not enter the prediction.
    options.skip_disk = true;
    let (profile, _) = profile_machine(
        &HardwareProfile::t4(),
        &options,
        Some(&mut probe),
        &mut |_| {},
    )
    .unwrap();
    for field in [
        "ctog",
        "mm_flops_p",
        "mm_flops_g",
        "bmm_flops_p",
        "bmm_flops_g",
        "gemv_weight_gib_s",
        "mm_flops_g_row",
    ] {
        assert!(
            profile.measured.iter().any(|m| m == field),
            "{field}: {profile:?}"
        );
    }
    eprintln!(
        "profile of {} in {:.1} s: mm_p {:.3e} mm_g {:.3e} bmm_p {:.3e} bmm_g {:.3e} TFLOP/s",
        profile.name,
        start.elapsed().as_secs_f64(),
        profile.mm_flops_p,
        profile.mm_flops_g,
        profile.bmm_flops_p,
        profile.bmm_flops_g
    );

    let config = small_opt();
    let workload = Workload {
        prompt_len: 32,
        gen_len: 8,
    };
    let source = DummyWeights::new(config);
    let mut ratios = Vec::new();
    let policies = [
        (1, 1, Percent::ALL_GPU, "all on GPU"),
        (4, 1, Percent::ALL_GPU, "all on GPU"),
        (2, 2, Percent::ALL_GPU, "all on GPU"),
        (
            2,
            2,
            Percent::from_array([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]),
            "weights on CPU",
        ),
        (
            2,
            2,
            Percent::from_array([50.0, 50.0, 50.0, 50.0, 100.0, 0.0]),
            "weights and cache half on CPU",
        ),
    ];
    for (gbs, ngb, percent, what) in policies {
        let policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            percent,
            ..Policy::default()
        };
        let problem = Problem::new(&config, workload, &profile, Caps::default());
        let predicted = evaluate(problem, &policy).unwrap().total_throughput;
        assert!(predicted.is_finite() && predicted > 0.0, "{predicted}");

        let stored_f16 = Policy {
            weight_dtype: Some(DType::F16),
            ..policy.clone()
        };
        let gen = Generator::with_policy(&gpu, &source, &stored_f16, &|_| {}).unwrap();
        let prompts: Vec<Vec<u32>> = (0..gbs * ngb)
            .map(|b| {
                (0..workload.prompt_len)
                    .map(|t| {
                        if t == 0 {
                            2
                        } else {
                            (3 + 7 * t + b) as u32 % 2000
                        }
                    })
                    .collect()
            })
            .collect();
        let run = GenerateOptions {
            max_new_tokens: workload.gen_len,
            sampling: Sampling::Greedy,
            ignore_eos: true,
            record_logits: false,
        };
        // Warm-up: pipelines, bind groups and allocations of the first run are not what the model predicts.
        gen.generate(&prompts, &run).unwrap();
        let t = Instant::now();
        let out = gen.generate(&prompts, &run).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(out.steps, workload.gen_len);
        let measured = (prompts.len() * workload.gen_len) as f64 / secs;
        let ratio = measured / predicted;
        eprintln!(
            "policy gbs {gbs} x {ngb} ({what}): measured {measured:.2} token/s, predicted {predicted:.2} \
             token/s, measured/predicted = {ratio:.3}"
        );
        ratios.push(((gbs, ngb, what), ratio));
    }
    eprintln!("total {:.1} s", start.elapsed().as_secs_f64());
    for ((gbs, ngb, what), ratio) in ratios {
        assert!(
            (0.2..=5.0).contains(&ratio),
            "gbs {gbs} x {ngb} ({what}): measured/predicted = {ratio:.3}, outside the sanity bound [0.2, 5]"
        );
    }
}
