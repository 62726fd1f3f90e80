//! `strata profile` on the machine's GPU (lavapipe on CPU-only machines): every field measured, positive, written
//! where asked or to the adapter's default file.

use std::process::Command;

use strata_runtime::hardware::HardwareProfile;

const ALL_FIELDS: [&str; 15] = [
    "ctog",
    "gtoc_cache",
    "gtoc_hidden",
    "dtoc",
    "ctod_cache_p",
    "ctod_hidden_p",
    "ctod_g",
    "mm_flops_p",
    "mm_flops_g",
    "bmm_flops_p",
    "bmm_flops_g",
    "cpu_flops",
    "cpu_gemv_flops",
    "gemv_weight_gib_s",
    "mm_flops_g_row",
];

fn profile(args: &[&str], xdg: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("profile")
        .args(["--disk-bytes", "16MiB", "--disk-threads", "2"])
        .args(args)
        .env("XDG_CACHE_HOME", xdg)
        .output()
        .expect("run strata");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn profile_measures_every_field_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tmp.toml");
    let start = std::time::Instant::now();
    let (ok, stdout, err) = profile(
        &[
            "--out",
            out.to_str().unwrap(),
            "--offload-dir",
            dir.path().to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(ok, "{err}");
    eprintln!(
        "strata profile took {:.1} s:\n{stdout}",
        start.elapsed().as_secs_f64()
    );
    let p = HardwareProfile::load(&out).unwrap();
    p.validate().unwrap();
    for field in ALL_FIELDS {
        assert!(
            p.measured.iter().any(|m| m == field),
            "{field} not measured: {p:?}"
        );
        assert!(
            stdout.lines().any(|l| l.starts_with(field)),
            "{field} not in the table: {stdout}"
        );
    }
    let gpu_fields = [
        p.ctog,
        p.gtoc_cache,
        p.gtoc_hidden,
        p.mm_flops_p,
        p.mm_flops_g,
        p.bmm_flops_p,
        p.bmm_flops_g,
    ];
    assert!(
        gpu_fields.iter().all(|v| v.is_finite() && *v > 0.0),
        "{p:?}"
    );
    // The name is the adapter's, not the base profile's.
    assert_ne!(p.name, "t4");
    assert!(!p.name.contains("this machine"), "{}", p.name);
    assert!(!err.contains("could not measure"), "{err}");
}

#[test]
fn profile_defaults_to_the_adapter_cache_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, err) = profile(&["--skip-disk"], dir.path());
    assert!(ok, "{err}");
    let profiles = dir.path().join("strata").join("profiles");
    let files: Vec<_> = std::fs::read_dir(&profiles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let p = HardwareProfile::load(&files[0]).unwrap();
    assert_eq!(
        files[0].file_name().unwrap().to_str().unwrap(),
        format!("{}.toml", strata_runtime::hardware::adapter_slug(&p.name))
    );
    assert!(stdout.contains(files[0].to_str().unwrap()), "{stdout}");
    // Skipped disk fields keep the base profile's values and are not listed as measured.
    assert!(!p.measured.iter().any(|m| m == "dtoc"));
    assert_eq!(p.dtoc, HardwareProfile::t4().dtoc);
}

#[test]
fn a_missing_adapter_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = profile(&["--skip-disk", "--adapter", "no-such-gpu-xyz"], dir.path());
    assert!(!ok);
    assert!(
        err.contains("no-such-gpu-xyz") && err.contains("available adapters"),
        "{err}"
    );
}
