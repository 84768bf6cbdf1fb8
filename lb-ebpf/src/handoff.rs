//! The tc ingress program's job: a frame the XDP program rewrote but could not send itself
//! arrives here (XDP_PASS) marked in place of its MACs ([`handoff_mark`]). The program asks
//! the FIB the way the XDP program did (an input lookup on the ingress interface, with the
//! frame's addresses, protocol and ports) and sends the frame to the next hop it names with
//! `bpf_redirect_neigh`, through the kernel's neighbour output, which resolves the next
//! hop's MAC and holds the frame until it is known. Every other frame is left alone.
//!
//! Why not let the kernel's stack forward it: the stack first checks the source, and drops a
//! forwarded packet whose source is one of the host's own addresses (a SNAT address or a VIP
//! on the host) as a martian, and one whose source does not route back the way it came when
//! `rp_filter` is strict. Neither check runs on this path.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_fib_lookup as FibParams, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::maps::{Handoff, PROTO_TCP, PROTO_UDP, handoff_mark};
use network_types::eth::EthHdr;

use crate::{
    CONFIG, HANDOFFS,
    forward::{AF_INET, AF_INET6},
    parse::{ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE},
};

/// Where the IP header starts: the XDP program took any VLAN tag off a handed-off frame.
const L3: usize = ETH_LEN;

/// Returns the tc verdict: `TC_ACT_UNSPEC` (go on to the next program or the stack) for
/// frames that are not handed off; for those that are, the helper's verdict
/// (`TC_ACT_REDIRECT`), or `TC_ACT_SHOT` when the FIB names no next hop.
#[inline(always)]
pub fn send(ctx: &TcContext) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_LEN > end {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the check above puts the whole Ethernet header inside the frame.
    let (dmac, smac) = unsafe {
        let eth = start as *const EthHdr;
        ((*eth).dst_addr, (*eth).src_addr)
    };
    if dmac != handoff_mark::DMAC {
        return TC_ACT_UNSPEC;
    }
    let Some(settings) = CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    // A zero secret is none: the maps' was never written.
    let secret = settings.handoff_secret;
    if smac != secret || secret == [0; 6] {
        return TC_ACT_UNSPEC;
    }
    let verdict = match next_hop(ctx) {
        Some((ifindex, mut nh)) => {
            // SAFETY: `nh` is a valid, initialised struct of the size passed.
            unsafe {
                bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) as i32
            }
        }
        None => TC_ACT_SHOT,
    };
    let outcome = if verdict == TC_ACT_SHOT {
        Handoff::Failed
    } else {
        Handoff::Sent
    };
    if let Some(counter) = HANDOFFS.get_ptr_mut(outcome as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it, and the program is not reentrant.
        unsafe { *counter += 1 };
    }
    verdict
}

/// The interface and next hop the FIB gives for the frame, as it gave the XDP program:
/// `None` when it gives none (the route went away meanwhile, say). An IPv4 route may have
/// an IPv6 gateway, so the next hop's family is the lookup's, not the frame's.
#[inline(never)]
fn next_hop(ctx: &TcContext) -> Option<(u32, bpf_redir_neigh)> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: `ctx.skb.skb` is the program's context pointer, valid for this run.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (proto, l4) = match ctx.load::<u16>(12).ok()? {
        ETH_P_IP_BE => {
            let ihl = usize::from(ctx.load::<u8>(L3).ok()? & 0x0f) * 4;
            params.family = AF_INET;
            params.__bindgen_anon_3.ipv4_src = ctx.load::<u32>(L3 + 12).ok()?;
            params.__bindgen_anon_4.ipv4_dst = ctx.load::<u32>(L3 + 16).ok()?;
            (ctx.load::<u8>(L3 + 9).ok()?, L3 + ihl)
        }
        ETH_P_IPV6_BE => {
            params.family = AF_INET6;
            params.__bindgen_anon_3.ipv6_src = ctx.load::<[u32; 4]>(L3 + 8).ok()?;
            params.__bindgen_anon_4.ipv6_dst = ctx.load::<[u32; 4]>(L3 + 24).ok()?;
            // Behind an extension header the ports are not where this looks: left 0.
            (ctx.load::<u8>(L3 + 6).ok()?, L3 + 40)
        }
        _ => return None,
    };
    params.l4_protocol = proto;
    if proto == PROTO_TCP || proto == PROTO_UDP {
        let ports = ctx.load::<[u16; 2]>(l4).ok()?;
        params.sport = ports[0];
        params.dport = ports[1];
    }
    // SAFETY: `params` is a valid, initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    let nh = if params.family == AF_INET6 {
        bpf_redir_neigh {
            nh_family: u32::from(AF_INET6),
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                // SAFETY: the lookup filled in the IPv6 member of the union.
                ipv6_nh: unsafe { params.__bindgen_anon_4.ipv6_dst },
            },
        }
    } else {
        bpf_redir_neigh {
            nh_family: u32::from(AF_INET),
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                // SAFETY: the lookup filled in the IPv4 member of the union.
                ipv4_nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
            },
        }
    };
    Some((params.ifindex, nh))
}
