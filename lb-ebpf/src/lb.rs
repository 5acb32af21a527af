//! Service decisions that need only the flow and the maps (no packet access), shared by every
//! entry point: which backend a new flow gets, whether it is SNATed, and the two conntrack
//! entries that make every later packet of the flow a single lookup.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    conntrack::{
        CT_F_REDIRECT, CT_F_SNAT, CT_KIND_FORWARD, CT_KIND_REPLY, CT_S_CLOSING, CtEntry, FlowKey,
        timeout_s,
    },
    counters::Counter,
    hash::{flow_hash, slot_for},
    service::{
        AffinityKey, AffinityValue, BACKEND_F_DRAINING, BACKEND_F_REMOTE, Backend, BackendId,
        SERVICE_F_NODE_ADDRESS, ServiceEntry,
    },
};

use crate::{
    conntrack,
    headers::{TCP_FLAG_ACK, TCP_FLAG_SYN},
    maps::{LB_AFFINITY, LB_BACKENDS, count, lookup, lookup_lru, node_config, slot},
};

/// Where the packet entered the node's networking.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a local pod (tc ingress on its veth).
    Pod,
    /// From the network (tc or XDP ingress on an external device).
    External,
    /// From a process in the node's own network namespace (tc egress on an external device).
    Host,
}

/// Why a new flow was not translated.
pub enum NoFlow {
    /// The frontend has no backend (or its table is mid-update).
    NoBackend,
    /// SNAT was needed but no node address is set or every tried port was taken.
    SnatFailed,
}

/// How many SNAT ports a new flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// The conntrack entry to apply to a packet of a known, live flow, with the packet recorded in
/// it; `None` when the packet starts a flow: no entry, a dead flow, a TCP SYN reusing a closed
/// connection's tuple, or a flow whose backend left (for UDP: also one that drains).
#[inline(always)]
pub fn established(flow: &FlowKey, tcp_flags: u8) -> Option<CtEntry> {
    established_entry(flow, conntrack::lookup(flow)?, tcp_flags)
}

/// [`established`] for an entry already looked up.
#[inline(always)]
pub fn established_entry(flow: &FlowKey, found: CtEntry, tcp_flags: u8) -> Option<CtEntry> {
    let (entry, now) = conntrack::live(flow, found)?;
    if entry.kind == CT_KIND_FORWARD {
        let new_syn = flow.proto == IPPROTO_TCP
            && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
            && entry.state & CT_S_CLOSING != 0;
        if new_syn {
            conntrack::remove_partner(flow, &entry);
            return None;
        }
        if !backend_usable(&entry, flow.proto) {
            count(Counter::Rebalanced);
            conntrack::remove_partner(flow, &entry);
            return None;
        }
    }
    Some(conntrack::seen(flow, &entry, tcp_flags, now))
}

/// Whether a forward entry's backend is still the one it names, and may keep this flow.
#[inline(always)]
fn backend_usable(entry: &CtEntry, proto: u8) -> bool {
    match lookup(&LB_BACKENDS, &entry.backend_id) {
        Some(b) => {
            b.addr_be == entry.new_daddr_be
                && b.port_be == entry.new_dport_be
                && !(proto == IPPROTO_UDP && b.flags & BACKEND_F_DRAINING != 0)
        }
        None => false,
    }
}

/// Starts a flow to `service`: picks its backend, SNATs if needed, records both directions in
/// the conntrack and returns the forward entry to apply to this packet.
#[inline(always)]
pub fn new_flow(flow: &FlowKey, service: &ServiceEntry, origin: Origin) -> Result<CtEntry, NoFlow> {
    let (backend_id, backend) = choose_backend(flow, service).ok_or(NoFlow::NoBackend)?;
    // From outside, a remote backend would answer the client directly, bypassing this node's
    // reverse translation: SNAT makes the reply come back here. A pod reaching itself through the
    // Service (hairpin) would see a packet from its own address, which it drops: SNAT too.
    let snat = match origin {
        Origin::External => backend.flags & BACKEND_F_REMOTE != 0,
        Origin::Pod => backend.addr_be == flow.saddr_be,
        Origin::Host => false,
    };
    let reply_redirect = if service.flags & SERVICE_F_NODE_ADDRESS != 0 && origin != Origin::Host {
        CT_F_REDIRECT
    } else {
        0
    };
    let now = conntrack::now_s();
    let expires_s = now.saturating_add(timeout_s(flow.proto, 0, &conntrack::timeouts()));
    let mut reply = CtEntry {
        new_saddr_be: flow.daddr_be,
        new_daddr_be: flow.saddr_be,
        new_sport_be: flow.dport_be,
        new_dport_be: flow.sport_be,
        kind: CT_KIND_REPLY,
        flags: reply_redirect,
        state: 0,
        _pad: 0,
        service_id: service.service_id,
        backend_id,
        created_s: now,
        expires_s,
    };
    let (src_addr_be, src_port_be) = if snat {
        reply.flags |= CT_F_SNAT;
        let node = node_config();
        if node.snat_addr_be == 0 {
            return Err(NoFlow::SnatFailed);
        }
        claim_port(flow, node.snat_addr_be, &backend, &reply, now)?
    } else {
        let reply_key = FlowKey::new(
            backend.addr_be,
            flow.saddr_be,
            backend.port_be,
            flow.sport_be,
            flow.proto,
        );
        if conntrack::claim_reply(&reply_key, &reply, flow, now).is_ok() {
            (flow.saddr_be, flow.sport_be)
        } else {
            // The same client port already talks to this backend through another Service:
            // both flows would share one reply tuple. Give this one another source port.
            count(Counter::PortRemapped);
            reply.flags |= CT_F_SNAT;
            claim_port(flow, flow.saddr_be, &backend, &reply, now)?
        }
    };
    // After SNAT the source is a node address; from the host the packet is past routing already:
    // either way it must be sent on by a FIB lookup.
    let forward_redirect = if snat || origin == Origin::Host {
        CT_F_REDIRECT
    } else {
        0
    };
    let forward = CtEntry {
        new_saddr_be: src_addr_be,
        new_daddr_be: backend.addr_be,
        new_sport_be: src_port_be,
        new_dport_be: backend.port_be,
        kind: CT_KIND_FORWARD,
        flags: forward_redirect | if snat { CT_F_SNAT } else { 0 },
        state: 0,
        _pad: 0,
        service_id: service.service_id,
        backend_id,
        created_s: now,
        expires_s,
    };
    let _ = conntrack::insert_forward(flow, &forward);
    Ok(forward)
}

/// Finds a free source port in the SNAT range for `src_addr_be` (the node's SNAT address, or the
/// client's own when only its port must change) towards `backend`, and records the reply entry
/// on it.
#[inline(always)]
fn claim_port(
    flow: &FlowKey,
    src_addr_be: u32,
    backend: &Backend,
    reply: &CtEntry,
    now: u32,
) -> Result<(u32, u16), NoFlow> {
    let node = node_config();
    if node.snat_port_last < node.snat_port_first || node.snat_port_first == 0 {
        return Err(NoFlow::SnatFailed);
    }
    let range = (node.snat_port_last - node.snat_port_first) as u32 + 1;
    let start = flow_hash(flow);
    for attempt in 0..SNAT_TRIES {
        let port = node.snat_port_first + ((start.wrapping_add(attempt)) % range) as u16;
        let port_be = port.to_be();
        let reply_key = FlowKey::new(
            backend.addr_be,
            src_addr_be,
            backend.port_be,
            port_be,
            flow.proto,
        );
        if conntrack::claim_reply(&reply_key, reply, flow, now).is_ok() {
            return Ok((src_addr_be, port_be));
        }
    }
    Err(NoFlow::SnatFailed)
}

/// The client's remembered backend (session affinity) if still fresh, else the Maglev slot.
#[inline(always)]
fn choose_backend(flow: &FlowKey, service: &ServiceEntry) -> Option<(BackendId, Backend)> {
    if service.table_size == 0 {
        return None;
    }
    if service.affinity_timeout_s == 0 {
        return maglev(flow, service);
    }
    let key = AffinityKey {
        service_id: service.service_id,
        client_addr_be: flow.saddr_be,
    };
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = service.affinity_timeout_s as u64 * 1_000_000_000;
    let remembered = lookup_lru(&LB_AFFINITY, &key)
        .filter(|a| now.wrapping_sub(a.last_used_ns) < timeout_ns)
        .and_then(|a| Some((a.backend_id, lookup(&LB_BACKENDS, &a.backend_id)?)))
        // A draining backend takes no new flows, remembered or not.
        .filter(|(_, b)| b.flags & BACKEND_F_DRAINING == 0);
    let chosen = match remembered {
        Some(found) => found,
        None => maglev(flow, service)?,
    };
    // Refreshed on every new flow, as kube-proxy's `recent` match does: the timeout counts from
    // the client's last new connection.
    let value = AffinityValue {
        backend_id: chosen.0,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = LB_AFFINITY.insert(&key, &value, 0);
    Some(chosen)
}

#[inline(always)]
fn maglev(flow: &FlowKey, service: &ServiceEntry) -> Option<(BackendId, Backend)> {
    // A missing slot or backend means user space is mid-update; treat it as no backend rather
    // than guess.
    let id = slot(service.table_offset + slot_for(flow, service.table_size))?;
    Some((id, lookup(&LB_BACKENDS, &id)?))
}
