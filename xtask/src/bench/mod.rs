//! `cargo xtask bench`: lb side by side with kube-proxy's iptables and nftables layouts and with
//! no load balancer at all, on the namespace testbed, in one run. See BENCHMARKS.md for the
//! method. Every variant has a testbed of its own; rounds alternate between them
//! (A B C D E, A B C D E, ...) so that a noisy neighbour hits all of them alike.

mod beds;
mod charts;
mod control_plane;
mod program_cost;
mod program_stats;
mod report;
mod tools;
mod workloads;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use lb_testbed::{cleanup, testbed::Cluster};

use beds::{Bed, Variant};
use report::{CONTROL_PLANE, Machine, Method, Results, Sample};
use workloads::{Durations, Workload};

pub struct Options {
    /// One round, fewer Services, short measurements: a smoke run.
    pub quick: bool,
    pub rounds: Option<usize>,
    /// Synthetic Services per scale (the measured ones come on top).
    pub synthetic: Option<Vec<usize>>,
    pub out_dir: PathBuf,
}

struct Plan {
    rounds: usize,
    synthetic: Vec<usize>,
    durations: Durations,
}

impl Plan {
    fn new(options: &Options) -> Self {
        let (rounds, synthetic, durations) = if options.quick {
            let second = Duration::from_secs(1);
            (
                1,
                vec![0, 1000],
                Durations {
                    throughput: second,
                    request_response: second,
                    connection_rate: second,
                    small_packets: second,
                },
            )
        } else {
            (
                5,
                vec![0, 1000, 10_000],
                Durations {
                    throughput: Duration::from_secs(4),
                    request_response: Duration::from_secs(3),
                    connection_rate: Duration::from_secs(2),
                    small_packets: Duration::from_secs(2),
                },
            )
        };
        let mut synthetic = options.synthetic.clone().unwrap_or(synthetic);
        synthetic.sort_unstable();
        synthetic.dedup();
        Self {
            rounds: options.rounds.unwrap_or(rounds).max(1),
            synthetic,
            durations,
        }
    }

    fn measurements(&self) -> u64 {
        let per_round: usize = Workload::ALL
            .iter()
            .map(|w| Variant::ALL.iter().filter(|v| v.applies_to(w.path)).count())
            .sum();
        let stats_pass = program_stats::WORKLOADS
            .iter()
            .map(|w| lb_variants().filter(|v| v.applies_to(w.path)).count())
            .sum::<usize>();
        (self.synthetic.len() * (self.rounds * per_round + stats_pass)
            + self.rounds * control_plane::VARIANTS.len()) as u64
    }
}

/// Runs the benchmark with the `lb` binary at `lb`; returns the JSON results' path.
pub fn run(lb: &Path, options: &Options) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the benchmark builds network namespaces and loads BPF programs: run it as root"
    );
    cleanup::install_interrupt_handler();
    tools::ensure_installed()?;
    // Fail before a 40-minute run, not after it, if the charts cannot be drawn.
    charts::register_text_font()?;
    let plan = Plan::new(options);
    let started = jiff::Timestamp::now();
    let scratch = Scratch::create()?;

    let progress = ProgressBar::new(plan.measurements()).with_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} measurements, about {eta} left\n{msg}",
        )
        .expect("a valid template"),
    );
    progress.enable_steady_tick(Duration::from_millis(250));

    let samples = measure_data_plane(&plan, lb, &scratch, &progress)?;
    let control = measure_control_plane(&plan, lb, &scratch, &progress)?;
    progress.set_message("per-packet program cost (BPF_PROG_TEST_RUN)");
    let repeat = if options.quick { 100_000 } else { 1_000_000 };
    let program_cost = program_cost::measure(plan.rounds, repeat, &scratch)?;
    progress.finish_with_message("measured");

    let mut results = Results {
        started: started.to_string(),
        quick: options.quick,
        machine: machine()?,
        method: Method {
            rounds: plan.rounds,
            service_counts: plan
                .synthetic
                .iter()
                .map(|&n| n + beds::MEASURED_SERVICES)
                .collect(),
            measured_services: beds::MEASURED_SERVICES,
            durations: plan.durations,
            notes: notes(),
        },
        samples,
        control_plane: control,
        program_cost,
        summary: Vec::new(),
        targets: Vec::new(),
    };
    results.summarize();
    check_complete(&results)?;
    write_outputs(&results, &options.out_dir, &started)
}

/// Every scale: the five beds, then the rounds, each workload visiting every variant in turn.
fn measure_data_plane(
    plan: &Plan,
    lb: &Path,
    scratch: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for &synthetic in &plan.synthetic {
        let services = beds::cluster_services(synthetic);
        let count = services.len();
        let mut beds = Vec::new();
        for variant in Variant::ALL {
            progress.set_message(format!("{count} Services: setting up {}", variant.label()));
            let manifests = scratch.join(format!("{variant:?}.yaml"));
            let started = Instant::now();
            beds.push(
                Bed::start(variant, &services, lb, &manifests)
                    .with_context(|| format!("setting up {}", variant.label()))?,
            );
            say(
                progress,
                format!(
                    "{count} Services: {} ready in {:.1} s",
                    variant.label(),
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        for round in 0..plan.rounds {
            for workload in Workload::ALL {
                for bed in beds.iter().filter(|b| b.variant.applies_to(workload.path)) {
                    progress.set_message(format!(
                        "{count} Services, round {}/{}: {} on {}",
                        round + 1,
                        plan.rounds,
                        workload.label(),
                        bed.variant.label()
                    ));
                    let figures = measure_with_retry(bed, workload, &plan.durations)?;
                    log_figures(progress, &figures);
                    samples.push(Sample {
                        services: count,
                        round,
                        variant: bed.variant,
                        workload: workload.id(),
                        figures,
                    });
                    progress.inc(1);
                }
            }
        }
        samples.extend(measure_program_stats(&beds, count, plan, progress)?);
    }
    Ok(samples)
}

/// Once per scale, after the rounds: lb's beds run the workloads of [`program_stats`] again with
/// the kernel's run-time statistics on.
fn measure_program_stats(
    beds: &[Bed],
    services: usize,
    plan: &Plan,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for bed in beds
        .iter()
        .filter(|b| lb_variants().any(|v| v == b.variant))
    {
        for workload in program_stats::WORKLOADS
            .into_iter()
            .filter(|w| bed.variant.applies_to(w.path))
        {
            progress.set_message(format!(
                "{services} Services, BPF run-time statistics: {} on {}",
                workload.label(),
                bed.variant.label()
            ));
            let figures = program_stats::during(|| {
                measure_with_retry(bed, workload, &plan.durations).map(drop)
            })?;
            log_figures(progress, &figures);
            samples.push(Sample {
                services,
                round: 0,
                variant: bed.variant,
                workload: program_stats::sample_id(workload),
                figures,
            });
            progress.inc(1);
        }
    }
    Ok(samples)
}

fn lb_variants() -> impl Iterator<Item = Variant> {
    [Variant::LbTc, Variant::LbXdp].into_iter()
}

/// At the largest scale: each round programs every control-plane variant from nothing.
fn measure_control_plane(
    plan: &Plan,
    lb: &Path,
    scratch: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Sample>> {
    let largest = *plan.synthetic.last().context("at least one scale")?;
    let change = control_plane::Change::new(largest);
    let control_bed = Cluster::two_nodes()?;
    let mut control = Vec::new();
    for round in 0..plan.rounds {
        for variant in control_plane::VARIANTS {
            progress.set_message(format!(
                "control plane, round {}/{}: {} Services into {}",
                round + 1,
                plan.rounds,
                change.before.len(),
                variant.label()
            ));
            let figures =
                control_plane::measure(variant, &change, round, lb, &control_bed, scratch)
                    .with_context(|| format!("control plane of {}", variant.label()))?;
            log_figures(progress, &figures);
            control.push(Sample {
                services: change.before.len(),
                round,
                variant,
                workload: CONTROL_PLANE.to_owned(),
                figures,
            });
            progress.inc(1);
        }
    }
    Ok(control)
}

/// A line above the progress bar, or on stderr when there is no terminal to draw it on.
fn say(progress: &ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("[{:>4}s] {line}", progress.elapsed().as_secs());
    } else {
        progress.println(line);
    }
}

/// Without a terminal (CI), each measurement is logged with what it was.
fn log_figures(progress: &ProgressBar, figures: &workloads::Figures) {
    if progress.is_hidden() {
        let values: Vec<String> = figures
            .iter()
            .map(|(name, value)| format!("{name}={}", report::fmt(*value)))
            .collect();
        eprintln!(
            "[{:>4}s] {}: {}",
            progress.elapsed().as_secs(),
            progress.message(),
            values.join(" ")
        );
    }
}

/// One retry: a tool failing once (say, iperf3's control connection timing out on a loaded
/// machine) should not cost a half-hour run; failing twice is an error.
fn measure_with_retry(
    bed: &Bed,
    workload: Workload,
    durations: &Durations,
) -> anyhow::Result<workloads::Figures> {
    workloads::measure(bed, workload, durations).or_else(|first| {
        eprintln!("retrying once after: {first:#}");
        workloads::measure(bed, workload, durations)
    })
}

/// Every (scale, workload, variant) and every control-plane variant has a sample per round
/// with finite figures: a variant that silently delivered nothing fails the run.
fn check_complete(results: &Results) -> anyhow::Result<()> {
    let mut seen: BTreeMap<(usize, Variant, String), usize> = BTreeMap::new();
    for sample in results.samples.iter().chain(&results.control_plane) {
        for (figure, value) in &sample.figures {
            anyhow::ensure!(
                value.is_finite() && *value >= 0.0,
                "{} on {} with {} Services: {figure} = {value}",
                sample.workload,
                sample.variant.label(),
                sample.services
            );
        }
        *seen
            .entry((sample.services, sample.variant, sample.workload.clone()))
            .or_default() += 1;
    }
    let rounds = results.method.rounds;
    for &services in &results.method.service_counts {
        for workload in Workload::ALL {
            for variant in Variant::ALL.iter().filter(|v| v.applies_to(workload.path)) {
                let n = seen
                    .get(&(services, *variant, workload.id()))
                    .copied()
                    .unwrap_or(0);
                anyhow::ensure!(
                    n == rounds,
                    "{} on {} with {services} Services: {n} of {rounds} samples",
                    workload.id(),
                    variant.label()
                );
            }
        }
    }
    for variant in control_plane::VARIANTS {
        let n = seen
            .get(&(results.largest(), variant, CONTROL_PLANE.to_owned()))
            .copied()
            .unwrap_or(0);
        anyhow::ensure!(
            n == rounds,
            "control plane of {}: {n} of {rounds}",
            variant.label()
        );
    }
    Ok(())
}

/// Writes the markdown report and the charts again from a run's JSON (e.g. after the charts
/// changed), next to it.
pub fn replot(json: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let mut results: Results =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    // Summaries and targets again from the samples: targets as this version defines them.
    results.summarize();
    let stem = json.with_extension("");
    let md = stem.with_extension("md");
    std::fs::write(&md, report::markdown(&results))
        .with_context(|| format!("writing {}", md.display()))?;
    for chart in charts::write_all(&results, &stem)? {
        eprintln!("chart:   {}", chart.display());
    }
    eprintln!("report:  {}", md.display());
    Ok(())
}

fn write_outputs(
    results: &Results,
    out_dir: &Path,
    started: &jiff::Timestamp,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = out_dir.join(started.strftime("%Y-%m-%dT%H%M%SZ").to_string());
    let json = stem.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let markdown = report::markdown(results);
    let md = stem.with_extension("md");
    std::fs::write(&md, &markdown).with_context(|| format!("writing {}", md.display()))?;
    let charts = charts::write_all(results, &stem)?;
    println!("{markdown}");
    eprintln!("results: {}", json.display());
    eprintln!("report:  {}", md.display());
    for chart in charts {
        eprintln!("chart:   {}", chart.display());
    }
    Ok(json)
}

fn notes() -> Vec<String> {
    vec![
        "iptables and nftables are reproductions of kube-proxy's rule layouts, loaded with \
         iptables-legacy-restore (x_tables) and nft -f on both nodes; they are not kube-proxy \
         itself."
            .to_owned(),
        "New connections: two client threads, each connection closed with RST (SO_LINGER 0), \
         so no TIME_WAIT state piles up."
            .to_owned(),
        match beds::lb_agent_args() {
            args if args.is_empty() => "lb runs with its defaults on every bed (Maglev tables \
                                        sized to each Service's backend count)."
                .to_owned(),
            args => format!("lb runs with {} on every bed.", args.join(" ")),
        },
        "lb (xdp) differs from lb (tc) only on the external interfaces, so it is measured on \
         the NodePort paths only."
            .to_owned(),
    ]
}

fn machine() -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_owned())
            .unwrap_or_default(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory_kib / (1024.0 * 1024.0),
        tools: tools::versions(),
    })
}

/// A scratch directory for manifests: removed when dropped, and on Ctrl-C with the run's
/// namespaces.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "{}{}-bench",
            cleanup::NETNS_PREFIX,
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        cleanup::register_pin_dir(dir.clone());
        Ok(Self(dir))
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        cleanup::remove_pin_dir(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sample of every (scale, workload, applicable variant) and every control plane.
    fn complete_samples() -> (Vec<Sample>, Vec<Sample>) {
        let mut samples = Vec::new();
        for services in [4, 10_004] {
            for workload in Workload::ALL {
                for variant in Variant::ALL
                    .into_iter()
                    .filter(|v| v.applies_to(workload.path))
                {
                    samples.push(Sample {
                        services,
                        round: 0,
                        variant,
                        workload: workload.id(),
                        figures: workloads::Figures::from([("x".to_owned(), 1.0)]),
                    });
                }
            }
        }
        let control = control_plane::VARIANTS
            .into_iter()
            .map(|variant| Sample {
                services: 10_004,
                round: 0,
                variant,
                workload: CONTROL_PLANE.to_owned(),
                figures: workloads::Figures::from([("program_ms".to_owned(), 1.0)]),
            })
            .collect();
        (samples, control)
    }

    #[test]
    fn a_run_with_every_sample_is_complete() {
        let (samples, control) = complete_samples();
        check_complete(&report::test_results(1, samples, control)).unwrap();
    }

    #[test]
    fn a_missing_variant_or_a_bad_figure_fails_the_run() {
        let (mut samples, control) = complete_samples();
        let dropped = samples.remove(7);
        let error = check_complete(&report::test_results(1, samples, control.clone()))
            .unwrap_err()
            .to_string();
        assert!(error.contains(&dropped.workload), "{error}");
        assert!(error.contains("0 of 1"), "{error}");

        let (mut samples, _) = complete_samples();
        samples[0].figures.insert("gbit_per_s".to_owned(), f64::NAN);
        assert!(check_complete(&report::test_results(1, samples, control.clone())).is_err());

        let (samples, _) = complete_samples();
        assert!(check_complete(&report::test_results(1, samples, control[1..].to_vec())).is_err());
    }
}
