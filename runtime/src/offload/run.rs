//! The buffers of one run (one `generate` call), made from its placement through the ledger: the stores of the KV
//! cache and of the activations ([`RunHomes`]: resident buffers or one home per sequence, with the slots offloaded
//! ones compute in) and the forward pass's working buffers ([`RunWork`]: step inputs, scratch, logits, the kernels'
//! staging). Nothing else is allocated for a run, and the decode steps allocate nothing.

use super::cpu_attention::CpuAttn;
use super::home::Home;
use super::ledger::{planned, Ledger, Receipt};
use super::placement::{
    BufferId, CacheRows, CpuAttnPart, InputPart, Kv, Placement, ScratchPart, WorkPart,
};
use super::OffloadError;
use crate::compress::CompressionConfig;
use crate::gpu::kernels::{CacheDtype, Kernels, STAGING_SLOTS};
use crate::gpu::Gpu;
use crate::model::{BatchState, CacheScratch, KvCache, Workspace};
use crate::tiers::{GpuSlot, Tiers};

/// Makes a run's buffers from their placement entries, keeping the ledger's receipts.
struct Maker<'a> {
    gpu: &'a Gpu,
    tiers: Option<&'a Tiers>,
    ledger: &'a Ledger,
    placement: &'a Placement,
    receipts: Vec<Receipt>,
}

impl Maker<'_> {
    fn buffer(&mut self, id: BufferId) -> Result<wgpu::Buffer, OffloadError> {
        let spec = planned(self.placement, id)?;
        Ok(self.ledger.buffer(self.gpu, spec)?.keep(&mut self.receipts))
    }

    fn tiers(&self) -> Result<&Tiers, OffloadError> {
        self.tiers.ok_or_else(|| OffloadError::Unplanned {
            what: "a slot or home without the memory tiers".into(),
            planned: 0,
            made: 0,
        })
    }

    fn slot(&mut self, id: BufferId) -> Result<GpuSlot, OffloadError> {
        let spec = planned(self.placement, id)?;
        let made = self.ledger.slot(self.tiers()?, spec)?;
        Ok(made.keep(&mut self.receipts))
    }

    /// A home of zeros (zero words decode to 0 in the packed format too).
    fn home(&mut self, id: BufferId) -> Result<Home, OffloadError> {
        self.home_in(id, false)
    }

    /// A home of zeros; `host`: a CPU home in plain host memory (the CPU attends over it, [`Ledger::host_home`]).
    fn home_in(&mut self, id: BufferId, host: bool) -> Result<Home, OffloadError> {
        let spec = planned(self.placement, id)?;
        let zeros = vec![0u8; spec.bytes as usize];
        let made = match host {
            true => self.ledger.host_home(self.tiers()?, spec, &zeros)?,
            false => self.ledger.home(self.tiers()?, spec, &zeros)?,
        };
        Ok(Home::new(made.keep(&mut self.receipts)))
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

/// One GPU batch's hidden state: in its own residual stream on the GPU, or one home per sequence (streamed through
/// the activation slot, which is then the batch's residual stream).
#[derive(Debug)]
pub enum BatchAct {
    /// In the batch's own buffer.
    Resident,
    /// `[s_max, hidden]` rows per sequence.
    Homes(Vec<Home>),
}

/// One GPU cache slot: K and V for a whole GPU batch (as [`CacheRows`] lays them out), lent by the GPU tier's pool.
#[derive(Debug)]
struct CacheSlot {
    k: GpuSlot,
    v: GpuSlot,
}

/// Caches and activations of one run, with the GPU slots offloaded ones compute in.
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
    capacity: usize,
    gbs: usize,
    dtype: CacheDtype,
    /// A packed cache's format and the f32 scratch it computes through.
    compression: Option<(CompressionConfig, CacheScratch)>,
    /// The activation slots offloaded batches compute in (`gbs * s_max` rows each; GPU batch `k` in slot
    /// `k % len`, [`crate::offload::placement::act_slots`]).
    act_slots: Vec<GpuSlot>,
    /// CPU attention's GPU scratch (with a batch that attends on the CPU).
    pub(crate) cpu_attn: Option<CpuAttn>,
    /// Which GPU batches attend on the CPU at decode (the placement's rule).
    pub(crate) cpu_attention: Vec<bool>,
    /// The ledger's receipts, held as long as the buffers.
    _receipts: Vec<Receipt>,
}

impl RunHomes {
    /// Makes the run's cache and activation homes and slots, and the packed cache's scratch, as `placement` lists
    /// them.
    pub fn new(
        gpu: &Gpu,
        tiers: &Tiers,
        ledger: &Ledger,
        placement: &Placement,
    ) -> Result<RunHomes, OffloadError> {
        let c = &placement.config;
        let mut m = Maker {
            gpu,
            tiers: Some(tiers),
            ledger,
            placement,
            receipts: Vec::new(),
        };
        let compression = match placement.policy.compress_cache {
            true => Some((
                placement.policy.compress_cache_config,
                CacheScratch::from_buffers(
                    m.buffer(BufferId::CacheScratch(ScratchPart::K))?,
                    m.buffer(BufferId::CacheScratch(ScratchPart::V))?,
                    m.buffer(BufferId::CacheScratch(ScratchPart::Pairs))?,
                    m.buffer(BufferId::CacheScratch(ScratchPart::Scores))?,
                ),
            )),
            false => None,
        };
        let dtype = match compression {
            Some(_) => CacheDtype::F32,
            None => placement.cache_dtype,
        };
        let capacity = placement.workload.seq_len();
        let mut caches = Vec::with_capacity(c.num_hidden_layers);
        for j in 0..c.num_hidden_layers {
            let mut row = Vec::with_capacity(placement.batches.len());
            for (k, batch) in placement.batches.iter().enumerate() {
                if batch.cache_resident() {
                    let id = |kv| BufferId::Cache {
                        layer: j,
                        batch: k,
                        kv,
                    };
                    row.push(BatchCache::Resident(Box::new(KvCache {
                        k: m.buffer(id(Kv::K))?,
                        v: m.buffer(id(Kv::V))?,
                        batch: batch.sequences,
                        capacity,
                        dtype,
                        compression: compression.as_ref().map(|(cc, _)| *cc),
                        scratch: compression.as_ref().map(|(_, s)| s.clone()),
                    })));
                    continue;
                }
                let mut seqs = Vec::with_capacity(batch.sequences);
                for i in 0..batch.sequences {
                    let id = |kv| BufferId::CacheHome {
                        layer: j,
                        batch: k,
                        seq: i,
                        kv,
                    };
                    // A batch that attends on the CPU keeps its cache where the CPU reads it at DRAM speed.
                    seqs.push(SeqCache {
                        k: m.home_in(id(Kv::K), batch.cpu_attention)?,
                        v: m.home_in(id(Kv::V), batch.cpu_attention)?,
                    });
                }
                row.push(BatchCache::Homes(seqs));
            }
            caches.push(row);
        }
        let cache_slots = (0..placement.cache_slots())
            .map(|s| {
                Ok(CacheSlot {
                    k: m.slot(BufferId::CacheSlot { slot: s, kv: Kv::K })?,
                    v: m.slot(BufferId::CacheSlot { slot: s, kv: Kv::V })?,
                })
            })
            .collect::<Result<Vec<_>, OffloadError>>()?;
        let act_slots = (0..)
            .map(|slot| BufferId::ActSlot { slot })
            .take_while(|&id| placement.spec(id).is_some())
            .map(|id| m.slot(id))
            .collect::<Result<Vec<_>, OffloadError>>()?;
        let cpu_attn = match placement.spec(BufferId::CpuAttention(CpuAttnPart::Norm)) {
            Some(_) => {
                let mut part = |p| m.slot(BufferId::CpuAttention(p));
                Some(CpuAttn::new(
                    part(CpuAttnPart::Norm)?,
                    part(CpuAttnPart::Q)?,
                    part(CpuAttnPart::K)?,
                    part(CpuAttnPart::V)?,
                    part(CpuAttnPart::Attn)?,
                    part(CpuAttnPart::Mid)?,
                ))
            }
            None => None,
        };
        let mut acts = Vec::with_capacity(placement.batches.len());
        for (k, batch) in placement.batches.iter().enumerate() {
            if batch.act_resident() {
                acts.push(BatchAct::Resident);
                continue;
            }
            let homes = (0..batch.sequences)
                .map(|i| m.home(BufferId::ActHome { batch: k, seq: i }))
                .collect::<Result<Vec<_>, _>>()?;
            acts.push(BatchAct::Homes(homes));
        }
        Ok(RunHomes {
            caches,
            acts,
            cache_slots,
            cache_rows: placement.cache_rows,
            capacity,
            gbs: placement.gpu_batch_size(),
            dtype,
            compression,
            act_slots,
            cpu_attn,
            cpu_attention: placement.batches.iter().map(|b| b.cpu_attention).collect(),
            _receipts: m.receipts,
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
            batch: if self.compression.is_some() {
                self.gbs
            } else {
                batch
            },
            capacity: self.capacity,
            dtype: self.dtype,
            compression: self.compression.as_ref().map(|(cc, _)| *cc),
            scratch: self.compression.as_ref().map(|(_, s)| s.clone()),
        })
    }

    /// The activation slot GPU batch `k` computes in, when some GPU batch's activations are offloaded.
    pub fn act_slot(&self, k: usize) -> Option<&wgpu::Buffer> {
        let slots = self.act_slots.len();
        (slots > 0).then(|| self.act_slots[k % slots].buffer())
    }

    /// Activation slots made (two let CPU-attention batches with offloaded activations pipeline).
    pub fn act_slot_count(&self) -> usize {
        self.act_slots.len()
    }

    /// The cache of layer `j`, GPU batch `k` (of `batch` sequences) as the kernels see it: its own buffers, or cache
    /// slot `slot` when it is offloaded.
    pub fn cache_view(&self, j: usize, k: usize, batch: usize, slot: usize) -> Option<KvCache> {
        match &self.caches[j][k] {
            BatchCache::Resident(c) => Some(KvCache {
                k: c.k.clone(),
                v: c.v.clone(),
                batch: c.batch,
                capacity: c.capacity,
                dtype: c.dtype,
                compression: c.compression,
                scratch: c.scratch.clone(),
            }),
            BatchCache::Homes(_) => self.cache_slot(slot, batch),
        }
    }

    /// How offloaded caches store their values when not packed.
    pub fn cache_dtype(&self) -> CacheDtype {
        self.dtype
    }

    /// A packed cache's format, if the cache is packed.
    pub fn cache_compression(&self) -> Option<CompressionConfig> {
        self.compression.as_ref().map(|(cc, _)| *cc)
    }
}

/// The forward pass's buffers of one run: each GPU batch's state (its residual stream, or the activation slot for
/// an offloaded batch, and its inputs), the shared scratch, the logits and chosen ids, and the kernels' staging.
#[derive(Debug)]
pub struct RunWork {
    /// Per GPU batch.
    pub states: Vec<BatchState>,
    /// Scratch shared by every layer and batch.
    pub ws: Workspace,
    /// `[prompts, vocab]` f32.
    pub logits: wgpu::Buffer,
    /// The chosen ids (u32).
    pub next: wgpu::Buffer,
    /// The ledger's receipts, held as long as the buffers.
    _receipts: Vec<Receipt>,
}

impl RunWork {
    /// Makes the working buffers `placement` lists, hands `kernels` their staging buffers, and points offloaded
    /// batches' residual stream at the activation slot of `homes`.
    pub fn new(
        gpu: &Gpu,
        ledger: &Ledger,
        placement: &Placement,
        homes: &RunHomes,
        kernels: &Kernels,
    ) -> Result<RunWork, OffloadError> {
        let mut m = Maker {
            gpu,
            tiers: None,
            ledger,
            placement,
            receipts: Vec::new(),
        };
        let capacity = placement.workload.seq_len();
        let mut states = Vec::with_capacity(placement.batches.len());
        for (k, batch) in placement.batches.iter().enumerate() {
            let x = match (batch.act_resident(), homes.act_slot(k)) {
                (true, _) => m.buffer(BufferId::Hidden { batch: k })?,
                (false, Some(slot)) => slot.clone(),
                (false, None) => {
                    return Err(OffloadError::Unplanned {
                        what: BufferId::ActSlot { slot: 0 }.to_string(),
                        planned: 0,
                        made: 0,
                    })
                }
            };
            let input = |part| BufferId::Input { batch: k, part };
            states.push(BatchState {
                batch: batch.sequences,
                capacity,
                x,
                ids: m.buffer(input(InputPart::Ids))?,
                positions: m.buffer(input(InputPart::Positions))?,
                mask: m.buffer(input(InputPart::Mask))?,
            });
        }
        let mut work = |part| m.buffer(BufferId::Work(part));
        let ws = Workspace {
            norm: work(WorkPart::Norm)?,
            q: work(WorkPart::Q)?,
            attn: work(WorkPart::Attn)?,
            mid: work(WorkPart::Mid)?,
            embed: work(WorkPart::Embed)?,
            last: work(WorkPart::Last)?,
            last_norm: work(WorkPart::LastNorm)?,
            last_proj: work(WorkPart::LastProj)?,
            block: match placement.spec(BufferId::Work(WorkPart::Block)) {
                Some(_) => Some(work(WorkPart::Block)?),
                None => None,
            },
        };
        let logits = m.buffer(BufferId::Logits)?;
        let next = m.buffer(BufferId::NextIds)?;
        let mut staging: [Option<wgpu::Buffer>; STAGING_SLOTS] = Default::default();
        for (slot, spec) in placement.kernel_scratch().into_iter().enumerate() {
            if let Some(spec) = spec {
                staging[slot] = Some(m.buffer(spec.id)?);
            }
        }
        kernels.set_staging(staging);
        Ok(RunWork {
            states,
            ws,
            logits,
            next,
            _receipts: m.receipts,
        })
    }
}
