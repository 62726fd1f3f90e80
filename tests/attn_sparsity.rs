//! `--attn-sparsity` end to end on the committed f32 fixtures: sparsity 1 is the dense run; sparsity 0.5 reproduces
//! the CPU reference forward pass with the same rule (prefill dense, every decode step keeping the new token and the
//! top half of the earlier real tokens per head): greedy tokens equal, logits within 1e-4, on the all-GPU path, with
//! an offloaded cache, with `--cpu-cache-compute`, with a packed cache (`--compress-cache`), and through the CLI.

mod common;

use common::{fixture, generate_command, gpu, max_abs_diff, options, F32_FIXTURES};

use std::path::Path;

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::compress::CompressionConfig;
use strata_runtime::generate::{GenerateError, GenerateOutput, Generator};
use strata_runtime::gpu::Gpu;
use strata_runtime::offload::policy::{Percent, Policy, Transfer};
use strata_runtime::reference::ReferenceModel;

/// Everything on the GPU at `attn_sparsity`.
fn sparse(attn_sparsity: f64) -> Policy {
    Policy {
        attn_sparsity,
        ..Policy::default()
    }
}

/// A run with everything on the GPU in one GPU batch, under `settings`' sparsity and compression.
fn all_gpu(
    gpu: &Gpu,
    dir: &Path,
    prompts: &[Vec<u32>],
    new: usize,
    settings: &Policy,
) -> Result<GenerateOutput, GenerateError> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    let policy = Policy {
        gpu_batch_size: prompts.len(),
        ..settings.clone()
    };
    Generator::with_policy(gpu, &checkpoint, &policy, &|_| {})?
        .generate(prompts, &self::options(new))
}

fn with_policy(
    gpu: &Gpu,
    dir: &Path,
    prompts: &[Vec<u32>],
    new: usize,
    policy: &Policy,
) -> Result<GenerateOutput, GenerateError> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    Generator::with_policy(gpu, &checkpoint, policy, &|_| {})?.generate(prompts, &options(new))
}

/// Weights and activations on the GPU, the cache in CPU memory, one GPU batch, at `attn_sparsity`.
fn cache_on_cpu(batch: usize, attn_sparsity: f64, cpu_cache_compute: bool) -> Policy {
    Policy {
        gpu_batch_size: batch,
        num_gpu_batches: 1,
        percent: Percent::from_array([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]),
        cpu_cache_compute,
        attn_sparsity,
        ..Policy::default()
    }
}

/// The lowest id among the largest logits (greedy search's choice).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks a run against the reference forward pass at `sparsity`: every step's logits of every sequence within
/// 1e-4, and each generated token the reference's greedy choice.
fn check_against_reference(
    what: &str,
    reference: &ReferenceModel,
    prompts: &[Vec<u32>],
    out: &GenerateOutput,
    sparsity: f32,
) {
    check_against(
        what,
        reference,
        prompts,
        out,
        1e-4,
        |prompt: &[u32], generated: &[u32]| {
            reference.step_logits_sparse(prompt, generated, sparsity)
        },
    );
}

/// Checks a run against `want(prompt, generated)`, the reference's logits at every step: within `tol`, and each
/// token the reference's greedy choice.
fn check_against(
    what: &str,
    reference: &ReferenceModel,
    prompts: &[Vec<u32>],
    out: &GenerateOutput,
    tol: f32,
    want: impl Fn(&[u32], &[u32]) -> Vec<Vec<f32>>,
) {
    let mut worst = 0.0f32;
    let vocab = reference.config.vocab_size;
    let logits = out.logits.as_ref().expect("logits were recorded");
    let batch = prompts.len();
    for (b, prompt) in prompts.iter().enumerate() {
        let generated = &out.generated_ids[b];
        let want = want(prompt, generated);
        for (t, want_t) in want.iter().enumerate() {
            let got = &logits[(t * batch + b) * vocab..(t * batch + b + 1) * vocab];
            let diff = max_abs_diff(got, want_t);
            worst = worst.max(diff);
            assert!(
                diff <= tol,
                "{what}: sequence {b} step {t}: logits differ from the reference by {diff}"
            );
            assert_eq!(
                generated[t],
                argmax(want_t),
                "{what}: sequence {b} step {t}: token is not the reference's greedy choice"
            );
        }
    }
    eprintln!("{what}: logits within {worst} of the reference");
}

#[test]
fn sparsity_one_is_the_dense_run() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("pre-ln-relu");
    let dense = all_gpu(&gpu, &dir, &prompts, new, &Policy::default()).unwrap();
    let one = all_gpu(&gpu, &dir, &prompts, new, &sparse(1.0)).unwrap();
    assert_eq!(one.generated_ids, dense.generated_ids);
    assert_eq!(
        one.logits, dense.logits,
        "sparsity 1 must take the dense path"
    );
    let policy = cache_on_cpu(prompts.len(), 1.0, true);
    let cpu = with_policy(&gpu, &dir, &prompts, new, &policy).unwrap();
    assert_eq!(cpu.generated_ids, dense.generated_ids);
    let diff = max_abs_diff(cpu.logits.as_ref().unwrap(), dense.logits.as_ref().unwrap());
    assert!(diff <= 1e-4, "cpu-cache-compute at sparsity 1: {diff}");
}

#[test]
fn half_sparsity_matches_the_reference_on_every_path() {
    let gpu = gpu();
    for name in F32_FIXTURES {
        let (dir, prompts, new) = fixture(name);
        let reference = ReferenceModel::new(&Checkpoint::open(&dir).unwrap()).unwrap();
        let dense = all_gpu(&gpu, &dir, &prompts, new, &Policy::default()).unwrap();
        let gpu_run = all_gpu(&gpu, &dir, &prompts, new, &sparse(0.5)).unwrap();
        check_against_reference(
            &format!("{name}, all on GPU"),
            &reference,
            &prompts,
            &gpu_run,
            0.5,
        );
        // The sparse run really dropped positions (else the checks above compare two dense runs).
        let changed = max_abs_diff(
            gpu_run.logits.as_ref().unwrap(),
            dense.logits.as_ref().unwrap(),
        );
        assert!(
            changed > 1e-3,
            "{name}: sparsity 0.5 changed logits by only {changed}"
        );

        for cpu_compute in [false, true] {
            let policy = cache_on_cpu(prompts.len(), 0.5, cpu_compute);
            let out = with_policy(&gpu, &dir, &prompts, new, &policy).unwrap();
            let what = format!("{name}, cache on CPU, cpu_cache_compute {cpu_compute}");
            check_against_reference(&what, &reference, &prompts, &out, 0.5);
            assert_eq!(out.generated_ids, gpu_run.generated_ids, "{what}");
        }

        // Block decode steps (zero-copy, one GPU batch per prompt): each batch's sparse attention over its own cache.
        let block = Policy {
            gpu_batch_size: 1,
            num_gpu_batches: prompts.len(),
            percent: Percent::from_array([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]),
            transfer: Transfer::ZeroCopy,
            attn_sparsity: 0.5,
            ..Policy::default()
        };
        let out = with_policy(&gpu, &dir, &prompts, new, &block).unwrap();
        let what = format!("{name}, block decode over {} GPU batches", prompts.len());
        check_against_reference(&what, &reference, &prompts, &out, 0.5);
        assert_eq!(out.generated_ids, gpu_run.generated_ids, "{what}");
    }
}

#[test]
fn bad_sparsities_are_refused_naming_the_flag() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("pre-ln-relu");
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let err = all_gpu(&gpu, &dir, &prompts, new, &sparse(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--attn-sparsity must be in (0, 1]"), "{err}");
        let err = with_policy(&gpu, &dir, &prompts, new, &cache_on_cpu(3, bad, false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--attn-sparsity must be in (0, 1]"), "{err}");
    }
}

/// `--compress-cache`: the prompt attends over f32 keys and values, every decode step over the packed ones, decoded
/// for the top-k kernel. The dense packed run (`q4_attention`) first checks the reference's model of the cache.
#[test]
fn packed_cache_with_sparsity_matches_the_reference() {
    let gpu = gpu();
    let cache = CompressionConfig::DEFAULT;
    for name in ["pre-ln-relu", "gelu-no-bias"] {
        let (dir, prompts, new) = fixture(name);
        let reference = ReferenceModel::new(&Checkpoint::open(&dir).unwrap()).unwrap();
        let mut runs = Vec::new();
        for sparsity in [1.0, 0.5] {
            let options = Policy {
                attn_sparsity: sparsity as f64,
                compress_cache: true,
                compress_cache_config: cache,
                ..Policy::default()
            };
            let out = all_gpu(&gpu, &dir, &prompts, new, &options).unwrap();
            let what = format!("{name}, packed cache, sparsity {sparsity}");
            check_against(
                &what,
                &reference,
                &prompts,
                &out,
                // 5e-4, not 1e-4: a key or value within rounding of a quantisation step boundary may land one
                // level apart on the two sides (the 4-bit error itself is ~1e-2, so this still pins the path down).
                5e-4,
                |prompt: &[u32], generated: &[u32]| {
                    reference
                        .step_logits_packed_cache(prompt, generated, sparsity, cache)
                        .unwrap()
                },
            );
            runs.push(out.logits.unwrap());
        }
        let changed = max_abs_diff(&runs[0], &runs[1]);
        assert!(
            changed > 1e-3,
            "{name}: sparsity 0.5 changed packed-cache logits by only {changed}"
        );
    }
}

#[test]
fn cli_flag_reaches_the_generator() {
    let gpu = gpu();
    let (dir, prompts, new) = fixture("post-ln-proj");
    let want = all_gpu(&gpu, &dir, &prompts, new, &sparse(0.5)).unwrap();
    let dense = all_gpu(&gpu, &dir, &prompts, new, &Policy::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("logits.npy");
    let mut cmd = generate_command(&dir, &prompts, new);
    cmd.args(["--attn-sparsity", "0.5", "--dump-logits"])
        .arg(&npy);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "strata generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(json["generated_ids"].clone()).unwrap();
    assert_eq!(ids, want.generated_ids);
    let dumped = strata_runtime::npy::read_f32(&npy).unwrap();
    let diff = max_abs_diff(&dumped.data, want.logits.as_ref().unwrap());
    assert!(
        diff <= 1e-4,
        "CLI logits differ from the library's by {diff}"
    );
    let changed = max_abs_diff(&dumped.data, dense.logits.as_ref().unwrap());
    assert!(
        changed > 1e-3,
        "the CLI run looks dense (logits moved by {changed})"
    );
}
