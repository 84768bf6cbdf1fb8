//! QUIC connection-ID routing of new flows (see `lb_common::quic`): a short-header packet
//! of a QUIC service goes to the backend whose id its connection ID carries.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    hash::flow_hash,
    maps::{BackendEntry, PROTO_UDP, ServiceEntry},
    quic,
};

use crate::{BACKENDS, CONFIG, QUIC_SERVERS, parse};

/// The backend the packet's connection ID names, with the flow's hash; `None` when the
/// service is not QUIC, or the packet names no backend of it.
#[inline(always)]
pub fn backend(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    service: &ServiceEntry,
) -> Option<(u32, &'static BackendEntry, u64)> {
    if service.flags & quic::SERVICE_QUIC == 0 || pkt.key.proto != PROTO_UDP {
        return None;
    }
    // The UDP header is 8 bytes; the payload's first four follow (bounds-checked), if the
    // datagram has them: Ethernet padding after a shorter one is no part of it.
    if pkt.l4_off() + 8 + 4 > pkt.l3_off() + pkt.tot_len as usize {
        return None;
    }
    let bytes = parse::ptr_at::<[u8; 4]>(ctx, pkt.l4_off() + 8).ok()?;
    // SAFETY: ptr_at checked the four bytes lie within the packet.
    let server = quic::server_id(unsafe { *bytes })?;
    // SAFETY: a map value, valid for the run.
    let backend_id = *unsafe { QUIC_SERVERS.get(quic::key(service.id, server)) }?;
    let backend = BACKENDS.get(backend_id)?;
    if backend.service_id != service.id {
        return None;
    }
    let cfg = CONFIG.get(0)?;
    Some((backend_id, backend, flow_hash(&pkt.key, cfg.hash_seed)))
}
