//! Translation from YAML fixtures to desired state, and the errors bad input produces. No root.

use std::net::Ipv4Addr;

use lb_userspace::{
    manifest,
    model::{Kind, Protocol, Severity},
    translate::{BackendAddr, Desired, Frontend, translate},
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: Ipv4Addr::from(addr),
        port,
        protocol,
    }
}

fn be(addr: [u8; 4], port: u16) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::from(addr),
        port,
    }
}

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
        .clone()
}

#[test]
fn bundled_example_translates_to_clusterip_frontends() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/clusterip.yaml"
    ))
    .unwrap();
    let read = manifest::parse(&text, "clusterip.yaml");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let desired = translate(&read.objects);
    assert_eq!(desired.frontends.len(), 3);
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 10], 80, Protocol::Tcp)),
        vec![be([10, 244, 1, 11], 8080), be([10, 244, 1, 12], 8080)]
    );
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 10], 53, Protocol::Udp)),
        vec![be([10, 244, 1, 11], 5353), be([10, 244, 1, 12], 5353)]
    );
    assert!(backends(&desired, fe([10, 96, 0, 20], 80, Protocol::Tcp)).is_empty());
    assert_eq!(desired.unprogrammed.len(), 1);
    assert_eq!(desired.unprogrammed[0].service.name, "echo-headless");
    assert!(desired.unprogrammed[0].reason.contains("headless"));
}

#[test]
fn slices_merge_by_port_name_and_protocol_and_skip_unready() {
    let read = manifest::parse(&fixture("multi-slice.yaml"), "multi-slice.yaml");
    let desired = translate(&read.objects);
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
            .any(|u| u.service.name == "db" && u.reason.contains("db.example.internal"))
    );
    // The clone loses the contested port to prod/shop (first by name), keeps its other port.
    let conflict: Vec<_> = desired.problems.iter().collect();
    assert_eq!(conflict.len(), 1, "{conflict:?}");
    assert_eq!(conflict[0].object.as_ref().unwrap().name, "shop-clone");
    assert!(conflict[0].message.contains("prod/shop"), "{}", conflict[0]);
    assert_eq!(
        desired.frontends[&fe([10, 96, 5, 5], 80, Protocol::Tcp)]
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
    let forward = translate(&read.objects);
    let reversed: Vec<_> = read.objects.iter().rev().cloned().collect();
    assert_eq!(translate(&reversed), forward);
}

#[test]
fn each_bad_object_is_reported_by_name_and_field_and_the_rest_is_programmed() {
    let read = manifest::parse(&fixture("bad-input.yaml"), "bad-input.yaml");
    let error_for = |name: &str| {
        read.errors()
            .find(|p| p.object.as_ref().is_some_and(|o| o.name == name))
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
    let desired = translate(&read.objects);
    assert_eq!(desired.frontends.len(), 1, "{:?}", desired.frontends);
    assert_eq!(
        backends(&desired, fe([10, 96, 0, 40], 80, Protocol::Tcp)),
        vec![be([10, 244, 1, 60], 8080)]
    );
}

#[test]
fn yaml_syntax_error_is_reported_with_its_document() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkind: [unclosed\n";
    let read = manifest::parse(text, "broken.yaml");
    assert_eq!(read.objects.len(), 1, "documents before the error are read");
    let problem = read.errors().next().expect("an error");
    assert!(
        problem.location.contains("broken.yaml document 2"),
        "{problem}"
    );
    assert!(problem.message.contains("invalid YAML"), "{problem}");
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
