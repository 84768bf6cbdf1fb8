//! The reference rewrites: what the XDP program must make of a frame — a flow's TCP/UDP
//! packet given the rewrite its conntrack chose, an ICMP error about a flow, a ping's echo
//! reply — computed from scratch (checksums recomputed over the whole header and segment)
//! rather than incrementally as the program does.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use lb_common::{
    csum::{checksum, fold, sum_slice},
    maps::{Endpoint, FlowKey, PROTO_TCP, PROTO_UDP},
};

use crate::packet::{
    checksum::{l4_checksum, l4_checksum_v6, pseudo_header_sum, pseudo_header_sum_v6},
    frame::{
        ETH_HLEN, ETH_P_IP, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
        ICMP_PARAM_PROBLEM, ICMP_TIME_EXCEEDED, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST,
        IP_OFFSET_MASK, IPV4_HLEN, IPV6_HLEN, PROTO_ICMP, PROTO_ICMPV6,
    },
    layout::{is_fragment, layout_v4, layout_v6, parse_v6},
};

/// The reference NAT rewrite: `frame` with its source set to `src`, its destination to `dst`
/// (addresses and ports), the TTL lowered by `ttl_decrement` (1 when xlb
/// forwards the frame itself, 0 when it hands it to the kernel), and the IPv4 and L4 checksums
/// recomputed from scratch (a UDP checksum of 0 stays 0). MACs, IPv4 options, payload and
/// Ethernet padding are left as they are.
///
/// `None` when the XDP program would not rewrite the frame at all: not a complete
/// TCP/UDP-over-IPv4 frame (IHL-aware), a fragment, or a TTL of 0 or 1.
pub fn nat_rewrite_v4(
    frame: &[u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    let l = layout_v4(frame)?;
    if is_fragment(frame) || frame[ETH_HLEN + 8] <= 1 {
        return None;
    }
    let mut out = frame.to_vec();
    let (sport, dport) = (src.port().to_be_bytes(), dst.port().to_be_bytes());
    let (src, dst) = (src.ip().octets(), dst.ip().octets());

    let ip = ETH_HLEN;
    out[ip + 8] -= ttl_decrement;
    out[ip + 12..ip + 16].copy_from_slice(&src);
    out[ip + 16..ip + 20].copy_from_slice(&dst);
    out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let check = checksum(&out[ip..ip + l.ihl]);
    out[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());

    out[l.l4_off..l.l4_off + 2].copy_from_slice(&sport);
    out[l.l4_off + 2..l.l4_off + 4].copy_from_slice(&dport);
    let udp_without_checksum = l.proto == PROTO_UDP && out[l.check_off..l.check_off + 2] == [0, 0];
    if !udp_without_checksum {
        out[l.check_off..l.check_off + 2].copy_from_slice(&[0, 0]);
        let seg = &out[l.l4_off..ETH_HLEN + l.tot_len];
        let check = l4_checksum(src, dst, l.proto, seg);
        out[l.check_off..l.check_off + 2].copy_from_slice(&check.to_be_bytes());
    }
    Some(out)
}

/// The reference NAT rewrite of a TCP/UDP-over-IPv6 frame, as [`nat_rewrite_v4`]'s: the
/// addresses and ports set, the hop limit lowered by `ttl_decrement`, the L4 checksum
/// recomputed over the new pseudo-header (IPv6 has no header checksum). Extension headers,
/// payload and padding as they were. `None` when the program would not rewrite it: it does
/// not parse to TCP/UDP, is a fragment, or has a hop limit of 0 or 1.
pub fn nat_rewrite_v6(
    frame: &[u8],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    let l = layout_v6(frame)?;
    let ip = ETH_HLEN;
    if parse_v6(frame).ok()?.fragment || frame[ip + 7] <= 1 {
        return None;
    }
    let mut out = frame.to_vec();
    out[ip + 7] -= ttl_decrement;
    out[ip + 8..ip + 24].copy_from_slice(&src.ip().octets());
    out[ip + 24..ip + 40].copy_from_slice(&dst.ip().octets());
    out[l.l4_off..l.l4_off + 2].copy_from_slice(&src.port().to_be_bytes());
    out[l.l4_off + 2..l.l4_off + 4].copy_from_slice(&dst.port().to_be_bytes());
    out[l.check_off..l.check_off + 2].copy_from_slice(&[0, 0]);
    let seg = &out[l.l4_off..ETH_HLEN + l.tot_len];
    let check = l4_checksum_v6(*src.ip(), *dst.ip(), l.proto, seg);
    out[l.check_off..l.check_off + 2].copy_from_slice(&check.to_be_bytes());
    Some(out)
}

/// [`nat_rewrite_v4`] or [`nat_rewrite_v6`], by the endpoints' family (which must be the
/// frame's).
pub fn nat_rewrite(
    frame: &[u8],
    src: SocketAddr,
    dst: SocketAddr,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => nat_rewrite_v4(frame, s, d, ttl_decrement),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => nat_rewrite_v6(frame, s, d, ttl_decrement),
        _ => None,
    }
}

/// The reference answer to an ICMPv6 echo request (type 128, code 0) with no extension
/// headers: addresses swapped, hop limit 64, type 129, the checksum recomputed; MACs
/// untouched. `None` for anything else.
pub fn echo_reply_v6(frame: &[u8]) -> Option<Vec<u8>> {
    let l = parse_v6(frame).ok()?;
    let at = l.l4_off;
    if l.proto != PROTO_ICMPV6
        || l.fragment
        || at != ETH_HLEN + IPV6_HLEN
        || at + 8 > ETH_HLEN + l.tot_len
        || (frame[at], frame[at + 1]) != (ICMPV6_ECHO_REQUEST, 0)
    {
        return None;
    }
    let ip = ETH_HLEN;
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).unwrap());
    let (src, dst) = (addr(ip + 8), addr(ip + 24));
    let mut out = frame.to_vec();
    out[ip + 7] = 64;
    out[ip + 8..ip + 24].copy_from_slice(&dst.octets());
    out[ip + 24..ip + 40].copy_from_slice(&src.octets());
    out[at] = ICMPV6_ECHO_REPLY;
    out[at + 2..at + 4].copy_from_slice(&[0, 0]);
    let check = l4_checksum_v6(dst, src, PROTO_ICMPV6, &out[at..ETH_HLEN + l.tot_len]);
    out[at + 2..at + 4].copy_from_slice(&check.to_be_bytes());
    Some(out)
}

/// The flow key of a frame the program tracks as a flow's packet, either family: a TCP/UDP
/// one, or an ICMP echo ([`flow_key_v4`], [`echo_key_v6`]).
pub fn flow_key(frame: &[u8]) -> Option<FlowKey> {
    flow_key_v4(frame)
        .or_else(|| layout_v6(frame).map(|l| l.flow_key(frame)))
        .or_else(|| echo_key_v6(frame))
}

/// The flow key of an ICMPv6 echo request or reply (code 0, whole, not a fragment), as
/// [`flow_key_v4`] makes an ICMP one's: the identifier in the request's source port or the
/// reply's destination port.
pub fn echo_key_v6(frame: &[u8]) -> Option<FlowKey> {
    let (at, request) = echo_v6(frame)?;
    let id = [frame[at + 4], frame[at + 5]];
    let (sport, dport) = if request { (id, [0; 2]) } else { ([0; 2], id) };
    let addr = |o: usize| <[u8; 16]>::try_from(&frame[o..o + 16]).unwrap();
    Some(FlowKey {
        src: Endpoint::v6(addr(ETH_HLEN + 8), sport),
        dst: Endpoint::v6(addr(ETH_HLEN + 24), dport),
        proto: PROTO_ICMPV6,
        _pad: 0,
    })
}

/// Where an ICMPv6 echo's header is and whether it is a request: `None` for anything else
/// (another type, code not 0, cut short, a fragment).
pub fn echo_v6(frame: &[u8]) -> Option<(usize, bool)> {
    let l = parse_v6(frame).ok()?;
    let at = l.l4_off;
    if l.proto != PROTO_ICMPV6 || l.fragment || l.later_fragment || at + 8 > ETH_HLEN + l.tot_len {
        return None;
    }
    match (frame[at], frame[at + 1]) {
        (ICMPV6_ECHO_REQUEST, 0) => Some((at, true)),
        (ICMPV6_ECHO_REPLY, 0) => Some((at, false)),
        _ => None,
    }
}

/// The reference rewrite of an ICMPv6 echo of a flow, as [`echo_rewrite_v4`]'s: addresses
/// to `src` → `dst`, hop limit lowered, the identifier set, the checksum recomputed over the
/// new pseudo-header. `None` for anything else, or a hop limit of 0 or 1.
pub fn echo_rewrite_v6(
    frame: &[u8],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    let (at, request) = echo_v6(frame)?;
    let ip = ETH_HLEN;
    if frame[ip + 7] <= 1 {
        return None;
    }
    let end = ip + IPV6_HLEN + u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]) as usize;
    let id = if request { src.port() } else { dst.port() };
    let mut out = frame.to_vec();
    out[ip + 7] -= ttl_decrement;
    out[ip + 8..ip + 24].copy_from_slice(&src.ip().octets());
    out[ip + 24..ip + 40].copy_from_slice(&dst.ip().octets());
    out[at + 4..at + 6].copy_from_slice(&id.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&[0, 0]);
    let check = l4_checksum_v6(*src.ip(), *dst.ip(), PROTO_ICMPV6, &out[at..end]);
    out[at + 2..at + 4].copy_from_slice(&check.to_be_bytes());
    Some(out)
}

/// Where the parts of an ICMP-over-IPv4 frame are, after the checks the XDP program makes:
/// an IPv4 header that parses, an ICMP header inside the datagram, not a fragment.
pub struct IcmpLayout {
    /// Offset of the ICMP header; the message ends at `end`.
    pub icmp_off: usize,
    /// The end of the IPv4 datagram (padding after it is not part of it).
    pub end: usize,
    pub kind: u8,
    pub code: u8,
}

/// The layout of an ICMP-over-IPv4 frame the program looks into; `None` for anything else,
/// and for fragments (which it leaves to the kernel).
pub fn icmp_layout_v4(frame: &[u8]) -> Option<IcmpLayout> {
    if frame.len() < ETH_HLEN + IPV4_HLEN || frame[12..14] != ETH_P_IP.to_be_bytes() {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[0] >> 4 != 4
        || ip[9] != PROTO_ICMP
        || ihl < IPV4_HLEN
        || tot_len < ihl + 8
        || ETH_HLEN + tot_len > frame.len()
        || is_fragment(frame)
    {
        return None;
    }
    let icmp_off = ETH_HLEN + ihl;
    Some(IcmpLayout {
        icmp_off,
        end: ETH_HLEN + tot_len,
        kind: frame[icmp_off],
        code: frame[icmp_off + 1],
    })
}

/// The flow key of a frame the program tracks as a flow's packet: a TCP/UDP one (its
/// ports), or an ICMP echo request or reply (code 0, whole), whose identifier stands in for
/// the request's source port and the reply's destination port, the other port 0.
pub fn flow_key_v4(frame: &[u8]) -> Option<FlowKey> {
    if let Some(l) = layout_v4(frame) {
        return Some(l.flow_key(frame));
    }
    let l = icmp_layout_v4(frame)?;
    let ip = ETH_HLEN;
    let addr = |at: usize| [frame[at], frame[at + 1], frame[at + 2], frame[at + 3]];
    let id = [frame[l.icmp_off + 4], frame[l.icmp_off + 5]];
    let (sport, dport) = match (l.kind, l.code) {
        (ICMP_ECHO_REQUEST, 0) => (id, [0; 2]),
        (ICMP_ECHO_REPLY, 0) => ([0; 2], id),
        _ => return None,
    };
    Some(FlowKey {
        src: Endpoint::v4(addr(ip + 12), sport),
        dst: Endpoint::v4(addr(ip + 16), dport),
        proto: PROTO_ICMP,
        _pad: 0,
    })
}

/// The reference rewrite of an ICMP echo request or reply of a flow: addresses to `src` →
/// `dst`, TTL lowered by `ttl_decrement`, the identifier set to the request's new source
/// port or the reply's new destination port, both checksums recomputed from scratch.
/// `None` for anything else, or a TTL of 0 or 1.
pub fn echo_rewrite_v4(
    frame: &[u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    let l = icmp_layout_v4(frame)?;
    let id = match (l.kind, l.code) {
        (ICMP_ECHO_REQUEST, 0) => src.port(),
        (ICMP_ECHO_REPLY, 0) => dst.port(),
        _ => return None,
    };
    let ip = ETH_HLEN;
    if frame[ip + 8] <= 1 {
        return None;
    }
    let mut out = frame.to_vec();
    out[ip + 8] -= ttl_decrement;
    out[ip + 12..ip + 16].copy_from_slice(&src.ip().octets());
    out[ip + 16..ip + 20].copy_from_slice(&dst.ip().octets());
    fix_ipv4_checksum(&mut out);
    out[l.icmp_off + 4..l.icmp_off + 6].copy_from_slice(&id.to_be_bytes());
    fix_icmp_checksum(&mut out, l.icmp_off, l.end);
    Some(out)
}

/// Whether an ICMP message of this type is an error the program translates.
pub fn is_icmp_error(kind: u8) -> bool {
    matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
    )
}

/// The reference echo reply to an echo request (type 8, code 0): addresses swapped, TTL 64,
/// type 0, both checksums recomputed; MACs untouched. `None` if the frame is no echo
/// request the program answers.
pub fn echo_reply_v4(frame: &[u8]) -> Option<Vec<u8>> {
    let l = icmp_layout_v4(frame)?;
    if (l.kind, l.code) != (ICMP_ECHO_REQUEST, 0) {
        return None;
    }
    let mut out = frame.to_vec();
    let ip = ETH_HLEN;
    let (src, dst) = (&frame[ip + 12..ip + 16], &frame[ip + 16..ip + 20]);
    out[ip + 12..ip + 16].copy_from_slice(dst);
    out[ip + 16..ip + 20].copy_from_slice(src);
    out[ip + 8] = 64;
    fix_ipv4_checksum(&mut out);
    out[l.icmp_off] = ICMP_ECHO_REPLY;
    fix_icmp_checksum(&mut out, l.icmp_off, l.end);
    Some(out)
}

/// The quoted TCP/UDP packet of an ICMP error, as the program reads it: `(source,
/// destination, protocol)`. `None` when the quote is not an unfragmented TCP/UDP-over-IPv4
/// packet with its ports inside the error's datagram.
pub fn icmp_quote_v4(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u8)> {
    let l = icmp_layout_v4(frame)?;
    let q = l.icmp_off + 8;
    if q + IPV4_HLEN > frame.len() {
        return None;
    }
    let ihl = ((frame[q] & 0x0f) as usize) * 4;
    let frags = u16::from_be_bytes([frame[q + 6], frame[q + 7]]);
    let proto = frame[q + 9];
    if frame[q] >> 4 != 4
        || ihl < IPV4_HLEN
        || frags & IP_OFFSET_MASK != 0
        || !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP)
        || q + ihl + 8 > l.end
    {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let q4 = q + ihl;
    // A quoted echo's identifier stands in for its ports, as in `flow_key_v4`.
    let (sport, dport) = match (proto, frame[q4], frame[q4 + 1]) {
        (PROTO_ICMP, ICMP_ECHO_REQUEST, 0) => (port(q4 + 4), 0),
        (PROTO_ICMP, ICMP_ECHO_REPLY, 0) => (0, port(q4 + 4)),
        (PROTO_ICMP, ..) => return None,
        _ => (port(q4), port(q4 + 2)),
    };
    Some((
        SocketAddrV4::new(addr(q + 12), sport),
        SocketAddrV4::new(addr(q + 16), dport),
        proto,
    ))
}

/// Where an ICMP error's quoted TCP/UDP checksum is, when the quote (the error's datagram,
/// not the padding after it) reaches it.
pub fn icmp_quoted_check_off(frame: &[u8]) -> Option<usize> {
    let l = icmp_layout_v4(frame)?;
    let (_, _, proto) = icmp_quote_v4(frame)?;
    let q = l.icmp_off + 8;
    let off = q + ((frame[q] & 0x0f) as usize) * 4 + l4_check_off(proto);
    (off + 2 <= l.end).then_some(off)
}

/// [`icmp_quoted_check_off`] for an ICMPv6 error ([`icmp_quote_v6`]).
pub fn icmp6_quoted_check_off(frame: &[u8]) -> Option<usize> {
    let (_, _, proto, q4) = icmp_quote_v6(frame)?;
    let end = ETH_HLEN
        + IPV6_HLEN
        + u16::from_be_bytes([frame[ETH_HLEN + 4], frame[ETH_HLEN + 5]]) as usize;
    let off = q4 + l4_check_off(proto);
    (off + 2 <= end).then_some(off)
}

/// Writes a quoted packet's ports (its L4 header at `q4`): a TCP or UDP header's, or an
/// echo's identifier, which stands in for them: a request's source port, a reply's
/// destination port.
fn put_quoted_ports(out: &mut [u8], q4: usize, proto: u8, src: u16, dst: u16) {
    match (proto, out[q4]) {
        (PROTO_ICMP, ICMP_ECHO_REQUEST) | (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST) => {
            out[q4 + 4..q4 + 6].copy_from_slice(&src.to_be_bytes())
        }
        (PROTO_ICMP | PROTO_ICMPV6, _) => out[q4 + 4..q4 + 6].copy_from_slice(&dst.to_be_bytes()),
        _ => {
            out[q4..q4 + 2].copy_from_slice(&src.to_be_bytes());
            out[q4 + 2..q4 + 4].copy_from_slice(&dst.to_be_bytes());
        }
    }
}

/// Where the checksum is in a TCP, UDP or ICMP(v6) header.
fn l4_check_off(proto: u8) -> usize {
    match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2,
    }
}

/// The reference translation of an ICMP error: the outer header to `outer_src` →
/// `outer_dst` with the TTL lowered by `ttl_decrement`; the quoted packet to `inner_src` →
/// `inner_dst` (addresses and ports); the outer IPv4, quoted IPv4 and ICMP checksums
/// recomputed, and the quoted L4 checksum too, when the quote reaches it: from scratch when
/// the whole quoted segment is there, else from what the original checksum says the
/// missing part sums to. `None` when the program would not translate the frame.
pub fn icmp_error_v4(
    frame: &[u8],
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner_src: SocketAddrV4,
    inner_dst: SocketAddrV4,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    let l = icmp_layout_v4(frame)?;
    let (_, _, proto) = icmp_quote_v4(frame)?;
    if !is_icmp_error(l.kind) || frame[ETH_HLEN + 8] <= 1 {
        return None;
    }
    let mut out = frame.to_vec();
    let ip = ETH_HLEN;
    out[ip + 8] -= ttl_decrement;
    out[ip + 12..ip + 16].copy_from_slice(&outer_src.octets());
    out[ip + 16..ip + 20].copy_from_slice(&outer_dst.octets());
    fix_ipv4_checksum(&mut out);

    let q = l.icmp_off + 8;
    let ihl = ((frame[q] & 0x0f) as usize) * 4;
    let q4 = q + ihl;
    out[q + 12..q + 16].copy_from_slice(&inner_src.ip().octets());
    out[q + 16..q + 20].copy_from_slice(&inner_dst.ip().octets());
    out[q + 10..q + 12].copy_from_slice(&[0, 0]);
    let check = checksum(&out[q..q + ihl]);
    out[q + 10..q + 12].copy_from_slice(&check.to_be_bytes());
    put_quoted_ports(&mut out, q4, proto, inner_src.port(), inner_dst.port());

    if let Some(check_off) = icmp_quoted_check_off(frame)
        && !(proto == PROTO_UDP && frame[check_off..check_off + 2] == [0, 0])
    {
        // The quoted segment's length, as its IPv4 header says.
        let seg_len =
            (u16::from_be_bytes([frame[q + 2], frame[q + 3]]) as usize).saturating_sub(ihl);
        let quoted = l.end - q4;
        let addrs = |f: &[u8]| {
            (
                [f[q + 12], f[q + 13], f[q + 14], f[q + 15]],
                [f[q + 16], f[q + 17], f[q + 18], f[q + 19]],
            )
        };
        let (new_src, new_dst) = addrs(&out);
        let mut seg = out[q4..l.end].to_vec();
        seg[check_off - q4..check_off - q4 + 2].copy_from_slice(&[0, 0]);
        let (old_src, old_dst) = addrs(frame);
        // The pseudo-header's share: none for ICMP.
        let pseudo = |src, dst| {
            if proto == PROTO_ICMP {
                0
            } else {
                pseudo_header_sum(src, dst, proto, seg_len as u16)
            }
        };
        // The whole segment is quoted, and its checksum is right over it: recompute it. (A
        // frame whose lengths lie may quote bytes the checksum never covered.)
        let whole = seg_len <= quoted
            && seg_len >= check_off + 2 - q4
            && fold(pseudo(old_src, old_dst) + sum_slice(&frame[q4..q4 + seg_len])) == 0xffff;
        let new_check = if whole {
            if proto == PROTO_ICMP {
                checksum(&seg[..seg_len])
            } else {
                l4_checksum(new_src, new_dst, proto, &seg[..seg_len])
            }
        } else {
            // What the part the quote cut off sums to: whatever made the original valid.
            let known = pseudo(old_src, old_dst) + sum_slice(&frame[q4..l.end]);
            let missing = !fold(known) as u32;
            let sum = pseudo(new_src, new_dst) + sum_slice(&seg) + missing;
            match !fold(sum) {
                0 if proto == PROTO_UDP => 0xffff,
                c => c,
            }
        };
        out[check_off..check_off + 2].copy_from_slice(&new_check.to_be_bytes());
    }
    fix_icmp_checksum(&mut out, l.icmp_off, l.end);
    Some(out)
}

/// The reference "fragmentation needed" xlb answers a too-big TCP/UDP frame with: a new
/// IPv4 header (TOS 0xc0, TTL 64, DF, ID 0) from the frame's destination to its source,
/// ICMP type 3 code 4 with `mtu`, quoting the frame's IPv4 header and the 8 bytes after it;
/// both checksums computed from scratch; the frame's MACs kept (the caller sets the way
/// back's). `None` if the frame is not a complete TCP/UDP-over-IPv4 one.
pub fn too_big_v4(frame: &[u8], mtu: u16) -> Option<Vec<u8>> {
    let l = layout_v4(frame)?;
    let quote = &frame[ETH_HLEN..l.l4_off + 8];
    let mut icmp = vec![ICMP_DEST_UNREACH, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let check = checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let tot_len = (IPV4_HLEN + icmp.len()) as u16;
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&ETH_P_IP.to_be_bytes());
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&tot_len.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_ICMP, 0, 0]);
    out.extend_from_slice(&frame[ETH_HLEN + 16..ETH_HLEN + 20]);
    out.extend_from_slice(&frame[ETH_HLEN + 12..ETH_HLEN + 16]);
    out.extend_from_slice(&icmp);
    fix_ipv4_checksum(&mut out);
    Some(out)
}

/// The quoted TCP/UDP packet or echo of an ICMPv6 error, as the program reads it: `(source,
/// destination, protocol, offset of its L4 header)`, an echo's identifier standing in for
/// its ports. `None` unless the error is an ICMPv6 error (types 1 to 4) with no extension
/// headers, quoting an IPv6 header followed at once by TCP, UDP or an echo, with its first
/// 8 bytes inside the error.
pub fn icmp_quote_v6(frame: &[u8]) -> Option<(SocketAddrV6, SocketAddrV6, u8, usize)> {
    let l = parse_v6(frame).ok()?;
    let at = l.l4_off;
    let end = ETH_HLEN + l.tot_len;
    if l.proto != PROTO_ICMPV6
        || l.fragment
        || at != ETH_HLEN + IPV6_HLEN
        || at + 8 > end
        || !(1..=4).contains(&frame[at])
    {
        return None;
    }
    let q = at + 8;
    if q + IPV6_HLEN > end || frame[q] >> 4 != 6 {
        return None;
    }
    let proto = frame[q + 6];
    let q4 = q + IPV6_HLEN;
    if !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6) || q4 + 8 > end {
        return None;
    }
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).unwrap());
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    // A quoted echo's identifier stands in for its ports, as in IPv4 (`icmp_quote_v4`).
    let (sport, dport) = match (proto, frame[q4], frame[q4 + 1]) {
        (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST, 0) => (port(q4 + 4), 0),
        (PROTO_ICMPV6, ICMPV6_ECHO_REPLY, 0) => (0, port(q4 + 4)),
        (PROTO_ICMPV6, ..) => return None,
        _ => (port(q4), port(q4 + 2)),
    };
    Some((
        SocketAddrV6::new(addr(q + 8), sport, 0, 0),
        SocketAddrV6::new(addr(q + 24), dport, 0, 0),
        proto,
        q4,
    ))
}

/// The reference translation of an ICMPv6 error, as [`icmp_error_v4`]'s: the outer header
/// to `outer_src` → `outer_dst`, hop limit lowered by `ttl_decrement`; the quoted packet to
/// `inner_src` → `inner_dst`; its L4 checksum, when quoted, from scratch when the whole
/// segment is there and right, else from what the original says of the part cut off; the
/// ICMPv6 checksum from scratch over the new pseudo-header. `None` when the program would
/// not translate it.
pub fn icmp_error_v6(
    frame: &[u8],
    outer_src: Ipv6Addr,
    outer_dst: Ipv6Addr,
    inner_src: SocketAddrV6,
    inner_dst: SocketAddrV6,
    ttl_decrement: u8,
) -> Option<Vec<u8>> {
    let (_, _, proto, q4) = icmp_quote_v6(frame)?;
    let ip = ETH_HLEN;
    if frame[ip + 7] <= 1 {
        return None;
    }
    let end = ETH_HLEN + IPV6_HLEN + u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]) as usize;
    let at = ETH_HLEN + IPV6_HLEN;
    let q = at + 8;
    let mut out = frame.to_vec();
    out[ip + 7] -= ttl_decrement;
    out[ip + 8..ip + 24].copy_from_slice(&outer_src.octets());
    out[ip + 24..ip + 40].copy_from_slice(&outer_dst.octets());
    out[q + 8..q + 24].copy_from_slice(&inner_src.ip().octets());
    out[q + 24..q + 40].copy_from_slice(&inner_dst.ip().octets());
    put_quoted_ports(&mut out, q4, proto, inner_src.port(), inner_dst.port());
    // ICMPv6's checksum, like TCP's and UDP's, covers a pseudo-header.
    if let Some(check_off) = icmp6_quoted_check_off(frame)
        && !(proto == PROTO_UDP && frame[check_off..check_off + 2] == [0, 0])
    {
        let seg_len = u16::from_be_bytes([frame[q + 4], frame[q + 5]]) as usize;
        let quoted = end - q4;
        let addr =
            |f: &[u8], o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&f[o..o + 16]).unwrap());
        let pseudo = |f: &[u8], len: usize| {
            pseudo_header_sum_v6(addr(f, q + 8), addr(f, q + 24), proto, len as u32)
        };
        let whole = seg_len <= quoted
            && seg_len >= check_off + 2 - q4
            && fold(pseudo(frame, seg_len) + sum_slice(&frame[q4..q4 + seg_len])) == 0xffff;
        out[check_off..check_off + 2].copy_from_slice(&[0, 0]);
        let new_check = if whole {
            l4_checksum_v6(
                *inner_src.ip(),
                *inner_dst.ip(),
                proto,
                &out[q4..q4 + seg_len],
            )
        } else {
            let known = pseudo(frame, seg_len) + sum_slice(&frame[q4..end]);
            let missing = !fold(known) as u32;
            let sum = pseudo(&out, seg_len) + sum_slice(&out[q4..end]) + missing;
            match !fold(sum) {
                0 if proto == PROTO_UDP => 0xffff,
                c => c,
            }
        };
        out[check_off..check_off + 2].copy_from_slice(&new_check.to_be_bytes());
    }
    out[at + 2..at + 4].copy_from_slice(&[0, 0]);
    let check = l4_checksum_v6(outer_src, outer_dst, PROTO_ICMPV6, &out[at..end]);
    out[at + 2..at + 4].copy_from_slice(&check.to_be_bytes());
    Some(out)
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ip = ETH_HLEN;
    let ihl = ((frame[ip] & 0x0f) as usize) * 4;
    frame[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let check = checksum(&frame[ip..ip + ihl]);
    frame[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
}

fn fix_icmp_checksum(frame: &mut [u8], icmp_off: usize, end: usize) {
    frame[icmp_off + 2..icmp_off + 4].copy_from_slice(&[0, 0]);
    let check = checksum(&frame[icmp_off..end]);
    frame[icmp_off + 2..icmp_off + 4].copy_from_slice(&check.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::csum::{replace, replace_udp, sum_words};

    use super::*;
    use crate::packet::{
        checksum::verify_checksums_v4,
        diff::hex_diff,
        frame::{Frame, IP_MF, L4, PROTO_ICMP, TCP_ACK, TCP_SYN},
    };

    /// A rewrite to `src` → `dst`.
    #[derive(Clone, Copy)]
    struct To {
        src: SocketAddrV4,
        dst: SocketAddrV4,
    }

    fn entry(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> To {
        To {
            src: SocketAddrV4::new(src.0.into(), src.1),
            dst: SocketAddrV4::new(dst.0.into(), dst.1),
        }
    }

    #[test]
    fn reference_rewrite_output_verifies_and_changes_only_what_it_should() {
        let mut f = Frame::tcp(
            (Ipv4Addr::new(10, 10, 1, 2), 40000),
            (Ipv4Addr::new(10, 10, 0, 100), 80),
            TCP_SYN | TCP_ACK,
        );
        f.ip_options = vec![1, 1, 1, 0];
        f.payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
        f.pad_to = Some(128);
        let e = entry(([10, 20, 0, 1], 23456), ([10, 20, 1, 2], 8080));
        let out = nat_rewrite_v4(&f.build(), e.src, e.dst, 1).unwrap();
        verify_checksums_v4(&out).unwrap();

        // The same frame built from scratch with the new addresses is byte-identical.
        let expected = Frame {
            src: Ipv4Addr::new(10, 20, 0, 1),
            sport: 23456,
            dst: Ipv4Addr::new(10, 20, 1, 2),
            dport: 8080,
            ttl: 63,
            ..f.clone()
        }
        .build();
        assert!(out == expected, "{}", hex_diff(&expected, &out));

        // UDP without checksum keeps 0.
        let mut u = Frame::udp(
            (Ipv4Addr::new(10, 10, 1, 2), 5000),
            (Ipv4Addr::new(10, 10, 0, 100), 53),
            b"q",
        );
        u.l4 = L4::Udp { checksum: false };
        let out = nat_rewrite_v4(&u.build(), e.src, e.dst, 1).unwrap();
        assert_eq!(&out[40..42], &[0, 0]);
        verify_checksums_v4(&out).unwrap();

        // What the XDP program leaves alone, the model refuses.
        assert!(
            nat_rewrite_v4(
                &Frame {
                    ttl: 1,
                    ..f.clone()
                }
                .build(),
                e.src,
                e.dst,
                1
            )
            .is_none()
        );
        assert!(
            nat_rewrite_v4(
                &Frame {
                    frags: IP_MF,
                    ..f.clone()
                }
                .build(),
                e.src,
                e.dst,
                1
            )
            .is_none()
        );
        let short = Frame {
            truncate_to: Some(40),
            ..f.clone()
        };
        assert!(nat_rewrite_v4(&short.build(), e.src, e.dst, 1).is_none());
        let icmp = Frame {
            l4: L4::Other { proto: PROTO_ICMP },
            ..f.clone()
        };
        assert!(nat_rewrite_v4(&icmp.build(), e.src, e.dst, 1).is_none());
    }

    /// The XDP program's rewrite (lb-ebpf/src/nat.rs), restated on a byte slice with the
    /// same incremental math.
    fn incremental_rewrite(frame: &[u8], entry: &To) -> Vec<u8> {
        let l = layout_v4(frame).unwrap();
        let mut out = frame.to_vec();
        let ip = ETH_HLEN;
        let old_src: [u8; 4] = frame[ip + 12..ip + 16].try_into().unwrap();
        let old_dst: [u8; 4] = frame[ip + 16..ip + 20].try_into().unwrap();
        let (new_src, new_dst) = (entry.src.ip().octets(), entry.dst.ip().octets());
        let old_addrs = sum_words(&old_src) + sum_words(&old_dst);
        let new_addrs = sum_words(&new_src) + sum_words(&new_dst);
        let ttl = frame[ip + 8];
        let check = replace(
            u16::from_be_bytes([frame[ip + 10], frame[ip + 11]]),
            old_addrs + sum_words(&[ttl, l.proto]),
            new_addrs + sum_words(&[ttl - 1, l.proto]),
        );
        out[ip + 8] = ttl - 1;
        out[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
        out[ip + 12..ip + 16].copy_from_slice(&new_src);
        out[ip + 16..ip + 20].copy_from_slice(&new_dst);

        let old_ports: [u8; 4] = frame[l.l4_off..l.l4_off + 4].try_into().unwrap();
        let (sp, dp) = (
            entry.src.port().to_be_bytes(),
            entry.dst.port().to_be_bytes(),
        );
        let new_ports = [sp[0], sp[1], dp[0], dp[1]];
        let old_l4 = old_addrs + sum_words(&old_ports);
        let new_l4 = new_addrs + sum_words(&new_ports);
        let old_check = u16::from_be_bytes([frame[l.check_off], frame[l.check_off + 1]]);
        let new_check = if l.proto == PROTO_UDP {
            replace_udp(old_check, old_l4, new_l4)
        } else {
            replace(old_check, old_l4, new_l4)
        };
        out[l.check_off..l.check_off + 2].copy_from_slice(&new_check.to_be_bytes());
        out[l.l4_off..l.l4_off + 4].copy_from_slice(&new_ports);
        out
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 32) as u32
        }
        fn addr(&mut self) -> Ipv4Addr {
            Ipv4Addr::from(self.next())
        }
        fn port(&mut self) -> u16 {
            self.next() as u16
        }
    }

    #[test]
    fn reference_rewrite_matches_incremental_checksum_math() {
        let mut rng = Lcg(0x786c_6221);
        for i in 0..20_000 {
            let l4 = match rng.next() % 3 {
                0 => L4::Tcp {
                    flags: rng.next() as u8,
                    seq: rng.next(),
                    ack: rng.next(),
                },
                1 => L4::Udp { checksum: true },
                _ => L4::Udp { checksum: false },
            };
            let f = Frame {
                src: rng.addr(),
                dst: rng.addr(),
                sport: rng.port(),
                dport: rng.port(),
                ttl: 2 + (rng.next() % 254) as u8,
                id: rng.next() as u16,
                tos: rng.next() as u8,
                ip_options: (0..4 * (rng.next() % 11))
                    .map(|_| rng.next() as u8)
                    .collect(),
                payload: (0..rng.next() % 64).map(|_| rng.next() as u8).collect(),
                l4,
                ..Frame::default()
            };
            let frame = f.build();
            verify_checksums_v4(&frame).unwrap();
            let e = entry(
                (rng.addr().octets(), rng.port()),
                (rng.addr().octets(), rng.port()),
            );
            let reference = nat_rewrite_v4(&frame, e.src, e.dst, 1).unwrap();
            let incremental = incremental_rewrite(&frame, &e);
            assert!(
                reference == incremental,
                "case {i}: {f:?}\n{}",
                hex_diff(&reference, &incremental)
            );
            verify_checksums_v4(&reference).unwrap();
        }
    }
}
