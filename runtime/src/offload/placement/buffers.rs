//! The names of a run's buffers: every entry of a [`super::Placement`] is one [`BufferSpec`], and its
//! [`BufferId`] is also the buffer's wgpu label (and a disk home's file name), so the allocator's own report, the
//! ledger and the placement name the same buffer the same way.

use std::fmt;

use crate::tiers::Tier;
use crate::weights::{LayerTensor, TensorId};

/// Keys or values of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kv {
    /// Keys.
    K,
    /// Values.
    V,
}

impl Kv {
    /// Both, keys first.
    pub const BOTH: [Kv; 2] = [Kv::K, Kv::V];

    const fn name(self) -> &'static str {
        match self {
            Kv::K => "k",
            Kv::V => "v",
        }
    }
}

/// The f32 scratch a packed KV cache computes through (shared by every layer of a run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScratchPart {
    /// One layer's keys `[batch, capacity, hidden]`.
    K,
    /// One layer's values `[batch, capacity, hidden]`.
    V,
    /// Their pair-major copy.
    Pairs,
    /// Decode attention's scores `[batch, heads, capacity]`.
    Scores,
}

/// A GPU batch's step inputs (u32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputPart {
    /// Token ids of a step `[batch * s_new]`.
    Ids,
    /// Position-table rows of a step `[batch * s_new]`.
    Positions,
    /// Attention mask `[batch, capacity]`.
    Mask,
}

/// The forward pass's scratch activations, shared by every layer and GPU batch of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkPart {
    /// Layer-normed rows `[rows, hidden]`.
    Norm,
    /// Queries `[rows, hidden]`.
    Q,
    /// Attention output `[rows, hidden]`.
    Attn,
    /// fc1's output `[rows, ffn]`.
    Mid,
    /// Token embeddings before project_in `[rows, proj]` (one element without a projection).
    Embed,
    /// Each sequence's last row `[batch, hidden]`.
    Last,
    /// The last rows, normed.
    LastNorm,
    /// The last rows, projected `[batch, proj]`.
    LastProj,
    /// The block's residual stream at a block decode step `[block sequences, hidden]` ([`super::block_decode`]).
    Block,
}

/// CPU attention's GPU scratch (decode, one row per sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CpuAttnPart {
    /// Layer-normed rows.
    Norm,
    /// Queries.
    Q,
    /// The new keys.
    K,
    /// The new values.
    V,
    /// The attention output, uploaded from the CPU.
    Attn,
    /// fc1's output `[rows, ffn]`.
    Mid,
}

/// What a buffer of a run holds. One variant per kind of buffer the runtime makes; the fields say which one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BufferId {
    /// A weight's buffer where it lives (row chunk `chunk` of a matrix; vectors have chunk 0).
    Weight {
        /// The tensor.
        tensor: TensorId,
        /// Its row chunk.
        chunk: usize,
    },
    /// Weight slot `slot`'s buffer for a layer tensor's chunk: every layer's offloaded copy streams through it.
    WeightSlot {
        /// 0, or 1 with overlap.
        slot: usize,
        /// The layer tensor.
        tensor: LayerTensor,
        /// Its row chunk.
        chunk: usize,
    },
    /// Layer `layer`'s keys or values for a whole GPU batch, resident on the GPU.
    Cache {
        /// Decoder layer.
        layer: usize,
        /// GPU batch.
        batch: usize,
        /// Keys or values.
        kv: Kv,
    },
    /// One sequence's keys or values of one layer in its tier (a GPU batch with some cache off the GPU).
    CacheHome {
        /// Decoder layer.
        layer: usize,
        /// GPU batch.
        batch: usize,
        /// Sequence in the batch.
        seq: usize,
        /// Keys or values.
        kv: Kv,
    },
    /// A cache slot's keys or values: a whole GPU batch's rows of one layer, streamed in and out.
    CacheSlot {
        /// 0, or 1 with overlap.
        slot: usize,
        /// Keys or values.
        kv: Kv,
    },
    /// A packed cache's f32 scratch.
    CacheScratch(ScratchPart),
    /// A GPU batch's residual stream, resident (its activations stay on the GPU).
    Hidden {
        /// GPU batch.
        batch: usize,
    },
    /// One sequence's hidden rows in its tier (a GPU batch with some activations off the GPU).
    ActHome {
        /// GPU batch.
        batch: usize,
        /// Sequence in the batch.
        seq: usize,
    },
    /// An activation slot: the residual stream of whichever offloaded GPU batch computes (GPU batch `k` uses slot
    /// `k % slots`; a second slot lets CPU-attention batches pipeline, [`super::act_slots`]).
    ActSlot {
        /// The slot.
        slot: usize,
    },
    /// A GPU batch's step inputs.
    Input {
        /// GPU batch.
        batch: usize,
        /// Which input.
        part: InputPart,
    },
    /// The forward pass's scratch.
    Work(WorkPart),
    /// Every sequence's logits `[prompts, vocab]` f32.
    Logits,
    /// Every sequence's chosen token (u32).
    NextIds,
    /// CPU attention's GPU scratch.
    CpuAttention(CpuAttnPart),
    /// The kernels' staging slot `slot` ([`crate::gpu::kernels::STAGING_SLOTS`]).
    KernelScratch {
        /// The staging slot.
        slot: usize,
    },
}

/// What a buffer is for, as the memory plan sums them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A weight's home (resident on the GPU, or in CPU memory or on disk).
    Weights,
    /// A KV cache home (resident, or one sequence's in a tier).
    Cache,
    /// Hidden rows between layers (resident, or one sequence's in a tier).
    Hidden,
    /// Slots, scratch, inputs and outputs: GPU buffers that hold no home.
    Working,
}

impl BufferId {
    /// What the buffer is for.
    pub const fn kind(&self) -> Kind {
        match self {
            BufferId::Weight { .. } => Kind::Weights,
            BufferId::Cache { .. } | BufferId::CacheHome { .. } => Kind::Cache,
            BufferId::Hidden { .. } | BufferId::ActHome { .. } => Kind::Hidden,
            _ => Kind::Working,
        }
    }
}

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BufferId::Weight { tensor, chunk } => write!(f, "{}[{chunk}]", tensor.name()),
            BufferId::WeightSlot {
                slot,
                tensor,
                chunk,
            } => write!(
                f,
                "weight slot {slot}: decoder.layers.*.{}.{}[{chunk}]",
                tensor.part.name(),
                tensor.param.name()
            ),
            BufferId::Cache { layer, batch, kv } => {
                write!(f, "cache.{layer}.{batch}.{}", kv.name())
            }
            BufferId::CacheHome {
                layer,
                batch,
                seq,
                kv,
            } => write!(f, "cache.{layer}.{batch}.{seq}.{}", kv.name()),
            BufferId::CacheSlot { slot, kv } => write!(f, "cache slot {slot}.{}", kv.name()),
            BufferId::CacheScratch(part) => write!(
                f,
                "cache scratch {}",
                match part {
                    ScratchPart::K => "k",
                    ScratchPart::V => "v",
                    ScratchPart::Pairs => "pairs",
                    ScratchPart::Scores => "scores",
                }
            ),
            BufferId::Hidden { batch } => write!(f, "hidden.{batch}"),
            BufferId::ActHome { batch, seq } => write!(f, "act.{batch}.{seq}"),
            BufferId::ActSlot { slot } => write!(f, "activation slot {slot}"),
            BufferId::Input { batch, part } => write!(
                f,
                "{}.{batch}",
                match part {
                    InputPart::Ids => "ids",
                    InputPart::Positions => "positions",
                    InputPart::Mask => "mask",
                }
            ),
            BufferId::Work(part) => f.write_str(match part {
                WorkPart::Norm => "normed x",
                WorkPart::Q => "q",
                WorkPart::Attn => "attention output",
                WorkPart::Mid => "fc1 output",
                WorkPart::Embed => "token embeddings",
                WorkPart::Last => "last hidden",
                WorkPart::LastNorm => "last hidden normed",
                WorkPart::LastProj => "last hidden projected",
                WorkPart::Block => "the block's hidden rows",
            }),
            BufferId::Logits => f.write_str("logits"),
            BufferId::NextIds => f.write_str("next ids"),
            BufferId::CpuAttention(part) => write!(
                f,
                "cpu attention {}",
                match part {
                    CpuAttnPart::Norm => "normed x",
                    CpuAttnPart::Q => "q",
                    CpuAttnPart::K => "k",
                    CpuAttnPart::V => "v",
                    CpuAttnPart::Attn => "output",
                    CpuAttnPart::Mid => "fc1 output",
                }
            ),
            BufferId::KernelScratch { slot } => write!(f, "kernel scratch {slot}"),
        }
    }
}

/// One buffer of a run: what it holds, where it lives and its exact size (what the allocation asks for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSpec {
    /// What it holds.
    pub id: BufferId,
    /// Where it lives.
    pub tier: Tier,
    /// Its size in bytes.
    pub bytes: u64,
}
