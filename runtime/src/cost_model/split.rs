//! Where a chosen policy's predicted time goes: each time constraint of the formulation's linear program, evaluated
//! at the chosen fractions and split into its terms (the constant, which is compute, and one term per placement
//! fraction, which is that fraction's transfers, or the attention it adds). Read from the program itself, so the
//! split is the model's own arithmetic, whatever the formulation.

use super::lp::{Lp, NV, TGEN, TPRE};
use super::{flexllmgen, strata, Candidate, CapMode, CostModelKind, Problem};
use crate::offload::placement::WeightSummary;

/// What each of the nine placement fractions `[wg, wc, wn, cg, cc, cn, hg, hc, hn]` costs in a time constraint.
pub const FRACTION_NAMES: [&str; 9] = [
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

/// The name of a constraint's constant term.
pub const COMPUTE: &str = "compute";

/// One time constraint of a phase (a resource the formulation serialises, such as strata's GPU queue): its terms at
/// the chosen fractions, seconds per layer (prefill) or per layer and token (decode).
#[derive(Clone, Debug, PartialEq)]
pub struct Lane {
    /// What the constraint is.
    pub name: String,
    /// `(term, seconds)`, non-zero terms only: [`COMPUTE`] or one of [`FRACTION_NAMES`].
    pub terms: Vec<(&'static str, f64)>,
}

impl Lane {
    /// The lane's time: the sum of its terms.
    pub fn seconds(&self) -> f64 {
        self.terms.iter().map(|(_, s)| s).sum()
    }
}

/// The predicted time of both phases, lane by lane. A phase takes as long as its slowest lane (the program's
/// `T >= lane` rows).
#[derive(Clone, Debug, PartialEq)]
pub struct TimeSplit {
    /// Prefill, per layer.
    pub prefill: Vec<Lane>,
    /// Decode, per layer and generated token.
    pub decode: Vec<Lane>,
}

/// The split of `candidate` (as [`super::search`] or [`super::evaluate`] returned it in a `Choice`) under
/// `problem`, the same problem it was chosen for.
pub fn time_split(problem: &Problem, candidate: &Candidate) -> TimeSplit {
    let gbs = candidate.gpu_batch_size;
    let ngb = candidate.num_gpu_batches;
    let mode = CapMode {
        caps: problem.cap_array(),
        minimise: None,
    };
    let lp = match problem.kind {
        CostModelKind::FlexLlmGen => flexllmgen::build(problem, gbs, gbs * ngb, mode),
        CostModelKind::Strata => {
            let skeleton = strata::skeleton(problem, 1, 1, false);
            let weights = WeightSummary::new(problem.config, &skeleton);
            strata::build(
                problem,
                &weights,
                gbs,
                ngb,
                candidate.cpu_cache_compute,
                candidate.block_decode,
                mode,
            )
        }
    };
    let mut x = [0.0; NV];
    x[..9].copy_from_slice(&candidate.fractions);
    TimeSplit {
        prefill: lanes(&lp, TPRE, &x, problem.kind),
        decode: lanes(&lp, TGEN, &x, problem.kind),
    }
}

/// The rows `terms - T <= -constant` of the phase whose time variable is `t`, evaluated at `x`.
fn lanes(lp: &Lp, t: usize, x: &[f64; NV], kind: CostModelKind) -> Vec<Lane> {
    let rows: Vec<_> = lp
        .rows
        .iter()
        .filter(|r| !r.eq && r.coef[t] == -1.0)
        .collect();
    let names = lane_names(kind, t, rows.len());
    rows.iter()
        .zip(names)
        .map(|(row, name)| {
            let mut terms = Vec::new();
            if row.rhs < 0.0 {
                terms.push((COMPUTE, -row.rhs));
            }
            for (v, fraction) in FRACTION_NAMES.iter().enumerate() {
                let s = row.coef[v] * x[v];
                if s > 0.0 {
                    terms.push((*fraction, s));
                }
            }
            Lane { name, terms }
        })
        .collect()
}

/// Names of the formulations' time rows, in the order they are built; numbered when the count is unexpected.
fn lane_names(kind: CostModelKind, t: usize, count: usize) -> Vec<String> {
    let known: &[&str] = match (kind, t) {
        (CostModelKind::Strata, _) => &["GPU queue", "disk and CPU threads"],
        (CostModelKind::FlexLlmGen, TPRE) => &["to the GPU", "from the GPU", "GPU compute"],
        _ => &[],
    };
    if known.len() == count {
        known.iter().map(|s| s.to_string()).collect()
    } else {
        (1..=count).map(|i| format!("constraint {i}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptConfig;
    use crate::cost_model::{search, SearchKind};
    use crate::hardware::HardwareProfile;
    use crate::offload::placement::{Caps, Workload};

    #[test]
    fn the_slowest_lane_is_the_chosen_time() {
        let config = OptConfig::opt("opt-1.3b", 24, 32, 2048, 8192);
        let hardware = HardwareProfile::t4();
        for (kind, gpu) in [
            (CostModelKind::Strata, 2u64 << 30),
            (CostModelKind::FlexLlmGen, 2 << 30),
            (CostModelKind::Strata, 64 << 30),
        ] {
            let mut p = Problem::new(
                &config,
                Workload {
                    prompt_len: 512,
                    gen_len: 32,
                },
                &hardware,
                Caps {
                    gpu: Some(gpu),
                    cpu: Some(200 << 30),
                    disk: None,
                },
            );
            p.kind = kind;
            let choice = search(p, SearchKind::Improved).unwrap();
            let split = time_split(&p, &choice.candidate);
            for (lanes, t) in [
                (&split.prefill, choice.candidate.prefill_layer_s),
                (&split.decode, choice.candidate.decode_layer_s),
            ] {
                assert!(!lanes.is_empty());
                let slowest = lanes.iter().map(Lane::seconds).fold(0.0, f64::max);
                // The optimum makes T equal to its binding constraint.
                assert!(
                    (slowest - t).abs() <= 1e-6 * t.max(1e-12),
                    "{kind}: {slowest} vs {t}"
                );
            }
        }
    }
}
