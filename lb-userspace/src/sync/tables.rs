//! Tables and ids: what a Maglev table holds ([`TableContent`]), building it, where it lives in
//! the slots array ([`SlotSpace`]), and handing out backend and service ids.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use lb_common::{maglev, service::BackendId};

use crate::dataplane::{BackendValue, SlotTable, TableRange};

/// A table's content: its size and the backends it spreads over (sorted ids).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct TableContent {
    pub size: u32,
    /// Shared: the indexes hold a content per frontend and per table, and a clone is a count.
    pub backends: Arc<[BackendId]>,
}

/// The Maglev table for `content`: each slot names one of its backends.
pub(super) fn build_table(
    content: &TableContent,
    backends: &BTreeMap<BackendId, BackendValue>,
) -> SlotTable {
    build_table_keyed(content, |id| {
        let b = backends[&id];
        maglev::backend_key_wide(b.addr_be, b.port_be)
    })
}

/// [`build_table`] with each backend's Maglev key from `key_of`.
fn build_table_keyed(content: &TableContent, key_of: impl Fn(BackendId) -> u64) -> SlotTable {
    let keys: Vec<u64> = content.backends.iter().map(|id| key_of(*id)).collect();
    SlotTable::from_indices(
        content.backends.to_vec(),
        &maglev::build(&keys, content.size),
    )
}

/// The Maglev table for `content`, built once and shared through `built`.
pub(super) fn table_for(
    built: &mut HashMap<TableContent, Arc<SlotTable>>,
    content: &TableContent,
    key_of: impl Fn(BackendId) -> u64,
) -> Arc<SlotTable> {
    built
        .entry(content.clone())
        .or_insert_with(|| Arc::new(build_table_keyed(content, key_of)))
        .clone()
}

/// The `(index, backend)` writes that turn the table `before` into `after`.
pub(super) fn slot_changes(before: &SlotTable, after: &SlotTable) -> Vec<(u32, BackendId)> {
    after
        .iter()
        .enumerate()
        .filter(|&(i, id)| before.get(i) != Some(id))
        .map(|(i, id)| (i as u32, id))
        .collect()
}

/// The lowest ids from `first` on that are not in `taken`, handed out in order.
pub(super) struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    pub fn new(taken: BTreeSet<u32>, first: u32) -> Self {
        Self { taken, next: first }
    }

    pub fn allocate(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// First-fit placement of tables in the slots array, around ranges in use: the free gaps are
/// computed once, so placing thousands of tables stays linear.
#[derive(Debug)]
pub(super) struct SlotSpace {
    /// offset -> length of every free gap, in order.
    gaps: BTreeMap<u32, u32>,
}

impl SlotSpace {
    /// The free ranges of a slots array of `slots` slots of which `used` are taken.
    pub fn new(slots: u32, used: impl IntoIterator<Item = TableRange>) -> Self {
        let mut used: Vec<TableRange> = used.into_iter().collect();
        used.sort();
        let mut gaps = BTreeMap::new();
        let mut cursor = 0u32;
        for range in used {
            if range.offset > cursor {
                gaps.insert(cursor, range.offset - cursor);
            }
            cursor = cursor.max(range.offset + range.size);
        }
        if cursor < slots {
            gaps.insert(cursor, slots - cursor);
        }
        Self { gaps }
    }

    pub fn allocate(&mut self, size: u32) -> Option<TableRange> {
        let (&offset, &len) = self.gaps.iter().find(|(_, len)| **len >= size)?;
        self.gaps.remove(&offset);
        if len > size {
            self.gaps.insert(offset + size, len - size);
        }
        Some(TableRange { offset, size })
    }

    /// Returns a range to the free space, merging it with free neighbours.
    pub fn free(&mut self, range: TableRange) {
        let mut offset = range.offset;
        let mut len = range.size;
        if let Some((&before, &before_len)) = self.gaps.range(..offset).next_back()
            && before + before_len == offset
        {
            self.gaps.remove(&before);
            offset = before;
            len += before_len;
        }
        if let Some(&after_len) = self.gaps.get(&(offset + len)) {
            self.gaps.remove(&(offset + len));
            len += after_len;
        }
        self.gaps.insert(offset, len);
    }
}
