//! Connection tracking: one `CONNTRACK` entry per flow direction, created together on a
//! flow's first packet, so a flow keeps its backend and SNAT port even when the Maglev table
//! changes under it.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by-value keys would be copied on the 512-byte BPF stack, already ~400 bytes deep"
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

use crate::{BACKENDS, CONFIG, CONNTRACK, MAGLEV, SERVICES};

const EEXIST: i32 = 17;

/// The rewrite for a tracked flow direction, copied out of the map.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<NatEntry> {
    // SAFETY: the value is copied out at once; an LRU eviction racing with the copy can at
    // worst give a stale entry for this one packet, never an invalid read (preallocated map).
    unsafe { CONNTRACK.get(key).copied() }
}

/// The service a packet's destination and protocol address, if any.
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
#[inline(always)]
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

    let mut forward = NatEntry {
        src: Endpoint {
            addr: service.snat,
            port: [0; 2],
        },
        dst: backend.endpoint,
        service_id: service.id,
        backend_id,
        direction: DIR_TO_BACKEND,
    };
    let reverse = NatEntry {
        src: key.dst,
        dst: key.src,
        service_id: service.id,
        backend_id,
        direction: DIR_TO_CLIENT,
    };

    for probe in 0..SNAT_PORT_PROBES {
        let port = snat_port(hash, probe, cfg.snat_port_first, cfg.snat_port_count);
        forward.src.port = port.to_be_bytes();
        let reverse_key = FlowKey {
            src: forward.dst,
            dst: forward.src,
            proto: key.proto,
            _pad: 0,
        };
        match CONNTRACK.insert(&reverse_key, &reverse, BPF_NOEXIST as u64) {
            Ok(()) => return insert_forward(key, &forward, &reverse_key),
            Err(e) if e == -EEXIST => {
                // Taken — unless by this very flow, whose forward entry the LRU evicted
                // while its reverse one survived: then keep the port the backend knows.
                if lookup(&reverse_key) == Some(reverse) {
                    return CONNTRACK
                        .insert(key, &forward, BPF_ANY as u64)
                        .map(|()| forward)
                        .map_err(|_| Reason::DropConntrackInsert);
                }
            }
            Err(_) => return Err(Reason::DropConntrackInsert),
        }
    }
    Err(Reason::DropSnatPortsExhausted)
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
            lookup(key).ok_or(Reason::DropConntrackInsert)
        }
    }
}
