//! The connection-tracking rules, shared by the XDP program (what a packet tells about its
//! flow), the control plane's sweeper (when a flow expires) and the tests' reference model.
//!
//! A flow has two `CONNTRACK` entries, one per direction (see [`NatEntry`]). Both carry the
//! same [`FlowSeen`]: what each direction of the flow has carried so far. The flow's
//! [`FlowState`] follows from it alone:
//!
//! ```text
//!  TCP:  New ──client's first non-SYN after the backend answered──► Established
//!         │                                                          │ FIN one way
//!         │                                                          ▼
//!         │                                                        Closing ──FIN the other way──► TimeWait
//!         └────────────── RST either way, from any state ──────────────────────────────────────► Closed
//!        A client SYN on a TimeWait or Closed flow (the client reuses its port) starts it anew.
//!  UDP:  New ──the backend's first datagram──► Established
//! ```
//!
//! A flow expires after its state's idle timeout ([`Timeouts`]); the sweeper then removes
//! both entries, which frees the SNAT port. The XDP program never needs the timeouts.

use crate::maps::{DIR_TO_BACKEND, NatEntry, PROTO_TCP};

/// TCP header flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What one direction of a flow has carried. One byte per fact, each only ever set to 1
/// (except when a flow starts anew), so two CPUs recording different facts of one flow at
/// once never undo each other's store.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// A TCP segment with SYN.
    pub syn: u8,
    /// A TCP segment with neither SYN nor RST, or any UDP datagram.
    pub non_syn: u8,
    /// A TCP segment with FIN.
    pub fin: u8,
    /// A TCP segment with RST.
    pub rst: u8,
}
const _: () = assert!(size_of::<Seen>() == 4);

impl Seen {
    /// What a packet of protocol `proto` with TCP flags `tcp_flags` (0 for UDP) proves
    /// about its direction.
    #[inline(always)]
    pub const fn of_packet(proto: u8, tcp_flags: u8) -> Seen {
        if proto != PROTO_TCP {
            return Seen {
                syn: 0,
                non_syn: 1,
                fin: 0,
                rst: 0,
            };
        }
        let syn = (tcp_flags & TCP_SYN != 0) as u8;
        let rst = (tcp_flags & TCP_RST != 0) as u8;
        Seen {
            syn,
            // An RST proves no handshake: a client answers with one the stray ACK that a
            // backend's TIME_WAIT socket sends to a SYN it does not accept.
            non_syn: (syn | rst) ^ 1,
            fin: (tcp_flags & TCP_FIN != 0) as u8,
            rst,
        }
    }

    /// Whether `facts` holds something this direction has not recorded yet.
    #[inline(always)]
    pub const fn lacks(&self, facts: &Seen) -> bool {
        (facts.syn > self.syn)
            | (facts.non_syn > self.non_syn)
            | (facts.fin > self.fin)
            | (facts.rst > self.rst)
    }

    /// Records `facts` in this direction: one byte store per fact not recorded yet, so a
    /// CPU recording another fact of the same flow at the same moment writes other bytes.
    #[inline(always)]
    pub fn record(&mut self, facts: &Seen) {
        if facts.syn > self.syn {
            self.syn = 1;
        }
        if facts.non_syn > self.non_syn {
            self.non_syn = 1;
        }
        if facts.fin > self.fin {
            self.fin = 1;
        }
        if facts.rst > self.rst {
            self.rst = 1;
        }
    }

    const fn any(&self) -> bool {
        (self.syn | self.non_syn | self.fin | self.rst) != 0
    }
}

/// What both directions of a flow have carried. Both of a flow's entries hold a copy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSeen {
    /// Client → backend.
    pub to_backend: Seen,
    /// Backend → client.
    pub to_client: Seen,
}
const _: () = assert!(size_of::<FlowSeen>() == 8);

impl FlowSeen {
    /// Whether the flow's TCP handshake completed: the client sent a segment without SYN
    /// (or RST) to a backend that had answered. For UDP: the backend answered.
    #[inline(always)]
    pub const fn handshake_done(&self) -> bool {
        self.to_backend.non_syn != 0 && (self.to_client.syn | self.to_client.non_syn) != 0
    }

    /// The direction `dir` ([`DIR_TO_BACKEND`] or the other).
    #[inline(always)]
    pub fn dir(&self, dir: u8) -> &Seen {
        if dir == DIR_TO_BACKEND {
            &self.to_backend
        } else {
            &self.to_client
        }
    }

    /// The direction `dir`, to record in.
    #[inline(always)]
    pub fn dir_mut(&mut self, dir: u8) -> &mut Seen {
        if dir == DIR_TO_BACKEND {
            &mut self.to_backend
        } else {
            &mut self.to_client
        }
    }

    /// A flow whose first packet, going in direction `dir`, carried `facts`.
    #[inline(always)]
    pub fn first(dir: u8, facts: Seen) -> FlowSeen {
        let mut seen = FlowSeen::default();
        *seen.dir_mut(dir) = facts;
        seen
    }

    /// Records a packet going in direction `dir` that carried `facts`. When it starts its
    /// flow anew (`anew`, see [`starts_anew`]), the record starts over from this packet.
    #[inline(always)]
    pub fn record(&mut self, dir: u8, facts: &Seen, anew: bool) {
        if anew {
            *self = FlowSeen::first(dir, *facts);
        } else {
            self.dir_mut(dir).record(facts);
        }
    }
}

/// Where a flow is in its life. The numbers are what `xlb` prints and what the tests compare.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowState {
    /// TCP handshake not complete, or a UDP flow the backend has not answered yet.
    New = 0,
    /// TCP handshake complete, or a UDP flow the backend answered.
    Established = 1,
    /// TCP: one side sent FIN.
    Closing = 2,
    /// TCP: both sides sent FIN; the flow keeps its SNAT port while the backend may still be
    /// in TIME_WAIT.
    TimeWait = 3,
    /// TCP: a side sent RST.
    Closed = 4,
}

impl FlowState {
    pub const ALL: [FlowState; 5] = [
        FlowState::New,
        FlowState::Established,
        FlowState::Closing,
        FlowState::TimeWait,
        FlowState::Closed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowState::New => "new",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::TimeWait => "time_wait",
            FlowState::Closed => "closed",
        }
    }

    /// The state of a flow of protocol `proto` that has carried `seen`.
    pub const fn of(proto: u8, seen: &FlowSeen) -> FlowState {
        let (fwd, rev) = (&seen.to_backend, &seen.to_client);
        if proto != PROTO_TCP {
            return if rev.any() {
                FlowState::Established
            } else {
                FlowState::New
            };
        }
        if (fwd.rst | rev.rst) != 0 {
            FlowState::Closed
        } else if fwd.fin != 0 && rev.fin != 0 {
            FlowState::TimeWait
        } else if (fwd.fin | rev.fin) != 0 {
            FlowState::Closing
        } else if seen.handshake_done() {
            FlowState::Established
        } else {
            FlowState::New
        }
    }
}

/// Whether a packet going in direction `dir` with `tcp_flags` starts its tracked flow anew: a
/// client's SYN (without ACK) on a TCP flow that is over (TimeWait or Closed), which is what
/// a client reusing its source port sends. The flow keeps its backend and SNAT port.
#[inline(always)]
pub fn starts_anew(proto: u8, dir: u8, tcp_flags: u8, seen: &FlowSeen) -> bool {
    proto == PROTO_TCP
        && dir == DIR_TO_BACKEND
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && matches!(
            FlowState::of(proto, seen),
            FlowState::TimeWait | FlowState::Closed
        )
}

/// The XDP program refreshes an entry's `last_seen_ns` only when it is at least this old, or
/// when the packet records something new: most packets then write nothing. The twin's time
/// is refreshed with it only when the packet records something new, or while the flow is
/// `New`: the fresher of a flow's two entries so carries the time of its last packet, either
/// way, to within this much.
pub const REFRESH_NS: u64 = 500_000_000;

/// Idle timeouts per state, in seconds (the `[conntrack]` config section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_closing: u32,
    pub tcp_time_wait: u32,
    pub udp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: 60,
            tcp_established: 7200,
            // A one-sided FIN is a half-close: the other side may still send, after a pause
            // (Linux's conntrack keeps CLOSE_WAIT 60 s).
            tcp_closing: 60,
            tcp_time_wait: 60,
            udp: 60,
        }
    }
}

impl Timeouts {
    /// Seconds a flow of `proto` in `state` may stay idle. A closed (RST) flow keeps its
    /// port for the closing timeout: stray segments still find it, and an RST that was not
    /// the end of the connection does not cut it (its next packets keep it alive).
    pub const fn seconds(&self, proto: u8, state: FlowState) -> u32 {
        if proto != PROTO_TCP {
            return self.udp;
        }
        match state {
            FlowState::New => self.tcp_syn,
            FlowState::Established => self.tcp_established,
            FlowState::Closing | FlowState::Closed => self.tcp_closing,
            FlowState::TimeWait => self.tcp_time_wait,
        }
    }
}

/// How long, at `now_ns`, until `entry` (a flow of `proto`) expires; 0 when it has. Adds
/// [`REFRESH_NS`] to the timeout, so a flow never expires early because of the coarse
/// refresh: it may expire up to that much late.
pub fn remaining_ns(entry: &NatEntry, proto: u8, timeouts: &Timeouts, now_ns: u64) -> u64 {
    let state = FlowState::of(proto, &entry.seen);
    let timeout = timeouts.seconds(proto, state) as u64 * 1_000_000_000 + REFRESH_NS;
    let idle = now_ns.saturating_sub(entry.last_seen_ns);
    timeout.saturating_sub(idle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{DIR_TO_CLIENT, PROTO_UDP};

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;

    /// Plays packets (direction, flags) into a flow, as the XDP program records them.
    fn play(proto: u8, packets: &[(u8, u8)]) -> FlowSeen {
        let mut seen = FlowSeen::default();
        for &(dir, flags) in packets {
            let anew = starts_anew(proto, dir, flags, &seen);
            seen.record(dir, &Seen::of_packet(proto, flags), anew);
        }
        seen
    }

    fn tcp(packets: &[(u8, u8)]) -> FlowState {
        FlowState::of(PROTO_TCP, &play(PROTO_TCP, packets))
    }

    const C: u8 = DIR_TO_BACKEND;
    const B: u8 = DIR_TO_CLIENT;

    /// The RFC 793 connection life, packet by packet.
    #[test]
    fn tcp_lifecycle_follows_the_handshake_and_the_close() {
        assert_eq!(tcp(&[(C, SYN)]), FlowState::New);
        assert_eq!(
            tcp(&[(C, SYN), (C, SYN)]),
            FlowState::New,
            "SYN retransmitted"
        );
        assert_eq!(tcp(&[(C, SYN), (B, SYN_ACK)]), FlowState::New);
        // The third packet of the handshake is what makes it established.
        let est = [(C, SYN), (B, SYN_ACK), (C, ACK)];
        assert_eq!(tcp(&est), FlowState::Established);
        let mut pkts = est.to_vec();
        pkts.push((C, FIN_ACK));
        assert_eq!(tcp(&pkts), FlowState::Closing);
        pkts.push((B, ACK));
        assert_eq!(tcp(&pkts), FlowState::Closing);
        pkts.push((B, FIN_ACK));
        assert_eq!(tcp(&pkts), FlowState::TimeWait);
        pkts.push((C, ACK));
        assert_eq!(tcp(&pkts), FlowState::TimeWait);
        // The server may close first, too.
        assert_eq!(
            tcp(&[(C, SYN), (B, SYN_ACK), (C, ACK), (B, FIN_ACK), (C, FIN_ACK)]),
            FlowState::TimeWait
        );
    }

    #[test]
    fn rst_closes_from_any_state() {
        assert_eq!(
            tcp(&[(C, SYN), (B, RST | ACK)]),
            FlowState::Closed,
            "port closed"
        );
        assert_eq!(tcp(&[(C, SYN), (B, SYN_ACK), (C, RST)]), FlowState::Closed);
        assert_eq!(
            tcp(&[(C, SYN), (B, SYN_ACK), (C, ACK), (C, FIN_ACK), (B, RST)]),
            FlowState::Closed
        );
    }

    /// A spoofed SYN's backend answers, but the handshake never completes.
    #[test]
    fn a_syn_answered_but_never_acked_stays_new() {
        assert_eq!(
            tcp(&[(C, SYN), (B, SYN_ACK), (B, SYN_ACK), (C, SYN)]),
            FlowState::New
        );
    }

    /// A flow whose state was lost comes back with a non-SYN packet: established as soon as
    /// the backend answers it.
    #[test]
    fn a_flow_picked_up_mid_stream_is_established_once_answered() {
        assert_eq!(tcp(&[(C, ACK)]), FlowState::New);
        assert_eq!(tcp(&[(C, ACK), (B, ACK)]), FlowState::Established);
    }

    #[test]
    fn a_client_syn_starts_a_finished_flow_anew() {
        let done = play(
            PROTO_TCP,
            &[(C, SYN), (B, SYN_ACK), (C, ACK), (C, FIN_ACK), (B, FIN_ACK)],
        );
        assert!(starts_anew(PROTO_TCP, C, SYN, &done));
        assert!(!starts_anew(PROTO_TCP, B, SYN, &done), "only the client");
        assert!(!starts_anew(PROTO_TCP, C, SYN_ACK, &done));
        let closed = play(PROTO_TCP, &[(C, SYN), (B, RST)]);
        assert!(starts_anew(PROTO_TCP, C, SYN, &closed));
        let live = play(PROTO_TCP, &[(C, SYN), (B, SYN_ACK), (C, ACK)]);
        assert!(
            !starts_anew(PROTO_TCP, C, SYN, &live),
            "a live flow is not restarted"
        );
        assert!(!starts_anew(PROTO_UDP, C, 0, &live));
        let again = play(
            PROTO_TCP,
            &[(C, SYN), (B, RST), (C, SYN), (B, SYN_ACK), (C, ACK)],
        );
        assert_eq!(FlowState::of(PROTO_TCP, &again), FlowState::Established);
    }

    /// A backend's TIME_WAIT socket answers a SYN on a reused 4-tuple with a plain ACK, the
    /// client resets and sends its SYN again: the flow starts anew, but no connection had
    /// been made.
    #[test]
    fn a_reset_attempt_was_no_connection() {
        let reset = play(PROTO_TCP, &[(C, SYN), (B, ACK), (C, RST)]);
        assert_eq!(FlowState::of(PROTO_TCP, &reset), FlowState::Closed);
        assert!(!reset.handshake_done());
        assert!(starts_anew(PROTO_TCP, C, SYN, &reset));
        let done = play(PROTO_TCP, &[(C, SYN), (B, SYN_ACK), (C, ACK), (C, RST)]);
        assert!(done.handshake_done());
    }

    #[test]
    fn udp_is_established_once_answered() {
        let q = play(PROTO_UDP, &[(C, 0)]);
        assert_eq!(FlowState::of(PROTO_UDP, &q), FlowState::New);
        let a = play(PROTO_UDP, &[(C, 0), (B, 0)]);
        assert_eq!(FlowState::of(PROTO_UDP, &a), FlowState::Established);
        // TCP flag bits in a UDP packet's "flags" mean nothing.
        assert_eq!(
            Seen::of_packet(PROTO_UDP, 0xff),
            Seen::of_packet(PROTO_UDP, 0)
        );
    }

    #[test]
    fn timeouts_follow_the_state() {
        let t = Timeouts {
            tcp_syn: 1,
            tcp_established: 2,
            tcp_closing: 3,
            tcp_time_wait: 4,
            udp: 5,
        };
        assert_eq!(t.seconds(PROTO_TCP, FlowState::New), 1);
        assert_eq!(t.seconds(PROTO_TCP, FlowState::Established), 2);
        assert_eq!(t.seconds(PROTO_TCP, FlowState::Closing), 3);
        assert_eq!(t.seconds(PROTO_TCP, FlowState::Closed), 3);
        assert_eq!(t.seconds(PROTO_TCP, FlowState::TimeWait), 4);
        assert_eq!(t.seconds(PROTO_UDP, FlowState::New), 5);
        assert_eq!(t.seconds(PROTO_UDP, FlowState::Established), 5);

        let entry = NatEntry {
            seen: play(PROTO_TCP, &[(C, SYN), (B, SYN_ACK), (C, ACK)]),
            last_seen_ns: 10_000_000_000,
            ..NatEntry::default()
        };
        let timeout = 2_000_000_000 + REFRESH_NS;
        assert_eq!(remaining_ns(&entry, PROTO_TCP, &t, 10_000_000_000), timeout);
        assert_eq!(
            remaining_ns(&entry, PROTO_TCP, &t, 11_000_000_000),
            timeout - 1_000_000_000
        );
        assert_eq!(
            remaining_ns(&entry, PROTO_TCP, &t, 10_000_000_000 + timeout),
            0
        );
        // A timestamp a hair ahead of "now" (written by another CPU) is not idle at all.
        assert_eq!(remaining_ns(&entry, PROTO_TCP, &t, 9_000_000_000), timeout);
    }

    #[test]
    fn lacks_says_when_a_packet_records_something_new() {
        let est = Seen {
            syn: 1,
            non_syn: 1,
            fin: 0,
            rst: 0,
        };
        assert!(!est.lacks(&Seen::of_packet(PROTO_TCP, ACK)));
        assert!(!est.lacks(&Seen::of_packet(PROTO_TCP, SYN)));
        assert!(est.lacks(&Seen::of_packet(PROTO_TCP, FIN_ACK)));
        assert!(est.lacks(&Seen::of_packet(PROTO_TCP, RST)));
        assert!(Seen::default().lacks(&Seen::of_packet(PROTO_UDP, 0)));
    }
}
