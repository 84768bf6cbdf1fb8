//! The conntrack table from userspace: reading it in batches, and the sweeper, which is the
//! only thing that removes flows from it. The rules (a flow's state, its timeout) are
//! lb-common's [`conntrack`](lb_common::conntrack), the same the XDP program and the tests use.
//!
//! Why a sweeper in userspace, and nothing in the data path: the map is a plain hash map
//! that never evicts, so a flow leaves only when the sweeper removes both of its entries. A
//! single remover means two CPUs can never race to free one port. A sweep reads every entry
//! (`BPF_MAP_LOOKUP_BATCH`, thousands per system call) and judges each (both entries carry
//! the flow's record); a flow that looks done is read again, both entries, judged by the
//! fresher timestamp, and removed: the reverse entry first (that frees the SNAT port), then
//! the forward one.
//!
//! The two timestamps differ: the XDP program refreshes the time of the entry a packet hits,
//! and its twin's only when the packet tells something new (or while the flow is new). So
//! an entry of a flow that talks one way only looks done by its own time while its twin
//! lives on. Read again and kept, it is judged by the twin's time from then on, without
//! reading the twin again, until that time has run out too ([`SweepReport::kept_by_twin`]).
//!
//! A NAT gateway's UDP mappings (`MAPPINGS`) live as long as a flow uses them: each sweep
//! removes those whose public endpoint no flow it read uses, unless a flow took them after
//! the sweep began (it may not have read that flow).
//!
//! The [`Sweeper`] runs on a thread of its own, with map handles of its own, so a long
//! sweep (a second for a million flows, several when most of them expire at once) never
//! holds up `xlb run`'s loop.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, Map, MapData, PerCpuArray},
};
use lb_common::{
    conntrack::{FlowState, Timeouts, remaining_ns},
    maps::{
        DIR_TO_BACKEND, Endpoint, FlowKey, MAPPING_PRIVATE, MAPPING_PUBLIC, Mapping, MappingKey,
        NO_BACKEND, NatEntry, PROTO_UDP, Rewrite, names,
    },
    reason::Reason,
};

/// A mapping taken this long before a sweep began is kept by it even with no flow seen: a
/// new flow stamps its mapping with the time its creation began, a moment before its
/// entries are in the table, where the sweep may already have passed.
pub const MAPPING_MARGIN: Duration = Duration::from_secs(1);

/// Adds the public endpoint of a NAT gateway's UDP flow (its forward entry at `key`) to
/// `mapped`: its mapping stays.
fn keeps_mapping(mapped: &mut HashSet<Endpoint>, key: &FlowKey, rewrite: &Rewrite) {
    if rewrite.direction == DIR_TO_BACKEND
        && rewrite.backend_id == NO_BACKEND
        && key.proto == PROTO_UDP
    {
        mapped.insert(rewrite.src);
    }
}

/// The key of a mapping's other side.
fn other_side(key: &MappingKey, value: &Mapping) -> MappingKey {
    MappingKey {
        endpoint: value.endpoint,
        proto: key.proto,
        side: if key.side == MAPPING_PUBLIC {
            MAPPING_PRIVATE
        } else {
            MAPPING_PUBLIC
        },
    }
}

/// Under pressure (new flows refused: the table is full or SNAT ports ran out), flows that
/// are still `New` and have been idle this long are removed early. A SYN flood's flows are
/// `New` forever; a real client whose flow is removed this way carries on, since its next
/// packet recreates the flow (with the same SNAT port, its first choice, when it is free).
pub const PRESSURE_NEW_IDLE: Duration = Duration::from_millis(100);

/// What one sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows left, by [`FlowState`] (index = the state's number).
    pub flows: [u64; 5],
    /// Map entries left (two per flow, unless one is being created or removed).
    pub entries: u64,
    /// Flows removed because their state's timeout passed.
    pub expired: u64,
    /// `New` flows removed early because of pressure.
    pub pruned: u64,
    /// Entries removed because their flow's other entry was gone.
    pub orphans: u64,
    /// Entries done by their own time that were read again with their twin and kept, the
    /// twin having been seen later (a flow that talks one way only: the XDP program
    /// refreshes the time of the entry a packet hits, and its twin's only when the packet
    /// tells something new). The next sweeps judge such an entry by the twin's time read
    /// here, without reading it again, for as long as that time keeps it. (Under pressure
    /// a new flow idle 100 ms goes, so a new flow's entry kept so is read again at every
    /// sweep, as before.)
    pub kept_by_twin: u64,
    /// NAT gateway mappings left, and removed (each counts both of its sides).
    pub mappings: u64,
    pub mappings_removed: u64,
    /// Flows left, by the backend id and the service id they point at: what keeps an id
    /// from being given to a new object, and each backend's active flows.
    pub by_backend: BTreeMap<u32, u64>,
    pub by_service: BTreeMap<u32, u64>,
    /// When the sweep began: flows created before then are counted.
    pub started: Option<Instant>,
    pub took: Duration,
}

impl SweepReport {
    pub fn total_flows(&self) -> u64 {
        self.flows.iter().sum()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the XDP program stamps entries with, which
/// reads it coarse (`bpf_ktime_get_coarse_ns`, once per CPU per timer tick: up to two
/// ticks, 20 ms, behind; every timeout and margin here is far longer).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A handle of its own on the `CONNTRACK` map (opened by the map's id), usable on any
/// thread.
pub struct Table {
    map: HashMap<MapData, FlowKey, NatEntry>,
    /// The map's fd, for `BPF_MAP_LOOKUP_BATCH`; owned by `map`.
    fd: RawFd,
    /// `MAPPINGS`, which the flows of NAT gateways keep alive, and its fd (owned by
    /// `mappings`), for `BPF_MAP_LOOKUP_BATCH`.
    mappings: HashMap<MapData, MappingKey, Mapping>,
    mappings_fd: RawFd,
    /// Who takes ended flows off the backends' open-flow counts; `None` where nothing
    /// counts (the BPF_PROG_TEST_RUN labs).
    accounting: Option<Arc<Mutex<Accounting>>>,
    /// The entries the last sweep kept for their twin's time ([`SweepReport::kept_by_twin`]),
    /// with that time and the number of the sweep that kept them.
    twin_seen: StdHashMap<FlowKey, (u64, u64)>,
    /// Sweeps begun.
    sweeps: u64,
}

impl Table {
    pub fn open(ebpf: &Ebpf) -> anyhow::Result<Table> {
        let data = crate::loader::map_handle(ebpf, names::CONNTRACK)?;
        let fd = data.fd().as_fd().as_raw_fd();
        let mappings = crate::loader::map_handle(ebpf, names::MAPPINGS)?;
        let mappings_fd = mappings.fd().as_fd().as_raw_fd();
        Ok(Table {
            map: Map::HashMap(data).try_into()?,
            fd,
            mappings: Map::HashMap(mappings).try_into()?,
            mappings_fd,
            accounting: None,
            twin_seen: StdHashMap::new(),
            sweeps: 0,
        })
    }

    /// This table, taking what it removes off the open-flow counts of `accounting`.
    pub fn with_accounting(mut self, accounting: Arc<Mutex<Accounting>>) -> Table {
        self.accounting = Some(accounting);
        self
    }

    /// Removes expired flows (and, when `pressure` is set, idle `New` ones).
    pub fn sweep(&mut self, timeouts: &Timeouts, pressure: bool) -> anyhow::Result<SweepReport> {
        let started = Instant::now();
        let mut report = SweepReport {
            started: Some(started),
            ..SweepReport::default()
        };
        let now = monotonic_ns();
        // Candidates from forward entries (one per flow, counted by state) come first;
        // those from reverse entries matter only when the forward one is missing (an orphan).
        let (mut forward, mut reverse) = (Vec::new(), Vec::new());
        // Forward entries of flows whose starts the open-flow counts are behind on.
        let mut ended = Vec::new();
        // The public endpoints NAT gateways' UDP flows use (their mappings stay).
        let mut mapped = HashSet::new();
        // Entries this sweep keeps for their twin's time are marked with its number; the
        // others leave `twin_seen` at its end (not before: should it fail, they stay).
        self.sweeps += 1;
        let this_sweep = self.sweeps;
        for_each_batch(
            self.fd,
            names::CONNTRACK,
            |keys: &[FlowKey], entries: &[NatEntry]| {
                report.entries += keys.len() as u64;
                // Once per batch, not per entry: a cut waits at most a batch.
                let acc = self.accounting.as_deref().map(lock);
                for (key, entry) in keys.iter().zip(entries) {
                    let mut doomed = judge(key, entry, timeouts, now, pressure) != Verdict::Keep;
                    // Its twin's time, as the last sweep read it, may keep it still. (Should
                    // the twin be gone since, the entry goes as an orphan once that time has
                    // run out: at most a timeout late.)
                    if doomed && let Some((seen, mark)) = self.twin_seen.get_mut(key) {
                        let twin_time = NatEntry {
                            last_seen_ns: entry.last_seen_ns.max(*seen),
                            ..*entry
                        };
                        if judge(key, &twin_time, timeouts, now, pressure) == Verdict::Keep {
                            doomed = false;
                            *mark = this_sweep;
                        }
                    }
                    if entry.rewrite.direction == DIR_TO_BACKEND
                        && !doomed
                        && let Some(acc) = &acc
                        && acc.behind(key, entry)
                    {
                        ended.push(*key);
                    }
                    if !doomed {
                        keeps_mapping(&mut mapped, key, &entry.rewrite);
                    }
                    if entry.rewrite.direction == DIR_TO_BACKEND {
                        let state = FlowState::of(key.proto, &entry.seen);
                        report.flows[state as usize] += 1;
                        *report
                            .by_backend
                            .entry(entry.rewrite.backend_id)
                            .or_default() += 1;
                        *report
                            .by_service
                            .entry(entry.rewrite.service_id)
                            .or_default() += 1;
                        if doomed {
                            forward.push((*key, Some((state, entry.rewrite))));
                        }
                    } else if doomed {
                        reverse.push((*key, None));
                    }
                }
            },
        )?;
        if let Some(acc) = &self.accounting {
            let mut acc = lock(acc);
            for key in &ended {
                // The flows' removal must not wait on the counts: log and go on.
                if let Err(e) = acc.catch_up(&self.map, key) {
                    log::warn!("taking ended flows off the open-flow counts: {e:#}");
                }
            }
        }
        for (key, counted) in forward.iter().chain(&reverse) {
            let removed = remove_flow(
                &mut self.map,
                self.fd,
                key,
                timeouts,
                pressure,
                self.accounting.as_deref(),
            )?;
            let entries = match removed {
                Removed::Nothing => continue,
                // Kept after all (a packet came meanwhile, to it or to its twin): a gateway's
                // flow keeps its mapping too.
                Removed::Kept { twin_seen } => {
                    if let Some(seen) = twin_seen {
                        report.kept_by_twin += 1;
                        self.twin_seen.insert(*key, (seen, this_sweep));
                    }
                    if let Some((_, rewrite)) = counted {
                        keeps_mapping(&mut mapped, key, rewrite);
                    }
                    continue;
                }
                Removed::Flow(Verdict::Pruned) => {
                    report.pruned += 1;
                    2
                }
                Removed::Flow(_) => {
                    report.expired += 1;
                    2
                }
                Removed::Orphan => {
                    report.orphans += 1;
                    1
                }
            };
            report.entries = report.entries.saturating_sub(entries);
            if let Some((state, rewrite)) = counted {
                report.flows[*state as usize] = report.flows[*state as usize].saturating_sub(1);
                for (counts, id) in [
                    (&mut report.by_backend, rewrite.backend_id),
                    (&mut report.by_service, rewrite.service_id),
                ] {
                    if let Some(n) = counts.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            counts.remove(&id);
                        }
                    }
                }
            }
        }
        self.twin_seen.retain(|_, (_, mark)| *mark == this_sweep);
        // The memory of a burst of one-way flows is given back once they are gone.
        if self.twin_seen.len() < self.twin_seen.capacity() / 4 {
            self.twin_seen.shrink_to(self.twin_seen.len() * 2);
        }
        self.sweep_mappings(&mapped, now, &mut report)?;
        report.took = started.elapsed();
        Ok(report)
    }

    /// Removes the mappings whose public endpoint is not in `mapped` (the UDP flows the sweep
    /// kept), both sides, unless either side was taken after the sweep began (less
    /// [`MAPPING_MARGIN`]). Each side is read again just before it goes: a flow may have
    /// taken it since the sweep read them all. (A flow that takes it between that read and
    /// the delete loses it, and its private endpoint's next flow gets a mapping anew.)
    fn sweep_mappings(
        &mut self,
        mapped: &HashSet<Endpoint>,
        started_ns: u64,
        report: &mut SweepReport,
    ) -> anyhow::Result<()> {
        // In batches: a gateway may hold a mapping per UDP flow.
        let mut all: Vec<(MappingKey, Mapping)> = Vec::new();
        for_each_batch(
            self.mappings_fd,
            names::MAPPINGS,
            |keys: &[MappingKey], values: &[Mapping]| {
                all.extend(keys.iter().copied().zip(values.iter().copied()));
            },
        )?;
        // Per public endpoint, the latest time either side was taken.
        let public = |k: &MappingKey, m: &Mapping| {
            if k.side == MAPPING_PUBLIC {
                k.endpoint
            } else {
                m.endpoint
            }
        };
        let mut taken: StdHashMap<Endpoint, u64> = StdHashMap::new();
        for (k, m) in &all {
            let t = taken.entry(public(k, m)).or_default();
            *t = (*t).max(m.taken_ns);
        }
        let since = started_ns.saturating_sub(MAPPING_MARGIN.as_nanos() as u64);
        for (k, m) in &all {
            let p = public(k, m);
            let fresh = |m: &Mapping| m.taken_ns >= since;
            if mapped.contains(&p) || taken[&p] >= since {
                report.mappings += 1;
                continue;
            }
            // Taken again since (either side)?
            let again = [*k, other_side(k, m)]
                .iter()
                .any(|side| self.mappings.get(side, 0).is_ok_and(|m| fresh(&m)));
            if again {
                report.mappings += 1;
                continue;
            }
            match self.mappings.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => report.mappings_removed += 1,
                Err(e) => return Err(e).context("removing a mapping"),
            }
        }
        Ok(())
    }
}

impl Table {
    /// Removes every flow that points at backend `backend_id`, both entries, reverse first
    /// (as the sweeper does); returns how many flows. For `xlb backend rm --cut`: the
    /// backend's clients find their flows gone, and a new packet of theirs starts a new flow
    /// to a backend that is still in the table.
    pub fn cut(&mut self, backend_id: u32) -> anyhow::Result<u64> {
        let mut doomed = Vec::new();
        for_each_batch(
            self.fd,
            names::CONNTRACK,
            |keys: &[FlowKey], entries: &[NatEntry]| {
                for (key, entry) in keys.iter().zip(entries) {
                    if entry.rewrite.backend_id == backend_id
                        && entry.rewrite.direction == DIR_TO_BACKEND
                    {
                        doomed.push(*key);
                    }
                }
            },
        )?;
        let mut acc = self.accounting.as_deref().map(lock);
        let mut cut = 0;
        for forward in &doomed {
            // Read again: the flow may be gone, or its key another flow's, by now.
            let Some(entry) = get(&self.map, forward)? else {
                continue;
            };
            if entry.rewrite.backend_id != backend_id {
                continue;
            }
            let reverse = entry.twin_key(forward.proto);
            if get(&self.map, &reverse)?.is_some_and(|t| t.twin_key(forward.proto) == *forward) {
                delete(&mut self.map, &reverse)?;
            }
            let gone = take(self.fd, forward)?;
            if let (Some(acc), Some(gone)) = (acc.as_mut(), gone)
                && let Err(e) = acc.removed(forward, &gone)
            {
                log::warn!("taking a cut flow off the open-flow counts: {e:#}");
            }
            cut += 1;
        }
        Ok(cut)
    }

    /// Up to `limit` flows, by their forward entries (client → VIP), in the map's order; each
    /// last seen when its forward or its reverse entry was (the XDP program refreshes the
    /// time of the entry a packet hits, and its twin's only when the packet tells something).
    pub fn flows(&self, limit: usize) -> anyhow::Result<Vec<(FlowKey, NatEntry)>> {
        let mut flows = Vec::new();
        for_each_batch(
            self.fd,
            names::CONNTRACK,
            |keys: &[FlowKey], entries: &[NatEntry]| {
                for (key, entry) in keys.iter().zip(entries) {
                    if flows.len() < limit && entry.rewrite.direction == DIR_TO_BACKEND {
                        flows.push((*key, *entry));
                    }
                }
            },
        )?;
        for (key, entry) in &mut flows {
            if let Some(twin) = get(&self.map, &entry.twin_key(key.proto))?
                && twin.twin_key(key.proto) == *key
            {
                entry.last_seen_ns = entry.last_seen_ns.max(twin.last_seen_ns);
            }
        }
        Ok(flows)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The backends' open-flow counts (`ACTIVE`), from the control plane's side. The XDP
/// program adds one for each start of a flow: its creation, and each time a client's SYN
/// starts a closed flow anew (which bumps the flow's `generation`). So a flow has
/// `generation + 1` starts, of which all have ended but the last, and the last too once the
/// flow is closed (time-wait, closed) or removed. The sweeper takes the ended starts off —
/// each exactly once, for it remembers per flow how many it took off already (`RELEASED`,
/// pinned, so a restarted daemon does not take them off again). Only the sweeper and
/// `backend rm --cut` take off, under one lock; the XDP program only adds; both sides use
/// atomic adds on the same memory. A start ends for the count at the first sweep after its
/// close: about a second at most on small tables, longer on big ones.
pub struct Accounting {
    active: crate::mapped::MappedArray,
    released: HashMap<MapData, FlowKey, u32>,
    /// What `released` holds, so a sweep reads no map to see what is done.
    done: std::collections::HashMap<FlowKey, u32>,
}

impl Accounting {
    pub fn open(ebpf: &Ebpf) -> anyhow::Result<Accounting> {
        let active = crate::mapped::MappedArray::map(
            crate::loader::map_handle(ebpf, names::ACTIVE)?,
            names::ACTIVE,
            8,
        )?;
        let released: HashMap<MapData, FlowKey, u32> =
            Map::HashMap(crate::loader::map_handle(ebpf, names::RELEASED)?).try_into()?;
        let done = released
            .iter()
            .collect::<Result<_, _>>()
            .context("reading RELEASED")?;
        Ok(Accounting {
            active,
            released,
            done,
        })
    }

    /// The starts of the flow at `key` (its forward entry `entry`) that have ended.
    fn ended(key: &FlowKey, entry: &NatEntry) -> u32 {
        let closed = matches!(
            FlowState::of(key.proto, &entry.seen),
            FlowState::TimeWait | FlowState::Closed
        );
        entry.generation.wrapping_add(closed as u32)
    }

    /// Whether the counts are behind on this flow (by a batch's possibly old copy).
    fn behind(&self, key: &FlowKey, entry: &NatEntry) -> bool {
        Self::ended(key, entry) != self.done.get(key).copied().unwrap_or(0)
    }

    /// Takes the flow's ended starts off, by a fresh read of its forward entry. What it
    /// took off only ever grows: an entry read half-way through a restart (its generation
    /// bumped, its record not yet reset) cannot make a start count twice.
    fn catch_up(
        &mut self,
        table: &HashMap<MapData, FlowKey, NatEntry>,
        key: &FlowKey,
    ) -> anyhow::Result<()> {
        let Some(entry) = get(table, key)? else {
            return Ok(());
        };
        let done = self.done.get(key).copied().unwrap_or(0);
        let new = ahead(Self::ended(key, &entry), done);
        if new > 0 {
            // Recorded before it is taken off: a daemon killed in between leaves a count
            // one too high, never a start taken off twice.
            let ended = done.wrapping_add(new);
            self.released
                .insert(key, ended, 0)
                .context("writing RELEASED")?;
            self.done.insert(*key, ended);
            self.take_off(entry.rewrite.backend_id, new as u64);
        }
        Ok(())
    }

    /// The flow's forward entry `entry` is gone: whatever of it still counts comes off.
    fn removed(&mut self, key: &FlowKey, entry: &NatEntry) -> anyhow::Result<()> {
        let done = self.done.remove(key).unwrap_or(0);
        if done > 0 {
            match self.released.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing from RELEASED"),
            }
        }
        let new = ahead(entry.generation.wrapping_add(1), done);
        self.take_off(entry.rewrite.backend_id, new as u64);
        Ok(())
    }

    fn take_off(&self, backend_id: u32, n: u64) {
        if n == 0 {
            return;
        }
        let Some(counter) = self.active.counter(backend_id as usize) else {
            return;
        };
        let result = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
        if let Ok(before) = result
            && before < n
        {
            log::error!(
                "backend {backend_id}'s open-flow count was {before}, below the {n} flow \
                 start(s) ending: it stays at 0"
            );
        }
    }
}

/// How far a flow's count of starts `now` is ahead of `done` (the generation wraps: a
/// difference of more than 2^31 means `done` is the newer, and nothing is ahead).
fn ahead(now: u32, done: u32) -> u32 {
    let d = now.wrapping_sub(done);
    if d < 1 << 31 { d } else { 0 }
}

/// Runs sweeps on a thread of its own: about once a second (less often when a sweep takes
/// long, so it uses a twentieth of a core at most), and, while new flows are being refused
/// for want of room (`drop/conntrack_full`, `drop/conntrack_no_memory`,
/// `drop/snat_ports_exhausted`), every [`Sweeper::TICK`] (or four sweeps' time on a big
/// table), pruning idle `New` flows as well: what a SYN flood leaves.
pub struct Sweeper {
    stop: Arc<AtomicBool>,
    latest: Latest,
    thread: Option<JoinHandle<anyhow::Result<SweepReport>>>,
}

impl Sweeper {
    pub const TICK: Duration = Duration::from_millis(100);
    const INTERVAL: Duration = Duration::from_secs(1);
    /// A sweep takes at most 1/MAX_SHARE of the time between sweeps, 1/PRESSURE_SHARE under
    /// pressure: a big table's sweeps never run back to back.
    const MAX_SHARE: u32 = 20;
    const PRESSURE_SHARE: u32 = 4;
    /// Pressure lasts this long after the last refusal.
    const PRESSURE_FOR: Duration = Duration::from_secs(2);

    /// Sweeps once (so the first report has counts), then starts the thread.
    pub fn start(
        ebpf: &Ebpf,
        timeouts: Timeouts,
        accounting: Arc<Mutex<Accounting>>,
    ) -> anyhow::Result<Sweeper> {
        let mut table = Table::open(ebpf)?.with_accounting(accounting);
        let reasons: PerCpuArray<MapData, u64> =
            Map::PerCpuArray(crate::loader::map_handle(ebpf, names::REASONS)?).try_into()?;
        let first = table.sweep(&timeouts, false)?;
        let latest = Latest(Arc::new(Mutex::new(Some(first.clone()))));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, st) = (latest.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("xlb-sweeper".into())
            .spawn(move || run(table, reasons, timeouts, first, &l.0, &st))
            .context("starting the sweeper thread")?;
        Ok(Sweeper {
            stop,
            latest,
            thread: Some(thread),
        })
    }

    /// A handle on the latest report (`expired`, `pruned` and `orphans` count since
    /// start-up), for other threads.
    pub fn watch(&self) -> Latest {
        self.latest.clone()
    }

    /// Stops the thread after a last sweep, and returns that sweep's report.
    pub fn stop(mut self) -> anyhow::Result<SweepReport> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the sweeper thread panicked"),
            None => bail!("the sweeper was stopped already"),
        }
    }
}

/// The sweeper's latest report, readable from any thread.
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<Option<SweepReport>>>);

impl Latest {
    pub fn get(&self) -> Option<SweepReport> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sweeper thread: returns its last report when told to stop.
fn run(
    mut table: Table,
    reasons: PerCpuArray<MapData, u64>,
    timeouts: Timeouts,
    first: SweepReport,
    latest: &Mutex<Option<SweepReport>>,
    stop: &AtomicBool,
) -> anyhow::Result<SweepReport> {
    let refusals = || -> anyhow::Result<u64> {
        let mut sum = 0;
        for r in [
            Reason::DropConntrackFull,
            Reason::DropConntrackNoMemory,
            Reason::DropSnatPortsExhausted,
        ] {
            sum += reasons.get(&(r as u32), 0)?.iter().sum::<u64>();
        }
        Ok(sum)
    };
    let mut totals = first;
    // A failure (a map read refused, memory short) is logged once, when it starts, and the
    // work tried again at the next turn: a sweeper that stopped would let the table fill
    // for good.
    let (mut counting_fails, mut sweeping_fails) = (false, false);
    let failed = |what: &str, e: anyhow::Error, failing: &mut bool| {
        if !std::mem::replace(failing, true) {
            log::error!("the conntrack sweeper: {what}: {e:#}");
        }
    };
    const COUNTING: &str = "reading the refusal counters failed; sweeping on, but not more \
                            often when new flows are refused";
    let mut refused = refusals().unwrap_or_else(|e| {
        failed(COUNTING, e, &mut counting_fails);
        0
    });
    let mut pressure_until: Option<Instant> = None;
    let mut next = Instant::now() + Sweeper::INTERVAL;
    let mut sweep = |pressure: bool, totals: &mut SweepReport| -> anyhow::Result<Instant> {
        let mut report = table.sweep(&timeouts, pressure)?;
        if report.expired + report.pruned + report.orphans + report.kept_by_twin > 0 {
            log::debug!(
                "sweep: {} flows expired, {} pruned, {} orphan entries, {} entries kept for \
                 their twin's time, {} flows left, {:?}",
                report.expired,
                report.pruned,
                report.orphans,
                report.kept_by_twin,
                report.total_flows(),
                report.took
            );
        }
        let wait = if pressure {
            Sweeper::TICK.max(report.took * Sweeper::PRESSURE_SHARE)
        } else {
            Sweeper::INTERVAL.max(report.took * Sweeper::MAX_SHARE)
        };
        report.expired += totals.expired;
        report.pruned += totals.pruned;
        report.orphans += totals.orphans;
        *totals = report.clone();
        *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        Ok(Instant::now() + wait)
    };
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Sweeper::TICK);
        let now = Instant::now();
        let r = match refusals() {
            Ok(r) => {
                if std::mem::take(&mut counting_fails) {
                    log::info!("the conntrack sweeper reads the refusal counters again");
                }
                r
            }
            Err(e) => {
                failed(COUNTING, e, &mut counting_fails);
                refused
            }
        };
        if r > refused {
            if pressure_until.is_none() {
                log::warn!(
                    "new flows are being refused (conntrack full, out of memory, or SNAT ports \
                     exhausted): sweeping more often and pruning idle new flows"
                );
                next = now;
            }
            refused = r;
            pressure_until = Some(now + Sweeper::PRESSURE_FOR);
        }
        let pressure = pressure_until.is_some_and(|until| now < until);
        if !pressure {
            pressure_until = None;
        }
        if now >= next {
            next = match sweep(pressure, &mut totals) {
                Ok(next) => {
                    if std::mem::take(&mut sweeping_fails) {
                        log::info!("the conntrack sweeper sweeps again");
                    }
                    next
                }
                Err(e) => {
                    failed(
                        "a sweep failed; trying again (no flow expires meanwhile)",
                        e,
                        &mut sweeping_fails,
                    );
                    now + if pressure {
                        Sweeper::TICK
                    } else {
                        Sweeper::INTERVAL
                    }
                }
            };
        }
    }
    // A last sweep, so the final counts are current.
    sweep(false, &mut totals)?;
    Ok(totals)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Expired,
    Pruned,
}

/// What becomes of the flow of an entry read at `now`.
fn judge(
    key: &FlowKey,
    entry: &NatEntry,
    timeouts: &Timeouts,
    now: u64,
    pressure: bool,
) -> Verdict {
    if remaining_ns(entry, key.proto, timeouts, now) == 0 {
        return Verdict::Expired;
    }
    let idle = now.saturating_sub(entry.last_seen_ns);
    if pressure
        && FlowState::of(key.proto, &entry.seen) == FlowState::New
        && idle >= PRESSURE_NEW_IDLE.as_nanos() as u64
    {
        return Verdict::Pruned;
    }
    Verdict::Keep
}

enum Removed {
    /// Both entries of a flow, expired or pruned.
    Flow(Verdict),
    /// An entry whose twin was gone.
    Orphan,
    /// Nothing, the entry being gone already.
    Nothing,
    /// Nothing, the flow being no longer done: a packet came meanwhile, or its twin was seen
    /// later (`twin_seen`, that time) than the entry itself.
    Kept { twin_seen: Option<u64> },
}

/// Removes the flow of the entry at `key`, if it is still doomed when read again now, with
/// its twin: judged by the fresher of the two timestamps (the XDP program refreshes the
/// entry a packet hits, and its twin only when the packet tells something new, or while the
/// flow is new). The reverse entry goes first, so the SNAT port is free only once nothing
/// can send to it, then the forward one. An entry whose twin is missing (or belongs to
/// another flow) is removed alone.
fn remove_flow(
    table: &mut HashMap<MapData, FlowKey, NatEntry>,
    fd: RawFd,
    key: &FlowKey,
    timeouts: &Timeouts,
    pressure: bool,
    accounting: Option<&Mutex<Accounting>>,
) -> anyhow::Result<Removed> {
    // Held from the fresh read to the accounting, so a cut cannot take the same flow off.
    let mut acc = accounting.map(lock);
    let Some(mut entry) = get(table, key)? else {
        return Ok(Removed::Nothing);
    };
    let twin_key = entry.twin_key(key.proto);
    let twin = get(table, &twin_key)?.filter(|t| t.twin_key(key.proto) == *key);
    let own = entry;
    if let Some(t) = &twin {
        entry.last_seen_ns = entry.last_seen_ns.max(t.last_seen_ns);
    }
    // Judged again on a fresh read, at a fresh time: the batch may be a little old.
    let now = monotonic_ns();
    let verdict = judge(key, &entry, timeouts, now, pressure);
    if verdict == Verdict::Keep {
        // Kept by the twin's time, if its own would not have kept it.
        let by_twin = entry.last_seen_ns > own.last_seen_ns
            && judge(key, &own, timeouts, now, pressure) != Verdict::Keep;
        return Ok(Removed::Kept {
            twin_seen: by_twin.then_some(entry.last_seen_ns),
        });
    }
    let forward_key = if entry.rewrite.direction == DIR_TO_BACKEND {
        Some(*key)
    } else {
        twin.map(|_| twin_key)
    };
    let removed = if twin.is_none() {
        Removed::Orphan
    } else {
        // The reverse entry first: that frees the SNAT port only once nothing can send to it.
        let reverse = if entry.rewrite.direction == DIR_TO_BACKEND {
            twin_key
        } else {
            *key
        };
        delete(table, &reverse)?;
        Removed::Flow(verdict)
    };
    match forward_key {
        // The forward entry as it was when it went: a client's SYN a moment before (a
        // restart, counted by the data plane) is in it, so the accounting misses nothing.
        Some(forward) => {
            if let (Some(acc), Some(gone)) = (acc.as_mut(), take(fd, &forward)?)
                && let Err(e) = acc.removed(&forward, &gone)
            {
                log::warn!("taking a removed flow off the open-flow counts: {e:#}");
            }
        }
        None => delete(table, key)?,
    }
    Ok(removed)
}

fn get(
    table: &HashMap<MapData, FlowKey, NatEntry>,
    key: &FlowKey,
) -> anyhow::Result<Option<NatEntry>> {
    match table.get(key, 0) {
        Ok(e) => Ok(Some(e)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading a conntrack entry"),
    }
}

fn delete(table: &mut HashMap<MapData, FlowKey, NatEntry>, key: &FlowKey) -> anyhow::Result<()> {
    match table.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing a conntrack entry"),
    }
}

/// `union bpf_attr` for the element commands (BPF_MAP_LOOKUP_AND_DELETE_ELEM).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Removes the entry at `key` of the hash map `fd` and returns it as it was at that very
/// moment (BPF_MAP_LOOKUP_AND_DELETE_ELEM, Linux 5.14): a packet that changed it a moment
/// before is in what comes back. `None` if there was none.
fn take(fd: RawFd, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
    let mut value = NatEntry::default();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const FlowKey as u64,
        value: &mut value as *mut NatEntry as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at a key and a value of the map's key and value types, alive
    // for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        return Ok(Some(value));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e).context("removing a conntrack entry (BPF_MAP_LOOKUP_AND_DELETE_ELEM)")
    }
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;

/// The `batch` member of `union bpf_attr`, for BPF_MAP_LOOKUP_BATCH.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Calls `f` with every entry of the hash map `fd`, whose keys are `K`s and values `V`s (a
/// map an aya `HashMap<_, K, V>` was made of, which checked their sizes), a batch at a time.
/// Entries added or removed meanwhile may or may not be seen; none is seen twice. `what`
/// names the map in errors.
pub fn for_each_batch<K: Pod + Default, V: Pod + Default>(
    fd: RawFd,
    what: &str,
    mut f: impl FnMut(&[K], &[V]),
) -> anyhow::Result<()> {
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The kernel's cursor for hash maps is a bucket number (u32); a u64 leaves room.
    let mut cursor = 0u64;
    let mut first = true;
    loop {
        let mut out = 0u64;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor as *const u64 as u64
            },
            out_batch: &mut out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values of the map's key and
        // value sizes (K and V, whose sizes the caller's typed map checked), and at two
        // cursors, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc != 0).then(std::io::Error::last_os_error);
        let n = attr.count as usize;
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            None | Some(libc::ENOENT) => {}
            // A bucket holds more entries than the buffer: retry the same bucket, larger.
            Some(libc::ENOSPC) => {
                keys.resize(keys.len() * 2, K::default());
                values.resize(values.len() * 2, V::default());
                continue;
            }
            Some(_) => {
                return Err(err.unwrap_or_else(std::io::Error::last_os_error))
                    .with_context(|| format!("BPF_MAP_LOOKUP_BATCH on {what}"));
            }
        }
        f(&keys[..n], &values[..n]);
        if err.is_some() {
            return Ok(()); // ENOENT: that was the last batch.
        }
        cursor = out;
        first = false;
    }
}
