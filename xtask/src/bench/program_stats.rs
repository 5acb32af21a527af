//! What lb's programs cost per packet under the real workloads: the kernel's own accounting of
//! each program's run time (`BPF_ENABLE_STATS`, as `kernel.bpf_stats_enabled=1`), read before
//! and after one extra run of a workload. Only the bed under traffic runs its programs then, so
//! the differences are that bed's, summed over its two nodes by program name. Stats cost two
//! clock reads a run, so they are on only for this extra pass, never during the measured rounds.

use std::collections::BTreeMap;

use anyhow::Context as _;

use super::{
    beds::TrafficPath,
    workloads::{Figures, Kind, Workload},
};

/// Program name (as the kernel keeps it, 15 characters at most) → (total run time ns, runs).
type Totals = BTreeMap<String, (u64, u64)>;

fn totals() -> anyhow::Result<Totals> {
    let mut out = Totals::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("reading a loaded program's info")?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("lb_") {
            continue;
        }
        let entry = out.entry(name.to_owned()).or_default();
        entry.0 += info.run_time().as_nanos() as u64;
        entry.1 += info.run_count();
    }
    Ok(out)
}

/// Fewer runs than this in a workload's window are left out.
const MIN_RUNS: u64 = 100;

/// The workloads of the pass: what carries packets through lb's programs.
pub const WORKLOADS: [Workload; 5] = [
    Workload {
        kind: Kind::Throughput,
        path: TrafficPath::ClusterIp,
    },
    Workload {
        kind: Kind::Throughput,
        path: TrafficPath::NodePort,
    },
    Workload {
        kind: Kind::ConnectionRate,
        path: TrafficPath::ClusterIp,
    },
    Workload {
        kind: Kind::SmallPackets,
        path: TrafficPath::NodePort,
    },
    Workload {
        kind: Kind::SmallPackets,
        path: TrafficPath::ClusterIp,
    },
];

/// The workload id a stats sample is recorded under.
pub fn sample_id(workload: Workload) -> String {
    format!("bpf-stats/{}", workload.id())
}

/// Runs `workload` with run-time statistics on and returns, per lb program that ran, its mean
/// ns a run and its runs a second: figures `<program>.ns` and `<program>.runs_per_s`.
pub fn during(workload: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Figures> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let before = totals()?;
    let started = std::time::Instant::now();
    workload()?;
    let seconds = started.elapsed().as_secs_f64();
    let after = totals()?;
    let mut figures = Figures::new();
    for (name, (time, runs)) in after {
        let (time0, runs0) = before.get(&name).copied().unwrap_or_default();
        let runs = runs.saturating_sub(runs0);
        // A handful of runs is another bed's background (neighbour discovery, say), not this
        // workload's.
        if runs < MIN_RUNS {
            continue;
        }
        let ns = time.saturating_sub(time0) as f64 / runs as f64;
        figures.insert(format!("{name}.ns"), ns);
        figures.insert(format!("{name}.runs_per_s"), runs as f64 / seconds);
    }
    Ok(figures)
}
