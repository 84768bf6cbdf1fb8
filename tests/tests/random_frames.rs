//! Random frames through the real XDP program, checked against the reference model
//! (`xlb_tests::model`).
//!
//! Tens of thousands of frames go through BPF_PROG_TEST_RUN: well-formed TCP and UDP to the
//! VIPs and elsewhere, packets and replies of flows already tracked, and frames with a
//! random version, IHL, total length, TTL, options, fragment bits or ethertype, or cut
//! short. Whatever comes in, the program must:
//! * never abort (XDP_ABORTED), and count exactly one reason whose action it returns;
//! * leave every frame it does not rewrite byte for byte as it was;
//! * rewrite every frame it forwards exactly as `nat_rewrite_v4` does with the conntrack
//!   entry the flow got, with the right MACs, and with valid checksums when the input's
//!   were valid;
//! * and, in the end, have counted in its service and backend counters exactly the packets
//!   and bytes that left rewritten.
//!
//! The seed is fixed so a failure reproduces; `XLB_RANDOM_SEED` and `XLB_RANDOM_FRAMES`
//! change it and the count.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    maps::{Endpoint, FlowKey, FlowStats, NatEntry, names},
    reason::Reason,
};
use lb_userspace::config::Config;
use xlb_tests::{
    lab::{self, BACKEND_MAC, CLIENT, CLIENT_MAC, FX0_MAC, FX1_MAC, Iface, VIP, VIP_UNRESOLVED},
    model::nat_rewrite_v4,
    netns::{self, NetNs},
    packet::{ETH_HLEN, Frame, IP_MF, L4, hex_diff, layout_v4, summary, verify_checksums_v4},
};

const CONFIG: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
conntrack_entries = 262144
maglev_table_size = 251
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
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("BPF_PROG_TEST_RUN needs root: run cargo xtask test");
    }
    let seed = env_u64("XLB_RANDOM_SEED", 0x786c_6221_5eed);
    let frames = env_u64("XLB_RANDOM_FRAMES", 20_000);
    netns::cleanup_stale("xlbrnd").expect("cleaning up stale namespaces");
    let ns = NetNs::create(&netns::unique_base("xlbrnd")).expect("creating the namespace");
    lab::setup(&ns).expect("setting up the lab");
    let histogram = ns
        .enter(|| run(seed, frames))
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("seed {seed:#x}: {e:#}"));
    drop(ns);

    println!("{frames} random frames (seed {seed:#x}):");
    for (name, n) in &histogram {
        println!("  {name:28} {n}");
    }
    // The generator must reach every path worth testing, or the test proves little.
    for reason in [
        Reason::ForwardRedirect,
        Reason::PassNoNeighbour,
        Reason::PassNotIpv4,
        Reason::PassNotTcpUdp,
        Reason::PassNoService,
        Reason::PassFragment,
        Reason::PassTtlExpired,
        Reason::DropTruncated,
        Reason::DropBadIpv4Header,
        Reason::DropFragment,
    ] {
        let n = histogram.get(reason.name()).copied().unwrap_or(0);
        assert!(
            n >= frames / 1000,
            "only {n} frames ended as {}",
            reason.name()
        );
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let v = v.trim_start_matches("0x");
            u64::from_str_radix(v, 16).ok()
        })
        .unwrap_or(default)
}

fn run(seed: u64, frames: u64) -> Result<BTreeMap<&'static str, u64>> {
    let checked = Config::parse(CONFIG)?
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lab::Program { ebpf, fx0, fx1 } = lab::load(&checked)?;
    let mut rng = Rng(seed | 1);
    // Inputs of flows the program forwarded, to send again (conntrack hits) and to answer.
    let mut tracked: Vec<Frame> = Vec::new();
    let mut histogram = BTreeMap::new();
    // Packets and bytes of the frames that left rewritten: what the service and backend
    // counters must add up to.
    let (mut rewritten, mut rewritten_bytes) = (0u64, 0u64);

    for i in 0..frames {
        let (frame, ingress) = random_frame(&mut rng, &tracked, &ebpf, fx0, fx1)?;
        let input = frame.build();
        if input.len() < ETH_HLEN {
            continue; // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        }
        let reason = run_and_check(&ebpf, &input, ingress, fx0, fx1)
            .with_context(|| format!("frame {i}: {}", summary(&input)))?;
        *histogram.entry(reason.name()).or_insert(0) += 1;
        if matches!(
            reason,
            Reason::ForwardTx
                | Reason::ForwardRedirect
                | Reason::PassNoNeighbour
                | Reason::PassFibOther
        ) {
            rewritten += 1;
            rewritten_bytes += input.len() as u64;
        }
        if matches!(reason, Reason::ForwardTx | Reason::ForwardRedirect) && ingress == fx0 {
            tracked.push(frame);
        }
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
    Ok(histogram)
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
    ebpf: &Ebpf,
    fx0: Iface,
    fx1: Iface,
) -> Result<(Frame, Iface)> {
    let roll = rng.below(100);
    let (mut frame, ingress) = if roll < 20 && !tracked.is_empty() {
        // Another packet of a tracked flow.
        let f = tracked[rng.below(tracked.len() as u64) as usize].clone();
        (f, fx0)
    } else if roll < 35 && !tracked.is_empty() {
        // The backend's reply to a tracked flow.
        let f = &tracked[rng.below(tracked.len() as u64) as usize];
        let entry = conntrack(ebpf, &key_of(f))?.context("a tracked flow lost its entry")?;
        let (src, dst) = (entry.dst.to_socket_v4(), entry.src.to_socket_v4());
        let l4 = f.l4.clone();
        let reply = Frame {
            src: *src.ip(),
            sport: src.port(),
            dst: *dst.ip(),
            dport: dst.port(),
            l4,
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
            Frame::tcp((client, sport), (dst, 80), rng.next() as u8)
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
    Ok((frame, ingress))
}

/// Runs one frame and checks it; returns the reason it was counted under.
fn run_and_check(
    ebpf: &Ebpf,
    input: &[u8],
    ingress: Iface,
    fx0: Iface,
    fx1: Iface,
) -> Result<Reason> {
    let prog: &Xdp = ebpf
        .program(lb_userspace::loader::PROGRAM)
        .context("program xlb")?
        .try_into()?;
    let ctx = lab::xdp_md(input.len() as u32, ingress.ifindex);
    let mut out = vec![0u8; input.len() + 256];
    let before = lab::reasons(ebpf)?;
    let r = prog.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    })?;
    let after = lab::reasons(ebpf)?;
    out.truncate(r.data_size_out as usize);

    let counted: Vec<Reason> = Reason::ALL
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a != b)
        .map(|(reason, _)| *reason)
        .collect();
    let [reason] = counted[..] else {
        bail!("counted under {counted:?}, not exactly one reason");
    };
    let idx = reason as usize;
    ensure!(
        after[idx] == before[idx] + 1,
        "{} counted more than once",
        reason.name()
    );
    ensure!(
        r.return_value == reason.xdp_action(),
        "returned action {} for reason {} (action {})",
        r.return_value,
        reason.name(),
        reason.xdp_action()
    );

    let (ttl_decrement, macs) = match reason {
        Reason::ForwardTx | Reason::ForwardRedirect => (1, true),
        Reason::PassNoNeighbour | Reason::PassFibOther => (0, false),
        _ => {
            ensure!(
                out == input,
                "{} must leave the frame alone:\n{}",
                reason.name(),
                hex_diff(input, &out)
            );
            return Ok(reason);
        }
    };

    let layout = layout_v4(input).context("a rewritten frame must parse")?;
    let key = layout.flow_key(input);
    let entry =
        conntrack(ebpf, &key)?.context("a rewritten frame's flow has no conntrack entry")?;
    let mut expected =
        nat_rewrite_v4(input, &entry, ttl_decrement).context("the reference refuses the frame")?;
    if macs {
        let dst = *entry.dst.to_socket_v4().ip();
        let Some((_, neighbour, dev)) = lab::NEIGHBOURS.iter().find(|(a, ..)| *a == dst) else {
            bail!("forwarded to {dst}, which has no static neighbour in the lab");
        };
        let egress = if *dev == lab::FX0 { fx0 } else { fx1 };
        ensure!(
            (reason == Reason::ForwardTx) == (egress.ifindex == ingress.ifindex),
            "{} but egress ifindex {} vs ingress {}",
            reason.name(),
            egress.ifindex,
            ingress.ifindex
        );
        expected[0..6].copy_from_slice(neighbour);
        expected[6..12].copy_from_slice(&egress.mac);
    }
    if verify_checksums_v4(input).is_ok() {
        verify_checksums_v4(&out).map_err(|e| anyhow::anyhow!("output checksum: {e}"))?;
    } else {
        // A wrong checksum stays wrong under an incremental update, while the reference
        // recomputes it: compare everything else.
        for range in [
            ETH_HLEN + 10..ETH_HLEN + 12,
            layout.check_off..layout.check_off + 2,
        ] {
            expected[range.clone()].copy_from_slice(&out[range]);
        }
    }
    ensure!(
        out == expected,
        "differs from the reference:\n{}",
        hex_diff(&expected, &out)
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

fn conntrack(ebpf: &Ebpf, key: &FlowKey) -> Result<Option<NatEntry>> {
    let map: HashMap<&MapData, FlowKey, NatEntry> = ebpf
        .map(names::CONNTRACK)
        .context("map CONNTRACK")?
        .try_into()?;
    match map.get(key, 0) {
        Ok(entry) => Ok(Some(entry)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
