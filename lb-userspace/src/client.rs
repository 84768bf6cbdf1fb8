//! The client side of the API: one HTTP/1.1 request per command over the daemon's unix
//! socket, and what the commands print — a table for people, or the API's JSON as it came
//! (`-o json`) for scripts. Any error exits non-zero with one line that says what to do.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use comfy_table::{Table, presets};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    api::{Changed, Flow, Status},
    config::Protocol,
    stats::{BackendStats, Stats},
};

/// `-o`: how a command prints its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// How long a command waits for the daemon's answer by default (`--timeout`): a change
/// takes milliseconds, a `--cut` of a full table a few seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the daemon's API socket.
pub struct Client {
    socket: PathBuf,
    /// How long to wait for an answer: a daemon that is stopped (SIGSTOP) or stuck still
    /// takes connections, which the kernel queues.
    timeout: Duration,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client {
            socket,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(self, timeout: Duration) -> Client {
        Client { timeout, ..self }
    }

    /// Sends one request; returns the answer's JSON, or the daemon's error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(answer) => answer,
            Err(_) => bail!(
                "the xlb daemon at {} is not answering: no answer within {} s (is it stopped \
                 or stuck? `xlb doctor` checks; --timeout waits longer)",
                self.socket.display(),
                self.timeout.as_secs_f64()
            ),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let stream = match tokio::net::UnixStream::connect(&self.socket).await {
            Ok(s) => s,
            Err(e) => return Err(self.connect_error(e)),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the xlb daemon")?;
        tokio::spawn(conn);
        let body = match body {
            Some(v) => Full::new(Bytes::from(serde_json::to_vec(&v)?)),
            None => Full::new(Bytes::new()),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "xlb")
            .header("content-type", "application/json")
            .body(body)?;
        let answer = sender
            .send_request(request)
            .await
            .context("the xlb daemon did not answer (did it stop?)")?;
        let status = answer.status();
        let bytes = answer
            .into_body()
            .collect()
            .await
            .context("reading the daemon's answer")?
            .to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or_else(
            |_| serde_json::json!({ "error": String::from_utf8_lossy(&bytes).trim().to_string() }),
        );
        if !status.is_success() {
            let message = json
                .get("error")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                // An answer without a message (a path an older daemon does not know):
                // its status says what happened.
                .unwrap_or_else(|| format!("the daemon answered {status} to {path}"));
            bail!("{message}");
        }
        Ok(json)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<(T, Value)> {
        let json = self.call(Method::GET, path, None).await?;
        let typed = serde_json::from_value(json.clone())
            .context("the daemon's answer is not what this xlb expects (another version?)")?;
        Ok((typed, json))
    }

    fn connect_error(&self, e: std::io::Error) -> anyhow::Error {
        let path = self.socket.display();
        match e.kind() {
            ErrorKind::NotFound => anyhow!(
                "no xlb daemon at {path}: the socket does not exist. Start one with `xlb run \
                 --config FILE`, or point to its socket with --socket or XLB_SOCKET"
            ),
            ErrorKind::ConnectionRefused => anyhow!(
                "no xlb daemon is listening on {path} (the socket is left from one that \
                 died?). Start one with `xlb run --config FILE`"
            ),
            ErrorKind::PermissionDenied => {
                anyhow!("permission denied on {path}: the xlb API is for root only (try sudo)")
            }
            _ => anyhow!("connecting to the xlb daemon at {path}: {e}"),
        }
    }
}

/// The API path of a service: `/v1/services/{proto}/{vip}`.
pub fn service_path(vip: &SocketAddr, protocol: Protocol) -> String {
    format!("/v1/services/{protocol}/{}", endpoint_segment(vip))
}

/// The API path of a backend of a service: `.../backends/{addr}`.
pub fn backend_path(vip: &SocketAddr, protocol: Protocol, address: &SocketAddr) -> String {
    format!(
        "{}/backends/{}",
        service_path(vip, protocol),
        endpoint_segment(address)
    )
}

/// An endpoint as one segment of a URL path. An IPv6 endpoint's brackets are
/// percent-encoded: RFC 3986 allows them only around a URL's host, not in its path. The
/// API's router decodes them (axum's `Path`); ':' may stay as it is.
fn endpoint_segment(endpoint: &SocketAddr) -> String {
    endpoint.to_string().replace('[', "%5B").replace(']', "%5D")
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_uppercase()));
    t
}

/// Prints `json` as it came, or `people` made from it.
pub fn print(output: Output, json: &Value, people: impl FnOnce() -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(json)?),
        Output::Table => print!("{}", people()),
    }
    Ok(())
}

pub fn status_text(s: &Status) -> String {
    let mut out = format!(
        "xlb {} (pid {}), up {}s, program id {}\n",
        s.version, s.pid, s.uptime_s, s.program_id
    );
    for i in &s.interfaces {
        out += &format!(
            "interface {} (ifindex {}): XDP {}\n",
            i.name, i.ifindex, i.mode
        );
    }
    out += &format!(
        "services {}, backends {}, NAT gateways {}\nflows {} of {} ({:.1}%)\nSNAT ports {}\ntable \
         rebuilds {}\n",
        s.services,
        s.backends,
        s.gateways,
        s.flows,
        s.flow_capacity,
        s.flows as f64 * 100.0 / s.flow_capacity.max(1) as f64,
        s.snat_ports,
        s.table_rebuilds
    );
    if s.retired_ids != (0, 0) {
        out += &format!(
            "retired ids waiting for their flows to end: {} service(s), {} backend(s)\n",
            s.retired_ids.0, s.retired_ids.1
        );
    }
    out
}

pub fn services_text(stats: &Stats) -> String {
    let mut t = table(&[
        "vip",
        "protocol",
        "mode",
        "scheduler",
        "snat",
        "backends",
        "up",
        "active flows",
        "flows",
        "packets",
        "bytes",
    ]);
    for s in &stats.services {
        let up = s.backends.iter().filter(|b| b.state == "up").count();
        t.add_row(vec![
            s.vip.clone(),
            s.protocol.clone(),
            s.mode.clone(),
            s.scheduler.clone(),
            s.snat.clone(),
            s.backends.len().to_string(),
            up.to_string(),
            s.active_flows.to_string(),
            s.traffic.flows.to_string(),
            s.traffic.packets.to_string(),
            s.traffic.bytes.to_string(),
        ]);
    }
    format!("{t}\n")
}

/// The columns of a backend's row, after its name.
const BACKEND_COLUMNS: [&str; 6] = [
    "weight",
    "state",
    "active flows",
    "flows",
    "packets",
    "bytes",
];

fn backend_row(name: String, b: &BackendStats) -> Vec<String> {
    vec![
        name,
        b.weight.to_string(),
        b.state.clone(),
        b.active_flows.to_string(),
        b.traffic.flows.to_string(),
        b.traffic.packets.to_string(),
        b.traffic.bytes.to_string(),
    ]
}

pub fn backends_text(stats: &Stats) -> String {
    let mut t = table(&[&["address"][..], &BACKEND_COLUMNS].concat());
    for s in &stats.services {
        for b in &s.backends {
            t.add_row(backend_row(b.address.clone(), b));
        }
    }
    format!("{t}\n")
}

pub fn stats_text(stats: &Stats) -> String {
    let mut t = table(&[&["service / backend"][..], &BACKEND_COLUMNS].concat());
    for s in &stats.services {
        t.add_row(vec![
            format!("{}/{}", s.vip, s.protocol),
            String::new(),
            String::new(),
            s.active_flows.to_string(),
            s.traffic.flows.to_string(),
            s.traffic.packets.to_string(),
            s.traffic.bytes.to_string(),
        ]);
        for b in &s.backends {
            t.add_row(backend_row(format!("  {}", b.address), b));
        }
    }
    for g in &stats.gateways {
        t.add_row(vec![
            format!("nat_gateway {} → {} {}", g.source, g.to, g.ports),
            String::new(),
            String::new(),
            g.open_flows.map_or_else(|| "-".into(), |n| n.to_string()),
            g.traffic.flows.to_string(),
            g.traffic.packets.to_string(),
            g.traffic.bytes.to_string(),
        ]);
    }
    let mut r = table(&["reason", "packets"]);
    for (reason, n) in &stats.reasons {
        if *n > 0 {
            r.add_row(vec![reason.clone(), n.to_string()]);
        }
    }
    let mut out = format!("{t}\n\n{r}\n");
    if let Some(ct) = &stats.conntrack {
        out += &format!(
            "\nconntrack: {} flows of {} ({} expired, {} pruned since start)\n",
            ct.flows, ct.capacity, ct.expired, ct.pruned
        );
        if !stats.gateways.is_empty() {
            out += &format!("NAT gateway UDP mappings: {}\n", ct.mappings);
        }
    }
    out
}

pub fn flows_text(flows: &[Flow]) -> String {
    let mut t = table(&[
        "protocol",
        "client",
        "vip",
        "backend",
        "snat",
        "state",
        "idle",
        "expires in",
    ]);
    for f in flows {
        t.add_row(vec![
            f.protocol.clone(),
            f.client.clone(),
            f.vip.clone(),
            f.backend.clone(),
            f.snat.clone(),
            f.state.clone(),
            format!("{:.1}s", f.idle_s),
            format!("{:.0}s", f.expires_in_s),
        ]);
    }
    format!("{t}\n")
}

pub fn changed_text(what: &str, c: &Changed) -> String {
    let ch = &c.changes;
    let mut out = format!(
        "{what}: {} service(s) added, {} removed; {} backend(s) added, {} removed; {} table(s) \
         rebuilt\n",
        ch.services_added,
        ch.services_removed,
        ch.backends_added,
        ch.backends_removed,
        ch.tables_rebuilt
    );
    if c.flows_cut > 0 {
        out += &format!("{} flow(s) cut\n", c.flows_cut);
    }
    out
}

/// Reads a config file for `xlb apply`: the daemon validates it (on its host).
pub fn read_config(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))
}
