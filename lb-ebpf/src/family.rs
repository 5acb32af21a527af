//! What differs between address families on the packet path, in one trait: each family's maps,
//! where its header keeps the addresses, whether it has a header checksum, and how an answer's
//! header is built. Every layer above (`lb`, `conntrack`, `nat`, `icmp`, `reject`, `fib`) is
//! generic over [`Family`] and compiled once per family. Only IPv4 implements it so far; IPv6
//! (issue 14) adds its maps and an `impl Family for Ip6`, and an IPv4 packet keeps running the
//! code it runs now.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
};
use lb_common::{
    Address, IPPROTO_ICMP, IPPROTO_ICMPV6, Ip6,
    conntrack::{CtEntry, FlowKey},
    service::{
        AffinityKey, AffinityValue, Backend, BackendId, SOURCE_RANGE_LOOKUP_BITS,
        SOURCE_RANGE_LOOKUP_BITS6, ServiceEntry, ServiceKey, SourceRange, SourceRangeValue,
    },
};

use crate::{
    checksum::{fold, sum_words},
    maps::{
        LB_AFFINITY, LB_AFFINITY6, LB_BACKENDS, LB_BACKENDS6, LB_CONNTRACK, LB_CONNTRACK6,
        LB_NEW_FLOW4, LB_NEW_FLOW6, LB_SERVICES, LB_SERVICES6, LB_SOURCE_RANGES, LB_SOURCE_RANGES6,
        NewFlowScratch, node_config, node_config6,
    },
};

pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;

pub trait Family: Address + 'static {
    /// `AF_INET` / `AF_INET6`, for the FIB lookup.
    const AF: u8;
    /// Where the source and destination addresses sit in the IP header.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// The IP header's checksum, if the family has one (IPv4's, at this offset).
    const L3_CSUM_OFF: Option<usize>;
    /// The header without options or extension headers (what lb builds for its answers, and the
    /// only quoted header it translates).
    const HDR_LEN: usize;
    /// The first byte of such a header: (mask, value). IPv4: version 4 and a 20-byte header;
    /// IPv6: version 6.
    const PLAIN_HEADER_FIRST_BYTE: (u8, u8);
    /// Where the header says the protocol (IPv6: the next header).
    const PROTO_OFF: usize;
    /// Where the header's length field is, and what to add to it for the whole packet's length
    /// from the IP header on (IPv4 counts its header, IPv6 does not count its fixed one).
    const LEN_FIELD: (usize, u16);
    /// The family's ICMP: its protocol number, and whether its checksum covers a pseudo-header
    /// (ICMPv6's does, ICMPv4's does not).
    const ICMP_PROTO: u8;
    const ICMP_PSEUDO_HEADER: bool;
    /// ICMP destination unreachable, port unreachable: type and code.
    const ICMP_PORT_UNREACHABLE: [u8; 2];
    type Header: Copy;
    /// What an ICMP error quotes of the packet it is about: its (plain) header and the 8 bytes
    /// after it, the ports included.
    type Quote: Copy + AsRef<[u8]>;

    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceEntry>;
    fn backends() -> &'static HashMap<BackendId, Backend<Self>>;
    fn conntrack() -> &'static LruHashMap<FlowKey<Self>, CtEntry<Self>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue>;
    /// The family's source-range trie, and the prefix length of a lookup in it (the set id and
    /// the whole address).
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self>, SourceRangeValue>;
    const SOURCE_RANGE_LOOKUP_BITS: u32;

    /// Whether `addr_be` lies in some range of source-range set `set_id`.
    #[inline(always)]
    fn source_allowed(set_id: u32, addr_be: Self) -> bool {
        let key = Key::new(
            Self::SOURCE_RANGE_LOOKUP_BITS,
            SourceRange { set_id, addr_be },
        );
        Self::source_ranges().get(&key).is_some()
    }
    /// This CPU's working set for a new flow of this family.
    fn new_flow_scratch() -> Option<*mut NewFlowScratch<Self>>;
    /// The node's SNAT address of this family; unspecified when it has none.
    fn snat_addr() -> Self;
    /// Puts the addresses into a FIB lookup's parameters.
    fn fib_addrs(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self);
    /// An answer's IP header (`payload_len` bytes follow it), checksum filled in if it has one.
    fn header(payload_len: u16, proto: u8, saddr: Self, daddr: Self) -> Self::Header;
}

impl Family for u32 {
    const AF: u8 = 2;
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;
    const L3_CSUM_OFF: Option<usize> = Some(10);
    const HDR_LEN: usize = IPV4_HDR_LEN;
    const PLAIN_HEADER_FIRST_BYTE: (u8, u8) = (0xff, 0x45);
    const PROTO_OFF: usize = 9;
    const LEN_FIELD: (usize, u16) = (2, 0);
    const ICMP_PROTO: u8 = IPPROTO_ICMP;
    const ICMP_PSEUDO_HEADER: bool = false;
    const ICMP_PORT_UNREACHABLE: [u8; 2] = [3, 3];
    type Header = [u8; IPV4_HDR_LEN];
    type Quote = [u8; IPV4_HDR_LEN + 8];

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceEntry> {
        &LB_SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendId, Backend<Self>> {
        &LB_BACKENDS
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<FlowKey<Self>, CtEntry<Self>> {
        &LB_CONNTRACK
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue> {
        &LB_AFFINITY
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self>, SourceRangeValue> {
        &LB_SOURCE_RANGES
    }
    const SOURCE_RANGE_LOOKUP_BITS: u32 = SOURCE_RANGE_LOOKUP_BITS;
    #[inline(always)]
    fn new_flow_scratch() -> Option<*mut NewFlowScratch<Self>> {
        LB_NEW_FLOW4.get_ptr_mut(0)
    }
    #[inline(always)]
    fn snat_addr() -> Self {
        node_config().snat_addr_be
    }
    #[inline(always)]
    fn fib_addrs(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self) {
        params.__bindgen_anon_3.ipv4_src = saddr;
        params.__bindgen_anon_4.ipv4_dst = daddr;
    }
    #[inline(always)]
    fn header(payload_len: u16, proto: u8, saddr: Self, daddr: Self) -> Self::Header {
        let len = (payload_len + IPV4_HDR_LEN as u16).to_be_bytes();
        let s = saddr.to_ne_bytes();
        let d = daddr.to_ne_bytes();
        let mut h = [
            0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0, s[0], s[1], s[2], s[3], d[0],
            d[1], d[2], d[3],
        ];
        let csum = fold(sum_words(0, &h)).to_be_bytes();
        h[10] = csum[0];
        h[11] = csum[1];
        h
    }
}

impl Family for Ip6 {
    const AF: u8 = 10;
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;
    const L3_CSUM_OFF: Option<usize> = None;
    const HDR_LEN: usize = IPV6_HDR_LEN;
    const PLAIN_HEADER_FIRST_BYTE: (u8, u8) = (0xf0, 0x60);
    const PROTO_OFF: usize = 6;
    const LEN_FIELD: (usize, u16) = (4, IPV6_HDR_LEN as u16);
    const ICMP_PROTO: u8 = IPPROTO_ICMPV6;
    const ICMP_PSEUDO_HEADER: bool = true;
    const ICMP_PORT_UNREACHABLE: [u8; 2] = [1, 4];
    type Header = [u32; IPV6_HDR_LEN / 4];
    type Quote = [u8; IPV6_HDR_LEN + 8];

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Self>, ServiceEntry> {
        &LB_SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendId, Backend<Self>> {
        &LB_BACKENDS6
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<FlowKey<Self>, CtEntry<Self>> {
        &LB_CONNTRACK6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue> {
        &LB_AFFINITY6
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self>, SourceRangeValue> {
        &LB_SOURCE_RANGES6
    }
    const SOURCE_RANGE_LOOKUP_BITS: u32 = SOURCE_RANGE_LOOKUP_BITS6;
    #[inline(always)]
    fn new_flow_scratch() -> Option<*mut NewFlowScratch<Self>> {
        LB_NEW_FLOW6.get_ptr_mut(0)
    }
    #[inline(always)]
    fn snat_addr() -> Self {
        node_config6().snat_addr_be
    }
    #[inline(always)]
    fn fib_addrs(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self) {
        params.__bindgen_anon_3.ipv6_src = saddr;
        params.__bindgen_anon_4.ipv6_dst = daddr;
    }
    #[inline(always)]
    fn header(payload_len: u16, proto: u8, saddr: Self, daddr: Self) -> Self::Header {
        // Built as words: byte by byte, each byte would take a stack slot of its own.
        let len = payload_len.to_be_bytes();
        [
            u32::from_ne_bytes([0x60, 0, 0, 0]),
            u32::from_ne_bytes([len[0], len[1], proto, 64]),
            saddr[0],
            saddr[1],
            saddr[2],
            saddr[3],
            daddr[0],
            daddr[1],
            daddr[2],
            daddr[3],
        ]
    }
}
