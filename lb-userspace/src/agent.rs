//! `lb agent --manifests`: load the packet path, program it from a manifest file, follow file
//! changes and new interfaces, and detach cleanly on SIGINT/SIGTERM.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior},
};
use tracing::{error, info, warn};

use crate::{
    loader::Dataplane, model::Severity, source::ManifestSource, sync::Programmer,
    translate::translate,
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub pod_interfaces: Vec<glob::Pattern>,
    pub bpffs_dir: PathBuf,
    pub poll_interval: Duration,
}

struct Agent {
    config: AgentConfig,
    dataplane: Dataplane,
    programmer: Programmer,
    source: ManifestSource,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let dataplane = Dataplane::load(&config.bpffs_dir).context("loading the packet path")?;
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
        programmer: Programmer::adopt(adopted),
        dataplane,
        config,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(agent.config.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    agent.reload();
    agent.scan_interfaces();
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
                if agent.source.changed() {
                    agent.reload();
                }
                agent.scan_interfaces();
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
        let desired = translate(self.source.objects());
        for problem in &desired.problems {
            error!("{problem}");
        }
        for skipped in &desired.unprogrammed {
            info!("{}: {}", skipped.service, skipped.reason);
        }
        match self.programmer.sync(&desired, &mut self.dataplane.maps) {
            Ok(stats) => info!(
                frontends = desired.frontends.len(),
                backends = desired.backends().len(),
                writes = stats.writes,
                deletes = stats.deletes,
                elapsed_us = started.elapsed().as_micros() as u64,
                "synced"
            ),
            Err(err) => error!(
                "sync failed, will retry on the next change: {:#}",
                anyhow::Error::new(err)
            ),
        }
    }

    /// Attaches to matching interfaces that appeared, forgets ones that went away.
    fn scan_interfaces(&mut self) {
        let interfaces = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .filter_map(|i| Some((i.name().to_str().ok()?.to_owned(), i.index())))
                .collect::<Vec<_>>(),
            Err(err) => {
                error!("cannot list interfaces: {err}");
                return;
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
        for (name, index) in interfaces {
            if !self.config.pod_interfaces.iter().any(|p| p.matches(&name)) {
                continue;
            }
            match self.dataplane.attach(&name, index) {
                Ok(true) => {
                    info!(interface = %name, "attached to pod-facing interface (tcx ingress)")
                }
                Ok(false) => {}
                Err(err) => error!("{:#}", anyhow::Error::new(err)),
            }
        }
    }
}
