//! The test network on its own, without xlb: namespaces, veths, addresses, routes and
//! servers work, and everything is gone afterwards. When the end-to-end test fails, this
//! one tells whether the harness or xlb is to blame.
//!
//! Without xlb the load balancer namespace is a plain router, so the client reaches the
//! backends' own addresses directly (no NAT: backends see the client's address).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_tests::client;
use xlb_tests::netns::{self, NetNs};
use xlb_tests::servers::BackendServers;
use xlb_tests::topology::{
    BACKEND_IFACE, CLIENT_ADDR, CLIENT_IFACE, Layout, Options, Topology, with_topology,
};

const PREFIX: &str = "xlbt";

/// Namespace tests run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> std::sync::MutexGuard<'static, ()> {
    if let Err(e) = xlb_tests::require_root() {
        panic!("{e}");
    }
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    netns::cleanup_stale(PREFIX).expect("cleaning up stale namespaces");
    guard
}

#[test]
fn routed_topology_without_xlb() {
    with_topology(PREFIX, Options::default(), scenario);
}

#[test]
fn flat_topology_without_xlb() {
    with_topology(
        PREFIX,
        Options {
            layout: Layout::Flat,
            ..Options::default()
        },
        scenario,
    );
}

fn scenario(topo: &Topology) -> Result<()> {
    topo.check_connectivity()?;
    check_offloads(&topo.client, CLIENT_IFACE)?;
    match &topo.switch {
        Some(sw) => check_offloads(sw, "sw-lb")?,
        None => {
            for b in &topo.backends {
                check_offloads(&b.ns, BACKEND_IFACE)?;
            }
        }
    }
    for iface in topo.lb_interfaces() {
        let out = topo.lb.exec("ethtool", &["-k", &iface])?;
        ensure!(
            out.stdout.contains("tx-checksumming: off"),
            "{iface}: TX checksum offload still on:\n{}",
            out.stdout
        );
    }

    let servers = BackendServers::start(topo)?;
    for b in &topo.backends {
        let target = b.service_addr();
        let reply = topo
            .client
            .enter(|| client::tcp_request(target))?
            .with_context(|| format!("TCP to backend {} at {target}", b.name))?;
        ensure!(
            reply.answer.server == b.name,
            "{target} answered as {:?}",
            reply.answer.server
        );
        ensure!(
            reply.answer.seen_peer == reply.local,
            "routed (not NATed) traffic: backend should see the client socket {}, saw {}",
            reply.local,
            reply.answer.seen_peer
        );
        let udp = topo
            .client
            .enter(|| client::udp_request(target, Duration::from_secs(2)))?
            .with_context(|| format!("UDP to backend {} at {target}", b.name))?;
        ensure!(
            udp.from == target,
            "UDP reply from {}, expected {target}",
            udp.from
        );
        ensure!(
            udp.answer.server == b.name,
            "UDP answered as {:?}",
            udp.answer.server
        );
    }
    for b in &topo.backends {
        let s = servers.stats(&b.name).context("server stats")?;
        ensure!(
            s.tcp_connections == 1 && s.udp_datagrams == 1,
            "{}: {s:?}",
            b.name
        );
        ensure!(
            s.peer_ips.iter().all(|ip| *ip == IpAddr::V4(CLIENT_ADDR)),
            "{}: {s:?}",
            b.name
        );
    }
    Ok(())
}

/// GRO on (so the veth runs NAPI and accepts XDP-redirected frames) and TX checksum
/// offload off, as the topology promises.
fn check_offloads(ns: &NetNs, iface: &str) -> Result<()> {
    let out = ns.exec("ethtool", &["-k", iface])?;
    ensure!(
        out.stdout.contains("generic-receive-offload: on"),
        "{} {iface}: GRO is not on:\n{}",
        ns.name(),
        out.stdout
    );
    ensure!(
        out.stdout.contains("tx-checksumming: off"),
        "{} {iface}: TX checksum offload is not off:\n{}",
        ns.name(),
        out.stdout
    );
    Ok(())
}

/// `enter` really switches namespaces: the thread runs in the namespace's network
/// namespace (same nsfs inode as `/run/netns/NAME`), sockets made there stay there, and the
/// namespace disappears with its guard.
#[test]
fn enter_binds_sockets_inside_the_namespace() {
    use std::os::unix::fs::MetadataExt;

    let _serial = setup();
    let name = format!("{}-enter", netns::unique_base(PREFIX));
    {
        let ns = NetNs::create(&name).expect("creating a namespace");
        let ns_inode = std::fs::metadata(ns.path()).unwrap().ino();
        let thread_ns = |()| std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_eq!(ns.enter(|| thread_ns(())).unwrap(), ns_inode);
        assert_ne!(
            thread_ns(()),
            ns_inode,
            "the caller's thread must stay where it was"
        );

        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        let listener = ns
            .enter(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .expect("bind inside the namespace");
        let addr: SocketAddr = listener.local_addr().unwrap();
        // Connecting from inside works, and the listener, used from this thread, accepts.
        let client = ns
            .enter(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .unwrap();
        assert!(client.is_ok(), "connect inside {name}: {client:?}");
        listener.set_nonblocking(false).unwrap();
        assert!(listener.accept().is_ok());
        assert!(netns::list().unwrap().contains(&name));
    }
    assert!(
        !netns::list().unwrap().contains(&name),
        "{name} not deleted by Drop"
    );
}

/// `cleanup_stale` removes namespaces whose creating pid is gone and keeps live ones.
#[test]
fn cleanup_stale_removes_only_dead_owners() {
    let _serial = setup();
    // Own prefix, so this test never touches another run's namespaces. A pid no process
    // has, whose namespace no other run of this test has made (each run starts its search
    // at a place of its own).
    let prefix = "xlbtstale";
    let taken = netns::list().unwrap();
    let start = 4_000_000 + std::process::id() % 100_000;
    let dead_pid = (start..4_194_000)
        .find(|p| {
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                && !taken.contains(&format!("{prefix}-{p}-0-probe"))
        })
        .expect("some unused pid");
    let stale = format!("{prefix}-{dead_pid}-0-probe");
    let live = format!("{}-probe", netns::unique_base(prefix));
    let stale_ns = NetNs::create(&stale).expect("creating the stale namespace");
    let live_ns = NetNs::create(&live).expect("creating the live namespace");

    // (A concurrent run of this test may have removed ours first: only its absence is
    // asked.)
    netns::cleanup_stale(prefix).expect("cleanup_stale");
    let present = netns::list().unwrap();
    assert!(!present.contains(&stale), "{stale} still present");
    assert!(present.contains(&live), "{live} (our own pid) was removed");

    // The stale guard's Drop now finds its namespace gone; that must only warn.
    drop(stale_ns);
    drop(live_ns);
    assert!(!netns::list().unwrap().contains(&live));
}
