//! The services and backends xlb runs, with ids that stay theirs for life, and the one way
//! they change: [`Registry::apply`], which reconciles the maps to a checked config and
//! touches only the services that differ. The file at start, `xlb apply`, SIGHUP and every
//! API command (which edits the running config and applies it) all go through it; a health
//! check's verdict only marks a backend down or up and rebuilds its service's table.
//!
//! NAT gateways live here too, simpler: an entry in `GATEWAYS` per private network, with an
//! id of the services' (their counters are a service's) that retires as a service's does.
//!
//! Ids: a service id indexes its counters and owns two Maglev tables; a backend id indexes
//! its counters and its `BACKENDS` entry. Flows carry both ids, so an id given up (its object
//! removed) is *retired*, not free: it is given to a new object only after a sweep that
//! began after the retirement found no flow pointing at it. An id starts with its counters
//! at zero.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use lb_common::{
    maglev,
    maps::{
        BACKEND_RETIRED, BackendEntry, Endpoint, FREED_IDS_CLEARED, FlowStats, MAX_SNAT_ADDRESSES,
        MODE_GATEWAY, NO_BACKEND, ServiceEntry, ServiceKey,
    },
    scheduler,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{
        Backend, Checked, ConfigErrors, FieldError, Gateway, Mode, Network, Protocol, Scheduler,
        Service, SnatPorts,
    },
    conntrack::SweepReport,
    tables::Tables,
};

/// What names a service: its VIP and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceName {
    pub vip: SocketAddr,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.protocol)
    }
}

impl ServiceName {
    pub fn of(service: &Service) -> ServiceName {
        ServiceName {
            vip: service.vip,
            protocol: service.protocol,
        }
    }

    fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: Endpoint::from_socket(self.vip),
            proto: self.protocol.number(),
            _pad: 0,
        }
    }
}

/// Whether a backend takes new flows, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    /// Failed its health checks.
    Down,
    /// Told to drain: its open flows finish, it takes no new ones.
    Draining,
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        }
    }
}

/// A service as it runs.
#[derive(Clone, Debug)]
pub struct LiveService {
    pub name: ServiceName,
    pub id: u32,
    pub config: Service,
    pub backends: Vec<LiveBackend>,
}

/// A NAT gateway as it runs.
#[derive(Clone, Debug)]
pub struct LiveGateway {
    /// An id of the services': its counters' index in `SERVICE_STATS`.
    pub id: u32,
    pub config: Gateway,
}

/// A backend as it runs.
#[derive(Clone, Debug)]
pub struct LiveBackend {
    pub id: u32,
    pub config: Backend,
    /// Marked down by its health checks.
    pub down: bool,
    /// Smoothed response time from its health checks, in microseconds (0: not measured).
    pub latency_us: u32,
}

impl LiveBackend {
    pub fn state(&self) -> BackendState {
        if self.config.drain {
            BackendState::Draining
        } else if self.down {
            BackendState::Down
        } else {
            BackendState::Up
        }
    }

    /// Its weight in the Maglev table: 0 unless it is up.
    fn table_weight(&self) -> u32 {
        match self.state() {
            BackendState::Up => self.config.weight,
            BackendState::Down | BackendState::Draining => 0,
        }
    }
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub services_added: u32,
    pub services_removed: u32,
    pub backends_added: u32,
    pub backends_removed: u32,
    /// Services whose Maglev table was rebuilt and switched.
    pub tables_rebuilt: u32,
    #[serde(default)]
    pub gateways_added: u32,
    #[serde(default)]
    pub gateways_removed: u32,
}

/// Ids `0..capacity`: in use, retired (waiting for the flows that point at them to end),
/// or free.
#[derive(Debug)]
struct IdPool {
    capacity: u32,
    used: BTreeSet<u32>,
    retired: BTreeMap<u32, Instant>,
}

impl IdPool {
    fn new(capacity: u32) -> IdPool {
        IdPool {
            capacity,
            used: BTreeSet::new(),
            retired: BTreeMap::new(),
        }
    }

    fn free(&self) -> u32 {
        self.capacity - self.used.len() as u32 - self.retired.len() as u32
    }

    /// The lowest free id.
    fn take(&mut self) -> Option<u32> {
        let id =
            (0..self.capacity).find(|i| !self.used.contains(i) && !self.retired.contains_key(i))?;
        self.used.insert(id);
        Some(id)
    }

    fn retire(&mut self, id: u32) {
        self.used.remove(&id);
        self.retired.insert(id, Instant::now());
    }

    /// Frees the retired ids that a sweep begun after their retirement found no flow
    /// pointing at; returns them.
    fn release(&mut self, flows: &BTreeMap<u32, u64>, sweep_started: Instant) -> Vec<u32> {
        let done: Vec<u32> = self
            .retired
            .iter()
            .filter(|(id, since)| **since < sweep_started && !flows.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        for id in &done {
            self.retired.remove(id);
        }
        done
    }

    /// [`release`](Self::release), with each id's entries cleared by `clear` before it is
    /// free: an id whose clearing fails stays retired, for the next sweep. Returns the
    /// first failure.
    fn release_cleared(
        &mut self,
        flows: &BTreeMap<u32, u64>,
        sweep_started: Instant,
        mut clear: impl FnMut(u32) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut cleared = Ok(());
        for id in self.release(flows, sweep_started) {
            if let Err(e) = clear(id) {
                self.retired.insert(id, sweep_started);
                cleared = cleared.and(Err(e));
            }
        }
        cleared
    }
}

/// The running services, the ids, and the maps they are written to.
pub struct Registry {
    tables: Tables,
    /// The config being run: the file's, as the API changed it since.
    running: Checked,
    services: BTreeMap<ServiceName, LiveService>,
    gateways: BTreeMap<Network, LiveGateway>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Maglev tables rebuilt since start (for the metrics).
    pub rebuilds: u64,
    /// What `QUIC_SERVERS` holds.
    quic: BTreeMap<u64, u32>,
}

impl Registry {
    /// Opens the maps of a loaded object, adopts what they hold (see [`Registry::start`]),
    /// and makes them run `cfg`.
    pub fn load(ebpf: &aya::Ebpf, cfg: &Checked) -> Result<Registry, ApplyError> {
        Registry::start(Tables::open(ebpf, cfg.dataplane.maglev_table_size)?, cfg)
    }

    /// Adopts the services and backends the maps hold already — pinned maps a daemon
    /// before this one filled — with their ids, then applies `cfg`: what it keeps keeps
    /// its id, counters and flows; what it drops is retired like any removed object.
    pub fn start(mut tables: Tables, cfg: &Checked) -> Result<Registry, ApplyError> {
        let held = tables.set_settings(cfg.settings())?;
        let mut registry = Registry {
            service_ids: IdPool::new(tables.max_services()),
            backend_ids: IdPool::new(tables.max_backends()),
            tables,
            running: Checked {
                services: Vec::new(),
                gateways: Vec::new(),
                ..cfg.clone()
            },
            services: BTreeMap::new(),
            gateways: BTreeMap::new(),
            rebuilds: 0,
            quic: BTreeMap::new(),
        };
        registry.adopt(cfg, held.flags & FREED_IDS_CLEARED != 0)?;
        registry.apply(cfg)?;
        Ok(registry)
    }

    /// Takes in what the maps hold. Weights are not in the maps: adopted backends have
    /// weight 0 until `apply` gives them the config's (and rebuilds their tables, which come
    /// out as before when the config is the same: the table depends on the set alone). A
    /// backend missing from its service's table in use was down (or drained): it starts
    /// down, and its health checks bring it back. A backend removed from its service whose
    /// id waits for its flows stays retired (its entry says so). Where two ids still hold
    /// one address, the one the table uses is kept and the other retired. So are ids of
    /// objects gone but for their flows: a removed service's backends' (whose entries
    /// name a service that is no more) and a removed NAT gateway's, by its counters, if
    /// the daemon before cleared the counters of the ids it freed (`freed_ids_cleared`);
    /// if not (an older xlb's maps), the counters of the service ids nothing holds are
    /// cleared now, so that a later restart can trust them.
    fn adopt(&mut self, cfg: &Checked, freed_ids_cleared: bool) -> anyhow::Result<()> {
        let now = Instant::now();
        for (addr, prefix_len, entry) in self.tables.gateways()? {
            let Some(source) = network_of(addr, prefix_len) else {
                continue;
            };
            self.service_ids.used.insert(entry.id);
            self.gateways.insert(
                source,
                LiveGateway {
                    id: entry.id,
                    config: Gateway {
                        source,
                        to: pool_of(&entry),
                        // As the entry has it: a config that says otherwise rewrites it.
                        ports: Some(SnatPorts {
                            first: entry.port_first as u16,
                            last: (entry.port_first + entry.port_count.max(1) - 1) as u16,
                            explicit: true,
                        }),
                    },
                },
            );
        }
        let mut in_table: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for (key, entry) in self.tables.services()? {
            let Some(protocol) = Protocol::from_number(key.proto) else {
                continue;
            };
            let name = ServiceName {
                vip: key.vip.to_socket(),
                protocol,
            };
            let table = self.tables.table(&entry)?;
            in_table.insert(
                entry.id,
                table.into_iter().filter(|&id| id != NO_BACKEND).collect(),
            );
            self.service_ids.used.insert(entry.id);
            self.services.insert(
                name,
                LiveService {
                    name,
                    id: entry.id,
                    config: Service {
                        vip: name.vip,
                        protocol,
                        mode: Mode::from_number(entry.mode),
                        snat: pool_of(&entry),
                        scheduler: Scheduler::from_number(entry.scheduler),
                        quic: entry.flags & lb_common::quic::SERVICE_QUIC != 0,
                        backends: Vec::new(),
                        health: None,
                    },
                    backends: Vec::new(),
                },
            );
        }
        // Per service: (id, address, in the table in use, response time).
        let mut found: BTreeMap<u32, Vec<(u32, SocketAddr, bool, u32)>> = BTreeMap::new();
        for (id, entry) in self.tables.backends()? {
            if !self.services.values().any(|s| s.id == entry.service_id) {
                // A backend of a service removed before: flows may still point at both.
                self.backend_ids.retired.insert(id, now);
                if !self.service_ids.used.contains(&entry.service_id) {
                    self.service_ids.retired.insert(entry.service_id, now);
                }
                continue;
            }
            if entry.flags & BACKEND_RETIRED != 0 {
                // Removed from its service, the id waiting for its flows: still so.
                self.backend_ids.retired.insert(id, now);
                continue;
            }
            let listed = in_table
                .get(&entry.service_id)
                .is_some_and(|t| t.contains(&id));
            found.entry(entry.service_id).or_default().push((
                id,
                entry.endpoint.to_socket(),
                listed,
                entry.latency_us,
            ));
        }
        // A NAT gateway removed before leaves no entry behind, only its flows, which count
        // against its id: a service id that has counted traffic and that nothing holds is
        // retired, and freed once a sweep finds no flow on it.
        for id in 0..self.service_ids.capacity {
            if self.service_ids.used.contains(&id)
                || self.service_ids.retired.contains_key(&id)
                || self.tables.service_stats(id)? == FlowStats::default()
            {
                continue;
            }
            if freed_ids_cleared {
                self.service_ids.retired.insert(id, now);
            } else {
                self.tables.clear_service_stats(id)?;
            }
        }
        let checked: BTreeSet<ServiceName> = cfg
            .services
            .iter()
            .filter(|s| s.health.is_some())
            .map(ServiceName::of)
            .collect();
        for service in self.services.values_mut() {
            let mut backends = found.remove(&service.id).unwrap_or_default();
            // For each address, the id in the table first, then the newest.
            backends.sort_by_key(|&(id, address, listed, _)| (address, !listed, u32::MAX - id));
            for (i, &(id, address, listed, latency_us)) in backends.iter().enumerate() {
                self.backend_ids.used.insert(id);
                if i > 0 && backends[i - 1].1 == address {
                    self.backend_ids.retire(id);
                    continue;
                }
                service.backends.push(LiveBackend {
                    id,
                    config: Backend {
                        address,
                        weight: 0,
                        drain: false,
                        quic_id: None,
                    },
                    // Out of the table with checks on: it was down when the last daemon
                    // stopped. (Without checks it was drained or weighed 0, which the
                    // config says again.)
                    down: !listed && checked.contains(&service.name),
                    latency_us,
                });
            }
        }
        Ok(())
    }

    /// The config being run.
    pub fn running(&self) -> &Checked {
        &self.running
    }

    pub fn services(&self) -> impl Iterator<Item = &LiveService> {
        self.services.values()
    }

    pub fn service(&self, name: &ServiceName) -> Option<&LiveService> {
        self.services.get(name)
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Every backend's address, of either family.
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self
            .services()
            .flat_map(|s| s.backends.iter().map(|b| b.config.address.ip()))
            .collect();
        // Removed backends whose flows may still be open (their ids retired, not yet free)
        // are still sent to.
        for &id in self.backend_ids.retired.keys() {
            if let Ok(entry) = self.tables.backend(id)
                && entry != BackendEntry::default()
            {
                addresses.push(entry.endpoint.to_socket().ip());
            }
        }
        addresses
    }

    /// Makes the maps run `cfg`: services and backends that are new get ids, those that are
    /// gone are removed (their ids retired), and every service whose table inputs changed
    /// gets a new table, switched in one step. Refuses, changing nothing, a config that
    /// changes what cannot change while running, or that needs more ids than are free.
    pub fn apply(&mut self, cfg: &Checked) -> Result<Changes, ApplyError> {
        self.check_fixed(cfg)?;
        self.check_room(cfg)?;
        self.check_forwarding(cfg)?;
        let mut changes = Changes::default();
        let wanted: BTreeSet<ServiceName> = cfg.services.iter().map(ServiceName::of).collect();
        let gone: Vec<ServiceName> = self
            .services
            .keys()
            .filter(|n| !wanted.contains(n))
            .copied()
            .collect();
        let applied = || -> anyhow::Result<()> {
            for name in gone {
                self.remove_service(&name)?;
                changes.services_removed += 1;
            }
            for service in &cfg.services {
                self.apply_service(service, &mut changes)?;
            }
            self.apply_gateways(cfg, &mut changes)
        };
        let applied = applied();
        // Every change, even one that stopped part way, ends with the pings the data plane
        // answers matching the services the maps hold.
        let vips = self.sync_vips();
        let applied = applied.and(vips);
        match applied {
            Ok(()) => {
                self.running = cfg.clone();
                Ok(changes)
            }
            Err(e) => {
                // Part of it ran: the running config is what the maps now hold, so the next
                // change starts from the truth.
                self.running.services = self
                    .services
                    .values()
                    .map(|live| Service {
                        backends: live.backends.iter().map(|b| b.config.clone()).collect(),
                        ..live.config.clone()
                    })
                    .collect();
                self.running.gateways = self.gateways.values().map(|g| g.config.clone()).collect();
                Err(ApplyError::Maps(e.context(format!(
                    "the change stopped part way, after {changes:?}"
                ))))
            }
        }
    }

    /// Marks a backend down or up after its health checks; rebuilds its service's table.
    /// Returns whether anything changed.
    pub fn set_down(
        &mut self,
        name: &ServiceName,
        address: SocketAddr,
        down: bool,
    ) -> anyhow::Result<bool> {
        let Some(service) = self.services.get_mut(name) else {
            return Ok(false);
        };
        let Some(backend) = service
            .backends
            .iter_mut()
            .find(|b| b.config.address == address)
        else {
            return Ok(false);
        };
        if backend.down == down {
            return Ok(false);
        }
        let mut changed = service.clone();
        if let Some(b) = changed
            .backends
            .iter_mut()
            .find(|b| b.config.address == address)
        {
            b.down = down;
        }
        // The flag is kept only once the table says the same.
        self.write_table(&changed)?;
        self.services.insert(*name, changed);
        Ok(true)
    }

    /// Records a backend's smoothed response time (from its health checks), which the
    /// least-response-time scheduler weighs.
    pub fn set_latency(
        &mut self,
        name: &ServiceName,
        address: SocketAddr,
        latency_us: u32,
    ) -> anyhow::Result<()> {
        let Some(service) = self.services.get_mut(name) else {
            return Ok(());
        };
        let id = service.id;
        let Some(backend) = service
            .backends
            .iter_mut()
            .find(|b| b.config.address == address)
        else {
            return Ok(());
        };
        backend.latency_us = latency_us;
        let entry = backend_entry(id, backend);
        self.tables.update_backend(backend.id, entry)
    }

    /// Frees the retired ids no flow points at any more (see the module doc).
    pub fn release_ids(&mut self, sweep: &SweepReport) -> anyhow::Result<()> {
        let Some(started) = sweep.started else {
            return Ok(());
        };
        // Counters cleared as ids are freed: at a restart, a service id that has counted
        // traffic and that nothing holds is one still waiting for its flows (`adopt`).
        let tables = &mut self.tables;
        let services = self
            .service_ids
            .release_cleared(&sweep.by_service, started, |id| {
                tables.clear_service_stats(id)
            });
        let backends = self
            .backend_ids
            .release_cleared(&sweep.by_backend, started, |id| {
                tables.set_backend(id, BackendEntry::default())
            });
        services.and(backends)
    }

    /// Ids retired and not yet free: (services, backends).
    pub fn retired(&self) -> (usize, usize) {
        (
            self.service_ids.retired.len(),
            self.backend_ids.retired.len(),
        )
    }

    /// A change that brings the first IPv6 service or gateway needs the interfaces to
    /// forward IPv6, as `xlb run` checks at start for the families its config has:
    /// without it the FIB refuses every such packet, and the service would be dead with
    /// only a counter to say so.
    fn check_forwarding(&self, cfg: &Checked) -> Result<(), ApplyError> {
        let running = crate::loader::forwarded_families(&self.running);
        let errors: Vec<FieldError> = crate::loader::forwarded_families(cfg)
            .iter()
            .filter(|family| !running.contains(family))
            .flat_map(|family| {
                cfg.dataplane.interfaces.iter().filter_map(|interface| {
                    crate::loader::check_forwarding(interface, family)
                        .err()
                        .map(|e| FieldError {
                            field: "dataplane.interfaces".into(),
                            problem: format!("{e:#}"),
                        })
                })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApplyError::Invalid(ConfigErrors(errors)))
        }
    }

    fn check_fixed(&self, cfg: &Checked) -> Result<(), ApplyError> {
        let mut errors = Vec::new();
        let mut fixed = |field: &str, running: String, wanted: String| {
            if running != wanted {
                errors.push(FieldError {
                    field: field.into(),
                    problem: format!(
                        "cannot change while xlb runs (it runs with {running}, the config says \
                         {wanted}); restart xlb to change it"
                    ),
                });
            }
        };
        let (r, w) = (&self.running.dataplane, &cfg.dataplane);
        fixed(
            "dataplane.interfaces",
            format!("{:?}", r.interfaces),
            format!("{:?}", w.interfaces),
        );
        fixed(
            "dataplane.xdp_mode",
            format!("{:?}", r.xdp_mode),
            format!("{:?}", w.xdp_mode),
        );
        for (field, a, b) in [
            (
                "maglev_table_size",
                r.maglev_table_size,
                w.maglev_table_size,
            ),
            ("max_services", r.max_services, w.max_services),
            ("max_backends", r.max_backends, w.max_backends),
            ("hash_seed", r.hash_seed, w.hash_seed),
        ] {
            fixed(&format!("dataplane.{field}"), a.to_string(), b.to_string());
        }
        fixed(
            "dataplane.pin_path",
            r.pin_path.display().to_string(),
            w.pin_path.display().to_string(),
        );
        fixed(
            "dataplane.snat_port_range",
            self.running.snat_ports.to_string(),
            cfg.snat_ports.to_string(),
        );
        fixed(
            "api.socket",
            self.running.api.socket.display().to_string(),
            cfg.api.socket.display().to_string(),
        );
        fixed(
            "api.metrics",
            self.running.api.metrics.clone(),
            cfg.api.metrics.clone(),
        );
        fixed(
            "conntrack",
            format!("{:?}", self.running.conntrack),
            format!("{:?}", cfg.conntrack),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApplyError::Invalid(ConfigErrors(errors)))
        }
    }

    /// Whether the free ids cover the new services and backends `cfg` brings.
    fn check_room(&self, cfg: &Checked) -> Result<(), ApplyError> {
        let mut new_services = 0u32;
        let mut new_backends = 0u32;
        for s in &cfg.services {
            match self.services.get(&ServiceName::of(s)) {
                None => {
                    new_services += 1;
                    new_backends += s.backends.len() as u32;
                }
                Some(live) => {
                    new_backends += s
                        .backends
                        .iter()
                        .filter(|b| !live.backends.iter().any(|l| l.config.address == b.address))
                        .count() as u32;
                }
            }
        }
        new_services += cfg
            .gateways
            .iter()
            .filter(|g| !self.gateways.contains_key(&g.source))
            .count() as u32;
        // Ids given up by this apply are retired, not free: they do not count.
        for (what, new, pool, max) in [
            ("service", new_services, &self.service_ids, "max_services"),
            ("backend", new_backends, &self.backend_ids, "max_backends"),
        ] {
            if new > pool.free() {
                return Err(ApplyError::Full(format!(
                    "{new} new {what}(s) but only {} {what} id(s) free of \
                     dataplane.{max} = {} ({} wait for the flows that use them to end)",
                    pool.free(),
                    pool.capacity,
                    pool.retired.len()
                )));
            }
        }
        Ok(())
    }

    fn apply_service(&mut self, service: &Service, changes: &mut Changes) -> anyhow::Result<()> {
        let mut taken = Taken::default();
        let result = self.apply_service_taking(service, changes, &mut taken);
        if result.is_err() {
            // The change did not land, so nothing points at the ids it took: free again.
            for id in taken.backends {
                self.backend_ids.used.remove(&id);
                let _ = self.tables.set_backend(id, BackendEntry::default());
            }
            if let Some(id) = taken.service {
                self.service_ids.used.remove(&id);
            }
        }
        result
    }

    fn apply_service_taking(
        &mut self,
        service: &Service,
        changes: &mut Changes,
        taken: &mut Taken,
    ) -> anyhow::Result<()> {
        let name = ServiceName::of(service);
        let is_new = !self.services.contains_key(&name);
        let mut live = match self.services.get(&name) {
            Some(live) => live.clone(),
            None => {
                let id = self.service_ids.take().expect("room was checked");
                taken.service = Some(id);
                self.tables.clear_service_stats(id)?;
                changes.services_added += 1;
                LiveService {
                    name,
                    id,
                    config: service.clone(),
                    backends: Vec::new(),
                }
            }
        };
        let before: Vec<(SocketAddr, u32)> = table_inputs(&live);
        let entry_changed = live.config.snat != service.snat
            || live.config.mode != service.mode
            || live.config.scheduler != service.scheduler
            || live.config.quic != service.quic
            || live.backends.iter().any(|b| {
                service
                    .backends
                    .iter()
                    .any(|c| c.address == b.config.address && c.quic_id != b.config.quic_id)
            });

        let mut retired = Vec::new();
        live.backends.retain(|b| {
            let keep = service
                .backends
                .iter()
                .any(|c| c.address == b.config.address);
            if !keep {
                retired.push(b.clone());
            }
            keep
        });
        let mut backends = Vec::with_capacity(service.backends.len());
        for b in &service.backends {
            match live.backends.iter().find(|l| l.config.address == b.address) {
                Some(l) => {
                    let kept = LiveBackend {
                        config: b.clone(),
                        ..l.clone()
                    };
                    if l.config.weight != b.weight {
                        self.tables
                            .update_backend(kept.id, backend_entry(live.id, &kept))?;
                    }
                    backends.push(kept);
                }
                None => {
                    let id = self.backend_ids.take().expect("room was checked");
                    taken.backends.push(id);
                    let new = LiveBackend {
                        id,
                        config: b.clone(),
                        down: false,
                        latency_us: 0,
                    };
                    self.tables.set_backend(id, backend_entry(live.id, &new))?;
                    changes.backends_added += 1;
                    backends.push(new);
                }
            }
        }
        live.backends = backends;
        live.config = service.clone();
        if is_new || entry_changed || table_inputs(&live) != before {
            self.write_table(&live)?;
            changes.tables_rebuilt += 1;
        }
        // The new table is live: the ids the change took are the service's now, whatever
        // fails next, and those it gave up are retired (no new flow can take them now).
        *taken = Taken::default();
        for b in &retired {
            self.backend_ids.retire(b.id);
            changes.backends_removed += 1;
        }
        self.mark_retired(live.id, &retired);
        // Every apply, changed or not, so that one whose QUIC writes failed part way is
        // made good by the next. After the switch: the backends' entries are in place.
        let quic = self.sync_quic(&live);
        self.services.insert(name, live);
        quic
    }

    fn remove_service(&mut self, name: &ServiceName) -> anyhow::Result<()> {
        if !self.services.contains_key(name) {
            return Ok(());
        }
        // Out of the data path first: should that fail, the registry still knows it.
        self.tables.remove_service(&name.key())?;
        let Some(mut live) = self.services.remove(name) else {
            return Ok(());
        };
        self.service_ids.retire(live.id);
        for b in &live.backends {
            self.backend_ids.retire(b.id);
        }
        // Their entries name a service that is gone, which tells a restart as much; marked
        // all the same, should the service's id be freed first.
        self.mark_retired(live.id, &live.backends);
        live.config.quic = false;
        self.sync_quic(&live)
    }

    /// Marks the entries of backends retired from service `service_id`, for a restart
    /// (`adopt`). Should that fail, the registry knows them retired all the same, and the
    /// change goes on: only a restart's choice between two ids of one address is less
    /// sure.
    fn mark_retired(&mut self, service_id: u32, backends: &[LiveBackend]) {
        for b in backends {
            let entry = BackendEntry {
                flags: BACKEND_RETIRED,
                ..backend_entry(service_id, b)
            };
            if let Err(e) = self.tables.update_backend(b.id, entry) {
                log::warn!("marking backend {} retired in BACKENDS: {e:#}", b.id);
            }
        }
    }

    /// Makes `VIPS` list the addresses of the services, and no others.
    fn sync_vips(&mut self) -> anyhow::Result<()> {
        let mut vips: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        for live in self.services.values() {
            *vips
                .entry(Endpoint::addr_of(live.name.vip.ip()))
                .or_default() += 1;
        }
        self.tables.set_vips(&vips)
    }

    /// Builds the service's Maglev table from its backends that are up, and switches to it.
    fn write_table(&mut self, live: &LiveService) -> anyhow::Result<()> {
        let mut inputs: Vec<(String, u32, u32)> = live
            .backends
            .iter()
            // "address:port", "[address]:port" for IPv6: a name is the backend's everywhere.
            .map(|b| (b.config.address.to_string(), b.table_weight(), b.id))
            .collect();
        // The table depends on the set, not on the order it was listed or added in: a
        // restart from the file builds the table an API-built set had.
        inputs.sort();
        let entries: Vec<maglev::Entry<'_>> = inputs
            .iter()
            .map(|(name, weight, _)| maglev::Entry {
                name: name.as_bytes(),
                weight: *weight,
            })
            .collect();
        let size = self.tables.maglev_size();
        let weights = inputs.iter().map(|(_, weight, _)| *weight);
        // The least-* schedulers look at every backend that takes new flows: they are
        // listed in the first `count` slots.
        let listed: Vec<u32> = inputs
            .iter()
            .enumerate()
            .filter(|(_, (_, weight, _))| *weight > 0)
            .map(|(i, _)| i as u32)
            .take(scheduler::MAX_LEAST_BACKENDS as usize)
            .collect();
        let indexes = match live.config.scheduler {
            Scheduler::LeastConn | Scheduler::LeastResponseTime => {
                let mut slots = listed.clone();
                slots.resize(size as usize, NO_BACKEND);
                slots
            }
            Scheduler::Maglev | Scheduler::SourceHash => maglev::build(&entries, size),
            Scheduler::RoundRobin => {
                let turns: Vec<u32> = weights.map(|w| u32::from(w > 0)).collect();
                scheduler::round_robin_table(&turns, size)
            }
            Scheduler::WeightedRoundRobin => {
                scheduler::round_robin_table(&weights.collect::<Vec<_>>(), size)
            }
        };
        let table: Vec<u32> = indexes
            .iter()
            .map(|&i| {
                if i == NO_BACKEND {
                    NO_BACKEND
                } else {
                    inputs[i as usize].2
                }
            })
            .collect();
        let entry = ServiceEntry {
            scheduler: live.config.scheduler.number(),
            count: listed.len() as u32,
            flags: if live.config.quic {
                lb_common::quic::SERVICE_QUIC
            } else {
                0
            },
            ..entry_of(
                live.id,
                live.config.mode.number(),
                &live.config.snat,
                self.running.snat_ports,
            )
        };
        self.tables.switch_table(&live.name.key(), entry, &table)?;
        self.rebuilds += 1;
        Ok(())
    }
}

impl Registry {
    /// Makes `QUIC_SERVERS` route the service's server ids to its backends (every backend
    /// it has, down or draining too: open QUIC connections reach their server while it is
    /// configured), and no others.
    fn sync_quic(&mut self, live: &LiveService) -> anyhow::Result<()> {
        let wanted: BTreeMap<u64, u32> = if live.config.quic {
            live.backends
                .iter()
                .filter_map(|b| {
                    b.config
                        .quic_id
                        .map(|q| (lb_common::quic::key(live.id, q), b.id))
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        let stale: Vec<u64> = self
            .quic
            .keys()
            .filter(|k| (*k >> 16) as u32 == live.id && !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.tables.set_quic(key, None)?;
            self.quic.remove(&key);
        }
        for (key, id) in wanted {
            if self.quic.get(&key) != Some(&id) {
                self.tables.set_quic(key, Some(id))?;
                self.quic.insert(key, id);
            }
        }
        Ok(())
    }
}

impl Registry {
    /// Makes `GATEWAYS` run `cfg`'s NAT gateways: the gone ones removed (ids retired), the
    /// new ones given ids, every entry written (a write replaces a whole entry at once);
    /// then tells the data plane whether there are any (`Tables::note_gateways`).
    fn apply_gateways(&mut self, cfg: &Checked, changes: &mut Changes) -> anyhow::Result<()> {
        let gone: Vec<Network> = self
            .gateways
            .keys()
            .filter(|n| !cfg.gateways.iter().any(|g| g.source == **n))
            .copied()
            .collect();
        for source in gone {
            let (addr, prefix_len) = trie_key(source);
            self.tables.remove_gateway(addr, prefix_len)?;
            if let Some(live) = self.gateways.remove(&source) {
                self.service_ids.retire(live.id);
            }
            changes.gateways_removed += 1;
        }
        for g in &cfg.gateways {
            let (id, added) = match self.gateways.get(&g.source) {
                // Unchanged: its entry stays as it is (a write waits a grace period).
                Some(live) if live.config == *g => continue,
                Some(live) => (live.id, false),
                None => {
                    let id = self.service_ids.take().expect("room was checked");
                    if let Err(e) = self.tables.clear_service_stats(id) {
                        self.service_ids.used.remove(&id);
                        return Err(e);
                    }
                    (id, true)
                }
            };
            let pool: Vec<IpAddr> = g.to.clone();
            let entry = entry_of(id, MODE_GATEWAY, &pool, cfg.gateway_ports(g));
            let (addr, prefix_len) = trie_key(g.source);
            if let Err(e) = self.tables.set_gateway(addr, prefix_len, entry) {
                if added {
                    self.service_ids.used.remove(&id);
                }
                return Err(e);
            }
            if added {
                changes.gateways_added += 1;
            }
            self.gateways.insert(
                g.source,
                LiveGateway {
                    id,
                    config: g.clone(),
                },
            );
        }
        self.tables.note_gateways()
    }

    /// The NAT gateways running.
    pub fn gateways(&self) -> impl Iterator<Item = &LiveGateway> {
        self.gateways.values()
    }
}

/// A `SERVICES` or `GATEWAYS` entry's common part: id, mode, SNAT pool and port range (the
/// scheduler's fields zero).
fn entry_of(id: u32, mode: u32, pool: &[IpAddr], ports: SnatPorts) -> ServiceEntry {
    let mut snat = [Endpoint::default(); MAX_SNAT_ADDRESSES];
    for (slot, &a) in snat.iter_mut().zip(pool) {
        *slot = Endpoint::from_socket(SocketAddr::new(a, 0));
    }
    ServiceEntry {
        snat,
        snat_count: pool.len() as u32,
        id,
        mode,
        port_first: ports.first as u32,
        port_count: ports.count(),
        ..ServiceEntry::default()
    }
}

/// The SNAT pool an entry holds.
fn pool_of(entry: &ServiceEntry) -> Vec<IpAddr> {
    entry
        .snat
        .iter()
        .take(entry.snat_count as usize)
        .map(Endpoint::ip)
        .collect()
}

/// `GATEWAYS`' key of a network: its address as the maps hold it (IPv4 mapped), and the
/// prefix length of that (an IPv4 prefix is 96 bits further in).
fn trie_key(network: Network) -> ([u8; 16], u32) {
    let offset = if network.addr.is_ipv4() { 96 } else { 0 };
    (
        Endpoint::addr_of(network.addr),
        offset + network.prefix as u32,
    )
}

/// The network of a `GATEWAYS` key: the inverse of [`trie_key`].
fn network_of(addr: [u8; 16], prefix_len: u32) -> Option<Network> {
    let addr = (Endpoint { addr, port: [0; 2] }).ip();
    let prefix = match addr {
        IpAddr::V4(_) => prefix_len.checked_sub(96).filter(|p| *p <= 32)?,
        IpAddr::V6(_) => prefix_len.min(128),
    } as u8;
    Some(Network { addr, prefix })
}

/// What the data path knows of a backend of service `service_id`.
fn backend_entry(service_id: u32, b: &LiveBackend) -> BackendEntry {
    BackendEntry {
        endpoint: Endpoint::from_socket(b.config.address),
        flags: 0,
        _pad: 0,
        service_id,
        weight: b.config.weight,
        latency_us: b.latency_us,
    }
}

/// Ids an apply took for new objects, given back if it fails.
#[derive(Default)]
struct Taken {
    service: Option<u32>,
    backends: Vec<u32>,
}

/// What decides a service's table: each backend's address and weight in it.
fn table_inputs(live: &LiveService) -> Vec<(SocketAddr, u32)> {
    let mut inputs: Vec<(SocketAddr, u32)> = live
        .backends
        .iter()
        .map(|b| (b.config.address, b.table_weight()))
        .collect();
    inputs.sort();
    inputs
}

/// Why an apply changed nothing, or failed part way.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config asks for something that cannot be (nothing was changed).
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// Not enough free ids (nothing was changed).
    #[error("{0}")]
    Full(String),
    /// A map write failed.
    #[error("{0:#}")]
    Maps(#[from] anyhow::Error),
}

/// The SNAT address a service at `vip` gets when `xlb service add` names none: the first
/// address of the VIP's family on the interfaces xlb runs on (see [`choose_snat`]).
pub fn default_snat(interfaces: &[String], vip: IpAddr) -> anyhow::Result<IpAddr> {
    let addresses = crate::config::interface_addresses()?;
    choose_snat(interfaces, &addresses, vip).ok_or_else(|| {
        let what = match vip {
            IpAddr::V4(_) => "an IPv4 address",
            IpAddr::V6(_) => "a global IPv6 address (link-local and loopback ones do not count)",
        };
        anyhow::anyhow!("none of {} has {what}", interfaces.join(", "))
    })
}

/// From `addresses` (interface name, address, in getifaddrs' order), the first of `vip`'s
/// family on the first of `interfaces` that has one. For IPv6, only a global address will
/// do: backends cannot answer a link-local one from off the link, nor a loopback one at all.
fn choose_snat(
    interfaces: &[String],
    addresses: &[(String, IpAddr)],
    vip: IpAddr,
) -> Option<IpAddr> {
    let fits = |a: &IpAddr| match (vip, a) {
        (IpAddr::V4(_), IpAddr::V4(_)) => true,
        (IpAddr::V6(_), IpAddr::V6(a)) => {
            !a.is_unicast_link_local() && !a.is_loopback() && !a.is_unspecified()
        }
        _ => false,
    };
    interfaces.iter().find_map(|interface| {
        addresses
            .iter()
            .find(|(name, a)| name == interface && fits(a))
            .map(|(_, a)| *a)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the maps get: IPv6 addresses as they are, IPv4 ones IPv4-mapped, and both read
    /// back as written.
    #[test]
    fn entries_hold_either_family_and_read_back() {
        let pool: Vec<IpAddr> = vec![
            "2001:db8:20::1".parse().unwrap(),
            "2001:db8:20::2".parse().unwrap(),
        ];
        let entry = entry_of(3, lb_common::maps::MODE_FULLNAT, &pool, SnatPorts::DEFAULT);
        assert_eq!(entry.snat_count, 2);
        assert_eq!(
            entry.snat[1].addr,
            [
                0x20, 0x01, 0x0d, 0xb8, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2
            ]
        );
        assert_eq!(entry.snat[1].port, [0, 0]);
        assert_eq!(pool_of(&entry), pool);

        let v4: Vec<IpAddr> = vec!["10.20.0.1".parse().unwrap()];
        let entry = entry_of(3, lb_common::maps::MODE_FULLNAT, &v4, SnatPorts::DEFAULT);
        assert_eq!(
            entry.snat[0].addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 20, 0, 1]
        );
        assert_eq!(pool_of(&entry), v4);

        let backend = LiveBackend {
            id: 7,
            config: Backend {
                address: "[2001:db8:20::11]:8080".parse().unwrap(),
                weight: 2,
                drain: false,
                quic_id: None,
            },
            down: false,
            latency_us: 0,
        };
        let entry = backend_entry(3, &backend);
        assert_eq!(
            entry.endpoint.addr,
            [
                0x20, 0x01, 0x0d, 0xb8, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11
            ]
        );
        assert_eq!(entry.endpoint.port, 8080u16.to_be_bytes());
        assert_eq!(entry.endpoint.to_socket(), backend.config.address);

        let name = ServiceName {
            vip: "[2001:db8::100]:80".parse().unwrap(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(name.to_string(), "[2001:db8::100]:80/tcp");
        assert_eq!(name.key().vip.to_socket(), name.vip);
        // Gateway keys of both families read back as the networks they were made of.
        for text in ["10.30.0.0/24", "fd00:30::/64", "2001:db8::/32"] {
            let network = Network::parse(text).unwrap();
            let (addr, len) = trie_key(network);
            assert_eq!(network_of(addr, len), Some(network), "{text}");
        }
        assert_eq!(trie_key(Network::parse("10.30.0.0/24").unwrap()).1, 96 + 24);
        assert_eq!(trie_key(Network::parse("fd00:30::/64").unwrap()).1, 64);
    }

    #[test]
    fn the_default_snat_is_of_the_vips_family_and_global() {
        let interfaces = ["xlb0".to_string(), "xlb1".to_string()];
        let addresses: Vec<(String, IpAddr)> = [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("xlb0", "fe80::1"),
            ("xlb0", "10.20.0.1"),
            ("xlb0", "10.20.0.2"),
            ("xlb1", "10.21.0.1"),
            ("xlb1", "fe80::2"),
            ("xlb1", "2001:db8:21::1"),
            ("xlb1", "2001:db8:21::2"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect();
        let v4: IpAddr = "10.10.0.100".parse().unwrap();
        let v6: IpAddr = "2001:db8::100".parse().unwrap();
        // The first interface's first IPv4 address, as ever.
        assert_eq!(
            choose_snat(&interfaces, &addresses, v4),
            Some("10.20.0.1".parse().unwrap())
        );
        // xlb0 has only a link-local IPv6 address: the next interface's first global one.
        assert_eq!(
            choose_snat(&interfaces, &addresses, v6),
            Some("2001:db8:21::1".parse().unwrap())
        );
        // Link-local and loopback never do, wherever they are.
        let only_local = &addresses[..3];
        assert_eq!(choose_snat(&["lo".to_string()], only_local, v6), None);
        assert_eq!(choose_snat(&interfaces, only_local, v6), None);
        assert_eq!(choose_snat(&interfaces, &[], v4), None);
    }

    #[test]
    fn ids_are_not_reused_while_flows_point_at_them() {
        let mut pool = IdPool::new(3);
        assert_eq!(pool.take(), Some(0));
        assert_eq!(pool.take(), Some(1));
        pool.retire(0);
        assert_eq!(pool.take(), Some(2));
        assert_eq!(pool.take(), None, "0 is retired, not free");
        let after = Instant::now() + std::time::Duration::from_millis(1);
        // A sweep that found a flow on 0 keeps it retired...
        assert!(pool.release(&BTreeMap::from([(0, 1)]), after).is_empty());
        // ...and one that began before the retirement proves nothing.
        let before = Instant::now() - std::time::Duration::from_secs(1);
        assert!(pool.release(&BTreeMap::new(), before).is_empty());
        assert_eq!(pool.release(&BTreeMap::new(), after), vec![0]);
        assert_eq!(pool.take(), Some(0));
    }
}
