//! Per-CPU counters: packets per [`Reason`], and packets, bytes and flows per service and
//! per backend. Userspace sums the CPUs.

use aya_ebpf::maps::PerCpuArray;
use lb_common::{
    maps::{DIR_TO_BACKEND, FlowStats, Rewrite},
    reason::Reason,
};

use crate::{BACKEND_STATS, REASONS, SERVICE_STATS};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(counter) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it, and the program is not reentrant.
        unsafe { *counter += 1 };
    }
}

/// Counts one packet of a tracked flow against its service and its backend.
#[inline(always)]
pub fn count_flow_packet(entry: &Rewrite, frame_len: u32) {
    let frame_len = frame_len as u64;
    let to_backend = entry.direction == DIR_TO_BACKEND;
    let add = |s: &mut FlowStats| {
        if to_backend {
            s.packets_in += 1;
            s.bytes_in += frame_len;
        } else {
            s.packets_out += 1;
            s.bytes_out += frame_len;
        }
    };
    update(&SERVICE_STATS, entry.service_id, add);
    update(&BACKEND_STATS, entry.backend_id, add);
}

/// Counts a flow created for `entry`'s service and backend.
#[inline(always)]
pub fn count_new_flow(entry: &Rewrite) {
    let add = |s: &mut FlowStats| s.flows += 1;
    update(&SERVICE_STATS, entry.service_id, add);
    update(&BACKEND_STATS, entry.backend_id, add);
}

// Each lookup gets its own null check: when the two were iterated together, LLVM merged the
// checks into `ptr | ptr`, which the verifier rejects ("pointer |= pointer prohibited").
#[inline(always)]
fn update(array: &PerCpuArray<FlowStats>, index: u32, f: impl Fn(&mut FlowStats)) {
    if let Some(stats) = array.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it, and the program is not reentrant.
        f(unsafe { &mut *stats });
    }
}
