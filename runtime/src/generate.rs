//! Text generation: prompts in, token ids (and optionally every step's logits) out, with the whole model on the GPU.
//!
//! A [`Generator`] holds the uploaded model and compiled kernels; [`Generator::generate`] runs a prefill step over
//! the left-padded prompts, then one decode step per new token, each step one GPU submit (embedding, every layer for
//! every GPU batch, logits, next-token choice) followed by a read-back of the chosen ids.

use crate::compress::CompressionConfig;
use crate::config::{DType, OptConfig};
use crate::gpu::kernels::Kernels;
use crate::gpu::{Gpu, GpuError};
use crate::model::{
    decoder_layer, BatchState, CacheScratch, GpuModel, KvCache, ModelError, Step, Workspace,
};
use crate::weights::WeightSource;

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

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate per sequence (fewer when a sequence ends with EOS, unless `ignore_eos`).
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Keep generating after EOS.
    pub ignore_eos: bool,
    /// Return every step's logits.
    pub record_logits: bool,
}

/// How to build a [`Generator`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GeneratorOptions {
    /// Store weight matrices in this dtype (f16 or f32) instead of the checkpoint's.
    pub dtype: Option<DType>,
    /// Sequences per GPU batch; by default as many as fit the device's binding limit.
    pub gpu_batch_size: Option<usize>,
    /// Quantise every weight matrix while loading and keep it packed on the GPU (biases and norms stay f32).
    pub compress_weight: Option<CompressionConfig>,
    /// Keep the KV cache packed on the GPU (grouped along head_dim).
    pub compress_cache: Option<CompressionConfig>,
}

/// What [`Generator::generate`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    /// The generated tokens per sequence (prompt excluded), ending with EOS where a sequence stopped early.
    pub generated_ids: Vec<Vec<u32>>,
    /// When requested: float32 `[steps, batch, vocab]`; step 0 holds the next-token logits after the prompt, step t
    /// those after t generated tokens.
    pub logits: Option<Vec<f32>>,
    /// Steps run (the longest generated sequence).
    pub steps: usize,
}

/// Why generation could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The GPU failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// No prompts given.
    #[error("no prompts given: pass at least one prompt")]
    NoPrompts,
    /// A prompt has no tokens.
    #[error("prompt {index} is empty: every prompt needs at least one token (OPT prompts start with BOS, id 2)")]
    EmptyPrompt {
        /// Which prompt.
        index: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("prompt {index} has token id {id} at position {position}, outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// Which prompt.
        index: usize,
        /// Where in the prompt.
        position: usize,
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Prompt plus generated tokens exceed the model's context.
    #[error(
        "prompt {index} has {len} tokens and {new} are to be generated, but the model's context is {max} tokens; \
         shorten the prompt or lower max_new_tokens"
    )]
    TooLong {
        /// Which prompt.
        index: usize,
        /// Prompt length.
        len: usize,
        /// Tokens to generate.
        new: usize,
        /// max_seq_len.
        max: usize,
    },
    /// Bad sampling parameters.
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    /// The batch does not fit the device.
    #[error("{0}")]
    Capacity(String),
}

/// The model on the GPU with its kernels, ready to generate.
#[derive(Debug)]
pub struct Generator {
    kernels: Kernels,
    model: GpuModel,
    options: GeneratorOptions,
}

/// Sequences and per-GPU-batch buffers of one `generate` call.
struct Run {
    states: Vec<BatchState>,
    /// caches[layer][gpu batch]
    caches: Vec<Vec<KvCache>>,
    ws: Workspace,
    logits: wgpu::Buffer,
    next: wgpu::Buffer,
}

impl Generator {
    /// Uploads the weights of `source` to `gpu` and compiles the kernels.
    pub fn new(
        gpu: &Gpu,
        source: &dyn WeightSource,
        options: &GeneratorOptions,
    ) -> Result<Self, GenerateError> {
        if let Some(dtype) = options.dtype {
            if dtype == DType::BF16 {
                return Err(
                    ModelError::Unsupported("bfloat16 storage: choose f16 or f32".into()).into(),
                );
            }
        }
        let model = gpu.catch_oom("the model's weights", || {
            GpuModel::upload_compressed(gpu, source, options.dtype, options.compress_weight)
        })?;
        Ok(Generator {
            kernels: Kernels::new(gpu),
            model,
            options: *options,
        })
    }

    /// The model's architecture.
    pub fn config(&self) -> &OptConfig {
        &self.model.config
    }

    /// The model on the GPU.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    fn gpu(&self) -> &Gpu {
        self.kernels.gpu()
    }

    fn validate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
    ) -> Result<(), GenerateError> {
        let c = &self.model.config;
        if prompts.is_empty() {
            return Err(GenerateError::NoPrompts);
        }
        for (index, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                return Err(GenerateError::EmptyPrompt { index });
            }
            if let Some((position, &id)) = prompt
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= c.vocab_size)
            {
                return Err(GenerateError::TokenOutOfRange {
                    index,
                    position,
                    id,
                    vocab: c.vocab_size,
                });
            }
            // The last generated token is never fed back, so it needs no position.
            if prompt.len() + options.max_new_tokens.saturating_sub(1) > c.max_seq_len {
                return Err(GenerateError::TooLong {
                    index,
                    len: prompt.len(),
                    new: options.max_new_tokens,
                    max: c.max_seq_len,
                });
            }
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = options.sampling
        {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(GenerateError::Sampling(format!(
                    "temperature must be > 0, got {temperature}"
                )));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(GenerateError::Sampling(format!(
                    "top_p must be in (0, 1], got {top_p}"
                )));
            }
        }
        let max_groups = self.gpu().limits.max_compute_workgroups_per_dimension as usize;
        if prompts.len() > max_groups {
            return Err(GenerateError::Capacity(format!(
                "{} prompts exceed this device's {max_groups} sequences per step",
                prompts.len()
            )));
        }
        Ok(())
    }

    /// The GPU batch size: the requested one, or the most sequences whose activations and caches fit one binding.
    fn gpu_batch_size(
        &self,
        batch: usize,
        s: usize,
        capacity: usize,
    ) -> Result<usize, GenerateError> {
        let c = &self.model.config;
        let widest = c
            .ffn_embed_dim
            .max(c.hidden_size)
            .max(c.word_embed_proj_dim);
        let per_seq = (4 * (s * widest).max(capacity * c.hidden_size)) as u64;
        let fit = (self.gpu().max_binding() / per_seq) as usize;
        if self.options.gpu_batch_size == Some(0) {
            return Err(GenerateError::Capacity(
                "gpu_batch_size must be at least 1".into(),
            ));
        }
        let gbs = self.options.gpu_batch_size.unwrap_or(fit).min(batch);
        if gbs == 0 {
            return Err(GenerateError::Capacity(format!(
                "one sequence of {capacity} tokens needs {per_seq} bytes of activations or cache in one binding, \
                 more than this device's {} bytes; shorten the prompt or max_new_tokens",
                self.gpu().max_binding()
            )));
        }
        Ok(gbs)
    }

    fn allocate(
        &self,
        batch: usize,
        gbs: usize,
        s: usize,
        capacity: usize,
    ) -> Result<Run, GenerateError> {
        let gpu = self.gpu();
        let c = &self.model.config;
        let sizes: Vec<usize> = (0..batch)
            .step_by(gbs)
            .map(|start| gbs.min(batch - start))
            .collect();
        let states = sizes
            .iter()
            .map(|&b| BatchState::new(gpu, c, b, s, capacity))
            .collect::<Result<Vec<_>, _>>()?;
        let scratch = self
            .options
            .compress_cache
            .map(|cc| CacheScratch::new(gpu, c, gbs, capacity).map(|s| (cc, s)))
            .transpose()?;
        let caches = (0..c.num_hidden_layers)
            .map(|_| {
                sizes
                    .iter()
                    .map(|&b| {
                        let packed = scratch.as_ref().map(|(cc, s)| (*cc, s));
                        KvCache::with_compression(gpu, c, b, capacity, packed)
                    })
                    .collect()
            })
            .collect::<Result<Vec<Vec<_>>, _>>()?;
        let logits_bytes = (batch * c.vocab_size * 4) as u64;
        gpu.check_binding(
            "the logits",
            logits_bytes,
            "generate fewer sequences at once",
        )?;
        Ok(Run {
            states,
            caches,
            ws: Workspace::new(gpu, c, gbs, s)?,
            logits: gpu.storage_buffer("logits", logits_bytes),
            next: gpu.storage_buffer("next ids", (batch * 4) as u64),
        })
    }

    /// Generates from `prompts` (token ids, unpadded, usually starting with BOS).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
    ) -> Result<GenerateOutput, GenerateError> {
        self.validate(prompts, options)?;
        let batch = prompts.len();
        if options.max_new_tokens == 0 {
            return Ok(GenerateOutput {
                generated_ids: vec![Vec::new(); batch],
                logits: options.record_logits.then(Vec::new),
                steps: 0,
            });
        }
        let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let capacity = s + options.max_new_tokens;
        let gbs = self.gpu_batch_size(batch, s, capacity)?;
        let run = self.gpu().catch_oom("the KV cache and activations", || {
            self.allocate(batch, gbs, s, capacity)
        })?;
        let result = self.run(prompts, options, &run, gbs);
        // The cached bind groups reference this run's buffers: release them with the run.
        self.kernels.release_cached_bindings();
        result
    }

    /// Prefill, then decode steps until every sequence is done.
    fn run(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        run: &Run,
        gbs: usize,
    ) -> Result<GenerateOutput, GenerateError> {
        let c = self.model.config;
        let batch = prompts.len();
        let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let capacity = s + options.max_new_tokens;
        let queue = &self.gpu().queue;

        // Prefill inputs: left padding with pad id; positions count real tokens from 2, padding reads row 1.
        for (g, state) in run.states.iter().enumerate() {
            let seqs = &prompts[g * gbs..g * gbs + state.batch];
            let mut ids = Vec::with_capacity(state.batch * s);
            let mut positions = Vec::with_capacity(state.batch * s);
            let mut mask = vec![1u32; state.batch * capacity];
            for (b, prompt) in seqs.iter().enumerate() {
                let pad = s - prompt.len();
                ids.extend(std::iter::repeat_n(c.pad_token_id, pad).chain(prompt.iter().copied()));
                positions.extend(
                    std::iter::repeat_n(1u32, pad).chain((0..prompt.len() as u32).map(|i| i + 2)),
                );
                mask[b * capacity..b * capacity + pad].fill(0);
            }
            queue.write_buffer(&state.ids, 0, bytemuck::cast_slice(&ids));
            queue.write_buffer(&state.positions, 0, bytemuck::cast_slice(&positions));
            queue.write_buffer(&state.mask, 0, bytemuck::cast_slice(&mask));
        }

        let mut generated = vec![Vec::with_capacity(options.max_new_tokens); batch];
        let mut finished = vec![false; batch];
        let mut logits = options.record_logits.then(Vec::new);
        let mut step = Step { s_new: s, past: 0 };
        let mut t = 0;
        loop {
            self.record_step(run, step, t, options);
            let mut regions = vec![(&run.next, 0, (batch * 4) as u64)];
            if logits.is_some() {
                regions.push((&run.logits, 0, (batch * c.vocab_size * 4) as u64));
            }
            let out = self.gpu().read_back(&regions)?;
            let next: Vec<u32> = bytemuck::pod_collect_to_vec(&out[0]);
            if let Some(all) = logits.as_mut() {
                all.extend_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&out[1]));
            }
            for (b, &id) in next.iter().enumerate() {
                if !finished[b] {
                    generated[b].push(id);
                    finished[b] = !options.ignore_eos && id == c.eos_token_id;
                }
            }
            t += 1;
            if t == options.max_new_tokens || finished.iter().all(|&f| f) {
                break;
            }
            // Decode inputs: the chosen token (pad once a sequence has finished) at the next position.
            for (g, state) in run.states.iter().enumerate() {
                let first = g * gbs;
                let ids: Vec<u32> = (first..first + state.batch)
                    .map(|b| if finished[b] { c.pad_token_id } else { next[b] })
                    .collect();
                let positions: Vec<u32> = (first..first + state.batch)
                    .map(|b| (prompts[b].len() + t + 1) as u32)
                    .collect();
                queue.write_buffer(&state.ids, 0, bytemuck::cast_slice(&ids));
                queue.write_buffer(&state.positions, 0, bytemuck::cast_slice(&positions));
            }
            step = Step {
                s_new: 1,
                past: s + t - 1,
            };
        }
        Ok(GenerateOutput {
            generated_ids: generated,
            logits,
            steps: t,
        })
    }

    /// Records and submits one step: embeddings, every layer for every GPU batch, logits and the token choice.
    fn record_step(&self, run: &Run, step: Step, t: usize, options: &GenerateOptions) {
        let c = &self.model.config;
        let mut rec = self.kernels.recorder();
        for state in &run.states {
            self.model.embed(&mut rec, state, &run.ws, step);
        }
        for (layer, caches) in self.model.layers.iter().zip(&run.caches) {
            for (state, cache) in run.states.iter().zip(caches) {
                decoder_layer(&mut rec, c, layer, cache, state, &run.ws, step);
            }
        }
        let mut row0 = 0;
        for state in &run.states {
            self.model
                .logits(&mut rec, state, &run.ws, step, &run.logits, row0);
            row0 += state.batch;
        }
        match options.sampling {
            Sampling::Greedy => rec.argmax(&run.logits, row0, c.vocab_size, &run.next),
            Sampling::Sample {
                temperature,
                top_p,
                seed,
            } => rec.sample(
                &run.logits,
                row0,
                c.vocab_size,
                temperature,
                top_p,
                (seed ^ (seed >> 32)) as u32,
                t as u32,
                &run.next,
            ),
        }
        rec.submit();
    }
}
