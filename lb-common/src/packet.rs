//! Test-side packet tools (std only): a frame builder that computes every checksum from
//! scratch, a reference model of the XDP program's IPv4 NAT rewrite, a checksum verifier,
//! and a readable hex diff for test failures.
//!
//! The XDP program updates checksums incrementally (RFC 1624, [`crate::csum::replace`]);
//! everything here recomputes them over the whole header or segment instead, so a test that
//! compares the two compares two independent computations.

use std::{fmt::Write as _, net::Ipv4Addr, string::String, vec::Vec};

use crate::{
    csum::{checksum, fold, sum_slice},
    maps::{Endpoint, FlowKey, NatEntry, PROTO_TCP, PROTO_UDP},
};

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
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

const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

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
    /// Written into the version nibble instead of 4.
    pub version_override: Option<u8>,
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

        let mut frame = Vec::with_capacity(ETH_HLEN + tot_len as usize);
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&self.ethertype.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
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
            let check = l4_checksum(self.src.octets(), self.dst.octets(), self.l4.proto(), &seg);
            seg[off..off + 2].copy_from_slice(&check.to_be_bytes());
        }
        seg
    }
}

/// The unfolded sum of the IPv4 pseudo header of a TCP/UDP segment of `len` bytes.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let len = len.to_be_bytes();
    sum_slice(&[
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, len[0], len[1],
    ])
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

/// An ICMP echo request (type 8) with a valid checksum: put it in [`Frame::payload`] with
/// `l4: L4::Other { proto: PROTO_ICMP }`.
pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut msg = vec![8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(data);
    let check = checksum(&msg);
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

fn is_fragment(frame: &[u8]) -> bool {
    let frags = u16::from_be_bytes([frame[ETH_HLEN + 6], frame[ETH_HLEN + 7]]);
    frags & (IP_MF | IP_OFFSET_MASK) != 0
}

/// The reference NAT rewrite: `frame` with its source set to `entry.src`, its destination
/// to `entry.dst` (addresses and ports), the TTL lowered by `ttl_decrement` (1 when xlb
/// forwards the frame itself, 0 when it hands it to the kernel), and the IPv4 and L4 checksums
/// recomputed from scratch (a UDP checksum of 0 stays 0). MACs, IPv4 options, payload and
/// Ethernet padding are left as they are.
///
/// `None` when the XDP program would not rewrite the frame at all: not a complete
/// TCP/UDP-over-IPv4 frame (IHL-aware), a fragment, or a TTL of 0 or 1.
pub fn nat_rewrite_v4(frame: &[u8], entry: &NatEntry, ttl_decrement: u8) -> Option<Vec<u8>> {
    let l = layout_v4(frame)?;
    if is_fragment(frame) || frame[ETH_HLEN + 8] <= 1 {
        return None;
    }
    let mut out = frame.to_vec();
    let (src, dst) = (entry.src.v4_octets(), entry.dst.v4_octets());

    let ip = ETH_HLEN;
    out[ip + 8] -= ttl_decrement;
    out[ip + 12..ip + 16].copy_from_slice(&src);
    out[ip + 16..ip + 20].copy_from_slice(&dst);
    out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let check = checksum(&out[ip..ip + l.ihl]);
    out[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());

    out[l.l4_off..l.l4_off + 2].copy_from_slice(&entry.src.port);
    out[l.l4_off + 2..l.l4_off + 4].copy_from_slice(&entry.dst.port);
    let udp_without_checksum = l.proto == PROTO_UDP && out[l.check_off..l.check_off + 2] == [0, 0];
    if !udp_without_checksum {
        out[l.check_off..l.check_off + 2].copy_from_slice(&[0, 0]);
        let seg = &out[l.l4_off..ETH_HLEN + l.tot_len];
        let check = l4_checksum(src, dst, l.proto, seg);
        out[l.check_off..l.check_off + 2].copy_from_slice(&check.to_be_bytes());
    }
    Some(out)
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

/// One line about a frame, for messages: `IPv4 10.0.0.1:40000 > 10.0.0.2:80 TCP ttl 64`.
pub fn summary(frame: &[u8]) -> String {
    if frame.len() < ETH_HLEN {
        return format!("{} bytes (shorter than Ethernet)", frame.len());
    }
    let mac = |m: &[u8]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut s = format!(
        "{} bytes, {} > {}, type {:#06x}",
        frame.len(),
        mac(&frame[6..12]),
        mac(&frame[0..6]),
        u16::from_be_bytes([frame[12], frame[13]])
    );
    if frame[12..14] != ETH_P_IP.to_be_bytes() || frame.len() < ETH_HLEN + IPV4_HLEN {
        return s;
    }
    let ip = &frame[ETH_HLEN..];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let _ = write!(
        s,
        "; IPv{} IHL {} len {} ttl {} frags {:#06x} proto {}",
        ip[0] >> 4,
        ip[0] & 0x0f,
        u16::from_be_bytes([ip[2], ip[3]]),
        ip[8],
        u16::from_be_bytes([ip[6], ip[7]]),
        ip[9]
    );
    if matches!(ip[9], PROTO_TCP | PROTO_UDP) && ihl >= IPV4_HLEN && ip.len() >= ihl + 4 {
        let p = &ip[ihl..];
        let _ = write!(
            s,
            "; {src}:{} > {dst}:{}",
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]])
        );
    } else {
        let _ = write!(s, "; {src} > {dst}");
    }
    s
}

/// A side-by-side hex dump of two frames, 16 bytes a line, with differing bytes marked;
/// empty when they are equal. For assertion messages.
pub fn hex_diff(expected: &[u8], actual: &[u8]) -> String {
    if expected == actual {
        return String::new();
    }
    let mut s = format!(
        "expected: {}\nactual:   {}\n",
        summary(expected),
        summary(actual)
    );
    let head = format!(
        "offset  expected{}",
        if expected.len() != actual.len() {
            " (lengths differ)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "{head:57}| actual");
    let cell = |b: Option<&u8>| b.map_or_else(|| "  ".to_string(), |b| format!("{b:02x}"));
    for line in (0..expected.len().max(actual.len())).step_by(16) {
        let mut left = String::new();
        let mut right = String::new();
        let mut marks = String::new();
        for i in line..line + 16 {
            let (e, a) = (expected.get(i), actual.get(i));
            let sep = if i % 16 == 8 { "  " } else { " " };
            let _ = write!(left, "{sep}{}", cell(e));
            let _ = write!(right, "{sep}{}", cell(a));
            marks.push_str(sep);
            marks.push_str(if e != a && (e.is_some() || a.is_some()) {
                "^^"
            } else {
                "  "
            });
        }
        let differs = marks.contains('^');
        let _ = writeln!(
            s,
            "{line:04x}  {left}  |{right}{}",
            if differs { "   <" } else { "" }
        );
        if differs {
            let _ = writeln!(s, "{:57}|{}", "", marks.trim_end());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        csum::{replace, replace_udp, sum_words},
        maps::Endpoint,
    };

    fn entry(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> NatEntry {
        NatEntry {
            src: Endpoint::v4(src.0, src.1.to_be_bytes()),
            dst: Endpoint::v4(dst.0, dst.1.to_be_bytes()),
            ..NatEntry::default()
        }
    }

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
        let out = nat_rewrite_v4(&f.build(), &e, 1).unwrap();
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
        let out = nat_rewrite_v4(&u.build(), &e, 1).unwrap();
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
                &e,
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
                &e,
                1
            )
            .is_none()
        );
        let short = Frame {
            truncate_to: Some(40),
            ..f.clone()
        };
        assert!(nat_rewrite_v4(&short.build(), &e, 1).is_none());
        let icmp = Frame {
            l4: L4::Other { proto: PROTO_ICMP },
            ..f.clone()
        };
        assert!(nat_rewrite_v4(&icmp.build(), &e, 1).is_none());
    }

    /// The XDP program's rewrite (lb-ebpf/src/nat.rs), restated on a byte slice with the
    /// same incremental math.
    fn incremental_rewrite(frame: &[u8], entry: &NatEntry) -> Vec<u8> {
        let l = layout_v4(frame).unwrap();
        let mut out = frame.to_vec();
        let ip = ETH_HLEN;
        let old_src: [u8; 4] = frame[ip + 12..ip + 16].try_into().unwrap();
        let old_dst: [u8; 4] = frame[ip + 16..ip + 20].try_into().unwrap();
        let (new_src, new_dst) = (entry.src.v4_octets(), entry.dst.v4_octets());
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
        let new_ports = [
            entry.src.port[0],
            entry.src.port[1],
            entry.dst.port[0],
            entry.dst.port[1],
        ];
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
            let reference = nat_rewrite_v4(&frame, &e, 1).unwrap();
            let incremental = incremental_rewrite(&frame, &e);
            assert!(
                reference == incremental,
                "case {i}: {f:?}\n{}",
                hex_diff(&reference, &incremental)
            );
            verify_checksums_v4(&reference).unwrap();
        }
    }

    #[test]
    fn hex_diff_marks_differences() {
        assert_eq!(hex_diff(&[1, 2, 3], &[1, 2, 3]), "");
        let d = hex_diff(&[0; 20], &[0, 0, 0, 9]);
        assert!(d.contains("lengths differ"), "{d}");
        assert!(d.contains("^^"), "{d}");
        assert!(d.contains("09"), "{d}");
    }
}
