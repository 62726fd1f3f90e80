//! Compiles strata's TOML model specs into typed, const-evaluable Rust.
//!
//! The pipeline, one module per stage, all on `proc_macro2` so each is unit tested with `cargo test -p strata-macros`:
//! `load` reads the directory named by the call, `spec` parses each file keeping every value's span,
//! `validate` checks the rules a runnable model needs, `expand` generates the items. Errors from every stage
//! are collected in a `diag::Ctxt` and reported together as `compile_error!`s naming `file:line:col`, the field
//! and the reason; the macro never panics on bad input.
#![deny(missing_docs)]

use proc_macro::TokenStream;

mod diag;
mod expand;
mod load;
#[cfg(test)]
mod props;
mod spec;
mod validate;

/// Generates one model type per `*.toml` spec in a directory (relative to the calling crate's `Cargo.toml`).
///
/// ```ignore
/// pub mod models {
///     strata::include_specs!("model_specs");           // every spec, always compiled
/// }
/// pub mod gated {
///     strata::include_specs!("model_specs", features); // spec `opt-1.3b` needs feature `all-models` or `opt-1-3b`
/// }
/// ```
///
/// For each spec `opt-1.3b` it emits `Opt1_3b` (implementing `strata::ModelSpec`), `Opt1_3bLayerWeights` and
/// `Opt1_3bWeights` (shape-typed tensors with a checked loader), and for the directory `ALL`, `ALIASES` and
/// `resolve`. With `features`, each spec's feature and `all-models` must be declared in the caller's `Cargo.toml`
/// (an undeclared one is a compile error, not a silently missing model). Editing a spec rebuilds the caller; to pick up added or removed files, give the calling crate a
/// `build.rs` printing `cargo:rerun-if-changed=<dir>`. Call it at most once per module.
#[proc_macro]
pub fn include_specs(input: TokenStream) -> TokenStream {
    load::include_specs(input.into()).into()
}
