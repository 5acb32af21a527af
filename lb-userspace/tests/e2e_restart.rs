//! The packet path outlives the agent: long-lived flows on the two-node testbed keep flowing
//! across agent restarts (SIGTERM and kill -9, Services changed while no agent runs), an upgrade
//! from the v2 release keeps its flows, and `lb cleanup` removes everything.
//!
//! Every flow starts and ends inside the testbed's namespaces.

mod support;

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use support::{
    cluster::{Running, at, example_manifest, tcp_many},
    privileged,
    streams::{Flow, FlowReport},
};

const ECHO: [u8; 4] = [10, 96, 0, 10];
const WEB: [u8; 4] = [10, 96, 0, 20];
const NODE_1: [u8; 4] = [172, 30, 0, 11];
const NODE_2: [u8; 4] = [172, 30, 0, 12];

/// The example with pod-b added to `echo`: Maglev gives about a third of echo's slots to pod-b,
/// so a flow that kept no conntrack across the change would move (and be reset).
fn echo_with_pod_b() -> String {
    let example = example_manifest();
    let line =
        "  - { addresses: [\"10.244.2.11\"], conditions: { ready: true }, nodeName: node-2 }\n";
    assert!(
        example.contains(line),
        "the example's echo endpoints changed"
    );
    example.replacen(
        line,
        &format!(
            "{line}  - {{ addresses: [\"10.244.1.12\"], conditions: {{ ready: true }}, nodeName: node-1 }}\n"
        ),
        1,
    )
}

/// Tries a new connection to echo from client-1 until one answers; how long that took.
fn first_new_connection(running: &Running, within: Duration) -> Duration {
    let started = Instant::now();
    running.from("client-1", move || {
        loop {
            if lb_testbed::echo::tcp_request(at(ECHO, 80)).is_ok() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "no new connection to echo within {within:?} of the agents' start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

fn check_kept(report: &FlowReport, max_gap: Duration) {
    assert!(report.error.is_none(), "{}: {report:?}", report.name);
    assert_eq!(
        report.pods.len(),
        1,
        "{}: moved between pods: {report:?}",
        report.name
    );
    assert!(
        report.exchanges > 20,
        "{}: too few exchanges: {report:?}",
        report.name
    );
    assert!(
        report.max_gap <= max_gap,
        "{}: stalled for {:?}: {report:?}",
        report.name,
        report.max_gap
    );
}

#[test]
fn flows_survive_agent_restarts_and_cleanup_removes_everything() {
    if !privileged("flows_survive_agent_restarts_and_cleanup_removes_everything") {
        return;
    }
    let mut running = Running::start(false);
    let client = &running.cluster.pod("client-1").ns;
    let outside = &running.cluster.outside.ns;
    let mut flows = Vec::new();
    for i in 0..4 {
        flows.push(Flow::tcp(
            client,
            &format!("echo ClusterIP #{i}"),
            at(ECHO, 80),
        ));
    }
    for i in 0..2 {
        flows.push(Flow::tcp(
            client,
            &format!("web ClusterIP #{i}"),
            at(WEB, 80),
        ));
    }
    for i in 0..2 {
        flows.push(Flow::tcp(
            outside,
            &format!("web NodePort via node-1 (remote, SNAT) #{i}"),
            at(NODE_1, 30080),
        ));
    }
    flows.push(Flow::tcp(
        outside,
        "web NodePort via node-2 (local)",
        at(NODE_2, 30080),
    ));
    flows.push(Flow::tcp(
        outside,
        "web-local NodePort (eTP Local)",
        at(NODE_1, 30081),
    ));
    flows.push(Flow::udp(client, "echo UDP", at(ECHO, 53), 45053));
    // IPv6, through the stages the agent puts in its pinned program arrays: they outlive it too.
    let v6 = |addr: &str, port| std::net::SocketAddr::new(addr.parse().unwrap(), port);
    flows.push(Flow::tcp(
        client,
        "echo ClusterIP, IPv6",
        v6("fd00:96::10", 80),
    ));
    flows.push(Flow::tcp(
        outside,
        "web NodePort via node-1, IPv6 (remote, SNAT)",
        v6("fd00:30::11", 30080),
    ));
    std::thread::sleep(Duration::from_millis(300));

    // (how the agents stop, a Service changes meanwhile, the new agents ask for larger maps)
    let plan = [
        (libc::SIGTERM, false, false),
        (libc::SIGKILL, false, false),
        (libc::SIGKILL, true, false),
        (libc::SIGTERM, false, false),
        (libc::SIGKILL, false, false),
        (libc::SIGTERM, false, true),
    ];
    let mut slowest_new = Duration::ZERO;
    for (round, (signal, change, grow)) in plan.into_iter().enumerate() {
        if grow {
            // Every sized map at twice its default capacity: each is created anew and what
            // the old one holds (flows included) is carried over.
            running.options.extra_args = [
                "--max-frontends=131072",
                "--max-backends=524288",
                "--max-maglev-slots=16777216",
                "--max-conntrack-flows=2097152",
                "--max-affinity-clients=262144",
            ]
            .map(String::from)
            .to_vec();
        }
        let down = running.restart_agents(signal, |r| {
            if change {
                r.write_manifest(&echo_with_pod_b());
            }
            // No agent for a while: the pinned programs keep translating on their own.
            std::thread::sleep(Duration::from_millis(1500));
        });
        for node in ["node-1", "node-2"] {
            let log = running.agent(node).log();
            assert!(
                log.contains("replaced the programs of the links an earlier agent pinned"),
                "round {round}: the agent on {node} took over in place:\n{log}"
            );
            if grow {
                assert!(
                    log.contains("resize finished"),
                    "round {round}: the agent on {node} resized its maps:\n{log}"
                );
                let conntrack = (running.agent(node).bpffs_dir())
                    .join(lb_common::maps::PIN_LAYOUT_VERSION)
                    .join(lb_common::maps::CONNTRACK_MAP);
                let info = aya::maps::MapInfo::from_pin(&conntrack).expect("pinned conntrack");
                // Two entries a flow.
                assert_eq!(
                    info.max_entries(),
                    4_194_304,
                    "{node}: the larger map is in use"
                );
            }
        }
        let new = first_new_connection(&running, Duration::from_secs(1));
        slowest_new = slowest_new.max(new);
        eprintln!(
            "restart {round} ({}{}): agents away {down:?}, first new connection after {new:?}",
            if signal == libc::SIGKILL {
                "kill -9"
            } else {
                "SIGTERM"
            },
            if grow {
                ", every map twice as large"
            } else {
                ""
            }
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The change made while no agent ran is programmed: pod-b now serves new flows too.
    let pods = running.from("client-1", || {
        support::cluster::pods(&tcp_many(at(ECHO, 80), 40))
    });
    assert!(pods.contains("pod-b"), "echo after the change: {pods:?}");

    let reports: Vec<FlowReport> = flows.into_iter().map(Flow::finish).collect();
    let mut worst = Duration::ZERO;
    for report in &reports {
        check_kept(report, Duration::from_secs(1));
        worst = worst.max(report.max_gap);
    }
    eprintln!(
        "restarts: {} survived by {} TCP flows (2 of them IPv6) and 1 UDP flow, 0 resets, longest gap {worst:?}, \
         new connections within {slowest_new:?}; exchanges {:?}",
        plan.len(),
        reports.len() - 1,
        reports.iter().map(|r| r.exchanges).collect::<Vec<_>>()
    );

    // The agents stop for good; the packet path still serves...
    let pin_dirs: Vec<PathBuf> = ["node-1", "node-2"]
        .iter()
        .map(|n| running.agent(n).bpffs_dir().to_owned())
        .collect();
    running.restart_agents(libc::SIGTERM, |_| {});
    for agent in std::mem::take(&mut running.agents) {
        agent.halt(libc::SIGTERM).unwrap();
    }
    first_new_connection(&running, Duration::from_secs(1));
    // ... until `lb cleanup` removes it.
    for dir in &pin_dirs {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(["cleanup", "--bpffs-dir"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("links (programs detached)"), "{text}");
        assert!(!dir.exists(), "{} removed", dir.display());
    }
    // The kernel releases an unpinned link from a work queue: allow it a moment.
    let detached = running.from("client-1", || {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let outcome = support::cluster::tcp_outcome(at(ECHO, 80), Duration::from_millis(300));
            if outcome.is_err() || Instant::now() > deadline {
                return outcome;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(
        detached.is_err(),
        "nothing translates after cleanup: {detached:?}"
    );
}

/// Unpacks the v2 release's `lb` (tests/fixtures/README.md) into a temporary file.
fn v2_agent() -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lb-v2-80bf481.xz");
    let path = std::env::temp_dir().join(format!("lb-v2-{}", std::process::id()));
    let out = std::process::Command::new("xz")
        .arg("-dc")
        .arg(&fixture)
        .output()
        .expect("xz (xz-utils) unpacks the v2 fixture");
    assert!(
        out.status.success(),
        "xz -dc {}: {out:?}",
        fixture.display()
    );
    std::fs::write(&path, out.stdout).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// An upgrade from the v2 release: its agent detaches when it stops (its links were not
/// pinned), so flows idle during the switch are what can survive; they do, on the pods they
/// had, although the Service changed during the upgrade.
#[test]
fn an_upgrade_from_the_v2_layout_keeps_established_flows() {
    if !privileged("an_upgrade_from_the_v2_layout_keeps_established_flows") {
        return;
    }
    let old = v2_agent();
    let mut running = Running::start_with_agent(&old, &[]);
    let (go, wait) = mpsc::channel::<()>();
    let (first_tx, first_rx) = mpsc::channel();
    let flows = running
        .cluster
        .pod("client-1")
        .ns
        .spawn_thread(move || {
            let mut conversations: Vec<_> = (0..8)
                .map(|_| {
                    lb_testbed::echo::Conversation::open(at(ECHO, 80), Duration::from_secs(2))
                        .expect("connect through the v2 agent")
                })
                .collect();
            let udp = std::net::UdpSocket::bind(("0.0.0.0", 45054)).unwrap();
            udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            udp.connect(at(ECHO, 53)).unwrap();
            let udp_ask = || {
                udp.send(b"hello").unwrap();
                let mut buf = [0u8; 512];
                let n = udp.recv(&mut buf).expect("UDP answer");
                String::from_utf8_lossy(&buf[..n]).into_owned()
            };
            let before: Vec<String> = conversations
                .iter_mut()
                .map(|c| c.ask().expect("first exchange").pod)
                .collect();
            let udp_before = udp_ask();
            first_tx.send(()).unwrap();
            wait.recv().unwrap();
            let after: Vec<Result<String, String>> = conversations
                .iter_mut()
                .map(|c| c.ask().map(|r| r.pod).map_err(|e| format!("{e:#}")))
                .collect();
            (before, after, udp_before, udp_ask())
        })
        .unwrap();
    first_rx.recv().unwrap();
    running.restart_agents(libc::SIGTERM, |r| r.write_manifest(&echo_with_pod_b()));
    for node in ["node-1", "node-2"] {
        let log = running.agent(node).log();
        assert!(
            log.contains("carried the previous layout's state over"),
            "the agent on {node} migrated the v2 maps:\n{log}"
        );
        let pins = running.agent(node).bpffs_dir().to_owned();
        assert!(!pins.join("v2").exists(), "v2 pins removed on {node}");
        assert!(pins.join("v3/links").is_dir());
    }
    go.send(()).unwrap();
    let (before, after, udp_before, udp_after) = flows.join().unwrap();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(Ok(b), a.as_ref(), "connection {i} after the upgrade");
    }
    let pod_of = |text: &str| {
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        pod_of(&udp_before),
        pod_of(&udp_after),
        "the UDP flow kept its pod"
    );
    eprintln!(
        "upgrade from v2: {} TCP connections and 1 UDP flow kept their pods ({before:?})",
        before.len()
    );
    let _ = std::fs::remove_file(old);
}
