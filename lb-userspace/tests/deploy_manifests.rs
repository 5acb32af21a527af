//! Every manifest in deploy/ parses into Kubernetes API types and has the properties the agent
//! needs: read-only RBAC on exactly what it watches, a DaemonSet that can load BPF and keep its
//! pins on the host, probes on the health port, a config the agent accepts, and a kustomization
//! and README that match. No root, no cluster.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_userspace::config::ConfigFile;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file} is not what it claims: {e}"))
}

const NAMESPACE: &str = "lb-system";

#[test]
fn rbac_grants_only_read_access_to_what_the_agent_watches() {
    let role: ClusterRole = load("clusterrole.yaml");
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted.sort();
    let mut wanted = Vec::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.push((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    wanted.sort();
    assert_eq!(granted, wanted);

    let binding: ClusterRoleBinding = load("clusterrolebinding.yaml");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let account: ServiceAccount = load("serviceaccount.yaml");
    let subject = &binding.subjects.as_ref().expect("a subject")[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(subject.name.clone()), account.metadata.name);
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    let ns: Namespace = load("namespace.yaml");
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "lb")
        .expect("the lb container")
}

#[test]
fn the_daemonset_runs_one_privileged_host_network_agent_per_node() {
    let ds: DaemonSet = load("daemonset.yaml");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "it programs the node's own networking"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("lb"));
    let tolerations = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    let agent = agent_container(&ds);
    let security = agent.security_context.as_ref().expect("a security context");
    assert_eq!(
        security.privileged,
        Some(true),
        "Bidirectional mount propagation needs it"
    );
    let caps = security
        .capabilities
        .as_ref()
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} listed: {caps:?}");
    }
    // bpffs from the host, propagated both ways, in the agent and the init container.
    let bpffs_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume for /sys/fs/bpf");
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == bpffs_volume.name)
            .unwrap_or_else(|| panic!("{} mounts bpffs", container.name));
        assert_eq!(mount.mount_path, "/sys/fs/bpf");
        assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
    }
    // Probes on the healthz port, the paths the agent serves.
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
        );
        get.path.clone().unwrap_or_default()
    };
    assert_eq!(probe_path(&agent.liveness_probe), "/livez");
    assert_eq!(probe_path(&agent.readiness_probe), "/healthz");
    let requests = agent
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    // The node name from the downward API, the config from the ConfigMap.
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    let command = agent.command.clone().unwrap_or_default().join(" ");
    assert!(command.starts_with("lb agent --config "), "{command}");
}

#[test]
fn the_configmap_holds_a_config_the_agent_accepts() {
    let map: ConfigMap = load("configmap.yaml");
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config.yaml");
    let ds: DaemonSet = load("daemonset.yaml");
    let command = agent_container(&ds).command.clone().unwrap_or_default();
    assert_eq!(
        command.last().map(String::as_str),
        Some("/etc/lb/config.yaml")
    );
    // The agent's own parser, which refuses unknown settings.
    let path = std::env::temp_dir().join(format!("lb-deploy-config-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let parsed = ConfigFile::load(&path);
    std::fs::remove_file(&path).unwrap();
    let parsed = parsed.expect("the agent accepts the ConfigMap's config");
    assert_eq!(
        parsed.healthz_bind_address.as_deref(),
        Some("0.0.0.0:10256")
    );
    assert!(
        parsed.manifests.is_none(),
        "in a cluster the agent watches the API server"
    );
}

#[test]
fn kustomization_dockerfile_and_readme_match_the_manifests() {
    let kustomization: serde_yaml_ng::Value = load("kustomization.yaml");
    let resources: Vec<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let mut manifests: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    manifests.sort();
    let mut listed = resources.clone();
    listed.sort();
    assert_eq!(listed, manifests, "kustomization lists every manifest");

    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo xtask setup --toolchain-only"));
    assert!(dockerfile.contains("--package lb-userspace"));
    assert!(dockerfile.contains("target/release/lb"));

    let readme = std::fs::read_to_string(deploy_dir().join("../README.md")).unwrap();
    let install = readme
        .split("## Installing on a cluster")
        .nth(1)
        .expect("the README has an install section");
    for needle in [
        "kubectl apply -k deploy/",
        "docker build -f deploy/Dockerfile",
        "lb-system",
        "kube-proxy",
    ] {
        assert!(
            install.contains(needle),
            "install section mentions {needle:?}"
        );
    }
}
