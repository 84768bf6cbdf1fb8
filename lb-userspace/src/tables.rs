//! The maps that decide where a new flow goes — `SERVICES`, `BACKENDS`, the Maglev tables —
//! and the per-object counters, as the control plane writes them.
//!
//! A change is atomic for the data path: a service's new Maglev table is written into the
//! table the service does not use (each service owns two), then one update of its
//! `SERVICES` entry switches to it, then a [`GracePeriod`] passes, after which no program
//! run can still be reading the old one (or the old entry), which is only then free to be
//! written again. The tables
//! live in a memory-mapped array (`BPF_F_MMAPABLE`), so writing one is a copy, not a system
//! call per slot: a change to one service takes about a millisecond, and touches nothing of
//! the others.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::Ordering,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    util::nr_cpus,
};
use lb_common::maps::{
    BackendEntry, FlowStats, NO_GATEWAYS, ServiceEntry, ServiceKey, Settings, names,
};

use crate::{loader::map_handle, mapped::MappedArray};

/// Handles of their own on the maps, so a [`Tables`] can live apart from the loaded object.
pub struct Tables {
    settings: Array<MapData, Settings>,
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    backends: Array<MapData, BackendEntry>,
    service_stats: PerCpuArray<MapData, FlowStats>,
    backend_stats: PerCpuArray<MapData, FlowStats>,
    quic: HashMap<MapData, u64, u32>,
    vips: HashMap<MapData, [u8; 16], u32>,
    gateways: LpmTrie<MapData, [u8; 16], ServiceEntry>,
    reasons: PerCpuArray<MapData, u64>,
    handoffs: PerCpuArray<MapData, u64>,
    maglev: MappedArray,
    active: MappedArray,
    maglev_size: u32,
    cpus: usize,
    grace: GracePeriod,
}

impl Tables {
    /// Opens the maps of a loaded object whose Maglev tables have `maglev_size` slots.
    pub fn open(ebpf: &Ebpf, maglev_size: u32) -> anyhow::Result<Tables> {
        let handle = |name| map_handle(ebpf, name);
        let maglev = MappedArray::map(handle(names::MAGLEV)?, names::MAGLEV, 8)?;
        if maglev.u32s() % (2 * maglev_size as usize) != 0 {
            bail!(
                "map MAGLEV holds {} slots, not a whole number of pairs of {maglev_size}-slot \
                 tables",
                maglev.u32s()
            );
        }
        Ok(Tables {
            settings: Map::Array(handle(names::CONFIG)?).try_into()?,
            services: Map::HashMap(handle(names::SERVICES)?).try_into()?,
            backends: Map::Array(handle(names::BACKENDS)?).try_into()?,
            service_stats: Map::PerCpuArray(handle(names::SERVICE_STATS)?).try_into()?,
            backend_stats: Map::PerCpuArray(handle(names::BACKEND_STATS)?).try_into()?,
            quic: Map::HashMap(handle(names::QUIC_SERVERS)?).try_into()?,
            vips: Map::HashMap(handle(names::VIPS)?).try_into()?,
            gateways: Map::LpmTrie(handle(names::GATEWAYS)?).try_into()?,
            reasons: Map::PerCpuArray(handle(names::REASONS)?).try_into()?,
            handoffs: Map::PerCpuArray(handle(names::HANDOFFS)?).try_into()?,
            maglev,
            active: MappedArray::map(handle(names::ACTIVE)?, names::ACTIVE, 8)?,
            maglev_size,
            cpus: nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?,
            grace: GracePeriod::new()?,
        })
    }

    pub fn maglev_size(&self) -> u32 {
        self.maglev_size
    }

    /// How many services the tables have room for.
    pub fn max_services(&self) -> u32 {
        (self.maglev.u32s() / (2 * self.maglev_size as usize)) as u32
    }

    pub fn max_backends(&self) -> u32 {
        self.backends.len()
    }

    /// Writes `settings` to `CONFIG`, with the handoff secret the map holds already (its
    /// programs mark and check frames with it, so it outlives a daemon's restart), or a new
    /// random one for new maps. Returns what the map held before (all zero for new maps).
    pub fn set_settings(&mut self, mut settings: Settings) -> anyhow::Result<Settings> {
        let held = self.settings.get(&0, 0).context("reading CONFIG")?;
        settings.handoff_secret = if held.handoff_secret != [0; 6] {
            held.handoff_secret
        } else {
            new_handoff_secret()?
        };
        self.settings
            .set(0, settings, 0)
            .context("writing CONFIG")?;
        Ok(held)
    }

    /// The services in the map, as the data path sees them.
    pub fn services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceEntry)>> {
        Ok(self.services.iter().collect::<Result<_, _>>()?)
    }

    /// The backend ids in use (their entries are not all zeros), with their entries.
    pub fn backends(&self) -> anyhow::Result<Vec<(u32, BackendEntry)>> {
        let mut used = Vec::new();
        for id in 0..self.backends.len() {
            let entry = self.backends.get(&id, 0)?;
            if entry != BackendEntry::default() {
                used.push((id, entry));
            }
        }
        Ok(used)
    }

    /// Backend id `id`'s entry (all zeros: no one's).
    pub fn backend(&self, id: u32) -> anyhow::Result<BackendEntry> {
        Ok(self.backends.get(&id, 0)?)
    }

    /// Gives backend id `id` to `entry` (all zeros: to no one), with its counters at zero.
    pub fn set_backend(&mut self, id: u32, entry: BackendEntry) -> anyhow::Result<()> {
        self.backends
            .set(id, entry, 0)
            .with_context(|| format!("writing backend {id}"))?;
        // An id is given only once no flow points at it: its open flows are none. (Should
        // a count ever have been left behind, it ends here.)
        if let Some(active) = self.active.counter(id as usize) {
            active.store(0, Ordering::Relaxed);
        }
        let zeros = PerCpuValues::try_from(vec![FlowStats::default(); self.cpus])?;
        self.backend_stats
            .set(id, zeros, 0)
            .with_context(|| format!("clearing the counters of backend {id}"))
    }

    /// Starts service id `id`'s counters at zero, for a service new to the id.
    pub fn clear_service_stats(&mut self, id: u32) -> anyhow::Result<()> {
        let zeros = PerCpuValues::try_from(vec![FlowStats::default(); self.cpus])?;
        self.service_stats
            .set(id, zeros, 0)
            .with_context(|| format!("clearing the counters of service {id}"))
    }

    /// Writes `slots` (backend ids) as the Maglev table of the service at `key` — into the
    /// table it does not use — and switches the service to it, creating or updating its
    /// entry from `entry` (whose `table` is set here). Returns once the table it used before
    /// is free again.
    pub fn switch_table(
        &mut self,
        key: &ServiceKey,
        mut entry: ServiceEntry,
        slots: &[u32],
    ) -> anyhow::Result<()> {
        if slots.len() != self.maglev_size as usize {
            bail!(
                "a Maglev table of {} slots, but the tables have {}",
                slots.len(),
                self.maglev_size
            );
        }
        let own = [2 * entry.id, 2 * entry.id + 1];
        let (replaced, in_use) = match self.services.get(key, 0) {
            Ok(current) => (
                true,
                (current.id == entry.id && own.contains(&current.table)).then_some(current.table),
            ),
            Err(aya::maps::MapError::KeyNotFound) => (false, None),
            Err(e) => return Err(e).context("reading a service entry"),
        };
        entry.table = if in_use == Some(own[0]) {
            own[1]
        } else {
            own[0]
        };
        let first = entry.first_slot(self.maglev_size) as usize;
        self.maglev.write_u32s(first, slots)?;
        self.services
            .insert(key, entry, 0)
            .context("writing a service entry")?;
        // The old entry's memory and the old table are free only once no run reads them.
        if replaced {
            self.grace.wait();
        }
        Ok(())
    }

    /// Removes the service at `key`; returns once no program run can still be using it.
    pub fn remove_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing a service entry"),
        }
        self.grace.wait();
        Ok(())
    }

    /// The Maglev table in use by a service, as the data path reads it.
    pub fn table(&self, entry: &ServiceEntry) -> anyhow::Result<Vec<u32>> {
        self.maglev.read_u32s(
            entry.first_slot(self.maglev_size) as usize,
            self.maglev_size as usize,
        )
    }

    /// Routes QUIC server id `key` (`lb_common::quic::key`) to backend `id`, or (None) no
    /// longer.
    pub fn set_quic(&mut self, key: u64, id: Option<u32>) -> anyhow::Result<()> {
        match id {
            Some(id) => self.quic.insert(key, id, 0).context("writing QUIC_SERVERS"),
            None => match self.quic.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).context("removing from QUIC_SERVERS"),
            },
        }
    }

    /// Makes `VIPS` hold exactly `wanted`: each address services listen on (as
    /// `Endpoint::addr_of` stores it: IPv6 as it is, IPv4 mapped), and how many do.
    pub fn set_vips(&mut self, wanted: &BTreeMap<[u8; 16], u32>) -> anyhow::Result<()> {
        let held: Vec<[u8; 16]> = self.vips.keys().collect::<Result<_, _>>()?;
        for addr in held.iter().filter(|a| !wanted.contains_key(*a)) {
            match self.vips.remove(addr) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing from VIPS"),
            }
        }
        for (addr, count) in wanted {
            self.vips.insert(addr, count, 0).context("writing VIPS")?;
        }
        Ok(())
    }

    /// The NAT gateways in the map: (network address IPv4-mapped, prefix length of the
    /// mapped address, entry).
    pub fn gateways(&self) -> anyhow::Result<Vec<([u8; 16], u32, ServiceEntry)>> {
        self.gateways
            .iter()
            .map(|kv| {
                let (key, entry) = kv?;
                Ok((key.data(), key.prefix_len(), entry))
            })
            .collect()
    }

    /// Creates or replaces the NAT gateway of the network `addr`/`prefix_len`; returns once
    /// no program run can still be reading an entry it replaced.
    pub fn set_gateway(
        &mut self,
        addr: [u8; 16],
        prefix_len: u32,
        entry: ServiceEntry,
    ) -> anyhow::Result<()> {
        // Before the entry, so that no packet of the new gateway's skips the lookup.
        self.set_flag(NO_GATEWAYS, false)?;
        let key = Key::new(prefix_len, addr);
        let replaced = self.gateways.get(&key, 0).is_ok();
        self.gateways
            .insert(&key, entry, 0)
            .context("writing a NAT gateway entry")?;
        if replaced {
            self.grace.wait();
        }
        Ok(())
    }

    /// Removes the NAT gateway of the network `addr`/`prefix_len`; returns once no program
    /// run can still be using it.
    pub fn remove_gateway(&mut self, addr: [u8; 16], prefix_len: u32) -> anyhow::Result<()> {
        match self.gateways.remove(&Key::new(prefix_len, addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing a NAT gateway entry"),
        }
        self.grace.wait();
        Ok(())
    }

    /// Tells the data plane whether `GATEWAYS` is empty ([`NO_GATEWAYS`]), so that it
    /// skips the lookups in an empty one. Called once a change to the gateways is done.
    pub fn note_gateways(&mut self) -> anyhow::Result<()> {
        let none = match self.gateways.keys().next() {
            None => true,
            Some(key) => {
                key.context("reading GATEWAYS")?;
                false
            }
        };
        self.set_flag(NO_GATEWAYS, none)
    }

    /// Sets (`on`) or clears one of `CONFIG`'s flags.
    fn set_flag(&mut self, flag: u8, on: bool) -> anyhow::Result<()> {
        let mut settings = self.settings.get(&0, 0).context("reading CONFIG")?;
        let flags = if on {
            settings.flags | flag
        } else {
            settings.flags & !flag
        };
        if flags != settings.flags {
            settings.flags = flags;
            self.settings
                .set(0, settings, 0)
                .context("writing CONFIG")?;
        }
        Ok(())
    }

    /// Backend `id`'s open flows (`ACTIVE`).
    pub fn active(&self, id: u32) -> u64 {
        self.active
            .counter(id as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Rewrites backend `id`'s entry (its weight or response time), counters untouched.
    pub fn update_backend(&mut self, id: u32, entry: BackendEntry) -> anyhow::Result<()> {
        self.backends
            .set(id, entry, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    pub fn service_stats(&self, id: u32) -> anyhow::Result<FlowStats> {
        sum(&self.service_stats, id)
    }

    pub fn backend_stats(&self, id: u32) -> anyhow::Result<FlowStats> {
        sum(&self.backend_stats, id)
    }

    /// Packets per [`Reason`](lb_common::reason::Reason), summed over CPUs, in its order.
    pub fn reasons(&self) -> anyhow::Result<Vec<u64>> {
        sums(&self.reasons)
    }

    /// Frames per [`Handoff`](lb_common::maps::Handoff), summed over CPUs, in its order.
    pub fn handoffs(&self) -> anyhow::Result<Vec<u64>> {
        sums(&self.handoffs)
    }
}

fn sums(array: &PerCpuArray<MapData, u64>) -> anyhow::Result<Vec<u64>> {
    (0..array.len())
        .map(|i| Ok(array.get(&i, 0)?.iter().sum()))
        .collect()
}

fn sum(array: &PerCpuArray<MapData, FlowStats>, id: u32) -> anyhow::Result<FlowStats> {
    let mut total = FlowStats::default();
    for cpu in array.get(&id, 0)?.iter() {
        total.add(cpu);
    }
    Ok(total)
}

/// Waits until every XDP program run that began before the call has ended: an RCU grace
/// period. The kernel waits for one (`synchronize_rcu`) whenever a map-of-maps is
/// updated, so that userspace knows no program still sees the old inner map
/// (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c); XDP runs are RCU read-side
/// sections. So each wait rewrites the one slot of a map-of-maps of our own.
pub struct GracePeriod {
    outer: OwnedFd,
    inner: OwnedFd,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The leading fields of `union bpf_attr` for BPF_MAP_CREATE; the kernel reads the rest as
/// zeros.
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for `cmd`, valid for its size;
    // the kernel reads no further than the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl GracePeriod {
    pub fn new() -> anyhow::Result<GracePeriod> {
        let create = |map_type, inner_map_fd| -> anyhow::Result<OwnedFd> {
            let fd = bpf(
                BPF_MAP_CREATE,
                &mut MapCreate {
                    map_type,
                    key_size: 4,
                    value_size: 4,
                    max_entries: 1,
                    map_flags: 0,
                    inner_map_fd,
                },
            )
            .context("creating the map that waits for grace periods")?;
            // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        };
        let inner = create(BPF_MAP_TYPE_ARRAY, 0)?;
        let outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_raw_fd() as u32)?;
        Ok(GracePeriod { outer, inner })
    }

    /// Returns once every program run that began before the call has ended. Should the
    /// kernel refuse the update (it never has), a sleep far longer than any program run
    /// stands in, and says so.
    pub fn wait(&self) {
        if let Err(e) = self.update() {
            log::error!("{e:#}; sleeping 100 ms instead");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn update(&self) -> anyhow::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &mut MapUpdate {
                map_fd: self.outer.as_raw_fd() as u32,
                _pad: 0,
                key: &key as *const u32 as u64,
                value: &value as *const u32 as u64,
                flags: 0,
            },
        )
        .context("waiting for an RCU grace period")?;
        Ok(())
    }
}

/// A random handoff secret: a locally administered unicast MAC (46 random bits), never zero.
fn new_handoff_secret() -> anyhow::Result<[u8; 6]> {
    let mut secret = [0u8; 6];
    // SAFETY: `secret` is writable for the length passed.
    let n = unsafe { libc::getrandom(secret.as_mut_ptr().cast(), secret.len(), 0) };
    anyhow::ensure!(
        n == secret.len() as isize,
        "getrandom for the handoff secret: {}",
        std::io::Error::last_os_error()
    );
    secret[0] = (secret[0] & 0xfc) | 0x02;
    Ok(secret)
}
