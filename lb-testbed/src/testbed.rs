//! The testbed: a two-node mini-cluster made only of network namespaces (see docs/testbed.md).
//!
//! ```text
//!   outside (172.30.0.100)            the external client: not a node
//!        |
//!   lan: bridge br0, 172.30.0.1       the underlay switch (and the nodes' gateway)
//!      /                 \
//!   node-1 ext0          node-2 ext0
//!   172.30.0.11          172.30.0.12
//!   pods 10.244.1.0/24   pods 10.244.2.0/24
//! ```
//!
//! Each pod has a /32 on `eth0` and reaches everything through the link-local gateway 169.254.1.1
//! on its host-side veth (`lbp-<pod>`), like a simple routed CNI; each node routes the other's pod
//! CIDR via the other's underlay address. Nothing is linked to the root namespace or a real
//! interface and there is no default route anywhere: traffic cannot leave the testbed.
//!
//! Every address has an IPv6 twin ([`ipv6_twin`]: `a.b.c.d` is `fd00:b:c::d`, so node-1 is
//! `fd00:30::11` and pod-a `fd00:244:1::11`), routed the same way: pods through the link-local
//! gateway `fe80::1`, each node the other's pod /64 via the other's underlay address. Addresses
//! are added without duplicate address detection, so they are usable at once.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cleanup, netns::Netns};

/// The gateway address every pod routes through (on each host-side veth).
pub const POD_GATEWAY: &str = "169.254.1.1";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The underlay, LoadBalancer and externalIP ranges: 172.30.0.0/24, .1.0/24, .2.0/24.
pub const TESTBED_CIDR: &str = "172.30.0.0/16";
pub const UNDERLAY_PREFIX: u8 = 24;
/// The lan namespace's address: the nodes' gateway (no further route behind it).
pub const LAN_ROUTER: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 100);
/// The outside client's port on the lan bridge (the peer of its `eth0`).
pub const OUTSIDE_SWITCH_PORT: &str = "lan-outside";
/// Where the LoadBalancer ingress IPs live; the outside client routes it via a node, as an
/// external load balancer would send it there.
pub const LOAD_BALANCER_CIDR: &str = "172.30.1.0/24";
/// Where the externalIPs live; routed like the LoadBalancer range.
pub const EXTERNAL_IP_CIDR: &str = "172.30.2.0/24";
/// Glob matching the host-side pod veths, for `lb agent --pod-interfaces`.
pub const POD_INTERFACE_GLOB: &str = "lbp-*";
/// Each node's interface on the underlay, for `lb agent --external-interfaces`.
pub const EXTERNAL_INTERFACE: &str = "ext0";
/// The IPv6 gateway every pod routes through (on each host-side veth).
pub const POD_GATEWAY6: &str = "fe80::1";
/// The IPv6 twins of the ranges above (see [`ipv6_twin`]).
pub const SERVICE_CIDR6: &str = "fd00:96::/32";
pub const POD_CIDR6: &str = "fd00:244::/32";
pub const TESTBED_CIDR6: &str = "fd00:30::/32";
pub const UNDERLAY_PREFIX6: u8 = 64;
pub const LOAD_BALANCER_CIDR6: &str = "fd00:30:1::/64";
pub const EXTERNAL_IP_CIDR6: &str = "fd00:30:2::/64";

/// The IPv6 twin of a testbed address: `a.b.c.d` becomes `fd00:b:c::d`, the decimal digits
/// written as they are (so 10.244.1.11 is `fd00:244:1::11`, easy to read side by side).
pub fn ipv6_twin(v4: Ipv4Addr) -> Ipv6Addr {
    let [_, b, c, d] = v4.octets();
    format!("fd00:{b}:{c}::{d}")
        .parse()
        .expect("decimal octets of at most three digits are valid IPv6 groups")
}

/// The IPv6 twin of a node's pod CIDR (`10.244.1.0/24` becomes `fd00:244:1::/64`).
pub fn pod_cidr6(pod_cidr: &str) -> String {
    let net: Ipv4Addr = pod_cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("a layout pod CIDR");
    format!("{}/64", ipv6_twin(net))
}

/// A node of the layout: name, underlay address, pod CIDR and pods.
pub struct NodeLayout {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    pub pod_cidr: &'static str,
    pub pods: &'static [(&'static str, Ipv4Addr)],
}

/// The layout of docs/testbed.md and deploy/examples/services.yaml. `client-1` is a pod with no
/// Service of its own, on node-1.
pub const LAYOUT: [NodeLayout; 2] = [
    NodeLayout {
        name: "node-1",
        ip: Ipv4Addr::new(172, 30, 0, 11),
        pod_cidr: "10.244.1.0/24",
        pods: &[
            ("client-1", Ipv4Addr::new(10, 244, 1, 2)),
            ("pod-a", Ipv4Addr::new(10, 244, 1, 11)),
            ("pod-b", Ipv4Addr::new(10, 244, 1, 12)),
        ],
    },
    NodeLayout {
        name: "node-2",
        ip: Ipv4Addr::new(172, 30, 0, 12),
        pod_cidr: "10.244.2.0/24",
        pods: &[
            ("pod-c", Ipv4Addr::new(10, 244, 2, 11)),
            ("pod-d", Ipv4Addr::new(10, 244, 2, 12)),
        ],
    },
];

impl NodeLayout {
    /// `pod-a 10.244.1.11, pod-b 10.244.1.12`, for guides and reports.
    pub fn pods_line(&self) -> String {
        self.pods
            .iter()
            .map(|(name, ip)| format!("{name} {ip}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A pod: its own namespace and addresses.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Host side of its veth, in the node namespace.
    pub host_if: String,
    pub ns: Netns,
}

pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub pods: Vec<Pod>,
    // Dropped after the pods: deleting the node namespace removes every host-side veth.
    pub ns: Netns,
}

/// A machine on the underlay that is not a node (a client out on the network).
pub struct Outside {
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: Netns,
}

/// The two-node mini-cluster.
pub struct Cluster {
    pub run_id: String,
    pub nodes: Vec<Node>,
    pub outside: Outside,
    // Dropped last: the switch everything hangs off.
    lan: Netns,
}

fn new_run_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}-{}",
        cleanup::NETNS_PREFIX,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Cluster {
    /// The run id of the long-lived testbed of `cargo xtask testbed up`. Not `lbt<pid>`, so
    /// test runs never sweep it as stale.
    pub const PERSISTENT_RUN_ID: &str = "lbtb";

    /// Builds [`LAYOUT`] under a fresh run id (cleaned up with this process).
    pub fn two_nodes() -> anyhow::Result<Self> {
        cleanup::sweep_stale();
        Self::build(new_run_id())
    }

    /// Builds [`LAYOUT`] with namespaces named `<run_id>-<role>`.
    pub fn build(run_id: String) -> anyhow::Result<Self> {
        let lan = new_ns(&format!("{run_id}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&[
            "addr",
            "add",
            &format!("{LAN_ROUTER}/{UNDERLAY_PREFIX}"),
            "dev",
            "br0",
        ])?;
        lan.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/{UNDERLAY_PREFIX6}", ipv6_twin(LAN_ROUTER)),
            "dev",
            "br0",
            "nodad",
        ])?;
        lan.ip(&["link", "set", "br0", "up"])?;

        let outside_ns = new_ns(&format!("{run_id}-outside"))?;
        plug_into_lan(&lan, "outside", &outside_ns, "eth0", OUTSIDE_IP)?;
        let outside = Outside {
            ip: OUTSIDE_IP,
            ip6: ipv6_twin(OUTSIDE_IP),
            ns: outside_ns,
        };

        let mut nodes = Vec::new();
        for layout in &LAYOUT {
            let ns = new_ns(&format!("{run_id}-{}", layout.name))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            // Reverse translation makes replies come from addresses with no route back through
            // the interface they arrive on; strict reverse-path filtering would drop them
            // (kube-proxy nodes run with rp_filter 0 or 2 too).
            for conf in ["all", "default"] {
                ns.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
                ns.sysctl(&format!("net.ipv4.conf.{conf}.send_redirects"), "0")?;
            }
            plug_into_lan(&lan, layout.name, &ns, EXTERNAL_INTERFACE, layout.ip)?;
            // The nodes' gateway for the Service range: a hostNetwork process's packet to a
            // ClusterIP is routed out of ext0 (as a default route would), where lb translates it.
            ns.ip(&["route", "add", SERVICE_CIDR, "via", &LAN_ROUTER.to_string()])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                SERVICE_CIDR6,
                "via",
                &ipv6_twin(LAN_ROUTER).to_string(),
            ])?;
            let mut node = Node {
                name: layout.name.to_owned(),
                ip: layout.ip,
                ip6: ipv6_twin(layout.ip),
                pods: Vec::new(),
                ns,
            };
            for (name, ip) in layout.pods {
                let pod = add_pod(&run_id, &node, name, *ip)?;
                node.pods.push(pod);
            }
            nodes.push(node);
        }
        // Each node routes the other's pods via the other's underlay address.
        for node in &nodes {
            for other in LAYOUT.iter().filter(|l| l.name != node.name) {
                node.ns
                    .ip(&["route", "add", other.pod_cidr, "via", &other.ip.to_string()])?;
                node.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &pod_cidr6(other.pod_cidr),
                    "via",
                    &ipv6_twin(other.ip).to_string(),
                ])?;
            }
        }
        let cluster = Self {
            run_id,
            nodes,
            outside,
            lan,
        };
        cluster.route_external_via("node-1")?;
        Ok(cluster)
    }

    /// The `--bpffs-dir` an agent on `node` of this testbed uses.
    pub fn agent_pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-{node}", self.run_id))
    }

    /// The `--state-dir` an agent on `node` of this testbed uses (the file naming what its maps
    /// hold, for `lb services` and the like).
    pub fn agent_state_dir(&self, node: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{node}-state", self.run_id))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the testbed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the testbed"))
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| &n.pods)
    }

    /// Points the outside client's routes for the LoadBalancer and externalIP ranges at `node`,
    /// as an external load balancer (or the network) choosing that node would.
    pub fn route_external_via(&self, node: &str) -> anyhow::Result<()> {
        let via = self.node(node).ip.to_string();
        for cidr in [LOAD_BALANCER_CIDR, EXTERNAL_IP_CIDR] {
            self.outside
                .ns
                .ip(&["route", "replace", cidr, "via", &via])?;
        }
        let via6 = self.node(node).ip6.to_string();
        for cidr in [LOAD_BALANCER_CIDR6, EXTERNAL_IP_CIDR6] {
            self.outside
                .ns
                .ip(&["-6", "route", "replace", cidr, "via", &via6])?;
        }
        Ok(())
    }

    /// Makes the underlay behave like a physical network for the nodes' XDP programs:
    /// - the switch ports facing the nodes run an XDP_PASS program, without which a veth does
    ///   not promptly pick up frames its peer sends with XDP_TX (see [`crate::xdp_pass`]);
    /// - everything sending onto the underlay (the outside client, the nodes, the pods) computes
    ///   full checksums, as a NIC does before the wire; veth would otherwise carry partial ones,
    ///   which an XDP program cannot tell from complete ones.
    pub fn prepare_for_xdp(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            let port: String = format!("lan-{}", node.name).chars().take(15).collect();
            let pin = PathBuf::from(format!(
                "/sys/fs/bpf/{}-xdp-pass-{}",
                self.run_id, node.name
            ));
            crate::xdp_pass::attach(&self.lan, &port, &pin)?;
            node.ns.disable_tx_checksum(EXTERNAL_INTERFACE)?;
            for pod in &node.pods {
                pod.ns.disable_tx_checksum("eth0")?;
            }
        }
        self.outside.ns.disable_tx_checksum("eth0")?;
        Ok(())
    }

    /// Keeps every namespace after this process exits (`cargo xtask testbed up`).
    pub fn persist(self) {
        let Cluster {
            nodes,
            outside,
            lan,
            ..
        } = self;
        for node in nodes {
            for pod in node.pods {
                pod.ns.persist();
            }
            node.ns.persist();
        }
        outside.ns.persist();
        lan.persist();
    }

    /// The lan namespace (the underlay switch).
    pub fn lan(&self) -> &Netns {
        &self.lan
    }

    /// Adds a pod to a running node (e.g. to see the agent attach to a new interface).
    pub fn add_pod(&mut self, node: &str, name: &str, ip: Ipv4Addr) -> anyhow::Result<&Pod> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node}"))?;
        let pod = add_pod(&self.run_id, &self.nodes[index], name, ip)?;
        self.nodes[index].pods.push(pod);
        Ok(self.nodes[index].pods.last().expect("just pushed"))
    }
}

/// A namespace of the testbed: IPv6 addresses there skip duplicate address detection (the
/// link-local ones the kernel adds too), so no first packet waits a second for it.
fn new_ns(name: &str) -> anyhow::Result<Netns> {
    let ns = Netns::create(name)?;
    for conf in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
    }
    Ok(ns)
}

/// Connects `ns` to the lan bridge with a veth (`ifname` inside `ns`) and gives it `ip` and its
/// IPv6 twin.
fn plug_into_lan(
    lan: &Netns,
    port: &str,
    ns: &Netns,
    ifname: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let port: String = format!("lan-{port}").chars().take(15).collect();
    lan.ip(&[
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        ifname,
        "netns",
        ns.name(),
    ])?;
    lan.ip(&["link", "set", &port, "master", "br0"])?;
    lan.ip(&["link", "set", &port, "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{ip}/{UNDERLAY_PREFIX}"),
        "dev",
        ifname,
    ])?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/{UNDERLAY_PREFIX6}", ipv6_twin(ip)),
        "dev",
        ifname,
        "nodad",
    ])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}

fn add_pod(run_id: &str, node: &Node, name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
    let ns = new_ns(&format!("{run_id}-{name}"))?;
    let host_if: String = format!("lbp-{name}").chars().take(15).collect();
    let ip_s = ip.to_string();
    node.ns.ip(&[
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    node.ns
        .ip(&["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", &host_if])?;
    node.ns.ip(&["link", "set", &host_if, "up"])?;
    node.ns
        .sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter"), "0")?;
    node.ns
        .ip(&["route", "add", &format!("{ip_s}/32"), "dev", &host_if])?;
    let ip6 = ipv6_twin(ip);
    node.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{POD_GATEWAY6}/64"),
        "dev",
        &host_if,
        "nodad",
    ])?;
    node.ns
        .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
    ns.ip(&["addr", "add", &format!("{ip_s}/32"), "dev", "eth0"])?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
    for cidr in [SERVICE_CIDR, POD_CIDR, TESTBED_CIDR] {
        ns.ip(&["route", "add", cidr, "via", POD_GATEWAY, "dev", "eth0"])?;
    }
    for cidr in [SERVICE_CIDR6, POD_CIDR6, TESTBED_CIDR6] {
        ns.ip(&[
            "-6",
            "route",
            "add",
            cidr,
            "via",
            POD_GATEWAY6,
            "dev",
            "eth0",
        ])?;
    }
    Ok(Pod {
        name: name.to_owned(),
        ip,
        ip6,
        host_if,
        ns,
    })
}

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub poll_ms: u64,
    /// `--xdp`: the XDP fast path on the external interface.
    pub xdp: bool,
    /// Keep running after this process exits (`cargo xtask testbed up`).
    pub detached: bool,
    /// Where the agent's log goes (default: the temp directory).
    pub log_dir: Option<PathBuf>,
    /// Watch the API server through this kubeconfig instead of reading the manifest file.
    pub kubeconfig: Option<PathBuf>,
    /// More `lb agent` flags, e.g. `--maglev-table-size 1021`.
    pub extra_args: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            poll_ms: 100,
            xdp: false,
            detached: false,
            log_dir: None,
            kubeconfig: None,
            extra_args: Vec::new(),
        }
    }
}

/// An `lb agent --manifests` process running in a node's namespace, as the DaemonSet would.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl AgentProcess {
    /// Starts the agent on `node` and waits until it reports ready (programs attached; with a
    /// manifest file also synced). With `options.kubeconfig` the manifest file is not read.
    pub fn start(
        cluster: &Cluster,
        node: &str,
        lb: &Path,
        manifests: &Path,
        options: &AgentOptions,
    ) -> anyhow::Result<Self> {
        let node = cluster.node(node);
        let log = options
            .log_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("{}-{}-agent.log", cluster.run_id, node.name));
        let pin_dir = cluster.agent_pin_dir(&node.name);
        let state_dir = cluster.agent_state_dir(&node.name);
        if !options.detached {
            cleanup::register_pin_dir(pin_dir.clone());
            // Any directory: the registry removes it whole at the end.
            cleanup::register_pin_dir(state_dir.clone());
        }
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(lb);
        cmd.arg("agent");
        match &options.kubeconfig {
            Some(kubeconfig) => cmd.arg("--kubeconfig").arg(kubeconfig),
            None => cmd.arg("--manifests").arg(manifests),
        };
        cmd.args(["--node-name", &node.name])
            .args(["--pod-interfaces", POD_INTERFACE_GLOB])
            .args(["--external-interfaces", EXTERNAL_INTERFACE])
            .arg("--bpffs-dir")
            .arg(&pin_dir)
            // By the environment, which an older lb (the upgrade test's v2) ignores.
            .env("LB_STATE_DIR", &state_dir)
            .args(["--poll-interval-ms", &options.poll_ms.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if options.xdp {
            cmd.arg("--xdp");
        }
        cmd.args(&options.extra_args);
        let child = if options.detached {
            node.ns.spawn_detached(cmd)?
        } else {
            node.ns.spawn(&mut cmd)?
        };
        let mut agent = Self {
            child: Some(child),
            log,
            pin_dir,
            state_dir,
        };
        agent.wait_for_log("agent ready", Duration::from_secs(30))?;
        Ok(agent)
    }

    /// The agent's pin directory (its `--bpffs-dir`).
    pub fn bpffs_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The agent's `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times or more.
    pub fn wait_for_log_count(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent exited ({status}) before {needle:?}; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Sends a signal to the agent (e.g. SIGHUP to reload).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM and wait: the agent detaches and exits.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.terminate()
    }

    /// Stops the agent with `signal` (SIGTERM, or SIGKILL as a crash or OOM kill would) and
    /// leaves what it pinned in place, as a DaemonSet restart does: the packet path stays
    /// attached for the next agent on this node.
    pub fn halt(mut self, signal: i32) -> anyhow::Result<ExitStatus> {
        let status = self.stop_child(signal)?;
        // Kept for the next agent; the testbed's registry still removes it at the end.
        self.pin_dir = PathBuf::new();
        Ok(status)
    }

    /// Leaves a detached agent running (its pin directory and log stay too).
    pub fn leave_running(mut self) {
        self.child = None;
        self.pin_dir = PathBuf::new();
        self.log = PathBuf::new();
    }

    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_child(libc::SIGTERM)
    }

    /// Sends `signal` and waits up to 10 s (then SIGKILL) for the agent to exit.
    fn stop_child(&mut self, signal: i32) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        cleanup::forget_child(child.id());
        Ok(status)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
        if !self.pin_dir.as_os_str().is_empty() {
            cleanup::remove_pin_dir(&self.pin_dir);
        }
        if !self.log.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
