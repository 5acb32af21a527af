//! `cargo xtask demo`: the bundled example on the testbed, with a report a person can read.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use xtask::{
    cleanup,
    echo::{EchoServer, Reply, tcp_request, udp_request},
    testbed::{AgentProcess, Testbed},
};

use crate::{step, workspace_root};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The pods of deploy/examples/clusterip.yaml.
const PODS: [(&str, Ipv4Addr); 2] = [
    ("pod-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("pod-b", Ipv4Addr::new(10, 244, 1, 12)),
];
const ECHO_TCP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const ECHO_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const IDLE_TCP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
const REQUESTS: usize = 8;

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
    let manifest = workspace_root().join("deploy/examples/clusterip.yaml");

    step(&format!(
        "what {} asks for (`lb translate`)",
        manifest.display()
    ));
    let status = Command::new(lb)
        .arg("translate")
        .arg("--manifests")
        .arg(&manifest)
        .status()?;
    anyhow::ensure!(status.success(), "lb translate reported errors");

    step(
        "building the testbed: node-1, a client pod and two echo pods, each in its own network namespace",
    );
    let testbed = Testbed::single_node(("client", CLIENT_IP), &PODS)?;
    let _servers = testbed
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, &p.name, 8080, 5353))
        .collect::<anyhow::Result<Vec<_>>>()?;

    step("starting `lb agent --manifests` on node-1 (as the DaemonSet would)");
    let agent = AgentProcess::start(&testbed, lb, &manifest, 200)?;

    step(&format!(
        "sending {REQUESTS} TCP and {REQUESTS} UDP requests from the client pod ({CLIENT_IP})"
    ));
    let (tcp, udp, idle) = testbed.client.ns.run(|| {
        let tcp: anyhow::Result<Vec<Reply>> =
            (0..REQUESTS).map(|_| tcp_request(ECHO_TCP)).collect();
        let udp: anyhow::Result<Vec<Reply>> =
            (0..REQUESTS).map(|_| udp_request(ECHO_UDP)).collect();
        let idle = TcpStream::connect_timeout(&IDLE_TCP.into(), Duration::from_millis(500));
        (tcp, udp, idle.is_ok())
    })?;
    let (tcp, udp) = (
        tcp.context("TCP to the ClusterIP")?,
        udp.context("UDP to the ClusterIP")?,
    );

    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "#",
        "REQUEST TO",
        "ANSWER CAME FROM",
        "SERVED BY",
        "CLIENT ADDRESS THE POD SAW",
    ]);
    for (i, (proto, target, reply)) in tcp
        .iter()
        .map(|r| ("TCP", ECHO_TCP, r))
        .chain(udp.iter().map(|r| ("UDP", ECHO_UDP, r)))
        .enumerate()
    {
        table.add_row([
            (i + 1).to_string(),
            format!("{target}/{proto}"),
            reply.answered_from.to_string(),
            reply.pod.clone(),
            reply.client_seen_by_pod.ip().to_string(),
        ]);
    }
    println!("{table}");

    let served = |replies: &[Reply]| {
        let mut by_pod = BTreeMap::<&str, usize>::new();
        for r in replies {
            *by_pod.entry(r.pod.as_str()).or_default() += 1;
        }
        by_pod
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all_from_vip = tcp.iter().all(|r| r.answered_from == ECHO_TCP.into())
        && udp.iter().all(|r| r.answered_from == ECHO_UDP.into());
    println!();
    println!("What happened:");
    println!(
        "- ClusterIP {}: a virtual address no interface owns. lb's tc program on the client pod's veth \
         rewrote each new connection to one pod (TCP: {}; UDP: {}), chosen by a hash of the flow.",
        ECHO_TCP.ip(),
        served(&tcp),
        served(&udp)
    );
    println!(
        "- Every answer came from {} {}: replies are translated back, so the client never sees a pod address.",
        ECHO_TCP.ip(),
        if all_from_vip {
            "(checked for all of them)"
        } else {
            "(NOT for all of them: see the table)"
        }
    );
    println!(
        "- The pods saw the client's own address {CLIENT_IP}: traffic from pods to a ClusterIP is not SNATed."
    );
    println!(
        "- demo/idle ({IDLE_TCP}) has no endpoints: {}.",
        if idle {
            "it unexpectedly answered"
        } else {
            "the connection got no answer (dropped and counted)"
        }
    );
    println!("- demo/echo-headless is headless: DNS-only, so lb programs nothing for it.");

    step("packet counters of node-1's packet path (`lb stats`)");
    let status = Command::new(lb)
        .arg("stats")
        .arg("--bpffs-dir")
        .arg(agent.bpffs_dir())
        .status()?;
    anyhow::ensure!(status.success(), "lb stats failed");

    step(
        "stopping the agent (it detaches; maps stay pinned for a restart) and tearing the testbed down",
    );
    let status = agent.stop()?;
    anyhow::ensure!(status.success(), "agent exited with {status}");
    anyhow::ensure!(
        all_from_vip && !idle,
        "the demo saw unexpected behaviour (see above)"
    );
    Ok(())
}
