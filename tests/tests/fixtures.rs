//! Table-driven tests of the real XDP program with BPF_PROG_TEST_RUN: each case is the
//! packets that set a flow up (`given`), optional changes to the maps (`tamper`), one packet
//! under test (`when`), and what must come of it: the XDP action, the one `REASONS` counter,
//! the output frame (a handoff's marked in its MACs), and the flow's state afterwards.
//!
//! Cases come in suites, one per config. A suite loads the program once (not attached) in
//! the one-namespace lab of `xlb_tests::lab`, with its maps filled by the control plane's
//! own code, so `bpf_fib_lookup` sees a real routing table and real neighbours. Every case
//! starts from the same state: an empty conntrack table and freshly written service tables.
//! So a case's expectations depend on nothing but the case, and any case can run alone.
//!
//! Expected frames are built from scratch with `xlb_tests::packet::Frame` and, for rewritten
//! frames, also with the reference rewrite `nat_rewrite_v4`. Expected SNAT ports come from
//! the flow hash and probe order (lb-common's `flow_hash` / `snat_port`, which the model
//! replays over the case's own flows). Expected states come from the case's table, not from
//! the program. After every case, the conntrack table must hold whole flows only
//! (`lab::check_whole_flows`). Every case runs even when an earlier one fails; the test then
//! fails listing all of them, with hex diffs.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use lb_common::{
    conntrack::FlowState,
    hash::{flow_hash, snat_port},
    maps::{
        Endpoint, FlowKey, MAPPING_PRIVATE, Mapping, MappingKey, NatEntry, PROTO_ICMPV6, PROTO_TCP,
        PROTO_UDP, SNAT_PORT_PROBES, names,
    },
    reason::Reason,
};
use lb_userspace::config::{Checked, SnatPorts};
use xlb_tests::{
    lab::{
        self, BACKEND, BACKEND_MAC, CLIENT, CLIENT_MAC, Iface, NEAR_BACKEND, NEAR_BACKEND_MAC,
        SMALL_MTU, SMALL_MTU_BACKEND, SNAT, UNRESOLVED_BACKEND, VIP, VIP_UNRESOLVED,
    },
    model::{
        echo_reply_v4, echo_reply_v6, echo_rewrite_v4, icmp_error_v4, nat_rewrite, nat_rewrite_v4,
        too_big_v4,
    },
    packet::{
        ETH_HLEN, Frame, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_FRAG_NEEDED, ICMP_TIME_EXCEEDED,
        ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_NEIGHBOUR_SOLICITATION,
        ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, IP_MF, IPV6_DEST_OPTIONS, IPV6_FRAGMENT,
        IPV6_HLEN, IPV6_HOP_BY_HOP, IPV6_ROUTING, L4, PROTO_ICMP, TCP_ACK, TCP_FIN, TCP_PSH,
        TCP_RST, TCP_SYN, arp_request, hex_diff, icmp_echo, icmp_error, icmp_message,
        icmp6_message, summary, tag, untag, verify_checksums,
    },
};

const PREFIX: &str = "xlbfx";

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const VIP_NO_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 101);
const VIP_NEAR: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 102);
const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 104);
const VIP_BLACKHOLE: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 105);
const VIP_DNAT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 106);
const VIP_DNAT_TWIN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 107);
/// A router on the client side, between the clients and xlb.
const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 254);
const SNAT_NEAR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
/// The lab's address on fx1, the interface toward the backends.
const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 1);

/// The maps' contents. Service order = service id; one backend per service, so the Maglev
/// table sends every flow of a service to it and only the SNAT port needs predicting.
const SERVICES_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 251
max_services = 13
max_backends = 16
snat_port_range = [20000, 29999]
hash_seed = 0x5eed1234

[conntrack]
entries = 512

[[service]]   # 0
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"

[[service]]   # 1
vip = "10.10.0.100:53"
protocol = "udp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:5353"

[[service]]   # 2: its only backend takes no new flows
vip = "10.10.0.101:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
weight = 0

[[service]]   # 3: backend behind the interface clients come in on (XDP_TX)
vip = "10.10.0.102:80"
protocol = "tcp"
snat = "10.10.1.1"
[[service.backend]]
address = "10.10.1.3:8080"

[[service]]   # 4: backend without a neighbour entry
vip = "10.10.0.103:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.9:8080"

[[service]]   # 5: backend is an address of the LB itself (the FIB says "local")
vip = "10.10.0.104:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.1:8080"

[[service]]   # 6: backend behind a blackhole route
vip = "10.10.0.105:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.99.0.1:8080"

[[service]]   # 7: dnat, the backend sees the client
vip = "10.10.0.106:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "10.20.1.2:8080"

[[service]]   # 8: dnat, sharing 7's backend
vip = "10.10.0.107:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "10.20.1.2:8080"

[[service]]   # 9: backend behind a route of MTU 576
vip = "10.10.0.108:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.7:8080"

[[service]]   # 10: dnat, backend behind a route of MTU 576
vip = "10.10.0.109:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "10.20.1.7:8080"

[[service]]   # 11: as 9, from a SNAT address routed toward the clients (not the host's)
vip = "10.10.0.110:80"
protocol = "tcp"
snat = "10.10.1.50"
[[service.backend]]
address = "10.20.1.7:8080"

[[service]]   # 12: QUIC; the scheduler sends new flows to 8444 (8443 takes none)
vip = "10.10.0.111:443"
protocol = "udp"
snat = "10.20.0.1"
quic = true
[[service.backend]]
address = "10.20.1.2:8443"
quic_id = 1
weight = 0
[[service.backend]]
address = "10.20.1.2:8444"
quic_id = 2
"#;

/// A single SNAT port: the second flow toward the backend finds no free port.
const ONE_PORT_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 13
max_services = 1
max_backends = 1
snat_port_range = [30000, 30000]
hash_seed = 7

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
"#;

/// Room for one flow only.
const ONE_FLOW_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 13
max_services = 1
max_backends = 1
snat_port_range = [30000, 30099]
hash_seed = 7

[conntrack]
entries = 1

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
"#;

/// A NAT gateway for the client subnet, beside one service.
const GATEWAY_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 13
max_services = 4
max_backends = 2
snat_port_range = [20000, 29999]
hash_seed = 0x5eed1234

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"

[[nat_gateway]]
source = "10.10.1.0/24"
to = "10.20.0.5"
ports = [40000, 40099]
"#;

/// The gateway's public address (see `GATEWAY_TOML`).
const PUBLIC: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 5);

/// A config, and the cases that run against one program loaded with it.
struct Suite {
    name: &'static str,
    config: &'static str,
    cases: fn(&Lab) -> Vec<Case>,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "services",
        config: SERVICES_TOML,
        cases: services_cases,
    },
    Suite {
        name: "one SNAT port",
        config: ONE_PORT_TOML,
        cases: one_port_cases,
    },
    Suite {
        name: "room for one flow",
        config: ONE_FLOW_TOML,
        cases: one_flow_cases,
    },
    Suite {
        name: "NAT gateway",
        config: GATEWAY_TOML,
        cases: gateway_cases,
    },
    Suite {
        name: "IPv6",
        config: IPV6_TOML,
        cases: ipv6_cases,
    },
];

#[test]
fn xdp_program_fixtures() {
    let reports = lab::in_lab(PREFIX, |_| {
        SUITES
            .iter()
            .map(|suite| run_suite(suite).with_context(|| format!("suite {}", suite.name)))
            .collect::<Result<Vec<Report>>>()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    let total: usize = reports.iter().map(|r| r.total).sum();
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    for r in &reports {
        println!("{}", r.summary);
    }
    if !failures.is_empty() {
        panic!(
            "{} of {total} fixtures failed:\n\n{}",
            failures.len(),
            failures
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")
        );
    }
}

/// The lab as a suite's cases see it: its interfaces and the config's data-path settings.
struct Lab {
    fx0: Iface,
    fx1: Iface,
    checked: Checked,
}

impl Lab {
    /// A frame from the client's MAC to fx0.
    fn sent_by_client(&self, frame: Frame) -> Frame {
        frame.with_macs(CLIENT_MAC, self.fx0.mac)
    }

    /// A frame from the backend's MAC to fx1.
    fn sent_by_backend(&self, frame: Frame) -> Frame {
        frame.with_macs(BACKEND_MAC, self.fx1.mac)
    }

    /// MACs of a frame xlb sends to the backend side: (source, destination).
    fn to_backend(&self) -> Option<([u8; 6], [u8; 6])> {
        Some((self.fx1.mac, BACKEND_MAC))
    }

    fn to_client(&self) -> Option<([u8; 6], [u8; 6])> {
        Some((self.fx0.mac, CLIENT_MAC))
    }

    /// `input` of `flow` redirected out of fx1 to the backend, rewritten to
    /// `flow.to_backend`, the flow in `state` afterwards.
    fn redirected_to_backend(&self, input: &Frame, flow: &Flow, state: FlowState) -> Expect {
        forwarded(
            input,
            flow.to_backend,
            XDP_REDIRECT,
            self.to_backend(),
            state,
        )
    }

    /// `input` of `flow` redirected out of fx0 to the client, rewritten to `flow.to_client`,
    /// the flow in `state` afterwards.
    fn redirected_to_client(&self, input: &Frame, flow: &Flow, state: FlowState) -> Expect {
        forwarded(input, flow.to_client, XDP_REDIRECT, self.to_client(), state)
    }

    fn ports(&self) -> Ports {
        Ports {
            cfg: self.checked.settings(),
            ports: self.checked.snat_ports,
            taken: HashSet::new(),
        }
    }
}

/// One packet, arriving on an interface.
#[derive(Clone)]
struct Pkt {
    input: Vec<u8>,
    ingress: Iface,
    /// When set, the program sees only this many bytes of `input` (see `lab::run`).
    linear_len: Option<usize>,
}

fn pkt(frame: &Frame, ingress: Iface) -> Pkt {
    Pkt {
        input: frame.build(),
        ingress,
        linear_len: None,
    }
}

/// What a case's packet must come out as.
enum Output {
    /// Byte-for-byte the input.
    Unchanged,
    /// Rewritten: equal to a frame built from scratch and to the reference rewrite (with
    /// the MACs the program should have set), and with valid checksums.
    Rewritten { built: Vec<u8>, reference: Vec<u8> },
}

struct Expect {
    action: u32,
    reason: Reason,
    output: Output,
    /// The state of the flow the packet's key belongs to, afterwards; `None` asks for no
    /// entry at that key at all.
    state: Option<FlowState>,
}

/// A change to the maps before the packet under test (e.g. lose a conntrack entry).
type Tamper = Box<dyn Fn(&mut Ebpf) -> Result<()>>;

struct Case {
    name: String,
    /// Sent first, in order; each must be counted under its reason.
    given: Vec<(Pkt, Reason)>,
    tamper: Option<Tamper>,
    when: Pkt,
    expect: Expect,
}

/// A case whose given packets must all be redirected (the usual set-up: a flow's packets).
fn case(name: &str, given: Vec<Pkt>, when: Pkt, expect: Expect) -> Case {
    let given = given
        .into_iter()
        .map(|p| (p, Reason::ForwardRedirect))
        .collect();
    Case {
        name: name.to_string(),
        given,
        tamper: None,
        when,
        expect,
    }
}

/// `c` with `given` packets whose reasons are not all a redirect.
fn refused_first(given: Vec<(Pkt, Reason)>, c: Case) -> Case {
    Case { given, ..c }
}

/// A packet the program must pass to the kernel untouched, or drop untouched, creating no
/// flow.
fn untouched(action: u32, reason: Reason) -> Expect {
    Expect {
        action,
        reason,
        output: Output::Unchanged,
        state: None,
    }
}

/// Predicts the SNAT ports the program gives a case's flows: the flow hash and the probe
/// order, skipping ports the case's earlier flows hold.
struct Ports {
    cfg: lb_common::maps::Settings,
    /// The services' SNAT port range.
    ports: SnatPorts,
    /// Reverse keys (backend → SNAT:port) of the flows created so far.
    taken: HashSet<FlowKey>,
}

/// Both directions of a flow: (new source, new destination) of each.
#[derive(Clone, Copy, Debug)]
struct Flow {
    to_backend: (SocketAddrV4, SocketAddrV4),
    to_client: (SocketAddrV4, SocketAddrV4),
}

impl Flow {
    fn snat_port(&self) -> u16 {
        self.to_backend.0.port()
    }
}

impl Ports {
    fn port(
        &self,
        proto: u8,
        client: impl Into<SocketAddr>,
        vip: impl Into<SocketAddr>,
        probe: u32,
    ) -> u16 {
        let key = FlowKey {
            src: Endpoint::from_socket(client.into()),
            dst: Endpoint::from_socket(vip.into()),
            proto,
            _pad: 0,
        };
        snat_port(
            flow_hash(&key, self.cfg.hash_seed),
            probe,
            self.ports.first as u32,
            self.ports.count(),
        )
    }

    /// The flow a first packet client → vip creates toward `backend`, SNATed to `snat`.
    fn flow(
        &mut self,
        proto: u8,
        client: SocketAddrV4,
        vip: SocketAddrV4,
        snat: Ipv4Addr,
        backend: SocketAddrV4,
    ) -> Flow {
        let probes = SNAT_PORT_PROBES.min(self.ports.count());
        for probe in 0..probes {
            let snat = SocketAddrV4::new(snat, self.port(proto, client, vip, probe));
            let reverse_key = FlowKey {
                src: Endpoint::from_socket_v4(backend),
                dst: Endpoint::from_socket_v4(snat),
                proto,
                _pad: 0,
            };
            if self.taken.insert(reverse_key) {
                return Flow {
                    to_backend: (snat, backend),
                    to_client: (vip, client),
                };
            }
        }
        panic!("the model ran out of SNAT ports");
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// `frame` rewritten to `to` (source, destination) with the TTL lowered by
/// `ttl_decrement`, built from scratch.
fn nat_built(frame: &Frame, to: (SocketAddrV4, SocketAddrV4), ttl_decrement: u8) -> Frame {
    Frame {
        src: *to.0.ip(),
        sport: to.0.port(),
        dst: *to.1.ip(),
        dport: to.1.port(),
        ttl: frame.ttl - ttl_decrement,
        ..frame.clone()
    }
}

/// The expected output of `input` rewritten to `to`: from scratch and by the reference
/// rewrite, with MACs `macs` (source, destination) when xlb sends it itself. `None` keeps the
/// input's MACs (the tc program or the kernel sets them). `ttl_decrement` is 1 when xlb or
/// the tc program sends it, 0 when the kernel's stack forwards it.
fn rewritten(
    input: &Frame,
    to: (SocketAddrV4, SocketAddrV4),
    macs: Option<([u8; 6], [u8; 6])>,
    ttl_decrement: u8,
) -> Output {
    let mut built = nat_built(input, to, ttl_decrement);
    let mut reference = nat_rewrite_v4(&input.build(), to.0, to.1, ttl_decrement)
        .unwrap_or_else(|| panic!("the reference rewrite refused {input:?}"));
    if let Some((src, dst)) = macs {
        built = built.with_macs(src, dst);
        set_macs(&mut reference, (src, dst));
    }
    Output::Rewritten {
        built: built.build(),
        reference,
    }
}

/// A packet forwarded by xlb itself to `to`, with `macs`, in `state` afterwards.
fn forwarded(
    input: &Frame,
    to: (SocketAddrV4, SocketAddrV4),
    action: u32,
    macs: Option<([u8; 6], [u8; 6])>,
    state: FlowState,
) -> Expect {
    Expect {
        action,
        reason: if action == XDP_TX {
            Reason::ForwardTx
        } else {
            Reason::ForwardRedirect
        },
        output: rewritten(input, to, macs, 1),
        state: Some(state),
    }
}

/// Writes `macs` (source, destination) into a built frame's Ethernet header.
fn set_macs(frame: &mut [u8], (src, dst): ([u8; 6], [u8; 6])) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}

/// `frame` with the last two bytes of its payload chosen so that, after the rewrite to
/// `to`, the L4 checksum computes to 0 (0xffff on the wire for UDP). The payload must be of
/// even length (so the two bytes form one aligned 16-bit word).
fn zero_checksum_after_rewrite(mut frame: Frame, to: (SocketAddrV4, SocketAddrV4)) -> Frame {
    let n = frame.payload.len();
    assert!(
        n >= 2 && n.is_multiple_of(2),
        "needs an even-length payload"
    );
    frame.payload[n - 2..].fill(0);
    let out = nat_built(&frame, to, 1).build();
    // The checksum is !fold(sum); adding it as a data word makes the sum 0xffff, whose
    // checksum is 0.
    let check = l4_check_of(&out);
    frame.payload[n - 2..].copy_from_slice(&check.to_be_bytes());
    frame
}

/// The L4 checksum field of a TCP/UDP-over-IPv4 frame.
fn l4_check_of(frame: &[u8]) -> u16 {
    let l4 = 14 + ((frame[14] & 0x0f) as usize) * 4;
    let off = l4 + if frame[14 + 9] == PROTO_TCP { 16 } else { 6 };
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

fn l4_check(output: &Output) -> u16 {
    match output {
        Output::Rewritten { built, .. } => l4_check_of(built),
        Output::Unchanged => unreachable!(),
    }
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Frame {
    Frame::tcp(src, dst, flags)
}

/// The cases of the main config.
fn services_cases(lab: &Lab) -> Vec<Case> {
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let mut v = Vec::new();
    let client = sa(CLIENT, 40000);
    let vip = sa(VIP, 80);
    let backend = sa(BACKEND, 8080);
    // The flow most cases build on, and its packets.
    let flow = lab.ports().flow(PROTO_TCP, client, vip, SNAT, backend);
    let port = flow.snat_port();
    let c = |flags: u8| lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), flags));
    let b = |flags: u8| lab.sent_by_backend(tcp((BACKEND, 8080), (SNAT, port), flags));
    let syn = c(TCP_SYN);
    let syn_ack = b(TCP_SYN | TCP_ACK);
    let ack = c(TCP_ACK);
    let handshake = vec![pkt(&syn, fx0), pkt(&syn_ack, fx1), pkt(&ack, fx0)];
    let with = |extra: &[(&Frame, Iface)]| -> Vec<Pkt> {
        let mut h = handshake.clone();
        h.extend(extra.iter().map(|(f, i)| pkt(f, *i)));
        h
    };

    // The handshake, a packet at a time.
    v.push(case(
        "01 TCP SYN client → VIP: SNAT + DNAT, redirected to the backend side; a new flow",
        vec![],
        pkt(&syn, fx0),
        lab.redirected_to_backend(&syn, &flow, FlowState::New),
    ));
    v.push(case(
        "02 SYN-ACK backend → SNAT:port: reverse NAT to the client; still new",
        vec![pkt(&syn, fx0)],
        pkt(&syn_ack, fx1),
        lab.redirected_to_client(&syn_ack, &flow, FlowState::New),
    ));
    v.push(case(
        "03 the client's ACK completes the handshake: established",
        vec![pkt(&syn, fx0), pkt(&syn_ack, fx1)],
        pkt(&ack, fx0),
        lab.redirected_to_backend(&ack, &flow, FlowState::Established),
    ));
    let data = lab.sent_by_client(Frame {
        payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        id: 0x1235,
        ..tcp((CLIENT, 40000), (VIP, 80), TCP_ACK | TCP_PSH)
    });
    v.push(case(
        "03a data of an established flow: same backend and SNAT port",
        handshake.clone(),
        pkt(&data, fx0),
        lab.redirected_to_backend(&data, &flow, FlowState::Established),
    ));

    // Closing.
    let fin = c(TCP_FIN | TCP_ACK);
    let fin_back = b(TCP_FIN | TCP_ACK);
    v.push(case(
        "03b the client's FIN: closing",
        handshake.clone(),
        pkt(&fin, fx0),
        lab.redirected_to_backend(&fin, &flow, FlowState::Closing),
    ));
    v.push(case(
        "03c the backend's FIN after the client's: time-wait",
        with(&[(&fin, fx0)]),
        pkt(&fin_back, fx1),
        lab.redirected_to_client(&fin_back, &flow, FlowState::TimeWait),
    ));
    v.push(case(
        "03d the last ACK keeps time-wait",
        with(&[(&fin, fx0), (&fin_back, fx1)]),
        pkt(&ack, fx0),
        lab.redirected_to_backend(&ack, &flow, FlowState::TimeWait),
    ));
    let rst_back = b(TCP_RST | TCP_ACK);
    v.push(case(
        "03e the backend refuses the SYN with RST: closed",
        vec![pkt(&syn, fx0)],
        pkt(&rst_back, fx1),
        lab.redirected_to_client(&rst_back, &flow, FlowState::Closed),
    ));
    v.push(case(
        "03f the client resets an established flow: closed",
        handshake.clone(),
        pkt(&c(TCP_RST), fx0),
        lab.redirected_to_backend(&c(TCP_RST), &flow, FlowState::Closed),
    ));
    v.push(case(
        "03g a client SYN on a time-wait flow (port reuse) starts it anew: same backend and port",
        with(&[(&fin, fx0), (&fin_back, fx1), (&ack, fx0)]),
        pkt(&syn, fx0),
        lab.redirected_to_backend(&syn, &flow, FlowState::New),
    ));
    v.push(case(
        "03h a SYN retransmitted on an established flow changes nothing",
        handshake.clone(),
        pkt(&syn, fx0),
        lab.redirected_to_backend(&syn, &flow, FlowState::Established),
    ));
    v.push(case(
        "03h2 a FIN of an established flow with its TTL about to expire: to the kernel \
         untouched, and the flow stays established",
        handshake.clone(),
        pkt(
            &Frame {
                ttl: 1,
                ..fin.clone()
            },
            fx0,
        ),
        Expect {
            state: Some(FlowState::Established),
            ..untouched(XDP_PASS, Reason::PassTtlExpired)
        },
    ));
    v.push(case(
        "03i an RST to the VIP with no flow: dropped, and opens none",
        vec![],
        pkt(&c(TCP_RST | TCP_ACK), fx0),
        untouched(XDP_DROP, Reason::DropRstNoFlow),
    ));
    v.push(case(
        "03i2 a SYN to the VIP that comes with the handoff mark: dropped, opens no flow (else \
         the tc program would send it wherever the mark says)",
        vec![],
        pkt(&c(TCP_SYN).with_macs(CLIENT_MAC, lab::HANDOFF_DMAC), fx0),
        untouched(XDP_DROP, Reason::DropForgedHandoff),
    ));
    v.push(case(
        "03j an ACK to the VIP with no flow (state lost): tracked as a new flow, first-choice port",
        vec![],
        pkt(&data, fx0),
        lab.redirected_to_backend(&data, &flow, FlowState::New),
    ));
    let answer = b(TCP_ACK);
    v.push(case(
        "03k ...and once the backend answers it, established",
        vec![pkt(&data, fx0)],
        pkt(&answer, fx1),
        lab.redirected_to_client(&answer, &flow, FlowState::Established),
    ));

    // Who may send what: a host on the client side forging the backend's reply.
    v.push(case(
        "03l the backend's reply forged on the client side (wrong interface): dropped",
        handshake.clone(),
        pkt(
            &lab.sent_by_client(tcp((BACKEND, 8080), (SNAT, port), TCP_ACK)),
            fx0,
        ),
        Expect {
            state: Some(FlowState::Established),
            ..untouched(XDP_DROP, Reason::DropWrongInterface)
        },
    ));

    // A new flow whose first SNAT port another flow holds takes its next probe.
    let mut ports = lab.ports();
    ports.flow(PROTO_TCP, client, vip, SNAT, backend);
    let first = ports.port(PROTO_TCP, client, vip, 0);
    let rival = (41000..=u16::MAX)
        .map(|p| sa(CLIENT, p))
        .find(|c| ports.port(PROTO_TCP, *c, vip, 0) == first)
        .expect("some client port hashes to the same first SNAT port");
    let second = ports.flow(PROTO_TCP, rival, vip, SNAT, backend);
    assert_ne!(second.snat_port(), first);
    let rival_syn = lab.sent_by_client(tcp((CLIENT, rival.port()), (VIP, 80), TCP_SYN));
    v.push(case(
        &format!(
            "04 new flow from port {} whose first SNAT port ({first}) is taken: next probe",
            rival.port()
        ),
        vec![pkt(&syn, fx0)],
        pkt(&rival_syn, fx0),
        lab.redirected_to_backend(&rival_syn, &second, FlowState::New),
    ));

    // A TCP checksum that computes to 0x0000 after the rewrite stays 0x0000.
    let zero = lab
        .ports()
        .flow(PROTO_TCP, sa(CLIENT, 40003), vip, SNAT, backend);
    let padded = lab.sent_by_client(zero_checksum_after_rewrite(
        Frame {
            payload: b"pad\0\0\0".to_vec(),
            ..tcp((CLIENT, 40003), (VIP, 80), TCP_SYN)
        },
        zero.to_backend,
    ));
    let expect = lab.redirected_to_backend(&padded, &zero, FlowState::New);
    assert_eq!(
        l4_check(&expect.output),
        0x0000,
        "the payload was not crafted right"
    );
    v.push(case(
        "05 TCP checksum that becomes 0x0000 after the rewrite",
        vec![],
        pkt(&padded, fx0),
        expect,
    ));

    // The backend is behind the interface the packet came in on.
    let near = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40004),
        sa(VIP_NEAR, 80),
        SNAT_NEAR,
        sa(NEAR_BACKEND, 8080),
    );
    let near_syn = lab.sent_by_client(tcp((CLIENT, 40004), (VIP_NEAR, 80), TCP_SYN));
    v.push(case(
        "06 backend on the ingress interface's subnet: XDP_TX",
        vec![],
        pkt(&near_syn, fx0),
        forwarded(
            &near_syn,
            near.to_backend,
            XDP_TX,
            Some((fx0.mac, NEAR_BACKEND_MAC)),
            FlowState::New,
        ),
    ));

    v.push(Case {
        tamper: Some(Box::new(move |ebpf: &mut Ebpf| {
            lb_userspace::loader::no_xdp_tx(ebpf, fx0.ifindex)
        })),
        ..case(
            "06a the same on a veth marked NO_XDP_TX: redirected back out instead",
            vec![],
            pkt(&near_syn, fx0),
            forwarded(
                &near_syn,
                near.to_backend,
                XDP_REDIRECT,
                Some((fx0.mac, NEAR_BACKEND_MAC)),
                FlowState::New,
            ),
        )
    });

    // Not for us.
    let not_ours = [
        (
            "07 TCP to the LB's own address (no service): passed untouched",
            pkt(
                &lab.sent_by_client(tcp(
                    (CLIENT, 40005),
                    (Ipv4Addr::new(10, 10, 1, 1), 22),
                    TCP_SYN,
                )),
                fx0,
            ),
            Reason::PassNoService,
        ),
        (
            "07a UDP to the VIP's TCP-only port 80 (protocol is part of the service key)",
            pkt(
                &lab.sent_by_client(Frame::udp((CLIENT, 40005), (VIP, 80), b"x")),
                fx0,
            ),
            Reason::PassNoService,
        ),
        (
            "07b ARP request",
            Pkt {
                input: arp_request(CLIENT_MAC, CLIENT, Ipv4Addr::new(10, 10, 1, 1)),
                ingress: fx0,
                linear_len: None,
            },
            Reason::PassNotIp,
        ),
        (
            "07c ICMP echo to an address that is no VIP",
            pkt(
                &lab.sent_by_client(Frame {
                    src: CLIENT,
                    dst: Ipv4Addr::new(10, 10, 1, 1),
                    l4: L4::Other { proto: PROTO_ICMP },
                    payload: icmp_echo(1, 1, b"ping"),
                    ..Frame::default()
                }),
                fx0,
            ),
            Reason::PassIcmp,
        ),
        (
            "07e IGMP",
            pkt(
                &lab.sent_by_client(Frame {
                    src: CLIENT,
                    dst: VIP,
                    l4: L4::Other { proto: 2 },
                    payload: vec![0x11, 0, 0xee, 0xff, 0, 0, 0, 0],
                    ..Frame::default()
                }),
                fx0,
            ),
            Reason::PassNotTcpUdp,
        ),
        (
            "07e TTL 1 to the VIP: passed untouched so the kernel sends time-exceeded; no flow",
            pkt(
                &lab.sent_by_client(Frame {
                    ttl: 1,
                    ..syn.clone()
                }),
                fx0,
            ),
            Reason::PassTtlExpired,
        ),
        (
            "07f non-first fragment (offset 8 × 8 bytes) to the VIP",
            pkt(
                &lab.sent_by_client(Frame {
                    frags: 8,
                    payload: vec![0x42; 32],
                    ..tcp((CLIENT, 40012), (VIP, 80), TCP_ACK)
                }),
                fx0,
            ),
            Reason::PassFragment,
        ),
    ];
    for (name, p, reason) in not_ours {
        v.push(case(name, vec![], p, untouched(XDP_PASS, reason)));
    }

    // Malformed or unusable frames: dropped, untouched.
    let malformed = [
        (
            "08 TCP SYN to the VIP cut inside the TCP header (total length says 40)",
            Frame {
                truncate_to: Some(14 + 20 + 10),
                ..syn.clone()
            },
            Reason::DropTruncated,
        ),
        (
            "08a IPv4 frame cut inside the IPv4 header",
            Frame {
                truncate_to: Some(14 + 12),
                ..syn.clone()
            },
            Reason::DropTruncated,
        ),
        (
            "08b total length too short for a TCP header (frame padded to 60 bytes)",
            Frame {
                tot_len_override: Some(20 + 10),
                pad_to: Some(60),
                ..syn.clone()
            },
            Reason::DropTruncated,
        ),
        (
            "08c IHL 4 (< 5)",
            Frame {
                ihl_override: Some(4),
                ..syn.clone()
            },
            Reason::DropBadIpv4Header,
        ),
        (
            "08d version 6 in an IPv4 EtherType",
            Frame {
                version_override: Some(6),
                ..syn.clone()
            },
            Reason::DropBadIpv4Header,
        ),
        (
            "08e total length 16 (< IHL)",
            Frame {
                tot_len_override: Some(16),
                ..syn.clone()
            },
            Reason::DropBadIpv4Header,
        ),
        (
            "08f first fragment (MF, offset 0) to the VIP",
            Frame {
                frags: IP_MF,
                payload: vec![0x42; 32],
                ..tcp((CLIENT, 40012), (VIP, 80), TCP_ACK)
            },
            Reason::DropFragment,
        ),
        (
            "08g service whose only backend has weight 0",
            tcp((CLIENT, 40013), (VIP_NO_BACKEND, 80), TCP_SYN),
            Reason::DropNoBackend,
        ),
        (
            "08h backend behind a blackhole route: dropped before any flow is created",
            tcp((CLIENT, 40016), (VIP_BLACKHOLE, 80), TCP_SYN),
            Reason::DropUnreachable,
        ),
    ];
    for (name, frame, reason) in malformed {
        v.push(case(
            name,
            vec![],
            pkt(&lab.sent_by_client(frame), fx0),
            untouched(XDP_DROP, reason),
        ));
    }
    // data_in must be at least 14 bytes: the program sees the first 10, the kernel puts
    // the other 4 in a fragment.
    v.push(case(
        "08i 10-byte frame, shorter than an Ethernet header",
        vec![],
        Pkt {
            input: syn.build()[..14].to_vec(),
            ingress: fx0,
            linear_len: Some(10),
        },
        untouched(XDP_DROP, Reason::DropTruncated),
    ));

    // IPv4 options move the L4 header; Ethernet padding stays.
    for (name, port, frame) in [
        (
            "09 SYN with 8 bytes of IPv4 options (IHL 7): L4 rewritten at offset 42",
            40008,
            Frame {
                ip_options: vec![1, 1, 1, 1, 0x94, 0x04, 0, 0], // 4 × NOP, Router Alert
                ..tcp((CLIENT, 40008), (VIP, 80), TCP_SYN)
            },
        ),
        (
            "09a SYN with 40 bytes of IPv4 options (IHL 15, the most): L4 at offset 74",
            40028,
            Frame {
                ip_options: [vec![1; 36], vec![0; 4]].concat(), // 36 × NOP, End of options
                payload: b"data after the longest IPv4 header".to_vec(),
                ..tcp((CLIENT, 40028), (VIP, 80), TCP_SYN)
            },
        ),
        (
            "09b minimum-size frame with 6 bytes of Ethernet padding: padding kept",
            40018,
            Frame {
                pad_to: Some(60),
                ..tcp((CLIENT, 40018), (VIP, 80), TCP_SYN)
            },
        ),
    ] {
        let f = lab
            .ports()
            .flow(PROTO_TCP, sa(CLIENT, port), vip, SNAT, backend);
        let frame = lab.sent_by_client(frame);
        v.push(case(
            name,
            vec![],
            pkt(&frame, fx0),
            lab.redirected_to_backend(&frame, &f, FlowState::New),
        ));
    }

    // UDP, with and without checksum, and a reply.
    let dns = sa(VIP, 53);
    let dns_backend = sa(BACKEND, 5353);
    let udp0 = lab
        .ports()
        .flow(PROTO_UDP, sa(CLIENT, 5000), dns, SNAT, dns_backend);
    let q0 = lab.sent_by_client(Frame {
        l4: L4::Udp { checksum: false },
        ..Frame::udp((CLIENT, 5000), (VIP, 53), b"query without checksum")
    });
    v.push(case(
        "10 UDP to VIP:53 with checksum 0: rewritten, checksum stays 0; a new flow",
        vec![],
        pkt(&q0, fx0),
        lab.redirected_to_backend(&q0, &udp0, FlowState::New),
    ));
    let udp1 = lab
        .ports()
        .flow(PROTO_UDP, sa(CLIENT, 5001), dns, SNAT, dns_backend);
    let q1 = lab.sent_by_client(Frame::udp((CLIENT, 5001), (VIP, 53), b"query"));
    v.push(case(
        "10a UDP to VIP:53 with a checksum: valid after the rewrite",
        vec![],
        pkt(&q1, fx0),
        lab.redirected_to_backend(&q1, &udp1, FlowState::New),
    ));
    let a1 = lab.sent_by_backend(Frame::udp(
        (BACKEND, 5353),
        (SNAT, udp1.snat_port()),
        b"answer!",
    ));
    v.push(case(
        "10b UDP reply backend → SNAT:port: back to the client from VIP:53; established",
        vec![pkt(&q1, fx0)],
        pkt(&a1, fx1),
        lab.redirected_to_client(&a1, &udp1, FlowState::Established),
    ));
    let udpz = lab
        .ports()
        .flow(PROTO_UDP, sa(CLIENT, 5002), dns, SNAT, dns_backend);
    let qz = lab.sent_by_client(zero_checksum_after_rewrite(
        Frame::udp((CLIENT, 5002), (VIP, 53), b"zz\0\0"),
        udpz.to_backend,
    ));
    let expect = lab.redirected_to_backend(&qz, &udpz, FlowState::New);
    assert_eq!(
        l4_check(&expect.output),
        0xffff,
        "the payload was not crafted right"
    );
    v.push(case(
        "10c UDP checksum that computes to 0 after the rewrite: sent as 0xffff",
        vec![],
        pkt(&qz, fx0),
        expect,
    ));

    // QUIC: a short header's connection ID names the backend, but only from inside the
    // datagram. One with a 2-byte payload, padded to Ethernet's minimum with bytes that
    // would read as server id 1 (the backend that takes no new flows), goes by the
    // scheduler.
    let quic_vip = sa(Ipv4Addr::new(10, 10, 0, 111), 443);
    let quic = lab.ports().flow(
        PROTO_UDP,
        sa(CLIENT, 5003),
        quic_vip,
        SNAT,
        sa(BACKEND, 8444),
    );
    let short = lab.sent_by_client(Frame {
        pad_to: Some(60),
        ..Frame::udp((CLIENT, 5003), (*quic_vip.ip(), 443), &[0x40, 0x00])
    });
    // The payload ends at byte 44: its "bytes 2 and 3" are padding.
    let id_in_padding = |bytes: &mut Vec<u8>| bytes[44..46].copy_from_slice(&[0, 1]);
    let mut input = pkt(&short, fx0);
    id_in_padding(&mut input.input);
    let mut expect = lab.redirected_to_backend(&short, &quic, FlowState::New);
    if let Output::Rewritten { built, reference } = &mut expect.output {
        id_in_padding(built);
        id_in_padding(reference);
    }
    v.push(case(
        "10d QUIC: a server id read from the padding after a short datagram is no id",
        vec![],
        input,
        expect,
    ));

    // Where the backend is.
    let unresolved = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40014),
        sa(VIP_UNRESOLVED, 80),
        SNAT,
        sa(UNRESOLVED_BACKEND, 8080),
    );
    let syn_unresolved = lab.sent_by_client(tcp((CLIENT, 40014), (VIP_UNRESOLVED, 80), TCP_SYN));
    v.push(case(
        "11 backend without a neighbour entry: rewritten, TTL lowered, handed to tc: the \
         handoff mark (its MAC, the data plane's secret) in place of the MACs",
        vec![],
        pkt(&syn_unresolved, fx0),
        Expect {
            action: XDP_PASS,
            reason: Reason::ForwardResolveNeighbour,
            output: rewritten(
                &syn_unresolved,
                unresolved.to_backend,
                Some(lab::handoff_macs()),
                1,
            ),
            state: Some(FlowState::New),
        },
    ));
    let local = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40015),
        sa(VIP_LOCAL, 80),
        SNAT,
        sa(LB_BACKEND_SIDE, 8080),
    );
    let syn_local = lab.sent_by_client(tcp((CLIENT, 40015), (VIP_LOCAL, 80), TCP_SYN));
    v.push(case(
        "11a backend is a local address (FIB: not forwarded): rewritten, passed to the stack",
        vec![],
        pkt(&syn_local, fx0),
        Expect {
            action: XDP_PASS,
            reason: Reason::PassFibOther,
            output: rewritten(&syn_local, local.to_backend, None, 0),
            state: Some(FlowState::New),
        },
    ));

    // The Maglev table changes under a tracked flow: the flow keeps its backend and SNAT
    // port through conntrack, while a new flow sees the new table.
    // Service 0 (the config's first, VIP:80/tcp) loses every backend, through the
    // registry, as `xlb backend rm` would do it.
    let mut emptied = lab.checked.clone();
    emptied.services[0].backends.clear();
    let empty_maglev = move |ebpf: &mut Ebpf| -> Result<()> {
        lb_userspace::registry::Registry::load(ebpf, &emptied)?;
        Ok(())
    };
    v.push(Case {
        tamper: Some(Box::new(empty_maglev.clone())),
        ..case(
            "12 Maglev table emptied under a tracked flow: it keeps its backend and SNAT port",
            handshake.clone(),
            pkt(&data, fx0),
            lab.redirected_to_backend(&data, &flow, FlowState::Established),
        )
    });
    v.push(Case {
        tamper: Some(Box::new(empty_maglev)),
        ..case(
            "12a ...while a new flow to that service finds no backend",
            handshake.clone(),
            pkt(
                &lab.sent_by_client(tcp((CLIENT, 40160), (VIP, 80), TCP_SYN)),
                fx0,
            ),
            untouched(XDP_DROP, Reason::DropNoBackend),
        )
    });
    v.extend(icmp_and_dnat_cases(lab));
    v.extend(vlan_cases(lab));
    v
}

/// An ICMP message built from scratch: `payload` from `src` to `dst` with `ttl`.
fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, payload: Vec<u8>) -> Frame {
    Frame {
        src,
        dst,
        ttl,
        l4: L4::Other { proto: PROTO_ICMP },
        payload,
        ..Frame::default()
    }
}

/// The first `len` bytes of `frame`'s IPv4 datagram: what an ICMP error quotes of it.
fn quote(frame: &Frame, len: usize) -> Vec<u8> {
    frame.build()[ETH_HLEN..ETH_HLEN + len].to_vec()
}

/// An ICMP message of `input` sent on by xlb as `built` (from scratch) and as the reference
/// translation says, with `macs` (source, destination).
fn icmp_sent(built: Frame, reference: Vec<u8>, macs: ([u8; 6], [u8; 6])) -> Output {
    let mut reference = reference;
    set_macs(&mut reference, macs);
    Output::Rewritten {
        built: built.with_macs(macs.0, macs.1).build(),
        reference,
    }
}

/// `input` answered with "fragmentation needed" (MTU `SMALL_MTU`), sent back with `macs`:
/// `answer` as built from scratch (the header fields xlb's answer has: TOS 0xc0, ID 0, DF,
/// TTL 64), and the reference `too_big_v4`; the flow in `state` afterwards.
fn answered_too_big(
    input: &Frame,
    answer: Frame,
    macs: ([u8; 6], [u8; 6]),
    state: Option<FlowState>,
) -> Expect {
    Expect {
        action: XDP_REDIRECT,
        reason: Reason::ForwardIcmpTooBig,
        output: icmp_sent(
            Frame {
                tos: 0xc0,
                id: 0,
                ..answer
            },
            too_big_v4(&input.build(), SMALL_MTU).expect("a TCP/UDP frame"),
            macs,
        ),
        state,
    }
}

/// ICMP (pings to a VIP, errors about flows either way, and what is left to the kernel),
/// and the dnat mode.
fn icmp_and_dnat_cases(lab: &Lab) -> Vec<Case> {
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let mut v = Vec::new();
    let to_client = lab.to_client().expect("MACs");
    let to_backend = lab.to_backend().expect("MACs");
    let redirected = |output| Expect {
        action: XDP_REDIRECT,
        reason: Reason::ForwardRedirect,
        output,
        state: None,
    };

    let ping = lab.sent_by_client(icmp(CLIENT, VIP, 64, icmp_echo(7, 1, b"ping")));
    let reply = icmp(
        VIP,
        CLIENT,
        64,
        icmp_message(ICMP_ECHO_REPLY, 0, [0, 7, 0, 1], b"ping"),
    );
    v.push(Case {
        name: "20 ICMP echo to the VIP: answered from the VIP, back out of fx0".into(),
        given: vec![],
        tamper: None,
        when: pkt(&ping, fx0),
        expect: Expect {
            action: XDP_TX,
            reason: Reason::ForwardTx,
            output: icmp_sent(
                reply,
                echo_reply_v4(&ping.build()).expect("an echo request"),
                to_client,
            ),
            state: None,
        },
    });

    // A TCP flow whose backend answers with a segment too big for a link on the client's
    // side; the router there says so to the VIP.
    let client = sa(CLIENT, 40000);
    let flow = lab
        .ports()
        .flow(PROTO_TCP, client, sa(VIP, 80), SNAT, sa(BACKEND, 8080));
    let port = flow.snat_port();
    let syn = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    let mut big = lab.sent_by_backend(tcp((BACKEND, 8080), (SNAT, port), TCP_SYN | TCP_ACK));
    big.payload = (0..1400).map(|i| i as u8).collect();
    // As xlb sent it toward the client, and as the backend sent it but for the TTL xlb
    // lowered: the quote before and after the translation.
    let sent = nat_built(&big, flow.to_client, 1);
    let original = Frame {
        ttl: 63,
        ..big.clone()
    };
    let given = vec![pkt(&syn, fx0), pkt(&big, fx1)];
    for (name, kind, code, len) in [
        (
            "21 fragmentation needed about a reply, quoting 548 bytes: to the backend, from the \
             SNAT address, the quote as the backend sent it",
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            548,
        ),
        (
            "22 time exceeded quoting 8 bytes of TCP (no checksum in the quote)",
            ICMP_TIME_EXCEEDED,
            0,
            28,
        ),
    ] {
        let error = lab.sent_by_client(icmp(
            CLIENT_ROUTER,
            VIP,
            64,
            icmp_error(kind, code, 1280, &quote(&sent, len)),
        ));
        let built = icmp(
            SNAT,
            BACKEND,
            63,
            icmp_error(kind, code, 1280, &quote(&original, len)),
        );
        let reference = icmp_error_v4(
            &error.build(),
            SNAT,
            BACKEND,
            sa(BACKEND, 8080),
            sa(SNAT, port),
            1,
        )
        .expect("an error about a flow");
        v.push(case(
            name,
            given.clone(),
            pkt(&error, fx0),
            redirected(icmp_sent(built, reference, to_backend)),
        ));
    }
    let about_the_flow = |src, len| icmp(src, VIP, 64, icmp_error(3, 4, 1280, &quote(&sent, len)));
    v.push(case(
        "23 an error about no tracked flow: to the kernel",
        vec![],
        pkt(&lab.sent_by_client(about_the_flow(CLIENT_ROUTER, 28)), fx0),
        untouched(XDP_PASS, Reason::PassIcmpUntracked),
    ));
    v.push(case(
        "24 an error quoting less than 8 bytes after the header: to the kernel",
        given.clone(),
        pkt(&lab.sent_by_client(about_the_flow(CLIENT_ROUTER, 27)), fx0),
        untouched(XDP_PASS, Reason::PassIcmpUntracked),
    ));
    v.push(case(
        "25 an error about the flow from a client-side address, arriving on the backend side",
        given.clone(),
        pkt(&lab.sent_by_backend(about_the_flow(CLIENT_ROUTER, 28)), fx1),
        untouched(XDP_DROP, Reason::DropWrongInterface),
    ));
    v.push(case(
        "25b the same from a backend-side address: who sends an error proves nothing",
        given.clone(),
        pkt(
            &lab.sent_by_backend(about_the_flow(Ipv4Addr::new(10, 20, 1, 254), 28)),
            fx1,
        ),
        untouched(XDP_DROP, Reason::DropWrongInterface),
    ));
    v.push(case(
        "25c an error about the flow addressed elsewhere than the quoted packet's source",
        given.clone(),
        pkt(
            &lab.sent_by_client(Frame {
                dst: VIP_NEAR,
                ..about_the_flow(CLIENT_ROUTER, 28)
            }),
            fx0,
        ),
        untouched(XDP_PASS, Reason::PassIcmpUntracked),
    ));
    v.push(case(
        "26 an error about the flow with TTL 1: to the kernel",
        given.clone(),
        pkt(
            &lab.sent_by_client(Frame {
                ttl: 1,
                ..about_the_flow(CLIENT_ROUTER, 28)
            }),
            fx0,
        ),
        untouched(XDP_PASS, Reason::PassTtlExpired),
    ));

    // The backend says a UDP port is unreachable: the client hears it from the VIP.
    let udp_client = sa(CLIENT, 40001);
    let udp = lab
        .ports()
        .flow(PROTO_UDP, udp_client, sa(VIP, 53), SNAT, sa(BACKEND, 5353));
    let query = lab.sent_by_client(Frame::udp((CLIENT, 40001), (VIP, 53), b"query"));
    let sent = nat_built(&query, udp.to_backend, 1);
    let whole = sent.build().len() - ETH_HLEN;
    let error = lab.sent_by_backend(icmp(
        BACKEND,
        SNAT,
        64,
        icmp_error(ICMP_DEST_UNREACH, 3, 0, &quote(&sent, whole)),
    ));
    let original = Frame {
        ttl: 63,
        ..query.clone()
    };
    v.push(case(
        "27 port unreachable from the backend about a datagram: to the client, from the VIP",
        vec![pkt(&query, fx0)],
        pkt(&error, fx1),
        redirected(icmp_sent(
            icmp(
                VIP,
                CLIENT,
                63,
                icmp_error(ICMP_DEST_UNREACH, 3, 0, &quote(&original, whole)),
            ),
            icmp_error_v4(&error.build(), VIP, CLIENT, udp_client, sa(VIP, 53), 1)
                .expect("an error about a flow"),
            to_client,
        )),
    ));

    // A packet too big for the way to its backend (MTU 576).
    let first = |vip: Ipv4Addr| lab.sent_by_client(tcp((CLIENT, 40000), (vip, 80), TCP_SYN));
    // 1040 bytes from CLIENT:40000 to `vip`: 80, DF set or not.
    let big = |vip: Ipv4Addr, df: bool| {
        let mut f = lab.sent_by_client(tcp((CLIENT, 40000), (vip, 80), TCP_ACK));
        f.payload = vec![0x5a; 1000];
        if !df {
            f.frags = 0;
        }
        f
    };
    // "Fragmentation needed" from `vip` to the client, quoting `quoted` bytes of `frame`.
    let too_big = |vip: Ipv4Addr, frame: &Frame, quoted: usize| {
        icmp(
            vip,
            CLIENT,
            64,
            icmp_error(
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
                SMALL_MTU,
                &quote(frame, quoted),
            ),
        )
    };
    // Rewritten toward `to`, and left to the kernel, which fragments it.
    let to_kernel = |frame: &Frame, to| Expect {
        action: XDP_PASS,
        reason: Reason::PassFibOther,
        output: rewritten(frame, to, None, 0),
        state: Some(FlowState::New),
    };
    let vip_small = Ipv4Addr::new(10, 10, 0, 108);
    let df = big(vip_small, true);
    v.push(case(
        "40 too big for the way to the backend, DF set: ICMP fragmentation needed to the \
         client, from the VIP, quoting what it sent",
        vec![pkt(&first(vip_small), fx0)],
        pkt(&df, fx0),
        answered_too_big(
            &df,
            too_big(vip_small, &df, 28),
            to_client,
            Some(FlowState::New),
        ),
    ));
    // A first packet too big, with IP options: the quote takes them in; no flow is made.
    let mut big_syn = lab.sent_by_client(tcp((CLIENT, 40001), (vip_small, 80), TCP_SYN));
    big_syn.payload = vec![0x5a; 1000];
    big_syn.ip_options = vec![1, 1, 1, 1, 1, 1, 1, 0];
    v.push(case(
        "42 a first packet too big, with IP options: answered, quoting them too; no flow",
        vec![],
        pkt(&big_syn, fx0),
        answered_too_big(
            &big_syn,
            too_big(vip_small, &big_syn, 28 + 8),
            to_client,
            None,
        ),
    ));
    // Without DF a router fragments; but the kernel would not forward this one, from a
    // SNAT address that does not route back out of fx0 (rp_filter; or the host's own, a
    // martian): told instead, the client learns the way's MTU all the same.
    let no_df = big(vip_small, false);
    v.push(case(
        "41 the same without DF, fullnat: answered too, not left to a kernel that would \
         drop a packet from the SNAT address",
        vec![pkt(&first(vip_small), fx0)],
        pkt(&no_df, fx0),
        answered_too_big(
            &no_df,
            too_big(vip_small, &no_df, 28),
            to_client,
            Some(FlowState::New),
        ),
    ));
    // dnat keeps the client's source, which the kernel forwards (and fragments).
    let vip_small_dnat = Ipv4Addr::new(10, 10, 0, 109);
    v.push(case(
        "41b too big without DF, dnat: rewritten, to the kernel, which fragments it",
        vec![pkt(&first(vip_small_dnat), fx0)],
        pkt(&big(vip_small_dnat, false), fx0),
        to_kernel(
            &big(vip_small_dnat, false),
            (client, sa(SMALL_MTU_BACKEND, 8080)),
        ),
    ));
    // From a SNAT address that routes back out of fx0, the kernel takes it (and fragments).
    let vip_routed = Ipv4Addr::new(10, 10, 0, 110);
    let routed = lab.ports().flow(
        PROTO_TCP,
        client,
        sa(vip_routed, 80),
        Ipv4Addr::new(10, 10, 1, 50),
        sa(SMALL_MTU_BACKEND, 8080),
    );
    v.push(case(
        "41c the same from a SNAT address that routes back where it came in: rewritten, to \
         the kernel, which fragments it",
        vec![pkt(&first(vip_routed), fx0)],
        pkt(&big(vip_routed, false), fx0),
        to_kernel(&big(vip_routed, false), routed.to_backend),
    ));

    // dnat: the backend sees the client; its replies come back through xlb.
    let syn = lab.sent_by_client(tcp((CLIENT, 40000), (VIP_DNAT, 80), TCP_SYN));
    let dnat = Flow {
        to_backend: (client, sa(BACKEND, 8080)),
        to_client: (sa(VIP_DNAT, 80), client),
    };
    let syn_ack = lab.sent_by_backend(tcp((BACKEND, 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK));
    v.push(case(
        "30 dnat: a SYN to the VIP keeps the client's address and port",
        vec![],
        pkt(&syn, fx0),
        lab.redirected_to_backend(&syn, &dnat, FlowState::New),
    ));
    v.push(case(
        "31 dnat: the backend's reply to the client leaves from the VIP",
        vec![pkt(&syn, fx0)],
        pkt(&syn_ack, fx1),
        lab.redirected_to_client(&syn_ack, &dnat, FlowState::New),
    ));
    v.push(case(
        "32 dnat: the same client port toward another VIP with the same backend is refused",
        vec![pkt(&syn, fx0)],
        pkt(
            &lab.sent_by_client(tcp((CLIENT, 40000), (VIP_DNAT_TWIN, 80), TCP_SYN)),
            fx0,
        ),
        untouched(XDP_DROP, Reason::DropDnatTupleTaken),
    ));
    let sent = nat_built(&syn_ack, dnat.to_client, 1);
    let original = Frame {
        ttl: 63,
        ..syn_ack.clone()
    };
    let error = lab.sent_by_client(icmp(
        CLIENT_ROUTER,
        VIP_DNAT,
        64,
        icmp_error(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1280, &quote(&sent, 40)),
    ));
    v.push(case(
        "33 dnat: fragmentation needed about a reply reaches the backend, from the router (the \
         client's packets keep their source, so its errors do too)",
        vec![pkt(&syn, fx0), pkt(&syn_ack, fx1)],
        pkt(&error, fx0),
        redirected(icmp_sent(
            icmp(
                CLIENT_ROUTER,
                BACKEND,
                63,
                icmp_error(
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1280,
                    &quote(&original, 40),
                ),
            ),
            icmp_error_v4(
                &error.build(),
                CLIENT_ROUTER,
                BACKEND,
                sa(BACKEND, 8080),
                client,
                1,
            )
            .expect("an error about a flow"),
            to_backend,
        )),
    ));
    v
}

/// The gateway's first choice of public port for a first packet `src` → `dst`: the first
/// probe of the flow hash over its range (one address).
fn gateway_port(
    lab: &Lab,
    proto: u8,
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
) -> u16 {
    let key = FlowKey {
        src: Endpoint::from_socket(src.into()),
        dst: Endpoint::from_socket(dst.into()),
        proto,
        _pad: 0,
    };
    snat_port(
        flow_hash(&key, lab.checked.settings().hash_seed),
        0,
        40000,
        100,
    )
}

/// The NAT gateway: flows out of the private network (TCP, UDP with its mapping, pings by
/// identifier) and what stays the kernel's.
fn gateway_cases(lab: &Lab) -> Vec<Case> {
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let mut v = Vec::new();
    let to_backend = lab.to_backend().expect("MACs");
    let to_client = lab.to_client().expect("MACs");

    // TCP: the source becomes the public address and a port of the gateway's range; the
    // destination stays.
    let server = sa(BACKEND, 443);
    let port = gateway_port(lab, PROTO_TCP, sa(CLIENT, 40000), server);
    let public = sa(PUBLIC, port);
    let syn = lab.sent_by_client(tcp((CLIENT, 40000), (BACKEND, 443), TCP_SYN));
    let syn_ack = lab.sent_by_backend(tcp((BACKEND, 443), (PUBLIC, port), TCP_SYN | TCP_ACK));
    v.push(case(
        "01 a private host's SYN to the outside leaves from the public address, port in range",
        vec![],
        pkt(&syn, fx0),
        forwarded(
            &syn,
            (public, server),
            XDP_REDIRECT,
            Some(to_backend),
            FlowState::New,
        ),
    ));
    v.push(case(
        "02 the server's SYN-ACK to the public port goes back to the private host",
        vec![pkt(&syn, fx0)],
        pkt(&syn_ack, fx1),
        forwarded(
            &syn_ack,
            (server, sa(CLIENT, 40000)),
            XDP_REDIRECT,
            Some(to_client),
            FlowState::New,
        ),
    ));

    // UDP: one private endpoint keeps its public endpoint toward a second destination,
    // whatever that one's own hash would pick.
    let dns = sa(BACKEND, 53);
    let other = sa(SMALL_MTU_BACKEND, 53);
    let udp_port = gateway_port(lab, PROTO_UDP, sa(CLIENT, 5000), dns);
    assert_ne!(
        udp_port,
        gateway_port(lab, PROTO_UDP, sa(CLIENT, 5000), other),
        "(harness) pick two destinations whose own first choices differ"
    );
    let first = lab.sent_by_client(Frame::udp((CLIENT, 5000), (BACKEND, 53), b"q1"));
    let second = lab.sent_by_client(Frame::udp((CLIENT, 5000), (SMALL_MTU_BACKEND, 53), b"q2"));
    v.push(case(
        "03 UDP to a second destination keeps the private endpoint's public endpoint (EIM)",
        vec![pkt(&first, fx0)],
        pkt(&second, fx0),
        forwarded(
            &second,
            (sa(PUBLIC, udp_port), other),
            XDP_REDIRECT,
            Some(to_backend),
            FlowState::New,
        ),
    ));
    // A mapping from before the gateway's pool changed (an address it no longer has) is not
    // taken: the endpoint gets one from the pool as it is, its first choice.
    v.push(Case {
        tamper: Some(Box::new(|ebpf: &mut Ebpf| {
            let mut map: HashMap<&mut MapData, MappingKey, Mapping> = ebpf
                .map_mut(names::MAPPINGS)
                .context("map MAPPINGS")?
                .try_into()?;
            let stale = Mapping {
                endpoint: Endpoint::from_socket_v4(sa(Ipv4Addr::new(10, 20, 0, 99), 40005)),
                _pad: [0; 6],
                taken_ns: 1,
            };
            let private = MappingKey {
                endpoint: Endpoint::from_socket_v4(sa(CLIENT, 5000)),
                proto: PROTO_UDP,
                side: MAPPING_PRIVATE,
            };
            map.insert(private, stale, 0)?;
            Ok(())
        })),
        ..case(
            "03a a mapping to an address no longer in the pool is not taken: a fresh one",
            vec![],
            pkt(&first, fx0),
            forwarded(
                &first,
                (sa(PUBLIC, udp_port), dns),
                XDP_REDIRECT,
                Some(to_backend),
                FlowState::New,
            ),
        )
    });
    let answer = lab.sent_by_backend(Frame::udp(
        (SMALL_MTU_BACKEND, 53),
        (PUBLIC, udp_port),
        b"a",
    ));
    v.push(case(
        "04 the second destination's answer reaches the private endpoint",
        vec![pkt(&first, fx0), pkt(&second, fx0)],
        pkt(&answer, fx1),
        forwarded(
            &answer,
            (other, sa(CLIENT, 5000)),
            XDP_REDIRECT,
            Some(to_client),
            FlowState::Established,
        ),
    ));

    // Pings: the identifier is the port.
    let echo_id = gateway_port(lab, PROTO_ICMP, sa(CLIENT, 7), sa(BACKEND, 0));
    let ping = lab.sent_by_client(icmp(CLIENT, BACKEND, 64, icmp_echo(7, 1, b"ping")));
    let ping_out = icmp(PUBLIC, BACKEND, 63, icmp_echo(echo_id, 1, b"ping"));
    let redirected = |output, state| Expect {
        action: XDP_REDIRECT,
        reason: Reason::ForwardRedirect,
        output,
        state: Some(state),
    };
    v.push(case(
        "05 a ping to the outside leaves from the public address with a public identifier",
        vec![],
        pkt(&ping, fx0),
        redirected(
            icmp_sent(
                ping_out.clone(),
                echo_rewrite_v4(&ping.build(), sa(PUBLIC, echo_id), sa(BACKEND, 0), 1)
                    .expect("an echo"),
                to_backend,
            ),
            FlowState::New,
        ),
    ));
    let pong = lab.sent_by_backend(icmp(
        BACKEND,
        PUBLIC,
        64,
        icmp_message(ICMP_ECHO_REPLY, 0, id_seq(echo_id, 1), b"ping"),
    ));
    let pong_in = icmp(
        BACKEND,
        CLIENT,
        63,
        icmp_message(ICMP_ECHO_REPLY, 0, id_seq(7, 1), b"ping"),
    );
    v.push(case(
        "06 its echo reply goes back to the private host with the private identifier",
        vec![pkt(&ping, fx0)],
        pkt(&pong, fx1),
        redirected(
            icmp_sent(
                pong_in,
                echo_rewrite_v4(&pong.build(), sa(BACKEND, 0), sa(CLIENT, 7), 1).expect("an echo"),
                to_client,
            ),
            FlowState::Established,
        ),
    ));
    // A router beyond the gateway says the ping's TTL ran out (mtr, traceroute -I): the
    // private host hears it from that router, quoting its own ping, identifier and all.
    v.push(exceeded_beyond_gateway(
        lab,
        "06a time exceeded about a ping reaches the private host, quoting its own identifier",
        &ping,
        &ping_out,
        (sa(CLIENT, 7), sa(BACKEND, 0)),
    ));
    v.push(case(
        "07 an echo reply for an identifier never handed out is the kernel's",
        vec![],
        pkt(&pong, fx1),
        untouched(XDP_PASS, Reason::PassIcmp),
    ));

    // A router beyond the gateway says a datagram's TTL ran out (a traceroute's probe): the
    // private host hears it from that router, quoting its own datagram.
    v.push(exceeded_beyond_gateway(
        lab,
        "07b time exceeded from a router outside reaches the private host, from that router",
        &first,
        &nat_built(&first, (sa(PUBLIC, udp_port), dns), 1),
        (sa(CLIENT, 5000), dns),
    ));

    // What is not the gateway's.
    let inside = lab.sent_by_client(tcp((CLIENT, 40000), (NEAR_BACKEND, 80), TCP_SYN));
    v.push(case(
        "08 to the private network itself: the kernel's, untranslated",
        vec![],
        pkt(&inside, fx0),
        untouched(XDP_PASS, Reason::PassNoService),
    ));
    let to_host = lab.sent_by_client(tcp((CLIENT, 40000), (LB_BACKEND_SIDE, 22), TCP_SYN));
    v.push(case(
        "09 to the host itself: the kernel's, untranslated, no flow",
        vec![],
        pkt(&to_host, fx0),
        untouched(XDP_PASS, Reason::PassNoService),
    ));
    let from_outside = lab.sent_by_backend(tcp((BACKEND, 40000), (NEAR_BACKEND, 80), TCP_SYN));
    v.push(case(
        "10 from outside the private network: not translated",
        vec![],
        pkt(&from_outside, fx1),
        untouched(XDP_PASS, Reason::PassNoService),
    ));
    let to_vip = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    let service_flow = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40000),
        sa(VIP, 80),
        SNAT,
        sa(BACKEND, 8080),
    );
    v.push(case(
        "11 a private host's packet to a VIP is the service's",
        vec![],
        pkt(&to_vip, fx0),
        lab.redirected_to_backend(&to_vip, &service_flow, FlowState::New),
    ));
    v
}

/// VLAN-tagged frames (one 802.1Q tag): translated like untagged ones; the tag goes when xlb
/// sends the frame out of an interface of its own (the FIB's way out is untagged), and stays
/// when the frame goes to the kernel, which keeps it on its VLAN.
fn vlan_cases(lab: &Lab) -> Vec<Case> {
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let mut v = Vec::new();
    // Priority 1, VLAN 100.
    const TCI: u16 = 0x2064;
    let tagged = |f: &Frame| Frame {
        vlan: Some(TCI),
        ..f.clone()
    };
    let flow = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40000),
        sa(VIP, 80),
        SNAT,
        sa(BACKEND, 8080),
    );
    let syn = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    v.push(case(
        "60 a VLAN-tagged SYN to the VIP: translated, and untagged out of xlb's interface",
        vec![],
        pkt(&tagged(&syn), fx0),
        lab.redirected_to_backend(&syn, &flow, FlowState::New),
    ));
    let syn_ack = lab.sent_by_backend(tcp(
        (BACKEND, 8080),
        (SNAT, flow.snat_port()),
        TCP_SYN | TCP_ACK,
    ));
    v.push(case(
        "61 the backend's untagged answer finds the flow the tagged SYN made",
        vec![pkt(&tagged(&syn), fx0)],
        pkt(&syn_ack, fx1),
        lab.redirected_to_client(&syn_ack, &flow, FlowState::New),
    ));
    // The backend is the host itself: the kernel's, rewritten, with the tag as it came.
    let local = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40015),
        sa(VIP_LOCAL, 80),
        SNAT,
        sa(LB_BACKEND_SIDE, 8080),
    );
    let syn_local = lab.sent_by_client(tcp((CLIENT, 40015), (VIP_LOCAL, 80), TCP_SYN));
    let Output::Rewritten { built, reference } = rewritten(&syn_local, local.to_backend, None, 0)
    else {
        unreachable!("rewritten() rewrites");
    };
    v.push(case(
        "62 a tagged SYN whose backend is the host itself: rewritten, to the kernel, tag kept",
        vec![],
        pkt(&tagged(&syn_local), fx0),
        Expect {
            action: XDP_PASS,
            reason: Reason::PassFibOther,
            output: Output::Rewritten {
                built: tag(&built, TCI),
                reference: tag(&reference, TCI),
            },
            state: Some(FlowState::New),
        },
    ));
    // A handoff (the backend's neighbour unresolved): untagged too, the MACs as they came
    // (the kernel takes it as addressed to this host); a VLAN device on the way out would tag
    // it anew.
    let unresolved = lab.ports().flow(
        PROTO_TCP,
        sa(CLIENT, 40014),
        sa(VIP_UNRESOLVED, 80),
        SNAT,
        sa(UNRESOLVED_BACKEND, 8080),
    );
    let syn_unresolved = lab.sent_by_client(tcp((CLIENT, 40014), (VIP_UNRESOLVED, 80), TCP_SYN));
    v.push(case(
        "62a a tagged SYN handed to tc (neighbour unresolved): untagged, marked for tc",
        vec![],
        pkt(&tagged(&syn_unresolved), fx0),
        Expect {
            action: XDP_PASS,
            reason: Reason::ForwardResolveNeighbour,
            output: rewritten(
                &syn_unresolved,
                unresolved.to_backend,
                Some(lab::handoff_macs()),
                1,
            ),
            state: Some(FlowState::New),
        },
    ));
    // A ping to the VIP: answered, untagged out of fx0 (the FIB's way back to the client).
    let ping = lab.sent_by_client(icmp(CLIENT, VIP, 64, icmp_echo(7, 1, b"ping")));
    let reply = icmp(
        VIP,
        CLIENT,
        64,
        icmp_message(ICMP_ECHO_REPLY, 0, [0, 7, 0, 1], b"ping"),
    );
    v.push(case_tx(
        "63 a tagged ping to the VIP: answered, untagged",
        pkt(&tagged(&ping), fx0),
        icmp_sent(
            reply,
            echo_reply_v4(&ping.build()).expect("an echo request"),
            lab.to_client().expect("MACs"),
        ),
    ));
    // Two tags (QinQ): not parsed, the kernel's.
    let qinq = Frame {
        ethertype: 0x8100,
        ..tagged(&syn)
    };
    v.push(case(
        "64 two VLAN tags (QinQ): to the kernel untouched",
        vec![],
        pkt(&qinq, fx0),
        untouched(XDP_PASS, Reason::PassNotIp),
    ));
    // A tag cut short.
    let cut = Frame {
        truncate_to: Some(16),
        ..tagged(&syn)
    };
    v.push(case(
        "65 a frame that ends inside its VLAN tag: dropped as truncated",
        vec![],
        pkt(&cut, fx0),
        untouched(XDP_DROP, Reason::DropTruncated),
    ));
    v
}

/// A case with no given packets whose packet is sent back out of the interface it came in
/// on (XDP_TX), as `output`, creating no flow.
fn case_tx(name: &str, when: Pkt, output: Output) -> Case {
    Case {
        name: name.to_string(),
        given: vec![],
        tamper: None,
        when,
        expect: Expect {
            action: XDP_TX,
            reason: Reason::ForwardTx,
            output,
            state: None,
        },
    }
}

/// A router beyond the NAT gateway (on fx1) says the TTL of `out` ran out: `out` is what xlb
/// sent for the private host's first packet `sent` (which makes the flow), `inner` that
/// packet's (source, destination) as the host sent it. The error must reach the private
/// host from that router (the gateway's outside keeps its sources), quoting `sent` as it
/// left xlb (TTL lowered), every checksum right.
fn exceeded_beyond_gateway(
    lab: &Lab,
    name: &str,
    sent: &Frame,
    out: &Frame,
    inner: (SocketAddrV4, SocketAddrV4),
) -> Case {
    let router = Ipv4Addr::new(10, 20, 1, 254);
    let quoted = |f: &Frame| {
        let len = f.build().len() - ETH_HLEN;
        icmp_error(ICMP_TIME_EXCEEDED, 0, 0, &quote(f, len))
    };
    let exceeded = lab.sent_by_backend(icmp(router, PUBLIC, 64, quoted(out)));
    let as_left = Frame {
        ttl: sent.ttl - 1,
        ..sent.clone()
    };
    case(
        name,
        vec![pkt(sent, lab.fx0)],
        pkt(&exceeded, lab.fx1),
        Expect {
            action: XDP_REDIRECT,
            reason: Reason::ForwardRedirect,
            output: icmp_sent(
                icmp(router, CLIENT, 63, quoted(&as_left)),
                icmp_error_v4(&exceeded.build(), router, CLIENT, inner.0, inner.1, 1)
                    .expect("an error about a flow"),
                lab.to_client().expect("MACs"),
            ),
            state: Some(FlowState::New),
        },
    )
}

/// An echo's identifier and sequence number, the four bytes after its checksum.
fn id_seq(id: u16, seq: u16) -> [u8; 4] {
    let ([i0, i1], [s0, s1]) = (id.to_be_bytes(), seq.to_be_bytes());
    [i0, i1, s0, s1]
}

/// With a single SNAT port: exhaustion, and a flow whose forward entry was lost while its
/// reverse entry lived on (it must get its old port back).
fn one_port_cases(lab: &Lab) -> Vec<Case> {
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let mut v = Vec::new();
    let client_a = sa(CLIENT, 40000);
    let vip = sa(VIP, 80);
    let a = lab
        .ports()
        .flow(PROTO_TCP, client_a, vip, SNAT, sa(BACKEND, 8080));
    assert_eq!(a.snat_port(), 30000);
    let syn_a = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    let syn_b = lab.sent_by_client(tcp((CLIENT, 40001), (VIP, 80), TCP_SYN));
    v.push(case(
        "01 a flow gets the only SNAT port, 30000",
        vec![],
        pkt(&syn_a, fx0),
        lab.redirected_to_backend(&syn_a, &a, FlowState::New),
    ));
    v.push(case(
        "02 a second flow: no SNAT port left, and no entry",
        vec![pkt(&syn_a, fx0)],
        pkt(&syn_b, fx0),
        untouched(XDP_DROP, Reason::DropSnatPortsExhausted),
    ));
    let reply = lab.sent_by_backend(tcp((BACKEND, 8080), (SNAT, 30000), TCP_SYN | TCP_ACK));
    v.push(refused_first(
        vec![
            (pkt(&syn_a, fx0), Reason::ForwardRedirect),
            (pkt(&syn_b, fx0), Reason::DropSnatPortsExhausted),
        ],
        case(
            "03 the reply to port 30000 goes to the first flow's client",
            vec![],
            pkt(&reply, fx1),
            lab.redirected_to_client(&reply, &a, FlowState::New),
        ),
    ));
    let ack_a = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_ACK));
    let forward_key = FlowKey {
        src: Endpoint::from_socket_v4(client_a),
        dst: Endpoint::from_socket_v4(vip),
        proto: PROTO_TCP,
        _pad: 0,
    };
    v.push(Case {
        tamper: Some(Box::new(move |ebpf: &mut Ebpf| {
            let mut ct: HashMap<&mut MapData, FlowKey, NatEntry> = ebpf
                .map_mut(names::CONNTRACK)
                .context("map CONNTRACK")?
                .try_into()?;
            ct.remove(&forward_key)
                .context("removing the first flow's forward entry")
        })),
        ..case(
            "04 the flow after its forward entry was lost: keeps port 30000",
            vec![pkt(&syn_a, fx0), pkt(&reply, fx1)],
            pkt(&ack_a, fx0),
            lab.redirected_to_backend(&ack_a, &a, FlowState::Established),
        )
    });
    v
}

/// Room for one flow: the second is refused, and the first keeps working.
fn one_flow_cases(lab: &Lab) -> Vec<Case> {
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let vip = sa(VIP, 80);
    let a = lab
        .ports()
        .flow(PROTO_TCP, sa(CLIENT, 40000), vip, SNAT, sa(BACKEND, 8080));
    let syn_a = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    let syn_b = lab.sent_by_client(tcp((CLIENT, 40001), (VIP, 80), TCP_SYN));
    let reply = lab.sent_by_backend(tcp(
        (BACKEND, 8080),
        (SNAT, a.snat_port()),
        TCP_SYN | TCP_ACK,
    ));
    vec![
        case(
            "01 a second flow when the table is full: refused, counted, no entry",
            vec![pkt(&syn_a, fx0)],
            pkt(&syn_b, fx0),
            untouched(XDP_DROP, Reason::DropConntrackFull),
        ),
        refused_first(
            vec![
                (pkt(&syn_a, fx0), Reason::ForwardRedirect),
                (pkt(&syn_b, fx0), Reason::DropConntrackFull),
            ],
            case(
                "02 ...and the first flow still works both ways",
                vec![],
                pkt(&reply, fx1),
                lab.redirected_to_client(&reply, &a, FlowState::New),
            ),
        ),
    ]
}

struct Report {
    total: usize,
    failures: Vec<String>,
    summary: String,
}

/// Loads the program with the suite's config, then runs every case from a clean state.
/// Runs on a thread inside the fixtures' namespace: ifindexes, the devmap and the FIB are
/// per namespace.
fn run_suite(suite: &Suite) -> Result<Report> {
    let checked = lab::checked(suite.config)?;
    let lab::Program {
        mut ebpf, fx0, fx1, ..
    } = lab::load(&checked)?;
    let verified = verified_instructions(&ebpf)?;
    let lab = Lab { fx0, fx1, checked };
    let cases = (suite.cases)(&lab);

    let mut failures = Vec::new();
    let mut summary = format!(
        "suite {} (the verifier checked {verified} instructions):\n",
        suite.name
    );
    // The kernel gives up at a million; what is left is the room for what is still to come
    // (IPv6 on the same paths). A change that eats most of it fails here, not on a kernel
    // with a lower limit.
    if verified > VERIFIER_BUDGET {
        failures.push(format!(
            "suite {}: the verifier checked {verified} instructions, over the budget of \
             {VERIFIER_BUDGET}",
            suite.name
        ));
    }
    for c in &cases {
        let outcome = run_case(&mut ebpf, &lab, c);
        let mark = if outcome.is_ok() { "ok  " } else { "FAIL" };
        summary.push_str(&format!("{mark} {}\n", c.name));
        if let Err(e) = outcome {
            failures.push(format!("suite {}, case {}:\n{e:#}", suite.name, c.name));
        }
    }
    Ok(Report {
        total: cases.len(),
        failures,
        summary,
    })
}

/// The most instructions the verifier may check in the real program (of the kernel's
/// limit of 1,000,000).
const VERIFIER_BUDGET: u32 = 250_000;

/// How many instructions the verifier checked when it loaded the XDP program.
fn verified_instructions(ebpf: &Ebpf) -> Result<u32> {
    let xdp: &aya::programs::Xdp = ebpf
        .program(lb_common::maps::programs::XDP)
        .context("the XDP program")?
        .try_into()?;
    xdp.info()?
        .verified_instruction_count()
        .context("the kernel does not say how many instructions it verified")
}

fn action_name(action: u32) -> String {
    match action {
        0 => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        n => format!("action {n}"),
    }
}

/// The flow key of a frame as sent: a TCP/UDP one's, or an ICMP echo's (by identifier),
/// behind its VLAN tag if it has one.
fn key_of(input: &[u8]) -> Option<FlowKey> {
    match untag(input) {
        Some((plain, _)) => xlb_tests::model::flow_key(&plain),
        None => xlb_tests::model::flow_key(input),
    }
}

fn run_case(ebpf: &mut Ebpf, lab: &Lab, c: &Case) -> Result<()> {
    // The same state for every case: no flows, tables as the config says.
    lab::reset(ebpf, &lab.checked)?;
    for (i, (p, reason)) in c.given.iter().enumerate() {
        let run = lab::run(ebpf, &p.input, p.ingress.ifindex, p.linear_len)
            .with_context(|| format!("given packet {i}"))?;
        if run.counted != [(*reason, 1)] {
            bail!(
                "given packet {i} ({}) should count {}, counted {:?}",
                summary(&p.input),
                reason.name(),
                run.counted
            );
        }
    }
    if let Some(tamper) = &c.tamper {
        tamper(ebpf).context("tampering with the maps")?;
    }
    let run = lab::run(
        ebpf,
        &c.when.input,
        c.when.ingress.ifindex,
        c.when.linear_len,
    )?;
    let e = &c.expect;

    let mut problems = Vec::new();
    if run.action != e.action {
        problems.push(format!(
            "action: expected {}, got {}",
            action_name(e.action),
            action_name(run.action)
        ));
    }
    if run.counted != [(e.reason, 1)] {
        problems.push(format!(
            "REASONS: expected exactly {} +1, counted {:?}",
            e.reason.name(),
            run.counted
        ));
    }
    match &e.output {
        Output::Unchanged => {
            if run.frame != c.when.input {
                problems.push(format!(
                    "output should be the input, unchanged:\n{}",
                    hex_diff(&c.when.input, &run.frame)
                ));
            }
        }
        Output::Rewritten { built, reference } => {
            if built != reference {
                problems.push(format!(
                    "(harness) the frame built from scratch and the reference rewrite \
                     disagree:\n{}",
                    hex_diff(built, reference)
                ));
            }
            if &run.frame != built {
                problems.push(format!(
                    "output differs from the frame built from scratch:\n{}",
                    hex_diff(built, &run.frame)
                ));
            } else if let Err(err) =
                verify_checksums(&untag(&run.frame).map_or(run.frame.clone(), |(p, _)| p))
            {
                problems.push(format!("output checksums: {err}"));
            }
        }
    }
    let entries = lab::conntrack(ebpf)?;
    if let Err(err) = lab::check_whole_flows(&entries) {
        problems.push(format!("conntrack table: {err:#}"));
    }
    if let Some(key) = key_of(&c.when.input) {
        let entry = entries.iter().find(|(k, _)| *k == key).map(|(_, e)| e);
        let state = entry.map(|e| FlowState::of(key.proto, &e.seen));
        // A case that expects no flow also wants no entry from this packet: the table holds
        // only what the given packets made.
        if state != e.state {
            problems.push(format!(
                "flow state afterwards: expected {:?}, got {:?}",
                e.state, state
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "input: {}{}\nexpected: {}, {}\n{}",
        summary(&c.when.input),
        match c.when.linear_len {
            Some(n) => format!(" (the program sees the first {n})"),
            None => String::new(),
        },
        action_name(e.action),
        e.reason.name(),
        problems.join("\n")
    )
}

const IPV6_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 13
max_services = 8
max_backends = 8
snat_port_range = [20000, 29999]
hash_seed = 0x5eed1234

[[service]]
vip = "[2001:db8:10::100]:80"
protocol = "tcp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:20:1::2]:8080"

[[service]]
vip = "[2001:db8:10::100]:53"
protocol = "udp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:20:1::2]:5353"

[[service]]
vip = "[2001:db8:10::101]:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "[2001:db8:20:1::2]:8080"

[[service]]
vip = "[2001:db8:10::103]:80"
protocol = "tcp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:20:1::9]:8080"

[[service]]
vip = "[2001:db8:10::105]:80"
protocol = "tcp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:99::1]:8080"

[[service]]
vip = "[2001:db8:10::107]:80"
protocol = "tcp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:20:1::7]:8080"

# The upper half of the client link goes out through an IPv6 NAT gateway.
[[nat_gateway]]
source = "2001:db8:10:1:8000::/65"
to = "2001:db8:20::5"
ports = [40000, 40099]

# An IPv4 service on the same port: the families do not meet.
[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
"#;

/// The IPv6 suite's VIPs (see `IPV6_TOML`): full NAT, dnat, a backend with no neighbour
/// entry, a blackholed backend.
const VIP6_DNAT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x101);
const VIP6_UNRESOLVED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x103);
const VIP6_BLACKHOLE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x105);
/// Its backend is behind a route of MTU 1280.
const VIP6_SMALL_MTU: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x107);
/// A router on the client side, and one on the backend side.
const CLIENT_ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 0xfe);
const BACKEND_ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 0xfe);

/// An ICMPv6 error of `kind` from `from` to `to` quoting `quoted` (a built frame: its IPv6
/// packet, cut to `cut` bytes), MTU 1280 for "packet too big".
fn icmp6_error(from: Ipv6Addr, to: Ipv6Addr, kind: u8, quoted: &Frame, cut: usize) -> Frame {
    let packet = quoted.build()[ETH_HLEN..].to_vec();
    let cut = cut.min(packet.len());
    let rest = if kind == ICMPV6_PACKET_TOO_BIG {
        1280u32.to_be_bytes()
    } else {
        [0; 4]
    };
    Frame::icmp6(
        from,
        to,
        icmp6_message(from, to, kind, 0, rest, &packet[..cut]),
    )
}

/// An ICMPv6 message xlb sends itself: built from scratch, which is the reference too.
fn icmp6_sent(frame: Frame, macs: ([u8; 6], [u8; 6])) -> Output {
    let built = frame.with_macs(macs.0, macs.1).build();
    Output::Rewritten {
        reference: built.clone(),
        built,
    }
}

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// `frame` (IPv6) rewritten to `to` with its hop limit lowered by `ttl_decrement`, built
/// from scratch and by the reference rewrite, with `macs` when xlb sends it itself.
fn rewritten6(
    input: &Frame,
    to: (SocketAddrV6, SocketAddrV6),
    macs: Option<([u8; 6], [u8; 6])>,
    ttl_decrement: u8,
) -> Output {
    let mut built = Frame {
        v6: Some((*to.0.ip(), *to.1.ip())),
        sport: to.0.port(),
        dport: to.1.port(),
        ttl: input.ttl - ttl_decrement,
        ..input.clone()
    };
    let mut reference = nat_rewrite(&input.build(), to.0.into(), to.1.into(), ttl_decrement)
        .unwrap_or_else(|| panic!("the reference rewrite refused {input:?}"));
    if let Some((src, dst)) = macs {
        built = built.with_macs(src, dst);
        set_macs(&mut reference, (src, dst));
    }
    Output::Rewritten {
        built: built.build(),
        reference,
    }
}

/// An IPv6 packet redirected by xlb to `to`, with `macs`, its flow in `state` afterwards.
fn redirected6(
    input: &Frame,
    to: (SocketAddrV6, SocketAddrV6),
    macs: Option<([u8; 6], [u8; 6])>,
    state: FlowState,
) -> Expect {
    Expect {
        action: XDP_REDIRECT,
        reason: Reason::ForwardRedirect,
        output: rewritten6(input, to, macs, 1),
        state: Some(state),
    }
}

/// The SNAT endpoint a first packet client → vip (IPv6) gets toward `backend`.
fn snat6(
    ports: &mut Ports,
    proto: u8,
    client: SocketAddrV6,
    vip: SocketAddrV6,
    backend: SocketAddrV6,
) -> SocketAddrV6 {
    for probe in 0..SNAT_PORT_PROBES.min(ports.ports.count()) {
        let snat = sa6(lab::SNAT6, ports.port(proto, client, vip, probe));
        let reverse = FlowKey {
            src: Endpoint::from_socket(backend.into()),
            dst: Endpoint::from_socket(snat.into()),
            proto,
            _pad: 0,
        };
        if ports.taken.insert(reverse) {
            return snat;
        }
    }
    panic!("the model ran out of SNAT ports");
}

fn ipv6_cases(lab: &Lab) -> Vec<Case> {
    use lab::{BACKEND6, CLIENT6, SMALL_MTU_BACKEND6, VIP6};
    let (fx0, fx1) = (lab.fx0, lab.fx1);
    let mut ports = lab.ports();
    let mut v = Vec::new();
    let client = sa6(CLIENT6, 40000);
    let vip = sa6(VIP6, 80);
    let backend = sa6(BACKEND6, 8080);
    let snat = snat6(&mut ports, PROTO_TCP, client, vip, backend);
    let c = |flags: u8| lab.sent_by_client(Frame::tcp6((CLIENT6, 40000), (VIP6, 80), flags));
    let b = |flags: u8| {
        lab.sent_by_backend(Frame::tcp6(
            (BACKEND6, 8080),
            (*snat.ip(), snat.port()),
            flags,
        ))
    };
    let (syn, syn_ack, ack) = (c(TCP_SYN), b(TCP_SYN | TCP_ACK), c(TCP_ACK));
    v.push(case(
        "v6-01 TCP SYN client → VIP: SNAT + DNAT over IPv6, redirected to the backend side",
        vec![],
        pkt(&syn, fx0),
        redirected6(&syn, (snat, backend), lab.to_backend(), FlowState::New),
    ));
    v.push(case(
        "v6-02 SYN-ACK backend → SNAT:port: back to the client from the VIP",
        vec![pkt(&syn, fx0)],
        pkt(&syn_ack, fx1),
        redirected6(&syn_ack, (vip, client), lab.to_client(), FlowState::New),
    ));
    v.push(case(
        "v6-03 the client's ACK: established",
        vec![pkt(&syn, fx0), pkt(&syn_ack, fx1)],
        pkt(&ack, fx0),
        redirected6(
            &ack,
            (snat, backend),
            lab.to_backend(),
            FlowState::Established,
        ),
    ));
    // Extension headers the program walks stay as they are, between the rewritten IPv6
    // header and the rewritten TCP header.
    let with_ext = Frame {
        ext_headers: vec![
            (IPV6_HOP_BY_HOP, vec![1, 4, 0, 0, 0, 0]),
            (
                IPV6_DEST_OPTIONS,
                vec![1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ],
        payload: b"data".to_vec(),
        ..c(TCP_ACK | TCP_PSH)
    };
    v.push(case(
        "v6-04 hop-by-hop and destination options before TCP: walked, kept, rewritten",
        vec![pkt(&syn, fx0), pkt(&syn_ack, fx1)],
        pkt(&with_ext, fx0),
        redirected6(
            &with_ext,
            (snat, backend),
            lab.to_backend(),
            FlowState::Established,
        ),
    ));
    let five = Frame {
        ext_headers: vec![(IPV6_DEST_OPTIONS, vec![1, 4, 0, 0, 0, 0]); 5],
        ..syn.clone()
    };
    v.push(case(
        "v6-05 five extension headers, one more than the program walks: to the kernel",
        vec![],
        pkt(&five, fx0),
        untouched(XDP_PASS, Reason::PassIpv6Extensions),
    ));
    let far = Frame {
        ext_headers: vec![(IPV6_DEST_OPTIONS, vec![1; 198])],
        ..syn.clone()
    };
    v.push(case(
        "v6-05b one destination-options header of 200 bytes: TCP starts beyond the program's \
         reach, to the kernel",
        vec![],
        pkt(&far, fx0),
        untouched(XDP_PASS, Reason::PassIpv6Extensions),
    ));
    let esp = Frame {
        l4: L4::Other { proto: 50 },
        payload: vec![0; 24],
        ..syn.clone()
    };
    v.push(case(
        "v6-06 ESP: not ours to parse, to the kernel",
        vec![],
        pkt(&esp, fx0),
        untouched(XDP_PASS, Reason::PassNotTcpUdp),
    ));
    let first_fragment = Frame {
        ext_headers: vec![(IPV6_FRAGMENT, vec![0, 1, 0, 0, 0, 9])],
        ..syn.clone()
    };
    v.push(case(
        "v6-07 a first fragment to a service: dropped, as IPv4's",
        vec![],
        pkt(&first_fragment, fx0),
        untouched(XDP_DROP, Reason::DropFragment),
    ));
    let later_fragment = Frame {
        ext_headers: vec![(IPV6_FRAGMENT, vec![0, 8 << 3, 0, 0, 0, 9])],
        ..syn.clone()
    };
    v.push(case(
        "v6-08 a later fragment: no ports, to the kernel",
        vec![],
        pkt(&later_fragment, fx0),
        untouched(XDP_PASS, Reason::PassFragment),
    ));
    let mapped: Ipv6Addr = "::ffff:10.10.1.2".parse().unwrap();
    let from_mapped = Frame {
        v6: Some((mapped, VIP6)),
        ..syn.clone()
    };
    v.push(case(
        "v6-09 an IPv4-mapped source (never on the wire): dropped as a bad header",
        vec![],
        pkt(&from_mapped, fx0),
        untouched(XDP_DROP, Reason::DropBadIpv6Header),
    ));
    let to_mapped_vip = Frame {
        v6: Some((CLIENT6, "::ffff:10.10.0.100".parse().unwrap())),
        ..syn.clone()
    };
    v.push(case(
        "v6-10 to the IPv4 VIP's mapped address: dropped, never the IPv4 service's",
        vec![],
        pkt(&to_mapped_vip, fx0),
        untouched(XDP_DROP, Reason::DropBadIpv6Header),
    ));
    for (name, frame, reason) in [
        (
            "v6-11 payload length 0 (a jumbogram): a bad header",
            Frame {
                tot_len_override: Some(0),
                ..syn.clone()
            },
            Reason::DropBadIpv6Header,
        ),
        (
            "v6-12 a payload length beyond the frame: truncated",
            Frame {
                tot_len_override: Some(200),
                ..syn.clone()
            },
            Reason::DropTruncated,
        ),
        (
            "v6-13 version 4 behind the IPv6 EtherType: a bad header",
            Frame {
                version_override: Some(4),
                ..syn.clone()
            },
            Reason::DropBadIpv6Header,
        ),
        (
            "v6-14 cut inside the IPv6 header: truncated",
            Frame {
                truncate_to: Some(ETH_HLEN + 30),
                ..syn.clone()
            },
            Reason::DropTruncated,
        ),
    ] {
        v.push(case(
            name,
            vec![],
            pkt(&frame, fx0),
            untouched(XDP_DROP, reason),
        ));
    }
    let udp = lab.sent_by_client(Frame::udp6((CLIENT6, 5000), (VIP6, 53), b"query"));
    let udp_backend = sa6(BACKEND6, 5353);
    let udp_snat = snat6(
        &mut ports,
        PROTO_UDP,
        sa6(CLIENT6, 5000),
        sa6(VIP6, 53),
        udp_backend,
    );
    v.push(case(
        "v6-15 UDP client → VIP: rewritten, checksum over the new pseudo-header",
        vec![],
        pkt(&udp, fx0),
        redirected6(
            &udp,
            (udp_snat, udp_backend),
            lab.to_backend(),
            FlowState::New,
        ),
    ));
    let no_checksum = Frame {
        l4: L4::Udp { checksum: false },
        ..udp.clone()
    };
    v.push(case(
        "v6-16 UDP to a service with checksum 0, which IPv6 forbids: dropped",
        vec![],
        pkt(&no_checksum, fx0),
        untouched(XDP_DROP, Reason::DropUdpZeroChecksum),
    ));
    let tunnel = lab.sent_by_client(Frame {
        l4: L4::Udp { checksum: false },
        ..Frame::udp6((CLIENT6, 5000), (BACKEND6, 4789), b"vxlan")
    });
    v.push(case(
        "v6-16b UDP with checksum 0 that is no service's (a tunnel's, RFC 6935): the kernel's",
        vec![],
        pkt(&tunnel, fx0),
        untouched(XDP_PASS, Reason::PassNoService),
    ));
    let routed = Frame {
        ext_headers: vec![(IPV6_ROUTING, {
            let mut body = vec![4, 1, 0, 0, 0, 0];
            body.extend_from_slice(&BACKEND6.octets());
            body
        })],
        ..syn.clone()
    };
    v.push(case(
        "v6-16c a routing header with a segment left (the VIP is not the final destination): \
         the kernel's",
        vec![],
        pkt(&routed, fx0),
        untouched(XDP_PASS, Reason::PassIpv6Extensions),
    ));
    let dnat_syn = lab.sent_by_client(Frame::tcp6((CLIENT6, 40001), (VIP6_DNAT, 80), TCP_SYN));
    v.push(case(
        "v6-17 dnat: the backend sees the client's own address and port",
        vec![],
        pkt(&dnat_syn, fx0),
        redirected6(
            &dnat_syn,
            (sa6(CLIENT6, 40001), backend),
            lab.to_backend(),
            FlowState::New,
        ),
    ));
    let dnat_reply = lab.sent_by_backend(Frame::tcp6(
        (BACKEND6, 8080),
        (CLIENT6, 40001),
        TCP_SYN | TCP_ACK,
    ));
    v.push(case(
        "v6-18 dnat: the backend's reply to the client leaves from the VIP",
        vec![pkt(&dnat_syn, fx0)],
        pkt(&dnat_reply, fx1),
        redirected6(
            &dnat_reply,
            (sa6(VIP6_DNAT, 80), sa6(CLIENT6, 40001)),
            lab.to_client(),
            FlowState::New,
        ),
    ));
    let unresolved = lab.sent_by_client(Frame::tcp6(
        (CLIENT6, 40002),
        (VIP6_UNRESOLVED, 80),
        TCP_SYN,
    ));
    let unresolved_backend = sa6(lab::UNRESOLVED_BACKEND6, 8080);
    let unresolved_snat = snat6(
        &mut ports,
        PROTO_TCP,
        sa6(CLIENT6, 40002),
        sa6(VIP6_UNRESOLVED, 80),
        unresolved_backend,
    );
    v.push(case(
        "v6-19 a backend with no neighbour entry: rewritten and handed to tc",
        vec![],
        pkt(&unresolved, fx0),
        Expect {
            action: XDP_PASS,
            reason: Reason::ForwardResolveNeighbour,
            output: rewritten6(
                &unresolved,
                (unresolved_snat, unresolved_backend),
                Some(lab::handoff_macs()),
                1,
            ),
            state: Some(FlowState::New),
        },
    ));
    let blackholed =
        lab.sent_by_client(Frame::tcp6((CLIENT6, 40003), (VIP6_BLACKHOLE, 80), TCP_SYN));
    v.push(case(
        "v6-20 a blackholed backend: dropped as unreachable, no flow",
        vec![],
        pkt(&blackholed, fx0),
        untouched(XDP_DROP, Reason::DropUnreachable),
    ));
    v.push(case(
        "v6-21 hop limit 1: to the kernel untouched, which answers time exceeded",
        vec![],
        pkt(
            &Frame {
                ttl: 1,
                ..syn.clone()
            },
            fx0,
        ),
        untouched(XDP_PASS, Reason::PassTtlExpired),
    ));
    let elsewhere = lab.sent_by_client(Frame::tcp6(
        (CLIENT6, 40000),
        (SMALL_MTU_BACKEND6, 80),
        TCP_SYN,
    ));
    v.push(case(
        "v6-22 TCP to an IPv6 address that is no VIP: to the kernel",
        vec![],
        pkt(&elsewhere, fx0),
        untouched(XDP_PASS, Reason::PassNoService),
    ));
    let ping = lab.sent_by_client(Frame::icmp6(
        CLIENT6,
        VIP6,
        icmp6_message(CLIENT6, VIP6, ICMPV6_ECHO_REQUEST, 0, [0, 7, 0, 1], b"ping"),
    ));
    let answer = lab.sent_by_client(Frame::icmp6(
        VIP6,
        CLIENT6,
        icmp6_message(VIP6, CLIENT6, ICMPV6_ECHO_REPLY, 0, [0, 7, 0, 1], b"ping"),
    ));
    let mut reference = echo_reply_v6(&ping.build()).expect("the reference answers");
    set_macs(&mut reference, (fx0.mac, CLIENT_MAC));
    v.push(case(
        "v6-23 ICMPv6 echo request to the VIP: answered from the VIP, back out of fx0",
        vec![],
        pkt(&ping, fx0),
        Expect {
            action: XDP_TX,
            reason: Reason::ForwardTx,
            output: Output::Rewritten {
                built: Frame { ttl: 64, ..answer }
                    .with_macs(fx0.mac, CLIENT_MAC)
                    .build(),
                reference,
            },
            state: None,
        },
    ));
    let solicitation = lab.sent_by_client(Frame::icmp6(
        CLIENT6,
        VIP6,
        icmp6_message(
            CLIENT6,
            VIP6,
            ICMPV6_NEIGHBOUR_SOLICITATION,
            0,
            [0; 4],
            &VIP6.octets(),
        ),
    ));
    v.push(case(
        "v6-24 neighbour solicitation (for the VIP, even): the kernel's",
        vec![],
        pkt(&solicitation, fx0),
        untouched(XDP_PASS, Reason::PassIcmp),
    ));
    let ping_elsewhere = lab.sent_by_client(Frame::icmp6(
        CLIENT6,
        BACKEND6,
        icmp6_message(
            CLIENT6,
            BACKEND6,
            ICMPV6_ECHO_REQUEST,
            0,
            [0, 7, 0, 1],
            b"ping",
        ),
    ));
    v.push(case(
        "v6-25 a ping to an address that is no VIP: the kernel's",
        vec![],
        pkt(&ping_elsewhere, fx0),
        untouched(XDP_PASS, Reason::PassIcmp),
    ));
    // ICMPv6 errors. The router on the client side cannot pass xlb's SYN-ACK (VIP → client)
    // on: its "packet too big" to the VIP reaches the backend, from the SNAT address, about
    // the packet the backend sent (backend → SNAT:port), every checksum made anew.
    let sent_to_client = Frame::tcp6((VIP6, 80), (CLIENT6, 40000), TCP_SYN | TCP_ACK);
    let sent_by_backend = Frame::tcp6(
        (BACKEND6, 8080),
        (*snat.ip(), snat.port()),
        TCP_SYN | TCP_ACK,
    );
    let handshake = vec![pkt(&syn, fx0), pkt(&syn_ack, fx1)];
    for (name, cut) in [
        (
            "v6-27 packet too big about a reply to the client: to the backend, translated",
            1000,
        ),
        (
            "v6-28 the same, quoting only the IPv6 header and 8 bytes (no TCP checksum)",
            48,
        ),
    ] {
        let error = lab.sent_by_client(icmp6_error(
            CLIENT_ROUTER6,
            VIP6,
            ICMPV6_PACKET_TOO_BIG,
            &sent_to_client,
            cut,
        ));
        let translated = Frame {
            ttl: 63,
            ..icmp6_error(
                *snat.ip(),
                BACKEND6,
                ICMPV6_PACKET_TOO_BIG,
                &sent_by_backend,
                cut,
            )
        };
        v.push(case(
            name,
            handshake.clone(),
            pkt(&error, fx0),
            Expect {
                action: XDP_REDIRECT,
                reason: Reason::ForwardRedirect,
                output: icmp6_sent(translated, (fx1.mac, BACKEND_MAC)),
                state: None,
            },
        ));
    }
    // The backend side's router cannot pass xlb's SYN (SNAT:port → backend): the client
    // hears of its own SYN (client → VIP), from the VIP.
    let sent_to_backend = Frame::tcp6((*snat.ip(), snat.port()), (BACKEND6, 8080), TCP_SYN);
    let exceeded = lab.sent_by_backend(icmp6_error(
        BACKEND_ROUTER6,
        *snat.ip(),
        ICMPV6_TIME_EXCEEDED,
        &sent_to_backend,
        1000,
    ));
    let to_client = Frame {
        ttl: 63,
        ..icmp6_error(VIP6, CLIENT6, ICMPV6_TIME_EXCEEDED, &syn, 1000)
    };
    v.push(case(
        "v6-29 time exceeded about xlb's SYN to the backend: to the client, from the VIP",
        vec![pkt(&syn, fx0)],
        pkt(&exceeded, fx1),
        Expect {
            action: XDP_REDIRECT,
            reason: Reason::ForwardRedirect,
            output: icmp6_sent(to_client, (fx0.mac, CLIENT_MAC)),
            state: None,
        },
    ));
    // dnat: the client's packets keep their source, so errors about them keep the router's.
    let dnat_reply_sent = Frame::tcp6((VIP6_DNAT, 80), (CLIENT6, 40001), TCP_SYN | TCP_ACK);
    let dnat_backend_sent = Frame::tcp6((BACKEND6, 8080), (CLIENT6, 40001), TCP_SYN | TCP_ACK);
    let error = lab.sent_by_client(icmp6_error(
        CLIENT_ROUTER6,
        VIP6_DNAT,
        ICMPV6_PACKET_TOO_BIG,
        &dnat_reply_sent,
        1000,
    ));
    let translated = Frame {
        ttl: 63,
        ..icmp6_error(
            CLIENT_ROUTER6,
            BACKEND6,
            ICMPV6_PACKET_TOO_BIG,
            &dnat_backend_sent,
            1000,
        )
    };
    v.push(case(
        "v6-30 dnat: packet too big about a reply reaches the backend, from the router",
        vec![pkt(&dnat_syn, fx0), pkt(&dnat_reply, fx1)],
        pkt(&error, fx0),
        Expect {
            action: XDP_REDIRECT,
            reason: Reason::ForwardRedirect,
            output: icmp6_sent(translated, (fx1.mac, BACKEND_MAC)),
            state: None,
        },
    ));
    let untracked = lab.sent_by_client(icmp6_error(
        CLIENT_ROUTER6,
        VIP6,
        ICMPV6_PACKET_TOO_BIG,
        &sent_to_client,
        1000,
    ));
    v.push(case(
        "v6-31 an error about no tracked flow: to the kernel",
        vec![],
        pkt(&untracked, fx0),
        untouched(XDP_PASS, Reason::PassIcmpUntracked),
    ));
    // A client's segment too big for the way to the backend (MTU 1280): xlb says so itself,
    // from the VIP, quoting the IPv6 header and 8 bytes; no flow.
    let big = lab.sent_by_client(Frame {
        payload: vec![7; 1300],
        ..Frame::tcp6((CLIENT6, 40005), (VIP6_SMALL_MTU, 80), TCP_ACK)
    });
    let answer = Frame {
        ttl: 64,
        ..icmp6_error(
            VIP6_SMALL_MTU,
            CLIENT6,
            ICMPV6_PACKET_TOO_BIG,
            &big,
            IPV6_HLEN + 8,
        )
    };
    v.push(case(
        "v6-32 too big for the way to the backend: xlb answers packet too big, MTU 1280",
        vec![],
        pkt(&big, fx0),
        Expect {
            action: XDP_REDIRECT,
            reason: Reason::ForwardIcmpTooBig,
            output: icmp6_sent(answer, (fx0.mac, CLIENT_MAC)),
            state: None,
        },
    ));

    // The IPv6 NAT gateway: a private host of the upper half of the client link reaches the
    // backend side from the public address, by TCP, UDP (one mapping toward every
    // destination) and ping.
    let private = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0x8000, 0, 0, 2);
    let public = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 5);
    let out_syn = lab.sent_by_client(Frame::tcp6((private, 5000), (BACKEND6, 80), TCP_SYN));
    let port = gateway_port(lab, PROTO_TCP, sa6(private, 5000), sa6(BACKEND6, 80));
    v.push(case(
        "v6-33 gateway: TCP SYN out leaves from the public address and a port of its range",
        vec![],
        pkt(&out_syn, fx0),
        redirected6(
            &out_syn,
            (sa6(public, port), sa6(BACKEND6, 80)),
            lab.to_backend(),
            FlowState::New,
        ),
    ));
    let in_syn_ack = lab.sent_by_backend(Frame::tcp6(
        (BACKEND6, 80),
        (public, port),
        TCP_SYN | TCP_ACK,
    ));
    v.push(case(
        "v6-34 gateway: the answer comes back to the private host (no neighbour entry: tc)",
        vec![pkt(&out_syn, fx0)],
        pkt(&in_syn_ack, fx1),
        Expect {
            action: XDP_PASS,
            reason: Reason::ForwardResolveNeighbour,
            output: rewritten6(
                &in_syn_ack,
                (sa6(BACKEND6, 80), sa6(private, 5000)),
                Some(lab::handoff_macs()),
                1,
            ),
            state: Some(FlowState::New),
        },
    ));
    let datagram = lab.sent_by_client(Frame::udp6((private, 6000), (BACKEND6, 53), b"q"));
    let mapped = gateway_port(lab, PROTO_UDP, sa6(private, 6000), sa6(BACKEND6, 53));
    let elsewhere =
        lab.sent_by_client(Frame::udp6((private, 6000), (SMALL_MTU_BACKEND6, 53), b"q"));
    v.push(case(
        "v6-35 gateway: UDP toward a second destination keeps the private endpoint's mapping",
        vec![pkt(&datagram, fx0)],
        pkt(&elsewhere, fx0),
        redirected6(
            &elsewhere,
            (sa6(public, mapped), sa6(SMALL_MTU_BACKEND6, 53)),
            lab.to_backend(),
            FlowState::New,
        ),
    ));
    let ping_out = lab.sent_by_client(Frame::icmp6(
        private,
        BACKEND6,
        icmp6_message(
            private,
            BACKEND6,
            ICMPV6_ECHO_REQUEST,
            0,
            [0, 7, 0, 1],
            b"ping",
        ),
    ));
    let id = gateway_port(lab, PROTO_ICMPV6, sa6(private, 7), sa6(BACKEND6, 0));
    let [i0, i1] = id.to_be_bytes();
    let ping_sent = Frame {
        ttl: 63,
        ..Frame::icmp6(
            public,
            BACKEND6,
            icmp6_message(
                public,
                BACKEND6,
                ICMPV6_ECHO_REQUEST,
                0,
                [i0, i1, 0, 1],
                b"ping",
            ),
        )
    };
    v.push(case(
        "v6-36 gateway: a ping out gets an identifier of the range, checksum over the new \
         pseudo-header",
        vec![],
        pkt(&ping_out, fx0),
        Expect {
            action: XDP_REDIRECT,
            reason: Reason::ForwardRedirect,
            output: icmp6_sent(ping_sent, (fx1.mac, BACKEND_MAC)),
            state: Some(FlowState::New),
        },
    ));
    let pong = lab.sent_by_backend(Frame::icmp6(
        BACKEND6,
        public,
        icmp6_message(
            BACKEND6,
            public,
            ICMPV6_ECHO_REPLY,
            0,
            [i0, i1, 0, 1],
            b"ping",
        ),
    ));
    let pong_back = Frame {
        ttl: 63,
        ..Frame::icmp6(
            BACKEND6,
            private,
            icmp6_message(
                BACKEND6,
                private,
                ICMPV6_ECHO_REPLY,
                0,
                [0, 7, 0, 1],
                b"ping",
            ),
        )
    };
    let (smac, dmac) = lab::handoff_macs();
    let pong_back = pong_back.with_macs(smac, dmac).build();
    v.push(case(
        "v6-37 gateway: the echo reply comes back with the private host's identifier",
        vec![pkt(&ping_out, fx0)],
        pkt(&pong, fx1),
        Expect {
            action: XDP_PASS,
            reason: Reason::ForwardResolveNeighbour,
            output: Output::Rewritten {
                reference: pong_back.clone(),
                built: pong_back,
            },
            state: Some(FlowState::Established),
        },
    ));

    let v4_syn = lab.sent_by_client(tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    let v4_flow = ports.flow(
        PROTO_TCP,
        sa(CLIENT, 40000),
        sa(VIP, 80),
        SNAT,
        sa(BACKEND, 8080),
    );
    v.push(case(
        "v6-26 the IPv4 service on the same port, next to an IPv6 flow: its own flow",
        vec![pkt(&syn, fx0)],
        pkt(&v4_syn, fx0),
        lab.redirected_to_backend(&v4_syn, &v4_flow, FlowState::New),
    ));

    // Last of all (it leaves the lab's neighbour changed): a flow's next hop is kept a
    // second (`forward::route`'s cache), then asked of the FIB again, so a backend's new MAC
    // reaches the flow's packets.
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x99];
    v.push(Case {
        name: "v6-38 the backend's MAC changes: a second on, the flow's packets go to the new one"
            .into(),
        given: vec![(pkt(&syn, fx0), Reason::ForwardRedirect)],
        tamper: Some(Box::new(|_: &mut Ebpf| {
            lab::set_neighbour(BACKEND6.into(), NEW_MAC, lab::FX1)?;
            std::thread::sleep(std::time::Duration::from_millis(1100));
            Ok(())
        })),
        when: pkt(&ack, fx0),
        expect: redirected6(
            &ack,
            (snat, backend),
            Some((fx1.mac, NEW_MAC)),
            FlowState::New,
        ),
    });
    v
}
