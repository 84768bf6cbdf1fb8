//! Kernel-managed neighbour entries for the backends' next hops.
//!
//! The XDP program asks the kernel FIB (`bpf_fib_lookup`) for the MAC of the next hop toward a
//! backend. That helper only reads the neighbour table: when the next hop has no valid entry
//! the fast path cannot send, and handing the packet to the kernel so that it resolves the
//! neighbour does not work either once the packet's source is one of the host's own addresses
//! (the kernel drops it as a martian first). So the control plane installs *managed* entries:
//! `NTF_EXT_MANAGED` in `NDA_FLAGS_EXT` (Linux 5.16, "net, neigh: Add NTF_MANAGED flag for
//! managed neighbor entries") makes the kernel resolve the entry by itself and re-probe it,
//! and `NTF_EXT_LEARNED` keeps the kernel's garbage collector away from it. This is what
//! `ip neigh replace ADDR dev IF managed extern_learn` does.
//!
//! Everything here goes through rtnetlink in the network namespace of the calling thread, on
//! the current tokio runtime (each call opens its own socket and drives it with a task).
//! Backends of either family: the route lookup asks in the backend's family (`AF_INET6` and
//! a /128 for an IPv6 one, see `route_query`), and the neighbour messages carry the next
//! hop's own family, which need not be the backend's (an IPv4 route may have an IPv6
//! gateway, `via inet6`; an IPv6 route's gateway is usually link-local). An IPv6 next hop's
//! managed entry is an NDP one, which the kernel resolves and re-probes the same way.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
    NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia,
};

use crate::netlink::{Netlink, link_by_index, link_name};

/// How often [`ManagedNeighbours::wait_resolved`] reads the neighbour table again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The kernel-managed neighbour entries xlb installed for its backends' next hops.
///
/// Made by [`ManagedNeighbours::install`]; [`ManagedNeighbours::remove`] deletes the entries
/// this instance created. Dropping it without calling `remove` leaves the entries in the
/// kernel, which keeps resolving them (a later `install` finds and reuses them, but as
/// [`Entry::AlreadyManaged`], so it will not delete them).
#[derive(Debug)]
pub struct ManagedNeighbours {
    next_hops: Vec<NextHop>,
    unroutable: Vec<Unroutable>,
}

/// One next hop toward one or more backends: the neighbour a packet to those backends is
/// sent to, on the interface it leaves through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// The neighbour's address: the route's gateway, or the backend itself when it is on a
    /// directly connected network.
    pub address: IpAddr,
    /// The output interface of the route.
    pub ifindex: u32,
    /// The output interface's name, for logs.
    pub interface: String,
    /// The backends whose route goes through this next hop, in the order they were given.
    pub backends: Vec<IpAddr>,
    /// What was in the neighbour table for this next hop, and so what xlb did about it.
    pub entry: Entry,
}

/// What [`ManagedNeighbours::install`] found in the neighbour table for a next hop and did
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// This instance installed the managed entry, and [`ManagedNeighbours::remove`] deletes it.
    /// Either there was no entry, or there was one the kernel had made by itself that held no
    /// link-layer address yet (`INCOMPLETE`, `FAILED`, `NONE`, without `extern_learn`):
    /// replacing such an entry loses nothing, and leaving it would leave the next hop
    /// unmanaged for as long as the kernel keeps it around.
    Created,
    /// A managed entry was already there (an earlier run of xlb, another instance, an
    /// operator). It is used as it is and never deleted by this instance.
    AlreadyManaged,
    /// An entry that is not managed was already there and is left exactly as it is: a
    /// `PERMANENT` or `NOARP` one set by an operator, an entry the kernel learned and that
    /// holds an address (`REACHABLE`, `STALE`, `DELAY`, `PROBE`), or one some other agent
    /// installed with `extern_learn`. xlb does not make it managed: the kernel ages a learned
    /// entry as usual, and traffic to the backend (health checks) refreshes it.
    NotManaged {
        /// The entry's state when `install` found it.
        state: NudState,
    },
}

/// A backend [`ManagedNeighbours::install`] could not find a next hop for. This is reported,
/// not an error of the whole call: one unroutable backend must not stop the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unroutable {
    /// The backend's address.
    pub address: IpAddr,
    /// Why: the kernel's answer to the route lookup, or the kind of route it found (a local
    /// address, a broadcast address, ...).
    pub reason: String,
}

/// The state of a neighbour entry: the kernel's `NUD_*` bits (`ndm_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NudState(pub u16);

impl NudState {
    const INCOMPLETE: u16 = 0x01;
    const REACHABLE: u16 = 0x02;
    const STALE: u16 = 0x04;
    const DELAY: u16 = 0x08;
    const PROBE: u16 = 0x10;
    const FAILED: u16 = 0x20;
    const NOARP: u16 = 0x40;
    const PERMANENT: u16 = 0x80;
    /// The kernel's `NUD_VALID`: the entry holds a link-layer address packets can be sent to,
    /// so `bpf_fib_lookup` finds it.
    const VALID: u16 =
        Self::PERMANENT | Self::NOARP | Self::REACHABLE | Self::PROBE | Self::STALE | Self::DELAY;
    const NAMES: [(u16, &'static str); 8] = [
        (Self::INCOMPLETE, "INCOMPLETE"),
        (Self::REACHABLE, "REACHABLE"),
        (Self::STALE, "STALE"),
        (Self::DELAY, "DELAY"),
        (Self::PROBE, "PROBE"),
        (Self::FAILED, "FAILED"),
        (Self::NOARP, "NOARP"),
        (Self::PERMANENT, "PERMANENT"),
    ];

    /// Whether the entry is resolved (`NUD_VALID`): `bpf_fib_lookup` can use it.
    pub fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    /// Whether an operator set the entry by hand (`PERMANENT`, `NOARP`): never replace it.
    fn is_static(self) -> bool {
        self.0 & (Self::PERMANENT | Self::NOARP) != 0
    }
}

impl fmt::Display for NudState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("NONE");
        }
        let mut first = true;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let unknown = self.0 & !Self::NAMES.iter().fold(0, |all, (bit, _)| all | bit);
        if unknown != 0 {
            write!(f, "{}{unknown:#x}", if first { "" } else { "," })?;
        }
        Ok(())
    }
}

impl fmt::Display for NextHop {
    /// `10.0.0.1 dev eth1 (ifindex 3), created, for 10.1.0.5, 10.1.0.6`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} dev {} (ifindex {}), ",
            self.address, self.interface, self.ifindex
        )?;
        match self.entry {
            Entry::Created => f.write_str("created")?,
            Entry::AlreadyManaged => f.write_str("already managed")?,
            Entry::NotManaged { state } => write!(f, "left as it was ({state}, not managed)")?,
        }
        f.write_str(", for ")?;
        for (i, backend) in self.backends.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{backend}")?;
        }
        Ok(())
    }
}

impl ManagedNeighbours {
    /// Installs a managed neighbour entry for the next hop of every address in `addrs`.
    ///
    /// For each address, finds its next hop the way the kernel routes a packet to it
    /// (`RTM_GETROUTE` for that destination, like `ip route get`): the route's gateway if it
    /// has one, else the address itself, and the route's output interface. For a multipath
    /// route that is the path the kernel picks for a flow without ports, which need not be
    /// the one `bpf_fib_lookup` picks for every flow.
    ///
    /// Then, for each distinct (next hop, interface), according to what the neighbour table
    /// holds (see [`Entry`]):
    /// * nothing: installs `managed extern_learn` ([`Entry::Created`]), with `NLM_F_EXCL`
    ///   so that an entry that appears meanwhile is never overwritten;
    /// * an entry the kernel made by itself that holds no address yet (`INCOMPLETE`,
    ///   `FAILED`): replaces it with a managed one ([`Entry::Created`]);
    /// * a managed entry: uses it ([`Entry::AlreadyManaged`]);
    /// * anything else, in particular `PERMANENT` entries and learned ones that hold an
    ///   address: leaves it exactly as it is ([`Entry::NotManaged`]).
    ///
    /// An address without a usable route (no route, a blackhole, a local address) is reported
    /// in [`ManagedNeighbours::unroutable`], not as an error. Errors are failures to talk to
    /// the kernel or to install an entry; entries created before such an error are deleted
    /// again. Fails on kernels older than 5.16, which do not know managed entries.
    pub async fn install(addrs: &[IpAddr]) -> anyhow::Result<ManagedNeighbours> {
        let netlink = Netlink::open()?;
        let mut routed = Vec::new();
        let mut unroutable = Vec::new();
        for &addr in addrs {
            match netlink.route_to(addr).await? {
                Ok(key) => routed.push((addr, key)),
                Err(reason) => {
                    if !unroutable.iter().any(|u: &Unroutable| u.address == addr) {
                        unroutable.push(Unroutable {
                            address: addr,
                            reason,
                        });
                    }
                }
            }
        }

        let mut names = HashMap::new();
        let mut next_hops = Vec::new();
        for (key, backends) in group_by_next_hop(&routed) {
            let interface = match names.get(&key.ifindex) {
                Some(name) => String::clone(name),
                None => {
                    let name = netlink.interface_name(key.ifindex).await?;
                    names.insert(key.ifindex, name.clone());
                    name
                }
            };
            next_hops.push(NextHop {
                address: key.address,
                ifindex: key.ifindex,
                interface,
                backends,
                // Decided below, from the neighbour table.
                entry: Entry::AlreadyManaged,
            });
        }

        let mut installed = ManagedNeighbours {
            next_hops: Vec::with_capacity(next_hops.len()),
            unroutable,
        };
        for mut next_hop in next_hops {
            match netlink.claim(&next_hop).await {
                Ok(entry) => {
                    next_hop.entry = entry;
                    installed.next_hops.push(next_hop);
                }
                Err(error) => return Err(installed.undo(&netlink, error).await),
            }
        }
        if let Err(error) = installed.check_managed(&netlink).await {
            return Err(installed.undo(&netlink, error).await);
        }
        Ok(installed)
    }

    /// Waits until every next hop's entry is resolved (`NUD_VALID`: `REACHABLE`, `STALE`,
    /// `DELAY`, `PROBE`, or `PERMANENT`/`NOARP` for the entries left as they were) or
    /// `timeout` passes, and returns the next hops still unresolved then (a dead backend must
    /// not block start-up, so that is not an error). The kernel keeps probing the managed ones.
    pub async fn wait_resolved(&self, timeout: Duration) -> anyhow::Result<Vec<NextHop>> {
        let netlink = Netlink::open()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let table = netlink.neighbours(self.families()).await?;
            let unresolved: Vec<NextHop> = self
                .next_hops
                .iter()
                .filter(|hop| {
                    !table
                        .get(&NextHopKey::of(hop))
                        .is_some_and(|entry| entry.state.is_valid())
                })
                .cloned()
                .collect();
            if unresolved.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(unresolved);
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL_INTERVAL))
                .await;
        }
    }

    /// Deletes the entries this instance created ([`Entry::Created`]), and only those, e.g.
    /// at shutdown. An entry that is gone already is fine; one that is no longer managed
    /// (an operator replaced it meanwhile) is left alone. Tries every entry, then reports
    /// every failure.
    pub async fn remove(self) -> anyhow::Result<()> {
        let netlink = Netlink::open()?;
        let errors = self.delete_created(&netlink, Leave::Unmanaged).await;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "removing managed neighbour entries:\n{}",
                errors
                    .iter()
                    .map(|e| format!("{e:#}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ))
        }
    }

    /// Keeps the next hops `keep` says to keep, and lets go of the others: deletes the
    /// entries this instance created for them (as [`remove`](Self::remove) does), and
    /// forgets them. For backends that are gone: a managed entry for a host nobody sends to
    /// any more would be probed by the kernel for ever. Tries every entry, then reports
    /// every failure.
    pub async fn retain(&mut self, keep: impl Fn(&NextHop) -> bool) -> anyhow::Result<()> {
        let (kept, gone): (Vec<NextHop>, Vec<NextHop>) = std::mem::take(&mut self.next_hops)
            .into_iter()
            .partition(|h| keep(h));
        self.next_hops = kept;
        if gone.is_empty() {
            return Ok(());
        }
        let released = ManagedNeighbours {
            next_hops: gone,
            unroutable: Vec::new(),
        };
        released.remove().await
    }

    /// What is managed, for logs: each next hop, its interface, the backends behind it and
    /// what `install` did about it (its `Display` prints all that on one line).
    pub fn next_hops(&self) -> &[NextHop] {
        &self.next_hops
    }

    /// The addresses `install` found no next hop for, and why.
    pub fn unroutable(&self) -> &[Unroutable] {
        &self.unroutable
    }

    fn families(&self) -> Vec<AddressFamily> {
        let mut families = Vec::new();
        for hop in &self.next_hops {
            let family = family_of(hop.address);
            if !families.contains(&family) {
                families.push(family);
            }
        }
        families
    }

    /// Checks that the kernel kept the managed flag on the entries created: kernels before
    /// 5.16 ignore `NDA_FLAGS_EXT` and make a plain entry instead.
    async fn check_managed(&self, netlink: &Netlink) -> anyhow::Result<()> {
        let table = netlink.neighbours(self.families()).await?;
        for hop in self.next_hops.iter().filter(|h| h.entry == Entry::Created) {
            match table.get(&NextHopKey::of(hop)) {
                Some(entry) if entry.managed => {}
                Some(_) => {
                    return Err(anyhow::Error::new(Unsupported).context(format!(
                        "the kernel installed the neighbour entry for {} dev {} without the \
                         managed flag",
                        hop.address, hop.interface
                    )));
                }
                None => bail!(
                    "the managed neighbour entry for {} dev {} disappeared right after it was \
                     installed",
                    hop.address,
                    hop.interface
                ),
            }
        }
        Ok(())
    }

    /// Deletes what was created so far after `error`, and returns `error` with any failure of
    /// that clean-up added.
    async fn undo(self, netlink: &Netlink, error: anyhow::Error) -> anyhow::Error {
        // Just created, so ours even if not managed (a kernel that ignored the flag).
        let cleanup = self.delete_created(netlink, Leave::Nothing).await;
        if cleanup.is_empty() {
            error
        } else {
            let cleanup: Vec<String> = cleanup.iter().map(|e| format!("{e:#}")).collect();
            error.context(format!(
                "and the entries created before could not all be deleted again: {}",
                cleanup.join("; ")
            ))
        }
    }

    /// Deletes the entries this instance created, except those `leave` says to leave.
    async fn delete_created(&self, netlink: &Netlink, leave: Leave) -> Vec<anyhow::Error> {
        let mut errors = Vec::new();
        let table = match netlink.neighbours(self.families()).await {
            Ok(table) => table,
            Err(error) => return vec![error],
        };
        for hop in self.next_hops.iter().filter(|h| h.entry == Entry::Created) {
            match table.get(&NextHopKey::of(hop)) {
                None => {}
                Some(entry) if !entry.managed && leave == Leave::Unmanaged => log::warn!(
                    "neighbour entry {} dev {} is no longer managed ({}): someone replaced it, \
                     leaving it",
                    hop.address,
                    hop.interface,
                    entry.state
                ),
                Some(_) => {
                    if let Err(error) = netlink.delete(hop).await {
                        errors.push(error);
                    }
                }
            }
        }
        errors
    }
}

/// Which of the entries it created [`ManagedNeighbours::delete_created`] leaves in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Those no longer managed: someone replaced them since.
    Unmanaged,
    /// None.
    Nothing,
}

/// The error of [`ManagedNeighbours::install`] on a kernel that does not know managed
/// entries: no use trying again.
#[derive(Debug, thiserror::Error)]
#[error("managed neighbour entries (NTF_EXT_MANAGED) need Linux 5.16 or later")]
pub struct Unsupported;

/// A next hop as the neighbour table knows it: an address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NextHopKey {
    address: IpAddr,
    ifindex: u32,
}

impl NextHopKey {
    fn of(hop: &NextHop) -> Self {
        NextHopKey {
            address: hop.address,
            ifindex: hop.ifindex,
        }
    }
}

/// Groups backends by next hop, in the order each next hop first appears, each backend once.
fn group_by_next_hop(routed: &[(IpAddr, NextHopKey)]) -> Vec<(NextHopKey, Vec<IpAddr>)> {
    let mut groups: Vec<(NextHopKey, Vec<IpAddr>)> = Vec::new();
    for &(backend, key) in routed {
        let backends = match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, backends)) => backends,
            None => {
                groups.push((key, Vec::new()));
                &mut groups.last_mut().expect("just pushed").1
            }
        };
        if !backends.contains(&backend) {
            backends.push(backend);
        }
    }
    groups
}

/// The next hop of the route the kernel answered for `dst`, or why there is none.
fn next_hop_of(dst: IpAddr, route: &RouteMessage) -> Result<NextHopKey, String> {
    let kind = route.header.kind;
    if kind != RouteType::Unicast {
        return Err(format!("the route to it is of type {kind:?}, not unicast"));
    }
    let mut gateway = None;
    let mut ifindex = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            _ => {}
        }
    }
    match ifindex {
        Some(ifindex) => Ok(NextHopKey {
            address: gateway.unwrap_or(dst),
            ifindex,
        }),
        None => Err("the route to it has no output interface".to_string()),
    }
}

/// `ip route get DST`: an `RTM_GETROUTE` in `dst`'s family for the host route to it. With a
/// destination, rtnetlink sends it without `NLM_F_DUMP`, so the kernel answers with the one
/// route it would use.
fn route_query(dst: IpAddr) -> RouteMessage {
    let mut query = RouteMessage::default();
    query.header.address_family = family_of(dst);
    query.header.destination_prefix_length = match dst {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    query
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    query
}

/// What to do about a next hop, given its entry in the neighbour table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// No entry: create one, exclusively.
    Create,
    /// An entry the kernel made that holds no address: replace it with a managed one.
    TakeOver,
    /// Use the entry as it is.
    Keep(Entry),
}

fn plan(existing: Option<&Neighbour>) -> Plan {
    let Some(entry) = existing else {
        return Plan::Create;
    };
    if entry.managed {
        Plan::Keep(Entry::AlreadyManaged)
    } else if !entry.state.is_valid() && !entry.state.is_static() && !entry.extern_learned {
        Plan::TakeOver
    } else {
        Plan::Keep(Entry::NotManaged { state: entry.state })
    }
}

/// The part of a neighbour table entry this module looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Neighbour {
    state: NudState,
    managed: bool,
    extern_learned: bool,
}

/// The key and state of a neighbour message from the kernel; `None` for one without a
/// destination address (the kernel always sends one for ARP and NDP entries).
fn parse_neighbour(message: &NeighbourMessage) -> Option<(NextHopKey, Neighbour)> {
    let mut address = None;
    let mut managed = false;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                address = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                address = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::ExtFlags(flags) => {
                managed = flags.contains(NeighbourExtFlags::Managed)
            }
            _ => {}
        }
    }
    let key = NextHopKey {
        address: address?,
        ifindex: message.header.ifindex,
    };
    let entry = Neighbour {
        state: NudState(u16::from(message.header.state)),
        managed,
        extern_learned: message.header.flags.contains(NeighbourFlags::ExtLearned),
    };
    Some((key, entry))
}

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The errno of a netlink error answer, if that is what `error` is.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

/// The neighbour and route queries of this module.
impl Netlink {
    /// The next hop toward `dst`; the inner `Err` says why there is none (the kernel found no
    /// usable route), the outer one is a failure to ask.
    async fn route_to(&self, dst: IpAddr) -> anyhow::Result<Result<NextHopKey, String>> {
        let answer = self
            .handle
            .route()
            .get(route_query(dst))
            .execute()
            .try_next()
            .await;
        Ok(match answer {
            Ok(Some(route)) => next_hop_of(dst, &route),
            Ok(None) => Err("the kernel answered the route lookup with nothing".to_string()),
            // ENETUNREACH (no route), EHOSTUNREACH (`unreachable`), EINVAL (`blackhole`),
            // EACCES (`prohibit`): an answer about this address.
            Err(rtnetlink::Error::NetlinkError(message)) => Err(format!("no route: {message}")),
            Err(error) => {
                return Err(error).with_context(|| format!("looking up the route to {dst}"));
            }
        })
    }

    async fn interface_name(&self, ifindex: u32) -> anyhow::Result<String> {
        link_name(&link_by_index(&self.handle, ifindex).await?)
    }

    /// The neighbour tables of `families`.
    async fn neighbours(
        &self,
        families: Vec<AddressFamily>,
    ) -> anyhow::Result<HashMap<NextHopKey, Neighbour>> {
        let mut table = HashMap::new();
        for family in families {
            let messages: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .with_context(|| format!("reading the {family:?} neighbour table"))?;
            table.extend(messages.iter().filter_map(parse_neighbour));
        }
        Ok(table)
    }

    async fn neighbour(&self, key: NextHopKey) -> anyhow::Result<Option<Neighbour>> {
        Ok(self
            .neighbours(vec![family_of(key.address)])
            .await?
            .remove(&key))
    }

    /// Makes `hop` managed if it is ours to make managed; says what it found and did.
    async fn claim(&self, hop: &NextHop) -> anyhow::Result<Entry> {
        let key = NextHopKey::of(hop);
        let mut existing = self.neighbour(key).await?;
        // Twice at most: when an exclusive create finds that an entry appeared since the
        // table was read, read it again and decide about that entry instead.
        for _ in 0..2 {
            let replace = match plan(existing.as_ref()) {
                Plan::Keep(entry) => return Ok(entry),
                Plan::Create => false,
                Plan::TakeOver => true,
            };
            match self.add_managed(key, replace).await {
                Ok(()) => return Ok(Entry::Created),
                Err(error) if !replace && errno(&error) == Some(libc::EEXIST) => {
                    existing = self.neighbour(key).await?;
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "installing a managed neighbour entry for {} dev {} (for backends {:?})",
                            hop.address, hop.interface, hop.backends
                        )
                    });
                }
            }
        }
        bail!(
            "the neighbour entry for {} dev {} keeps changing under xlb's feet",
            hop.address,
            hop.interface
        )
    }

    /// `ip neigh add|replace ADDR dev IF managed extern_learn`. Without `replace` the request
    /// carries `NLM_F_EXCL` and fails with `EEXIST` on any existing entry.
    async fn add_managed(&self, key: NextHopKey, replace: bool) -> Result<(), rtnetlink::Error> {
        let mut request = self
            .handle
            .neighbours()
            .add(key.ifindex, key.address)
            // The kernel sets the state of a managed entry itself; NONE is what iproute2 sends.
            .state(NeighbourState::None)
            .flags(NeighbourFlags::ExtLearned);
        request
            .message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        if replace {
            request = request.replace();
        }
        request.execute().await
    }

    async fn delete(&self, hop: &NextHop) -> anyhow::Result<()> {
        let mut message = NeighbourMessage::default();
        message.header.family = family_of(hop.address);
        message.header.ifindex = hop.ifindex;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match hop.address {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        match self.handle.neighbours().del(message).execute().await {
            Ok(()) => Ok(()),
            // Gone meanwhile: what we wanted.
            Err(error) if errno(&error) == Some(libc::ENOENT) => Ok(()),
            Err(error) => Err(error).with_context(|| {
                format!(
                    "deleting the managed neighbour entry for {} dev {}",
                    hop.address, hop.interface
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    fn key(address: &str, ifindex: u32) -> NextHopKey {
        NextHopKey {
            address: v4(address),
            ifindex,
        }
    }

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.kind = kind;
        route.attributes = attributes;
        route
    }

    #[test]
    fn backends_are_grouped_by_next_hop_in_first_seen_order() {
        let routed = [
            (v4("10.1.0.5"), key("10.0.0.1", 3)),
            (v4("10.0.0.7"), key("10.0.0.7", 3)),
            (v4("10.1.0.6"), key("10.0.0.1", 3)),
            // Same gateway address on another interface: another next hop.
            (v4("10.2.0.5"), key("10.0.0.1", 4)),
            // A backend given twice is listed once.
            (v4("10.1.0.5"), key("10.0.0.1", 3)),
        ];
        let groups = group_by_next_hop(&routed);
        assert_eq!(
            groups,
            vec![
                (key("10.0.0.1", 3), vec![v4("10.1.0.5"), v4("10.1.0.6")]),
                (key("10.0.0.7", 3), vec![v4("10.0.0.7")]),
                (key("10.0.0.1", 4), vec![v4("10.2.0.5")]),
            ]
        );
        assert!(group_by_next_hop(&[]).is_empty());
    }

    #[test]
    fn next_hop_is_the_gateway_or_else_the_destination() {
        let via = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet("10.1.0.5".parse().unwrap())),
                RouteAttribute::Gateway(RouteAddress::Inet("10.0.0.1".parse().unwrap())),
                RouteAttribute::Oif(3),
            ],
        );
        assert_eq!(next_hop_of(v4("10.1.0.5"), &via), Ok(key("10.0.0.1", 3)));

        let direct = route(RouteType::Unicast, vec![RouteAttribute::Oif(4)]);
        assert_eq!(next_hop_of(v4("10.0.0.7"), &direct), Ok(key("10.0.0.7", 4)));

        let via_inet6 = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Via(RouteVia::Inet6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))),
                RouteAttribute::Oif(5),
            ],
        );
        assert_eq!(
            next_hop_of(v4("10.1.0.5"), &via_inet6),
            Ok(NextHopKey {
                address: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
                ifindex: 5,
            })
        );
    }

    #[test]
    fn an_ipv6_backend_is_routed_in_its_own_family() {
        let backend: IpAddr = "2001:db8:20::2".parse().unwrap();
        let query = route_query(backend);
        assert_eq!(query.header.address_family, AddressFamily::Inet6);
        assert_eq!(query.header.destination_prefix_length, 128);
        assert_eq!(
            query.attributes,
            vec![RouteAttribute::Destination(RouteAddress::Inet6(
                "2001:db8:20::2".parse().unwrap()
            ))]
        );
        let v4 = route_query(v4("10.1.0.5"));
        assert_eq!(
            (
                v4.header.address_family,
                v4.header.destination_prefix_length
            ),
            (AddressFamily::Inet, 32)
        );

        // Behind a router, whose address is link-local: the next hop is the router there.
        let router: IpAddr = "fe80::1".parse().unwrap();
        let mut via = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet6("fe80::1".parse().unwrap())),
                RouteAttribute::Oif(3),
            ],
        );
        via.header.address_family = AddressFamily::Inet6;
        assert_eq!(
            next_hop_of(backend, &via),
            Ok(NextHopKey {
                address: router,
                ifindex: 3
            })
        );
        // On the link: the backend itself.
        let direct = route(RouteType::Unicast, vec![RouteAttribute::Oif(4)]);
        assert_eq!(
            next_hop_of(backend, &direct),
            Ok(NextHopKey {
                address: backend,
                ifindex: 4
            })
        );
        let mut hop = NeighbourMessage::default();
        hop.header.family = AddressFamily::Inet6;
        hop.header.ifindex = 3;
        hop.header.state = NeighbourState::Stale;
        hop.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet6(
            "fe80::1".parse().unwrap(),
        ))];
        assert_eq!(
            parse_neighbour(&hop),
            Some((
                NextHopKey {
                    address: router,
                    ifindex: 3
                },
                neighbour(0x04, false, false)
            ))
        );
    }

    #[test]
    fn local_broadcast_and_interfaceless_routes_have_no_next_hop() {
        let local = route(RouteType::Local, vec![RouteAttribute::Oif(1)]);
        assert!(
            next_hop_of(v4("10.0.0.2"), &local)
                .unwrap_err()
                .contains("Local")
        );
        let broadcast = route(RouteType::Broadcast, vec![RouteAttribute::Oif(3)]);
        assert!(next_hop_of(v4("10.0.0.255"), &broadcast).is_err());
        let no_oif = route(RouteType::Unicast, vec![]);
        assert!(
            next_hop_of(v4("10.0.0.7"), &no_oif)
                .unwrap_err()
                .contains("output interface")
        );
    }

    fn neighbour(state: u16, managed: bool, extern_learned: bool) -> Neighbour {
        Neighbour {
            state: NudState(state),
            managed,
            extern_learned,
        }
    }

    #[test]
    fn plan_creates_takes_over_or_keeps() {
        assert_eq!(plan(None), Plan::Create);
        // Managed already, whatever its state.
        for state in [0x01, 0x02, 0x20] {
            assert_eq!(
                plan(Some(&neighbour(state, true, true))),
                Plan::Keep(Entry::AlreadyManaged)
            );
        }
        // Kernel-made entries without an address: ours to take over.
        for state in [0x00, 0x01, 0x20] {
            assert_eq!(plan(Some(&neighbour(state, false, false))), Plan::TakeOver);
        }
        // Entries holding an address, set by hand, or by another agent: left alone.
        for (state, extern_learned) in [
            (0x80, false),
            (0x40, false),
            (0x02, false),
            (0x04, false),
            (0x08, false),
            (0x10, false),
            (0x01, true),
            (0x20, true),
        ] {
            assert_eq!(
                plan(Some(&neighbour(state, false, extern_learned))),
                Plan::Keep(Entry::NotManaged {
                    state: NudState(state)
                })
            );
        }
    }

    #[test]
    fn nud_valid_is_the_kernels() {
        let valid: Vec<u16> = (0..8)
            .map(|bit| 1u16 << bit)
            .filter(|&s| NudState(s).is_valid())
            .collect();
        // REACHABLE, STALE, DELAY, PROBE, NOARP, PERMANENT.
        assert_eq!(valid, vec![0x02, 0x04, 0x08, 0x10, 0x40, 0x80]);
        assert!(!NudState(0).is_valid());
        assert_eq!(NudState(0).to_string(), "NONE");
        assert_eq!(NudState(0x80).to_string(), "PERMANENT");
        assert_eq!(NudState(0x22).to_string(), "REACHABLE,FAILED");
        assert_eq!(NudState(0x102).to_string(), "REACHABLE,0x100");
    }

    #[test]
    fn neighbour_messages_are_parsed() {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = 3;
        message.header.state = NeighbourState::Reachable;
        message.header.flags = NeighbourFlags::ExtLearned;
        message.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet("10.0.0.1".parse().unwrap())),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]),
            NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed),
        ];
        assert_eq!(
            parse_neighbour(&message),
            Some((key("10.0.0.1", 3), neighbour(0x02, true, true)))
        );

        message.header.flags = NeighbourFlags::empty();
        message.header.state = NeighbourState::Permanent;
        message.attributes.pop();
        assert_eq!(
            parse_neighbour(&message),
            Some((key("10.0.0.1", 3), neighbour(0x80, false, false)))
        );

        message.attributes.clear();
        assert_eq!(parse_neighbour(&message), None);
    }

    #[test]
    fn next_hop_prints_on_one_line() {
        let hop = NextHop {
            address: v4("10.0.0.1"),
            ifindex: 3,
            interface: "eth1".to_string(),
            backends: vec![v4("10.1.0.5"), v4("10.1.0.6")],
            entry: Entry::NotManaged {
                state: NudState(0x80),
            },
        };
        assert_eq!(
            hop.to_string(),
            "10.0.0.1 dev eth1 (ifindex 3), left as it was (PERMANENT, not managed), for \
             10.1.0.5, 10.1.0.6"
        );
    }
}
