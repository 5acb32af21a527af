//! Giving a pinned map another capacity without losing what it holds.
//!
//! A BPF map cannot be resized in place. When an agent starts with a capacity flag that differs
//! from a pinned map's, and everything the map holds fits the new size, the old map's pin is moved
//! aside to `<pin dir>/resizing/` ([`prepare`]), the loader creates and pins a map of the new size
//! under the usual name, and [`carry_over`] copies the old map's content into it twice:
//!
//! 1. before the first interface is attached: backends, Maglev tables and frontends (nothing
//!    changes them while no agent runs) and the conntrack and affinity entries;
//! 2. once every link was taken over by the new programs (`BPF_LINK_UPDATE`): the conntrack and
//!    affinity entries the old programs made in between (entries already in the new map are
//!    left as they are: the new programs wrote them later). Then the old pins are removed.
//!
//! Flows that start between the two passes and send a packet before the second pass finishes
//! are the only ones that can miss their entry; both passes take well under a second. A resize
//! that would drop entries (a map shrunk below what it holds) is not done: the map keeps its
//! size and the agent says how many entries the new size would lose.
//!
//! An agent that dies between the passes leaves `resizing/` behind; the next one carries over
//! from it again before anything else (no sync runs before the second pass, so repeating the
//! first pass is safe).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues},
};
use lb_common::{
    Ip6,
    conntrack::{CtEntry, FlowKey},
    counters::COUNTER_SLOTS,
    maps::{
        AFFINITY_MAP, AFFINITY6_MAP, BACKENDS_MAP, BACKENDS6_MAP, CONNTRACK_MAP, CONNTRACK6_MAP,
        COUNTERS_MAP, Capacities, SERVICES_MAP, SERVICES6_MAP, SLOTS_MAP, SLOTS_PER_ELEMENT,
    },
    service::{AffinityKey, AffinityValue, Backend, BackendId, ServiceEntry, ServiceKey},
};

use crate::dataplane::{BpfMaps, MappedSlots, TableRange};

/// Where the maps being replaced wait, under the layout's pin directory.
pub const RESIZING_DIR: &str = "resizing";

/// What [`prepare`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The capacities the maps will have.
    pub capacities: Capacities,
    /// Maps that get their new capacity (their old pins moved aside), with (old, new) sizes.
    pub resized: Vec<(&'static str, u32, u32)>,
    /// Maps that keep their pinned capacity, and why.
    pub kept: Vec<String>,
    /// Counter maps replaced to follow a new capacity (their counts start again), with (old,
    /// new) sizes.
    pub counters_reset: Vec<(&'static str, u32, u32)>,
}

fn open(path: &Path) -> Result<Map, MapError> {
    Map::from_map_data(MapData::from_pin(path)?)
}

fn open_hash<K: Pod, V: Pod>(path: &Path) -> Result<HashMap<MapData, K, V>, MapError> {
    open(path)?.try_into()
}

/// Entries in the hash map pinned at `path`.
fn count<K: Pod, V: Pod>(path: &Path) -> Result<u64, MapError> {
    let map = open_hash::<K, V>(path)?;
    let mut n = 0;
    for key in map.keys() {
        key?;
        n += 1;
    }
    Ok(n)
}

/// The table ranges the frontends of both families, as pinned under `pin_dir`, point at.
fn table_ranges(pin_dir: &Path) -> Result<BTreeSet<TableRange>, MapError> {
    let mut entries = Vec::new();
    for item in open_hash::<ServiceKey, ServiceEntry>(&services_pin(pin_dir, SERVICES_MAP))?.iter()
    {
        entries.push(item?.1);
    }
    let services6 = services_pin(pin_dir, SERVICES6_MAP);
    if services6.exists() {
        for item in open_hash::<ServiceKey<Ip6>, ServiceEntry>(&services6)?.iter() {
            entries.push(item?.1);
        }
    }
    Ok(entries
        .into_iter()
        .filter(|entry| entry.table_size > 0)
        .map(|entry| TableRange {
            offset: entry.table_offset,
            size: entry.table_size,
        })
        .collect())
}

/// How much of its capacity the map pinned at `path` uses, in the unit `wanted` is given in:
/// entries, or for the slots array the end of its last table.
fn in_use(name: &str, path: &Path, pin_dir: &Path) -> Result<u64, MapError> {
    match name {
        SERVICES_MAP => count::<ServiceKey, ServiceEntry>(path),
        BACKENDS_MAP => count::<BackendId, Backend>(path),
        CONNTRACK_MAP => count::<FlowKey, CtEntry>(path),
        AFFINITY_MAP => count::<AffinityKey, AffinityValue>(path),
        SERVICES6_MAP => count::<ServiceKey<Ip6>, ServiceEntry>(path),
        BACKENDS6_MAP => count::<BackendId, Backend<Ip6>>(path),
        CONNTRACK6_MAP => count::<FlowKey<Ip6>, CtEntry<Ip6>>(path),
        AFFINITY6_MAP => count::<AffinityKey<Ip6>, AffinityValue>(path),
        // The frontends as pinned: moved aside already if that map is resized too.
        _ => Ok(table_ranges(pin_dir)?
            .iter()
            .map(|r| u64::from(r.offset) + u64::from(r.size))
            .max()
            .unwrap_or(0)),
    }
}

/// Where a frontends map (`name`, either family's) is pinned: aside, while a resize of it is
/// under way.
fn services_pin(pin_dir: &Path, name: &str) -> PathBuf {
    let aside = pin_dir.join(RESIZING_DIR).join(name);
    if aside.exists() {
        aside
    } else {
        pin_dir.join(name)
    }
}

/// Decides the capacities: `wanted`, except for a pinned map whose content would not fit it
/// (it keeps its size). Moves the pins of the maps to be resized aside, so the loader creates
/// them anew. A map whose earlier resize was interrupted is not resized again until
/// [`carry_over`] finished that one.
pub fn prepare(pin_dir: &Path, wanted: Capacities) -> anyhow::Result<Plan> {
    let mut plan = Plan {
        capacities: wanted,
        ..Plan::default()
    };
    let aside = pin_dir.join(RESIZING_DIR);
    for (name, wanted_elements) in wanted.max_entries() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        let pinned_elements = info.max_entries();
        if pinned_elements == wanted_elements {
            continue;
        }
        // Capacities in the unit of the flags: slots for the slots array.
        let scale = if name == SLOTS_MAP {
            SLOTS_PER_ELEMENT
        } else {
            1
        };
        let (pinned, asked) = (pinned_elements * scale, wanted_elements * scale);
        let keep = |plan: &mut Plan, why: String| {
            let field = match name {
                // An IPv6 twin takes its IPv4 map's capacity: either keeping its size keeps
                // both.
                SERVICES_MAP | SERVICES6_MAP => &mut plan.capacities.frontends,
                BACKENDS_MAP | BACKENDS6_MAP => &mut plan.capacities.backends,
                SLOTS_MAP => &mut plan.capacities.slots,
                CONNTRACK_MAP => &mut plan.capacities.conntrack,
                CONNTRACK6_MAP => &mut plan.capacities.conntrack6,
                _ => &mut plan.capacities.affinity,
            };
            *field = pinned;
            plan.kept.push(format!(
                "{name} keeps its pinned capacity of {pinned} (not the {asked} asked for): {why}"
            ));
        };
        if aside.join(name).exists() {
            keep(
                &mut plan,
                format!("an earlier resize is still in {}", aside.display()),
            );
            continue;
        }
        if asked < pinned {
            let used = in_use(name, &path, pin_dir)
                .with_context(|| format!("reading {}", path.display()))?;
            if used > u64::from(asked) {
                let unit = if name == SLOTS_MAP {
                    "slots up to the end of its last table"
                } else {
                    "entries"
                };
                keep(
                    &mut plan,
                    format!(
                        "it holds {used} {unit}; shrinking would drop {} of them",
                        used - u64::from(asked)
                    ),
                );
                continue;
            }
        }
        std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
        std::fs::rename(&path, aside.join(name))
            .with_context(|| format!("moving {} aside to resize it", path.display()))?;
        plan.resized.push((name, pinned, asked));
    }
    // The per-Service and per-backend counters follow the capacities chosen above; a pinned one
    // of another size is simply replaced (its counts restart, which Prometheus handles).
    for (name, elements) in plan.capacities.stats_max_entries() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        if info.max_entries() != elements {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            plan.counters_reset
                .push((name, info.max_entries(), elements));
        }
    }
    // A counters map pinned by an lb that counted fewer things is replaced (its counts carried
    // over): the programs must be able to count everything this lb counts.
    let counters = pin_dir.join(COUNTERS_MAP);
    if counters.exists() && !aside.join(COUNTERS_MAP).exists() {
        let info = MapInfo::from_pin(&counters)
            .with_context(|| format!("reading {}", counters.display()))?;
        if info.max_entries() != COUNTER_SLOTS {
            std::fs::create_dir_all(&aside)
                .with_context(|| format!("creating {}", aside.display()))?;
            std::fs::rename(&counters, aside.join(COUNTERS_MAP))
                .with_context(|| format!("moving {} aside to resize it", counters.display()))?;
            plan.resized
                .push((COUNTERS_MAP, info.max_entries(), COUNTER_SLOTS));
        }
    }
    Ok(plan)
}

/// Adds the old counters map's per-CPU counts to the new one's: the counters an operator or
/// Prometheus reads keep growing across the resize. Done once, in the final pass, when the old
/// programs no longer count; a count the new programs make during the read-add-write of one
/// slot can be lost.
fn add_counters(path: &Path, new: &mut PerCpuArray<MapData, u64>) -> anyhow::Result<usize> {
    let old: PerCpuArray<MapData, u64> = open(path)
        .and_then(TryInto::try_into)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut carried = 0;
    for index in 0..old.len().min(new.len()) {
        let before = old
            .get(&index, 0)
            .with_context(|| format!("reading {}", path.display()))?;
        let now = new.get(&index, 0).context("reading the new counters map")?;
        let sums: Vec<u64> = (before.iter().zip(now.iter()))
            .map(|(a, b)| a.wrapping_add(*b))
            .collect();
        let values = PerCpuValues::try_from(sums).context("per-CPU counts")?;
        new.set(index, values, 0)
            .context("writing the new counters map")?;
        carried += 1;
    }
    Ok(carried)
}

/// What one pass of [`carry_over`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub services: usize,
    pub backends: usize,
    pub slots: usize,
    pub conntrack: usize,
    pub affinity: usize,
    pub counters: usize,
}

/// Inserts every entry of the old map at `path` that `new` lacks. Returns how many.
fn copy_missing<K: Pod + Eq, V: Pod>(
    path: &Path,
    new: &mut HashMap<MapData, K, V>,
) -> anyhow::Result<usize> {
    let old = open_hash::<K, V>(path).with_context(|| format!("opening {}", path.display()))?;
    let mut copied = 0;
    for item in old.iter() {
        let (key, value) = item.with_context(|| format!("reading {}", path.display()))?;
        match new.insert(key, value, BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("copying {} into its new map", path.display()));
            }
        }
    }
    Ok(copied)
}

/// Creates the element only if its key is absent (`bpf_map_update_elem`'s `BPF_NOEXIST`).
const BPF_NOEXIST: u64 = 1;

/// Copies the maps waiting in `<pin_dir>/resizing/` into `maps` (see the module doc).
/// `final_pass`: links were taken over; copy only what the packet path writes, then unpin the
/// old maps. `None` when no resize is under way.
pub fn carry_over(
    pin_dir: &Path,
    maps: &mut BpfMaps,
    final_pass: bool,
) -> anyhow::Result<Option<Carried>> {
    let aside = pin_dir.join(RESIZING_DIR);
    if !aside.is_dir() {
        return Ok(None);
    }
    let old = |name: &str| -> Option<PathBuf> { Some(aside.join(name)).filter(|p| p.exists()) };
    let mut done = Carried::default();
    if !final_pass {
        // The same order as a sync: backends, then complete tables, then the frontends.
        if let Some(path) = old(BACKENDS_MAP) {
            done.backends = copy_missing(&path, &mut maps.backends)?;
        }
        if let Some(path) = old(BACKENDS6_MAP) {
            done.backends += copy_missing(&path, &mut maps.v6.backends)?;
        }
        if let Some(path) = old(SLOTS_MAP) {
            let info =
                MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let slots = MappedSlots::new(data, info.max_entries() * SLOTS_PER_ELEMENT)
                .with_context(|| format!("mapping {}", path.display()))?;
            // The tables of the frontends as pinned (the old map's, if that one moves too).
            let ranges = table_ranges(pin_dir).context("reading the frontends' tables")?;
            for range in ranges {
                for index in range.offset..range.offset + range.size {
                    let id = slots
                        .get(index)
                        .with_context(|| format!("reading slot {index} of {}", path.display()))?;
                    if !maps.slots.set(index, id) {
                        anyhow::bail!("slot {index} does not fit the new slots array");
                    }
                    done.slots += 1;
                }
            }
        }
        if let Some(path) = old(SERVICES_MAP) {
            done.services = copy_missing(&path, &mut maps.services)?;
        }
        if let Some(path) = old(SERVICES6_MAP) {
            done.services += copy_missing(&path, &mut maps.v6.services)?;
        }
    }
    if let Some(path) = old(CONNTRACK_MAP) {
        done.conntrack = copy_missing(&path, &mut maps.conntrack)?;
    }
    if let Some(path) = old(CONNTRACK6_MAP) {
        done.conntrack += copy_missing(&path, &mut maps.v6.conntrack)?;
    }
    if let Some(path) = old(AFFINITY_MAP) {
        done.affinity = copy_missing(&path, &mut maps.affinity)?;
    }
    if let Some(path) = old(AFFINITY6_MAP) {
        done.affinity += copy_missing(&path, &mut maps.v6.affinity)?;
    }
    if final_pass {
        if let Some(path) = old(COUNTERS_MAP) {
            done.counters = add_counters(&path, &mut maps.counters)?;
        }
        std::fs::remove_dir_all(&aside)
            .with_context(|| format!("unpinning the resized maps in {}", aside.display()))?;
    }
    Ok(Some(done))
}
