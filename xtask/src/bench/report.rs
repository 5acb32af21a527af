//! What a benchmark run found: every sample, medians and spreads, the targets with their
//! ratios, as JSON and as a markdown report.

use std::collections::BTreeMap;

use comfy_table::{Table, presets::ASCII_MARKDOWN};
use serde::{Deserialize, Serialize};

use super::program_cost::ProgramCost;
use super::{
    beds::{TrafficPath, Variant},
    workloads::{Durations, Figures, Kind, Workload},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    /// UTC, RFC 3339.
    pub started: String,
    pub quick: bool,
    pub machine: Machine,
    pub method: Method,
    /// One per (Services, round, workload, variant), in the order they ran.
    pub samples: Vec<Sample>,
    /// One per (round, variant), at the largest number of Services.
    pub control_plane: Vec<Sample>,
    /// Per-packet cost of each program path (absent from runs before it was measured).
    #[serde(default)]
    pub program_cost: ProgramCost,
    pub summary: Vec<Summary>,
    pub targets: Vec<TargetResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    /// Tool name → its version line.
    pub tools: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Method {
    pub rounds: usize,
    /// Services programmed in each scale: synthetic ones plus the measured ones.
    pub service_counts: Vec<usize>,
    pub measured_services: usize,
    pub durations: Durations,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub services: usize,
    pub round: usize,
    pub variant: Variant,
    /// `control-plane` for control-plane samples.
    pub workload: String,
    pub figures: Figures,
}

/// Median and spread of one figure over the rounds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub services: usize,
    pub variant: Variant,
    pub workload: String,
    pub figure: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetResult {
    pub target: String,
    /// What was compared, with the medians.
    pub measured: String,
    pub ratio: Option<f64>,
    /// `None` when a figure is missing (e.g. a variant not run).
    pub met: Option<bool>,
}

pub const CONTROL_PLANE: &str = "control-plane";

impl Results {
    /// Fills `summary` and `targets` from the samples.
    pub fn summarize(&mut self) {
        let mut groups: BTreeMap<(usize, Variant, String, String), Vec<f64>> = BTreeMap::new();
        for sample in self.samples.iter().chain(&self.control_plane) {
            for (figure, value) in &sample.figures {
                groups
                    .entry((
                        sample.services,
                        sample.variant,
                        sample.workload.clone(),
                        figure.clone(),
                    ))
                    .or_default()
                    .push(*value);
            }
        }
        self.summary = groups
            .into_iter()
            .map(|((services, variant, workload, figure), values)| {
                let (median, min, max) = spread(&values);
                Summary {
                    services,
                    variant,
                    workload,
                    figure,
                    median,
                    min,
                    max,
                    n: values.len(),
                }
            })
            .collect();
        self.targets = targets(self);
    }

    pub fn find(
        &self,
        services: usize,
        variant: Variant,
        workload: &str,
        figure: &str,
    ) -> Option<&Summary> {
        self.summary.iter().find(|s| {
            s.services == services
                && s.variant == variant
                && s.workload == workload
                && s.figure == figure
        })
    }

    fn median(
        &self,
        services: usize,
        variant: Variant,
        workload: &str,
        figure: &str,
    ) -> Option<f64> {
        self.find(services, variant, workload, figure)
            .map(|s| s.median)
    }

    pub fn smallest(&self) -> usize {
        self.method
            .service_counts
            .iter()
            .copied()
            .min()
            .unwrap_or(0)
    }

    pub fn largest(&self) -> usize {
        self.method
            .service_counts
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// (median, min, max); the median of an even count is the mean of the middle two.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

fn workload_id(kind: Kind, path: TrafficPath) -> String {
    Workload { kind, path }.id()
}

/// The targets, each as a ratio of medians from this run.
fn targets(results: &Results) -> Vec<TargetResult> {
    let (small, large) = (results.smallest(), results.largest());
    let mut out = Vec::new();
    // ratio = lb / other; met when the comparison holds.
    let mut ratio_target = |target: String,
                            lb: Option<f64>,
                            other: Option<f64>,
                            what: String,
                            met: &dyn Fn(f64) -> bool| {
        let ratio = lb.zip(other).map(|(a, b)| a / b);
        out.push(TargetResult {
            target,
            measured: match (lb, other) {
                (Some(a), Some(b)) => format!("{what}: {} vs {}", fmt(a), fmt(b)),
                _ => format!("{what}: not measured"),
            },
            ratio,
            met: ratio.map(met),
        });
    };
    let throughput = workload_id(Kind::Throughput, TrafficPath::ClusterIp);
    let rr = workload_id(Kind::RequestResponse, TrafficPath::ClusterIp);
    let connections = workload_id(Kind::ConnectionRate, TrafficPath::ClusterIp);
    let udp = workload_id(Kind::SmallPackets, TrafficPath::NodePort);
    let m = |services, variant, workload: &str, figure| {
        results.median(services, variant, workload, figure)
    };
    for &services in &results.method.service_counts {
        let lb = m(services, Variant::LbTc, &throughput, "gbit_per_s");
        ratio_target(
            format!("ClusterIP throughput ≥ 0.95 × direct ({services} Services)"),
            lb,
            m(services, Variant::Direct, &throughput, "gbit_per_s"),
            "Gbit/s lb (tc) vs direct".to_owned(),
            &|r| r >= 0.95,
        );
        ratio_target(
            format!("ClusterIP throughput ≥ iptables ({services} Services)"),
            lb,
            m(services, Variant::Iptables, &throughput, "gbit_per_s"),
            "Gbit/s lb (tc) vs iptables".to_owned(),
            &|r| r >= 1.0,
        );
    }
    let lb_conn = m(large, Variant::LbTc, &connections, "per_s");
    ratio_target(
        format!("new connections ≥ 3 × iptables ({large} Services)"),
        lb_conn,
        m(large, Variant::Iptables, &connections, "per_s"),
        "conn/s lb (tc) vs iptables".to_owned(),
        &|r| r >= 3.0,
    );
    ratio_target(
        format!("new connections ≥ nftables ({large} Services)"),
        lb_conn,
        m(large, Variant::Nftables, &connections, "per_s"),
        "conn/s lb (tc) vs nftables".to_owned(),
        &|r| r >= 1.0,
    );
    ratio_target(
        format!("new connections within 10 % of lb at {small} Services ({large} Services)"),
        lb_conn,
        m(small, Variant::LbTc, &connections, "per_s"),
        format!("conn/s lb (tc) at {large} vs at {small}"),
        &|r| r >= 0.9,
    );
    for &services in &results.method.service_counts {
        ratio_target(
            format!("request/response p99 within 10 % of direct ({services} Services)"),
            m(services, Variant::LbTc, &rr, "p99_us"),
            m(services, Variant::Direct, &rr, "p99_us"),
            "p99 µs lb (tc) vs direct".to_owned(),
            &|r| r <= 1.10,
        );
    }
    ratio_target(
        format!(
            "NodePort UDP 64-byte packets a node forwards, xdp ≥ 2 × iptables ({large} Services)"
        ),
        m(large, Variant::LbXdp, &udp, "forwarded_pps"),
        m(large, Variant::Iptables, &udp, "forwarded_pps"),
        "packets/s lb (xdp) vs iptables".to_owned(),
        &|r| r >= 2.0,
    );
    let cost = &results.program_cost;
    if let (Some(&few), Some(&many)) = (cost.scales().first(), cost.scales().last()) {
        for program in ["lb_pod_ingress", "lb_external_ingress", "lb_external_xdp"] {
            let row = cost.rows.iter().find(|r| {
                r.program == program && r.path == "established flow" && r.services == many
            });
            ratio_target(
                format!("{program}: established flow ≤ 2 × the empty program ({many} Services)"),
                row.map(|r| spread(&r.ns).0),
                row.and_then(|r| cost.floor(r)),
                "ns a packet (single runs) vs empty program".to_owned(),
                &|r| r <= 2.0,
            );
            ratio_target(
                format!("{program}: new-flow cost flat from {few} to {many} Services (≤ 1.1 ×)"),
                cost.ns(program, "new flow", many).map(|s| s.0),
                cost.ns(program, "new flow", few).map(|s| s.0),
                format!("ns a new flow at {many} vs {few}"),
                &|r| r <= 1.1,
            );
        }
    }
    let absolute = |target: String, value: Option<f64>, unit: &str, limit: f64| TargetResult {
        target,
        measured: value.map_or_else(
            || "not measured".to_owned(),
            |v| format!("{} {unit} (limit {})", fmt(v), fmt(limit)),
        ),
        ratio: value.map(|v| v / limit),
        met: value.map(|v| v <= limit),
    };
    out.push(absolute(
        format!("{large} Services programmed from a manifest ≤ 0.5 s"),
        m(large, Variant::LbTc, CONTROL_PLANE, "program_ms"),
        "ms",
        500.0,
    ));
    out.push(absolute(
        format!("one Service change from a manifest ≤ 50 ms ({large} present)"),
        m(large, Variant::LbTc, CONTROL_PLANE, "change_ms"),
        "ms",
        50.0,
    ));
    out.push(absolute(
        format!("agent peak RSS ≤ 64 MiB ({large} Services)"),
        m(large, Variant::LbTc, CONTROL_PLANE, "peak_rss_mib"),
        "MiB",
        64.0,
    ));
    out
}

/// Three significant-ish figures, without exponent noise.
pub fn fmt(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The markdown report: targets, then one table per workload, then the control plane.
pub fn markdown(results: &Results) -> String {
    let mut out = format!(
        "# lb benchmark, {}{}\n\n\
         Machine: {} ({} CPUs, {:.0} GiB), kernel {}.\n\
         {} round(s); Services programmed per scale: {} ({} of them measured, placed last). \
         Medians over the rounds, with min–max in brackets. See BENCHMARKS.md for the method.\n\n",
        results.started,
        if results.quick {
            " (quick smoke run: one round, figures not meaningful)"
        } else {
            ""
        },
        results.machine.cpu,
        results.machine.cpus,
        results.machine.memory_gib,
        results.machine.kernel,
        results.method.rounds,
        results
            .method
            .service_counts
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        results.method.measured_services,
    );

    out.push_str("## Targets\n\n");
    let mut table = markdown_table(&["Target", "Measured (medians)", "Ratio", "Met"]);
    for t in &results.targets {
        table.add_row(vec![
            t.target.clone(),
            t.measured.clone(),
            t.ratio
                .map_or_else(|| "–".to_owned(), |r| format!("{r:.2}")),
            match t.met {
                Some(true) => "yes".to_owned(),
                Some(false) => "**no**".to_owned(),
                None => "–".to_owned(),
            },
        ]);
    }
    out.push_str(&format!("{table}\n\n"));

    for workload in Workload::ALL {
        let figures: &[(&str, &str)] = match workload.kind {
            Kind::Throughput => &[
                ("gbit_per_s", "Gbit/s"),
                ("cpu_s_per_gbit", "CPU s per Gbit"),
            ],
            Kind::RequestResponse => &[
                ("p50_us", "p50 µs"),
                ("p90_us", "p90 µs"),
                ("p99_us", "p99 µs"),
            ],
            Kind::ConnectionRate => &[
                ("per_s", "conn/s"),
                ("connect_p50_us", "connect p50 µs"),
                ("connect_p99_us", "connect p99 µs"),
                ("cpu_s_per_100k_conn", "CPU s per 100k"),
            ],
            Kind::SmallPackets => &[
                ("forwarded_pps", "node-1 forwarded/s"),
                ("forward_drop_pct", "dropped %"),
                ("delivered_pps", "delivered to pod/s"),
                ("drop_pct", "dropped %"),
                ("sent_pps", "generator sent/s"),
            ],
        };
        out.push_str(&format!("## {}\n\n", workload.label()));
        let mut header = vec!["Variant".to_owned()];
        for services in &results.method.service_counts {
            for (_, label) in figures {
                header.push(format!("{label} @ {services}"));
            }
        }
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut table = markdown_table(&header);
        for variant in Variant::ALL
            .into_iter()
            .filter(|v| v.applies_to(workload.path))
        {
            let mut row = vec![variant.label().to_owned()];
            for &services in &results.method.service_counts {
                for (figure, _) in figures {
                    row.push(cell(results.find(
                        services,
                        variant,
                        &workload.id(),
                        figure,
                    )));
                }
            }
            table.add_row(row);
        }
        out.push_str(&format!("{table}\n\n"));
    }

    out.push_str(&program_cost_section(&results.program_cost));
    out.push_str(&program_stats_section(results));

    let large = results.largest();
    out.push_str(&format!("## Control plane ({large} Services)\n\n"));
    let mut table = markdown_table(&[
        "Variant",
        "program all (ms)",
        "one change (ms)",
        "peak RSS (MiB)",
        "own memory, RssAnon (MiB)",
    ]);
    for variant in super::control_plane::VARIANTS {
        table.add_row(vec![
            variant.label().to_owned(),
            cell(results.find(large, variant, CONTROL_PLANE, "program_ms")),
            cell(results.find(large, variant, CONTROL_PLANE, "change_ms")),
            cell(results.find(large, variant, CONTROL_PLANE, "peak_rss_mib")),
            cell(results.find(large, variant, CONTROL_PLANE, "anon_rss_mib")),
        ]);
    }
    out.push_str(&format!("{table}\n\n"));
    if !results.method.notes.is_empty() {
        out.push_str("## Notes\n\n");
        for note in &results.method.notes {
            out.push_str(&format!("- {note}\n"));
        }
    }
    out
}

/// Each program path's ns a packet at each scale, with its ratio to the empty program timed the
/// same way.
fn program_cost_section(cost: &ProgramCost) -> String {
    if cost.rows.is_empty() {
        return String::new();
    }
    let scales = cost.scales();
    let mut out = format!(
        "## Per-packet program cost (BPF_PROG_TEST_RUN, full conntrack)\n\n\
         Mean kernel time of a run, median of {} round(s) (min–max). lb's paths and the \
         \"single runs\" rows are {} single runs of a fresh packet a round; \"empty\" is one \
         packet repeated {} times. × empty: against the empty program of the same kind, timed \
         the same way.\n\n",
        cost.rounds, cost.single_runs, cost.repeat
    );
    let mut header = vec![
        "Program".to_owned(),
        "Path".to_owned(),
        "Verdict".to_owned(),
    ];
    for services in &scales {
        header.push(format!("ns @ {services}"));
        header.push(format!("× empty @ {services}"));
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = markdown_table(&header);
    let mut seen = Vec::new();
    for row in &cost.rows {
        if seen.contains(&(&row.program, &row.path)) {
            continue;
        }
        seen.push((&row.program, &row.path));
        let xdp = row.program.contains("xdp") || row.program == super::program_cost::EMPTY_XDP;
        let mut cells = vec![
            row.program.clone(),
            row.path.clone(),
            verdict_name(row.verdict, xdp).to_owned(),
        ];
        for &services in &scales {
            let at = cost
                .rows
                .iter()
                .find(|r| r.program == row.program && r.path == row.path && r.services == services);
            match at {
                Some(r) => {
                    let (median, low, high) = spread(&r.ns);
                    cells.push(format!("{} ({}–{})", fmt(median), fmt(low), fmt(high)));
                    cells.push(cost.floor(r).map_or("–".to_owned(), |f| fmt(median / f)));
                }
                None => cells.extend(["–".to_owned(), "–".to_owned()]),
            }
        }
        table.add_row(cells);
    }
    out.push_str(&format!("{table}\n\n"));
    out
}

/// The kernel's run time per packet of each program during one extra run of the workloads.
fn program_stats_section(results: &Results) -> String {
    let stats: Vec<&Sample> = results
        .samples
        .iter()
        .filter(|s| s.workload.starts_with("bpf-stats/"))
        .collect();
    if stats.is_empty() {
        return String::new();
    }
    let mut programs: Vec<&str> = stats
        .iter()
        .flat_map(|s| s.figures.keys())
        .filter_map(|k| k.strip_suffix(".ns"))
        .collect();
    programs.sort_unstable();
    programs.dedup();
    let mut out = "## Program run time under the real workloads (BPF run-time statistics)\n\n\
         One extra run of each workload on lb's beds after the rounds, with the kernel's \
         per-program statistics on (`BPF_ENABLE_STATS`, as `kernel.bpf_stats_enabled=1`; off \
         during the measured rounds, since they cost two clock reads a run). ns a run of each \
         program, over both nodes, and in brackets its runs a second. Names as the kernel \
         keeps them (15 characters).\n\n"
        .to_owned();
    let mut header = vec!["Services", "Variant", "Workload"];
    header.extend(programs.iter().copied());
    let mut table = markdown_table(&header);
    for sample in stats {
        let mut row = vec![
            sample.services.to_string(),
            sample.variant.label().to_owned(),
            sample.workload.trim_start_matches("bpf-stats/").to_owned(),
        ];
        for program in &programs {
            row.push(
                match (
                    sample.figures.get(&format!("{program}.ns")),
                    sample.figures.get(&format!("{program}.runs_per_s")),
                ) {
                    (Some(ns), Some(runs)) => format!("{} ({}/s)", fmt(*ns), fmt(*runs)),
                    _ => "–".to_owned(),
                },
            );
        }
        table.add_row(row);
    }
    out.push_str(&format!("{table}\n\n"));
    out
}

fn verdict_name(verdict: u32, xdp: bool) -> &'static str {
    match (xdp, verdict) {
        (false, 0) => "TC_ACT_OK",
        (false, 2) => "TC_ACT_SHOT",
        (false, 7) => "TC_ACT_REDIRECT",
        (true, 1) => "XDP_DROP",
        (true, 2) => "XDP_PASS",
        (true, 3) => "XDP_TX",
        (true, 4) => "XDP_REDIRECT",
        _ => "other",
    }
}

fn markdown_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(ASCII_MARKDOWN)
        .set_header(header.to_vec());
    table
}

fn cell(summary: Option<&Summary>) -> String {
    match summary {
        None => "–".to_owned(),
        Some(s) if s.n == 1 => fmt(s.median),
        Some(s) => format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max)),
    }
}

/// Results of `rounds` rounds at 4 and 10,004 Services, summarized (for tests).
#[cfg(test)]
pub fn test_results(rounds: usize, samples: Vec<Sample>, control_plane: Vec<Sample>) -> Results {
    use std::time::Duration;
    let d = Duration::from_secs(1);
    let mut results = Results {
        started: "now".to_owned(),
        quick: false,
        machine: Machine {
            kernel: "k".to_owned(),
            cpu: "c".to_owned(),
            cpus: 2,
            memory_gib: 24.0,
            tools: BTreeMap::new(),
        },
        method: Method {
            rounds,
            service_counts: vec![4, 10_004],
            measured_services: 4,
            durations: Durations {
                throughput: d,
                request_response: d,
                connection_rate: d,
                small_packets: d,
            },
            notes: Vec::new(),
        },
        samples,
        control_plane,
        program_cost: ProgramCost::default(),
        summary: Vec::new(),
        targets: Vec::new(),
    };
    results.summarize();
    results
}
#[cfg(test)]
mod tests {
    use super::*;

    fn results(samples: Vec<Sample>, control_plane: Vec<Sample>) -> Results {
        test_results(3, samples, control_plane)
    }

    fn sample(
        services: usize,
        variant: Variant,
        workload: &str,
        figure: &str,
        value: f64,
    ) -> Sample {
        Sample {
            services,
            round: 0,
            variant,
            workload: workload.to_owned(),
            figures: Figures::from([(figure.to_owned(), value)]),
        }
    }

    #[test]
    fn spread_takes_the_middle() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn targets_are_ratios_of_medians_and_say_when_missed() {
        let conn = "connection-rate/clusterip";
        let mut samples = Vec::new();
        for v in [10.0, 12.0, 11.0] {
            samples.push(sample(10_004, Variant::LbTc, conn, "per_s", v * 1000.0));
        }
        for v in [5.0, 4.0, 6.0] {
            samples.push(sample(10_004, Variant::Iptables, conn, "per_s", v * 1000.0));
        }
        let results = results(
            samples,
            vec![sample(
                10_004,
                Variant::LbTc,
                CONTROL_PLANE,
                "program_ms",
                1500.0,
            )],
        );
        let find = |prefix: &str| {
            results
                .targets
                .iter()
                .find(|t| t.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix}"))
        };
        let vs_iptables = find("new connections ≥ 3 × iptables");
        // Medians 11k vs 5k: 2.2, short of 3.
        assert!((vs_iptables.ratio.unwrap() - 2.2).abs() < 1e-9);
        assert_eq!(vs_iptables.met, Some(false));
        assert_eq!(find("new connections ≥ nftables").met, None);
        let programmed = find("10004 Services programmed");
        assert_eq!(programmed.met, Some(false));
        assert!(programmed.measured.contains("1500 ms"));
        let report = markdown(&results);
        assert!(report.contains("| **no**"));
        assert!(report.contains("11000 (10000–12000)"));
    }
}
