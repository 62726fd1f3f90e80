//! `strata generate`'s output and sampling conventions on the tokenizer fixture, against its transformers reference:
//! `--temperature 0` and `--seed` alone are greedy, a sampled run's seed is random, printed and repeatable, `--stop`
//! ends a sequence before the stop string, text streams as it is produced, and `--json` / `--stream-json` carry what
//! docs/json.md says.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture() -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
    let reference =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

fn strata(args: &[&str]) -> Output {
    let (dir, _) = fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args(["--max-new-tokens", "8", "--ignore-eos"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata generate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_slice(&strata(&all).stdout).unwrap()
}

fn both_prompts() -> Vec<&'static str> {
    vec!["--prompt", "Hello", "--prompt", "The quick brown fox"]
}

#[test]
fn temperature_zero_and_seed_alone_are_greedy_with_a_full_json_document() {
    let (_, reference) = fixture();
    for extra in [vec!["--temperature", "0"], vec!["--seed", "5"], vec![]] {
        let mut args = both_prompts();
        args.extend(extra.iter().copied());
        let v = json(&args);
        assert_eq!(v["generated_ids"], reference["generated_ids"], "{extra:?}");
        assert_eq!(v["text"], reference["generated_text"]);
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["sampling"]["mode"], "greedy");
        assert_eq!(v["finish_reasons"], serde_json::json!(["length", "length"]));
        assert_eq!(v["tokens"]["generated"], 16);
        assert_eq!(v["tokens"]["prompt"], 8);
        assert_eq!(v["timings"]["steps"], 8);
        for key in ["load_s", "prefill_s", "decode_s", "generate_s"] {
            assert!(v["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
        }
        assert!(v["tokens_per_s"]["generated"].as_f64().unwrap() > 0.0);
        assert!(v["policy"].as_str().unwrap().contains("--gpu-batch-size"));
        assert!(v["model"].is_string() && v["seed"].is_u64());
    }
}

#[test]
fn a_sampled_run_prints_a_random_seed_that_repeats_it() {
    let args = ["--prompt", "Hello", "--temperature", "1.5", "--top-k", "20"];
    let seed_of = |out: &Output| -> String {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let at = err.find("sampling with seed ").expect("seed printed") + 19;
        err[at..].split_whitespace().next().unwrap().to_string()
    };
    let a = strata(&args);
    let b = strata(&args);
    assert_ne!(seed_of(&a), seed_of(&b), "default seeds are random");
    let seed = seed_of(&a);
    let mut again: Vec<&str> = args.to_vec();
    again.extend(["--seed", &seed]);
    let c = strata(&again);
    assert_eq!(a.stdout, c.stdout);
    let mut with_json = again.clone();
    with_json.push("--json");
    let v: Value = serde_json::from_slice(&strata(&with_json).stdout).unwrap();
    assert_eq!(v["seed"].to_string(), seed);
    assert_eq!(v["sampling"]["mode"], "sample");
    assert_eq!(v["sampling"]["top_k"], 20);
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let (_, reference) = fixture();
    let full = reference["generated_text"][0].as_str().unwrap();
    let full_ids = reference["generated_ids"][0].as_array().unwrap();
    let stop = "next";
    let at = full
        .find(stop)
        .expect("the greedy text contains the stop string");
    let v = json(&["--prompt", "Hello", "--stop", "zzz", "--stop", stop]);
    assert_eq!(v["text"][0], full[..at]);
    assert_eq!(v["finish_reasons"][0], "stop");
    let ids = v["generated_ids"][0].as_array().unwrap();
    assert!(ids.len() < full_ids.len() && full_ids.starts_with(ids));
}

#[test]
fn text_streams_and_stream_json_events_add_up_to_the_document() {
    let (_, reference) = fixture();
    let plain = strata(&["--prompt", "The quick brown fox"]);
    assert_eq!(
        String::from_utf8(plain.stdout).unwrap(),
        format!(
            "[0] The quick brown fox{}\n",
            reference["generated_text"][1].as_str().unwrap()
        )
    );
    // Without a tokenizer, the ids stream.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-ln-relu");
    let no_tokenizer: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let ids = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args([
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--prompt-ids",
            "2,249,172",
        ])
        .output()
        .unwrap();
    let want: Vec<u64> = serde_json::from_value(no_tokenizer["generated_ids"][1].clone()).unwrap();
    assert_eq!(
        String::from_utf8(ids.stdout).unwrap(),
        format!("[0] {want:?}\n")
    );

    let out = strata(&["--prompt", "Hello", "--stop", "next", "--stream-json"]);
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (done, steps) = events.split_last().unwrap();
    assert_eq!(done["event"], "done");
    let mut text = String::new();
    for (t, e) in steps.iter().enumerate() {
        assert_eq!(
            (e["event"].as_str(), e["step"].as_u64()),
            (Some("step"), Some(t as u64))
        );
        assert_eq!(e["schema_version"], 1);
        assert_eq!(e["tokens"][0]["id"], done["generated_ids"][0][t]);
        text += e["tokens"][0]["text"].as_str().unwrap();
    }
    assert_eq!(
        steps.len(),
        done["generated_ids"][0].as_array().unwrap().len()
    );
    assert_eq!(steps.last().unwrap()["tokens"][0]["finish_reason"], "stop");
    assert_eq!(done["text"][0], text);
}
