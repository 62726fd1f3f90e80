//! [`Engine`]: a model opened from a directory, a Hub id or a built-in name, ready to generate text.
//!
//! ```no_run
//! use strata::{Engine, EngineOptions, GenerateOptions};
//!
//! let mut engine = Engine::from_pretrained("facebook/opt-1.3b", EngineOptions::default())?;
//! let out = engine.generate(&["Paris is the capital of"], GenerateOptions::default())?;
//! println!("{}", out[0].text);
//! # Ok::<(), strata::Error>(())
//! ```
//!
//! The engine opens the GPU, memory-maps the weights and reads the tokenizer when it is made; the weights are placed
//! (on the GPU, or offloaded by the [`PolicyChoice`]) by the first [`Engine::generate`] and reused by later calls.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use strata_runtime::checkpoint::{self, Checkpoint};
use strata_runtime::cost_model::auto::{auto_policy, AutoOptions};
use strata_runtime::dummy::DummyWeights;
use strata_runtime::generate::{self, Generator};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::offload::placement::{Caps, Workload};
use strata_runtime::tokenizer::Tokenizer;
use strata_runtime::weights::WeightSource;

use crate::error::{Error, GenerateError, Result};
use crate::hub::{self, HubOptions};
use crate::{CompressionConfig, FinishReason, ModelSpec, OptConfig, Policy, Sampling};

/// The model type of an [`Engine`] whose architecture is known only at run time (from config.json or a name): the
/// default. [`Engine::typed`] turns it into an engine of a compile-time model ([`crate::models`]).
#[derive(Clone, Copy, Debug)]
pub enum Dynamic {}

/// How to open a model ([`Engine::from_pretrained`]).
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Synthetic weights: a built-in name (`opt-1.3b`) runs with deterministic pseudo-random weights, which produce
    /// token ids, not meaningful text (for benchmarks and tests). Without it a built-in name is an error, so
    /// synthetic weights are never used by accident. With a directory, its config.json with synthetic weights.
    pub dummy: bool,
    /// The GPU: the first adapter whose name contains this (case-insensitive); `WGPU_ADAPTER_NAME` when `None`.
    pub adapter: Option<String>,
    /// Where Hub ids download to and from; `None`: [`HubOptions::default`], the environment's (`HF_HOME`,
    /// `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
    pub hub: Option<HubOptions>,
}

/// Where the weights, the KV cache and the activations live ([`Engine::policy`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum PolicyChoice {
    /// Everything on the GPU, each call's prompts in GPU batches of as many sequences as fit one binding.
    #[default]
    AllOnGpu,
    /// A fixed offloading policy (FlexLLMGen's settings plus caps); prompts run in blocks of
    /// `gpu_batch_size * num_gpu_batches` sequences.
    Fixed(Policy),
    /// The fastest policy strata's cost model finds for each call's workload on this machine (the adapter's hardware
    /// profile, measured the first time and cached), within the caps given.
    Auto(AutoPolicy),
}

/// What [`PolicyChoice::Auto`] may use; every field is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AutoPolicy {
    /// GPU memory the run may use, in bytes; `None`: the GPU's memory, from a table of known GPUs.
    pub gpu_mem: Option<u64>,
    /// CPU memory the run may use; `None`: what is available now.
    pub cpu_mem: Option<u64>,
    /// Disk space the run may use; `None`: the offload directory's free space.
    pub disk_mem: Option<u64>,
    /// Directory for disk-resident tensors; without one nothing goes to disk.
    pub offload_dir: Option<PathBuf>,
    /// Store the weights quantised.
    pub compress_weight: Option<CompressionConfig>,
    /// Store the KV cache quantised.
    pub compress_cache: Option<CompressionConfig>,
    /// The hardware profile file (measured and written there when absent); `None`: the adapter's cached profile.
    pub profile: Option<PathBuf>,
}

/// What to generate ([`Engine::generate`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate per prompt (fewer when a sequence ends with EOS, unless `ignore_eos`). Default 32.
    pub max_new_tokens: usize,
    /// How each token is chosen. Default greedy, as Hugging Face's `generate()`.
    pub sampling: Sampling,
    /// Keep generating after the end-of-sequence token. Default false.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            ignore_eos: false,
        }
    }
}

/// One prompt's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated text (special tokens such as EOS left out); empty when the engine has no tokenizer
    /// ([`Engine::tokenizer`]).
    pub text: String,
    /// The generated token ids (prompt excluded), ending with EOS where the sequence stopped on it.
    pub token_ids: Vec<u32>,
    /// The prompt's token ids (with the BOS the tokenizer prepends).
    pub prompt_ids: Vec<u32>,
    /// Why the sequence stopped.
    pub finish_reason: FinishReason,
}

/// A model with its weights, tokenizer and GPU, ready to generate.
///
/// `M` is the model's type: [`Dynamic`] (the default) when the architecture is read at run time, or a
/// compile-time model such as [`crate::models::Opt6_7b`] after [`Engine::typed`], which checked that the
/// checkpoint has that architecture. An engine is `Send + Sync`: it can move to a worker thread or sit behind a
/// lock; it runs one generation at a time (`&mut self`).
pub struct Engine<M = Dynamic> {
    gpu: Gpu,
    source: Box<dyn WeightSource>,
    tokenizer: std::result::Result<Tokenizer, String>,
    dir: Option<PathBuf>,
    policy: PolicyChoice,
    /// The placed weights and the policy they were placed by (`None`: [`PolicyChoice::AllOnGpu`]).
    loaded: Option<(Option<Policy>, Generator)>,
    model: PhantomData<fn() -> M>,
}

impl<M> fmt::Debug for Engine<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.config().name)
            .field("dir", &self.dir)
            .field("gpu", &self.gpu.describe())
            .field("policy", &self.policy)
            .field("loaded", &self.loaded.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether `arg` reads as a path rather than a model name: it contains a path separator.
fn is_path(arg: &str) -> bool {
    arg.contains('/') || arg.contains(std::path::MAIN_SEPARATOR)
}

impl Engine<Dynamic> {
    /// Opens a model, the way Hugging Face's `from_pretrained` does:
    ///
    /// - a model directory (config.json, safetensors weights, tokenizer files): a path with a separator
    ///   (`./opt-125m`, `/models/opt-1.3b`), or a bare name that is no built-in model (a built-in name wins over a
    ///   same-named directory: pass `./opt-125m` for the directory);
    /// - a Hub id (`facebook/opt-1.3b`, no such path): downloaded into the Hugging Face cache, PyTorch weights
    ///   converted to safetensors on the way ([`crate::hub`]);
    /// - a built-in architecture (`opt-1.3b`, [`crate::models`]) with synthetic weights, only with
    ///   [`EngineOptions::dummy`].
    ///
    /// `name_or_path` is a `&str`, a `String` or a `Path`. Opens the GPU and maps the weights (headers only);
    /// nothing is uploaded until the first generation.
    pub fn from_pretrained(name_or_path: impl AsRef<Path>, options: EngineOptions) -> Result<Self> {
        let (source, dir) = open_source(name_or_path.as_ref(), &options)?;
        let tokenizer = match &dir {
            Some(dir) => Tokenizer::from_dir(dir).map_err(|e| e.to_string()),
            None => Err("synthetic weights have no tokenizer".to_owned()),
        };
        let gpu = Gpu::new(&GpuOptions {
            adapter: options.adapter.clone(),
            ..GpuOptions::default()
        })?;
        Ok(Engine {
            gpu,
            source,
            tokenizer,
            dir,
            policy: PolicyChoice::default(),
            loaded: None,
            model: PhantomData,
        })
    }

    /// This engine as one of the compile-time model `T` ([`crate::models`]), after checking that the checkpoint
    /// has `T`'s architecture (every field that shapes a tensor); another architecture is
    /// [`Error::Architecture`], naming both.
    pub fn typed<T: ModelSpec>(self) -> Result<Engine<T>> {
        let found = self.config();
        let differences = T::CONFIG.architecture_differences(found);
        if !differences.is_empty() {
            return Err(Error::Architecture {
                expected: T::NAME,
                found: found.name.to_owned(),
                differences,
            });
        }
        Ok(Engine {
            gpu: self.gpu,
            source: self.source,
            tokenizer: self.tokenizer,
            dir: self.dir,
            policy: self.policy,
            loaded: self.loaded,
            model: PhantomData,
        })
    }
}

/// The weights `arg` names and the directory they come from (none for synthetic weights of a built-in name).
fn open_source(
    path: &Path,
    options: &EngineOptions,
) -> Result<(Box<dyn WeightSource>, Option<PathBuf>)> {
    // Names and Hub ids are UTF-8; a path that is not never matches one.
    let arg = &*path.to_string_lossy();
    let has_config = path.join(checkpoint::CONFIG_FILE).is_file();
    let dir = if has_config && (is_path(arg) || crate::get_opt_config(arg).is_err()) {
        Some(path.to_path_buf())
    } else if path.is_dir() && is_path(arg) {
        return Err(Error::NotAModel {
            path: path.to_path_buf(),
            reason: format!("it has no {}", checkpoint::CONFIG_FILE),
        });
    } else if !path.exists() && !options.dummy && hub::is_hub_id(arg) {
        let hub_options = options.hub.clone().unwrap_or_default();
        Some(hub::download(arg, &hub_options)?)
    } else if is_path(arg) && !path.exists() && crate::get_opt_config(arg).is_err() {
        return Err(Error::NotAModel {
            path: path.to_path_buf(),
            reason: "no such directory".to_owned(),
        });
    } else {
        None
    };
    let Some(dir) = dir else {
        // A built-in architecture: synthetic weights, asked for explicitly.
        let config = crate::get_opt_config(arg)?;
        if !options.dummy {
            return Err(Error::NeedsWeights {
                name: arg.to_owned(),
            });
        }
        return Ok((Box::new(DummyWeights::new(config)), None));
    };
    let source: Box<dyn WeightSource> = if options.dummy {
        Box::new(DummyWeights::new(checkpoint::read_config(&dir)?))
    } else {
        Box::new(Checkpoint::open(&dir)?)
    };
    Ok((source, Some(dir)))
}

impl<M: ModelSpec> Engine<M> {
    /// The weights as `M`'s shape-typed structs, read from the checkpoint on the host (each tensor's shape checked
    /// against its type).
    pub fn typed_weights(&self) -> Result<M::Weights> {
        Ok(M::load_weights(&*self.source)?)
    }
}

impl<M> Engine<M> {
    /// Where the weights, the KV cache and the activations live from the next generation on (default
    /// [`PolicyChoice::AllOnGpu`]). A new policy places the weights again at the next call.
    pub fn policy(mut self, policy: PolicyChoice) -> Self {
        if policy != self.policy {
            self.loaded = None;
        }
        self.policy = policy;
        self
    }

    /// The model's architecture (from config.json, or the built-in spec).
    pub fn config(&self) -> &OptConfig {
        self.source.config()
    }

    /// The model directory, `None` for synthetic weights of a built-in name.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The GPU the engine runs on, in words (adapter, backend, device type, binding limit).
    pub fn device(&self) -> String {
        self.gpu.describe()
    }

    /// The tokenizer, when the model directory has one (tokenizer.json, or vocab.json + merges.txt).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref().ok()
    }

    /// The policy the weights were last placed by: `None` before the first generation and with
    /// [`PolicyChoice::AllOnGpu`]; with [`PolicyChoice::Auto`], the policy the cost model chose.
    pub fn placed_policy(&self) -> Option<&Policy> {
        self.loaded.as_ref().and_then(|(policy, _)| policy.as_ref())
    }

    /// Generates from text prompts: each is tokenized (BOS prepended, as transformers' OPT tokenizer does), the
    /// prompts run together (left-padded, in the policy's blocks), and each result is decoded.
    pub fn generate<S: AsRef<str>>(
        &mut self,
        prompts: &[S],
        options: GenerateOptions,
    ) -> Result<Vec<Generation>> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .map_err(|reason| Error::NoTokenizer {
                model: self.config().name.to_owned(),
                reason: reason.clone(),
            })?;
        let ids = prompts
            .iter()
            .map(|p| tokenizer.encode(p.as_ref()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.generate_ids(&ids, options)
    }

    /// Generates from token-id prompts (unpadded; OPT prompts start with BOS, id 2). The text of each result is
    /// decoded when the engine has a tokenizer, else empty.
    pub fn generate_ids(
        &mut self,
        prompts: &[Vec<u32>],
        options: GenerateOptions,
    ) -> Result<Vec<Generation>> {
        if prompts.is_empty() {
            return Err(GenerateError::NoPrompts.into());
        }
        let run_options = generate::GenerateOptions {
            max_new_tokens: options.max_new_tokens,
            sampling: options.sampling,
            ignore_eos: options.ignore_eos,
            record_logits: false,
        };
        let (policy, generator) = self.place(prompts, &options)?;
        // A policy's block holds `effective_batch` sequences; more prompts run block after block.
        let block = policy
            .as_ref()
            .map_or(prompts.len(), Policy::effective_batch);
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(block.max(1)) {
            let result = generator.generate(chunk, &run_options)?;
            for ((prompt, ids), reason) in chunk
                .iter()
                .zip(result.generated_ids)
                .zip(result.finish_reasons)
            {
                out.push((prompt.clone(), ids, reason));
            }
        }
        out.into_iter()
            .map(|(prompt_ids, token_ids, finish_reason)| {
                let text = match &self.tokenizer {
                    Ok(t) => t.decode(&token_ids, true)?,
                    Err(_) => String::new(),
                };
                Ok(Generation {
                    text,
                    token_ids,
                    prompt_ids,
                    finish_reason,
                })
            })
            .collect()
    }

    /// The generator for this call: the placed one when the policy it needs is the one it was placed by, else the
    /// weights placed again.
    fn place(
        &mut self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
    ) -> Result<&(Option<Policy>, Generator)> {
        let wanted = match &self.policy {
            PolicyChoice::AllOnGpu => None,
            PolicyChoice::Fixed(policy) => Some(policy.clone()),
            PolicyChoice::Auto(auto) => {
                let workload = Workload {
                    prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(1),
                    gen_len: options.max_new_tokens.max(1),
                };
                let caps = Caps {
                    gpu: auto.gpu_mem,
                    cpu: auto.cpu_mem,
                    disk: auto.disk_mem,
                };
                let auto_options = AutoOptions {
                    profile: auto.profile.clone(),
                    offload_dir: auto.offload_dir.clone(),
                    max_block: prompts.len(),
                    compress_weight: auto.compress_weight,
                    compress_cache: auto.compress_cache,
                    ..AutoOptions::default()
                };
                let config = *self.config();
                let choice = auto_policy(
                    &self.gpu,
                    &config,
                    workload,
                    caps,
                    &auto_options,
                    &mut |_| {},
                )?;
                Some(choice.policy)
            }
        };
        let loaded = match self.loaded.take() {
            Some(loaded) if loaded.0 == wanted => loaded,
            // The old placement's buffers go before the new one's are made.
            _ => {
                let generator = match &wanted {
                    None => Generator::new(&self.gpu, &*self.source)?,
                    Some(policy) => {
                        Generator::with_policy(&self.gpu, &*self.source, policy, &|_| {})?
                    }
                };
                (wanted, generator)
            }
        };
        Ok(self.loaded.insert(loaded))
    }
}
