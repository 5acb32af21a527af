//! Address and port rewrites with incremental checksum updates (RFC 1624), the one place that
//! turns a conntrack entry into packet bytes, for tc and XDP:
//!
//! - tc uses the kernel helpers. The L4 checksum covers a pseudo-header with both addresses, so
//!   an address change is folded into it with `BPF_F_PSEUDO_HDR`; UDP's checksum 0 means "none":
//!   `BPF_F_MARK_MANGLED_0` keeps it 0 and writes a computed 0 as 0xffff.
//! - XDP writes the frame directly and updates both checksums with [`checksum::update`], with
//!   the same UDP rule.
//!
//! The TTL is not touched: translation is not a routing hop.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::{IPPROTO_UDP, conntrack::CtEntry};
use network_types::ip::Ipv4Hdr;

use crate::{
    checksum,
    headers::{
        IPV4_CSUM_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet, frame_ptr,
    },
};

pub struct RewriteFailed;

/// Rewrites `pkt` to the addresses and ports `ct` says, fixing the IPv4 and TCP/UDP checksums.
#[inline(always)]
pub fn apply(ctx: &TcContext, pkt: &Packet, ct: &CtEntry) -> Result<(), RewriteFailed> {
    rewrite_field(
        ctx,
        pkt,
        pkt.l3_off + IPV4_SRC_OFF,
        pkt.saddr_be,
        ct.new_saddr_be,
    )?;
    rewrite_field(
        ctx,
        pkt,
        pkt.l3_off + IPV4_DST_OFF,
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
    ctx.l3_csum_replace(pkt.l3_off + IPV4_CSUM_OFF, old as u64, new as u64, 4)
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

/// [`apply`] on an XDP frame, with the MAC addresses for the next hop.
#[inline(always)]
pub fn apply_to_frame(
    ctx: &XdpContext,
    pkt: &Packet,
    ct: &CtEntry,
    macs: [[u8; 6]; 2],
) -> Result<(), RewriteFailed> {
    let eth: *mut [[u8; 6]; 2] = frame_ptr(ctx, 0).ok_or(RewriteFailed)?;
    let ip: *mut Ipv4Hdr = frame_ptr(ctx, pkt.l3_off).ok_or(RewriteFailed)?;
    let ports: *mut [u16; 2] = frame_ptr(ctx, pkt.l4_off).ok_or(RewriteFailed)?;
    let csum: *mut u16 = frame_ptr(ctx, pkt.l4_csum_off()).ok_or(RewriteFailed)?;
    let old = [
        pkt.saddr_be,
        pkt.daddr_be,
        (pkt.sport_be as u32) | ((pkt.dport_be as u32) << 16),
    ];
    let new = [
        ct.new_saddr_be,
        ct.new_daddr_be,
        (ct.new_sport_be as u32) | ((ct.new_dport_be as u32) << 16),
    ];
    // SAFETY: every pointer was bounds-checked by `frame_ptr` just above, and the frame is not
    // resized; the fields are plain integers.
    unsafe {
        *eth = macs;
        (*ip).src_addr = ct.new_saddr_be.to_ne_bytes();
        (*ip).dst_addr = ct.new_daddr_be.to_ne_bytes();
        (*ip).check =
            checksum::update(u16::from_ne_bytes((*ip).check), &old[..2], &new[..2]).to_ne_bytes();
        *ports = [ct.new_sport_be, ct.new_dport_be];
        let l4 = *csum;
        if !(pkt.proto == IPPROTO_UDP && l4 == 0) {
            let updated = checksum::update(l4, &old, &new);
            *csum = if pkt.proto == IPPROTO_UDP && updated == 0 {
                0xffff
            } else {
                updated
            };
        }
    }
    Ok(())
}
