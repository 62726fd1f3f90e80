//! SVG charts (plotters' SVG backend): curves on log-log axes (`bench --sweep`) and stacked horizontal bars
//! (`policy --plot`). Each curve is one `<polyline>` (plus one `<circle>` per point), each bar segment one `<rect>`
//! in its key's colour; legends use lines, never rectangles, so a reader of the SVG can tell data from decoration.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// One series on a log-log panel.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Legend text.
    pub label: String,
    /// Its colour.
    pub color: RGBColor,
    /// `(x, y)`, both positive; points that are not are left out.
    pub points: Vec<(f64, f64)>,
    /// Joined by a line (a measured series) or markers only (published points).
    pub line: bool,
}

/// One panel of curves.
#[derive(Debug, Clone)]
pub struct CurvePanel {
    /// Caption.
    pub title: String,
    /// Axis descriptions.
    pub x_desc: String,
    /// Axis descriptions.
    pub y_desc: String,
    /// The series.
    pub curves: Vec<Curve>,
}

/// One stacked bar: a category and its segments `(key index, value)`.
#[derive(Debug, Clone)]
pub struct Bar {
    /// The category (axis label).
    pub category: String,
    /// Segments left to right.
    pub segments: Vec<(usize, f64)>,
}

/// One panel of stacked horizontal bars.
#[derive(Debug, Clone)]
pub struct BarPanel {
    /// Caption.
    pub title: String,
    /// The value axis' description.
    pub x_desc: String,
    /// Segment kinds: legend text and colour.
    pub keys: Vec<(String, RGBColor)>,
    /// Bars, top to bottom.
    pub bars: Vec<Bar>,
}

/// Colours for series and keys, distinct and readable on white.
pub const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of series or key `i`.
pub fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

const PANEL_WIDTH: u32 = 640;
const PANEL_HEIGHT: u32 = 420;
const BAR_PANEL_HEIGHT: u32 = 300;

fn draw_err<E: std::error::Error + Send + Sync + 'static>(
    path: &Path,
) -> impl FnOnce(DrawingAreaErrorKind<E>) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e}", path.display())
}

/// A log axis' range around `values` (a factor of 1.5 of margin; a decade around a single value).
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || hi <= 0.0 {
        return 0.1..10.0;
    }
    if hi / lo < 1.01 {
        return lo / 3.0..hi * 3.0;
    }
    lo / 1.5..hi * 1.5
}

/// Writes panels of log-log curves side by side, with a caption above them.
pub fn curves_svg(path: &Path, caption: &str, panels: &[CurvePanel]) -> anyhow::Result<()> {
    let n = panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (PANEL_WIDTH * n, PANEL_HEIGHT + 40)).into_drawing_area();
    let err = draw_err(path);
    let result = (|| {
        root.fill(&WHITE)?;
        let root = root.titled(caption, ("sans-serif", 20))?;
        let areas = root.split_evenly((1, n as usize));
        for (area, panel) in areas.iter().zip(panels) {
            let valid = |c: &Curve| -> Vec<(f64, f64)> {
                c.points
                    .iter()
                    .copied()
                    .filter(|(x, y)| *x > 0.0 && *y > 0.0 && x.is_finite() && y.is_finite())
                    .collect()
            };
            let all: Vec<(f64, f64)> = panel.curves.iter().flat_map(valid).collect();
            let xr = log_range(all.iter().map(|p| p.0));
            let yr = log_range(all.iter().map(|p| p.1));
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(64)
                .build_cartesian_2d(xr.log_scale(), yr.log_scale())?;
            chart
                .configure_mesh()
                .x_desc(&panel.x_desc)
                .y_desc(&panel.y_desc)
                .x_label_formatter(&|x| format_number(*x))
                .y_label_formatter(&|y| format_number(*y))
                .draw()?;
            for curve in &panel.curves {
                let points = valid(curve);
                let color = curve.color;
                let legend = move |(x, y): (i32, i32)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                };
                if curve.line {
                    chart
                        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                        .label(&curve.label)
                        .legend(legend);
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                } else {
                    chart
                        .draw_series(
                            points
                                .iter()
                                .map(|&p| TriangleMarker::new(p, 6, color.filled())),
                        )?
                        .label(&curve.label)
                        .legend(legend);
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()
    })();
    result.map_err(err)
}

/// Writes panels of stacked horizontal bars, one above the other, under a caption and a smaller subtitle.
pub fn bars_svg(
    path: &Path,
    caption: &str,
    subtitle: &str,
    panels: &[BarPanel],
) -> anyhow::Result<()> {
    let n = panels.len().max(1) as u32;
    let root =
        SVGBackend::new(path, (PANEL_WIDTH + 260, BAR_PANEL_HEIGHT * n + 60)).into_drawing_area();
    let err = draw_err(path);
    let result = (|| {
        root.fill(&WHITE)?;
        let root = root.titled(caption, ("sans-serif", 20))?;
        let root = root.titled(subtitle, ("sans-serif", 13))?;
        let areas = root.split_evenly((n as usize, 1));
        for (area, panel) in areas.iter().zip(panels) {
            let (plot, legend_area) = area.split_horizontally(PANEL_WIDTH);
            let widest = panel
                .bars
                .iter()
                .map(|b| b.segments.iter().map(|s| s.1.max(0.0)).sum::<f64>())
                .fold(0.0, f64::max);
            let x_max = if widest > 0.0 { widest * 1.05 } else { 1.0 };
            let categories: Vec<String> = panel.bars.iter().map(|b| b.category.clone()).collect();
            let rows = categories.len().max(1) as i32;
            let top = (rows - 1).max(1);
            // A segmented integer range has one slot per value of `0..=end`: `rows` slots (two for a single bar).
            let mut chart = ChartBuilder::on(&plot)
                .caption(&panel.title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(150)
                .build_cartesian_2d(0f64..x_max, (0..(rows - 1).max(1)).into_segmented())?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .x_desc(&panel.x_desc)
                .x_label_formatter(&|x| format_number(*x))
                // Row 0 is at the bottom of the axis: the first bar goes in the top row.
                .y_label_formatter(&|y| match y {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(top - i)
                        .ok()
                        .and_then(|i| categories.get(i))
                        .cloned()
                        .unwrap_or_default(),
                    SegmentValue::Last => String::new(),
                })
                .y_labels(categories.len().max(1))
                .draw()?;
            for (i, bar) in panel.bars.iter().enumerate() {
                let row = top - i as i32;
                let mut left = 0.0;
                for &(key, value) in &bar.segments {
                    if value <= 0.0 {
                        continue;
                    }
                    let color = panel.keys.get(key).map_or(BLACK, |k| k.1);
                    let (y0, y1) = (SegmentValue::Exact(row), SegmentValue::Exact(row + 1));
                    let mut rect = Rectangle::new([(left, y0), (left + value, y1)], color.filled());
                    rect.set_margin(6, 6, 0, 0);
                    chart.draw_series(std::iter::once(rect))?;
                    left += value;
                }
            }
            // The key, drawn beside the panel as coloured lines and text.
            let used: Vec<usize> = (0..panel.keys.len())
                .filter(|k| {
                    panel
                        .bars
                        .iter()
                        .any(|b| b.segments.iter().any(|s| s.0 == *k && s.1 > 0.0))
                })
                .collect();
            for (i, &k) in used.iter().enumerate() {
                let (name, color) = &panel.keys[k];
                let y = 40 + 20 * i as i32;
                legend_area.draw(&PathElement::new(
                    vec![(10, y), (34, y)],
                    color.stroke_width(8),
                ))?;
                legend_area.draw(&Text::new(
                    name.clone(),
                    (42, y - 7),
                    ("sans-serif", 14).into_font(),
                ))?;
            }
        }
        root.present()
    })();
    result
        .map_err(err)
        .with_context(|| format!("writing {}", path.display()))
}

/// A short axis label: 3 significant digits, k/M/G suffixes above a thousand.
pub fn format_number(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = scaled.abs();
    let text = if s == 0.0 || s >= 100.0 {
        format!("{scaled:.0}")
    } else if s >= 10.0 {
        format!("{scaled:.1}")
    } else if s >= 1.0 {
        format!("{scaled:.2}")
    } else {
        format!("{scaled:.3}")
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svg(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// The trimmed contents of every `<text>` element.
    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_owned())
            .collect()
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    #[test]
    fn a_curve_is_one_polyline_through_its_points_on_log_axes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let data = [(1.0, 10.0), (4.0, 40.0), (16.0, 80.0), (64.0, 100.0)];
        let panel = CurvePanel {
            title: "t".into(),
            x_desc: "batch".into(),
            y_desc: "token/s".into(),
            curves: vec![Curve {
                label: "strata".into(),
                color: color(0),
                points: data.to_vec(),
                line: true,
            }],
        };
        curves_svg(&path, "caption", &[panel]).unwrap();
        let text = svg(&path);
        let doc = roxmltree::Document::parse(&text).unwrap();
        let line = doc
            .descendants()
            .find(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(&hex(color(0))))
            .expect("the series' polyline");
        let pts: Vec<(f64, f64)> = line
            .attribute("points")
            .unwrap()
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert_eq!(pts.len(), data.len());
        // Log axes: equal ratios in x are equal pixel steps; y pixels fall as log(y) rises, proportionally.
        let sx = (pts[1].0 - pts[0].0) / (4f64).ln();
        let sy = (pts[0].1 - pts[1].1) / (4f64).ln();
        for (p, d) in pts.iter().zip(&data) {
            assert!((p.0 - pts[0].0 - sx * d.0.ln()).abs() <= 1.5, "{p:?} {d:?}");
            assert!(
                (pts[0].1 - p.1 - sy * (d.1 / 10.0).ln()).abs() <= 1.5,
                "{p:?} {d:?}"
            );
        }
        assert!(texts(&doc).contains(&"strata".to_owned()), "legend text");
    }

    #[test]
    fn bar_segments_are_rects_as_wide_as_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.svg");
        let panel = BarPanel {
            title: "memory".into(),
            x_desc: "GiB".into(),
            keys: vec![("GPU".into(), color(2)), ("CPU".into(), color(0))],
            bars: vec![
                Bar {
                    category: "weights".into(),
                    segments: vec![(0, 3.0), (1, 1.0)],
                },
                Bar {
                    category: "cache".into(),
                    segments: vec![(0, 2.0)],
                },
            ],
        };
        bars_svg(&path, "caption", "subtitle", &[panel]).unwrap();
        let text = svg(&path);
        let doc = roxmltree::Document::parse(&text).unwrap();
        let widths = |c: RGBColor| -> Vec<f64> {
            doc.descendants()
                .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(&hex(c)))
                .map(|n| n.attribute("width").unwrap().parse().unwrap())
                .collect()
        };
        let gpu = widths(color(2));
        let cpu = widths(color(0));
        assert_eq!((gpu.len(), cpu.len()), (2, 1));
        let unit = gpu[0] / 3.0;
        assert!((gpu[1] - 2.0 * unit).abs() <= 1.5 && (cpu[0] - unit).abs() <= 1.5);
        let texts = texts(&doc);
        assert!(["weights", "CPU"]
            .iter()
            .all(|t| texts.contains(&t.to_string())));
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(format_number(1.0), "1");
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_number(1500.0), "1.5k");
        assert_eq!(format_number(64.0), "64");
        assert_eq!(format_number(2.5e9), "2.5G");
    }
}
