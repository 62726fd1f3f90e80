//! The weights' store: every weight buffer where the placement puts it, and the weight slots offloaded layer
//! buffers stream into.
//!
//! [`load_model`] builds each buffer on the host in the GPU's format (f32, f16 pairs, or packed words, quantised
//! there under weight compression), one tensor and row chunk at a time, and hands it to the ledger: uploaded when the
//! placement keeps it on the GPU, otherwise written straight into its CPU or disk home. Nothing goes up and back
//! down, offloaded weights live and move in the GPU's format, and the model is never whole in host memory. The
//! tensors outside the layers are always resident ([`super::placement`]).

use std::collections::BTreeMap;

use super::ledger::{planned, Ledger, Receipt};
use super::placement::{BufferId, Placement};
use super::OffloadError;
use crate::gpu::{Gpu, GpuError};
use crate::model::{GpuModel, LayerWeights};
use crate::tiers::{GpuSlot, TensorHome, Tier, Tiers};
use crate::weights::{LayerTensor, TensorId, WeightSource};

/// A layer buffer's key: its tensor (the same in every layer) and row chunk.
pub type PartKey = (LayerTensor, usize);

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
    /// `parts[layer]`: the layer's buffers by tensor and chunk.
    parts: Vec<BTreeMap<PartKey, PartHome>>,
    /// The shape every layer shares (layer 0, whose offloaded buffers are slot buffers).
    template: Option<LayerWeights>,
    /// `slots[slot]`: a GPU buffer for every layer buffer that is offloaded (in every layer alike).
    slots: Vec<BTreeMap<PartKey, GpuSlot>>,
    /// The ledger's receipts for every weight buffer, slot and home (the model's outside the layers too).
    receipts: Vec<Receipt>,
}

/// Loads `source`'s weights where `placement` puts them, recording every buffer in `ledger`: the tensors outside
/// the layers (resident) as the returned model, the layers as the store. `progress(i)` is called after layer `i`.
pub fn load_model(
    gpu: &Gpu,
    tiers: &Tiers,
    ledger: &Ledger,
    source: &dyn WeightSource,
    placement: &Placement,
    progress: &dyn Fn(usize),
) -> Result<(GpuModel, LayerStore), OffloadError> {
    let mut receipts = Vec::new();
    let model = GpuModel::build_outside_layers::<OffloadError>(
        gpu,
        source,
        placement.weight_format,
        &mut |tensor, chunk, _, bytes| {
            let spec = planned(placement, BufferId::Weight { tensor, chunk })?;
            Ok(ledger.buffer_init(gpu, spec, bytes)?.keep(&mut receipts))
        },
    )?;
    let mut store = LayerStore::load(gpu, tiers, ledger, source, placement, progress)?;
    store.receipts.extend(receipts);
    Ok((model, store))
}

impl LayerStore {
    /// Places every decoder layer of `source` as `placement` says: the weight slots first (taken from the GPU tier's
    /// pool), then each layer buffer by buffer, resident or written to its home.
    pub fn load(
        gpu: &Gpu,
        tiers: &Tiers,
        ledger: &Ledger,
        source: &dyn WeightSource,
        placement: &Placement,
        progress: &dyn Fn(usize),
    ) -> Result<LayerStore, OffloadError> {
        let config = *source.config();
        let mut receipts = Vec::new();
        let mut slots: Vec<BTreeMap<PartKey, GpuSlot>> = (0..placement.weight_slots())
            .map(|_| BTreeMap::new())
            .collect();
        for spec in placement.buffers() {
            if let BufferId::WeightSlot {
                slot,
                tensor,
                chunk,
            } = spec.id
            {
                let made = ledger.slot(tiers, spec)?.keep(&mut receipts);
                slots[slot].insert((tensor, chunk), made);
            }
        }
        let mut parts = Vec::with_capacity(config.num_hidden_layers);
        let mut template = None;
        for i in 0..config.num_hidden_layers {
            let mut layer = BTreeMap::new();
            let built = LayerWeights::build::<OffloadError>(
                gpu,
                source,
                i,
                placement.weight_format,
                &mut |tensor, chunk, _, bytes| {
                    let spec = planned(placement, BufferId::Weight { tensor, chunk })?;
                    let TensorId::Layer(_, t) = tensor else {
                        return Err(OffloadError::Unplanned {
                            what: format!("{tensor:?} in a decoder layer"),
                            planned: 0,
                            made: 0,
                        });
                    };
                    if spec.tier == Tier::Gpu {
                        let buffer = ledger.buffer_init(gpu, spec, bytes)?.keep(&mut receipts);
                        layer.insert((t, chunk), PartHome::Resident(buffer.clone()));
                        return Ok(buffer);
                    }
                    let home = ledger.home(tiers, spec, bytes)?.keep(&mut receipts);
                    layer.insert((t, chunk), PartHome::Off(home));
                    // The kernels read an offloaded buffer from slot 0 (the view swaps in the right slot).
                    slots
                        .first()
                        .and_then(|s| s.get(&(t, chunk)))
                        .map(|s| s.buffer().clone())
                        .ok_or_else(|| OffloadError::Unplanned {
                            what: format!("a weight slot for {tensor:?}[{chunk}]"),
                            planned: 0,
                            made: spec.bytes,
                        })
                },
            )?;
            template.get_or_insert(built);
            parts.push(layer);
            progress(i);
            // A lost device fails every later upload, some (the staging belt's) with a panic inside wgpu.
            if let Some(reason) = gpu.lost() {
                return Err(GpuError::DeviceLost { reason }.into());
            }
        }
        Ok(LayerStore {
            parts,
            template,
            slots,
            receipts,
        })
    }

    /// Whether any buffer of layer `j` lives off the GPU.
    pub fn is_offloaded(&self, j: usize) -> bool {
        self.parts
            .get(j)
            .is_some_and(|p| p.values().any(|p| matches!(p, PartHome::Off(_))))
    }

    /// Layer `j`'s offloaded buffers with their homes.
    pub fn offloaded(&self, j: usize) -> impl Iterator<Item = (PartKey, &TensorHome)> {
        self.parts.get(j).into_iter().flat_map(|p| {
            p.iter().filter_map(|(&key, part)| match part {
                PartHome::Off(home) => Some((key, home)),
                PartHome::Resident(_) => None,
            })
        })
    }

    /// The weights of layer `j` as the kernels see them: resident buffers, and weight slot `slot` for the rest.
    pub fn view(&self, j: usize, slot: usize) -> Option<LayerWeights> {
        let template = self.template.as_ref()?;
        let parts = self.parts.get(j)?;
        Some(template.map(0, |tensor, chunk, b| {
            let TensorId::Layer(_, t) = tensor else {
                return b.clone();
            };
            match parts.get(&(t, chunk)) {
                Some(PartHome::Resident(buf)) => buf.clone(),
                _ => self
                    .slot_buffer(slot, (t, chunk))
                    .unwrap_or_else(|| b.clone()),
            }
        }))
    }

    /// Weight slot `slot`'s buffer (modulo the number of slots) for the layer buffer `key`.
    pub fn slot_buffer(&self, slot: usize, key: PartKey) -> Option<wgpu::Buffer> {
        let slots = self.slots.get(slot % self.slots.len().max(1))?;
        slots.get(&key).map(|s| s.buffer().clone())
    }

    /// Bytes of the weight slots (they come from the GPU tier's pool, which counts them too).
    pub fn slot_bytes(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.values())
            .map(GpuSlot::size)
            .sum()
    }

    /// Bytes of the decoder-layer buffers resident on the GPU (outside the pool).
    pub fn resident_bytes(&self) -> u64 {
        self.parts
            .iter()
            .flat_map(|p| p.values())
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
