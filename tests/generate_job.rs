//! `strata generate --input jobs.jsonl --output results.jsonl` on the pre-ln-relu fixture: a job of mixed prompt
//! lengths and token counts gives each id exactly the greedy tokens of a single run (transformers' reference, and
//! one real single run); SIGINT and SIGKILL mid-job, then a rerun, complete it with every id once and identical
//! results; a torn last line is repaired.
#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fixture, generate_command};
use serde_json::{json, Value};

/// (id, prompt index, max_new_tokens): three blocks of two at --gpu-batch-size 2, each mixing lengths.
const ITEMS: [(&str, usize, usize); 6] = [
    ("a", 0, 8),
    ("b", 1, 4),
    ("c", 2, 8),
    ("d", 1, 8),
    ("e", 0, 6),
    ("f", 2, 2),
];

fn write_job(dir: &Path, prompts: &[Vec<u32>]) -> PathBuf {
    let path = dir.join("jobs.jsonl");
    let mut text = String::new();
    for (id, p, n) in ITEMS {
        text += &json!({"id": id, "prompt_ids": prompts[p], "max_new_tokens": n}).to_string();
        text += "\n";
    }
    // A numeric id, and a blank line (skipped).
    text += &format!("\n{}\n", json!({"id": 7, "prompt_ids": prompts[0]}));
    std::fs::write(&path, text).unwrap();
    path
}

fn job_command(model: &Path, input: &Path, output: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["generate", "--model"])
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args([
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--gpu-batch-size",
            "2",
        ]);
    cmd
}

/// The output's lines by id; every id must appear once.
fn results(output: &Path) -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(output).unwrap();
    let mut by_id = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let previous = by_id.insert(v["id"].to_string(), v);
        assert!(previous.is_none(), "an id twice in:\n{text}");
    }
    by_id
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// Runs the job paused after its first block, sends `signal`, and returns the exit code.
fn interrupted(mut cmd: Command, signal: &str) -> Option<i32> {
    cmd.env("STRATA_TEST_PAUSE_AT", "job-block")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("paused at") {
                let _ = tx.send(());
            }
        }
    });
    let paused = rx.recv_timeout(Duration::from_secs(240)).is_ok();
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(paused && sent.success(), "the job never paused");
    child.wait().unwrap().code()
}

#[test]
fn a_mixed_job_equals_single_runs_and_survives_interruption() {
    let (model, prompts, _) = fixture("pre-ln-relu");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(model.join("reference.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = write_job(tmp.path(), &prompts);

    let full = tmp.path().join("full.jsonl");
    run_ok(&mut job_command(&model, &input, &full));
    let want = results(&full);
    assert_eq!(want.len(), 7);
    for (id, p, n) in ITEMS.iter().copied().chain([("7", 0, 8)]) {
        let key = if id == "7" {
            "7".to_string()
        } else {
            format!("\"{id}\"")
        };
        let got = &want[&key];
        let expected: Vec<Value> = reference["generated_ids"][p].as_array().unwrap()[..n].to_vec();
        assert_eq!(got["generated_ids"], json!(expected), "id {id}");
        assert_eq!(got["prompt_ids"], json!(prompts[p]));
        assert_eq!(got["finish_reason"], "length");
        assert_eq!(got["schema_version"], 1);
    }
    // One real single run of the same prompt and length.
    let single = generate_command(&model, &prompts[1..2], 4)
        .output()
        .unwrap();
    let single: Value = serde_json::from_slice(&single.stdout).unwrap();
    assert_eq!(single["generated_ids"][0], want["\"b\""]["generated_ids"]);
    // Rerunning a finished job does nothing.
    let again = run_ok(&mut job_command(&model, &input, &full));
    assert!(again.contains("nothing to do"), "{again}");
    assert_eq!(results(&full), want);

    for (signal, code) in [("INT", Some(130)), ("KILL", None)] {
        let output = tmp.path().join(format!("{signal}.jsonl"));
        let status = interrupted(job_command(&model, &input, &output), signal);
        assert_eq!(status, code, "SIG{signal}");
        assert_eq!(
            results(&output).len(),
            2,
            "SIG{signal}: the first block, whole"
        );
        if signal == "KILL" {
            // What a kill in the middle of a write leaves.
            let mut text = std::fs::read_to_string(&output).unwrap();
            text += "{\"schema_version\":1,\"id\":\"c\",\"prompt_ids\":[2,";
            std::fs::write(&output, text).unwrap();
        }
        let resumed = run_ok(&mut job_command(&model, &input, &output));
        assert!(resumed.contains("resuming: 2 of 7"), "{resumed}");
        if signal == "KILL" {
            assert!(resumed.contains("torn line"), "{resumed}");
        }
        assert_eq!(results(&output), want, "SIG{signal}");
    }
}

#[test]
fn bad_job_lines_are_named_before_the_gpu_opens() {
    let (model, _, _) = fixture("pre-ln-relu");
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("jobs.jsonl");
    let output = tmp.path().join("out.jsonl");
    for (line, message) in [
        ("{\"prompt_ids\":[2]}", "line 1: `id`"),
        ("{\"id\":1}", "`prompt` or `prompt_ids` is required"),
        (
            "{\"id\":1,\"prompt\":\"hi\"}",
            "needs the model's tokenizer",
        ),
        ("{\"id\":1,\"prompt_ids\":[2,999]}", "token id 999"),
        (
            "{\"id\":1,\"prompt_ids\":[2],\"temperature\":-1}",
            "temperature -1",
        ),
        (
            "{\"id\":1,\"prompt_ids\":[2]}\n{\"id\":1,\"prompt_ids\":[2]}",
            "appears twice",
        ),
        ("[1]", "expected a JSON object"),
    ] {
        std::fs::write(&input, line).unwrap();
        let out = job_command(&model, &input, &output).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(message),
            "{line}: {err}"
        );
        assert!(!err.contains("llvmpipe"), "the GPU was opened first: {err}");
    }
}
