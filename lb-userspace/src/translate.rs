//! The pure translation: validated Kubernetes objects -> the frontends and backends the data path
//! should have. No I/O, no map ids, deterministic (same objects in any order, same result).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use lb_common::maglev;

use crate::model::{
    EndpointSpec, Object, ObjectRef, Problem, Protocol, SERVICE_PROXY_NAME_LABEL, ServiceKind,
    ServiceName, ServiceSpec, Severity, SliceSpec, SourceRanges, TrafficPolicy,
};

/// An address, port and protocol a client sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `[v6]:port` for IPv6, as everywhere else.
        let at = std::net::SocketAddr::new(self.addr, self.port);
        write!(f, "{at}/{}", self.protocol)
    }
}

/// A pod endpoint a frontend translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    /// Of its frontend's family.
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on the node being programmed (its `nodeName`). Traffic from outside to
    /// a backend elsewhere is SNATed to the node so the reply comes back through it.
    pub on_this_node: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::SocketAddr::new(self.addr, self.port).fmt(f)
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

/// An address family: a frontend, its backends and its source ranges are all of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The ranges of this family among `ranges`. Ranges given but none of this family admit no
    /// client of it: refusing is the safe reading, as for ranges that do not parse.
    pub fn ranges_of(self, ranges: &SourceRanges) -> SourceRanges {
        if ranges.iter().all(|r| Family::of(r.addr()) == self) {
            return ranges.clone();
        }
        ranges
            .iter()
            .filter(|r| Family::of(r.addr()) == self)
            .copied()
            .collect()
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
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
    pub port_name: Arc<str>,
    /// Sorted and free of duplicates, so the slot table is the same whatever the slice order.
    pub backends: Arc<[BackendAddr]>,
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
    /// New flows only from these clients (`loadBalancerSourceRanges`, on LoadBalancer
    /// frontends, and NodePorts when the agent extends it to them); `None`: any client.
    pub source_ranges: Option<SourceRanges>,
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
    /// The addresses its NodePorts answer on (a Service's NodePorts open on those of its
    /// families).
    pub addresses: Vec<IpAddr>,
    /// The node's zone (`topology.kubernetes.io/zone`), for topology-aware routing.
    pub zone: Option<String>,
    /// This agent handles Services labelled `service.kubernetes.io/service-proxy-name` with this
    /// name (and no other labelled ones).
    pub service_proxy_name: Option<String>,
    /// Maglev table size for Services without the annotation (default: the smallest listed
    /// prime with 100 slots per backend); raised like the annotation.
    pub default_table_size: Option<u32>,
    /// `loadBalancerSourceRanges` also guard the Service's NodePorts (Cilium's
    /// `bpf-lb-source-range-all-types`); by default only its load-balancer IPs, as kube-proxy.
    pub source_ranges_on_node_ports: bool,
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
    /// Read-only outside this module: [`Desired::set_frontend`] keeps the counts below with it.
    pub frontends: BTreeMap<Frontend, Arc<FrontendPlan>>,
    /// `healthCheckNodePort` -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub unprogrammed: Vec<Unprogrammed>,
    /// Conflicts found while translating (e.g. two Services claiming one ClusterIP port).
    pub problems: Vec<Problem>,
    /// How many frontends choose each backend (`.0`) and list it as draining (`.1`).
    backend_uses: HashMap<BackendAddr, (u32, u32)>,
    /// Backends some frontend lists as draining and none chooses.
    draining: BTreeSet<BackendAddr>,
}

impl Desired {
    /// Services with a `Local` policy and no endpoint on this node, counted per policy
    /// ("internal": ClusterIP frontends, "external": the others), as kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total` counts them.
    pub fn services_without_local_endpoints(&self) -> [(&'static str, usize); 2] {
        let mut internal = BTreeSet::new();
        let mut external = BTreeSet::new();
        for plan in self.frontends.values() {
            if plan.policy == TrafficPolicy::Local && plan.backends.is_empty() {
                if plan.kind.is_external() {
                    external.insert(&plan.service);
                } else {
                    internal.insert(&plan.service);
                }
            }
        }
        [("internal", internal.len()), ("external", external.len())]
    }

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
        self.backend_uses
            .iter()
            .filter(|(_, (chosen, _))| *chosen > 0)
            .map(|(backend, _)| *backend)
            .collect()
    }

    /// How many backends some frontend chooses.
    pub fn backend_count(&self) -> usize {
        self.backend_uses.len() - self.draining.len()
    }

    /// Backends that no frontend chooses for new flows but some still lists: kept in the maps,
    /// marked draining, for their established TCP flows.
    pub fn draining_backends(&self) -> &BTreeSet<BackendAddr> {
        &self.draining
    }

    /// Sets (or with `None` removes) one frontend's plan, keeping the backend counts.
    fn set_frontend(&mut self, frontend: Frontend, plan: Option<Arc<FrontendPlan>>) {
        let old = match &plan {
            Some(plan) => self.frontends.insert(frontend, plan.clone()),
            None => self.frontends.remove(&frontend),
        };
        if let (Some(old), Some(new)) = (&old, &plan)
            && Arc::ptr_eq(old, new)
        {
            return;
        }
        if let Some(old) = old {
            self.count(&old, false);
        }
        if let Some(new) = plan {
            self.count(&new, true);
        }
    }

    fn count(&mut self, plan: &FrontendPlan, add: bool) {
        let step = |n: &mut u32| *n = if add { *n + 1 } else { *n - 1 };
        let lists = [(&plan.backends[..], true), (&plan.draining[..], false)];
        for (backends, chosen) in lists {
            for backend in backends {
                let uses = self.backend_uses.entry(*backend).or_default();
                step(if chosen { &mut uses.0 } else { &mut uses.1 });
                let (chosen, listed) = *uses;
                if chosen == 0 && listed == 0 {
                    self.backend_uses.remove(backend);
                }
                if chosen == 0 && listed > 0 {
                    self.draining.insert(*backend);
                } else {
                    self.draining.remove(backend);
                }
            }
        }
    }
}

/// Translates `objects` for `node`. Pure: the same objects in any order give the same result.
pub fn translate<'a>(objects: impl IntoIterator<Item = &'a Object>, node: &NodeContext) -> Desired {
    translator_for(objects, node).desired
}

/// A [`Translator`] that has translated `objects` for `node` (its [`Translator::desired`] is
/// [`translate`]'s answer).
pub fn translator_for<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
    node: &NodeContext,
) -> Translator {
    let mut by_service: BTreeMap<ServiceName, ServiceInputs> = BTreeMap::new();
    for object in objects {
        let name = object.service_name();
        let inputs = by_service
            .entry(name.clone())
            .or_insert_with(|| ServiceInputs {
                name,
                service: None,
                slices: Vec::new(),
            });
        let object = Arc::new(object.clone());
        match object.as_ref() {
            Object::Service(_) => inputs.service = Some(object),
            Object::Slice(_) => inputs.slices.push(object),
        }
    }
    for inputs in by_service.values_mut() {
        inputs.slices.sort_by(|a, b| a.id().cmp(b.id()));
    }
    let mut translator = Translator::default();
    translator.apply(by_service.into_values(), true, node);
    translator
}

/// Everything filed under one Service's name: the Service (if there is one) and its
/// EndpointSlices in name order.
#[derive(Clone, Debug)]
pub struct ServiceInputs {
    pub name: ServiceName,
    pub service: Option<Arc<Object>>,
    pub slices: Vec<Arc<Object>>,
}

impl ServiceInputs {
    /// The very same objects (by identity: the sources hand out unchanged objects as the same
    /// `Arc`s).
    fn same_as(&self, other: &ServiceInputs) -> bool {
        let same = |a: &Arc<Object>, b: &Arc<Object>| Arc::ptr_eq(a, b);
        self.service
            .as_ref()
            .zip(other.service.as_ref())
            .is_some_and(|(a, b)| same(a, b))
            && self.slices.len() == other.slices.len()
            && self
                .slices
                .iter()
                .zip(&other.slices)
                .all(|(a, b)| same(a, b))
    }
}

/// The frontends a [`Translator::apply`] may have changed: every frontend whose plan differs is
/// in it (it may hold some whose plan is the same).
pub type Touched = BTreeSet<Frontend>;

/// What one Service translates to, before it meets the other Services (conflicts).
#[derive(Clone, Debug)]
struct ServiceOutput {
    unprogrammed: Option<Unprogrammed>,
    /// (frontend, the field it comes from, its plan)
    frontends: Vec<(Frontend, &'static str, Arc<FrontendPlan>)>,
    health_check: Option<(u16, HealthCheck)>,
}

impl ServiceOutput {
    fn has_uneven_table(&self) -> bool {
        self.frontends
            .iter()
            .any(|(_, _, plan)| !maglev::keeps_even_shares(plan.table_size, plan.backends.len()))
    }
}

/// A Service's inputs and what they translated to.
struct Memo {
    inputs: ServiceInputs,
    output: ServiceOutput,
}

/// Translation kept up to date one Service at a time: [`Translator::apply`] translates only the
/// Services whose objects changed (or all of them when the node did), and updates [`Desired`]
/// only where their output changed, so a change to one of 10,000 Services costs one Service.
/// The result always equals [`translate`]'s of the same objects (tested with random changes).
///
/// Conflicts resolve the same way whatever order changes come in: a frontend (or health-check
/// port) claimed by several Services belongs to the first by namespace/name.
#[derive(Default)]
pub struct Translator {
    node: Option<NodeContext>,
    memo: HashMap<ServiceName, Memo>,
    /// Every plan claiming each frontend, in Service order (a Service's own claims in its
    /// output's order): the first one is programmed.
    claims: BTreeMap<Frontend, Vec<(&'static str, Arc<FrontendPlan>)>>,
    health_claims: BTreeMap<u16, Vec<HealthCheck>>,
    /// Frontends and ports with more than one claim, and Services with an uneven table: the
    /// only ones problems are reported for.
    contested: BTreeSet<Frontend>,
    contested_ports: BTreeSet<u16>,
    uneven: BTreeSet<ServiceName>,
    unprogrammed: BTreeMap<ServiceName, Unprogrammed>,
    /// `unprogrammed` changed since [`Desired::unprogrammed`] was copied from it.
    unprogrammed_changed: bool,
    desired: Desired,
}

impl Translator {
    /// What the Services translate to, as of the last [`Translator::apply`].
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Every Service's objects, as of the last [`Translator::apply`] (in no order).
    pub fn inputs(&self) -> impl Iterator<Item = &ServiceInputs> {
        self.memo.values().map(|memo| &memo.inputs)
    }

    /// Takes the inputs of the Services that changed (`full`: of every Service, the ones not
    /// listed being gone) and returns the frontends that may have changed.
    pub fn apply(
        &mut self,
        changes: impl IntoIterator<Item = ServiceInputs>,
        full: bool,
        node: &NodeContext,
    ) -> Touched {
        let mut touched = Touched::new();
        let mut ports = BTreeSet::new();
        if self.node.as_ref() != Some(node) {
            // Everything depends on the node: translate every Service again from its inputs.
            self.node = Some(node.clone());
            let names: Vec<ServiceName> = self.memo.keys().cloned().collect();
            for name in names {
                let memo = self
                    .withdraw(&name, &mut touched, &mut ports)
                    .expect("listed");
                self.enter(memo.inputs, &mut touched, &mut ports);
            }
        }
        let mut listed = HashSet::new();
        for inputs in changes {
            if full {
                listed.insert(inputs.name.clone());
            }
            if self
                .memo
                .get(&inputs.name)
                .is_some_and(|memo| memo.inputs.same_as(&inputs))
            {
                continue;
            }
            self.withdraw(&inputs.name, &mut touched, &mut ports);
            self.enter(inputs, &mut touched, &mut ports);
        }
        if full {
            let gone: Vec<ServiceName> = (self.memo.keys())
                .filter(|name| !listed.contains(*name))
                .cloned()
                .collect();
            for name in gone {
                self.withdraw(&name, &mut touched, &mut ports);
            }
        }
        self.settle(&touched, &ports);
        touched
    }

    /// Takes a Service's claims back. Returns its memo.
    fn withdraw(
        &mut self,
        name: &ServiceName,
        touched: &mut Touched,
        ports: &mut BTreeSet<u16>,
    ) -> Option<Memo> {
        let memo = self.memo.remove(name)?;
        for (frontend, _, plan) in &memo.output.frontends {
            touched.insert(*frontend);
            let Some(claims) = self.claims.get_mut(frontend) else {
                continue;
            };
            claims.retain(|(_, claim)| !Arc::ptr_eq(claim, plan));
            if claims.len() < 2 {
                self.contested.remove(frontend);
            }
            if claims.is_empty() {
                self.claims.remove(frontend);
            }
        }
        if let Some((port, check)) = &memo.output.health_check {
            ports.insert(*port);
            if let Some(claims) = self.health_claims.get_mut(port) {
                claims.retain(|claim| claim.service != check.service);
                if claims.len() < 2 {
                    self.contested_ports.remove(port);
                }
                if claims.is_empty() {
                    self.health_claims.remove(port);
                }
            }
        }
        self.uneven.remove(name);
        self.unprogrammed_changed |= self.unprogrammed.remove(name).is_some();
        Some(memo)
    }

    /// Translates a Service (nothing if `inputs` has no Service) and files its claims.
    fn enter(&mut self, inputs: ServiceInputs, touched: &mut Touched, ports: &mut BTreeSet<u16>) {
        let Some(Object::Service(svc)) = inputs.service.as_deref() else {
            return;
        };
        let slices: Vec<&SliceSpec> = (inputs.slices.iter())
            .filter_map(|object| match object.as_ref() {
                Object::Slice(slice) => Some(slice),
                Object::Service(_) => None,
            })
            .collect();
        let node = self.node.as_ref().expect("set by apply");
        let output = service_output(svc, &slices, node);
        for (frontend, field, plan) in &output.frontends {
            touched.insert(*frontend);
            // Almost every frontend has one claim: room for exactly that (a first push would
            // make room for four).
            let claims = (self.claims.entry(*frontend)).or_insert_with(|| Vec::with_capacity(1));
            let at = claims.partition_point(|(_, claim)| claim.service <= plan.service);
            claims.insert(at, (field, plan.clone()));
            if claims.len() > 1 {
                self.contested.insert(*frontend);
            }
        }
        if let Some((port, check)) = &output.health_check {
            ports.insert(*port);
            let claims = self.health_claims.entry(*port).or_default();
            let at = claims.partition_point(|claim| claim.service <= check.service);
            claims.insert(at, check.clone());
            if claims.len() > 1 {
                self.contested_ports.insert(*port);
            }
        }
        if output.has_uneven_table() {
            self.uneven.insert(inputs.name.clone());
        }
        if let Some(unprogrammed) = &output.unprogrammed {
            self.unprogrammed
                .insert(inputs.name.clone(), unprogrammed.clone());
            self.unprogrammed_changed = true;
        }
        self.memo
            .insert(inputs.name.clone(), Memo { inputs, output });
    }

    /// Brings [`Desired`] up to date for the touched frontends and ports, and reports the
    /// problems (of the few Services that have any).
    fn settle(&mut self, touched: &Touched, ports: &BTreeSet<u16>) {
        for frontend in touched {
            let winner = self.claims.get(frontend).map(|claims| claims[0].1.clone());
            self.desired.set_frontend(*frontend, winner);
        }
        for port in ports {
            match self.health_claims.get(port) {
                Some(claims) => self.desired.health_checks.insert(*port, claims[0].clone()),
                None => self.desired.health_checks.remove(port),
            };
        }
        if std::mem::take(&mut self.unprogrammed_changed) {
            self.desired.unprogrammed = self.unprogrammed.values().cloned().collect();
        }
        let mut flagged: BTreeSet<ServiceName> = self.uneven.clone();
        for frontend in &self.contested {
            for (_, plan) in &self.claims[frontend][1..] {
                flagged.insert(ServiceName::of(&plan.service));
            }
        }
        for port in &self.contested_ports {
            for check in &self.health_claims[port][1..] {
                flagged.insert(ServiceName::of(&check.service));
            }
        }
        self.desired.problems = flagged
            .iter()
            .filter_map(|name| self.memo.get(name))
            .flat_map(|memo| problems_of(&self.desired, &memo.output))
            .collect();
    }
}

/// What a Service's output meets among the others (frontends and ports another Service, or an
/// earlier field of its own, already has), and whether its tables are uneven.
fn problems_of(desired: &Desired, output: &ServiceOutput) -> Vec<Problem> {
    let mut problems = Vec::new();
    let problem = |severity, service: &ObjectRef, field: &str, message| Problem {
        severity,
        object: Some(service.clone()),
        location: "translation".to_owned(),
        field: field.to_owned(),
        message,
    };
    for (frontend, field, plan) in &output.frontends {
        let owner = &desired.frontends[frontend];
        if !Arc::ptr_eq(owner, plan) {
            problems.push(problem(
                Severity::Error,
                &plan.service,
                field,
                format!(
                    "{frontend} ({}) is already used by {} ({}); left out",
                    plan.kind, owner.service, owner.kind
                ),
            ));
        }
    }
    // One warning a Service, for its first frontend whose table cannot keep even shares.
    if let Some((_, _, plan)) = output
        .frontends
        .iter()
        .find(|(_, _, plan)| !maglev::keeps_even_shares(plan.table_size, plan.backends.len()))
    {
        problems.push(problem(
            Severity::Warning,
            &plan.service,
            "endpoints",
            format!(
                "{} backends share a Maglev table of {} slots, the largest, fewer than {} each: \
                 their shares of new flows differ by more than about 1%",
                plan.backends.len(),
                plan.table_size,
                maglev::MIN_SLOTS_PER_BACKEND
            ),
        ));
    }
    if let Some((port, check)) = &output.health_check {
        let owner = &desired.health_checks[port];
        if owner.service != check.service {
            problems.push(problem(
                Severity::Error,
                &check.service,
                "spec.healthCheckNodePort",
                format!("port {port} is already used by {}; left out", owner.service),
            ));
        }
    }
    problems
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
        // The port's frontends of one family under one policy share their backend list.
        let mut chosen: Vec<(Family, TrafficPolicy, Arc<[BackendAddr]>, bool)> = Vec::new();
        let mut add = |kind: FrontendKind, addr: IpAddr, port_number: u16, field: &'static str| {
            // A frontend's backends are the endpoints of its family (from the slices of
            // that `addressType`); another family's address is not this Service's.
            if !svc.has_family_of(addr) {
                return;
            }
            let family = Family::of(addr);
            let policy = if kind.is_external() {
                svc.external_traffic_policy
            } else {
                svc.internal_traffic_policy
            };
            let (backends, terminating_fallback) = match chosen
                .iter()
                .find(|(f, p, ..)| *f == family && *p == policy)
            {
                Some((_, _, backends, fallback)) => (backends.clone(), *fallback),
                None => {
                    let (backends, fallback) = endpoints.choose(policy, family);
                    let backends: Arc<[BackendAddr]> = backends.into();
                    chosen.push((family, policy, backends.clone(), fallback));
                    (backends, fallback)
                }
            };
            let draining = endpoints
                .listed(family)
                // Both come in address order, so `backends` is sorted.
                .filter(|b| backends.binary_search(b).is_err())
                .collect();
            let guarded = kind == FrontendKind::LoadBalancer
                || (kind == FrontendKind::NodePort && node.source_ranges_on_node_ports);
            let source_ranges = svc
                .source_ranges
                .as_ref()
                .filter(|_| guarded)
                .map(|ranges| family.ranges_of(ranges));
            let when_empty = if endpoints.any_usable(family) {
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
                source_ranges,
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
    let local: BTreeSet<IpAddr> = slices
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
    all: BTreeMap<IpAddr, (EndpointSpec, u16)>,
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
    fn choose(&self, policy: TrafficPolicy, family: Family) -> (Vec<BackendAddr>, bool) {
        let allowed = |ep: &EndpointSpec| {
            Family::of(ep.addr) == family
                && (policy == TrafficPolicy::Cluster || self.on_this_node(ep))
        };
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

    /// Every endpoint of `family` listed, in address order, whatever its conditions.
    fn listed(&self, family: Family) -> impl Iterator<Item = BackendAddr> + '_ {
        let of_family = move |(ep, _): &&(EndpointSpec, u16)| Family::of(ep.addr) == family;
        self.all
            .values()
            .filter(of_family)
            .map(|(ep, port)| BackendAddr {
                addr: ep.addr,
                port: *port,
                on_this_node: self.on_this_node(ep),
            })
    }

    /// Whether any endpoint of `family` anywhere could serve (before a `Local` policy narrows
    /// it down).
    fn any_usable(&self, family: Family) -> bool {
        self.all.values().any(|(ep, _)| {
            Family::of(ep.addr) == family && (ep.ready || (ep.serving && ep.terminating))
        })
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
    let mut all: BTreeMap<IpAddr, (EndpointSpec, u16)> = BTreeMap::new();
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
