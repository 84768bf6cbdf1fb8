//! Random frames through the real XDP program, checked against the reference model
//! (`xlb_tests::model`).
//!
//! Tens of thousands of frames go through BPF_PROG_TEST_RUN: well-formed TCP and UDP to the
//! VIPs and elsewhere, packets and replies of flows already tracked, with random TCP flags
//! (so flows open, close, reset and start anew), and frames with a random version, IHL, total
//! length, TTL, options, fragment bits or ethertype, or cut short. Whatever comes in, the
//! program must:
//! * never abort (XDP_ABORTED), and count exactly one reason whose action it returns;
//! * leave every frame it does not rewrite byte for byte as it was;
//! * rewrite what it forwards as the flow model says, which learns flows only from the
//!   config and from what the program sent out (never from its maps): a new flow leaves from
//!   its service's SNAT address toward one of its backends, keeps its backend and port, owns
//!   its (backend, SNAT address, port) alone, and its replies go from the VIP to its client;
//!   with the right MACs, TTL and handoff metadata, and valid checksums when the input's were;
//! * and, in the end, hold whole flows only, each in the state the model reached by applying
//!   lb-common's rules to the packets it saw, and have counted in its service and backend
//!   counters exactly the packets and bytes that left rewritten.
//!
//! The seed is fixed so a failure reproduces; `XLB_RANDOM_SEED` and `XLB_RANDOM_FRAMES`
//! change it and the count.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use lb_common::{
    conntrack::FlowState,
    maps::{Endpoint, FlowKey, FlowStats, HANDOFF_MAGIC, HandoffMeta, names},
    reason::Reason,
};
use lb_userspace::config::Config;
use xlb_tests::{
    lab::{self, BACKEND_MAC, CLIENT, CLIENT_MAC, FX0_MAC, FX1_MAC, Iface, VIP, VIP_UNRESOLVED},
    model::{FlowModel, nat_rewrite_v4},
    packet::{ETH_HLEN, Frame, IP_MF, L4, hex_diff, layout_v4, summary, verify_checksums_v4},
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
[[service]]
vip = "10.10.0.100:53"
protocol = "udp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:5353"
[[service]]
vip = "10.10.0.103:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.9:8080"
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
    let frames = env_u64("XLB_RANDOM_FRAMES", 20_000);
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
        Reason::PassNotIpv4,
        Reason::PassNotTcpUdp,
        Reason::PassNoService,
        Reason::PassFragment,
        Reason::PassTtlExpired,
        Reason::DropTruncated,
        Reason::DropBadIpv4Header,
        Reason::DropFragment,
        Reason::DropRstNoFlow,
    ] {
        let n = histogram.get(reason.name()).copied().unwrap_or(0);
        assert!(
            n >= frames / 1000,
            "only {n} frames ended as {}",
            reason.name()
        );
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
    let checked = Config::parse(CONFIG)?
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lab::Program { ebpf, fx0, fx1 } = lab::load(&checked)?;
    let mut rng = Rng(seed | 1);
    let mut model = FlowModel::new(&checked);
    // Inputs of flows the program forwarded, to send again (conntrack hits) and to answer.
    let mut tracked: Vec<Frame> = Vec::new();
    let mut histogram = BTreeMap::new();
    // Packets and bytes of the frames that left rewritten: what the service and backend
    // counters must add up to.
    let (mut rewritten, mut rewritten_bytes) = (0u64, 0u64);

    for i in 0..frames {
        let (frame, ingress) = random_frame(&mut rng, &tracked, &model, fx0, fx1);
        let input = frame.build();
        if input.len() < ETH_HLEN {
            continue; // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        }
        let reason = run_and_check(&ebpf, &mut model, &input, ingress, fx0, fx1)
            .with_context(|| format!("frame {i}: {}", summary(&input)))?;
        *histogram.entry(reason.name()).or_insert(0) += 1;
        if matches!(
            reason,
            Reason::ForwardTx
                | Reason::ForwardRedirect
                | Reason::ForwardResolveNeighbour
                | Reason::PassFibOther
        ) {
            rewritten += 1;
            rewritten_bytes += input.len() as u64;
        }
        if matches!(reason, Reason::ForwardTx | Reason::ForwardRedirect) && ingress == fx0 {
            tracked.push(frame);
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

    let services = checked.services.len() as u32;
    let backends: u32 = checked
        .services
        .iter()
        .map(|s| s.backends.len() as u32)
        .sum();
    for (map, count) in [
        (names::SERVICE_STATS, services),
        (names::BACKEND_STATS, backends),
    ] {
        let (packets, bytes) = flow_stats_total(&ebpf, map, count)?;
        ensure!(
            (packets, bytes) == (rewritten, rewritten_bytes),
            "{map} counts {packets} packets / {bytes} bytes, but {rewritten} frames / \
             {rewritten_bytes} bytes left rewritten"
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
    tracked: &[Frame],
    model: &FlowModel,
    fx0: Iface,
    fx1: Iface,
) -> (Frame, Iface) {
    let roll = rng.below(100);
    let (mut frame, ingress) = if roll < 20 && !tracked.is_empty() {
        // Another packet of a tracked flow, with random flags.
        let mut f = tracked[rng.below(tracked.len() as u64) as usize].clone();
        f.l4 = random_l4(rng, &f.l4);
        (f, fx0)
    } else if roll < 35 && !tracked.is_empty() {
        // The backend's reply to a tracked flow, with random flags: to the SNAT port the
        // model says the flow has.
        let f = &tracked[rng.below(tracked.len() as u64) as usize];
        let (snat, backend) = model
            .rewrite(&key_of(f))
            .expect("tracked frames are the model's flows");
        let reply = Frame {
            src: *backend.ip(),
            sport: backend.port(),
            dst: *snat.ip(),
            dport: snat.port(),
            l4: random_l4(rng, &f.l4),
            ..Frame::default()
        };
        (reply.with_macs(BACKEND_MAC, FX1_MAC), fx1)
    } else {
        // Something new from the client side.
        let client = if rng.chance(70) {
            CLIENT
        } else {
            Ipv4Addr::new(10, 10, 1, 2 + rng.below(200) as u8)
        };
        let sport = 1024 + rng.below(200) as u16;
        let dst = match rng.below(10) {
            0..=5 => VIP,
            6 => VIP_UNRESOLVED,
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

    let len = rng.below(48) as usize;
    frame.payload = rng.bytes(len);
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
    if rng.chance(3) {
        frame.ethertype = [0x86dd, 0x8100, 0x0806, rng.next() as u16][rng.below(4) as usize];
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
    ensure!(
        run.action == reason.xdp_action(),
        "returned action {} for reason {} (action {})",
        run.action,
        reason.name(),
        reason.xdp_action()
    );

    // What found a tracked flow was recorded there, if it was to be forwarded (not with its
    // TTL about to expire, not a first fragment), whatever became of it after.
    let layout = layout_v4(input);
    let key = layout.as_ref().map(|l| l.flow_key(input));
    let reached_conntrack = !matches!(
        reason,
        Reason::PassNotIpv4
            | Reason::PassNotTcpUdp
            | Reason::PassFragment
            | Reason::DropTruncated
            | Reason::DropBadIpv4Header
            | Reason::DropWrongInterface
            | Reason::PassTtlExpired
            | Reason::DropFragment
    );
    let was_tracked = key.as_ref().is_some_and(|k| model.flow(k).is_some());
    if reached_conntrack
        && was_tracked
        && let (Some(l), Some(k)) = (&layout, &key)
    {
        model.observe(k, tcp_flags(input, l));
    }

    let (ttl_decrement, macs, handoff) = match reason {
        Reason::ForwardTx | Reason::ForwardRedirect => (1, true, false),
        Reason::ForwardResolveNeighbour => (1, false, true),
        Reason::PassFibOther => (0, false, false),
        _ => {
            ensure!(
                run.frame == input,
                "{} must leave the frame alone:\n{}",
                reason.name(),
                hex_diff(input, &run.frame)
            );
            ensure!(
                run.meta.is_none(),
                "{}: handoff metadata {:?}",
                reason.name(),
                run.meta
            );
            return Ok(reason);
        }
    };

    // Rewritten: to what the model says for a tracked flow, or, for a new one, to what the
    // model accepts as a new flow of the frame's service.
    let layout = layout.context("a rewritten frame must parse")?;
    let key = key.context("a rewritten frame has a flow key")?;
    let out = layout_v4(&run.frame).context("the output must parse")?;
    let out_key = out.flow_key(&run.frame);
    let (src, dst) = (out_key.src.to_socket_v4(), out_key.dst.to_socket_v4());
    if !was_tracked {
        model
            .learn(&key, tcp_flags(input, &layout), src, dst)
            .context("the new flow the program created")?;
    }
    let (want_src, want_dst) = model.rewrite(&key).context("the model tracks the flow")?;
    ensure!(
        (src, dst) == (want_src, want_dst),
        "rewritten to {src} → {dst}; the model says {want_src} → {want_dst}"
    );
    let mut expected = nat_rewrite_v4(input, want_src, want_dst, ttl_decrement)
        .context("the reference refuses the frame")?;
    let neighbour = lab::NEIGHBOURS.iter().find(|(a, ..)| a == want_dst.ip());
    let egress = match lab::subnet_interface(*want_dst.ip()) {
        Some(lab::FX0) => fx0,
        Some(_) => fx1,
        None => bail!("rewritten toward {want_dst}, outside the lab's subnets"),
    };
    if macs {
        let Some((_, mac, dev)) = neighbour else {
            bail!("sent to {want_dst}, which has no neighbour in the lab");
        };
        ensure!(
            lab::subnet_interface(*want_dst.ip()) == Some(*dev),
            "the lab's neighbour {want_dst} is not on its subnet's interface"
        );
        ensure!(
            (reason == Reason::ForwardTx) == (egress.ifindex == ingress.ifindex),
            "{} but egress ifindex {} vs ingress {}",
            reason.name(),
            egress.ifindex,
            ingress.ifindex
        );
        expected[0..6].copy_from_slice(mac);
        expected[6..12].copy_from_slice(&egress.mac);
    }
    let want_meta = handoff.then(|| HandoffMeta {
        magic: HANDOFF_MAGIC,
        ifindex: egress.ifindex,
        next_hop: Endpoint::from_socket_v4(want_dst).addr,
    });
    ensure!(
        run.meta == want_meta,
        "handoff metadata {:?}, expected {want_meta:?}",
        run.meta
    );
    if handoff {
        ensure!(
            neighbour.is_none(),
            "handed off toward {want_dst}, which has a neighbour"
        );
    }
    if verify_checksums_v4(input).is_ok() {
        verify_checksums_v4(&run.frame).map_err(|e| anyhow::anyhow!("output checksum: {e}"))?;
    } else {
        // A wrong checksum stays wrong under an incremental update, while the reference
        // recomputes it: compare everything else.
        for range in [
            ETH_HLEN + 10..ETH_HLEN + 12,
            layout.check_off..layout.check_off + 2,
        ] {
            expected[range.clone()].copy_from_slice(&run.frame[range]);
        }
    }
    ensure!(
        run.frame == expected,
        "differs from the reference:\n{}",
        hex_diff(&expected, &run.frame)
    );
    Ok(reason)
}

fn key_of(f: &Frame) -> FlowKey {
    FlowKey {
        src: Endpoint::v4(f.src.octets(), f.sport.to_be_bytes()),
        dst: Endpoint::v4(f.dst.octets(), f.dport.to_be_bytes()),
        proto: f.l4.proto(),
        _pad: 0,
    }
}
