//! The NAT rewrites: addresses, ports, TTL, and the IPv4, L4 and ICMP checksums, updated
//! incrementally (RFC 1624) with lb-common's checksum math. One function per kind of packet:
//! a flow's TCP/UDP packet (or ICMP echo, whose identifier is its port), an ICMP error
//! about a flow, and the echo reply to a ping.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    csum::{replace, replace_udp, sum_words},
    maps::{Endpoint, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, Rewrite},
    reason::Reason,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    icmp::{ECHO_REPLY, ECHO_REPLY_V6, ECHO_REQUEST, ECHO_REQUEST_V6, Quote},
    parse::{ECHO_ID_OFF, Echo, Packet, ptr_at},
};

/// Rewrites the packet's source to `entry.src` and destination to `entry.dst`, and lowers
/// the TTL by `ttl_decrement`. Precondition: `pkt` came from `parse` on this same frame, and
/// `pkt.ttl > ttl_decrement`.
///
/// Inlined into `process`, its one caller: as a subprogram its call and return cost a
/// tracked packet 3-5 ns (2-3%). Its arithmetic stays in registers: `xlb`'s frame is 160
/// bytes either way, and the verifier checks 3,400 fewer instructions (see `process` in
/// main.rs for the 512-byte stack).
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: &Rewrite,
    ttl_decrement: u8,
) -> Result<(), Reason> {
    let (old_addrs, new_addrs) =
        rewrite_ip(ctx, pkt, &entry.src, &entry.dst, pkt.ttl - ttl_decrement)?;
    if pkt.key.proto == PROTO_ICMP {
        return rewrite_echo_id(ctx, pkt, entry, 0, 0);
    }
    if pkt.key.proto == PROTO_ICMPV6 {
        // ICMPv6's checksum covers a pseudo-header: the addresses' change too.
        return rewrite_echo_id(ctx, pkt, entry, old_addrs, new_addrs);
    }

    // The L4 checksum covers the pseudo-header addresses and the ports (not the TTL).
    let old_ports = [
        pkt.key.src.port[0],
        pkt.key.src.port[1],
        pkt.key.dst.port[0],
        pkt.key.dst.port[1],
    ];
    let new_ports = [
        entry.src.port[0],
        entry.src.port[1],
        entry.dst.port[0],
        entry.dst.port[1],
    ];
    let old_l4 = old_addrs + sum_words(&old_ports);
    let new_l4 = new_addrs + sum_words(&new_ports);

    let l4_check: *mut [u8; 2] = ptr_at(ctx, pkt.l4_check_off())?;
    // SAFETY: ptr_at checked the two checksum bytes are inside the frame.
    let l4_check = unsafe { &mut *l4_check };
    let old_check = u16::from_be_bytes(*l4_check);
    let new_check = if pkt.key.proto == PROTO_UDP {
        replace_udp(old_check, old_l4, new_l4)
    } else {
        replace(old_check, old_l4, new_l4)
    };
    *l4_check = new_check.to_be_bytes();

    let ports: *mut [u8; 4] = ptr_at(ctx, pkt.l4_off())?;
    // SAFETY: ptr_at checked the four port bytes are inside the frame.
    unsafe { *ports = new_ports };
    Ok(())
}

/// Sets an ICMP echo's identifier: a request's is the flow's source port, a reply's its
/// destination port (see `parse`). ICMP's checksum has no pseudo-header: only the
/// identifier changes it; ICMPv6's has, whose change the caller passes (`old_pseudo` →
/// `new_pseudo`; 0 and 0 for ICMP).
#[inline(always)]
fn rewrite_echo_id(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: &Rewrite,
    old_pseudo: u32,
    new_pseudo: u32,
) -> Result<(), Reason> {
    let (old, new) = if pkt.echo == Echo::Request {
        (pkt.key.src.port, entry.src.port)
    } else {
        (pkt.key.dst.port, entry.dst.port)
    };
    let check: *mut [u8; 2] = ptr_at(ctx, pkt.l4_check_off())?;
    // SAFETY: ptr_at checked the two checksum bytes are inside the frame.
    let check = unsafe { &mut *check };
    *check = replace(
        u16::from_be_bytes(*check),
        old_pseudo + sum_words(&old),
        new_pseudo + sum_words(&new),
    )
    .to_be_bytes();
    let id: *mut [u8; 2] = ptr_at(ctx, pkt.l4_off() + ECHO_ID_OFF)?;
    // SAFETY: ptr_at checked the identifier's two bytes are inside the frame.
    unsafe { *id = new };
    Ok(())
}

/// Sets the IP header's addresses and TTL (hop limit), of the packet's family. Returns the
/// unfolded sums of the old and of the new addresses: the pseudo-header's share of an L4
/// checksum.
#[inline(always)]
fn rewrite_ip(
    ctx: &XdpContext,
    pkt: &Packet,
    new_src: &Endpoint,
    new_dst: &Endpoint,
    new_ttl: u8,
) -> Result<(u32, u32), Reason> {
    if pkt.v6 {
        rewrite_ipv6(ctx, pkt, &new_src.addr, &new_dst.addr, new_ttl)
    } else {
        rewrite_ipv4(ctx, pkt, new_src.v4_octets(), new_dst.v4_octets(), new_ttl)
    }
}

/// Sets the IPv6 header's addresses and hop limit (it has no checksum of its own).
#[inline(always)]
fn rewrite_ipv6(
    ctx: &XdpContext,
    pkt: &Packet,
    new_src: &[u8; 16],
    new_dst: &[u8; 16],
    new_ttl: u8,
) -> Result<(u32, u32), Reason> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3_off())?;
    // SAFETY: ptr_at checked that the 40-byte IPv6 header is inside the frame.
    let ip = unsafe { &mut *ip };
    let (mut old_addrs, mut new_addrs) = (0, 0);
    replace_address(&mut ip.src_addr, new_src, &mut old_addrs, &mut new_addrs);
    replace_address(&mut ip.dst_addr, new_dst, &mut old_addrs, &mut new_addrs);
    ip.hop_limit = new_ttl;
    Ok((old_addrs, new_addrs))
}

/// Overwrites an IPv6 address in the packet with `new`, and adds the old and the new
/// address's words to the checksum sums.
#[inline(always)]
fn replace_address(field: &mut [u8; 16], new: &[u8; 16], old_sum: &mut u32, new_sum: &mut u32) {
    let sums = swap_address(field, new);
    *old_sum += (sums >> 32) as u32;
    *new_sum += sums as u32;
}

/// Writes `new` over `field`, a byte pair at a time; returns the sum of the old words (high
/// half) and of the new (low half). Not inlined, and volatile: left to itself LLVM loads
/// all 32 bytes first, in whatever frame it is inlined into, and they spill onto the
/// 512-byte stack.
#[inline(never)]
fn swap_address(field: &mut [u8; 16], new: &[u8; 16]) -> u64 {
    let (mut old_sum, mut new_sum) = (0u64, 0u64);
    let mut i = 0;
    while i < 16 {
        // SAFETY: in-bounds indexes of two arrays the references keep valid.
        unsafe {
            let (o0, o1) = (
                core::ptr::read_volatile(&field[i]),
                core::ptr::read_volatile(&field[i + 1]),
            );
            let (n0, n1) = (
                core::ptr::read_volatile(&new[i]),
                core::ptr::read_volatile(&new[i + 1]),
            );
            old_sum += u16::from_be_bytes([o0, o1]) as u64;
            new_sum += u16::from_be_bytes([n0, n1]) as u64;
            core::ptr::write_volatile(&mut field[i], n0);
            core::ptr::write_volatile(&mut field[i + 1], n1);
        }
        i += 2;
    }
    old_sum << 32 | new_sum
}

/// Sets the IPv4 header's addresses and TTL, updating its checksum. Returns the unfolded sums
/// of the old and of the new addresses: the pseudo-header's share of an L4 checksum.
#[inline(always)]
fn rewrite_ipv4(
    ctx: &XdpContext,
    pkt: &Packet,
    new_src: [u8; 4],
    new_dst: [u8; 4],
    new_ttl: u8,
) -> Result<(u32, u32), Reason> {
    let old_addrs = sum_words(&pkt.key.src.v4_octets()) + sum_words(&pkt.key.dst.v4_octets());
    let new_addrs = sum_words(&new_src) + sum_words(&new_dst);
    let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3_off())?;
    // SAFETY: ptr_at checked that the 20-byte IPv4 header is inside the frame.
    let ip = unsafe { &mut *ip };
    // TTL shares a checksum word with the protocol byte.
    let old_ttl = [pkt.ttl, ip.proto];
    let new_ttl = [new_ttl, ip.proto];
    let check = replace(
        u16::from_be_bytes(ip.check),
        old_addrs + sum_words(&old_ttl),
        new_addrs + sum_words(&new_ttl),
    );
    ip.check = check.to_be_bytes();
    ip.src_addr = new_src;
    ip.dst_addr = new_dst;
    ip.ttl = new_ttl[0];
    Ok((old_addrs, new_addrs))
}

/// TTL of the echo replies xlb sends (Linux's default).
const REPLY_TTL: u8 = 64;

/// Turns an echo request (type 8, code 0; ICMPv6 type 128) into its reply: the addresses
/// swapped, a fresh TTL, type 0 (129); identifier, sequence and data as they were. Swapped
/// addresses leave ICMPv6's pseudo-header sum as it was: only the type changes the checksum.
#[inline(never)]
pub fn echo_reply(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    rewrite_ip(ctx, pkt, &pkt.key.dst, &pkt.key.src, REPLY_TTL)?;
    let (request, reply) = if pkt.v6 {
        (ECHO_REQUEST_V6, ECHO_REPLY_V6)
    } else {
        (ECHO_REQUEST, ECHO_REPLY)
    };
    let icmp: *mut [u8; 4] = ptr_at(ctx, pkt.l4_off())?;
    // SAFETY: ptr_at checked type, code and checksum are inside the frame.
    let icmp = unsafe { &mut *icmp };
    let check = replace(
        u16::from_be_bytes([icmp[2], icmp[3]]),
        sum_words(&[request, 0]),
        sum_words(&[reply, 0]),
    );
    *icmp = [reply, 0, (check >> 8) as u8, check as u8];
    Ok(())
}

/// Translates an ICMP error about a tracked flow's packet: the outer header goes `src` (the
/// error's own source, or `entry.src`) → `entry.dst` with the TTL lowered by
/// `ttl_decrement`, as the flow's next packet in `entry`'s direction would, and the quoted
/// packet, which went the other way, becomes what
/// it was before xlb rewrote it: `entry.dst` → `entry.src`, addresses and ports. The outer
/// IPv4, quoted IPv4, quoted L4 (when quoted) and ICMP checksums follow. Precondition:
/// `quote` was read by `icmp::read_quote` from this frame, and `pkt.ttl > ttl_decrement`.
///
/// Inlined into `icmp::error`, whose frame then holds both: less than the two frames on top
/// of each other.
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &XdpContext,
    pkt: &Packet,
    quote: &Quote,
    entry: &Rewrite,
    src: &Endpoint,
    ttl_decrement: u8,
) -> Result<(), Reason> {
    if pkt.v6 {
        return rewrite_icmp6_error(ctx, pkt, quote, entry, src, ttl_decrement);
    }
    rewrite_ipv4(
        ctx,
        pkt,
        src.v4_octets(),
        entry.dst.v4_octets(),
        pkt.ttl - ttl_decrement,
    )?;

    // The ICMP checksum covers the whole quote: `old` and `new` add up every word changed
    // in it, as it is changed.
    // The quoted IPv4 header: addresses, then its checksum (its TTL stays).
    let inner: *mut Ipv4Hdr = ptr_at(ctx, quote.ip_off())?;
    // SAFETY: ptr_at checked that the quoted 20-byte IPv4 header is inside the frame.
    let inner = unsafe { &mut *inner };
    let old_addrs = sum_words(&inner.src_addr) + sum_words(&inner.dst_addr);
    inner.src_addr = entry.dst.v4_octets();
    inner.dst_addr = entry.src.v4_octets();
    let new_addrs = sum_words(&inner.src_addr) + sum_words(&inner.dst_addr);
    let mut old = old_addrs + sum_words(&inner.check);
    inner.check = replace(u16::from_be_bytes(inner.check), old_addrs, new_addrs).to_be_bytes();
    let mut new = new_addrs + sum_words(&inner.check);

    // The quoted ports (a quoted echo's: its identifier), and the quoted L4 checksum when
    // the quote reaches it.
    let (old_ports, new_ports) = restore_quoted_ports(ctx, quote, entry)?;
    old += old_ports;
    new += new_ports;
    // An ICMP checksum has no pseudo-header.
    let quoted_l4 = if quote.proto == PROTO_ICMP {
        (old_ports, new_ports)
    } else {
        (old_addrs + old_ports, new_addrs + new_ports)
    };
    finish_error_checksums(ctx, pkt, quote, quoted_l4, old, new)
}

/// Puts a quoted packet's ports back as they were before xlb rewrote it (the rewrite's
/// destination → source, either family), or a quoted echo's identifier (the request's
/// source port, the reply's destination port); returns the unfolded sums of the old and the
/// new ports.
#[inline(always)]
fn restore_quoted_ports(
    ctx: &XdpContext,
    quote: &Quote,
    entry: &Rewrite,
) -> Result<(u32, u32), Reason> {
    if quote.proto == PROTO_ICMP || quote.proto == PROTO_ICMPV6 {
        let id: *mut [u8; 2] = ptr_at(ctx, quote.l4_off() + ECHO_ID_OFF)?;
        // SAFETY: ptr_at checked the identifier's two bytes are inside the frame.
        let id = unsafe { &mut *id };
        let old_id = sum_words(id);
        *id = if quote.echo_request {
            entry.dst.port
        } else {
            entry.src.port
        };
        return Ok((old_id, sum_words(id)));
    }
    let ports: *mut [u8; 4] = ptr_at(ctx, quote.l4_off())?;
    // SAFETY: ptr_at checked the four port bytes are inside the frame.
    let ports = unsafe { &mut *ports };
    let old_ports = sum_words(ports);
    *ports = [
        entry.dst.port[0],
        entry.dst.port[1],
        entry.src.port[0],
        entry.src.port[1],
    ];
    Ok((old_ports, sum_words(ports)))
}

/// The end of an error's translation, either family: the quoted L4 checksum, when the quote
/// reaches it, follows `quoted_l4` (the unfolded sums of the words of its segment and
/// pseudo-header that changed, old and new); then the error's own checksum follows
/// everything that changed in what it covers: `old` and `new`, and that checksum.
#[inline(always)]
fn finish_error_checksums(
    ctx: &XdpContext,
    pkt: &Packet,
    quote: &Quote,
    (l4_old, l4_new): (u32, u32),
    mut old: u32,
    mut new: u32,
) -> Result<(), Reason> {
    if quote.has_l4_check() {
        let check: *mut [u8; 2] = ptr_at(ctx, quote.l4_check_off())?;
        // SAFETY: ptr_at checked the two checksum bytes are inside the frame.
        let check = unsafe { &mut *check };
        let value = u16::from_be_bytes(*check);
        let updated = if quote.proto == PROTO_UDP {
            replace_udp(value, l4_old, l4_new)
        } else {
            replace(value, l4_old, l4_new)
        };
        old += value as u32;
        new += updated as u32;
        *check = updated.to_be_bytes();
    }
    let icmp_check: *mut [u8; 2] = ptr_at(ctx, pkt.l4_check_off())?;
    // SAFETY: ptr_at checked the two checksum bytes are inside the frame.
    let icmp_check = unsafe { &mut *icmp_check };
    *icmp_check = replace(u16::from_be_bytes(*icmp_check), old, new).to_be_bytes();
    Ok(())
}

/// [`rewrite_icmp_error`] for ICMPv6: the same rewrites, with no IPv4 header checksums; the
/// ICMPv6 checksum covers the outer addresses too (its pseudo-header), so it follows them
/// as well as every word changed in the quote.
#[inline(always)]
fn rewrite_icmp6_error(
    ctx: &XdpContext,
    pkt: &Packet,
    quote: &Quote,
    entry: &Rewrite,
    src: &Endpoint,
    ttl_decrement: u8,
) -> Result<(), Reason> {
    let (old, new) = rewrite_ipv6(
        ctx,
        pkt,
        &src.addr,
        &entry.dst.addr,
        pkt.ttl - ttl_decrement,
    )?;
    let inner: *mut Ipv6Hdr = ptr_at(ctx, quote.ip_off())?;
    // SAFETY: ptr_at checked that the quoted 40-byte IPv6 header is inside the frame.
    let inner = unsafe { &mut *inner };
    let (mut old_addrs, mut new_addrs) = (0, 0);
    replace_address(
        &mut inner.src_addr,
        &entry.dst.addr,
        &mut old_addrs,
        &mut new_addrs,
    );
    replace_address(
        &mut inner.dst_addr,
        &entry.src.addr,
        &mut old_addrs,
        &mut new_addrs,
    );
    let (old_ports, new_ports) = restore_quoted_ports(ctx, quote, entry)?;
    let quoted_l4 = (old_addrs + old_ports, new_addrs + new_ports);
    finish_error_checksums(
        ctx,
        pkt,
        quote,
        quoted_l4,
        old + quoted_l4.0,
        new + quoted_l4.1,
    )
}
