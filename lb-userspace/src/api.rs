//! The daemon's local API: HTTP/JSON on a unix socket (mode 0600: root only), served by
//! axum. Every `xlb` command other than `run` and `check` is a client of it
//! ([`client`](crate::client)). The request and answer types are here, shared by both sides.
//!
//! | method and path                                   | does                               |
//! |---------------------------------------------------|------------------------------------|
//! | `GET /v1/status`                                  | [`Status`]                         |
//! | `GET /v1/stats`                                   | [`Stats`] (services, reasons, …)   |
//! | `POST /v1/services` [`NewService`]                | adds a service                     |
//! | `DELETE /v1/services/{proto}/{vip}`               | removes it                         |
//! | `POST /v1/services/{proto}/{vip}/backends` [`NewBackend`] | adds a backend             |
//! | `DELETE /v1/services/{proto}/{vip}/backends/{addr}?cut=` | removes it (cuts its flows) |
//! | `POST /v1/services/{proto}/{vip}/backends/{addr}/drain` | drains it                    |
//! | `PUT /v1/services/{proto}/{vip}/backends/{addr}/weight` [`Weight`] | sets its weight   |
//! | `GET /v1/conntrack?limit=`                        | [`Flow`]s                          |
//! | `POST /v1/apply` [`ApplyRequest`]                 | reconciles to a config file's text |
//!
//! Every change edits the running config and goes through
//! [`Registry::apply`](crate::registry::Registry::apply), so the API can make no change a
//! config file could not. Errors answer `{"error": "..."}` with a 4xx or 5xx status.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use lb_common::conntrack::{FlowState, remaining_ns};
use serde::{Deserialize, Serialize};

use crate::{
    config::{
        Backend, Checked, Config, HostFacts, Mode, OneOrMore, Overrides, Protocol, Scheduler,
        Service,
    },
    conntrack,
    loader::Attachment,
    registry::{ApplyError, Changes, Registry, ServiceName, default_snat},
    stats::{self, Stats},
};

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub program_id: u32,
    pub interfaces: Vec<StatusInterface>,
    pub services: usize,
    pub backends: usize,
    #[serde(default)]
    pub gateways: usize,
    pub flows: u64,
    pub flow_capacity: u32,
    pub snat_ports: String,
    pub table_rebuilds: u64,
    /// Ids given up whose flows have not all ended yet: (services, backends).
    pub retired_ids: (usize, usize),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusInterface {
    pub name: String,
    pub ifindex: u32,
    pub mode: String,
}

/// `POST /v1/services`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewService {
    /// IPv4 or IPv6 ("[address]:port").
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// None: fullnat.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// The SNAT pool: one address or a list, of the VIP's family; none: in fullnat mode, the
    /// first address of the VIP's family on the interfaces (for IPv6, a global one; see
    /// [`default_snat`]).
    #[serde(default)]
    pub snat: Option<OneOrMore<IpAddr>>,
    /// None: maglev.
    #[serde(default)]
    pub scheduler: Option<Scheduler>,
    #[serde(default)]
    pub quic: bool,
}

/// `POST /v1/services/{proto}/{vip}/backends`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewBackend {
    /// Of the service's VIP's family.
    pub address: SocketAddr,
    pub weight: u32,
    #[serde(default)]
    pub quic_id: Option<u16>,
}

/// `PUT .../weight`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Weight {
    pub weight: u32,
}

/// `POST /v1/apply`: a config file's text, and where it came from (for messages).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub source: String,
    pub text: String,
}

/// What a change did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Changed {
    pub changes: Changes,
    /// Flows removed (`backend rm --cut`).
    pub flows_cut: u64,
    /// Why `--cut` failed, when the backend was removed but its flows could not be cut
    /// (they then end by their timeouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_failed: Option<String>,
}

/// One flow of `GET /v1/conntrack`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flow {
    pub protocol: String,
    pub client: String,
    pub vip: String,
    pub backend: String,
    pub snat: String,
    pub state: String,
    pub idle_s: f64,
    /// Seconds until the sweeper removes it, if nothing more is seen.
    pub expires_in_s: f64,
}

#[derive(Clone, Debug, Deserialize)]
struct CutQuery {
    #[serde(default)]
    cut: bool,
}

#[derive(Clone, Debug, Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

/// What the handlers share.
pub struct Shared {
    pub registry: Mutex<Registry>,
    pub sweeps: crate::conntrack::Latest,
    pub conntrack: Mutex<conntrack::Table>,
    pub started: Instant,
    pub attached: Vec<Attachment>,
    pub program_id: u32,
    pub send_errors: crate::ethtool::SendErrors,
    /// `xlb run`'s options, merged into every config `xlb apply` sends.
    pub overrides: Overrides,
}

impl Shared {
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let registry = lock(&self.registry);
        let sweep = self.sweeps.get();
        stats::read(&registry, sweep.as_ref(), self.send_errors.read())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error answer: a status and a message for the person at the CLI.
pub struct ApiError(StatusCode, String);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> ApiError {
        let status = match e {
            ApplyError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApplyError::Full(_) => StatusCode::CONFLICT,
            ApplyError::Maps(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

type Answer<T> = Result<Json<T>, ApiError>;

/// Listens on `socket` with mode 0600, creating its directory. A socket left by a daemon
/// that died is replaced; a live one, or a file that is not a socket, is refused.
pub async fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the API socket's directory {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: give the API another path ([api] socket, \
                 --socket)",
                socket.display()
            );
        }
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!(
                "another xlb daemon is serving {} already; stop it first, or give this one \
                 another --socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    // Created under a umask that leaves it to root alone, so it is never reachable by others,
    // not even between bind and chmod. (The umask is the process's: nothing else creates
    // files while the daemon starts.)
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener =
        bound.with_context(|| format!("listening on the API socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", socket.display()))?;
    Ok(listener)
}

/// Serves the API on `listener` until the task is aborted.
pub fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    let app = router(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("the API server stopped: {e}");
        }
    })
}

/// A service's path, as the router matches it ([`client::service_path`] makes it). The
/// `Path` extractor percent-decodes each segment, so an IPv6 VIP's encoded brackets arrive
/// as brackets.
///
/// [`client::service_path`]: crate::client::service_path
const SERVICE_PATH: &str = "/v1/services/{proto}/{vip}";
/// A backend's path ([`client::backend_path`](crate::client::backend_path) makes it).
const BACKEND_PATH: &str = "/v1/services/{proto}/{vip}/backends/{addr}";

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(get_stats))
        .route("/v1/services", post(add_service))
        .route(SERVICE_PATH, axum::routing::delete(remove_service))
        .route(&format!("{SERVICE_PATH}/backends"), post(add_backend))
        .route(BACKEND_PATH, axum::routing::delete(remove_backend))
        .route(&format!("{BACKEND_PATH}/drain"), post(drain_backend))
        .route(&format!("{BACKEND_PATH}/weight"), put(weight_backend))
        .route("/v1/conntrack", get(flows))
        .route("/v1/apply", post(apply))
        .with_state(shared)
}

async fn status(State(shared): State<Arc<Shared>>) -> Answer<Status> {
    blocking(move || Ok(status_of(&shared))).await.map(Json)
}

fn status_of(shared: &Shared) -> Status {
    let registry = lock(&shared.registry);
    let running = registry.running();
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_s: shared.started.elapsed().as_secs(),
        program_id: shared.program_id,
        interfaces: shared
            .attached
            .iter()
            .map(|a| StatusInterface {
                name: a.interface.clone(),
                ifindex: a.ifindex,
                mode: a.mode.into(),
            })
            .collect(),
        services: registry.services().count(),
        backends: registry.services().map(|s| s.backends.len()).sum(),
        gateways: registry.gateways().count(),
        flows: shared.sweeps.get().map_or(0, |r| r.total_flows()),
        flow_capacity: running.conntrack.entries,
        snat_ports: running.snat_ports.to_string(),
        table_rebuilds: registry.rebuilds,
        retired_ids: registry.retired(),
    }
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Answer<Stats> {
    blocking(move || shared.stats().map_err(internal))
        .await
        .map(Json)
}

/// Runs a handler's body where it may block (map writes wait for RCU grace periods).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn service_name(proto: &str, vip: &str) -> Result<ServiceName, ApiError> {
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(bad(format!("{other:?} is not a protocol (tcp or udp)"))),
    };
    let vip = vip
        .parse()
        .map_err(|_| bad(format!("{vip:?} is not \"address:port\"")))?;
    Ok(ServiceName { vip, protocol })
}

fn parse_backend(addr: &str) -> Result<SocketAddr, ApiError> {
    addr.parse()
        .map_err(|_| bad(format!("{addr:?} is not \"address:port\"")))
}

/// Applies `edit` to a copy of the running config, validates the result as a config file
/// is validated, and applies it.
fn change(
    shared: &Shared,
    edit: impl FnOnce(&mut Checked) -> Result<(), ApiError>,
) -> Result<Changes, ApiError> {
    let mut registry = lock(&shared.registry);
    let mut wanted = registry.running().clone();
    edit(&mut wanted)?;
    let mut config = wanted.to_config();
    shared.overrides.apply(&mut config);
    let checked = revalidate(config, registry.running())?;
    Ok(registry.apply(&checked)?)
}

/// Makes `config` (in file form, with the run's overrides), read from `source`, the
/// running config: `xlb apply` and SIGHUP.
pub fn apply_config(shared: &Shared, config: Config, source: &str) -> Result<Changes, ApiError> {
    let mut registry = lock(&shared.registry);
    let checked = revalidate(config, registry.running())
        .map_err(|ApiError(s, m)| ApiError(s, format!("config {source} is not valid:\n{m}")))?;
    Ok(registry.apply(&checked)?)
}

/// Validates a config (in file form) as `xlb check` does, and fits it to this host as a
/// change of the `running` one ([`Checked::fit_change_to_host`]).
fn revalidate(config: Config, running: &Checked) -> Result<Checked, ApiError> {
    let mut checked = config
        .validate()
        .map_err(|e| ApiError::from(ApplyError::Invalid(e)))?;
    let host = HostFacts::read().map_err(internal)?;
    if let Some(conflict) = checked
        .fit_change_to_host(running, &host)
        .map_err(|e| ApiError::from(ApplyError::Invalid(e)))?
    {
        log::warn!(
            "the change is applied: the running config conflicts with this host as well, \
             and the change adds nothing to that (a restart fits xlb's ports to the host \
             again): {conflict}"
        );
    }
    Ok(checked)
}

fn find_service<'a>(cfg: &'a mut Checked, name: &ServiceName) -> Result<&'a mut Service, ApiError> {
    cfg.services
        .iter_mut()
        .find(|s| s.vip == name.vip && s.protocol == name.protocol)
        .ok_or_else(|| not_found(format!("no service {name}")))
}

fn find_backend(service: &mut Service, address: SocketAddr) -> Result<&mut Backend, ApiError> {
    let name = format!("{}/{}", service.vip, service.protocol);
    service
        .backends
        .iter_mut()
        .find(|b| b.address == address)
        .ok_or_else(|| not_found(format!("service {name} has no backend {address}")))
}

fn changed(changes: Changes) -> Json<Changed> {
    Json(Changed {
        changes,
        flows_cut: 0,
        cut_failed: None,
    })
}

async fn add_service(
    State(shared): State<Arc<Shared>>,
    Json(new): Json<NewService>,
) -> Answer<Changed> {
    blocking(move || {
        let interfaces = lock(&shared.registry)
            .running()
            .dataplane
            .interfaces
            .clone();
        let mode = new.mode.unwrap_or_default();
        let snat = new.snat.map(OneOrMore::into_vec).unwrap_or_default();
        let snat = match (mode, snat.is_empty()) {
            (Mode::Dnat, false) => {
                return Err(bad(
                    "mode dnat keeps the client's address: --snat has no use there",
                ));
            }
            (Mode::Dnat, true) => Vec::new(),
            (Mode::Fullnat, false) => snat,
            (Mode::Fullnat, true) => vec![
                default_snat(&interfaces, new.vip.ip())
                    .map_err(|e| bad(format!("no --snat given, and no default: {e:#}")))?,
            ],
        };
        change(&shared, |cfg| {
            let name = ServiceName {
                vip: new.vip,
                protocol: new.protocol,
            };
            if cfg
                .services
                .iter()
                .any(|s| s.vip == new.vip && s.protocol == new.protocol)
            {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("service {name} exists already"),
                ));
            }
            cfg.services.push(Service {
                vip: new.vip,
                protocol: new.protocol,
                mode,
                snat,
                scheduler: new.scheduler.unwrap_or_default(),
                quic: new.quic,
                backends: Vec::new(),
                health: None,
            });
            Ok(())
        })
    })
    .await
    .map(changed)
}

async fn remove_service(
    State(shared): State<Arc<Shared>>,
    UrlPath((proto, vip)): UrlPath<(String, String)>,
) -> Answer<Changed> {
    let name = service_name(&proto, &vip)?;
    blocking(move || {
        change(&shared, |cfg| {
            find_service(cfg, &name)?;
            cfg.services
                .retain(|s| !(s.vip == name.vip && s.protocol == name.protocol));
            Ok(())
        })
    })
    .await
    .map(changed)
}

async fn add_backend(
    State(shared): State<Arc<Shared>>,
    UrlPath((proto, vip)): UrlPath<(String, String)>,
    Json(new): Json<NewBackend>,
) -> Answer<Changed> {
    let name = service_name(&proto, &vip)?;
    blocking(move || {
        change(&shared, |cfg| {
            let service = find_service(cfg, &name)?;
            if service.backends.iter().any(|b| b.address == new.address) {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("service {name} has backend {} already", new.address),
                ));
            }
            service.backends.push(Backend {
                address: new.address,
                weight: new.weight,
                drain: false,
                quic_id: new.quic_id,
            });
            Ok(())
        })
    })
    .await
    .map(changed)
}

async fn remove_backend(
    State(shared): State<Arc<Shared>>,
    UrlPath((proto, vip, addr)): UrlPath<(String, String, String)>,
    Query(q): Query<CutQuery>,
) -> Answer<Changed> {
    let name = service_name(&proto, &vip)?;
    let address = parse_backend(&addr)?;
    blocking(move || {
        let id = lock(&shared.registry)
            .service(&name)
            .and_then(|s| s.backends.iter().find(|b| b.config.address == address))
            .map(|b| b.id);
        let changes = change(&shared, |cfg| {
            let service = find_service(cfg, &name)?;
            find_backend(service, address)?;
            service.backends.retain(|b| b.address != address);
            Ok(())
        })?;
        // The backend is out of the table now: no new flow can reach it, so what is cut
        // stays cut. A cut that fails is said with the change, not as the request's error:
        // the backend is gone either way, and a retry would only find it gone.
        let (flows_cut, cut_failed) = match (q.cut, id) {
            (true, Some(id)) => match lock(&shared.conntrack).cut(id) {
                Ok(cut) => (cut, None),
                Err(e) => (0, Some(format!("{e:#}"))),
            },
            _ => (0, None),
        };
        Ok(Changed {
            changes,
            flows_cut,
            cut_failed,
        })
    })
    .await
    .map(Json)
}

async fn drain_backend(
    State(shared): State<Arc<Shared>>,
    UrlPath((proto, vip, addr)): UrlPath<(String, String, String)>,
) -> Answer<Changed> {
    let name = service_name(&proto, &vip)?;
    let address = parse_backend(&addr)?;
    blocking(move || {
        change(&shared, |cfg| {
            find_backend(find_service(cfg, &name)?, address)?.drain = true;
            Ok(())
        })
    })
    .await
    .map(changed)
}

async fn weight_backend(
    State(shared): State<Arc<Shared>>,
    UrlPath((proto, vip, addr)): UrlPath<(String, String, String)>,
    Json(w): Json<Weight>,
) -> Answer<Changed> {
    let name = service_name(&proto, &vip)?;
    let address = parse_backend(&addr)?;
    blocking(move || {
        change(&shared, |cfg| {
            let backend = find_backend(find_service(cfg, &name)?, address)?;
            backend.weight = w.weight;
            // A weight is an order to take flows again.
            backend.drain = false;
            Ok(())
        })
    })
    .await
    .map(changed)
}

async fn apply(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<ApplyRequest>,
) -> Answer<Changed> {
    blocking(move || {
        let mut config =
            Config::parse(&req.text).map_err(|e| bad(format!("config {}: {e}", req.source)))?;
        shared.overrides.apply(&mut config);
        apply_config(&shared, config, &req.source)
    })
    .await
    .map(changed)
}

async fn flows(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<LimitQuery>,
) -> Answer<Vec<Flow>> {
    blocking(move || {
        let limit = q.limit.unwrap_or(100);
        let timeouts = lock(&shared.registry).running().conntrack.timeouts();
        let flows = lock(&shared.conntrack).flows(limit).map_err(internal)?;
        let now = conntrack::monotonic_ns();
        Ok(flows
            .into_iter()
            .map(|(key, entry)| {
                let state = FlowState::of(key.proto, &entry.seen);
                let idle = now.saturating_sub(entry.last_seen_ns);
                Flow {
                    protocol: match key.proto {
                        lb_common::maps::PROTO_TCP => "tcp".into(),
                        lb_common::maps::PROTO_UDP => "udp".into(),
                        p => p.to_string(),
                    },
                    client: key.src.to_socket().to_string(),
                    vip: key.dst.to_socket().to_string(),
                    backend: entry.rewrite.dst.to_socket().to_string(),
                    snat: entry.rewrite.src.to_socket().to_string(),
                    state: state.name().into(),
                    idle_s: idle as f64 / 1e9,
                    expires_in_s: remaining_ns(&entry, key.proto, &timeouts, now) as f64 / 1e9,
                }
            })
            .collect())
    })
    .await
    .map(Json)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::delete;
    use hyper::Method;

    use super::*;
    use crate::client::{Client, backend_path, service_path};

    /// What the router answers for a service's or backend's path: the names parsed back.
    fn echo_router() -> Router {
        Router::new()
            .route(
                SERVICE_PATH,
                delete(
                    |UrlPath((proto, vip)): UrlPath<(String, String)>| async move {
                        service_name(&proto, &vip).map(|name| Json(name.to_string()))
                    },
                ),
            )
            .route(
                BACKEND_PATH,
                delete(
                    |UrlPath((proto, vip, addr)): UrlPath<(String, String, String)>| async move {
                        let name = service_name(&proto, &vip)?;
                        let address = parse_backend(&addr)?;
                        Ok::<_, ApiError>(Json(format!("{name} {address}")))
                    },
                ),
            )
    }

    /// The paths the client makes for an IPv6 service and backend are valid URL paths, and
    /// the server parses them back to the same service and backend (over a real socket, so
    /// through hyper's URI checks and axum's decoding); IPv4 ones are as they always were.
    #[tokio::test]
    async fn service_and_backend_paths_round_trip() {
        let vip: SocketAddr = "[2001:db8::100]:80".parse().unwrap();
        let backend: SocketAddr = "[2001:db8:20::2]:8080".parse().unwrap();
        assert_eq!(
            backend_path(&vip, Protocol::Udp, &backend),
            "/v1/services/udp/%5B2001:db8::100%5D:80/backends/%5B2001:db8:20::2%5D:8080"
        );
        let v4: SocketAddr = "10.10.0.100:443".parse().unwrap();
        assert_eq!(
            service_path(&v4, Protocol::Tcp),
            "/v1/services/tcp/10.10.0.100:443"
        );

        let dir = std::env::temp_dir().join(format!("xlb-api-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, echo_router()).await });
        let client = Client::new(socket);
        let ask = async |path: String| {
            client
                .call(Method::DELETE, &path, None)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e:#}"))
        };
        assert_eq!(
            ask(service_path(&vip, Protocol::Tcp)).await,
            "[2001:db8::100]:80/tcp"
        );
        assert_eq!(
            ask(backend_path(&vip, Protocol::Udp, &backend)).await,
            "[2001:db8::100]:80/udp [2001:db8:20::2]:8080"
        );
        assert_eq!(
            ask(backend_path(
                &v4,
                Protocol::Tcp,
                &"10.20.0.2:80".parse().unwrap()
            ))
            .await,
            "10.10.0.100:443/tcp 10.20.0.2:80"
        );
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
