//! Where the headers of a TCP/UDP-over-IPv4 frame are, after the same checks the XDP
//! program makes.

use lb_common::maps::{Endpoint, FlowKey, PROTO_TCP, PROTO_UDP};

use super::frame::{ETH_HLEN, ETH_P_IP, IP_MF, IP_OFFSET_MASK, IPV4_HLEN, TCP_HLEN, UDP_HLEN};

/// Where the parts of a TCP/UDP-over-IPv4 frame are.
pub struct Layout {
    /// IPv4 header length in bytes (options included).
    pub ihl: usize,
    /// IPv4 total length.
    pub tot_len: usize,
    pub proto: u8,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// Offset of the L4 checksum in the frame.
    pub check_off: usize,
}

impl Layout {
    /// The flow key of `frame` (the frame this layout was read from).
    pub fn flow_key(&self, frame: &[u8]) -> FlowKey {
        let addr = |at: usize| [frame[at], frame[at + 1], frame[at + 2], frame[at + 3]];
        let port = |at: usize| [frame[at], frame[at + 1]];
        FlowKey {
            src: Endpoint::v4(addr(ETH_HLEN + 12), port(self.l4_off)),
            dst: Endpoint::v4(addr(ETH_HLEN + 16), port(self.l4_off + 2)),
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
    })
}

pub fn is_fragment(frame: &[u8]) -> bool {
    let frags = u16::from_be_bytes([frame[ETH_HLEN + 6], frame[ETH_HLEN + 7]]);
    frags & (IP_MF | IP_OFFSET_MASK) != 0
}
