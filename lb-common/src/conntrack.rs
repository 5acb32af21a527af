//! The BPF conntrack: one LRU hash holding both directions of every translated flow.
//!
//! A new flow to a service writes two entries: the client's tuple (`CT_KIND_FORWARD`, says which
//! backend to rewrite the destination to) and the backend's reply tuple (`CT_KIND_REPLY`, says
//! which service address to rewrite the source back to).

use crate::user_pod;

/// A flow's 5-tuple as seen on the wire, in the direction the packet travels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    pub const fn new(
        saddr_be: u32,
        daddr_be: u32,
        sport_be: u16,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        Self {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }

    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.daddr_be,
            self.saddr_be,
            self.dport_be,
            self.sport_be,
            self.proto,
        )
    }
}

/// Client -> service packet: rewrite the destination to `nat_addr_be:nat_port_be` (the backend).
pub const CT_KIND_FORWARD: u8 = 1;
/// Backend -> client packet: rewrite the source to `nat_addr_be:nat_port_be` (the service).
pub const CT_KIND_REPLY: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    /// `CT_KIND_FORWARD` or `CT_KIND_REPLY`.
    pub kind: u8,
    pub _pad: u8,
    /// The service the flow was translated for.
    pub service_id: u32,
    /// The backend chosen when the flow started.
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 16);

user_pod!(FlowKey, CtEntry);
