//! The tensors an OPT model is made of, and the interface every weight source (a safetensors checkpoint, dummy
//! weights) offers the runtime.
//!
//! [`model_tensors`] is the one list of what a config needs: the checkpoint loader validates against it, the dummy
//! source synthesises it, the GPU upload walks it, and [`crate::config::OptConfig::params`] counts the same tensors.

use std::borrow::Cow;

use crate::compress::{CompressionConfig, PackedRef};
use crate::config::{DType, OptConfig};

/// Which part of the model a tensor belongs to; decides where placement puts it and whether compression applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// Token embedding `[vocab, proj]` (also the tied LM head).
    TokenEmbedding,
    /// Learned positions `[max_seq_len + 2, hidden]`.
    PositionEmbedding,
    /// A matrix of a linear layer, `[out, in]`.
    LinearWeight,
    /// A bias vector.
    Bias,
    /// A layer norm weight or bias.
    LayerNorm,
}

impl TensorRole {
    /// Whether strata stores a tensor of this role compressed under weight compression: every 2-D tensor, as in
    /// FlexLLMGen (linear weights, the token embedding, which is also the tied LM head, the positional table); biases
    /// and layer norms never.
    pub const fn is_compressed(self) -> bool {
        match self {
            TensorRole::TokenEmbedding
            | TensorRole::PositionEmbedding
            | TensorRole::LinearWeight => true,
            TensorRole::Bias | TensorRole::LayerNorm => false,
        }
    }
}

/// The parts of a decoder layer, in checkpoint order. Every spelling of a layer tensor's name comes from
/// [`LayerPart::name`]: the tensor list, the loader, the offload stores and the forward pass all name parts by
/// this type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerPart {
    /// Key projection `[hidden, hidden]`.
    KProj,
    /// Value projection `[hidden, hidden]`.
    VProj,
    /// Query projection `[hidden, hidden]`.
    QProj,
    /// Attention output projection `[hidden, hidden]`.
    OutProj,
    /// Layer norm before (pre-LN) or after (post-LN) attention.
    SelfAttnLayerNorm,
    /// First feed-forward layer `[ffn, hidden]`.
    Fc1,
    /// Second feed-forward layer `[hidden, ffn]`.
    Fc2,
    /// Layer norm before (pre-LN) or after (post-LN) the feed-forward block.
    FinalLayerNorm,
}

impl LayerPart {
    /// Every part, in checkpoint order.
    pub const ALL: [LayerPart; 8] = [
        LayerPart::KProj,
        LayerPart::VProj,
        LayerPart::QProj,
        LayerPart::OutProj,
        LayerPart::SelfAttnLayerNorm,
        LayerPart::Fc1,
        LayerPart::Fc2,
        LayerPart::FinalLayerNorm,
    ];

    /// The part's name inside a layer, e.g. `self_attn.k_proj`.
    pub const fn name(self) -> &'static str {
        match self {
            LayerPart::KProj => "self_attn.k_proj",
            LayerPart::VProj => "self_attn.v_proj",
            LayerPart::QProj => "self_attn.q_proj",
            LayerPart::OutProj => "self_attn.out_proj",
            LayerPart::SelfAttnLayerNorm => "self_attn_layer_norm",
            LayerPart::Fc1 => "fc1",
            LayerPart::Fc2 => "fc2",
            LayerPart::FinalLayerNorm => "final_layer_norm",
        }
    }

    /// Whether the part is a linear layer (weight `[out, in]` and an optional bias) rather than a layer norm.
    pub const fn is_linear(self) -> bool {
        !matches!(
            self,
            LayerPart::SelfAttnLayerNorm | LayerPart::FinalLayerNorm
        )
    }

    /// Whether the part belongs to the attention half of the layer (the placement group of `sep_layer`).
    pub const fn is_attention(self) -> bool {
        matches!(
            self,
            LayerPart::KProj
                | LayerPart::VProj
                | LayerPart::QProj
                | LayerPart::OutProj
                | LayerPart::SelfAttnLayerNorm
        )
    }

    /// `[out, in]` of a linear part.
    pub const fn shape(self, config: &OptConfig) -> [usize; 2] {
        let (h, f) = (config.hidden_size, config.ffn_embed_dim);
        match self {
            LayerPart::Fc1 => [f, h],
            LayerPart::Fc2 => [h, f],
            _ => [h, h],
        }
    }
}

/// A part's weight (a matrix, or a layer norm's gain) or bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Param {
    /// `weight`.
    Weight,
    /// `bias`.
    Bias,
}

impl Param {
    /// `weight` or `bias`.
    pub const fn name(self) -> &'static str {
        match self {
            Param::Weight => "weight",
            Param::Bias => "bias",
        }
    }
}

/// One tensor of a decoder layer (the same in every layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerTensor {
    /// The part.
    pub part: LayerPart,
    /// Its weight or bias.
    pub param: Param,
}

impl LayerTensor {
    /// The full name in layer `layer`, e.g. `decoder.layers.3.fc1.weight`.
    pub fn name(self, layer: usize) -> String {
        format!(
            "decoder.layers.{layer}.{}.{}",
            self.part.name(),
            self.param.name()
        )
    }
}

/// The tensors outside the decoder layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelTensor {
    /// Token embedding `[vocab, proj]`, also the tied LM head.
    EmbedTokens,
    /// Learned positions `[max_seq_len + 2, hidden]`.
    EmbedPositions,
    /// `[hidden, proj]` when the embedding is narrower than the model.
    ProjectIn,
    /// The final layer norm's gain.
    FinalLayerNormWeight,
    /// The final layer norm's bias.
    FinalLayerNormBias,
    /// `[proj, hidden]` when the embedding is narrower than the model.
    ProjectOut,
    /// An untied LM head `[vocab, proj]`.
    LmHead,
}

impl ModelTensor {
    /// The canonical name, e.g. `decoder.embed_tokens.weight`.
    pub const fn name(self) -> &'static str {
        match self {
            ModelTensor::EmbedTokens => "decoder.embed_tokens.weight",
            ModelTensor::EmbedPositions => "decoder.embed_positions.weight",
            ModelTensor::ProjectIn => "decoder.project_in.weight",
            ModelTensor::FinalLayerNormWeight => "decoder.final_layer_norm.weight",
            ModelTensor::FinalLayerNormBias => "decoder.final_layer_norm.bias",
            ModelTensor::ProjectOut => "decoder.project_out.weight",
            ModelTensor::LmHead => "lm_head.weight",
        }
    }
}

/// Which tensor of the model: one outside the layers, or a layer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorId {
    /// Outside the decoder layers.
    Model(ModelTensor),
    /// Tensor `.1` of decoder layer `.0`.
    Layer(usize, LayerTensor),
}

impl TensorId {
    /// The canonical name (no `model.` prefix).
    pub fn name(self) -> String {
        match self {
            TensorId::Model(t) => t.name().to_owned(),
            TensorId::Layer(i, t) => t.name(i),
        }
    }

    /// The decoder layer, for a layer's tensor.
    pub const fn layer(self) -> Option<usize> {
        match self {
            TensorId::Model(_) => None,
            TensorId::Layer(i, _) => Some(i),
        }
    }
}

/// One tensor a config requires: its canonical name (no `model.` prefix), shape, role and which tensor it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical Hugging Face name without the `model.` prefix, e.g. `decoder.layers.3.fc1.weight`.
    pub name: String,
    /// Row-major shape; linear weights are `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// What the tensor is.
    pub role: TensorRole,
    /// Which tensor (its place in [`LayerPart`] / [`ModelTensor`]).
    pub id: TensorId,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The decoder layer it belongs to, or `None` for embeddings, projections, final layer norm and LM head.
    pub fn layer(&self) -> Option<usize> {
        self.id.layer()
    }
}

/// The tensors of every decoder layer, in checkpoint order: each part's weight, and its bias when the config has
/// biases (linear parts) or an elementwise affine (layer norms, whose weight and bias both depend on it).
pub fn layer_tensor_kinds(config: &OptConfig) -> Vec<LayerTensor> {
    let mut out = Vec::new();
    for part in LayerPart::ALL {
        let params: &[Param] = match (part.is_linear(), config.enable_bias) {
            (true, true) => &[Param::Weight, Param::Bias],
            (true, false) => &[Param::Weight],
            (false, _) if config.layer_norm_elementwise_affine => &[Param::Weight, Param::Bias],
            (false, _) => &[],
        };
        out.extend(params.iter().map(|&param| LayerTensor { part, param }));
    }
    out
}

/// The spec of layer tensor `t` of decoder layer `i`.
pub fn layer_tensor_spec(config: &OptConfig, i: usize, t: LayerTensor) -> TensorSpec {
    let (shape, role) = match (t.part.is_linear(), t.param) {
        (true, Param::Weight) => (t.part.shape(config).to_vec(), TensorRole::LinearWeight),
        (true, Param::Bias) => (vec![t.part.shape(config)[0]], TensorRole::Bias),
        (false, _) => (vec![config.hidden_size], TensorRole::LayerNorm),
    };
    TensorSpec {
        name: t.name(i),
        shape,
        role,
        id: TensorId::Layer(i, t),
    }
}

/// The names of the tensors of decoder layer `i`, in checkpoint order, with their shapes and roles.
pub fn layer_tensors(config: &OptConfig, i: usize) -> Vec<TensorSpec> {
    layer_tensor_kinds(config)
        .into_iter()
        .map(|t| layer_tensor_spec(config, i, t))
        .collect()
}

/// The spec of `t` under `config` (whether the config has it at all is [`model_tensors`]' business).
pub fn model_tensor_spec(config: &OptConfig, t: ModelTensor) -> TensorSpec {
    let (h, p) = (config.hidden_size, config.word_embed_proj_dim);
    let (shape, role) = match t {
        ModelTensor::EmbedTokens => (vec![config.vocab_size, p], TensorRole::TokenEmbedding),
        ModelTensor::EmbedPositions => (
            vec![config.num_positions(), h],
            TensorRole::PositionEmbedding,
        ),
        ModelTensor::ProjectIn => (vec![h, p], TensorRole::LinearWeight),
        ModelTensor::FinalLayerNormWeight | ModelTensor::FinalLayerNormBias => {
            (vec![h], TensorRole::LayerNorm)
        }
        ModelTensor::ProjectOut => (vec![p, h], TensorRole::LinearWeight),
        ModelTensor::LmHead => (vec![config.vocab_size, p], TensorRole::TokenEmbedding),
    };
    TensorSpec {
        name: t.name().to_owned(),
        shape,
        role,
        id: TensorId::Model(t),
    }
}

/// The tensors outside the decoder layers that `config` has, embeddings first, then the tail (final layer norm,
/// project_out, an untied LM head).
pub fn outside_layer_tensors(config: &OptConfig) -> (Vec<ModelTensor>, Vec<ModelTensor>) {
    let mut head = vec![ModelTensor::EmbedTokens, ModelTensor::EmbedPositions];
    if config.has_projection() {
        head.push(ModelTensor::ProjectIn);
    }
    let mut tail = Vec::new();
    if config.has_final_layer_norm() && config.layer_norm_elementwise_affine {
        tail.extend([
            ModelTensor::FinalLayerNormWeight,
            ModelTensor::FinalLayerNormBias,
        ]);
    }
    if config.has_projection() {
        tail.push(ModelTensor::ProjectOut);
    }
    if !config.tie_word_embeddings {
        tail.push(ModelTensor::LmHead);
    }
    (head, tail)
}

/// Every tensor `config` requires, embeddings first, then the layers in order, then the tail (final layer norm,
/// project_out, an untied LM head). Their element counts add up to [`OptConfig::params`].
pub fn model_tensors(config: &OptConfig) -> Vec<TensorSpec> {
    let (head, tail) = outside_layer_tensors(config);
    let mut out: Vec<TensorSpec> = head
        .into_iter()
        .map(|t| model_tensor_spec(config, t))
        .collect();
    for i in 0..config.num_hidden_layers {
        out.extend(layer_tensors(config, i));
    }
    out.extend(tail.into_iter().map(|t| model_tensor_spec(config, t)));
    out
}

/// A tensor's bytes in host memory: borrowed from a memory map where possible, owned when synthesised or converted.
#[derive(Clone, Debug)]
pub struct HostTensor<'a> {
    /// Element type of `bytes`.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes, `shape.product() * dtype.size_bytes()` long.
    pub bytes: Cow<'a, [u8]>,
}

/// Why a weight could not be provided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightError {
    /// The checkpoint lacks a tensor the config requires.
    #[error("checkpoint has no tensor `{name}` (expected shape {expected:?}); is this checkpoint for the same architecture as its config.json?")]
    Missing {
        /// Canonical name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// The tensor's shape differs from the config's.
    #[error("shape mismatch for `{name}`: expected {expected:?}, found {found:?}")]
    Shape {
        /// Canonical name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// The tensor's dtype is not one strata reads.
    #[error(
        "tensor `{name}` has dtype {found}; strata reads float16, bfloat16 and float32 checkpoints"
    )]
    DType {
        /// Canonical name.
        name: String,
        /// Dtype in the file.
        found: String,
    },
    /// The file is shorter than its header says, or otherwise unreadable.
    #[error("{path}: {reason}")]
    Corrupt {
        /// File concerned.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error on a checkpoint file.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Anything that can hand the runtime the weights of one model: a safetensors checkpoint or synthetic weights.
pub trait WeightSource: Send + Sync {
    /// The architecture these weights are for.
    fn config(&self) -> &OptConfig;

    /// The tensor `spec.name`, checked against `spec.shape`. Implementations return it in the dtype stored
    /// (callers convert); a missing tensor, wrong shape or unsupported dtype is an error naming the tensor.
    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError>;

    /// The matrix `spec.name` already packed under `config` (a packed checkpoint), so loading skips quantisation:
    /// `None` when this source does not store it packed (the caller loads and quantises it), `Some(Err)` when it
    /// stores it packed but not as `config` or `spec` ask (the error names the file and what differs). The bytes
    /// are the whole tensor's words in [`crate::compress::PackedLayout`] order (every row's data, then every row's
    /// scales).
    fn packed(
        &self,
        spec: &TensorSpec,
        config: CompressionConfig,
    ) -> Option<Result<PackedRef<'_>, WeightError>> {
        let _ = (spec, config);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(proj: usize, bias: bool, affine: bool, pre_ln: bool) -> OptConfig {
        OptConfig {
            word_embed_proj_dim: proj,
            vocab_size: 50,
            max_seq_len: 30,
            do_layer_norm_before: pre_ln,
            enable_bias: bias,
            layer_norm_elementwise_affine: affine,
            dtype: DType::F32,
            ..OptConfig::opt("tiny", 2, 4, 16, 24)
        }
    }

    #[test]
    fn tensor_list_counts_the_same_parameters_as_the_config() {
        for proj in [16, 8] {
            for bias in [true, false] {
                for affine in [true, false] {
                    for pre_ln in [true, false] {
                        let c = tiny(proj, bias, affine, pre_ln);
                        let total: usize = model_tensors(&c).iter().map(TensorSpec::numel).sum();
                        assert_eq!(total as u64, c.params(), "{c:?}");
                    }
                }
            }
        }
    }
}
