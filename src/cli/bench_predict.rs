//! What `strata bench` says about the cost model: strata's own formulation's prediction for the run's policy (from
//! the same hardware profile `--policy auto` chooses with) beside what the run measured, and their ratio, so the
//! model's error is visible on every benchmark.

use strata_runtime::config::OptConfig;
use strata_runtime::cost_model::{evaluate, Problem};
use strata_runtime::hardware::HardwareProfile;
use strata_runtime::offload::placement::{Caps, Workload};
use strata_runtime::offload::policy::Policy;

/// Seconds and token/s of the two phases and the whole run (predicted or measured).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phases {
    /// The first step (the prompt).
    pub prefill_s: f64,
    /// The other steps.
    pub decode_s: f64,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Tokens after the first per second.
    pub decode_tok_s: f64,
    /// Generated tokens per second overall.
    pub total_tok_s: f64,
}

impl Phases {
    fn total_s(&self) -> f64 {
        self.prefill_s + self.decode_s
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s(),
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "total_tok_s": self.total_tok_s,
        })
    }
}

/// The cost model's prediction for one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The hardware profile's name.
    pub profile: String,
    /// The predicted figures.
    pub predicted: Phases,
}

/// measured / predicted token/s (`None` where the prediction is zero: decode of a one-token run).
fn ratio(measured: f64, predicted: f64) -> Option<f64> {
    (predicted > 0.0 && measured.is_finite()).then(|| measured / predicted)
}

impl Prediction {
    /// strata's formulation evaluated at `policy` (its batch sizes, placement, attention and transfer path) for
    /// `workload` with `profile`'s speeds. Memory does not enter: the run's placement already fits.
    pub fn of(
        config: &OptConfig,
        workload: Workload,
        profile: &HardwareProfile,
        policy: &Policy,
    ) -> Result<Prediction, strata_runtime::cost_model::CostModelError> {
        let problem = Problem::new(config, workload, profile, Caps::default());
        let c = evaluate(problem, policy)?;
        Ok(Prediction {
            profile: profile.name.clone(),
            predicted: Phases {
                prefill_s: c.prefill_s,
                decode_s: c.decode_s,
                prefill_tok_s: c.prefill_throughput,
                decode_tok_s: c.decode_throughput,
                total_tok_s: c.total_throughput,
            },
        })
    }

    /// Per phase: measured token/s over predicted token/s.
    pub fn ratios(&self, measured: &Phases) -> [Option<f64>; 3] {
        let p = &self.predicted;
        [
            ratio(measured.prefill_tok_s, p.prefill_tok_s),
            ratio(measured.decode_tok_s, p.decode_tok_s),
            ratio(measured.total_tok_s, p.total_tok_s),
        ]
    }

    /// `{"cost_model", "profile", "predicted": {...}, "measured": {...}, "ratio": {"prefill", "decode", "total"}}`.
    pub fn json(&self, measured: &Phases) -> serde_json::Value {
        let [prefill, decode, total] = self.ratios(measured);
        serde_json::json!({
            "cost_model": "strata",
            "profile": self.profile,
            "predicted": self.predicted.json(),
            "measured": measured.json(),
            "ratio": {"prefill": prefill, "decode": decode, "total": total},
        })
    }

    /// Two lines: the prediction and the ratios.
    pub fn text(&self, measured: &Phases) -> String {
        let p = &self.predicted;
        let r = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
        let [prefill, decode, total] = self.ratios(measured);
        format!(
            "predicted (strata's cost model, profile {}): prefill {:.3} s ({:.3} token/s), decode {:.3} s ({:.3} \
             token/s), total {:.3} s ({:.3} token/s)\nmeasured / predicted token/s: prefill {}, decode {}, total {}",
            self.profile,
            p.prefill_s,
            p.prefill_tok_s,
            p.decode_s,
            p.decode_tok_s,
            p.total_s(),
            p.total_tok_s,
            r(prefill),
            r(decode),
            r(total)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_measured_over_predicted_and_the_prediction_is_the_cost_models() {
        let config = strata::get_opt_config("opt-125m").unwrap();
        let workload = Workload {
            prompt_len: 16,
            gen_len: 4,
        };
        let policy = Policy {
            gpu_batch_size: 2,
            ..Policy::default()
        };
        let profile = HardwareProfile::t4();
        let p = Prediction::of(&config, workload, &profile, &policy).unwrap();
        let direct = evaluate(
            Problem::new(&config, workload, &profile, Caps::default()),
            &policy,
        )
        .unwrap();
        assert_eq!(p.predicted.total_tok_s, direct.total_throughput);
        assert!(p.predicted.prefill_s > 0.0 && p.predicted.decode_s > 0.0);
        let measured = Phases {
            prefill_tok_s: p.predicted.prefill_tok_s * 2.0,
            decode_tok_s: p.predicted.decode_tok_s / 4.0,
            total_tok_s: 0.0,
            ..p.predicted
        };
        let [a, b, c] = p.ratios(&measured);
        assert!((a.unwrap() - 2.0).abs() < 1e-12 && (b.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(c, Some(0.0));
        let json = p.json(&measured);
        assert_eq!(json["ratio"]["decode"], b.unwrap());
        assert_eq!(json["predicted"]["total_tok_s"], direct.total_throughput);
        // A one-token run predicts no decode: no ratio rather than a division by zero.
        let one = Prediction::of(
            &config,
            Workload {
                prompt_len: 16,
                gen_len: 1,
            },
            &profile,
            &policy,
        )
        .unwrap();
        assert_eq!(one.ratios(&measured)[1], None);
    }
}
