//! The pure translation: validated Kubernetes objects -> the frontends and backends the data path
//! should have. No I/O, no map ids, deterministic (same objects in any order, same result).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use crate::model::{
    Object, ObjectRef, Problem, Protocol, ServiceKind, ServiceSpec, Severity, SliceSpec,
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
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub service: ObjectRef,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Sorted and free of duplicates, so the slot table is the same whatever the slice order.
    pub backends: Vec<BackendAddr>,
}

/// Why a Service produced no frontends although it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unprogrammed {
    pub service: ObjectRef,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendPlan>,
    pub unprogrammed: Vec<Unprogrammed>,
    /// Conflicts found while translating (e.g. two Services claiming one ClusterIP port).
    pub problems: Vec<Problem>,
}

impl Desired {
    /// Every backend any frontend uses.
    pub fn backends(&self) -> BTreeSet<BackendAddr> {
        self.frontends
            .values()
            .flat_map(|plan| plan.backends.iter().copied())
            .collect()
    }
}

pub fn translate<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Desired {
    let mut services: Vec<&ServiceSpec> = Vec::new();
    // (namespace, service name) -> slices
    let mut slices: BTreeMap<(&str, &str), Vec<&SliceSpec>> = BTreeMap::new();
    for object in objects {
        match object {
            Object::Service(svc) => services.push(svc),
            Object::Slice(slice) => slices
                .entry((slice.id.namespace.as_str(), slice.service_name.as_str()))
                .or_default()
                .push(slice),
        }
    }
    // Conflicts resolve the same way whatever order the objects came in: first by namespace/name.
    services.sort_by(|a, b| a.id.cmp(&b.id));

    let mut desired = Desired::default();
    for svc in services {
        match &svc.kind {
            ServiceKind::Headless => {
                desired.unprogrammed.push(Unprogrammed {
                    service: svc.id.clone(),
                    reason: "headless (clusterIP: None): DNS returns the pod IPs, nothing to load-balance"
                        .to_owned(),
                });
                continue;
            }
            ServiceKind::ExternalName(name) => {
                desired.unprogrammed.push(Unprogrammed {
                    service: svc.id.clone(),
                    reason: format!(
                        "ExternalName: only a DNS CNAME to {name:?}, nothing to load-balance"
                    ),
                });
                continue;
            }
            ServiceKind::Virtual => {}
        }
        let svc_slices = slices
            .get(&(svc.id.namespace.as_str(), svc.id.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &svc.ports {
            let backends = backends_for(svc_slices, &port.name, port.protocol);
            for &addr in &svc.cluster_ips {
                let frontend = Frontend {
                    addr,
                    port: port.port,
                    protocol: port.protocol,
                };
                if let Some(owner) = desired.frontends.get(&frontend) {
                    desired.problems.push(Problem {
                        severity: Severity::Error,
                        object: Some(svc.id.clone()),
                        location: "translation".to_owned(),
                        field: "spec.clusterIP".to_owned(),
                        message: format!(
                            "{frontend} is already used by {}; this port is left out",
                            owner.service
                        ),
                    });
                    continue;
                }
                desired.frontends.insert(
                    frontend,
                    FrontendPlan {
                        service: svc.id.clone(),
                        port_name: port.name.clone(),
                        backends: backends.clone(),
                    },
                );
            }
        }
    }
    desired
}

/// The ready endpoints of every slice, at the slice port matching the Service port's name and
/// protocol (the EndpointSlice controller writes the resolved target port there).
fn backends_for(slices: &[&SliceSpec], port_name: &str, protocol: Protocol) -> Vec<BackendAddr> {
    let mut backends = BTreeSet::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|ep| ep.ready) {
            backends.insert(BackendAddr {
                addr: ep.addr,
                port: slice_port.port,
            });
        }
    }
    backends.into_iter().collect()
}
