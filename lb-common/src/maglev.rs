//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Each backend has a pseudo-random permutation of the table's slots, derived from its name
//! (so the same backends give the same table on every node and after every restart). Backends
//! take turns claiming their next preferred free slot until the table is full.
//!
//! Weights: in every round each backend earns `weight` credits, and claims one slot per
//! `max_weight` credits it holds. The heaviest backend claims exactly one slot per round and
//! the others proportionally fewer, spread evenly over the rounds, so when the table fills in
//! the middle of a round no backend is more than one slot off its share.

use std::vec::Vec;

use crate::maps::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// Stable identity: the same backend must always have the same name (xlb uses
    /// "address:port").
    pub name: &'a [u8],
    /// Relative share of new flows; 0 = takes no new flows.
    pub weight: u32,
}

/// Builds a table of `size` slots (`size` must be prime and larger than the number of
/// backends). Each slot holds an index into `backends`, or [`NO_BACKEND`] when no backend has
/// a weight above zero.
pub fn build(backends: &[Entry<'_>], size: u32) -> Vec<u32> {
    assert!(
        size >= 2,
        "the Maglev table size must be a prime, got {size}"
    );
    let m = size as u64;
    let mut table = std::vec![NO_BACKEND; size as usize];

    // Turn order must not depend on the order of the config file: sort by name.
    let mut live: Vec<(usize, &Entry<'_>)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .collect();
    if live.is_empty() {
        return table;
    }
    live.sort_by(|a, b| a.1.name.cmp(b.1.name));
    let max_weight = live.iter().map(|(_, b)| b.weight as u64).max().unwrap_or(1);

    // A backend's permutation is `offset, offset + skip, offset + 2·skip, ...` modulo m:
    // `slot` walks it by adding `skip` and subtracting m on overflow (both < m), which
    // gives the paper's `(offset + j·skip) mod m` without a division per step.
    struct Cursor {
        index: u32,
        slot: u64,
        skip: u64,
        credit: u64,
        weight: u64,
    }
    let mut cursors: Vec<Cursor> = live
        .iter()
        .map(|(index, b)| Cursor {
            index: *index as u32,
            slot: name_hash(b.name, 0) % m,
            skip: name_hash(b.name, 1) % (m - 1) + 1,
            credit: 0,
            weight: b.weight as u64,
        })
        .collect();

    // Which slots are taken, one bit each: the walk's many probes stay in the CPU's
    // nearest cache (8 KiB for 65,537 slots), where the table itself would not.
    let mut taken = std::vec![0u64; (size as usize).div_ceil(64)];
    let mut filled = 0u64;
    while filled < m {
        for c in &mut cursors {
            c.credit += c.weight;
            while c.credit >= max_weight {
                c.credit -= max_weight;
                // Walk this backend's permutation to its next free slot. There is one:
                // `filled < m`, and a permutation visits every slot (m is prime).
                let slot = loop {
                    let slot = c.slot;
                    c.slot = step(slot, c.skip, m);
                    if taken[(slot >> 6) as usize] & (1 << (slot & 63)) == 0 {
                        break slot as usize;
                    }
                };
                taken[slot >> 6] |= 1 << (slot & 63);
                table[slot] = c.index;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
    table
}

/// The slot after `slot` in a permutation of stride `skip` over `m` slots (both below m).
#[inline(always)]
fn step(slot: u64, skip: u64, m: u64) -> u64 {
    let next = slot + skip;
    if next >= m { next - m } else { next }
}

/// FNV-1a over the name, then the murmur3 finaliser; `seed` gives independent hashes for
/// the permutation's offset and skip.
fn name_hash(name: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in name {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// True if `n` is prime (trial division; table sizes are at most a few million).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::{format, string::String};

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.20.0.{}:8080", i + 1)).collect()
    }

    fn entries<'a>(names: &'a [String], weights: &[u32]) -> Vec<Entry<'a>> {
        names
            .iter()
            .zip(weights)
            .map(|(n, &weight)| Entry {
                name: n.as_bytes(),
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u64> {
        let mut c = std::vec![0u64; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_share_the_table_within_one_slot() {
        for n in [1, 2, 3, 7, 10, 100] {
            let names = names(n);
            let table = build(&entries(&names, &std::vec![1; n]), 65537);
            let c = counts(&table, n);
            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {c:?}");
        }
    }

    #[test]
    fn weights_give_proportional_shares() {
        let names = names(4);
        let weights = [2, 1, 1, 4];
        let table = build(&entries(&names, &weights), 65537);
        let c = counts(&table, 4);
        let total: u32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let expected = 65537.0 * *w as f64 / total as f64;
            assert!((c[i] as f64 - expected).abs() <= 1.0, "backend {i}: {c:?}");
        }
    }

    #[test]
    fn weight_zero_gets_no_slots_and_all_zero_gives_an_empty_table() {
        let names = names(3);
        let table = build(&entries(&names, &[1, 0, 1]), 13);
        assert!(table.iter().all(|&s| s == 0 || s == 2), "{table:?}");
        let table = build(&entries(&names, &[0, 0, 0]), 13);
        assert!(table.iter().all(|&s| s == NO_BACKEND));
        assert!(build(&[], 13).iter().all(|&s| s == NO_BACKEND));
    }

    #[test]
    fn config_order_does_not_change_the_table() {
        let names = names(5);
        let a = build(&entries(&names, &[1, 2, 3, 4, 5]), 4099);
        let rev_names: Vec<String> = names.iter().rev().cloned().collect();
        let b = build(&entries(&rev_names, &[5, 4, 3, 2, 1]), 4099);
        for (sa, sb) in a.iter().zip(&b) {
            assert_eq!(names[*sa as usize], rev_names[*sb as usize]);
        }
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let names = names(10);
        let before = build(&entries(&names, &[1; 10]), 65537);
        let mut weights = [1; 10];
        weights[3] = 0;
        let after = build(&entries(&names, &weights), 65537);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 3 && b != a)
            .count();
        // Maglev's guarantee is "close to minimal": slots of the removed backend move, and
        // only a small fraction of the others (the paper reports a few percent).
        assert!(
            moved < 65537 / 20,
            "{moved} slots of surviving backends moved"
        );
        assert!(after.iter().all(|&s| s != 3));
    }

    /// The paper's population loop as written there, `(offset + j·skip) mod m` per probe,
    /// with this module's weighted turns: `build` must give the same table.
    fn reference(backends: &[Entry<'_>], m: u64) -> Vec<u32> {
        let mut live: Vec<(usize, &Entry<'_>)> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .collect();
        live.sort_by(|a, b| a.1.name.cmp(b.1.name));
        let max = live.iter().map(|(_, b)| b.weight as u64).max().unwrap();
        let mut next = std::vec![0u64; live.len()];
        let mut credit = std::vec![0u64; live.len()];
        let mut table = std::vec![NO_BACKEND; m as usize];
        let mut filled = 0;
        loop {
            for (i, (index, b)) in live.iter().enumerate() {
                credit[i] += b.weight as u64;
                while credit[i] >= max {
                    credit[i] -= max;
                    let (offset, skip) =
                        (name_hash(b.name, 0) % m, name_hash(b.name, 1) % (m - 1) + 1);
                    let mut slot = ((offset + next[i] * skip) % m) as usize;
                    while table[slot] != NO_BACKEND {
                        next[i] += 1;
                        slot = ((offset + next[i] * skip) % m) as usize;
                    }
                    next[i] += 1;
                    table[slot] = *index as u32;
                    filled += 1;
                    if filled == m {
                        return table;
                    }
                }
            }
        }
    }

    #[test]
    fn walks_each_backends_permutation_as_the_paper_defines_it() {
        for (n, m) in [(1, 13), (3, 13), (10, 4099), (100, 65537)] {
            let names = names(n);
            let weights: Vec<u32> = (0..n as u32).map(|i| 1 + i % 4).collect();
            let e = entries(&names, &weights);
            assert!(build(&e, m as u32) == reference(&e, m), "n={n} m={m}");
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(13) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(4099 * 3));
    }
}
