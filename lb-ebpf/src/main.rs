//! The packet path. Entry points only; each is a thin wrapper that records the [`outcome::Outcome`] of
//! the real work (its counters) and returns its verdict.
//!
//! Layers, shared by tc and XDP: `headers` (parse), `lb` (classify: conntrack, then Service),
//! `nat` + `checksum` (rewrite), `fib` (where next); tc adds `redirect`, `reject` and `icmp`.
//! `family` holds what differs between IPv4 and IPv6; every layer is generic over it.
#![no_std]
#![no_main]

mod checksum;
mod conntrack;
mod family;
mod fib;
mod headers;
mod icmp;
mod lb;
mod maps;
mod nat;
mod outcome;
mod redirect;
mod reject;
mod service_path;
mod stages;
mod stats;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::lb::Origin;

#[inline(always)]
fn run(ctx: &TcContext, origin: Origin) -> i32 {
    // Read before any rewrite; translation never changes a packet's length.
    let bytes = u64::from(ctx.len());
    service_path::process(ctx, origin, bytes)
}

/// tcx ingress on pod-facing interfaces: pods reaching Services (every frontend kind), and
/// replies from local backends.
#[classifier]
pub fn lb_pod_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Pod)
}

/// tcx ingress on external interfaces: NodePort, LoadBalancer and externalIP traffic from the
/// network (SNATed to this node when the backend is elsewhere), and replies from other nodes.
#[classifier]
pub fn lb_external_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Origin::External)
}

/// tcx egress on external interfaces: processes in the node's own namespace (hostNetwork pods)
/// reaching Services.
#[classifier]
pub fn lb_host_egress(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Host)
}

/// XDP on external interfaces (optional, `lb agent --xdp`): the SNAT/reverse-SNAT fast path;
/// everything else goes on to the tc programs untouched.
#[xdp]
pub fn lb_external_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    xdp::process(&ctx, bytes)
}

/// IPv6 stage (tc): known flows, reached from the tc entry points (`stages`).
#[classifier]
pub fn lb_tc_ipv6(ctx: TcContext) -> i32 {
    service_path::ipv6(&ctx)
}

/// IPv6 stage (tc): new flows.
#[classifier]
pub fn lb_tc_ipv6_new_flow(ctx: TcContext) -> i32 {
    service_path::ipv6_new_flow(&ctx)
}

/// IPv6 stage (tc): ICMPv6 errors about translated flows.
#[classifier]
pub fn lb_tc_ipv6_icmp(ctx: TcContext) -> i32 {
    service_path::ipv6_icmp(&ctx)
}

/// IPv6 stage (tc): new flows answered for want of backends.
#[classifier]
pub fn lb_tc_ipv6_reject(ctx: TcContext) -> i32 {
    service_path::ipv6_reject(&ctx)
}

/// IPv6 stage (XDP): the fast path for known flows.
#[xdp]
pub fn lb_xdp_ipv6(ctx: XdpContext) -> u32 {
    xdp::ipv6(&ctx)
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
