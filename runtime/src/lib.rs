//! strata's runtime: everything that runs an OPT model.
//!
//! The crate is organised by concern: [`config`] describes an architecture and its memory, [`weights`] lists the
//! tensors a config needs and the interface weight sources implement. [`policy`] is an offloading policy,
//! [`planner`] its memory per tier (checked before anything is allocated), [`hardware`] a machine's speeds, and
//! [`cost_model`] chooses the fastest policy that fits.
//! tensors a config needs and the interface weight sources implement. [`gpu`] owns the device and the kernels,
//! [`model`] is OPT's forward pass on the GPU, [`generate`] the generation loop, and [`reference`] a plain CPU
//! forward pass the GPU is tested against.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod cost_model;
pub mod dummy;
pub mod generate;
pub mod gpu;
pub mod hardware;
pub mod model;
pub mod npy;
pub mod planner;
pub mod policy;
pub mod reference;
pub mod tiers;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, ConfigError, DType, OptConfig};
