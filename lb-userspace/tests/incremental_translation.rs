//! Incremental translation (a store handing out only the Services that changed, a translator
//! working on those alone) must always equal translating everything from scratch, through random
//! changes that make Services conflict, move slices between Services, turn Services headless and
//! change the node. No root.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use lb_userspace::{
    manifest,
    model::{Object, ObjectRef},
    sources::ObjectStore,
    translate::{NodeContext, Translator, translate},
};

/// A deterministic pseudo-random sequence (xorshift), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
}

const SERVICES: usize = 8;
const SLICES: usize = 12;

/// A random Service `svc-{i}`: few addresses and ports, so Services often claim the same
/// frontend or health-check port.
fn random_service(i: usize, rng: &mut Rng) -> String {
    let cluster_ip = rng.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "None"]);
    let ports = rng.pick(&["[{port: 80}]", "[{port: 80}, {port: 53, protocol: UDP}]"]);
    let mut spec = format!("clusterIP: {cluster_ip}, ports: {ports}");
    let mut status = String::new();
    if cluster_ip != "None" {
        match rng.below(3) {
            0 => {}
            1 => {
                let node_port = rng.pick(&["30000", "30001"]);
                spec = format!(
                    "type: NodePort, clusterIP: {cluster_ip}, ports: [{{port: 80, nodePort: {node_port}}}]"
                );
            }
            _ => {
                let node_port = rng.pick(&["30000", "30002"]);
                let health = rng.pick(&["32000", "32001"]);
                let policy = rng.pick(&["Local", "Cluster"]);
                spec = format!(
                    "type: LoadBalancer, clusterIP: {cluster_ip}, externalTrafficPolicy: {policy}, \
                     healthCheckNodePort: {health}, ports: [{{port: 80, nodePort: {node_port}}}]"
                );
                let ingress = rng.pick(&["192.0.2.1", "192.0.2.2"]);
                status = format!("status: {{loadBalancer: {{ingress: [{{ip: {ingress}}}]}}}}\n");
            }
        }
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: t}}\nspec: {{{spec}}}\n{status}"
    )
}

/// A random slice `slice-{j}` of a random Service, with random endpoint conditions and nodes.
fn random_slice(j: usize, rng: &mut Rng) -> String {
    let service = rng.below(SERVICES as u64);
    let mut endpoints = String::new();
    for pod in 1..=6 {
        if rng.below(2) == 0 {
            continue;
        }
        let (ready, serving, terminating) = match rng.below(4) {
            0 => ("false", "true", "true"),
            1 => ("false", "false", "false"),
            _ => ("true", "true", "false"),
        };
        let node = rng.pick(&["node-1", "node-2"]);
        endpoints += &format!(
            "- addresses: [10.244.{}.{pod}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n",
            j % 3
        );
    }
    if endpoints.is_empty() {
        endpoints = "[]\n".to_owned();
    } else {
        endpoints = format!("\n{endpoints}");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: slice-{j}\n  namespace: t\n  \
         labels: {{kubernetes.io/service-name: svc-{service}}}\naddressType: IPv4\n\
         ports: [{{port: 8080}}, {{port: 5353, protocol: UDP}}]\nendpoints: {endpoints}"
    )
}

fn object(yaml: &str) -> Object {
    let read = manifest::parse(yaml, "test");
    assert!(read.problems.is_empty(), "{yaml}\n{:?}", read.problems);
    assert_eq!(read.objects.len(), 1, "{yaml}");
    read.objects.into_iter().next().unwrap()
}

fn node(rng: &mut Rng) -> NodeContext {
    let (name, address) = if rng.below(2) == 0 {
        ("node-1", Ipv4Addr::new(192, 168, 1, 1))
    } else {
        ("node-2", Ipv4Addr::new(192, 168, 1, 2))
    };
    NodeContext {
        name: Some(name.to_owned()),
        addresses: vec![address.into()],
        ..NodeContext::default()
    }
}

#[test]
fn incremental_translation_equals_translating_everything_through_random_changes() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut objects: BTreeMap<ObjectRef, Object> = BTreeMap::new();
    let mut store = ObjectStore::default();
    let mut translator = Translator::default();
    let mut node_ctx = node(&mut rng);
    let mut conflicts_seen = 0;
    for round in 0..400 {
        for _ in 0..=rng.below(3) {
            let (id, yaml) = if rng.below(2) == 0 {
                let i = rng.below(SERVICES as u64) as usize;
                (format!("svc-{i}"), random_service(i, &mut rng))
            } else {
                let j = rng.below(SLICES as u64) as usize;
                (format!("slice-{j}"), random_slice(j, &mut rng))
            };
            let new = object(&yaml);
            let id_ref = new.id().clone();
            assert_eq!(&*id_ref.name, id.as_str());
            if rng.below(4) == 0 {
                objects.remove(&id_ref);
                store.remove(&id_ref);
            } else {
                objects.insert(id_ref.clone(), new.clone());
                store.put(&id_ref, Some(Arc::new(new)));
            }
        }
        if rng.below(10) == 0 {
            node_ctx = node(&mut rng);
        }
        let before = translator.desired().clone();
        let snapshot = store.take_changes();
        assert_eq!(snapshot.full, round == 0, "only the first snapshot is full");
        let touched = translator.apply(snapshot.changes, snapshot.full, &node_ctx);
        let want = translate(objects.values(), &node_ctx);
        assert_eq!(
            translator.desired(),
            &want,
            "round {round}: incremental translation differs from a full one"
        );
        for (frontend, plan) in &want.frontends {
            if before.frontends.get(frontend) != Some(plan) {
                assert!(
                    touched.contains(frontend),
                    "round {round}: {frontend} not touched"
                );
            }
        }
        for frontend in before.frontends.keys() {
            if !want.frontends.contains_key(frontend) {
                assert!(
                    touched.contains(frontend),
                    "round {round}: {frontend} not touched"
                );
            }
        }
        conflicts_seen += want.problems.len();
    }
    assert!(conflicts_seen > 100, "the changes make Services conflict");
}
