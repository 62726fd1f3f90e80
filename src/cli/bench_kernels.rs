//! `strata bench kernels`: each kernel on fixed shapes (issue 10's list: the f16 GEMM 8192^3, opt-6.7b's prefill
//! and decode linears, prefill and decode attention), timed on this adapter with its own timestamps where it has
//! them, reported as time, TFLOP/s, GB/s and percent of the device's datasheet peak. Every device-specific variant
//! the kernels chose is reported beside the portable kernel, with the reason for the choice.

use anyhow::bail;
use strata_runtime::gpu::kernels::bench::{
    attention_bench_shapes, bench_attention, bench_linear, linear_bench_shapes, Clock,
};
use strata_runtime::gpu::kernels::{ActDtype, CacheDtype, KernelOptions, Kernels, Variant};
use strata_runtime::gpu::tensor::WeightFormat;
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::hardware::DevicePeak;

use super::process::{out, outln, text_table};

/// Arguments of `strata bench kernels`.
#[derive(clap::Args)]
pub struct Args {
    /// Use the first GPU adapter whose name contains this.
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Divide every shape's dimensions by N (the full shapes need bindings of 1 GiB; lavapipe has 128 MiB).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    scale: u32,
    /// At most N dispatches per timed step (fewer where one dispatch already runs 20 ms).
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000))]
    reps: u32,
    /// Timed steps per kernel (the best counts), after one warm-up.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    iters: u32,
    /// Activation storage: f16 (what an f16 checkpoint runs with; the default where the device has shader-f16) or f32.
    #[arg(long, value_name = "f16|f32", value_parser = parse_act)]
    act: Option<ActDtype>,
    /// The device's peak f16 TFLOP/s, where it is not in strata's table of known GPUs.
    #[arg(long, value_name = "TFLOPS")]
    peak_tflops: Option<f64>,
    /// The device's peak memory bandwidth in GB/s, where it is not in strata's table.
    #[arg(long, value_name = "GBPS")]
    peak_gbps: Option<f64>,
}

fn parse_act(text: &str) -> Result<ActDtype, String> {
    match text {
        "f16" | "fp16" => Ok(ActDtype::F16),
        "f32" | "fp32" => Ok(ActDtype::F32),
        _ => Err(format!(
            "`{text}` is not an activation dtype: use f16 or f32"
        )),
    }
}

/// What bounds a kernel on these shapes, so which peak its speed is compared with.
#[derive(Clone, Copy)]
enum Bound {
    Compute,
    Memory,
}

/// One measured row.
struct Row {
    family: &'static str,
    shape: String,
    variant: String,
    kernel: String,
    weights: &'static str,
    seconds: f64,
    clock: Clock,
    flops: f64,
    bytes: f64,
    bound: Bound,
}

impl Row {
    fn tflops(&self) -> f64 {
        self.flops / self.seconds / 1e12
    }

    fn gbps(&self) -> f64 {
        self.bytes / self.seconds / 1e9
    }

    fn percent(&self, peak: Option<(f64, f64)>) -> Option<f64> {
        let (tflops, gbps) = peak?;
        Some(match self.bound {
            Bound::Compute => 100.0 * self.tflops() / tflops,
            Bound::Memory => 100.0 * self.gbps() / gbps,
        })
    }
}

fn weights_name(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::F32 => "f32",
        WeightFormat::F16 => "f16",
        WeightFormat::Packed(_) => "q4",
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--peak-tflops", args.peak_tflops),
        ("--peak-gbps", args.peak_gbps),
    ] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{flag} must be a positive number");
        }
    }
    let gpu = Gpu::new(&GpuOptions {
        adapter: args.adapter.clone(),
        max_binding_override: None,
    })?;
    let adapter = gpu.describe();
    // f16 where the device has shader-f16 (the kernels fall back to f32 elsewhere).
    let kernels = Kernels::with_options(
        &gpu,
        KernelOptions::from_env().with_act(args.act.unwrap_or(ActDtype::F16)),
    );
    let act = kernels.act();
    if args.act.is_some_and(|wanted| wanted != act) {
        bail!("--act f16 needs shader-f16, which {adapter} does not have");
    }
    let known = DevicePeak::known(&gpu.info.name);
    let peak = match (args.peak_tflops, args.peak_gbps, known) {
        (Some(t), Some(g), _) => Some((t, g)),
        (t, g, Some(k)) => Some((t.unwrap_or(k.tflops), g.unwrap_or(k.gbps))),
        _ => None,
    };
    let report = kernels.variants();
    if !args.json {
        eprintln!("strata bench kernels: {adapter}");
        eprint!("{report}");
        match (peak, known) {
            (Some((t, g)), Some(k)) => eprintln!("peaks: {t} TFLOP/s, {g} GB/s ({})", k.device),
            (Some((t, g)), None) => eprintln!("peaks: {t} TFLOP/s, {g} GB/s (given)"),
            (None, _) => eprintln!(
                "peaks: unknown for this adapter; pass --peak-tflops and --peak-gbps for percentages"
            ),
        }
    }
    let (reps, iters) = (args.reps as usize, args.iters as usize);
    let scale = args.scale as usize;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let weight_formats = |shape_name: &str| {
        if shape_name.starts_with("decode") {
            vec![
                WeightFormat::F16,
                WeightFormat::Packed(strata_runtime::compress::CompressionConfig::default()),
            ]
        } else {
            vec![WeightFormat::F16]
        }
    };
    for (name, shape) in linear_bench_shapes(scale) {
        for format in weight_formats(&name) {
            // The kernels' own choice, then the portable kernel where the choice was a device variant.
            let mut variants = vec![None];
            let mut ran_device_variant = false;
            while let Some(variant) = variants.pop() {
                match bench_linear(&kernels, shape, format, variant, None, reps, iters) {
                    Ok(t) => {
                        let chosen = t.kernel.variant();
                        if variant.is_none() && chosen != Variant::Portable {
                            ran_device_variant = true;
                        }
                        let memory_bound = shape.m <= 64;
                        rows.push(Row {
                            family: "linear",
                            shape: format!("{name} (m={} n={} k={})", shape.m, shape.n, shape.k),
                            variant: chosen.name().to_string(),
                            kernel: t.kernel.to_string(),
                            weights: weights_name(format),
                            seconds: t.seconds,
                            clock: t.clock,
                            flops: t.flops,
                            bytes: t.weight_bytes as f64,
                            bound: if memory_bound {
                                Bound::Memory
                            } else {
                                Bound::Compute
                            },
                        });
                    }
                    Err(e) => errors.push(format!("linear {name} ({}): {e}", weights_name(format))),
                }
                if ran_device_variant && variant.is_none() {
                    variants.push(Some(Variant::Portable));
                }
            }
        }
    }
    let cache = CacheDtype::F16;
    for (name, shape) in attention_bench_shapes(scale) {
        match bench_attention(&kernels, shape, cache, None, reps, iters) {
            Ok(t) => rows.push(Row {
                family: "attention",
                shape: format!(
                    "{name} ({} heads of {})",
                    shape.n_head,
                    shape.hidden / shape.n_head
                ),
                variant: "portable".to_string(),
                kernel: t.kernel.describe(&shape),
                weights: "-",
                seconds: t.seconds,
                clock: t.clock,
                flops: t.flops,
                bytes: t.bytes as f64,
                bound: if shape.s_new == 1 {
                    Bound::Memory
                } else {
                    Bound::Compute
                },
            }),
            Err(e) => errors.push(format!("attention {name}: {e}")),
        }
    }

    if args.json {
        let object = serde_json::json!({
            "schema_version": super::JSON_SCHEMA_VERSION,
            "adapter": adapter,
            "activations": format!("{act:?}").to_lowercase(),
            "kernel_variants": report.to_string(),
            "peak": peak.map(|(t, g)| serde_json::json!({
                "tflops": t,
                "gbps": g,
                "device": known.map(|k| k.device),
            })),
            "rows": rows.iter().map(|r| serde_json::json!({
                "family": r.family,
                "shape": r.shape,
                "variant": r.variant,
                "kernel": r.kernel,
                "weights": r.weights,
                "seconds": r.seconds,
                "clock": r.clock.name(),
                "tflops": r.tflops(),
                "gbps": r.gbps(),
                "percent_of_peak": r.percent(peak),
                "bound": match r.bound { Bound::Compute => "compute", Bound::Memory => "memory" },
            })).collect::<Vec<_>>(),
            "errors": errors,
        });
        outln!("{object}");
    } else {
        let table = rows.iter().map(|r| {
            vec![
                r.family.to_string(),
                r.shape.to_string(),
                r.variant.to_string(),
                r.weights.to_string(),
                format!("{:.2}", r.seconds * 1e6),
                format!("{:.3}", r.tflops()),
                format!("{:.1}", r.gbps()),
                r.percent(peak)
                    .map_or("-".to_string(), |p| format!("{p:.1}")),
                r.kernel.to_string(),
            ]
        });
        let header = [
            "family",
            "shape",
            "variant",
            "w",
            "time (us)",
            "TFLOP/s",
            "GB/s",
            "% peak",
            "kernel",
        ];
        out!("{}", text_table(&header, &[4, 5, 6, 7], table));
        if let Some(r) = rows.first() {
            outln!(
                "timed with {}; GB/s counts the weights (linear) or the cache, queries and output (attention)",
                r.clock.name()
            );
        }
        for e in &errors {
            eprintln!("not measured: {e}");
        }
    }
    Ok(())
}
