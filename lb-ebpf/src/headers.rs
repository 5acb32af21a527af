//! Header parsing, one parser for tc and XDP alike through [`PacketAccess`]: on tc a load is
//! `bpf_skb_load_bytes` (works on non-linear skbs), on XDP a bounds-checked read of the frame.
//! Either way a short packet is an error here rather than a verifier or memory problem, and
//! variable-length headers (IPv4 options) need no special casing. The types are generic over the
//! address family; only IPv4 is parsed so far (IPv6 passes, see docs/design.md).

use core::mem;

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ip6, conntrack::FlowKey};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::family::{Family, IPV6_HDR_LEN};

pub const ETH_LEN: usize = EthHdr::LEN;
const ETHER_TYPE_OFF: usize = 12;
/// Offsets of the ports from the start of the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
const TCP_CSUM_OFF: usize = 16;
/// Offset of the flags byte from the start of the TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
// IPv6 extension headers skipped on the way to the TCP/UDP header.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTIONS: u8 = 60;
/// Extension headers followed at most; a packet with more passes untouched. (RFC 8200's order
/// has at most six before the upper layer; real traffic carries zero or one.)
const IPV6_MAX_EXT_HEADERS: usize = 4;
pub const ICMP_HDR_LEN: usize = 8;
/// An IPv4 header without options.
const UDP_CSUM_OFF: usize = 6;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;

/// Reading a value at an offset of the packet, bounds-checked.
pub trait PacketAccess {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl PacketAccess for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }
}

impl PacketAccess for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let at = frame_ptr::<T>(self, offset)?;
        // SAFETY: `frame_ptr` checked that the value lies inside the frame; unaligned reads of
        // plain data are allowed.
        Some(unsafe { core::ptr::read_unaligned(at) })
    }
}

/// A bounds-checked pointer to a `T` at `offset` into an XDP frame.
#[inline(always)]
pub fn frame_ptr<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A TCP or UDP packet's addressing, with the offsets the rewriters need; `A` is its family.
pub struct Packet<A> {
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Start of the IP header.
    pub l3_off: usize,
    /// Start of the TCP/UDP header (after IPv4 options).
    pub l4_off: usize,
    /// The TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// An ICMP destination-unreachable or time-exceeded message quoting a TCP/UDP packet: the error
/// about some flow's packet, travelling the other way.
pub struct IcmpError<A> {
    pub outer_saddr_be: A,
    pub outer_daddr_be: A,
    /// Start of the ICMP header.
    pub icmp_off: usize,
    /// Start of the quoted IP header (20 bytes for IPv4, 40 for IPv6: quotes with options or
    /// extension headers are not handled).
    pub inner_ip_off: usize,
    /// The quoted packet's addressing, as it was where the error arose.
    pub inner_saddr_be: A,
    pub inner_daddr_be: A,
    pub inner_sport_be: u16,
    pub inner_dport_be: u16,
    pub inner_proto: u8,
}

impl<A: Family> IcmpError<A> {
    /// Where the quoted packet's ports are.
    #[inline(always)]
    pub fn inner_l4_off(&self) -> usize {
        self.inner_ip_off + A::HDR_LEN
    }
}

/// What the packet path may act on.
pub enum Parsed<A> {
    Flow(Packet<A>),
    IcmpError(IcmpError<A>),
}

/// The packet's IP version, from its EtherType.
pub enum IpVersion {
    V4,
    V6,
}

impl<A: Family> Packet<A> {
    /// The conntrack key of the packet's direction of its flow.
    #[inline(always)]
    pub fn flow(&self) -> FlowKey<A> {
        FlowKey::new(
            self.saddr_be,
            self.daddr_be,
            self.sport_be,
            self.dport_be,
            self.proto,
        )
    }

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
    /// Legitimately not ours: not IP, not TCP/UDP/ICMP error, a non-first fragment.
    Pass,
    /// Claims to be IP TCP/UDP but headers are cut short or inconsistent.
    Malformed,
}

/// Which family's path the packet takes; anything not IP is not ours.
#[inline(always)]
pub fn ip_version<C: PacketAccess>(ctx: &C) -> Result<IpVersion, NotHandled> {
    let ether_type: u16 = ctx.read(ETHER_TYPE_OFF).ok_or(NotHandled::Malformed)?;
    if ether_type == EtherType::Ipv4 as u16 {
        Ok(IpVersion::V4)
    } else if ether_type == EtherType::Ipv6 as u16 {
        Ok(IpVersion::V6)
    } else {
        Err(NotHandled::Pass)
    }
}

/// Parsing a packet of the family whose EtherType it has.
pub trait Parse: Family {
    fn parse<C: PacketAccess>(ctx: &C) -> Result<Parsed<Self>, NotHandled>;
}

impl Parse for u32 {
    #[inline(always)]
    fn parse<C: PacketAccess>(ctx: &C) -> Result<Parsed<Self>, NotHandled> {
        parse4(ctx)
    }
}

impl Parse for Ip6 {
    #[inline(always)]
    fn parse<C: PacketAccess>(ctx: &C) -> Result<Parsed<Self>, NotHandled> {
        parse6(ctx)
    }
}

#[inline(always)]
fn parse4<C: PacketAccess>(ctx: &C) -> Result<Parsed<u32>, NotHandled> {
    let ip: Ipv4Hdr = ctx.read(ETH_LEN).ok_or(NotHandled::Malformed)?;
    if ip.version() != 4 || ip.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(NotHandled::Malformed);
    }
    // Only the first fragment carries the L4 header; later ones are left alone.
    if ip.frag_offset() != 0 {
        return Err(NotHandled::Pass);
    }
    // `ihl()` is in bytes (20..=60), so options are simply skipped.
    let l4_off = ETH_LEN + (ip.ihl() as usize & 0x3c);
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let daddr = u32::from_ne_bytes(ip.dst_addr);
    let proto = ip.proto;
    if proto == IPPROTO_ICMP {
        return icmp_error(
            ctx,
            saddr,
            daddr,
            l4_off,
            [ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED],
        )
        .map(Parsed::IcmpError);
    }
    flow(ctx, saddr, daddr, proto, l4_off).map(Parsed::Flow)
}

#[inline(always)]
fn parse6<C: PacketAccess>(ctx: &C) -> Result<Parsed<Ip6>, NotHandled> {
    // The fixed part before the addresses (version, ..., next header, hop limit); the addresses
    // are read as words once the chain is followed (held as bytes across it, they would take
    // 32 stack slots).
    let fixed: [u8; 8] = ctx.read(ETH_LEN).ok_or(NotHandled::Malformed)?;
    if fixed[0] >> 4 != 6 {
        return Err(NotHandled::Malformed);
    }
    let (proto, l4_off) = skip_extension_headers(ctx, fixed[6])?;
    let saddr: Ip6 = ctx
        .read(ETH_LEN + Ip6::SRC_OFF)
        .ok_or(NotHandled::Malformed)?;
    let daddr: Ip6 = ctx
        .read(ETH_LEN + Ip6::DST_OFF)
        .ok_or(NotHandled::Malformed)?;
    if proto == IPPROTO_ICMPV6 {
        return icmp_error(
            ctx,
            saddr,
            daddr,
            l4_off,
            [
                ICMPV6_DEST_UNREACHABLE,
                ICMPV6_PACKET_TOO_BIG,
                ICMPV6_TIME_EXCEEDED,
            ],
        )
        .map(Parsed::IcmpError);
    }
    flow(ctx, saddr, daddr, proto, l4_off).map(Parsed::Flow)
}

/// Follows IPv6 extension headers from `next` to the upper-layer protocol: its number and where
/// it starts. A non-first fragment, a routing header with segments left (the destination is
/// not final yet) and a chain longer than lb follows pass untouched.
#[inline(always)]
fn skip_extension_headers<C: PacketAccess>(
    ctx: &C,
    mut next: u8,
) -> Result<(u8, usize), NotHandled> {
    let mut off = ETH_LEN + IPV6_HDR_LEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTIONS | IPV6_ROUTING => {
                // Next header, length in 8-byte units not counting the first, then (routing)
                // type and segments left.
                let h: [u8; 4] = ctx.read(off).ok_or(NotHandled::Malformed)?;
                if next == IPV6_ROUTING && h[3] != 0 {
                    return Err(NotHandled::Pass);
                }
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let h: [u8; 4] = ctx.read(off).ok_or(NotHandled::Malformed)?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Err(NotHandled::Pass);
                }
                next = h[0];
                off += 8;
            }
            IPV6_AUTH => {
                // Its length is in 4-byte units, not counting the first two.
                let h: [u8; 2] = ctx.read(off).ok_or(NotHandled::Malformed)?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            _ => return Ok((next, off)),
        }
    }
    match next {
        IPV6_HOP_BY_HOP | IPV6_DEST_OPTIONS | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH => {
            Err(NotHandled::Pass)
        }
        _ => Ok((next, off)),
    }
}

/// A TCP or UDP packet from its addresses and where its L4 header starts.
#[inline(always)]
fn flow<C: PacketAccess, A: Family>(
    ctx: &C,
    saddr_be: A,
    daddr_be: A,
    proto: u8,
    l4_off: usize,
) -> Result<Packet<A>, NotHandled> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(NotHandled::Pass);
    }
    // One load of the whole fixed L4 header: it must all be there (the TCP checksum lies at
    // its end), and it holds the ports and the TCP flags.
    let (ports, tcp_flags) = if proto == IPPROTO_TCP {
        let tcp: [u8; TCP_MIN_LEN] = ctx.read(l4_off).ok_or(NotHandled::Malformed)?;
        ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS_OFF])
    } else {
        let udp: [u8; UDP_LEN] = ctx.read(l4_off).ok_or(NotHandled::Malformed)?;
        ([udp[0], udp[1], udp[2], udp[3]], 0)
    };
    Ok(Packet {
        saddr_be,
        daddr_be,
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        l3_off: ETH_LEN,
        l4_off,
        tcp_flags,
    })
}

/// An ICMP error (of one of `error_types`) quoting a TCP/UDP packet; anything else ICMP (echo,
/// neighbour discovery, ...) is not ours.
#[inline(always)]
fn icmp_error<C: PacketAccess, A: Family, const N: usize>(
    ctx: &C,
    outer_saddr_be: A,
    outer_daddr_be: A,
    icmp_off: usize,
    error_types: [u8; N],
) -> Result<IcmpError<A>, NotHandled> {
    let icmp_type: u8 = ctx.read(icmp_off).ok_or(NotHandled::Malformed)?;
    if !error_types.contains(&icmp_type) {
        return Err(NotHandled::Pass);
    }
    let inner_ip_off = icmp_off + ICMP_HDR_LEN;
    let (inner_saddr_be, inner_daddr_be, inner_proto) = quoted_header::<C, A>(ctx, inner_ip_off)?;
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return Err(NotHandled::Pass);
    }
    // Every ICMP error quotes at least 8 bytes past the IP header: both ports are there.
    let ports: [u8; 4] = ctx
        .read(inner_ip_off + A::HDR_LEN)
        .ok_or(NotHandled::Malformed)?;
    Ok(IcmpError {
        outer_saddr_be,
        outer_daddr_be,
        icmp_off,
        inner_ip_off,
        inner_saddr_be,
        inner_daddr_be,
        inner_sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        inner_dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        inner_proto,
    })
}

/// The quoted IP header's addresses and protocol. A quote with IPv4 options or IPv6 extension
/// headers (or garbage) is left alone: rare, and not worth a second variable-offset parse.
#[inline(always)]
fn quoted_header<C: PacketAccess, A: Family>(ctx: &C, at: usize) -> Result<(A, A, u8), NotHandled> {
    let first: u8 = ctx.read(at).ok_or(NotHandled::Malformed)?;
    let (mask, plain) = A::PLAIN_HEADER_FIRST_BYTE;
    if first & mask != plain {
        return Err(NotHandled::Pass);
    }
    let proto: u8 = ctx.read(at + A::PROTO_OFF).ok_or(NotHandled::Malformed)?;
    let saddr: A = ctx.read(at + A::SRC_OFF).ok_or(NotHandled::Malformed)?;
    let daddr: A = ctx.read(at + A::DST_OFF).ok_or(NotHandled::Malformed)?;
    Ok((saddr, daddr, proto))
}
