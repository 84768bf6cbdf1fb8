//! Loads the embedded object (the XDP program and the tc handoff program) with map sizes
//! from the config, attaches both to the configured interfaces, and detaches when dropped.

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMapHash, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use lb_common::{
    maps::{names, programs},
    reason::Reason,
};

use std::{net::IpAddr, path::Path};

use crate::{
    config::{Checked, XdpModeConfig},
    footprint::Footprint,
    memory::Room,
    pins::PinDir,
};

/// The XDP object built by build.rs from lb-ebpf.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb"));

/// The XDP program's name in the object.
pub const PROGRAM: &str = programs::XDP;

/// A loaded program and the interfaces it is attached to. Dropping it detaches the program
/// and frees its maps — unless they are pinned ([`pins`](crate::pins)): then the program
/// stays attached and the maps stay, until the pins are removed.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub attached: Vec<Attachment>,
    /// Our handles on the pinned links.
    _links: Vec<FdLink>,
}

#[derive(Debug, Clone)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    /// "native" or "generic", or [`KEPT`] when the program replaced an older one in a
    /// pinned link, in whatever mode that link was made.
    pub mode: &'static str,
}

/// [`Attachment::mode`] of a program swapped into a pinned link.
pub const KEPT: &str = "kept";

/// Loads the object and the program into the kernel, sized for `cfg`, with maps of its
/// own; attaches nothing (for BPF_PROG_TEST_RUN).
pub fn load(cfg: &Checked) -> anyhow::Result<Ebpf> {
    load_with(cfg, None)
}

/// Loads the object onto the maps pinned in `pins` (pinning new ones there first if there
/// are none).
pub fn load_pinned(cfg: &Checked, pins: &PinDir) -> anyhow::Result<Ebpf> {
    load_with(cfg, Some(pins))
}

fn load_with(cfg: &Checked, pins: Option<&PinDir>) -> anyhow::Result<Ebpf> {
    // Adopted, the conntrack table is in memory already; made anew, it takes all of its
    // memory now.
    let fresh = !pins.is_some_and(|p| p.adopted);
    if fresh {
        check_memory(cfg, &Footprint::of(cfg)?, &crate::memory::room()?)?;
    } else {
        let cpus = crate::footprint::possible_cpus()?;
        let unpinned = crate::footprint::unpinned_bytes(cfg, cpus)?;
        check_unpinned_memory(unpinned, cpus, &crate::memory::room()?)?;
    }
    let mut loader = EbpfLoader::new();
    if let Some(pins) = pins {
        for name in names::PINNED {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    for (name, entries) in map_sizes(cfg) {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader.load(XDP_OBJECT).with_context(|| {
        let table = if fresh {
            format!(
                " Its conntrack table takes {} MiB now: lower [conntrack] entries if \
                     memory is short.",
                cfg.conntrack.table_bytes() >> 20
            )
        } else {
            String::new()
        };
        format!("loading the XDP object (are you root, with bpf() allowed?{table})")
    })?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .context("the XDP object has no program named xlb")?
        .try_into()?;
    program
        .load()
        .context("the kernel verifier rejected the XDP program")?;
    let handoff: &mut SchedClassifier = ebpf
        .program_mut(programs::TC_HANDOFF)
        .context("the object has no tc program named xlb_handoff")?
        .try_into()?;
    handoff
        .load()
        .context("the kernel verifier rejected the tc handoff program")?;
    Ok(ebpf)
}

/// The maps `cfg` sizes, with their entries; the others keep the object's sizes.
pub fn map_sizes(cfg: &Checked) -> [(&'static str, u32); 14] {
    let dataplane = &cfg.dataplane;
    [
        (names::SERVICES, dataplane.max_services),
        (names::VIPS, dataplane.max_services),
        (
            names::MAGLEV,
            dataplane.max_services * dataplane.maglev_table_size,
        ),
        (names::BACKENDS, dataplane.max_backends),
        (names::CONNTRACK, cfg.conntrack.map_entries()),
        (names::SERVICE_STATS, dataplane.max_services),
        (names::BACKEND_STATS, dataplane.max_backends),
        (names::REASONS, Reason::COUNT),
        (names::CURSORS, dataplane.max_services),
        (names::ACTIVE, dataplane.max_backends),
        (names::QUIC_SERVERS, dataplane.max_backends),
        (names::RELEASED, cfg.conntrack.entries),
        (names::GATEWAYS, dataplane.max_services),
        // A pair per UDP flow of a NAT gateway at most.
        (names::MAPPINGS, cfg.conntrack.map_entries()),
    ]
}

/// Refuses a data plane whose maps, made when xlb starts, take more than the memory xlb may
/// (`room`: the host's available memory, or a memory cgroup's room under its limit): the
/// conntrack table (preallocated) and the maps sized with it, the Maglev tables, and the
/// others (`footprint`, the maps of `cfg`), among them per-CPU arrays taken once per
/// possible CPU. The kernel would first squeeze the page cache, then fail with a bare "out
/// of memory" (or, under a cgroup's limit, kill xlb).
pub fn check_memory(cfg: &Checked, footprint: &Footprint, room: &Room) -> anyhow::Result<()> {
    if footprint.total() > room.bytes {
        bail!(
            "the data plane's maps take {} MiB of kernel memory when xlb starts: {} MiB of \
             conntrack for [conntrack] entries = {} flows (the table is preallocated), {} \
             MiB of Maglev tables for dataplane.max_services = {} × maglev_table_size = {}, \
             and {} MiB of other maps (for dataplane.max_backends = {} and the host's {} \
             possible CPUs); and {room}: lower them{}",
            footprint.total() >> 20,
            footprint.conntrack >> 20,
            cfg.conntrack.entries,
            footprint.maglev >> 20,
            cfg.dataplane.max_services,
            cfg.dataplane.maglev_table_size,
            footprint.others >> 20,
            cfg.dataplane.max_backends,
            footprint.cpus,
            room.limit.or_raise_it(),
        );
    }
    Ok(())
}

/// Refuses a restart that adopts the pinned maps when the maps it makes anew, `unpinned`
/// bytes on `cpus` possible CPUs (those of one program: the next-hop cache, the QUIC
/// server ids, the per-CPU scratch, the log buffer; `footprint::unpinned_bytes`), take
/// more than `room`. Nothing has changed yet: the running data
/// plane goes on as it is.
pub fn check_unpinned_memory(unpinned: u64, cpus: u64, room: &Room) -> anyhow::Result<()> {
    if unpinned > room.bytes {
        bail!(
            "adopting the pinned data plane, xlb makes its other maps anew, which take {:.1} \
             MiB of kernel memory on the host's {cpus} possible CPUs; and {room}: free some \
             memory{} (the running data plane is left as it is)",
            unpinned as f64 / f64::from(1 << 20),
            room.limit.or_raise_it(),
        );
    }
    Ok(())
}

/// Attaches the loaded program to every interface in `cfg` through links pinned in `pins` —
/// replacing the program in place where a link is pinned already — with the devmap (and the
/// veths' `NO_XDP_TX` marks) filled first, so the program forwards from its first packet.
/// Links pinned for interfaces no longer configured are unpinned, which detaches them.
pub fn attach(mut ebpf: Ebpf, cfg: &Checked, pins: &PinDir) -> anyhow::Result<Loaded> {
    let interfaces: Vec<(String, u32)> = cfg
        .dataplane
        .interfaces
        .iter()
        .map(|i| Ok((i.clone(), ifindex(i)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut devmap: DevMapHash<_> = ebpf
        .map_mut(names::DEVMAP)
        .context("map DEVMAP")?
        .try_into()?;
    for (interface, ifindex) in &interfaces {
        devmap
            .insert(*ifindex, *ifindex, None, 0)
            .with_context(|| format!("adding {interface} to the devmap"))?;
    }
    for (interface, ifindex) in &interfaces {
        if crate::ethtool::driver(interface)?.as_deref() == Some("veth") {
            no_xdp_tx(&mut ebpf, *ifindex)?;
        }
    }

    let mut attached = Vec::new();
    let mut links = Vec::new();
    for (interface, ifindex) in interfaces {
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("program xlb")?
            .try_into()?;
        let path = pins.xdp_link(&interface);
        let kept = match pinned_link(&path)? {
            Some(old) => match program.attach_to_link(old.try_into()?) {
                Ok(id) => Some(program.take_link(id)?.try_into()?),
                Err(e) => {
                    unpin_stale(&path, &e)?;
                    None
                }
            },
            None => None,
        };
        let mode = match kept {
            Some(link) => {
                links.push(link);
                KEPT
            }
            None => {
                let (mode, id) = attach_one(program, &interface, cfg.dataplane.xdp_mode)?;
                let link: FdLink = program.take_link(id)?.try_into().with_context(|| {
                    format!(
                        "XDP on {interface} is not a bpf_link (Linux 5.9+), so it cannot be pinned"
                    )
                })?;
                links.push(pin(link, &path)?);
                mode
            }
        };
        links.push(attach_handoff(&mut ebpf, &interface, pins)?);
        attached.push(Attachment {
            interface,
            ifindex,
            mode,
        });
    }
    for (interface, paths) in pins.links_except(&cfg.dataplane.interfaces)? {
        for path in paths {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
        println!("detached from {interface}: it is not in the config any more");
    }
    Ok(Loaded {
        ebpf,
        attached,
        _links: links,
    })
}

/// A pinned link the kernel would not update (its interface is gone, say): unpinned, so
/// a fresh one takes its place.
fn unpin_stale(path: &Path, e: &aya::programs::ProgramError) -> anyhow::Result<()> {
    log::warn!(
        "the pinned link {} is stale ({e}); attaching afresh",
        path.display()
    );
    std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))
}

/// The link pinned at `path`, if there is one.
fn pinned_link(path: &Path) -> anyhow::Result<Option<FdLink>> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("opening the pinned link {}", path.display())),
    }
}

/// Pins `link` at `path` and returns our handle on it.
fn pin(link: FdLink, path: &Path) -> anyhow::Result<FdLink> {
    let pinned = link
        .pin(path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(FdLink::from(pinned))
}

/// Makes the program send frames back out of interface `ifindex` by devmap redirect instead
/// of XDP_TX. A veth delivers XDP_TX frames to its peer only when the peer has an XDP
/// program of its own; redirected frames need only GRO on the peer.
pub fn no_xdp_tx(ebpf: &mut Ebpf, ifindex: u32) -> anyhow::Result<()> {
    let mut map: aya::maps::HashMap<_, u32, u8> = ebpf
        .map_mut(names::NO_XDP_TX)
        .context("map NO_XDP_TX")?
        .try_into()?;
    map.insert(ifindex, 1, 0)
        .with_context(|| format!("marking ifindex {ifindex} for redirect instead of XDP_TX"))
}

/// Checks that the kernel has what a pinned data plane needs: TCX links (Linux 6.6), for
/// the tc program to outlive the daemon.
pub fn check_kernel() -> anyhow::Result<()> {
    match KernelVersion::current() {
        Ok(v) if v >= KernelVersion::new(6, 6, 0) => Ok(()),
        Ok(v) => bail!(
            "Linux {v} is too old: xlb needs 6.6 or later, for TCX links that keep its tc \
             program attached while no daemon runs"
        ),
        Err(e) => bail!("reading the kernel version: {e}"),
    }
}

/// Checks, before anything is loaded, that every configured interface exists and forwards
/// IPv4, and IPv6 too when a service or NAT gateway is IPv6, so a typo fails in
/// milliseconds with the interface's name.
pub fn check_interfaces(cfg: &Checked) -> anyhow::Result<()> {
    for interface in &cfg.dataplane.interfaces {
        ifindex(interface)?;
        for family in forwarded_families(cfg) {
            check_forwarding(interface, family)?;
        }
    }
    Ok(())
}

/// The families whose forwarding the config needs, as their sysctls name them: "ipv4"
/// always (the handoff), "ipv6" too when a service or a NAT gateway is IPv6.
pub fn forwarded_families(cfg: &Checked) -> &'static [&'static str] {
    let ipv6 = cfg.services.iter().any(|s| s.vip.is_ipv6())
        || cfg
            .gateways
            .iter()
            .any(|g| g.to.iter().any(IpAddr::is_ipv6));
    if ipv6 { &["ipv4", "ipv6"] } else { &["ipv4"] }
}

/// Attaches the tc program that sends what the XDP program hands over, at the interface's
/// ingress, through a TCX link (Linux 6.6 and later) pinned in `pins`, replacing the
/// program in place where one is pinned already.
fn attach_handoff(ebpf: &mut Ebpf, interface: &str, pins: &PinDir) -> anyhow::Result<FdLink> {
    check_kernel()?;
    let handoff: &mut SchedClassifier = ebpf
        .program_mut(programs::TC_HANDOFF)
        .context("program xlb_handoff")?
        .try_into()?;
    let path = pins.tc_link(interface);
    if let Some(old) = pinned_link(&path)? {
        match handoff.attach_to_link(old.try_into()?) {
            Ok(id) => return Ok(handoff.take_link(id)?.try_into()?),
            Err(e) => unpin_stale(&path, &e)?,
        }
    }
    let id = handoff
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching the tc handoff program to {interface}"))?;
    pin(handoff.take_link(id)?.try_into()?, &path)
}

fn attach_one(
    program: &mut Xdp,
    interface: &str,
    mode: XdpModeConfig,
) -> anyhow::Result<(&'static str, XdpLinkId)> {
    match mode {
        XdpModeConfig::Native => {
            program_attach(program, interface, XdpMode::Driver).map(|id| ("native", id))
        }
        XdpModeConfig::Generic => {
            program_attach(program, interface, XdpMode::Skb).map(|id| ("generic", id))
        }
        XdpModeConfig::Auto => match program_attach(program, interface, XdpMode::Driver) {
            Ok(id) => Ok(("native", id)),
            // Busy is not "no native support": generic would fail the same way, less clearly.
            Err(native_err) if is_busy(&native_err) => Err(native_err),
            Err(native_err) => {
                log::warn!("{interface}: native XDP failed ({native_err:#}); trying generic");
                program_attach(program, interface, XdpMode::Skb)
                    .map(|id| ("generic", id))
                    .with_context(|| format!("native mode failed too: {native_err:#}"))
            }
        },
    }
}

fn program_attach(program: &mut Xdp, interface: &str, mode: XdpMode) -> anyhow::Result<XdpLinkId> {
    let result = program
        .attach(interface, mode)
        .with_context(|| format!("attaching XDP to {interface} in {mode:?} mode"));
    match result {
        Err(e) if is_busy(&e) => Err(e.context(format!(
            "{interface} already has an XDP program attached (another xlb?); see \
             `ip link show {interface}`"
        ))),
        other => other,
    }
}

/// The kernel's answer when the interface already has an XDP program.
fn is_busy(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.raw_os_error() == Some(libc::EBUSY))
}

/// The kernel's id of the loaded XDP program (as `bpftool prog` shows it).
pub fn program_id(ebpf: &Ebpf) -> anyhow::Result<u32> {
    let program: &Xdp = ebpf.program(PROGRAM).context("program xlb")?.try_into()?;
    Ok(program.info().context("program xlb: its info")?.id())
}

/// A handle of its own on the map `name` of `ebpf`, opened by the map's id: it can live on
/// another thread, or in a struct that outlives the borrow of `ebpf`.
pub fn map_handle(ebpf: &Ebpf, name: &str) -> anyhow::Result<MapData> {
    use aya::maps::Map;
    let data = match ebpf.map(name).with_context(|| format!("map {name}"))? {
        Map::HashMap(data)
        | Map::Array(data)
        | Map::PerCpuArray(data)
        | Map::DevMapHash(data)
        | Map::LpmTrie(data) => data,
        _ => bail!("map {name} is not of the expected type"),
    };
    let id = data
        .info()
        .with_context(|| format!("map {name}: its id"))?
        .id();
    MapData::from_id(id).with_context(|| format!("opening map {name} by its id {id}"))
}

pub fn ifindex(interface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("interface {interface:?} does not exist (see `ip link`)");
    }
    Ok(index)
}

/// bpf_fib_lookup refuses to route packets that arrive on an interface with forwarding off
/// for their family (BPF_FIB_LKUP_RET_FWD_DISABLED), and so would the kernel: say so up
/// front. `family` is the sysctl's: "ipv4" or "ipv6".
pub fn check_forwarding(interface: &str, family: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
    let value = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    if value.trim() != "1" {
        let (name, all) = match family {
            "ipv6" => ("IPv6", "net.ipv6.conf.all.forwarding=1"),
            _ => ("IPv4", "net.ipv4.ip_forward=1"),
        };
        bail!(
            "{name} forwarding is off on {interface}; xlb forwards packets between its \
             interfaces. Enable it with: sysctl -w net.{family}.conf.{interface}.forwarding=1 \
             (or {all})"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConntrackConfig};
    use crate::memory::Limit;

    #[test]
    fn an_ipv6_service_needs_ipv6_forwarding() {
        let config = |service: &str| {
            Config::parse(&format!("[dataplane]\ninterfaces = [\"xlb0\"]\n{service}"))
                .unwrap()
                .validate()
                .unwrap()
        };
        assert_eq!(forwarded_families(&config("")), ["ipv4"]);
        let v4 = "[[service]]\nvip = \"10.10.0.100:80\"\nprotocol = \"tcp\"\nmode = \"dnat\"\n";
        assert_eq!(forwarded_families(&config(v4)), ["ipv4"]);
        let v6 = v4.replace("10.10.0.100:80", "[2001:db8::100]:80");
        assert_eq!(forwarded_families(&config(&v6)), ["ipv4", "ipv6"]);
        let gateway = "[[nat_gateway]]\nsource = \"SOURCE\"\nto = \"TO\"\n";
        let gateway4 = gateway
            .replace("SOURCE", "10.30.0.0/24")
            .replace("TO", "10.20.0.5");
        assert_eq!(forwarded_families(&config(&gateway4)), ["ipv4"]);
        let gateway6 = gateway
            .replace("SOURCE", "2001:db8:30::/64")
            .replace("TO", "2001:db8:51::10");
        assert_eq!(forwarded_families(&config(&gateway6)), ["ipv4", "ipv6"]);
    }

    #[test]
    fn maps_larger_than_the_memory_xlb_may_take_are_refused() {
        let cfg = Config::parse("[dataplane]\ninterfaces = [\"xlb0\"]\n")
            .unwrap()
            .validate()
            .unwrap();
        // A million flows: 2^21 entries of 160 bytes (48 + 40 + 72) and as many 16-byte
        // buckets, 369,098,752 bytes or 352 MiB; the buckets of the 2^21-entry MAPPINGS and
        // the 2^20-entry RELEASED, 48 MiB; 64 services' two Maglev tables of 65,537 slots,
        // 4 bytes each, 33,554,944 bytes, in 8,193 pages: 33,558,528.
        assert_eq!(cfg.conntrack.table_bytes(), 369_098_752);
        assert_eq!(cfg.conntrack.companions_bytes(), 48 << 20);
        assert_eq!(cfg.dataplane.maglev_bytes(), 33_558_528);
        // On 64 possible CPUs the other maps take under 28 MiB, 26 of it the next-hop
        // cache's 4,096 slots of 64 bytes and the backends' counters, 4,096 of 40, per CPU.
        let footprint = Footprint::on(&cfg, 64).unwrap();
        assert!(
            (26 << 20..28 << 20).contains(&footprint.others),
            "{footprint:?}"
        );
        let host = |kib: u64| Room {
            bytes: kib * 1024,
            limit: Limit::Host,
        };
        check_memory(&cfg, &footprint, &host(480_000)).unwrap();
        let message = format!(
            "{:#}",
            check_memory(&cfg, &footprint, &host(450_000)).unwrap_err()
        );
        assert!(
            message.starts_with(
                "the data plane's maps take 458 MiB of kernel memory when xlb starts: 400 MiB \
                 of conntrack for [conntrack] entries = 1048576 flows"
            ) && message.contains("32 MiB of Maglev tables for dataplane.max_services = 64")
                && message.contains(
                    "26 MiB of other maps (for dataplane.max_backends = 4096 and the host's 64 \
                     possible CPUs)"
                )
                && message.ends_with("this host has 439 MiB available: lower them"),
            "{message}"
        );
        let cgroup = Room {
            bytes: 100 << 20,
            limit: Limit::Cgroup {
                dir: "/sys/fs/cgroup/xlb".into(),
                limit_bytes: 128 << 20,
            },
        };
        let message = format!("{:#}", check_memory(&cfg, &footprint, &cgroup).unwrap_err());
        assert!(
            message.ends_with(
                "the memory cgroup that holds xlb (/sys/fs/cgroup/xlb) has 100 MiB left under \
                 its limit of 128 MiB: lower them, or raise the cgroup's limit"
            ),
            "{message}"
        );
        // A restart that adopts the pinned maps makes the others anew (on 64 CPUs the
        // next-hop cache alone is 16 MiB of them), and is refused when they do not fit.
        let message = format!(
            "{:#}",
            check_unpinned_memory(120 << 20, 64, &cgroup).unwrap_err()
        );
        assert!(
            message.starts_with(
                "adopting the pinned data plane, xlb makes its other maps anew, which take \
                 120.0 MiB of kernel memory on the host's 64 possible CPUs; and the memory \
                 cgroup that holds xlb (/sys/fs/cgroup/xlb) has 100 MiB left"
            ) && message.ends_with("(the running data plane is left as it is)"),
            "{message}"
        );
        check_unpinned_memory(20 << 20, 64, &cgroup).unwrap();
        // 6,000 entries, 8,192 buckets.
        let small = ConntrackConfig {
            entries: 3000,
            ..ConntrackConfig::default()
        };
        assert_eq!(small.table_bytes(), 6000 * 160 + 8192 * 16);
    }
}
