//! The XDP fast path on external interfaces (`lb agent --xdp`): flows that must leave by the
//! interface they came in on after SNAT or reverse SNAT (NodePort/LoadBalancer/externalIP traffic
//! to and from backends on other nodes) are rewritten and sent back out with XDP_TX, before the
//! kernel allocates an skb. Everything else is passed untouched to the tc programs, which handle
//! every case: XDP only ever makes a packet faster, never different.

use core::mem;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    conntrack::{CT_F_REDIRECT, CT_KIND_FORWARD, CtEntry, FlowKey},
    counters::Counter,
    service::ServiceKey,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    conntrack,
    headers::TCP_FLAGS_OFF,
    lb::{self, NoFlow, Origin},
    maps::{LB_SERVICES, count, lookup},
};

const ETH_LEN: usize = EthHdr::LEN;
const AF_INET: u8 = 2;

/// A bounds-checked pointer into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    try_process(ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_process(ctx: &XdpContext) -> Option<u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: as above; the header is only read here.
    let (ihl, frag, proto, saddr_be, daddr_be) = unsafe {
        (
            (*ip).ihl() as usize & 0x3c,
            (*ip).frag_offset(),
            (*ip).proto,
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    if ihl < Ipv4Hdr::LEN || frag != 0 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let l4_off = ETH_LEN + ihl;
    // The checksum sits at 16 (TCP) or 6 (UDP): make sure the whole fixed header is there.
    let csum_off = l4_off + if proto == IPPROTO_TCP { 16 } else { 6 };
    let csum: *mut u16 = ptr_at(ctx, csum_off)?;
    let ports: *mut [u16; 2] = ptr_at(ctx, l4_off)?;
    // SAFETY: checked by `ptr_at`.
    let [sport_be, dport_be] = unsafe { *ports };
    let flow = FlowKey::new(saddr_be, daddr_be, sport_be, dport_be, proto);
    let tcp_flags = if proto == IPPROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4_off + TCP_FLAGS_OFF)?;
        // SAFETY: checked by `ptr_at`.
        unsafe { *flags }
    } else {
        0
    };

    let known = conntrack::lookup(&flow);
    // A DNAT-only flow is tc's to handle whole: leave its entry untouched here, so each packet
    // is recorded (and checked) once.
    if known.is_some_and(|ct| ct.flags & CT_F_REDIRECT == 0) {
        return None;
    }
    let ct = match known.and_then(|found| lb::established_entry(&flow, found, tcp_flags)) {
        Some(ct) => ct,
        None => {
            let service = lookup(&LB_SERVICES, &ServiceKey::new(daddr_be, dport_be, proto))?;
            match lb::new_flow(&flow, &service, Origin::External) {
                Ok(forward) => forward,
                Err(NoFlow::SnatFailed) => {
                    count(Counter::SnatFailed);
                    return Some(xdp_action::XDP_DROP);
                }
                // tc answers or drops it, and counts it.
                Err(NoFlow::NoBackend) => return None,
            }
        }
    };
    if ct.flags & CT_F_REDIRECT == 0 {
        return None; // DNAT only: the stack delivers it, through tc
    }
    let (out_ifindex, dst_mac, src_mac) = fib_ifindex_and_macs(ctx, &ct, proto)?;
    if out_ifindex != ctx.ingress_ifindex() as u32 {
        return None; // leaves by another interface: tc redirects it
    }
    // From here on the packet is rewritten and must be sent.
    // SAFETY: `ip` and `csum`/`ports` were bounds-checked above and stay valid: the packet is not
    // resized.
    unsafe {
        rewrite(ip, ports, csum, proto, &flow, &ct);
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
    }
    count(if ct.kind == CT_KIND_FORWARD {
        Counter::Translated
    } else {
        Counter::ReverseTranslated
    });
    count(Counter::XdpTransmitted);
    Some(xdp_action::XDP_TX)
}

/// The FIB's answer for the rewritten packet: egress ifindex, destination and source MAC.
/// `None` unless the neighbour is already resolved (tc handles the rest).
#[inline(always)]
fn fib_ifindex_and_macs(
    ctx: &XdpContext,
    ct: &CtEntry,
    proto: u8,
) -> Option<(u32, [u8; 6], [u8; 6])> {
    // SAFETY: `bpf_fib_lookup` is plain old data; all zeroes is its documented "no input" state.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = ct.new_saddr_be;
    params.__bindgen_anon_4.ipv4_dst = ct.new_daddr_be;
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
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64).then_some((params.ifindex, params.dmac, params.smac))
}

/// Rewrites addresses and ports to `ct`'s, updating the IPv4 and L4 checksums incrementally
/// (RFC 1624). A UDP checksum of 0 ("none") stays 0.
///
/// # Safety
/// The pointers must be bounds-checked pointers into the packet.
#[inline(always)]
unsafe fn rewrite(
    ip: *mut Ipv4Hdr,
    ports: *mut [u16; 2],
    csum: *mut u16,
    proto: u8,
    flow: &FlowKey,
    ct: &CtEntry,
) {
    let old = [
        flow.saddr_be,
        flow.daddr_be,
        (flow.sport_be as u32) | ((flow.dport_be as u32) << 16),
    ];
    let new = [
        ct.new_saddr_be,
        ct.new_daddr_be,
        (ct.new_sport_be as u32) | ((ct.new_dport_be as u32) << 16),
    ];
    // SAFETY: the caller guarantees the pointers; fields are plain integers.
    unsafe {
        (*ip).src_addr = ct.new_saddr_be.to_ne_bytes();
        (*ip).dst_addr = ct.new_daddr_be.to_ne_bytes();
        (*ip).check =
            csum_update(u16::from_ne_bytes((*ip).check), &old[..2], &new[..2]).to_ne_bytes();
        *ports = [ct.new_sport_be, ct.new_dport_be];
        let l4 = *csum;
        if !(proto == IPPROTO_UDP && l4 == 0) {
            let updated = csum_update(l4, &old, &new);
            *csum = if proto == IPPROTO_UDP && updated == 0 {
                0xffff
            } else {
                updated
            };
        }
    }
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over every 16-bit word that changed. Works in
/// memory (wire) order throughout, which one's-complement sums do not mind.
#[inline(always)]
fn csum_update(check: u16, old: &[u32], new: &[u32]) -> u16 {
    let mut sum = (!check) as u32;
    let mut i = 0;
    while i < old.len() {
        sum += (!(old[i] as u16)) as u32 + (!((old[i] >> 16) as u16)) as u32;
        sum += (new[i] as u16) as u32 + ((new[i] >> 16) as u16) as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
