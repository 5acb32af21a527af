//! Map names, capacities and the pin layout: the contract between the object file and the agent.

/// Pinned maps live in `<bpffs dir>/<PIN_LAYOUT_VERSION>/`. Bump it whenever a map's key, value
/// or type changes, so a new agent never adopts maps of an incompatible layout.
pub const PIN_LAYOUT_VERSION: &str = "v3";
/// Layouts an agent of this version migrates from (their conntrack is carried over).
pub const PREVIOUS_PIN_LAYOUT_VERSION: &str = "v2";
/// Under the layout directory: one pinned bpf_link per attached program, so the packet path
/// keeps running while no agent does.
pub const LINKS_DIR: &str = "links";

pub const SERVICES_MAP: &str = "LB_SERVICES";
pub const SLOTS_MAP: &str = "LB_SLOTS";
pub const BACKENDS_MAP: &str = "LB_BACKENDS";
pub const CONNTRACK_MAP: &str = "LB_CONNTRACK";
pub const AFFINITY_MAP: &str = "LB_AFFINITY";
pub const NODE_MAP: &str = "LB_NODE";
pub const COUNTERS_MAP: &str = "LB_COUNTERS";
pub const SOURCE_RANGES_MAP: &str = "LB_SOURCE_RANGES";
// IPv6 twins of the maps keyed or valued by an address (docs/design.md, "IPv6 and dual-stack");
// slots, entries' ids, counters and the monitor are common to both families.
pub const SERVICES6_MAP: &str = "LB_SERVICES6";
pub const BACKENDS6_MAP: &str = "LB_BACKENDS6";
pub const CONNTRACK6_MAP: &str = "LB_CONNTRACK6";
pub const AFFINITY6_MAP: &str = "LB_AFFINITY6";
/// The node's IPv6 SNAT address (`service::NodeConfig6`), one entry.
pub const NODE6_MAP: &str = "LB_NODE6";
pub const SOURCE_RANGES6_MAP: &str = "LB_SOURCE_RANGES6";
/// IPv6 runs in tail-called stages, each with a fresh stack (docs/design.md, "IPv6 and
/// dual-stack"): the program arrays the entry points jump through, tc's and XDP's, and which
/// program (by function name) the agent puts at which index.
pub const TC_STAGES_MAP: &str = "LB_TC_STAGES";
pub const XDP_STAGES_MAP: &str = "LB_XDP_STAGES";
/// tc: an IPv6 packet's path (conntrack, translate, record); a new flow, an ICMPv6 error go on
/// to their own stage.
pub const STAGE_IPV6: u32 = 0;
/// tc: an IPv6 new flow (source ranges, backend, SNAT, conntrack entries), then back to
/// [`STAGE_IPV6`], which applies its entry as any known flow's; one without a backend goes on
/// to [`STAGE_IPV6_REJECT`] when its frontend rejects.
pub const STAGE_IPV6_NEW_FLOW: u32 = 1;
/// tc: an ICMPv6 error about a translated flow, rewritten.
pub const STAGE_IPV6_ICMP: u32 = 2;
/// tc: a new flow to a frontend without backends answered (TCP RST, ICMPv6 port unreachable).
pub const STAGE_IPV6_REJECT: u32 = 3;
/// Slots in each stage array (room for stages to come without a new layout).
pub const STAGE_SLOTS: u32 = 8;
pub const TC_STAGE_PROGRAMS: [(&str, u32); 4] = [
    ("lb_tc_ipv6", STAGE_IPV6),
    ("lb_tc_ipv6_new_flow", STAGE_IPV6_NEW_FLOW),
    ("lb_tc_ipv6_icmp", STAGE_IPV6_ICMP),
    ("lb_tc_ipv6_reject", STAGE_IPV6_REJECT),
];
/// XDP: an IPv6 frame's fast path (known flows only; tc starts new ones).
pub const XDP_STAGE_PROGRAMS: [(&str, u32); 1] = [("lb_xdp_ipv6", STAGE_IPV6)];
/// Per-frontend traffic counters (`stats::ServiceStats`), per CPU, keyed by service id; as many
/// as LB_SERVICES holds.
pub const SERVICE_STATS_MAP: &str = "LB_SERVICE_STATS";
/// Per-backend traffic counters (`stats::BackendStats`), per CPU, keyed by backend id; as many
/// as LB_BACKENDS holds.
pub const BACKEND_STATS_MAP: &str = "LB_BACKEND_STATS";
/// The monitor's switch and rate (`stats::MonitorConfig`), one entry.
pub const MONITOR_MAP: &str = "LB_MONITOR";
/// Each CPU's monitor budget for the current second (`stats::MonitorBudget`).
pub const MONITOR_BUDGET_MAP: &str = "LB_MONITOR_BUDGET";
/// The monitor's ring buffer of `stats::MonitorEvent`s.
pub const EVENTS_MAP: &str = "LB_EVENTS";
/// The ring buffer's size: 5,461 events; `lb monitor` drains it many times a second.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

// Capacities: the object file's maps are built with the defaults below; the agent sets each
// sized map's capacity at load (its flags, see `Capacities`), and a map already pinned keeps its
// own.

/// Frontends (service address x port x protocol), by default.
pub const MAX_SERVICES: u32 = 65_536;
/// Maglev slots over all tables, by default: 8M (32 MiB of backend ids), room for 10,000
/// Services of up to seven backends at 100 slots each, or 33,000 of two.
pub const MAX_SLOTS: u32 = 1 << 23;
/// The kernel stores array elements 8-byte aligned, so the slots array packs two `u32` backend
/// ids per element: slot `i` is lane `i % 2` of element `i / 2`, and the memory user space maps
/// is exactly one `u32` per slot.
pub const SLOTS_PER_ELEMENT: u32 = 2;
/// Distinct backend endpoints, by default (id 0 is never used).
pub const MAX_BACKENDS: u32 = 262_144;
/// Conntrack entries, by default: two per translated flow, so 1M flows.
pub const MAX_CONNTRACK: u32 = 2 * 1_048_576;
/// IPv6 conntrack entries, by default: 256K flows. An LRU map allocates all of its entries
/// when created, and an IPv6 entry takes 144 bytes of kernel memory against IPv4's 96, so the
/// IPv6 table starts at a quarter of the IPv4 one (72 MiB, not 288); `--max-conntrack-flows-v6`
/// sets it.
pub const MAX_CONNTRACK6: u32 = 2 * 262_144;
/// Clients remembered for `sessionAffinity: ClientIP`, by default.
pub const MAX_AFFINITY: u32 = 131_072;

/// Source ranges (set x CIDR) over all Services. Not a flag: the LPM trie allocates per entry,
/// so unused capacity costs nothing, and sets are shared by every Service with the same ranges.
pub const MAX_SOURCE_RANGES: u32 = 1 << 20;

/// How many entries each sized map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// LB_SERVICES entries (frontends).
    pub frontends: u32,
    /// LB_BACKENDS entries.
    pub backends: u32,
    /// Maglev slots in LB_SLOTS (a multiple of [`SLOTS_PER_ELEMENT`]).
    pub slots: u32,
    /// LB_CONNTRACK entries (two per flow).
    pub conntrack: u32,
    /// LB_CONNTRACK6 entries (two per flow). The other IPv6 maps take their IPv4 twin's
    /// capacity: they allocate per entry, so room costs nothing until it is used.
    pub conntrack6: u32,
    /// LB_AFFINITY entries.
    pub affinity: u32,
}

impl Capacities {
    pub const DEFAULT: Self = Self {
        frontends: MAX_SERVICES,
        backends: MAX_BACKENDS,
        slots: MAX_SLOTS,
        conntrack: MAX_CONNTRACK,
        conntrack6: MAX_CONNTRACK6,
        affinity: MAX_AFFINITY,
    };

    /// The counter maps' capacities follow the maps they count for: one per frontend, one per
    /// backend. (Not resized with them: a pinned counter map of another size is replaced, its
    /// counts starting again from zero.)
    pub fn stats_max_entries(&self) -> [(&'static str, u32); 2] {
        [
            (SERVICE_STATS_MAP, self.frontends),
            (BACKEND_STATS_MAP, self.backends),
        ]
    }

    /// Each sized map's name and its capacity in map elements (the slots array holds
    /// [`SLOTS_PER_ELEMENT`] slots an element).
    pub fn max_entries(&self) -> [(&'static str, u32); 9] {
        [
            (SERVICES_MAP, self.frontends),
            (BACKENDS_MAP, self.backends),
            (SLOTS_MAP, self.slots / SLOTS_PER_ELEMENT),
            (CONNTRACK_MAP, self.conntrack),
            (AFFINITY_MAP, self.affinity),
            (SERVICES6_MAP, self.frontends),
            (BACKENDS6_MAP, self.backends),
            (CONNTRACK6_MAP, self.conntrack6),
            (AFFINITY6_MAP, self.affinity),
        ]
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// tc ingress on pod-facing interfaces.
pub const POD_INGRESS_PROGRAM: &str = "lb_pod_ingress";
/// tc ingress on external interfaces: NodePort, LoadBalancer, externalIPs, replies from
/// other nodes.
pub const EXTERNAL_INGRESS_PROGRAM: &str = "lb_external_ingress";
/// tc egress on external interfaces: the node's own processes reaching Services.
pub const HOST_EGRESS_PROGRAM: &str = "lb_host_egress";
/// XDP on external interfaces (optional): the external-ingress fast path.
pub const EXTERNAL_XDP_PROGRAM: &str = "lb_external_xdp";
