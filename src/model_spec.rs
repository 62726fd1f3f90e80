//! The trait every generated model type implements.

use crate::typed::LoadError;
use crate::OptConfig;
use strata_runtime::weights::WeightSource;

/// A model architecture known at compile time: `strata::models::Opt30b` and every type `include_specs!` generates.
///
/// Everything is a constant, so a model can be chosen by type and checked in const context:
///
/// ```
/// # #[cfg(feature = "opt-125m")] {
/// use strata::ModelSpec;
/// type Model = strata::models::Opt125m;
/// const _: () = assert!(Model::CONFIG.model_bytes() < 1 << 30);
/// assert_eq!(Model::HEAD_DIM, 64);
/// # }
/// ```
///
/// The generated impls give every constant as a literal (shown in the docs); the defaults derive them from
/// [`ModelSpec::CONFIG`] for hand-written impls.
pub trait ModelSpec {
    /// The architecture.
    const CONFIG: OptConfig;
    /// Canonical name (`opt-1.3b`).
    const NAME: &'static str = Self::CONFIG.name;
    /// Other names run-time lookup accepts.
    const ALIASES: &'static [&'static str] = &[];
    /// Decoder layers.
    const NUM_HIDDEN_LAYERS: usize = Self::CONFIG.num_hidden_layers;
    /// Residual width.
    const HIDDEN_SIZE: usize = Self::CONFIG.hidden_size;
    /// Attention heads.
    const N_HEAD: usize = Self::CONFIG.n_head;
    /// Width of one head.
    const HEAD_DIM: usize = Self::CONFIG.head_dim();
    /// Feed-forward width.
    const FFN_EMBED_DIM: usize = Self::CONFIG.ffn_embed_dim;
    /// Token embedding width.
    const WORD_EMBED_PROJ_DIM: usize = Self::CONFIG.word_embed_proj_dim;
    /// Vocabulary size.
    const VOCAB_SIZE: usize = Self::CONFIG.vocab_size;
    /// Longest sequence.
    const MAX_SEQ_LEN: usize = Self::CONFIG.max_seq_len;
    /// Rows of the positional table (`MAX_SEQ_LEN + 2`).
    const NUM_POSITIONS: usize = Self::CONFIG.num_positions();
    /// Exact parameter count (every stored tensor, a tied head once).
    const PARAMS: u64 = Self::CONFIG.params();
    /// Exact bytes of the weights at the spec's dtype.
    const MODEL_BYTES: u64 = Self::CONFIG.model_bytes();

    /// One decoder layer's shape-typed weights.
    type LayerWeights;
    /// The whole model's shape-typed weights.
    type Weights;

    /// Loads every weight from `source`, checking each tensor's shape against its type.
    fn load_weights(source: &dyn WeightSource) -> Result<Self::Weights, LoadError>;
}
