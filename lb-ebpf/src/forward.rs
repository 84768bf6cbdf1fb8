//! Where a rewritten packet goes: the kernel FIB picks the egress interface and both MACs;
//! XDP_TX when that is the interface the packet came in on (unless `NO_XDP_TX` says it is a
//! veth), a devmap redirect to another interface of ours, a handoff to the tc program when
//! the FIB cannot give us the MACs yet or the interface is not ours, and the kernel's own
//! stack for what only it can handle.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_xdp_adjust_head, generated::bpf_fib_lookup},
    programs::XdpContext,
};
use lb_common::{
    hash::next_hop_slot,
    maps::{Endpoint, handoff_mark},
    reason::Reason,
};
use network_types::eth::EthHdr;

use crate::{
    CONFIG, DEVMAP, HOP_SCRATCH, NEXT_HOPS, NO_XDP_TX,
    parse::{ETH_LEN, ETH_P_8021Q_BE, Packet, VLAN_LEN, ptr_at},
};

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// How long a next hop the FIB gave is used without asking again: a route or neighbour
/// change reaches flows' packets within this.
const HOP_CACHE_NS: u64 = 1_000_000_000;

const _: () = assert!(size_of::<HopKey>() == 40 && size_of::<HopSlot>() == 64);

/// What a FIB lookup of ours is given but the ports and the length (see [`CachedHop`]):
/// the key of a slot of `NEXT_HOPS`. With the ports the cache would hold a hop per flow
/// and miss on every new one; without, a route that chooses by port (`ip rule ...
/// sport/dport`, multipath hashing on ports: `fib_multipath_hash_policy` 1) is followed per
/// source, destination and protocol, for a second at a time. The default policies hash
/// addresses (and, for IPv6, the protocol), which the key holds.
///
/// Five words, in the order of [`next_hop_slot`]: the source address (two), the
/// destination address (two), and `ingress | protocol << 32`. An empty slot's last word is
/// 0, which no packet's is (no interface has index 0).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct HopKey([u64; 5]);

impl HopKey {
    /// The key of a lookup for `pkt` from `src` to `dst`, its words put together in
    /// registers. (Written to memory a byte or two at a time and read back as words, as it
    /// once was, each word's load waited for the stores before it to land, a
    /// store-forwarding stall: a fifth of a tracked packet's time in `route`.)
    #[inline(always)]
    fn of(ctx: &XdpContext, pkt: &Packet, src: &Endpoint, dst: &Endpoint) -> HopKey {
        let ingress = ctx.ingress_ifindex() as u32;
        HopKey([
            address_word(src, 0),
            address_word(src, 1),
            address_word(dst, 0),
            address_word(dst, 1),
            u64::from(ingress) | u64::from(pkt.key.proto) << 32,
        ])
    }

    /// The slot of `NEXT_HOPS` this key has.
    #[inline(always)]
    fn slot(&self) -> u32 {
        next_hop_slot(self.0)
    }

    /// Whether `other` is the same key, word by word.
    #[inline(always)]
    fn same_as(&self, other: &HopKey) -> bool {
        (0..5).all(|i| self.0[i] == other.0[i])
    }
}

/// Word `i` (0 or 1) of `at`'s address as memory holds it (little-endian), read two bytes
/// at a time: an endpoint is 2-byte aligned, and the BPF target loads nothing wider from
/// an address it cannot prove aligned.
#[inline(always)]
fn address_word(at: &Endpoint, i: usize) -> u64 {
    let halves = at.addr.as_ptr() as *const u16;
    (0..4).fold(0, |word, k| {
        // SAFETY: `addr` is 16 bytes at the start of a 2-byte aligned Endpoint; `i` is 0
        // or 1 and `k` below 4 (constants after unrolling), so half 4i + k is inside it.
        let half = unsafe { halves.add(4 * i + k).read() };
        word | u64::from(half) << (16 * k)
    })
}

/// A direct hop the FIB gave, with its way's MTU (a longer packet asks the FIB, which
/// says too big) and until when it is used ([`ticks`]).
#[repr(C)]
pub struct CachedHop {
    ifindex: u32,
    expires: u32,
    mtu: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
    _pad: [u8; 2],
}

/// [`Packet::now_or_coarse`] in units of 2^20 ns (about a millisecond), in 32 bits: it
/// wraps every 52 days, so times are compared by their wrapping difference.
#[inline(always)]
fn ticks(pkt: &Packet) -> u32 {
    (pkt.now_or_coarse() >> 20) as u32
}

/// A slot of `NEXT_HOPS`: a direct-mapped cache, one per CPU. A key whose slot another
/// holds replaces it (and its next packet asks the FIB); an empty slot's key has ingress
/// 0, which no packet has. Per CPU, a slot is only ever written and read by the program
/// running on that CPU, to completion, so a read never sees half of a write.
#[repr(C)]
pub struct HopSlot {
    key: HopKey,
    hop: CachedHop,
}

/// Writes this lookup's key into the CPU's `HOP_SCRATCH` (where [`remember_hop`] finds it
/// after a miss), and to `hop` the direct hop kept for it, if one is kept, fresh, and its
/// way's MTU takes the packet. The key is written as whole words and read back as the same
/// words, so each load takes its value straight from the store before it. Inlined into
/// `route`, and into `process` before it calls `route` for a tracked packet: a hit costs
/// no subprogram call and return (some 20 ns on a CPU whose returns go through the
/// kernel's return thunks); `remember_hop`, which only a miss needs, is not inlined.
#[inline(always)]
pub fn cached_hop(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &Endpoint,
    dst: &Endpoint,
    hop: &mut Hop,
) -> bool {
    let Some(scratch) = HOP_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a one-entry per-CPU array; an XDP program runs to
    // completion on its CPU, so no other run touches it meanwhile.
    let key = unsafe { &mut *scratch };
    *key = HopKey::of(ctx, pkt, src, dst);
    let Some(slot) = NEXT_HOPS.get_ptr_mut(key.slot()) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else touches it meanwhile.
    let slot = unsafe { &mut *slot };
    if !slot.key.same_as(key) {
        return false;
    }
    let cached = &slot.hop;
    if cached.expires.wrapping_sub(ticks(pkt)) as i32 <= 0 {
        // Expired: forgotten, so that it cannot seem fresh again once the clock, in ticks,
        // has come round (2^31 ticks, some 26 days, on) while nothing took its slot.
        slot.key.0[4] = 0;
        return false;
    }
    if pkt.tot_len > cached.mtu {
        return false;
    }
    *hop = Hop::Direct {
        ifindex: cached.ifindex,
        smac: cached.smac,
        dmac: cached.dmac,
    };
    true
}

/// Keeps the direct hop a successful lookup (`params`) gave, for [`HOP_CACHE_NS`], under
/// the key [`cached_hop`] wrote for the same lookup a moment before.
#[inline(never)]
fn remember_hop(pkt: &Packet, params: &FibParams) {
    let Some(scratch) = HOP_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `cached_hop`: this CPU's slot, which nothing else touches meanwhile.
    let key = unsafe { &*scratch };
    let Some(slot) = NEXT_HOPS.get_ptr_mut(key.slot()) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, as above.
    let slot = unsafe { &mut *slot };
    slot.key = *key;
    let hop = &mut slot.hop;
    hop.ifindex = params.ifindex;
    hop.smac = params.smac;
    hop.dmac = params.dmac;
    hop._pad = [0; 2];
    // The way's MTU: a successful lookup that checked a length (XDP's always do) puts it
    // where the length was (Linux 5.12 and later).
    // SAFETY: the union's member a lookup with an MTU check writes.
    hop.mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    hop.expires = ticks(pkt).wrapping_add((HOP_CACHE_NS >> 20) as u32);
}

/// The next hop of a rewritten packet.
pub enum Hop {
    /// Send it ourselves: out of `ifindex`, with these MACs.
    Direct {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Hand it to the tc program, which sends it on (out of `ifindex`, as it asks the FIB
    /// too) through the kernel's neighbour output; `reason` says why we could not send it
    /// ourselves.
    Handoff { ifindex: u32, reason: Reason },
    /// Leave it to the kernel's stack (MACs untouched, so the kernel still takes it as
    /// addressed to this host), for the given reason. `ifindex` is what the FIB said.
    Kernel { ifindex: u32, reason: Reason },
    /// Larger than the MTU of the way out of `ifindex`. The sender hears it
    /// (`icmp::too_big`) when DF is set or the kernel would not take the packet's new
    /// source (`answers_too_big` in main.rs); else it goes to the kernel's stack, which
    /// fragments it, as a `Kernel` hop does.
    TooBig { ifindex: u32, mtu: u16 },
}

impl Hop {
    /// No hop yet: what a [`route`] that fails leaves.
    pub const NONE: Hop = Hop::Kernel {
        ifindex: 0,
        reason: Reason::PassFibOther,
    };

    /// How much the rewrite lowers the TTL: by one when xlb or the tc program sends the
    /// packet, not at all when the kernel's stack forwards it (it lowers it itself).
    #[inline(always)]
    pub fn ttl_decrement(&self) -> u8 {
        match self {
            Hop::Direct { .. } | Hop::Handoff { .. } => 1,
            Hop::Kernel { .. } | Hop::TooBig { .. } => 0,
        }
    }

    /// The interface the packet leaves by, as the FIB says.
    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        match self {
            Hop::Direct { ifindex, .. }
            | Hop::Handoff { ifindex, .. }
            | Hop::Kernel { ifindex, .. }
            | Hop::TooBig { ifindex, .. } => *ifindex,
        }
    }
}

/// A FIB lookup for a packet from `src` to `dst` that came in on the packet's interface.
/// With a non-zero `tot_len`, the kernel also checks it against the route's MTU. Fills in
/// `params` (the caller's, so two lookups share one block on the stack) and returns the
/// helper's code.
#[inline(always)]
fn fib(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &Endpoint,
    dst: &Endpoint,
    tot_len: u16,
    params: &mut FibParams,
) -> u32 {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    *params = unsafe { core::mem::zeroed() };
    params.l4_protocol = pkt.key.proto;
    params.sport = u16::from_ne_bytes(src.port);
    params.dport = u16::from_ne_bytes(dst.port);
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    if pkt.v6 {
        params.family = AF_INET6;
        // Byte for byte into the unions (16 bytes each), with no copy on the stack between.
        // SAFETY: both members are 16-byte arrays of plain integers.
        unsafe {
            *(&mut params.__bindgen_anon_3 as *mut _ as *mut [u8; 16]) = src.addr;
            *(&mut params.__bindgen_anon_4 as *mut _ as *mut [u8; 16]) = dst.addr;
        }
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.v4_octets());
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst.v4_octets());
    }

    // SAFETY: `params` is a valid, initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut c_void,
            params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    rc as u32
}

/// Looks up the next hop for the packet as it will be after its rewrite to `src` → `dst`,
/// and writes it to `hop`.
///
/// Errors: `DropUnreachable` when the FIB says blackhole, unreachable or prohibit.
///
/// Not inlined: its 64-byte FIB parameter block then lives in a frame of its own, which is
/// never on the stack at the same time as `conntrack::create`'s. Writes `hop` rather than
/// returning it: returned by value, the result goes through memory and LLVM may leave a
/// pointer into the caller's stack in R0 at the exit, which the verifier refuses ("cannot
/// return stack pointer to the caller").
#[inline(never)]
pub fn route(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &Endpoint,
    dst: &Endpoint,
    hop: &mut Hop,
) -> Result<(), Reason> {
    if cached_hop(ctx, pkt, src, dst, hop) {
        return Ok(());
    }
    // SAFETY: plain data, filled in by `fib`.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    let rc = fib(ctx, pkt, src, dst, pkt.tot_len, &mut params);
    // Each arm writes its hop in place: a hop built first and copied whole would copy the
    // bytes its kind leaves undefined, which the verifier refuses to read.
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // Only interfaces xlb attached to are in the devmap; the tc program sends to
            // the others through the kernel.
            if DEVMAP.get(params.ifindex).is_none() {
                *hop = Hop::Handoff {
                    ifindex: params.ifindex,
                    reason: Reason::ForwardKernelOutput,
                };
            } else {
                *hop = Hop::Direct {
                    ifindex: params.ifindex,
                    smac: params.smac,
                    dmac: params.dmac,
                };
                remember_hop(pkt, &params);
            }
        }
        // The kernel fills in the egress interface also when the neighbour is missing
        // (since Linux 5.10).
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            *hop = Hop::Handoff {
                ifindex: params.ifindex,
                reason: Reason::ForwardResolveNeighbour,
            }
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return Err(Reason::DropUnreachable);
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: the lookup filled in the MTU member of the union for this code.
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            // The kernel stops before it names the egress interface; ask again without the
            // MTU check for it (too-big packets are rare).
            fib(ctx, pkt, src, dst, 0, &mut params);
            *hop = Hop::TooBig {
                ifindex: params.ifindex,
                mtu,
            };
        }
        // Local delivery, forwarding disabled, ...: the kernel decides.
        _ => {
            *hop = Hop::Kernel {
                ifindex: params.ifindex,
                reason: Reason::PassFibOther,
            }
        }
    }
    Ok(())
}

/// The interface packets from the other end of a way out of `ifindex` arrive on, as XDP sees
/// them: `ifindex` itself when it is one of xlb's interfaces; 0 (unknown: the first packet
/// that comes tells, see `conntrack::lookup`) when it is not, such as a VLAN device, whose
/// packets XDP sees on the parent interface.
#[inline(always)]
pub fn arrival_ifindex(ifindex: u32) -> u32 {
    if DEVMAP.get(ifindex).is_some() {
        ifindex
    } else {
        0
    }
}

/// Whether a packet that came in now arrived where packets expected on interface `ifindex`
/// do (0: anywhere, not known yet; see [`arrival_ifindex`]).
///
/// Not inlined: it keeps its caller's frame (`icmp::error`'s, on the stack with the FIB
/// lookup's) as it was.
#[inline(never)]
pub fn arrives_here(ctx: &XdpContext, ifindex: u32) -> bool {
    ifindex == 0 || ifindex == ctx.ingress_ifindex() as u32
}

/// Whether a packet from `src` to `dst` that came in where `pkt` did passes the strict
/// reverse-path rule (rp_filter = 1): `src` routes back out of that interface. A host's own
/// address does not (the FIB says "local", and the kernel drops such a source as a
/// martian). Asked for a tracked flow's packet that arrives on another interface than the
/// flow's packets did (its own addresses), and for a packet too big for its way out whose
/// source xlb rewrites (the addresses it would have). No MTU check (`tot_len` 0): the way
/// back may have a smaller MTU. With a multipath route the FIB names one of its paths, where
/// rp_filter accepts any: a flow whose packets come in by several paths of one route may be
/// refused on some.
#[inline(never)]
pub fn routes_back(ctx: &XdpContext, pkt: &Packet, src: &Endpoint, dst: &Endpoint) -> bool {
    // SAFETY: plain data, filled in by `fib`.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    let rc = fib(ctx, pkt, dst, src, 0, &mut params);
    matches!(rc, BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH)
        && params.ifindex == ctx.ingress_ifindex() as u32
}

/// Marks a frame for a handoff before it is rewritten ([`handoff_mark`]); other hops need
/// nothing, and pay for no call.
#[inline(always)]
pub fn prepare(ctx: &XdpContext, hop: &Hop) -> Result<(), Reason> {
    if let Hop::Handoff { .. } = hop {
        mark_handoff(ctx)?;
    }
    Ok(())
}

/// Sends a rewritten packet to `hop` (readied by [`prepare`]): out of an interface, or to
/// the kernel (a handoff's, marked for the tc program, too).
#[inline(always)]
pub fn send(ctx: &XdpContext, hop: Hop) -> Result<Reason, Reason> {
    let (ifindex, smac, dmac) = match hop {
        Hop::Kernel { reason, .. } | Hop::Handoff { reason, .. } => return Ok(reason),
        Hop::TooBig { .. } => return Ok(Reason::PassFibOther),
        Hop::Direct {
            ifindex,
            smac,
            dmac,
        } => (ifindex, smac, dmac),
    };
    set_macs(ctx, smac, dmac)?;
    // SAFETY: a presence check; the value is not read.
    if ifindex == ctx.ingress_ifindex() as u32 && unsafe { NO_XDP_TX.get(ifindex) }.is_none() {
        return Ok(Reason::ForwardTx);
    }
    DEVMAP
        .redirect(ifindex, 0)
        .map(|_| Reason::ForwardRedirect)
        .map_err(|_| Reason::DropRedirectFailed)
}

/// Readies a rewritten frame's Ethernet header for `hop`: a VLAN tag the frame came with
/// goes (the frame's start moves 4 bytes on, so the tag's inner EtherType becomes the
/// Ethernet header's; [`send`] writes the MACs) when xlb sends it, itself (out of its own
/// interfaces, which are untagged) or by a handoff (the way out's VLAN device, if it is one,
/// tags it with its own VLAN; a plain interface must not send the ingress tag). Only a frame
/// left to the kernel's stack keeps it, so the kernel takes it as it came.
///
/// Inlined, for the untagged frame's two tests; the work of a tagged one is not (the hot
/// path's frame, `xlb`'s, has no bytes to spare).
#[inline(always)]
pub fn untag_for(ctx: &XdpContext, pkt: &Packet, hop: &Hop) -> Result<(), Reason> {
    if !pkt.tagged() || matches!(hop, Hop::Kernel { .. } | Hop::TooBig { .. }) {
        return Ok(());
    }
    untag(ctx)
}

/// Removes the VLAN tag behind the MACs (see [`untag_for`]).
#[inline(never)]
fn untag(ctx: &XdpContext) -> Result<(), Reason> {
    let eth: *mut [u8; ETH_LEN + 2] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the MACs, the EtherType and the tag's first two bytes are
    // inside the frame.
    let eth = unsafe { &mut *eth };
    if u16::from_ne_bytes([eth[12], eth[13]]) != ETH_P_8021Q_BE {
        return Ok(());
    }
    // The MACs move 4 bytes on, over the tag's EtherType and TCI, last byte first: a
    // handoff keeps them (the kernel takes the frame as addressed to this host).
    let mut i = ETH_LEN - 2;
    while i > 0 {
        i -= 1;
        eth[i + VLAN_LEN] = eth[i];
    }
    // SAFETY: the helper moves the frame's start within the frame, or fails cleanly.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VLAN_LEN as i32) } != 0 {
        return Err(Reason::DropInternal);
    }
    Ok(())
}

/// Marks a frame for the tc program ([`handoff_mark`]): its destination MAC, and the data
/// plane's secret as source MAC. Not inlined: the mark is built in a frame of its own, not
/// in the hot path's.
#[inline(never)]
fn mark_handoff(ctx: &XdpContext) -> Result<(), Reason> {
    let settings = CONFIG.get(0).ok_or(Reason::DropInternal)?;
    set_macs(ctx, settings.handoff_secret, handoff_mark::DMAC)
}

/// Writes the next hop's MACs into the frame's Ethernet header.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the Ethernet header is inside the frame.
    unsafe {
        (*eth).dst_addr = dmac;
        (*eth).src_addr = smac;
    }
    Ok(())
}
