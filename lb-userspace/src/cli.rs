//! The `xlb` command line: `xlb run` and `xlb check`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Checked, Config, HostFacts, XdpModeConfig},
    conntrack::Sweeper,
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
    let sweeper = Sweeper::start(&loaded.ebpf, cfg.conntrack.timeouts())?;
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
            () = tick => {
                let mut snap = stats::read(&loaded.ebpf, &layout)?;
                snap.conntrack = sweeper.latest();
                snap.interfaces = send_errors.read();
                print!("{}", stats::format(cfg, &snap));
            }
        }
    }

    let mut snap = stats::read(&loaded.ebpf, &layout)?;
    snap.conntrack = Some(sweeper.stop()?);
    snap.interfaces = send_errors.read();
    print!("{}", stats::format(cfg, &snap));
    if let Some(neighbours) = neighbours
        && let Err(e) = neighbours.remove().await
    {
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
/// An unroutable or silent backend is reported, not fatal; so is a kernel that cannot
/// manage entries (before 5.16): the tc handoff resolves next hops on the first packet then.
async fn keep_backends_resolved(cfg: &Checked) -> anyhow::Result<Option<ManagedNeighbours>> {
    let addrs: Vec<std::net::Ipv4Addr> = cfg
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| *b.address.ip()))
        .collect();
    let managed = match ManagedNeighbours::install(&addrs).await {
        Ok(managed) => managed,
        Err(e) => {
            println!(
                "warning: the backends' next hops are not kept resolved ({e:#}); first packets \
                 to them wait for the kernel to resolve them"
            );
            return Ok(None);
        }
    };
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
    Ok(Some(managed))
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
