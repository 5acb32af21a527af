//! The maps the packet path reads (and the conntrack, affinity and counters it writes). Layouts,
//! names and capacities come from lb-common so user space sees exactly the same maps.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use lb_common::{
    Ip6,
    conntrack::{CtEntry, FlowKey},
    counters::{COUNTER_SLOTS, Counter},
    maps::{
        EVENTS_RING_BYTES, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_CONNTRACK6, MAX_SERVICES,
        MAX_SLOTS, MAX_SOURCE_RANGES, SLOTS_PER_ELEMENT,
    },
    service::{
        AffinityKey, AffinityValue, Backend, BackendId, NO_BACKEND, NodeConfig, NodeConfig6,
        ServiceEntry, ServiceKey, SourceRange, SourceRangeValue,
    },
    stats::{BackendStats, MonitorBudget, MonitorConfig, ServiceStats},
};

// Hash maps written by user space use BPF_F_NO_PREALLOC: an update then swaps in a new element
// and frees the old one after an RCU grace period, so a concurrent lookup sees the old or the new
// value, never a half-written one. Slots are single u32s, written atomically in place.

#[map(name = "LB_SERVICES")]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceEntry> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Every frontend's Maglev table, back to back, two slots per element; user space writes it
/// through mmap.
#[map(name = "LB_SLOTS")]
pub static LB_SLOTS: Array<[BackendId; SLOTS_PER_ELEMENT as usize]> =
    Array::pinned(MAX_SLOTS / SLOTS_PER_ELEMENT, BPF_F_MMAPABLE);

#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: HashMap<BackendId, Backend> =
    HashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "LB_CONNTRACK")]
pub static LB_CONNTRACK: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(MAX_CONNTRACK, 0);

#[map(name = "LB_AFFINITY")]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(MAX_AFFINITY, 0);

#[map(name = "LB_NODE")]
pub static LB_NODE: Array<NodeConfig> = Array::pinned(1, 0);

#[map(name = "LB_COUNTERS")]
pub static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// `loadBalancerSourceRanges`: set id x CIDR, written by user space before any frontend names
/// the set (LPM tries always allocate per entry).
#[map(name = "LB_SOURCE_RANGES")]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRange, SourceRangeValue> =
    LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

// The IPv6 twins (`family::Family` picks a packet's maps).

#[map(name = "LB_SERVICES6")]
pub static LB_SERVICES6: HashMap<ServiceKey<Ip6>, ServiceEntry> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "LB_BACKENDS6")]
pub static LB_BACKENDS6: HashMap<BackendId, Backend<Ip6>> =
    HashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "LB_CONNTRACK6")]
pub static LB_CONNTRACK6: LruHashMap<FlowKey<Ip6>, CtEntry<Ip6>> =
    LruHashMap::pinned(MAX_CONNTRACK6, 0);

#[map(name = "LB_AFFINITY6")]
pub static LB_AFFINITY6: LruHashMap<AffinityKey<Ip6>, AffinityValue> =
    LruHashMap::pinned(MAX_AFFINITY, 0);

#[map(name = "LB_NODE6")]
pub static LB_NODE6: Array<NodeConfig6> = Array::pinned(1, 0);

#[map(name = "LB_SOURCE_RANGES6")]
pub static LB_SOURCE_RANGES6: LpmTrie<SourceRange<Ip6>, SourceRangeValue> =
    LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

/// A new flow's entries and keys while it is set up, one per CPU and family: built here rather
/// than on the stack, where IPv6's (two 56-byte entries, two 40-byte keys) do not fit beside the
/// rest of the path. A program run is never interrupted by another on its CPU, so each run has
/// its CPU's entry to itself. Not pinned: nothing outlives the run.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NewFlowScratch<A> {
    /// The reply direction's key, as a port is tried for it.
    pub reply_key: FlowKey<A>,
    /// The reply direction's entry.
    pub reply: CtEntry<A>,
    /// The forward direction's entry.
    pub forward: CtEntry<A>,
    /// The partner of an entry found at `reply_key`.
    pub partner_key: FlowKey<A>,
}

#[map(name = "LB_NEW_FLOW4")]
pub static LB_NEW_FLOW4: PerCpuArray<NewFlowScratch<u32>> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "LB_NEW_FLOW6")]
pub static LB_NEW_FLOW6: PerCpuArray<NewFlowScratch<Ip6>> = PerCpuArray::with_max_entries(1, 0);

/// Per-frontend counters by service id; an entry is created by the frontend's first packet and
/// deleted by user space once the frontend is gone.
#[map(name = "LB_SERVICE_STATS")]
pub static LB_SERVICE_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Per-backend counters by backend id, kept like the frontends'.
#[map(name = "LB_BACKEND_STATS")]
pub static LB_BACKEND_STATS: PerCpuHashMap<BackendId, BackendStats> =
    PerCpuHashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Whether `lb monitor` listens, and how many events a second it takes.
#[map(name = "LB_MONITOR")]
pub static LB_MONITOR: Array<MonitorConfig> = Array::pinned(1, 0);

#[map(name = "LB_MONITOR_BUDGET")]
pub static LB_MONITOR_BUDGET: PerCpuArray<MonitorBudget> = PerCpuArray::pinned(1, 0);

#[map(name = "LB_EVENTS")]
pub static LB_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// Adds one to this CPU's slot of `counter`. Per-CPU, so a plain increment cannot race.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = LB_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and stays valid for this
        // program run; no other CPU touches this CPU's slot.
        unsafe { *slot += 1 };
    }
}

/// Copies a value out of a hash map so the caller never holds a reference into a map element.
#[inline(always)]
pub fn lookup<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: the reference is only read, immediately copied, and not kept past this call.
    unsafe { map.get(key).copied() }
}

#[inline(always)]
pub fn lookup_lru<K, V: Copy>(map: &LruHashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: as in `lookup`: read once and copied out.
    unsafe { map.get(key).copied() }
}

/// The backend id in slot `index` of the slots array, if one was written.
#[inline(always)]
pub fn slot(index: u32) -> Option<BackendId> {
    let pair = LB_SLOTS.get(index / SLOTS_PER_ELEMENT)?;
    let id = if index % SLOTS_PER_ELEMENT == 0 {
        pair[0]
    } else {
        pair[1]
    };
    (id != NO_BACKEND).then_some(id)
}

/// The node settings (all zero until the agent writes them).
#[inline(always)]
pub fn node_config() -> NodeConfig {
    LB_NODE.get(0).copied().unwrap_or_default()
}

/// The node's IPv6 settings (all zero until the agent writes them).
#[inline(always)]
pub fn node_config6() -> NodeConfig6 {
    LB_NODE6.get(0).copied().unwrap_or_default()
}
