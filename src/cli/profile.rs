//! `strata profile`: measure this machine's transfer and compute speeds and write them as a hardware profile for
//! `strata policy --hardware FILE`.
//!
//! Measured: disk read/write bandwidth in the offload directory, CPU decode attention and CPU GEMV rates, and the
//! GPU fields (CPU<->GPU bandwidth through the CPU tier, GEMM/GEMV and attention rates through the runtime's
//! kernels) with [`RuntimeProbe`]. Without a usable GPU the GPU fields keep the base profile's values, and the file
//! lists what was measured.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::hardware::gpu_probe::RuntimeProbe;
use strata_runtime::hardware::measure::{
    profile_machine, step_count, GpuField, GpuProbe, MeasureOptions,
};
use strata_runtime::hardware::{default_profile_path, HardwareProfile};

use super::checks;
use super::policy_args::parse_size;
use super::process::{out, outln, text_table};

/// Arguments of `strata profile`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the profile [default: strata/profiles/<adapter>.toml in $XDG_CACHE_HOME, else the user cache].
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
    /// Measure the first GPU adapter whose name contains NAME [default: WGPU_ADAPTER_NAME, else the default one].
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Do not open a GPU: measure disk and CPU only (the GPU fields keep the base profile's values).
    #[arg(long)]
    pub no_gpu: bool,
    /// Print one JSON document (the measurements and the profile's path) instead of the table (docs/json.md).
    #[arg(long)]
    pub json: bool,
}

/// The GPU runtime's measurements: a [`RuntimeProbe`] on the chosen adapter. An adapter asked for by name must open;
/// otherwise a machine without a GPU still gets its disk and CPU measured, with a warning.
fn gpu_probe(args: &Args) -> anyhow::Result<Option<Box<dyn GpuProbe>>> {
    if args.no_gpu {
        return Ok(None);
    }
    let opened = Gpu::new(&GpuOptions {
        adapter: args.adapter.clone(),
        ..GpuOptions::default()
    })
    .map_err(anyhow::Error::from)
    .and_then(|gpu| Ok(RuntimeProbe::new(&gpu)?));
    match opened {
        Ok(probe) => Ok(Some(Box::new(probe))),
        Err(e) if args.adapter.is_some() => Err(e.context("opening the GPU to profile")),
        Err(e) => {
            eprintln!("warning: no GPU to profile ({e:#}); measuring disk and CPU only");
            Ok(None)
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Before measuring for minutes: a path the profile cannot be written to is refused now.
    if let Some(out) = &args.out {
        checks::output_file("--out", out)?;
    }
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
    if !args.skip_disk {
        checks::dead_runs(Some(&dir));
    }
    let mut options = MeasureOptions::new(dir);
    options.disk_bytes = args.disk_bytes;
    options.disk_threads = args.disk_threads.max(1);
    options.skip_disk = args.skip_disk;

    let mut probe = gpu_probe(&args)?;
    let adapter = probe
        .as_ref()
        .map_or_else(|| "no-gpu-probe".to_string(), |p| p.adapter_name());
    let out = match args.out.clone() {
        Some(p) => p,
        None => default_profile_path(&adapter).context(
            "no user cache directory (XDG_CACHE_HOME, else the platform's): pass --out FILE",
        )?,
    };

    let (bar, mut progress) = step_progress(
        step_count(&options, probe.is_some()),
        "{bar:30} {pos}/{len} {msg}",
        "measuring ",
    );
    let gpu: Option<&mut dyn GpuProbe> = match probe.as_mut() {
        Some(p) => Some(p.as_mut()),
        None => None,
    };
    let result = profile_machine(&base, &options, gpu, &mut progress);
    bar.finish_and_clear();
    let (profile, table) = result?;

    let missing: Vec<&str> = GpuField::ALL
        .iter()
        .map(|f| f.name())
        .filter(|name| !profile.measured.iter().any(|m| m == name))
        .collect();
    if args.json {
        profile
            .save(&out)
            .with_context(|| format!("writing the profile to {}", out.display()))?;
        let object = serde_json::json!({
            "schema_version": super::JSON_SCHEMA_VERSION,
            "adapter": adapter,
            "profile_path": out,
            "base": base.name,
            "measurements": table.iter().map(|m| serde_json::json!({
                "field": m.field,
                "value": m.value,
                "unit": m.unit,
                "what": m.what,
            })).collect::<Vec<_>>(),
            "not_measured": if probe.is_some() { missing } else { GpuField::ALL.iter().map(|f| f.name()).collect() },
        });
        outln!("{object}");
        return Ok(());
    }
    let rows = table.iter().map(|m| {
        vec![
            m.field.to_string(),
            format_value(m.value),
            m.unit.to_string(),
            m.what.to_string(),
        ]
    });
    out!(
        "{}",
        text_table(&["field", "value", "unit", "measured"], &[1], rows)
    );
    if probe.is_some() && !missing.is_empty() {
        eprintln!(
            "warning: the GPU could not measure {}: they keep `{}`'s values",
            missing.join(", "),
            base.name
        );
    }
    if probe.is_none() {
        outln!(
            "GPU fields (ctog, gtoc_*, mm_flops_*, bmm_flops_*) were not measured: they keep `{}`'s values",
            base.name
        );
    }
    profile
        .save(&out)
        .with_context(|| format!("writing the profile to {}", out.display()))?;
    outln!(
        "wrote {} (use it with strata policy --hardware {})",
        out.display(),
        out.display()
    );
    Ok(())
}

/// Four significant digits: CPU drivers measure TFLOP/s in the 1e-4 range, GPUs in the hundreds.
fn format_value(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// A progress bar of `steps` measurement steps drawn with `template`, and the reporter that `profile_machine` calls
/// as each step starts: it counts the previous step as done and shows `message_prefix` followed by the step's name.
pub(super) fn step_progress(
    steps: usize,
    template: &str,
    message_prefix: &'static str,
) -> (ProgressBar, impl FnMut(&str)) {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let shown = bar.clone();
    let mut started = false;
    let progress = move |step: &str| {
        if started {
            shown.inc(1);
        }
        started = true;
        shown.set_message(format!("{message_prefix}{step}"));
    };
    (bar, progress)
}
