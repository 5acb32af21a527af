//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size `M` in
//! which every backend owns about `M / N` slots, and removing one of `N` backends moves about
//! `1 / N` of the table, so existing clients keep their backend when the set changes.
//!
//! User space builds the table; the packet path reads slot `flow_hash % M` (see [`crate::hash`]).
//! Tests build the same table to predict exactly which backend a flow gets.

use alloc::vec::Vec;

/// Table sizes lb uses: primes, roughly doubling. The Maglev paper asks for `M >= 100 * N` so the
/// per-backend share stays within about 1 % of even.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];
/// The largest table: more than `MAX_TABLE_SIZE / 100` backends get fewer than 100 slots each.
pub const MAX_TABLE_SIZE: u32 = TABLE_SIZES[TABLE_SIZES.len() - 1];
/// `M >= MIN_SLOTS_PER_BACKEND * N`.
pub const MIN_SLOTS_PER_BACKEND: u32 = 100;

/// What a backend is called for hashing: its address and port in wire order. Using the address
/// rather than an id keeps the table the same across agent restarts and on every node.
#[inline]
pub const fn backend_key(addr_be: u32, port_be: u16) -> u64 {
    (addr_be as u64) << 16 | port_be as u64
}

/// [`backend_key`] for an address of either family in the wide form (`lb_common::addr`):
/// an IPv4 backend keeps its IPv4 key (tables stay what earlier agents built); an IPv6 one
/// mixes its four words. Keys only seed the backends' permutations, so IPv6 keys need only
/// differ, not be invertible.
pub fn backend_key_wide(addr: crate::Ip6, port_be: u16) -> u64 {
    match crate::addr::narrow(addr) {
        Some(v4) => backend_key(v4, port_be),
        None => {
            let words = addr.map(u64::from);
            let mixed = (words[0] << 32 | words[1]) ^ (words[2] << 32 | words[3]).rotate_left(29);
            mixed.rotate_left(16) ^ port_be as u64 ^ 1 << 63
        }
    }
}

/// The size to use for `backends` backends: the smallest listed size that gives every backend at
/// least [`MIN_SLOTS_PER_BACKEND`] slots, or `requested` (a Service's annotation or the agent's
/// flag) if that is larger. Beyond the largest size, the largest (see [`keeps_even_shares`]).
///
/// Following the backend count keeps small Services small (2 backends: 251 slots, not 16381),
/// so 10,000 Services fit the slots array. A count that crosses a size boundary rebuilds the
/// table at the new size: new flows are spread afresh, established ones keep their backend
/// through the conntrack (and affinity through its own map).
pub fn table_size(backends: usize, requested: Option<u32>) -> u32 {
    let floor = (backends as u64 * MIN_SLOTS_PER_BACKEND as u64).max(requested.unwrap_or(0) as u64);
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| m as u64 >= floor)
        .unwrap_or(MAX_TABLE_SIZE)
}

/// Whether a table of `size` slots gives each of `backends` at least [`MIN_SLOTS_PER_BACKEND`].
pub fn keeps_even_shares(size: u32, backends: usize) -> bool {
    size as u64 >= backends as u64 * MIN_SLOTS_PER_BACKEND as u64
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

const fn mix64(mut h: u64) -> u64 {
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds the table: slot -> index into `keys`. `keys` must be free of duplicates; the result does
/// not depend on their order. `size` must be prime (the permutations need it). Empty for no keys.
pub fn build(keys: &[u64], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} is not prime");
    if keys.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    // Fill in key order, so the same set gives the same table whatever order it came in.
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| keys[i]);
    // Each backend walks its permutation `offset, offset + skip, ...` (mod m): the position is
    // advanced by one addition and a conditional subtraction rather than a division per probe,
    // which dominated building thousands of tables.
    let mut walks: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = mix64(keys[i] ^ 0x6d61_676c_6576_3031) % m;
            let skip = mix64(keys[i] ^ 0x736b_6970_7365_6564) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut table = alloc::vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (turn, (position, skip)) in walks.iter_mut().enumerate() {
            while table[*position as usize] != u32::MAX {
                *position += *skip;
                if *position >= m {
                    *position -= m;
                }
            }
            // No step past the slot just taken: the next turn's probe does that.
            table[*position as usize] = order[turn] as u32;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size the disruption figures in design.md were measured at.
    const LARGE: u32 = 16381;

    fn keys(n: u32) -> Vec<u64> {
        (0..n)
            .map(|i| {
                backend_key(
                    crate::addr_be([10, 244, (i / 250) as u8, (i % 250) as u8 + 1]),
                    8080u16.to_be(),
                )
            })
            .collect()
    }

    /// The backend keys owning each slot.
    fn owners(keys: &[u64], size: u32) -> Vec<u64> {
        build(keys, size)
            .iter()
            .map(|&i| keys[i as usize])
            .collect()
    }

    /// The paper's population loop as written, one division per probe: the table every node
    /// and every agent version must agree on.
    fn build_by_definition(keys: &[u64], size: u32) -> Vec<u32> {
        let m = size as u64;
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by_key(|&i| keys[i]);
        let perm = |i: usize, j: u64| {
            let offset = mix64(keys[i] ^ 0x6d61_676c_6576_3031) % m;
            let skip = mix64(keys[i] ^ 0x736b_6970_7365_6564) % (m - 1) + 1;
            (offset + j * skip) % m
        };
        let mut next = alloc::vec![0u64; keys.len()];
        let mut table = alloc::vec![u32::MAX; size as usize];
        let mut filled = 0;
        while filled < size {
            for (turn, &i) in order.iter().enumerate() {
                let mut slot = perm(i, next[turn]);
                while table[slot as usize] != u32::MAX {
                    next[turn] += 1;
                    slot = perm(i, next[turn]);
                }
                table[slot as usize] = i as u32;
                next[turn] += 1;
                filled += 1;
                if filled == size {
                    break;
                }
            }
        }
        table
    }

    #[test]
    fn tables_equal_the_papers_population_loop() {
        let mut state = 0x1234_5678_9abc_def0u64;
        for round in 0..60 {
            state = mix64(state);
            let n = 1 + (state % 40) as u32;
            let size = TABLE_SIZES[round % 4];
            let keys: Vec<u64> = (0..n).map(|i| mix64(state ^ i as u64) >> 16).collect();
            assert_eq!(
                build(&keys, size),
                build_by_definition(&keys, size),
                "{n} keys, {size} slots"
            );
        }
    }

    #[test]
    fn listed_sizes_are_prime_and_increasing() {
        assert!(TABLE_SIZES.iter().all(|&m| is_prime(m)));
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert!(!is_prime(16383) && is_prime(16381));
    }

    #[test]
    fn table_size_follows_the_backend_count_with_100_slots_each() {
        assert_eq!(table_size(0, None), 251);
        assert_eq!(table_size(2, None), 251);
        assert_eq!(table_size(3, None), 509, "251 < 100 x 3");
        assert_eq!(table_size(10, None), 1021);
        assert_eq!(table_size(200, None), 32749);
        assert_eq!(
            table_size(5000, None),
            MAX_TABLE_SIZE,
            "capped at the largest size"
        );
        assert!(!keeps_even_shares(table_size(5000, None), 5000));
        assert!(keeps_even_shares(table_size(1310, None), 1310));
        assert!(!keeps_even_shares(table_size(1311, None), 1311));
    }

    #[test]
    fn a_requested_size_wins_when_larger_and_is_raised_when_too_small() {
        assert_eq!(table_size(3, Some(16381)), 16381);
        assert_eq!(table_size(3, Some(251)), 509, "raised: 251 < 100 x 3");
        assert_eq!(table_size(2, Some(251)), 251);
        assert_eq!(table_size(400, Some(1021)), 65521);
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [1, 2, 3, 7, 10, 100] {
            let table = build(&keys(n), LARGE);
            let mut counts = alloc::vec![0u32; n as usize];
            for &i in &table {
                counts[i as usize] += 1;
            }
            let (lo, hi) = (LARGE / n, LARGE.div_ceil(n));
            assert!(
                counts.iter().all(|c| (lo..=hi).contains(c)),
                "n={n}: {counts:?}"
            );
        }
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let k = keys(9);
        let mut reversed = k.clone();
        reversed.reverse();
        assert_eq!(owners(&k, 1021), owners(&reversed, 1021));
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_and_nothing_else() {
        for n in [5u32, 10, 50] {
            let all = keys(n);
            let before = owners(&all, LARGE);
            let removed = all[n as usize / 2];
            let rest: Vec<u64> = all.iter().copied().filter(|&k| k != removed).collect();
            let after = owners(&rest, LARGE);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let owned_by_removed = before.iter().filter(|&&b| b == removed).count();
            let collateral = moved - owned_by_removed;
            let m = LARGE as usize;
            std::eprintln!(
                "n={n}: removing one backend moved {moved} of {m} slots ({owned_by_removed} were its own, {collateral} others)"
            );
            // Every slot of the removed backend moves (it must); of the others, Maglev moves only
            // a small fraction (the paper's "minimal disruption" is approximate; 23, 69 and 158 slots of
            // 16381 here for n = 5, 10, 50).
            assert!(
                owned_by_removed * (n as usize) <= m + n as usize
                    && owned_by_removed * (n as usize) + n as usize >= m,
                "n={n}: removed backend owned {owned_by_removed} of {m}"
            );
            assert!(
                collateral * 50 <= m,
                "n={n}: {collateral} slots of surviving backends moved (more than 2 % of {m})"
            );
        }
    }

    #[test]
    fn adding_a_backend_takes_slots_mostly_from_others_evenly() {
        let base = keys(10);
        let mut grown = base.clone();
        grown.push(backend_key(
            crate::addr_be([10, 244, 9, 9]),
            8080u16.to_be(),
        ));
        let before = owners(&base, LARGE);
        let after = owners(&grown, LARGE);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let m = LARGE as usize;
        // The newcomer takes about 1/11 of the table; little else moves.
        assert!(moved <= m / 11 + m / 100, "moved {moved} of {m}");
    }
}
