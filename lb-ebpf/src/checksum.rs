//! Internet checksums (RFC 1071) computed in the program itself: for headers built from scratch
//! (rejections) and for rewrites where no kernel helper applies (XDP works on raw frames). The tc
//! rewrites use the kernel's `l3/l4_csum_replace`, which also handle offloaded checksums.

use lb_common::Address;

/// One's-complement sum of big-endian 16-bit words (`bytes` has an even length).
#[inline(always)]
pub fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a one's-complement sum to 16 bits and complements it: the checksum field's value.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The sum of the pseudo-header TCP, UDP and ICMPv6 checksums cover. IPv4's (addresses, zero,
/// protocol, 16-bit length) and IPv6's (addresses, 32-bit length, zeros, next header) add up
/// to the same words for lengths below 64 KiB.
#[inline(always)]
pub fn pseudo_header_sum<A: Address>(saddr_be: A, daddr_be: A, proto: u8, l4_len: u16) -> u32 {
    let mut sum = 0;
    for word in saddr_be.words() {
        sum = sum_words(sum, &word.to_ne_bytes());
    }
    for word in daddr_be.words() {
        sum = sum_words(sum, &word.to_ne_bytes());
    }
    let l = l4_len.to_be_bytes();
    sum_words(sum, &[0, proto, l[0], l[1]])
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over every 16-bit word that changed, each change an
/// `(old, new)` pair of 32-bit words in memory (wire) order, which one's-complement sums do not
/// mind. All changes are summed before the one fold.
#[inline(always)]
pub fn update(check: u16, changes: &[(&[u32], &[u32])]) -> u16 {
    let mut sum = (!check) as u32;
    for (old, new) in changes {
        let mut i = 0;
        while i < old.len() {
            sum += (!(old[i] as u16)) as u32 + (!((old[i] >> 16) as u16)) as u32;
            sum += (new[i] as u16) as u32 + ((new[i] >> 16) as u16) as u32;
            i += 1;
        }
    }
    fold(sum)
}

/// Calls `fix` with each 32-bit word that differs between `old` and `new` (the unit the kernel's
/// incremental checksum helpers take): once for an IPv4 address, up to four times for IPv6.
#[inline(always)]
pub fn changed_words<A: Address, E>(
    old: A,
    new: A,
    mut fix: impl FnMut(u32, u32) -> Result<(), E>,
) -> Result<(), E> {
    let (o, n) = (old.words(), new.words());
    for i in 0..o.len() {
        if o[i] != n[i] {
            fix(o[i], n[i])?;
        }
    }
    Ok(())
}
