//! Live forwarding rate (`cargo xtask bench`): frames per second a veth chain carries from a
//! generator namespace through the load balancer's namespace into a sink namespace, with
//! (0) nothing forwarded (`xlb_drop` on l0, counted where it drops: what the generator and
//! the veth cost, over which each forwarder's cost per frame is reported), (a) the null
//! forwarder (`xlb_null_forwarder`: swap the MACs, redirect; the ceiling of
//! any XDP forwarder), (b) xlb (full NAT of a UDP flow), (c) the kernel alone with nftables
//! DNAT + SNAT. The same frames, the same chain, in rounds of every way in turn; each
//! figure, a ratio of two ways' rates too, is the median of its rounds'.
//!
//! ```text
//!  ns gen                    ns lb                                   ns sink
//!  g0 10.40.1.2/24 ──── l0 10.40.1.1/24   l1 10.40.2.1/24 ──── s0 10.40.2.9/24
//! ```
//! The generator is `xlb_tx` (XDP_TX) run with BPF_PROG_TEST_RUN in live-frames mode on g0:
//! each run transmits the frame (UDP 10.40.1.2:5000 → the VIP 10.40.0.100:80) to l0. Where
//! the kernel refuses live-frames test runs, a packet socket on g0 sends the same frames
//! instead ([`Generator`]); the JSON says which one ran. What arrives at s0 is counted by
//! the kernel (`rx_packets`). Frames go to the backend address 10.40.2.2 at a MAC that
//! nobody has, so the sink drops each one as soon as it reads its Ethernet header, as it
//! drops the null forwarder's (whose MACs are swapped): the sink's work is the same for all
//! three. Everything shares the same
//! two cores; the generator and the forwarding both run in the generating CPU's softirq, so
//! the rates compare one core's worth of each.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::{
    EbpfLoader,
    maps::DevMapHash,
    programs::{Link as _, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLink},
};
use lb_common::maps::{
    names,
    programs::{BENCH_FLOWS, BENCH_FORWARD_TO, BENCH_FRAME, DROP, NULL_FORWARDER, TX},
};
use xlb_tests::figures::{CpuTime, Run, machine, median, steal_pct_since, steal_words, today};
use xlb_tests::lab;
use xlb_tests::netns::{self, NetNs};
use xlb_tests::packet::{Frame, L4};
use xlb_tests::topology;
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlbfwd";
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 40, 0, 100);
const BACKEND: &str = "10.40.2.2";
/// The MAC the load balancer's namespace has for [`BACKEND`]: locally administered, of no
/// interface.
const NOBODY_MAC: &str = "02:00:00:40:02:02";
/// The many-flows runs' flows: distinct UDP source ports, a power of two that one SNAT
/// address's ports hold with room to spare.
const FLOWS: u32 = 16_384;

/// The chain's three namespaces; deleted on drop.
struct Chain {
    generator: NetNs,
    lb: NetNs,
    sink: NetNs,
}

fn main() -> Result<()> {
    xlb_tests::require_root()?;
    let run = Run::from_args();
    let frames: u32 = match run {
        Run::Full => 10_000_000,
        Run::Quick => 2_000_000,
        Run::Smoke => 100_000,
    };
    netns::cleanup_stale(PREFIX)?;
    let base = netns::unique_base(PREFIX);
    let chain = Chain {
        generator: NetNs::create(&format!("{base}-gen"))?,
        lb: NetNs::create(&format!("{base}-lb"))?,
        sink: NetNs::create(&format!("{base}-sink"))?,
    };
    chain.build()?;

    let l0_mac = chain.lb.exec("cat", &["/sys/class/net/l0/address"])?.stdout;
    let g0_mac = chain
        .generator
        .exec("cat", &["/sys/class/net/g0/address"])?
        .stdout;
    let mac = |text: &str| -> Result<[u8; 6]> {
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()?;
        bytes.try_into().map_err(|_| anyhow::anyhow!("a MAC"))
    };
    // No UDP checksum: the generator changes the source port for the many-flows runs.
    let mut frame = Frame::udp(
        (std::net::Ipv4Addr::new(10, 40, 1, 2), 5000),
        (VIP, 80),
        &[0x5a; 18],
    )
    .with_macs(mac(&g0_mac)?, mac(&l0_mac)?);
    frame.l4 = L4::Udp { checksum: false };
    let frame = frame.build();

    // The benchmark programs, from xlb's own object (never attached by xlb itself).
    let l1 = chain.lb.enter(|| lab::ifindex("l1"))??;
    let template: [u8; 60] = frame
        .clone()
        .try_into()
        .map_err(|f: Vec<u8>| anyhow::anyhow!("a {}-byte frame, not 60", f.len()))?;
    let mut bench = EbpfLoader::new()
        .override_global(BENCH_FORWARD_TO, &l1, true)
        .override_global(BENCH_FRAME, &template, true)
        .load(lb_userspace::loader::XDP_OBJECT)
        .context("loading the benchmark programs")?;
    // A second generator, spreading its frames over FLOWS source ports.
    let mut many = EbpfLoader::new()
        .override_global(BENCH_FRAME, &template, true)
        .override_global(BENCH_FLOWS, &FLOWS, true)
        .load(lb_userspace::loader::XDP_OBJECT)
        .context("loading the many-flows generator")?;
    let p: &mut Xdp = many.program_mut(TX).context("program xlb_tx")?.try_into()?;
    p.load()?;
    for name in [TX, NULL_FORWARDER, DROP] {
        let p: &mut Xdp = bench
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        p.load()?;
    }
    let mut devmap: DevMapHash<_> = bench
        .map_mut(names::DEVMAP)
        .context("map DEVMAP")?
        .try_into()?;
    // The kernel resolves a devmap's ifindex in the updating thread's namespace: update it
    // from inside the load balancer's.
    chain
        .lb
        .enter(|| devmap.insert(l1, l1, None, 0))?
        .context("putting l1 in the devmap")?;

    let xlb_config = format!(
        "[dataplane]\ninterfaces = [\"l0\", \"l1\"]\nxdp_mode = \"native\"\n\
         [conntrack]\nentries = 65536\n[api]\nmetrics = \"\"\n\
         [[service]]\nvip = \"{VIP}:80\"\nprotocol = \"udp\"\nsnat = \"10.40.2.100\"\n\
         [[service.backend]]\naddress = \"{BACKEND}:8080\"\n"
    );
    let rules = format!(
        "table ip xlbfwd {{\nchain prerouting {{\ntype nat hook prerouting priority dstnat;\n\
         ip daddr {VIP} udp dport 80 dnat to {BACKEND}:8080\n}}\n\
         chain postrouting {{\ntype nat hook postrouting priority srcnat;\n\
         ip daddr {BACKEND} snat to 10.40.2.100\n}}\n}}\n"
    );
    let rules_file = std::env::temp_dir().join(format!("{base}.nft"));

    // Every way in turn, round after round, each round a part of each way's frames: a
    // ratio is taken within a round, between ways measured a few seconds apart, and each
    // figure is the median of its rounds'. (Measured way after way, each in one go, the
    // machine's drift over minutes went into the ratios: in one such run the null
    // forwarder, the ceiling, came out no faster than xlb.)
    // (The smoke run's two rounds still go through every way twice, nftables' rules taken
    // away and back.)
    let rounds_run = if run == Run::Smoke { 2 } else { ROUNDS };
    let part = (frames / rounds_run).max(1);
    let mut generator = Generator::LiveFrames;
    let mut rounds: Vec<Rates> = Vec::new();
    let cpu = CpuTime::now();
    for round in 0..rounds_run {
        let mut rates = Rates::new();
        // (0) Nothing forwarded: l0 drops every frame, and counts what it took. The first
        // measurement finds out which generator this kernel allows.
        let dropped = on_l0(&chain, &mut bench, DROP, |bench| {
            match measure(&chain, generator, bench, 1, &frame, part, Count::Arrived) {
                Err(e) if round == 0 && refused_live_frames(&e) => {
                    println!("forwarding bench: {e:#}; the generator is a packet socket instead");
                    generator = Generator::PacketSocket;
                    measure(&chain, generator, bench, 1, &frame, part, Count::Arrived)
                }
                other => other,
            }
        })?;
        rates.insert("drop", dropped);
        // (a) the null forwarder on l0.
        let (one, spread) = on_l0(&chain, &mut bench, NULL_FORWARDER, |bench| {
            one_and_many(&chain, generator, (bench, &many), &frame, part)
        })?;
        rates.insert("null_forwarder", one);
        rates.insert("null_forwarder_many_flows", spread);
        // (b) xlb, started afresh each round.
        {
            let xlb = XlbProcess::start_quiet(&chain.lb, &xlb_config)?;
            let (one, spread) = one_and_many(&chain, generator, (&bench, &many), &frame, part)?;
            rates.insert("xlb", one);
            rates.insert("xlb_many_flows", spread);
            // The generator did spread its frames: xlb made a flow for every source port.
            let stats = xlb.json(&["stats"])?;
            let flows = stats["services"][0]["flows"].as_u64().unwrap_or(0);
            ensure!(
                flows >= u64::from(FLOWS),
                "xlb made {flows} flows; the generator should have spread over {FLOWS}"
            );
            xlb.stop()?;
            // The kernel frees xlb's maps in a worker after it exits, on one of the two
            // cores: not while nftables is measured.
            std::thread::sleep(Duration::from_secs(1));
        }
        // (c) the kernel with nftables, whose rules go again before the next round.
        {
            std::fs::write(&rules_file, &rules)?;
            let loaded = chain
                .lb
                .exec("nft", &["-f", &rules_file.display().to_string()]);
            let _ = std::fs::remove_file(&rules_file);
            loaded?;
            let measured = one_and_many(&chain, generator, (&bench, &many), &frame, part);
            chain.lb.exec("nft", &["delete", "table", "ip", "xlbfwd"])?;
            let (one, spread) = measured?;
            rates.insert("nftables", one);
            rates.insert("nftables_many_flows", spread);
        }
        eprintln!(
            "forwarding bench: round {} of {rounds_run}: {}",
            round + 1,
            rates
                .iter()
                .map(|(key, r)| format!("{key} {r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rounds.push(rates);
    }
    let steal = steal_pct_since(&cpu);
    println!("forwarding bench: {}", steal_words(steal));

    // Each figure the median of its rounds': a rate, a ratio of two rates of one round.
    let of_rounds = |figure: &dyn Fn(&Rates) -> f64| median(rounds.iter().map(figure).collect());
    let rate = |key: &str| of_rounds(&|r: &Rates| r[key]);
    let ratio = |a: &str, b: &str| of_rounds(&|r: &Rates| r[a] / r[b]);
    // (Not named `null`: inside `json!` that is the JSON literal, not the variable.)
    let (null_forwarder, xlb, nft) = (rate("null_forwarder"), rate("xlb"), rate("nftables"));
    // What forwarding a frame costs over dropping it: each round's time per frame less its
    // drop run's, which is the generator's and the veth's share of every run's time.
    let over_drop = |key: &str| of_rounds(&|r: &Rates| 1e3 / r[key] - 1e3 / r["drop"]);
    let mut costs = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    for key in FORWARDED {
        costs.insert(key.to_string(), over_drop(key).into());
    }
    for suffix in ["", "_many_flows"] {
        for base in ["null_forwarder", "nftables"] {
            ratios.insert(
                format!("xlb_over_{base}{suffix}"),
                ratio(&format!("xlb{suffix}"), &format!("{base}{suffix}")).into(),
            );
        }
    }
    let json = serde_json::json!({
        "forwarding_mpps": {
            "run": run.record_of_run(),
            "steal_pct": steal,
            "method": format!(
                "{frames} frames of 60 bytes per way, one UDP flow and then {FLOWS} (source \
                 ports), {}, through the load balancer's namespace into a sink namespace, in \
                 {rounds_run} rounds of every way in turn; Mpps = frames the sink received (for \
                 `drop`, that l0 took in) / seconds the generator ran, and each figure (a \
                 rate, a ratio of two rates of one round) the median of its rounds'",
                generator.describe()
            ),
            "generator": format!("{generator:?}"),
            "drop": rate("drop"),
            "ns_per_frame_over_drop": costs,
            "ratios": ratios,
            "null_forwarder": null_forwarder,
            "xlb": xlb,
            "nftables": nft,
            "many_flows": FLOWS,
            "null_forwarder_many_flows": rate("null_forwarder_many_flows"),
            "xlb_many_flows": rate("xlb_many_flows"),
            "nftables_many_flows": rate("nftables_many_flows"),
        }
    });
    let written = run.record(&json)?;
    let chart = run.chart_file("forwarding");
    let bars: Vec<(String, f64)> = std::iter::once("drop")
        .chain(FORWARDED)
        .map(|key| {
            let label = key
                .replace("null_forwarder", "null fwd")
                .replace("_many_flows", " (16k)");
            (label, rate(key))
        })
        .collect();
    xlb_tests::figures::bar_chart(
        &chart,
        &format!(
            "Live forwarding rate, one core: one flow, and (16k) {FLOWS} flows ({})",
            today()
        ),
        "Mpps",
        &bars,
    )?;
    if run == Run::Smoke {
        println!(
            "forwarding bench smoke: null {null_forwarder:.2}, xlb {xlb:.2}, nftables {nft:.2} Mpps \
             (xlb over {FLOWS} flows {:.2}); figures written to {}",
            rate("xlb_many_flows"),
            written.display()
        );
    } else {
        println!(
            "machine: {}\n| through | Mpps | × null forwarder | × nftables | ns per frame over \
             dropping it |\n|---|---:|---:|---:|---:|",
            machine()
        );
        println!(
            "| drop (nothing forwarded) | {:.2} | - | - | - |",
            rate("drop")
        );
        for key in FORWARDED {
            let suffix = if key.ends_with("_many_flows") {
                "_many_flows"
            } else {
                ""
            };
            println!(
                "| {key} | {:.2} | {:.2} | {:.2} | {:.0} |",
                rate(key),
                ratio(key, &format!("null_forwarder{suffix}")),
                ratio(key, &format!("nftables{suffix}")),
                over_drop(key)
            );
        }
        println!(
            "figures written to {}, chart to {}",
            written.display(),
            chart.display()
        );
    }
    Ok(())
}

impl Chain {
    fn build(&self) -> Result<()> {
        for ns in [&self.generator, &self.lb, &self.sink] {
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        for (a, a_if, b, b_if) in [
            (&self.generator, "g0", &self.lb, "l0"),
            (&self.lb, "l1", &self.sink, "s0"),
        ] {
            topology::veth(a, a_if, b, b_if)?;
        }
        for (ns, iface, addr) in [
            (&self.generator, "g0", "10.40.1.2/24"),
            (&self.lb, "l0", "10.40.1.1/24"),
            (&self.lb, "l1", "10.40.2.1/24"),
            (&self.sink, "s0", "10.40.2.9/24"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", iface])?;
            ns.ip(&["link", "set", iface, "up"])?;
            // Frames sent into a veth by XDP arrive only where the receiving end has NAPI
            // (GRO); and complete checksums on the wire.
            topology::peer_offloads(ns, iface)?;
        }
        self.lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // The backend's MAC is nobody's: the sink drops every frame as soon as it sees it
        // is not addressed to it, whoever forwarded it. (The null forwarder's frames, their
        // MACs swapped, are not addressed to it either; with s0's own MAC the sink would
        // route xlb's and nftables' frames, find no route and answer, on the same core.)
        self.lb.ip(&[
            "neigh",
            "replace",
            BACKEND,
            "lladdr",
            NOBODY_MAC,
            "dev",
            "l1",
            "nud",
            "permanent",
        ])?;
        self.generator
            .ip(&["route", "add", "default", "via", "10.40.1.1"])?;
        Ok(())
    }

    /// The packets `iface` of `ns` has received (`rx_packets`; for a veth, whatever its
    /// XDP program did with them).
    fn received(ns: &NetNs, iface: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{iface}/statistics/rx_packets");
        let text = ns.exec("cat", &[&path])?.stdout;
        Ok(text.trim().parse()?)
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for ns in [&self.generator, &self.lb, &self.sink] {
            ns.kill_processes();
            let _ = ns.delete();
        }
    }
}

/// The generator's test run failed with EPERM: the kernel refuses BPF_PROG_TEST_RUN in
/// live-frames mode, as some kernels built for sandboxes do, and there is no generator to
/// measure with.
#[derive(Debug)]
struct LiveFramesRefused(String);

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the kernel refuses live-frames test runs: {}", self.0)
    }
}

impl std::error::Error for LiveFramesRefused {}

/// Whether `e` is [`LiveFramesRefused`].
fn refused_live_frames(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<LiveFramesRefused>())
}

/// What sends the frames into g0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Generator {
    /// `xlb_tx` run by BPF_PROG_TEST_RUN in live-frames mode: XDP_TX out of g0, no socket
    /// buffers, the cheapest sender there is.
    LiveFrames,
    /// A packet socket on g0 that bypasses the qdisc, a batch of frames per `sendmmsg`: for
    /// kernels that refuse live frames. Each frame is a socket buffer, which the veth copies
    /// into a page of its own before an XDP program on l0 sees it (a socket buffer's
    /// headroom is smaller than XDP's), so every rate is lower than with live frames, the
    /// XDP forwarders' the most; nftables, which takes the socket buffer as it is, the least.
    PacketSocket,
}

impl Generator {
    fn describe(self) -> &'static str {
        match self {
            Generator::LiveFrames => {
                "generated by xlb_tx with BPF_PROG_TEST_RUN in live-frames mode on a veth"
            }
            Generator::PacketSocket => {
                "generated by a packet socket on a veth (PACKET_QDISC_BYPASS, sendmmsg of 256; \
                 the kernel refuses live-frames test runs), its thread on CPU 0"
            }
        }
    }
}

/// Runs `measure` with `bench`'s program `name` attached to l0 (native XDP), then detaches
/// it, also when `measure` fails.
fn on_l0<T>(
    chain: &Chain,
    bench: &mut aya::Ebpf,
    name: &str,
    measure: impl FnOnce(&aya::Ebpf) -> Result<T>,
) -> Result<T> {
    fn program<'a>(bench: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut Xdp> {
        Ok(bench
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?)
    }
    let p = program(bench, name)?;
    let link = chain.lb.enter(|| -> Result<XdpLink> {
        let id = p.attach("l0", XdpMode::Driver)?;
        Ok(p.take_link(id)?)
    })??;
    let _attached = OnL0 {
        chain,
        link: Some(link),
    };
    measure(bench)
}

/// An attachment to l0, detached on drop (also when a measurement panics) from l0's
/// namespace: a netlink attachment (aya's fallback to a kernel link) is detached by l0's
/// ifindex, which in the root namespace is another interface's.
struct OnL0<'a> {
    chain: &'a Chain,
    link: Option<XdpLink>,
}

impl Drop for OnL0<'_> {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        let detached = self
            .chain
            .lb
            .enter(|| link.detach())
            .and_then(|detached| Ok(detached?));
        if let Err(e) = detached {
            eprintln!("forwarding bench: detaching from l0: {e:#}");
        }
    }
}

/// The rates through the sink of one flow's frames (`programs.0` generates them with live
/// frames) and of [`FLOWS`] flows' (`programs.1`).
fn one_and_many(
    chain: &Chain,
    generator: Generator,
    programs: (&aya::Ebpf, &aya::Ebpf),
    frame: &[u8],
    frames: u32,
) -> Result<(f64, f64)> {
    Ok((
        measure(chain, generator, programs.0, 1, frame, frames, Count::Sunk)?,
        measure(
            chain,
            generator,
            programs.1,
            FLOWS,
            frame,
            frames,
            Count::Sunk,
        )?,
    ))
}

/// Where [`measure`] counts the frames that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    /// Received by the sink, s0: forwarded.
    Sunk,
    /// Taken in by l0 (the XDP program there dropped them).
    Arrived,
}

/// How many rounds of every way the frames of each are sent in (the smoke run's: 2).
const ROUNDS: u32 = 5;

/// What one round measured: frames per second in millions, by way (`drop`, and each of
/// [`FORWARDED`]).
type Rates = std::collections::BTreeMap<&'static str, f64>;

/// The forwarders' keys in [`Rates`] and in the JSON, one flow's and many flows', in the
/// order they are reported.
const FORWARDED: [&str; 6] = [
    "null_forwarder",
    "null_forwarder_many_flows",
    "xlb",
    "xlb_many_flows",
    "nftables",
    "nftables_many_flows",
];

/// Sends `frames` frames like `frame` from g0 (`program` is the live-frames generator,
/// which was loaded for `flows` flows) and returns the rate they were counted at (`count`),
/// in Mpps.
fn measure(
    chain: &Chain,
    generator: Generator,
    program: &aya::Ebpf,
    flows: u32,
    frame: &[u8],
    frames: u32,
    count: Count,
) -> Result<f64> {
    let counted = || match count {
        Count::Sunk => Chain::received(&chain.sink, "s0"),
        Count::Arrived => Chain::received(&chain.lb, "l0"),
    };
    let before = counted()?;
    let elapsed = chain.generator.enter(|| match generator {
        Generator::LiveFrames => send_live_frames(program, frame, frames),
        Generator::PacketSocket => send_through_packet_socket(frame, flows, frames),
    })??;
    // What is still in flight arrives within moments.
    std::thread::sleep(Duration::from_millis(100));
    let received = counted()? - before;
    ensure!(
        received > 0,
        "nothing of {frames} frames was counted ({count:?})"
    );
    Ok(received as f64 / elapsed.as_secs_f64() / 1e6)
}

/// Transmits `frames` frames out of g0 with `program`'s `xlb_tx` in live-frames mode;
/// returns how long it took. Fails with [`LiveFramesRefused`] where the kernel refuses.
fn send_live_frames(program: &aya::Ebpf, frame: &[u8], frames: u32) -> Result<Duration> {
    let tx: &Xdp = program.program(TX).context("program xlb_tx")?.try_into()?;
    let g0 = lab::ifindex("g0")?;
    let ctx = lab::xdp_md(frame.len() as u32, g0);
    let started = Instant::now();
    tx.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: frames,
        attrs: TestRunAttrs::new().xdp_live_frames(64),
        ..Default::default()
    })
    .map_err(|e| {
        let err = anyhow::Error::from(e);
        let refused = err
            .chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| io.raw_os_error() == Some(libc::EPERM));
        if refused {
            anyhow::Error::new(LiveFramesRefused(format!("{err:#}")))
        } else {
            err
        }
    })?;
    Ok(started.elapsed())
}

/// Frames per `sendmmsg` of [`send_through_packet_socket`].
const BATCH: usize = 256;

/// Sends `frames` copies of `frame` out of g0 through a packet socket, frame i from UDP
/// source port 1024 + i mod `flows` as `xlb_tx` does (`flows` a power of two; 0 or 1: the
/// frame's own port); returns how long it took. The thread runs on CPU 0 only: a veth
/// hands its frames to the peer's NAPI on the sending CPU, so the generator and the
/// forwarding share one core, as with live frames. Frames the kernel refuses (ENOBUFS:
/// the veth's ring full) are sent again; what the veth drops after taking it, the sink
/// never counts.
fn send_through_packet_socket(frame: &[u8], flows: u32, frames: u32) -> Result<Duration> {
    use std::os::fd::AsRawFd;

    const UDP_SOURCE_PORT_AT: usize = 14 + 20;
    ensure!(
        frame.len() >= UDP_SOURCE_PORT_AT + 2,
        "a {}-byte frame has no UDP ports",
        frame.len()
    );
    lab::pin_to(0)?;
    let fd = packet_socket(lab::ifindex("g0")?)?;

    let len = frame.len();
    let mut buffer: Vec<u8> = frame.repeat(BATCH);
    let base = buffer.as_mut_ptr();
    let mut iovecs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            // SAFETY: frame i of `buffer`, which outlives the sends.
            iov_base: unsafe { base.add(i * len) }.cast(),
            iov_len: len,
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: msghdr and mmsghdr are plain data; zero is a valid value of each field.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mask = flows.max(1) - 1;
    let mut sent: u32 = 0;
    let started = Instant::now();
    while sent < frames {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "sent {sent} of {frames} frames in two minutes"
        );
        let n = BATCH.min((frames - sent) as usize);
        if mask != 0 {
            for i in 0..n {
                let port = (1024 + ((sent + i as u32) & mask)) as u16;
                let at = i * len + UDP_SOURCE_PORT_AT;
                // SAFETY: inside frame i of `buffer` (checked above); written through the
                // pointer the iovecs hold, so no reference to `buffer` competes with them.
                unsafe {
                    std::ptr::copy_nonoverlapping(port.to_be_bytes().as_ptr(), base.add(at), 2)
                };
            }
        }
        // SAFETY: `n` messages, each one iovec into `buffer`, all alive for the call.
        let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), messages.as_mut_ptr(), n as u32, 0) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(err).context("sending frames out of g0"),
            }
        }
        sent += rc as u32;
    }
    Ok(started.elapsed())
}

/// A packet socket that sends out of interface `ifindex`, past its qdisc, and receives
/// nothing (protocol 0).
fn packet_socket(ifindex: u32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let check = |rc: libc::c_int, what: &str| {
        ensure!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
        Ok(())
    };
    // SAFETY: plain syscall; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    check(fd, "a packet socket")?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, "PACKET_QDISC_BYPASS")?;
    // SAFETY: sockaddr_ll is plain data; zero is a valid value of each field.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, "binding a packet socket")?;
    Ok(fd)
}
