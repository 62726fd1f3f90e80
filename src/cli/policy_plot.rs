//! `strata policy --plot FILE.svg`: the chosen policy's placement (GiB per tier for weights, KV cache, activations
//! and working buffers, from strata's memory plan) and its predicted time split (each time constraint of the cost
//! model at the chosen fractions: compute and each fraction's transfers, `strata_runtime::cost_model::time_split`).

use std::path::Path;

use serde_json::json;
use strata_runtime::config::OptConfig;
use strata_runtime::cost_model::{Choice, Lane, TimeSplit, COMPUTE, FRACTION_NAMES};
use strata_runtime::hardware::HardwareProfile;
use strata_runtime::offload::placement::TierBytes;

use super::plot::{self, Bar, BarPanel};

const GIB: f64 = (1u64 << 30) as f64;

/// The tiers' keys, in bar order.
pub const TIERS: [&str; 3] = ["GPU", "CPU", "disk"];

fn tier_bar(category: &str, t: TierBytes) -> Bar {
    Bar {
        category: category.into(),
        segments: vec![
            (0, t.gpu as f64 / GIB),
            (1, t.cpu as f64 / GIB),
            (2, t.disk as f64 / GIB),
        ],
    }
}

/// The time keys: compute first, then the fractions.
fn time_keys() -> Vec<(String, plotters::style::RGBColor)> {
    std::iter::once(COMPUTE)
        .chain(FRACTION_NAMES)
        .enumerate()
        .map(|(i, name)| (name.to_owned(), plot::color(i)))
        .collect()
}

fn lane_bars(phase: &str, lanes: &[Lane], unit: f64) -> Vec<Bar> {
    let keys = time_keys();
    lanes
        .iter()
        .map(|lane| Bar {
            category: format!("{phase}: {}", lane.name),
            segments: lane
                .terms
                .iter()
                .map(|(name, s)| {
                    let key = keys.iter().position(|k| k.0 == *name).unwrap_or(0);
                    (key, s * unit)
                })
                .collect(),
        })
        .collect()
}

/// Draws the placement and the time split into `path`.
pub fn write(
    path: &Path,
    config: &OptConfig,
    hardware: &HardwareProfile,
    choice: &Choice,
    split: &TimeSplit,
) -> anyhow::Result<()> {
    let plan = &choice.plan;
    let tier_keys = TIERS
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), plot::color([2, 0, 1][i])))
        .collect();
    let memory = BarPanel {
        title: "placement (strata's memory plan)".into(),
        x_desc: "GiB".into(),
        keys: tier_keys,
        bars: vec![
            tier_bar("weights", plan.weights),
            tier_bar("KV cache", plan.cache),
            tier_bar("activations", plan.activations),
            tier_bar("working + staging", plan.working.plus(plan.staging)),
        ],
    };
    let prefill = BarPanel {
        title: "predicted prefill time per layer".into(),
        x_desc: "milliseconds".into(),
        keys: time_keys(),
        bars: lane_bars("prefill", &split.prefill, 1e3),
    };
    let decode = BarPanel {
        title: "predicted decode time per layer and token".into(),
        x_desc: "milliseconds".into(),
        keys: time_keys(),
        bars: lane_bars("decode", &split.decode, 1e3),
    };
    let caption = format!(
        "{} on {} ({} cost model): {:.3} token/s predicted",
        config.name, hardware.name, choice.kind, choice.total_throughput
    );
    plot::bars_svg(
        path,
        &caption,
        &choice.policy.to_flags(),
        &[memory, prefill, decode],
    )
}

/// The split as JSON: per phase, each lane's name, seconds and terms.
pub fn split_json(split: &TimeSplit) -> serde_json::Value {
    let lanes = |lanes: &[Lane]| -> serde_json::Value {
        lanes
            .iter()
            .map(|l| {
                json!({
                    "lane": l.name,
                    "seconds": l.seconds(),
                    "terms": l.terms.iter().map(|(n, s)| json!({"term": n, "seconds": s})).collect::<Vec<_>>(),
                })
            })
            .collect()
    };
    json!({
        "prefill_per_layer": lanes(&split.prefill),
        "decode_per_layer_token": lanes(&split.decode),
    })
}
