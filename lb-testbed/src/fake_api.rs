//! An in-process fake Kubernetes API server for tests: real HTTP/1.1 that a real `kube::Client`
//! talks to through a kubeconfig, with the list and watch semantics its watchers rely on:
//! resourceVersions, watch streams from a version, bookmarks, `410 Gone` for versions compacted
//! away, and connections dropped on demand.
//!
//! It serves Services, `discovery.k8s.io/v1` EndpointSlices and Nodes (with
//! `fieldSelector=metadata.name=...`). Label selectors and pagination are not implemented: every
//! list returns everything in one page.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    body::Body,
    extract::{Query, State as AxumState},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::{Metadata, Resource, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::netns::Netns;

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone)]
struct Stored {
    resource_version: u64,
    object: Value,
}

#[derive(Clone)]
struct WatchEvent {
    resource_version: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Collection {
    /// (namespace, name) -> object
    objects: BTreeMap<(String, String), Stored>,
    history: Vec<WatchEvent>,
}

struct State {
    resource_version: u64,
    /// By URL segment: "services", "endpointslices", "nodes".
    collections: BTreeMap<&'static str, Collection>,
    /// Watching from a version at or below this one gets `410 Gone`.
    compacted_through: u64,
    /// Bumped to end every open watch stream.
    generation: u64,
    /// Requests served, by "list <resource>" / "watch <resource>".
    requests: BTreeMap<String, usize>,
}

/// What the HTTP handlers and the test share.
struct Shared {
    state: Mutex<State>,
    wake: broadcast::Sender<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake API server. Dropping it stops its listeners. Its methods are on [`FakeHandle`]
/// (through `Deref`), which tests can clone into async code.
pub struct FakeApi {
    handle: FakeHandle,
    /// Taken on drop: shut down in the background, which is allowed from async code too.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Changes objects and serves listeners of a [`FakeApi`].
#[derive(Clone)]
pub struct FakeHandle {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl std::ops::Deref for FakeApi {
    type Target = FakeHandle;
    fn deref(&self) -> &FakeHandle {
        &self.handle
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

const RESOURCES: [(&str, &str, &str); 3] = [
    ("services", "v1", "ServiceList"),
    ("endpointslices", "discovery.k8s.io/v1", "EndpointSliceList"),
    ("nodes", "v1", "NodeList"),
];

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    #[serde(default)]
    watch: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    field_selector: Option<String>,
    #[serde(default)]
    allow_watch_bookmarks: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

impl FakeApi {
    /// A fake with no objects and no listener yet.
    pub fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let collections = RESOURCES
            .iter()
            .map(|(segment, _, _)| (*segment, Collection::default()))
            .collect();
        Ok(Self {
            handle: FakeHandle {
                shared: Arc::new(Shared {
                    state: Mutex::new(State {
                        resource_version: 1,
                        collections,
                        compacted_through: 0,
                        generation: 0,
                        requests: BTreeMap::new(),
                    }),
                    wake: broadcast::channel(1024).0,
                }),
                runtime: runtime.handle().clone(),
            },
            runtime: Some(runtime),
        })
    }

    /// A handle to use from other threads or async code.
    pub fn clone_handle(&self) -> FakeHandle {
        self.handle.clone()
    }

    /// Writes a kubeconfig that points a client at `server` (e.g. `http://127.0.0.1:1234`).
    pub fn write_kubeconfig(path: &Path, server: &str) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{server}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n"
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl FakeHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Listens on `addr` (port 0: any) in this process's network namespace.
    pub fn listen(&self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        // Tests send traffic only inside namespaces they own, or on a loopback.
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the fake API server listens on a loopback address only, not {addr}"
        );
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        self.serve(listener)
    }

    /// Listens on `addr` inside `ns` (e.g. on a testbed node's loopback, so an agent there can
    /// reach it without linking the namespace to anything).
    pub fn listen_in(&self, ns: &Netns, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
        self.serve(listener)
    }

    fn serve(&self, listener: std::net::TcpListener) -> anyhow::Result<SocketAddr> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let app = self.router();
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        self.runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(local)
    }

    fn router(&self) -> Router {
        let mut router = Router::new();
        for (segment, api_version, _) in RESOURCES {
            let path = if api_version == "v1" {
                format!("/api/v1/{segment}")
            } else {
                format!("/apis/{api_version}/{segment}")
            };
            router = router.route(
                &path,
                get(
                    move |AxumState(shared): AxumState<Arc<Shared>>,
                          Query(params): Query<ListParams>| async move {
                        handle(&shared, segment, params)
                    },
                ),
            );
        }
        router.with_state(self.shared.clone())
    }

    /// Creates or replaces an object (Service, EndpointSlice or Node).
    pub fn apply<K>(&self, object: &K)
    where
        K: Resource + Serialize + Metadata<Ty = ObjectMeta>,
    {
        let meta = object.metadata();
        let key = (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let mut value = serde_json::to_value(object).expect("k8s-openapi objects serialize");
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        if value["metadata"]["uid"].is_null() {
            value["metadata"]["uid"] = json!(format!("uid-{}-{}", key.0, key.1));
        }
        let collection = state
            .collections
            .get_mut(K::URL_PATH_SEGMENT)
            .expect("a resource the fake serves");
        let kind = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.objects.insert(
            key,
            Stored {
                resource_version: rv,
                object: value.clone(),
            },
        );
        collection.history.push(WatchEvent {
            resource_version: rv,
            kind,
            object: value,
        });
        drop(state);
        let _ = self.shared.wake.send(());
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete<K: Resource>(&self, namespace: &str, name: &str) -> bool {
        let mut state = self.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        let collection = state
            .collections
            .get_mut(K::URL_PATH_SEGMENT)
            .expect("a resource the fake serves");
        let Some(mut gone) = collection
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        gone.object["metadata"]["resourceVersion"] = json!(rv.to_string());
        collection.history.push(WatchEvent {
            resource_version: rv,
            kind: "DELETED",
            object: gone.object,
        });
        drop(state);
        let _ = self.shared.wake.send(());
        true
    }

    /// Forgets the event history, as etcd compaction does: a watch resuming from any version
    /// seen so far gets `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted_through = state.resource_version;
        for collection in state.collections.values_mut() {
            collection.history.clear();
        }
    }

    /// Ends every open watch stream, as an API server restart or a load balancer timeout does.
    pub fn drop_watches(&self) {
        self.lock().generation += 1;
        let _ = self.shared.wake.send(());
    }

    /// How many list and watch requests each resource got, e.g. `"list services"`.
    pub fn requests(&self, what: &str) -> usize {
        self.lock().requests.get(what).copied().unwrap_or(0)
    }
}

fn handle(shared: &Arc<Shared>, segment: &'static str, params: ListParams) -> Response {
    let watching = params
        .watch
        .as_deref()
        .is_some_and(|w| w == "true" || w == "1");
    let name_filter = params
        .field_selector
        .as_deref()
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned);
    let mut state = shared.lock();
    *state
        .requests
        .entry(format!(
            "{} {segment}",
            if watching { "watch" } else { "list" }
        ))
        .or_default() += 1;
    if !watching {
        return list_response(&state, segment, name_filter.as_deref());
    }
    let from: u64 = params
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if from != 0 && from <= state.compacted_through {
        let gone = json!({
            "type": "ERROR",
            "object": {
                "apiVersion": "v1", "kind": "Status", "metadata": {},
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", state.compacted_through + 1),
            }
        });
        return stream_response(Body::from(format!("{gone}\n")));
    }
    // Without a version a watch starts with the current objects, as the API does.
    let initial: Vec<WatchEvent> = if from == 0 {
        state.collections[segment]
            .objects
            .values()
            .map(|s| WatchEvent {
                resource_version: s.resource_version,
                kind: "ADDED",
                object: s.object.clone(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let watch = Watch {
        shared: shared.clone(),
        segment,
        from: if from == 0 {
            state.resource_version
        } else {
            from
        },
        generation: state.generation,
        name_filter,
        bookmarks: params.allow_watch_bookmarks.as_deref() == Some("true"),
        deadline: params
            .timeout_seconds
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s)),
        pending: initial,
        wake: shared.wake.subscribe(),
    };
    drop(state);
    stream_response(Body::from_stream(futures::stream::unfold(
        watch,
        |mut watch| async move {
            let chunk = watch.next_chunk().await?;
            Some((Ok::<_, std::io::Error>(chunk), watch))
        },
    )))
}

fn stream_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

fn list_response(state: &State, segment: &str, name: Option<&str>) -> Response {
    let (_, api_version, list_kind) = RESOURCES
        .iter()
        .find(|(s, _, _)| *s == segment)
        .expect("a resource the fake serves");
    let items: Vec<&Value> = state.collections[segment]
        .objects
        .iter()
        .filter(|((_, n), _)| name.is_none_or(|want| n == want))
        .map(|(_, s)| &s.object)
        .collect();
    let body = json!({
        "apiVersion": api_version,
        "kind": list_kind,
        "metadata": { "resourceVersion": state.resource_version.to_string() },
        "items": items,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// One open watch stream.
struct Watch {
    shared: Arc<Shared>,
    segment: &'static str,
    /// Events after this version are still to be sent.
    from: u64,
    generation: u64,
    name_filter: Option<String>,
    bookmarks: bool,
    deadline: Option<tokio::time::Instant>,
    pending: Vec<WatchEvent>,
    wake: broadcast::Receiver<()>,
}

impl Watch {
    /// The next lines to send, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<String> {
        loop {
            if !self.pending.is_empty() {
                let lines: String = self
                    .pending
                    .drain(..)
                    .map(|e| format!("{}\n", json!({"type": e.kind, "object": e.object})))
                    .collect();
                return Some(lines);
            }
            {
                let state = self.shared.lock();
                if state.generation != self.generation {
                    return None;
                }
                let name = self.name_filter.clone();
                let fresh: Vec<WatchEvent> = state.collections[self.segment]
                    .history
                    .iter()
                    .filter(|e| e.resource_version > self.from)
                    .filter(|e| {
                        name.as_deref()
                            .is_none_or(|n| e.object["metadata"]["name"] == json!(n))
                    })
                    .cloned()
                    .collect();
                self.from = state.resource_version;
                if !fresh.is_empty() {
                    self.pending = fresh;
                    continue;
                }
            }
            let now = tokio::time::Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                return None;
            }
            let tick = tokio::time::sleep(BOOKMARK_EVERY);
            tokio::select! {
                _ = self.wake.recv() => {}
                _ = tick => {
                    if self.bookmarks {
                        let (_, api_version, list_kind) = RESOURCES
                            .iter()
                            .find(|(s, _, _)| *s == self.segment)
                            .expect("a resource the fake serves");
                        let kind = list_kind.trim_end_matches("List");
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": api_version, "kind": kind,
                                "metadata": { "resourceVersion": self.from.to_string() },
                            }
                        });
                        return Some(format!("{bookmark}\n"));
                    }
                }
            }
        }
    }
}
