//! The block schedule: the one place that decides in which order one token step's compute and transfers run.
//!
//! ```text
//! for each token step (prefill, then one per generated token)      -- generate.rs
//!   embed every GPU batch (store offloaded activations)
//!   for layer j in 0..layers
//!     (k == 0) fetch layer j's offloaded weights into a weight slot  -- overlap: layer j+1's, into the other slot,
//!                                                                       queued before layer j's compute, with the
//!                                                                       disk reads of layer j+2 started on threads
//!     for GPU batch k in 0..num_gpu_batches
//!       fetch (j, k)'s offloaded KV rows [0, past) and hidden rows into the cache / activation slots
//!       decoder_layer(j, k)                                         -- weights loaded once, reused for every k
//!       store (j, k)'s new KV rows [past, past + s_new) and hidden rows back to their tiers
//!   logits of every GPU batch (fetching offloaded hidden rows), token choice
//! ```
//!
//! wgpu has one queue, so "overlap" means ordering: a transfer is recorded into a submit that precedes the compute
//! needing it, and CPU-side work (disk reads on the tier's I/O threads, staging) runs while the GPU works. Stores
//! whose completion needs the CPU (read-back into host memory or disk) are completed lazily, right before the next
//! fetch is recorded, so they never hold the GPU up more than the data dependency requires. With `overlap` false the
//! same steps run in order with one weight slot.

use std::collections::HashMap;

use crate::generate::Sampling;
use crate::gpu::kernels::{Kernels, Recorder};
use crate::model::{decoder_layer, BatchState, GpuModel, KvCache, LayerWeights, Step, Workspace};
use crate::offload::{BatchAct, BatchCache, LayerStore, OffloadError, PartHome, RunHomes};
use crate::tiers::{PendingStore, Ticket, Tiers};

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
    /// Fetch ahead into double-buffered weight slots.
    pub overlap: bool,
}

/// Which home a pending store writes.
enum Target {
    CacheK(usize, usize, usize),
    CacheV(usize, usize, usize),
    Act(usize, usize),
}

/// Transfers in flight during one step.
struct Io<'a> {
    tiers: Option<&'a Tiers>,
    pending: Vec<(Target, PendingStore)>,
    tickets: HashMap<(usize, usize), Ticket<Vec<u8>>>,
}

fn no_tiers() -> OffloadError {
    OffloadError::Model(crate::model::ModelError::Unsupported(
        "an offloaded tensor without memory tiers".into(),
    ))
}

impl<'a> Io<'a> {
    fn tiers(&self) -> Result<&'a Tiers, OffloadError> {
        self.tiers.ok_or_else(no_tiers)
    }

    /// Completes every store recorded so far (their homes are read by the next fetch).
    fn complete(&mut self, homes: &mut RunHomes) -> Result<(), OffloadError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let tiers = self.tiers()?;
        for (target, pending) in self.pending.drain(..) {
            let home = match target {
                Target::CacheK(j, k, i) | Target::CacheV(j, k, i) => {
                    match &mut homes.caches[j][k] {
                        BatchCache::Homes(seqs) => {
                            if matches!(target, Target::CacheK(..)) {
                                &mut seqs[i].k
                            } else {
                                &mut seqs[i].v
                            }
                        }
                        BatchCache::Resident(_) => continue,
                    }
                }
                Target::Act(k, i) => match &mut homes.acts[k] {
                    BatchAct::Homes(h) => &mut h[i],
                    BatchAct::Resident => continue,
                },
            };
            pending.complete(tiers, home)?;
        }
        Ok(())
    }

    /// Starts the disk reads of layer `j`'s disk-resident buffers.
    fn prefetch_layer(&mut self, layers: &LayerStore, j: usize) -> Result<(), OffloadError> {
        let Some(parts) = layers.parts.get(j) else {
            return Ok(());
        };
        for (index, part) in parts.iter().enumerate() {
            if let PartHome::Off(home) = part {
                if let Some(ticket) = self.tiers()?.prefetch(home, Vec::new())? {
                    self.tickets.insert((j, index), ticket);
                }
            }
        }
        Ok(())
    }

    /// Records layer `j`'s offloaded buffers into weight slot `slot`.
    fn fetch_layer(
        &mut self,
        layers: &LayerStore,
        j: usize,
        slot: usize,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<(), OffloadError> {
        for (index, part) in layers.parts[j].iter().enumerate() {
            if let PartHome::Off(home) = part {
                let dst = layers.slot_buffer(slot, index).ok_or_else(no_tiers)?;
                match self.tickets.remove(&(j, index)) {
                    Some(ticket) => self.tiers()?.fetch_host(&ticket.wait()?, &dst, 0, enc)?,
                    None => self.tiers()?.fetch(home, &dst, 0, enc)?,
                }
            }
        }
        Ok(())
    }
}

fn encoder(device: &wgpu::Device) -> wgpu::CommandEncoder {
    device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("strata offload transfers"),
    })
}

fn submit(tiers: &Tiers, enc: wgpu::CommandEncoder) {
    tiers.prepare_submit(&enc);
    tiers.queue().submit([enc.finish()]);
}

/// Submits what `rec` holds (queue order puts it before whatever is submitted next) and starts a new recorder.
fn flush<'r>(rec: Recorder<'r>, kernels: &'r Kernels) -> Recorder<'r> {
    if !rec.is_empty() {
        rec.submit();
    }
    kernels.recorder()
}

const F32: usize = 4;

/// Records "copy GPU batch `k`'s offloaded hidden rows into the activation slot".
fn fetch_act(
    homes: &RunHomes,
    tiers: &Tiers,
    k: usize,
    row_bytes: u64,
    enc: &mut wgpu::CommandEncoder,
) -> Result<(), OffloadError> {
    if let (BatchAct::Homes(h), Some(slot)) = (&homes.acts[k], &homes.act_slot) {
        for (i, home) in h.iter().enumerate() {
            tiers.fetch_range(home, 0, row_bytes, slot, i as u64 * row_bytes, enc)?;
        }
    }
    Ok(())
}

/// Records "write the activation slot's rows of GPU batch `k` back to their homes".
fn store_act(
    homes: &mut RunHomes,
    io: &mut Io,
    k: usize,
    row_bytes: u64,
    enc: &mut wgpu::CommandEncoder,
) -> Result<(), OffloadError> {
    let tiers = io.tiers()?;
    if let (BatchAct::Homes(h), Some(slot)) = (&mut homes.acts[k], &homes.act_slot) {
        for (i, home) in h.iter_mut().enumerate() {
            let p = tiers.store_range(slot, i as u64 * row_bytes, home, 0, row_bytes, enc)?;
            io.pending.push((Target::Act(k, i), p));
        }
    }
    Ok(())
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
    let h = c.hidden_size;
    let n_layers = c.num_hidden_layers;
    let nb = inp.states.len();
    let slot_of = |j: usize| if inp.overlap { j % 2 } else { 0 };
    // Views own clones of the buffers, so the recorder can borrow them for the whole step while homes change.
    let layer_views: Vec<LayerWeights> = (0..n_layers)
        .map(|j| inp.layers.view(j, slot_of(j)))
        .collect();
    let state_views: Vec<BatchState> = (0..nb)
        .map(|k| homes.state_view(k, &inp.states[k]))
        .collect();
    let cache_views: Vec<Vec<KvCache>> = (0..n_layers)
        .map(|j| {
            (0..nb)
                .map(|k| homes.cache_view(j, k, inp.states[k].batch))
                .collect()
        })
        .collect();
    let act_off: Vec<bool> = homes
        .acts
        .iter()
        .map(|a| matches!(a, BatchAct::Homes(_)))
        .collect();
    let row_bytes = (step.s_new * h * F32) as u64;
    let mut io = Io {
        tiers: inp.tiers,
        pending: Vec::new(),
        tickets: HashMap::new(),
    };
    let kernels = inp.kernels;
    let mut rec = kernels.recorder();

    // With overlap, layer 0's weights are queued first and layer 1's disk reads start now.
    if inp.overlap && inp.layers.is_offloaded(0) {
        let tiers = io.tiers()?;
        let mut enc = encoder(tiers.device());
        io.fetch_layer(inp.layers, 0, slot_of(0), &mut enc)?;
        submit(tiers, enc);
        io.prefetch_layer(inp.layers, 1)?;
    }

    for k in 0..nb {
        inp.model.embed(&mut rec, &state_views[k], inp.ws, step);
        if act_off[k] {
            rec = flush(rec, kernels);
            let tiers = io.tiers()?;
            let mut enc = encoder(tiers.device());
            store_act(homes, &mut io, k, row_bytes, &mut enc)?;
            submit(tiers, enc);
        }
    }

    for j in 0..n_layers {
        // The layer whose weights are fetched at this layer's first GPU batch.
        let fetch_layer = if inp.overlap { j + 1 } else { j };
        let fetch_weights = fetch_layer < n_layers && inp.layers.is_offloaded(fetch_layer);
        for k in 0..nb {
            let cache_off = matches!(homes.caches[j][k], BatchCache::Homes(_));
            let weights_now = k == 0 && fetch_weights;
            if weights_now || cache_off || act_off[k] {
                // Transfers go in their own submit, after the compute queued so far and before (j, k)'s.
                rec = flush(rec, kernels);
                io.complete(homes)?;
                let tiers = io.tiers()?;
                let mut enc = encoder(tiers.device());
                if weights_now {
                    io.fetch_layer(inp.layers, fetch_layer, slot_of(fetch_layer), &mut enc)?;
                }
                if let (BatchCache::Homes(seqs), Some(slot)) =
                    (&homes.caches[j][k], &homes.cache_slot)
                {
                    let seq_bytes = (slot.capacity * h * F32) as u64;
                    let past_bytes = (step.past * h * F32) as u64;
                    if past_bytes > 0 {
                        for (i, seq) in seqs.iter().enumerate() {
                            let at = i as u64 * seq_bytes;
                            tiers.fetch_range(&seq.k, 0, past_bytes, &slot.k, at, &mut enc)?;
                            tiers.fetch_range(&seq.v, 0, past_bytes, &slot.v, at, &mut enc)?;
                        }
                    }
                }
                if act_off[k] {
                    fetch_act(homes, tiers, k, row_bytes, &mut enc)?;
                }
                submit(tiers, enc);
                if weights_now && inp.overlap {
                    // The disk works on the layer after next while the GPU computes this one.
                    io.prefetch_layer(inp.layers, fetch_layer + 1)?;
                }
            }
            decoder_layer(
                &mut rec,
                c,
                &layer_views[j],
                &cache_views[j][k],
                &state_views[k],
                inp.ws,
                step,
            );
            if cache_off || act_off[k] {
                rec = flush(rec, kernels);
                let tiers = io.tiers()?;
                let mut enc = encoder(tiers.device());
                if let (BatchCache::Homes(seqs), Some(slot)) =
                    (&mut homes.caches[j][k], &homes.cache_slot)
                {
                    let seq_bytes = (slot.capacity * h * F32) as u64;
                    let past_bytes = (step.past * h * F32) as u64;
                    let new_bytes = (step.s_new * h * F32) as u64;
                    for (i, seq) in seqs.iter_mut().enumerate() {
                        let at = i as u64 * seq_bytes + past_bytes;
                        let pk = tiers.store_range(
                            &slot.k, at, &mut seq.k, past_bytes, new_bytes, &mut enc,
                        )?;
                        io.pending.push((Target::CacheK(j, k, i), pk));
                        let pv = tiers.store_range(
                            &slot.v, at, &mut seq.v, past_bytes, new_bytes, &mut enc,
                        )?;
                        io.pending.push((Target::CacheV(j, k, i), pv));
                    }
                }
                if act_off[k] {
                    store_act(homes, &mut io, k, row_bytes, &mut enc)?;
                }
                submit(tiers, enc);
            }
        }
    }

    let mut row0 = 0;
    for k in 0..nb {
        if act_off[k] {
            rec = flush(rec, kernels);
            io.complete(homes)?;
            let tiers = io.tiers()?;
            let mut enc = encoder(tiers.device());
            fetch_act(homes, tiers, k, row_bytes, &mut enc)?;
            submit(tiers, enc);
        }
        inp.model
            .logits(&mut rec, &state_views[k], inp.ws, step, inp.logits, row0);
        row0 += state_views[k].batch;
    }
    match sampling {
        Sampling::Greedy => rec.argmax(inp.logits, row0, c.vocab_size, inp.next),
        Sampling::Sample {
            temperature,
            top_p,
            seed,
        } => rec.sample(
            inp.logits,
            row0,
            c.vocab_size,
            temperature,
            top_p,
            (seed ^ (seed >> 32)) as u32,
            t as u32,
            inp.next,
        ),
    }
    rec.submit();
    io.complete(homes)?;
    Ok(())
}
