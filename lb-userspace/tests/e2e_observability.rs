//! The operator's commands and the per-Service metrics on the two-node testbed, against real
//! traffic: `lb services` lists what the maps hold with names and counters, `lb explain`
//! predicts the backend a real flow then gets, `lb conntrack` shows (and flushes) the flows
//! made, `lb monitor` streams them as they start, and `/metrics` counts them per Service.

mod support;

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use lb_testbed::echo::udp_request_from;
use lb_testbed::testbed::AgentOptions;
use support::{
    cluster::{Running, at, http_get, tcp_many},
    privileged,
};

const ECHO_VIP: [u8; 4] = [10, 96, 0, 10];
const CLIENT_1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

fn lb(args: &[&str], bpffs: &Path, state: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .arg("--bpffs-dir")
        .arg(bpffs)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("run lb");
    assert!(
        out.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn operator_commands_and_metrics_show_what_the_packet_path_does() {
    if !privileged("operator_commands_and_metrics_show_what_the_packet_path_does") {
        return;
    }
    // The agents log JSON, as `--log-format json` asks (for log pipelines).
    let run = Running::start_with_options(AgentOptions {
        extra_args: vec!["--log-format".to_owned(), "json".to_owned()],
        ..AgentOptions::default()
    });
    for agent in &run.agents {
        let log = agent.log();
        // Whole lines only: the agent may be writing one as the file is read.
        let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            let entry: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            assert!(
                entry["level"].is_string() && entry["fields"].is_object(),
                "{line}"
            );
        }
        assert!(log.contains("\"message\":\"agent ready\""), "{log}");
        assert!(!log.contains('\x1b'), "no terminal escapes in a log file");
    }
    let node1 = &run.agents[0];
    let (bpffs, state) = (node1.bpffs_dir().to_owned(), node1.state_dir().to_owned());
    // The state file is written within a second of the first sync.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !state.join(lb_userspace::state::STATE_FILE).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no state file in {}",
            state.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // lb services: the example's Services by name, with backends, nodes and policies.
    let services = json(&lb(&["services", "-o", "json"], &bpffs, &state));
    let find = |name: &str| {
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["namespace"] == "demo" && s["name"] == name)
            .unwrap_or_else(|| panic!("demo/{name} in {services:#}"))
            .clone()
    };
    let echo = find("echo");
    let cluster_ip = echo["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["address"] == "10.96.0.10" && f["port"] == 80)
        .expect("echo's ClusterIP frontend")
        .clone();
    assert_eq!(cluster_ip["kind"], "ClusterIP");
    assert_eq!(cluster_ip["port_name"], "tcp-echo");
    let nodes: Vec<&str> = cluster_ip["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-1", "node-2"], "{cluster_ip:#}");
    assert!(
        find("sticky")["frontends"][0]["affinity_timeout_s"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "sticky has ClientIP affinity"
    );
    assert_eq!(find("web-local")["external_traffic_policy"], "Local");
    assert_eq!(find("node-cache")["internal_traffic_policy"], "Local");
    let web = find("web");
    assert!(
        web["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "NodePort"),
        "{web:#}"
    );
    assert!(
        find("upstream")["not_programmed"]
            .as_str()
            .unwrap()
            .contains("ExternalName")
    );
    assert!(
        find("echo-headless")["not_programmed"]
            .as_str()
            .unwrap()
            .contains("headless")
    );
    let table = lb(&["services"], &bpffs, &state);
    assert!(
        table.contains("demo/echo") && table.contains("10.96.0.10:80/TCP (tcp-echo)"),
        "{table}"
    );

    // lb explain predicts the backend of real UDP flows from client-1 (a pod on node-1).
    let echo_udp = at(ECHO_VIP, 53);
    let explain_udp = |port: u16| {
        let from = format!("{CLIENT_1}:{port}");
        let args = [
            "explain",
            "--from",
            &from,
            "--to",
            "10.96.0.10:53",
            "--proto",
            "udp",
            "--origin",
            "pod",
            "-o",
            "json",
        ];
        json(&lb(&args, &bpffs, &state))
    };
    for port in 41000..41012u16 {
        let said = explain_udp(port);
        assert_eq!(said["verdict"]["outcome"], "backend", "{said:#}");
        assert_eq!(said["verdict"]["chosen_by"], "maglev", "{said:#}");
        let reply = run
            .from("client-1", move || udp_request_from(echo_udp, port))
            .expect("UDP echo");
        let pod_ip = run.cluster.pod(&reply.pod).ip.to_string();
        assert_eq!(
            said["verdict"]["address"],
            pod_ip.as_str(),
            "{said:#} vs {reply:?}"
        );
        // Now it is a known flow: explain says so, with the same backend.
        let again = explain_udp(port);
        assert_eq!(again["verdict"]["chosen_by"], "conntrack", "{again:#}");
        assert_eq!(again["verdict"]["address"], pod_ip.as_str());
    }

    // lb monitor: started, then a connection; its new-flow event names the Service.
    let mut monitor = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args([
            "monitor",
            "--json",
            "--count",
            "1",
            "--duration",
            "30s",
            "--bpffs-dir",
        ])
        .arg(&bpffs)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lb monitor");
    let mut stderr = BufReader::new(monitor.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    let replies = run.from("client-1", || tcp_many(at(ECHO_VIP, 80), 1));
    let out = monitor
        .wait_with_output()
        .expect("monitor exits after one event");
    let event = json(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("{}"),
    );
    assert_eq!(event["event"], "new-flow", "{event:#}");
    assert_eq!(event["service"], "demo/echo (ClusterIP)", "{event:#}");
    assert_eq!(event["origin"], "pod");
    let answered_by = run.cluster.pod(&replies[0].pod).ip.to_string();
    assert_eq!(
        event["backend"],
        format!("{answered_by}:8080").as_str(),
        "{event:#}"
    );

    // lb conntrack: the flows made, by Service; --flush removes them.
    let flows = json(&lb(
        &["conntrack", "--service", "demo/echo", "-o", "json"],
        &bpffs,
        &state,
    ));
    let flows = flows.as_array().unwrap();
    assert!(flows.len() >= 13, "12 UDP flows and a TCP one: {flows:#?}");
    assert!(
        flows
            .iter()
            .all(|f| f["service"].as_str().unwrap().starts_with("demo/echo"))
    );
    assert!(
        flows
            .iter()
            .any(|f| f["client"] == "10.244.1.2:41000" && f["protocol"] == "UDP")
    );
    let flushed = lb(
        &["conntrack", "--service", "demo/echo", "--flush"],
        &bpffs,
        &state,
    );
    assert!(flushed.starts_with("flushed "), "{flushed}");
    let left = json(&lb(
        &["conntrack", "--service", "demo/echo", "-o", "json"],
        &bpffs,
        &state,
    ));
    assert_eq!(left.as_array().unwrap().len(), 0, "{left:#}");

    // Per-Service metrics: echo's counters, named, from node-1's /metrics; and lb services
    // shows the same new flows.
    let text = run.from("node-1", || http_get("127.0.0.1:10249", "/metrics"));
    let labels = "{namespace=\"demo\",service=\"echo\",port_name=\"udp-echo\"}";
    let new_flows = metric(&text, &format!("lb_service_new_flows_total{labels}"))
        .unwrap_or_else(|| panic!("echo's udp-echo new flows in\n{text}"));
    assert!(new_flows >= 12.0, "{new_flows}");
    let forward = metric(&text, &format!("lb_service_packets_forward_total{labels}")).unwrap();
    assert!(forward >= 12.0, "{forward}");
    assert!(
        text.lines().any(|l| l.starts_with("lb_backend_new_flows_total{namespace=\"demo\",service=\"echo\",port_name=\"udp-echo\",backend=\"10.244.")),
        "{text}"
    );
    let services = json(&lb(
        &["services", "--service", "demo/echo", "-o", "json"],
        &bpffs,
        &state,
    ));
    let udp = services[0]["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["protocol"] == "UDP" && f["kind"] == "ClusterIP")
        .unwrap()
        .clone();
    assert!(
        udp["counters"]["new_flows"].as_u64().unwrap() >= 12,
        "{udp:#}"
    );

    // lb stats: the node-wide counters by name, drops by reason among them.
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["stats", "-o", "json", "--bpffs-dir"])
        .arg(&bpffs)
        .output()
        .unwrap();
    let stats = json(&String::from_utf8_lossy(&out.stdout));
    assert!(stats["translated"].as_u64().unwrap() >= 13, "{stats:#}");
    for reason in [
        "dropped_no_backend",
        "dropped_source_range",
        "snat_failed",
        "rejected",
    ] {
        assert!(stats[reason].is_u64(), "{reason} in {stats:#}");
    }

    // --version names the commit; completions are generated.
    let version = Command::new(env!("CARGO_BIN_EXE_lb"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(version.contains("(commit "), "{version}");
    let completion = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&completion.stdout).contains("explain"));
}
