//! The `xlb` command line: `xlb run` and `xlb check`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use lb_common::reason::Reason;

use crate::{
    config::{Checked, Config, HostFacts, XdpModeConfig},
    conntrack::{self, SweepReport},
    ethtool, loader,
    neighbours::ManagedNeighbours,
    stats, tables, veth,
};

/// xlb — an XDP load balancer: full NAT to backends chosen by weighted Maglev.
#[derive(Debug, Parser)]
#[command(name = "xlb", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it, fill its maps from the config, and balance until
    /// Ctrl-C or SIGTERM; then print the counters and detach.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Attach to this interface instead of dataplane.interfaces (repeat for several).
        #[arg(long = "iface", short = 'i')]
        interfaces: Vec<String>,
        /// Override dataplane.xdp_mode.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeConfig>,
        /// Also print the counters every this many seconds.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        stats_interval: Option<u64>,
    },
    /// Validate a config file and exit: 0 if it is good, 1 with every problem listed if not.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Reads, merges command-line overrides into, and validates a config, then fits it to this
/// host (see [`Checked::fit_to_host`]).
pub fn load_config(
    path: &std::path::Path,
    interfaces: Vec<String>,
    xdp_mode: Option<XdpModeConfig>,
) -> anyhow::Result<Checked> {
    let mut config = Config::from_file(path)?;
    if !interfaces.is_empty() {
        config.dataplane.interfaces = interfaces;
    }
    if let Some(mode) = xdp_mode {
        config.dataplane.xdp_mode = mode;
    }
    let invalid = |e| anyhow::anyhow!("config {} is not valid:\n{e}", path.display());
    let mut checked = config.validate().map_err(invalid)?;
    checked
        .fit_to_host(&HostFacts::read()?)
        .map_err(|e| anyhow::anyhow!("config {} does not fit this host:\n{e}", path.display()))?;
    Ok(checked)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let cfg = load_config(&config, Vec::new(), None)?;
            let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "config {} is valid: {} service(s), {backends} backend(s), interfaces {:?}, \
                 SNAT ports {}",
                config.display(),
                cfg.services.len(),
                cfg.dataplane.interfaces,
                cfg.snat_ports
            );
            Ok(())
        }
        Command::Run {
            config,
            interfaces,
            xdp_mode,
            stats_interval,
        } => {
            let cfg = load_config(&config, interfaces, xdp_mode)?;
            serve(&cfg, stats_interval.map(Duration::from_secs)).await
        }
    }
}

/// Passes the XDP program's log lines (aya-log) on to xlb's own log, from a background task.
fn forward_ebpf_logs(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("reading the XDP program's log")?;
    // SAFETY: the logger owns its ring buffer's fd, and keeps it open and unchanged until it
    // is dropped together with the AsyncFd.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the XDP program's log: {e}"))?;
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

async fn serve(cfg: &Checked, stats_interval: Option<Duration>) -> anyhow::Result<()> {
    // Signals are hooked before anything is attached, so a signal never leaves the program
    // attached behind a killed process.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    loader::check_interfaces(cfg)?;
    let mut ebpf = loader::load(cfg)?;
    // Fill the maps before attaching: the first packet already sees every service.
    let layout = tables::write(&mut ebpf, cfg)?;
    let mut loaded = loader::attach(ebpf, cfg)?;
    forward_ebpf_logs(&mut loaded.ebpf)?;
    for a in &loaded.attached {
        println!(
            "attached to {} (ifindex {}) in {} mode",
            a.interface, a.ifindex, a.mode
        );
    }
    for problem in veth::check(&cfg.dataplane.interfaces).await? {
        println!("warning: {problem}");
    }
    let neighbours = keep_backends_resolved(cfg).await?;
    let send_errors = SendErrors::new(&cfg.dataplane.interfaces);
    let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    println!(
        "ready: {} service(s), {backends} backend(s) on {} interface(s); SNAT ports {}; \
         conntrack capacity {} flows",
        cfg.services.len(),
        loaded.attached.len(),
        cfg.snat_ports,
        cfg.conntrack.entries
    );

    let mut ticker = stats_interval.map(tokio::time::interval);
    let mut sweeper = Sweeper::new(cfg);
    // A first sweep (of an empty table, or of what an earlier run left), so the counts
    // are there from the first report on.
    sweeper.sweep(&mut loaded.ebpf, false)?;
    let mut housekeeping = tokio::time::interval(Sweeper::TICK);
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = housekeeping.tick() => sweeper.tick(&mut loaded.ebpf)?,
            () = tick => {
                let mut snap = stats::read(&loaded.ebpf, &layout)?;
                snap.conntrack = sweeper.last.clone();
                snap.interfaces = send_errors.read();
                print!("{}", stats::format(cfg, &snap));
            }
        }
    }

    // A last sweep, so the final counts are current.
    sweeper.sweep(&mut loaded.ebpf, false)?;
    let mut snap = stats::read(&loaded.ebpf, &layout)?;
    snap.conntrack = sweeper.last.clone();
    snap.interfaces = send_errors.read();
    print!("{}", stats::format(cfg, &snap));
    if let Err(e) = neighbours.remove().await {
        log::warn!("removing the managed neighbour entries: {e:#}");
    }
    let names: Vec<String> = loaded
        .attached
        .iter()
        .map(|a| a.interface.clone())
        .collect();
    drop(loaded);
    println!("detached from {}", names.join(", "));
    Ok(())
}

/// Installs kernel-managed neighbour entries for every backend's next hop, so the first
/// packet of a flow finds its MAC (see [`neighbours`]), and waits briefly for them to resolve.
/// An unroutable or silent backend is reported, not fatal.
async fn keep_backends_resolved(cfg: &Checked) -> anyhow::Result<ManagedNeighbours> {
    let addrs: Vec<std::net::Ipv4Addr> = cfg
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| *b.address.ip()))
        .collect();
    let managed = ManagedNeighbours::install(&addrs)
        .await
        .context("installing neighbour entries for the backends")?;
    for u in managed.unroutable() {
        println!("warning: backend {} has no route: {}", u.address, u.reason);
    }
    for hop in managed
        .wait_resolved(Duration::from_secs(1))
        .await
        .context("waiting for the backends' next hops")?
    {
        println!("warning: next hop not resolved yet (the kernel keeps trying): {hop}");
    }
    Ok(managed)
}

/// The interfaces' counters of frames the kernel failed to send for XDP (see
/// [`ethtool::xdp_send_errors`]), as they grew since start-up: what xlb counted as sent but
/// the kernel dropped.
struct SendErrors {
    baseline: Vec<(String, u64)>,
}

impl SendErrors {
    fn new(interfaces: &[String]) -> SendErrors {
        SendErrors {
            baseline: interfaces
                .iter()
                .map(|i| (i.clone(), ethtool::xdp_send_errors(i).unwrap_or(0)))
                .collect(),
        }
    }

    fn read(&self) -> Vec<(String, u64)> {
        self.baseline
            .iter()
            .map(|(iface, base)| {
                let now = ethtool::xdp_send_errors(iface).unwrap_or(*base);
                (iface.clone(), now.saturating_sub(*base))
            })
            .collect()
    }
}

/// When the sweeper runs: every second or so (less often when a sweep takes long, so it
/// uses a small share of a core), and, while new flows are being refused for want of room
/// (conntrack full or out of memory, SNAT ports exhausted), every [`Sweeper::TICK`] (or a
/// few sweeps' time on a big table), pruning idle `New` flows as well: what a SYN flood
/// leaves.
struct Sweeper {
    timeouts: lb_common::conntrack::Timeouts,
    next: Instant,
    /// Refusals counted so far (`drop/conntrack_full` + `drop/snat_ports_exhausted`).
    refused: u64,
    /// Pressure mode lasts this long after the last refusal.
    pressure_until: Option<Instant>,
    last: Option<SweepReport>,
}

impl Sweeper {
    const TICK: Duration = Duration::from_millis(100);
    const INTERVAL: Duration = Duration::from_secs(1);
    /// A sweep takes at most 1/MAX_SHARE of the time between sweeps, and 1/PRESSURE_SHARE
    /// under pressure: a big table's sweeps never run back to back.
    const MAX_SHARE: u32 = 20;
    const PRESSURE_SHARE: u32 = 4;
    const PRESSURE_FOR: Duration = Duration::from_secs(2);

    fn new(cfg: &Checked) -> Sweeper {
        Sweeper {
            timeouts: cfg.conntrack.timeouts(),
            next: Instant::now() + Self::INTERVAL,
            refused: 0,
            pressure_until: None,
            last: None,
        }
    }

    fn tick(&mut self, ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
        let now = Instant::now();
        let reasons = stats::reasons(ebpf)?;
        let refused = reasons[Reason::DropConntrackFull as usize]
            + reasons[Reason::DropConntrackNoMemory as usize]
            + reasons[Reason::DropSnatPortsExhausted as usize];
        if refused > self.refused {
            if self.pressure_until.is_none() {
                log::warn!(
                    "new flows are being refused (conntrack full, out of memory, or SNAT \
                     ports exhausted): sweeping more often and pruning idle new flows"
                );
                self.next = now;
            }
            self.refused = refused;
            self.pressure_until = Some(now + Self::PRESSURE_FOR);
        }
        let pressure = self.pressure_until.is_some_and(|until| now < until);
        if !pressure {
            self.pressure_until = None;
        }
        if now >= self.next {
            self.sweep(ebpf, pressure)?;
        }
        Ok(())
    }

    /// Sweeps now. The report's `expired`, `pruned` and `orphans` count since start-up.
    fn sweep(&mut self, ebpf: &mut aya::Ebpf, pressure: bool) -> anyhow::Result<()> {
        let mut report = conntrack::sweep(ebpf, &self.timeouts, pressure)?;
        if report.expired + report.pruned + report.orphans > 0 {
            log::debug!(
                "sweep: {} flows expired, {} pruned, {} orphan entries, {} flows left, {:?}",
                report.expired,
                report.pruned,
                report.orphans,
                report.total_flows(),
                report.took
            );
        }
        let wait = if pressure {
            Self::TICK.max(report.took * Self::PRESSURE_SHARE)
        } else if report.more {
            // More flows are due: the next tick, after the loop has looked at signals.
            Duration::ZERO
        } else {
            Self::INTERVAL.max(report.took * Self::MAX_SHARE)
        };
        self.next = Instant::now() + wait;
        if let Some(last) = &self.last {
            report.expired += last.expired;
            report.pruned += last.pruned;
            report.orphans += last.orphans;
        }
        self.last = Some(report);
        Ok(())
    }
}
