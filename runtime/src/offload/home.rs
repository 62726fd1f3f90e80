//! [`Home`]: an offloaded tensor (one sequence's cache rows or hidden rows) with the write-back into it that may still
//! be in flight, so the block schedule can let stores finish in the background and wait only before a read.

use crate::tiers::{PendingStore, TensorHome, Ticket, Tier, TierError, Tiers};

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

    /// The tensor when no write into it is in flight (after [`Home::settle`]), else `None`.
    pub fn settled(&self) -> Option<&TensorHome> {
        matches!(self.inflight, Inflight::Idle).then_some(&self.tensor)
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
