//! The flow hash. The XDP program hashes a new flow's [`FlowKey`] once; the low 32 bits pick
//! the Maglev slot and the high 32 bits the first SNAT port to try. Userspace and tests call
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::Endpoint;

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
}
