//! The flow hash that picks a backend slot. Both sides use this exact function: the packet path to
//! choose, user space and tests to predict the choice.

use crate::{Address, conntrack::FlowKey};

/// Murmur3's 32-bit finaliser: every input bit affects every output bit.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hashes a client -> service tuple. Stable across restarts and CPUs (no seed), so a flow's slot is
/// reproducible; fields are mixed in wire byte order exactly as stored in [`FlowKey`], an address
/// a word at a time (one word for IPv4, four for IPv6).
#[inline(always)]
pub fn flow_hash<A: Address>(flow: &FlowKey<A>) -> u32 {
    let mut h = 0x9747_b28c_u32;
    for word in flow.saddr_be.words() {
        h = fmix32(h ^ word);
    }
    for word in flow.daddr_be.words() {
        h = fmix32(h ^ word);
    }
    h = fmix32(h ^ ((flow.sport_be as u32) << 16 | flow.dport_be as u32));
    fmix32(h ^ flow.proto as u32)
}

/// The slot a flow uses in a table of `slot_count` slots (`slot_count > 0`).
#[inline(always)]
pub fn slot_for<A: Address>(flow: &FlowKey<A>, slot_count: u32) -> u32 {
    flow_hash(flow) % slot_count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(sport: u16) -> FlowKey {
        FlowKey::new(
            crate::addr_be([10, 0, 0, 1]),
            crate::addr_be([10, 96, 0, 1]),
            sport.to_be(),
            80u16.to_be(),
            crate::IPPROTO_TCP,
        )
    }

    #[test]
    fn the_same_flow_always_gets_the_same_slot() {
        for sport in 1000..1100 {
            assert_eq!(slot_for(&flow(sport), 7), slot_for(&flow(sport), 7));
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = flow(1000);
        let mut proto = base;
        proto.proto = crate::IPPROTO_UDP;
        let variants = [
            FlowKey {
                saddr_be: base.saddr_be ^ 1,
                ..base
            },
            FlowKey {
                daddr_be: base.daddr_be ^ 1,
                ..base
            },
            FlowKey {
                sport_be: base.sport_be ^ 1,
                ..base
            },
            FlowKey {
                dport_be: base.dport_be ^ 1,
                ..base
            },
            proto,
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), flow_hash(&base), "{v:?}");
        }
    }

    #[test]
    fn every_word_of_an_ipv6_address_changes_the_hash() {
        let base: FlowKey<crate::Ip6> = FlowKey::new(
            crate::addr::ip6_be([0xfd, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11]),
            crate::addr::ip6_be([0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]),
            1000u16.to_be(),
            80u16.to_be(),
            crate::IPPROTO_TCP,
        );
        for word in 0..4 {
            let mut s = base;
            s.saddr_be[word] ^= 1;
            let mut d = base;
            d.daddr_be[word] ^= 1;
            assert_ne!(flow_hash(&s), flow_hash(&base), "source word {word}");
            assert_ne!(flow_hash(&d), flow_hash(&base), "destination word {word}");
        }
    }

    #[test]
    fn source_ports_spread_evenly_over_slots() {
        let mut counts = [0u32; 5];
        for sport in 0..10_000u16 {
            counts[slot_for(&flow(sport), 5) as usize] += 1;
        }
        // 2000 expected per slot; allow +-10 %.
        assert!(
            counts.iter().all(|c| (1800..=2200).contains(c)),
            "{counts:?}"
        );
    }
}
