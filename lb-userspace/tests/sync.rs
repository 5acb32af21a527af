//! The diff-and-write logic against the in-memory maps: stable ids, minimal writes, and a write
//! order under which the packet path never sees a half-written service. No root.

use std::collections::BTreeSet;

use lb_common::service::{Backend, BackendId, ServiceEntry, ServiceKey, SlotKey};
use lb_userspace::{
    dataplane::{MapContents, MapWriter, WriteError},
    manifest,
    sync::{Programmer, SyncStats},
    translate::{Desired, translate},
};

fn desired(services: &[(&str, &str, &[&str])]) -> Desired {
    let mut yaml = String::new();
    for (name, vip, pods) in services {
        let endpoints: String = pods
            .iter()
            .map(|p| format!("  - addresses: [\"{p}\"]\n"))
            .collect();
        yaml += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}---\n"
        );
    }
    let read = manifest::parse(&yaml, "test");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    translate(&read.objects)
}

/// What the packet path can rely on at any instant: every service's slots [0, count) exist and
/// point at backends that exist.
fn assert_consistent(maps: &MapContents, after: &str) {
    for (key, entry) in &maps.services {
        for slot in 0..entry.slot_count {
            let slot_key = SlotKey {
                service_id: entry.service_id,
                slot,
            };
            let backend = maps
                .slots
                .get(&slot_key)
                .unwrap_or_else(|| panic!("after {after}: {key:?} slot {slot} missing"));
            assert!(
                maps.backends.contains_key(backend),
                "after {after}: {key:?} slot {slot} -> missing backend {backend}"
            );
        }
    }
}

/// Checks consistency after every single write; optionally fails the Nth write.
struct CheckingWriter {
    maps: MapContents,
    ops: usize,
    fail_at: Option<usize>,
}

impl CheckingWriter {
    fn new(maps: MapContents) -> Self {
        Self {
            maps,
            ops: 0,
            fail_at: None,
        }
    }

    fn step(&mut self, what: &str, apply: impl FnOnce(&mut MapContents)) -> Result<(), WriteError> {
        self.ops += 1;
        if self.fail_at == Some(self.ops) {
            return Err(WriteError {
                op: "write",
                map: "test",
                key: what.to_owned(),
                source: Box::new(aya::maps::MapError::KeyNotFound),
            });
        }
        apply(&mut self.maps);
        assert_consistent(&self.maps, what);
        Ok(())
    }
}

impl MapWriter for CheckingWriter {
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
        self.step("put_backend", |m| {
            m.backends.insert(id, backend);
        })
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.step("delete_backend", |m| {
            m.backends.remove(&id);
        })
    }
    fn put_slot(&mut self, key: SlotKey, backend: BackendId) -> Result<(), WriteError> {
        self.step("put_slot", |m| {
            m.slots.insert(key, backend);
        })
    }
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), WriteError> {
        self.step("delete_slot", |m| {
            m.slots.remove(&key);
        })
    }
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.step("put_service", |m| {
            m.services.insert(key, entry);
        })
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        self.step("delete_service", |m| {
            m.services.remove(&key);
        })
    }
}

const A: &str = "10.244.1.1";
const B: &str = "10.244.1.2";
const C: &str = "10.244.1.3";
const D: &str = "10.244.1.4";

#[test]
fn first_sync_writes_everything_second_writes_nothing() {
    let want = desired(&[("web", "10.96.0.1", &[A, B]), ("api", "10.96.0.2", &[B, C])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new(MapContents::default());
    let stats = programmer.sync(&want, &mut writer).unwrap();
    // 3 backends (B shared), 4 slots, 2 services.
    assert_eq!(
        stats,
        SyncStats {
            writes: 9,
            deletes: 0
        }
    );
    assert_eq!(writer.maps, *programmer.programmed());
    assert_eq!(writer.maps, programmer.target(&want));
    assert!(programmer.sync(&want, &mut writer).unwrap().is_empty());
}

#[test]
fn every_intermediate_state_is_consistent_through_grow_shrink_replace_and_delete() {
    let steps = [
        desired(&[("web", "10.96.0.1", &[A, B]), ("api", "10.96.0.2", &[C])]),
        desired(&[
            ("web", "10.96.0.1", &[A, B, C, D]),
            ("api", "10.96.0.2", &[C]),
        ]),
        desired(&[("web", "10.96.0.1", &[D]), ("api", "10.96.0.2", &[A, C])]),
        desired(&[("web", "10.96.0.1", &[]), ("new", "10.96.0.3", &[B])]),
        desired(&[]),
    ];
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new(MapContents::default());
    for want in &steps {
        programmer.sync(want, &mut writer).unwrap();
        assert_eq!(writer.maps, programmer.target(want));
    }
    assert_eq!(
        writer.maps,
        MapContents::default(),
        "everything removed at the end"
    );
}

#[test]
fn removing_a_backend_touches_only_what_changed_and_keeps_ids() {
    let before = desired(&[("web", "10.96.0.1", &[A, B, C]), ("api", "10.96.0.2", &[A])]);
    let after = desired(&[("web", "10.96.0.1", &[A, C]), ("api", "10.96.0.2", &[A])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new(MapContents::default());
    programmer.sync(&before, &mut writer).unwrap();
    let old = writer.maps.clone();
    let stats = programmer.sync(&after, &mut writer).unwrap();
    // web: slot 1 now C, entry count 3 -> 2, slot 2 deleted; backend B deleted. api untouched.
    assert_eq!(
        stats,
        SyncStats {
            writes: 2,
            deletes: 2
        }
    );
    let ids = |m: &MapContents| {
        m.services
            .values()
            .map(|e| e.service_id)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(ids(&old), ids(&writer.maps), "service ids are stable");
    for (id, backend) in &writer.maps.backends {
        assert_eq!(
            old.backends.get(id),
            Some(backend),
            "backend ids are stable"
        );
    }
}

#[test]
fn adopting_programmed_maps_makes_the_same_desired_state_a_no_op() {
    let want = desired(&[("web", "10.96.0.1", &[A, B])]);
    let mut first = Programmer::default();
    let mut maps = MapContents::default();
    first.sync(&want, &mut maps).unwrap();
    // A restarted agent reads the pinned maps back and adopts them.
    let mut restarted = Programmer::adopt(maps.clone());
    assert!(
        restarted.sync(&want, &mut maps).unwrap().is_empty(),
        "no flush, no rewrite"
    );
}

#[test]
fn a_failed_write_is_resumed_by_the_next_sync() {
    let start = desired(&[("web", "10.96.0.1", &[A, B])]);
    let want = desired(&[("web", "10.96.0.1", &[C, D]), ("api", "10.96.0.2", &[A])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new(MapContents::default());
    programmer.sync(&start, &mut writer).unwrap();
    writer.fail_at = Some(writer.ops + 3);
    assert!(programmer.sync(&want, &mut writer).is_err());
    assert_eq!(
        writer.maps,
        *programmer.programmed(),
        "the mirror holds exactly what was written"
    );
    writer.fail_at = None;
    programmer.sync(&want, &mut writer).unwrap();
    assert_eq!(writer.maps, programmer.target(&want));
}
