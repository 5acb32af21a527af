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
    Ip6, addr_be,
    conntrack::{CtEntry, FlowKey},
    counters::Counter,
    maps::{NODE_MAP, SOURCE_RANGES_MAP},
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

/// A slot table's place in the slots array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRange {
    pub offset: u32,
    pub size: u32,
}

/// The operations the sync needs; each is one map write (or, for slots, one store).
pub trait MapWriter {
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError>;
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError>;
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
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError>;
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
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
    /// Every table a service points at. Shared (`Arc`) so copies of the contents are cheap; a
    /// write copies a table only if someone else holds it.
    pub tables: BTreeMap<TableRange, Arc<SlotTable>>,
    pub backends: BTreeMap<BackendId, Backend>,
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
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
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
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.services.insert(key, entry);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
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

/// The LPM key of one range of a source-range set.
fn source_range_key(set_id: u32, range: &ipnet::Ipv4Net) -> Key<SourceRange> {
    Key::new(
        source_range_prefix_len(range.prefix_len()),
        SourceRange {
            set_id,
            addr_be: addr_be(range.network().octets()),
        },
    )
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

/// Deleting what is already gone is fine: the goal state is reached.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl BpfMaps {
    /// Reads back everything programmed, e.g. maps adopted from a previous run.
    pub fn read_contents(&self) -> Result<MapContents, MapError> {
        let services: BTreeMap<ServiceKey, ServiceEntry> =
            self.services.iter().collect::<Result<_, _>>()?;
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
        let mut sets: BTreeMap<u32, Vec<ipnet::Ipv4Net>> = BTreeMap::new();
        for key in self.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
            let addr = std::net::Ipv4Addr::from(lb_common::addr_octets(data.addr_be));
            let range = ipnet::Ipv4Net::new(addr, prefix).expect("prefix clamped to 32");
            sets.entry(data.set_id).or_default().push(range);
        }
        Ok(MapContents {
            node: self.node.get(&0, 0)?,
            services,
            tables,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
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
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
        self.backends.insert(id, backend, 0).map_err(write_err(
            "write",
            lb_common::maps::BACKENDS_MAP,
            id,
        ))
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        ignore_missing(self.backends.remove(&id)).map_err(write_err(
            "delete",
            lb_common::maps::BACKENDS_MAP,
            id,
        ))
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
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.services.insert(key, entry, 0).map_err(write_err(
            "write",
            lb_common::maps::SERVICES_MAP,
            key,
        ))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        ignore_missing(self.services.remove(&key)).map_err(write_err(
            "delete",
            lb_common::maps::SERVICES_MAP,
            key,
        ))
    }
    fn put_source_ranges(&mut self, set_id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        for range in ranges.iter() {
            (self.source_ranges)
                .insert(&source_range_key(set_id, range), SOURCE_RANGE_ALLOW, 0)
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
            ignore_missing(self.source_ranges.remove(&source_range_key(set_id, range)))
                .map_err(write_err("delete", SOURCE_RANGES_MAP, (set_id, range)))?;
        }
        Ok(())
    }
    fn forget_affinity(&mut self, prune: &AffinityPrune) -> Result<usize, WriteError> {
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| prune.forgets(k.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            ignore_missing(self.affinity.remove(key)).map_err(write_err(
                "delete",
                lb_common::maps::AFFINITY_MAP,
                key,
            ))?;
        }
        Ok(stale.len())
    }
    fn forget_udp_flows(&mut self, pairs: &HashSet<(u32, BackendId)>) -> Result<usize, WriteError> {
        use aya::maps::IterableMap as _;
        crate::conntrack::purge_udp(self.conntrack.map().fd().as_fd(), pairs).map_err(|io_error| {
            write_err(
                "purge UDP flows from",
                lb_common::maps::CONNTRACK_MAP,
                pairs.len(),
            )(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_batch",
                io_error,
            }))
        })
    }
}
