//! Connection tracking: one `CONNTRACK` entry per flow direction, created together on a
//! flow's first packet, so a flow keeps its backend and SNAT port even when the Maglev table
//! changes under it.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by-value keys would be copied onto the 512-byte BPF stack, which is nearly full"
)]

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    hash::{flow_hash, snat_port},
    maps::{
        DIR_TO_BACKEND, DIR_TO_CLIENT, Endpoint, FlowKey, NO_BACKEND, NatEntry, SNAT_PORT_PROBES,
        Service, ServiceKey,
    },
    reason::Reason,
};

use crate::{BACKENDS, CONFIG, CONNTRACK, CREATE_SCRATCH, MAGLEV, SERVICES};

/// `create`'s working space, one per CPU (see `CREATE_SCRATCH` in main.rs).
#[repr(C)]
pub struct Scratch {
    forward: NatEntry,
    reverse: NatEntry,
    reverse_key: FlowKey,
}

const EEXIST: i32 = 17;

/// The rewrite for a tracked flow direction, copied out of the map, after marking the
/// entry as seen now.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<NatEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // Read the clock only on a hit: most packets that miss are not ours.
    let now = now();
    // SAFETY: the pointer is into a preallocated map value, valid for this program run; an
    // LRU eviction racing with us can at worst give a stale entry for this one packet. The
    // timestamp store is one aligned u64 write; CPUs racing on it all write "about now".
    unsafe {
        (*entry).last_seen_ns = now;
        Some(*entry)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `NatEntry::last_seen_ns`.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// The entry for `key`, without touching its timestamp.
#[inline(always)]
fn peek(key: &FlowKey) -> Option<NatEntry> {
    // SAFETY: copied out at once, as in `lookup`.
    unsafe { CONNTRACK.get(key).copied() }
}

/// Idle for longer than `timeout_ns` at `now`. A timestamp a hair ahead of `now` (written
/// by another CPU) is not idle.
#[inline(always)]
fn idle(entry: &NatEntry, now: u64, timeout_ns: u64) -> bool {
    now > entry.last_seen_ns && now - entry.last_seen_ns > timeout_ns
}

/// The service a packet is addressed to (its destination and protocol), if any.
#[inline(always)]
pub fn service(key: &FlowKey) -> Option<Service> {
    let skey = ServiceKey {
        vip: key.dst,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; services are only replaced whole by userspace.
    unsafe { SERVICES.get(&skey).copied() }
}

/// Creates both directions of a new flow to `service` and returns the forward rewrite.
///
/// The backend comes from the service's Maglev slice at `hash % maglev_size`. The SNAT port
/// is probed in the order of `lb_common::hash::snat_port`: the reverse entry (backend → SNAT:port) is inserted with
/// `BPF_NOEXIST`, which is atomic, so two CPUs can never hand out the same port to two flows.
///
/// Errors: `DropNoBackend`, `DropSnatPortsExhausted`, `DropConntrackInsert`, and
/// `DropInternal` when the control plane's tables disagree.
///
/// Not inlined: a flow's first packet is the cold path, and as a BPF subprogram its locals
/// get a frame of their own instead of adding to the hot path's share of the 512-byte stack.
#[inline(never)]
pub fn create(key: &FlowKey, service: &Service) -> Result<NatEntry, Reason> {
    let cfg = CONFIG.get(0).ok_or(Reason::DropInternal)?;
    if cfg.maglev_size == 0 || cfg.snat_port_count == 0 {
        return Err(Reason::DropInternal);
    }
    let hash = flow_hash(key, cfg.hash_seed);

    let slot = service.id * cfg.maglev_size + (hash as u32) % cfg.maglev_size;
    let backend_id = *MAGLEV.get(slot).ok_or(Reason::DropInternal)?;
    if backend_id == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;
    let now = now();

    let scratch = CREATE_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's slot of a one-entry per-CPU array. An XDP program runs to
    // completion on its CPU (softirq), so no other run touches the slot meanwhile.
    let Scratch {
        forward,
        reverse,
        reverse_key,
    } = unsafe { &mut *scratch };
    *forward = NatEntry {
        src: Endpoint {
            addr: service.snat,
            port: [0; 2],
        },
        dst: backend.endpoint,
        service_id: service.id,
        backend_id,
        direction: DIR_TO_BACKEND,
        last_seen_ns: now,
    };
    *reverse = NatEntry {
        src: key.dst,
        dst: key.src,
        service_id: service.id,
        backend_id,
        direction: DIR_TO_CLIENT,
        last_seen_ns: now,
    };
    let timeout_ns = cfg.idle_timeout_ns(key.proto);

    for probe in 0..SNAT_PORT_PROBES {
        let port = snat_port(hash, probe, cfg.snat_port_first, cfg.snat_port_count);
        forward.src.port = port.to_be_bytes();
        *reverse_key = FlowKey {
            src: forward.dst,
            dst: forward.src,
            proto: key.proto,
            _pad: 0,
        };
        match CONNTRACK.insert(&*reverse_key, &*reverse, BPF_NOEXIST as u64) {
            Ok(()) => return insert_forward(key, forward, reverse_key),
            Err(e) if e == -EEXIST => {
                let Some(held) = CONNTRACK.get_ptr(&*reverse_key) else {
                    continue;
                };
                // SAFETY: a preallocated map value, read in place (a copy would cost 56
                // bytes of the 512-byte stack); a racing eviction can only make the read
                // stale, which the inserts below settle (they are atomic).
                let held = unsafe { &*held };
                // Taken by this very flow, whose forward entry the LRU evicted while its
                // reverse one survived: keep the port the backend knows.
                if held.same_rewrite(reverse) {
                    return CONNTRACK
                        .insert(key, &*forward, BPF_ANY as u64)
                        .map(|()| *forward)
                        .map_err(|_| Reason::DropConntrackInsert);
                }
                // Taken by a flow idle past its timeout: free the port and try it again.
                if idle(held, now, timeout_ns)
                    && reclaim(held, reverse_key, now, timeout_ns)
                    && CONNTRACK
                        .insert(&*reverse_key, &*reverse, BPF_NOEXIST as u64)
                        .is_ok()
                {
                    return insert_forward(key, forward, reverse_key);
                }
            }
            Err(_) => return Err(Reason::DropConntrackInsert),
        }
    }
    Err(Reason::DropSnatPortsExhausted)
}

/// Removes an idle flow that holds the SNAT port of `reverse_key`: its reverse entry
/// (`held`) and, if it still points at this port and is idle too, its forward entry.
/// Returns false, leaving both, when the forward direction is still active.
#[inline(always)]
fn reclaim(held: &NatEntry, reverse_key: &FlowKey, now: u64, timeout_ns: u64) -> bool {
    // The old flow's forward key: client → VIP, which its reverse entry rewrites back to.
    let old_forward_key = FlowKey {
        src: held.dst,
        dst: held.src,
        proto: reverse_key.proto,
        _pad: 0,
    };
    if let Some(old) = CONNTRACK.get_ptr(&old_forward_key) {
        // SAFETY: read in place, as `held` in `create`.
        let old = unsafe { &*old };
        // The client may have started a new flow (another port) since: leave that one.
        if old.src == reverse_key.dst && old.dst == reverse_key.src {
            if !idle(old, now, timeout_ns) {
                return false;
            }
            let _ = CONNTRACK.remove(&old_forward_key);
        }
    }
    let _ = CONNTRACK.remove(reverse_key);
    true
}

/// Inserts the forward entry once its reverse entry is in place. If another CPU created the
/// same flow in the meantime (two packets of a new flow at once), its entries win and ours
/// is withdrawn.
#[inline(always)]
fn insert_forward(
    key: &FlowKey,
    forward: &NatEntry,
    reverse_key: &FlowKey,
) -> Result<NatEntry, Reason> {
    match CONNTRACK.insert(key, forward, BPF_NOEXIST as u64) {
        Ok(()) => {
            crate::stats::count_new_flow(forward);
            Ok(*forward)
        }
        Err(_) => {
            let _ = CONNTRACK.remove(reverse_key);
            peek(key).ok_or(Reason::DropConntrackInsert)
        }
    }
}
