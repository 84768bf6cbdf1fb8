//! `xlb run`: the daemon. It loads and attaches the program, fills the maps from the config
//! through the [`Registry`], serves the API ([`api`]) and the metrics ([`metrics`]), runs the
//! sweeper and the health checks, and re-applies the config file on SIGHUP; on SIGTERM or
//! Ctrl-C it prints the counters and detaches.

use std::{
    collections::HashSet,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::{self, Shared},
    config::{Checked, Config, Overrides},
    conntrack::{self, Sweeper},
    ethtool::SendErrors,
    health, loader, metrics,
    neighbours::{self, ManagedNeighbours, NextHop},
    pins::PinDir,
    registry::Registry,
    stats, veth,
};

/// What `xlb run` was asked for besides the config.
pub struct RunOptions {
    pub config_path: PathBuf,
    pub overrides: Overrides,
    pub stats_interval: Option<Duration>,
    pub socket: Option<PathBuf>,
    pub keep_attached: bool,
}

impl RunOptions {
    /// The config file, with this run's overrides, validated and fitted to the host.
    pub fn load(&self) -> anyhow::Result<Checked> {
        crate::cli::load_config(&self.config_path, |config| self.overrides.apply(config))
    }
}

/// How often the daemon frees retired ids and keeps new backends' next hops resolved.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

pub async fn run(mut opts: RunOptions) -> anyhow::Result<()> {
    let cfg = opts.load()?;
    opts.overrides.snat_port_range = Some([cfg.snat_ports.first, cfg.snat_ports.last]);
    // Signals are hooked before anything is attached, so a signal never leaves the program
    // attached behind a killed process.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    // Everything that can fail without touching the data plane fails first: the
    // interfaces, the kernel, the API socket (first of the two: a second daemon started
    // by mistake is told so by name) and the metrics port. The socket's file is removed on
    // every failure after it.
    loader::check_interfaces(&cfg)?;
    loader::check_kernel()?;
    let socket = opts
        .socket
        .clone()
        .unwrap_or_else(|| cfg.api.socket.clone());
    let api_listener = api::bind(&socket).await?;
    let metrics_listener = match cfg.api.metrics.parse() {
        Ok(addr) => match metrics::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        },
        Err(_) => None,
    };
    let pins = match PinDir::open(&cfg) {
        Ok(pins) => pins,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let daemon = match start(&cfg, &opts, &pins).await {
        Ok(daemon) => daemon,
        Err(e) => {
            // A fresh start that failed leaves nothing attached or pinned behind. An
            // adopted data plane keeps running, its program the old one; but should the
            // start fail after `Registry::load` (in attaching, say), the pinned maps hold
            // this config's services while the old program's own VIPS and QUIC_SERVERS
            // hold the old config's, until a start that succeeds.
            if !pins.adopted
                && let Err(cleanup) = pins.remove()
            {
                log::warn!("removing the pins of the failed start: {cleanup:#}");
            }
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let Daemon {
        loaded,
        shared,
        sweeper,
        mut neighbours,
    } = daemon;
    let api_task = api::serve(api_listener, shared.clone());
    println!("api: listening on {}", socket.display());
    let metrics_task = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            println!("metrics: http://{addr}/metrics");
        }
        metrics::serve(listener, shared.clone())
    });
    let mut checks = health::Checks::start(shared.clone());

    let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    println!(
        "ready: {} service(s), {backends} backend(s) on {} interface(s); SNAT ports {}; \
         conntrack capacity {} flows",
        cfg.services.len(),
        loaded.attached.len(),
        cfg.snat_ports,
        cfg.conntrack.entries
    );

    // From here on nothing ends the daemon but a signal: errors are logged, so a stop
    // always reaches the detach below.
    let mut ticker = opts.stats_interval.map(tokio::time::interval);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
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
            _ = sighup.recv() => reload(&opts, &shared).await,
            () = tick => match shared.stats() {
                Ok(stats) => print!("{}", stats::format(&stats)),
                Err(e) => log::warn!("reading the counters: {e:#}"),
            },
            _ = housekeeping.tick() => {
                let sweep = shared.sweeps.get();
                let registry = shared.clone();
                let addresses = tokio::task::spawn_blocking(move || {
                    let mut registry = registry.registry.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(sweep) = sweep
                        && let Err(e) = registry.release_ids(&sweep)
                    {
                        log::warn!("freeing retired ids: {e:#}");
                    }
                    registry.backend_addresses()
                })
                .await;
                checks.follow();
                // (Were the task to fail, an empty list would let go of every entry.)
                match addresses {
                    Ok(addresses) => neighbours.follow(addresses).await,
                    Err(e) => log::warn!("listing the backends for their neighbours: {e}"),
                }
            }
        }
    }

    // Stopping is best effort, step by step: a step that fails is logged, and the next
    // still runs.
    drop(checks);
    api_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    let last = sweeper
        .stop()
        .inspect_err(|e| log::warn!("the sweeper's last sweep: {e:#}"))
        .ok();
    {
        let registry = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        match stats::read(&registry, last.as_ref(), shared.send_errors.read()) {
            Ok(snap) => print!("{}", stats::format(&snap)),
            Err(e) => log::warn!("reading the counters: {e:#}"),
        }
    }
    let names: Vec<String> = loaded
        .attached
        .iter()
        .map(|a| a.interface.clone())
        .collect();
    if opts.keep_attached {
        drop(loaded);
        println!(
            "left the data plane running on {}, pinned at {}",
            names.join(", "),
            pins.path().display()
        );
        return Ok(());
    }
    neighbours.remove().await;
    let unpinned = pins.remove();
    drop(loaded);
    unpinned?;
    println!("detached from {}", names.join(", "));
    Ok(())
}

/// What a started daemon runs with.
struct Daemon {
    loaded: loader::Loaded,
    shared: Arc<Shared>,
    sweeper: Sweeper,
    neighbours: Neighbours,
}

/// Loads the program onto the pinned maps, fills them, attaches, and starts the sweeper.
async fn start(cfg: &Checked, opts: &RunOptions, pins: &PinDir) -> anyhow::Result<Daemon> {
    let ebpf = loader::load_pinned(cfg, pins)?;
    // Fill the maps before attaching: the first packet already sees every service.
    let registry =
        Registry::load(&ebpf, cfg).map_err(|e| anyhow::anyhow!("filling the maps: {e}"))?;
    let mut loaded = loader::attach(ebpf, cfg, pins)?;
    forward_ebpf_logs(&mut loaded.ebpf)?;
    for a in &mut loaded.attached {
        if a.mode == loader::KEPT {
            // The pinned link keeps the mode it was made in: ask the kernel which.
            a.mode = crate::netlink::xdp_mode(&a.interface)
                .await?
                .unwrap_or("unknown");
            println!(
                "attached to {} (ifindex {}) in {} mode, replacing the program in its pinned \
                 link",
                a.interface, a.ifindex, a.mode
            );
        } else {
            println!(
                "attached to {} (ifindex {}) in {} mode",
                a.interface, a.ifindex, a.mode
            );
        }
    }
    for problem in veth::check(&cfg.dataplane.interfaces).await? {
        println!("warning: {problem}");
    }
    let mut neighbours = Neighbours::default();
    neighbours.follow(registry.backend_addresses()).await;

    let accounting = Arc::new(Mutex::new(conntrack::Accounting::open(&loaded.ebpf)?));
    let sweeper = Sweeper::start(&loaded.ebpf, cfg.conntrack.timeouts(), accounting.clone())?;
    if pins.adopted {
        // The sweeper's first pass has counted them (and let go of what had expired).
        let flows = sweeper.watch().get().map_or(0, |r| r.total_flows());
        println!(
            "adopted the data plane pinned at {}: {flows} open flow(s) kept",
            pins.path().display()
        );
        for warning in &pins.warnings {
            println!("warning: {warning}");
        }
    }
    let shared = Arc::new(Shared {
        registry: Mutex::new(registry),
        sweeps: sweeper.watch(),
        conntrack: Mutex::new(conntrack::Table::open(&loaded.ebpf)?.with_accounting(accounting)),
        started: Instant::now(),
        attached: loaded.attached.clone(),
        program_id: loader::program_id(&loaded.ebpf)?,
        send_errors: SendErrors::new(&cfg.dataplane.interfaces),
        overrides: opts.overrides.clone(),
    });
    Ok(Daemon {
        loaded,
        shared,
        sweeper,
        neighbours,
    })
}

/// SIGHUP: makes the config file the truth again, as `xlb apply` does; a bad file changes
/// nothing and is logged.
async fn reload(opts: &RunOptions, shared: &Arc<Shared>) {
    let path = opts.config_path.display().to_string();
    let mut config = match Config::from_file(&opts.config_path) {
        Ok(config) => config,
        Err(e) => {
            log::error!("SIGHUP: not applied: {e:#}");
            return;
        }
    };
    opts.overrides.apply(&mut config);
    let shared = shared.clone();
    let source = path.clone();
    match tokio::task::spawn_blocking(move || api::apply_config(&shared, config, &source)).await {
        Ok(Ok(changes)) => log::info!("SIGHUP: applied {path}: {changes:?}"),
        Ok(Err(e)) => log::error!("SIGHUP: not applied: {e}"),
        Err(e) => log::error!("SIGHUP: {e}"),
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

/// Kernel-managed neighbour entries for every backend's next hop, so the first packet of a
/// flow finds its MAC (see [`neighbours`](crate::neighbours)), for the backends at start
/// and those added later. An unroutable or silent backend is reported, not fatal; so is a
/// kernel that cannot manage entries (before 5.16): the tc handoff resolves next hops on
/// the first packet then.
#[derive(Default)]
struct Neighbours {
    /// What each `install` set up, less the next hops let go of since: the backends behind
    /// their next hops are the ones covered.
    sets: Vec<ManagedNeighbours>,
    /// Backends without a route, warned about once; tried again every tick.
    unroutable: HashSet<IpAddr>,
    /// An install failed (and was logged); tried again every tick.
    failing: bool,
    /// The kernel has no managed entries: nothing to do, ever.
    unsupported: bool,
}

impl Neighbours {
    /// Keeps the next hops of `backends` (every backend packets may go to: those of the
    /// services, and removed ones whose flows may still be open) resolved: installs managed
    /// entries for new backends and for those that had no route before, and lets go of the
    /// next hops only gone backends used.
    async fn follow(&mut self, backends: Vec<IpAddr>) {
        if self.unsupported {
            return;
        }
        let wanted: HashSet<IpAddr> = backends.iter().copied().collect();
        self.release(&wanted).await;
        self.unroutable.retain(|a| wanted.contains(a));
        let covered: HashSet<IpAddr> = self
            .sets
            .iter()
            .flat_map(|set| set.next_hops())
            .flat_map(|hop| hop.backends.iter().copied())
            .collect();
        let mut new: Vec<IpAddr> = wanted.difference(&covered).copied().collect();
        if new.is_empty() {
            return;
        }
        new.sort();
        let managed = match ManagedNeighbours::install(&new).await {
            Ok(managed) => {
                if std::mem::take(&mut self.failing) {
                    log::info!("the backends' next hops are kept resolved again");
                }
                managed
            }
            Err(e) if e.downcast_ref::<neighbours::Unsupported>().is_some() => {
                println!(
                    "warning: the backends' next hops are not kept resolved ({e:#}); first \
                     packets to them wait for the kernel to resolve them"
                );
                self.unsupported = true;
                return;
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    println!(
                        "warning: the backends' next hops are not kept resolved for now \
                         ({e:#}); trying again every second"
                    );
                }
                return;
            }
        };
        for hop in managed.next_hops() {
            for backend in &hop.backends {
                self.unroutable.remove(backend);
            }
        }
        for u in managed.unroutable() {
            if self.unroutable.insert(u.address) {
                println!(
                    "warning: backend {} has no route: {} (tried again every second)",
                    u.address, u.reason
                );
            }
        }
        if managed.next_hops().is_empty() {
            return;
        }
        match managed.wait_resolved(Duration::from_secs(1)).await {
            Ok(unresolved) => {
                for hop in unresolved {
                    println!("warning: next hop not resolved yet (the kernel keeps trying): {hop}");
                }
            }
            Err(e) => log::warn!("waiting for the backends' next hops: {e:#}"),
        }
        self.sets.push(managed);
    }

    /// Lets go of the next hops no backend of `wanted` uses: the entries made for them are
    /// deleted, so the kernel stops probing hosts nobody sends to. A next hop one wanted
    /// backend still uses stays in every set that has it (its entry may be another set's).
    async fn release(&mut self, wanted: &HashSet<IpAddr>) {
        let used = |hop: &NextHop| hop.backends.iter().any(|b| wanted.contains(b));
        let needed: HashSet<(IpAddr, u32)> = self
            .sets
            .iter()
            .flat_map(|set| set.next_hops())
            .filter(|hop| used(hop))
            .map(|hop| (hop.address, hop.ifindex))
            .collect();
        for set in &mut self.sets {
            if let Err(e) = set
                .retain(|hop| needed.contains(&(hop.address, hop.ifindex)))
                .await
            {
                log::warn!("letting go of the next hops of removed backends: {e:#}");
            }
        }
        self.sets.retain(|set| !set.next_hops().is_empty());
    }

    async fn remove(self) {
        for set in self.sets {
            if let Err(e) = set.remove().await {
                log::warn!("removing the managed neighbour entries: {e:#}");
            }
        }
    }
}
