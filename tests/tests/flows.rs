//! The life of flows through the real xlb, with real clients and servers: SNAT ports come
//! back after connections close, and not before; a SYN flood of ten times the table's size
//! breaks no established flow and leaves room for new ones as soon as it stops; a full
//! table refuses the next flow and keeps the others; idle flows expire, and a TCP
//! connection whose flow expired carries on; and a minute of short connections at a steady
//! rate is never refused while ports can be free.
//!
//! Needs root, the `xlb` binary (`$XLB_BIN`) and `ip`, `ethtool`, `ping`.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_common::reason::Reason;
use xlb_tests::client;
use xlb_tests::echo::{EchoConn, EchoServer, raise_fd_limit};
use xlb_tests::flood::{Sources, syn_flood};
use xlb_tests::servers::BackendServers;
use xlb_tests::stats::Stats;
use xlb_tests::topology::{self, Options, SNAT, Topology, VIP, with_topology};
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlbfl";
/// The echo service's port, on the VIP and on the backends.
const ECHO_PORT: u16 = 7007;

fn echo_vip() -> SocketAddr {
    SocketAddr::from((VIP, ECHO_PORT))
}

/// A config with one service on the VIP, on `port`, to `backends` of the topology (by
/// index) on `backend_port`; `extra` goes after `[dataplane]`'s interfaces, `conntrack` is
/// the `[conntrack]` section's body.
fn config(
    topo: &Topology,
    port: u16,
    backends: &[usize],
    backend_port: u16,
    extra: &str,
    conntrack: &str,
) -> String {
    let backends: String = backends
        .iter()
        .map(|&i| {
            let addr = SocketAddrV4::new(topo.backends[i].addr, backend_port);
            format!("[[service.backend]]\naddress = \"{addr}\"\n")
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = {:?}\n{extra}\n[conntrack]\n{conntrack}\n\n[[service]]\n\
         vip = \"{VIP}:{port}\"\nprotocol = \"tcp\"\nsnat = \"{SNAT}\"\n{backends}",
        topo.lb_interfaces()
    )
}

/// `count` short connections to the VIP's port 80, one after another; all must be answered.
fn sequential(topo: &Topology, count: usize, what: &str) -> Result<()> {
    let results = client::tcp_requests(&topo.client, topology::vip_tcp(), count, 1)?;
    client::all_ok(what, results)?;
    Ok(())
}

/// With 64 SNAT ports and a 2-second time-wait, three rounds of 64 connections a few
/// seconds apart all succeed: ports come back once their flows have closed and waited.
#[test]
fn snat_ports_come_back_after_the_time_wait() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        let cfg = config(
            topo,
            80,
            &[0],
            8080,
            "snat_port_range = [40000, 40063]",
            "tcp_time_wait_timeout = 2",
        );
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        for round in 1..=3 {
            sequential(topo, 64, &format!("round {round} of 64 connections"))?;
            // 2 s of time-wait, half a second of refresh slack, one sweep interval.
            std::thread::sleep(Duration::from_millis(4000));
        }
        let stats = Stats::parse(&xlb.stop()?)?;
        let drops = stats.nonzero_reasons("drop/");
        ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
        ensure!(
            stats.conntrack.get("expired").copied().unwrap_or(0) >= 128,
            "the first two rounds' flows did not expire: {:?}",
            stats.conntrack
        );
        Ok(())
    });
}

/// ...and with the default time-wait (60 s) the 65th connection within the minute finds no
/// port: refused, and counted as such.
#[test]
fn the_65th_connection_within_the_time_wait_is_refused() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        let cfg = config(topo, 80, &[0], 8080, "snat_port_range = [40000, 40063]", "");
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        sequential(topo, 64, "64 connections")?;
        let refused = topo.client.enter(|| {
            std::net::TcpStream::connect_timeout(&topology::vip_tcp(), Duration::from_secs(2))
        })?;
        ensure!(refused.is_err(), "the 65th connection got a port");
        let stats = Stats::parse(&xlb.stop()?)?;
        ensure!(
            stats.reason(Reason::DropSnatPortsExhausted.name()) >= 1,
            "the refusal was not counted as exhaustion: {:?}",
            stats.reasons
        );
        ensure!(
            stats.states.get("time_wait") == Some(&64),
            "flows by state: {:?}",
            stats.states
        );
        Ok(())
    });
}

/// Echo servers on every backend, and xlb in front of them with room for `entries` flows.
fn echo_service(topo: &Topology, entries: usize) -> Result<(Vec<EchoServer>, XlbProcess)> {
    topo.check_connectivity()?;
    let servers = EchoServer::on_backends(topo, ECHO_PORT)?;
    let cfg = config(
        topo,
        ECHO_PORT,
        &[0, 1, 2],
        ECHO_PORT,
        "",
        &format!("entries = {entries}"),
    );
    Ok((servers, XlbProcess::start(&topo.lb, &cfg)?))
}

fn open_echo_conns(topo: &Topology, n: usize) -> Result<Vec<EchoConn>> {
    (0..n)
        .map(|i| {
            EchoConn::connect(&topo.client, echo_vip(), Duration::from_secs(3))
                .with_context(|| format!("echo connection {i}"))
        })
        .collect()
}

fn echo_all(conns: &mut [EchoConn], what: &str) -> Result<()> {
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&format!("{what} {i}"))
            .with_context(|| format!("{what}: connection {i}"))?;
    }
    Ok(())
}

/// 200 long-lived connections, then a SYN flood from spoofed sources of the client's own
/// subnet, ten times the table's capacity: all 200 still echo, and a new connection
/// succeeds within a second of the flood's end.
#[test]
fn a_syn_flood_breaks_no_established_flow() {
    const ENTRIES: usize = 2000;
    const LONG_LIVED: usize = 200;
    raise_fd_limit(4096).expect("raising the open-file limit");
    with_topology(PREFIX, Options::default(), |topo| {
        let (_servers, xlb) = echo_service(topo, ENTRIES)?;
        let mut conns = open_echo_conns(topo, LONG_LIVED)?;
        echo_all(&mut conns, "before the flood")?;

        let SocketAddr::V4(vip) = echo_vip() else {
            unreachable!()
        };
        let sources = Sources {
            prefix: [10, 10, 1],
            first: 10,
            last: 250,
        };
        let took = syn_flood(&topo.client, vip, sources, 10 * ENTRIES, 42)?;
        let flood_end = Instant::now();
        eprintln!("flood of {} SYNs sent in {took:?}", 10 * ENTRIES);

        // Within a second of the flood's end, a new connection gets through at its first
        // SYN: started half a second after, it must be established within 400 ms, before
        // the kernel would send a second SYN.
        std::thread::sleep(Duration::from_millis(500));
        let mut fresh = EchoConn::connect(&topo.client, echo_vip(), Duration::from_millis(400))
            .context("a new connection half a second after the flood")?;
        fresh.echo("after the flood")?;
        ensure!(
            flood_end.elapsed() < Duration::from_secs(1),
            "the new connection took until {:?} after the flood",
            flood_end.elapsed()
        );
        echo_all(&mut conns, "after the flood")?;
        let stats = Stats::parse(&xlb.stop()?)?;
        ensure!(
            stats.reason(Reason::DropConntrackFull.name())
                + stats.reason(Reason::DropSnatPortsExhausted.name())
                > 0,
            "the flood never filled the table: {:?} {:?}",
            stats.reasons,
            stats.conntrack
        );
        ensure!(
            stats.conntrack.get("pruned").is_some_and(|&n| n > 0),
            "no flood flow was pruned: {:?}",
            stats.conntrack
        );
        Ok(())
    });
}

/// A table of a few thousand flows, full of live connections: the next one is refused and
/// counted, and every live one keeps working.
#[test]
fn a_full_table_refuses_the_next_flow_and_keeps_the_rest() {
    const ENTRIES: usize = 2000;
    raise_fd_limit(8192).expect("raising the open-file limit");
    with_topology(PREFIX, Options::default(), |topo| {
        let (_servers, xlb) = echo_service(topo, ENTRIES)?;
        let mut conns = open_echo_conns(topo, ENTRIES)?;
        echo_all(&mut conns, "full table")?;
        let next = EchoConn::connect(&topo.client, echo_vip(), Duration::from_secs(2));
        if next.is_ok() {
            bail!("connection {} got through a full table", ENTRIES + 1);
        }
        echo_all(&mut conns, "after the refusal")?;
        let stats = Stats::parse(&xlb.stop()?)?;
        ensure!(
            stats.reason(Reason::DropConntrackFull.name()) >= 1,
            "the refusal was not counted: {:?}",
            stats.reasons
        );
        ensure!(
            stats.conntrack.get("flows") == Some(&(ENTRIES as u64)),
            "{:?}",
            stats.conntrack
        );
        Ok(())
    });
}

/// Idle UDP and TCP flows expire after their timeouts, both entries gone; and the TCP
/// connection, idle but open, carries on afterwards: its next packet is picked up as a new
/// flow to the same backend, with the same SNAT port (the flow hash's first choice).
#[test]
fn idle_flows_expire_and_an_open_connection_survives_it() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let _echo = EchoServer::on_backends(topo, ECHO_PORT)?;
        let _servers = BackendServers::start(topo)?;
        let udp_backend = SocketAddrV4::new(topo.backends[0].addr, 8080);
        let cfg = format!(
            "{}\n[[service]]\nvip = \"{}\"\nprotocol = \"udp\"\nsnat = \"{SNAT}\"\n\
             [[service.backend]]\naddress = \"{udp_backend}\"\n",
            config(
                topo,
                ECHO_PORT,
                &[0],
                ECHO_PORT,
                "",
                "tcp_established_timeout = 2\nudp_timeout = 2",
            ),
            topology::vip_udp(),
        );
        let mut xlb = XlbProcess::start_args(&topo.lb, &cfg, &["--stats-interval", "1"])?;
        let mut conn = EchoConn::connect(&topo.client, echo_vip(), Duration::from_secs(3))?;
        conn.echo("hello")?;
        topo.client
            .enter(|| client::udp_request(topology::vip_udp(), Duration::from_secs(2)))??;
        // The sweeper counts flows as it passes, once a second.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let s = Stats::parse(&xlb.next_stats(Duration::from_secs(5))?)?;
            if s.conntrack.get("flows") == Some(&2) && s.conntrack.get("entries") == Some(&4) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "after one TCP and one UDP flow: {:?}",
                s.conntrack
            );
        }
        // 2 s timeouts, half a second of refresh slack, then the next sweep (1 s).
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            let s = Stats::parse(&xlb.next_stats(Duration::from_secs(5))?)?;
            if s.conntrack.get("entries") == Some(&0) {
                ensure!(s.conntrack.get("expired") == Some(&2), "{:?}", s.conntrack);
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the idle flows did not expire: {:?}",
                s.conntrack
            );
        }
        conn.echo("still here")
            .context("the idle TCP connection after its flow expired")?;
        let stats = Stats::parse(&xlb.stop()?)?;
        let drops = stats.nonzero_reasons("drop/");
        ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
        Ok(())
    });
}

/// A minute of short connections to one backend at a steady rate below what its ports can
/// sustain: none is refused. With 1000 SNAT ports and a 2-second time-wait, a port comes
/// back at most 3.5 s after its connection closed, so one backend and SNAT address sustain
/// about 1000 / 3.5 ≈ 285 new connections a second; the test runs at half that.
#[test]
fn a_minute_of_short_connections_is_never_refused() {
    const RATE: u32 = 140;
    const SECONDS: u32 = 60;
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = BackendServers::start(topo)?;
        let cfg = config(
            topo,
            80,
            &[0],
            8080,
            "snat_port_range = [20000, 20999]",
            "tcp_time_wait_timeout = 2",
        );
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let started = Instant::now();
        let total = (RATE * SECONDS) as usize;
        let failures = topo.client.enter(|| {
            let mut failures = Vec::new();
            for i in 0..total {
                let due = started + Duration::from_secs_f64(i as f64 / f64::from(RATE));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if let Err(e) = client::tcp_request(topology::vip_tcp()) {
                    failures.push(format!("connection {i}: {e:#}"));
                    if failures.len() >= 5 {
                        break;
                    }
                }
            }
            failures
        })?;
        let elapsed = started.elapsed();
        ensure!(failures.is_empty(), "connections failed: {failures:#?}");
        let stats = Stats::parse(&xlb.stop()?)?;
        let drops = stats.nonzero_reasons("drop/");
        ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
        let served = servers.stats("b1").map_or(0, |s| s.tcp_connections);
        ensure!(served == total as u64, "b1 served {served} of {total}");
        let flows = stats.service_flows("10.10.0.100:80", "tcp");
        ensure!(
            flows == Some(total as u64),
            "xlb counted {flows:?} flows for {total} connections"
        );
        let rate = total as f64 / elapsed.as_secs_f64();
        eprintln!(
            "{total} connections in {elapsed:?} ({rate:.0}/s), none refused; {:?}",
            stats.conntrack
        );
        // The rate must really have been held, or the test proves less than it says.
        ensure!(
            rate >= 0.9 * f64::from(RATE),
            "the client managed only {rate:.0} connections a second"
        );
        Ok(())
    });
}
