//! Text generation: prompts in, token ids (and optionally every step's logits) out, with the whole model on the GPU.
//!
//! A [`Generator`] holds the uploaded model and compiled kernels; [`Generator::generate`] runs a prefill step over
//! the left-padded prompts, then one decode step per new token, each step one GPU submit (embedding, every layer for
//! every GPU batch, logits, next-token choice) followed by a read-back of the chosen ids.

use crate::compress::CompressionConfig;
use crate::config::{DType, OptConfig};
use crate::gpu::kernels::Kernels;
use crate::gpu::{Gpu, GpuError};
use crate::model::{BatchState, CacheScratch, GpuModel, ModelError, Step, Workspace};
use crate::offload::{LayerStore, OffloadError, RunHomes};
use crate::planner::{plan, Caps, Workload};
use crate::policy::{Policy, PolicyError};
use crate::schedule::{run_step, StepInputs};
use crate::tiers::{DiskOptions, TierOptions, Tiers};
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
    /// Quantise every weight matrix while loading and keep it packed in every tier (biases and norms stay f32).
    pub compress_weight: Option<CompressionConfig>,
    /// Keep the KV cache packed in every tier (grouped along head_dim).
    pub compress_cache: Option<CompressionConfig>,
    /// Attention sparsity of decode steps, in (0, 1] (`--attn-sparsity`): keep per head the new token and the top
    /// fraction of earlier real tokens by score ([`crate::model::Step::attn_sparsity`]). `None`: 1, dense. With a
    /// policy ([`Generator::with_policy`]) the policy's `attn_sparsity` is used instead.
    pub attn_sparsity: Option<f64>,
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
    /// Wall-clock seconds of each step (step 0 is the prefill), each ending when its token ids are read back.
    pub step_seconds: Vec<f64>,
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
    /// Placing or moving offloaded tensors failed.
    #[error(transparent)]
    Offload(#[from] OffloadError),
    /// The offloading policy cannot run (over a memory cap, or a feature not supported yet).
    #[error("{0}")]
    Policy(String),
}

/// Refuses an attention sparsity outside (0, 1].
fn check_sparsity(sparsity: f64) -> Result<(), GenerateError> {
    if !(sparsity > 0.0 && sparsity <= 1.0) {
        return Err(GenerateError::Policy(
            PolicyError::AttnSparsity(sparsity).to_string(),
        ));
    }
    Ok(())
}

impl From<crate::tiers::TierError> for GenerateError {
    fn from(e: crate::tiers::TierError) -> Self {
        GenerateError::Offload(e.into())
    }
}

/// One compression setting from a policy and the generator options: whichever is given, or both when they agree.
fn one_compression(
    flag: &str,
    from_policy: Option<CompressionConfig>,
    from_options: Option<CompressionConfig>,
) -> Result<Option<CompressionConfig>, GenerateError> {
    match (from_policy, from_options) {
        (Some(a), Some(b)) if a != b => Err(GenerateError::Policy(format!(
            "{flag}: the policy asks for {} bits in groups of {} but the generator options for {} bits in groups \
             of {}: give one setting",
            a.bits, a.group_size, b.bits, b.group_size
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

/// The model on the GPU with its kernels, ready to generate.
#[derive(Debug)]
pub struct Generator {
    kernels: Kernels,
    model: GpuModel,
    options: GeneratorOptions,
    /// The decoder layers' weights, resident or offloaded.
    layers: LayerStore,
    /// The offloading policy (`None`: everything on the GPU, GPU batch size from `options`).
    policy: Option<Policy>,
    /// The memory tiers offloaded tensors live in (with a policy).
    tiers: Option<Tiers>,
}

/// Sequences and per-GPU-batch buffers of one `generate` call.
struct Run {
    states: Vec<BatchState>,
    /// Caches and activations, resident or offloaded.
    homes: RunHomes,
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
        if let Some(sparsity) = options.attn_sparsity {
            check_sparsity(sparsity)?;
        }
        let model = gpu.catch_oom("the model's weights", || {
            GpuModel::upload_compressed(gpu, source, options.dtype, options.compress_weight)
        })?;
        Ok(Generator {
            kernels: Kernels::new(gpu),
            layers: LayerStore::resident(&model.layers),
            model,
            options: *options,
            policy: None,
            tiers: None,
        })
    }

    /// Places the weights of `source` by `policy` (GPU, CPU memory, or files in its offload directory) and compiles
    /// the kernels; [`Generator::generate`] then runs the policy's block schedule. `progress(i)` is called after
    /// decoder layer `i` is placed. The policy's GPU batch size overrides `options.gpu_batch_size`. Compression
    /// comes from the policy (`compress_weight` / `compress_cache`) or `options` (an error when both set different
    /// values): packed weights and a packed cache work in every tier.
    pub fn with_policy(
        gpu: &Gpu,
        source: &dyn WeightSource,
        options: &GeneratorOptions,
        policy: &Policy,
        progress: &dyn Fn(usize),
    ) -> Result<Self, GenerateError> {
        if let Some(DType::BF16) = options.dtype {
            return Err(
                ModelError::Unsupported("bfloat16 storage: choose f16 or f32".into()).into(),
            );
        }
        policy
            .validate()
            .map_err(|e| GenerateError::Policy(e.to_string()))?;
        check_sparsity(policy.attn_sparsity)?;
        // Compression comes from the policy or the options (the same setting from both is fine); the policy then
        // carries it, so every plan counts packed bytes.
        let compress_weight = one_compression(
            "--compress-weight",
            policy
                .compress_weight
                .then_some(policy.compress_weight_config),
            options.compress_weight,
        )?;
        let compress_cache = one_compression(
            "--compress-cache",
            policy
                .compress_cache
                .then_some(policy.compress_cache_config),
            options.compress_cache,
        )?;
        let mut policy = policy.clone();
        policy.compress_weight = compress_weight.is_some();
        policy.compress_weight_config = compress_weight.unwrap_or_default();
        policy.compress_cache = compress_cache.is_some();
        policy.compress_cache_config = compress_cache.unwrap_or_default();
        policy
            .validate()
            .map_err(|e| GenerateError::Policy(e.to_string()))?;
        let policy = &policy;
        let config = *source.config();
        // Weights do not depend on the workload: refuse an over-cap weight placement before allocating anything.
        let tiny = Workload {
            prompt_len: 1,
            gen_len: 1,
        };
        plan(&config, policy, tiny)
            .map_err(|e| GenerateError::Policy(e.to_string()))?
            .check(&Caps::of(policy))
            .map_err(|e| GenerateError::Policy(e.to_string()))?;
        let disk = if policy.percent.uses_disk() {
            policy.offload_dir.clone().map(DiskOptions::new)
        } else {
            None
        };
        let tiers = Tiers::new(
            &gpu.device,
            &gpu.queue,
            TierOptions {
                cpu_path: None,
                disk,
            },
        )?;
        let model = gpu.catch_oom("the model's weights", || {
            GpuModel::upload_outside_layers_compressed(gpu, source, options.dtype, compress_weight)
        })?;
        let slots = if policy.overlap { 2 } else { 1 };
        let layers = gpu.catch_oom("the model's weights", || {
            LayerStore::load(gpu, &tiers, source, model.format, policy, slots, progress)
                .map_err(GenerateError::from)
        })?;
        Ok(Generator {
            kernels: Kernels::new(gpu),
            model,
            options: GeneratorOptions {
                gpu_batch_size: Some(policy.gpu_batch_size),
                compress_weight,
                compress_cache,
                attn_sparsity: Some(policy.attn_sparsity),
                ..*options
            },
            layers,
            policy: Some(policy.clone()),
            tiers: Some(tiers),
        })
    }

    /// The memory tiers (with a policy): their [`Tiers::report`] gives each tier's peak bytes.
    pub fn tiers(&self) -> Option<&Tiers> {
        self.tiers.as_ref()
    }

    /// The offloading policy, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// The model's architecture.
    pub fn config(&self) -> &OptConfig {
        &self.model.config
    }

    /// The model on the GPU.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The decoder layers' weights: resident buffers, offloaded homes and weight slots.
    pub fn layers(&self) -> &LayerStore {
        &self.layers
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
        let default_policy = Policy::default();
        let policy = self.policy.as_ref().unwrap_or(&default_policy);
        // A compressed cache computes through f32 scratch shared by every layer of the run.
        let scratch = self
            .options
            .compress_cache
            .map(|cc| CacheScratch::new(gpu, c, gbs, capacity).map(|s| (cc, s)))
            .transpose()?;
        let homes = RunHomes::new(
            gpu,
            self.tiers.as_ref(),
            c,
            policy,
            &sizes,
            gbs,
            s,
            capacity,
            self.model.cache_dtype(),
            scratch.as_ref().map(|(cc, s)| (*cc, s)),
        )?;
        let logits_bytes = (batch * c.vocab_size * 4) as u64;
        gpu.check_binding(
            "the logits",
            logits_bytes,
            "generate fewer sequences at once",
        )?;
        Ok(Run {
            states,
            homes,
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
        self.generate_with_progress(prompts, options, &|_| {})
    }

    /// [`Generator::generate`], calling `progress(t)` after step `t` (0 = prefill) finished.
    pub fn generate_with_progress(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        progress: &dyn Fn(usize),
    ) -> Result<GenerateOutput, GenerateError> {
        self.validate(prompts, options)?;
        let batch = prompts.len();
        if options.max_new_tokens == 0 {
            return Ok(GenerateOutput {
                generated_ids: vec![Vec::new(); batch],
                logits: options.record_logits.then(Vec::new),
                steps: 0,
                step_seconds: Vec::new(),
            });
        }
        let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let capacity = s + options.max_new_tokens;
        let gbs = self.gpu_batch_size(batch, s, capacity)?;
        if let Some(policy) = &self.policy {
            if batch > policy.effective_batch() {
                return Err(GenerateError::Policy(format!(
                    "{batch} prompts exceed the effective batch of {} ({} x {}): raise --num-gpu-batches or \
                     --gpu-batch-size, or pass fewer prompts",
                    policy.effective_batch(),
                    policy.gpu_batch_size,
                    policy.num_gpu_batches
                )));
            }
            let workload = Workload {
                prompt_len: s,
                gen_len: options.max_new_tokens,
            };
            plan(&self.model.config, policy, workload)
                .map_err(|e| GenerateError::Policy(e.to_string()))?
                .check(&Caps::of(policy))
                .map_err(|e| GenerateError::Policy(e.to_string()))?;
        }
        let mut run = self.gpu().catch_oom("the KV cache and activations", || {
            self.allocate(batch, gbs, s, capacity)
        })?;
        let result = self.run(prompts, options, &mut run, gbs, progress);
        // The cached bind groups reference this run's buffers: release them with the run.
        self.kernels.release_cached_bindings();
        result
    }

    /// Prefill, then decode steps until every sequence is done.
    fn run(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        run: &mut Run,
        gbs: usize,
        progress: &dyn Fn(usize),
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
        // Decode steps keep the top fraction of attention positions; prefill is dense (Step::is_sparse).
        let attn_sparsity = self.options.attn_sparsity.unwrap_or(1.0) as f32;
        let mut step = Step {
            attn_sparsity,
            ..Step::new(s, 0)
        };
        let mut t = 0;
        let mut step_seconds = Vec::with_capacity(options.max_new_tokens);
        loop {
            let started = std::time::Instant::now();
            self.record_step(run, step, t, options)?;
            let mut regions = vec![(&run.next, 0, (batch * 4) as u64)];
            if logits.is_some() {
                regions.push((&run.logits, 0, (batch * c.vocab_size * 4) as u64));
            }
            let out = self.gpu().read_back(&regions)?;
            step_seconds.push(started.elapsed().as_secs_f64());
            progress(t);
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
                attn_sparsity,
                ..Step::new(1, s + t - 1)
            };
        }
        Ok(GenerateOutput {
            generated_ids: generated,
            logits,
            steps: t,
            step_seconds,
        })
    }

    /// Runs one step through the block schedule ([`crate::schedule`]).
    fn record_step(
        &self,
        run: &mut Run,
        step: Step,
        t: usize,
        options: &GenerateOptions,
    ) -> Result<(), GenerateError> {
        let inputs = StepInputs {
            kernels: &self.kernels,
            model: &self.model,
            layers: &self.layers,
            tiers: self.tiers.as_ref(),
            states: &run.states,
            ws: &run.ws,
            logits: &run.logits,
            next: &run.next,
            overlap: self.policy.as_ref().is_some_and(|p| p.overlap),
            cpu_cache_compute: self.policy.as_ref().is_some_and(|p| p.cpu_cache_compute),
        };
        run_step(&inputs, &mut run.homes, step, options.sampling, t)?;
        Ok(())
    }
}
