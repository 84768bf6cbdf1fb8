//! The `xlb` command line: `xlb run` (the daemon, [`daemon`]) and `xlb check` work on a
//! config file; every other command is a client of the running daemon's API ([`client`]).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use hyper::Method;

use crate::{
    api::{ApplyRequest, Changed, Flow, NewBackend, NewService, Status, Weight},
    client::{self, Client, Output},
    config::{
        Checked, Config, DEFAULT_SOCKET, HostFacts, Mode, OneOrMore, Overrides, Protocol,
        Scheduler, XdpModeConfig,
    },
    daemon::{self, RunOptions},
    doctor,
    footprint::Footprint,
    stats::Stats,
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
    /// Run the daemon: load the XDP program, attach it, fill its maps from the config, serve
    /// the API, and balance until Ctrl-C or SIGTERM; then print the counters and detach.
    /// SIGHUP re-applies the config file.
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
        /// Serve the API on this socket instead of [api] socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Pin the data plane here instead of dataplane.pin_path.
        #[arg(long, value_name = "PATH")]
        pin_path: Option<PathBuf>,
        /// On SIGTERM, leave the program attached and the maps pinned, so the data plane
        /// goes on forwarding and the next `xlb run` adopts it (default: detach and unpin).
        #[arg(long)]
        keep_attached: bool,
    },
    /// Validate a config file and exit: 0 if it is good, 1 with every problem listed if not.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make the running daemon run this config file (as SIGHUP does with its own): services
    /// and backends are added, changed and removed to match. An invalid file changes nothing.
    Apply {
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The daemon: interfaces and XDP mode, program id, uptime, flows in use and capacity.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List, add and remove services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// List, add, remove, drain and weigh a service's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Counters per service and backend, and packets per verdict.
    Stats {
        /// Print again every this many seconds, until interrupted.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        watch: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Tracked flows.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Check what this host needs before traffic flows, each check with what to do about
    /// a failure: kernel, BTF, bpffs, the config's interfaces (native XDP, forwarding), veth
    /// peers, SNAT ports, rp_filter, a daemon already running. Exits 1 if any fails.
    Doctor {
        /// Also check the interfaces, ports and pin path of this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The API socket a running daemon would have.
        #[arg(long, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Print shell completions for xlb.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What every client command takes.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Print a table (for people) or the API's JSON (for scripts).
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// How long to wait for the daemon's answer before giving up.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = crate::client::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
}

impl ClientArgs {
    fn client(&self) -> Client {
        Client::new(self.socket.clone()).with_timeout(std::time::Duration::from_secs(self.timeout))
    }
}

/// A service, as commands name it.
#[derive(Debug, Args)]
pub struct ServiceArg {
    /// The service's VIP:PORT ([VIP]:PORT for IPv6).
    pub vip: SocketAddr,
    #[arg(long, short, value_enum, default_value_t = Protocol::Tcp)]
    pub protocol: Protocol,
}

impl ServiceArg {
    fn path(&self) -> String {
        client::service_path(&self.vip, self.protocol)
    }

    fn backend_path(&self, address: &SocketAddr) -> String {
        client::backend_path(&self.vip, self.protocol, address)
    }
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// List the services.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a service with no backends.
    Add {
        #[command(flatten)]
        service: ServiceArg,
        /// fullnat: backends see the SNAT address; dnat: they see the client's, and must
        /// route replies through xlb.
        #[arg(long, value_enum, default_value_t = Mode::Fullnat)]
        mode: Mode,
        /// fullnat: the source address toward the backends, of the VIP's family; give it
        /// again for a pool (default: the first address of that family on the interfaces,
        /// for IPv6 a global one).
        #[arg(long)]
        snat: Vec<IpAddr>,
        /// How new flows pick a backend.
        #[arg(long, value_enum, default_value_t = Scheduler::Maglev)]
        scheduler: Scheduler,
        /// UDP: route QUIC short-header packets by the backend id in their connection ID.
        #[arg(long)]
        quic: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a service; its open flows finish.
    Rm {
        #[command(flatten)]
        service: ServiceArg,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// List a service's backends.
    Ls {
        #[command(flatten)]
        service: ServiceArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a backend to a service.
    Add {
        #[command(flatten)]
        service: ServiceArg,
        /// The backend's ADDR:PORT.
        address: SocketAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// For a QUIC service: the id (1-65535) the backend puts in its connection IDs.
        #[arg(long)]
        quic_id: Option<u16>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a backend: it takes no new flows at once; its open flows finish, or with
    /// --cut are removed.
    Rm {
        #[command(flatten)]
        service: ServiceArg,
        address: SocketAddr,
        /// Also remove its open flows.
        #[arg(long)]
        cut: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Drain a backend: no new flows; open ones finish. `backend weight` ends it.
    Drain {
        #[command(flatten)]
        service: ServiceArg,
        address: SocketAddr,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set a backend's weight (0: no new flows); ends a drain.
    Weight {
        #[command(flatten)]
        service: ServiceArg,
        address: SocketAddr,
        weight: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConntrackCommand {
    /// List tracked flows: client, VIP, backend, SNAT address and port, state, idle time.
    Ls {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Reads, merges command-line overrides into, and validates a config, then fits it to this
/// host (see [`Checked::fit_to_host`]).
pub fn load_config(
    path: &std::path::Path,
    overrides: impl FnOnce(&mut Config),
) -> anyhow::Result<Checked> {
    let mut config = Config::from_file(path)?;
    overrides(&mut config);
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
            let cfg = load_config(&config, |_| {})?;
            let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
            let footprint = Footprint::of(&cfg)?;
            let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
            println!(
                "config {} is valid: {} service(s), {backends} backend(s), {} NAT \
                 gateway(s), interfaces {:?}, SNAT ports {}; its maps take {:.1} MiB of \
                 kernel memory when xlb starts: conntrack for {} flows {:.1} MiB, Maglev \
                 tables {:.1} MiB, the others {:.1} MiB on this host's {} possible CPUs",
                config.display(),
                cfg.services.len(),
                cfg.gateways.len(),
                cfg.dataplane.interfaces,
                cfg.snat_ports,
                mib(footprint.total()),
                cfg.conntrack.entries,
                mib(footprint.conntrack),
                mib(footprint.maglev),
                mib(footprint.others),
                footprint.cpus,
            );
            Ok(())
        }
        Command::Run {
            config,
            interfaces,
            xdp_mode,
            stats_interval,
            socket,
            pin_path,
            keep_attached,
        } => {
            daemon::run(RunOptions {
                config_path: config,
                overrides: Overrides {
                    interfaces,
                    xdp_mode,
                    pin_path,
                    snat_port_range: None,
                },
                stats_interval: stats_interval.map(Duration::from_secs),
                socket,
                keep_attached,
            })
            .await
        }
        Command::Apply { config, client } => {
            let text = client::read_config(&config)?;
            let request = ApplyRequest {
                source: config.display().to_string(),
                text,
            };
            let body = serde_json::to_value(request)?;
            change(&client, Method::POST, "/v1/apply", Some(body), "applied").await
        }
        Command::Status { client } => {
            let (status, json): (Status, _) = client.client().get("/v1/status").await?;
            client::print(client.output, &json, || client::status_text(&status))
        }
        Command::Service(command) => service(command).await,
        Command::Backend(command) => backend(command).await,
        Command::Stats { watch, client } => loop {
            let (stats, json): (Stats, _) = client.client().get("/v1/stats").await?;
            client::print(client.output, &json, || client::stats_text(&stats))?;
            match watch {
                Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
                None => return Ok(()),
            }
        },
        Command::Conntrack(ConntrackCommand::Ls { limit, client }) => {
            let (flows, json): (Vec<Flow>, _) = client
                .client()
                .get(&format!("/v1/conntrack?limit={limit}"))
                .await?;
            client::print(client.output, &json, || client::flows_text(&flows))
        }
        Command::Doctor { config, socket } => {
            let mut failed = false;
            let cfg = match &config {
                Some(path) => match load_config(path, |_| {}) {
                    Ok(cfg) => Some(cfg),
                    Err(e) => {
                        println!("FAIL  config      {e:#}");
                        failed = true;
                        None
                    }
                },
                None => None,
            };
            for c in doctor::run(cfg.as_ref(), &socket).await {
                let mark = match c.verdict {
                    doctor::Verdict::Ok => "ok  ",
                    doctor::Verdict::Warn => "WARN",
                    doctor::Verdict::Fail => {
                        failed = true;
                        "FAIL"
                    }
                };
                println!("{mark}  {:<11} {}", c.what, c.detail);
            }
            if failed {
                anyhow::bail!("some checks failed: see above");
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "xlb", &mut std::io::stdout());
            Ok(())
        }
    }
}

async fn service(command: ServiceCommand) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Ls { client } => {
            let (stats, json): (Stats, _) = client.client().get("/v1/stats").await?;
            client::print(client.output, &json["services"], || {
                client::services_text(&stats)
            })
        }
        ServiceCommand::Add {
            service,
            mode,
            snat,
            scheduler,
            quic,
            client,
        } => {
            let body = NewService {
                vip: service.vip,
                protocol: service.protocol,
                mode: Some(mode),
                snat: (!snat.is_empty()).then_some(OneOrMore::More(snat)),
                scheduler: Some(scheduler),
                quic,
            };
            let body = serde_json::to_value(body)?;
            change(
                &client,
                Method::POST,
                "/v1/services",
                Some(body),
                "service added",
            )
            .await
        }
        ServiceCommand::Rm { service, client } => {
            change(
                &client,
                Method::DELETE,
                &service.path(),
                None,
                "service removed",
            )
            .await
        }
    }
}

async fn backend(command: BackendCommand) -> anyhow::Result<()> {
    match command {
        BackendCommand::Ls { service, client } => {
            let (mut stats, _): (Stats, _) = client.client().get("/v1/stats").await?;
            let vip = service.vip.to_string();
            let protocol = service.protocol.to_string();
            stats
                .services
                .retain(|s| s.vip == vip && s.protocol == protocol);
            let Some(found) = stats.services.first() else {
                anyhow::bail!("no service {}/{}", service.vip, service.protocol);
            };
            let json = serde_json::to_value(&found.backends)?;
            client::print(client.output, &json, || client::backends_text(&stats))
        }
        BackendCommand::Add {
            service,
            address,
            weight,
            quic_id,
            client,
        } => {
            let body = serde_json::to_value(NewBackend {
                address,
                weight,
                quic_id,
            })?;
            let path = format!("{}/backends", service.path());
            change(&client, Method::POST, &path, Some(body), "backend added").await
        }
        BackendCommand::Rm {
            service,
            address,
            cut,
            client,
        } => {
            let path = format!("{}?cut={cut}", service.backend_path(&address));
            change(&client, Method::DELETE, &path, None, "backend removed").await
        }
        BackendCommand::Drain {
            service,
            address,
            client,
        } => {
            let path = format!("{}/drain", service.backend_path(&address));
            change(&client, Method::POST, &path, None, "backend draining").await
        }
        BackendCommand::Weight {
            service,
            address,
            weight,
            client,
        } => {
            let body = serde_json::to_value(Weight { weight })?;
            let path = format!("{}/weight", service.backend_path(&address));
            change(&client, Method::PUT, &path, Some(body), "weight set").await
        }
    }
}

/// Sends a change and prints what it did.
async fn change(
    client: &ClientArgs,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    what: &str,
) -> anyhow::Result<()> {
    let json = client.client().call(method, path, body).await?;
    print_changed(client.output, what, &json)
}

fn print_changed(output: Output, what: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    let changed: Changed = serde_json::from_value(json.clone())?;
    client::print(output, json, || client::changed_text(what, &changed))?;
    if let Some(why) = &changed.cut_failed {
        anyhow::bail!(
            "the backend was removed, but cutting its flows failed ({why}): they end by their \
             timeouts"
        );
    }
    Ok(())
}
