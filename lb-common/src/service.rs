//! Service frontends, their backend slot tables, and backends.
//!
//! A lookup on the packet path goes `ServiceKey -> ServiceEntry`, then slot
//! `table_offset + flow_hash % table_size` of the slots array (a Maglev table) -> `BackendId`,
//! then `BackendId -> Backend`. User space decides what every slot holds; the packet path only
//! reads.

use crate::{Ip6, conntrack::CtTimeouts, user_pod};

/// A frontend: the address, port and protocol a client sends to (e.g. a ClusterIP port). `A` is
/// the family's address field, as in [`crate::conntrack::FlowKey`]: each family has its own
/// frontends map; the entries, the slots and the ids are common to both.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A = u32> {
    pub addr_be: A,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey<Ip6>>() == 20);

impl<A: Copy> ServiceKey<A> {
    pub const fn new(addr_be: A, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            proto,
            _pad: 0,
        }
    }

    /// The key in the wide form (IPv4 as `::ffff:a.b.c.d`), as user space holds either family.
    pub fn to_wide(&self) -> ServiceKey<Ip6>
    where
        A: crate::Address,
    {
        ServiceKey::new(self.addr_be.to_wide(), self.port_be, self.proto)
    }
}

/// What a frontend translates to. Written after its slot table is complete, so the packet path
/// never sees a table that is only partly written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    /// Identifies the frontend in the conntrack and the affinity map.
    pub service_id: u32,
    /// First slot of this frontend's Maglev table in the slots array.
    pub table_offset: u32,
    /// Slots in the table (a prime); 0 means the frontend has no backends.
    pub table_size: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 means no affinity.
    pub affinity_timeout_s: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// The source-range set new flows must come from (`loadBalancerSourceRanges`), keyed in the
    /// source-ranges map; 0 means any source. Was a reserved zero before source ranges, so
    /// entries written by older agents read as "any source".
    pub source_ranges_id: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 24);

/// The frontend address is one of this node's own (a NodePort): a reply rewritten to come from it
/// has a local source, which the kernel would drop as spoofed if routed, so it is redirected.
pub const SERVICE_F_NODE_ADDRESS: u16 = 1 << 0;
/// With no backend, answer a new flow with a TCP RST or ICMP port unreachable; otherwise drop.
pub const SERVICE_F_REJECT: u16 = 1 << 1;

/// No source-range check: every client may start a flow.
pub const ANY_SOURCE: u32 = 0;

/// The data of an IPv4 source-range key (the map is an LPM trie; its key is a prefix length
/// followed by this): the set id, whose 32 bits always belong to the prefix, then the client
/// address. One lookup with [`SOURCE_RANGE_LOOKUP_BITS`] finds whether an address lies in any
/// range of a set. IPv6 has a twin map (`SourceRange<Ip6>`) with the same set ids: a set's IPv4
/// ranges go to one, its IPv6 ranges to the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange<A = u32> {
    /// Compared as bytes like the address; any fixed byte order works as all 32 bits match.
    pub set_id: u32,
    pub addr_be: A,
}
const _: () = assert!(core::mem::size_of::<SourceRange>() == 8);
const _: () = assert!(core::mem::size_of::<SourceRange<Ip6>>() == 20);

/// The prefix length an IPv4 lookup uses: the set id and the whole address.
pub const SOURCE_RANGE_LOOKUP_BITS: u32 = 64;
/// The prefix length an IPv6 lookup uses.
pub const SOURCE_RANGE_LOOKUP_BITS6: u32 = 32 + 128;

/// The LPM prefix length of a range `addr/prefix` (the set id comes first).
pub const fn source_range_prefix_len(prefix: u8) -> u32 {
    32 + prefix as u32
}

/// The value of a source-range entry: its presence is the answer; the value is kept for a
/// later "deny these ranges" policy.
pub type SourceRangeValue = u32;
/// What every source-range entry holds today: the range admits its clients.
pub const SOURCE_RANGE_ALLOW: SourceRangeValue = 1;

/// Index of a backend in the backends map; what a slot holds. 0 is never used, so a slot that was
/// never written reads as "no backend".
pub type BackendId = u32;
pub const NO_BACKEND: BackendId = 0;

/// A backend endpoint: pod IP and target port. A frontend's backends are of its own family
/// (Kubernetes gives each family its own EndpointSlices), in that family's backends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = u32> {
    pub addr_be: A,
    pub port_be: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<Backend<Ip6>>() == 20);

/// The backend runs on another node: traffic from outside the node is SNATed to the node so the
/// reply comes back through it.
pub const BACKEND_F_REMOTE: u8 = 1 << 0;
/// The backend takes no new flows (its endpoint is terminating, or no longer ready, while it
/// still serves): established TCP flows stay on it until it goes; UDP flows and session affinity
/// move to a live backend at once.
pub const BACKEND_F_DRAINING: u8 = 1 << 1;

impl<A: Copy> Backend<A> {
    pub const fn new(addr_be: A, port_be: u16, flags: u8) -> Self {
        Self {
            addr_be,
            port_be,
            flags,
            _pad: 0,
        }
    }

    /// The value in the wide form (see [`ServiceKey::to_wide`]).
    pub fn to_wide(&self) -> Backend<Ip6>
    where
        A: crate::Address,
    {
        Backend::new(self.addr_be.to_wide(), self.port_be, self.flags)
    }
}

/// `sessionAffinity: ClientIP`: the backend a client got last on a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey<A = u32> {
    pub service_id: u32,
    pub client_addr_be: A,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityKey<Ip6>>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: BackendId,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the client's last new flow.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Per-node settings the agent writes once (the single entry of the node map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The node address used for SNAT (external traffic to remote backends, hairpin); 0 = none,
    /// and such traffic is dropped and counted instead.
    pub snat_addr_be: u32,
    /// SNAT source ports, inclusive, host order. Kept outside the kernel's ephemeral range so
    /// they never collide with the node's own connections.
    pub snat_port_first: u16,
    pub snat_port_last: u16,
    /// Conntrack timeouts; all zero (never written) means the defaults.
    pub timeouts: CtTimeouts,
    pub _reserved: [u32; 2],
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 40);

/// The node's IPv6 settings (the single entry of the IPv6 node map); ports and timeouts are the
/// [`NodeConfig`]'s, common to both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig6 {
    /// The node's IPv6 SNAT address; all zero = none (such traffic is dropped and counted).
    pub snat_addr_be: Ip6,
    pub _reserved: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<NodeConfig6>() == 32);

user_pod!(
    ServiceKey,
    ServiceKey<Ip6>,
    SourceRange,
    SourceRange<Ip6>,
    ServiceEntry,
    Backend,
    Backend<Ip6>,
    AffinityKey,
    AffinityKey<Ip6>,
    NodeConfig6,
    AffinityValue,
    NodeConfig
);
