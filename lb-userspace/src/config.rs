//! `lb agent`'s settings: command-line flags (named like kube-proxy's where the meaning is the
//! same), an optional YAML config file with the same settings in camelCase, and the defaults.
//! A flag wins over the file, the file over the default.

use std::{
    net::{Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use lb_common::{
    conntrack::CtTimeouts,
    maps::{Capacities, SLOTS_PER_ELEMENT},
};

use crate::agent::{AgentConfig, NodePortAddresses, SourceConfig};

/// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` when both are set, as Cilium's
/// `k8sServiceHost`/`k8sServicePort` do. Kubernetes injects both for the `kubernetes` ClusterIP
/// into every pod, so the DaemonSet sets them explicitly to the API server's real address when
/// the node has no kube-proxy; a ClusterIP found there is still used (lb programs it, once it
/// has synced, and a pinned one from before a restart keeps working).
fn master_from_environment() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").ok()?;
    if host.is_empty() || port.is_empty() {
        return None;
    }
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Some(format!("https://{host}:{port}"))
}

/// Host-side veth names of common CNIs (plain veth, Calico, Cilium, AWS VPC CNI, GKE).
pub const DEFAULT_POD_INTERFACES: &str = "veth*,cali*,lxc*,eni*,gke*";
/// Common names of a node's network interfaces.
pub const DEFAULT_EXTERNAL_INTERFACES: &str = "eth*,en*,bond*";
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";

#[derive(clap::Args, Default)]
pub struct AgentArgs {
    /// YAML file with any of these settings in camelCase (e.g. `hostnameOverride`,
    /// `nodePortAddresses`); flags given here win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Standalone mode: read Services and EndpointSlices from this multi-document YAML file
    /// instead of the API server. Changes to the file (and SIGHUP) are applied as a diff.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API server. Default: in-cluster configuration (then KUBECONFIG and
    /// ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in its Node object and EndpointSlices' `nodeName`. Default: the
    /// NODE_NAME environment variable (the DaemonSet sets it), else the hostname.
    #[arg(long, alias = "node-name", env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    /// Glob(s) naming the pod-facing interfaces (host side of pod veths). Matching interfaces
    /// that appear later are attached too. [default: veth*,cali*,lxc*,eni*,gke*]
    #[arg(long, value_delimiter = ',')]
    pub pod_interfaces: Option<Vec<String>>,
    /// Glob(s) naming the interfaces towards the network. NodePorts answer on their IPv4
    /// addresses; LoadBalancer and external IPs arriving there are served. [default: eth*,en*,bond*]
    #[arg(long, value_delimiter = ',')]
    pub external_interfaces: Option<Vec<String>>,
    /// Only external addresses in these CIDRs answer NodePorts (default: all of them), as
    /// kube-proxy's flag: CIDRs of either family (IPv6 ones hold no address until lb's IPv6
    /// path), or `primary`: the first address of the first external interface.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<String>>,
    /// Source address for SNAT (external traffic to a backend on another node, hairpin).
    /// Default: the first NodePort address.
    #[arg(long)]
    pub snat_address: Option<Ipv4Addr>,
    /// SNAT source ports, FIRST-LAST. Keep them out of net.ipv4.ip_local_port_range
    /// (32768-60999 by default) so they never collide with the node's own connections.
    /// [default: 61000-65535]
    #[arg(long)]
    pub snat_ports: Option<String>,
    /// What a new flow to a Service without endpoints gets: `reject` (TCP RST, ICMP port
    /// unreachable, as kube-proxy) or `drop`. [default: reject]
    #[arg(long, value_parser = ["reject", "drop"])]
    pub no_endpoints: Option<String>,
    /// Also attach the XDP fast path (native mode) to the external interfaces: SNATed traffic to
    /// and from other nodes is turned around before the kernel allocates a packet buffer. The
    /// tc programs still handle everything else. On veth this costs bulk TCP throughput (no GRO).
    #[arg(long)]
    pub xdp: bool,
    /// Also apply a LoadBalancer Service's `loadBalancerSourceRanges` to its NodePorts (as
    /// Cilium's `bpf-lb-source-range-all-types`). By default, as kube-proxy, they guard only
    /// the load-balancer IPs, and a NodePort admits every client.
    #[arg(long)]
    pub source_ranges_on_node_ports: bool,
    /// Handle only Services labelled `service.kubernetes.io/service-proxy-name: <NAME>` (and no
    /// unlabelled ones). Default: unlabelled Services only, like kube-proxy.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Maglev table size for Services without the `lb.rs/maglev-table-size` annotation: 251,
    /// 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521 or 131071; raised, like the
    /// annotation, to keep 100 slots per backend. [default: the smallest of those with 100
    /// slots per backend: 251 for 2 backends, 1021 for 10]
    #[arg(long)]
    pub maglev_table_size: Option<u32>,
    /// Directory on a BPF filesystem for pinned maps; they keep state across restarts.
    /// [default: /sys/fs/bpf/lb]
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// Directory for the state file naming what the maps hold (read by `lb services`, `lb
    /// explain`, `lb conntrack`, `lb monitor`). [default: /run/lb]
    #[arg(long, env = "LB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often to look for new interfaces, address changes and manifest changes, in ms.
    /// [default: 500]
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Changes closer together than this are applied in one sync, in ms. [default: 100]
    #[arg(long)]
    pub min_sync_interval_ms: Option<u64>,
    /// Address for /healthz and /livez; empty disables. [default: 0.0.0.0:10256]
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// /healthz reports unhealthy when a change has waited this long, in seconds. [default: 60]
    #[arg(long)]
    pub healthz_timeout_seconds: Option<u64>,
    /// Address for /metrics (Prometheus); empty disables. [default: 127.0.0.1:10249]
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// The API server's URL, overriding the kubeconfig's or in-cluster configuration's (which
    /// names the `kubernetes` ClusterIP that only lb itself programs on a kube-proxy-free node).
    /// Also read from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT when set explicitly
    /// for the agent (see deploy/daemonset.yaml).
    #[arg(long)]
    pub master: Option<String>,
    /// Idle timeout of an established TCP flow (e.g. `24h`, `90m`, `30s`). [default: 24h]
    #[arg(long)]
    pub conntrack_tcp_timeout_established: Option<String>,
    /// Idle timeout of a TCP flow after a FIN from one end. [default: 1h]
    #[arg(long)]
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    /// Idle timeout of a TCP flow the backend has not answered yet. [default: 60s]
    #[arg(long)]
    pub conntrack_tcp_timeout_syn: Option<String>,
    /// How long a TCP flow lives after a RST or FINs from both ends. [default: 10s]
    #[arg(long)]
    pub conntrack_tcp_timeout_close: Option<String>,
    /// Idle timeout of a UDP flow never answered. [default: 30s]
    #[arg(long)]
    pub conntrack_udp_timeout: Option<String>,
    /// Idle timeout of a UDP flow that was answered. [default: 120s]
    #[arg(long)]
    pub conntrack_udp_timeout_stream: Option<String>,
    /// How often expired conntrack entries are swept from the map (the packet path already
    /// ignores them; the sweep makes room and frees SNAT ports). [default: 10s]
    #[arg(long)]
    pub conntrack_gc_interval: Option<String>,
    /// Room in the frontends map (address x port x protocol of every Service). [default: 65536]
    #[arg(long)]
    pub max_frontends: Option<u32>,
    /// Room in the backends map (distinct endpoint address and port). [default: 262144]
    #[arg(long)]
    pub max_backends: Option<u32>,
    /// Maglev slots over all tables, 4 bytes each, mapped into the agent: a Service of n
    /// backends needs a table of at least 100 x n slots (251 for 2), and Services with the same
    /// backends share one. [default: 8388608, 32 MiB]
    #[arg(long)]
    pub max_maglev_slots: Option<u32>,
    /// Flows the conntrack map holds (two entries each, about 200 bytes a flow, allocated at
    /// load). [default: 1048576]
    #[arg(long)]
    pub max_conntrack_flows: Option<u32>,
    /// IPv6 flows its own conntrack map holds (two entries each, about 290 bytes a flow,
    /// allocated at load). [default: 262144]
    #[arg(long)]
    pub max_conntrack_flows_v6: Option<u32>,
    /// Clients `sessionAffinity: ClientIP` remembers. [default: 131072]
    #[arg(long)]
    pub max_affinity_clients: Option<u32>,
    /// Detach and unpin everything lb made (programs, links, maps under --bpffs-dir), like
    /// `kube-proxy --cleanup`, and exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// The config file: the same settings as the flags, in camelCase.
#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub pod_interfaces: Option<Vec<String>>,
    pub external_interfaces: Option<Vec<String>>,
    pub node_port_addresses: Option<Vec<String>>,
    pub snat_address: Option<Ipv4Addr>,
    pub snat_ports: Option<String>,
    pub no_endpoints: Option<String>,
    pub xdp: Option<bool>,
    pub source_ranges_on_node_ports: Option<bool>,
    pub service_proxy_name: Option<String>,
    pub maglev_table_size: Option<u32>,
    pub bpffs_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub poll_interval_ms: Option<u64>,
    pub min_sync_interval_ms: Option<u64>,
    pub healthz_bind_address: Option<String>,
    pub healthz_timeout_seconds: Option<u64>,
    pub metrics_bind_address: Option<String>,
    pub master: Option<String>,
    pub conntrack_tcp_timeout_established: Option<String>,
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    pub conntrack_tcp_timeout_syn: Option<String>,
    pub conntrack_tcp_timeout_close: Option<String>,
    pub conntrack_udp_timeout: Option<String>,
    pub conntrack_udp_timeout_stream: Option<String>,
    pub conntrack_gc_interval: Option<String>,
    pub max_frontends: Option<u32>,
    pub max_backends: Option<u32>,
    pub max_maglev_slots: Option<u32>,
    pub max_conntrack_flows: Option<u32>,
    pub max_conntrack_flows_v6: Option<u32>,
    pub max_affinity_clients: Option<u32>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        serde_yaml_ng::from_str(&text)
            .with_context(|| format!("in the config file {}", path.display()))
    }
}

pub fn parse_port_range(text: &str) -> anyhow::Result<RangeInclusive<u16>> {
    let (first, last) = text
        .split_once('-')
        .with_context(|| format!("{text:?} is not FIRST-LAST"))?;
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .with_context(|| format!("{p:?} in {text:?}"))
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || first > last {
        bail!("{first}-{last} is empty or starts at 0");
    }
    Ok(first..=last)
}

fn globs(setting: &str, patterns: &[String]) -> anyhow::Result<Vec<glob::Pattern>> {
    patterns
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("{setting} {g:?}")))
        .collect()
}

fn split(list: &str) -> Vec<String> {
    list.split(',').map(str::to_owned).collect()
}

/// An address setting: empty disables it.
fn bind_address(setting: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{setting} {value:?} is not ADDRESS:PORT"))
}

/// A duration setting in seconds: `24h`, `1h30m`, `90s` or plain seconds; at least 1 s.
pub fn parse_seconds(setting: &str, text: &str) -> anyhow::Result<u32> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text)
            .with_context(|| format!("{setting} {text:?} is not a duration like 30s or 24h"))?,
    };
    let secs = duration.as_secs();
    if secs == 0 || secs > u32::MAX as u64 / 2 {
        bail!("{setting} {text:?} must be between 1 s and 34 years");
    }
    Ok(secs as u32)
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.to_lowercase())
}

impl AgentArgs {
    /// Merges flags, the config file and defaults into the agent's configuration.
    pub fn resolve(self) -> anyhow::Result<AgentConfig> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let manifests = self.manifests.or(file.manifests);
        let source = match manifests {
            Some(path) => SourceConfig::Manifests(path),
            None => SourceConfig::Kubernetes {
                kubeconfig: self.kubeconfig.or(file.kubeconfig),
            },
        };
        let node_name = self
            .hostname_override
            .or(file.hostname_override)
            .or_else(|| {
                // The API source needs the node's name; standalone mode works without one.
                matches!(source, SourceConfig::Kubernetes { .. })
                    .then(hostname)
                    .flatten()
            });
        let pod_interfaces = self
            .pod_interfaces
            .or(file.pod_interfaces)
            .unwrap_or_else(|| split(DEFAULT_POD_INTERFACES));
        let external_interfaces = self
            .external_interfaces
            .or(file.external_interfaces)
            .unwrap_or_else(|| split(DEFAULT_EXTERNAL_INTERFACES));
        let nodeport_addresses = NodePortAddresses::parse(
            &(self.nodeport_addresses)
                .or(file.node_port_addresses)
                .unwrap_or_default(),
        )
        .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
        let snat_ports = parse_port_range(
            self.snat_ports
                .or(file.snat_ports)
                .as_deref()
                .unwrap_or("61000-65535"),
        )
        .context("--snat-ports")?;
        let no_endpoints = self
            .no_endpoints
            .or(file.no_endpoints)
            .unwrap_or_else(|| "reject".to_owned());
        if no_endpoints != "reject" && no_endpoints != "drop" {
            bail!("noEndpoints {no_endpoints:?}: expected reject or drop");
        }
        let maglev_table_size = self.maglev_table_size.or(file.maglev_table_size);
        if let Some(size) = maglev_table_size
            && !lb_common::maglev::TABLE_SIZES.contains(&size)
        {
            bail!(
                "--maglev-table-size {size} is not one of {:?}",
                lb_common::maglev::TABLE_SIZES
            );
        }
        let seconds =
            |setting: &str, flag: Option<String>, file: Option<String>, default: u32| match flag
                .or(file)
            {
                Some(text) => parse_seconds(setting, &text),
                None => Ok(default),
            };
        let d = CtTimeouts::DEFAULT;
        let conntrack = CtTimeouts {
            tcp_syn_s: seconds(
                "--conntrack-tcp-timeout-syn",
                self.conntrack_tcp_timeout_syn,
                file.conntrack_tcp_timeout_syn,
                d.tcp_syn_s,
            )?,
            tcp_established_s: seconds(
                "--conntrack-tcp-timeout-established",
                self.conntrack_tcp_timeout_established,
                file.conntrack_tcp_timeout_established,
                d.tcp_established_s,
            )?,
            tcp_close_wait_s: seconds(
                "--conntrack-tcp-timeout-close-wait",
                self.conntrack_tcp_timeout_close_wait,
                file.conntrack_tcp_timeout_close_wait,
                d.tcp_close_wait_s,
            )?,
            tcp_close_s: seconds(
                "--conntrack-tcp-timeout-close",
                self.conntrack_tcp_timeout_close,
                file.conntrack_tcp_timeout_close,
                d.tcp_close_s,
            )?,
            udp_s: seconds(
                "--conntrack-udp-timeout",
                self.conntrack_udp_timeout,
                file.conntrack_udp_timeout,
                d.udp_s,
            )?,
            udp_stream_s: seconds(
                "--conntrack-udp-timeout-stream",
                self.conntrack_udp_timeout_stream,
                file.conntrack_udp_timeout_stream,
                d.udp_stream_s,
            )?,
        };
        let conntrack_gc_interval = Duration::from_secs(
            seconds(
                "--conntrack-gc-interval",
                self.conntrack_gc_interval,
                file.conntrack_gc_interval,
                10,
            )?
            .into(),
        );
        let master = self.master.or(file.master).or_else(master_from_environment);
        let capacity = |flag: &str, given: Option<u32>, file: Option<u32>, default: u32| match given
            .or(file)
            .unwrap_or(default)
        {
            0 => bail!("{flag} must be at least 1"),
            n => Ok(n),
        };
        let d = Capacities::DEFAULT;
        let flows = capacity(
            "--max-conntrack-flows",
            self.max_conntrack_flows,
            file.max_conntrack_flows,
            d.conntrack / 2,
        )?;
        let flows6 = capacity(
            "--max-conntrack-flows-v6",
            self.max_conntrack_flows_v6,
            file.max_conntrack_flows_v6,
            d.conntrack6 / 2,
        )?;
        let capacities = Capacities {
            frontends: capacity(
                "--max-frontends",
                self.max_frontends,
                file.max_frontends,
                d.frontends,
            )?,
            backends: capacity(
                "--max-backends",
                self.max_backends,
                file.max_backends,
                d.backends,
            )?,
            // Whole elements of the slots array.
            slots: capacity(
                "--max-maglev-slots",
                self.max_maglev_slots,
                file.max_maglev_slots,
                d.slots,
            )?
            .next_multiple_of(SLOTS_PER_ELEMENT),
            conntrack: flows
                .checked_mul(2)
                .context("--max-conntrack-flows is too large")?,
            conntrack6: flows6
                .checked_mul(2)
                .context("--max-conntrack-flows-v6 is too large")?,
            affinity: capacity(
                "--max-affinity-clients",
                self.max_affinity_clients,
                file.max_affinity_clients,
                d.affinity,
            )?,
        };
        Ok(AgentConfig {
            capacities,
            master,
            conntrack,
            conntrack_gc_interval,
            source,
            node_name,
            pod_interfaces: globs("--pod-interfaces", &pod_interfaces)?,
            external_interfaces: globs("--external-interfaces", &external_interfaces)?,
            nodeport_addresses,
            snat_address: self.snat_address.or(file.snat_address),
            snat_ports,
            reject_no_endpoints: no_endpoints == "reject",
            xdp: self.xdp || file.xdp.unwrap_or(false),
            source_ranges_on_node_ports: self.source_ranges_on_node_ports
                || file.source_ranges_on_node_ports.unwrap_or(false),
            service_proxy_name: self.service_proxy_name.or(file.service_proxy_name),
            maglev_table_size,
            bpffs_dir: self
                .bpffs_dir
                .or(file.bpffs_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR)),
            state_dir: (self.state_dir.or(file.state_dir))
                .unwrap_or_else(|| PathBuf::from(crate::state::DEFAULT_STATE_DIR)),
            poll_interval: Duration::from_millis(
                self.poll_interval_ms
                    .or(file.poll_interval_ms)
                    .unwrap_or(500)
                    .max(10),
            ),
            min_sync_interval: Duration::from_millis(
                self.min_sync_interval_ms
                    .or(file.min_sync_interval_ms)
                    .unwrap_or(100),
            ),
            healthz_bind_address: bind_address(
                "--healthz-bind-address",
                self.healthz_bind_address
                    .or(file.healthz_bind_address)
                    .as_deref()
                    .unwrap_or(DEFAULT_HEALTHZ_BIND_ADDRESS),
            )?,
            healthz_timeout: Duration::from_secs(
                self.healthz_timeout_seconds
                    .or(file.healthz_timeout_seconds)
                    .unwrap_or(60),
            ),
            metrics_bind_address: bind_address(
                "--metrics-bind-address",
                self.metrics_bind_address
                    .or(file.metrics_bind_address)
                    .as_deref()
                    .unwrap_or(DEFAULT_METRICS_BIND_ADDRESS),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let path = std::env::temp_dir().join(format!("lb-config-test-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "hostnameOverride: from-file\nnodePortAddresses: [\"10.0.0.0/8\"]\nmetricsBindAddress: \"\"\nminSyncIntervalMs: 250\nkubeconfig: /etc/kubeconfig\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(path.clone()),
            hostname_override: Some("from-flag".to_owned()),
            ..AgentArgs::default()
        };
        let config = args.resolve().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.node_name.as_deref(), Some("from-flag"));
        assert_eq!(
            config.nodeport_addresses,
            NodePortAddresses::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
        );
        assert_eq!(config.metrics_bind_address, None, "empty disables");
        assert_eq!(
            config.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(config.min_sync_interval, Duration::from_millis(250));
        assert!(matches!(
            config.source,
            SourceConfig::Kubernetes { kubeconfig: Some(ref p) } if p == Path::new("/etc/kubeconfig")
        ));
        assert_eq!(config.pod_interfaces.len(), 5);
    }

    #[test]
    fn unknown_settings_and_bad_values_are_errors() {
        let path = std::env::temp_dir().join(format!("lb-config-bad-{}.yaml", std::process::id()));
        std::fs::write(&path, "hostnameOverrid: typo\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(format!("{err:#}").contains("hostnameOverrid"), "{err:#}");
        let bad = AgentArgs {
            maglev_table_size: Some(1000),
            manifests: Some("x.yaml".into()),
            ..AgentArgs::default()
        };
        assert!(bad.resolve().is_err());
        assert!(parse_port_range("65535-61000").is_err());
    }

    #[test]
    fn conntrack_timeouts_take_durations_and_reject_zero() {
        assert_eq!(parse_seconds("t", "24h").unwrap(), 86_400);
        assert_eq!(parse_seconds("t", "1h30m").unwrap(), 5_400);
        assert_eq!(parse_seconds("t", "24h0m0s").unwrap(), 86_400);
        assert_eq!(parse_seconds("t", "45").unwrap(), 45);
        assert!(parse_seconds("t", "0s").is_err());
        assert!(parse_seconds("t", "soon").is_err());
        let config = AgentArgs {
            manifests: Some("x.yaml".into()),
            conntrack_udp_timeout: Some("5s".to_owned()),
            ..AgentArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.conntrack.udp_s, 5);
        assert_eq!(config.conntrack.tcp_established_s, 86_400, "default kept");
    }
}
