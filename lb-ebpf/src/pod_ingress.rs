//! What happens to a packet entering the node from a pod: service translation or reverse NAT.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    conntrack::FlowKey,
    counters::Counter,
    hash::slot_for,
    service::{ServiceKey, SlotKey},
};

use crate::{
    conntrack,
    headers::{self, NotHandled, Packet},
    maps::{LB_BACKENDS, LB_SERVICES, LB_SLOTS, lookup},
    nat::{self, End},
};

/// The verdict for the kernel and the counter that records why.
pub struct Outcome {
    pub verdict: i32,
    pub counter: Counter,
}

const fn pass(counter: Counter) -> Outcome {
    Outcome {
        verdict: TC_ACT_OK as i32,
        counter,
    }
}

const fn shoot(counter: Counter) -> Outcome {
    Outcome {
        verdict: TC_ACT_SHOT as i32,
        counter,
    }
}

#[inline(always)]
pub fn process(ctx: &TcContext) -> Outcome {
    let pkt = match headers::parse(ctx) {
        Ok(pkt) => pkt,
        Err(NotHandled::Pass) => return pass(Counter::Passed),
        Err(NotHandled::Malformed) => return pass(Counter::Malformed),
    };
    let flow = FlowKey::new(
        pkt.saddr_be,
        pkt.daddr_be,
        pkt.sport_be,
        pkt.dport_be,
        pkt.proto,
    );
    let frontend = ServiceKey::new(pkt.daddr_be, pkt.dport_be, pkt.proto);
    if let Some(service) = lookup(&LB_SERVICES, &frontend) {
        return to_service(ctx, &pkt, &flow, service.service_id, service.slot_count);
    }
    if let Some(ct) = conntrack::reply(&flow) {
        return match nat::rewrite(ctx, &pkt, End::Source, ct.nat_addr_be, ct.nat_port_be) {
            Ok(()) => pass(Counter::ReverseTranslated),
            Err(_) => pass(Counter::Malformed),
        };
    }
    pass(Counter::Passed)
}

/// A client -> service packet: keep an existing flow on its backend, or pick one for a new flow.
#[inline(always)]
fn to_service(
    ctx: &TcContext,
    pkt: &Packet,
    flow: &FlowKey,
    service_id: u32,
    slot_count: u32,
) -> Outcome {
    let (addr_be, port_be) = match conntrack::forward(flow) {
        Some(ct) => (ct.nat_addr_be, ct.nat_port_be),
        None => {
            if slot_count == 0 {
                return shoot(Counter::DroppedNoBackend);
            }
            let slot = SlotKey {
                service_id,
                slot: slot_for(flow, slot_count),
            };
            // A missing slot or backend means user space is mid-update of a shrinking table;
            // treat it like no backend rather than guess.
            let Some(backend_id) = lookup(&LB_SLOTS, &slot) else {
                return shoot(Counter::DroppedNoBackend);
            };
            let Some(backend) = lookup(&LB_BACKENDS, &backend_id) else {
                return shoot(Counter::DroppedNoBackend);
            };
            // If the conntrack is full the LRU evicts; an insert error leaves this packet translated
            // but unrecorded, and the next packet hashes to the same slot anyway.
            let _ = conntrack::create(
                flow,
                service_id,
                backend_id,
                backend.addr_be,
                backend.port_be,
            );
            (backend.addr_be, backend.port_be)
        }
    };
    match nat::rewrite(ctx, pkt, End::Destination, addr_be, port_be) {
        Ok(()) => pass(Counter::Translated),
        Err(_) => pass(Counter::Malformed),
    }
}
