//! What each program costs per packet on each of its paths, with a full conntrack, at a small
//! and a large Service count, beside an empty program of the same kind: the floor that
//! BPF_PROG_TEST_RUN itself costs.
//!
//!     cargo bench -p lb-userspace --bench program_cost                   (as root)
//!     cargo bench -p lb-userspace --bench program_cost -- 5 1000000       (rounds, repeat)
//!     LB_PROGRAM_COST_JSON=out.json cargo bench ...                      (samples as JSON too)
//!
//! The Services come from a manifest through the agent's own translation and sync, as
//! `lb agent --manifests` programs them: the measured ones, then (at the large scale) 10,000
//! synthetic ones from the benchmark's cluster generator. Each round the conntrack is filled to
//! its capacity (the agent's default) with idle flows, so lookups hit a full table and every new
//! flow evicts one. lb's paths are timed as single runs of a fresh packet (see [`Traffic`] for
//! why), the kernel reporting each run's time; the empty programs both that way and as
//! `repeat` runs of one packet. `cargo xtask bench` runs this and puts the figures into its
//! report.

mod per_packet;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{net::Ipv4Addr, os::fd::OwnedFd};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use lb_common::{
    addr_be,
    conntrack::{CT_KIND_FORWARD, CtEntry, CtTimeouts, FlowKey},
    maps::{EXTERNAL_INGRESS_PROGRAM, EXTERNAL_XDP_PROGRAM, POD_INGRESS_PROGRAM},
    service::NodeConfig,
};
use lb_testbed::{
    bpf_syscall::{self, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP, EXIT, mov64_imm},
    kube_proxy_layouts::{Protocol, SyntheticService, manifests_yaml, synthetic_cluster},
};
use lb_userspace::sync::Settings;
use per_packet::{median_min_max, rounds_and_repeat};
use serde::Serialize;
use support::{
    LoadedPath,
    packet_netns::{self, PacketNetns},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const OUTSIDE: Ipv4Addr = Ipv4Addr::from_octets(packet_netns::OUTSIDE);
const NODE: Ipv4Addr = Ipv4Addr::from_octets(packet_netns::NODE);
/// A pod that is no Service's.
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 99);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 10);
const WEB_NODE_PORT: u16 = 30080;
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 20);
const EMPTY_NODE_PORT: u16 = 30081;
/// `remote`: a NodePort whose backend is a pod on the other node, so its flows are SNATed and
/// their replies come back through the external programs.
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 30);
const REMOTE_NODE_PORT: u16 = 30082;
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
/// `web`'s backend: a local pod the namespace has a neighbour entry for, so the FIB lookups of
/// redirects succeed.
const BACKEND: Ipv4Addr = Ipv4Addr::from_octets(packet_netns::POD_A);
/// The large scale's synthetic Services.
const SYNTHETIC: usize = 10_000;
/// Single runs timed a path and a round.
const SINGLE_RUNS: u32 = 10_000;

/// The measured Services: `web` with a local backend, `empty` with none (rejects), `remote`
/// with a backend on the other node.
fn measured() -> Vec<SyntheticService> {
    let service = |name: &str, ip, node_port, endpoints: &[Ipv4Addr]| SyntheticService {
        namespace: "cost".to_owned(),
        name: name.to_owned(),
        cluster_ip: ip,
        protocol: Protocol::Tcp,
        port: 80,
        node_port: Some(node_port),
        endpoints: endpoints.iter().map(|&pod| (pod, 8080)).collect(),
    };
    vec![
        service("web", WEB_VIP, WEB_NODE_PORT, &[BACKEND]),
        service("empty", EMPTY_VIP, EMPTY_NODE_PORT, &[]),
        service("remote", REMOTE_VIP, REMOTE_NODE_PORT, &[REMOTE_BACKEND]),
    ]
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, &[]).expect("into a Vec");
    out
}

/// The program a path runs through: one of lb's, or an empty one of a kind.
#[derive(Clone, Copy, PartialEq)]
enum Program {
    Lb(&'static str),
    EmptyTc,
    EmptyXdp,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Lb(name) => name,
            Program::EmptyTc => "empty tc program",
            Program::EmptyXdp => "empty XDP program",
        }
    }
}

/// How a path is timed. BPF_PROG_TEST_RUN runs a repeated packet on the same buffer, so after
/// the first run lb's programs would see their own output (a translated packet, a reset):
/// lb's paths are timed as single runs of a fresh packet each (the argument: a port to start a
/// new flow with), and compared with the empty program timed the same way. The empty program
/// repeated shows the floor without the per-run timing; single runs also start with cold
/// caches, as a packet of a flow that has been quiet does.
#[derive(Clone, Copy)]
enum Traffic {
    Repeated(fn(u16) -> Vec<u8>),
    Single(fn(u16) -> Vec<u8>),
    /// Single runs of a reply to the SNATed flow of `remote` (the argument: its SNAT port).
    SnatReply(fn(u16) -> Vec<u8>),
}

struct Path {
    program: Program,
    name: &'static str,
    traffic: Traffic,
}

/// Every timed path. Established paths reuse the flow their `setup` packet (port 40000)
/// started.
fn paths() -> Vec<Path> {
    use Program::*;
    use Traffic::*;
    let path = |program, name, traffic| Path {
        program,
        name,
        traffic,
    };
    vec![
        path(
            EmptyTc,
            "empty",
            Repeated(|_| tcp(CLIENT, 40000, WEB_VIP, 80, false)),
        ),
        path(
            EmptyTc,
            "empty, single runs",
            Single(|p| tcp(CLIENT, p, WEB_VIP, 80, true)),
        ),
        path(
            EmptyXdp,
            "empty",
            Repeated(|_| tcp(OUTSIDE, 40000, NODE, WEB_NODE_PORT, false)),
        ),
        path(
            EmptyXdp,
            "empty, single runs",
            Single(|p| tcp(OUTSIDE, p, NODE, WEB_NODE_PORT, true)),
        ),
        path(
            Lb(POD_INGRESS_PROGRAM),
            "established flow",
            Single(|_| tcp(CLIENT, 40000, WEB_VIP, 80, false)),
        ),
        path(
            Lb(POD_INGRESS_PROGRAM),
            "new flow",
            Single(|p| tcp(CLIENT, p, WEB_VIP, 80, true)),
        ),
        path(
            Lb(POD_INGRESS_PROGRAM),
            "reverse NAT (reply)",
            Single(|_| tcp(BACKEND, 8080, CLIENT, 40000, false)),
        ),
        path(
            Lb(POD_INGRESS_PROGRAM),
            "no Service",
            Single(|_| tcp(CLIENT, 40001, OTHER_POD, 8080, false)),
        ),
        path(
            Lb(POD_INGRESS_PROGRAM),
            "reject (no endpoints)",
            Single(|_| tcp(CLIENT, 40002, EMPTY_VIP, 80, true)),
        ),
        path(
            Lb(EXTERNAL_INGRESS_PROGRAM),
            "established flow",
            Single(|_| tcp(OUTSIDE, 40000, NODE, WEB_NODE_PORT, false)),
        ),
        path(
            Lb(EXTERNAL_INGRESS_PROGRAM),
            "reverse NAT (SNATed reply)",
            SnatReply(|port| tcp(REMOTE_BACKEND, 8080, NODE, port, false)),
        ),
        path(
            Lb(EXTERNAL_INGRESS_PROGRAM),
            "new flow",
            Single(|p| tcp(OUTSIDE, p, NODE, WEB_NODE_PORT, true)),
        ),
        path(
            Lb(EXTERNAL_INGRESS_PROGRAM),
            "no Service",
            Single(|_| tcp(OUTSIDE, 40001, NODE, 22, false)),
        ),
        path(
            Lb(EXTERNAL_INGRESS_PROGRAM),
            "reject (no endpoints)",
            Single(|_| tcp(OUTSIDE, 40002, NODE, EMPTY_NODE_PORT, true)),
        ),
        path(
            Lb(EXTERNAL_XDP_PROGRAM),
            "established flow",
            Single(|_| tcp(OUTSIDE, 40000, NODE, WEB_NODE_PORT, false)),
        ),
        path(
            Lb(EXTERNAL_XDP_PROGRAM),
            "reverse NAT (SNATed reply)",
            SnatReply(|port| tcp(REMOTE_BACKEND, 8080, NODE, port, false)),
        ),
        path(
            Lb(EXTERNAL_XDP_PROGRAM),
            "new flow",
            Single(|p| tcp(OUTSIDE, p, NODE, WEB_NODE_PORT, true)),
        ),
        path(
            Lb(EXTERNAL_XDP_PROGRAM),
            "no Service",
            Single(|_| tcp(OUTSIDE, 40001, NODE, 22, false)),
        ),
        path(
            Lb(EXTERNAL_XDP_PROGRAM),
            "reject (no endpoints)",
            Single(|_| tcp(OUTSIDE, 40002, NODE, EMPTY_NODE_PORT, true)),
        ),
    ]
}

/// One scale, loaded and filled.
struct Scale {
    services: usize,
    /// The ingress interfaces of the pod-facing and the external programs.
    pod_ifindex: u32,
    ext_ifindex: u32,
    /// The SNAT port of `remote`'s established flow (set by [`Scale::refill`]).
    snat_port: u16,
    /// The SNAT port of `web`'s established NodePort flow.
    web_snat_port: u16,
    path: LoadedPath,
    empty_tc: OwnedFd,
    empty_xdp: OwnedFd,
}

impl Scale {
    fn load(synthetic: usize, net: &PacketNetns) -> Self {
        let services = synthetic_cluster(synthetic, measured());
        let mut path = LoadedPath::load(&format!("program-cost-{synthetic}"));
        // As the agent on a node: rejects for Services without endpoints, the node's address
        // and its default port range for SNAT.
        path.programmer.set_settings(Settings {
            reject_no_endpoints: true,
            node: NodeConfig {
                snat_addr_be: addr_be(NODE.octets()),
                snat_port_first: 32768,
                snat_port_last: 60999,
                timeouts: CtTimeouts::DEFAULT,
                _reserved: [0; 2],
            },
            ..Settings::default()
        });
        let node = lb_userspace::translate::NodeContext {
            name: Some("node-1".to_owned()),
            addresses: vec![NODE.into()],
            ..Default::default()
        };
        path.provision_as(&manifests_yaml(&services), &node);
        let empty = |kind, verdict| {
            bpf_syscall::load_program(kind, &[mov64_imm(0, verdict), EXIT]).expect("load")
        };
        Self {
            services: services.len(),
            pod_ifindex: net.ifindex("pod0"),
            ext_ifindex: net.ifindex("ext0"),
            snat_port: 0,
            web_snat_port: 0,
            path,
            empty_tc: empty(BPF_PROG_TYPE_SCHED_CLS, 0),
            empty_xdp: empty(BPF_PROG_TYPE_XDP, 2),
        }
    }

    /// Fills the conntrack again (the LRU evicts what earlier rounds left, new flows and their
    /// SNAT ports included) and starts the flows the established paths reuse, through the
    /// programs themselves.
    fn refill(&mut self) {
        let filled = fill_conntrack(&mut self.path);
        eprintln!(
            "{} Services: conntrack filled with {filled} idle entries",
            self.services
        );
        // The LRU may have kept one entry of a measured flow and evicted its partner: start
        // each afresh, both directions.
        let key = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16| {
            FlowKey::new(
                addr_be(src.octets()),
                addr_be(dst.octets()),
                sport.to_be(),
                dport.to_be(),
                lb_common::IPPROTO_TCP,
            )
        };
        let measured = [
            key(CLIENT, 40000, WEB_VIP, 80),
            key(BACKEND, 8080, CLIENT, 40000),
            key(OUTSIDE, 40000, NODE, WEB_NODE_PORT),
            key(BACKEND, 8080, NODE, self.web_snat_port),
            key(OUTSIDE, 40003, NODE, REMOTE_NODE_PORT),
            key(REMOTE_BACKEND, 8080, NODE, self.snat_port),
        ];
        for flow in &measured {
            let _ = self.path.dataplane.maps.conntrack.remove(flow);
        }
        let (_, out, _) = self.run(
            Program::Lb(POD_INGRESS_PROGRAM),
            &tcp(CLIENT, 40000, WEB_VIP, 80, true),
            1,
        );
        let chosen = Ipv4Addr::from(<[u8; 4]>::try_from(&out[30..34]).expect("4 bytes"));
        assert_eq!(chosen, BACKEND, "the client flow is translated");
        let (_, out, _) = self.run(
            Program::Lb(EXTERNAL_INGRESS_PROGRAM),
            &tcp(OUTSIDE, 40000, NODE, WEB_NODE_PORT, true),
            1,
        );
        self.web_snat_port = u16::from_be_bytes([out[34], out[35]]);
        let (_, out, _) = self.run(
            Program::Lb(EXTERNAL_INGRESS_PROGRAM),
            &tcp(OUTSIDE, 40003, NODE, REMOTE_NODE_PORT, true),
            1,
        );
        let to = Ipv4Addr::from(<[u8; 4]>::try_from(&out[30..34]).expect("4 bytes"));
        let from = Ipv4Addr::from(<[u8; 4]>::try_from(&out[26..30]).expect("4 bytes"));
        assert_eq!(
            (from, to),
            (NODE, REMOTE_BACKEND),
            "the remote flow is SNATed"
        );
        self.snat_port = u16::from_be_bytes([out[34], out[35]]);
        let reply = key(BACKEND, 8080, CLIENT, 40000);
        assert!(
            self.path.dataplane.maps.conntrack.get(&reply, 0).is_ok(),
            "the client flow's reply entry is in the conntrack"
        );
    }

    /// (verdict, output packet, mean ns a run).
    fn run(&mut self, program: Program, packet: &[u8], repeat: u32) -> (u32, Vec<u8>, f64) {
        let empty = match program {
            Program::EmptyTc => Some(&self.empty_tc),
            Program::EmptyXdp => Some(&self.empty_xdp),
            Program::Lb(_) => None,
        };
        if let Some(fd) = empty {
            let (verdict, ns) = bpf_syscall::test_run(fd, packet, repeat).expect("test run");
            return (verdict, packet.to_vec(), f64::from(ns));
        }
        let Program::Lb(name) = program else {
            unreachable!()
        };
        let mut out = vec![0u8; packet.len() + 128];
        let ifindex = if name == POD_INGRESS_PROGRAM {
            self.pod_ifindex
        } else {
            self.ext_ifindex
        };
        // `struct __sk_buff` up to ifindex (at 40), or `struct xdp_md` (data_end at 4,
        // ingress_ifindex at 12).
        let mut context = vec![0u8; 44];
        if name == EXTERNAL_XDP_PROGRAM {
            context.truncate(24);
            context[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
            context[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        } else {
            context[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        }
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&context),
            repeat,
            ..Default::default()
        };
        let result = if name == EXTERNAL_XDP_PROGRAM {
            self.path.dataplane.external_xdp().test_run(options)
        } else {
            self.path.dataplane.program(name).test_run(options)
        }
        .unwrap_or_else(|e| panic!("{name}: BPF_PROG_TEST_RUN: {e}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out, result.duration.as_nanos() as f64)
    }
}

/// Fills the conntrack to its capacity with idle forward entries of flows nobody sends (from
/// 10.250.0.0/16), as a busy node's table is. Returns how many were written.
fn fill_conntrack(path: &mut LoadedPath) -> u32 {
    let capacity = path.dataplane.capacities.conntrack;
    let mut entry = CtEntry::ZERO;
    entry.kind = CT_KIND_FORWARD;
    entry.expires_s = u32::MAX;
    let mut written = 0;
    for n in 0..capacity {
        let client = Ipv4Addr::new(10, 250, (n >> 24) as u8, (n >> 16) as u8);
        let key = FlowKey::new(
            addr_be(client.octets()),
            addr_be(WEB_VIP.octets()),
            (n as u16).to_be(),
            80u16.to_be(),
            lb_common::IPPROTO_TCP,
        );
        if path.dataplane.maps.conntrack.insert(key, entry, 0).is_ok() {
            written += 1;
        }
    }
    written
}

#[derive(Serialize)]
struct Row {
    program: &'static str,
    path: &'static str,
    /// Timed as single runs (else as `repeat` runs of one packet).
    single_runs: bool,
    services: usize,
    /// The verdict of the last run (TC_ACT_* or XDP_*).
    verdict: u32,
    /// Mean ns a run, one figure a round.
    ns: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    rounds: usize,
    repeat: u32,
    single_runs: u32,
    rows: Vec<Row>,
}

fn main() {
    let (rounds, repeat) = rounds_and_repeat();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("program_cost: needs root (BPF_PROG_TEST_RUN); skipped");
        return;
    }
    // The programs look routes up in the namespace the runs are made from.
    let net = PacketNetns::entered();
    let paths = paths();
    let mut rows = Vec::new();
    let mut next_port = 1024u16;
    for synthetic in [0, SYNTHETIC] {
        let mut scale = Scale::load(synthetic, &net);
        let first_row = rows.len();
        for path in &paths {
            rows.push(Row {
                program: path.program.name(),
                path: path.name,
                single_runs: !matches!(path.traffic, Traffic::Repeated(_)),
                services: scale.services,
                verdict: 0,
                ns: Vec::new(),
            });
        }
        for _ in 0..rounds {
            scale.refill();
            for (p, path) in paths.iter().enumerate() {
                if path.name == "new flow" {
                    // Every new flow through a NodePort claims a SNAT port towards the one
                    // backend: a fresh table per path keeps the port range as empty for each
                    // (the node's whole range is 28,232 ports a backend).
                    scale.refill();
                }
                let (verdict, ns) = match path.traffic {
                    Traffic::Repeated(packet) => {
                        let (verdict, _, ns) = scale.run(path.program, &packet(0), repeat);
                        (verdict, ns)
                    }
                    Traffic::Single(packet) | Traffic::SnatReply(packet) => {
                        let snat = matches!(path.traffic, Traffic::SnatReply(_));
                        let mut total = 0.0;
                        let mut verdict = 0;
                        for _ in 0..SINGLE_RUNS {
                            next_port = next_port.checked_add(1).unwrap_or(1024);
                            let port = if snat { scale.snat_port } else { next_port };
                            let (v, _, ns) = scale.run(path.program, &packet(port), 1);
                            total += ns;
                            verdict = v;
                        }
                        (verdict, total / f64::from(SINGLE_RUNS))
                    }
                };
                let row = &mut rows[first_row + p];
                row.verdict = verdict;
                row.ns.push(ns);
            }
        }
    }
    print_table(&rows, rounds, repeat);
    if let Some(json) = std::env::var_os("LB_PROGRAM_COST_JSON") {
        let report = Report {
            rounds,
            repeat,
            single_runs: SINGLE_RUNS,
            rows,
        };
        std::fs::write(
            &json,
            serde_json::to_string_pretty(&report).expect("serializable"),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", json.to_string_lossy()));
    }
}

/// The median of each row and its ratio to the empty program of its kind, timed the same way,
/// at its scale.
fn print_table(rows: &[Row], rounds: usize, repeat: u32) {
    let median = |row: &Row| median_min_max(row.ns.clone());
    println!(
        "ns per packet, median of {rounds} rounds (min-max), full conntrack; single runs \
         ({SINGLE_RUNS} a path and round) unless repeated ({repeat} runs):"
    );
    println!(
        "{:<22} {:<24} {:>8} {:>8} {:>24} {:>8}",
        "program", "path", "Services", "verdict", "ns", "x empty"
    );
    for row in rows {
        let xdp = row.program == EXTERNAL_XDP_PROGRAM || row.program == Program::EmptyXdp.name();
        let empty = if xdp {
            Program::EmptyXdp.name()
        } else {
            Program::EmptyTc.name()
        };
        let floor = rows
            .iter()
            .find(|r| {
                r.services == row.services && r.program == empty && r.single_runs == row.single_runs
            })
            .map_or(f64::NAN, |r| median(r).0);
        let (mid, low, high) = median(row);
        println!(
            "{:<22} {:<24} {:>8} {:>8} {:>24} {:>8.2}",
            row.program,
            row.path,
            row.services,
            row.verdict,
            format!("{mid:.1} ({low:.1}-{high:.1})"),
            mid / floor
        );
    }
}
