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
//! direction: outer addresses by the entry's rewrite, the quote back to what it was.
//!
//! The rest — replies, other types, fragments, errors about no tracked flow — goes to the
//! kernel, counted (`pass/icmp`, `pass/icmp_untracked`).
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by-value keys would be copied onto the 512-byte BPF stack"
)]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{Endpoint, FlowKey, PROTO_TCP, PROTO_UDP},
    reason::Reason,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    CONNTRACK, ICMP_SCRATCH, VIPS,
    forward::{self, Hop},
    nat,
    parse::{ETH_LEN, ICMP_LEN, IP_OFFSET_MASK, Packet, TCP_CHECK_OFF, UDP_CHECK_OFF, ptr_at},
    stats,
};

/// ICMP types.
pub const ECHO_REPLY: u8 = 0;
const DEST_UNREACH: u8 = 3;
pub const ECHO_REQUEST: u8 = 8;
const TIME_EXCEEDED: u8 = 11;
const PARAM_PROBLEM: u8 = 12;

/// RFC 792: an error quotes the IP header and at least the first 8 bytes after it; for TCP
/// and UDP those hold the ports.
const QUOTED_L4_MIN: usize = 8;

/// Upper bound of any offset into a quoted packet: Ethernet (14) + IPv4 with options (60) +
/// ICMP (8) + the quoted IPv4 header with options (60) + the TCP checksum (16 + 2) = 160.
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
    /// The quoted packet's protocol, TCP or UDP.
    pub proto: u8,
}

impl Quote {
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
    match kind {
        ECHO_REQUEST if code == 0 => echo(ctx, pkt),
        DEST_UNREACH | TIME_EXCEEDED | PARAM_PROBLEM => error(ctx, pkt),
        _ => Err(Reason::PassIcmp),
    }
}

/// Answers a ping to a VIP, from the VIP.
#[inline(never)]
fn echo(ctx: &XdpContext, pkt: &Packet) -> Result<Reason, Reason> {
    // A request with IP options (a source route, a route record) would need them answered
    // as RFC 1122 says: the kernel's job.
    if pkt.l4_off() != ETH_LEN + Ipv4Hdr::LEN {
        return Err(Reason::PassIcmp);
    }
    // SAFETY: a presence check; the value is not read.
    if unsafe { VIPS.get(&pkt.key.dst.addr) }.is_none() {
        return Err(Reason::PassIcmp);
    }
    let mut hop = forward::route(ctx, pkt, &pkt.key.dst, &pkt.key.src)?;
    if let Hop::Kernel { .. } = hop {
        // The FIB will not say how to reach the asker: the kernel answers, if it can.
        return Err(Reason::PassIcmp);
    }
    forward::prepare(ctx, &mut hop);
    nat::echo_reply(ctx, pkt)?;
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
    if entry.ifindex != ctx.ingress_ifindex() as u32 {
        return Err(Reason::DropWrongInterface);
    }
    if pkt.ttl <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    let mut hop = forward::route(ctx, pkt, &rewrite.src, &rewrite.dst)?;
    forward::prepare(ctx, &mut hop);
    nat::rewrite_icmp_error(ctx, pkt, quote, rewrite, hop.ttl_decrement())?;
    let sent = forward::send(ctx, hop)?;
    stats::count_flow_packet(rewrite, pkt.frame_len);
    Ok(sent)
}

/// Reads where the error's quoted TCP/UDP packet lies, and the conntrack key a reply to it
/// would carry. False when the quote is not an unfragmented TCP/UDP-over-IPv4 packet with
/// its ports inside the error's datagram.
#[inline(always)]
fn read_quote(ctx: &XdpContext, pkt: &Packet, quote: &mut Quote, key: &mut FlowKey) -> bool {
    // The quote ends with the error's datagram; Ethernet padding after it is not quoted.
    let end = ETH_LEN + pkt.tot_len as usize;
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
        _ => return false,
    };
    let l4_off = (ip_off + ihl) & QUOTE_OFF_MASK;
    if l4_off + QUOTED_L4_MIN > end {
        return false;
    }
    let Ok(ports) = ptr_at::<[u8; 4]>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: ptr_at checked the four port bytes are inside the frame.
    let ports = unsafe { *ports };
    *key = FlowKey {
        src: Endpoint::v4(inner.dst_addr, [ports[2], ports[3]]),
        dst: Endpoint::v4(inner.src_addr, [ports[0], ports[1]]),
        proto: inner.proto,
        _pad: 0,
    };
    *quote = Quote {
        ip_off,
        l4_off,
        l4_check_off: if l4_off + check_off + 2 <= end {
            l4_off + check_off
        } else {
            0
        },
        proto: inner.proto,
    };
    true
}
