//! Bounds-checked packet access and the IPv4 TCP/UDP/ICMP parser.
//!
//! A frame may carry one 802.1Q VLAN tag: the IPv4 header then starts 4 bytes later
//! ([`Packet::l3_off`]); a second tag (QinQ) goes to the kernel.
//!
//! An ICMP echo's identifier stands in for a port in its key, as Linux conntrack does: a
//! request's is its source port, a reply's its destination port, so a request and its
//! reply have the swapped keys a TCP or UDP packet and its reply have, and a NAT gateway
//! tracks and rewrites pings with the same entries.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{Endpoint, FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    reason::Reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::icmp;

/// EtherType of IPv4, as it sits in the frame (network byte order read as native u16).
const ETH_P_IP_BE: u16 = u16::from_ne_bytes([0x08, 0x00]);
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

/// What the rest of the program needs to know about a TCP/UDP/ICMP-over-IPv4 packet.
#[derive(Default)]
pub struct Packet {
    /// Addresses, ports and protocol as received. ICMP has no ports: they are 0, but for an
    /// echo's identifier (see the module doc).
    pub key: FlowKey,
    /// Offset of the L4 header: Ethernet (and a VLAN tag) + IHL × 4 (options included). Read
    /// it through
    /// [`Packet::l4_off`]. (Offsets and length are 16 and 32 bits wide: this struct lives in
    /// the hot path's frame, where every byte counts.)
    l4_off: u16,
    /// Offset of the L4 checksum field. Read it through [`Packet::l4_check_off`].
    l4_check_off: u16,
    pub ttl: u8,
    /// The TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// IPv4 total length (host byte order).
    pub tot_len: u16,
    /// First fragment of a fragmented datagram (MF set, offset 0).
    pub fragmented: bool,
    /// DF set: a router must not fragment it, and answers ICMP "fragmentation needed".
    pub dont_fragment: bool,
    /// Whole frame length, for byte counters.
    pub frame_len: u32,
    /// Whether the packet is an ICMP echo request or reply (code 0), whose identifier is in
    /// the key.
    pub echo: Echo,
    /// Offset of the IPv4 header: Ethernet, plus a VLAN tag's 4 bytes when there is one.
    /// Read it through [`Packet::l3_off`].
    l3_off: u8,
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

/// Offset of the identifier inside an ICMP echo header.
pub const ECHO_ID_OFF: usize = 4;

/// Upper bound of any offset into the headers we touch: Ethernet (14) + a VLAN tag (4) +
/// IPv4 with options (at most 60) + the TCP checksum offset (16) = 94 < 128.
const HEADER_OFF_MASK: usize = 0x7f;

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
}

/// Parses Ethernet + IPv4 + the first bytes of TCP/UDP, or the ICMP header (which
/// `icmp::handle` reads further).
///
/// Errors: `PassNotIpv4` / `PassNotTcpUdp` / `PassFragment` (non-first fragments) for what
/// the kernel should handle; `DropTruncated` / `DropBadIpv4Header` for malformed frames.
///
/// Not inlined, for the same reason as `nat::rewrite`. Writes to `pkt` rather than returning
/// `Result<Packet, _>`: bpf-linker describes such a niche-packed enum with a union member at
/// a non-zero offset, which the kernel's BTF check refuses (aya then loads without BTF).
#[inline(never)]
pub fn parse(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that a whole EthHdr is inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_off = ETH_LEN;
    if ether_type == ETH_P_8021Q_BE {
        let inner: *const [u8; 2] = ptr_at(ctx, ETH_LEN + 2)?;
        // SAFETY: ptr_at checked the inner EtherType's two bytes are inside the frame.
        ether_type = u16::from_ne_bytes(unsafe { *inner });
        l3_off = ETH_LEN + VLAN_LEN;
    }
    if ether_type != ETH_P_IP_BE {
        return Err(Reason::PassNotIpv4);
    }

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
    let (start, end) = frame_bounds(ctx);
    let frame_len = (end - start) as u64;
    // Frames may be padded past tot_len (Ethernet minimum size), never shorter.
    if l3_off as u64 + tot_len as u64 > frame_len {
        return Err(Reason::DropTruncated);
    }

    let (l4_min, check_off) = match ip.proto {
        PROTO_TCP => (TCP_MIN_LEN, TCP_CHECK_OFF),
        PROTO_UDP => (UDP_LEN, UDP_CHECK_OFF),
        PROTO_ICMP => (ICMP_LEN, ICMP_CHECK_OFF),
        _ => return Err(Reason::PassNotTcpUdp),
    };
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IP_OFFSET_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    let fragmented = frags & IP_MF != 0;
    if (tot_len as usize) < ihl + l4_min {
        return Err(Reason::DropTruncated);
    }

    // tot_len >= IHL + the minimal L4 header, and the frame holds tot_len: so the whole
    // minimal header (ports and checksum) is inside the frame. Each access below still goes
    // through ptr_at, which is what the verifier checks.
    let l4_off = l3_off + ihl;
    let mut echo = Echo::No;
    let ports = if ip.proto == PROTO_ICMP {
        let icmp: *const [u8; ICMP_LEN] = ptr_at(ctx, l4_off)?;
        // SAFETY: ptr_at checked the whole 8-byte ICMP header is inside the frame.
        let icmp = unsafe { *icmp };
        let id = [icmp[ECHO_ID_OFF], icmp[ECHO_ID_OFF + 1]];
        match (icmp[0], icmp[1]) {
            (icmp::ECHO_REQUEST, 0) => {
                echo = Echo::Request;
                [id[0], id[1], 0, 0]
            }
            (icmp::ECHO_REPLY, 0) => {
                echo = Echo::Reply;
                [0, 0, id[0], id[1]]
            }
            _ => [0; 4],
        }
    } else {
        let ports: *const [u8; 4] = ptr_at(ctx, l4_off)?;
        // SAFETY: ptr_at checked the four port bytes are inside the frame.
        unsafe { *ports }
    };
    let tcp_flags = if ip.proto == PROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4_off + TCP_FLAGS_OFF)?;
        // SAFETY: ptr_at checked the flags byte is inside the frame.
        unsafe { *flags }
    } else {
        0
    };

    *pkt = Packet {
        key: FlowKey {
            src: Endpoint::v4(ip.src_addr, [ports[0], ports[1]]),
            dst: Endpoint::v4(ip.dst_addr, [ports[2], ports[3]]),
            proto: ip.proto,
            _pad: 0,
        },
        l4_off: l4_off as u16,
        l4_check_off: (l4_off + check_off) as u16,
        ttl: ip.ttl,
        tcp_flags,
        tot_len,
        fragmented,
        dont_fragment: frags & IP_DF != 0,
        frame_len: frame_len as u32,
        echo,
        l3_off: l3_off as u8,
    };
    Ok(())
}
