//! `strata bench ... --sweep gpu-batch-size=1,4,16,64`: the benchmark once per value (a grid when `--sweep` is
//! repeated), each point in its own `strata bench --json` process (a fresh device, so one point's memory or failure
//! never touches the next), written as PATH.csv, PATH.json and PATH.svg: total and decode throughput and total
//! latency against the effective batch, one curve per placement, with the peers' published points for the same
//! model and workload ([`super::peers`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde::Serialize;

use super::checks;
use super::peers::{self, Published};
use super::plot::{self, Curve, CurvePanel};
use super::process::{out, outln, text_table};

/// A parameter `--sweep` varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// `--gpu-batch-size`.
    GpuBatchSize,
    /// `--num-gpu-batches`.
    NumGpuBatches,
    /// `--percent` (six numbers).
    Percent,
}

impl Param {
    fn flag(self) -> &'static str {
        match self {
            Param::GpuBatchSize => "--gpu-batch-size",
            Param::NumGpuBatches => "--num-gpu-batches",
            Param::Percent => "--percent",
        }
    }

    /// How many values the flag takes.
    fn arity(self) -> usize {
        match self {
            Param::Percent => 6,
            _ => 1,
        }
    }
}

/// `--percent` presets: name, the six numbers.
pub const PERCENT_PRESETS: [(&str, [u8; 6]); 8] = [
    ("gpu", [100, 0, 100, 0, 100, 0]),
    ("weights-cpu", [0, 100, 100, 0, 100, 0]),
    ("weights-half-cpu", [50, 50, 100, 0, 100, 0]),
    ("cache-cpu", [100, 0, 0, 100, 100, 0]),
    ("all-cpu", [0, 100, 0, 100, 0, 100]),
    ("weights-disk", [0, 0, 100, 0, 100, 0]),
    // FlexLLMGen's published policies for opt-30b and opt-175b on a T4.
    ("flexllmgen-30b", [20, 80, 0, 100, 0, 100]),
    ("flexllmgen-175b", [0, 50, 0, 0, 0, 100]),
];

/// One swept parameter and its values, each as the flag's arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The parameter.
    pub param: Param,
    /// Values, each the flag's arguments (`["4"]`, or six percents).
    pub values: Vec<Vec<String>>,
}

/// Parses `PARAM=V1,V2,...`.
pub fn parse_sweep(spec: &str) -> anyhow::Result<Sweep> {
    let Some((name, list)) = spec.split_once('=') else {
        bail!("--sweep {spec}: write PARAM=V1,V2,... (e.g. gpu-batch-size=1,4,16,64)");
    };
    let param = match name.trim() {
        "gpu-batch-size" => Param::GpuBatchSize,
        "num-gpu-batches" => Param::NumGpuBatches,
        "percent" => Param::Percent,
        other => bail!(
            "--sweep {spec}: `{other}` cannot be swept; use gpu-batch-size, num-gpu-batches or percent"
        ),
    };
    let mut values = Vec::new();
    for item in list.split(',').map(str::trim) {
        let value = match param {
            Param::Percent => percent_value(item).with_context(|| format!("--sweep {spec}"))?,
            _ => match item.parse::<usize>() {
                Ok(n) if n >= 1 => vec![n.to_string()],
                _ => bail!("--sweep {spec}: `{item}` is not a whole number of at least 1"),
            },
        };
        values.push(value);
    }
    if values.is_empty() || list.trim().is_empty() {
        bail!("--sweep {spec}: give at least one value");
    }
    Ok(Sweep { param, values })
}

/// A preset name or six numbers separated by `:` or `/`.
fn percent_value(item: &str) -> anyhow::Result<Vec<String>> {
    if let Some((_, p)) = PERCENT_PRESETS.iter().find(|(n, _)| *n == item) {
        return Ok(p.iter().map(u8::to_string).collect());
    }
    let parts: Vec<&str> = item.split([':', '/']).collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.parse::<f64>().is_ok_and(|v| (0.0..=100.0).contains(&v)))
    {
        return Ok(parts.iter().map(|p| p.to_string()).collect());
    }
    let names: Vec<&str> = PERCENT_PRESETS.iter().map(|p| p.0).collect();
    bail!(
        "`{item}` is neither a preset ({}) nor six percents like 20:80:0:100:0:100",
        names.join(", ")
    )
}

/// Every combination of the sweeps' values, first sweep outermost.
fn grid(sweeps: &[Sweep]) -> Vec<Vec<(Param, Vec<String>)>> {
    let mut points = vec![Vec::new()];
    for sweep in sweeps {
        points = points
            .into_iter()
            .flat_map(|p| {
                sweep.values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push((sweep.param, v.clone()));
                    q
                })
            })
            .collect();
    }
    points
}

/// `args` without `--sweep`, `--sweep-out`, `--json` and the swept flags (with their values), in either the
/// `--flag value` or the `--flag=value` form.
fn strip_args(args: &[OsString], swept: &[Param]) -> Vec<OsString> {
    let mut remove: Vec<(&str, usize)> = vec![("--sweep", 1), ("--sweep-out", 1), ("--json", 0)];
    remove.extend(swept.iter().map(|p| (p.flag(), p.arity())));
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let text = args[i].to_str().unwrap_or("");
        if let Some((_, arity)) = remove.iter().find(|(f, _)| *f == text) {
            i += 1 + arity;
            continue;
        }
        if remove
            .iter()
            .any(|(f, _)| text.starts_with(f) && text[f.len()..].starts_with('='))
        {
            i += 1;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// What one point measured (the fields of `strata bench --json` the sweep reports).
#[derive(Debug, Clone, Default, Serialize)]
struct Measured {
    batch: usize,
    prefill_latency_s: f64,
    decode_latency_s: f64,
    total_latency_s: f64,
    prefill_throughput_tok_s: f64,
    decode_throughput_tok_s: f64,
    total_throughput_tok_s: f64,
    peak_gpu_bytes: u64,
    peak_cpu_bytes: u64,
    peak_disk_bytes: u64,
}

/// One point of the sweep.
#[derive(Debug, Clone, Serialize)]
struct Point {
    /// The placement's curve: the swept values other than batch sizes.
    series: String,
    /// The flags this point added.
    flags: String,
    /// The policy the run used, as flags.
    policy: String,
    #[serde(flatten)]
    measured: Option<Measured>,
    error: Option<String>,
}

/// A CSV row (flat, every column always present).
#[derive(Serialize)]
struct Row<'a> {
    series: &'a str,
    flags: &'a str,
    policy: &'a str,
    batch: Option<usize>,
    prefill_latency_s: Option<f64>,
    decode_latency_s: Option<f64>,
    total_latency_s: Option<f64>,
    prefill_throughput_tok_s: Option<f64>,
    decode_throughput_tok_s: Option<f64>,
    total_throughput_tok_s: Option<f64>,
    peak_gpu_bytes: Option<u64>,
    peak_cpu_bytes: Option<u64>,
    peak_disk_bytes: Option<u64>,
    error: &'a str,
}

/// The three files a sweep writes.
fn outputs(stem: &Path) -> [PathBuf; 3] {
    let stem = match stem.extension().and_then(|e| e.to_str()) {
        Some("svg" | "csv" | "json") => stem.with_extension(""),
        _ => stem.to_path_buf(),
    };
    ["csv", "json", "svg"].map(|ext| {
        let mut name = stem.as_os_str().to_owned();
        name.push(format!(".{ext}"));
        PathBuf::from(name)
    })
}

/// Runs the sweep. `specs` are the `--sweep` values; `out` is `--sweep-out`; `auto` whether `--policy auto` was
/// given; `json` whether to print the result as JSON.
pub fn run(specs: &[String], out: Option<&Path>, auto: bool, json: bool) -> anyhow::Result<()> {
    if auto {
        bail!("--sweep sets the policy flags it varies; drop --policy auto");
    }
    let sweeps = specs
        .iter()
        .map(|s| parse_sweep(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let swept: Vec<Param> = sweeps.iter().map(|s| s.param).collect();
    if let Some(p) = swept
        .iter()
        .enumerate()
        .find(|(i, p)| swept[..*i].contains(*p))
    {
        bail!(
            "--sweep {} is given twice; list every value in one --sweep",
            p.1.flag()
        );
    }
    let files = outputs(out.unwrap_or(Path::new("strata-sweep")));
    for file in &files {
        checks::output_file("--sweep-out", file)?;
    }
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let base = strip_args(&argv, &swept);
    let exe = std::env::current_exe().context("finding the strata binary to run each point")?;

    let points = grid(&sweeps);
    let mut results = Vec::new();
    let mut header: Option<serde_json::Value> = None;
    for (i, point) in points.iter().enumerate() {
        let mut extra: Vec<String> = vec!["--json".into()];
        for (param, value) in point {
            extra.push(param.flag().into());
            extra.extend(value.iter().cloned());
        }
        let flags = extra[1..].join(" ");
        let series = point
            .iter()
            .filter(|(p, _)| *p == Param::Percent)
            .map(|(p, v)| format!("{} {}", p.flag(), v.join(" ")))
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!("sweep point {}/{}: {flags}", i + 1, points.len());
        let output = Command::new(&exe)
            .args(&base)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let parsed = output
            .status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&output.stdout).ok())
            .flatten();
        let point = match parsed {
            Some(v) => {
                header.get_or_insert_with(|| v.clone());
                Point {
                    series,
                    flags,
                    policy: v["policy"].as_str().unwrap_or("").to_owned(),
                    measured: Some(measured(&v)),
                    error: None,
                }
            }
            None => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let reason = stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output")
                    .trim()
                    .to_owned();
                eprintln!("  failed: {reason}");
                Point {
                    series,
                    flags,
                    policy: String::new(),
                    measured: None,
                    error: Some(format!("{} ({reason})", output.status)),
                }
            }
        };
        results.push(point);
    }
    let Some(header) = header else {
        bail!(
            "every point of the sweep failed; the first: {}",
            results
                .first()
                .and_then(|p| p.error.clone())
                .unwrap_or_default()
        );
    };
    let model = header["model"].as_str().unwrap_or("").to_owned();
    let adapter = header["adapter"].as_str().unwrap_or("").to_owned();
    let prompt_len = header["prompt_len"].as_u64().unwrap_or(0) as usize;
    let gen_len = header["gen_len"].as_u64().unwrap_or(0) as usize;
    let published = peers::matching(&model, prompt_len, gen_len);

    let [csv_path, json_path, svg_path] = &files;
    write_csv(csv_path, &results)?;
    let document = serde_json::json!({
        "model": model,
        "adapter": adapter,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "points": results,
        "published": published,
    });
    std::fs::write(json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let caption = format!("{model}, prompt {prompt_len} + gen {gen_len}, {adapter}");
    plot::curves_svg(svg_path, &caption, &panels(&results, &published))?;

    if json {
        outln!("{}", serde_json::to_string(&document)?);
    } else {
        let rows = results.iter().map(|p| match &p.measured {
            Some(m) => vec![
                p.flags.clone(),
                m.batch.to_string(),
                format!("{:.3}", m.total_throughput_tok_s),
                format!("{:.3}", m.decode_throughput_tok_s),
                format!("{:.3}", m.total_latency_s),
            ],
            None => vec![p.flags.clone(), "failed".into()],
        });
        let header = ["point", "batch", "total tok/s", "decode tok/s", "latency s"];
        out!("{}", text_table(&header, &[1, 2, 3, 4], rows));
        for p in results.iter().filter(|p| p.measured.is_none()) {
            outln!("{} failed: {}", p.flags, p.error.as_deref().unwrap_or(""));
        }
        outln!(
            "wrote {}, {} and {}",
            csv_path.display(),
            json_path.display(),
            svg_path.display()
        );
    }
    Ok(())
}

fn measured(v: &serde_json::Value) -> Measured {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let peak = |t: &str| v["peak_bytes"][t].as_u64().unwrap_or(0);
    Measured {
        batch: v["prompts"].as_u64().unwrap_or(0) as usize,
        prefill_latency_s: f("prefill_latency_s"),
        decode_latency_s: f("decode_latency_s"),
        total_latency_s: f("total_latency_s"),
        prefill_throughput_tok_s: f("prefill_throughput_tok_s"),
        decode_throughput_tok_s: f("decode_throughput_tok_s"),
        total_throughput_tok_s: f("total_throughput_tok_s"),
        peak_gpu_bytes: peak("gpu"),
        peak_cpu_bytes: peak("cpu"),
        peak_disk_bytes: peak("disk"),
    }
}

fn write_csv(path: &Path, points: &[Point]) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for p in points {
        let m = p.measured.as_ref();
        w.serialize(Row {
            series: &p.series,
            flags: &p.flags,
            policy: &p.policy,
            batch: m.map(|m| m.batch),
            prefill_latency_s: m.map(|m| m.prefill_latency_s),
            decode_latency_s: m.map(|m| m.decode_latency_s),
            total_latency_s: m.map(|m| m.total_latency_s),
            prefill_throughput_tok_s: m.map(|m| m.prefill_throughput_tok_s),
            decode_throughput_tok_s: m.map(|m| m.decode_throughput_tok_s),
            total_throughput_tok_s: m.map(|m| m.total_throughput_tok_s),
            peak_gpu_bytes: m.map(|m| m.peak_gpu_bytes),
            peak_cpu_bytes: m.map(|m| m.peak_cpu_bytes),
            peak_disk_bytes: m.map(|m| m.peak_disk_bytes),
            error: p.error.as_deref().unwrap_or(""),
        })?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// The curve label of a series: "strata" plus its placement.
fn series_label(series: &str) -> String {
    if series.is_empty() {
        "strata".into()
    } else {
        format!("strata {series}")
    }
}

/// Total throughput, decode throughput and total latency against the batch: one curve per series (in order of first
/// appearance, points sorted by batch), the peers' points on the throughput panels.
fn panels(points: &[Point], published: &[Published]) -> Vec<CurvePanel> {
    let mut names: Vec<&str> = Vec::new();
    for p in points {
        if !names.contains(&p.series.as_str()) {
            names.push(&p.series);
        }
    }
    let curves = |value: &dyn Fn(&Measured) -> f64| -> Vec<Curve> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut pts: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.series == *name)
                    .filter_map(|p| p.measured.as_ref())
                    .map(|m| (m.batch as f64, value(m)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Curve {
                    label: series_label(name),
                    color: plot::color(i),
                    points: pts,
                    line: true,
                }
            })
            .collect()
    };
    let batches: Vec<f64> = points
        .iter()
        .filter_map(|p| p.measured.as_ref())
        .map(|m| m.batch as f64)
        .collect();
    let lo = batches.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = batches.iter().copied().fold(0.0, f64::max);
    let peer_curves = |value: &dyn Fn(&Published) -> Option<f64>| -> Vec<Curve> {
        published
            .iter()
            .filter_map(|p| Some((p, value(p)?)))
            .enumerate()
            .map(|(i, (p, v))| match p.batch {
                Some(b) => Curve {
                    label: format!("{} ({}, published)", p.system, p.hardware),
                    color: plot::color(names.len() + i),
                    points: vec![(b as f64, v)],
                    line: false,
                },
                // No batch published: a level across the swept batches.
                None => Curve {
                    label: format!("{} ({}, batch not published)", p.system, p.hardware),
                    color: plot::color(names.len() + i),
                    points: vec![(lo, v), (hi, v)],
                    line: true,
                },
            })
            .collect()
    };
    let x_desc = "effective batch (gpu batch size x GPU batches)".to_owned();
    let mut total = curves(&|m| m.total_throughput_tok_s);
    total.extend(peer_curves(&|p| p.total_tok_s));
    let mut decode = curves(&|m| m.decode_throughput_tok_s);
    decode.extend(peer_curves(&|p| p.decode_tok_s));
    vec![
        CurvePanel {
            title: "total throughput".into(),
            x_desc: x_desc.clone(),
            y_desc: "token/s".into(),
            curves: total,
        },
        CurvePanel {
            title: "decode throughput".into(),
            x_desc: x_desc.clone(),
            y_desc: "token/s".into(),
            curves: decode,
        },
        CurvePanel {
            title: "total latency".into(),
            x_desc,
            y_desc: "seconds".into(),
            curves: curves(&|m| m.total_latency_s),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn sweeps_parse_values_and_presets() {
        let s = parse_sweep("gpu-batch-size=1,4,16,64").unwrap();
        assert_eq!(s.param, Param::GpuBatchSize);
        assert_eq!(s.values, vec![vec!["1"], vec!["4"], vec!["16"], vec!["64"]]);
        let p = parse_sweep("percent=gpu,20:80:0:100:0:100").unwrap();
        assert_eq!(p.values[0], ["100", "0", "100", "0", "100", "0"]);
        assert_eq!(p.values[1], ["20", "80", "0", "100", "0", "100"]);
        for bad in [
            "gpu-batch-size",
            "gpu-batch-size=0",
            "gpu-batch-size=",
            "batch=1",
            "percent=nope",
            "percent=1:2:3",
        ] {
            assert!(parse_sweep(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_grid_is_every_combination() {
        let a = parse_sweep("gpu-batch-size=1,2").unwrap();
        let b = parse_sweep("percent=gpu,weights-cpu,all-cpu").unwrap();
        let g = grid(&[a, b]);
        assert_eq!(g.len(), 6);
        assert_eq!(g[1][0].1, ["1"]);
        assert_eq!(g[1][1].1, ["0", "100", "100", "0", "100", "0"]);
    }

    #[test]
    fn child_arguments_drop_the_sweep_and_swept_flags() {
        let args = os(&[
            "bench",
            "--model",
            "m",
            "--sweep",
            "gpu-batch-size=1,2",
            "--gpu-batch-size",
            "8",
            "--percent",
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
            "--sweep-out=x",
            "--json",
            "--gen-len",
            "4",
            "--num-gpu-batches=2",
        ]);
        let kept = strip_args(&args, &[Param::GpuBatchSize, Param::Percent]);
        assert_eq!(
            kept,
            os(&[
                "bench",
                "--model",
                "m",
                "--gen-len",
                "4",
                "--num-gpu-batches=2"
            ])
        );
    }

    #[test]
    fn published_points_join_the_throughput_panels_of_their_model_only() {
        let point = |batch: usize, tput: f64| Point {
            series: String::new(),
            flags: String::new(),
            policy: String::new(),
            measured: Some(Measured {
                batch,
                total_throughput_tok_s: tput,
                decode_throughput_tok_s: tput,
                total_latency_s: 1.0,
                ..Measured::default()
            }),
            error: None,
        };
        let points = [point(16, 3.0), point(64, 9.0)];
        let published = peers::matching("opt-30b", 512, 32);
        let panels = panels(&points, &published);
        let total = &panels[0].curves;
        assert_eq!(total[0].points, [(16.0, 3.0), (64.0, 9.0)]);
        let flex = total
            .iter()
            .find(|c| c.label == "FlexLLMGen (T4, published)")
            .unwrap();
        assert_eq!(
            (flex.points.as_slice(), flex.line),
            (&[(144.0, 7.32)][..], false)
        );
        // Without a published batch: a level across the swept batches.
        let petals = total
            .iter()
            .find(|c| c.label.starts_with("Petals"))
            .unwrap();
        assert_eq!(petals.points, [(16.0, 2.84), (64.0, 2.84)]);
        // Latency has no published points; another model or workload has none at all.
        assert_eq!(panels[2].curves.len(), 1);
        assert!(peers::matching("opt-30b", 128, 32).is_empty());
        assert!(peers::matching("opt-1.3b", 512, 32).is_empty());
    }

    #[test]
    fn outputs_share_a_stem() {
        let [c, j, s] = outputs(Path::new("out/run.svg"));
        assert_eq!(
            (c, j, s),
            (
                PathBuf::from("out/run.csv"),
                PathBuf::from("out/run.json"),
                PathBuf::from("out/run.svg")
            )
        );
        assert_eq!(outputs(Path::new("a.b"))[0], PathBuf::from("a.b.csv"));
    }
}
