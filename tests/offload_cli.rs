//! `strata generate` with policy flags: an offloaded run through the CLI gives the tokens Hugging Face's greedy
//! generate produced for the fixture, and removes its offload files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::generate_command;

/// A committed fixture: its directory and reference.json.
fn fixture(name: &str) -> (PathBuf, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (dir, reference)
}

/// `strata generate` of the fixture's prompts for its reference length ([`generate_command`]), with the measured
/// profile cache (for `--policy auto`) under `cache`.
fn generate(dir: &Path, reference: &serde_json::Value, cache: &Path) -> Command {
    let prompts: Vec<Vec<u32>> = serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
    let new = reference["max_new_tokens"].as_u64().unwrap() as usize;
    let mut cmd = generate_command(dir, &prompts, new);
    cmd.env("XDG_CACHE_HOME", cache);
    cmd
}

#[test]
fn generate_with_offloading_flags_matches_the_reference_tokens() {
    let (dir, reference) = fixture("post-ln-proj");
    let (offload, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cmd = generate(&dir, &reference, cache.path());
    cmd.args([
        "--percent",
        "20",
        "60",
        "0",
        "50",
        "50",
        "0",
        "--gpu-batch-size",
        "1",
        "--num-gpu-batches",
        "3",
    ])
    .args(["--overlap", "false", "--offload-dir"])
    .arg(offload.path());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"], reference["generated_ids"]);
    assert!(
        std::fs::read_dir(offload.path()).unwrap().next().is_none(),
        "offload files left behind"
    );
}

#[test]
fn generate_with_policy_auto_matches_the_reference_tokens() {
    let (dir, reference) = fixture("pre-ln-relu");
    // The measured profile is cached per adapter under XDG_CACHE_HOME: keep it inside the test's own directory.
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = generate(&dir, &reference, cache.path());
    cmd.args(["--policy", "auto", "--gpu-mem", "1GiB"]);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--policy auto for pre-ln-relu"),
        "auto should print its choice: {stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"], reference["generated_ids"]);
    let profiles: Vec<_> = std::fs::read_dir(cache.path().join("strata/profiles"))
        .unwrap()
        .collect();
    assert_eq!(profiles.len(), 1, "one cached profile for the adapter");
}

#[test]
fn policy_auto_refuses_placement_flags() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-ln-relu");
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .env("XDG_CACHE_HOME", cache.path())
        .args(["generate", "--model"])
        .arg(&dir)
        .args(["--prompt-ids", "2,5", "--max-new-tokens", "2"])
        .args([
            "--policy",
            "auto",
            "--gpu-mem",
            "1GiB",
            "--gpu-batch-size",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--gpu-batch-size cannot be combined with --policy auto"),
        "{stderr}"
    );
}

/// `--attn-sparsity` is not a placement flag: `--policy auto` keeps it, and the run equals the all-GPU sparse run.
#[test]
fn policy_auto_keeps_attention_sparsity() {
    let (dir, reference) = fixture("pre-ln-relu");
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], npy: &str| {
        let mut cmd = generate(&dir, &reference, tmp.path());
        cmd.args(["--attn-sparsity", "0.5", "--dump-logits"])
            .arg(tmp.path().join(npy))
            .args(extra);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let logits = strata_runtime::npy::read_f32(tmp.path().join(npy))
            .unwrap()
            .data;
        (v["generated_ids"].clone(), logits)
    };
    let (auto_ids, auto_logits) = run(&["--policy", "auto", "--gpu-mem", "1GiB"], "auto.npy");
    let (gpu_ids, gpu_logits) = run(&[], "gpu.npy");
    assert_eq!(auto_ids, gpu_ids);
    let diff = auto_logits
        .iter()
        .zip(&gpu_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-4,
        "auto vs all-GPU sparse logits differ by {diff}"
    );
    // Sparsity really applied: the dense reference's logits are elsewhere.
    let dense = strata_runtime::npy::read_f32(dir.join(reference["logits"].as_str().unwrap()))
        .unwrap()
        .data;
    let from_dense = auto_logits
        .iter()
        .zip(&dense)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(from_dense > 1e-3, "sparsity 0.5 left the logits dense");
}
