//! Readable descriptions of frames for test failures: a one-line summary and a hex diff.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use lb_common::maps::{PROTO_TCP, PROTO_UDP};

use super::frame::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN};

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
    if frame[12..14] == ETH_P_IPV6.to_be_bytes() && frame.len() >= ETH_HLEN + IPV6_HLEN {
        let ip = &frame[ETH_HLEN..];
        let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
        let _ = write!(
            s,
            "; IPv{} payload {} next {} hops {}; {} > {}",
            ip[0] >> 4,
            u16::from_be_bytes([ip[4], ip[5]]),
            ip[6],
            ip[7],
            addr(8),
            addr(24)
        );
        if let Some(l) = super::layout::layout_v6(frame) {
            let p = &frame[l.l4_off..];
            let _ = write!(
                s,
                "; ports {} > {}",
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]])
            );
        }
        return s;
    }
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

    #[test]
    fn hex_diff_marks_differences() {
        assert_eq!(hex_diff(&[1, 2, 3], &[1, 2, 3]), "");
        let d = hex_diff(&[0; 20], &[0, 0, 0, 9]);
        assert!(d.contains("lengths differ"), "{d}");
        assert!(d.contains("^^"), "{d}");
        assert!(d.contains("09"), "{d}");
    }
}
