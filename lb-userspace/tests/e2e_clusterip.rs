//! End to end in network namespaces: a client pod, a node running `lb agent --manifests` with the
//! bundled example, two echo pods. Real TCP and UDP to the ClusterIP must be served by both pods,
//! every answer must come from the ClusterIP, and a manifest change must be applied live.

mod support;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use lb_common::counters::Counter;
use support::privileged;
use xtask::{
    echo::{EchoServer, Reply, tcp_request, udp_request},
    testbed::{AgentProcess, Testbed},
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_A_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_B_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
const LATE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const TCP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const UDP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const REQUESTS: usize = 40;

fn example_manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/clusterip.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn requests(testbed: &Testbed, n: usize) -> (Vec<Reply>, Vec<Reply>) {
    testbed
        .client
        .ns
        .run(move || {
            let tcp: Vec<Reply> = (0..n)
                .map(|i| tcp_request(TCP_VIP).unwrap_or_else(|e| panic!("TCP request {i}: {e:#}")))
                .collect();
            let udp: Vec<Reply> = (0..n)
                .map(|i| udp_request(UDP_VIP).unwrap_or_else(|e| panic!("UDP request {i}: {e:#}")))
                .collect();
            (tcp, udp)
        })
        .expect("client thread")
}

fn pods(replies: &[Reply]) -> BTreeSet<String> {
    replies.iter().map(|r| r.pod.clone()).collect()
}

fn assert_from_vip(replies: &[Reply], vip: SocketAddrV4, what: &str) {
    for reply in replies {
        assert_eq!(
            reply.answered_from,
            SocketAddr::V4(vip),
            "{what}: every answer must come from the ClusterIP, got {reply:?}"
        );
        assert_eq!(
            reply.client_seen_by_pod.ip(),
            CLIENT_IP,
            "{what}: the pod sees the client's own address (no SNAT for pod clients)"
        );
    }
}

#[test]
fn clusterip_tcp_and_udp_through_agent() {
    if !privileged("clusterip_tcp_and_udp_through_agent") {
        return;
    }
    xtask::cleanup::install_interrupt_handler();
    let mut testbed = Testbed::single_node(
        ("client", CLIENT_IP),
        &[("pod-a", POD_A_IP), ("pod-b", POD_B_IP)],
    )
    .expect("build the testbed");
    let _servers: Vec<EchoServer> = testbed
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, &p.name, 8080, 5353).expect("start echo pod"))
        .collect();

    let manifest_dir = std::env::temp_dir().join(format!("{}-manifests", testbed.run_id));
    std::fs::create_dir_all(&manifest_dir).unwrap();
    let manifest = manifest_dir.join("services.yaml");
    std::fs::write(&manifest, example_manifest()).unwrap();

    let mut agent = AgentProcess::start(
        &testbed,
        Path::new(env!("CARGO_BIN_EXE_lb")),
        &manifest,
        100,
    )
    .expect("start the agent");

    let (tcp, udp) = requests(&testbed, REQUESTS);
    assert_from_vip(&tcp, TCP_VIP, "TCP");
    assert_from_vip(&udp, UDP_VIP, "UDP");
    let both: BTreeSet<String> = ["pod-a".to_owned(), "pod-b".to_owned()].into();
    assert_eq!(pods(&tcp), both, "TCP requests are served by both pods");
    assert_eq!(pods(&udp), both, "UDP requests are served by both pods");

    // The packet path counted it: every request and every answer was translated.
    let counters =
        lb_userspace::loader::pinned_counters(agent.bpffs_dir()).expect("pinned counters");
    assert!(
        counters[&Counter::Translated] >= 2 * REQUESTS as u64,
        "{counters:?}"
    );
    assert!(
        counters[&Counter::ReverseTranslated] >= 2 * REQUESTS as u64,
        "{counters:?}"
    );

    // Take pod-b out of the slice: the agent sees the file change and applies the difference.
    let syncs_before = agent.log().matches("synced").count();
    let without_b = example_manifest().replace(
        "  - addresses: [\"10.244.1.12\"]",
        "  - addresses: [\"10.244.1.11\"]",
    );
    assert_ne!(
        without_b,
        example_manifest(),
        "the example lists pod-b as an endpoint"
    );
    // Write a new file and rename it over the old one, as editors and ConfigMap updates do.
    let staged = manifest_dir.join("services.yaml.new");
    std::fs::write(&staged, &without_b).unwrap();
    std::fs::rename(&staged, &manifest).unwrap();
    agent
        .wait_for_log_count("synced", syncs_before + 1, Duration::from_secs(10))
        .expect("agent applies the changed manifest");
    let (tcp, udp) = requests(&testbed, REQUESTS / 2);
    assert_eq!(
        pods(&tcp),
        ["pod-a".to_owned()].into(),
        "after the change only pod-a serves TCP"
    );
    assert_eq!(
        pods(&udp),
        ["pod-a".to_owned()].into(),
        "after the change only pod-a serves UDP"
    );
    assert_from_vip(&tcp, TCP_VIP, "TCP after change");

    // A pod that appears after the agent started gets the program on its interface too.
    let late = testbed.add_pod("late", LATE_IP).expect("add a pod");
    let late_ns_reply = {
        agent
            .wait_for_log(
                &format!("interface={}", late.host_if),
                Duration::from_secs(10),
            )
            .expect("agent attaches to the new pod's interface");
        late.ns.run(|| tcp_request(TCP_VIP)).unwrap()
    };
    let reply = late_ns_reply.expect("the new pod reaches the ClusterIP");
    assert_eq!(reply.answered_from, SocketAddr::V4(TCP_VIP));
    assert_eq!(reply.client_seen_by_pod.ip(), LATE_IP);

    // SIGHUP re-reads the file even when it looks unchanged.
    let syncs_before = agent.log().matches("synced").count();
    agent.signal(libc::SIGHUP);
    agent
        .wait_for_log_count("synced", syncs_before + 1, Duration::from_secs(10))
        .expect("agent re-reads on SIGHUP");

    let log = agent.log();
    let status = agent.stop().expect("stop the agent");
    assert!(
        status.success(),
        "agent exits cleanly on SIGTERM: {status}\n{log}"
    );
    let _ = std::fs::remove_dir_all(&manifest_dir);

    // Detached: the ClusterIP is no longer translated, so nothing answers on it.
    let after = testbed
        .client
        .ns
        .run(|| udp_request(UDP_VIP).is_err())
        .unwrap();
    assert!(
        after,
        "after the agent stopped, the ClusterIP must not answer"
    );
}
