//! Service decisions that need only the flow and the maps (no packet access), shared by every
//! entry point, tc and XDP: [`classify`] says what to do with a packet (apply a known flow's
//! entry, start a flow, or why not); a new flow gets its backend, its SNAT and the two conntrack
//! entries that make every later packet of the flow a single lookup. Nothing here counts: what
//! happened is returned, and the entry points record it.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    conntrack::{
        CT_F_REDIRECT, CT_F_SNAT, CT_KIND_FORWARD, CT_KIND_REPLY, CT_S_CLOSING, CT_S_FIN_REPLY,
        CT_S_RST, CtEntry, FlowKey, timeout_s,
    },
    hash::{flow_hash, slot_for},
    service::{
        ANY_SOURCE, AffinityKey, AffinityValue, BACKEND_F_DRAINING, BACKEND_F_REMOTE, Backend,
        BackendId, SERVICE_F_NODE_ADDRESS, SERVICE_F_REJECT, ServiceEntry, ServiceKey,
    },
    stats::{ORIGIN_EXTERNAL, ORIGIN_HOST, ORIGIN_POD},
};

use crate::{
    conntrack,
    family::Family,
    headers::{TCP_FLAG_ACK, TCP_FLAG_SYN},
    maps::{NewFlowScratch, lookup, lookup_lru, node_config, slot},
    stats::Attributed,
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

impl Origin {
    /// The `stats::ORIGIN_*` code the monitor reports.
    #[inline(always)]
    pub const fn code(self) -> u8 {
        match self {
            Origin::Pod => ORIGIN_POD,
            Origin::External => ORIGIN_EXTERNAL,
            Origin::Host => ORIGIN_HOST,
        }
    }

    /// The origin of [`Origin::code`] `code`.
    #[inline(always)]
    pub const fn from_code(code: u8) -> Self {
        match code {
            ORIGIN_EXTERNAL => Origin::External,
            ORIGIN_HOST => Origin::Host,
            _ => Origin::Pod,
        }
    }
}

/// Which flows a program handles.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every flow (tc).
    Every,
    /// Only flows the program may send on itself (XDP): a known DNAT-only flow is tc's to handle
    /// whole, and its entry is left untouched, so each packet is recorded (and checked) once.
    RedirectedOnly,
}

/// What to do with a packet of `flow`.
pub enum Action<A> {
    /// Rewrite it by this entry: a known flow's, or the new flow's just recorded.
    Translate(CtEntry<A>),
    /// Not to a Service frontend, and no flow of ours.
    NotAService,
    /// A known flow outside the program's [`Scope`].
    OutOfScope,
    /// A new flow needed SNAT and found no address or port.
    SnatFailed,
    /// A new flow to a frontend without usable backends; `reject`: answer it (kube-proxy's
    /// REJECT) rather than drop it.
    NoBackend { reject: bool },
    /// A new flow from a client outside the frontend's source ranges: dropped.
    Denied,
    /// A new flow to a frontend ([`FlowEvents::service_id`]), for the next stage to start
    /// ([`FlowStart::NextStage`]).
    StartFlow,
}

/// What happened to a packet's flow on the way to its [`Action`].
#[derive(Clone, Copy, Default)]
pub struct FlowEvents {
    /// Its backend left (or, for UDP, drains): balanced afresh.
    pub rebalanced: bool,
    /// Its reply tuple was another live flow's: its source port was remapped.
    pub port_remapped: bool,
    /// The packet started its flow (a backend was chosen).
    pub new_flow: bool,
    /// The frontend a new flow was for, translated or not (0: none was found).
    pub service_id: u32,
}

impl FlowEvents {
    pub const NONE: Self = Self {
        rebalanced: false,
        port_remapped: false,
        new_flow: false,
        service_id: 0,
    };
}

/// An [`Action`] and what happened to the flow on the way.
pub struct Decision<A> {
    pub action: Action<A>,
    pub events: FlowEvents,
}

impl<A: Family> Decision<A> {
    /// The Service traffic this packet is, for the per-Service counters: a translated packet
    /// (its entry names frontend and backend) or a refused new flow (its frontend only).
    #[inline(always)]
    pub fn attributed(&self, flow: &FlowKey<A>, origin: Origin) -> Option<Attributed<A>> {
        let ct = match &self.action {
            Action::Translate(ct) => *ct,
            Action::SnatFailed | Action::NoBackend { .. } | Action::Denied => CtEntry {
                service_id: self.events.service_id,
                ..CtEntry::ZERO
            },
            Action::NotAService | Action::OutOfScope | Action::StartFlow => return None,
        };
        Some(Attributed {
            flow: *flow,
            ct,
            new_flow: self.events.new_flow,
            origin: origin.code(),
        })
    }
}

/// Where a flow a packet starts is set up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FlowStart {
    /// In this program (IPv4: its working set fits one stack).
    Here,
    /// In the next stage ([`Action::StartFlow`]), which calls [`start_flow`] with a fresh stack.
    NextStage,
}

/// The one decision every entry point makes: conntrack first, then the Service frontend.
#[inline(always)]
pub fn classify<A: Family>(
    flow: &FlowKey<A>,
    tcp_flags: u8,
    origin: Origin,
    scope: Scope,
    start: FlowStart,
) -> Decision<A> {
    let mut events = FlowEvents::NONE;
    let action = decide(flow, tcp_flags, origin, scope, start, &mut events);
    Decision { action, events }
}

#[inline(always)]
fn decide<A: Family>(
    flow: &FlowKey<A>,
    tcp_flags: u8,
    origin: Origin,
    scope: Scope,
    start: FlowStart,
    events: &mut FlowEvents,
) -> Action<A> {
    let known = conntrack::lookup(flow);
    if scope == Scope::RedirectedOnly && known.is_some_and(|ct| ct.flags & CT_F_REDIRECT == 0) {
        return Action::OutOfScope;
    }
    if let Some(ct) = known.and_then(|found| established_entry(flow, found, tcp_flags, events)) {
        return Action::Translate(ct);
    }
    let frontend = ServiceKey::new(flow.daddr_be, flow.dport_be, flow.proto);
    let Some(service) = lookup(A::services(), &frontend) else {
        return Action::NotAService;
    };
    events.service_id = service.service_id;
    match start {
        FlowStart::Here => admit(flow, &service, origin, events),
        FlowStart::NextStage => Action::StartFlow,
    }
}

/// The new-flow stage's decision: the packet's frontend is looked up again (the stage before
/// found it), and its flow started.
#[inline(always)]
pub fn start_flow<A: Family>(flow: &FlowKey<A>, origin: Origin) -> Decision<A> {
    let mut events = FlowEvents::NONE;
    let frontend = ServiceKey::new(flow.daddr_be, flow.dport_be, flow.proto);
    let action = match lookup(A::services(), &frontend) {
        Some(service) => {
            events.service_id = service.service_id;
            admit(flow, &service, origin, &mut events)
        }
        // Gone between the stages (user space deleted it): as if it had not been found.
        None => Action::NotAService,
    };
    Decision { action, events }
}

/// A new flow to `service`: checked against its source ranges, then started.
#[inline(always)]
fn admit<A: Family>(
    flow: &FlowKey<A>,
    service: &ServiceEntry,
    origin: Origin,
    events: &mut FlowEvents,
) -> Action<A> {
    // Only new flows are checked, as kube-proxy's firewall chain sees only a flow's first
    // packet: a flow admitted before its ranges changed keeps going.
    if service.source_ranges_id != ANY_SOURCE
        && !A::source_allowed(service.source_ranges_id, flow.saddr_be)
    {
        return Action::Denied;
    }
    match new_flow(flow, service, origin, events) {
        Ok(forward) => {
            events.new_flow = true;
            Action::Translate(forward)
        }
        Err(NoFlow::SnatFailed) => Action::SnatFailed,
        Err(NoFlow::NoBackend) => Action::NoBackend {
            reject: service.flags & SERVICE_F_REJECT != 0,
        },
    }
}

/// Why a new flow was not translated.
enum NoFlow {
    /// The frontend has no backend (or its table is mid-update).
    NoBackend,
    /// SNAT was needed but no node address is set or every tried port was taken.
    SnatFailed,
}

/// How many SNAT ports a new flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// The conntrack entry to apply to a packet of a known, live flow (`found` for it), with the
/// packet recorded in it; `None` when the packet starts a flow: a dead flow, a TCP SYN reusing a
/// closed connection's tuple (or a backend's SYN-ACK after it closed the flow: it answers a new
/// connection, no flow of this node), or a flow whose backend left (for UDP: also one that
/// drains).
#[inline(always)]
fn established_entry<A: Family>(
    flow: &FlowKey<A>,
    found: CtEntry<A>,
    tcp_flags: u8,
    events: &mut FlowEvents,
) -> Option<CtEntry<A>> {
    let (entry, now) = conntrack::live(flow, found)?;
    // A SYN-ACK from a backend that already closed (FIN or RST) its side of this flow answers
    // a new connection reusing the tuple (e.g. the client port went to another Service whose
    // backend is this one, through another node). The old flow is over; rewriting the answer by
    // its entry would send it to the client from the wrong address. (After the client's FIN
    // alone, a SYN-ACK may still be the old handshake's retransmission: it is translated.)
    let handshake_answer = flow.proto == IPPROTO_TCP
        && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK;
    let backend_closed = entry.state & (CT_S_FIN_REPLY | CT_S_RST) != 0;
    if entry.kind == CT_KIND_REPLY && handshake_answer && backend_closed {
        conntrack::remove(flow);
        conntrack::remove_partner(flow, &entry);
        return None;
    }
    if entry.kind == CT_KIND_FORWARD {
        let new_syn = flow.proto == IPPROTO_TCP
            && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
            && entry.state & CT_S_CLOSING != 0;
        if new_syn {
            conntrack::remove_partner(flow, &entry);
            return None;
        }
        if !backend_usable(&entry, flow.proto) {
            events.rebalanced = true;
            conntrack::remove_partner(flow, &entry);
            return None;
        }
    }
    Some(conntrack::seen(flow, &entry, tcp_flags, now))
}

/// Whether a forward entry's backend is still the one it names, and may keep this flow.
#[inline(always)]
fn backend_usable<A: Family>(entry: &CtEntry<A>, proto: u8) -> bool {
    match lookup(A::backends(), &entry.backend_id) {
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
fn new_flow<A: Family>(
    flow: &FlowKey<A>,
    service: &ServiceEntry,
    origin: Origin,
    events: &mut FlowEvents,
) -> Result<CtEntry<A>, NoFlow> {
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
    let Some(ws) = A::new_flow_scratch() else {
        // Never: the array has its one entry on every CPU.
        return Err(NoFlow::SnatFailed);
    };
    // SAFETY: this CPU's entry, valid and this run's alone for the whole run (`maps`).
    let ws = unsafe { &mut *ws };
    let now = conntrack::now_s();
    let expires_s = now.saturating_add(timeout_s(flow.proto, 0, &conntrack::timeouts()));
    ws.reply = CtEntry {
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
        ws.reply.flags |= CT_F_SNAT;
        let snat_addr = A::snat_addr();
        if snat_addr == A::UNSPECIFIED {
            return Err(NoFlow::SnatFailed);
        }
        claim_port(flow, snat_addr, &backend, ws, now)?
    } else {
        ws.reply_key = FlowKey::new(
            backend.addr_be,
            flow.saddr_be,
            backend.port_be,
            flow.sport_be,
            flow.proto,
        );
        if conntrack::claim_reply(ws, flow, now).is_ok() {
            (flow.saddr_be, flow.sport_be)
        } else {
            // The same client port already talks to this backend through another Service:
            // both flows would share one reply tuple. Give this one another source port.
            events.port_remapped = true;
            ws.reply.flags |= CT_F_SNAT;
            claim_port(flow, flow.saddr_be, &backend, ws, now)?
        }
    };
    // After SNAT the source is a node address; from the host the packet is past routing already:
    // either way it must be sent on by a FIB lookup.
    let forward_redirect = if snat || origin == Origin::Host {
        CT_F_REDIRECT
    } else {
        0
    };
    ws.forward = CtEntry {
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
    let _ = conntrack::insert_forward(flow, &ws.forward);
    Ok(ws.forward)
}

/// Finds a free source port in the SNAT range for `src_addr_be` (the node's SNAT address, or the
/// client's own when only its port must change) towards `backend`, and records the reply entry
/// (`ws.reply`) on it.
#[inline(always)]
fn claim_port<A: Family>(
    flow: &FlowKey<A>,
    src_addr_be: A,
    backend: &Backend<A>,
    ws: &mut NewFlowScratch<A>,
    now: u32,
) -> Result<(A, u16), NoFlow> {
    let node = node_config();
    if node.snat_port_last < node.snat_port_first || node.snat_port_first == 0 {
        return Err(NoFlow::SnatFailed);
    }
    let range = (node.snat_port_last - node.snat_port_first) as u32 + 1;
    let start = flow_hash(flow);
    for attempt in 0..SNAT_TRIES {
        let port = node.snat_port_first + ((start.wrapping_add(attempt)) % range) as u16;
        let port_be = port.to_be();
        ws.reply_key = FlowKey::new(
            backend.addr_be,
            src_addr_be,
            backend.port_be,
            port_be,
            flow.proto,
        );
        if conntrack::claim_reply(ws, flow, now).is_ok() {
            return Ok((src_addr_be, port_be));
        }
    }
    Err(NoFlow::SnatFailed)
}

/// The client's remembered backend (session affinity) if still fresh, else the Maglev slot.
#[inline(always)]
fn choose_backend<A: Family>(
    flow: &FlowKey<A>,
    service: &ServiceEntry,
) -> Option<(BackendId, Backend<A>)> {
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
    let remembered = lookup_lru(A::affinity(), &key)
        .filter(|a| now.wrapping_sub(a.last_used_ns) < timeout_ns)
        .and_then(|a| Some((a.backend_id, lookup(A::backends(), &a.backend_id)?)))
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
    let _ = A::affinity().insert(&key, &value, 0);
    Some(chosen)
}

#[inline(always)]
fn maglev<A: Family>(flow: &FlowKey<A>, service: &ServiceEntry) -> Option<(BackendId, Backend<A>)> {
    // A missing slot or backend means user space is mid-update; treat it as no backend rather
    // than guess.
    let id = slot(service.table_offset + slot_for(flow, service.table_size))?;
    Some((id, lookup(A::backends(), &id)?))
}
