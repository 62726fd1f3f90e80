//! An f16 checkpoint keeps its KV cache in f16: half the bytes of an f32 cache in every tier, and every offloading
//! policy (the cache on the CPU or disk, attention on the GPU or, with `cpu_cache_compute`, on the CPU) still
//! reproduces the all-GPU run in the same GPU batches: identical greedy ids and logits within 1e-4 of it.
//!
//! The same GPU batches, because an f16 checkpoint computes with f16 activations: a batch of other rows runs other
//! kernels (GEMV below 9 rows, tiled above), whose f32 sums differ in the last bits, and a half rounded the other way
//! is 2^-11 of a value, which this fixture's nearly hard attention carries to the logits (~1e-2 here). Offloading
//! itself moves bytes, never values.

mod common;

use common::{fixture, gpu, max_abs_diff, options};
use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::config::DType;
use strata_runtime::generate::{GenerateOutput, Generator};
use strata_runtime::gpu::kernels::{ActDtype, CacheDtype};
use strata_runtime::offload::policy::{Percent, Policy, Transfer};

#[test]
fn f16_cache_offloads_at_half_the_bytes_and_keeps_the_all_gpu_result() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("f16");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let all_gpu = Generator::new(&gpu, &checkpoint).unwrap();
    assert_eq!(all_gpu.model().cache_dtype(), CacheDtype::F16);
    assert_eq!(all_gpu.act_dtype(), ActDtype::F16);
    let baseline = all_gpu.generate(&prompts, &options(new)).unwrap();
    let c = *all_gpu.config();
    let n = prompts.len();
    // The all-GPU run in `batches` GPU batches.
    let all_gpu_in = |batches: usize| {
        let policy = Policy {
            gpu_batch_size: n.div_ceil(batches),
            num_gpu_batches: batches,
            ..Policy::default()
        };
        Generator::with_policy(&gpu, &checkpoint, &policy, &|_| {})
            .unwrap()
            .generate(&prompts, &options(new))
            .unwrap()
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let offload = tempfile::tempdir().unwrap();

    for (what, percent, cpu_cache_compute, batches) in [
        (
            "cache on CPU",
            [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
            false,
            1,
        ),
        (
            "cache on CPU, attention on the CPU",
            [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
            true,
            1,
        ),
        (
            "weights and cache on disk, 2 GPU batches",
            [0.0, 0.0, 0.0, 0.0, 100.0, 0.0],
            false,
            2,
        ),
    ] {
        let policy = Policy {
            gpu_batch_size: n.div_ceil(batches),
            num_gpu_batches: batches,
            percent: Percent::from_array(percent),
            cpu_cache_compute,
            offload_dir: Some(offload.path().to_path_buf()),
            ..Policy::default()
        };
        let gen = Generator::with_policy(&gpu, &checkpoint, &policy, &|_| {}).unwrap();
        let out: GenerateOutput = gen.generate(&prompts, &options(new)).unwrap();
        let same_batches = all_gpu_in(batches);
        assert_eq!(out.generated_ids, same_batches.generated_ids, "{what}");
        assert_eq!(out.generated_ids, baseline.generated_ids, "{what}");
        let diff = max_abs_diff(
            out.logits.as_ref().unwrap(),
            same_batches.logits.as_ref().unwrap(),
        );
        assert!(diff < 1e-4, "{what}: logits differ by {diff}");
        if percent[3] == 100.0 {
            // Every sequence's K and V of every layer on the CPU, as halves: capacity tokens x hidden x 2 bytes.
            let report = gen.tiers().report();
            let capacity = longest + new - 1;
            let f16_cache = (2 * c.num_hidden_layers * n * capacity * c.hidden_size * 2) as u64;
            assert!(
                report.cpu.peak_bytes >= f16_cache && report.cpu.peak_bytes < 2 * f16_cache,
                "{what}: CPU tier peak {} B for an f16 cache of {f16_cache} B",
                report.cpu.peak_bytes
            );
        }
    }

    // Sparse decode attention over the f16 cache: the GPU kernel (all on the GPU) and the CPU path (cache on the
    // CPU, cpu_cache_compute) read the same halves and keep the same positions.
    let sparse = Policy {
        gpu_batch_size: n,
        attn_sparsity: 0.5,
        ..Policy::default()
    };
    let gpu_sparse = Generator::with_policy(&gpu, &checkpoint, &sparse, &|_| {})
        .unwrap()
        .generate(&prompts, &options(new))
        .unwrap();
    let policy = Policy {
        gpu_batch_size: n,
        num_gpu_batches: 1,
        percent: Percent::from_array([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]),
        cpu_cache_compute: true,
        attn_sparsity: 0.5,
        ..Policy::default()
    };
    let cpu_sparse = Generator::with_policy(&gpu, &checkpoint, &policy, &|_| {})
        .unwrap()
        .generate(&prompts, &options(new))
        .unwrap();
    assert_eq!(cpu_sparse.generated_ids, gpu_sparse.generated_ids);
    let diff = max_abs_diff(
        cpu_sparse.logits.as_ref().unwrap(),
        gpu_sparse.logits.as_ref().unwrap(),
    );
    assert!(diff < 1e-4, "sparse attention: logits differ by {diff}");
    // And sparsity changed something, so the comparison above is not the dense one again.
    let dense_diff = max_abs_diff(
        gpu_sparse.logits.as_ref().unwrap(),
        baseline.logits.as_ref().unwrap(),
    );
    assert!(dense_diff > 1e-3, "sparsity 0.5 left the logits unchanged");

    assert_eq!(
        std::fs::read_dir(offload.path()).unwrap().count(),
        0,
        "offload files left behind"
    );
}

/// Block decode steps (zero-copy over several GPU batches, each layer once over the whole block) write the f16 cache
/// from f16 activations and, with `--dtype f32`, from f32 activations: the same tokens as the all-GPU run with the
/// same storage, and its logits (within 1e-4) in one GPU batch or in two: a linear over the block's rows is the
/// one-batch run's linear, its attention and prefill are the two-batch run's, and the two batchings themselves differ
/// by up to ~1e-2 with f16 activations (the module note).
#[test]
fn block_decode_writes_the_f16_cache_from_either_activation_dtype() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("f16");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let n = prompts.len();
    assert!(n >= 2, "two GPU batches of the fixture's prompts");
    let run = |policy: &Policy| {
        let gen = Generator::with_policy(&gpu, &checkpoint, policy, &|_| {}).unwrap();
        let out = gen.generate(&prompts, &options(new)).unwrap();
        (gen.act_dtype(), out)
    };
    for weight_dtype in [None, Some(DType::F32)] {
        let in_batches = |batches: usize| Policy {
            gpu_batch_size: n.div_ceil(batches),
            num_gpu_batches: batches,
            weight_dtype,
            ..Policy::default()
        };
        let (act, one) = run(&in_batches(1));
        let (_, two) = run(&in_batches(2));
        let block = Policy {
            percent: Percent::from_array([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]),
            transfer: Transfer::ZeroCopy,
            ..in_batches(2)
        };
        let (block_act, out) = run(&block);
        assert_eq!(block_act, act);
        let what = format!("{act:?} activations");
        assert_eq!(out.generated_ids, one.generated_ids, "{what}");
        let logits = out.logits.as_ref().unwrap();
        let diff = max_abs_diff(logits, two.logits.as_ref().unwrap())
            .min(max_abs_diff(logits, one.logits.as_ref().unwrap()));
        assert!(
            diff <= 1e-4,
            "{what}: block decode's logits differ by {diff} from either batching"
        );
    }
}
