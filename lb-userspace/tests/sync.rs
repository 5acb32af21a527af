//! The diff-and-write logic against the in-memory maps: stable ids, only changed slots written,
//! and a write order under which the packet path never sees a half-written service. No root.

use std::collections::BTreeSet;

use lb_common::{
    maglev,
    maps::Capacities,
    service::{ANY_SOURCE, BackendId, NO_BACKEND, NodeConfig, NodeConfig6, ServiceEntry},
};
use lb_userspace::{
    dataplane::{BackendValue, FrontendKey, MapContents, MapWriter, TableRange, WriteError},
    manifest,
    model::SourceRanges,
    sync::{Programmer, Settings, SyncStats, service_key},
    translate::{Desired, NodeContext, Touched, translate},
};

/// Small tables keep the write counts readable (509 holds up to 5 backends at 100 slots each).
const TABLE: u32 = 509;

fn desired_sized(services: &[(&str, &str, &[&str])], table: u32) -> Desired {
    let mut yaml = String::new();
    for (name, vip, pods) in services {
        let endpoints: String = pods
            .iter()
            .map(|p| format!("  - addresses: [\"{p}\"]\n"))
            .collect();
        yaml += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, annotations: {{lb.rs/maglev-table-size: \"{table}\"}}}}\n\
             spec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}---\n"
        );
    }
    let read = manifest::parse(&yaml, "test");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    translate(&read.objects, &NodeContext::default())
}

fn desired(services: &[(&str, &str, &[&str])]) -> Desired {
    desired_sized(services, TABLE)
}

/// The maps as the packet path can reach them: tables no service points at are left out (a
/// writer never deletes them; the programmer forgets them).
fn reachable(maps: &MapContents) -> MapContents {
    let mut out = maps.clone();
    let used: BTreeSet<TableRange> = maps
        .services
        .values()
        .map(|e| TableRange {
            offset: e.table_offset,
            size: e.table_size,
        })
        .collect();
    out.tables.retain(|r, _| used.contains(r));
    out
}

/// What the packet path can rely on at any instant: every slot of every service's table holds
/// a backend that exists, and every source-range set an entry names is there.
fn assert_consistent(maps: &MapContents, after: &str) {
    for (key, entry) in &maps.services {
        assert!(
            entry.source_ranges_id == ANY_SOURCE
                || maps.source_ranges.contains_key(&entry.source_ranges_id),
            "after {after}: {key:?} names source-range set {} that is not written",
            entry.source_ranges_id
        );
        for index in 0..entry.table_size {
            let backend = maps
                .slot(entry, index)
                .unwrap_or_else(|| panic!("after {after}: {key:?} slot {index} empty"));
            assert!(
                maps.backends.contains_key(&backend),
                "after {after}: {key:?} slot {index} -> missing backend {backend}"
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
    fn new() -> Self {
        Self {
            maps: MapContents::default(),
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
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.step("put_node", |m| m.node = config)
    }
    fn put_node6(&mut self, config: NodeConfig6) -> Result<(), WriteError> {
        self.step("put_node6", |m| m.node6 = config)
    }
    fn put_backend(&mut self, id: BackendId, backend: BackendValue) -> Result<(), WriteError> {
        self.step("put_backend", |m| {
            m.backends.insert(id, backend);
        })
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.step("delete_backend", |m| {
            m.backends.remove(&id);
        })
    }
    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError> {
        // One slot at a time, as the packet path may read between any two.
        for &change in changes {
            self.step("put_slot", |m| {
                m.put_slots(range, &[change]).unwrap();
            })?;
        }
        Ok(())
    }
    fn put_service(&mut self, key: FrontendKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.step("put_service", |m| {
            m.services.insert(key, entry);
        })
    }
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), WriteError> {
        self.step("delete_service", |m| {
            m.services.remove(&key);
        })
    }
    fn put_source_ranges(&mut self, id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        self.step("put_source_ranges", |m| {
            m.source_ranges.insert(id, ranges.clone());
        })
    }
    fn delete_source_ranges(&mut self, id: u32, _: &SourceRanges) -> Result<(), WriteError> {
        self.step("delete_source_ranges", |m| {
            m.source_ranges.remove(&id);
        })
    }
}

const A: &str = "10.244.1.1";
const B: &str = "10.244.1.2";
const C: &str = "10.244.1.3";
const D: &str = "10.244.1.4";

fn sync(programmer: &mut Programmer, want: &Desired, writer: &mut dyn MapWriter) -> SyncStats {
    let (stats, unplaced) = programmer.sync(want, writer).expect("sync");
    assert!(unplaced.is_empty(), "{unplaced:?}");
    stats
}

#[test]
fn first_sync_writes_everything_second_writes_nothing() {
    let want = desired(&[("web", "10.96.0.1", &[A, B]), ("api", "10.96.0.2", &[B, C])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new();
    let stats = sync(&mut programmer, &want, &mut writer);
    // 3 backends (B shared), two full tables, 2 services.
    assert_eq!(
        stats,
        SyncStats {
            writes: 3 + 2 * TABLE as usize + 2,
            deletes: 0
        }
    );
    assert_eq!(writer.maps, *programmer.programmed());
    assert_eq!(writer.maps, programmer.target(&want).contents);
    assert!(sync(&mut programmer, &want, &mut writer).is_empty());
}

#[test]
fn frontends_with_the_same_backends_share_one_table() {
    let want = desired(&[("web", "10.96.0.1", &[A, B]), ("www", "10.96.0.2", &[B, A])]);
    let target = Programmer::default().target(&want).contents;
    assert_eq!(target.tables.len(), 1, "{:?}", target.services);
}

#[test]
fn every_intermediate_state_is_consistent_through_grow_shrink_resize_and_delete() {
    let steps = [
        desired(&[("web", "10.96.0.1", &[A, B]), ("api", "10.96.0.2", &[C])]),
        desired(&[
            ("web", "10.96.0.1", &[A, B, C, D]),
            ("api", "10.96.0.2", &[C]),
        ]),
        desired(&[("web", "10.96.0.1", &[D]), ("api", "10.96.0.2", &[A, C])]),
        // A new table size moves the table to a new range.
        desired_sized(
            &[("web", "10.96.0.1", &[D]), ("api", "10.96.0.2", &[A, C])],
            1021,
        ),
        desired(&[("web", "10.96.0.1", &[]), ("new", "10.96.0.3", &[B])]),
        desired(&[]),
    ];
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new();
    for want in &steps {
        sync(&mut programmer, want, &mut writer);
        assert_eq!(reachable(&writer.maps), programmer.target(want).contents);
    }
    assert_eq!(
        reachable(&writer.maps),
        MapContents::default(),
        "everything removed at the end"
    );
}

#[test]
fn removing_a_backend_writes_only_the_slots_that_change_and_keeps_ids() {
    let before = desired(&[("web", "10.96.0.1", &[A, B, C]), ("api", "10.96.0.2", &[A])]);
    let after = desired(&[("web", "10.96.0.1", &[A, C]), ("api", "10.96.0.2", &[A])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new();
    sync(&mut programmer, &before, &mut writer);
    let old = writer.maps.clone();
    let stats = sync(&mut programmer, &after, &mut writer);

    // Exactly the slots whose Maglev owner differs are rewritten, in place; B goes last.
    let key = |ip: &str| {
        maglev::backend_key(
            ip.parse::<std::net::Ipv4Addr>()
                .map(|a| lb_common::addr_be(a.octets()))
                .unwrap(),
            8080u16.to_be(),
        )
    };
    let owners = |ips: &[&str]| {
        let keys: Vec<u64> = ips.iter().map(|ip| key(ip)).collect();
        maglev::build(&keys, TABLE)
            .into_iter()
            .map(|i| keys[i as usize])
            .collect::<Vec<_>>()
    };
    let changed = owners(&[A, B, C])
        .iter()
        .zip(owners(&[A, C]))
        .filter(|(a, b)| **a != *b)
        .count();
    assert!(changed < TABLE as usize / 2, "{changed}");
    assert_eq!(
        stats,
        SyncStats {
            writes: changed,
            deletes: 1
        }
    );
    assert_eq!(
        old.services, writer.maps.services,
        "entries (ids, ranges) are stable"
    );
    for (id, backend) in &writer.maps.backends {
        assert_eq!(
            old.backends.get(id),
            Some(backend),
            "backend ids are stable"
        );
    }
}

#[test]
fn a_freed_range_is_not_reused_by_the_very_next_sync() {
    let mut programmer = Programmer::default();
    let mut maps = MapContents::default();
    sync(
        &mut programmer,
        &desired(&[("web", "10.96.0.1", &[A])]),
        &mut maps,
    );
    let first = maps.services.values().next().unwrap().table_offset;
    // web goes away and api appears in the same sync: api must not land on web's old slots,
    // which a packet may still be reading through web's old entry.
    sync(
        &mut programmer,
        &desired(&[("api", "10.96.0.2", &[B])]),
        &mut maps,
    );
    let second = maps.services.values().next().unwrap().table_offset;
    assert_ne!(first, second);
}

#[test]
fn adopting_programmed_maps_makes_the_same_desired_state_a_no_op() {
    let want = desired(&[("web", "10.96.0.1", &[A, B])]);
    let mut first = Programmer::default();
    let mut maps = MapContents::default();
    sync(&mut first, &want, &mut maps);
    // A restarted agent reads the pinned maps back and adopts them.
    let mut restarted = Programmer::adopt(maps.clone(), Settings::default());
    assert!(
        sync(&mut restarted, &want, &mut maps).is_empty(),
        "no flush, no rewrite"
    );
}

#[test]
fn a_failed_write_is_resumed_by_the_next_sync() {
    let start = desired(&[("web", "10.96.0.1", &[A, B])]);
    let want = desired(&[("web", "10.96.0.1", &[C, D]), ("api", "10.96.0.2", &[A])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new();
    sync(&mut programmer, &start, &mut writer);
    writer.fail_at = Some(writer.ops + 40);
    assert!(programmer.sync(&want, &mut writer).is_err());
    assert_eq!(
        reachable(&writer.maps),
        reachable(programmer.programmed()),
        "the mirror holds exactly what was written"
    );
    writer.fail_at = None;
    sync(&mut programmer, &want, &mut writer);
    assert_eq!(reachable(&writer.maps), programmer.target(&want).contents);
    assert!(
        writer
            .maps
            .tables
            .values()
            .flat_map(|t| t.iter())
            .all(|id| id != NO_BACKEND),
        "no table was left half-written"
    );
}

#[test]
fn no_endpoints_are_rejected_unless_the_agent_is_told_to_drop() {
    let want = desired(&[("empty", "10.96.0.9", &[])]);
    let flags = |reject_no_endpoints| {
        let programmer = Programmer::adopt(
            MapContents::default(),
            Settings {
                reject_no_endpoints,
                ..Settings::default()
            },
        );
        let target = programmer.target(&want).contents;
        let entry = target
            .services
            .values()
            .next()
            .expect("the frontend is programmed");
        assert_eq!(entry.table_size, 0);
        entry.flags
    };
    assert_eq!(
        flags(true) & lb_common::service::SERVICE_F_REJECT,
        lb_common::service::SERVICE_F_REJECT
    );
    assert_eq!(
        flags(false) & lb_common::service::SERVICE_F_REJECT,
        0,
        "--no-endpoints drop"
    );
}

/// A deterministic pseudo-random sequence (xorshift), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Incremental syncs (after the first) must leave exactly what a full computation from scratch
/// wants, through random adds, changes, resizes and removals of Services and their backends.
/// (Consistency after every single write is checked by the tests above.)
#[test]
fn incremental_syncs_match_full_ones_through_random_changes() {
    const PODS: [&str; 8] = [
        "10.244.1.1",
        "10.244.1.2",
        "10.244.1.3",
        "10.244.1.4",
        "10.244.2.1",
        "10.244.2.2",
        "10.244.2.3",
        "10.244.2.4",
    ];
    const TERMINATING_PODS: [&str; 8] = [
        "10.244.1.1 terminating",
        "10.244.1.2 terminating",
        "10.244.1.3 terminating",
        "10.244.1.4 terminating",
        "10.244.2.1 terminating",
        "10.244.2.2 terminating",
        "10.244.2.3 terminating",
        "10.244.2.4 terminating",
    ];
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut programmer = Programmer::default();
    let mut writer = MapContents::default();
    // Service i: present?, its backends, its table size.
    let mut services: Vec<(bool, Vec<&str>, u32)> = vec![(false, Vec::new(), TABLE); 12];
    let mut previous = Desired::default();
    for round in 0..60 {
        for _ in 0..=rng.below(3) {
            let i = rng.below(services.len() as u64) as usize;
            let service = &mut services[i];
            match rng.below(5) {
                0 => service.0 = !service.0,
                1 => service.2 = if service.2 == TABLE { 1021 } else { TABLE },
                2 => {
                    // One endpoint starts terminating (or comes back): it drains.
                    if !service.1.is_empty() {
                        let j = rng.below(service.1.len() as u64) as usize;
                        let pod = service.1[j];
                        service.1[j] = match pod.strip_suffix(TERMINATING) {
                            Some(ip) => PODS.iter().copied().find(|p| *p == ip).unwrap(),
                            None => TERMINATING_PODS[PODS.iter().position(|p| *p == pod).unwrap()],
                        };
                    }
                }
                _ => {
                    service.1 = PODS
                        .iter()
                        .copied()
                        .filter(|_| rng.below(3) == 0)
                        .take(4)
                        .collect();
                }
            }
        }
        let names: Vec<(String, String)> = (0..services.len())
            .map(|i| (format!("svc-{i}"), format!("10.96.3.{i}")))
            .collect();
        let mut yaml_services: Vec<(&str, &str, &[&str], u32)> = Vec::new();
        for (i, (present, pods, size)) in services.iter().enumerate() {
            if *present {
                yaml_services.push((&names[i].0, &names[i].1, pods, *size));
            }
        }
        let want = desired_mixed(&yaml_services);
        // Every other round, as the pipeline does: told which frontends changed (with one that
        // did not, as a translator may), so only those are looked at.
        let touched: Touched = (want.frontends.iter())
            .filter(|(f, plan)| previous.frontends.get(f) != Some(plan))
            .map(|(f, _)| *f)
            .chain(
                (previous.frontends.keys())
                    .filter(|f| !want.frontends.contains_key(f))
                    .copied(),
            )
            .chain(want.frontends.keys().next().copied())
            .collect();
        let told = (round % 2 == 1).then_some(&touched);
        let (_, unplaced) = programmer
            .sync_touched(&want, told, &mut writer)
            .expect("sync");
        previous = want.clone();
        assert!(unplaced.is_empty());
        assert_consistent(&writer, &format!("round {round}"));
        assert_eq!(
            reachable(&writer),
            programmer.target(&want).contents,
            "round {round}: the maps hold what a full sync would write"
        );
        assert_eq!(
            reachable(&writer),
            reachable(programmer.programmed()),
            "round {round}: the mirror is exact"
        );
    }
}

/// A pod written `"<ip> terminating"` is listed as terminating (and not ready).
const TERMINATING: &str = " terminating";

/// Like [`desired_sized`] with a table size per Service.
fn desired_mixed(services: &[(&str, &str, &[&str], u32)]) -> Desired {
    let mut objects = Vec::new();
    for (name, vip, pods, size) in services {
        let mut yaml = String::new();
        let endpoints: String = pods
            .iter()
            .map(|p| match p.strip_suffix(TERMINATING) {
                Some(ip) => format!(
                    "  - addresses: [\"{ip}\"]\n    conditions: {{ready: false, serving: true, terminating: true}}\n"
                ),
                None => format!("  - addresses: [\"{p}\"]\n"),
            })
            .collect();
        yaml += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, annotations: {{lb.rs/maglev-table-size: \"{size}\"}}}}\n\
             spec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
        );
        objects.extend(manifest::parse(&yaml, "test").objects);
    }
    translate(&objects, &NodeContext::default())
}

/// A backend that stops being chosen while still listed keeps its id (so its TCP flows keep
/// it), marked draining, and is deleted only when it leaves the slice.
#[test]
fn a_terminating_backend_drains_under_its_id_until_it_leaves() {
    let ready = desired_mixed(&[("web", "10.96.0.1", &["10.244.1.1", "10.244.1.2"], TABLE)]);
    let terminating = desired_mixed(&[(
        "web",
        "10.96.0.1",
        &["10.244.1.1", "10.244.1.2 terminating"],
        TABLE,
    )]);
    let gone = desired_mixed(&[("web", "10.96.0.1", &["10.244.1.1"], TABLE)]);
    let mut programmer = Programmer::default();
    let mut maps = MapContents::default();
    let id_of = |maps: &MapContents, addr: [u8; 4]| {
        maps.backends
            .iter()
            .find(|(_, b)| b.addr_be == lb_common::Address::to_wide(lb_common::addr_be(addr)))
            .map(|(id, b)| (*id, b.flags & lb_common::service::BACKEND_F_DRAINING != 0))
    };
    sync(&mut programmer, &ready, &mut maps);
    let (id, draining) = id_of(&maps, [10, 244, 1, 2]).expect("programmed");
    assert!(!draining);
    sync(&mut programmer, &terminating, &mut maps);
    assert_eq!(
        id_of(&maps, [10, 244, 1, 2]),
        Some((id, true)),
        "same id, draining"
    );
    let entry = maps.services.values().next().unwrap();
    assert!(
        (0..entry.table_size).all(|i| maps.slot(entry, i) != Some(id)),
        "no slot names a draining backend"
    );
    sync(&mut programmer, &ready, &mut maps);
    assert_eq!(
        id_of(&maps, [10, 244, 1, 2]),
        Some((id, false)),
        "ready again, same id"
    );
    sync(&mut programmer, &terminating, &mut maps);
    sync(&mut programmer, &gone, &mut maps);
    assert_eq!(
        id_of(&maps, [10, 244, 1, 2]),
        None,
        "deleted once it left the slice"
    );
}

#[test]
fn a_table_left_half_written_is_repaired_even_if_the_old_content_comes_back() {
    let first = desired(&[("web", "10.96.0.1", &[A, B])]);
    let second = desired(&[("web", "10.96.0.1", &[C, D])]);
    let mut programmer = Programmer::default();
    let mut writer = CheckingWriter::new();
    sync(&mut programmer, &first, &mut writer);
    // The in-place rewrite to C, D fails half way; then the Service goes back to A, B.
    writer.fail_at = Some(writer.ops + 2 + TABLE as usize / 4);
    assert!(programmer.sync(&second, &mut writer).is_err());
    writer.fail_at = None;
    sync(&mut programmer, &first, &mut writer);
    assert_eq!(reachable(&writer.maps), programmer.target(&first).contents);
    assert_eq!(
        reachable(&writer.maps)
            .tables
            .values()
            .next()
            .unwrap()
            .iter()
            .collect::<BTreeSet<_>>()
            .len(),
        2,
        "only A and B are in the table again"
    );
}

/// Fails like a full BPF hash map (E2BIG) when a new key would exceed its capacity.
struct BoundedWriter {
    maps: MapContents,
    capacities: Capacities,
}

fn map_full(map: &'static str, key: String) -> WriteError {
    WriteError {
        op: "write",
        map,
        key,
        source: Box::new(aya::maps::MapError::KeyNotFound),
    }
}

impl MapWriter for BoundedWriter {
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.maps.put_node(config)
    }
    fn put_node6(&mut self, config: NodeConfig6) -> Result<(), WriteError> {
        self.maps.put_node6(config)
    }
    fn put_backend(&mut self, id: BackendId, backend: BackendValue) -> Result<(), WriteError> {
        if !self.maps.backends.contains_key(&id)
            && self.maps.backends.len() >= self.capacities.backends as usize
        {
            return Err(map_full("backends", id.to_string()));
        }
        self.maps.put_backend(id, backend)
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.maps.delete_backend(id)
    }
    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError> {
        self.maps.put_slots(range, changes)
    }
    fn put_service(&mut self, key: FrontendKey, entry: ServiceEntry) -> Result<(), WriteError> {
        if !self.maps.services.contains_key(&key)
            && self.maps.services.len() >= self.capacities.frontends as usize
        {
            return Err(map_full("services", format!("{key:?}")));
        }
        self.maps.put_service(key, entry)
    }
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), WriteError> {
        self.maps.delete_service(key)
    }
    fn put_source_ranges(&mut self, id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        self.maps.put_source_ranges(id, ranges)
    }
    fn delete_source_ranges(&mut self, id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        self.maps.delete_source_ranges(id, ranges)
    }
}

/// Syncs three times through maps that hold at most `capacities`: `first` Services, then
/// `second` twice. Returns the addresses each sync left unplaced.
fn bounded_syncs(
    capacities: Capacities,
    first: &[(&str, &str, &[&str])],
    second: &[(&str, &str, &[&str])],
) -> Vec<Vec<String>> {
    let mut programmer = Programmer::adopt(
        MapContents::default(),
        Settings {
            capacities,
            ..Settings::default()
        },
    );
    let mut writer = BoundedWriter {
        maps: MapContents::default(),
        capacities,
    };
    let mut unplaced_by_sync = Vec::new();
    for services in [first, second, second] {
        let (_, unplaced) = programmer
            .sync(&desired(services), &mut writer)
            .expect("a full map never fails the sync");
        unplaced_by_sync.push(unplaced.iter().map(|f| f.addr.to_string()).collect());
        assert_eq!(
            reachable(&writer.maps),
            reachable(programmer.programmed()),
            "the mirror is exact"
        );
    }
    unplaced_by_sync
}

/// A full backends or frontends map leaves the frontends that do not fit unplaced (reported,
/// retried by every sync) instead of failing the sync, in the full and the incremental diff.
/// The entries a sync removes count until they are gone (they are deleted last), so what they
/// free is used by the next sync.
#[test]
fn frontends_that_do_not_fit_the_maps_are_left_out_and_retried_without_failing_the_sync() {
    let s0 = ("s0", "10.96.0.1", &["10.244.0.1", "10.244.0.2"][..]);
    let s1 = ("s1", "10.96.0.2", &["10.244.1.1", "10.244.1.2"][..]);
    let s2 = ("s2", "10.96.0.3", &["10.244.2.1", "10.244.2.2"][..]);
    let s3 = ("s3", "10.96.0.4", &["10.244.0.1"][..]);

    // Five backends: s0 and s1 take four, s2 needs two more; s3 shares one of s0's.
    let backends = Capacities {
        backends: 5,
        ..Capacities::DEFAULT
    };
    assert_eq!(
        bounded_syncs(backends, &[s0, s1, s2, s3], &[s1, s2, s3]),
        [vec!["10.96.0.3"], vec!["10.96.0.3"], vec![]],
        "s2 waits for s0's backend to be deleted"
    );

    // Two frontends: the third waits for the first to be deleted.
    let frontends = Capacities {
        frontends: 2,
        ..Capacities::DEFAULT
    };
    assert_eq!(
        bounded_syncs(frontends, &[s0, s1, s2], &[s1, s2]),
        [vec!["10.96.0.3"], vec!["10.96.0.3"], vec![]],
    );
}

/// Services with several ports (one frontend each, on the ClusterIP), all on the same pods.
fn desired_ports(services: &[(&str, &str, u16)]) -> Desired {
    let mut yaml = String::new();
    for (name, vip, ports) in services {
        let service_ports: Vec<String> = (0..*ports)
            .map(|i| format!("{{name: p{i}, port: {}, targetPort: 8080}}", 80 + i))
            .collect();
        yaml += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: {vip}, ports: [{}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{}]\nendpoints:\n  - addresses: [\"10.244.0.1\"]\n---\n",
            service_ports.join(", "),
            (0..*ports)
                .map(|i| format!("{{name: p{i}, port: 8080}}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let read = manifest::parse(&yaml, "test");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    translate(&read.objects, &NodeContext::default())
}

/// Records which frontends were ever written, over a bounded map.
struct WatchedWriter {
    inner: BoundedWriter,
    written: BTreeSet<FrontendKey>,
}

impl MapWriter for WatchedWriter {
    fn put_node(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.inner.put_node(config)
    }
    fn put_node6(&mut self, config: NodeConfig6) -> Result<(), WriteError> {
        self.inner.put_node6(config)
    }
    fn put_backend(&mut self, id: BackendId, backend: BackendValue) -> Result<(), WriteError> {
        self.inner.put_backend(id, backend)
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.inner.delete_backend(id)
    }
    fn put_slots(
        &mut self,
        range: TableRange,
        changes: &[(u32, BackendId)],
    ) -> Result<(), WriteError> {
        self.inner.put_slots(range, changes)
    }
    fn put_service(&mut self, key: FrontendKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.written.insert(key);
        self.inner.put_service(key, entry)
    }
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), WriteError> {
        self.inner.delete_service(key)
    }
    fn put_source_ranges(&mut self, id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        self.inner.put_source_ranges(id, ranges)
    }
    fn delete_source_ranges(&mut self, id: u32, ranges: &SourceRanges) -> Result<(), WriteError> {
        self.inner.delete_source_ranges(id, ranges)
    }
}

/// A Service is programmed whole or not at all: when only some of its frontends fit, none is
/// written (not even for a moment), the room goes to the Services after it, and it is
/// programmed whole once room is freed, in the full and the incremental diff alike.
#[test]
fn a_service_that_does_not_fit_whole_is_left_out_whole() {
    let a = ("a", "10.96.0.1", 1);
    let b = ("b", "10.96.0.2", 2);
    let c = ("c", "10.96.0.3", 2);
    let d = ("d", "10.96.0.4", 1);
    let capacities = Capacities {
        frontends: 4,
        ..Capacities::DEFAULT
    };
    for incremental in [true, false] {
        let mut programmer = Programmer::adopt(
            MapContents::default(),
            Settings {
                capacities,
                ..Settings::default()
            },
        );
        let mut writer = WatchedWriter {
            inner: BoundedWriter {
                maps: MapContents::default(),
                capacities,
            },
            written: BTreeSet::new(),
        };
        let c_keys: BTreeSet<FrontendKey> = (desired_ports(&[c]).frontends.keys())
            .map(service_key)
            .collect();
        let mut step = |services: &[(&str, &str, u16)]| -> (Vec<String>, Vec<String>) {
            let want = desired_ports(services);
            if !incremental {
                // Each sync in full, as by an agent that just started on these maps.
                programmer = Programmer::adopt(
                    writer.inner.maps.clone(),
                    Settings {
                        capacities,
                        ..Settings::default()
                    },
                );
            }
            let (_, unplaced) = programmer.sync(&want, &mut writer).expect("sync");
            assert_eq!(
                reachable(&writer.inner.maps),
                reachable(programmer.programmed()),
                "the mirror is exact"
            );
            assert!(
                writer.written.is_disjoint(&c_keys) || unplaced.is_empty(),
                "no frontend of c is written while c does not fit whole"
            );
            let placed = (want.frontends.iter())
                .filter(|(f, _)| !unplaced.contains(f))
                .map(|(f, plan)| format!("{}:{}", plan.service.name, f.port))
                .collect();
            let left_out = unplaced
                .iter()
                .map(|f| format!("{}:{}", f.addr, f.port))
                .collect();
            (placed, left_out)
        };
        let (placed, _) = step(&[a, b]);
        assert_eq!(placed, ["a:80", "b:80", "b:81"]);
        // One of c's two frontends would fit: neither is programmed, and d gets the room.
        let (placed, left_out) = step(&[a, b, c, d]);
        assert_eq!(
            placed,
            ["a:80", "b:80", "b:81", "d:80"],
            "incremental: {incremental}"
        );
        assert_eq!(left_out, ["10.96.0.3:80", "10.96.0.3:81"]);
        // a leaves: one free entry is still not enough for c.
        let (placed, _) = step(&[b, c, d]);
        assert_eq!(placed, ["b:80", "b:81", "d:80"]);
        let (placed, _) = step(&[b, c, d]);
        assert_eq!(placed, ["b:80", "b:81", "d:80"]);
        // d leaves too: c fits whole.
        step(&[b, c]);
        let (placed, left_out) = step(&[b, c]);
        assert_eq!(
            placed,
            ["b:80", "b:81", "c:80", "c:81"],
            "incremental: {incremental}"
        );
        assert!(left_out.is_empty());
    }
}

/// LoadBalancer Services `(name, clusterIP, ingress IP, source ranges)` on one backend.
fn desired_guarded(services: &[(&str, &str, &str, &[&str])]) -> Desired {
    let mut yaml = String::new();
    for (name, vip, ingress, ranges) in services {
        let ranges: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
        yaml += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{type: LoadBalancer, clusterIP: {vip}, loadBalancerSourceRanges: [{}], ports: [{{port: 80, nodePort: 30080}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: {ingress}}}]}}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n  - addresses: [\"10.244.0.1\"]\n---\n",
            ranges.join(", ")
        );
    }
    let read = manifest::parse(&yaml, "test");
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    translate(&read.objects, &NodeContext::default())
}

/// The source-range set each frontend address names (ClusterIPs name none).
fn named_sets(maps: &MapContents) -> std::collections::BTreeMap<String, Vec<String>> {
    (maps.services.iter())
        .map(|(key, entry)| {
            let addr = lb_common::addr::ip_from_wide(key.addr_be);
            let ranges = match entry.source_ranges_id {
                ANY_SOURCE => vec!["any".to_owned()],
                id => maps.source_ranges[&id]
                    .iter()
                    .map(|r| r.to_string())
                    .collect(),
            };
            (addr.to_string(), ranges)
        })
        .collect()
}

/// Source-range sets are shared by equal ranges, written before any entry names them (checked
/// at every write), never reused under another meaning, and deleted one sync after the last
/// entry stops naming them, in incremental syncs and full ones (a fresh programmer adopting
/// the maps).
#[test]
fn source_range_sets_are_shared_written_first_and_deleted_a_sync_after_their_last_use() {
    let office = &["203.0.113.0/24", "198.51.100.7/32"][..];
    let home = &["192.0.2.0/25"][..];
    for fresh_each_sync in [false, true] {
        let mut programmer = Programmer::default();
        let mut writer = CheckingWriter::new();
        let mut step = |want: &Desired| {
            if fresh_each_sync {
                programmer = Programmer::adopt(writer.maps.clone(), Settings::default());
            }
            sync(&mut programmer, want, &mut writer);
            assert_eq!(writer.maps, *programmer.programmed(), "the mirror is exact");
            writer.maps.clone()
        };
        let both = step(&desired_guarded(&[
            ("a", "10.96.0.1", "192.168.50.1", office),
            ("b", "10.96.0.2", "192.168.50.2", office),
        ]));
        assert_eq!(both.source_ranges.len(), 1, "equal ranges share one set");
        assert_eq!(
            named_sets(&both).into_iter().collect::<Vec<_>>(),
            [
                ("10.96.0.1".into(), vec!["any".into()]),
                ("10.96.0.2".into(), vec!["any".into()]),
                (
                    "192.168.50.1".into(),
                    vec!["198.51.100.7/32".into(), "203.0.113.0/24".into()]
                ),
                (
                    "192.168.50.2".into(),
                    vec!["198.51.100.7/32".into(), "203.0.113.0/24".into()]
                ),
            ],
            "only load-balancer IPs are guarded"
        );
        let first_id = *both.source_ranges.keys().next().unwrap();

        // b moves to other ranges: a new set; a still names the first.
        let moved = step(&desired_guarded(&[
            ("a", "10.96.0.1", "192.168.50.1", office),
            ("b", "10.96.0.2", "192.168.50.2", home),
        ]));
        assert_eq!(moved.source_ranges.len(), 2);
        assert_eq!(named_sets(&moved)["192.168.50.2"], ["192.0.2.0/25"]);

        // a goes: its set is retired, still there for packets that read a's entry just before.
        let only_b = desired_guarded(&[("b", "10.96.0.2", "192.168.50.2", home)]);
        let retired = step(&only_b);
        assert!(retired.source_ranges.contains_key(&first_id), "kept a sync");
        let gone = step(&only_b);
        assert!(
            !gone.source_ranges.contains_key(&first_id),
            "deleted the sync after (fresh programmer each sync: {fresh_each_sync})"
        );
        assert_eq!(gone.source_ranges.len(), 1);

        // The same ranges coming back get a new id: an id never changes meaning.
        let back = step(&desired_guarded(&[
            ("a", "10.96.0.1", "192.168.50.1", office),
            ("b", "10.96.0.2", "192.168.50.2", home),
        ]));
        let new_id = back.services[&lb_common::service::ServiceKey::new(
            lb_common::Address::to_wide(lb_common::addr_be([192, 168, 50, 1])),
            80u16.to_be(),
            6,
        )]
            .source_ranges_id;
        assert!(new_id > first_id, "set {new_id} reuses no earlier id");
    }
}
