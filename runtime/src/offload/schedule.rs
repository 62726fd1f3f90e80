//! The block schedule: the one place that decides in which order one token step's compute and transfers run.
//!
//! ```text
//! for each token step (prefill, then one per generated token)        -- generate.rs
//!   embed every GPU batch k; store offloaded hidden rows               -- Schedule::embed
//!   for layer j in 0..layers
//!     for GPU batch k in 0..num_gpu_batches                            -- item n = j * num_gpu_batches + k
//!       load(j, k)                                                     -- one transfer submit, before (j, k)'s compute:
//!         k == 0: layer j's offloaded weights into a weight slot       --   overlap: layer j+1's into the other slot,
//!                                                                      --   disk reads of layer j+2 start on threads
//!         (j, k)'s KV rows [0, past) into cache slot n % 2             --   unless fetched ahead by item n-1
//!         (j, k)'s hidden rows into the activation slot
//!         overlap: item n+1's KV rows into the other cache slot        --   (j, k+1), or (j+1, 0); disk reads of
//!                                                                      --   item n+2's rows start on threads
//!       compute(j, k): decoder_layer, or CPU attention                 -- weights loaded once, reused for every k
//!       store(j, k): new KV rows [past, past + s_new), hidden rows     -- streamed back behind the compute
//!   logits of every GPU batch (fetching offloaded hidden rows), token choice
//! ```
//!
//! wgpu has one queue, so "overlap" means ordering: a transfer is recorded into a submit that precedes the compute
//! needing it, while the slot it fills is not the one the preceding compute reads, and CPU-side work (disk reads on
//! the tier's I/O threads, staging copies) runs while the GPU works. With `overlap` false the same steps run in
//! order through one weight slot and one cache slot, each fetch right before the compute that needs it.
//!
//! A store into host memory or a file finishes on the CPU once the GPU has run it (see [`super::home::Home`]).
//! Each store goes to its home when submitted; one item later (when the GPU has moved on to the next compute) its
//! bytes are copied into host memory or handed to the disk tier's threads, and a home waits for its writes only
//! right before it is read again (the next step's fetch of a cache, the next layer's fetch of hidden rows). At most
//! two items' stores are in flight, which bounds the readback and write buffers.
//!
//! `cpu_cache_compute`: at decode, a GPU batch the placement marks ([`super::placement::BatchPlacement`]: its KV
//! cache lives wholly in CPU memory) runs attention on the CPU instead ([`super::cpu_attention`], rayon over
//! sequence x head; a packed cache through [`crate::compress::decode_attention`] over its packed rows): q, k, v are
//! projected on the GPU and come back in a small readback (which waits for its own submission, not the whole
//! queue), the new k, v rows are written (packed: quantised) into the host-memory cache, the attention output
//! is uploaded, and the rest of the layer runs on the GPU. Batches are pipelined where their activations stay on the
//! GPU, or with overlap go through two activation slots ([`super::placement::act_slots`]; GPU batch k in slot k % 2,
//! its hidden rows stored once its layer ends): batch k's projections are submitted before the CPU attends for batch
//! k-1, so the GPU runs them (and batch k-1's rest of the layer) while the CPU works; the last batch's layer
//! finishes before the next layer's weights load.
//! With overlap, the copy of the next layer's weights is queued behind the layer's last CPU-attention batch's
//! projections and readback rather than before the first's, so each readback waits for its own work, not the copy,
//! and the copy runs while the CPU attends. Other batches (and every prefill) take the GPU path.
//!
//! Decode steps with `zero_copy` ([`super::policy::Transfer`]) bind CPU-resident weights where they live instead of
//! copying them into a weight slot: the kernels read them over PCIe while they compute. With `block_decode`
//! ([`super::placement::block_decode`]: several GPU batches, caches and hidden rows all on the GPU) the loop over
//! GPU batches moves inside the layer: each layer runs once over the whole block's rows
//! ([`crate::model::decoder_block_layer`]), so each weight byte read in place crosses PCIe once per step.

use std::collections::{HashMap, VecDeque};

use rayon::prelude::*;

use super::cpu_attention::{cpu_attention, encode_cache_row, SeqRows};
use super::home::Home;
use super::placement::{CacheRange, CacheRows};
use super::run::{BatchAct, BatchCache, RunHomes};
use super::weights::{LayerStore, PartKey};
use super::OffloadError;
use crate::compress::{decode_attention, AttentionShape, PackedMut, PackedRef};
use crate::gpu::kernels::{decode_act, encode_act, ActDtype, CacheDtype, LinearCall, OutRows};
use crate::gpu::kernels::{Kernels, Recorder};
use crate::model::{
    attention_input, decoder_block_layer, decoder_layer, finish_layer, BatchState, GpuModel,
    KvCache, LayerWeights, Sampling, Step, Workspace,
};
use crate::tiers::{PendingStore, Readback, TensorHome, Ticket, Tiers};

/// Everything one step reads (the mutable homes are passed separately).
pub struct StepInputs<'a> {
    /// Compiled kernels.
    pub kernels: &'a Kernels,
    /// Embeddings and head.
    pub model: &'a GpuModel,
    /// The decoder layers' weights.
    pub layers: &'a LayerStore,
    /// The memory tiers (absent on the all-GPU path).
    pub tiers: Option<&'a Tiers>,
    /// Per GPU batch.
    pub states: &'a [BatchState],
    /// Scratch.
    pub ws: &'a Workspace,
    /// `[batch, vocab]` logits.
    pub logits: &'a wgpu::Buffer,
    /// Chosen ids.
    pub next: &'a wgpu::Buffer,
    /// Fetch ahead into double-buffered weight and cache slots.
    pub overlap: bool,
    /// How activations are stored (the placement's [`super::placement::act_dtype`]): hidden rows move at its size.
    pub act: ActDtype,
    /// This step's kernels read CPU-resident weights in place, over PCIe, instead of from a weight slot
    /// ([`super::policy::Transfer`]; decode steps only).
    pub zero_copy: bool,
    /// This step runs each layer once over every GPU batch ([`super::placement::block_decode`]; with `zero_copy`).
    pub block_decode: bool,
}

/// The scratch buffers of [`super::cpu_attention::CpuAttn`], cloned so that the step's recorder can borrow them
/// while the homes change.
struct CpuAttnViews {
    norm: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    attn: wgpu::Buffer,
    mid: wgpu::Buffer,
    masks: Vec<Vec<u32>>,
}

const F32: usize = 4;

/// A KV cache range being read from disk ahead of its fetch.
type RangeRead = (CacheRange, Ticket<Vec<u8>>);

/// Which home a store writes.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Layer, GPU batch, sequence, keys (else values).
    Cache(usize, usize, usize, bool),
    /// GPU batch, sequence.
    Act(usize, usize),
}

impl Target {
    fn home(self, homes: &mut RunHomes) -> Option<&mut Home> {
        match self {
            Target::Cache(j, k, i, keys) => match &mut homes.caches[j][k] {
                BatchCache::Homes(seqs) => {
                    let seq = seqs.get_mut(i)?;
                    Some(if keys { &mut seq.k } else { &mut seq.v })
                }
                BatchCache::Resident(_) => None,
            },
            Target::Act(k, i) => match &mut homes.acts[k] {
                BatchAct::Homes(h) => h.get_mut(i),
                BatchAct::Resident => None,
            },
        }
    }
}

/// The first `bytes` of a settled host-memory CPU home.
fn cached_rows(home: &Home, bytes: usize) -> Option<&[u8]> {
    match home.settled() {
        Some(TensorHome::Cpu(t)) => t.host_bytes().and_then(|b| b.get(..bytes)),
        _ => None,
    }
}

fn not_host() -> OffloadError {
    OffloadError::Model(crate::model::ModelError::Unsupported(
        "CPU attention over a cache that is not wholly in the CPU tier's host memory".into(),
    ))
}

fn no_tiers() -> OffloadError {
    OffloadError::Model(crate::model::ModelError::Unsupported(
        "an offloaded tensor without its slot or memory tiers".into(),
    ))
}

/// GPU views of one step's buffers: clones of the buffer handles, so the recorder can borrow them for the whole step
/// while the homes change.
struct Views {
    layers: Vec<LayerWeights>,
    states: Vec<BatchState>,
    /// `caches[j][k]`: resident, or the cache slot of item `j * num_gpu_batches + k`.
    caches: Vec<Vec<KvCache>>,
    cpu: Option<CpuAttnViews>,
}

/// One step in flight: the views, the homes, the recorder of compute not yet submitted, and the transfers.
struct Schedule<'v, 'a> {
    inp: &'v StepInputs<'a>,
    views: &'v Views,
    homes: &'v mut RunHomes,
    step: Step,
    rec: Recorder<'v>,
    /// Per GPU batch: hidden rows offloaded.
    act_off: Vec<bool>,
    /// Per GPU batch: attention on the CPU this step.
    on_cpu: Vec<bool>,
    /// Disk reads of offloaded weights started ahead, by (layer, buffer).
    tickets: HashMap<(usize, PartKey), Ticket<Vec<u8>>>,
    /// Disk reads of KV rows started ahead, by (item, sequence, keys).
    cache_reads: HashMap<(usize, usize, bool), Vec<RangeRead>>,
    /// The homes of each submitted item's stores, oldest first, not yet moved on ([`Home`]).
    stores: VecDeque<Vec<Target>>,
    /// Homes whose writes the last drain started.
    writing: Vec<Target>,
    /// The item whose KV rows were fetched ahead into its cache slot.
    prefetched: Option<usize>,
    /// A layer whose weights [`Schedule::load`] left for a CPU-attention batch to fetch once its q, k and v are
    /// queued (see there).
    deferred_weights: Option<usize>,
    /// A CPU-attention batch whose q, k, v are on their way back while the next batch's work is queued.
    pending_cpu: Option<PendingCpu>,
    /// The one GPU batch this step runs ([`run_stage_batch`]), else every batch.
    only: Option<usize>,
}

/// The CPU half of a CPU-attention layer still to do: (layer, GPU batch), the readbacks of q, k and v, and the
/// element type k and v come back in.
struct PendingCpu {
    j: usize,
    k: usize,
    reads: [Readback; 3],
    kv_dtype: ActDtype,
}

/// Runs one token step for every GPU batch through the block schedule and records the token choice into `next`.
pub fn run_step(
    inp: &StepInputs,
    homes: &mut RunHomes,
    step: Step,
    sampling: Sampling,
    t: usize,
) -> Result<(), OffloadError> {
    let c = &inp.model.config;
    let nb = inp.states.len();
    let on_cpu: Vec<bool> = (0..nb).map(|k| attends_on_cpu(homes, step, k)).collect();
    let views = Views::new(inp, homes, on_cpu.iter().any(|&b| b), None)?;
    let mut s = Schedule::new(inp, &views, homes, step, on_cpu, None);
    s.prologue()?;
    for k in 0..nb {
        s.embed(k)?;
    }
    match (inp.block_decode, &inp.ws.block) {
        (true, Some(block)) => s.block_layers(block)?,
        _ => {
            for j in 0..c.num_hidden_layers {
                for k in 0..nb {
                    s.load(j, k)?;
                    s.compute(j, k)?;
                    s.store(j, k)?;
                }
                s.fetch_deferred_weights()?;
                // The next layer's weights may go into the slot this layer's last CPU-attention batch still reads.
                s.end_cpu_attention()?;
            }
        }
    }
    let mut row0 = 0;
    for k in 0..nb {
        s.logits(k, row0)?;
        row0 += inp.states[k].batch;
    }
    s.choose(sampling, t, row0);
    s.finish()
}

/// Where one pipeline stage's micro-batch comes from.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'b> {
    /// The token embedding (the first stage).
    Embed,
    /// The previous stage's hidden rows, `[sequences * new tokens, hidden]` in the activation dtype.
    Hidden(&'b [u8]),
}

/// What one pipeline stage does with one GPU batch in a step ([`crate::pipeline`]).
#[derive(Clone, Copy, Debug)]
pub struct StageBatch<'b> {
    /// The GPU batch.
    pub batch: usize,
    /// Where its hidden rows come from.
    pub input: StageInput<'b>,
    /// The last stage: record its logits into rows `row0..` of the logits.
    pub logits_row0: Option<usize>,
    /// The last stage's last batch: then record the token choice over this many logits rows.
    pub choose_rows: Option<usize>,
}

/// Runs one GPU batch of a token step through every layer of the stage's model (a pipeline stage's share of that
/// micro-batch), in the order [`run_step`] runs items. After it, the batch's hidden rows are in its state's `x` (the
/// activation slot for an offloaded batch), for the caller to read back and send on.
pub fn run_stage_batch(
    inp: &StepInputs,
    homes: &mut RunHomes,
    step: Step,
    sampling: Sampling,
    t: usize,
    part: StageBatch,
) -> Result<(), OffloadError> {
    let c = &inp.model.config;
    let k = part.batch;
    let on_cpu: Vec<bool> = (0..inp.states.len())
        .map(|b| b == k && attends_on_cpu(homes, step, b))
        .collect();
    let views = Views::new(inp, homes, on_cpu[k], Some(k))?;
    let mut s = Schedule::new(inp, &views, homes, step, on_cpu, Some(k));
    s.prologue()?;
    match part.input {
        StageInput::Embed => s.embed(k)?,
        StageInput::Hidden(rows) => s.take_hidden(k, rows)?,
    }
    for j in 0..c.num_hidden_layers {
        s.load(j, k)?;
        s.compute(j, k)?;
        s.store(j, k)?;
        s.fetch_deferred_weights()?;
        s.end_cpu_attention()?;
    }
    // Otherwise the hidden rows go back from the batch's residual stream: an offloaded batch's is the activation
    // slot, which still holds them after the last layer's store.
    if let Some(row0) = part.logits_row0 {
        s.logits(k, row0)?;
    }
    if let Some(rows) = part.choose_rows {
        s.choose(sampling, t, rows);
    }
    s.finish()
}

/// Whether GPU batch `k` attends on the CPU this step: where the placement says so, at decode.
fn attends_on_cpu(homes: &RunHomes, step: Step, k: usize) -> bool {
    step.past > 0
        && step.s_new == 1
        && homes.cpu_attn.is_some()
        && homes.cpu_attention.get(k).copied().unwrap_or(false)
}

impl<'v, 'a> Schedule<'v, 'a> {
    /// A step with nothing recorded or in flight yet; `only`: the one GPU batch a pipeline stage runs.
    fn new(
        inp: &'v StepInputs<'a>,
        views: &'v Views,
        homes: &'v mut RunHomes,
        step: Step,
        on_cpu: Vec<bool>,
        only: Option<usize>,
    ) -> Self {
        Schedule {
            inp,
            views,
            act_off: homes
                .acts
                .iter()
                .map(|a| matches!(a, BatchAct::Homes(_)))
                .collect(),
            homes,
            step,
            rec: inp.kernels.recorder(),
            on_cpu,
            tickets: HashMap::new(),
            cache_reads: HashMap::new(),
            stores: VecDeque::new(),
            writing: Vec::new(),
            prefetched: None,
            deferred_weights: None,
            pending_cpu: None,
            only,
        }
    }
}

impl Views {
    /// `only`: the step runs that one GPU batch (a pipeline stage's micro-batch), whose items then alternate
    /// cache slots layer by layer.
    fn new(
        inp: &StepInputs,
        homes: &mut RunHomes,
        cpu: bool,
        only: Option<usize>,
    ) -> Result<Views, OffloadError> {
        let c = &inp.model.config;
        let nb = inp.states.len();
        let weight_slot = |j: usize| if inp.overlap { j % 2 } else { 0 };
        let cpu = match (&mut homes.cpu_attn, cpu) {
            (Some(sc), true) => {
                if sc.masks.is_none() {
                    let regions: Vec<_> = inp
                        .states
                        .iter()
                        .map(|s| (&s.mask, 0, (s.batch * s.capacity * F32) as u64))
                        .collect();
                    let masks = inp.kernels.gpu().read_back(&regions)?;
                    sc.masks = Some(
                        masks
                            .iter()
                            .map(|b| bytemuck::pod_collect_to_vec(b))
                            .collect(),
                    );
                }
                Some(CpuAttnViews {
                    norm: sc.norm.buffer().clone(),
                    q: sc.q.buffer().clone(),
                    k: sc.k.buffer().clone(),
                    v: sc.v.buffer().clone(),
                    attn: sc.attn.buffer().clone(),
                    mid: sc.mid.buffer().clone(),
                    masks: sc.masks.clone().unwrap_or_default(),
                })
            }
            _ => None,
        };
        Ok(Views {
            layers: (0..c.num_hidden_layers)
                .map(|j| {
                    inp.layers
                        .view_with(j, weight_slot(j), inp.zero_copy)
                        .ok_or_else(no_tiers)
                })
                .collect::<Result<_, _>>()?,
            states: inp.states.to_vec(),
            caches: (0..c.num_hidden_layers)
                .map(|j| {
                    (0..nb)
                        .map(|k| {
                            homes
                                .cache_view(
                                    j,
                                    k,
                                    inp.states[k].batch,
                                    only.map_or(j * nb + k, |_| j),
                                )
                                .ok_or_else(no_tiers)
                        })
                        .collect::<Result<_, _>>()
                })
                .collect::<Result<_, _>>()?,
            cpu,
        })
    }
}

impl<'v> Schedule<'v, '_> {
    fn tiers(&self) -> Result<&'v Tiers, OffloadError> {
        self.inp.tiers.ok_or_else(no_tiers)
    }

    fn batches(&self) -> usize {
        self.inp.states.len()
    }

    /// The item after item `n` in this step's order: the next GPU batch, or with one batch the next layer.
    fn next_item(&self, n: usize) -> usize {
        match self.only {
            None => n + 1,
            Some(_) => n + self.batches(),
        }
    }

    /// Bytes of one sequence's hidden rows of this step, as its activation home and the slot hold them.
    fn act_row_bytes(&self) -> u64 {
        (self.step.s_new * self.inp.model.config.hidden_size * self.inp.act.bytes()) as u64
    }

    /// Whether item `n`'s KV rows stream through a cache slot and it has rows to fetch.
    fn cache_in(&self, n: usize) -> bool {
        let nb = self.batches();
        let (j, k) = (n / nb, n % nb);
        self.step.past > 0 && self.cache_off(j, k)
    }

    /// Whether (j, k) computes in a cache slot (its cache is offloaded and its attention runs on the GPU).
    fn cache_off(&self, j: usize, k: usize) -> bool {
        matches!(self.homes.caches[j][k], BatchCache::Homes(_)) && !self.on_cpu[k]
    }

    /// Submits the compute recorded so far: queue order puts it before whatever is submitted next.
    fn flush(&mut self) {
        let rec = std::mem::replace(&mut self.rec, self.inp.kernels.recorder());
        if !rec.is_empty() {
            rec.submit();
        }
    }

    /// Flushes the compute and starts a transfer encoder queued after it.
    fn transfers(&mut self) -> Result<wgpu::CommandEncoder, OffloadError> {
        self.flush();
        let tiers = self.tiers()?;
        let mut enc = tiers
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("strata offload transfers"),
            });
        tiers.begin_transfers(&mut enc);
        Ok(enc)
    }

    /// Submits a transfer encoder and hands its stores to their homes, as one item of the store queue.
    fn submit(
        &mut self,
        enc: wgpu::CommandEncoder,
        stores: Vec<(Target, PendingStore)>,
    ) -> Result<(), OffloadError> {
        let tiers = self.tiers()?;
        let mut enc = enc;
        tiers.end_transfers(&mut enc);
        tiers.prepare_submit(&enc);
        tiers.queue().submit([enc.finish()]);
        if !stores.is_empty() {
            let mut targets = Vec::with_capacity(stores.len());
            for (target, pending) in stores {
                if let Some(home) = target.home(self.homes) {
                    home.stored(tiers, pending)?;
                }
                targets.push(target);
            }
            self.stores.push_back(targets);
        }
        Ok(())
    }

    /// Moves every submitted item's stores but the newest `keep` on (waiting for the disk writes the previous drain
    /// started, so at most one item's writes run at a time).
    fn drain(&mut self, keep: usize) -> Result<(), OffloadError> {
        let tiers = self.tiers()?;
        for target in std::mem::take(&mut self.writing) {
            if let Some(home) = target.home(self.homes) {
                home.settle(tiers)?;
            }
        }
        while self.stores.len() > keep {
            for target in self.stores.pop_front().unwrap_or_default() {
                if let Some(home) = target.home(self.homes) {
                    home.start_write(tiers)?;
                    self.writing.push(target);
                }
            }
        }
        Ok(())
    }

    /// With overlap, layer 0's weights are queued first, and the disk reads of layer 1's weights and of the first
    /// two items' KV rows start now.
    fn prologue(&mut self) -> Result<(), OffloadError> {
        if self.inp.overlap && self.fetches_weights(0) {
            let mut enc = self.transfers()?;
            self.fetch_layer(0, &mut enc)?;
            self.submit(enc, Vec::new())?;
            self.prefetch_layer(1)?;
        }
        let first = self.only.unwrap_or(0);
        self.read_ahead(first)?;
        self.read_ahead(self.next_item(first))
    }

    /// Writes the previous stage's hidden rows of GPU batch `k` into its residual stream (after every submitted
    /// command that reads it: the queue orders the write) and stores them into its homes when offloaded.
    fn take_hidden(&mut self, k: usize, rows: &[u8]) -> Result<(), OffloadError> {
        self.flush();
        self.inp
            .kernels
            .gpu()
            .queue
            .write_buffer(&self.views.states[k].x, 0, rows);
        if self.act_off[k] {
            let mut enc = self.transfers()?;
            let stores = self.store_act(k, &mut enc)?;
            self.submit(enc, stores)?;
        }
        Ok(())
    }

    /// Embeds GPU batch `k` and stores its offloaded hidden rows.
    fn embed(&mut self, k: usize) -> Result<(), OffloadError> {
        let views = self.views;
        let inp = self.inp;
        inp.model
            .embed(&mut self.rec, &views.states[k], inp.ws, self.step);
        if self.act_off[k] {
            let mut enc = self.transfers()?;
            let stores = self.store_act(k, &mut enc)?;
            self.submit(enc, stores)?;
        }
        Ok(())
    }

    /// The transfers (j, k)'s compute needs, in one submit queued before it: layer weights at k == 0, its KV rows
    /// (unless fetched ahead) and hidden rows, and with overlap the next item's KV rows into the other cache slot.
    fn load(&mut self, j: usize, k: usize) -> Result<(), OffloadError> {
        let inp = self.inp;
        if self.pending_in_slot_of(k) {
            // Its hidden rows would go into the slot the pending batch still computes in.
            self.end_cpu_attention()?;
        }
        let n_layers = inp.model.config.num_hidden_layers;
        let n = j * self.batches() + k;
        let weight_layer = if inp.overlap { j + 1 } else { j };
        let layer_weights = k == self.only.unwrap_or(0)
            && weight_layer < n_layers
            && self.fetches_weights(weight_layer);
        // The next layer's weights wait until the layer's last CPU-attention batch has its projections and their
        // readback queued: each readback then waits for its own work, not the copy, and the copy runs while the CPU
        // attends.
        let defer = layer_weights && inp.overlap && self.on_cpu[k];
        if defer {
            self.deferred_weights = Some(weight_layer);
        }
        let weights = layer_weights && !defer;
        let cache_now = self.cache_in(n) && self.prefetched != Some(n);
        let items = n_layers * self.batches();
        let next = self.next_item(n);
        // Ahead only into the other slot: with one slot the next item's rows would overwrite this item's.
        let cache_next = inp.overlap
            && self.homes.cache_slot_count() >= 2
            && next < items
            && self.cache_in(next);
        // The disk reads the item after next's KV rows while this one's transfers and compute run.
        self.read_ahead(self.next_item(next))?;
        if weights || cache_now || self.act_off[k] || cache_next {
            let mut enc = self.transfers()?;
            if weights {
                self.fetch_layer(weight_layer, &mut enc)?;
            }
            if cache_now {
                self.fetch_cache(n, &mut enc)?;
            }
            if self.act_off[k] {
                self.fetch_act(k, &mut enc)?;
            }
            if cache_next {
                self.fetch_cache(next, &mut enc)?;
                self.prefetched = Some(next);
            }
            self.submit(enc, Vec::new())?;
        }
        if layer_weights && inp.overlap {
            // The disk works on the layer after next while the GPU computes this one (once per layer: at its first
            // item, whether the copy is queued now or deferred).
            self.prefetch_layer(weight_layer + 1)?;
        }
        Ok(())
    }

    /// The last GPU batch of a layer that attends on the CPU this step.
    fn last_cpu_batch(&self) -> Option<usize> {
        (0..self.batches())
            .rev()
            .find(|&k| self.on_cpu[k] && self.only.is_none_or(|only| only == k))
    }

    /// Queues the weights [`Schedule::load`] deferred, if any.
    fn fetch_deferred_weights(&mut self) -> Result<(), OffloadError> {
        let Some(layer) = self.deferred_weights.take() else {
            return Ok(());
        };
        let mut enc = self.transfers()?;
        self.fetch_layer(layer, &mut enc)?;
        self.submit(enc, Vec::new())
    }

    /// Finishes the CPU-attention layer still pending, if any, and stores its hidden rows when they are offloaded.
    fn end_cpu_attention(&mut self) -> Result<(), OffloadError> {
        let Some(p) = self.pending_cpu.take() else {
            return Ok(());
        };
        let k = p.k;
        self.cpu_attention_end(p)?;
        if !self.act_off[k] {
            return Ok(());
        }
        let mut enc = self.transfers()?;
        let stores = self.store_act(k, &mut enc)?;
        self.submit(enc, stores)?;
        self.drain(1)
    }

    /// Whether the pending CPU-attention batch computes in GPU batch `k`'s activation slot.
    fn pending_in_slot_of(&self, k: usize) -> bool {
        let slots = self.homes.act_slot_count().max(1);
        self.act_off[k]
            && self
                .pending_cpu
                .as_ref()
                .is_some_and(|p| self.act_off[p.k] && p.k % slots == k % slots)
    }

    /// Whether layer `j` has offloaded weights to copy into a weight slot this step.
    fn fetches_weights(&self, j: usize) -> bool {
        self.inp
            .layers
            .to_fetch(j, self.inp.zero_copy)
            .next()
            .is_some()
    }

    /// Records (j, k)'s decoder layer: on the GPU, or with attention on the CPU.
    fn compute(&mut self, j: usize, k: usize) -> Result<(), OffloadError> {
        let views = self.views;
        let inp = self.inp;
        if let (true, Some(tiers)) = (inp.zero_copy, inp.tiers) {
            // The layer's dispatches read its CPU-resident weights over PCIe, once per GPU batch.
            tiers.note_direct_read(inp.layers.direct_bytes(j));
        }
        if self.on_cpu[k] {
            // Pipelined: this batch's projections go to the GPU, then the CPU attends for the previous batch while
            // the GPU runs them (and then that batch's rest of the layer while the CPU attends for this one).
            let begun = self.cpu_attention_begin(j, k)?;
            if Some(k) == self.last_cpu_batch() {
                self.fetch_deferred_weights()?;
            }
            self.end_cpu_attention()?;
            if self.act_off[k] && self.homes.act_slot_count() < 2 {
                // Its residual stream is the one activation slot, which the next batch's fetch overwrites.
                return self.cpu_attention_end(begun);
            }
            // With two activation slots the next batch fetches into the other one; this batch's hidden rows are
            // stored once its layer ends (`end_cpu_attention`).
            self.pending_cpu = Some(begun);
            return Ok(());
        }
        decoder_layer(
            &mut self.rec,
            &inp.model.config,
            &views.layers[j],
            &views.caches[j][k],
            &views.states[k],
            inp.ws,
            self.step,
        );
        Ok(())
    }

    /// Every layer of a block decode step ([`decoder_block_layer`]): the GPU batches' hidden rows are gathered into
    /// the block's residual stream `block`, each layer runs once over all of them (its CPU-resident weights read in
    /// place once), and the rows go back to each batch's stream for the logits. Caches and hidden rows stay on the
    /// GPU, so the items' transfers are the weights' alone (disk-resident ones still copy into a weight slot).
    fn block_layers(&mut self, block: &'v wgpu::Buffer) -> Result<(), OffloadError> {
        let views = self.views;
        let inp = self.inp;
        let row_bytes = self.act_row_bytes();
        let mut offsets = Vec::with_capacity(views.states.len());
        let mut off = 0;
        for state in &views.states {
            let bytes = state.batch as u64 * row_bytes;
            self.rec.copy(&state.x, 0, block, off, bytes);
            offsets.push((off, bytes));
            off += bytes;
        }
        for j in 0..inp.model.config.num_hidden_layers {
            for k in 0..self.batches() {
                self.load(j, k)?;
            }
            if let (true, Some(tiers)) = (inp.zero_copy, inp.tiers) {
                tiers.note_direct_read(inp.layers.direct_bytes(j));
            }
            let batches: Vec<_> = (0..self.batches())
                .map(|k| (&views.caches[j][k], &views.states[k]))
                .collect();
            decoder_block_layer(
                &mut self.rec,
                &inp.model.config,
                &views.layers[j],
                &batches,
                block,
                inp.ws,
                self.step,
            );
            for k in 0..self.batches() {
                self.store(j, k)?;
            }
        }
        for (state, (off, bytes)) in views.states.iter().zip(offsets) {
            self.rec.copy(block, off, &state.x, 0, bytes);
        }
        Ok(())
    }

    /// Streams (j, k)'s new KV rows (when it computed in a cache slot) and hidden rows back to their homes, in a
    /// submit queued right behind its compute.
    fn store(&mut self, j: usize, k: usize) -> Result<(), OffloadError> {
        let cache_off = self.cache_off(j, k);
        // A pending CPU-attention batch's hidden rows are not final yet: `end_cpu_attention` stores them.
        let act_now = self.act_off[k]
            && !self
                .pending_cpu
                .as_ref()
                .is_some_and(|p| p.j == j && p.k == k);
        if !(cache_off || act_now) {
            return Ok(());
        }
        let mut enc = self.transfers()?;
        let mut stores = Vec::new();
        if cache_off {
            // A CPU-attention batch appended its rows to the homes itself: only a slot holds rows to store.
            let tiers = self.tiers()?;
            let slot = &self.views.caches[j][k];
            let rows = self.homes.cache_rows;
            if let BatchCache::Homes(seqs) = &mut self.homes.caches[j][k] {
                for (i, seq) in seqs.iter_mut().enumerate() {
                    for (keys, src, home) in
                        [(true, &slot.k, &mut seq.k), (false, &slot.v, &mut seq.v)]
                    {
                        // A home takes its ranges' stores in order (`Home::stored`).
                        for r in rows.store_ranges(i, self.step) {
                            let p = tiers.store_range(
                                src,
                                r.slot,
                                home.for_store(),
                                r.home,
                                r.len,
                                &mut enc,
                            )?;
                            stores.push((Target::Cache(j, k, i, keys), p));
                        }
                    }
                }
            }
        }
        if act_now {
            stores.extend(self.store_act(k, &mut enc)?);
        }
        self.submit(enc, stores)?;
        // The GPU now has this item's compute: move the previous item's stores on meanwhile.
        self.drain(1)
    }

    /// Fetches GPU batch `k`'s hidden rows and records its logits into rows `row0..` of the logits.
    fn logits(&mut self, k: usize, row0: usize) -> Result<(), OffloadError> {
        if self.act_off[k] {
            let mut enc = self.transfers()?;
            self.fetch_act(k, &mut enc)?;
            self.submit(enc, Vec::new())?;
        }
        let views = self.views;
        let inp = self.inp;
        inp.model.logits(
            &mut self.rec,
            &views.states[k],
            inp.ws,
            self.step,
            inp.logits,
            row0,
        );
        Ok(())
    }

    /// Records the token choice over the `rows` logits rows.
    fn choose(&mut self, sampling: Sampling, t: usize, rows: usize) {
        let inp = self.inp;
        let vocab = inp.model.config.vocab_size;
        match sampling {
            Sampling::Greedy => self.rec.argmax(inp.logits, rows, vocab, inp.next),
            Sampling::Sample {
                temperature,
                top_p,
                seed,
            } => self.rec.sample(
                inp.logits,
                rows,
                vocab,
                temperature,
                top_p,
                (seed ^ (seed >> 32)) as u32,
                t as u32,
                inp.next,
            ),
        }
    }

    /// Submits the rest and moves every store on (their writes finish behind the token read-back, or at the homes'
    /// next read).
    fn finish(mut self) -> Result<(), OffloadError> {
        self.flush();
        if !self.stores.is_empty() || !self.writing.is_empty() {
            self.drain(0)?;
        }
        // The GPU time of this step's transfer submits, behind its last submit (the token read-back waits as long).
        if let Some(tiers) = self.inp.tiers {
            tiers.collect_transfer_time()?;
        }
        Ok(())
    }

    /// Starts the disk reads of layer `j`'s disk-resident buffers.
    fn prefetch_layer(&mut self, j: usize) -> Result<(), OffloadError> {
        let layers = self.inp.layers;
        for (key, home) in layers.offloaded(j) {
            if let Some(ticket) = self.tiers()?.prefetch(home, Vec::new())? {
                self.tickets.insert((j, key), ticket);
            }
        }
        Ok(())
    }

    /// Records layer `j`'s offloaded buffers into its weight slot.
    fn fetch_layer(
        &mut self,
        j: usize,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<(), OffloadError> {
        let layers = self.inp.layers;
        let slot = if self.inp.overlap { j % 2 } else { 0 };
        let tiers = self.tiers()?;
        for (key, home) in layers.to_fetch(j, self.inp.zero_copy) {
            let dst = layers.slot_buffer(slot, key).ok_or_else(no_tiers)?;
            match self.tickets.remove(&(j, key)) {
                Some(ticket) => tiers.fetch_host(&ticket.wait()?, &dst, 0, enc)?,
                None => tiers.fetch(home, &dst, 0, enc)?,
            }
        }
        Ok(())
    }

    /// Records "copy item `n`'s KV rows [0, past) into its cache slot" (the ranges [`super::placement::CacheRows`]
    /// gives; bytes read ahead from disk where [`Schedule::read_ahead`] started them).
    fn fetch_cache(
        &mut self,
        n: usize,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<(), OffloadError> {
        let nb = self.batches();
        let (j, k) = (n / nb, n % nb);
        let tiers = self.tiers()?;
        let slot = &self.views.caches[j][k];
        let rows = self.homes.cache_rows;
        if let BatchCache::Homes(seqs) = &mut self.homes.caches[j][k] {
            for (i, seq) in seqs.iter_mut().enumerate() {
                for (keys, home, dst) in [(true, &mut seq.k, &slot.k), (false, &mut seq.v, &slot.v)]
                {
                    match self.cache_reads.remove(&(n, i, keys)) {
                        Some(reads) => {
                            for (r, read) in reads {
                                tiers.fetch_host(&read.wait()?, dst, r.slot, enc)?;
                            }
                        }
                        None => {
                            let home = home.settle(tiers)?;
                            for r in rows.fetch_ranges(i, self.step) {
                                tiers.fetch_range(home, r.home, r.len, dst, r.slot, enc)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// With overlap, starts reading item `n`'s disk-resident KV rows [0, past) on the disk tier's threads; its fetch
    /// takes the bytes. Nothing writes those homes in between: an item's rows are stored only after its compute.
    fn read_ahead(&mut self, n: usize) -> Result<(), OffloadError> {
        let nb = self.batches();
        if !self.inp.overlap || n >= self.homes.caches.len() * nb || !self.cache_in(n) {
            return Ok(());
        }
        let tiers = self.tiers()?;
        let rows = self.homes.cache_rows;
        if let BatchCache::Homes(seqs) = &mut self.homes.caches[n / nb][n % nb] {
            for (i, seq) in seqs.iter_mut().enumerate() {
                for (keys, home) in [(true, &mut seq.k), (false, &mut seq.v)] {
                    if let TensorHome::Disk(t) = home.settle(tiers)? {
                        let reads = rows
                            .fetch_ranges(i, self.step)
                            .into_iter()
                            .map(|r| {
                                let read =
                                    tiers
                                        .disk()?
                                        .prefetch_range_into(t, r.home, r.len, Vec::new());
                                Ok((r, read))
                            })
                            .collect::<Result<Vec<_>, OffloadError>>()?;
                        self.cache_reads.insert((n, i, keys), reads);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records "copy GPU batch `k`'s offloaded hidden rows into the activation slot".
    fn fetch_act(&mut self, k: usize, enc: &mut wgpu::CommandEncoder) -> Result<(), OffloadError> {
        let tiers = self.tiers()?;
        let row_bytes = self.act_row_bytes();
        let slot = &self.views.states[k].x;
        if let BatchAct::Homes(h) = &mut self.homes.acts[k] {
            for (i, home) in h.iter_mut().enumerate() {
                let home = home.settle(tiers)?;
                tiers.fetch_range(home, 0, row_bytes, slot, i as u64 * row_bytes, enc)?;
            }
        }
        Ok(())
    }

    /// Records "write the activation slot's rows of GPU batch `k` back to their homes".
    fn store_act(
        &mut self,
        k: usize,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<Vec<(Target, PendingStore)>, OffloadError> {
        let tiers = self.tiers()?;
        let row_bytes = self.act_row_bytes();
        let slot = &self.views.states[k].x;
        let mut stores = Vec::new();
        if let BatchAct::Homes(h) = &mut self.homes.acts[k] {
            for (i, home) in h.iter_mut().enumerate() {
                let at = i as u64 * row_bytes;
                let p = tiers.store_range(slot, at, home.for_store(), 0, row_bytes, enc)?;
                stores.push((Target::Act(k, i), p));
            }
        }
        Ok(stores)
    }

    /// The GPU half of one decoder layer of a decode step with attention on the CPU: the layer norm and q, k, v
    /// projections recorded and submitted with a small readback of q, k, v behind them. [`Schedule::cpu_attention_end`]
    /// does the rest: the new k, v rows appended to the CPU-resident cache, attention on the CPU (rayon), its output
    /// uploaded and the rest of the layer on the GPU. Together they mirror [`decoder_layer`] around the attention.
    fn cpu_attention_begin(&mut self, j: usize, k: usize) -> Result<PendingCpu, OffloadError> {
        let inp = self.inp;
        let views = self.views;
        let sc = views.cpu.as_ref().ok_or_else(no_tiers)?;
        let (layer, state) = (&views.layers[j], &views.states[k]);
        let c = &inp.model.config;
        let (h, rows) = (c.hidden_size, state.batch);
        let dense = OutRows::dense(h, 0);
        let x = &state.x;
        let rec = &mut self.rec;
        let attn_in = attention_input(rec, c, layer, x, rows, &sc.norm);
        // q comes back as activations; k and v as the cache will hold them where the activations are halves (the
        // projection's own rounding, as on the GPU path), else as f32 values the CPU rounds to the cache's dtype.
        let act = rec.act();
        let dtype = self.homes.cache_dtype();
        // A packed cache quantises the activations themselves, as q4_quantize does on the GPU path.
        let kv_dtype = match (act, dtype) {
            _ if self.homes.cache_rows.is_packed() => act,
            (ActDtype::F16, CacheDtype::F16) => ActDtype::F16,
            _ => ActDtype::F32,
        };
        for (l, out, out_dtype) in [
            (&layer.q_proj, &sc.q, act),
            (&layer.k_proj, &sc.k, kv_dtype),
            (&layer.v_proj, &sc.v, kv_dtype),
        ] {
            rec.linear_call(LinearCall {
                out_dtype: Some(out_dtype),
                ..LinearCall::new(attn_in, rows, &l.weight, l.bias.as_ref(), out, dense)
            });
        }
        // q, k and v come back in one small readback, which waits for its own submission only.
        let tiers = self.tiers()?;
        let (q_bytes, kv_bytes) = (
            (rows * h * act.bytes()) as u64,
            (rows * h * kv_dtype.bytes()) as u64,
        );
        let mut enc = self.transfers()?;
        let reads = [
            tiers.readback(&sc.q, 0, q_bytes, &mut enc)?,
            tiers.readback(&sc.k, 0, kv_bytes, &mut enc)?,
            tiers.readback(&sc.v, 0, kv_bytes, &mut enc)?,
        ];
        self.submit(enc, Vec::new())?;
        Ok(PendingCpu {
            j,
            k,
            reads,
            kv_dtype,
        })
    }

    /// The CPU half of [`Schedule::cpu_attention_begin`]'s layer: submits the compute recorded so far (the previous
    /// batch's rest of the layer, which the GPU runs meanwhile), waits for this batch's q, k, v, appends k and v to
    /// the host-memory homes, attends, uploads the output and records the rest of the layer.
    fn cpu_attention_end(&mut self, pending: PendingCpu) -> Result<(), OffloadError> {
        let PendingCpu {
            j,
            k,
            reads,
            kv_dtype,
        } = pending;
        self.flush();
        let inp = self.inp;
        let views = self.views;
        let sc = views.cpu.as_ref().ok_or_else(no_tiers)?;
        let (layer, state, step) = (&views.layers[j], &views.states[k], self.step);
        let c = &inp.model.config;
        let (h, rows) = (c.hidden_size, state.batch);
        let x = &state.x;
        let act = inp.act;
        let dtype = self.homes.cache_dtype();
        let packed = self.homes.cache_compression();
        let cache_rows = self.homes.cache_rows;
        let tiers = self.tiers()?;
        let mut back = Vec::with_capacity(reads.len());
        for read in reads {
            back.push(read.wait()?);
        }
        let new_kv = [
            decode_act(&back[1], kv_dtype),
            decode_act(&back[2], kv_dtype),
        ];
        let len = step.past + 1;
        let capacity = state.capacity;
        let masks: Vec<&[u32]> = (0..rows)
            .map(|i| &sc.masks[k][i * capacity..(i + 1) * capacity])
            .collect();
        let q = decode_act(&back[0], act);
        let BatchCache::Homes(seqs) = &mut self.homes.caches[j][k] else {
            return Err(not_host());
        };
        let out = match (cache_rows, packed) {
            (CacheRows::Packed { heads, home, .. }, Some(cc)) => {
                // The new rows are quantised into the host-memory homes in place (the format q4_quantize writes),
                // and the CPU attends over the stored packed rows as the GPU's q4_attention would, in parallel over
                // sequences (and heads within each).
                let home_bytes = home.bytes() as usize;
                for (i, seq) in seqs.iter_mut().enumerate() {
                    for (home_t, new) in [(&mut seq.k, &new_kv[0]), (&mut seq.v, &new_kv[1])] {
                        let bytes = match home_t.settle(tiers)? {
                            TensorHome::Cpu(t) => t.host_bytes_mut().ok_or_else(not_host)?,
                            _ => return Err(not_host()),
                        };
                        let stored = bytes.get_mut(..home_bytes).ok_or_else(not_host)?;
                        let mut packed = PackedMut::new(home.rows, home.cols, cc, stored)?;
                        // Pair-major home: head `hh`'s token t is row `hh * capacity + t`.
                        for (hh, row) in new[i * h..(i + 1) * h].chunks(home.cols).enumerate() {
                            packed.write_rows(hh * capacity + step.past, row)?;
                        }
                    }
                }
                let kv = seqs
                    .iter()
                    .map(|seq| {
                        let [k, v] = [&seq.k, &seq.v].map(|home_t| {
                            let bytes = cached_rows(home_t, home_bytes).ok_or_else(not_host)?;
                            Ok::<_, OffloadError>(PackedRef::new(home.rows, home.cols, cc, bytes)?)
                        });
                        Ok((k?, v?))
                    })
                    .collect::<Result<Vec<_>, OffloadError>>()?;
                let shape = AttentionShape {
                    batch: 1,
                    heads,
                    head_dim: home.cols,
                    seq_len: len,
                    token_stride: 1,
                    bh_stride: capacity,
                };
                let scale = 1.0 / (home.cols as f32).sqrt();
                let outs = kv
                    .par_iter()
                    .enumerate()
                    .map(|(i, (k, v))| {
                        let q = &q[i * h..(i + 1) * h];
                        decode_attention(q, k, v, &shape, Some((masks[i], capacity)), scale)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                outs.concat()
            }
            _ => {
                let home_row = h * dtype.bytes();
                // The new rows go straight into the host-memory homes, as the cache stores them, so the CPU
                // attends over what the GPU path would.
                for (i, seq) in seqs.iter_mut().enumerate() {
                    for (home, new) in [(&mut seq.k, &new_kv[0]), (&mut seq.v, &new_kv[1])] {
                        let bytes = match home.settle(tiers)? {
                            TensorHome::Cpu(t) => t.host_bytes_mut().ok_or_else(not_host)?,
                            _ => return Err(not_host()),
                        };
                        let dst = bytes
                            .get_mut(step.past * home_row..len * home_row)
                            .ok_or_else(not_host)?;
                        encode_cache_row(&new[i * h..(i + 1) * h], dtype, dst);
                    }
                }
                let seq_rows = seqs
                    .iter()
                    .map(|seq| {
                        Ok(SeqRows {
                            keys: cached_rows(&seq.k, len * home_row).ok_or_else(not_host)?,
                            values: cached_rows(&seq.v, len * home_row).ok_or_else(not_host)?,
                        })
                    })
                    .collect::<Result<Vec<_>, OffloadError>>()?;
                cpu_attention(
                    &q,
                    &seq_rows,
                    dtype,
                    &masks,
                    c.n_head,
                    len,
                    step.attn_sparsity,
                )
            }
        };
        // The output goes up as activations.
        tiers.upload(&sc.attn, 0, &encode_act(&out, act))?;

        finish_layer(
            &mut self.rec,
            c,
            layer,
            x,
            &sc.attn,
            rows,
            &sc.norm,
            &sc.mid,
        );
        Ok(())
    }
}
