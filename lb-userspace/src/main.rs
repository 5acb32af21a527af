use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent::{self, AgentConfig},
    manifest,
    model::Severity,
    report,
    translate::translate,
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
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Standalone mode: read Services and EndpointSlices from this multi-document YAML file
    /// instead of the API server. Changes to the file (and SIGHUP) are applied as a diff.
    #[arg(long)]
    manifests: PathBuf,
    /// Glob(s) naming the pod-facing interfaces (host side of pod veths), e.g. 'veth*' or
    /// 'lxc*,cali*'. Matching interfaces that appear later are attached too.
    #[arg(long, value_delimiter = ',', required = true)]
    pod_interfaces: Vec<String>,
    /// Directory on a BPF filesystem for pinned maps; they keep state across restarts.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs_dir: PathBuf,
    /// How often to look for manifest changes and new interfaces, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_interval_ms: u64,
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
            let pod_interfaces = args
                .pod_interfaces
                .iter()
                .map(|g| glob::Pattern::new(g).with_context(|| format!("--pod-interfaces {g:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let config = AgentConfig {
                manifests: args.manifests,
                pod_interfaces,
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
        Command::Translate { manifests } => {
            let text = std::fs::read_to_string(&manifests)
                .with_context(|| format!("reading {}", manifests.display()))?;
            let read = manifest::parse(&text, &manifests.display().to_string());
            let desired = translate(&read.objects);
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
