//! The live control plane, through the real `xlb` commands against a running daemon: backends
//! added, weighted, drained and removed under 200 open connections that keep echoing, while
//! new connections follow the new set in proportion; health checks that take a dead backend
//! out and bring it back; the counters the API and the metrics report against what the
//! servers saw; an invalid `xlb apply`; the API socket closed to other users; every
//! command's answer to a bad argument or a missing daemon; and a start refused for want of
//! memory, the host's or a memory cgroup's.
//!
//! Needs root, the `xlb` binary (`$XLB_BIN`) and `ip`, `ethtool`, `ping`, `setpriv`, `sh`,
//! `nsenter`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::config::{ConntrackConfig, MAX_CONNTRACK_FLOWS};
use serde_json::Value;
use xlb_tests::echo::{self, EchoConn, EchoServer, raise_fd_limit};
use xlb_tests::lab;
use xlb_tests::topology::{Options, SNAT, SNAT6, Topology, VIP, VIP6, with_topology};
use xlb_tests::xlb::{LeftPins, XlbProcess, xlb_command};

const PREFIX: &str = "xlbcp";
const ECHO_PORT: u16 = 7007;
/// Long-lived connections held open through every change.
const LONG_LIVED: usize = 200;
/// New connections after each change, whose spread is checked.
const NEW_PER_STEP: usize = 240;
/// How far a backend's share of new connections may stray from its weight's share: five
/// standard deviations of a binomial share at 240 draws is about 0.14 at worst (p = 0.5).
const SHARE_TOLERANCE: f64 = 0.14;

/// TCP health checks every 200 ms: down after 2 failures, up after 2 successes.
const TCP_HEALTH: &str =
    "[service.health]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n";

fn vip() -> String {
    format!("{VIP}:{ECHO_PORT}")
}

fn backend(topo: &Topology, i: usize) -> String {
    SocketAddrV4::new(topo.backends[i].addr, ECHO_PORT).to_string()
}

fn config(topo: &Topology, backends: &[(usize, u32)], health: &str) -> String {
    let list: String = backends
        .iter()
        .map(|&(i, w)| {
            format!(
                "[[service.backend]]\naddress = \"{}\"\nweight = {w}\n",
                backend(topo, i)
            )
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = {:?}\n\n[[service]]\nvip = \"{}\"\nprotocol = \"tcp\"\n\
         snat = \"{SNAT}\"\n{list}{health}",
        topo.lb_interfaces(),
        vip()
    )
}

fn json(xlb: &XlbProcess, args: &[&str]) -> Result<Value> {
    xlb.json(args)
}

/// The service's backends as `xlb backend ls -o json` shows them, by address.
fn backends(xlb: &XlbProcess) -> Result<BTreeMap<String, Value>> {
    xlb.backends(&vip())
}

/// Every long-lived connection echoes a line.
fn all_echo(conns: &mut [EchoConn], step: &str) -> Result<()> {
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&format!("{step} {i}"))
            .with_context(|| format!("long-lived connection {i} after {step}"))?;
    }
    Ok(())
}

/// Opens `n` new connections to the VIP one by one and returns how many each backend's
/// server accepted meanwhile.
fn spread(topo: &Topology, servers: &[EchoServer], n: usize) -> Result<Vec<u64>> {
    echo::spread(&topo.client, servers, vip().parse()?, None, n)
}

/// Checks that `counts` follow `weights` (per backend index) within the tolerance.
fn check_shares(counts: &[u64], weights: &[u32], step: &str) -> Result<()> {
    echo::check_shares(counts, weights, SHARE_TOLERANCE, step)
}

fn run_ok(xlb: &XlbProcess, args: &[&str]) -> Result<String> {
    let out = xlb.command(args)?;
    ensure!(
        out.status.success(),
        "xlb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// 200 echo connections stay open and working while b3 is added, b1 reweighted, b2 drained
/// and then removed, each with the command a user types; after each change new connections
/// spread by the new weights; and the per-backend flow counters of `xlb stats` equal the
/// connections each server accepted. Last, `backend rm --cut` removes b1's flows.
#[test]
fn backends_change_under_open_connections() {
    with_topology(PREFIX, Options::default(), |topo| {
        raise_fd_limit(4096)?;
        topo.check_connectivity()?;
        let servers = EchoServer::on_backends(topo, ECHO_PORT)?;
        let xlb = XlbProcess::start(&topo.lb, &config(topo, &[(0, 1), (1, 1)], ""))?;
        let target: SocketAddr = vip().parse()?;
        let mut conns = (0..LONG_LIVED)
            .map(|i| {
                EchoConn::connect(&topo.client, target, Duration::from_secs(3))
                    .with_context(|| format!("long-lived connection {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        all_echo(&mut conns, "start")?;
        check_shares(
            &spread(topo, &servers, NEW_PER_STEP)?,
            &[1, 1, 0],
            "at start",
        )?;

        let b = |i| backend(topo, i);
        let steps: [(&str, Vec<String>, [u32; 3]); 4] = [
            (
                "add b3",
                vec![
                    "backend".into(),
                    "add".into(),
                    vip(),
                    b(2),
                    "--weight".into(),
                    "2".into(),
                ],
                [1, 1, 2],
            ),
            (
                "reweight b1",
                vec!["backend".into(), "weight".into(), vip(), b(0), "3".into()],
                [3, 1, 2],
            ),
            (
                "drain b2",
                vec!["backend".into(), "drain".into(), vip(), b(1)],
                [3, 0, 2],
            ),
            (
                "remove b2",
                vec!["backend".into(), "rm".into(), vip(), b(1)],
                [3, 0, 2],
            ),
        ];
        for (step, args, weights) in &steps {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            run_ok(&xlb, &args)?;
            ensure!(
                started.elapsed() < Duration::from_secs(2),
                "{step} took {:?}",
                started.elapsed()
            );
            all_echo(&mut conns, step)?;
            check_shares(&spread(topo, &servers, NEW_PER_STEP)?, weights, step)?;
            if *step == "drain b2" {
                let state = &backends(&xlb)?[&b(1)]["state"];
                ensure!(state == "draining", "b2 after drain: state {state}");
            }
        }
        ensure!(
            !backends(&xlb)?.contains_key(&b(1)),
            "b2 is still listed after rm"
        );

        // The counters: each backend's flows counter is the connections its server accepted
        // (b2's id is retired with its counters; b1 and b3 kept theirs through every change).
        let stats = json(&xlb, &["stats"])?;
        let service = &stats["services"][0];
        for i in [0, 2] {
            let counted = service["backends"]
                .as_array()
                .context("backends")?
                .iter()
                .find(|x| x["address"] == b(i).as_str())
                .with_context(|| format!("{} missing from stats", b(i)))?["flows"]
                .as_u64()
                .unwrap_or(0);
            ensure!(
                counted == servers[i].accepted(),
                "backend {}: xlb counted {counted} flows, its server accepted {}",
                b(i),
                servers[i].accepted()
            );
        }

        // Cut: b1's open flows are removed with it; nothing in conntrack points at it after.
        let cut = json(&xlb, &["backend", "rm", &vip(), &b(0), "--cut"])?;
        ensure!(
            cut["flows_cut"].as_u64().unwrap_or(0) > 0,
            "backend rm --cut removed no flows: {cut}"
        );
        let flows = json(&xlb, &["conntrack", "ls", "--limit", "100000"])?;
        let on_b1 = flows
            .as_array()
            .context("conntrack ls: not a list")?
            .iter()
            .filter(|f| f["backend"] == b(0).as_str())
            .count();
        ensure!(
            on_b1 == 0,
            "{on_b1} flows still point at the removed backend"
        );
        drop(conns);
        xlb.stop()?;
        Ok(())
    });
}

/// With TCP health checks every 200 ms, `fall = 2`: b2's server dies, and within
/// `fall × interval` plus one interval (and a little for the test's polling) it is shown
/// down, after which every new connection succeeds; it is shown up again after `rise`
/// successes once its server is back, and takes new connections again.
#[test]
fn a_dead_backend_is_taken_out_and_brought_back() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let mut servers: Vec<Option<EchoServer>> = EchoServer::on_backends(topo, ECHO_PORT)?
            .into_iter()
            .map(Some)
            .collect();
        let xlb = XlbProcess::start(
            &topo.lb,
            &config(topo, &[(0, 1), (1, 1), (2, 1)], TCP_HEALTH),
        )?;
        let b2 = backend(topo, 1);
        let state = |xlb: &XlbProcess| -> Result<String> {
            Ok(backends(xlb)?[&b2]["state"]
                .as_str()
                .unwrap_or("")
                .to_string())
        };
        ensure!(state(&xlb)? == "up", "b2 before: {}", state(&xlb)?);

        servers[1] = None;
        let died = Instant::now();
        let limit = Duration::from_millis(3 * 200 + 400);
        while state(&xlb)? != "down" {
            ensure!(
                died.elapsed() < limit,
                "b2 still up {:?} after its server died",
                died.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let target: SocketAddr = vip().parse()?;
        for i in 0..100 {
            let mut c = EchoConn::connect(&topo.client, target, Duration::from_secs(3))
                .with_context(|| format!("connection {i} with b2 down"))?;
            c.echo("hello")
                .with_context(|| format!("connection {i} with b2 down"))?;
        }
        let stats = json(&xlb, &["stats"])?;
        ensure!(
            stats["reasons"]["drop/no_backend"].as_u64() == Some(0),
            "new flows were dropped: {}",
            stats["reasons"]
        );

        servers[1] = Some(EchoServer::start(
            &topo.backends[1].ns,
            SocketAddr::from((topo.backends[1].addr, ECHO_PORT)),
        )?);
        let back = Instant::now();
        while state(&xlb)? != "up" {
            ensure!(
                back.elapsed() < limit,
                "b2 still down {:?} after its server came back",
                back.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let live: Vec<EchoServer> = servers.into_iter().flatten().collect();
        let counts = spread(topo, &live, 120)?;
        ensure!(
            counts[1] > 0,
            "b2 took no new connections after it came back: {counts:?}"
        );
        xlb.stop()?;
        Ok(())
    });
}

/// An invalid `xlb apply` names the field, exits non-zero and changes nothing; a valid one
/// makes the file the truth (undoing an API change). A metrics scrape agrees with the
/// servers. The API socket is root's alone.
#[test]
fn apply_metrics_and_the_socket() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let servers = EchoServer::on_backends(topo, ECHO_PORT)?;
        let good = config(topo, &[(0, 1), (1, 1)], "");
        let xlb = XlbProcess::start(&topo.lb, &good)?;
        let before = backends(&xlb)?;

        let bad = good.replace("weight = 1", "weight = \"heavy\"");
        let path = std::env::temp_dir().join(format!("xlbcp-bad-{}.toml", std::process::id()));
        std::fs::write(&path, &bad)?;
        let out = xlb.command(&["apply", "--config", path.to_str().context("path")?])?;
        let _ = std::fs::remove_file(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "apply of an invalid file succeeded");
        ensure!(
            stderr.contains("weight"),
            "the error does not name the field: {stderr}"
        );
        ensure!(
            backends(&xlb)? == before,
            "an invalid apply changed the backends"
        );

        // A valid file that cannot run live (another Maglev size) is refused, naming it.
        let resized = good.replace("[dataplane]\n", "[dataplane]\nmaglev_table_size = 251\n");
        std::fs::write(&path, &resized)?;
        let out = xlb.command(&["apply", "--config", path.to_str().context("path")?])?;
        let _ = std::fs::remove_file(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("dataplane.maglev_table_size"),
            "resize: {stderr}"
        );

        // An API change, then `apply` of the original file undoes it.
        run_ok(&xlb, &["backend", "add", &vip(), &backend(topo, 2)])?;
        ensure!(backends(&xlb)?.len() == 3, "backend add did not add");
        std::fs::write(&path, &good)?;
        run_ok(&xlb, &["apply", "--config", path.to_str().context("path")?])?;
        let _ = std::fs::remove_file(&path);
        ensure!(
            backends(&xlb)?.len() == 2,
            "apply did not make the file the truth"
        );

        // SIGHUP does the same with the daemon's own file.
        run_ok(&xlb, &["backend", "add", &vip(), &backend(topo, 2)])?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our running child.
        unsafe { libc::kill(xlb.pid() as i32, libc::SIGHUP) };
        let sent = Instant::now();
        while backends(&xlb)?.len() != 2 {
            ensure!(
                sent.elapsed() < Duration::from_secs(5),
                "SIGHUP did not re-apply the file"
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        // A service added without --snat gets the first interface's address, which is
        // the host's own: the running SNAT ports (the full range, since the config's SNAT
        // address is not the host's) overlap the host's ephemeral ports, so it is refused,
        // saying why, rather than let replies to the host's own connections be taken.
        let out = xlb.command(&["service", "add", "10.10.0.100:9999"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains("snat_port_range")
                && stderr.contains("ephemeral"),
            "service add with the host's address as SNAT: {} {stderr}",
            out.status
        );
        run_ok(
            &xlb,
            &[
                "service",
                "add",
                "10.10.0.100:9999",
                "--snat",
                &SNAT.to_string(),
            ],
        )?;
        run_ok(&xlb, &["service", "rm", "10.10.0.100:9999"])?;
        let services = json(&xlb, &["service", "ls"])?;
        ensure!(
            services.as_array().map(Vec::len) == Some(1),
            "service ls after add and rm: {services}"
        );

        // The host takes the SNAT address while xlb runs (an operator adds it to an
        // interface): the running SNAT ports, fixed while xlb runs, now overlap the host's
        // ephemeral ones. Changes that add no address to that conflict still go through
        // (refused, even a dead backend would stay until a restart); one that adds an
        // address of the host is refused, naming it.
        let snat_on_lo = format!("{SNAT}/32");
        topo.lb.ip(&["addr", "add", &snat_on_lo, "dev", "lo"])?;
        let under_conflict = (|| -> Result<()> {
            run_ok(&xlb, &["backend", "add", &vip(), &backend(topo, 2)])?;
            run_ok(&xlb, &["backend", "rm", &vip(), &backend(topo, 2)])?;
            let out = xlb.command(&["service", "add", "10.10.0.100:9999"])?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                !out.status.success() && stderr.contains("no more are taken on"),
                "service add with the host's address as SNAT, the running one the host's \
                 too: {} {stderr}",
                out.status
            );
            Ok(())
        })();
        topo.lb.ip(&["addr", "del", &snat_on_lo, "dev", "lo"])?;
        under_conflict?;
        ensure!(
            backends(&xlb)?.len() == 2,
            "the backends after the conflict"
        );

        // Traffic, then the metrics against the servers.
        let counts = spread(topo, &servers, 60)?;
        let metrics = topo.lb.enter(|| scrape("127.0.0.1:9641"))??;
        for i in [0, 1] {
            let line = format!(
                "xlb_backend_flows_total{{service=\"{}/tcp\",backend=\"{}\"}} {}",
                vip(),
                backend(topo, i),
                servers[i].accepted()
            );
            ensure!(
                metrics.contains(&line),
                "metrics lack {line:?} (new: {counts:?}):\n{metrics}"
            );
        }
        ensure!(
            metrics.contains("xlb_conntrack_capacity_flows "),
            "no capacity metric"
        );

        // The socket: mode 0600, and a user other than root is refused.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(xlb.socket())?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "the API socket has mode {mode:o}");
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(xlb_tests::xlb::xlb_binary()?)
            .args(["status", "--socket"])
            .arg(xlb.socket())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("permission denied"),
            "a non-root user reached the API: {} {stderr}",
            out.status
        );
        xlb.stop()?;
        Ok(())
    });
}

/// What cannot work is refused before anything changes: the first IPv6 service while the
/// interfaces do not forward IPv6 (the FIB would refuse its every packet, and the service
/// would be dead with only a counter to say so); a daemon whose pin path is not on bpffs,
/// which must leave what is there alone; and a conntrack table larger than the memory xlb
/// may take.
#[test]
fn what_cannot_work_is_refused_before_anything_changes() {
    with_topology(PREFIX, Options::default(), |topo| {
        let cfg = config(topo, &[(0, 1)], "");
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let vip6 = SocketAddrV6::new(VIP6, 80, 0, 0).to_string();
        let add_v6 = ["service", "add", &vip6, "--snat", &SNAT6.to_string()];
        topo.lb
            .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=0"])?;
        let out = xlb.command(&add_v6)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("IPv6 forwarding is off"),
            "an IPv6 service without IPv6 forwarding: {} {stderr}",
            out.status
        );
        let services = json(&xlb, &["service", "ls"])?;
        ensure!(
            services.as_array().map(Vec::len) == Some(1),
            "a refused service add changed the services: {services}"
        );
        topo.lb
            .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        run_ok(&xlb, &add_v6)?;
        xlb.stop()?;

        let dir = xlb_tests::xlb::test_path(&std::env::temp_dir(), "pins-off-bpffs");
        std::fs::create_dir_all(&dir)?;
        let mut pins = LeftPins::at(dir.clone());
        let users = dir.join("xlb.toml");
        std::fs::write(&users, "the user's own file")?;
        let started = XlbProcess::start_on_pins(&topo.lb, &cfg, &mut pins);
        let kept = std::fs::read_to_string(&users);
        let _ = std::fs::remove_dir_all(&dir);
        match started {
            Ok(xlb) => {
                xlb.stop()?;
                bail!("xlb started with its pin path in {}", dir.display())
            }
            Err(e) => ensure!(
                format!("{e:#}").contains("is not on bpffs"),
                "the refusal does not say why: {e:#}"
            ),
        }
        ensure!(
            kept.ok().as_deref() == Some("the user's own file"),
            "a failed start touched a file in its pin path"
        );

        // A conntrack table twice the size of the memory xlb may take (the host's available
        // memory, or its cgroup's room): refused before the kernel is asked for it, and
        // nothing pinned. (The largest table there is, 2^27 flows, takes 44 GiB: a host with
        // more than that available cannot be asked.)
        let room = lb_userspace::memory::room()?.bytes;
        let flows = (room * 2 / 352).min(u64::from(MAX_CONNTRACK_FLOWS)) as u32;
        let needed = ConntrackConfig {
            entries: flows,
            ..ConntrackConfig::default()
        }
        .table_bytes();
        if needed <= room {
            eprintln!("skipped the memory refusal: xlb may take {room} bytes");
            return Ok(());
        }
        let huge = cfg.replace(
            "[dataplane]\n",
            &format!("[conntrack]\nentries = {flows}\n[dataplane]\n"),
        );
        let dir = xlb_tests::xlb::test_pin_path("mem");
        let mut pins = LeftPins::at(dir.clone());
        match XlbProcess::start_on_pins(&topo.lb, &huge, &mut pins) {
            Ok(xlb) => {
                xlb.stop()?;
                bail!("xlb started with {flows} flows of conntrack where it may take {room} bytes")
            }
            Err(e) => ensure!(
                format!("{e:#}").contains("(the table is preallocated), "),
                "the refusal does not say why: {e:#}"
            ),
        }
        let pinned: Vec<_> = std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(pinned.is_empty(), "a refused start pinned {pinned:?}");
        Ok(())
    });
}

/// Under a memory cgroup's limit (a systemd `MemoryMax`, a container's), the kernel charges
/// the data plane's maps to xlb's cgroup, whatever the host has free: `xlb run` refuses a
/// conntrack table larger than the room under the limit, says which cgroup and limit, and
/// pins nothing. Without the check the kernel would fail the map, or kill xlb.
#[test]
fn a_table_larger_than_its_memory_cgroup_allows_is_refused() {
    xlb_tests::require_root().unwrap();
    let run = || -> Result<()> {
        const LIMIT: u64 = 64 << 20;
        xlb_tests::netns::cleanup_stale(PREFIX)?;
        let base = format!("{}-cg", xlb_tests::netns::unique_base(PREFIX));
        let xlb = xlb_tests::xlb::xlb_binary()?;
        let cgroup = xlb_tests::cgroup::MemoryCgroup::create(PREFIX, &base, LIMIT)?;
        let ns = xlb_tests::netns::NetNs::create(&base)?;
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // 262,144 flows: 524,288 entries of 160 bytes and as many 16-byte buckets, 88 MiB,
        // and 12 MiB of buckets of the maps sized with the table; two services' Maglev
        // tables, 1 MiB.
        let config = xlb_tests::xlb::test_path(&std::env::temp_dir(), &format!("{base}.toml"));
        std::fs::write(
            &config,
            "[dataplane]\ninterfaces = [\"lo\"]\nmax_services = 2\n\
             [conntrack]\nentries = 262144\n",
        )?;
        let socket = config.with_extension("sock");
        let pins = xlb_tests::xlb::test_pin_path(&base);
        // The shell moves itself into the cgroup, then becomes xlb (same pid).
        let script = "echo $$ > \"$1\" && exec nsenter --net=\"$2\" -- \"$3\" run \
                      --config \"$4\" --socket \"$5\" --pin-path \"$6\"";
        let args = [
            cgroup.procs(),
            ns.path(),
            xlb,
            config.clone(),
            socket.clone(),
            pins.clone(),
        ]
        .map(|p| p.display().to_string());
        let mut argv = vec!["-c", script, "sh"];
        argv.extend(args.iter().map(String::as_str));
        let out = xlb_tests::cmd::run_unchecked("sh", &argv, Duration::from_secs(30));
        let _ = std::fs::remove_file(&config);
        let _ = std::fs::remove_file(&socket);
        let pinned = pins.exists();
        let _ = std::fs::remove_dir_all(&pins);
        let out = out?;
        let stderr = &out.stderr;
        ensure!(
            !out.status.success(),
            "xlb ran under a 64 MiB limit: {stderr}"
        );
        let expected = format!(
            "the memory cgroup that holds xlb ({}) has ",
            cgroup.dir().display()
        );
        ensure!(
            stderr.contains("100 MiB of conntrack for [conntrack] entries = 262144 flows")
                && stderr.contains(&expected)
                && stderr
                    .contains("under its limit of 64 MiB: lower them, or raise the cgroup's limit"),
            "the refusal does not name the cgroup's limit: {stderr}"
        );
        ensure!(!pinned, "a refused start pinned {}", pins.display());
        Ok(())
    };
    run().unwrap();
}

/// The managed neighbour entries follow the backends: a removed backend's entry stays while
/// its flows are open (they are still sent to it), then goes (the kernel would probe a host
/// nobody sends to for ever); one added again comes back.
#[test]
fn managed_neighbour_entries_follow_the_backends() {
    with_topology(PREFIX, Options::default(), |topo| {
        let _servers = EchoServer::on_backends(topo, ECHO_PORT)?;
        // Closed flows leave the table a second after their close.
        let cfg = config(topo, &[(1, 1)], "")
            + "[conntrack]\ntcp_closing_timeout = 1\ntcp_time_wait_timeout = 1\n";
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        // A connection to backend 1, the only one, open through its removal.
        let mut open = EchoConn::connect(&topo.client, vip().parse()?, Duration::from_secs(3))?;
        open.echo("before")?;
        run_ok(&xlb, &["backend", "add", &vip(), &backend(topo, 0)])?;
        // Whether the LB's neighbour table holds a managed entry for backend `i`.
        let managed = |i: usize| -> Result<bool> {
            let table = topo.lb.ip(&["neigh", "show"])?.stdout;
            let addr = topo.backends[i].addr.to_string();
            Ok(table.lines().any(|l| {
                l.split_whitespace().next() == Some(addr.as_str()) && l.contains("managed")
            }))
        };
        let wait = |i: usize, want: bool, step: &str| -> Result<()> {
            let since = Instant::now();
            while managed(i)? != want {
                ensure!(
                    since.elapsed() < Duration::from_secs(10),
                    "{step}: backend {i}'s entry is {}managed after 10 s",
                    if want { "not " } else { "still " }
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        };
        wait(0, true, "backend add")?;
        wait(1, true, "at start")?;
        run_ok(&xlb, &["backend", "rm", &vip(), &backend(topo, 1)])?;
        // Three seconds: sweeps that find the open flow.
        std::thread::sleep(Duration::from_secs(3));
        ensure!(
            managed(1)?,
            "backend 1's entry went while a flow to it was open"
        );
        open.echo("after the removal")?;
        // Closed both ways, the flow leaves the table after time-wait; the sweep that finds
        // the backend without flows frees its id, and its entry goes.
        drop(open);
        wait(1, false, "the removed backend's last flow closed")?;
        ensure!(managed(0)?, "removing backend 1 took backend 0's entry");
        run_ok(&xlb, &["backend", "add", &vip(), &backend(topo, 1)])?;
        wait(1, true, "backend add")?;
        xlb.stop()?;
        Ok(())
    });
}

/// GET /metrics over plain HTTP/1.0.
fn scrape(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    ensure!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    Ok(text)
}

/// Commands with no daemon, a wrong socket, or bad arguments say what is wrong and exit
/// non-zero; none panics.
#[test]
fn commands_explain_bad_arguments_and_missing_daemons() -> Result<()> {
    let missing = std::env::temp_dir().join(format!("xlbcp-none-{}.sock", std::process::id()));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "status".into(),
                "--socket".into(),
                missing.display().to_string(),
            ],
            "no xlb daemon at",
        ),
        (
            vec!["stats".into(), "--socket".into(), "/proc/version".into()],
            "xlb daemon",
        ),
        (
            vec![
                "backend".into(),
                "add".into(),
                "10.0.0.1:80".into(),
                "nonsense".into(),
            ],
            "invalid value",
        ),
        (
            vec!["service".into(), "add".into(), "10.0.0.1".into()],
            "invalid value",
        ),
        (
            vec![
                "backend".into(),
                "weight".into(),
                "10.0.0.1:80".into(),
                "10.0.0.2:80".into(),
                "-1".into(),
            ],
            "unexpected argument",
        ),
        (
            vec![
                "run".into(),
                "--config".into(),
                "x.toml".into(),
                "--stats-interval".into(),
                "0".into(),
            ],
            "0 is not in 1..",
        ),
        (
            vec!["service".into(), "ls".into(), "-o".into(), "yaml".into()],
            "invalid value",
        ),
    ];
    // A daemon that takes connections but never answers (stopped, or stuck): the kernel
    // queues the connection, and only a timeout ends the wait.
    let stuck = std::env::temp_dir().join(format!("xlbcp-stuck-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&stuck);
    let _listener = std::os::unix::net::UnixListener::bind(&stuck)?;
    let asked = Instant::now();
    let out = xlb_command(&[
        "status",
        "--timeout",
        "1",
        "--socket",
        &stuck.to_string_lossy(),
    ]);
    let waited = asked.elapsed();
    let _ = std::fs::remove_file(&stuck);
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("no answer within 1 s"),
        "xlb status on a daemon that never answers: {} {stderr}",
        out.status
    );
    ensure!(waited < Duration::from_secs(10), "it waited {waited:?}");
    for (args, expect) in cases {
        let out = xlb_command(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "xlb {args:?} succeeded");
        ensure!(
            !stderr.contains("panicked"),
            "xlb {args:?} panicked: {stderr}"
        );
        ensure!(
            stderr.contains(expect),
            "xlb {args:?} said {stderr:?}, expected {expect:?}"
        );
    }
    Ok(())
}

/// `kill -9` of the daemon under load breaks nothing: with no daemon the data plane goes on
/// forwarding open connections and taking new ones. A new `xlb run` with another conntrack
/// capacity is refused, naming the setting, and changes nothing; one with the same config
/// adopts the pinned data plane: every open connection keeps working, the program is
/// replaced in place (a new program id), and the counters carry on — each backend's flows
/// counter still equals the connections its server accepted, across both daemons. A
/// conntrack table pinned by an xlb from before preallocation is adopted with a warning. A
/// clean stop unpins everything.
#[test]
fn a_killed_daemon_breaks_nothing_and_the_next_one_adopts_the_data_plane() {
    with_topology(PREFIX, Options::default(), |topo| {
        raise_fd_limit(4096)?;
        topo.check_connectivity()?;
        let servers = EchoServer::on_backends(topo, ECHO_PORT)?;
        let cfg = config(topo, &[(0, 1), (1, 1), (2, 1)], "");
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let program_before = json(&xlb, &["status"])?["program_id"].clone();
        let target: SocketAddr = vip().parse()?;
        let mut conns = (0..150)
            .map(|i| {
                EchoConn::connect(&topo.client, target, Duration::from_secs(3))
                    .with_context(|| format!("long-lived connection {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        all_echo(&mut conns, "start")?;
        spread(topo, &servers, 60)?;

        let mut pins = xlb.kill_leaving_pins();
        let pin_path = pins.path().context("the pins")?.to_path_buf();
        all_echo(&mut conns, "kill -9")?;
        let while_dead = spread(topo, &servers, 60)?;
        ensure!(
            while_dead.iter().sum::<u64>() == 60,
            "new connections with no daemon: {while_dead:?}"
        );

        let resized = cfg.replace(
            "[dataplane]\n",
            "[conntrack]\nentries = 1000\n[dataplane]\n",
        );
        match XlbProcess::start_on_pins(&topo.lb, &resized, &mut pins) {
            Ok(_) => bail!("xlb adopted a data plane of another conntrack capacity"),
            Err(e) => {
                let text = format!("{e:#}");
                ensure!(
                    text.contains("conntrack.entries"),
                    "the refusal does not name the setting: {text}"
                );
            }
        }
        all_echo(&mut conns, "a refused start")?;

        let xlb = XlbProcess::start_on_pins(&topo.lb, &cfg, &mut pins)?;
        xlb.said_at_start("adopted the data plane", "it adopted the data plane")?;
        all_echo(&mut conns, "restart")?;
        spread(topo, &servers, 60)?;
        let status = json(&xlb, &["status"])?;
        ensure!(
            status["program_id"] != program_before,
            "the program was not replaced"
        );
        for i in status["interfaces"].as_array().context("interfaces")? {
            ensure!(i["mode"] == "native", "after the restart: {i}");
        }
        let stats = json(&xlb, &["stats"])?;
        for (i, server) in servers.iter().enumerate() {
            let counted = stats["services"][0]["backends"]
                .as_array()
                .context("backends")?
                .iter()
                .find(|x| x["address"] == backend(topo, i).as_str())
                .with_context(|| format!("{} missing", backend(topo, i)))?["flows"]
                .as_u64()
                .unwrap_or(0);
            ensure!(
                counted == server.accepted(),
                "backend {}: {counted} flows counted across the restart, its server accepted {}",
                backend(topo, i),
                server.accepted()
            );
        }
        drop(conns);

        // A data plane an xlb from before preallocation left: adopted, with a warning. (Its
        // table is a new, empty one here: the flows of this test are done.)
        let mut pins = xlb.kill_leaving_pins();
        let table = pin_path.join("CONNTRACK");
        std::fs::remove_file(&table)?;
        lab::pin_conntrack_without_preallocation(&table, ConntrackConfig::default().map_entries())?;
        let xlb = XlbProcess::start_on_pins(&topo.lb, &cfg, &mut pins)?;
        xlb.said_at_start(
            "warning: the adopted conntrack table",
            "that the adopted table is not preallocated",
        )?;
        xlb.stop()?;
        ensure!(
            !pin_path.exists(),
            "a clean stop left {} pinned",
            pin_path.display()
        );
        Ok(())
    });
}

/// `xlb doctor` fails a config whose interface is missing, naming it, and passes the host's
/// own checks; `xlb completions` prints a completion script.
#[test]
fn doctor_and_completions() -> Result<()> {
    let path = std::env::temp_dir().join(format!("xlbcp-doctor-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[dataplane]\ninterfaces = [\"xlbnosuch0\"]\n[[service]]\nvip = \"10.10.0.100:80\"\n\
         protocol = \"tcp\"\nsnat = \"10.20.0.1\"\n",
    )?;
    let out = xlb_command(&["doctor", "--config", path.to_str().context("path")?])?;
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success(),
        "doctor passed a missing interface:\n{stdout}"
    );
    ensure!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("xlbnosuch0")),
        "doctor did not name the missing interface:\n{stdout}"
    );
    for name in ["kernel", "bpffs", "daemon"] {
        ensure!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "doctor's {name} check did not pass on this host:\n{stdout}"
        );
    }
    let out = xlb_command(&["completions", "bash"])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("_xlb()"),
        "no bash completions"
    );
    Ok(())
}

/// A backend its health checks took out before `kill -9` is still out after the next daemon
/// adopts the data plane (until its checks pass), and no new connection goes to it.
#[test]
fn a_backend_down_before_a_restart_stays_down() {
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        let mut servers: Vec<Option<EchoServer>> = EchoServer::on_backends(topo, ECHO_PORT)?
            .into_iter()
            .map(Some)
            .collect();
        let cfg = config(topo, &[(0, 1), (1, 1), (2, 1)], TCP_HEALTH);
        let xlb = XlbProcess::start(&topo.lb, &cfg)?;
        let b2 = backend(topo, 1);
        servers[1] = None;
        let died = Instant::now();
        while backends(&xlb)?[&b2]["state"] != "down" {
            ensure!(
                died.elapsed() < Duration::from_secs(3),
                "b2 never went down"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut pins = xlb.kill_leaving_pins();
        let xlb = XlbProcess::start_on_pins(&topo.lb, &cfg, &mut pins)?;
        let state = backends(&xlb)?[&b2]["state"].clone();
        ensure!(state == "down", "b2 right after the restart: {state}");
        let target: SocketAddr = vip().parse()?;
        for i in 0..60 {
            let mut c = EchoConn::connect(&topo.client, target, Duration::from_secs(3))
                .with_context(|| format!("connection {i} after the restart"))?;
            c.echo("hello")
                .with_context(|| format!("connection {i} after the restart"))?;
        }
        xlb.stop()?;
        Ok(())
    });
}
