//! Control plane: how long each variant takes from "N Services described" to "all programmed",
//! how long one Service change takes with N present, and lb's peak memory. Every round starts
//! from nothing: a fresh namespace for the rule loaders, a fresh agent for lb.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_testbed::{
    kube_proxy_layouts::{
        IPTABLES_RESTORE, SyntheticService, iptables_partial_sync, iptables_restore,
        manifests_yaml, nft_partial_sync, nft_script,
    },
    netns::Netns,
    testbed::{AgentOptions, AgentProcess, Cluster, POD_CIDR},
};

use super::{
    beds::{Variant, cluster_services, lb_agent_args},
    workloads::Figures,
};

/// The cluster before and after one Service gains an endpoint (one in the middle of the list,
/// so neither end of a linear structure is favoured).
pub struct Change {
    pub before: Vec<SyntheticService>,
    pub after: Vec<SyntheticService>,
    pub changed: SyntheticService,
}

impl Change {
    pub fn new(synthetic: usize) -> Self {
        let before = cluster_services(synthetic);
        let mut after = before.clone();
        let index = synthetic / 2;
        after[index]
            .endpoints
            .push((Ipv4Addr::new(10, 203, 0, 1), 8080));
        let changed = after[index].clone();
        Self {
            before,
            after,
            changed,
        }
    }
}

/// The variants with a control plane.
pub const VARIANTS: [Variant; 3] = [Variant::Iptables, Variant::Nftables, Variant::LbTc];

/// One round for `variant`: `program_ms`, `change_ms`, and for lb its memory.
pub fn measure(
    variant: Variant,
    change: &Change,
    round: usize,
    lb: &Path,
    lb_bed: &Cluster,
    scratch: &Path,
) -> anyhow::Result<Figures> {
    match variant {
        Variant::Iptables => {
            let ns = fresh_namespace("ipt", round)?;
            let program = timed(|| {
                load(
                    &ns,
                    IPTABLES_RESTORE,
                    &["--noflush"],
                    &iptables_restore(&change.before, POD_CIDR),
                )
            })?;
            let partial = iptables_partial_sync(&change.after, &change.changed, POD_CIDR);
            let one = timed(|| load(&ns, IPTABLES_RESTORE, &["--noflush"], &partial))?;
            Ok(figures(program, one))
        }
        Variant::Nftables => {
            let ns = fresh_namespace("nft", round)?;
            let program = timed(|| {
                load(
                    &ns,
                    "nft",
                    &["-f", "-"],
                    &nft_script(&change.before, POD_CIDR),
                )
            })?;
            let partial = nft_partial_sync(&change.changed, POD_CIDR);
            let one = timed(|| load(&ns, "nft", &["-f", "-"], &partial))?;
            Ok(figures(program, one))
        }
        Variant::LbTc => lb_round(change, lb, lb_bed, scratch),
        other => anyhow::bail!("{} has no control plane", other.label()),
    }
}

fn figures(program: Duration, change: Duration) -> Figures {
    Figures::from([
        ("program_ms".to_owned(), program.as_secs_f64() * 1e3),
        ("change_ms".to_owned(), change.as_secs_f64() * 1e3),
    ])
}

/// Pipes `input` into `tool args` in `ns` (a rule loader).
fn load(ns: &Netns, tool: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    ns.pipe(tool, args, input).map(drop)
}

fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed())
}

fn fresh_namespace(tool: &str, round: usize) -> anyhow::Result<Netns> {
    Netns::create(&format!(
        "{}{}-cp-{tool}-{round}",
        lb_testbed::cleanup::NETNS_PREFIX,
        std::process::id()
    ))
}

/// A fresh agent on node-1 starts with only the measured Services; then the manifest is
/// replaced by the whole cluster (atomically) and SIGHUP makes the agent read it. The agent's
/// own figure for that sync covers reading and parsing the file, translating and writing the
/// maps. The same again for the changed cluster.
fn lb_round(
    change: &Change,
    lb: &Path,
    cluster: &Cluster,
    scratch: &Path,
) -> anyhow::Result<Figures> {
    let manifests = scratch.join("control-plane.yaml");
    write_atomically(&manifests, &manifests_yaml(&cluster_services(0)))?;
    let options = AgentOptions {
        // Only SIGHUP triggers a read, so a half-timed poll never races the measurement.
        poll_ms: 3_600_000,
        extra_args: lb_agent_args(),
        ..AgentOptions::default()
    };
    let mut agent = AgentProcess::start(cluster, "node-1", lb, &manifests, &options)?;
    let pid = agent.pid().context("agent pid")?;

    let mut sync_to = |services: &[SyntheticService]| -> anyhow::Result<Duration> {
        let before = agent.log().matches(SYNCED).count();
        write_atomically(&manifests, &manifests_yaml(services))?;
        agent.signal(libc::SIGHUP);
        agent.wait_for_log_count(SYNCED, before + 1, Duration::from_secs(120))?;
        let log = agent.log();
        let line = log
            .lines()
            .rfind(|l| l.contains(SYNCED))
            .context("a synced line")?;
        let frontends = field(line, "frontends")?;
        anyhow::ensure!(
            frontends >= services.len() as u64,
            "the agent programmed {frontends} frontends for {} Services: {line}",
            services.len()
        );
        Ok(Duration::from_micros(field(line, "elapsed_us")?))
    };
    let program = sync_to(&change.before)?;
    let one = sync_to(&change.after)?;
    let mut figures = figures(program, one);
    for (field, figure) in [("VmHWM", "peak_rss_mib"), ("RssAnon", "anon_rss_mib")] {
        figures.insert(figure.to_owned(), memory_kib(pid, field)? as f64 / 1024.0);
    }
    agent.stop()?;
    Ok(figures)
}

/// How the agent's log marks a finished sync (its tracing message).
const SYNCED: &str = " synced";

/// `name=<integer>` in a tracing log line.
fn field(line: &str, name: &str) -> anyhow::Result<u64> {
    let needle = format!("{name}=");
    let start = line
        .find(&needle)
        .with_context(|| format!("no {name} in {line:?}"))?
        + needle.len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .with_context(|| format!("{name} in {line:?}"))
}

/// A memory figure of /proc/<pid>/status in KiB: VmHWM is the most resident memory the
/// process has had (including its mapping of the slots array, which the kernel populates
/// whole), RssAnon its own heap and stacks now.
fn memory_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .with_context(|| format!("{field} in /proc/<pid>/status"))?;
    line.split_whitespace()
        .nth(1)
        .with_context(|| format!("{field} value"))?
        .parse()
        .with_context(|| format!("{field} value"))
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_out_of_a_tracing_line() {
        let line = "2026-11-28T03:00:00Z  INFO lb::agent: synced frontends=40012 backends=6 writes=3 deletes=0 elapsed_us=812345";
        assert_eq!(field(line, "frontends").unwrap(), 40012);
        assert_eq!(field(line, "elapsed_us").unwrap(), 812345);
        assert!(field(line, "missing").is_err());
    }

    #[test]
    fn the_change_adds_one_endpoint_to_one_service() {
        let change = Change::new(10);
        assert_eq!(change.before.len(), change.after.len());
        let differing: Vec<usize> = (0..change.before.len())
            .filter(|&i| change.before[i] != change.after[i])
            .collect();
        assert_eq!(differing, vec![5]);
        assert_eq!(
            change.after[5].endpoints.len(),
            change.before[5].endpoints.len() + 1
        );
        assert_eq!(change.changed, change.after[5]);
    }
}
