//! Answering a new flow to a Service without backends, as kube-proxy does: a TCP RST, or an ICMP
//! (ICMPv6) port unreachable for UDP. The packet is rewritten in place into the answer and sent
//! back the way it came.

use core::mem;

use aya_ebpf::{bindings::BPF_F_INGRESS, helpers::bpf_redirect, programs::TcContext};
use lb_common::IPPROTO_TCP;

use crate::{
    checksum::{fold, pseudo_header_sum, sum_words},
    family::Family,
    headers::{
        ETH_LEN, ICMP_HDR_LEN, Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
    },
    lb::Origin,
    redirect::ifindex,
};

const TCP_HDR_LEN: usize = 20;

pub struct NotRejected;

/// Turns `pkt` into its rejection and returns the redirect verdict that sends it back.
#[inline(always)]
pub fn reject<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    origin: Origin,
) -> Result<i32, NotRejected> {
    let macs: [[u8; 6]; 2] = ctx.load(0).map_err(|_| NotRejected)?;
    if pkt.proto == IPPROTO_TCP {
        tcp_reset(ctx, pkt)?;
    } else {
        icmp_port_unreachable(ctx, pkt)?;
    }
    // Back to where it came from, with the MAC addresses swapped.
    ctx.store(0, &[macs[1], macs[0]], 0)
        .map_err(|_| NotRejected)?;
    // From a host process (egress): deliver to the host's own stack; otherwise back out of the
    // interface it arrived on.
    let flags = if origin == Origin::Host {
        BPF_F_INGRESS as u64
    } else {
        0
    };
    // SAFETY: a helper taking plain integers.
    Ok(unsafe { bpf_redirect(ifindex(ctx), flags) } as i32)
}

/// RFC 9293 3.10.7.1: with ACK set, the reset takes its sequence number from the ACK field;
/// otherwise it has sequence 0 and acknowledges everything the segment occupied.
#[inline(always)]
fn tcp_reset<A: Family>(ctx: &TcContext, pkt: &Packet<A>) -> Result<(), NotRejected> {
    let hdr: [u8; 14] = ctx.load(pkt.l4_off).map_err(|_| NotRejected)?;
    let flags = hdr[13];
    if flags & TCP_FLAG_RST != 0 {
        return Err(NotRejected); // never answer a reset
    }
    let seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let ack = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let (len_off, len_add) = A::LEN_FIELD;
    let len_field: u16 = ctx.load(ETH_LEN + len_off).map_err(|_| NotRejected)?;
    let ip_total = u16::from_be(len_field) as u32 + len_add as u32;
    let headers = (pkt.l4_off - ETH_LEN) as u32 + ((hdr[12] >> 4) as u32) * 4;
    let payload = ip_total.saturating_sub(headers);
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_FLAG_ACK != 0 {
        (ack, 0, TCP_FLAG_RST)
    } else {
        let occupied =
            payload + (flags & TCP_FLAG_SYN != 0) as u32 + (flags & TCP_FLAG_FIN != 0) as u32;
        (0, seq.wrapping_add(occupied), TCP_FLAG_RST | TCP_FLAG_ACK)
    };
    let sq = rst_seq.to_be_bytes();
    let ak = rst_ack.to_be_bytes();
    let sp = pkt.dport_be.to_ne_bytes();
    let dp = pkt.sport_be.to_ne_bytes();
    let mut tcp: [u8; TCP_HDR_LEN] = [
        sp[0],
        sp[1],
        dp[0],
        dp[1],
        sq[0],
        sq[1],
        sq[2],
        sq[3],
        ak[0],
        ak[1],
        ak[2],
        ak[3],
        (5 << 4),
        rst_flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let pseudo = pseudo_header_sum(pkt.daddr_be, pkt.saddr_be, IPPROTO_TCP, TCP_HDR_LEN as u16);
    let csum = fold(sum_words(pseudo, &tcp)).to_be_bytes();
    tcp[16] = csum[0];
    tcp[17] = csum[1];
    let ip = A::header(TCP_HDR_LEN as u16, IPPROTO_TCP, pkt.daddr_be, pkt.saddr_be);
    resize(ctx, ETH_LEN + A::HDR_LEN + TCP_HDR_LEN)?;
    ctx.store(ETH_LEN, &ip, 0).map_err(|_| NotRejected)?;
    ctx.store(ETH_LEN + A::HDR_LEN, &tcp, 0)
        .map_err(|_| NotRejected)
}

/// ICMP destination unreachable, port unreachable (ICMPv6: type 1 code 4), quoting the offending
/// header and the 8 bytes after it.
#[inline(always)]
fn icmp_port_unreachable<A: Family>(ctx: &TcContext, pkt: &Packet<A>) -> Result<(), NotRejected> {
    if pkt.l4_off != ETH_LEN + A::HDR_LEN {
        // IPv4 options or IPv6 extension headers: not worth quoting; the flow is dropped instead.
        return Err(NotRejected);
    }
    let quote: A::Quote = ctx.load(ETH_LEN).map_err(|_| NotRejected)?;
    let quote_len = mem::size_of::<A::Quote>();
    let [icmp_type, icmp_code] = A::ICMP_PORT_UNREACHABLE;
    let mut icmp = [icmp_type, icmp_code, 0, 0, 0, 0, 0, 0];
    let icmp_len = (ICMP_HDR_LEN + quote_len) as u16;
    let pseudo = if A::ICMP_PSEUDO_HEADER {
        pseudo_header_sum(pkt.daddr_be, pkt.saddr_be, A::ICMP_PROTO, icmp_len)
    } else {
        0
    };
    let csum = fold(sum_words(sum_words(pseudo, &icmp), quote.as_ref())).to_be_bytes();
    icmp[2] = csum[0];
    icmp[3] = csum[1];
    let ip = A::header(icmp_len, A::ICMP_PROTO, pkt.daddr_be, pkt.saddr_be);
    resize(ctx, ETH_LEN + A::HDR_LEN + ICMP_HDR_LEN + quote_len)?;
    ctx.store(ETH_LEN, &ip, 0).map_err(|_| NotRejected)?;
    ctx.store(ETH_LEN + A::HDR_LEN, &icmp, 0)
        .map_err(|_| NotRejected)?;
    ctx.store(ETH_LEN + A::HDR_LEN + ICMP_HDR_LEN, &quote, 0)
        .map_err(|_| NotRejected)
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), NotRejected> {
    // SAFETY: the context pointer is the program's own; the helper checks the length.
    let rc = unsafe { aya_ebpf::helpers::bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if rc == 0 { Ok(()) } else { Err(NotRejected) }
}
