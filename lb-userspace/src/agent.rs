//! `lb agent`: load the packet path, keep it programmed from the Kubernetes API (or a manifest
//! file), follow new interfaces and node addresses, serve health and metrics, and sweep dead
//! flows from the conntrack. On SIGINT/SIGTERM it exits and leaves the packet path attached
//! (pinned links): the next agent replaces the programs in place.
//!
//! Syncs are level-triggered and coalesced: any change marks the state dirty; a sync (translate
//! everything, write only the difference) runs at most every `min_sync_interval`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior},
};
use tracing::{error, info, warn};

use crate::{
    health::{HealthCheckServers, HealthState},
    loader::{Dataplane, InterfaceRole},
    metrics::Metrics,
    model::Severity,
    pipeline::Pipeline,
    sources::{KubeSource, ManifestSource, ObjectSource},
    sync::{Programmer, Settings},
    translate::NodeContext,
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// Standalone: a multi-document YAML file, re-read when it changes and on SIGHUP.
    Manifests(PathBuf),
    /// The API server: this kubeconfig, or in-cluster configuration when `None` (then also
    /// `KUBECONFIG` and `~/.kube/config` are tried).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Which of the node's external addresses answer NodePorts (`--nodeport-addresses`, kube-proxy's
/// flag and `nodePortAddresses` setting).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the external interfaces (the flag not given).
    #[default]
    All,
    /// The addresses within these CIDRs, of either family (a bare address is a host route).
    Cidrs(Vec<ipnet::IpNet>),
    /// kube-proxy's `primary`: the node's primary address of each family. lb takes the first
    /// address of each family on the external interfaces, in interface order (kube-proxy takes
    /// the Node's addresses as the kubelet reports them, which on most nodes are the same).
    Primary,
}

impl NodePortAddresses {
    /// From the flag's values: none, `primary` alone, or CIDRs (IPv4 and IPv6 alike: a
    /// dual-stack kube-proxy configuration is taken as it is).
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let values: Vec<&str> = (values.iter())
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Ok(Self::All);
        }
        if values.contains(&"primary") {
            return if values.len() == 1 {
                Ok(Self::Primary)
            } else {
                Err("\"primary\" cannot be combined with CIDRs (as in kube-proxy)".to_owned())
            };
        }
        let cidrs = (values.iter())
            .map(|v| {
                v.parse::<ipnet::IpNet>()
                    .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| format!("{v:?} is neither a CIDR nor \"primary\""))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Cidrs(cidrs))
    }

    /// The addresses of `external` (the external interfaces' addresses, in interface order)
    /// that answer NodePorts.
    pub fn select(&self, external: &[IpAddr]) -> Vec<IpAddr> {
        match self {
            Self::All => external.to_vec(),
            Self::Cidrs(cidrs) => (external.iter())
                .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
                .copied()
                .collect(),
            Self::Primary => {
                let first = |v4: bool| external.iter().copied().find(|ip| ip.is_ipv4() == v4);
                first(true).into_iter().chain(first(false)).collect()
            }
        }
    }
}

pub struct AgentConfig {
    pub source: SourceConfig,
    /// This node's name, as EndpointSlices' `nodeName` and its Node object.
    pub node_name: Option<String>,
    pub pod_interfaces: Vec<glob::Pattern>,
    /// Interfaces towards the network: their addresses answer NodePorts.
    pub external_interfaces: Vec<glob::Pattern>,
    /// Which external addresses answer NodePorts.
    pub nodeport_addresses: NodePortAddresses,
    /// SNAT source address; default: the first NodePort address.
    pub snat_address: Option<Ipv4Addr>,
    pub snat_ports: RangeInclusive<u16>,
    pub reject_no_endpoints: bool,
    /// Attach the XDP fast path to external interfaces too.
    pub xdp: bool,
    /// Handle Services labelled `service.kubernetes.io/service-proxy-name: <this>`.
    pub service_proxy_name: Option<String>,
    /// Maglev table size for Services without the annotation.
    pub maglev_table_size: Option<u32>,
    /// `loadBalancerSourceRanges` guard NodePorts too.
    pub source_ranges_on_node_ports: bool,
    /// The sized maps' capacities (a pinned map of another size is resized keeping its
    /// content, unless it holds more than the new size; see `resize.rs`).
    pub capacities: lb_common::maps::Capacities,
    pub bpffs_dir: PathBuf,
    /// Where the state file naming what the maps hold goes (`state.rs`).
    pub state_dir: PathBuf,
    /// How often to look for new interfaces, address changes and manifest changes.
    pub poll_interval: Duration,
    /// Changes closer together than this are applied in one sync.
    pub min_sync_interval: Duration,
    pub healthz_bind_address: Option<SocketAddr>,
    /// A change waiting longer than this makes `/healthz` report unhealthy.
    pub healthz_timeout: Duration,
    pub metrics_bind_address: Option<SocketAddr>,
    /// The API server's URL, overriding the kubeconfig's or in-cluster configuration's.
    pub master: Option<String>,
    pub conntrack: lb_common::conntrack::CtTimeouts,
    /// How often dead flows are swept from the conntrack.
    pub conntrack_gc_interval: Duration,
}

/// The configured source, for its wake-ups; its snapshots go through [`ObjectSource`].
enum Source {
    Manifests(Box<ManifestSource>),
    Kube(Box<KubeSource>),
}

impl Source {
    fn objects(&mut self) -> &mut dyn ObjectSource {
        match self {
            Source::Manifests(manifests) => manifests.as_mut(),
            Source::Kube(kube) => kube.as_mut(),
        }
    }
}

struct Agent {
    config: AgentConfig,
    dataplane: Dataplane,
    pipeline: Pipeline,
    source: Source,
    node: NodeContext,
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
    health_checks: HealthCheckServers,
    /// A change is waiting for a sync since then; the sync runs at `next_sync`.
    dirty_since: Option<Instant>,
    last_sync: Option<Instant>,
    /// A sync ran since the state file was last written.
    state_stale: bool,
    state_written: Option<Instant>,
    /// The last error writing the state file (logged once until it changes).
    state_error: Option<String>,
}

/// A client from `kubeconfig`, or from in-cluster configuration (then `KUBECONFIG` and
/// `~/.kube/config`). Does not contact the server.
pub async fn kube_client(
    kubeconfig: Option<&PathBuf>,
    master: Option<&str>,
) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no in-cluster configuration, KUBECONFIG or ~/.kube/config; pass --kubeconfig",
        )?,
    };
    if let Some(master) = master {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("--master {master:?} is not a URL"))?;
        info!(%master, "API server address from --master / KUBERNETES_SERVICE_HOST");
    }
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Binds an optional server's address. When it is taken (e.g. kube-proxy runs beside lb on
/// 10256 and 10249) the agent says which setting to change and goes on without that server:
/// the Services it programs matter more than its health or metrics endpoint.
async fn bind_optional(
    what: &str,
    flag: &str,
    addr: SocketAddr,
) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Some(listener),
        Err(err) => {
            error!(
                "cannot serve {what} on {addr}: {err}; running without it. Give a free address \
                 with {flag} (or an empty one to turn it off); beside kube-proxy, which uses \
                 10256 and 10249, see the README's \"Beside kube-proxy\""
            );
            None
        }
    }
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let mut dataplane = Dataplane::load_sized(&config.bpffs_dir, config.xdp, config.capacities)
        .context("loading the packet path")?;
    for note in &dataplane.capacity_notes {
        warn!("{note}");
    }
    match crate::migrate::from_previous_layout(&config.bpffs_dir, &mut dataplane.maps) {
        Ok(Some(migrated)) => info!(
            services = migrated.services,
            backends = migrated.backends,
            flows = migrated.conntrack / 2,
            "carried the previous layout's state over (its flows keep their backends); \
             removed the old pins"
        ),
        Ok(None) => {}
        Err(err) => {
            warn!("cannot carry the previous layout's state over: {err:#}; its flows start afresh")
        }
    }
    for (name, from, to) in &dataplane.resized {
        info!(
            map = name,
            from, to, "map created anew at the capacity asked for"
        );
    }
    for (name, from, to) in &dataplane.counters_reset {
        info!(
            map = name,
            from, to, "counter map created anew to follow the capacities (its counts restart)"
        );
    }
    let pin_dir = dataplane.pin_dir().to_owned();
    if let Some(carried) = crate::resize::carry_over(&pin_dir, &mut dataplane.maps, false)
        .context("carrying the resized maps' content over")?
    {
        info!(
            services = carried.services,
            backends = carried.backends,
            slots = carried.slots,
            flows = carried.conntrack / 2,
            affinity = carried.affinity,
            "copied what the old maps hold into the resized ones"
        );
    }
    // The IPv6 stages switch to this agent's programs (and maps) here, once those maps hold what
    // the old ones did; IPv4 switches when the links are taken over below.
    dataplane
        .install_stages()
        .context("installing the IPv6 stages")?;
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
    let source = match &config.source {
        SourceConfig::Manifests(path) => Source::Manifests(Box::new(
            ManifestSource::new(path).with_programmed_services(!adopted.services.is_empty()),
        )),
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kube_client(kubeconfig.as_ref(), config.master.as_deref()).await?;
            let node = config
                .node_name
                .as_deref()
                .context("the node name is needed to watch the Node (--hostname-override)")?;
            Source::Kube(Box::new(KubeSource::start(client, node)))
        }
    };
    let health = Arc::new(HealthState::new(config.healthz_timeout));
    let metrics = Arc::new(Metrics::new(
        config.bpffs_dir.clone(),
        config.state_dir.clone(),
    ));
    metrics.set_capacities(&dataplane.capacities);
    let mut servers = Vec::new();
    if let Some(addr) = config.healthz_bind_address
        && let Some(listener) = bind_optional(
            "/healthz",
            "--healthz-bind-address (healthzBindAddress)",
            addr,
        )
        .await
    {
        servers.push(crate::health::serve_healthz(listener, health.clone()));
    }
    if let Some(addr) = config.metrics_bind_address
        && let Some(listener) = bind_optional(
            "/metrics",
            "--metrics-bind-address (metricsBindAddress)",
            addr,
        )
        .await
    {
        servers.push(crate::metrics::serve(listener, metrics.clone()));
    }
    let mut agent = Agent {
        source,
        pipeline: Pipeline::new(Programmer::adopt(
            adopted,
            Settings {
                capacities: dataplane.capacities,
                ..Settings::default()
            },
        )),
        dataplane,
        node: NodeContext {
            name: config.node_name.clone(),
            service_proxy_name: config.service_proxy_name.clone(),
            default_table_size: config.maglev_table_size,
            source_ranges_on_node_ports: config.source_ranges_on_node_ports,
            ..NodeContext::default()
        },
        health,
        metrics,
        health_checks: HealthCheckServers::default(),
        dirty_since: Some(Instant::now()),
        last_sync: None,
        state_stale: false,
        state_written: None,
        state_error: None,
        config,
    };
    let settings = agent.settings();
    agent.pipeline.programmer_mut().set_settings(settings);
    let pinned_links = agent.dataplane.adoptable_links();
    agent.scan_interfaces();
    let stale_links = agent.dataplane.drop_unclaimed_links();
    if pinned_links > 0 {
        info!(
            taken_over = pinned_links - stale_links,
            detached = stale_links,
            "replaced the programs of the links an earlier agent pinned, in place"
        );
    }
    // The new programs serve every interface now: what the old ones wrote meanwhile is copied,
    // and the old maps go. Before any sync, so a repeated first pass could never undo one.
    if let Some(carried) = crate::resize::carry_over(&pin_dir, &mut agent.dataplane.maps, true)
        .context("finishing the resize of the pinned maps")?
    {
        info!(
            flows = carried.conntrack / 2,
            affinity = carried.affinity,
            "resize finished: copied the entries made during the switch; old maps unpinned"
        );
    }
    crate::conntrack::spawn_sweeper(
        agent.dataplane.pin_dir().to_owned(),
        agent.config.conntrack_gc_interval,
        agent.metrics.clone(),
    );
    if let Source::Manifests(_) = agent.source {
        agent.sync().await;
    } else {
        info!("waiting for the API server's first lists; what is pinned keeps serving meanwhile");
    }
    info!(
        interfaces = agent.dataplane.attached().count(),
        "agent ready"
    );

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(agent.config.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let next_sync = agent.next_sync();
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                info!("SIGHUP: resyncing");
                if let Source::Manifests(m) = &mut agent.source {
                    m.force_reread();
                }
                agent.mark_dirty();
            }
            _ = tick.tick() => {
                if agent.scan_interfaces() {
                    agent.mark_dirty();
                }
                if let Source::Manifests(m) = &agent.source && m.changed() {
                    agent.mark_dirty();
                }
                agent.write_state();
            }
            _ = kube_changed(&agent.source) => agent.mark_dirty(),
            _ = sleep_until(next_sync) => agent.sync().await,
        }
    }
    for server in servers {
        server.abort();
    }
    info!(
        interfaces = agent.dataplane.attached().count(),
        "stopped; the packet path stays attached and its maps pinned in {} for the next agent \
         (`lb cleanup` removes them)",
        agent.dataplane.pin_dir().display()
    );
    Ok(())
}

/// Resolves when the Kubernetes source reports a change; never for the manifest source.
async fn kube_changed(source: &Source) {
    match source {
        Source::Kube(kube) => kube.changed().await,
        Source::Manifests(_) => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Agent {
    fn mark_dirty(&mut self) {
        self.dirty_since.get_or_insert_with(Instant::now);
        self.health.queued();
    }

    /// When the pending sync may run: not before `min_sync_interval` after the last one, and for
    /// the API source not before its first lists are complete.
    fn next_sync(&self) -> Option<Instant> {
        let since = self.dirty_since?;
        if let Source::Kube(kube) = &self.source
            && !kube.ready()
        {
            return None;
        }
        let earliest = self
            .last_sync
            .map_or(since, |last| last + self.config.min_sync_interval);
        Some(earliest.max(since))
    }

    /// One pipeline step from the source's snapshot, and what the agent makes of it: logs,
    /// health, metrics and the health-check servers.
    async fn sync(&mut self) {
        let started = Instant::now();
        let dirty_since = self.dirty_since.take().unwrap_or(started);
        self.last_sync = Some(started);
        let Some(snapshot) = self.source.objects().snapshot() else {
            return;
        };
        for id in &snapshot.kept_last_good {
            warn!("{id} is invalid now; its last good version stays programmed");
        }
        for problem in &snapshot.problems {
            log_problem(problem);
        }
        let invalid = snapshot
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        self.metrics.object_errors.set(invalid as i64);
        let step = self
            .pipeline
            .step(snapshot, &mut self.node, &mut self.dataplane.maps);
        let desired = step.desired;
        for problem in &desired.problems {
            log_problem(problem);
        }
        self.metrics
            .frontends_uneven_tables
            .set(desired.uneven_tables() as i64);
        for skipped in &desired.unprogrammed {
            info!("{}: {}", skipped.service, skipped.reason);
        }
        match step.udp_flows_purged {
            Ok(0) => {}
            Ok(flows) => info!(
                flows,
                "UDP flows of backends that left their Service removed"
            ),
            Err(err) => warn!(
                "cannot purge UDP flows of removed backends: {:#}",
                anyhow::Error::new(err)
            ),
        }
        match step.programmed {
            Ok((stats, unplaced)) => {
                let services = crate::sync::by_service(&unplaced, desired);
                for (service, frontends) in &services {
                    let frontends: Vec<String> = frontends.iter().map(|f| f.to_string()).collect();
                    error!(
                        "{service}: not programmed: its frontends ({}) do not all fit the maps \
                         (lb_map_entries against lb_map_capacity says which is full; raise \
                         --max-frontends, --max-backends or --max-maglev-slots)",
                        frontends.join(", ")
                    );
                }
                self.health.set_unprogrammed(unplaced.len());
                self.metrics
                    .frontends_unprogrammed
                    .set(unplaced.len() as i64);
                self.metrics
                    .services_unprogrammed
                    .set(services.len() as i64);
                self.health.applied();
                self.metrics.syncs.inc();
                self.metrics
                    .sync_latency
                    .observe(dirty_since.elapsed().as_secs_f64());
                let now = SystemTime::now();
                for triggered in &step.change_triggers {
                    // A clock behind the API server's gives no figure rather than a wrong one.
                    if let Ok(took) = now.duration_since(*triggered) {
                        self.metrics
                            .network_programming_duration
                            .observe(took.as_secs_f64());
                    }
                }
                if let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) {
                    self.metrics
                        .last_sync_timestamp
                        .set(since_epoch.as_secs_f64());
                }
                self.metrics
                    .sync_duration
                    .observe(started.elapsed().as_secs_f64());
                for (policy, count) in desired.services_without_local_endpoints() {
                    (self.metrics.no_local_endpoints)
                        .get_or_create(&[("traffic_policy", policy)])
                        .set(count as i64);
                }
                let backends = desired.backend_count();
                self.metrics.frontends.set(desired.frontends.len() as i64);
                self.metrics.backends.set(backends as i64);
                info!(
                    frontends = desired.frontends.len(),
                    backends,
                    writes = stats.writes,
                    deletes = stats.deletes,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "synced"
                );
            }
            Err(err) => {
                self.metrics.sync_failures.inc();
                // Retried on the next change, or at the next poll.
                self.dirty_since = Some(Instant::now());
                error!("sync failed, will retry: {:#}", anyhow::Error::new(err));
            }
        }
        if step.full {
            crate::pipeline::release_free_heap();
        }
        self.health_checks.reconcile(&desired.health_checks).await;
        // What is programmed, after a failed sync too (it may have written part).
        (self.metrics).set_programmed(self.pipeline.programmer().programmed());
        self.state_stale = true;
        self.write_state();
    }

    /// Writes the state file if a sync ran since it was last written, at most once a
    /// [`crate::state::MIN_WRITE_INTERVAL`] (the next poll writes what waits).
    fn write_state(&mut self) {
        let recent = self
            .state_written
            .is_some_and(|at| at.elapsed() < crate::state::MIN_WRITE_INTERVAL);
        if !self.state_stale || recent {
            return;
        }
        let state = crate::state::Snapshot::new(
            self.node.name.as_deref(),
            self.pipeline.translator(),
            self.pipeline.desired(),
        );
        self.state_written = Some(Instant::now());
        self.state_stale = false;
        match state.write(&self.config.state_dir) {
            Ok(()) => self.state_error = None,
            Err(err) => {
                let message = format!("{err:#}");
                if self.state_error.as_ref() != Some(&message) {
                    warn!(
                        "cannot write the state file (lb services and lb explain show ids \
                         instead of names): {message}"
                    );
                }
                self.state_error = Some(message);
            }
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
                Ok(true) => info!(
                    interface = %name,
                    ?role,
                    xdp = self.config.xdp && role == InterfaceRole::External,
                    "attached"
                ),
                Ok(false) => {}
                Err(err) => error!("{:#}", anyhow::Error::new(err)),
            }
        }
        let addresses = (self.config.nodeport_addresses).select(&external_addresses(&external));
        if addresses == self.node.addresses {
            return false;
        }
        info!(?addresses, "node addresses (NodePorts answer on these)");
        self.node.addresses = addresses;
        let settings = self.settings();
        self.pipeline.programmer_mut().set_settings(settings);
        true
    }

    fn settings(&self) -> Settings {
        let first = |v4: bool| (self.node.addresses.iter()).find(|ip| ip.is_ipv4() == v4);
        let snat = self.config.snat_address.or_else(|| match first(true) {
            Some(IpAddr::V4(v4)) => Some(*v4),
            _ => None,
        });
        let snat6 = match first(false) {
            Some(IpAddr::V6(v6)) => lb_common::addr::ip6_be(v6.octets()),
            _ => [0; 4],
        };
        Settings {
            reject_no_endpoints: self.config.reject_no_endpoints,
            capacities: self.dataplane.capacities,
            node: lb_common::service::NodeConfig {
                snat_addr_be: snat.map_or(0, |a| lb_common::addr_be(a.octets())),
                snat_port_first: *self.config.snat_ports.start(),
                snat_port_last: *self.config.snat_ports.end(),
                timeouts: self.config.conntrack,
                _reserved: [0; 2],
            },
            node6: lb_common::service::NodeConfig6 {
                snat_addr_be: snat6,
                _reserved: [0; 4],
            },
        }
    }
}

fn log_problem(problem: &crate::model::Problem) {
    match problem.severity {
        Severity::Error => error!("{problem}"),
        Severity::Warning => warn!("{problem}"),
    }
}

/// The IPv4 addresses of `interfaces`, in interface order, without duplicates.
/// The external interfaces' addresses, IPv4 and IPv6 (not link-local: no NodePort answers
/// on those), in interface order.
fn external_addresses(interfaces: &[String]) -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let all: Vec<_> = addrs.collect();
    let mut out = Vec::new();
    for name in interfaces {
        for ifaddr in all.iter().filter(|a| &a.interface_name == name) {
            let Some(address) = ifaddr.address.as_ref() else {
                continue;
            };
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(sin), _) => IpAddr::V4(sin.ip()),
                (_, Some(sin6)) if !sin6.ip().is_unicast_link_local() => IpAddr::V6(sin6.ip()),
                _ => continue,
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::NodePortAddresses;

    fn parse(values: &[&str]) -> Result<NodePortAddresses, String> {
        NodePortAddresses::parse(&values.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>())
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn nodeport_addresses_follow_kube_proxy() {
        let external = ips(&["172.30.0.11", "fd00:30::11", "172.30.1.5", "10.0.0.1"]);
        assert_eq!(parse(&[]).unwrap(), NodePortAddresses::All);
        assert_eq!(parse(&[]).unwrap().select(&external), external);
        // CIDRs of both families, as a dual-stack kube-proxy configuration has them.
        let dual = parse(&["172.30.0.0/24", "fd00:30::/64"]).unwrap();
        assert_eq!(dual.select(&external), ips(&["172.30.0.11", "fd00:30::11"]));
        assert_eq!(
            parse(&["10.0.0.1", "0.0.0.0/0"]).unwrap().select(&external),
            ips(&["172.30.0.11", "172.30.1.5", "10.0.0.1"]),
            "a bare address is a host route; 0.0.0.0/0 is every IPv4 address"
        );
        assert_eq!(
            parse(&["10.0.0.1/8"]).unwrap(),
            NodePortAddresses::Cidrs(vec!["10.0.0.0/8".parse().unwrap()]),
            "host bits are cleared"
        );
        assert_eq!(
            parse(&["fd00::/8"]).unwrap().select(&external),
            ips(&["fd00:30::11"]),
            "an IPv6 range holds IPv6 addresses only"
        );
        // primary: the first address of each family, alone.
        assert_eq!(parse(&["primary"]).unwrap(), NodePortAddresses::Primary);
        assert_eq!(
            parse(&["primary"]).unwrap().select(&external),
            ips(&["172.30.0.11", "fd00:30::11"])
        );
        assert_eq!(
            parse(&["primary"]).unwrap().select(&[]),
            Vec::<IpAddr>::new()
        );
        assert!(
            parse(&["primary", "10.0.0.0/8"])
                .unwrap_err()
                .contains("combined")
        );
        assert!(
            parse(&["10.0.0.0/33"])
                .unwrap_err()
                .contains("neither a CIDR")
        );
        assert!(parse(&["eth0"]).is_err());
    }
}
