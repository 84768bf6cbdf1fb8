//! Reads the per-CPU counters and prints them, one `key=value` record per line:
//! `service ...`, `backend ...`, `reason ...`, `handoff ...`, `interface ...` and
//! `conntrack ...` lines, between a `stats begin` and a `stats end` line (the integration
//! tests parse these). Counters count from start-up, so the last snapshot has them all.

use std::fmt::Write as _;

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

use crate::{config::Checked, conntrack::SweepReport, tables::Layout};

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// By service, config order.
    pub services: Vec<FlowStats>,
    /// By service, then backend, config order.
    pub backends: Vec<Vec<FlowStats>>,
    /// By [`Reason`] index.
    pub reasons: Vec<u64>,
    /// By [`Handoff`] index: what the tc program did with frames handed to it.
    pub handoffs: Vec<u64>,
    /// Flows per state, from the sweeper's latest pass.
    pub conntrack: Option<SweepReport>,
    /// Per interface: frames the kernel failed to send for XDP since xlb started.
    pub interfaces: Vec<(String, u64)>,
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

pub fn read(ebpf: &Ebpf, layout: &Layout) -> anyhow::Result<Snapshot> {
    let flow_stats = |name: &str| -> anyhow::Result<PerCpuArray<&MapData, FlowStats>> {
        Ok(ebpf
            .map(name)
            .with_context(|| format!("map {name}"))?
            .try_into()?)
    };
    let sum = |array: &PerCpuArray<&MapData, FlowStats>, index: u32| -> anyhow::Result<FlowStats> {
        let mut total = FlowStats::default();
        for cpu in array.get(&index, 0)?.iter() {
            total.add(cpu);
        }
        Ok(total)
    };
    let service_stats = flow_stats(names::SERVICE_STATS)?;
    let backend_stats = flow_stats(names::BACKEND_STATS)?;
    let mut snap = Snapshot::default();
    for (sid, ids) in layout.backend_ids.iter().enumerate() {
        snap.services.push(sum(&service_stats, sid as u32)?);
        snap.backends.push(
            ids.iter()
                .map(|id| sum(&backend_stats, *id))
                .collect::<Result<_, _>>()?,
        );
    }
    snap.reasons = reasons(ebpf)?;
    snap.handoffs = per_cpu_sums(ebpf, names::HANDOFFS, Handoff::COUNT)?;
    Ok(snap)
}

/// The `service`/`backend`/`reason` lines; reasons that never happened are left out.
pub fn format(cfg: &Checked, snap: &Snapshot) -> String {
    let mut out = String::from("stats begin\n");
    let counters = |s: &FlowStats| {
        format!(
            "flows={} packets_in={} bytes_in={} packets_out={} bytes_out={}",
            s.flows, s.packets_in, s.bytes_in, s.packets_out, s.bytes_out
        )
    };
    for (service, (stats, backends)) in cfg
        .services
        .iter()
        .zip(snap.services.iter().zip(&snap.backends))
    {
        let _ = writeln!(
            out,
            "service vip={} proto={} {}",
            service.vip,
            service.protocol,
            counters(stats)
        );
        for (b, stats) in service.backends.iter().zip(backends) {
            let _ = writeln!(
                out,
                "backend service={service} address={} weight={} {}",
                b.address,
                b.weight,
                counters(stats)
            );
        }
    }
    for (reason, packets) in Reason::ALL.iter().zip(&snap.reasons) {
        if *packets > 0 {
            let _ = writeln!(out, "reason name={} packets={packets}", reason.name());
        }
    }
    for (handoff, packets) in Handoff::ALL.iter().zip(&snap.handoffs) {
        if *packets > 0 {
            let _ = writeln!(out, "handoff name={} packets={packets}", handoff.name());
        }
    }
    for (iface, errors) in &snap.interfaces {
        let _ = writeln!(out, "interface name={iface} xdp_send_errors={errors}");
    }
    if let Some(ct) = &snap.conntrack {
        let _ = writeln!(
            out,
            "conntrack flows={} entries={} capacity={} expired={} pruned={} sweep_ms={:.1}",
            ct.total_flows(),
            ct.entries,
            cfg.conntrack.entries,
            ct.expired,
            ct.pruned,
            ct.took.as_secs_f64() * 1000.0
        );
        for state in FlowState::ALL {
            let _ = writeln!(
                out,
                "conntrack_state name={} flows={}",
                state.name(),
                ct.flows[state as usize]
            );
        }
    }
    out.push_str("stats end\n");
    out
}
