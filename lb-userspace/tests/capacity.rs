//! Map capacities are chosen at load, frontends that find no room in the slots array are left
//! out without failing the sync, and a restart asking for other capacities keeps the pinned maps
//! (and their flows) and says so. Needs root (BPF maps).

mod support;

use aya::maps::MapInfo;
use lb_common::maps::{Capacities, SLOTS_MAP, SLOTS_PER_ELEMENT};
use lb_userspace::{
    loader::Dataplane,
    manifest,
    sync::{Programmer, Settings},
    translate::{NodeContext, translate},
};
use support::{PinDir, privileged};

/// `n` ClusterIP Services of two backends each (251-slot tables, none shared).
fn services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: t}}\n\
                 spec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-1\n  namespace: t\n  \
                 labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{port: 8080}}]\n\
                 endpoints: [{{addresses: [10.244.{i}.1]}}, {{addresses: [10.244.{i}.2]}}]\n---\n"
            )
        })
        .collect()
}

#[test]
fn capacities_are_set_at_load_and_kept_by_a_restart() {
    if !privileged("capacities_are_set_at_load_and_kept_by_a_restart") {
        return;
    }
    let pins = PinDir::new("capacity");
    let small = Capacities {
        frontends: 64,
        backends: 128,
        slots: 2048,
        conntrack: 512,
        affinity: 64,
    };
    let mut dataplane = Dataplane::load_sized(&pins.0, false, small).expect("load");
    assert_eq!(dataplane.capacities, small);
    assert!(dataplane.capacity_notes.is_empty());
    for (name, entries) in small.max_entries() {
        let info = MapInfo::from_pin(dataplane.pin_dir().join(name)).expect("pinned");
        assert_eq!(info.max_entries(), entries, "{name}");
    }

    // Ten tables of 251 slots, room for eight: two frontends are left out, the sync succeeds.
    let read = manifest::parse(&services(10), "test");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let desired = translate(&read.objects, &NodeContext::default());
    let mut programmer = Programmer::adopt(
        Default::default(),
        Settings {
            capacities: dataplane.capacities,
            ..Settings::default()
        },
    );
    let (_, unplaced) = programmer
        .sync(&desired, &mut dataplane.maps)
        .expect("a sync that runs out of slots still succeeds");
    assert_eq!(unplaced.len(), 2, "{unplaced:?}");
    let programmed = dataplane.maps.read_contents().expect("read");
    assert_eq!(programmed.services.len(), 8);
    drop(dataplane);

    // A restart asking for more keeps what is pinned, programmed state included, and says so.
    let mut larger = small;
    larger.slots = 4096;
    larger.conntrack = 1024;
    let dataplane = Dataplane::load_sized(&pins.0, false, larger).expect("reload");
    assert_eq!(
        dataplane.capacities, small,
        "the pinned capacities are kept"
    );
    assert_eq!(
        dataplane.capacity_notes.len(),
        2,
        "{:?}",
        dataplane.capacity_notes
    );
    assert!(
        dataplane.capacity_notes[0].contains(&format!(
            "{SLOTS_MAP} is pinned with room for {} entries; 4096 were asked for",
            small.slots
        )),
        "{:?}",
        dataplane.capacity_notes
    );
    let slots = MapInfo::from_pin(dataplane.pin_dir().join(SLOTS_MAP)).expect("pinned");
    assert_eq!(slots.max_entries(), small.slots / SLOTS_PER_ELEMENT);
    assert_eq!(
        dataplane.maps.read_contents().expect("read").services.len(),
        8,
        "adopted as programmed"
    );
}
