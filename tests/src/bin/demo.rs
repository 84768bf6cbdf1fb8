//! `xlb-demo`: shows xlb balancing real traffic, in throwaway network namespaces.
//!
//! Builds the test topology (namespaces `xlb-demo-<pid>-<n>-*`), runs xlb with the
//! built-in config ([`CONFIG_TOML`]), makes 300 TCP connections and 30 UDP requests to the
//! VIP from the client namespace, prints how the backends shared them, xlb's own counters,
//! and removes everything again. Run as root after building xlb:
//!
//! ```text
//! cargo build -p lb-userspace && sudo target/debug/xlb-demo
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_tests::client;
use xlb_tests::demo_config::{CONFIG_TOML, TCP_BACKENDS, TCP_SERVICE, expected_share};
use xlb_tests::netns;
use xlb_tests::servers::BackendServers;
use xlb_tests::stats::Stats;
use xlb_tests::topology::{self, Topology};
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlb-demo";
const TCP_CONNECTIONS: usize = 300;
const TCP_CONCURRENCY: usize = 8;
const UDP_REQUESTS: usize = 30;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    xlb_tests::require_root()?;
    let stale = netns::cleanup_stale(PREFIX)?;
    if !stale.is_empty() {
        println!("removed namespaces left over by earlier runs: {stale:?}");
    }

    let topo = Topology::new(PREFIX)?;
    let names = topo.namespace_names();
    println!("built namespaces {}", names.join(", "));
    // `demo` owns nothing that outlives it; the topology guard removes the namespaces
    // after it, whether it succeeded or not.
    let result = demo(&topo);
    drop(topo);
    let present = netns::list()?;
    let leftover: Vec<_> = names.iter().filter(|n| present.contains(n)).collect();
    result?;
    ensure!(
        leftover.is_empty(),
        "namespaces still present: {leftover:?}"
    );
    println!("namespaces removed");
    Ok(())
}

fn demo(topo: &Topology) -> Result<()> {
    topo.check_connectivity()?;
    let servers = BackendServers::start(topo)?;
    let xlb = XlbProcess::start_quiet(&topo.lb, CONFIG_TOML)?;
    println!("xlb: {}", xlb.ready_line());

    let results = client::tcp_requests(
        &topo.client,
        topology::vip_tcp(),
        TCP_CONNECTIONS,
        TCP_CONCURRENCY,
    )?;
    let (tcp_ok, tcp_errors) = client::partition(results);
    let results = client::udp_requests(
        &topo.client,
        topology::vip_udp(),
        UDP_REQUESTS,
        Duration::from_secs(2),
    )?;
    let (udp_ok, udp_errors) = client::partition(results);

    let output = xlb.stop().context("stopping xlb")?;
    let stats = Stats::parse(&output).context("parsing xlb's counters")?;

    println!();
    println!(
        "TCP {}: {} of {TCP_CONNECTIONS} connections answered",
        topology::vip_tcp(),
        tcp_ok.len()
    );
    println!(
        "  {:<16} {:>6} {:>11} {:>9} {:>7} {:>9}",
        "backend", "weight", "connections", "xlb flows", "share", "expected"
    );
    let total: u64 = servers.total_tcp_connections();
    for b in TCP_BACKENDS {
        let served = servers.stats(b.name).map_or(0, |s| s.tcp_connections);
        let flows = stats
            .backend_flows(TCP_SERVICE, b.address)
            .map_or_else(|| "-".to_string(), |f| f.to_string());
        let share = if total == 0 {
            0.0
        } else {
            100.0 * served as f64 / total as f64
        };
        println!(
            "  {:<16} {:>6} {:>11} {:>9} {:>6.1}% {:>8.1}%",
            format!("{} ({})", b.name, b.address.split(':').next().unwrap_or("")),
            b.weight,
            served,
            flows,
            share,
            100.0 * expected_share(&b)
        );
    }

    let mut udp_by_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &udp_ok {
        *udp_by_backend.entry(r.answer.server.as_str()).or_default() += 1;
    }
    println!();
    println!(
        "UDP {}: {} of {UDP_REQUESTS} requests answered, per backend {udp_by_backend:?}",
        topology::vip_udp(),
        udp_ok.len()
    );
    let peers = servers.all_peer_ips();
    println!(
        "source addresses the backends saw: {peers:?} (the SNAT address is {})",
        topology::SNAT
    );

    println!();
    println!("xlb counters (the connections' flows wait out their time-wait):");
    for line in output.lines().filter(|l| {
        ["service ", "backend ", "reason ", "handoff ", "conntrack"]
            .iter()
            .any(|p| l.starts_with(p))
    }) {
        println!("  {line}");
    }
    println!();

    for e in tcp_errors.iter().chain(&udp_errors).take(10) {
        eprintln!("failed: {e}");
    }
    ensure!(
        tcp_errors.is_empty() && udp_errors.is_empty(),
        "{} TCP connections and {} UDP requests failed",
        tcp_errors.len(),
        udp_errors.len()
    );
    let drops = stats.nonzero_reasons("drop/");
    ensure!(drops.is_empty(), "xlb dropped packets: {drops:?}");
    Ok(())
}
