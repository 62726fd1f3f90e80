//! Pipeline parallelism: one process (a stage) runs a contiguous range of decoder layers and exchanges hidden states
//! with its neighbours, FlexLLMGen's distributed formulation.
//!
//! The runtime knows nothing of the transport: a stage sees the model through [`StageWeights`] (a config of only its
//! layers, whose layer `i` is the model's layer `range.start + i`, so placement, stores and schedule need no change)
//! and talks to its neighbours through a [`StageLink`] ([`crate::generate::Generator::set_stage`]). Each step runs
//! GPU batch by GPU batch (the micro-batches): the first stage embeds a batch, every other stage receives its hidden
//! rows; all of the stage's layers run for that batch; the last stage records its logits, every other stage reads
//! its hidden rows back and sends them on, so the next stage works on batch k while this one runs batch k + 1. The
//! last stage chooses every sequence's token over all batches' logits (the same rows and draws as a single process)
//! and sends the ids to every other stage, which needs them for the next step.

use std::ops::Range;

use crate::compress::{CompressionConfig, PackedRef};
use crate::config::OptConfig;
use crate::weights::{
    layer_tensor_spec, HostTensor, TensorId, TensorSpec, WeightError, WeightSource,
};

/// Which decoder layers one stage runs, of the model's `total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRange {
    /// The model's layers this stage runs.
    pub layers: Range<usize>,
    /// The model's decoder layers.
    pub total: usize,
}

impl StageRange {
    /// Whether this stage embeds the tokens (it runs layer 0).
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }

    /// Whether this stage computes the logits and chooses the tokens (it runs the last layer).
    pub fn is_last(&self) -> bool {
        self.layers.end == self.total
    }
}

/// Splits `layers` decoder layers of `layer_bytes` each over `extra.len()` stages, stage `i` also holding
/// `extra[i]` bytes (the embeddings on the first, the head on the last), so that the largest stage is as small as
/// possible; every stage runs at least one layer. `None` when there are more stages than layers.
pub fn balanced_ranges(
    layers: usize,
    layer_bytes: u64,
    extra: &[u64],
) -> Option<Vec<Range<usize>>> {
    let stages = extra.len();
    if stages == 0 || stages > layers {
        return None;
    }
    let mut counts = vec![1usize; stages];
    for _ in stages..layers {
        // The next layer goes where it raises the stage's bytes the least (the first such stage on a tie).
        let i = (0..stages).min_by_key(|&i| (counts[i] as u64 + 1) * layer_bytes + extra[i])?;
        counts[i] += 1;
    }
    let mut start = 0;
    Some(
        counts
            .into_iter()
            .map(|c| {
                start += c;
                start - c..start
            })
            .collect(),
    )
}

/// The weights one stage runs: `inner`'s model cut to the layers of `range`, renumbered from 0. Tensors outside the
/// layers are served as they are.
pub struct StageWeights<'a> {
    inner: &'a dyn WeightSource,
    config: OptConfig,
    range: StageRange,
}

impl<'a> StageWeights<'a> {
    /// The layers `range` of `inner`'s model.
    pub fn new(inner: &'a dyn WeightSource, range: StageRange) -> StageWeights<'a> {
        let config = OptConfig {
            num_hidden_layers: range.layers.len(),
            ..*inner.config()
        };
        StageWeights {
            inner,
            config,
            range,
        }
    }

    /// The model's spec of the stage's tensor `spec` (layer `i` is the model's layer `range.start + i`).
    fn model_spec(&self, spec: &TensorSpec) -> TensorSpec {
        match spec.id {
            TensorId::Layer(i, t) => {
                layer_tensor_spec(self.inner.config(), self.range.layers.start + i, t)
            }
            TensorId::Model(_) => spec.clone(),
        }
    }
}

impl WeightSource for StageWeights<'_> {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        self.inner.load(&self.model_spec(spec))
    }

    fn packed(
        &self,
        spec: &TensorSpec,
        config: CompressionConfig,
    ) -> Option<Result<PackedRef<'_>, WeightError>> {
        self.inner.packed(&self.model_spec(spec), config)
    }
}

/// Why a stage could not exchange data with its neighbours.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// A neighbour sent nothing within the deadline (it died, hangs or failed without aborting the run).
    #[error("no {what} from rank {peer} within {seconds} s (step {step}): that rank died, hangs or failed")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The rank that should have sent it.
        peer: usize,
        /// The deadline.
        seconds: u64,
        /// The token step.
        step: usize,
    },
    /// A neighbour sent data of another size than this stage expects.
    #[error("rank {peer} sent {got} bytes of {what} where {expected} were expected (step {step})")]
    Size {
        /// What was received.
        what: String,
        /// The sender.
        peer: usize,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
        /// The token step.
        step: usize,
    },
    /// The transport failed.
    #[error("pipeline transport: {0}")]
    Transport(String),
}

/// A stage's connection to the rest of the pipeline. Messages are matched by (step, GPU batch): every stage runs the
/// same steps over the same GPU batches.
pub trait StageLink {
    /// This stage's layers.
    fn range(&self) -> &StageRange;

    /// Receives GPU batch `batch`'s hidden rows of step `step` from the previous stage: `bytes` bytes (the rows in
    /// the activation dtype, `[sequences * new tokens, hidden]`).
    fn recv_hidden(
        &mut self,
        step: usize,
        batch: usize,
        bytes: usize,
    ) -> Result<Vec<u8>, StageError>;

    /// Sends GPU batch `batch`'s hidden rows of step `step` to the next stage without waiting for it to take them.
    fn send_hidden(&mut self, step: usize, batch: usize, rows: Vec<u8>) -> Result<(), StageError>;

    /// The last stage: sends step `step`'s chosen ids (one per sequence) to every other stage.
    fn send_ids(&mut self, step: usize, ids: &[u32]) -> Result<(), StageError>;

    /// Every other stage: receives step `step`'s chosen ids (`count` of them) from the last stage.
    fn recv_ids(&mut self, step: usize, count: usize) -> Result<Vec<u32>, StageError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_ranges_cover_every_layer_once_and_favour_lighter_stages() {
        let even = balanced_ranges(12, 10, &[0, 0, 0]).unwrap();
        assert_eq!(even, vec![0..4, 4..8, 8..12]);
        // The first stage holds 25 bytes of embeddings: it takes fewer layers.
        let skewed = balanced_ranges(12, 10, &[25, 0, 0]).unwrap();
        assert_eq!(skewed.iter().map(|r| r.len()).sum::<usize>(), 12);
        assert!(skewed[0].len() < skewed[1].len());
        let bytes: Vec<u64> = skewed
            .iter()
            .zip([25, 0, 0])
            .map(|(r, e)| r.len() as u64 * 10 + e)
            .collect();
        // No move of one layer lowers the largest stage.
        assert!(bytes.iter().max().unwrap() - bytes.iter().min().unwrap() <= 10);
        assert_eq!(balanced_ranges(2, 10, &[0, 0, 0]), None);
        assert_eq!(
            balanced_ranges(3, 10, &[0, 0, 0]).unwrap(),
            vec![0..1, 1..2, 2..3]
        );
    }

    #[test]
    fn stage_range_knows_its_ends() {
        let r = StageRange {
            layers: 0..2,
            total: 4,
        };
        assert!(r.is_first() && !r.is_last());
        let r = StageRange {
            layers: 2..4,
            total: 4,
        };
        assert!(!r.is_first() && r.is_last());
    }
}
