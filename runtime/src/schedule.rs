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
//!
//! `cpu_cache_compute`: at decode, a GPU batch whose KV cache lives wholly in CPU memory runs attention on the CPU
//! instead ([`cpu_attention`], rayon over sequence x head): q, k, v are
//! projected on the GPU and read back, the new k, v rows appended to the CPU cache, the attention output uploaded,
//! and the rest of the layer runs on the GPU. Other batches (and every prefill) take the GPU path.

use std::collections::HashMap;

use crate::generate::Sampling;
use crate::gpu::kernels::{Act, OutRows};
use crate::gpu::kernels::{Kernels, Recorder};
use crate::model::{decoder_layer, BatchState, GpuModel, KvCache, LayerWeights, Step, Workspace};
use crate::offload::{BatchAct, BatchCache, LayerStore, OffloadError, PartHome, RunHomes};
use crate::tiers::{PendingStore, TensorHome, Ticket, Tiers};

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
    /// Decode attention on the CPU for GPU batches whose cache lives wholly in CPU memory.
    pub cpu_cache_compute: bool,
}

/// Scratch of the CPU-attention layer path (decode: one row per sequence).
struct CpuAttn {
    norm: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    attn: wgpu::Buffer,
    mid: wgpu::Buffer,
    /// Each GPU batch's attention mask, `[batch, capacity]`.
    masks: Vec<Vec<u32>>,
}

impl CpuAttn {
    fn new(inp: &StepInputs) -> Result<CpuAttn, OffloadError> {
        let gpu = inp.kernels.gpu();
        let c = &inp.model.config;
        let rows = inp.states.iter().map(|s| s.batch).max().unwrap_or(1);
        let f32s = |n: usize| (n * F32) as u64;
        let h = c.hidden_size;
        let regions: Vec<_> = inp
            .states
            .iter()
            .map(|s| (&s.mask, 0, f32s(s.batch * s.capacity)))
            .collect();
        let masks = gpu
            .read_back(&regions)?
            .iter()
            .map(|b| bytemuck::pod_collect_to_vec(b))
            .collect();
        Ok(CpuAttn {
            norm: gpu.storage_buffer("cpu attention: normed x", f32s(rows * h)),
            q: gpu.storage_buffer("cpu attention: q", f32s(rows * h)),
            k: gpu.storage_buffer("cpu attention: new k", f32s(rows * h)),
            v: gpu.storage_buffer("cpu attention: new v", f32s(rows * h)),
            attn: gpu.storage_buffer("cpu attention: output", f32s(rows * h)),
            mid: gpu.storage_buffer("cpu attention: fc1 output", f32s(rows * c.ffn_embed_dim)),
            masks,
        })
    }
}

fn norm_refs(n: &crate::model::Norm) -> Option<(&wgpu::Buffer, &wgpu::Buffer)> {
    n.affine.as_ref().map(|(g, b)| (g, b))
}

/// Decode attention of one GPU batch on the CPU: `q` `[b, hidden]`, every sequence's keys and values
/// `[len, hidden]` (the new token last), `masks[i][t]` whether position t of sequence i is a real token.
pub fn cpu_attention(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    masks: &[&[u32]],
    n_head: usize,
    len: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let h = if keys.is_empty() {
        0
    } else {
        q.len() / keys.len()
    };
    let d = h / n_head.max(1);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(d.max(1))
        .enumerate()
        .for_each(|(idx, o)| {
            let (i, head) = (idx / n_head, idx % n_head);
            let qh = &q[i * h + head * d..i * h + head * d + d];
            let visible: Vec<usize> = (0..len).filter(|&t| masks[i][t] != 0).collect();
            let scores: Vec<f32> = visible
                .iter()
                .map(|&t| {
                    let kr = &keys[i][t * h + head * d..t * h + head * d + d];
                    qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f32 = weights.iter().sum();
            for (&t, w) in visible.iter().zip(&weights) {
                let vr = &values[i][t * h + head * d..t * h + head * d + d];
                for (acc, v) in o.iter_mut().zip(vr) {
                    *acc += w / total * v;
                }
            }
        });
    out
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
    let cpu_batches: Vec<bool> = (0..nb)
        .map(|k| {
            inp.cpu_cache_compute
                && step.past > 0
                && step.s_new == 1
                && homes.caches.iter().all(|row| match &row[k] {
                    BatchCache::Homes(seqs) => seqs
                        .iter()
                        .all(|s| matches!((&s.k, &s.v), (TensorHome::Cpu(_), TensorHome::Cpu(_)))),
                    BatchCache::Resident(_) => false,
                })
        })
        .collect();
    let cpu_attn = if cpu_batches.iter().any(|&b| b) {
        Some(CpuAttn::new(inp)?)
    } else {
        None
    };
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
            let on_cpu = cpu_batches[k];
            let cache_off = matches!(homes.caches[j][k], BatchCache::Homes(_)) && !on_cpu;
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
            match (&cpu_attn, on_cpu) {
                (Some(sc), true) => {
                    rec = cpu_attention_layer(
                        inp,
                        homes,
                        sc,
                        rec,
                        &layer_views[j],
                        &state_views[k],
                        j,
                        k,
                        step,
                    )?;
                }
                _ => decoder_layer(
                    &mut rec,
                    c,
                    &layer_views[j],
                    &cache_views[j][k],
                    &state_views[k],
                    inp.ws,
                    step,
                ),
            }
            if cache_off || act_off[k] {
                rec = flush(rec, kernels);
                let tiers = io.tiers()?;
                let mut enc = encoder(tiers.device());
                // Only a batch that computed in the cache slot has new rows there: a CPU-attention batch appended
                // its rows to the homes itself (storing the slot would overwrite them with stale rows).
                if let (true, BatchCache::Homes(seqs), Some(slot)) =
                    (cache_off, &mut homes.caches[j][k], &homes.cache_slot)
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

/// One decoder layer of a decode step with attention on the CPU: q, k, v projected on the GPU and read back, the new
/// k, v rows appended to the CPU-resident cache, attention computed on the CPU (rayon), its output uploaded, and the
/// rest of the layer on the GPU. Mirrors [`decoder_layer`] around the attention.
#[allow(clippy::too_many_arguments)]
fn cpu_attention_layer<'r>(
    inp: &StepInputs<'r>,
    homes: &mut RunHomes,
    sc: &'r CpuAttn,
    mut rec: Recorder<'r>,
    layer: &'r LayerWeights,
    state: &'r BatchState,
    j: usize,
    k: usize,
    step: Step,
) -> Result<Recorder<'r>, OffloadError> {
    let c = &inp.model.config;
    let (h, rows, eps) = (c.hidden_size, state.batch, c.layer_norm_eps);
    let pre_ln = c.do_layer_norm_before;
    let dense = OutRows::dense(h, 0);
    let x = &state.x;
    let attn_in = if pre_ln {
        rec.layer_norm(
            x,
            rows,
            h,
            norm_refs(&layer.self_attn_layer_norm),
            eps,
            &sc.norm,
        );
        &sc.norm
    } else {
        x
    };
    for (l, out) in [
        (&layer.q_proj, &sc.q),
        (&layer.k_proj, &sc.k),
        (&layer.v_proj, &sc.v),
    ] {
        rec.linear(
            attn_in,
            rows,
            &l.weight,
            l.bias.as_ref(),
            Act::None,
            out,
            dense,
            false,
        );
    }
    let rec_done = flush(rec, inp.kernels);
    let bytes = (rows * h * F32) as u64;
    let gpu = inp.kernels.gpu();
    let back = gpu.read_back(&[(&sc.q, 0, bytes), (&sc.k, 0, bytes), (&sc.v, 0, bytes)])?;
    let tiers = inp.tiers.ok_or_else(no_tiers)?;
    let len = step.past + 1;
    let row = h * F32;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    if let BatchCache::Homes(seqs) = &mut homes.caches[j][k] {
        for (i, seq) in seqs.iter_mut().enumerate() {
            for (home, new, all) in [
                (&mut seq.k, &back[1], &mut keys),
                (&mut seq.v, &back[2], &mut values),
            ] {
                if let TensorHome::Cpu(t) = home {
                    let new_row = &new[i * row..(i + 1) * row];
                    // Read the cached rows first: on the DMA path a write lands only at the next submit.
                    let mut rows: Vec<f32> = tiers
                        .cpu()
                        .with_bytes(t, |b| bytemuck::pod_collect_to_vec(&b[..step.past * row]))?;
                    rows.extend_from_slice(bytemuck::cast_slice::<u8, f32>(new_row));
                    all.push(rows);
                    tiers.cpu().write(t, (step.past * row) as u64, new_row)?;
                }
            }
        }
    }
    let capacity = state.capacity;
    let masks: Vec<&[u32]> = (0..rows)
        .map(|i| &sc.masks[k][i * capacity..(i + 1) * capacity])
        .collect();
    let q: Vec<f32> = bytemuck::pod_collect_to_vec(&back[0]);
    let out = cpu_attention(&q, &keys, &values, &masks, c.n_head, len);
    tiers
        .queue()
        .write_buffer(&sc.attn, 0, bytemuck::cast_slice(&out));

    let mut rec = rec_done;
    let act = match c.activation {
        crate::config::Activation::Relu => Act::Relu,
        crate::config::Activation::Gelu => Act::Gelu,
    };
    let post = |rec: &mut Recorder<'r>, n: &'r crate::model::Norm| {
        rec.layer_norm(x, rows, h, norm_refs(n), eps, &sc.norm);
        rec.copy(&sc.norm, 0, x, 0, bytes);
    };
    let l = &layer.out_proj;
    rec.linear(
        &sc.attn,
        rows,
        &l.weight,
        l.bias.as_ref(),
        Act::None,
        x,
        dense,
        true,
    );
    if !pre_ln {
        post(&mut rec, &layer.self_attn_layer_norm);
    }
    let ffn_in = if pre_ln {
        rec.layer_norm(
            x,
            rows,
            h,
            norm_refs(&layer.final_layer_norm),
            eps,
            &sc.norm,
        );
        &sc.norm
    } else {
        x
    };
    let l = &layer.fc1;
    rec.linear(
        ffn_in,
        rows,
        &l.weight,
        l.bias.as_ref(),
        act,
        &sc.mid,
        OutRows::dense(c.ffn_embed_dim, 0),
        false,
    );
    let l = &layer.fc2;
    rec.linear(
        &sc.mid,
        rows,
        &l.weight,
        l.bias.as_ref(),
        Act::None,
        x,
        dense,
        true,
    );
    if !pre_ln {
        post(&mut rec, &layer.final_layer_norm);
    }
    Ok(rec)
}
