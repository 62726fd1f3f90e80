//! `strata policy` and `strata profile` run as a user runs them.

use std::process::Command;

use serde_json::Value;

fn strata(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("run strata");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const FLEXLLMGEN_CAPS: [&str; 10] = [
    "--gpu-mem",
    "15GiB",
    "--cpu-mem",
    "200GiB",
    "--disk-mem",
    "1500GiB",
    "--prompt-len",
    "512",
    "--gen-len",
    "32",
];

fn policy_json(model: &str, extra: &[&str]) -> Value {
    let mut args = vec!["policy", "--model", model, "--json"];
    args.extend(FLEXLLMGEN_CAPS);
    args.extend(extra);
    let (ok, out, err) = strata(&args);
    assert!(ok, "strata {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn json_output_has_the_policy_prediction_and_peaks() {
    for cost_model in ["strata", "flexllmgen"] {
        let v = policy_json(
            "facebook/opt-30b",
            &["--hardware", "t4", "--cost-model", cost_model],
        );
        assert_eq!(v["cost_model"], cost_model);
        assert_eq!(v["model"], "opt-30b");
        let gbs = v["gpu_batch_size"].as_u64().unwrap();
        let ngb = v["num_gpu_batches"].as_u64().unwrap();
        assert!(gbs >= 1 && ngb >= 1);
        let pct: Vec<f64> = v["percent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(pct.len(), 6);
        for pair in pct.chunks(2) {
            assert!(
                pair[0] >= 0.0 && pair[1] >= 0.0 && pair[0] + pair[1] <= 100.0 + 1e-9,
                "{pct:?}"
            );
        }
        let tput = v["predicted_throughput"].as_f64().unwrap();
        assert!(tput > 0.0 && tput.is_finite());
        let peak = &v["peak_bytes"];
        let total_weights: u64 = ["gpu", "cpu", "disk"]
            .iter()
            .map(|t| v["weights_bytes"][t].as_u64().unwrap())
            .sum();
        // opt-30b's exact parameter count at fp16, but the vectors (per layer 4 attention biases, fc1's and fc2's,
        // two norms of two; the final norm) as f32, which is what every tier holds.
        let (h, f, layers) = (7168u64, 28672u64, 48u64);
        let vectors = layers * (9 * h + f) + 2 * h;
        assert_eq!(total_weights, 2 * 29_974_540_288 + 2 * vectors);
        // The embeddings (tied LM head) and final layer norm stay on the GPU whatever the percents say:
        // (vocab + positions) * hidden fp16 values and 2 * hidden f32 values.
        let outside = 2 * (50272 + 2050) * h + 4 * 2 * h;
        assert_eq!(v["outside_layer_weight_bytes"].as_u64(), Some(outside));
        assert!(
            v["weights_bytes"]["gpu"].as_u64().unwrap() >= outside,
            "{}",
            v["weights_bytes"]
        );
        if cost_model == "strata" {
            assert!(peak["gpu"].as_u64().unwrap() <= 15 << 30, "{peak}");
            assert!(peak["cpu"].as_u64().unwrap() <= 200 << 30, "{peak}");
            assert_eq!(v["fits_caps"], true);
        }
        // The printed flags evaluate back to the same prediction.
        let flags = v["flags"].as_str().unwrap().to_string();
        let mut args = vec![
            "policy",
            "--model",
            "opt-30b",
            "--json",
            "--evaluate",
            "--cost-model",
            cost_model,
        ];
        args.extend(flags.split_whitespace());
        let (ok, out, err) = strata(&args);
        assert!(ok, "{err}");
        let again: Value = serde_json::from_str(&out).unwrap();
        let rel = (again["predicted_throughput"].as_f64().unwrap() - tput).abs() / tput;
        assert!(rel < 1e-3, "{again} vs {tput}");
        assert_eq!(again["gpu_batch_size"], v["gpu_batch_size"]);
    }
}

#[test]
fn improved_search_beats_or_matches_flexllmgens_through_the_cli() {
    for model in ["opt-6.7b", "opt-30b", "opt-175b"] {
        let base = ["--hardware", "t4", "--cost-model", "flexllmgen"];
        let exact = policy_json(model, &[&base[..], &["--exact-search"]].concat());
        let improved = policy_json(model, &base);
        let (e, i) = (
            exact["predicted_throughput"].as_f64().unwrap(),
            improved["predicted_throughput"].as_f64().unwrap(),
        );
        assert!(i >= e * (1.0 - 1e-9), "{model}: improved {i} < exact {e}");
    }
}

#[test]
fn text_output_prints_bench_flags_throughput_and_memory() {
    let mut args = vec!["policy", "--model", "opt-6.7b"];
    args.extend(FLEXLLMGEN_CAPS);
    let (ok, out, err) = strata(&args);
    assert!(ok, "{err}");
    assert!(
        out.contains("--gpu-batch-size ") && out.contains("--percent "),
        "{out}"
    );
    assert!(out.contains("total") && out.contains("token/s"), "{out}");
    for row in ["weights", "kv cache", "activations", "peak", "cap"] {
        assert!(
            out.lines().any(|l| l.starts_with(row)),
            "no {row} row: {out}"
        );
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["policy", "--model", "opt-7b", "--gpu-mem", "15GiB"],
            "unknown model `opt-7b`",
        ),
        (
            &["policy", "--model", "opt-30b", "--gpu-mem", "15G"],
            "ambiguous",
        ),
        (&["policy", "--model", "opt-30b"], "--gpu-mem is required"),
        (
            &[
                "policy",
                "--model",
                "opt-30b",
                "--gpu-mem",
                "15GiB",
                "--percent",
                "0",
                "100",
                "0",
                "100",
                "0",
                "100",
            ],
            "--percent only apply with --evaluate",
        ),
        (
            &[
                "policy",
                "--model",
                "opt-30b",
                "--gpu-mem",
                "15GiB",
                "--cost-model",
                "magic",
            ],
            "use strata or flexllmgen",
        ),
        (
            &[
                "policy",
                "--model",
                "opt-30b",
                "--gpu-mem",
                "15GiB",
                "--hardware",
                "v100",
            ],
            "no hardware profile `v100`",
        ),
        (
            &[
                "policy",
                "--model",
                "opt-175b",
                "--gpu-mem",
                "15GiB",
                "--cpu-mem",
                "10GiB",
                "--disk-mem",
                "100GiB",
            ],
            "opt-175b does not fit",
        ),
        (
            &[
                "policy",
                "--model",
                "opt-30b",
                "--gpu-mem",
                "15GiB",
                "--prompt-len",
                "2040",
            ],
            "context of 2048",
        ),
    ];
    for (args, expected) in cases {
        let (ok, _, err) = strata(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains(expected),
            "{args:?}: expected `{expected}` in: {err}"
        );
    }
}

#[test]
fn profile_writes_a_profile_policy_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("me.toml");
    let (ok, stdout, err) = strata(&[
        "profile",
        "--out",
        out.to_str().unwrap(),
        "--offload-dir",
        dir.path().to_str().unwrap(),
        "--disk-bytes",
        "16MiB",
        "--disk-threads",
        "2",
        // Disk and CPU only (tests/profile_cli.rs measures the GPU fields): the name says no GPU was measured.
        "--no-gpu",
    ]);
    assert!(ok, "{err}");
    for field in ["dtoc", "ctod_g", "cpu_flops", "cpu_gemv_flops"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(field)),
            "no {field}: {stdout}"
        );
    }
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("measured = ["), "{text}");
    // The disk test cleaned up after itself: only the profile is left.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let mut args = vec![
        "policy",
        "--model",
        "opt-1.3b",
        "--json",
        "--hardware",
        out.to_str().unwrap(),
    ];
    args.extend(FLEXLLMGEN_CAPS);
    let (ok, json, err) = strata(&args);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["hardware"].as_str().unwrap().contains("this machine"),
        "{v}"
    );
}

#[test]
fn pipeline_plans_one_of_n_identical_stages() {
    use strata_runtime::cost_model::{self, Problem, SearchKind};
    use strata_runtime::hardware::HardwareProfile;
    use strata_runtime::offload::placement::{Caps, Workload};

    let piped = policy_json("opt-175b", &["--pipeline", "4"]);
    assert_eq!(piped["pipeline"]["stages"], 4);
    assert_eq!(piped["pipeline"]["stage_layers"], 24);
    // The same search over a quarter of opt-175b's 96 layers, with the caps and defaults the CLI uses.
    let stage = strata::get_opt_config("opt-175b")
        .unwrap()
        .with_num_hidden_layers(24);
    let hardware = HardwareProfile::resolve("t4").unwrap();
    let caps = Caps {
        gpu: Some(15 << 30),
        cpu: Some(200 << 30),
        disk: Some(1500 << 30),
    };
    let workload = Workload {
        prompt_len: 512,
        gen_len: 32,
    };
    let choice = cost_model::search(
        Problem::new(&stage, workload, &hardware, caps),
        SearchKind::Improved,
    )
    .unwrap();
    assert_eq!(piped["flags"], choice.policy.to_flags());
    let predicted = piped["predicted_throughput"].as_f64().unwrap();
    assert!((predicted - choice.total_throughput).abs() <= 1e-9 * predicted);
    // A stage holds a quarter of the weights: less offloading, more throughput than the whole model on one GPU.
    let whole = policy_json("opt-175b", &[]);
    assert!(predicted > whole["predicted_throughput"].as_f64().unwrap());
    let (ok, _, err) = strata(&[
        "policy",
        "--model",
        "opt-125m",
        "--gpu-mem",
        "1GiB",
        "--pipeline",
        "13",
    ]);
    assert!(!ok && err.contains("only 12 decoder layers"), "{err}");
}
