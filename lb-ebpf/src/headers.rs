//! Header parsing, one parser for tc and XDP alike through [`PacketAccess`]: on tc a load is
//! `bpf_skb_load_bytes` (works on non-linear skbs), on XDP a bounds-checked read of the frame.
//! Either way a short packet is an error here rather than a verifier or memory problem, and
//! variable-length IPv4 headers (options) need no special casing.

use core::mem;

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, conntrack::FlowKey};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

pub const ETH_LEN: usize = EthHdr::LEN;
const ETHER_TYPE_OFF: usize = 12;
/// Offset of the IPv4 header checksum from the start of the IPv4 header.
pub const IPV4_CSUM_OFF: usize = 10;
pub const IPV4_SRC_OFF: usize = 12;
pub const IPV4_DST_OFF: usize = 16;
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
pub const ICMP_HDR_LEN: usize = 8;
/// An IPv4 header without options.
pub const IPV4_MIN_LEN: usize = 20;
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

/// An IPv4 TCP or UDP packet's addressing, with the offsets the rewriters need.
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Start of the IP header.
    pub l3_off: usize,
    /// Start of the TCP/UDP header.
    pub l4_off: usize,
    /// The TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// An ICMP destination-unreachable or time-exceeded message quoting a TCP/UDP packet: the error
/// about some flow's packet, travelling the other way.
pub struct IcmpError {
    pub outer_saddr_be: u32,
    pub outer_daddr_be: u32,
    /// Start of the ICMP header.
    pub icmp_off: usize,
    /// Start of the quoted IPv4 header (always 20 bytes: quotes with options are not handled).
    pub inner_ip_off: usize,
    /// The quoted packet's addressing, as it was where the error arose.
    pub inner_saddr_be: u32,
    pub inner_daddr_be: u32,
    pub inner_sport_be: u16,
    pub inner_dport_be: u16,
    pub inner_proto: u8,
}

/// What the packet path may act on.
pub enum Parsed {
    Flow(Packet),
    IcmpError(IcmpError),
}

impl Packet {
    /// The conntrack key of the packet's direction of its flow.
    #[inline(always)]
    pub fn flow(&self) -> FlowKey {
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
    /// Legitimately not ours: not IPv4, not TCP/UDP/ICMP error, a non-first fragment.
    Pass,
    /// Claims to be IPv4 TCP/UDP but headers are cut short or inconsistent.
    Malformed,
}

#[inline(always)]
pub fn parse<C: PacketAccess>(ctx: &C) -> Result<Parsed, NotHandled> {
    let ether_type: u16 = ctx.read(ETHER_TYPE_OFF).ok_or(NotHandled::Malformed)?;
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(NotHandled::Pass);
    }
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
    let proto = ip.proto;
    if proto == IPPROTO_ICMP {
        return icmp_error(ctx, &ip, l4_off).map(Parsed::IcmpError);
    }
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
    Ok(Parsed::Flow(Packet {
        saddr_be: u32::from_ne_bytes(ip.src_addr),
        daddr_be: u32::from_ne_bytes(ip.dst_addr),
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        l3_off: ETH_LEN,
        l4_off,
        tcp_flags,
    }))
}

/// An ICMP error quoting a TCP/UDP packet; anything else ICMP (echo, ...) is not ours.
#[inline(always)]
fn icmp_error<C: PacketAccess>(
    ctx: &C,
    ip: &Ipv4Hdr,
    icmp_off: usize,
) -> Result<IcmpError, NotHandled> {
    let icmp_type: u8 = ctx.read(icmp_off).ok_or(NotHandled::Malformed)?;
    if icmp_type != ICMP_DEST_UNREACHABLE && icmp_type != ICMP_TIME_EXCEEDED {
        return Err(NotHandled::Pass);
    }
    let inner_ip_off = icmp_off + ICMP_HDR_LEN;
    let inner: Ipv4Hdr = ctx.read(inner_ip_off).ok_or(NotHandled::Malformed)?;
    if inner.version() != 4 || inner.ihl() as usize != IPV4_MIN_LEN {
        // A quote with IP options (or garbage) is left alone: rare, and not worth a second
        // variable-offset parse.
        return Err(NotHandled::Pass);
    }
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return Err(NotHandled::Pass);
    }
    // Every ICMP error quotes at least 8 bytes past the IP header: both ports are there.
    let ports: [u8; 4] = ctx
        .read(inner_ip_off + IPV4_MIN_LEN)
        .ok_or(NotHandled::Malformed)?;
    Ok(IcmpError {
        outer_saddr_be: u32::from_ne_bytes(ip.src_addr),
        outer_daddr_be: u32::from_ne_bytes(ip.dst_addr),
        icmp_off,
        inner_ip_off,
        inner_saddr_be: u32::from_ne_bytes(inner.src_addr),
        inner_daddr_be: u32::from_ne_bytes(inner.dst_addr),
        inner_sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        inner_dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        inner_proto: inner.proto,
    })
}
