//! The conntrack table under races and under the sweeper, through the real program with
//! BPF_PROG_TEST_RUN in the one-namespace lab (`xlb_tests::lab`):
//! * the same new flows sent from two CPUs at once, frame by frame in lock-step: every
//!   flow ends with one whole pair of entries, no port serves two flows, and both CPUs
//!   rewrote each flow the same way;
//! * two CPUs racing for SNAT ports the sweeper has just freed: each port goes to exactly one
//!   flow;
//! * the sweeper removes exactly the flows whose state's timeout has passed, both halves,
//!   and under pressure the idle new ones too. Which flows must go comes from the case
//!   table (state, idle time, timeouts), not from the program;
//! * a packet that only refreshes a flow's time leaves the twin entry's alone, and the
//!   sweeper keeps a flow that talks one way (either way; a NAT gateway's with its
//!   mapping) for its twin's time, reading the twin once;
//! * a NAT gateway's UDP mapping lives as long as a flow of its private endpoint does, and
//!   no longer (unless taken after the sweep began);
//! * the table takes its memory when made, as much as `xlb check` says (so do the Maglev
//!   tables), holds exactly its capacity, and one pinned by an xlb from before
//!   preallocation is adopted with a warning.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Barrier;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use lb_common::{
    conntrack::{FlowState, Timeouts},
    maps::{
        DIR_TO_BACKEND, Endpoint, FlowKey, MAPPING_PRIVATE, MAPPING_PUBLIC, Mapping, MappingKey,
        NatEntry, PROTO_TCP, PROTO_UDP, names,
    },
    reason::Reason,
};
use lb_userspace::{
    config::Checked,
    conntrack::{PRESSURE_NEW_IDLE, Table, monotonic_ns},
    footprint, loader,
    pins::PinDir,
    registry::Registry,
};
use xlb_tests::{
    lab::{self, BACKEND_MAC, CLIENT, CLIENT_MAC, Iface, SNAT, VIP},
    model::flows::key,
    netns::NetNs,
    packet::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, layout_v4},
    xlb::LeftPins,
};

const PREFIX: &str = "xlbct";

fn config(ports: [u16; 2], entries: u32) -> Checked {
    lab::checked(&format!(
        r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 251
snat_port_range = [{}, {}]
[conntrack]
entries = {entries}
[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
[[service]]
vip = "10.10.0.100:53"
protocol = "udp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:5353"
"#,
        ports[0], ports[1]
    ))
    .expect("a valid config")
}

/// A NAT gateway for the client subnet, out as 10.20.0.5 with ports 40000 to `last`.
fn gateway_config(last: u16) -> Checked {
    lab::checked(&format!(
        r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 13
[conntrack]
entries = 65536
[[nat_gateway]]
source = "10.10.1.0/24"
to = "10.20.0.5"
ports = [40000, {last}]
"#
    ))
    .expect("a valid config")
}

/// Runs `test` inside a fresh lab namespace.
fn in_lab<T: Send>(test: impl FnOnce(&NetNs) -> Result<T> + Send) -> T {
    lab::in_lab(PREFIX, test).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Each frame's reason and output, on one CPU.
type Outcomes = Vec<(Reason, Vec<u8>)>;

/// Sends `frames[0]` from CPU 0 and `frames[1]` from CPU 1 (arriving on `ingress`) through
/// the program at once, frame by frame in lock-step. Returns, per CPU, each frame's reason
/// (a drop counts as `DropSnatPortsExhausted`: both CPUs count at once, so the action is
/// what tells) and output.
fn from_two_cpus(
    ns: &NetNs,
    ebpf: &Ebpf,
    frames: [&[Vec<u8>]; 2],
    ingress: Iface,
) -> Result<[Outcomes; 2]> {
    let barrier = Barrier::new(2);
    let run_on = |cpu: usize, frames: &[Vec<u8>]| -> Result<Outcomes> {
        ns.enter(|| -> Result<Outcomes> {
            lab::pin_to(cpu)?;
            let mut out = Vec::with_capacity(frames.len());
            for f in frames {
                barrier.wait();
                let run = lab::run(ebpf, f, ingress.ifindex, None)?;
                // Both CPUs count into REASONS meanwhile: the reason is the one the action
                // says, checked against the other CPU's below.
                let reason = match run.action {
                    4 => Reason::ForwardRedirect,
                    1 => Reason::DropSnatPortsExhausted,
                    a => bail!("CPU {cpu}: action {a}"),
                };
                out.push((reason, run.frame));
            }
            Ok(out)
        })?
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_on(0, frames[0]));
        let b = s.spawn(|| run_on(1, frames[1]));
        (a.join(), b.join())
    });
    let (Ok(a), Ok(b)) = (a, b) else {
        bail!("a CPU's thread panicked");
    };
    Ok([a?, b?])
}

/// The same new TCP and UDP flows from two CPUs at once: one whole pair of entries per flow,
/// and the same rewrite on both CPUs.
#[test]
fn two_cpus_creating_the_same_flows_agree() {
    const FLOWS: u16 = 3000;
    in_lab(|ns| {
        // 4096 ports for 3000 flows of each protocol: the probes collide often, so the CPUs
        // race for the same port locks, not just for the same flows.
        let checked = config([40000, 44095], 1 << 16);
        let lab::Program { ebpf, fx0, .. } = lab::load(&checked)?;
        for (proto_name, frame) in [
            (
                "TCP SYN",
                Box::new(|p: u16| Frame::tcp((CLIENT, p), (VIP, 80), TCP_SYN))
                    as Box<dyn Fn(u16) -> Frame>,
            ),
            (
                "UDP",
                Box::new(|p: u16| Frame::udp((CLIENT, p), (VIP, 53), b"same datagram")),
            ),
        ] {
            let frames: Vec<Vec<u8>> = (0..FLOWS)
                .map(|i| frame(10000 + i).with_macs(CLIENT_MAC, fx0.mac).build())
                .collect();
            let [a, b] = from_two_cpus(ns, &ebpf, [&frames, &frames], fx0)?;
            for (i, ((ra, fa), (rb, fb))) in a.iter().zip(&b).enumerate() {
                ensure!(
                    *ra == Reason::ForwardRedirect && *rb == Reason::ForwardRedirect,
                    "{proto_name} {i}: {ra:?} on CPU 0, {rb:?} on CPU 1"
                );
                ensure!(
                    fa == fb,
                    "{proto_name} {i}: the two CPUs rewrote the flow differently: {:?} and {:?}",
                    layout_v4(fa).map(|l| l.flow_key(fa)),
                    layout_v4(fb).map(|l| l.flow_key(fb))
                );
            }
        }
        let entries = lab::conntrack(&ebpf)?;
        lab::check_whole_flows(&entries)?;
        ensure!(
            entries.len() == 4 * usize::from(FLOWS),
            "{} entries for {} flows",
            entries.len(),
            2 * FLOWS
        );
        Ok(())
    });
}

/// Ages both entries of the flow whose forward key is `forward` by `age`.
fn age(ebpf: &mut Ebpf, forward: &FlowKey, age: Duration) -> Result<()> {
    let twin_key = lab::conntrack_entry(ebpf, forward)?
        .context("aging a flow that is not there")?
        .twin_key(forward.proto);
    let when = monotonic_ns().saturating_sub(age.as_nanos() as u64);
    for k in [*forward, twin_key] {
        stamp(ebpf, &k, when).context("aging a flow with one half")?;
    }
    Ok(())
}

/// Sets the time of the one entry at `key` to `age` ago, and returns that time.
fn age_entry(ebpf: &mut Ebpf, key: &FlowKey, age: Duration) -> Result<u64> {
    let when = monotonic_ns().saturating_sub(age.as_nanos() as u64);
    stamp(ebpf, key, when)?;
    Ok(when)
}

/// Sets the time of the entry at `key` to `when`.
fn stamp(ebpf: &mut Ebpf, key: &FlowKey, when: u64) -> Result<()> {
    let mut e = lab::conntrack_entry(ebpf, key)?.with_context(|| format!("no entry at {key:?}"))?;
    e.last_seen_ns = when;
    put(ebpf, *key, e)
}

/// Every SNAT port held by a flow the sweeper has just removed: two CPUs send the first
/// packets of different new flows at once, and each port goes to exactly one of them.
#[test]
fn two_cpus_racing_for_freed_ports_get_one_each() {
    const PORTS: u16 = 16;
    const ROUNDS: u16 = 20;
    in_lab(|ns| {
        let checked = config([40000, 40000 + PORTS - 1], 4096);
        let lab::Program { mut ebpf, fx0, .. } = lab::load(&checked)?;
        let timeouts = checked.conntrack.timeouts();
        for round in 0..ROUNDS {
            // Flows that hold every port, idle for longer than any timeout.
            let holders: Vec<u16> = (0..PORTS).map(|i| 1000 + round * 100 + i).collect();
            for &p in &holders {
                let syn =
                    Frame::tcp((CLIENT, p), (VIP, 80), TCP_SYN).with_macs(CLIENT_MAC, fx0.mac);
                lab::run_forwarded(&ebpf, &syn.build(), fx0.ifindex, &format!("holder {p}"))?;
                age(
                    &mut ebpf,
                    &key(
                        SocketAddrV4::new(CLIENT, p),
                        SocketAddrV4::new(VIP, 80),
                        PROTO_TCP,
                    ),
                    Duration::from_secs(3600),
                )?;
            }
            let report = Table::open(&ebpf)?.sweep(&timeouts, false)?;
            ensure!(
                report.expired == u64::from(PORTS),
                "round {round}: {report:?}"
            );
            ensure!(
                lab::conntrack(&ebpf)?.is_empty(),
                "round {round}: the sweep left entries"
            );

            // CPU 0 and CPU 1 each send first packets of PORTS different flows.
            let frames: Vec<Vec<u8>> = (0..PORTS)
                .map(|i| {
                    Frame::tcp((CLIENT, 30000 + round * 100 + i), (VIP, 80), TCP_SYN)
                        .with_macs(CLIENT_MAC, fx0.mac)
                        .build()
                })
                .collect();
            let others: Vec<Vec<u8>> = (0..PORTS)
                .map(|i| {
                    Frame::tcp(
                        (Ipv4Addr::new(10, 10, 1, 3), 30000 + round * 100 + i),
                        (VIP, 80),
                        TCP_SYN,
                    )
                    .with_macs(CLIENT_MAC, fx0.mac)
                    .build()
                })
                .collect();
            let barrier = Barrier::new(2);
            let run_on = |cpu: usize, frames: &[Vec<u8>]| -> Result<usize> {
                ns.enter(|| -> Result<usize> {
                    lab::pin_to(cpu)?;
                    let mut won = 0;
                    for f in frames {
                        barrier.wait();
                        let run = lab::run(&ebpf, f, fx0.ifindex, None)?;
                        won += usize::from(run.action == 4);
                    }
                    Ok(won)
                })?
            };
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| run_on(0, &frames));
                let b = s.spawn(|| run_on(1, &others));
                (a.join(), b.join())
            });
            let (Ok(a), Ok(b)) = (a, b) else {
                bail!("a CPU's thread panicked");
            };
            let won = a? + b?;
            ensure!(
                won == usize::from(PORTS),
                "round {round}: {won} flows got one of {PORTS} ports"
            );
            let entries = lab::conntrack(&ebpf)?;
            lab::check_whole_flows(&entries)?;
            ensure!(
                entries.len() == 2 * usize::from(PORTS),
                "round {round}: {} entries",
                entries.len()
            );
            // Next round: these flows age and go too.
            for (k, e) in &entries {
                if e.rewrite.direction == DIR_TO_BACKEND {
                    age(&mut ebpf, k, Duration::from_secs(3600))?;
                }
            }
            Table::open(&ebpf)?.sweep(&timeouts, false)?;
        }
        Ok(())
    });
}

/// One flow of the sweeper's case table: the packets that put it in its state, how long
/// it has been idle, and whether the sweep must remove it.
struct SweepCase {
    name: &'static str,
    /// (TCP flags, from the client?) in order; `None` flags: a UDP datagram.
    packets: &'static [(Option<u8>, bool)],
    state: FlowState,
    idle: Duration,
    pressure: bool,
    removed: bool,
}

const SYN: Option<u8> = Some(TCP_SYN);
const SYN_ACK: Option<u8> = Some(TCP_SYN | TCP_ACK);
const ACK: Option<u8> = Some(TCP_ACK);
const FIN: Option<u8> = Some(TCP_FIN | TCP_ACK);
const UDP: Option<u8> = None;
const HANDSHAKE: &[(Option<u8>, bool)] = &[(SYN, true), (SYN_ACK, false), (ACK, true)];
const CLOSED: &[(Option<u8>, bool)] = &[
    (SYN, true),
    (SYN_ACK, false),
    (ACK, true),
    (FIN, true),
    (FIN, false),
];

/// Timeouts of the sweep cases, in seconds: all different, so a state judged by the wrong
/// timeout shows.
const TIMEOUTS: Timeouts = Timeouts {
    tcp_syn: 20,
    tcp_established: 300,
    tcp_closing: 40,
    tcp_time_wait: 60,
    udp: 80,
};

const SWEEP_CASES: &[SweepCase] = &[
    SweepCase {
        name: "new, idle past the SYN timeout",
        packets: &[(SYN, true)],
        state: FlowState::New,
        idle: Duration::from_secs(25),
        pressure: false,
        removed: true,
    },
    SweepCase {
        name: "new, within it",
        packets: &[(SYN, true), (SYN_ACK, false)],
        state: FlowState::New,
        idle: Duration::from_secs(15),
        pressure: false,
        removed: false,
    },
    SweepCase {
        name: "established, idle past the SYN timeout only",
        packets: HANDSHAKE,
        state: FlowState::Established,
        idle: Duration::from_secs(25),
        pressure: false,
        removed: false,
    },
    SweepCase {
        name: "established, idle past its own",
        packets: HANDSHAKE,
        state: FlowState::Established,
        idle: Duration::from_secs(305),
        pressure: false,
        removed: true,
    },
    SweepCase {
        name: "closing, idle past the closing timeout",
        packets: &[(SYN, true), (SYN_ACK, false), (ACK, true), (FIN, true)],
        state: FlowState::Closing,
        idle: Duration::from_secs(45),
        pressure: false,
        removed: true,
    },
    SweepCase {
        name: "time-wait, within it",
        packets: CLOSED,
        state: FlowState::TimeWait,
        idle: Duration::from_secs(45),
        pressure: false,
        removed: false,
    },
    SweepCase {
        name: "time-wait, past it",
        packets: CLOSED,
        state: FlowState::TimeWait,
        idle: Duration::from_secs(65),
        pressure: false,
        removed: true,
    },
    SweepCase {
        name: "UDP, within its timeout",
        packets: &[(UDP, true), (UDP, false)],
        state: FlowState::Established,
        idle: Duration::from_secs(75),
        pressure: false,
        removed: false,
    },
    SweepCase {
        name: "UDP unanswered, past it",
        packets: &[(UDP, true)],
        state: FlowState::New,
        idle: Duration::from_secs(85),
        pressure: false,
        removed: true,
    },
    SweepCase {
        name: "under pressure: new and idle a while",
        packets: &[(SYN, true), (SYN_ACK, false)],
        state: FlowState::New,
        idle: Duration::from_secs(1),
        pressure: true,
        removed: true,
    },
    SweepCase {
        name: "under pressure: new but just seen",
        packets: &[(SYN, true)],
        state: FlowState::New,
        idle: Duration::ZERO,
        pressure: true,
        removed: false,
    },
    SweepCase {
        name: "under pressure: established stays",
        packets: HANDSHAKE,
        state: FlowState::Established,
        idle: Duration::from_secs(25),
        pressure: true,
        removed: false,
    },
];

/// The sweeper removes exactly the flows the case table says, both halves, and counts the
/// rest by state.
#[test]
fn the_sweeper_removes_what_has_expired_and_nothing_else() {
    const _: () = assert!(PRESSURE_NEW_IDLE.as_millis() < 1000);
    in_lab(|_| {
        let checked = config([40000, 49999], 4096);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        for pressure in [false, true] {
            lab::reset(&mut ebpf, &checked)?;
            let cases: Vec<(usize, &SweepCase)> = SWEEP_CASES
                .iter()
                .enumerate()
                .filter(|(_, c)| c.pressure == pressure)
                .collect();
            let mut keys = Vec::new();
            for &(i, c) in &cases {
                let client = SocketAddrV4::new(CLIENT, 20000 + i as u16);
                let udp = c.packets[0].0.is_none();
                let (vip, backend) = if udp {
                    (
                        SocketAddrV4::new(VIP, 53),
                        SocketAddrV4::new(lab::BACKEND, 5353),
                    )
                } else {
                    (
                        SocketAddrV4::new(VIP, 80),
                        SocketAddrV4::new(lab::BACKEND, 8080),
                    )
                };
                let mut snat_port = 0;
                for &(flags, from_client) in c.packets {
                    let frame = match (flags, from_client) {
                        (Some(f), true) => {
                            Frame::tcp((*client.ip(), client.port()), (*vip.ip(), vip.port()), f)
                        }
                        (None, true) => {
                            Frame::udp((*client.ip(), client.port()), (*vip.ip(), vip.port()), b"q")
                        }
                        (Some(f), false) => {
                            Frame::tcp((*backend.ip(), backend.port()), (SNAT, snat_port), f)
                        }
                        (None, false) => {
                            Frame::udp((*backend.ip(), backend.port()), (SNAT, snat_port), b"a")
                        }
                    };
                    let (frame, ingress) = if from_client {
                        (frame.with_macs(CLIENT_MAC, fx0.mac), fx0)
                    } else {
                        (frame.with_macs(BACKEND_MAC, fx1.mac), fx1)
                    };
                    let run = lab::run_forwarded(&ebpf, &frame.build(), ingress.ifindex, c.name)?;
                    if from_client {
                        let out = layout_v4(&run.frame)
                            .context("output")?
                            .flow_key(&run.frame);
                        snat_port = u16::from_be_bytes(out.src.port);
                    }
                }
                let proto = if udp {
                    lb_common::maps::PROTO_UDP
                } else {
                    PROTO_TCP
                };
                let k = key(client, vip, proto);
                let entry = lab::conntrack_entry(&ebpf, &k)?.context("the case's flow")?;
                ensure!(
                    FlowState::of(proto, &entry.seen) == c.state,
                    "{}: set up as {:?}",
                    c.name,
                    FlowState::of(proto, &entry.seen)
                );
                age(&mut ebpf, &k, c.idle)?;
                keys.push((k, c));
            }
            let report = Table::open(&ebpf)?.sweep(&TIMEOUTS, pressure)?;
            let entries = lab::conntrack(&ebpf)?;
            lab::check_whole_flows(&entries)?;
            let mut left = [0u64; 5];
            for (k, c) in &keys {
                let there = entries.iter().any(|(e, _)| e == k);
                ensure!(
                    there != c.removed,
                    "{}: {}",
                    c.name,
                    if there { "kept" } else { "removed" }
                );
                if there {
                    left[c.state as usize] += 1;
                }
            }
            ensure!(
                report.flows == left,
                "flows by state: the sweep says {:?}, the cases {left:?}",
                report.flows
            );
            let gone = keys.iter().filter(|(_, c)| c.removed).count() as u64;
            ensure!(
                report.expired + report.pruned == gone,
                "{report:?}, {gone} should have gone"
            );
            ensure!(report.entries == entries.len() as u64, "{report:?}");
        }
        Ok(())
    });
}

/// The public endpoint each private endpoint's UDP flows left from: a NAT gateway's mapping
/// lives while one of them does, and goes with the last; one taken after a sweep began stays.
#[test]
fn a_gateways_mapping_lives_as_long_as_its_flows() {
    in_lab(|_| {
        let checked = gateway_config(40999);
        let lab::Program { mut ebpf, fx0, .. } = lab::load(&checked)?;
        // Sends a datagram from CLIENT:`port` to `to`; returns the public endpoint it left
        // from.
        let send = |ebpf: &Ebpf, port: u16, to: Ipv4Addr| -> Result<SocketAddrV4> {
            let frame = Frame::udp((CLIENT, port), (to, 53), b"q").with_macs(CLIENT_MAC, fx0.mac);
            let run = lab::run_forwarded(ebpf, &frame.build(), fx0.ifindex, "a datagram")?;
            let out = layout_v4(&run.frame)
                .context("output")?
                .flow_key(&run.frame);
            Ok(out.src.to_socket_v4())
        };
        let (a, b) = (lab::BACKEND, lab::SMALL_MTU_BACKEND);
        let p = send(&ebpf, 5000, a)?;
        ensure!(
            send(&ebpf, 5000, b)? == p,
            "one private endpoint, two public ones"
        );
        let q = send(&ebpf, 5001, a)?;
        ensure!(q != p, "two private endpoints share {p}");
        // The mappings, as (private, public) pairs, each side present.
        let pairs = |ebpf: &Ebpf| -> Result<Vec<(SocketAddrV4, SocketAddrV4)>> {
            let all = lab::mappings(ebpf)?;
            let mut pairs = Vec::new();
            for (k, m) in &all {
                if k.side == MAPPING_PRIVATE {
                    let back = all.iter().any(|(k2, m2)| {
                        k2.side == MAPPING_PUBLIC
                            && k2.endpoint == m.endpoint
                            && m2.endpoint == k.endpoint
                    });
                    ensure!(back, "a mapping without its public side: {k:?}");
                    pairs.push((k.endpoint.to_socket_v4(), m.endpoint.to_socket_v4()));
                }
            }
            ensure!(
                all.len() == 2 * pairs.len(),
                "mappings without a private side: {all:?}"
            );
            pairs.sort();
            Ok(pairs)
        };
        let (c0, c1) = (sa(CLIENT, 5000), sa(CLIENT, 5001));
        ensure!(
            pairs(&ebpf)? == vec![(c0, p), (c1, q)],
            "{:?}",
            pairs(&ebpf)?
        );

        let udp = |port: u16, to: Ipv4Addr| key(sa(CLIENT, port), sa(to, 53), PROTO_UDP);
        let expired = Duration::from_secs(TIMEOUTS.udp as u64 + 5);
        // The mappings were taken a moment ago, which keeps them through any sweep that
        // began within MAPPING_MARGIN of that: taken long ago, as their flows were.
        {
            let all = lab::mappings(&ebpf)?;
            let mut map: HashMap<&mut MapData, MappingKey, Mapping> = ebpf
                .map_mut(names::MAPPINGS)
                .context("MAPPINGS")?
                .try_into()?;
            for (k, mut m) in all {
                m.taken_ns = 1;
                map.insert(k, m, 0)?;
            }
        }
        // One of 5000's flows expires: its mapping stays for the other.
        age(&mut ebpf, &udp(5000, a), expired)?;
        Table::open(&ebpf)?.sweep(&TIMEOUTS, false)?;
        ensure!(
            pairs(&ebpf)? == vec![(c0, p), (c1, q)],
            "{:?}",
            pairs(&ebpf)?
        );
        // The other too: the mapping goes, both sides; 5001's stays.
        age(&mut ebpf, &udp(5000, b), expired)?;
        let report = Table::open(&ebpf)?.sweep(&TIMEOUTS, false)?;
        ensure!(pairs(&ebpf)? == vec![(c1, q)], "{:?}", pairs(&ebpf)?);
        ensure!(
            (report.mappings, report.mappings_removed) == (2, 2),
            "{report:?}"
        );
        // A mapping taken after the sweep began (a flow the sweep may not have read) stays
        // with no flow; one as old stays not.
        let mut map: HashMap<&mut MapData, MappingKey, Mapping> = ebpf
            .map_mut(names::MAPPINGS)
            .context("MAPPINGS")?
            .try_into()?;
        for (port, taken_ns) in [(6000, monotonic_ns() + 60_000_000_000), (6001, 1)] {
            let private = lb_common::maps::Endpoint::from_socket_v4(sa(CLIENT, port));
            let public =
                lb_common::maps::Endpoint::from_socket_v4(sa(Ipv4Addr::new(10, 20, 0, 5), port));
            for (side, from, to) in [
                (MAPPING_PRIVATE, private, public),
                (MAPPING_PUBLIC, public, private),
            ] {
                let k = MappingKey {
                    endpoint: from,
                    proto: PROTO_UDP,
                    side,
                };
                map.insert(
                    k,
                    Mapping {
                        endpoint: to,
                        _pad: [0; 6],
                        taken_ns,
                    },
                    0,
                )?;
            }
        }
        Table::open(&ebpf)?.sweep(&TIMEOUTS, false)?;
        let kept: Vec<u16> = pairs(&ebpf)?.iter().map(|(c, _)| c.port()).collect();
        ensure!(kept == vec![5001, 6000], "kept the mappings of {kept:?}");
        // 5000 sends again: a mapping anew, no one else's.
        let again = send(&ebpf, 5000, a)?;
        ensure!(again != q, "5000 got 5001's {q}");
        Ok(())
    });
}

/// One private endpoint's first datagrams to two destinations, from two CPUs at once: it
/// gets one public endpoint, whichever CPU maps it; a datagram that finds it mapped a moment
/// before by the other CPU is dropped (`drop/mapping_race`), never given a second one.
#[test]
fn two_cpus_mapping_one_private_endpoint_give_it_one_public_endpoint() {
    const ENDPOINTS: u16 = 2000;
    in_lab(|ns| {
        let checked = gateway_config(44095);
        let lab::Program { ebpf, fx0, .. } = lab::load(&checked)?;
        let to = |dst: Ipv4Addr| -> Vec<Vec<u8>> {
            (0..ENDPOINTS)
                .map(|i| {
                    Frame::udp((CLIENT, 10000 + i), (dst, 53), b"stun?")
                        .with_macs(CLIENT_MAC, fx0.mac)
                        .build()
                })
                .collect()
        };
        let (a_frames, b_frames) = (to(lab::BACKEND), to(lab::SMALL_MTU_BACKEND));
        let [a, b] = from_two_cpus(ns, &ebpf, [&a_frames, &b_frames], fx0)?;
        let source = |frame: &[u8]| -> Result<SocketAddrV4> {
            Ok(layout_v4(frame)
                .context("output")?
                .flow_key(frame)
                .src
                .to_socket_v4())
        };
        let forwarded = |r: &Reason| *r == Reason::ForwardRedirect;
        let mut public_of = std::collections::HashMap::new();
        let mut dropped = 0u64;
        for (i, ((ra, fa), (rb, fb))) in a.iter().zip(&b).enumerate() {
            let private = sa(CLIENT, 10000 + i as u16);
            let public = match (forwarded(ra), forwarded(rb)) {
                (true, true) => {
                    let (pa, pb) = (source(fa)?, source(fb)?);
                    ensure!(
                        pa == pb,
                        "{private} left as {pa} on CPU 0 and as {pb} on CPU 1"
                    );
                    pa
                }
                (true, false) => {
                    dropped += 1;
                    source(fa)?
                }
                (false, true) => {
                    dropped += 1;
                    source(fb)?
                }
                (false, false) => bail!("{private}: both datagrams dropped"),
            };
            public_of.insert(private, public);
        }
        // The mappings say the same: each private endpoint's public one, no one else's.
        let mut privates = 0;
        let mut publics = std::collections::HashSet::new();
        for (k, m) in lab::mappings(&ebpf)? {
            if k.side == MAPPING_PRIVATE {
                privates += 1;
                let private = k.endpoint.to_socket_v4();
                ensure!(
                    public_of.get(&private) == Some(&m.endpoint.to_socket_v4()),
                    "{private} is mapped to {}, but left as {:?}",
                    m.endpoint.to_socket_v4(),
                    public_of.get(&private)
                );
            } else {
                ensure!(publics.insert(k.endpoint), "{k:?} twice");
            }
        }
        ensure!(
            privates == ENDPOINTS as usize && publics.len() == ENDPOINTS as usize,
            "{privates} private and {} public sides for {ENDPOINTS} endpoints",
            publics.len()
        );
        let races = lab::reasons(&ebpf)?[Reason::DropMappingRace as usize];
        ensure!(
            races == dropped,
            "{dropped} datagrams dropped, {races} counted as races"
        );
        println!("{dropped} of {ENDPOINTS} endpoints met the other CPU mapping them");
        lab::check_whole_flows(&lab::conntrack(&ebpf)?)?;
        Ok(())
    });
}

/// A gateway's first datagram that finds its candidate taken for this very flow by another
/// CPU (the reverse entry and the public side of the mapping there, but no private side
/// and no forward entry yet: that CPU between its probe and its private side) writes the
/// private side itself. Had the private endpoint been mapped to another public one
/// meanwhile, the other CPU would give the candidate back and this packet be dropped; here
/// it is not, so the flow is made on the candidate, with both sides of its mapping.
#[test]
fn a_flow_found_half_made_gets_its_private_side() {
    in_lab(|_| {
        let checked = gateway_config(40999);
        let lab::Program { mut ebpf, fx0, .. } = lab::load(&checked)?;
        let frame = Frame::udp((CLIENT, 5000), (lab::BACKEND, 53), b"q")
            .with_macs(CLIENT_MAC, fx0.mac)
            .build();
        let source = |out: &[u8]| -> Result<Endpoint> {
            Ok(layout_v4(out).context("output")?.flow_key(out).src)
        };
        let first = lab::run_forwarded(&ebpf, &frame, fx0.ifindex, "the first datagram")?;
        let public = source(&first.frame)?;
        // Back to the state the other CPU leaves between its probe and its private side.
        remove(
            &mut ebpf,
            &key(sa(CLIENT, 5000), sa(lab::BACKEND, 53), PROTO_UDP),
        )?;
        let private = Endpoint::from_socket_v4(sa(CLIENT, 5000));
        {
            let mut map: HashMap<&mut MapData, MappingKey, Mapping> = ebpf
                .map_mut(names::MAPPINGS)
                .context("MAPPINGS")?
                .try_into()?;
            map.remove(&MappingKey {
                endpoint: private,
                proto: PROTO_UDP,
                side: MAPPING_PRIVATE,
            })?;
        }
        let again = lab::run_forwarded(&ebpf, &frame, fx0.ifindex, "the datagram again")?;
        ensure!(
            source(&again.frame)? == public,
            "the flow left from {:?}, not the candidate {public:?}",
            source(&again.frame)?
        );
        let all = lab::mappings(&ebpf)?;
        let has = |side: u8, from: Endpoint, to: Endpoint| {
            all.iter()
                .any(|(k, m)| k.side == side && k.endpoint == from && m.endpoint == to)
        };
        ensure!(
            has(MAPPING_PRIVATE, private, public) && has(MAPPING_PUBLIC, public, private),
            "the mapping's two sides are not both there: {all:?}"
        );
        ensure!(all.len() == 2, "mappings: {all:?}");
        lab::check_whole_flows(&lab::conntrack(&ebpf)?)?;
        Ok(())
    });
}

/// Writes `entry` at `key` in the conntrack table.
fn put(ebpf: &mut Ebpf, key: FlowKey, entry: NatEntry) -> Result<()> {
    let mut ct: HashMap<&mut MapData, FlowKey, NatEntry> = ebpf
        .map_mut(names::CONNTRACK)
        .context("map CONNTRACK")?
        .try_into()?;
    ct.insert(key, entry, 0)?;
    Ok(())
}

fn remove(ebpf: &mut Ebpf, key: &FlowKey) -> Result<()> {
    let mut ct: HashMap<&mut MapData, FlowKey, NatEntry> = ebpf
        .map_mut(names::CONNTRACK)
        .context("map CONNTRACK")?
        .try_into()?;
    ct.remove(key)?;
    Ok(())
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The table takes its whole capacity's memory when it is made, as much as the config says
/// (`table_bytes`, checked against the kernel's own account), and no more as it fills: every
/// flow up to the configured number is taken, and the next one is refused as the table is
/// full, not for want of memory.
#[test]
fn the_table_takes_its_memory_when_made_and_holds_its_capacity() {
    in_lab(|_| {
        const FLOWS: u16 = 100;
        let checked = config([40000, 60000], FLOWS.into());
        let lab::Program { ebpf, fx0, .. } = lab::load(&checked)?;
        let made = lab::memlock(&ebpf, names::CONNTRACK)?;
        // 200 entries of 160 bytes and 256 buckets of 16, by hand: 36,096 bytes. The kernel
        // adds its map's own structure (under 4 KiB) and, per possible CPU, a spare entry for
        // replacing values, its pointer and eight 4-byte lock counters: 200 bytes.
        let expected = checked.conntrack.table_bytes();
        ensure!(expected == 200 * 160 + 256 * 16, "estimate {expected}");
        // Possible CPUs (/sys/devices/system/cpu/possible).
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let per_cpu = 200 * cpus as u64;
        ensure!(
            made.checked_sub(expected + per_cpu)
                .is_some_and(|rest| rest < 4096),
            "the kernel accounts {made} bytes for the table, the estimate is {expected} \
             and {per_cpu} for the CPUs"
        );
        let syn = |port: u16| {
            Frame::tcp((CLIENT, port), (VIP, 80), TCP_SYN)
                .with_macs(CLIENT_MAC, fx0.mac)
                .build()
        };
        for i in 0..FLOWS {
            lab::run_forwarded(&ebpf, &syn(10000 + i), fx0.ifindex, "a SYN below capacity")?;
        }
        let run = lab::run(&ebpf, &syn(10000 + FLOWS), fx0.ifindex, None)?;
        ensure!(
            run.counted == [(Reason::DropConntrackFull, 1)],
            "the flow over capacity: {:?}",
            run.counted
        );
        let full = lab::memlock(&ebpf, names::CONNTRACK)?;
        ensure!(full == made, "{made} bytes made, {full} full");
        ensure!(lab::conntrack(&ebpf)?.len() == 2 * usize::from(FLOWS));
        // The maps sized with the table, which fill as flows come (none here): their
        // buckets, 256 of 16 bytes for MAPPINGS' 200 entries and 128 for RELEASED's 100,
        // with the same allowance as the table's.
        let companions =
            lab::memlock(&ebpf, names::MAPPINGS)? + lab::memlock(&ebpf, names::RELEASED)?;
        let expected = checked.conntrack.companions_bytes();
        ensure!(
            expected == (256 + 128) * 16
                && companions
                    .checked_sub(expected)
                    .is_some_and(|rest| rest < 2 * (4096 + per_cpu)),
            "the kernel accounts {companions} bytes for MAPPINGS and RELEASED, the estimate is \
             {expected}"
        );
        // The Maglev tables, the other big map `xlb run` counts before it starts: 64
        // services' two tables of 251 4-byte slots, 128,512 bytes, 32 pages by hand, and a
        // page the kernel adds for the map itself.
        let maglev = lab::memlock(&ebpf, names::MAGLEV)?;
        let expected = checked.dataplane.maglev_bytes();
        ensure!(
            expected == 32 * 4096
                && maglev
                    .checked_sub(expected)
                    .is_some_and(|rest| rest <= 4096),
            "the kernel accounts {maglev} bytes for the Maglev tables, the estimate is {expected}"
        );
        // Every other map (two dozen, per-CPU arrays among them), by the kernel's account,
        // against what `xlb run` counts for it: the kernel adds each map's own structure, a
        // page for a memory-mapped array, and a preallocated hash map's spare element and
        // lock counters per CPU.
        let others = footprint::other_maps(&checked, cpus as u64)?;
        ensure!(others.len() > 20, "{others:?}");
        for (name, estimate) in &others {
            let made = lab::memlock(&ebpf, name)?;
            ensure!(
                made.checked_sub(*estimate)
                    .is_some_and(|rest| rest <= 4096 + 128 * cpus as u64),
                "the kernel accounts {made} bytes for {name}, the estimate is {estimate}"
            );
        }
        let counted: Vec<&str> = others.iter().map(|(name, _)| name.as_str()).collect();
        for (name, _) in ebpf.maps() {
            ensure!(
                counted.contains(&name) || footprint::NAMED.contains(&name),
                "map {name} is not counted"
            );
        }
        Ok(())
    });
}

/// A conntrack table pinned by an xlb from before preallocation (made with
/// `BPF_F_NO_PREALLOC`) is adopted with its flows, and with a warning that says so; a
/// preallocated one is adopted without.
#[test]
fn an_adopted_table_made_without_preallocation_is_kept_with_a_warning() {
    in_lab(|_| {
        let dir = xlb_tests::xlb::test_pin_path("ct-pins");
        let _cleanup = LeftPins::at(dir.clone());
        let mut checked = config([40000, 60000], 1000);
        checked.dataplane.pin_path = dir.clone();

        let pins = PinDir::open(&checked)?;
        ensure!(
            !pins.adopted && pins.warnings.is_empty(),
            "{:?}",
            pins.warnings
        );
        // Made as a daemon makes them: loaded, then filled (which writes the layout version).
        let made = loader::load_pinned(&checked, &pins)?;
        Registry::load(&made, &checked)?;
        drop(made);
        drop(pins);
        let pins = PinDir::open(&checked)?;
        ensure!(pins.adopted, "the pinned maps were not adopted");
        ensure!(
            pins.warnings.is_empty(),
            "a preallocated table: {:?}",
            pins.warnings
        );
        drop(pins);

        // The older xlb's table: same key, value and capacity, allocated as flows come.
        let path = dir.join(names::CONNTRACK);
        std::fs::remove_file(&path)?;
        lab::pin_conntrack_without_preallocation(&path, checked.conntrack.map_entries())?;
        let flow = key(sa(CLIENT, 40000), sa(VIP, 80), PROTO_TCP);
        let entry = NatEntry {
            last_seen_ns: monotonic_ns(),
            ..NatEntry::default()
        };
        {
            let map = MapData::from_pin(&path)?;
            let mut old: HashMap<MapData, FlowKey, NatEntry> = Map::HashMap(map).try_into()?;
            old.insert(flow, entry, 0)?;
        }
        let pins = PinDir::open(&checked)?;
        ensure!(pins.adopted, "the older table was not adopted");
        ensure!(
            pins.warnings.len() == 1 && pins.warnings[0].contains("not preallocated"),
            "{:?}",
            pins.warnings
        );
        let ebpf = loader::load_pinned(&checked, &pins)?;
        ensure!(
            lab::conntrack_entry(&ebpf, &flow)? == Some(entry),
            "the older table's flow is gone"
        );
        Ok(())
    });
}

/// A pin directory has one owner at a time: a second daemon on it is refused, saying why,
/// after a moment's patience (a lock let go of stays held while a process forked meanwhile
/// shares it); once the first lets go, the next may take it.
#[test]
fn a_pin_directory_has_one_owner_at_a_time() {
    let dir = xlb_tests::xlb::test_pin_path("owner");
    let _cleanup = LeftPins::at(dir.clone());
    let mut checked = config([40000, 60000], 1000);
    checked.dataplane.pin_path = dir.clone();
    let first = PinDir::open(&checked).expect("the first owner");
    let asked = std::time::Instant::now();
    let refused = PinDir::open(&checked).err().expect("a second owner");
    assert!(
        refused
            .to_string()
            .starts_with("another xlb daemon owns the data plane pinned at"),
        "{refused:#}"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(400),
        "refused after {:?}, without waiting",
        asked.elapsed()
    );
    drop(first);
    PinDir::open(&checked).expect("the next owner, once the first let go");
}

/// A flow whose reverse entry survived while its forward one was lost gets it back on its
/// next packet; if the table is full, that packet is refused, and the reverse entry (the
/// flow's port) must stay: this run did not insert it, so it is not this run's to withdraw.
#[test]
fn a_flow_refused_a_forward_entry_keeps_its_reverse_one() {
    in_lab(|_| {
        let checked = config([40000, 40000], 1);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        let (client, vip) = (sa(CLIENT, 40000), sa(VIP, 80));
        let (backend, snat) = (sa(lab::BACKEND, 8080), sa(SNAT, 40000));
        let reverse_key = key(backend, snat, PROTO_TCP);
        let reverse = NatEntry {
            rewrite: lb_common::maps::Rewrite {
                src: lb_common::maps::Endpoint::from_socket_v4(vip),
                dst: lb_common::maps::Endpoint::from_socket_v4(client),
                service_id: 0,
                backend_id: 0,
                direction: lb_common::maps::DIR_TO_CLIENT,
                _pad: [0; 3],
            },
            ifindex: fx1.ifindex,
            last_seen_ns: monotonic_ns(),
            ..NatEntry::default()
        };
        put(&mut ebpf, reverse_key, reverse)?;
        // The table's other place taken by something else.
        let filler = key(sa(Ipv4Addr::new(10, 10, 1, 99), 1), vip, PROTO_TCP);
        put(&mut ebpf, filler, reverse)?;

        let ack = Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK).with_macs(CLIENT_MAC, fx0.mac);
        let run = lab::run(&ebpf, &ack.build(), fx0.ifindex, None)?;
        ensure!(
            run.counted == [(Reason::DropConntrackFull, 1)],
            "{:?}",
            run.counted
        );
        let held = lab::conntrack_entry(&ebpf, &reverse_key)?;
        ensure!(
            held.is_some_and(|e| e.rewrite == reverse.rewrite),
            "the flow's reverse entry was withdrawn: {held:?}"
        );
        Ok(())
    });
}

/// A flow whose reverse entry is gone while its forward one lives (another CPU creating the
/// same flow withdrew it, say) gets it back at the client's next packet that tells
/// something new, on the port it holds; the backend's replies reach the client again.
#[test]
fn a_lost_reverse_entry_is_made_again_from_the_forward_one() {
    in_lab(|_| {
        let checked = config([40000, 40000], 16);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        let run = |ebpf: &Ebpf, frame: Frame, ingress: Iface| -> Result<lab::Run> {
            lab::run(ebpf, &frame.build(), ingress.ifindex, None)
        };
        let forwarded = |ebpf: &Ebpf, frame: Frame, ingress: Iface, what: &str| {
            lab::run_forwarded(ebpf, &frame.build(), ingress.ifindex, what)
        };
        let client = |flags| Frame::tcp((CLIENT, 40000), (VIP, 80), flags);
        let reply = || {
            Frame::tcp((lab::BACKEND, 8080), (SNAT, 40000), TCP_SYN | TCP_ACK)
                .with_macs(BACKEND_MAC, fx1.mac)
        };
        let reverse_key = key(sa(lab::BACKEND, 8080), sa(SNAT, 40000), PROTO_TCP);

        forwarded(
            &ebpf,
            client(TCP_SYN).with_macs(CLIENT_MAC, fx0.mac),
            fx0,
            "the SYN",
        )?;
        remove(&mut ebpf, &reverse_key)?;
        let lost = run(&ebpf, reply(), fx1)?;
        ensure!(
            lost.counted == [(Reason::PassNoService, 1)],
            "a reply without its reverse entry: {:?}",
            lost.counted
        );

        // The client's ACK tells something new (a segment without SYN).
        forwarded(
            &ebpf,
            client(TCP_ACK).with_macs(CLIENT_MAC, fx0.mac),
            fx0,
            "the ACK",
        )?;
        let restored = lab::conntrack_entry(&ebpf, &reverse_key)?
            .context("the reverse entry was not made again")?;
        let want = lb_common::maps::Rewrite {
            src: lb_common::maps::Endpoint::from_socket_v4(sa(VIP, 80)),
            dst: lb_common::maps::Endpoint::from_socket_v4(sa(CLIENT, 40000)),
            service_id: 0,
            backend_id: 0,
            direction: lb_common::maps::DIR_TO_CLIENT,
            _pad: [0; 3],
        };
        ensure!(
            restored.rewrite == want,
            "restored as {:?}",
            restored.rewrite
        );
        let back = forwarded(&ebpf, reply(), fx1, "the reply after the restore")?;
        let out = layout_v4(&back.frame)
            .context("the forwarded reply parses")?
            .flow_key(&back.frame);
        ensure!(
            out.dst == lb_common::maps::Endpoint::from_socket_v4(sa(CLIENT, 40000)),
            "the reply went to {:?}",
            out.dst
        );
        lab::check_whole_flows(&lab::conntrack(&ebpf)?)?;

        // The sweeper removing the flow, expired, takes the reverse entry first: a client
        // packet that tells something new (a FIN; one that only refreshes the time does not
        // look for the twin) between that and the forward entry's removal makes the reverse
        // entry again, but as old as the flow was, so it is an orphan the next sweep
        // removes, not one that keeps the port for a whole timeout.
        let forward_key = key(sa(CLIENT, 40000), sa(VIP, 80), PROTO_TCP);
        age(
            &mut ebpf,
            &forward_key,
            Duration::from_secs(TIMEOUTS.tcp_established as u64 + 10),
        )?;
        remove(&mut ebpf, &reverse_key)?;
        forwarded(
            &ebpf,
            client(TCP_FIN | TCP_ACK).with_macs(CLIENT_MAC, fx0.mac),
            fx0,
            "the late FIN",
        )?;
        ensure!(
            lab::conntrack_entry(&ebpf, &reverse_key)?.is_some(),
            "the late packet did not make the reverse entry again"
        );
        remove(&mut ebpf, &forward_key)?;
        let report = Table::open(&ebpf)?.sweep(&TIMEOUTS, false)?;
        let left = lab::conntrack(&ebpf)?;
        ensure!(
            report.orphans == 1 && left.is_empty(),
            "the sweep after: {report:?}, left {left:?}"
        );
        Ok(())
    });
}

/// A closed flow whose forward entry is gone while its reverse one is left (the sweeper
/// between its two removals, or a creation that lost a race) is made again by the client's
/// next SYN over that reverse entry: a SYN on a closed flow starts it anew, as on a flow
/// whose entries both live, so the new connection is tracked as new, not as the old one's
/// close (whose short timeout, and ended start in the open-flow count, it would get).
#[test]
fn a_syn_over_a_closed_flows_surviving_reverse_entry_starts_it_anew() {
    in_lab(|_| {
        let checked = config([40000, 40000], 16);
        let lab::Program { mut ebpf, fx0, .. } = lab::load(&checked)?;
        let client = |flags| {
            Frame::tcp((CLIENT, 40000), (VIP, 80), flags)
                .with_macs(CLIENT_MAC, fx0.mac)
                .build()
        };
        let forward_key = key(sa(CLIENT, 40000), sa(VIP, 80), PROTO_TCP);
        let reverse_key = key(sa(lab::BACKEND, 8080), sa(SNAT, 40000), PROTO_TCP);
        let state = |ebpf: &Ebpf, key: &FlowKey| -> Result<FlowState> {
            let entry = lab::conntrack_entry(ebpf, key)?.context("no entry")?;
            Ok(FlowState::of(PROTO_TCP, &entry.seen))
        };

        lab::run_forwarded(&ebpf, &client(TCP_SYN), fx0.ifindex, "the SYN")?;
        lab::run_forwarded(&ebpf, &client(TCP_RST), fx0.ifindex, "the RST")?;
        ensure!(
            state(&ebpf, &reverse_key)? == FlowState::Closed,
            "after the RST: {:?}",
            state(&ebpf, &reverse_key)?
        );
        remove(&mut ebpf, &forward_key)?;

        lab::run_forwarded(&ebpf, &client(TCP_SYN), fx0.ifindex, "the new SYN")?;
        let forward = lab::conntrack_entry(&ebpf, &forward_key)?.context("no forward entry")?;
        ensure!(
            forward.rewrite.src == lb_common::maps::Endpoint::from_socket_v4(sa(SNAT, 40000)),
            "the new connection left from {:?}, not over the reverse entry left",
            forward.rewrite.src
        );
        for (which, k) in [("forward", &forward_key), ("reverse", &reverse_key)] {
            let now = state(&ebpf, k)?;
            ensure!(
                now == FlowState::New,
                "the new connection's {which} entry says {now:?}, not New"
            );
        }
        Ok(())
    });
}

/// The sweeper removes a flow's reverse entry first, and a new flow may take its key before
/// the forward entry goes: a packet of the old flow must then not write into the new flow's
/// entry.
#[test]
fn a_flow_never_records_into_another_flows_entry() {
    in_lab(|_| {
        let checked = config([40000, 40000], 16);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        let send = |ebpf: &Ebpf, frame: Frame, ingress: Iface| -> Result<()> {
            lab::run_forwarded(ebpf, &frame.build(), ingress.ifindex, "a packet")?;
            Ok(())
        };
        let c =
            |flags| Frame::tcp((CLIENT, 40000), (VIP, 80), flags).with_macs(CLIENT_MAC, fx0.mac);
        let b = |flags| {
            Frame::tcp((lab::BACKEND, 8080), (SNAT, 40000), flags).with_macs(BACKEND_MAC, fx1.mac)
        };
        send(&ebpf, c(TCP_SYN), fx0)?;
        send(&ebpf, b(TCP_SYN | TCP_ACK), fx1)?;
        send(&ebpf, c(TCP_ACK), fx0)?;
        // The flow's reverse entry now belongs to another client's flow.
        let reverse_key = key(sa(lab::BACKEND, 8080), sa(SNAT, 40000), PROTO_TCP);
        let mut other = lab::conntrack_entry(&ebpf, &reverse_key)?.context("the reverse entry")?;
        remove(&mut ebpf, &reverse_key)?;
        other.rewrite.dst =
            lb_common::maps::Endpoint::from_socket_v4(sa(Ipv4Addr::new(10, 10, 1, 3), 5555));
        put(&mut ebpf, reverse_key, other)?;

        send(&ebpf, c(TCP_FIN | TCP_ACK), fx0)?;
        let after = lab::conntrack_entry(&ebpf, &reverse_key)?.context("the other flow's entry")?;
        ensure!(
            after.seen == other.seen,
            "the old flow's FIN was recorded into another flow's entry: {:?} became {:?}",
            other.seen,
            after.seen
        );
        Ok(())
    });
}

/// Under pressure the sweeper prunes new flows idle for 100 ms. A new flow that is still
/// sending (a one-way UDP stream, say) must not look idle: the program keeps its entry's
/// time exact, and the sweeper judges a flow by the fresher of its two entries.
#[test]
fn pressure_spares_a_new_flow_that_is_still_sending() {
    in_lab(|_| {
        let checked = config([40000, 40999], 16);
        let lab::Program { mut ebpf, fx0, .. } = lab::load(&checked)?;
        let datagram =
            Frame::udp((CLIENT, 5000), (VIP, 53), b"one way").with_macs(CLIENT_MAC, fx0.mac);
        let forward = key(sa(CLIENT, 5000), sa(VIP, 53), lb_common::maps::PROTO_UDP);
        let timeouts = checked.conntrack.timeouts();
        for round in 0..5 {
            lab::run_forwarded(&ebpf, &datagram.build(), fx0.ifindex, "a datagram")?;
            // Both entries 300 ms old (under the half-second refresh), then one more
            // datagram: it refreshes the forward entry only.
            age(&mut ebpf, &forward, Duration::from_millis(300))?;
            lab::run_forwarded(
                &ebpf,
                &datagram.build(),
                fx0.ifindex,
                "a datagram 300 ms after the last",
            )?;
            let report = Table::open(&ebpf)?.sweep(&timeouts, true)?;
            ensure!(
                report.pruned == 0 && lab::conntrack_entry(&ebpf, &forward)?.is_some(),
                "round {round}: a sending new flow was pruned: {report:?}"
            );
        }
        // Once it stops sending, it goes.
        age(&mut ebpf, &forward, Duration::from_millis(300))?;
        let report = Table::open(&ebpf)?.sweep(&timeouts, true)?;
        ensure!(report.pruned == 1, "{report:?}");
        Ok(())
    });
}

/// The time of the entry at `key`.
fn seen_at(ebpf: &Ebpf, key: &FlowKey) -> Result<u64> {
    Ok(lab::conntrack_entry(ebpf, key)?
        .with_context(|| format!("no entry at {key:?}"))?
        .last_seen_ns)
}

/// A packet that only refreshes its entry's time (idle past the refresh interval, nothing
/// new to record) leaves the twin's time alone once the flow is past `New`; one that tells
/// something new stamps both; and while the flow is new, every refresh stamps both.
#[test]
fn a_refresh_stamps_the_twin_only_when_the_packet_tells_something() {
    in_lab(|_| {
        let checked = config([40000, 40000], 16);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        let from_client = |flags| {
            Frame::tcp((CLIENT, 7000), (VIP, 80), flags)
                .with_macs(CLIENT_MAC, fx0.mac)
                .build()
        };
        let forward = key(sa(CLIENT, 7000), sa(VIP, 80), PROTO_TCP);
        let reverse = key(sa(lab::BACKEND, 8080), sa(SNAT, 40000), PROTO_TCP);
        lab::run_forwarded(&ebpf, &from_client(TCP_SYN), fx0.ifindex, "the SYN")?;
        let syn_ack = Frame::tcp((lab::BACKEND, 8080), (SNAT, 40000), TCP_SYN | TCP_ACK)
            .with_macs(BACKEND_MAC, fx1.mac);
        lab::run_forwarded(&ebpf, &syn_ack.build(), fx1.ifindex, "the SYN-ACK")?;
        lab::run_forwarded(&ebpf, &from_client(TCP_ACK), fx0.ifindex, "the ACK")?;
        let entry = lab::conntrack_entry(&ebpf, &forward)?.context("the flow")?;
        ensure!(
            FlowState::of(PROTO_TCP, &entry.seen) == FlowState::Established,
            "set up as {:?}",
            FlowState::of(PROTO_TCP, &entry.seen)
        );

        // Both entries two seconds old; an ACK, which tells nothing new.
        let old = Duration::from_secs(2);
        let forward_then = age_entry(&mut ebpf, &forward, old)?;
        let reverse_then = age_entry(&mut ebpf, &reverse, old)?;
        lab::run_forwarded(&ebpf, &from_client(TCP_ACK), fx0.ifindex, "a later ACK")?;
        let refreshed = forward_then + old.as_nanos() as u64 / 2;
        ensure!(
            seen_at(&ebpf, &forward)? > refreshed,
            "the ACK did not refresh its own entry"
        );
        ensure!(
            seen_at(&ebpf, &reverse)? == reverse_then,
            "an ACK that tells nothing new stamped the twin"
        );

        // A FIN tells something new: both.
        lab::run_forwarded(&ebpf, &from_client(TCP_FIN | TCP_ACK), fx0.ifindex, "a FIN")?;
        ensure!(
            seen_at(&ebpf, &reverse)? > reverse_then + old.as_nanos() as u64 / 2,
            "the FIN did not stamp the twin"
        );
        lab::check_whole_flows(&lab::conntrack(&ebpf)?)?;

        // A new UDP flow (no answer yet): a refresh stamps both.
        let datagram = Frame::udp((CLIENT, 7001), (VIP, 53), b"q").with_macs(CLIENT_MAC, fx0.mac);
        lab::run_forwarded(&ebpf, &datagram.build(), fx0.ifindex, "a datagram")?;
        let udp_forward = key(sa(CLIENT, 7001), sa(VIP, 53), PROTO_UDP);
        let udp_reverse = lab::conntrack_entry(&ebpf, &udp_forward)?
            .context("the UDP flow")?
            .twin_key(PROTO_UDP);
        age_entry(&mut ebpf, &udp_forward, old)?;
        let reverse_then = age_entry(&mut ebpf, &udp_reverse, old)?;
        lab::run_forwarded(&ebpf, &datagram.build(), fx0.ifindex, "a later datagram")?;
        ensure!(
            seen_at(&ebpf, &udp_reverse)? > reverse_then + old.as_nanos() as u64 / 2,
            "a new flow's refresh did not stamp the twin"
        );
        Ok(())
    });
}

/// A flow that talks one way only has an entry that looks done by its own time: the
/// sweeper reads its twin, keeps the flow, and judges the entry by the twin's time from
/// then on without reading it again; the flow goes once that time has run out too. Both
/// ways: a backend talking to a silent client (the forward entry is the stale one), and a
/// client talking to a silent backend (the reverse one). `xlb flows` shows a flow as last
/// seen when its fresher entry was.
#[test]
fn a_flow_that_talks_one_way_is_judged_by_its_twins_time() {
    in_lab(|_| {
        let checked = config([40000, 40001], 16);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        let timeouts = Timeouts { udp: 2, ..TIMEOUTS };
        // A UDP flow from CLIENT:`port`, answered: its forward and reverse keys.
        let answered = |ebpf: &Ebpf, port: u16| -> Result<(FlowKey, FlowKey)> {
            let datagram =
                Frame::udp((CLIENT, port), (VIP, 53), b"q").with_macs(CLIENT_MAC, fx0.mac);
            let run = lab::run_forwarded(ebpf, &datagram.build(), fx0.ifindex, "a datagram")?;
            let snat = layout_v4(&run.frame)
                .context("output")?
                .flow_key(&run.frame)
                .src
                .to_socket_v4();
            let answer = Frame::udp((lab::BACKEND, 5353), (*snat.ip(), snat.port()), b"a")
                .with_macs(BACKEND_MAC, fx1.mac);
            lab::run_forwarded(ebpf, &answer.build(), fx1.ifindex, "an answer")?;
            Ok((
                key(sa(CLIENT, port), sa(VIP, 53), PROTO_UDP),
                key(sa(lab::BACKEND, 5353), snat, PROTO_UDP),
            ))
        };
        let (pushed, pushed_reverse) = answered(&ebpf, 7002)?;
        let (streamed, streamed_reverse) = answered(&ebpf, 7003)?;
        // One client fell silent 3 s ago while its backend still sends; the other backend
        // fell silent while its client still sends.
        age_entry(&mut ebpf, &pushed, Duration::from_secs(3))?;
        age_entry(&mut ebpf, &streamed_reverse, Duration::from_secs(3))?;
        let fresh = [seen_at(&ebpf, &pushed_reverse)?, seen_at(&ebpf, &streamed)?];

        let mut table = Table::open(&ebpf)?;
        let mut listed: Vec<(FlowKey, u64)> = table
            .flows(10)?
            .into_iter()
            .map(|(k, e)| (k, e.last_seen_ns))
            .collect();
        listed.sort_by_key(|(k, _)| k.src.port);
        ensure!(
            listed == [(pushed, fresh[0]), (streamed, fresh[1])],
            "xlb flows: {listed:?}, the fresher entries last seen at {fresh:?}"
        );
        let first = table.sweep(&timeouts, false)?;
        ensure!(
            first.kept_by_twin == 2 && first.expired == 0 && first.orphans == 0,
            "the first sweep: {first:?}"
        );
        let second = table.sweep(&timeouts, false)?;
        ensure!(
            second.kept_by_twin == 0 && second.expired == 0 && second.total_flows() == 2,
            "the second sweep read a twin again, or removed a flow: {second:?}"
        );
        ensure!(
            lab::conntrack(&ebpf)?.len() == 4,
            "a flow lost an entry to the sweeps"
        );

        // The talking sides fall silent too: once their times have run out (the timeout,
        // and the refresh's slack), the flows go, both entries.
        let out = Duration::from_secs(2) + Duration::from_millis(600);
        let last_seen = fresh[0].max(fresh[1]);
        let wait = (last_seen + out.as_nanos() as u64).saturating_sub(monotonic_ns());
        std::thread::sleep(Duration::from_nanos(wait));
        let last = table.sweep(&timeouts, false)?;
        ensure!(last.expired == 2 && last.total_flows() == 0, "{last:?}");
        ensure!(lab::conntrack(&ebpf)?.is_empty(), "entries left");
        Ok(())
    });
}

/// A NAT gateway's UDP flow whose private host fell silent while the far end still sends:
/// the sweeps that judge it by its twin's time keep its mapping too.
#[test]
fn a_one_way_gateway_flow_keeps_its_mapping() {
    in_lab(|_| {
        let checked = gateway_config(40999);
        let lab::Program { mut ebpf, fx0, fx1 } = lab::load(&checked)?;
        let timeouts = Timeouts { udp: 2, ..TIMEOUTS };
        let datagram =
            Frame::udp((CLIENT, 5100), (lab::BACKEND, 53), b"q").with_macs(CLIENT_MAC, fx0.mac);
        let run = lab::run_forwarded(&ebpf, &datagram.build(), fx0.ifindex, "a datagram")?;
        let public = layout_v4(&run.frame)
            .context("output")?
            .flow_key(&run.frame)
            .src
            .to_socket_v4();
        let answer = Frame::udp((lab::BACKEND, 53), (*public.ip(), public.port()), b"a")
            .with_macs(BACKEND_MAC, fx1.mac);
        lab::run_forwarded(&ebpf, &answer.build(), fx1.ifindex, "the answer")?;
        // Mappings taken long ago, as a long flow's are (see
        // `a_gateways_mapping_lives_as_long_as_its_flows`).
        let mappings = lab::mappings(&ebpf)?;
        ensure!(mappings.len() == 2, "the mapping's two sides: {mappings:?}");
        {
            let mut map: HashMap<&mut MapData, MappingKey, Mapping> = ebpf
                .map_mut(names::MAPPINGS)
                .context("MAPPINGS")?
                .try_into()?;
            for (k, mut m) in mappings.clone() {
                m.taken_ns = 1;
                map.insert(k, m, 0)?;
            }
        }
        let forward = key(sa(CLIENT, 5100), sa(lab::BACKEND, 53), PROTO_UDP);
        age_entry(&mut ebpf, &forward, Duration::from_secs(3))?;
        let mut table = Table::open(&ebpf)?;
        for sweep in ["first", "second"] {
            let report = table.sweep(&timeouts, false)?;
            ensure!(
                report.total_flows() == 1 && report.mappings_removed == 0,
                "the {sweep} sweep: {report:?}"
            );
            let left: Vec<MappingKey> = lab::mappings(&ebpf)?.into_iter().map(|(k, _)| k).collect();
            ensure!(
                left.len() == 2,
                "after the {sweep} sweep, the mapping's sides left: {left:?}"
            );
        }
        Ok(())
    });
}
