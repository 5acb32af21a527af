//! Shared between the eBPF packet path (`lb-ebpf`) and the user-space agent (`lb-userspace`).
//!
//! Every type stored in a BPF map lives here, once, so the kernel and user-space views of a map
//! can never drift apart. Types are `#[repr(C)]` with explicit padding and a size assert; byte
//! order is in the field name (`_be` = network byte order, stored exactly as on the wire).
//!
//! Pure logic both sides must agree on lives here too: the flow hash that picks a slot, and the
//! Maglev table builder (user space only) that decides what every slot holds.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod addr;
pub mod conntrack;
pub mod counters;
pub mod hash;
#[cfg(any(test, feature = "user"))]
pub mod maglev;
pub mod maps;
pub mod service;
pub mod stats;

/// A protocol number as it appears in the IPv4 header.
pub const IPPROTO_TCP: u8 = 6;
/// A protocol number as it appears in the IPv4 header.
pub const IPPROTO_UDP: u8 = 17;
/// A protocol number as it appears in the IPv4 header.
pub const IPPROTO_ICMP: u8 = 1;
/// ICMPv6's next-header number.
pub const IPPROTO_ICMPV6: u8 = 58;

pub use addr::{Address, Ip6};

/// Converts IPv4 octets to the `u32` whose memory holds them in wire order (what `_be` fields hold).
#[inline(always)]
pub const fn addr_be(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of an `_be` IPv4 address field.
#[inline(always)]
pub const fn addr_octets(addr_be: u32) -> [u8; 4] {
    addr_be.to_ne_bytes()
}

/// Converts a host-order port to the `u16` whose memory holds it in wire order.
#[inline(always)]
pub const fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// The host-order value of an `_be` port field.
#[inline(always)]
pub const fn port_host(port_be: u16) -> u16 {
    u16::from_be(port_be)
}

/// Implements `aya::Pod` for map types when building for user space.
macro_rules! user_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers with explicit
            // padding fields, so every bit pattern is valid and there are no implicit holes.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use user_pod;
