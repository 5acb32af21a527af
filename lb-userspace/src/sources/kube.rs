//! The Kubernetes API as a source of objects: watchers (list + watch, relisting on `410 Gone` or a
//! dropped connection, retrying with backoff while the API server is away) validate each new
//! version of a Service or EndpointSlice as it arrives and keep only the validated model. A
//! snapshot takes what arrived since the last one, so its work follows the change.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Node, NodeStatus, Service},
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

use super::{ObjectSource, ObjectStore, Snapshot};
use crate::model::{self, Object, ObjectRef, Problem};

/// The label carrying a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Where API objects come from, in problem reports.
const LOCATION: &str = "API server";

/// The latest word on an object since the last snapshot: validated (the object, or `None` if
/// rejected, and the problems), or `None` when it was deleted.
type Inbox = HashMap<ObjectRef, Option<(Option<Arc<Object>>, Vec<Problem>)>>;

/// Watches Services, EndpointSlices and this agent's Node.
pub struct KubeSource {
    nodes: Store<Node>,
    /// Filled by the watch tasks, emptied by each snapshot.
    inbox: Arc<Mutex<Inbox>>,
    changed: Arc<Notify>,
    /// Per watched resource: its initial list has completed at least once.
    listed: Vec<Arc<AtomicBool>>,
    tasks: Vec<JoinHandle<()>>,
    store: ObjectStore,
    /// The problems of each object that has any.
    problems: BTreeMap<ObjectRef, Vec<Problem>>,
}

impl KubeSource {
    /// Starts the watchers on the current tokio runtime. Nothing is contacted synchronously: an
    /// API server that is down is retried with backoff while the caller keeps serving.
    pub fn start(client: Client, node_name: &str) -> Self {
        let changed = Arc::new(Notify::new());
        let inbox = Arc::new(Mutex::new(Inbox::new()));
        let mut listed = Vec::new();
        let mut tasks = Vec::new();
        let mut flags = || {
            let done = Arc::new(AtomicBool::new(false));
            listed.push(done.clone());
            done
        };
        let (service_done, slice_done, node_done) = (flags(), flags(), flags());
        tasks.push(tokio::spawn(watch_objects(
            Api::<Service>::all(client.clone()),
            model::Kind::Service,
            model::validate_service,
            inbox.clone(),
            changed.clone(),
            service_done,
        )));
        tasks.push(tokio::spawn(watch_objects(
            Api::<EndpointSlice>::all(client.clone()),
            model::Kind::EndpointSlice,
            model::validate_slice,
            inbox.clone(),
            changed.clone(),
            slice_done,
        )));
        let nodes = watch_node(client, node_name, &changed, node_done, &mut tasks);
        Self {
            nodes,
            inbox,
            changed,
            listed,
            tasks,
            store: ObjectStore::default(),
            problems: BTreeMap::new(),
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

    /// Takes what the watchers delivered since the last snapshot: work in proportion to the
    /// changes, not to the cluster.
    fn read(&mut self) -> Snapshot {
        let delivered = std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, verdict) in delivered {
            match verdict {
                Some((object, problems)) => {
                    if problems.is_empty() {
                        self.problems.remove(&id);
                    } else {
                        self.problems.insert(id.clone(), problems);
                    }
                    self.store.put(&id, object);
                }
                None => {
                    self.problems.remove(&id);
                    self.store.remove(&id);
                }
            }
        }
        Snapshot {
            problems: self.problems.values().flatten().cloned().collect(),
            node_zone: self.node_zone(),
            ..self.store.take_changes()
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

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Watches one kind of object and delivers each new version, validated, to `inbox` (the API
/// objects themselves are dropped at once: only the validated model is kept). Unchanged
/// versions (same resourceVersion, as a relist after `410 Gone` or a dropped watch replays
/// them) are not delivered again, and a relist deletes what it no longer lists only once it is
/// complete, so it never looks like everything was deleted. Every delivery after the first
/// complete list wakes `changed`.
async fn watch_objects<K>(
    api: Api<K>,
    kind: model::Kind,
    validate: fn(&K, &str) -> model::Validated,
    inbox: Arc<Mutex<Inbox>>,
    changed: Arc<Notify>,
    done: Arc<AtomicBool>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    // id -> the resourceVersion delivered.
    let mut known: HashMap<ObjectRef, Option<String>> = HashMap::new();
    let mut relisted: HashSet<ObjectRef> = HashSet::new();
    let deliver = |id: ObjectRef, verdict| {
        inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, verdict);
    };
    let apply = |object: &K, known: &mut HashMap<ObjectRef, Option<String>>| {
        let meta = object.meta();
        let id = model::object_ref(kind, meta);
        if known.get(&id) == Some(&meta.resource_version) {
            return id;
        }
        known.insert(id.clone(), meta.resource_version.clone());
        let validated = validate(object, LOCATION);
        deliver(
            id.clone(),
            Some((validated.object.map(Arc::new), validated.problems)),
        );
        id
    };
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                info!(%kind, "listing");
                relisted.clear();
            }
            Ok(watcher::Event::InitApply(object)) => {
                relisted.insert(apply(&object, &mut known));
            }
            Ok(watcher::Event::InitDone) => {
                known.retain(|id, _| {
                    let listed = relisted.contains(id);
                    if !listed {
                        deliver(id.clone(), None);
                    }
                    listed
                });
                relisted = HashSet::new();
                info!(%kind, "listed; watching");
                done.store(true, Ordering::Release);
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(object)) => {
                apply(&object, &mut known);
                if done.load(Ordering::Acquire) {
                    changed.notify_one();
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                let id = model::object_ref(kind, object.meta());
                known.remove(&id);
                deliver(id, None);
                if done.load(Ordering::Acquire) {
                    changed.notify_one();
                }
            }
            // The watcher retries with backoff (and relists if its version is gone).
            Err(err) => warn!(%kind, "watch failed, retrying: {err}"),
        }
    }
}

/// This agent's Node into a reflector store (its zone and addresses are read from there).
fn watch_node(
    client: Client,
    node_name: &str,
    changed: &Arc<Notify>,
    done: Arc<AtomicBool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<Node> {
    let (reader, writer) = reflector::store();
    let changed = changed.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client), config)
            .default_backoff()
            .modify(trim_node),
    );
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    done.store(true, Ordering::Release);
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    if done.load(Ordering::Acquire) {
                        changed.notify_one();
                    }
                }
                Ok(_) => {}
                Err(err) => warn!(kind = "Node", "watch failed, retrying: {err}"),
            }
        }
    }));
    reader
}

fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.annotations = None;
}

/// Only the labels (zone) and addresses of our own Node; its status is otherwise large.
fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata);
    node.spec = None;
    let addresses = node.status.take().and_then(|s| s.addresses);
    node.status = Some(NodeStatus {
        addresses,
        ..NodeStatus::default()
    });
}
