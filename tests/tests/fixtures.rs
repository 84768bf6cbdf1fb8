//! Table-driven tests of the real XDP program with BPF_PROG_TEST_RUN: each fixture is one
//! input frame, the interface it arrives on, and the expected XDP action, output frame and
//! `REASONS` counter.
//!
//! Fixtures come in suites (see [`SUITES`]): one per config. For each, the program is loaded
//! (not attached) and its maps filled from the suite's TOML by the control plane's own code,
//! inside the one-namespace lab of `xlb_tests::lab` (two veth pairs, static neighbours, a
//! blackhole route), so `bpf_fib_lookup` sees a real routing table and real neighbours.
//!
//! A suite's fixtures run in order against one loaded program, so later ones see the
//! conntrack entries earlier ones created (a reply after its SYN, a second packet of a flow). Expected
//! frames are built from scratch with `xlb_tests::packet::Frame` and, for rewritten frames,
//! also computed with the reference rewrite `nat_rewrite_v4`; the expected SNAT port is
//! predicted with the program's own flow hash. Every fixture runs even when an earlier one
//! fails; the test then fails listing all of them, with hex diffs.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    hash::{flow_hash, snat_port},
    maps::{
        self, DIR_TO_BACKEND, DIR_TO_CLIENT, Endpoint, FlowKey, NO_BACKEND, NatEntry, PROTO_TCP,
        PROTO_UDP, SNAT_PORT_PROBES, names,
    },
    reason::Reason,
};
use lb_userspace::config::{Checked, Config};
use xlb_tests::{
    lab::{
        self, BACKEND, BACKEND_MAC, CLIENT, CLIENT_MAC, Iface, NEAR_BACKEND, NEAR_BACKEND_MAC,
        SNAT, UNRESOLVED_BACKEND, VIP, VIP_UNRESOLVED,
    },
    model::nat_rewrite_v4,
    netns::{self, NetNs},
    packet::{
        Frame, IP_MF, L4, PROTO_ICMP, TCP_ACK, TCP_PSH, TCP_SYN, arp_request, hex_diff, icmp_echo,
        summary, verify_checksums_v4,
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
const SNAT_NEAR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);

/// The maps' contents. Service order = service id; one backend per service, so the Maglev
/// table sends every flow of a service to it and only the SNAT port needs predicting.
const CONFIG_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
conntrack_entries = 1024
maglev_table_size = 251
max_services = 8
max_backends = 16
snat_port_range = [20000, 29999]
hash_seed = 0x5eed1234

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
"#;

/// A single SNAT port: the second flow toward the backend finds no free port.
const ONE_PORT_TOML: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
conntrack_entries = 64
maglev_table_size = 13
max_services = 1
max_backends = 1
snat_port_range = [30000, 30000]
hash_seed = 7
# Long enough that no fixture goes idle by itself; the idle ones are aged by their set-up.
tcp_idle_timeout = 30

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
"#;

#[test]
fn xdp_program_fixtures() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("BPF_PROG_TEST_RUN needs root: run cargo xtask test");
    }
    netns::cleanup_stale(PREFIX).expect("cleaning up stale namespaces");
    let configs: Vec<Checked> = SUITES
        .iter()
        .map(|s| {
            Config::parse(s.config)
                .unwrap_or_else(|e| panic!("suite {}: parsing its config: {e}", s.name))
                .validate()
                .unwrap_or_else(|e| panic!("suite {}: invalid config:\n{e}", s.name))
        })
        .collect();

    let ns = NetNs::create(&netns::unique_base(PREFIX)).expect("creating the namespace");
    lab::setup(&ns).expect("setting up the fixtures' namespace");
    let reports = ns
        .enter(|| {
            SUITES
                .iter()
                .zip(&configs)
                .map(|(suite, checked)| {
                    run_suite(suite, checked).with_context(|| format!("suite {}", suite.name))
                })
                .collect::<Result<Vec<Report>>>()
        })
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("{e:#}"));
    drop(ns);

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

/// A config, and the fixtures that run in order against one program loaded with it.
struct Suite {
    name: &'static str,
    config: &'static str,
    fixtures: fn(&mut Model, Iface, Iface) -> Vec<Fixture>,
}

const SUITES: &[Suite] = &[
    Suite {
        name: "services",
        config: CONFIG_TOML,
        fixtures,
    },
    Suite {
        name: "one SNAT port",
        config: ONE_PORT_TOML,
        fixtures: one_port_fixtures,
    },
];

/// What a fixture's output frame must be.
enum Output {
    /// Byte-for-byte the input.
    Unchanged,
    /// Rewritten: equal to a frame built from scratch and to the reference rewrite (with
    /// the MACs the program should have set), and with valid checksums.
    Rewritten { built: Vec<u8>, reference: Vec<u8> },
}

struct Fixture {
    name: String,
    ingress: Iface,
    /// When set, the program sees only this many bytes of `input` (the linear part; the
    /// kernel puts the rest in a fragment). The only way to feed it a frame shorter than
    /// the 14 bytes BPF_PROG_TEST_RUN requires of `data_in`.
    linear_len: Option<usize>,
    input: Vec<u8>,
    action: u32,
    output: Output,
    reason: Reason,
    /// Runs on the maps before the packet (e.g. to evict a conntrack entry).
    setup: Option<Setup>,
}

type Setup = Box<dyn Fn(&mut Ebpf) -> Result<()>>;

/// A set-up that makes the conntrack entries of `keys` look idle since boot.
fn age(keys: Vec<FlowKey>) -> Setup {
    Box::new(move |ebpf: &mut Ebpf| {
        let mut ct: HashMap<&mut MapData, FlowKey, NatEntry> = ebpf
            .map_mut(names::CONNTRACK)
            .context("map CONNTRACK")?
            .try_into()?;
        for key in &keys {
            let mut entry = ct.get(key, 0).context("aging an entry that is not there")?;
            entry.last_seen_ns = 1;
            ct.insert(key, entry, 0)?;
        }
        Ok(())
    })
}

/// Predicts what the program's conntrack does: which SNAT port a new flow gets (the
/// program's flow hash and probe order, skipping ports an earlier fixture's flow holds).
struct Model {
    cfg: maps::Config,
    /// Reverse keys (backend → SNAT:port) of the flows created so far.
    taken: HashSet<FlowKey>,
}

/// Both directions of a flow, as the program stores them.
#[derive(Clone, Copy, Debug)]
struct Flow {
    to_backend: NatEntry,
    to_client: NatEntry,
}

impl Model {
    fn new(checked: &Checked) -> Model {
        Model {
            cfg: checked.map_config(),
            taken: HashSet::new(),
        }
    }

    /// The SNAT port a new flow client → vip tries first (probe 0).
    fn first_port(&self, proto: u8, client: SocketAddrV4, vip: SocketAddrV4) -> u16 {
        self.port(proto, client, vip, 0)
    }

    fn port(&self, proto: u8, client: SocketAddrV4, vip: SocketAddrV4, probe: u32) -> u16 {
        let key = FlowKey {
            src: Endpoint::from_socket_v4(client),
            dst: Endpoint::from_socket_v4(vip),
            proto,
            _pad: 0,
        };
        snat_port(
            flow_hash(&key, self.cfg.hash_seed),
            probe,
            self.cfg.snat_port_first,
            self.cfg.snat_port_count,
        )
    }

    /// The flow a first packet client → vip creates toward `backend`, SNATed to `snat`.
    fn new_flow(
        &mut self,
        proto: u8,
        client: SocketAddrV4,
        vip: SocketAddrV4,
        snat: Ipv4Addr,
        backend: SocketAddrV4,
    ) -> Flow {
        for probe in 0..SNAT_PORT_PROBES {
            let port = self.port(proto, client, vip, probe);
            let snat = Endpoint::from_socket_v4(SocketAddrV4::new(snat, port));
            let backend = Endpoint::from_socket_v4(backend);
            let reverse_key = FlowKey {
                src: backend,
                dst: snat,
                proto,
                _pad: 0,
            };
            if self.taken.insert(reverse_key) {
                return Flow {
                    to_backend: NatEntry {
                        src: snat,
                        dst: backend,
                        direction: DIR_TO_BACKEND,
                        ..NatEntry::default()
                    },
                    to_client: NatEntry {
                        src: Endpoint::from_socket_v4(vip),
                        dst: Endpoint::from_socket_v4(client),
                        direction: DIR_TO_CLIENT,
                        ..NatEntry::default()
                    },
                };
            }
        }
        panic!("the model ran out of SNAT ports");
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// `frame` with `entry`'s addresses and ports and the TTL lowered by `ttl_decrement`, built
/// from scratch.
fn nat_built(frame: &Frame, entry: &NatEntry, ttl_decrement: u8) -> Frame {
    let (src, dst) = (entry.src.to_socket_v4(), entry.dst.to_socket_v4());
    Frame {
        src: *src.ip(),
        sport: src.port(),
        dst: *dst.ip(),
        dport: dst.port(),
        ttl: frame.ttl - ttl_decrement,
        ..frame.clone()
    }
}

/// The expected output of a rewritten `input`: from scratch and by the reference rewrite,
/// with MACs `macs` (source, destination) when xlb sends it itself, which also lowers the
/// TTL; or, when `None`, handed to the kernel with the input's own MACs and TTL (the kernel
/// lowers the TTL when it forwards).
fn rewritten(input: &Frame, entry: &NatEntry, macs: Option<([u8; 6], [u8; 6])>) -> Output {
    let ttl_decrement = u8::from(macs.is_some());
    let mut built = nat_built(input, entry, ttl_decrement);
    let mut reference = nat_rewrite_v4(&input.build(), entry, ttl_decrement)
        .unwrap_or_else(|| panic!("the reference rewrite refused {input:?}"));
    if let Some((src, dst)) = macs {
        built = built.with_macs(src, dst);
        reference[0..6].copy_from_slice(&dst);
        reference[6..12].copy_from_slice(&src);
    }
    Output::Rewritten {
        built: built.build(),
        reference,
    }
}

fn fx(
    name: &str,
    ingress: Iface,
    input: Vec<u8>,
    action: u32,
    output: Output,
    reason: Reason,
) -> Fixture {
    Fixture {
        name: name.to_string(),
        ingress,
        linear_len: None,
        input,
        action,
        output,
        reason,
        setup: None,
    }
}

/// `frame` with the last two bytes of its payload chosen so that, after `entry`'s rewrite,
/// the L4 checksum computes to 0 (0xffff on the wire for UDP). The payload must be of even
/// length (so the two bytes form one aligned 16-bit word).
fn zero_checksum_after_rewrite(mut frame: Frame, entry: &NatEntry) -> Frame {
    let n = frame.payload.len();
    assert!(
        n >= 2 && n.is_multiple_of(2),
        "needs an even-length payload"
    );
    frame.payload[n - 2..].fill(0);
    let out = nat_built(&frame, entry, 1).build();
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

/// All fixtures, in the order they run (the model's SNAT ports depend on it).
fn fixtures(model: &mut Model, fx0: Iface, fx1: Iface) -> Vec<Fixture> {
    let mut v = Vec::new();
    let from_client = |frame: Frame| frame.with_macs(CLIENT_MAC, fx0.mac);
    let from_backend = |frame: Frame| frame.with_macs(BACKEND_MAC, fx1.mac);
    let to_backend_macs = Some((fx1.mac, BACKEND_MAC));
    let to_client_macs = Some((fx0.mac, CLIENT_MAC));

    // 1-3: one TCP flow, both directions, through conntrack.
    let client = sa(CLIENT, 40000);
    let vip = sa(VIP, 80);
    let backend = sa(BACKEND, 8080);
    let flow = model.new_flow(PROTO_TCP, client, vip, SNAT, backend);
    let syn = from_client(Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    v.push(fx(
        "01 TCP SYN client → VIP: SNAT + DNAT, redirected to the backend side",
        fx0,
        syn.build(),
        XDP_REDIRECT,
        rewritten(&syn, &flow.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));
    let snat_port = flow.to_backend.src.to_socket_v4().port();
    let syn_ack = from_backend(Frame::tcp(
        (BACKEND, 8080),
        (SNAT, snat_port),
        TCP_SYN | TCP_ACK,
    ));
    v.push(fx(
        "02 TCP SYN-ACK backend → SNAT:port: reverse NAT, redirected to the client side",
        fx1,
        syn_ack.build(),
        XDP_REDIRECT,
        rewritten(&syn_ack, &flow.to_client, to_client_macs),
        Reason::ForwardRedirect,
    ));
    let data = from_client(Frame {
        payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        id: 0x1235,
        ..Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK | TCP_PSH)
    });
    v.push(fx(
        "03 second client packet of the flow: same backend and SNAT port (conntrack hit)",
        fx0,
        data.build(),
        XDP_REDIRECT,
        rewritten(&data, &flow.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));

    // 3b: a new flow whose first SNAT port the flow above holds takes the next one.
    let taken = model.first_port(PROTO_TCP, client, vip);
    let rival = (41000..=u16::MAX)
        .map(|p| sa(CLIENT, p))
        .find(|c| model.first_port(PROTO_TCP, *c, vip) == taken)
        .expect("some client port hashes to the same first SNAT port");
    let second = model.new_flow(PROTO_TCP, rival, vip, SNAT, backend);
    assert_ne!(second.to_backend.src.to_socket_v4().port(), taken);
    let syn = from_client(Frame::tcp((CLIENT, rival.port()), (VIP, 80), TCP_SYN));
    v.push(fx(
        &format!(
            "03b new flow from port {} whose first SNAT port ({taken}) is taken: next port",
            rival.port()
        ),
        fx0,
        syn.build(),
        XDP_REDIRECT,
        rewritten(&syn, &second.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));

    // 3c: a TCP checksum that computes to 0x0000 after the rewrite stays 0x0000.
    let zero = model.new_flow(PROTO_TCP, sa(CLIENT, 40003), vip, SNAT, backend);
    let data = from_client(zero_checksum_after_rewrite(
        Frame {
            payload: b"pad\0\0\0".to_vec(),
            ..Frame::tcp((CLIENT, 40003), (VIP, 80), TCP_SYN)
        },
        &zero.to_backend,
    ));
    let out = rewritten(&data, &zero.to_backend, to_backend_macs);
    assert_eq!(
        l4_check(&out),
        0x0000,
        "03c: the payload was not crafted right"
    );
    v.push(fx(
        "03c TCP checksum that becomes 0x0000 after the rewrite",
        fx0,
        data.build(),
        XDP_REDIRECT,
        out,
        Reason::ForwardRedirect,
    ));

    // 4: the backend is behind the interface the packet came in on.
    let near = model.new_flow(
        PROTO_TCP,
        sa(CLIENT, 40004),
        sa(VIP_NEAR, 80),
        SNAT_NEAR,
        sa(NEAR_BACKEND, 8080),
    );
    let syn = from_client(Frame::tcp((CLIENT, 40004), (VIP_NEAR, 80), TCP_SYN));
    v.push(fx(
        "04 backend on the ingress interface's subnet: XDP_TX",
        fx0,
        syn.build(),
        XDP_TX,
        rewritten(&syn, &near.to_backend, Some((fx0.mac, NEAR_BACKEND_MAC))),
        Reason::ForwardTx,
    ));

    // 5-6: not for us.
    v.push(fx(
        "05 TCP to the LB's own address (no service): passed untouched",
        fx0,
        from_client(Frame::tcp(
            (CLIENT, 40005),
            (Ipv4Addr::new(10, 10, 1, 1), 22),
            TCP_SYN,
        ))
        .build(),
        XDP_PASS,
        Output::Unchanged,
        Reason::PassNoService,
    ));
    v.push(fx(
        "05b UDP to the VIP's TCP-only port 80 (protocol is part of the service key)",
        fx0,
        from_client(Frame::udp((CLIENT, 40005), (VIP, 80), b"x")).build(),
        XDP_PASS,
        Output::Unchanged,
        Reason::PassNoService,
    ));
    v.push(fx(
        "06 ARP request",
        fx0,
        arp_request(CLIENT_MAC, CLIENT, Ipv4Addr::new(10, 10, 1, 1)),
        XDP_PASS,
        Output::Unchanged,
        Reason::PassNotIpv4,
    ));
    v.push(fx(
        "06b ICMP echo to the VIP",
        fx0,
        from_client(Frame {
            src: CLIENT,
            dst: VIP,
            l4: L4::Other { proto: PROTO_ICMP },
            payload: icmp_echo(1, 1, b"ping"),
            ..Frame::default()
        })
        .build(),
        XDP_PASS,
        Output::Unchanged,
        Reason::PassNotTcpUdp,
    ));

    let mut tagged = from_client(Frame::tcp((CLIENT, 40006), (VIP, 80), TCP_SYN)).build();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]); // 802.1Q, VLAN 100
    v.push(fx(
        "06c VLAN-tagged TCP SYN to the VIP",
        fx0,
        tagged,
        XDP_PASS,
        Output::Unchanged,
        Reason::PassNotIpv4,
    ));

    // 7: truncated frames.
    v.push(fx(
        "07 TCP SYN to the VIP cut inside the TCP header (total length says 40)",
        fx0,
        from_client(Frame {
            truncate_to: Some(14 + 20 + 10),
            ..Frame::tcp((CLIENT, 40007), (VIP, 80), TCP_SYN)
        })
        .build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropTruncated,
    ));
    v.push(fx(
        "07b IPv4 frame cut inside the IPv4 header",
        fx0,
        from_client(Frame {
            truncate_to: Some(14 + 12),
            ..Frame::tcp((CLIENT, 40007), (VIP, 80), TCP_SYN)
        })
        .build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropTruncated,
    ));
    v.push(fx(
        "07c total length too short for a TCP header (frame padded to 60 bytes)",
        fx0,
        from_client(Frame {
            tot_len_override: Some(20 + 10),
            pad_to: Some(60),
            ..Frame::tcp((CLIENT, 40007), (VIP, 80), TCP_SYN)
        })
        .build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropTruncated,
    ));
    // data_in must be at least 14 bytes: the program sees the first 10, the kernel puts
    // the other 4 in a fragment.
    v.push(Fixture {
        name: "07d 10-byte frame, shorter than an Ethernet header".into(),
        ingress: fx0,
        linear_len: Some(10),
        setup: None,
        input: from_client(Frame::tcp((CLIENT, 40007), (VIP, 80), TCP_SYN)).build()[..14].to_vec(),
        action: XDP_DROP,
        output: Output::Unchanged,
        reason: Reason::DropTruncated,
    });

    // 8: IPv4 options move the L4 header.
    let opts_flow = model.new_flow(PROTO_TCP, sa(CLIENT, 40008), vip, SNAT, backend);
    let syn = from_client(Frame {
        ip_options: vec![1, 1, 1, 1, 0x94, 0x04, 0, 0], // 4 × NOP, Router Alert
        ..Frame::tcp((CLIENT, 40008), (VIP, 80), TCP_SYN)
    });
    v.push(fx(
        "08 SYN with 8 bytes of IPv4 options (IHL 7): L4 rewritten at offset 42",
        fx0,
        syn.build(),
        XDP_REDIRECT,
        rewritten(&syn, &opts_flow.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));
    let max_opts = model.new_flow(PROTO_TCP, sa(CLIENT, 40028), vip, SNAT, backend);
    let syn = from_client(Frame {
        ip_options: [vec![1; 36], vec![0; 4]].concat(), // 36 × NOP, End of options
        payload: b"data after the longest IPv4 header".to_vec(),
        ..Frame::tcp((CLIENT, 40028), (VIP, 80), TCP_SYN)
    });
    v.push(fx(
        "08c SYN with 40 bytes of IPv4 options (IHL 15, the most): L4 at offset 74",
        fx0,
        syn.build(),
        XDP_REDIRECT,
        rewritten(&syn, &max_opts.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));
    let pad_flow = model.new_flow(PROTO_TCP, sa(CLIENT, 40018), vip, SNAT, backend);
    let syn = from_client(Frame {
        pad_to: Some(60),
        ..Frame::tcp((CLIENT, 40018), (VIP, 80), TCP_SYN)
    });
    v.push(fx(
        "08b minimum-size frame with 6 bytes of Ethernet padding: padding kept",
        fx0,
        syn.build(),
        XDP_REDIRECT,
        rewritten(&syn, &pad_flow.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));

    // 9: malformed IPv4 headers.
    for (name, frame) in [
        (
            "09 IHL 4 (< 5)",
            Frame {
                ihl_override: Some(4),
                ..Frame::tcp((CLIENT, 40009), (VIP, 80), TCP_SYN)
            },
        ),
        (
            "09b version 6 in an IPv4 EtherType",
            Frame {
                version_override: Some(6),
                ..Frame::tcp((CLIENT, 40009), (VIP, 80), TCP_SYN)
            },
        ),
        (
            "09c total length 16 (< IHL)",
            Frame {
                tot_len_override: Some(16),
                ..Frame::tcp((CLIENT, 40009), (VIP, 80), TCP_SYN)
            },
        ),
    ] {
        v.push(fx(
            name,
            fx0,
            from_client(frame).build(),
            XDP_DROP,
            Output::Unchanged,
            Reason::DropBadIpv4Header,
        ));
    }

    // 10: UDP, with and without checksum, and a reply.
    let dns = sa(VIP, 53);
    let dns_backend = sa(BACKEND, 5353);
    let udp0 = model.new_flow(PROTO_UDP, sa(CLIENT, 5000), dns, SNAT, dns_backend);
    let q = from_client(Frame {
        l4: L4::Udp { checksum: false },
        ..Frame::udp((CLIENT, 5000), (VIP, 53), b"query without checksum")
    });
    v.push(fx(
        "10 UDP to VIP:53 with checksum 0: rewritten, checksum stays 0",
        fx0,
        q.build(),
        XDP_REDIRECT,
        rewritten(&q, &udp0.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));
    let udp1 = model.new_flow(PROTO_UDP, sa(CLIENT, 5001), dns, SNAT, dns_backend);
    let q = from_client(Frame::udp((CLIENT, 5001), (VIP, 53), b"query"));
    v.push(fx(
        "10b UDP to VIP:53 with a checksum: valid after the rewrite",
        fx0,
        q.build(),
        XDP_REDIRECT,
        rewritten(&q, &udp1.to_backend, to_backend_macs),
        Reason::ForwardRedirect,
    ));
    let port = udp1.to_backend.src.to_socket_v4().port();
    let a = from_backend(Frame::udp((BACKEND, 5353), (SNAT, port), b"answer!"));
    v.push(fx(
        "10c UDP reply backend → SNAT:port: back to the client from VIP:53",
        fx1,
        a.build(),
        XDP_REDIRECT,
        rewritten(&a, &udp1.to_client, to_client_macs),
        Reason::ForwardRedirect,
    ));
    let udpz = model.new_flow(PROTO_UDP, sa(CLIENT, 5002), dns, SNAT, dns_backend);
    let q = from_client(zero_checksum_after_rewrite(
        Frame::udp((CLIENT, 5002), (VIP, 53), b"zz\0\0"),
        &udpz.to_backend,
    ));
    let out = rewritten(&q, &udpz.to_backend, to_backend_macs);
    assert_eq!(
        l4_check(&out),
        0xffff,
        "10d: the payload was not crafted right"
    );
    v.push(fx(
        "10d UDP checksum that computes to 0 after the rewrite: sent as 0xffff",
        fx0,
        q.build(),
        XDP_REDIRECT,
        out,
        Reason::ForwardRedirect,
    ));

    // 11: TTL. Checked before the flow is created: no SNAT port is taken.
    v.push(fx(
        "11 TTL 1 to the VIP: passed untouched so the kernel sends time-exceeded",
        fx0,
        from_client(Frame {
            ttl: 1,
            ..Frame::tcp((CLIENT, 40011), (VIP, 80), TCP_SYN)
        })
        .build(),
        XDP_PASS,
        Output::Unchanged,
        Reason::PassTtlExpired,
    ));

    // 12: fragments.
    v.push(fx(
        "12 first fragment (MF, offset 0) to the VIP",
        fx0,
        from_client(Frame {
            frags: IP_MF,
            payload: vec![0x42; 32],
            ..Frame::tcp((CLIENT, 40012), (VIP, 80), TCP_ACK)
        })
        .build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropFragment,
    ));
    v.push(fx(
        "12b non-first fragment (offset 8 × 8 bytes) to the VIP",
        fx0,
        from_client(Frame {
            frags: 8,
            payload: vec![0x42; 32],
            ..Frame::tcp((CLIENT, 40012), (VIP, 80), TCP_ACK)
        })
        .build(),
        XDP_PASS,
        Output::Unchanged,
        Reason::PassFragment,
    ));

    // 13-15: where the backend is.
    v.push(fx(
        "13 service whose only backend has weight 0",
        fx0,
        from_client(Frame::tcp((CLIENT, 40013), (VIP_NO_BACKEND, 80), TCP_SYN)).build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropNoBackend,
    ));
    let unresolved = model.new_flow(
        PROTO_TCP,
        sa(CLIENT, 40014),
        sa(VIP_UNRESOLVED, 80),
        SNAT,
        sa(UNRESOLVED_BACKEND, 8080),
    );
    let syn = from_client(Frame::tcp((CLIENT, 40014), (VIP_UNRESOLVED, 80), TCP_SYN));
    v.push(fx(
        "14 backend without a neighbour entry: rewritten at L3/L4, MACs untouched, passed",
        fx0,
        syn.build(),
        XDP_PASS,
        rewritten(&syn, &unresolved.to_backend, None),
        Reason::PassNoNeighbour,
    ));
    let local = model.new_flow(
        PROTO_TCP,
        sa(CLIENT, 40015),
        sa(VIP_LOCAL, 80),
        SNAT,
        sa(Ipv4Addr::new(10, 20, 1, 1), 8080),
    );
    let syn = from_client(Frame::tcp((CLIENT, 40015), (VIP_LOCAL, 80), TCP_SYN));
    v.push(fx(
        "15 backend is a local address (FIB: not forwarded): rewritten, passed",
        fx0,
        syn.build(),
        XDP_PASS,
        rewritten(&syn, &local.to_backend, None),
        Reason::PassFibOther,
    ));
    model.new_flow(
        PROTO_TCP,
        sa(CLIENT, 40016),
        sa(VIP_BLACKHOLE, 80),
        SNAT,
        sa(Ipv4Addr::new(10, 99, 0, 1), 8080),
    );
    v.push(fx(
        "15b backend behind a blackhole route",
        fx0,
        from_client(Frame::tcp((CLIENT, 40016), (VIP_BLACKHOLE, 80), TCP_SYN)).build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropUnreachable,
    ));
    // 16: the Maglev table changes under a tracked flow (fixtures 01-03): the flow keeps its
    // backend and SNAT port through conntrack, while a new flow sees the new table.
    let maglev_size = model.cfg.maglev_size;
    let data = from_client(Frame {
        payload: b"still here".to_vec(),
        ..Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK)
    });
    v.push(Fixture {
        setup: Some(Box::new(move |ebpf: &mut Ebpf| {
            // Service 0 (the config's first, VIP:80/tcp) loses every backend.
            let mut maglev: Array<&mut MapData, u32> = ebpf
                .map_mut(names::MAGLEV)
                .context("map MAGLEV")?
                .try_into()?;
            for slot in 0..maglev_size {
                maglev.set(slot, NO_BACKEND, 0)?;
            }
            Ok(())
        })),
        ..fx(
            "16 Maglev table emptied under a tracked flow: it keeps its backend and SNAT port",
            fx0,
            data.build(),
            XDP_REDIRECT,
            rewritten(&data, &flow.to_backend, to_backend_macs),
            Reason::ForwardRedirect,
        )
    });
    v.push(fx(
        "16b ...while a new flow to that service now finds no backend",
        fx0,
        from_client(Frame::tcp((CLIENT, 40160), (VIP, 80), TCP_SYN)).build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropNoBackend,
    ));
    v
}

struct Report {
    total: usize,
    failures: Vec<String>,
    summary: String,
}

/// Loads the program with the config's maps, then runs every fixture. Runs on a thread
/// inside the fixtures' namespace: ifindexes, the devmap and the FIB are per namespace.
fn run_suite(suite: &Suite, checked: &Checked) -> Result<Report> {
    let lab::Program {
        mut ebpf, fx0, fx1, ..
    } = lab::load(checked)?;

    let mut model = Model::new(checked);
    let fixtures = (suite.fixtures)(&mut model, fx0, fx1);

    let mut failures = Vec::new();
    let mut summary = format!("suite {}:\n", suite.name);
    for f in &fixtures {
        let outcome = run_one(&mut ebpf, f);
        let mark = if outcome.is_ok() { "ok  " } else { "FAIL" };
        summary.push_str(&format!("{mark} {}\n", f.name));
        if let Err(e) = outcome {
            failures.push(format!("suite {}, fixture {}:\n{e:#}", suite.name, f.name));
        }
    }
    Ok(Report {
        total: fixtures.len(),
        failures,
        summary,
    })
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

fn run_one(ebpf: &mut Ebpf, f: &Fixture) -> Result<()> {
    if let Some(setup) = &f.setup {
        setup(ebpf).context("fixture set-up")?;
    }
    let ebpf = &*ebpf;
    let prog: &Xdp = ebpf
        .program(lb_userspace::loader::PROGRAM)
        .context("program xlb")?
        .try_into()?;
    let ctx = lab::xdp_md(
        f.linear_len.unwrap_or(f.input.len()) as u32,
        f.ingress.ifindex,
    );
    let mut out = vec![0u8; 4096];

    let before = lab::reasons(ebpf)?;
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(&f.input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            // Always 1: for XDP the kernel does not restore the frame between repeats.
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    let after = lab::reasons(ebpf)?;
    out.truncate(result.data_size_out as usize);

    let mut problems = Vec::new();
    if result.return_value != f.action {
        problems.push(format!(
            "action: expected {}, got {}",
            action_name(f.action),
            action_name(result.return_value)
        ));
    }
    let counted: Vec<String> = Reason::ALL
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a != b)
        .map(|(r, (b, a))| format!("{} +{}", r.name(), a.wrapping_sub(*b)))
        .collect();
    let expected_count = vec![format!("{} +1", f.reason.name())];
    if counted != expected_count {
        problems.push(format!(
            "REASONS: expected exactly {expected_count:?}, counted {counted:?}"
        ));
    }
    match &f.output {
        Output::Unchanged => {
            if out != f.input {
                problems.push(format!(
                    "output should be the input, unchanged:\n{}",
                    hex_diff(&f.input, &out)
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
            if &out != built {
                problems.push(format!(
                    "output differs from the frame built from scratch:\n{}",
                    hex_diff(built, &out)
                ));
            } else if let Err(e) = verify_checksums_v4(&out) {
                problems.push(format!("output checksums: {e}"));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "input: {}{}\nexpected: {}, {}\n{}",
        summary(&f.input),
        match f.linear_len {
            Some(n) => format!(" (the program sees the first {n})"),
            None => String::new(),
        },
        action_name(f.action),
        f.reason.name(),
        problems.join("\n")
    )
}

/// With a single SNAT port: port exhaustion, and a flow whose forward conntrack entry was
/// evicted while its reverse entry survived (it must get its old port back).
fn one_port_fixtures(model: &mut Model, fx0: Iface, fx1: Iface) -> Vec<Fixture> {
    let mut v = Vec::new();
    let from_client = |frame: Frame| frame.with_macs(CLIENT_MAC, fx0.mac);
    let client_a = sa(CLIENT, 40000);
    let vip = sa(VIP, 80);
    let a = model.new_flow(PROTO_TCP, client_a, vip, SNAT, sa(BACKEND, 8080));
    assert_eq!(a.to_backend.src.to_socket_v4().port(), 30000);

    let syn_a = from_client(Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    v.push(fx(
        "01 first flow gets the only SNAT port, 30000",
        fx0,
        syn_a.build(),
        XDP_REDIRECT,
        rewritten(&syn_a, &a.to_backend, Some((fx1.mac, BACKEND_MAC))),
        Reason::ForwardRedirect,
    ));
    let syn_b = from_client(Frame::tcp((CLIENT, 40001), (VIP, 80), TCP_SYN));
    v.push(fx(
        "02 second flow: no SNAT port left",
        fx0,
        syn_b.build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropSnatPortsExhausted,
    ));
    let reply = Frame::tcp((BACKEND, 8080), (SNAT, 30000), TCP_SYN | TCP_ACK)
        .with_macs(BACKEND_MAC, fx1.mac);
    v.push(fx(
        "03 reply to port 30000 goes to the first flow's client",
        fx1,
        reply.build(),
        XDP_REDIRECT,
        rewritten(&reply, &a.to_client, Some((fx0.mac, CLIENT_MAC))),
        Reason::ForwardRedirect,
    ));
    let ack_a = from_client(Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK));
    let forward_key = FlowKey {
        src: Endpoint::from_socket_v4(client_a),
        dst: Endpoint::from_socket_v4(vip),
        proto: PROTO_TCP,
        _pad: 0,
    };
    v.push(Fixture {
        setup: Some(Box::new(move |ebpf: &mut Ebpf| {
            let mut ct: HashMap<&mut MapData, FlowKey, NatEntry> = ebpf
                .map_mut(names::CONNTRACK)
                .context("map CONNTRACK")?
                .try_into()?;
            ct.remove(&forward_key)
                .context("removing the first flow's forward entry")
        })),
        ..fx(
            "04 first flow after its forward entry was evicted: keeps port 30000",
            fx0,
            ack_a.build(),
            XDP_REDIRECT,
            rewritten(&ack_a, &a.to_backend, Some((fx1.mac, BACKEND_MAC))),
            Reason::ForwardRedirect,
        )
    });
    v.push(fx(
        "05 second flow still finds no SNAT port",
        fx0,
        from_client(Frame::tcp((CLIENT, 40001), (VIP, 80), TCP_ACK)).build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropSnatPortsExhausted,
    ));
    // 06-08: idle flows give their SNAT port up. Set-ups age entries by writing a
    // last-seen time of 1 ns after boot, idle for as long as the machine has been up.
    let reverse_key_a = FlowKey {
        src: Endpoint::from_socket_v4(sa(BACKEND, 8080)),
        dst: Endpoint::from_socket_v4(sa(SNAT, 30000)),
        proto: PROTO_TCP,
        _pad: 0,
    };
    v.push(Fixture {
        setup: Some(age(vec![reverse_key_a])),
        ..fx(
            "06 first flow's reply direction idle, its client direction not: port stays taken",
            fx0,
            syn_b.build(),
            XDP_DROP,
            Output::Unchanged,
            Reason::DropSnatPortsExhausted,
        )
    });
    let b = NatEntry {
        src: Endpoint::from_socket_v4(sa(SNAT, 30000)),
        dst: Endpoint::from_socket_v4(sa(BACKEND, 8080)),
        direction: DIR_TO_BACKEND,
        ..NatEntry::default()
    };
    v.push(Fixture {
        setup: Some(age(vec![forward_key, reverse_key_a])),
        ..fx(
            "07 first flow idle both ways past tcp_idle_timeout: second flow takes port 30000",
            fx0,
            syn_b.build(),
            XDP_REDIRECT,
            rewritten(&syn_b, &b, Some((fx1.mac, BACKEND_MAC))),
            Reason::ForwardRedirect,
        )
    });
    v.push(fx(
        "08 the first flow's entries went with its port: its next packet is a new flow, and \
         finds no port (not the second flow's)",
        fx0,
        ack_a.build(),
        XDP_DROP,
        Output::Unchanged,
        Reason::DropSnatPortsExhausted,
    ));
    v
}
