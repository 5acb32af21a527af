//! Translation from YAML fixtures to desired state, and the errors bad input produces. No root.

use std::net::Ipv4Addr;

use lb_userspace::{
    manifest,
    model::{Kind, Protocol, Severity},
    translate::{BackendAddr, Desired, Frontend, FrontendKind, NodeContext, WhenEmpty, translate},
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: Ipv4Addr::from(addr).into(),
        port,
        protocol,
    }
}

fn be(addr: [u8; 4], port: u16) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::from(addr).into(),
        port,
        on_this_node: false,
    }
}

fn local(addr: [u8; 4], port: u16) -> BackendAddr {
    BackendAddr {
        on_this_node: true,
        ..be(addr, port)
    }
}

fn example() -> Vec<lb_userspace::model::Object> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/services.yaml"
    ))
    .unwrap();
    let read = manifest::parse(&text, "services.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    read.objects
}

fn node(name: &str, addresses: &[[u8; 4]]) -> NodeContext {
    NodeContext {
        name: Some(name.to_owned()),
        addresses: addresses
            .iter()
            .map(|a| Ipv4Addr::from(*a).into())
            .collect(),
        ..NodeContext::default()
    }
}

const NODE1: [u8; 4] = [172, 30, 0, 11];
const NODE2: [u8; 4] = [172, 30, 0, 12];

fn backends(desired: &Desired, frontend: Frontend) -> Vec<BackendAddr> {
    desired
        .frontends
        .get(&frontend)
        .unwrap_or_else(|| {
            panic!(
                "{frontend} not programmed; have {:?}",
                desired.frontends.keys()
            )
        })
        .backends
        .to_vec()
}

#[test]
fn bundled_example_has_every_frontend_kind_on_each_node() {
    for (name, addr) in [("node-1", NODE1), ("node-2", NODE2)] {
        let desired = translate(&example(), &node(name, &[addr]));
        let kind = |a: [u8; 4], port: u16| desired.frontends[&fe(a, port, Protocol::Tcp)].kind;
        assert_eq!(kind([10, 96, 0, 20], 80), FrontendKind::ClusterIp);
        // NodePorts open on every node, also where the Service has no pod (web on node-1).
        assert_eq!(kind(addr, 30080), FrontendKind::NodePort);
        assert_eq!(kind(addr, 30090), FrontendKind::NodePort);
        assert_eq!(kind([172, 30, 1, 10], 80), FrontendKind::LoadBalancer);
        assert_eq!(kind([172, 30, 2, 10], 8080), FrontendKind::ExternalIp);
        // A LoadBalancer Service is a ClusterIP and a NodePort too.
        assert_eq!(kind([10, 96, 0, 30], 80), FrontendKind::ClusterIp);
        // 19 IPv4 frontends, and the IPv6 ClusterIPs of the dual-stack echo and web (two ports
        // each; the node has no IPv6 address here, so web has no IPv6 NodePort).
        assert_eq!(desired.frontends.len(), 19 + 4, "{name}");
        let unprogrammed: Vec<_> = desired
            .unprogrammed
            .iter()
            .map(|u| &*u.service.name)
            .collect();
        assert_eq!(unprogrammed, ["echo-headless", "upstream"]);
    }
}

#[test]
fn named_target_ports_and_multi_port_services_use_the_slice_ports() {
    let desired = translate(&example(), &node("node-1", &[NODE1]));
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 10], 80, Protocol::Tcp)),
        vec![local([10, 244, 1, 11], 8080), be([10, 244, 2, 11], 8080)]
    );
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 10], 53, Protocol::Udp)),
        vec![local([10, 244, 1, 11], 5353), be([10, 244, 2, 11], 5353)]
    );
}

#[test]
fn external_traffic_policy_local_keeps_only_this_nodes_endpoints() {
    let web_local =
        |desired: &Desired, addr| desired.frontends[&fe(addr, 30081, Protocol::Tcp)].clone();
    let on1 = translate(&example(), &node("node-1", &[NODE1]));
    assert_eq!(
        *web_local(&on1, NODE1).backends,
        [local([10, 244, 1, 12], 8080)]
    );
    let on2 = translate(&example(), &node("node-2", &[NODE2]));
    let plan = web_local(&on2, NODE2);
    assert!(plan.backends.is_empty(), "node-2 has no local endpoint");
    assert_eq!(
        plan.when_empty,
        WhenEmpty::Drop,
        "endpoints exist elsewhere: drop, not reject"
    );
    // The ClusterIP of the same Service is internal traffic: every endpoint.
    assert_eq!(
        backends(&on2, fe([10, 96, 0, 21], 80, Protocol::Tcp)),
        vec![be([10, 244, 1, 12], 8080)]
    );
    // kube-proxy's sync_proxy_rules_no_local_endpoints_total: web-local (external) on node-2;
    // node-cache (internalTrafficPolicy Local) has an endpoint on each node.
    assert_eq!(
        on2.services_without_local_endpoints(),
        [("internal", 0), ("external", 1)]
    );
    assert_eq!(
        on1.services_without_local_endpoints(),
        [("internal", 0), ("external", 0)]
    );
}

#[test]
fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
    for (name, addr, pod) in [
        ("node-1", NODE1, [10, 244, 1, 12]),
        ("node-2", NODE2, [10, 244, 2, 12]),
    ] {
        let desired = translate(&example(), &node(name, &[addr]));
        assert_eq!(
            backends(&desired, fe([10, 96, 0, 60], 53, Protocol::Udp)),
            vec![local(pod, 5353)]
        );
    }
}

#[test]
fn terminating_endpoints_are_a_fallback_only() {
    let desired = translate(&example(), &node("node-1", &[NODE1]));
    let plan = &desired.frontends[&fe([10, 96, 0, 70], 80, Protocol::Tcp)];
    assert_eq!(
        *plan.backends,
        [local([10, 244, 1, 12], 8080)],
        "ready pod-b only"
    );
    assert!(!plan.terminating_fallback);
    // Without the ready pod, the serving terminating one takes new connections.
    let objects: Vec<_> = example()
        .into_iter()
        .map(|mut o| {
            if let lb_userspace::model::Object::Slice(s) = &mut o {
                s.endpoints
                    .retain(|e| e.addr != Ipv4Addr::new(10, 244, 1, 12));
            }
            o
        })
        .collect();
    let desired = translate(&objects, &node("node-1", &[NODE1]));
    let plan = &desired.frontends[&fe([10, 96, 0, 70], 80, Protocol::Tcp)];
    assert_eq!(*plan.backends, [local([10, 244, 1, 11], 8080)]);
    assert!(plan.terminating_fallback);
}

#[test]
fn no_endpoints_rejects_affinity_and_table_size_come_through() {
    let desired = translate(&example(), &node("node-1", &[NODE1]));
    let idle = &desired.frontends[&fe([10, 96, 0, 80], 80, Protocol::Tcp)];
    assert!(idle.backends.is_empty());
    assert_eq!(idle.when_empty, WhenEmpty::Reject);
    let sticky = &desired.frontends[&fe([10, 96, 0, 50], 53, Protocol::Udp)];
    assert_eq!(sticky.affinity_timeout_s, Some(3));
    // The default follows the backend count: the smallest listed prime >= 100 x backends.
    assert_eq!(
        sticky.table_size,
        lb_common::maglev::table_size(sticky.backends.len(), None)
    );

    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: small, namespace: t, annotations: {lb.rs/maglev-table-size: "1021"}}
spec: {clusterIP: 10.96.9.1, sessionAffinity: ClientIP, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: t, annotations: {lb.rs/maglev-table-size: "1000"}}
spec: {clusterIP: 10.96.9.2, ports: [{port: 80}]}
"#;
    let read = manifest::parse(text, "t.yaml");
    let warning = read
        .problems
        .iter()
        .find(|p| p.object.as_ref().is_some_and(|o| &*o.name == "odd"))
        .expect("a warning for odd");
    assert_eq!(warning.severity, Severity::Warning);
    assert!(warning.message.contains("1000"), "{warning}");
    let desired = translate(&read.objects, &NodeContext::default());
    let small = &desired.frontends[&fe([10, 96, 9, 1], 80, Protocol::Tcp)];
    assert_eq!(small.table_size, 1021);
    assert_eq!(
        small.affinity_timeout_s,
        Some(lb_userspace::model::DEFAULT_AFFINITY_TIMEOUT_S)
    );
    assert_eq!(
        desired.frontends[&fe([10, 96, 9, 2], 80, Protocol::Tcp)].table_size,
        251,
        "an invalid annotation is ignored: the default for no backends"
    );
}

#[test]
fn node_port_problems_are_reported() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: t}
spec: {type: NodePort, clusterIP: 10.96.9.1, ports: [{port: 80, nodePort: 30001}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: t}
spec: {type: NodePort, clusterIP: 10.96.9.2, ports: [{port: 80, nodePort: 30001}]}
---
apiVersion: v1
kind: Service
metadata: {name: c, namespace: t}
spec: {type: NodePort, clusterIP: 10.96.9.3, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: d, namespace: t}
spec: {type: LoadBalancer, clusterIP: 10.96.9.4, ports: [{port: 80}], externalTrafficPolicy: Sometimes}
"#;
    let read = manifest::parse(text, "t.yaml");
    let error_for = |name: &str| {
        read.errors()
            .find(|p| p.object.as_ref().is_some_and(|o| &*o.name == name))
            .unwrap_or_else(|| panic!("no error for {name}: {:#?}", read.problems))
            .clone()
    };
    assert_eq!(error_for("c").field, "spec.ports[0].nodePort");
    assert_eq!(error_for("d").field, "spec.externalTrafficPolicy");
    let desired = translate(&read.objects, &node("node-1", &[NODE1]));
    let conflict = &desired.problems[0];
    assert_eq!(&*conflict.object.as_ref().unwrap().name, "b");
    assert!(conflict.message.contains("t/a"), "{conflict}");
    assert_eq!(
        &*desired.frontends[&fe(NODE1, 30001, Protocol::Tcp)]
            .service
            .name,
        "a"
    );
    assert!(
        desired
            .frontends
            .contains_key(&fe([10, 96, 9, 2], 80, Protocol::Tcp)),
        "b keeps its ClusterIP"
    );
}

#[test]
fn slices_merge_by_port_name_and_protocol_and_skip_unready() {
    let read = manifest::parse(&fixture("multi-slice.yaml"), "multi-slice.yaml");
    let desired = translate(&read.objects, &NodeContext::default());
    // Two slices, one duplicate endpoint, one not ready: two distinct ready backends.
    assert_eq!(
        backends(&desired, fe([10, 96, 5, 5], 80, Protocol::Tcp)),
        vec![be([10, 244, 2, 1], 8080), be([10, 244, 3, 1], 8080)]
    );
    assert_eq!(
        backends(&desired, fe([10, 96, 5, 5], 9090, Protocol::Tcp)),
        vec![be([10, 244, 2, 1], 9100), be([10, 244, 3, 1], 9100)]
    );
    assert_eq!(
        backends(&desired, fe([10, 96, 5, 5], 53, Protocol::Udp)),
        vec![be([10, 244, 2, 1], 5353), be([10, 244, 3, 1], 5353)]
    );
    // Same name, other namespace: no endpoints of its own.
    assert!(backends(&desired, fe([10, 96, 6, 6], 80, Protocol::Tcp)).is_empty());
    // SCTP left out with a warning, not an error.
    let sctp: Vec<_> = read
        .problems
        .iter()
        .filter(|p| p.field == "spec.ports[3].protocol")
        .collect();
    assert_eq!(sctp.len(), 1, "{:?}", read.problems);
    assert_eq!(sctp[0].severity, Severity::Warning);
    assert!(!desired.frontends.keys().any(|f| f.port == 3868));
    // ExternalName recognised, not programmed.
    assert!(
        desired
            .unprogrammed
            .iter()
            .any(|u| &*u.service.name == "db" && u.reason.contains("db.example.internal"))
    );
    // The clone loses the contested port to prod/shop (first by name), keeps its other port.
    let conflict: Vec<_> = desired.problems.iter().collect();
    assert_eq!(conflict.len(), 1, "{conflict:?}");
    assert_eq!(&*conflict[0].object.as_ref().unwrap().name, "shop-clone");
    assert!(conflict[0].message.contains("prod/shop"), "{}", conflict[0]);
    assert_eq!(
        &*desired.frontends[&fe([10, 96, 5, 5], 80, Protocol::Tcp)]
            .service
            .name,
        "shop"
    );
    assert!(
        desired
            .frontends
            .contains_key(&fe([10, 96, 5, 5], 81, Protocol::Tcp))
    );
}

#[test]
fn translation_does_not_depend_on_object_order() {
    let read = manifest::parse(&fixture("multi-slice.yaml"), "multi-slice.yaml");
    let forward = translate(&read.objects, &NodeContext::default());
    let reversed: Vec<_> = read.objects.iter().rev().cloned().collect();
    assert_eq!(translate(&reversed, &NodeContext::default()), forward);
}

#[test]
fn each_bad_object_is_reported_by_name_and_field_and_the_rest_is_programmed() {
    let read = manifest::parse(&fixture("bad-input.yaml"), "bad-input.yaml");
    let error_for = |name: &str| {
        read.errors()
            .find(|p| p.object.as_ref().is_some_and(|o| &*o.name == name))
            .unwrap_or_else(|| panic!("no error for {name}: {:#?}", read.problems))
            .clone()
    };
    let bad_ip = error_for("bad-ip");
    assert_eq!(bad_ip.field, "spec.clusterIP[0]");
    assert!(bad_ip.message.contains("10.96.0.300"));
    assert_eq!(bad_ip.object.as_ref().unwrap().kind, Kind::Service);
    assert_eq!(error_for("port-zero").field, "spec.ports[0].port");
    let too_big = error_for("port-too-big");
    assert_eq!(too_big.field, "spec.ports[1].port");
    assert!(too_big.message.contains("70000"));
    let proto = error_for("odd-protocol");
    assert_eq!(proto.field, "spec.ports[0].protocol");
    assert!(proto.message.contains("ICMP"));
    // Not even a valid Service: serde names the path to the field.
    let nan = error_for("port-not-a-number");
    assert!(nan.to_string().contains("spec.ports[0].port"), "{nan}");
    let orphan = error_for("orphan-slice");
    assert_eq!(orphan.object.as_ref().unwrap().kind, Kind::EndpointSlice);
    assert!(orphan.field.contains("kubernetes.io/service-name"));
    assert_eq!(error_for("bad-address").field, "endpoints[0].addresses[0]");
    // Messages name the object and where it came from.
    assert!(
        bad_ip
            .to_string()
            .contains("Service t/bad-ip (bad-input.yaml document 1)"),
        "{bad_ip}"
    );

    // Rejected whole, so a caller can keep their last good versions.
    assert_eq!(read.rejected.len(), 7, "{:?}", read.rejected);
    let desired = translate(&read.objects, &NodeContext::default());
    assert_eq!(desired.frontends.len(), 1, "{:?}", desired.frontends);
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 40], 80, Protocol::Tcp)),
        vec![be([10, 244, 1, 60], 8080)]
    );
}

#[test]
fn yaml_syntax_error_is_reported_with_its_document() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
    let read = manifest::parse(text, "broken.yaml");
    let names: Vec<&str> = read.objects.iter().map(|o| &*o.id().name).collect();
    assert_eq!(
        names,
        ["a", "b"],
        "the documents around the broken one are read"
    );
    let problem = read.errors().next().expect("an error");
    assert!(
        problem.location.contains("broken.yaml document 2"),
        "{problem}"
    );
    assert!(problem.message.contains("invalid YAML"), "{problem}");
    assert_eq!(read.errors().count(), 1);
}

#[test]
fn documents_split_at_their_markers_only() {
    let split = |text| manifest::split_documents(text).expect("splittable");
    // Comments before the first marker are no document; a trailing marker leaves an empty one.
    assert_eq!(
        split("# c\n---\na: 1\n--- # two\nb: 2\n---\n"),
        ["a: 1\n", "b: 2\n", ""]
    );
    assert_eq!(split("a: 1\n"), ["a: 1\n"]);
    // `---` inside a line, or indented, is content.
    assert_eq!(
        split("a: x---y\nb: |\n  ---\n"),
        ["a: x---y\nb: |\n  ---\n"]
    );
    // What the split does not follow is left to the YAML parser.
    assert!(manifest::split_documents("%YAML 1.2\n---\na: 1\n").is_none());
    assert!(manifest::split_documents("--- {a: 1}\n").is_none());
    assert!(manifest::split_documents("a: 1\n...\n").is_none());
    let read = manifest::parse(
        "--- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}\n",
        "x",
    );
    assert_eq!(read.objects.len(), 1, "{:?}", read.problems);
}

#[test]
fn lists_are_unpacked_and_foreign_kinds_ignored() {
    let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: x}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c}
"#;
    let read = manifest::parse(text, "list.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    assert_eq!(read.objects.len(), 1);
}

#[test]
fn topology_hints_are_followed_only_when_asked_for_and_complete() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: t, annotations: {service.kubernetes.io/topology-mode: Auto}}
spec: {clusterIP: 10.96.9.1, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: t, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: ["10.244.1.1"], zone: a, hints: {forZones: [{name: a}]}}
- {addresses: ["10.244.2.1"], zone: b, hints: {forZones: [{name: b}]}}
"#;
    let read = manifest::parse(text, "t.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let in_zone = |zone: Option<&str>| {
        let node = NodeContext {
            zone: zone.map(str::to_owned),
            ..NodeContext::default()
        };
        backends(
            &translate(&read.objects, &node),
            fe([10, 96, 9, 1], 80, Protocol::Tcp),
        )
    };
    assert_eq!(in_zone(Some("a")), vec![be([10, 244, 1, 1], 8080)]);
    assert_eq!(in_zone(Some("b")), vec![be([10, 244, 2, 1], 8080)]);
    assert_eq!(in_zone(None).len(), 2, "zone unknown: every endpoint");
    assert_eq!(
        in_zone(Some("c")).len(),
        2,
        "no endpoint hinted for this zone: every endpoint"
    );
    // Without the annotation hints are ignored.
    let plain = text.replace(
        ", annotations: {service.kubernetes.io/topology-mode: Auto}",
        "",
    );
    let read = manifest::parse(&plain, "t.yaml");
    let node = NodeContext {
        zone: Some("a".to_owned()),
        ..NodeContext::default()
    };
    assert_eq!(
        backends(
            &translate(&read.objects, &node),
            fe([10, 96, 9, 1], 80, Protocol::Tcp)
        )
        .len(),
        2
    );
}

#[test]
fn health_check_node_ports_count_local_ready_endpoints() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: t}
spec: {type: LoadBalancer, clusterIP: 10.96.9.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80, nodePort: 30000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: t, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: ["10.244.1.1"], nodeName: node-1}
- {addresses: ["10.244.1.2"], nodeName: node-1, conditions: {ready: false}}
- {addresses: ["10.244.2.1"], nodeName: node-2}
"#;
    let read = manifest::parse(text, "t.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    for (name, count) in [("node-1", 1), ("node-2", 1), ("node-3", 0)] {
        let desired = translate(&read.objects, &node(name, &[NODE1]));
        let check = &desired.health_checks[&32000];
        assert_eq!(check.local_endpoints, count, "{name}");
        assert_eq!(&*check.service.name, "lb");
    }
}

/// A Service with `n` endpoints in slices of at most 1,000 (the API's cap), and one with two.
fn big_and_small(n: usize) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: t}\n\
         spec: {clusterIP: 10.96.7.1, ports: [{port: 80}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: small, namespace: t}\n\
         spec: {clusterIP: 10.96.7.2, ports: [{port: 80}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {name: small-1, namespace: t, labels: {kubernetes.io/service-name: small}}\n\
         ports: [{port: 8080}]\n\
         endpoints: [{addresses: [10.245.0.1]}, {addresses: [10.245.0.2]}]\n",
    );
    for (slice, chunk) in (0..n).collect::<Vec<_>>().chunks(1000).enumerate() {
        text += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: big-{slice}, namespace: t, labels: \
             {{kubernetes.io/service-name: big}}}}\nports: [{{port: 8080}}]\nendpoints:\n"
        );
        for i in chunk {
            text += &format!("- addresses: [10.244.{}.{}]\n", i / 250, i % 250 + 1);
        }
    }
    text
}

#[test]
fn table_size_follows_the_backend_count_and_an_uneven_table_is_reported() {
    let read = manifest::parse(&big_and_small(1400), "big.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let desired = translate(&read.objects, &NodeContext::default());
    let small = &desired.frontends[&fe([10, 96, 7, 2], 80, Protocol::Tcp)];
    assert_eq!(
        small.table_size, 251,
        "2 backends: the smallest size, not 16381"
    );
    let big = &desired.frontends[&fe([10, 96, 7, 1], 80, Protocol::Tcp)];
    assert_eq!(big.backends.len(), 1400);
    assert_eq!(big.table_size, lb_common::maglev::MAX_TABLE_SIZE);
    assert_eq!(desired.uneven_tables(), 1);
    let warnings: Vec<_> = desired
        .problems
        .iter()
        .filter(|p| p.object.as_ref().is_some_and(|o| &*o.name == "big"))
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", desired.problems);
    assert_eq!(warnings[0].severity, Severity::Warning);
    assert!(
        warnings[0].message.contains("1400 backends"),
        "{}",
        warnings[0]
    );

    // 1,310 backends still get 100 slots each in the largest table: no warning.
    let desired = translate(
        &manifest::parse(&big_and_small(1310), "big.yaml").objects,
        &NodeContext::default(),
    );
    assert_eq!(desired.uneven_tables(), 0);
    assert!(desired.problems.is_empty(), "{:?}", desired.problems);
}

/// `loadBalancerSourceRanges` (or kube-proxy's annotation) guard the load-balancer IPs only,
/// NodePorts too when asked; bad ranges are reported and left out, and a list with no valid
/// IPv4 range refuses every IPv4 client rather than admitting all.
#[test]
fn source_ranges_guard_load_balancer_ips_and_fail_closed() {
    let service = |name: &str, octet: u8, kind: &str, ranges: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{type: {kind}, clusterIP: 10.96.0.{octet}, ports: [{{port: 80, nodePort: 300{octet:02}}}]{ranges}}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: 192.168.50.{octet}}}]}}}}\n---\n"
        )
    };
    let yaml = service(
        "field",
        1,
        "LoadBalancer",
        ", loadBalancerSourceRanges: [\"203.0.113.9/24\", \"10.0.0.0/8\", \"10.0.0.0/8\"]",
    ) + &service("open", 2, "LoadBalancer", "")
        + &service(
            "bad",
            3,
            "LoadBalancer",
            ", loadBalancerSourceRanges: [\"10.0.0.0/33\", \"2001:db8::/32\"]",
        )
        + &service(
            "nodeport",
            4,
            "NodePort",
            ", loadBalancerSourceRanges: [\"10.0.0.0/8\"]",
        )
        + "apiVersion: v1\nkind: Service\nmetadata: {name: annotated, annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: \" 198.51.100.0/24 , 192.0.2.1/32\"}}\n\
           spec: {type: LoadBalancer, clusterIP: 10.96.0.5, ports: [{port: 80, nodePort: 30005}]}\n\
           status: {loadBalancer: {ingress: [{ip: 192.168.50.5}]}}\n---\n";
    let read = manifest::parse(&yaml, "ranges.yaml");
    let problems: Vec<String> = read.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].contains("Service default/bad")
            && problems[0].contains("loadBalancerSourceRanges[0]")
            && problems[0].contains("\"10.0.0.0/33\""),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("refuse every IPv4 client"),
        "{problems:#?}"
    );
    assert!(
        problems[2].contains("default/nodeport") && problems[2].contains("only LoadBalancer"),
        "{problems:#?}"
    );
    for guard_node_ports in [false, true] {
        let node = NodeContext {
            source_ranges_on_node_ports: guard_node_ports,
            ..node("node-1", &[[172, 30, 0, 11]])
        };
        let desired = translate(&read.objects, &node);
        let ranges = |addr: [u8; 4], port: u16| -> Option<Vec<String>> {
            let plan = &desired.frontends[&fe(addr, port, Protocol::Tcp)];
            (plan.source_ranges.as_ref()).map(|r| r.iter().map(|n| n.to_string()).collect())
        };
        let field = Some(vec!["10.0.0.0/8".to_owned(), "203.0.113.0/24".to_owned()]);
        assert_eq!(
            ranges([192, 168, 50, 1], 80),
            field,
            "host bits cleared, sorted, deduplicated"
        );
        assert_eq!(ranges([10, 96, 0, 1], 80), None, "the ClusterIP stays open");
        let node_port = ranges([172, 30, 0, 11], 30001);
        assert_eq!(
            node_port,
            if guard_node_ports {
                field.clone()
            } else {
                None
            }
        );
        assert_eq!(ranges([192, 168, 50, 2], 80), None, "no ranges: open");
        assert_eq!(
            ranges([192, 168, 50, 3], 80),
            Some(vec![]),
            "none valid: closed"
        );
        assert_eq!(
            ranges([172, 30, 0, 11], 30004),
            None,
            "NodePort Services have none"
        );
        assert_eq!(
            ranges([192, 168, 50, 5], 80),
            Some(vec![
                "192.0.2.1/32".to_owned(),
                "198.51.100.0/24".to_owned()
            ]),
            "the annotation, as kube-proxy reads it"
        );
    }
}

/// The API's limits and name rules are checked: an object breaking them is rejected with the
/// limit named (the API server would refuse it), and the other objects are programmed.
#[test]
fn api_limits_and_names_are_checked() {
    let endpoints: String = (0..1001)
        .map(|i| format!("  - addresses: [\"10.244.{}.{}\"]\n", i / 250, 1 + i % 250))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: Web_1}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: Team}}\nspec: {{clusterIP: 10.96.0.2, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: ports}}\nspec: {{clusterIP: 10.96.0.3, ports: [{{name: a-very-long-port-name, port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: fine}}\nspec: {{clusterIP: 10.96.0.4, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: huge, labels: {{kubernetes.io/service-name: fine}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: fine-1, labels: {{kubernetes.io/service-name: fine}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.9.9]}}]\n"
    );
    let read = manifest::parse(&yaml, "limits.yaml");
    let problems: Vec<String> = read.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 4, "{problems:#?}");
    let expect = [
        ("default/Web_1", "metadata.name"),
        ("Team/web", "metadata.namespace"),
        ("default/ports", "spec.ports[0].name"),
        (
            "default/huge",
            "endpoints: 1001 items; the API allows at most 1000",
        ),
    ];
    for ((object, detail), problem) in expect.iter().zip(&problems) {
        assert!(
            problem.starts_with("error") && problem.contains(object) && problem.contains(detail),
            "{problem}"
        );
    }
    let desired = translate(&read.objects, &NodeContext::default());
    assert_eq!(desired.frontends.len(), 1, "only fine is programmed");
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 4], 80, Protocol::Tcp)),
        [be([10, 244, 9, 9], 8080)]
    );
}

/// A dual-stack Service (`clusterIPs` of both families, an EndpointSlice of each
/// `addressType`) gets frontends of both families, each with the backends of its own family:
/// its ClusterIPs, its NodePorts on the node's addresses of both families, and its load-balancer
/// IPs; a single-stack Service gets no NodePort on the other family's node address. Source
/// ranges guard each family's load-balancer IP with that family's ranges.
#[test]
fn dual_stack_services_get_frontends_of_both_families() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  type: LoadBalancer
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  loadBalancerSourceRanges: ["203.0.113.0/24", "2001:db8::/32"]
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 192.168.50.10}, {ip: "fd00:50::10"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["10.244.1.11"], nodeName: node-1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["fd00:244:1::11"], nodeName: node-1}
- {addresses: ["fd00:244:2::11"], nodeName: node-2}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: t}
spec: {type: NodePort, clusterIP: 10.96.0.20, ports: [{port: 81, nodePort: 30081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: legacy-1, namespace: t, labels: {kubernetes.io/service-name: legacy}}
addressType: IPv4
ports: [{port: 8081}]
endpoints:
- {addresses: ["10.244.1.12"], nodeName: node-1}
"#;
    let read = manifest::parse(yaml, "dual.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let node = NodeContext {
        name: Some("node-1".to_owned()),
        addresses: vec![
            "172.30.0.11".parse().unwrap(),
            "fd00:30::11".parse().unwrap(),
        ],
        ..NodeContext::default()
    };
    let desired = translate(&read.objects, &node);
    assert!(desired.problems.is_empty(), "{:?}", desired.problems);
    let frontend = |addr: &str, port: u16| Frontend {
        addr: addr.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    };
    let backend = |addr: &str, on_this_node: bool| BackendAddr {
        addr: addr.parse().unwrap(),
        port: 8080,
        on_this_node,
    };
    let v4 = vec![backend("10.244.1.11", true)];
    let v6 = vec![
        backend("fd00:244:1::11", true),
        backend("fd00:244:2::11", false),
    ];
    for (addr, port, kind, backends) in [
        ("10.96.0.10", 80, FrontendKind::ClusterIp, &v4),
        ("fd00:96::10", 80, FrontendKind::ClusterIp, &v6),
        ("172.30.0.11", 30080, FrontendKind::NodePort, &v4),
        ("fd00:30::11", 30080, FrontendKind::NodePort, &v6),
        ("192.168.50.10", 80, FrontendKind::LoadBalancer, &v4),
        ("fd00:50::10", 80, FrontendKind::LoadBalancer, &v6),
    ] {
        let plan = desired
            .frontends
            .get(&frontend(addr, port))
            .unwrap_or_else(|| panic!("no frontend {addr}:{port}"));
        assert_eq!(plan.kind, kind, "{addr}");
        assert_eq!(
            &plan.backends[..],
            &backends[..],
            "{addr}: its own family's backends"
        );
    }
    let ranges = |addr: &str| -> Vec<String> {
        let plan = &desired.frontends[&frontend(addr, 80)];
        let ranges = plan.source_ranges.as_ref().expect("guarded");
        ranges.iter().map(|r| r.to_string()).collect()
    };
    assert_eq!(ranges("192.168.50.10"), ["203.0.113.0/24"]);
    assert_eq!(ranges("fd00:50::10"), ["2001:db8::/32"]);
    // The single-stack IPv4 Service: its NodePort on the IPv4 node address only.
    assert!(desired.frontends.contains_key(&Frontend {
        addr: "172.30.0.11".parse().unwrap(),
        port: 30081,
        protocol: Protocol::Tcp,
    }));
    assert!(!desired.frontends.contains_key(&Frontend {
        addr: "fd00:30::11".parse().unwrap(),
        port: 30081,
        protocol: Protocol::Tcp,
    }));
    assert_eq!(
        desired.frontends.len(),
        6 + 2,
        "web's six, legacy's ClusterIP and NodePort"
    );
}

/// An IPv6 slice whose address is IPv4 (or the reverse) is an error; an IPv6 address where a
/// Service has IPv4 clusterIPs twice is one too.
#[test]
fn addresses_must_match_their_family() {
    let yaml = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mixed, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["10.244.1.11"]}
---
apiVersion: v1
kind: Service
metadata: {name: twice, namespace: t}
spec: {clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}
"#;
    let read = manifest::parse(yaml, "mixed.yaml");
    let problems: Vec<String> = read.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains("not a valid IPv6 address"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("one address of each family"),
        "{problems:#?}"
    );
    assert!(read.objects.is_empty(), "both refused");
}
