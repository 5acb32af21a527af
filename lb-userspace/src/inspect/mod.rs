//! The operator's views of a running node, read from the pinned maps (what the packet path
//! really uses) and named with the agent's state file: `lb services`, `lb explain`, `lb
//! conntrack`, `lb monitor` and the per-Service metrics. Nothing here needs the agent running
//! or API access; nothing here writes a map the packet path decides by (only `--flush` deletes
//! conntrack entries, and the monitor switches its own events on).

pub mod conntrack;
pub mod explain;
pub mod monitor;
pub mod services;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapInfo, PerCpuHashMap,
        lpm_trie::Key,
    },
};
use lb_common::{
    Ip6,
    conntrack::{CtEntry, FlowKey},
    maps::{
        AFFINITY_MAP, AFFINITY6_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, BACKENDS6_MAP, CONNTRACK_MAP,
        CONNTRACK6_MAP, NODE_MAP, NODE6_MAP, PIN_LAYOUT_VERSION, SERVICE_STATS_MAP, SERVICES_MAP,
        SERVICES6_MAP, SLOTS_MAP, SLOTS_PER_ELEMENT, SOURCE_RANGES_MAP, SOURCE_RANGES6_MAP,
    },
    service::{
        AffinityKey, AffinityValue, Backend, BackendId, NodeConfig, NodeConfig6,
        SOURCE_RANGE_LOOKUP_BITS as LOOKUP_BITS, ServiceEntry, ServiceKey, SourceRange,
        SourceRangeValue,
    },
    stats::{BackendStats, ServiceStats},
};

use crate::{
    dataplane::{BackendValue, FrontendKey, MappedSlots},
    state::NodeState,
};

/// The pinned maps of one node, opened for reading.
pub struct PinnedMaps {
    pub pin_dir: PathBuf,
    pub services: HashMap<MapData, ServiceKey, ServiceEntry>,
    pub backends: HashMap<MapData, BackendId, Backend>,
    pub slots: MappedSlots,
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub node: Array<MapData, NodeConfig>,
    pub source_ranges: LpmTrie<MapData, SourceRange, SourceRangeValue>,
    /// The IPv6 twins; absent when pinned by an lb without IPv6.
    pub services6: Option<HashMap<MapData, ServiceKey<Ip6>, ServiceEntry>>,
    pub backends6: Option<HashMap<MapData, BackendId, Backend<Ip6>>>,
    pub conntrack6: Option<HashMap<MapData, FlowKey<Ip6>, CtEntry<Ip6>>>,
    pub affinity6: Option<HashMap<MapData, AffinityKey<Ip6>, AffinityValue>>,
    pub node6: Option<Array<MapData, NodeConfig6>>,
    pub source_ranges6: Option<LpmTrie<MapData, SourceRange<Ip6>, SourceRangeValue>>,
    /// Absent when pinned by an lb without per-Service counters.
    pub service_stats: Option<PerCpuHashMap<MapData, u32, ServiceStats>>,
    pub backend_stats: Option<PerCpuHashMap<MapData, BackendId, BackendStats>>,
}

/// An address family's field type (`u32`, `Ip6`) with its pinned maps: `lb explain` follows
/// the packet path once, for either family. A map of a family is absent when an lb without
/// that family pinned the maps.
pub trait MapFamily: lb_common::Address + Eq + std::fmt::Debug {
    fn service(maps: &PinnedMaps, key: &ServiceKey<Self>) -> Option<ServiceEntry>;
    fn backend(maps: &PinnedMaps, id: BackendId) -> Option<Backend<Self>>;
    fn conntrack_entry(maps: &PinnedMaps, key: &FlowKey<Self>) -> Option<CtEntry<Self>>;
    fn affinity_entry(maps: &PinnedMaps, key: &AffinityKey<Self>) -> Option<AffinityValue>;
    /// Whether `addr_be` lies in a range of source-range set `set_id` (the packet path's LPM
    /// lookup: the set id and the whole address).
    fn source_allowed(maps: &PinnedMaps, set_id: u32, addr_be: Self) -> bool;
    /// The node's SNAT address of this family.
    fn snat_addr(maps: &PinnedMaps) -> Self;
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
}

/// The lookups of [`MapFamily`] on one family's maps (each an `Option<&map>`).
macro_rules! family_lookups {
    ($m:ident => $services:expr, $backends:expr, $conntrack:expr, $affinity:expr,
     $ranges:expr, $lookup_bits:expr) => {
        fn service($m: &PinnedMaps, key: &ServiceKey<Self>) -> Option<ServiceEntry> {
            $services?.get(key, 0).ok()
        }
        fn backend($m: &PinnedMaps, id: BackendId) -> Option<Backend<Self>> {
            $backends?.get(&id, 0).ok()
        }
        fn conntrack_entry($m: &PinnedMaps, key: &FlowKey<Self>) -> Option<CtEntry<Self>> {
            $conntrack?.get(key, 0).ok()
        }
        fn affinity_entry($m: &PinnedMaps, key: &AffinityKey<Self>) -> Option<AffinityValue> {
            $affinity?.get(key, 0).ok()
        }
        fn source_allowed($m: &PinnedMaps, set_id: u32, addr_be: Self) -> bool {
            let key = Key::new($lookup_bits, SourceRange { set_id, addr_be });
            $ranges.is_some_and(|trie| trie.get(&key, 0).is_ok())
        }
    };
}

impl MapFamily for u32 {
    family_lookups!(m => Some(&m.services), Some(&m.backends), Some(&m.conntrack),
        Some(&m.affinity), Some(&m.source_ranges), LOOKUP_BITS);
    fn snat_addr(maps: &PinnedMaps) -> Self {
        maps.node_config().snat_addr_be
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) => Some(lb_common::addr_be(v4.octets())),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::from(lb_common::addr_octets(self))
    }
}

impl MapFamily for Ip6 {
    family_lookups!(m => m.services6.as_ref(), m.backends6.as_ref(), m.conntrack6.as_ref(),
        m.affinity6.as_ref(), m.source_ranges6.as_ref(),
        lb_common::service::SOURCE_RANGE_LOOKUP_BITS6);
    fn snat_addr(maps: &PinnedMaps) -> Self {
        (maps.node6.as_ref())
            .and_then(|node| node.get(&0, 0).ok())
            .map_or([0; 4], |n| n.snat_addr_be)
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(v6) => Some(lb_common::addr::ip6_be(v6.octets())),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::from(lb_common::addr::ip6_octets(self))
    }
}

fn open<T: TryFrom<Map>>(pin_dir: &Path, name: &str) -> anyhow::Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is an agent running, or did one run, with this --bpffs-dir?)",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("opening {}", path.display()))?;
    T::try_from(map).with_context(|| format!("{} is not the map this lb expects", path.display()))
}

impl PinnedMaps {
    /// Opens the maps an agent pinned under `<bpffs_dir>/<layout version>/`.
    pub fn open(bpffs_dir: &Path) -> anyhow::Result<Self> {
        let pin_dir = bpffs_dir.join(PIN_LAYOUT_VERSION);
        let slots_path = pin_dir.join(SLOTS_MAP);
        let elements = MapInfo::from_pin(&slots_path)
            .with_context(|| format!("opening {}", slots_path.display()))?
            .max_entries();
        let slots_data = MapData::from_pin(&slots_path)
            .with_context(|| format!("opening {}", slots_path.display()))?;
        Ok(Self {
            services: open(&pin_dir, SERVICES_MAP)?,
            backends: open(&pin_dir, BACKENDS_MAP)?,
            slots: MappedSlots::new(slots_data, elements * SLOTS_PER_ELEMENT)
                .with_context(|| format!("mapping {}", slots_path.display()))?,
            conntrack: open(&pin_dir, CONNTRACK_MAP)?,
            affinity: open(&pin_dir, AFFINITY_MAP)?,
            node: open(&pin_dir, NODE_MAP)?,
            source_ranges: open(&pin_dir, SOURCE_RANGES_MAP)?,
            services6: open(&pin_dir, SERVICES6_MAP).ok(),
            backends6: open(&pin_dir, BACKENDS6_MAP).ok(),
            conntrack6: open(&pin_dir, CONNTRACK6_MAP).ok(),
            affinity6: open(&pin_dir, AFFINITY6_MAP).ok(),
            node6: open(&pin_dir, NODE6_MAP).ok(),
            source_ranges6: open(&pin_dir, SOURCE_RANGES6_MAP).ok(),
            service_stats: open(&pin_dir, SERVICE_STATS_MAP).ok(),
            backend_stats: open(&pin_dir, BACKEND_STATS_MAP).ok(),
            pin_dir,
        })
    }

    /// Every frontend of both families (wide keys: IPv4 as `::ffff:a.b.c.d`), read in batches.
    pub fn all_services(&self) -> Vec<(FrontendKey, ServiceEntry)> {
        use std::os::fd::AsFd as _;
        let v4: Vec<(ServiceKey, ServiceEntry)> =
            crate::bpf_sys::lookup_all(self.services.map().fd().as_fd()).unwrap_or_default();
        let mut all: Vec<(FrontendKey, ServiceEntry)> = (v4.into_iter())
            .map(|(key, entry)| (key.to_wide(), entry))
            .collect();
        if let Some(v6) = &self.services6 {
            all.extend(
                crate::bpf_sys::lookup_all::<FrontendKey, ServiceEntry>(v6.map().fd().as_fd())
                    .unwrap_or_default(),
            );
        }
        all
    }

    /// Every backend of both families (wide), read in batches.
    pub fn all_backends(&self) -> BTreeMap<BackendId, BackendValue> {
        use std::os::fd::AsFd as _;
        let v4: Vec<(BackendId, Backend)> =
            crate::bpf_sys::lookup_all(self.backends.map().fd().as_fd()).unwrap_or_default();
        let mut all: BTreeMap<BackendId, BackendValue> = (v4.into_iter())
            .map(|(id, backend)| (id, backend.to_wide()))
            .collect();
        if let Some(v6) = &self.backends6 {
            all.extend(
                crate::bpf_sys::lookup_all::<BackendId, BackendValue>(v6.map().fd().as_fd())
                    .unwrap_or_default(),
            );
        }
        all
    }

    /// The backend id in slot `index` (0 = none written), as the packet path reads it.
    pub fn slot(&self, index: u32) -> Option<BackendId> {
        self.slots.get(index).filter(|id| *id != 0)
    }

    pub fn node_config(&self) -> NodeConfig {
        self.node.get(&0, 0).unwrap_or_default()
    }

    /// Every frontend's counters, summed over CPUs.
    pub fn service_stats(&self) -> BTreeMap<u32, ServiceStats> {
        summed(self.service_stats.as_ref(), ServiceStats::add)
    }

    /// Every backend's counters, summed over CPUs.
    pub fn backend_stats(&self) -> BTreeMap<BackendId, BackendStats> {
        summed(self.backend_stats.as_ref(), BackendStats::add)
    }
}

fn summed<V: Pod + Default>(
    map: Option<&PerCpuHashMap<MapData, u32, V>>,
    add: fn(&mut V, &V),
) -> BTreeMap<u32, V> {
    let mut out = BTreeMap::new();
    let Some(map) = map else {
        return out;
    };
    for (id, per_cpu) in map.iter().flatten() {
        let mut total = V::default();
        for value in per_cpu.iter() {
            add(&mut total, value);
        }
        out.insert(id, total);
    }
    out
}

/// `IP:PORT` of a wire-order address and port.
pub fn endpoint_text(addr_be: u32, port_be: u16) -> String {
    wide_endpoint_text(lb_common::Address::to_wide(addr_be), port_be)
}

/// `address:port` (IPv6 in brackets) of an address field that holds either family.
pub fn wide_endpoint_text(addr: lb_common::Ip6, port_be: u16) -> String {
    std::net::SocketAddr::new(lb_common::addr::ip_from_wide(addr), u16::from_be(port_be))
        .to_string()
}

/// `namespace/name (kind)` of each programmed frontend, by service id (empty without a state
/// file).
pub fn service_names(maps: &PinnedMaps, state: Option<&NodeState>) -> BTreeMap<u32, String> {
    let Some(state) = state else {
        return BTreeMap::new();
    };
    let index = state.frontend_index();
    maps.all_services()
        .into_iter()
        .filter_map(|(key, entry)| {
            let (s, f) = index.get(&key)?;
            Some((
                entry.service_id,
                format!("{}/{} ({})", s.namespace, s.name, f.kind),
            ))
        })
        .collect()
}

/// A flow's state in words, from its conntrack entry.
pub fn flow_state<A>(entry: &CtEntry<A>, proto: u8) -> &'static str {
    use lb_common::conntrack::{CT_S_FIN_FORWARD, CT_S_FIN_REPLY, CT_S_REPLIED, CT_S_RST};
    if proto != lb_common::IPPROTO_TCP {
        return if entry.state & CT_S_REPLIED != 0 {
            "replied"
        } else {
            "unreplied"
        };
    }
    if entry.state & CT_S_RST != 0 {
        "reset"
    } else if entry.state & (CT_S_FIN_FORWARD | CT_S_FIN_REPLY) != 0 {
        "closing"
    } else if entry.state & CT_S_REPLIED != 0 {
        "established"
    } else {
        "handshake"
    }
}

pub use crate::conntrack::monotonic_ns;

/// How the CLI prints a view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people.
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `table` for the table.
pub fn print<T: serde::Serialize>(
    format: Format,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let text = match format {
        Format::Table => table(value),
        Format::Json => serde_json::to_string_pretty(value)?,
        Format::Yaml => serde_yaml_ng::to_string(value)?,
    };
    println!("{}", text.trim_end());
    Ok(())
}

/// A table in the CLI's style, with `header`.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header);
    table
}
