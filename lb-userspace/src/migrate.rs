//! Upgrading from the previous pin layout (v2, lb 0.1's first releases) without losing flows.
//!
//! A v2 agent detached its programs when it stopped (its links were not pinned), so an upgrade
//! always has a gap between the old agent's exit and this one's attach; TCP rides it out with
//! retransmissions if the flows' state is still there. So before the first sync this copies the
//! v2 maps' services, backends, Maglev tables and affinity into the v3 maps unchanged (the same
//! layouts: ids keep their meaning, so every flow keeps its backend) and converts each v2
//! conntrack entry into a v3 one: its rewrite, service and backend are kept, its state is taken
//! to be "answered" and its expiry starts now. Then the v2 pins are removed. The first sync then
//! moves the carried-over state to the desired one as it would after a restart.
//!
//! Not carried over: the packet counters (they start at zero) and the node settings (rewritten
//! by the first sync).

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    conntrack::{CT_S_REPLIED, CtEntry, CtTimeouts, FlowKey, timeout_s},
    maps::{
        AFFINITY_MAP, BACKENDS_MAP, CONNTRACK_MAP, PREVIOUS_PIN_LAYOUT_VERSION, SERVICES_MAP,
        SLOTS_MAP, SLOTS_PER_ELEMENT,
    },
    service::{AffinityKey, AffinityValue, Backend, BackendId, ServiceEntry, ServiceKey},
};

use crate::dataplane::{BpfMaps, MapWriter as _, TableRange};

/// A v2 conntrack entry (24 bytes): a v3 entry without state and lifetime.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntryV2 {
    pub new_saddr_be: u32,
    pub new_daddr_be: u32,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    pub kind: u8,
    pub flags: u8,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<CtEntryV2>() == 24);
// SAFETY: `#[repr(C)]`, `Copy`, only integers with explicit padding: every bit pattern is valid.
unsafe impl aya::Pod for CtEntryV2 {}

impl CtEntryV2 {
    /// The v3 entry for this flow, alive for its state's timeout from `now_s`.
    pub fn upgrade(&self, proto: u8, now_s: u32, timeouts: &CtTimeouts) -> CtEntry {
        CtEntry {
            new_saddr_be: self.new_saddr_be,
            new_daddr_be: self.new_daddr_be,
            new_sport_be: self.new_sport_be,
            new_dport_be: self.new_dport_be,
            kind: self.kind,
            flags: self.flags,
            state: CT_S_REPLIED,
            _pad: 0,
            service_id: self.service_id,
            backend_id: self.backend_id,
            created_s: now_s,
            expires_s: now_s.saturating_add(timeout_s(proto, CT_S_REPLIED, timeouts)),
        }
    }
}

/// What was carried over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub services: usize,
    pub backends: usize,
    pub conntrack: usize,
    pub affinity: usize,
}

fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
}

/// Carries the previous layout's state into `maps` (the current layout's, not yet synced) and
/// removes the previous pins. `None` when there is no previous layout. When the current layout
/// already holds services (an agent of this version ran since), the previous pins are stale and
/// only removed.
pub fn from_previous_layout(
    bpffs_dir: &Path,
    maps: &mut BpfMaps,
) -> anyhow::Result<Option<Migrated>> {
    let old = bpffs_dir.join(PREVIOUS_PIN_LAYOUT_VERSION);
    if !old.is_dir() {
        return Ok(None);
    }
    if maps.services.keys().next().is_some() {
        remove_dir(&old)?;
        return Ok(None);
    }
    let mut done = Migrated::default();
    let services: HashMap<_, ServiceKey, ServiceEntry> = open(&old, SERVICES_MAP)?.try_into()?;
    let backends: HashMap<_, BackendId, Backend> = open(&old, BACKENDS_MAP)?.try_into()?;
    let slots: Array<_, [BackendId; SLOTS_PER_ELEMENT as usize]> =
        open(&old, SLOTS_MAP)?.try_into()?;
    let conntrack: HashMap<_, FlowKey, CtEntryV2> = open(&old, CONNTRACK_MAP)?.try_into()?;
    let affinity: HashMap<_, AffinityKey, AffinityValue> = open(&old, AFFINITY_MAP)?.try_into()?;

    // The same order as a sync: backends, then complete tables, then the entries naming them.
    for item in backends.iter() {
        let (id, backend) = item?;
        maps.put_backend(id, backend.to_wide())?;
        done.backends += 1;
    }
    let services: Vec<(ServiceKey, ServiceEntry)> = services.iter().collect::<Result<_, _>>()?;
    for (_, entry) in services.iter().filter(|(_, e)| e.table_size > 0) {
        let range = TableRange {
            offset: entry.table_offset,
            size: entry.table_size,
        };
        let mut table = Vec::with_capacity(range.size as usize);
        for i in 0..range.size {
            let slot = range.offset + i;
            let pair = slots.get(&(slot / SLOTS_PER_ELEMENT), 0)?;
            table.push((i, pair[(slot % SLOTS_PER_ELEMENT) as usize]));
        }
        maps.put_slots(range, &table)?;
    }
    for (key, entry) in &services {
        maps.put_service(key.to_wide(), *entry)?;
        done.services += 1;
    }
    let now = crate::conntrack::now_s();
    // The first sync writes the configured timeouts; until then the packet path uses these.
    let timeouts = CtTimeouts::DEFAULT;
    for item in conntrack.iter() {
        let (key, old_entry) = item?;
        let entry = old_entry.upgrade(key.proto, now, &timeouts);
        maps.conntrack.insert(key, entry, 0)?;
        done.conntrack += 1;
    }
    for item in affinity.iter() {
        let (key, value) = item?;
        maps.affinity.insert(key, value, 0)?;
        done.affinity += 1;
    }
    drop((backends, slots, conntrack, affinity));
    remove_dir(&old)?;
    Ok(Some(done))
}

/// Unpins every object in `dir` (the maps stay alive while a program or process uses them).
fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}
