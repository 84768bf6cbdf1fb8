//! The xlb XDP program: IPv4 TCP/UDP full NAT with Maglev backend selection.
//!
//! One packet's path, top to bottom:
//! 1. [`parse::parse`] bounds-checks Ethernet, IPv4 (IHL-sized) and the L4 ports, and builds
//!    the packet's [`FlowKey`](lb_common::maps::FlowKey);
//! 2. [`conntrack::lookup`] finds how this flow direction is rewritten, or, for the first
//!    packet to a service, [`conntrack::create`] picks a backend from the service's Maglev
//!    slice and a SNAT port, and stores both directions;
//! 3. [`forward::route`] asks the kernel FIB for the next hop of the rewritten packet;
//! 4. [`nat::rewrite`] rewrites addresses, ports, TTL and checksums, and the MACs;
//! 5. the packet leaves by XDP_TX or a devmap redirect, or goes to the kernel.
//!
//! Every packet ends with one [`Reason`], counted in `REASONS`; its XDP action follows from it.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    maps::{
        Backend, Config, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SIZE, DEFAULT_MAX_BACKENDS,
        DEFAULT_MAX_SERVICES, FlowKey, FlowStats, MAX_INTERFACES, NatEntry, Service, ServiceKey,
    },
    reason::Reason,
};

// Map names are the statics' names; lb_common::maps::names lists them for userspace.
// The capacities below are defaults: userspace resizes SERVICES, MAGLEV, BACKENDS,
// CONNTRACK and the stats arrays at load time from the config.

#[map]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES * DEFAULT_MAGLEV_SIZE, 0);

#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
static CONNTRACK: LruHashMap<FlowKey, NatEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Working space of `conntrack::create`, one slot per CPU: its entries and keys do not fit
/// on the 512-byte BPF stack next to the hot path's frame.
#[map]
static CREATE_SCRATCH: PerCpuArray<conntrack::Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

#[map]
static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map]
static SERVICE_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
static BACKEND_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let reason = match process(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    stats::count_reason(reason);
    // These mean the control plane wrote inconsistent tables or the kernel refused an
    // insert: rare, and worth a line in xlb's log on top of the counter.
    if matches!(reason, Reason::DropInternal | Reason::DropConntrackInsert) {
        aya_log_ebpf::error!(&ctx, "dropped a packet: {}", reason.name());
    }
    reason.xdp_action()
}

/// Decides one packet's fate. `Err` is an early exit (not for us, malformed, no backend);
/// `Ok` carries how a rewritten packet left.
#[inline(always)]
fn process(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse::parse(ctx)?;

    let entry = match conntrack::lookup(&pkt.key) {
        Some(entry) => {
            forwardable(&pkt)?;
            entry
        }
        None => {
            let service = conntrack::service(&pkt.key).ok_or(Reason::PassNoService)?;
            // Checked before the flow is created, so a packet we will not forward (a
            // traceroute probe with TTL 1, say) does not take a SNAT port.
            forwardable(&pkt)?;
            conntrack::create(&pkt.key, &service)?
        }
    };

    let hop = forward::route(ctx, &pkt, &entry)?;
    nat::rewrite(ctx, &pkt, &entry, hop.ttl_decrement())?;
    let sent = forward::send(ctx, hop)?;
    // Counted once the packet has left (or gone to the kernel rewritten), so a packet
    // dropped as unreachable does not show up as service traffic.
    stats::count_flow_packet(&entry, pkt.frame_len);
    Ok(sent)
}

/// Whether a packet of ours can be rewritten and forwarded: its fragments cannot (later
/// fragments carry no ports, so they could not follow the rewrite), and a TTL about to expire
/// goes to the kernel untouched so it answers with ICMP time-exceeded.
#[inline(always)]
fn forwardable(pkt: &parse::Packet) -> Result<(), Reason> {
    if pkt.fragmented {
        return Err(Reason::DropFragment);
    }
    if pkt.ttl <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    Ok(())
}

// On the host (clippy, rust-analyzer) std supplies the panic handler — it is linked there
// anyway through workspace feature unification — so only the BPF build defines one.
#[cfg(not(target_arch = "bpf"))]
extern crate std;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic; this is never called.
    loop {}
}
