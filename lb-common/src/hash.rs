//! The flow hash that picks a backend slot. Both sides use this exact function: the packet path to
//! choose, user space and tests to predict the choice.

use crate::conntrack::FlowKey;

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
/// reproducible; fields are mixed in wire byte order exactly as stored in [`FlowKey`].
#[inline(always)]
pub const fn flow_hash(flow: &FlowKey) -> u32 {
    let mut h = 0x9747_b28c_u32;
    h = fmix32(h ^ flow.saddr_be);
    h = fmix32(h ^ flow.daddr_be);
    h = fmix32(h ^ ((flow.sport_be as u32) << 16 | flow.dport_be as u32));
    fmix32(h ^ flow.proto as u32)
}

/// The slot a flow uses in a table of `slot_count` slots (`slot_count > 0`).
#[inline(always)]
pub const fn slot_for(flow: &FlowKey, slot_count: u32) -> u32 {
    flow_hash(flow) % slot_count
}
