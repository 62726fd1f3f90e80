//! strata's runtime: everything that runs an OPT model. This is strata's internal engine, not a stable API: its
//! modules are public for the `strata` binary, the tests and the fuzz targets only. Programs use the `strata` crate
//! (`strata::Engine`, `strata::Error`, `strata::models`), which exposes a curated, documented API over it.
//!
//! The crate is organised by concern, one owner each:
//! - what a model is: [`config`] (an architecture and its memory), [`weights`] (the tensors a config needs and the
//!   interface weight sources implement), [`checkpoint`] (Hugging Face safetensors directories), [`dummy`]
//!   (synthetic weights), [`tokenizer`], [`npy`];
//! - running it: [`gpu`] (the device and the WGSL kernels), [`model`] (OPT's forward pass on the GPU),
//!   [`generate`] (the generation loop), [`sampling`] (token choice on the host: repetition penalty, top-k,
//!   per-sequence seeds), [`reference`](mod@reference) (a plain CPU forward pass the GPU is tested against);
//! - offloading: [`offload`] (the policy, the one placement of every byte of a run, the ledger that makes exactly
//!   its buffers, the stores of weights, cache and activations, the block schedule, CPU attention), [`tiers`] (GPU /
//!   CPU / disk storage and transfers), [`compress`] (group-wise 4-bit weights and KV cache);
//! - choosing a policy: [`hardware`] (a machine's speeds) and [`cost_model`] (the fastest policy that fits).
#![deny(missing_docs)]
// These docs are for the engine's maintainers, so they link its crate-private modules too.
#![allow(rustdoc::private_intra_doc_links)]

pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod cost_model;
pub mod dummy;
pub(crate) mod fault;
pub mod generate;
pub mod gpu;
pub mod hardware;
pub mod model;
pub mod npy;
pub mod offload;
pub mod pipeline;
pub mod reference;
pub mod sampling;
pub mod tiers;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, ConfigError, DType, OptConfig};
