//! Prometheus metrics at `http://[api] metrics/metrics`, in the text format of the
//! Prometheus project's own crate (prometheus-client). Every scrape reads the maps afresh
//! ([`Shared::stats`]), so the metrics and `xlb stats` never disagree.
//!
//! Names: `xlb_` prefix, `_total` on counters; labels `service` ("vip/protocol"), `backend`
//! ("address:port", "[address]:port" for IPv6), `reason`, `state`.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{api::Shared, stats::Stats};

type Labels = Vec<(&'static str, String)>;

/// Listens for metrics scrapes on `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another xlb daemon in this network namespace?)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "listening for metrics on {addr}: {e}{hint}; set [api] metrics to another \
             address, or \"\" to turn them off"
        )
    })
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("the metrics server stopped: {e}");
        }
    })
}

async fn scrape(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let stats = shared.stats()?;
        let rebuilds = shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rebuilds;
        render(&stats, rebuilds)
    })
    .await;
    match text {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The metrics text for one set of counters.
pub fn render(stats: &Stats, rebuilds: u64) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("xlb");
    let counter = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<Labels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    };
    let gauge = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<Labels, Gauge>::default();
        registry.register(name, help, family.clone());
        family
    };
    let packets = counter(
        &mut registry,
        "service_packets",
        "Packets of a service, both ways",
    );
    let bytes = counter(
        &mut registry,
        "service_bytes",
        "Bytes (whole frames) of a service, both ways",
    );
    let flows = counter(&mut registry, "service_flows", "Flows a service has taken");
    let active = gauge(
        &mut registry,
        "service_active_flows",
        "Flows of a service open now",
    );
    let b_packets = counter(
        &mut registry,
        "backend_packets",
        "Packets of a backend, both ways",
    );
    let b_bytes = counter(
        &mut registry,
        "backend_bytes",
        "Bytes (whole frames) of a backend, both ways",
    );
    let b_flows = counter(&mut registry, "backend_flows", "Flows a backend has taken");
    let b_active = gauge(
        &mut registry,
        "backend_active_flows",
        "Flows of a backend open now",
    );
    let b_weight = gauge(&mut registry, "backend_weight", "A backend's weight");
    let b_state = gauge(
        &mut registry,
        "backend_state",
        "1 for the state a backend is in (up, down, draining), 0 for the others",
    );
    let reasons = counter(
        &mut registry,
        "packets",
        "Packets by the verdict the XDP program gave them",
    );
    for s in &stats.services {
        let service = format!("{}/{}", s.vip, s.protocol);
        let l = vec![("service", service.clone())];
        packets.get_or_create(&l).inc_by(s.traffic.packets);
        bytes.get_or_create(&l).inc_by(s.traffic.bytes);
        flows.get_or_create(&l).inc_by(s.traffic.flows);
        active.get_or_create(&l).set(s.active_flows as i64);
        for b in &s.backends {
            let l = vec![("service", service.clone()), ("backend", b.address.clone())];
            b_packets.get_or_create(&l).inc_by(b.traffic.packets);
            b_bytes.get_or_create(&l).inc_by(b.traffic.bytes);
            b_flows.get_or_create(&l).inc_by(b.traffic.flows);
            b_active.get_or_create(&l).set(b.active_flows as i64);
            b_weight.get_or_create(&l).set(b.weight as i64);
            for state in ["up", "down", "draining"] {
                let mut l = l.clone();
                l.push(("state", state.into()));
                b_state.get_or_create(&l).set((b.state == state) as i64);
            }
        }
    }
    let g_packets = counter(
        &mut registry,
        "gateway_packets",
        "Packets through a NAT gateway, both ways",
    );
    let g_bytes = counter(
        &mut registry,
        "gateway_bytes",
        "Bytes (whole frames) through a NAT gateway, both ways",
    );
    let g_flows = counter(
        &mut registry,
        "gateway_flows",
        "Flows a NAT gateway has taken",
    );
    for g in &stats.gateways {
        let l = vec![("gateway", g.source.clone())];
        g_packets.get_or_create(&l).inc_by(g.traffic.packets);
        g_bytes.get_or_create(&l).inc_by(g.traffic.bytes);
        g_flows.get_or_create(&l).inc_by(g.traffic.flows);
    }
    for (reason, n) in &stats.reasons {
        reasons
            .get_or_create(&vec![("reason", reason.clone())])
            .inc_by(*n);
    }
    let table_rebuilds = Counter::<u64>::default();
    registry.register(
        "table_rebuilds",
        "Maglev tables rebuilt and switched since start",
        table_rebuilds.clone(),
    );
    table_rebuilds.inc_by(rebuilds);
    if let Some(ct) = &stats.conntrack {
        for (name, help, value) in [
            ("conntrack_flows", "Flows tracked now", ct.flows),
            (
                "conntrack_capacity_flows",
                "Flows the conntrack table holds at most",
                ct.capacity as u64,
            ),
            (
                "conntrack_entries",
                "Conntrack map entries in use (two per flow)",
                ct.entries,
            ),
        ] {
            let g = Gauge::<i64>::default();
            registry.register(name, help, g.clone());
            g.set(value as i64);
        }
        let states = gauge(
            &mut registry,
            "conntrack_state_flows",
            "Flows tracked now, by state",
        );
        for (state, n) in &ct.states {
            states
                .get_or_create(&vec![("state", state.clone())])
                .set(*n as i64);
        }
    }
    let mut out = String::new();
    encode(&mut out, &registry).context("encoding the metrics")?;
    Ok(out)
}
