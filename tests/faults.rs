//! Faults injected into real `strata` runs: a full disk and I/O errors at each kind of write (offload weights, KV
//! cache, activations, packed checkpoint, profile, logits), a file size limit (`ulimit -f`, a real EFBIG), the GPU
//! device lost halfway, SIGKILL and a rerun, and runs sharing an offload directory. Each ends in one clear error (or
//! a clean run), an empty offload directory, no `.part` file, and the tokens generated so far printed.
//!
//! Disk faults come from the test-only hook `STRATA_TEST_FAIL_WRITE=KIND:N[:ERROR]` (`strata_runtime::fault`): a real full
//! disk needs a small file system, which an unprivileged test cannot mount.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{fixture, generate_command};

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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The fixture `pre-ln-relu` (2 layers, 3 prompts) generating `new` tokens with everything (weights, cache,
/// activations) offloaded to `offload`.
fn all_on_disk(new: usize, offload: &Path) -> Command {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let mut cmd = generate_command(&dir, &prompts, new);
    cmd.args(["--percent", "0", "0", "0", "0", "0", "0", "--offload-dir"])
        .arg(offload);
    cmd
}

/// Runs `cmd`, expecting one clean failure: exit 1, no panic, one `error:` line. Returns (stdout, stderr).
fn fails(cmd: &mut Command) -> (String, String) {
    let out: Output = cmd.output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    (stdout, stderr)
}

/// The generated ids of a `--json` line.
fn generated(json_line: &str) -> Vec<Vec<u32>> {
    let value: serde_json::Value = serde_json::from_str(json_line.trim()).unwrap();
    serde_json::from_value(value["generated_ids"].clone()).unwrap()
}

/// The tokens of a clean run with everything on disk: what a failed run's partial output must be a prefix of.
fn clean_run(new: usize) -> Vec<Vec<u32>> {
    let offload = tempfile::tempdir().unwrap();
    let out = all_on_disk(new, offload.path()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(leftovers(offload.path()), Vec::<String>::new());
    generated(&text(&out.stdout))
}

/// Partial output: a JSON line whose sequences are each a non-empty prefix of the clean run's, shorter than it.
fn assert_partial(stdout: &str, clean: &[Vec<u32>]) {
    let partial = generated(stdout);
    assert_eq!(partial.len(), clean.len());
    for (p, c) in partial.iter().zip(clean) {
        assert!(
            !p.is_empty() && p.len() < c.len() && c.starts_with(p),
            "{p:?} is not a partial {c:?}"
        );
    }
}

#[test]
fn a_full_disk_or_an_io_error_at_each_offload_write_is_clean() {
    let new = 4;
    let clean = clean_run(new);
    // (kind, failing write): the first write of each kind, at load; and a cache write during decode (a run writes
    // 2 layers x 3 sequences x (k, v) = 12 cache files at load and as many row updates per step, so write 12 * 3 + 1
    // is in the third step), where the first tokens are already out.
    for (kind, nth, error) in [
        ("weights", 1, "enospc"),
        ("weights", 5, "eio"),
        ("cache", 1, "enospc"),
        ("activations", 1, "enospc"),
        ("activations", 2, "eio"),
        ("cache", 37, "enospc"),
        ("cache", 37, "eio"),
    ] {
        let offload = tempfile::tempdir().unwrap();
        let (stdout, stderr) = fails(
            all_on_disk(new, offload.path())
                .env("STRATA_TEST_FAIL_WRITE", format!("{kind}:{nth}:{error}")),
        );
        let said = match error {
            "enospc" => "disk full while writing",
            _ => "Input/output error",
        };
        assert!(stderr.contains(said), "{kind}:{nth}:{error}: {stderr}");
        assert_eq!(
            leftovers(offload.path()),
            Vec::<String>::new(),
            "{kind}:{nth}:{error} left files: {stderr}"
        );
        if nth == 37 {
            assert!(stderr.contains("generation stopped after"), "{stderr}");
            assert_partial(&stdout, &clean);
        } else {
            assert!(stdout.is_empty(), "{stdout}");
        }
    }
}

#[test]
fn a_file_size_limit_is_an_error_not_a_killed_process() {
    // A real EFBIG: `ulimit -f 8` (8 KiB) is below fc1's 16 KiB, and SIGXFSZ must not kill strata before it cleans
    // up.
    let offload = tempfile::tempdir().unwrap();
    let cmd = all_on_disk(2, offload.path());
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("ulimit -f 8 && exec \"$0\" \"$@\"")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let (_, stderr) = fails(&mut sh);
    assert!(
        stderr.contains("file size limit") && stderr.contains("ulimit -f"),
        "{stderr}"
    );
    assert_eq!(leftovers(offload.path()), Vec::<String>::new());
}

#[test]
fn failed_packed_profile_and_logits_writes_leave_no_part_file() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    for (error, said) in [("enospc", "No space left"), ("eio", "Input/output error")] {
        let out = tempfile::tempdir().unwrap();

        // The packed checkpoint: its third tensor cannot be written.
        let packed = out.path().join("model-q4.safetensors");
        let (_, stderr) = fails(
            generate_command(&dir, &prompts, 2)
                .args(["--compress-weight", "--packed-weights"])
                .arg(&packed)
                .env("STRATA_TEST_FAIL_WRITE", format!("packed:3:{error}")),
        );
        assert!(
            stderr.contains("model-q4.safetensors") && stderr.contains(said),
            "{stderr}"
        );
        assert_eq!(leftovers(out.path()), Vec::<String>::new());

        // The logits: the tokens are printed, no half array is left.
        let logits = out.path().join("logits.npy");
        let (stdout, stderr) = fails(
            generate_command(&dir, &prompts, 2)
                .arg("--dump-logits")
                .arg(&logits)
                .env("STRATA_TEST_FAIL_WRITE", format!("logits:1:{error}")),
        );
        assert!(
            stderr.contains("logits.npy")
                && stderr.contains(said)
                && stderr.contains("the tokens are above"),
            "{stderr}"
        );
        assert_eq!(generated(&stdout).len(), prompts.len());
        assert_eq!(leftovers(out.path()), Vec::<String>::new());

        // A profile (CPU and a small disk test only).
        let profile = out.path().join("profile.toml");
        let disk_test = tempfile::tempdir().unwrap();
        let (_, stderr) = fails(
            Command::new(env!("CARGO_BIN_EXE_strata"))
                .args([
                    "profile",
                    "--no-gpu",
                    "--disk-bytes",
                    "1MiB",
                    "--offload-dir",
                ])
                .arg(disk_test.path())
                .arg("--out")
                .arg(&profile)
                .env("STRATA_TEST_FAIL_WRITE", format!("profile:1:{error}")),
        );
        assert!(
            stderr.contains("profile.toml") && stderr.contains(said),
            "{stderr}"
        );
        assert_eq!(leftovers(out.path()), Vec::<String>::new());
        assert_eq!(leftovers(disk_test.path()), Vec::<String>::new());
    }
}

#[test]
fn a_lost_gpu_device_is_an_error_with_the_tokens_so_far() {
    let new = 4;
    let clean = clean_run(new);
    let offload = tempfile::tempdir().unwrap();
    let (stdout, stderr) =
        fails(all_on_disk(new, offload.path()).env("STRATA_TEST_LOSE_DEVICE_AT", "1"));
    assert!(
        stderr.contains("generation stopped after 2 tokens")
            && stderr.contains("the GPU device was lost"),
        "{stderr}"
    );
    assert_partial(&stdout, &clean);
    assert_eq!(leftovers(offload.path()), Vec::<String>::new(), "{stderr}");
    // Right after the prefill (the next step compiles new pipelines on the lost device), and while loading.
    let (stdout, stderr) =
        fails(all_on_disk(new, offload.path()).env("STRATA_TEST_LOSE_DEVICE_AT", "0"));
    assert!(
        stderr.contains("generation stopped after 1 tokens")
            && stderr.contains("the GPU device was lost"),
        "{stderr}"
    );
    assert_partial(&stdout, &clean);
    assert_eq!(leftovers(offload.path()), Vec::<String>::new(), "{stderr}");
    let (stdout, stderr) =
        fails(all_on_disk(new, offload.path()).env("STRATA_TEST_LOSE_DEVICE_AT", "load"));
    assert!(stderr.contains("the GPU device was lost"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(leftovers(offload.path()), Vec::<String>::new(), "{stderr}");
}

/// Starts `cmd` paused at `phase` and returns it once it announced the pause (its files exist then).
fn start_paused(mut cmd: Command, phase: &str, stdout: Stdio) -> std::process::Child {
    cmd.env("STRATA_TEST_PAUSE_AT", phase)
        .stdout(stdout)
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
    if rx.recv_timeout(Duration::from_secs(240)).is_err() {
        let _ = child.kill();
        panic!("never reached {phase}");
    }
    child
}

/// The run directories in `dir`.
fn run_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    runs.sort();
    runs
}

#[test]
fn a_killed_runs_files_are_removed_by_the_next_run_which_says_so() {
    let offload = tempfile::tempdir().unwrap();
    // A live run paused in the directory, which must survive every sweep.
    let mut live = start_paused(all_on_disk(3, offload.path()), "decode", Stdio::null());
    let live_dir = run_dirs(offload.path());
    assert_eq!(live_dir.len(), 1);
    let live_files = leftovers(&live_dir[0]);
    // SIGKILL at decode: nothing runs in the victim, so every offload file stays.
    let mut victim = start_paused(all_on_disk(3, offload.path()), "decode", Stdio::null());
    victim.kill().unwrap();
    victim.wait().unwrap();
    let dead: Vec<PathBuf> = run_dirs(offload.path())
        .into_iter()
        .filter(|d| d != &live_dir[0])
        .collect();
    assert_eq!(dead.len(), 1, "{:?}", leftovers(offload.path()));
    let files = leftovers(&dead[0]).len() - 1; // less the owner record
    assert!(files > 10, "{:?}", leftovers(offload.path()));

    let out = all_on_disk(3, offload.path()).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("removed {files} offload files"))
            && stderr.contains("did not finish")
            && stderr.contains(&format!("pid {}", victim.id())),
        "{stderr}"
    );
    assert_eq!(stderr.matches("removed").count(), 1, "{stderr}");
    assert!(!dead[0].exists());
    assert_eq!(
        leftovers(&live_dir[0]),
        live_files,
        "a live run was touched"
    );

    // The live run ends normally once its pause is over... or by a signal: either way the directory ends empty.
    Command::new("kill")
        .arg("-TERM")
        .arg(live.id().to_string())
        .status()
        .unwrap();
    live.wait().unwrap();
    assert_eq!(leftovers(offload.path()), Vec::<String>::new());
}

#[test]
fn a_dead_packed_write_is_replaced_and_named() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let out = tempfile::tempdir().unwrap();
    let packed = out.path().join("model-q4.safetensors");
    let packing = || {
        let mut cmd = generate_command(&dir, &prompts, 2);
        cmd.args(["--compress-weight", "--packed-weights"])
            .arg(&packed);
        cmd
    };
    let mut victim = start_paused(packing(), "packed-write", Stdio::null());
    victim.kill().unwrap();
    victim.wait().unwrap();
    let part = out.path().join("model-q4.safetensors.part");
    assert!(part.exists());
    let done = packing().output().unwrap();
    let stderr = text(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains("model-q4.safetensors.part") && stderr.contains("did not finish"),
        "{stderr}"
    );
    assert!(packed.exists() && !part.exists());
}

#[test]
fn two_runs_with_the_same_pid_share_an_offload_dir() {
    // `unshare -pf` runs each strata as PID 1 of a PID namespace of its own, as containers do. It needs root (CI and
    // the developers' machines run as root); elsewhere the in-process test of `tiers::disk` covers the same rule.
    if !Command::new("unshare")
        .args(["-pf", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("unshare -pf is not available here: the same-PID case is not run");
        return;
    }
    let new = 3;
    let clean = clean_run(new);
    let offload = tempfile::tempdir().unwrap();
    let in_namespace = |cmd: Command| {
        let mut ns = Command::new("unshare");
        ns.arg("-pf").arg(cmd.get_program()).args(cmd.get_args());
        ns
    };
    // A pauses for 3 s at decode with every file on disk; B runs whole meanwhile in the same directory.
    let mut a = in_namespace(all_on_disk(new, offload.path()));
    a.env("STRATA_TEST_PAUSE_SECS", "3");
    let a = start_paused(a, "decode", Stdio::piped());
    let runs = run_dirs(offload.path());
    assert_eq!(runs.len(), 1);
    assert!(std::fs::read_to_string(runs[0].join("owner.lock"))
        .unwrap()
        .starts_with("pid 1,"));
    let b = in_namespace(all_on_disk(new, offload.path()))
        .output()
        .unwrap();
    let b_err = text(&b.stderr);
    assert!(b.status.success(), "{b_err}");
    assert!(!b_err.contains("removed"), "{b_err}");
    assert_eq!(generated(&text(&b.stdout)), clean);
    let a = a.wait_with_output().unwrap();
    assert!(a.status.success());
    assert_eq!(generated(&text(&a.stdout)), clean);
    assert_eq!(leftovers(offload.path()), Vec::<String>::new());
}
