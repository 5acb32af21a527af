//! An IPv4 network namespace with a node's routes and neighbours, for BPF_PROG_TEST_RUN runs
//! that make FIB lookups (the packet tests and the program-cost bench).

use std::net::Ipv4Addr;

use lb_testbed::netns::Netns;

pub const POD_A: [u8; 4] = [10, 244, 1, 11];
pub const NODE: [u8; 4] = [172, 30, 0, 11];
pub const NODE2: [u8; 4] = [172, 30, 0, 12];
pub const OUTSIDE: [u8; 4] = [172, 30, 0, 100];
/// The node's external interface and the neighbours the FIB resolves through it.
pub const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 12];
pub const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 100];
/// The node's side of the pods' link, and pod A's MAC.
pub const POD_LINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
pub const POD_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 11];
pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn ip(a: [u8; 4]) -> String {
    Ipv4Addr::from(a).to_string()
}

/// A network namespace holding the node's routes and neighbours, so the FIB lookups the packet
/// path makes for redirects have known answers. Nothing in it is linked anywhere else.
pub struct PacketNetns {
    pub ns: Netns,
}

impl PacketNetns {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Netns::create(&format!(
            "{}{}-pkt{n}",
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
        for dev in ["ext0", "ext0p", "pod0", "pod0p"] {
            run(&["link", "set", dev, "up"]);
        }
        run(&["addr", "add", &format!("{}/24", ip(NODE)), "dev", "ext0"]);
        run(&["route", "add", "10.244.1.0/24", "dev", "pod0"]);
        run(&["route", "add", "10.244.2.0/24", "via", &ip(NODE2)]);
        for (addr, m, dev) in [
            (NODE2, NODE2_MAC, "ext0"),
            (OUTSIDE, OUTSIDE_MAC, "ext0"),
            (POD_A, POD_A_MAC, "pod0"),
        ] {
            run(&[
                "neigh",
                "add",
                &ip(addr),
                "lladdr",
                &mac(m),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        ns.sysctl("net.ipv4.conf.all.forwarding", "1").unwrap();
        Self { ns }
    }

    pub fn ifindex(&self, dev: &'static str) -> u32 {
        self.ns
            .run(move || nix::net::if_::if_nametoindex(dev).expect("ifindex"))
            .unwrap()
    }

    /// A new namespace, entered by the calling thread: the program reads the FIB of the
    /// namespace the test runs in, and this one has known routes.
    pub fn entered() -> Self {
        let net = Self::new();
        let file = std::fs::File::open(format!("/run/netns/{}", net.ns.name())).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the test namespace");
        net
    }
}
