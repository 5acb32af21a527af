//! Sending a translated packet on by FIB lookup instead of through the stack: needed when its
//! source became a node address (the stack would drop it as spoofed) and when it was translated
//! on egress, after routing.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::counters::Counter;

use crate::maps::count;

const AF_INET: u8 = 2;

/// The interface the packet is on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the program's context pointer, valid for the whole run; `ifindex` is a
    // readable __sk_buff field.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Looks up where `daddr_be` is reached and redirects there, filling in the MAC addresses (or
/// letting the kernel resolve the neighbour). Without a route the packet goes to the stack.
#[inline(always)]
pub fn by_fib(ctx: &TcContext, saddr_be: u32, daddr_be: u32, proto: u8) -> i32 {
    // SAFETY: `bpf_fib_lookup` is plain old data; all zeroes is its documented "no input" state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ifindex(ctx);
    params.__bindgen_anon_3.ipv4_src = saddr_be;
    params.__bindgen_anon_4.ipv4_dst = daddr_be;
    // Always a forwarding (input) lookup from the interface the packet is on: an output lookup
    // would be pinned to this interface as the way out, and a host packet translated on egress
    // usually has to leave by another one (a local pod's veth).
    let flags = 0;
    // SAFETY: `params` is a valid, writable bpf_fib_lookup of the size passed; the context
    // pointer is the program's own.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let macs: [[u8; 6]; 2] = [params.dmac, params.smac];
        if ctx.store(0, &macs, 0).is_err() {
            count(Counter::RedirectFailed);
            return TC_ACT_OK as i32;
        }
        count(Counter::Redirected);
        // SAFETY: a helper taking plain integers.
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(Counter::Redirected);
        // SAFETY: a null `params` with length 0 is the documented "do the lookup yourself" call.
        return unsafe { bpf_redirect_neigh(params.ifindex, ptr::null_mut(), 0, 0) } as i32;
    }
    count(Counter::RedirectFailed);
    TC_ACT_OK as i32
}
