//! Run-time model lookup: a user's model name to the config of a compiled-in spec, following FlexLLMGen's
//! `get_opt_config` (organisation prefix dropped, case ignored, `-iml` / `-iml-max` variants mapped to their base
//! architecture while the config keeps the full name).

use std::fmt;

use crate::OptConfig;
use strata_runtime::config::{intern_name, normalize_model_name};

/// A model name that matches no spec in the build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownModel {
    /// The name as given.
    pub name: String,
    /// The architecture name it was reduced to.
    pub arch: String,
    /// Canonical names of every model in the build.
    pub known: Vec<&'static str>,
    /// Every alias in the build.
    pub aliases: Vec<&'static str>,
}

impl fmt::Display for UnknownModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown model `{}`", self.name)?;
        if self.arch != self.name {
            write!(f, " (looked up as `{}`)", self.arch)?;
        }
        write!(f, "; known models: {}", self.known.join(", "))?;
        if !self.aliases.is_empty() {
            write!(f, "; aliases: {}", self.aliases.join(", "))?;
        }
        f.write_str(" (an organisation prefix such as `facebook/`, any case, and `-iml` / `-iml-max` variants are accepted)")
    }
}

impl std::error::Error for UnknownModel {}

/// A resolved name: the spec it maps to and the config to use (the spec's, renamed for `-iml` variants).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResolvedModel {
    /// The compiled-in spec: its `name` is the architecture (`opt-30b`).
    pub spec: &'static OptConfig,
    /// The config for the requested model: `spec` with the full name (`opt-iml-max-30b`).
    pub config: OptConfig,
}

/// Resolves `name` against `specs` and `aliases` (a generated module's `ALL` and `ALIASES`).
///
/// The name is reduced with [`normalize_model_name`]; the full lower-cased name is tried first (so an alias may
/// itself contain `-iml`), then the architecture. A canonical name or alias resolves to the spec's own name; an
/// `-iml` variant keeps its full name (interned, so the config stays `Copy` with a `&'static str`).
pub fn resolve_in(
    name: &str,
    specs: &[&'static OptConfig],
    aliases: &[(&'static str, &'static OptConfig)],
) -> Result<ResolvedModel, UnknownModel> {
    let (arch, full) = normalize_model_name(name);
    let find = |key: &str| {
        specs
            .iter()
            .copied()
            .find(|spec| spec.name.eq_ignore_ascii_case(key))
            .or_else(|| {
                aliases
                    .iter()
                    .find(|(alias, _)| alias.eq_ignore_ascii_case(key))
                    .map(|(_, spec)| *spec)
            })
    };
    if !full.is_empty() {
        if let Some(spec) = find(&full) {
            return Ok(ResolvedModel {
                spec,
                config: *spec,
            });
        }
        if let Some(spec) = find(&arch) {
            let config = if arch == full {
                *spec
            } else {
                spec.with_name(intern_name(&full))
            };
            return Ok(ResolvedModel { spec, config });
        }
    }
    Err(UnknownModel {
        name: name.to_owned(),
        arch,
        known: specs.iter().map(|spec| spec.name).collect(),
        aliases: aliases.iter().map(|(alias, _)| *alias).collect(),
    })
}

/// Resolves `name` against the models compiled into this build ([`crate::models::ALL`]).
pub fn resolve(name: &str) -> Result<ResolvedModel, UnknownModel> {
    crate::models::resolve(name)
}

/// The config of a built-in model by name, FlexLLMGen style: `facebook/OPT-30B`, `opt-iml-max-30b` (config named
/// `opt-iml-max-30b`, architecture of opt-30b) and spec aliases (`opt-1-3b`) all work. Override fields afterwards
/// with struct update syntax or the `with_*` builders.
pub fn get_opt_config(name: &str) -> Result<OptConfig, UnknownModel> {
    resolve(name).map(|resolved| resolved.config)
}
