//! The TOML configuration: parsed with serde, then [`Config::validate`]d into the checked
//! form the loader uses. Every error names the field it is about.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use lb_common::{
    conntrack::Timeouts,
    maps::{
        DEFAULT_MAGLEV_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, FlowKey, MAX_INTERFACES,
        MAX_SNAT_ADDRESSES, Mapping, MappingKey, NatEntry, PROTO_TCP, PROTO_UDP,
    },
};
use serde::Deserialize;

use crate::footprint;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and how the XDP program runs.
    #[serde(default)]
    pub dataplane: Dataplane,
    /// Connection tracking: capacity and idle timeouts.
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    /// The daemon's API socket and metrics listener.
    #[serde(default)]
    pub api: ApiConfig,
    /// The services to balance (`[[service]]` tables).
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// The NAT gateways (`[[nat_gateway]]` tables).
    #[serde(default, rename = "nat_gateway")]
    pub nat_gateways: Vec<NatGatewayConfig>,
}

/// `[[nat_gateway]]`: private hosts reach the outside through xlb, sharing public addresses,
/// as through a cloud NAT gateway.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NatGatewayConfig {
    /// The private network, "address/prefix" (e.g. "10.30.0.0/24"): connections from it to
    /// anywhere outside it that is not a service get a public source.
    pub source: String,
    /// The public address, or a list of them (a pool, as a service's `snat`).
    pub to: OneOrMore<String>,
    /// The source ports handed out, `[first, last]`; unset: `dataplane.snat_port_range`'s.
    pub ports: Option<[u16; 2]>,
}

/// `[api]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The unix socket of the local API (root only); `xlb run --socket` overrides it.
    pub socket: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`), "address:port"; "" turns it off.
    pub metrics: String,
}

/// What `xlb run`'s options change in the config file: they hold for the daemon's life, so
/// SIGHUP and `xlb apply` merge them into the file they read, too.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<XdpModeConfig>,
    pub pin_path: Option<PathBuf>,
    /// The SNAT port range the daemon started with, for a file that sets none: the default
    /// depends on which SNAT addresses are the host's own, and a running range cannot
    /// change, so a later config keeps it (and is refused, saying why, if a new service's
    /// SNAT address then needs another).
    pub snat_port_range: Option<[u16; 2]>,
}

impl Overrides {
    pub fn apply(&self, config: &mut Config) {
        if config.dataplane.snat_port_range.is_none() {
            config.dataplane.snat_port_range = self.snat_port_range;
        }
        if !self.interfaces.is_empty() {
            config.dataplane.interfaces = self.interfaces.clone();
        }
        if let Some(mode) = self.xdp_mode {
            config.dataplane.xdp_mode = mode;
        }
        if let Some(path) = &self.pin_path {
            config.dataplane.pin_path = path.clone();
        }
    }
}

/// Where the data plane is pinned when neither the config nor `--pin-path` says.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";

/// The API socket when neither the config nor `--socket` names one.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            metrics: "127.0.0.1:9641".into(),
        }
    }
}

/// `[dataplane]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Dataplane {
    /// Interfaces the program attaches to; `xlb run --iface` replaces this list.
    pub interfaces: Vec<String>,
    /// `auto` (native, falling back to generic), `native` or `generic`.
    pub xdp_mode: XdpModeConfig,
    /// Slots per service in the Maglev table; must be a prime.
    pub maglev_table_size: u32,
    /// Most services the maps can hold.
    pub max_services: u32,
    /// Most backends, over all services, the maps can hold.
    pub max_backends: u32,
    /// SNAT source ports handed out to flows, `[first, last]` inclusive. Unset: 1024-65535,
    /// or, when a SNAT address is one of the host's own, the larger part of that outside
    /// the host's ephemeral ports (see [`Checked::fit_to_host`]).
    pub snat_port_range: Option<[u16; 2]>,
    /// Seed of the flow hash; nodes sharing traffic behind ECMP must use the same one.
    pub hash_seed: u32,
    /// Where the maps and the program's links are pinned (on bpffs), so the data plane
    /// outlives the daemon and a new one adopts it; `xlb run --pin-path` overrides it.
    pub pin_path: PathBuf,
    /// Moved to `[conntrack] entries` (which counts flows, not map entries). Kept only to
    /// say so when an old config has it.
    pub conntrack_entries: Option<u32>,
    /// Moved to `[conntrack] tcp_established_timeout` (and the other TCP timeouts).
    pub tcp_idle_timeout: Option<u32>,
    /// Moved to `[conntrack] udp_timeout`.
    pub udp_idle_timeout: Option<u32>,
}

impl Dataplane {
    /// The kernel memory of the Maglev tables (`MAGLEV`: two tables per service, an
    /// array of `max_services × maglev_table_size` entries of two 4-byte slots, made in full
    /// when xlb starts), in whole pages, as it is memory-mapped; the kernel adds a page for
    /// the map itself.
    pub fn maglev_bytes(&self) -> u64 {
        footprint::array_bytes(
            u64::from(self.max_services) * u64::from(self.maglev_table_size),
            size_of::<[u32; 2]>() as u64,
            true,
        )
    }
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            interfaces: Vec::new(),
            xdp_mode: XdpModeConfig::Auto,
            maglev_table_size: DEFAULT_MAGLEV_SIZE,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            snat_port_range: None,
            hash_seed: 0x786c_6221,
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            conntrack_entries: None,
            tcp_idle_timeout: None,
            udp_idle_timeout: None,
        }
    }
}

/// The most flows `[conntrack] entries` may ask for: the kernel refuses a hash map of more
/// than 2^28 entries (its bucket array), and a flow takes two.
pub const MAX_CONNTRACK_FLOWS: u32 = 1 << 27;

/// `[conntrack]`: how many flows xlb tracks, and how long each state may stay idle (seconds).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Flows tracked at most (each takes two map entries, one per direction). When the table
    /// is full, new flows are refused (`drop/conntrack_full`); no tracked flow is evicted.
    /// The table's memory, 352 to 384 bytes per flow, is taken in full when xlb starts
    /// ([`ConntrackConfig::table_bytes`]).
    pub entries: u32,
    /// A TCP flow whose handshake has not completed.
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    /// After one side's FIN, or an RST.
    pub tcp_closing_timeout: u32,
    /// After both sides' FINs: a closed flow keeps its SNAT port this long, since the
    /// backend may be in TIME_WAIT for it.
    pub tcp_time_wait_timeout: u32,
    pub udp_timeout: u32,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        let t = Timeouts::default();
        ConntrackConfig {
            entries: 1 << 20,
            tcp_syn_timeout: t.tcp_syn,
            tcp_established_timeout: t.tcp_established,
            tcp_closing_timeout: t.tcp_closing,
            tcp_time_wait_timeout: t.tcp_time_wait,
            udp_timeout: t.udp,
        }
    }
}

impl ConntrackConfig {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            tcp_syn: self.tcp_syn_timeout,
            tcp_established: self.tcp_established_timeout,
            tcp_closing: self.tcp_closing_timeout,
            tcp_time_wait: self.tcp_time_wait_timeout,
            udp: self.udp_timeout,
        }
    }

    /// Entries of the `CONNTRACK` map: two per flow.
    pub fn map_entries(&self) -> u32 {
        self.entries * 2
    }

    /// The kernel memory the `CONNTRACK` map takes, in bytes: all of it from the moment it
    /// is made, as it is preallocated: a 160-byte element per entry (a 48-byte header, the
    /// key and the value) and a 16-byte bucket (see [`footprint`]).
    pub fn table_bytes(&self) -> u64 {
        footprint::hash_map_bytes(
            u64::from(self.map_entries()),
            size_of::<FlowKey>() as u64,
            size_of::<NatEntry>() as u64,
            true,
        )
    }

    /// The kernel memory of the two hash maps sized with the table that fill only as flows
    /// come (`MAPPINGS`, a NAT gateway's UDP mappings, as many entries as the table;
    /// `RELEASED`, one per flow): the kernel makes their buckets when it makes the maps.
    pub fn companions_bytes(&self) -> u64 {
        footprint::hash_map_bytes(
            u64::from(self.map_entries()),
            size_of::<MappingKey>() as u64,
            size_of::<Mapping>() as u64,
            false,
        ) + footprint::hash_map_bytes(
            u64::from(self.entries),
            size_of::<FlowKey>() as u64,
            size_of::<u32>() as u64,
            false,
        )
    }

    /// What the conntrack takes of the kernel's memory when xlb starts: the table and the
    /// buckets of the maps sized with it (what `xlb check` prints and `xlb run` checks).
    pub fn kernel_bytes(&self) -> u64 {
        self.table_bytes() + self.companions_bytes()
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, falling back to generic when the driver has none.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

/// `[[service]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// What clients connect to: "address:port", or "[address]:port" for IPv6. The VIP, the
    /// backends and `snat` are all of one family.
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// `fullnat` (the default) or `dnat` (see [`Mode`]).
    #[serde(default)]
    pub mode: Mode,
    /// How new flows pick a backend (see [`Scheduler`]); `maglev` by default.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// UDP only: route QUIC short-header packets of new flows (a migrated connection) by
    /// the backend id in their connection ID (`lb_common::quic`), the rest by `scheduler`.
    #[serde(default)]
    pub quic: bool,
    /// Source address toward backends, or a list of them (a pool: new flows spread over it,
    /// each address with the whole port range), in `fullnat` mode (where it is needed); none
    /// in `dnat`. Backends must route them back through xlb.
    pub snat: Option<OneOrMore<String>>,
    /// `[[service.backend]]` tables.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// `[service.health]`: how the daemon checks the backends; none by default.
    #[serde(default)]
    pub health: Option<HealthConfig>,
}

/// One value, or a list of them: `snat = "10.20.0.1"` or `snat = ["10.20.0.1", ...]`, in
/// the config file and in the API's JSON alike.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMore<T> {
    One(T),
    More(Vec<T>),
}

impl<T> OneOrMore<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMore::One(one) => std::slice::from_ref(one),
            OneOrMore::More(more) => more,
        }
    }

    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMore::One(one) => vec![one],
            OneOrMore::More(more) => more,
        }
    }
}

/// `[service.health]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `tcp` (connect), `http` (GET `path`, expect 2xx or 3xx) or `none`.
    pub kind: HealthKind,
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval_ms: u32,
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: u32,
    /// Successes in a row that bring a down backend back.
    #[serde(default = "default_health_count")]
    pub rise: u32,
    /// Failures in a row that take an up backend out.
    #[serde(default = "default_health_count")]
    pub fall: u32,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
    None,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_health_interval() -> u32 {
    1000
}
fn default_health_timeout() -> u32 {
    500
}
fn default_health_count() -> u32 {
    2
}

#[derive(
    Clone,
    Copy,
    Debug,
    Deserialize,
    serde::Serialize,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn from_number(number: u8) -> Option<Protocol> {
        match number {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// `scheduler`: how a service's new flows pick their backend (`lb_common::scheduler`).
#[derive(
    Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Weighted Maglev over the 5-tuple: consistent across nodes and table changes.
    #[default]
    Maglev,
    /// Weighted Maglev over the client address: a client's connections stick together.
    SourceHash,
    /// Turns over the backends, weights aside.
    RoundRobin,
    /// Turns in proportion to the weights.
    WeightedRoundRobin,
    /// The fewest open flows for its weight.
    LeastConn,
    /// The lowest response time × (open flows + 1) / weight; needs health checks.
    LeastResponseTime,
}

impl Scheduler {
    /// Its number in the service's map entry.
    pub fn number(self) -> u32 {
        use lb_common::scheduler as s;
        match self {
            Scheduler::Maglev => s::MAGLEV,
            Scheduler::SourceHash => s::SOURCE_HASH,
            Scheduler::RoundRobin => s::ROUND_ROBIN,
            Scheduler::WeightedRoundRobin => s::WEIGHTED_ROUND_ROBIN,
            Scheduler::LeastConn => s::LEAST_CONN,
            Scheduler::LeastResponseTime => s::LEAST_RESPONSE_TIME,
        }
    }

    pub fn name(self) -> &'static str {
        lb_common::scheduler::name(self.number())
    }

    /// The scheduler of a service's map entry (Maglev for a number it does not know).
    pub fn from_number(number: u32) -> Scheduler {
        [
            Scheduler::SourceHash,
            Scheduler::RoundRobin,
            Scheduler::WeightedRoundRobin,
            Scheduler::LeastConn,
            Scheduler::LeastResponseTime,
        ]
        .into_iter()
        .find(|s| s.number() == number)
        .unwrap_or(Scheduler::Maglev)
    }
}

/// `mode`: how a service's packets are rewritten (`lb_common::maps::MODE_*`).
#[derive(
    Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Full NAT: the destination becomes the backend, the source the service's SNAT address
    /// and a port of xlb's choosing. Backends need only route the SNAT address back.
    #[default]
    Fullnat,
    /// Destination NAT: the destination becomes the backend, the client's address and port
    /// stay, so the backend sees who connects. The backend must route its replies through
    /// xlb (its gateway toward the clients), which gives them the VIP back as source.
    Dnat,
}

impl Mode {
    pub fn number(self) -> u32 {
        match self {
            Mode::Fullnat => lb_common::maps::MODE_FULLNAT,
            Mode::Dnat => lb_common::maps::MODE_DNAT,
        }
    }

    pub fn from_number(number: u32) -> Mode {
        if number == lb_common::maps::MODE_DNAT {
            Mode::Dnat
        } else {
            Mode::Fullnat
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Fullnat => "fullnat",
            Mode::Dnat => "dnat",
        }
    }
}

/// `[[service.backend]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// "address:port" of the backend ("[address]:port" for IPv6), of the VIP's family.
    pub address: String,
    /// Relative share of new flows; 0 takes no new flows but keeps its existing ones.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Draining: takes no new flows, keeps its existing ones, keeps its weight for later.
    #[serde(default)]
    pub drain: bool,
    /// For a `quic` service: the id (1-65535) this backend puts in its connection IDs.
    #[serde(default)]
    pub quic_id: Option<u16>,
}

fn default_weight() -> u32 {
    1
}

/// A config that passed [`Config::validate`]: addresses parsed, limits checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub dataplane: Dataplane,
    pub conntrack: ConntrackConfig,
    pub api: ApiConfig,
    pub services: Vec<Service>,
    pub gateways: Vec<Gateway>,
    /// The SNAT port range in force: `dataplane.snat_port_range`, or its default.
    pub snat_ports: SnatPorts,
}

/// A checked `[[nat_gateway]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub source: Network,
    /// The public pool: 1 to `MAX_SNAT_ADDRESSES` addresses, of `source`'s family.
    pub to: Vec<IpAddr>,
    /// Its own port range; `None`: the config's SNAT port range.
    pub ports: Option<SnatPorts>,
}

impl fmt::Display for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nat_gateway {}", self.source)
    }
}

/// An IP network of either family: an address whose bits past `prefix` are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Network {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Network {
    /// Parses "address/prefix"; the address must be the network's own (no host bits).
    pub fn parse(text: &str) -> Result<Network, String> {
        let bad = || {
            format!(
                "{text:?} is not \"address/prefix\" (for example \"10.30.0.0/24\" or \
                 \"2001:db8:30::/64\")"
            )
        };
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if let IpAddr::V6(v6) = addr
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(format!(
                "{text:?} is IPv4-mapped, which is never on the wire: write the IPv4 network"
            ));
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let bits = Self::bits(addr);
        if prefix > bits {
            return Err(format!(
                "{text:?}: a prefix of this family is 0 to {bits} bits"
            ));
        }
        let network = Network {
            addr: Self::masked(addr, prefix),
            prefix,
        };
        // The data plane keeps IPv4 networks IPv4-mapped, in one table with IPv6's.
        if addr.is_ipv6()
            && prefix > 0
            && network.contains(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().into())
        {
            return Err(format!(
                "{text:?} covers the IPv4-mapped addresses (::ffff:0:0/96): name a narrower \
                 IPv6 network"
            ));
        }
        if network.addr != addr {
            return Err(format!(
                "{text:?} has bits set past the prefix: the network is {network}"
            ));
        }
        Ok(network)
    }

    fn bits(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// `addr` with the bits past `prefix` cleared.
    fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether `addr` is in the network (an address of the other family never is).
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4() && Self::masked(addr, self.prefix) == self.addr
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The SNAT source ports new flows get, `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPorts {
    pub first: u16,
    pub last: u16,
    /// Set in the config, rather than the default.
    pub explicit: bool,
}

impl SnatPorts {
    /// Used when the config sets no range and no SNAT address is the host's own.
    pub const DEFAULT: SnatPorts = SnatPorts {
        first: 1024,
        last: 65535,
        explicit: false,
    };

    pub fn count(&self) -> u32 {
        (self.last - self.first) as u32 + 1
    }

    fn overlaps(&self, first: u16, last: u16) -> bool {
        self.first <= last && first <= self.last
    }
}

impl fmt::Display for SnatPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.first, self.last)
    }
}

/// What [`Checked::fit_to_host`] needs to know about the host xlb runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The host's own addresses (all interfaces of this network namespace).
    pub addresses: Vec<IpAddr>,
    /// `net.ipv4.ip_local_port_range`: the ports the host's own connections use (IPv6 ones
    /// too: the kernel has one range for both families).
    pub ephemeral_ports: [u16; 2],
}

impl HostFacts {
    /// Reads them from this network namespace.
    pub fn read() -> anyhow::Result<HostFacts> {
        use anyhow::Context as _;
        const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
        let text = std::fs::read_to_string(RANGE).with_context(|| format!("reading {RANGE}"))?;
        let ports: Vec<u16> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{RANGE}: {text:?} is not two ports"))?;
        let [lo, hi] = ports[..] else {
            anyhow::bail!("{RANGE}: {text:?} is not two ports");
        };
        Ok(HostFacts {
            addresses: interface_addresses()?
                .into_iter()
                .map(|(_, addr)| addr)
                .collect(),
            ephemeral_ports: [lo, hi],
        })
    }
}

/// Every address of this network namespace's interfaces, with the interface's name, in
/// getifaddrs' order (per interface, the order the addresses were added in).
pub fn interface_addresses() -> anyhow::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list it allocates, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error())
            .map_err(|e| anyhow::anyhow!("getifaddrs: {e}"));
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_name is a NUL-terminated string; ifa_addr points to a sockaddr whose
            // family says its real type.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let addr = if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                Some(IpAddr::V6(sin6.sin6_addr.s6_addr.into()))
            } else {
                None
            };
            if let Some(addr) = addr {
                out.push((name.to_string_lossy().into_owned(), addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

impl Checked {
    /// The data path's settings, as the XDP program reads them from `CONFIG`, but for the
    /// handoff secret, which is the maps' own (`Tables::set_settings` keeps or makes it),
    /// and `NO_GATEWAYS`, clear here, which the registry sets once it knows there is no
    /// gateway (`Tables::note_gateways`).
    pub fn settings(&self) -> lb_common::maps::Settings {
        let dp = &self.dataplane;
        lb_common::maps::Settings {
            maglev_size: dp.maglev_table_size,
            hash_seed: dp.hash_seed,
            layout_version: lb_common::maps::LAYOUT_VERSION,
            flags: lb_common::maps::FREED_IDS_CLEARED,
            ..Default::default()
        }
    }

    /// The file form of this config: what `validate` would turn back into it (with the
    /// SNAT port range made explicit only if it was).
    pub fn to_config(&self) -> Config {
        let mut dataplane = self.dataplane.clone();
        if self.snat_ports.explicit {
            dataplane.snat_port_range = Some([self.snat_ports.first, self.snat_ports.last]);
        }
        Config {
            dataplane,
            conntrack: self.conntrack.clone(),
            api: self.api.clone(),
            services: self
                .services
                .iter()
                .map(|s| ServiceConfig {
                    vip: s.vip.to_string(),
                    protocol: s.protocol,
                    mode: s.mode,
                    scheduler: s.scheduler,
                    quic: s.quic,
                    snat: match &s.snat[..] {
                        [] => None,
                        [one] => Some(OneOrMore::One(one.to_string())),
                        pool => Some(OneOrMore::More(
                            pool.iter().map(|a| a.to_string()).collect(),
                        )),
                    },
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendConfig {
                            address: b.address.to_string(),
                            weight: b.weight,
                            drain: b.drain,
                            quic_id: b.quic_id,
                        })
                        .collect(),
                    health: s.health.clone(),
                })
                .collect(),
            nat_gateways: self
                .gateways
                .iter()
                .map(|g| NatGatewayConfig {
                    source: g.source.to_string(),
                    to: match &g.to[..] {
                        [one] => OneOrMore::One(one.to_string()),
                        pool => OneOrMore::More(pool.iter().map(|a| a.to_string()).collect()),
                    },
                    ports: g.ports.map(|p| [p.first, p.last]),
                })
                .collect(),
        }
    }

    /// The source ports a gateway's flows take: its own range, or the config's.
    pub fn gateway_ports(&self, gateway: &Gateway) -> SnatPorts {
        gateway.ports.unwrap_or(self.snat_ports)
    }

    /// [`fit_to_host`](Self::fit_to_host) for a change of the running config, `running`. A
    /// conflict with the host that `running` has as well does not refuse the change, and is
    /// returned to be logged: the host's ephemeral ports can change under a running daemon
    /// (or the host take a SNAT address), whose SNAT range is fixed while it runs; the data
    /// plane goes on with that range either way, and refusing would refuse every change, a
    /// dead backend's removal too, until a restart. A change that adds an address to the
    /// conflict is refused, naming it.
    pub fn fit_change_to_host(
        &mut self,
        running: &Checked,
        host: &HostFacts,
    ) -> Result<Option<ConfigErrors>, ConfigErrors> {
        let conflict = match self.fit_to_host(host) {
            Ok(()) => return Ok(None),
            Err(conflict) => conflict,
        };
        // The running ranges as they are (a range fitted at start is not moved again).
        let before = running.host_addresses_in_ephemeral_ports(host);
        if before.is_empty() {
            return Err(conflict);
        }
        let [lo, hi] = host.ephemeral_ports;
        let mut added: Vec<FieldError> = Vec::new();
        for (field, addr, ports) in self.host_addresses_in_ephemeral_ports(host) {
            if before.iter().any(|(_, a, _)| *a == addr) || added.iter().any(|e| e.field == field) {
                continue;
            }
            added.push(FieldError {
                field,
                problem: format!(
                    "{addr} is an address of this host, and the ports {ports} overlap its \
                     ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range): replies to the \
                     host's own connections would be taken for a client's. The running config \
                     has such addresses already (the host's ports or addresses changed since \
                     xlb started), so its changes are not refused for them, but no more are \
                     taken on: use an address the host does not own, or restart xlb, which \
                     fits its ports to the host again"
                ),
            });
        }
        if added.is_empty() {
            Ok(Some(conflict))
        } else {
            Err(ConfigErrors(added))
        }
    }

    /// The host's own addresses that SNAT or a NAT gateway would give ports in the host's
    /// ephemeral range, as they run now: the conflict [`fit_to_host`](Self::fit_to_host)
    /// refuses. Each with the field that holds it and the ports.
    fn host_addresses_in_ephemeral_ports(
        &self,
        host: &HostFacts,
    ) -> Vec<(String, IpAddr, SnatPorts)> {
        let [lo, hi] = host.ephemeral_ports;
        let services = self.services.iter().enumerate().flat_map(|(i, s)| {
            let field = format!("service[{i}].snat");
            s.snat
                .iter()
                .map(move |&a| (field.clone(), a, self.snat_ports))
        });
        let gateways = self.gateways.iter().enumerate().flat_map(|(i, g)| {
            let field = format!("nat_gateway[{i}].to");
            g.to.iter()
                .map(move |&a| (field.clone(), a, self.gateway_ports(g)))
        });
        services
            .chain(gateways)
            .filter(|(_, a, ports)| ports.overlaps(lo, hi) && host.addresses.contains(a))
            .collect()
    }

    /// Checks the config against the host it runs on. When a SNAT address is one of the
    /// host's own, the host's own connections use it too, with ports from its ephemeral
    /// range: a SNAT port in that range would make the replies to the host's connections look
    /// like a client's. So an explicit `snat_port_range` that overlaps it is refused, and the
    /// default becomes the larger part of 1024-65535 outside it.
    ///
    /// A NAT gateway's public addresses count as SNAT addresses, with the gateway's own
    /// `ports` when it sets them (then refused if they overlap, too).
    pub fn fit_to_host(&mut self, host: &HostFacts) -> Result<(), ConfigErrors> {
        let [lo, hi] = host.ephemeral_ports;
        let own = |a: IpAddr| host.addresses.contains(&a);
        let owned_gateway = |g: &Gateway| g.to.iter().any(|&a| own(a));
        let mut errors = Vec::new();
        for (i, g) in self.gateways.iter().enumerate() {
            if let Some(ports) = g.ports
                && owned_gateway(g)
                && ports.overlaps(lo, hi)
            {
                errors.push(FieldError {
                    field: format!("nat_gateway[{i}].ports"),
                    problem: format!(
                        "{ports} overlaps the host's ephemeral ports {lo}-{hi} \
                         (net.ipv4.ip_local_port_range), and an address of `to` is this \
                         host's: replies to the host's own connections would be taken for a \
                         private host's. Use a range outside {lo}-{hi}"
                    ),
                });
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let own_service = self
            .services
            .iter()
            .find(|s| s.snat.iter().any(|&a| own(a)))
            .map(|s| format!("service {s}'s snat {}", s.snat_text()));
        let own_gateway = self
            .gateways
            .iter()
            .find(|g| g.ports.is_none() && owned_gateway(g))
            .map(|g| format!("{g}'s `to`"));
        let Some(first_own) = own_service.or(own_gateway) else {
            return Ok(());
        };
        if !self.snat_ports.overlaps(lo, hi) {
            return Ok(());
        }
        if self.snat_ports.explicit {
            return Err(ConfigErrors(vec![FieldError {
                field: "dataplane.snat_port_range".into(),
                problem: format!(
                    "{} overlaps the host's ephemeral ports {lo}-{hi} \
                     (net.ipv4.ip_local_port_range), and {first_own} is an address of this \
                     host: replies to the host's own connections would be taken for a \
                     client's. Use a range outside {lo}-{hi}, or a SNAT address the host \
                     does not own",
                    self.snat_ports,
                ),
            }]));
        }
        let below = (lo > 1024).then(|| SnatPorts {
            first: 1024,
            last: lo - 1,
            explicit: false,
        });
        let above = (hi < 65535).then(|| SnatPorts {
            first: hi + 1,
            last: 65535,
            explicit: false,
        });
        self.snat_ports = match (below, above) {
            (Some(b), Some(a)) => {
                if a.count() > b.count() {
                    a
                } else {
                    b
                }
            }
            (Some(r), None) | (None, Some(r)) => r,
            (None, None) => {
                return Err(ConfigErrors(vec![FieldError {
                    field: "dataplane.snat_port_range".into(),
                    problem: format!(
                        "the host's ephemeral ports {lo}-{hi} leave no SNAT ports for \
                         {first_own}, an address of this host: narrow \
                         net.ipv4.ip_local_port_range or use another SNAT address"
                    ),
                }]));
            }
        };
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// IPv4 or IPv6; the backends and the SNAT pool are of its family.
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub mode: Mode,
    /// The SNAT pool: one address or more in `fullnat` mode, none in `dnat`.
    pub snat: Vec<IpAddr>,
    pub scheduler: Scheduler,
    /// Route QUIC short-header packets by connection ID (see [`ServiceConfig::quic`]).
    pub quic: bool,
    pub backends: Vec<Backend>,
    /// How its backends are checked; `None` when they are not.
    pub health: Option<HealthConfig>,
}

impl Service {
    /// The SNAT pool, comma-separated, or "-" where there is none.
    pub fn snat_text(&self) -> String {
        if self.snat.is_empty() {
            return "-".into();
        }
        let pool: Vec<String> = self.snat.iter().map(|a| a.to_string()).collect();
        pool.join(",")
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.protocol)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
    pub drain: bool,
    pub quic_id: Option<u16>,
}

/// Everything wrong with a config, one line per problem.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// One problem: which field, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl Config {
    /// Reads and parses a TOML file; syntax and type errors name the line and field.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks everything the data path relies on, and returns all problems at once.
    pub fn validate(&self) -> Result<Checked, ConfigErrors> {
        let mut errors = Vec::new();
        let mut err = |field: String, problem: String| errors.push(FieldError { field, problem });
        let dp = &self.dataplane;

        if dp.interfaces.is_empty() {
            err(
                "dataplane.interfaces".into(),
                "no interface to attach to: list at least one, or pass --iface".into(),
            );
        }
        if dp.interfaces.len() > MAX_INTERFACES as usize {
            err(
                "dataplane.interfaces".into(),
                format!(
                    "at most {MAX_INTERFACES} interfaces, got {}",
                    dp.interfaces.len()
                ),
            );
        }
        let mut seen_ifaces = HashSet::new();
        for (i, name) in dp.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                err(
                    format!("dataplane.interfaces[{i}]"),
                    format!("{name:?} is not an interface name (1-15 characters, no '/' or space)"),
                );
            }
            if !seen_ifaces.insert(name) {
                err(
                    format!("dataplane.interfaces[{i}]"),
                    format!("{name:?} is listed twice"),
                );
            }
        }
        let moved = [
            (
                "conntrack_entries",
                dp.conntrack_entries.is_some(),
                "[conntrack] entries, which counts flows (each flow took two of the old map \
                 entries: halve the old value)",
            ),
            (
                "tcp_idle_timeout",
                dp.tcp_idle_timeout.is_some(),
                "[conntrack] tcp_established_timeout (and tcp_syn_timeout, \
                 tcp_closing_timeout, tcp_time_wait_timeout)",
            ),
            (
                "udp_idle_timeout",
                dp.udp_idle_timeout.is_some(),
                "[conntrack] udp_timeout",
            ),
        ];
        for (old, set, new) in moved {
            if set {
                err(
                    format!("dataplane.{old}"),
                    format!("this setting moved: use {new}"),
                );
            }
        }
        let ct = &self.conntrack;
        if ct.entries == 0 || ct.entries > MAX_CONNTRACK_FLOWS {
            err(
                "conntrack.entries".into(),
                format!(
                    "must be between 1 and {MAX_CONNTRACK_FLOWS}, got {}",
                    ct.entries
                ),
            );
        }
        for (field, value) in [
            ("tcp_syn_timeout", ct.tcp_syn_timeout),
            ("tcp_established_timeout", ct.tcp_established_timeout),
            ("tcp_closing_timeout", ct.tcp_closing_timeout),
            ("tcp_time_wait_timeout", ct.tcp_time_wait_timeout),
            ("udp_timeout", ct.udp_timeout),
        ] {
            if value == 0 {
                err(
                    format!("conntrack.{field}"),
                    "must be at least 1 second".into(),
                );
            }
        }
        if !lb_common::maglev::is_prime(dp.maglev_table_size) {
            err(
                "dataplane.maglev_table_size".into(),
                format!("must be a prime (e.g. 65537), got {}", dp.maglev_table_size),
            );
        }
        if dp.max_services == 0 {
            err("dataplane.max_services".into(), "must be at least 1".into());
        }
        if dp.max_backends == 0 {
            err("dataplane.max_backends".into(), "must be at least 1".into());
        }
        let maglev_entries = dp.max_services as u64 * dp.maglev_table_size as u64;
        if maglev_entries > u32::MAX as u64 / 4 {
            err(
                "dataplane.max_services".into(),
                format!(
                    "max_services × maglev_table_size = {maglev_entries} slots is too large \
                     for one BPF array"
                ),
            );
        }
        let snat_ports = match dp.snat_port_range {
            None => SnatPorts::DEFAULT,
            Some(range) => port_range(range, "dataplane.snat_port_range".into(), &mut err),
        };

        if self.services.len() > dp.max_services as usize {
            err(
                "service".into(),
                format!(
                    "{} services, but dataplane.max_services is {}",
                    self.services.len(),
                    dp.max_services
                ),
            );
        }
        let mut services = Vec::new();
        let mut seen_services = HashSet::new();
        let mut backend_total = 0usize;
        for (si, s) in self.services.iter().enumerate() {
            let at = |field: &str| format!("service[{si}].{field}");
            let vip = parse_endpoint(&s.vip).map_err(|p| err(at("vip"), p)).ok();
            if let Some(vip) = vip
                && !seen_services.insert((vip, s.protocol))
            {
                err(at("vip"), format!("{vip}/{} is defined twice", s.protocol));
            }
            // None: a problem was reported.
            let snat: Option<Vec<IpAddr>> = match (s.mode, &s.snat) {
                (Mode::Fullnat, None) => {
                    err(at("snat"), "mode fullnat needs a snat address".into());
                    None
                }
                (Mode::Fullnat, Some(pool)) => {
                    let (parsed, mut good) = parse_pool(pool.as_slice(), at("snat"), &mut err);
                    for &a in &parsed {
                        if let Some(vip) = vip
                            && let Some(problem) = family_mismatch(vip, s.protocol, a, a)
                        {
                            err(at("snat"), problem);
                            good = false;
                        }
                    }
                    good.then_some(parsed)
                }
                (Mode::Dnat, Some(_)) => {
                    err(
                        at("snat"),
                        "mode dnat keeps the client's address: remove snat, or use mode \
                         fullnat"
                            .into(),
                    );
                    None
                }
                (Mode::Dnat, None) => Some(Vec::new()),
            };
            let mut backends = Vec::new();
            let mut seen_backends = HashSet::new();
            for (bi, b) in s.backends.iter().enumerate() {
                let field = at(&format!("backend[{bi}].address"));
                let Ok(address) = parse_endpoint(&b.address).map_err(|p| err(field.clone(), p))
                else {
                    continue;
                };
                if !seen_backends.insert(address) {
                    err(field, format!("{address} is listed twice in this service"));
                    continue;
                }
                if let Some(vip) = vip
                    && let Some(problem) = family_mismatch(vip, s.protocol, address.ip(), address)
                {
                    err(field, problem);
                    continue;
                }
                if let Some(id) = b.quic_id {
                    if !s.quic {
                        err(
                            at(&format!("backend[{bi}].quic_id")),
                            "the service is not quic = true".into(),
                        );
                    }
                    if id == 0 {
                        err(
                            at(&format!("backend[{bi}].quic_id")),
                            "must be 1 to 65535 (0 means none)".into(),
                        );
                    }
                    if s.backends[..bi].iter().any(|o| o.quic_id == Some(id)) {
                        err(
                            at(&format!("backend[{bi}].quic_id")),
                            format!("{id} is another backend's of this service"),
                        );
                    }
                }
                backends.push(Backend {
                    address,
                    weight: b.weight,
                    drain: b.drain,
                    quic_id: b.quic_id,
                });
            }
            if backends.len() >= dp.maglev_table_size as usize {
                err(
                    at("backend"),
                    format!(
                        "{} backends need a maglev_table_size larger than that (ideally 100×)",
                        backends.len()
                    ),
                );
            }
            backend_total += s.backends.len();
            if let Some(h) = &s.health {
                if h.interval_ms == 0 || h.timeout_ms == 0 {
                    err(
                        at("health"),
                        "interval_ms and timeout_ms must be at least 1".into(),
                    );
                }
                if h.timeout_ms > h.interval_ms {
                    err(
                        at("health.timeout_ms"),
                        format!(
                            "{} is longer than interval_ms {}: checks would overlap",
                            h.timeout_ms, h.interval_ms
                        ),
                    );
                }
                if h.rise == 0 || h.fall == 0 {
                    err(at("health"), "rise and fall must be at least 1".into());
                }
                if h.kind == HealthKind::Http {
                    // It goes into the request line as it is: a space or a line break
                    // would make every check a bad request, and every backend down.
                    if !h.path.starts_with('/') {
                        err(
                            at("health.path"),
                            format!("{:?} must start with '/'", h.path),
                        );
                    } else if !h.path.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
                        err(
                            at("health.path"),
                            format!(
                                "{:?} is not an HTTP path: no spaces, controls, '#' or \
                                 non-ASCII characters (write them as %XX)",
                                h.path
                            ),
                        );
                    }
                }
                if h.kind != HealthKind::None && s.protocol == Protocol::Udp {
                    err(
                        at("health.kind"),
                        "tcp and http checks need a TCP service".into(),
                    );
                }
            }
            let health = s.health.clone().filter(|h| h.kind != HealthKind::None);
            if s.quic && s.protocol != Protocol::Udp {
                err(
                    at("quic"),
                    "QUIC runs over UDP: the service must be udp".into(),
                );
            }
            let least = lb_common::scheduler::is_least(s.scheduler.number());
            if least && backends.len() > lb_common::scheduler::MAX_LEAST_BACKENDS as usize {
                err(
                    at("backend"),
                    format!(
                        "{} backends, but scheduler {} looks at every one for each new flow: \
                         at most {}",
                        backends.len(),
                        s.scheduler.name(),
                        lb_common::scheduler::MAX_LEAST_BACKENDS
                    ),
                );
            }
            if s.scheduler == Scheduler::LeastResponseTime && health.is_none() {
                err(
                    at("scheduler"),
                    "least-response-time weighs the response times health checks measure: \
                     add a [service.health] with kind tcp or http"
                        .into(),
                );
            }
            if let (Some(vip), Some(snat)) = (vip, snat) {
                services.push(Service {
                    vip,
                    protocol: s.protocol,
                    mode: s.mode,
                    snat,
                    scheduler: s.scheduler,
                    quic: s.quic,
                    backends,
                    health,
                });
            }
        }
        let mut gateways = Vec::new();
        for (gi, g) in self.nat_gateways.iter().enumerate() {
            let at = |field: &str| format!("nat_gateway[{gi}].{field}");
            let source = Network::parse(&g.source)
                .map_err(|p| err(at("source"), p))
                .ok();
            if let Some(source) = source
                && self.nat_gateways[..gi]
                    .iter()
                    .any(|o| Network::parse(&o.source) == Ok(source))
            {
                err(at("source"), format!("{source} has another nat_gateway"));
            }
            let (to, _) = parse_pool(g.to.as_slice(), at("to"), &mut err);
            if let Some(source) = source
                && let Some(other) = to.iter().find(|a| a.is_ipv4() != source.addr.is_ipv4())
            {
                err(
                    at("to"),
                    format!(
                        "{other} is not of the family of the private network {source}: a \
                         gateway's source and to are one family"
                    ),
                );
            }
            if source.is_some_and(|s| s.prefix == 0) {
                err(
                    at("source"),
                    "a private network of every address leaves nothing outside it: name the \
                     private network (e.g. \"10.30.0.0/16\")"
                        .into(),
                );
            }
            // Inside any gateway's private network (this one's or another's), its replies
            // would be taken for private traffic.
            let sources: Vec<Network> = self
                .nat_gateways
                .iter()
                .filter_map(|o| Network::parse(&o.source).ok())
                .collect();
            if let Some((inside, of)) = to
                .iter()
                .find_map(|a| sources.iter().find(|s| s.contains(*a)).map(|s| (a, s)))
            {
                err(
                    at("to"),
                    format!(
                        "{inside} is inside the private network {of}: its traffic would not \
                         leave it"
                    ),
                );
            }
            if let Some(vip) = to
                .iter()
                .find(|&&a| services.iter().any(|s| s.vip.ip() == a))
            {
                err(
                    at("to"),
                    format!(
                        "{vip} is a service's VIP: a gateway's flows could take the ports its \
                         clients come to. Use another address"
                    ),
                );
            }
            let ports = g
                .ports
                .map(|range| port_range(range, at("ports"), &mut err));
            if let Some(source) = source {
                gateways.push(Gateway { source, to, ports });
            }
        }
        if self.services.len() + self.nat_gateways.len() > dp.max_services as usize
            && !self.nat_gateways.is_empty()
        {
            err(
                "nat_gateway".into(),
                format!(
                    "{} services and {} NAT gateways, but dataplane.max_services is {} (a \
                     gateway takes a service's place)",
                    self.services.len(),
                    self.nat_gateways.len(),
                    dp.max_services
                ),
            );
        }
        if backend_total > dp.max_backends as usize {
            err(
                "service".into(),
                format!(
                    "{backend_total} backends in all, but dataplane.max_backends is {}",
                    dp.max_backends
                ),
            );
        }

        if !self.api.metrics.is_empty() && self.api.metrics.parse::<SocketAddr>().is_err() {
            err(
                "api.metrics".into(),
                format!(
                    "{:?} is not \"address:port\" (e.g. \"127.0.0.1:9641\"); \"\" turns \
                     metrics off",
                    self.api.metrics
                ),
            );
        }
        if !dp.pin_path.is_absolute() {
            err(
                "dataplane.pin_path".into(),
                format!("{:?} must be an absolute path on bpffs", dp.pin_path),
            );
        }
        if self.api.socket.as_os_str().is_empty() {
            err("api.socket".into(), "must be a path".into());
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Checked {
            dataplane: dp.clone(),
            conntrack: self.conntrack.clone(),
            api: self.api.clone(),
            services,
            gateways,
            snat_ports,
        })
    }
}

/// A pool of 1 to `MAX_SNAT_ADDRESSES` distinct addresses (a service's `snat`, a gateway's
/// `to`), each problem reported against `field`: the addresses that parse, and whether the
/// pool is good.
fn parse_pool(
    texts: &[String],
    field: String,
    err: &mut impl FnMut(String, String),
) -> (Vec<IpAddr>, bool) {
    let parsed: Vec<IpAddr> = texts
        .iter()
        .filter_map(|t| parse_address(t).map_err(|p| err(field.clone(), p)).ok())
        .collect();
    let unique: HashSet<&IpAddr> = parsed.iter().collect();
    if texts.is_empty() || texts.len() > MAX_SNAT_ADDRESSES {
        err(
            field,
            format!(
                "{} addresses: a pool holds 1 to {MAX_SNAT_ADDRESSES}",
                texts.len()
            ),
        );
        return (parsed, false);
    }
    if unique.len() != parsed.len() {
        err(field, "an address is listed twice".into());
        return (parsed, false);
    }
    let good = parsed.len() == texts.len();
    (parsed, good)
}

/// An explicit port range `[first, last]` (`dataplane.snat_port_range`, a gateway's
/// `ports`), a problem reported against `field`.
fn port_range(
    [first, last]: [u16; 2],
    field: String,
    err: &mut impl FnMut(String, String),
) -> SnatPorts {
    if first == 0 || first > last {
        err(
            field,
            format!("must be [first, last] with 1 <= first <= last, got [{first}, {last}]"),
        );
    }
    SnatPorts {
        first,
        last,
        explicit: true,
    }
}

/// A VIP's or backend's "address:port", "[address]:port" for IPv6.
fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    let endpoint = match text.parse::<SocketAddr>() {
        Ok(endpoint) => endpoint,
        // "2001:db8::1:80" is an address, not an address and a port.
        Err(_) if text.parse::<Ipv6Addr>().is_ok() => {
            return Err(format!(
                "{text:?} is not \"[address]:port\": an IPv6 address goes in brackets (for \
                 example \"[2001:db8::1]:80\")"
            ));
        }
        Err(_) => {
            return Err(format!(
                "{text:?} is not \"address:port\" (for example \"10.0.0.1:80\" or \
                 \"[2001:db8::1]:80\")"
            ));
        }
    };
    if endpoint.port() == 0 {
        return Err(format!("{text:?}: port 0 is not a port"));
    }
    if let SocketAddr::V6(v6) = endpoint
        && v6.scope_id() != 0
    {
        return Err(format!(
            "{text:?}: the maps keep no scope id (%{}): use a global address",
            v6.scope_id()
        ));
    }
    usable(text, endpoint.ip())?;
    Ok(endpoint)
}

/// A SNAT or gateway address, of either family.
fn parse_address(text: &str) -> Result<IpAddr, String> {
    let addr = text
        .parse::<IpAddr>()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    usable(text, addr)?;
    Ok(addr)
}

/// Refuses an address (written `text`) that a service, backend or pool cannot use.
fn usable(text: &str, addr: IpAddr) -> Result<(), String> {
    // 0/8 but 0.0.0.0 and 240/4 but the broadcast address pass: Linux routes them as
    // unicast (since 5.3 and long before), and some networks number hosts from them
    // (class E pod ranges).
    let unicast = match addr {
        IpAddr::V4(a) => !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast(),
        IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast(),
    };
    if !unicast {
        return Err(format!("{text:?}: not a unicast address"));
    }
    if addr.is_loopback() {
        return Err(format!(
            "{text:?} is a loopback address: packets to or from it never leave a host, \
             and the kernel drops those that come in from outside"
        ));
    }
    let IpAddr::V6(v6) = addr else {
        return Ok(());
    };
    // Stored IPv4-mapped, it would read back as the IPv4 address: say it that way.
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Err(format!(
            "{text:?} is an IPv4-mapped IPv6 address: write the IPv4 address {v4}"
        ));
    }
    if v6.is_unicast_link_local() {
        return Err(format!(
            "{text:?} is link-local: it means something only together with an interface, \
             which xlb does not keep; use a global address"
        ));
    }
    Ok(())
}

/// "IPv4" or "IPv6".
fn family_name(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// Why `addr` (written `what`: the address, or the endpoint it is in) cannot be part of the
/// service at `vip`/`protocol`, if it is of the other family: a service's VIP, backends and
/// SNAT pool are all IPv4 or all IPv6, since the data path rewrites addresses within one
/// family and does not translate between them.
fn family_mismatch(
    vip: SocketAddr,
    protocol: Protocol,
    addr: IpAddr,
    what: impl fmt::Display,
) -> Option<String> {
    (vip.is_ipv4() != addr.is_ipv4()).then(|| {
        format!(
            "{what} is {} but the VIP of service {vip}/{protocol} is {}: a service's VIP, \
             backends and snat are all of one family",
            family_name(addr),
            family_name(vip.ip()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
interfaces = ["xlb-lb0"]
xdp_mode = "auto"

[conntrack]
entries = 1048576

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
mode = "fullnat"
snat = "10.20.0.1"

[[service.backend]]
address = "10.20.0.11:8080"
weight = 2

[[service.backend]]
address = "10.20.0.12:8080"
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text).unwrap().validate() {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_health_path_is_one_that_fits_in_a_request_line() {
        let with_path = |path: &str| {
            GOOD.replacen(
                "[[service.backend]]",
                &format!("[service.health]\nkind = \"http\"\npath = {path:?}\n[[service.backend]]"),
                1,
            )
        };
        assert_eq!(
            problems(&with_path("/healthz?full=1")),
            Vec::<String>::new()
        );
        for bad in [
            "healthz",
            "/health check",
            "/a\r\nX-Evil: 1",
            "/é",
            "/a#b",
            "/\t",
        ] {
            let found = problems(&with_path(bad));
            assert!(
                found.len() == 1 && found[0].starts_with("service[0].health.path: "),
                "{bad:?}: {found:?}"
            );
        }
    }

    #[test]
    fn the_readme_example_is_valid() {
        let c = Config::parse(GOOD).unwrap().validate().unwrap();
        assert_eq!(c.dataplane.interfaces, ["xlb-lb0"]);
        assert_eq!(c.dataplane.maglev_table_size, 65537);
        let s = &c.services[0];
        assert_eq!(s.vip, "10.10.0.100:80".parse().unwrap());
        assert_eq!(s.backends[0].weight, 2);
        assert_eq!(s.backends[1].weight, 1, "weight defaults to 1");
    }

    /// Every TOML snippet of the README parses (keys and types; snippets need not be whole
    /// configs).
    #[test]
    fn the_readmes_snippets_parse() {
        let readme = include_str!("../../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap_or(""))
            .collect();
        assert!(blocks.len() >= 4, "found {} TOML blocks", blocks.len());
        for b in blocks {
            if let Err(e) = Config::parse(b) {
                panic!("a README snippet does not parse: {e}\n{b}");
            }
        }
    }

    #[test]
    fn every_error_names_its_field() {
        let text = GOOD
            .replace("10.10.0.100:80", "10.10.0.100")
            .replace("snat = \"10.20.0.1\"", "snat = \"ten\"")
            .replace("10.20.0.12:8080", "10.20.0.11:8080")
            .replace("xdp_mode = \"auto\"", "maglev_table_size = 65536");
        let p = problems(&text);
        let expect = [
            "service[0].vip: \"10.10.0.100\" is not \"address:port\"",
            "service[0].snat: \"ten\" is not an IP address",
            "service[0].backend[1].address: 10.20.0.11:8080 is listed twice",
            "dataplane.maglev_table_size: must be a prime",
        ];
        for e in expect {
            assert!(
                p.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_bad_enums_are_parse_errors_with_the_key() {
        let e = Config::parse(&GOOD.replace("weight = 2", "wieght = 2")).unwrap_err();
        assert!(e.to_string().contains("wieght"), "{e}");
        let e = Config::parse(&GOOD.replace("\"tcp\"", "\"sctp\"")).unwrap_err();
        assert!(e.to_string().contains("sctp"), "{e}");
    }

    #[test]
    fn limits_are_checked() {
        let p = problems(&GOOD.replace("[dataplane]", "[dataplane]\nmax_backends = 1"));
        assert!(p.iter().any(|p| p.contains("max_backends is 1")), "{p:?}");
        let p = problems(&GOOD.replace("interfaces = [\"xlb-lb0\"]", "interfaces = []"));
        assert!(
            p.iter().any(|p| p.starts_with("dataplane.interfaces")),
            "{p:?}"
        );
        let p =
            problems(&GOOD.replace("[dataplane]", "[dataplane]\nsnat_port_range = [2000, 1000]"));
        assert!(
            p.iter().any(|p| p.starts_with("dataplane.snat_port_range")),
            "{p:?}"
        );
        let p = problems(&GOOD.replace("[conntrack]", "[conntrack]\nudp_timeout = 0"));
        assert!(
            p.iter().any(|p| p.starts_with("conntrack.udp_timeout")),
            "{p:?}"
        );
        let p = problems(&GOOD.replace("entries = 1048576", "entries = 0"));
        assert!(
            p.iter().any(|p| p.starts_with("conntrack.entries")),
            "{p:?}"
        );
        let p = problems(
            &GOOD
                .replace("[[service]]", "[[service]]\n")
                .replace("snat = \"10.20.0.1\"", ""),
        );
        assert!(p.iter().any(|p| p.starts_with("service[0].snat")), "{p:?}");
    }

    /// The keys that moved to [conntrack] are refused with their new name, not silently
    /// ignored or reported as unknown.
    #[test]
    fn modes_and_snat_pools_are_checked_and_round_trip() {
        let fullnat = "snat = \"10.20.0.1\"";
        // A pool.
        let pool = GOOD.replace(fullnat, "snat = [\"10.20.0.1\", \"10.20.0.2\"]");
        let c = Config::parse(&pool).unwrap().validate().unwrap();
        assert_eq!(
            c.services[0].snat,
            vec![Ipv4Addr::new(10, 20, 0, 1), Ipv4Addr::new(10, 20, 0, 2)]
        );
        assert_eq!(c.services[0].snat_text(), "10.20.0.1,10.20.0.2");
        // dnat, without snat.
        let dnat = GOOD
            .replace("mode = \"fullnat\"", "mode = \"dnat\"")
            .replace(fullnat, "");
        let d = Config::parse(&dnat).unwrap().validate().unwrap();
        assert_eq!(
            (d.services[0].mode, d.services[0].snat.len()),
            (Mode::Dnat, 0)
        );
        // Both come back from their file form unchanged.
        for checked in [&c, &d] {
            let again = checked.to_config().validate().unwrap();
            assert_eq!(again.services, checked.services);
        }
        // What is refused, each naming the field.
        for (text, problem) in [
            (
                GOOD.replace("mode = \"fullnat\"", "mode = \"dnat\""),
                "service[0].snat: mode dnat keeps the client's address",
            ),
            (
                GOOD.replace(fullnat, ""),
                "service[0].snat: mode fullnat needs",
            ),
            (
                GOOD.replace(fullnat, "snat = []"),
                "service[0].snat: 0 addresses: a pool holds 1 to 8",
            ),
            (
                GOOD.replace(
                    fullnat,
                    &format!(
                        "snat = [{}]",
                        (1..=9)
                            .map(|i| format!("\"10.20.0.{i}\""))
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                ),
                "service[0].snat: 9 addresses",
            ),
            (
                GOOD.replace(fullnat, "snat = [\"10.20.0.1\", \"10.20.0.1\"]"),
                "service[0].snat: an address is listed twice",
            ),
            (
                GOOD.replace(fullnat, "snat = [\"10.20.0.1\", \"x\"]"),
                "service[0].snat: \"x\" is not an IP address",
            ),
        ] {
            let p = problems(&text);
            assert!(
                p.iter().any(|p| p.starts_with(problem)),
                "{problem:?} not in {p:?}"
            );
        }
        assert!(Config::parse(&GOOD.replace("\"fullnat\"", "\"halfnat\"")).is_err());
    }

    const GOOD_V6: &str = r#"
[dataplane]
interfaces = ["xlb-lb0"]

[[service]]
vip = "[2001:db8::100]:80"
protocol = "tcp"
snat = "2001:db8:20::1"

[[service.backend]]
address = "[2001:db8:20::11]:8080"
weight = 2

[[service.backend]]
address = "[2001:db8:20::12]:8080"
"#;

    #[test]
    fn ipv6_services_are_parsed_and_round_trip() {
        let c = Config::parse(GOOD_V6).unwrap().validate().unwrap();
        let s = &c.services[0];
        let v6 = |segments: [u16; 8]| IpAddr::V6(Ipv6Addr::from(segments));
        assert_eq!(
            s.vip,
            SocketAddr::new(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100]), 80)
        );
        assert_eq!(s.snat, [v6([0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 1])]);
        let backends: Vec<(SocketAddr, u32)> =
            s.backends.iter().map(|b| (b.address, b.weight)).collect();
        assert_eq!(
            backends,
            [
                (
                    SocketAddr::new(v6([0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x11]), 8080),
                    2
                ),
                (
                    SocketAddr::new(v6([0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x12]), 8080),
                    1
                ),
            ]
        );
        assert_eq!(s.to_string(), "[2001:db8::100]:80/tcp");
        // Its file form writes the brackets back, and reads back the same.
        let file = c.to_config();
        assert_eq!(file.services[0].vip, "[2001:db8::100]:80");
        assert_eq!(
            file.services[0].backends[0].address,
            "[2001:db8:20::11]:8080"
        );
        assert_eq!(file.validate().unwrap().services, c.services);

        // A pool; dnat; an IPv4 service beside them; the same VIP with another protocol.
        let text = format!(
            "{}{}",
            GOOD_V6.replace(
                "snat = \"2001:db8:20::1\"",
                "snat = [\"2001:db8:20::1\", \"2001:db8:20::2\"]"
            ),
            r#"
[[service]]
vip = "[2001:db8::100]:80"
protocol = "udp"
mode = "dnat"
[[service.backend]]
address = "[2001:db8:20::11]:8080"

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.0.11:8080"
"#
        );
        let c = Config::parse(&text).unwrap().validate().unwrap();
        assert_eq!(c.services[0].snat_text(), "2001:db8:20::1,2001:db8:20::2");
        assert_eq!(
            (c.services[1].mode, c.services[1].snat.len()),
            (Mode::Dnat, 0)
        );
        assert_eq!(c.services[2].vip, "10.10.0.100:80".parse().unwrap());
        assert_eq!(c.to_config().validate().unwrap().services, c.services);
    }

    #[test]
    fn a_services_vip_backends_and_snat_are_of_one_family() {
        let v4_backend = format!("{GOOD_V6}[[service.backend]]\naddress = \"10.0.0.2:80\"\n");
        for (text, problem) in [
            (
                v4_backend,
                "service[0].backend[2].address: 10.0.0.2:80 is IPv4 but the VIP of service \
                 [2001:db8::100]:80/tcp is IPv6",
            ),
            (
                GOOD_V6.replace("snat = \"2001:db8:20::1\"", "snat = \"10.20.0.1\""),
                "service[0].snat: 10.20.0.1 is IPv4 but the VIP of service [2001:db8::100]:80/tcp \
                 is IPv6",
            ),
            (
                GOOD.replace("10.20.0.12:8080", "[2001:db8:20::12]:8080"),
                "service[0].backend[1].address: [2001:db8:20::12]:8080 is IPv6 but the VIP of \
                 service 10.10.0.100:80/tcp is IPv4",
            ),
            (
                GOOD.replace(
                    "snat = \"10.20.0.1\"",
                    "snat = [\"10.20.0.1\", \"2001:db8:20::1\"]",
                ),
                "service[0].snat: 2001:db8:20::1 is IPv6 but the VIP of service \
                 10.10.0.100:80/tcp is IPv4",
            ),
        ] {
            let p = problems(&text);
            assert!(
                p.iter().any(|p| p.starts_with(problem)),
                "{problem:?} not in {p:#?}"
            );
        }
    }

    #[test]
    fn ipv4_addresses_a_service_cannot_use_are_refused() {
        for (from, to, problem) in [
            (
                "10.10.0.100:80",
                "224.0.0.5:80",
                "service[0].vip: \"224.0.0.5:80\": not a unicast address",
            ),
            (
                "10.10.0.100:80",
                "0.0.0.0:80",
                "service[0].vip: \"0.0.0.0:80\": not a unicast address",
            ),
            (
                "10.10.0.100:80",
                "127.0.0.1:80",
                "service[0].vip: \"127.0.0.1:80\" is a loopback address",
            ),
            (
                "10.20.0.11:8080",
                "127.0.0.53:8080",
                "service[0].backend[0].address: \"127.0.0.53:8080\" is a loopback address",
            ),
            (
                "\"10.20.0.1\"",
                "\"239.1.1.1\"",
                "service[0].snat: \"239.1.1.1\": not a unicast address",
            ),
            (
                "\"10.20.0.1\"",
                "\"255.255.255.255\"",
                "service[0].snat: \"255.255.255.255\": not a unicast address",
            ),
        ] {
            assert!(GOOD.contains(from), "{from}");
            let p = problems(&GOOD.replace(from, to));
            assert!(
                p.iter().any(|p| p.starts_with(problem)),
                "{problem:?} not in {p:#?}"
            );
        }
        // Linux routes these as unicast, and some networks number hosts from them.
        for (from, to) in [
            ("10.10.0.100:80", "240.0.0.100:80"),
            ("\"10.20.0.1\"", "\"0.20.0.1\""),
        ] {
            let p = problems(&GOOD.replace(from, to));
            assert!(p.is_empty(), "{to}: {p:#?}");
        }
    }

    #[test]
    fn ipv6_addresses_a_service_cannot_use_are_refused() {
        let vip = "[2001:db8::100]:80";
        for (from, to, problem) in [
            (
                vip,
                "2001:db8::100:80",
                "service[0].vip: \"2001:db8::100:80\" is not \"[address]:port\": an IPv6 \
                 address goes in brackets",
            ),
            (
                vip,
                "[::]:80",
                "service[0].vip: \"[::]:80\": not a unicast address",
            ),
            (
                vip,
                "[ff02::1]:80",
                "service[0].vip: \"[ff02::1]:80\": not a unicast address",
            ),
            (
                vip,
                "[fe80::1]:80",
                "service[0].vip: \"[fe80::1]:80\" is link-local",
            ),
            (
                vip,
                "[::1]:80",
                "service[0].vip: \"[::1]:80\" is a loopback address",
            ),
            (
                vip,
                "[2001:db8::100%3]:80",
                "service[0].vip: \"[2001:db8::100%3]:80\": the maps keep no scope id",
            ),
            (
                vip,
                "[::ffff:10.10.0.100]:80",
                "service[0].vip: \"[::ffff:10.10.0.100]:80\" is an IPv4-mapped IPv6 address: \
                 write the IPv4 address 10.10.0.100",
            ),
            (
                "[2001:db8:20::11]:8080",
                "[2001:db8:20::11]:0",
                "service[0].backend[0].address: \"[2001:db8:20::11]:0\": port 0",
            ),
            (
                "\"2001:db8:20::1\"",
                "\"fe80::1\"",
                "service[0].snat: \"fe80::1\" is link-local",
            ),
            (
                "\"2001:db8:20::1\"",
                "[\"2001:db8:20::1\", \"2001:db8:20::1\"]",
                "service[0].snat: an address is listed twice",
            ),
        ] {
            let p = problems(&GOOD_V6.replace(from, to));
            assert!(
                p.iter().any(|p| p.starts_with(problem)),
                "{problem:?} not in {p:#?}"
            );
        }
        let p = problems(&format!(
            "{GOOD_V6}{}",
            &GOOD_V6[GOOD_V6.find("[[service]]").unwrap()..]
        ));
        assert!(
            p.iter()
                .any(|p| p.starts_with("service[1].vip: [2001:db8::100]:80/tcp is defined twice")),
            "{p:#?}"
        );
    }

    /// The kernel's one ephemeral port range covers IPv6 sockets too: an IPv6 SNAT address
    /// of the host's own keeps clear of it as an IPv4 one does.
    #[test]
    fn an_ipv6_snat_address_of_the_hosts_keeps_clear_of_its_ephemeral_ports() {
        let checked = || Config::parse(GOOD_V6).unwrap().validate().unwrap();
        let mut c = checked();
        c.fit_to_host(&host("2001:db8:20::99", 32768, 60999))
            .unwrap();
        assert_eq!(c.snat_ports, SnatPorts::DEFAULT);
        let mut c = checked();
        c.fit_to_host(&host("2001:db8:20::1", 32768, 60999))
            .unwrap();
        assert_eq!((c.snat_ports.first, c.snat_ports.last), (1024, 32767));
        let explicit = GOOD_V6.replace(
            "[dataplane]",
            "[dataplane]\nsnat_port_range = [30000, 40000]",
        );
        let e = Config::parse(&explicit)
            .unwrap()
            .validate()
            .unwrap()
            .fit_to_host(&host("2001:db8:20::1", 32768, 60999))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dataplane.snat_port_range: [30000, 40000] overlaps"),
            "{e}"
        );
    }

    #[test]
    fn moved_keys_name_their_new_place() {
        for (old, new) in [
            ("conntrack_entries = 1000", "[conntrack] entries"),
            (
                "tcp_idle_timeout = 10",
                "[conntrack] tcp_established_timeout",
            ),
            ("udp_idle_timeout = 10", "[conntrack] udp_timeout"),
        ] {
            let p = problems(&GOOD.replace("[dataplane]", &format!("[dataplane]\n{old}")));
            let key = old.split(' ').next().unwrap();
            assert!(
                p.iter()
                    .any(|p| p
                        .starts_with(&format!("dataplane.{key}: this setting moved: use {new}"))),
                "{old}: {p:?}"
            );
        }
    }

    fn host(addr: &str, lo: u16, hi: u16) -> HostFacts {
        HostFacts {
            addresses: vec![addr.parse().unwrap()],
            ephemeral_ports: [lo, hi],
        }
    }

    /// With the SNAT address one of the host's own, the default range moves out of the
    /// host's ephemeral ports and an explicit overlapping range is refused.
    #[test]
    fn snat_ports_keep_clear_of_the_hosts_ephemeral_ports() {
        let checked = || Config::parse(GOOD).unwrap().validate().unwrap();
        // Not the host's address: the full default range stays.
        let mut c = checked();
        c.fit_to_host(&host("10.99.0.1", 32768, 60999)).unwrap();
        assert_eq!(c.snat_ports, SnatPorts::DEFAULT);
        // The host's own: Linux's default ephemeral range leaves 1024-32767 (31,744 ports)
        // below and 61000-65535 above: the larger is taken.
        let mut c = checked();
        c.fit_to_host(&host("10.20.0.1", 32768, 60999)).unwrap();
        assert_eq!((c.snat_ports.first, c.snat_ports.last), (1024, 32767));
        let mut c = checked();
        c.fit_to_host(&host("10.20.0.1", 2000, 40000)).unwrap();
        assert_eq!((c.snat_ports.first, c.snat_ports.last), (40001, 65535));
        // Nothing left.
        let mut c = checked();
        assert!(c.fit_to_host(&host("10.20.0.1", 1024, 65535)).is_err());
        // Explicit and overlapping: refused, naming the field, the range and the sysctl.
        let explicit = GOOD.replace(
            "[dataplane]",
            "[dataplane]\nsnat_port_range = [30000, 40000]",
        );
        let mut c = Config::parse(&explicit).unwrap().validate().unwrap();
        let e = c
            .fit_to_host(&host("10.20.0.1", 32768, 60999))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dataplane.snat_port_range: [30000, 40000] overlaps"),
            "{e}"
        );
        assert!(e.contains("ip_local_port_range"), "{e}");
        // Explicit, not overlapping: kept.
        let ok = GOOD.replace(
            "[dataplane]",
            "[dataplane]\nsnat_port_range = [61000, 65535]",
        );
        let mut c = Config::parse(&ok).unwrap().validate().unwrap();
        c.fit_to_host(&host("10.20.0.1", 32768, 60999)).unwrap();
        assert_eq!((c.snat_ports.first, c.snat_ports.last), (61000, 65535));
    }

    /// A running daemon's SNAT range is fixed (explicit): when the host's ephemeral ports
    /// move over it, changes that bring no conflict of their own still go through, with
    /// the conflict to log; one that makes a SNAT address the host's is refused.
    #[test]
    fn a_change_is_not_refused_for_a_conflict_the_running_config_has_too() {
        let fixed = |text: &str| {
            let text = text.replace(
                "[dataplane]",
                "[dataplane]\nsnat_port_range = [1024, 32767]",
            );
            Config::parse(&text).unwrap().validate().unwrap()
        };
        let running = fixed(GOOD);
        let before = host("10.20.0.1", 32768, 60999);
        running.clone().fit_to_host(&before).unwrap();
        // `ip_local_port_range` set to 10000-65000 while xlb runs.
        let after = host("10.20.0.1", 10000, 65000);
        let mut drop_backend =
            fixed(&GOOD.replace("\n[[service.backend]]\naddress = \"10.20.0.12:8080\"\n", ""));
        assert_eq!(drop_backend.services[0].backends.len(), 1);
        let warning = drop_backend
            .fit_change_to_host(&running, &after)
            .unwrap()
            .expect("the conflict, to log");
        assert!(
            warning
                .to_string()
                .starts_with("dataplane.snat_port_range: [1024, 32767] overlaps"),
            "{warning}"
        );
        assert!(matches!(
            drop_backend.fit_change_to_host(&running, &before),
            Ok(None)
        ));
        // A range fitted at start (not explicit, as `xlb run` runs it) stays as it was.
        let mut fitted = Config::parse(GOOD).unwrap().validate().unwrap();
        fitted.fit_to_host(&before).unwrap();
        assert!(!fitted.snat_ports.explicit);
        assert!(
            fixed(GOOD)
                .fit_change_to_host(&fitted, &after)
                .unwrap()
                .is_some()
        );
        // Not the host's SNAT address before: a change that makes it so is refused.
        let elsewhere = fixed(&GOOD.replace("snat = \"10.20.0.1\"", "snat = \"10.20.0.2\""));
        let mut onto_host = fixed(GOOD);
        assert!(onto_host.fit_change_to_host(&elsewhere, &after).is_err());
        // Nor is one that adds an address of the host to those the running config has.
        let second = format!(
            "{GOOD}\n[[service]]\nvip = \"10.10.0.101:80\"\nprotocol = \"tcp\"\nsnat = \"10.20.0.5\"\n\
             [[service.backend]]\naddress = \"10.20.0.11:8080\"\n"
        );
        let two_own = HostFacts {
            addresses: vec!["10.20.0.1".parse().unwrap(), "10.20.0.5".parse().unwrap()],
            ephemeral_ports: [10000, 65000],
        };
        let e = fixed(&second)
            .fit_change_to_host(&running, &two_own)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("service[1].snat: 10.20.0.5 is an address of this host"),
            "{e}"
        );
        // The same service added with an address the host does not own goes through.
        let other = second.replace("10.20.0.5", "10.20.0.6");
        assert!(
            fixed(&other)
                .fit_change_to_host(&running, &two_own)
                .unwrap()
                .is_some()
        );
    }

    const GATEWAY: &str = r#"
[[nat_gateway]]
source = "10.30.0.0/24"
to = ["198.51.100.10", "198.51.100.11"]
ports = [20000, 29999]
"#;

    #[test]
    fn an_ipv6_nat_gateway_takes_ipv6_networks_and_addresses() {
        let gateway = "\n[[nat_gateway]]\nsource = \"fd00:30::/64\"\n\
                       to = [\"2001:db8:51::10\", \"2001:db8:51::11\"]\nports = [20000, 29999]\n";
        let c = Config::parse(&format!("{GOOD}{gateway}"))
            .unwrap()
            .validate()
            .unwrap();
        let g = &c.gateways[0];
        assert_eq!(g.source.to_string(), "fd00:30::/64");
        // The last address of the /64, and the first past it.
        assert!(
            g.source
                .contains("fd00:30::ffff:ffff:ffff:ffff".parse().unwrap())
        );
        assert!(!g.source.contains("fd00:30:0:1::".parse().unwrap()));
        assert!(!g.source.contains("10.30.0.1".parse().unwrap()));
        assert_eq!(g.to.len(), 2);
        assert_eq!(c.to_config().validate().unwrap().gateways, c.gateways);
    }

    #[test]
    fn a_nat_gateway_is_checked_field_by_field() {
        let c = Config::parse(&format!("{GOOD}{GATEWAY}"))
            .unwrap()
            .validate()
            .unwrap();
        let g = &c.gateways[0];
        assert_eq!(g.source.to_string(), "10.30.0.0/24");
        assert!(g.source.contains("10.30.0.255".parse().unwrap()));
        assert!(!g.source.contains("10.30.1.0".parse().unwrap()));
        assert_eq!(g.to.len(), 2);
        assert_eq!(c.gateway_ports(g).count(), 10000);
        // It comes back the same from its file form.
        let again = c.to_config().validate().unwrap();
        assert_eq!(again.gateways, c.gateways);
        // Without ports: the config's range.
        let c = Config::parse(&format!(
            "{GOOD}{}",
            GATEWAY.replace("ports = [20000, 29999]\n", "")
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.gateway_ports(&c.gateways[0]), c.snat_ports);

        for (from, to, field, says) in [
            (
                "10.30.0.0/24",
                "10.30.0.5/24",
                "source",
                "bits set past the prefix: the network is 10.30.0.0/24",
            ),
            ("10.30.0.0/24", "10.30.0.0/33", "source", "0 to 32 bits"),
            (
                "10.30.0.0/24",
                "0.0.0.0/0",
                "source",
                "leaves nothing outside it",
            ),
            (
                "\"198.51.100.11\"",
                "\"10.10.0.100\"",
                "to",
                "is a service's VIP",
            ),
            (
                "10.30.0.0/24",
                "10.30.0.0",
                "source",
                "is not \"address/prefix\"",
            ),
            (
                "\"198.51.100.11\"",
                "\"198.51.100.10\"",
                "to",
                "listed twice",
            ),
            (
                "\"198.51.100.11\"",
                "\"10.30.0.7\"",
                "to",
                "inside the private network",
            ),
            (
                "\"198.51.100.11\"",
                "\"2001:db8:51::11\"",
                "to",
                "2001:db8:51::11 is not of the family of the private network 10.30.0.0/24",
            ),
            (
                "10.30.0.0/24",
                "fd00:30::/64",
                "to",
                "198.51.100.10 is not of the family of the private network fd00:30::/64",
            ),
            ("10.30.0.0/24", "fd00:30::/129", "source", "0 to 128 bits"),
            (
                "10.30.0.0/24",
                "fd00:30::1/64",
                "source",
                "the network is fd00:30::/64",
            ),
            (
                "10.30.0.0/24",
                "::ffff:10.30.0.0/120",
                "source",
                "IPv4-mapped",
            ),
            (
                "[20000, 29999]",
                "[29999, 20000]",
                "ports",
                "1 <= first <= last",
            ),
        ] {
            let p = problems(&format!("{GOOD}{}", GATEWAY.replace(from, to)));
            let want = format!("nat_gateway[0].{field}: ");
            assert!(
                p.iter().any(|p| p.starts_with(&want) && p.contains(says)),
                "{to}: no {want}...{says} in {p:?}"
            );
        }
        // Inside another gateway's private network.
        let other = GATEWAY
            .replace("10.30.0.0/24", "10.31.0.0/24")
            .replace("\"198.51.100.11\"", "\"10.30.0.9\"");
        let p = problems(&format!("{GOOD}{GATEWAY}{other}"));
        assert!(
            p.iter().any(|p| p.starts_with(
                "nat_gateway[1].to: 10.30.0.9 is inside the private network 10.30.0.0/24"
            )),
            "{p:?}"
        );
        let twice = problems(&format!("{GOOD}{GATEWAY}{GATEWAY}"));
        assert!(
            twice
                .iter()
                .any(|p| p.starts_with("nat_gateway[1].source: 10.30.0.0/24 has another")),
            "{twice:?}"
        );
        let crowded = problems(&format!(
            "{}{GATEWAY}",
            GOOD.replace("[dataplane]", "[dataplane]\nmax_services = 1")
        ));
        assert!(
            crowded
                .iter()
                .any(|p| p.starts_with("nat_gateway: 1 services and 1 NAT gateways")),
            "{crowded:?}"
        );
    }

    /// A gateway's public address that is the host's own keeps its ports clear of the
    /// host's ephemeral ports, as a SNAT address does.
    #[test]
    fn a_gateway_on_the_hosts_own_address_keeps_clear_of_its_ephemeral_ports() {
        let own = GATEWAY.replace("\"198.51.100.11\"", "\"198.51.100.12\"");
        let mut c = Config::parse(&format!("{GOOD}{own}"))
            .unwrap()
            .validate()
            .unwrap();
        // Its explicit range is clear of 32768-60999: fine.
        c.fit_to_host(&host("198.51.100.10", 32768, 60999)).unwrap();
        let e = Config::parse(&format!("{GOOD}{}", own.replace("29999", "40000")))
            .unwrap()
            .validate()
            .unwrap()
            .fit_to_host(&host("198.51.100.10", 32768, 60999))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("nat_gateway[0].ports: [20000, 40000] overlaps"),
            "{e}"
        );
        // Without ports it takes the config's range, which moves clear of them.
        let mut c = Config::parse(&format!(
            "{GOOD}{}",
            own.replace("ports = [20000, 29999]\n", "")
        ))
        .unwrap()
        .validate()
        .unwrap();
        c.fit_to_host(&host("198.51.100.10", 32768, 60999)).unwrap();
        let ports = c.gateway_ports(&c.gateways[0]);
        assert_eq!((ports.first, ports.last), (1024, 32767));
    }
}
