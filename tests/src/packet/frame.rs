//! A builder for Ethernet + IPv4 or IPv6 + TCP/UDP frames that computes every checksum from
//! scratch, with knobs for making malformed frames on purpose.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{
    csum::checksum,
    maps::{PROTO_TCP, PROTO_UDP},
};

use super::checksum::{l4_checksum, l4_checksum_v6};

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// EtherType of an 802.1Q VLAN tag, and the tag's length.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const VLAN_HLEN: usize = 4;
/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
/// IP protocol number of ICMP, and of ICMPv6.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers (next-header values).
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTIONS: u8 = 60;
/// "No next header".
pub const IPV6_NONE: u8 = 59;
pub const IPV6_HLEN: usize = 40;
/// IPv4 flags/fragment-offset bits (host order).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;
/// TCP flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// What follows the IPv4 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A 20-byte TCP header (no options) with these flags, sequence and ack numbers.
    Tcp { flags: u8, seq: u32, ack: u32 },
    /// An 8-byte UDP header; `checksum: false` sends checksum 0 ("none").
    Udp { checksum: bool },
    /// No L4 header of ours: `Frame::payload` follows the IPv4 header as is, and the IPv4
    /// protocol field is `proto`. For ICMP, build the message with [`icmp_echo`].
    Other { proto: u8 },
}

impl L4 {
    pub const fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Other { proto } => *proto,
        }
    }
}

/// An Ethernet + IPv4 + TCP/UDP frame, described field by field. Start from
/// [`Frame::tcp`] / [`Frame::udp`] (or `Default`, a TCP SYN), change the public fields,
/// then [`build`](Frame::build) it. Every checksum is computed from scratch; the `*_override`
/// and `truncate_to` knobs make malformed frames on purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// An 802.1Q tag's TCI (priority, VLAN id) between the MACs and `ethertype`.
    pub vlan: Option<u16>,
    pub ethertype: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Ports (host order); unused for [`L4::Other`].
    pub sport: u16,
    pub dport: u16,
    pub tos: u8,
    pub ttl: u8,
    /// IPv4 identification.
    pub id: u16,
    /// IPv4 flags and fragment offset (in 8-byte units), host order: e.g. [`IP_DF`],
    /// [`IP_MF`], `IP_MF | 3`.
    pub frags: u16,
    /// IPv4 options, placed after the fixed header; IHL counts them. Must be a multiple of 4
    /// bytes and at most 40.
    pub ip_options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Written into the version nibble instead of 4 (6).
    pub version_override: Option<u8>,
    /// IPv6 addresses: the frame is IPv6 (see [`Frame::tcp6`]); `src`, `dst`, `id`, `frags`
    /// and `ip_options` are then unused, `ttl` is the hop limit and `tot_len_override` the
    /// payload length's.
    pub v6: Option<(Ipv6Addr, Ipv6Addr)>,
    /// IPv6 extension headers between the IPv6 header and the L4 header, in order: each its
    /// next-header value and its bytes after the first two (next header, length): 6, 14,
    /// 22, ... bytes; a fragment header's are 6 (offset and flags, identification), its
    /// length byte reserved (0).
    pub ext_headers: Vec<(u8, Vec<u8>)>,
    /// Written into the IHL nibble instead of the real header length / 4.
    pub ihl_override: Option<u8>,
    /// Written into the IPv4 total length instead of the real one (the checksums still
    /// cover the bytes actually built).
    pub tot_len_override: Option<u16>,
    /// Zero bytes appended after the IPv4 datagram up to this frame length (Ethernet
    /// padding; not counted in the total length).
    pub pad_to: Option<usize>,
    /// Cut the finished frame to this many bytes.
    pub truncate_to: Option<usize>,
}

impl Default for Frame {
    /// A TCP SYN 10.0.0.1:40000 → 10.0.0.2:80, TTL 64, DF, no payload.
    fn default() -> Self {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            vlan: None,
            ethertype: ETH_P_IP,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            sport: 40000,
            dport: 80,
            tos: 0,
            ttl: 64,
            id: 0x1234,
            frags: IP_DF,
            ip_options: Vec::new(),
            l4: L4::Tcp {
                flags: TCP_SYN,
                seq: 1000,
                ack: 0,
            },
            payload: Vec::new(),
            version_override: None,
            v6: None,
            ext_headers: Vec::new(),
            ihl_override: None,
            tot_len_override: None,
            pad_to: None,
            truncate_to: None,
        }
    }
}

impl Frame {
    /// A TCP segment with `flags` between two endpoints.
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Frame {
        Frame {
            src: src.0,
            sport: src.1,
            dst: dst.0,
            dport: dst.1,
            l4: L4::Tcp {
                flags,
                seq: 1000,
                ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            },
            ..Frame::default()
        }
    }

    /// A UDP datagram with a checksum, carrying `payload`.
    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Frame {
        Frame {
            src: src.0,
            sport: src.1,
            dst: dst.0,
            dport: dst.1,
            l4: L4::Udp { checksum: true },
            payload: payload.to_vec(),
            ..Frame::default()
        }
    }

    /// A TCP segment with `flags` between two IPv6 endpoints, hop limit 64.
    pub fn tcp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Frame {
        Frame {
            ethertype: ETH_P_IPV6,
            v6: Some((src.0, dst.0)),
            ..Frame::tcp(
                (Ipv4Addr::UNSPECIFIED, src.1),
                (Ipv4Addr::UNSPECIFIED, dst.1),
                flags,
            )
        }
    }

    /// A UDP datagram between two IPv6 endpoints, with a checksum, carrying `payload`.
    pub fn udp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Frame {
        Frame {
            ethertype: ETH_P_IPV6,
            v6: Some((src.0, dst.0)),
            ..Frame::udp(
                (Ipv4Addr::UNSPECIFIED, src.1),
                (Ipv4Addr::UNSPECIFIED, dst.1),
                payload,
            )
        }
    }

    /// An ICMPv6 message (build it with [`icmp6_message`]) between two IPv6 addresses.
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, message: Vec<u8>) -> Frame {
        Frame {
            ethertype: ETH_P_IPV6,
            v6: Some((src, dst)),
            l4: L4::Other {
                proto: PROTO_ICMPV6,
            },
            payload: message,
            ..Frame::default()
        }
    }

    /// The same frame with other MACs (builder style).
    pub fn with_macs(mut self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Frame {
        self.src_mac = src_mac;
        self.dst_mac = dst_mac;
        self
    }

    /// The frame's bytes.
    ///
    /// # Panics
    /// If `ip_options` is not a multiple of 4 bytes or longer than 40.
    pub fn build(&self) -> Vec<u8> {
        if let Some((src, dst)) = self.v6 {
            return self.build_v6(src, dst);
        }
        assert!(
            self.ip_options.len().is_multiple_of(4) && self.ip_options.len() <= 40,
            "IPv4 options must be a multiple of 4 bytes, at most 40: got {}",
            self.ip_options.len()
        );
        let ihl = IPV4_HLEN + self.ip_options.len();
        let l4 = self.l4_segment();
        let tot_len = (ihl + l4.len()) as u16;

        let mut ip = Vec::with_capacity(ihl);
        let version = self.version_override.unwrap_or(4);
        let ihl_words = self.ihl_override.unwrap_or((ihl / 4) as u8);
        ip.push(version << 4 | (ihl_words & 0x0f));
        ip.push(self.tos);
        ip.extend_from_slice(&self.tot_len_override.unwrap_or(tot_len).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frags.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.l4.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let check = checksum(&ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());

        self.framed(&[&ip, &l4])
    }

    /// The Ethernet header (and VLAN tag) followed by `parts`, padded and cut as asked.
    fn framed(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETH_HLEN + parts.iter().map(|p| p.len()).sum::<usize>());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            frame.extend_from_slice(&tci.to_be_bytes());
        }
        frame.extend_from_slice(&self.ethertype.to_be_bytes());
        for part in parts {
            frame.extend_from_slice(part);
        }
        if let Some(len) = self.pad_to
            && frame.len() < len
        {
            frame.resize(len, 0);
        }
        if let Some(len) = self.truncate_to {
            frame.truncate(len);
        }
        frame
    }

    /// [`build`](Frame::build) for an IPv6 frame.
    fn build_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let l4 = self.l4_segment();
        let mut ext = Vec::new();
        for (i, (kind, body)) in self.ext_headers.iter().enumerate() {
            let next = match self.ext_headers.get(i + 1) {
                Some((next, _)) => *next,
                None => self.l4.proto(),
            };
            let len = if *kind == IPV6_FRAGMENT {
                assert_eq!(body.len(), 6, "a fragment header's body is 6 bytes");
                0
            } else {
                assert!(
                    (body.len() + 2).is_multiple_of(8),
                    "an extension header is a multiple of 8 bytes long"
                );
                ((body.len() + 2) / 8 - 1) as u8
            };
            ext.push(next);
            ext.push(len);
            ext.extend_from_slice(body);
        }
        let first = self
            .ext_headers
            .first()
            .map_or(self.l4.proto(), |(kind, _)| *kind);
        let payload_len = (ext.len() + l4.len()) as u16;
        let version = self.version_override.unwrap_or(6);
        let mut header = Vec::with_capacity(IPV6_HLEN);
        header.extend_from_slice(&[version << 4 | self.tos >> 4, self.tos << 4, 0, 0]);
        header.extend_from_slice(&self.tot_len_override.unwrap_or(payload_len).to_be_bytes());
        header.push(first);
        header.push(self.ttl);
        header.extend_from_slice(&src.octets());
        header.extend_from_slice(&dst.octets());
        self.framed(&[&header, &ext, &l4])
    }

    /// The L4 header and payload, with the L4 checksum computed over the pseudo header.
    fn l4_segment(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        let check_off = match self.l4 {
            L4::Tcp { flags, seq, ack } => {
                seg.extend_from_slice(&self.sport.to_be_bytes());
                seg.extend_from_slice(&self.dport.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&ack.to_be_bytes());
                seg.push(((TCP_HLEN / 4) as u8) << 4);
                seg.push(flags);
                seg.extend_from_slice(&64240u16.to_be_bytes()); // window
                seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                Some(16)
            }
            L4::Udp { checksum } => {
                seg.extend_from_slice(&self.sport.to_be_bytes());
                seg.extend_from_slice(&self.dport.to_be_bytes());
                seg.extend_from_slice(&((UDP_HLEN + self.payload.len()) as u16).to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                checksum.then_some(6)
            }
            L4::Other { .. } => None,
        };
        seg.extend_from_slice(&self.payload);
        if let Some(off) = check_off {
            let check = match self.v6 {
                Some((src, dst)) => l4_checksum_v6(src, dst, self.l4.proto(), &seg),
                None => l4_checksum(self.src.octets(), self.dst.octets(), self.l4.proto(), &seg),
            };
            seg[off..off + 2].copy_from_slice(&check.to_be_bytes());
        }
        seg
    }
}

/// ICMP types.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;
/// Code of "fragmentation needed and DF set" (type 3).
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// An ICMP message with a valid checksum: type, code, the four bytes after the checksum,
/// then `data`. Put it in [`Frame::payload`] with `l4: L4::Other { proto: PROTO_ICMP }`.
pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(data);
    let check = checksum(&msg);
    msg[2..4].copy_from_slice(&check.to_be_bytes());
    msg
}

/// An ICMP echo request (type 8) with a valid checksum.
pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let [i0, i1] = id.to_be_bytes();
    let [s0, s1] = seq.to_be_bytes();
    icmp_message(ICMP_ECHO_REQUEST, 0, [i0, i1, s0, s1], data)
}

/// An ICMP error quoting `quoted` (an IPv4 datagram, header first, cut where the error's
/// sender cut it). For "fragmentation needed", `mtu` is the next hop's MTU; 0 otherwise.
pub fn icmp_error(kind: u8, code: u8, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let [m0, m1] = mtu.to_be_bytes();
    icmp_message(kind, code, [0, 0, m0, m1], quoted)
}

/// ICMPv6 types.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;

/// An ICMPv6 message from `src` to `dst` with a valid checksum (which covers the IPv6
/// pseudo-header): type, code, the four bytes after the checksum, then `data`. Put it in a
/// frame with [`Frame::icmp6`] between the same addresses.
pub fn icmp6_message(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    data: &[u8],
) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(data);
    let check = l4_checksum_v6(src, dst, PROTO_ICMPV6, &msg);
    msg[2..4].copy_from_slice(&check.to_be_bytes());
    msg
}

/// A broadcast ARP request "who has `target`? tell `sender`".
pub fn arp_request(src_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A frame with an 802.1Q tag, without it: (the untagged frame, the tag's TCI). `None` for a
/// frame without one (or too short to hold one).
pub fn untag(frame: &[u8]) -> Option<(Vec<u8>, u16)> {
    if frame.len() < ETH_HLEN + VLAN_HLEN || frame[12..14] != ETH_P_8021Q.to_be_bytes() {
        return None;
    }
    let mut plain = frame[..12].to_vec();
    plain.extend_from_slice(&frame[16..]);
    Some((plain, u16::from_be_bytes([frame[14], frame[15]])))
}

/// `frame` with an 802.1Q tag of TCI `tci` put in after its MACs.
pub fn tag(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    tagged.extend_from_slice(&tci.to_be_bytes());
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum::verify_checksums_v4;

    #[test]
    fn built_frames_have_valid_checksums_and_layout() {
        let syn = Frame::tcp(
            (Ipv4Addr::new(10, 10, 1, 2), 40000),
            (Ipv4Addr::new(10, 10, 0, 100), 80),
            TCP_SYN,
        )
        .build();
        assert_eq!(syn.len(), 14 + 20 + 20);
        assert_eq!(syn[14], 0x45);
        assert_eq!(u16::from_be_bytes([syn[16], syn[17]]), 40);
        assert_eq!(&syn[34..36], &40000u16.to_be_bytes());
        verify_checksums_v4(&syn).unwrap();

        let mut udp = Frame::udp(
            (Ipv4Addr::new(10, 10, 1, 2), 5000),
            (Ipv4Addr::new(10, 10, 0, 100), 53),
            b"odd-length payload",
        );
        verify_checksums_v4(&udp.build()).unwrap();
        udp.l4 = L4::Udp { checksum: false };
        let f = udp.build();
        assert_eq!(&f[40..42], &[0, 0]);
        verify_checksums_v4(&f).unwrap();

        let opts = Frame {
            ip_options: vec![1, 1, 1, 1, 0x94, 4, 0, 0], // NOPs, Router Alert
            payload: b"hello".to_vec(),
            pad_to: Some(100),
            ..Frame::default()
        }
        .build();
        assert_eq!(opts[14], 0x47);
        assert_eq!(opts.len(), 100);
        assert_eq!(u16::from_be_bytes([opts[16], opts[17]]), 28 + 20 + 5);
        verify_checksums_v4(&opts).unwrap();

        let icmp = Frame {
            l4: L4::Other { proto: PROTO_ICMP },
            payload: icmp_echo(7, 1, b"ping"),
            ..Frame::default()
        }
        .build();
        verify_checksums_v4(&icmp).unwrap();
    }

    #[test]
    fn built_ipv6_frames_have_valid_checksums_and_layout() {
        use crate::packet::{checksum::verify_checksums_v6, layout::parse_v6, layout_v6};
        use lb_common::reason::Reason;
        let (a, b): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        );
        let syn = Frame::tcp6((a, 40000), (b, 80), TCP_SYN).build();
        // RFC 8200: version 6, payload length 20, next header 6, hop limit 64.
        assert_eq!(syn.len(), 14 + 40 + 20);
        assert_eq!(&syn[12..14], &[0x86, 0xdd]);
        assert_eq!(syn[14] >> 4, 6);
        assert_eq!(&syn[18..22], &[0, 20, 6, 64]);
        assert_eq!(&syn[22..38], &a.octets());
        verify_checksums_v6(&syn).unwrap();
        let l = layout_v6(&syn).unwrap();
        assert_eq!((l.l4_off, l.check_off, l.tot_len), (54, 70, 60));

        // Hop-by-hop (8 bytes), a fragment header (first fragment), then UDP.
        let mut udp = Frame::udp6((a, 5000), (b, 53), b"odd");
        udp.ext_headers = vec![
            (IPV6_HOP_BY_HOP, vec![1, 4, 0, 0, 0, 0]),
            (IPV6_FRAGMENT, vec![0, 1, 0, 0, 0, 7]),
        ];
        let f = udp.build();
        assert_eq!(f[20], IPV6_HOP_BY_HOP);
        assert_eq!(&f[54..56], &[IPV6_FRAGMENT, 0]);
        assert_eq!(&f[62..64], &[17, 0]);
        verify_checksums_v6(&f).unwrap();
        let l = parse_v6(&f).unwrap();
        assert!(l.fragment && !l.later_fragment);
        assert_eq!(l.l4_off, 14 + 40 + 16);

        // Five extension headers are one more than the program walks.
        udp.ext_headers = vec![(IPV6_DEST_OPTIONS, vec![1, 4, 0, 0, 0, 0]); 5];
        assert_eq!(
            parse_v6(&udp.build()).err(),
            Some(Reason::PassIpv6Extensions)
        );
        // A zero UDP checksum is no checksum, which IPv6 does not allow.
        udp.ext_headers.clear();
        udp.l4 = L4::Udp { checksum: false };
        assert!(verify_checksums_v6(&udp.build()).is_err());

        let ping = Frame::icmp6(
            a,
            b,
            icmp6_message(a, b, ICMPV6_ECHO_REQUEST, 0, [0, 7, 0, 1], b"x"),
        )
        .build();
        verify_checksums_v6(&ping).unwrap();
    }
}
