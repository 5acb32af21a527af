//! The two diffs, both ending in one [`WritePlan`]:
//!
//! - **full**: the whole [`Target`] (map contents with stable ids and placed tables) against the
//!   mirror; used for the first sync, after new settings or a failed write;
//! - **incremental**: only the frontends whose plan changed since the last sync, against
//!   indexes kept from it ([`Incremental`]): at 10,000 Services a change to one should not cost a
//!   pass over all of them.
//!
//! Each diff has a commit step, run only once its plan was applied, that records what is
//! programmed now.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use lb_common::{maglev, service::BackendId};
use rayon::prelude::*;

use super::{
    Programmer, Settings,
    apply::{AffinityPrune, SlotWrites, WritePlan},
    encoding::{
        backend_value, draining_values, id_set, identity, is_draining, service_entry, service_key,
        table_range,
    },
    tables::{IdAllocator, SlotSpace, TableContent, build_table, slot_changes, table_for},
};
use crate::{
    dataplane::{BackendValue, FrontendKey, MapContents, SlotTable, TableRange},
    model::ObjectRef,
    translate::{Desired, Frontend, FrontendPlan, Touched},
};

/// What the maps should hold, plus frontends that found no room for their table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub contents: MapContents,
    pub unplaced: Vec<Frontend>,
    table_contents: BTreeMap<TableRange, TableContent>,
    /// service id -> the backends its table spreads over.
    affinity_scope: BTreeMap<u32, Arc<[BackendId]>>,
    /// Each frontend's table content (frontends with backends only).
    wants: BTreeMap<FrontendKey, TableContent>,
}

/// Indexes kept after a sync so the next one only works on the frontends that changed.
#[derive(Debug)]
pub(super) struct Incremental {
    /// Each programmed frontend's table content (frontends with backends only).
    contents: HashMap<FrontendKey, TableContent>,
    /// Content -> where its table is and how many frontends use it.
    tables: HashMap<TableContent, (TableRange, usize)>,
    /// Every programmed backend's id by its identity (its value without the draining mark), so
    /// a backend that starts or stops draining keeps its id.
    backend_ids: HashMap<BackendValue, BackendId>,
    /// BackendValue id -> how many frontends' tables name it.
    backend_users: HashMap<BackendId, usize>,
    /// Free ranges of the slots array (quarantined ones excluded until the next sync).
    space: SlotSpace,
    next_backend_id: u32,
    next_service_id: u32,
    /// The settings the indexes were built for; other settings mean a full sync.
    pub settings: Settings,
    /// The backends programmed as draining, by identity: their id and value as programmed.
    draining: BTreeMap<BackendValue, (BackendId, BackendValue)>,
}

impl Incremental {
    /// The id of a programmed backend (draining or not) by its value without the draining mark.
    pub fn backend_id(&self, value: &BackendValue) -> Option<BackendId> {
        self.backend_ids.get(value).copied()
    }
}

/// An incremental diff: its plan, and what to record once the plan is applied.
pub(super) struct Changes {
    pub plan: WritePlan,
    indexes: Incremental,
    changed: Vec<(Frontend, Option<Arc<FrontendPlan>>)>,
    unplaced: Vec<Frontend>,
    freed: Vec<(TableContent, TableRange)>,
    unused: Vec<(BackendId, BackendValue)>,
    tables_written: Vec<(TableRange, TableContent, Arc<SlotTable>)>,
}

impl Programmer {
    /// The map contents `desired` maps to. Ids already programmed are kept for the same backend or
    /// frontend; new ones never reuse an id still programmed, so no in-use id changes meaning.
    /// Frontends with the same backends and table size share one table.
    ///
    /// A Service is programmed whole or not at all: when some of its frontends find no room,
    /// its other frontends are left out too (and their room goes to the Services after it), so
    /// the packet path never serves half a Service, e.g. its ClusterIP without its NodePort.
    pub fn target(&self, desired: &Desired) -> Target {
        let mut rejected = BTreeSet::new();
        loop {
            let target = self.target_rejecting(desired, &rejected);
            let placed = |frontend: &Frontend| {
                (target.contents.services).contains_key(&service_key(frontend))
            };
            let partial = partially_placed(&target.unplaced, desired, placed);
            if partial.is_empty() {
                return target;
            }
            // Each round rejects at least one more Service, so this ends.
            rejected.extend(partial);
        }
    }

    /// [`Programmer::target`] with the frontends of the Services in `rejected` left unplaced
    /// without taking any room.
    fn target_rejecting(&self, desired: &Desired, rejected: &BTreeSet<ObjectRef>) -> Target {
        let existing_backends: BTreeMap<BackendValue, BackendId> = self
            .programmed
            .backends
            .iter()
            .map(|(id, b)| (identity(b), *id))
            .collect();
        let mut backend_ids =
            IdAllocator::new(self.programmed.backends.keys().copied().collect(), 1);
        let mut service_ids = IdAllocator::new(
            self.programmed
                .services
                .values()
                .map(|e| e.service_id)
                .collect(),
            1,
        );

        let mut target = Target {
            contents: MapContents {
                node: self.settings.node,
                node6: self.settings.node6,
                ..MapContents::default()
            },
            ..Target::default()
        };
        // Frontend by frontend in key order, while the maps have room: a frontend whose entry
        // or new backends would not fit is left unplaced (as when its table finds no room), so
        // a full map never fails the sync. Entries this sync removes still count (they go
        // last), so only what is programmed now plus what is added must fit.
        let capacity = self.settings.capacities;
        let mut new_backends = 0;
        let mut new_frontends = 0;
        let mut admitted: BTreeMap<Frontend, &Arc<FrontendPlan>> = BTreeMap::new();
        let mut id_of: BTreeMap<BackendValue, BackendId> = BTreeMap::new();
        for (frontend, plan) in &desired.frontends {
            if rejected.contains(&plan.service) {
                target.unplaced.push(*frontend);
                continue;
            }
            let fresh_frontend = !self
                .programmed
                .services
                .contains_key(&service_key(frontend));
            let wanted: BTreeSet<BackendValue> = (plan.backends.iter())
                .map(backend_value)
                .filter(|value| !id_of.contains_key(value))
                .collect();
            let fresh = (wanted.iter())
                .filter(|value| !existing_backends.contains_key(&identity(value)))
                .count();
            let fits = self.range_sets.id_for(plan).is_some()
                && id_of.len() + wanted.len() <= capacity.backends as usize
                && self.programmed.backends.len() + new_backends + fresh
                    <= capacity.backends as usize
                && admitted.len() < capacity.frontends as usize
                && (!fresh_frontend
                    || self.programmed.services.len() + new_frontends
                        < capacity.frontends as usize);
            if !fits {
                target.unplaced.push(*frontend);
                continue;
            }
            new_backends += fresh;
            new_frontends += usize::from(fresh_frontend);
            for value in wanted {
                let id = existing_backends
                    .get(&identity(&value))
                    .copied()
                    .unwrap_or_else(|| backend_ids.allocate());
                id_of.insert(value, id);
            }
            admitted.insert(*frontend, plan);
        }
        // Draining backends (for established flows only) while room remains.
        for value in draining_values(desired) {
            let id = existing_backends.get(&identity(&value)).copied();
            let room = id_of.len() < capacity.backends as usize
                && (id.is_some()
                    || self.programmed.backends.len() + new_backends < capacity.backends as usize);
            if room {
                new_backends += usize::from(id.is_none());
                id_of.insert(value, id.unwrap_or_else(|| backend_ids.allocate()));
            }
        }
        for (value, id) in &id_of {
            target.contents.backends.insert(*id, *value);
        }

        let wants: BTreeMap<FrontendKey, TableContent> = admitted
            .iter()
            .filter(|(_, plan)| !plan.backends.is_empty())
            .map(|(frontend, plan)| {
                let mut backends: Vec<BackendId> = plan
                    .backends
                    .iter()
                    .map(|b| id_of[&backend_value(b)])
                    .collect();
                backends.sort_unstable();
                let content = TableContent {
                    size: plan.table_size,
                    backends: backends.into(),
                };
                (service_key(frontend), content)
            })
            .collect();
        let placement = self.place_tables(&wants, &mut target);

        for (frontend, plan) in &admitted {
            let key = service_key(frontend);
            let range = match wants.get(&key) {
                None => Some(TableRange { offset: 0, size: 0 }),
                Some(content) => placement.get(content).copied(),
            };
            let Some(range) = range else {
                target.unplaced.push(*frontend);
                continue;
            };
            let service_id = match self.programmed.services.get(&key) {
                Some(entry) => entry.service_id,
                None => service_ids.allocate(),
            };
            target.affinity_scope.insert(
                service_id,
                (wants.get(&key))
                    .map(|c| c.backends.clone())
                    .unwrap_or_else(|| Arc::from([])),
            );
            let ranges_id = self.range_sets.id_for(plan).expect("admitted with its set");
            let entry = service_entry(
                plan,
                range,
                (service_id, ranges_id),
                self.settings.reject_no_endpoints,
            );
            target.contents.services.insert(key, entry);
        }
        target.wants = wants;
        target
    }

    /// Decides where each distinct table lives and fills the target's tables. A table already
    /// programmed is updated in place (writing only the slots that differ) when every frontend
    /// using it wants the new content or is going away; otherwise the content gets a fresh range.
    fn place_tables(
        &self,
        wants: &BTreeMap<FrontendKey, TableContent>,
        target: &mut Target,
    ) -> BTreeMap<TableContent, TableRange> {
        // Which frontends use each programmed table, and which tables each content could reuse.
        let mut users: BTreeMap<TableRange, Vec<FrontendKey>> = BTreeMap::new();
        for (key, entry) in &self.programmed.services {
            if entry.table_size > 0 {
                users.entry(table_range(entry)).or_default().push(*key);
            }
        }
        let mut candidates: BTreeMap<&TableContent, BTreeSet<TableRange>> = BTreeMap::new();
        for (key, content) in wants {
            if let Some(entry) = self.programmed.services.get(key)
                && entry.table_size == content.size
            {
                candidates
                    .entry(content)
                    .or_default()
                    .insert(table_range(entry));
            }
        }
        let mut placement = BTreeMap::new();
        let mut claimed = BTreeSet::new();
        for (content, ranges) in candidates {
            let reusable = ranges.into_iter().find(|range| {
                !claimed.contains(range)
                    && users[range]
                        .iter()
                        .all(|k| wants.get(k).is_none_or(|w| w == content))
            });
            if let Some(range) = reusable {
                claimed.insert(range);
                placement.insert(content.clone(), range);
            }
        }
        let distinct: BTreeSet<&TableContent> = wants.values().collect();
        let mut space = SlotSpace::new(
            self.settings.capacities.slots,
            self.programmed
                .tables
                .keys()
                .copied()
                .chain(self.quarantine.iter().copied()),
        );
        for content in distinct {
            if placement.contains_key(content) {
                continue;
            }
            if let Some(range) = space.allocate(content.size) {
                placement.insert(content.clone(), range);
            }
        }
        // Tables not built yet are built on every core: a first sync builds thousands.
        let backends = &target.contents.backends;
        let tables: Vec<(TableRange, Arc<SlotTable>)> = (placement.par_iter())
            .map(|(content, range)| {
                let table = (self.built.get(content).cloned())
                    .unwrap_or_else(|| Arc::new(build_table(content, backends)));
                (*range, table)
            })
            .collect();
        target.contents.tables.extend(tables);
        for (content, range) in &placement {
            target.table_contents.insert(*range, content.clone());
        }
        placement
    }

    /// The writes that turn the mirror into `target`.
    pub(super) fn full_plan(&self, target: &Target) -> WritePlan {
        let current = &self.programmed;
        let want = &target.contents;
        let mut plan = WritePlan::default();
        if current.node != want.node {
            plan.node = Some(want.node);
        }
        if current.node6 != want.node6 {
            plan.node6 = Some(want.node6);
        }
        for (id, backend) in &want.backends {
            if current.backends.get(id) == Some(backend) {
                continue;
            }
            // A backend that only starts draining is marked after the tables stop naming it.
            let starts_draining = is_draining(backend)
                && current
                    .backends
                    .get(id)
                    .is_some_and(|old| !is_draining(old));
            if starts_draining {
                plan.draining.push((*id, *backend));
            } else {
                plan.backends.push((*id, *backend));
            }
        }
        for (range, slots) in &want.tables {
            if self.table_contents.get(range) == target.table_contents.get(range) {
                continue; // written by an earlier sync with exactly this content
            }
            match current.tables.get(range) {
                None => plan.slots.push((*range, SlotWrites::Whole(slots.clone()))),
                Some(before) => {
                    let changes = slot_changes(before, slots);
                    if !changes.is_empty() {
                        plan.slots.push((*range, SlotWrites::Changes(changes)));
                    }
                }
            }
        }
        plan.services = want
            .services
            .iter()
            .filter(|(key, entry)| current.services.get(key) != Some(entry))
            .map(|(key, entry)| (*key, *entry))
            .collect();
        plan.removed_services = current
            .services
            .keys()
            .filter(|key| !want.services.contains_key(key))
            .copied()
            .collect();
        // Affinity memories must not outlive their backend's membership in the service.
        if target.affinity_scope != self.affinity_scope {
            plan.affinity = Some(AffinityPrune::AllBut(
                target
                    .affinity_scope
                    .iter()
                    .map(|(id, backends)| (*id, id_set(backends)))
                    .collect(),
            ));
        }
        plan.removed_backends = current
            .backends
            .keys()
            .filter(|id| !want.backends.contains_key(id))
            .copied()
            .collect();
        plan
    }

    /// Records what a full sync to `target` programmed. Returns the frontends left unplaced.
    pub(super) fn commit_full(&mut self, target: Target, desired: &Desired) -> Vec<Frontend> {
        let Target {
            contents: target,
            unplaced,
            table_contents,
            affinity_scope,
            wants,
        } = target;
        // The mirror holds the old tables and the written ones; the old ones wait a sync.
        self.quarantine = self
            .programmed
            .tables
            .keys()
            .filter(|r| !target.tables.contains_key(r))
            .copied()
            .collect();
        self.programmed
            .tables
            .retain(|range, _| target.tables.contains_key(range));
        // Remember what was written, sharing the built tables for the next sync.
        self.built = table_contents
            .iter()
            .map(|(range, content)| (content.clone(), target.tables[range].clone()))
            .collect();
        self.table_contents = table_contents;
        self.affinity_scope = affinity_scope;
        self.programmed_plans = desired.frontends.clone();
        for frontend in &unplaced {
            self.programmed_plans.remove(frontend);
        }
        self.unplaced = unplaced.iter().copied().collect();
        self.incremental = Some(self.indexes(&wants));
        unplaced
    }

    /// The indexes for incremental syncs, from what a full sync just programmed.
    fn indexes(&self, wants: &BTreeMap<FrontendKey, TableContent>) -> Incremental {
        let programmed = &self.programmed;
        let contents: HashMap<FrontendKey, TableContent> = wants
            .iter()
            .filter(|(key, _)| programmed.services.contains_key(key))
            .map(|(k, c)| (*k, c.clone()))
            .collect();
        let mut tables: HashMap<TableContent, (TableRange, usize)> = self
            .table_contents
            .iter()
            .map(|(range, content)| (content.clone(), (*range, 0)))
            .collect();
        let mut backend_users: HashMap<BackendId, usize> = HashMap::new();
        for content in contents.values() {
            if let Some(table) = tables.get_mut(content) {
                table.1 += 1;
            }
            for id in content.backends.iter() {
                *backend_users.entry(*id).or_default() += 1;
            }
        }
        Incremental {
            contents,
            tables,
            backend_ids: (programmed.backends.iter())
                .map(|(id, b)| (identity(b), *id))
                .collect(),
            draining: (programmed.backends.iter())
                .filter(|(_, b)| is_draining(b))
                .map(|(id, b)| (identity(b), (*id, *b)))
                .collect(),
            backend_users,
            space: SlotSpace::new(
                self.settings.capacities.slots,
                programmed
                    .tables
                    .keys()
                    .copied()
                    .chain(self.quarantine.iter().copied()),
            ),
            next_backend_id: programmed.backends.keys().max().map_or(1, |id| id + 1),
            next_service_id: programmed
                .services
                .values()
                .map(|e| e.service_id)
                .max()
                .map_or(1, |id| id + 1),
            settings: self.settings,
        }
    }

    /// The incremental diff: the frontends whose plan changed since the last sync, and nothing
    /// else.
    pub(super) fn changes_plan(
        &mut self,
        mut ix: Incremental,
        desired: &Desired,
        touched: Option<&Touched>,
    ) -> Changes {
        // Ranges freed by the previous sync may be reused from now on.
        for range in self.quarantine.drain(..) {
            ix.space.free(range);
        }
        // Frontends left unplaced that are no longer wanted are forgotten.
        (self.unplaced).retain(|frontend| desired.frontends.contains_key(frontend));
        let changed = match touched {
            Some(touched) => {
                // Frontends left unplaced last time are tried again once the last sync made
                // room.
                let retried = self.unplaced.iter().filter(|_| self.room_freed);
                let candidates: BTreeSet<&Frontend> = touched.iter().chain(retried).collect();
                touched_frontends(candidates, &self.programmed_plans, &desired.frontends)
            }
            None => changed_frontends(&self.programmed_plans, &desired.frontends),
        };

        // Release what the changed frontends used. Only the tables and backends released here
        // (or added below) can end up unused.
        let mut released: BTreeMap<FrontendKey, TableContent> = BTreeMap::new();
        let mut maybe_unused: BTreeSet<BackendId> = BTreeSet::new();
        for (frontend, _) in &changed {
            let key = service_key(frontend);
            if let Some(old) = ix.contents.remove(&key) {
                if let Some(table) = ix.tables.get_mut(&old) {
                    table.1 -= 1;
                }
                for id in old.backends.iter() {
                    if let Some(users) = ix.backend_users.get_mut(id) {
                        *users -= 1;
                        maybe_unused.insert(*id);
                    }
                }
                released.insert(key, old);
            }
        }

        // Decide the new state of each changed frontend.
        let mut plan = WritePlan::default();
        let mut unplaced: Vec<Frontend> = Vec::new();
        let mut scope: BTreeMap<u32, BTreeSet<BackendId>> = BTreeMap::new();
        let mut tables_written: Vec<(TableRange, TableContent, Arc<SlotTable>)> = Vec::new();
        let mut added_frontends = 0;
        for (frontend, plan_of) in &changed {
            let key = service_key(frontend);
            let service_id = self.programmed.services.get(&key).map(|e| e.service_id);
            let Some(frontend_plan) = plan_of else {
                plan.removed_services.push(key);
                if let Some(id) = service_id {
                    scope.insert(id, BTreeSet::new());
                }
                continue;
            };
            // Room in the maps: what is programmed now plus what this plan adds (removals
            // come last), as in the full diff.
            let capacity = self.settings.capacities;
            let fresh = (frontend_plan.backends.iter())
                .filter(|b| !ix.backend_ids.contains_key(&backend_value(b)))
                .count();
            let ranges_id = self.range_sets.id_for(frontend_plan);
            let fits = ranges_id.is_some()
                && self.programmed.backends.len() + plan.backends.len() + fresh
                    <= capacity.backends as usize
                && (service_id.is_some()
                    || self.programmed.services.len() + added_frontends
                        < capacity.frontends as usize);
            if !fits {
                unplaced.push(*frontend);
                plan.removed_services.push(key);
                continue;
            }
            added_frontends += usize::from(service_id.is_none());
            // id -> Maglev key of this plan's backends (new ones are not in the maps yet).
            let mut keys: HashMap<BackendId, u64> =
                HashMap::with_capacity(frontend_plan.backends.len());
            for b in frontend_plan.backends.iter() {
                let value = backend_value(b);
                let id = *ix.backend_ids.entry(value).or_insert_with(|| {
                    let id = ix.next_backend_id;
                    ix.next_backend_id += 1;
                    plan.backends.push((id, value));
                    // Tracked from the start, so it is deleted again if nothing ends up using it.
                    ix.backend_users.insert(id, 0);
                    maybe_unused.insert(id);
                    id
                });
                keys.insert(id, maglev::backend_key_wide(value.addr_be, value.port_be));
            }
            let mut ids: Vec<BackendId> = keys.keys().copied().collect();
            ids.sort_unstable();
            let key_of = |id: BackendId| keys[&id];
            let range = if ids.is_empty() {
                TableRange { offset: 0, size: 0 }
            } else {
                let content = TableContent {
                    size: frontend_plan.table_size,
                    backends: ids.as_slice().into(),
                };
                let old = released.get(&key);
                let range = if let Some(table) = ix.tables.get_mut(&content) {
                    table.1 += 1;
                    Some(table.0)
                } else if let Some(old) = old
                    && old.size == content.size
                    && ix.tables.get(old).is_some_and(|t| t.1 == 0)
                {
                    // Nobody else uses the frontend's old table: rewrite it in place, only the
                    // slots whose backend changes.
                    let (range, _) = ix.tables.remove(old).expect("checked");
                    let table = table_for(&mut self.built, &content, key_of);
                    let before = self.programmed.tables.get(&range);
                    let writes = match before {
                        Some(before) => SlotWrites::Changes(slot_changes(before, &table)),
                        None => SlotWrites::Whole(table.clone()),
                    };
                    self.built.remove(old);
                    ix.tables.insert(content.clone(), (range, 1));
                    if !matches!(&writes, SlotWrites::Changes(c) if c.is_empty()) {
                        plan.slots.push((range, writes));
                    }
                    tables_written.push((range, content.clone(), table));
                    Some(range)
                } else {
                    ix.space.allocate(content.size).inspect(|&range| {
                        let table = table_for(&mut self.built, &content, key_of);
                        plan.slots.push((range, SlotWrites::Whole(table.clone())));
                        ix.tables.insert(content.clone(), (range, 1));
                        tables_written.push((range, content.clone(), table));
                    })
                };
                let Some(range) = range else {
                    unplaced.push(*frontend);
                    plan.removed_services.push(key);
                    continue;
                };
                for id in content.backends.iter() {
                    *ix.backend_users.entry(*id).or_default() += 1;
                }
                ix.contents.insert(key, content);
                range
            };
            let service_id = service_id.unwrap_or_else(|| {
                let id = ix.next_service_id;
                ix.next_service_id += 1;
                id
            });
            scope.insert(service_id, ids.into_iter().collect());
            let entry = service_entry(
                frontend_plan,
                range,
                (service_id, ranges_id.expect("checked with the room")),
                self.settings.reject_no_endpoints,
            );
            plan.services.push((key, entry));
        }
        self.drain_changes(&mut ix, desired, &mut plan);
        let released_contents: BTreeSet<&TableContent> = released.values().collect();
        let freed: Vec<(TableContent, TableRange)> = released_contents
            .into_iter()
            .filter_map(|content| match ix.tables.get(content) {
                Some((range, 0)) => Some((content.clone(), *range)),
                _ => None,
            })
            .collect();
        let draining_ids: HashSet<BackendId> = ix.draining.values().map(|(id, _)| *id).collect();
        let mut unused: Vec<(BackendId, BackendValue)> = maybe_unused
            .iter()
            .filter(|id| ix.backend_users.get(id) == Some(&0) && !draining_ids.contains(id))
            .filter_map(|id| {
                let value = self.programmed.backends.get(id).copied().or_else(|| {
                    plan.backends
                        .iter()
                        .find(|(new, _)| new == id)
                        .map(|(_, b)| *b)
                })?;
                Some((*id, value))
            })
            .collect();
        unused.sort_unstable();
        if !scope.is_empty() {
            plan.affinity = Some(AffinityPrune::Within(scope));
        }
        // Backends that stopped draining without being chosen again were already forgotten
        // by `drain_changes` and wait in `removed_backends`.
        plan.removed_backends
            .extend(unused.iter().map(|(id, _)| *id));
        plan.removed_backends.sort_unstable();
        Changes {
            plan,
            indexes: ix,
            changed: changed
                .into_iter()
                .map(|(frontend, plan)| (frontend, plan.cloned()))
                .collect(),
            unplaced,
            freed,
            unused,
            tables_written,
        }
    }

    /// Backends starting or stopping to drain (`desired`'s draining set against what is
    /// programmed), after the changed frontends were placed: a backend no frontend chooses any
    /// more but some still lists keeps its id, marked draining once no table names it; one
    /// that stops draining is either chosen again (its value loses the mark before any table
    /// names it) or deleted. As the full diff does, a new draining backend gets an id only while
    /// the backends map has room.
    fn drain_changes(&self, ix: &mut Incremental, desired: &Desired, plan: &mut WritePlan) {
        let wanted: BTreeMap<BackendValue, BackendValue> = (draining_values(desired).into_iter())
            .map(|value| (identity(&value), value))
            .collect();
        let stopped: Vec<BackendValue> = (ix.draining.keys())
            .filter(|identity| !wanted.contains_key(identity))
            .copied()
            .collect();
        for identity in stopped {
            let (id, _) = ix.draining.remove(&identity).expect("listed");
            if ix.backend_users.get(&id).is_some_and(|&users| users > 0) {
                plan.backends.push((id, identity));
            } else {
                ix.backend_ids.remove(&identity);
                ix.backend_users.remove(&id);
                plan.removed_backends.push(id);
            }
        }
        let capacity = self.settings.capacities.backends as usize;
        let mut in_map = self.programmed.backends.len()
            + (plan.backends.iter())
                .filter(|(id, _)| !self.programmed.backends.contains_key(id))
                .count();
        for (identity, value) in wanted {
            if ix.draining.contains_key(&identity) {
                continue;
            }
            let id = match ix.backend_ids.get(&identity) {
                Some(&id) => {
                    plan.draining.push((id, value));
                    id
                }
                None => {
                    if in_map >= capacity {
                        continue; // no room: the next sync tries again, as a full one would
                    }
                    in_map += 1;
                    let id = ix.next_backend_id;
                    ix.next_backend_id += 1;
                    ix.backend_ids.insert(identity, id);
                    plan.backends.push((id, value));
                    id
                }
            };
            ix.backend_users.remove(&id);
            ix.draining.insert(identity, (id, value));
        }
    }

    /// Whether applying `changes` would leave some Service partly programmed: one of its
    /// frontends found no room while another is (or stays) programmed. Such a sync is run in
    /// full instead, which rejects that Service whole.
    pub(super) fn leaves_a_service_partial(&self, changes: &Changes, desired: &Desired) -> bool {
        let changed: HashMap<&Frontend, bool> = (changes.changed.iter())
            .map(|(frontend, plan)| {
                let placed = plan.is_some() && !changes.unplaced.contains(frontend);
                (frontend, placed)
            })
            .collect();
        let placed = |frontend: &Frontend| match changed.get(frontend) {
            Some(placed) => *placed,
            None => self.programmed_plans.contains_key(frontend),
        };
        !partially_placed(&changes.unplaced, desired, placed).is_empty()
    }

    /// Records what an applied incremental diff programmed. Returns every frontend left
    /// unplaced.
    pub(super) fn commit_changes(&mut self, changes: Changes) -> Vec<Frontend> {
        let Changes {
            mut indexes,
            changed,
            unplaced,
            freed,
            unused,
            tables_written,
            ..
        } = changes;
        for (content, range) in freed {
            indexes.tables.remove(&content);
            self.built.remove(&content);
            self.table_contents.remove(&range);
            self.programmed.tables.remove(&range);
            self.quarantine.push(range);
        }
        for (id, value) in unused {
            indexes.backend_users.remove(&id);
            indexes.backend_ids.remove(&value);
        }
        for (range, content, table) in tables_written {
            self.table_contents.insert(range, content.clone());
            self.built.insert(content, table);
        }
        for (frontend, plan) in changed {
            self.unplaced.remove(&frontend);
            match plan {
                Some(plan) if !unplaced.contains(&frontend) => {
                    self.programmed_plans.insert(frontend, plan);
                }
                _ => {
                    self.programmed_plans.remove(&frontend);
                }
            }
        }
        self.unplaced.extend(unplaced);
        self.incremental = Some(indexes);
        // Also the frontends this sync did not try again: all that wait for room.
        self.unplaced.iter().copied().collect()
    }
}

/// [`changed_frontends`] among `candidates` only.
fn touched_frontends<'a>(
    candidates: BTreeSet<&Frontend>,
    before: &BTreeMap<Frontend, Arc<FrontendPlan>>,
    after: &'a BTreeMap<Frontend, Arc<FrontendPlan>>,
) -> Vec<(Frontend, Option<&'a Arc<FrontendPlan>>)> {
    candidates
        .into_iter()
        .filter_map(
            |frontend| match (before.get(frontend), after.get(frontend)) {
                (None, None) => None,
                (Some(old), Some(new)) if Arc::ptr_eq(old, new) || old == new => None,
                (_, new) => Some((*frontend, new)),
            },
        )
        .collect()
}

/// The frontends whose plan differs between `before` and `after` (added: `Some`, changed:
/// `Some`, removed: `None`), by walking both sorted maps once. Plans shared from the last
/// translation compare by pointer.
fn changed_frontends<'a>(
    before: &BTreeMap<Frontend, Arc<FrontendPlan>>,
    after: &'a BTreeMap<Frontend, Arc<FrontendPlan>>,
) -> Vec<(Frontend, Option<&'a Arc<FrontendPlan>>)> {
    let mut changes = Vec::new();
    let mut old = before.iter().peekable();
    let mut new = after.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((f, _)), None) => {
                changes.push((**f, None));
                old.next();
            }
            (None, Some((f, plan))) => {
                changes.push((**f, Some(*plan)));
                new.next();
            }
            (Some((fo, po)), Some((fa, pa))) => match fo.cmp(fa) {
                std::cmp::Ordering::Less => {
                    changes.push((**fo, None));
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    changes.push((**fa, Some(*pa)));
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(po, pa) && po != pa {
                        changes.push((**fa, Some(*pa)));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    changes
}

/// The Services some of whose frontends are in `unplaced` while others are `placed`. One pass
/// over every frontend, and only when something was left unplaced (the maps are full).
pub(super) fn partially_placed(
    unplaced: &[Frontend],
    desired: &Desired,
    placed: impl Fn(&Frontend) -> bool,
) -> BTreeSet<ObjectRef> {
    if unplaced.is_empty() {
        return BTreeSet::new();
    }
    let short: BTreeSet<&ObjectRef> = (unplaced.iter())
        .filter_map(|frontend| Some(&desired.frontends.get(frontend)?.service))
        .collect();
    (desired.frontends.iter())
        .filter(|(frontend, plan)| short.contains(&plan.service) && placed(frontend))
        .map(|(_, plan)| plan.service.clone())
        .collect()
}
