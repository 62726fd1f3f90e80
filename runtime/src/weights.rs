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

/// One tensor a config requires: its canonical name (no `model.` prefix), shape, role and owning layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical Hugging Face name without the `model.` prefix, e.g. `decoder.layers.3.fc1.weight`.
    pub name: String,
    /// Row-major shape; linear weights are `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// What the tensor is.
    pub role: TensorRole,
    /// The decoder layer it belongs to, or `None` for embeddings, projections, final layer norm and LM head.
    pub layer: Option<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The names of the tensors of decoder layer `i`, in checkpoint order, with their shapes and roles.
pub fn layer_tensors(config: &OptConfig, i: usize) -> Vec<TensorSpec> {
    let h = config.hidden_size;
    let f = config.ffn_embed_dim;
    let mut out = Vec::new();
    let mut push = |suffix: &str, shape: Vec<usize>, role: TensorRole| {
        out.push(TensorSpec {
            name: format!("decoder.layers.{i}.{suffix}"),
            shape,
            role,
            layer: Some(i),
        })
    };
    let linear =
        |push: &mut dyn FnMut(&str, Vec<usize>, TensorRole), name: &str, o: usize, inp: usize| {
            push(
                &format!("{name}.weight"),
                vec![o, inp],
                TensorRole::LinearWeight,
            );
            if config.enable_bias {
                push(&format!("{name}.bias"), vec![o], TensorRole::Bias);
            }
        };
    let norm = |push: &mut dyn FnMut(&str, Vec<usize>, TensorRole), name: &str| {
        if config.layer_norm_elementwise_affine {
            push(&format!("{name}.weight"), vec![h], TensorRole::LayerNorm);
            push(&format!("{name}.bias"), vec![h], TensorRole::LayerNorm);
        }
    };
    for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
        linear(&mut push, &format!("self_attn.{proj}"), h, h);
    }
    norm(&mut push, "self_attn_layer_norm");
    linear(&mut push, "fc1", f, h);
    linear(&mut push, "fc2", h, f);
    norm(&mut push, "final_layer_norm");
    out
}

/// Every tensor `config` requires, embeddings first, then the layers in order, then the tail (final layer norm,
/// project_out, an untied LM head). Their element counts add up to [`OptConfig::params`].
pub fn model_tensors(config: &OptConfig) -> Vec<TensorSpec> {
    let h = config.hidden_size;
    let p = config.word_embed_proj_dim;
    let global = |name: &str, shape: Vec<usize>, role: TensorRole| TensorSpec {
        name: name.to_owned(),
        shape,
        role,
        layer: None,
    };
    let mut out = vec![
        global(
            "decoder.embed_tokens.weight",
            vec![config.vocab_size, p],
            TensorRole::TokenEmbedding,
        ),
        global(
            "decoder.embed_positions.weight",
            vec![config.num_positions(), h],
            TensorRole::PositionEmbedding,
        ),
    ];
    if config.has_projection() {
        out.push(global(
            "decoder.project_in.weight",
            vec![h, p],
            TensorRole::LinearWeight,
        ));
    }
    for i in 0..config.num_hidden_layers {
        out.extend(layer_tensors(config, i));
    }
    if config.has_final_layer_norm() && config.layer_norm_elementwise_affine {
        out.push(global(
            "decoder.final_layer_norm.weight",
            vec![h],
            TensorRole::LayerNorm,
        ));
        out.push(global(
            "decoder.final_layer_norm.bias",
            vec![h],
            TensorRole::LayerNorm,
        ));
    }
    if config.has_projection() {
        out.push(global(
            "decoder.project_out.weight",
            vec![p, h],
            TensorRole::LinearWeight,
        ));
    }
    if !config.tie_word_embeddings {
        out.push(global(
            "lm_head.weight",
            vec![config.vocab_size, p],
            TensorRole::TokenEmbedding,
        ));
    }
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
