//! Random frames through the real XDP program, checked against the reference model
//! (`xlb_tests::model`).
//!
//! Tens of thousands of frames go through BPF_PROG_TEST_RUN: well-formed TCP and UDP, IPv4
//! and IPv6, to the VIPs (full NAT and dnat services) and elsewhere, out through a NAT
//! gateway (and pings through it), packets and replies of flows already
//! tracked, with random TCP flags (so flows open, close, reset and start anew), pings, ICMP
//! errors quoting tracked flows' packets (either way, cut anywhere) and untracked ones, and
//! frames with a random version, IHL, total length, TTL, options, fragment bits or
//! ethertype, or cut short; IPv6 ones with extension headers (walked, fragments, too many,
//! kinds not walked), IPv4-mapped addresses, UDP without a checksum, and ICMPv6. An IPv6
//! frame's verdict up to the flows is what its layout by RFC 8200 (`parse_v6`) says. Whatever comes in, the program must:
//! * never abort (XDP_ABORTED), and count exactly one reason whose action it returns;
//! * leave every frame it does not rewrite byte for byte as it was;
//! * rewrite what it forwards as the flow model says, which learns flows only from the
//!   config and from what the program sent out (never from its maps): a new flow leaves from
//!   its service's SNAT address toward one of its backends, keeps its backend and port, owns
//!   its (backend, SNAT address, port) alone, and its replies go from the VIP to its client;
//!   a gateway's flow keeps its destination, leaves from the gateway's pool and ports, and a
//!   UDP one from its private endpoint's one public endpoint;
//!   with the right MACs (or the handoff mark), TTL, and valid checksums when the input's were;
//! * leave to the kernel, untouched and counted as such, what is for no service and no
//!   gateway;
//! * answer pings to a VIP, and translate an ICMP error about a tracked flow as the model's
//!   reference translation says (outer and quoted headers, every checksum; the router's
//!   address kept where the flow's sources are not translated), and nothing else;
//! * and, in the end, hold whole flows only, each in the state the model reached by applying
//!   lb-common's rules to the packets it saw, and have counted in its service and backend
//!   counters exactly the packets and bytes that left rewritten.
//!
//! The seed is fixed so a failure reproduces; `XLB_RANDOM_SEED` and `XLB_RANDOM_FRAMES`
//! change it and the count.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use lb_common::{
    conntrack::FlowState,
    maps::{DIR_TO_BACKEND, FlowKey, FlowStats, PROTO_TCP, PROTO_UDP, names},
    reason::Reason,
};
use xlb_tests::{
    lab::{self, BACKEND_MAC, CLIENT, CLIENT_MAC, FX0_MAC, FX1_MAC, Iface, VIP, VIP_UNRESOLVED},
    model::{
        FlowModel, echo_reply_v4, echo_reply_v6, echo_rewrite_v4, echo_rewrite_v6, echo_v6,
        flow_key, flows::key, icmp_error_v4, icmp_error_v6, icmp_layout_v4, icmp_quote_v4,
        icmp_quote_v6, icmp_quoted_check_off, icmp6_quoted_check_off, is_icmp_error, nat_rewrite,
        rewrite::IcmpLayout,
    },
    packet::{
        ETH_HLEN, ETH_P_IPV6, Frame, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
        ICMP_FRAG_NEEDED, ICMP_PARAM_PROBLEM, ICMP_TIME_EXCEEDED, ICMPV6_ECHO_REPLY,
        ICMPV6_ECHO_REQUEST, ICMPV6_NEIGHBOUR_SOLICITATION, ICMPV6_PACKET_TOO_BIG,
        ICMPV6_TIME_EXCEEDED, IP_MF, IPV4_HLEN, IPV6_DEST_OPTIONS, IPV6_FRAGMENT, IPV6_HLEN,
        IPV6_HOP_BY_HOP, IPV6_NONE, IPV6_ROUTING, L4, PROTO_ICMP, PROTO_ICMPV6, hex_diff,
        icmp_echo, icmp_error, icmp_message, icmp6_message, layout, parse_v6, summary, untag,
        verify_checksums,
    },
};

const CONFIG: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
maglev_table_size = 251
[conntrack]
entries = 131072
[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
# A pool of two SNAT addresses.
[[service]]
vip = "10.10.0.100:53"
protocol = "udp"
snat = ["10.20.0.1", "10.20.0.2"]
[[service.backend]]
address = "10.20.1.2:5353"
[[service]]
vip = "10.10.0.103:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.9:8080"
# Two dnat services that share a backend: a client port used toward both takes one.
[[service]]
vip = "10.10.0.104:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "10.20.1.2:8080"
[[service]]
vip = "10.10.0.105:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "10.20.1.2:8080"
[[service]]
vip = "10.10.0.104:53"
protocol = "udp"
mode = "dnat"
[[service.backend]]
address = "10.20.1.2:5353"
# IPv6: full NAT for TCP and UDP, dnat for TCP.
[[service]]
vip = "[2001:db8:10::100]:80"
protocol = "tcp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:20:1::2]:8080"
[[service]]
vip = "[2001:db8:10::100]:53"
protocol = "udp"
snat = ["2001:db8:20::1", "2001:db8:20::2"]
[[service.backend]]
address = "[2001:db8:20:1::2]:5353"
[[service]]
vip = "[2001:db8:10::104]:80"
protocol = "tcp"
mode = "dnat"
[[service.backend]]
address = "[2001:db8:20:1::2]:8080"
# The upper half of the client link goes out through a NAT gateway, in both families.
[[nat_gateway]]
source = "2001:db8:10:1:8000::/65"
to = ["2001:db8:20::5", "2001:db8:20::6"]
ports = [40000, 40999]
[[nat_gateway]]
source = "10.10.1.128/25"
to = ["10.20.0.5", "10.20.0.6"]
ports = [40000, 40999]
"#;

/// xorshift64*: small, deterministic, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_frames_match_the_reference_model() {
    let seed = env_u64("XLB_RANDOM_SEED", 0x786c_6221_5eed);
    let frames = env_u64("XLB_RANDOM_FRAMES", 100_000);
    let (histogram, states) = lab::in_lab("xlbrnd", |_| run(seed, frames))
        .unwrap_or_else(|e| panic!("seed {seed:#x}: {e:#}"));

    println!("{frames} random frames (seed {seed:#x}):");
    for (name, n) in &histogram {
        println!("  {name:28} {n}");
    }
    println!("flows by state at the end: {states:?}");
    // The generator must reach every path worth testing, or the test proves little.
    for reason in [
        Reason::ForwardRedirect,
        Reason::ForwardResolveNeighbour,
        Reason::PassNotIp,
        Reason::PassNotTcpUdp,
        Reason::PassNoService,
        Reason::PassFragment,
        Reason::PassTtlExpired,
        Reason::DropTruncated,
        Reason::DropBadIpv4Header,
        Reason::DropFragment,
        Reason::DropRstNoFlow,
        Reason::DropWrongInterface,
        Reason::PassIcmp,
        Reason::PassIcmpUntracked,
        Reason::DropDnatTupleTaken,
        Reason::DropBadIpv6Header,
        Reason::PassIpv6Extensions,
        Reason::DropUdpZeroChecksum,
        Reason::DropForgedHandoff,
    ] {
        let n = histogram.get(reason.name()).copied().unwrap_or(0);
        assert!(
            n >= frames / 1000,
            "only {n} frames ended as {}",
            reason.name()
        );
    }
    for (outcome, per) in [
        ("(icmp echo answered)", 100),
        ("(icmp error translated)", 100),
        ("(gateway flow packet)", 100),
        ("(gateway echo packet)", 1000),
        ("(icmp error about a ping translated)", 1000),
        ("(ipv6 flow packet)", 100),
        ("(icmpv6 echo answered)", 1000),
        ("(icmpv6 error translated)", 1000),
        ("(icmpv6 error about a ping translated)", 10000),
        ("(ipv6 gateway flow packet)", 1000),
        ("(ipv6 gateway echo packet)", 10000),
    ] {
        let n = histogram.get(outcome).copied().unwrap_or(0);
        assert!(n >= frames / per, "only {n} frames: {outcome}");
    }
    for state in FlowState::ALL {
        let n = states.get(state.name()).copied().unwrap_or(0);
        // Time-wait needs a FIN each way on one flow: the rarest.
        assert!(n >= frames / 4000, "only {n} flows ended {}", state.name());
    }
}

/// A number from the environment: decimal, or hexadecimal with a `0x` prefix.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        })
        .unwrap_or(default)
}

type Histogram = BTreeMap<&'static str, u64>;

fn run(seed: u64, frames: u64) -> Result<(Histogram, Histogram)> {
    let checked = lab::checked(CONFIG)?;
    let lab::Program { ebpf, fx0, fx1 } = lab::load(&checked)?;
    let mut rng = Rng(seed | 1);
    let mut model = FlowModel::new(&checked);
    // Inputs of flows the program forwarded, to send again (conntrack hits) and to answer.
    let mut tracked: Vec<Frame> = Vec::new();
    // The same for IPv6 flows (ICMP errors quote IPv4 ones only: ICMPv6 errors are not
    // translated yet).
    let mut tracked6: Vec<Frame> = Vec::new();
    let mut histogram = BTreeMap::new();
    // Packets and bytes of the frames that left rewritten: what the service (and gateway)
    // counters must add up to; the backend counters, less the gateways' flows.
    let (mut rewritten, mut rewritten_bytes) = (0u64, 0u64);
    let (mut through_gateways, mut through_gateways_bytes) = (0u64, 0u64);

    for i in 0..frames {
        let (mut frame, ingress) = random_frame(&mut rng, [&tracked, &tracked6], &model, fx0, fx1);
        // Now and then a frame from the wire that carries the handoff mark.
        if rng.chance(1) {
            frame = frame.with_macs(CLIENT_MAC, lab::HANDOFF_DMAC);
        }
        let input = frame.build();
        if input.len() < ETH_HLEN {
            continue; // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        }
        let reason = run_and_check(&ebpf, &mut model, &input, ingress, fx0, fx1)
            .with_context(|| format!("frame {i}: {}", summary(&input)))?;
        if untag(&input).is_some() {
            *histogram.entry("(vlan-tagged frame)").or_insert(0) += 1;
        }
        // Counted by the whole frame, tag and all; classified by what is behind the tag.
        let bytes = input.len() as u64;
        let input = untag(&input).map_or(input, |(plain, _)| plain);
        *histogram.entry(reason.name()).or_insert(0) += 1;
        let forwarded = matches!(
            reason,
            Reason::ForwardTx
                | Reason::ForwardRedirect
                | Reason::ForwardResolveNeighbour
                | Reason::PassFibOther
        );
        let icmp = icmp_layout_v4(&input);
        let echo_flow = is_echo_flow(&model, &input);
        if let Some(l) = &icmp
            && forwarded
            && !echo_flow
        {
            let what = if l.kind == ICMP_ECHO_REQUEST {
                "(icmp echo answered)"
            } else if icmp_quote_v4(&input).is_some_and(|(.., proto)| proto == PROTO_ICMP) {
                "(icmp error about a ping translated)"
            } else {
                "(icmp error translated)"
            };
            *histogram.entry(what).or_insert(0) += 1;
        }
        // ICMPv6 is never a flow's: what of it is forwarded is a ping answered or an error
        // translated (which the flow counters count, as IPv4's).
        let v6 = parse_v6(&input).ok();
        let icmp6 = v6.as_ref().is_some_and(|l| l.proto == PROTO_ICMPV6);
        let error6 = icmp6 && icmp_quote_v6(&input).is_some();
        if forwarded && icmp6 && !echo_flow {
            let what = if icmp_quote_v6(&input).is_some_and(|(.., proto, _)| proto == PROTO_ICMPV6)
            {
                "(icmpv6 error about a ping translated)"
            } else if error6 {
                "(icmpv6 error translated)"
            } else {
                "(icmpv6 echo answered)"
            };
            *histogram.entry(what).or_insert(0) += 1;
        }
        if forwarded && !icmp6 && v6.is_some() {
            *histogram.entry("(ipv6 flow packet)").or_insert(0) += 1;
        }
        // Echo replies to pings of a VIP belong to no flow: the flow counters do not count
        // them.
        let answered = (icmp6 && !error6 && !echo_flow)
            || (icmp.is_some()
                && !echo_flow
                && icmp.as_ref().is_some_and(|l| l.kind == ICMP_ECHO_REQUEST));
        if forwarded && !answered {
            rewritten += 1;
            rewritten_bytes += bytes;
            // The flow it belongs to: its own, or an error's, the flow it quotes.
            let flow_key = flow_key(&input)
                .or_else(|| icmp_quote_v4(&input).map(|(qs, qd, proto)| key(qd, qs, proto)))
                .or_else(|| icmp_quote_v6(&input).map(|(qs, qd, proto, _)| key(qd, qs, proto)));
            let gateway = flow_key
                .and_then(|k| model.flow(&k))
                .is_some_and(|(f, _)| f.gateway);
            if gateway {
                through_gateways += 1;
                through_gateways_bytes += bytes;
                let what = if echo_flow {
                    "(gateway echo packet)"
                } else {
                    "(gateway flow packet)"
                };
                *histogram.entry(what).or_insert(0) += 1;
                if v6.is_some() {
                    let what = if echo_flow {
                        "(ipv6 gateway echo packet)"
                    } else {
                        "(ipv6 gateway flow packet)"
                    };
                    *histogram.entry(what).or_insert(0) += 1;
                }
            }
        }
        if matches!(reason, Reason::ForwardTx | Reason::ForwardRedirect)
            && ingress == fx0
            && (icmp.is_none() || echo_flow)
            && (!icmp6 || echo_flow)
        {
            if frame.v6.is_some() {
                tracked6.push(frame);
            } else {
                tracked.push(frame);
            }
        }
    }

    // The table holds whole flows, the model's and no others, each in the model's state.
    let entries = lab::conntrack(&ebpf)?;
    lab::check_whole_flows(&entries)?;
    ensure!(
        entries.len() == 2 * model.len(),
        "{} conntrack entries for the model's {} flows",
        entries.len(),
        model.len()
    );
    let mut states = BTreeMap::new();
    for flow in model.flows() {
        let key = flow.forward_key();
        let entry = lab::conntrack_entry(&ebpf, &key)?
            .with_context(|| format!("the model's flow {flow:?} has no entry"))?;
        let state = FlowState::of(key.proto, &entry.seen);
        ensure!(
            state == flow.state(),
            "flow {flow:?}: the program says {state:?}, the model {:?} ({:?} against the \
             model's {:?})",
            flow.state(),
            entry.seen,
            flow.seen
        );
        *states.entry(state.name()).or_insert(0) += 1;
    }

    // Gateways take ids after the services'.
    let services = (checked.services.len() + checked.gateways.len()) as u32;
    let backends: u32 = checked
        .services
        .iter()
        .map(|s| s.backends.len() as u32)
        .sum();
    for (map, count, want) in [
        (names::SERVICE_STATS, services, (rewritten, rewritten_bytes)),
        (
            names::BACKEND_STATS,
            backends,
            (
                rewritten - through_gateways,
                rewritten_bytes - through_gateways_bytes,
            ),
        ),
    ] {
        let (packets, bytes) = flow_stats_total(&ebpf, map, count)?;
        ensure!(
            (packets, bytes) == want,
            "{map} counts {packets} packets / {bytes} bytes, but {} frames / {} bytes left \
             rewritten that it counts",
            want.0,
            want.1
        );
    }
    Ok((histogram, states))
}

/// Packets and bytes, both directions, summed over the first `count` entries and all CPUs.
fn flow_stats_total(ebpf: &Ebpf, map: &str, count: u32) -> Result<(u64, u64)> {
    let stats: PerCpuArray<&MapData, FlowStats> = ebpf
        .map(map)
        .with_context(|| format!("map {map}"))?
        .try_into()?;
    let mut total = FlowStats::default();
    for i in 0..count {
        for cpu in stats.get(&i, 0)?.iter() {
            total.add(cpu);
        }
    }
    Ok((
        total.packets_in + total.packets_out,
        total.bytes_in + total.bytes_out,
    ))
}

/// A frame and the interface it arrives on.
fn random_frame(
    rng: &mut Rng,
    [tracked4, tracked6]: [&[Frame]; 2],
    model: &FlowModel,
    fx0: Iface,
    fx1: Iface,
) -> (Frame, Iface) {
    let roll = rng.below(100);
    let mut icmp = false;
    // One tracked flow in four is an IPv6 one, when there are.
    let tracked = if rng.chance(25) && !tracked6.is_empty() {
        tracked6
    } else {
        tracked4
    };
    let (mut frame, ingress) = if (35..47).contains(&roll) {
        icmp = true;
        random_icmp(rng, tracked4, model, fx0, fx1)
    } else if (47..62).contains(&roll) {
        let (frame, ingress) = if !tracked6.is_empty() && rng.chance(25) {
            random_icmp6_error(rng, tracked6, model, fx0, fx1)
        } else {
            random_v6(rng, fx0)
        };
        icmp = frame.l4.proto() == PROTO_ICMPV6;
        (frame, ingress)
    } else if roll < 20 && !tracked.is_empty() {
        // Another packet of a tracked flow, with random flags (a ping: another sequence
        // number and data).
        let mut f = tracked[rng.below(tracked.len() as u64) as usize].clone();
        f.l4 = random_l4(rng, &f.l4);
        if f.l4.proto() == PROTO_ICMP {
            icmp = true;
            let id = u16::from_be_bytes([f.payload[4], f.payload[5]]);
            let len = rng.below(56) as usize;
            f.payload = icmp_echo(id, rng.next() as u16, &rng.bytes(len));
        }
        if f.l4.proto() == PROTO_ICMPV6
            && let Some((src, dst)) = f.v6
        {
            icmp = true;
            let (id, len) = ([f.payload[4], f.payload[5]], rng.below(56) as usize);
            let [s0, s1] = (rng.next() as u16).to_be_bytes();
            let data = rng.bytes(len);
            f.payload = icmp6_message(
                src,
                dst,
                ICMPV6_ECHO_REQUEST,
                0,
                [id[0], id[1], s0, s1],
                &data,
            );
        }
        (f, fx0)
    } else if roll < 35 && !tracked.is_empty() {
        // The backend's reply to a tracked flow, with random flags: to the SNAT port the
        // model says the flow has (a ping's: an echo reply to its public identifier).
        let f = &tracked[rng.below(tracked.len() as u64) as usize];
        let (snat, backend) = model
            .rewrite(&key_of(f))
            .expect("tracked frames are the model's flows");
        let mut reply = Frame {
            sport: backend.port(),
            dport: snat.port(),
            l4: random_l4(rng, &f.l4),
            ..Frame::default()
        };
        match (backend.ip(), snat.ip()) {
            (IpAddr::V4(b), IpAddr::V4(s)) => (reply.src, reply.dst) = (b, s),
            (IpAddr::V6(b), IpAddr::V6(s)) => {
                reply.v6 = Some((b, s));
                reply.ethertype = ETH_P_IPV6;
            }
            _ => panic!("a flow of two families"),
        }
        if f.l4.proto() == PROTO_ICMP {
            icmp = true;
            let [i0, i1] = snat.port().to_be_bytes();
            let [s0, s1] = (rng.next() as u16).to_be_bytes();
            let len = rng.below(56) as usize;
            reply.payload = icmp_message(ICMP_ECHO_REPLY, 0, [i0, i1, s0, s1], &rng.bytes(len));
        }
        if f.l4.proto() == PROTO_ICMPV6
            && let Some((b, s)) = reply.v6
        {
            icmp = true;
            let [i0, i1] = snat.port().to_be_bytes();
            let [s0, s1] = (rng.next() as u16).to_be_bytes();
            let len = rng.below(56) as usize;
            let data = rng.bytes(len);
            reply.payload = icmp6_message(b, s, ICMPV6_ECHO_REPLY, 0, [i0, i1, s0, s1], &data);
        }
        (reply.with_macs(BACKEND_MAC, FX1_MAC), fx1)
    } else {
        // Something new from the client side (from the gateway's half of it, now and then
        // to the outside).
        let client = match rng.below(10) {
            0..=5 => CLIENT,
            6..=7 => Ipv4Addr::new(10, 10, 1, 128 + rng.below(120) as u8),
            _ => Ipv4Addr::new(10, 10, 1, 2 + rng.below(200) as u8),
        };
        let sport = 1024 + rng.below(200) as u16;
        let dst = match rng.below(16) {
            0..=5 => VIP,
            6 => VIP_UNRESOLVED,
            7 => DNAT_VIP,
            8 => DNAT_VIP_TWIN,
            9..=12 => outside(rng),
            _ => Ipv4Addr::new(10, 10, rng.below(3) as u8, rng.below(256) as u8),
        };
        let frame = if rng.chance(60) {
            let l4 = random_l4(
                rng,
                &L4::Tcp {
                    flags: 0,
                    seq: 1000,
                    ack: 0,
                },
            );
            Frame {
                l4,
                ..Frame::tcp((client, sport), (dst, 80), 0)
            }
        } else {
            let mut f = Frame::udp((client, sport), (dst, 53), &[]);
            f.l4 = L4::Udp {
                checksum: rng.chance(70),
            };
            f
        };
        (frame.with_macs(CLIENT_MAC, FX0_MAC), fx0)
    };

    if icmp {
        if rng.chance(5) {
            // A wrong ICMP checksum.
            frame.payload[2] ^= 1 << rng.below(8);
        }
    } else {
        let len = rng.below(48) as usize;
        frame.payload = rng.bytes(len);
    }
    frame.id = rng.next() as u16;
    if rng.chance(10) {
        frame.dport = rng.next() as u16;
    }
    if rng.chance(8) {
        frame.ttl = rng.below(3) as u8;
    }
    if rng.chance(10) {
        let len = 4 * rng.below(11) as usize;
        frame.ip_options = rng.bytes(len);
    }
    if rng.chance(8) {
        frame.frags = match rng.below(3) {
            0 => IP_MF,
            1 => 1 + rng.below(0x1fff) as u16,
            _ => IP_MF | (1 + rng.below(100) as u16),
        };
    }
    if rng.chance(4) {
        frame.l4 = L4::Other {
            proto: rng.next() as u8,
        };
    }
    if frame.v6.is_some() {
        mangle_v6(rng, &mut frame);
    }
    if rng.chance(3) {
        frame.ethertype =
            [0x86dd, 0x0800, 0x8100, 0x0806, rng.next() as u16][rng.below(5) as usize];
    }
    if rng.chance(10) {
        // An 802.1Q tag (a second one now and then, through `ethertype` above: QinQ).
        frame.vlan = Some(rng.next() as u16);
    }
    if rng.chance(4) {
        frame.version_override = Some(rng.below(16) as u8);
    }
    if rng.chance(5) {
        frame.ihl_override = Some(rng.below(16) as u8);
    }
    if rng.chance(5) {
        frame.tot_len_override = Some(rng.below(200) as u16);
    }
    if rng.chance(3) {
        frame.pad_to = Some(60 + rng.below(40) as usize);
    }
    if rng.chance(6) {
        frame.truncate_to = Some(ETH_HLEN + rng.below(70) as usize);
    }
    (frame, ingress)
}

/// The IPv6 services' VIPs (see CONFIG), and addresses of the lab's that are not.
const VIP6_DNAT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x104);
const LAB_OWN: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(10, 10, 1, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 20, 1, 1)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 1)),
];

/// Something new over IPv6 from the client side: TCP or UDP to the IPv6 VIPs or elsewhere,
/// or ICMPv6 (a ping to a VIP or not, a neighbour solicitation, any other type).
fn random_v6(rng: &mut Rng, fx0: Iface) -> (Frame, Iface) {
    let client = match rng.below(10) {
        0..=5 => lab::CLIENT6,
        // The NAT gateway's half of the link, now and then to the outside.
        6..=7 => Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x10,
            1,
            0x8000,
            0,
            0,
            2 + rng.below(100) as u16,
        ),
        _ => Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 2 + rng.below(200) as u16),
    };
    let dst = match rng.below(14) {
        0..=6 => lab::VIP6,
        7..=8 => VIP6_DNAT,
        9 => lab::BACKEND6,
        10 => lab::UNRESOLVED_BACKEND6,
        11 => Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 1),
        12 => Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1),
        _ => Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1),
    };
    let sport = 1024 + rng.below(200) as u16;
    let frame = match rng.below(20) {
        0..=11 => Frame {
            l4: random_l4(
                rng,
                &L4::Tcp {
                    flags: 0,
                    seq: 1000,
                    ack: 0,
                },
            ),
            ..Frame::tcp6((client, sport), (dst, 80), 0)
        },
        12..=17 => {
            let mut f = Frame::udp6((client, sport), (dst, 53), &[]);
            f.l4 = L4::Udp {
                checksum: rng.chance(88),
            };
            f
        }
        _ => {
            let (kind, code) = match rng.below(10) {
                0..=5 => (ICMPV6_ECHO_REQUEST, 0),
                6 => (ICMPV6_ECHO_REQUEST, 1),
                7 => (ICMPV6_NEIGHBOUR_SOLICITATION, 0),
                _ => (rng.next() as u8, 0),
            };
            let len = rng.below(56) as usize;
            let rest = [0, rng.next() as u8, 0, rng.next() as u8];
            Frame::icmp6(
                client,
                dst,
                icmp6_message(client, dst, kind, code, rest, &rng.bytes(len)),
            )
        }
    };
    (frame.with_macs(CLIENT_MAC, FX0_MAC), fx0)
}

/// IPv6's own malformations: extension headers (of the kinds walked, a fragment header
/// first, later or whole, and kinds that are not), more of them than the program walks, and
/// IPv4-mapped addresses.
fn mangle_v6(rng: &mut Rng, frame: &mut Frame) {
    if rng.chance(15) {
        let n = 1 + rng.below(5) as usize;
        frame.ext_headers = (0..n)
            .map(|_| match rng.below(10) {
                0..=2 => (IPV6_HOP_BY_HOP, ext_body(rng)),
                3..=4 => (IPV6_DEST_OPTIONS, ext_body(rng)),
                5 => (IPV6_ROUTING, ext_body(rng)),
                6..=8 => {
                    let offset: u16 = match rng.below(3) {
                        0 => 1,                                // first, more to come
                        1 => (1 + rng.below(100) as u16) << 3, // later
                        _ => 0,                                // whole (atomic)
                    };
                    let [o0, o1] = offset.to_be_bytes();
                    (IPV6_FRAGMENT, vec![o0, o1, 0, 0, 0, 1])
                }
                _ => (
                    [50, 51, IPV6_NONE, 135][rng.below(4) as usize],
                    ext_body(rng),
                ),
            })
            .collect();
    }
    if rng.chance(1) {
        let mapped = Ipv4Addr::new(10, 10, 0, 100).to_ipv6_mapped();
        if let Some((src, dst)) = frame.v6.as_mut() {
            if rng.chance(50) {
                *src = mapped;
            } else {
                *dst = mapped;
            }
        }
    }
}

/// The bytes of an extension header after its first two: 6, 14 or 22 of them.
fn ext_body(rng: &mut Rng) -> Vec<u8> {
    let len = [6, 14, 22][rng.below(3) as usize];
    rng.bytes(len)
}

/// A destination beyond the NAT gateway: the lab's hosts on fx1 (resolved, not, behind a
/// small MTU), its own addresses, an unrouted one, a blackholed one.
fn outside(rng: &mut Rng) -> Ipv4Addr {
    match rng.below(10) {
        0..=4 => lab::BACKEND,
        5 => lab::UNRESOLVED_BACKEND,
        6 => lab::SMALL_MTU_BACKEND,
        7 => Ipv4Addr::new(10, 20, 1, 1),
        8 => Ipv4Addr::new(10, 99, 0, 1),
        _ => Ipv4Addr::new(10, 30, 0, 1),
    }
}

/// The NAT gateway's public addresses (see CONFIG).
const GATEWAY_TO: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 20, 0, 5), Ipv4Addr::new(10, 20, 0, 6)];

/// Whether the program takes `frame` as a flow's packet although it is ICMP: an echo request
/// or reply, whole, but a request to a VIP (which it answers).
fn is_echo_flow(model: &FlowModel, frame: &[u8]) -> bool {
    if let Some((_, request)) = echo_v6(frame) {
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap());
        return !request || !model.is_vip(dst.into());
    }
    let Some(l) = icmp_layout_v4(frame) else {
        return false;
    };
    let dst = Ipv4Addr::new(
        frame[ETH_HLEN + 16],
        frame[ETH_HLEN + 17],
        frame[ETH_HLEN + 18],
        frame[ETH_HLEN + 19],
    );
    match (l.kind, l.code) {
        (ICMP_ECHO_REQUEST, 0) => !model.is_vip(dst.into()),
        (ICMP_ECHO_REPLY, 0) => true,
        _ => false,
    }
}

/// The dnat services' VIPs (see CONFIG).
const DNAT_VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 104);
const DNAT_VIP_TWIN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 105);

/// An ICMP message and the interface it arrives on: a ping (to a VIP, or not), or an error
/// from a router on either side quoting a packet xlb sent for a tracked flow, either way,
/// or a packet of no flow; quotes cut anywhere, from nothing to the whole packet.
fn random_icmp(
    rng: &mut Rng,
    tracked: &[Frame],
    model: &FlowModel,
    fx0: Iface,
    fx1: Iface,
) -> (Frame, Iface) {
    let client = if rng.chance(70) {
        CLIENT
    } else {
        Ipv4Addr::new(10, 10, 1, 2 + rng.below(200) as u8)
    };
    if rng.chance(10) {
        // An echo reply from the outside to a public address of the gateway, for an
        // identifier it may or may not have handed out.
        let len = rng.below(56) as usize;
        let id = 40000 + rng.below(1000) as u16;
        let reply = Frame {
            src: lab::BACKEND,
            dst: GATEWAY_TO[rng.below(2) as usize],
            l4: L4::Other { proto: PROTO_ICMP },
            payload: icmp_message(
                ICMP_ECHO_REPLY,
                0,
                [(id >> 8) as u8, id as u8, 0, 1],
                &rng.bytes(len),
            ),
            ..Frame::default()
        };
        return (reply.with_macs(BACKEND_MAC, FX1_MAC), fx1);
    }
    if rng.chance(40) {
        let client = if rng.chance(40) {
            Ipv4Addr::new(10, 10, 1, 128 + rng.below(120) as u8)
        } else {
            client
        };
        let dst = match rng.below(8) {
            0..=2 => VIP,
            3 => DNAT_VIP,
            4 => Ipv4Addr::new(10, 10, 1, 1),
            5..=6 => outside(rng),
            _ => Ipv4Addr::new(10, 10, rng.below(3) as u8, rng.below(256) as u8),
        };
        let len = rng.below(56) as usize;
        let data = rng.bytes(len);
        let (id, seq) = (rng.next() as u16, rng.next() as u16);
        let payload = match rng.below(10) {
            0 => icmp_message(ICMP_ECHO_REQUEST, 1, [0; 4], &data),
            1 => icmp_message(0, 0, [0; 4], &data),
            _ => icmp_echo(id, seq, &data),
        };
        let ping = Frame {
            src: client,
            dst,
            l4: L4::Other { proto: PROTO_ICMP },
            payload,
            ..Frame::default()
        };
        return (ping.with_macs(CLIENT_MAC, FX0_MAC), fx0);
    }

    let mut pick = (!tracked.is_empty() && rng.chance(85))
        .then(|| &tracked[rng.below(tracked.len() as u64) as usize]);
    if pick.is_some()
        && let Some(ping) = now_and_then_a_ping(rng, tracked, PROTO_ICMP)
    {
        pick = Some(ping);
    }
    // A quoted ping (a tracked echo through the gateway): its type and identifier.
    let mut echo = None;
    let client_router = Ipv4Addr::new(10, 10, 1, 200 + rng.below(50) as u8);
    let backend_router = Ipv4Addr::new(10, 20, 1, 200 + rng.below(50) as u8);
    // The quoted packet (as xlb sent it), who reports it, to whom, and on which side.
    let (mut quoted, router, to, client_side) = match pick {
        Some(f) if rng.chance(50) => {
            // xlb's reply toward the client, VIP → client, reported to the VIP.
            let q = Frame {
                src: f.dst,
                sport: f.dport,
                dst: f.src,
                dport: f.sport,
                ..f.clone()
            };
            if f.l4.proto() == PROTO_ICMP {
                // The echo reply xlb sent the private host, with its own identifier.
                echo = Some((ICMP_ECHO_REPLY, [f.payload[4], f.payload[5]]));
            }
            (q, client_router, f.dst, true)
        }
        Some(f) => {
            // xlb's packet toward the backend, SNAT → backend, reported to the SNAT address
            // (the client's own in dnat).
            let (snat, backend) = model
                .rewrite(&key_of(f))
                .expect("tracked frames are the model's flows");
            let q = Frame {
                src: ip4(snat),
                sport: snat.port(),
                dst: ip4(backend),
                dport: backend.port(),
                ..f.clone()
            };
            if f.l4.proto() == PROTO_ICMP {
                // The echo request xlb sent out, with the public identifier.
                echo = Some((ICMP_ECHO_REQUEST, snat.port().to_be_bytes()));
            }
            (q, backend_router, ip4(snat), false)
        }
        None => {
            let q = Frame::tcp(
                (VIP, 80),
                (client, rng.next() as u16),
                0x12, // SYN-ACK
            );
            (q, client_router, VIP, true)
        }
    };
    // A well-formed packet, as xlb sent it: the malformations of the frame it came from
    // (lengths, padding) are not what an error quotes.
    quoted = Frame {
        vlan: None,
        tot_len_override: None,
        ihl_override: None,
        version_override: None,
        pad_to: None,
        truncate_to: None,
        ..quoted
    };
    quoted.l4 = random_l4(rng, &quoted.l4);
    if let L4::Udp { .. } = quoted.l4 {
        quoted.l4 = L4::Udp {
            checksum: rng.chance(80),
        };
    }
    let len = rng.below(40) as usize;
    quoted.payload = rng.bytes(len);
    if echo.is_none() && matches!(quoted.l4, L4::Other { .. }) {
        // A TCP or UDP packet built as raw bytes (a tracked frame whose protocol number was
        // drawn at random): at least the 8 bytes an error quotes.
        quoted.payload = rng.bytes(len.max(8));
    }
    if let Some((kind, [i0, i1])) = echo {
        let [s0, s1] = (rng.next() as u16).to_be_bytes();
        quoted.payload = icmp_message(kind, 0, [i0, i1, s0, s1], &quoted.payload);
    }
    if rng.chance(20) {
        let len = 4 * rng.below(11) as usize;
        quoted.ip_options = rng.bytes(len);
    }
    let whole = quoted.build()[ETH_HLEN..].to_vec();
    let header = IPV4_HLEN + quoted.ip_options.len();
    let cut = match rng.below(6) {
        0 | 1 => header + 8,
        2 | 3 => whole.len(),
        4 => header + 8 + rng.below((whole.len() - header - 8) as u64 + 1) as usize,
        _ => rng.below(header as u64 + 8) as usize,
    };
    let (kind, code) = match rng.below(10) {
        0..=3 => (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED),
        4 => (ICMP_DEST_UNREACH, rng.below(16) as u8),
        5..=6 => (ICMP_TIME_EXCEEDED, rng.below(2) as u8),
        7 => (ICMP_PARAM_PROBLEM, 0),
        _ => (rng.below(20) as u8, 0),
    };
    // Now and then on the other side's interface: an error about a flow must come from the
    // path its quoted packet took; sent from a router of either side (a host on the wrong
    // side may use its own address).
    let wrong_side = rng.chance(5);
    let router = match (wrong_side, client_side, rng.chance(50)) {
        (true, true, true) => backend_router,
        (true, false, true) => client_router,
        _ => router,
    };
    let error = Frame {
        src: router,
        dst: to,
        ttl: if rng.chance(5) { 1 } else { 64 },
        l4: L4::Other { proto: PROTO_ICMP },
        payload: icmp_error(kind, code, 1280, &whole[..cut]),
        ..Frame::default()
    };
    if client_side != wrong_side {
        (error.with_macs(CLIENT_MAC, FX0_MAC), fx0)
    } else {
        (error.with_macs(BACKEND_MAC, FX1_MAC), fx1)
    }
}

/// TCP with flags weighted toward a connection's life (SYN, SYN-ACK, ACK, FIN, RST, and now
/// and then anything); UDP as it was.
fn random_l4(rng: &mut Rng, l4: &L4) -> L4 {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    let L4::Tcp { seq, ack, .. } = *l4 else {
        return l4.clone();
    };
    let flags = match rng.below(12) {
        0..=1 => SYN,
        2 => SYN | ACK,
        3..=6 => ACK,
        7..=8 => FIN | ACK,
        9 => RST,
        10 => RST | ACK,
        _ => rng.next() as u8,
    };
    L4::Tcp { flags, seq, ack }
}

/// The TCP flags byte of a TCP frame that parses; 0 otherwise.
fn tcp_flags(input: &[u8], layout: &xlb_tests::packet::Layout) -> u8 {
    if layout.proto == lb_common::maps::PROTO_TCP {
        input[layout.l4_off + 13]
    } else {
        0
    }
}

/// Runs one frame and checks it against the model; returns the reason it was counted under.
fn run_and_check(
    ebpf: &Ebpf,
    model: &mut FlowModel,
    input: &[u8],
    ingress: Iface,
    fx0: Iface,
    fx1: Iface,
) -> Result<Reason> {
    let run = lab::run(ebpf, input, ingress.ifindex, None)?;
    let [(reason, 1)] = run.counted[..] else {
        bail!(
            "counted under {:?}, not exactly one reason once",
            run.counted
        );
    };
    // Only xlb may mark a frame for the tc program: one that comes marked goes no further,
    // whatever else it is.
    let forged = input.len() >= 6 && input[0..6] == lab::HANDOFF_DMAC;
    ensure!(
        forged == (reason == Reason::DropForgedHandoff),
        "a frame {} the handoff mark ended as {}",
        if forged { "with" } else { "without" },
        reason.name()
    );
    ensure!(
        run.action == reason.xdp_action(),
        "returned action {} for reason {} (action {})",
        run.action,
        reason.name(),
        reason.xdp_action()
    );
    if forged {
        // Dropped before any flow was looked for: the model learns nothing, and a flow
        // the program made of it would show in the end's comparison of the tables.
        return Ok(reason);
    }
    // A VLAN-tagged frame is checked as its untagged self, once its tag's fate is: gone when
    // xlb sends it (itself, or by a handoff: a VLAN device on the way out tags it anew),
    // kept when it goes to the kernel's stack (which takes it as it came) or stays untouched.
    let (input, run) = match untag(input) {
        None => (input.to_vec(), run),
        Some((plain, tci)) => {
            let sent_by_xlb = matches!(
                reason,
                Reason::ForwardTx
                    | Reason::ForwardRedirect
                    | Reason::ForwardResolveNeighbour
                    | Reason::ForwardKernelOutput
                    | Reason::ForwardIcmpTooBig
            );
            let frame = match untag(&run.frame) {
                Some((out, t)) if t == tci && !sent_by_xlb => out,
                None if sent_by_xlb => run.frame.clone(),
                _ => bail!(
                    "{} left a tagged frame (TCI {tci:#06x}) as:\n{}",
                    reason.name(),
                    hex_diff(input, &run.frame)
                ),
            };
            (plain, lab::Run { frame, ..run })
        }
    };
    let input = &input[..];
    if input.len() >= ETH_HLEN
        && input[12..14] == ETH_P_IPV6.to_be_bytes()
        && let Some(done) = check_v6(model, input, &run, reason, ingress, fx0, fx1)?
    {
        return Ok(done);
    }
    if let Some(l) = icmp_layout_v4(input)
        && !is_echo_flow(model, input)
    {
        return check_icmp(model, input, &run, reason, &l, ingress, fx0, fx1);
    }
    if reason == Reason::DropDnatTupleTaken {
        let key = layout(input).map(|l| l.flow_key(input));
        ensure!(
            key.is_some_and(|k| model.dnat_tuple_taken(&k)),
            "dropped as {}, but the model sees no flow on its backend from its client port",
            reason.name()
        );
    }

    // What found a tracked flow was recorded there, if it was to be forwarded (not with its
    // TTL about to expire, not a first fragment), whatever became of it after.
    let key = flow_key(input);
    let flags = layout(input).map_or(0, |l| tcp_flags(input, &l));
    let reached_conntrack = !matches!(
        reason,
        Reason::PassNotIp
            | Reason::PassNotTcpUdp
            | Reason::PassFragment
            | Reason::DropTruncated
            | Reason::DropBadIpv4Header
            | Reason::DropBadIpv6Header
            | Reason::PassIpv6Extensions
            | Reason::DropUdpZeroChecksum
            | Reason::DropWrongInterface
            | Reason::PassTtlExpired
            | Reason::DropFragment
    );
    // An echo request is a packet of a flow's outgoing direction only, a reply of its
    // returning one: with identifier 0 their keys are one.
    let echo_request = icmp_layout_v4(input)
        .map(|l| l.kind == ICMP_ECHO_REQUEST)
        .or_else(|| echo_v6(input).map(|(_, request)| request));
    // UDP/IPv6 without a checksum is dropped only when it is ours (else the kernel's).
    if reason == Reason::DropUdpZeroChecksum {
        let l = layout(input).filter(|l| l.v6 && l.proto == PROTO_UDP);
        let zero = l.is_some_and(|l| input[l.check_off..l.check_off + 2] == [0, 0]);
        let ours = key.as_ref().is_some_and(|k| {
            model.flow(k).is_some()
                || model.service(k).is_some()
                || model.gateway(k, false).is_some()
        });
        ensure!(
            zero && ours,
            "{}, but the packet is {}",
            reason.name(),
            if zero {
                "no service's, flow's or gateway's"
            } else {
                "no UDP/IPv6 without a checksum"
            }
        );
    }
    let was_tracked = key.as_ref().is_some_and(|k| {
        model.flow(k).is_some_and(|(_, dir)| {
            echo_request.is_none_or(|request| request == (dir == DIR_TO_BACKEND))
        })
    });
    if reached_conntrack
        && was_tracked
        && let Some(k) = &key
    {
        model.observe(k, flags);
    }
    // What is for no service and no gateway, or a gateway's but to where the FIB leaves it
    // to the kernel (the host itself, no route), goes there untouched, counted as not ours.
    if let Some(k) = &key
        && !was_tracked
        && reached_conntrack
    {
        let icmp = k.proto == PROTO_ICMP || k.proto == PROTO_ICMPV6;
        let not_ours = if icmp {
            Reason::PassIcmp
        } else {
            Reason::PassNoService
        };
        let request = echo_request == Some(true);
        let dst = k.dst.ip();
        let kernels = lab::subnet_interface(dst).is_none() || LAB_OWN.contains(&dst);
        let ours = model.service(k).is_some() || model.gateway(k, request).is_some();
        ensure!(
            ours || reason == not_ours,
            "{}, but it is for no service and no gateway: {}",
            reason.name(),
            not_ours.name()
        );
        ensure!(
            reason != not_ours || !ours || (model.service(k).is_none() && kernels),
            "{}, but the model sends it through {}",
            reason.name(),
            if model.service(k).is_some() {
                "a service"
            } else {
                "a gateway"
            }
        );
    }

    let ttl_decrement = match reason {
        Reason::ForwardTx | Reason::ForwardRedirect | Reason::ForwardResolveNeighbour => 1,
        Reason::PassFibOther => 0,
        _ => {
            ensure!(
                run.frame == input,
                "{} must leave the frame alone:\n{}",
                reason.name(),
                hex_diff(input, &run.frame)
            );
            return Ok(reason);
        }
    };

    // Rewritten: to what the model says for a tracked flow, or, for a new one, to what the
    // model accepts as a new flow of the frame's service or gateway.
    let key = key.context("a rewritten frame has a flow key")?;
    let out_key = flow_key(&run.frame).context("the output must parse")?;
    let (src, dst) = (out_key.src.to_socket(), out_key.dst.to_socket());
    if !was_tracked {
        // Of ICMP, only an echo request may start a flow (the model takes an ICMP key it
        // learns for one).
        ensure!(
            (key.proto != PROTO_ICMP && key.proto != PROTO_ICMPV6) || echo_request == Some(true),
            "a new flow from an ICMP message that is no echo request"
        );
        model
            .learn(&key, flags, src, dst)
            .context("the new flow the program created")?;
    }
    let (want_src, want_dst) = model.rewrite(&key).context("the model tracks the flow")?;
    ensure!(
        (src, dst) == (want_src, want_dst),
        "rewritten to {src} → {dst}; the model says {want_src} → {want_dst}:\n{}",
        hex_diff(input, &run.frame)
    );
    let (expected, check_off) = match (icmp_layout_v4(input), echo_v6(input)) {
        (Some(l), _) => (
            echo_rewrite_v4(input, v4(want_src), v4(want_dst), ttl_decrement),
            l.icmp_off + 2,
        ),
        (None, Some((at, _))) => (
            echo_rewrite_v6(input, v6(want_src), v6(want_dst), ttl_decrement),
            at + 2,
        ),
        (None, None) => (
            nat_rewrite(input, want_src, want_dst, ttl_decrement),
            layout(input).context("a rewritten frame parses")?.check_off,
        ),
    };
    let expected = expected.context("the reference refuses the frame")?;
    let expected = as_sent(expected, reason, want_dst.ip(), ingress, fx0, fx1)?;
    matches_reference(
        input,
        &run,
        expected,
        &[ETH_HLEN + 10..ETH_HLEN + 12, check_off..check_off + 2],
    )?;
    Ok(reason)
}

/// The output must equal `expected`, the reference's, and have valid checksums when the
/// input's were. When they were not, the `checksums` fields are not compared: an incremental
/// update keeps a wrong checksum wrong, while the reference recomputes it.
fn matches_reference(
    input: &[u8],
    run: &lab::Run,
    mut expected: Vec<u8>,
    checksums: &[std::ops::Range<usize>],
) -> Result<()> {
    if verify_checksums(input).is_ok() {
        verify_checksums(&run.frame).map_err(|e| anyhow::anyhow!("output checksum: {e}"))?;
    } else {
        for range in checksums {
            expected[range.clone()].copy_from_slice(&run.frame[range.clone()]);
        }
    }
    ensure!(
        run.frame == expected,
        "differs from the reference:\n{}",
        hex_diff(&expected, &run.frame)
    );
    Ok(())
}

/// `expected` as it must leave toward `toward` for `reason`: with the neighbour's and the
/// egress interface's MACs when sent by the program, or with the handoff mark in their
/// place when handed to the tc program. Checks the egress of what the program sends.
fn as_sent(
    mut expected: Vec<u8>,
    reason: Reason,
    toward: IpAddr,
    ingress: Iface,
    fx0: Iface,
    fx1: Iface,
) -> Result<Vec<u8>> {
    let macs = matches!(reason, Reason::ForwardTx | Reason::ForwardRedirect);
    let handoff = reason == Reason::ForwardResolveNeighbour;
    let neighbour = lab::NEIGHBOURS
        .iter()
        .map(|&(a, mac, dev)| (IpAddr::V4(a), mac, dev))
        .chain(
            lab::NEIGHBOURS6
                .iter()
                .map(|&(a, mac, dev)| (IpAddr::V6(a), mac, dev)),
        )
        .find(|(a, ..)| *a == toward);
    let egress = match lab::subnet_interface(toward) {
        Some(lab::FX0) => fx0,
        Some(_) => fx1,
        None => bail!("sent toward {toward}, outside the lab's subnets"),
    };
    if macs {
        let Some((_, mac, dev)) = neighbour else {
            bail!("sent to {toward}, which has no neighbour in the lab");
        };
        ensure!(
            lab::subnet_interface(toward) == Some(dev),
            "the lab's neighbour {toward} is not on its subnet's interface"
        );
        ensure!(
            (reason == Reason::ForwardTx) == (egress.ifindex == ingress.ifindex),
            "{} but egress ifindex {} vs ingress {}",
            reason.name(),
            egress.ifindex,
            ingress.ifindex
        );
        expected[0..6].copy_from_slice(&mac);
        expected[6..12].copy_from_slice(&egress.mac);
    }
    if handoff {
        ensure!(
            neighbour.is_none(),
            "handed off toward {toward}, which has a neighbour"
        );
        let (smac, dmac) = lab::handoff_macs();
        expected[0..6].copy_from_slice(&dmac);
        expected[6..12].copy_from_slice(&smac);
    }
    Ok(expected)
}

/// Checks what the program made of an ICMP message: the model answers a ping to a VIP, and
/// translates an error whose quoted packet's reply direction is a flow it tracks (by that
/// direction's rewrite: the outer header as the flow's next packet that way, the quote back
/// as it was before xlb rewrote it); everything else is left to the kernel untouched.
#[allow(clippy::too_many_arguments)]
fn check_icmp(
    model: &FlowModel,
    input: &[u8],
    run: &lab::Run,
    reason: Reason,
    l: &IcmpLayout,
    ingress: Iface,
    fx0: Iface,
    fx1: Iface,
) -> Result<Reason> {
    let ip = ETH_HLEN;
    let addr = |at: usize| Ipv4Addr::new(input[at], input[at + 1], input[at + 2], input[at + 3]);
    let (src, dst) = (addr(ip + 12), addr(ip + 16));
    let ihl = ((input[ip] & 0x0f) as usize) * 4;
    // A ping to a VIP (without IP options, which the kernel answers) is answered.
    let echo =
        (l.kind, l.code) == (ICMP_ECHO_REQUEST, 0) && ihl == IPV4_HLEN && model.is_vip(dst.into());
    // An error addressed to the source of a packet of a tracked flow it quotes is about that
    // flow: (the reply direction's key, its rewrite).
    let about = if is_icmp_error(l.kind) {
        icmp_quote_v4(input)
            .filter(|(qs, ..)| *qs.ip() == dst)
            .and_then(|(qs, qd, proto)| {
                let reply = key(qd, qs, proto);
                model.rewrite(&reply).map(|r| (reply, r))
            })
    } else {
        None
    };
    // What must become of it, in the order the program decides: an error about a flow
    // arrives where that flow's packets from the quoted packet's destination arrive (the
    // lab's subnet of that address), or it is dropped; with TTL 1 it goes to the kernel.
    let verdict = match &about {
        Some((reply, _)) => {
            let side = lab::subnet_interface(*reply.src.to_socket_v4().ip());
            let arrived = if ingress.ifindex == fx0.ifindex {
                lab::FX0
            } else {
                lab::FX1
            };
            if side != Some(arrived) {
                Some(Reason::DropWrongInterface)
            } else if input[ip + 8] <= 1 {
                Some(Reason::PassTtlExpired)
            } else {
                None
            }
        }
        None if echo => None,
        None if is_icmp_error(l.kind) => Some(Reason::PassIcmpUntracked),
        None => Some(Reason::PassIcmp),
    };
    let Some(ttl_decrement) = sent_as_the_model_says(input, run, reason, verdict)? else {
        return Ok(reason);
    };
    let (expected, toward) = if echo {
        (
            echo_reply_v4(input).context("the reference refuses it")?,
            src,
        )
    } else if let Some((reply, (rs, rd))) = about {
        // The error's source is translated only where the flow's sources are (not a dnat
        // flow's client, not a gateway's destination): else the router's is kept.
        let outer_src = if ip4(rs) == *reply.src.to_socket_v4().ip() {
            src
        } else {
            ip4(rs)
        };
        let translated = icmp_error_v4(input, outer_src, ip4(rd), v4(rd), v4(rs), ttl_decrement)
            .context("the reference refuses it")?;
        (translated, ip4(rd))
    } else {
        bail!(
            "{}: an ICMP message the model neither answers nor translates",
            reason.name()
        );
    };
    let expected = as_sent(expected, reason, toward.into(), ingress, fx0, fx1)?;
    // The quoted L4 checksum too: a frame whose lengths lie may "quote" padding the
    // checksum never covered.
    let mut checksums = vec![ip + 10..ip + 12, l.icmp_off + 2..l.icmp_off + 4];
    if about.is_some()
        && let Some(off) = icmp_quoted_check_off(input)
    {
        checksums.push(off..off + 2);
    }
    matches_reference(input, run, expected, &checksums)?;
    Ok(reason)
}

/// What the program must make of an IPv6 frame before any flow is looked for: the reason
/// the frame's layout (RFC 8200, `parse_v6`) gives one it does not go into, or ICMPv6's
/// fate (a ping to a VIP answered, the rest to the kernel). `None` for TCP and UDP that
/// go on to the flows, checked as IPv4's are.
#[allow(clippy::too_many_arguments)]
fn check_v6(
    model: &FlowModel,
    input: &[u8],
    run: &lab::Run,
    reason: Reason,
    ingress: Iface,
    fx0: Iface,
    fx1: Iface,
) -> Result<Option<Reason>> {
    let verdict = match parse_v6(input) {
        Err(r) => r,
        Ok(l) => {
            let l4_min = match l.proto {
                PROTO_TCP => 20,
                PROTO_UDP | PROTO_ICMPV6 => 8,
                _ => 0,
            };
            let at = l.l4_off;
            if l4_min == 0 {
                Reason::PassNotTcpUdp
            } else if l.later_fragment {
                Reason::PassFragment
            } else if at + l4_min > ETH_HLEN + l.tot_len {
                Reason::DropTruncated
            } else if l.proto != PROTO_ICMPV6 {
                return Ok(None);
            } else {
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&input[38..54]).unwrap());
                let src = Ipv6Addr::from(<[u8; 16]>::try_from(&input[22..38]).unwrap());
                let ping = (input[at], input[at + 1]) == (ICMPV6_ECHO_REQUEST, 0);
                let reply = (input[at], input[at + 1]) == (ICMPV6_ECHO_REPLY, 0);
                // An echo but a request to a VIP is a flow's packet, as TCP's and UDP's
                // (through a NAT gateway), whole or a fragment.
                if reply || (ping && !model.is_vip(dst.into())) {
                    return Ok(None);
                }
                if !l.fragment && (1..=4).contains(&input[at]) {
                    return check_icmp6_error(model, input, run, reason, ingress, fx0, fx1)
                        .map(Some);
                }
                if ping && !l.fragment && at == ETH_HLEN + IPV6_HLEN && model.is_vip(dst.into()) {
                    ensure!(
                        matches!(
                            reason,
                            Reason::ForwardTx
                                | Reason::ForwardRedirect
                                | Reason::ForwardResolveNeighbour
                        ),
                        "{}, but a ping to a VIP is answered",
                        reason.name()
                    );
                    let expected = echo_reply_v6(input).context("the reference refuses it")?;
                    let expected = as_sent(expected, reason, src.into(), ingress, fx0, fx1)?;
                    let checksum = at + 2..at + 4;
                    matches_reference(input, run, expected, std::slice::from_ref(&checksum))?;
                    return Ok(Some(reason));
                }
                Reason::PassIcmp
            }
        }
    };
    ensure!(
        reason == verdict,
        "counted {}, but the frame's IPv6 layout says {}",
        reason.name(),
        verdict.name()
    );
    ensure!(
        run.frame == input,
        "{} must leave the frame alone:\n{}",
        reason.name(),
        hex_diff(input, &run.frame)
    );
    Ok(Some(reason))
}

/// Holds an ICMP message's fate to the model's `verdict` (`None`: sent on): a message sent
/// on returns the TTL decrement its reason implies; one left alone, `None`, once checked
/// untouched and counted as the model says.
fn sent_as_the_model_says(
    input: &[u8],
    run: &lab::Run,
    reason: Reason,
    verdict: Option<Reason>,
) -> Result<Option<u8>> {
    let ttl_decrement = match reason {
        Reason::ForwardTx | Reason::ForwardRedirect | Reason::ForwardResolveNeighbour => 1,
        Reason::PassFibOther => 0,
        _ => {
            ensure!(
                run.frame == input,
                "{} must leave the frame alone:\n{}",
                reason.name(),
                hex_diff(input, &run.frame)
            );
            ensure!(
                verdict == Some(reason),
                "counted {}, but the model says {}",
                reason.name(),
                verdict.map_or("send it on", Reason::name)
            );
            return Ok(None);
        }
    };
    if let Some(v) = verdict {
        bail!("{} it, but the model says {}", reason.name(), v.name());
    }
    Ok(Some(ttl_decrement))
}

/// Checks what the program made of an ICMPv6 error, as `check_icmp` does IPv4's: one about
/// a tracked flow's packet, addressed to that packet's source and arriving where the flow's
/// packets from its destination do, is translated by the reply direction's rewrite; the
/// rest goes to the kernel untouched.
#[allow(clippy::too_many_arguments)]
fn check_icmp6_error(
    model: &FlowModel,
    input: &[u8],
    run: &lab::Run,
    reason: Reason,
    ingress: Iface,
    fx0: Iface,
    fx1: Iface,
) -> Result<Reason> {
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&input[o..o + 16]).unwrap());
    let (src, dst) = (addr(ETH_HLEN + 8), addr(ETH_HLEN + 24));
    let about = icmp_quote_v6(input)
        .filter(|(qs, ..)| *qs.ip() == dst)
        .and_then(|(qs, qd, proto, _)| {
            let reply = key(qd, qs, proto);
            model.rewrite(&reply).map(|r| (reply, r))
        });
    let verdict = match &about {
        Some((reply, _)) => {
            let arrived = if ingress.ifindex == fx0.ifindex {
                lab::FX0
            } else {
                lab::FX1
            };
            if lab::subnet_interface(reply.src.ip()) != Some(arrived) {
                Some(Reason::DropWrongInterface)
            } else if input[ETH_HLEN + 7] <= 1 {
                Some(Reason::PassTtlExpired)
            } else {
                None
            }
        }
        None => Some(Reason::PassIcmpUntracked),
    };
    let Some(ttl_decrement) = sent_as_the_model_says(input, run, reason, verdict)? else {
        return Ok(reason);
    };
    let (reply, (rs, rd)) = about.context("a translated error is about a flow")?;
    let (SocketAddr::V6(rs), SocketAddr::V6(rd)) = (rs, rd) else {
        bail!("an IPv6 flow rewritten to IPv4");
    };
    // The error's source is translated where the flow's sources are, else kept.
    let outer_src = if IpAddr::V6(*rs.ip()) == reply.src.ip() {
        src
    } else {
        *rs.ip()
    };
    let expected = icmp_error_v6(input, outer_src, *rd.ip(), rd, rs, ttl_decrement)
        .context("the reference refuses it")?;
    let expected = as_sent(expected, reason, IpAddr::V6(*rd.ip()), ingress, fx0, fx1)?;
    let at = ETH_HLEN + IPV6_HLEN;
    // The ICMPv6 checksum, and the quoted L4 one when quoted.
    let mut checksums = Vec::with_capacity(2);
    checksums.push(at + 2..at + 4);
    if let Some(off) = icmp6_quoted_check_off(input) {
        checksums.push(off..off + 2);
    }
    matches_reference(input, run, expected, &checksums)?;
    Ok(reason)
}

/// Pings through the gateway are few among the tracked flows: now and then (30 in 100), a
/// bounded search for one of `proto` (ICMP or ICMPv6) among `tracked`.
fn now_and_then_a_ping<'a>(rng: &mut Rng, tracked: &'a [Frame], proto: u8) -> Option<&'a Frame> {
    if !rng.chance(30) {
        return None;
    }
    (0..64)
        .map(|_| &tracked[rng.below(tracked.len() as u64) as usize])
        .find(|f| f.l4.proto() == proto)
}

/// An ICMPv6 error from a router on either side about a packet xlb sent for a tracked IPv6
/// flow, either way, cut anywhere; now and then from the wrong side or with hop limit 1.
fn random_icmp6_error(
    rng: &mut Rng,
    tracked6: &[Frame],
    model: &FlowModel,
    fx0: Iface,
    fx1: Iface,
) -> (Frame, Iface) {
    let mut f = &tracked6[rng.below(tracked6.len() as u64) as usize];
    if let Some(ping) = now_and_then_a_ping(rng, tracked6, PROTO_ICMPV6) {
        f = ping;
    }
    let (client, vip) = f.v6.expect("an IPv6 frame");
    let client_router = Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x10,
        1,
        0,
        0,
        0,
        0x200 + rng.below(50) as u16,
    );
    let backend_router = Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x20,
        1,
        0,
        0,
        0,
        0x200 + rng.below(50) as u16,
    );
    // A quoted ping (a tracked echo through the gateway): its type and identifier.
    let mut echo = None;
    let (quoted, router, to, client_side) = if rng.chance(50) {
        // xlb's reply toward the client, VIP → client, reported to the VIP.
        let q = Frame {
            v6: Some((vip, client)),
            sport: f.dport,
            dport: f.sport,
            ..f.clone()
        };
        if f.l4.proto() == PROTO_ICMPV6 {
            // The echo reply xlb sent the private host, with its own identifier.
            echo = Some((ICMPV6_ECHO_REPLY, [f.payload[4], f.payload[5]]));
        }
        (q, client_router, vip, true)
    } else {
        // xlb's packet toward the backend, reported to its source (SNAT, or the client's).
        let (snat, backend) = model
            .rewrite(&key_of(f))
            .expect("tracked frames are the model's flows");
        let (IpAddr::V6(s), IpAddr::V6(b)) = (snat.ip(), backend.ip()) else {
            panic!("an IPv6 flow rewritten to IPv4");
        };
        let q = Frame {
            v6: Some((s, b)),
            sport: snat.port(),
            dport: backend.port(),
            ..f.clone()
        };
        if f.l4.proto() == PROTO_ICMPV6 {
            // The echo request xlb sent out, with the public identifier.
            echo = Some((ICMPV6_ECHO_REQUEST, snat.port().to_be_bytes()));
        }
        (q, backend_router, s, false)
    };
    let mut quoted = Frame {
        vlan: None,
        tot_len_override: None,
        version_override: None,
        pad_to: None,
        truncate_to: None,
        ext_headers: Vec::new(),
        ..quoted
    };
    quoted.l4 = random_l4(rng, &quoted.l4);
    let len = rng.below(40) as usize;
    quoted.payload = rng.bytes(len);
    match (echo, quoted.v6) {
        (Some((kind, [i0, i1])), Some((qs, qd))) => {
            let [s0, s1] = (rng.next() as u16).to_be_bytes();
            quoted.payload = icmp6_message(qs, qd, kind, 0, [i0, i1, s0, s1], &quoted.payload);
        }
        // Raw bytes of another protocol: 8 at least, as a TCP or UDP header would be.
        _ if matches!(quoted.l4, L4::Other { .. }) => quoted.payload = rng.bytes(len.max(8)),
        _ => {}
    }
    let whole = quoted.build()[ETH_HLEN..].to_vec();
    let cut = match rng.below(6) {
        0 | 1 => IPV6_HLEN + 8,
        2 | 3 => whole.len(),
        4 => IPV6_HLEN + 8 + rng.below((whole.len() - IPV6_HLEN - 8) as u64 + 1) as usize,
        _ => rng.below(IPV6_HLEN as u64 + 8) as usize,
    };
    let kind = match rng.below(10) {
        0..=3 => ICMPV6_PACKET_TOO_BIG,
        4..=5 => 1,
        6..=7 => ICMPV6_TIME_EXCEEDED,
        8 => 4,
        _ => rng.below(256) as u8,
    };
    let wrong_side = rng.chance(5);
    let router = match (wrong_side, client_side) {
        (true, true) => backend_router,
        (true, false) => client_router,
        _ => router,
    };
    let rest = if kind == ICMPV6_PACKET_TOO_BIG {
        1280u32.to_be_bytes()
    } else {
        [0; 4]
    };
    let error = Frame {
        ttl: if rng.chance(5) { 1 } else { 64 },
        ..Frame::icmp6(
            router,
            to,
            icmp6_message(router, to, kind, rng.below(2) as u8, rest, &whole[..cut]),
        )
    };
    if client_side != wrong_side {
        (error.with_macs(CLIENT_MAC, FX0_MAC), fx0)
    } else {
        (error.with_macs(BACKEND_MAC, FX1_MAC), fx1)
    }
}

/// The flow key of a tracked frame (one the program forwarded: it parses).
fn key_of(f: &Frame) -> FlowKey {
    let built = f.build();
    let plain = untag(&built).map_or(built, |(plain, _)| plain);
    flow_key(&plain).expect("a tracked frame has a flow key")
}

/// An endpoint of the model's that this test knows to be IPv4.
fn v4(sa: SocketAddr) -> SocketAddrV4 {
    match sa {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(v6) => panic!("{v6} where only IPv4 is sent"),
    }
}

/// An endpoint of the model's that this test knows to be IPv6.
fn v6(sa: SocketAddr) -> SocketAddrV6 {
    match sa {
        SocketAddr::V6(v6) => v6,
        SocketAddr::V4(v4) => panic!("{v4} where only IPv6 is sent"),
    }
}

fn ip4(sa: SocketAddr) -> Ipv4Addr {
    *v4(sa).ip()
}
