//! The packet path. Entry points only; each is a thin wrapper that turns the outcome of the real
//! work into a verdict and a counter.
#![no_std]
#![no_main]

mod conntrack;
mod headers;
mod maps;
mod nat;
mod pod_ingress;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// tcx ingress on pod-facing interfaces: client -> service packets are translated to a backend,
/// backend -> client replies are translated back to the service address.
#[classifier]
pub fn lb_pod_ingress(ctx: TcContext) -> i32 {
    let outcome = pod_ingress::process(&ctx);
    maps::count(outcome.counter);
    outcome.verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves this unreachable; a panic cannot happen in a loaded program.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
