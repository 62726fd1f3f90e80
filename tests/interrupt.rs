//! Real signals on a real `strata` process: SIGINT, SIGTERM and SIGHUP while weights load, after the prefill, after a
//! decode step and while a packed checkpoint is written. Each must leave the offload directory empty, no `.part`
//! file, no packed file, and exit with 128 + the signal.
//!
//! The child runs with `STRATA_TEST_PAUSE_AT=PHASE`, which makes it announce on stderr when it reaches PHASE (its
//! files for that phase exist then) and wait there; the test sends the signal after the announcement.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{fixture, generate_command};

const SIGNALS: [(&str, i32); 3] = [("INT", 2), ("TERM", 15), ("HUP", 1)];

/// Everything left under `dir`, recursively.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.display().to_string());
            if path.is_dir() {
                out.extend(leftovers(&path));
            }
        }
    }
    out
}

/// Starts `cmd` paused at `phase`, waits for its announcement, sends SIG`signal` and returns its exit code and stderr.
fn interrupt(mut cmd: Command, phase: &str, signal: &str) -> (Option<i32>, String) {
    cmd.env("STRATA_TEST_PAUSE_AT", phase)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child: Child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("paused at") {
                let _ = tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let paused = rx.recv_timeout(Duration::from_secs(240)).is_ok();
    if !paused {
        let _ = child.kill();
    }
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(paused, "never reached {phase}:\n{text}");
    (status.code(), text)
}

#[test]
fn signals_during_load_prefill_and_decode_remove_the_offload_files() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    for phase in ["load", "prefill", "decode"] {
        for (signal, number) in SIGNALS {
            let offload = tempfile::tempdir().unwrap();
            let mut cmd = generate_command(&dir, &prompts, 4);
            // Everything on disk: weights, cache and activations all have files while the run is paused.
            cmd.args(["--percent", "0", "0", "0", "0", "0", "0", "--offload-dir"])
                .arg(offload.path());
            let (code, stderr) = interrupt(cmd, phase, signal);
            assert_eq!(
                code,
                Some(128 + number),
                "SIG{signal} at {phase}:\n{stderr}"
            );
            assert_eq!(
                leftovers(offload.path()),
                Vec::<String>::new(),
                "SIG{signal} at {phase} left files:\n{stderr}"
            );
        }
    }
}

#[test]
fn signals_while_writing_a_packed_checkpoint_leave_no_part_file() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    for (signal, number) in SIGNALS {
        let out = tempfile::tempdir().unwrap();
        let packed = out.path().join("model-q4.safetensors");
        let mut cmd = generate_command(&dir, &prompts, 2);
        cmd.args(["--compress-weight", "--packed-weights"])
            .arg(&packed);
        let (code, stderr) = interrupt(cmd, "packed-write", signal);
        assert_eq!(code, Some(128 + number), "SIG{signal}:\n{stderr}");
        assert_eq!(
            leftovers(out.path()),
            Vec::<String>::new(),
            "SIG{signal} while packing left files:\n{stderr}"
        );
    }
}
