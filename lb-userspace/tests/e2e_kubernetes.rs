//! The real `lb agent` binary in Kubernetes mode on the two-node testbed: each node's agent
//! watches a fake API server (real HTTP, on the node's own loopback) holding the bundled
//! example's objects, and real traffic follows changes made through the API. Also checks what a
//! cluster's load balancer and kubelet would ask: /healthz and the healthCheckNodePort.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use support::{
    cluster::{
        Running, api_objects, at, example_manifest, http_get, pods, set, tcp_many, tcp_outcome,
    },
    privileged,
};

const N: usize = 24;

#[test]
fn agents_follow_the_api_server_and_serve_health_checks() {
    if !privileged("agents_follow_the_api_server_and_serve_health_checks") {
        return;
    }
    let mut run = Running::start_kubernetes();
    for node in ["node-1", "node-2"] {
        run.agent(node)
            .wait_for_log("synced", Duration::from_secs(20))
            .expect("the agent syncs from the API server");
    }
    let echo = at([10, 96, 0, 10], 80);
    assert_eq!(
        pods(&run.from("client-1", move || tcp_many(echo, N))),
        set(&["pod-a", "pod-c"])
    );
    let nodeport = run.from("outside", || tcp_many(at([172, 30, 0, 11], 30080), N));
    assert_eq!(pods(&nodeport), set(&["pod-c", "pod-d"]));

    // What kubelet's probes and a cloud load balancer ask, from outside the nodes.
    let healthz = run.from("outside", || http_get("172.30.0.11:10256", "/healthz"));
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let here = run.from("outside", || http_get("172.30.0.11:32081", "/"));
    assert!(
        here.starts_with("HTTP/1.1 200") && here.contains("\"localEndpoints\":1"),
        "{here}"
    );
    let there = run.from("outside", || http_get("172.30.0.12:32081", "/"));
    assert!(
        there.starts_with("HTTP/1.1 503") && there.contains("\"localEndpoints\":0"),
        "{there}"
    );

    // Changes through the API: pod-c leaves echo's slice; web is deleted.
    let api = run.api.as_ref().expect("kubernetes mode").clone_handle();
    let syncs: Vec<usize> = run
        .agents
        .iter()
        .map(|a| a.log().matches("synced").count())
        .collect();
    let (_, slices) = api_objects(&example_manifest());
    let mut echo_slice = slices
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some("echo-x7k2p"))
        .unwrap();
    echo_slice
        .endpoints
        .as_mut()
        .unwrap()
        .retain(|e| e.addresses[0] != "10.244.2.11");
    api.apply(&echo_slice);
    assert!(api.delete::<Service>("demo", "web"));
    for (agent, before) in run.agents.iter_mut().zip(syncs) {
        agent
            .wait_for_log_count("synced", before + 1, Duration::from_secs(10))
            .expect("the agent applies the API change");
    }
    // Both changes may arrive in one sync or two, in either order (Services and slices are
    // separate watches); wait until both are programmed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let gone = run.from("outside", || {
            tcp_outcome(at([172, 30, 0, 11], 30080), Duration::from_millis(500)).is_err()
        });
        let left = pods(&run.from("client-1", move || tcp_many(echo, N))) == set(&["pod-a"]);
        if (gone && left) || std::time::Instant::now() > deadline {
            assert!(gone, "the deleted Service's NodePort must stop answering");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pods(&run.from("client-1", move || tcp_many(echo, N))),
        set(&["pod-a"])
    );
}

/// On a node without kube-proxy, in-cluster configuration names the `kubernetes` ClusterIP,
/// which nobody programs before lb syncs: `--master` (or KUBERNETES_SERVICE_HOST/PORT) gives
/// the agent the API server's real address.
#[test]
fn master_overrides_the_configured_api_server_address() {
    if !privileged("master_overrides_the_configured_api_server_address") {
        return;
    }
    let mut run = Running::start_kubernetes_via_master();
    for node in ["node-1", "node-2"] {
        run.agent(node)
            .wait_for_log("synced", Duration::from_secs(20))
            .expect("the agent syncs through --master");
        assert!(
            run.agent(node)
                .log()
                .contains("API server address from --master")
        );
    }
    let echo = at([10, 96, 0, 10], 80);
    assert_eq!(
        pods(&run.from("client-1", move || tcp_many(echo, N))),
        set(&["pod-a", "pod-c"])
    );
}

/// Where kube-proxy already listens (10256 /healthz, 10249 /metrics), an agent with the default
/// addresses still starts and programs Services, and says which settings to change; with the
/// README's "beside kube-proxy" addresses it serves both on free ports.
#[test]
fn agents_start_beside_kube_proxys_listeners() {
    if !privileged("agents_start_beside_kube_proxys_listeners") {
        return;
    }
    let mut run = Running::start(false);
    let held = std::sync::Mutex::new(Vec::new());
    run.restart_agents(libc::SIGTERM, |run| {
        for node in &run.cluster.nodes {
            let listeners = node
                .ns
                .run(|| {
                    (
                        std::net::TcpListener::bind("0.0.0.0:10256").unwrap(),
                        std::net::TcpListener::bind("127.0.0.1:10249").unwrap(),
                    )
                })
                .expect("kube-proxy's ports taken in the node's namespace");
            held.lock().unwrap().push(listeners);
        }
    });
    for agent in &run.agents {
        let log = agent.log();
        for flag in ["--healthz-bind-address", "--metrics-bind-address"] {
            assert!(
                log.contains(flag) && log.contains("running without it"),
                "the agent names {flag}:\n{log}"
            );
        }
    }
    let replies = run.from("client-1", || tcp_many(at([10, 96, 0, 10], 80), N / 4));
    assert!(!replies.is_empty(), "Services are programmed all the same");

    // The README's addresses beside kube-proxy.
    run.options.extra_args = [
        "--healthz-bind-address",
        "0.0.0.0:10356",
        "--metrics-bind-address",
        "127.0.0.1:10349",
    ]
    .map(str::to_owned)
    .to_vec();
    run.restart_agents(libc::SIGTERM, |_| {});
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    for setting in [
        "healthzBindAddress: \"0.0.0.0:10356\"",
        "metricsBindAddress: \"127.0.0.1:10349\"",
    ] {
        assert!(readme.contains(setting), "README documents {setting}");
    }
    for agent in &run.agents {
        assert!(
            !agent.log().contains("running without it"),
            "{}",
            agent.log()
        );
    }
    let (health, metrics) = run.from("node-1", || {
        (
            http_get("127.0.0.1:10356", "/healthz"),
            http_get("127.0.0.1:10349", "/metrics"),
        )
    });
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(metrics.contains("lb_syncs"), "{metrics}");
    drop(held);
}
