//! The Kubernetes API as a source of objects: watchers (list + watch, relisting on `410 Gone` or a
//! dropped connection, retrying with backoff while the API server is away) feeding reflector
//! stores of trimmed objects. Validation is cached per resourceVersion, so a snapshot only
//! re-validates what changed.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::{
    Metadata,
    api::{
        core::v1::{Node, NodeStatus, Service, ServiceStatus},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use super::{LastGood, ObjectSource, Snapshot};
use crate::model::{
    self, MAGLEV_TABLE_SIZE_ANNOTATION, Object, ObjectRef, Problem, TOPOLOGY_HINTS_ANNOTATION,
    TOPOLOGY_MODE_ANNOTATION,
};

/// The label carrying a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Where API objects come from, in problem reports.
const LOCATION: &str = "API server";

/// Annotations translation reads; every other annotation is dropped from the cache.
const KEPT_ANNOTATIONS: [&str; 3] = [
    MAGLEV_TABLE_SIZE_ANNOTATION,
    TOPOLOGY_MODE_ANNOTATION,
    TOPOLOGY_HINTS_ANNOTATION,
];

/// What one validation of an object version produced.
struct Validation {
    resource_version: Option<String>,
    object: Option<Arc<Object>>,
    problems: Vec<Problem>,
    /// The snapshot that last saw the object (older ones are gone from the store).
    seen_in: u64,
}

/// Watches Services, EndpointSlices and this agent's Node.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    changed: Arc<Notify>,
    /// Per watched resource: its initial list has completed at least once.
    listed: Vec<Arc<AtomicBool>>,
    tasks: Vec<JoinHandle<()>>,
    validated: HashMap<ObjectRef, Validation>,
    last_good: LastGood,
    snapshots: u64,
}

impl KubeSource {
    /// Starts the watchers on the current tokio runtime. Nothing is contacted synchronously: an
    /// API server that is down is retried with backoff while the caller keeps serving.
    pub fn start(client: Client, node_name: &str) -> Self {
        let changed = Arc::new(Notify::new());
        let mut listed = Vec::new();
        let mut tasks = Vec::new();
        let services = watch(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            trim_service,
            &changed,
            &mut listed,
            &mut tasks,
        );
        let slices = watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            trim_slice,
            &changed,
            &mut listed,
            &mut tasks,
        );
        let nodes = watch(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            trim_node,
            &changed,
            &mut listed,
            &mut tasks,
        );
        Self {
            services,
            slices,
            nodes,
            changed,
            listed,
            tasks,
            validated: HashMap::new(),
            last_good: LastGood::default(),
            snapshots: 0,
        }
    }

    /// Waits for the next change (coalesced: many changes wake it once).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Every watcher has completed its initial list: a snapshot now reflects the cluster.
    pub fn ready(&self) -> bool {
        self.listed.iter().all(|l| l.load(Ordering::Acquire))
    }

    /// The zone of this agent's Node, once seen.
    pub fn node_zone(&self) -> Option<String> {
        self.nodes
            .state()
            .first()
            .and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
    }

    /// Validated objects from the stores, re-validating only versions not seen before.
    fn read(&mut self) -> Snapshot {
        self.snapshots += 1;
        let generation = self.snapshots;
        let services = self.services.state();
        let slices = self.slices.state();
        let mut verdicts = Vec::with_capacity(services.len() + slices.len());
        let mut problems = Vec::new();
        let all = services
            .iter()
            .map(|s| (model::Kind::Service, s.metadata(), Either::Service(s)))
            .chain(
                slices
                    .iter()
                    .map(|s| (model::Kind::EndpointSlice, s.metadata(), Either::Slice(s))),
            );
        for (kind, meta, object) in all {
            let id = model::object_ref(kind, meta);
            let validation = match self.validated.get_mut(&id) {
                Some(v) if v.resource_version == meta.resource_version => v,
                _ => {
                    let validated = match object {
                        Either::Service(s) => model::validate_service(s, LOCATION),
                        Either::Slice(s) => model::validate_slice(s, LOCATION),
                    };
                    self.validated.insert(
                        id.clone(),
                        Validation {
                            resource_version: meta.resource_version.clone(),
                            object: validated.object.map(Arc::new),
                            problems: validated.problems,
                            seen_in: generation,
                        },
                    );
                    self.validated.get_mut(&id).expect("just inserted")
                }
            };
            validation.seen_in = generation;
            problems.extend(validation.problems.iter().cloned());
            verdicts.push((id, validation.object.clone()));
        }
        self.validated.retain(|_, v| v.seen_in == generation);
        let kept_last_good = self.last_good.update(verdicts);
        Snapshot {
            objects: self.last_good.to_vec(),
            problems,
            kept_last_good,
            node_zone: self.node_zone(),
        }
    }
}

impl ObjectSource for KubeSource {
    fn ready(&self) -> bool {
        KubeSource::ready(self)
    }

    fn snapshot(&mut self) -> Option<Snapshot> {
        Some(self.read())
    }
}

enum Either<'a> {
    Service(&'a Service),
    Slice(&'a EndpointSlice),
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs one watcher into a reflector store; every change wakes `changed` once its first list is
/// complete. Relists (after `410 Gone` or a dropped watch) swap the store's contents in one step
/// when the new list is complete, so a relist never looks like everything was deleted.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    changed: &Arc<Notify>,
    listed: &mut Vec<Arc<AtomicBool>>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let done = Arc::new(AtomicBool::new(false));
    listed.push(done.clone());
    let changed = changed.clone();
    let kind = K::kind(&());
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(trim));
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => info!(%kind, "listing"),
                Ok(watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    info!(%kind, "listed; watching");
                    done.store(true, Ordering::Release);
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    if done.load(Ordering::Acquire) {
                        changed.notify_one();
                    }
                }
                // The watcher retries with backoff (and relists if its version is gone).
                Err(err) => warn!(%kind, "watch failed, retrying: {err}"),
            }
        }
    }));
    reader
}

fn trim_meta(meta: &mut ObjectMeta, keep_annotations: bool) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    match (&mut meta.annotations, keep_annotations) {
        (Some(annotations), true) => {
            annotations.retain(|k, _| KEPT_ANNOTATIONS.contains(&k.as_str()));
        }
        (annotations, _) => *annotations = None,
    }
}

/// Keeps what translation reads: spec, labels, our annotations, the load balancer status.
fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata, true);
    let load_balancer = svc.status.take().and_then(|s| s.load_balancer);
    svc.status = load_balancer.map(|lb| ServiceStatus {
        load_balancer: Some(lb),
        ..ServiceStatus::default()
    });
}

fn trim_slice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata, false);
    for ep in slice.endpoints.iter_mut().flatten() {
        ep.target_ref = None;
        ep.deprecated_topology = None;
    }
}

/// Only the labels (zone) and addresses of our own Node; its status is otherwise large.
fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata, false);
    node.spec = None;
    let addresses = node.status.take().and_then(|s| s.addresses);
    node.status = Some(NodeStatus {
        addresses,
        ..NodeStatus::default()
    });
}
