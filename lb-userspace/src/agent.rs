//! `lb agent --manifests`: load the packet path, program it from a manifest file, follow file
//! changes and new interfaces, and detach cleanly on SIGINT/SIGTERM.

use std::{net::Ipv4Addr, ops::RangeInclusive, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior},
};
use tracing::{error, info, warn};

use crate::{
    loader::{Dataplane, InterfaceRole},
    model::Severity,
    source::ManifestSource,
    sync::{Programmer, Settings},
    translate::{NodeContext, translate},
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    /// This node's name, for the `Local` traffic policies.
    pub node_name: Option<String>,
    pub pod_interfaces: Vec<glob::Pattern>,
    /// Interfaces towards the network: their addresses answer NodePorts.
    pub external_interfaces: Vec<glob::Pattern>,
    /// SNAT source address; default: the first address of the first external interface.
    pub snat_address: Option<Ipv4Addr>,
    pub snat_ports: RangeInclusive<u16>,
    pub reject_no_endpoints: bool,
    /// Attach the XDP fast path to external interfaces too.
    pub xdp: bool,
    pub bpffs_dir: PathBuf,
    pub poll_interval: Duration,
}

struct Agent {
    config: AgentConfig,
    dataplane: Dataplane,
    programmer: Programmer,
    source: ManifestSource,
    /// What NodePorts answer on: the external interfaces' addresses, as last seen.
    node: NodeContext,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let dataplane =
        Dataplane::load(&config.bpffs_dir, config.xdp).context("loading the packet path")?;
    let adopted = dataplane
        .maps
        .read_contents()
        .context("reading the pinned maps")?;
    info!(
        pin_dir = %dataplane.pin_dir().display(),
        services = adopted.services.len(),
        backends = adopted.backends.len(),
        "packet path loaded; adopting what is already programmed"
    );
    let mut agent = Agent {
        source: ManifestSource::new(&config.manifests),
        programmer: Programmer::adopt(adopted, Settings::default()),
        dataplane,
        node: NodeContext {
            name: config.node_name.clone(),
            addresses: Vec::new(),
        },
        config,
    };
    agent.programmer.set_settings(agent.settings());
    agent.scan_interfaces();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(agent.config.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    agent.reload();
    info!(
        interfaces = agent.dataplane.attached().count(),
        "agent ready"
    );
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                info!("SIGHUP: re-reading {}", agent.source.path().display());
                agent.reload();
            }
            _ = tick.tick() => {
                let addresses_changed = agent.scan_interfaces();
                if addresses_changed || agent.source.changed() {
                    agent.reload();
                }
            }
        }
    }
    let interfaces: Vec<String> = agent.dataplane.attached().map(str::to_owned).collect();
    for ifname in &interfaces {
        agent.dataplane.forget(ifname);
    }
    info!(
        detached = interfaces.len(),
        "stopped; maps stay pinned in {}",
        agent.dataplane.pin_dir().display()
    );
    Ok(())
}

impl Agent {
    /// Reads the manifests (keeping the last good version of any object that became invalid),
    /// translates, and writes only the difference.
    fn reload(&mut self) {
        let started = Instant::now();
        let reload = match self.source.reload() {
            Ok(reload) => reload,
            Err(err) => {
                error!(
                    "cannot read {}: {err}; keeping what is programmed",
                    self.source.path().display()
                );
                return;
            }
        };
        for problem in &reload.problems {
            match problem.severity {
                Severity::Error => error!("{problem}"),
                Severity::Warning => warn!("{problem}"),
            }
        }
        for id in &reload.kept_last_good {
            warn!("{id} is invalid now; its last good version stays programmed");
        }
        let desired = translate(self.source.objects(), &self.node);
        for problem in &desired.problems {
            error!("{problem}");
        }
        for skipped in &desired.unprogrammed {
            info!("{}: {}", skipped.service, skipped.reason);
        }
        match self.programmer.sync(&desired, &mut self.dataplane.maps) {
            Ok((stats, unplaced)) => {
                for frontend in unplaced {
                    error!("{frontend}: no room left in the slots array; not programmed");
                }
                info!(
                    frontends = desired.frontends.len(),
                    backends = desired.backends().len(),
                    writes = stats.writes,
                    deletes = stats.deletes,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "synced"
                )
            }
            Err(err) => error!(
                "sync failed, will retry on the next change: {:#}",
                anyhow::Error::new(err)
            ),
        }
    }

    /// Attaches to matching interfaces that appeared, forgets ones that went away, and refreshes
    /// the node addresses and SNAT settings. Returns whether the node addresses changed.
    fn scan_interfaces(&mut self) -> bool {
        let interfaces = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .filter_map(|i| Some((i.name().to_str().ok()?.to_owned(), i.index())))
                .collect::<Vec<_>>(),
            Err(err) => {
                error!("cannot list interfaces: {err}");
                return false;
            }
        };
        let gone: Vec<String> = self
            .dataplane
            .attached()
            .filter(|name| !interfaces.iter().any(|(n, _)| n == name))
            .map(str::to_owned)
            .collect();
        for name in gone {
            info!(interface = %name, "interface went away");
            self.dataplane.forget(&name);
        }
        let mut external = Vec::new();
        for (name, index) in interfaces {
            let role = if self.config.pod_interfaces.iter().any(|p| p.matches(&name)) {
                InterfaceRole::Pod
            } else if self
                .config
                .external_interfaces
                .iter()
                .any(|p| p.matches(&name))
            {
                external.push(name.clone());
                InterfaceRole::External
            } else {
                continue;
            };
            match self.dataplane.attach(&name, index, role) {
                Ok(true) => {
                    info!(interface = %name, ?role, xdp = self.config.xdp && role == InterfaceRole::External, "attached")
                }
                Ok(false) => {}
                Err(err) => error!("{:#}", anyhow::Error::new(err)),
            }
        }
        let addresses = external_addresses(&external);
        if addresses == self.node.addresses {
            return false;
        }
        info!(?addresses, "node addresses (NodePorts answer on these)");
        self.node.addresses = addresses;
        self.programmer.set_settings(self.settings());
        true
    }

    fn settings(&self) -> Settings {
        let snat = self
            .config
            .snat_address
            .or_else(|| self.node.addresses.first().copied());
        Settings {
            reject_no_endpoints: self.config.reject_no_endpoints,
            node: lb_common::service::NodeConfig {
                snat_addr_be: snat.map_or(0, |a| lb_common::addr_be(a.octets())),
                snat_port_first: *self.config.snat_ports.start(),
                snat_port_last: *self.config.snat_ports.end(),
                _reserved: [0; 2],
            },
        }
    }
}

/// The IPv4 addresses of `interfaces`, in interface order, without duplicates.
fn external_addresses(interfaces: &[String]) -> Vec<Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let all: Vec<_> = addrs.collect();
    let mut out = Vec::new();
    for name in interfaces {
        for ifaddr in all.iter().filter(|a| &a.interface_name == name) {
            if let Some(sin) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                let ip = sin.ip();
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}
