//! Offloading: where every byte of a run lives and when it moves, FlexLLMGen-style, over GPU memory, CPU memory and
//! disk ([`crate::tiers`] stores and moves the bytes).
//!
//! The modules read in the order a run uses them:
//! - [`policy`]: what the user asks for (batching, the tier split of weights, cache and activations, compression,
//!   sparsity, weight dtype, caps);
//! - [`placement`]: the one [`Placement`](placement::Placement), computed once from (config, policy, workload,
//!   device limits): each tensor's tier, each GPU batch's sequence split, the cache's row layout and the named list
//!   of every buffer the run holds with its size. The memory plan, the cap check and the cost model read it;
//! - [`ledger`]: the one place those buffers are made, each recorded, so the run's peak is measured, not estimated;
//! - the stores, which allocate exactly the placement's list: [`weights`] (every decoder layer's buffers, resident
//!   or in a home, and the weight slots), [`run`] (the KV cache and activations of one `generate` call, their slots,
//!   and the forward pass's working buffers) and [`home`] (an offloaded tensor with its write-back in flight);
//! - [`schedule`]: the block schedule, the one place that decides when bytes move within a step;
//! - [`cpu_attention`]: decode attention on the CPU over a CPU-resident cache.
//!
//! Every home holds its bytes in the GPU's format, so every transfer is a plain copy.

pub mod cpu_attention;
pub mod home;
pub mod ledger;
pub mod placement;
pub mod policy;
pub(crate) mod run;
pub(crate) mod schedule;
pub(crate) mod weights;

pub use crate::tiers::Tier;

use crate::gpu::GpuError;
use crate::model::ModelError;
use crate::tiers::TierError;
use crate::weights::WeightError;

/// Why offloaded state could not be placed or moved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// Uploading or reading a layer failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tier refused a tensor.
    #[error(transparent)]
    Tier(#[from] TierError),
    /// The GPU refused a buffer or an operation.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A packed cache row could not be written or read (CPU attention over a packed cache).
    #[error(transparent)]
    Compress(#[from] crate::compress::CompressError),
    /// The runtime made a buffer the placement does not list, or of another size: the plan and the allocation
    /// disagree (a bug, reported instead of running on a wrong plan).
    #[error("the runtime made {what} of {made} bytes where the placement plans {planned}")]
    Unplanned {
        /// The buffer.
        what: String,
        /// Bytes the placement lists (0: none).
        planned: u64,
        /// Bytes made.
        made: u64,
    },
}

impl From<WeightError> for OffloadError {
    fn from(e: WeightError) -> Self {
        OffloadError::Model(e.into())
    }
}
