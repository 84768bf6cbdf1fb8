//! Connection tracking: two `CONNTRACK` entries per flow, one per direction, created together
//! on a flow's first packet and removed together by the control plane's sweeper when the flow
//! expires. A flow so keeps its backend and SNAT port for its whole life, even when the
//! Maglev table changes under it. The rules (what a packet tells, the flow's state) are
//! lb-common's [`conntrack`](lb_common::conntrack), shared with the sweeper and the tests.
//!
//! The XDP program deletes only what it inserted itself a moment before (a reverse entry
//! whose forward twin could not be stored); everything else is the sweeper's. No insert
//! ever evicts anything: `CONNTRACK` is a plain hash map.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by-value keys would be copied onto the 512-byte BPF stack, which is nearly full"
)]

use aya_ebpf::{bindings::BPF_NOEXIST, maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{
    conntrack::{FlowSeen, FlowState, REFRESH_NS, Seen, starts_anew},
    hash::{flow_hash, snat_candidate},
    maps::{
        BackendEntry, DIR_TO_BACKEND, DIR_TO_CLIENT, Endpoint, FlowKey, MAPPING_PRIVATE,
        MAPPING_PUBLIC, MAX_SNAT_ADDRESSES, MODE_DNAT, MODE_GATEWAY, Mapping, MappingKey,
        NO_BACKEND, NO_GATEWAYS, NatEntry, PROTO_UDP, Rewrite, SNAT_PORT_PROBES, ServiceEntry,
    },
    reason::Reason,
    scheduler,
};

use crate::{
    ACTIVE, BACKENDS, CONFIG, CONNTRACK, CREATE_SCRATCH, CURSORS, GATEWAYS, MAGLEV, MAPPINGS,
    NEW_FLOW, SERVICES, forward,
    parse::{Echo, Packet},
};

/// A new flow as `new_flow` chose it, copied into this CPU's slot of `NEW_FLOW` by [`stage`].
#[repr(C)]
pub struct Staged {
    /// The service's entry, or the NAT gateway's.
    pub service: ServiceEntry,
    /// Where the flow goes: the backend, or a gateway's flow's own destination.
    pub to: Endpoint,
    pub _pad: [u8; 2],
    /// `NO_BACKEND` for a NAT gateway's flow.
    pub backend_id: u32,
    /// The flow's hash.
    pub hash: u64,
}

/// Copies a new flow's choice into this CPU's slot of `NEW_FLOW`, and returns it: the rest of
/// the new-flow path reads it from there. The entry comes from `SERVICES` or `GATEWAYS` and
/// the destination from `BACKENDS` or the packet; read through one map value, the verifier
/// checks the path after once, not once per origin (which multiplied its work).
///
/// Errors: `DropInternal` when the slot is missing.
#[inline(always)]
pub fn stage(
    service: &ServiceEntry,
    backend_id: u32,
    to: &Endpoint,
    hash: u64,
) -> Result<&'static Staged, Reason> {
    let staged = NEW_FLOW.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's slot of a one-entry per-CPU array; the program runs to completion
    // on its CPU, and only `new_flow` (through this function) touches the slot, once per
    // packet, before it reads it.
    // Copied from pointer to pointer: an assignment of the 180-byte entry would go through
    // a temporary on the stack, which has no room for one.
    unsafe {
        core::ptr::copy_nonoverlapping(service, &mut (*staged).service, 1);
        core::ptr::copy_nonoverlapping(to, &mut (*staged).to, 1);
        (*staged)._pad = [0; 2];
        (*staged).backend_id = backend_id;
        (*staged).hash = hash;
        Ok(&*staged)
    }
}

/// `create`'s working space, one per CPU (see `CREATE_SCRATCH` in main.rs).
#[repr(C)]
pub struct Scratch {
    forward: NatEntry,
    reverse: NatEntry,
    reverse_key: FlowKey,
    /// The service's SNAT pool, copied for `probe_step`.
    pool: [Endpoint; MAX_SNAT_ADDRESSES],
    /// What `probe_step` needs besides.
    probe: Probe,
    /// A UDP flow of a NAT gateway: the mapping of its private endpoint, and back.
    mapping_key: MappingKey,
    mapping: Mapping,
}

const E2BIG: i32 = 7;
const ENOMEM: i32 = 12;
const EEXIST: i32 = 17;

/// Whether the packet belongs to a tracked flow direction; if so, writes its rewrite to
/// `rewrite`, and, when the packet is to be forwarded (`forwarded`), records what it tells
/// about the flow. (A packet that only goes to the kernel, say with its TTL about to expire,
/// must not close or restart the flow. One that is recorded and then fails on its way on,
/// its route gone or too big for it, has told what its sender's next try will tell again:
/// recording only what leaves would keep the entry's pointer until the packet is sent, in
/// the hot path's full frame.)
///
/// Errors: `DropWrongInterface` when the packet arrived on another interface than its
/// flow direction's packets do, and its source does not route back out of it.
///
/// Inlined into `process`: a hit with nothing new to record (nearly every packet of a
/// flow) makes no call of its own; the rest is `settle`'s, out of line.
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    forwarded: bool,
    rewrite: &mut Rewrite,
) -> Result<bool, Reason> {
    let Some(entry) = CONNTRACK.get_ptr_mut(&pkt.key) else {
        return Ok(false);
    };
    // SAFETY: a map value of this run's lookup; its memory stays the map's for the program
    // run. (Should the sweeper remove the entry meanwhile, its flow having expired, a new
    // flow may take that memory at once, and this run's stores would land in the new
    // flow's entry: a late packet racing its flow's removal, within this run's few hundred
    // nanoseconds.) Fields written here and in `settle` are independent aligned stores of
    // "now" or of 1 (or a full reset on a restart), which racing CPUs can only repeat, never
    // undo; the one count, `generation`, is added to atomically.
    let entry = unsafe { &mut *entry };
    // An echo's key holds its identifier in one port and 0 in the other, so a request and a
    // reply with identifier 0 have one key. A flow's requests go out and its replies come
    // back: a reply that finds the outgoing entry (or a request the returning one) is no
    // packet of the flow.
    if pkt.echo != Echo::No
        && (pkt.echo == Echo::Request) != (entry.rewrite.direction == DIR_TO_BACKEND)
    {
        return Ok(false);
    }
    if entry.ifindex != ctx.ingress_ifindex() as u32 {
        return settle(ctx, pkt, forwarded, entry, rewrite);
    }
    if forwarded {
        // Read the clock only on a hit: most packets that miss are not ours.
        let now = pkt.now();
        let proto = pkt.key.proto;
        let dir = entry.rewrite.direction;
        if starts_anew(proto, dir, pkt.tcp_flags, &entry.seen)
            || needs_record(entry, dir, &Seen::of_packet(proto, pkt.tcp_flags), now)
        {
            return settle(ctx, pkt, forwarded, entry, rewrite);
        }
        keep_new_exact(entry, proto, now);
    }
    *rewrite = entry.rewrite;
    Ok(true)
}

/// `lookup`'s hit when there is more to do than to read the rewrite: the packet came in
/// on another interface than the flow's, or tells something its entry has not recorded
/// (a restart, a flag, or a refresh due).
///
/// Not inlined: rare, and with a frame of its own, off the hot path's (see `process` in
/// main.rs).
#[inline(never)]
fn settle(
    ctx: &XdpContext,
    pkt: &Packet,
    forwarded: bool,
    entry: &mut NatEntry,
    rewrite: &mut Rewrite,
) -> Result<bool, Reason> {
    let ingress = ctx.ingress_ifindex() as u32;
    if entry.ifindex != ingress {
        // Not known when the flow was made (its way out toward this side was not one of
        // xlb's interfaces: a VLAN device, say), the first packet from there tells.
        if !forward::arrives_here(ctx, entry.ifindex)
            && !forward::routes_back(ctx, pkt, &pkt.key.src, &pkt.key.dst)
        {
            return Err(Reason::DropWrongInterface);
        }
        // The route moved: the flow's packets come in here now.
        entry.ifindex = ingress;
    }
    *rewrite = entry.rewrite;
    if !forwarded {
        return Ok(true);
    }
    // Read the clock only on a hit: most packets that miss are not ours.
    let now = pkt.now();
    let proto = pkt.key.proto;
    let dir = entry.rewrite.direction;
    let facts = Seen::of_packet(proto, pkt.tcp_flags);
    let anew = starts_anew(proto, dir, pkt.tcp_flags, &entry.seen);
    if anew {
        if entry.seen.handshake_done() {
            // A new connection on the addresses of one that was made and is over: a flow
            // for the counters. (Not so a SYN sent again after a reset attempt.)
            crate::stats::count_new_flow(&entry.rewrite);
        }
        // Open again: one more start for the backend's open flows, which the sweeper
        // takes off once it sees this start closed or removed. Two CPUs that start the
        // flow at once count two starts in both places: a plain increment would keep one
        // of them, and leave the backend one open flow too many for good.
        add_u32(&mut entry.generation, 1);
        count_start(entry.rewrite.backend_id);
    }
    let tells = anew || entry.seen.dir(dir).lacks(&facts);
    if tells || stale(entry.last_seen_ns, now) {
        let last_seen = entry.last_seen_ns;
        record(entry, dir, &facts, anew, now);
        // A packet that only refreshes the time of a flow past `New` leaves the twin alone:
        // its entry and bucket are out of every cache in a big table, and the sweeper judges
        // a flow by the fresher of its two times (`lb_userspace::conntrack`). What a packet
        // tells, and a new flow's time, go to both.
        if !tells && FlowState::of(proto, &entry.seen) != FlowState::New {
            return Ok(true);
        }
        // The twin carries the same record, so either entry tells the flow's state; but
        // only if it is still the twin (the sweeper removes the reverse entry first, and
        // its key may already belong to a new flow when the forward one is hit).
        match CONNTRACK.get_ptr_mut(&entry.twin_key(proto)) {
            Some(twin) => {
                // SAFETY: as for `entry`.
                let twin = unsafe { &mut *twin };
                if twin.twin_key(proto) == pkt.key {
                    record(twin, dir, &facts, anew, now);
                }
            }
            None if dir == DIR_TO_BACKEND => restore_reverse(pkt, entry, last_seen),
            None => {}
        }
    } else {
        keep_new_exact(entry, proto, now);
    }
    Ok(true)
}

/// Whether a packet of the flow going `dir` with `facts` is to be recorded (besides a
/// restart): it tells its direction something new, or the entry's time is due a refresh.
#[inline(always)]
fn needs_record(entry: &NatEntry, dir: u8, facts: &Seen, now: u64) -> bool {
    entry.seen.dir(dir).lacks(facts) || stale(entry.last_seen_ns, now)
}

/// A flow that is still new keeps its entry's time exact, at a store per packet: under
/// pressure the sweeper removes new flows idle for a mere 100 ms, and judges them by the
/// fresher of their two entries.
#[inline(always)]
fn keep_new_exact(entry: &mut NatEntry, proto: u8, now: u64) {
    if FlowState::of(proto, &entry.seen) == FlowState::New {
        entry.last_seen_ns = now;
    }
}

/// Makes a flow's reverse entry again from its forward one (`forward`, hit by `pkt`), when
/// it is gone while the forward one lives: withdrawn by another CPU that was creating the
/// same flow and failed to store the forward entry, say, or removed by the sweeper a moment
/// before the forward one. (Looked for when a packet tells something new, and at every
/// refresh while the flow is new: a flow whose reverse entry was withdrawn at its creation
/// has had no reply, so it is new until the entry is back.) Without it the backend's
/// replies would go to the kernel, and the flow's SNAT port would seem free to the next
/// flow. Made only if the port is still free (`BPF_NOEXIST`): if another flow took it
/// meanwhile, that flow keeps it. It is made with the time the flow was seen before this
/// packet (`last_seen`): if the sweeper was removing the flow (reverse entry first), the
/// forward entry goes next and the new reverse one is an orphan the next sweep removes, not
/// one kept alive for a whole timeout; while the forward entry lives, the sweeper judges
/// the pair by the fresher time, and keeps it. The interface replies arrive on is not known
/// here (0): the first reply tells, as for a flow whose way out is not one of xlb's
/// interfaces. Not inlined: rare, and off the hit's frame.
#[inline(never)]
fn restore_reverse(pkt: &Packet, forward: &NatEntry, last_seen: u64) {
    let Some(scratch) = CREATE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a one-entry per-CPU array, as in `create` (which does not
    // run during a lookup).
    let Scratch {
        reverse,
        reverse_key,
        ..
    } = unsafe { &mut *scratch };
    *reverse_key = forward.twin_key(pkt.key.proto);
    let rewrite = &forward.rewrite;
    fill_reverse(
        reverse,
        &pkt.key,
        (rewrite.service_id, rewrite.backend_id),
        forward.seen,
        0,
        last_seen,
    );
    let _ = CONNTRACK.insert(&*reverse_key, &*reverse, BPF_NOEXIST as u64);
}

/// Writes the reverse entry of the flow whose first packet had `key`, field by field (a
/// struct built whole would be built on the stack first): its replies are translated back
/// to `key`'s addresses; `ids` are the service's and backend's; `ifindex` is where replies
/// arrive (0: not known yet).
#[inline(always)]
fn fill_reverse(
    reverse: &mut NatEntry,
    key: &FlowKey,
    (service_id, backend_id): (u32, u32),
    seen: FlowSeen,
    ifindex: u32,
    now: u64,
) {
    reverse.rewrite.src = key.dst;
    reverse.rewrite.dst = key.src;
    reverse.rewrite.service_id = service_id;
    reverse.rewrite.backend_id = backend_id;
    reverse.rewrite.direction = DIR_TO_CLIENT;
    reverse.rewrite._pad = [0; 3];
    reverse.seen = seen;
    reverse.ifindex = ifindex;
    reverse.generation = 0;
    reverse.last_seen_ns = now;
}

/// Older than the refresh interval (a timestamp a hair ahead of `now`, written by another
/// CPU, is not).
#[inline(always)]
fn stale(last_seen_ns: u64, now: u64) -> bool {
    now > last_seen_ns && now - last_seen_ns >= REFRESH_NS
}

/// Records `facts` of a packet going in direction `dir` into one of its flow's entries; on a
/// restart (`anew`), the flow's record starts over from this packet.
#[inline(always)]
fn record(entry: &mut NatEntry, dir: u8, facts: &Seen, anew: bool, now: u64) {
    entry.seen.record(dir, facts, anew);
    entry.last_seen_ns = now;
}

/// The NAT gateway whose private network the packet comes from, if any, and if it is not
/// addressed to that network too (private hosts talk among themselves untranslated). Of
/// ICMP, only an echo request starts a flow. With no gateway at all (`NO_GATEWAYS`), none,
/// without a lookup.
#[inline(always)]
pub fn gateway(pkt: &Packet) -> Option<&'static ServiceEntry> {
    if pkt.is_icmp() && pkt.echo != Echo::Request {
        return None;
    }
    if CONFIG
        .get(0)
        .is_some_and(|cfg| cfg.flags & NO_GATEWAYS != 0)
    {
        return None;
    }
    gateway_of(pkt)
}

/// `gateway`'s lookups. Not inlined: their keys take a frame of their own, off the hot
/// path's.
#[inline(never)]
fn gateway_of(pkt: &Packet) -> Option<&'static ServiceEntry> {
    // The address's full length: the trie finds the longest prefix that covers it.
    let dst = Key::new(128, pkt.key.dst.addr);
    if GATEWAYS.get(&dst).is_some() {
        return None;
    }
    let src = Key::new(128, pkt.key.src.addr);
    GATEWAYS.get(&src)
}

/// The flow hash of `key` (`lb_common::hash::flow_hash` with the configured seed; seed 0
/// if the settings are missing, which `backend` reports).
///
/// Not inlined: the hash's byte shuffling spills many registers, and in a frame of its own
/// it does not take the new-flow path's stack.
#[inline(never)]
pub fn hash(key: &FlowKey) -> u64 {
    let seed = CONFIG.get(0).map_or(0, |cfg| cfg.hash_seed);
    flow_hash(key, seed)
}

/// The service a packet is addressed to (its destination and protocol), if any.
#[inline(always)]
pub fn service(key: &FlowKey) -> Option<&'static ServiceEntry> {
    // SAFETY: a map value, valid for the program run; userspace replaces services whole.
    unsafe { SERVICES.get(key.service_key()) }
}

/// The backend a new flow to `service` goes to: the slot of the service's table in use that
/// its scheduler picks (`lb_common::scheduler::table_slot`). Returns its id, the backend,
/// and the flow's hash.
///
/// Errors: `DropNoBackend`, and `DropInternal` when the control plane's tables disagree.
#[inline(always)]
pub fn backend(
    key: &FlowKey,
    service: &ServiceEntry,
) -> Result<(u32, &'static BackendEntry, u64), Reason> {
    let cfg = CONFIG.get(0).ok_or(Reason::DropInternal)?;
    if cfg.maglev_size == 0 {
        return Err(Reason::DropInternal);
    }
    let hash = hash(key);
    if scheduler::is_least(service.scheduler) {
        let backend_id = least(service, cfg.maglev_size, hash)?;
        let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;
        return Ok((backend_id, backend, hash));
    }
    let (source_hash, cursor) = match service.scheduler {
        scheduler::SOURCE_HASH => (scheduler::source_hash(key, cfg.hash_seed), 0),
        scheduler::ROUND_ROBIN | scheduler::WEIGHTED_ROUND_ROBIN => (0, next_turn(service.id)),
        _ => (0, 0),
    };
    let slot = service.first_slot(cfg.maglev_size)
        + scheduler::table_slot(
            service.scheduler,
            hash,
            source_hash,
            cursor,
            cfg.maglev_size,
        );
    let pair = MAGLEV.get(slot / 2).ok_or(Reason::DropInternal)?;
    let backend_id = pair[(slot % 2) as usize];
    if backend_id == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropInternal)?;
    Ok((backend_id, backend, hash))
}

/// The least-* schedulers' choice: of the backends listed in the first `service.count`
/// slots of the service's table, the one with the lowest `lb_common::scheduler::score`.
/// The scan starts at a slot the flow's hash picks, so ties spread. It runs under
/// `bpf_loop` (Linux 5.17): the verifier checks the step once, not once per backend.
#[inline(always)]
fn least(service: &ServiceEntry, maglev_size: u32, hash: u64) -> Result<u32, Reason> {
    let count = service.count;
    if count == 0 || count > scheduler::MAX_LEAST_BACKENDS {
        return Err(Reason::DropNoBackend);
    }
    let mut scan = LeastScan {
        first: service.first_slot(maglev_size),
        count,
        start: (hash as u32) % count,
        scheduler: service.scheduler,
        best: NO_BACKEND,
        _pad: 0,
        best_score: u64::MAX,
    };
    // SAFETY: `least_step` is a BPF subprogram of the signature bpf_loop calls, and `scan`
    // outlives the call.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            count,
            least_step as *const () as *mut core::ffi::c_void,
            &mut scan as *mut LeastScan as *mut core::ffi::c_void,
            0,
        );
    }
    if scan.best == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    Ok(scan.best)
}

/// `least`'s state, handed to each step.
#[repr(C)]
struct LeastScan {
    first: u32,
    count: u32,
    start: u32,
    scheduler: u32,
    best: u32,
    _pad: u32,
    best_score: u64,
}

/// One backend of `least`'s scan: step `i` looks at slot `(start + i) % count`.
#[inline(never)]
extern "C" fn least_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `least` gave it, to its live `LeastScan`.
    let scan = unsafe { &mut *(ctx as *mut LeastScan) };
    if scan.count == 0 {
        return 1;
    }
    let mut index = scan.start + i as u32;
    if index >= scan.count {
        index -= scan.count;
    }
    let slot = scan.first + index;
    let Some(pair) = MAGLEV.get(slot / 2) else {
        return 1;
    };
    let id = pair[(slot % 2) as usize];
    let Some(backend) = BACKENDS.get(id) else {
        return 0;
    };
    let active = ACTIVE.get(id).copied().unwrap_or(0);
    let score = scheduler::score(scan.scheduler, active, backend.weight, backend.latency_us);
    if score < scan.best_score {
        scan.best_score = score;
        scan.best = id;
    }
    0
}

/// `*at += n`, wrapping, atomically (see [`count_add`]).
#[inline(always)]
fn add_u32(at: &mut u32, n: u32) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `at` is a valid, aligned u32 (in a map value), as the atomic add needs.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            at, n,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above; nothing else reads it non-atomically meanwhile in this run.
    unsafe { core::sync::atomic::AtomicU32::from_ptr(at) }
        .fetch_add(n, core::sync::atomic::Ordering::Relaxed);
}

/// One more open flow for backend `id` (atomic: every CPU adds to the same counter).
#[inline(always)]
pub fn count_start(id: u32) {
    count_add(id, 1);
}

/// Adds `n` (wrapping: `u64::MAX` takes one off) to backend `id`'s open flows, atomically.
#[inline(always)]
fn count_add(id: u32, n: u64) {
    if let Some(active) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: a map value, valid for the run; the atomic add is the only access here,
        // and userspace's decrements are atomic too. The BPF target has no atomic types
        // (no compare-and-swap), but the intrinsic lowers to BPF's atomic add; its result
        // is unused, so it needs no more than the original instruction set.
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                active, n,
            );
        }
        #[cfg(not(target_arch = "bpf"))]
        unsafe { core::sync::atomic::AtomicU64::from_ptr(active) }
            .fetch_add(n, core::sync::atomic::Ordering::Relaxed);
    }
}

/// This CPU's turn counter of service `id`: its value, moved one on.
#[inline(always)]
fn next_turn(id: u32) -> u32 {
    match CURSORS.get_ptr_mut(id) {
        Some(cursor) => {
            // SAFETY: a per-CPU map value: only this CPU's run touches it, and it stays
            // valid for the run.
            unsafe {
                let turn = *cursor;
                *cursor = turn.wrapping_add(1);
                turn
            }
        }
        None => 0,
    }
}

/// Creates both directions of a new flow (`flow`, staged by `new_flow`, says where to; its
/// reply direction arrives on `reply_ifindex`) and writes the forward rewrite to `rewrite`.
///
/// The SNAT address of the service's pool and the port are probed in the order of
/// `lb_common::hash::snat_candidate`, whose first candidate is the flow's own hash. The
/// reverse entry (backend → SNAT:port) is the port's lock: it is inserted with
/// `BPF_NOEXIST`, which is atomic, so two CPUs can never hand out one port to two flows, and
/// a failed insert costs no one anything (the map never evicts).
/// In `dnat` mode the "SNAT" endpoint is the client's own address and port, the only
/// candidate: its reverse entry (backend → client) is taken only when the client reaches
/// the same backend from the same port through another VIP.
///
/// A NAT gateway's flow goes to the packet's own destination; its source is probed like a
/// fullnat one, from the gateway's pool and port range. A UDP flow's private endpoint keeps
/// its public one toward every destination (RFC 4787's endpoint-independent mapping): one
/// that has a mapping (`MAPPINGS`) takes it as its only candidate; one that has none takes
/// a candidate whose public endpoint is no one else's, locked by inserting its public-side
/// mapping with `BPF_NOEXIST` after its reverse entry, and then records its private side.
///
/// Errors: `DropSnatPortsExhausted`, `DropDnatTupleTaken`, `DropConntrackFull`,
/// `DropConntrackInsert`, and `DropInternal` when the control plane's tables disagree.
///
/// Not inlined: a flow's first packet is the cold path, and as a BPF subprogram its locals
/// get a frame of their own. The entries are built in place in `CREATE_SCRATCH`, field by
/// field: a struct literal would be built on the stack first.
#[inline(never)]
pub fn create(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &Staged,
    reply_ifindex: u32,
    rewrite: &mut Rewrite,
) -> Result<(), Reason> {
    let key = &pkt.key;
    let hash = flow.hash;
    let now = pkt.now();

    let scratch = CREATE_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's slot of a one-entry per-CPU array. An XDP program runs to
    // completion on its CPU (softirq), so no other run touches the slot meanwhile.
    let Scratch {
        forward,
        reverse,
        pool: pool_copy,
        probe,
        mapping_key,
        mapping,
        ..
    } = unsafe { &mut *scratch };
    let seen = FlowSeen::first(DIR_TO_BACKEND, Seen::of_packet(key.proto, pkt.tcp_flags));
    // The probes' parameters go straight to the scratch space: this frame is on the stack
    // under the hot path's (see `process` in main.rs).
    let service = &flow.service;
    probe.mapped = (service.mode == MODE_GATEWAY && key.proto == PROTO_UDP) as u8;
    probe.fixed = 0;
    probe.pool = service.snat_count;
    probe.first = service.port_first;
    probe.count = service.port_count;
    if probe.mapped != 0 {
        mapping_key.endpoint = key.src;
        mapping_key.proto = key.proto;
        mapping_key.side = MAPPING_PRIVATE;
        if let Some(held) = MAPPINGS.get_ptr_mut(&*mapping_key) {
            // SAFETY: a map value, valid for the program run; the store of "now" is one
            // aligned write that racing CPUs can only repeat.
            let held = unsafe { &mut *held };
            if in_pool(service, &held.endpoint) {
                held.taken_ns = now;
                forward.rewrite.src = held.endpoint;
                probe.fixed = 1;
            } else {
                // The gateway's pool or ports changed since: a mapping anew, from the
                // pool as it is (the old public side goes with its last flow).
                let _ = MAPPINGS.remove(&*mapping_key);
            }
        }
        if probe.fixed == 0 {
            // The public side's lock, which `probe_step` takes for each candidate.
            mapping.endpoint = key.src;
            mapping._pad = [0; 6];
            mapping.taken_ns = now;
        }
    }
    if service.mode == MODE_DNAT {
        // One candidate: the client's own endpoint.
        forward.rewrite.src = key.src;
        probe.fixed = 1;
    }
    if probe.fixed != 0 {
        probe.candidates = 1;
    } else {
        if probe.pool == 0 || probe.pool as usize > MAX_SNAT_ADDRESSES || probe.count == 0 {
            return Err(Reason::DropInternal);
        }
        *pool_copy = service.snat;
        // Every (address, port) of the pool once.
        probe.candidates = probe.count * probe.pool;
    }
    forward.rewrite.dst = flow.to;
    forward.rewrite.service_id = flow.service.id;
    forward.rewrite.backend_id = flow.backend_id;
    forward.rewrite.direction = DIR_TO_BACKEND;
    forward.rewrite._pad = [0; 3];
    forward.seen = seen;
    forward.ifindex = ctx.ingress_ifindex() as u32;
    forward.generation = 0;
    forward.last_seen_ns = now;
    fill_reverse(
        reverse,
        key,
        (flow.service.id, flow.backend_id),
        seen,
        reply_ifindex,
        now,
    );

    probe.hash = hash;
    probe.now = now;
    probe.proto = key.proto;
    probe.tcp_flags = pkt.tcp_flags;
    let mut outcome = Outcome {
        found: PROBE_NONE,
        error: 0,
    };
    // A step of its own for a gateway's UDP flow taking a new mapping: the verifier checks
    // each step's body apart, neither with the other's branches.
    let step = if probe.mapped != 0 && probe.fixed == 0 {
        probe_mapped_step as *const ()
    } else {
        probe_step as *const ()
    };
    // SAFETY: both steps are BPF subprograms of the signature bpf_loop calls, and
    // `outcome` outlives the call.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            SNAT_PORT_PROBES,
            step as *mut core::ffi::c_void,
            &mut outcome as *mut Outcome as *mut core::ffi::c_void,
            0,
        );
    }
    if outcome.error != 0 {
        return Err(insert_error(outcome.error));
    }
    // Whether this run inserted the port's reverse entry (true), or found this very flow's
    // there (false): another CPU creating it at this moment, or a flow whose forward entry
    // was lost while its reverse one lived on; it keeps the port the backend knows.
    let inserted = match outcome.found {
        PROBE_INSERTED => Some(true),
        PROBE_FOUND_OURS => Some(false),
        _ => None,
    };
    // SAFETY: as above; `probe_step` has returned.
    let Scratch {
        forward,
        reverse_key,
        probe,
        mapping_key,
        mapping,
        ..
    } = unsafe { &mut *scratch };
    let Some(inserted) = inserted else {
        return Err(if flow.service.mode == MODE_DNAT {
            Reason::DropDnatTupleTaken
        } else {
            Reason::DropSnatPortsExhausted
        });
    };
    if probe.mapped != 0 && probe.fixed == 0 {
        // The private side of the mapping whose public side `probe_step` took, or found
        // taken for this very flow by another CPU making it at this moment (which may not
        // have written the private side yet): the private endpoint's next flows take the
        // same. If another CPU mapped the private endpoint to another public one meanwhile
        // (its first packets to two destinations at once), this packet is dropped, and
        // gives the candidate back if it took it: one private endpoint, one public endpoint.
        // (A packet that found the candidate taken and went on without this check made its
        // flow on a public endpoint the CPU that took it then gave back.)
        mapping_key.endpoint = key.src;
        mapping_key.side = MAPPING_PRIVATE;
        mapping.endpoint = forward.rewrite.src;
        match MAPPINGS.insert(&*mapping_key, &*mapping, BPF_NOEXIST as u64) {
            Ok(()) => {}
            // The CPU making the same flow wrote it first.
            Err(e) if e == -EEXIST && maps_to(mapping_key, &mapping.endpoint) => {}
            Err(e) => {
                if inserted {
                    let _ = CONNTRACK.remove(&*reverse_key);
                    mapping_key.endpoint = forward.rewrite.src;
                    mapping_key.side = MAPPING_PUBLIC;
                    let _ = MAPPINGS.remove(&*mapping_key);
                }
                return Err(if e == -EEXIST {
                    Reason::DropMappingRace
                } else {
                    insert_error(e)
                });
            }
        }
    }
    // A reverse entry found there is never ours to withdraw.
    insert_forward(key, forward, inserted.then_some(&*reverse_key), rewrite)
}

/// What `create` tells each `probe_step`, in `CREATE_SCRATCH` (the stack has no room).
#[repr(C)]
struct Probe {
    hash: u64,
    now: u64,
    /// The SNAT port range.
    first: u32,
    count: u32,
    /// Addresses in the service's pool (copied to `Scratch::pool`).
    pool: u32,
    /// How many candidates there are: every (address, port) of the pool, or 1.
    candidates: u32,
    /// 1 when there is one candidate, in `forward` already: the client's endpoint in dnat,
    /// or a NAT gateway's mapping of the private endpoint.
    fixed: u8,
    /// 1 for a NAT gateway's UDP flow: a candidate is taken only with its public endpoint's
    /// mapping (`Scratch::mapping`).
    mapped: u8,
    proto: u8,
    tcp_flags: u8,
}

/// What the probes found: `bpf_loop`'s context, on `create`'s stack.
#[repr(C)]
struct Outcome {
    /// One of the `PROBE_*` constants.
    found: u32,
    /// The errno of an insert that failed for another reason than EEXIST; 0 if none.
    error: i32,
}

const PROBE_NONE: u32 = 0;
/// This run inserted the candidate's reverse entry.
const PROBE_INSERTED: u32 = 1;
/// The candidate's reverse entry holds this very flow already.
const PROBE_FOUND_OURS: u32 = 2;

/// Probe `i` of `create`: puts candidate `i` (`lb_common::hash::snat_candidate`) in the
/// forward entry and tries to take its reverse entry, the port's lock. Stops the loop (1)
/// once it has it, finds this very flow holding it (whose record then takes in this packet,
/// and the forward entry its record), runs out of candidates, or an insert fails for
/// another reason than EEXIST. Under `bpf_loop` (Linux 5.17) the verifier checks this body
/// once, not once per probe.
#[inline(never)]
extern "C" fn probe_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    probe::<false>(i, ctx)
}

/// `probe_step` for a NAT gateway's UDP flow without a mapping: a candidate is taken only
/// with its public endpoint's mapping, which must be no one else's.
#[inline(never)]
extern "C" fn probe_mapped_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    probe::<true>(i, ctx)
}

/// The body of the probe steps; `MAPPED`: `probe_mapped_step`'s.
#[inline(always)]
fn probe<const MAPPED: bool>(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `create` gave it, to its live `Outcome`.
    let outcome = unsafe { &mut *(ctx as *mut Outcome) };
    let Some(scratch) = CREATE_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, as in `create`, which does not touch it while the loop runs.
    let Scratch {
        forward,
        reverse,
        reverse_key,
        pool,
        probe: p,
        mapping_key,
        mapping,
    } = unsafe { &mut *scratch };
    let i = i as u32;
    if i >= p.candidates {
        return 1;
    }
    if MAPPED || p.fixed == 0 {
        let (index, port) = snat_candidate(p.hash, i, p.first, p.count, p.pool);
        forward.rewrite.src.addr = pool[index as usize & (MAX_SNAT_ADDRESSES - 1)].addr;
        forward.rewrite.src.port = port.to_be_bytes();
    }
    reverse_key.src = forward.rewrite.dst;
    reverse_key.dst = forward.rewrite.src;
    reverse_key.proto = p.proto;
    reverse_key._pad = 0;
    match CONNTRACK.insert(&*reverse_key, &*reverse, BPF_NOEXIST as u64) {
        Ok(()) if MAPPED => {
            // The public endpoint must be no other private endpoint's, toward anyone.
            mapping_key.endpoint = forward.rewrite.src;
            mapping_key.proto = p.proto;
            mapping_key.side = MAPPING_PUBLIC;
            match MAPPINGS.insert(&*mapping_key, &*mapping, BPF_NOEXIST as u64) {
                Ok(()) => {
                    outcome.found = PROBE_INSERTED;
                    1
                }
                Err(e) => {
                    let _ = CONNTRACK.remove(&*reverse_key);
                    if e == -EEXIST {
                        0
                    } else {
                        outcome.error = e;
                        1
                    }
                }
            }
        }
        Ok(()) => {
            outcome.found = PROBE_INSERTED;
            1
        }
        Err(e) if e == -EEXIST => {
            if let Some(held) = CONNTRACK.get_ptr_mut(&*reverse_key) {
                // SAFETY: a map value, valid for the program run.
                let held = unsafe { &mut *held };
                if held.rewrite == reverse.rewrite
                    && (!MAPPED || public_is_ours(p, mapping_key, mapping, forward))
                {
                    // The flow goes on: its record, plus this packet, which starts it
                    // anew if it is a client's SYN on a closed flow (as in `lookup`).
                    let facts = Seen::of_packet(p.proto, p.tcp_flags);
                    let anew = starts_anew(p.proto, DIR_TO_BACKEND, p.tcp_flags, &held.seen);
                    record(held, DIR_TO_BACKEND, &facts, anew, p.now);
                    forward.seen = held.seen;
                    outcome.found = PROBE_FOUND_OURS;
                    return 1;
                }
            }
            0
        }
        Err(e) => {
            outcome.error = e;
            1
        }
    }
}

/// Whether `endpoint` is an address of `service`'s pool with a port of its range.
#[inline(always)]
fn in_pool(service: &ServiceEntry, endpoint: &Endpoint) -> bool {
    let port = u16::from_be_bytes(endpoint.port) as u32;
    if port < service.port_first || port - service.port_first >= service.port_count {
        return false;
    }
    let mut i = 0;
    while i < MAX_SNAT_ADDRESSES {
        if (i as u32) < service.snat_count && service.snat[i].addr == endpoint.addr {
            return true;
        }
        i += 1;
    }
    false
}

/// For a gateway's UDP flow probing for a public endpoint: whether the candidate in
/// `forward` (whose reverse entry holds this very flow) is this private endpoint's, by its
/// public side. Another CPU creating the same flow may have inserted that reverse entry and
/// be about to withdraw it, its public side being someone else's.
#[inline(always)]
fn public_is_ours(p: &Probe, key: &mut MappingKey, mapping: &Mapping, forward: &NatEntry) -> bool {
    key.endpoint = forward.rewrite.src;
    key.proto = p.proto;
    key.side = MAPPING_PUBLIC;
    maps_to(key, &mapping.endpoint)
}

/// Whether the mapping at `key` holds `endpoint`.
#[inline(always)]
fn maps_to(key: &MappingKey, endpoint: &Endpoint) -> bool {
    // SAFETY: a map value, read in place and compared at once.
    unsafe { MAPPINGS.get(key) }.is_some_and(|m| m.endpoint == *endpoint)
}

/// The reason for a failed conntrack insert (other than EEXIST, which callers handle).
#[inline(always)]
fn insert_error(e: i32) -> Reason {
    if e == -E2BIG {
        Reason::DropConntrackFull
    } else if e == -ENOMEM {
        Reason::DropConntrackNoMemory
    } else {
        Reason::DropConntrackInsert
    }
}

/// Inserts the forward entry once its reverse entry is in place, and writes the flow's
/// forward rewrite to `rewrite`. `inserted_reverse` is the reverse entry's key when this
/// run inserted it (then it withdraws it if the forward entry cannot be stored), `None` when
/// it found the flow's reverse entry there already (another CPU's, or the survivor of a lost
/// forward entry: never ours to withdraw). If the forward entry exists already (another CPU
/// created the same flow at the same moment), that one wins, and our reverse entry is
/// withdrawn only if the winner took another port (if it took the same one, the reverse
/// entry is the winner's too and must stay).
#[inline(always)]
fn insert_forward(
    key: &FlowKey,
    forward: &NatEntry,
    inserted_reverse: Option<&FlowKey>,
    rewrite: &mut Rewrite,
) -> Result<(), Reason> {
    // Counted before the entry can be seen, so the sweeper never takes off a start that
    // is not on the count yet; taken back if the entry is not stored.
    count_start(forward.rewrite.backend_id);
    let e = match CONNTRACK.insert(key, forward, BPF_NOEXIST as u64) {
        Ok(()) => {
            crate::stats::count_new_flow(&forward.rewrite);
            *rewrite = forward.rewrite;
            return Ok(());
        }
        Err(e) => e,
    };
    count_add(forward.rewrite.backend_id, u64::MAX);
    // SAFETY: a map value, read in place and copied out at once.
    let winner = unsafe { CONNTRACK.get(key) }.map(|w| w.rewrite);
    let ours_to_withdraw = winner.is_none_or(|w| w != forward.rewrite);
    if ours_to_withdraw && let Some(reverse_key) = inserted_reverse {
        let _ = CONNTRACK.remove(reverse_key);
    }
    match winner {
        Some(w) => {
            *rewrite = w;
            Ok(())
        }
        None => Err(insert_error(e)),
    }
}
