//! Map capacities are chosen at load, frontends that find no room in the slots array are left
//! out without failing the sync, and a restart asking for other capacities gives the pinned maps
//! the new sizes with their content (flows included), or keeps a size that would lose entries and
//! says so. Needs root (BPF maps).

mod support;

use aya::maps::MapInfo;
use lb_common::{
    conntrack::{CtEntry, FlowKey},
    maps::{CONNTRACK_MAP, Capacities, SLOTS_MAP, SLOTS_PER_ELEMENT},
};
use lb_userspace::{
    loader::Dataplane,
    manifest, resize,
    sync::{Programmer, Settings},
    translate::{NodeContext, translate},
};
use support::{PinDir, privileged};

/// `n` (up to 12,500) ClusterIP Services of two backends each (251-slot tables, none shared).
fn services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: t}}\n\
                 spec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-1\n  namespace: t\n  \
                 labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{port: 8080}}]\n\
                 endpoints: [{{addresses: [10.{a}.{b}.1]}}, {{addresses: [10.{a}.{b}.2]}}]\n---\n",
                1 + i / 250,
                i % 250,
                a = 200 + i / 250,
                b = i % 250,
            )
        })
        .collect()
}

/// A programmer that has programmed nothing yet, placing tables in maps of `capacities`.
fn empty_programmer(capacities: Capacities) -> Programmer {
    Programmer::adopt(
        Default::default(),
        Settings {
            capacities,
            ..Settings::default()
        },
    )
}

/// Capacities small enough to fill in a test.
const SMALL: Capacities = Capacities {
    frontends: 64,
    backends: 128,
    slots: 2048,
    conntrack: 512,
    conntrack6: 256,
    affinity: 64,
};

#[test]
fn capacities_are_set_at_load_and_a_restart_resizes_without_losing_entries() {
    if !privileged("capacities_are_set_at_load_and_a_restart_resizes_without_losing_entries") {
        return;
    }
    let pins = PinDir::new("capacity");
    let small = SMALL;
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
    let mut programmer = empty_programmer(dataplane.capacities);
    let (_, unplaced) = programmer
        .sync(&desired, &mut dataplane.maps)
        .expect("a sync that runs out of slots still succeeds");
    assert_eq!(unplaced.len(), 2, "{unplaced:?}");
    let programmed = dataplane.maps.read_contents().expect("read");
    assert_eq!(programmed.services.len(), 8);

    // Two flows' entries, to follow through the resize.
    let flow = |port: u16| {
        let client = u32::from_be_bytes([10, 244, 0, 9]).to_be();
        let service = u32::from_be_bytes([10, 96, 1, 0]).to_be();
        FlowKey::new(client, service, port.to_be(), 80u16.to_be(), 6)
    };
    let entry = CtEntry {
        service_id: 1,
        backend_id: 1,
        expires_s: u32::MAX,
        ..CtEntry::ZERO
    };
    for port in [40000, 40001] {
        dataplane
            .maps
            .conntrack
            .insert(flow(port), entry, 0)
            .expect("conntrack entry");
    }
    drop(dataplane);

    // A restart asking for more creates those maps anew and carries everything over.
    let mut larger = small;
    larger.slots = 4096;
    larger.conntrack = 1024;
    let mut dataplane = Dataplane::load_sized(&pins.0, false, larger).expect("reload");
    assert_eq!(dataplane.capacities, larger, "the new capacities apply");
    assert!(
        dataplane.capacity_notes.is_empty(),
        "{:?}",
        dataplane.capacity_notes
    );
    assert_eq!(
        dataplane.resized,
        [
            (SLOTS_MAP, small.slots, 4096),
            (CONNTRACK_MAP, small.conntrack, 1024)
        ]
    );
    let pin_dir = dataplane.pin_dir().to_owned();
    let carried = resize::carry_over(&pin_dir, &mut dataplane.maps, false)
        .expect("first pass")
        .expect("a resize under way");
    assert_eq!((carried.slots, carried.conntrack), (8 * 251, 2));
    assert_eq!(
        dataplane.maps.read_contents().expect("read"),
        programmed,
        "frontends, backends and every table slot as they were"
    );
    // An entry the old programs make between the passes is carried over by the second.
    let old_conntrack = pin_dir.join(resize::RESIZING_DIR).join(CONNTRACK_MAP);
    let mut old: aya::maps::HashMap<_, FlowKey, CtEntry> =
        aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&old_conntrack).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    old.insert(flow(40002), entry, 0).unwrap();
    let carried = resize::carry_over(&pin_dir, &mut dataplane.maps, true)
        .expect("final pass")
        .expect("a resize under way");
    assert_eq!(carried.conntrack, 1, "only the entry made meanwhile");
    for port in [40000, 40001, 40002] {
        assert_eq!(
            dataplane.maps.conntrack.get(&flow(port), 0).ok(),
            Some(entry)
        );
    }
    assert!(
        !pin_dir.join(resize::RESIZING_DIR).exists(),
        "old maps unpinned"
    );
    for (name, entries) in larger.max_entries() {
        let info = MapInfo::from_pin(pin_dir.join(name)).expect("pinned");
        assert_eq!(info.max_entries(), entries, "{name}");
    }
    drop(dataplane);

    // Shrinking below what a map holds would lose entries: it keeps its size and says so.
    // Shrinking a map whose content fits is done.
    // The frontends map shrinks too, and is moved aside first: the slots array's check reads
    // the frontends from there.
    let mut smaller = larger;
    smaller.frontends = 32;
    smaller.slots = 1024;
    smaller.conntrack = 256;
    let mut dataplane = Dataplane::load_sized(&pins.0, false, smaller).expect("reload");
    assert_eq!(dataplane.capacities.frontends, 32);
    assert_eq!(
        dataplane.capacities.slots, 4096,
        "the slots array keeps its size"
    );
    assert_eq!(dataplane.capacities.conntrack, 256);
    assert_eq!(
        dataplane.capacity_notes.len(),
        1,
        "{:?}",
        dataplane.capacity_notes
    );
    assert!(
        dataplane.capacity_notes[0].contains(&format!(
            "{SLOTS_MAP} keeps its pinned capacity of 4096 (not the 1024 asked for): it holds \
             2008 slots up to the end of its last table; shrinking would drop 984 of them"
        )),
        "{:?}",
        dataplane.capacity_notes
    );
    let slots = MapInfo::from_pin(dataplane.pin_dir().join(SLOTS_MAP)).expect("pinned");
    assert_eq!(slots.max_entries(), 4096 / SLOTS_PER_ELEMENT);
    resize::carry_over(&pin_dir, &mut dataplane.maps, false).expect("first pass");
    resize::carry_over(&pin_dir, &mut dataplane.maps, true).expect("final pass");
    assert_eq!(
        dataplane.maps.read_contents().expect("read"),
        programmed,
        "everything kept through the shrink"
    );
}

/// The agent maps a bounded window of the slots array, not all of it (mapping a BPF array
/// faults in every page), and what it writes through the windows is what the kernel holds.
#[test]
fn the_slots_array_is_written_through_a_bounded_window() {
    if !privileged("the_slots_array_is_written_through_a_bounded_window") {
        return;
    }
    let pins = PinDir::new("slot-window");
    // 16 MiB of slots; 1,200 tables of 251 slots span more than one 1 MiB window.
    let capacities = Capacities {
        frontends: 4096,
        backends: 4096,
        slots: 1 << 22,
        ..Capacities::DEFAULT
    };
    let mut dataplane = Dataplane::load_sized(&pins.0, false, capacities).expect("load");
    let read = manifest::parse(&services(1200), "test");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let desired = translate(&read.objects, &NodeContext::default());
    let mut programmer = empty_programmer(capacities);
    let (_, unplaced) = programmer
        .sync(&desired, &mut dataplane.maps)
        .expect("sync");
    assert!(unplaced.is_empty(), "{unplaced:?}");

    let mapped: Vec<u64> = std::fs::read_to_string("/proc/self/smaps")
        .unwrap()
        .split("\n")
        .scan(false, |in_bpf_map, line| {
            if !line.starts_with(|c: char| c.is_ascii_uppercase()) {
                *in_bpf_map = line.ends_with("anon_inode:bpf-map");
            }
            Some((*in_bpf_map, line.strip_prefix("Rss:").map(str::to_owned)))
        })
        .filter_map(|(in_bpf_map, rss)| rss.filter(|_| in_bpf_map))
        .map(|rss| rss.trim().trim_end_matches("kB").trim().parse().unwrap())
        .collect();
    assert!(!mapped.is_empty(), "the slots array is mapped");
    assert!(
        mapped.iter().all(|&kib| kib <= 1024),
        "resident mappings of BPF maps, KiB: {mapped:?}"
    );

    // Through the bpf() syscall, every table reads as the agent wrote it.
    let contents = dataplane.maps.read_contents().expect("read");
    let highest = contents
        .tables
        .keys()
        .map(|r| r.offset + r.size)
        .max()
        .unwrap();
    assert!(
        highest > 1 << 18,
        "the tables span windows (up to slot {highest})"
    );
    let slots: aya::maps::Array<_, [u32; SLOTS_PER_ELEMENT as usize]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(dataplane.pin_dir().join(SLOTS_MAP)).expect("pinned"),
        ))
        .expect("an array of slot pairs");
    let slot = |index: u32| {
        slots.get(&(index / SLOTS_PER_ELEMENT), 0).expect("read")
            [(index % SLOTS_PER_ELEMENT) as usize]
    };
    assert_eq!(contents.tables.len(), 1200);
    for (range, table) in &contents.tables {
        let kernel: Vec<u32> = (range.offset..range.offset + range.size)
            .map(slot)
            .collect();
        assert_eq!(kernel, table.iter().collect::<Vec<_>>(), "{range:?}");
        assert!(
            table.iter().all(|id| contents.backends.contains_key(&id)),
            "{range:?} names only programmed backends"
        );
    }
}

/// A counters map pinned by an lb that counted fewer things (13 slots, before source ranges)
/// is replaced by one with room for every counter, its counts carried over: the counters an
/// operator or Prometheus reads keep growing across the upgrade.
#[test]
fn an_older_counters_map_is_replaced_keeping_its_counts() {
    use lb_common::{
        counters::{COUNTER_SLOTS, Counter},
        maps::{COUNTERS_MAP, PIN_LAYOUT_VERSION},
    };
    use lb_userspace::bpf_sys::{BPF_MAP_CREATE, BPF_OBJ_PIN, CreateMapAttr, PinAttr, bpf};
    if !privileged("an_older_counters_map_is_replaced_keeping_its_counts") {
        return;
    }
    let pins = PinDir::new("old-counters");
    let pin_dir = pins.0.join(PIN_LAYOUT_VERSION);
    std::fs::create_dir_all(&pin_dir).unwrap();
    let old_pin = pin_dir.join(COUNTERS_MAP);

    // BPF_MAP_CREATE of a 13-slot per-CPU array, then BPF_OBJ_PIN: what the older lb left.
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let mut create = CreateMapAttr {
        map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 13,
        ..CreateMapAttr::default()
    };
    // SAFETY: a BPF_MAP_CREATE attribute without pointers.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut create) };
    assert!(fd >= 0, "create: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(old_pin.to_str().unwrap()).unwrap();
    let mut pin = PinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: `pathname` points at a live NUL-terminated path for the call.
    let pinned = unsafe { bpf(BPF_OBJ_PIN, &mut pin) };
    assert!(pinned == 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: closing the fd this test created; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    {
        let data = aya::maps::MapData::from_pin(&old_pin).unwrap();
        let mut old: aya::maps::PerCpuArray<_, u64> =
            aya::maps::Map::PerCpuArray(data).try_into().unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        let mut counts = vec![0u64; cpus];
        counts[0] = 5;
        old.set(Counter::Translated as u32, counts.try_into().unwrap(), 0)
            .unwrap();
    }
    let before = lb_userspace::loader::pinned_counters(&pins.0).expect("an older map reads");
    assert_eq!(before[&Counter::Translated], 5);
    assert_eq!(before[&Counter::DroppedSourceRange], 0, "not counted then");

    let small = SMALL;
    let mut dataplane = Dataplane::load_sized(&pins.0, false, small).expect("load");
    assert!(
        dataplane
            .resized
            .contains(&(COUNTERS_MAP, 13, COUNTER_SLOTS)),
        "{:?}",
        dataplane.resized
    );
    let info = MapInfo::from_pin(&old_pin).expect("the new map is pinned");
    assert_eq!(info.max_entries(), COUNTER_SLOTS);
    resize::carry_over(&pin_dir, &mut dataplane.maps, false).expect("first pass");
    let carried = resize::carry_over(&pin_dir, &mut dataplane.maps, true)
        .expect("final pass")
        .expect("a resize was under way");
    assert_eq!(carried.counters, 13);
    let after = dataplane.maps.read_counters().expect("counters");
    assert_eq!(after[&Counter::Translated], 5, "carried over");
    assert!(!pin_dir.join(resize::RESIZING_DIR).exists());
}

/// Least privilege: the pin directory and every object pinned in it (maps, links) belong to
/// root and nobody else may open them.
#[test]
fn pinned_objects_are_root_only() {
    use std::os::unix::fs::MetadataExt as _;
    if !privileged("pinned_objects_are_root_only") {
        return;
    }
    let pins = PinDir::new("modes");
    let dataplane = Dataplane::load(&pins.0, false).expect("load");
    let mut checked = 0;
    let mut pending = vec![dataplane.pin_dir().to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.uid(), 0, "{} is root's", path.display());
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "{} is root-only (mode {:o})",
            path.display(),
            meta.mode() & 0o777
        );
        checked += 1;
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(
        checked >= 9,
        "the maps and the links directory were checked: {checked}"
    );
}

/// A full conntrack shows: flows past its capacity make the LRU evict live entries, and the
/// sweep counts the halves left behind (`lb_conntrack_orphaned_entries`). The per-Service
/// counter maps follow the frontends' and backends' capacities, and are replaced when those
/// change.
#[test]
fn a_full_conntrack_shows_as_orphans_and_counter_maps_follow_the_capacities() {
    use aya::programs::{TestRun as _, TestRunOptions};
    use etherparse::PacketBuilder;
    use lb_common::maps::{BACKEND_STATS_MAP, SERVICE_STATS_MAP};
    if !privileged("a_full_conntrack_shows_as_orphans_and_counter_maps_follow_the_capacities") {
        return;
    }
    let pins = PinDir::new("orphans");
    let mut dataplane = Dataplane::load_sized(&pins.0, false, SMALL).expect("load");
    for (name, entries) in [
        (SERVICE_STATS_MAP, SMALL.frontends),
        (BACKEND_STATS_MAP, SMALL.backends),
    ] {
        let info = MapInfo::from_pin(dataplane.pin_dir().join(name)).expect("pinned");
        assert_eq!(info.max_entries(), entries, "{name}");
    }
    let read = manifest::parse(&services(1), "test");
    let desired = translate(&read.objects, &NodeContext::default());
    let mut programmer = empty_programmer(dataplane.capacities);
    programmer
        .sync(&desired, &mut dataplane.maps)
        .expect("sync");
    let pins_dir = dataplane.pin_dir().to_owned();
    let mut send = |sport: u16| {
        let mut packet = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 244, 0, 9], [10, 96, 1, 0], 64)
            .tcp(20000 + sport, 80, 1, 64240)
            .syn()
            .write(&mut packet, &[])
            .unwrap();
        let mut out = vec![0u8; packet.len() + 64];
        dataplane
            .pod_ingress()
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
    };
    // Fill the conntrack (two entries a flow); then the clients keep sending on those flows
    // while their backends are quiet, so the LRU sees the forward entries used and the reply
    // entries not; then as many new flows again: the LRU evicts the idle halves.
    let half = SMALL.conntrack as u16 / 2;
    for sport in 0..half {
        send(sport);
    }
    for sport in 0..half {
        send(sport);
    }
    for sport in half..2 * half {
        send(sport);
    }
    let map = aya::maps::MapData::from_pin(pins_dir.join(CONNTRACK_MAP)).unwrap();
    let sweep = lb_userspace::conntrack::sweep::<u32>(&map).expect("sweep");
    assert!(sweep.entries <= SMALL.conntrack as usize, "{sweep:?}");
    assert!(
        sweep.orphans > 0,
        "the LRU evicted halves of live flows: {sweep:?}"
    );
    drop(dataplane);

    // More frontends: the counter map is created anew at the new size.
    let mut larger = SMALL;
    larger.frontends = 128;
    let dataplane = Dataplane::load_sized(&pins.0, false, larger).expect("reload");
    assert_eq!(
        dataplane.counters_reset,
        [(SERVICE_STATS_MAP, SMALL.frontends, 128)],
        "only the frontends' counters follow"
    );
    let info = MapInfo::from_pin(dataplane.pin_dir().join(SERVICE_STATS_MAP)).expect("pinned");
    assert_eq!(info.max_entries(), 128);
}
