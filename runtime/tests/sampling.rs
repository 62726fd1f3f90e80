//! Host token choice (repetition penalty, top-k, top-p, temperature, per-sequence seeds) through
//! `Generator::generate_streaming`, against an exact CPU computation: the reference forward pass's logits, processed
//! as transformers does (written out here on f64), and the draw the sampler documents.

mod common;

use common::{gpu, tiny_config, RandomWeights};
use strata_runtime::generate::{FinishReason, GenerateOptions, Generator, Sampling, TokenChoice};
use strata_runtime::reference::ReferenceModel;
use strata_runtime::sampling::draw;

fn options(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        ignore_eos: true,
        record_logits: false,
    }
}

/// transformers' processing of one row of logits: repetition penalty over the distinct ids of `seen`, then (when
/// sampling) temperature, top-k, top-p; the token the uniform `u` picks walking the kept tokens in id order.
fn expected_token(logits: &[f32], seen: &[u32], choice: &TokenChoice, u: f64) -> u32 {
    let mut l: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let mut distinct = seen.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let r = f64::from(choice.repetition_penalty);
    for &id in &distinct {
        let v = &mut l[id as usize];
        *v = if *v < 0.0 { *v * r } else { *v / r };
    }
    let argmax = |l: &[f64]| {
        let mut best = 0;
        for (i, &v) in l.iter().enumerate() {
            if v > l[best] {
                best = i;
            }
        }
        best as u32
    };
    let Sampling::Sample {
        temperature, top_p, ..
    } = choice.sampling
    else {
        return argmax(&l);
    };
    let max = l.iter().copied().fold(f64::MIN, f64::max);
    let mut p: Vec<f64> = l
        .iter()
        .map(|&v| ((v - max) / f64::from(temperature)).exp())
        .collect();
    if choice.top_k > 0 {
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[choice.top_k - 1];
        for (i, w) in p.iter_mut().enumerate() {
            if l[i] < kth {
                *w = 0.0;
            }
        }
    }
    let total: f64 = p.iter().sum();
    // Top-p: sort descending (id order among equals); keep while the mass before a token is below top_p.
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i] > 0.0).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut before = 0.0;
    let mut keep = vec![false; p.len()];
    for &i in &order {
        if before >= f64::from(top_p) * total {
            break;
        }
        keep[i] = true;
        before += p[i];
    }
    let kept_total: f64 = (0..p.len()).filter(|&i| keep[i]).map(|i| p[i]).sum();
    let mut acc = 0.0;
    for i in 0..p.len() {
        if keep[i] {
            acc += p[i];
            if u * kept_total < acc {
                return i as u32;
            }
        }
    }
    argmax(&l)
}

#[test]
fn host_choices_equal_an_exact_cpu_computation() {
    let config = tiny_config();
    let source = RandomWeights::new(config, 77);
    let gen = Generator::new(&gpu(), &source).unwrap();
    let reference = ReferenceModel::new(&source).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![2, 17, 5, 44, 9],
        vec![2, 30],
        vec![2, 30, 31, 8, 60, 12],
        vec![2, 7, 7, 7],
    ];
    let sample = |temperature, top_p, seed| Sampling::Sample {
        temperature,
        top_p,
        seed,
    };
    let choices = [
        TokenChoice {
            repetition_penalty: 1.8,
            ..TokenChoice::GREEDY
        },
        TokenChoice {
            sampling: sample(0.9, 1.0, 11),
            top_k: 5,
            repetition_penalty: 1.0,
        },
        TokenChoice {
            sampling: sample(1.3, 0.7, 12),
            top_k: 0,
            repetition_penalty: 0.7,
        },
        TokenChoice {
            sampling: sample(2.0, 0.9, 13),
            top_k: 3,
            repetition_penalty: 1.2,
        },
    ];
    let steps = 6;
    let mut seen_steps = Vec::new();
    let out = gen
        .generate_streaming(&prompts, &options(steps), &choices, &mut |s| {
            seen_steps.push((s.step, s.tokens.to_vec()));
        })
        .unwrap();
    assert_eq!(seen_steps.len(), steps);
    for (b, prompt) in prompts.iter().enumerate() {
        let ids = &out.generated_ids[b];
        assert_eq!(ids.len(), steps);
        let want = reference.step_logits(prompt, ids);
        for t in 0..steps {
            let mut seen = prompt.clone();
            seen.extend_from_slice(&ids[..t]);
            let u = draw(
                match choices[b].sampling {
                    Sampling::Sample { seed, .. } => seed,
                    Sampling::Greedy => 0,
                },
                t,
                0,
            );
            assert_eq!(
                ids[t],
                expected_token(&want[t], &seen, &choices[b], u),
                "sequence {b} step {t}"
            );
            // The callback saw each token as it was produced.
            assert_eq!(seen_steps[t].0, t);
            assert_eq!(seen_steps[t].1[b], Some(ids[t]));
        }
    }
    // A penalty changes greedy output here (else the test would not test it).
    let plain = gen.generate(&prompts[..1], &options(steps)).unwrap();
    assert_ne!(plain.generated_ids[0], out.generated_ids[0]);

    // A sequence's own seed, not its row or batch, decides its draws.
    let alone = gen
        .generate_streaming(&prompts[3..], &options(steps), &choices[3..], &mut |_| {})
        .unwrap();
    assert_eq!(alone.generated_ids[0], out.generated_ids[3]);
}

#[test]
fn the_host_draw_is_the_gpu_samplers_draw() {
    let source = RandomWeights::new(tiny_config(), 5);
    let gen = Generator::new(&gpu(), &source).unwrap();
    let prompt = vec![vec![2, 10, 11]];
    for seed in [1, 2, 3] {
        let sampling = Sampling::Sample {
            temperature: 1.5,
            top_p: 1.0,
            seed,
        };
        let on_gpu = gen
            .generate(
                &prompt,
                &GenerateOptions {
                    sampling,
                    ..options(8)
                },
            )
            .unwrap();
        let on_host = gen
            .generate_streaming(
                &prompt,
                &options(8),
                &[TokenChoice::new(sampling)],
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(on_gpu.generated_ids, on_host.generated_ids, "seed {seed}");
    }
}

#[test]
fn the_callback_ends_sequences_and_finish_reasons_say_why() {
    let source = RandomWeights::new(tiny_config(), 9);
    let gen = Generator::new(&gpu(), &source).unwrap();
    let prompts = vec![vec![2, 5], vec![2, 6, 7]];
    let full = gen.generate(&prompts, &options(6)).unwrap();
    assert_eq!(full.finish_reasons, vec![FinishReason::Length; 2]);
    let mut steps = 0;
    let cut = gen
        .generate_streaming(&prompts, &options(6), &[], &mut |s| {
            steps += 1;
            if s.step == 1 {
                s.finish(0, FinishReason::Stop);
            }
            if s.step == 3 {
                s.finish(1, FinishReason::Cancelled);
            }
        })
        .unwrap();
    assert_eq!(steps, 4, "no step runs once every sequence has finished");
    assert_eq!(cut.generated_ids[0], full.generated_ids[0][..2]);
    assert_eq!(cut.generated_ids[1], full.generated_ids[1][..4]);
    assert_eq!(
        cut.finish_reasons,
        vec![FinishReason::Stop, FinishReason::Cancelled]
    );
}
