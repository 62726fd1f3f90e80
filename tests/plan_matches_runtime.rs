//! The plan is the allocation: for a matrix of policies on the committed fixtures, every buffer a real run holds
//! equals, to the byte and in its tier, the placement's entry for it, and nothing else is allocated.
//!
//! What is compared, after the prefill (when every buffer of the run is held):
//! - the ledger's live list (every buffer the runtime made, recorded where it was made) against the placement's
//!   list: the same ids, tiers and sizes;
//! - the ledger's peak per tier against the placement's total;
//! - independent counters: the CPU and disk tiers' own byte counts, the GPU tier pool's peak, the resident weights as
//!   their buffers report them, the kernels' staging buffers, and where the backend gives one wgpu's allocator report
//!   (each recorded GPU buffer found by its label, at least its size);
//! - after the run, the CPU and disk tiers hold exactly the weights' homes again.
//!
//! Nothing here depends on timing: buffers are made before the first step and freed after the last, and a disk job
//! lets go of its file before it answers. `peaks_hold_with_slow_disk_io_and_parallel_runs` checks it: `strata
//! bench` processes running side by side with every disk job delayed report planned = peak.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, gpu, F32_FIXTURES};

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::compress::CompressionConfig;
use strata_runtime::generate::{GenerateOptions, Generator, Sampling};
use strata_runtime::gpu::Gpu;
use strata_runtime::offload::ledger::AllocatorCheck;
use strata_runtime::offload::placement::{BufferId, BufferSpec, Workload};
use strata_runtime::offload::policy::{Percent, Policy, Transfer};
use strata_runtime::offload::Tier;

/// One policy of the matrix, for `n` prompts.
struct Case {
    what: &'static str,
    percent: [f64; 6],
    /// Sequences per GPU batch (`None`: all prompts in one).
    gbs: Option<usize>,
    overlap: bool,
    cpu_cache_compute: bool,
    compress: bool,
    attn_sparsity: f64,
    /// `--transfer zero-copy` (block decode steps with several GPU batches).
    zero_copy: bool,
}

const fn case(what: &'static str, percent: [f64; 6]) -> Case {
    Case {
        what,
        percent,
        gbs: None,
        overlap: true,
        cpu_cache_compute: false,
        compress: false,
        attn_sparsity: 1.0,
        zero_copy: false,
    }
}

const ALL_GPU: [f64; 6] = [100.0, 0.0, 100.0, 0.0, 100.0, 0.0];

/// Each kind of tensor on the CPU and on disk, split activations, several GPU batches, cpu-cache-compute,
/// compression, sparsity, block decode, and the mixes between.
const CASES: [Case; 16] = [
    case("all on the GPU", ALL_GPU),
    case("weights on CPU", [0.0, 100.0, 100.0, 0.0, 100.0, 0.0]),
    case("weights on disk", [0.0, 0.0, 100.0, 0.0, 100.0, 0.0]),
    Case {
        gbs: Some(1),
        zero_copy: true,
        attn_sparsity: 0.5,
        ..case(
            "zero-copy block decode, sparse, one sequence per GPU batch",
            [20.0, 50.0, 100.0, 0.0, 100.0, 0.0],
        )
    },
    case("cache on CPU", [100.0, 0.0, 0.0, 100.0, 100.0, 0.0]),
    case("cache on disk", [100.0, 0.0, 0.0, 0.0, 100.0, 0.0]),
    case("activations on CPU", [100.0, 0.0, 100.0, 0.0, 0.0, 100.0]),
    case("activations on disk", [100.0, 0.0, 100.0, 0.0, 0.0, 0.0]),
    case("split activations", [100.0, 0.0, 100.0, 0.0, 50.0, 50.0]),
    Case {
        gbs: Some(1),
        ..case(
            "all on disk, one sequence per GPU batch",
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        )
    },
    Case {
        gbs: Some(1),
        ..case(
            "30 40 mixed everywhere, several GPU batches",
            [30.0, 40.0, 30.0, 40.0, 30.0, 40.0],
        )
    },
    Case {
        cpu_cache_compute: true,
        attn_sparsity: 0.5,
        ..case(
            "cpu_cache_compute with sparsity",
            [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
        )
    },
    Case {
        overlap: false,
        ..case(
            "overlap off, mixed weights, cache and activations on CPU",
            [30.0, 40.0, 0.0, 100.0, 0.0, 100.0],
        )
    },
    Case {
        compress: true,
        attn_sparsity: 0.5,
        ..case(
            "compressed weights and cache, offloaded, sparse",
            [0.0, 50.0, 0.0, 50.0, 50.0, 0.0],
        )
    },
    Case {
        compress: true,
        attn_sparsity: 0.5,
        ..case("compressed and sparse on the GPU", ALL_GPU)
    },
    Case {
        compress: true,
        cpu_cache_compute: true,
        gbs: Some(2),
        ..case(
            "compressed, cache on CPU attending on the CPU, 2 GPU batches",
            [0.0, 100.0, 0.0, 100.0, 100.0, 0.0],
        )
    },
];

fn policy(case: &Case, n: usize, dir: &Path) -> Policy {
    let gbs = case.gbs.unwrap_or(n);
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: n.div_ceil(gbs),
        percent: Percent::from_array(case.percent),
        overlap: case.overlap,
        cpu_cache_compute: case.cpu_cache_compute,
        attn_sparsity: case.attn_sparsity,
        compress_weight: case.compress,
        compress_cache: case.compress,
        compress_cache_config: CompressionConfig::DEFAULT,
        transfer: if case.zero_copy {
            Transfer::ZeroCopy
        } else {
            Transfer::Auto
        },
        offload_dir: Some(dir.to_path_buf()),
        ..Policy::default()
    }
}

/// What the run held after its prefill.
#[derive(Default)]
struct Held {
    live: Vec<BufferSpec>,
    staging: [u64; strata_runtime::gpu::kernels::STAGING_SLOTS],
    allocator: Option<AllocatorCheck>,
}

fn check(gpu: &Gpu, name: &str, case: &Case, offload: &Path) {
    let (dir, prompts, new) = fixture(name);
    let what = format!("{name}, {}", case.what);
    let p = policy(case, prompts.len(), offload);
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let gen = Generator::with_policy(gpu, &checkpoint, &p, &|_| {})
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let workload = Workload {
        prompt_len: prompts.iter().map(Vec::len).max().unwrap(),
        gen_len: new,
    };
    let placement = gen.placement(prompts.len(), workload).unwrap();
    let plan = placement.plan();
    let held = std::cell::RefCell::new(Held::default());
    gen.generate_with_progress(
        &prompts,
        &GenerateOptions {
            max_new_tokens: new,
            sampling: Sampling::Greedy,
            ignore_eos: true,
            record_logits: false,
        },
        &|t| {
            if t == 0 {
                *held.borrow_mut() = Held {
                    live: gen.ledger().live(),
                    staging: gen.kernel_staging(),
                    allocator: gpu
                        .device
                        .generate_allocator_report()
                        .map(|r| gen.ledger().compare_allocator(&r)),
                };
            }
        },
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let held = held.into_inner();

    // Every buffer, to the byte and in its tier.
    let mut planned: Vec<BufferSpec> = placement.buffers().to_vec();
    planned.sort_by_key(|b| b.id);
    let extra: Vec<_> = held.live.iter().filter(|b| !planned.contains(b)).collect();
    let missing: Vec<_> = planned.iter().filter(|b| !held.live.contains(b)).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: made but not planned (or sized otherwise): {extra:?}; planned but not made: {missing:?}"
    );
    let allocated = placement.allocated();
    assert_eq!(gen.ledger().peak(), allocated, "{what}: ledger peak");
    assert_eq!(
        plan.allocated(),
        allocated,
        "{what}: the plan sums the list"
    );

    // Independent counters.
    let report = gen.tiers().report();
    assert_eq!(
        report.cpu.peak_bytes, allocated.cpu,
        "{what}: CPU tier peak"
    );
    assert_eq!(
        report.disk.peak_bytes, allocated.disk,
        "{what}: disk tier peak"
    );
    assert_eq!(
        report.gpu.allocated.peak_bytes,
        placement.pool_bytes(),
        "{what}: GPU pool peak (slots and GPU homes)"
    );
    let resident = gen.model().gpu_bytes() + gen.layers().resident_bytes();
    assert_eq!(resident, plan.weights.gpu, "{what}: resident weights");
    let scratch = placement.kernel_scratch().map(|s| s.map_or(0, |s| s.bytes));
    assert_eq!(held.staging, scratch, "{what}: the kernels' staging");
    match &held.allocator {
        Some(a) => eprintln!(
            "{what}: {} buffers, {allocated:?}; allocator report: {} of {} GPU buffers found, {} bytes for {} \
             recorded; outside the placement: {:?}",
            held.live.len(),
            a.matched_buffers,
            a.recorded_buffers,
            a.matched_allocation_bytes,
            a.recorded_bytes,
            a.other
        ),
        None => eprintln!(
            "{what}: {} buffers, {allocated:?}; this backend gives no allocator report",
            held.live.len()
        ),
    }
    if let Some(a) = &held.allocator {
        // Everything else the device holds is transfer and kernel machinery, never a tensor the placement missed:
        // wgpu's own buffers, the kernels' parameters and placeholder, read-back buffers, and CPU-tier homes on the
        // DMA path (host-memory wgpu buffers), and the 16 KiB the transfer timestamps resolve into. A kernel staging
        // buffer grown on demand or an unnamed pool buffer would show up here.
        let infrastructure = |label: &str| {
            label.starts_with("(wgpu internal)")
                || [
                    "absent input",
                    "kernel parameters",
                    "readback",
                    "strata readback",
                    "strata cpu tier",
                    "resolved transfer timestamps",
                ]
                .contains(&label)
        };
        let unexpected: Vec<_> = a.other.keys().filter(|l| !infrastructure(l)).collect();
        assert!(
            unexpected.is_empty(),
            "{what}: unplanned GPU allocations {unexpected:?}"
        );
        assert!(
            a.agrees(),
            "{what}: wgpu's allocator report: {} of {} recorded GPU buffers found, smaller: {:?}",
            a.matched_buffers,
            a.recorded_buffers,
            a.smaller
        );
    }

    // After the run only the weights stay: their homes, on every tier's own count.
    assert_eq!(report.cpu.current_bytes, plan.weights.cpu, "{what}");
    assert_eq!(report.disk.current_bytes, plan.weights.disk, "{what}");
    let weights_and_slots: u64 = held
        .live
        .iter()
        .filter(|b| {
            b.tier == Tier::Gpu
                && matches!(b.id, BufferId::Weight { .. } | BufferId::WeightSlot { .. })
        })
        .map(|b| b.bytes)
        .sum();
    assert_eq!(gen.ledger().current().gpu, weights_and_slots, "{what}");
}

fn check_cases(cases: &[Case]) {
    let gpu = gpu();
    let offload = tempfile::tempdir().unwrap();
    for name in F32_FIXTURES.into_iter().chain(["f16"]) {
        for case in cases {
            check(&gpu, name, case, offload.path());
        }
    }
    let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
    assert!(left.is_empty(), "offload files left behind: {left:?}");
}

// The matrix in four parts, which the test harness runs side by side.
#[test]
fn every_buffer_equals_the_placement_all_gpu_and_weights() {
    check_cases(&CASES[..4]);
}

#[test]
fn every_buffer_equals_the_placement_cache_and_activations() {
    check_cases(&CASES[4..9]);
}

#[test]
fn every_buffer_equals_the_placement_mixed_batches_and_cpu_attention() {
    check_cases(&CASES[9..13]);
}

#[test]
fn every_buffer_equals_the_placement_compressed_and_sparse() {
    check_cases(&CASES[13..]);
}

/// Runs `strata bench --json` on the pre-ln-relu fixture with `flags`, every disk job delayed.
fn bench(flags: &str, offload: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-ln-relu");
    cmd.args(["bench", "--model"])
        .arg(dir)
        .args("--prompt-len 6 --gen-len 4 --json".split(' '))
        .args(flags.split(' '))
        .arg("--offload-dir")
        .arg(offload)
        .env("STRATA_DISK_JOB_DELAY_US", "3000");
    cmd
}

#[test]
fn peaks_hold_with_slow_disk_io_and_parallel_runs() {
    let offload = tempfile::tempdir().unwrap();
    let runs = [
        "--percent 0 0 0 0 0 0 --gpu-batch-size 1 --num-gpu-batches 3",
        "--percent 30 40 30 40 30 40 --gpu-batch-size 1 --num-gpu-batches 3",
        "--percent 0 50 0 50 50 0 --gpu-batch-size 2 --num-gpu-batches 2 --compress-weight --compress-cache",
        "--percent 20 0 0 0 0 0 --gpu-batch-size 2 --num-gpu-batches 2 --overlap false",
    ];
    // Side by side, and three times each: the load and the delays shift every disk job's timing.
    let children: Vec<_> = (0..3)
        .flat_map(|round| {
            let offload = offload.path().join(format!("{round}"));
            runs.iter().enumerate().map(move |(i, flags)| {
                let offload = offload.join(i.to_string());
                std::fs::create_dir_all(&offload).unwrap();
                let child = bench(flags, &offload)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (flags, child)
            })
        })
        .collect();
    for (flags, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{flags}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for tier in ["gpu", "cpu", "disk"] {
            assert_eq!(
                v["peak_bytes"][tier], v["planned_peak_bytes"][tier],
                "{flags}: {tier} peak vs plan in {v}"
            );
        }
        for tier in ["cpu", "disk"] {
            assert_eq!(
                v["tier_peak_bytes"][tier], v["planned_peak_bytes"][tier],
                "{flags}: the {tier} tier's own count in {v}"
            );
        }
        assert_eq!(
            v["tier_peak_bytes"]["gpu_pool"], v["planned_gpu_pool_slots"],
            "{flags}: {v}"
        );
    }
}
