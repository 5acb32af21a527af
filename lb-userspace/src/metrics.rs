//! Prometheus metrics on `--metrics-bind-address`: how syncs go, and the packet path's outcome
//! counters read from the pinned maps at scrape time.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use lb_common::maps::{
    AFFINITY_MAP, BACKENDS_MAP, CONNTRACK_MAP, Capacities, SERVICES_MAP, SLOTS_MAP,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::dataplane::MapContents;

/// The agent's own metrics.
pub struct Metrics {
    registry: Registry,
    pub syncs: Counter,
    pub sync_failures: Counter,
    /// From the first unapplied change to the end of the sync that applied it.
    pub sync_latency: Histogram,
    /// kube-proxy's `sync_proxy_rules_duration_seconds`: how long one sync took.
    pub sync_duration: Histogram,
    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: Services with a `Local`
    /// policy and no endpoint on this node, by `traffic_policy` (internal, external).
    pub no_local_endpoints: Family<[(&'static str, &'static str); 1], Gauge>,
    /// kube-proxy's `network_programming_duration_seconds`: from the EndpointSlice
    /// controller's last-change-trigger-time of a Service's change to the maps holding it.
    pub network_programming_duration: Histogram,
    /// kube-proxy's `sync_proxy_rules_last_timestamp_seconds`: when the maps were last synced
    /// successfully (Unix time), to alert on staleness.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub frontends: Gauge,
    pub backends: Gauge,
    /// Frontends the last sync wanted but found no room for.
    pub frontends_unprogrammed: Gauge,
    pub services_unprogrammed: Gauge,
    /// Frontends with more backends than the largest Maglev table spreads evenly.
    pub frontends_uneven_tables: Gauge,
    /// Errors in Services and EndpointSlices at the last sync (such objects are rejected; their
    /// last good version, if any, stays).
    pub object_errors: Gauge,
    /// Conntrack entries (two per flow) at the last sweep.
    pub conntrack_entries: Gauge,
    pub conntrack_gc_deleted: Counter,
    /// Live conntrack entries whose other half the LRU evicted, at the last sweep.
    pub conntrack_orphans: Gauge,
    pub conntrack_gc_duration: Histogram,
    /// Each map's room, set at load, and its use: the programmed maps after each sync,
    /// conntrack after each sweep (`map` is the pinned map's name; slots count slots).
    pub map_capacity: Family<MapLabel, Gauge>,
    pub map_entries: Family<MapLabel, Gauge>,
    /// `map_entries / map_capacity` (Cilium's `bpf_map_pressure`).
    pub map_pressure: Family<MapLabel, Gauge<f64, AtomicU64>>,
}

/// The `map` label of the capacity metrics.
pub type MapLabel = [(&'static str, &'static str); 1];

impl Metrics {
    /// `bpffs_dir` and `state_dir`: the agent's, for the packet path's counters read at scrape
    /// time.
    pub fn new(bpffs_dir: PathBuf, state_dir: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("lb");
        let syncs = Counter::default();
        let sync_failures = Counter::default();
        let sync_latency = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        let network_programming_duration = Histogram::new([
            0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 120.0, 300.0,
        ]);
        let last_sync_timestamp = Gauge::<f64, AtomicU64>::default();
        let sync_duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "How long one sync of the maps took (as kube-proxy's \
             sync_proxy_rules_duration_seconds)",
            sync_duration.clone(),
        );
        let no_local_endpoints = Family::default();
        registry.register(
            "sync_proxy_rules_no_local_endpoints",
            "Services with a Local traffic policy and no endpoint on this node, by \
             traffic_policy (as kube-proxy's sync_proxy_rules_no_local_endpoints_total)",
            no_local_endpoints.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From a change's endpoints.kubernetes.io/last-change-trigger-time to the maps holding \
             it (as kube-proxy's network_programming_duration_seconds)",
            network_programming_duration.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "When the maps were last synced successfully, Unix time (alert when it falls behind \
             while changes are queued)",
            last_sync_timestamp.clone(),
        );
        let frontends = Gauge::default();
        let backends = Gauge::default();
        registry.register("syncs", "Syncs of the maps that succeeded", syncs.clone());
        registry.register(
            "sync_failures",
            "Syncs that failed (retried on the next change)",
            sync_failures.clone(),
        );
        registry.register(
            "sync_latency_seconds",
            "From a change arriving to the maps holding it",
            sync_latency.clone(),
        );
        registry.register(
            "frontends",
            "Programmed frontends (address, port, protocol)",
            frontends.clone(),
        );
        registry.register("backends", "Programmed backends", backends.clone());
        let frontends_unprogrammed = Gauge::default();
        let services_unprogrammed = Gauge::default();
        let object_errors = Gauge::default();
        let frontends_uneven_tables = Gauge::default();
        registry.register(
            "frontends_uneven_tables",
            "Frontends whose Maglev table gives its backends fewer than 100 slots each (more \
             than 1310 backends): their shares of new flows are less even",
            frontends_uneven_tables.clone(),
        );
        registry.register(
            "frontends_unprogrammed",
            "Frontends wanted but not programmed (no room left); /healthz fails while any",
            frontends_unprogrammed.clone(),
        );
        registry.register(
            "services_unprogrammed",
            "Services left out whole because some of their frontends found no room in the maps \
             (a Service is programmed whole or not at all); /healthz fails while any",
            services_unprogrammed.clone(),
        );
        registry.register(
            "object_errors",
            "Errors in Services and EndpointSlices at the last sync (those objects are rejected)",
            object_errors.clone(),
        );
        let conntrack_entries = Gauge::default();
        let conntrack_gc_deleted = Counter::default();
        let conntrack_orphans = Gauge::default();
        registry.register(
            "conntrack_orphaned_entries",
            "Live conntrack entries whose other half is gone at the last sweep: the LRU evicted \
             it because the map was full (the flow's replies or next packets are not \
             translated; raise --max-conntrack-flows)",
            conntrack_orphans.clone(),
        );
        let conntrack_gc_duration =
            Histogram::new([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register(
            "conntrack_entries",
            "Conntrack entries (two per flow) at the last sweep",
            conntrack_entries.clone(),
        );
        registry.register(
            "conntrack_gc_deleted",
            "Conntrack entries of dead flows the sweeps deleted",
            conntrack_gc_deleted.clone(),
        );
        registry.register(
            "conntrack_gc_duration_seconds",
            "How long one conntrack sweep took",
            conntrack_gc_duration.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        let map_entries = Family::<MapLabel, Gauge>::default();
        let map_pressure = Family::<MapLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "bpf_map_pressure",
            "Fill level of each map, map_entries / map_capacity (as Cilium's \
             bpf_map_pressure; at 1 the conntrack LRU evicts live flows and a full services, \
             backends or slots map leaves Services unprogrammed)",
            map_pressure.clone(),
        );
        registry.register(
            "map_capacity",
            "Entries each map has room for (slots for the slots array), as sized at load",
            map_capacity.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in use in each map: services, backends and slots after each sync, \
             conntrack after each sweep (alert on map_entries / map_capacity)",
            map_entries.clone(),
        );
        registry.register_collector(Box::new(PacketCounters {
            bpffs_dir: bpffs_dir.clone(),
        }));
        registry.register_collector(Box::new(ServiceCounters {
            bpffs_dir,
            state_dir,
        }));
        Self {
            registry,
            syncs,
            sync_failures,
            sync_latency,
            sync_duration,
            no_local_endpoints,
            network_programming_duration,
            last_sync_timestamp,
            frontends,
            backends,
            frontends_unprogrammed,
            services_unprogrammed,
            frontends_uneven_tables,
            object_errors,
            conntrack_entries,
            conntrack_gc_deleted,
            conntrack_orphans,
            conntrack_gc_duration,
            map_capacity,
            map_entries,
            map_pressure,
        }
    }

    /// Sets `lb_map_entries` of `map` and its `lb_bpf_map_pressure` against its capacity.
    pub fn set_entries(&self, map: &'static str, entries: u64) {
        let label = [("map", map)];
        self.map_entries.get_or_create(&label).set(entries as i64);
        let capacity = self.map_capacity.get_or_create(&label).get();
        if capacity > 0 {
            (self.map_pressure.get_or_create(&label)).set(entries as f64 / capacity as f64);
        }
    }

    /// Sets `lb_map_capacity` from the maps as loaded.
    pub fn set_capacities(&self, capacities: &Capacities) {
        for (map, entries) in [
            (SERVICES_MAP, capacities.frontends),
            (BACKENDS_MAP, capacities.backends),
            (SLOTS_MAP, capacities.slots),
            (CONNTRACK_MAP, capacities.conntrack),
            (AFFINITY_MAP, capacities.affinity),
        ] {
            self.map_capacity
                .get_or_create(&[("map", map)])
                .set(i64::from(entries));
        }
    }

    /// Sets `lb_map_entries` of the maps a sync writes from what is programmed.
    pub fn set_programmed(&self, programmed: &MapContents) {
        let slots: u64 = programmed.tables.keys().map(|r| u64::from(r.size)).sum();
        for (map, entries) in [
            (SERVICES_MAP, programmed.services.len() as u64),
            (BACKENDS_MAP, programmed.backends.len() as u64),
            (SLOTS_MAP, slots),
        ] {
            self.set_entries(map, entries);
        }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!("encoding metrics: {err}");
        }
        text
    }
}

/// `lb_packets_total{outcome=...}`, summed over CPUs, read when scraped.
#[derive(Debug)]
struct PacketCounters {
    bpffs_dir: PathBuf,
}

impl Collector for PacketCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(counters) = crate::loader::pinned_counters(&self.bpffs_dir) else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(
            "packets",
            "Packets the packet path handled, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (counter, packets) in counters {
            let labels = [("outcome", counter.name())];
            ConstCounter::new(packets).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Per-Service and per-backend counters, read from the pinned maps when scraped and named by
/// the state file: `lb_service_*` summed over a Service port's frontends (ClusterIP, NodePorts,
/// LoadBalancer IPs...), `lb_backend_*` per endpoint and Service port.
#[derive(Debug)]
struct ServiceCounters {
    bpffs_dir: PathBuf,
    state_dir: PathBuf,
}

/// namespace, service, port name.
type ServicePort = (String, String, String);

fn labels<'a>(
    sp: &'a ServicePort,
    extra: &[(&'static str, &'a str)],
) -> Vec<(&'static str, &'a str)> {
    let mut out = vec![
        ("namespace", sp.0.as_str()),
        ("service", sp.1.as_str()),
        ("port_name", sp.2.as_str()),
    ];
    out.extend_from_slice(extra);
    out
}

fn encode_counters<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ServiceCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(maps) = crate::inspect::PinnedMaps::open(&self.bpffs_dir) else {
            return Ok(());
        };
        let Ok(state) = crate::state::NodeState::read(&self.state_dir) else {
            return Ok(());
        };
        let views = crate::inspect::services::collect(&maps, Some(&state));
        let mut services: BTreeMap<ServicePort, lb_common::stats::ServiceStats> = BTreeMap::new();
        let mut backends: BTreeMap<(ServicePort, String), lb_common::stats::BackendStats> =
            BTreeMap::new();
        let mut backend_ids: BTreeSet<(ServicePort, u32)> = BTreeSet::new();
        for view in views.iter().filter(|v| v.not_programmed.is_none()) {
            for f in &view.frontends {
                let sp = (
                    view.namespace.clone(),
                    view.name.clone(),
                    f.port_name.clone(),
                );
                services.entry(sp.clone()).or_default().add(&f.counters);
                for b in &f.backends {
                    // A backend serves every frontend of its Service port: counted once.
                    if backend_ids.insert((sp.clone(), b.backend_id)) {
                        (backends.entry((
                            sp.clone(),
                            std::net::SocketAddr::new(b.address, b.port).to_string(),
                        )))
                        .or_default()
                        .add(&b.counters);
                    }
                }
            }
        }
        for (direction, pick) in [
            (
                "forward",
                (|s: &lb_common::stats::ServiceStats| s.forward_packets) as fn(&_) -> u64,
            ),
            ("reply", |s| s.reply_packets),
        ] {
            encode_counters(
                &mut encoder,
                &format!("service_packets_{direction}"),
                &format!(
                    "Packets of a Service port ({direction}: {}), over its frontends",
                    if direction == "forward" {
                        "client to Service"
                    } else {
                        "backend to client"
                    }
                ),
                services.iter().map(|(sp, s)| (labels(sp, &[]), pick(s))),
            )?;
        }
        encode_counters(
            &mut encoder,
            "service_bytes_forward",
            "Bytes from clients to a Service port, over its frontends",
            services
                .iter()
                .map(|(sp, s)| (labels(sp, &[]), s.forward_bytes)),
        )?;
        encode_counters(
            &mut encoder,
            "service_bytes_reply",
            "Bytes from a Service port's backends to clients, over its frontends",
            services
                .iter()
                .map(|(sp, s)| (labels(sp, &[]), s.reply_bytes)),
        )?;
        encode_counters(
            &mut encoder,
            "service_new_flows",
            "Connections (flows) a Service port started",
            services
                .iter()
                .map(|(sp, s)| (labels(sp, &[]), s.new_flows)),
        )?;
        encode_counters(
            &mut encoder,
            "service_dropped_flows",
            "New flows to a Service port dropped or rejected, by reason",
            services.iter().flat_map(|(sp, s)| {
                [
                    ("no_backend", s.no_backend),
                    ("source_range", s.denied_source_range),
                    ("snat_failed", s.snat_failed),
                ]
                .map(|(reason, n)| (labels(sp, &[("reason", reason)]), n))
            }),
        )?;
        encode_counters(
            &mut encoder,
            "backend_packets_forward",
            "Packets sent to a backend of a Service port",
            backends
                .iter()
                .map(|((sp, b), s)| (labels(sp, &[("backend", b.as_str())]), s.forward_packets)),
        )?;
        encode_counters(
            &mut encoder,
            "backend_packets_reply",
            "Packets from a backend of a Service port to its clients",
            backends
                .iter()
                .map(|((sp, b), s)| (labels(sp, &[("backend", b.as_str())]), s.reply_packets)),
        )?;
        encode_counters(
            &mut encoder,
            "backend_bytes_forward",
            "Bytes sent to a backend of a Service port",
            backends
                .iter()
                .map(|((sp, b), s)| (labels(sp, &[("backend", b.as_str())]), s.forward_bytes)),
        )?;
        encode_counters(
            &mut encoder,
            "backend_bytes_reply",
            "Bytes from a backend of a Service port to its clients",
            backends
                .iter()
                .map(|((sp, b), s)| (labels(sp, &[("backend", b.as_str())]), s.reply_bytes)),
        )?;
        encode_counters(
            &mut encoder,
            "backend_new_flows",
            "Connections a backend of a Service port was given",
            backends
                .iter()
                .map(|((sp, b), s)| (labels(sp, &[("backend", b.as_str())]), s.new_flows)),
        )?;
        Ok(())
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> JoinHandle<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    m.render(),
                )
                    .into_response()
            }),
        )
        .with_state(metrics);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {err}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_fill_is_exported_beside_each_maps_capacity() {
        let metrics = Metrics::new(PathBuf::from("/nonexistent"), PathBuf::from("/nonexistent"));
        let capacities = Capacities {
            frontends: 64,
            backends: 128,
            slots: 2048,
            conntrack: 512,
            conntrack6: 128,
            affinity: 32,
        };
        metrics.set_capacities(&capacities);
        // Two ClusterIP Services of two backends each: two 251-slot tables.
        let manifest: String = (1..=2)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: t}}\n\
                     spec: {{clusterIP: 10.96.0.{i}, ports: [{{port: 80}}]}}\n---\n\
                     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: s{i}, namespace: t, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                     addressType: IPv4\nports: [{{port: 8080}}]\n\
                     endpoints: [{{addresses: [10.1.{i}.1]}}, {{addresses: [10.1.{i}.2]}}]\n---\n"
                )
            })
            .collect();
        let read = crate::manifest::parse(&manifest, "test");
        assert!(read.problems.is_empty(), "{:?}", read.problems);
        let desired = crate::translate::translate(&read.objects, &Default::default());
        let mut programmer = crate::sync::Programmer::adopt(Default::default(), Default::default());
        programmer
            .sync(&desired, &mut MapContents::default())
            .expect("sync");
        let programmed = programmer.programmed();
        metrics.set_programmed(programmed);
        let text = metrics.render();
        for (name, map, value) in [
            ("capacity", SERVICES_MAP, 64),
            ("capacity", BACKENDS_MAP, 128),
            ("capacity", SLOTS_MAP, 2048),
            ("capacity", CONNTRACK_MAP, 512),
            ("capacity", AFFINITY_MAP, 32),
            ("entries", SERVICES_MAP, 2),
            ("entries", BACKENDS_MAP, 4),
            ("entries", SLOTS_MAP, 502),
        ] {
            let line = format!("lb_map_{name}{{map=\"{map}\"}} {value}\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        for (map, pressure) in [
            (SERVICES_MAP, "0.03125"),
            (BACKENDS_MAP, "0.03125"),
            (SLOTS_MAP, "0.2451171875"),
        ] {
            let line = format!("lb_bpf_map_pressure{{map=\"{map}\"}} {pressure}\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }
}
