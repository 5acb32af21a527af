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
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use lb_common::service::ServiceKey;

use crate::dataplane::FrontendKey;
use serde::{Deserialize, Serialize};

use crate::{
    model::{Object, ObjectRef, Protocol, ServiceKind, TrafficPolicy},
    translate::{Desired, Frontend, FrontendPlan, ServiceInputs, Translator, WhenEmpty},
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
    pub address: IpAddr,
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
    pub address: IpAddr,
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
    address: IpAddr,
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

/// What the state is made from: the translator's objects and the plans of the last sync.
/// Serializes as a [`NodeState`] one Service at a time, so writing the file for 10,000 Services
/// never holds their names twice.
pub struct Snapshot<'a> {
    node: Option<&'a str>,
    inputs: Vec<&'a ServiceInputs>,
    frontends: BTreeMap<&'a ObjectRef, Vec<(&'a Frontend, &'a FrontendPlan)>>,
    unprogrammed: BTreeMap<&'a ObjectRef, &'a str>,
}

impl<'a> Snapshot<'a> {
    pub fn new(node: Option<&'a str>, translator: &'a Translator, desired: &'a Desired) -> Self {
        let mut frontends: BTreeMap<&ObjectRef, Vec<(&Frontend, &FrontendPlan)>> = BTreeMap::new();
        for (frontend, plan) in &desired.frontends {
            (frontends.entry(&plan.service).or_default()).push((frontend, plan.as_ref()));
        }
        let mut inputs: Vec<&ServiceInputs> = translator.inputs().collect();
        inputs.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            node,
            inputs,
            frontends,
            unprogrammed: (desired.unprogrammed.iter())
                .map(|u| (&u.service, u.reason.as_str()))
                .collect(),
        }
    }

    fn services(&self) -> impl Iterator<Item = ServiceInfo> + '_ {
        self.inputs.iter().filter_map(|inputs| self.service(inputs))
    }

    fn service(&self, inputs: &ServiceInputs) -> Option<ServiceInfo> {
        let Some(Object::Service(spec)) = inputs.service.as_deref() else {
            return None;
        };
        let mut endpoints: BTreeMap<IpAddr, EndpointInfo> = BTreeMap::new();
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
            ServiceKind::ExternalName(target) => Some(format!("ExternalName {target}: DNS-only")),
            ServiceKind::Virtual => self.unprogrammed.get(&spec.id).map(|r| (*r).to_owned()),
        };
        Some(ServiceInfo {
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
            frontends: (self.frontends.get(&spec.id).into_iter().flatten())
                .map(|(f, plan)| frontend_info(f.addr, f.port, f.protocol.to_string(), plan))
                .collect(),
            endpoints: endpoints.into_values().collect(),
        })
    }

    /// The whole state in memory (for tests; the agent writes it with [`Snapshot::write`]).
    pub fn collect(&self) -> NodeState {
        NodeState {
            node: self.node.map(str::to_owned),
            written_unix_s: unix_now(),
            services: self.services().collect(),
        }
    }

    /// Writes the state to `<dir>/services.json` atomically (a reader sees the old or the new
    /// file, whole), a Service at a time. The directory is created root-only if missing.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_atomically(dir, self)
    }
}

impl Serialize for Snapshot<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        /// The Services as a sequence built while it is written.
        struct Services<'s, 'a>(&'s Snapshot<'a>);
        impl Serialize for Services<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.services())
            }
        }
        let mut state = serializer.serialize_struct("NodeState", 3)?;
        state.serialize_field("node", &self.node)?;
        state.serialize_field("written_unix_s", &unix_now())?;
        state.serialize_field("services", &Services(self))?;
        state.end()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn write_atomically(dir: &Path, value: &impl Serialize) -> anyhow::Result<()> {
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
    serde_json::to_writer(&mut out, value).context("encoding the state")?;
    out.flush()
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

impl NodeState {
    /// Writes the state to `<dir>/services.json` atomically.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_atomically(dir, self)
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
        address: IpAddr,
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

    /// Every planned frontend by the key the maps hold it under, for joining many map entries
    /// with their names.
    pub fn frontend_index(&self) -> BTreeMap<FrontendKey, (&ServiceInfo, &FrontendInfo)> {
        let mut index = BTreeMap::new();
        for s in &self.services {
            for f in &s.frontends {
                let proto = match f.protocol.as_str() {
                    "UDP" => Protocol::Udp,
                    _ => Protocol::Tcp,
                };
                let key = ServiceKey::new(
                    lb_common::addr::wide_from_ip(f.address),
                    f.port.to_be(),
                    proto.number(),
                );
                index.insert(key, (s, f));
            }
        }
        index
    }
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.0.1], nodeName: node-1}
- {addresses: [10.1.0.2], nodeName: node-2, conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {type: ExternalName, externalName: api.example.org}
";

    #[test]
    fn the_state_names_services_frontends_and_endpoints_and_reads_back_as_written() {
        let read = crate::manifest::parse(MANIFEST, "test");
        assert!(read.problems.is_empty(), "{:?}", read.problems);
        let node = crate::translate::NodeContext {
            name: Some("node-1".to_owned()),
            addresses: vec![IpAddr::from([192, 168, 0, 1])],
            ..Default::default()
        };
        let translator = crate::translate::translator_for(&read.objects, &node);
        let snapshot = Snapshot::new(Some("node-1"), &translator, translator.desired());
        let state = snapshot.collect();
        assert_eq!(state.services.len(), 2);
        let api = &state.services[0];
        assert_eq!(
            (api.name.as_str(), api.type_name.as_str()),
            ("api", "ExternalName")
        );
        assert_eq!(
            api.not_programmed.as_deref(),
            Some("ExternalName api.example.org: DNS-only")
        );
        let web = &state.services[1];
        assert_eq!(web.external_traffic_policy, "Local");
        let (svc, node_port) = state
            .frontend(IpAddr::from([192, 168, 0, 1]), 30080, "TCP")
            .expect("the NodePort frontend");
        assert_eq!(svc.name, "web");
        assert_eq!(
            (node_port.kind.as_str(), node_port.policy.as_str()),
            ("NodePort", "Local")
        );
        assert_eq!(node_port.port_name, "http");
        let conditions: Vec<(&str, Option<&str>)> = (web.endpoints.iter())
            .map(|e| (e.condition(), e.node.as_deref()))
            .collect();
        assert_eq!(
            conditions,
            [("ready", Some("node-1")), ("terminating", Some("node-2"))]
        );

        // Written a Service at a time, read back whole.
        let dir = std::env::temp_dir().join(format!("lb-state-test-{}", std::process::id()));
        snapshot.write(&dir).expect("write");
        let mut back = NodeState::read(&dir).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        back.written_unix_s = state.written_unix_s;
        assert_eq!(back, state);
    }
}
