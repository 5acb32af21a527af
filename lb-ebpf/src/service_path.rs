//! The tc packet path shared by every tc entry point: an existing flow is one conntrack lookup
//! and a rewrite; a packet to a Service frontend starts a flow; anything else passes untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    conntrack::{CT_F_REDIRECT, CT_KIND_FORWARD, CtEntry, FlowKey},
    counters::Counter,
    service::{SERVICE_F_REJECT, ServiceKey},
};

use crate::{
    headers::{self, NotHandled, Packet, Parsed},
    icmp::{self, IcmpOutcome},
    lb::{self, NoFlow, Origin},
    maps::{LB_SERVICES, lookup},
    nat, redirect, reject,
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
pub fn process(ctx: &TcContext, origin: Origin) -> Outcome {
    let pkt = match headers::parse(ctx) {
        Ok(Parsed::Flow(pkt)) => pkt,
        Ok(Parsed::IcmpError(err)) => {
            return match icmp::translate(ctx, &err, origin) {
                IcmpOutcome::NotOurs => pass(Counter::Passed),
                IcmpOutcome::Broken => shoot(Counter::Malformed),
                IcmpOutcome::Translated(verdict) => Outcome {
                    verdict,
                    counter: Counter::IcmpTranslated,
                },
            };
        }
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
    if let Some(ct) = lb::established(&flow, pkt.tcp_flags) {
        return translate(ctx, &pkt, &ct);
    }
    let frontend = ServiceKey::new(pkt.daddr_be, pkt.dport_be, pkt.proto);
    let Some(service) = lookup(&LB_SERVICES, &frontend) else {
        return pass(Counter::Passed);
    };
    match lb::new_flow(&flow, &service, origin) {
        Ok(forward) => translate(ctx, &pkt, &forward),
        Err(NoFlow::SnatFailed) => shoot(Counter::SnatFailed),
        Err(NoFlow::NoBackend) if service.flags & SERVICE_F_REJECT != 0 => {
            match reject::reject(ctx, &pkt, origin) {
                Ok(verdict) => Outcome {
                    verdict,
                    counter: Counter::Rejected,
                },
                // Not answerable (a reset, or UDP with IPv4 options): drop instead.
                Err(_) => shoot(Counter::DroppedNoBackend),
            }
        }
        Err(NoFlow::NoBackend) => shoot(Counter::DroppedNoBackend),
    }
}

/// Applies a conntrack entry to the packet and sends it on.
#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, ct: &CtEntry) -> Outcome {
    let counter = if ct.kind == CT_KIND_FORWARD {
        Counter::Translated
    } else {
        Counter::ReverseTranslated
    };
    if nat::apply(ctx, pkt, ct).is_err() {
        return pass(Counter::Malformed);
    }
    if ct.flags & CT_F_REDIRECT == 0 {
        return pass(counter);
    }
    Outcome {
        verdict: redirect::by_fib(ctx, ct.new_saddr_be, ct.new_daddr_be, pkt.proto),
        counter,
    }
}
