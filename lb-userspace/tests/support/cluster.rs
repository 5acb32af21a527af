//! The two-node testbed with echo pods and one agent per node, for the namespace tests.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_testbed::{
    echo::{Conversation, EchoServer, Reply},
    fake_api::FakeApi,
    testbed::{AgentOptions, AgentProcess, Cluster},
};

pub const ECHO_TCP_PORT: u16 = 8080;
pub const ECHO_UDP_PORT: u16 = 5353;

/// The testbed, its echo pods and agents, and the manifest file (or fake API server) the agents
/// read.
pub struct Running {
    pub agents: Vec<AgentProcess>,
    _servers: Vec<EchoServer>,
    pub manifest: PathBuf,
    manifest_dir: PathBuf,
    /// With [`Running::start_kubernetes`]: the API server the agents watch.
    pub api: Option<FakeApi>,
    /// How the agents were started (for restarts).
    pub options: AgentOptions,
    // Dropped last, after the agents stopped.
    pub cluster: Cluster,
}

/// How the agents find their objects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    /// The manifest file.
    None,
    /// The fake API server, through the kubeconfig.
    Kubeconfig,
    /// The fake API server, through `--master` (the kubeconfig's address is dead).
    ThroughMaster,
}

/// Where the fake API server listens in each node's namespace (its loopback).
pub const API_ADDRESS: &str = "127.0.0.1:6443";

/// The Services and EndpointSlices of a multi-document YAML text, as API objects.
pub fn api_objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    use serde::Deserialize as _;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_yaml_ng::Value::deserialize(document).expect("valid YAML");
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => services.push(serde_yaml_ng::from_value(value).expect("a Service")),
            Some("EndpointSlice") => {
                slices.push(serde_yaml_ng::from_value(value).expect("a slice"))
            }
            _ => {}
        }
    }
    (services, slices)
}

pub fn example_manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

impl Running {
    /// Builds the testbed, starts echo servers in every pod but `client-1`, and an agent per
    /// node on the bundled example.
    pub fn start(xdp: bool) -> Self {
        Self::start_with(xdp, false)
    }

    /// Like [`Running::start`], but the agents watch a fake API server (listening on each node's
    /// loopback) holding the example's objects and the two Nodes.
    pub fn start_kubernetes() -> Self {
        Self::start_with(false, true)
    }

    /// Like [`Running::start`] with another `lb` binary (e.g. an older release) and agent flags.
    pub fn start_with_agent(lb: &Path, extra_args: &[&str]) -> Self {
        Self::start_full(
            false,
            Api::None,
            lb,
            AgentOptions {
                extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
                ..AgentOptions::default()
            },
        )
    }

    /// Like [`Running::start`] with these agent options.
    pub fn start_with_options(options: AgentOptions) -> Self {
        Self::start_full(
            false,
            Api::None,
            Path::new(env!("CARGO_BIN_EXE_lb")),
            options,
        )
    }

    /// Like [`Running::start_kubernetes`], but the kubeconfig names an address where nothing
    /// listens (as in-cluster configuration names a ClusterIP nobody programs on a
    /// kube-proxy-free node) and `--master` gives the real one.
    pub fn start_kubernetes_via_master() -> Self {
        Self::start_full(
            false,
            Api::ThroughMaster,
            Path::new(env!("CARGO_BIN_EXE_lb")),
            AgentOptions {
                extra_args: vec!["--master".to_owned(), format!("http://{API_ADDRESS}")],
                ..AgentOptions::default()
            },
        )
    }

    fn start_with(xdp: bool, kubernetes: bool) -> Self {
        let api = if kubernetes {
            Api::Kubeconfig
        } else {
            Api::None
        };
        Self::start_full(
            xdp,
            api,
            Path::new(env!("CARGO_BIN_EXE_lb")),
            AgentOptions {
                xdp,
                ..AgentOptions::default()
            },
        )
    }

    fn start_full(xdp: bool, api_mode: Api, lb: &Path, mut options: AgentOptions) -> Self {
        let kubernetes = api_mode != Api::None;
        lb_testbed::cleanup::install_interrupt_handler();
        let cluster = Cluster::two_nodes().expect("build the testbed");
        if xdp {
            cluster
                .prepare_for_xdp()
                .expect("prepare the underlay for XDP");
        }
        let servers = cluster
            .pods()
            .filter(|p| p.name != "client-1")
            .map(|p| {
                EchoServer::start(&p.ns, &p.name, ECHO_TCP_PORT, ECHO_UDP_PORT)
                    .expect("start echo pod")
            })
            .collect();
        let manifest_dir = std::env::temp_dir().join(format!("{}-manifests", cluster.run_id));
        std::fs::create_dir_all(&manifest_dir).unwrap();
        let manifest = manifest_dir.join("services.yaml");
        std::fs::write(&manifest, example_manifest()).unwrap();
        let api = kubernetes.then(|| {
            let api = FakeApi::new().expect("fake API server");
            for node in &cluster.nodes {
                api.listen_in(&node.ns, API_ADDRESS.parse().unwrap())
                    .expect("listen in the node's namespace");
                api.apply(&Node {
                    metadata: ObjectMeta {
                        name: Some(node.name.clone()),
                        ..ObjectMeta::default()
                    },
                    ..Node::default()
                });
            }
            let (services, slices) = api_objects(&example_manifest());
            for svc in &services {
                api.apply(svc);
            }
            for slice in &slices {
                api.apply(slice);
            }
            let kubeconfig = manifest_dir.join("kubeconfig");
            let server = if api_mode == Api::ThroughMaster {
                // Nothing listens there (the node's own loopback).
                "http://127.0.0.1:1".to_owned()
            } else {
                format!("http://{API_ADDRESS}")
            };
            FakeApi::write_kubeconfig(&kubeconfig, &server).unwrap();
            options.kubeconfig = Some(kubeconfig);
            api
        });
        let agents = start_agents(&cluster, lb, &manifest, &options);
        Self {
            agents,
            _servers: servers,
            manifest,
            manifest_dir,
            api,
            options,
            cluster,
        }
    }

    /// Stops both agents with `signal`, leaving the packet path in place, runs `while_down`,
    /// and starts agents (this build's `lb`) again with the same settings. Returns how long the
    /// agents were away.
    pub fn restart_agents(&mut self, signal: i32, while_down: impl FnOnce(&Self)) -> Duration {
        let stopped = std::time::Instant::now();
        for agent in std::mem::take(&mut self.agents) {
            agent.halt(signal).expect("stop the agent");
        }
        while_down(self);
        self.agents = start_agents(
            &self.cluster,
            Path::new(env!("CARGO_BIN_EXE_lb")),
            &self.manifest,
            &self.options,
        );
        stopped.elapsed()
    }

    /// Writes the manifest without waiting for an agent (e.g. while none runs).
    pub fn write_manifest(&self, text: &str) {
        let staged = self.manifest_dir.join("services.yaml.new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &self.manifest).unwrap();
    }

    pub fn agent(&mut self, node: &str) -> &mut AgentProcess {
        let index = ["node-1", "node-2"]
            .iter()
            .position(|n| *n == node)
            .expect("node-1 or node-2");
        &mut self.agents[index]
    }

    /// Replaces the manifest (write + rename, as editors and ConfigMap updates do) and waits
    /// until every agent applied it.
    pub fn change_manifest(&mut self, text: &str) {
        let before: Vec<usize> = self
            .agents
            .iter()
            .map(|a| a.log().matches("synced").count())
            .collect();
        let staged = self.manifest_dir.join("services.yaml.new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &self.manifest).unwrap();
        for (agent, count) in self.agents.iter_mut().zip(before) {
            agent
                .wait_for_log_count("synced", count + 1, Duration::from_secs(10))
                .expect("agent applies the changed manifest");
        }
    }

    /// Runs `f` in the namespace of a pod, a node, or `outside`.
    pub fn from<T: Send + 'static>(&self, who: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = if who == "outside" {
            &self.cluster.outside.ns
        } else if who.starts_with("node-") {
            &self.cluster.node(who).ns
        } else {
            &self.cluster.pod(who).ns
        };
        ns.run(f).expect("client thread")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.agents.clear();
        // Agents halted on purpose left their pins (and attached programs) for a successor.
        for node in &self.cluster.nodes {
            lb_testbed::cleanup::remove_pin_dir(&self.cluster.agent_pin_dir(&node.name));
        }
        self.api = None;
        let _ = std::fs::remove_dir_all(&self.manifest_dir);
    }
}

/// An agent on each node, ready.
fn start_agents(
    cluster: &Cluster,
    lb: &Path,
    manifest: &Path,
    options: &AgentOptions,
) -> Vec<AgentProcess> {
    ["node-1", "node-2"]
        .iter()
        .map(|node| {
            AgentProcess::start(cluster, node, lb, manifest, options)
                .unwrap_or_else(|e| panic!("start the agent on {node}: {e:#}"))
        })
        .collect()
}

pub fn at(addr: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr), port)
}

/// `n` TCP requests, each on a new connection; panics with context on failure.
pub fn tcp_many(target: impl Into<SocketAddr>, n: usize) -> Vec<Reply> {
    let target = target.into();
    (0..n)
        .map(|i| {
            lb_testbed::echo::tcp_request(target)
                .unwrap_or_else(|e| panic!("TCP request {i} to {target}: {e:#}"))
        })
        .collect()
}

/// `n` UDP requests, each from a new socket.
pub fn udp_many(target: impl Into<SocketAddr>, n: usize) -> Vec<Reply> {
    let target = target.into();
    (0..n)
        .map(|i| {
            lb_testbed::echo::udp_request(target)
                .unwrap_or_else(|e| panic!("UDP request {i} to {target}: {e:#}"))
        })
        .collect()
}

/// Whether a TCP connection to `target` gets anywhere within `timeout`.
pub fn tcp_outcome(target: impl Into<SocketAddr>, timeout: Duration) -> std::io::Result<Reply> {
    let mut conversation = Conversation::open(target, timeout)?;
    conversation
        .ask()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
}

pub fn pods(replies: &[Reply]) -> std::collections::BTreeSet<String> {
    replies.iter().map(|r| r.pod.clone()).collect()
}

pub fn set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// `GET path` over plain HTTP/1.1 (health checks, /metrics); the status line, headers and
/// body as received.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}
