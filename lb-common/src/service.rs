//! Service frontends, their backend slot tables, and backends.
//!
//! A lookup on the packet path goes `ServiceKey -> ServiceEntry`, then
//! `SlotKey { service_id, flow_hash % slot_count } -> BackendId`, then `BackendId -> Backend`.
//! User space decides what every slot holds; the packet path only reads.

use crate::user_pod;

/// A frontend: the address, port and protocol a client sends to (e.g. a ClusterIP port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

impl ServiceKey {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            proto,
            _pad: 0,
        }
    }
}

/// What a frontend translates to. Written last when a service is added and first when it shrinks,
/// so the packet path never sees a slot count that points past written slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    /// Identifies this frontend's slot table; also the key for future reverse-NAT lookups.
    pub service_id: u32,
    /// Number of slots in the table; 0 means the service has no backends.
    pub slot_count: u32,
    /// Reserved for per-service behaviour bits (`SERVICE_FLAG_*`); none are defined yet.
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 16);

/// One slot of a service's backend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// Index of a backend in the backends map; a slot's value.
pub type BackendId = u32;

/// A backend endpoint: pod IP and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

impl Backend {
    pub const fn new(addr_be: u32, port_be: u16) -> Self {
        Self {
            addr_be,
            port_be,
            _pad: 0,
        }
    }
}

user_pod!(ServiceKey, ServiceEntry, SlotKey, Backend);
