//! The tc ingress program's job: a frame the XDP program rewrote but could not send itself
//! arrives here (XDP_PASS) marked in place of its MACs ([`handoff_mark`]) with the
//! interface to leave by, and leaves through the kernel's neighbour output
//! (`bpf_redirect_neigh`), which routes it out of that interface, resolves the next hop's
//! MAC and holds the frame until it is known. Every other frame is left alone.
//!
//! Why not let the kernel's stack forward it: the stack first checks the source, and drops a
//! forwarded packet whose source is one of the host's own addresses (a SNAT address or a VIP
//! on the host) as a martian, and one whose source does not route back the way it came when
//! `rp_filter` is strict. Neither check runs on this path.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_redirect_neigh,
    programs::TcContext,
};
use lb_common::maps::{Handoff, handoff_mark};
use network_types::eth::EthHdr;

use crate::HANDOFFS;

/// Returns the tc verdict: `TC_ACT_UNSPEC` (go on to the next program or the stack) for
/// frames that are not handed off; the helper's verdict (`TC_ACT_REDIRECT`, or
/// `TC_ACT_SHOT` when it refuses) for those that are.
#[inline(always)]
pub fn send(ctx: &TcContext) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + EthHdr::LEN > end {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the check above puts the whole Ethernet header inside the frame.
    let (dmac, smac) = unsafe {
        let eth = start as *const EthHdr;
        ((*eth).dst_addr, (*eth).src_addr)
    };
    let Some(ifindex) = handoff_mark::ifindex(&dmac, &smac) else {
        return TC_ACT_UNSPEC;
    };
    // No next hop given: the kernel routes the frame by its destination, out of `ifindex`.
    // SAFETY: a null `params` with length 0 is the helper's documented "look it up" form.
    let verdict = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32;
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
