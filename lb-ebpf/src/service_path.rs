//! The tc packet path shared by every tc entry point: parse, [`lb::classify`], then rewrite and
//! send on, answer (reject) or leave the packet alone; then record what happened. Each family
//! runs its own copy of the generic steps.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    conntrack::{CT_F_REDIRECT, CT_KIND_FORWARD, CtEntry},
    counters::Counter,
};

use crate::{
    family::Family,
    headers::{self, IcmpError, NotHandled, Packet, Parsed},
    icmp::{self, IcmpOutcome},
    lb::{self, Action, Origin, Scope},
    nat,
    outcome::Outcome,
    redirect, reject,
};

const PASS: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

/// Handles one packet; the entry point records the outcome.
#[inline(always)]
pub fn process(ctx: &TcContext, origin: Origin) -> Outcome<i32> {
    match headers::parse(ctx) {
        Ok(Parsed::Flow(pkt)) => flow(ctx, &pkt, origin),
        Ok(Parsed::IcmpError(err)) => icmp_error(ctx, &err, origin),
        Err(not_handled) => not_ours(not_handled),
    }
}

#[inline(always)]
fn not_ours(why: NotHandled) -> Outcome<i32> {
    match why {
        NotHandled::Pass => Outcome::new(PASS, Counter::Passed),
        NotHandled::Malformed => Outcome::new(PASS, Counter::Malformed),
    }
}

#[inline(always)]
fn icmp_error<A: Family>(ctx: &TcContext, err: &IcmpError<A>, origin: Origin) -> Outcome<i32> {
    match icmp::translate(ctx, err, origin) {
        IcmpOutcome::NotOurs => Outcome::new(PASS, Counter::Passed),
        IcmpOutcome::Broken => Outcome::new(SHOT, Counter::Malformed),
        IcmpOutcome::Translated { verdict, sent } => {
            Outcome::new(verdict, Counter::IcmpTranslated).sent(sent)
        }
    }
}

#[inline(always)]
fn flow<A: Family>(ctx: &TcContext, pkt: &Packet<A>, origin: Origin) -> Outcome<i32, A> {
    let flow = pkt.flow();
    let decision = lb::classify(&flow, pkt.tcp_flags, origin, Scope::Every);
    let outcome: Outcome<i32, A> = match &decision.action {
        Action::Translate(ct) => translate(ctx, pkt, ct),
        Action::NotAService | Action::OutOfScope => Outcome::new(PASS, Counter::Passed),
        Action::SnatFailed => Outcome::new(SHOT, Counter::SnatFailed),
        Action::Denied => Outcome::new(SHOT, Counter::DroppedSourceRange),
        Action::NoBackend { reject: true } => match reject::reject(ctx, pkt, origin) {
            Ok(verdict) => Outcome::new(verdict, Counter::Rejected),
            // Not answerable (a reset, or UDP with IPv4 options): drop instead.
            Err(_) => Outcome::new(SHOT, Counter::DroppedNoBackend),
        },
        Action::NoBackend { reject: false } => Outcome::new(SHOT, Counter::DroppedNoBackend),
    };
    outcome
        .with_events(decision.events)
        .attributed(decision.attributed(&flow, origin))
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
