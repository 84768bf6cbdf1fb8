//! Every packet the XDP program sees ends with exactly one [`Reason`]; the program counts it
//! in the per-CPU `REASONS` array, indexed by the reason's number. Userspace prints the same
//! names, so a counter in `xlb stats` reads like the code path that produced it.

/// What happened to a packet, and why. The discriminant is the index into `REASONS`.
///
/// Numbers are part of the map ABI: append new reasons, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Rewritten and sent back out of the interface it came in on (XDP_TX).
    ForwardTx = 0,
    /// Rewritten and redirected to another interface through the devmap (XDP_REDIRECT).
    ForwardRedirect = 1,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, two VLAN tags, ...): handed to the kernel untouched.
    PassNotIp = 2,
    /// IP but neither TCP, UDP nor ICMP (nor ICMPv6), or behind an IPv6 extension header
    /// xlb does not walk (ESP, AH, "no next header"): handed to the kernel untouched.
    PassNotTcpUdp = 3,
    /// TCP/UDP that matches no service, no NAT gateway and no tracked flow: handed to the
    /// kernel untouched.
    PassNoService = 4,
    /// A non-first IPv4 fragment (no L4 header to match on): handed to the kernel.
    PassFragment = 5,
    /// Rewritten, but the FIB has no neighbour entry for the next hop yet: handed to the tc
    /// program ([`handoff_mark`](crate::maps::handoff_mark)), which sends it through the
    /// kernel's neighbour output; that resolves the MAC and holds the frame meanwhile.
    ForwardResolveNeighbour = 6,
    /// Rewritten, but the FIB says the kernel must deal with it (local delivery, forwarding
    /// disabled, the packet is larger than the egress MTU): handed to the kernel to route.
    PassFibOther = 7,
    /// TTL would expire here: handed to the kernel untouched so it answers with ICMP.
    PassTtlExpired = 8,
    /// The frame ends before the Ethernet, IPv4 or L4 header it announces.
    DropTruncated = 9,
    /// IPv4 header that is not valid: version != 4, IHL < 5, or total length inconsistent.
    DropBadIpv4Header = 10,
    /// First fragment of a fragmented packet to a service: xlb does not reassemble.
    DropFragment = 11,
    /// The service has no backend that takes new flows (all weights 0, or none configured).
    DropNoBackend = 12,
    /// Every SNAT source port tried for a new flow was already in use.
    DropSnatPortsExhausted = 13,
    /// The conntrack map refused an insert for another reason than being full (a
    /// kernel-side error).
    DropConntrackInsert = 14,
    /// The FIB says the destination is unreachable, blackholed or prohibited.
    DropUnreachable = 15,
    /// The devmap redirect failed.
    DropRedirectFailed = 16,
    /// A map lookup that cannot fail did (a control-plane bug: inconsistent tables).
    DropInternal = 17,
    /// Rewritten for an egress interface that has no xlb XDP program (not in the devmap):
    /// handed to the tc program, which sends it out of that interface through the kernel.
    ForwardKernelOutput = 18,
    /// A new flow, but the conntrack table holds `[conntrack] entries` flows already. No
    /// tracked flow is ever evicted to make room.
    DropConntrackFull = 19,
    /// A packet of a tracked flow arrived on another interface than the flow's packets do,
    /// and its source does not route back out of that interface: forged, or misrouted.
    DropWrongInterface = 20,
    /// A TCP RST to a service with no tracked flow: there is no connection to reset, and it
    /// must not open one.
    DropRstNoFlow = 21,
    /// A frame that came in with the mark of a frame handed to the tc program
    /// ([`handoff_mark`](crate::maps::handoff_mark)): only the XDP program may make one, or
    /// any neighbour could have the tc program send its frames anywhere.
    DropForgedHandoff = 22,
    /// A new flow, but a map could not allocate an entry for it (memory pressure): a NAT
    /// gateway's UDP mapping (`MAPPINGS` grows with use), or an entry of a conntrack table
    /// pinned by an xlb from before `CONNTRACK` was preallocated.
    DropConntrackNoMemory = 23,
    /// ICMP the data plane neither answers nor translates (an echo request to an address
    /// that is no VIP, a reply, a fragment, any other type): handed to the kernel untouched.
    PassIcmp = 24,
    /// An ICMP error (unreachable, fragmentation needed, time exceeded, parameter problem)
    /// that quotes no tracked flow's packet, or too little of one to tell: handed to the
    /// kernel untouched.
    PassIcmpUntracked = 25,
    /// A new flow to a `dnat` service, but a flow from the same client address and port to
    /// the same backend exists already (the client used one port toward two VIPs that share
    /// the backend): the backend could not tell their replies apart.
    DropDnatTupleTaken = 26,
    /// Larger than the egress MTU, with DF set: answered with ICMP "fragmentation needed"
    /// (the egress MTU, the packet's header quoted), sent to its sender from the address it
    /// sent to, by devmap redirect. The packet itself is not forwarded.
    ForwardIcmpTooBig = 27,
    /// Larger than the egress MTU, with DF set, and the ICMP answer could not be made or
    /// sent (no headroom, no way back to the sender).
    DropTooBig = 28,
    /// A NAT gateway's new UDP flow found its private endpoint mapped, a moment before, by
    /// a first packet of the same endpoint on another CPU: this one is dropped rather than
    /// given a second public endpoint (its sender's next packet takes the mapping).
    DropMappingRace = 29,
    /// IPv6 header that is not valid: version not 6, a payload length of 0 (a jumbogram),
    /// or an IPv4-mapped source or destination address (RFC 4291 2.5.5.2: never on the
    /// wire; it would match an IPv4 service or flow). (A payload the frame does not hold is
    /// `drop/truncated`.)
    DropBadIpv6Header = 30,
    /// More IPv6 extension headers before the L4 header than xlb walks (4), an L4 header
    /// beyond the first 200 bytes of the frame, or a routing header with segments left (the
    /// destination is not the final one): handed to the kernel untouched, not mis-parsed.
    PassIpv6Extensions = 31,
    /// UDP over IPv6 with checksum 0 (RFC 8200 section 8.1 forbids it, tunnels may use it,
    /// RFC 6935) to a service or flow of xlb's: it would have to be sent with checksum 0.
    /// Not xlb's, it goes to the kernel like any other packet.
    DropUdpZeroChecksum = 32,
}

impl Reason {
    /// Number of reasons; the size of the `REASONS` array.
    pub const COUNT: u32 = 33;

    /// All reasons, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::ForwardTx,
        Reason::ForwardRedirect,
        Reason::PassNotIp,
        Reason::PassNotTcpUdp,
        Reason::PassNoService,
        Reason::PassFragment,
        Reason::ForwardResolveNeighbour,
        Reason::PassFibOther,
        Reason::PassTtlExpired,
        Reason::DropTruncated,
        Reason::DropBadIpv4Header,
        Reason::DropFragment,
        Reason::DropNoBackend,
        Reason::DropSnatPortsExhausted,
        Reason::DropConntrackInsert,
        Reason::DropUnreachable,
        Reason::DropRedirectFailed,
        Reason::DropInternal,
        Reason::ForwardKernelOutput,
        Reason::DropConntrackFull,
        Reason::DropWrongInterface,
        Reason::DropRstNoFlow,
        Reason::DropForgedHandoff,
        Reason::DropConntrackNoMemory,
        Reason::PassIcmp,
        Reason::PassIcmpUntracked,
        Reason::DropDnatTupleTaken,
        Reason::ForwardIcmpTooBig,
        Reason::DropTooBig,
        Reason::DropMappingRace,
        Reason::DropBadIpv6Header,
        Reason::PassIpv6Extensions,
        Reason::DropUdpZeroChecksum,
    ];

    /// The metric label: `verdict/why`, e.g. `drop/truncated`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::ForwardTx => "forward/tx",
            Reason::ForwardRedirect => "forward/redirect",
            Reason::PassNotIp => "pass/not_ip",
            Reason::PassNotTcpUdp => "pass/not_tcp_udp",
            Reason::PassNoService => "pass/no_service",
            Reason::PassFragment => "pass/fragment",
            Reason::ForwardResolveNeighbour => "forward/resolve_neighbour",
            Reason::PassFibOther => "pass/fib_other",
            Reason::PassTtlExpired => "pass/ttl_expired",
            Reason::DropTruncated => "drop/truncated",
            Reason::DropBadIpv4Header => "drop/bad_ipv4_header",
            Reason::DropFragment => "drop/fragment",
            Reason::DropNoBackend => "drop/no_backend",
            Reason::DropSnatPortsExhausted => "drop/snat_ports_exhausted",
            Reason::DropConntrackInsert => "drop/conntrack_insert",
            Reason::DropUnreachable => "drop/unreachable",
            Reason::DropRedirectFailed => "drop/redirect_failed",
            Reason::DropInternal => "drop/internal",
            Reason::ForwardKernelOutput => "forward/kernel_output",
            Reason::DropConntrackFull => "drop/conntrack_full",
            Reason::DropWrongInterface => "drop/wrong_interface",
            Reason::DropRstNoFlow => "drop/rst_no_flow",
            Reason::DropForgedHandoff => "drop/forged_handoff",
            Reason::DropConntrackNoMemory => "drop/conntrack_no_memory",
            Reason::PassIcmp => "pass/icmp",
            Reason::PassIcmpUntracked => "pass/icmp_untracked",
            Reason::DropDnatTupleTaken => "drop/dnat_tuple_taken",
            Reason::ForwardIcmpTooBig => "forward/icmp_too_big",
            Reason::DropTooBig => "drop/too_big",
            Reason::DropMappingRace => "drop/mapping_race",
            Reason::DropBadIpv6Header => "drop/bad_ipv6_header",
            Reason::PassIpv6Extensions => "pass/ipv6_extensions",
            Reason::DropUdpZeroChecksum => "drop/udp_zero_checksum",
        }
    }

    /// The XDP action a packet with this reason gets (values of `enum xdp_action`).
    pub const fn xdp_action(self) -> u32 {
        const XDP_DROP: u32 = 1;
        const XDP_PASS: u32 = 2;
        const XDP_TX: u32 = 3;
        const XDP_REDIRECT: u32 = 4;
        match self {
            Reason::ForwardTx => XDP_TX,
            Reason::ForwardRedirect | Reason::ForwardIcmpTooBig => XDP_REDIRECT,
            Reason::PassNotIp
            | Reason::PassNotTcpUdp
            | Reason::PassIpv6Extensions
            | Reason::PassNoService
            | Reason::PassFragment
            | Reason::ForwardResolveNeighbour
            | Reason::ForwardKernelOutput
            | Reason::PassFibOther
            | Reason::PassTtlExpired
            | Reason::PassIcmp
            | Reason::PassIcmpUntracked => XDP_PASS,
            Reason::DropTruncated
            | Reason::DropBadIpv4Header
            | Reason::DropFragment
            | Reason::DropNoBackend
            | Reason::DropSnatPortsExhausted
            | Reason::DropConntrackInsert
            | Reason::DropUnreachable
            | Reason::DropRedirectFailed
            | Reason::DropInternal
            | Reason::DropConntrackFull
            | Reason::DropWrongInterface
            | Reason::DropRstNoFlow
            | Reason::DropConntrackNoMemory
            | Reason::DropDnatTupleTaken
            | Reason::DropTooBig
            | Reason::DropMappingRace
            | Reason::DropBadIpv6Header
            | Reason::DropUdpZeroChecksum
            | Reason::DropForgedHandoff => XDP_DROP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} is out of order in Reason::ALL");
        }
        for a in Reason::ALL {
            for b in Reason::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }
}
