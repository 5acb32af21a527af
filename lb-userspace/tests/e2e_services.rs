//! Every Service type end to end on the two-node testbed (docs/testbed.md): real TCP and UDP from
//! pods, from a node's own namespace and from a client outside the cluster, through one
//! `lb agent` per node running the bundled example (deploy/examples/services.yaml).
//!
//! The external-traffic scenarios run twice: with the tc programs only, and with the XDP fast
//! path on the external interfaces (`--xdp`).

mod support;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_common::{conntrack::FlowKey, counters::Counter, hash::slot_for, maglev};
use lb_testbed::echo::{Conversation, udp_request, udp_request_from};
use support::{
    cluster::{Running, at, example_manifest, pods, set, tcp_many, tcp_outcome, udp_many},
    privileged,
};

/// Requests per check. Where a check expects two pods to share the work, 24 flows all landing on
/// one of them has a probability of 2^-23.
const N: usize = 24;
const NODE1: [u8; 4] = [172, 30, 0, 11];
const NODE2: [u8; 4] = [172, 30, 0, 12];
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 100);
const CLIENT_1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

fn ip(addr: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(addr))
}

#[test]
fn clusterip_from_pods_follows_manifest_changes_and_new_pods() {
    if !privileged("clusterip_from_pods_follows_manifest_changes_and_new_pods") {
        return;
    }
    let mut run = Running::start(false);
    let echo_tcp = at([10, 96, 0, 10], 80);
    let echo_udp = at([10, 96, 0, 10], 53);
    let (tcp, udp) = run.from("client-1", move || {
        (tcp_many(echo_tcp, N), udp_many(echo_udp, N))
    });
    // Endpoints on both nodes: the remote one is reached over the underlay.
    assert_eq!(
        pods(&tcp),
        set(&["pod-a", "pod-c"]),
        "TCP to the named targetPort"
    );
    assert_eq!(pods(&udp), set(&["pod-a", "pod-c"]), "UDP");
    for reply in tcp.iter().chain(&udp) {
        assert_eq!(
            reply.answered_from.ip(),
            ip([10, 96, 0, 10]),
            "answers come from the ClusterIP: {reply:?}"
        );
        assert_eq!(
            reply.client_seen_by_pod.ip(),
            CLIENT_1,
            "pods see the client pod, no SNAT: {reply:?}"
        );
    }
    let counters =
        lb_userspace::loader::pinned_counters(run.agent("node-1").bpffs_dir()).expect("counters");
    assert!(
        counters[&lb_common::counters::Counter::Translated] >= 2 * N as u64,
        "{counters:?}"
    );

    // pod-c leaves the slice: both agents apply the difference.
    run.change_manifest(&example_manifest().replace(
        "  - { addresses: [\"10.244.2.11\"], conditions: { ready: true }, nodeName: node-2 }\n---\n# NodePort",
        "---\n# NodePort",
    ));
    let tcp = run.from("client-1", move || tcp_many(echo_tcp, N / 2));
    assert_eq!(
        pods(&tcp),
        set(&["pod-a"]),
        "after the change only pod-a serves"
    );

    // A pod that appears after the agent started gets the program on its interface too.
    let late_ip = Ipv4Addr::new(10, 244, 1, 3);
    let host_if = run
        .cluster
        .add_pod("node-1", "late", late_ip)
        .expect("add a pod")
        .host_if
        .clone();
    run.agent("node-1")
        .wait_for_log(&format!("interface={host_if}"), Duration::from_secs(10))
        .expect("agent attaches to the new pod's interface");
    let reply = run
        .from("late", move || lb_testbed::echo::tcp_request(echo_tcp))
        .expect("the new pod reaches the ClusterIP");
    assert_eq!(reply.client_seen_by_pod.ip(), late_ip);

    // SIGHUP re-reads the file even when it looks unchanged.
    let syncs = run.agent("node-1").log().matches("synced").count();
    run.agent("node-1").signal(libc::SIGHUP);
    run.agent("node-1")
        .wait_for_log_count("synced", syncs + 1, Duration::from_secs(10))
        .expect("agent re-reads on SIGHUP");

    // Stopped agents exit cleanly and leave the packet path attached: the ClusterIP still
    // answers (the restart tests cover this in depth).
    for agent in run.agents.drain(..) {
        let log = agent.log();
        let status = agent.halt(libc::SIGTERM).expect("stop the agent");
        assert!(
            status.success(),
            "agent exits cleanly on SIGTERM: {status}\n{log}"
        );
    }
    assert!(
        run.from("client-1", move || udp_request(echo_udp).is_ok()),
        "the ClusterIP still answers while no agent runs"
    );
}

/// The example with `shop` admitting only `ranges` at its LoadBalancer IP.
fn shop_admitting(ranges: &str) -> String {
    let manifest = example_manifest();
    let restricted = manifest.replace(
        "  clusterIP: 10.96.0.30\n",
        &format!("  clusterIP: 10.96.0.30\n  loadBalancerSourceRanges: [{ranges}]\n"),
    );
    assert_ne!(restricted, manifest, "shop found in the example");
    restricted
}

/// NodePort from outside on every node, LoadBalancer and externalIPs via either node.
fn external_traffic(xdp: bool) -> Running {
    let mut run = Running::start(xdp);
    // web: both endpoints on node-2. Through node-1 (no local endpoint) the traffic is SNATed to
    // node-1 so the answer comes back through it; through node-2 it stays local, source kept.
    for (node, seen) in [(NODE1, ip(NODE1)), (NODE2, IpAddr::V4(OUTSIDE))] {
        let (tcp, udp) = run.from("outside", move || {
            (tcp_many(at(node, 30080), N), udp_many(at(node, 30053), N))
        });
        assert_eq!(
            pods(&tcp),
            set(&["pod-c", "pod-d"]),
            "NodePort TCP via {node:?}"
        );
        assert_eq!(
            pods(&udp),
            set(&["pod-c", "pod-d"]),
            "NodePort UDP via {node:?}"
        );
        for reply in tcp.iter().chain(&udp) {
            assert_eq!(
                reply.answered_from.ip(),
                ip(node),
                "answer from the node address: {reply:?}"
            );
            assert_eq!(
                reply.client_seen_by_pod.ip(),
                seen,
                "source the pod saw via {node:?}: {reply:?}"
            );
        }
    }
    // externalTrafficPolicy Local: node-1 has pod-b and keeps the client address; node-2 has no
    // endpoint and does not forward.
    let replies = run.from("outside", || tcp_many(at(NODE1, 30081), N / 2));
    assert_eq!(pods(&replies), set(&["pod-b"]));
    assert!(
        replies
            .iter()
            .all(|r| r.client_seen_by_pod.ip() == IpAddr::V4(OUTSIDE)),
        "{replies:?}"
    );
    let via_node2 = run.from("outside", || {
        tcp_outcome(at(NODE2, 30081), Duration::from_millis(500))
    });
    assert!(
        via_node2.is_err(),
        "node-2 has no local endpoint and must not forward: {via_node2:?}"
    );

    // The LoadBalancer IP and the external IP answer on every node the network sends them to.
    for node in ["node-1", "node-2"] {
        run.cluster.route_external_via(node).unwrap();
        let (lb, ext) = run.from("outside", || {
            (
                tcp_many(at([172, 30, 1, 10], 80), N),
                tcp_many(at([172, 30, 2, 10], 8080), N / 2),
            )
        });
        assert_eq!(
            pods(&lb),
            set(&["pod-b", "pod-d"]),
            "LoadBalancer IP via {node}"
        );
        assert!(
            lb.iter()
                .all(|r| r.answered_from.ip() == ip([172, 30, 1, 10])),
            "{lb:?}"
        );
        assert_eq!(pods(&ext), set(&["pod-a"]), "externalIP via {node}");
        assert!(
            ext.iter()
                .all(|r| r.answered_from.ip() == ip([172, 30, 2, 10])),
            "{ext:?}"
        );
    }
    // A LoadBalancer Service is a NodePort and a ClusterIP too.
    let np = run.from("outside", || tcp_many(at(NODE2, 30090), N));
    assert_eq!(
        pods(&np),
        set(&["pod-b", "pod-d"]),
        "shop's NodePort (two EndpointSlices)"
    );
    let cip = run.from("client-1", || tcp_many(at([10, 96, 0, 30], 80), N));
    assert_eq!(pods(&cip), set(&["pod-b", "pod-d"]), "shop's ClusterIP");
    // Pods reach NodePorts and LoadBalancer IPs too.
    let from_pod = run.from("client-1", || {
        (
            tcp_many(at(NODE2, 30080), N),
            tcp_many(at([172, 30, 1, 10], 80), N),
        )
    });
    assert_eq!(
        pods(&from_pod.0),
        set(&["pod-c", "pod-d"]),
        "pod -> node-2's NodePort"
    );
    assert_eq!(
        pods(&from_pod.1),
        set(&["pod-b", "pod-d"]),
        "pod -> LoadBalancer IP"
    );

    // loadBalancerSourceRanges: the LoadBalancer IP admits only the clients in them; the
    // NodePort and the ClusterIP stay open (kube-proxy's behaviour).
    let shop_lb = at([172, 30, 1, 10], 80);
    let refused = |outcome: std::io::Result<lb_testbed::echo::Reply>, who: &str| {
        assert!(outcome.is_err(), "{who} must be refused: {outcome:?}");
    };
    run.change_manifest(&shop_admitting("\"172.30.0.100/32\""));
    let admitted = run.from("outside", move || tcp_many(shop_lb, N));
    assert_eq!(
        pods(&admitted),
        set(&["pod-b", "pod-d"]),
        "outside is admitted"
    );
    let wait = Duration::from_millis(500);
    refused(
        run.from("client-1", move || tcp_outcome(shop_lb, wait)),
        "client-1 at the LoadBalancer IP",
    );
    let still_open = run.from("client-1", || {
        (
            tcp_many(at(NODE2, 30090), N),
            tcp_many(at([10, 96, 0, 30], 80), N),
        )
    });
    assert_eq!(
        pods(&still_open.0),
        set(&["pod-b", "pod-d"]),
        "NodePort open: {:?}",
        still_open.0
    );
    assert_eq!(
        pods(&still_open.1),
        set(&["pod-b", "pod-d"]),
        "ClusterIP open"
    );
    // The ranges change: now only pods are admitted.
    run.change_manifest(&shop_admitting("\"10.244.0.0/16\""));
    refused(
        run.from("outside", move || tcp_outcome(shop_lb, wait)),
        "outside after the change",
    );
    let pods_admitted = run.from("client-1", move || tcp_many(shop_lb, N));
    assert_eq!(
        pods(&pods_admitted),
        set(&["pod-b", "pod-d"]),
        "client-1 admitted"
    );
    let dropped = lb_userspace::loader::pinned_counters(run.agent("node-2").bpffs_dir())
        .expect("counters")[&Counter::DroppedSourceRange];
    assert!(dropped >= 1, "node-2 counted the refused SYNs: {dropped}");
    run.change_manifest(&example_manifest());
    run
}

#[test]
fn nodeport_loadbalancer_external_ips_tc() {
    if privileged("nodeport_loadbalancer_external_ips_tc") {
        let run = external_traffic(false);
        let counters = lb_userspace::loader::pinned_counters(run.agents[0].bpffs_dir()).unwrap();
        assert_eq!(counters[&Counter::XdpTransmitted], 0, "{counters:?}");
    }
}

#[test]
fn nodeport_loadbalancer_external_ips_xdp() {
    if privileged("nodeport_loadbalancer_external_ips_xdp") {
        let run = external_traffic(true);
        // node-1 SNATs NodePort traffic to node-2's pods: XDP turned those packets around.
        let counters = lb_userspace::loader::pinned_counters(run.agents[0].bpffs_dir()).unwrap();
        assert!(
            counters[&Counter::XdpTransmitted] >= 2 * N as u64,
            "{counters:?}"
        );
    }
}

#[test]
fn affinity_internal_policy_terminating_hairpin_host_network_tc() {
    if privileged("affinity_internal_policy_terminating_hairpin_host_network_tc") {
        affinity_internal_policy_terminating_hairpin_host_network(false);
    }
}

#[test]
fn affinity_internal_policy_terminating_hairpin_host_network_xdp() {
    if privileged("affinity_internal_policy_terminating_hairpin_host_network_xdp") {
        affinity_internal_policy_terminating_hairpin_host_network(true);
    }
}

fn affinity_internal_policy_terminating_hairpin_host_network(xdp: bool) {
    let mut run = Running::start(xdp);

    // sessionAffinity ClientIP (3 s): every new flow of a client goes where its first went, even
    // from source ports whose Maglev slot names another pod; after the timeout, Maglev decides.
    let sticky = at([10, 96, 0, 50], 53);
    let pods_of = [
        ("pod-a", [10, 244, 1, 11]),
        ("pod-b", [10, 244, 1, 12]),
        ("pod-c", [10, 244, 2, 11]),
        ("pod-d", [10, 244, 2, 12]),
    ];
    let choice = move |sport: u16| -> &'static str {
        let keys: Vec<u64> = pods_of
            .iter()
            .map(|(_, a)| maglev::backend_key(lb_common::addr_be(*a), 5353u16.to_be()))
            .collect();
        let size = maglev::table_size(keys.len(), None);
        let table = maglev::build(&keys, size);
        let flow = FlowKey::new(
            lb_common::addr_be(CLIENT_1.octets()),
            lb_common::addr_be([10, 96, 0, 50]),
            sport.to_be(),
            53u16.to_be(),
            17,
        );
        pods_of[table[slot_for(&flow, size) as usize] as usize].0
    };
    let first_port = 42000;
    let first = choice(first_port);
    let others: Vec<u16> = (42001..43000)
        .filter(|p| choice(*p) != first)
        .take(8)
        .collect();
    let replies = run.from("client-1", move || {
        let mut replies = vec![udp_request_from(sticky, first_port).expect("first request")];
        replies.extend(
            others
                .iter()
                .map(|p| udp_request_from(sticky, *p).expect("sticky request")),
        );
        replies
    });
    assert!(
        replies.iter().all(|r| r.pod == first),
        "all on {first}: {replies:?}"
    );
    std::thread::sleep(Duration::from_millis(3300));
    let fresh_port = (43000..44000).find(|p| choice(*p) != first).unwrap();
    let fresh = run.from("client-1", move || {
        udp_request_from(sticky, fresh_port).expect("request after the timeout")
    });
    assert_eq!(
        fresh.pod,
        choice(fresh_port),
        "after the timeout the choice is fresh"
    );

    // internalTrafficPolicy Local: each node's pods only reach their own node's endpoint.
    let cache = at([10, 96, 0, 60], 53);
    assert_eq!(
        pods(&run.from("client-1", move || udp_many(cache, N))),
        set(&["pod-b"])
    );
    assert_eq!(
        pods(&run.from("pod-c", move || udp_many(cache, N))),
        set(&["pod-d"])
    );

    // Hairpin: pod-a reaching the Service whose only endpoint is itself.
    let legacy = at([10, 96, 0, 40], 8080);
    let hairpin = run.from("pod-a", move || tcp_many(legacy, 4));
    assert!(
        hairpin
            .iter()
            .all(|r| r.pod == "pod-a" && r.answered_from.ip() == ip([10, 96, 0, 40])),
        "{hairpin:?}"
    );
    assert!(
        hairpin
            .iter()
            .all(|r| r.client_seen_by_pod.ip() == ip(NODE1)),
        "hairpin is SNATed to the node: {hairpin:?}"
    );

    // hostNetwork: a process in node-1's own namespace reaches a ClusterIP, local and remote pods.
    let echo_tcp = at([10, 96, 0, 10], 80);
    let echo_udp = at([10, 96, 0, 10], 53);
    let (tcp, udp) = run.from("node-1", move || {
        (tcp_many(echo_tcp, N), udp_many(echo_udp, N))
    });
    assert_eq!(pods(&tcp), set(&["pod-a", "pod-c"]), "hostNetwork TCP");
    assert_eq!(pods(&udp), set(&["pod-a", "pod-c"]), "hostNetwork UDP");
    assert!(
        tcp.iter()
            .chain(&udp)
            .all(|r| r.answered_from.ip() == ip([10, 96, 0, 10])),
        "{tcp:?}"
    );

    // Terminating endpoints: pod-a is terminating, pod-b ready: new flows go to pod-b only.
    let rollout = at([10, 96, 0, 70], 80);
    assert_eq!(
        pods(&run.from("client-1", move || tcp_many(rollout, N))),
        set(&["pod-b"])
    );
    // A connection to pod-b stays open while pod-b disappears from the slice; pod-a, terminating,
    // is now the only candidate and takes new flows; the open connection keeps pod-b.
    let mut open = run.from("client-1", move || {
        let mut c = Conversation::open(rollout, Duration::from_secs(2)).expect("connect");
        let first = c.ask().expect("first answer");
        (c, first)
    });
    assert_eq!(open.1.pod, "pod-b");
    run.change_manifest(&example_manifest().replace(
        "  - { addresses: [\"10.244.1.12\"], conditions: { ready: true }, nodeName: node-1 }\n---\n# No endpoints",
        "---\n# No endpoints",
    ));
    assert_eq!(
        pods(&run.from("client-1", move || tcp_many(rollout, N / 2))),
        set(&["pod-a"]),
        "terminating fallback"
    );
    let again = open.0.ask().expect("the open connection still answers");
    assert_eq!(again.pod, "pod-b", "an existing flow keeps its backend");
}

#[test]
fn no_endpoints_is_rejected_at_once_tc() {
    if privileged("no_endpoints_is_rejected_at_once_tc") {
        no_endpoints_is_rejected_at_once(false);
    }
}

#[test]
fn no_endpoints_is_rejected_at_once_xdp() {
    if privileged("no_endpoints_is_rejected_at_once_xdp") {
        no_endpoints_is_rejected_at_once(true);
    }
}

fn no_endpoints_is_rejected_at_once(xdp: bool) {
    let run = Running::start(xdp);
    let (tcp, udp, elapsed) = run.from("client-1", || {
        let started = Instant::now();
        let tcp = tcp_outcome(at([10, 96, 0, 80], 80), Duration::from_secs(2));
        let udp = udp_request(at([10, 96, 0, 80], 53));
        (tcp, udp, started.elapsed())
    });
    let tcp = tcp.expect_err("no endpoints");
    assert_eq!(
        tcp.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "TCP gets a reset: {tcp}"
    );
    let udp = udp.expect_err("no endpoints");
    let refused = udp.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    assert!(refused, "UDP gets ICMP port unreachable: {udp:#}");
    assert!(
        elapsed < Duration::from_secs(1),
        "answered at once, not timed out: {elapsed:?}"
    );
    let from_outside = run.from("node-2", || {
        tcp_outcome(at([10, 96, 0, 80], 80), Duration::from_secs(2))
    });
    assert_eq!(
        from_outside.expect_err("no endpoints").kind(),
        std::io::ErrorKind::ConnectionRefused,
        "from a host process too"
    );
}

/// Every node and pod of the testbed has an IPv6 twin address (docs/testbed.md). With the agents
/// running, pods on both nodes and the nodes themselves reach every pod over IPv6, TCP and UDP,
/// each seen by the pod under its own IPv6 address: the testbed's IPv6 routing works, and lb's
/// IPv6 stages pass traffic that is no Service's untouched.
#[test]
fn ipv6_reaches_every_pod_from_pods_and_nodes() {
    use std::net::SocketAddr;

    use support::cluster::{ECHO_TCP_PORT, ECHO_UDP_PORT};
    if !privileged("ipv6_reaches_every_pod_from_pods_and_nodes") {
        return;
    }
    let run = Running::start(false);
    let servers: Vec<(String, std::net::Ipv6Addr)> = (run.cluster.pods())
        .filter(|p| p.name != "client-1")
        .map(|p| (p.name.clone(), p.ip6))
        .collect();
    let clients = [
        ("client-1", run.cluster.pod("client-1").ip6),
        ("pod-c", run.cluster.pod("pod-c").ip6),
        ("node-1", run.cluster.node("node-1").ip6),
        ("node-2", run.cluster.node("node-2").ip6),
    ];
    for (client, client_ip6) in clients {
        let targets = servers.clone();
        let answers = run.from(client, move || {
            (targets.into_iter())
                .map(|(pod, ip6)| {
                    let tcp =
                        lb_testbed::echo::tcp_request(SocketAddr::new(ip6.into(), ECHO_TCP_PORT));
                    let udp = udp_request(SocketAddr::new(ip6.into(), ECHO_UDP_PORT));
                    (
                        pod,
                        tcp.map_err(|e| format!("{e:#}")),
                        udp.map_err(|e| format!("{e:#}")),
                    )
                })
                .collect::<Vec<_>>()
        });
        for (pod, tcp, udp) in answers {
            for (proto, reply) in [("TCP", tcp), ("UDP", udp)] {
                let reply = reply.unwrap_or_else(|e| panic!("{client} -> {pod} {proto}: {e}"));
                assert_eq!(reply.pod, pod, "{client} -> {pod} {proto}");
                assert_eq!(
                    reply.client_seen_by_pod.ip(),
                    IpAddr::V6(client_ip6),
                    "{client} -> {pod} {proto}: the pod sees the client's own address"
                );
            }
        }
    }
}

/// Dual-stack Services on top of the example, each with an EndpointSlice per family (the pods'
/// IPv6 twins), as the EndpointSlice controller writes them for `ipFamilyPolicy:
/// RequireDualStack`.
const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: echo-ds, namespace: demo }
spec:
  type: ClusterIP
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: "fd00:96::90"
  clusterIPs: ["fd00:96::90", 10.96.0.90]
  ports:
    - { name: tcp, port: 80, targetPort: 8080 }
    - { name: udp, port: 53, targetPort: 5353, protocol: UDP }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: echo-ds-v4, namespace: demo, labels: { kubernetes.io/service-name: echo-ds } }
addressType: IPv4
ports: [{ name: tcp, port: 8080 }, { name: udp, port: 5353, protocol: UDP }]
endpoints:
  - { addresses: ["10.244.1.11"], nodeName: node-1 }
  - { addresses: ["10.244.2.11"], nodeName: node-2 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: echo-ds-v6, namespace: demo, labels: { kubernetes.io/service-name: echo-ds } }
addressType: IPv6
ports: [{ name: tcp, port: 8080 }, { name: udp, port: 5353, protocol: UDP }]
endpoints:
  - { addresses: ["fd00:244:1::11"], nodeName: node-1 }
  - { addresses: ["fd00:244:2::11"], nodeName: node-2 }
---
apiVersion: v1
kind: Service
metadata: { name: web-ds, namespace: demo }
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.91, "fd00:96::91"]
  externalIPs: ["fd00:30:2::61"]
  ports:
    - { name: http, port: 80, targetPort: 8080, nodePort: 30100 }
    - { name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30101 }
status: { loadBalancer: { ingress: [{ ip: 172.30.1.61 }, { ip: "fd00:30:1::61" }] } }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-ds-v6, namespace: demo, labels: { kubernetes.io/service-name: web-ds } }
addressType: IPv6
ports: [{ name: http, port: 8080 }, { name: dns, port: 5353, protocol: UDP }]
endpoints:
  - { addresses: ["fd00:244:2::11"], nodeName: node-2 }
  - { addresses: ["fd00:244:2::12"], nodeName: node-2 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-ds-v4, namespace: demo, labels: { kubernetes.io/service-name: web-ds } }
addressType: IPv4
ports: [{ name: http, port: 8080 }, { name: dns, port: 5353, protocol: UDP }]
endpoints:
  - { addresses: ["10.244.2.11"], nodeName: node-2 }
  - { addresses: ["10.244.2.12"], nodeName: node-2 }
---
apiVersion: v1
kind: Service
metadata: { name: empty-ds, namespace: demo }
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIPs: ["fd00:96::92"]
  ports: [{ name: http, port: 80, targetPort: 8080 }]
"#;

/// IPv6 and dual-stack end to end: one dual-stack ClusterIP answering on both families from a
/// pod and a node, each family to its own endpoints and without SNAT; a dual-stack
/// LoadBalancer's IPv6 NodePort (on a node without endpoints: SNAT to that node, sent on to the
/// other), IPv6 load-balancer IP and IPv6 externalIP from outside, TCP and UDP; an IPv6
/// Service without endpoints refusing at once. With the tc programs, then with XDP.
#[test]
fn dual_stack_services_answer_on_both_families() {
    use std::net::SocketAddr;
    if !privileged("dual_stack_services_answer_on_both_families") {
        return;
    }
    for xdp in [false, true] {
        let mut run = Running::start(xdp);
        run.change_manifest(&(example_manifest() + "---\n" + DUAL_STACK));
        let client6 = run.cluster.pod("client-1").ip6;
        let sa = |addr: &str, port: u16| SocketAddr::new(addr.parse().unwrap(), port);

        // The same Service on both families, from a pod: each family to its own endpoints.
        for (target_tcp, target_udp, seen) in [
            (
                sa("fd00:96::90", 80),
                sa("fd00:96::90", 53),
                IpAddr::V6(client6),
            ),
            (
                sa("10.96.0.90", 80),
                sa("10.96.0.90", 53),
                IpAddr::V4(CLIENT_1),
            ),
        ] {
            let (tcp, udp) = run.from("client-1", move || {
                (tcp_many(target_tcp, N), udp_many(target_udp, N))
            });
            assert_eq!(
                pods(&tcp),
                set(&["pod-a", "pod-c"]),
                "{target_tcp} (xdp {xdp})"
            );
            assert_eq!(
                pods(&udp),
                set(&["pod-a", "pod-c"]),
                "{target_udp} (xdp {xdp})"
            );
            for reply in tcp.iter().chain(&udp) {
                assert_eq!(reply.answered_from.ip(), target_tcp.ip(), "{reply:?}");
                assert_eq!(reply.client_seen_by_pod.ip(), seen, "no SNAT: {reply:?}");
            }
        }
        // From a node's own namespace (hostNetwork), IPv6.
        let from_node = run.from("node-1", move || tcp_many(sa("fd00:96::90", 80), N / 2));
        assert!(pods(&from_node).is_subset(&set(&["pod-a", "pod-c"])));

        // From outside over IPv6: the NodePort on node-1, which has no endpoint of web-ds.
        let node1 = run.cluster.node("node-1").ip6;
        let (tcp, udp) = run.from("outside", move || {
            let node_port = |port| SocketAddr::new(node1.into(), port);
            (tcp_many(node_port(30100), N), udp_many(node_port(30101), N))
        });
        for reply in tcp.iter().chain(&udp) {
            assert!(
                ["pod-c", "pod-d"].contains(&reply.pod.as_str()),
                "{reply:?} (xdp {xdp})"
            );
            assert_eq!(reply.answered_from.ip(), IpAddr::V6(node1), "{reply:?}");
            assert_eq!(
                reply.client_seen_by_pod.ip(),
                IpAddr::V6(node1),
                "SNAT to node-1, so the answer comes back through it: {reply:?}"
            );
        }
        assert_eq!(pods(&tcp), set(&["pod-c", "pod-d"]), "xdp {xdp}");
        // The IPv6 load-balancer IP and externalIP, routed to node-1.
        run.cluster.route_external_via("node-1").unwrap();
        for target in [sa("fd00:30:1::61", 80), sa("fd00:30:2::61", 80)] {
            let replies = run.from("outside", move || tcp_many(target, N));
            assert_eq!(
                pods(&replies),
                set(&["pod-c", "pod-d"]),
                "{target} (xdp {xdp})"
            );
            for reply in &replies {
                assert_eq!(reply.answered_from, target, "{reply:?}");
            }
        }
        // No endpoints: refused at once (a TCP RST), not left to time out.
        let refused = run.from("client-1", move || {
            let started = Instant::now();
            let outcome = tcp_outcome(sa("fd00:96::92", 80), Duration::from_secs(3));
            (outcome.map(|r| r.pod), started.elapsed())
        });
        let (outcome, took) = refused;
        let err = outcome.expect_err("no endpoints");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{err} (xdp {xdp})"
        );
        assert!(
            took < Duration::from_secs(2),
            "refused at once, took {took:?}"
        );
        let counters = lb_userspace::loader::pinned_counters(run.agent("node-1").bpffs_dir())
            .expect("counters");
        assert_eq!(
            counters.get(&Counter::StageFailed),
            Some(&0),
            "{counters:?}"
        );
        if xdp {
            // Only IPv6 traffic came from outside: its known flows took the XDP stage.
            assert!(
                counters[&Counter::XdpTransmitted] > 0,
                "IPv6 flows on the XDP fast path: {counters:?}"
            );
        }
    }
}
