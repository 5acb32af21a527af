//! `cargo xtask demo`: the bundled example on the two-node testbed, with a report that answers
//! "why does a NodePort answer on every node?" and "what does a LoadBalancer Service create?"
//! from real requests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use lb_testbed::{
    cleanup,
    echo::{Conversation, EchoServer, Reply, udp_request},
    testbed::{AgentOptions, AgentProcess, Cluster, LAYOUT, OUTSIDE_IP, ipv6_twin},
};

use crate::{step, workspace_root};

const REQUESTS: usize = 6;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// What a probe should see.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Answered,
    /// Rejected at once: TCP reset / ICMP port unreachable.
    Refused,
    /// No answer at all (dropped).
    Silent,
}

/// Requests from one place to one Service address.
struct Probe {
    service: &'static str,
    address_kind: &'static str,
    /// A pod name, a node name (its own namespace: hostNetwork), or "outside".
    from: &'static str,
    /// For "outside": the node the LoadBalancer/externalIP ranges are routed through.
    via: Option<&'static str>,
    target: SocketAddr,
    proto: Proto,
    expect: Expect,
}

enum Outcome {
    Answered(Vec<Reply>),
    Refused,
    Silent,
    Failed(String),
}

fn at(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::from(a).into(), port)
}

/// An IPv6 target: the twin of the IPv4 address `a` (`lb_testbed::testbed::ipv6_twin`).
fn at6(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(ipv6_twin(Ipv4Addr::from(a)).into(), port)
}

/// demo/echo's IPv6 ClusterIP (deploy/examples/services.yaml).
const ECHO_VIP6: &str = "fd00:96::10";
const NODE1: [u8; 4] = [172, 30, 0, 11];
const NODE2: [u8; 4] = [172, 30, 0, 12];

fn probes() -> Vec<Probe> {
    use Expect::*;
    use Proto::*;
    let p = |service, address_kind, from, via, target, proto, expect| Probe {
        service,
        address_kind,
        from,
        via,
        target,
        proto,
        expect,
    };
    vec![
        p(
            "demo/echo",
            "ClusterIP",
            "client-1",
            None,
            at([10, 96, 0, 10], 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/echo",
            "ClusterIP",
            "client-1",
            None,
            at([10, 96, 0, 10], 53),
            Udp,
            Answered,
        ),
        p(
            "demo/echo",
            "ClusterIP",
            "node-1",
            None,
            at([10, 96, 0, 10], 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/echo",
            "ClusterIP, IPv6 (dual-stack)",
            "client-1",
            None,
            SocketAddr::new(ECHO_VIP6.parse::<Ipv6Addr>().unwrap().into(), 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/echo",
            "ClusterIP, IPv6 (dual-stack)",
            "client-1",
            None,
            SocketAddr::new(ECHO_VIP6.parse::<Ipv6Addr>().unwrap().into(), 53),
            Udp,
            Answered,
        ),
        p(
            "demo/echo",
            "ClusterIP, IPv6 (dual-stack)",
            "node-1",
            None,
            SocketAddr::new(ECHO_VIP6.parse::<Ipv6Addr>().unwrap().into(), 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/web",
            "NodePort on node-1",
            "outside",
            None,
            at(NODE1, 30080),
            Tcp,
            Answered,
        ),
        p(
            "demo/web",
            "NodePort on node-1, IPv6",
            "outside",
            None,
            at6(NODE1, 30080),
            Tcp,
            Answered,
        ),
        p(
            "demo/web",
            "NodePort on node-2, IPv6",
            "outside",
            None,
            at6(NODE2, 30080),
            Tcp,
            Answered,
        ),
        p(
            "demo/web",
            "NodePort on node-2",
            "outside",
            None,
            at(NODE2, 30080),
            Tcp,
            Answered,
        ),
        p(
            "demo/web",
            "NodePort on node-1",
            "outside",
            None,
            at(NODE1, 30053),
            Udp,
            Answered,
        ),
        p(
            "demo/web-local",
            "NodePort on node-1",
            "outside",
            None,
            at(NODE1, 30081),
            Tcp,
            Answered,
        ),
        p(
            "demo/web-local",
            "NodePort on node-2",
            "outside",
            None,
            at(NODE2, 30081),
            Tcp,
            Silent,
        ),
        p(
            "demo/shop",
            "ClusterIP",
            "client-1",
            None,
            at([10, 96, 0, 30], 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/shop",
            "NodePort on node-1",
            "outside",
            None,
            at(NODE1, 30090),
            Tcp,
            Answered,
        ),
        p(
            "demo/shop",
            "NodePort on node-2",
            "outside",
            None,
            at(NODE2, 30090),
            Tcp,
            Answered,
        ),
        p(
            "demo/shop",
            "LoadBalancer IP",
            "outside",
            Some("node-1"),
            at([172, 30, 1, 10], 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/shop",
            "LoadBalancer IP",
            "outside",
            Some("node-2"),
            at([172, 30, 1, 10], 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/legacy",
            "externalIP",
            "outside",
            Some("node-2"),
            at([172, 30, 2, 10], 8080),
            Tcp,
            Answered,
        ),
        p(
            "demo/legacy",
            "ClusterIP (hairpin)",
            "pod-a",
            None,
            at([10, 96, 0, 40], 8080),
            Tcp,
            Answered,
        ),
        p(
            "demo/sticky",
            "ClusterIP, ClientIP affinity",
            "client-1",
            None,
            at([10, 96, 0, 50], 53),
            Udp,
            Answered,
        ),
        p(
            "demo/node-cache",
            "ClusterIP, internal Local",
            "pod-c",
            None,
            at([10, 96, 0, 60], 53),
            Udp,
            Answered,
        ),
        p(
            "demo/rollout",
            "ClusterIP, 1 terminating",
            "client-1",
            None,
            at([10, 96, 0, 70], 80),
            Tcp,
            Answered,
        ),
        p(
            "demo/idle",
            "ClusterIP, no endpoints",
            "client-1",
            None,
            at([10, 96, 0, 80], 80),
            Tcp,
            Refused,
        ),
        p(
            "demo/idle",
            "ClusterIP, no endpoints",
            "client-1",
            None,
            at([10, 96, 0, 80], 53),
            Udp,
            Refused,
        ),
    ]
}

pub fn run(lb: &Path) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("the demo builds network namespaces and loads BPF programs: run it as root");
    }
    cleanup::install_interrupt_handler();
    let result = run_demo(lb);
    cleanup::cleanup_all();
    result
}

fn run_demo(lb: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let manifest = workspace_root().join("deploy/examples/services.yaml");
    step(&format!(
        "what {} asks of node-1 (`lb translate --node-name node-1 --node-address 172.30.0.11 --node-address fd00:30::11`; * = pod on node-1)",
        manifest.display()
    ));
    let status = Command::new(lb)
        .arg("translate")
        .arg("--manifests")
        .arg(&manifest)
        .args(["--node-name", "node-1", "--node-address", "172.30.0.11"])
        .args(["--node-address", "fd00:30::11"])
        .status()?;
    anyhow::ensure!(status.success(), "lb translate reported errors");

    step(
        "building the testbed: two nodes with pods, an underlay switch and an outside client, all network namespaces (docs/testbed.md)",
    );
    let cluster = Cluster::two_nodes()?;
    let _servers = cluster
        .pods()
        .filter(|p| p.name != "client-1")
        .map(|p| EchoServer::start(&p.ns, &p.name, 8080, 5353))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for node in &LAYOUT {
        eprintln!("    {} {}: {}", node.name, node.ip, node.pods_line());
    }
    eprintln!("    outside {OUTSIDE_IP} (a client on the network, not a node)");

    step("starting one `lb agent` per node (as the DaemonSet would), tc mode");
    let agents = ["node-1", "node-2"]
        .iter()
        .map(|node| AgentProcess::start(&cluster, node, lb, &manifest, &AgentOptions::default()))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let probes = probes();
    step(&format!(
        "sending real requests: {} probes of {REQUESTS} requests each",
        probes.len()
    ));
    let progress = indicatif::ProgressBar::new(probes.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("    {bar:30} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    let mut results = Vec::new();
    for probe in &probes {
        progress.set_message(format!("{} {}", probe.service, probe.target));
        if let Some(node) = probe.via {
            cluster.route_external_via(node)?;
        }
        results.push(send(&cluster, probe)?);
        progress.inc(1);
    }
    progress.finish_and_clear();

    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    // Wrap cells to fit a real terminal; leave the table alone when the width is unknown or tiny.
    if table.width().is_some_and(|w| w >= 80) {
        table.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    }
    table.set_header([
        "SERVICE",
        "ADDRESS",
        "REQUEST",
        "FROM",
        "ANSWERED BY",
        "SOURCE THE POD SAW",
        "OK",
    ]);
    let mut unexpected = 0;
    for (probe, outcome) in probes.iter().zip(&results) {
        let proto = if probe.proto == Proto::Tcp {
            "TCP"
        } else {
            "UDP"
        };
        let from = match probe.via {
            Some(node) => format!("outside via {node}"),
            None if probe.from.starts_with("node-") => format!("{} (hostNetwork)", probe.from),
            None => probe.from.to_owned(),
        };
        let (answered, seen, ok) = describe(probe, outcome);
        if !ok {
            unexpected += 1;
        }
        table.add_row([
            probe.service.to_owned(),
            probe.address_kind.to_owned(),
            format!("{}/{proto}", probe.target),
            from,
            answered,
            seen,
            if ok {
                "yes".to_owned()
            } else {
                "NO".to_owned()
            },
        ]);
    }
    println!("{table}");
    explain(&probes, &results);

    for (node, agent) in ["node-1", "node-2"].iter().zip(&agents) {
        step(&format!("packet counters on {node} (`lb stats`)"));
        let status = Command::new(lb)
            .arg("stats")
            .arg("--bpffs-dir")
            .arg(agent.bpffs_dir())
            .status()?;
        anyhow::ensure!(status.success(), "lb stats failed");
    }
    let node1 = &agents[0];
    let on_node1 = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new(lb)
            .args(args)
            .arg("--bpffs-dir")
            .arg(node1.bpffs_dir())
            .arg("--state-dir")
            .arg(node1.state_dir())
            .status()?;
        anyhow::ensure!(status.success(), "lb {} failed", args.join(" "));
        Ok(())
    };
    step(
        "what node-1 programmed, by Service, with the traffic above counted (`lb services`): a \
         NodePort and a LoadBalancer IP are frontends on every node, each with the same backends",
    );
    on_node1(&["services"])?;
    step(
        "why a flow gets its backend (`lb explain`): a client outside the cluster reaching the \
         `web` NodePort on node-1, whose pods run on node-2",
    );
    on_node1(&[
        "explain",
        "--from",
        "172.30.0.100:40000",
        "--to",
        "172.30.0.11:30080",
    ])?;
    step(
        "stopping the agents (the programs would stay attached for the next agent; the demo \
         unpins them) and tearing the testbed down",
    );
    for agent in agents {
        let status = agent.stop()?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
    }
    eprintln!("    demo took {:.1} s", started.elapsed().as_secs_f64());
    anyhow::ensure!(
        unexpected == 0,
        "{unexpected} probe(s) saw unexpected behaviour (marked NO above)"
    );
    Ok(())
}

fn send(cluster: &Cluster, probe: &Probe) -> anyhow::Result<Outcome> {
    let ns = match probe.from {
        "outside" => &cluster.outside.ns,
        node if node.starts_with("node-") => &cluster.node(node).ns,
        pod => &cluster.pod(pod).ns,
    };
    let (target, proto) = (probe.target, probe.proto);
    let wait = if probe.expect == Expect::Silent {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    ns.run(move || {
        let mut replies = Vec::new();
        for _ in 0..REQUESTS {
            let reply = match proto {
                Proto::Tcp => Conversation::open(target, wait)
                    .map_err(anyhow::Error::from)
                    .and_then(|mut c| c.ask()),
                Proto::Udp => udp_request(target),
            };
            match reply {
                Ok(reply) => replies.push(reply),
                Err(err) => {
                    let io = err
                        .chain()
                        .find_map(|e| e.downcast_ref::<std::io::Error>().map(std::io::Error::kind));
                    return match io {
                        Some(std::io::ErrorKind::ConnectionRefused) => Outcome::Refused,
                        Some(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                            Outcome::Silent
                        }
                        _ => Outcome::Failed(format!("{err:#}")),
                    };
                }
            }
        }
        Outcome::Answered(replies)
    })
    .context("probe thread")
}

fn count_by<T: Ord + Clone>(items: impl Iterator<Item = T>) -> BTreeMap<T, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
}

/// (answered by, source the pod saw, as expected)
fn describe(probe: &Probe, outcome: &Outcome) -> (String, String, bool) {
    match outcome {
        Outcome::Answered(replies) => {
            let pods = count_by(replies.iter().map(|r| r.pod.clone()))
                .iter()
                .map(|(p, n)| format!("{p} x{n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let seen: BTreeSet<IpAddr> =
                replies.iter().map(|r| r.client_seen_by_pod.ip()).collect();
            let seen = seen
                .iter()
                .map(|ip| name_of(*ip))
                .collect::<Vec<_>>()
                .join(", ");
            let from_target = replies.iter().all(|r| r.answered_from == probe.target);
            (pods, seen, probe.expect == Expect::Answered && from_target)
        }
        Outcome::Refused => (
            if probe.proto == Proto::Tcp {
                "refused (TCP reset)"
            } else {
                "refused (ICMP port unreachable)"
            }
            .to_owned(),
            "-".to_owned(),
            probe.expect == Expect::Refused,
        ),
        Outcome::Silent => (
            "no answer (dropped)".to_owned(),
            "-".to_owned(),
            probe.expect == Expect::Silent,
        ),
        Outcome::Failed(err) => (format!("error: {err}"), "-".to_owned(), false),
    }
}

/// An address (either family: IPv6 ones are the testbed's twins) with the testbed name it
/// belongs to.
fn name_of(ip: IpAddr) -> String {
    let is = |v4: Ipv4Addr| ip == IpAddr::V4(v4) || ip == IpAddr::V6(ipv6_twin(v4));
    if is(OUTSIDE_IP) {
        return format!("{ip} (outside)");
    }
    for node in &LAYOUT {
        if is(node.ip) {
            return format!("{ip} ({})", node.name);
        }
        if let Some((pod, _)) = node.pods.iter().find(|(_, a)| is(*a)) {
            return format!("{ip} ({pod})");
        }
    }
    ip.to_string()
}

fn answered_pods(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Answered(replies) => count_by(replies.iter().map(|r| r.pod.clone()))
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(" and "),
        _ => "nobody".to_owned(),
    }
}

fn seen_by_pods(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Answered(replies) => replies
            .first()
            .map(|r| name_of(r.client_seen_by_pod.ip()))
            .unwrap_or_default(),
        _ => "-".to_owned(),
    }
}

/// The two questions, answered from what the probes saw.
fn explain(probes: &[Probe], results: &[Outcome]) {
    let find = |service: &str, target: SocketAddr, via: Option<&str>| {
        probes
            .iter()
            .zip(results)
            .find(|(p, _)| p.service == service && p.target == target && p.via == via)
            .map(|(_, o)| o)
            .expect("probe is in the list")
    };
    let ok = |o: &Outcome| matches!(o, Outcome::Answered(_));
    let web1 = find("demo/web", at(NODE1, 30080), None);
    let web2 = find("demo/web", at(NODE2, 30080), None);
    println!();
    println!("Why does a NodePort answer on every node?");
    println!(
        "  demo/web runs its pods only on node-2, yet its NodePort 30080 {} on node-1 ({}) and {} on node-2 ({}).",
        if ok(web1) {
            "answered"
        } else {
            "did NOT answer"
        },
        answered_pods(web1),
        if ok(web2) {
            "answered"
        } else {
            "did NOT answer"
        },
        answered_pods(web2),
    );
    println!(
        "  Every node's lb programs the NodePort on its own addresses. node-1 forwarded to node-2 and replaced the client's address with its own (the pod saw {}), so the answer came back through node-1 and was translated back; node-2 served locally and the pod saw {}.",
        seen_by_pods(web1),
        seen_by_pods(web2),
    );
    let local1 = find("demo/web-local", at(NODE1, 30081), None);
    let local2 = find("demo/web-local", at(NODE2, 30081), None);
    println!(
        "  With externalTrafficPolicy: Local (demo/web-local) only nodes with a pod answer: node-1 {} and its pod saw the real client {}; node-2 {} (no local pod, so it drops rather than forward).",
        if ok(local1) {
            "answered"
        } else {
            "did NOT answer"
        },
        seen_by_pods(local1),
        if ok(local2) {
            "answered (unexpected)"
        } else {
            "gave no answer"
        },
    );
    let echo4 = find("demo/echo", at([10, 96, 0, 10], 80), None);
    let vip6: IpAddr = ECHO_VIP6.parse().expect("an IPv6 address");
    let echo6 = find("demo/echo", SocketAddr::new(vip6, 80), None);
    println!();
    println!("What does a dual-stack Service get?");
    println!(
        "  demo/echo has a ClusterIP of each family (clusterIPs) and an EndpointSlice of each: 10.96.0.10 {} ({}), {vip6} {} ({}), each by the pods' addresses of its own family (the pod saw {} and {}). Each family has its own lb maps; the NodePorts of a dual-stack Service (demo/web) open on the nodes' IPv6 addresses too.",
        if ok(echo4) {
            "answered"
        } else {
            "did NOT answer"
        },
        answered_pods(echo4),
        if ok(echo6) {
            "answered"
        } else {
            "did NOT answer"
        },
        answered_pods(echo6),
        seen_by_pods(echo4),
        seen_by_pods(echo6),
    );
    println!();
    println!("What does a LoadBalancer Service create?");
    let shop = [
        (
            "its ClusterIP 10.96.0.30:80 (from a pod)",
            find("demo/shop", at([10, 96, 0, 30], 80), None),
        ),
        (
            "its NodePort 30090 on node-1",
            find("demo/shop", at(NODE1, 30090), None),
        ),
        (
            "its NodePort 30090 on node-2",
            find("demo/shop", at(NODE2, 30090), None),
        ),
        (
            "its ingress IP 172.30.1.10:80 via node-1",
            find("demo/shop", at([172, 30, 1, 10], 80), Some("node-1")),
        ),
        (
            "its ingress IP 172.30.1.10:80 via node-2",
            find("demo/shop", at([172, 30, 1, 10], 80), Some("node-2")),
        ),
    ];
    println!("  demo/shop (type: LoadBalancer) answered on:");
    for (what, outcome) in shop {
        println!(
            "    - {what}: {}",
            if ok(outcome) {
                format!("yes, served by {}", answered_pods(outcome))
            } else {
                "NO".to_owned()
            }
        );
    }
    println!(
        "  A LoadBalancer Service is a NodePort Service (which is a ClusterIP Service) plus an address an external load balancer sends to any node; here the outside client's route to 172.30.1.0/24 plays that load balancer. ExternalName (demo/upstream) and headless (demo/echo-headless) Services are DNS-only: lb programs nothing for them."
    );
}
