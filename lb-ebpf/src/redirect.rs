//! Sending a translated packet on by FIB lookup instead of through the stack: needed when its
//! source became a node address (the stack would drop it as spoofed) and when it was translated
//! on egress, after routing.

use core::ptr;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::counters::Counter;

use crate::{
    family::Family,
    fib::{self, Route},
};

/// The interface the packet is on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the program's context pointer, valid for the whole run; `ifindex` is a
    // readable __sk_buff field.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Looks up where `daddr_be` is reached and redirects there, filling in the MAC addresses (or
/// letting the kernel resolve the neighbour). Without a route the packet goes to the stack.
/// Returns the verdict and how the packet was sent on.
///
/// Always a forwarding (input) lookup from the interface the packet is on: an output lookup
/// would be pinned to this interface as the way out, and a host packet translated on egress
/// usually has to leave by another one (a local pod's veth).
#[inline(always)]
pub fn by_fib<A: Family>(ctx: &TcContext, saddr_be: A, daddr_be: A, proto: u8) -> (i32, Counter) {
    match fib::lookup(ctx, ifindex(ctx), saddr_be, daddr_be, proto) {
        Route::Resolved {
            ifindex,
            dst_mac,
            src_mac,
        } => {
            if ctx.store(0, &[dst_mac, src_mac], 0).is_err() {
                return (TC_ACT_OK as i32, Counter::RedirectFailed);
            }
            // SAFETY: a helper taking plain integers.
            let verdict = unsafe { bpf_redirect(ifindex, 0) } as i32;
            (verdict, Counter::Redirected)
        }
        Route::Unresolved { ifindex } => {
            // SAFETY: a null `params` with length 0 is the documented "do the lookup yourself"
            // call.
            let verdict = unsafe { bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) } as i32;
            (verdict, Counter::Redirected)
        }
        Route::None => (TC_ACT_OK as i32, Counter::RedirectFailed),
    }
}
