//! The flow hash. The XDP program hashes a new flow's [`FlowKey`] once; the low 32 bits pick
//! the Maglev slot, the high 32 bits the first SNAT port to try, and the low 4 bits the probe
//! step. Userspace and tests call
//! the same function to predict where a flow goes.

use crate::maps::FlowKey;

/// The murmur3 64-bit finaliser: every input bit affects every output bit.
#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u64 {
    u64::from_le_bytes([
        b[i],
        b[i + 1],
        b[i + 2],
        b[i + 3],
        b[i + 4],
        b[i + 5],
        b[i + 6],
        b[i + 7],
    ])
}

/// Hash of a flow's addresses, ports and protocol, keyed by `seed`.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u64 {
    let ports = u16::from_be_bytes(key.src.port) as u64
        | (u16::from_be_bytes(key.dst.port) as u64) << 16
        | (key.proto as u64) << 32;
    let mut h = fmix64(seed as u64 ^ 0x9e37_79b9_7f4a_7c15);
    h = fmix64(h ^ word(&key.src.addr, 0));
    h = fmix64(h ^ word(&key.src.addr, 8));
    h = fmix64(h ^ word(&key.dst.addr, 0));
    h = fmix64(h ^ word(&key.dst.addr, 8));
    fmix64(h ^ ports)
}

/// Probe steps for [`snat_port`]: primes above 2^32, so each is coprime with any range
/// size a port range (or, later, a pool of addresses times ports) can have.
const PROBE_STEPS: [u64; 16] = [
    4_294_967_311,
    4_294_967_357,
    4_294_967_371,
    4_294_967_377,
    4_294_967_387,
    4_294_967_389,
    4_294_967_459,
    4_294_967_477,
    4_294_967_497,
    4_294_967_513,
    4_294_967_539,
    4_294_967_543,
    4_294_967_549,
    4_294_967_561,
    4_294_967_563,
    4_294_967_569,
];

/// The SNAT port a new flow with `hash` tries on its `probe`-th attempt, in
/// `[first, first + count)`.
///
/// Double hashing: probe 0 is the flow's own hash, so a flow whose state was lost gets the
/// same port back when it is free; probe `i` adds `i` steps of a size the hash also picks.
/// The step is coprime with `count`, so the first `count` probes visit every port once (a
/// small range is searched completely), and two flows that start on the same port part
/// ways at once unless they also drew the same step (1 in 16). The simpler orders cluster:
/// with next-port probing, taken ports grow into runs every later flow must walk past (16
/// probes failed with one backend's ports only 44% taken), and with one fixed step, two flows
/// that collide once collide on every probe.
#[inline(always)]
pub fn snat_port(hash: u64, probe: u32, first: u32, count: u32) -> u16 {
    // Never 0, so the divisions below have no panic path (the BPF program cannot have one).
    let count = count.max(1) as u64;
    let start = (hash >> 32) % count;
    let step = PROBE_STEPS[(hash & 15) as usize] % count;
    (first as u64 + (start + probe as u64 * step) % count) as u16
}

/// The SNAT address (an index into the service's pool of `addresses`) and port a new flow
/// tries on its `probe`-th attempt. Probe 0 is the flow's own pick: an address from its hash
/// (bits [`snat_port`] leaves alone) and `snat_port(hash, 0)`, so a flow whose state was lost
/// gets its first choice back. Later probes go round the pool, giving every address the
/// port sequence of [`snat_port`] in turn: the first `count × addresses` probes visit every
/// (address, port) once, so a pool of n addresses has n times one address's ports. With one
/// address this is [`snat_port`].
#[inline(always)]
pub fn snat_candidate(hash: u64, probe: u32, first: u32, count: u32, addresses: u32) -> (u32, u16) {
    // Never 0, so the divisions below have no panic path (the BPF program cannot have one).
    let addresses = addresses.max(1);
    let start = ((hash >> 4) & 0xfff) as u32;
    (
        (start + probe) % addresses,
        snat_port(hash, probe / addresses, first, count),
    )
}

/// The slots of the XDP program's next-hop cache (`NEXT_HOPS`, one set per CPU):
/// 2^[`NEXT_HOP_SLOT_BITS`].
pub const NEXT_HOP_SLOTS: u32 = 1 << NEXT_HOP_SLOT_BITS;
pub const NEXT_HOP_SLOT_BITS: u32 = 12;

/// The slot of a next-hop cache key, given as its five 64-bit words in memory order (the
/// source address, two words; the destination address, two; the ingress interface and the
/// protocol). Each word has a multiplier of its own, so a way and its way back (the
/// addresses swapped) land apart; the slot is the top bits of a last product, which every
/// bit of every word reaches. (An IPv4 address is the top half of its second word: a
/// product's low bits, which a remainder takes, never see it, and all the hosts of two
/// subnets would share a slot.)
#[inline(always)]
pub fn next_hop_slot(w: [u64; 5]) -> u32 {
    let h = w[0].wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ w[1].wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ w[2].wrapping_mul(0x1656_67b1_9e37_79f9)
        ^ w[3].wrapping_mul(0xff51_afd7_ed55_8ccd)
        ^ w[4].wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    ((h ^ (h >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - NEXT_HOP_SLOT_BITS)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{Endpoint, SNAT_PORT_PROBES};

    /// Fills one backend's SNAT ports with flows of random hashes, as the XDP program
    /// would, and checks how full they get before the first flow finds no free port in
    /// SNAT_PORT_PROBES tries. With independent probes the first failure is expected near
    /// occupancy ((probes + 1) / ports)^(1/(probes + 1)) — about 88% for 64 probes and
    /// 64,512 ports; double hashing comes close to that, next-port probing failed at 44%.
    #[test]
    fn snat_ports_fill_up_before_probes_fail() {
        let (first, count) = (1024u32, 64512u32);
        let mut taken = std::vec![false; count as usize];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut flows = 0u32;
        'flows: loop {
            state = fmix64(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
            for probe in 0..SNAT_PORT_PROBES {
                let port = snat_port(state, probe, first, count);
                assert!((first..first + count).contains(&(port as u32)));
                let slot = &mut taken[(port as u32 - first) as usize];
                if !*slot {
                    *slot = true;
                    flows += 1;
                    continue 'flows;
                }
            }
            break;
        }
        let occupancy = flows as f64 / count as f64;
        assert!(
            occupancy > 0.80,
            "first failure at {:.1}% occupancy",
            occupancy * 100.0
        );
    }

    /// A range no larger than the probe budget is searched completely: the last free port
    /// is always found.
    #[test]
    fn small_ranges_are_probed_completely() {
        for count in [1u32, 2, 3, 7, 16, 63, 64] {
            for seed in 0..200u64 {
                let hash = fmix64(seed);
                let mut seen = std::collections::BTreeSet::new();
                for probe in 0..count {
                    seen.insert(snat_port(hash, probe, 40000, count));
                }
                assert_eq!(seen.len() as u32, count, "count {count}, hash {hash:#x}");
                assert_eq!(*seen.first().unwrap(), 40000);
                assert_eq!(*seen.last().unwrap() as u32, 40000 + count - 1);
            }
        }
        const { assert!(SNAT_PORT_PROBES >= 64) };
    }

    /// Probe 0 is a function of the flow's hash alone: a flow recreated after its state was
    /// lost asks for the same port first.
    #[test]
    fn the_first_probe_depends_on_the_hash_only() {
        let hash = fmix64(42);
        assert_eq!(
            snat_port(hash, 0, 1024, 64512),
            (1024 + (hash >> 32) % 64512) as u16
        );
    }

    #[test]
    fn probe_steps_are_primes_above_2_to_the_32() {
        for p in PROBE_STEPS {
            assert!(p > 1 << 32);
            let mut d = 2u64;
            while d * d <= p {
                assert!(p % d != 0, "{p} is divisible by {d}");
                d += 1;
            }
        }
    }

    #[test]
    fn client_ports_spread_evenly_over_buckets() {
        let mut buckets = [0u32; 16];
        for port in 0..16_000u16 {
            let key = FlowKey {
                src: Endpoint::v4([10, 0, 0, 1], port.to_be_bytes()),
                dst: Endpoint::v4([10, 0, 0, 100], 80u16.to_be_bytes()),
                proto: 6,
                _pad: 0,
            };
            buckets[(flow_hash(&key, 7) % 16) as usize] += 1;
        }
        // 1000 expected per bucket; a decent hash stays well within ±15%.
        for b in buckets {
            assert!((850..=1150).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn a_pool_visits_every_address_and_port_once() {
        let (first, count) = (40000u32, 7u32);
        for addresses in 1..=4u32 {
            for hash in [0u64, 0x1234_5678_9abc_def0, u64::MAX, 0xdead_beef] {
                let mut seen = std::collections::BTreeSet::new();
                for probe in 0..count * addresses {
                    let (a, port) = snat_candidate(hash, probe, first, count, addresses);
                    assert!(a < addresses);
                    assert!((first..first + count).contains(&(port as u32)));
                    assert!(seen.insert((a, port)), "({a}, {port}) twice");
                }
                assert_eq!(seen.len() as u32, count * addresses);
                // One address: exactly the single-address order.
                if addresses == 1 {
                    for probe in 0..count {
                        let (_, port) = snat_candidate(hash, probe, first, count, 1);
                        assert_eq!(port, snat_port(hash, probe, first, count));
                    }
                }
            }
        }
    }

    /// The five words of a next-hop cache key from IPv4 `src` to `dst`, laid out as the XDP
    /// program's `HopKey` is: IPv4-mapped addresses, then ingress (u32) and protocol (u8),
    /// read as little-endian words (the BPF target's order).
    fn hop_words(src: [u8; 4], dst: [u8; 4], ingress: u32, proto: u8) -> [u64; 5] {
        let mut bytes = [0u8; 40];
        for (at, a) in [(0, src), (16, dst)] {
            bytes[at + 10..at + 12].copy_from_slice(&[0xff, 0xff]);
            bytes[at + 12..at + 16].copy_from_slice(&a);
        }
        bytes[32..36].copy_from_slice(&ingress.to_le_bytes());
        bytes[36] = proto;
        core::array::from_fn(|i| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap()))
    }

    /// 16,384 clients of one /16 talking to one backend take nearly as many slots as random
    /// keys would: n keys thrown into m slots fill m·(1 − e^(−n/m)) of them on average,
    /// 4021 of 4096 here, give or take a few. (A hash that let only the addresses' low
    /// bits through gave them all one slot.)
    #[test]
    fn next_hop_slots_spread_the_hosts_of_a_subnet() {
        let mut used = std::collections::HashSet::new();
        for i in 0..16_384u32 {
            let client = [10, 1, (i >> 8) as u8, i as u8];
            used.insert(next_hop_slot(hop_words(client, [10, 2, 0, 5], 3, 6)));
        }
        assert!(used.iter().all(|&s| s < NEXT_HOP_SLOTS));
        let expected = 4096.0 * (1.0 - (-4.0f64).exp());
        assert!(
            used.len() as f64 > expected - 60.0,
            "{} slots used, expected about {expected:.0}",
            used.len()
        );
    }

    /// A way and its way back land in the same slot as often as two random keys do
    /// (1 in 4096): of 4096 pairs, a handful at most.
    #[test]
    fn a_way_and_its_way_back_land_apart() {
        let same = (0..4096u32)
            .filter(|&i| {
                let a = [10, 1, (i >> 8) as u8, i as u8];
                let b = [10, 2, 0, (i % 200) as u8];
                next_hop_slot(hop_words(a, b, 3, 6)) == next_hop_slot(hop_words(b, a, 3, 6))
            })
            .count();
        assert!(
            same <= 8,
            "{same} of 4096 ways share a slot with their way back"
        );
    }
}
