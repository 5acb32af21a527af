//! The IPv6 packet path through the real programs with BPF_PROG_TEST_RUN: an IPv6 packet enters
//! a tc entry point and runs through the tail-called stages (known flow, new flow, reject,
//! ICMPv6). Packets are built with etherparse; expected packets are built independently, so
//! their checksums are computed from scratch.
//!
//! The IPv6 maps are written directly here, with lb-common's types: the same entries the agent
//! writes, without going through its Service translation.

mod support;

use std::net::Ipv6Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{
    Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, icmpv6::DestUnreachableCode,
};
use lb_common::{
    Ip6,
    addr::ip6_be,
    conntrack::{CtEntry, FlowKey},
    counters::Counter,
    hash::slot_for,
    maps::{EXTERNAL_INGRESS_PROGRAM, POD_INGRESS_PROGRAM},
    service::{
        ANY_SOURCE, BACKEND_F_REMOTE, Backend, NodeConfig, NodeConfig6, SERVICE_F_NODE_ADDRESS,
        SERVICE_F_REJECT, SOURCE_RANGE_ALLOW, ServiceEntry, ServiceKey, SourceRange,
    },
};
use lb_testbed::netns::Netns;
use support::{LoadedPath, privileged};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: &str = "fd00:244:1::2";
const POD_A: &str = "fd00:244:1::11";
const POD_B: &str = "fd00:244:1::12";
const REMOTE_POD: &str = "fd00:244:2::11";
const VIP: &str = "fd00:96::10";
const EMPTY_VIP: &str = "fd00:96::20";
/// `sessionAffinity: ClientIP` (an hour), backends pod-a and pod-b.
const STICKY_VIP: &str = "fd00:96::50";
const NODE: &str = "fd00:30::11";
const NODE2: &str = "fd00:30::12";
const OUTSIDE: &str = "fd00:30::100";
/// A LoadBalancer ingress IP whose source ranges admit fd00:30::/120 (the nodes), not OUTSIDE.
const GUARDED_LB: &str = "fd00:30::200";
const NODE_PORT: u16 = 30080;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 12];
const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 100];
/// The node's side of the pods' link, and the pods' MACs.
const POD_LINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
const POD_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 11];
const POD_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 12];
const SNAT_PORTS: (u16, u16) = (61000, 65535);
const TCP: u8 = 6;
const UDP: u8 = 17;

fn addr(text: &str) -> [u8; 16] {
    text.parse::<Ipv6Addr>().unwrap().octets()
}

fn wire(text: &str) -> Ip6 {
    ip6_be(addr(text))
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A namespace with the node's IPv6 routes and neighbours, entered by the calling thread, so the
/// FIB lookups of redirects have known answers. Linked to nothing outside.
struct PacketNetns {
    ns: Netns,
}

impl PacketNetns {
    fn entered() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Netns::create(&format!(
            "{}{}-pkt6-{n}",
            lb_testbed::cleanup::NETNS_PREFIX,
            std::process::id()
        ))
        .expect("create the packet-test namespace");
        let run = |args: &[&str]| ns.ip(args).unwrap_or_else(|e| panic!("{e:#}"));
        run(&[
            "link",
            "add",
            "ext0",
            "address",
            &mac(EXT_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "ext0p",
        ]);
        run(&[
            "link",
            "add",
            "pod0",
            "address",
            &mac(POD_LINK_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "pod0p",
        ]);
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0").unwrap();
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0").unwrap();
        for dev in ["ext0", "ext0p", "pod0", "pod0p"] {
            run(&["link", "set", dev, "up"]);
        }
        run(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE}/64"),
            "dev",
            "ext0",
            "nodad",
        ]);
        run(&["-6", "route", "add", "fd00:244:1::/64", "dev", "pod0"]);
        run(&["-6", "route", "add", "fd00:244:2::/64", "via", NODE2]);
        for (neighbour, m, dev) in [
            (NODE2, NODE2_MAC, "ext0"),
            (OUTSIDE, OUTSIDE_MAC, "ext0"),
            (POD_A, POD_A_MAC, "pod0"),
            (POD_B, POD_B_MAC, "pod0"),
        ] {
            run(&[
                "-6",
                "neigh",
                "add",
                neighbour,
                "lladdr",
                &mac(m),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let file = std::fs::File::open(format!("/run/netns/{}", ns.name())).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the test namespace");
        Self { ns }
    }

    fn ifindex(&self, dev: &'static str) -> u32 {
        self.ns
            .run(move || nix::net::if_::if_nametoindex(dev).expect("ifindex"))
            .unwrap()
    }
}

/// The test's frontends, written into the IPv6 maps as the agent would.
fn provision(path: &mut LoadedPath) {
    let maps = &mut path.dataplane.maps;
    maps.node
        .set(
            0,
            NodeConfig {
                snat_port_first: SNAT_PORTS.0,
                snat_port_last: SNAT_PORTS.1,
                ..NodeConfig::default()
            },
            0,
        )
        .unwrap();
    maps.v6
        .node
        .set(
            0,
            NodeConfig6 {
                snat_addr_be: wire(NODE),
                ..NodeConfig6::default()
            },
            0,
        )
        .unwrap();
    // Backends 1 and 2 are local pods, 3 a pod on node 2; one table per frontend.
    for (id, pod, port, flags) in [
        (1, POD_A, 8080, 0),
        (2, POD_B, 8080, 0),
        (3, REMOTE_POD, 8080, BACKEND_F_REMOTE),
        (4, POD_A, 5353, 0),
    ] {
        let backend = Backend {
            addr_be: wire(pod),
            port_be: u16::to_be(port),
            flags,
            _pad: 0,
        };
        maps.v6.backends.insert(id, backend, 0).unwrap();
    }
    let tables: [(u32, &[u32]); 4] = [(0, &[1, 2]), (16, &[3]), (32, &[4]), (48, &[1])];
    for (offset, ids) in tables {
        for (i, id) in ids.iter().enumerate() {
            assert!(maps.slots.set(offset + i as u32, *id));
        }
    }
    maps.v6
        .source_ranges
        .insert(
            &aya::maps::lpm_trie::Key::new(
                32 + 120,
                SourceRange {
                    set_id: 1,
                    addr_be: wire("fd00:30::"),
                },
            ),
            SOURCE_RANGE_ALLOW,
            0,
        )
        .unwrap();
    let frontend = |id: u32, offset: u32, size: u32, flags: u16, ranges: u32| ServiceEntry {
        service_id: id,
        table_offset: offset,
        table_size: size,
        affinity_timeout_s: 0,
        flags,
        _pad: 0,
        source_ranges_id: ranges,
    };
    for (vip, port, proto, entry) in [
        (VIP, 80, TCP, frontend(1, 0, 2, 0, ANY_SOURCE)),
        (VIP, 53, UDP, frontend(2, 32, 1, 0, ANY_SOURCE)),
        (
            EMPTY_VIP,
            80,
            TCP,
            frontend(3, 0, 0, SERVICE_F_REJECT, ANY_SOURCE),
        ),
        (
            EMPTY_VIP,
            53,
            UDP,
            frontend(4, 0, 0, SERVICE_F_REJECT, ANY_SOURCE),
        ),
        (
            NODE,
            NODE_PORT,
            TCP,
            frontend(5, 16, 1, SERVICE_F_NODE_ADDRESS, ANY_SOURCE),
        ),
        (
            GUARDED_LB,
            80,
            TCP,
            frontend(6, 48, 1, SERVICE_F_NODE_ADDRESS, 1),
        ),
        (
            STICKY_VIP,
            80,
            TCP,
            ServiceEntry {
                affinity_timeout_s: 3600,
                ..frontend(7, 0, 2, 0, ANY_SOURCE)
            },
        ),
    ] {
        maps.v6
            .services
            .insert(ServiceKey::new(wire(vip), port.to_be(), proto), entry, 0)
            .unwrap();
    }
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: &str) -> Vec<u8> {
    tcp_between((MAC_A, MAC_B), src, sport, dst, dport, flags)
}

fn tcp_between(
    macs: ([u8; 6], [u8; 6]),
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    flags: &str,
) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(addr(src), addr(dst), 64)
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

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    udp_between((MAC_A, MAC_B), src, sport, dst, dport)
}

fn udp_between(macs: ([u8; 6], [u8; 6]), src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(addr(src), addr(dst), 64)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .unwrap();
    out
}

/// `packet` with a hop-by-hop options header (PadN only) after its IPv6 header. The upper
/// layer's checksum is unchanged: its pseudo header has the upper-layer length, not the
/// payload length.
fn with_hop_by_hop(packet: &[u8]) -> Vec<u8> {
    let next = packet[14 + 6];
    let mut out = packet[..14 + 40].to_vec();
    out[14 + 6] = 0;
    let len = u16::from_be_bytes([out[14 + 4], out[14 + 5]]) + 8;
    out[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&packet[14 + 40..]);
    out
}

fn run(path: &mut LoadedPath, program: &'static str, ifindex: u32, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let mut ctx = vec![0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
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

fn key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey<Ip6> {
    FlowKey::new(wire(src), wire(dst), sport.to_be(), dport.to_be(), proto)
}

fn ct(path: &LoadedPath, key: &FlowKey<Ip6>) -> Option<CtEntry<Ip6>> {
    path.dataplane.maps.v6.conntrack.get(key, 0).ok()
}

/// The ICMPv6 (type, code) of `packet`, its checksum checked against one computed afresh.
fn icmpv6(packet: &[u8]) -> (u8, u8, Vec<u8>) {
    let sliced = SlicedPacket::from_ethernet(packet).expect("an Ethernet frame");
    let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
        panic!("not IPv6: {packet:02x?}");
    };
    let Some(TransportSlice::Icmpv6(icmp)) = &sliced.transport else {
        panic!("not ICMPv6: {packet:02x?}");
    };
    let header = ip.header();
    let fresh = icmp
        .icmp_type()
        .calc_checksum(header.source(), header.destination(), icmp.payload())
        .unwrap();
    assert_eq!(icmp.checksum(), fresh, "ICMPv6 checksum");
    (icmp.type_u8(), icmp.code_u8(), icmp.payload().to_vec())
}

/// Every IPv6 frontend kind and flow event through the tc stages: ClusterIP TCP and UDP,
/// replies, extension headers, NodePort to a remote backend (SNAT and redirect), source
/// ranges, rejects (TCP RST, ICMPv6 port unreachable), an ICMPv6 error about a translated flow,
/// and traffic that is no Service's.
#[test]
fn ipv6_packets_take_every_path_through_the_stages() {
    if !privileged("ipv6_packets_take_every_path_through_the_stages") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = LoadedPath::load("packet-ipv6");
    provision(&mut path);
    let pod = net.ifindex("pod0");
    let ext = net.ifindex("ext0");
    let before = path.counters();

    // ClusterIP, TCP: the SYN goes to the backend the Maglev slot names; its reply comes back
    // from the Service address; the next packet is a known flow's.
    let flow = key(CLIENT, 40000, VIP, 80, TCP);
    let chosen = [POD_A, POD_B][slot_for(&flow, 2) as usize];
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 40000, VIP, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(CLIENT, 40000, chosen, 8080, "S"),
        "DNAT to {chosen}"
    );
    let forward = ct(&path, &flow).expect("the forward entry");
    assert_eq!(forward.service_id, 1);
    let reply_key = key(chosen, 8080, CLIENT, 40000, TCP);
    assert!(ct(&path, &reply_key).is_some(), "the reply entry");
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(chosen, 8080, CLIENT, 40000, "SA"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(VIP, 80, CLIENT, 40000, "SA"), "reverse NAT");
    let (_, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 40000, VIP, 80, "A"),
    );
    assert_eq!(out, tcp(CLIENT, 40000, chosen, 8080, "A"), "a known flow");

    // Extension headers are skipped on the way to TCP, and kept.
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &with_hop_by_hop(&tcp(CLIENT, 40001, VIP, 80, "S")),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let to = if ct(&path, &key(CLIENT, 40001, VIP, 80, TCP))
        .unwrap()
        .new_daddr_be
        == wire(POD_A)
    {
        POD_A
    } else {
        POD_B
    };
    assert_eq!(out, with_hop_by_hop(&tcp(CLIENT, 40001, to, 8080, "S")));

    // ClusterIP, UDP, then an ICMPv6 port unreachable from the backend about the translated
    // datagram: its source and quote are turned back to the Service's.
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &udp(CLIENT, 41000, VIP, 53),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp(CLIENT, 41000, POD_A, 5353));
    let mut error = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(addr(POD_A), addr(CLIENT), 64)
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            DestUnreachableCode::Port,
        ))
        .write(&mut error, &out[14..])
        .unwrap();
    let (verdict, translated) = run(&mut path, POD_INGRESS_PROGRAM, pod, &error);
    assert_eq!(verdict, TC_ACT_OK);
    // The quote as the client sent it, but for its UDP checksum: that stays the one the backend
    // saw, as in IPv4 (receivers match errors by addresses and ports, not the quoted checksum).
    let mut quote = udp(CLIENT, 41000, VIP, 53)[14..].to_vec();
    quote[40 + 6..40 + 8].copy_from_slice(&out[14 + 40 + 6..14 + 40 + 8]);
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(addr(VIP), addr(CLIENT), 64)
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            DestUnreachableCode::Port,
        ))
        .write(&mut expected, &quote)
        .unwrap();
    assert_eq!(translated, expected, "ICMPv6 error reverse translated");

    // NodePort from outside to a backend on node 2: SNAT to this node, redirected by the FIB.
    let (verdict, out) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(OUTSIDE, 42000, NODE, NODE_PORT, "S"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let forward = ct(&path, &key(OUTSIDE, 42000, NODE, NODE_PORT, TCP)).expect("forward entry");
    let snat_port = u16::from_be(forward.new_sport_be);
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat_port));
    assert_eq!(
        out,
        tcp_between((EXT_MAC, NODE2_MAC), NODE, snat_port, REMOTE_POD, 8080, "S"),
        "SNAT to the node, sent to node 2"
    );
    let (verdict, out) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(REMOTE_POD, 8080, NODE, snat_port, "SA"),
    );
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the reply goes back to the client"
    );
    assert_eq!(
        out,
        tcp_between(
            (EXT_MAC, OUTSIDE_MAC),
            NODE,
            NODE_PORT,
            OUTSIDE,
            42000,
            "SA"
        ),
        "reverse SNAT and DNAT"
    );

    // Source ranges: a client outside them is dropped; a node inside is admitted.
    let (verdict, _) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(OUTSIDE, 43000, GUARDED_LB, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_SHOT, "outside the source ranges");
    assert!(ct(&path, &key(OUTSIDE, 43000, GUARDED_LB, 80, TCP)).is_none());
    let (verdict, out) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(NODE2, 43001, GUARDED_LB, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(NODE2, 43001, POD_A, 8080, "S"), "admitted");

    // No backend: a TCP SYN is answered with a reset, a datagram with a port unreachable, both
    // from the Service's address, back out of the interface they came in by.
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 44000, EMPTY_VIP, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let sliced = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(TransportSlice::Tcp(rst)) = &sliced.transport else {
        panic!("not TCP: {out:02x?}");
    };
    let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
        panic!("not IPv6");
    };
    assert!(rst.rst());
    assert_eq!((rst.source_port(), rst.destination_port()), (80, 44000));
    assert_eq!(ip.header().source(), addr(EMPTY_VIP));
    assert_eq!(ip.header().destination(), addr(CLIENT));
    let fresh = rst
        .to_header()
        .calc_checksum_ipv6_raw(
            ip.header().source(),
            ip.header().destination(),
            rst.payload(),
        )
        .unwrap();
    assert_eq!(rst.checksum(), fresh, "TCP checksum of the reset");
    let datagram = udp(CLIENT, 44001, EMPTY_VIP, 53);
    let (verdict, out) = run(&mut path, POD_INGRESS_PROGRAM, pod, &datagram);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (kind, code, quoted) = icmpv6(&out);
    assert_eq!((kind, code), (1, 4), "ICMPv6 port unreachable");
    // The IPv6 header and the first 8 bytes after it, as IPv4 quotes.
    assert_eq!(quoted, &datagram[14..14 + 48], "quoting the datagram");

    // Not a Service: untouched. Neither is ICMPv6 that is no error.
    let other = tcp(CLIENT, 45000, POD_B, 22, "S");
    assert_eq!(
        run(&mut path, POD_INGRESS_PROGRAM, pod, &other),
        (TC_ACT_OK, other.clone())
    );
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(addr(CLIENT), addr(VIP), 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    assert_eq!(
        run(&mut path, POD_INGRESS_PROGRAM, pod, &echo),
        (TC_ACT_OK, echo.clone())
    );

    let after = path.counters();
    let delta = |c: Counter| after.get(&c).unwrap_or(&0) - before.get(&c).unwrap_or(&0);
    assert_eq!(
        delta(Counter::Translated),
        6,
        "SYN, ACK, hop-by-hop SYN, UDP, NodePort, admitted"
    );
    assert_eq!(delta(Counter::ReverseTranslated), 2);
    assert_eq!(delta(Counter::IcmpTranslated), 1);
    assert_eq!(delta(Counter::DroppedSourceRange), 1);
    assert_eq!(delta(Counter::Rejected), 2);
    assert_eq!(delta(Counter::Passed), 2);
    assert_eq!(delta(Counter::StageFailed), 0);
    assert_eq!(
        delta(Counter::Redirected),
        2,
        "the NodePort SYN and its answer"
    );
}

/// `lb explain` follows the IPv6 maps as the IPv6 stages do: for random IPv6 flows to every
/// frontend kind, from pods and from the network, it names the backend (or the refusal) the
/// program then applies, and the translated packet's destination is that backend.
#[test]
fn explain_predicts_the_ipv6_programs_choice() {
    use lb_userspace::inspect::{
        PinnedMaps,
        explain::{self, Origin, Query, Verdict},
    };
    if !privileged("explain_predicts_the_ipv6_programs_choice") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = LoadedPath::load("explain-ipv6");
    provision(&mut path);
    let maps = PinnedMaps::open(path.bpffs_dir()).expect("open the pinned maps");
    let frontends = [
        (VIP, 80, TCP),
        (VIP, 53, UDP),
        (EMPTY_VIP, 80, TCP),
        (NODE, NODE_PORT, TCP),
        (GUARDED_LB, 80, TCP),
    ];
    let clients = [CLIENT, POD_B, OUTSIDE, NODE2];
    let mut outcomes = std::collections::BTreeMap::<&str, u32>::new();
    for i in 0..400u32 {
        // A fixed scramble of i: every frontend, client and origin, and repeated tuples.
        let mix = i.wrapping_mul(2_654_435_761);
        let (dst, dport, proto) = frontends[(mix >> 3) as usize % frontends.len()];
        let src = clients[(mix >> 9) as usize % clients.len()];
        let sport = 50000 + (mix >> 16) as u16 % 300;
        let (program, ifindex, origin) = if mix & 1 == 0 {
            (POD_INGRESS_PROGRAM, net.ifindex("pod0"), Origin::Pod)
        } else {
            (
                EXTERNAL_INGRESS_PROGRAM,
                net.ifindex("ext0"),
                Origin::External,
            )
        };
        let query = Query {
            from: src.parse().unwrap(),
            from_port: Some(sport),
            to: dst.parse().unwrap(),
            to_port: dport,
            protocol: if proto == TCP { "TCP" } else { "UDP" },
            origin,
        };
        let predicted = explain::explain(&maps, None, &query).verdict;
        let packet = if proto == TCP {
            tcp(src, sport, dst, dport, "S")
        } else {
            udp(src, sport, dst, dport)
        };
        let (verdict, out) = run(&mut path, program, ifindex, &packet);
        let what = format!("flow {i}: {src}:{sport} -> [{dst}]:{dport}/{proto} ({origin:?})");
        match &predicted {
            Verdict::Backend { address, port, .. } => {
                assert_ne!(verdict, TC_ACT_SHOT, "{what}: {predicted:?}");
                let sliced = SlicedPacket::from_ethernet(&out).expect("a frame");
                let Some(NetSlice::Ipv6(ip)) = &sliced.net else {
                    panic!("{what}: not IPv6");
                };
                let dport_out = match &sliced.transport {
                    Some(TransportSlice::Tcp(t)) => t.destination_port(),
                    Some(TransportSlice::Udp(u)) => u.destination_port(),
                    _ => panic!("{what}: transport"),
                };
                assert_eq!(
                    (
                        std::net::IpAddr::V6(ip.header().destination_addr()),
                        dport_out
                    ),
                    (*address, *port),
                    "{what}"
                );
                *outcomes.entry("backend").or_default() += 1;
            }
            Verdict::DeniedBySourceRanges => {
                assert_eq!(verdict, TC_ACT_SHOT, "{what}");
                *outcomes.entry("denied").or_default() += 1;
            }
            Verdict::NoBackend { reject: true } => {
                assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: answered");
                *outcomes.entry("rejected").or_default() += 1;
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
    for kind in ["backend", "denied", "rejected"] {
        assert!(outcomes.get(kind).is_some_and(|n| *n > 0), "{outcomes:?}");
    }
}

/// A small xorshift generator: the fuzzer is reproducible from its seed.
struct Rng(u64);

impl Rng {
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

/// A valid IPv6 packet to or from the test's Services, or none of theirs.
fn seed6(rng: &mut Rng) -> Vec<u8> {
    let frontends = [
        (VIP, 80, TCP),
        (VIP, 53, UDP),
        (EMPTY_VIP, 80, TCP),
        (EMPTY_VIP, 53, UDP),
        (NODE, NODE_PORT, TCP),
        (GUARDED_LB, 80, TCP),
    ];
    let clients = [CLIENT, OUTSIDE, NODE2, POD_A, "2001:db8::9"];
    let backends = [POD_A, POD_B, REMOTE_POD];
    let sport = 1024 + rng.below(64_000) as u16;
    let packet = match rng.below(5) {
        0 | 1 => {
            let (addr, port, proto) = rng.pick(&frontends);
            let client = rng.pick(&clients);
            if proto == TCP {
                tcp(
                    client,
                    sport,
                    addr,
                    port,
                    rng.pick(&["S", "A", "FA", "R", "SA"]),
                )
            } else {
                udp(client, sport, addr, port)
            }
        }
        2 => tcp(
            rng.pick(&backends),
            8080,
            rng.pick(&clients),
            sport,
            rng.pick(&["SA", "A", "FA"]),
        ),
        3 => {
            // An ICMPv6 error about a Service flow.
            let (frontend, port, _) = rng.pick(&frontends);
            let quoted = tcp(rng.pick(&clients), sport, frontend, port, "S");
            let mut out = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv6(addr(rng.pick(&backends)), addr(rng.pick(&clients)), 64)
                .icmpv6(rng.pick(&[
                    Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
                    Icmpv6Type::PacketTooBig { mtu: 1280 },
                ]))
                .write(&mut out, &quoted[14..])
                .unwrap();
            out
        }
        _ => tcp(
            rng.pick(&clients),
            sport,
            "fd00:1::1",
            rng.below(65_535) as u16,
            "S",
        ),
    };
    if rng.below(4) == 0 {
        with_hop_by_hop(&packet)
    } else {
        packet
    }
}

/// One to three of: truncation, byte flips in the headers, the payload length, the next
/// header (extension headers and others), or a random extension header length.
fn mutate6(rng: &mut Rng, mut p: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        match rng.below(6) {
            0 => p.truncate(rng.below(p.len() + 1)),
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(p.len().min(14 + 40 + 48));
                    if let Some(b) = p.get_mut(at) {
                        *b = rng.next() as u8;
                    }
                }
            }
            2 => {
                if p.len() >= 14 + 6 {
                    let len = rng.below(1 << 16) as u16;
                    p[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
                }
            }
            3 => {
                if p.len() > 14 + 6 {
                    p[14 + 6] = rng.pick(&[0, 43, 44, 51, 59, 60, 6, 17, 58, 135]);
                }
            }
            4 => {
                // The first extension header's length byte, when there is one.
                if p.len() > 14 + 41 {
                    p[14 + 41] = rng.next() as u8;
                }
            }
            _ => {
                let extra = rng.below(64);
                p.extend((0..extra).map(|_| rng.next() as u8));
            }
        }
    }
    p
}

/// Fuzzed IPv6 packets through every program (the three tc entry points and XDP, each with
/// its IPv6 stages): only documented verdicts, the kernel's harness the only refusal, no
/// stage ever failing to run, and no rewrite of a packet that names no Service address.
#[test]
fn fuzzed_ipv6_packets_get_documented_verdicts() {
    use lb_common::maps::{EXTERNAL_XDP_PROGRAM, HOST_EGRESS_PROGRAM};
    if !privileged("fuzzed_ipv6_packets_get_documented_verdicts") {
        return;
    }
    let per_program: usize = std::env::var("LB_FUZZ_PACKETS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let net = PacketNetns::entered();
    let mut path = LoadedPath::load("fuzz-ipv6");
    provision(&mut path);
    // Every address `provision` programs, frontend or backend.
    let service_addresses: Vec<[u8; 16]> = [VIP, EMPTY_VIP, STICKY_VIP, NODE, GUARDED_LB]
        .iter()
        .chain(&[POD_A, POD_B, REMOTE_POD])
        .map(|a| addr(a))
        .collect();
    let names_a_service = |p: &[u8]| {
        service_addresses
            .iter()
            .any(|a| p.windows(16).any(|w| w == a))
    };
    let mut rng = Rng(0x5eed_0006_cafe_f00d);
    let before = path.counters();
    let mut report = Vec::new();
    for (program, device, verdicts) in [
        (
            POD_INGRESS_PROGRAM,
            "pod0",
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
        (
            EXTERNAL_INGRESS_PROGRAM,
            "ext0",
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
        (
            HOST_EGRESS_PROGRAM,
            "ext0",
            [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
        (EXTERNAL_XDP_PROGRAM, "ext0", [2, 3, 1]),
    ] {
        let ifindex = net.ifindex(device);
        let xdp = program == EXTERNAL_XDP_PROGRAM;
        let (mut rewritten, mut refused) = (0, 0);
        let mut by_verdict = std::collections::BTreeMap::<u32, usize>::new();
        for i in 0..per_program {
            let seed = seed6(&mut rng);
            let input = if i % 8 == 0 {
                seed
            } else {
                mutate6(&mut rng, seed)
            };
            let mut out = vec![0u8; input.len() + 256];
            let mut ctx = vec![0u8; if xdp { 24 } else { 44 }];
            if xdp {
                ctx[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            } else {
                ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            }
            let options = TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            };
            let result = if xdp {
                path.dataplane.external_xdp().test_run(options)
            } else {
                path.dataplane.program(program).test_run(options)
            };
            let Ok(result) = result else {
                // The harness refuses frames shorter than an IPv6 header.
                assert!(input.len() < 14 + 40, "{program}: refused {input:02x?}");
                refused += 1;
                continue;
            };
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
                    names_a_service(&input),
                    "{program} rewrote a packet of no Service:\n in  {input:02x?}\n out {out:02x?}"
                );
            }
        }
        report.push(format!(
            "{program}: {per_program} IPv6 packets, verdicts {by_verdict:?}, {rewritten} \
             rewritten, {refused} refused by the harness"
        ));
    }
    let after = path.counters();
    assert_eq!(
        after.get(&Counter::StageFailed),
        before.get(&Counter::StageFailed),
        "every stage ran"
    );
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "fuzz ipv6: {}", report.join("; "));
}

/// More IPv6 twins of the packet table's cases: hairpin (a pod reaching itself through its
/// Service: SNAT to the node, sent back by the FIB), the node's own processes (host egress:
/// redirected by the FIB), session affinity (a client keeps its backend across flows) and the
/// flow lifecycle (a FIN, then a RST, recorded in both entries).
#[test]
fn ipv6_hairpin_host_affinity_and_lifecycle() {
    use lb_common::{
        conntrack::{CT_S_FIN_FORWARD, CT_S_REPLIED, CT_S_RST},
        maps::HOST_EGRESS_PROGRAM,
    };
    if !privileged("ipv6_hairpin_host_affinity_and_lifecycle") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = LoadedPath::load("ipv6-more");
    provision(&mut path);
    let (pod, ext) = (net.ifindex("pod0"), net.ifindex("ext0"));

    // Hairpin: pod-a to the UDP ClusterIP whose only backend is pod-a itself.
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &udp(POD_A, 41500, VIP, 53),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back towards the pod");
    let forward = ct(&path, &key(POD_A, 41500, VIP, 53, UDP)).expect("forward entry");
    let port = u16::from_be(forward.new_sport_be);
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port));
    assert_eq!(
        out,
        udp_between((POD_LINK_MAC, POD_A_MAC), NODE, port, POD_A, 5353),
        "SNAT to the node, so pod-a answers the node and not itself"
    );
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &udp(POD_A, 5353, NODE, port),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        &out[14..],
        &udp(VIP, 53, POD_A, 41500)[14..],
        "the answer from the Service"
    );

    // The node's own process (host egress on the external interface): redirected to the pod.
    let (verdict, out) = run(
        &mut path,
        HOST_EGRESS_PROGRAM,
        ext,
        &tcp(NODE, 42500, VIP, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let to = ip_of(
        ct(&path, &key(NODE, 42500, VIP, 80, TCP))
            .unwrap()
            .new_daddr_be,
    );
    let to_mac = if to == POD_A { POD_A_MAC } else { POD_B_MAC };
    assert_eq!(
        out,
        tcp_between((POD_LINK_MAC, to_mac), NODE, 42500, to, 8080, "S"),
        "the source stays the node's address"
    );

    // Session affinity: every new flow of one client goes to its first flow's backend.
    let first = {
        run(
            &mut path,
            POD_INGRESS_PROGRAM,
            pod,
            &tcp(CLIENT, 43000, STICKY_VIP, 80, "S"),
        );
        ip_of(
            ct(&path, &key(CLIENT, 43000, STICKY_VIP, 80, TCP))
                .unwrap()
                .new_daddr_be,
        )
    };
    for sport in 43001..43033 {
        let (_, out) = run(
            &mut path,
            POD_INGRESS_PROGRAM,
            pod,
            &tcp(CLIENT, sport, STICKY_VIP, 80, "S"),
        );
        assert_eq!(
            out,
            tcp(CLIENT, sport, first, 8080, "S"),
            "affinity keeps {first}"
        );
    }
    let remembered = path
        .dataplane
        .maps
        .v6
        .affinity
        .get(
            &lb_common::service::AffinityKey {
                service_id: 7,
                client_addr_be: wire(CLIENT),
            },
            0,
        )
        .expect("the client's backend in the IPv6 affinity map");
    assert_eq!(
        [POD_A, POD_B][remembered.backend_id as usize - 1],
        first,
        "remembered: backend {} ",
        remembered.backend_id
    );

    // The lifecycle: a reply marks the flow replied; the client's FIN and then a RST are
    // written to both entries.
    let flow = key(CLIENT, 45000, VIP, 80, TCP);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 45000, VIP, 80, "S"),
    );
    let backend = ip_of(ct(&path, &flow).unwrap().new_daddr_be);
    let reply = key(backend, 8080, CLIENT, 45000, TCP);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(backend, 8080, CLIENT, 45000, "SA"),
    );
    assert_ne!(ct(&path, &flow).unwrap().state & CT_S_REPLIED, 0);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 45000, VIP, 80, "FA"),
    );
    for k in [&flow, &reply] {
        assert_ne!(
            ct(&path, k).unwrap().state & CT_S_FIN_FORWARD,
            0,
            "FIN in both entries"
        );
    }
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(backend, 8080, CLIENT, 45000, "R"),
    );
    for k in [&flow, &reply] {
        assert_ne!(
            ct(&path, k).unwrap().state & CT_S_RST,
            0,
            "RST in both entries"
        );
    }
    let swept = lb_userspace::conntrack::read_all::<lb_common::Ip6>(std::os::fd::AsFd::as_fd(
        aya::maps::IterableMap::map(&path.dataplane.maps.v6.conntrack).fd(),
    ))
    .expect("read the IPv6 conntrack");
    assert!(
        swept.iter().any(|(k, _)| *k == flow),
        "the sweep reads IPv6 entries"
    );
}

/// The backend an IPv6 field names, as the test's constant.
fn ip_of(addr_be: Ip6) -> &'static str {
    let ip = Ipv6Addr::from(lb_common::addr::ip6_octets(addr_be));
    [POD_A, POD_B, REMOTE_POD]
        .into_iter()
        .find(|p| p.parse::<Ipv6Addr>().unwrap() == ip)
        .unwrap_or_else(|| panic!("{ip} is none of the test's backends"))
}

/// The XDP fast path and the flows' fate when things change, over IPv6: a known NodePort flow
/// to a remote backend is rewritten and sent back out by XDP (XDP_TX); a flow whose backend
/// leaves is balanced afresh; a NodePort flow that needs SNAT while the node has no IPv6 SNAT
/// address is dropped and counted.
#[test]
fn ipv6_xdp_rebalancing_and_snat_failure() {
    if !privileged("ipv6_xdp_rebalancing_and_snat_failure") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = LoadedPath::load("ipv6-xdp");
    provision(&mut path);
    let (pod, ext) = (net.ifindex("pod0"), net.ifindex("ext0"));
    let before = path.counters();

    // A NodePort flow to the remote backend, started by tc; its next packet takes XDP.
    let (verdict, _) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(OUTSIDE, 46000, NODE, NODE_PORT, "S"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let forward = ct(&path, &key(OUTSIDE, 46000, NODE, NODE_PORT, TCP)).unwrap();
    let snat_port = u16::from_be(forward.new_sport_be);
    let packet = tcp(OUTSIDE, 46000, NODE, NODE_PORT, "A");
    let mut out = vec![0u8; packet.len() + 64];
    let mut ctx = vec![0u8; 24];
    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ext.to_ne_bytes());
    let result = path
        .dataplane
        .external_xdp()
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN (XDP)");
    out.truncate(result.data_size_out as usize);
    assert_eq!(
        result.return_value, 3,
        "XDP_TX: back out of the external interface"
    );
    assert_eq!(
        out,
        tcp_between((EXT_MAC, NODE2_MAC), NODE, snat_port, REMOTE_POD, 8080, "A"),
        "SNAT and DNAT applied by XDP, MACs from the FIB"
    );

    // The backend a ClusterIP flow has leaves: its next packet starts the flow afresh.
    let flow = key(CLIENT, 47000, VIP, 80, TCP);
    run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 47000, VIP, 80, "S"),
    );
    let gone = ip_of(ct(&path, &flow).unwrap().new_daddr_be);
    let (gone_id, kept_id, kept) = if gone == POD_A {
        (1, 2, POD_B)
    } else {
        (2, 1, POD_A)
    };
    path.dataplane.maps.v6.backends.remove(&gone_id).unwrap();
    for slot in 0..2 {
        assert!(path.dataplane.maps.slots.set(slot, kept_id));
    }
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 47000, VIP, 80, "A"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(CLIENT, 47000, kept, 8080, "A"),
        "balanced afresh to {kept}"
    );

    // No IPv6 SNAT address: a NodePort flow to the remote backend cannot be SNATed.
    path.dataplane
        .maps
        .v6
        .node
        .set(0, NodeConfig6::default(), 0)
        .unwrap();
    let (verdict, _) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(OUTSIDE, 48000, NODE, NODE_PORT, "S"),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert!(ct(&path, &key(OUTSIDE, 48000, NODE, NODE_PORT, TCP)).is_none());

    let after = path.counters();
    let delta = |c: Counter| after.get(&c).unwrap_or(&0) - before.get(&c).unwrap_or(&0);
    assert_eq!(delta(Counter::XdpTransmitted), 1);
    assert_eq!(delta(Counter::Rebalanced), 1);
    assert_eq!(delta(Counter::SnatFailed), 1);
}

/// The agent's own path for IPv6, from a manifest: translation and the sync write a dual-stack
/// LoadBalancer's IPv6 frontends, backends and source ranges into the IPv6 maps (its IPv4 ones
/// into the IPv4 maps), and the programs follow them: a client inside the IPv6 ranges reaches
/// the IPv6 load-balancer IP, one outside them is dropped, and the IPv4 side keeps working.
#[test]
fn a_dual_stack_manifest_programs_both_families() {
    if !privileged("a_dual_stack_manifest_programs_both_families") {
        return;
    }
    let net = PacketNetns::entered();
    let mut path = LoadedPath::load("ipv6-manifest");
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: t}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIPs: ["fd00:96::30", 10.96.0.30]
  loadBalancerSourceRanges: ["fd00:30::/120", "172.30.0.0/24"]
  ports: [{name: http, port: 80, nodePort: 30090}]
status: {loadBalancer: {ingress: [{ip: "fd00:30::200"}, {ip: 172.30.0.200}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-v6, namespace: t, labels: {kubernetes.io/service-name: shop}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["fd00:244:1::11"], nodeName: node-1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-v4, namespace: t, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["10.244.1.11"], nodeName: node-1}
"#;
    let node = lb_userspace::translate::NodeContext {
        name: Some("node-1".to_owned()),
        addresses: vec!["172.30.0.11".parse().unwrap(), NODE.parse().unwrap()],
        ..Default::default()
    };
    path.provision_as(yaml, &node);
    let contents = path
        .dataplane
        .maps
        .read_contents()
        .expect("read the maps back");
    // What the maps hold, both families, is what the sync meant to write. (The node entry is
    // left out: a fresh harness's mirror assumes the default timeouts the packet path reads
    // from an all-zero entry, so it writes none.)
    let meant = path.programmer.programmed();
    assert_eq!(contents.services, meant.services);
    assert_eq!(contents.backends, meant.backends);
    assert_eq!(contents.tables, meant.tables);
    assert_eq!(contents.source_ranges, meant.source_ranges);
    assert_eq!(contents.services.len(), 6, "3 frontends a family");
    assert_eq!(
        (contents.source_ranges.values())
            .map(|r| r.len())
            .sum::<usize>(),
        2,
        "one range a family, each in a set of its own"
    );
    let ext = net.ifindex("ext0");
    let pod = net.ifindex("pod0");
    let (verdict, out) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(NODE2, 49000, GUARDED_LB, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(NODE2, 49000, POD_A, 8080, "S"),
        "inside the IPv6 ranges"
    );
    let (verdict, _) = run(
        &mut path,
        EXTERNAL_INGRESS_PROGRAM,
        ext,
        &tcp(OUTSIDE, 49001, GUARDED_LB, 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_SHOT, "outside the IPv6 ranges");
    let (verdict, out) = run(
        &mut path,
        POD_INGRESS_PROGRAM,
        pod,
        &tcp(CLIENT, 49002, "fd00:96::30", 80, "S"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(CLIENT, 49002, POD_A, 8080, "S"),
        "the IPv6 ClusterIP"
    );
    // The IPv4 twin, in the IPv4 maps.
    let mut v4 = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([10, 244, 1, 2], [10, 96, 0, 30], 64)
        .tcp(49003, 80, 1000, 64240)
        .syn()
        .write(&mut v4, &[])
        .unwrap();
    let (verdict, out) = run(&mut path, POD_INGRESS_PROGRAM, pod, &v4);
    assert_eq!(verdict, TC_ACT_OK);
    let mut expected = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([10, 244, 1, 2], [10, 244, 1, 11], 64)
        .tcp(49003, 8080, 1000, 64240)
        .syn()
        .write(&mut expected, &[])
        .unwrap();
    assert_eq!(out, expected, "the IPv4 ClusterIP");
}
