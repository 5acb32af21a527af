use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent::{self, AgentConfig},
    manifest,
    model::Severity,
    report,
    translate::{NodeContext, translate},
};

/// lb: an eBPF Kubernetes Service load balancer (a kube-proxy replacement).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the packet path and keep it programmed (needs root).
    Agent(AgentArgs),
    /// Packet counters of the packet path (summed over CPUs), read from the pinned maps.
    Stats {
        /// The agent's --bpffs-dir.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs_dir: PathBuf,
    },
    /// Show what a manifest translates to, without touching the kernel.
    Translate {
        /// Multi-document YAML with Services and discovery.k8s.io/v1 EndpointSlices.
        #[arg(long)]
        manifests: PathBuf,
        /// Translate as this node would (for `Local` traffic policies).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// A node address NodePorts answer on (repeatable).
        #[arg(long = "node-address")]
        node_addresses: Vec<std::net::Ipv4Addr>,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Standalone mode: read Services and EndpointSlices from this multi-document YAML file
    /// instead of the API server. Changes to the file (and SIGHUP) are applied as a diff.
    #[arg(long)]
    manifests: PathBuf,
    /// This node's name, as in EndpointSlice `nodeName` (for `Local` traffic policies). In a
    /// DaemonSet, from the downward API.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Glob(s) naming the pod-facing interfaces (host side of pod veths), e.g. 'veth*' or
    /// 'lxc*,cali*'. Matching interfaces that appear later are attached too.
    #[arg(long, value_delimiter = ',', required = true)]
    pod_interfaces: Vec<String>,
    /// Glob(s) naming the interfaces towards the network, e.g. 'eth0' or 'eth*,bond*'. NodePorts
    /// answer on their IPv4 addresses; LoadBalancer and external IPs arriving there are served.
    #[arg(long, value_delimiter = ',')]
    external_interfaces: Vec<String>,
    /// Source address for SNAT (external traffic to a backend on another node, hairpin).
    /// Default: the first address of the first external interface.
    #[arg(long)]
    snat_address: Option<std::net::Ipv4Addr>,
    /// SNAT source ports, FIRST-LAST. Keep them out of net.ipv4.ip_local_port_range
    /// (32768-60999 by default) so they never collide with the node's own connections.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: std::ops::RangeInclusive<u16>,
    /// What a new flow to a Service without endpoints gets: `reject` (TCP RST, ICMP port
    /// unreachable, as kube-proxy) or `drop`.
    #[arg(long, default_value = "reject", value_parser = ["reject", "drop"])]
    no_endpoints: String,
    /// Also attach the XDP fast path (native mode) to the external interfaces: SNATed traffic to
    /// and from other nodes is turned around before the kernel allocates a packet buffer. The
    /// tc programs still handle everything else. On veth this costs bulk TCP throughput (no GRO).
    #[arg(long)]
    xdp: bool,
    /// Directory on a BPF filesystem for pinned maps; they keep state across restarts.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs_dir: PathBuf,
    /// How often to look for manifest changes and new interfaces, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_interval_ms: u64,
}

fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not FIRST-LAST"))?;
    let parse = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || first > last {
        return Err(format!("{first}-{last} is empty or starts at 0"));
    }
    Ok(first..=last)
}

fn globs(flag: &str, patterns: &[String]) -> anyhow::Result<Vec<glob::Pattern>> {
    patterns
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("{flag} {g:?}")))
        .collect()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => {
            let config = AgentConfig {
                manifests: args.manifests,
                node_name: args.node_name,
                pod_interfaces: globs("--pod-interfaces", &args.pod_interfaces)?,
                external_interfaces: globs("--external-interfaces", &args.external_interfaces)?,
                snat_address: args.snat_address,
                snat_ports: args.snat_ports,
                reject_no_endpoints: args.no_endpoints == "reject",
                xdp: args.xdp,
                bpffs_dir: args.bpffs_dir,
                poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { bpffs_dir } => {
            let counters = lb_userspace::loader::pinned_counters(&bpffs_dir)
                .context("is an agent running (or did one run) with this --bpffs-dir?")?;
            for (counter, packets) in counters {
                println!("{:<20} {packets}", counter.name());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Translate {
            manifests,
            node_name,
            node_addresses,
        } => {
            let text = std::fs::read_to_string(&manifests)
                .with_context(|| format!("reading {}", manifests.display()))?;
            let read = manifest::parse(&text, &manifests.display().to_string());
            let node = NodeContext {
                name: node_name,
                addresses: node_addresses,
            };
            let desired = translate(&read.objects, &node);
            println!("{}", report::frontends_table(&desired));
            for skipped in &desired.unprogrammed {
                println!("not programmed: {}: {}", skipped.service, skipped.reason);
            }
            let problems: Vec<_> = read.problems.iter().chain(&desired.problems).collect();
            for problem in &problems {
                println!("{problem}");
            }
            let failed = problems.iter().any(|p| p.severity == Severity::Error);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
