//! Map names, capacities and the pin layout: the contract between the object file and the agent.

/// Pinned maps live in `<bpffs dir>/<PIN_LAYOUT_VERSION>/`. Bump it whenever a map's key, value
/// or type changes, so a new agent never adopts maps of an incompatible layout.
pub const PIN_LAYOUT_VERSION: &str = "v1";

pub const SERVICES_MAP: &str = "LB_SERVICES";
pub const SLOTS_MAP: &str = "LB_SLOTS";
pub const BACKENDS_MAP: &str = "LB_BACKENDS";
pub const CONNTRACK_MAP: &str = "LB_CONNTRACK";
pub const COUNTERS_MAP: &str = "LB_COUNTERS";

/// Frontends (service address x port x protocol).
pub const MAX_SERVICES: u32 = 65_536;
/// Backend slots over all services.
pub const MAX_SLOTS: u32 = 1 << 20;
/// Distinct backend endpoints.
pub const MAX_BACKENDS: u32 = 262_144;
/// Conntrack entries (two per translated flow).
pub const MAX_CONNTRACK: u32 = 524_288;

/// The tc program attached to pod-facing interfaces.
pub const POD_INGRESS_PROGRAM: &str = "lb_pod_ingress";
