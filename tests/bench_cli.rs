//! `strata bench --json` on a tiny committed checkpoint: every FlexLLMGen figure present and consistent with the
//! workload, offload files removed afterwards, and bad policies refused with the flag to change.

use std::path::Path;
use std::process::Command;

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pre-ln-relu")
        .to_string_lossy()
        .into_owned()
}

/// `strata bench --model <model> --prompt-len <prompt_len> --gen-len <gen_len>`, more arguments to follow.
fn bench(model: &str, prompt_len: u32, gen_len: u32) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["bench", "--model", model])
        .args(["--prompt-len", &prompt_len.to_string()])
        .args(["--gen-len", &gen_len.to_string()]);
    cmd
}

/// Runs `cmd`, which must fail; returns its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_no_files_left(offload_dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(offload_dir).unwrap().collect();
    assert!(left.is_empty(), "offload files left behind: {left:?}");
}

#[test]
fn bench_json_reports_every_figure_consistently() {
    let offload = tempfile::tempdir().unwrap();
    // A fixed profile (FlexLLMGen's T4 constants) for the ceiling and the prediction, whatever this machine cached.
    let profile_dir = tempfile::tempdir().unwrap();
    let profile_path = profile_dir.path().join("t4.toml");
    let t4 = strata_runtime::hardware::HardwareProfile::t4();
    t4.save(&profile_path).unwrap();
    let out = bench(&fixture(), 6, 4)
        .arg("--json")
        .args("--percent 30 40 0 100 50 0 --gpu-batch-size 2 --num-gpu-batches 2".split(' '))
        .arg("--offload-dir")
        .arg(offload.path())
        .arg("--pcie-profile")
        .arg(&profile_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let f = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    };
    assert_eq!(f("prompts"), 4.0);
    let (prefill, decode) = (f("prefill_latency_s"), f("decode_latency_s"));
    assert!(prefill > 0.0 && decode > 0.0);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    assert!(close(f("prefill_throughput_tok_s"), 4.0 * 6.0 / prefill));
    assert!(close(f("decode_throughput_tok_s"), 4.0 * 3.0 / decode));
    assert!(close(
        f("total_throughput_tok_s"),
        4.0 * 4.0 / (prefill + decode)
    ));
    assert!(close(f("total_latency_s"), prefill + decode));
    // The config's own formulas (FlexLLMGen's): 4 prompts of 6 + 4 positions.
    let config = strata_runtime::checkpoint::read_config(Path::new(&fixture())).unwrap();
    assert_eq!(v["model_bytes"].as_u64(), Some(config.model_bytes()));
    assert_eq!(v["cache_bytes"].as_u64(), Some(config.cache_bytes(4, 10)));
    assert_eq!(v["hidden_bytes"].as_u64(), Some(config.hidden_bytes(4, 10)));
    // The plan is the allocation: every tier's peak, as the runtime recorded each buffer where it made it, is the
    // placement's, and the tiers' own counters and the resident weights agree.
    let peak = &v["peak_bytes"];
    let u = |x: &serde_json::Value| x.as_u64().unwrap_or_else(|| panic!("not a count in {v}"));
    for tier in ["gpu", "cpu", "disk"] {
        assert_eq!(
            u(&peak[tier]),
            u(&v["planned_peak_bytes"][tier]),
            "{tier} in {v}"
        );
    }
    for tier in ["cpu", "disk"] {
        assert_eq!(u(&v["tier_peak_bytes"][tier]), u(&peak[tier]), "{v}");
    }
    assert_eq!(u(&peak["gpu_weights"]), u(&v["planned_gpu_weights"]), "{v}");
    assert_eq!(u(&peak["gpu_pool"]), u(&v["planned_gpu_pool_slots"]), "{v}");
    // Half the activations on the GPU: one sequence's 6 prompt rows in each of the 2 GPU batches, in the pool.
    let hidden = config.hidden_size as u64;
    assert!(u(&peak["gpu_pool"]) >= 2 * 6 * hidden * 4, "{v}");
    // Weights, cache and activations went to CPU and disk.
    assert!(v["peak_bytes"]["cpu"].as_u64().unwrap() > 0, "{v}");
    assert!(v["peak_bytes"]["disk"].as_u64().unwrap() > 0, "{v}");
    assert!(v["adapter"].as_str().is_some_and(|a| !a.is_empty()));
    // The transfers, per phase: 40% of the weights on the CPU and 60% on disk reach the GPU at every decode step,
    // the cache goes to the CPU and comes back, and the pairs add up to the PCIe bytes.
    for phase in ["prefill", "decode"] {
        let t = &v["transfers"][phase];
        let pairs = t["bytes"]
            .as_object()
            .unwrap_or_else(|| panic!("{phase} transfers in {v}"));
        let sum: u64 = pairs
            .iter()
            .filter(|(k, _)| *k != "gpu->gpu")
            .map(|(_, n)| u(n))
            .sum();
        assert_eq!(sum, u(&t["pcie_bytes"]), "{phase}: {v}");
        assert!(
            t["readback_wait_s"].as_f64().is_some_and(|w| w >= 0.0),
            "{v}"
        );
        // Transfers ran in both phases: where the device writes timestamps, they took GPU time.
        assert!(
            t["gpu_transfer_s"].is_null() || t["gpu_transfer_s"].as_f64().is_some_and(|s| s > 0.0),
            "{phase}: {v}"
        );
    }
    // Two GPU batches: auto copies the weights once per block rather than reading them twice in place.
    assert_eq!(v["transfer"]["setting"], "auto", "{v}");
    assert_eq!(v["transfer"]["decode"], "copy", "{v}");
    let decode_bytes = &v["transfers"]["decode"]["bytes"];
    for pair in ["cpu->gpu", "disk->gpu", "gpu->cpu"] {
        assert!(u(&decode_bytes[pair]) > 0, "{pair} in {v}");
    }
    // The cost model's prediction for this policy from that profile, beside the measured figures.
    let p = &v["prediction"];
    assert_eq!(p["cost_model"], "strata", "{v}");
    assert_eq!(p["profile"], "t4", "{v}");
    let policy = strata_runtime::offload::policy::Policy {
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        percent: strata_runtime::offload::policy::Percent::from_array([
            30.0, 40.0, 0.0, 100.0, 50.0, 0.0,
        ]),
        ..Default::default()
    };
    let workload = strata_runtime::offload::placement::Workload {
        prompt_len: 6,
        gen_len: 4,
    };
    let expected = strata_runtime::cost_model::evaluate(
        strata_runtime::cost_model::Problem::new(&config, workload, &t4, Default::default()),
        &policy,
    )
    .unwrap();
    let num = |x: &serde_json::Value| x.as_f64().unwrap_or_else(|| panic!("not a number in {v}"));
    let predicted = &p["predicted"];
    assert!(
        close(num(&predicted["prefill_s"]), expected.prefill_s),
        "{v}"
    );
    assert!(close(num(&predicted["decode_s"]), expected.decode_s), "{v}");
    assert!(
        close(num(&predicted["total_tok_s"]), expected.total_throughput),
        "{v}"
    );
    assert!(close(
        num(&predicted["total_s"]),
        expected.prefill_s + expected.decode_s
    ));
    for (phase, measured) in [
        ("prefill", "prefill_throughput_tok_s"),
        ("decode", "decode_throughput_tok_s"),
        ("total", "total_throughput_tok_s"),
    ] {
        let want = num(&predicted[format!("{phase}_tok_s")]);
        assert!(want > 0.0, "{phase}: {v}");
        assert!(close(
            num(&p["measured"][format!("{phase}_tok_s")]),
            f(measured)
        ));
        assert!(
            close(num(&p["ratio"][phase]), f(measured) / want),
            "{phase}: {v}"
        );
    }
    assert_no_files_left(offload.path());
}

#[test]
fn bench_refuses_over_cap_and_missing_offload_dir() {
    let err = refused(bench(&fixture(), 4, 2).args(["--gpu-mem", "1KiB"]));
    assert!(err.contains("--gpu-mem"), "{err}");

    let err = refused(bench(&fixture(), 4, 2).args("--percent 0 0 100 0 100 0".split(' ')));
    assert!(err.contains("--offload-dir"), "{err}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_removes_offload_files_and_exits_130() {
    let offload = tempfile::tempdir().unwrap();
    let mut child = bench("opt-125m", 8, 64)
        .arg("--dummy")
        .args("--percent 0 0 100 0 100 0 --gpu-batch-size 1".split(' '))
        .arg("--offload-dir")
        .arg(offload.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until weights are on disk, then interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_dir(offload.path()).unwrap().next().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no offload file appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "bench ended before writing offload files"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_no_files_left(offload.path());
}

/// `strata bench kernels` times every kernel family on issue 10's shapes (scaled down: lavapipe's bindings hold
/// 128 MiB), each row with a positive time and the throughput that time implies, and says which variant ran.
#[test]
fn bench_kernels_times_every_family() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(
            "bench kernels --json --scale 64 --reps 1 --iters 1 --peak-tflops 1 --peak-gbps 10"
                .split(' '),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["kernel_variants"].as_str().unwrap().contains("portable"));
    let rows = v["rows"].as_array().unwrap();
    let count = |pred: &dyn Fn(&serde_json::Value) -> bool| rows.iter().filter(|r| pred(r)).count();
    // GEMM + three prefill linears, 12 decode shapes in f16 and 4-bit, prefill and decode attention.
    assert_eq!(
        count(&|r| r["family"] == "linear" && r["weights"] == "f16"),
        16
    );
    assert_eq!(
        count(&|r| r["family"] == "linear" && r["weights"] == "q4"),
        12
    );
    assert_eq!(count(&|r| r["family"] == "attention"), 2);
    for r in rows {
        let seconds = r["seconds"].as_f64().unwrap();
        assert!(seconds > 0.0 && seconds.is_finite(), "{r}");
        let percent = r["percent_of_peak"].as_f64().unwrap();
        let expected = match r["bound"].as_str().unwrap() {
            "compute" => 100.0 * r["tflops"].as_f64().unwrap(),
            _ => 100.0 * r["gbps"].as_f64().unwrap() / 10.0,
        };
        assert!(
            (percent - expected).abs() <= 1e-9 * expected.max(1.0),
            "{r}"
        );
    }
    // Decode rows are memory-bound, prefill rows compute-bound.
    assert!(rows
        .iter()
        .filter(|r| r["shape"].as_str().unwrap().starts_with("decode"))
        .all(|r| r["bound"] == "memory"));
}

#[test]
fn bench_packed_weights_writes_the_file_once_and_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let packed = tmp.path().join("model.packed");
    let compress = ["--compress-weight", "--compress-weight-group-size", "32"];
    let run = |extra: &[&str]| {
        let out = bench(&fixture(), 6, 3)
            .arg("--json")
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "strata bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let with_file: Vec<&str> = compress
        .iter()
        .copied()
        .chain(["--packed-weights", packed.to_str().unwrap()])
        .collect();
    let (first, err) = run(&with_file);
    assert!(err.contains("writing packed weights"), "{err}");
    let meta = std::fs::metadata(&packed).expect("the first run writes the file");
    let written = (meta.len(), meta.modified().unwrap());
    let (second, err) = run(&with_file);
    assert!(!err.contains("writing packed weights"), "{err}");
    let meta = std::fs::metadata(&packed).unwrap();
    assert_eq!(
        (meta.len(), meta.modified().unwrap()),
        written,
        "the second run reads the file, it does not write it again"
    );
    // Loading the file makes the buffers quantising while loading makes: the same peaks, the packed model's size.
    let (direct, _) = run(&compress);
    for v in [&first, &second] {
        assert_eq!(v["peak_bytes"], direct["peak_bytes"], "{v}");
        assert_eq!(
            v["compressed_model_bytes"],
            direct["compressed_model_bytes"]
        );
    }
    // Other settings than the file's: refused, naming the file; without --compress-weight: what to add.
    let err = refused(
        bench(&fixture(), 6, 3)
            .args(["--compress-weight", "--packed-weights"])
            .arg(&packed),
    );
    assert!(
        err.contains("model.packed") && err.contains("groups of 32"),
        "{err}"
    );
    let err = refused(bench(&fixture(), 6, 3).arg("--packed-weights").arg(&packed));
    assert!(err.contains("add --compress-weight"), "{err}");
}
