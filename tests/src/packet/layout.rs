//! Where the headers of a TCP/UDP-over-IPv4 or -IPv6 frame are, after the same checks the
//! XDP program makes, written from the RFCs rather than from its code.

use lb_common::{
    maps::{Endpoint, FlowKey, PROTO_TCP, PROTO_UDP},
    reason::Reason,
};

use super::frame::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET_MASK, IPV4_HLEN, IPV6_DEST_OPTIONS,
    IPV6_FRAGMENT, IPV6_HLEN, IPV6_HOP_BY_HOP, IPV6_ROUTING, PROTO_ICMPV6, TCP_HLEN, UDP_HLEN,
};

/// Where the parts of a TCP/UDP-over-IPv4 (or IPv6) frame are.
pub struct Layout {
    /// IP header length in bytes: IPv4's options included, IPv6's extension headers.
    pub ihl: usize,
    /// IP datagram length: IPv4's total length, IPv6's payload length + 40.
    pub tot_len: usize,
    pub proto: u8,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// Offset of the L4 checksum in the frame.
    pub check_off: usize,
    pub v6: bool,
}

impl Layout {
    /// The flow key of `frame` (the frame this layout was read from).
    pub fn flow_key(&self, frame: &[u8]) -> FlowKey {
        let port = |at: usize| [frame[at], frame[at + 1]];
        let (src, dst) = addresses(frame, self.v6);
        FlowKey {
            src: Endpoint::v6(src, port(self.l4_off)),
            dst: Endpoint::v6(dst, port(self.l4_off + 2)),
            proto: self.proto,
            _pad: 0,
        }
    }
}

/// The layout of a TCP/UDP-over-IPv4 frame, after the same checks the XDP program makes
/// (IHL-aware). `None` for anything it would not rewrite.
pub fn layout_v4(frame: &[u8]) -> Option<Layout> {
    if frame.len() < ETH_HLEN + IPV4_HLEN || frame[12..14] != ETH_P_IP.to_be_bytes() {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let (l4_min, check) = match proto {
        PROTO_TCP => (TCP_HLEN, 16),
        PROTO_UDP => (UDP_HLEN, 6),
        _ => return None,
    };
    if ihl < IPV4_HLEN || tot_len < ihl + l4_min || ETH_HLEN + tot_len > frame.len() {
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    Some(Layout {
        ihl,
        tot_len,
        proto,
        l4_off,
        check_off: l4_off + check,
        v6: false,
    })
}

/// The source and destination addresses of an IP frame (IPv4 mapped), as the maps hold
/// them.
pub fn addresses(frame: &[u8], v6: bool) -> ([u8; 16], [u8; 16]) {
    let at = |off: usize, len: usize| -> [u8; 16] {
        let bytes = &frame[ETH_HLEN + off..ETH_HLEN + off + len];
        if len == 4 {
            Endpoint::v4(bytes.try_into().unwrap(), [0; 2]).addr
        } else {
            bytes.try_into().unwrap()
        }
    };
    if v6 {
        (at(8, 16), at(24, 16))
    } else {
        (at(12, 4), at(16, 4))
    }
}

/// What the IPv6 header and its extension headers of a frame say.
pub struct Ip6Layout {
    /// The upper-layer protocol (of a later fragment: the fragment header's next header).
    pub proto: u8,
    /// Offset of the upper-layer header in the frame.
    pub l4_off: usize,
    /// Payload length + 40.
    pub tot_len: usize,
    /// A first fragment (offset 0, more fragments).
    pub fragment: bool,
    /// A fragment after the first.
    pub later_fragment: bool,
}

/// The most IPv6 extension headers the program walks, and the furthest (from the frame's
/// start) an upper-layer header may start.
pub const IPV6_EXT_MAX: usize = 4;
pub const L4_OFF_MAX: usize = 200;

/// An IPv6 frame's headers as RFC 8200 lays them out, or the reason the program gives a
/// frame it cannot or must not go into: a bad header (version, a payload length of 0 or
/// longer than the frame, an IPv4-mapped address), an extension header it does not walk
/// (ESP, AH, no next header, unknown: not TCP/UDP), more of them than it walks, or a
/// routing header with segments left.
pub fn parse_v6(frame: &[u8]) -> Result<Ip6Layout, Reason> {
    if frame.len() < ETH_HLEN || frame[12..14] != ETH_P_IPV6.to_be_bytes() {
        return Err(Reason::PassNotIp);
    }
    if frame.len() < ETH_HLEN + IPV6_HLEN {
        return Err(Reason::DropTruncated);
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 6 {
        return Err(Reason::DropBadIpv6Header);
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if payload_len == 0 {
        return Err(Reason::DropBadIpv6Header);
    }
    if ETH_HLEN + IPV6_HLEN + payload_len > frame.len() {
        return Err(Reason::DropTruncated);
    }
    let mapped = |a: &[u8]| a[..10] == [0; 10] && a[10..12] == [0xff, 0xff];
    if mapped(&ip[8..24]) || mapped(&ip[24..40]) {
        return Err(Reason::DropBadIpv6Header);
    }
    let mut proto = ip[6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    let (mut fragment, mut later_fragment) = (false, false);
    let mut walked = 0;
    while !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6) {
        let header = |len: usize| frame.get(off..off + len).ok_or(Reason::DropTruncated);
        match proto {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let h = header(4)?;
                // Segments left: the destination is not the final one (RFC 8200 4.4).
                if proto == IPV6_ROUTING && h[3] != 0 {
                    return Err(Reason::PassIpv6Extensions);
                }
                proto = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let h = header(4)?;
                proto = h[0];
                let offset = u16::from_be_bytes([h[2], h[3]]);
                off += 8;
                if offset & 0xfff8 != 0 {
                    later_fragment = true;
                    break;
                }
                fragment = offset & 1 != 0;
            }
            _ => return Err(Reason::PassNotTcpUdp),
        }
        walked += 1;
        if walked > IPV6_EXT_MAX || off > L4_OFF_MAX {
            return Err(Reason::PassIpv6Extensions);
        }
    }
    Ok(Ip6Layout {
        proto,
        l4_off: off,
        tot_len: IPV6_HLEN + payload_len,
        fragment,
        later_fragment,
    })
}

/// [`parse_v6`], for frames that parse.
pub fn ip_layout_v6(frame: &[u8]) -> Option<Ip6Layout> {
    parse_v6(frame).ok()
}

/// The layout of a TCP/UDP-over-IPv6 frame, as [`layout_v4`]'s; `None` for anything the
/// program would not rewrite (a later fragment included; a first one is, see
/// [`Ip6Layout::fragment`]).
pub fn layout_v6(frame: &[u8]) -> Option<Layout> {
    let l = ip_layout_v6(frame)?;
    let (l4_min, check) = match l.proto {
        PROTO_TCP => (TCP_HLEN, 16),
        PROTO_UDP => (UDP_HLEN, 6),
        _ => return None,
    };
    if l.later_fragment || l.l4_off + l4_min > ETH_HLEN + l.tot_len {
        return None;
    }
    Some(Layout {
        ihl: l.l4_off - ETH_HLEN,
        tot_len: l.tot_len,
        proto: l.proto,
        l4_off: l.l4_off,
        check_off: l.l4_off + check,
        v6: true,
    })
}

/// [`layout_v4`] or [`layout_v6`].
pub fn layout(frame: &[u8]) -> Option<Layout> {
    layout_v4(frame).or_else(|| layout_v6(frame))
}

pub fn is_fragment(frame: &[u8]) -> bool {
    let frags = u16::from_be_bytes([frame[ETH_HLEN + 6], frame[ETH_HLEN + 7]]);
    frags & (IP_MF | IP_OFFSET_MASK) != 0
}
