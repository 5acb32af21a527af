//! Address and port rewrites with incremental checksum updates (RFC 1624), the one place that
//! turns a conntrack entry into packet bytes, for tc and XDP and both families:
//!
//! - tc uses the kernel helpers. The L4 checksum covers a pseudo-header with both addresses, so
//!   an address change is folded into it with `BPF_F_PSEUDO_HDR`, a 32-bit word at a time (one
//!   word per IPv4 address, four per IPv6 one); IPv4 also fixes its header checksum, IPv6 has
//!   none. UDP's checksum 0 means "none" (IPv4 only; IPv6 requires one):
//!   `BPF_F_MARK_MANGLED_0` keeps it 0 and writes a computed 0 as 0xffff.
//! - XDP writes the frame directly and updates the checksums with [`checksum::update`], with
//!   the same UDP rule.
//!
//! The TTL / hop limit is not touched: translation is not a routing hop.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::{IPPROTO_UDP, conntrack::CtEntry};

use crate::{
    checksum,
    family::Family,
    headers::{L4_DPORT_OFF, L4_SPORT_OFF, Packet, frame_ptr},
};

pub struct RewriteFailed;

/// Rewrites `pkt` to the addresses and ports `ct` says, fixing the IP and TCP/UDP checksums.
#[inline(always)]
pub fn apply<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    ct: &CtEntry<A>,
) -> Result<(), RewriteFailed> {
    rewrite_addr(
        ctx,
        pkt,
        pkt.l3_off + A::SRC_OFF,
        pkt.saddr_be,
        ct.new_saddr_be,
    )?;
    rewrite_addr(
        ctx,
        pkt,
        pkt.l3_off + A::DST_OFF,
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
fn l4_flags<A>(pkt: &Packet<A>) -> u64 {
    if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_addr<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    offset: usize,
    old: A,
    new: A,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    checksum::changed_words(old, new, |o, n| {
        ctx.l4_csum_replace(
            pkt.l4_csum_off(),
            o as u64,
            n as u64,
            l4_flags(pkt) | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| RewriteFailed)?;
        if let Some(csum_off) = A::L3_CSUM_OFF {
            ctx.l3_csum_replace(pkt.l3_off + csum_off, o as u64, n as u64, 4)
                .map_err(|_| RewriteFailed)?;
        }
        Ok(())
    })?;
    ctx.store(offset, &new, 0).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn rewrite_port<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
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
pub fn apply_to_frame<A: Family>(
    ctx: &XdpContext,
    pkt: &Packet<A>,
    ct: &CtEntry<A>,
    macs: [[u8; 6]; 2],
) -> Result<(), RewriteFailed> {
    let eth: *mut [[u8; 6]; 2] = frame_ptr(ctx, 0).ok_or(RewriteFailed)?;
    let src: *mut A = frame_ptr(ctx, pkt.l3_off + A::SRC_OFF).ok_or(RewriteFailed)?;
    let dst: *mut A = frame_ptr(ctx, pkt.l3_off + A::DST_OFF).ok_or(RewriteFailed)?;
    let ports: *mut [u16; 2] = frame_ptr(ctx, pkt.l4_off).ok_or(RewriteFailed)?;
    let csum: *mut u16 = frame_ptr(ctx, pkt.l4_csum_off()).ok_or(RewriteFailed)?;
    let old_ports = [(pkt.sport_be as u32) | ((pkt.dport_be as u32) << 16)];
    let new_ports = [(ct.new_sport_be as u32) | ((ct.new_dport_be as u32) << 16)];
    let l3_csum: Option<*mut u16> = match A::L3_CSUM_OFF {
        Some(off) => Some(frame_ptr(ctx, pkt.l3_off + off).ok_or(RewriteFailed)?),
        None => None,
    };
    // SAFETY: every pointer was bounds-checked by `frame_ptr` just above, and the frame is not
    // resized; the fields are plain integers, written unaligned where the header may not be
    // 4-byte aligned in the frame.
    unsafe {
        *eth = macs;
        src.write_unaligned(ct.new_saddr_be);
        dst.write_unaligned(ct.new_daddr_be);
        let addrs = [
            (pkt.saddr_be.words(), ct.new_saddr_be.words()),
            (pkt.daddr_be.words(), ct.new_daddr_be.words()),
        ];
        if let Some(l3) = l3_csum {
            l3.write_unaligned(checksum::update(l3.read_unaligned(), &addrs));
        }
        ports.write_unaligned([ct.new_sport_be, ct.new_dport_be]);
        let l4 = csum.read_unaligned();
        if !(pkt.proto == IPPROTO_UDP && l4 == 0) {
            let updated = checksum::update(l4, &[addrs[0], addrs[1], (&old_ports, &new_ports)]);
            csum.write_unaligned(if pkt.proto == IPPROTO_UDP && updated == 0 {
                0xffff
            } else {
                updated
            });
        }
    }
    Ok(())
}
