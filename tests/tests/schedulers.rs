//! The schedulers through the real xlb, with real clients and servers: round-robin and
//! weighted round-robin take turns by weight; source-hash keeps every connection of a
//! client on one backend while different clients spread; and a service's scheduler can be
//! chosen with `xlb service add --scheduler`.
//!
//! Needs root, the `xlb` binary (`$XLB_BIN`) and `ip`, `ethtool`, `ping`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_tests::echo::{self, EchoConn, EchoServer, check_shares};
use xlb_tests::topology::{CLIENT_IFACE, Options, SNAT, Topology, VIP, with_topology};
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlbsc";
/// The echo port of the backends, and of the VIP for the first service.
const PORT: u16 = 7007;

/// A config of one service per `(vip port, scheduler)`, each over the topology's three
/// backends with `weights`.
fn config(topo: &Topology, services: &[(u16, &str)], weights: [u32; 3]) -> String {
    let mut text = format!("[dataplane]\ninterfaces = {:?}\n", topo.lb_interfaces());
    for (port, scheduler) in services {
        text += &format!(
            "\n[[service]]\nvip = \"{VIP}:{port}\"\nprotocol = \"tcp\"\nsnat = \"{SNAT}\"\n\
             scheduler = \"{scheduler}\"\n"
        );
        for (b, w) in topo.backends.iter().zip(weights) {
            text += &format!(
                "[[service.backend]]\naddress = \"{}\"\nweight = {w}\n",
                SocketAddrV4::new(b.addr, PORT)
            );
        }
    }
    text
}

/// Opens `n` connections to `target` one by one, from `source` when given, and returns
/// how many each backend's server accepted meanwhile.
fn spread(
    topo: &Topology,
    servers: &[EchoServer],
    target: SocketAddr,
    source: Option<Ipv4Addr>,
    n: usize,
) -> Result<Vec<u64>> {
    echo::spread(&topo.client, servers, target, source, n)
}

/// Round-robin gives every backend the same share whatever its weight; weighted
/// round-robin gives each its weight's share. Turns are per CPU, so the shares are exact
/// per CPU and near-exact in all: within 4% over 150 connections (Maglev's spread by
/// hashing at this count would be about ±10%).
#[test]
fn round_robins_take_turns_by_weight() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = EchoServer::on_backends(topo, PORT)?;
        let weights = [3, 1, 2];
        let cfg = config(
            topo,
            &[(PORT, "round-robin"), (PORT + 1, "weighted-round-robin")],
            weights,
        );
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let rr = spread(topo, &servers, SocketAddr::from((VIP, PORT)), None, 150)?;
        check_shares(&rr, &[1, 1, 1], 0.04, "round-robin")?;
        let wrr = spread(topo, &servers, SocketAddr::from((VIP, PORT + 1)), None, 150)?;
        check_shares(&wrr, &weights, 0.04, "weighted-round-robin")?;
        xlb.stop()?;
        Ok(())
    });
}

/// Source-hash: twelve client addresses make ten connections each; each client's ten all
/// reach one backend, and the clients between them reach more than one. The service is
/// added with `xlb service add --scheduler source-hash`, and `service ls` shows it.
#[test]
fn source_hash_keeps_each_client_on_one_backend() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = EchoServer::on_backends(topo, PORT)?;
        let xlb = XlbProcess::start(&topo.lb, &config(topo, &[(PORT, "maglev")], [1, 1, 1]))?;
        let vip = format!("{VIP}:{}", PORT + 2);
        let out = xlb.command(&[
            "service",
            "add",
            &vip,
            "--snat",
            &SNAT.to_string(),
            "--scheduler",
            "source-hash",
        ])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for b in &topo.backends {
            let address = SocketAddrV4::new(b.addr, PORT).to_string();
            let out = xlb.command(&["backend", "add", &vip, &address])?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let listed = xlb.json(&["service", "ls"])?;
        let scheduler = listed
            .as_array()
            .context("service ls")?
            .iter()
            .find(|s| s["vip"] == vip.as_str())
            .context("the new service is not listed")?["scheduler"]
            .clone();
        ensure!(scheduler == "source-hash", "service ls says {scheduler}");

        let mut reached = std::collections::BTreeSet::new();
        for i in 0..12u8 {
            let client = Ipv4Addr::new(10, 10, 1, 20 + i);
            topo.client
                .ip(&["addr", "add", &format!("{client}/24"), "dev", CLIENT_IFACE])?;
            let counts = spread(topo, &servers, vip.parse()?, Some(client), 10)?;
            let hit: Vec<usize> = (0..counts.len()).filter(|&b| counts[b] > 0).collect();
            ensure!(
                hit.len() == 1 && counts[hit[0]] == 10,
                "client {client}'s connections went to several backends: {counts:?}"
            );
            reached.insert(hit[0]);
        }
        ensure!(
            reached.len() > 1,
            "every client went to one backend: {reached:?}"
        );
        xlb.stop()?;
        Ok(())
    });
}

/// The backends' open flows as `xlb backend ls` shows them, in topology order.
fn active_flows(xlb: &XlbProcess, vip: &str, topo: &Topology) -> Result<Vec<u64>> {
    let list = xlb.backends(vip)?;
    topo.backends
        .iter()
        .map(|b| {
            let address = SocketAddrV4::new(b.addr, PORT).to_string();
            list.get(&address)
                .and_then(|x| x["active_flows"].as_u64())
                .with_context(|| format!("{address} missing from backend ls: {list:?}"))
        })
        .collect()
}

/// Least-conn: 20 connections held open on b1 and b2 (b3 drained) split 10/10, exactly (a
/// new flow counts at once); with b3 back, the next 10 held-open connections all go to
/// it. `backend ls` shows each backend's open flows, and once every connection is closed
/// the counts return to zero.
#[test]
fn least_conn_fills_the_least_loaded_backend() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = EchoServer::on_backends(topo, PORT)?;
        let cfg = config(topo, &[(PORT, "least-conn")], [1, 1, 1]).replacen(
            &format!(
                "address = \"{}\"\nweight = 1\n",
                SocketAddrV4::new(topo.backends[2].addr, PORT)
            ),
            &format!(
                "address = \"{}\"\nweight = 1\ndrain = true\n",
                SocketAddrV4::new(topo.backends[2].addr, PORT)
            ),
            1,
        );
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let vip = format!("{VIP}:{PORT}");
        let target: SocketAddr = vip.parse()?;
        let hold = |n: usize| -> Result<(Vec<EchoConn>, Vec<u64>)> {
            let before: Vec<u64> = servers.iter().map(EchoServer::accepted).collect();
            let conns = (0..n)
                .map(|i| {
                    let mut c = EchoConn::connect(&topo.client, target, Duration::from_secs(3))?;
                    c.echo("hello")
                        .with_context(|| format!("held connection {i}"))?;
                    Ok(c)
                })
                .collect::<Result<Vec<_>>>()?;
            std::thread::sleep(Duration::from_millis(200));
            let after = servers
                .iter()
                .zip(before)
                .map(|(s, b)| s.accepted() - b)
                .collect();
            Ok((conns, after))
        };
        let (mut first, counts) = hold(20)?;
        ensure!(
            counts == [10, 10, 0],
            "20 connections over b1 and b2: {counts:?}"
        );
        ensure!(
            active_flows(&xlb, &vip, topo)? == [10, 10, 0],
            "open flows: {:?}",
            active_flows(&xlb, &vip, topo)?
        );
        let b3 = SocketAddrV4::new(topo.backends[2].addr, PORT).to_string();
        let out = xlb.command(&["backend", "weight", &vip, &b3, "1"])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (second, counts) = hold(10)?;
        ensure!(
            counts == [0, 0, 10],
            "with b3 back, the next 10: {counts:?}"
        );
        for (i, c) in first.iter_mut().enumerate() {
            c.echo("still")
                .with_context(|| format!("first-batch connection {i}"))?;
        }
        drop(first);
        drop(second);
        // Closed flows come off at the sweeper's next pass (about a second).
        let closed = std::time::Instant::now();
        loop {
            let active = active_flows(&xlb, &vip, topo)?;
            if active == [0, 0, 0] {
                break;
            }
            ensure!(
                closed.elapsed() < Duration::from_secs(5),
                "open flows 5 s after every connection closed: {active:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        xlb.stop()?;
        Ok(())
    });
}

/// Least-response-time: b2 answers its HTTP health checks 150 ms late, b1 and b3 at once.
/// Of 30 connections held open, b2 gets at most a third of what the slower of the fast
/// ones gets (none while the fast ones answer within 9 ms: 150 ms × 1 stays above
/// 9 ms × 16; a loaded machine's checks may be slower, up to some 50 ms before b2's share
/// grows past a third). The clients' flows are told from the health checks by their
/// source, the SNAT address.
#[test]
fn least_response_time_avoids_the_slow_backend() {
    use xlb_tests::slow_http::SlowHttpServer;
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = topo
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let delay = Duration::from_millis(if i == 1 { 150 } else { 0 });
                SlowHttpServer::start(&b.ns, SocketAddr::from((b.addr, PORT)), delay)
            })
            .collect::<Result<Vec<_>>>()?;
        let health = "[service.health]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 300\n\
                      timeout_ms = 250\nrise = 1\nfall = 3\n";
        let cfg = config(topo, &[(PORT, "least-response-time")], [1, 1, 1]) + health;
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        // Every backend up and measured, then a few more checks' worth of response times.
        let vip = format!("{VIP}:{PORT}");
        let started = std::time::Instant::now();
        loop {
            let list = xlb.backends(&vip)?;
            let ready = list.len() == 3
                && list
                    .values()
                    .all(|b| b["state"] == "up" && b["response_ms"].is_number());
            if ready {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(5),
                "backends not all up and measured: {list:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(900));
        let target: SocketAddr = SocketAddr::from((VIP, PORT));
        let conns = (0..30)
            .map(|_| EchoConn::connect(&topo.client, target, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_millis(200));
        let from_clients: Vec<u64> = servers
            .iter()
            .map(|s| s.accepted_from(std::net::IpAddr::V4(SNAT)))
            .collect();
        let fast = from_clients[0].min(from_clients[2]);
        ensure!(
            from_clients.iter().sum::<u64>() == 30 && from_clients[1] * 3 <= fast,
            "connections per backend (b2 is the slow one): {from_clients:?}"
        );
        drop(conns);
        xlb.stop()?;
        Ok(())
    });
}

/// QUIC connection-ID routing: on a `quic = true` UDP service, short-header datagrams from
/// twenty fresh source ports (a connection migrating, twenty times) that carry b3's
/// `quic_id` all reach b3; long-header ones (handshakes) and unknown ids spread by the
/// scheduler as any UDP flow.
#[test]
fn quic_short_headers_follow_their_connection_id() {
    use xlb_tests::client::udp_request_with;
    use xlb_tests::servers::BackendServers;
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let _servers = BackendServers::start(topo)?;
        let mut cfg = format!(
            "[dataplane]\ninterfaces = {:?}\n\n[[service]]\nvip = \"{VIP}:443\"\n\
             protocol = \"udp\"\nsnat = \"{SNAT}\"\nquic = true\n",
            topo.lb_interfaces()
        );
        for (i, b) in topo.backends.iter().enumerate() {
            cfg += &format!(
                "[[service.backend]]\naddress = \"{}:8080\"\nquic_id = {}\n",
                b.addr,
                i + 1
            );
        }
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let target = SocketAddr::from((VIP, 443));
        let answers = |payload: &[u8]| -> Result<std::collections::BTreeMap<String, u32>> {
            let mut by_server = std::collections::BTreeMap::new();
            for i in 0..20 {
                let reply = topo
                    .client
                    .enter(|| udp_request_with(target, payload, Duration::from_secs(2)))?
                    .with_context(|| format!("datagram {i}"))?;
                *by_server.entry(reply.answer.server).or_default() += 1;
            }
            Ok(by_server)
        };
        // Short header (0b01......), connection ID octet, then b3's id 3.
        let to_b3 = answers(&[0x41, 0x00, 0x00, 0x03, 0xaa, 0xbb, 0xcc, 0xdd])?;
        ensure!(
            to_b3.len() == 1 && to_b3.get("b3") == Some(&20),
            "short headers with b3's id went to {to_b3:?}"
        );
        let long = answers(&[0xc1, 0x00, 0x00, 0x03, 0xaa, 0xbb, 0xcc, 0xdd])?;
        ensure!(long.len() > 1, "long headers did not spread: {long:?}");
        let unknown = answers(&[0x41, 0x00, 0x77, 0x77, 0xaa, 0xbb, 0xcc, 0xdd])?;
        ensure!(
            unknown.len() > 1,
            "an unknown id did not spread: {unknown:?}"
        );
        xlb.stop()?;
        Ok(())
    });
}

/// The open-flow counts across a `kill -9` and an adoption: six connections open, three
/// closed and taken off, the daemon killed and started again; the three still open count
/// three, not less (no start is taken off twice: the sweeper's record of what it took off
/// is pinned), and once they close too the counts return to zero. No count ever hit the
/// floor the accounting logs about.
#[test]
fn open_flow_counts_survive_a_restart() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let _servers = EchoServer::on_backends(topo, PORT)?;
        let cfg = config(topo, &[(PORT, "least-conn")], [1, 1, 1]);
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let vip = format!("{VIP}:{PORT}");
        let target: SocketAddr = vip.parse()?;
        let total =
            |xlb: &XlbProcess| -> Result<u64> { Ok(active_flows(xlb, &vip, topo)?.iter().sum()) };
        let wait_total = |xlb: &XlbProcess, want: u64, what: &str| -> Result<()> {
            let started = std::time::Instant::now();
            while total(xlb)? != want {
                ensure!(
                    started.elapsed() < Duration::from_secs(5),
                    "{what}: {} open flows, expected {want}",
                    total(xlb)?
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        };
        let mut conns = (0..6)
            .map(|_| EchoConn::connect(&topo.client, target, Duration::from_secs(3)))
            .collect::<Result<Vec<_>>>()?;
        wait_total(&xlb, 6, "six open")?;
        conns.truncate(3);
        wait_total(&xlb, 3, "three closed")?;
        let mut pins = xlb.kill_leaving_pins();
        let xlb = XlbProcess::start_on_pins(&topo.lb, &cfg, &mut pins)?;
        // Two sweeps' worth: a start taken off again would show by now.
        std::thread::sleep(Duration::from_millis(2500));
        ensure!(
            total(&xlb)? == 3,
            "after the restart: {} open flows",
            total(&xlb)?
        );
        for (i, c) in conns.iter_mut().enumerate() {
            c.echo("still")
                .with_context(|| format!("connection {i} after the restart"))?;
        }
        drop(conns);
        wait_total(&xlb, 0, "all closed")?;
        ensure!(
            !xlb.logged("open-flow count was"),
            "a start was taken off more often than it was counted"
        );
        xlb.stop()?;
        Ok(())
    });
}
