//! `--policy auto`'s library half on this machine's GPU (lavapipe on CPU-only machines): with caps too small for
//! opt-125m on the GPU, the chosen policy offloads, validates, and fits the caps by strata's memory planner; the
//! profile is measured once, cached, and reused.

use strata_runtime::cost_model::auto::{
    auto_policy, load_or_measure_profile, AutoOptions, MachineCaps, ProfileSource,
};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::hardware::HardwareProfile;
use strata_runtime::offload::placement::{plan, Caps, Workload};

#[test]
fn auto_policy_offloads_to_fit_small_caps_and_caches_the_profile() {
    let gpu = Gpu::new(&GpuOptions::default()).expect("tests need a GPU adapter (lavapipe works)");
    let config = strata::get_opt_config("opt-125m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let offload = dir.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    let profile_path = dir.path().join("profiles").join("gpu.toml");
    let workload = Workload {
        prompt_len: 64,
        gen_len: 8,
    };
    // opt-125m's fp16 weights are ~250 MB and its GPU working set (embedding, logits) ~100 MB more: a 200 MiB GPU cap
    // (160 MiB with headroom) forces most weights off the GPU.
    let caps = Caps {
        gpu: Some(200 << 20),
        cpu: Some(1 << 30),
        disk: Some(4 << 30),
    };
    let options = AutoOptions {
        profile: Some(profile_path.clone()),
        offload_dir: Some(offload.clone()),
        max_block: 32,
        disk_test_bytes: 16 << 20,
        ..AutoOptions::default()
    };
    let mut steps = Vec::new();
    let first = auto_policy(&gpu, &config, workload, caps, &options, &mut |s| {
        steps.push(s.to_string())
    })
    .unwrap();
    assert_eq!(first.source, ProfileSource::Measured(profile_path.clone()));
    assert!(steps.iter().any(|s| s == "mm_flops_p"), "{steps:?}");
    let saved = HardwareProfile::load(&profile_path).unwrap();
    assert_eq!(saved, first.profile);
    assert!(
        saved.measured.iter().any(|m| m == "bmm_flops_g"),
        "{saved:?}"
    );

    let policy = &first.policy;
    policy.validate().unwrap();
    assert_eq!(policy.offload_dir.as_deref(), Some(offload.as_path()));
    assert_eq!(first.caps, caps);
    assert!(
        policy.percent.weights.gpu < 100.0,
        "opt-125m cannot sit on a 200 MiB GPU: {}",
        policy.to_flags()
    );
    assert!(policy.effective_batch() <= 32);
    let memory = plan(&config, policy, workload).unwrap();
    memory.check(&caps).unwrap();
    assert!(first.prediction.total_throughput > 0.0);
    eprintln!(
        "auto chose {} (predicted {:.3} token/s)",
        policy.to_flags(),
        first.prediction.total_throughput
    );

    // The second call reuses the cached profile: no measuring, same choice.
    let mut steps = Vec::new();
    let second = auto_policy(&gpu, &config, workload, caps, &options, &mut |s| {
        steps.push(s.to_string())
    })
    .unwrap();
    assert!(steps.is_empty(), "{steps:?}");
    assert_eq!(second.source, ProfileSource::Cached(profile_path));
    assert_eq!(second.policy, first.policy);
}

#[test]
fn auto_policy_without_offload_dir_keeps_everything_off_disk() {
    let gpu = Gpu::new(&GpuOptions::default()).expect("tests need a GPU adapter (lavapipe works)");
    let config = strata::get_opt_config("opt-125m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A saved profile is used as is (the T4's constants here), so this test measures nothing.
    let profile_path = dir.path().join("t4.toml");
    HardwareProfile::t4().save(&profile_path).unwrap();
    let options = AutoOptions {
        profile: Some(profile_path),
        max_block: 16,
        ..AutoOptions::default()
    };
    let caps = Caps {
        gpu: Some(200 << 20),
        cpu: Some(2 << 30),
        disk: None,
    };
    let workload = Workload {
        prompt_len: 32,
        gen_len: 4,
    };
    let c = auto_policy(&gpu, &config, workload, caps, &options, &mut |_| {}).unwrap();
    assert_eq!(c.caps.disk, Some(0));
    assert!(!c.policy.percent.uses_disk(), "{}", c.policy.to_flags());
    c.policy.validate().unwrap();
    plan(&config, &c.policy, workload)
        .unwrap()
        .check(&c.caps)
        .unwrap();
    // Without a GPU cap the adapter's memory must be known: lavapipe's is not, so the error names the flag.
    if MachineCaps::gpu_memory(&gpu.info.name).is_none() {
        let e = auto_policy(
            &gpu,
            &config,
            workload,
            Caps::default(),
            &options,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--gpu-mem"), "{e}");
    }
}

#[test]
fn a_cached_profile_gets_disk_speeds_once_an_offload_dir_is_used() {
    let gpu = Gpu::new(&GpuOptions::default()).expect("tests need a GPU adapter (lavapipe works)");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let t4 = HardwareProfile::t4();
    t4.save(&path).unwrap();
    let mut steps = Vec::new();
    let (p, source) =
        load_or_measure_profile(&gpu, Some(&path), Some(dir.path()), 8 << 20, &mut |s| {
            steps.push(s.to_string())
        })
        .unwrap();
    assert_eq!(steps, ["disk read/write"]);
    assert_eq!(source, ProfileSource::Cached(path.clone()));
    assert!(
        p.measured.iter().any(|m| m == "dtoc") && p.dtoc > 0.0,
        "{p:?}"
    );
    // Only the disk was measured: the rest is the cached profile's.
    assert_eq!(p.mm_flops_p, t4.mm_flops_p);
    assert_eq!(HardwareProfile::load(&path).unwrap(), p);
    // The disk test cleaned up: only the profile is left.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // Measured once: the next load measures nothing.
    let mut steps = Vec::new();
    load_or_measure_profile(&gpu, Some(&path), Some(dir.path()), 8 << 20, &mut |s| {
        steps.push(s.to_string())
    })
    .unwrap();
    assert!(steps.is_empty(), "{steps:?}");
}
