//! The sampling flags `generate` shares with its batch jobs (and `serve` with its requests), and their conventions:
//! `--temperature 0` is greedy (as llama.cpp, vLLM and the OpenAI API), a sampled run's seed is random unless
//! `--seed` fixes it, and `--seed` alone never changes the mode.

use anyhow::bail;

use super::headings;
use strata_runtime::generate::{Sampling, TokenChoice};

/// Sampling flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Greedy decoding (the default; same as --temperature 0).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"], help_heading = headings::SAMPLING)]
    pub greedy: bool,
    /// Sample with this softmax temperature; 0 is greedy.
    #[arg(long, value_name = "T", help_heading = headings::SAMPLING)]
    pub temperature: Option<f32>,
    /// Sample from the smallest set of most likely tokens whose probability reaches P (samples at temperature 1
    /// when --temperature is not given).
    #[arg(long, value_name = "P", help_heading = headings::SAMPLING)]
    pub top_p: Option<f32>,
    /// Sample from the K most likely tokens only (0: all; samples at temperature 1 when --temperature is not given).
    #[arg(long, value_name = "K", help_heading = headings::SAMPLING)]
    pub top_k: Option<usize>,
    /// Seed of a sampled run (default: random, printed on stderr and in --json). Does not turn sampling on.
    #[arg(long, value_name = "S", help_heading = headings::SAMPLING)]
    pub seed: Option<u64>,
    /// Hugging Face's repetition penalty: the logit of every token already in the prompt or the output is divided
    /// by R when positive, multiplied when negative (1: none). Applies to greedy and sampled runs.
    #[arg(long, value_name = "R", help_heading = headings::SAMPLING)]
    pub repetition_penalty: Option<f32>,
    /// Stop a sequence when its text contains STRING (repeatable); the text ends before it (needs a tokenizer).
    #[arg(long, value_name = "STRING", help_heading = headings::SAMPLING)]
    pub stop: Vec<String>,
}

/// The settings the flags resolve to.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingSettings {
    /// The choice of every sequence (a job's lines may override parts of it).
    pub choice: TokenChoice,
    /// The run's seed: the one given, or a random one (used only when sampling).
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl SamplingSettings {
    /// Whether tokens are drawn rather than chosen greedily.
    pub fn samples(&self) -> bool {
        matches!(self.choice.sampling, Sampling::Sample { .. })
    }
}

/// A fresh random seed below 2^32 (short to type back), from the OS-seeded hasher std gives every process.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() & 0xffff_ffff
}

/// The token choice of these parameters: sampling when `temperature` > 0, or when it is absent and `top_p` or
/// `top_k` is given; greedy otherwise. Checked (the message names the parameter as `names` spells it).
pub fn choice_of(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    seed: u64,
    names: [&str; 4],
) -> anyhow::Result<TokenChoice> {
    let [t_name, p_name, _, r_name] = names;
    if let Some(t) = temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("{t_name} {t}: must be 0 (greedy) or a positive number");
        }
    }
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("{p_name} {p}: must be in (0, 1]");
        }
    }
    let penalty = repetition_penalty.unwrap_or(1.0);
    if !(penalty > 0.0 && penalty.is_finite()) {
        bail!("{r_name} {penalty}: must be a positive number (1: no penalty)");
    }
    let samples = match temperature {
        Some(t) => t > 0.0,
        None => top_p.is_some() || top_k.is_some_and(|k| k > 0),
    };
    let sampling = if samples {
        Sampling::Sample {
            temperature: temperature.unwrap_or(1.0),
            top_p: top_p.unwrap_or(1.0),
            seed,
        }
    } else {
        Sampling::Greedy
    };
    Ok(TokenChoice {
        sampling,
        top_k: if samples { top_k.unwrap_or(0) } else { 0 },
        repetition_penalty: penalty,
    })
}

impl SamplingArgs {
    /// The settings: checked, the seed chosen.
    pub fn settings(&self) -> anyhow::Result<SamplingSettings> {
        let seed = self.seed.unwrap_or_else(random_seed);
        let choice = choice_of(
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            seed,
            [
                "--temperature",
                "--top-p",
                "--top-k",
                "--repetition-penalty",
            ],
        )?;
        if self.stop.iter().any(String::is_empty) {
            bail!("--stop \"\": a stop string needs at least one character");
        }
        Ok(SamplingSettings {
            choice,
            seed,
            stop: self.stop.clone(),
        })
    }
}

/// The sampling parameters as JSON (strata's `--json` documents).
pub fn choice_json(choice: &TokenChoice) -> serde_json::Value {
    match choice.sampling {
        Sampling::Greedy => serde_json::json!({
            "mode": "greedy",
            "repetition_penalty": choice.repetition_penalty,
        }),
        Sampling::Sample {
            temperature,
            top_p,
            seed,
        } => serde_json::json!({
            "mode": "sample",
            "temperature": temperature,
            "top_p": top_p,
            "top_k": choice.top_k,
            "repetition_penalty": choice.repetition_penalty,
            "seed": seed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut SamplingArgs)) -> SamplingArgs {
        let mut a = SamplingArgs::default();
        f(&mut a);
        a
    }

    #[test]
    fn temperature_zero_is_greedy_and_seed_alone_changes_nothing() {
        let greedy = args(|a| a.temperature = Some(0.0)).settings().unwrap();
        assert_eq!(greedy.choice, TokenChoice::GREEDY);
        let seeded = args(|a| a.seed = Some(7)).settings().unwrap();
        assert_eq!(seeded.choice, TokenChoice::GREEDY);
        assert_eq!(seeded.seed, 7);
        let sampled = args(|a| {
            a.temperature = Some(0.8);
            a.seed = Some(7);
        })
        .settings()
        .unwrap();
        assert_eq!(
            sampled.choice.sampling,
            Sampling::Sample {
                temperature: 0.8,
                top_p: 1.0,
                seed: 7
            }
        );
        // top-k alone samples at temperature 1; with temperature 0 it is ignored.
        let k = args(|a| a.top_k = Some(5)).settings().unwrap();
        assert!(k.samples() && k.choice.top_k == 5);
        let k0 = args(|a| {
            a.top_k = Some(5);
            a.temperature = Some(0.0)
        })
        .settings()
        .unwrap();
        assert_eq!(k0.choice, TokenChoice::GREEDY);
    }

    #[test]
    fn default_seeds_differ_and_bad_values_are_named() {
        let a = args(|a| a.temperature = Some(1.0)).settings().unwrap();
        let b = args(|a| a.temperature = Some(1.0)).settings().unwrap();
        assert_ne!(a.seed, b.seed);
        let err = |f: fn(&mut SamplingArgs)| args(f).settings().unwrap_err().to_string();
        assert!(err(|a| a.temperature = Some(-1.0)).contains("--temperature -1"));
        assert!(err(|a| a.top_p = Some(0.0)).contains("--top-p 0"));
        assert!(err(|a| a.repetition_penalty = Some(0.0)).contains("--repetition-penalty"));
        assert!(err(|a| a.stop = vec![String::new()]).contains("--stop"));
    }
}
