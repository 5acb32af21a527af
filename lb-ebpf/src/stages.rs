//! IPv6 runs in stages, each a program of its own reached by a tail call, because each gets a
//! fresh 512-byte stack: with 40-byte flow keys and 56-byte conntrack entries, the whole path
//! does not fit one (docs/design.md, "IPv6 and dual-stack"). IPv4 runs whole in its entry point.
//!
//! tc: entry point -> [`STAGE_IPV6`] (known flows: conntrack, translate, record). From there a
//! new flow goes to [`STAGE_IPV6_NEW_FLOW`], which sets it up and comes back to [`STAGE_IPV6`]
//! (the packet is then a known flow's); a refused one is recorded there, or answered by
//! [`STAGE_IPV6_REJECT`]. An ICMPv6 error goes to [`STAGE_IPV6_ICMP`].
//! XDP: entry point -> [`STAGE_IPV6`] (known flows only; tc starts new ones).
//!
//! What a tc stage needs of the ones before travels in the packet's control buffer.

use aya_ebpf::{
    macros::map,
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};
use lb_common::maps::{
    STAGE_IPV6, STAGE_IPV6_ICMP, STAGE_IPV6_NEW_FLOW, STAGE_IPV6_REJECT, STAGE_SLOTS,
};

use crate::lb::{FlowEvents, Origin};

/// tc's stages, filled by the agent (`lb_common::maps::TC_STAGE_PROGRAMS`). Pinned: a program
/// array loses its entries once no user-space reference to it is left, and the packet path
/// outlives the agent.
#[map(name = "LB_TC_STAGES")]
pub static LB_TC_STAGES: ProgramArray = ProgramArray::pinned(STAGE_SLOTS, 0);

/// XDP's stages (`lb_common::maps::XDP_STAGE_PROGRAMS`).
#[map(name = "LB_XDP_STAGES")]
pub static LB_XDP_STAGES: ProgramArray = ProgramArray::pinned(STAGE_SLOTS, 0);

// Control-buffer words: the origin and the flow's events so far, then the frontend's id.
const CB_FLAGS: usize = 0;
const CB_SERVICE_ID: usize = 1;
const CB_ORIGIN_MASK: u32 = 0xff;
const CB_REBALANCED: u32 = 1 << 8;
/// The new-flow stage set the flow up: the packet is its first.
const CB_NEW_FLOW: u32 = 1 << 9;
const CB_PORT_REMAPPED: u32 = 1 << 10;

/// What a tc stage takes from the ones before.
#[derive(Clone, Copy)]
pub struct Carried {
    pub origin: Origin,
    /// What happened to the flow so far (`new_flow`: the new-flow stage set it up).
    pub events: FlowEvents,
}

impl Carried {
    #[inline(always)]
    pub const fn new(origin: Origin, events: FlowEvents) -> Self {
        Self { origin, events }
    }
}

/// Runs tc stage `stage` on the packet, with `carried`; returns only if it could not run.
#[inline(always)]
fn tc_next(ctx: &TcContext, stage: u32, carried: Carried) {
    let e = carried.events;
    let flags = u32::from(carried.origin.code())
        | if e.rebalanced { CB_REBALANCED } else { 0 }
        | if e.new_flow { CB_NEW_FLOW } else { 0 }
        | if e.port_remapped { CB_PORT_REMAPPED } else { 0 };
    // SAFETY: `ctx.skb.skb` is the kernel's context for this run; tc programs may write the
    // five control-buffer words, which a tail call keeps. A tail call returns only on failure.
    unsafe {
        (*ctx.skb.skb).cb[CB_FLAGS] = flags;
        (*ctx.skb.skb).cb[CB_SERVICE_ID] = e.service_id;
        LB_TC_STAGES.tail_call(ctx, stage);
    }
}

/// What the stages before left in the control buffer.
#[inline(always)]
pub fn tc_carried(ctx: &TcContext) -> Carried {
    // SAFETY: as in `tc_next`: reading the run's own context.
    let (flags, service_id) = unsafe {
        (
            (*ctx.skb.skb).cb[CB_FLAGS],
            (*ctx.skb.skb).cb[CB_SERVICE_ID],
        )
    };
    Carried {
        origin: Origin::from_code((flags & CB_ORIGIN_MASK) as u8),
        events: FlowEvents {
            rebalanced: flags & CB_REBALANCED != 0,
            port_remapped: flags & CB_PORT_REMAPPED != 0,
            new_flow: flags & CB_NEW_FLOW != 0,
            service_id,
        },
    }
}

/// tc: the IPv6 path, from an entry point or back from the new-flow stage.
#[inline(always)]
pub fn tc_ipv6(ctx: &TcContext, carried: Carried) {
    tc_next(ctx, STAGE_IPV6, carried);
}

/// tc: an IPv6 new flow.
#[inline(always)]
pub fn tc_ipv6_new_flow(ctx: &TcContext, carried: Carried) {
    tc_next(ctx, STAGE_IPV6_NEW_FLOW, carried);
}

/// tc: an ICMPv6 error.
#[inline(always)]
pub fn tc_ipv6_icmp(ctx: &TcContext, carried: Carried) {
    tc_next(ctx, STAGE_IPV6_ICMP, carried);
}

/// tc: a new IPv6 flow to answer with a reset or an unreachable.
#[inline(always)]
pub fn tc_ipv6_reject(ctx: &TcContext, carried: Carried) {
    tc_next(ctx, STAGE_IPV6_REJECT, carried);
}

/// XDP: the IPv6 fast path.
#[inline(always)]
pub fn xdp_ipv6(ctx: &XdpContext) {
    // SAFETY: the context is this run's; a tail call returns only on failure.
    unsafe { LB_XDP_STAGES.tail_call(ctx, STAGE_IPV6) };
}
