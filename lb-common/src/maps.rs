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

/// Frontends (service address x port x protocol).
pub const MAX_SERVICES: u32 = 65_536;
/// Maglev slots over all tables (64 MiB of backend ids), room for 1024 tables of the default
/// size.
pub const MAX_SLOTS: u32 = 1 << 24;
/// The kernel stores array elements 8-byte aligned, so the slots array packs two `u32` backend
/// ids per element: slot `i` is lane `i % 2` of element `i / 2`, and the memory user space maps
/// is exactly one `u32` per slot.
pub const SLOTS_PER_ELEMENT: u32 = 2;
/// Distinct backend endpoints (id 0 is never used).
pub const MAX_BACKENDS: u32 = 262_144;
/// Conntrack entries (two per translated flow).
pub const MAX_CONNTRACK: u32 = 524_288;
/// Clients remembered for `sessionAffinity: ClientIP`.
pub const MAX_AFFINITY: u32 = 131_072;

/// tc ingress on pod-facing interfaces.
pub const POD_INGRESS_PROGRAM: &str = "lb_pod_ingress";
/// tc ingress on external interfaces: NodePort, LoadBalancer, externalIPs, replies from
/// other nodes.
pub const EXTERNAL_INGRESS_PROGRAM: &str = "lb_external_ingress";
/// tc egress on external interfaces: the node's own processes reaching Services.
pub const HOST_EGRESS_PROGRAM: &str = "lb_host_egress";
/// XDP on external interfaces (optional): the external-ingress fast path.
pub const EXTERNAL_XDP_PROGRAM: &str = "lb_external_xdp";
