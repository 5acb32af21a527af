//! Manifest reading and translation under random input (proptest): no input panics, and what
//! is programmed keeps its invariants: every programmed frontend's table is complete, and a
//! `Local` traffic policy never picks a backend on another node. No root.
//!
//! `PROPTEST_CASES=100000 cargo test -p lb-userspace --release --test fuzz_manifest` runs the
//! long variant (RELIABILITY.md).

use lb_userspace::{
    dataplane::MapContents,
    manifest,
    sync::Programmer,
    translate::{NodeContext, translate},
};
use proptest::prelude::*;

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/services.yaml"
    ))
    .expect("the bundled example")
}

fn node() -> NodeContext {
    NodeContext {
        name: Some("node-1".to_owned()),
        addresses: vec![[172, 30, 0, 11].into()],
        ..NodeContext::default()
    }
}

/// Reads `text`, translates and programs it; checks the invariants.
fn read_translate_program(text: &str) {
    let read = manifest::parse(text, "fuzz.yaml");
    let desired = translate(&read.objects, &node());
    for plan in desired.frontends.values() {
        if plan.policy == lb_userspace::model::TrafficPolicy::Local {
            assert!(
                plan.backends.iter().all(|b| b.on_this_node),
                "a Local policy picked a remote backend: {plan:?}"
            );
        }
    }
    let mut maps = MapContents::default();
    let (_, unplaced) = Programmer::default()
        .sync(&desired, &mut maps)
        .expect("in-memory maps never fail");
    assert!(unplaced.is_empty(), "{unplaced:?}");
    for (key, entry) in &maps.services {
        for index in 0..entry.table_size {
            let id = maps.slot(entry, index);
            assert!(
                id.is_some_and(|id| maps.backends.contains_key(&id)),
                "{key:?}: slot {index} names no backend"
            );
        }
        assert!(
            entry.source_ranges_id == 0 || maps.source_ranges.contains_key(&entry.source_ranges_id)
        );
    }
}

/// Lines the generator assembles manifests from: valid pieces, broken ones, and what sits in
/// between (wrong types, odd values, limits).
const LINES: &[&str] = &[
    "---",
    "apiVersion: v1",
    "apiVersion: discovery.k8s.io/v1",
    "kind: Service",
    "kind: EndpointSlice",
    "kind: List",
    "kind: Servic",
    "items: []",
    "metadata: {name: web, namespace: t}",
    "metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}",
    "metadata: {name: Web_1}",
    "spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
    "spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}",
    "spec: {type: LoadBalancer, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, loadBalancerSourceRanges: [10.0.0.0/8, bad], ports: [{port: 80, nodePort: 30081}]}",
    "spec: {type: LoadBalancer, clusterIP: 10.96.0.2, internalTrafficPolicy: Local, ports: [{port: 53, protocol: UDP}]}",
    "spec: {clusterIP: None}",
    "spec: {clusterIP: 10.96.0.999, ports: [{port: 70000}]}",
    "spec: {type: ExternalName, externalName: example.com}",
    "spec: {sessionAffinity: ClientIP, clusterIP: 10.96.0.3, ports: [{port: 80}]}",
    "status: {loadBalancer: {ingress: [{ip: 192.168.50.1}, {hostname: lb.example}]}}",
    "addressType: IPv4",
    "addressType: IPv6",
    "ports: [{port: 8080}]",
    "ports: [{port: 5353, protocol: UDP}, {name: http, port: 8080}]",
    "endpoints: [{addresses: [10.244.1.1], nodeName: node-1}, {addresses: [10.244.2.1], nodeName: node-2}]",
    "endpoints: [{addresses: [10.244.1.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}]",
    "endpoints: [{addresses: []}]",
    "endpoints: [{addresses: [not-an-ip]}]",
    "  - { addresses: [\"10.244.2.2\"], nodeName: node-2 }",
    "spec: [",
    "{ unbalanced",
    "\"",
    "",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000),
        ..ProptestConfig::default()
    })]

    /// Any text at all: no panic.
    #[test]
    fn any_text_reads_without_panic(text in "\\PC*") {
        read_translate_program(&text);
    }

    /// Manifests assembled from Kubernetes-shaped lines, valid and broken.
    #[test]
    fn assembled_manifests_keep_the_invariants(lines in proptest::collection::vec(proptest::sample::select(LINES), 0..60)) {
        read_translate_program(&lines.join("\n"));
    }

    /// The bundled example with bytes changed, inserted or cut.
    #[test]
    fn mutated_examples_keep_the_invariants(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8)
    ) {
        let mut bytes = example().into_bytes();
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let at = at.index(bytes.len());
            match op {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => bytes.truncate(at),
            }
        }
        read_translate_program(&String::from_utf8_lossy(&bytes));
    }
}
