//! The pure translation: validated Kubernetes objects -> the frontends and backends the data path
//! should have. No I/O, no map ids, deterministic (same objects in any order, same result).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use lb_common::maglev;

use crate::model::{
    EndpointSpec, Object, ObjectRef, Problem, Protocol, SERVICE_PROXY_NAME_LABEL, ServiceKind,
    ServiceSpec, Severity, SliceSpec, TrafficPolicy,
};

/// An address, port and protocol a client sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// A pod endpoint a frontend translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on the node being programmed (its `nodeName`). Traffic from outside to
    /// a backend elsewhere is SNATed to the node so the reply comes back through it.
    pub on_this_node: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// Which address family of a Service a frontend comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    /// `nodePort` on one of this node's addresses.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// Reached from outside the cluster: `externalTrafficPolicy` applies.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "externalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// What a frontend does with a new flow when it has no backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenEmpty {
    /// The Service has no usable endpoint anywhere: tell the client (TCP RST, ICMP unreachable),
    /// as kube-proxy does.
    Reject,
    /// Endpoints exist but a `Local` policy rules them out on this node: drop silently, so an
    /// external load balancer's health check sends clients elsewhere.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub service: ObjectRef,
    pub kind: FrontendKind,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Sorted and free of duplicates, so the slot table is the same whatever the slice order.
    pub backends: Vec<BackendAddr>,
    /// The backends are terminating ones, used because none is ready (KEP-1669).
    pub terminating_fallback: bool,
    /// Endpoints still listed for this port but not chosen (not ready, terminating, or left out
    /// by the policy): they take no new flows, but established TCP flows stay on them until they
    /// leave the EndpointSlices, as with kube-proxy. Sorted, without duplicates.
    pub draining: Vec<BackendAddr>,
    pub when_empty: WhenEmpty,
    /// Maglev table size (prime, at least 100 slots per backend).
    pub table_size: u32,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_s: Option<u32>,
    /// The policy that chose the backends.
    pub policy: TrafficPolicy,
}

/// Why a Service produced no frontends although it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unprogrammed {
    pub service: ObjectRef,
    pub reason: String,
}

/// The node being programmed and the agent's settings that shape translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The node's name, as EndpointSlices' `nodeName` (for `Local` policies).
    pub name: Option<String>,
    /// The addresses its NodePorts answer on.
    pub addresses: Vec<Ipv4Addr>,
    /// The node's zone (`topology.kubernetes.io/zone`), for topology-aware routing.
    pub zone: Option<String>,
    /// This agent handles Services labelled `service.kubernetes.io/service-proxy-name` with this
    /// name (and no other labelled ones).
    pub service_proxy_name: Option<String>,
    /// Maglev table size for Services without the annotation (default: the smallest listed
    /// prime with 100 slots per backend); raised like the annotation.
    pub default_table_size: Option<u32>,
}

/// What kube-proxy's `healthCheckNodePort` server answers for an `externalTrafficPolicy: Local`
/// LoadBalancer Service on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectRef,
    /// Ready endpoints on this node: 0 means answer 503, so the load balancer avoids the node.
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared (`Arc`) so an unchanged Service's plans are reused from one sync to the next.
    pub frontends: BTreeMap<Frontend, Arc<FrontendPlan>>,
    /// `healthCheckNodePort` -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub unprogrammed: Vec<Unprogrammed>,
    /// Conflicts found while translating (e.g. two Services claiming one ClusterIP port).
    pub problems: Vec<Problem>,
}

impl Desired {
    /// Frontends whose Maglev table gives its backends fewer than 100 slots each (more backends
    /// than the largest table can spread evenly).
    pub fn uneven_tables(&self) -> usize {
        self.frontends
            .values()
            .filter(|plan| !maglev::keeps_even_shares(plan.table_size, plan.backends.len()))
            .count()
    }

    /// Every backend any frontend uses.
    pub fn backends(&self) -> BTreeSet<BackendAddr> {
        self.frontends
            .values()
            .flat_map(|plan| plan.backends.iter().copied())
            .collect()
    }

    /// Backends that no frontend chooses for new flows but some still lists: kept in the maps,
    /// marked draining, for their established TCP flows.
    pub fn draining_backends(&self) -> BTreeSet<BackendAddr> {
        let active = self.backends();
        self.frontends
            .values()
            .flat_map(|plan| plan.draining.iter().copied())
            .filter(|b| !active.contains(b))
            .collect()
    }
}

/// Translates `objects` for `node`. Pure: the same objects in any order give the same result.
pub fn translate<'a>(objects: impl IntoIterator<Item = &'a Object>, node: &NodeContext) -> Desired {
    let objects: Vec<Arc<Object>> = objects.into_iter().cloned().map(Arc::new).collect();
    Translator::default().translate(&objects, node)
}

/// What one Service translates to, before it meets the other Services (conflicts).
#[derive(Clone, Debug)]
struct ServiceOutput {
    unprogrammed: Option<Unprogrammed>,
    /// (frontend, the field it comes from, its plan)
    frontends: Vec<(Frontend, &'static str, Arc<FrontendPlan>)>,
    health_check: Option<(u16, HealthCheck)>,
}

/// A slice and the shared object it is part of.
type SliceOf<'a> = (&'a SliceSpec, &'a Arc<Object>);

/// The inputs a Service's output came from, by identity: the same `Arc`s mean the same output.
struct Memo {
    service: Arc<Object>,
    slices: Vec<Arc<Object>>,
    output: ServiceOutput,
}

/// [`translate`] with memory: a Service whose objects are the very same `Arc`s as last time (the
/// API source hands out unchanged objects that way) reuses its previous output, so a sync with
/// 10,000 Services only translates the ones that changed. The result equals [`translate`]'s.
#[derive(Default)]
pub struct Translator {
    memo: HashMap<ObjectRef, Memo>,
    node: Option<NodeContext>,
}

impl Translator {
    pub fn translate(&mut self, objects: &[Arc<Object>], node: &NodeContext) -> Desired {
        if self.node.as_ref() != Some(node) {
            self.memo.clear();
            self.node = Some(node.clone());
        }
        let mut services: Vec<(&ServiceSpec, &Arc<Object>)> = Vec::new();
        // (namespace, service name) -> slices
        let mut slices: HashMap<(&str, &str), Vec<SliceOf>> = HashMap::new();
        for object in objects {
            match object.as_ref() {
                Object::Service(svc) => services.push((svc, object)),
                Object::Slice(slice) => slices
                    .entry((slice.id.namespace.as_str(), slice.service_name.as_str()))
                    .or_default()
                    .push((slice, object)),
            }
        }
        // Conflicts resolve the same way whatever order the objects came in: first by
        // namespace/name; slices in name order too.
        services.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        for list in slices.values_mut() {
            list.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        }

        let mut memo = HashMap::with_capacity(services.len());
        let mut desired = Desired::default();
        for (svc, svc_object) in services {
            let svc_slices = slices
                .get(&(svc.id.namespace.as_str(), svc.id.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let reusable = self.memo.remove(&svc.id).filter(|m| {
                Arc::ptr_eq(&m.service, svc_object)
                    && m.slices.len() == svc_slices.len()
                    && m.slices
                        .iter()
                        .zip(svc_slices)
                        .all(|(a, (_, b))| Arc::ptr_eq(a, b))
            });
            let memo_entry = match reusable {
                Some(previous) => previous,
                None => {
                    let specs: Vec<&SliceSpec> = svc_slices.iter().map(|(s, _)| *s).collect();
                    Memo {
                        service: svc_object.clone(),
                        slices: svc_slices.iter().map(|(_, o)| (*o).clone()).collect(),
                        output: service_output(svc, &specs, node),
                    }
                }
            };
            assemble(&mut desired, svc, &memo_entry.output);
            memo.insert(svc.id.clone(), memo_entry);
        }
        self.memo = memo;
        desired
    }
}

/// Adds one Service's output to `desired`, reporting what another Service already claimed.
fn assemble(desired: &mut Desired, svc: &ServiceSpec, output: &ServiceOutput) {
    desired.unprogrammed.extend(output.unprogrammed.clone());
    for (frontend, field, plan) in &output.frontends {
        if let Some(owner) = desired.frontends.get(frontend) {
            desired.problems.push(Problem {
                severity: Severity::Error,
                object: Some(svc.id.clone()),
                location: "translation".to_owned(),
                field: (*field).to_owned(),
                message: format!(
                    "{frontend} ({}) is already used by {} ({}); left out",
                    plan.kind, owner.service, owner.kind
                ),
            });
            continue;
        }
        desired.frontends.insert(*frontend, plan.clone());
    }
    // One warning a Service, for its first frontend whose table cannot keep even shares.
    if let Some((_, _, plan)) = output
        .frontends
        .iter()
        .find(|(_, _, plan)| !maglev::keeps_even_shares(plan.table_size, plan.backends.len()))
    {
        desired.problems.push(Problem {
            severity: Severity::Warning,
            object: Some(svc.id.clone()),
            location: "translation".to_owned(),
            field: "endpoints".to_owned(),
            message: format!(
                "{} backends share a Maglev table of {} slots, the largest, fewer than {} each: \
                 their shares of new flows differ by more than about 1%",
                plan.backends.len(),
                plan.table_size,
                maglev::MIN_SLOTS_PER_BACKEND
            ),
        });
    }
    if let Some((port, check)) = &output.health_check {
        if let Some(owner) = desired.health_checks.get(port) {
            desired.problems.push(Problem {
                severity: Severity::Error,
                object: Some(svc.id.clone()),
                location: "translation".to_owned(),
                field: "spec.healthCheckNodePort".to_owned(),
                message: format!("port {port} is already used by {}; left out", owner.service),
            });
        } else {
            desired.health_checks.insert(*port, check.clone());
        }
    }
}

/// One Service on its own: its frontends and their plans, or why it has none.
fn service_output(
    svc: &ServiceSpec,
    svc_slices: &[&SliceSpec],
    node: &NodeContext,
) -> ServiceOutput {
    let mut output = ServiceOutput {
        unprogrammed: None,
        frontends: Vec::new(),
        health_check: None,
    };
    let skipped = |reason: String| Unprogrammed {
        service: svc.id.clone(),
        reason,
    };
    match &svc.kind {
        ServiceKind::Headless => {
            output.unprogrammed = Some(skipped(
                "headless (clusterIP: None): DNS returns the pod IPs, nothing to load-balance"
                    .to_owned(),
            ));
            return output;
        }
        ServiceKind::ExternalName(name) => {
            output.unprogrammed = Some(skipped(format!(
                "ExternalName: only a DNS CNAME to {name:?}, nothing to load-balance"
            )));
            return output;
        }
        ServiceKind::Virtual => {}
    }
    if svc.proxy_name != node.service_proxy_name && svc.proxy_name.is_some() {
        output.unprogrammed = Some(skipped(format!(
            "handled by service proxy {:?} (label {SERVICE_PROXY_NAME_LABEL}), not this one",
            svc.proxy_name.as_deref().unwrap_or_default()
        )));
        return output;
    }
    for port in &svc.ports {
        let endpoints = endpoints_for(svc_slices, &port.name, port.protocol, node, svc);
        let mut add =
            |kind: FrontendKind, addr: Ipv4Addr, port_number: u16, field: &'static str| {
                let policy = if kind.is_external() {
                    svc.external_traffic_policy
                } else {
                    svc.internal_traffic_policy
                };
                let (backends, terminating_fallback) = endpoints.choose(policy);
                let draining = endpoints
                    .listed()
                    // Both come in address order, so `backends` is sorted.
                    .filter(|b| backends.binary_search(b).is_err())
                    .collect();
                let when_empty = if endpoints.any_usable() {
                    WhenEmpty::Drop
                } else {
                    WhenEmpty::Reject
                };
                let plan = FrontendPlan {
                    service: svc.id.clone(),
                    kind,
                    port_name: port.name.clone(),
                    table_size: maglev::table_size(
                        backends.len(),
                        svc.maglev_table_size.or(node.default_table_size),
                    ),
                    backends,
                    terminating_fallback,
                    draining,
                    when_empty,
                    affinity_timeout_s: svc.affinity_timeout_s,
                    policy,
                };
                let frontend = Frontend {
                    addr,
                    port: port_number,
                    protocol: port.protocol,
                };
                output.frontends.push((frontend, field, Arc::new(plan)));
            };
        for &addr in &svc.cluster_ips {
            add(FrontendKind::ClusterIp, addr, port.port, "spec.clusterIP");
        }
        if let Some(node_port) = port.node_port {
            for &addr in &node.addresses {
                add(
                    FrontendKind::NodePort,
                    addr,
                    node_port,
                    "spec.ports.nodePort",
                );
            }
        }
        for &addr in &svc.external_ips {
            add(
                FrontendKind::ExternalIp,
                addr,
                port.port,
                "spec.externalIPs",
            );
        }
        for &addr in &svc.load_balancer_ips {
            add(
                FrontendKind::LoadBalancer,
                addr,
                port.port,
                "status.loadBalancer.ingress",
            );
        }
    }
    if let Some(port) = svc.health_check_node_port
        && svc.external_traffic_policy == TrafficPolicy::Local
    {
        output.health_check = Some((port, health_check(svc, svc_slices, node)));
    }
    output
}

/// What the `healthCheckNodePort` of an `externalTrafficPolicy: Local` Service reports: its
/// ready endpoints on this node, over all its slices.
fn health_check(svc: &ServiceSpec, slices: &[&SliceSpec], node: &NodeContext) -> HealthCheck {
    let local: BTreeSet<Ipv4Addr> = slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|ep| ep.ready && node.name.is_some() && ep.node_name == node.name)
        .map(|ep| ep.addr)
        .collect();
    HealthCheck {
        service: svc.id.clone(),
        local_endpoints: local.len(),
    }
}

/// One Service port's endpoints, as candidates for every traffic policy.
struct PortEndpoints {
    /// address -> (endpoint, target port)
    all: BTreeMap<Ipv4Addr, (EndpointSpec, u16)>,
    node: Option<String>,
    /// Follow zone hints for this zone (topology-aware routing asked for and the zone known).
    hints_zone: Option<String>,
}

impl PortEndpoints {
    fn on_this_node(&self, ep: &EndpointSpec) -> bool {
        self.node.is_some() && ep.node_name == self.node
    }

    /// Ready endpoints allowed by `policy`; if there are none, the serving terminating ones
    /// (KEP-1669: better a pod that is shutting down than a dropped connection).
    fn choose(&self, policy: TrafficPolicy) -> (Vec<BackendAddr>, bool) {
        let allowed = |ep: &EndpointSpec| policy == TrafficPolicy::Cluster || self.on_this_node(ep);
        let pick = |wanted: &dyn Fn(&EndpointSpec) -> bool| -> Vec<BackendAddr> {
            self.all
                .values()
                .filter(|(ep, _)| allowed(ep) && wanted(ep))
                .map(|(ep, port)| BackendAddr {
                    addr: ep.addr,
                    port: *port,
                    on_this_node: self.on_this_node(ep),
                })
                .collect()
        };
        let ready = pick(&|ep| ep.ready);
        if !ready.is_empty() {
            return (self.follow_hints(ready, policy), false);
        }
        let terminating = pick(&|ep| ep.serving && ep.terminating);
        let fallback = !terminating.is_empty();
        (terminating, fallback)
    }

    /// Topology-aware routing, as kube-proxy does it: with `Cluster` policy, when every chosen
    /// endpoint has zone hints and some are meant for this node's zone, only those.
    fn follow_hints(&self, chosen: Vec<BackendAddr>, policy: TrafficPolicy) -> Vec<BackendAddr> {
        let Some(zone) = &self.hints_zone else {
            return chosen;
        };
        if policy != TrafficPolicy::Cluster {
            return chosen;
        }
        let hints = |b: &BackendAddr| {
            self.all
                .get(&b.addr)
                .and_then(|(ep, _)| ep.hints_for_zones.as_ref())
        };
        if !chosen.iter().all(|b| hints(b).is_some()) {
            return chosen;
        }
        let here: Vec<BackendAddr> = chosen
            .iter()
            .copied()
            .filter(|b| hints(b).is_some_and(|zones| zones.contains(zone)))
            .collect();
        if here.is_empty() { chosen } else { here }
    }

    /// Every endpoint listed, in address order, whatever its conditions.
    fn listed(&self) -> impl Iterator<Item = BackendAddr> + '_ {
        self.all.values().map(|(ep, port)| BackendAddr {
            addr: ep.addr,
            port: *port,
            on_this_node: self.on_this_node(ep),
        })
    }

    /// Whether any endpoint anywhere could serve (before a `Local` policy narrows it down).
    fn any_usable(&self) -> bool {
        self.all
            .values()
            .any(|(ep, _)| ep.ready || (ep.serving && ep.terminating))
    }
}

/// The endpoints of every slice at the slice port matching the Service port's name and protocol
/// (the EndpointSlice controller writes the resolved target port there). An address listed twice
/// (e.g. in two slices during an update) counts once, ready if either says so.
fn endpoints_for(
    slices: &[&SliceSpec],
    port_name: &str,
    protocol: Protocol,
    node: &NodeContext,
    svc: &ServiceSpec,
) -> PortEndpoints {
    let mut all: BTreeMap<Ipv4Addr, (EndpointSpec, u16)> = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            match all.get(&ep.addr) {
                Some((seen, _)) if seen.ready || !ep.ready => {}
                _ => {
                    all.insert(ep.addr, (ep.clone(), slice_port.port));
                }
            }
        }
    }
    PortEndpoints {
        all,
        node: node.name.clone(),
        hints_zone: node.zone.clone().filter(|_| svc.topology_aware),
    }
}
