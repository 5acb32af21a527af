//! Address and port rewrites with incremental checksum updates (RFC 1624 via the kernel helpers).
//!
//! The L4 checksum covers a pseudo-header with both addresses, so an address change is folded into
//! it with `BPF_F_PSEUDO_HDR`. UDP's checksum 0 means "none": `BPF_F_MARK_MANGLED_0` keeps it 0 and
//! writes a computed 0 as 0xffff. The TTL is not touched: translation is not a routing hop.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{IPPROTO_UDP, conntrack::CtEntry};

use crate::headers::{
    ETH_LEN, IPV4_CSUM_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet,
};

pub struct RewriteFailed;

/// Rewrites `pkt` to the addresses and ports `ct` says, fixing the IPv4 and TCP/UDP checksums.
#[inline(always)]
pub fn apply(ctx: &TcContext, pkt: &Packet, ct: &CtEntry) -> Result<(), RewriteFailed> {
    rewrite_field(
        ctx,
        pkt,
        ETH_LEN + IPV4_SRC_OFF,
        pkt.saddr_be,
        ct.new_saddr_be,
    )?;
    rewrite_field(
        ctx,
        pkt,
        ETH_LEN + IPV4_DST_OFF,
        pkt.daddr_be,
        ct.new_daddr_be,
    )?;
    rewrite_port(
        ctx,
        pkt,
        pkt.l4_off + L4_SPORT_OFF,
        pkt.sport_be,
        ct.new_sport_be,
    )?;
    rewrite_port(
        ctx,
        pkt,
        pkt.l4_off + L4_DPORT_OFF,
        pkt.dport_be,
        ct.new_dport_be,
    )
}

#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_field(
    ctx: &TcContext,
    pkt: &Packet,
    offset: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off(),
        old as u64,
        new as u64,
        l4_flags(pkt) | BPF_F_PSEUDO_HDR as u64 | 4,
    )
    .map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(ETH_LEN + IPV4_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(offset, &new, 0).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    pkt: &Packet,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(pkt.l4_csum_off(), old as u64, new as u64, l4_flags(pkt) | 2)
        .map_err(|_| RewriteFailed)?;
    ctx.store(offset, &new, 0).map_err(|_| RewriteFailed)
}
