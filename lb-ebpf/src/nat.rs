//! The NAT rewrite: addresses, ports, TTL, and the IPv4 and L4 checksums, updated
//! incrementally (RFC 1624) with lb-common's checksum math.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    csum::{replace, replace_udp, sum_words},
    maps::{PROTO_UDP, Rewrite},
    reason::Reason,
};
use network_types::ip::Ipv4Hdr;

use crate::parse::{ETH_LEN, Packet, ptr_at};

/// Rewrites the packet's source to `entry.src` and destination to `entry.dst`, and lowers
/// the TTL by `ttl_decrement`. Precondition: `pkt` came from `parse` on this same frame, and
/// `pkt.ttl > ttl_decrement`.
///
/// Not inlined: its checksum arithmetic would otherwise spill into the hot path's frame,
/// which the 512-byte BPF stack cannot spare (see `process` in main.rs).
#[inline(never)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: &Rewrite,
    ttl_decrement: u8,
) -> Result<(), Reason> {
    let old_src = pkt.key.src.v4_octets();
    let old_dst = pkt.key.dst.v4_octets();
    let new_src = entry.src.v4_octets();
    let new_dst = entry.dst.v4_octets();
    let old_addrs = sum_words(&old_src) + sum_words(&old_dst);
    let new_addrs = sum_words(&new_src) + sum_words(&new_dst);

    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: ptr_at checked that the 20-byte IPv4 header is inside the frame.
    let ip = unsafe { &mut *ip };
    // TTL shares a checksum word with the protocol byte.
    let old_ttl = [pkt.ttl, ip.proto];
    let new_ttl = [pkt.ttl - ttl_decrement, ip.proto];
    let check = replace(
        u16::from_be_bytes(ip.check),
        old_addrs + sum_words(&old_ttl),
        new_addrs + sum_words(&new_ttl),
    );
    ip.check = check.to_be_bytes();
    ip.src_addr = new_src;
    ip.dst_addr = new_dst;
    ip.ttl = new_ttl[0];

    // The L4 checksum covers the pseudo-header addresses and the ports (not the TTL).
    let old_ports = [
        pkt.key.src.port[0],
        pkt.key.src.port[1],
        pkt.key.dst.port[0],
        pkt.key.dst.port[1],
    ];
    let new_ports = [
        entry.src.port[0],
        entry.src.port[1],
        entry.dst.port[0],
        entry.dst.port[1],
    ];
    let old_l4 = old_addrs + sum_words(&old_ports);
    let new_l4 = new_addrs + sum_words(&new_ports);

    let l4_check: *mut [u8; 2] = ptr_at(ctx, pkt.l4_check_off())?;
    // SAFETY: ptr_at checked the two checksum bytes are inside the frame.
    let l4_check = unsafe { &mut *l4_check };
    let old_check = u16::from_be_bytes(*l4_check);
    let new_check = if pkt.key.proto == PROTO_UDP {
        replace_udp(old_check, old_l4, new_l4)
    } else {
        replace(old_check, old_l4, new_l4)
    };
    *l4_check = new_check.to_be_bytes();

    let ports: *mut [u8; 4] = ptr_at(ctx, pkt.l4_off())?;
    // SAFETY: ptr_at checked the four port bytes are inside the frame.
    unsafe { *ports = new_ports };
    Ok(())
}
