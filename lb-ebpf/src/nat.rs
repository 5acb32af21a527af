//! Address and port rewrites with incremental checksum updates (RFC 1624 via the kernel helpers).
//!
//! The L4 checksum covers a pseudo-header with both addresses, so an address change is folded into
//! it with `BPF_F_PSEUDO_HDR`. UDP's checksum 0 means "none": `BPF_F_MARK_MANGLED_0` keeps it 0 and
//! writes a computed 0 as 0xffff. The TTL is not touched: translation is not a routing hop.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::IPPROTO_UDP;

use crate::headers::{
    ETH_LEN, IPV4_CSUM_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

pub struct RewriteFailed;

/// Rewrites one end of `pkt` to `addr_be:port_be`, fixing the IPv4 and TCP/UDP checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    addr_be: u32,
    port_be: u16,
) -> Result<(), RewriteFailed> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (
            pkt.saddr_be,
            pkt.sport_be,
            ETH_LEN + IPV4_SRC_OFF,
            pkt.l4_off + L4_SPORT_OFF,
        ),
        End::Destination => (
            pkt.daddr_be,
            pkt.dport_be,
            ETH_LEN + IPV4_DST_OFF,
            pkt.l4_off + L4_DPORT_OFF,
        ),
    };
    let l4_flags = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off();

    if old_addr != addr_be {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            addr_be as u64,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| RewriteFailed)?;
        ctx.l3_csum_replace(ETH_LEN + IPV4_CSUM_OFF, old_addr as u64, addr_be as u64, 4)
            .map_err(|_| RewriteFailed)?;
        ctx.store(addr_off, &addr_be, 0)
            .map_err(|_| RewriteFailed)?;
    }
    if old_port != port_be {
        ctx.l4_csum_replace(csum_off, old_port as u64, port_be as u64, l4_flags | 2)
            .map_err(|_| RewriteFailed)?;
        ctx.store(port_off, &port_be, 0)
            .map_err(|_| RewriteFailed)?;
    }
    Ok(())
}
