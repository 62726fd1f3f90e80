//! strata's runtime: everything that runs an OPT model.
//!
//! The crate is organised by concern: [`config`] describes an architecture and its memory, [`weights`] lists the
//! tensors a config needs and the interface weight sources implement. [`gpu`] owns the device and the kernels,
//! [`model`] is OPT's forward pass on the GPU, [`generate`] the generation loop, and [`reference`](mod@reference) a plain CPU
//! forward pass the GPU is tested against.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod dummy;
pub mod generate;
pub mod gpu;
pub mod model;
pub mod npy;
pub mod reference;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, ConfigError, DType, OptConfig};
