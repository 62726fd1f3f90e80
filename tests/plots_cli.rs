//! The pictures: `strata policy --plot` and `strata bench --sweep` write SVGs whose drawn series are the data the
//! same commands report (read back by parsing the SVG: bar widths, curve vertices).

use std::path::Path;
use std::process::Command;

use roxmltree::{Document, Node};

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("strata runs");
    assert!(
        out.status.success(),
        "strata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The trimmed contents of every `<text>` element.
fn texts(doc: &Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_owned())
        .collect()
}

fn num(node: Node, attr: &str) -> f64 {
    node.attribute(attr).unwrap().parse().unwrap()
}

/// Filled rectangles: (fill, x, y, width).
fn rects(doc: &Document) -> Vec<(String, f64, f64, f64)> {
    doc.descendants()
        .filter(|n| n.has_tag_name("rect"))
        .filter_map(|n| {
            let fill = n.attribute("fill")?;
            (fill != "#FFFFFF" && fill != "none")
                .then(|| (fill.to_owned(), num(n, "x"), num(n, "y"), num(n, "width")))
        })
        .collect()
}

/// The colours `src/cli/plot.rs` gives key `i` (its COLORS), as SVG writes them.
fn key_color(i: usize) -> String {
    const COLORS: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = COLORS[i % 10];
    format!("#{r:02X}{g:02X}{b:02X}")
}

/// Rows of bar segments (grouped by y, top to bottom), each `(fill, width)` left to right.
fn bar_rows(rects: &[(String, f64, f64, f64)]) -> Vec<Vec<(String, f64)>> {
    let mut sorted = rects.to_vec();
    sorted.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.1.total_cmp(&b.1)));
    let mut rows: Vec<(f64, Vec<(String, f64)>)> = Vec::new();
    for (fill, _, y, w) in sorted {
        match rows.last_mut() {
            Some((ry, row)) if (*ry - y).abs() < 0.5 => row.push((fill, w)),
            _ => rows.push((y, vec![(fill, w)])),
        }
    }
    rows.into_iter().map(|r| r.1).collect()
}

/// Checks that one panel's rows draw `expected` (per row: `(key, value)` left to right, zeros skipped) at one
/// scale: every segment's width is its value times the scale, within pixel rounding.
fn assert_bars(rows: &[Vec<(String, f64)>], expected: &[Vec<(usize, f64)>], what: &str) {
    assert_eq!(rows.len(), expected.len(), "{what}: rows {rows:?}");
    let (mut px, mut value) = (0.0, 0.0);
    for (row, exp) in rows.iter().zip(expected) {
        for ((_, w), (_, v)) in row.iter().zip(exp) {
            if *v > value {
                (px, value) = (*w, *v);
            }
        }
    }
    let scale = px / value;
    for (row, exp) in rows.iter().zip(expected) {
        // Each expected segment is drawn in its key's colour at its width; a segment under a pixel or two may round
        // to nothing, and nothing else is drawn wider than that.
        for (key, v) in exp {
            let want = v * scale;
            let drawn = row.iter().find(|(fill, _)| *fill == key_color(*key));
            match drawn {
                Some((_, w)) => assert!(
                    (w - want).abs() <= 1.5,
                    "{what}: width {w} for {v} at {scale} px/unit"
                ),
                None => assert!(want < 2.0, "{what}: key {key} ({v}) not drawn in {row:?}"),
            }
        }
        for (fill, w) in row {
            let expected_here = exp.iter().any(|(key, _)| key_color(*key) == *fill);
            assert!(
                expected_here || *w <= 1.5,
                "{what}: unexpected {fill} {w} in {row:?}"
            );
        }
    }
}

#[test]
fn policy_plot_draws_the_plan_and_the_time_split_it_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let svg = tmp.path().join("policy.svg");
    let json: serde_json::Value = serde_json::from_str(&ok(strata()
        .args([
            "policy",
            "--model",
            "opt-6.7b",
            "--gpu-mem",
            "8GiB",
            "--cpu-mem",
            "64GiB",
            "--disk-mem",
            "1TiB",
            "--json",
            "--plot",
        ])
        .arg(&svg)))
    .unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = Document::parse(&text).unwrap();
    let rects = rects(&doc);

    // The placement: tiers GPU, CPU, disk are keys 2, 0, 1.
    let tier_colors = [key_color(2), key_color(0), key_color(1)];
    let gib = |v: &serde_json::Value, t: &str| v[t].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    let row = |key: &str| -> Vec<(usize, f64)> {
        ["gpu", "cpu", "disk"]
            .iter()
            .enumerate()
            .map(|(i, t)| ([2, 0, 1][i], gib(&json[key], t)))
            .filter(|(_, v)| *v > 0.0)
            .collect()
    };
    let working = json["gpu_working_bytes"].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    let working_cpu = json["cpu_working_bytes"].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    let memory_expected = vec![
        row("weights_bytes"),
        row("cache_bytes"),
        row("activation_bytes"),
        [(2, working), (0, working_cpu)]
            .into_iter()
            .filter(|(_, v)| *v > 0.0)
            .collect(),
    ];
    // The memory panel is on top: its rows are the first four rows of tier-coloured bars.
    let all_rows = bar_rows(&rects);
    let memory_rows: Vec<_> = all_rows.iter().take(4).cloned().collect();
    assert!(memory_rows
        .iter()
        .flatten()
        .all(|(fill, _)| tier_colors.contains(fill)));
    assert_bars(&memory_rows, &memory_expected, "placement");

    // The time split: compute is key 0, fraction i key i + 1; prefill lanes, then decode lanes, in milliseconds.
    let names = [
        "compute",
        "weights on GPU",
        "weights on CPU",
        "weights on disk",
        "cache on GPU",
        "cache on CPU",
        "cache on disk",
        "activations on GPU",
        "activations on CPU",
        "activations on disk",
    ];
    let lanes = |phase: &str| -> Vec<Vec<(usize, f64)>> {
        json["time_split"][phase]
            .as_array()
            .unwrap()
            .iter()
            .map(|lane| {
                lane["terms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| {
                        let key = names.iter().position(|n| *n == t["term"]).unwrap();
                        (key, t["seconds"].as_f64().unwrap() * 1e3)
                    })
                    .collect::<Vec<_>>()
            })
            // A lane with nothing to do (no disk, no CPU work) draws no bar.
            .filter(|terms| !terms.is_empty())
            .collect()
    };
    let prefill = lanes("prefill_per_layer");
    let decode = lanes("decode_per_layer_token");
    assert!(!prefill.is_empty() && !decode.is_empty());
    let rest = &all_rows[4..];
    assert_eq!(rest.len(), prefill.len() + decode.len());
    assert_bars(&rest[..prefill.len()], &prefill, "prefill");
    assert_bars(&rest[prefill.len()..], &decode, "decode");
    // The slowest decode lane is the predicted time per layer and token.
    let slowest = decode
        .iter()
        .map(|l| l.iter().map(|t| t.1).sum::<f64>())
        .fold(0.0, f64::max);
    let layers = 32.0;
    let gen = 31.0;
    let predicted = json["predicted_decode_s"].as_f64().unwrap() * 1e3 / (layers * gen);
    assert!(
        (slowest - predicted).abs() <= 1e-6 * predicted,
        "{slowest} vs {predicted}"
    );
    let texts = texts(&doc);
    for legend in [
        "GPU",
        "CPU",
        "weights on CPU",
        "compute",
        "weights",
        "KV cache",
    ] {
        assert!(
            texts.iter().any(|t| t == legend),
            "legend {legend}: {texts:?}"
        );
    }
}

/// The vertices of polylines stroked in `color`.
fn polylines(doc: &Document, color: &str) -> Vec<Vec<(f64, f64)>> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(color))
        .map(|n| {
            n.attribute("points")
                .unwrap()
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

/// `pixels` draw `data` on log-log axes: pixel offsets are one linear function of the logs per axis.
///
/// Each axis's scale comes from the two points farthest apart in it (in logs), so the check is as well-conditioned as
/// the data allows: measured throughputs of the first and last batch may be nearly equal, and a scale taken from
/// them would turn each vertex's rounding to whole pixels into errors of many pixels.
fn assert_log_log(pixels: &[(f64, f64)], data: &[(f64, f64)], what: &str) {
    assert_eq!(pixels.len(), data.len(), "{what}");
    let widest = |axis: fn(&(f64, f64)) -> f64| {
        let ln = |i: usize| axis(&data[i]).ln();
        let lo = (0..data.len())
            .min_by(|&a, &b| ln(a).total_cmp(&ln(b)))
            .unwrap();
        let hi = (0..data.len())
            .max_by(|&a, &b| ln(a).total_cmp(&ln(b)))
            .unwrap();
        (lo, hi, ln(hi) - ln(lo))
    };
    let (x_lo, x_hi, x_span) = widest(|p| p.0);
    assert!(x_span > 0.0, "{what}: the batches differ");
    let sx = (pixels[x_hi].0 - pixels[x_lo].0) / x_span;
    assert!(sx > 0.0, "{what}: x grows with the batch");
    let (y_lo, y_hi, y_span) = widest(|p| p.1);
    for (p, d) in pixels.iter().zip(data) {
        let from_lo = (d.0 / data[x_lo].0).ln();
        assert!(
            (p.0 - pixels[x_lo].0 - sx * from_lo).abs() <= 1.5,
            "{what}: x of {d:?}"
        );
        if y_span > 1e-9 {
            // SVG's y grows downwards.
            let sy = (pixels[y_lo].1 - pixels[y_hi].1) / y_span;
            let from_lo = (d.1 / data[y_lo].1).ln();
            assert!(
                (pixels[y_lo].1 - p.1 - sy * from_lo).abs() <= 1.5,
                "{what}: y of {d:?} at {p:?}"
            );
        }
    }
}

#[test]
fn bench_sweep_writes_csv_json_and_an_svg_of_what_it_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let stem = tmp.path().join("sweep");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-ln-relu");
    ok(strata()
        .args(["bench", "--model"])
        .arg(&fixture)
        .args([
            "--prompt-len",
            "8",
            "--gen-len",
            "4",
            "--sweep",
            "gpu-batch-size=1,2,4",
            "--sweep-out",
        ])
        .arg(&stem));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    let points = json["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    let field = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap();
    let batches: Vec<f64> = points.iter().map(|p| field(p, "batch")).collect();
    assert_eq!(batches, [1.0, 2.0, 4.0]);
    for p in points {
        assert!(p["error"].is_null(), "{p}");
        assert!(p["policy"]
            .as_str()
            .unwrap()
            .contains(&format!("--gpu-batch-size {}", p["batch"])));
    }

    // The CSV holds the same points.
    let mut csv = csv::Reader::from_path(stem.with_extension("csv")).unwrap();
    let headers = csv.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = csv.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 3);
    for (row, p) in rows.iter().zip(points) {
        for k in [
            "batch",
            "total_throughput_tok_s",
            "decode_throughput_tok_s",
            "total_latency_s",
        ] {
            let v: f64 = row[col(k)].parse().unwrap();
            assert!((v - field(p, k)).abs() <= 1e-9 * v.abs().max(1.0), "{k}");
        }
    }

    // The SVG: one curve per panel in the first series colour, through the measured values on log-log axes.
    let text = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    let doc = Document::parse(&text).unwrap();
    // Legend samples are two-point lines of the same colour; the curves have a vertex per point.
    let curves: Vec<Vec<(f64, f64)>> = polylines(&doc, &key_color(0))
        .into_iter()
        .filter(|p| p.len() == 3)
        .collect();
    assert_eq!(
        curves.len(),
        3,
        "total throughput, decode throughput, latency"
    );
    for (curve, key) in curves.iter().zip([
        "total_throughput_tok_s",
        "decode_throughput_tok_s",
        "total_latency_s",
    ]) {
        let data: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (field(p, "batch"), field(p, key)))
            .collect();
        assert_log_log(curve, &data, key);
    }
    let texts = texts(&doc);
    for t in [
        "strata",
        "total throughput",
        "decode throughput",
        "total latency",
    ] {
        assert!(texts.iter().any(|x| x == t), "{t}: {texts:?}");
    }
}
