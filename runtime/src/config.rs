//! The architecture of one OPT-family model, and the memory it needs.
//!
//! [`OptConfig`] is plain data with `const fn` accessors, so a generated spec (`strata::models::Opt30b::CONFIG`) can be
//! checked against a memory budget in a `const _: () = assert!(...)` at compile time. The same type describes a model
//! read from a Hugging Face `config.json` at run time (see [`crate::checkpoint`]).

use std::fmt;

/// Element type of stored weights (and of the KV cache and activations in FlexLLMGen's memory formulas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision, the dtype OPT checkpoints ship in.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> u64 {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The name used in specs, config.json and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
        }
    }

    /// Parses the names Hugging Face, safetensors and strata's CLI use (`float16`, `fp16`, `f16`, `half`, ...).
    pub fn parse(name: &str) -> Option<DType> {
        match name.to_ascii_lowercase().as_str() {
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)`: every OPT model.
    Relu,
    /// The exact (erf) GELU: Galactica.
    Gelu,
}

impl Activation {
    /// The name used in specs and config.json.
    pub const fn as_str(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
        }
    }

    /// Parses `relu`, `gelu` (and Hugging Face's `gelu_new`-style spellings are rejected: OPT uses the exact GELU).
    pub fn parse(name: &str) -> Option<Activation> {
        match name.to_ascii_lowercase().as_str() {
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The architecture of an OPT-family model. Field names follow FlexLLMGen's `OptConfig` where it has one.
///
/// Every field is public: override any of them with struct update syntax
/// (`OptConfig { dtype: DType::F32, ..Opt125m::CONFIG }`) or the `with_*` builders.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptConfig {
    /// The model's full name (`opt-iml-max-30b` keeps its name while using opt-30b's architecture).
    pub name: &'static str,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Attention heads per layer.
    pub n_head: usize,
    /// Width of the feed-forward layer (fc1's output).
    pub ffn_embed_dim: usize,
    /// Width of the token embeddings; differs from `hidden_size` only where project_in / project_out exist (opt-350m).
    pub word_embed_proj_dim: usize,
    /// Vocabulary size (rows of the embedding and of the logits).
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the positional table covers; the table has `max_seq_len + 2` rows.
    pub max_seq_len: usize,
    /// Padding token id (also the positional row padding reads).
    pub pad_token_id: u32,
    /// Beginning-of-sequence token id.
    pub bos_token_id: u32,
    /// End-of-sequence token id.
    pub eos_token_id: u32,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f32,
    /// Pre-LN (true: every OPT but 350m) or post-LN (false).
    pub do_layer_norm_before: bool,
    /// Whether linear layers carry biases (false for Galactica).
    pub enable_bias: bool,
    /// Whether layer norms carry a weight and bias (false for Galactica).
    pub layer_norm_elementwise_affine: bool,
    /// Hugging Face's `_remove_final_layer_norm`: drops the final layer norm of a pre-LN model.
    pub remove_final_layer_norm: bool,
    /// Whether the LM head shares the token embedding (true for every released OPT).
    pub tie_word_embeddings: bool,
    /// Dtype the weights are stored in.
    pub dtype: DType,
}

impl OptConfig {
    /// An OPT architecture with OPT's standard values for everything but its size: vocabulary 50272, 2048
    /// positions, pad 1, bos/eos 2, ReLU, layer norm eps 1e-5, pre-LN with affine layer norms, biases, a tied LM
    /// head, no projection (`word_embed_proj_dim = hidden_size`) and f16 weights. Vary the rest with struct update
    /// syntax (`OptConfig { vocab_size: 50, ..OptConfig::opt("tiny", 2, 4, 16, 32) }`).
    pub const fn opt(
        name: &'static str,
        num_hidden_layers: usize,
        n_head: usize,
        hidden_size: usize,
        ffn_embed_dim: usize,
    ) -> OptConfig {
        OptConfig {
            name,
            num_hidden_layers,
            hidden_size,
            n_head,
            ffn_embed_dim,
            word_embed_proj_dim: hidden_size,
            vocab_size: 50272,
            max_seq_len: 2048,
            pad_token_id: 1,
            bos_token_id: 2,
            eos_token_id: 2,
            activation: Activation::Relu,
            layer_norm_eps: 1e-5,
            do_layer_norm_before: true,
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            remove_final_layer_norm: false,
            tie_word_embeddings: true,
            dtype: DType::F16,
        }
    }

    /// Width of one attention head.
    pub const fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head
    }

    /// Rows of the learned positional table (OPT's positions start at offset 2).
    pub const fn num_positions(&self) -> usize {
        self.max_seq_len + 2
    }

    /// Whether the model has project_in / project_out (embedding width differs from the hidden width).
    pub const fn has_projection(&self) -> bool {
        self.word_embed_proj_dim != self.hidden_size
    }

    /// Whether the decoder ends with a layer norm (pre-LN models, unless Hugging Face removed it).
    pub const fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    /// Parameters of one layer norm (0 when it has no elementwise affine).
    const fn layer_norm_params(&self) -> u64 {
        if self.layer_norm_elementwise_affine {
            2 * self.hidden_size as u64
        } else {
            0
        }
    }

    /// Parameters of one decoder layer: four attention projections, fc1, fc2, two layer norms.
    pub const fn layer_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let f = self.ffn_embed_dim as u64;
        let bias = self.enable_bias as u64;
        let attention = 4 * (h * h + bias * h);
        let mlp = (f * h + bias * f) + (h * f + bias * h);
        attention + mlp + 2 * self.layer_norm_params()
    }

    /// Parameters outside the decoder layers: embeddings, positions, projections, final layer norm, untied LM head.
    pub const fn embedding_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let p = self.word_embed_proj_dim as u64;
        let v = self.vocab_size as u64;
        let mut n = v * p + self.num_positions() as u64 * h;
        if self.has_projection() {
            n += 2 * h * p;
        }
        if self.has_final_layer_norm() {
            n += self.layer_norm_params();
        }
        if !self.tie_word_embeddings {
            n += v * p;
        }
        n
    }

    /// Exact parameter count: every tensor the runtime stores, a tied LM head counted once.
    pub const fn params(&self) -> u64 {
        self.num_hidden_layers as u64 * self.layer_params() + self.embedding_params()
    }

    /// Exact bytes of every weight the runtime stores, at the config's dtype.
    pub const fn model_bytes(&self) -> u64 {
        self.params() * self.dtype.size_bytes()
    }

    /// Bytes of one decoder layer's weights at the config's dtype.
    pub const fn layer_bytes(&self) -> u64 {
        self.layer_params() * self.dtype.size_bytes()
    }

    /// KV cache bytes for `batch_size` sequences of `seq_len` tokens: K and V of every layer (FlexLLMGen's formula).
    pub const fn cache_bytes(&self, batch_size: u64, seq_len: u64) -> u64 {
        2 * batch_size
            * seq_len
            * self.num_hidden_layers as u64
            * self.hidden_size as u64
            * self.dtype.size_bytes()
    }

    /// Bytes of one hidden-state activation tensor for `batch_size` x `seq_len` tokens (FlexLLMGen's formula).
    pub const fn hidden_bytes(&self, batch_size: u64, seq_len: u64) -> u64 {
        batch_size * seq_len * self.hidden_size as u64 * self.dtype.size_bytes()
    }

    /// The same architecture under another name.
    pub const fn with_name(self, name: &'static str) -> Self {
        OptConfig { name, ..self }
    }

    /// The same architecture stored in another dtype.
    pub const fn with_dtype(self, dtype: DType) -> Self {
        OptConfig { dtype, ..self }
    }

    /// The same architecture with a different context length.
    pub const fn with_max_seq_len(self, max_seq_len: usize) -> Self {
        OptConfig {
            max_seq_len,
            ..self
        }
    }

    /// The same architecture with a different number of layers (handy for small benchmarks of big shapes).
    pub const fn with_num_hidden_layers(self, num_hidden_layers: usize) -> Self {
        OptConfig {
            num_hidden_layers,
            ..self
        }
    }

    /// Where `other` is a different architecture from `self`: every field that shapes a tensor or the forward pass
    /// (not the name, dtype, token ids or layer-norm epsilon), as `field: self's value vs other's`. Empty when a
    /// checkpoint with `other`'s config can run as `self`.
    pub fn architecture_differences(&self, other: &OptConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut field = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name} {a} vs {b}"));
            }
        };
        for (name, a, b) in [
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                other.num_hidden_layers,
            ),
            ("hidden_size", self.hidden_size, other.hidden_size),
            ("n_head", self.n_head, other.n_head),
            ("ffn_embed_dim", self.ffn_embed_dim, other.ffn_embed_dim),
            (
                "word_embed_proj_dim",
                self.word_embed_proj_dim,
                other.word_embed_proj_dim,
            ),
            ("vocab_size", self.vocab_size, other.vocab_size),
            ("max_seq_len", self.max_seq_len, other.max_seq_len),
        ] {
            field(name, a.to_string(), b.to_string());
        }
        field(
            "activation",
            format!("{:?}", self.activation),
            format!("{:?}", other.activation),
        );
        for (name, a, b) in [
            (
                "do_layer_norm_before",
                self.do_layer_norm_before,
                other.do_layer_norm_before,
            ),
            ("enable_bias", self.enable_bias, other.enable_bias),
            (
                "layer_norm_elementwise_affine",
                self.layer_norm_elementwise_affine,
                other.layer_norm_elementwise_affine,
            ),
            (
                "remove_final_layer_norm",
                self.remove_final_layer_norm,
                other.remove_final_layer_norm,
            ),
            (
                "tie_word_embeddings",
                self.tie_word_embeddings,
                other.tie_word_embeddings,
            ),
        ] {
            field(name, a.to_string(), b.to_string());
        }
        out
    }

    /// Checks the invariants every consumer relies on, naming the first field that breaks one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field: &'static str, reason: String| Err(ConfigError { field, reason });
        for (field, value) in [
            ("num_hidden_layers", self.num_hidden_layers),
            ("hidden_size", self.hidden_size),
            ("n_head", self.n_head),
            ("ffn_embed_dim", self.ffn_embed_dim),
            ("word_embed_proj_dim", self.word_embed_proj_dim),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                return fail(field, "must be at least 1".into());
            }
        }
        // Far beyond any OPT-family model (opt-175b: 96 layers, hidden 12288, ffn 49152, vocab 50272, 2048 positions),
        // and small enough that every figure the const fns derive (parameters, bytes, one sequence's cache) fits u64.
        for (field, value, limit) in [
            ("num_hidden_layers", self.num_hidden_layers, 1usize << 12),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("n_head", self.n_head, 1 << 20),
            ("ffn_embed_dim", self.ffn_embed_dim, 1 << 22),
            ("word_embed_proj_dim", self.word_embed_proj_dim, 1 << 20),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("max_seq_len", self.max_seq_len, 1 << 24),
        ] {
            if value > limit {
                return fail(
                    field,
                    format!("{field} = {value} is larger than strata supports ({limit})"),
                );
            }
        }
        if self.hidden_size % self.n_head != 0 {
            return fail(
                "n_head",
                format!(
                    "n_head = {} does not divide hidden_size = {}",
                    self.n_head, self.hidden_size
                ),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return fail(
                "layer_norm_eps",
                format!("must be a positive number, found {}", self.layer_norm_eps),
            );
        }
        for (field, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return fail(
                    field,
                    format!(
                        "{field} = {id} is outside the vocabulary of {}",
                        self.vocab_size
                    ),
                );
            }
        }
        Ok(())
    }

    /// Bytes of a `[rows, cols]` tensor in strata's packed format (see `crate::compress`): per row,
    /// `ceil(cols / group_size)` groups of `group_size * bits / 32` data words plus one word of fp16 (step, min).
    ///
    /// # Panics
    /// When `bits` is not 2, 4 or 8 or `group_size` is not a positive multiple of `32 / bits` (a compile error in
    /// a const context); `crate::compress::CompressionConfig::new` checks the same values without panicking.
    pub const fn packed_matrix_bytes(rows: u64, cols: u64, bits: u32, group_size: u64) -> u64 {
        assert!(
            (bits == 2 || bits == 4 || bits == 8)
                && group_size > 0
                && group_size % (32 / bits as u64) == 0,
            "compression needs bits of 2, 4 or 8 and group_size a positive multiple of 32 / bits"
        );
        let words_per_group = group_size * bits as u64 / 32;
        4 * rows * cols.div_ceil(group_size) * (words_per_group + 1)
    }

    /// Exact bytes of every weight with `bits`-bit group-wise compression, as FlexLLMGen's `--compress-weight`:
    /// every 2-D tensor (linear weights, token embedding, positional table, project_in/out, an untied LM head) is
    /// packed with groups of `group_size` along its rows' contiguous axis (see `crate::compress`); biases and layer
    /// norms stay at the config's dtype. Panics as [`Self::packed_matrix_bytes`].
    pub const fn compressed_model_bytes(&self, bits: u32, group_size: u64) -> u64 {
        let h = self.hidden_size as u64;
        let f = self.ffn_embed_dim as u64;
        let p = self.word_embed_proj_dim as u64;
        let v = self.vocab_size as u64;
        let layer_packed = 4 * Self::packed_matrix_bytes(h, h, bits, group_size)
            + Self::packed_matrix_bytes(f, h, bits, group_size)
            + Self::packed_matrix_bytes(h, f, bits, group_size);
        let layer_dense = (self.enable_bias as u64 * (5 * h + f) + 2 * self.layer_norm_params())
            * self.dtype.size_bytes();
        let mut total = self.num_hidden_layers as u64 * (layer_packed + layer_dense);
        total += Self::packed_matrix_bytes(v, p, bits, group_size)
            + Self::packed_matrix_bytes(self.num_positions() as u64, h, bits, group_size);
        if self.has_projection() {
            total += Self::packed_matrix_bytes(h, p, bits, group_size)
                + Self::packed_matrix_bytes(p, h, bits, group_size);
        }
        if self.has_final_layer_norm() {
            total += self.layer_norm_params() * self.dtype.size_bytes();
        }
        if !self.tie_word_embeddings {
            total += Self::packed_matrix_bytes(v, p, bits, group_size);
        }
        total
    }

    /// KV cache bytes with `bits`-bit compression for `batch_size` sequences of `seq_len` tokens: K and V of every
    /// layer, each `batch_size * seq_len * n_head` rows of head_dim grouped along head_dim (FlexLLMGen's
    /// `--compress-cache` grouping). Panics as [`Self::packed_matrix_bytes`].
    pub const fn compressed_cache_bytes(
        &self,
        batch_size: u64,
        seq_len: u64,
        bits: u32,
        group_size: u64,
    ) -> u64 {
        let rows = batch_size * seq_len * self.n_head as u64;
        2 * self.num_hidden_layers as u64
            * Self::packed_matrix_bytes(rows, self.head_dim() as u64, bits, group_size)
    }
}

/// A config whose values cannot describe a runnable model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid model config: {field}: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// The architecture key and full name for a user-supplied model name, following FlexLLMGen's `get_opt_config`:
/// drop an organisation prefix (`facebook/opt-30b`), lower-case, and strip `-iml-max` (else `-iml`) to find the
/// architecture. Returns `(architecture, full_name)`: `opt-iml-max-30b` -> `("opt-30b", "opt-iml-max-30b")`.
pub fn normalize_model_name(name: &str) -> (String, String) {
    let base = name
        .trim()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let arch = if base.contains("-iml-max") {
        base.replacen("-iml-max", "", 1)
    } else if base.contains("-iml") {
        base.replacen("-iml", "", 1)
    } else {
        base.clone()
    };
    (arch, base)
}

/// Interns a model name so a config built at run time (from a user's name or a config.json) can carry it as
/// `&'static str` like the generated ones. Each distinct name is stored once, so repeated lookups do not grow memory.
pub fn intern_name(name: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(existing) = names.get(name) {
        return existing;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPT_125M: OptConfig = OptConfig::opt("opt-125m", 12, 12, 768, 3072);

    #[test]
    fn opt_125m_params_match_hugging_face() {
        assert_eq!(OPT_125M.params(), 125_239_296);
        assert_eq!(OPT_125M.model_bytes(), 2 * 125_239_296);
    }

    #[test]
    fn untied_head_is_counted() {
        let untied = OptConfig {
            tie_word_embeddings: false,
            ..OPT_125M
        };
        assert_eq!(untied.params() - OPT_125M.params(), 50272 * 768);
    }

    #[test]
    fn flexllmgen_cache_and_hidden_formulas() {
        // 2 * b * s * L * h * 2 and b * s * h * 2 at fp16.
        assert_eq!(OPT_125M.cache_bytes(4, 100), 2 * 4 * 100 * 12 * 768 * 2);
        assert_eq!(OPT_125M.hidden_bytes(4, 100), 4 * 100 * 768 * 2);
        assert_eq!(OPT_125M.with_dtype(DType::F32).hidden_bytes(1, 1), 768 * 4);
    }

    #[test]
    fn name_normalisation_follows_flexllmgen() {
        assert_eq!(normalize_model_name("facebook/OPT-30b").0, "opt-30b");
        assert_eq!(
            normalize_model_name("facebook/opt-iml-max-30b"),
            ("opt-30b".into(), "opt-iml-max-30b".into())
        );
        assert_eq!(normalize_model_name("opt-iml-1.3b").0, "opt-1.3b");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = OptConfig {
            n_head: 7,
            ..OPT_125M
        };
        let err = bad.validate().unwrap_err();
        assert_eq!(err.field, "n_head");
        assert!(err
            .to_string()
            .contains("does not divide hidden_size = 768"));
        assert!(OPT_125M.validate().is_ok());
    }

    #[test]
    fn interning_returns_the_same_pointer() {
        let a = intern_name("my-model");
        let b = intern_name(&String::from("my-model"));
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn architecture_differences_name_each_field_and_ignore_names_and_dtypes() {
        let renamed = OptConfig {
            name: "my-finetune",
            dtype: DType::F32,
            eos_token_id: 7,
            ..OPT_125M
        };
        assert!(OPT_125M.architecture_differences(&renamed).is_empty());
        let other = OptConfig::opt("opt-350m", 24, 16, 1024, 4096);
        let diff = OPT_125M.architecture_differences(&other);
        assert_eq!(
            diff,
            [
                "num_hidden_layers 12 vs 24",
                "hidden_size 768 vs 1024",
                "n_head 12 vs 16",
                "ffn_embed_dim 3072 vs 4096",
                "word_embed_proj_dim 768 vs 1024",
            ]
        );
    }
}
