//! Keys and values of the BPF maps, shared by the XDP program and userspace.
//!
//! Rules every type here follows, so both sides read the same bytes:
//! * `#[repr(C)]`, explicit padding fields, no `bool`/`Option`/enums inside;
//! * addresses and ports are byte arrays in **network byte order**; every other integer is
//!   in host byte order (the XDP program and userspace run on the same host);
//! * the size is pinned by a `const` assertion, so a layout change fails to compile instead
//!   of silently disagreeing with the other side.
//!
//! Addresses are 16 bytes wide for both families: an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so IPv6 can use the same maps and the same code paths.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use crate::conntrack::FlowSeen;

/// Map names, as declared in lb-ebpf and looked up by lb-userspace.
pub mod names {
    /// `HashMap<ServiceKey, ServiceEntry>`: the services, by VIP, port and protocol.
    /// Userspace waits an RCU grace period after replacing or removing an entry, before it
    /// writes again: a program run may hold the old one until it ends.
    pub const SERVICES: &str = "SERVICES";
    /// `Array<[u32; 2]>`, memory-mapped by userspace (`BPF_F_MMAPABLE`): `2 × max_services`
    /// Maglev tables of `maglev_size` backend ids each, back to back, two ids per entry (the
    /// kernel gives every array entry 8 bytes; two ids fill them). Slot `s` of the whole
    /// array is entry `s / 2`, id `s % 2`. Service `id` owns tables `2 × id` and
    /// `2 × id + 1`; its [`ServiceEntry::table`](super::ServiceEntry::table) names the one in
    /// use, and userspace writes the other, then switches. [`NO_BACKEND`](super::NO_BACKEND)
    /// marks a slot with no backend.
    pub const MAGLEV: &str = "MAGLEV";
    /// `Array<BackendEntry>`: backend endpoints by backend id; an id not in use is all zeros.
    pub const BACKENDS: &str = "BACKENDS";
    /// `HashMap<FlowKey, NatEntry>`: connection tracking, both directions of every flow. A
    /// plain hash map, not an LRU one: nothing is ever evicted to make room; when it is
    /// full, new flows are refused. The control plane's sweeper removes expired flows.
    /// Preallocated: its whole capacity is kernel memory from the moment it is made.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// `Array<Settings>` with one entry: data-path settings.
    pub const CONFIG: &str = "CONFIG";
    /// `DevMapHash` keyed by ifindex: the interfaces xlb may redirect to.
    pub const DEVMAP: &str = "DEVMAP";
    /// `HashMap<u32, u8>` keyed by ifindex: interfaces where a frame going back out of the
    /// interface it came in on is redirected rather than sent with XDP_TX (veths).
    pub const NO_XDP_TX: &str = "NO_XDP_TX";
    /// `PerCpuArray<u64>`, indexed by [`Reason`](crate::reason::Reason): packets per verdict.
    pub const REASONS: &str = "REASONS";
    /// `PerCpuArray<FlowStats>` by service id.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// `PerCpuArray<FlowStats>` by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// `PerCpuArray<u64>`, indexed by [`Handoff`](super::Handoff): what the tc program did
    /// with frames the XDP program handed it.
    pub const HANDOFFS: &str = "HANDOFFS";
    /// `PerCpuArray<u32>` by service id: the round-robin schedulers' turn counters, one per
    /// CPU (so no CPU waits on another).
    pub const CURSORS: &str = "CURSORS";
    /// `Array<u64>` by backend id, memory-mapped by userspace (`BPF_F_MMAPABLE`): each
    /// backend's open flows. The XDP program adds one (atomically) for every flow it starts
    /// (a new flow, or a closed one started anew); the sweeper takes one off when it sees a
    /// flow closed or removes one (see `lb_userspace::conntrack::Accounting`).
    pub const ACTIVE: &str = "ACTIVE";
    /// `HashMap<FlowKey, u32>`, userspace's alone: for a flow (by its forward key) how many
    /// of its starts the sweeper has taken off `ACTIVE` already, so each is taken off once,
    /// across restarts of the daemon too. Only flows closed or started anew have one.
    pub const RELEASED: &str = "RELEASED";
    /// `HashMap<u64, u32>`: for a QUIC service, the backend id of each server id
    /// ([`quic::key`](crate::quic::key)); written with the service's table.
    pub const QUIC_SERVERS: &str = "QUIC_SERVERS";

    /// `HashMap<[u8; 16], u32>`: every address some service listens on (IPv4-mapped), and
    /// how many services do. The XDP program answers pings to them. Not pinned: the registry
    /// writes it whole from the services at every start and change.
    pub const VIPS: &str = "VIPS";
    /// `LpmTrie<[u8; 16], ServiceEntry>`: the NAT gateways, by the private network they
    /// serve (IPv4-mapped, prefix length 96 + the IPv4 prefix). Each is a
    /// [`ServiceEntry`](super::ServiceEntry) of [`MODE_GATEWAY`](super::MODE_GATEWAY) with an
    /// id of the services' (its counters are in `SERVICE_STATS`) and no backends: a flow's
    /// "backend" is the packet's own destination.
    pub const GATEWAYS: &str = "GATEWAYS";
    /// `HashMap<MappingKey, Mapping>`: a NAT gateway's UDP mappings, each stored both ways
    /// (private endpoint → public one, public → private), so a private endpoint keeps one
    /// public address and port toward every destination (endpoint-independent mapping,
    /// RFC 4787), and no two private endpoints share one. The XDP program makes them with a
    /// flow; the sweeper removes those no flow uses.
    pub const MAPPINGS: &str = "MAPPINGS";

    /// The maps pinned under `[dataplane] pin_path`, which a restarted daemon adopts: the
    /// tables, the flows, the counters. The others (`DEVMAP`, `NO_XDP_TX`, the per-CPU
    /// scratch, the log buffer) belong to one program and are filled when it is attached.
    pub const PINNED: [&str; 13] = [
        SERVICES,
        MAGLEV,
        BACKENDS,
        CONNTRACK,
        CONFIG,
        REASONS,
        SERVICE_STATS,
        BACKEND_STATS,
        HANDOFFS,
        ACTIVE,
        RELEASED,
        GATEWAYS,
        MAPPINGS,
    ];
}

/// Program names, as declared in lb-ebpf.
pub mod programs {
    /// The XDP program every frame goes through.
    pub const XDP: &str = "xlb";
    /// The tc ingress program that sends the frames the XDP program handed to the kernel
    /// (see [`handoff_mark`](super::handoff_mark)).
    pub const TC_HANDOFF: &str = "xlb_handoff";
    /// An XDP program that does nothing (XDP_PASS), never attached: the benchmark's floor,
    /// the fixed cost of running any XDP program.
    pub const NULL: &str = "xlb_null";
    /// Benchmark only: XDP_TX for every frame; with BPF_PROG_TEST_RUN in live-frames mode,
    /// a packet generator.
    pub const TX: &str = "xlb_tx";
    /// Benchmark only: swaps MACs and redirects to the interface in the global
    /// [`BENCH_FORWARD_TO`]: the ceiling of any XDP forwarder.
    pub const NULL_FORWARDER: &str = "xlb_null_forwarder";
    /// Benchmark only: XDP_DROP for every frame: the forwarding benchmark's floor, what
    /// its generator and the veth cost with nothing forwarded.
    pub const DROP: &str = "xlb_drop";
    /// The global the null forwarder redirects to (an ifindex).
    pub const BENCH_FORWARD_TO: &str = "BENCH_FORWARD_TO";
    /// The global holding the 60-byte frame the generator sends.
    pub const BENCH_FRAME: &str = "BENCH_FRAME";
    /// The global saying over how many UDP source ports the generator spreads its frames.
    pub const BENCH_FLOWS: &str = "BENCH_FLOWS";
}

/// Default map capacities, used by the XDP program's declarations; userspace resizes the
/// big ones at load time from the config (`aya::EbpfLoader::set_max_entries`).
pub const DEFAULT_MAX_SERVICES: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 20;
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// Interfaces xlb can redirect between.
pub const MAX_INTERFACES: u32 = 64;

/// How many SNAT ports a new flow tries before it is dropped with
/// [`Reason::DropSnatPortsExhausted`](crate::reason::Reason::DropSnatPortsExhausted) (fewer
/// when the range is smaller: every port once). The order is
/// [`hash::snat_port`](crate::hash::snat_port)'s.
pub const SNAT_PORT_PROBES: u32 = 64;

/// The version of the maps' layout: the names, types and sizes in this module. A daemon
/// that finds pinned maps of another version refuses them rather than misread them; bump it
/// with every change to a pinned map's key or value.
pub const LAYOUT_VERSION: u32 = 9;

/// The most SNAT addresses one service's pool holds. A power of two: the XDP program bounds
/// an index into the pool with a mask.
pub const MAX_SNAT_ADDRESSES: usize = 8;

/// Marks a Maglev slot that has no backend (the service has none that takes new flows).
pub const NO_BACKEND: u32 = u32::MAX;

/// IP protocol numbers used in keys.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// An IP address and a port, both in network byte order. IPv4 is stored IPv4-mapped.
///
/// Two-byte aligned (every struct here has its endpoints at even offsets, so no size
/// changes): the BPF target cannot load a word from an address it does not know is
/// aligned, so a copy or compare of one-byte-aligned endpoints went a byte at a time.
#[repr(C, align(2))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: [u8; 2],
}
const _: () = assert!(size_of::<Endpoint>() == 18);

impl Endpoint {
    /// An IPv4 endpoint; `octets` and `port` are in network byte order.
    #[inline(always)]
    pub const fn v4(octets: [u8; 4], port: [u8; 2]) -> Self {
        Endpoint {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2],
                octets[3],
            ],
            port,
        }
    }

    /// The IPv4 address, if this is an IPv4-mapped endpoint.
    #[inline(always)]
    pub fn v4_octets(&self) -> [u8; 4] {
        [self.addr[12], self.addr[13], self.addr[14], self.addr[15]]
    }

    /// An IPv6 endpoint; `addr` and `port` are in network byte order.
    #[inline(always)]
    pub const fn v6(addr: [u8; 16], port: [u8; 2]) -> Self {
        Endpoint { addr, port }
    }

    /// Whether the address is IPv4-mapped, that is an IPv4 endpoint.
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        is_v4_mapped(&self.addr)
    }

    pub fn from_socket_v4(sa: SocketAddrV4) -> Self {
        Self::v4(sa.ip().octets(), sa.port().to_be_bytes())
    }

    pub fn to_socket_v4(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(self.v4_octets()),
            u16::from_be_bytes(self.port),
        )
    }

    /// Either family: IPv4 stored IPv4-mapped, IPv6 as it is.
    pub fn from_socket(sa: SocketAddr) -> Self {
        Self::v6(Self::addr_of(sa.ip()), sa.port().to_be_bytes())
    }

    /// Back to a socket address of its own family: an IPv4-mapped one is IPv4.
    pub fn to_socket(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), u16::from_be_bytes(self.port))
    }

    /// The address, of its own family.
    pub fn ip(&self) -> IpAddr {
        if self.is_v4() {
            IpAddr::V4(Ipv4Addr::from(self.v4_octets()))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        }
    }

    /// How an address is stored in the maps (IPv4 mapped).
    pub fn addr_of(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }
}

/// Whether an IPv6 address is IPv4-mapped (`::ffff:a.b.c.d`). Compared in words, not as a
/// slice: the XDP program has no `memcmp`.
#[inline(always)]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let head = u64::from_ne_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    head == 0 && [addr[8], addr[9], addr[10], addr[11]] == [0, 0, 0xff, 0xff]
}

/// Identifies one direction of a flow: the addresses and ports as they appear in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Endpoint,
    pub dst: Endpoint,
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FlowKey>() == 38);

/// [`Rewrite::direction`] of a packet going from the client to the backend.
pub const DIR_TO_BACKEND: u8 = 0;
/// [`Rewrite::direction`] of a reply going from the backend to the client.
pub const DIR_TO_CLIENT: u8 = 1;

/// How to rewrite the packets of one direction of a flow. Every flow has two conntrack
/// entries, one per direction, so both directions take the same lookup-and-rewrite path:
///
/// | key (as received)            | `src` (rewrite to) | `dst` (rewrite to) |
/// |------------------------------|--------------------|--------------------|
/// | client → VIP                 | SNAT:port          | backend            |
/// | backend → SNAT:port          | VIP                | client             |
///
/// In [`MODE_DNAT`] the SNAT endpoint is the client's own address and port:
///
/// | key (as received)            | `src` (rewrite to) | `dst` (rewrite to) |
/// |------------------------------|--------------------|--------------------|
/// | client → VIP                 | client             | backend            |
/// | backend → client             | VIP                | client             |
///
/// A NAT gateway's flow ([`MODE_GATEWAY`]) keeps its destination; the "SNAT" endpoint is a
/// public address and port (an ICMP echo's identifier stands in for the ports):
///
/// | key (as received)            | `src` (rewrite to) | `dst` (rewrite to) |
/// |------------------------------|--------------------|--------------------|
/// | private → destination        | public:port        | destination        |
/// | destination → public:port    | destination        | private            |
///
/// An ICMP error that quotes a packet of one direction is rewritten by the *other*
/// direction's entry, the one a reply to the quoted packet would take (`lb-ebpf/src/icmp.rs`).
///
/// The rewrite of an entry never changes; only its [`NatEntry`] bookkeeping does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub src: Endpoint,
    pub dst: Endpoint,
    /// Index into `SERVICE_STATS`.
    pub service_id: u32,
    /// Index into `BACKENDS` and `BACKEND_STATS`.
    pub backend_id: u32,
    /// [`DIR_TO_BACKEND`] or [`DIR_TO_CLIENT`].
    pub direction: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Rewrite>() == 48);

/// Conntrack value: one direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub rewrite: Rewrite,
    /// What both directions of the flow have carried; both entries hold the same, which
    /// gives the flow's state ([`FlowState`](crate::conntrack::FlowState)).
    pub seen: FlowSeen,
    /// The interface this direction's packets arrive on. A packet of the flow that arrives
    /// elsewhere is taken only if the source routes back out of that interface (the
    /// strict reverse-path rule), so a host on the wrong side cannot inject into the flow.
    pub ifindex: u32,
    /// How many times the flow has started anew (a client's SYN on a closed flow): the
    /// sweeper's count of its starts, for `ACTIVE`.
    pub generation: u32,
    /// When this direction last carried a packet, or the other direction one that told
    /// something new (`bpf_ktime_get_coarse_ns`, read once per CPU per tick:
    /// CLOCK_MONOTONIC up to two ticks behind), to within
    /// [`REFRESH_NS`](crate::conntrack::REFRESH_NS); the fresher of a flow's two entries
    /// tells when the flow last carried a packet, either way.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<NatEntry>() == 72);

impl NatEntry {
    /// The key of the flow's other entry: what a packet of the other direction carries.
    #[inline(always)]
    pub fn twin_key(&self, proto: u8) -> FlowKey {
        FlowKey {
            src: self.rewrite.dst,
            dst: self.rewrite.src,
            proto,
            _pad: 0,
        }
    }
}

/// Key of `SERVICES`: what a client sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: Endpoint,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

// A flow key ends with a service key: its destination, protocol and padding.
const _: () = assert!(
    core::mem::offset_of!(FlowKey, dst) + size_of::<ServiceKey>() == size_of::<FlowKey>()
        && core::mem::offset_of!(FlowKey, proto) - core::mem::offset_of!(FlowKey, dst)
            == core::mem::offset_of!(ServiceKey, proto)
        && core::mem::offset_of!(FlowKey, dst) % core::mem::align_of::<ServiceKey>() == 0
        && core::mem::align_of::<ServiceKey>() <= core::mem::align_of::<FlowKey>()
);

impl FlowKey {
    /// The `SERVICES` key of the service this key's packet is addressed to, if any: the
    /// key's own last 20 bytes, read in place (the data plane's lookup copies nothing onto
    /// its stack). The padding is the flow key's, which every key keeps zero.
    #[inline(always)]
    pub fn service_key(&self) -> &ServiceKey {
        // SAFETY: `dst`, `proto` and `_pad` are laid out as a `ServiceKey`'s `vip`, `proto`
        // and `_pad` (both `repr(C)`), at an offset aligned for one (checked above), and
        // live as long as self.
        unsafe { &*(core::ptr::addr_of!(self.dst) as *const ServiceKey) }
    }
}

/// [`ServiceEntry::mode`]: full NAT — rewrite the destination to the backend and the source to
/// the service's SNAT address and an allocated port.
pub const MODE_FULLNAT: u32 = 1;
/// [`ServiceEntry::mode`]: destination NAT only — rewrite the destination to the backend and
/// keep the client's address and port, so the backend sees who connects. The backend must
/// route its replies through xlb, which rewrites their source back to the VIP.
pub const MODE_DNAT: u32 = 2;
/// [`ServiceEntry::mode`] of a NAT gateway (`names::GATEWAYS`): keep the destination, rewrite
/// the source to an address of the pool and an allocated port (for an ICMP echo, its
/// identifier). A UDP flow keeps its private endpoint's mapping (`names::MAPPINGS`).
pub const MODE_GATEWAY: u32 = 3;

/// Key of `MAPPINGS`: an endpoint on one side of a NAT gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MappingKey {
    pub endpoint: Endpoint,
    /// IP protocol number.
    pub proto: u8,
    /// [`MAPPING_PRIVATE`] or [`MAPPING_PUBLIC`]: which side `endpoint` is on.
    pub side: u8,
}
const _: () = assert!(size_of::<MappingKey>() == 20);

/// [`MappingKey::side`]: a private host's endpoint; the value is its public one.
pub const MAPPING_PRIVATE: u8 = 0;
/// [`MappingKey::side`]: a public endpoint; the value is the private one it belongs to.
pub const MAPPING_PUBLIC: u8 = 1;

/// Value of `MAPPINGS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// The endpoint on the other side.
    pub endpoint: Endpoint,
    pub _pad: [u8; 6],
    /// When a flow last took the mapping (`bpf_ktime_get_coarse_ns`, as
    /// [`NatEntry::last_seen_ns`]): the sweeper keeps a mapping
    /// taken after its sweep began, whose flow it may not have seen yet.
    pub taken_ns: u64,
}
const _: () = assert!(size_of::<Mapping>() == 32);

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The SNAT pool: source addresses toward backends, the first `snat_count` in use, each
    /// with port 0 (a flow gets a port of its own); none in [`MODE_DNAT`]. Endpoints rather
    /// than addresses, so the new-flow path can point at one where it needs an endpoint,
    /// instead of building one on the stack.
    pub snat: [Endpoint; MAX_SNAT_ADDRESSES],
    /// How many of `snat` are in use: 1 to [`MAX_SNAT_ADDRESSES`] in [`MODE_FULLNAT`].
    pub snat_count: u32,
    /// The service's id: the index of its `SERVICE_STATS` entry. It owns Maglev tables
    /// `2 × id` and `2 × id + 1`.
    pub id: u32,
    /// One of the `MODE_*` constants.
    pub mode: u32,
    /// The table new flows use now: `2 × id` or `2 × id + 1`.
    pub table: u32,
    /// How a new flow picks its slot of the table: one of the constants of
    /// [`scheduler`](crate::scheduler).
    pub scheduler: u32,
    /// For the least-* schedulers: the first `count` slots of the table list the backends
    /// that take new flows (at most [`MAX_LEAST_BACKENDS`](crate::scheduler::MAX_LEAST_BACKENDS)).
    pub count: u32,
    /// [`SERVICE_QUIC`](crate::quic::SERVICE_QUIC), or 0.
    pub flags: u32,
    /// The source ports new flows take (host byte order): `port_count` from `port_first`.
    /// Unused in [`MODE_DNAT`].
    pub port_first: u32,
    pub port_count: u32,
}
const _: () = assert!(size_of::<ServiceEntry>() == 180);

impl ServiceEntry {
    /// The first slot of the Maglev table in use, in the whole `MAGLEV` array.
    #[inline(always)]
    pub fn first_slot(&self, maglev_size: u32) -> u32 {
        self.table * maglev_size
    }
}

/// Value of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry {
    pub endpoint: Endpoint,
    /// [`BACKEND_RETIRED`] or 0; the data plane does not read it.
    pub flags: u8,
    pub _pad: u8,
    /// The service this backend belongs to.
    pub service_id: u32,
    /// Its weight (for the least-* schedulers).
    pub weight: u32,
    /// Its smoothed response time in microseconds, from the daemon's health checks; 0 when
    /// not measured (least-response-time then counts it as 1).
    pub latency_us: u32,
}
const _: () = assert!(size_of::<BackendEntry>() == 32);

/// [`BackendEntry::flags`]: the backend was removed from its service, and its id waits for
/// the flows still on it to end. A restart that finds two ids for one address in a service
/// (the backend added again meanwhile) keeps the other.
pub const BACKEND_RETIRED: u8 = 1;

/// The single entry of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Slots per service in `MAGLEV` (a prime; 65537 by default).
    pub maglev_size: u32,
    /// Seed of the flow hash. Nodes that share traffic behind ECMP must use the same seed.
    pub hash_seed: u32,
    /// [`LAYOUT_VERSION`] of the daemon that wrote it.
    pub layout_version: u32,
    /// The source MAC of the frames the XDP program hands to the tc program
    /// ([`handoff_mark`]): random, made once with the maps and kept with them, never zero.
    pub handoff_secret: [u8; 6],
    /// [`FREED_IDS_CLEARED`] (0 in maps an older daemon wrote) and [`NO_GATEWAYS`]; the
    /// data plane reads only the latter.
    pub flags: u8,
    pub _pad: u8,
}

/// [`Settings::flags`]: the daemon that wrote the maps clears a service id's counters when
/// it frees the id, so a restart can take counters under an id that nothing holds for flows
/// of a removed object that still run (a NAT gateway's).
pub const FREED_IDS_CLEARED: u8 = 1;
/// [`Settings::flags`]: `GATEWAYS` holds no NAT gateway, so the data plane skips its two
/// longest-prefix lookups for each packet that is no service's. The daemon clears it before
/// it adds a gateway and sets it once the last is gone; maps an older daemon wrote lack it,
/// and the lookups are made.
pub const NO_GATEWAYS: u8 = 2;
const _: () = assert!(size_of::<Settings>() == 20);

/// Value of `SERVICE_STATS` and `BACKEND_STATS` (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets and bytes (whole frames) client → backend.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Packets and bytes (whole frames) backend → client.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Flows created (new conntrack entry pairs).
    pub flows: u64,
}
const _: () = assert!(size_of::<FlowStats>() == 40);

impl FlowStats {
    pub fn add(&mut self, other: &FlowStats) {
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        self.flows += other.flows;
    }
}

/// How the XDP program hands a frame to the tc program: the frame is rewritten and its TTL
/// lowered, but xlb cannot send it itself (its next hop's MAC is not resolved yet, or it
/// leaves by an interface without xlb's XDP program), so it goes to the kernel (XDP_PASS)
/// with this mark in place of its MACs, which the kernel's neighbour output writes anew
/// anyway: the destination MAC [`DMAC`](handoff_mark::DMAC), and as source MAC the data
/// plane's secret, [`Settings::handoff_secret`]. The tc program asks the FIB the way the
/// XDP program did (the same input lookup, on the same frame) and sends a marked frame
/// with `bpf_redirect_neigh` to the next hop it names, through the kernel's neighbour
/// output, which resolves the MAC and queues the frame meanwhile. That path skips the
/// kernel's input route checks, which drop a forwarded frame whose source is one of the
/// host's own addresses (a SNAT address or a VIP on the host).
///
/// The mark is in the frame, not in XDP metadata: every driver and kernel keeps a frame's
/// bytes, where some refuse metadata (`bpf_xdp_adjust_meta`) altogether. A frame from the
/// wire that comes with the mark's destination MAC is dropped by the XDP program, which
/// sees every frame before tc does (`drop/forged_handoff`); the secret covers the ways
/// around it (a frame redirected into the interface by another program, which skips
/// XDP).
pub mod handoff_mark {
    /// The destination MAC of a handed-off frame: locally administered, unicast ("xlbho"),
    /// so without the tc program the kernel drops it as addressed to another host.
    pub const DMAC: [u8; 6] = [0x02, b'x', b'l', b'b', b'h', b'o'];
}

/// Indexes of `HANDOFFS`: what the tc program did with handed-off frames.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff {
    /// Sent with `bpf_redirect_neigh`.
    Sent = 0,
    /// `bpf_redirect_neigh` refused it (dropped).
    Failed = 1,
}

impl Handoff {
    pub const COUNT: u32 = 2;
    pub const ALL: [Handoff; 2] = [Handoff::Sent, Handoff::Failed];
    pub const fn name(self) -> &'static str {
        match self {
            Handoff::Sent => "sent",
            Handoff::Failed => "failed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), made only of integers and byte arrays, with explicit
    // padding fields and size assertions above, so any bit pattern is valid and no byte is
    // uninitialised.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for Rewrite {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendEntry {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowStats {}
    unsafe impl aya::Pod for MappingKey {}
    unsafe impl aya::Pod for Mapping {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_their_family() {
        // RFC 4291 section 2.5.5.2: ::ffff:192.0.2.1 is 80 zero bits, 16 one bits, the address.
        let v4: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let e = Endpoint::from_socket(v4);
        assert_eq!(
            e.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
        assert_eq!(e.port, [0, 80]);
        assert!(e.is_v4());
        assert_eq!(e.to_socket(), v4);
        assert_eq!(e, Endpoint::v4([192, 0, 2, 1], [0, 80]));

        let v6: SocketAddr = "[2001:db8::100]:443".parse().unwrap();
        let e = Endpoint::from_socket(v6);
        assert_eq!(e.addr[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(e.addr[14..], [0x01, 0x00]);
        assert!(!e.is_v4());
        assert_eq!(e.to_socket(), v6);
    }

    #[test]
    fn a_flow_keys_service_key_is_its_destination_and_protocol() {
        let key = FlowKey {
            src: Endpoint::v4([10, 10, 1, 2], [0x9c, 0x40]),
            dst: Endpoint::v4([10, 10, 0, 100], [0, 80]),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let expected = ServiceKey {
            vip: Endpoint::v4([10, 10, 0, 100], [0, 80]),
            proto: PROTO_TCP,
            _pad: 0,
        };
        assert_eq!(*key.service_key(), expected);
    }
}
