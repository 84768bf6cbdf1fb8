//! QUIC connection-ID routing, for UDP services with `quic = true`.
//!
//! A QUIC client may change its address and port in the middle of a connection (migration,
//! or a NAT rebinding); its packets then carry a 5-tuple conntrack has never seen, and any
//! hashing scheduler may send them to another backend, where the connection dies. But every
//! short-header packet (all of a connection's packets after the handshake) starts with the
//! destination connection ID the *server* chose. So each backend puts its `quic_id` in the
//! connection IDs it issues, in the manner of the IETF QUIC-LB draft's plaintext algorithm,
//! and xlb routes a new flow whose first packet is a short-header one by that id:
//!
//! | UDP payload byte | holds |
//! |---|---|
//! | 0 | QUIC's first byte: `0b01xxxxxx` for a short header (long headers start `1`) |
//! | 1 | the connection ID's first octet: free for the server (QUIC-LB's config-rotation bits; xlb ignores it) |
//! | 2, 3 | the backend's `quic_id`, big-endian, 1 to 65535 |
//! | 4 … | the rest of the connection ID (at least 3 bytes in all), then the packet |
//!
//! A long-header packet (a handshake), an id of 0, or an id no backend of the service has
//! falls back to the service's scheduler, which sends a new connection's handshake packets
//! to one backend as any UDP flow.

/// [`ServiceEntry::flags`](crate::maps::ServiceEntry::flags): route QUIC short-header
/// packets of new flows by the server id in their connection ID.
pub const SERVICE_QUIC: u32 = 1;

/// The server id a QUIC short-header packet carries, from the first four bytes of its UDP
/// payload; `None` for a long header, a packet that is not QUIC, or an id of 0.
#[inline(always)]
pub fn server_id(payload: [u8; 4]) -> Option<u16> {
    let first = payload[0];
    if first & 0x80 != 0 || first & 0x40 == 0 {
        return None;
    }
    let id = u16::from_be_bytes([payload[2], payload[3]]);
    if id == 0 { None } else { Some(id) }
}

/// The key of `QUIC_SERVERS`: a service's id and a server id.
#[inline(always)]
pub fn key(service_id: u32, server_id: u16) -> u64 {
    ((service_id as u64) << 16) | server_id as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_headers_carry_the_server_id() {
        assert_eq!(server_id([0x40, 0x00, 0x00, 0x03]), Some(3));
        assert_eq!(server_id([0x5f, 0xe0, 0x12, 0x34]), Some(0x1234));
        // Long headers (handshakes) and ids of 0 carry none; nor does a first byte without
        // QUIC's fixed bit.
        assert_eq!(server_id([0xc0, 0x00, 0x00, 0x03]), None);
        assert_eq!(server_id([0x40, 0x00, 0x00, 0x00]), None);
        assert_eq!(server_id([0x00, 0x00, 0x00, 0x03]), None);
        assert_ne!(key(1, 3), key(3, 1));
    }
}
