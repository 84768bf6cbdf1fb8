//! End to end over IPv6: real xlb, real kernels, real sockets, in the dual-stack
//! [`Topology`].
//!
//! * An IPv6 `fullnat` VIP balances TCP and UDP over the three backends' IPv6 addresses by
//!   weight; the backends see the IPv6 SNAT address, the client sees the VIP.
//! * An IPv4 and an IPv6 VIP on the same port share the same three backend hosts, each
//!   service with its own family's addresses of them; both serve and both count.
//! * An IPv6 `dnat` VIP: the backends see the client's own IPv6 address and port, and answer
//!   through xlb (their default route), which gives them the VIP back as source.
//! * A ping to the IPv6 VIP, an address no host has, is answered by the data plane.
//! * An IPv6 NAT gateway: the client's network reaches the servers over TCP, UDP (one
//!   public endpoint per socket toward all) and ping, seen only as the public address.
//!
//! Each test first checks that without xlb the client cannot reach the VIP (no host has it,
//! the load balancer has no route to it), so only xlb's translation can make it pass. Every
//! host's checksum error counters (TCP, UDP/IPv6, ICMPv6, ...) stay at zero throughout.
//!
//! Needs root, the `xlb` binary (`$XLB_BIN`), and `ip`, `ethtool`, `nstat`, `ping`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_common::reason::Reason;
use serde_json::Value;
use xlb_tests::client::{self, TcpReply, UdpReply};
use xlb_tests::nstat::Snapshot;
use xlb_tests::servers::BackendServers;
use xlb_tests::topology::{
    self, BACKEND_NAMES, CLIENT_ADDR6, LB_INTERFACES, Options, SNAT, SNAT6, Topology, VIP6,
    with_topology,
};
use xlb_tests::xlb::XlbProcess;

/// Namespace name prefix of this file's tests: `xlb6-<pid>-<n>-<role>`.
const PREFIX: &str = "xlb6";
/// The weights of b1, b2, b3 in the weighted test.
const WEIGHTS: [u32; 3] = [1, 2, 3];
const TCP_CONNECTIONS: usize = 300;
/// Parallel TCP clients, as in the IPv4 end-to-end test.
const TCP_CONCURRENCY: usize = 8;
const UDP_REQUESTS: usize = 150;
/// Per-datagram reply timeout. veth does not lose packets, so a missing reply is a bug.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);

/// One `[[service]]` of a config: `vip` over `backends` (address, weight), in `mode`, with
/// `snat` for `fullnat`.
fn service(
    vip: SocketAddr,
    protocol: &str,
    mode: &str,
    snat: Option<IpAddr>,
    backends: &[(SocketAddr, u32)],
) -> String {
    let mut s =
        format!("\n[[service]]\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\nmode = \"{mode}\"\n");
    if let Some(snat) = snat {
        s += &format!("snat = \"{snat}\"\n");
    }
    for (address, weight) in backends {
        s += &format!("[[service.backend]]\naddress = \"{address}\"\nweight = {weight}\n");
    }
    s
}

/// A config over the routed layout's four interfaces with `services`.
fn config(services: &[String]) -> String {
    format!(
        "[dataplane]\ninterfaces = {LB_INTERFACES:?}\n\n[conntrack]\nentries = 32768\n{}",
        services.concat()
    )
}

/// The three backends' IPv6 service addresses, with `weights`.
fn backends6(topo: &Topology, weights: [u32; 3]) -> Vec<(SocketAddr, u32)> {
    topo.backends
        .iter()
        .zip(weights)
        .map(|(b, w)| (b.service_addr6(), w))
        .collect()
}

/// Fails unless neither `tcp` (a connection) nor `udp` (a datagram's answer) reaches its
/// VIP from the client: what holds before xlb runs, as no host has the VIPs.
fn unreachable_without_xlb(topo: &Topology, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<()> {
    for &vip in tcp {
        let attempt = topo
            .client
            .enter(|| TcpStream::connect_timeout(&vip, Duration::from_secs(1)))?;
        ensure!(
            attempt.is_err(),
            "the client connected to {vip} before xlb ran"
        );
    }
    for &vip in udp {
        let attempt = topo
            .client
            .enter(|| client::udp_request(vip, Duration::from_millis(500)))?;
        ensure!(
            attempt.is_err(),
            "the client got a UDP answer from {vip} before xlb ran"
        );
    }
    Ok(())
}

/// Counts per backend name, every backend listed (0 if it served nothing).
fn count_by_server<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> =
        BACKEND_NAMES.iter().map(|n| (n.to_string(), 0)).collect();
    for n in names {
        *counts.entry(n.to_string()).or_default() += 1;
    }
    counts
}

/// Checks that `n` independent flows spread over b1..b3 in proportion to `weights`, as the
/// IPv4 end-to-end test does: each flow lands on backend `i` with probability
/// `p_i = w_i / Σw`, so its count is Binomial(n, p_i), and 4.5 σ is allowed (a correct
/// balancer fails with probability < 1e-4 overall). For n = 300 and weights 1/2/3 that is
/// 50 ± 29, 100 ± 37, 150 ± 39: one that ignored the weights (100 each) is caught on b1 and
/// b3.
fn check_distribution(
    what: &str,
    per_backend: &BTreeMap<String, usize>,
    weights: [u32; 3],
) -> Result<()> {
    const SIGMAS: f64 = 4.5;
    let n = per_backend.values().sum::<usize>() as f64;
    let total: u32 = weights.iter().sum();
    for (name, weight) in BACKEND_NAMES.iter().zip(weights) {
        let p = f64::from(weight) / f64::from(total);
        let expected = n * p;
        let tolerance = (SIGMAS * (n * p * (1.0 - p)).sqrt()).ceil();
        let got = per_backend.get(*name).copied().unwrap_or(0) as f64;
        ensure!(
            (got - expected).abs() <= tolerance,
            "{what}: backend {name} (weight {weight}) served {got} of {n}, expected \
             {expected} ± {tolerance} ({SIGMAS} σ); all: {per_backend:?}"
        );
    }
    Ok(())
}

/// The service `vip`/`protocol` in `xlb stats -o json`.
fn stats_service<'a>(stats: &'a Value, vip: SocketAddr, protocol: &str) -> Result<&'a Value> {
    stats["services"]
        .as_array()
        .context("stats: no services list")?
        .iter()
        .find(|s| {
            s["protocol"] == protocol && s["vip"].as_str().and_then(|v| v.parse().ok()) == Some(vip)
        })
        .with_context(|| format!("xlb stats shows no service {vip}/{protocol}: {stats}"))
}

/// The flows counter of `service`'s backend `address` in `xlb stats -o json`.
fn backend_flows(service: &Value, address: SocketAddr) -> Result<u64> {
    service["backends"]
        .as_array()
        .context("stats: a service without its backends list")?
        .iter()
        .find(|b| b["address"].as_str().and_then(|a| a.parse().ok()) == Some(address))
        .and_then(|b| b["flows"].as_u64())
        .with_context(|| format!("xlb stats shows no backend {address}: {service}"))
}

/// Fails if xlb counted any drop.
fn no_drops(stats: &Value) -> Result<()> {
    let drops: Vec<(&String, &Value)> = stats["reasons"]
        .as_object()
        .context("stats: no reasons")?
        .iter()
        .filter(|(name, n)| name.starts_with("drop/") && n.as_u64() != Some(0))
        .collect();
    ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
    Ok(())
}

/// Checks TCP replies through a `fullnat` service at `vip` (see `client::check_fullnat`).
fn check_tcp_fullnat(replies: &[TcpReply], vip: SocketAddr, snat: IpAddr) -> Result<()> {
    for r in replies {
        client::check_fullnat(r.local, r.peer, &r.answer, vip, snat)?;
    }
    Ok(())
}

/// Checks UDP replies through a `fullnat` service at `vip`, as [`check_tcp_fullnat`].
fn check_udp_fullnat(replies: &[UdpReply], vip: SocketAddr, snat: IpAddr) -> Result<()> {
    for r in replies {
        client::check_fullnat(r.local, r.from, &r.answer, vip, snat)?;
    }
    Ok(())
}

/// UDP flows per backend: distinct client ports each backend answered. (Fresh sockets get
/// random ports, which can repeat; a repeated port is the same flow again.)
fn udp_flows_by_server(replies: &[UdpReply]) -> BTreeMap<String, usize> {
    let mut ports: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    for r in replies {
        ports
            .entry(r.answer.server.as_str())
            .or_default()
            .insert(r.local.port());
    }
    let mut flows = count_by_server(std::iter::empty());
    for (name, p) in ports {
        flows.insert(name.to_string(), p.len());
    }
    flows
}

#[test]
fn an_ipv6_vip_balances_tcp_and_udp_by_weight() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = BackendServers::start(topo).context("starting the backend servers")?;
        let (vip_tcp, vip_udp) = (topology::vip6_tcp(), topology::vip6_udp());
        unreachable_without_xlb(topo, &[vip_tcp], &[vip_udp])?;

        let backends = backends6(topo, WEIGHTS);
        let snat = Some(IpAddr::V6(SNAT6));
        let config = config(&[
            service(vip_tcp, "tcp", "fullnat", snat, &backends),
            service(vip_udp, "udp", "fullnat", snat, &backends),
        ]);
        let before = Snapshot::take(&topo.namespaces())?;
        // The load balancer forgets every neighbour, the client too: the first replies
        // toward it meet an unresolved one and go by the tc program (xlb keeps only the
        // backends resolved, with managed entries).
        topo.lb.ip(&["-6", "neigh", "flush", "all"])?;
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;

        // TCP: every connection answered, from the VIP, by a backend that saw the SNAT
        // address; spread by weight.
        let results =
            client::tcp_requests(&topo.client, vip_tcp, TCP_CONNECTIONS, TCP_CONCURRENCY)?;
        let tcp = client::all_ok("TCP connections to the IPv6 VIP", results)?;
        check_tcp_fullnat(&tcp, vip_tcp, SNAT6.into())?;
        let tcp_per_backend = count_by_server(tcp.iter().map(|r| r.answer.server.as_str()));
        eprintln!("TCP connections per backend: {tcp_per_backend:?}");
        for b in BACKEND_NAMES {
            let served = servers.stats(b).map_or(0, |s| s.tcp_connections);
            let answered = tcp_per_backend[b] as u64;
            ensure!(
                served == answered,
                "backend {b}: server accepted {served} connections, clients got {answered} \
                 answers"
            );
        }
        check_distribution("TCP", &tcp_per_backend, WEIGHTS)?;

        // UDP: each datagram from a fresh socket, a new flow.
        let results = client::udp_requests(&topo.client, vip_udp, UDP_REQUESTS, UDP_TIMEOUT)?;
        let udp = client::all_ok("UDP requests to the IPv6 VIP", results)?;
        check_udp_fullnat(&udp, vip_udp, SNAT6.into())?;
        let answered = servers.total_udp_datagrams();
        ensure!(
            answered == UDP_REQUESTS as u64,
            "backends answered {answered} datagrams, the client sent {UDP_REQUESTS}"
        );
        let udp_flows = udp_flows_by_server(&udp);
        eprintln!("UDP flows per backend: {udp_flows:?}");
        check_distribution("UDP", &udp_flows, WEIGHTS)?;

        let peers = servers.all_peer_ips();
        ensure!(
            peers == BTreeSet::from([IpAddr::V6(SNAT6)]),
            "backends saw source addresses {peers:?}, expected only the SNAT address {SNAT6}"
        );
        before.no_checksum_errors_since(&topo.namespaces())?;

        // xlb's own view: both IPv6 services, their backends' flows as the clients saw them.
        let stats = xlb.json(&["stats"])?;
        let tcp_service = stats_service(&stats, vip_tcp, "tcp")?;
        ensure!(
            tcp_service["flows"].as_u64() == Some(TCP_CONNECTIONS as u64),
            "{vip_tcp}/tcp: xlb counted {} flows, expected {TCP_CONNECTIONS}",
            tcp_service["flows"]
        );
        let udp_service = stats_service(&stats, vip_udp, "udp")?;
        for (b, (address, _)) in topo.backends.iter().zip(&backends) {
            let flows = backend_flows(tcp_service, *address)?;
            ensure!(
                flows == tcp_per_backend[&b.name] as u64,
                "{vip_tcp}/tcp backend {address}: xlb counted {flows} flows, {} accepted {}",
                b.name,
                tcp_per_backend[&b.name]
            );
            let flows = backend_flows(udp_service, *address)?;
            ensure!(
                flows == udp_flows[&b.name] as u64,
                "{vip_udp}/udp backend {address}: xlb counted {flows} flows, the client saw \
                 {} flows answered by {}",
                udp_flows[&b.name],
                b.name
            );
        }
        no_drops(&stats)?;
        let resolved = stats["reasons"][Reason::ForwardResolveNeighbour.name()]
            .as_u64()
            .unwrap_or(0);
        let sent = stats["handoffs"]["sent"].as_u64().unwrap_or(0);
        ensure!(
            resolved > 0 && sent >= resolved,
            "{resolved} packets met an unresolved neighbour, the tc program sent {sent}: {}",
            stats["handoffs"]
        );
        xlb.stop().context("stopping xlb")?;
        Ok(())
    });
}

#[test]
fn a_dual_stack_service_pair_shares_its_backends() {
    const CONNECTIONS: usize = 60;
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = BackendServers::start(topo).context("starting the backend servers")?;
        let (vip4, vip6) = (topology::vip_tcp(), topology::vip6_tcp());
        unreachable_without_xlb(topo, &[vip4, vip6], &[])?;

        let backends4: Vec<(SocketAddr, u32)> = topo
            .backends
            .iter()
            .map(|b| (b.service_addr(), 1))
            .collect();
        let backends6 = backends6(topo, [1, 1, 1]);
        let config = config(&[
            service(vip4, "tcp", "fullnat", Some(SNAT.into()), &backends4),
            service(vip6, "tcp", "fullnat", Some(SNAT6.into()), &backends6),
        ]);
        let before = Snapshot::take(&topo.namespaces())?;
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;

        // Both families at the same time.
        let (replies4, replies6) = std::thread::scope(|s| {
            let v4 = s.spawn(|| client::tcp_requests(&topo.client, vip4, CONNECTIONS, 4));
            let v6 = s.spawn(|| client::tcp_requests(&topo.client, vip6, CONNECTIONS, 4));
            (v4.join(), v6.join())
        });
        let replies4 = replies4.map_err(|_| anyhow::anyhow!("the IPv4 clients panicked"))??;
        let replies6 = replies6.map_err(|_| anyhow::anyhow!("the IPv6 clients panicked"))??;
        let tcp4 = client::all_ok("TCP to the IPv4 VIP", replies4)?;
        let tcp6 = client::all_ok("TCP to the IPv6 VIP", replies6)?;
        check_tcp_fullnat(&tcp4, vip4, SNAT.into())?;
        check_tcp_fullnat(&tcp6, vip6, SNAT6.into())?;

        // Every backend host served both families (with equal weights and 60 connections
        // each, a backend missing out has a chance of (2/3)^60 ≈ 3e-11).
        let per4 = count_by_server(tcp4.iter().map(|r| r.answer.server.as_str()));
        let per6 = count_by_server(tcp6.iter().map(|r| r.answer.server.as_str()));
        eprintln!("per backend: IPv4 {per4:?}, IPv6 {per6:?}");
        for b in BACKEND_NAMES {
            ensure!(
                per4[b] > 0 && per6[b] > 0,
                "backend {b} served {} IPv4 and {} IPv6 connections",
                per4[b],
                per6[b]
            );
            let served = servers.stats(b).map_or(0, |s| s.tcp_connections);
            ensure!(
                served == (per4[b] + per6[b]) as u64,
                "backend {b}: server accepted {served} connections, clients got {} + {} \
                 answers",
                per4[b],
                per6[b]
            );
        }
        let peers = servers.all_peer_ips();
        ensure!(
            peers == BTreeSet::from([IpAddr::V4(SNAT), IpAddr::V6(SNAT6)]),
            "backends saw source addresses {peers:?}, expected the SNAT addresses {SNAT} and \
             {SNAT6}"
        );
        before.no_checksum_errors_since(&topo.namespaces())?;

        // Both services count their own flows, per backend.
        let stats = xlb.json(&["stats"])?;
        for (vip, backends, per) in [(vip4, &backends4, &per4), (vip6, &backends6, &per6)] {
            let service = stats_service(&stats, vip, "tcp")?;
            ensure!(
                service["flows"].as_u64() == Some(CONNECTIONS as u64),
                "{vip}/tcp: xlb counted {} flows, expected {CONNECTIONS}",
                service["flows"]
            );
            for (name, (address, _)) in BACKEND_NAMES.iter().zip(backends) {
                let flows = backend_flows(service, *address)?;
                ensure!(
                    flows == per[*name] as u64,
                    "{vip}/tcp backend {address}: xlb counted {flows} flows, {name} served {}",
                    per[*name]
                );
            }
        }
        no_drops(&stats)?;
        xlb.stop().context("stopping xlb")?;
        Ok(())
    });
}

#[test]
fn an_ipv6_dnat_service_shows_the_client_its_address() {
    const CONNECTIONS: usize = 60;
    const DATAGRAMS: usize = 30;
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = BackendServers::start(topo).context("starting the backend servers")?;
        let (vip_tcp, vip_udp) = (topology::vip6_tcp(), topology::vip6_udp());
        unreachable_without_xlb(topo, &[vip_tcp], &[vip_udp])?;

        let backends = backends6(topo, [1, 1, 1]);
        let config = config(&[
            service(vip_tcp, "tcp", "dnat", None, &backends),
            service(vip_udp, "udp", "dnat", None, &backends),
        ]);
        let before = Snapshot::take(&topo.namespaces())?;
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;

        let tcp = client::tcp_requests(&topo.client, vip_tcp, CONNECTIONS, 4)?;
        let tcp = client::all_ok("TCP through the IPv6 dnat service", tcp)?;
        for r in &tcp {
            client::check_dnat(
                r.local,
                r.peer,
                &r.answer,
                vip_tcp,
                IpAddr::V6(CLIENT_ADDR6),
            )?;
        }
        let udp = client::udp_requests(&topo.client, vip_udp, DATAGRAMS, UDP_TIMEOUT)?;
        let udp = client::all_ok("UDP through the IPv6 dnat service", udp)?;
        for r in &udp {
            // (The socket is bound to [::]: its address is the client's.)
            client::check_dnat(
                r.local,
                r.from,
                &r.answer,
                vip_udp,
                IpAddr::V6(CLIENT_ADDR6),
            )?;
        }
        for b in BACKEND_NAMES {
            let served = servers.stats(b).map_or(0, |s| s.tcp_connections);
            ensure!(served > 0, "backend {b} got no connection of {CONNECTIONS}");
        }
        let peers = servers.all_peer_ips();
        ensure!(
            peers == BTreeSet::from([IpAddr::V6(CLIENT_ADDR6)]),
            "backends saw {peers:?}, not just the client {CLIENT_ADDR6}"
        );
        before.no_checksum_errors_since(&topo.namespaces())?;

        let stats = xlb.json(&["stats"])?;
        for (vip, protocol, n) in [(vip_tcp, "tcp", CONNECTIONS), (vip_udp, "udp", 1)] {
            let service = stats_service(&stats, vip, protocol)?;
            ensure!(
                service["mode"] == "dnat" && service["flows"].as_u64() >= Some(n as u64),
                "{vip}/{protocol}: {service}"
            );
        }
        no_drops(&stats)?;
        xlb.stop().context("stopping xlb")?;
        Ok(())
    });
}

/// The forward/* counters of `xlb stats -o json`, summed: packets the data plane sent on
/// itself.
fn forwarded(stats: &Value) -> Result<u64> {
    Ok(stats["reasons"]
        .as_object()
        .context("stats: no reasons")?
        .iter()
        .filter(|(name, _)| name.starts_with("forward/"))
        .filter_map(|(_, n)| n.as_u64())
        .sum())
}

#[test]
fn a_ping_to_an_ipv6_vip_is_answered() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        // No host has the VIP, so without xlb nobody answers, and with it only xlb can.
        for ns in topo.namespaces() {
            let addrs = ns.ip(&["-6", "addr", "show"])?;
            ensure!(
                !addrs.stdout.contains(&VIP6.to_string()),
                "{} has the VIP {VIP6}:\n{}",
                ns.name(),
                addrs.stdout
            );
        }
        ensure!(
            topology::ping(&topo.client, VIP6).is_err(),
            "the IPv6 VIP answered a ping before xlb ran"
        );

        let backends = backends6(topo, [1, 1, 1]);
        let config = config(&[service(
            topology::vip6_tcp(),
            "tcp",
            "fullnat",
            Some(SNAT6.into()),
            &backends,
        )]);
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;
        let before = Snapshot::take(&topo.namespaces())?;
        let sent_before = forwarded(&xlb.json(&["stats"])?)?;
        let out = topo.client.exec(
            "ping",
            &[
                "-6",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                "-s",
                "1000",
                &VIP6.to_string(),
            ],
        )?;
        ensure!(
            out.stdout.contains("3 received") && out.stdout.contains(&format!("from {VIP6}")),
            "ping -6 {VIP6}: {}",
            out.stdout
        );
        // The three replies were sent by the data plane itself (the load balancer's kernel
        // has no such address to answer from).
        let stats = xlb.json(&["stats"])?;
        let sent = forwarded(&stats)? - sent_before;
        ensure!(
            sent >= 3,
            "xlb sent {sent} packets on itself for 3 echo requests answered: {}",
            stats["reasons"]
        );
        no_drops(&stats)?;
        // An address of no service stays silent.
        let other = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x99);
        ensure!(
            topology::ping(&topo.client, other).is_err(),
            "{other}, an address of no service, answered"
        );
        before.no_checksum_errors_since(&topo.namespaces())?;
        xlb.stop().context("stopping xlb")?;
        Ok(())
    });
}

/// What the servers saw of `n` TCP connections from the client to each backend's IPv6
/// address.
fn tcp_peers6(topo: &Topology, n: usize) -> Result<Vec<SocketAddr>> {
    let mut peers = Vec::new();
    for b in &topo.backends {
        let replies = client::tcp_requests(&topo.client, b.service_addr6(), n, 4)?;
        let replies = client::all_ok(&format!("TCP to {}", b.service_addr6()), replies)?;
        peers.extend(replies.iter().map(|r| r.answer.seen_peer));
    }
    Ok(peers)
}

/// An IPv6 NAT gateway, in the flat layout: the client's IPv6 network goes out as the load
/// balancer's own IPv6 address on the backends' link. The servers answer pings only from
/// that address (an nftables rule), so a ping that was not translated goes unanswered.
#[test]
fn an_ipv6_nat_gateway_takes_private_hosts_out_through_one_address() {
    const PORTS: (u16, u16) = (20000, 20999);
    let options = Options {
        layout: topology::Layout::Flat,
        ..Options::default()
    };
    with_topology(PREFIX, options, |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        let public = IpAddr::V6(topology::FLAT_LB_ADDR6);
        xlb_tests::cmd::require_tool("nft", "nftables")?;
        for b in &topo.backends {
            for rule in [
                "add table ip6 xlbgw6".to_string(),
                "add chain ip6 xlbgw6 input { type filter hook input priority 0 ; }".into(),
                format!(
                    "add rule ip6 xlbgw6 input ip6 saddr != {public} icmpv6 type \
                     echo-request drop"
                ),
            ] {
                b.ns.exec("nft", &[&rule])?;
            }
        }
        let ping_all = || -> Result<()> {
            for b in &topo.backends {
                topology::ping(&topo.client, b.addr6)
                    .with_context(|| format!("ping {}", b.addr6))?;
            }
            Ok(())
        };
        ensure!(
            ping_all().is_err(),
            "a backend answered the client's own ping"
        );
        // Without xlb the kernel forwards untranslated: the servers see the client.
        let peers = tcp_peers6(topo, 2)?;
        ensure!(
            peers.iter().all(|p| p.ip() == IpAddr::V6(CLIENT_ADDR6)),
            "without xlb the servers saw {peers:?}"
        );

        let config = format!(
            "[dataplane]\ninterfaces = {:?}\n\n[[nat_gateway]]\nsource = \"2001:db8:10:1::/64\"\n\
             to = \"{public}\"\nports = [{}, {}]\n",
            topo.lb_interfaces(),
            PORTS.0,
            PORTS.1
        );
        let xlb = XlbProcess::start(&topo.lb, &config)?;
        let before = Snapshot::take(&topo.namespaces())?;
        let in_range = |p: &SocketAddr| p.ip() == public && (PORTS.0..=PORTS.1).contains(&p.port());
        let peers = tcp_peers6(topo, 20)?;
        ensure!(
            peers.iter().all(in_range),
            "through the gateway the servers saw {:?}",
            peers.iter().filter(|p| !in_range(p)).collect::<Vec<_>>()
        );
        ping_all().context("pings through the gateway")?;

        // UDP: one socket keeps one public endpoint toward every server.
        let socket = topo.client.enter(|| -> Result<std::net::UdpSocket> {
            let socket = std::net::UdpSocket::bind("[::]:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(socket)
        })??;
        let mut seen = Vec::new();
        for _round in 0..2 {
            for b in &topo.backends {
                let to = b.service_addr6();
                socket.send_to(b"who am i\n", to)?;
                let mut buf = [0u8; 512];
                let (n, from) = socket
                    .recv_from(&mut buf)
                    .with_context(|| format!("no UDP answer from {to}"))?;
                ensure!(from == to, "an answer from {from}, asked {to}");
                seen.push(client::Answer::parse(&String::from_utf8_lossy(&buf[..n]))?.seen_peer);
            }
        }
        ensure!(
            seen.iter().all(|p| *p == seen[0]) && in_range(&seen[0]),
            "one socket was seen as {seen:?}: not one public endpoint in range"
        );
        before.no_checksum_errors_since(&topo.namespaces())?;

        // 20 TCP connections to each of 3 servers, one UDP socket to 3, a ping to each.
        let stats = xlb.json(&["stats"])?;
        let gateway = &stats["gateways"][0];
        ensure!(
            gateway["source"] == "2001:db8:10:1::/64" && gateway["flows"] == 3 * 20 + 3 + 3,
            "the gateway's stats: {gateway}"
        );
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
        Ok(())
    });
}
