//! What a new user's mistakes and a hostile environment do to `strata`: every one ends in a clear error (or a quiet
//! exit) that names the thing, the reason and what to do; none panics, allocates without bound or loses work.

mod common;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fixture, generate_command};

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd`, expecting a failure whose stderr has no panic and one `error:` line; returns that stderr.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    text
}

/// The fixture `pre-ln-relu` (context 64 tokens) generating `new` tokens from its prompts.
fn small(new: usize) -> Command {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    generate_command(&dir, &prompts, new)
}

/// The fixture `pre-ln-relu` with `--max-new-tokens` as typed.
fn small_typed(new: &str) -> Command {
    let (dir, _, _) = fixture("pre-ln-relu");
    let mut cmd = strata();
    cmd.args(["generate", "--model"]).arg(dir).args([
        "--prompt-ids",
        "2,3",
        "--max-new-tokens",
        new,
    ]);
    cmd
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let mut child = small(2)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `strata generate ... | true`: the reader is gone before anything is written.
    drop(child.stdout.take());
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(matches!(status.code(), Some(0 | 141)), "{status:?}: {text}");
    assert!(
        !text.contains("panicked") && !text.contains("error"),
        "{text}"
    );
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    let started = Instant::now();
    let text = fails(&mut small_typed("18446744073709551615"));
    assert!(
        text.contains("--max-new-tokens 18446744073709551615")
            && text.contains("context of 64 tokens"),
        "{text}"
    );
    let bench = |flags: &[&str]| {
        let mut cmd = strata();
        cmd.args([
            "bench",
            "--model",
            "opt-125m",
            "--prompt-len",
            "8",
            "--gen-len",
            "2",
        ])
        .args(flags);
        fails(&mut cmd)
    };
    let text = bench(&[
        "--gpu-batch-size",
        "18446744073709551615",
        "--num-gpu-batches",
        "2",
    ]);
    assert!(text.contains("lower --gpu-batch-size"), "{text}");
    // 2^33 sequences: countable, but far more than one placement lists; refused before it is built.
    let text = bench(&["--gpu-batch-size", "8589934592"]);
    assert!(
        text.contains("8589934592 sequences in one block")
            && text.contains("lower --gpu-batch-size"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "refusals must not load the model"
    );
}

#[test]
fn a_model_larger_than_this_machine_is_refused_with_the_numbers() {
    // opt-175b needs 326 GiB in f16: no CI machine holds it, so the refusal comes before any weight is read (before
    // this check, opt-13b grew past 14 GB and was killed by the kernel on a 24 GB machine).
    let started = Instant::now();
    let text = fails(strata().args([
        "generate",
        "--model",
        "opt-175b",
        "--dummy",
        "--prompt-ids",
        "2,3",
        "--max-new-tokens",
        "2",
    ]));
    assert!(
        text.contains("memory: the plan needs 3") && text.contains("--percent"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // opt-13b (24 GiB in f16) where it does not fit either, as on the 24 GB machines CI runs on.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(u64::MAX);
    if available_kib < 24 << 20 {
        let text = fails(strata().args([
            "generate",
            "--model",
            "opt-13b",
            "--dummy",
            "--prompt-ids",
            "2,3",
            "--max-new-tokens",
            "2",
        ]));
        assert!(text.contains("memory: the plan needs 2"), "{text}");
    }
}

#[test]
fn output_paths_are_checked_before_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir/logits.npy");
    let text = fails(small(2).arg("--dump-logits").arg(&missing));
    assert!(
        text.contains("--dump-logits") && text.contains("does not exist"),
        "{text}"
    );
    assert!(
        !text.contains("llvmpipe") && !text.contains(" on "),
        "the GPU was opened first: {text}"
    );
    let text = fails(
        strata()
            .args(["profile", "--no-gpu", "--out"])
            .arg(&missing),
    );
    assert!(
        text.contains("--out") && text.contains("does not exist"),
        "{text}"
    );
}

#[test]
fn tokens_are_printed_even_when_the_logits_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    // The directory exists when the run starts and is gone when it ends.
    let mut child = small(3)
        .arg("--dump-logits")
        .arg(out_dir.join("logits.npy"))
        .env("STRATA_TEST_PAUSE_AT", "decode")
        .env("STRATA_TEST_PAUSE_SECS", "3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("paused at") {
        assert_eq!(
            err.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(byte[0]);
    }
    std::fs::remove_dir(&out_dir).unwrap();
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert_eq!(out.status.code(), Some(1), "{rest}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference = {
        let out = small(3).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(json["generated_ids"], reference["generated_ids"]);
    assert!(
        rest.contains("writing the logits") && rest.contains("the tokens are above"),
        "{rest}"
    );
}

#[test]
fn a_built_in_name_wins_over_a_directory_unless_given_as_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let shadow = tmp.path().join("opt-125m");
    std::fs::create_dir(&shadow).unwrap();
    let (dir, _, _) = fixture("pre-ln-relu");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(file), shadow.join(file)).unwrap();
    }
    let run = |arg: &str, extra: &[&str]| {
        let mut cmd = strata();
        cmd.current_dir(tmp.path())
            .args(["generate", "--model", arg, "--prompt-ids", "2,3"])
            .args(["--max-new-tokens", "3000"])
            .args(extra);
        fails(&mut cmd)
    };
    // 3000 new tokens: beyond both contexts (the name's 2048, the directory's 64), so the refusal says which model
    // the argument resolved to, before any weight is read.
    for extra in [&["--dummy"][..], &[][..]] {
        let text = run("opt-125m", extra);
        assert!(!text.contains("context of 64"), "{extra:?}: {text}");
    }
    assert!(run("opt-125m", &["--dummy"]).contains("context of 2048 tokens"));
    for extra in [&["--dummy"][..], &[][..]] {
        let text = run("./opt-125m", extra);
        assert!(text.contains("context of 64 tokens"), "{extra:?}: {text}");
    }
}

#[test]
fn weights_of_another_architecture_are_refused_naming_both() {
    let (dir, _, _) = fixture("pre-ln-relu");
    let text = fails(
        strata()
            .args(["generate", "--model", "opt-125m", "--weights"])
            .arg(&dir)
            .args(["--prompt-ids", "2,3", "--max-new-tokens", "1"]),
    );
    assert!(
        text.contains("--model opt-125m")
            && text.contains(&dir.display().to_string())
            && text.contains("hidden_size 768 vs 32"),
        "{text}"
    );
}

#[test]
fn broken_checkpoints_say_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(dir.join("config.json"), model.join("config.json")).unwrap();
    // Random bytes where the weights should be: not a safetensors file, not a truncated one.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    std::fs::write(model.join("model.safetensors"), &noise).unwrap();
    let text = fails(&mut generate_command(&model, &prompts, 1));
    assert!(
        text.contains("not a safetensors file") && !text.contains("truncated"),
        "{text}"
    );
    // One tensor's offsets one element too long: the error names it.
    let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "model.decoder.layers.0.fc1.weight";
    let end = header[name]["data_offsets"][1].as_u64().unwrap();
    header[name]["data_offsets"][1] = (end + 4).into();
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut edited = (json.len() as u64).to_le_bytes().to_vec();
    edited.extend_from_slice(&json);
    edited.extend_from_slice(&bytes.split_off(8 + n));
    std::fs::write(model.join("model.safetensors"), edited).unwrap();
    let text = fails(&mut generate_command(&model, &prompts, 1));
    assert!(text.contains(&format!("tensor `{name}`")), "{text}");
    // config.json that is a directory: the OS error once, not twice.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(odd.join("config.json")).unwrap();
    let text = fails(
        strata()
            .args(["generate", "--model", "opt-125m", "--weights"])
            .arg(&odd)
            .args(["--prompt-ids", "2", "--max-new-tokens", "1"]),
    );
    assert_eq!(text.matches("os error").count(), 1, "{text}");
}

#[test]
fn bad_values_are_reported_as_typed() {
    // A usage error (clap's status 2) that quotes the value, not "unexpected argument '-1'".
    let out = small_typed("-10").output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("'-10'") && !text.contains("'-1'"), "{text}");
}

#[test]
fn bad_prompts_and_sampling_are_refused_before_the_gpu_opens() {
    let (dir, _, _) = fixture("pre-ln-relu");
    let run = |flags: &[&str]| {
        let mut cmd = strata();
        cmd.args(["generate", "--model"])
            .arg(&dir)
            .args(["--max-new-tokens", "2"])
            .args(flags);
        let text = fails(&mut cmd);
        assert!(
            !text.contains("llvmpipe"),
            "the GPU was opened first: {text}"
        );
        text
    };
    let text = run(&["--prompt-ids", "2,999"]);
    assert!(
        text.contains("token id 999 at position 1") && text.contains("256"),
        "{text}"
    );
    // 0 is greedy (the OpenAI convention); a negative temperature is refused.
    let text = run(&["--prompt-ids", "2", "--temperature", "-1"]);
    assert!(text.contains("--temperature -1"), "{text}");
    let text = run(&["--prompt-ids", "2", "--repetition-penalty", "0"]);
    assert!(text.contains("--repetition-penalty 0"), "{text}");
    let text = run(&["--prompt-ids", "2", "--stop", "x"]);
    assert!(
        text.contains("--stop needs the model's tokenizer"),
        "{text}"
    );
    let text = run(&["--prompt-ids", "2", "--top-p", "1.5"]);
    assert!(text.contains("--top-p 1.5"), "{text}");
}

#[test]
fn a_bad_wgpu_backend_is_named() {
    let text = fails(small(1).env("WGPU_BACKEND", "banana"));
    assert!(
        text.contains("WGPU_BACKEND=banana") && text.contains("vulkan"),
        "{text}"
    );
}

#[test]
fn a_good_run_without_xdg_runtime_dir_prints_no_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = small(2)
        .env_remove("XDG_RUNTIME_DIR")
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("error"), "{text}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_built_in_name_without_weights_needs_an_explicit_dummy() {
    // generate and serve print the model's text: synthetic weights only when asked for.
    for command in [
        &[
            "generate",
            "--model",
            "opt-125m",
            "--prompt-ids",
            "2,3",
            "--max-new-tokens",
            "1",
        ][..],
        &["serve", "--model", "opt-125m", "--port", "0"][..],
    ] {
        let text = fails(strata().args(command));
        assert!(
            text.contains("`opt-125m` is a built-in model")
                && text.contains("--weights DIR")
                && text.contains("--dummy"),
            "{command:?}: {text}"
        );
    }
}

#[test]
fn pipeline_without_mpi_or_a_launcher_says_how_to_build_or_launch() {
    let text = fails(small(1).arg("--pipeline"));
    assert!(
        text.contains("mpirun -np 2 strata generate --pipeline"),
        "{text}"
    );
    // A plain build has no MPI: it names the feature to build with.
    #[cfg(not(feature = "mpi"))]
    assert!(text.contains("--features mpi"), "{text}");
    let text = fails(strata().args(["bench", "--model", "opt-125m", "--dummy", "--pipeline"]));
    assert!(
        text.contains("mpirun -np 2 strata bench --pipeline"),
        "{text}"
    );
}
