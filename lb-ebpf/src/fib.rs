//! The kernel's FIB lookup, shared by the tc redirect and the XDP fast path: where a translated
//! packet goes next, and the MAC addresses to put on it.

use core::mem;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
};

use crate::family::Family;

/// The FIB's answer.
pub enum Route {
    /// Next hop known and resolved: leave by `ifindex` with these MAC addresses.
    Resolved {
        ifindex: u32,
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
    },
    /// A route by `ifindex`, but the neighbour is not resolved yet.
    Unresolved { ifindex: u32 },
    /// No route (or not forwardable).
    None,
}

/// A forwarding (input) lookup, as if the packet from `saddr_be` to `daddr_be` had arrived on
/// `ifindex`, in the addresses' family.
#[inline(always)]
pub fn lookup<C: EbpfContext, A: Family>(
    ctx: &C,
    ifindex: u32,
    saddr_be: A,
    daddr_be: A,
    proto: u8,
) -> Route {
    // SAFETY: `bpf_fib_lookup` is plain old data; all zeroes is its documented "no input" state.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = A::AF;
    params.l4_protocol = proto;
    params.ifindex = ifindex;
    A::fib_addrs(&mut params, saddr_be, daddr_be);
    // SAFETY: `params` is a valid, writable bpf_fib_lookup of the size passed; the context
    // pointer is the program's own.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Route::Resolved {
            ifindex: params.ifindex,
            dst_mac: params.dmac,
            src_mac: params.smac,
        }
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Route::Unresolved {
            ifindex: params.ifindex,
        }
    } else {
        Route::None
    }
}
