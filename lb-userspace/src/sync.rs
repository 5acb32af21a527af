//! Level-triggered sync: desired state (from translation) -> target map contents with stable ids
//! -> the ordered writes that turn what is programmed into the target, and nothing more.
//!
//! Write order keeps the packet path consistent at every instant:
//! backends it will need are written first; a service's new slots are written before its entry
//! grows to cover them, and its entry shrinks before slots beyond the new count are deleted; a
//! removed service's entry goes before its slots; unused backends go last.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    addr_be, port_be,
    service::{Backend, BackendId, ServiceEntry, ServiceKey, SlotKey},
};

use crate::{
    dataplane::{MapContents, MapWriter, WriteError},
    translate::{BackendAddr, Desired, Frontend},
};

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey::new(
        addr_be(frontend.addr.octets()),
        port_be(frontend.port),
        frontend.protocol.number(),
    )
}

pub fn backend_value(backend: &BackendAddr) -> Backend {
    Backend::new(addr_be(backend.addr.octets()), port_be(backend.port))
}

/// How many map writes a sync made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub writes: usize,
    pub deletes: usize,
}

impl SyncStats {
    pub fn is_empty(&self) -> bool {
        self.writes == 0 && self.deletes == 0
    }
}

/// Owns the view of what is programmed and moves it towards what is desired.
#[derive(Debug, Default)]
pub struct Programmer {
    programmed: MapContents,
}

/// Applies each write to the maps, then to the mirror, so the mirror never claims a write that
/// failed; a failed sync simply resumes from there next time.
struct Tracked<'a> {
    writer: &'a mut dyn MapWriter,
    mirror: &'a mut MapContents,
    stats: SyncStats,
}

macro_rules! tracked_op {
    ($name:ident, $stat:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name(&mut self, $($arg: $ty),*) -> Result<(), WriteError> {
            self.writer.$name($($arg),*)?;
            self.mirror.$name($($arg),*)?;
            self.stats.$stat += 1;
            Ok(())
        }
    };
}

impl Tracked<'_> {
    tracked_op!(put_backend, writes, (id: BackendId, backend: Backend));
    tracked_op!(delete_backend, deletes, (id: BackendId));
    tracked_op!(put_slot, writes, (key: SlotKey, backend: BackendId));
    tracked_op!(delete_slot, deletes, (key: SlotKey));
    tracked_op!(put_service, writes, (key: ServiceKey, entry: ServiceEntry));
    tracked_op!(delete_service, deletes, (key: ServiceKey));
}

/// The lowest ids not in `taken`, handed out in order.
struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(taken: BTreeSet<u32>) -> Self {
        Self { taken, next: 0 }
    }

    fn allocate(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

impl Programmer {
    /// Starts from what the maps already hold (e.g. pinned by a previous run), so the first sync
    /// changes only what differs instead of flushing.
    pub fn adopt(programmed: MapContents) -> Self {
        Self { programmed }
    }

    pub fn programmed(&self) -> &MapContents {
        &self.programmed
    }

    /// The map contents `desired` maps to. Ids already programmed are kept for the same backend or
    /// frontend; new ones never reuse an id still programmed, so no in-use id changes meaning.
    pub fn target(&self, desired: &Desired) -> MapContents {
        let existing_backends: BTreeMap<Backend, BackendId> = self
            .programmed
            .backends
            .iter()
            .map(|(id, b)| (*b, *id))
            .collect();
        let mut backend_ids = IdAllocator::new(self.programmed.backends.keys().copied().collect());
        let mut service_ids = IdAllocator::new(
            self.programmed
                .services
                .values()
                .map(|e| e.service_id)
                .collect(),
        );

        let mut target = MapContents::default();
        for backend in desired.backends() {
            let value = backend_value(&backend);
            let id = existing_backends
                .get(&value)
                .copied()
                .unwrap_or_else(|| backend_ids.allocate());
            target.backends.insert(id, value);
        }
        let id_of: BTreeMap<Backend, BackendId> =
            target.backends.iter().map(|(id, b)| (*b, *id)).collect();

        for (frontend, plan) in &desired.frontends {
            let key = service_key(frontend);
            let service_id = match self.programmed.services.get(&key) {
                Some(entry) => entry.service_id,
                None => service_ids.allocate(),
            };
            for (slot, backend) in plan.backends.iter().enumerate() {
                let slot_key = SlotKey {
                    service_id,
                    slot: slot as u32,
                };
                target
                    .slots
                    .insert(slot_key, id_of[&backend_value(backend)]);
            }
            target.services.insert(
                key,
                ServiceEntry {
                    service_id,
                    slot_count: plan.backends.len() as u32,
                    flags: 0,
                    _reserved: 0,
                },
            );
        }
        target
    }

    /// Writes the difference between what is programmed and `desired`.
    pub fn sync(
        &mut self,
        desired: &Desired,
        writer: &mut dyn MapWriter,
    ) -> Result<SyncStats, WriteError> {
        let target = self.target(desired);
        let current = self.programmed.clone();
        let mut w = Tracked {
            writer,
            mirror: &mut self.programmed,
            stats: SyncStats::default(),
        };

        for (id, backend) in &target.backends {
            if current.backends.get(id) != Some(backend) {
                w.put_backend(*id, *backend)?;
            }
        }

        for (key, entry) in &target.services {
            let old = current.services.get(key);
            let old_count = old.map_or(0, |e| e.slot_count);
            let slots_of = |contents: &MapContents, count: u32| {
                (0..count)
                    .map(|slot| SlotKey {
                        service_id: entry.service_id,
                        slot,
                    })
                    .filter_map(|k| contents.slots.get(&k).map(|b| (k, *b)))
                    .collect::<Vec<_>>()
            };
            let shrinking = entry.slot_count < old_count;
            if shrinking {
                w.put_service(*key, *entry)?;
            }
            for (slot_key, backend) in slots_of(&target, entry.slot_count) {
                if current.slots.get(&slot_key) != Some(&backend) {
                    w.put_slot(slot_key, backend)?;
                }
            }
            if !shrinking && old != Some(entry) {
                w.put_service(*key, *entry)?;
            }
            for (slot_key, _) in slots_of(&current, old_count)
                .into_iter()
                .skip(entry.slot_count as usize)
            {
                w.delete_slot(slot_key)?;
            }
        }

        for (key, entry) in &current.services {
            if target.services.contains_key(key) {
                continue;
            }
            w.delete_service(*key)?;
            for slot in 0..entry.slot_count {
                w.delete_slot(SlotKey {
                    service_id: entry.service_id,
                    slot,
                })?;
            }
        }

        // Slots no service claims (e.g. left by an interrupted earlier run).
        let live: BTreeSet<SlotKey> = target.slots.keys().copied().collect();
        for key in current.slots.keys().filter(|k| !live.contains(k)) {
            if w.mirror.slots.contains_key(key) {
                w.delete_slot(*key)?;
            }
        }

        for id in current.backends.keys() {
            if !target.backends.contains_key(id) {
                w.delete_backend(*id)?;
            }
        }
        Ok(w.stats)
    }
}
