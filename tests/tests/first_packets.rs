//! No first packet is lost, whatever addresses the operator picks, and what the kernel
//! drops is counted as dropped.
//!
//! * The NodePort set-up: the backends share a subnet with the load balancer (the flat
//!   layout), the SNAT address is the load balancer's own address on it, every neighbour
//!   table starts empty, and 300 connections start the moment xlb says it is ready. The same
//!   again with the VIP an address of the load balancer host itself (on `lo`). Before, the
//!   first packet of each flow went to the kernel, which dropped it as a martian (its source
//!   was the host's own address), and every connection timed out.
//! * A veth set-up without the README's two rules: xlb says so at start, with the fix, and
//!   counts the frames the kernel then drops.
//! * A backend behind a device of the load balancer without xlb's program (a macvlan, as a
//!   VLAN device would be): every packet toward it goes by the tc program, out of that
//!   device; its replies come back on the interface xlb is attached to.
//!
//! Needs root, the `xlb` binary (`$XLB_BIN`) and `ip`, `ethtool`, `nstat`, `ping`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_common::{maps::Handoff, reason::Reason};
use xlb_tests::client;
use xlb_tests::nstat::Snapshot;
use xlb_tests::servers::BackendServers;
use xlb_tests::stats::Stats;
use xlb_tests::topology::{
    self, BACKEND_IFACE, FLAT_LB_ADDR, Layout, Options, SNAT, Topology, VIP, VIP_TCP_PORT,
    with_topology,
};
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlbf";
const CONNECTIONS: usize = 300;
const CONCURRENCY: usize = 8;

/// xlb's config for the flat layout: the SNAT address is the load balancer's own, and no
/// `snat_port_range` is set, so xlb picks ports outside the host's ephemeral range.
fn flat_config(topo: &Topology) -> String {
    let backends: String = topo
        .backends
        .iter()
        .map(|b| format!("[[service.backend]]\naddress = \"{}\"\n", b.service_addr()))
        .collect();
    format!(
        "[dataplane]\ninterfaces = {:?}\n\n[[service]]\nvip = \"{}\"\nprotocol = \"tcp\"\n\
         snat = \"{FLAT_LB_ADDR}\"\n{backends}",
        topo.lb_interfaces(),
        topology::vip_tcp()
    )
}

fn flat() -> Options {
    Options {
        layout: Layout::Flat,
        ..Options::default()
    }
}

#[test]
fn snat_on_the_hosts_own_address_with_cold_neighbours() {
    with_topology(PREFIX, flat(), |topo| own_address_scenario(topo, false));
}

#[test]
fn vip_and_snat_both_the_hosts_own_with_cold_neighbours() {
    with_topology(PREFIX, flat(), |topo| own_address_scenario(topo, true));
}

fn own_address_scenario(topo: &Topology, vip_on_lo: bool) -> Result<()> {
    topo.check_connectivity()?;
    if vip_on_lo {
        topo.lb
            .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
            .context("putting the VIP on the load balancer's lo")?;
    }
    let servers = BackendServers::start(topo).context("starting the backend servers")?;
    // Every neighbour table empty: nobody knows anybody's MAC.
    for ns in topo.namespaces() {
        ns.ip(&["neigh", "flush", "all"])
            .with_context(|| format!("flushing the neighbours of {}", ns.name()))?;
    }
    // The client learns the load balancer's MAC (as it would, being a client of it).
    topology::ping(&topo.client, topology::LB_CLIENT_ADDR)?;
    let before = Snapshot::take(&topo.namespaces())?;

    let xlb = XlbProcess::start(&topo.lb, &flat_config(topo)).context("starting xlb")?;
    // xlb keeps the backends resolved with kernel-managed entries...
    let neighbours = topo.lb.ip(&["neigh", "show", "dev", "xlb-s"])?.stdout;
    for b in &topo.backends {
        let line = neighbours
            .lines()
            .find(|l| l.starts_with(&format!("{} ", b.addr)))
            .with_context(|| format!("no neighbour entry for {}:\n{neighbours}", b.addr))?;
        ensure!(
            line.contains("managed") && line.contains("lladdr"),
            "{}'s entry is not managed and resolved: {line}",
            b.addr
        );
    }
    // ...but a packet may still meet an unresolved neighbour (a client, or a table
    // flushed by someone): forget them all again, so the first packets both ways do. The
    // client still knows the load balancer, so it will not announce itself by ARP.
    topo.lb.ip(&["neigh", "flush", "all"])?;
    let ready = xlb.ready_line().to_string();
    // Linux's default ephemeral range is 32768-60999: xlb must keep clear of it on the
    // host's own address.
    ensure!(
        ready.contains("SNAT ports [1024, 32767]"),
        "xlb did not move its SNAT ports out of the host's ephemeral range: {ready}"
    );

    let results =
        client::tcp_requests(&topo.client, topology::vip_tcp(), CONNECTIONS, CONCURRENCY)?;
    let replies = client::all_ok("TCP connections started as xlb became ready", results)?;
    let mut peers = BTreeSet::new();
    for r in &replies {
        ensure!(
            r.peer == topology::vip_tcp(),
            "{}: peer {}",
            r.local,
            r.peer
        );
        peers.insert(r.answer.seen_peer.ip());
        let port = r.answer.seen_peer.port();
        ensure!(
            (1024..=32767).contains(&port),
            "{}: SNAT port {port} is in the host's ephemeral range",
            r.local
        );
    }
    ensure!(
        peers == BTreeSet::from([IpAddr::V4(FLAT_LB_ADDR)]),
        "backends saw {peers:?}, expected only the load balancer's own {FLAT_LB_ADDR}"
    );

    // The host's own connections from the same address to a backend still work: their
    // ports are the host's ephemeral ones, which xlb does not hand out.
    for b in &topo.backends {
        let target: SocketAddr = b.service_addr();
        let reply = topo
            .lb
            .enter(|| client::tcp_request(target))?
            .with_context(|| format!("the load balancer's own connection to {target}"))?;
        ensure!(
            reply.answer.seen_peer == reply.local,
            "the host's own connection was NATed: {} seen as {}",
            reply.local,
            reply.answer.seen_peer
        );
    }

    before.no_checksum_errors_since(&topo.namespaces())?;
    let stats = Stats::parse(&xlb.stop()?).context("parsing xlb's counters")?;
    let drops = stats.nonzero_reasons("drop/");
    ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
    // The first packets met unresolved neighbours and went by the tc program, whose path
    // the kernel's martian check (source = the host's own address) does not block.
    let resolved = stats.reason(Reason::ForwardResolveNeighbour.name());
    let sent = stats.handoff(Handoff::Sent);
    ensure!(
        resolved > 0 && sent == resolved,
        "{resolved} packets met an unresolved neighbour, the tc program sent {sent}"
    );
    let served: u64 = topo
        .backends
        .iter()
        .map(|b| servers.stats(&b.name).map_or(0, |s| s.tcp_connections))
        .sum();
    ensure!(
        served == (CONNECTIONS + topo.backends.len()) as u64,
        "backends accepted {served} connections"
    );
    ensure!(
        stats.handoff(Handoff::Failed) == 0,
        "the tc program could not send some frames: {:?}",
        stats.handoffs
    );
    Ok(())
}

/// Without GRO or an XDP program on the backends' veth peers, the kernel drops every frame
/// xlb redirects to them. xlb must say so at start, naming the fix, and count those frames
/// as dropped beside its own `forward/redirect`.
#[test]
fn veth_without_the_readme_rules_is_reported_and_its_drops_counted() {
    let options = Options {
        veth_rules: false,
        ..Options::default()
    };
    with_topology(PREFIX, options, |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        let config = xlb_tests::demo_config::CONFIG_TOML.to_string();
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;
        for b in &topo.backends {
            let warned = xlb.startup_lines().iter().any(|l| {
                l.starts_with("warning:")
                    && l.contains(&b.lb_iface)
                    && l.contains("gro on")
                    && l.contains(b.ns.name())
            });
            ensure!(
                warned,
                "no warning with the fix for {}'s peer; xlb said:\n{}",
                b.lb_iface,
                xlb.startup_lines().join("\n")
            );
        }
        // A few connections: the SYNs go into the void.
        for _ in 0..3 {
            let attempt = topo.client.enter(|| {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::from((VIP, VIP_TCP_PORT)),
                    Duration::from_millis(1500),
                )
            })?;
            ensure!(attempt.is_err(), "a connection got through a dropping veth");
        }
        let stats = Stats::parse(&xlb.stop()?)?;
        let redirected = stats.reason(Reason::ForwardRedirect.name());
        let dropped: u64 = stats.send_errors.values().sum();
        ensure!(
            redirected > 0,
            "nothing was redirected: {:?}",
            stats.reasons
        );
        ensure!(
            dropped == redirected,
            "{redirected} frames redirected into dropping veths, but the interfaces count \
             {dropped} dropped: {:?}",
            stats.send_errors
        );
        Ok(())
    });
}

/// Backend b1's link gets a macvlan device on the load balancer's end (`xlb-b1m`, on
/// `xlb-b1`), which takes the load balancer's address on it; xlb stays attached to
/// `xlb-b1` only, as it would to a VLAN device's parent. Toward b1 the FIB then names
/// `xlb-b1m`, which has no program of xlb's: each packet is rewritten, handed to the tc
/// program, and leaves through the macvlan device (`forward/kernel_output`), which sends it
/// out of `xlb-b1` with a MAC of its own. b1's replies, to that MAC, arrive on `xlb-b1`,
/// where xlb takes them, and leave toward the client. (A VLAN device would be the same
/// path, tagged; this kernel has no 802.1Q module.)
#[test]
fn a_backend_behind_a_device_without_xlbs_program() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let b1 = topo.backend("b1").context("backend b1")?;
        let device = format!("{}m", b1.lb_iface);
        let cidr = format!("{}/24", b1.gateway);
        let lb = &topo.lb;
        lb.ip(&["addr", "del", &cidr, "dev", &b1.lb_iface])?;
        lb.ip(&[
            "link",
            "add",
            "link",
            &b1.lb_iface,
            "name",
            &device,
            "type",
            "macvlan",
        ])?;
        lb.ip(&["link", "set", &device, "type", "macvlan", "mode", "bridge"])?;
        lb.ip(&["addr", "add", &cidr, "dev", &device])?;
        lb.ip(&["link", "set", &device, "up"])?;
        b1.ns.ip(&["neigh", "flush", "all"])?;
        let gateway = b1.gateway.to_string();
        b1.ns.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &gateway,
            "dev",
            BACKEND_IFACE,
        ])?;
        topology::ping(&b1.ns, b1.gateway).context("b1 to the load balancer's macvlan")?;
        let servers = BackendServers::start(topo).context("starting the backend servers")?;

        let config = format!(
            "[dataplane]\ninterfaces = {:?}\n\n[[service]]\nvip = \"{}\"\n\
             protocol = \"tcp\"\nsnat = \"{SNAT}\"\n[[service.backend]]\naddress = \"{}\"\n",
            topo.lb_interfaces(),
            topology::vip_tcp(),
            b1.service_addr()
        );
        let xlb = XlbProcess::start(&topo.lb, &config).context("starting xlb")?;
        let results = client::tcp_requests(&topo.client, topology::vip_tcp(), 50, 4)?;
        let replies = client::all_ok("TCP connections to a backend behind a macvlan", results)?;
        for r in &replies {
            client::check_fullnat(
                r.local,
                r.peer,
                &r.answer,
                topology::vip_tcp(),
                IpAddr::V4(SNAT),
            )?;
            ensure!(
                r.answer.server == "b1",
                "{} was answered by {}",
                r.local,
                r.answer.server
            );
        }
        let served = servers.stats("b1").map_or(0, |s| s.tcp_connections);
        ensure!(served == 50, "b1 accepted {served} connections");

        let stats = Stats::parse(&xlb.stop()?).context("parsing xlb's counters")?;
        let drops = stats.nonzero_reasons("drop/");
        ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
        let out = stats.reason(Reason::ForwardKernelOutput.name());
        let sent = stats.handoff(Handoff::Sent);
        // Every packet toward b1 (at least a SYN, an ACK and the request per connection)
        // went out through the macvlan device by the tc program; the replies came back by
        // xlb itself.
        ensure!(
            out >= 150 && sent >= out,
            "{out} packets left by the kernel's output, the tc program sent {sent}"
        );
        ensure!(
            stats.reason(Reason::ForwardRedirect.name()) >= 100,
            "b1's replies were not redirected to the client by xlb: {:?}",
            stats.reasons
        );
        ensure!(
            stats.handoff(Handoff::Failed) == 0,
            "the tc program could not send some frames: {:?}",
            stats.handoffs
        );
        Ok(())
    });
}
