//! The tc ingress program's job: a frame the XDP program rewrote but could not send itself
//! arrives here (XDP_PASS) with a [`HandoffMeta`] in its XDP metadata, and leaves through the
//! kernel's neighbour output (`bpf_redirect_neigh`), which resolves the next hop's MAC and
//! holds the frame until it is known. Every other frame is left alone.
//!
//! Why not let the kernel's stack forward it: the stack first checks the source, and drops a
//! forwarded packet whose source is one of the host's own addresses (a SNAT address or a VIP
//! on the host) as a martian, and one whose source does not route back the way it came when
//! `rp_filter` is strict. Neither check runs on this path.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::generated::bpf_redirect_neigh,
    programs::TcContext,
};
use lb_common::maps::{HANDOFF_MAGIC, Handoff, HandoffMeta, is_v4_mapped_words};

use crate::HANDOFFS;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Returns the tc verdict: `TC_ACT_UNSPEC` (go on to the next program or the stack) for
/// frames that are not handed off; the helper's verdict (`TC_ACT_REDIRECT`, or
/// `TC_ACT_SHOT` when it refuses) for those that are.
#[inline(always)]
pub fn send(ctx: &TcContext) -> i32 {
    // SAFETY: `ctx.skb.skb` is the program's context pointer, valid for this run.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta, (*ctx.skb.skb).data) };
    let (meta, data) = (meta as usize, data as usize);
    if meta + size_of::<HandoffMeta>() > data {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the check above puts the whole struct inside the metadata area, which the
    // XDP program wrote 4-byte aligned.
    let m = unsafe { *(meta as *const HandoffMeta) };
    if m.magic != HANDOFF_MAGIC {
        return TC_ACT_UNSPEC;
    }
    let mut params = if is_v4_mapped_words(&m.next_hop) {
        bpf_redir_neigh {
            nh_family: AF_INET,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: m.next_hop[3],
            },
        }
    } else {
        bpf_redir_neigh {
            nh_family: AF_INET6,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv6_nh: m.next_hop,
            },
        }
    };
    // SAFETY: `params` is a valid, initialised struct of the size passed.
    let verdict = unsafe {
        bpf_redirect_neigh(
            m.ifindex,
            &mut params,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    } as i32;
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
