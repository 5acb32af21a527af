//! The one way writes reach the maps: a [`WritePlan`] (which both diffs produce) executed by
//! [`apply`] in the order that keeps the packet path consistent at every instant:
//!
//! 1. the node settings;
//! 2. backends that tables will name (new, or changed in place), and source-range sets that
//!    entries will name;
//! 3. table slots, only the ones that change;
//! 4. service entries, so an entry only ever points at a complete table; then removed entries;
//! 5. backends that start draining, once no table names them;
//! 6. affinity memories that name a backend no longer in their Service;
//! 7. backends nothing uses any more, and source-range sets retired by the sync before.
//!
//! Each write goes to the maps, then to the mirror, so the mirror never claims a write that
//! failed; a failed sync simply resumes from the mirror next time.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use lb_common::service::{BackendId, NodeConfig, NodeConfig6, ServiceEntry};

use super::SyncStats;
use crate::{
    dataplane::{
        BackendValue, FrontendKey, MapContents, MapWriter, SlotTable, TableRange, WriteError,
    },
    model::SourceRanges,
};

/// Which session-affinity memories to forget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AffinityPrune {
    /// Every memory whose service id is not in `keep` or whose backend is not among that
    /// service's backends (after a full diff).
    AllBut(BTreeMap<u32, BTreeSet<BackendId>>),
    /// For the service ids given only: memories whose backend is not in the set (an empty set
    /// forgets all of that service's memories). Other services' memories stay.
    Within(BTreeMap<u32, BTreeSet<BackendId>>),
}

impl AffinityPrune {
    /// Whether the memory of `service_id` naming `backend_id` goes.
    pub fn forgets(&self, service_id: u32, backend_id: BackendId) -> bool {
        match self {
            AffinityPrune::AllBut(keep) => !keep
                .get(&service_id)
                .is_some_and(|ids| ids.contains(&backend_id)),
            AffinityPrune::Within(scope) => scope
                .get(&service_id)
                .is_some_and(|ids| !ids.contains(&backend_id)),
        }
    }
}

/// What to write into one table's range.
#[derive(Debug)]
pub enum SlotWrites {
    /// A range no table used: the whole table, shared with the programmer's copy (and the
    /// mirror's), so a first sync of 10,000 tables holds each table once.
    Whole(Arc<SlotTable>),
    /// Only the slots that change: (index in the table, backend).
    Changes(Vec<(u32, BackendId)>),
}

/// Every write of one sync, grouped by the step of the order above.
#[derive(Debug, Default)]
pub struct WritePlan {
    pub node: Option<NodeConfig>,
    pub node6: Option<NodeConfig6>,
    pub backends: Vec<(BackendId, BackendValue)>,
    pub slots: Vec<(TableRange, SlotWrites)>,
    /// Written unless the mirror already holds exactly this entry.
    pub services: Vec<(FrontendKey, ServiceEntry)>,
    /// Deleted if the mirror holds them.
    pub removed_services: Vec<FrontendKey>,
    pub draining: Vec<(BackendId, BackendValue)>,
    pub affinity: Option<AffinityPrune>,
    pub removed_backends: Vec<BackendId>,
    /// Source-range sets new to the maps, by id.
    pub source_ranges: Vec<(u32, SourceRanges)>,
    /// Source-range sets to delete (no entry has named them since the sync before).
    pub removed_source_ranges: Vec<(u32, SourceRanges)>,
}

impl WritePlan {
    /// Whether the plan deletes a frontend or backend `mirror` holds (before it is applied):
    /// the room that frees is what frontends left unplaced wait for.
    pub fn frees_room(&self, mirror: &MapContents) -> bool {
        (self.removed_services.iter()).any(|key| mirror.services.contains_key(key))
            || (self.removed_backends.iter()).any(|id| mirror.backends.contains_key(id))
            || !self.removed_source_ranges.is_empty()
    }
}

/// Executes `plan` through `writer`, keeping `mirror` to what was written.
pub fn apply(
    plan: &WritePlan,
    writer: &mut dyn MapWriter,
    mirror: &mut MapContents,
) -> Result<SyncStats, WriteError> {
    let mut w = Tracked {
        writer,
        mirror,
        stats: SyncStats::default(),
    };
    if let Some(node) = plan.node {
        w.put_node(node)?;
    }
    if let Some(node6) = plan.node6 {
        w.put_node6(node6)?;
    }
    for (id, backend) in &plan.backends {
        w.put_backend(*id, *backend)?;
    }
    for (id, ranges) in &plan.source_ranges {
        w.put_source_ranges(*id, ranges)?;
    }
    for (range, writes) in &plan.slots {
        match writes {
            SlotWrites::Whole(table) => w.put_table(*range, table)?,
            SlotWrites::Changes(changes) => w.put_slots(*range, changes)?,
        }
    }
    for (key, entry) in &plan.services {
        if w.mirror.services.get(key) != Some(entry) {
            w.put_service(*key, *entry)?;
        }
    }
    for key in &plan.removed_services {
        if w.mirror.services.contains_key(key) {
            w.delete_service(*key)?;
        }
    }
    for (id, backend) in &plan.draining {
        w.put_backend(*id, *backend)?;
    }
    if let Some(prune) = &plan.affinity {
        w.forget_affinity(prune)?;
    }
    for id in &plan.removed_backends {
        w.delete_backend(*id)?;
    }
    for (id, ranges) in &plan.removed_source_ranges {
        w.delete_source_ranges(*id, ranges)?;
    }
    Ok(w.stats)
}

/// Applies each write to the maps, then to the mirror, counting it.
struct Tracked<'a> {
    writer: &'a mut dyn MapWriter,
    mirror: &'a mut MapContents,
    stats: SyncStats,
}

macro_rules! tracked_op {
    ($name:ident, $stat:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name(&mut self, $($arg: $ty),*) -> Result<(), WriteError> {
            self.writer.$name($($arg),*)?;
            self.mirror.$name($($arg),*)?;
            self.stats.$stat += 1;
            Ok(())
        }
    };
}

impl Tracked<'_> {
    tracked_op!(put_node, writes, (config: NodeConfig));
    tracked_op!(put_node6, writes, (config: NodeConfig6));
    tracked_op!(put_backend, writes, (id: BackendId, backend: BackendValue));
    tracked_op!(delete_backend, deletes, (id: BackendId));
    tracked_op!(put_service, writes, (key: FrontendKey, entry: ServiceEntry));
    tracked_op!(delete_service, deletes, (key: FrontendKey));
    tracked_op!(put_source_ranges, writes, (id: u32, ranges: &SourceRanges));
    tracked_op!(delete_source_ranges, deletes, (id: u32, ranges: &SourceRanges));

    /// Affinity memories are the packet path's: the mirror holds none, and forgets none.
    fn forget_affinity(&mut self, prune: &AffinityPrune) -> Result<(), WriteError> {
        self.stats.deletes += self.writer.forget_affinity(prune)?;
        self.mirror.forget_affinity(prune)?;
        Ok(())
    }

    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError> {
        // One slot at a time, so the mirror holds exactly the slots written if one fails.
        for change in changes {
            self.writer.put_slots(range, std::slice::from_ref(change))?;
            self.mirror.put_slots(range, std::slice::from_ref(change))?;
            self.stats.writes += 1;
        }
        Ok(())
    }

    fn put_table(&mut self, range: TableRange, table: &Arc<SlotTable>) -> Result<(), WriteError> {
        if let Err(err) = self.writer.put_table(range, table) {
            // Some slots may be written: the mirror forgets the range, so the next (full) sync
            // writes the whole table again.
            self.mirror.tables.remove(&range);
            return Err(err);
        }
        self.mirror.put_table(range, table)?;
        self.stats.writes += table.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::AffinityPrune;

    #[test]
    fn affinity_prunes_forget_what_their_scope_says() {
        let scope: BTreeMap<u32, BTreeSet<u32>> = [(1, BTreeSet::from([10])), (2, BTreeSet::new())]
            .into_iter()
            .collect();
        let all_but = AffinityPrune::AllBut(scope.clone());
        assert!(!all_but.forgets(1, 10), "a kept backend stays");
        assert!(all_but.forgets(1, 11), "a backend that left goes");
        assert!(
            all_but.forgets(2, 10),
            "a service without backends forgets all"
        );
        assert!(all_but.forgets(3, 10), "a service not kept forgets all");
        let within = AffinityPrune::Within(scope);
        assert!(!within.forgets(1, 10));
        assert!(within.forgets(1, 11));
        assert!(within.forgets(2, 10));
        assert!(
            !within.forgets(3, 10),
            "services outside the scope are left alone"
        );
    }
}
