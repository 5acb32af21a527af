//! The two address families as map fields. Every map type that holds an address is generic over
//! it: `u32` for IPv4 (the default, so `FlowKey` alone means the IPv4 layout every earlier agent
//! wrote) and [`Ip6`] for IPv6. Each family has its own maps, so IPv4 keys stay 16 bytes and an
//! IPv4 packet pays nothing for IPv6 (docs/design.md, "IPv6 and dual-stack").

/// An IPv6 address as a map field: its 16 bytes in wire order, as four `u32` words whose memory
/// holds them in wire order (like every `_be` field). Four words, not sixteen bytes, so a
/// key's fields stay 4-byte aligned and the checksum code works a word at a time.
pub type Ip6 = [u32; 4];

/// What the packet path and the flow hash need of an address field, for either family.
pub trait Address: Copy + PartialEq + Default {
    /// The family's address, unset (no SNAT address, ...).
    const UNSPECIFIED: Self;
    /// The address as `u32` words in wire order: one for IPv4, four for IPv6.
    fn words(&self) -> &[u32];
    /// The address in IPv6 form (IPv4 as `::ffff:a.b.c.d`), for records that hold either family.
    fn to_wide(self) -> Ip6;
}

impl Address for u32 {
    const UNSPECIFIED: Self = 0;

    #[inline(always)]
    fn words(&self) -> &[u32] {
        core::slice::from_ref(self)
    }

    #[inline(always)]
    fn to_wide(self) -> Ip6 {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), self]
    }
}

impl Address for Ip6 {
    const UNSPECIFIED: Self = [0; 4];

    #[inline(always)]
    fn words(&self) -> &[u32] {
        self
    }

    #[inline(always)]
    fn to_wide(self) -> Ip6 {
        self
    }
}

/// An IPv6 address field from its 16 wire-order bytes.
#[inline(always)]
pub const fn ip6_be(octets: [u8; 16]) -> Ip6 {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 wire-order bytes of an IPv6 address field.
#[inline(always)]
pub const fn ip6_octets(addr: Ip6) -> [u8; 16] {
    let w = [
        addr[0].to_ne_bytes(),
        addr[1].to_ne_bytes(),
        addr[2].to_ne_bytes(),
        addr[3].to_ne_bytes(),
    ];
    [
        w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3], w[2][0], w[2][1],
        w[2][2], w[2][3], w[3][0], w[3][1], w[3][2], w[3][3],
    ]
}

/// The address a wide field holds: IPv4 for `::ffff:a.b.c.d`, else IPv6.
pub fn ip_from_wide(addr: Ip6) -> core::net::IpAddr {
    let v6 = core::net::Ipv6Addr::from(ip6_octets(addr));
    v6.to_ipv4_mapped()
        .map_or(core::net::IpAddr::V6(v6), core::net::IpAddr::V4)
}

/// The wide field of an address: IPv4 as `::ffff:a.b.c.d`.
pub fn wide_from_ip(addr: core::net::IpAddr) -> Ip6 {
    match addr {
        core::net::IpAddr::V4(v4) => crate::addr_be(v4.octets()).to_wide(),
        core::net::IpAddr::V6(v6) => ip6_be(v6.octets()),
    }
}

/// The IPv4 field a wide one holds, if it holds IPv4 (`::ffff:a.b.c.d`).
pub fn narrow(addr: Ip6) -> Option<u32> {
    (addr[..3] == [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])]).then_some(addr[3])
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;

    #[test]
    fn ipv6_fields_keep_wire_order() {
        let octets: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        assert_eq!(ip6_octets(ip6_be(octets)), octets);
        let wide = crate::addr_be([10, 0, 0, 1]).to_wide();
        assert_eq!(
            ip6_octets(wide),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
        );
        assert_eq!(ip_from_wide(wide).to_string(), "10.0.0.1");
        assert_eq!(narrow(wide), Some(crate::addr_be([10, 0, 0, 1])));
        assert_eq!(wide_from_ip("10.0.0.1".parse().unwrap()), wide);
        assert_eq!(narrow(ip6_be(octets)), None);
        assert_eq!(wide_from_ip(ip_from_wide(ip6_be(octets))), ip6_be(octets));
        assert_eq!(
            ip_from_wide(ip6_be(octets)).to_string(),
            "102:304:506:708:90a:b0c:d0e:f10"
        );
    }
}
