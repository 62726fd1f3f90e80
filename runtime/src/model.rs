//! OPT's forward pass on the GPU, written top to bottom like Hugging Face's `OPTDecoder`.
//!
//! The unit of work is one *step* (a prefill of the prompts, or one decode token) for one *GPU batch* of sequences.
//! Every decoder layer owns its own buffers ([`LayerWeights`]) and its own KV cache ([`KvCache`]), and
//! [`decoder_layer`] computes one layer from (layer weights, that layer's cache, one GPU batch's activations): an
//! offloading schedule can stream a layer's weights in, then call it once per GPU batch. Kernel dispatch lives in
//! [`crate::gpu::kernels`]; this module only says which kernel runs on which buffers.
//!
//! Compression: weights uploaded as [`WeightFormat::Packed`] stay packed on the GPU (biases and layer norms stay
//! f32). A compressed [`KvCache`] holds packed K and V rows in pair-major order (`[batch, heads, capacity]` rows of
//! head_dim, grouped along head_dim): a decode step packs its new rows with `q4_quantize` and attends with
//! `q4_attention` over the packed words; a prefill writes K/V (as activations) into a [`CacheScratch`] shared by all
//! layers, runs the dense attention kernel there, then packs the rows into the cache.
//!
//! Attention sparsity ([`Step::attn_sparsity`] below 1, `--attn-sparsity`): a decode step over an unpacked cache keeps,
//! per (sequence, head), the new token and the top fraction of the earlier real tokens by score
//! ([`Recorder::sparse_attention`]); prefill stays dense, as in FlexLLMGen. A packed cache is decoded into its
//! [`CacheScratch`] for such a step (the new rows packed first, so the keys attended are the packed ones).

use crate::compress::{AttentionParams, CompressionConfig, PackedLayout};
use crate::config::{Activation, ConfigError, DType, OptConfig};
use crate::gpu::kernels::{
    Act, ActDtype, AttentionShape, CacheDtype, LinearCall, OutRows, Recorder, MAX_HEAD_DIM,
};
use crate::gpu::tensor::{vector_values, GpuMatrix, MatrixChunk, WeightFormat};
use crate::gpu::{Gpu, GpuError};
use crate::weights::{
    layer_tensor_spec, model_tensor_spec, LayerPart, LayerTensor, ModelTensor, Param, TensorId,
    TensorSpec, WeightError, WeightSource,
};

/// Why a model could not be put on the GPU or run there.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The config cannot describe a runnable model.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A weight could not be read.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// The GPU refused a buffer or an operation.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The architecture is valid but these kernels do not support it.
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

/// A linear layer: weight `[out, in]` and an optional bias (f32).
#[derive(Debug)]
pub struct Linear {
    /// The weight matrix.
    pub weight: GpuMatrix,
    /// The bias, absent when the config has `enable_bias = false`.
    pub bias: Option<wgpu::Buffer>,
}

/// A layer norm's elementwise affine (weight, bias), absent when `layer_norm_elementwise_affine = false`.
#[derive(Debug)]
pub struct Norm {
    /// `(gamma, beta)` as f32.
    pub affine: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

impl Norm {
    fn as_refs(&self) -> Option<(&wgpu::Buffer, &wgpu::Buffer)> {
        self.affine.as_ref().map(|(g, b)| (g, b))
    }
}

/// One decoder layer's weights, each tensor in its own buffer(s).
#[derive(Debug)]
pub struct LayerWeights {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Attention output projection.
    pub out_proj: Linear,
    /// Layer norm before (pre-LN) or after (post-LN) attention.
    pub self_attn_layer_norm: Norm,
    /// First feed-forward layer `[ffn, hidden]`.
    pub fc1: Linear,
    /// Second feed-forward layer `[hidden, ffn]`.
    pub fc2: Linear,
    /// Layer norm before (pre-LN) or after (post-LN) the feed-forward block.
    pub final_layer_norm: Norm,
}

/// Where a builder puts one buffer: `(tensor, row chunk, label, bytes)` in (a vector is chunk 0), the buffer the
/// kernels will read out: the bytes uploaded, or a slot they stream into from a CPU or disk home.
pub type PlaceBuffer<'a, E> =
    dyn FnMut(TensorId, usize, &str, &[u8]) -> Result<wgpu::Buffer, E> + 'a;

/// Builds weights tensor by tensor, one row chunk at a time, handing each buffer's bytes to `place`.
struct Builder<'a, 'p, E> {
    gpu: &'a Gpu,
    source: &'a dyn WeightSource,
    format: WeightFormat,
    place: &'a mut PlaceBuffer<'p, E>,
}

impl<E: From<ModelError> + From<GpuError> + From<WeightError>> Builder<'_, '_, E> {
    fn spec(&self, id: TensorId) -> TensorSpec {
        let config = self.source.config();
        match id {
            TensorId::Model(t) => model_tensor_spec(config, t),
            TensorId::Layer(i, t) => layer_tensor_spec(config, i, t),
        }
    }

    /// A vector (bias, layer-norm weight) as f32, whatever the stored dtype.
    fn vector(&mut self, id: TensorId) -> Result<wgpu::Buffer, E> {
        let spec = self.spec(id);
        let values = vector_values(self.gpu, &spec.name, &self.source.load(&spec)?)?;
        (self.place)(id, 0, &spec.name, bytemuck::cast_slice(&values))
    }

    /// A matrix in the builder's format: stored packed words when the source has them (a saved packed checkpoint),
    /// else loaded and converted ([`GpuMatrix::build_from_source`]).
    fn matrix(&mut self, id: TensorId) -> Result<GpuMatrix, E> {
        let spec = self.spec(id);
        let (gpu, source, format) = (self.gpu, self.source, self.format);
        let place = &mut *self.place;
        let mut chunk = 0;
        GpuMatrix::build_from_source(gpu, source, &spec, format, |c| {
            let buffer = place(id, chunk, &c.label, c.bytes);
            chunk += 1;
            buffer
        })
    }

    fn linear(&mut self, layer: usize, part: LayerPart, bias: bool) -> Result<Linear, E> {
        let id = |param| TensorId::Layer(layer, LayerTensor { part, param });
        Ok(Linear {
            weight: self.matrix(id(Param::Weight))?,
            bias: if bias {
                Some(self.vector(id(Param::Bias))?)
            } else {
                None
            },
        })
    }

    fn norm(&mut self, ids: Option<[TensorId; 2]>) -> Result<Norm, E> {
        Ok(Norm {
            affine: match ids {
                Some([weight, bias]) => Some((self.vector(weight)?, self.vector(bias)?)),
                None => None,
            },
        })
    }

    fn layer_norm(&mut self, layer: usize, part: LayerPart, affine: bool) -> Result<Norm, E> {
        let id = |param| TensorId::Layer(layer, LayerTensor { part, param });
        self.norm(affine.then(|| [id(Param::Weight), id(Param::Bias)]))
    }
}

impl LayerWeights {
    /// Uploads decoder layer `i` of `source` in `format`.
    pub fn upload(
        gpu: &Gpu,
        source: &dyn WeightSource,
        i: usize,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        Self::build(gpu, source, i, format, &mut |_, _, label, bytes| {
            Ok(gpu.storage_buffer_init(label, bytes)?)
        })
    }

    /// Builds decoder layer `i` of `source` in `format`, one tensor (and one row chunk) at a time, letting `place`
    /// decide where each buffer's bytes go (the GPU for [`LayerWeights::upload`], a tier for an offloaded layer).
    pub fn build<E: From<ModelError> + From<GpuError> + From<WeightError>>(
        gpu: &Gpu,
        source: &dyn WeightSource,
        i: usize,
        format: WeightFormat,
        place: &mut PlaceBuffer<'_, E>,
    ) -> Result<Self, E> {
        let config = *source.config();
        let mut b = Builder {
            gpu,
            source,
            format,
            place,
        };
        let (bias, affine) = (config.enable_bias, config.layer_norm_elementwise_affine);
        Ok(LayerWeights {
            q_proj: b.linear(i, LayerPart::QProj, bias)?,
            k_proj: b.linear(i, LayerPart::KProj, bias)?,
            v_proj: b.linear(i, LayerPart::VProj, bias)?,
            out_proj: b.linear(i, LayerPart::OutProj, bias)?,
            self_attn_layer_norm: b.layer_norm(i, LayerPart::SelfAttnLayerNorm, affine)?,
            fc1: b.linear(i, LayerPart::Fc1, bias)?,
            fc2: b.linear(i, LayerPart::Fc2, bias)?,
            final_layer_norm: b.layer_norm(i, LayerPart::FinalLayerNorm, affine)?,
        })
    }

    /// The same layer with every buffer replaced by `f(tensor, row chunk, buffer)`, where the tensors are named as
    /// decoder layer `layer`'s: the struct's own traversal, so a store keys its buffers by tensor and chunk.
    pub fn map(
        &self,
        layer: usize,
        mut f: impl FnMut(TensorId, usize, &wgpu::Buffer) -> wgpu::Buffer,
    ) -> LayerWeights {
        let id = |part, param| TensorId::Layer(layer, LayerTensor { part, param });
        let mut linear = |l: &Linear, part: LayerPart| Linear {
            weight: GpuMatrix {
                rows: l.weight.rows,
                cols: l.weight.cols,
                format: l.weight.format,
                chunks: l
                    .weight
                    .chunks
                    .iter()
                    .enumerate()
                    .map(|(chunk, c)| MatrixChunk {
                        row0: c.row0,
                        rows: c.rows,
                        buffer: f(id(part, Param::Weight), chunk, &c.buffer),
                    })
                    .collect(),
            },
            bias: l.bias.as_ref().map(|b| f(id(part, Param::Bias), 0, b)),
        };
        let q_proj = linear(&self.q_proj, LayerPart::QProj);
        let k_proj = linear(&self.k_proj, LayerPart::KProj);
        let v_proj = linear(&self.v_proj, LayerPart::VProj);
        let out_proj = linear(&self.out_proj, LayerPart::OutProj);
        let fc1 = linear(&self.fc1, LayerPart::Fc1);
        let fc2 = linear(&self.fc2, LayerPart::Fc2);
        let mut norm = |n: &Norm, part: LayerPart| Norm {
            affine: n.affine.as_ref().map(|(g, b)| {
                (
                    f(id(part, Param::Weight), 0, g),
                    f(id(part, Param::Bias), 0, b),
                )
            }),
        };
        LayerWeights {
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            self_attn_layer_norm: norm(&self.self_attn_layer_norm, LayerPart::SelfAttnLayerNorm),
            fc1,
            fc2,
            final_layer_norm: norm(&self.final_layer_norm, LayerPart::FinalLayerNorm),
        }
    }
}

/// One layer's key and value cache for one GPU batch: `[batch, capacity, hidden]` values of `dtype` each, or, when
/// `compression` is set, packed tensors of `batch * heads * capacity` rows of head_dim in pair-major order (row
/// `(b * heads + h) * capacity + t`), the buffers holding the packed words (data, then scales). The offloading
/// runtime makes its buffers from the run's placement ([`crate::offload`]).
#[derive(Debug)]
pub struct KvCache {
    /// Keys.
    pub k: wgpu::Buffer,
    /// Values.
    pub v: wgpu::Buffer,
    /// Sequences.
    pub batch: usize,
    /// Token rows per sequence (prompt + generated).
    pub capacity: usize,
    /// How K and V are stored when not packed (f16 halves the bytes of every tier and transfer).
    pub dtype: CacheDtype,
    /// How K and V are packed; `None`: stored as `dtype`.
    pub compression: Option<CompressionConfig>,
    /// The scratch a packed cache computes through (shared by every layer of a run); `None` for unpacked caches.
    pub scratch: Option<CacheScratch>,
}

/// Scratch a compressed [`KvCache`] computes through, shared by every layer's cache of a run (the queue runs layers
/// one after another): the keys and values of one layer `[batch, capacity, hidden]` and their pair-major copy, stored
/// as activations ([`crate::gpu::kernels::Kernels::act`]), and the decode attention's f32 scores
/// `[batch, heads, capacity]`.
#[derive(Clone, Debug)]
pub struct CacheScratch {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    pairs: wgpu::Buffer,
    scores: wgpu::Buffer,
}

impl CacheScratch {
    /// Scratch from its four buffers (keys, values, their pair-major copy, scores), each sized for the largest GPU
    /// batch of the run.
    pub fn from_buffers(
        k: wgpu::Buffer,
        v: wgpu::Buffer,
        pairs: wgpu::Buffer,
        scores: wgpu::Buffer,
    ) -> CacheScratch {
        CacheScratch {
            k,
            v,
            pairs,
            scores,
        }
    }
}

impl KvCache {
    fn layout(
        config: &OptConfig,
        batch: usize,
        capacity: usize,
        cc: CompressionConfig,
    ) -> PackedLayout {
        PackedLayout::new(batch * config.n_head * capacity, config.head_dim(), cc)
    }

    /// Bytes K and V occupy on the GPU.
    pub fn bytes(&self) -> u64 {
        self.k.size() + self.v.size()
    }
}

/// One GPU batch's inputs and residual stream, sized for its longest step.
#[derive(Clone, Debug)]
pub struct BatchState {
    /// Sequences in this GPU batch.
    pub batch: usize,
    /// Tokens per sequence the mask and caches cover.
    pub capacity: usize,
    /// Residual stream `[batch * s_new, hidden]`.
    pub x: wgpu::Buffer,
    /// Token ids of this step `[batch * s_new]` (u32).
    pub ids: wgpu::Buffer,
    /// Position-table rows of this step `[batch * s_new]` (u32; 2 + index among real tokens, 1 for padding).
    pub positions: wgpu::Buffer,
    /// Attention mask `[batch, capacity]` (u32, 1 = real token, 0 = padding).
    pub mask: wgpu::Buffer,
}

/// Scratch activations shared by every layer and GPU batch of a step (the queue runs them one after another),
/// sized for the largest GPU batch's longest step (`rows` = its sequences times the step's tokens).
#[derive(Debug)]
pub struct Workspace {
    /// Layer-normed rows `[rows, hidden]`.
    pub norm: wgpu::Buffer,
    /// Queries `[rows, hidden]`.
    pub q: wgpu::Buffer,
    /// Attention output `[rows, hidden]`.
    pub attn: wgpu::Buffer,
    /// fc1's output `[rows, ffn]`.
    pub mid: wgpu::Buffer,
    /// Token embeddings before project_in `[rows, proj]`.
    pub embed: wgpu::Buffer,
    /// Each sequence's last row `[batch, hidden]`.
    pub last: wgpu::Buffer,
    /// The last rows, normed.
    pub last_norm: wgpu::Buffer,
    /// The last rows, projected `[batch, proj]`.
    pub last_proj: wgpu::Buffer,
    /// The block's residual stream `[block sequences, hidden]` at a block decode step ([`decoder_block_layer`]);
    /// present where the placement plans block decode steps.
    pub block: Option<wgpu::Buffer>,
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (lowest id on ties), as Hugging Face's greedy search.
    Greedy,
    /// Draw from softmax(logits / temperature), restricted to the smallest set of most likely tokens whose
    /// probability reaches `top_p`; reproducible for a given seed.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Nucleus mass in (0, 1]; 1 keeps every token.
        top_p: f32,
        /// Random seed.
        seed: u64,
    },
}

/// The shape of one step: `s_new` tokens per sequence after `past` cached ones (prefill: past = 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// New tokens per sequence (the padded prompt length at prefill, 1 at decode).
    pub s_new: usize,
    /// Tokens already in the cache.
    pub past: usize,
    /// Fraction of attention positions a decode step keeps per head, in (0, 1] (`--attn-sparsity`; 1: dense). Like
    /// FlexLLMGen, only decode steps (`s_new == 1`) are sparse; prefill is always dense. Below 1, a decode step runs
    /// [`Recorder::sparse_attention`] over the cache, or over a packed cache decoded into its scratch.
    pub attn_sparsity: f32,
}

impl Step {
    /// A dense step (`attn_sparsity` 1).
    pub fn new(s_new: usize, past: usize) -> Step {
        Step {
            s_new,
            past,
            attn_sparsity: 1.0,
        }
    }

    /// Whether this step's attention keeps only the top positions ([`Recorder::sparse_attention`]).
    pub fn is_sparse(&self) -> bool {
        self.s_new == 1 && self.attn_sparsity < 1.0
    }
}

/// An OPT model's weights on the GPU.
#[derive(Debug)]
pub struct GpuModel {
    /// The architecture.
    pub config: OptConfig,
    /// How matrices are stored.
    pub format: WeightFormat,
    embed_tokens: GpuMatrix,
    embed_positions: GpuMatrix,
    project_in: Option<GpuMatrix>,
    /// The decoder layers, in order (empty after [`GpuModel::upload_outside_layers`]).
    pub layers: Vec<LayerWeights>,
    final_layer_norm: Option<Norm>,
    project_out: Option<GpuMatrix>,
    lm_head: Option<GpuMatrix>,
}

impl GpuModel {
    /// Uploads every weight of `source`, matrices stored as `dtype` (default: the checkpoint's; bf16 becomes f32).
    pub fn upload(
        gpu: &Gpu,
        source: &dyn WeightSource,
        dtype: Option<DType>,
    ) -> Result<Self, ModelError> {
        Self::upload_compressed(gpu, source, dtype, None)
    }

    /// [`GpuModel::upload`], with every matrix quantised under `compress` while loading (tensor by tensor) and kept
    /// packed on the GPU; biases and layer norms stay f32.
    pub fn upload_compressed(
        gpu: &Gpu,
        source: &dyn WeightSource,
        dtype: Option<DType>,
        compress: Option<CompressionConfig>,
    ) -> Result<Self, ModelError> {
        let mut model = Self::upload_outside_layers_compressed(gpu, source, dtype, compress)?;
        model.layers = (0..model.config.num_hidden_layers)
            .map(|i| LayerWeights::upload(gpu, source, i, model.format))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(model)
    }

    /// Uploads the weights outside the decoder layers (embeddings, projections, final layer norm, LM head) and
    /// leaves [`GpuModel::layers`] empty: for a schedule that places and streams layer weights itself
    /// ([`LayerWeights::upload`], [`decoder_layer`]).
    pub fn upload_outside_layers(
        gpu: &Gpu,
        source: &dyn WeightSource,
        dtype: Option<DType>,
    ) -> Result<Self, ModelError> {
        Self::upload_outside_layers_compressed(gpu, source, dtype, None)
    }

    /// [`GpuModel::upload_outside_layers`] with matrices packed under `compress`; [`GpuModel::format`] then says
    /// [`WeightFormat::Packed`], the format to pass to [`LayerWeights::upload`].
    pub fn upload_outside_layers_compressed(
        gpu: &Gpu,
        source: &dyn WeightSource,
        dtype: Option<DType>,
        compress: Option<CompressionConfig>,
    ) -> Result<Self, ModelError> {
        let config = *source.config();
        let format = match compress {
            Some(c) => WeightFormat::Packed(c),
            None => WeightFormat::choose(config.dtype, dtype),
        };
        Self::build_outside_layers(gpu, source, format, &mut |_, _, label, bytes| {
            Ok(gpu.storage_buffer_init(label, bytes)?)
        })
    }

    /// Builds the weights outside the decoder layers in `format`, tensor by tensor, letting `place` decide where each
    /// buffer's bytes go ([`LayerWeights::build`]'s counterpart); [`GpuModel::layers`] stays empty.
    pub fn build_outside_layers<E: From<ModelError> + From<GpuError> + From<WeightError>>(
        gpu: &Gpu,
        source: &dyn WeightSource,
        format: WeightFormat,
        place: &mut PlaceBuffer<'_, E>,
    ) -> Result<Self, E> {
        let config = *source.config();
        config.validate().map_err(ModelError::from)?;
        if config.head_dim() > MAX_HEAD_DIM {
            return Err(ModelError::Unsupported(format!(
                "head_dim {} is larger than the attention kernel's maximum of {MAX_HEAD_DIM}",
                config.head_dim()
            ))
            .into());
        }
        if let WeightFormat::Packed(c) = format {
            c.validate()
                .map_err(|e| ModelError::Unsupported(format!("--compress-weight: {e}")))?;
        }
        let mut b = Builder {
            gpu,
            source,
            format,
            place,
        };
        let model = GpuModel {
            embed_tokens: b.matrix(TensorId::Model(ModelTensor::EmbedTokens))?,
            embed_positions: b.matrix(TensorId::Model(ModelTensor::EmbedPositions))?,
            project_in: if config.has_projection() {
                Some(b.matrix(TensorId::Model(ModelTensor::ProjectIn))?)
            } else {
                None
            },
            layers: Vec::new(),
            final_layer_norm: if config.has_final_layer_norm() {
                Some(b.norm(config.layer_norm_elementwise_affine.then_some([
                    TensorId::Model(ModelTensor::FinalLayerNormWeight),
                    TensorId::Model(ModelTensor::FinalLayerNormBias),
                ]))?)
            } else {
                None
            },
            project_out: if config.has_projection() {
                Some(b.matrix(TensorId::Model(ModelTensor::ProjectOut))?)
            } else {
                None
            },
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(b.matrix(TensorId::Model(ModelTensor::LmHead))?)
            },
            config,
            format,
        };
        // q4_dequant looks ids up in one buffer: a packed table must not be split into row chunks.
        for table in [&model.embed_tokens, &model.embed_positions] {
            if format.compression().is_some() && table.chunks.len() > 1 {
                return Err(ModelError::Unsupported(format!(
                    "the packed embedding table [{}, {}] needs {} bytes, more than one GPU binding ({} bytes)",
                    table.rows,
                    table.cols,
                    table.bytes(),
                    gpu.max_binding()
                ))
                .into());
            }
        }
        Ok(model)
    }

    /// How this model's uncompressed KV cache stores values ([`CacheDtype::for_model`]).
    pub fn cache_dtype(&self) -> CacheDtype {
        CacheDtype::for_model(&self.config)
    }

    /// Bytes of the matrices, biases and norms outside and inside the layers held on the GPU (packed words for a
    /// packed model).
    pub fn gpu_bytes(&self) -> u64 {
        let norm = |n: &Norm| n.affine.as_ref().map_or(0, |(g, b)| g.size() + b.size());
        let lin = |l: &Linear| l.weight.bytes() + l.bias.as_ref().map_or(0, |b| b.size());
        let mut total = self.embed_tokens.bytes() + self.embed_positions.bytes();
        for m in [&self.project_in, &self.project_out, &self.lm_head]
            .into_iter()
            .flatten()
        {
            total += m.bytes();
        }
        total += self.final_layer_norm.as_ref().map_or(0, norm);
        for l in &self.layers {
            total += [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2]
                .into_iter()
                .map(lin)
                .sum::<u64>();
            total += norm(&l.self_attn_layer_norm) + norm(&l.final_layer_norm);
        }
        total
    }

    /// `x = project_in(embed_tokens[ids]) + embed_positions[positions]` for one GPU batch.
    pub fn embed<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        state: &'a BatchState,
        ws: &'a Workspace,
        step: Step,
    ) {
        let rows = state.batch * step.s_new;
        match &self.project_in {
            Some(project_in) => {
                rec.gather(&self.embed_tokens, &state.ids, rows, &ws.embed, false);
                rec.linear(
                    &ws.embed,
                    rows,
                    project_in,
                    None,
                    Act::None,
                    &state.x,
                    OutRows::dense(self.config.hidden_size, 0),
                    false,
                );
            }
            None => rec.gather(&self.embed_tokens, &state.ids, rows, &state.x, false),
        }
        rec.gather(
            &self.embed_positions,
            &state.positions,
            rows,
            &state.x,
            true,
        );
    }

    /// The logits of each sequence's last token in this step, written to rows `row0..row0 + batch` of `logits`
    /// (`[rows, vocab]`): final layer norm, project_out, then `x @ embed_tokens^T` (or the untied `lm_head`).
    pub fn logits<'a>(
        &'a self,
        rec: &mut Recorder<'a>,
        state: &'a BatchState,
        ws: &'a Workspace,
        step: Step,
        logits: &'a wgpu::Buffer,
        row0: usize,
    ) {
        let c = &self.config;
        let h = c.hidden_size;
        let row_bytes = (h * rec.act().bytes()) as u64;
        // Left padding puts every sequence's last token in its last row.
        for b in 0..state.batch {
            let src = (b * step.s_new + step.s_new - 1) as u64 * row_bytes;
            rec.copy(&state.x, src, &ws.last, b as u64 * row_bytes, row_bytes);
        }
        let mut hidden = &ws.last;
        if let Some(norm) = &self.final_layer_norm {
            rec.layer_norm(
                &ws.last,
                state.batch,
                h,
                norm.as_refs(),
                c.layer_norm_eps,
                &ws.last_norm,
            );
            hidden = &ws.last_norm;
        }
        if let Some(project_out) = &self.project_out {
            let p = c.word_embed_proj_dim;
            rec.linear(
                hidden,
                state.batch,
                project_out,
                None,
                Act::None,
                &ws.last_proj,
                OutRows::dense(p, 0),
                false,
            );
            hidden = &ws.last_proj;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        // Logits are f32 whatever the activations: argmax, sampling and `--dump-logits` read f32.
        let rows = OutRows::dense(c.vocab_size, row0);
        rec.linear_call(LinearCall {
            out_dtype: Some(ActDtype::F32),
            ..LinearCall::new(hidden, state.batch, head, None, logits, rows)
        });
    }
}

/// One decoder layer for one GPU batch: attention (writing this step's keys and values into `cache`) and the
/// feed-forward block, updating `state.x` in place.
pub fn decoder_layer<'a>(
    rec: &mut Recorder<'a>,
    config: &OptConfig,
    layer: &'a LayerWeights,
    cache: &'a KvCache,
    state: &'a BatchState,
    ws: &'a Workspace,
    step: Step,
) {
    let h = config.hidden_size;
    let rows = state.batch * step.s_new;
    let dense = OutRows::dense(h, 0);
    let into_cache = OutRows::cache(step.s_new, step.past, cache.capacity, h);

    // Self-attention block.
    let attn_in = attention_input(rec, config, layer, &state.x, rows, &ws.norm);
    let lin = |l: &'a Linear| (&l.weight, l.bias.as_ref());
    let (w, b) = lin(&layer.q_proj);
    rec.linear(attn_in, rows, w, b, Act::None, &ws.q, dense, false);
    let shape = attention_shape(config, step, cache, state);
    match (cache.compression, &cache.scratch) {
        (Some(cc), Some(scratch)) => packed_attention(
            rec, config, layer, cache, cc, scratch, state, ws, step, attn_in,
        ),
        _ => {
            for (proj, dst) in [(&layer.k_proj, &cache.k), (&layer.v_proj, &cache.v)] {
                let (w, b) = lin(proj);
                let into = |out_dtype| LinearCall {
                    out_dtype: Some(out_dtype),
                    ..LinearCall::new(attn_in, rows, w, b, dst, into_cache)
                };
                match (cache.dtype, rec.act()) {
                    // The projection writes the cache's own values: f32, or halves beside f16 activations.
                    (CacheDtype::F32, _) => rec.linear_call(into(ActDtype::F32)),
                    (CacheDtype::F16, ActDtype::F16) => rec.linear_call(into(ActDtype::F16)),
                    (CacheDtype::F16, ActDtype::F32) => {
                        // f32 activations (no shader-f16, or `--dtype f32`): through ws.attn (free until the
                        // attention writes it), then halved into the cache.
                        rec.linear(attn_in, rows, w, b, Act::None, &ws.attn, dense, false);
                        rec.store_cache_rows_f16(&ws.attn, dst, shape);
                    }
                }
            }
            attend(rec, cache, &ws.q, &state.mask, &ws.attn, step, shape);
        }
    }
    finish_layer(
        rec, config, layer, &state.x, &ws.attn, rows, &ws.norm, &ws.mid,
    );
}

/// Attention of queries `q` over an uncompressed `cache` into `out`: top-k at a sparse step, dense otherwise.
fn attend<'a>(
    rec: &mut Recorder<'a>,
    cache: &'a KvCache,
    q: &'a wgpu::Buffer,
    mask: &'a wgpu::Buffer,
    out: &'a wgpu::Buffer,
    step: Step,
    shape: AttentionShape,
) {
    let (k, v) = (&cache.k, &cache.v);
    if step.is_sparse() {
        rec.sparse_attention(cache.dtype, q, k, v, mask, out, shape, step.attn_sparsity);
    } else {
        rec.attention(cache.dtype, q, k, v, mask, out, shape);
    }
}

/// The attention of one GPU batch's step over its cache.
fn attention_shape(
    config: &OptConfig,
    step: Step,
    cache: &KvCache,
    state: &BatchState,
) -> AttentionShape {
    AttentionShape {
        batch: state.batch,
        s_new: step.s_new,
        past: step.past,
        capacity: cache.capacity,
        hidden: config.hidden_size,
        n_head: config.n_head,
    }
}

/// One decoder layer for a whole block of GPU batches at once (a block decode step): every linear runs once over
/// the rows of all of them, so a weight read over PCIe in place (zero-copy) crosses once per step rather than once per
/// GPU batch. `x` is the block's residual stream, `[sum of batches * s_new, hidden]` with each batch's rows in the
/// order of `batches`, updated in place; attention runs per batch over its own cache (uncompressed), with its queries
/// and output moved through `ws.norm` and `ws.mid`. The workspace must hold the block's rows.
pub fn decoder_block_layer<'a>(
    rec: &mut Recorder<'a>,
    config: &OptConfig,
    layer: &'a LayerWeights,
    batches: &[(&'a KvCache, &'a BatchState)],
    x: &'a wgpu::Buffer,
    ws: &'a Workspace,
    step: Step,
) {
    let h = config.hidden_size;
    let row_bytes = (h * rec.act().bytes()) as u64;
    let dense = OutRows::dense(h, 0);
    let lin = |l: &'a Linear| (&l.weight, l.bias.as_ref());
    let shape = |cache: &KvCache, state: &BatchState| attention_shape(config, step, cache, state);

    // Each batch's first row in the block, and its rows.
    let spans: Vec<(usize, usize)> = batches
        .iter()
        .scan(0, |row0, (_, state)| {
            let n = state.batch * step.s_new;
            *row0 += n;
            Some((*row0 - n, n))
        })
        .collect();
    let rows = spans.last().map_or(0, |&(row0, n)| row0 + n);

    let attn_in = attention_input(rec, config, layer, x, rows, &ws.norm);
    let (w, b) = lin(&layer.q_proj);
    rec.linear(attn_in, rows, w, b, Act::None, &ws.q, dense, false);
    // Keys through ws.attn and values through ws.mid (both free until the attention), then into each batch's cache.
    for (proj, scratch, keys) in [
        (&layer.k_proj, &ws.attn, true),
        (&layer.v_proj, &ws.mid, false),
    ] {
        let (w, b) = lin(proj);
        rec.linear(attn_in, rows, w, b, Act::None, scratch, dense, false);
        for (&(cache, state), &(row0, _)) in batches.iter().zip(&spans) {
            let dst = if keys { &cache.k } else { &cache.v };
            rec.store_block_cache_rows(cache.dtype, scratch, row0, dst, shape(cache, state));
        }
    }
    // Attention per batch: its queries to the front of ws.norm, its output from the front of ws.mid into its rows of
    // ws.attn.
    for (&(cache, state), &(row0, n)) in batches.iter().zip(&spans) {
        let (off, bytes) = (row0 as u64 * row_bytes, n as u64 * row_bytes);
        rec.copy(&ws.q, off, &ws.norm, 0, bytes);
        attend(
            rec,
            cache,
            &ws.norm,
            &state.mask,
            &ws.mid,
            step,
            shape(cache, state),
        );
        rec.copy(&ws.mid, 0, &ws.attn, off, bytes);
    }
    finish_layer(rec, config, layer, x, &ws.attn, rows, &ws.norm, &ws.mid);
}

/// The self-attention block's input for `rows` rows of the residual stream `x`: `LN(x)` into `norm` for a pre-LN
/// model, else `x` itself.
pub fn attention_input<'a>(
    rec: &mut Recorder<'a>,
    config: &OptConfig,
    layer: &'a LayerWeights,
    x: &'a wgpu::Buffer,
    rows: usize,
    norm: &'a wgpu::Buffer,
) -> &'a wgpu::Buffer {
    if !config.do_layer_norm_before {
        return x;
    }
    let (h, eps) = (config.hidden_size, config.layer_norm_eps);
    rec.layer_norm(x, rows, h, layer.self_attn_layer_norm.as_refs(), eps, norm);
    norm
}

/// The rest of a decoder layer once `attn` holds the attention output of `rows` rows: out_proj with the residual
/// add into `x`, the feed-forward block with its residual add, and post-LN normalisation after each add. `norm`
/// (`[rows, hidden]`) and `mid` (`[rows, ffn]`) are scratch. Shared by the GPU path and the CPU-attention path.
#[allow(clippy::too_many_arguments)] // the layer, its stream, the attention output and two scratch buffers
pub fn finish_layer<'a>(
    rec: &mut Recorder<'a>,
    config: &OptConfig,
    layer: &'a LayerWeights,
    x: &'a wgpu::Buffer,
    attn: &'a wgpu::Buffer,
    rows: usize,
    norm: &'a wgpu::Buffer,
    mid: &'a wgpu::Buffer,
) {
    let (h, eps, pre_ln) = (
        config.hidden_size,
        config.layer_norm_eps,
        config.do_layer_norm_before,
    );
    let act = match config.activation {
        Activation::Relu => Act::Relu,
        Activation::Gelu => Act::Gelu,
    };
    let dense = OutRows::dense(h, 0);
    // Post-LN: `x = LN(x)` (through `norm`, since a kernel cannot read and write one buffer).
    let post_norm = |rec: &mut Recorder<'a>, n: &'a Norm| {
        rec.layer_norm(x, rows, h, n.as_refs(), eps, norm);
        rec.copy(norm, 0, x, 0, (rows * h * rec.act().bytes()) as u64);
    };
    // Residual add fused into out_proj's output.
    let l = &layer.out_proj;
    rec.linear(
        attn,
        rows,
        &l.weight,
        l.bias.as_ref(),
        Act::None,
        x,
        dense,
        true,
    );
    if !pre_ln {
        post_norm(rec, &layer.self_attn_layer_norm);
    }

    // Feed-forward block.
    let ffn_in = if pre_ln {
        rec.layer_norm(x, rows, h, layer.final_layer_norm.as_refs(), eps, norm);
        norm
    } else {
        x
    };
    let ffn = OutRows::dense(config.ffn_embed_dim, 0);
    let l = &layer.fc1;
    rec.linear(
        ffn_in,
        rows,
        &l.weight,
        l.bias.as_ref(),
        act,
        mid,
        ffn,
        false,
    );
    let l = &layer.fc2;
    rec.linear(
        mid,
        rows,
        &l.weight,
        l.bias.as_ref(),
        Act::None,
        x,
        dense,
        true,
    );
    if !pre_ln {
        post_norm(rec, &layer.final_layer_norm);
    }
}

/// Attention over a packed cache: this step's K and V rows are packed into `cache`, and `ws.attn` receives the
/// attention of `ws.q`. Decode (one new token) attends over the packed words with `q4_attention`; a longer step
/// (prefill) computes in the scratch (after unpacking the `past` rows already cached) and packs the result.
#[allow(clippy::too_many_arguments)] // decoder_layer's inputs, split by cache kind
fn packed_attention<'a>(
    rec: &mut Recorder<'a>,
    config: &OptConfig,
    layer: &'a LayerWeights,
    cache: &'a KvCache,
    cc: CompressionConfig,
    scratch: &'a CacheScratch,
    state: &'a BatchState,
    ws: &'a Workspace,
    step: Step,
    attn_in: &'a wgpu::Buffer,
) {
    let h = config.hidden_size;
    let heads = config.n_head;
    let hd = config.head_dim();
    let (batch, cap) = (state.batch, cache.capacity);
    let rows = batch * step.s_new;
    let layout = KvCache::layout(config, cache.batch, cap, cc);
    let pairs = batch * heads;
    // The scratch holds keys and values as activations.
    let scratch_dtype = CacheDtype::of_act(rec.act());
    let kv = [
        (&layer.k_proj, &scratch.k, &cache.k),
        (&layer.v_proj, &scratch.v, &cache.v),
    ];
    if step.s_new == 1 {
        for (proj, dense, packed) in kv {
            rec.linear(
                attn_in,
                rows,
                &proj.weight,
                proj.bias.as_ref(),
                Act::None,
                dense,
                OutRows::dense(h, 0),
                false,
            );
            // Pair p's new row goes to packed row p * capacity + past.
            rec.quantize_rows(dense, pairs, packed, layout, cc, step.past, cap);
        }
        if step.is_sparse() {
            // Top-k attention reads an unpacked cache: decode every cached row (the new one included) into the
            // scratch, in the dense kernels' layout, and attend there. Costs a pass over the whole cache per layer and step.
            for (_, dense, packed) in kv {
                rec.dequantize_rows(packed, layout, cc, pairs * cap, &scratch.pairs);
                rec.permute_cache(
                    &scratch.pairs,
                    dense,
                    batch,
                    cap,
                    heads,
                    hd,
                    0..step.past + 1,
                    false,
                );
            }
            let shape = attention_shape(config, step, cache, state);
            rec.sparse_attention(
                scratch_dtype,
                &ws.q,
                &scratch.k,
                &scratch.v,
                &state.mask,
                &ws.attn,
                shape,
                step.attn_sparsity,
            );
            return;
        }
        let params = AttentionParams {
            batch_heads: pairs as u32,
            heads: heads as u32,
            head_dim: hd as u32,
            seq_len: (step.past + 1) as u32,
            token_stride: 1,
            bh_stride: cap as u32,
            words_per_row: layout.words_per_row as u32,
            groups_per_row: layout.groups_per_row as u32,
            words_per_group: layout.words_per_group as u32,
            scale_offset: layout.scale_offset as u32,
            has_mask: 1,
            mask_stride: cap as u32,
            scale: (hd as f32).powf(-0.5),
            pad: [0; 3],
        };
        rec.packed_attention(
            &ws.q,
            &cache.k,
            &cache.v,
            &state.mask,
            &scratch.scores,
            &ws.attn,
            cc,
            params,
        );
        return;
    }
    let end = step.past + step.s_new;
    for (proj, dense, packed) in kv {
        if step.past > 0 {
            rec.dequantize_rows(packed, layout, cc, pairs * cap, &scratch.pairs);
            rec.permute_cache(
                &scratch.pairs,
                dense,
                batch,
                cap,
                heads,
                hd,
                0..step.past,
                false,
            );
        }
        rec.linear(
            attn_in,
            rows,
            &proj.weight,
            proj.bias.as_ref(),
            Act::None,
            dense,
            OutRows::cache(step.s_new, step.past, cap, h),
            false,
        );
    }
    let shape = attention_shape(config, step, cache, state);
    rec.attention(
        scratch_dtype,
        &ws.q,
        &scratch.k,
        &scratch.v,
        &state.mask,
        &ws.attn,
        shape,
    );
    for (_, dense, packed) in kv {
        rec.permute_cache(dense, &scratch.pairs, batch, cap, heads, hd, 0..end, true);
        // Every row of every pair (positions past `end` hold finite leftovers that decode overwrites before use).
        rec.quantize_rows(&scratch.pairs, pairs * cap, packed, layout, cc, 0, 1);
    }
}
