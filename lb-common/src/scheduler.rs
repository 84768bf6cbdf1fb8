//! How a new flow's backend is chosen. Only the choice for a new flow differs between
//! schedulers; once chosen, conntrack keeps a flow on its backend under every one.
//!
//! Every scheduler here picks a slot of the service's table (`MAGLEV`), which userspace
//! fills to suit it: the slot comes from the flow's hash (`maglev`), from its client
//! address alone (`source-hash`), or from a per-CPU cursor that moves one slot per new flow
//! (`round-robin`, `weighted-round-robin`). The XDP program, the host tests and the
//! reference model all call [`table_slot`].

use crate::maps::FlowKey;

/// [`ServiceEntry::scheduler`](crate::maps::ServiceEntry::scheduler): weighted Maglev over
/// the flow's 5-tuple hash. The default.
pub const MAGLEV: u32 = 0;
/// Weighted Maglev over the client address alone: every connection of a client goes to one
/// backend while the backend set stays the same.
pub const SOURCE_HASH: u32 = 1;
/// New flows take turns over the backends that take new flows, whatever their weights.
pub const ROUND_ROBIN: u32 = 2;
/// New flows take turns in proportion to the weights (smooth weighted round-robin).
pub const WEIGHTED_ROUND_ROBIN: u32 = 3;
/// A new flow goes to the backend with the fewest open flows for its weight.
pub const LEAST_CONN: u32 = 4;
/// A new flow goes to the backend with the lowest response time × (open flows + 1) /
/// weight; the response time is the daemon's smoothed health-check measure.
pub const LEAST_RESPONSE_TIME: u32 = 5;

/// The most backends a least-* service may have: the XDP program looks at each of them
/// for every new flow, in a loop the verifier must see the end of.
pub const MAX_LEAST_BACKENDS: u32 = 256;

/// The schedulers by name, as the config, the CLI and the API spell them.
pub const NAMES: [(&str, u32); 6] = [
    ("maglev", MAGLEV),
    ("source-hash", SOURCE_HASH),
    ("round-robin", ROUND_ROBIN),
    ("weighted-round-robin", WEIGHTED_ROUND_ROBIN),
    ("least-conn", LEAST_CONN),
    ("least-response-time", LEAST_RESPONSE_TIME),
];

/// Whether `scheduler` picks by looking at every backend (the least-* ones) rather than by
/// a slot of the table.
#[inline(always)]
pub fn is_least(scheduler: u32) -> bool {
    scheduler == LEAST_CONN || scheduler == LEAST_RESPONSE_TIME
}

/// A backend's score under a least-* scheduler; the lowest wins. `weight` is above 0 (only
/// backends that take new flows are scored). Response times are capped at 2^24 µs (16 s) and
/// open flows at 2^28, so no product overflows. A backend not measured yet (`latency_us`
/// 0: just added, still starting) counts as the slowest possible, so it is not swamped
/// before its first check; when none is measured, all are alike (least-conn).
#[inline(always)]
pub fn score(scheduler: u32, active: u64, weight: u32, latency_us: u32) -> u64 {
    let active = if active > 1 << 28 { 1 << 28 } else { active };
    let weight = if weight == 0 { 1 } else { weight as u64 };
    if scheduler == LEAST_RESPONSE_TIME {
        let latency = if latency_us == 0 {
            1 << 24
        } else {
            latency_us.min(1 << 24) as u64
        };
        latency * (active + 1) * 256 / weight
    } else {
        (active << 20) / weight
    }
}

/// The name of scheduler `number` (`"maglev"` for one this build does not know).
pub fn name(number: u32) -> &'static str {
    NAMES
        .iter()
        .find(|(_, n)| *n == number)
        .map_or("maglev", |(name, _)| name)
}

/// The hash of a flow's client address alone, keyed by `seed`: what `source-hash` picks by.
#[inline(always)]
pub fn source_hash(key: &FlowKey, seed: u32) -> u64 {
    let client = FlowKey {
        src: crate::maps::Endpoint {
            addr: key.src.addr,
            port: [0; 2],
        },
        dst: key.dst,
        proto: key.proto,
        _pad: 0,
    };
    crate::hash::flow_hash(&client, seed)
}

/// The slot of a service's table (`0..table_size`) a new flow takes under `scheduler`:
/// `flow_hash` is the flow's [`flow_hash`](crate::hash::flow_hash), `source_hash` its
/// [`source_hash`], `cursor` the per-CPU turn counter of the service (round-robins).
#[inline(always)]
pub fn table_slot(
    scheduler: u32,
    flow_hash: u64,
    source_hash: u64,
    cursor: u32,
    table_size: u32,
) -> u32 {
    match scheduler {
        SOURCE_HASH => (source_hash as u32) % table_size,
        ROUND_ROBIN | WEIGHTED_ROUND_ROBIN => cursor % table_size,
        _ => (flow_hash as u32) % table_size,
    }
}

/// A round-robin table: `size` slots of indexes into `weights`, in the order of smooth
/// weighted round-robin (each backend in turn earns its weight, and the richest takes the
/// slot and pays the total), so any run of slots as long as the weights' sum holds each
/// backend exactly its weight's worth, evenly spread. Backends of weight 0 take no slot;
/// with none above 0, every slot is [`NO_BACKEND`](crate::maps::NO_BACKEND). Plain
/// round-robin passes weight 1 for every backend that takes new flows.
#[cfg(feature = "std")]
pub fn round_robin_table(weights: &[u32], size: u32) -> std::vec::Vec<u32> {
    use crate::maps::NO_BACKEND;
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    if total == 0 {
        return std::vec![NO_BACKEND; size as usize];
    }
    let mut current = std::vec![0i64; weights.len()];
    (0..size)
        .map(|_| {
            let mut best = 0;
            for (i, &w) in weights.iter().enumerate() {
                current[i] += w as i64;
                if w > 0 && (weights[best] == 0 || current[i] > current[best]) {
                    best = i;
                }
            }
            current[best] -= total;
            best as u32
        })
        .collect()
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::maps::{Endpoint, NO_BACKEND, PROTO_TCP};

    fn key(client: [u8; 4], port: u16) -> FlowKey {
        FlowKey {
            src: Endpoint::v4(client, port.to_be_bytes()),
            dst: Endpoint::v4([10, 10, 0, 100], 80u16.to_be_bytes()),
            proto: PROTO_TCP,
            _pad: 0,
        }
    }

    #[test]
    fn source_hash_follows_the_client_address_only() {
        let a = source_hash(&key([10, 1, 0, 2], 40000), 7);
        assert_eq!(a, source_hash(&key([10, 1, 0, 2], 51234), 7));
        assert_ne!(a, source_hash(&key([10, 1, 0, 3], 40000), 7));
        // ...while the flow hash tells the ports apart.
        assert_ne!(
            crate::hash::flow_hash(&key([10, 1, 0, 2], 40000), 7),
            crate::hash::flow_hash(&key([10, 1, 0, 2], 51234), 7)
        );
    }

    #[test]
    fn each_scheduler_takes_its_slot_from_its_input() {
        assert_eq!(table_slot(MAGLEV, 1000, 2000, 3000, 251), 1000 % 251);
        assert_eq!(table_slot(SOURCE_HASH, 1000, 2000, 3000, 251), 2000 % 251);
        assert_eq!(table_slot(ROUND_ROBIN, 1000, 2000, 3000, 251), 3000 % 251);
        assert_eq!(
            table_slot(WEIGHTED_ROUND_ROBIN, 1000, 2000, 3000, 251),
            3000 % 251
        );
        // An unknown number falls back to Maglev rather than to nothing.
        assert_eq!(table_slot(99, 1000, 2000, 3000, 251), 1000 % 251);
    }

    #[test]
    fn every_window_of_the_weights_sum_holds_each_backend_its_weight() {
        let weights = [3, 1, 2, 0];
        let table = round_robin_table(&weights, 251);
        assert_eq!(table.len(), 251);
        for start in 0..(251 - 6) {
            let mut counts = [0u32; 4];
            for &i in &table[start..start + 6] {
                counts[i as usize] += 1;
            }
            assert_eq!(counts, [3, 1, 2, 0], "window at {start}");
        }
        // Evenly spread: the heaviest never takes more than two slots in a row here.
        assert!(!table.windows(3).any(|w| w.iter().all(|&i| i == 0)));
    }

    #[test]
    fn least_scores_weigh_flows_by_weight_and_time() {
        // Least-conn: fewer flows per weight wins; a double weight takes twice the flows.
        assert!(score(LEAST_CONN, 3, 1, 0) < score(LEAST_CONN, 4, 1, 0));
        assert_eq!(score(LEAST_CONN, 8, 2, 0), score(LEAST_CONN, 4, 1, 0));
        assert!(score(LEAST_CONN, 0, 1, 0) < score(LEAST_CONN, 1, 100, 0));
        // Least-response-time: a backend ten times slower takes a new flow only when the
        // fast one has about ten times its flows.
        let fast = |active| score(LEAST_RESPONSE_TIME, active, 1, 1_000);
        let slow = |active| score(LEAST_RESPONSE_TIME, active, 1, 10_000);
        assert!(fast(8) < slow(0));
        assert!(fast(10) > slow(0));
        // Unmeasured counts as the slowest; nothing overflows at the caps.
        assert!(score(LEAST_RESPONSE_TIME, 0, 1, 0) > slow(100));
        assert_eq!(
            score(LEAST_RESPONSE_TIME, 3, 1, 0),
            score(LEAST_RESPONSE_TIME, 3, 1, 1 << 30)
        );
        assert!(score(LEAST_RESPONSE_TIME, u64::MAX, 1, u32::MAX) < u64::MAX);
        assert!(score(LEAST_CONN, u64::MAX, 1, 0) < u64::MAX);
    }

    #[test]
    fn plain_turns_and_no_backend() {
        assert_eq!(round_robin_table(&[1, 1, 1], 7), [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(round_robin_table(&[0, 0], 3), [NO_BACKEND; 3]);
        assert_eq!(round_robin_table(&[], 2), [NO_BACKEND; 2]);
    }
}
