//! The counters, read from the maps and summed over CPUs into one [`Stats`]: what
//! `xlb stats` prints (a table, or the JSON the API serves), what `/metrics` exports, and
//! what `xlb run` prints as `key=value` lines between `stats begin` and `stats end` (the
//! integration tests parse these). Counters count from when their object got its id.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use lb_common::{
    conntrack::FlowState,
    maps::{FlowStats, Handoff, names},
    reason::Reason,
};
use serde::{Deserialize, Serialize};

use crate::{conntrack::SweepReport, registry::Registry};

/// Everything xlb counts, at one moment.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    #[serde(default)]
    pub gateways: Vec<GatewayStats>,
    /// Packets per verdict, by reason name (every reason, zeros too).
    pub reasons: BTreeMap<String, u64>,
    /// What the tc program did with frames the XDP program handed it, by name.
    pub handoffs: BTreeMap<String, u64>,
    /// Frames the kernel failed to send for XDP since xlb started, per interface.
    pub interfaces: Vec<InterfaceStats>,
    /// From the sweeper's latest pass; absent before the first.
    pub conntrack: Option<ConntrackStats>,
}

/// One service: packets and bytes both ways, and flows created.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStats {
    pub vip: String,
    pub protocol: String,
    /// `fullnat` or `dnat`.
    pub mode: String,
    /// "-" in `dnat` mode.
    pub snat: String,
    pub scheduler: String,
    pub id: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
    /// Flows open now on its backends (their `active_flows` summed).
    pub active_flows: u64,
    pub backends: Vec<BackendStats>,
}

/// One NAT gateway: packets and bytes both ways (`in`: private → outside), and flows created.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayStats {
    /// The private network.
    pub source: String,
    /// The public addresses, comma-separated.
    pub to: String,
    /// The port range, "[first, last]".
    pub ports: String,
    pub id: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
    /// Flows open at the sweeper's latest pass (absent before the first).
    pub open_flows: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackendStats {
    pub address: String,
    pub weight: u32,
    /// "up", "down" or "draining".
    pub state: String,
    pub id: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
    pub active_flows: u64,
    /// Smoothed response time of its health checks, in milliseconds (absent when not
    /// checked).
    pub response_ms: Option<f64>,
}

/// A service's or backend's counters: `packets` and `bytes` are both directions summed.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows created.
    pub flows: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
}

impl From<FlowStats> for Traffic {
    fn from(s: FlowStats) -> Traffic {
        Traffic {
            packets: s.packets_in + s.packets_out,
            bytes: s.bytes_in + s.bytes_out,
            flows: s.flows,
            packets_in: s.packets_in,
            bytes_in: s.bytes_in,
            packets_out: s.packets_out,
            bytes_out: s.bytes_out,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub name: String,
    pub xdp_send_errors: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConntrackStats {
    pub flows: u64,
    pub entries: u64,
    pub capacity: u32,
    /// Since start-up.
    pub expired: u64,
    pub pruned: u64,
    pub orphans: u64,
    /// NAT gateways' UDP mappings held now.
    #[serde(default)]
    pub mappings: u64,
    pub sweep_ms: f64,
    /// Flows by state name.
    pub states: BTreeMap<String, u64>,
}

/// The `REASONS` counters, summed over CPUs, in [`Reason::ALL`] order.
pub fn reasons(ebpf: &Ebpf) -> anyhow::Result<Vec<u64>> {
    per_cpu_sums(ebpf, names::REASONS, Reason::COUNT)
}

fn per_cpu_sums(ebpf: &Ebpf, name: &str, count: u32) -> anyhow::Result<Vec<u64>> {
    let map: PerCpuArray<&MapData, u64> = ebpf
        .map(name)
        .with_context(|| format!("map {name}"))?
        .try_into()?;
    (0..count)
        .map(|i| Ok(map.get(&i, 0)?.iter().sum()))
        .collect()
}

/// Reads the counters of every running service and backend, and the verdicts.
pub fn read(
    registry: &Registry,
    sweep: Option<&SweepReport>,
    interfaces: Vec<(String, u64)>,
) -> anyhow::Result<Stats> {
    let tables = registry.tables();
    let mut stats = Stats::default();
    for service in registry.services() {
        let mut s = ServiceStats {
            vip: service.name.vip.to_string(),
            protocol: service.name.protocol.to_string(),
            mode: service.config.mode.name().into(),
            snat: service.config.snat_text(),
            scheduler: service.config.scheduler.name().into(),
            id: service.id,
            traffic: tables.service_stats(service.id)?.into(),
            active_flows: service.backends.iter().map(|b| tables.active(b.id)).sum(),
            backends: Vec::new(),
        };
        for b in &service.backends {
            s.backends.push(BackendStats {
                address: b.config.address.to_string(),
                weight: b.config.weight,
                state: b.state().name().into(),
                id: b.id,
                traffic: tables.backend_stats(b.id)?.into(),
                active_flows: tables.active(b.id),
                response_ms: (b.latency_us > 0).then(|| f64::from(b.latency_us) / 1000.0),
            });
        }
        stats.services.push(s);
    }
    for g in registry.gateways() {
        let to: Vec<String> = g.config.to.iter().map(|a| a.to_string()).collect();
        stats.gateways.push(GatewayStats {
            source: g.config.source.to_string(),
            to: to.join(","),
            ports: registry.running().gateway_ports(&g.config).to_string(),
            id: g.id,
            traffic: tables.service_stats(g.id)?.into(),
            open_flows: sweep.map(|ct| ct.by_service.get(&g.id).copied().unwrap_or(0)),
        });
    }
    for (reason, packets) in Reason::ALL.iter().zip(tables.reasons()?) {
        stats.reasons.insert(reason.name().into(), packets);
    }
    for (handoff, packets) in Handoff::ALL.iter().zip(tables.handoffs()?) {
        stats.handoffs.insert(handoff.name().into(), packets);
    }
    stats.interfaces = interfaces
        .into_iter()
        .map(|(name, xdp_send_errors)| InterfaceStats {
            name,
            xdp_send_errors,
        })
        .collect();
    stats.conntrack = sweep.map(|ct| ConntrackStats {
        flows: ct.total_flows(),
        entries: ct.entries,
        capacity: registry.running().conntrack.entries,
        expired: ct.expired,
        pruned: ct.pruned,
        orphans: ct.orphans,
        // Each mapping is stored both ways.
        mappings: ct.mappings / 2,
        sweep_ms: ct.took.as_secs_f64() * 1000.0,
        states: FlowState::ALL
            .iter()
            .map(|s| (s.name().to_string(), ct.flows[*s as usize]))
            .collect(),
    });
    Ok(stats)
}

/// The `stats begin` … `stats end` lines `xlb run` prints; reasons that never happened are
/// left out.
pub fn format(stats: &Stats) -> String {
    let mut out = String::from("stats begin\n");
    let counters = |t: &Traffic| {
        format!(
            "flows={} packets_in={} bytes_in={} packets_out={} bytes_out={}",
            t.flows, t.packets_in, t.bytes_in, t.packets_out, t.bytes_out
        )
    };
    for s in &stats.services {
        let _ = writeln!(
            out,
            "service vip={} proto={} {}",
            s.vip,
            s.protocol,
            counters(&s.traffic)
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "backend service={}/{} address={} weight={} state={} {}",
                s.vip,
                s.protocol,
                b.address,
                b.weight,
                b.state,
                counters(&b.traffic)
            );
        }
    }
    for g in &stats.gateways {
        let _ = writeln!(
            out,
            "gateway source={} to={} {}",
            g.source,
            g.to,
            counters(&g.traffic)
        );
    }
    for reason in Reason::ALL {
        let packets = stats.reasons.get(reason.name()).copied().unwrap_or(0);
        if packets > 0 {
            let _ = writeln!(out, "reason name={} packets={packets}", reason.name());
        }
    }
    for (name, packets) in &stats.handoffs {
        if *packets > 0 {
            let _ = writeln!(out, "handoff name={name} packets={packets}");
        }
    }
    for i in &stats.interfaces {
        let _ = writeln!(
            out,
            "interface name={} xdp_send_errors={}",
            i.name, i.xdp_send_errors
        );
    }
    if let Some(ct) = &stats.conntrack {
        let _ = writeln!(
            out,
            "conntrack flows={} entries={} capacity={} expired={} pruned={} sweep_ms={:.1}",
            ct.flows, ct.entries, ct.capacity, ct.expired, ct.pruned, ct.sweep_ms
        );
        for state in FlowState::ALL {
            let _ = writeln!(
                out,
                "conntrack_state name={} flows={}",
                state.name(),
                ct.states.get(state.name()).copied().unwrap_or(0)
            );
        }
    }
    out.push_str("stats end\n");
    out
}
