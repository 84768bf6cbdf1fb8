//! Where a rewritten packet goes: the kernel FIB picks the egress interface and both MACs;
//! XDP_TX when that is the interface the packet came in on, a devmap redirect otherwise,
//! and the kernel's own stack when the FIB cannot tell us enough.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{maps::NatEntry, reason::Reason};
use network_types::eth::EthHdr;

use crate::{
    DEVMAP,
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;

/// The next hop of a rewritten packet.
pub enum Hop {
    /// Send it ourselves: out of `ifindex`, with these MACs.
    Direct {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Hand it to the kernel (MACs untouched, so the kernel still takes it as addressed to
    /// this host), for the given reason.
    Kernel(Reason),
}

impl Hop {
    /// How much the rewrite lowers the TTL: by one when xlb forwards the packet itself, not
    /// at all when the kernel does, since the kernel decrements it when it forwards.
    #[inline(always)]
    pub fn ttl_decrement(&self) -> u8 {
        match self {
            Hop::Direct { .. } => 1,
            Hop::Kernel(_) => 0,
        }
    }
}

/// Looks up the next hop for the packet as it will be after `entry`'s rewrite.
///
/// Errors: `DropUnreachable` when the FIB says blackhole, unreachable or prohibit.
///
/// Not inlined: its 64-byte FIB parameter block then lives in a frame of its own, which is
/// never on the stack at the same time as `conntrack::create`'s.
#[inline(never)]
pub fn route(ctx: &XdpContext, pkt: &Packet, entry: &NatEntry) -> Result<Hop, Reason> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = pkt.key.proto;
    params.sport = u16::from_ne_bytes(entry.src.port);
    params.dport = u16::from_ne_bytes(entry.dst.port);
    params.__bindgen_anon_1.tot_len = pkt.tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(entry.src.v4_octets());
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(entry.dst.v4_octets());

    // SAFETY: `params` is a valid, initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut c_void,
            &mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // Only interfaces xlb attached to are in the devmap; anything else is the
            // kernel's to route.
            if DEVMAP.get(params.ifindex).is_none() {
                return Ok(Hop::Kernel(Reason::PassFibOther));
            }
            Ok(Hop::Direct {
                ifindex: params.ifindex,
                smac: params.smac,
                dmac: params.dmac,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Hop::Kernel(Reason::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(Reason::DropUnreachable)
        }
        // Local delivery, forwarding disabled, fragmentation needed, ...: the kernel decides.
        _ => Ok(Hop::Kernel(Reason::PassFibOther)),
    }
}

/// Sends a rewritten packet to `hop`.
#[inline(always)]
pub fn send(ctx: &XdpContext, hop: Hop) -> Result<Reason, Reason> {
    let (ifindex, smac, dmac) = match hop {
        Hop::Kernel(reason) => return Ok(reason),
        Hop::Direct {
            ifindex,
            smac,
            dmac,
        } => (ifindex, smac, dmac),
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the Ethernet header is inside the frame.
    unsafe {
        (*eth).dst_addr = dmac;
        (*eth).src_addr = smac;
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(Reason::ForwardTx);
    }
    DEVMAP
        .redirect(ifindex, 0)
        .map(|_| Reason::ForwardRedirect)
        .map_err(|_| Reason::DropRedirectFailed)
}
