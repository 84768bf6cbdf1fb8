//! End to end: real xlb, real kernel, real sockets.
//!
//! Builds the [`Topology`] (client, load balancer, three backends in network namespaces),
//! starts line servers on the backends, runs `xlb` with [`CONFIG_TOML`] in the load
//! balancer namespace, and checks from the client that TCP and UDP to the VIP are balanced
//! by weight, full-NATed (backends see the SNAT address, clients see the VIP), carry correct
//! checksums, leave the load balancer's own traffic alone, and are counted by xlb.
//!
//! Needs root, the `xlb` binary (`cargo build -p lb-userspace`, or `$XLB_BIN`), and
//! `ip`, `ethtool`, `nstat`, `ping`. Run it with `cargo xtask test`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_common::reason::Reason;
use xlb_tests::client::{self, TcpReply, UdpReply};
use xlb_tests::demo_config::{CONFIG_TOML, TCP_BACKENDS, TCP_SERVICE, UDP_SERVICE, expected_share};
use xlb_tests::netns::NetNs;
use xlb_tests::nstat::Snapshot;
use xlb_tests::servers::{BackendServers, LineServer};
use xlb_tests::stats::Stats;
use xlb_tests::topology::{
    self, BACKEND_NAMES, CLIENT_ADDR, LB_CLIENT_ADDR, LB_INTERFACES, Options, SNAT, Topology,
    with_topology,
};
use xlb_tests::xlb::XlbProcess;

/// Namespace name prefix of this test: `xlbt-<pid>-<n>-<role>`.
const PREFIX: &str = "xlbt";
const TCP_CONNECTIONS: usize = 300;
/// Parallel TCP clients: enough to have several flows in flight, few enough to stay far
/// from any backlog or conntrack limit.
const TCP_CONCURRENCY: usize = 8;
const UDP_REQUESTS: usize = 50;
/// Per-datagram reply timeout. veth does not lose packets, so a missing reply is a bug.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// The TCP server the test runs in the load balancer namespace, on its own address.
const LB_LOCAL_PORT: u16 = 9000;

/// `xdp_mode = "auto"`: veth has native XDP, so xlb must say it attached natively.
#[test]
fn xlb_balances_tcp_and_udp_with_full_nat() {
    run_e2e("auto", "native");
}

/// The same in generic (skb) mode, the fallback for drivers without native XDP.
#[test]
fn xlb_balances_tcp_and_udp_in_generic_mode() {
    run_e2e("generic", "generic");
}

fn run_e2e(xdp_mode: &str, expect_mode: &str) {
    with_topology(PREFIX, Options::default(), |topo| {
        scenario(topo, xdp_mode, expect_mode)
    });
}

/// A DNS-like UDP service, where every query is a new flow, must not run out of SNAT ports
/// for good: a flow idle past `udp_timeout` expires and gives its port up. With one backend and a
/// single SNAT port the outcome is deterministic: the first query takes the port, a second
/// one right away finds none (and is dropped, counted), and after the timeout a third one
/// reclaims it.
#[test]
fn idle_udp_flows_give_their_snat_port_up() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo).context("starting the backend servers")?;
        let config = format!(
            "[dataplane]\ninterfaces = {LB_INTERFACES:?}\nsnat_port_range = [40000, 40000]\n\
             [conntrack]\nudp_timeout = 1\n\n[[service]]\nvip = \"{vip}\"\nprotocol = \"udp\"\n\
             snat = \"{SNAT}\"\n[[service.backend]]\naddress = \"{backend}\"\n",
            vip = topology::vip_udp(),
            backend = TCP_BACKENDS[0].address,
        );
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;
        let query = || {
            topo.client
                .enter(|| client::udp_request(topology::vip_udp(), UDP_TIMEOUT))?
        };

        let first = query().context("the first query")?;
        ensure!(
            first.answer.seen_peer.port() == 40000,
            "SNAT port {}",
            first.answer.seen_peer
        );
        ensure!(
            query().is_err(),
            "a second query got an answer while the only SNAT port was held by an active flow"
        );
        // The first flow goes idle. Its timeout is 1 s; the sweeper may remove it up to half
        // a second (the refresh interval) plus one sweep interval (1 s) later.
        std::thread::sleep(Duration::from_millis(3500));
        let third = query().context("a query after the first flow went idle")?;
        ensure!(
            third.answer.seen_peer.port() == 40000,
            "SNAT port {}",
            third.answer.seen_peer
        );

        let stats = Stats::parse(&xlb.stop()?).context("parsing xlb's counters")?;
        ensure!(
            stats.reason(Reason::DropSnatPortsExhausted.name()) == 1,
            "expected exactly one query dropped for want of a SNAT port: {:?}",
            stats.reasons
        );
        Ok(())
    });
}

/// The test proper. Returns an error (instead of panicking) for every failed check, so the
/// caller still gets to verify the cleanup.
fn scenario(topo: &Topology, xdp_mode: &str, expect_mode: &str) -> Result<()> {
    topo.check_connectivity()?;
    // The pings above taught the load balancer its neighbours' MACs. Forget them, so the
    // first packets of the test take the real first-packet path: bpf_fib_lookup finds no
    // neighbour, xlb hands the rewritten packet to the kernel, and the kernel resolves it.
    topo.lb
        .ip(&["neigh", "flush", "all"])
        .context("flushing the load balancer's neighbour table")?;

    let servers = BackendServers::start(topo).context("starting the backend servers")?;
    let lb_local: SocketAddr = (LB_CLIENT_ADDR, LB_LOCAL_PORT).into();
    let lb_server = LineServer::start(&topo.lb, "lb", Some(lb_local), None)
        .context("starting the TCP server on the load balancer's own address")?;

    let before = Snapshot::take(&topo.namespaces())?;

    let config = CONFIG_TOML.replace("xdp_mode = \"auto\"", &format!("xdp_mode = \"{xdp_mode}\""));
    ensure!(
        config.contains(&format!("xdp_mode = \"{xdp_mode}\"")),
        "the demo config has no xdp_mode line to set"
    );
    let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;
    eprintln!("xlb is ready: {}", xlb.ready_line());
    for iface in LB_INTERFACES {
        let said = format!("attached to {iface} ");
        let line = xlb
            .startup_lines()
            .iter()
            .find(|l| l.starts_with(&said))
            .with_context(|| format!("xlb did not say it attached to {iface}"))?;
        ensure!(
            line.ends_with(&format!("in {expect_mode} mode")),
            "xdp_mode {xdp_mode}: expected {expect_mode} mode, xlb said {line:?}"
        );
    }

    let tcp = check_tcp(topo, &servers)?;
    let udp = check_udp(topo, &servers)?;

    // Backends must only ever have seen the SNAT address as source.
    let peers = servers.all_peer_ips();
    ensure!(
        peers == BTreeSet::from([IpAddr::V4(SNAT)]),
        "backends saw source addresses {peers:?}, expected only the SNAT address {SNAT}"
    );

    // An operator starting a second xlb on the same interfaces gets a clear refusal, and
    // the running one is not disturbed (the checks below still pass through it).
    // (Its metrics are off: on the same port it would be refused for that first.)
    let second = XlbProcess::start_quiet(&topo.lb, &format!("{config}\n[api]\nmetrics = \"\"\n"));
    let refusal = format!("{:#}", second.err().context("a second xlb started")?);
    ensure!(
        refusal.contains("already has an XDP program attached"),
        "the second xlb failed, but not saying why: {refusal}"
    );
    check_xdp_attached(&topo.lb, true)?;

    check_lb_local_traffic(topo, lb_local, &lb_server)?;

    before.no_checksum_errors_since(&topo.namespaces())?;

    let output = xlb.stop().context("stopping xlb")?;
    let stats = Stats::parse(&output).context("parsing xlb's counters")?;
    check_xlb_counters(&stats, &servers, &tcp, &udp)?;

    check_xdp_attached(&topo.lb, false)?;
    Ok(())
}

/// 300 TCP connections to VIP:80; checks every answer and the weighted distribution.
fn check_tcp(topo: &Topology, servers: &BackendServers) -> Result<Vec<TcpReply>> {
    let vip = topology::vip_tcp();
    let results = client::tcp_requests(&topo.client, vip, TCP_CONNECTIONS, TCP_CONCURRENCY)?;
    let replies = client::all_ok("TCP connections to the VIP", results)?;

    for r in &replies {
        // The client connected to the VIP, and it got an answer: TCP only accepts segments
        // from the address and port it connected to, so the reply came from VIP:80.
        client::check_fullnat(r.local, r.peer, &r.answer, vip, IpAddr::V4(SNAT))?;
    }
    // The client's kernel may reuse a source port once its connection is closed (the
    // backend closes first, so the client side does not wait in TIME_WAIT). xlb then starts
    // the closed flow anew: same backend, same SNAT port, which the backend's TIME_WAIT
    // accepts for a new connection.
    let mut by_port: BTreeMap<u16, (&str, SocketAddr)> = BTreeMap::new();
    for r in &replies {
        let seen = (r.answer.server.as_str(), r.answer.seen_peer);
        if let Some(first) = by_port.insert(r.local.port(), seen) {
            ensure!(
                first == seen,
                "client port {} reached {first:?} once and {seen:?} later",
                r.local.port()
            );
        }
    }
    let per_backend = count_by_server(replies.iter().map(|r| r.answer.server.as_str()));
    eprintln!("TCP connections per backend (client's view): {per_backend:?}");
    for b in TCP_BACKENDS {
        let served = servers.stats(b.name).map_or(0, |s| s.tcp_connections);
        let answered = per_backend.get(b.name).copied().unwrap_or(0) as u64;
        ensure!(
            served == answered,
            "backend {}: server accepted {served} connections, clients got {answered} answers",
            b.name
        );
    }
    check_distribution(&per_backend, replies.len())?;
    Ok(replies)
}

/// Checks that TCP connections are spread over the backends in proportion to their weights.
///
/// Each connection has a new source port, which the flow hash maps pseudo-randomly onto
/// the Maglev table, so each connection independently lands on backend `i` with probability
/// `p_i = w_i / Σw` (0.5, 0.25, 0.25 here; a 65537-slot weighted Maglev table matches the
/// weights to well under a percent). The count on backend `i` is then Binomial(n, p_i):
/// mean `n·p_i`, standard deviation `σ_i = sqrt(n·p_i·(1−p_i))`, i.e. 150 ± 8.66 for b1 and
/// 75 ± 7.5 for b2 and b3 at n = 300. The check allows 4.5 σ (±39 and ±34): a correct
/// balancer fails it with probability ≈ 7e-6 per backend (two-sided normal tail), < 1e-4
/// overall, while one that ignores the weights (100 each, 50 off for b1) is usually caught.
fn check_distribution(per_backend: &BTreeMap<String, usize>, n: usize) -> Result<()> {
    const SIGMAS: f64 = 4.5;
    let n_f = n as f64;
    for b in TCP_BACKENDS {
        let p = expected_share(&b);
        let expected = n_f * p;
        let sigma = (n_f * p * (1.0 - p)).sqrt();
        let tolerance = (SIGMAS * sigma).ceil();
        let got = per_backend.get(b.name).copied().unwrap_or(0) as f64;
        ensure!(
            (got - expected).abs() <= tolerance,
            "backend {} (weight {}) served {got} of {n} connections, expected {expected} ± \
             {tolerance} ({SIGMAS} σ); all: {per_backend:?}",
            b.name,
            b.weight
        );
    }
    Ok(())
}

/// 50 UDP datagrams to VIP:53, each from a fresh socket; checks every answer.
fn check_udp(topo: &Topology, servers: &BackendServers) -> Result<Vec<UdpReply>> {
    let vip = topology::vip_udp();
    let results = client::udp_requests(&topo.client, vip, UDP_REQUESTS, UDP_TIMEOUT)?;
    let replies = client::all_ok("UDP requests to the VIP", results)?;
    for r in &replies {
        client::check_fullnat(r.local, r.from, &r.answer, vip, IpAddr::V4(SNAT))?;
    }
    let answered = servers.total_udp_datagrams();
    ensure!(
        answered == UDP_REQUESTS as u64,
        "backends answered {answered} datagrams, clients sent {UDP_REQUESTS}"
    );
    let per_backend = count_by_server(replies.iter().map(|r| r.answer.server.as_str()));
    eprintln!("UDP requests per backend (client's view): {per_backend:?}");
    Ok(replies)
}

/// Traffic to the load balancer's own address must still reach its kernel while xlb is
/// attached: TCP to a local server (no service matches: XDP passes it) and ICMP.
fn check_lb_local_traffic(topo: &Topology, target: SocketAddr, server: &LineServer) -> Result<()> {
    let reply = topo
        .client
        .enter(|| client::tcp_request(target))?
        .with_context(|| format!("TCP to the load balancer's own address {target}"))?;
    ensure!(
        reply.answer.server == "lb",
        "{target} answered as {:?}",
        reply.answer.server
    );
    ensure!(
        reply.answer.seen_peer.ip() == IpAddr::V4(CLIENT_ADDR),
        "the load balancer's own server saw source {}, expected the client {CLIENT_ADDR} \
         (traffic to the host itself must not be NATed)",
        reply.answer.seen_peer
    );
    ensure!(
        server.stats().tcp_connections == 1,
        "lb server: {:?}",
        server.stats()
    );
    topology::ping(&topo.client, LB_CLIENT_ADDR)
        .context("ping from the client to the load balancer's own address")?;
    Ok(())
}

fn check_xlb_counters(
    stats: &Stats,
    servers: &BackendServers,
    tcp: &[TcpReply],
    udp: &[UdpReply],
) -> Result<()> {
    // TCP: one flow per connection each backend accepted.
    let mut tcp_flows = 0;
    for b in TCP_BACKENDS {
        let flows = stats
            .backend_flows(TCP_SERVICE, b.address)
            .with_context(|| {
                format!(
                    "xlb printed no counters for {TCP_SERVICE} backend {}",
                    b.address
                )
            })?;
        let served = servers.stats(b.name).map_or(0, |s| s.tcp_connections);
        ensure!(
            flows == served,
            "{TCP_SERVICE} backend {} ({}): xlb counted {flows} flows, the server accepted \
             {served} connections",
            b.address,
            b.name
        );
        tcp_flows += flows;
    }
    ensure!(
        tcp_flows == tcp.len() as u64,
        "TCP flows {tcp_flows} != {} connections",
        tcp.len()
    );
    let (vip, proto) = split_service(TCP_SERVICE);
    ensure!(
        stats.service_flows(vip, proto) == Some(tcp.len() as u64),
        "service {TCP_SERVICE}: xlb counted {:?} flows, expected {}",
        stats.service_flows(vip, proto),
        tcp.len()
    );

    // UDP: a flow per distinct client source port. Fresh sockets get random ports, which
    // can repeat; a repeated port is the same flow again (and the same backend).
    let mut udp_flows: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    for r in udp {
        udp_flows
            .entry(r.answer.server.as_str())
            .or_default()
            .insert(r.local.port());
    }
    for b in TCP_BACKENDS {
        let expected = udp_flows.get(b.name).map_or(0, |p| p.len()) as u64;
        let flows = stats.backend_flows(UDP_SERVICE, b.address).unwrap_or(0);
        ensure!(
            flows == expected,
            "{UDP_SERVICE} backend {}: xlb counted {flows} flows, clients saw {expected} \
             distinct flows answered by {}",
            b.address,
            b.name
        );
    }

    let drops = stats.nonzero_reasons("drop/");
    ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
    let known: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
    let unknown: Vec<&String> = stats
        .reasons
        .keys()
        .filter(|n| !known.contains(n.as_str()))
        .collect();
    ensure!(
        unknown.is_empty(),
        "xlb printed reasons lb-common does not define: {unknown:?}"
    );
    ensure!(
        stats.reason(Reason::ForwardResolveNeighbour.name()) > 0,
        "no packet was counted as {} although the neighbour table was flushed; reasons: {:?}",
        Reason::ForwardResolveNeighbour.name(),
        stats.reasons
    );
    ensure!(
        stats.reason(Reason::ForwardRedirect.name()) > 0,
        "no packet was counted as {}; reasons: {:?}",
        Reason::ForwardRedirect.name(),
        stats.reasons
    );
    Ok(())
}

/// Every load balancer interface has an XDP program (`attached`) or none (`!attached`).
fn check_xdp_attached(lb: &NetNs, attached: bool) -> Result<()> {
    for iface in LB_INTERFACES {
        let out = lb.ip(&["-d", "link", "show", iface])?;
        ensure!(
            out.stdout.contains("xdp") == attached,
            "{iface}: expected {}an XDP program:\n{}",
            if attached { "" } else { "no " },
            out.stdout
        );
    }
    Ok(())
}

fn count_by_server<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> =
        BACKEND_NAMES.iter().map(|n| (n.to_string(), 0)).collect();
    for n in names {
        *counts.entry(n.to_string()).or_default() += 1;
    }
    counts
}

/// `10.10.0.100:80/tcp` → (`10.10.0.100:80`, `tcp`).
fn split_service(label: &str) -> (&str, &str) {
    label
        .split_once('/')
        .expect("service labels are <vip>/<proto>")
}
