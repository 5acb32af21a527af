//! The conntrack sweep: deletes the entries of flows that are dead (both entries past their
//! expiry, or one past it with its partner gone). The packet path already ignores such entries;
//! the sweep makes room in the map for live flows and hands SNAT ports back.
//!
//! Why a sweep from user space and not a BPF timer or iterator: it needs no program type beyond
//! tc/XDP (aya-ebpf 0.2 has no iterator programs), it costs the packet path nothing, and its cost
//! is measured (docs/design.md): reading the map in batches of [`BATCH`] entries with
//! `BPF_MAP_LOOKUP_BATCH`, then deleting the dead ones that still hold what was read
//! ([`delete_unchanged`]) in batches. While no agent runs, nothing
//! is swept, but the packet path still treats expired flows as gone and the LRU still evicts.

use std::{
    collections::HashSet,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use crate::bpf_sys::{
    BPF_MAP_DELETE_BATCH, BPF_MAP_DELETE_ELEM, BPF_MAP_LOOKUP_ELEM, BatchAttr, ElemAttr, bpf,
};
use lb_common::{
    Address, IPPROTO_UDP, Ip6,
    conntrack::{CT_KIND_FORWARD, CtEntry, FlowKey, mono_seconds, partner_key},
};

/// A family's address field (`u32`, `Ip6`): the sweep works on either family's conntrack.
pub trait CtAddress: Address + Eq + std::hash::Hash + std::fmt::Debug + 'static {
    /// Every entry of this family's conntrack map `fd`.
    fn read_all(fd: BorrowedFd<'_>) -> std::io::Result<Entries<Self>>;
}

impl CtAddress for u32 {
    fn read_all(fd: BorrowedFd<'_>) -> std::io::Result<Entries<Self>> {
        crate::bpf_sys::lookup_all(fd)
    }
}

impl CtAddress for Ip6 {
    fn read_all(fd: BorrowedFd<'_>) -> std::io::Result<Entries<Self>> {
        crate::bpf_sys::lookup_all(fd)
    }
}

/// Entries read or deleted per batch call.
pub use crate::bpf_sys::BATCH;

/// Monotonic seconds, the packet path's clock (`bpf_ktime_get_ns`).
pub fn now_s() -> u32 {
    mono_seconds(monotonic_ns())
}

/// CLOCK_MONOTONIC in ns: `bpf_ktime_get_ns()`'s clock (the affinity map's and the monitor's).
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Conntrack entries as read: each key with its entry.
pub type Entries<A> = Vec<(FlowKey<A>, CtEntry<A>)>;

/// What one sweep found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries in the map when it was read.
    pub entries: usize,
    /// Entries deleted (both entries of each dead flow).
    pub deleted: usize,
    /// Live entries whose other half is missing: the LRU evicted it (the map was full), as
    /// the packet path always writes and removes a flow's two entries together.
    pub orphans: usize,
    pub elapsed: Duration,
}

/// The dead entries among `entries` at `now`: an expired entry whose partner is expired too, or
/// missing. Pure, so the rule is tested without a kernel.
pub fn dead_keys<A: CtAddress>(entries: &[(FlowKey<A>, CtEntry<A>)], now: u32) -> Vec<FlowKey<A>> {
    examine(entries, now)
        .0
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Live entries among `entries` at `now` whose partner entry is missing (see [`Sweep::orphans`]).
pub fn orphans<A: CtAddress>(entries: &[(FlowKey<A>, CtEntry<A>)], now: u32) -> usize {
    examine(entries, now).1
}

/// The dead entries (with what was read of them, for [`delete_unchanged`]) and the number of
/// [`orphans`], from one index of the entries (a sweep of 1M entries builds it once).
pub fn examine<A: CtAddress>(
    entries: &[(FlowKey<A>, CtEntry<A>)],
    now: u32,
) -> (Entries<A>, usize) {
    // Each key, and whether its entry is still alive.
    let alive: std::collections::HashMap<FlowKey<A>, bool> =
        entries.iter().map(|(k, e)| (*k, !e.expired(now))).collect();
    let partner_alive = |k: &FlowKey<A>, e: &CtEntry<A>| alive.get(&partner_key(k, e)).copied();
    let mut dead = Vec::new();
    let mut orphans = 0;
    for (k, e) in entries {
        match (e.expired(now), partner_alive(k, e)) {
            (true, None | Some(false)) => dead.push((*k, *e)),
            (false, None) => orphans += 1,
            _ => {}
        }
    }
    (dead, orphans)
}

/// Reads every entry of the conntrack map `fd`.
pub fn read_all<A: CtAddress>(
    fd: BorrowedFd<'_>,
) -> std::io::Result<Vec<(FlowKey<A>, CtEntry<A>)>> {
    A::read_all(fd)
}

/// Deletes `keys` from the map `fd` (missing ones are fine: the LRU or the packet path may have
/// dropped them meanwhile).
pub fn delete<A: CtAddress>(fd: BorrowedFd<'_>, keys: &[FlowKey<A>]) -> std::io::Result<usize> {
    let mut deleted = 0;
    for chunk in keys.chunks(BATCH as usize) {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: chunk.as_ptr() as u64,
            values: 0,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` points at `count` keys of the map's key size.
        if unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) } == 0 {
            deleted += attr.count as usize;
            continue;
        }
        // The batch stops at the first missing key: delete the rest one by one.
        deleted += attr.count as usize;
        for key in &chunk[attr.count as usize..] {
            let mut one = ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                _pad: 0,
                key: key as *const FlowKey<A> as u64,
                value: 0,
                flags: 0,
            };
            // SAFETY: `key` points at one key of the map's key size.
            if unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut one) } == 0 {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// Entries looked up again, then deleted, per batch in [`delete_unchanged`]: small, so little
/// time passes between the check and the delete.
const RECHECK_BATCH: usize = 64;

/// Deletes the entries of `dead` (keys with the entries a sweep read) that still hold what was
/// read. Between the read and the delete the packet path may have given a dead flow's tuple to
/// a new flow (a SNAT port used again: it takes the tuple of a dead flow); deleting that entry
/// would cut the new flow's replies off after its handshake. Each entry is looked up again just
/// before its batch is deleted, so the window shrinks from the whole sweep to one small batch.
pub fn delete_unchanged<A: CtAddress>(
    fd: BorrowedFd<'_>,
    dead: &[(FlowKey<A>, CtEntry<A>)],
) -> std::io::Result<usize> {
    let mut deleted = 0;
    let mut keys = Vec::with_capacity(RECHECK_BATCH);
    for chunk in dead.chunks(RECHECK_BATCH) {
        keys.clear();
        for (key, read) in chunk {
            let mut now = CtEntry::ZERO;
            let mut one = ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                _pad: 0,
                key: key as *const FlowKey<A> as u64,
                value: &mut now as *mut CtEntry<A> as u64,
                flags: 0,
            };
            // SAFETY: `key` and `value` point at a key and a value of the map's sizes.
            if unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut one) } == 0 && now == *read {
                keys.push(*key);
            }
        }
        deleted += delete(fd, &keys)?;
    }
    Ok(deleted)
}

/// Deletes the UDP flows (both entries) whose (service id, backend id) is in `leaving`: their
/// backend left that Service. Returns how many flows went.
pub fn purge_udp<A: CtAddress>(
    fd: BorrowedFd<'_>,
    leaving: &HashSet<(u32, u32)>,
) -> std::io::Result<usize> {
    if leaving.is_empty() {
        return Ok(0);
    }
    let entries = read_all::<A>(fd)?;
    let mut doomed = Vec::new();
    for (key, entry) in &entries {
        if key.proto == IPPROTO_UDP
            && entry.kind == CT_KIND_FORWARD
            && leaving.contains(&(entry.service_id, entry.backend_id))
        {
            doomed.push(*key);
            doomed.push(partner_key(key, entry));
        }
    }
    delete(fd, &doomed)?;
    Ok(doomed.len() / 2)
}

/// One sweep of a family's conntrack map.
pub fn sweep<A: CtAddress>(map: &aya::maps::MapData) -> std::io::Result<Sweep> {
    let started = Instant::now();
    let fd = map.fd().as_fd();
    let entries = read_all::<A>(fd)?;
    let now = now_s();
    let (dead, orphans) = examine(&entries, now);
    let deleted = delete_unchanged(fd, &dead)?;
    Ok(Sweep {
        entries: entries.len(),
        deleted,
        orphans,
        elapsed: started.elapsed(),
    })
}

/// Sweeps both families' conntrack maps pinned under `pin_dir` every `interval` on a thread of
/// its own (a sweep of a full map takes long enough that it must not hold up syncs), until the
/// process exits.
pub fn spawn_sweeper(
    pin_dir: std::path::PathBuf,
    interval: Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    use lb_common::maps::{CONNTRACK_MAP, CONNTRACK6_MAP};
    let spawned = std::thread::Builder::new()
        .name("conntrack-gc".to_owned())
        .spawn(move || {
            let open = |name: &str| match aya::maps::MapData::from_pin(pin_dir.join(name)) {
                Ok(map) => Some(map),
                Err(err) => {
                    tracing::error!("conntrack sweeps of {name} disabled: cannot open it: {err}");
                    None
                }
            };
            let (map4, map6) = (open(CONNTRACK_MAP), open(CONNTRACK6_MAP));
            loop {
                std::thread::sleep(interval);
                let swept4 = map4.as_ref().map(|m| (CONNTRACK_MAP, sweep::<u32>(m)));
                let swept6 = map6.as_ref().map(|m| (CONNTRACK6_MAP, sweep::<Ip6>(m)));
                let (mut entries, mut orphans) = (0, 0);
                for (name, result) in swept4.into_iter().chain(swept6) {
                    match result {
                        Ok(done) => {
                            entries += done.entries;
                            orphans += done.orphans;
                            metrics.set_entries(name, done.entries as u64);
                            metrics.conntrack_gc_deleted.inc_by(done.deleted as u64);
                            metrics
                                .conntrack_gc_duration
                                .observe(done.elapsed.as_secs_f64());
                            tracing::debug!(
                                map = name,
                                entries = done.entries,
                                deleted = done.deleted,
                                elapsed_us = done.elapsed.as_micros() as u64,
                                "conntrack swept"
                            );
                        }
                        Err(err) => tracing::warn!("conntrack sweep of {name} failed: {err}"),
                    }
                }
                metrics.conntrack_entries.set(entries as i64);
                metrics.conntrack_orphans.set(orphans as i64);
                match prune_counters(&pin_dir) {
                    Ok(0) => {}
                    Ok(pruned) => {
                        tracing::debug!(pruned, "counters of gone frontends and backends deleted")
                    }
                    Err(err) => tracing::warn!("pruning the per-Service counters failed: {err:#}"),
                }
            }
        });
    if let Err(err) = spawned {
        tracing::error!("conntrack sweeps disabled: {err}");
    }
}

/// Deletes the per-Service and per-backend counters whose frontend or backend is no longer in
/// the maps (the packet path creates them on first use; a flow outliving its frontend can
/// create one again, which the next pass deletes). Returns how many went.
pub fn prune_counters(pin_dir: &std::path::Path) -> anyhow::Result<usize> {
    use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
    use lb_common::{
        maps::{
            BACKEND_STATS_MAP, BACKENDS_MAP, BACKENDS6_MAP, SERVICE_STATS_MAP, SERVICES_MAP,
            SERVICES6_MAP,
        },
        service::{Backend, ServiceEntry, ServiceKey},
        stats::{BackendStats, ServiceStats},
    };
    fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
        dir: &std::path::Path,
        name: &str,
    ) -> anyhow::Result<T> {
        Ok(T::try_from(Map::from_map_data(MapData::from_pin(
            dir.join(name),
        )?)?)?)
    }
    let services: HashMap<MapData, ServiceKey, ServiceEntry> = open(pin_dir, SERVICES_MAP)?;
    let services6: HashMap<MapData, ServiceKey<Ip6>, ServiceEntry> = open(pin_dir, SERVICES6_MAP)?;
    let live: HashSet<u32> = (services.iter().flatten().map(|(_, e)| e.service_id))
        .chain(services6.iter().flatten().map(|(_, e)| e.service_id))
        .collect();
    let mut service_stats: PerCpuHashMap<MapData, u32, ServiceStats> =
        open(pin_dir, SERVICE_STATS_MAP)?;
    let gone: Vec<u32> = (service_stats.keys().flatten())
        .filter(|id| !live.contains(id))
        .collect();
    let mut pruned = 0;
    for id in gone {
        pruned += usize::from(service_stats.remove(&id).is_ok());
    }
    let backends: HashMap<MapData, u32, Backend> = open(pin_dir, BACKENDS_MAP)?;
    let backends6: HashMap<MapData, u32, Backend<Ip6>> = open(pin_dir, BACKENDS6_MAP)?;
    let live: HashSet<u32> = (backends.keys().flatten())
        .chain(backends6.keys().flatten())
        .collect();
    let mut backend_stats: PerCpuHashMap<MapData, u32, BackendStats> =
        open(pin_dir, BACKEND_STATS_MAP)?;
    let gone: Vec<u32> = (backend_stats.keys().flatten())
        .filter(|id| !live.contains(id))
        .collect();
    for id in gone {
        pruned += usize::from(backend_stats.remove(&id).is_ok());
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::IPPROTO_TCP;

    fn pair(client_port: u16, forward_expires: u32, reply_expires: u32) -> [(FlowKey, CtEntry); 2] {
        let key = FlowKey::new(1, 2, client_port, 80, IPPROTO_TCP);
        let forward = CtEntry {
            new_saddr_be: 1,
            new_daddr_be: 3,
            new_sport_be: client_port,
            new_dport_be: 8080,
            kind: CT_KIND_FORWARD,
            expires_s: forward_expires,
            ..CtEntry::ZERO
        };
        let reply_key = partner_key(&key, &forward);
        let reply = CtEntry {
            new_saddr_be: 2,
            new_daddr_be: 1,
            new_sport_be: 80,
            new_dport_be: client_port,
            expires_s: reply_expires,
            ..forward
        };
        [(key, forward), (reply_key, reply)]
    }

    #[test]
    fn a_flow_dies_only_when_both_entries_expired() {
        let mut entries = Vec::new();
        entries.extend(pair(1000, 50, 50)); // dead
        entries.extend(pair(1001, 50, 200)); // alive through its reply entry
        entries.extend(pair(1002, 200, 50)); // alive through its forward entry
        let orphan = pair(1003, 50, 0)[0]; // partner gone, expired: dead
        entries.push(orphan);
        let fresh_orphan = pair(1004, 200, 0)[0]; // partner gone, not expired: kept
        entries.push(fresh_orphan);
        let mut dead = dead_keys(&entries, 100);
        dead.sort();
        let mut want = vec![entries[0].0, entries[1].0, orphan.0];
        want.sort();
        assert_eq!(dead, want);
        // Only the fresh orphan is live with its partner gone (evicted).
        assert_eq!(orphans(&entries, 100), 1);
    }
}
