//! The XDP fast path on external interfaces (`lb agent --xdp`): flows that must leave by the
//! interface they came in on after SNAT or reverse SNAT (NodePort/LoadBalancer/externalIP traffic
//! to and from backends on other nodes) are rewritten and sent back out with XDP_TX, before the
//! kernel allocates an skb. Everything else is passed untouched to the tc programs, which handle
//! every case: XDP only ever makes a packet faster, never different.
//!
//! It shares every layer with tc: the parser, [`lb::classify`], the FIB lookup and the rewrite.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    Ip6,
    conntrack::{CT_F_REDIRECT, CT_KIND_FORWARD},
    counters::Counter,
};

use crate::{
    family::Family,
    fib::{self, Route},
    headers::{self, IpVersion, Packet, Parse, Parsed},
    lb::{self, Action, FlowEvents, FlowStart, Origin, Scope},
    nat,
    outcome::Outcome,
    stages,
};

const PASS: u32 = xdp_action::XDP_PASS;

/// Handles one frame of `bytes`, records its outcome and returns the verdict. IPv6 goes on to
/// its stage (`stages`).
#[inline(always)]
pub fn process(ctx: &XdpContext, bytes: u64) -> u32 {
    match headers::ip_version(ctx) {
        Ok(IpVersion::V4) => process_family::<u32>(ctx, FlowStart::Here).record(bytes),
        Ok(IpVersion::V6) => {
            stages::xdp_ipv6(ctx);
            // No stage to run: tc handles (and counts) the packet.
            PASS
        }
        Err(_) => PASS,
    }
}

/// The IPv6 stage: known flows only; a new flow is tc's to start.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    process_family::<Ip6>(ctx, FlowStart::NextStage).record(bytes)
}

#[inline(always)]
fn process_family<A: Parse>(ctx: &XdpContext, start: FlowStart) -> Outcome<u32, A> {
    match A::parse(ctx) {
        Ok(Parsed::Flow(pkt)) => flow(ctx, &pkt, start),
        // Anything not a TCP/UDP flow (ICMP errors included) is tc's, and tc counts it.
        _ => Outcome::uncounted(PASS),
    }
}

#[inline(always)]
fn flow<A: Family>(ctx: &XdpContext, pkt: &Packet<A>, start: FlowStart) -> Outcome<u32, A> {
    let flow = pkt.flow();
    let decision = lb::classify(
        &flow,
        pkt.tcp_flags,
        Origin::External,
        Scope::RedirectedOnly,
        start,
    );
    let outcome: Outcome<u32, A> = match &decision.action {
        Action::Translate(ct) if ct.flags & CT_F_REDIRECT != 0 => {
            let ingress = ctx.ingress_ifindex() as u32;
            match fib::lookup(ctx, ingress, ct.new_saddr_be, ct.new_daddr_be, pkt.proto) {
                Route::Resolved {
                    ifindex,
                    dst_mac,
                    src_mac,
                } if ifindex == ingress => {
                    if nat::apply_to_frame(ctx, pkt, ct, [dst_mac, src_mac]).is_ok() {
                        let counter = if ct.kind == CT_KIND_FORWARD {
                            Counter::Translated
                        } else {
                            Counter::ReverseTranslated
                        };
                        Outcome::new(xdp_action::XDP_TX, counter)
                            .sent(Some(Counter::XdpTransmitted))
                    } else {
                        Outcome::uncounted(PASS)
                    }
                }
                // Leaves by another interface, or the neighbour is unresolved: tc redirects it.
                _ => Outcome::uncounted(PASS),
            }
        }
        Action::SnatFailed => Outcome::new(xdp_action::XDP_DROP, Counter::SnatFailed),
        // Dropped before the kernel allocates anything, as it would be in tc.
        Action::Denied => Outcome::new(xdp_action::XDP_DROP, Counter::DroppedSourceRange),
        // DNAT only (the stack delivers it, through tc), not ours, no backend (tc answers or
        // drops it), or an IPv6 new flow: tc handles and counts it.
        _ => Outcome::uncounted(PASS),
    };
    // A flow handed to tc to start is tc's to count, events included (a rebalanced IPv6 flow
    // would otherwise be counted twice).
    let events = match decision.action {
        Action::StartFlow => FlowEvents::NONE,
        _ => decision.events,
    };
    outcome
        .with_events(events)
        .attributed(decision.attributed(&flow, Origin::External))
}
