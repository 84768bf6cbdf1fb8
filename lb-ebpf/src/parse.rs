//! Bounds-checked packet access and the TCP/UDP/ICMP parser, IPv4 and IPv6.
//!
//! A frame may carry one 802.1Q VLAN tag: the IP header then starts 4 bytes later
//! ([`Packet::l3_off`]); a second tag (QinQ) goes to the kernel.
//!
//! The two families differ only here and where a header is written (`nat`, `icmp`) or the
//! FIB asked (`forward`): the rest of the program reads the same [`Packet`], whose key holds
//! 16-byte addresses (IPv4 mapped). IPv6 extension headers (hop-by-hop, routing,
//! destination options, fragment) are walked, at most [`IPV6_EXT_MAX`] of them; what lies
//! further goes to the kernel with its own reason.
//!
//! An ICMP echo's identifier stands in for a port in its key, as Linux conntrack does: a
//! request's is its source port, a reply's its destination port, so a request and its
//! reply have the swapped keys a TCP or UDP packet and its reply have, and a NAT gateway
//! tracks and rewrites pings with the same entries.

use core::cell::Cell;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{
        Endpoint, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, handoff_mark,
        is_v4_mapped,
    },
    reason::Reason,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{CLOCK, icmp};

/// EtherType of IPv4, as it sits in the frame (network byte order read as native u16).
pub const ETH_P_IP_BE: u16 = u16::from_ne_bytes([0x08, 0x00]);
/// EtherType of IPv6, likewise.
pub const ETH_P_IPV6_BE: u16 = u16::from_ne_bytes([0x86, 0xdd]);
/// EtherType of an 802.1Q VLAN tag, likewise.
pub const ETH_P_8021Q_BE: u16 = u16::from_ne_bytes([0x81, 0x00]);
/// An 802.1Q tag: its EtherType's place holds 0x8100, then 2 bytes of tag, then the
/// EtherType of what follows.
pub const VLAN_LEN: usize = 4;
/// Flags/offset field bits (host order after `u16::from_be_bytes`).
const IP_MF: u16 = 0x2000;
const IP_DF: u16 = 0x4000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;

pub const ETH_LEN: usize = EthHdr::LEN;
/// Offset of the checksum field inside the TCP and UDP headers.
pub const TCP_CHECK_OFF: usize = 16;
/// Offset of the flags byte (FIN, SYN, RST, PSH, ACK, ...) inside the TCP header.
const TCP_FLAGS_OFF: usize = 13;
pub const UDP_CHECK_OFF: usize = 6;
/// Offset of the checksum field inside the ICMP header.
pub const ICMP_CHECK_OFF: usize = 2;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// An ICMP header: type, code, checksum, and four bytes the type gives a meaning to.
pub const ICMP_LEN: usize = 8;

/// The frame's start and end. Read with volatile loads so that LLVM cannot hoist the loads
/// out of a non-inlined function into its callers and pass the values instead of `ctx`
/// (argument promotion): the verifier then sees packet pointers handled as plain integers
/// (`pointer arithmetic on pkt_end prohibited`) and rejects the program.
#[inline(always)]
pub fn frame_bounds(ctx: &XdpContext) -> (usize, usize) {
    // SAFETY: `ctx.ctx` is the program's context, valid for the run; reading its fields is
    // what the verifier expects (it rewrites these loads).
    unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    }
}

/// The only way the program touches packet bytes: a pointer to a `T` at `offset`, returned
/// only when all `size_of::<T>()` bytes lie inside the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let (start, end) = frame_bounds(ctx);
    if start + offset + size_of::<T>() > end {
        return Err(Reason::DropTruncated);
    }
    Ok((start + offset) as *mut T)
}

/// IPv6 extension headers walked before the L4 header.
pub const IPV6_EXT_MAX: usize = 4;
/// IPv6 next-header values of the extension headers `parse` walks.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTIONS: u8 = 60;
/// In an IPv6 fragment header's offset field (host order): the offset, and "more fragments".
const IPV6_OFFSET_MASK: u16 = 0xfff8;
const IPV6_MF: u16 = 0x0001;
/// The furthest an L4 header may start: its checksum, 16 bytes in, must stay within
/// [`HEADER_OFF_MASK`].
const L4_OFF_MAX: usize = 200;

/// What the rest of the program needs to know about a TCP/UDP/ICMP packet of either family.
#[derive(Default)]
pub struct Packet {
    /// Addresses, ports and protocol as received. ICMP has no ports: they are 0, but for an
    /// echo's identifier (see the module doc).
    pub key: FlowKey,
    /// Offset of the L4 header: Ethernet (and a VLAN tag) + the IP header (IPv4's IHL × 4,
    /// options included; IPv6's 40 and its extension headers). Read it through
    /// [`Packet::l4_off`]. (Offsets and length are 16 and 32 bits wide: this struct lives in
    /// the hot path's frame, where every byte counts.)
    l4_off: u16,
    /// Offset of the L4 checksum field. Read it through [`Packet::l4_check_off`].
    l4_check_off: u16,
    /// IPv4's TTL, IPv6's hop limit.
    pub ttl: u8,
    /// The TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// The IP datagram's length, header included: IPv4's total length, IPv6's payload
    /// length + 40 (host byte order).
    pub tot_len: u16,
    /// First fragment of a fragmented datagram (MF set, offset 0).
    pub fragmented: bool,
    /// DF set, or IPv6 (whose routers never fragment): a router must not fragment it, and
    /// answers ICMP "fragmentation needed" / ICMPv6 "packet too big".
    pub dont_fragment: bool,
    /// An IPv6 packet.
    pub v6: bool,
    /// UDP over IPv6 with checksum 0, which IPv6 forbids but tunnels may use (RFC 6935):
    /// passed when it is not ours, dropped when it is (`main::forwardable`).
    pub udp_no_checksum: bool,
    /// Whole frame length, for byte counters.
    pub frame_len: u32,
    /// Whether the packet is an ICMP echo request or reply (code 0), whose identifier is in
    /// the key.
    pub echo: Echo,
    /// Offset of the IP header: Ethernet, plus a VLAN tag's 4 bytes when there is one.
    /// Read it through [`Packet::l3_off`].
    l3_off: u8,
    /// The clock as [`Packet::now`] first read it for this packet; 0 before.
    now_ns: CpuCell<u64>,
}

/// A field of [`Packet`] written through the shared reference the rest of the program
/// holds.
#[derive(Default)]
struct CpuCell<T>(Cell<T>);

// SAFETY: a Packet lives only in its CPU's slot of the per-CPU `PACKET`, which only the
// program run on that CPU touches, and it runs to completion: never two at once.
unsafe impl<T> Sync for CpuCell<T> {}

/// The clock as this CPU last read it (its slot of `CLOCK`): the coarse clock
/// (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC as of the last timer tick), and the jiffy,
/// the count of timer ticks, it was read in. Within one jiffy the reading is used again:
/// the jiffies are a load of a kernel variable (the verifier inlines `bpf_jiffies64`),
/// where the coarse clock is a helper call into the timekeeping code, which cost a tracked
/// packet 25-36 ns of 300 on an AMD EPYC whose returns go through the kernel's return
/// thunks (`docs/benchmarks.md`, "Fewer calls on the tracked path").
///
/// The reading is at most a tick older than one taken now, and the coarse clock is itself
/// a tick behind. The kernel adds a tick to the jiffies a moment before it moves the clock
/// on: a reading taken in that moment, the clock unchanged since this CPU's last one, is
/// not kept, and the next packet reads again. (One taken there after every CPU idled for
/// a while, by a CPU whose last reading is older still, is kept for a tick: that tick's
/// times are then as old as the idle time. The sweeper's timeouts are seconds, but for new
/// flows under pressure, 100 ms, which such a flow's next packet stamps anew.)
#[repr(C)]
#[derive(Default)]
pub struct Clock {
    jiffies: u64,
    ns: u64,
}

impl Clock {
    /// The data plane's clock (see [`Packet::now`]).
    #[inline(always)]
    fn read() -> u64 {
        // SAFETY: bpf_jiffies64 has no preconditions.
        let jiffies = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
        let Some(slot) = CLOCK.get_ptr_mut(0) else {
            return coarse_clock();
        };
        // SAFETY: this CPU's slot of a one-entry per-CPU array; an XDP program runs to
        // completion on its CPU, so no other run touches it meanwhile.
        let clock = unsafe { &mut *slot };
        // A slot never written has jiffy 0, which the 64-bit jiffies never are (they start
        // near 2^32, five minutes before the 32-bit count wraps, and only grow).
        if clock.jiffies == jiffies {
            return clock.ns;
        }
        let ns = coarse_clock();
        if ns != clock.ns {
            clock.jiffies = jiffies;
            clock.ns = ns;
        }
        ns
    }
}

/// The coarse clock itself: CLOCK_MONOTONIC as of the last timer tick.
#[inline(always)]
fn coarse_clock() -> u64 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// [`Packet::echo`].
#[repr(u8)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Echo {
    #[default]
    No,
    Request,
    Reply,
}

impl Echo {
    /// The ports an echo with header `head` stands for: its identifier is a request's
    /// source port and a reply's destination port, so a ping's request and replies make
    /// one flow's two directions. None for a message that is no echo.
    #[inline(always)]
    pub fn ports(self, head: &[u8; ICMP_LEN]) -> [u8; 4] {
        let id = [head[ECHO_ID_OFF], head[ECHO_ID_OFF + 1]];
        match self {
            Echo::Request => [id[0], id[1], 0, 0],
            Echo::Reply => [0, 0, id[0], id[1]],
            Echo::No => [0; 4],
        }
    }
}

/// Offset of the identifier inside an ICMP echo header.
pub const ECHO_ID_OFF: usize = 4;

/// Upper bound of any offset into the headers we touch: an L4 header starts at most at
/// [`L4_OFF_MAX`] (IPv4 with options ends by 14 + 4 + 60 = 78), + the TCP checksum offset
/// (16) + 2 < 256.
const HEADER_OFF_MASK: usize = 0xff;

impl Packet {
    // The verifier forgets a scalar's range when the compiler spills it to the stack as 32
    // bits; offsets stored here are re-bounded at every use with a mask that cannot change a
    // valid value, so the packet-pointer arithmetic in ptr_at stays provably bounded.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.l4_off as usize & HEADER_OFF_MASK
    }

    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_check_off as usize & HEADER_OFF_MASK
    }

    #[inline(always)]
    pub fn l3_off(&self) -> usize {
        self.l3_off as usize & 0x1f
    }

    /// The data plane's clock, in nanoseconds: CLOCK_MONOTONIC as of a recent timer tick
    /// (at most two ticks, 2-20 ms, behind; see [`Clock`] for the rare exception), the
    /// clock of `NatEntry::last_seen_ns` and of the next-hop cache. Every time these keep
    /// is coarser than a tick. Read once per packet: the conntrack and the next-hop cache
    /// share the reading.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        self.now_from(Clock::read)
    }

    /// [`Packet::now`] for `forward::route`, whose frame must not grow (the chain `xlb` →
    /// `too_big` → `route` → `remember_hop` is at the 512-byte limit): when this packet
    /// has no reading yet, the coarse clock's helper is called directly, without
    /// [`Clock`]'s per-CPU reading. A tracked packet's conntrack lookup and a new flow's
    /// `new_flow` read the clock before `route`; the ICMP paths (a ping to a VIP, an error
    /// translated, an answer to a packet too big) call the helper.
    #[inline(always)]
    pub fn now_or_coarse(&self) -> u64 {
        self.now_from(coarse_clock)
    }

    /// This packet's reading of the clock, read by `read` if it has none yet.
    #[inline(always)]
    fn now_from(&self, read: fn() -> u64) -> u64 {
        let now = self.now_ns.0.get();
        if now != 0 {
            return now;
        }
        let now = read();
        self.now_ns.0.set(now);
        now
    }

    /// ICMP or ICMPv6 (parse keeps each to its own IP version).
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        self.key.proto == PROTO_ICMP || self.key.proto == PROTO_ICMPV6
    }

    /// Whether the frame came with a VLAN tag (its IP header is not right after the MACs
    /// and EtherType).
    #[inline(always)]
    pub fn tagged(&self) -> bool {
        self.l3_off() != ETH_LEN
    }
}

/// What the IP header (and IPv6's extension headers) told.
struct Network {
    proto: u8,
    /// A fragment after the first: no L4 header.
    later_fragment: bool,
    l4_off: usize,
    tot_len: u16,
    ttl: u8,
    fragmented: bool,
    dont_fragment: bool,
}

/// Whether the six bytes at `mac` are [`handoff_mark::DMAC`]: compared as two words
/// read in place (a copy of the array would take room on the stack).
#[inline(always)]
fn is_handoff_dmac(mac: *const u8) -> bool {
    const D: [u8; 6] = handoff_mark::DMAC;
    // SAFETY: the caller checked that six bytes at `mac` are inside the frame; unaligned
    // reads of plain bytes.
    let (head, tail) = unsafe {
        (
            core::ptr::read_unaligned(mac as *const u32),
            core::ptr::read_unaligned(mac.add(4) as *const u16),
        )
    };
    head == u32::from_ne_bytes([D[0], D[1], D[2], D[3]]) && tail == u16::from_ne_bytes([D[4], D[5]])
}

/// Parses Ethernet + IPv4 or IPv6 + the first bytes of TCP/UDP, or the ICMP header (which
/// `icmp::handle` reads further).
///
/// Errors: `PassNotIp` / `PassNotTcpUdp` / `PassFragment` (non-first fragments) /
/// `PassIpv6Extensions` for what the kernel should handle; `DropTruncated` /
/// `DropBadIpv4Header` / `DropBadIpv6Header` for malformed frames; `DropForgedHandoff` for a
/// frame that comes with the mark only xlb may put on a frame (asked first: every frame the
/// kernel gets from here on passes the tc program, which trusts the mark).
///
/// Inlined into `xlb` (a subprogram call and return cost a tracked packet some 10 ns),
/// whose frame has room since the rewrite is off it (`REWRITE`). Writes to `pkt` rather than returning
/// `Result<Packet, _>`: bpf-linker describes such a niche-packed enum with a union member at
/// a non-zero offset, which the kernel's BTF check refuses (aya then loads without BTF).
#[inline(always)]
pub fn parse(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that a whole EthHdr is inside the frame.
    if is_handoff_dmac(eth as *const u8) {
        return Err(Reason::DropForgedHandoff);
    }
    // SAFETY: as above.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_off = ETH_LEN;
    if ether_type == ETH_P_8021Q_BE {
        let inner: *const [u8; 2] = ptr_at(ctx, ETH_LEN + 2)?;
        // SAFETY: ptr_at checked the inner EtherType's two bytes are inside the frame.
        ether_type = u16::from_ne_bytes(unsafe { *inner });
        l3_off = ETH_LEN + VLAN_LEN;
    }
    let (start, end) = frame_bounds(ctx);
    let frame_len = end - start;
    pkt.v6 = false;
    let net = if ether_type == ETH_P_IP_BE {
        ipv4(ctx, l3_off, frame_len, &mut pkt.key)?
    } else if ether_type == ETH_P_IPV6_BE {
        pkt.v6 = true;
        ipv6(ctx, l3_off, frame_len, &mut pkt.key)?
    } else {
        return Err(Reason::PassNotIp);
    };

    let (l4_min, check_off) = match net.proto {
        PROTO_TCP => (TCP_MIN_LEN, TCP_CHECK_OFF),
        PROTO_UDP => (UDP_LEN, UDP_CHECK_OFF),
        PROTO_ICMP if !pkt.v6 => (ICMP_LEN, ICMP_CHECK_OFF),
        PROTO_ICMPV6 if pkt.v6 => (ICMP_LEN, ICMP_CHECK_OFF),
        _ => return Err(Reason::PassNotTcpUdp),
    };
    if net.later_fragment {
        return Err(Reason::PassFragment);
    }
    let l4_off = net.l4_off;
    // The whole minimal L4 header (ports and checksum) lies inside the datagram, which lies
    // inside the frame. Each access below still goes through ptr_at, which is what the
    // verifier checks.
    if l4_off + l4_min > l3_off + net.tot_len as usize {
        return Err(Reason::DropTruncated);
    }

    let mut echo = Echo::No;
    let ports = if net.proto == PROTO_ICMP || net.proto == PROTO_ICMPV6 {
        let icmp: *const [u8; ICMP_LEN] = ptr_at(ctx, l4_off)?;
        // SAFETY: ptr_at checked the whole 8-byte ICMP header is inside the frame.
        let icmp = unsafe { *icmp };
        // The family's protocol as a constant (it is `net.proto`): with the variable, LLVM
        // keeps more on the stack, and `xlb`'s chain of frames passes the 512 bytes.
        echo = if pkt.v6 {
            icmp::echo_of(PROTO_ICMPV6, &icmp)
        } else {
            icmp::echo_of(PROTO_ICMP, &icmp)
        };
        echo.ports(&icmp)
    } else {
        let ports: *const [u8; 4] = ptr_at(ctx, l4_off)?;
        // SAFETY: ptr_at checked the four port bytes are inside the frame.
        unsafe { *ports }
    };
    let tcp_flags = if net.proto == PROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4_off + TCP_FLAGS_OFF)?;
        // SAFETY: ptr_at checked the flags byte is inside the frame.
        unsafe { *flags }
    } else {
        0
    };
    let mut udp_no_checksum = false;
    if pkt.v6 && net.proto == PROTO_UDP {
        let check: *const [u8; 2] = ptr_at(ctx, l4_off + UDP_CHECK_OFF)?;
        // SAFETY: ptr_at checked the checksum's two bytes are inside the frame.
        udp_no_checksum = unsafe { *check } == [0, 0];
    }

    // Field by field: the addresses are in place already (written by `ipv4` / `ipv6`).
    pkt.key.src.port = [ports[0], ports[1]];
    pkt.key.dst.port = [ports[2], ports[3]];
    pkt.key.proto = net.proto;
    pkt.key._pad = 0;
    pkt.l4_off = l4_off as u16;
    pkt.l4_check_off = (l4_off + check_off) as u16;
    pkt.ttl = net.ttl;
    pkt.tcp_flags = tcp_flags;
    pkt.tot_len = net.tot_len;
    pkt.fragmented = net.fragmented;
    pkt.dont_fragment = net.dont_fragment;
    pkt.udp_no_checksum = udp_no_checksum;
    pkt.frame_len = frame_len as u32;
    pkt.echo = echo;
    pkt.l3_off = l3_off as u8;
    pkt.now_ns.0.set(0);
    Ok(())
}

/// The IPv4 header at `l3_off`: writes its addresses into `key`.
#[inline(always)]
fn ipv4(
    ctx: &XdpContext,
    l3_off: usize,
    frame_len: usize,
    key: &mut FlowKey,
) -> Result<Network, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked that the fixed 20-byte IPv4 header is inside the frame.
    let ip = unsafe { &*ip };
    if ip.version() != 4 {
        return Err(Reason::DropBadIpv4Header);
    }
    // IHL counts 32-bit words; the mask keeps the verifier's range for it at 0..=60.
    let ihl = ((ip.vihl & 0x0f) as usize) << 2;
    if ihl < Ipv4Hdr::LEN {
        return Err(Reason::DropBadIpv4Header);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if (tot_len as usize) < ihl {
        return Err(Reason::DropBadIpv4Header);
    }
    // Frames may be padded past tot_len (Ethernet minimum size), never shorter.
    if l3_off + tot_len as usize > frame_len {
        return Err(Reason::DropTruncated);
    }
    let frags = u16::from_be_bytes(ip.frags);
    key.src.addr = Endpoint::v4(ip.src_addr, [0; 2]).addr;
    key.dst.addr = Endpoint::v4(ip.dst_addr, [0; 2]).addr;
    Ok(Network {
        proto: ip.proto,
        later_fragment: frags & IP_OFFSET_MASK != 0,
        l4_off: l3_off + ihl,
        tot_len,
        ttl: ip.ttl,
        fragmented: frags & IP_MF != 0,
        dont_fragment: frags & IP_DF != 0,
    })
}

/// The IPv6 header at `l3_off` and its extension headers: writes its addresses into `key`.
#[inline(always)]
fn ipv6(
    ctx: &XdpContext,
    l3_off: usize,
    frame_len: usize,
    key: &mut FlowKey,
) -> Result<Network, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked that the 40-byte IPv6 header is inside the frame.
    let ip = unsafe { &*ip };
    if ip.version() != 6 {
        return Err(Reason::DropBadIpv6Header);
    }
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    // 0: a jumbogram (RFC 2675), which no Ethernet frame holds.
    if payload_len == 0 {
        return Err(Reason::DropBadIpv6Header);
    }
    if l3_off + Ipv6Hdr::LEN + payload_len > frame_len {
        return Err(Reason::DropTruncated);
    }
    // An IPv4-mapped address would match IPv4 services and flows.
    if is_v4_mapped(&ip.src_addr) || is_v4_mapped(&ip.dst_addr) {
        return Err(Reason::DropBadIpv6Header);
    }
    key.src.addr = ip.src_addr;
    key.dst.addr = ip.dst_addr;

    let mut proto = ip.next_hdr;
    let mut off = l3_off + Ipv6Hdr::LEN;
    let mut fragmented = false;
    let mut later_fragment = false;
    let mut walked = 0;
    loop {
        match proto {
            PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => break,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let ext: *const [u8; 4] = ptr_at(ctx, off)?;
                // SAFETY: ptr_at checked the header's first four bytes are in the frame.
                let [next, len, _, segments_left] = unsafe { *ext };
                // A routing header with segments left: the destination is not the final
                // one, which the L4 checksum covers (RFC 8200 8.1). Not ours to rewrite.
                if proto == IPV6_ROUTING && segments_left != 0 {
                    return Err(Reason::PassIpv6Extensions);
                }
                proto = next;
                // Length in 8-byte units, not counting the first 8.
                off += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let ext: *const [u8; 4] = ptr_at(ctx, off)?;
                // SAFETY: ptr_at checked the header's first four bytes are in the frame.
                let ext = unsafe { *ext };
                proto = ext[0];
                let offset = u16::from_be_bytes([ext[2], ext[3]]);
                off += 8;
                // A later fragment carries no header after this one: its protocol is all
                // there is to know.
                if offset & IPV6_OFFSET_MASK != 0 {
                    later_fragment = true;
                    break;
                }
                fragmented = offset & IPV6_MF != 0;
            }
            // ESP, AH, "no next header", and what no packet of ours carries.
            _ => return Err(Reason::PassNotTcpUdp),
        }
        walked += 1;
        if walked > IPV6_EXT_MAX || off > L4_OFF_MAX {
            return Err(Reason::PassIpv6Extensions);
        }
    }
    Ok(Network {
        proto,
        later_fragment,
        l4_off: off & HEADER_OFF_MASK,
        tot_len: (Ipv6Hdr::LEN + payload_len) as u16,
        ttl: ip.hop_limit,
        fragmented,
        dont_fragment: true,
    })
}
