//! The agent's state file: the Kubernetes names behind the ids in the pinned maps, so `lb
//! services`, `lb explain`, `lb conntrack`, `lb monitor` and the per-Service metrics can say
//! "default/web port http, pod on node-2" without API access.
//!
//! The maps stay the truth about what the packet path does; this file only names things. It is
//! written whole (to a temporary file, then renamed, so a reader never sees half of it) after
//! syncs, at most once a second, and survives the agent like the pins do.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    model::{Object, ObjectRef, ServiceKind, TrafficPolicy},
    translate::{Desired, FrontendPlan, Translator, WhenEmpty},
};

/// The file's name under the state directory.
pub const STATE_FILE: &str = "services.json";
/// The state directory when none is given (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = "/run/lb";
/// The shortest time between two writes of the file.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Everything the agent knows by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node the agent programs (`--node-name`).
    pub node: Option<String>,
    /// When the file was written, Unix seconds.
    pub written_unix_s: u64,
    /// Every Service the agent knows, programmed or not, by namespace/name.
    pub services: Vec<ServiceInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.type` as written.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Why nothing of it is programmed (ExternalName, headless, another proxy's...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_programmed: Option<String>,
    pub external_traffic_policy: String,
    pub internal_traffic_policy: String,
    /// `sessionAffinity: ClientIP` timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    /// `loadBalancerSourceRanges`, as programmed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    pub frontends: Vec<FrontendInfo>,
    /// Every endpoint of its EndpointSlices, whatever its conditions.
    pub endpoints: Vec<EndpointInfo>,
}

/// One frontend as translation planned it (the maps say what is programmed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendInfo {
    pub address: Ipv4Addr,
    pub port: u16,
    /// "TCP" or "UDP".
    pub protocol: String,
    /// ClusterIP, NodePort, externalIP or LoadBalancer.
    pub kind: String,
    pub port_name: String,
    /// The policy that chose its backends: Cluster or Local.
    pub policy: String,
    /// Its backends are terminating ones, as none is ready.
    pub terminating_fallback: bool,
    /// With no backend: "reject" (TCP RST / ICMP unreachable) or "drop".
    pub when_empty: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub address: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl EndpointInfo {
    /// The endpoint's conditions in one word, as `kubectl` users read them.
    pub fn condition(&self) -> &'static str {
        match (self.ready, self.serving, self.terminating) {
            (true, _, _) => "ready",
            (false, true, true) => "terminating",
            (false, false, true) => "terminating (not serving)",
            (false, _, false) => "not ready",
        }
    }
}

fn policy_name(policy: TrafficPolicy) -> &'static str {
    match policy {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn frontend_info(
    address: Ipv4Addr,
    port: u16,
    protocol: String,
    plan: &FrontendPlan,
) -> FrontendInfo {
    FrontendInfo {
        address,
        port,
        protocol,
        kind: plan.kind.to_string(),
        port_name: plan.port_name.to_string(),
        policy: policy_name(plan.policy).to_owned(),
        terminating_fallback: plan.terminating_fallback,
        when_empty: match plan.when_empty {
            WhenEmpty::Reject => "reject",
            WhenEmpty::Drop => "drop",
        }
        .to_owned(),
    }
}

impl NodeState {
    /// The names of everything `translator` knows, with the frontends `desired` plans.
    pub fn collect(node: Option<&str>, translator: &Translator, desired: &Desired) -> Self {
        let mut frontends: BTreeMap<&ObjectRef, Vec<FrontendInfo>> = BTreeMap::new();
        for (frontend, plan) in &desired.frontends {
            frontends
                .entry(&plan.service)
                .or_default()
                .push(frontend_info(
                    frontend.addr,
                    frontend.port,
                    frontend.protocol.to_string(),
                    plan,
                ));
        }
        let unprogrammed: BTreeMap<&ObjectRef, &str> = (desired.unprogrammed.iter())
            .map(|u| (&u.service, u.reason.as_str()))
            .collect();
        let mut services: Vec<ServiceInfo> = Vec::new();
        for inputs in translator.inputs() {
            let Some(Object::Service(spec)) = inputs.service.as_deref() else {
                continue;
            };
            let mut endpoints: BTreeMap<Ipv4Addr, EndpointInfo> = BTreeMap::new();
            for slice in &inputs.slices {
                let Object::Slice(slice) = slice.as_ref() else {
                    continue;
                };
                for e in &slice.endpoints {
                    endpoints.entry(e.addr).or_insert_with(|| EndpointInfo {
                        address: e.addr,
                        node: e.node_name.clone(),
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    });
                }
            }
            let not_programmed = match &spec.kind {
                ServiceKind::Headless => Some("headless (clusterIP: None): DNS-only".to_owned()),
                ServiceKind::ExternalName(target) => {
                    Some(format!("ExternalName {target}: DNS-only"))
                }
                ServiceKind::Virtual => unprogrammed.get(&spec.id).map(|r| (*r).to_owned()),
            };
            services.push(ServiceInfo {
                namespace: spec.id.namespace.to_string(),
                name: spec.id.name.to_string(),
                type_name: spec.type_name.clone(),
                not_programmed,
                external_traffic_policy: policy_name(spec.external_traffic_policy).to_owned(),
                internal_traffic_policy: policy_name(spec.internal_traffic_policy).to_owned(),
                affinity_timeout_s: spec.affinity_timeout_s,
                source_ranges: (spec.source_ranges.iter().flat_map(|r| r.iter()))
                    .map(ToString::to_string)
                    .collect(),
                frontends: frontends.remove(&spec.id).unwrap_or_default(),
                endpoints: endpoints.into_values().collect(),
            });
        }
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Self {
            node: node.map(str::to_owned),
            written_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            services,
        }
    }

    /// Writes the state to `<dir>/services.json` atomically (a reader sees the old or the new
    /// file, whole). The directory is created root-only if missing.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut out, self).context("encoding the state")?;
        out.flush()
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads `<dir>/services.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = state_file(dir);
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (is an agent running with --state-dir {}?)",
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The Service a frontend belongs to, and the frontend, by address, port and protocol.
    pub fn frontend(
        &self,
        address: Ipv4Addr,
        port: u16,
        protocol: &str,
    ) -> Option<(&ServiceInfo, &FrontendInfo)> {
        self.services.iter().find_map(|s| {
            s.frontends
                .iter()
                .find(|f| f.address == address && f.port == port && f.protocol == protocol)
                .map(|f| (s, f))
        })
    }

    /// An index of [`NodeState::frontend`] for many lookups.
    pub fn frontend_index(&self) -> BTreeMap<(Ipv4Addr, u16, &str), (&ServiceInfo, &FrontendInfo)> {
        let mut index = BTreeMap::new();
        for s in &self.services {
            for f in &s.frontends {
                index.insert((f.address, f.port, f.protocol.as_str()), (s, f));
            }
        }
        index
    }
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}
