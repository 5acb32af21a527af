//! `lb services` (and the per-Service metrics): every programmed frontend with its backends,
//! policies and counters, grouped by Service, from the maps and named by the state file.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    service::{ANY_SOURCE, BACKEND_F_DRAINING, BACKEND_F_REMOTE, BackendId, SERVICE_F_REJECT},
    stats::{BackendStats, ServiceStats},
};
use serde::Serialize;

use super::PinnedMaps;
use crate::{model::Protocol, state::NodeState};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    /// Why nothing of it is programmed (DNS-only Services, another proxy's...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_programmed: Option<String>,
    /// `externalTrafficPolicy` and `internalTrafficPolicy` (absent without a state file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    pub frontends: Vec<FrontendView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// ClusterIP, NodePort, externalIP or LoadBalancer ("?" without a state file).
    pub kind: String,
    pub port_name: String,
    pub service_id: u32,
    /// Cluster or Local.
    pub policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    pub maglev_table_size: u32,
    /// New flows only from `loadBalancerSourceRanges`.
    pub source_ranges: Vec<String>,
    /// With no backend: reject or drop.
    pub when_empty: &'static str,
    pub backends: Vec<BackendView>,
    pub counters: ServiceStats,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub backend_id: BackendId,
    pub address: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// ready, terminating, not ready ("?" without a state file).
    pub condition: String,
    /// On another node (flows from outside are SNATed).
    pub remote: bool,
    /// Takes no new flows.
    pub draining: bool,
    /// Its share of the Maglev table.
    pub slots: u32,
    pub counters: BackendStats,
}

/// Every programmed frontend, grouped by Service (named by `state` when given), and the
/// Services `state` lists as not programmed.
pub fn collect(maps: &PinnedMaps, state: Option<&NodeState>) -> Vec<ServiceView> {
    let service_stats = maps.service_stats();
    let backend_stats = maps.backend_stats();
    let index = state.map(NodeState::frontend_index).unwrap_or_default();
    let endpoints: BTreeMap<IpAddr, &crate::state::EndpointInfo> = state
        .iter()
        .flat_map(|s| &s.services)
        .flat_map(|s| &s.endpoints)
        .map(|e| (e.address, e))
        .collect();
    let mut services: BTreeMap<(String, String), ServiceView> = BTreeMap::new();
    let entries = maps.all_services();
    // Each table read once, in offset order: the slots array is mapped a window at a time, and
    // reading tables in the hash's order would map a window for nearly every frontend.
    let ranges: BTreeSet<(u32, u32)> = (entries.iter())
        .map(|(_, e)| (e.table_offset, e.table_size))
        .collect();
    let shares: BTreeMap<(u32, u32), BTreeMap<BackendId, u32>> = ranges
        .into_iter()
        .map(|(offset, size)| {
            let mut slots: BTreeMap<BackendId, u32> = BTreeMap::new();
            for index in offset..offset + size {
                if let Some(id) = maps.slot(index) {
                    *slots.entry(id).or_default() += 1;
                }
            }
            ((offset, size), slots)
        })
        .collect();
    let backends = maps.all_backends();
    for (key, entry) in entries {
        let address = lb_common::addr::ip_from_wide(key.addr_be);
        let port = u16::from_be(key.port_be);
        let protocol = Protocol::from_number(key.proto).map_or("?".to_owned(), |p| p.to_string());
        let named = index.get(&key);
        let (namespace, name, type_name) = match named {
            Some((s, _)) => (s.namespace.clone(), s.name.clone(), s.type_name.clone()),
            None => (
                "?".to_owned(),
                format!("service-id-{}", entry.service_id),
                "?".to_owned(),
            ),
        };
        let policies = named.map(|(s, _)| {
            (
                s.external_traffic_policy.clone(),
                s.internal_traffic_policy.clone(),
            )
        });
        let table = &shares[&(entry.table_offset, entry.table_size)];
        let backends = backends_of(table, &backends, &endpoints, &backend_stats);
        let frontend = FrontendView {
            address,
            port,
            protocol: protocol.clone(),
            kind: named.map_or("?".to_owned(), |(_, f)| f.kind.clone()),
            port_name: named.map_or(String::new(), |(_, f)| f.port_name.clone()),
            service_id: entry.service_id,
            policy: named.map_or("?".to_owned(), |(_, f)| f.policy.clone()),
            affinity_timeout_s: (entry.affinity_timeout_s != 0).then_some(entry.affinity_timeout_s),
            maglev_table_size: entry.table_size,
            source_ranges: if entry.source_ranges_id == ANY_SOURCE {
                Vec::new()
            } else {
                named.map_or_else(
                    || vec![format!("set {}", entry.source_ranges_id)],
                    |(s, _)| s.source_ranges.clone(),
                )
            },
            when_empty: if entry.flags & SERVICE_F_REJECT != 0 {
                "reject"
            } else {
                "drop"
            },
            backends,
            counters: service_stats
                .get(&entry.service_id)
                .copied()
                .unwrap_or_default(),
        };
        services
            .entry((namespace.clone(), name.clone()))
            .or_insert_with(|| ServiceView {
                namespace,
                name,
                type_name,
                not_programmed: None,
                external_traffic_policy: policies.as_ref().map(|p| p.0.clone()),
                internal_traffic_policy: policies.map(|p| p.1),
                frontends: Vec::new(),
            })
            .frontends
            .push(frontend);
    }
    for s in state.iter().flat_map(|s| &s.services) {
        let key = (s.namespace.clone(), s.name.clone());
        if services.contains_key(&key) {
            continue;
        }
        services.insert(
            key,
            ServiceView {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                type_name: s.type_name.clone(),
                not_programmed: Some(
                    s.not_programmed
                        .clone()
                        .unwrap_or_else(|| "no frontend in the maps".to_owned()),
                ),
                external_traffic_policy: Some(s.external_traffic_policy.clone()),
                internal_traffic_policy: Some(s.internal_traffic_policy.clone()),
                frontends: Vec::new(),
            },
        );
    }
    let mut out: Vec<ServiceView> = services.into_values().collect();
    for s in &mut out {
        s.frontends.sort_by(|a, b| {
            (kind_order(&a.kind), a.address, a.port, &a.protocol).cmp(&(
                kind_order(&b.kind),
                b.address,
                b.port,
                &b.protocol,
            ))
        });
    }
    out
}

fn kind_order(kind: &str) -> u8 {
    match kind {
        "ClusterIP" => 0,
        "NodePort" => 1,
        "externalIP" => 2,
        "LoadBalancer" => 3,
        _ => 4,
    }
}

/// The backends of a frontend's Maglev table (`table`: backend id -> slots), from every
/// backend in the map (`known`).
fn backends_of(
    table: &BTreeMap<BackendId, u32>,
    known: &BTreeMap<BackendId, crate::dataplane::BackendValue>,
    endpoints: &BTreeMap<IpAddr, &crate::state::EndpointInfo>,
    stats: &BTreeMap<BackendId, BackendStats>,
) -> Vec<BackendView> {
    let mut out: Vec<BackendView> = table
        .iter()
        .filter_map(|(&id, &slots)| {
            let b = known.get(&id)?;
            let address = lb_common::addr::ip_from_wide(b.addr_be);
            let endpoint = endpoints.get(&address);
            Some(BackendView {
                backend_id: id,
                address,
                port: u16::from_be(b.port_be),
                node: endpoint.and_then(|e| e.node.clone()),
                condition: endpoint.map_or("?".to_owned(), |e| e.condition().to_owned()),
                remote: b.flags & BACKEND_F_REMOTE != 0,
                draining: b.flags & BACKEND_F_DRAINING != 0,
                slots,
                counters: stats.get(&id).copied().unwrap_or_default(),
            })
        })
        .collect();
    out.sort_by_key(|b| (b.address, b.port));
    out
}

/// Bytes for people: 1.2 KiB, 3.4 MiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The table `lb services` prints: a row per frontend.
pub fn render(services: &[ServiceView]) -> String {
    let mut table = super::table(&[
        "SERVICE", "TYPE", "FRONTEND", "BACKENDS", "POLICY", "FLOWS", "IN", "OUT", "DROPS",
    ]);
    for s in services {
        let name = format!("{}/{}", s.namespace, s.name);
        if let Some(reason) = &s.not_programmed {
            table.add_row([
                name,
                s.type_name.clone(),
                "-".to_owned(),
                format!("(not programmed: {reason})"),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        }
        for f in &s.frontends {
            let backends = if f.backends.is_empty() {
                format!("(none: {})", f.when_empty)
            } else {
                f.backends
                    .iter()
                    .map(|b| {
                        let mut text = std::net::SocketAddr::new(b.address, b.port).to_string();
                        if let Some(node) = &b.node {
                            text.push_str(&format!(" {node}"));
                        }
                        if b.condition != "ready" {
                            text.push_str(&format!(" ({})", b.condition));
                        }
                        text
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let mut policy = vec![f.policy.clone()];
            if let Some(t) = f.affinity_timeout_s {
                policy.push(format!("affinity {t}s"));
            }
            if !f.source_ranges.is_empty() {
                policy.push(format!("from {}", f.source_ranges.join(",")));
            }
            if f.maglev_table_size > 0 {
                policy.push(format!("maglev {}", f.maglev_table_size));
            }
            let port = if f.port_name.is_empty() {
                String::new()
            } else {
                format!(" ({})", f.port_name)
            };
            let c = &f.counters;
            table.add_row([
                name.clone(),
                f.kind.clone(),
                format!(
                    "{}/{}{port}",
                    std::net::SocketAddr::new(f.address, f.port),
                    f.protocol
                ),
                backends,
                policy.join("\n"),
                c.new_flows.to_string(),
                format!(
                    "{} pkts\n{}",
                    c.forward_packets,
                    human_bytes(c.forward_bytes)
                ),
                format!("{} pkts\n{}", c.reply_packets, human_bytes(c.reply_bytes)),
                c.drops().to_string(),
            ]);
        }
    }
    table.to_string()
}
