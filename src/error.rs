//! [`Error`], the one error type of strata's library API, and the error types it wraps.
//!
//! Every fallible function of the facade returns [`Result`]. Each runtime failure keeps its own typed error as the
//! variant's payload (and as [`std::error::Error::source`]), so a caller can match on what went wrong; printing an
//! [`Error`] gives one sentence that says what to do. The error types the variants carry, and those they carry in
//! turn, are re-exported here so that a caller can name them.

use std::path::PathBuf;

pub use crate::convert::ConvertError;
pub use crate::hub::HubError;
pub use crate::resolve::UnknownModel;
pub use crate::typed::{LoadError, ShapeError};
pub use strata_runtime::checkpoint::CheckpointError;
pub use strata_runtime::config::ConfigError;
pub use strata_runtime::cost_model::auto::AutoError;
pub use strata_runtime::generate::GenerateError;
pub use strata_runtime::gpu::GpuError;
pub use strata_runtime::offload::policy::PolicyError;
pub use strata_runtime::tokenizer::TokenizerError;
// What the errors above carry, for callers that match deeper.
pub use strata_runtime::compress::CompressError;
pub use strata_runtime::cost_model::CostModelError;
pub use strata_runtime::hardware::measure::MeasureError;
pub use strata_runtime::hardware::HardwareError;
pub use strata_runtime::model::ModelError;
pub use strata_runtime::offload::placement::{CapError, CapExceeded, PlacementError};
pub use strata_runtime::offload::OffloadError;
pub use strata_runtime::tiers::{Tier, TierError};
pub use strata_runtime::weights::WeightError;

/// `Result` with strata's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in strata's library API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Generation failed: bad prompts or options, a run that does not fit, a failed step (with the tokens made
    /// before it, [`GenerateError::Stopped`]).
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The GPU could not be opened, ran out of memory or was lost.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A checkpoint directory could not be read (config.json, safetensors files).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The tokenizer files could not be read, or text could not be encoded or decoded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A Hugging Face Hub model could not be downloaded.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// PyTorch weights could not be converted to safetensors.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// A name that is neither a built-in model nor a model directory.
    #[error(transparent)]
    UnknownModel(#[from] UnknownModel),
    /// The offloading policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The automatic policy could not be chosen (no profile, nothing fits the caps).
    #[error(transparent)]
    Auto(#[from] AutoError),
    /// A model configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Shape-typed weights could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A built-in architecture was named without asking for synthetic weights.
    #[error(
        "`{name}` is a built-in architecture without weights: pass a checkpoint directory or Hub id instead, or set \
         `EngineOptions::dummy` for synthetic weights"
    )]
    NeedsWeights {
        /// The name as given.
        name: String,
    },
    /// A directory that is not a Hugging Face model directory.
    #[error("{} is not a model directory: {reason}", path.display())]
    NotAModel {
        /// The directory.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// Text was given to a model without a usable tokenizer.
    #[error(
        "`{model}` has no tokenizer ({reason}): give token ids with `Engine::generate_ids`, or a model directory \
         with tokenizer.json"
    )]
    NoTokenizer {
        /// The model.
        model: String,
        /// Why there is none.
        reason: String,
    },
    /// A typed engine was asked for a checkpoint of another architecture.
    #[error(
        "the engine is typed as `{expected}` but the checkpoint is `{found}`, another architecture ({}); use the \
         model type that matches the checkpoint, or the untyped `Engine`",
        differences.join(", ")
    )]
    Architecture {
        /// The compile-time model's name ([`crate::ModelSpec::NAME`]).
        expected: &'static str,
        /// The checkpoint's model name.
        found: String,
        /// Each differing field, as `field: expected's value vs found's`.
        differences: Vec<String>,
    },
}
