//! Pipeline parallelism over MPI (issue 17): `mpirun -np N strata generate --pipeline` on one machine (lavapipe)
//! reproduces the single-process run (greedy ids equal, logits equal: every stage runs the same kernels on the same
//! GPU batches, and hidden rows cross as the bytes the single process keeps), with several micro-batches and with
//! offloading inside a stage; a rank that dies or hangs ends every rank within a bounded time, with an error naming
//! it, and the surviving ranks remove their offload files.
//!
//! Run with `cargo test --features mpi --test pipeline -- --test-threads=1` (needs Open MPI's `mpirun`; one pipeline
//! at a time, as the failure tests time themselves).
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{fixture, generate_command, max_abs_diff};

/// `mpirun -np RANKS` of `cmd` (its program, arguments and environment), as root and on more ranks than cores.
fn mpirun(ranks: usize, cmd: &Command) -> Command {
    let mut mpi = Command::new("mpirun");
    mpi.args(["--oversubscribe", "--allow-run-as-root", "-np"])
        .arg(ranks.to_string());
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            // Open MPI forwards only the variables named with -x.
            mpi.env(key, value).arg("-x").arg(key);
        }
    }
    // Containers forbid the cross-memory attach of Open MPI's shared-memory transport.
    mpi.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    mpi.arg(cmd.get_program()).args(cmd.get_args());
    mpi
}

fn run_ok(mut cmd: Command, what: &str) -> (serde_json::Value, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // One JSON document, printed by the last stage only.
    let docs: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(
        docs.len(),
        1,
        "{what}: one JSON document expected:\n{stdout}"
    );
    (serde_json::from_str(docs[0]).unwrap(), stderr)
}

/// Runs `flags` on fixture-like `dir` alone and as a pipeline of `ranks`, and holds the pipeline's ids and logits to
/// the single process's.
fn pipeline_matches_single(
    ranks: usize,
    dir: &Path,
    prompts: &[Vec<u32>],
    new: usize,
    flags: &[&str],
) {
    let tmp = tempfile::tempdir().unwrap();
    let (single_npy, piped_npy) = (tmp.path().join("single.npy"), tmp.path().join("piped.npy"));
    let mut single = generate_command(dir, prompts, new);
    single.args(flags).arg("--dump-logits").arg(&single_npy);
    let (single_json, _) = run_ok(single, "the single process");
    let mut stage = generate_command(dir, prompts, new);
    stage
        .args(flags)
        .arg("--pipeline")
        .arg("--dump-logits")
        .arg(&piped_npy);
    let (piped_json, stderr) = run_ok(mpirun(ranks, &stage), "the pipeline");
    // Every rank ran its own share of the layers.
    for r in 0..ranks {
        assert!(
            stderr.contains(&format!("rank {r} of {ranks}: layers")),
            "{stderr}"
        );
    }
    assert_eq!(piped_json["generated_ids"], single_json["generated_ids"]);
    let a = strata_runtime::npy::read_f32(&single_npy).unwrap();
    let b = strata_runtime::npy::read_f32(&piped_npy).unwrap();
    assert_eq!(a.shape, b.shape);
    let diff = max_abs_diff(&a.data, &b.data);
    assert!(diff <= 1e-6, "logits differ by {diff}");
}

#[test]
fn two_ranks_reproduce_the_single_process_on_the_fixtures_with_micro_batches() {
    for name in ["pre-ln-relu", "post-ln-proj", "gelu-no-bias", "f16"] {
        let (dir, prompts, new) = fixture(name);
        // One sequence per GPU batch: as many micro-batches as prompts flow through the stages.
        let batches = prompts.len().to_string();
        pipeline_matches_single(
            2,
            &dir,
            &prompts,
            new,
            &["--gpu-batch-size", "1", "--num-gpu-batches", &batches],
        );
    }
}

#[test]
fn two_ranks_reproduce_sampling_and_cpu_attention() {
    let (dir, prompts, new) = fixture("trained");
    let batches = prompts.len().to_string();
    let micro = ["--gpu-batch-size", "1", "--num-gpu-batches", &batches];
    // The last stage draws over every batch's rows at once, as a single process does (the GPU's top-p draw is
    // keyed by row); top-k and a repetition penalty choose on its host.
    let gpu_draw = ["--temperature", "0.9", "--top-p", "0.9", "--seed", "11"];
    let host_draw = [
        "--temperature",
        "0.8",
        "--top-k",
        "5",
        "--repetition-penalty",
        "1.3",
        "--seed",
        "5",
    ];
    for sampling in [&gpu_draw[..], &host_draw[..]] {
        pipeline_matches_single(2, &dir, &prompts, new, &[&micro[..], sampling].concat());
    }
    // Decode attention on the CPU over a CPU-resident cache, inside each stage.
    let cpu_attention = [
        "--percent",
        "100",
        "0",
        "0",
        "100",
        "100",
        "0",
        "--cpu-cache-compute",
    ];
    pipeline_matches_single(
        2,
        &dir,
        &prompts,
        new,
        &[&micro[..], &cpu_attention[..]].concat(),
    );
}

#[test]
fn three_ranks_reproduce_the_single_process_with_offloading_inside_the_stages() {
    // Four layers over three stages; weights, cache and activations partly on the CPU and on disk.
    let (dir, prompts, new) = fixture("trained");
    let offload = tempfile::tempdir().unwrap();
    let batches = prompts.len().div_ceil(2).to_string();
    let flags = [
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        &batches,
        "--percent",
        "20",
        "40",
        "0",
        "50",
        "50",
        "50",
        "--offload-dir",
        offload.path().to_str().unwrap(),
    ];
    pipeline_matches_single(3, &dir, &prompts, new, &flags);
    assert_eq!(
        run_dirs(offload.path()),
        0,
        "every rank removed its offload files"
    );
}

#[test]
fn three_ranks_of_dummy_opt_125m_reproduce_the_single_process() {
    let prompts = vec![
        vec![2, 100, 200, 300],
        vec![2, 7, 8],
        vec![2, 5000, 6000, 7000, 8000],
    ];
    let model = Path::new("opt-125m");
    let offload = tempfile::tempdir().unwrap();
    let flags = [
        "--dummy",
        "--gpu-batch-size",
        "1",
        "--num-gpu-batches",
        "3",
        "--percent",
        "50",
        "50",
        "100",
        "0",
        "100",
        "0",
        "--offload-dir",
        offload.path().to_str().unwrap(),
    ];
    pipeline_matches_single(3, model, &prompts, 3, &flags);
}

/// Offload run directories left in `dir`.
fn run_dirs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("strata-run-")
        })
        .count()
}

/// Runs a 2-rank pipeline with a fault at rank 1 and returns its output and how long it took.
fn faulty_run(fault: &str, offload: &Path) -> (Output, Duration) {
    let (dir, prompts, _) = fixture("trained");
    let mut stage = generate_command(&dir, &prompts[..2], 12);
    stage
        .args(["--gpu-batch-size", "1", "--num-gpu-batches", "2"])
        .args([
            "--percent",
            "100",
            "0",
            "0",
            "0",
            "100",
            "0",
            "--offload-dir",
        ])
        .arg(offload)
        .args(["--pipeline", "--pipeline-timeout", "5"])
        .env("STRATA_TEST_PIPELINE_FAULT", fault);
    let started = Instant::now();
    let out = mpirun(2, &stage).output().unwrap();
    (out, started.elapsed())
}

#[test]
fn a_rank_killed_mid_run_ends_the_others_with_an_error_naming_it() {
    let offload = tempfile::tempdir().unwrap();
    let (out, took) = faulty_run("1:3:die", offload.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(120), "took {took:?}:\n{stderr}");
    // The launcher names the rank that died.
    assert!(
        stderr.contains("process rank 1") && stderr.contains("exited on signal"),
        "{stderr}"
    );
    // The survivor removed its run directory; the dead rank's stays (nothing ran to remove it) until the next run
    // in that directory removes it.
    assert!(run_dirs(offload.path()) <= 1, "{stderr}");
    let (dir, prompts, _) = fixture("trained");
    let mut next = generate_command(&dir, &prompts[..1], 1);
    next.args([
        "--percent",
        "100",
        "0",
        "0",
        "0",
        "100",
        "0",
        "--offload-dir",
    ])
    .arg(offload.path());
    run_ok(next, "the next run");
    assert_eq!(run_dirs(offload.path()), 0);
}

#[test]
fn a_hung_rank_times_out_and_ends_every_rank_with_an_error_naming_it() {
    let offload = tempfile::tempdir().unwrap();
    let (out, took) = faulty_run("1:3:hang", offload.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(120), "took {took:?}:\n{stderr}");
    assert!(
        stderr.contains("error: pipeline rank 0 of 2 failed")
            && stderr.contains("no token ids from rank 1 within 5 s"),
        "{stderr}"
    );
    assert_eq!(run_dirs(offload.path()), 0, "{stderr}");
}

#[test]
fn bench_reports_stages_bubbles_bytes_and_throughput() {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_strata"));
    bench.args([
        "bench",
        "--model",
        "opt-125m",
        "--dummy",
        "--prompt-len",
        "8",
        "--gen-len",
        "3",
        "--gpu-batch-size",
        "1",
        "--num-gpu-batches",
        "2",
        "--json",
        "--pipeline",
    ]);
    let (v, stderr) = run_ok(mpirun(2, &bench), "bench --pipeline");
    let stages = v["pipeline"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{stderr}");
    assert_eq!(stages[0]["layers"], serde_json::json!([0, 6]));
    assert_eq!(stages[1]["layers"], serde_json::json!([6, 12]));
    // Stage 0 sends each step's hidden rows of both micro-batches (8 tokens, then one per step, hidden 768, in
    // the activation dtype: halves for opt-125m's f16 weights on a device with shader-f16, else f32), stage 1 the
    // ids of both sequences to stage 0 after each step.
    let rows: u64 = (8 + 1 + 1) * 2 * 768;
    let hidden = stages[0]["sent_bytes"].as_u64().unwrap();
    assert!(hidden == rows * 2 || hidden == rows * 4, "{hidden}");
    assert_eq!(stages[1]["sent_bytes"], 3 * 2 * 4);
    assert_eq!(v["pipeline"]["bytes_between_stages"], hidden + 3 * 2 * 4);
    for s in stages {
        let bubble = s["bubble_fraction"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&bubble), "{s}");
    }
    assert!(v["tokens_per_s"]["total"].as_f64().unwrap() > 0.0);
}
