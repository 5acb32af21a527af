//! Level-triggered sync: desired state (from translation) -> target map contents with stable ids
//! and placed Maglev tables -> the ordered writes that turn what is programmed into the target,
//! and nothing more.
//!
//! Write order keeps the packet path consistent at every instant: backends a table will name are
//! written first; then table slots (only the ones that change); then service entries, so an entry
//! only ever points at a complete table; then removals; unused backends go last. A table that is
//! no longer used is not reused until the next sync, so a packet that read the old entry a moment
//! ago never reads a slot that already means something else.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use lb_common::{
    addr_be, maglev,
    maps::MAX_SLOTS,
    port_be,
    service::{
        BACKEND_F_DRAINING, BACKEND_F_REMOTE, Backend, BackendId, NodeConfig,
        SERVICE_F_NODE_ADDRESS, SERVICE_F_REJECT, ServiceEntry, ServiceKey,
    },
};

use crate::{
    dataplane::{MapContents, MapWriter, TableRange, WriteError},
    model::Protocol,
    translate::{BackendAddr, Desired, Frontend, FrontendKind, FrontendPlan, WhenEmpty},
};

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey::new(
        addr_be(frontend.addr.octets()),
        port_be(frontend.port),
        frontend.protocol.number(),
    )
}

pub fn backend_value(backend: &BackendAddr) -> Backend {
    let flags = if backend.on_this_node {
        0
    } else {
        BACKEND_F_REMOTE
    };
    Backend::new(addr_be(backend.addr.octets()), port_be(backend.port), flags)
}

/// What a backend id stands for: its value without the draining mark, so a backend that starts
/// or stops draining keeps its id (and its flows).
fn identity(backend: &Backend) -> Backend {
    Backend {
        flags: backend.flags & !BACKEND_F_DRAINING,
        ..*backend
    }
}

/// The backends `desired` keeps only for established flows, as programmed (marked draining).
fn draining_values(desired: &Desired) -> BTreeSet<Backend> {
    desired
        .draining_backends()
        .iter()
        .map(|b| {
            let mut value = backend_value(b);
            value.flags |= BACKEND_F_DRAINING;
            value
        })
        .collect()
}

/// Agent-wide choices that shape what is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Answer flows to Services without endpoints with a TCP RST / ICMP unreachable (kube-proxy's
    /// behaviour); otherwise drop them.
    pub reject_no_endpoints: bool,
    pub node: NodeConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            reject_no_endpoints: true,
            node: NodeConfig::default(),
        }
    }
}

/// How many map writes a sync made (each changed slot counts as one).
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

/// What the maps should hold, plus frontends that found no room for their table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub contents: MapContents,
    pub unplaced: Vec<Frontend>,
    table_contents: BTreeMap<TableRange, TableContent>,
    /// service id -> the backends its table spreads over.
    affinity_scope: BTreeMap<u32, Vec<BackendId>>,
    /// Each frontend's table content (frontends with backends only).
    wants: BTreeMap<ServiceKey, TableContent>,
}

/// Indexes kept after a sync so the next one only works on the frontends that changed: at
/// 10,000 Services a change to one should not cost a pass over all of them.
#[derive(Debug)]
struct Incremental {
    /// The plans programmed, by frontend.
    plans: BTreeMap<Frontend, Arc<FrontendPlan>>,
    /// Each programmed frontend's table content (frontends with backends only).
    contents: HashMap<ServiceKey, TableContent>,
    /// Content -> where its table is and how many frontends use it.
    tables: HashMap<TableContent, (TableRange, usize)>,
    backend_ids: HashMap<Backend, BackendId>,
    /// Backend id -> how many frontends' tables name it.
    backend_users: HashMap<BackendId, usize>,
    /// Free ranges of the slots array (quarantined ones excluded until the next sync).
    space: SlotSpace,
    next_backend_id: u32,
    next_service_id: u32,
    /// The settings the indexes were built for; other settings mean a full sync.
    settings: Settings,
    /// The draining backends programmed; a change to them means a full sync (it is the only
    /// way a backend's value changes under the same id).
    draining: BTreeSet<Backend>,
}

/// Owns the view of what is programmed and moves it towards what is desired.
#[derive(Debug, Default)]
pub struct Programmer {
    programmed: MapContents,
    /// What each programmed table holds, when this process wrote it (adopted tables are unknown
    /// and compared slot by slot once). A table whose content is unchanged is not even compared.
    table_contents: BTreeMap<TableRange, TableContent>,
    /// Maglev tables built for contents still in use: a sync only builds what changed.
    built: HashMap<TableContent, Arc<Vec<BackendId>>>,
    /// Tables freed by the last sync: not reused until the next one.
    quarantine: Vec<TableRange>,
    /// Each frontend's backends as of the last full sync, to tell when affinity needs pruning.
    affinity_scope: BTreeMap<u32, Vec<BackendId>>,
    settings: Settings,
    /// Present after a successful sync: the next one may work on changes only.
    incremental: Option<Incremental>,
}

/// Applies each write to the maps, then to the mirror, so the mirror never claims a write that
/// failed; a failed sync simply resumes from there next time.
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
    tracked_op!(put_backend, writes, (id: BackendId, backend: Backend));
    tracked_op!(delete_backend, deletes, (id: BackendId));
    tracked_op!(put_service, writes, (key: ServiceKey, entry: ServiceEntry));
    tracked_op!(delete_service, deletes, (key: ServiceKey));

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
}

/// The Maglev table for `content`: each slot names one of its backends.
fn build_table(content: &TableContent, backends: &BTreeMap<BackendId, Backend>) -> Vec<BackendId> {
    build_table_keyed(content, |id| {
        let b = backends[&id];
        maglev::backend_key(b.addr_be, b.port_be)
    })
}

/// [`build_table`] with each backend's Maglev key from `key_of`.
fn build_table_keyed(content: &TableContent, key_of: impl Fn(BackendId) -> u64) -> Vec<BackendId> {
    let keys: Vec<u64> = content.backends.iter().map(|id| key_of(*id)).collect();
    maglev::build(&keys, content.size)
        .into_iter()
        .map(|i| content.backends[i as usize])
        .collect()
}

/// The lowest ids from `first` on that are not in `taken`, handed out in order.
struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(taken: BTreeSet<u32>, first: u32) -> Self {
        Self { taken, next: first }
    }

    fn allocate(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// A table's content: its size and the backends it spreads over (sorted ids).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct TableContent {
    size: u32,
    backends: Vec<BackendId>,
}

/// First-fit placement of tables in the slots array, around ranges in use: the free gaps are
/// computed once, so placing thousands of tables stays linear.
#[derive(Debug)]
struct SlotSpace {
    /// offset -> length of every free gap, in order.
    gaps: BTreeMap<u32, u32>,
}

impl SlotSpace {
    fn new(used: impl IntoIterator<Item = TableRange>) -> Self {
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
        if cursor < MAX_SLOTS {
            gaps.insert(cursor, MAX_SLOTS - cursor);
        }
        Self { gaps }
    }

    fn allocate(&mut self, size: u32) -> Option<TableRange> {
        let (&offset, &len) = self.gaps.iter().find(|(_, len)| **len >= size)?;
        self.gaps.remove(&offset);
        if len > size {
            self.gaps.insert(offset + size, len - size);
        }
        Some(TableRange { offset, size })
    }

    /// Returns a range to the free space, merging it with free neighbours.
    fn free(&mut self, range: TableRange) {
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

impl Programmer {
    /// Starts from what the maps already hold (e.g. pinned by a previous run), so the first sync
    /// changes only what differs instead of flushing.
    pub fn adopt(programmed: MapContents, settings: Settings) -> Self {
        Self {
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

    /// The (service id, backend id) pairs of UDP frontends whose backend leaves them in going
    /// from `previous` to `next` (removed, draining, or the frontend gone), as programmed now,
    /// i.e. before the sync to `next`. Their conntrack entries are purged after it, as
    /// kube-proxy clears UDP conntrack: a UDP client reusing its source port (DNS) would
    /// otherwise stay on a backend the Service no longer has, as long as it keeps sending.
    pub fn udp_backends_leaving(
        &self,
        previous: &Desired,
        next: &Desired,
    ) -> HashSet<(u32, BackendId)> {
        let ids: HashMap<Backend, BackendId> = self
            .programmed
            .backends
            .iter()
            .map(|(id, b)| (identity(b), *id))
            .collect();
        let mut leaving = HashSet::new();
        for (frontend, old) in &previous.frontends {
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
            for backend in &old.backends {
                let stays = new.is_some_and(|n| n.backends.binary_search(backend).is_ok());
                if !stays && let Some(id) = ids.get(&backend_value(backend)) {
                    leaving.insert((entry.service_id, *id));
                }
            }
        }
        leaving
    }

    /// The map contents `desired` maps to. Ids already programmed are kept for the same backend or
    /// frontend; new ones never reuse an id still programmed, so no in-use id changes meaning.
    /// Frontends with the same backends and table size share one table.
    pub fn target(&self, desired: &Desired) -> Target {
        let existing_backends: BTreeMap<Backend, BackendId> = self
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
                ..MapContents::default()
            },
            ..Target::default()
        };
        let active = desired
            .backends()
            .iter()
            .map(backend_value)
            .collect::<Vec<_>>();
        for value in active.into_iter().chain(draining_values(desired)) {
            let id = existing_backends
                .get(&identity(&value))
                .copied()
                .unwrap_or_else(|| backend_ids.allocate());
            target.contents.backends.insert(id, value);
        }
        let id_of: BTreeMap<Backend, BackendId> = target
            .contents
            .backends
            .iter()
            .map(|(id, b)| (*b, *id))
            .collect();

        let wants: BTreeMap<ServiceKey, TableContent> = desired
            .frontends
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
                    backends,
                };
                (service_key(frontend), content)
            })
            .collect();
        let placement = self.place_tables(&wants, &mut target);

        for (frontend, plan) in &desired.frontends {
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
                wants
                    .get(&key)
                    .map(|c| c.backends.clone())
                    .unwrap_or_default(),
            );
            target
                .contents
                .services
                .insert(key, self.entry_for(plan, range, service_id));
        }
        target.wants = wants;
        target
    }

    /// Decides where each distinct table lives and fills the target's tables. A table already
    /// programmed is updated in place (writing only the slots that differ) when every frontend
    /// using it wants the new content or is going away; otherwise the content gets a fresh range.
    fn place_tables(
        &self,
        wants: &BTreeMap<ServiceKey, TableContent>,
        target: &mut Target,
    ) -> BTreeMap<TableContent, TableRange> {
        let range_of = |entry: &ServiceEntry| TableRange {
            offset: entry.table_offset,
            size: entry.table_size,
        };
        // Which frontends use each programmed table, and which tables each content could reuse.
        let mut users: BTreeMap<TableRange, Vec<ServiceKey>> = BTreeMap::new();
        for (key, entry) in &self.programmed.services {
            if entry.table_size > 0 {
                users.entry(range_of(entry)).or_default().push(*key);
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
                    .insert(range_of(entry));
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
        for (content, range) in &placement {
            let table = self
                .built
                .get(content)
                .cloned()
                .unwrap_or_else(|| Arc::new(build_table(content, &target.contents.backends)));
            target.contents.tables.insert(*range, table);
            target.table_contents.insert(*range, content.clone());
        }
        placement
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
        let result = match self.incremental.take() {
            Some(indexes)
                if indexes.settings == self.settings
                    && indexes.draining == draining_values(desired) =>
            {
                self.sync_changes(indexes, desired, writer)
            }
            _ => self.sync_full(desired, writer),
        };
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
        let Target {
            contents: target,
            unplaced,
            table_contents,
            affinity_scope,
            wants,
        } = self.target(desired);
        let current = self.programmed.clone();
        let mut w = Tracked {
            writer,
            mirror: &mut self.programmed,
            stats: SyncStats::default(),
        };

        if current.node != target.node {
            w.put_node(target.node)?;
        }
        // A backend that only starts draining is marked after the tables stop naming it.
        let starts_draining = |id: &BackendId, backend: &Backend| {
            backend.flags & BACKEND_F_DRAINING != 0
                && current
                    .backends
                    .get(id)
                    .is_some_and(|old| old.flags & BACKEND_F_DRAINING == 0)
        };
        for (id, backend) in &target.backends {
            if current.backends.get(id) != Some(backend) && !starts_draining(id, backend) {
                w.put_backend(*id, *backend)?;
            }
        }
        for (range, slots) in &target.tables {
            if self.table_contents.get(range) == table_contents.get(range) {
                continue; // written by an earlier sync with exactly this content
            }
            let old = current.tables.get(range);
            let changes: Vec<(u32, BackendId)> = slots
                .iter()
                .enumerate()
                .filter(|(i, id)| old.and_then(|o| o.get(*i)) != Some(*id))
                .map(|(i, id)| (i as u32, *id))
                .collect();
            if !changes.is_empty() {
                w.put_slots(*range, &changes)?;
            }
        }
        for (key, entry) in &target.services {
            if current.services.get(key) != Some(entry) {
                w.put_service(*key, *entry)?;
            }
        }
        for key in current.services.keys() {
            if !target.services.contains_key(key) {
                w.delete_service(*key)?;
            }
        }
        for (id, backend) in &target.backends {
            if current.backends.get(id) != Some(backend) && starts_draining(id, backend) {
                w.put_backend(*id, *backend)?;
            }
        }

        // Affinity memories must not outlive their backend's membership in the service.
        if affinity_scope != self.affinity_scope {
            let keep: BTreeMap<u32, BTreeSet<BackendId>> = affinity_scope
                .iter()
                .map(|(id, backends)| (*id, backends.iter().copied().collect()))
                .collect();
            w.writer.forget_affinity(&keep)?;
        }

        for id in current.backends.keys() {
            if !target.backends.contains_key(id) {
                w.delete_backend(*id)?;
            }
        }
        let stats = w.stats;
        self.quarantine = current
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
        self.incremental = Some(self.indexes(desired, &wants, &unplaced));
        Ok((stats, unplaced))
    }

    /// The indexes for incremental syncs, from what a full sync just programmed.
    fn indexes(
        &self,
        desired: &Desired,
        wants: &BTreeMap<ServiceKey, TableContent>,
        unplaced: &[Frontend],
    ) -> Incremental {
        let programmed = &self.programmed;
        let mut plans = desired.frontends.clone();
        for frontend in unplaced {
            plans.remove(frontend);
        }
        let contents: HashMap<ServiceKey, TableContent> = wants
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
            for id in &content.backends {
                *backend_users.entry(*id).or_default() += 1;
            }
        }
        Incremental {
            plans,
            contents,
            tables,
            backend_ids: programmed
                .backends
                .iter()
                .filter(|(_, b)| b.flags & BACKEND_F_DRAINING == 0)
                .map(|(id, b)| (*b, *id))
                .collect(),
            draining: programmed
                .backends
                .values()
                .filter(|b| b.flags & BACKEND_F_DRAINING != 0)
                .copied()
                .collect(),
            backend_users,
            space: SlotSpace::new(
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

    /// The entry a frontend with `plan`, table `range` and `service_id` gets.
    fn entry_for(&self, plan: &FrontendPlan, range: TableRange, service_id: u32) -> ServiceEntry {
        let mut flags = 0;
        if plan.kind == FrontendKind::NodePort {
            flags |= SERVICE_F_NODE_ADDRESS;
        }
        if plan.when_empty == WhenEmpty::Reject && self.settings.reject_no_endpoints {
            flags |= SERVICE_F_REJECT;
        }
        ServiceEntry {
            service_id,
            table_offset: range.offset,
            table_size: range.size,
            affinity_timeout_s: plan.affinity_timeout_s.unwrap_or(0),
            flags,
            _pad: 0,
            _reserved: 0,
        }
    }

    /// An incremental sync: the frontends whose plan changed since the last sync, and nothing
    /// else, in the same write order as a full sync.
    fn sync_changes(
        &mut self,
        mut ix: Incremental,
        desired: &Desired,
        writer: &mut dyn MapWriter,
    ) -> Result<(SyncStats, Vec<Frontend>), WriteError> {
        // Ranges freed by the previous sync may be reused from now on.
        for range in self.quarantine.drain(..) {
            ix.space.free(range);
        }
        let changes = changed_frontends(&ix.plans, &desired.frontends);
        if changes.is_empty() {
            self.incremental = Some(ix);
            return Ok((SyncStats::default(), Vec::new()));
        }

        // Release what the changed frontends used.
        let mut released: BTreeMap<ServiceKey, TableContent> = BTreeMap::new();
        for (frontend, _) in &changes {
            let key = service_key(frontend);
            if let Some(old) = ix.contents.remove(&key) {
                if let Some(table) = ix.tables.get_mut(&old) {
                    table.1 -= 1;
                }
                for id in &old.backends {
                    if let Some(users) = ix.backend_users.get_mut(id) {
                        *users -= 1;
                    }
                }
                released.insert(key, old);
            }
        }

        // Decide the new state of each changed frontend.
        let mut new_backends: Vec<(BackendId, Backend)> = Vec::new();
        let mut slot_writes: Vec<(TableRange, Vec<(u32, BackendId)>)> = Vec::new();
        let mut entries: Vec<(ServiceKey, ServiceEntry)> = Vec::new();
        let mut removed: Vec<ServiceKey> = Vec::new();
        let mut unplaced: Vec<Frontend> = Vec::new();
        let mut scope: BTreeMap<u32, BTreeSet<BackendId>> = BTreeMap::new();
        let mut tables_written: Vec<(TableRange, TableContent, Arc<Vec<BackendId>>)> = Vec::new();
        for (frontend, plan) in &changes {
            let key = service_key(frontend);
            let service_id = self.programmed.services.get(&key).map(|e| e.service_id);
            let Some(plan) = plan else {
                removed.push(key);
                if let Some(id) = service_id {
                    scope.insert(id, BTreeSet::new());
                }
                continue;
            };
            // id -> Maglev key of this plan's backends (new ones are not in the maps yet).
            let mut keys: HashMap<BackendId, u64> = HashMap::with_capacity(plan.backends.len());
            for b in &plan.backends {
                let value = backend_value(b);
                let id = *ix.backend_ids.entry(value).or_insert_with(|| {
                    let id = ix.next_backend_id;
                    ix.next_backend_id += 1;
                    new_backends.push((id, value));
                    // Tracked from the start, so it is deleted again if nothing ends up using it.
                    ix.backend_users.insert(id, 0);
                    id
                });
                keys.insert(id, maglev::backend_key(value.addr_be, value.port_be));
            }
            let mut ids: Vec<BackendId> = keys.keys().copied().collect();
            ids.sort_unstable();
            let key_of = |id: BackendId| keys[&id];
            let range = if ids.is_empty() {
                TableRange { offset: 0, size: 0 }
            } else {
                let content = TableContent {
                    size: plan.table_size,
                    backends: ids.clone(),
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
                    let before = self.programmed.tables.get(&range).cloned();
                    let changes: Vec<(u32, BackendId)> = table
                        .iter()
                        .enumerate()
                        .filter(|(i, id)| before.as_ref().and_then(|b| b.get(*i)) != Some(*id))
                        .map(|(i, id)| (i as u32, *id))
                        .collect();
                    self.built.remove(old);
                    ix.tables.insert(content.clone(), (range, 1));
                    slot_writes.push((range, changes));
                    tables_written.push((range, content.clone(), table));
                    Some(range)
                } else {
                    ix.space.allocate(content.size).inspect(|&range| {
                        let table = table_for(&mut self.built, &content, key_of);
                        let all = table
                            .iter()
                            .enumerate()
                            .map(|(i, id)| (i as u32, *id))
                            .collect();
                        ix.tables.insert(content.clone(), (range, 1));
                        slot_writes.push((range, all));
                        tables_written.push((range, content.clone(), table));
                    })
                };
                let Some(range) = range else {
                    unplaced.push(*frontend);
                    removed.push(key);
                    continue;
                };
                for id in &content.backends {
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
            entries.push((key, self.entry_for(plan, range, service_id)));
        }
        let freed: Vec<(TableContent, TableRange)> = ix
            .tables
            .iter()
            .filter(|(_, (_, users))| *users == 0)
            .map(|(content, (range, _))| (content.clone(), *range))
            .collect();
        let mut unused: Vec<(BackendId, Backend)> = ix
            .backend_users
            .iter()
            .filter(|(_, users)| **users == 0)
            .filter_map(|(id, _)| {
                let value = self.programmed.backends.get(id).copied().or_else(|| {
                    new_backends
                        .iter()
                        .find(|(new, _)| new == id)
                        .map(|(_, b)| *b)
                })?;
                Some((*id, value))
            })
            .collect();
        unused.sort_unstable();

        // Write, in the order that keeps the packet path consistent.
        let result = (|| {
            let mut w = Tracked {
                writer,
                mirror: &mut self.programmed,
                stats: SyncStats::default(),
            };
            for (id, backend) in &new_backends {
                w.put_backend(*id, *backend)?;
            }
            for (range, changes) in &slot_writes {
                if !changes.is_empty() {
                    w.put_slots(*range, changes)?;
                }
            }
            for (key, entry) in &entries {
                if w.mirror.services.get(key) != Some(entry) {
                    w.put_service(*key, *entry)?;
                }
            }
            for key in &removed {
                if w.mirror.services.contains_key(key) {
                    w.delete_service(*key)?;
                }
            }
            if !scope.is_empty() {
                w.writer.forget_affinity_of(&scope)?;
            }
            for (id, _) in &unused {
                w.delete_backend(*id)?;
            }
            Ok(w.stats)
        })();
        // On a failed write the indexes no longer match the maps (the mirror does): they are
        // dropped, so the next sync runs in full from the mirror.
        let stats = result?;

        // Remember what is programmed now.
        for (content, range) in freed {
            ix.tables.remove(&content);
            self.built.remove(&content);
            self.table_contents.remove(&range);
            self.programmed.tables.remove(&range);
            self.quarantine.push(range);
        }
        for (id, value) in unused {
            ix.backend_users.remove(&id);
            ix.backend_ids.remove(&value);
        }
        for (range, content, table) in tables_written {
            self.table_contents.insert(range, content.clone());
            self.built.insert(content, table);
        }
        for (frontend, plan) in changes {
            match plan {
                Some(plan) if !unplaced.contains(&frontend) => {
                    ix.plans.insert(frontend, plan.clone());
                }
                _ => {
                    ix.plans.remove(&frontend);
                }
            }
        }
        self.incremental = Some(ix);
        Ok((stats, unplaced))
    }
}

/// The Maglev table for `content`, built once and shared through `built`.
fn table_for(
    built: &mut HashMap<TableContent, Arc<Vec<BackendId>>>,
    content: &TableContent,
    key_of: impl Fn(BackendId) -> u64,
) -> Arc<Vec<BackendId>> {
    built
        .entry(content.clone())
        .or_insert_with(|| Arc::new(build_table_keyed(content, key_of)))
        .clone()
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
