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
//! `q4_attention` over the packed words; a prefill writes f32 K/V into a [`CacheScratch`] shared by all layers, runs
//! the f32 attention kernel there, then packs the rows into the cache.
//!
//! Attention sparsity ([`Step::attn_sparsity`] below 1, `--attn-sparsity`): a decode step over an f32 cache keeps,
//! per (sequence, head), the new token and the top fraction of the earlier real tokens by score
//! ([`Recorder::sparse_attention`]); prefill stays dense, as in FlexLLMGen. A packed cache is decoded into its f32
//! [`CacheScratch`] for such a step (the new rows packed first, so the keys attended are the packed ones).

use crate::compress::{AttentionParams, CompressionConfig, PackedLayout};
use crate::config::{Activation, ConfigError, DType, OptConfig};
use crate::gpu::kernels::{Act, AttentionShape, CacheDtype, OutRows, Recorder, MAX_HEAD_DIM};
use crate::gpu::tensor::{upload_vector, vector_values, GpuMatrix, WeightFormat};
use crate::gpu::{Gpu, GpuError};
use crate::weights::{
    layer_tensors, model_tensors, HostTensor, TensorSpec, WeightError, WeightSource,
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

/// Loads tensors of one source by name and uploads them in one format.
struct Uploader<'s> {
    gpu: &'s Gpu,
    source: &'s dyn WeightSource,
    specs: Vec<TensorSpec>,
    format: WeightFormat,
}

impl Uploader<'_> {
    fn spec(&self, name: &str) -> Result<&TensorSpec, ModelError> {
        self.specs.iter().find(|s| s.name == name).ok_or_else(|| {
            ModelError::Unsupported(format!("the config implies no tensor named {name}"))
        })
    }

    fn matrix(&self, name: &str) -> Result<GpuMatrix, ModelError> {
        // Packed words straight from a packed checkpoint, else loaded and converted.
        GpuMatrix::upload_from_source(self.gpu, self.source, self.spec(name)?, self.format)
    }

    fn vector(&self, name: &str) -> Result<wgpu::Buffer, ModelError> {
        let tensor = self.source.load(self.spec(name)?)?;
        Ok(upload_vector(self.gpu, name, &tensor)?)
    }

    fn norm(&self, prefix: &str, affine: bool) -> Result<Norm, ModelError> {
        Ok(Norm {
            affine: if affine {
                Some((
                    self.vector(&format!("{prefix}.weight"))?,
                    self.vector(&format!("{prefix}.bias"))?,
                ))
            } else {
                None
            },
        })
    }
}

/// Where [`LayerWeights::build`] puts one buffer: `(index in buffer order, full tensor name, label, bytes)` in, the
/// buffer the kernels will read out.
pub type PlaceBuffer<'a, E> = dyn FnMut(usize, &str, &str, &[u8]) -> Result<wgpu::Buffer, E> + 'a;

/// Builds one decoder layer buffer by buffer, numbering them in the order `offload::map_layer_buffers` visits.
struct LayerBuilder<'a, 'p, E> {
    gpu: &'a Gpu,
    source: &'a dyn WeightSource,
    specs: Vec<TensorSpec>,
    format: WeightFormat,
    place: &'a mut PlaceBuffer<'p, E>,
    index: usize,
}

impl<'a, E: From<ModelError> + From<GpuError> + From<WeightError>> LayerBuilder<'a, '_, E> {
    /// Reads one tensor (borrowed from the source's memory map where it can be).
    fn load(&self, name: &str) -> Result<HostTensor<'a>, E> {
        let spec = self.specs.iter().find(|s| s.name == name).ok_or_else(|| {
            ModelError::Unsupported(format!("the config implies no tensor named {name}"))
        })?;
        let source: &'a dyn WeightSource = self.source;
        Ok(source.load(spec)?)
    }

    fn put(&mut self, tensor: &str, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer, E> {
        let buffer = (self.place)(self.index, tensor, label, bytes)?;
        self.index += 1;
        Ok(buffer)
    }

    fn vector(&mut self, name: &str) -> Result<wgpu::Buffer, E> {
        let values = vector_values(self.gpu, name, &self.load(name)?)?;
        self.put(name, name, bytemuck::cast_slice(&values))
    }

    fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear, E> {
        let name = format!("{prefix}.weight");
        let spec = self
            .specs
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| {
                ModelError::Unsupported(format!("the config implies no tensor named {name}"))
            })?;
        let (gpu, source, format) = (self.gpu, self.source, self.format);
        // Stored packed words when the source has them (a saved packed checkpoint), else loaded and converted.
        let weight = GpuMatrix::build_from_source(gpu, source, &spec, format, |chunk| {
            self.put(&name, &chunk.label, chunk.bytes)
        })?;
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn norm(&mut self, prefix: &str, affine: bool) -> Result<Norm, E> {
        Ok(Norm {
            affine: if affine {
                Some((
                    self.vector(&format!("{prefix}.weight"))?,
                    self.vector(&format!("{prefix}.bias"))?,
                ))
            } else {
                None
            },
        })
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
    /// Matrices come as stored packed words when the source has them ([`GpuMatrix::build_from_source`]).
    pub fn build<E: From<ModelError> + From<GpuError> + From<WeightError>>(
        gpu: &Gpu,
        source: &dyn WeightSource,
        i: usize,
        format: WeightFormat,
        place: &mut PlaceBuffer<'_, E>,
    ) -> Result<Self, E> {
        let config = *source.config();
        let mut b = LayerBuilder {
            gpu,
            source,
            specs: layer_tensors(&config, i),
            format,
            place,
            index: 0,
        };
        let p = format!("decoder.layers.{i}");
        let (bias, affine) = (config.enable_bias, config.layer_norm_elementwise_affine);
        Ok(LayerWeights {
            q_proj: b.linear(&format!("{p}.self_attn.q_proj"), bias)?,
            k_proj: b.linear(&format!("{p}.self_attn.k_proj"), bias)?,
            v_proj: b.linear(&format!("{p}.self_attn.v_proj"), bias)?,
            out_proj: b.linear(&format!("{p}.self_attn.out_proj"), bias)?,
            self_attn_layer_norm: b.norm(&format!("{p}.self_attn_layer_norm"), affine)?,
            fc1: b.linear(&format!("{p}.fc1"), bias)?,
            fc2: b.linear(&format!("{p}.fc2"), bias)?,
            final_layer_norm: b.norm(&format!("{p}.final_layer_norm"), affine)?,
        })
    }
}

/// One layer's key and value cache for one GPU batch: `[batch, capacity, hidden]` f32 each, or, when
/// `compression` is set, packed tensors of `batch * heads * capacity` rows of head_dim in pair-major order (row
/// `(b * heads + h) * capacity + t`), the buffers holding the packed words (data, then scales).
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
    /// The f32 scratch a packed cache computes through (shared by every layer of a run); `None` for f32 caches.
    pub scratch: Option<CacheScratch>,
}

/// f32 scratch a compressed [`KvCache`] computes through, shared by every layer's cache of a run (the queue runs
/// layers one after another): the keys and values of one layer `[batch, capacity, hidden]`, their pair-major copy,
/// and the decode attention's scores.
#[derive(Clone, Debug)]
pub struct CacheScratch {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    pairs: wgpu::Buffer,
    scores: wgpu::Buffer,
    batch: usize,
    capacity: usize,
}

impl CacheScratch {
    /// Scratch for compressed caches of up to `batch` sequences of `capacity` tokens.
    pub fn new(
        gpu: &Gpu,
        config: &OptConfig,
        batch: usize,
        capacity: usize,
    ) -> Result<Self, ModelError> {
        let bytes = (batch * capacity * config.hidden_size * 4) as u64;
        gpu.check_binding(
            "one layer's uncompressed KV scratch",
            bytes,
            "use a smaller GPU batch or shorter sequences",
        )?;
        Ok(CacheScratch {
            k: gpu.storage_buffer("k scratch", bytes),
            v: gpu.storage_buffer("v scratch", bytes),
            pairs: gpu.storage_buffer("pair-major kv scratch", bytes),
            scores: gpu.storage_buffer(
                "packed attention scores",
                (batch * config.n_head * capacity * 4).max(4) as u64,
            ),
            batch,
            capacity,
        })
    }
}

impl KvCache {
    /// Allocates a cache for `batch` sequences of up to `capacity` tokens, packed under `compression` (computing
    /// through `scratch`, which must cover `batch` and `capacity`) or stored as `dtype` when `None`.
    pub fn with_compression(
        gpu: &Gpu,
        config: &OptConfig,
        batch: usize,
        capacity: usize,
        dtype: CacheDtype,
        compression: Option<(CompressionConfig, &CacheScratch)>,
    ) -> Result<Self, ModelError> {
        let Some((cc, scratch)) = compression else {
            return Self::new(gpu, config, batch, capacity, dtype);
        };
        cc.validate()
            .map_err(|e| ModelError::Unsupported(format!("--compress-cache: {e}")))?;
        if scratch.batch < batch || scratch.capacity != capacity {
            return Err(ModelError::Unsupported(format!(
                "cache scratch for {} sequences of {} tokens cannot serve {batch} of {capacity}",
                scratch.batch, scratch.capacity
            )));
        }
        let layout = Self::layout(config, batch, capacity, cc);
        gpu.check_binding(
            "one layer's packed KV cache",
            layout.bytes(),
            "use a smaller GPU batch or shorter sequences",
        )?;
        Ok(KvCache {
            k: gpu.storage_buffer("packed k cache", layout.bytes()),
            v: gpu.storage_buffer("packed v cache", layout.bytes()),
            batch,
            capacity,
            dtype: CacheDtype::F32,
            compression: Some(cc),
            scratch: Some(scratch.clone()),
        })
    }

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

    /// Allocates a cache for `batch` sequences of up to `capacity` tokens, values stored as `dtype`.
    pub fn new(
        gpu: &Gpu,
        config: &OptConfig,
        batch: usize,
        capacity: usize,
        dtype: CacheDtype,
    ) -> Result<Self, ModelError> {
        // Whole u32 words for f16 (an odd hidden size is refused by `GpuModel::cache_dtype`).
        let bytes =
            ((batch * capacity * config.hidden_size * dtype.bytes()) as u64).next_multiple_of(4);
        gpu.check_binding(
            "one layer's KV cache",
            bytes,
            "use a smaller GPU batch or shorter sequences",
        )?;
        Ok(KvCache {
            k: gpu.storage_buffer("k cache", bytes),
            v: gpu.storage_buffer("v cache", bytes),
            batch,
            capacity,
            dtype,
            compression: None,
            scratch: None,
        })
    }
}

/// One GPU batch's inputs and residual stream, sized for its longest step.
#[derive(Debug)]
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

impl BatchState {
    /// Buffers for `batch` sequences, steps of at most `max_s_new` tokens, `capacity` tokens in all.
    pub fn new(
        gpu: &Gpu,
        config: &OptConfig,
        batch: usize,
        max_s_new: usize,
        capacity: usize,
    ) -> Result<Self, ModelError> {
        let rows = batch * max_s_new;
        let hint = "use a smaller GPU batch or shorter prompts";
        gpu.check_binding(
            "the residual stream",
            (rows * config.hidden_size * 4) as u64,
            hint,
        )?;
        Ok(BatchState {
            batch,
            capacity,
            x: gpu.storage_buffer("x", (rows * config.hidden_size * 4) as u64),
            ids: gpu.storage_buffer("ids", (rows * 4) as u64),
            positions: gpu.storage_buffer("positions", (rows * 4) as u64),
            mask: gpu.storage_buffer("mask", (batch * capacity * 4) as u64),
        })
    }
}

/// Scratch activations shared by every layer and GPU batch of a step (the queue runs them one after another).
#[derive(Debug)]
pub struct Workspace {
    norm: wgpu::Buffer,
    q: wgpu::Buffer,
    attn: wgpu::Buffer,
    mid: wgpu::Buffer,
    embed: wgpu::Buffer,
    last: wgpu::Buffer,
    last_norm: wgpu::Buffer,
    last_proj: wgpu::Buffer,
}

impl Workspace {
    /// Scratch for GPU batches of up to `batch` sequences and steps of up to `max_s_new` tokens.
    pub fn new(
        gpu: &Gpu,
        config: &OptConfig,
        batch: usize,
        max_s_new: usize,
    ) -> Result<Self, ModelError> {
        let rows = batch * max_s_new;
        let h = config.hidden_size;
        let p = config.word_embed_proj_dim;
        let hint = "use a smaller GPU batch or shorter prompts";
        let f32s = |n: usize| (n * 4) as u64;
        gpu.check_binding(
            "the feed-forward activations",
            f32s(rows * config.ffn_embed_dim),
            hint,
        )?;
        gpu.check_binding("the token embeddings", f32s(rows * p), hint)?;
        Ok(Workspace {
            norm: gpu.storage_buffer("normed x", f32s(rows * h)),
            q: gpu.storage_buffer("q", f32s(rows * h)),
            attn: gpu.storage_buffer("attention output", f32s(rows * h)),
            mid: gpu.storage_buffer("fc1 output", f32s(rows * config.ffn_embed_dim)),
            embed: gpu.storage_buffer(
                "token embeddings",
                f32s(if config.has_projection() { rows * p } else { 1 }),
            ),
            last: gpu.storage_buffer("last hidden", f32s(batch * h)),
            last_norm: gpu.storage_buffer("last hidden normed", f32s(batch * h)),
            last_proj: gpu.storage_buffer("last hidden projected", f32s(batch * p)),
        })
    }
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
    /// [`Recorder::sparse_attention`] over the f32 cache, or over a packed cache decoded into its f32 scratch.
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
        config.validate()?;
        if config.head_dim() > MAX_HEAD_DIM {
            return Err(ModelError::Unsupported(format!(
                "head_dim {} is larger than the attention kernel's maximum of {MAX_HEAD_DIM}",
                config.head_dim()
            )));
        }
        let format = match compress {
            Some(c) => {
                c.validate()
                    .map_err(|e| ModelError::Unsupported(format!("--compress-weight: {e}")))?;
                WeightFormat::Packed(c)
            }
            None => WeightFormat::choose(config.dtype, dtype),
        };
        let up = Uploader {
            gpu,
            source,
            specs: model_tensors(&config),
            format,
        };
        let model = GpuModel {
            embed_tokens: up.matrix("decoder.embed_tokens.weight")?,
            embed_positions: up.matrix("decoder.embed_positions.weight")?,
            project_in: config
                .has_projection()
                .then(|| up.matrix("decoder.project_in.weight"))
                .transpose()?,
            layers: Vec::new(),
            final_layer_norm: config
                .has_final_layer_norm()
                .then(|| {
                    up.norm(
                        "decoder.final_layer_norm",
                        config.layer_norm_elementwise_affine,
                    )
                })
                .transpose()?,
            project_out: config
                .has_projection()
                .then(|| up.matrix("decoder.project_out.weight"))
                .transpose()?,
            lm_head: (!config.tie_word_embeddings)
                .then(|| up.matrix("lm_head.weight"))
                .transpose()?,
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
                )));
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
        let row_bytes = (h * 4) as u64;
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
        rec.linear(
            hidden,
            state.batch,
            head,
            None,
            Act::None,
            logits,
            OutRows::dense(c.vocab_size, row0),
            false,
        );
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
    let shape = AttentionShape {
        batch: state.batch,
        s_new: step.s_new,
        past: step.past,
        capacity: cache.capacity,
        hidden: h,
        n_head: config.n_head,
    };
    match (cache.compression, &cache.scratch) {
        (Some(cc), Some(scratch)) => packed_attention(
            rec, config, layer, cache, cc, scratch, state, ws, step, attn_in,
        ),
        _ => {
            for (proj, dst) in [(&layer.k_proj, &cache.k), (&layer.v_proj, &cache.v)] {
                let (w, b) = lin(proj);
                match cache.dtype {
                    CacheDtype::F32 => {
                        rec.linear(attn_in, rows, w, b, Act::None, dst, into_cache, false)
                    }
                    CacheDtype::F16 => {
                        // Through ws.attn (free until the attention writes it), then halved into the cache.
                        rec.linear(attn_in, rows, w, b, Act::None, &ws.attn, dense, false);
                        rec.store_cache_rows_f16(&ws.attn, dst, shape);
                    }
                }
            }
            let (k, v, mask) = (&cache.k, &cache.v, &state.mask);
            if step.is_sparse() {
                let sparsity = step.attn_sparsity;
                rec.sparse_attention(cache.dtype, &ws.q, k, v, mask, &ws.attn, shape, sparsity);
            } else {
                rec.attention(cache.dtype, &ws.q, k, v, mask, &ws.attn, shape);
            }
        }
    }
    finish_layer(
        rec, config, layer, &state.x, &ws.attn, rows, &ws.norm, &ws.mid,
    );
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
        rec.copy(norm, 0, x, 0, (rows * h * 4) as u64);
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
/// (prefill) computes in f32 scratch (after unpacking the `past` rows already cached) and packs the result.
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
            // Top-k attention reads f32: decode every cached row (the new one included) into the scratch, in the
            // f32 kernels' layout, and attend there. Costs a pass over the whole cache per layer and step.
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
            let shape = AttentionShape {
                batch,
                s_new: 1,
                past: step.past,
                capacity: cap,
                hidden: h,
                n_head: heads,
            };
            rec.sparse_attention(
                CacheDtype::F32,
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
    let shape = AttentionShape {
        batch,
        s_new: step.s_new,
        past: step.past,
        capacity: cap,
        hidden: h,
        n_head: heads,
    };
    rec.attention(
        CacheDtype::F32,
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
