//! Checksums computed from scratch over whole headers and segments, never incrementally,
//! so comparing them with the XDP program's incremental updates compares two independent
//! computations.

use lb_common::{
    csum::{checksum, fold, sum_slice},
    maps::{PROTO_TCP, PROTO_UDP},
};

use std::net::Ipv6Addr;

use super::frame::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, PROTO_ICMP, PROTO_ICMPV6, TCP_HLEN, UDP_HLEN,
};
use super::layout::is_fragment;

/// The unfolded sum of the IPv4 pseudo header of a TCP/UDP segment of `len` bytes.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let len = len.to_be_bytes();
    sum_slice(&[
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, len[0], len[1],
    ])
}

/// The unfolded sum of the IPv6 pseudo header (RFC 8200 section 8.1) of an upper-layer
/// packet of `len` bytes.
pub fn pseudo_header_sum_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: u32) -> u32 {
    let mut bytes = Vec::with_capacity(40);
    bytes.extend_from_slice(&src.octets());
    bytes.extend_from_slice(&dst.octets());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, proto]);
    sum_slice(&bytes)
}

/// The TCP/UDP/ICMPv6 checksum of `segment` (its checksum field zeroed) over IPv6, from
/// scratch; a computed 0 is sent as 0xffff for UDP (RFC 8200: 0 is no checksum, not allowed).
pub fn l4_checksum_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, segment: &[u8]) -> u16 {
    let sum = pseudo_header_sum_v6(src, dst, proto, segment.len() as u32) + sum_slice(segment);
    match !fold(sum) {
        0 if proto == PROTO_UDP => 0xffff,
        c => c,
    }
}

/// Checks every checksum of an IPv6 frame's TCP, UDP or ICMPv6 segment (after its extension
/// headers, as [`layout_v6`](super::layout::layout_v6) finds it; a UDP checksum of 0 is an
/// error in IPv6). Frames it cannot find the segment of are not checked.
pub fn verify_checksums_v6(frame: &[u8]) -> Result<(), String> {
    let Some(l) = super::layout::ip_layout_v6(frame) else {
        return Err("not an IPv6 frame whose upper-layer header can be found".into());
    };
    if l.later_fragment || l.fragment {
        return Ok(());
    }
    let ip = &frame[ETH_HLEN..];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let seg = &frame[l.l4_off..ETH_HLEN + l.tot_len];
    let (name, check_off) = match l.proto {
        PROTO_TCP if seg.len() >= TCP_HLEN => ("TCP", 16),
        PROTO_UDP if seg.len() >= UDP_HLEN => ("UDP", 6),
        PROTO_ICMPV6 if seg.len() >= 4 => ("ICMPv6", 2),
        _ => return Ok(()),
    };
    if l.proto == PROTO_UDP && seg[6..8] == [0, 0] {
        return Err("UDP checksum 0 over IPv6".into());
    }
    let sum = pseudo_header_sum_v6(src, dst, l.proto, seg.len() as u32) + sum_slice(seg);
    if fold(sum) != 0xffff {
        return Err(format!(
            "{name} checksum {:#06x} is wrong (should be {:#06x})",
            u16::from_be_bytes([seg[check_off], seg[check_off + 1]]),
            !fold(sum + (!u16::from_be_bytes([seg[check_off], seg[check_off + 1]])) as u32)
        ));
    }
    Ok(())
}

/// [`verify_checksums_v4`] or [`verify_checksums_v6`], by the frame's EtherType.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() >= ETH_HLEN && frame[12..14] == ETH_P_IPV6.to_be_bytes() {
        verify_checksums_v6(frame)
    } else {
        verify_checksums_v4(frame)
    }
}

/// The TCP/UDP checksum of `segment` (its checksum field zeroed) from scratch; for UDP a
/// computed 0 is sent as 0xffff (RFC 768).
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let sum = pseudo_header_sum(src, dst, proto, segment.len() as u16) + sum_slice(segment);
    match !fold(sum) {
        0 if proto == PROTO_UDP => 0xffff,
        c => c,
    }
}

/// Checks the IPv4 header checksum of an IPv4 frame and, for TCP, UDP (unless its checksum
/// is 0) and ICMP, the L4 checksum over the datagram's payload (`tot_len` bytes, padding
/// excluded). Fragments get only the IPv4 check. `Err` says which checksum is wrong.
pub fn verify_checksums_v4(frame: &[u8]) -> Result<(), String> {
    if frame.len() < ETH_HLEN + IPV4_HLEN {
        return Err(format!("{} bytes: too short for IPv4", frame.len()));
    }
    if frame[12..14] != ETH_P_IP.to_be_bytes() {
        return Err("not an IPv4 frame".into());
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < IPV4_HLEN || tot_len < ihl || tot_len > ip.len() {
        return Err(format!(
            "bad IPv4 lengths: IHL {ihl}, total length {tot_len}, {} bytes after Ethernet",
            ip.len()
        ));
    }
    let c = checksum(&ip[..ihl]);
    if c != 0 {
        return Err(format!(
            "IPv4 header checksum {:#06x} is wrong (header sums to {:#06x}, not 0xffff)",
            u16::from_be_bytes([ip[10], ip[11]]),
            !c
        ));
    }
    if is_fragment(frame) {
        return Ok(());
    }
    let proto = ip[9];
    let seg = &ip[ihl..tot_len];
    let (src, dst) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let (name, check_off, sum) = match proto {
        PROTO_TCP | PROTO_UDP => {
            let (name, min, off) = if proto == PROTO_TCP {
                ("TCP", TCP_HLEN, 16)
            } else {
                ("UDP", UDP_HLEN, 6)
            };
            if seg.len() < min {
                return Err(format!(
                    "{name} segment of {} bytes is truncated",
                    seg.len()
                ));
            }
            if proto == PROTO_UDP && seg[6..8] == [0, 0] {
                return Ok(());
            }
            let sum = pseudo_header_sum(src, dst, proto, seg.len() as u16) + sum_slice(seg);
            (name, off, sum)
        }
        PROTO_ICMP if seg.len() >= 4 => ("ICMP", 2, sum_slice(seg)),
        _ => return Ok(()),
    };
    if fold(sum) != 0xffff {
        return Err(format!(
            "{name} checksum {:#06x} is wrong (should be {:#06x})",
            u16::from_be_bytes([seg[check_off], seg[check_off + 1]]),
            // Remove the stored checksum from the sum: what the field should hold.
            !fold(sum + (!u16::from_be_bytes([seg[check_off], seg[check_off + 1]])) as u32)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::frame::Frame;

    #[test]
    fn the_verifier_catches_corruption() {
        let good = Frame {
            payload: b"data".to_vec(),
            ..Frame::default()
        }
        .build();
        let mut bad_ip = good.clone();
        bad_ip[14 + 8] -= 1; // TTL changed without fixing the checksum
        assert!(verify_checksums_v4(&bad_ip).unwrap_err().contains("IPv4"));
        let mut bad_tcp = good.clone();
        *bad_tcp.last_mut().unwrap() ^= 0x55;
        let e = verify_checksums_v4(&bad_tcp).unwrap_err();
        assert!(e.contains("TCP"), "{e}");
        // The "should be" value in the message is the right checksum.
        let should: String = e.split("should be ").nth(1).unwrap().replace(')', "");
        let should = u16::from_str_radix(should.trim_start_matches("0x"), 16).unwrap();
        bad_tcp[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&should.to_be_bytes());
        verify_checksums_v4(&bad_tcp).unwrap();
    }
}
