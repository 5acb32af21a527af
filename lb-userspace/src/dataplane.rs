//! Writing the data-plane maps: a [`MapWriter`] trait with the BPF-backed implementation
//! ([`BpfMaps`]) and an in-memory one ([`MapContents`]) that unit tests diff against.

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use lb_common::{
    counters::Counter,
    service::{Backend, BackendId, ServiceEntry, ServiceKey, SlotKey},
};

#[derive(Debug, thiserror::Error)]
#[error("failed to {op} {map} entry {key}")]
pub struct WriteError {
    pub op: &'static str,
    pub map: &'static str,
    pub key: String,
    #[source]
    pub source: Box<MapError>,
}

/// The operations the sync needs; each is one map write.
pub trait MapWriter {
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError>;
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError>;
    fn put_slot(&mut self, key: SlotKey, backend: BackendId) -> Result<(), WriteError>;
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), WriteError>;
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError>;
}

/// The full contents of the service maps: what user space believes is programmed. Also the
/// in-memory [`MapWriter`] used by tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
    pub slots: BTreeMap<SlotKey, BackendId>,
    pub backends: BTreeMap<BackendId, Backend>,
}

impl MapWriter for MapContents {
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
        self.backends.insert(id, backend);
        Ok(())
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_slot(&mut self, key: SlotKey, backend: BackendId) -> Result<(), WriteError> {
        self.slots.insert(key, backend);
        Ok(())
    }
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), WriteError> {
        self.slots.remove(&key);
        Ok(())
    }
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.services.insert(key, entry);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        self.services.remove(&key);
        Ok(())
    }
}

/// The real maps, as loaded (and pinned) by the loader.
pub struct BpfMaps {
    pub services: BpfHashMap<MapData, ServiceKey, ServiceEntry>,
    pub slots: BpfHashMap<MapData, SlotKey, BackendId>,
    pub backends: BpfHashMap<MapData, BackendId, Backend>,
    pub counters: PerCpuArray<MapData, u64>,
}

fn write_err(
    op: &'static str,
    map: &'static str,
    key: impl std::fmt::Debug,
) -> impl FnOnce(MapError) -> WriteError {
    move |source| WriteError {
        op,
        map,
        key: format!("{key:?}"),
        source: Box::new(source),
    }
}

/// Deleting what is already gone is fine: the goal state is reached.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl BpfMaps {
    /// Reads back everything programmed, e.g. maps adopted from a previous run.
    pub fn read_contents(&self) -> Result<MapContents, MapError> {
        Ok(MapContents {
            services: self.services.iter().collect::<Result<_, _>>()?,
            slots: self.slots.iter().collect::<Result<_, _>>()?,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
        })
    }

    /// Each counter summed over all CPUs.
    pub fn read_counters(&self) -> Result<BTreeMap<Counter, u64>, MapError> {
        let mut totals = BTreeMap::new();
        for counter in Counter::ALL {
            let per_cpu = self.counters.get(&(counter as u32), 0)?;
            totals.insert(counter, per_cpu.iter().sum());
        }
        Ok(totals)
    }
}

impl MapWriter for BpfMaps {
    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
        self.backends.insert(id, backend, 0).map_err(write_err(
            "write",
            lb_common::maps::BACKENDS_MAP,
            id,
        ))
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        ignore_missing(self.backends.remove(&id)).map_err(write_err(
            "delete",
            lb_common::maps::BACKENDS_MAP,
            id,
        ))
    }
    fn put_slot(&mut self, key: SlotKey, backend: BackendId) -> Result<(), WriteError> {
        self.slots.insert(key, backend, 0).map_err(write_err(
            "write",
            lb_common::maps::SLOTS_MAP,
            key,
        ))
    }
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), WriteError> {
        ignore_missing(self.slots.remove(&key)).map_err(write_err(
            "delete",
            lb_common::maps::SLOTS_MAP,
            key,
        ))
    }
    fn put_service(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<(), WriteError> {
        self.services.insert(key, entry, 0).map_err(write_err(
            "write",
            lb_common::maps::SERVICES_MAP,
            key,
        ))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        ignore_missing(self.services.remove(&key)).map_err(write_err(
            "delete",
            lb_common::maps::SERVICES_MAP,
            key,
        ))
    }
}
