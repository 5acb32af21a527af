//! Writing the data-plane maps: a [`MapWriter`] trait with the BPF-backed implementation
//! ([`BpfMaps`]) and an in-memory one ([`MapContents`]) that unit tests diff against.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

pub use crate::slot_table::SlotTable;
use crate::sync::AffinityPrune;
use aya::maps::{
    Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap,
    lpm_trie::Key,
};
use lb_common::{
    Ip6,
    addr::{ip6_be, ip6_octets, narrow},
    addr_be,
    conntrack::{CtEntry, FlowKey},
    counters::Counter,
    maps::{
        AFFINITY_MAP, AFFINITY6_MAP, BACKENDS_MAP, BACKENDS6_MAP, CONNTRACK_MAP, CONNTRACK6_MAP,
        NODE_MAP, SERVICES_MAP, SERVICES6_MAP, SOURCE_RANGES_MAP,
    },
    service::{
        AffinityKey, AffinityValue, Backend, BackendId, NO_BACKEND, NodeConfig, NodeConfig6,
        SOURCE_RANGE_ALLOW, ServiceEntry, ServiceKey, SourceRange, SourceRangeValue,
        source_range_prefix_len,
    },
    stats::{BackendStats, ServiceStats},
};

use crate::model::SourceRanges;

#[derive(Debug, thiserror::Error)]
#[error("failed to {op} {map} entry {key}")]
pub struct WriteError {
    pub op: &'static str,
    pub map: &'static str,
    pub key: String,
    #[source]
    pub source: Box<MapError>,
}

/// A frontend's key as user space holds it: either family in the wide (IPv6) form, IPv4 as
/// `::ffff:a.b.c.d` (`lb_common::addr`). [`BpfMaps`] writes it into its family's map.
pub type FrontendKey = ServiceKey<Ip6>;
/// A backend's value as user space holds it (wide, as [`FrontendKey`]).
pub type BackendValue = Backend<Ip6>;

/// A slot table's place in the slots array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRange {
    pub offset: u32,
    pub size: u32,
}

/// The operations the sync needs; each is one map write (or, for slots, one store).
pub trait MapWriter {
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError>;
    fn put_node6(&mut self, config: NodeConfig6) -> Result<(), WriteError>;
    fn put_backend(&mut self, id: BackendId, backend: BackendValue) -> Result<(), WriteError>;
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError>;
    /// Writes `(index within the table, backend)` pairs into the table at `range`.
    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError>;
    /// Writes a whole table into a range no table used. By default slot by slot.
    fn put_table(&mut self, range: TableRange, table: &Arc<SlotTable>) -> Result<(), WriteError> {
        for (index, id) in table.iter().enumerate() {
            self.put_slots(range, &[(index as u32, id)])?;
        }
        Ok(())
    }
    fn put_service(&mut self, key: FrontendKey, entry: ServiceEntry) -> Result<(), WriteError>;
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), WriteError>;
    /// Writes source-range set `set_id` (one entry per range).
    fn put_source_ranges(&mut self, set_id: u32, ranges: &SourceRanges) -> Result<(), WriteError>;
    /// Deletes source-range set `set_id`, which holds `ranges`.
    fn delete_source_ranges(
        &mut self,
        set_id: u32,
        ranges: &SourceRanges,
    ) -> Result<(), WriteError>;
    /// Deletes the session-affinity memories `prune` selects; returns how many. The in-memory
    /// maps hold none (the packet path writes them).
    fn forget_affinity(&mut self, _prune: &AffinityPrune) -> Result<usize, WriteError> {
        Ok(0)
    }
    /// Deletes the conntrack entries of UDP flows of these (service id, backend id) pairs;
    /// returns how many. The in-memory maps hold none.
    fn forget_udp_flows(
        &mut self,
        _pairs: &HashSet<(u32, BackendId)>,
    ) -> Result<usize, WriteError> {
        Ok(0)
    }
}

/// The full contents of the service maps: what user space believes is programmed. Also the
/// in-memory [`MapWriter`] used by tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub node: NodeConfig,
    pub node6: NodeConfig6,
    pub services: BTreeMap<FrontendKey, ServiceEntry>,
    /// Every table a service points at. Shared (`Arc`) so copies of the contents are cheap; a
    /// write copies a table only if someone else holds it.
    pub tables: BTreeMap<TableRange, Arc<SlotTable>>,
    pub backends: BTreeMap<BackendId, BackendValue>,
    /// Source-range sets by id (`ServiceEntry::source_ranges_id`).
    pub source_ranges: BTreeMap<u32, SourceRanges>,
}

impl MapContents {
    /// The backend a frontend's slot `index` holds (what the packet path would read).
    pub fn slot(&self, entry: &ServiceEntry, index: u32) -> Option<BackendId> {
        let range = TableRange {
            offset: entry.table_offset,
            size: entry.table_size,
        };
        self.tables
            .get(&range)
            .and_then(|t| t.get(index as usize))
            .filter(|&id| id != NO_BACKEND)
    }
}

impl MapWriter for MapContents {
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.node = config;
        Ok(())
    }
    fn put_node6(&mut self, config: NodeConfig6) -> Result<(), WriteError> {
        self.node6 = config;
        Ok(())
    }
    fn put_backend(&mut self, id: BackendId, backend: BackendValue) -> Result<(), WriteError> {
        self.backends.insert(id, backend);
        Ok(())
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError> {
        let table = Arc::make_mut(
            self.tables
                .entry(range)
                .or_insert_with(|| Arc::new(SlotTable::filled(range.size as usize, NO_BACKEND))),
        );
        for &(index, id) in changes {
            table.set(index as usize, id);
        }
        Ok(())
    }
    /// Shares the table: the mirror and the programmer hold it once.
    fn put_table(&mut self, range: TableRange, table: &Arc<SlotTable>) -> Result<(), WriteError> {
        self.tables.insert(range, table.clone());
        Ok(())
    }
    fn put_service(&mut self, key: FrontendKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.services.insert(key, entry);
        Ok(())
    }
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), WriteError> {
        self.services.remove(&key);
        Ok(())
    }
    fn put_source_ranges(&mut self, set_id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        self.source_ranges.insert(set_id, ranges.clone());
        Ok(())
    }
    fn delete_source_ranges(
        &mut self,
        set_id: u32,
        _ranges: &SourceRanges,
    ) -> Result<(), WriteError> {
        self.source_ranges.remove(&set_id);
        Ok(())
    }
}

/// The slots array, read and written through a window of it mapped into this process: slot
/// accesses are plain memory accesses (one `bpf()` call per slot would make a 16381-slot table
/// take milliseconds), while the agent's resident memory holds at most one window of the
/// array, not all of it (mapping a BPF array faults in every page at once).
pub struct MappedSlots {
    len: u32,
    window: std::cell::RefCell<Option<Window>>,
    // Keeps the map alive as long as any mapping of it.
    map: MapData,
}

/// Slots mapped at once: 1 MiB. A first sync writes tables in offset order, so it maps each
/// part of the array once.
const WINDOW_SLOTS: u32 = 1 << 18;

/// One mapped part of the slots array.
struct Window {
    /// The first slot mapped (page-aligned) and how many.
    first: u32,
    len: u32,
    base: NonNull<AtomicU32>,
}

impl Window {
    /// Maps the `len` slots from `first` (a multiple of the slots in a page).
    fn map(map: &MapData, first: u32, len: u32) -> Result<Self, std::io::Error> {
        let bytes = len as usize * size_of::<u32>();
        // SAFETY: mapping part of a BPF array fd that was created mmap-able, at a page-aligned
        // offset inside it; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                (first as usize * size_of::<u32>()) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            first,
            len,
            base: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
        })
    }

    fn holds(&self, index: u32) -> bool {
        index >= self.first && index - self.first < self.len
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; no reference into it outlives
        // the `MappedSlots` access that made it.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.len as usize * size_of::<u32>(),
            )
        };
    }
}

// SAFETY: the mappings are shared memory accessed only through atomics, and owned by the value:
// moving it to another thread moves them along.
unsafe impl Send for Window {}

impl MappedSlots {
    /// The slots array (created with BPF_F_MMAPABLE, holding `slots` slots); maps its first
    /// window to check that it can be mapped.
    pub fn new(map: MapData, slots: u32) -> Result<Self, std::io::Error> {
        let first = Window::map(&map, 0, slots.min(WINDOW_SLOTS))?;
        Ok(Self {
            len: slots,
            window: std::cell::RefCell::new(Some(first)),
            map,
        })
    }

    pub fn slot_count(&self) -> u32 {
        self.len
    }

    /// Runs `access` on slot `index`, mapping the window that holds it if need be; `None` when
    /// the index is out of range or the window cannot be mapped.
    fn with_cell<T>(&self, index: u32, access: impl FnOnce(&AtomicU32) -> T) -> Option<T> {
        if index >= self.len {
            return None;
        }
        let mut window = self.window.borrow_mut();
        if !window.as_ref().is_some_and(|w| w.holds(index)) {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
            let first = index - index % (page / size_of::<u32>() as u32);
            let len = WINDOW_SLOTS.min(self.len - first);
            // The old window goes first, so at most one is resident.
            *window = None;
            *window = Some(Window::map(&self.map, first, len).ok()?);
        }
        let window = window.as_ref()?;
        // SAFETY: `window.holds(index)`, so the pointer stays inside the mapping, which lives
        // until this borrow ends; AtomicU32 has the layout of the u32 the kernel stores.
        let cell = unsafe { &*window.base.as_ptr().add((index - window.first) as usize) };
        Some(access(cell))
    }

    pub fn get(&self, index: u32) -> Option<BackendId> {
        self.with_cell(index, |c| c.load(Ordering::Relaxed))
    }

    pub fn set(&self, index: u32, id: BackendId) -> bool {
        self.with_cell(index, |c| c.store(id, Ordering::Release))
            .is_some()
    }
}

/// The real maps, as loaded (and pinned) by the loader.
pub struct BpfMaps {
    pub services: BpfHashMap<MapData, ServiceKey, ServiceEntry>,
    pub slots: MappedSlots,
    pub backends: BpfHashMap<MapData, BackendId, Backend>,
    pub affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    pub conntrack: BpfHashMap<MapData, FlowKey, CtEntry>,
    pub node: Array<MapData, NodeConfig>,
    pub counters: PerCpuArray<MapData, u64>,
    pub source_ranges: LpmTrie<MapData, SourceRange, SourceRangeValue>,
    pub service_stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    pub backend_stats: PerCpuHashMap<MapData, BackendId, BackendStats>,
    /// The IPv6 twins of the maps that hold an address.
    pub v6: BpfMaps6,
}

/// The IPv6 twins of the maps that hold an address (docs/design.md, "IPv6 and dual-stack").
pub struct BpfMaps6 {
    pub services: BpfHashMap<MapData, ServiceKey<Ip6>, ServiceEntry>,
    pub backends: BpfHashMap<MapData, BackendId, Backend<Ip6>>,
    pub affinity: BpfHashMap<MapData, AffinityKey<Ip6>, AffinityValue>,
    pub conntrack: BpfHashMap<MapData, FlowKey<Ip6>, CtEntry<Ip6>>,
    pub node: Array<MapData, NodeConfig6>,
    pub source_ranges: LpmTrie<MapData, SourceRange<Ip6>, SourceRangeValue>,
}

/// The LPM key of one range of a source-range set, in its family's trie.
enum SourceRangeKey {
    V4(Key<SourceRange>),
    V6(Key<SourceRange<Ip6>>),
}

fn source_range_key(set_id: u32, range: &ipnet::IpNet) -> SourceRangeKey {
    // The set id's 32 bits, then the range's prefix.
    let prefix_len = source_range_prefix_len(range.prefix_len());
    match range {
        ipnet::IpNet::V4(net) => SourceRangeKey::V4(Key::new(
            prefix_len,
            SourceRange {
                set_id,
                addr_be: addr_be(net.network().octets()),
            },
        )),
        ipnet::IpNet::V6(net) => SourceRangeKey::V6(Key::new(
            prefix_len,
            SourceRange {
                set_id,
                addr_be: ip6_be(net.network().octets()),
            },
        )),
    }
}

fn write_err(
    op: &'static str,
    map: &'static str,
    key: impl std::fmt::Debug,
) -> impl FnOnce(MapError) -> WriteError {
    move |source| WriteError {
        op,
        map,
        key: format!("{key:?}"),
        source: Box::new(source),
    }
}

/// The IPv4 key a wide one stands for, if it is IPv4.
pub(crate) fn narrow_key(key: FrontendKey) -> Option<ServiceKey> {
    narrow(key.addr_be).map(|addr_be| ServiceKey::new(addr_be, key.port_be, key.proto))
}

/// Deletes the affinity memories `prune` selects from one family's map.
fn forget_affinity_in<A: Copy + std::fmt::Debug>(
    map: &mut BpfHashMap<MapData, AffinityKey<A>, AffinityValue>,
    prune: &AffinityPrune,
    name: &'static str,
) -> Result<usize, WriteError>
where
    AffinityKey<A>: aya::Pod,
{
    let stale: Vec<AffinityKey<A>> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| prune.forgets(k.service_id, v.backend_id))
        .map(|(k, _)| k)
        .collect();
    for key in &stale {
        ignore_missing(map.remove(key)).map_err(write_err("delete", name, key))?;
    }
    Ok(stale.len())
}

/// Deleting what is already gone is fine: the goal state is reached.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        // aya reports a delete of a missing key as the syscall's ENOENT.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl BpfMaps {
    /// Reads back everything programmed, e.g. maps adopted from a previous run.
    pub fn read_contents(&self) -> Result<MapContents, MapError> {
        let mut services: BTreeMap<FrontendKey, ServiceEntry> = BTreeMap::new();
        for item in self.services.iter() {
            let (key, entry) = item?;
            services.insert(key.to_wide(), entry);
        }
        for item in self.v6.services.iter() {
            let (key, entry) = item?;
            services.insert(key, entry);
        }
        // In offset order, so each window of the slots array is mapped once.
        let ranges: BTreeSet<TableRange> = (services.values())
            .filter(|e| e.table_size > 0)
            .map(|entry| TableRange {
                offset: entry.table_offset,
                size: entry.table_size,
            })
            .collect();
        let mut tables = BTreeMap::new();
        for range in ranges {
            let table = (range.offset..range.offset + range.size)
                .map(|i| self.slots.get(i).unwrap_or(NO_BACKEND))
                .collect();
            tables.insert(range, Arc::new(table));
        }
        let mut sets: BTreeMap<u32, Vec<ipnet::IpNet>> = BTreeMap::new();
        for key in self.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
            let addr = std::net::Ipv4Addr::from(lb_common::addr_octets(data.addr_be));
            let range = ipnet::Ipv4Net::new(addr, prefix).expect("prefix clamped to 32");
            sets.entry(data.set_id).or_default().push(range.into());
        }
        for key in self.v6.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(128) as u8;
            let addr = std::net::Ipv6Addr::from(ip6_octets(data.addr_be));
            let range = ipnet::Ipv6Net::new(addr, prefix).expect("prefix clamped to 128");
            sets.entry(data.set_id).or_default().push(range.into());
        }
        let mut backends: BTreeMap<BackendId, BackendValue> = BTreeMap::new();
        for item in self.backends.iter() {
            let (id, backend) = item?;
            backends.insert(id, backend.to_wide());
        }
        for item in self.v6.backends.iter() {
            let (id, backend) = item?;
            backends.insert(id, backend);
        }
        Ok(MapContents {
            node: self.node.get(&0, 0)?,
            node6: self.v6.node.get(&0, 0)?,
            services,
            tables,
            backends,
            source_ranges: (sets.into_iter())
                .map(|(id, mut ranges)| {
                    ranges.sort_unstable();
                    (id, ranges.into())
                })
                .collect(),
        })
    }

    /// Each counter summed over all CPUs.
    pub fn read_counters(&self) -> Result<BTreeMap<Counter, u64>, MapError> {
        let mut totals = BTreeMap::new();
        for counter in Counter::ALL {
            let per_cpu = self.counters.get(&(counter as u32), 0)?;
            totals.insert(counter, per_cpu.iter().sum());
        }
        Ok(totals)
    }
}

impl MapWriter for BpfMaps {
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.node
            .set(0, config, 0)
            .map_err(write_err("write", NODE_MAP, 0))
    }
    fn put_node6(&mut self, config: NodeConfig6) -> Result<(), WriteError> {
        (self.v6.node)
            .set(0, config, 0)
            .map_err(write_err("write", lb_common::maps::NODE6_MAP, 0))
    }
    fn put_backend(&mut self, id: BackendId, backend: BackendValue) -> Result<(), WriteError> {
        match narrow(backend.addr_be) {
            Some(addr_be) => self
                .backends
                .insert(id, Backend::new(addr_be, backend.port_be, backend.flags), 0)
                .map_err(write_err("write", BACKENDS_MAP, id)),
            None => (self.v6.backends).insert(id, backend, 0).map_err(write_err(
                "write",
                BACKENDS6_MAP,
                id,
            )),
        }
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        // An id is in one family's map; deleting from both spares remembering which.
        ignore_missing(self.backends.remove(&id)).map_err(write_err("delete", BACKENDS_MAP, id))?;
        ignore_missing(self.v6.backends.remove(&id)).map_err(write_err("delete", BACKENDS6_MAP, id))
    }
    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError> {
        for &(index, id) in changes {
            if index >= range.size || !self.slots.set(range.offset + index, id) {
                return Err(write_err(
                    "write",
                    lb_common::maps::SLOTS_MAP,
                    (range, index),
                )(MapError::OutOfBounds {
                    index: range.offset + index,
                    max_entries: self.slots.slot_count(),
                }));
            }
        }
        Ok(())
    }
    fn put_service(&mut self, key: FrontendKey, entry: ServiceEntry) -> Result<(), WriteError> {
        match narrow_key(key) {
            Some(key4) => (self.services).insert(key4, entry, 0).map_err(write_err(
                "write",
                SERVICES_MAP,
                key4,
            )),
            None => (self.v6.services).insert(key, entry, 0).map_err(write_err(
                "write",
                SERVICES6_MAP,
                key,
            )),
        }
    }
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), WriteError> {
        match narrow_key(key) {
            Some(key4) => ignore_missing(self.services.remove(&key4)).map_err(write_err(
                "delete",
                SERVICES_MAP,
                key4,
            )),
            None => ignore_missing(self.v6.services.remove(&key)).map_err(write_err(
                "delete",
                SERVICES6_MAP,
                key,
            )),
        }
    }
    fn put_source_ranges(&mut self, set_id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        for range in ranges.iter() {
            match source_range_key(set_id, range) {
                SourceRangeKey::V4(key) => (self.source_ranges).insert(&key, SOURCE_RANGE_ALLOW, 0),
                SourceRangeKey::V6(key) => {
                    (self.v6.source_ranges).insert(&key, SOURCE_RANGE_ALLOW, 0)
                }
            }
            .map_err(write_err("write", SOURCE_RANGES_MAP, (set_id, range)))?;
        }
        Ok(())
    }
    fn delete_source_ranges(
        &mut self,
        set_id: u32,
        ranges: &SourceRanges,
    ) -> Result<(), WriteError> {
        for range in ranges.iter() {
            ignore_missing(match source_range_key(set_id, range) {
                SourceRangeKey::V4(key) => self.source_ranges.remove(&key),
                SourceRangeKey::V6(key) => self.v6.source_ranges.remove(&key),
            })
            .map_err(write_err("delete", SOURCE_RANGES_MAP, (set_id, range)))?;
        }
        Ok(())
    }
    fn forget_affinity(&mut self, prune: &AffinityPrune) -> Result<usize, WriteError> {
        let forgotten = forget_affinity_in(&mut self.affinity, prune, AFFINITY_MAP)?;
        Ok(forgotten + forget_affinity_in(&mut self.v6.affinity, prune, AFFINITY6_MAP)?)
    }
    fn forget_udp_flows(&mut self, pairs: &HashSet<(u32, BackendId)>) -> Result<usize, WriteError> {
        use aya::maps::IterableMap as _;
        let failed = |map: &'static str| {
            move |io_error| {
                write_err("purge UDP flows from", map, pairs.len())(MapError::SyscallError(
                    aya::sys::SyscallError {
                        call: "bpf_map_delete_batch",
                        io_error,
                    },
                ))
            }
        };
        let purged = crate::conntrack::purge_udp::<u32>(self.conntrack.map().fd().as_fd(), pairs)
            .map_err(failed(CONNTRACK_MAP))?;
        Ok(purged
            + crate::conntrack::purge_udp::<Ip6>(self.v6.conntrack.map().fd().as_fd(), pairs)
                .map_err(failed(CONNTRACK6_MAP))?)
    }
}
