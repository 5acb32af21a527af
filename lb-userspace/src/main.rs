use std::{
    io::IsTerminal as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent,
    config::AgentArgs,
    inspect::{self, Format, PinnedMaps, explain::Origin},
    manifest,
    model::Severity,
    report,
    state::NodeState,
    translate::{NodeContext, translate},
};

/// The version line: the crate version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LB_GIT_COMMIT"),
    ")"
);

/// lb: an eBPF Kubernetes Service load balancer (a kube-proxy replacement).
#[derive(Parser)]
#[command(version = VERSION, about)]
struct Cli {
    /// Log lines as plain text or as JSON objects (one a line). Plain text has colours only on a
    /// terminal.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// Where a node's agent keeps its maps and its state file.
#[derive(clap::Args)]
struct NodeDirs {
    /// The agent's --bpffs-dir.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs_dir: PathBuf,
    /// The agent's --state-dir (names for what the maps hold; without it ids are shown).
    #[arg(long, env = "LB_STATE_DIR", default_value = lb_userspace::state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

impl NodeDirs {
    fn open(&self) -> anyhow::Result<(PinnedMaps, Option<NodeState>)> {
        let maps = PinnedMaps::open(&self.bpffs_dir)?;
        let state = match NodeState::read(&self.state_dir) {
            Ok(state) => Some(state),
            Err(err) => {
                eprintln!("warning: {err:#}; showing ids instead of names");
                None
            }
        };
        Ok((maps, state))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the packet path and keep it programmed from the API server (or
    /// a manifest file) (needs root).
    Agent(Box<AgentArgs>),
    /// Every programmed Service frontend with its backends (node, condition, Maglev share),
    /// policies and traffic counters, read from the pinned maps.
    Services {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Only this Service (namespace/name).
        #[arg(long)]
        service: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Which frontend a flow hits, which policy applies and which backend the packet path would
    /// choose, and why (conntrack, session affinity, Maglev slot, source ranges, SNAT).
    Explain {
        #[command(flatten)]
        dirs: NodeDirs,
        /// The client: IP or IP:PORT, [IPv6]:PORT (without a port, the backends all ports
        /// spread over).
        #[arg(long)]
        from: String,
        /// The destination: a Service frontend, IP:PORT or [IPv6]:PORT.
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: Proto,
        /// Where the packet enters this node.
        #[arg(long, value_enum, default_value_t)]
        origin: Origin,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// The flows lb translates: client, frontend, Service, backend, SNAT, state and age.
    Conntrack {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Only the flows of this Service (namespace/name).
        #[arg(long)]
        service: Option<String>,
        /// Delete the flows shown (their next packets start new flows, maybe to another
        /// backend).
        #[arg(long)]
        flush: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// A live stream of new flows and of refused ones (no backend, source ranges, SNAT), with
    /// reasons, from the packet path's ring buffer. Costs the packet path nothing while nobody
    /// listens.
    Monitor {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Events a second per CPU at most (the packet path drops the rest and counts them).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this long (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Print events as JSON objects, one a line.
        #[arg(long)]
        json: bool,
    },
    /// Packet counters of the packet path (summed over CPUs), read from the pinned maps: what
    /// was translated, passed and sent on, and the drops by reason.
    Stats {
        /// The agent's --bpffs-dir.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs_dir: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Prints a shell completion script (e.g. `lb completion bash > /etc/bash_completion.d/lb`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
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
        node_addresses: Vec<std::net::IpAddr>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        // Escapes only where a terminal reads them, not in files and `kubectl logs`.
        LogFormat::Plain => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli) {
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
        Command::Stats { bpffs_dir, output } => {
            let counters = lb_userspace::loader::pinned_counters(&bpffs_dir)
                .context("is an agent running (or did one run) with this --bpffs-dir?")?;
            let by_name: std::collections::BTreeMap<&str, u64> =
                counters.iter().map(|(c, n)| (c.name(), *n)).collect();
            inspect::print(output, &by_name, |_| {
                let mut table = inspect::table(&["COUNTER", "PACKETS", "MEANING"]);
                for (counter, packets) in &counters {
                    table.add_row([
                        counter.name().to_owned(),
                        packets.to_string(),
                        counter_meaning(*counter).to_owned(),
                    ]);
                }
                table.to_string()
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Services {
            dirs,
            service,
            output,
        } => {
            let (maps, state) = dirs.open()?;
            let mut services = inspect::services::collect(&maps, state.as_ref());
            if let Some(wanted) = &service {
                services.retain(|s| format!("{}/{}", s.namespace, s.name) == *wanted);
                if services.is_empty() {
                    anyhow::bail!("no Service {wanted} on this node");
                }
            }
            inspect::print(output, &services, |s| inspect::services::render(s))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            dirs,
            from,
            to,
            proto,
            origin,
            output,
        } => {
            let (from, from_port) = match from.parse::<SocketAddr>() {
                Ok(addr) => (addr.ip(), Some(addr.port())),
                Err(_) => (
                    from.parse::<IpAddr>()
                        .with_context(|| format!("--from {from:?} is not IP or IP:PORT"))?,
                    None,
                ),
            };
            anyhow::ensure!(
                from.is_ipv4() == to.is_ipv4(),
                "--from {from} and --to {to} are of different families: no packet goes so"
            );
            let query = inspect::explain::Query {
                from,
                from_port,
                to: to.ip(),
                to_port: to.port(),
                protocol: match proto {
                    Proto::Tcp => "TCP",
                    Proto::Udp => "UDP",
                },
                origin,
            };
            let (maps, state) = dirs.open()?;
            let explanation = inspect::explain::explain(&maps, state.as_ref(), &query);
            inspect::print(output, &explanation, |e| {
                inspect::explain::render(&query, e)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Conntrack {
            dirs,
            service,
            flush,
            output,
        } => {
            let (maps, state) = dirs.open()?;
            let only = match &service {
                Some(wanted) => {
                    let state = state.as_ref().context(
                        "--service needs the state file to know the Service's frontends",
                    )?;
                    let ids = inspect::conntrack::service_ids(&maps, state, wanted);
                    if ids.is_empty() {
                        anyhow::bail!("no frontend of Service {wanted} is programmed");
                    }
                    Some(ids)
                }
                None => None,
            };
            let entries = inspect::conntrack::entries(&maps).context("reading the conntrack")?;
            if flush {
                let flows = inspect::conntrack::flush(&maps, &entries, only.as_deref())
                    .context("deleting conntrack entries")?;
                println!("flushed {flows} flows");
                return Ok(ExitCode::SUCCESS);
            }
            let flows =
                inspect::conntrack::collect(&maps, state.as_ref(), &entries, only.as_deref());
            inspect::print(output, &flows, |f| inspect::conntrack::render(f))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Monitor {
            dirs,
            rate,
            count,
            duration,
            json,
        } => monitor(&dirs, rate, count, duration, json),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
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

/// What each node-wide counter means, for `lb stats`.
fn counter_meaning(counter: lb_common::counters::Counter) -> &'static str {
    use lb_common::counters::Counter as C;
    match counter {
        C::Translated => "client -> Service packets sent to a backend",
        C::ReverseTranslated => "backend -> client replies rewritten to the Service address",
        C::Passed => "not Service traffic: untouched",
        C::DroppedNoBackend => "drop: new flow to a Service without usable endpoints",
        C::Malformed => "headers cut short or inconsistent: untouched",
        C::Rejected => "no endpoints: answered with a TCP RST / ICMP unreachable",
        C::SnatFailed => "drop: SNAT needed but no node address or free port",
        C::Redirected => "sent on by FIB lookup and redirect",
        C::RedirectFailed => "no route for a redirect: handed to the stack",
        C::XdpTransmitted => "rewritten and sent back out by XDP",
        C::Rebalanced => "flow whose backend left, balanced afresh",
        C::IcmpTranslated => "ICMP errors about translated flows, rewritten",
        C::PortRemapped => "new flow whose reply tuple was taken: source port remapped",
        C::DroppedSourceRange => "drop: new flow from outside loadBalancerSourceRanges",
        C::StageFailed => "an IPv6 stage could not run (passed at entry, else dropped)",
    }
}

/// `lb monitor`: switches the packet path's events on, prints them until stopped.
fn monitor(
    dirs: &NodeDirs,
    rate: u32,
    count: Option<usize>,
    duration: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let (maps, mut state) = dirs.open()?;
    let mut monitor = inspect::monitor::Monitor::open(&maps, rate)?;
    let mut names = inspect::service_names(&maps, state.as_ref());
    let lost_before = monitor.lost();
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::Handler(on_signal))?;
        }
    }
    let started = Instant::now();
    let mut seen = 0usize;
    let mut names_read = Instant::now();
    // Switched on before saying so: a flow started after this line is seen.
    monitor.renew()?;
    eprintln!("listening for new and refused flows (Ctrl-C stops)");
    let mut out = std::io::stdout().lock();
    while !INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
        && count.is_none_or(|c| seen < c)
        && duration.is_none_or(|d| started.elapsed() < d)
    {
        monitor.renew()?;
        // New Services get names as the agent writes them.
        if names_read.elapsed() > Duration::from_secs(2) {
            state = NodeState::read(&dirs.state_dir).ok().or(state);
            names = inspect::service_names(&maps, state.as_ref());
            names_read = Instant::now();
        }
        let events = monitor.drain();
        if events.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        for event in events {
            let view = inspect::monitor::view(&event, &names);
            let line = if json {
                serde_json::to_string(&view)?
            } else {
                inspect::monitor::render(&view)
            };
            writeln!(out, "{line}")?;
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                break;
            }
        }
        out.flush()?;
    }
    monitor.stop();
    let lost = monitor.lost().saturating_sub(lost_before);
    if lost > 0 {
        eprintln!("{lost} events were not shown (over --rate, or the ring buffer was full)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Set by SIGINT or SIGTERM: the monitor stops, switching the packet path's events off.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}
