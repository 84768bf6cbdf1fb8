//! ICMP through xlb, in every mode:
//! * an echo request to a VIP is answered here;
//! * an error — destination unreachable (fragmentation needed among them), time exceeded,
//!   parameter problem — that quotes a packet of a tracked flow is translated through the
//!   flow's NAT and sent on to whoever sent that packet, before xlb rewrote it. So path MTU
//!   discovery works through xlb: a router's "fragmentation needed" about a reply it could
//!   not forward toward a client is addressed to the VIP, and reaches the backend.
//!
//! The quoted packet went one way through xlb; a reply to it would come the other way, and
//! its conntrack entry (keyed by the quoted packet's addresses and ports, swapped) says how
//! that direction is rewritten. The error is rewritten by that entry, like a packet of that
//! direction: outer addresses by the entry's rewrite (the source only if that direction's
//! sources are translated), the quote back to what it was.
//!
//! The rest — replies, other types, fragments, errors about no tracked flow — goes to the
//! kernel, counted (`pass/icmp`, `pass/icmp_untracked`).
//!
//! ICMPv6 takes the same paths (echo request 128; errors 1 to 4, "packet too big" among
//! them).
//!
//! And xlb sends one error of its own: "fragmentation needed" (ICMPv6 "packet too big") to
//! the sender of a packet too big for the way out of xlb ([`too_big`]), as a router on the
//! path would, so path MTU discovery also works when xlb's own link is the narrowest.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by-value keys would be copied onto the 512-byte BPF stack"
)]

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    csum::{fold, sum_words},
    maps::{Endpoint, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
    reason::Reason,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    CONNTRACK, DEVMAP, ICMP_SCRATCH, VIPS,
    forward::{self, Hop},
    nat,
    parse::{
        ETH_LEN, Echo, ICMP_CHECK_OFF, ICMP_LEN, IP_OFFSET_MASK, Packet, TCP_CHECK_OFF,
        UDP_CHECK_OFF, frame_bounds, ptr_at,
    },
    stats,
};

/// ICMP types.
pub const ECHO_REPLY: u8 = 0;
const DEST_UNREACH: u8 = 3;
pub const ECHO_REQUEST: u8 = 8;
/// ICMPv6 types.
pub const ECHO_REQUEST_V6: u8 = 128;
const DEST_UNREACH_V6: u8 = 1;
const PACKET_TOO_BIG_V6: u8 = 2;
const TIME_EXCEEDED_V6: u8 = 3;
const PARAM_PROBLEM_V6: u8 = 4;
pub const ECHO_REPLY_V6: u8 = 129;
const TIME_EXCEEDED: u8 = 11;
const PARAM_PROBLEM: u8 = 12;

/// RFC 792: an error quotes the IP header and at least the first 8 bytes after it; for TCP
/// and UDP those hold the ports.
const QUOTED_L4_MIN: usize = 8;

/// Upper bound of any offset into a quoted packet: Ethernet (14) + IPv4 with options (60) +
/// ICMP (8) + the quoted IPv4 header with options (60) + the TCP checksum (16 + 2) = 160,
/// and 4 more behind a VLAN tag: 164. (IPv6, whose error and quote carry no extension
/// headers here: 18 + 40 + 8 + 40 + 18 = 124.)
const QUOTE_OFF_MASK: usize = 0xff;

/// `error`'s working space, one per CPU (`ICMP_SCRATCH` in main.rs): its frame cannot
/// spare the room, on top of the hot path's.
#[repr(C)]
pub struct Scratch {
    /// The conntrack key of a reply to the quoted packet.
    key: FlowKey,
    quote: Quote,
}

/// Where an ICMP error's quoted packet lies in the frame.
#[repr(C)]
pub struct Quote {
    ip_off: usize,
    l4_off: usize,
    /// 0 when the quote ends before the L4 checksum (a TCP quote of 8 bytes, say).
    l4_check_off: usize,
    /// The quoted packet's protocol: TCP, UDP, or ICMP or ICMPv6 (an echo).
    pub proto: u8,
    /// A quoted echo is a request (its identifier is its source port), not a reply.
    pub echo_request: bool,
}

impl Quote {
    /// Records where a quote read by `read_quote` lies: its L4 checksum `check_off` into
    /// the L4 header, or none if the error's datagram (ending at `end`) cuts it off.
    #[inline(always)]
    fn set(
        &mut self,
        ip_off: usize,
        l4_off: usize,
        check_off: usize,
        end: usize,
        proto: u8,
        echo_request: bool,
    ) {
        self.ip_off = ip_off;
        self.l4_off = l4_off;
        self.l4_check_off = if l4_off + check_off + 2 <= end {
            l4_off + check_off
        } else {
            0
        };
        self.proto = proto;
        self.echo_request = echo_request;
    }

    // Re-bounded at every use, as `Packet`'s offsets are (see `parse::Packet`).
    #[inline(always)]
    pub fn ip_off(&self) -> usize {
        self.ip_off & QUOTE_OFF_MASK
    }

    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.l4_off & QUOTE_OFF_MASK
    }

    #[inline(always)]
    pub fn has_l4_check(&self) -> bool {
        self.l4_check_off != 0
    }

    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_check_off & QUOTE_OFF_MASK
    }
}

/// Whether [`handle`] takes the packet: ICMP or ICMPv6 but for an echo (request or reply) not
/// addressed to a VIP, which goes the way of a TCP or UDP packet, as a flow's. A NAT gateway
/// tracks and rewrites those by their identifier (a first fragment of one is dropped, as a
/// TCP or UDP one is); what no flow or gateway takes goes to the kernel (`pass/icmp`), as
/// `handle` would leave it.
///
/// Not inlined: the verifier then learns nothing about the packet's protocol in the caller,
/// so the flow path it checks once for TCP and UDP does for pings too, instead of once
/// more for a state where the protocol is known to be ICMP.
#[inline(never)]
pub fn takes(pkt: &Packet) -> bool {
    if !pkt.is_icmp() {
        return false;
    }
    match pkt.echo {
        Echo::No => true,
        Echo::Reply => false,
        // SAFETY: a presence check; the value is not read.
        Echo::Request => unsafe { VIPS.get(&pkt.key.dst.addr) }.is_some(),
    }
}

/// Decides an ICMP packet's fate (`parse` read its header's place).
///
/// Not inlined, and neither are its two paths: each has a frame of its own, off the TCP/UDP
/// path's (see `process` in main.rs).
#[inline(never)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> Result<Reason, Reason> {
    if pkt.fragmented {
        return Err(Reason::PassIcmp);
    }
    let header: *const [u8; 2] = ptr_at(ctx, pkt.l4_off())?;
    // SAFETY: ptr_at checked that type and code are inside the frame.
    let [kind, code] = unsafe { *header };
    if pkt.v6 {
        return match kind {
            ECHO_REQUEST_V6 if code == 0 => echo(ctx, pkt),
            DEST_UNREACH_V6 | PACKET_TOO_BIG_V6 | TIME_EXCEEDED_V6 | PARAM_PROBLEM_V6 => {
                error(ctx, pkt)
            }
            _ => Err(Reason::PassIcmp),
        };
    }
    match kind {
        ECHO_REQUEST if code == 0 => echo(ctx, pkt),
        DEST_UNREACH | TIME_EXCEEDED | PARAM_PROBLEM => error(ctx, pkt),
        _ => Err(Reason::PassIcmp),
    }
}

/// Answers a ping to a VIP, from the VIP.
#[inline(never)]
fn echo(ctx: &XdpContext, pkt: &Packet) -> Result<Reason, Reason> {
    // A request with IP options (a source route, a route record) or IPv6 extension headers
    // would need them answered as RFC 1122 says: the kernel's job.
    let ip_len = if pkt.v6 { Ipv6Hdr::LEN } else { Ipv4Hdr::LEN };
    if pkt.l4_off() != pkt.l3_off() + ip_len {
        return Err(Reason::PassIcmp);
    }
    // SAFETY: a presence check; the value is not read.
    if unsafe { VIPS.get(&pkt.key.dst.addr) }.is_none() {
        return Err(Reason::PassIcmp);
    }
    let mut hop = Hop::NONE;
    forward::route(ctx, pkt, &pkt.key.dst, &pkt.key.src, &mut hop)?;
    if matches!(hop, Hop::Kernel { .. } | Hop::TooBig { .. }) {
        // The FIB will not say how to reach the asker: the kernel answers, if it can.
        return Err(Reason::PassIcmp);
    }
    forward::prepare(ctx, &hop)?;
    nat::echo_reply(ctx, pkt)?;
    forward::untag_for(ctx, pkt, &hop)?;
    forward::send(ctx, hop)
}

/// Translates an error about a tracked flow's packet and sends it on.
///
/// Not inlined: a frame of its own. The quote and the key live in `ICMP_SCRATCH`.
#[inline(never)]
fn error(ctx: &XdpContext, pkt: &Packet) -> Result<Reason, Reason> {
    let scratch = ICMP_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's slot of a one-entry per-CPU array. An XDP program runs to
    // completion on its CPU (softirq), so no other run touches the slot meanwhile.
    let Scratch { key, quote } = unsafe { &mut *scratch };
    if !read_quote(ctx, pkt, quote, key) {
        return Err(Reason::PassIcmpUntracked);
    }
    // SAFETY: a map value, valid for the program run (a removed entry's memory is freed only
    // after an RCU grace period); its rewrite never changes.
    let Some(entry) = (unsafe { CONNTRACK.get(&*key) }) else {
        return Err(Reason::PassIcmpUntracked);
    };
    let rewrite = &entry.rewrite;
    // A genuine error is addressed to the quoted packet's source.
    if pkt.key.dst.addr != key.dst.addr {
        return Err(Reason::PassIcmpUntracked);
    }
    // And it comes from the path the quoted packet took: in on the interface the flow's
    // packets from that side arrive on (the entry's). Who sent it (a router) says nothing,
    // so unlike a flow's own packets there is no reverse-path fallback: a host on the other
    // side cannot shrink a flow's path MTU or reset it, whatever address it uses.
    // (0: the flow's way out toward that side was not one of xlb's interfaces, so where its
    // packets arrive is not known until one does: see `conntrack::lookup`.)
    if !forward::arrives_here(ctx, entry.ifindex) {
        return Err(Reason::DropWrongInterface);
    }
    if pkt.ttl <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    // The error's source is translated as that direction's packets' source is: to the VIP
    // or SNAT address where they get one; where they keep theirs (a dnat flow's client, a
    // NAT gateway's destination), the router that sent it keeps its own, so a traceroute
    // shows each hop.
    let src = if rewrite.src.addr == key.src.addr {
        // A link-local address must not leave its link (RFC 4291 2.5.6): such a router's
        // error stays the kernel's.
        if pkt.v6 && pkt.key.src.addr[0] == 0xfe && pkt.key.src.addr[1] & 0xc0 == 0x80 {
            return Err(Reason::PassIcmpUntracked);
        }
        &pkt.key.src
    } else {
        &rewrite.src
    };
    let mut hop = Hop::NONE;
    forward::route(ctx, pkt, src, &rewrite.dst, &mut hop)?;
    forward::prepare(ctx, &hop)?;
    nat::rewrite_icmp_error(ctx, pkt, quote, rewrite, src, hop.ttl_decrement())?;
    forward::untag_for(ctx, pkt, &hop)?;
    let sent = forward::send(ctx, hop)?;
    stats::count_flow_packet(rewrite, pkt.frame_len);
    Ok(sent)
}

/// Turns a packet too big for its way out (DF set, IPv6, or a source the kernel would not
/// take; `mtu` is that way's) into ICMP
/// "fragmentation needed" (ICMPv6 "packet too big") to its sender, from the address it sent
/// to (the VIP, or the SNAT address for a backend's reply), quoting its IP header (options
/// or extension headers included) and the 8 bytes after it as it sent them (before any
/// rewrite: the packet has none yet), and sends that back, untagged, by devmap redirect, or
/// by a handoff when the way back has no resolved neighbour or is not one of xlb's
/// interfaces (a VLAN device, which tags it). The sender lowers its path MTU and sends
/// again, smaller.
///
/// Errors: `DropTooBig` when the frame cannot be reshaped or there is no way back;
/// `DropRedirectFailed`.
///
/// Not inlined: its frame is not on the stack with the other paths'.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<Reason, Reason> {
    let tot_len = if pkt.v6 {
        too_big_v6(ctx, pkt, mtu)
    } else {
        too_big_v4(ctx, pkt, mtu)
    }
    .map_err(|_| Reason::DropTooBig)?;
    // Back the way the packet came, sent like any frame xlb sends itself.
    let mut back = Packet::default();
    back.key.src = pkt.key.dst;
    back.key.dst = pkt.key.src;
    back.key.proto = if pkt.v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    back.v6 = pkt.v6;
    back.tot_len = tot_len;
    let mut hop = Hop::NONE;
    forward::route(ctx, &back, &back.key.src, &back.key.dst, &mut hop)
        .map_err(|_| Reason::DropTooBig)?;
    match hop {
        Hop::Direct {
            ifindex,
            smac,
            dmac,
        } => {
            forward::set_macs(ctx, smac, dmac).map_err(|_| Reason::DropTooBig)?;
            DEVMAP
                .redirect(ifindex, 0)
                .map(|_| Reason::ForwardIcmpTooBig)
                .map_err(|_| Reason::DropRedirectFailed)
        }
        // The way back has no resolved neighbour yet, or leaves by an interface without
        // xlb's program (a VLAN device, say): through the kernel's neighbour output, like
        // any handoff.
        Hop::Handoff { reason, .. } => forward::prepare(ctx, &hop)
            .map(|_| reason)
            .map_err(|_| Reason::DropTooBig),
        Hop::Kernel { .. } | Hop::TooBig { .. } => Err(Reason::DropTooBig),
    }
}

/// The code of "fragmentation needed and DF set" (type 3).
const FRAG_NEEDED: u8 = 4;
/// The IPv4 and ICMP headers an error puts in front of its quote.
const ERROR_HEADERS: usize = Ipv4Hdr::LEN + ICMP_LEN;
/// Where the quote starts in an error xlb makes: after Ethernet and `ERROR_HEADERS`.
const QUOTE_AT: usize = ETH_LEN + ERROR_HEADERS;
/// The longest quote xlb makes, in 32-bit words: an IPv4 header with options (60) + 8.
const QUOTE_WORDS: usize = (60 + QUOTED_L4_MIN) / 4;
/// The same for ICMPv6: the IPv6 and ICMPv6 headers, where the quote starts, and its
/// longest (the IPv6 header and extension headers, which end by `parse`'s 200, + 8).
const ERROR_HEADERS_V6: usize = Ipv6Hdr::LEN + ICMP_LEN;
const QUOTE_AT_V6: usize = ETH_LEN + ERROR_HEADERS_V6;
const QUOTE_WORDS_V6: usize = (200 + QUOTED_L4_MIN) / 4;

/// Makes the frame an ICMP "fragmentation needed" about the packet it holds (see
/// [`too_big`]); returns its IPv4 total length.
#[inline(always)]
fn too_big_v4(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<u16, Reason> {
    // Never to a source that cannot be one (RFC 1122 3.2.2): "this network", loopback,
    // multicast and above.
    let to = pkt.key.src.v4_octets();
    if to[0] == 0 || to[0] == 127 || to[0] >= 224 {
        return Err(Reason::DropTooBig);
    }
    // The IPv4 header (with options) and 8 bytes: at most 68.
    let quote_len = (pkt.l4_off().wrapping_sub(pkt.l3_off()) + QUOTED_L4_MIN) & 0x7f;
    // Room in front for the two new headers; the old Ethernet header (and VLAN tag, whose
    // 4 bytes the new headers take: the answer leaves untagged, or is tagged by the kernel's
    // VLAN device on its way out) is overwritten.
    let grow = (ERROR_HEADERS + ETH_LEN) as i32 - pkt.l3_off() as i32;
    // SAFETY: the helper moves the frame's start within the headroom, or fails cleanly.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Reason::DropTooBig);
    }
    // The quote's sum, for the ICMP checksum, a word at a time (every packet pointer is
    // derived again: the helper invalidated them).
    let mut quote_sum = 0u32;
    for i in 0..QUOTE_WORDS {
        if i * 4 >= quote_len {
            break;
        }
        let word: *const [u8; 4] = ptr_at(ctx, QUOTE_AT + i * 4)?;
        // SAFETY: ptr_at checked the four bytes are inside the frame.
        quote_sum += sum_words(unsafe { &*word });
    }
    let (src, dst) = (pkt.key.dst.v4_octets(), pkt.key.src.v4_octets());
    let tot_len = ((ERROR_HEADERS + quote_len) as u16).to_be_bytes();
    // DF set, so ID 0 is fine (RFC 6864: an atomic datagram).
    let mut ip = [
        0x45, 0xc0, tot_len[0], tot_len[1], 0, 0, 0x40, 0, 64, PROTO_ICMP, 0, 0, src[0], src[1],
        src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    let check = (!fold(sum_words(&ip))).to_be_bytes();
    ip[10] = check[0];
    ip[11] = check[1];
    let mtu = mtu.to_be_bytes();
    let mut icmp = [DEST_UNREACH, FRAG_NEEDED, 0, 0, 0, 0, mtu[0], mtu[1]];
    let check = (!fold(sum_words(&icmp) + quote_sum)).to_be_bytes();
    icmp[2] = check[0];
    icmp[3] = check[1];
    let headers: *mut [u8; QUOTE_AT] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the Ethernet, IPv4 and ICMP headers' room is in the frame.
    let headers = unsafe { &mut *headers };
    headers[12] = 0x08;
    headers[13] = 0x00;
    headers[ETH_LEN..ETH_LEN + Ipv4Hdr::LEN].copy_from_slice(&ip);
    headers[ETH_LEN + Ipv4Hdr::LEN..QUOTE_AT].copy_from_slice(&icmp);
    cut_after(ctx, QUOTE_AT + quote_len)?;
    Ok(u16::from_be_bytes(tot_len))
}

/// Makes the frame an ICMPv6 "packet too big" about the IPv6 packet it holds (see
/// [`too_big`]); returns its IPv6 payload length + 40.
#[inline(always)]
fn too_big_v6(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<u16, Reason> {
    // Never to a source that cannot be one (RFC 4443 2.4 (e)): unspecified, loopback,
    // multicast.
    let to = &pkt.key.src.addr;
    if to[0] == 0xff || pkt.key.src.addr == [0; 16] || pkt.key.src.addr == LOOPBACK_V6 {
        return Err(Reason::DropTooBig);
    }
    // The IPv6 header and its extension headers (which end by 200), and 8 bytes.
    let quote_len = (pkt.l4_off().wrapping_sub(pkt.l3_off()) + QUOTED_L4_MIN) & 0xff;
    let grow = (ERROR_HEADERS_V6 + ETH_LEN) as i32 - pkt.l3_off() as i32;
    // SAFETY: the helper moves the frame's start within the headroom, or fails cleanly.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Reason::DropTooBig);
    }
    // ICMPv6's checksum covers a pseudo-header (RFC 8200 8.1): the addresses, the
    // message's length and the next header, 58.
    let len = (ICMP_LEN + quote_len) as u16;
    let mut sum = sum_words(&pkt.key.src.addr)
        + sum_words(&pkt.key.dst.addr)
        + len as u32
        + PROTO_ICMPV6 as u32;
    for i in 0..QUOTE_WORDS_V6 {
        if i * 4 >= quote_len {
            break;
        }
        let word: *const [u8; 4] = ptr_at(ctx, QUOTE_AT_V6 + i * 4)?;
        // SAFETY: ptr_at checked the four bytes are inside the frame.
        sum += sum_words(unsafe { &*word });
    }
    let mtu = (mtu as u32).to_be_bytes();
    let icmp = [PACKET_TOO_BIG_V6, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
    let check = (!fold(sum + sum_words(&icmp))).to_be_bytes();
    let headers: *mut [u8; QUOTE_AT_V6] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the Ethernet, IPv6 and ICMPv6 headers' room is in the
    // frame.
    let h = unsafe { &mut *headers };
    h[12] = 0x86;
    h[13] = 0xdd;
    let ip = ETH_LEN;
    let plen = len.to_be_bytes();
    h[ip..ip + 8].copy_from_slice(&[0x60, 0, 0, 0, plen[0], plen[1], PROTO_ICMPV6, 64]);
    h[ip + 8..ip + 24].copy_from_slice(&pkt.key.dst.addr);
    h[ip + 24..ip + 40].copy_from_slice(&pkt.key.src.addr);
    let at = ip + Ipv6Hdr::LEN;
    h[at..at + ICMP_LEN].copy_from_slice(&icmp);
    h[at + 2] = check[0];
    h[at + 3] = check[1];
    cut_after(ctx, QUOTE_AT_V6 + quote_len)?;
    Ok(Ipv6Hdr::LEN as u16 + len)
}

/// `::1`.
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Ends the frame `len` bytes in: nothing after the quote.
#[inline(always)]
fn cut_after(ctx: &XdpContext, len: usize) -> Result<(), Reason> {
    let (start, end) = frame_bounds(ctx);
    let delta = len as i32 - (end - start) as i32;
    // SAFETY: the helper only moves the frame's end, or fails cleanly.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Reason::DropTooBig);
    }
    Ok(())
}

/// Reads where the error's quoted TCP/UDP packet (or ICMP echo) lies, and the conntrack key a
/// reply to it would carry. False when the quote is not an unfragmented TCP/UDP-over-IPv4
/// packet or echo with its ports (identifier) inside the error's datagram.
///
/// Not inlined: its locals then take no room in `error`'s frame, which is on the stack with
/// the FIB lookup's.
#[inline(never)]
fn read_quote(ctx: &XdpContext, pkt: &Packet, quote: &mut Quote, key: &mut FlowKey) -> bool {
    if pkt.v6 {
        return read_quote_v6(ctx, pkt, quote, key);
    }
    // The quote ends with the error's datagram; Ethernet padding after it is not quoted.
    let end = pkt.l3_off() + pkt.tot_len as usize;
    let ip_off = pkt.l4_off() + ICMP_LEN;
    let Ok(inner) = ptr_at::<Ipv4Hdr>(ctx, ip_off) else {
        return false;
    };
    // SAFETY: ptr_at checked that a 20-byte IPv4 header is inside the frame.
    let inner = unsafe { &*inner };
    let ihl = ((inner.vihl & 0x0f) as usize) << 2;
    if inner.version() != 4 || ihl < Ipv4Hdr::LEN {
        return false;
    }
    // A later fragment quotes no ports.
    if u16::from_be_bytes(inner.frags) & IP_OFFSET_MASK != 0 {
        return false;
    }
    let check_off = match inner.proto {
        PROTO_TCP => TCP_CHECK_OFF,
        PROTO_UDP => UDP_CHECK_OFF,
        PROTO_ICMP => ICMP_CHECK_OFF,
        _ => return false,
    };
    let l4_off = (ip_off + ihl) & QUOTE_OFF_MASK;
    if l4_off + QUOTED_L4_MIN > end {
        return false;
    }
    let Ok(head) = ptr_at::<[u8; QUOTED_L4_MIN]>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: ptr_at checked the eight bytes are inside the frame.
    let head = unsafe { *head };
    let Some((ports, echo_request)) = quoted_ports(inner.proto, &head) else {
        return false;
    };
    // Field by field: a struct built whole would be built on the stack first.
    key.src = Endpoint::v4(inner.dst_addr, [ports[2], ports[3]]);
    key.dst = Endpoint::v4(inner.src_addr, [ports[0], ports[1]]);
    key.proto = inner.proto;
    key._pad = 0;
    quote.set(ip_off, l4_off, check_off, end, inner.proto, echo_request);
    true
}

/// The ports of a quoted packet of protocol `proto`, from its first bytes `head`: a TCP or
/// UDP header's, or a quoted echo's ([`echo_of`], [`Echo::ports`]); and whether it is an
/// echo request. `None` for other ICMP, which is no flow's.
#[inline(always)]
fn quoted_ports(proto: u8, head: &[u8; QUOTED_L4_MIN]) -> Option<([u8; 4], bool)> {
    if proto != PROTO_ICMP && proto != PROTO_ICMPV6 {
        return Some(([head[0], head[1], head[2], head[3]], false));
    }
    match echo_of(proto, head) {
        Echo::No => None,
        echo => Some((echo.ports(head), echo == Echo::Request)),
    }
}

/// Whether an ICMP or ICMPv6 (`proto`) message with header `head` is an echo request, an
/// echo reply, or neither.
#[inline(always)]
pub fn echo_of(proto: u8, head: &[u8; ICMP_LEN]) -> Echo {
    match (proto, head[0], head[1]) {
        (PROTO_ICMP, ECHO_REQUEST, 0) | (PROTO_ICMPV6, ECHO_REQUEST_V6, 0) => Echo::Request,
        (PROTO_ICMP, ECHO_REPLY, 0) | (PROTO_ICMPV6, ECHO_REPLY_V6, 0) => Echo::Reply,
        _ => Echo::No,
    }
}

/// [`read_quote`] for an ICMPv6 error: its quote must be a TCP or UDP packet or an echo
/// whose IPv6 header is followed by the L4 header (no extension headers), and the error
/// itself must have none either (so every offset stays within [`QUOTE_OFF_MASK`]).
#[inline(always)]
fn read_quote_v6(ctx: &XdpContext, pkt: &Packet, quote: &mut Quote, key: &mut FlowKey) -> bool {
    if pkt.l4_off() != pkt.l3_off() + Ipv6Hdr::LEN {
        return false;
    }
    let end = pkt.l3_off() + pkt.tot_len as usize;
    let ip_off = pkt.l4_off() + ICMP_LEN;
    let Ok(inner) = ptr_at::<Ipv6Hdr>(ctx, ip_off) else {
        return false;
    };
    // SAFETY: ptr_at checked that the 40-byte IPv6 header is inside the frame.
    let inner = unsafe { &*inner };
    if inner.version() != 6 {
        return false;
    }
    let check_off = match inner.next_hdr {
        PROTO_TCP => TCP_CHECK_OFF,
        PROTO_UDP => UDP_CHECK_OFF,
        PROTO_ICMPV6 => ICMP_CHECK_OFF,
        _ => return false,
    };
    let l4_off = (ip_off + Ipv6Hdr::LEN) & QUOTE_OFF_MASK;
    if l4_off + QUOTED_L4_MIN > end {
        return false;
    }
    let Ok(head) = ptr_at::<[u8; QUOTED_L4_MIN]>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: ptr_at checked the eight bytes are inside the frame.
    let head = unsafe { *head };
    let Some((ports, echo_request)) = quoted_ports(inner.next_hdr, &head) else {
        return false;
    };
    key.src.addr = inner.dst_addr;
    key.src.port = [ports[2], ports[3]];
    key.dst.addr = inner.src_addr;
    key.dst.port = [ports[0], ports[1]];
    key.proto = inner.next_hdr;
    key._pad = 0;
    quote.set(ip_off, l4_off, check_off, end, inner.next_hdr, echo_request);
    true
}
