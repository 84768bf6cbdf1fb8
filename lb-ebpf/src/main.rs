//! The xlb XDP program: IPv4 and IPv6 TCP/UDP load balancing by full NAT or destination NAT, an egress
//! NAT gateway (TCP, UDP with endpoint-independent mappings, pings by identifier), ICMP
//! answered or translated, and the small tc program that sends what the XDP program cannot
//! send itself.
//!
//! One packet's path, top to bottom:
//! 1. [`parse::parse`] bounds-checks Ethernet, IPv4 (IHL-sized) or IPv6 (its extension
//!    headers walked) and the L4 ports and TCP flags, and builds the packet's
//!    [`FlowKey`](lb_common::maps::FlowKey) in the per-CPU `PACKET`;
//! 2. [`conntrack::lookup`] finds how this flow direction is rewritten and records what the
//!    packet tells about the flow (TCP flags, time); or, for a new flow to a service,
//!    [`conntrack::backend`] picks a backend from the service's Maglev slice (a NAT
//!    gateway's flow, [`conntrack::gateway`], goes to its own destination),
//!    [`forward::route`] finds the way to it, and [`conntrack::create`] stores both
//!    directions with a SNAT port (or, in `dnat` mode, the client's own);
//!    ICMP instead goes to [`icmp::handle`], which answers pings to a VIP and translates
//!    errors about tracked flows;
//! 3. the next-hop cache (`forward::cached_hop`), or on a miss [`forward::route`], which
//!    asks the kernel FIB, gives the next hop of the rewritten packet;
//! 4. [`nat::rewrite`] rewrites addresses, ports, TTL and checksums;
//! 5. [`forward::send`] sets the MACs and sends by XDP_TX or a devmap redirect, or hands the
//!    frame to [`handoff`]'s tc program (next hop not resolved yet, or an interface without
//!    our XDP program), or leaves it to the kernel.
//!
//! Every packet ends with one [`Reason`], counted in `REASONS`; its XDP action follows from it.
#![no_std]
// The atomic add of `conntrack::count_start` (the BPF target has no atomic types).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![no_main]

mod bench;
mod conntrack;
mod forward;
mod handoff;
mod icmp;
mod nat;
mod parse;
mod quic;
mod stats;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use forward::Hop;
use lb_common::{
    conntrack::TCP_RST,
    hash::NEXT_HOP_SLOTS,
    maps::{
        BackendEntry, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SIZE, DEFAULT_MAX_BACKENDS,
        DEFAULT_MAX_SERVICES, Endpoint, FlowKey, FlowStats, Handoff, MAX_INTERFACES, MODE_DNAT,
        Mapping, MappingKey, NO_BACKEND, NatEntry, Rewrite, ServiceEntry, ServiceKey, Settings,
    },
    reason::Reason,
};

// Map names are the statics' names; lb_common::maps::names lists them for userspace.
// The capacities below are defaults: userspace resizes SERVICES, MAGLEV, BACKENDS,
// CONNTRACK and the stats arrays at load time from the config.

/// Not preallocated: memory follows the services in use. A replaced entry's memory may be
/// reused by the next insert, so userspace waits a grace period after every replace before
/// it writes again (`lb_userspace::tables`).
#[map]
static SERVICES: HashMap<ServiceKey, ServiceEntry> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Two tables per service, two slots per entry (see `lb_common::maps::names::MAGLEV`);
/// memory-mapped by userspace, which writes a whole table with one copy.
#[map]
static MAGLEV: Array<[u32; 2]> =
    Array::with_max_entries(DEFAULT_MAX_SERVICES * DEFAULT_MAGLEV_SIZE, BPF_F_MMAPABLE);

/// The addresses services listen on, whose pings the program answers.
#[map]
static VIPS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// The NAT gateways, by the private network they serve (see `lb_common::maps::names::GATEWAYS`).
#[map]
static GATEWAYS: LpmTrie<[u8; 16], ServiceEntry> =
    LpmTrie::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// A NAT gateway's UDP mappings, both ways (see `lb_common::maps::names::MAPPINGS`).
#[map]
static MAPPINGS: HashMap<MappingKey, Mapping> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static BACKENDS: Array<BackendEntry> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Not an LRU map: nothing is evicted to make room. Preallocated: every entry's memory is
/// taken when the map is made, so a new flow's inserts take an entry off a free list and
/// never allocate. Allocating (without preallocation) added, from time to time, a refill
/// of the map's allocator and its memory charge to a new flow's run: with a million flows
/// in the table, the mean new flow cost three times the median one (`docs/benchmarks.md`,
/// "Preallocated conntrack"). It also makes the configured capacity certain: an insert below
/// it cannot fail for want of memory.
#[map]
static CONNTRACK: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

#[map]
static CONFIG: Array<Settings> = Array::with_max_entries(1, 0);

/// Working space of `conntrack::create`, one slot per CPU: its entries and keys do not fit
/// on the 512-byte BPF stack next to the hot path's frame.
#[map]
static CREATE_SCRATCH: PerCpuArray<conntrack::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A new flow's service (or gateway) entry and destination, one slot per CPU (see
/// `conntrack::stage`).
#[map]
static NEW_FLOW: PerCpuArray<conntrack::Staged> = PerCpuArray::with_max_entries(1, 0);

/// The packet being processed, as `parse::parse` read it, one slot per CPU. Off the stack
/// for room, and for the verifier: read back from a map, every field is as unknown to it
/// after `parse` whichever way `parse` went (IPv4 or IPv6, options, extension headers),
/// so it checks the rest of the program once for all of them instead of once per way.
#[map]
static PACKET: PerCpuArray<parse::Packet> = PerCpuArray::with_max_entries(1, 0);

/// The data plane's clock as this CPU last read it, and the jiffy it read it in
/// (`parse::Clock`): a tracked packet's or a new flow's clock is read once per CPU per
/// timer tick.
#[map]
static CLOCK: PerCpuArray<parse::Clock> = PerCpuArray::with_max_entries(1, 0);

/// How the packet being processed is rewritten (its flow's `Rewrite` for its direction),
/// one slot per CPU: off the stack, so `parse` fits inline in `xlb`'s frame.
#[map]
static REWRITE: PerCpuArray<Rewrite> = PerCpuArray::with_max_entries(1, 0);

/// Working space of `icmp::error`, one slot per CPU, for the same reason.
#[map]
static ICMP_SCRATCH: PerCpuArray<icmp::Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

/// Next hops the FIB gave, by source, destination, protocol and ingress interface, for a
/// second (`forward::cached_hop`, `forward::route`): a flow's packets skip the lookup. A
/// direct-mapped cache per CPU (`forward::HopSlot`, 4096 × 64 bytes, a quarter of a MiB
/// per CPU): a slot's read and write never race, and a hit costs an inlined array lookup
/// and five compares where a hash map's hashed 40 bytes and walked a bucket.
#[map]
static NEXT_HOPS: PerCpuArray<forward::HopSlot> = PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// Where `forward::cached_hop` builds a lookup's `NEXT_HOPS` key, one per CPU, which
/// `forward::remember_hop` stores if the FIB then gives a direct hop.
#[map]
static HOP_SCRATCH: PerCpuArray<forward::HopKey> = PerCpuArray::with_max_entries(1, 0);

/// Interfaces (by ifindex) out of which a frame that came in on them is sent by devmap
/// redirect, not XDP_TX: veths, whose XDP_TX frames reach the peer only when it has an XDP
/// program of its own (redirected ones need only GRO).
#[map]
static NO_XDP_TX: HashMap<u32, u8> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[map]
static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map]
static SERVICE_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
static BACKEND_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
static HANDOFFS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Handoff::COUNT, 0);

/// Open flows per backend id: the XDP program adds, the sweeper takes off (see
/// `lb_common::maps::names::ACTIVE`); memory-mapped by userspace.
#[map]
static ACTIVE: Array<u64> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, BPF_F_MMAPABLE);

/// Userspace's record of the flow starts it has taken off `ACTIVE`; the program never
/// reads it, it is declared here so it is made and pinned with the others.
#[map]
static RELEASED: HashMap<FlowKey, u32> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, BPF_F_NO_PREALLOC);

/// For QUIC services: server id → backend id (see `lb_common::quic`).
#[map]
static QUIC_SERVERS: HashMap<u64, u32> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The round-robin turn counter of each service (by id), one per CPU.
#[map]
static CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

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

/// Does nothing: the benchmark's floor (`lb_common::maps::programs::NULL`), never attached.
#[xdp]
pub fn xlb_null(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Benchmark only: a packet generator in live-frames mode (`lb_common::maps::programs::TX`).
#[xdp]
pub fn xlb_tx(ctx: XdpContext) -> u32 {
    bench::transmit(&ctx)
}

/// Benchmark only: the null forwarder (`lb_common::maps::programs::NULL_FORWARDER`).
#[xdp]
pub fn xlb_null_forwarder(ctx: XdpContext) -> u32 {
    bench::forward(&ctx)
}

/// Benchmark only: drops every frame (`lb_common::maps::programs::DROP`).
#[xdp]
pub fn xlb_drop(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_DROP
}

/// Sends the frames the XDP program handed over (see [`handoff`]); lets everything else
/// through to the next tc program or the stack.
#[classifier]
pub fn xlb_handoff(ctx: TcContext) -> i32 {
    handoff::send(&ctx)
}

/// Decides one packet's fate. `Err` is an early exit (not for us, malformed, no backend);
/// `Ok` carries how a rewritten packet left.
///
/// The BPF stack is 512 bytes for a whole chain of calls, so what this frame holds is kept
/// small (the next hop and `parse`'s work; the packet is in `PACKET`, its rewrite in
/// `REWRITE`): a conntrack hit with nothing to record is handled here, and what else a hit
/// must do (`conntrack::settle`) and the new flow's path are subprograms with frames of
/// their own.
#[inline(always)]
fn process(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = PACKET.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's slot of a one-entry per-CPU array. An XDP program runs to
    // completion on its CPU (softirq), so no other run touches the slot meanwhile.
    let pkt = unsafe { &mut *pkt };
    parse::parse(ctx, pkt)?;
    let pkt = &*pkt;
    // Pings through a NAT gateway are flows like any other (their identifier is their
    // port); the rest of ICMP has a path of its own.
    if pkt.is_icmp() && icmp::takes(pkt) {
        return icmp::handle(ctx, pkt);
    }
    let rewrite = REWRITE.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's slot, as `pkt`'s. It holds the previous packet's rewrite until
    // `conntrack::lookup` or `new_flow` writes this one's, which every way on to the rewrite
    // and the counters does.
    let rewrite = unsafe { &mut *rewrite };
    let fwd = forwardable(pkt);
    let mut hop = Hop::NONE;
    let tracked = if conntrack::lookup(ctx, pkt, fwd.is_ok(), rewrite)? {
        fwd?;
        // A tracked packet's hop is nearly always in the next-hop cache: checked here,
        // without the call to `route` (which checks it again on a miss, before it asks
        // the FIB). A call and return cost some 20 ns on a CPU whose returns go through the
        // kernel's return thunks (`docs/benchmarks.md`, "Fewer calls on the tracked path").
        if !forward::cached_hop(ctx, pkt, &rewrite.src, &rewrite.dst, &mut hop) {
            forward::route(ctx, pkt, &rewrite.src, &rewrite.dst, &mut hop)?;
        }
        true
    } else if conntrack::service(&pkt.key).is_none() && conntrack::gateway(pkt).is_none() {
        // Not ours (most of a host's own traffic): told here, without the call to
        // `new_flow`. (Which looks the service up again: passed to it, the entry or the
        // fact that it is a gateway's led LLVM to pointer arithmetic the verifier refuses.)
        return Err(not_ours(pkt));
    } else {
        new_flow(ctx, pkt, rewrite, &mut hop)?
    };
    // A first packet too big made no flow (`new_flow` asked `answers_too_big`).
    if let Hop::TooBig { mtu, .. } = hop
        && (!tracked || answers_too_big(ctx, pkt, &rewrite.src, &rewrite.dst))
    {
        return icmp::too_big(ctx, pkt, mtu);
    }
    forward::prepare(ctx, &hop)?;
    nat::rewrite(ctx, pkt, rewrite, hop.ttl_decrement())?;
    forward::untag_for(ctx, pkt, &hop)?;
    let sent = forward::send(ctx, hop)?;
    // Counted once the packet has left (or gone to the kernel rewritten), so a packet
    // dropped as unreachable does not show up as service traffic.
    stats::count_flow_packet(rewrite, pkt.frame_len);
    Ok(sent)
}

/// The first packet of a flow, if it is addressed to a service (or comes from a NAT
/// gateway's private network): picks the backend (a gateway's is the packet's own
/// destination), routes to it (`hop`), and creates the flow, whose forward rewrite it
/// writes to `rewrite`. Returns whether it made the flow: not for a packet too big for its
/// way out that is to be answered.
///
/// `hop` is written, not returned: returned by value, the result goes through memory and
/// LLVM may leave a pointer into the caller's stack in R0 at the exit, which the verifier
/// refuses ("cannot return stack pointer to the caller").
#[inline(never)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    rewrite: &mut Rewrite,
    hop: &mut Hop,
) -> Result<bool, Reason> {
    let not_ours = not_ours(pkt);
    let (service, gateway) = match conntrack::service(&pkt.key) {
        Some(service) => (service, false),
        None => (conntrack::gateway(pkt).ok_or(not_ours)?, true),
    };
    // Ours: the clock, read here through this CPU's reading of the tick (`parse::Clock`),
    // so that `route` below finds it and calls no helper (a flood's packets come this way).
    pkt.now();
    // A gateway's packet to where the FIB leaves it to the kernel (the host itself, no
    // route) is not the gateway's, whatever else it is: asked first.
    if gateway {
        forward::route(ctx, pkt, &service.snat[0], &pkt.key.dst, hop)?;
        if matches!(hop, Hop::Kernel { .. }) {
            return Err(not_ours);
        }
    }
    // Checked before the flow is created, so a packet we will not forward (a traceroute
    // probe with TTL 1, say) does not take a SNAT port.
    forwardable(pkt)?;
    if pkt.tcp_flags & TCP_RST != 0 {
        return Err(Reason::DropRstNoFlow);
    }
    let staged = if gateway {
        conntrack::stage(service, NO_BACKEND, &pkt.key.dst, conntrack::hash(&pkt.key))?
    } else {
        let (id, backend, hash) = match quic::backend(ctx, pkt, service) {
            Some(chosen) => chosen,
            None => conntrack::backend(&pkt.key, service)?,
        };
        conntrack::stage(service, id, &backend.endpoint, hash)?
    };
    // From here on the flow is read from the staged copy: whichever map its entry came
    // from (a service's or a gateway's), the verifier checks the rest of the path once.
    let (service, to) = (&staged.service, &staged.to);
    // Routed before the flow is created: an unreachable backend takes no port, and the flow
    // learns which interface the backend's replies come in on.
    // A fullnat flow is routed from the pool's first address: the way to the backend.
    let snat = if service.mode == MODE_DNAT {
        &pkt.key.src
    } else {
        &service.snat[0]
    };
    if !gateway {
        forward::route(ctx, pkt, snat, to, hop)?;
    }
    // (The source a fullnat or gateway flow gets is one of the pool's addresses, which
    // share their way: the first stands for them.)
    if let Hop::TooBig { .. } = hop
        && answers_too_big(ctx, pkt, snat, to)
    {
        // Answered with "fragmentation needed", not forwarded: no flow for it (its sender
        // sends again, smaller, and that packet makes the flow).
        return Ok(false);
    }
    let reply_ifindex = forward::arrival_ifindex(hop.ifindex());
    // The hop is forgotten while the flow is made, and asked for again after: kept, each of
    // its kinds would have the verifier check `create` once more (its work was half a
    // million instructions). It costs a second FIB lookup per new flow; and it routes the
    // flow as it was made, also when another CPU made it at the same moment toward another
    // backend (the Maglev table changed in between), whose flow then stands.
    *hop = Hop::NONE;
    conntrack::create(ctx, pkt, staged, reply_ifindex, rewrite)?;
    forward::route(ctx, pkt, &rewrite.src, &rewrite.dst, hop)?;
    Ok(true)
}

/// Why a packet that is no service's or gateway's goes to the kernel untouched.
#[inline(always)]
fn not_ours(pkt: &parse::Packet) -> Reason {
    if pkt.is_icmp() {
        Reason::PassIcmp
    } else {
        Reason::PassNoService
    }
}

/// Whether a packet too big for its way out, to be rewritten from `src` to `dst`, is
/// answered with "fragmentation needed" and not forwarded, rather than rewritten and left to
/// the kernel to fragment: when its sender forbids fragmenting it (DF; IPv6 always), and
/// when xlb rewrites its source to one the kernel would not take from where the packet came
/// in. The kernel drops a packet from one of its own addresses (which a SNAT address, a VIP
/// or a gateway's public address often are) as a martian, and with `rp_filter` one whose
/// source does not route back out of that interface, without a word; a routed address
/// that does passes (the strict rule is asked: the looser ones cannot be read from here).
#[inline(always)]
fn answers_too_big(ctx: &XdpContext, pkt: &parse::Packet, src: &Endpoint, dst: &Endpoint) -> bool {
    pkt.dont_fragment || (src.addr != pkt.key.src.addr && !forward::routes_back(ctx, pkt, src, dst))
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
    // Ours, so rewritten: no checksum to update, and none may be sent.
    if pkt.udp_no_checksum {
        return Err(Reason::DropUdpZeroChecksum);
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
