//! [`SlotTable`]: a Maglev table as user space keeps it, in a fraction of the memory of one
//! backend id per slot.
//!
//! A table of `M` slots names only the few backends of one Service, so each slot is kept as an
//! index into the table's list of distinct backends: half a byte while it has at most 16 of them
//! (most Services), one byte up to 256, two and then four beyond. At 10,000 Services the
//! agent's copies of their tables take an eighth of the memory plain ids would.

use std::fmt;

use lb_common::service::BackendId;

/// The slots of one table, each naming a backend (or [`lb_common::service::NO_BACKEND`]).
#[derive(Clone)]
pub struct SlotTable {
    /// The distinct backends the slots name, in no particular order.
    palette: Vec<BackendId>,
    slots: Indices,
}

/// Each slot's index into the palette, as narrow as the palette allows.
#[derive(Clone)]
enum Indices {
    /// Two slots a byte (slot `i` in the low half of byte `i / 2` when `i` is even); the slot
    /// count, as it may be odd.
    Nibble(Box<[u8]>, usize),
    Narrow(Box<[u8]>),
    Medium(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Indices {
    /// `len` slots naming palette entry 0, wide enough for `palette` entries.
    fn filled(len: usize, palette: usize) -> Self {
        if palette <= 1 << 4 {
            Self::Nibble(vec![0; len.div_ceil(2)].into_boxed_slice(), len)
        } else if palette <= 1 << 8 {
            Self::Narrow(vec![0; len].into_boxed_slice())
        } else if palette <= 1 << 16 {
            Self::Medium(vec![0; len].into_boxed_slice())
        } else {
            Self::Wide(vec![0; len].into_boxed_slice())
        }
    }

    /// The most palette entries these indices can name.
    fn room(&self) -> usize {
        match self {
            Self::Nibble(..) => 1 << 4,
            Self::Narrow(_) => 1 << 8,
            Self::Medium(_) => 1 << 16,
            Self::Wide(_) => u32::MAX as usize + 1,
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Nibble(_, len) => *len,
            Self::Narrow(s) => s.len(),
            Self::Medium(s) => s.len(),
            Self::Wide(s) => s.len(),
        }
    }

    fn get(&self, slot: usize) -> Option<usize> {
        match self {
            Self::Nibble(s, len) => {
                (slot < *len).then(|| (s[slot / 2] >> (4 * (slot % 2))) as usize & 0xf)
            }
            Self::Narrow(s) => s.get(slot).map(|&i| i as usize),
            Self::Medium(s) => s.get(slot).map(|&i| i as usize),
            Self::Wide(s) => s.get(slot).map(|&i| i as usize),
        }
    }

    /// Sets `slot` to `index`, which must be below [`Indices::room`].
    fn set(&mut self, slot: usize, index: usize) {
        match self {
            Self::Nibble(s, len) => {
                assert!(slot < *len, "slot {slot} of {len}");
                let shift = 4 * (slot % 2);
                let byte = &mut s[slot / 2];
                *byte = (*byte & !(0xf << shift)) | ((index as u8 & 0xf) << shift);
            }
            Self::Narrow(s) => s[slot] = index as u8,
            Self::Medium(s) => s[slot] = index as u16,
            Self::Wide(s) => s[slot] = index as u32,
        }
    }
}

impl SlotTable {
    /// A table whose slot `i` names `palette[indices[i]]`, as [`lb_common::maglev::build`]
    /// returns it. Every index must be below `palette.len()`.
    pub fn from_indices(palette: Vec<BackendId>, indices: &[u32]) -> Self {
        let mut slots = Indices::filled(indices.len(), palette.len());
        for (slot, &index) in indices.iter().enumerate() {
            assert!(
                (index as usize) < palette.len(),
                "index {index} off the palette"
            );
            slots.set(slot, index as usize);
        }
        Self { palette, slots }
    }

    /// `len` slots all naming `id`.
    pub fn filled(len: usize, id: BackendId) -> Self {
        Self {
            palette: vec![id],
            slots: Indices::filled(len, 1),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend slot `slot` names.
    pub fn get(&self, slot: usize) -> Option<BackendId> {
        self.slots.get(slot).map(|index| self.palette[index])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = BackendId> + '_ {
        (0..self.len()).map(|slot| self.palette[self.slots.get(slot).expect("in range")])
    }

    /// Makes slot `slot` (which must exist) name `id`.
    pub fn set(&mut self, slot: usize, id: BackendId) {
        assert!(
            slot < self.len(),
            "slot {slot} of a {}-slot table",
            self.len()
        );
        let index = match self.palette.iter().position(|&p| p == id) {
            Some(index) => index,
            None => {
                if self.palette.len() == self.slots.room() {
                    self.compact_or_widen();
                }
                self.palette.push(id);
                self.palette.len() - 1
            }
        };
        self.slots.set(slot, index);
    }

    /// Makes room for one more palette entry: drops the entries no slot names any more (slots
    /// rewritten one by one leave them behind) or, if all are in use, widens the indices.
    fn compact_or_widen(&mut self) {
        let ids: Vec<BackendId> = self.iter().collect();
        let mut palette: Vec<BackendId> = ids.clone();
        palette.sort_unstable();
        palette.dedup();
        let room = self.slots.room();
        let width = if palette.len() < room {
            palette.len()
        } else {
            room + 1
        };
        let mut slots = Indices::filled(ids.len(), width);
        for (slot, id) in ids.iter().enumerate() {
            let index = palette.binary_search(id).expect("from these slots");
            slots.set(slot, index);
        }
        self.palette = palette;
        self.slots = slots;
    }
}

impl FromIterator<BackendId> for SlotTable {
    fn from_iter<I: IntoIterator<Item = BackendId>>(ids: I) -> Self {
        let ids: Vec<BackendId> = ids.into_iter().collect();
        let mut palette = ids.clone();
        palette.sort_unstable();
        palette.dedup();
        let mut slots = Indices::filled(ids.len(), palette.len());
        for (slot, id) in ids.iter().enumerate() {
            slots.set(slot, palette.binary_search(id).expect("from these ids"));
        }
        Self { palette, slots }
    }
}

/// Equal when every slot names the same backend, however each is stored.
impl PartialEq for SlotTable {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for SlotTable {}

impl fmt::Debug for SlotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table rewritten slot by slot, through more distinct backends over its life than one
    /// byte can index, always reads back what a plain list of ids would hold.
    #[test]
    fn reads_back_what_was_written_through_palette_compaction_and_widening() {
        let mut plain: Vec<BackendId> = (0..509).map(|i| i % 7 + 1).collect();
        let mut table: SlotTable = plain.iter().copied().collect();
        assert!(
            matches!(table.slots, Indices::Nibble(..)),
            "seven backends: half a byte"
        );
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Churn: backends come and go, 2,000 distinct ids in all, a few dozen live at a time.
        for round in 0..20_000u64 {
            let slot = next(plain.len() as u64) as usize;
            let id = (round / 10) as BackendId + next(40) as BackendId;
            plain[slot] = id;
            table.set(slot, id);
        }
        assert_eq!(table.iter().collect::<Vec<_>>(), plain);
        assert!(
            matches!(table.slots, Indices::Narrow(_)),
            "stale palette entries are dropped rather than widening the slots"
        );

        // More live backends than a byte can index: the slots widen.
        for (slot, id) in plain.iter_mut().enumerate() {
            *id = 10_000 + slot as BackendId;
            table.set(slot, *id);
        }
        assert_eq!(table.iter().collect::<Vec<_>>(), plain);
        assert!(matches!(table.slots, Indices::Medium(_)));
        assert_eq!(table, plain.iter().copied().collect());
    }

    #[test]
    fn a_maglev_table_is_kept_half_a_byte_per_slot() {
        let palette: Vec<BackendId> = vec![40, 7, 1_000_000];
        let indices: Vec<u32> = (0..251).map(|i| i % 3).collect();
        let table = SlotTable::from_indices(palette.clone(), &indices);
        assert!(matches!(&table.slots, Indices::Nibble(s, 251) if s.len() == 126));
        let expected: Vec<BackendId> = indices.iter().map(|&i| palette[i as usize]).collect();
        assert_eq!(table.iter().collect::<Vec<_>>(), expected);
        assert_eq!(table.get(2), Some(1_000_000));
        assert_eq!(table.get(251), None);
    }

    /// Neighbouring slots share a byte: writing one never changes the other, odd lengths
    /// included, and a 17th backend widens the slots to a byte each.
    #[test]
    fn half_byte_slots_keep_their_neighbours() {
        let palette: Vec<BackendId> = (100..116).collect();
        let mut plain: Vec<BackendId> = (0..251).map(|i| palette[i % 16]).collect();
        let mut table: SlotTable = plain.iter().copied().collect();
        assert!(matches!(table.slots, Indices::Nibble(..)));
        for slot in (0..251).rev() {
            plain[slot] = palette[(slot * 7 + 3) % 16];
            table.set(slot, plain[slot]);
            assert_eq!(table.get(slot), Some(plain[slot]));
        }
        assert_eq!(table.iter().collect::<Vec<_>>(), plain);
        assert_eq!(table.get(251), None);
        plain[250] = 999;
        table.set(250, 999);
        assert!(matches!(table.slots, Indices::Narrow(_)));
        assert_eq!(table.iter().collect::<Vec<_>>(), plain);
    }
}
