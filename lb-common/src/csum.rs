//! Internet checksum math (RFC 1071) and incremental update (RFC 1624).
//!
//! Checksums here are plain `u16` numbers: the header field read with `u16::from_be_bytes`
//! and written back with `to_be_bytes`. Sums are over big-endian 16-bit words, so a field's
//! bytes can be fed in exactly as they sit in the packet.
//!
//! The fixed-size functions are what the XDP program calls: their loops have constant trip
//! counts, which LLVM unrolls, so the verifier sees straight-line code.

/// One's complement sum, not yet folded, of the big-endian 16-bit words of `bytes`.
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    const { assert!(N.is_multiple_of(2), "sum_words takes whole 16-bit words") };
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a 32-bit one's complement sum into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624, equation 3: `HC' = ~(~HC + ~m + m')`, where `old` is the unfolded sum of the
/// words being replaced (m) and `new` that of their replacements (m'). Unlike equation 2 it
/// never produces the "negative zero" 0x0000 from a non-zero checksum.
#[inline(always)]
pub const fn replace(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32 + (!fold(old)) as u32 + fold(new) as u32;
    !fold(sum)
}

/// UDP over IPv4 may carry checksum 0, meaning "none": it must stay 0, and a computed 0
/// must be sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn replace_udp(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// The unfolded sum of any byte slice (odd lengths are padded with a zero byte).
/// For host code and tests; the data path uses [`sum_words`].
pub fn sum_slice(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
        // Keep the carry from overflowing u32 on long inputs.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

/// The Internet checksum of `bytes`, computed from scratch.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_slice(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums (folded) to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_slice(&data)), 0xddf2);
        assert_eq!(fold(sum_words(&data)), 0xddf2);
    }

    #[test]
    fn incremental_update_matches_recompute() {
        // A 20-byte IPv4 header with a valid checksum; replace the destination address.
        let mut hdr: [u8; 20] = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 10, 10, 1, 2, 10, 10, 0, 100,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&hdr), 0, "a valid header sums to zero");

        let mut seed = 0x1234_5678u32;
        for _ in 0..10_000 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let new_dst = seed.to_be_bytes();
            let old_dst: [u8; 4] = hdr[16..20].try_into().unwrap();
            let old_check = u16::from_be_bytes([hdr[10], hdr[11]]);
            let updated = replace(old_check, sum_words(&old_dst), sum_words(&new_dst));
            hdr[16..20].copy_from_slice(&new_dst);
            hdr[10..12].copy_from_slice(&[0, 0]);
            let expected = checksum(&hdr);
            assert_eq!(updated, expected, "dst {new_dst:?}");
            hdr[10..12].copy_from_slice(&updated.to_be_bytes());
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(replace_udp(0, 0x1234, 0x4321), 0);
        // Find an update whose one's complement result is 0, then check UDP maps it.
        let check = 0x0001u16;
        // ~(~0x0001 + ~0 + new) = 0  <=>  0xfffe + 0xffff + new ≡ 0xffff  <=>  new = 1
        assert_eq!(replace(check, 0, 1), 0);
        assert_eq!(replace_udp(check, 0, 1), 0xffff);
    }
}
