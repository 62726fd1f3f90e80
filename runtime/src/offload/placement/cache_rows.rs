//! The KV cache's byte arithmetic: how a sequence's rows lie in its home and in a cache slot, and so which byte
//! ranges move before and after a step. The placement sizes homes and slots with it; the schedule copies the ranges
//! it gives.

use crate::compress::{CompressionConfig, PackedLayout};
use crate::config::OptConfig;
use crate::gpu::buffer_size;
use crate::gpu::kernels::CacheDtype;
use crate::model::Step;

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
    /// Packed pair-major (see [`crate::model::KvCache`]): the slot is `batch * heads * capacity` packed rows of
    /// head_dim (row `(i * heads + h) * capacity + t`, data section then scale section), a home the
    /// `heads * capacity` rows of its sequence in the same order (row `h * capacity + t`) as a packed tensor of its
    /// own.
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
            } => buffer_size((capacity * hidden * dtype.bytes()) as u64),
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

#[cfg(test)]
mod tests {
    use super::*;

    const OPT_125M: OptConfig = OptConfig::opt("opt-125m", 12, 12, 768, 3072);

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
}
