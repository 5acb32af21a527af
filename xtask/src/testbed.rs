//! The testbed: pods and a client in their own network namespaces, wired to a node namespace by
//! veth pairs like a simple routed CNI. Nothing is linked to the root namespace or a real
//! interface, and there is no default route anywhere: traffic cannot leave the testbed.
//!
//! Addressing (see docs/testbed.md): each pod has a /32 on `eth0` and reaches everything through
//! the node's link-local gateway 169.254.1.1, which sits on every host-side veth (`lbp-<pod>`);
//! the node routes each pod /32 to its veth.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cleanup, netns::Netns};

/// The gateway address every pod routes through (on each host-side veth).
pub const POD_GATEWAY: &str = "169.254.1.1";
/// Routed into the node from each pod: the Service and pod ranges of the testbed.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Glob matching the host-side pod veths, for `lb agent --pod-interfaces`.
pub const POD_INTERFACE_GLOB: &str = "lbp-*";

/// A pod (or the client, which is just another pod): its own namespace and address.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Host side of its veth, in the node namespace.
    pub host_if: String,
    pub ns: Netns,
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
}

/// One node with pods and a client pod.
pub struct Testbed {
    pub run_id: String,
    pub client: Pod,
    pub pods: Vec<Pod>,
    // Dropped last: deleting the node namespace removes every host-side veth.
    pub node: Node,
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

impl Testbed {
    /// Builds a node with `pods` and a `client` pod, each `(name, address)`.
    pub fn single_node(
        client: (&str, Ipv4Addr),
        pods: &[(&str, Ipv4Addr)],
    ) -> anyhow::Result<Self> {
        cleanup::sweep_stale();
        let run_id = new_run_id();
        let node_ns = Netns::create(&format!("{run_id}-node"))?;
        node_ns.sysctl("net.ipv4.ip_forward", "1")?;
        // Replies are reverse-translated to come from a ClusterIP, which has no route back to a
        // pod interface; strict reverse-path filtering would drop them (kube-proxy nodes too run
        // with rp_filter 0 or 2).
        node_ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node_ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let node = Node {
            name: "node-1".to_owned(),
            ns: node_ns,
        };
        let client = add_pod(&run_id, &node, client.0, client.1)?;
        let pods = pods
            .iter()
            .map(|(name, ip)| add_pod(&run_id, &node, name, *ip))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            run_id,
            client,
            pods,
            node,
        })
    }
}

impl Testbed {
    /// Adds a pod to the running testbed (e.g. to see the agent attach to a new interface).
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> anyhow::Result<&Pod> {
        let pod = add_pod(&self.run_id, &self.node, name, ip)?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }
}

fn add_pod(run_id: &str, node: &Node, name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
    let ns = Netns::create(&format!("{run_id}-{name}"))?;
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
    ns.ip(&["addr", "add", &format!("{ip_s}/32"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
    for cidr in [SERVICE_CIDR, POD_CIDR] {
        ns.ip(&["route", "add", cidr, "via", POD_GATEWAY, "dev", "eth0"])?;
    }
    Ok(Pod {
        name: name.to_owned(),
        ip,
        host_if,
        ns,
    })
}

/// An `lb agent --manifests` process running in a node's namespace, as the DaemonSet would.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    pin_dir: PathBuf,
}

impl AgentProcess {
    /// Starts the agent and waits until it reports ready (program attached, maps synced).
    pub fn start(
        testbed: &Testbed,
        lb: &Path,
        manifests: &Path,
        poll_ms: u64,
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}-agent.log", testbed.run_id));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-node", testbed.run_id));
        cleanup::register_pin_dir(pin_dir.clone());
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(lb);
        cmd.arg("agent")
            .arg("--manifests")
            .arg(manifests)
            .args(["--pod-interfaces", POD_INTERFACE_GLOB])
            .arg("--bpffs-dir")
            .arg(&pin_dir)
            .args(["--poll-interval-ms", &poll_ms.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = testbed.node.ns.spawn(cmd)?;
        let mut agent = Self {
            child: Some(child),
            log,
            pin_dir,
        };
        agent.wait_for_log("agent ready", Duration::from_secs(30))?;
        Ok(agent)
    }

    /// The agent's pin directory (its `--bpffs-dir`).
    pub fn bpffs_dir(&self) -> &Path {
        &self.pin_dir
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

    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
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
        cleanup::remove_pin_dir(&self.pin_dir);
        let _ = std::fs::remove_file(&self.log);
    }
}
