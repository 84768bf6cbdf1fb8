//! TCP end to end (`cargo xtask bench`): new connections per second and bulk throughput from
//! the client namespace to three nginx backends, through xlb (full NAT in XDP), through the
//! kernel's own NAT (nftables DNAT + SNAT, no XDP), and through HAProxy in TCP mode: one
//! after another on the same topology, with the same backends and the same client (wrk), in
//! rounds of all three in turn; each figure is the median of its rounds', and each ratio
//! of two ways the median of the rounds' own ratios.
//!
//! * Connections: `wrk -c 32` with `Connection: close`, so every request is a new TCP
//!   connection (and a new flow for xlb and nftables); requests per second = connections
//!   per second.
//! * Throughput: `wrk -c 4` fetching a 32 MiB file over kept-alive connections.
//!
//! Everything runs on the same two cores (client, backends, the load balancer), so the
//! figures are for comparing the three side by side, not absolute capacities. Under
//! `cargo test` (no `--bench`) there is one round of one-second measurements: a smoke run
//! that keeps the benchmark working.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use xlb_tests::cmd;
use xlb_tests::figures::{CpuTime, Run, machine, median, steal_pct_since, steal_words};
use xlb_tests::netns::NetNs;
use xlb_tests::topology::{
    BACKEND_PORT, LB_INTERFACES, Options, SNAT, Topology, VIP, VIP_TCP_PORT, with_topology,
};
use xlb_tests::xlb::XlbProcess;

const PREFIX: &str = "xlbtcp";
const BIG_FILE_BYTES: usize = 32 << 20;
const CONNECTION_CLIENTS: u32 = 32;
const BULK_CLIENTS: u32 = 4;

/// The three ways through the load balancer's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    Xlb,
    Nftables,
    Haproxy,
}

impl Way {
    const ALL: [Way; 3] = [Way::Xlb, Way::Nftables, Way::Haproxy];

    fn key(self) -> &'static str {
        match self {
            Way::Xlb => "xlb",
            Way::Nftables => "nftables",
            Way::Haproxy => "haproxy",
        }
    }
}

/// What one way measured.
#[derive(Clone, Copy, Debug)]
struct Figures {
    conn_per_s: f64,
    gbit_s: f64,
}

impl Figures {
    /// Each figure's median over `rounds` (not empty).
    fn median(rounds: &[Figures]) -> Figures {
        let of = |figure: fn(&Figures) -> f64| median(rounds.iter().map(figure).collect());
        Figures {
            conn_per_s: of(|f| f.conn_per_s),
            gbit_s: of(|f| f.gbit_s),
        }
    }
}

fn main() -> Result<()> {
    let run = Run::from_args();
    // Rounds of every way in turn, each measurement `secs` long: each figure's median over
    // the rounds stands, so a spell when another tenant of the machine takes a core does not decide it.
    let (rounds, secs) = match run {
        Run::Full => (5, 3),
        Run::Quick => (3, 1),
        Run::Smoke => (1, 1),
    };
    for (tool, package) in [
        ("nginx", "nginx"),
        ("haproxy", "haproxy"),
        ("nft", "nftables"),
        ("wrk", "wrk"),
    ] {
        cmd::require_tool(tool, package).context("run cargo xtask setup")?;
    }
    let mut rounds_of: BTreeMap<Way, Vec<Figures>> = BTreeMap::new();
    let mut steal = None;
    with_topology(PREFIX, Options::default(), |topo| {
        topo.check_connectivity()?;
        // The client is a load generator and is set up as one: it reuses a port whose
        // connection is in TIME_WAIT (a second on, timestamps permitting). Without it, after
        // a round through HAProxy the client held some 14,000 ports in TIME_WAIT (through
        // HAProxy, which relays nginx's FIN a moment after the response, wrk is often the
        // first to close), and every way after it, HAProxy's next rounds too, fell to a few
        // hundred connections a second until they expired: in a single run of each way
        // HAProxy, measured last, was a third of what it is. (The port range stays the
        // default: a wider one overlaps the SNAT ports, and nftables, which keeps a client's
        // port when it can, slowed down round after round.)
        topo.client
            .exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        let dir = Scratch::new()?;
        for b in &topo.backends {
            start_nginx(&b.ns, &b.name, dir.path())?;
        }
        let cpu = CpuTime::now();
        for _ in 0..rounds {
            for path in Way::ALL {
                let figures = through(topo, path, dir.path(), secs)
                    .with_context(|| format!("through {}", path.key()))?;
                eprintln!(
                    "tcp bench: through {}: {:.0} connections/s, {:.2} Gbit/s",
                    path.key(),
                    figures.conn_per_s,
                    figures.gbit_s
                );
                rounds_of.entry(path).or_default().push(figures);
            }
        }
        steal = steal_pct_since(&cpu);
        Ok(())
    });
    eprintln!("tcp bench: {}", steal_words(steal));

    let results: BTreeMap<Way, Figures> = rounds_of
        .iter()
        .map(|(way, figures)| (*way, Figures::median(figures)))
        .collect();
    let f = |p: Way| results[&p];
    let (x, n, h) = (f(Way::Xlb), f(Way::Nftables), f(Way::Haproxy));
    // Connections a second of `a` over `b`'s, the median of the rounds' own ratios: within a
    // round the ways ran seconds apart, where the rounds' medians can come from rounds
    // minutes apart, and the machine drifts in between.
    let conn_ratio = |a: Way, b: Way| {
        median(
            rounds_of[&a]
                .iter()
                .zip(&rounds_of[&b])
                .map(|(a, b)| a.conn_per_s / b.conn_per_s)
                .collect(),
        )
    };
    let json = serde_json::json!({
        "tcp": {
            "run": run.record_of_run(),
            "steal_pct": steal,
            "method": format!(
                "wrk from the client namespace to three nginx backends: {CONNECTION_CLIENTS} \
                 clients with Connection: close for connections, {BULK_CLIENTS} kept-alive \
                 clients fetching {} MiB for throughput, {secs} s each; {rounds} rounds of \
                 the three ways in turn, each figure the median over the rounds, each ratio \
                 the median of the rounds' ratios",
                BIG_FILE_BYTES >> 20
            ),
            "xlb_conn_per_s": x.conn_per_s,
            "nftables_conn_per_s": n.conn_per_s,
            "haproxy_conn_per_s": h.conn_per_s,
            "xlb_gbit_s": x.gbit_s,
            "nftables_gbit_s": n.gbit_s,
            "haproxy_gbit_s": h.gbit_s,
            "ratios": {
                "xlb_over_nftables_conn_per_s": conn_ratio(Way::Xlb, Way::Nftables),
                "xlb_over_haproxy_conn_per_s": conn_ratio(Way::Xlb, Way::Haproxy),
            },
        }
    });
    let written = run.record(&json)?;
    let mut table = String::from(
        "| through | connections/s | × nftables | × HAProxy | Gbit/s |\n|---|---:|---:|---:|---:|\n",
    );
    for p in Way::ALL {
        let r = f(p);
        table += &format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            p.key(),
            r.conn_per_s,
            conn_ratio(p, Way::Nftables),
            conn_ratio(p, Way::Haproxy),
            r.gbit_s
        );
    }
    if run == Run::Smoke {
        println!(
            "tcp bench smoke: every way answered; figures written to {}",
            written.display()
        );
    } else {
        println!(
            "machine: {}\n{table}figures written to {}",
            machine(),
            written.display()
        );
    }
    Ok(())
}

/// Sets the way up, measures, and takes it down again.
fn through(topo: &Topology, path: Way, dir: &Path, secs: u32) -> Result<Figures> {
    let lb = &topo.lb;
    let backends: Vec<String> = topo
        .backends
        .iter()
        .map(|b| b.service_addr().to_string())
        .collect();
    match path {
        Way::Xlb => {
            let mut config = format!(
                "[dataplane]\ninterfaces = {LB_INTERFACES:?}\n[conntrack]\nentries = 262144\n\
                 [[service]]\nvip = \"{VIP}:{VIP_TCP_PORT}\"\nprotocol = \"tcp\"\n\
                 snat = \"{SNAT}\"\n"
            );
            for b in &backends {
                config += &format!("[[service.backend]]\naddress = \"{b}\"\n");
            }
            let xlb = XlbProcess::start_quiet(lb, &config)?;
            let figures = measure(&topo.client, secs);
            xlb.stop()?;
            // The kernel frees xlb's maps (some 130 MiB here) in a worker after it exits, on
            // one of the two cores: not while the next way is measured.
            std::thread::sleep(std::time::Duration::from_secs(1));
            figures
        }
        Way::Nftables => {
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {}", b.replace(':', " . ")))
                .collect();
            let rules = format!(
                "table ip xlbbench {{\n\
                 chain prerouting {{\ntype nat hook prerouting priority dstnat;\n\
                 ip daddr {VIP} tcp dport {VIP_TCP_PORT} dnat ip to numgen random mod {} map \
                 {{ {} }}\n}}\n\
                 chain postrouting {{\ntype nat hook postrouting priority srcnat;\n\
                 ip daddr 10.20.0.0/16 tcp dport {BACKEND_PORT} snat to {SNAT}\n}}\n}}\n",
                backends.len(),
                map.join(", ")
            );
            let file = dir.join("nat.nft");
            std::fs::write(&file, rules)?;
            lb.exec("nft", &["-f", &file.display().to_string()])?;
            let figures = measure(&topo.client, secs);
            lb.exec("nft", &["delete", "table", "ip", "xlbbench"])?;
            figures
        }
        Way::Haproxy => {
            lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let servers: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("    server b{i} {b}\n"))
                .collect();
            let pid = dir.join("haproxy.pid");
            let config = format!(
                "global\n    maxconn 8000\n    pidfile {}\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    \
                 timeout server 30s\n\
                 frontend vip\n    bind {VIP}:{VIP_TCP_PORT}\n    default_backend pool\n\
                 backend pool\n    balance roundrobin\n{}",
                pid.display(),
                servers.concat()
            );
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, config)?;
            lb.exec("haproxy", &["-D", "-f", &file.display().to_string()])?;
            let figures = measure(&topo.client, secs);
            if let Ok(text) = std::fs::read_to_string(&pid) {
                lb.exec("kill", &[text.trim()])?;
            }
            lb.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])?;
            figures
        }
    }
}

/// Connections per second, then throughput, from the client.
fn measure(client: &NetNs, secs: u32) -> Result<Figures> {
    let duration = format!("-d{secs}s");
    let url = |path: &str| format!("http://{VIP}:{VIP_TCP_PORT}/{path}");
    let out = client.exec(
        "wrk",
        &[
            "-t1",
            &format!("-c{CONNECTION_CLIENTS}"),
            &duration,
            "-H",
            "Connection: close",
            &url("small"),
        ],
    )?;
    let conn_per_s = wrk_figure(&out.stdout, "Requests/sec:")?;
    let out = client.exec(
        "wrk",
        &["-t1", &format!("-c{BULK_CLIENTS}"), &duration, &url("big")],
    )?;
    let gbit_s = wrk_bytes_per_s(&out.stdout)? * 8.0 / 1e9;
    Ok(Figures { conn_per_s, gbit_s })
}

/// The number after `label` in wrk's report; fails on socket errors or non-2xx answers.
fn wrk_figure(report: &str, label: &str) -> Result<f64> {
    for bad in ["Socket errors", "Non-2xx"] {
        if let Some(line) = report.lines().find(|l| l.contains(bad)) {
            // A few timeouts at the end of a run are wrk's, not the way's: fail only on
            // connect or read errors, and on any wrong answer.
            if bad == "Non-2xx" || !line.contains("connect 0, read 0") {
                bail!("wrk: {line}\n{report}");
            }
        }
    }
    let value = report
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .with_context(|| format!("no {label:?} in wrk's report:\n{report}"))?;
    let value: f64 = value.trim().parse().context("parsing wrk's figure")?;
    ensure!(value > 0.0, "wrk measured nothing:\n{report}");
    Ok(value)
}

/// wrk's "Transfer/sec: 1.23GB" in bytes per second.
fn wrk_bytes_per_s(report: &str) -> Result<f64> {
    let value = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Transfer/sec:"))
        .with_context(|| format!("no Transfer/sec in wrk's report:\n{report}"))?
        .trim();
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .context("a unit")?;
    let (number, unit) = value.split_at(split);
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unit {other:?} in wrk's {value:?}"),
    };
    Ok(number.parse::<f64>()? * scale)
}

/// nginx on a backend, port 8080: `/small` answers "ok", `/big` is a 32 MiB file.
fn start_nginx(ns: &NetNs, name: &str, dir: &Path) -> Result<()> {
    let root = dir.join("www");
    std::fs::create_dir_all(&root)?;
    let big = root.join("big");
    if !big.exists() {
        std::fs::write(&big, vec![0x5a; BIG_FILE_BYTES])?;
    }
    let config = format!(
        "worker_processes 1;\npid {dir}/nginx-{name}.pid;\nerror_log {dir}/nginx-{name}.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 100000;\n\
         client_body_temp_path {dir}/body-{name};\n  proxy_temp_path {dir}/proxy-{name};\n\
         fastcgi_temp_path {dir}/fcgi-{name};\n  uwsgi_temp_path {dir}/uwsgi-{name};\n\
         scgi_temp_path {dir}/scgi-{name};\n\
         server {{\n    listen {BACKEND_PORT} reuseport backlog=4096;\n    root {root};\n\
         location = /small {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        dir = dir.display(),
        root = root.display(),
    );
    let file = dir.join(format!("nginx-{name}.conf"));
    std::fs::write(&file, config)?;
    ns.exec("nginx", &["-c", &file.display().to_string()])?;
    Ok(())
}

/// A scratch directory of this run, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        xlb_tests::xlb::remove_stale_configs();
        let path = xlb_tests::xlb::test_path(&std::env::temp_dir(), "tcp-bench");
        std::fs::create_dir_all(&path)?;
        Ok(Scratch(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
