//! `strata specs` run as a user runs it, checked against REFERENCE.md's figures and FlexLLMGen's formulas.
// The checks cover every spec, so they need them all compiled in.
#![cfg(feature = "all-models")]
use std::process::{Command, Output};

use serde_json::Value;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("specs")
        .args(args)
        .output()
        .expect("run strata")
}

fn json(args: &[&str]) -> Value {
    let out = strata(args);
    assert!(
        out.status.success(),
        "strata specs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

#[test]
fn list_has_every_model_with_exact_sizes() {
    let list = json(&["--json"]);
    assert_eq!(list["schema_version"], 1);
    let list = list["models"].as_array().unwrap();
    let expected = [
        ("opt-125m", 125_239_296u64),
        ("opt-350m", 331_196_416),
        ("opt-1.3b", 1_315_758_080),
        ("opt-2.7b", 2_651_596_800),
        ("opt-6.7b", 6_658_473_984),
        ("opt-13b", 12_853_473_280),
        ("galactica-30b", 29_968_103_424),
        ("opt-30b", 29_974_540_288),
        ("opt-66b", 65_719_701_504),
        ("opt-175b", 174_604_468_224),
    ];
    assert_eq!(list.len(), expected.len());
    for (entry, (name, params)) in list.iter().zip(expected) {
        assert_eq!(entry["name"], name);
        assert_eq!(entry["params"], params, "{name}");
        assert_eq!(entry["model_bytes"], 2 * params, "{name}: fp16");
        let mut keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "ffn_embed_dim",
                "hidden_size",
                "max_seq_len",
                "model_bytes",
                "n_head",
                "name",
                "num_hidden_layers",
                "params",
                "vocab_size"
            ]
        );
    }
    let opt30 = &list[7];
    assert_eq!(
        (
            &opt30["num_hidden_layers"],
            &opt30["hidden_size"],
            &opt30["n_head"],
            &opt30["ffn_embed_dim"],
            &opt30["vocab_size"]
        ),
        (
            &Value::from(48),
            &Value::from(7168),
            &Value::from(56),
            &Value::from(28672),
            &Value::from(50272)
        )
    );
}

#[test]
fn one_model_adds_the_workload_sizes() {
    let v = json(&[
        "facebook/opt-iml-max-30b",
        "--batch",
        "4",
        "--seq",
        "512",
        "--json",
    ]);
    assert_eq!(v["name"], "opt-iml-max-30b");
    assert_eq!(v["arch"], "opt-30b");
    assert_eq!(v["params"], 29_974_540_288u64);
    // FlexLLMGen: cache = 2 * b * s * L * h * 2, hidden = b * s * h * 2 (fp16).
    assert_eq!(v["cache_bytes"], 2u64 * 4 * 512 * 48 * 7168 * 2);
    assert_eq!(v["hidden_bytes"], 4u64 * 512 * 7168 * 2);
    // Without --seq the workload is the full context of one sequence.
    let v = json(&["OPT-125M", "--json"]);
    assert_eq!(
        (v["arch"].as_str(), v["hidden_bytes"].as_u64()),
        (Some("opt-125m"), Some(2048 * 768 * 2))
    );
}

#[test]
fn human_output_uses_binary_units() {
    let out = strata(&[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.starts_with("opt-125m ")).unwrap();
    assert!(
        line.contains("125.24 M") && line.ends_with("238.88 MiB"),
        "{line}"
    );
    let out = strata(&["opt-6.7b", "--batch", "2", "--seq", "1024"]);
    let text = String::from_utf8(out.stdout).unwrap();
    // 2 * 2 * 1024 * 32 * 4096 * 2 bytes = 1 GiB exactly.
    assert!(text.contains("KV cache      1.00 GiB"), "{text}");
}

#[test]
fn unknown_model_fails_listing_the_known_ones() {
    let out = strata(&["opt-7b", "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown model `opt-7b`"), "{err}");
    for name in ["opt-125m", "opt-6.7b", "galactica-30b"] {
        assert!(err.contains(name), "{name} missing from {err}");
    }
    let out = strata(&["opt-125m", "--seq", "4096"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds opt-125m's max_seq_len of 2048"));
}
