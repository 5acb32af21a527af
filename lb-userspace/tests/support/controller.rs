//! The controller against a fake API server over real HTTP: on this namespace's loopback
//! (127.0.0.1, an ephemeral port; no privilege needed), or inside a network namespace of its own
//! for tests that also open servers (the fake listens on that namespace's loopback; the client's
//! runtime lives there too).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::port_host;
use lb_testbed::{fake_api::FakeApi, netns::Netns};
use lb_userspace::{
    dataplane::{MapContents, TableRange},
    model::Problem,
    pipeline::Pipeline,
    sources::{KubeSource, ObjectSource as _},
    sync::SyncStats,
    translate::{Desired, NodeContext},
};

/// The fake API server listening on a loopback, with a kubeconfig for it.
pub struct ApiHarness {
    pub fake: FakeApi,
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    // Dropped last: the fake's listener lives in it.
    pub ns: Option<Netns>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl ApiHarness {
    /// The fake on 127.0.0.1 of the namespace this test runs in: it binds nothing else and
    /// needs no privilege, so controller tests run as any user.
    pub fn on_loopback(test: &str) -> Self {
        let fake = FakeApi::new().expect("fake API server");
        let addr = fake
            .listen("127.0.0.1:0".parse().unwrap())
            .expect("listen on loopback");
        let kubeconfig = std::env::temp_dir().join(format!(
            "lb-controller-{}-{}-{test}.kubeconfig",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        FakeApi::write_kubeconfig(&kubeconfig, &format!("http://{addr}")).unwrap();
        Self {
            fake,
            addr,
            kubeconfig,
            ns: None,
        }
    }

    /// The fake in a network namespace of its own (needs root), for tests that also open
    /// servers: they stay inside the namespace.
    pub fn in_namespace(test: &str) -> Self {
        lb_testbed::cleanup::install_interrupt_handler();
        lb_testbed::cleanup::sweep_stale();
        let ns = Netns::create(&format!(
            "{}{}-api{}",
            lb_testbed::cleanup::NETNS_PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
        .expect("create the test namespace");
        let fake = FakeApi::new().expect("fake API server");
        let addr = fake
            .listen_in(&ns, "127.0.0.1:0".parse().unwrap())
            .expect("listen in the namespace");
        let kubeconfig = std::env::temp_dir().join(format!("{}-{test}.kubeconfig", ns.name()));
        FakeApi::write_kubeconfig(&kubeconfig, &format!("http://{addr}")).unwrap();
        Self {
            fake,
            addr,
            kubeconfig,
            ns: Some(ns),
        }
    }

    /// Runs `test` on a tokio runtime whose threads live in the harness's namespace.
    pub fn run<F, T>(&self, test: impl FnOnce() -> F + Send + 'static) -> T
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        let Some(ns) = &self.ns else {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            let out = runtime.block_on(test());
            runtime.shutdown_background();
            return out;
        };
        let runtime = ns.tokio_runtime().expect("runtime in the namespace");
        ns.run(move || {
            let out = runtime.block_on(test());
            runtime.shutdown_background();
            out
        })
        .expect("test thread")
    }
}

impl Drop for ApiHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The agent's sync loop without BPF: the Kubernetes source and the agent's own pipeline step,
/// writing to in-memory maps.
pub struct Controller {
    pub source: KubeSource,
    pub pipeline: Pipeline,
    pub maps: MapContents,
    pub node: NodeContext,
    pub problems: Vec<Problem>,
    /// Every sync's write counts, in order.
    pub syncs: Vec<SyncStats>,
    /// Every sync's change trigger times, in order.
    pub triggers: Vec<SystemTime>,
}

impl Controller {
    pub async fn start(kubeconfig: &PathBuf, node: NodeContext) -> Self {
        let client = lb_userspace::agent::kube_client(Some(kubeconfig), None)
            .await
            .expect("client");
        let source = KubeSource::start(client, node.name.as_deref().unwrap_or("node-1"));
        Self {
            source,
            pipeline: Pipeline::default(),
            maps: MapContents::default(),
            node,
            problems: Vec::new(),
            syncs: Vec::new(),
            triggers: Vec::new(),
        }
    }

    /// One sync, as the agent does it (only once the first lists are complete).
    pub fn sync(&mut self) {
        if !self.source.ready() {
            return;
        }
        let snapshot = self
            .source
            .snapshot()
            .expect("the API source always has a snapshot");
        let step = self.pipeline.step(snapshot, &mut self.node, &mut self.maps);
        let (stats, unplaced) = step.programmed.expect("in-memory writes cannot fail");
        assert!(unplaced.is_empty(), "{unplaced:?}");
        self.problems = step.problems;
        self.triggers.extend(&step.change_triggers);
        self.syncs.push(stats);
    }

    /// Syncs on every change until `done` holds, or panics after 10 s saying what it waited for.
    pub async fn wait_until(&mut self, what: &str, done: impl Fn(&Controller) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            self.sync();
            if self.source.ready() && done(self) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; programmed: {:#?}; problems: {:#?}",
                    programmed(&self.maps),
                    self.problems
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), self.source.changed()).await;
        }
    }

    /// What translation asks for, as of the last sync.
    pub fn desired(&self) -> &Desired {
        self.pipeline.desired()
    }

    pub fn frontends(&self) -> BTreeMap<String, BTreeSet<String>> {
        programmed(&self.maps)
    }
}

/// `"10.96.0.1:80/TCP" -> {"10.244.1.1:8080", ...}` (IPv6 as `"[fd00:96::1]:80/TCP"`) as the
/// packet path would see it.
pub fn programmed(maps: &MapContents) -> BTreeMap<String, BTreeSet<String>> {
    maps.services
        .iter()
        .map(|(key, entry)| {
            let proto = if key.proto == lb_common::IPPROTO_TCP {
                "TCP"
            } else {
                "UDP"
            };
            let frontend = format!(
                "{}/{proto}",
                SocketAddr::new(
                    lb_common::addr::ip_from_wide(key.addr_be),
                    port_host(key.port_be)
                )
            );
            let range = TableRange {
                offset: entry.table_offset,
                size: entry.table_size,
            };
            let backends = maps
                .tables
                .get(&range)
                .map(|table| {
                    table
                        .iter()
                        .filter_map(|id| maps.backends.get(&id))
                        .map(|b| {
                            SocketAddr::new(
                                lb_common::addr::ip_from_wide(b.addr_be),
                                port_host(b.port_be),
                            )
                            .to_string()
                        })
                        .collect()
                })
                .unwrap_or_default();
            (frontend, backends)
        })
        .collect()
}

/// A ClusterIP Service `ns/name` on `ip` with one TCP port 80 -> named port `http`.
pub fn service(ns: &str, name: &str, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.to_owned()),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn with_label(mut svc: Service, key: &str, value: &str) -> Service {
    svc.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(key.to_owned(), value.to_owned());
    svc
}

/// A LoadBalancer with `externalTrafficPolicy: Local`, NodePort 30100 and healthCheckNodePort.
pub fn local_load_balancer(ns: &str, name: &str, ip: &str, lb_ip: &str, hc_port: i32) -> Service {
    let mut svc = service(ns, name, ip);
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("LoadBalancer".to_owned());
    spec.external_traffic_policy = Some("Local".to_owned());
    spec.health_check_node_port = Some(hc_port);
    spec.ports.as_mut().unwrap()[0].node_port = Some(30100);
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some(lb_ip.to_owned()),
                ..LoadBalancerIngress::default()
            }]),
        }),
        ..ServiceStatus::default()
    });
    svc
}

/// A slice of Service `service` with port `http` 8080 and ready endpoints `(address, node)`,
/// of `addressType` IPv6 when the addresses are.
/// [`slice`] with the EndpointSlice controller's last-change-trigger-time annotation.
pub fn slice_triggered_at(
    ns: &str,
    name: &str,
    service: &str,
    endpoints: &[(&str, &str)],
    at: &str,
) -> EndpointSlice {
    let mut slice = slice(ns, name, service, endpoints);
    slice.metadata.annotations = Some(
        [(
            lb_userspace::model::LAST_CHANGE_TRIGGER_TIME_ANNOTATION.to_owned(),
            at.to_owned(),
        )]
        .into(),
    );
    slice
}

pub fn slice(ns: &str, name: &str, service: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let ipv6 = endpoints.iter().any(|(addr, _)| addr.contains(':'));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(
                [(
                    lb_userspace::model::SERVICE_NAME_LABEL.to_owned(),
                    service.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: if ipv6 { "IPv6" } else { "IPv4" }.to_owned(),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(8080),
            ..EndpointPort::default()
        }]),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(addr, node)| Endpoint {
                    addresses: vec![(*addr).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..EndpointConditions::default()
                    }),
                    node_name: Some((*node).to_owned()),
                    ..Endpoint::default()
                })
                .collect(),
        ),
    }
}

pub fn node(name: &str, zone: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [(
                    lb_userspace::sources::ZONE_LABEL.to_owned(),
                    zone.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}
