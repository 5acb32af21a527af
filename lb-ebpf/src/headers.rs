//! Header parsing for the tc path. Loads go through `bpf_skb_load_bytes` (`TcContext::load`), which
//! bounds-checks against the packet, so a short packet is an error here rather than a verifier or
//! memory problem, and variable-length IPv4 headers (options) need no special casing.

use aya_ebpf::programs::TcContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

pub const ETH_LEN: usize = EthHdr::LEN;
/// Offset of the IPv4 header checksum from the start of the IPv4 header.
pub const IPV4_CSUM_OFF: usize = 10;
pub const IPV4_SRC_OFF: usize = 12;
pub const IPV4_DST_OFF: usize = 16;
/// Offsets of the ports from the start of the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;

/// An IPv4 TCP or UDP packet's addressing, with the offsets the rewriters need.
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Start of the TCP/UDP header.
    pub l4_off: usize,
}

impl Packet {
    /// Where the L4 checksum sits.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == IPPROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }
}

/// Why a packet is not one the load balancer handles.
pub enum NotHandled {
    /// Legitimately not ours: not IPv4, not TCP/UDP, a non-first fragment.
    Pass,
    /// Claims to be IPv4 TCP/UDP but headers are cut short or inconsistent.
    Malformed,
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, NotHandled> {
    let eth: EthHdr = ctx.load(0).map_err(|_| NotHandled::Malformed)?;
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err(NotHandled::Pass);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| NotHandled::Malformed)?;
    if ip.version() != 4 || ip.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(NotHandled::Malformed);
    }
    // Only the first fragment carries the L4 header; later ones are left alone.
    if ip.frag_offset() != 0 {
        return Err(NotHandled::Pass);
    }
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(NotHandled::Pass);
    }
    // `ihl()` is in bytes (20..=60), so options are simply skipped.
    let l4_off = ETH_LEN + (ip.ihl() as usize & 0x3c);
    let l4_len = if proto == IPPROTO_TCP {
        TCP_MIN_LEN
    } else {
        UDP_LEN
    };
    // The whole fixed L4 header must be present: the checksum lies at its end for TCP.
    let last_byte = l4_off + l4_len - 1;
    ctx.load::<u8>(last_byte)
        .map_err(|_| NotHandled::Malformed)?;
    let ports: [u8; 4] = ctx.load(l4_off).map_err(|_| NotHandled::Malformed)?;
    Ok(Packet {
        saddr_be: u32::from_ne_bytes(ip.src_addr),
        daddr_be: u32::from_ne_bytes(ip.dst_addr),
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        l4_off,
    })
}
