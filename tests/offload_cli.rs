//! `strata generate` with policy flags: an offloaded run through the CLI gives the tokens Hugging Face's greedy
//! generate produced for the fixture, and removes its offload files.

use std::path::Path;
use std::process::Command;

#[test]
fn generate_with_offloading_flags_matches_the_reference_tokens() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/post-ln-proj");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
    let offload = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["generate", "--model"]).arg(&dir);
    for p in &prompts {
        let ids: Vec<String> = p.iter().map(u32::to_string).collect();
        cmd.args(["--prompt-ids", &ids.join(",")]);
    }
    let new = reference["max_new_tokens"].as_u64().unwrap().to_string();
    cmd.args(["--max-new-tokens", &new, "--ignore-eos", "--json"])
        .args([
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
