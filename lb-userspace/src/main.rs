use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent,
    config::AgentArgs,
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
    /// Run the node agent: load the packet path and keep it programmed from the API server (or
    /// a manifest file) (needs root).
    Agent(Box<AgentArgs>),
    /// Packet counters of the packet path (summed over CPUs), read from the pinned maps.
    Stats {
        /// The agent's --bpffs-dir.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs_dir: PathBuf,
    },
    /// Detach lb's programs from every interface and unpin its links and maps (of any layout
    /// version) under --bpffs-dir: the uninstall, like `kube-proxy --cleanup`. Stop the agent
    /// first (the DaemonSet), or it attaches again.
    Cleanup {
        /// The agent's --bpffs-dir.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs_dir: PathBuf,
    },
    /// Mount a BPF filesystem at PATH unless one is there already (the DaemonSet's init
    /// container runs this so pinned maps survive agent restarts).
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        path: PathBuf,
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

fn cleanup(bpffs_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let removed = lb_userspace::loader::cleanup(bpffs_dir)
        .with_context(|| format!("cleaning up {}", bpffs_dir.display()))?;
    let links = removed
        .iter()
        .filter(|p| p.parent().and_then(|d| d.file_name()) == Some("links".as_ref()))
        .count();
    println!(
        "removed {links} links (programs detached) and {} maps under {}",
        removed.len() - links,
        bpffs_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) if args.cleanup => {
            let config = args.resolve()?;
            cleanup(&config.bpffs_dir)
        }
        Command::Cleanup { bpffs_dir } => cleanup(&bpffs_dir),
        Command::Agent(args) => {
            let config = args.resolve()?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MountBpffs { path } => {
            let mounted = nix::sys::statfs::statfs(&path)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
            if mounted {
                println!("{} is already a BPF filesystem", path.display());
            } else {
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                nix::mount::mount(
                    Some("bpf"),
                    &path,
                    Some("bpf"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .with_context(|| format!("mounting bpffs at {}", path.display()))?;
                println!("mounted bpffs at {}", path.display());
            }
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
                ..NodeContext::default()
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
