//! Level-triggered sync: desired state (from translation) -> the map writes that turn what is
//! programmed into it, and nothing more. One job a module:
//!
//! - [`encoding`]: frontends, backends and plans as map keys and values;
//! - [`tables`]: Maglev table contents, their placement in the slots array, ids;
//! - [`diff`]: the full diff (everything against the mirror) and the incremental one (only the
//!   frontends whose plan changed), both producing one [`WritePlan`];
//! - [`apply`]: the one executor of a plan, through the mirror, in the order that keeps the
//!   packet path consistent (see there).
//!
//! Ids already programmed are kept for the same backend or frontend. A table that is no longer
//! used is not reused until the next sync, so a packet that read the old entry a moment ago never
//! reads a slot that already means something else.

mod apply;
mod diff;
mod encoding;
mod source_ranges;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

pub use apply::{AffinityPrune, SlotWrites, WritePlan};
pub use diff::Target;
pub use encoding::{backend_value, service_key};
use lb_common::{
    maps::Capacities,
    service::{BackendId, NodeConfig, NodeConfig6},
};

use crate::{
    dataplane::{BackendValue, MapContents, MapWriter, SlotTable, TableRange, WriteError},
    model::Protocol,
    translate::{Desired, Frontend, FrontendPlan, Touched},
};
use encoding::identity;
use tables::TableContent;

/// Agent-wide choices that shape what is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Answer flows to Services without endpoints with a TCP RST / ICMP unreachable (kube-proxy's
    /// behaviour); otherwise drop them.
    pub reject_no_endpoints: bool,
    pub node: NodeConfig,
    /// The node's IPv6 settings (its IPv6 SNAT address).
    pub node6: NodeConfig6,
    /// The maps' capacities as loaded: the programmer never writes more entries than they hold
    /// (a frontend that would need more is left unplaced, as when its table finds no room).
    pub capacities: Capacities,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            reject_no_endpoints: true,
            node: NodeConfig::default(),
            node6: NodeConfig6::default(),
            capacities: Capacities::DEFAULT,
        }
    }
}

/// The Services of frontends a sync left unplaced, with those frontends: the unit the agent
/// reports (a Service is programmed whole or not at all).
pub fn by_service(
    unplaced: &[Frontend],
    desired: &Desired,
) -> BTreeMap<crate::model::ObjectRef, Vec<Frontend>> {
    let mut services: BTreeMap<_, Vec<Frontend>> = BTreeMap::new();
    for frontend in unplaced {
        if let Some(plan) = desired.frontends.get(frontend) {
            services
                .entry(plan.service.clone())
                .or_default()
                .push(*frontend);
        }
    }
    services
}

/// How many map writes a sync made (each changed slot counts as one; deleted affinity memories
/// count as deletes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub writes: usize,
    pub deletes: usize,
}

impl SyncStats {
    pub fn is_empty(&self) -> bool {
        self.writes == 0 && self.deletes == 0
    }
}

/// Owns the view of what is programmed and moves it towards what is desired.
#[derive(Debug, Default)]
pub struct Programmer {
    /// The mirror: what the maps hold, as written by [`apply::apply`].
    programmed: MapContents,
    /// The plans of the frontends programmed (placed) by the last successful sync.
    programmed_plans: BTreeMap<Frontend, Arc<FrontendPlan>>,
    /// What each programmed table holds, when this process wrote it (adopted tables are unknown
    /// and compared slot by slot once). A table whose content is unchanged is not even compared.
    table_contents: BTreeMap<TableRange, TableContent>,
    /// Maglev tables built for contents still in use: a sync only builds what changed.
    built: HashMap<TableContent, Arc<SlotTable>>,
    /// Tables freed by the last sync: not reused until the next one.
    quarantine: Vec<TableRange>,
    /// Each frontend's backends as of the last full sync, to tell when affinity needs pruning.
    affinity_scope: BTreeMap<u32, Arc<[BackendId]>>,
    settings: Settings,
    /// Present after a successful sync: the next one may work on changes only.
    incremental: Option<diff::Incremental>,
    /// Frontends the last sync found no room for: an incremental sync tries them again when
    /// the sync before it removed something (room appears no other way).
    unplaced: BTreeSet<Frontend>,
    /// The last sync removed entries or freed a table: the next one retries `unplaced`.
    room_freed: bool,
    /// Source-range set ids, and when sets are written and deleted.
    range_sets: source_ranges::RangeSets,
}

impl Programmer {
    /// Starts from what the maps already hold (e.g. pinned by a previous run), so the first sync
    /// changes only what differs instead of flushing.
    pub fn adopt(programmed: MapContents, settings: Settings) -> Self {
        Self {
            range_sets: source_ranges::RangeSets::adopt(&programmed),
            programmed,
            settings,
            ..Self::default()
        }
    }

    /// New settings apply from the next sync.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    pub fn programmed(&self) -> &MapContents {
        &self.programmed
    }

    /// Writes the difference between what is programmed and `desired`. Returns the stats and
    /// the frontends that could not be placed (out of slots).
    ///
    /// After a successful sync with the same settings, only the frontends whose plan changed are
    /// worked on; otherwise (the first sync, new settings, after a failed write) everything is
    /// compared with what is programmed.
    pub fn sync(
        &mut self,
        desired: &Desired,
        writer: &mut dyn MapWriter,
    ) -> Result<(SyncStats, Vec<Frontend>), WriteError> {
        self.sync_touched(desired, None, writer)
    }

    /// [`Programmer::sync`], told which frontends may have changed since the last sync
    /// (`touched`, e.g. from [`crate::translate::Translator::apply`]: every frontend whose plan
    /// differs must be in it). An incremental sync then looks at those alone, so its work
    /// follows the change, not the number of Services; without it, it compares every plan.
    pub fn sync_touched(
        &mut self,
        desired: &Desired,
        touched: Option<&Touched>,
        writer: &mut dyn MapWriter,
    ) -> Result<(SyncStats, Vec<Frontend>), WriteError> {
        let result = match self.incremental.take() {
            Some(indexes) if indexes.settings == self.settings => {
                self.sync_changes(indexes, desired, touched, writer)
            }
            _ => self.sync_full(desired, writer),
        };
        self.range_sets.settle(&self.programmed);
        if result.is_err() {
            // A table may be half rewritten: compare every table slot by slot next time, in full.
            self.table_contents.clear();
            self.incremental = None;
        }
        result
    }

    fn sync_full(
        &mut self,
        desired: &Desired,
        writer: &mut dyn MapWriter,
    ) -> Result<(SyncStats, Vec<Frontend>), WriteError> {
        self.range_sets
            .register(desired.frontends.values().map(Arc::as_ref));
        let target = self.target(desired);
        let mut plan = self.full_plan(&target);
        self.range_sets.plan_writes(&mut plan, &self.programmed);
        let frees_room = plan.frees_room(&self.programmed);
        let stats = apply::apply(&plan, writer, &mut self.programmed)?;
        let unplaced = self.commit_full(target, desired);
        self.room_freed = frees_room || !self.quarantine.is_empty();
        Ok((stats, unplaced))
    }

    fn sync_changes(
        &mut self,
        indexes: diff::Incremental,
        desired: &Desired,
        touched: Option<&Touched>,
        writer: &mut dyn MapWriter,
    ) -> Result<(SyncStats, Vec<Frontend>), WriteError> {
        // Kept to be restored should this diff be dropped for a full one.
        let quarantine = self.quarantine.clone();
        let candidates: Box<dyn Iterator<Item = &Frontend>> = match touched {
            Some(touched) => Box::new(touched.iter().chain(&self.unplaced)),
            None => Box::new(desired.frontends.keys()),
        };
        let plans: Vec<&FrontendPlan> = candidates
            .filter_map(|frontend| desired.frontends.get(frontend).map(Arc::as_ref))
            .collect();
        self.range_sets.register(plans);
        let mut changes = self.changes_plan(indexes, desired, touched);
        if self.leaves_a_service_partial(&changes, desired) {
            self.quarantine = quarantine;
            return self.sync_full(desired, writer);
        }
        // On a failed write the indexes no longer match the maps (the mirror does): they are
        // dropped, so the next sync runs in full from the mirror.
        self.range_sets
            .plan_writes(&mut changes.plan, &self.programmed);
        let frees_room = changes.plan.frees_room(&self.programmed);
        let stats = apply::apply(&changes.plan, writer, &mut self.programmed)?;
        let unplaced = self.commit_changes(changes);
        self.room_freed = frees_room || !self.quarantine.is_empty();
        Ok((stats, unplaced))
    }

    /// The (service id, backend id) pairs of UDP frontends whose backend leaves them in going
    /// from what is programmed to `next` (removed, draining, or the frontend gone), with ids as
    /// programmed now, i.e. before the sync to `next`. Their conntrack entries are purged after
    /// it, as kube-proxy clears UDP conntrack: a UDP client reusing its source port (DNS) would
    /// otherwise stay on a backend the Service no longer has, as long as it keeps sending (the
    /// packet path moves such a flow too, when it sees the backend gone or draining, but only
    /// while its entry lives). [`crate::pipeline::Pipeline::step`] asks before each sync.
    /// `touched` as for [`Programmer::sync_touched`] limits the search.
    pub fn udp_backends_leaving(
        &self,
        next: &Desired,
        touched: Option<&Touched>,
    ) -> HashSet<(u32, BackendId)> {
        let mut leaving = HashSet::new();
        let mut ids: Option<HashMap<BackendValue, BackendId>> = None;
        let programmed: Box<dyn Iterator<Item = (&Frontend, &Arc<FrontendPlan>)>> = match touched {
            Some(touched) => {
                Box::new((touched.iter()).filter_map(|f| Some((f, self.programmed_plans.get(f)?))))
            }
            None => Box::new(self.programmed_plans.iter()),
        };
        for (frontend, old) in programmed {
            if frontend.protocol != Protocol::Udp {
                continue;
            }
            let new = next.frontends.get(frontend);
            if new.is_some_and(|new| Arc::ptr_eq(new, old)) {
                continue;
            }
            let Some(entry) = self.programmed.services.get(&service_key(frontend)) else {
                continue;
            };
            for backend in old.backends.iter() {
                let stays = new.is_some_and(|n| n.backends.binary_search(backend).is_ok());
                if stays {
                    continue;
                }
                let value = backend_value(backend);
                // The incremental index knows every active backend; the whole map is searched
                // only without it (or for one already marked draining).
                let id = (self.incremental.as_ref())
                    .and_then(|ix| ix.backend_id(&value))
                    .or_else(|| {
                        let ids = ids.get_or_insert_with(|| {
                            (self.programmed.backends.iter())
                                .map(|(id, b)| (identity(b), *id))
                                .collect()
                        });
                        ids.get(&value).copied()
                    });
                if let Some(id) = id {
                    leaving.insert((entry.service_id, id));
                }
            }
        }
        leaving
    }
}
