//! The offloading invariant: every policy produces the all-GPU run's tokens (identical greedy ids, logits within
//! 1e-4 for f32 checkpoints), on the committed f32 fixtures, for a matrix of placements, batchings and overlap.

mod common;

use common::{fixture, gpu, max_abs_diff, options, F32_FIXTURES};

use std::path::Path;

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::generate::{GenerateError, GenerateOutput, Generator};
use strata_runtime::gpu::Gpu;
use strata_runtime::offload::placement::PlacementError;
use strata_runtime::offload::policy::{Percent, Policy, PolicyError, Transfer};

fn policy(
    percent: [f64; 6],
    gbs: usize,
    batches: usize,
    overlap: bool,
    dir: Option<&Path>,
) -> Policy {
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: batches,
        percent: Percent::from_array(percent),
        overlap,
        offload_dir: dir.map(Path::to_path_buf),
        ..Policy::default()
    }
}

fn run_policy(
    gpu: &Gpu,
    dir: &Path,
    prompts: &[Vec<u32>],
    new: usize,
    p: &Policy,
) -> Result<GenerateOutput, GenerateError> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    let gen = Generator::with_policy(gpu, &checkpoint, p, &|_| {})?;
    let out = gen.generate(prompts, &options(new))?;
    // The placement really used the tiers it names.
    let report = gen.tiers().report();
    let pct = &p.percent;
    let off_cpu = [pct.weights.cpu, pct.cache.cpu, pct.act.cpu]
        .iter()
        .any(|&x| x >= 50.0);
    let off_disk = [pct.weights, pct.cache, pct.act]
        .iter()
        .any(|s| s.disk() >= 50.0);
    if off_cpu {
        assert!(report.cpu.peak_bytes > 0, "{p:?} placed nothing on the CPU");
    }
    if off_disk {
        assert!(report.disk.peak_bytes > 0, "{p:?} placed nothing on disk");
    }
    if !p.percent.uses_disk() {
        assert_eq!(report.disk.peak_bytes, 0);
    }
    // Slot buffers come from the GPU tier's pool, so its report counts them: with no sequence's cache (activations)
    // on the GPU, every GPU batch computes through the cache slots (activation slot).
    let c = checkpoint.config();
    let s = prompts.iter().map(Vec::len).max().unwrap();
    let f32_rows = |rows: usize| (rows * c.hidden_size * 4) as u64;
    let cache_slots = if p.overlap { 2 } else { 1 };
    let mut slots = 0;
    if pct.cache.gpu == 0.0 {
        slots += cache_slots * 2 * f32_rows(p.gpu_batch_size * (s + new));
    }
    if pct.act.gpu == 0.0 {
        slots += f32_rows(p.gpu_batch_size * s);
    }
    assert!(
        report.gpu.allocated.peak_bytes >= slots,
        "{p:?}: the GPU pool's peak {} misses slot buffers of {slots} bytes",
        report.gpu.allocated.peak_bytes
    );
    Ok(out)
}

fn cpu_compute(mut p: Policy) -> Policy {
    p.cpu_cache_compute = true;
    p
}

/// Zero-copy decode: with several GPU batches whose caches and activations stay on the GPU, block decode steps (each
/// layer once over the whole block).
fn zero_copy(mut p: Policy) -> Policy {
    p.transfer = Transfer::ZeroCopy;
    p
}

#[test]
fn every_policy_matches_the_all_gpu_run() {
    let gpu = gpu();
    let offload = tempfile::tempdir().unwrap();
    let disk = Some(offload.path());
    for name in F32_FIXTURES {
        let (dir, prompts, new) = fixture(name);
        let n = prompts.len();
        // Two GPU batches for every fixture (they have 2 or 3 prompts).
        let half = n.div_ceil(2);
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let baseline = Generator::new(&gpu, &checkpoint)
            .unwrap()
            .generate(&prompts, &options(new))
            .unwrap();
        let all_gpu = [100.0, 0.0, 100.0, 0.0, 100.0, 0.0];
        let cases: Vec<(&str, Policy)> = vec![
            ("all on GPU", policy(all_gpu, n, 1, true, None)),
            (
                "weights on CPU",
                policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], n, 1, true, None),
            ),
            ("all on disk", policy([0.0; 6], n, 1, true, disk)),
            (
                "all on disk, no overlap",
                policy([0.0; 6], n, 1, false, disk),
            ),
            (
                "30 40 mixed",
                policy([30.0, 40.0, 30.0, 40.0, 30.0, 40.0], n, 1, true, disk),
            ),
            (
                "50 25 mixed",
                policy([50.0, 25.0, 50.0, 25.0, 50.0, 25.0], n, 1, false, disk),
            ),
            (
                "20 60 mixed",
                policy([20.0, 60.0, 20.0, 60.0, 20.0, 60.0], n, 1, true, disk),
            ),
            (
                "1 x 3 GPU batches, all on GPU",
                policy(all_gpu, 1, 3, true, None),
            ),
            (
                "1 x 3 GPU batches, weights and cache on CPU",
                policy([0.0, 100.0, 0.0, 100.0, 100.0, 0.0], 1, 3, true, None),
            ),
            (
                "1 x 3 GPU batches, no overlap, mixed",
                policy([30.0, 40.0, 0.0, 100.0, 0.0, 0.0], 1, 3, false, disk),
            ),
            (
                "2 x 2 GPU batches, split cache and activations",
                policy([100.0, 0.0, 50.0, 50.0, 50.0, 0.0], 2, 2, true, disk),
            ),
            (
                "2 GPU batches, cache on disk, read ahead",
                policy([100.0, 0.0, 0.0, 0.0, 100.0, 0.0], half, 2, true, disk),
            ),
            (
                "cpu cache compute",
                cpu_compute(policy(
                    [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
                    n,
                    1,
                    true,
                    None,
                )),
            ),
            (
                "cpu cache compute, 1 x 3",
                cpu_compute(policy(
                    [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
                    1,
                    3,
                    true,
                    None,
                )),
            ),
            (
                "cpu cache compute, activations on CPU",
                cpu_compute(policy(
                    [100.0, 0.0, 0.0, 100.0, 0.0, 100.0],
                    n,
                    1,
                    true,
                    None,
                )),
            ),
            (
                "cpu cache compute, 2 GPU batches, activations on CPU",
                cpu_compute(policy(
                    [100.0, 0.0, 0.0, 100.0, 0.0, 100.0],
                    half,
                    2,
                    true,
                    None,
                )),
            ),
            (
                "cpu cache compute, 2 GPU batches, activations on disk, no overlap",
                cpu_compute(policy(
                    [100.0, 0.0, 0.0, 100.0, 0.0, 0.0],
                    half,
                    2,
                    false,
                    disk,
                )),
            ),
            (
                "cpu cache compute, 2 GPU batches, offloaded weights and activations, overlap",
                cpu_compute(policy(
                    [20.0, 60.0, 0.0, 100.0, 0.0, 100.0],
                    half,
                    2,
                    true,
                    disk,
                )),
            ),
            (
                "cpu cache compute, 1 x 3, weights on CPU, overlap",
                cpu_compute(policy(
                    [0.0, 100.0, 0.0, 100.0, 100.0, 0.0],
                    1,
                    3,
                    true,
                    None,
                )),
            ),
            (
                "cpu cache compute, 1 x 3, offloaded weights and activations",
                cpu_compute(policy(
                    [20.0, 60.0, 0.0, 100.0, 0.0, 100.0],
                    1,
                    3,
                    false,
                    disk,
                )),
            ),
            (
                "zero-copy block decode, 1 x 3, weights on CPU",
                zero_copy(policy(
                    [0.0, 100.0, 100.0, 0.0, 100.0, 0.0],
                    1,
                    3,
                    true,
                    None,
                )),
            ),
            (
                "zero-copy block decode, 2 GPU batches, weights on GPU, CPU and disk, no overlap",
                zero_copy(policy(
                    [30.0, 40.0, 100.0, 0.0, 100.0, 0.0],
                    half,
                    2,
                    false,
                    disk,
                )),
            ),
            (
                "zero-copy per GPU batch, 2 GPU batches, activations on CPU",
                zero_copy(policy(
                    [0.0, 100.0, 100.0, 0.0, 0.0, 100.0],
                    half,
                    2,
                    true,
                    None,
                )),
            ),
            (
                "cpu cache compute over a partly GPU cache (GPU attention path)",
                cpu_compute(policy(
                    [100.0, 0.0, 50.0, 50.0, 100.0, 0.0],
                    2,
                    2,
                    true,
                    None,
                )),
            ),
        ];
        for (what, p) in cases {
            let out = run_policy(&gpu, &dir, &prompts, new, &p)
                .unwrap_or_else(|e| panic!("{name}, {what}: {e}"));
            assert_eq!(
                out.generated_ids, baseline.generated_ids,
                "{name}, {what}: tokens differ"
            );
            let diff = max_abs_diff(
                out.logits.as_ref().unwrap(),
                baseline.logits.as_ref().unwrap(),
            );
            assert!(diff <= 1e-4, "{name}, {what}: logits differ by {diff}");
        }
    }
    // Every offload file is gone once the generators are dropped.
    let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
    assert!(left.is_empty(), "offload files left behind: {left:?}");
}

#[test]
fn unsupported_and_over_cap_policies_are_refused_with_the_flag_to_change() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("pre-ln-relu");
    // The errors stay typed end to end, so a library caller can match them; the CLI prints the same text.
    let mut p = policy([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 4, 1, true, None);
    p.attn_sparsity = 1.5;
    let err = run_policy(&gpu, &dir, &prompts, new, &p).unwrap_err();
    assert!(
        matches!(err, GenerateError::Policy(PolicyError::AttnSparsity(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("--attn-sparsity"), "{err}");

    let mut p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 4, 1, true, None);
    p.gpu_mem = Some(1024);
    let err = run_policy(&gpu, &dir, &prompts, new, &p).unwrap_err();
    assert!(
        matches!(err, GenerateError::Placement(PlacementError::OverCap(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("--gpu-mem"), "{err}");

    let p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 1, 2, true, None);
    let err = run_policy(&gpu, &dir, &prompts, new, &p).unwrap_err();
    assert!(
        matches!(
            err,
            GenerateError::Placement(PlacementError::TooManyPrompts { prompts: 3, .. })
        ),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(err.contains("--num-gpu-batches"), "{err}");
}

#[test]
fn an_offloaded_homes_write_back_lands_before_it_is_read() {
    use strata_runtime::offload::home::Home;
    use strata_runtime::tiers::{DiskOptions, TensorHome, Tier, TierOptions, Tiers};
    let gpu = gpu();
    let dir = tempfile::tempdir().unwrap();
    let tiers = Tiers::new(
        &gpu.device,
        &gpu.queue,
        TierOptions {
            cpu_path: None,
            disk: Some(DiskOptions::new(dir.path())),
        },
    )
    .unwrap();
    // Large enough that a read racing the disk write would see a partly written file.
    let len = 24 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let src = gpu.storage_buffer_init("source rows", &data).unwrap();
    for tier in [Tier::Gpu, Tier::Cpu, Tier::Disk] {
        let mut home = Home::new(tiers.place(tier, "home", &vec![0u8; len]).unwrap());
        for round in 0..2 {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            let pending = tiers.store(&src, 0, home.for_store(), &mut enc).unwrap();
            tiers.prepare_submit(&enc);
            gpu.queue.submit([enc.finish()]);
            home.stored(&tiers, pending).unwrap();
            // Moving a store on more than once (the schedule's drain, then a read) keeps its write in flight.
            if round == 0 {
                home.start_write(&tiers).unwrap();
                home.start_write(&tiers).unwrap();
            }
            let settled = home.settle(&tiers).unwrap();
            // A disk home is read straight from its file, on this thread, so nothing queues the read behind the
            // write on the disk tier's threads.
            let bytes = match &*settled {
                TensorHome::Disk(t) => std::fs::read(t.path()).unwrap(),
                other => tiers.read(other).unwrap(),
            };
            assert!(
                bytes == data,
                "{tier} home, round {round}: read before its write-back landed"
            );
        }
    }
}
