//! Where each piece of an offloaded run lives: every decoder layer's weight buffers, every GPU batch's KV cache
//! (by whole sequences) and every GPU batch's hidden state between layers (by whole sequences).
//!
//! This module only places bytes and hands out GPU *views* ([`LayerWeights`], [`KvCache`], [`BatchState`] whose
//! buffers are either resident or a reusable GPU slot); the order of the transfers that fill the slots is the block
//! schedule's business ([`crate::schedule`]).
//!
//! Placement rules, the planner's ([`crate::planner::plan`]):
//! - weights: within each placement group (a layer, or its attention and MLP halves with `sep_layer`) a tensor goes
//!   to disk when the midpoint of its cumulative byte range (stored bytes: packed under weight compression) falls in
//!   the first `w_disk`%, to the CPU in the next `w_cpu`%, else to the GPU;
//! - KV cache and activations: within each GPU batch the first `gpu`% of sequences stay on the GPU, the next `cpu`%
//!   on the CPU, the rest on disk.
//!
//! Every home holds its bytes in the GPU's format, so a transfer is a plain copy: [`LayerStore::load`] builds each
//! weight buffer on the host (f32, f16 pairs or packed words) and writes it straight into its tier; a packed KV
//! cache's homes hold packed words in the slot's pair-major order, and [`CacheRows`] says which byte ranges move
//! before and after each step (the schedule only copies them).

use std::collections::HashMap;

use crate::compress::{CompressionConfig, PackedLayout};
use crate::config::OptConfig;
use crate::gpu::kernels::CacheDtype;
use crate::gpu::tensor::{GpuMatrix, MatrixChunk, WeightFormat};
use crate::gpu::Gpu;
use crate::model::{
    BatchState, CacheScratch, KvCache, LayerWeights, Linear, ModelError, Norm, Step,
};
use crate::planner::stored_bytes;
use crate::policy::{Policy, TierSplit};
use crate::tiers::{GpuSlot, PendingStore, TensorHome, Ticket, Tier, TierError, Tiers};
use crate::weights::{layer_tensors, WeightSource};

/// Why offloaded state could not be placed.
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
    Gpu(#[from] crate::gpu::GpuError),
}

impl From<crate::weights::WeightError> for OffloadError {
    fn from(e: crate::weights::WeightError) -> Self {
        OffloadError::Model(e.into())
    }
}

/// Visits every buffer of a layer in a fixed order with its tensor name suffix (e.g. `self_attn.q_proj.weight`) and
/// builds a layer of the same shape from the buffers `f` returns.
pub fn map_layer_buffers(
    layer: &LayerWeights,
    mut f: impl FnMut(usize, &str, &wgpu::Buffer) -> wgpu::Buffer,
) -> LayerWeights {
    let mut index = 0;
    let mut next = |name: &str, b: &wgpu::Buffer| {
        let out = f(index, name, b);
        index += 1;
        out
    };
    let linear =
        |l: &Linear, name: &str, next: &mut dyn FnMut(&str, &wgpu::Buffer) -> wgpu::Buffer| {
            let weight_name = format!("{name}.weight");
            let chunks = l
                .weight
                .chunks
                .iter()
                .map(|c| MatrixChunk {
                    row0: c.row0,
                    rows: c.rows,
                    buffer: next(&weight_name, &c.buffer),
                })
                .collect();
            Linear {
                weight: GpuMatrix {
                    rows: l.weight.rows,
                    cols: l.weight.cols,
                    format: l.weight.format,
                    chunks,
                },
                bias: l.bias.as_ref().map(|b| next(&format!("{name}.bias"), b)),
            }
        };
    let norm =
        |n: &Norm, name: &str, next: &mut dyn FnMut(&str, &wgpu::Buffer) -> wgpu::Buffer| Norm {
            affine: n.affine.as_ref().map(|(g, b)| {
                (
                    next(&format!("{name}.weight"), g),
                    next(&format!("{name}.bias"), b),
                )
            }),
        };
    LayerWeights {
        q_proj: linear(&layer.q_proj, "self_attn.q_proj", &mut next),
        k_proj: linear(&layer.k_proj, "self_attn.k_proj", &mut next),
        v_proj: linear(&layer.v_proj, "self_attn.v_proj", &mut next),
        out_proj: linear(&layer.out_proj, "self_attn.out_proj", &mut next),
        self_attn_layer_norm: norm(
            &layer.self_attn_layer_norm,
            "self_attn_layer_norm",
            &mut next,
        ),
        fc1: linear(&layer.fc1, "fc1", &mut next),
        fc2: linear(&layer.fc2, "fc2", &mut next),
        final_layer_norm: norm(&layer.final_layer_norm, "final_layer_norm", &mut next),
    }
}

/// The tier of every tensor of decoder layer `i` (full names) under the policy's weight percents.
pub fn layer_weight_tiers(config: &OptConfig, policy: &Policy, i: usize) -> HashMap<String, Tier> {
    let w = policy.percent.weights;
    let tensors = layer_tensors(config, i);
    let groups: Vec<Vec<_>> = if policy.sep_layer {
        let (attn, mlp): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|t| t.name.contains(".self_attn"));
        vec![attn, mlp]
    } else {
        vec![tensors]
    };
    let mut out = HashMap::new();
    for group in groups {
        let compress = policy
            .compress_weight
            .then_some(policy.compress_weight_config);
        let sizes: Vec<u64> = group
            .iter()
            .map(|t| stored_bytes(config, t, compress))
            .collect();
        let total: u64 = sizes.iter().sum();
        let mut cum = 0u64;
        for (t, &size) in group.iter().zip(&sizes) {
            let mid = if total == 0 {
                0.0
            } else {
                (cum as f64 + size as f64 / 2.0) / total as f64 * 100.0
            };
            cum += size;
            let tier = if mid < w.disk() {
                Tier::Disk
            } else if mid < w.disk() + w.cpu {
                Tier::Cpu
            } else {
                Tier::Gpu
            };
            out.insert(t.name.clone(), tier);
        }
    }
    out
}

/// The tier of sequence `index` of a GPU batch of `gbs` sequences under `split` (whole sequences, GPU first).
pub fn sequence_tier(split: TierSplit, gbs: usize, index: usize) -> Tier {
    let g = ((gbs as f64 * split.gpu / 100.0).round() as usize).min(gbs);
    let gc = ((gbs as f64 * (split.gpu + split.cpu) / 100.0).round() as usize).clamp(g, gbs);
    if index < g {
        Tier::Gpu
    } else if index < gc {
        Tier::Cpu
    } else {
        Tier::Disk
    }
}

/// Where one buffer of a layer lives between uses.
#[derive(Debug)]
pub enum PartHome {
    /// On the GPU for the whole run: the view uses it directly.
    Resident(wgpu::Buffer),
    /// In a tier: fetched into a weight slot before the layer computes.
    Off(TensorHome),
}

/// Every decoder layer's weights, each buffer resident or offloaded, and the GPU slots offloaded buffers stream into.
#[derive(Debug)]
pub struct LayerStore {
    /// `parts[layer][buffer]`, in [`map_layer_buffers`] order.
    pub parts: Vec<Vec<PartHome>>,
    /// The shape every layer shares (its buffers are placeholders).
    template: Option<LayerWeights>,
    /// `slots[slot][buffer]`: a GPU buffer for every buffer that is offloaded in some layer, lent by the GPU tier's
    /// pool (exactly the buffer's padded size), so [`Tiers::report`] counts it.
    slots: Vec<Vec<Option<GpuSlot>>>,
}

impl LayerStore {
    /// Layers already on the GPU (the all-GPU path): every buffer resident.
    pub fn resident(layers: &[LayerWeights]) -> LayerStore {
        let mut parts = Vec::new();
        for layer in layers {
            let mut p = Vec::new();
            map_layer_buffers(layer, |_, _, b| {
                p.push(PartHome::Resident(b.clone()));
                b.clone()
            });
            parts.push(p);
        }
        LayerStore {
            parts,
            template: layers
                .first()
                .map(|l| map_layer_buffers(l, |_, _, b| b.clone())),
            slots: Vec::new(),
        }
    }

    /// Places every decoder layer of `source` straight into its tiers, tensor by tensor: each buffer's bytes are
    /// built on the host in the GPU's format (f32, f16 pairs, or packed words, quantised here when `format` is
    /// packed), uploaded when the policy keeps it on the GPU and otherwise written to its CPU or disk home, never
    /// passing through the GPU. Offloaded weights thus live and move in the GPU's format (packed under weight
    /// compression), and the host holds one row chunk of one tensor at a time. `slot_count` weight slots (2 with
    /// overlap) are taken from the GPU tier's pool for offloaded buffers, each exactly its buffer's padded size.
    /// `progress(i)` is called after layer `i`.
    pub fn load(
        gpu: &Gpu,
        tiers: &Tiers,
        source: &dyn WeightSource,
        format: WeightFormat,
        policy: &Policy,
        slot_count: usize,
        progress: &dyn Fn(usize),
    ) -> Result<LayerStore, OffloadError> {
        let config = *source.config();
        let mut slots: Vec<Vec<Option<GpuSlot>>> =
            (0..slot_count.max(1)).map(|_| Vec::new()).collect();
        let mut all_parts = Vec::new();
        let mut template = None;
        for i in 0..config.num_hidden_layers {
            let tiers_of = layer_weight_tiers(&config, policy, i);
            let mut parts = Vec::new();
            let layer = LayerWeights::build::<OffloadError>(
                gpu,
                source,
                i,
                format,
                &mut |index, tensor, label, bytes| {
                    match tiers_of.get(tensor).copied().unwrap_or(Tier::Gpu) {
                        Tier::Gpu => {
                            let buffer = gpu.storage_buffer_init(label, bytes)?;
                            parts.push(PartHome::Resident(buffer.clone()));
                            Ok(buffer)
                        }
                        tier => {
                            // Homes hold what the slot receives: the GPU buffer's bytes, padded to whole words.
                            let len = (bytes.len() as u64).max(4).next_multiple_of(4);
                            let home = if len == bytes.len() as u64 {
                                tiers.place(tier, label, bytes)?
                            } else {
                                let mut padded = bytes.to_vec();
                                padded.resize(len as usize, 0);
                                tiers.place(tier, label, &padded)?
                            };
                            parts.push(PartHome::Off(home));
                            for slot in &mut slots {
                                if slot.len() <= index {
                                    slot.resize_with(index + 1, || None);
                                }
                                if slot[index].as_ref().is_none_or(|b| b.buffer().size() < len) {
                                    // Exact: a kernel binds the slot whole, within the device's binding limit.
                                    slot[index] = Some(tiers.gpu().acquire_exact(len)?);
                                }
                            }
                            Ok(slots[0][index]
                                .as_ref()
                                .expect("allocated just above")
                                .buffer()
                                .clone())
                        }
                    }
                },
            )?;
            // The first layer gives every layer's shape; its offloaded buffers are slot buffers, so it holds no
            // offloaded layer alive.
            template.get_or_insert(layer);
            all_parts.push(parts);
            progress(i);
        }
        Ok(LayerStore {
            parts: all_parts,
            template,
            slots,
        })
    }

    /// Whether any buffer of layer `j` lives off the GPU.
    pub fn is_offloaded(&self, j: usize) -> bool {
        self.parts[j].iter().any(|p| matches!(p, PartHome::Off(_)))
    }

    /// The weights of layer `j` as the kernels see them: resident buffers, and weight slot `slot` for the rest.
    pub fn view(&self, j: usize, slot: usize) -> LayerWeights {
        let template = self
            .template
            .as_ref()
            .expect("a model has at least one layer");
        map_layer_buffers(template, |index, _, b| match &self.parts[j][index] {
            PartHome::Resident(buf) => buf.clone(),
            PartHome::Off(_) => self.slot_buffer(slot, index).unwrap_or_else(|| b.clone()),
        })
    }

    /// GPU buffer `index` of weight slot `slot`.
    pub fn slot_buffer(&self, slot: usize, index: usize) -> Option<wgpu::Buffer> {
        let slots = self.slots.get(slot % self.slots.len().max(1))?;
        slots
            .get(index)
            .and_then(Option::as_ref)
            .map(|s| s.buffer().clone())
    }

    /// Bytes of the weight slots (they come from the GPU tier's pool, which counts them too).
    pub fn slot_bytes(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .flatten()
            .map(|s| s.buffer().size())
            .sum()
    }

    /// Bytes of the decoder-layer buffers resident on the GPU (outside the pool).
    pub fn resident_bytes(&self) -> u64 {
        self.parts
            .iter()
            .flatten()
            .map(|p| match p {
                PartHome::Resident(b) => b.size(),
                PartHome::Off(_) => 0,
            })
            .sum()
    }

    /// Weight slots allocated.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }
}

/// One copy between a sequence's cache home and the cache slot: `len` bytes at `home` in the home and at `slot` in
/// the slot's K (or V) buffer. K and V use the same ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheRange {
    /// Byte offset in the sequence's home.
    pub home: u64,
    /// Byte offset in the slot buffer.
    pub slot: u64,
    /// Bytes.
    pub len: u64,
}

/// How the rows of an offloaded KV cache lie in a sequence's home and in the GPU cache slot, and so which byte
/// ranges move before and after a step. A home holds exactly the bytes of its sequence's part of the slot, in the
/// slot's order, so a fetch or store is a set of plain copies with no repacking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheRows {
    /// Uncompressed: the slot is `[batch, capacity, hidden]`, a home `[capacity, hidden]` of `dtype` values; a
    /// token's row is contiguous.
    Dense {
        /// Values per token row (hidden size).
        hidden: usize,
        /// Token rows per sequence.
        capacity: usize,
        /// How values are stored.
        dtype: CacheDtype,
    },
    /// Packed pair-major (see [`KvCache`]): the slot is `batch * heads * capacity` packed rows of head_dim (row
    /// `(i * heads + h) * capacity + t`, data section then scale section), a home the `heads * capacity` rows of
    /// its sequence in the same order (row `h * capacity + t`) as a packed tensor of its own.
    ///
    /// Why pair-major homes and per-head ranges rather than token-major homes: the packed kernels need the slot
    /// pair-major, and a fetch moves every cached row at each step (per head one contiguous run of `past` rows
    /// here, while a token-major home would need a GPU repack of `past * heads` scattered rows), whereas a store
    /// moves only the step's new rows (per head one run of `s_new` rows, tiny at decode). So a step costs
    /// `2 * heads` copies per sequence each way, K and V alike, each a straight copy of packed words.
    Packed {
        /// Attention heads.
        heads: usize,
        /// Token rows per sequence and head.
        capacity: usize,
        /// The whole slot's layout (`slot batch * heads * capacity` rows).
        slot: PackedLayout,
        /// One home's layout (`heads * capacity` rows).
        home: PackedLayout,
    },
}

impl CacheRows {
    /// The layout of a cache slot for `gbs` sequences of `capacity` tokens, packed under `compression` or stored
    /// as `dtype`.
    pub fn new(
        config: &OptConfig,
        gbs: usize,
        capacity: usize,
        dtype: CacheDtype,
        compression: Option<CompressionConfig>,
    ) -> CacheRows {
        match compression {
            None => CacheRows::Dense {
                hidden: config.hidden_size,
                capacity,
                dtype,
            },
            Some(cc) => {
                let heads = config.n_head;
                let hd = config.head_dim();
                CacheRows::Packed {
                    heads,
                    capacity,
                    slot: PackedLayout::new(gbs * heads * capacity, hd, cc),
                    home: PackedLayout::new(heads * capacity, hd, cc),
                }
            }
        }
    }

    /// Bytes of a cache slot's K (or V) buffer for `gbs` sequences.
    pub fn slot_bytes(&self, gbs: usize) -> u64 {
        match *self {
            CacheRows::Dense { .. } => self.home_bytes() * gbs as u64,
            CacheRows::Packed { slot, .. } => slot.bytes(),
        }
    }

    /// Whether the rows are packed.
    pub fn is_packed(&self) -> bool {
        matches!(self, CacheRows::Packed { .. })
    }

    /// Bytes of one sequence's home (K or V).
    pub fn home_bytes(&self) -> u64 {
        match *self {
            CacheRows::Dense {
                hidden,
                capacity,
                dtype,
            } => ((capacity * hidden * dtype.bytes()) as u64).next_multiple_of(4),
            CacheRows::Packed { home, .. } => home.bytes(),
        }
    }

    /// What to copy from sequence `i`'s home into the slot before a step: the rows of the `step.past` cached
    /// tokens (nothing at prefill).
    pub fn fetch_ranges(&self, i: usize, step: Step) -> Vec<CacheRange> {
        self.token_ranges(i, 0..step.past)
    }

    /// What to copy from the slot back to sequence `i`'s home after a step: the rows of its `step.s_new` new
    /// tokens.
    pub fn store_ranges(&self, i: usize, step: Step) -> Vec<CacheRange> {
        self.token_ranges(i, step.past..step.past + step.s_new)
    }

    /// The byte ranges of tokens `tokens` of sequence `i`, adjacent ranges merged.
    fn token_ranges(&self, i: usize, tokens: std::ops::Range<usize>) -> Vec<CacheRange> {
        let n = tokens.len();
        if n == 0 {
            return Vec::new();
        }
        let mut out: Vec<CacheRange> = Vec::new();
        let mut push = |r: CacheRange| match out.last_mut() {
            Some(last) if last.home + last.len == r.home && last.slot + last.len == r.slot => {
                last.len += r.len
            }
            _ => out.push(r),
        };
        match *self {
            CacheRows::Dense {
                hidden,
                capacity,
                dtype,
            } => {
                // Whole u32 words: f16 rows have an even hidden size (`GpuModel::cache_dtype`).
                let row = (hidden * dtype.bytes()) as u64;
                push(CacheRange {
                    home: tokens.start as u64 * row,
                    slot: (i * capacity + tokens.start) as u64 * row,
                    len: n as u64 * row,
                });
            }
            CacheRows::Packed {
                heads,
                capacity,
                slot,
                home,
            } => {
                let (wpr, gpr) = (home.words_per_row as u64, home.groups_per_row as u64);
                // Data words first, then scale words: two runs per head.
                for (per_row, home_base, slot_base) in [
                    (wpr, 0, 0),
                    (gpr, home.scale_offset as u64, slot.scale_offset as u64),
                ] {
                    for h in 0..heads {
                        let home_row = (h * capacity + tokens.start) as u64;
                        let slot_row = ((i * heads + h) * capacity + tokens.start) as u64;
                        push(CacheRange {
                            home: 4 * (home_base + home_row * per_row),
                            slot: 4 * (slot_base + slot_row * per_row),
                            len: 4 * n as u64 * per_row,
                        });
                    }
                }
            }
        }
        out
    }
}

/// An offloaded tensor and the write-back into it that may still be in flight.
///
/// A store from the GPU into host memory or a file finishes on the CPU once its submission has run. The block
/// schedule hands each such store to its home ([`Home::stored`]), moves it on once the GPU is past it
/// ([`Home::start_write`]: the bytes into host memory, or a write on the disk tier's I/O threads) and waits for it only
/// right before the home is read again ([`Home::settle`]). Stores that are one GPU copy (GPU homes, DMA-path CPU
/// homes) have nothing left to do and leave the home idle.
#[derive(Debug)]
pub struct Home {
    tensor: TensorHome,
    inflight: Inflight,
}

#[derive(Debug, Default)]
enum Inflight {
    /// Every write has landed.
    #[default]
    Idle,
    /// Submitted; the bytes still have to come back through its readback buffer.
    Store(PendingStore),
    /// On its way into the file.
    Write(Ticket<Vec<u8>>),
}

impl Home {
    /// A home with nothing in flight.
    pub fn new(tensor: TensorHome) -> Home {
        Home {
            tensor,
            inflight: Inflight::Idle,
        }
    }

    /// The tier it lives in.
    pub fn tier(&self) -> Tier {
        self.tensor.tier()
    }

    /// The tensor as a store's destination ([`Tiers::store_range`]): recording a store reads nothing, so nothing in
    /// flight needs to finish first; hand the store to [`Home::stored`] once its encoder is submitted.
    pub fn for_store(&mut self) -> &mut TensorHome {
        &mut self.tensor
    }

    /// Takes charge of `pending`, a store into this home whose encoder has been submitted. A write-back still in
    /// flight lands first, so writes land in the order they were recorded.
    pub fn stored(&mut self, tiers: &Tiers, pending: PendingStore) -> Result<(), TierError> {
        self.settle(tiers)?;
        if !matches!(pending, PendingStore::Done) {
            self.inflight = Inflight::Store(pending);
        }
        Ok(())
    }

    /// Moves a submitted store on: copies its bytes into host memory, or starts its write on the disk tier's
    /// threads. Waits for the GPU to reach the store's copy, so call it once the GPU is (about) past it.
    pub fn start_write(&mut self, tiers: &Tiers) -> Result<(), TierError> {
        if !matches!(self.inflight, Inflight::Store(_)) {
            // Idle, or a write already running (whose ticket must stay for `settle`).
            return Ok(());
        }
        if let Inflight::Store(pending) = std::mem::take(&mut self.inflight) {
            if let Some(ticket) = pending.complete_in_background(tiers, &mut self.tensor)? {
                self.inflight = Inflight::Write(ticket);
            }
        }
        Ok(())
    }

    /// Waits until every write into this home has landed and returns the tensor, ready to be read.
    pub fn settle(&mut self, tiers: &Tiers) -> Result<&mut TensorHome, TierError> {
        self.start_write(tiers)?;
        if let Inflight::Write(ticket) = std::mem::take(&mut self.inflight) {
            ticket.wait()?;
        }
        Ok(&mut self.tensor)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // A write still running holds the file open: let it finish, so the file is gone once the home is.
        if let Inflight::Write(ticket) = std::mem::take(&mut self.inflight) {
            let _ = ticket.wait();
        }
    }
}

/// One sequence's K and V rows of one layer in a tier, laid out as [`CacheRows`] says.
#[derive(Debug)]
pub struct SeqCache {
    /// Keys.
    pub k: Home,
    /// Values.
    pub v: Home,
}

/// One layer's cache for one GPU batch: resident when every sequence of the batch stays on the GPU, else one home
/// per sequence (streamed through a cache slot).
#[derive(Debug)]
pub enum BatchCache {
    /// The whole batch's cache on the GPU.
    Resident(Box<KvCache>),
    /// One home per sequence.
    Homes(Vec<SeqCache>),
}

/// One GPU batch's hidden state: in its [`BatchState`] on the GPU, or one home per sequence (streamed through the
/// shared activation slot).
#[derive(Debug)]
pub enum BatchAct {
    /// In the batch state's own buffer.
    Resident,
    /// `[s_max, hidden]` f32 rows per sequence.
    Homes(Vec<Home>),
}

/// One GPU cache slot: K and V for `gbs` sequences of `capacity` tokens (as [`CacheRows`] lays them out), lent by
/// the GPU tier's pool.
#[derive(Debug)]
struct CacheSlot {
    k: GpuSlot,
    v: GpuSlot,
    capacity: usize,
    gbs: usize,
    dtype: CacheDtype,
    /// A packed slot's format and the f32 scratch it computes through.
    compression: Option<(CompressionConfig, CacheScratch)>,
}

/// Caches and activations of one run, with the GPU slots off-GPU ones compute in.
///
/// Every slot buffer (cache slots, the activation slot, CPU attention's scratch) comes from the GPU tier's pool
/// ([`Tiers::gpu`]), so [`Tiers::report`] counts it; they go back to the pool when the run ends.
#[derive(Debug)]
pub struct RunHomes {
    /// `caches[layer][gpu batch]`.
    pub caches: Vec<Vec<BatchCache>>,
    /// Per GPU batch.
    pub acts: Vec<BatchAct>,
    /// Cache slots: two with overlap (the schedule fills one while the other computes), else one; none when every
    /// cache is resident.
    cache_slots: Vec<CacheSlot>,
    /// Where each sequence's rows lie in its home and in a cache slot.
    pub cache_rows: CacheRows,
    /// The activation slot off-GPU batches compute in (`gbs * s_max` rows).
    act_slot: Option<GpuSlot>,
    /// CPU attention's GPU scratch (with `cpu_cache_compute` and a cache wholly in CPU memory somewhere).
    pub(crate) cpu_attn: Option<crate::schedule::CpuAttn>,
}

impl RunHomes {
    /// Places caches and activations for GPU batches of `sizes` sequences (at most `gbs` each), `capacity` cached
    /// tokens and steps of at most `s_max` tokens per sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        tiers: Option<&Tiers>,
        config: &OptConfig,
        policy: &Policy,
        sizes: &[usize],
        gbs: usize,
        s_max: usize,
        capacity: usize,
        cache_dtype: CacheDtype,
        cache_compression: Option<(CompressionConfig, &CacheScratch)>,
    ) -> Result<RunHomes, OffloadError> {
        let h = config.hidden_size;
        let cache_tier = |i| sequence_tier(policy.percent.cache, gbs, i);
        let act_tier = |i| sequence_tier(policy.percent.act, gbs, i);
        let all_gpu = |b: usize, tier: &dyn Fn(usize) -> Tier| (0..b).all(|i| tier(i) == Tier::Gpu);
        let need_tiers = || {
            tiers.ok_or_else(|| {
                OffloadError::Model(ModelError::Unsupported(
                    "offloading needs the memory tiers".into(),
                ))
            })
        };
        let cache_rows = CacheRows::new(
            config,
            gbs,
            capacity,
            cache_dtype,
            cache_compression.map(|(c, _)| c),
        );
        // Zero words decode to 0 in the packed format too.
        let seq_bytes = vec![0u8; cache_rows.home_bytes() as usize];
        let mut caches = Vec::new();
        for j in 0..config.num_hidden_layers {
            let mut row = Vec::new();
            for (k, &b) in sizes.iter().enumerate() {
                if all_gpu(b, &cache_tier) {
                    row.push(BatchCache::Resident(Box::new(KvCache::with_compression(
                        gpu,
                        config,
                        b,
                        capacity,
                        cache_dtype,
                        cache_compression,
                    )?)));
                } else {
                    let t = need_tiers()?;
                    let mut seqs = Vec::new();
                    for i in 0..b {
                        let tier = cache_tier(i);
                        let place = |kv: &str| {
                            t.place(tier, &format!("cache.{j}.{k}.{i}.{kv}"), &seq_bytes)
                                .map(Home::new)
                        };
                        seqs.push(SeqCache {
                            k: place("k")?,
                            v: place("v")?,
                        });
                    }
                    row.push(BatchCache::Homes(seqs));
                }
            }
            caches.push(row);
        }
        let any_cache_off = caches
            .iter()
            .flatten()
            .any(|c| matches!(c, BatchCache::Homes(_)));
        let mut cache_slots = Vec::new();
        if any_cache_off {
            let pool = need_tiers()?.gpu();
            let bytes = cache_rows.slot_bytes(gbs);
            gpu.check_binding(
                "one layer's KV cache slot",
                bytes,
                "use a smaller GPU batch or shorter sequences",
            )?;
            for _ in 0..if policy.overlap { 2 } else { 1 } {
                cache_slots.push(CacheSlot {
                    k: pool.acquire_exact(bytes)?,
                    v: pool.acquire_exact(bytes)?,
                    capacity,
                    gbs,
                    dtype: cache_dtype,
                    compression: cache_compression.map(|(cc, scratch)| (cc, scratch.clone())),
                });
            }
        }
        let act_bytes = vec![0u8; s_max * h * 4];
        let mut acts = Vec::new();
        let mut act_slot = None;
        for (k, &b) in sizes.iter().enumerate() {
            if all_gpu(b, &act_tier) {
                acts.push(BatchAct::Resident);
            } else {
                let t = need_tiers()?;
                let homes = (0..b)
                    .map(|i| {
                        t.place(act_tier(i), &format!("act.{k}.{i}"), &act_bytes)
                            .map(Home::new)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if act_slot.is_none() {
                    act_slot = Some(t.gpu().acquire_exact((gbs * s_max * h * 4) as u64)?);
                }
                acts.push(BatchAct::Homes(homes));
            }
        }
        let cpu_attn_batches = (0..sizes.len()).any(|k| {
            caches.iter().all(|row| match &row[k] {
                BatchCache::Homes(seqs) => seqs
                    .iter()
                    .all(|s| s.k.tier() == Tier::Cpu && s.v.tier() == Tier::Cpu),
                BatchCache::Resident(_) => false,
            })
        });
        // The CPU attention reads dense homes; a packed cache attends on the GPU.
        let cpu_attn_batches = cpu_attn_batches && !cache_rows.is_packed();
        let cpu_attn = match (policy.cpu_cache_compute && cpu_attn_batches, tiers) {
            (true, Some(t)) => Some(crate::schedule::CpuAttn::new(t.gpu(), config, gbs)?),
            _ => None,
        };
        Ok(RunHomes {
            caches,
            acts,
            cache_slots,
            cache_rows,
            act_slot,
            cpu_attn,
        })
    }

    /// Cache slots allocated (two with overlap when some cache is off the GPU).
    pub fn cache_slot_count(&self) -> usize {
        self.cache_slots.len()
    }

    /// Cache slot `slot` (modulo the number of slots) for a GPU batch of `batch` sequences, as the kernels see it.
    pub fn cache_slot(&self, slot: usize, batch: usize) -> Option<KvCache> {
        let s = self.cache_slots.get(slot % self.cache_slots.len().max(1))?;
        Some(KvCache {
            k: s.k.buffer().clone(),
            v: s.v.buffer().clone(),
            // A packed slot's layout (where its scale section starts) is that of all its sequences.
            batch: if s.compression.is_some() {
                s.gbs
            } else {
                batch
            },
            capacity: s.capacity,
            dtype: s.dtype,
            compression: s.compression.as_ref().map(|(cc, _)| *cc),
            scratch: s.compression.as_ref().map(|(_, scratch)| scratch.clone()),
        })
    }

    /// The activation slot, when some GPU batch's activations are offloaded.
    pub fn act_slot(&self) -> Option<&wgpu::Buffer> {
        self.act_slot.as_ref().map(GpuSlot::buffer)
    }

    /// The cache of layer `j`, GPU batch `k` (of `batch` sequences) as the kernels see it: its own buffers, or cache
    /// slot `slot` when it is offloaded.
    pub fn cache_view(&self, j: usize, k: usize, batch: usize, slot: usize) -> KvCache {
        match &self.caches[j][k] {
            BatchCache::Resident(c) => KvCache {
                k: c.k.clone(),
                v: c.v.clone(),
                batch: c.batch,
                capacity: c.capacity,
                dtype: c.dtype,
                compression: c.compression,
                scratch: c.scratch.clone(),
            },
            BatchCache::Homes(_) => self
                .cache_slot(slot, batch)
                .expect("a cache slot exists for offloaded caches"),
        }
    }

    /// How offloaded caches store their values when not packed.
    pub fn cache_dtype(&self) -> CacheDtype {
        match self.cache_rows {
            CacheRows::Dense { dtype, .. } => dtype,
            CacheRows::Packed { .. } => CacheDtype::F32,
        }
    }

    /// Whether offloaded caches are packed (the CPU attention path reads only dense homes).
    pub fn cache_packed(&self) -> bool {
        self.cache_rows.is_packed()
    }

    /// GPU batch `k`'s state as the kernels see it: its own buffers, with the residual stream in the activation slot
    /// when its activations are offloaded.
    pub fn state_view(&self, k: usize, state: &BatchState) -> BatchState {
        let x = match (&self.acts[k], self.act_slot()) {
            (BatchAct::Homes(_), Some(slot)) => slot.clone(),
            _ => state.x.clone(),
        };
        BatchState {
            batch: state.batch,
            capacity: state.capacity,
            x,
            ids: state.ids.clone(),
            positions: state.positions.clone(),
            mask: state.mask.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::{plan, weight_groups, Workload};
    use crate::policy::Percent;

    const OPT_125M: OptConfig = OptConfig::opt("opt-125m", 12, 12, 768, 3072);

    fn policy(p: [f64; 6], gbs: usize, sep_layer: bool) -> Policy {
        Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: 2,
            percent: Percent::from_array(p),
            sep_layer,
            ..Policy::default()
        }
    }

    #[test]
    fn layer_weight_placement_agrees_with_the_planner() {
        let c = OPT_125M;
        let w = Workload {
            prompt_len: 8,
            gen_len: 4,
        };
        for (sep_layer, compress) in [
            (false, None),
            (true, None),
            (true, Some(CompressionConfig::DEFAULT)),
            (false, Some(CompressionConfig::new(2, 32).unwrap())),
        ] {
            let groups = weight_groups(&c, sep_layer, compress);
            let outside: u64 =
                groups[0].iter().sum::<u64>() + groups[groups.len() - 1].iter().sum::<u64>();
            for p in [
                [100.0, 0.0],
                [0.0, 100.0],
                [0.0, 0.0],
                [30.0, 40.0],
                [50.0, 25.0],
                [20.0, 60.0],
            ] {
                let pol = Policy {
                    compress_weight: compress.is_some(),
                    compress_weight_config: compress.unwrap_or_default(),
                    ..policy([p[0], p[1], 100.0, 0.0, 100.0, 0.0], 4, sep_layer)
                };
                let planned = plan(&c, &pol, w).unwrap().weights;
                let mut mine = [0u64; 3];
                for i in 0..c.num_hidden_layers {
                    let tiers = layer_weight_tiers(&c, &pol, i);
                    for t in layer_tensors(&c, i) {
                        let at = match tiers[&t.name] {
                            Tier::Gpu => 0,
                            Tier::Cpu => 1,
                            Tier::Disk => 2,
                        };
                        mine[at] += stored_bytes(&c, &t, compress);
                    }
                }
                // The planner also places the embedding and output groups; every layer byte is placed alike.
                for (tier, planned) in [planned.gpu, planned.cpu, planned.disk]
                    .into_iter()
                    .enumerate()
                {
                    assert!(
                        mine[tier] <= planned && planned <= mine[tier] + outside,
                        "{p:?} sep_layer={sep_layer} {compress:?}: tier {tier}: layers {} vs plan {planned}",
                        mine[tier]
                    );
                }
            }
        }
    }

    #[test]
    fn f32_cache_ranges_are_whole_token_rows() {
        let rows = CacheRows::new(&OPT_125M, 4, 10, CacheDtype::F32, None);
        let row = 768 * 4;
        assert_eq!(rows.home_bytes(), 10 * row);
        let decode = Step::new(1, 7);
        assert_eq!(
            rows.fetch_ranges(2, decode),
            [CacheRange {
                home: 0,
                slot: 20 * row,
                len: 7 * row
            }]
        );
        assert_eq!(
            rows.store_ranges(2, decode),
            [CacheRange {
                home: 7 * row,
                slot: 27 * row,
                len: row
            }]
        );
        assert!(rows.fetch_ranges(0, Step::new(6, 0)).is_empty());
    }

    #[test]
    fn packed_cache_ranges_cover_each_heads_rows_in_both_sections() {
        let cc = CompressionConfig::DEFAULT;
        let (gbs, cap, heads) = (3, 10, OPT_125M.n_head);
        let rows = CacheRows::new(&OPT_125M, gbs, cap, CacheDtype::F32, Some(cc));
        let slot = PackedLayout::new(gbs * heads * cap, 64, cc);
        let home = PackedLayout::new(heads * cap, 64, cc);
        assert_eq!(rows.home_bytes(), home.bytes());
        // head_dim 64 at 4 bits / 64: 8 data words and 1 scale word per row.
        let (wpr, gpr) = (8u64, 1u64);
        let i = 1;
        let decode = Step::new(1, 4);
        let store = rows.store_ranges(i, decode);
        assert_eq!(
            store.len(),
            2 * heads,
            "one data and one scale run per head"
        );
        for h in 0..heads {
            let home_row = (h * cap + 4) as u64;
            let slot_row = ((i * heads + h) * cap + 4) as u64;
            assert_eq!(
                store[h],
                CacheRange {
                    home: 4 * home_row * wpr,
                    slot: 4 * slot_row * wpr,
                    len: 4 * wpr
                }
            );
            assert_eq!(
                store[heads + h],
                CacheRange {
                    home: 4 * (home.scale_offset as u64 + home_row * gpr),
                    slot: 4 * (slot.scale_offset as u64 + slot_row * gpr),
                    len: 4 * gpr
                }
            );
        }
        // A step covering every row of a sequence is one run per section: the sequence's whole block.
        let all = rows.store_ranges(i, Step::new(cap, 0));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].len + all[1].len, home.bytes());
        assert_eq!(all[0].slot, 4 * (i * heads * cap) as u64 * wpr);
        // Every range stays inside its home and the slot.
        for r in rows.fetch_ranges(gbs - 1, Step::new(1, cap - 1)) {
            assert!(r.home + r.len <= home.bytes() && r.slot + r.len <= slot.bytes());
        }
    }

    #[test]
    fn sequence_split_matches_the_planners_counts() {
        let w = Workload {
            prompt_len: 8,
            gen_len: 4,
        };
        for gbs in 1..=8 {
            for (g, cpu) in [
                (100.0, 0.0),
                (0.0, 100.0),
                (0.0, 0.0),
                (30.0, 40.0),
                (50.0, 25.0),
                (20.0, 60.0),
            ] {
                let pol = policy([100.0, 0.0, g, cpu, g, cpu], gbs, true);
                let planned = plan(&OPT_125M, &pol, w).unwrap();
                let mut mine = [0usize; 3];
                for i in 0..gbs {
                    mine[match sequence_tier(pol.percent.cache, gbs, i) {
                        Tier::Gpu => 0,
                        Tier::Cpu => 1,
                        Tier::Disk => 2,
                    }] += pol.num_gpu_batches;
                }
                assert_eq!(mine, planned.cache_sequences, "gbs {gbs}, {g} {cpu}");
                assert_eq!(mine, planned.act_sequences, "gbs {gbs}, {g} {cpu}");
            }
        }
    }
}
