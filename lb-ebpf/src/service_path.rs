//! The tc packet path shared by every tc entry point: parse, [`lb::classify`], then rewrite and
//! send on, answer (reject) or leave the packet alone; then record what happened. Each family
//! runs its own copy of the generic steps.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    Ip6,
    conntrack::{CT_F_REDIRECT, CT_KIND_FORWARD, CtEntry, FlowKey},
    counters::Counter,
};

use crate::{
    family::Family,
    headers::{self, IcmpError, IpVersion, NotHandled, Packet, Parse, Parsed},
    icmp::{self, IcmpOutcome},
    lb::{self, Action, Decision, FlowEvents, FlowStart, Origin, Scope},
    nat,
    outcome::Outcome,
    redirect, reject,
    stages::{self, Carried},
};

const PASS: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

/// Handles one packet of `bytes`, records its outcome and returns the verdict. IPv6 goes on to
/// its stages (`stages`).
#[inline(always)]
pub fn process(ctx: &TcContext, origin: Origin, bytes: u64) -> i32 {
    match headers::ip_version(ctx) {
        Ok(IpVersion::V4) => match <u32 as Parse>::parse(ctx) {
            Ok(Parsed::Flow(pkt)) => flow(ctx, &pkt, origin),
            Ok(Parsed::IcmpError(err)) => icmp_error(ctx, &err, origin),
            Err(not_handled) => not_ours(not_handled),
        }
        .record(bytes),
        Ok(IpVersion::V6) => {
            stages::tc_ipv6(ctx, Carried::new(origin, FlowEvents::NONE));
            // No stage to run (the agent fills the array before it attaches anything): dropped
            // here, every IPv6 packet would be lost, Service traffic or not.
            Outcome::<i32>::new(PASS, Counter::StageFailed).record(bytes)
        }
        Err(not_handled) => not_ours::<u32>(not_handled).record(bytes),
    }
}

/// The IPv6 stage after the entry points: known flows are translated here, and so is a new
/// flow's first packet once [`ipv6_new_flow`] set the flow up.
#[inline(always)]
pub fn ipv6(ctx: &TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let carried = stages::tc_carried(ctx);
    match <Ip6 as Parse>::parse(ctx) {
        Ok(Parsed::Flow(pkt)) => ipv6_flow(ctx, &pkt, carried),
        Ok(Parsed::IcmpError(_)) => {
            stages::tc_ipv6_icmp(ctx, carried);
            Outcome::new(PASS, Counter::StageFailed)
        }
        Err(not_handled) => not_ours(not_handled),
    }
    .record(bytes)
}

#[inline(always)]
fn ipv6_flow(ctx: &TcContext, pkt: &Packet<Ip6>, carried: Carried) -> Outcome<i32, Ip6> {
    let flow = pkt.flow();
    let origin = carried.origin;
    let mut decision = lb::classify(
        &flow,
        pkt.tcp_flags,
        origin,
        Scope::Every,
        FlowStart::NextStage,
    );
    let resumed = carried.events.new_flow;
    if resumed {
        // Back from the new-flow stage: what happened there is this packet's.
        decision.events = carried.events;
    }
    if let Action::StartFlow = decision.action {
        // Back from the new-flow stage, the flow's entry should have been found: gone at once
        // (a full LRU table), it is not set up again (no loop between the stages).
        if !resumed {
            stages::tc_ipv6_new_flow(ctx, Carried::new(origin, decision.events));
        }
        return Outcome::new(SHOT, Counter::StageFailed);
    }
    act(ctx, pkt, &flow, decision, origin)
}

/// The IPv6 new-flow stage: the flow is set up and the packet goes back to [`ipv6`], which
/// translates it by the new entry; a refused flow's packet is recorded here, or answered by
/// [`ipv6_reject`].
#[inline(always)]
pub fn ipv6_new_flow(ctx: &TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let carried = stages::tc_carried(ctx);
    let Ok(Parsed::Flow(pkt)) = <Ip6 as Parse>::parse(ctx) else {
        // The stage before parsed it as a flow.
        return Outcome::<i32, Ip6>::new(PASS, Counter::Malformed).record(bytes);
    };
    let flow = pkt.flow();
    let mut decision = lb::start_flow(&flow, carried.origin);
    decision.events.rebalanced = carried.events.rebalanced;
    let next = Carried::new(carried.origin, decision.events);
    let outcome = match &decision.action {
        Action::Translate(_) => {
            stages::tc_ipv6(ctx, next);
            Outcome::new(SHOT, Counter::StageFailed)
        }
        Action::NoBackend { reject: true } => {
            stages::tc_ipv6_reject(ctx, next);
            Outcome::new(SHOT, Counter::DroppedNoBackend)
        }
        refused => refusal(refused),
    };
    outcome
        .with_events(decision.events)
        .attributed(decision.attributed(&flow, carried.origin))
        .record(bytes)
}

/// The IPv6 reject stage: a new flow to a frontend without backends, answered.
#[inline(always)]
pub fn ipv6_reject(ctx: &TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let carried = stages::tc_carried(ctx);
    let Ok(Parsed::Flow(pkt)) = <Ip6 as Parse>::parse(ctx) else {
        return Outcome::<i32, Ip6>::new(PASS, Counter::Malformed).record(bytes);
    };
    let decision = Decision {
        action: Action::NoBackend { reject: true },
        events: carried.events,
    };
    answer(ctx, &pkt, carried.origin)
        .with_events(decision.events)
        .attributed(decision.attributed(&pkt.flow(), carried.origin))
        .record(bytes)
}

/// The IPv6 ICMP stage: an ICMPv6 error about a translated flow.
#[inline(always)]
pub fn ipv6_icmp(ctx: &TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let carried = stages::tc_carried(ctx);
    match <Ip6 as Parse>::parse(ctx) {
        Ok(Parsed::IcmpError(err)) => icmp_error(ctx, &err, carried.origin),
        _ => Outcome::new(PASS, Counter::Malformed),
    }
    .record(bytes)
}

#[inline(always)]
fn not_ours<A: Family>(why: NotHandled) -> Outcome<i32, A> {
    match why {
        NotHandled::Pass => Outcome::new(PASS, Counter::Passed),
        NotHandled::Malformed => Outcome::new(PASS, Counter::Malformed),
    }
}

#[inline(always)]
fn icmp_error<A: Family>(ctx: &TcContext, err: &IcmpError<A>, origin: Origin) -> Outcome<i32, A> {
    match icmp::translate(ctx, err, origin) {
        IcmpOutcome::NotOurs => Outcome::new(PASS, Counter::Passed),
        IcmpOutcome::Broken => Outcome::new(SHOT, Counter::Malformed),
        IcmpOutcome::Translated { verdict, sent } => {
            Outcome::new(verdict, Counter::IcmpTranslated).sent(sent)
        }
    }
}

#[inline(always)]
fn flow(ctx: &TcContext, pkt: &Packet<u32>, origin: Origin) -> Outcome<i32> {
    let flow = pkt.flow();
    let decision = lb::classify(&flow, pkt.tcp_flags, origin, Scope::Every, FlowStart::Here);
    act(ctx, pkt, &flow, decision, origin)
}

/// Carries out `decision` on the packet.
#[inline(always)]
fn act<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    flow: &FlowKey<A>,
    decision: Decision<A>,
    origin: Origin,
) -> Outcome<i32, A> {
    let outcome: Outcome<i32, A> = match &decision.action {
        Action::Translate(ct) => translate(ctx, pkt, ct),
        Action::NoBackend { reject: true } => answer(ctx, pkt, origin),
        refused => refusal(refused),
    };
    outcome
        .with_events(decision.events)
        .attributed(decision.attributed(flow, origin))
}

/// A packet neither translated nor answered: passed (not ours) or dropped, and why.
#[inline(always)]
fn refusal<A: Family>(action: &Action<A>) -> Outcome<i32, A> {
    match action {
        Action::NotAService | Action::OutOfScope => Outcome::new(PASS, Counter::Passed),
        Action::SnatFailed => Outcome::new(SHOT, Counter::SnatFailed),
        Action::Denied => Outcome::new(SHOT, Counter::DroppedSourceRange),
        Action::NoBackend { .. } => Outcome::new(SHOT, Counter::DroppedNoBackend),
        // Handled by the callers (translated, or handed to a stage).
        Action::Translate(_) | Action::StartFlow => Outcome::new(SHOT, Counter::StageFailed),
    }
}

/// Answers a new flow to a frontend without backends (kube-proxy's REJECT).
#[inline(always)]
fn answer<A: Family>(ctx: &TcContext, pkt: &Packet<A>, origin: Origin) -> Outcome<i32, A> {
    match reject::reject(ctx, pkt, origin) {
        Ok(verdict) => Outcome::new(verdict, Counter::Rejected),
        // Not answerable (a reset, or UDP with IPv4 options / IPv6 extension headers): drop
        // instead.
        Err(_) => Outcome::new(SHOT, Counter::DroppedNoBackend),
    }
}

/// Applies a conntrack entry to the packet and sends it on.
#[inline(always)]
fn translate<A: Family>(ctx: &TcContext, pkt: &Packet<A>, ct: &CtEntry<A>) -> Outcome<i32, A> {
    let counter = if ct.kind == CT_KIND_FORWARD {
        Counter::Translated
    } else {
        Counter::ReverseTranslated
    };
    if nat::apply(ctx, pkt, ct).is_err() {
        return Outcome::new(PASS, Counter::Malformed);
    }
    if ct.flags & CT_F_REDIRECT == 0 {
        return Outcome::new(PASS, counter);
    }
    let (verdict, sent) = redirect::by_fib(ctx, ct.new_saddr_be, ct.new_daddr_be, pkt.proto);
    Outcome::new(verdict, counter).sent(Some(sent))
}
