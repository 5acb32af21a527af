//! `cargo xtask testbed up|down`: the two-node testbed of docs/testbed.md, left running for you to
//! explore (namespaces named `lbtb-<role>`), with echo pods and one agent per node.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_testbed::{
    echo::EchoServer,
    testbed::{AgentOptions, AgentProcess, Cluster, LAYOUT, OUTSIDE_IP},
};

use crate::{step, workspace_root};

/// Pids, logs and the manifest of the running testbed.
const STATE_DIR: &str = "/run/lb-testbed";
const RUN_ID: &str = Cluster::PERSISTENT_RUN_ID;

fn state_dir() -> PathBuf {
    PathBuf::from(STATE_DIR)
}

pub fn up(lb: &Path, xdp: bool) -> anyhow::Result<()> {
    if Path::new(&format!("/run/netns/{RUN_ID}-lan")).exists() {
        bail!("the testbed is already up; `cargo xtask testbed down` first");
    }
    let state = state_dir();
    std::fs::create_dir_all(&state)?;
    let manifest = state.join("services.yaml");
    std::fs::copy(
        workspace_root().join("deploy/examples/services.yaml"),
        &manifest,
    )
    .context("copying the example manifest")?;

    step("building the testbed (network namespaces only)");
    let cluster = match Cluster::build(RUN_ID.to_owned()) {
        Ok(cluster) => cluster,
        Err(err) => {
            let _ = down();
            return Err(err);
        }
    };
    let mut pids = Vec::new();
    match start_everything(&cluster, lb, &manifest, xdp, &mut pids) {
        Ok(logs) => {
            std::fs::write(
                state.join("pids"),
                pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
            )?;
            cluster.persist();
            print_guide(lb, &manifest, &logs);
            Ok(())
        }
        Err(err) => {
            for pid in pids {
                // SAFETY: kill(2) on a process this function started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            drop(cluster);
            let _ = down();
            Err(err)
        }
    }
}

/// Echo pods and agents; every started pid goes into `pids` as soon as it exists.
fn start_everything(
    cluster: &Cluster,
    lb: &Path,
    manifest: &Path,
    xdp: bool,
    pids: &mut Vec<u32>,
) -> anyhow::Result<Vec<(&'static str, PathBuf, PathBuf, PathBuf)>> {
    if xdp {
        cluster.prepare_for_xdp()?;
    }
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    for pod in cluster.pods().filter(|p| p.name != "client-1") {
        let mut cmd = Command::new(&xtask);
        cmd.args(["echo-pod", &pod.name])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        pids.push(pod.ns.spawn_detached(cmd)?.id());
    }
    step("starting one `lb agent` per node");
    let options = AgentOptions {
        xdp,
        detached: true,
        log_dir: Some(state_dir()),
        ..AgentOptions::default()
    };
    let mut logs = Vec::new();
    for node in ["node-1", "node-2"] {
        let agent = AgentProcess::start(cluster, node, lb, manifest, &options)?;
        pids.extend(agent.pid());
        logs.push((
            node,
            agent.log_path().to_owned(),
            agent.bpffs_dir().to_owned(),
            agent.state_dir().to_owned(),
        ));
        agent.leave_running();
    }
    Ok(logs)
}

fn print_guide(lb: &Path, manifest: &Path, logs: &[(&str, PathBuf, PathBuf, PathBuf)]) {
    println!("The testbed is up (docs/testbed.md):");
    for node in &LAYOUT {
        println!(
            "  {} {} (namespace {RUN_ID}-{}): {}",
            node.name,
            node.ip,
            node.name,
            node.pods_line()
        );
    }
    println!("  outside {OUTSIDE_IP} (namespace {RUN_ID}-outside), a client that is not a node");
    println!();
    println!("Every pod but client-1 answers TCP 8080 and UDP 5353 with its name. Try:");
    println!(
        "  ip netns exec {RUN_ID}-outside bash -c 'exec 3<>/dev/tcp/172.30.0.11/30080; echo hi >&3; head -1 <&3'"
    );
    println!(
        "  ip netns exec {RUN_ID}-client-1 bash -c 'exec 3<>/dev/tcp/10.96.0.10/80; echo hi >&3; head -1 <&3'"
    );
    for (node, log, pins, names) in logs {
        println!(
            "  {node}: log {}; what it programmed: {} services --bpffs-dir {} --state-dir {} \
             (also explain, conntrack, monitor, stats)",
            log.display(),
            lb.display(),
            pins.display(),
            names.display()
        );
    }
    println!(
        "The agents follow {}: edit it and they apply the change.",
        manifest.display()
    );
    println!("`cargo xtask testbed down` removes everything.");
}

pub fn down() -> anyhow::Result<()> {
    let state = state_dir();
    if let Ok(pids) = std::fs::read_to_string(state.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a pid this tool started and recorded.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let listing = Command::new("ip").args(["netns", "list"]).output()?;
    let prefix = format!("{RUN_ID}-");
    let mut removed = 0;
    for name in String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
    {
        let _ = Command::new("ip").args(["netns", "delete", name]).status();
        removed += 1;
    }
    // The agents' pin directories and their state files (`agent_state_dir`).
    for dir in [Path::new("/sys/fs/bpf").to_owned(), std::env::temp_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&state);
    println!("testbed down ({removed} namespaces removed)");
    Ok(())
}

/// `xtask echo-pod NAME`: an echo pod's server, run inside its namespace by `testbed up`.
pub fn echo_pod(name: &str) -> anyhow::Result<()> {
    let _server = EchoServer::start_here(name, 8080, 5353)?;
    loop {
        std::thread::park();
    }
}
