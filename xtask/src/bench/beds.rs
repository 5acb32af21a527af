//! The variants under test, each on a testbed of its own: the same two-node layout, the same
//! measured Services and servers, and only the Service implementation differs. All beds exist at
//! once, so the rounds can alternate between them without reloading 10,000 Services each time;
//! an idle bed costs nothing (netfilter hooks and BPF programs are per namespace).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use lb_testbed::{
    cleanup,
    kube_proxy_layouts::{
        IPTABLES_RESTORE, Protocol, SyntheticService, iptables_restore, manifests_yaml, nft_script,
        synthetic_cluster,
    },
    loadgen::{AcceptServer, UdpCounter},
    netns::Netns,
    testbed::{AgentOptions, AgentProcess, Cluster, POD_CIDR},
};
use serde::{Deserialize, Serialize};

/// A Service implementation being compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No load balancer: clients address the backend pod itself.
    Direct,
    /// kube-proxy's iptables-mode rule layout, loaded with iptables-legacy-restore.
    Iptables,
    /// kube-proxy's nftables-mode layout, loaded with nft -f.
    Nftables,
    /// lb's tc programs.
    LbTc,
    /// lb's tc programs plus its XDP fast path on the external interfaces.
    LbXdp,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Direct,
        Variant::Iptables,
        Variant::Nftables,
        Variant::LbTc,
        Variant::LbXdp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Iptables => "iptables layout",
            Variant::Nftables => "nftables layout",
            Variant::LbTc => "lb (tc)",
            Variant::LbXdp => "lb (xdp)",
        }
    }

    /// Whether the variant changes anything on `path`. lb's XDP program sits on the external
    /// interfaces only: pod-to-ClusterIP traffic takes exactly lb (tc)'s path, so it is not
    /// measured twice.
    pub fn applies_to(self, path: TrafficPath) -> bool {
        match path {
            // XDP sits on the external interfaces only.
            TrafficPath::ClusterIp => self != Variant::LbXdp,
            TrafficPath::NodePort => true,
            // The kube-proxy layouts here are IPv4 rule sets (no ip6tables / ip6 nat tables).
            TrafficPath::ClusterIp6 => matches!(self, Variant::Direct | Variant::LbTc),
            TrafficPath::NodePort6 => {
                matches!(self, Variant::Direct | Variant::LbTc | Variant::LbXdp)
            }
        }
    }
}

/// Which way traffic reaches the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficPath {
    /// client-1 (a pod on node-1) to a ClusterIP whose endpoint is pod-c on node-2.
    ClusterIp,
    /// The outside client to node-1's address and a NodePort whose endpoint is pod-c on node-2.
    NodePort,
    /// [`TrafficPath::ClusterIp`] over IPv6 (the pods' and the Services' IPv6 addresses).
    ClusterIp6,
    /// [`TrafficPath::NodePort`] over IPv6 (node-1's IPv6 address).
    NodePort6,
}

impl TrafficPath {
    /// For chart groups.
    pub fn short_label(self) -> &'static str {
        match self {
            TrafficPath::ClusterIp => "pod → ClusterIP",
            TrafficPath::NodePort => "external → NodePort",
            TrafficPath::ClusterIp6 => "pod → ClusterIP (IPv6)",
            TrafficPath::NodePort6 => "external → NodePort (IPv6)",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TrafficPath::ClusterIp => "pod → ClusterIP → remote pod",
            TrafficPath::NodePort => "external → NodePort → remote pod",
            TrafficPath::ClusterIp6 => "pod → ClusterIP → remote pod, IPv6",
            TrafficPath::NodePort6 => "external → NodePort → remote pod, IPv6",
        }
    }
}

/// The servers the workloads talk to, all in pod-c, and their Services (placed last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Iperf,
    Sockperf,
    Accept,
    Udp,
}

impl Server {
    const ALL: [Server; 4] = [Server::Iperf, Server::Sockperf, Server::Accept, Server::Udp];

    /// The pod port, which is also the Service port.
    pub fn port(self) -> u16 {
        match self {
            Server::Iperf => 5201,
            Server::Sockperf => 11111,
            Server::Accept => 9000,
            Server::Udp => 9001,
        }
    }

    fn node_port(self) -> u16 {
        match self {
            Server::Iperf => 30201,
            Server::Sockperf => 31111,
            Server::Accept => 30900,
            Server::Udp => 30901,
        }
    }

    /// The measured Service's IPv6 twin: its ClusterIP (the IPv4 one's twin).
    fn cluster_ip6(self) -> Ipv6Addr {
        lb_testbed::testbed::ipv6_twin(self.cluster_ip())
    }

    /// The IPv6 twin's NodePort.
    fn node_port6(self) -> u16 {
        self.node_port() + 1
    }

    fn cluster_ip(self) -> Ipv4Addr {
        let last = match self {
            Server::Iperf => 1,
            Server::Sockperf => 2,
            Server::Accept => 3,
            Server::Udp => 4,
        };
        Ipv4Addr::new(10, 96, 100, last)
    }

    fn name(self) -> &'static str {
        match self {
            Server::Iperf => "iperf",
            Server::Sockperf => "sockperf",
            Server::Accept => "accept",
            Server::Udp => "udp-sink",
        }
    }
}

/// How many measured Services every scale adds to its synthetic ones.
pub const MEASURED_SERVICES: usize = Server::ALL.len();

/// The backend pod of every measured Service: on node-2, so both paths cross the underlay.
pub const BACKEND_POD: &str = "pod-c";
/// The pod client of the ClusterIP path: on node-1.
pub const CLIENT_POD: &str = "client-1";
/// The node the outside client sends NodePort traffic to.
pub const ENTRY_NODE: &str = "node-1";

/// The measured Services, one per server, with pod-c as their only endpoint (iperf3 opens a
/// control and a data connection that must reach the same server).
pub fn measured_services(backend: Ipv4Addr) -> Vec<SyntheticService> {
    Server::ALL
        .iter()
        .map(|&server| SyntheticService {
            namespace: "bench".to_owned(),
            name: format!("measured-{}", server.name()),
            cluster_ip: server.cluster_ip(),
            protocol: if server == Server::Udp {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            port: server.port(),
            node_port: Some(server.node_port()),
            endpoints: vec![(backend, server.port())],
        })
        .collect()
}

/// The measured Services' IPv6 twins (IPv6 single-stack, pod-c's IPv6 address as endpoint), for
/// lb's manifests: the IPv6 paths.
fn measured_ipv6_yaml(backend: Ipv6Addr) -> String {
    let mut out = String::new();
    for server in [Server::Iperf, Server::Accept] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: measured6-{name}, namespace: bench}}\n\
             spec: {{type: NodePort, ipFamilyPolicy: SingleStack, ipFamilies: [IPv6], \
             clusterIPs: [\"{ip}\"], ports: [{{name: port, protocol: TCP, port: {port}, \
             nodePort: {node_port}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: measured6-{name}-1, namespace: bench, \
             labels: {{kubernetes.io/service-name: measured6-{name}}}}}\n\
             addressType: IPv6\nports: [{{name: port, protocol: TCP, port: {port}}}]\n\
             endpoints:\n- addresses: [\"{backend}\"]\n---\n",
            name = server.name(),
            ip = server.cluster_ip6(),
            port = server.port(),
            node_port = server.node_port6(),
        );
    }
    out
}

/// `synthetic` Services plus the measured ones, last.
pub fn cluster_services(synthetic: usize) -> Vec<SyntheticService> {
    let backend = lb_testbed::testbed::LAYOUT
        .iter()
        .flat_map(|n| n.pods)
        .find(|(name, _)| *name == BACKEND_POD)
        .map(|(_, ip)| *ip)
        .expect("the layout has the backend pod");
    synthetic_cluster(synthetic, measured_services(backend))
}

/// lb's flags in every bed: none. Its Maglev tables follow the backend count (251 slots for
/// the synthetic Services' two backends), so 10,000 Services fit with the defaults.
pub fn lb_agent_args() -> Vec<String> {
    Vec::new()
}

/// A child process killed when dropped.
pub struct Daemon(Option<Child>);

impl Daemon {
    pub fn spawn(ns: &Netns, cmd: &mut Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(Self(Some(ns.spawn(cmd)?)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
            cleanup::forget_child(child.id());
        }
    }
}

/// One variant's testbed, programmed with a cluster and serving the workloads.
pub struct Bed {
    pub variant: Variant,
    // Dropped before the cluster: servers and agents live in its namespaces.
    _servers: (Daemon, Daemon, AcceptServer),
    pub udp_sink: UdpCounter,
    agents: Vec<AgentProcess>,
    pub cluster: Cluster,
}

impl Bed {
    /// Builds the testbed, starts the servers and programs `services` the variant's way, on both
    /// nodes (in a real cluster every node has every rule, and the backend's node walks them too).
    pub fn start(
        variant: Variant,
        services: &[SyntheticService],
        lb: &Path,
        manifests: &Path,
    ) -> anyhow::Result<Self> {
        let cluster = Cluster::two_nodes()?;
        // Connection-rate clients cycle through source ports quickly.
        for ns in [&cluster.pod(CLIENT_POD).ns, &cluster.outside.ns] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        }
        let backend = &cluster.pod(BACKEND_POD).ns;
        let iperf = Daemon::spawn(
            backend,
            Command::new("iperf3").args(["--server", "--port", &Server::Iperf.port().to_string()]),
        )?;
        let sockperf = Daemon::spawn(
            backend,
            Command::new("sockperf").args([
                "server",
                "--tcp",
                "--ip",
                "0.0.0.0",
                "--port",
                &Server::Sockperf.port().to_string(),
            ]),
        )?;
        let accept = AcceptServer::start(backend, Server::Accept.port())?;
        let udp_sink = UdpCounter::start(backend, Server::Udp.port())?;

        let mut agents = Vec::new();
        match variant {
            Variant::Direct => {
                // The outside client reaches pods through node-1, as a routed network would.
                let via = cluster.node(ENTRY_NODE).ip.to_string();
                cluster
                    .outside
                    .ns
                    .ip(&["route", "add", POD_CIDR, "via", &via])?;
                let via6 = cluster.node(ENTRY_NODE).ip6.to_string();
                cluster.outside.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    lb_testbed::testbed::POD_CIDR6,
                    "via",
                    &via6,
                ])?;
            }
            Variant::Iptables => {
                let rules = iptables_restore(services, POD_CIDR);
                load_on_every_node(&cluster, IPTABLES_RESTORE, &["--noflush"], &rules)?;
            }
            Variant::Nftables => {
                let script = nft_script(services, POD_CIDR);
                load_on_every_node(&cluster, "nft", &["-f", "-"], &script)?;
            }
            Variant::LbTc | Variant::LbXdp => {
                let xdp = variant == Variant::LbXdp;
                if xdp {
                    cluster.prepare_for_xdp()?;
                }
                let backend6 = cluster.pod(BACKEND_POD).ip6;
                std::fs::write(
                    manifests,
                    manifests_yaml(services) + &measured_ipv6_yaml(backend6),
                )
                .with_context(|| format!("writing {}", manifests.display()))?;
                let options = AgentOptions {
                    xdp,
                    // The manifest never changes during the run.
                    poll_ms: 60_000,
                    extra_args: lb_agent_args(),
                    ..AgentOptions::default()
                };
                for node in &cluster.nodes {
                    agents.push(AgentProcess::start(
                        &cluster, &node.name, lb, manifests, &options,
                    )?);
                }
            }
        }
        let bed = Self {
            variant,
            _servers: (iperf, sockperf, accept),
            udp_sink,
            agents,
            cluster,
        };
        bed.wait_for_servers()?;
        Ok(bed)
    }

    /// Where `server` is reached on `path` in this variant.
    pub fn target(&self, path: TrafficPath, server: Server) -> SocketAddr {
        let pod = self.cluster.pod(BACKEND_POD);
        let entry = self.cluster.node(ENTRY_NODE);
        let at = |ip: IpAddr, port| SocketAddr::new(ip, port);
        match (self.variant, path) {
            (Variant::Direct, TrafficPath::ClusterIp | TrafficPath::NodePort) => {
                at(pod.ip.into(), server.port())
            }
            (Variant::Direct, _) => at(pod.ip6.into(), server.port()),
            (_, TrafficPath::ClusterIp) => at(server.cluster_ip().into(), server.port()),
            (_, TrafficPath::NodePort) => at(entry.ip.into(), server.node_port()),
            (_, TrafficPath::ClusterIp6) => at(server.cluster_ip6().into(), server.port()),
            (_, TrafficPath::NodePort6) => at(entry.ip6.into(), server.node_port6()),
        }
    }

    /// The namespace that sends on `path`.
    pub fn client(&self, path: TrafficPath) -> &Netns {
        match path {
            TrafficPath::ClusterIp | TrafficPath::ClusterIp6 => &self.cluster.pod(CLIENT_POD).ns,
            TrafficPath::NodePort | TrafficPath::NodePort6 => &self.cluster.outside.ns,
        }
    }

    /// Where the packet generator stands in for `path`'s client: the interface it sends out of
    /// and the node-1 interface that receives the frames (its peer). For the NodePort paths
    /// that is node-1's `ext0`, fed from its switch port, as a NIC is fed by the wire (the
    /// outside client's own hop through the bridge would otherwise be measured too); for the
    /// ClusterIP paths, the client pod's `eth0` into its host-side veth.
    pub fn generator_hop(&self, path: TrafficPath) -> GeneratorHop<'_> {
        let node = self.cluster.node(ENTRY_NODE);
        match path {
            TrafficPath::ClusterIp | TrafficPath::ClusterIp6 => {
                let pod = self.cluster.pod(CLIENT_POD);
                GeneratorHop {
                    sender: (&pod.ns, "eth0".to_owned()),
                    receiver: (&node.ns, pod.host_if.clone()),
                    client: (&pod.ns, "eth0"),
                }
            }
            TrafficPath::NodePort | TrafficPath::NodePort6 => GeneratorHop {
                sender: (self.cluster.lan(), switch_port(ENTRY_NODE)),
                receiver: (&node.ns, lb_testbed::testbed::EXTERNAL_INTERFACE.to_owned()),
                client: (&self.cluster.outside.ns, "eth0"),
            },
        }
    }

    /// Agents' log tails, for an error report.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                let log = a.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// The TCP servers accept through every path before any measurement starts.
    fn wait_for_servers(&self) -> anyhow::Result<()> {
        let paths = [
            TrafficPath::ClusterIp,
            TrafficPath::NodePort,
            TrafficPath::ClusterIp6,
            TrafficPath::NodePort6,
        ];
        for path in paths.into_iter().filter(|p| self.variant.applies_to(*p)) {
            let servers = if matches!(path, TrafficPath::ClusterIp | TrafficPath::NodePort) {
                [Server::Iperf, Server::Sockperf, Server::Accept].as_slice()
            } else {
                // The IPv6 paths measure throughput and connections only.
                [Server::Iperf, Server::Accept].as_slice()
            };
            for &server in servers {
                let target = self.target(path, server);
                let reached = self.client(path).run(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    loop {
                        if std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500))
                            .is_ok()
                        {
                            return true;
                        }
                        if std::time::Instant::now() > deadline {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })?;
                anyhow::ensure!(
                    reached,
                    "{}: {target} ({}) does not answer on the {:?} path{}",
                    self.variant.label(),
                    server.name(),
                    path,
                    if self.agents.is_empty() {
                        String::new()
                    } else {
                        format!("; agent logs:\n{}", self.agent_logs())
                    }
                );
            }
        }
        Ok(())
    }
}

/// Where the packet generator sends from, into which interface, as which client.
pub struct GeneratorHop<'a> {
    /// The namespace and interface the frames leave by.
    pub sender: (&'a Netns, String),
    /// The interface of node-1 that receives them (the sender's veth peer).
    pub receiver: (&'a Netns, String),
    /// The client interface whose MAC address the frames carry.
    pub client: (&'a Netns, &'static str),
}

/// The lan bridge's port facing `node` (see the testbed).
pub fn switch_port(node: &str) -> String {
    format!("lan-{node}").chars().take(15).collect()
}

/// Loads the same rules into every node at once (nft -f of 10,000 Services takes minutes, mostly
/// in the kernel, and the nodes' loads are independent).
fn load_on_every_node(
    cluster: &Cluster,
    tool: &str,
    args: &[&str],
    input: &str,
) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        let loads: Vec<_> = cluster
            .nodes
            .iter()
            .map(|node| scope.spawn(|| node.ns.pipe(tool, args, input).map(drop)))
            .collect();
        loads
            .into_iter()
            .map(|l| l.join().expect("a loader thread does not panic"))
            .collect::<anyhow::Result<Vec<()>>>()
            .map(drop)
    })
}
