//! Compression under every offloading policy: packed weights and a packed KV cache that live in (and move between)
//! the CPU and disk tiers reproduce the same compression run all on the GPU with the same GPU batches (identical
//! greedy ids, f32 logits within 1e-5), on the committed f32 fixtures. Offloading only moves packed words, so the
//! kernels see the same bytes either way. The tiers really hold the packed bytes, and no offload file remains.

mod common;

use common::{fixture, generate_command, gpu, max_abs_diff, options, F32_FIXTURES};

use std::path::Path;
use std::process::Command;

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::compress::{packed_bytes, CompressionConfig};
use strata_runtime::config::OptConfig;
use strata_runtime::generate::{GenerateOutput, Generator};
use strata_runtime::gpu::Gpu;
use strata_runtime::offload::placement::{plan, Workload};
use strata_runtime::offload::policy::{Percent, Policy};
use strata_runtime::weights::layer_tensors;

/// What is compressed: weights, cache, or both (with a second grouping, several groups per row).
#[derive(Clone, Copy, Debug)]
struct Compression {
    weight: Option<CompressionConfig>,
    cache: Option<CompressionConfig>,
}

fn compressions() -> [Compression; 3] {
    let default = Some(CompressionConfig::DEFAULT);
    [
        Compression {
            weight: default,
            cache: None,
        },
        Compression {
            weight: None,
            cache: default,
        },
        Compression {
            // 16-element groups split every weight row, 4-element groups every head_dim row of the cache.
            weight: Some(CompressionConfig::new(4, 16).unwrap()),
            cache: Some(CompressionConfig::new(8, 4).unwrap()),
        },
    ]
}

/// The default policy (everything on the GPU) with compression `z`.
fn compressed(z: Compression) -> Policy {
    Policy {
        compress_weight: z.weight.is_some(),
        compress_weight_config: z.weight.unwrap_or_default(),
        compress_cache: z.cache.is_some(),
        compress_cache_config: z.cache.unwrap_or_default(),
        ..Policy::default()
    }
}

#[derive(Clone, Copy)]
struct Case {
    what: &'static str,
    percent: [f64; 6],
    /// GPU batch size (`None`: every prompt in one GPU batch) and number of GPU batches.
    gbs: Option<usize>,
    batches: usize,
    overlap: bool,
    cpu_cache_compute: bool,
}

const fn case(
    what: &'static str,
    percent: [f64; 6],
    gbs: Option<usize>,
    batches: usize,
    overlap: bool,
) -> Case {
    Case {
        what,
        percent,
        gbs,
        batches,
        overlap,
        cpu_cache_compute: false,
    }
}

const CASES: [Case; 11] = [
    case(
        "weights on CPU",
        [0.0, 100.0, 100.0, 0.0, 100.0, 0.0],
        None,
        1,
        true,
    ),
    case(
        "weights and cache on CPU",
        [0.0, 100.0, 0.0, 100.0, 100.0, 0.0],
        None,
        1,
        true,
    ),
    case(
        "weights and cache on disk",
        [0.0, 0.0, 0.0, 0.0, 100.0, 0.0],
        None,
        1,
        true,
    ),
    case("all on disk", [0.0; 6], None, 1, true),
    case("all on disk, no overlap", [0.0; 6], None, 1, false),
    case(
        "30 40 mixed, cache split",
        [30.0, 40.0, 30.0, 40.0, 30.0, 40.0],
        None,
        1,
        true,
    ),
    case(
        "20 60 mixed, cache split, no overlap",
        [20.0, 60.0, 20.0, 60.0, 20.0, 60.0],
        None,
        1,
        false,
    ),
    // With 3 prompts the second GPU batch holds one sequence: a packed slot partly filled.
    case(
        "2 GPU batches, weights and cache on CPU",
        [0.0, 100.0, 0.0, 100.0, 100.0, 0.0],
        Some(2),
        2,
        true,
    ),
    case(
        "2 GPU batches, no overlap, mixed with cache on disk",
        [30.0, 40.0, 0.0, 50.0, 50.0, 0.0],
        Some(2),
        2,
        false,
    ),
    Case {
        what: "cpu cache compute (a packed cache attends on the CPU)",
        percent: [100.0, 0.0, 0.0, 100.0, 100.0, 0.0],
        gbs: None,
        batches: 1,
        overlap: true,
        cpu_cache_compute: true,
    },
    Case {
        what: "cpu cache compute, 2 GPU batches, weights on CPU",
        percent: [0.0, 100.0, 0.0, 100.0, 100.0, 0.0],
        gbs: Some(2),
        batches: 2,
        overlap: true,
        cpu_cache_compute: true,
    },
];

fn policy(c: &Case, n: usize, z: Compression, dir: &Path) -> Policy {
    Policy {
        gpu_batch_size: c.gbs.unwrap_or(n),
        num_gpu_batches: c.batches,
        percent: Percent::from_array(c.percent),
        overlap: c.overlap,
        cpu_cache_compute: c.cpu_cache_compute,
        compress_weight: z.weight.is_some(),
        compress_weight_config: z.weight.unwrap_or_default(),
        compress_cache: z.cache.is_some(),
        compress_cache_config: z.cache.unwrap_or_default(),
        offload_dir: Some(dir.to_path_buf()),
        ..Policy::default()
    }
}

/// Bytes of every decoder layer's weights as the tiers hold them: packed matrices (groups along rows, padded),
/// f32 vectors.
fn layer_weight_bytes(config: &OptConfig, weight: Option<CompressionConfig>) -> u64 {
    (0..config.num_hidden_layers)
        .flat_map(|i| layer_tensors(config, i))
        .map(|t| match (weight, t.shape.as_slice()) {
            (Some(c), &[rows, cols]) => packed_bytes(rows, cols, c),
            _ => 4 * t.numel() as u64,
        })
        .sum()
}

/// Bytes of `seqs` sequences' K and V homes of every layer: packed `heads * capacity` rows of head_dim, or f32.
fn cache_home_bytes(
    config: &OptConfig,
    seqs: usize,
    capacity: usize,
    cache: Option<CompressionConfig>,
) -> u64 {
    let per_layer = match cache {
        Some(c) => packed_bytes(config.n_head * capacity, config.head_dim(), c),
        None => (capacity * config.hidden_size * 4) as u64,
    };
    2 * (config.num_hidden_layers * seqs) as u64 * per_layer
}

fn run_policy(
    gpu: &Gpu,
    dir: &Path,
    prompts: &[Vec<u32>],
    new: usize,
    case: &Case,
    z: Compression,
    p: &Policy,
) -> GenerateOutput {
    let label = format!("{}, {:?}", case.what, z);
    let checkpoint = Checkpoint::open(dir).unwrap();
    let config = *strata_runtime::weights::WeightSource::config(&checkpoint);
    let gen = Generator::with_policy(gpu, &checkpoint, p, &|_| {})
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let out = gen
        .generate(prompts, &options(new))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    // The tiers named were used, and hold exactly the packed bytes where the placement is whole.
    let report = gen.tiers().report();
    let pct = &p.percent;
    let cpu = report.cpu.peak_bytes;
    let disk = report.disk.peak_bytes;
    if [pct.weights.cpu, pct.cache.cpu, pct.act.cpu]
        .iter()
        .any(|&x| x >= 50.0)
    {
        assert!(cpu > 0, "{label}: nothing placed on the CPU");
    }
    if [pct.weights, pct.cache, pct.act]
        .iter()
        .any(|s| s.disk() >= 50.0)
    {
        assert!(disk > 0, "{label}: nothing placed on disk");
    }
    let s = prompts.iter().map(Vec::len).max().unwrap();
    let whole = |x: f64| x == 0.0 || x == 100.0;
    if !case.cpu_cache_compute && pct.to_array().iter().all(|&x| whole(x)) && pct.act.gpu == 100.0 {
        let weights_on = |t: f64| if t == 100.0 { 1 } else { 0 };
        let seqs = p.effective_batch().min(prompts.len());
        let expected = |w: f64, c: f64| {
            weights_on(w) * layer_weight_bytes(&config, z.weight)
                + weights_on(c) * cache_home_bytes(&config, seqs, s + new, z.cache)
        };
        assert_eq!(
            cpu,
            expected(pct.weights.cpu, pct.cache.cpu),
            "{label}: CPU tier bytes"
        );
        assert_eq!(
            disk,
            expected(pct.weights.disk(), pct.cache.disk()),
            "{label}: disk tier bytes"
        );
        // The planner counts the same packed cache homes (it plans for the whole effective batch).
        if p.effective_batch() == prompts.len() {
            let w = Workload {
                prompt_len: s,
                gen_len: new,
            };
            let planned = plan(&config, p, w).unwrap().cache;
            let homes = cache_home_bytes(&config, seqs, s + new, z.cache);
            assert_eq!(
                [planned.cpu, planned.disk],
                [
                    weights_on(pct.cache.cpu) * homes,
                    weights_on(pct.cache.disk()) * homes
                ],
                "{label}: planned cache bytes"
            );
        }
    }
    out
}

#[test]
fn compressed_runs_under_every_policy_match_the_same_compression_on_the_gpu() {
    let gpu = gpu();
    let offload = tempfile::tempdir().unwrap();
    for name in F32_FIXTURES {
        let (dir, prompts, new) = fixture(name);
        let n = prompts.len();
        let checkpoint = Checkpoint::open(&dir).unwrap();
        for z in compressions() {
            // The all-GPU reference of each GPU batch size, with the same compression.
            let baseline = |gbs: usize| {
                let all_gpu = Policy {
                    gpu_batch_size: gbs,
                    num_gpu_batches: n.div_ceil(gbs),
                    ..compressed(z)
                };
                Generator::with_policy(&gpu, &checkpoint, &all_gpu, &|_| {})
                    .unwrap()
                    .generate(&prompts, &options(new))
                    .unwrap()
            };
            let whole = baseline(n);
            let halves = baseline(2);
            for case in &CASES {
                let p = policy(case, n, z, offload.path());
                let reference = if case.gbs.is_some() { &halves } else { &whole };
                let out = run_policy(&gpu, &dir, &prompts, new, case, z, &p);
                assert_eq!(
                    out.generated_ids, reference.generated_ids,
                    "{name}, {}, {z:?}: tokens differ",
                    case.what
                );
                let diff = max_abs_diff(
                    out.logits.as_ref().unwrap(),
                    reference.logits.as_ref().unwrap(),
                );
                // A cache (f32 or packed) under cpu_cache_compute attends on the CPU: other arithmetic over the
                // same cached values, the offloading invariant's bound. Everything else runs the same kernels on
                // the same bytes.
                let bound = if case.cpu_cache_compute { 1e-4 } else { 1e-5 };
                assert!(
                    diff <= bound,
                    "{name}, {}, {z:?}: logits differ by {diff}",
                    case.what
                );
            }
        }
    }
    let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
    assert!(left.is_empty(), "offload files left behind: {left:?}");
}

#[test]
fn a_compression_strata_cannot_store_is_refused_with_its_flag() {
    let gpu = gpu();
    let (dir, _, _) = fixture("pre-ln-relu");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let p = Policy {
        percent: Percent::from_array([0.0, 100.0, 0.0, 100.0, 100.0, 0.0]),
        compress_cache: true,
        ..Policy::default()
    };
    let mut bad = p.clone();
    bad.compress_cache_config = CompressionConfig {
        bits: 3,
        group_size: 64,
    };
    let err = Generator::with_policy(&gpu, &checkpoint, &bad, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--compress-cache") && err.contains("use 2, 4 or 8"),
        "{err}"
    );
}

#[test]
fn bench_cli_runs_compressed_with_everything_offloaded_and_prints_packed_sizes() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-ln-relu");
    let config = strata_runtime::checkpoint::read_config(&model).unwrap();
    let bench = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("bench")
            .arg("--model")
            .arg(&model)
            .args(["--prompt-len", "6", "--gen-len", "4"])
            .args(["--percent", "0", "100", "0", "100", "100", "0"])
            .args(["--gpu-batch-size", "2", "--num-gpu-batches", "2"])
            .args(["--compress-weight", "--compress-cache"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&bench(true)).expect("one JSON object");
    let packed_model = config.compressed_model_bytes(4, 64);
    let packed_cache = config.compressed_cache_bytes(4, 10, 4, 64);
    assert_eq!(v["compressed_model_bytes"].as_u64(), Some(packed_model));
    assert_eq!(v["compressed_cache_bytes"].as_u64(), Some(packed_cache));
    assert!(v["policy"]
        .as_str()
        .is_some_and(|p| p.contains("--compress-weight") && p.contains("--compress-cache")));
    // Every layer's packed weights and every sequence's packed cache sit in the CPU tier: exactly those bytes
    // (the embeddings and LM head stay on the GPU).
    let cpu = v["peak_bytes"]["cpu"].as_u64().unwrap();
    let z = CompressionConfig::DEFAULT;
    assert_eq!(
        cpu,
        layer_weight_bytes(&config, Some(z)) + cache_home_bytes(&config, 4, 10, Some(z)),
        "{v}"
    );
    assert!(cpu < config.model_bytes(), "{v}");
    let text = bench(false);
    assert!(
        text.contains("compressed model size:") && text.contains("compressed cache size:"),
        "{text}"
    );
}

#[test]
fn generate_cli_runs_compressed_under_a_policy_like_the_library_on_the_gpu() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("gelu-no-bias");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let z = Some(CompressionConfig::DEFAULT);
    let all_gpu = Policy {
        gpu_batch_size: prompts.len(),
        ..compressed(Compression {
            weight: z,
            cache: z,
        })
    };
    let reference = Generator::with_policy(&gpu, &checkpoint, &all_gpu, &|_| {})
        .unwrap()
        .generate(&prompts, &options(new))
        .unwrap();
    let offload = tempfile::tempdir().unwrap();
    let mut cmd = generate_command(&dir, &prompts, new);
    cmd.args(["--percent", "20", "60", "0", "50", "100", "0"])
        .args(["--compress-weight", "--compress-cache", "--offload-dir"])
        .arg(offload.path());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let ids: Vec<Vec<u32>> = serde_json::from_value(v["generated_ids"].clone()).unwrap();
    assert_eq!(ids, reference.generated_ids);
    let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
    assert!(left.is_empty(), "offload files left behind: {left:?}");
}

/// A packed cache on disk is stored as many small per-head ranges, each through a readback buffer: the tiers keep
/// what a step needed, so a second identical run creates no readback buffers at all (and gives the same result).
#[test]
fn repeated_runs_allocate_no_new_readbacks() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("pre-ln-relu");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let offload = tempfile::tempdir().unwrap();
    let policy = Policy {
        gpu_batch_size: prompts.len().div_ceil(2),
        num_gpu_batches: 2,
        percent: Percent::from_array([100.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
        compress_cache: true,
        compress_cache_config: CompressionConfig::DEFAULT,
        offload_dir: Some(offload.path().to_path_buf()),
        ..Policy::default()
    };
    let gen = Generator::with_policy(&gpu, &checkpoint, &policy, &|_| {}).unwrap();
    let first = gen.generate(&prompts, &options(new)).unwrap();
    let tiers = gen.tiers();
    let created = tiers.readbacks_created();
    assert!(created > 0, "cache and activations on disk need readbacks");
    let second = gen.generate(&prompts, &options(new)).unwrap();
    assert_eq!(second.generated_ids, first.generated_ids);
    assert_eq!(second.logits, first.logits);
    assert_eq!(
        tiers.readbacks_created(),
        created,
        "the second run allocated readback buffers"
    );
}
