//! What `--model NAME_OR_DIR` with `--weights DIR` / `--dummy` means, shared by `generate` and `bench`.
//!
//! A built-in name wins over a same-named directory in the current directory unless the argument is a path (it
//! contains a separator: `./opt-125m`); with `--weights DIR`, DIR's config.json must be the named architecture. A
//! Hub id (`facebook/opt-1.3b`, no such path) without `--dummy` or `--weights` is downloaded ([`strata::hub`]).

use std::path::{Path, PathBuf};

use anyhow::bail;
use strata::UnknownModel;
use strata_runtime::checkpoint::{self, Checkpoint};
use strata_runtime::config::OptConfig;
use strata_runtime::dummy::DummyWeights;
use strata_runtime::weights::WeightSource;

/// The model a run uses and where its weights come from.
#[derive(Debug)]
pub enum ModelChoice {
    /// A model directory (config.json, weights, maybe a tokenizer).
    Dir(PathBuf),
    /// A built-in architecture, with a checkpoint directory holding its weights, or none (synthetic weights).
    Named {
        /// The architecture.
        config: OptConfig,
        /// `--weights DIR`.
        weights: Option<PathBuf>,
    },
}

/// Whether `arg` reads as a path rather than a model name: it contains a path separator (`./opt-125m`,
/// `models/opt`). A path that does not exist may still be a name with an organisation prefix (`facebook/opt-125m`).
fn is_path(arg: &str) -> bool {
    arg.contains('/') || arg.contains(std::path::MAIN_SEPARATOR)
}

/// Resolves `--model ARG`. `weights` is `--weights DIR`; `dummy` is `--dummy` (a name then never turns into a
/// same-named directory). Only config files are read.
pub fn resolve(arg: &str, weights: Option<&Path>, dummy: bool) -> anyhow::Result<ModelChoice> {
    let as_dir = Path::new(arg);
    let has_config = as_dir.join(checkpoint::CONFIG_FILE).is_file();
    if is_path(arg) {
        if has_config {
            if weights.is_some() {
                bail!(
                    "--model {arg} is a model directory and --weights names another: pass the directory with --model, \
                     or a model name with --weights"
                );
            }
            return Ok(ModelChoice::Dir(as_dir.to_path_buf()));
        }
        if as_dir.is_dir() {
            bail!("{arg} has no config.json: pass a Hugging Face model directory");
        }
        // `facebook/opt-1.3b` with neither --dummy nor --weights: a Hugging Face Hub model, downloaded (or taken
        // from the cache). With one of them it is a built-in name with an organisation prefix.
        if !as_dir.exists() && !dummy && weights.is_none() && strata::hub::is_hub_id(arg) {
            let options = strata::hub::HubOptions::from_env();
            return Ok(ModelChoice::Dir(strata::hub::download(arg, &options)?));
        }
        // `facebook/opt-125m`: a name with an organisation prefix, when no such directory exists.
        if strata::get_opt_config(arg).is_err() {
            bail!("model directory {arg} does not exist");
        }
    }
    match strata::get_opt_config(arg) {
        Ok(config) => {
            if has_config {
                eprintln!(
                    "note: `{arg}` is the built-in model; to use the directory of that name, pass ./{arg}"
                );
            }
            if let Some(dir) = weights {
                check_architecture(&config, dir)?;
            }
            Ok(ModelChoice::Named {
                config,
                weights: weights.map(Path::to_path_buf),
            })
        }
        Err(unknown) if has_config => {
            if weights.is_some() {
                bail!(
                    "--model {arg} is a model directory and --weights names another: pass one of them ({unknown})"
                );
            }
            Ok(ModelChoice::Dir(as_dir.to_path_buf()))
        }
        Err(unknown) if as_dir.is_dir() => {
            bail!("{arg} has no config.json and is not a model name ({unknown})")
        }
        Err(unknown) if dummy || weights.is_some() => Err(unknown_model(unknown)),
        Err(unknown) => bail!(
            "`{arg}` is not a model directory: give a directory with config.json, or a model name with --weights DIR \
             (a checkpoint) or --dummy (synthetic weights); {}",
            unknown_model(unknown)
        ),
    }
}

/// The closest known model name or alias to what the user typed, when one is close enough to be a likely typo
/// (Jaro-Winkler similarity of at least 0.8, as clap uses for flags and subcommands).
pub fn closest_model(unknown: &UnknownModel) -> Option<&'static str> {
    let typed = unknown.arch.to_ascii_lowercase();
    unknown
        .known
        .iter()
        .chain(&unknown.aliases)
        .map(|&name| {
            (
                strsim::jaro_winkler(&typed, &name.to_ascii_lowercase()),
                name,
            )
        })
        .filter(|&(score, _)| score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| name)
}

/// An unknown model as an error: its message, then the closest name when there is one.
pub fn unknown_model(unknown: UnknownModel) -> anyhow::Error {
    match closest_model(&unknown) {
        Some(name) => anyhow::anyhow!("{unknown}; did you mean `{name}`?"),
        None => unknown.into(),
    }
}

/// Refuses `--weights DIR` whose config.json is another architecture than `config` (the named model).
fn check_architecture(config: &OptConfig, dir: &Path) -> anyhow::Result<()> {
    let found = checkpoint::read_config(dir)?;
    let differences = config.architecture_differences(&found);
    if !differences.is_empty() {
        bail!(
            "--model {} but --weights {} holds another architecture ({}'s config.json differs: {}); pass the model \
             name that matches the checkpoint, or the directory alone as --model {}",
            config.name,
            dir.display(),
            dir.display(),
            differences.join(", "),
            dir.display()
        );
    }
    Ok(())
}

impl ModelChoice {
    /// The directory holding config.json (and maybe a tokenizer), if any.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelChoice::Dir(dir) => Some(dir),
            ModelChoice::Named { weights, .. } => weights.as_deref(),
        }
    }

    /// [`ModelChoice::open`] for commands whose output is the model's text (`generate`, `serve`): a built-in name
    /// without `--weights` needs `--dummy` said explicitly, so synthetic weights are never used by accident.
    pub fn open_for_text(&self, dummy: bool) -> anyhow::Result<Box<dyn WeightSource>> {
        if let ModelChoice::Named {
            config,
            weights: None,
        } = self
        {
            if !dummy {
                bail!(
                    "`{}` is a built-in model: add --weights DIR (its checkpoint) or --dummy (synthetic weights)",
                    config.name
                );
            }
        }
        self.open(dummy)
    }

    /// Opens the weights: the checkpoint, or synthetic weights when `dummy` or no checkpoint is given. Maps files
    /// and reads headers only.
    pub fn open(&self, dummy: bool) -> anyhow::Result<Box<dyn WeightSource>> {
        Ok(match (self, dummy) {
            (ModelChoice::Dir(dir), false) => Box::new(Checkpoint::open(dir)?),
            (ModelChoice::Dir(dir), true) => {
                Box::new(DummyWeights::new(checkpoint::read_config(dir)?))
            }
            (
                ModelChoice::Named {
                    weights: Some(dir), ..
                },
                false,
            ) => Box::new(Checkpoint::open(dir)?),
            (ModelChoice::Named { config, .. }, _) => Box::new(DummyWeights::new(*config)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_miss_suggests_the_closest_name() {
        let unknown = |name: &str| strata::get_opt_config(name).unwrap_err();
        assert_eq!(closest_model(&unknown("opt-13")), Some("opt-13b"));
        assert_eq!(closest_model(&unknown("opt-6.7")), Some("opt-6.7b"));
        assert_eq!(
            closest_model(&unknown("facebook/OPT-350")),
            Some("opt-350m")
        );
        assert_eq!(closest_model(&unknown("llama-7b")), None);
        let message = unknown_model(unknown("opt-13")).to_string();
        assert!(message.ends_with("did you mean `opt-13b`?"), "{message}");
    }

    #[test]
    fn paths_are_told_from_names() {
        assert!(is_path("./opt-125m"));
        assert!(is_path("models/opt-125m"));
        assert!(!is_path("opt-125m"));
        assert!(!is_path("facebook_opt"));
    }
}
