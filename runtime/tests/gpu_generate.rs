//! The whole forward pass and greedy generation on the GPU against the CPU reference, for random tiny models of
//! every OPT architecture variant, with f32 and f16 weights and batches of prompts of unequal length.

mod common;

use common::{gpu, tiny_config, RandomWeights};
use strata_runtime::config::{Activation, DType, OptConfig};
use strata_runtime::generate::{GenerateError, GenerateOptions, Generator, Sampling};
use strata_runtime::gpu::kernels::ActDtype;
use strata_runtime::offload::policy::Policy;
use strata_runtime::reference::ReferenceModel;

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![2, 17, 5, 44, 9],
        vec![2],
        vec![2, 30, 31, 8, 60, 12, 3, 40, 22],
        vec![2, 7, 7],
    ]
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        ignore_eos: true,
        record_logits: true,
    }
}

/// Generates greedily on the GPU, then checks every step's logits against the reference run on the same prefix,
/// and every chosen token against the reference's maximum: within `tol` with f32 activations.
///
/// With f16 activations the reference rounds every stored activation as the generator does, which reproduces the
/// GPU's logits to f32 rounding except where an f32 sum and the reference's f64 sum land on two sides of a half's
/// rounding boundary: that half then differs by one ulp (2^-11 of its value) and so does everything computed from it,
/// in every later step of that sequence (the cache keeps it). So: every step within 1e-3 of its largest logit, and at
/// least half of the (sequence, step) pairs exact to 1e-5 of it (a reference that did not round activations is off by
/// 3e-4..2e-3 of it everywhere).
fn check_against_reference(
    config: OptConfig,
    storage: Option<DType>,
    tol: f32,
    gpu_batch_size: Option<usize>,
) {
    let source = RandomWeights::new(config, 0x5eed ^ config.hidden_size as u64);
    let prompts = prompts();
    let gbs = gpu_batch_size.unwrap_or(prompts.len());
    let policy = Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: prompts.len().div_ceil(gbs),
        weight_dtype: storage,
        ..Policy::default()
    };
    let gen = Generator::with_policy(&gpu(), &source, &policy, &|_| {}).unwrap();
    let steps = 5;
    let out = gen.generate(&prompts, &greedy(steps)).unwrap();
    let logits = out.logits.as_ref().unwrap();
    let vocab = config.vocab_size;
    assert_eq!(out.steps, steps);
    assert_eq!(logits.len(), steps * prompts.len() * vocab);
    let act = gen.act_dtype();
    let reference = ReferenceModel::new(&source).unwrap().with_act(act);
    let mut exact = 0;
    for (b, prompt) in prompts.iter().enumerate() {
        assert_eq!(out.generated_ids[b].len(), steps);
        let want = reference.step_logits(prompt, &out.generated_ids[b]);
        for (t, want_t) in want.iter().enumerate() {
            let got_t =
                &logits[(t * prompts.len() + b) * vocab..(t * prompts.len() + b + 1) * vocab];
            let diff = common::max_abs_diff(got_t, want_t);
            let scale = want_t.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let tol = match act {
                ActDtype::F32 => tol,
                ActDtype::F16 => 1e-3 * scale,
            };
            exact += usize::from(diff <= 1e-5 * scale);
            assert!(
                diff < tol,
                "{} ({act:?} activations): seq {b} step {t}: logits differ by {diff} (tolerance {tol})",
                config.name
            );
            let chosen = out.generated_ids[b][t] as usize;
            let max = want_t.iter().copied().fold(f32::MIN, f32::max);
            assert!(
                want_t[chosen] >= max - 2.0 * tol,
                "{}: seq {b} step {t}: token {chosen} is not the argmax",
                config.name
            );
        }
    }
    if act == ActDtype::F16 {
        let pairs = prompts.len() * steps;
        assert!(
            2 * exact >= pairs,
            "{}: only {exact} of {pairs} steps match the reference's rounding exactly",
            config.name
        );
    }
}

fn variants() -> Vec<OptConfig> {
    let base = tiny_config();
    vec![
        base.with_name("pre-ln relu"),
        // opt-350m's shape: post-LN, project_in / project_out, no final layer norm.
        OptConfig {
            do_layer_norm_before: false,
            word_embed_proj_dim: 16,
            name: "post-ln projected",
            ..base
        },
        // Galactica: GELU, no biases, no layer-norm affine.
        OptConfig {
            activation: Activation::Gelu,
            enable_bias: false,
            layer_norm_elementwise_affine: false,
            name: "galactica-like",
            ..base
        },
        OptConfig {
            tie_word_embeddings: false,
            remove_final_layer_norm: true,
            name: "untied head, no final LN",
            ..base
        },
        OptConfig {
            word_embed_proj_dim: 24,
            activation: Activation::Gelu,
            name: "pre-ln projected gelu",
            ..base
        },
    ]
}

#[test]
fn every_variant_matches_the_reference_in_f32() {
    for config in variants() {
        check_against_reference(config, None, 1e-3, None);
    }
}

#[test]
fn every_variant_matches_the_reference_with_f16_checkpoints() {
    // The reference reads the same f16 values and rounds the same activations to halves (f16 activations where the
    // adapter has shader-f16), so only f32-vs-f64 accumulation differs (and, through it, now and then a half).
    for config in variants() {
        check_against_reference(config.with_dtype(DType::F16), None, 1e-3, None);
        // `--dtype f32`: the same values as f32 weights, f32 activations, the f16 cache.
        check_against_reference(config.with_dtype(DType::F16), Some(DType::F32), 1e-3, None);
    }
}

#[test]
fn f32_checkpoint_stored_as_f16_stays_close() {
    // --dtype f16: the GPU rounds weights the reference keeps in f32.
    for config in variants() {
        check_against_reference(config, Some(DType::F16), 2e-2, None);
    }
}

#[test]
fn bf16_checkpoint_runs_through_f32_storage() {
    check_against_reference(tiny_config().with_dtype(DType::BF16), None, 1e-3, None);
}

#[test]
fn several_gpu_batches_give_the_same_result() {
    // 4 prompts in GPU batches of 3 and 1, with a larger model width so the GEMM path runs at prefill.
    let config = OptConfig {
        hidden_size: 64,
        n_head: 2,
        ffn_embed_dim: 100,
        ..tiny_config()
    };
    check_against_reference(config, None, 1e-3, Some(3));
}

#[test]
fn generation_stops_at_eos_unless_ignored() {
    let config = tiny_config();
    let source = RandomWeights::new(config, 99);
    let gen = Generator::new(&gpu(), &source).unwrap();
    let prompts = prompts();
    let free = gen.generate(&prompts, &greedy(6)).unwrap();
    // Make the third token sequence 0 generates the EOS id: it must stop there, others may stop where it appears.
    let eos = free.generated_ids[0][2];
    let with_eos = RandomWeights::new(
        OptConfig {
            eos_token_id: eos,
            ..config
        },
        99,
    );
    let gen = Generator::new(&gpu(), &with_eos).unwrap();
    let options = GenerateOptions {
        ignore_eos: false,
        record_logits: false,
        ..greedy(6)
    };
    let stopped = gen.generate(&prompts, &options).unwrap();
    for (b, full) in free.generated_ids.iter().enumerate() {
        let end = full
            .iter()
            .position(|&id| id == eos)
            .map_or(full.len(), |i| i + 1);
        assert_eq!(stopped.generated_ids[b], full[..end], "sequence {b}");
    }
    assert!(stopped.generated_ids[0].len() <= 3);
    let ignored = gen.generate(&prompts, &greedy(6)).unwrap();
    assert_eq!(ignored.generated_ids, free.generated_ids);
}

#[test]
fn sampling_is_reproducible_and_seed_dependent() {
    let source = RandomWeights::new(tiny_config(), 5);
    let gen = Generator::new(&gpu(), &source).unwrap();
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| vec![2, 10 + i]).collect();
    let sample = |seed| GenerateOptions {
        sampling: Sampling::Sample {
            temperature: 1.5,
            top_p: 0.95,
            seed,
        },
        record_logits: false,
        ..greedy(8)
    };
    let a = gen.generate(&prompts, &sample(1)).unwrap();
    let b = gen.generate(&prompts, &sample(1)).unwrap();
    let c = gen.generate(&prompts, &sample(2)).unwrap();
    assert_eq!(a.generated_ids, b.generated_ids);
    assert_ne!(a.generated_ids, c.generated_ids);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let config = tiny_config();
    let source = RandomWeights::new(config, 1);
    let gen = Generator::new(&gpu(), &source).unwrap();
    let err = gen.generate(&[vec![2, 3], vec![]], &greedy(2)).unwrap_err();
    assert!(
        matches!(err, GenerateError::EmptyPrompt { index: 1 }),
        "{err}"
    );
    let err = gen.generate(&[vec![2, 61]], &greedy(2)).unwrap_err();
    assert!(
        matches!(
            err,
            GenerateError::TokenOutOfRange {
                index: 0,
                position: 1,
                id: 61,
                ..
            }
        ),
        "{err}"
    );
    let err = gen.generate(&[vec![2; 38]], &greedy(4)).unwrap_err();
    assert!(err.to_string().contains("context is 40 tokens"), "{err}");
    assert!(matches!(
        gen.generate(&[], &greedy(2)).unwrap_err(),
        GenerateError::NoPrompts
    ));
    let bad = GenerateOptions {
        sampling: Sampling::Sample {
            temperature: 0.0,
            top_p: 0.9,
            seed: 0,
        },
        ..greedy(2)
    };
    assert!(matches!(
        gen.generate(&[vec![2]], &bad).unwrap_err(),
        GenerateError::Sampling(_)
    ));
    // The longest allowed: 38 + 3 new (the last one never fed back) fits 40 positions.
    assert_eq!(
        gen.generate(&[vec![2; 38]], &greedy(3))
            .unwrap()
            .generated_ids[0]
            .len(),
        3
    );
}
