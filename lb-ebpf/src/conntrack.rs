//! Conntrack reads and the one write the packet path makes: recording a new flow's backend.

use lb_common::conntrack::{CT_KIND_FORWARD, CT_KIND_REPLY, CtEntry, FlowKey};

use crate::maps::{LB_CONNTRACK, lookup_ct};

/// The backend an existing client -> service flow was pinned to.
#[inline(always)]
pub fn forward(flow: &FlowKey) -> Option<CtEntry> {
    lookup_ct(flow).filter(|ct| ct.kind == CT_KIND_FORWARD)
}

/// The service address a backend -> client reply must appear to come from.
#[inline(always)]
pub fn reply(flow: &FlowKey) -> Option<CtEntry> {
    lookup_ct(flow).filter(|ct| ct.kind == CT_KIND_REPLY)
}

/// Records both directions of a new flow from `flow` (client -> service) to the backend.
/// The reply entry is written first so a backend's answer is never seen before it can be reversed.
#[inline(always)]
pub fn create(
    flow: &FlowKey,
    service_id: u32,
    backend_id: u32,
    backend_addr_be: u32,
    backend_port_be: u16,
) -> Result<(), i32> {
    let reply_key = FlowKey::new(
        backend_addr_be,
        flow.saddr_be,
        backend_port_be,
        flow.sport_be,
        flow.proto,
    );
    let reply = CtEntry {
        nat_addr_be: flow.daddr_be,
        nat_port_be: flow.dport_be,
        kind: CT_KIND_REPLY,
        _pad: 0,
        service_id,
        backend_id,
    };
    LB_CONNTRACK.insert(&reply_key, &reply, 0)?;
    let forward = CtEntry {
        nat_addr_be: backend_addr_be,
        nat_port_be: backend_port_be,
        kind: CT_KIND_FORWARD,
        _pad: 0,
        service_id,
        backend_id,
    };
    LB_CONNTRACK.insert(flow, &forward, 0)
}
