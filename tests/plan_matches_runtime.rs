//! The memory planner counts what the runtime really allocates: for a matrix of policies on the committed f32
//! fixtures, a real run's tier statistics (peak bytes of the CPU tier, the disk tier and the GPU tier's pool) and its
//! resident GPU weights equal the planner's figures for the same policy and workload.
//!
//! Where the two legitimately differ, the difference is computed here from the runtime's documented rule, never
//! waved through with a tolerance:
//! - GPU-tier homes of a partly offloaded GPU batch (the GPU share of its sequences' cache and activations) come
//!   from the GPU pool's size classes ([`size_class`]: at most 25% over the request), while the planner counts
//!   their logical bytes. The expected pool peak adds exactly that rounding.
//! - The planner's CPU staging (`cpu_working`) and the GPU's non-pool working buffers (batch I/O, scratch, logits)
//!   are not tier allocations, so the tier statistics do not see them; they are not compared here.

mod common;

use std::path::Path;

use common::{fixture, gpu, F32_FIXTURES};

use strata::checkpoint::Checkpoint;
use strata::compress::CompressionConfig;
use strata::generate::{GenerateOptions, Generator, GeneratorOptions, Sampling};
use strata::planner::{plan, MemoryPlan, Workload};
use strata::policy::{Percent, Policy};
use strata::tiers::gpu::size_class;

/// A named policy for `n` prompts: `(what, percent, one sequence per GPU batch, overlap, cpu_cache_compute,
/// compress)`. Every case's effective batch is exactly the `n` prompts, so the planner's whole sequences are the
/// runtime's.
struct Case {
    what: &'static str,
    percent: [f64; 6],
    single_sequence_batches: bool,
    overlap: bool,
    cpu_cache_compute: bool,
    compress: bool,
}

const CASES: [Case; 6] = [
    Case {
        what: "weights on CPU",
        percent: [0.0, 100.0, 100.0, 0.0, 100.0, 0.0],
        single_sequence_batches: false,
        overlap: true,
        cpu_cache_compute: false,
        compress: false,
    },
    Case {
        what: "all on disk, one sequence per GPU batch",
        percent: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        single_sequence_batches: true,
        overlap: true,
        cpu_cache_compute: false,
        compress: false,
    },
    Case {
        what: "30 40 mixed everywhere",
        percent: [30.0, 40.0, 30.0, 40.0, 30.0, 40.0],
        single_sequence_batches: false,
        overlap: true,
        cpu_cache_compute: false,
        compress: false,
    },
    Case {
        what: "cpu_cache_compute, cache on CPU",
        percent: [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
        single_sequence_batches: false,
        overlap: true,
        cpu_cache_compute: true,
        compress: false,
    },
    Case {
        what: "overlap off, mixed weights, cache and activations on CPU",
        percent: [30.0, 40.0, 0.0, 100.0, 0.0, 100.0],
        single_sequence_batches: false,
        overlap: false,
        cpu_cache_compute: false,
        compress: false,
    },
    Case {
        what: "compressed weights and cache, offloaded",
        percent: [0.0, 50.0, 0.0, 50.0, 50.0, 0.0],
        single_sequence_batches: false,
        overlap: true,
        cpu_cache_compute: false,
        compress: true,
    },
];

fn policy(case: &Case, n: usize, dir: &Path) -> Policy {
    let (gbs, batches) = if case.single_sequence_batches {
        (1, n)
    } else {
        (n, 1)
    };
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: batches,
        percent: Percent::from_array(case.percent),
        overlap: case.overlap,
        cpu_cache_compute: case.cpu_cache_compute,
        compress_weight: case.compress,
        compress_cache: case.compress,
        compress_cache_config: CompressionConfig::DEFAULT,
        offload_dir: Some(dir.to_path_buf()),
        ..Policy::default()
    }
}

/// What the GPU pool holds beyond the planner's slots: the GPU-tier homes of partly offloaded GPU batches, each
/// rounded up to its pool size class. Fully GPU batches keep their own (non-pool) buffers; fully offloaded ones have
/// no GPU homes.
fn pool_homes(plan: &MemoryPlan, p: &Policy, layers: usize) -> u64 {
    let gbs = p.gpu_batch_size;
    let mut total = 0;
    // (sequences on the GPU, their planned bytes, homes per sequence).
    for (gpu_seqs, bytes, homes_per_seq) in [
        (plan.cache_sequences[0], plan.cache.gpu, 2 * layers),
        (plan.act_sequences[0], plan.activations.gpu, 1),
    ] {
        let per_batch = gpu_seqs / p.num_gpu_batches;
        if per_batch == 0 || per_batch == gbs {
            continue;
        }
        let homes = (gpu_seqs * homes_per_seq) as u64;
        assert_eq!(bytes % homes, 0, "equal homes");
        total += homes * size_class(bytes / homes);
    }
    total
}

#[test]
fn tier_peaks_equal_the_plan_for_every_policy() {
    let gpu = gpu();
    let offload = tempfile::tempdir().unwrap();
    for name in F32_FIXTURES {
        let (dir, prompts, new) = fixture(name);
        let s = prompts.iter().map(Vec::len).max().unwrap();
        let workload = Workload {
            prompt_len: s,
            gen_len: new,
        };
        for case in &CASES {
            let p = policy(case, prompts.len(), offload.path());
            let what = format!("{name}, {}", case.what);
            let checkpoint = Checkpoint::open(&dir).unwrap();
            let config = *checkpoint.config();
            let gen = Generator::with_policy(
                &gpu,
                &checkpoint,
                &GeneratorOptions::default(),
                &p,
                &|_| {},
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            gen.generate(
                &prompts,
                &GenerateOptions {
                    max_new_tokens: new,
                    sampling: Sampling::Greedy,
                    ignore_eos: true,
                    record_logits: false,
                },
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let planned = plan(&config, gen.policy().unwrap(), workload).unwrap();
            let report = gen.tiers().unwrap().report();
            let homes = |tier: fn(&strata::planner::TierBytes) -> u64| {
                tier(&planned.weights) + tier(&planned.cache) + tier(&planned.activations)
            };

            // CPU and disk: every byte there is a home the planner counts, and nothing else.
            assert_eq!(
                report.cpu.peak_bytes,
                homes(|t| t.cpu),
                "{what}: CPU tier peak vs the plan's CPU homes ({:?})",
                planned
            );
            assert_eq!(
                report.disk.peak_bytes,
                homes(|t| t.disk),
                "{what}: disk tier peak vs the plan's disk homes ({:?})",
                planned
            );
            // The run's cache and activation homes went with it; the weights' stay with the generator.
            assert_eq!(report.cpu.current_bytes, planned.weights.cpu, "{what}");
            assert_eq!(report.disk.current_bytes, planned.weights.disk, "{what}");

            // GPU: resident weights (everything outside the layers plus the layers' GPU share) are the planner's.
            let resident = gen.model().gpu_bytes() + gen.layers().resident_bytes();
            assert_eq!(resident, planned.weights.gpu, "{what}: resident weights");
            // The weight slots, and the pool's peak: every slot the planner counts plus size-classed GPU homes.
            let w = planned.gpu_working;
            assert_eq!(
                gen.layers().slot_bytes(),
                w.weight_slots,
                "{what}: weight slots"
            );
            let expected_pool = w.pool_slots() + pool_homes(&planned, &p, config.num_hidden_layers);
            assert_eq!(
                report.gpu.allocated.peak_bytes, expected_pool,
                "{what}: GPU pool peak vs planned slots {w:?}"
            );
        }
    }
}
