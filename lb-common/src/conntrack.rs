//! The BPF conntrack: one LRU hash holding both directions of every translated flow.
//!
//! A new flow to a service writes two entries: the client's tuple (`CT_KIND_FORWARD`) and the
//! backend's reply tuple (`CT_KIND_REPLY`), each saying what the packet must become. A DNAT-only
//! flow rewrites the destination one way and the source back; a SNATed flow rewrites both ends
//! both ways.

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

/// A client -> service packet (the first direction of a flow).
pub const CT_KIND_FORWARD: u8 = 1;
/// A backend -> client reply.
pub const CT_KIND_REPLY: u8 = 2;

/// After rewriting, the packet's source is a node address (SNAT, or a reply from a NodePort):
/// it is sent on with a FIB lookup and redirect instead of through the stack, which would drop a
/// packet arriving with a local source address as spoofed.
pub const CT_F_REDIRECT: u8 = 1 << 0;
/// The flow was SNATed: the reply entry holds the SNAT port, freed with the flow.
pub const CT_F_SNAT: u8 = 1 << 1;

/// How to rewrite every packet matching a [`FlowKey`]: its addresses and ports become these
/// (unchanged ones are simply equal to the packet's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub new_saddr_be: u32,
    pub new_daddr_be: u32,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    /// `CT_KIND_FORWARD` or `CT_KIND_REPLY`.
    pub kind: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    pub _pad: u16,
    /// The frontend the flow was translated for.
    pub service_id: u32,
    /// The backend chosen when the flow started.
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 24);

user_pod!(FlowKey, CtEntry);
