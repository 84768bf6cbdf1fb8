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

    let mut cursors: Vec<Cursor> = live
        .iter()
        .map(|(index, b)| {
            let skip = name_hash(b.name, 1) % (m - 1) + 1;
            Cursor {
                credit: 0,
                index: *index as u32,
                slot: (name_hash(b.name, 0) % m) as u32,
                skip: skip as u32,
                stride: (skip * WAYS as u64 % m) as u32,
                weight: b.weight,
                inverse: 0,
            }
        })
        .collect();

    // Which slots are taken, one bit each: the walk's many probes stay in the CPU's
    // nearest cache (8 KiB for 65,537 slots), where the table itself would not.
    let mut taken = Taken(std::vec![0u64; (size as usize).div_ceil(64)]);
    let mut filled = 0u64;
    // The free slots, listed once no more than `TAIL` are left.
    let mut tail: Option<Vec<u64>> = None;
    while filled < m {
        for c in &mut cursors {
            c.credit += c.weight as u64;
            while c.credit >= max_weight {
                c.credit -= max_weight;
                // This backend's next free slot in its permutation. There is one:
                // `filled < m`, and a permutation visits every slot (m is prime).
                let slot = if m - filled > TAIL {
                    taken.walk(c, m)
                } else {
                    let free = tail.get_or_insert_with(|| taken.free(m));
                    let at = nearest(c, free, m);
                    free.swap_remove(at)
                };
                c.slot = step(slot, c.skip as u64, m) as u32;
                taken.set(slot);
                table[slot as usize] = c.index;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
    table
}

/// A backend's place in its permutation, `offset, offset + skip, offset + 2·skip, ...`
/// modulo m, which is walked by adding `skip` and subtracting m on overflow (both < m): the
/// paper's `(offset + j·skip) mod m` without a division per step. Slots are below m < 2^32,
/// kept in 32 bits so a thousand cursors stay in the CPU's nearest cache.
struct Cursor {
    credit: u64,
    index: u32,
    /// The next slot the backend tries.
    slot: u32,
    skip: u32,
    /// `WAYS · skip` modulo m: the stride of [`Taken::walk`]'s chains.
    stride: u32,
    weight: u32,
    /// The inverse of `skip` modulo m once [`nearest`] needs it (0 before: no inverse is).
    inverse: u32,
}

/// One bit per slot: taken or not.
struct Taken(Vec<u64>);

impl Taken {
    #[inline(always)]
    fn is_free(&self, slot: u64) -> bool {
        self.0[(slot >> 6) as usize] & (1 << (slot & 63)) == 0
    }

    #[inline(always)]
    fn set(&mut self, slot: u64) {
        self.0[(slot >> 6) as usize] |= 1 << (slot & 63);
    }

    /// Every free slot.
    fn free(&self, m: u64) -> Vec<u64> {
        (0..m).filter(|&s| self.is_free(s)).collect()
    }

    /// The first free slot of `c`'s permutation from `c.slot` on, found by walking it (with
    /// a share f of the slots free, 1/f probes on average). `WAYS` probes per turn: the
    /// slots at distances 0, 1, 2, 3 (mod `WAYS`) from the cursor are walked as `WAYS`
    /// chains of stride `WAYS · skip`, in order, so the first free one found is the nearest.
    /// The CPU works on the chains at once, where a single chain's every step waits for the
    /// one before (a quarter of the build time saved).
    #[inline(always)]
    fn walk(&self, c: &Cursor, m: u64) -> u64 {
        let mut at = [c.slot as u64; WAYS];
        for k in 1..WAYS {
            at[k] = step(at[k - 1], c.skip as u64, m);
        }
        loop {
            // One branch per turn, not one per probe: while most slots are free it is
            // taken nearly always, and the CPU guesses it right.
            let mut free = 0u32;
            for (k, &slot) in at.iter().enumerate() {
                free |= (self.is_free(slot) as u32) << k;
            }
            if free != 0 {
                return at[free.trailing_zeros() as usize];
            }
            for slot in &mut at {
                *slot = step(*slot, c.stride as u64, m);
            }
        }
    }
}

/// Where in `free` (not empty) the free slot fewest steps ahead of `c` is. With few slots
/// left a walk to one takes m / free probes (over half of all a build's probes go to its
/// last 1% of slots): this takes `free` multiplications and divisions instead.
fn nearest(c: &mut Cursor, free: &[u64], m: u64) -> usize {
    if c.inverse == 0 {
        c.inverse = inverse(c.skip as u64, m) as u32;
    }
    let (at, _) = free
        .iter()
        .enumerate()
        .min_by_key(|&(_, &s)| steps(c.slot as u64, s, c.inverse as u64, m))
        .expect("a free slot while the table is not full");
    at
}

/// How many free slots are left when `build` stops walking permutations and finds each
/// claim's slot among the free ones ([`nearest`]): a walk costs m / free probes, a search
/// `free` multiplications and divisions, each some 8 probes' time.
const TAIL: u64 = 256;

/// How many slots of a permutation `build` probes per turn of its walk.
const WAYS: usize = 4;

/// How many steps of stride `skip` (whose inverse modulo m is `inverse`) lead from `from`
/// to `to` (both below m): `(to - from) · skip⁻¹ mod m`.
#[inline(always)]
fn steps(from: u64, to: u64, inverse: u64, m: u64) -> u64 {
    let distance = if to >= from { to - from } else { to + m - from };
    // Below m < 2^32 each, so the product fits.
    distance * inverse % m
}

/// The inverse of `a` modulo the prime `m` (extended Euclid; `a` is not a multiple of m).
fn inverse(a: u64, m: u64) -> u64 {
    let (mut r0, mut r1) = (m as i64, a as i64);
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(m as i64) as u64
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
        for (n, m) in [(1, 13), (3, 13), (10, 4099), (100, 65537), (1000, 65537)] {
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
