//! Validated views of the Kubernetes objects translation needs, built from k8s-openapi types.
//!
//! Validation is where bad input is caught: every problem becomes a [`Problem`] naming the object
//! and the field, and an object with an error is rejected whole (as the API server would reject
//! it), so translation itself never fails.

use std::{fmt, net::IpAddr, sync::Arc, time::SystemTime};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation overriding a Service's Maglev table size (a prime from
/// [`lb_common::maglev::TABLE_SIZES`]; raised if too small for the number of backends).
pub const MAGLEV_TABLE_SIZE_ANNOTATION: &str = "lb.rs/maglev-table-size";
/// When the change an EndpointSlice carries was triggered (the EndpointSlice controller sets it,
/// RFC 3339): the start of `lb_network_programming_duration_seconds`, as in kube-proxy.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";
/// A Service with this label belongs to the named service proxy, not to the default one.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the control plane on headless Services' EndpointSlices (and honoured on Services).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Topology-aware routing: `Auto` (or the older `service.kubernetes.io/topology-aware-hints`).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// kube-proxy honours this annotation (comma-separated CIDRs) when
/// `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The API's limits on an EndpointSlice (the API server refuses larger ones).
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_SLICE_PORTS: usize = 100;
pub const MAX_ENDPOINT_ADDRESSES: usize = 100;
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (the API's default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(proto: u8) -> Option<Self> {
        match proto {
            lb_common::IPPROTO_TCP => Some(Protocol::Tcp),
            lb_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

/// `Kind namespace/name`: how every message names an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    /// Shared (`Arc<str>`): the id is copied into every index that files the object and into
    /// every frontend plan, and a copy is a count, not an allocation.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The object is rejected; whatever was programmed for it before stays.
    Error,
    /// Part of the object is not supported and is left out; the rest is programmed.
    Warning,
}

/// One thing wrong with the input, pointing at the object and field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// The object, when it could be identified; otherwise `location` says where it was.
    pub object: Option<ObjectRef>,
    pub location: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match &self.object {
            Some(object) => write!(f, "{level}: {object} ({})", self.location)?,
            None => write!(f, "{level}: {}", self.location)?,
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What kind of Service this is, as far as the data path cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// Has a virtual IP: ClusterIP, NodePort and LoadBalancer Services all get their ClusterIP.
    Virtual,
    /// `clusterIP: None`: DNS returns the pod IPs; nothing to program.
    Headless,
    /// A DNS CNAME to `external_name`; nothing to program.
    ExternalName(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// The port's name; slices carry the same name for its endpoints' port ("" when unnamed).
    /// Named target ports need nothing more: the EndpointSlice controller resolves them per pod
    /// and writes the number into the slice port of the same name.
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
    /// Opened on every node address (NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the node the traffic arrived at; the client source address is kept.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: ObjectRef,
    /// `type` as written (ClusterIP, NodePort, LoadBalancer, ExternalName).
    pub type_name: String,
    pub kind: ServiceKind,
    /// `spec.clusterIPs` (or `clusterIP`): one per family the Service has (dual-stack: both),
    /// the primary family first.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// `spec.externalIPs`: answered like a LoadBalancer IP, on every node.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, set by whatever implements the LoadBalancer.
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// From [`MAGLEV_TABLE_SIZE_ANNOTATION`].
    pub maglev_table_size: Option<u32>,
    /// The [`SERVICE_PROXY_NAME_LABEL`], if set: only the proxy of that name handles it.
    pub proxy_name: Option<String>,
    /// `spec.healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
    /// Topology-aware routing asked for (annotation `Auto`, or `trafficDistribution:
    /// PreferClose`): endpoints' zone hints are followed when complete.
    pub topology_aware: bool,
    /// `spec.loadBalancerSourceRanges` (or [`SOURCE_RANGES_ANNOTATION`]) of a LoadBalancer
    /// Service: the clients its load-balancer IPs admit, either family. `None`: any client.
    /// Empty: none (ranges were given but none is valid: refusing all is the safe reading).
    pub source_ranges: Option<SourceRanges>,
}

impl ServiceSpec {
    /// Whether the Service has the family of `addr` (a ClusterIP of it): a single-stack
    /// Service opens no NodePort on, and programs no external address of, the other family.
    pub fn has_family_of(&self, addr: IpAddr) -> bool {
        self.cluster_ips
            .iter()
            .any(|ip| ip.is_ipv4() == addr.is_ipv4())
    }
}

/// Source CIDRs, host bits cleared, sorted and without duplicates (so equal lists compare
/// and share equal).
pub type SourceRanges = Arc<[ipnet::IpNet]>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortSpec {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Of the slice's `addressType`.
    pub addr: IpAddr,
    /// `conditions.ready`; unset means ready, as the API documents.
    pub ready: bool,
    /// `conditions.serving`; unset means the same as `ready`.
    pub serving: bool,
    /// `conditions.terminating`; unset means not terminating.
    pub terminating: bool,
    /// The node hosting the endpoint, for the `Local` traffic policies.
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones`: the zones that should use this endpoint (topology-aware routing).
    pub hints_for_zones: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub id: ObjectRef,
    /// The Service (same namespace) from the `kubernetes.io/service-name` label.
    pub service_name: Arc<str>,
    pub ports: Vec<SlicePortSpec>,
    pub endpoints: Vec<EndpointSpec>,
    /// From [`LAST_CHANGE_TRIGGER_TIME_ANNOTATION`] (left out if absent or unreadable: it only
    /// feeds a metric).
    pub last_change_trigger: Option<SystemTime>,
}

/// The Service an object belongs to: itself, or for an EndpointSlice the Service named by its
/// `kubernetes.io/service-name` label in its namespace. Translation works one Service at a time,
/// on everything filed under its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// Shared with the ids it comes from, as in [`ObjectRef`].
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceName {
    /// The name of the Service `id` names (whatever kind `id` is).
    pub fn of(id: &ObjectRef) -> Self {
        Self {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(ServiceSpec),
    Slice(SliceSpec),
}

impl Object {
    pub fn id(&self) -> &ObjectRef {
        match self {
            Object::Service(s) => &s.id,
            Object::Slice(s) => &s.id,
        }
    }

    /// The Service this object is filed under.
    pub fn service_name(&self) -> ServiceName {
        match self {
            Object::Service(s) => ServiceName::of(&s.id),
            Object::Slice(s) => ServiceName {
                namespace: s.id.namespace.clone(),
                name: s.service_name.clone(),
            },
        }
    }
}

/// Collects problems for one object while it is validated.
struct Checker<'a> {
    object: &'a ObjectRef,
    location: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, severity: Severity, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            severity,
            object: Some(self.object.clone()),
            location: self.location.to_owned(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.report(Severity::Error, field, message);
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.report(Severity::Warning, field, message);
    }

    /// A DNS-1123 label (namespaces; with `letter_first`, a DNS-1035 label: Service names).
    fn dns_label(&mut self, field: &str, value: &str, letter_first: bool) {
        let chars_ok = value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ends_ok = value.bytes().next().is_some_and(|b| {
            if letter_first {
                b.is_ascii_lowercase()
            } else {
                b != b'-'
            }
        }) && !value.ends_with('-');
        if value.len() > 63 || !chars_ok || !ends_ok {
            let what = if letter_first {
                "a lowercase letter, then lowercase letters, digits or '-'"
            } else {
                "lowercase letters, digits or '-'"
            };
            self.error(
                field,
                format!("{value:?} is not a valid name: at most 63 characters, {what}, not ending in '-'"),
            );
        }
    }

    /// A DNS-1123 subdomain (EndpointSlice names): dot-separated labels, at most 253 characters.
    fn dns_subdomain(&mut self, field: &str, value: &str) {
        let label_ok = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if value.len() > 253 || !value.split('.').all(label_ok) {
            self.error(
                field,
                format!("{value:?} is not a valid name: at most 253 characters, lowercase letters, digits, '-' and '.'"),
            );
        }
    }

    /// A port name (IANA service name syntax): at most 15 lowercase letters, digits and single
    /// '-', with at least one letter.
    fn port_name(&mut self, field: String, value: &str) {
        if value.is_empty() {
            return;
        }
        let valid = value.len() <= 15
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && value.bytes().any(|b| b.is_ascii_lowercase())
            && !value.starts_with('-')
            && !value.ends_with('-')
            && !value.contains("--");
        if !valid {
            self.error(
                field,
                format!("{value:?} is not a valid port name: at most 15 lowercase letters, digits and single '-', at least one letter"),
            );
        }
    }

    fn has_errors(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }

    fn port(&mut self, field: String, value: Option<i32>) -> Option<u16> {
        match value {
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            Some(p) => {
                self.error(field, format!("port {p} is out of range 1-65535"));
                None
            }
            None => {
                self.error(field, "port is required");
                None
            }
        }
    }

    /// An IP address of either family; an invalid one is an error.
    fn ip(&mut self, field: String, value: &str) -> Option<IpAddr> {
        match value.parse::<IpAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(field, format!("{value:?} is not a valid IP address"));
                None
            }
        }
    }

    /// Every address of a list field (see [`Self::ip`]).
    fn ip_list(&mut self, field: &str, values: &[String]) -> Vec<IpAddr> {
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| self.ip(format!("{field}[{i}]"), v))
            .collect()
    }

    fn traffic_policy(&mut self, field: &str, value: Option<&str>) -> TrafficPolicy {
        match value.unwrap_or("Cluster") {
            "Cluster" => TrafficPolicy::Cluster,
            "Local" => TrafficPolicy::Local,
            other => {
                self.error(
                    field,
                    format!("unknown traffic policy {other:?} (expected Cluster or Local)"),
                );
                TrafficPolicy::Cluster
            }
        }
    }

    /// `None` for a protocol we skip (with a warning) or reject (with an error).
    fn protocol(&mut self, field: String, value: Option<&str>) -> Option<Protocol> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => {
                self.warn(
                    field,
                    "SCTP is not supported by lb yet; this port is left out",
                );
                None
            }
            other => {
                self.error(
                    field,
                    format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
                );
                None
            }
        }
    }
}

/// The result of validating one object: the object (unless an error rejected it) and its problems.
pub struct Validated {
    pub object: Option<Object>,
    pub problems: Vec<Problem>,
}

/// How an object is named in messages and keyed in caches: `Kind namespace/name`.
pub fn object_ref(
    kind: Kind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: meta.namespace.as_deref().unwrap_or("default").into(),
        name: meta.name.as_deref().unwrap_or_default().into(),
    }
}

/// Validates a Service; `location` says where it came from (e.g. `services.yaml document 3`).
pub fn validate_service(svc: &Service, location: &str) -> Validated {
    let id = object_ref(Kind::Service, &svc.metadata);
    let mut check = Checker {
        object: &id,
        location,
        problems: Vec::new(),
    };
    if id.name.is_empty() {
        check.error("metadata.name", "name is required");
    } else {
        check.dns_label("metadata.name", &id.name, true);
    }
    check.dns_label("metadata.namespace", &id.namespace, false);
    let spec = svc.spec.clone().unwrap_or_default();
    let type_name = spec.type_.clone().unwrap_or_else(|| "ClusterIP".to_owned());
    let mut kind = ServiceKind::Virtual;
    let mut cluster_ips = Vec::new();
    match type_name.as_str() {
        "ExternalName" => {
            kind = ServiceKind::ExternalName(spec.external_name.clone().unwrap_or_default());
        }
        "ClusterIP" | "NodePort" | "LoadBalancer" => {
            let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
                (Some(ips), _) if !ips.is_empty() => ips.clone(),
                (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
                _ => Vec::new(),
            };
            let field = if spec.cluster_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
                "spec.clusterIPs"
            } else {
                "spec.clusterIP"
            };
            let headless_label = svc
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(HEADLESS_LABEL));
            if ips.first().map(String::as_str) == Some("None") || headless_label {
                kind = ServiceKind::Headless;
            } else if ips.is_empty() {
                check.error(
                    "spec.clusterIP",
                    "clusterIP is required here (the API server normally allocates it)",
                );
            } else {
                cluster_ips = check.ip_list(field, &ips);
                if cluster_ips.len() == 2 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4() {
                    check.error(field, "a dual-stack Service has one address of each family");
                }
            }
        }
        other => check.error("spec.type", format!("unknown Service type {other:?}")),
    }
    let mut ports = Vec::new();
    let mut external_ips = Vec::new();
    let mut load_balancer_ips = Vec::new();
    let has_node_ports = matches!(type_name.as_str(), "NodePort" | "LoadBalancer");
    if kind == ServiceKind::Virtual {
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let port = check.port(format!("spec.ports[{i}].port"), Some(p.port));
            let protocol =
                check.protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref());
            let node_port = match (has_node_ports, p.node_port) {
                (true, Some(np)) => check.port(format!("spec.ports[{i}].nodePort"), Some(np)),
                // A LoadBalancer may opt out with allocateLoadBalancerNodePorts: false.
                (true, None) if type_name == "LoadBalancer" => None,
                (true, None) => {
                    check.error(
                        format!("spec.ports[{i}].nodePort"),
                        "nodePort is required for a NodePort Service (the API server normally allocates it)",
                    );
                    None
                }
                (false, Some(_)) => {
                    check.warn(
                        format!("spec.ports[{i}].nodePort"),
                        format!("ignored: only NodePort and LoadBalancer Services open node ports, this is {type_name}"),
                    );
                    None
                }
                (false, None) => None,
            };
            if let Some(name) = &p.name {
                check.port_name(format!("spec.ports[{i}].name"), name);
            }
            if let (Some(port), Some(protocol)) = (port, protocol) {
                ports.push(ServicePortSpec {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    port,
                    protocol,
                    node_port,
                });
            }
        }
        external_ips = check.ip_list(
            "spec.externalIPs",
            spec.external_ips.as_deref().unwrap_or_default(),
        );
        if type_name == "LoadBalancer" {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for (i, entry) in ingress.into_iter().flatten().enumerate() {
                // Hostname-only entries (some cloud LBs) have nothing for lb to program.
                if let Some(ip) = &entry.ip {
                    load_balancer_ips
                        .extend(check.ip(format!("status.loadBalancer.ingress[{i}].ip"), ip));
                }
            }
        }
    }
    let external_traffic_policy = check.traffic_policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    );
    let internal_traffic_policy = check.traffic_policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    );
    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=86_400).contains(&t) => Some(t as u32),
                Some(t) => {
                    check.error(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-86400"),
                    );
                    None
                }
            }
        }
        other => {
            check.error(
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?} (expected None or ClientIP)"),
            );
            None
        }
    };
    let maglev_table_size = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MAGLEV_TABLE_SIZE_ANNOTATION))
        .and_then(|value| {
            let field = format!("metadata.annotations[{MAGLEV_TABLE_SIZE_ANNOTATION:?}]");
            match value.parse::<u32>() {
                Ok(m) if lb_common::maglev::TABLE_SIZES.contains(&m) => Some(m),
                _ => {
                    check.warn(
                        field,
                        format!(
                            "{value:?} is not one of the supported table sizes {:?}; using the default",
                            lb_common::maglev::TABLE_SIZES
                        ),
                    );
                    None
                }
            }
        });
    let proxy_name = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        .cloned();
    let health_check_node_port = spec
        .health_check_node_port
        .and_then(|p| check.port("spec.healthCheckNodePort".to_owned(), Some(p)));
    let annotation = |key: &str| {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(|v| v.to_ascii_lowercase())
    };
    let topology_aware = annotation(TOPOLOGY_MODE_ANNOTATION).as_deref() == Some("auto")
        || annotation(TOPOLOGY_HINTS_ANNOTATION).as_deref() == Some("auto")
        || spec.traffic_distribution.as_deref() == Some("PreferClose");
    let source_ranges = source_ranges(svc, &type_name, &cluster_ips, &mut check);
    let object = (!check.has_errors()).then(|| {
        Object::Service(ServiceSpec {
            id: id.clone(),
            type_name,
            kind,
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            external_traffic_policy,
            internal_traffic_policy,
            affinity_timeout_s,
            maglev_table_size,
            proxy_name,
            health_check_node_port,
            topology_aware,
            source_ranges,
        })
    });
    Validated {
        object,
        problems: check.problems,
    }
}

/// A Service's source ranges (see [`ServiceSpec::source_ranges`]). A range that does not parse
/// is left out with a warning (the API server would have refused it). Only LoadBalancer
/// Services have source ranges.
fn source_ranges(
    svc: &Service,
    type_name: &str,
    cluster_ips: &[IpAddr],
    check: &mut Checker,
) -> Option<SourceRanges> {
    let from_field = (svc.spec.as_ref())
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .filter(|ranges| !ranges.is_empty());
    let (field, given): (String, Vec<String>) = match from_field {
        Some(ranges) => ("spec.loadBalancerSourceRanges".to_owned(), ranges),
        None => {
            let annotation = (svc.metadata.annotations.as_ref())
                .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
                .filter(|v| !v.trim().is_empty())?;
            (
                format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION:?}]"),
                annotation.split(',').map(|r| r.trim().to_owned()).collect(),
            )
        }
    };
    if type_name != "LoadBalancer" {
        check.warn(
            field,
            format!("ignored: only LoadBalancer Services have source ranges, this is {type_name}"),
        );
        return None;
    }
    let mut ranges = Vec::with_capacity(given.len());
    for (i, range) in given.iter().enumerate() {
        match range.parse::<ipnet::IpNet>() {
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => check.warn(
                format!("{field}[{i}]"),
                format!("{range:?} is not a CIDR such as 203.0.113.0/24; left out"),
            ),
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    if ranges.is_empty() {
        check.warn(
            field,
            "no valid range: the Service's load-balancer IPs refuse every client",
        );
    } else {
        // Each family's addresses are guarded by that family's ranges alone.
        for (v4, family) in [(true, "IPv4"), (false, "IPv6")] {
            let has_family = cluster_ips.iter().any(|ip| ip.is_ipv4() == v4);
            if has_family && !ranges.iter().any(|r| r.addr().is_ipv4() == v4) {
                check.warn(
                    field.clone(),
                    format!(
                        "no valid {family} range: the Service's {family} load-balancer IPs \
                         refuse every {family} client"
                    ),
                );
            }
        }
    }
    Some(ranges.into())
}

/// Validates an EndpointSlice; `location` says where it came from.
pub fn validate_slice(slice: &EndpointSlice, location: &str) -> Validated {
    let id = object_ref(Kind::EndpointSlice, &slice.metadata);
    let mut check = Checker {
        object: &id,
        location,
        problems: Vec::new(),
    };
    if id.name.is_empty() {
        check.error("metadata.name", "name is required");
    } else {
        check.dns_subdomain("metadata.name", &id.name);
    }
    check.dns_label("metadata.namespace", &id.namespace, false);
    let listed = |items: usize, field: &str, max: usize, check: &mut Checker| {
        if items > max {
            check.error(
                field,
                format!("{items} items; the API allows at most {max} (a slice this large was not written by the API server)"),
            );
        }
    };
    listed(
        slice.endpoints.as_ref().map_or(0, Vec::len),
        "endpoints",
        MAX_SLICE_ENDPOINTS,
        &mut check,
    );
    listed(
        slice.ports.as_ref().map_or(0, Vec::len),
        "ports",
        MAX_SLICE_PORTS,
        &mut check,
    );
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        listed(
            ep.addresses.len(),
            &format!("endpoints[{i}].addresses"),
            MAX_ENDPOINT_ADDRESSES,
            &mut check,
        );
    }
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .cloned()
        .unwrap_or_default();
    if service_name.is_empty() {
        check.error(
            format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
            "the label naming the slice's Service is missing",
        );
    }
    let mut ports = Vec::new();
    let mut endpoints = Vec::new();
    let ipv4 = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => {
            check.warn(
                "addressType",
                "FQDN slices are not supported by lb (deprecated in Kubernetes); left out",
            );
            None
        }
        other => {
            check.error("addressType", format!("unknown address type {other:?}"));
            None
        }
    };
    if let Some(ipv4) = ipv4 {
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            if let Some(name) = &p.name {
                check.port_name(format!("ports[{i}].name"), name);
            }
            let port = check.port(format!("ports[{i}].port"), p.port);
            let protocol = check.protocol(format!("ports[{i}].protocol"), p.protocol.as_deref());
            if let (Some(port), Some(protocol)) = (port, protocol) {
                ports.push(SlicePortSpec {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    protocol,
                });
            }
        }
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            // Consumers use only the first address (the API says the rest are ignored).
            let Some(addr) = ep.addresses.first() else {
                check.error(
                    format!("endpoints[{i}].addresses"),
                    "at least one address is required",
                );
                continue;
            };
            let conditions = ep.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            match addr.parse::<IpAddr>() {
                Ok(addr) if addr.is_ipv4() == ipv4 => endpoints.push(EndpointSpec {
                    addr,
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    hints_for_zones: ep.hints.as_ref().and_then(|h| {
                        h.for_zones
                            .as_ref()
                            .map(|zones| zones.iter().map(|z| z.name.clone()).collect())
                    }),
                }),
                _ => check.error(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{addr:?} is not a valid {} address", slice.address_type),
                ),
            }
        }
    }
    let object = (!check.has_errors()).then(|| {
        Object::Slice(SliceSpec {
            id: id.clone(),
            service_name: service_name.into(),
            ports,
            endpoints,
            last_change_trigger: (slice.metadata.annotations.as_ref())
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME_ANNOTATION))
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
        })
    });
    Validated {
        object,
        problems: check.problems,
    }
}
