//! `strata profile`: measure this machine's transfer and compute speeds and write them as a hardware profile for
//! `strata policy --hardware FILE`.
//!
//! Measured now: disk read/write bandwidth in the offload directory, CPU decode attention and CPU GEMV rates.
//! The GPU fields (CPU<->GPU bandwidth, GEMM/attention rates) come from a [`GpuProbe`] the GPU runtime provides;
//! until it is wired in ([`gpu_probe`]), they keep the base profile's values and the file lists what was measured.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use strata::hardware::measure::{profile_machine, step_count, GpuProbe, MeasureOptions};
use strata::hardware::{default_profile_path, HardwareProfile};

use super::policy_args::parse_size;

/// Arguments of `strata profile`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the profile [default: $XDG_CACHE_HOME/strata/profiles/<adapter>.toml, else ~/.cache/...].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Directory for the disk test (use the offload directory you will run with) [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    pub offload_dir: Option<PathBuf>,
    /// Bytes the disk test writes and reads back.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    pub disk_bytes: u64,
    /// Threads of the disk test.
    #[arg(long, default_value_t = 4)]
    pub disk_threads: usize,
    /// Skip the disk test.
    #[arg(long)]
    pub skip_disk: bool,
    /// Profile whose values fill the fields not measured: a built-in name (t4) or a TOML file.
    #[arg(long, default_value = "t4", value_name = "t4|FILE")]
    pub base: String,
}

/// The GPU runtime's measurements.
///
/// TODO(lead, when merging the GPU runtime): return a probe that measures CPU->GPU / GPU->CPU bandwidth through the
/// CPU tier's buffers and the GEMM / GEMV / attention kernels' rates (see `strata::hardware::measure::GpuField`).
fn gpu_probe() -> Option<Box<dyn GpuProbe>> {
    None
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let base = HardwareProfile::resolve(&args.base)?;
    if args.disk_bytes > 4 << 30 {
        anyhow::bail!(
            "--disk-bytes {} is more than the 4 GiB a profile needs",
            args.disk_bytes
        );
    }
    let dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    if !args.skip_disk && !dir.is_dir() {
        anyhow::bail!("--offload-dir {}: not a directory", dir.display());
    }
    let mut options = MeasureOptions::new(dir);
    options.disk_bytes = args.disk_bytes;
    options.disk_threads = args.disk_threads.max(1);
    options.skip_disk = args.skip_disk;

    let mut probe = gpu_probe();
    let adapter = probe
        .as_ref()
        .map_or_else(|| "no-gpu-probe".to_string(), |p| p.adapter_name());
    let out = match args.out.clone() {
        Some(p) => p,
        None => default_profile_path(&adapter)
            .context("neither XDG_CACHE_HOME nor HOME is set: pass --out FILE")?,
    };

    let bar = ProgressBar::new(step_count(&options, probe.is_some()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut started = false;
    let mut progress = |step: &str| {
        if started {
            bar.inc(1);
        }
        started = true;
        bar.set_message(format!("measuring {step}"));
    };
    let gpu: Option<&mut dyn GpuProbe> = match probe.as_mut() {
        Some(p) => Some(p.as_mut()),
        None => None,
    };
    let result = profile_machine(&base, &options, gpu, &mut progress);
    bar.finish_and_clear();
    let (profile, table) = result?;

    println!("{:<16}{:>12}  {:<9}measured", "field", "value", "unit");
    for m in &table {
        println!("{:<16}{:>12.4}  {:<9}{}", m.field, m.value, m.unit, m.what);
    }
    if probe.is_none() {
        println!(
            "GPU fields (ctog, gtoc_*, mm_flops_*, bmm_flops_*) are not measured yet: they keep `{}`'s values",
            base.name
        );
    }
    profile
        .save(&out)
        .with_context(|| format!("writing the profile to {}", out.display()))?;
    println!(
        "wrote {} (use it with strata policy --hardware {})",
        out.display(),
        out.display()
    );
    Ok(())
}
