//! The packet-test table: the real tc program run with BPF_PROG_TEST_RUN on packets built with
//! etherparse, maps provisioned through the agent's own translate + sync code.
//!
//! Each case gives an input packet, the expected verdict, the expected output packet (built
//! independently, so its checksums are computed from scratch) and the expected counter deltas.
//! Cases run in order against one loaded program: later cases see the conntrack earlier ones made.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd as _,
    time::Duration,
};

use aya::{
    maps::IterableMap as _,
    programs::{TestRun as _, TestRunOptions},
};
use etherparse::{
    IpHeaders, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice,
    icmpv4::DestUnreachableHeader,
};
use lb_common::{
    conntrack::FlowKey,
    counters::Counter,
    hash::{flow_hash, slot_for},
    maglev,
    maps::{EXTERNAL_INGRESS_PROGRAM, POD_INGRESS_PROGRAM},
    service::NodeConfig,
};
use lb_userspace::{sync::Settings, translate::NodeContext};
use support::{
    LoadedPath,
    packet_netns::{
        EXT_MAC, NODE, NODE2, NODE2_MAC, OUTSIDE, OUTSIDE_MAC, POD_A, POD_A_MAC, POD_LINK_MAC,
        PacketNetns, ip,
    },
    privileged,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_DROP: u32 = 1;

const CLIENT: [u8; 4] = [10, 244, 1, 2];
const VIP: [u8; 4] = [10, 96, 0, 10];
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 20];
const SELF_VIP: [u8; 4] = [10, 96, 0, 40];
const STICKY_VIP: [u8; 4] = [10, 96, 0, 50];
const POD_B: [u8; 4] = [10, 244, 1, 12];
const POD_C: [u8; 4] = [10, 244, 1, 13];
const POD_D: [u8; 4] = [10, 244, 1, 14];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 11];
/// The `guarded` LoadBalancer's ingress IP; its source ranges admit 172.30.0.0/28 (the nodes)
/// and 198.51.100.7/32, not OUTSIDE.
const GUARDED_LB: [u8; 4] = [172, 30, 0, 200];
const GUARDED_VIP: [u8; 4] = [10, 96, 0, 33];
const ADMITTED: [u8; 4] = [198, 51, 100, 7];
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const SNAT_PORTS: (u16, u16) = (61000, 65535);

fn manifest(backends: &[[u8; 4]]) -> String {
    manifest_with(backends, &[])
}

/// The test cluster, `web` having `backends` ready and `terminating` terminating (still
/// serving, not ready).
fn manifest_with(backends: &[[u8; 4]], terminating: &[[u8; 4]]) -> String {
    let endpoints = |pods: &[[u8; 4]], node: &str| -> String {
        pods.iter()
            .map(|b| format!("  - {{ addresses: [\"{}\"], nodeName: {node} }}\n", ip(*b)))
            .collect()
    };
    let terminating: String = terminating
        .iter()
        .map(|b| {
            format!(
                "  - {{ addresses: [\"{}\"], nodeName: node-1, conditions: {{ ready: false, serving: true, terminating: true }} }}\n",
                ip(*b)
            )
        })
        .collect();
    let slice = |name: &str, service: &str, eps: String| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{ name: {name}, namespace: t, labels: {{ kubernetes.io/service-name: {service} }} }}\n\
             addressType: IPv4\nports:\n- {{ name: http, port: 8080, protocol: TCP }}\n- {{ name: dns, port: 5353, protocol: UDP }}\nendpoints:\n{eps}---\n"
        )
    };
    let service = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: t }}\nspec:\n{extra}  ports:\n  - {{ name: http, port: 80, protocol: TCP, nodePort: NP }}\n  - {{ name: dns, port: 53, protocol: UDP, nodePort: NPU }}\n---\n"
        )
    };
    let mut yaml = String::new();
    yaml += &service("web", &format!("  clusterIP: {}\n", ip(VIP)))
        .replace(", nodePort: NPU", "")
        .replace(", nodePort: NP", "");
    yaml += &slice("web-1", "web", endpoints(backends, "node-1") + &terminating);
    yaml += &service("empty", &format!("  clusterIP: {}\n", ip(EMPTY_VIP)))
        .replace(", nodePort: NPU", "")
        .replace(", nodePort: NP", "");
    yaml += &service("self", &format!("  clusterIP: {}\n", ip(SELF_VIP)))
        .replace(", nodePort: NPU", "")
        .replace(", nodePort: NP", "");
    yaml += &slice("self-1", "self", endpoints(&[POD_A], "node-1"));
    yaml += &service("sticky", &format!("  clusterIP: {}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{ clientIP: {{ timeoutSeconds: 1 }} }}\n", ip(STICKY_VIP))).replace(", nodePort: NPU", "").replace(", nodePort: NP", "");
    yaml += &slice("sticky-1", "sticky", endpoints(&[POD_A, POD_B], "node-1"));
    // NodePort 30080 with its only endpoint on node-2; 30081 is Local with one on this node.
    yaml += &service("remote", "  type: NodePort\n  clusterIP: 10.96.0.30\n")
        .replace("NPU", "30053")
        .replace("NP", "30080");
    yaml += &slice("remote-1", "remote", endpoints(&[REMOTE_POD], "node-2"));
    yaml += &service(
        "local",
        "  type: NodePort\n  clusterIP: 10.96.0.31\n  externalTrafficPolicy: Local\n",
    )
    .replace("NPU", "30054")
    .replace("NP", "30081");
    yaml += &slice("local-1", "local", endpoints(&[POD_A], "node-1"));
    // Local too, but its only endpoint is on node-2: this node must not forward.
    yaml += &service(
        "elsewhere",
        "  type: NodePort\n  clusterIP: 10.96.0.32\n  externalTrafficPolicy: Local\n",
    )
    .replace("NPU", "30055")
    .replace("NP", "30082");
    yaml += &slice(
        "elsewhere-1",
        "elsewhere",
        endpoints(&[REMOTE_POD], "node-2"),
    );
    // A LoadBalancer restricted to some clients, its endpoint on this node (DNAT only).
    yaml += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: guarded, namespace: t }}\nspec:\n  type: LoadBalancer\n  clusterIP: {}\n  loadBalancerSourceRanges: [\"172.30.0.0/28\", \"198.51.100.7/32\"]\n  ports:\n  - {{ name: http, port: 80, protocol: TCP, nodePort: 30083 }}\nstatus: {{ loadBalancer: {{ ingress: [{{ ip: {} }}] }} }}\n---\n",
        ip(GUARDED_VIP),
        ip(GUARDED_LB)
    );
    yaml += &slice("guarded-1", "guarded", endpoints(&[POD_A], "node-1"));
    yaml
}

fn node_context() -> NodeContext {
    NodeContext {
        name: Some("node-1".to_owned()),
        addresses: vec![Ipv4Addr::from(NODE).into()],
        ..NodeContext::default()
    }
}

fn provision(path: &mut LoadedPath, backends: &[[u8; 4]]) {
    path.provision_as(&manifest(backends), &node_context());
}

/// An ICMP error from `src` to `dst` quoting `offending`'s IPv4 header and first 8 bytes.
fn icmp_error(
    src: [u8; 4],
    dst: [u8; 4],
    kind: etherparse::Icmpv4Type,
    offending: &[u8],
) -> Vec<u8> {
    icmp_error_quoting(src, dst, kind, &offending[14..14 + 28])
}

fn icmp_error_quoting(
    src: [u8; 4],
    dst: [u8; 4],
    kind: etherparse::Icmpv4Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .icmpv4(kind)
        .write(&mut out, quote)
        .unwrap();
    out
}

fn frag_needed() -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    })
}

fn time_exceeded() -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit)
}

fn port_unreachable_type() -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

/// `backends` without `removed`, as a slice that lives for the whole test run.
fn without(backends: &[[u8; 4]], removed: &[[u8; 4]]) -> &'static [[u8; 4]] {
    let rest: Vec<[u8; 4]> = backends
        .iter()
        .copied()
        .filter(|b| !removed.contains(b))
        .collect();
    Box::leak(rest.into_boxed_slice())
}

/// Which of `backends` the Maglev table the agent builds gives a flow from `src:sport` to
/// `dst:dport`.
fn predicted(
    backends: &[[u8; 4]],
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    proto: u8,
) -> [u8; 4] {
    let target_port: u16 = if proto == 6 { 8080 } else { 5353 };
    let keys: Vec<u64> = backends
        .iter()
        .map(|b| maglev::backend_key(lb_common::addr_be(*b), target_port.to_be()))
        .collect();
    let size = maglev::table_size(backends.len(), None);
    let table = maglev::build(&keys, size);
    let flow = FlowKey::new(
        lb_common::addr_be(src),
        lb_common::addr_be(dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    );
    backends[table[slot_for(&flow, size) as usize] as usize]
}

fn predicted_backend(backends: &[[u8; 4]], sport: u16, dport: u16, proto: u8) -> [u8; 4] {
    predicted(backends, CLIENT, sport, VIP, dport, proto)
}

/// The SNAT port the packet path claims first for this TCP client flow (free in a fresh
/// conntrack).
fn predicted_snat_port(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> u16 {
    predicted_snat_port_proto(src, sport, dst, dport, 6)
}

fn predicted_snat_port_proto(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> u16 {
    let flow = FlowKey::new(
        lb_common::addr_be(src),
        lb_common::addr_be(dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    );
    let range = (SNAT_PORTS.1 - SNAT_PORTS.0) as u32 + 1;
    SNAT_PORTS.0 + (flow_hash(&flow) % range) as u16
}

/// A client source port whose first choice on the sticky Service is `want`.
fn sport_choosing(want: [u8; 4], from: u16) -> u16 {
    (from..)
        .find(|&sport| predicted(&[POD_A, POD_B], CLIENT, sport, STICKY_VIP, 80, 6) == want)
        .unwrap()
}

struct Tcp {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    syn: bool,
    ip_options: &'static [u8],
}

fn tcp(t: Tcp) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, t.src, t.dst).unwrap();
    ip.options = t.ip_options.try_into().unwrap();
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(t.sport, t.dport, 1000, 64240);
    let builder = if t.syn { builder.syn() } else { builder.ack(1) };
    let payload: &[u8] = if t.syn {
        b""
    } else {
        b"GET / HTTP/1.1\r\n\r\n"
    };
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, zero_csum: bool) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .unwrap();
    if zero_csum {
        // UDP checksum (optional in IPv4): eth 14 + ip 20 + 6.
        out[40..42].copy_from_slice(&[0, 0]);
    }
    out
}

/// A UDP packet to the VIP whose fragment offset is not 0: its bytes after the IP header are
/// payload, not ports, and must not be touched.
fn later_fragment() -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, CLIENT, VIP).unwrap();
    ip.fragment_offset = etherparse::IpFragOffset::try_new(185).unwrap();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(40000, 53)
        .write(&mut out, b"more data")
        .unwrap();
    out
}

/// Overwrites the IHL (header length in 32-bit words), leaving the rest as it was.
fn with_ihl(mut packet: Vec<u8>, ihl: u8) -> Vec<u8> {
    packet[14] = 0x40 | ihl;
    packet
}

fn ipv6_packet() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(1000, 53)
        .write(&mut out, b"v6")
        .unwrap();
    out
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum of `packet` and checks the
/// stored ones (a UDP checksum of 0 means "none" and is accepted).
fn assert_checksums_valid(description: &str, packet: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(packet)
        .unwrap_or_else(|e| panic!("{description}: unparsable output: {e}"));
    let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
        return;
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "{description}: IPv4 header checksum"
    );
    let payload = ip.payload().payload;
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4(&header, t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want, "{description}: TCP checksum");
        }
        Some(TransportSlice::Udp(u)) if u.checksum() != 0 => {
            let want = u
                .to_header()
                .calc_checksum_ipv4(&header, &payload[8..])
                .unwrap();
            assert_eq!(u.checksum(), want, "{description}: UDP checksum");
        }
        _ => {}
    }
}

/// Replaces the MAC addresses, as a redirect through the FIB does.
fn with_macs(mut packet: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    packet[..6].copy_from_slice(&dst);
    packet[6..12].copy_from_slice(&src);
    packet
}

/// The IPv4 header the packet path writes for an answer it makes up (DF, id 0, TTL 64).
fn answer_header(src: [u8; 4], dst: [u8; 4], proto: etherparse::IpNumber) -> IpHeaders {
    let mut ip = Ipv4Header::new(0, 64, proto, src, dst).unwrap();
    ip.dont_fragment = true;
    IpHeaders::Ipv4(ip, Default::default())
}

/// The reset answering a SYN (seq 1000) from `client:sport` to `service:dport`.
fn tcp_reset(service: [u8; 4], dport: u16, client: [u8; 4], sport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ip(answer_header(service, client, etherparse::IpNumber::TCP))
        .tcp(dport, sport, 0, 0)
        .rst()
        .ack(1001)
        .write(&mut out, &[])
        .unwrap();
    out
}

/// ICMP port unreachable from `service` quoting `offending`'s IPv4 header and first 8 bytes.
fn port_unreachable(service: [u8; 4], client: [u8; 4], offending: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ip(answer_header(service, client, etherparse::IpNumber::ICMP))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, &offending[14..14 + 28])
        .unwrap();
    out
}

enum Expect {
    /// Verdict OK and the packet leaves exactly as this one (checksums included).
    Rewritten(Vec<u8>),
    /// Redirected by the program (FIB or reject) and leaving exactly as this one.
    Redirected(Vec<u8>),
    /// Sent back out of the interface it came in on by XDP, exactly as this one.
    XdpTransmitted(Vec<u8>),
    /// Left to the tc programs by XDP, untouched.
    XdpPassed,
    /// Dropped by XDP.
    XdpDropped,
    Unchanged,
    Dropped,
}

#[derive(Clone, Copy)]
enum Entry {
    /// Arrives from a local pod: the pod-ingress program on the pods' link.
    FromPod,
    /// Arrives from the network: the external-ingress program on the external interface.
    FromNetwork,
    /// Arrives from the network with `--xdp`: the XDP program on the external interface.
    XdpFromNetwork,
}

/// Pod addresses, for the lifetime of the test run.
type Pods = &'static [[u8; 4]];

struct Case {
    description: &'static str,
    /// Backends of the `web` Service to (re)program before this case, through translate + sync:
    /// ready ones, and terminating ones.
    provision: Option<(Pods, Pods)>,
    entry: Entry,
    /// Wait this long first (to let an affinity expire).
    wait: Option<Duration>,
    input: Vec<u8>,
    expect: Expect,
    counters: &'static [(Counter, u64)],
}

impl Case {
    fn new(
        description: &'static str,
        input: Vec<u8>,
        expect: Expect,
        counters: &'static [(Counter, u64)],
    ) -> Self {
        Self {
            description,
            provision: None,
            entry: Entry::FromPod,
            wait: None,
            input,
            expect,
            counters,
        }
    }

    fn provision(self, backends: &'static [[u8; 4]]) -> Self {
        Self {
            provision: Some((backends, &[])),
            ..self
        }
    }

    fn provision_draining(
        self,
        ready: &'static [[u8; 4]],
        terminating: &'static [[u8; 4]],
    ) -> Self {
        Self {
            provision: Some((ready, terminating)),
            ..self
        }
    }

    fn arriving_from_network(self) -> Self {
        Self {
            entry: Entry::FromNetwork,
            ..self
        }
    }

    fn through_xdp(self) -> Self {
        Self {
            entry: Entry::XdpFromNetwork,
            ..self
        }
    }

    fn after(self, wait: Duration) -> Self {
        Self {
            wait: Some(wait),
            ..self
        }
    }
}

/// A `__sk_buff` context that only sets `ifindex` (offset 40), so the program runs as if the
/// packet arrived on that interface.
fn skb_context(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// An `xdp_md` context: `data_end` must equal the packet length; `ingress_ifindex` at 12.
fn xdp_context(ifindex: u32, len: usize) -> Vec<u8> {
    let mut ctx = vec![0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn run_case(path: &mut LoadedPath, net: &PacketNetns, case: &Case) {
    if let Some((ready, terminating)) = case.provision {
        path.provision_as(&manifest_with(ready, terminating), &node_context());
    }
    if let Some(wait) = case.wait {
        std::thread::sleep(wait);
    }
    let before = path.counters();
    let mut out = vec![0u8; case.input.len() + 256];
    let ctx = match case.entry {
        Entry::FromPod => skb_context(net.ifindex("pod0")),
        Entry::FromNetwork => skb_context(net.ifindex("ext0")),
        Entry::XdpFromNetwork => xdp_context(net.ifindex("ext0"), case.input.len()),
    };
    let options = TestRunOptions {
        data_in: Some(&case.input),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ..Default::default()
    };
    let result = match case.entry {
        Entry::FromPod => path
            .dataplane
            .program(POD_INGRESS_PROGRAM)
            .test_run(options),
        Entry::FromNetwork => path
            .dataplane
            .program(EXTERNAL_INGRESS_PROGRAM)
            .test_run(options),
        Entry::XdpFromNetwork => path.dataplane.external_xdp().test_run(options),
    }
    .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN failed: {e}", case.description));
    out.truncate(result.data_size_out as usize);
    let after = path.counters();

    let show = |bytes: &[u8]| format!("{bytes:02x?}");
    let expect_packet = |verdict: u32, want: &Vec<u8>| {
        assert_eq!(
            result.return_value, verdict,
            "{}: verdict",
            case.description
        );
        assert_eq!(
            out,
            *want,
            "{}: output packet\n input    {}\n expected {}\n actual   {}",
            case.description,
            show(&case.input),
            show(want),
            show(&out)
        );
        assert_checksums_valid(case.description, &out);
    };
    match &case.expect {
        Expect::Rewritten(want) => expect_packet(TC_ACT_OK, want),
        Expect::Redirected(want) => expect_packet(TC_ACT_REDIRECT, want),
        Expect::XdpTransmitted(want) => expect_packet(XDP_TX, want),
        Expect::XdpPassed => {
            assert_eq!(
                result.return_value, XDP_PASS,
                "{}: verdict",
                case.description
            );
            assert_eq!(
                out, case.input,
                "{}: packet must pass unchanged",
                case.description
            );
        }
        Expect::Unchanged => {
            assert_eq!(
                result.return_value, TC_ACT_OK,
                "{}: verdict",
                case.description
            );
            assert_eq!(
                out, case.input,
                "{}: packet must pass unchanged",
                case.description
            );
        }
        Expect::Dropped => {
            assert_eq!(
                result.return_value, TC_ACT_SHOT,
                "{}: verdict",
                case.description
            );
        }
        Expect::XdpDropped => {
            assert_eq!(
                result.return_value, XDP_DROP,
                "{}: verdict",
                case.description
            );
        }
    }
    let deltas: BTreeMap<Counter, u64> = Counter::ALL
        .iter()
        .map(|c| (*c, after[c] - before[c]))
        .filter(|(_, d)| *d != 0)
        .collect();
    let want: BTreeMap<Counter, u64> = case.counters.iter().copied().collect();
    assert_eq!(deltas, want, "{}: counter deltas", case.description);
}

fn load(test: &str) -> LoadedPath {
    load_with(test, lb_common::conntrack::CtTimeouts::DEFAULT)
}

fn load_with(test: &str, timeouts: lb_common::conntrack::CtTimeouts) -> LoadedPath {
    let mut path = LoadedPath::load(test);
    path.programmer.set_settings(Settings {
        reject_no_endpoints: true,
        node: NodeConfig {
            snat_addr_be: lb_common::addr_be(NODE),
            snat_port_first: SNAT_PORTS.0,
            snat_port_last: SNAT_PORTS.1,
            timeouts,
            _reserved: [0; 2],
        },
        ..Settings::default()
    });
    path
}

#[test]
fn packet_table() {
    if !privileged("packet_table") {
        return;
    }
    // The program reads the FIB of the namespace the test runs in: use one with known routes.
    let net = PacketNetns::entered();
    let mut path = load("packet-table");

    const AB: &[[u8; 4]] = &[POD_A, POD_B];
    const CDE: &[[u8; 4]] = &[POD_C, POD_D, [10, 244, 1, 15]];
    let syn_backend = predicted_backend(AB, 40000, 80, 6);
    let udp_backend = predicted_backend(AB, 40001, 53, 17);
    let udp0_backend = predicted_backend(AB, 40002, 53, 17);
    let opt_backend = predicted_backend(AB, 40003, 80, 6);
    let plain = |src, sport, dst, dport, syn| Tcp {
        src,
        sport,
        dst,
        dport,
        syn,
        ip_options: &[],
    };
    // NOP, NOP, NOP, end of list: one extra 32-bit word, IHL 6.
    const OPTIONS: &[u8] = &[1, 1, 1, 0];
    let snat_port = predicted_snat_port(OUTSIDE, 40100, NODE, 30080);
    let xdp_snat_port = predicted_snat_port(OUTSIDE, 40110, NODE, 30080);
    let xdp_udp_snat_port = predicted_snat_port_proto(OUTSIDE, 40111, NODE, 30053, 17);
    let first = sport_choosing(POD_A, 41000);
    let other = sport_choosing(POD_B, 41000);
    let later = sport_choosing(POD_B, other + 1);
    let empty_udp = udp(CLIENT, 40011, EMPTY_VIP, 53, false);
    // A flow whose backend then leaves the Service (and every other one).
    let leaving = predicted_backend(CDE, 40020, 80, 6);
    let rest = without(CDE, &[leaving]);
    // Flows whose backends then start terminating (UDP moves, TCP stays).
    let udp_draining = predicted_backend(CDE, 40021, 53, 17);
    let tcp_draining = predicted_backend(CDE, 40022, 80, 6);
    let still_ready = without(CDE, &[udp_draining, tcp_draining]);
    let terminating: &'static [[u8; 4]] = without(CDE, still_ready);
    // The port a second flow from CLIENT:43000 to pod A gets (the first one holds 43000).
    let remapped_port = predicted_snat_port(CLIENT, 43000, SELF_VIP, 80);
    // The backend's UDP reply as the client got it, whose checksum the ICMP quote keeps.
    let udp_reply_seen = udp(VIP, 53, CLIENT, 40001, false);
    let mut udp_reply_quote = udp(udp_backend, 5353, CLIENT, 40001, false)[14..42].to_vec();
    udp_reply_quote[26..28].copy_from_slice(&udp_reply_seen[14 + 26..14 + 28]);

    let cases = vec![
        Case::new(
            "TCP SYN to the ClusterIP is sent to the Maglev backend",
            tcp(plain(CLIENT, 40000, VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, 40000, syn_backend, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .provision(AB),
        Case::new(
            "a later packet of that flow keeps its backend after the backend set changed to others",
            tcp(plain(CLIENT, 40000, VIP, 80, false)),
            Expect::Rewritten(tcp(plain(CLIENT, 40000, syn_backend, 8080, false))),
            &[(Counter::Translated, 1)],
        )
        .provision(CDE),
        Case::new(
            "the backend's reply is reverse-translated to come from the ClusterIP",
            tcp(plain(syn_backend, 8080, CLIENT, 40000, false)),
            Expect::Rewritten(tcp(plain(VIP, 80, CLIENT, 40000, false))),
            &[(Counter::ReverseTranslated, 1)],
        ),
        Case::new(
            "UDP to the ClusterIP is translated with a correct checksum",
            udp(CLIENT, 40001, VIP, 53, false),
            Expect::Rewritten(udp(CLIENT, 40001, udp_backend, 5353, false)),
            &[(Counter::Translated, 1)],
        )
        .provision(AB),
        Case::new(
            "UDP reply is reverse-translated",
            udp(udp_backend, 5353, CLIENT, 40001, false),
            Expect::Rewritten(udp(VIP, 53, CLIENT, 40001, false)),
            &[(Counter::ReverseTranslated, 1)],
        ),
        Case::new(
            "UDP with checksum 0 is translated and its checksum stays 0",
            udp(CLIENT, 40002, VIP, 53, true),
            Expect::Rewritten(udp(CLIENT, 40002, udp0_backend, 5353, true)),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "TCP with IPv4 options finds the TCP header after them",
            tcp(Tcp {
                ip_options: OPTIONS,
                ..plain(CLIENT, 40003, VIP, 80, true)
            }),
            Expect::Rewritten(tcp(Tcp {
                ip_options: OPTIONS,
                ..plain(CLIENT, 40003, opt_backend, 8080, true)
            })),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "traffic to a pod IP (not a service) passes unchanged",
            tcp(plain(CLIENT, 40004, POD_A, 8080, true)),
            Expect::Unchanged,
            &[(Counter::Passed, 1)],
        ),
        Case::new(
            "the ClusterIP on a port the service does not have passes unchanged",
            tcp(plain(CLIENT, 40005, VIP, 443, true)),
            Expect::Unchanged,
            &[(Counter::Passed, 1)],
        ),
        Case::new(
            "a non-first fragment to the ClusterIP passes unchanged",
            later_fragment(),
            Expect::Unchanged,
            &[(Counter::Passed, 1)],
        ),
        Case::new(
            "IPv6 passes unchanged",
            ipv6_packet(),
            Expect::Unchanged,
            &[(Counter::Passed, 1)],
        ),
        Case::new(
            "TCP header cut short is malformed and passes unchanged",
            tcp(plain(CLIENT, 40006, VIP, 80, true))[..14 + 20 + 10].to_vec(),
            Expect::Unchanged,
            &[(Counter::Malformed, 1)],
        ),
        // A frame cut inside the fixed 20-byte IPv4 header cannot be tested here: the kernel's
        // BPF_PROG_TEST_RUN rejects it (EINVAL) before the program runs. The two IHL cases
        // below reach the same "header runs past the packet" branch.
        Case::new(
            "IPv4 header length claiming options past the end is malformed and passes unchanged",
            with_ihl(tcp(plain(CLIENT, 40009, VIP, 80, true)), 15),
            Expect::Unchanged,
            &[(Counter::Malformed, 1)],
        ),
        Case::new(
            "IPv4 header length below 5 words is malformed and passes unchanged",
            with_ihl(tcp(plain(CLIENT, 40010, VIP, 80, true)), 4),
            Expect::Unchanged,
            &[(Counter::Malformed, 1)],
        ),
        Case::new(
            "TCP to a service with no endpoints is answered with a reset from the service",
            tcp(plain(CLIENT, 40008, EMPTY_VIP, 80, true)),
            Expect::Redirected(tcp_reset(EMPTY_VIP, 80, CLIENT, 40008)),
            &[(Counter::Rejected, 1)],
        ),
        Case::new(
            "UDP to a service with no endpoints is answered with ICMP port unreachable",
            empty_udp.clone(),
            Expect::Redirected(port_unreachable(EMPTY_VIP, CLIENT, &empty_udp)),
            &[(Counter::Rejected, 1)],
        ),
        Case::new(
            "NodePort from outside to a backend on another node: SNAT to this node, sent to node-2",
            tcp(plain(OUTSIDE, 40100, NODE, 30080, true)),
            Expect::Redirected(with_macs(
                tcp(plain(NODE, snat_port, REMOTE_POD, 8080, true)),
                NODE2_MAC,
                EXT_MAC,
            )),
            &[(Counter::Translated, 1), (Counter::Redirected, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "its reply from node-2 is reverse-SNATed to the NodePort and sent to the client",
            tcp(plain(REMOTE_POD, 8080, NODE, snat_port, false)),
            Expect::Redirected(with_macs(
                tcp(plain(NODE, 30080, OUTSIDE, 40100, false)),
                OUTSIDE_MAC,
                EXT_MAC,
            )),
            &[(Counter::ReverseTranslated, 1), (Counter::Redirected, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "NodePort with externalTrafficPolicy Local: DNAT only, the client address is kept",
            tcp(plain(OUTSIDE, 40101, NODE, 30081, true)),
            Expect::Rewritten(tcp(plain(OUTSIDE, 40101, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "the local pod's reply leaves from the NodePort, redirected to the client",
            tcp(plain(POD_A, 8080, OUTSIDE, 40101, false)),
            Expect::Redirected(with_macs(
                tcp(plain(NODE, 30081, OUTSIDE, 40101, false)),
                OUTSIDE_MAC,
                EXT_MAC,
            )),
            &[(Counter::ReverseTranslated, 1), (Counter::Redirected, 1)],
        ),
        Case::new(
            "XDP: NodePort from outside to a backend on another node is SNATed and sent back out",
            tcp(plain(OUTSIDE, 40110, NODE, 30080, true)),
            Expect::XdpTransmitted(with_macs(
                tcp(plain(NODE, xdp_snat_port, REMOTE_POD, 8080, true)),
                NODE2_MAC,
                EXT_MAC,
            )),
            &[(Counter::Translated, 1), (Counter::XdpTransmitted, 1)],
        )
        .through_xdp(),
        Case::new(
            "XDP: its reply from node-2 is reverse-SNATed and sent back out to the client",
            tcp(plain(REMOTE_POD, 8080, NODE, xdp_snat_port, false)),
            Expect::XdpTransmitted(with_macs(
                tcp(plain(NODE, 30080, OUTSIDE, 40110, false)),
                OUTSIDE_MAC,
                EXT_MAC,
            )),
            &[
                (Counter::ReverseTranslated, 1),
                (Counter::XdpTransmitted, 1),
            ],
        )
        .through_xdp(),
        Case::new(
            "XDP: UDP to the NodePort is SNATed with a correct checksum",
            udp(OUTSIDE, 40111, NODE, 30053, false),
            Expect::XdpTransmitted(with_macs(
                udp(NODE, xdp_udp_snat_port, REMOTE_POD, 5353, false),
                NODE2_MAC,
                EXT_MAC,
            )),
            &[(Counter::Translated, 1), (Counter::XdpTransmitted, 1)],
        )
        .through_xdp(),
        Case::new(
            "XDP: a local backend (DNAT only) is left to tc, untouched",
            tcp(plain(OUTSIDE, 40112, NODE, 30081, true)),
            Expect::XdpPassed,
            &[],
        )
        .through_xdp(),
        Case::new(
            "... and tc then translates it with the flow XDP recorded",
            tcp(plain(OUTSIDE, 40112, NODE, 30081, true)),
            Expect::Rewritten(tcp(plain(OUTSIDE, 40112, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "loadBalancerSourceRanges: a client outside them is dropped at the load-balancer IP",
            tcp(plain(OUTSIDE, 40120, GUARDED_LB, 80, true)),
            Expect::Dropped,
            &[(Counter::DroppedSourceRange, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "XDP: a client outside the source ranges is dropped before tc",
            tcp(plain(OUTSIDE, 40121, GUARDED_LB, 80, true)),
            Expect::XdpDropped,
            &[(Counter::DroppedSourceRange, 1)],
        )
        .through_xdp(),
        Case::new(
            "loadBalancerSourceRanges: a node in 172.30.0.0/28 is admitted",
            tcp(plain(NODE2, 40122, GUARDED_LB, 80, true)),
            Expect::Rewritten(tcp(plain(NODE2, 40122, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "loadBalancerSourceRanges: a /32 range admits exactly its client",
            tcp(plain(ADMITTED, 40123, GUARDED_LB, 80, true)),
            Expect::Rewritten(tcp(plain(ADMITTED, 40123, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "XDP: an admitted client is left to tc (DNAT only)",
            tcp(plain(ADMITTED, 40124, GUARDED_LB, 80, true)),
            Expect::XdpPassed,
            &[],
        )
        .through_xdp(),
        Case::new(
            "loadBalancerSourceRanges do not guard the NodePort (kube-proxy's default)",
            tcp(plain(OUTSIDE, 40125, NODE, 30083, true)),
            Expect::Rewritten(tcp(plain(OUTSIDE, 40125, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "... nor the ClusterIP from a pod",
            tcp(plain(CLIENT, 40126, GUARDED_VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, 40126, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "a denied client's later packets are dropped too (no flow was recorded)",
            tcp(plain(OUTSIDE, 40120, GUARDED_LB, 80, false)),
            Expect::Dropped,
            &[(Counter::DroppedSourceRange, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "NodePort with externalTrafficPolicy Local and no endpoint on this node: dropped",
            tcp(plain(OUTSIDE, 40102, NODE, 30082, true)),
            Expect::Dropped,
            &[(Counter::DroppedNoBackend, 1)],
        )
        .arriving_from_network(),
        Case::new(
            "hairpin: a pod reaching its own Service is SNATed to the node so it accepts the packet",
            tcp(plain(POD_A, 40200, SELF_VIP, 80, true)),
            Expect::Redirected(with_macs(
                tcp(plain(
                    NODE,
                    predicted_snat_port(POD_A, 40200, SELF_VIP, 80),
                    POD_A,
                    8080,
                    true,
                )),
                POD_A_MAC,
                POD_LINK_MAC,
            )),
            &[(Counter::Translated, 1), (Counter::Redirected, 1)],
        ),
        Case::new(
            "session affinity: a client's first connection picks by Maglev",
            tcp(plain(CLIENT, first, STICKY_VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, first, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "session affinity: its next connection keeps that pod although Maglev would pick another",
            tcp(plain(CLIENT, other, STICKY_VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, other, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "session affinity: after the timeout (1 s) a new connection is chosen afresh",
            tcp(plain(CLIENT, later, STICKY_VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, later, POD_B, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .after(Duration::from_millis(1100)),
        Case::new(
            "ICMP frag-needed from the backend reaches the client from the ClusterIP, quoting what the client sent",
            icmp_error(
                syn_backend,
                CLIENT,
                frag_needed(),
                &tcp(plain(CLIENT, 40000, syn_backend, 8080, false)),
            ),
            Expect::Rewritten(icmp_error(
                VIP,
                CLIENT,
                frag_needed(),
                &tcp(plain(CLIENT, 40000, VIP, 80, false)),
            )),
            &[(Counter::IcmpTranslated, 1)],
        ),
        Case::new(
            "ICMP port unreachable from the client about a reply reaches the backend, quoting what the backend sent",
            icmp_error(CLIENT, VIP, port_unreachable_type(), &udp_reply_seen),
            Expect::Rewritten(icmp_error_quoting(
                CLIENT,
                udp_backend,
                port_unreachable_type(),
                &udp_reply_quote,
            )),
            &[(Counter::IcmpTranslated, 1)],
        ),
        Case::new(
            "ICMP time exceeded from a router on the backend's side reaches the client, the router's address kept",
            icmp_error(
                NODE2,
                CLIENT,
                time_exceeded(),
                &tcp(plain(CLIENT, 40000, syn_backend, 8080, false)),
            ),
            Expect::Rewritten(icmp_error(
                NODE2,
                CLIENT,
                time_exceeded(),
                &tcp(plain(CLIENT, 40000, VIP, 80, false)),
            )),
            &[(Counter::IcmpTranslated, 1)],
        ),
        Case::new(
            "an ICMP echo request to the ClusterIP passes unchanged",
            icmp_error_quoting(
                CLIENT,
                VIP,
                etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
                b"ping",
            ),
            Expect::Unchanged,
            &[(Counter::Passed, 1)],
        ),
        Case::new(
            "an ICMP error about a flow lb never translated passes unchanged",
            icmp_error(
                OUTSIDE,
                CLIENT,
                port_unreachable_type(),
                &udp(CLIENT, 40999, POD_C, 9999, false),
            ),
            Expect::Unchanged,
            &[(Counter::Passed, 1)],
        ),
        Case::new(
            "a flow to a backend that will leave: translated to it",
            tcp(plain(CLIENT, 40020, VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, 40020, leaving, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .provision(CDE),
        Case::new(
            "after its backend left every Service, the flow's next packet is balanced afresh, not sent to the dead address",
            tcp(plain(CLIENT, 40020, VIP, 80, false)),
            Expect::Rewritten(tcp(plain(
                CLIENT,
                40020,
                predicted_backend(rest, 40020, 80, 6),
                8080,
                false,
            ))),
            &[(Counter::Translated, 1), (Counter::Rebalanced, 1)],
        )
        .provision(rest),
        Case::new(
            "a UDP flow to a backend that will terminate",
            udp(CLIENT, 40021, VIP, 53, false),
            Expect::Rewritten(udp(CLIENT, 40021, udp_draining, 5353, false)),
            &[(Counter::Translated, 1)],
        )
        .provision(CDE),
        Case::new(
            "a TCP flow to a backend that will terminate",
            tcp(plain(CLIENT, 40022, VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, 40022, tcp_draining, 8080, true))),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "once its backend terminates (still serving), the UDP flow moves to a ready one at once",
            udp(CLIENT, 40021, VIP, 53, false),
            Expect::Rewritten(udp(
                CLIENT,
                40021,
                predicted_backend(still_ready, 40021, 53, 17),
                5353,
                false,
            )),
            &[(Counter::Translated, 1), (Counter::Rebalanced, 1)],
        )
        .provision_draining(still_ready, terminating),
        Case::new(
            "... while the established TCP flow stays on its terminating backend",
            tcp(plain(CLIENT, 40022, VIP, 80, false)),
            Expect::Rewritten(tcp(plain(CLIENT, 40022, tcp_draining, 8080, false))),
            &[(Counter::Translated, 1)],
        ),
        Case::new(
            "one client port to web, whose only backend is pod A",
            tcp(plain(CLIENT, 43000, VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, 43000, POD_A, 8080, true))),
            &[(Counter::Translated, 1)],
        )
        .provision(&[POD_A]),
        Case::new(
            "the same client port to another Service on pod A: its reply tuple is taken, so its source port is remapped",
            tcp(plain(CLIENT, 43000, SELF_VIP, 80, true)),
            Expect::Rewritten(tcp(plain(CLIENT, remapped_port, POD_A, 8080, true))),
            &[(Counter::Translated, 1), (Counter::PortRemapped, 1)],
        ),
        Case::new(
            "pod A's reply to the first flow still comes from web",
            tcp(plain(POD_A, 8080, CLIENT, 43000, false)),
            Expect::Rewritten(tcp(plain(VIP, 80, CLIENT, 43000, false))),
            &[(Counter::ReverseTranslated, 1)],
        ),
        Case::new(
            "pod A's reply to the second flow comes from the other Service, to the client's own port",
            tcp(plain(POD_A, 8080, CLIENT, remapped_port, false)),
            Expect::Rewritten(tcp(plain(SELF_VIP, 80, CLIENT, 43000, false))),
            &[(Counter::ReverseTranslated, 1)],
        ),
        Case::new(
            "the second flow's later packets keep the remapped port",
            tcp(plain(CLIENT, 43000, SELF_VIP, 80, false)),
            Expect::Rewritten(tcp(plain(CLIENT, remapped_port, POD_A, 8080, false))),
            &[(Counter::Translated, 1)],
        ),
    ];
    for case in &cases {
        run_case(&mut path, &net, case);
    }
    eprintln!("packet_table: {} cases passed", cases.len());
}

/// Many flows spread over both backends exactly as the Maglev table says.
#[test]
fn new_flows_follow_the_maglev_table() {
    if !privileged("new_flows_follow_the_maglev_table") {
        return;
    }
    let mut path = load("spread");
    provision(&mut path, &[POD_A, POD_B]);
    let mut seen = BTreeMap::<[u8; 4], u32>::new();
    for sport in 20000..20200u16 {
        let input = tcp(Tcp {
            src: CLIENT,
            sport,
            dst: VIP,
            dport: 80,
            syn: true,
            ip_options: &[],
        });
        let mut out = vec![0u8; input.len() + 64];
        let result = path
            .dataplane
            .pod_ingress()
            .test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(result.return_value, TC_ACT_OK);
        let dst: [u8; 4] = out[30..34].try_into().unwrap();
        assert_eq!(
            dst,
            predicted_backend(&[POD_A, POD_B], sport, 80, 6),
            "flow from port {sport}"
        );
        *seen.entry(dst).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both backends chosen: {seen:?}");
    assert!(
        seen.values().all(|n| *n > 60),
        "roughly even spread over 200 flows: {seen:?}"
    );
}

/// A TCP segment with the given flags (no payload), as a client or backend sends it.
fn tcp_with(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: &str) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    for flag in flags.chars() {
        builder = match flag {
            'S' => builder.syn(),
            'A' => builder.ack(1),
            'F' => builder.fin(),
            'R' => builder.rst(),
            other => panic!("unknown TCP flag {other}"),
        };
    }
    let mut out = Vec::new();
    builder.write(&mut out, &[]).unwrap();
    out
}

/// Runs `input` through `program` and returns the output packet.
fn run(path: &mut LoadedPath, program: &'static str, ifindex: u32, input: &[u8]) -> Vec<u8> {
    run_verdict(path, program, ifindex, input).1
}

fn ct_entry(path: &LoadedPath, key: FlowKey) -> Option<lb_common::conntrack::CtEntry> {
    path.dataplane.maps.conntrack.get(&key, 0).ok()
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey {
    FlowKey::new(
        lb_common::addr_be(src),
        lb_common::addr_be(dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    )
}

/// The conntrack lifecycle through the real program: timeouts by state, FIN and RST shortening
/// both entries, a SYN reusing a closed tuple, expiry, the sweep, and SNAT ports coming back.
#[test]
fn flows_have_a_lifecycle() {
    use lb_common::conntrack::{
        CT_S_FIN_FORWARD, CT_S_FIN_REPLY, CT_S_REPLIED, CT_S_RST, CtTimeouts,
    };
    if !privileged("flows_have_a_lifecycle") {
        return;
    }
    let net = PacketNetns::entered();
    let timeouts = CtTimeouts {
        tcp_syn_s: 30,
        tcp_established_s: 1000,
        tcp_close_wait_s: 500,
        tcp_close_s: 1,
        udp_s: 1,
        udp_stream_s: 300,
    };
    let mut path = load_with("lifecycle", timeouts);
    const AB: &[[u8; 4]] = &[POD_A, POD_B];
    provision(&mut path, AB);
    let pod = net.ifindex("pod0");
    let ext = net.ifindex("ext0");
    let now = lb_userspace::conntrack::now_s;
    // Within a second of `now + timeout` (the clock may tick between the packet and the check).
    let expires_in = |entry: &lb_common::conntrack::CtEntry, timeout: u32| {
        let want = now() + timeout;
        assert!(
            entry.expires_s + 1 >= want && entry.expires_s <= want,
            "expires at {} but now + {timeout} is {want}: {entry:?}",
            entry.expires_s
        );
    };

    // A TCP connection, from handshake to both FINs.
    let b = predicted_backend(AB, 42000, 80, 6);
    let fwd = key(CLIENT, 42000, VIP, 80, 6);
    let rev = key(b, 8080, CLIENT, 42000, 6);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 42000, VIP, 80, "S"),
    );
    let e = ct_entry(&path, fwd).expect("forward entry");
    assert_eq!(e.state, 0);
    expires_in(&e, timeouts.tcp_syn_s);
    expires_in(
        &ct_entry(&path, rev).expect("reply entry"),
        timeouts.tcp_syn_s,
    );
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(b, 8080, CLIENT, 42000, "SA"),
    );
    for k in [fwd, rev] {
        let e = ct_entry(&path, k).unwrap();
        assert_eq!(
            e.state, CT_S_REPLIED,
            "the first answer reaches both entries"
        );
        expires_in(&e, timeouts.tcp_established_s);
    }
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 42000, VIP, 80, "FA"),
    );
    for k in [fwd, rev] {
        let e = ct_entry(&path, k).unwrap();
        assert_eq!(e.state, CT_S_REPLIED | CT_S_FIN_FORWARD);
        expires_in(&e, timeouts.tcp_close_wait_s);
    }
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(b, 8080, CLIENT, 42000, "FA"),
    );
    for k in [fwd, rev] {
        let e = ct_entry(&path, k).unwrap();
        assert_eq!(e.state, CT_S_REPLIED | CT_S_FIN_FORWARD | CT_S_FIN_REPLY);
        expires_in(&e, timeouts.tcp_close_s);
    }
    // The client reuses the tuple at once: a new connection, not the closing one.
    let before = ct_entry(&path, fwd).unwrap();
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 42000, VIP, 80, "S"),
    );
    let after = ct_entry(&path, fwd).unwrap();
    assert_eq!(
        after.state, 0,
        "a SYN on a closed tuple starts a new flow: {before:?}"
    );
    expires_in(&after, timeouts.tcp_syn_s);

    // A RST from the backend closes both directions.
    let b2 = predicted_backend(AB, 42001, 80, 6);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 42001, VIP, 80, "S"),
    );
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(b2, 8080, CLIENT, 42001, "RA"),
    );
    for k in [
        key(CLIENT, 42001, VIP, 80, 6),
        key(b2, 8080, CLIENT, 42001, 6),
    ] {
        let e = ct_entry(&path, k).unwrap();
        assert_eq!(e.state & CT_S_RST, CT_S_RST);
        expires_in(&e, timeouts.tcp_close_s);
    }

    // A UDP flow: idle past its timeout it is dead; the packet path starts afresh and the sweep
    // deletes what is left.
    let u = predicted_backend(AB, 42002, 53, 17);
    let ufwd = key(CLIENT, 42002, VIP, 53, 17);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &udp(CLIENT, 42002, VIP, 53, false),
    );
    let first = ct_entry(&path, ufwd).unwrap();
    expires_in(&first, timeouts.udp_s);

    // SNAT: a NodePort flow from outside to the remote backend claims a port; after a RST and
    // the close timeout the same port is free for the next flow that hashes to it.
    let snat_port = predicted_snat_port(OUTSIDE, 42100, NODE, 30080);
    let out = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp_with(OUTSIDE, 42100, NODE, 30080, "S"),
    );
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), snat_port);
    let snat_forward = key(OUTSIDE, 42100, NODE, 30080, 6);
    let snat_reply = lb_common::conntrack::partner_key(
        &snat_forward,
        &ct_entry(&path, snat_forward).expect("the SNATed flow's entry"),
    );
    run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp_with(OUTSIDE, 42100, NODE, 30080, "RA"),
    );

    std::thread::sleep(Duration::from_millis(2100));
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &udp(CLIENT, 42002, VIP, 53, false),
    );
    let again = ct_entry(&path, ufwd).unwrap();
    assert!(
        again.created_s >= first.created_s + 2,
        "an expired flow is started afresh: {first:?} then {again:?}"
    );
    assert_eq!(again.new_daddr_be, lb_common::addr_be(u));

    // A sweep reads the map while the SNATed flow is dead; the next flow takes its SNAT port
    // (and so its reply tuple) before the sweep deletes: the sweep must spare the new entries.
    let fd = path.dataplane.maps.conntrack.map().fd().as_fd();
    let read = lb_userspace::conntrack::read_all::<u32>(fd).expect("read the conntrack");
    let (dead, _) = lb_userspace::conntrack::examine(&read, now());
    let stale: Vec<_> = (dead.iter())
        .filter(|(k, _)| *k == snat_forward || *k == snat_reply)
        .copied()
        .collect();
    assert_eq!(
        stale.len(),
        2,
        "the SNATed flow is dead when the sweep reads"
    );

    let out = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp_with(OUTSIDE, 42100, NODE, 30080, "S"),
    );
    assert_eq!(
        u16::from_be_bytes([out[34], out[35]]),
        snat_port,
        "the closed flow's SNAT port came back"
    );
    let fd = path.dataplane.maps.conntrack.map().fd().as_fd();
    assert_eq!(
        lb_userspace::conntrack::delete_unchanged(fd, &stale).expect("delete"),
        0,
        "entries a new flow took since the read are not deleted"
    );
    for k in [snat_forward, snat_reply] {
        assert!(ct_entry(&path, k).is_some_and(|e| e.state == 0), "{k:?}");
    }

    // The sweep deletes dead flows (the closed and reset ones), and only those.
    let swept =
        lb_userspace::conntrack::sweep::<u32>(path.dataplane.maps.conntrack.map()).expect("sweep");
    eprintln!("flows_have_a_lifecycle: {swept:?}");
    assert!(ct_entry(&path, key(CLIENT, 42001, VIP, 80, 6)).is_none());
    assert!(ct_entry(&path, key(b2, 8080, CLIENT, 42001, 6)).is_none());
    assert!(ct_entry(&path, ufwd).is_some(), "the live UDP flow stays");
    assert!(ct_entry(&path, key(OUTSIDE, 42100, NODE, 30080, 6)).is_some());
    assert_eq!(
        swept.deleted, 2,
        "only the reset flow's two entries (the others were taken over by new flows)"
    );
}

/// Runs `program` on `input` as arriving on `ifindex`; returns the verdict and the packet.
fn run_verdict(
    path: &mut LoadedPath,
    program: &'static str,
    ifindex: u32,
    input: &[u8],
) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let ctx = skb_context(ifindex);
    let result = path
        .dataplane
        .program(program)
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// With `--source-ranges-on-node-ports` the ranges guard the NodePorts too; a change of ranges
/// applies to new flows only (an admitted connection keeps going, as with kube-proxy), and
/// lifting them admits everyone again.
#[test]
fn source_ranges_follow_the_service_and_the_node_port_option() {
    if !privileged("source_ranges_follow_the_service_and_the_node_port_option") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = load("source-ranges");
    let ext = net.ifindex("ext0");
    let guarding_node_ports = NodeContext {
        source_ranges_on_node_ports: true,
        ..node_context()
    };
    let backends: &[[u8; 4]] = &[POD_A, POD_B];
    path.provision_as(&manifest(backends), &guarding_node_ports);
    let send = |path: &mut LoadedPath, src, sport, dst, dport, flags| {
        run_verdict(
            path,
            EXTERNAL_INGRESS_PROGRAM,
            ext,
            &tcp_with(src, sport, dst, dport, flags),
        )
    };
    let (verdict, _) = send(&mut path, OUTSIDE, 40300, NODE, 30083, "S");
    assert_eq!(verdict, TC_ACT_SHOT, "the NodePort is guarded too");
    let (verdict, out) = send(&mut path, NODE2, 40301, NODE, 30083, "S");
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp_with(NODE2, 40301, POD_A, 8080, "S"), "admitted");

    // What a restarted agent reads back is what was written.
    let read_back = path.dataplane.maps.read_contents().expect("read the maps");
    assert_eq!(
        read_back.source_ranges,
        path.programmer.programmed().source_ranges
    );
    assert_eq!(read_back.source_ranges.len(), 1);

    // ADMITTED opens a connection, then the Service's ranges stop admitting it.
    let (verdict, _) = send(&mut path, ADMITTED, 40302, GUARDED_LB, 80, "S");
    assert_eq!(verdict, TC_ACT_OK);
    let narrowed = manifest(backends).replace("198.51.100.7/32", "198.51.100.8/32");
    path.provision_as(&narrowed, &guarding_node_ports);
    let (verdict, out) = send(&mut path, ADMITTED, 40302, GUARDED_LB, 80, "A");
    assert_eq!(verdict, TC_ACT_OK, "the admitted connection keeps going");
    assert_eq!(out, tcp_with(ADMITTED, 40302, POD_A, 8080, "A"));
    let (verdict, _) = send(&mut path, ADMITTED, 40303, GUARDED_LB, 80, "S");
    assert_eq!(verdict, TC_ACT_SHOT, "a new connection is refused");

    // Without ranges, everyone is admitted.
    let open = manifest(backends).replace(
        "  loadBalancerSourceRanges: [\"172.30.0.0/28\", \"198.51.100.7/32\"]\n",
        "",
    );
    assert_ne!(open, manifest(backends));
    path.provision_as(&open, &guarding_node_ports);
    let (verdict, out) = send(&mut path, OUTSIDE, 40304, GUARDED_LB, 80, "S");
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp_with(OUTSIDE, 40304, POD_A, 8080, "S"));
    assert_eq!(
        path.programmer.programmed().source_ranges.len(),
        1,
        "only the set unused since this sync waits (a sync), the older one is gone: {:?}",
        path.programmer.programmed().source_ranges
    );
}

/// xorshift64: reproducible randomness for the fuzzer without a dependency.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// What the fuzzer's oracle knows, from the programmed maps (not from the programs): the
/// frontends, the backends, and the node's SNAT address and ports.
struct Oracle {
    frontends: std::collections::BTreeSet<([u8; 4], u16, u8)>,
    backends: std::collections::BTreeSet<([u8; 4], u16)>,
    addresses: std::collections::BTreeSet<[u8; 4]>,
}

impl Oracle {
    fn new(path: &LoadedPath) -> Self {
        let programmed = path.programmer.programmed();
        // The fuzz manifest is IPv4 only: every programmed key narrows.
        let octets = |wide| lb_common::addr_octets(lb_common::addr::narrow(wide).expect("IPv4"));
        let frontends: std::collections::BTreeSet<_> = (programmed.services.keys())
            .map(|k| (octets(k.addr_be), u16::from_be(k.port_be), k.proto))
            .collect();
        let backends: std::collections::BTreeSet<_> = (programmed.backends.values())
            .map(|b| (octets(b.addr_be), u16::from_be(b.port_be)))
            .collect();
        let addresses = (frontends.iter().map(|f| f.0))
            .chain(backends.iter().map(|b| b.0))
            .chain([NODE])
            .collect();
        Self {
            frontends,
            backends,
            addresses,
        }
    }

    /// Whether a packet may be rewritten, judged from its bytes alone: a plain Ethernet IPv4
    /// packet, not a later fragment, TCP or UDP to a frontend, from a backend, or to a SNAT
    /// port of the node; or an ICMP error quoting a packet between such addresses.
    fn may_rewrite(&self, p: &[u8]) -> bool {
        if p.len() < 34 || p[12..14] != [0x08, 0x00] || p[14] >> 4 != 4 {
            return false;
        }
        let ihl = usize::from(p[14] & 0x0f) * 4;
        let l4 = 14 + ihl;
        let later_fragment = u16::from_be_bytes([p[20], p[21]]) & 0x1fff != 0;
        if ihl < 20 || later_fragment || p.len() < l4 + 4 {
            return false;
        }
        let (proto, src, dst) = (p[23], addr4(&p[26..30]), addr4(&p[30..34]));
        let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
        match proto {
            6 | 17 => {
                let (sport, dport) = (port(l4), port(l4 + 2));
                self.frontends.contains(&(dst, dport, proto))
                    || self.backends.contains(&(src, sport))
                    || (dst == NODE && (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&dport))
            }
            1 => {
                let error = matches!(p[l4], 3 | 11 | 12);
                let quoted = l4 + 8;
                error
                    && p.len() >= quoted + 20
                    && (self
                        .addresses
                        .contains(&addr4(&p[quoted + 12..quoted + 16]))
                        || self
                            .addresses
                            .contains(&addr4(&p[quoted + 16..quoted + 20])))
            }
            _ => false,
        }
    }
}

fn addr4(bytes: &[u8]) -> [u8; 4] {
    bytes.try_into().expect("four bytes")
}

/// Frames BPF_PROG_TEST_RUN refuses to build an skb from: shorter than Ethernet, or than the
/// IPv4 or IPv6 header their ethertype announces.
fn refused_by_the_harness(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        None => true,
        Some([0x08, 0x00]) => frame.len() < 14 + 20,
        Some([0x86, 0xdd]) => frame.len() < 14 + 40,
        Some(_) => false,
    }
}

/// A valid packet to or from the programmed Services: the seed a mutation starts from.
fn seed_packet(rng: &mut Xorshift, oracle: &Oracle) -> Vec<u8> {
    let frontends: Vec<_> = oracle.frontends.iter().copied().collect();
    let backends: Vec<_> = oracle.backends.iter().copied().collect();
    let clients = [CLIENT, OUTSIDE, NODE2, ADMITTED, POD_A, [203, 0, 113, 9]];
    let sport = 1024 + rng.below(64_000) as u16;
    match rng.below(6) {
        0 | 1 => {
            let (addr, port, proto) = rng.pick(&frontends);
            let client = rng.pick(&clients);
            if proto == 6 {
                let flags = rng.pick(&["S", "A", "FA", "R", "SA"]);
                tcp_with(client, sport, addr, port, flags)
            } else {
                udp(client, sport, addr, port, rng.below(2) == 0)
            }
        }
        2 => {
            let (addr, port) = rng.pick(&backends);
            tcp_with(
                addr,
                port,
                rng.pick(&clients),
                sport,
                rng.pick(&["SA", "A", "FA"]),
            )
        }
        3 => {
            let (addr, port) = rng.pick(&backends);
            udp(addr, port, rng.pick(&clients), sport, false)
        }
        4 => {
            // An ICMP error about a Service flow.
            let (addr, port, _) = rng.pick(&frontends);
            let quoted = tcp_with(rng.pick(&clients), sport, addr, port, "S");
            icmp_error(
                rng.pick(&[NODE2, OUTSIDE]),
                rng.pick(&clients),
                match rng.below(3) {
                    0 => frag_needed(),
                    1 => time_exceeded(),
                    _ => port_unreachable_type(),
                },
                &quoted,
            )
        }
        _ => {
            // Traffic that is none of lb's business.
            let other = [10, 1, rng.below(255) as u8, 1];
            tcp_with(
                rng.pick(&clients),
                sport,
                other,
                rng.below(65_535) as u16,
                "S",
            )
        }
    }
}

/// One to three of: truncation, byte flips, header length, total length, fragment bits,
/// protocol, a VLAN tag, an IPv6 ethertype, or random bytes altogether.
fn mutate(rng: &mut Xorshift, mut p: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        match rng.below(10) {
            0 => p.truncate(rng.below(p.len() + 1)),
            1 => {
                for _ in 0..=rng.below(4) {
                    if !p.is_empty() {
                        let at = rng.below(p.len());
                        p[at] ^= 1 << rng.below(8);
                    }
                }
            }
            2 if p.len() > 14 => p[14] = 0x40 | rng.below(16) as u8,
            3 if p.len() > 17 => {
                let length = rng.below(1600) as u16;
                p[16..18].copy_from_slice(&length.to_be_bytes());
            }
            4 if p.len() > 21 => {
                let fragment = rng.pick(&[0x2000u16, 0x0001, 0x2001, 0x1fff, 0x4000]);
                p[20..22].copy_from_slice(&fragment.to_be_bytes());
            }
            5 if p.len() > 23 => p[23] = rng.pick(&[0, 1, 2, 4, 6, 17, 41, 47, 50, 132, 255]),
            6 if p.len() >= 14 => {
                let tag = [0x81, 0x00, 0x00, rng.below(255) as u8];
                p.splice(12..12, tag);
            }
            7 if p.len() >= 14 => p[12..14].copy_from_slice(&[0x86, 0xdd]),
            8 => {
                p = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
            }
            _ => {
                // IP options of random bytes, the header length raised to cover them.
                if p.len() > 34 {
                    let words = 1 + rng.below(4);
                    let options: Vec<u8> = (0..words * 4).map(|_| rng.next() as u8).collect();
                    p.splice(34..34, options);
                    p[14] = 0x40 | (5 + words) as u8;
                }
            }
        }
    }
    p
}

/// At least 100,000 packets per program (`LB_FUZZ_PACKETS=100000`, RELIABILITY.md) and 20,000
/// in `cargo xtask test`: random and mutated packets, from valid packets of the programmed
/// Services, through every program with BPF_PROG_TEST_RUN. Every run must succeed with a
/// documented verdict, and a packet may come out changed only if the oracle, reading its bytes
/// alone, finds it part of a Service flow.
#[test]
fn fuzzed_packets_get_documented_verdicts_and_only_service_flows_are_rewritten() {
    use lb_common::maps::{EXTERNAL_XDP_PROGRAM, HOST_EGRESS_PROGRAM};
    if !privileged("fuzzed_packets_get_documented_verdicts_and_only_service_flows_are_rewritten") {
        return;
    }
    let per_program: usize = std::env::var("LB_FUZZ_PACKETS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let net = PacketNetns::entered();
    let mut path = load("fuzz");
    path.provision_as(
        &manifest(&[POD_A, POD_B, REMOTE_POD]),
        &NodeContext {
            source_ranges_on_node_ports: true,
            ..node_context()
        },
    );
    let oracle = Oracle::new(&path);
    let mut rng = Xorshift(0x5eed_f022_1234_9876);
    let programs = [
        (
            POD_INGRESS_PROGRAM,
            "pod0",
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].as_slice(),
        ),
        (
            EXTERNAL_INGRESS_PROGRAM,
            "ext0",
            &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
        (
            HOST_EGRESS_PROGRAM,
            "ext0",
            &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
        (EXTERNAL_XDP_PROGRAM, "ext0", &[XDP_PASS, XDP_TX, XDP_DROP]),
    ];
    let mut report = Vec::new();
    for (program, device, verdicts) in programs {
        let ifindex = net.ifindex(device);
        let mut by_verdict: BTreeMap<u32, usize> = BTreeMap::new();
        let (mut rewritten, mut refused, mut ran) = (0, 0, 0);
        for i in 0.. {
            if ran == per_program {
                break;
            }
            let seed = seed_packet(&mut rng, &oracle);
            // One packet in eight goes unmutated, so valid flows make conntrack state too.
            let input = if i % 8 == 0 {
                seed
            } else {
                mutate(&mut rng, seed)
            };
            let mut out = vec![0u8; input.len() + 256];
            let xdp = program == EXTERNAL_XDP_PROGRAM;
            let ctx = if xdp {
                xdp_context(ifindex, input.len())
            } else {
                skb_context(ifindex)
            };
            let options = TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            };
            let run = if xdp {
                path.dataplane.external_xdp().test_run(options)
            } else {
                path.dataplane.program(program).test_run(options)
            };
            let result = match run {
                Ok(result) => result,
                // The kernel's test harness refuses frames shorter than their ethertype's
                // network header (IPv4 20, IPv6 40 bytes) before any program runs.
                Err(_) if refused_by_the_harness(&input) => {
                    refused += 1;
                    continue;
                }
                Err(err) => panic!("{program}: BPF_PROG_TEST_RUN failed on {input:02x?}: {err:?}"),
            };
            ran += 1;
            out.truncate(result.data_size_out as usize);
            assert!(
                verdicts.contains(&result.return_value),
                "{program}: undocumented verdict {} for {input:02x?}",
                result.return_value
            );
            *by_verdict.entry(result.return_value).or_default() += 1;
            if out != input {
                rewritten += 1;
                assert!(
                    oracle.may_rewrite(&input),
                    "{program} rewrote a packet of no Service flow:\n in  {input:02x?}\n out {out:02x?}"
                );
            }
        }
        report.push(format!(
            "{program}: {per_program} packets run, verdicts {by_verdict:?}, {rewritten} rewritten (all of Service flows), {refused} refused by the kernel's harness"
        ));
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "fuzz: {}", report.join("; "));
}

/// A client port that closed a NodePort flow here and then opened a connection to another
/// Service with the same backend, through another node: the backend's SYN-ACK has the old
/// flow's reply tuple. Once the backend closed the old flow, it answers the new connection
/// (translated by the other node), so it passes unchanged and the closed flow is forgotten;
/// before that (the flow open, or closed by the client only) a SYN-ACK is still the old flow's
/// and translated.
#[test]
fn a_closed_flows_reply_tuple_reused_by_a_new_connection_passes_untouched() {
    if !privileged("a_closed_flows_reply_tuple_reused_by_a_new_connection_passes_untouched") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = load("reused-tuple");
    provision(&mut path, &[POD_A, POD_B]);
    let (pod, ext) = (net.ifindex("pod0"), net.ifindex("ext0"));
    let from_client = |flags| tcp_with(OUTSIDE, 40500, NODE, 30081, flags);
    let from_pod = |flags| tcp_with(POD_A, 8080, OUTSIDE, 40500, flags);

    let (verdict, out) = run_verdict(&mut path, EXTERNAL_INGRESS_PROGRAM, ext, &from_client("S"));
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, tcp_with(OUTSIDE, 40500, POD_A, 8080, "S"))
    );
    for attempt in ["first", "repeated"] {
        let (verdict, out) = run_verdict(&mut path, POD_INGRESS_PROGRAM, pod, &from_pod("SA"));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "{attempt} SYN-ACK of the open flow"
        );
        assert_eq!(
            out,
            with_macs(
                tcp_with(NODE, 30081, OUTSIDE, 40500, "SA"),
                OUTSIDE_MAC,
                EXT_MAC
            )
        );
    }
    run_verdict(&mut path, EXTERNAL_INGRESS_PROGRAM, ext, &from_client("FA"));
    let (verdict, _) = run_verdict(&mut path, POD_INGRESS_PROGRAM, pod, &from_pod("SA"));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "after the client's FIN alone, a SYN-ACK may be the handshake's retransmission"
    );
    run_verdict(&mut path, POD_INGRESS_PROGRAM, pod, &from_pod("FA"));
    let reply_key = key(POD_A, 8080, OUTSIDE, 40500, 6);
    assert!(
        ct_entry(&path, reply_key).is_some(),
        "the closed flow lingers"
    );

    let before = path.counters();
    let (verdict, out) = run_verdict(&mut path, POD_INGRESS_PROGRAM, pod, &from_pod("SA"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        from_pod("SA"),
        "the new connection's SYN-ACK passes unchanged"
    );
    assert_eq!(
        path.counters()[&Counter::Passed],
        before[&Counter::Passed] + 1
    );
    assert!(
        ct_entry(&path, reply_key).is_none(),
        "the closed flow is forgotten"
    );
    assert!(ct_entry(&path, key(OUTSIDE, 40500, NODE, 30081, 6)).is_none());
}

/// `lb explain` answers what the real program does: for thousands of random flows (new ones,
/// repeated ones that hit the conntrack, affinity, hairpin, source ranges, no endpoints, Local
/// policies, not a Service) its verdict, read from the pinned maps before the packet is sent,
/// matches the outcome, backend and SNAT of the packet the program then rewrites.
#[test]
fn explain_predicts_the_programs_choice_for_random_flows() {
    use lb_userspace::inspect::{
        PinnedMaps,
        explain::{self, Origin, Query, Verdict},
    };
    if !privileged("explain_predicts_the_programs_choice_for_random_flows") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = load("explain");
    // An affinity timeout far longer than the test, so no memory expires between the
    // prediction and the packet.
    let yaml =
        manifest(&[POD_A, POD_B, POD_C]).replace("timeoutSeconds: 1 ", "timeoutSeconds: 3600 ");
    assert_ne!(yaml, manifest(&[POD_A, POD_B, POD_C]));
    path.provision_as(&yaml, &node_context());
    let maps = PinnedMaps::open(path.bpffs_dir()).expect("open the pinned maps");
    let frontends: &[([u8; 4], u16, bool)] = &[
        (VIP, 80, false),
        (VIP, 53, true),
        (EMPTY_VIP, 80, false),
        (SELF_VIP, 80, false),
        (STICKY_VIP, 80, false),
        (NODE, 30080, false),
        (NODE, 30053, true),
        (NODE, 30081, false),
        (NODE, 30082, false),
        (GUARDED_LB, 80, false),
        ([10, 96, 0, 99], 80, false),
    ];
    let clients = [CLIENT, POD_A, OUTSIDE, ADMITTED, NODE2];
    let mut rng = Xorshift(0x5eed_e8a1_a1b2_c3d4);
    let mut tuples_seen = std::collections::BTreeSet::new();
    let mut by_outcome = BTreeMap::<&str, u32>::new();
    let flows = 3000;
    for i in 0..flows {
        let (dst, dport, is_udp) = rng.pick(frontends);
        let src = rng.pick(&clients);
        // A small port space, so about a third of the flows repeat a tuple (conntrack).
        let sport = 40000 + rng.below(1500) as u16;
        let (program, ifindex, origin) = if rng.below(2) == 0 {
            (POD_INGRESS_PROGRAM, net.ifindex("pod0"), Origin::Pod)
        } else {
            (
                EXTERNAL_INGRESS_PROGRAM,
                net.ifindex("ext0"),
                Origin::External,
            )
        };
        let query = Query {
            from: Ipv4Addr::from(src).into(),
            from_port: Some(sport),
            to: Ipv4Addr::from(dst).into(),
            to_port: dport,
            protocol: if is_udp { "UDP" } else { "TCP" },
            origin,
        };
        let answer = explain::explain(&maps, None, &query);
        let input = if is_udp {
            udp(src, sport, dst, dport, false)
        } else {
            tcp_with(src, sport, dst, dport, "S")
        };
        let before = path.counters();
        let (verdict, out) = run_verdict(&mut path, program, ifindex, &input);
        let after = path.counters();
        let delta = |c: Counter| after[&c] - before[&c];
        let what = format!("flow {i}: {query:?}: explain said {answer:#?}");
        match &answer.verdict {
            Verdict::Backend {
                address,
                port,
                chosen_by,
                snat,
                ..
            } => {
                assert_eq!(delta(Counter::Translated), 1, "{what}: translated");
                let sliced = SlicedPacket::from_ethernet(&out).expect("parse the output");
                let Some(etherparse::NetSlice::Ipv4(ipv4)) = sliced.net else {
                    panic!("{what}: IPv4 out")
                };
                let dport_out = match sliced.transport {
                    Some(TransportSlice::Tcp(t)) => t.destination_port(),
                    Some(TransportSlice::Udp(u)) => u.destination_port(),
                    _ => panic!("{what}: transport"),
                };
                assert_eq!(
                    (IpAddr::V4(ipv4.header().destination_addr()), dport_out),
                    (*address, *port),
                    "{what}: backend"
                );
                assert_eq!(
                    ipv4.header().source_addr() != Ipv4Addr::from(src),
                    *snat,
                    "{what}: SNAT"
                );
                let repeated = tuples_seen.contains(&(src, sport, dst, dport, is_udp));
                assert_eq!(*chosen_by == "conntrack", repeated, "{what}: by conntrack");
                *by_outcome.entry(chosen_by).or_default() += 1;
            }
            Verdict::NotAService => {
                assert_eq!(verdict, TC_ACT_OK, "{what}");
                assert_eq!(out, input, "{what}: untouched");
                *by_outcome.entry("not a service").or_default() += 1;
            }
            Verdict::DeniedBySourceRanges => {
                assert_eq!(verdict, TC_ACT_SHOT, "{what}");
                assert_eq!(delta(Counter::DroppedSourceRange), 1, "{what}");
                *by_outcome.entry("denied").or_default() += 1;
            }
            Verdict::NoBackend { reject } => {
                let answered = delta(Counter::Rejected) + delta(Counter::DroppedNoBackend);
                assert_eq!(answered, 1, "{what}: no backend");
                if !reject {
                    assert_eq!(delta(Counter::DroppedNoBackend), 1, "{what}: dropped");
                }
                *by_outcome
                    .entry(if *reject { "rejected" } else { "dropped" })
                    .or_default() += 1;
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
        if matches!(answer.verdict, Verdict::Backend { .. }) {
            tuples_seen.insert((src, sport, dst, dport, is_udp));
        }
    }
    eprintln!("explain matched the program on {flows} flows: {by_outcome:?}");
    for outcome in [
        "maglev",
        "conntrack",
        "affinity",
        "denied",
        "rejected",
        "dropped",
        "not a service",
    ] {
        assert!(
            by_outcome.get(outcome).copied().unwrap_or(0) > 10,
            "the random flows cover {outcome}: {by_outcome:?}"
        );
    }
}

/// Each packet is counted against its frontend and its backend (packets and bytes both ways,
/// new flows) and refused flows against their frontend by reason; the counters sum what the
/// packets were.
#[test]
fn per_service_counters_count_each_frontends_packets() {
    use lb_userspace::inspect::{PinnedMaps, services};
    if !privileged("per_service_counters_count_each_frontends_packets") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = load("service-counters");
    provision(&mut path, &[POD_A]);
    let pod = net.ifindex("pod0");
    let ext = net.ifindex("ext0");
    let mut forward_bytes = 0u64;
    for sport in 41000..41010u16 {
        let syn = tcp_with(CLIENT, sport, VIP, 80, "S");
        forward_bytes += syn.len() as u64;
        let (verdict, _) = run_verdict(&mut path, POD_INGRESS_PROGRAM, pod, &syn);
        assert_eq!(verdict, TC_ACT_OK);
    }
    let syn_ack = tcp_with(POD_A, 8080, CLIENT, 41000, "SA");
    run_verdict(&mut path, POD_INGRESS_PROGRAM, pod, &syn_ack);
    // Refused: no endpoints (rejected) and outside the source ranges.
    run_verdict(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 41100, EMPTY_VIP, 80, "S"),
    );
    run_verdict(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp_with(OUTSIDE, 41101, GUARDED_LB, 80, "S"),
    );

    let maps = PinnedMaps::open(path.bpffs_dir()).expect("open the pinned maps");
    let views = services::collect(&maps, None);
    let frontend = |addr: [u8; 4], port: u16| {
        views
            .iter()
            .flat_map(|s| &s.frontends)
            .find(|f| f.address == Ipv4Addr::from(addr) && f.port == port && f.protocol == "TCP")
            .unwrap_or_else(|| panic!("frontend {addr:?}:{port} in {views:#?}"))
            .clone()
    };
    let web = frontend(VIP, 80);
    assert_eq!(web.counters.new_flows, 10);
    assert_eq!(web.counters.forward_packets, 10);
    assert_eq!(web.counters.forward_bytes, forward_bytes);
    assert_eq!(web.counters.reply_packets, 1);
    assert_eq!(web.counters.reply_bytes, syn_ack.len() as u64);
    assert_eq!(web.counters.drops(), 0);
    assert_eq!(web.backends.len(), 1);
    let backend = &web.backends[0];
    assert_eq!(
        (backend.address, backend.port),
        (Ipv4Addr::from(POD_A).into(), 8080)
    );
    assert_eq!(backend.counters.new_flows, 10);
    assert_eq!(backend.counters.forward_packets, 10);
    assert_eq!(backend.counters.reply_packets, 1);
    assert_eq!(frontend(EMPTY_VIP, 80).counters.no_backend, 1);
    assert_eq!(frontend(GUARDED_LB, 80).counters.denied_source_range, 1);
    assert_eq!(frontend(GUARDED_LB, 80).counters.new_flows, 0);

    // Counters of frontends that left are pruned (the packet path made them, user space
    // deletes them).
    let service_ids_before = maps.service_stats().len();
    let gone = manifest(&[POD_A]);
    let only_web: String = gone
        .split("---\n")
        .take(2)
        .collect::<Vec<_>>()
        .join("---\n")
        + "---\n";
    path.provision_as(&only_web, &node_context());
    let pruned = lb_userspace::conntrack::prune_counters(
        &path.bpffs_dir().join(lb_common::maps::PIN_LAYOUT_VERSION),
    )
    .expect("prune");
    assert!(
        pruned >= 2,
        "the empty and guarded frontends' counters went: {pruned} of {service_ids_before}"
    );
    let left = maps.service_stats();
    assert_eq!(
        left.len(),
        1,
        "only web's frontend keeps counters: {left:?}"
    );
    assert_eq!(left.values().next().unwrap().forward_packets, 10);
}

/// The monitor's events: none while nobody holds the lease; with one, a new flow's event names
/// its frontend, backend and origin and a refused one its reason; at most `rate` a second per
/// CPU, the rest counted as lost; and none again once the monitor stops.
#[test]
fn monitor_events_follow_the_lease_and_the_rate() {
    use lb_common::stats::{EVENT_DROP, EVENT_NEW_FLOW, ORIGIN_POD};
    use lb_userspace::inspect::{PinnedMaps, monitor::Monitor};
    if !privileged("monitor_events_follow_the_lease_and_the_rate") {
        return;
    }
    // One CPU, so one per-CPU budget is in play.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).expect("pin to CPU 0");
    let net = PacketNetns::entered();
    let mut path = load("monitor");
    provision(&mut path, &[POD_A]);
    let pod = net.ifindex("pod0");
    let maps = PinnedMaps::open(path.bpffs_dir()).expect("open the pinned maps");
    let rate = 5;
    let mut monitor = Monitor::open(&maps, rate).expect("open the monitor maps");
    let new_flow = |path: &mut LoadedPath, sport: u16| {
        let (verdict, _) = run_verdict(
            path,
            POD_INGRESS_PROGRAM,
            pod,
            &tcp_with(CLIENT, sport, VIP, 80, "S"),
        );
        assert_eq!(verdict, TC_ACT_OK);
    };

    new_flow(&mut path, 42000);
    assert!(monitor.drain().is_empty(), "no lease, no events");

    monitor.renew().expect("switch events on");
    new_flow(&mut path, 42001);
    run_verdict(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 42002, EMPTY_VIP, 80, "S"),
    );
    let events = monitor.drain();
    assert_eq!(events.len(), 2, "{events:?}");
    use lb_userspace::inspect::MapFamily as _;
    let web = u32::service(
        &maps,
        &lb_common::service::ServiceKey::new(lb_common::addr_be(VIP), 80u16.to_be(), 6),
    )
    .expect("web's frontend");
    assert_eq!(events[0].kind, EVENT_NEW_FLOW);
    assert_eq!(events[0].service_id, web.service_id);
    // Events carry either family in IPv6 form (IPv4 as ::ffff:a.b.c.d).
    let wide = |addr: [u8; 4]| lb_common::Address::to_wide(lb_common::addr_be(addr));
    let flow = key(CLIENT, 42001, VIP, 80, 6);
    assert_eq!(
        events[0].flow,
        lb_common::conntrack::FlowKey::new(
            wide(CLIENT),
            wide(VIP),
            flow.sport_be,
            flow.dport_be,
            flow.proto
        )
    );
    assert_eq!(events[0].new_daddr_be, wide(POD_A));
    assert_eq!(u16::from_be(events[0].new_dport_be), 8080);
    assert_eq!(events[0].origin, ORIGIN_POD);
    assert_eq!(events[1].kind, EVENT_DROP);
    assert_eq!(events[1].reason, Counter::Rejected as u8);
    // Known flows are not events.
    run_verdict(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp_with(CLIENT, 42001, VIP, 80, "A"),
    );
    assert!(monitor.drain().is_empty());

    // Over the rate: the rest of the second's events are lost, and counted. (Two budgets' worth
    // at most, should the 40 flows straddle a second.)
    let lost_before = monitor.lost();
    for sport in 43000..43040 {
        new_flow(&mut path, sport);
    }
    let shown = monitor.drain().len() as u64;
    let lost = monitor.lost() - lost_before;
    assert!(
        shown <= 2 * u64::from(rate),
        "{shown} events shown at {rate}/s"
    );
    assert_eq!(shown + lost, 40, "every event shown or counted lost");

    monitor.stop();
    new_flow(&mut path, 44000);
    assert!(monitor.drain().is_empty(), "stopped: no events");
}
