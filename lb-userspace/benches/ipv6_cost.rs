//! What an IPv6 packet costs beside an IPv4 one on the same paths, in one build and one run:
//! the IPv6 path runs in tail-called stages (docs/design.md, "IPv6 and dual-stack"), IPv4 in
//! its entry point.
//!
//!     cargo bench -p lb-userspace --bench ipv6_cost                 (as root)
//!     cargo bench -p lb-userspace --bench ipv6_cost -- 5 1000000     (rounds, repeat)
//!
//! The packet path is loaded as the agent loads it (stage arrays filled), one ClusterIP per
//! family with two backends is written straight into its maps, and BPF_PROG_TEST_RUN times each
//! path with `repeat` runs of one packet (the kernel reports the mean time a run). A new flow
//! cannot repeat, so it is timed as the mean of single runs over distinct source ports. The two
//! families alternate within a round; medians of the rounds with min-max.

mod per_packet;

use per_packet::{median_min_max, rounds_and_repeat};

use std::{net::Ipv6Addr, time::Duration};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use lb_common::{
    IPPROTO_TCP,
    addr::ip6_be,
    addr_be,
    maps::POD_INGRESS_PROGRAM,
    port_be,
    service::{Backend, ServiceEntry, ServiceKey},
};
use lb_userspace::loader::Dataplane;

const TABLE: u32 = 251;

struct Family {
    client: std::net::IpAddr,
    vip: std::net::IpAddr,
    pods: [std::net::IpAddr; 2],
}

fn families() -> [Family; 2] {
    let v6 = |s: &str| std::net::IpAddr::V6(s.parse::<Ipv6Addr>().unwrap());
    [
        Family {
            client: [10, 244, 1, 2].into(),
            vip: [10, 96, 0, 10].into(),
            pods: [[10, 244, 1, 11].into(), [10, 244, 1, 12].into()],
        },
        Family {
            client: v6("fd00:244:1::2"),
            vip: v6("fd00:96::10"),
            pods: [v6("fd00:244:1::11"), v6("fd00:244:1::12")],
        },
    ]
}

fn tcp(src: std::net::IpAddr, sport: u16, dst: std::net::IpAddr, dport: u16, syn: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family a packet"),
    };
    let builder = ip.tcp(sport, dport, 1000, 64240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    out
}

/// The family's ClusterIP with two backends, written as the agent writes it.
fn provision(dataplane: &mut Dataplane) {
    let maps = &mut dataplane.maps;
    let entry = |id| ServiceEntry {
        service_id: id,
        table_offset: (id - 1) * 256,
        table_size: TABLE,
        affinity_timeout_s: 0,
        flags: 0,
        _pad: 0,
        source_ranges_id: 0,
    };
    let [v4, v6] = families();
    let octets4 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => a.octets(),
        _ => unreachable!(),
    };
    let octets6 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(a) => a.octets(),
        _ => unreachable!(),
    };
    for (i, pod) in v4.pods.iter().enumerate() {
        let backend = Backend::new(addr_be(octets4(*pod)), port_be(8080), 0);
        maps.backends.insert(i as u32 + 1, backend, 0).unwrap();
    }
    for (i, pod) in v6.pods.iter().enumerate() {
        let backend = Backend::new(ip6_be(octets6(*pod)), port_be(8080), 0);
        maps.v6.backends.insert(i as u32 + 3, backend, 0).unwrap();
    }
    for slot in 0..TABLE {
        assert!(maps.slots.set(slot, 1 + slot % 2));
        assert!(maps.slots.set(256 + slot, 3 + slot % 2));
    }
    let key4 = ServiceKey::new(addr_be(octets4(v4.vip)), port_be(80), IPPROTO_TCP);
    maps.services.insert(key4, entry(1), 0).unwrap();
    let key6 = ServiceKey::new(ip6_be(octets6(v6.vip)), port_be(80), IPPROTO_TCP);
    maps.v6.services.insert(key6, entry(2), 0).unwrap();
}

fn run(dataplane: &mut Dataplane, packet: &[u8], repeat: u32) -> (Duration, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 64];
    let result = dataplane
        .program(POD_INGRESS_PROGRAM)
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.duration, out)
}

fn main() {
    let (rounds, repeat) = rounds_and_repeat();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("ipv6_cost: needs root (BPF_PROG_TEST_RUN); skipped");
        return;
    }
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/lb-ipv6-cost-{}", std::process::id()));
    let mut dataplane = Dataplane::load(&pins, false).expect("load the packet path");
    provision(&mut dataplane);
    const PATHS: [&str; 4] = [
        "tc: not a Service (pass)",
        "tc: established, client -> Service",
        "tc: established, reply",
        "tc: new flow (SYN)",
    ];
    let families = families();
    // [family][path] -> ns per round
    let mut samples = vec![vec![Vec::new(); PATHS.len()]; families.len()];
    let mut next_port = 20_000u16;
    for _ in 0..rounds {
        for (f, family) in families.iter().enumerate() {
            let (_, first) = run(
                &mut dataplane,
                &tcp(family.client, 40_000, family.vip, 80, true),
                1,
            );
            // The backend the flow got, from the translated packet's destination.
            let backend = *family
                .pods
                .iter()
                .find(|pod| match pod {
                    std::net::IpAddr::V4(a) => first[30..34] == a.octets(),
                    std::net::IpAddr::V6(a) => first[38..54] == a.octets(),
                })
                .expect("translated to one of the backends");
            let packets = [
                tcp(family.client, 40_001, family.pods[0], 8080, false),
                tcp(family.client, 40_000, family.vip, 80, false),
                tcp(backend, 8080, family.client, 40_000, false),
            ];
            for (p, packet) in packets.iter().enumerate() {
                samples[f][p].push(run(&mut dataplane, packet, repeat).0.as_nanos() as f64);
            }
            let flows = 20_000u32;
            let mut total = Duration::ZERO;
            for _ in 0..flows {
                next_port = next_port.wrapping_add(1).max(1024);
                let syn = tcp(family.client, next_port, family.vip, 80, true);
                total += run(&mut dataplane, &syn, 1).0;
            }
            samples[f][PATHS.len() - 1].push(total.as_nanos() as f64 / flows as f64);
        }
    }
    drop(dataplane);
    let _ = lb_userspace::loader::cleanup(&pins);
    let _ = std::fs::remove_dir_all(&pins);
    println!(
        "ns per packet (BPF_PROG_TEST_RUN on lb_pod_ingress, {repeat} runs; new flows: 20,000 \
         single runs), median of {rounds} rounds (min-max):"
    );
    println!(
        "{:<36} {:>24} {:>24} {:>9}",
        "path", "IPv4", "IPv6", "IPv6/IPv4"
    );
    for (p, path) in PATHS.iter().enumerate() {
        let (a, a_lo, a_hi) = median_min_max(samples[0][p].clone());
        let (b, b_lo, b_hi) = median_min_max(samples[1][p].clone());
        println!(
            "{path:<36} {:>24} {:>24} {:>9.2}",
            format!("{a:.1} ({a_lo:.1}-{a_hi:.1})"),
            format!("{b:.1} ({b_lo:.1}-{b_hi:.1})"),
            b / a
        );
    }
}
