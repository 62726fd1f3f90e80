//! Compressed weights and KV cache against Hugging Face transformers: the next-token logits after the prompt (step 0)
//! with `--compress-weight`, `--compress-cache` and both, compared by cosine with the uncompressed reference for every
//! sequence, and the first greedy token.
//!
//! Two kinds of fixture, because 4-bit weights cost different amounts on them (tests/fixtures/README.md):
//! - `moderate-64` (hidden 64, so no padded group; soft attention; first tokens lead by >= 3 logits): the measure of
//!   what 4-bit compression costs a model that does not amplify small errors. Every first token must agree; the
//!   cosine is 0.970 (groups of 64) and 0.972 (32), short of the 0.99: 4-bit min/max groups leave each weight
//!   with ~9% relative RMS error, and on this model the embedding (tied head) alone costs 0.007, each block 0.004
//!   (quantising one tensor kind at a time, CPU reference); no random model this size whose blocks matter reaches
//!   0.99 (0.94..0.98 over seeds of this design; only one that repeats its last token, at Hugging Face's std 0.02,
//!   does).
//! - the large-weight fixtures of generate_fixtures.rs (hidden 32, nearly hard attention, out_proj / fc2 gain 5):
//!   a 4-bit weight error changes which token a head attends to, so step-0 cosines fall to 0.90..0.98 and most
//!   first tokens flip; quantised alone, q/k_proj cost up to 0.14 and the positions 0.24, and the costs do not add up.
//!   They keep the 0.99 check at 8 bits (0.9990..0.9999 measured) and 4-bit regression floors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::generate_command;

use strata::checkpoint::Checkpoint;
use strata::compress::CompressionConfig;
use strata::generate::{GenerateOptions, Generator, Sampling};
use strata::gpu::{Gpu, GpuOptions};
use strata::offload::policy::Policy;

struct Fixture {
    name: String,
    dir: PathBuf,
    prompt_ids: Vec<Vec<u32>>,
    first_tokens: Vec<u32>,
    /// Steps 0..STEPS of logits.npy: `[steps, batch, vocab]`.
    reference: Vec<f32>,
    vocab: usize,
}

fn fixture(name: &str) -> Fixture {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompt_ids: Vec<Vec<u32>> =
        serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
    let generated: Vec<Vec<u32>> =
        serde_json::from_value(reference["generated_ids"].clone()).unwrap();
    let logits = strata::npy::read_f32(dir.join(reference["logits"].as_str().unwrap())).unwrap();
    let (batch, vocab) = (logits.shape[1], logits.shape[2]);
    assert_eq!(batch, prompt_ids.len());
    Fixture {
        name: name.into(),
        dir,
        prompt_ids,
        first_tokens: generated.iter().map(|g| g[0]).collect(),
        reference: logits.data[..STEPS * batch * vocab].to_vec(),
        vocab,
    }
}

/// Steps generated and compared: step 0 comes from the prefill, steps 1.. from decode over the (packed) cache.
const STEPS: usize = 3;
/// The large-weight fixtures (hidden 32: their groups are padded).
const FIXTURES: [&str; 4] = ["pre-ln-relu", "post-ln-proj", "gelu-no-bias", "f16"];
/// The fixture with moderate weights, hidden 64.
const MODERATE: &str = "moderate-64";

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The cosine of each step's and sequence's logits (`[steps, batch, vocab]`, the first `steps`) with the
/// reference's, `[step][sequence]`; asserts the first greedy token of every sequence agrees when `tokens`.
fn cosines(f: &Fixture, logits: &[f32], steps: usize, what: &str, tokens: bool) -> Vec<Vec<f64>> {
    let batch = f.prompt_ids.len();
    let row = |data: &[f32], t: usize, b: usize| -> Vec<f32> {
        data[(t * batch + b) * f.vocab..][..f.vocab].to_vec()
    };
    (0..steps)
        .map(|t| {
            (0..batch)
                .map(|b| {
                    let got = row(logits, t, b);
                    let cos = cosine(&got, &row(&f.reference, t, b));
                    eprintln!("{} {what}: step {t} sequence {b}: cosine {cos:.5}", f.name);
                    if tokens && t == 0 {
                        assert_eq!(
                            argmax(&got),
                            f.first_tokens[b],
                            "{} {what}: sequence {b}: first greedy token differs",
                            f.name
                        );
                    }
                    cos
                })
                .collect()
        })
        .collect()
}

fn min_of(c: &[Vec<f64>]) -> f64 {
    c.iter().flatten().copied().fold(1.0, f64::min)
}

fn run(
    gpu: &Gpu,
    f: &Fixture,
    weight: Option<CompressionConfig>,
    cache: Option<CompressionConfig>,
) -> Vec<f32> {
    let policy = Policy {
        gpu_batch_size: f.prompt_ids.len(),
        compress_weight: weight.is_some(),
        compress_weight_config: weight.unwrap_or_default(),
        compress_cache: cache.is_some(),
        compress_cache_config: cache.unwrap_or_default(),
        ..Policy::default()
    };
    run_policy(gpu, f, &policy)
}

/// [`run`] under a whole policy.
fn run_policy(gpu: &Gpu, f: &Fixture, policy: &Policy) -> Vec<f32> {
    let checkpoint = Checkpoint::open(&f.dir).unwrap();
    let gen = Generator::with_policy(gpu, &checkpoint, policy, &|_| {}).unwrap();
    // Three tokens: step 0 is checked against the reference, the later steps run decode over the packed cache.
    let out = gen
        .generate(
            &f.prompt_ids,
            &GenerateOptions {
                max_new_tokens: STEPS,
                sampling: Sampling::Greedy,
                ignore_eos: true,
                record_logits: true,
            },
        )
        .unwrap();
    let logits = out.logits.unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    logits
}

fn modes(
    config: CompressionConfig,
) -> [(
    &'static str,
    Option<CompressionConfig>,
    Option<CompressionConfig>,
); 3] {
    [
        ("weight", Some(config), None),
        ("cache", None, Some(config)),
        ("weight+cache", Some(config), Some(config)),
    ]
}

/// Whether the reference's step-0 top-1 logit of sequence `b` leads its runner-up by more than twice the largest
/// |difference| between `logits` and the reference there: then the argmax must agree.
fn token_is_decided(f: &Fixture, logits: &[f32], b: usize) -> bool {
    let want = &f.reference[b * f.vocab..][..f.vocab];
    let got = &logits[b * f.vocab..][..f.vocab];
    let mut sorted = want.to_vec();
    sorted.sort_by(|x, y| y.total_cmp(x));
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    sorted[0] - sorted[1] > 2.0 * diff
}

/// Runs every mode at `bits`, groups 64 and 32, on `fixtures`; asserts step 0's cosine >= `min_step0` for every
/// sequence, the first token of every sequence when `all_tokens`, else wherever the logits' error cannot flip it, and
/// (cache only, where the tokens stay the reference's) the decode steps' cosine >= `min_cache_decode`.
fn check_bits(
    bits: u8,
    fixtures: &[&str],
    min_step0: f64,
    min_cache_decode: f64,
    all_tokens: bool,
) {
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    for group in [64, 32] {
        let config = CompressionConfig::new(bits, group).unwrap();
        for &name in fixtures {
            let f = fixture(name);
            for (mode, weight, cache) in modes(config) {
                let logits = run(&gpu, &f, weight, cache);
                let what = format!("{bits}-bit/{group} {mode}");
                let c = cosines(&f, &logits, STEPS, &what, all_tokens);
                let step0 = min_of(&c[..1]);
                eprintln!(
                    "SUMMARY {name} {what}: min step-0 cosine {step0:.5}, all steps {:.5}",
                    min_of(&c)
                );
                assert!(step0 >= min_step0, "{name} {what}: step-0 cosine {step0}");
                for (b, first) in f.first_tokens.iter().enumerate() {
                    if token_is_decided(&f, &logits, b) {
                        let got = argmax(&logits[b * f.vocab..][..f.vocab]);
                        assert_eq!(got, *first, "{name} {what}: sequence {b}: first token");
                    }
                }
                if weight.is_none() {
                    assert!(min_of(&c) >= min_cache_decode, "{name} {what}: {c:?}");
                }
            }
        }
    }
}

#[test]
fn eight_bit_compression_keeps_the_logits_of_every_fixture() {
    // The 0.99 everywhere (the large-weight fixtures measure 0.9990..0.9999); 0.9999 measured on moderate-64.
    check_bits(8, &FIXTURES, 0.99, 0.999, false);
    check_bits(8, &[MODERATE], 0.999, 0.999, true);
}

#[test]
fn four_bit_compression_keeps_the_first_tokens_of_a_moderate_model() {
    // 0.970 / 0.972 measured (module docs: why not 0.99).
    check_bits(4, &[MODERATE], 0.96, 0.99, true);
}

#[test]
fn four_bit_compression_of_the_large_weight_fixtures_stays_where_it_was_measured() {
    // These models amplify any 4-bit error (module docs): 0.90..0.98 measured, regression floors only; that the loss
    // is the quantisation and not the kernels is shown by packed_weight_kernels_match_cpu_dequantised_weights.
    check_bits(4, &FIXTURES, 0.89, 0.96, false);
}

#[test]
fn a_packed_embedding_larger_than_a_binding_is_a_clear_error() {
    // 1 KiB bindings: the packed embedding (9 KiB) would need row blocks, which the id lookup cannot use.
    let f = fixture("post-ln-proj");
    let gpu = Gpu::new(&GpuOptions {
        adapter: None,
        max_binding_override: Some(1024),
    })
    .unwrap();
    let checkpoint = Checkpoint::open(&f.dir).unwrap();
    let policy = Policy {
        compress_weight: true,
        ..Policy::default()
    };
    let err = Generator::with_policy(&gpu, &checkpoint, &policy, &|_| {}).unwrap_err();
    assert!(
        err.to_string().contains("more than one GPU binding"),
        "{err}"
    );
}

#[test]
fn cli_compress_weight_matches_transformers() {
    let f = fixture("pre-ln-relu");
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("logits.npy");
    let mut cmd = generate_command(&f.dir, &f.prompt_ids, 2);
    cmd.args([
        "--compress-weight",
        "--compress-cache",
        "--compress-weight-bits",
        "8",
        "--compress-weight-group-size",
        "32",
        "--compress-cache-bits",
        "8",
        "--compress-cache-group-size",
        "32",
        "--dump-logits",
    ]);
    cmd.arg(&npy);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "strata generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let generated: Vec<Vec<u32>> = serde_json::from_value(json["generated_ids"].clone()).unwrap();
    let dumped = strata::npy::read_f32(&npy).unwrap();
    assert_eq!(dumped.shape, vec![2, f.prompt_ids.len(), f.vocab]);
    let c = cosines(&f, &dumped.data, 1, "CLI 8-bit/32", false);
    assert!(min_of(&c) >= 0.99, "{c:?}");
    for (b, first) in f.first_tokens.iter().enumerate() {
        if token_is_decided(&f, &dumped.data, b) {
            assert_eq!(generated[b][0], *first, "sequence {b}");
        }
    }
}

#[test]
fn cli_rejects_a_bad_compression_config() {
    let f = fixture("pre-ln-relu");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["generate", "--model"])
        .arg(&f.dir)
        .args([
            "--prompt-ids",
            "2,5",
            "--max-new-tokens",
            "1",
            "--compress-weight",
            "--compress-weight-bits",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use 2, 4 or 8"), "{err}");
}

/// The checkpoint with every compressed tensor replaced by its CPU round trip (`quantize` then `dequantize`), as f32:
/// what the packed kernels must compute, up to f32 rounding.
struct RoundTripped {
    inner: Checkpoint,
    config: CompressionConfig,
}

impl strata::weights::WeightSource for RoundTripped {
    fn config(&self) -> &strata::config::OptConfig {
        self.inner.config()
    }

    fn load(
        &self,
        spec: &strata::weights::TensorSpec,
    ) -> Result<strata::weights::HostTensor<'_>, strata::weights::WeightError> {
        let t = self.inner.load(spec)?;
        if !spec.role.is_compressed() {
            return Ok(t);
        }
        let values = strata::checkpoint::host_tensor_to_f32(&t).unwrap();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let packed = strata::compress::quantize(&values, rows, cols, self.config).unwrap();
        let back = strata::compress::dequantize(&packed);
        Ok(strata::weights::HostTensor {
            dtype: strata::config::DType::F32,
            shape: t.shape.clone(),
            bytes: back
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        })
    }
}

#[test]
fn packed_weight_kernels_match_cpu_dequantised_weights() {
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    for group in [64, 32] {
        let config = CompressionConfig::new(4, group).unwrap();
        for name in FIXTURES.into_iter().chain([MODERATE]) {
            let f = fixture(name);
            let source = RoundTripped {
                inner: Checkpoint::open(&f.dir).unwrap(),
                config,
            };
            // f32 storage: the round-tripped values exactly (an f16 checkpoint would otherwise be stored as f16),
            // and f32 activations in both runs, so that only the weights' path differs.
            let policy = Policy {
                gpu_batch_size: f.prompt_ids.len(),
                weight_dtype: Some(strata::config::DType::F32),
                ..Policy::default()
            };
            let packed = run_policy(
                &gpu,
                &f,
                &Policy {
                    compress_weight: true,
                    compress_weight_config: config,
                    ..policy.clone()
                },
            );
            let gen = Generator::with_policy(&gpu, &source, &policy, &|_| {}).unwrap();
            let out = gen
                .generate(
                    &f.prompt_ids,
                    &GenerateOptions {
                        max_new_tokens: 3,
                        sampling: Sampling::Greedy,
                        ignore_eos: true,
                        record_logits: true,
                    },
                )
                .unwrap();
            let want = out.logits.unwrap();
            let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let diff = packed
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
                / scale;
            eprintln!(
                "{name} 4-bit/{group}: packed vs dequantised f32 max |diff| / max |logit| {diff}"
            );
            assert!(diff < 1e-5, "{name} 4-bit/{group}: {diff}");
        }
    }
}

#[test]
fn packed_cache_gives_the_same_logits_in_gpu_batches_of_one() {
    // Several GPU batches share one cache scratch; each has its own packed caches.
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let f = fixture("pre-ln-relu");
    let config = CompressionConfig::DEFAULT;
    let checkpoint = Checkpoint::open(&f.dir).unwrap();
    let n = f.prompt_ids.len();
    let logits = |gpu_batch_size: usize| {
        let policy = Policy {
            gpu_batch_size,
            num_gpu_batches: n.div_ceil(gpu_batch_size),
            compress_weight: true,
            compress_weight_config: config,
            compress_cache: true,
            compress_cache_config: config,
            ..Policy::default()
        };
        let gen = Generator::with_policy(&gpu, &checkpoint, &policy, &|_| {}).unwrap();
        let options = GenerateOptions {
            max_new_tokens: STEPS,
            sampling: Sampling::Greedy,
            ignore_eos: true,
            record_logits: true,
        };
        gen.generate(&f.prompt_ids, &options)
            .unwrap()
            .logits
            .unwrap()
    };
    let (whole, ones) = (logits(n), logits(1));
    let diff = whole
        .iter()
        .zip(&ones)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-4,
        "GPU batches of one change the logits by {diff}"
    );
}
