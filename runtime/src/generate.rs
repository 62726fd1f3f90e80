//! Text generation: prompts in, token ids (and optionally every step's logits) out.
//!
//! A [`Generator`] holds the model's weights where its policy places them and the compiled kernels;
//! [`Generator::generate`] places the run ([`Placement`]), makes exactly the buffers the placement lists through the
//! ledger, runs a prefill step over the left-padded prompts, then one decode step per new token through the block
//! schedule ([`crate::offload::schedule`]), each step ending with a read-back of the chosen ids. The policy is the one
//! source of run settings (placement, batching, compression, sparsity, weight dtype); [`GenerateOptions`] holds only
//! what to generate.
//!
//! [`Generator::generate_streaming`] hands each step's new token ids to a callback, which may end sequences (a stop
//! string, a client gone), and takes a [`TokenChoice`] per sequence: greedy sequences keep the GPU's argmax; a
//! repetition penalty, top-k or a sequence's own seed make that sequence's choice on the host
//! ([`crate::sampling`]) from the step's logits, read back with the ids.

use crate::config::OptConfig;
use crate::gpu::kernels::{ActDtype, KernelOptions, Kernels, STAGING_SLOTS};
use crate::gpu::{Gpu, GpuError};
use crate::model::{GpuModel, ModelError, Step};
use crate::offload::ledger::Ledger;
use crate::offload::placement::{
    largest_gpu_batch, DeviceLimits, Placement, PlacementError, Workload,
};
use crate::offload::policy::{Policy, PolicyError};
use crate::offload::run::{RunHomes, RunWork};
use crate::offload::schedule::{run_stage_batch, run_step, StageBatch, StageInput, StepInputs};
use crate::offload::weights::{load_model, LayerStore};
use crate::offload::OffloadError;
use crate::pipeline::{StageError, StageLink};
use crate::tiers::{DiskOptions, TierOptions, Tiers};
use crate::weights::WeightSource;

pub use crate::model::Sampling;
pub use crate::sampling::TokenChoice;

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

/// Why a sequence stopped generating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FinishReason {
    /// It reached its token limit.
    Length,
    /// It produced the end-of-sequence token (kept as its last token).
    Eos,
    /// The caller ended it on a stop string ([`StepTokens::finish`]).
    Stop,
    /// The caller ended it because nobody waits for it any more (a client that disconnected).
    Cancelled,
}

impl FinishReason {
    /// The lower-case name strata's JSON uses: `length`, `eos`, `stop`, `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What one step produced, handed to the callback of [`Generator::generate_streaming`], which may end sequences.
#[derive(Debug)]
pub struct StepTokens<'a> {
    /// The step: 0 is the prefill (its tokens are the first generated ones).
    pub step: usize,
    /// Each sequence's new token, `None` for a sequence that had finished before this step.
    pub tokens: &'a [Option<u32>],
    /// Wall-clock seconds of this step, ending when its token ids were read back.
    pub seconds: f64,
    finish: &'a mut [Option<FinishReason>],
}

impl StepTokens<'_> {
    /// Why sequence `seq` has finished, if it has (its EOS may be this step's token).
    pub fn finished(&self, seq: usize) -> Option<FinishReason> {
        self.finish.get(seq).copied().flatten()
    }

    /// Ends sequence `seq` after this step's token (which stays in its output), with `reason`; no effect on a
    /// finished sequence. When every sequence has finished, no further step runs.
    pub fn finish(&mut self, seq: usize, reason: FinishReason) {
        if let Some(slot @ None) = self.finish.get_mut(seq) {
            *slot = Some(reason);
        }
    }
}

/// What [`Generator::generate`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    /// The generated tokens per sequence (prompt excluded), ending with EOS where a sequence stopped early.
    pub generated_ids: Vec<Vec<u32>>,
    /// Why each sequence stopped.
    pub finish_reasons: Vec<FinishReason>,
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
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The run cannot be placed: over a memory cap, a buffer over the binding limit, too many prompts.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A pipeline stage could not exchange hidden rows or ids with its neighbours.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// A step failed after others had produced tokens: those tokens, and why the run stopped.
    #[error("generation stopped after {steps} tokens per sequence: {source}")]
    Stopped {
        /// The tokens generated before the failure, per sequence.
        generated_ids: Vec<Vec<u32>>,
        /// Steps that completed.
        steps: usize,
        /// Why the next step failed.
        #[source]
        source: Box<GenerateError>,
    },
}

impl From<crate::tiers::TierError> for GenerateError {
    fn from(e: crate::tiers::TierError) -> Self {
        GenerateError::Offload(e.into())
    }
}

impl From<crate::offload::placement::CapError> for GenerateError {
    fn from(e: crate::offload::placement::CapError) -> Self {
        GenerateError::Placement(e.into())
    }
}

/// The model on the GPU (or wherever its policy places it) with its kernels, ready to generate.
#[derive(Debug)]
pub struct Generator {
    kernels: Kernels,
    model: GpuModel,
    /// The decoder layers' weights, resident or offloaded.
    layers: LayerStore,
    /// Every run setting but what to generate.
    policy: Policy,
    /// [`Generator::new`]: each call's prompts go in GPU batches of as many sequences as fit one binding, instead of
    /// the policy's batch sizes.
    fit_batches: bool,
    /// The memory tiers offloaded tensors live in.
    tiers: Tiers,
    /// Every buffer the generator and its runs hold, recorded where it is made.
    ledger: Ledger,
    limits: DeviceLimits,
    /// A pipeline stage's link to the other stages ([`Generator::set_stage`]).
    stage: Option<Stage>,
}

/// A pipeline stage's link, behind a lock: the generator is shared by reference, the link sends and receives.
struct Stage(std::sync::Mutex<Box<dyn StageLink + Send>>);

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pipeline stage")
    }
}

/// The buffers of one `generate` call, as its placement lists them.
struct Run {
    homes: RunHomes,
    work: RunWork,
}

impl Generator {
    /// Everything on the GPU with the default settings (no compression, dense attention, the checkpoint's dtype);
    /// each call's prompts go in GPU batches of as many sequences as fit one binding.
    pub fn new(gpu: &Gpu, source: &dyn WeightSource) -> Result<Self, GenerateError> {
        Self::load(gpu, source, &Policy::default(), true, &|_| {})
    }

    /// Places the weights of `source` by `policy` (GPU, CPU memory, or files in its offload directory) and compiles
    /// the kernels; [`Generator::generate`] then runs the policy's block schedule, in its GPU batches. `progress(i)`
    /// is called after decoder layer `i` is placed.
    pub fn with_policy(
        gpu: &Gpu,
        source: &dyn WeightSource,
        policy: &Policy,
        progress: &dyn Fn(usize),
    ) -> Result<Self, GenerateError> {
        Self::load(gpu, source, policy, false, progress)
    }

    fn load(
        gpu: &Gpu,
        source: &dyn WeightSource,
        policy: &Policy,
        fit_batches: bool,
        progress: &dyn Fn(usize),
    ) -> Result<Self, GenerateError> {
        policy.validate()?;
        let config = *source.config();
        let limits = DeviceLimits::of(gpu);
        // The weights do not depend on the workload: refuse an over-cap weight placement before allocating anything.
        let tiny = Workload {
            prompt_len: 1,
            gen_len: 1,
        };
        let placement = Placement::new(&config, policy, tiny, &limits)?;
        placement.check_caps()?;
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
        let ledger = Ledger::new();
        let (model, layers) = gpu.catch_oom("the model's weights", || {
            load_model(gpu, &tiers, &ledger, source, &placement, progress)
                .map_err(GenerateError::from)
        })?;
        // The kernels store activations as the placement's rule says (f16 for an f16 checkpoint with shader-f16).
        let options = KernelOptions::default().with_act(placement.act_dtype);
        Ok(Generator {
            kernels: Kernels::with_options(gpu, options),
            model,
            layers,
            policy: policy.clone(),
            fit_batches,
            tiers,
            ledger,
            limits,
            stage: None,
        })
    }

    /// Makes this generator one stage of a pipeline ([`crate::pipeline`]): its weights must be the stage's
    /// ([`crate::pipeline::StageWeights`] of `link.range()`), every stage must run the same prompts, options and
    /// policy batching, and each step exchanges hidden rows and ids through `link`. Only the last stage has logits.
    pub fn set_stage(&mut self, link: Box<dyn StageLink + Send>) {
        self.stage = Some(Stage(std::sync::Mutex::new(link)));
    }

    /// Whether this generator computes the logits and chooses the tokens: a single process, or a pipeline's last
    /// stage.
    pub fn has_logits(&self) -> bool {
        self.with_link(|l| Ok(l.range().is_last()))
            .and_then(Result::ok)
            .unwrap_or(true)
    }

    fn with_link<T>(
        &self,
        f: impl FnOnce(&mut dyn StageLink) -> Result<T, GenerateError>,
    ) -> Option<Result<T, GenerateError>> {
        let stage = self.stage.as_ref()?;
        // A poisoned lock only means an earlier step panicked; the link itself holds no broken invariant.
        let mut link = stage.0.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(link.as_mut()))
    }

    /// The memory tiers: their [`Tiers::report`] gives each tier's peak bytes.
    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// The run settings.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every buffer the generator and its runs hold: [`Ledger::peak`] is what they held at most.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The model's architecture.
    pub fn config(&self) -> &OptConfig {
        &self.model.config
    }

    /// How this generator's kernels store activations ([`crate::offload::placement::act_dtype`]).
    pub fn act_dtype(&self) -> ActDtype {
        self.kernels.act()
    }

    /// The model on the GPU.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The decoder layers' weights: resident buffers, offloaded homes and weight slots.
    pub fn layers(&self) -> &LayerStore {
        &self.layers
    }

    /// The size of each staging buffer the kernels hold now (during a run: what its placement gave them, unless a
    /// kernel had to grow one, which the placement would then have missed).
    pub fn kernel_staging(&self) -> [u64; STAGING_SLOTS] {
        self.kernels.staging_sizes()
    }

    fn gpu(&self) -> &Gpu {
        self.kernels.gpu()
    }

    /// The placement of a run of `prompts` sequences of `workload`: the policy's, in its GPU batches, or with
    /// [`Generator::new`] GPU batches of as many sequences as fit one binding.
    pub fn placement(
        &self,
        prompts: usize,
        workload: Workload,
    ) -> Result<Placement, GenerateError> {
        let c = &self.model.config;
        let policy = if self.fit_batches {
            let fit = largest_gpu_batch(c, &self.policy, &self.limits, workload);
            if fit == 0 {
                return Err(GenerateError::Capacity(format!(
                    "one sequence of {} tokens needs more bytes of activations or cache in one binding than this \
                     device's {}; shorten the prompt or max_new_tokens",
                    workload.seq_len(),
                    self.limits.max_binding
                )));
            }
            let gbs = fit.min(prompts.max(1));
            Policy {
                gpu_batch_size: gbs,
                num_gpu_batches: prompts.div_ceil(gbs).max(1),
                ..self.policy.clone()
            }
        } else {
            self.policy.clone()
        };
        Ok(Placement::for_prompts(
            c,
            &policy,
            workload,
            &self.limits,
            prompts,
        )?)
    }

    fn validate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        choices: &[TokenChoice],
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
        TokenChoice::new(options.sampling)
            .check()
            .map_err(GenerateError::Sampling)?;
        if !choices.is_empty() && choices.len() != prompts.len() {
            return Err(GenerateError::Sampling(format!(
                "{} token choices for {} prompts: give one per prompt, or none",
                choices.len(),
                prompts.len()
            )));
        }
        for (index, choice) in choices.iter().enumerate() {
            choice
                .check()
                .map_err(|e| GenerateError::Sampling(format!("sequence {index}: {e}")))?;
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

    /// Generates from `prompts` (token ids, unpadded, usually starting with BOS).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
    ) -> Result<GenerateOutput, GenerateError> {
        self.generate_with_progress(prompts, options, &|_| {})
    }

    /// [`Generator::generate`], calling `progress(t)` after step `t` (0 = prefill) finished (while every buffer of
    /// the run is held). A generator runs one call at a time: the run's buffers are recorded by name, and a second
    /// call while one runs is refused when it would make them again.
    pub fn generate_with_progress(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        progress: &dyn Fn(usize),
    ) -> Result<GenerateOutput, GenerateError> {
        self.generate_streaming(prompts, options, &[], &mut |step| progress(step.step))
    }

    /// [`Generator::generate`] with a callback after every step (while every buffer of the run is held) that receives
    /// each sequence's new token and may end sequences ([`StepTokens::finish`]); once every sequence has finished,
    /// no further step runs.
    ///
    /// `choices`: empty, every sequence follows `options.sampling` on the GPU (a draw keyed by the seed, the step and
    /// the sequence's row); or one [`TokenChoice`] per prompt, overriding `options.sampling`, where a sampled
    /// sequence's draws depend only on its own seed and the step (whatever its row or batch) and a penalty or top-k
    /// applies. Sequences that are not plain greedy then choose on the host from the step's logits.
    pub fn generate_streaming(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        choices: &[TokenChoice],
        on_step: &mut dyn FnMut(&mut StepTokens<'_>),
    ) -> Result<GenerateOutput, GenerateError> {
        self.validate(prompts, options, choices)?;
        let batch = prompts.len();
        if options.max_new_tokens == 0 {
            return Ok(GenerateOutput {
                generated_ids: vec![Vec::new(); batch],
                finish_reasons: vec![FinishReason::Length; batch],
                logits: options.record_logits.then(Vec::new),
                steps: 0,
                step_seconds: Vec::new(),
            });
        }
        let workload = Workload {
            prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(1),
            gen_len: options.max_new_tokens,
        };
        let placement = self.placement(batch, workload)?;
        placement.check_caps()?;
        let run = self.gpu().catch_oom("the KV cache and activations", || {
            let homes = RunHomes::new(self.gpu(), &self.tiers, &self.ledger, &placement)?;
            let work = RunWork::new(self.gpu(), &self.ledger, &placement, &homes, &self.kernels)?;
            Ok::<_, GenerateError>(Run { homes, work })
        });
        let result = run
            .and_then(|mut run| self.run(prompts, options, choices, &mut run, &placement, on_step));
        // The cached bind groups and the kernels' staging reference this run's buffers: release them with the run,
        // and the pool's slots with them, so the GPU holds only the weights between runs.
        self.kernels.release_cached_bindings();
        self.kernels.set_staging(Default::default());
        self.tiers.gpu().trim();
        result
    }

    /// Prefill, then decode steps until every sequence is done.
    fn run(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        choices: &[TokenChoice],
        run: &mut Run,
        placement: &Placement,
        on_step: &mut dyn FnMut(&mut StepTokens<'_>),
    ) -> Result<GenerateOutput, GenerateError> {
        let gbs = placement.gpu_batch_size();
        let c = self.model.config;
        let batch = prompts.len();
        let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let capacity = s + options.max_new_tokens;
        let queue = &self.gpu().queue;

        // Prefill inputs: left padding with pad id; positions count real tokens from 2, padding reads row 1.
        for (g, state) in run.work.states.iter().enumerate() {
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
        let mut finish: Vec<Option<FinishReason>> = vec![None; batch];
        let mut logits = options.record_logits.then(Vec::new);
        // Sequences whose token the host chooses, and the distinct ids each has seen (for a repetition penalty).
        let on_host: Vec<bool> = choices.iter().map(|c| !c.is_plain_greedy()).collect();
        let any_host = on_host.contains(&true);
        let gpu_sampling = if choices.is_empty() {
            options.sampling
        } else {
            Sampling::Greedy
        };
        let mut seen: Vec<Vec<u32>> = choices
            .iter()
            .zip(prompts)
            .map(|(c, prompt)| {
                let mut ids = if c.repetition_penalty != 1.0 {
                    prompt.clone()
                } else {
                    Vec::new()
                };
                ids.sort_unstable();
                ids.dedup();
                ids
            })
            .collect();
        // Decode steps keep the top fraction of attention positions; prefill is dense (Step::is_sparse).
        let attn_sparsity = placement.policy.attn_sparsity as f32;
        let mut step = Step {
            attn_sparsity,
            ..Step::new(s, 0)
        };
        let mut t = 0;
        let mut step_seconds = Vec::with_capacity(options.max_new_tokens);
        loop {
            let started = std::time::Instant::now();
            // A lost device fails the step, some uploads (the staging belt's) with a panic inside wgpu: check first.
            let lost = match self.gpu().lost() {
                Some(reason) => Err(GenerateError::Gpu(GpuError::DeviceLost { reason })),
                None => Ok(()),
            };
            let read_logits = logits.is_some() || any_host;
            let out = lost.and_then(|()| match self.stage.is_some() {
                true => self.stage_step(run, placement, step, t, gpu_sampling, read_logits),
                false => self
                    .record_step(run, placement, step, t, gpu_sampling)
                    .and_then(|()| self.read_step(run, batch, read_logits)),
            });
            // Whatever failed first (a tier's copy, a read-back), a lost device is the cause to report.
            let out = out.map_err(|e| match self.gpu().lost() {
                Some(reason) => GenerateError::Gpu(GpuError::DeviceLost { reason }),
                None => e,
            });
            let out = match out {
                Ok(out) => out,
                // What was generated is the caller's to keep (print, save) whatever stopped the run.
                Err(e) if t > 0 => {
                    return Err(GenerateError::Stopped {
                        generated_ids: generated,
                        steps: t,
                        source: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            };
            let mut next: Vec<u32> = bytemuck::pod_collect_to_vec(&out[0]);
            // A pipeline's other stages receive the last stage's final choice.
            if any_host && self.has_logits() {
                let step_logits: Vec<f32> = bytemuck::pod_collect_to_vec(&out[1]);
                let rows: Vec<Option<(&TokenChoice, &[u32])>> = (0..batch)
                    .map(|b| {
                        (on_host[b] && finish[b].is_none()).then(|| (&choices[b], &seen[b][..]))
                    })
                    .collect();
                let chosen = crate::sampling::choose_rows(&step_logits, c.vocab_size, &rows, t);
                for (b, id) in chosen.into_iter().enumerate() {
                    if let Some(id) = id {
                        next[b] = id;
                    }
                }
            }
            if let Some(sent) = self.with_link(|l| {
                if l.range().is_last() {
                    l.send_ids(t, &next)?;
                }
                Ok(())
            }) {
                sent?;
            }
            step_seconds.push(started.elapsed().as_secs_f64());
            if let (Some(all), Some(step_logits)) = (logits.as_mut(), out.get(1)) {
                all.extend_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(step_logits));
            }
            let mut tokens = vec![None; batch];
            for (b, &id) in next.iter().enumerate() {
                if finish[b].is_none() {
                    generated[b].push(id);
                    tokens[b] = Some(id);
                    if !options.ignore_eos && id == c.eos_token_id {
                        finish[b] = Some(FinishReason::Eos);
                    }
                    if let Some(ids) = seen
                        .get_mut(b)
                        .filter(|_| choices[b].repetition_penalty != 1.0)
                    {
                        if let Err(at) = ids.binary_search(&id) {
                            ids.insert(at, id);
                        }
                    }
                }
            }
            on_step(&mut StepTokens {
                step: t,
                tokens: &tokens,
                seconds: step_seconds[t],
                finish: &mut finish,
            });
            t += 1;
            if t == options.max_new_tokens || finish.iter().all(Option::is_some) {
                break;
            }
            // Decode inputs: the chosen token (pad once a sequence has finished) at the next position.
            for (g, state) in run.work.states.iter().enumerate() {
                let first = g * gbs;
                let ids: Vec<u32> = (first..first + state.batch)
                    .map(|b| {
                        if finish[b].is_some() {
                            c.pad_token_id
                        } else {
                            next[b]
                        }
                    })
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
        let finish_reasons = finish
            .into_iter()
            .map(|f| f.unwrap_or(FinishReason::Length))
            .collect();
        Ok(GenerateOutput {
            generated_ids: generated,
            finish_reasons,
            logits,
            steps: t,
            step_seconds,
        })
    }

    /// Whether decode steps in blocks of `num_gpu_batches` GPU batches read CPU-resident weights in place
    /// (zero-copy, over PCIe while the kernels compute) rather than copying them into weight slots: the policy's
    /// `transfer` setting on this device (its CPU tier on the DMA path) and these weights (some of them in CPU memory).
    pub fn decode_zero_copy(&self, num_gpu_batches: usize) -> bool {
        let direct =
            (0..self.model.config.num_hidden_layers).any(|j| self.layers.direct_bytes(j) > 0);
        self.policy
            .transfer
            .decode_zero_copy(direct, num_gpu_batches)
    }

    /// How many times a decode step of a run placed as `placement` reads each CPU-resident weight byte over PCIe:
    /// once when it copies them into weight slots or runs block decode steps ([`crate::offload::placement::block_decode`]),
    /// once per GPU batch when each batch's dispatches read them in place.
    pub fn decode_weight_passes(&self, placement: &Placement) -> usize {
        let batches = placement.batches.len();
        if self.decode_zero_copy(batches) && !placement.block_decode {
            batches
        } else {
            1
        }
    }

    /// Reads back a step's chosen ids, and its logits when `logits`.
    fn read_step(
        &self,
        run: &Run,
        batch: usize,
        logits: bool,
    ) -> Result<Vec<Vec<u8>>, GenerateError> {
        let mut regions = vec![(&run.work.next, 0, (batch * 4) as u64)];
        if logits {
            let vocab = self.model.config.vocab_size;
            regions.push((&run.work.logits, 0, (batch * vocab * 4) as u64));
        }
        Ok(self.gpu().read_back(&regions)?)
    }

    /// The step's inputs to the block schedule.
    fn step_inputs<'a>(
        &'a self,
        work: &'a RunWork,
        placement: &Placement,
        step: Step,
    ) -> StepInputs<'a> {
        let zero_copy = step.past > 0
            && step.s_new == 1
            && self.decode_zero_copy(placement.policy.num_gpu_batches);
        StepInputs {
            kernels: &self.kernels,
            model: &self.model,
            layers: &self.layers,
            tiers: Some(&self.tiers),
            states: &work.states,
            ws: &work.ws,
            logits: &work.logits,
            next: &work.next,
            overlap: placement.policy.overlap,
            act: placement.act_dtype,
            zero_copy,
            block_decode: zero_copy && placement.block_decode,
        }
    }

    /// One step of a pipeline stage, GPU batch by GPU batch ([`crate::pipeline`]): each batch's hidden rows in
    /// (embedded or received), the stage's layers, then out (sent on, or logits). Returns what
    /// [`Generator::read_step`] returns: the last stage reads its ids (and logits), the others receive the ids.
    fn stage_step(
        &self,
        run: &mut Run,
        placement: &Placement,
        step: Step,
        t: usize,
        sampling: Sampling,
        read_logits: bool,
    ) -> Result<Vec<Vec<u8>>, GenerateError> {
        let act = placement.act_dtype;
        let hidden = self.model.config.hidden_size;
        let rows: usize = run.work.states.iter().map(|s| s.batch).sum();
        let nb = run.work.states.len();
        let mut row0 = 0;
        for k in 0..nb {
            let (seqs, x) = (run.work.states[k].batch, run.work.states[k].x.clone());
            let bytes = seqs * step.s_new * hidden * act.bytes();
            let (first, last) = self
                .with_link(|l| Ok((l.range().is_first(), l.range().is_last())))
                .unwrap_or(Ok((true, true)))?;
            let received = match first {
                true => None,
                false => self
                    .with_link(|l| Ok(l.recv_hidden(t, k, bytes)?))
                    .transpose()?,
            };
            let part = StageBatch {
                batch: k,
                input: match &received {
                    Some(rows) => StageInput::Hidden(rows),
                    None => StageInput::Embed,
                },
                logits_row0: last.then_some(row0),
                choose_rows: (last && k + 1 == nb).then_some(rows),
            };
            let inputs = self.step_inputs(&run.work, placement, step);
            run_stage_batch(&inputs, &mut run.homes, step, sampling, t, part)?;
            if !last {
                let mut out = self.gpu().read_back(&[(&x, 0, bytes as u64)])?;
                let rows_out = out.pop().unwrap_or_default();
                self.with_link(|l| Ok(l.send_hidden(t, k, rows_out)?))
                    .transpose()?;
            }
            row0 += seqs;
        }
        match self.has_logits() {
            true => self.read_step(run, rows, read_logits),
            false => {
                let ids = self
                    .with_link(|l| Ok(l.recv_ids(t, rows)?))
                    .transpose()?
                    .unwrap_or_default();
                Ok(vec![bytemuck::cast_slice(&ids).to_vec()])
            }
        }
    }

    /// Runs one step through the block schedule ([`crate::offload::schedule`]).
    fn record_step(
        &self,
        run: &mut Run,
        placement: &Placement,
        step: Step,
        t: usize,
        sampling: Sampling,
    ) -> Result<(), GenerateError> {
        // One rule decides both (the same config, policy and device).
        debug_assert_eq!(placement.act_dtype, self.kernels.act());
        let inputs = self.step_inputs(&run.work, placement, step);
        run_step(&inputs, &mut run.homes, step, sampling, t)?;
        Ok(())
    }
}
