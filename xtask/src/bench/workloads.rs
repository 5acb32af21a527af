//! One measurement of one workload on one bed. Each returns named figures; the report takes
//! medians and spreads across rounds.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_testbed::{cleanup, loadgen, netns::Netns, xdp_generator};
use serde::{Deserialize, Serialize};

use super::beds::{BACKEND_POD, Bed, ENTRY_NODE, Server, TrafficPath};

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// iperf3, one TCP stream, Gbit/s received.
    Throughput,
    /// sockperf ping-pong on one established TCP connection, round-trip percentiles.
    RequestResponse,
    /// New TCP connections per second and connect() latency.
    ConnectionRate,
    /// 64-byte UDP frames from the XDP generator, delivered per second.
    SmallPackets,
}

/// A workload: what, along which path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Workload {
    pub kind: Kind,
    pub path: TrafficPath,
}

impl Workload {
    /// Every workload, in the order a round runs them.
    pub const ALL: [Workload; 10] = [
        Workload::new(Kind::Throughput, TrafficPath::ClusterIp),
        Workload::new(Kind::Throughput, TrafficPath::NodePort),
        Workload::new(Kind::RequestResponse, TrafficPath::ClusterIp),
        Workload::new(Kind::RequestResponse, TrafficPath::NodePort),
        Workload::new(Kind::ConnectionRate, TrafficPath::ClusterIp),
        Workload::new(Kind::SmallPackets, TrafficPath::NodePort),
        Workload::new(Kind::SmallPackets, TrafficPath::ClusterIp),
        Workload::new(Kind::Throughput, TrafficPath::ClusterIp6),
        Workload::new(Kind::Throughput, TrafficPath::NodePort6),
        Workload::new(Kind::ConnectionRate, TrafficPath::ClusterIp6),
    ];

    const fn new(kind: Kind, path: TrafficPath) -> Self {
        Self { kind, path }
    }

    pub fn id(self) -> String {
        let kind = match self.kind {
            Kind::Throughput => "throughput",
            Kind::RequestResponse => "request-response",
            Kind::ConnectionRate => "connection-rate",
            Kind::SmallPackets => "udp-64b",
        };
        let path = match self.path {
            TrafficPath::ClusterIp => "clusterip",
            TrafficPath::NodePort => "nodeport",
            TrafficPath::ClusterIp6 => "clusterip-ipv6",
            TrafficPath::NodePort6 => "nodeport-ipv6",
        };
        format!("{kind}/{path}")
    }

    pub fn label(self) -> String {
        let kind = match self.kind {
            Kind::Throughput => "TCP throughput (iperf3)",
            Kind::RequestResponse => "request/response RTT (sockperf)",
            Kind::ConnectionRate => "new connections",
            Kind::SmallPackets => "UDP 64-byte packets (XDP generator)",
        };
        format!("{kind}, {}", self.path.label())
    }
}

/// Named figures of one measurement, e.g. `gbit_per_s`, `p99_us`.
pub type Figures = BTreeMap<String, f64>;

/// How long each measurement runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Durations {
    pub throughput: Duration,
    pub request_response: Duration,
    pub connection_rate: Duration,
    pub small_packets: Duration,
}

/// Runs `workload` once on `bed`. Throughput and new connections also record the machine's
/// kernel CPU time (system + softirq, from /proc/stat) per unit of work: everything on the
/// path, the tools' own sockets included, which are the same for every variant.
pub fn measure(bed: &Bed, workload: Workload, durations: &Durations) -> anyhow::Result<Figures> {
    let client = bed.client(workload.path);
    let cpu = CpuTime::now()?;
    let figures = match workload.kind {
        Kind::Throughput => iperf3(
            client,
            bed.target(workload.path, Server::Iperf),
            durations.throughput,
        )
        .and_then(|mut figures| {
            let gigabits = figures["gbit_per_s"] * durations.throughput.as_secs_f64();
            figures.insert("cpu_s_per_gbit".to_owned(), cpu.since()? / gigabits);
            Ok(figures)
        }),
        Kind::RequestResponse => sockperf(
            client,
            bed.target(workload.path, Server::Sockperf),
            durations.request_response,
        ),
        Kind::ConnectionRate => connection_rate(
            client,
            bed.target(workload.path, Server::Accept),
            durations.connection_rate,
        )
        .and_then(|mut figures| {
            let connections = figures["per_s"] * durations.connection_rate.as_secs_f64();
            figures.insert(
                "cpu_s_per_100k_conn".to_owned(),
                cpu.since()? / connections * 1e5,
            );
            Ok(figures)
        }),
        Kind::SmallPackets => small_packets(bed, workload.path, durations.small_packets),
    };
    figures.with_context(|| format!("{} on {}", workload.label(), bed.variant.label()))
}

/// The machine's kernel CPU time so far: system + softirq, all CPUs (the first line of
/// /proc/stat, in clock ticks).
struct CpuTime(f64);

impl CpuTime {
    fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let fields: Vec<f64> = stat
            .lines()
            .next()
            .context("an empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        // user nice system idle iowait irq softirq ...
        anyhow::ensure!(fields.len() >= 7, "short /proc/stat line");
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(Self((fields[2] + fields[6]) / ticks))
    }

    /// CPU seconds since `self`.
    fn since(&self) -> anyhow::Result<f64> {
        Ok(Self::now()?.0 - self.0)
    }
}

/// Runs a measuring tool inside `ns` and returns its stdout; fails with its stderr.
fn tool_output(ns: &Netns, cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ns.spawn(cmd)?;
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    cleanup::forget_child(pid);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        stdout.chars().take(400).collect::<String>()
    );
    Ok(stdout)
}

fn iperf3(
    client: &Netns,
    target: std::net::SocketAddr,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let out = tool_output(
        client,
        Command::new("iperf3").args([
            "--client",
            &target.ip().to_string(),
            "--port",
            &target.port().to_string(),
            "--time",
            &duration.as_secs().max(1).to_string(),
            "--connect-timeout",
            "3000",
            "--json",
        ]),
        duration + Duration::from_secs(15),
    )?;
    let report: serde_json::Value = serde_json::from_str(&out).context("iperf3 --json output")?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's report: {report}"))?;
    let retransmits = report["end"]["sum_sent"]["retransmits"]
        .as_f64()
        .unwrap_or(0.0);
    Ok(Figures::from([
        ("gbit_per_s".to_owned(), bits / 1e9),
        ("retransmits".to_owned(), retransmits),
    ]))
}

fn sockperf(
    client: &Netns,
    target: std::net::SocketAddr,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let out = tool_output(
        client,
        Command::new("sockperf").args([
            "ping-pong",
            "--tcp",
            "--full-rtt",
            "--msg-size",
            "64",
            "--ip",
            &target.ip().to_string(),
            "--port",
            &target.port().to_string(),
            "--time",
            &duration.as_secs().max(1).to_string(),
        ]),
        duration + Duration::from_secs(15),
    )?;
    parse_sockperf(&out)
}

/// Picks the round-trip percentiles (microseconds) out of sockperf's summary.
pub fn parse_sockperf(out: &str) -> anyhow::Result<Figures> {
    let mut figures = Figures::new();
    for line in out.lines() {
        let Some((_, rest)) = line.split_once("---> percentile ") else {
            continue;
        };
        let Some((percentile, value)) = rest.split_once('=') else {
            continue;
        };
        let name = match percentile.trim() {
            "50.000" => "p50_us",
            "90.000" => "p90_us",
            "99.000" => "p99_us",
            _ => continue,
        };
        let value: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("sockperf percentile in {line:?}"))?;
        figures.insert(name.to_owned(), value);
    }
    anyhow::ensure!(
        figures.len() == 3,
        "sockperf printed no p50/p90/p99 summary:\n{out}"
    );
    Ok(figures)
}

/// Two client threads, each closing every connection with RST (see loadgen).
fn connection_rate(
    client: &Netns,
    target: std::net::SocketAddr,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let run = loadgen::connection_rate(client, target, 2, duration)?;
    anyhow::ensure!(run.connections > 0, "no connection to {target} succeeded");
    let mut latencies = run.connect_latencies.clone();
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() - 1) as f64 * q).round() as usize;
        latencies[index].as_secs_f64() * 1e6
    };
    Ok(Figures::from([
        ("per_s".to_owned(), run.per_second()),
        ("connect_p50_us".to_owned(), at(0.50)),
        ("connect_p99_us".to_owned(), at(0.99)),
        ("failures".to_owned(), run.failures as f64),
    ]))
}

/// Random source ports of the generator's frames: that many concurrent flows (clients).
const GENERATOR_FLOWS: u16 = 256;
/// The generator's core; the path under test gets the other one.
const GENERATOR_CPU: usize = 0;

/// 64-byte UDP frames (60 before the FCS: Ethernet, IPv4, UDP and 18 bytes of payload) from the
/// XDP generator in the client's namespace, [`GENERATOR_FLOWS`] flows, to the UDP sink's
/// Service, twice:
/// - **end to end**: delivered is what arrived on the backend pod's interface;
/// - **the entry node alone**: the switch port facing node-1 drops the frames node-1 forwards
///   ([`xdp_generator::UdpSink`]) and counts them, so nothing after node-1 shares the path's
///   core. This is the load balancer's own capacity, which the end-to-end figure hides behind
///   the testbed's bridge, node-2 and the pod.
///
/// The generator feeds node-1's receiving interface directly ([`Bed::generator_hop`]).
///
/// Sent is what the generator offered, so each drop rate is the share the path could not take.
/// The first hop (the client's veth peer) is ready for generated frames only while this runs
/// (see [`xdp_generator::ReceivingPeer`]): XDP on a veth costs the other workloads their GRO.
fn small_packets(bed: &Bed, path: TrafficPath, duration: Duration) -> anyhow::Result<Figures> {
    let std::net::SocketAddr::V4(target) = bed.target(path, Server::Udp) else {
        anyhow::bail!("the UDP flood is measured over IPv4 only");
    };
    let hop = bed.generator_hop(path);
    let (sender_ns, sender_if) = (hop.sender.0, hop.sender.1.as_str());
    let (receiver_ns, receiver_if) = (hop.receiver.0, hop.receiver.1.as_str());
    let source = match path {
        TrafficPath::ClusterIp => bed.cluster.pod(super::beds::CLIENT_POD).ip,
        _ => bed.cluster.outside.ip,
    };
    let frame = xdp_generator::udp_frame(
        xdp_generator::mac_address(hop.client.0, hop.client.1)?,
        xdp_generator::mac_address(receiver_ns, receiver_if)?,
        std::net::SocketAddrV4::new(source, 20_000),
        target,
        18,
    );
    let pin =
        |what: &str| std::path::PathBuf::from(format!("/sys/fs/bpf/{}-{what}", bed.cluster.run_id));
    let _receiver =
        xdp_generator::ReceivingPeer::prepare(receiver_ns, receiver_if, &pin("generator-peer"))?;
    let generate = || {
        xdp_generator::run(
            sender_ns,
            sender_if,
            frame.clone(),
            GENERATOR_FLOWS,
            GENERATOR_CPU,
            duration,
        )
    };
    let drop_pct = |arrived: u64, sent: u64| 100.0 * (1.0 - arrived as f64 / sent as f64).max(0.0);

    let backend = &bed.cluster.pod(BACKEND_POD).ns;
    let (socket_before, interface_before) = (bed.udp_sink.received(), rx_packets(backend, "eth0")?);
    let sent = generate()?;
    // Let the last packets land and the receiver drain its socket buffer.
    std::thread::sleep(Duration::from_millis(200));
    let delivered = rx_packets(backend, "eth0")? - interface_before;
    let read = bed.udp_sink.received() - socket_before;
    anyhow::ensure!(read > 0, "no datagram reached {target}'s backend");

    let lan = bed.cluster.lan();
    let port = super::beds::switch_port(ENTRY_NODE);
    let forwarded_sent;
    let forwarded = {
        // Node-1 forwards them translated: to the backend's port, which is the Service's.
        let _sink = xdp_generator::UdpSink::attach(lan, &port, Server::Udp.port(), &pin("sink"))?;
        let before = rx_packets(lan, &port)?;
        forwarded_sent = generate()?;
        std::thread::sleep(Duration::from_millis(200));
        rx_packets(lan, &port)? - before
    };
    anyhow::ensure!(forwarded > 0, "node-1 forwarded nothing towards {target}");

    let seconds = sent.elapsed.as_secs_f64();
    let forward_seconds = forwarded_sent.elapsed.as_secs_f64();
    Ok(Figures::from([
        ("delivered_pps".to_owned(), delivered as f64 / seconds),
        ("socket_pps".to_owned(), read as f64 / seconds),
        ("sent_pps".to_owned(), sent.per_second()),
        ("drop_pct".to_owned(), drop_pct(delivered, sent.frames)),
        (
            "forwarded_pps".to_owned(),
            forwarded as f64 / forward_seconds,
        ),
        ("forward_sent_pps".to_owned(), forwarded_sent.per_second()),
        (
            "forward_drop_pct".to_owned(),
            drop_pct(forwarded, forwarded_sent.frames),
        ),
    ]))
}

/// Packets received on `ifname` in `ns` (its kernel counter, via `ip -json -statistics`).
fn rx_packets(ns: &Netns, ifname: &str) -> anyhow::Result<u64> {
    let out = tool_output(
        ns,
        Command::new("ip").args(["-json", "-statistics", "link", "show", "dev", ifname]),
        Duration::from_secs(5),
    )?;
    let links: serde_json::Value = serde_json::from_str(&out).context("ip -json output")?;
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet count in {out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_summary_gives_three_percentiles() {
        let out = "sockperf: ---> <MAX> observation =  778.733\n\
                   sockperf: ---> percentile 99.999 =  778.733\n\
                   sockperf: ---> percentile 99.000 =  221.276\n\
                   sockperf: ---> percentile 90.000 =   81.967\n\
                   sockperf: ---> percentile 75.000 =   65.366\n\
                   sockperf: ---> percentile 50.000 =   56.149\n";
        let figures = parse_sockperf(out).unwrap();
        assert_eq!(figures["p50_us"], 56.149);
        assert_eq!(figures["p90_us"], 81.967);
        assert_eq!(figures["p99_us"], 221.276);
        assert!(parse_sockperf("sockperf: Test ended\n").is_err());
    }

    #[test]
    fn workload_ids_are_distinct() {
        let ids: std::collections::BTreeSet<String> =
            Workload::ALL.iter().map(|w| w.id()).collect();
        assert_eq!(ids.len(), Workload::ALL.len());
    }
}
