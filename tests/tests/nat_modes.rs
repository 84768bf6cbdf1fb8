//! End to end, the NAT modes and ICMP: real xlb, real kernels, real sockets.
//!
//! * `dnat`: the backends see the client's own address and port, and route their replies
//!   through xlb, which gives them the VIP back as source.
//! * A ping to a VIP, an address no host has, is answered by the data plane.
//! * Path MTU discovery through xlb, in `fullnat` and `dnat`: a router between the client and
//!   xlb has a 1280-byte link toward the client, while the client and the backends have MTU
//!   1500, so the client's MSS lets the backend send 1500-byte packets. The router's
//!   "fragmentation needed" is addressed to the VIP (the packets' source); only if xlb
//!   translates it and hands it to the backend does a 10 MB download finish. The same over
//!   IPv6, where the router's error is ICMPv6 "packet too big"; and with xlb's own link the
//!   narrow one, where xlb must say so itself, in both families.
//!
//! * A SNAT pool of two addresses holds more flows to one backend than one address has
//!   ports, and the backend sees both addresses.
//!
//! * A NAT gateway: a private host reaches servers outside over TCP, UDP and ping; they see
//!   only the public address (the load balancer's own), from the gateway's port range; one
//!   UDP socket keeps one public address and port toward every server (endpoint-independent
//!   mapping); the gateway comes and goes with `xlb apply`.
//!
//! Every host's checksum error counters (TCP, UDP, IPv4, ICMP, and IPv6's) stay at zero
//! throughout.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xlb_tests::client;
use xlb_tests::echo::{EchoConn, EchoServer, raise_fd_limit};
use xlb_tests::netns::NetNs;
use xlb_tests::nstat::{Counters, Snapshot};
use xlb_tests::servers::BackendServers;
use xlb_tests::topology::{
    self, BACKEND_PORT, CLIENT_ADDR, FLAT_LB_ADDR, LB_INTERFACES, Layout, Options, SNAT, Topology,
    VIP, with_topology,
};
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlbnm";
/// The download of the path MTU test.
const DOWNLOAD_BYTES: usize = 10 << 20;
/// Long enough for a 10 MB download over veths many times over; a download that stalls on a
/// black hole never finishes.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);
const ROUTER_MTU: u32 = 1280;

/// A config with one TCP and one UDP service on the VIP, in `mode`, over `backends`.
fn config(mode: &str, backends: &[SocketAddr]) -> String {
    config_of(Family::V4, mode, backends)
}

/// [`config`] on the VIP and SNAT address of `family`.
fn config_of(family: Family, mode: &str, backends: &[SocketAddr]) -> String {
    let (vips, snat) = match family {
        Family::V4 => ([topology::vip_tcp(), topology::vip_udp()], IpAddr::V4(SNAT)),
        Family::V6 => (
            [topology::vip6_tcp(), topology::vip6_udp()],
            IpAddr::V6(topology::SNAT6),
        ),
    };
    let snat = if mode == "fullnat" {
        format!("snat = \"{snat}\"\n")
    } else {
        String::new()
    };
    let mut c = format!("[dataplane]\ninterfaces = {LB_INTERFACES:?}\n");
    for (vip, protocol) in [(vips[0], "tcp"), (vips[1], "udp")] {
        c += &format!(
            "\n[[service]]\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\nmode = \"{mode}\"\n{snat}"
        );
        for b in backends {
            c += &format!("[[service.backend]]\naddress = \"{b}\"\n");
        }
    }
    c
}

/// The counters of every namespace of `topo`.
fn snapshot(topo: &Topology) -> Result<Snapshot> {
    Snapshot::take(&topo.namespaces())
}

/// Fails if any checksum error counter moved since `before`.
fn no_checksum_errors(topo: &Topology, before: &Snapshot) -> Result<()> {
    before.no_checksum_errors_since(&topo.namespaces())
}

#[test]
fn dnat_backends_see_the_client_and_replies_come_from_the_vip() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = BackendServers::start(topo)?;
        let backends: Vec<SocketAddr> = topo.backends.iter().map(|b| b.service_addr()).collect();
        // The TCP service from the file; the UDP one added live, as an operator would.
        let file = config("dnat", &backends);
        let file = &file[..file
            .find("\n[[service]]\nvip = \"10.10.0.100:53\"")
            .unwrap()];
        let xlb = XlbProcess::start(&topo.lb, file)?;
        let udp_vip = topology::vip_udp().to_string();
        let refused = xlb.command(&[
            "service",
            "add",
            &udp_vip,
            "--protocol",
            "udp",
            "--mode",
            "dnat",
            "--snat",
            "10.20.0.1",
        ])?;
        ensure!(
            !refused.status.success()
                && String::from_utf8_lossy(&refused.stderr).contains("--snat has no use"),
            "a dnat service with --snat: {refused:?}"
        );
        let added = xlb.command(&[
            "service",
            "add",
            &udp_vip,
            "--protocol",
            "udp",
            "--mode",
            "dnat",
        ])?;
        ensure!(added.status.success(), "service add --mode dnat: {added:?}");
        for b in &backends {
            let added = xlb.command(&[
                "backend",
                "add",
                &udp_vip,
                &b.to_string(),
                "--protocol",
                "udp",
            ])?;
            ensure!(added.status.success(), "backend add: {added:?}");
        }
        let before = snapshot(topo)?;

        let tcp = client::tcp_requests(&topo.client, topology::vip_tcp(), 120, 8)?;
        let tcp = client::all_ok("TCP through the dnat service", tcp)?;
        for r in &tcp {
            client::check_dnat(
                r.local,
                r.peer,
                &r.answer,
                topology::vip_tcp(),
                CLIENT_ADDR.into(),
            )?;
        }
        let udp = client::udp_requests(
            &topo.client,
            topology::vip_udp(),
            30,
            Duration::from_secs(2),
        )?;
        let udp = client::all_ok("UDP through the dnat service", udp)?;
        for r in &udp {
            // (The socket is bound to 0.0.0.0: its address is the client's.)
            client::check_dnat(
                r.local,
                r.from,
                &r.answer,
                topology::vip_udp(),
                CLIENT_ADDR.into(),
            )?;
        }
        for b in &topo.backends {
            let served = servers.stats(&b.name).map_or(0, |s| s.tcp_connections);
            ensure!(served > 0, "backend {} got no connection of 120", b.name);
        }
        let peers = servers.all_peer_ips();
        ensure!(
            peers.len() == 1 && peers.contains(&CLIENT_ADDR.into()),
            "backends saw {peers:?}, not just the client {CLIENT_ADDR}"
        );
        no_checksum_errors(topo, &before)?;
        let services = xlb.json(&["service", "ls"])?;
        ensure!(
            services
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["mode"] == "dnat" && s["snat"] == "-")),
            "service ls: {services}"
        );

        // The mode changes live, both ways: new connections follow it.
        for (mode, seen) in [("fullnat", SNAT), ("dnat", CLIENT_ADDR)] {
            let path =
                std::env::temp_dir().join(format!("{PREFIX}-{mode}-{}.toml", std::process::id()));
            std::fs::write(&path, config(mode, &backends))?;
            let out = xlb.command(&["apply", "--config", path.to_str().context("path")?])?;
            let _ = std::fs::remove_file(&path);
            ensure!(out.status.success(), "apply with mode {mode}: {out:?}");
            let tcp = client::tcp_requests(&topo.client, topology::vip_tcp(), 30, 4)?;
            for r in client::all_ok(&format!("TCP after the switch to {mode}"), tcp)? {
                ensure!(
                    r.answer.seen_peer.ip() == std::net::IpAddr::from(seen),
                    "after the switch to {mode}, {} saw {}",
                    r.answer.server,
                    r.answer.seen_peer
                );
            }
        }
        Ok(())
    });
}

/// The NAT gateway's config: the client's network goes out as the load balancer's own
/// address toward the backends, ports 20000-20999.
fn gateway_config(topo: &Topology) -> String {
    format!(
        "[dataplane]\ninterfaces = {:?}\n\n[[nat_gateway]]\nsource = \"10.10.1.0/24\"\n\
         to = \"{FLAT_LB_ADDR}\"\nports = [{}, {}]\n",
        topo.lb_interfaces(),
        GATEWAY_PORTS.0,
        GATEWAY_PORTS.1
    )
}

const GATEWAY_PORTS: (u16, u16) = (20000, 20999);

/// What the servers saw of `n` TCP connections from the client to each of them.
fn tcp_peers(topo: &Topology, n: usize) -> Result<Vec<SocketAddr>> {
    let mut peers = Vec::new();
    for b in &topo.backends {
        let replies = client::tcp_requests(&topo.client, b.service_addr(), n, 4)?;
        let replies = client::all_ok(&format!("TCP to {}", b.service_addr()), replies)?;
        peers.extend(replies.iter().map(|r| r.answer.seen_peer));
    }
    Ok(peers)
}

/// Pings every backend from the client.
fn ping_backends(topo: &Topology) -> Result<()> {
    for b in &topo.backends {
        topology::ping(&topo.client, b.addr).with_context(|| format!("ping {}", b.addr))?;
    }
    Ok(())
}

/// What `socket` (the client's) is seen as by the server at `to`.
fn seen_as(socket: &std::net::UdpSocket, to: SocketAddr) -> Result<SocketAddr> {
    socket.send_to(b"who am i\n", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {to}"))?;
    ensure!(from == to, "an answer from {from}, asked {to}");
    Ok(client::Answer::parse(&String::from_utf8_lossy(&buf[..n]))?.seen_peer)
}

/// A UDP socket in the client's namespace, any port, answers awaited 2 seconds.
fn udp_socket(topo: &Topology) -> Result<std::net::UdpSocket> {
    topo.client.enter(|| -> Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(socket)
    })?
}

#[test]
fn a_nat_gateway_takes_private_hosts_out_through_one_address() {
    let options = Options {
        layout: Layout::Flat,
        ..Options::default()
    };
    with_topology(PREFIX, options, |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        // The outside answers pings only from the public address: without the gateway, the
        // client's own pings (routed by the kernel, untranslated) go unanswered.
        xlb_tests::cmd::require_tool("nft", "nftables")?;
        for b in &topo.backends {
            for rule in [
                "add table ip xlbgw".to_string(),
                "add chain ip xlbgw input { type filter hook input priority 0 ; }".into(),
                format!(
                    "add rule ip xlbgw input ip saddr != {FLAT_LB_ADDR} icmp type echo-request \
                     drop"
                ),
            ] {
                b.ns.exec("nft", &[&rule])?;
            }
        }
        ensure!(
            ping_backends(topo).is_err(),
            "a backend answered the client's own ping"
        );
        // And the kernel alone forwards untranslated: the servers see the client.
        let peers = tcp_peers(topo, 2)?;
        ensure!(
            peers
                .iter()
                .all(|p| p.ip() == std::net::IpAddr::from(CLIENT_ADDR)),
            "without xlb the servers saw {peers:?}"
        );

        let xlb = XlbProcess::start(&topo.lb, &gateway_config(topo))?;
        let before = snapshot(topo)?;
        let in_range = |p: &SocketAddr| {
            p.ip() == std::net::IpAddr::from(FLAT_LB_ADDR)
                && (GATEWAY_PORTS.0..=GATEWAY_PORTS.1).contains(&p.port())
        };
        let peers = tcp_peers(topo, 40)?;
        ensure!(
            peers.iter().all(in_range),
            "through the gateway the servers saw {:?}",
            peers.iter().filter(|p| !in_range(p)).collect::<Vec<_>>()
        );
        ping_backends(topo).context("pings through the gateway")?;
        // The host's own address is the kernel's, not translated (ping it: it answers).
        topology::ping(&topo.client, FLAT_LB_ADDR).context("ping the gateway host")?;

        // UDP: each socket keeps one public endpoint toward every server; two sockets have
        // two.
        let targets: Vec<SocketAddr> = topo.backends.iter().map(|b| b.service_addr()).collect();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let socket = udp_socket(topo)?;
            let mut by_socket = Vec::new();
            for _round in 0..2 {
                for t in &targets {
                    by_socket.push(seen_as(&socket, *t)?);
                }
            }
            seen.push(by_socket);
        }
        for s in &seen {
            ensure!(
                s.iter().all(|p| p == &s[0]) && in_range(&s[0]),
                "one socket was seen as {s:?}: not one public endpoint in range"
            );
        }
        ensure!(
            seen[0][0] != seen[1][0],
            "two sockets share the public endpoint {}",
            seen[0][0]
        );
        no_checksum_errors(topo, &before)?;
        let stats = xlb.json(&["stats"])?;
        // The gateway's own counters: 40 TCP connections to each of 3 servers, 2 UDP sockets
        // to 3 servers, a ping to each (one identifier each).
        let gateway = &stats["gateways"][0];
        ensure!(
            gateway["source"] == "10.10.1.0/24" && gateway["flows"] == 3 * 40 + 2 * 3 + 3,
            "the gateway's stats: {gateway}"
        );
        let status = xlb.json(&["status"])?;
        ensure!(status["gateways"] == 1, "status: {status}");
        for reason in [
            "drop/internal",
            "drop/conntrack_insert",
            "pass/icmp_untracked",
        ] {
            ensure!(
                stats["reasons"][reason].as_u64().unwrap_or(0) == 0,
                "{reason} counted: {}",
                stats["reasons"]
            );
        }

        // The gateway goes with the config, and comes back.
        let path = std::env::temp_dir().join(format!("{PREFIX}-gw-{}.toml", std::process::id()));
        let apply = |config: &str| -> Result<()> {
            std::fs::write(&path, config)?;
            let out = xlb.command(&["apply", "--config", path.to_str().context("path")?])?;
            ensure!(out.status.success(), "apply: {out:?}");
            Ok(())
        };
        let without = format!("[dataplane]\ninterfaces = {:?}\n", topo.lb_interfaces());
        let applied = apply(&without);
        let after_removal = applied.and_then(|()| tcp_peers(topo, 2));
        let readded = apply(&gateway_config(topo)).and_then(|()| tcp_peers(topo, 2));
        let _ = std::fs::remove_file(&path);
        let after_removal = after_removal?;
        ensure!(
            after_removal
                .iter()
                .all(|p| p.ip() == std::net::IpAddr::from(CLIENT_ADDR)),
            "after the gateway's removal the servers saw {after_removal:?}"
        );
        let readded = readded?;
        ensure!(
            readded.iter().all(in_range),
            "after the gateway came back the servers saw {readded:?}"
        );
        Ok(())
    });
}

/// The gateway's UDP mappings and ids live in the pinned maps: a private endpoint keeps its
/// public endpoint while the daemon is dead (the data plane runs on) and after a new daemon
/// adopts the data plane, which keeps the gateway's id (its counters).
#[test]
fn a_nat_gateways_mappings_outlive_its_daemon() {
    let options = Options {
        layout: Layout::Flat,
        ..Options::default()
    };
    with_topology(PREFIX, options, |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        let config = gateway_config(topo);
        let xlb = XlbProcess::start(&topo.lb, &config)?;
        let id = xlb.json(&["stats"])?["gateways"][0]["id"].clone();
        let socket = udp_socket(topo)?;
        let servers: Vec<SocketAddr> = topo.backends.iter().map(|b| b.service_addr()).collect();
        let public = seen_as(&socket, servers[0])?;
        ensure!(
            public.ip() == std::net::IpAddr::from(FLAT_LB_ADDR),
            "seen as {public}"
        );
        let mut pins = xlb.kill_leaving_pins();
        let while_dead = seen_as(&socket, servers[1]).context("with the daemon dead")?;
        ensure!(
            while_dead == public,
            "with the daemon dead, seen as {while_dead}, not {public}"
        );
        let xlb = XlbProcess::start_on_pins(&topo.lb, &config, &mut pins)?;
        xlb.said_at_start("adopted the data plane", "it adopted the data plane")?;
        let after = seen_as(&socket, servers[2]).context("after the restart")?;
        ensure!(
            after == public,
            "after the restart, seen as {after}, not {public}"
        );
        let stats = xlb.json(&["stats"])?;
        ensure!(
            stats["gateways"][0]["id"] == id,
            "the gateway's id was {id}, is {}",
            stats["gateways"][0]["id"]
        );
        let peers = tcp_peers(topo, 2)?;
        ensure!(
            peers
                .iter()
                .all(|p| p.ip() == std::net::IpAddr::from(FLAT_LB_ADDR)),
            "after the restart the servers saw {peers:?}"
        );
        xlb.stop()?;
        Ok(())
    });
}

#[test]
fn a_ping_to_a_vip_is_answered_by_the_data_plane() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        // No host has the VIP: without xlb nobody answers.
        ensure!(
            topology::ping(&topo.client, VIP).is_err(),
            "the VIP answered a ping before xlb ran"
        );
        let backends: Vec<SocketAddr> = topo.backends.iter().map(|b| b.service_addr()).collect();
        let _xlb = XlbProcess::start(&topo.lb, &config("fullnat", &backends))?;
        let before = snapshot(topo)?;
        let out = topo.client.exec(
            "ping",
            &[
                "-c",
                "5",
                "-i",
                "0.2",
                "-W",
                "2",
                "-s",
                "1000",
                &VIP.to_string(),
            ],
        )?;
        ensure!(
            out.stdout.contains("5 received"),
            "ping VIP: {}",
            out.stdout
        );
        // Not an address of another service's port: an address no service has stays silent.
        ensure!(
            topology::ping(&topo.client, std::net::Ipv4Addr::new(10, 10, 0, 99)).is_err(),
            "an address of no service answered"
        );
        no_checksum_errors(topo, &before)
    });
}

#[test]
fn path_mtu_discovery_works_through_fullnat() {
    path_mtu_discovery(Family::V4, "fullnat", Bottleneck::Router);
}

#[test]
fn path_mtu_discovery_works_through_dnat() {
    path_mtu_discovery(Family::V4, "dnat", Bottleneck::Router);
}

/// xlb's own link toward the client is the narrow one: xlb must say so itself.
#[test]
fn path_mtu_discovery_works_when_xlb_is_the_bottleneck() {
    path_mtu_discovery(Family::V4, "fullnat", Bottleneck::Xlb);
    path_mtu_discovery(Family::V4, "dnat", Bottleneck::Xlb);
}

#[test]
fn path_mtu_discovery_works_over_ipv6_through_fullnat_and_dnat() {
    path_mtu_discovery(Family::V6, "fullnat", Bottleneck::Router);
    path_mtu_discovery(Family::V6, "dnat", Bottleneck::Router);
}

#[test]
fn path_mtu_discovery_works_over_ipv6_when_xlb_is_the_bottleneck() {
    path_mtu_discovery(Family::V6, "fullnat", Bottleneck::Xlb);
    path_mtu_discovery(Family::V6, "dnat", Bottleneck::Xlb);
}

/// Which IP family a test's service and traffic are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

/// Where the 1280-byte link is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bottleneck {
    /// Between a router and the client: the router's error reaches xlb, addressed to the
    /// VIP, and xlb translates it.
    Router,
    /// xlb's own interface toward the client: xlb answers the backend itself.
    Xlb,
}

fn path_mtu_discovery(family: Family, mode: &str, bottleneck: Bottleneck) {
    let options = match bottleneck {
        Bottleneck::Router => Options {
            router_mtu: Some(ROUTER_MTU),
            ..Options::default()
        },
        Bottleneck::Xlb => Options {
            lb_client_mtu: Some(ROUTER_MTU),
            ..Options::default()
        },
    };
    with_topology(PREFIX, options, |topo| {
        topo.check_connectivity()?;
        let b1 = &topo.backends[0];
        let (any, backend, vip, heard) = match family {
            Family::V4 => (
                IpAddr::from([0u8; 4]),
                b1.service_addr(),
                topology::vip_tcp(),
                "IcmpInDestUnreachs",
            ),
            Family::V6 => (
                IpAddr::from([0u16; 8]),
                b1.service_addr6(),
                topology::vip6_tcp(),
                "Icmp6InPktTooBigs",
            ),
        };
        let server = DownloadServer::start(&b1.ns, (any, BACKEND_PORT).into(), DOWNLOAD_BYTES)?;
        let xlb = XlbProcess::start(&topo.lb, &config_of(family, mode, &[backend]))?;
        let before = snapshot(topo)?;
        let icmp_before = Counters::read(&b1.ns)?;

        let received = topo.client.enter(|| download(vip))??;
        ensure!(
            received == DOWNLOAD_BYTES,
            "{family:?} {mode}: downloaded {received} of {DOWNLOAD_BYTES} bytes"
        );
        drop(server);
        // The backend heard of the smaller MTU: from xlb, as only xlb can have sent it.
        let unreachables = Counters::read(&b1.ns)?.delta(&icmp_before, heard)?;
        ensure!(
            unreachables > 0,
            "{family:?} {mode}: the download finished, but the backend got no {heard}: did \
             the MSS hide the bottleneck?"
        );
        let stats = xlb.json(&["stats"])?;
        let untracked = stats["reasons"]["pass/icmp_untracked"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            untracked == 0,
            "{family:?} {mode}: {untracked} ICMP errors were not matched to the flow"
        );
        let answered = stats["reasons"]["forward/icmp_too_big"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            (answered > 0) == (bottleneck == Bottleneck::Xlb),
            "{family:?} {mode}: xlb answered {answered} packets as too big"
        );
        no_checksum_errors(topo, &before)
    });
}

#[test]
fn a_snat_pool_holds_more_flows_than_one_address_has_ports() {
    const PORTS: usize = 100;
    const FLOWS: usize = 150;
    let pool = [SNAT, std::net::Ipv4Addr::new(10, 20, 0, 2)];
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let b1 = &topo.backends[0];
        let _server = EchoServer::start(&b1.ns, b1.service_addr())?;
        let config = format!(
            "[dataplane]\ninterfaces = {LB_INTERFACES:?}\nsnat_port_range = [40000, {}]\n\n\
             [[service]]\nvip = \"{}\"\nprotocol = \"tcp\"\nsnat = [\"{}\", \"{}\"]\n\
             [[service.backend]]\naddress = \"{}\"\n",
            40000 + PORTS - 1,
            topology::vip_tcp(),
            pool[0],
            pool[1],
            b1.service_addr()
        );
        let _xlb = XlbProcess::start(&topo.lb, &config)?;
        let before = snapshot(topo)?;
        raise_fd_limit(4 * FLOWS as u64)?;
        let mut conns = Vec::new();
        for i in 0..FLOWS {
            let mut c =
                EchoConn::connect(&topo.client, topology::vip_tcp(), Duration::from_secs(3))
                    .with_context(|| format!("connection {i} of {FLOWS}"))?;
            c.echo("pool")?;
            conns.push(c);
        }
        // The backend's own view of who is connected.
        let out = b1.ns.exec(
            "ss",
            &["-Htn", "state", "established", "sport", "=", ":8080"],
        )?;
        let peers: Vec<std::net::SocketAddrV4> = out
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().filter_map(|w| w.parse().ok()).nth(1))
            .collect();
        let from = |a| peers.iter().filter(|p| *p.ip() == a).count();
        let (first, second) = (from(pool[0]), from(pool[1]));
        ensure!(
            peers.len() == FLOWS && first + second == FLOWS,
            "the backend holds {} connections, {first} from {} and {second} from {}; \
             expected {FLOWS} from the pool",
            peers.len(),
            pool[0],
            pool[1]
        );
        ensure!(
            first <= PORTS && second <= PORTS,
            "{first} and {second} flows on {PORTS} ports per address"
        );
        for c in &mut conns {
            c.echo("still")?;
        }
        no_checksum_errors(topo, &before)
    });
}

/// Downloads from `target` until the server closes; returns the bytes received.
fn download(target: SocketAddr) -> Result<usize> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        if started.elapsed() > DOWNLOAD_TIMEOUT {
            bail!("{total} bytes after {DOWNLOAD_TIMEOUT:?}: the download stalled");
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => bail!("after {total} bytes: {e} (a path MTU black hole stalls here)"),
        }
    }
}

/// A TCP server on a backend's port that sends `bytes` bytes to each connection, then closes.
struct DownloadServer {
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl DownloadServer {
    fn start(ns: &NetNs, addr: SocketAddr, bytes: usize) -> Result<DownloadServer> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", ns.name()))?;
        // Not blocking, so a test that fails before it connects does not leave the thread
        // (and the socket, and its namespace) waiting for good: it gives up in time.
        listener.set_nonblocking(true)?;
        let thread = std::thread::spawn(move || -> Result<()> {
            let until = Instant::now() + DOWNLOAD_TIMEOUT;
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ensure!(
                            Instant::now() < until,
                            "no connection within {DOWNLOAD_TIMEOUT:?}"
                        );
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_write_timeout(Some(DOWNLOAD_TIMEOUT))?;
            let chunk = vec![0x5a; 64 << 10];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                conn.write_all(&chunk[..n])?;
                left -= n;
            }
            Ok(())
        });
        Ok(DownloadServer {
            thread: Some(thread),
        })
    }
}

impl Drop for DownloadServer {
    fn drop(&mut self) {
        // The thread ends once its one connection is served, or once it gave up waiting
        // for it; a test that failed before connecting does not wait for that.
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}
