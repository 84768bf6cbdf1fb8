//! A one-namespace lab for running the XDP program through BPF_PROG_TEST_RUN: two veth
//! pairs with both ends inside the namespace, addresses, static neighbours with fixed MACs,
//! a blackhole route, and forwarding on, so `bpf_fib_lookup` sees a real routing table.
//! The fixtures, the random-frame and conntrack tests, and the benchmark (benches/xdp.rs)
//! all run in it, through [`in_lab`].
//!
//! ```text
//!   client side:  fx0 10.10.1.1/24 (peer fx0p)  neigh 10.10.1.2 → 02:00:00:00:0c:01
//!                                               neigh 10.10.1.3 → 02:00:00:00:0c:03
//!   backend side: fx1 10.20.1.1/24 (peer fx1p)  neigh 10.20.1.2 → 02:00:00:00:0b:01
//!                                               neigh 10.20.1.7 → 02:00:00:00:0b:01
//!                                               (10.20.1.9 has no neighbour entry)
//!   route 10.20.1.7/32 dev fx1 mtu lock 576
//!   blackhole 10.99.0.0/16
//! ```
//! And the same in IPv6, subnet for subnet, host for host (`10.10.1.2` is
//! `2001:db8:10:1::2`, with the same MAC):
//! ```text
//!   fx0 2001:db8:10:1::1/64   neigh 2001:db8:10:1::2
//!   fx1 2001:db8:20:1::1/64   neigh 2001:db8:20:1::2, 2001:db8:20:1::7 (not ::9)
//!   route 2001:db8:20:1::7/128 dev fx1 mtu lock 1280
//!   blackhole 2001:db8:99::/48
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{DevMapHash, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    maps::{FlowKey, Mapping, MappingKey, NatEntry, Settings, names},
    reason::Reason,
};
use lb_userspace::{
    config::{Checked, Config},
    registry::Registry,
};

use crate::netns::{self, NetNs};

pub const FX0: &str = "fx0";
pub const FX0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x00];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];
/// A backend on the client side, so the program answers out of the same interface (XDP_TX).
pub const NEAR_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 3);
pub const NEAR_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x03];

pub const FX1: &str = "fx1";
pub const FX1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
pub const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 2);
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];
/// On fx1's subnet, with no neighbour entry.
pub const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 9);
/// On fx1's subnet, behind a route of MTU [`SMALL_MTU`]: packets to it may be too big.
pub const SMALL_MTU_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 7);
pub const SMALL_MTU: u16 = 576;

/// The VIP the lab's configs put their main services on; clients reach it through fx0.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 100);
/// The VIP of a service whose only backend is [`UNRESOLVED_BACKEND`].
pub const VIP_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 103);
/// The SNAT address toward the backends behind fx1 (assigned nowhere, as in production).
pub const SNAT: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);

/// The IPv6 twins of the addresses above.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 2);
pub const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 2);
pub const UNRESOLVED_BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 9);
pub const SMALL_MTU_BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 7);
/// IPv6's minimum MTU (RFC 8200 section 5).
pub const SMALL_MTU6: u16 = 1280;
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x100);
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 1);

/// The destination MAC of a frame handed to the tc program: "xlbho" behind 0x02 (locally
/// administered, unicast), written out here as docs/architecture.md gives it, not taken
/// from the code under test.
pub const HANDOFF_DMAC: [u8; 6] = [0x02, 0x78, 0x6c, 0x62, 0x68, 0x6f];

/// The handoff secret the lab's data plane gets (in place of the random one xlb makes),
/// so the tests know a handed-off frame's source MAC.
pub const HANDOFF_SECRET: [u8; 6] = [0x02, 0x5e, 0xc2, 0xe7, 0x11, 0xab];

/// The MACs (source, destination) of a frame handed to the tc program: the secret, and
/// [`HANDOFF_DMAC`].
pub fn handoff_macs() -> ([u8; 6], [u8; 6]) {
    (HANDOFF_SECRET, HANDOFF_DMAC)
}

/// The static IPv6 neighbours, as [`NEIGHBOURS`].
pub const NEIGHBOURS6: [(Ipv6Addr, [u8; 6], &str); 3] = [
    (CLIENT6, CLIENT_MAC, FX0),
    (BACKEND6, BACKEND_MAC, FX1),
    (SMALL_MTU_BACKEND6, BACKEND_MAC, FX1),
];

/// The static neighbours: address, MAC, and the interface they sit behind.
pub const NEIGHBOURS: [(Ipv4Addr, [u8; 6], &str); 4] = [
    (CLIENT, CLIENT_MAC, FX0),
    (NEAR_BACKEND, NEAR_BACKEND_MAC, FX0),
    (BACKEND, BACKEND_MAC, FX1),
    (SMALL_MTU_BACKEND, BACKEND_MAC, FX1),
];

/// The interface each of the lab's /24 subnets is on: where the FIB sends a packet to an
/// address in it.
pub fn subnet_interface(addr: impl Into<IpAddr>) -> Option<&'static str> {
    match addr.into() {
        IpAddr::V4(v4) => match v4.octets() {
            [10, 10, 1, _] => Some(FX0),
            [10, 20, 1, _] => Some(FX1),
            _ => None,
        },
        IpAddr::V6(v6) => match v6.segments() {
            [0x2001, 0xdb8, 0x10, 1, ..] => Some(FX0),
            [0x2001, 0xdb8, 0x20, 1, ..] => Some(FX1),
            _ => None,
        },
    }
}

/// Runs `test` inside a fresh namespace named after `prefix` (stale ones of an earlier,
/// killed run removed first), with the lab built in it; the namespace is removed afterwards,
/// also when `test` fails or panics.
pub fn in_lab<T: Send>(prefix: &str, test: impl FnOnce(&NetNs) -> Result<T> + Send) -> Result<T> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "BPF_PROG_TEST_RUN needs root: run cargo xtask test (or bench)"
    );
    netns::cleanup_stale(prefix).context("cleaning up stale namespaces")?;
    let ns = NetNs::create(&netns::unique_base(prefix)).context("creating the namespace")?;
    setup(&ns).context("setting up the lab")?;
    ns.enter(|| test(&ns)).context("entering the namespace")?
}

/// Builds the lab inside `ns` (a fresh namespace).
pub fn setup(ns: &NetNs) -> Result<()> {
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=0"])?;
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    for (name, mac, addr, addr6) in [
        (FX0, FX0_MAC, "10.10.1.1/24", "2001:db8:10:1::1/64"),
        (FX1, FX1_MAC, "10.20.1.1/24", "2001:db8:20:1::1/64"),
    ] {
        let peer = format!("{name}p");
        ns.ip(&[
            "link",
            "add",
            name,
            "address",
            &mac_string(mac),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        ns.ip(&["addr", "add", addr, "dev", name])?;
        // No duplicate address detection: the address is usable at once.
        ns.ip(&["addr", "add", addr6, "dev", name, "nodad"])?;
        ns.ip(&["link", "set", name, "up"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
    }
    let neighbours = NEIGHBOURS
        .iter()
        .map(|&(a, mac, dev)| (IpAddr::V4(a), mac, dev))
        .chain(
            NEIGHBOURS6
                .iter()
                .map(|&(a, mac, dev)| (IpAddr::V6(a), mac, dev)),
        );
    for (addr, mac, dev) in neighbours {
        ns.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac_string(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&["-6", "route", "add", "blackhole", "2001:db8:99::/48"])?;
    ns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{SMALL_MTU_BACKEND6}/128"),
        "dev",
        FX1,
        "mtu",
        "lock",
        &SMALL_MTU6.to_string(),
    ])?;
    ns.ip(&["route", "add", "blackhole", "10.99.0.0/16"])?;
    ns.ip(&[
        "route",
        "add",
        &format!("{SMALL_MTU_BACKEND}/32"),
        "dev",
        FX1,
        // Locked: bpf_fib_lookup honours a route's MTU only then (or with
        // net.ipv4.ip_forward_use_pmtu).
        "mtu",
        "lock",
        &SMALL_MTU.to_string(),
    ])?;
    Ok(())
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The ifindex of an interface in the calling thread's namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name} in this namespace");
    Ok(index)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads
    // one cpu_set_t of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// A `struct xdp_md` for BPF_PROG_TEST_RUN's ctx_in: data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex, as native-endian u32s. No metadata
/// (data = data_meta = 0); `data_end` is the length of the linear part.
pub fn xdp_md(data_end: u32, ingress_ifindex: u32) -> Vec<u8> {
    [0, data_end, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// An interface of the lab, as the program sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// The program loaded (not attached) in the calling thread's lab namespace, its maps filled
/// from `checked` by the control plane's own code, and fx0 and fx1 in its devmap.
pub struct Program {
    pub ebpf: Ebpf,
    pub fx0: Iface,
    pub fx1: Iface,
}

/// Makes `mac` the permanent neighbour entry of `addr` on `dev`, in the calling thread's
/// namespace (inside [`in_lab`]'s test).
pub fn set_neighbour(addr: IpAddr, mac: [u8; 6], dev: &str) -> Result<()> {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let out = std::process::Command::new("ip")
        .args(["neigh", "replace", &addr.to_string(), "lladdr", &mac])
        .args(["dev", dev, "nud", "permanent"])
        .output()
        .context("running ip neigh replace")?;
    ensure!(
        out.status.success(),
        "ip neigh replace {addr} {mac}: {out:?}"
    );
    Ok(())
}

/// Parses and validates a config a test wrote, naming every problem in the error.
pub fn checked(toml: &str) -> Result<Checked> {
    Config::parse(toml)
        .context("the test's config does not parse")?
        .validate()
        .context("the test's config is not valid")
}

/// Loads the program for BPF_PROG_TEST_RUN. Call it on a thread inside the lab's namespace
/// (`NetNs::enter`): ifindexes, the devmap and the FIB are per namespace.
pub fn load(checked: &Checked) -> Result<Program> {
    let fx0 = Iface {
        ifindex: ifindex(FX0)?,
        mac: FX0_MAC,
    };
    let fx1 = Iface {
        ifindex: ifindex(FX1)?,
        mac: FX1_MAC,
    };
    let mut ebpf = lb_userspace::loader::load(checked).context("loading the XDP program")?;
    Registry::load(&ebpf, checked).context("filling the maps")?;
    set_handoff_secret(&mut ebpf)?;
    let mut devmap: DevMapHash<_> = ebpf
        .map_mut(names::DEVMAP)
        .context("map DEVMAP")?
        .try_into()?;
    for i in [fx0, fx1] {
        devmap.insert(i.ifindex, i.ifindex, None, 0)?;
    }
    Ok(Program { ebpf, fx0, fx1 })
}

/// Replaces the random handoff secret xlb gave the maps (checked to be there) with
/// [`HANDOFF_SECRET`].
fn set_handoff_secret(ebpf: &mut Ebpf) -> Result<()> {
    let mut config: aya::maps::Array<_, Settings> = ebpf
        .map_mut(names::CONFIG)
        .context("map CONFIG")?
        .try_into()?;
    let mut settings = config.get(&0, 0)?;
    ensure!(
        settings.handoff_secret != [0; 6],
        "xlb left the handoff secret zero"
    );
    settings.handoff_secret = HANDOFF_SECRET;
    config.set(0, settings, 0)?;
    Ok(())
}

/// The `REASONS` counters, summed over CPUs, in [`Reason::ALL`] order.
pub fn reasons(ebpf: &Ebpf) -> Result<Vec<u64>> {
    lb_userspace::stats::reasons(ebpf)
}

/// What one BPF_PROG_TEST_RUN of the XDP program did with a frame.
#[derive(Debug, Clone)]
pub struct Run {
    /// The XDP action it returned.
    pub action: u32,
    /// The frame as it left.
    pub frame: Vec<u8>,
    /// The `REASONS` counters that moved, and by how much.
    pub counted: Vec<(Reason, u64)>,
    /// How long the program ran, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// Runs the XDP program once on `input` arriving on `ingress` (an ifindex). With
/// `linear_len`, the program sees only that many bytes (the kernel puts the rest in a
/// fragment): the only way to feed it less than the 14 bytes BPF_PROG_TEST_RUN requires.
pub fn run(ebpf: &Ebpf, input: &[u8], ingress: u32, linear_len: Option<usize>) -> Result<Run> {
    let prog: &Xdp = ebpf
        .program(lb_userspace::loader::PROGRAM)
        .context("program xlb")?
        .try_into()?;
    let ctx = xdp_md(linear_len.unwrap_or(input.len()) as u32, ingress);
    let mut ctx_out = vec![0u8; ctx.len()];
    // Room for the frame as the program may reshape it.
    let mut out = vec![0u8; input.len() + 256];
    let before = reasons(ebpf)?;
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            // Always 1: for XDP the kernel does not restore the frame between repeats.
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    let after = reasons(ebpf)?;
    out.truncate(result.data_size_out as usize);
    // The output would start with XDP metadata, and the returned xdp_md say where the frame
    // starts; xlb puts none in front of a frame (a handoff is marked in its MACs).
    let frame_at = u32::from_ne_bytes(ctx_out[0..4].try_into().unwrap());
    ensure!(
        frame_at == 0,
        "{frame_at} bytes of XDP metadata in front of the frame"
    );
    let counted = Reason::ALL
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a != b)
        .map(|(r, (b, a))| (*r, a.wrapping_sub(*b)))
        .collect();
    Ok(Run {
        action: result.return_value,
        frame: out,
        counted,
        duration: result.duration,
    })
}

/// [`run`] for a frame that must be forwarded: it fails unless the run counted exactly one
/// `forward/redirect` and nothing else. `what` names the frame in the error.
pub fn run_forwarded(ebpf: &Ebpf, input: &[u8], ingress: u32, what: &str) -> Result<Run> {
    let run = run(ebpf, input, ingress, None)?;
    ensure!(
        run.counted == [(Reason::ForwardRedirect, 1)],
        "{what}: counted {:?}, not one forward/redirect",
        run.counted
    );
    Ok(run)
}

/// Runs the XDP program once on `input` arriving on `ingress`, and returns only its action
/// and how long it ran: nothing else touches the caches between runs (no counters read, no
/// context copied back), for timing.
pub fn run_timed(ebpf: &Ebpf, input: &[u8], ingress: u32) -> Result<(u32, std::time::Duration)> {
    run_timed_program(ebpf, lb_userspace::loader::PROGRAM, input, ingress)
}

/// Like [`run_timed`], with the XDP program called `program` (loaded).
pub fn run_timed_program(
    ebpf: &Ebpf,
    program: &str,
    input: &[u8],
    ingress: u32,
) -> Result<(u32, std::time::Duration)> {
    let prog: &Xdp = ebpf
        .program(program)
        .with_context(|| format!("program {program}"))?
        .try_into()?;
    let ctx = xdp_md(input.len() as u32, ingress);
    let mut out = vec![0u8; input.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    })?;
    Ok((r.return_value, r.duration))
}

/// Every conntrack entry.
pub fn conntrack(ebpf: &Ebpf) -> Result<Vec<(FlowKey, NatEntry)>> {
    let map: HashMap<&MapData, FlowKey, NatEntry> = ebpf
        .map(names::CONNTRACK)
        .context("map CONNTRACK")?
        .try_into()?;
    map.iter().map(|r| r.context("reading CONNTRACK")).collect()
}

/// The kernel memory the map `name` takes, by the kernel's own account (`memlock` in the
/// map's fdinfo).
pub fn memlock(ebpf: &Ebpf, name: &str) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let map = ebpf.map(name).with_context(|| format!("map {name}"))?;
    let data: &MapData = match map {
        aya::maps::Map::HashMap(data)
        | aya::maps::Map::LpmTrie(data)
        | aya::maps::Map::Array(data)
        | aya::maps::Map::PerCpuArray(data)
        | aya::maps::Map::DevMapHash(data)
        | aya::maps::Map::RingBuf(data) => data,
        _ => bail!("map {name}: not of a kind xlb's object has"),
    };
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in map {name}'s fdinfo"))
}

/// The conntrack entry at `key`, if any.
pub fn conntrack_entry(ebpf: &Ebpf, key: &FlowKey) -> Result<Option<NatEntry>> {
    let map: HashMap<&MapData, FlowKey, NatEntry> = ebpf
        .map(names::CONNTRACK)
        .context("map CONNTRACK")?
        .try_into()?;
    match map.get(key, 0) {
        Ok(entry) => Ok(Some(entry)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Puts the program's maps back as `lab::load` left them: no flows, the tables as `checked`
/// says, XDP_TX allowed on every interface.
pub fn reset(ebpf: &mut Ebpf, checked: &Checked) -> Result<()> {
    clear_conntrack(ebpf)?;
    Registry::load(ebpf, checked).context("rewriting the tables")?;
    let mut no_tx: HashMap<&mut MapData, u32, u8> = ebpf
        .map_mut(names::NO_XDP_TX)
        .context("map NO_XDP_TX")?
        .try_into()?;
    let keys: Vec<u32> = no_tx.keys().collect::<Result<_, _>>()?;
    for k in keys {
        no_tx.remove(&k)?;
    }
    Ok(())
}

/// Empties the conntrack table, and the NAT gateways' mappings its flows held.
pub fn clear_conntrack(ebpf: &mut Ebpf) -> Result<()> {
    let keys: Vec<FlowKey> = conntrack(ebpf)?.into_iter().map(|(k, _)| k).collect();
    let mut map: HashMap<&mut MapData, FlowKey, NatEntry> = ebpf
        .map_mut(names::CONNTRACK)
        .context("map CONNTRACK")?
        .try_into()?;
    for key in keys {
        map.remove(&key).context("removing a conntrack entry")?;
    }
    let mut mappings: HashMap<&mut MapData, MappingKey, Mapping> = ebpf
        .map_mut(names::MAPPINGS)
        .context("map MAPPINGS")?
        .try_into()?;
    let keys: Vec<MappingKey> = mappings.keys().collect::<Result<_, _>>()?;
    for key in keys {
        mappings.remove(&key).context("removing a mapping")?;
    }
    Ok(())
}

/// The NAT gateways' mappings: (key, value) of every entry.
pub fn mappings(ebpf: &Ebpf) -> Result<Vec<(MappingKey, Mapping)>> {
    let map: HashMap<&MapData, MappingKey, Mapping> = ebpf
        .map(names::MAPPINGS)
        .context("map MAPPINGS")?
        .try_into()?;
    Ok(map.iter().collect::<Result<_, _>>()?)
}

/// Checks that the conntrack table is made of whole flows: every entry's twin (the entry at
/// the key its rewrite points to) exists and points back, so no SNAT port serves two flows
/// and no flow has lost a half; and both halves carry the same record of the flow. (Not the
/// same time: a packet that only refreshes its entry's time leaves the twin's alone.)
pub fn check_whole_flows(entries: &[(FlowKey, NatEntry)]) -> Result<()> {
    let table: std::collections::HashMap<FlowKey, NatEntry> = entries.iter().copied().collect();
    for (key, entry) in entries {
        let twin_key = entry.twin_key(key.proto);
        let Some(twin) = table.get(&twin_key) else {
            bail!("{key:?} has no twin at {twin_key:?}: a flow with one half");
        };
        ensure!(
            twin.twin_key(key.proto) == *key,
            "{key:?}'s twin {twin_key:?} points at {:?}: one SNAT port, two flows",
            twin.twin_key(key.proto)
        );
        ensure!(
            twin.rewrite.direction != entry.rewrite.direction,
            "{key:?} and its twin go the same way"
        );
        ensure!(
            twin.seen == entry.seen,
            "{key:?} records {:?}, its twin {:?}",
            entry.seen,
            twin.seen
        );
    }
    Ok(())
}

/// Pins at `path` a conntrack table of `max_entries` entries as an xlb from before
/// preallocation made it: a hash map of `FlowKey`s and `NatEntry`s with
/// `BPF_F_NO_PREALLOC`, made with bpf() directly.
pub fn pin_conntrack_without_preallocation(path: &std::path::Path, max_entries: u32) -> Result<()> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::ffi::OsStrExt as _,
    };
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    // The leading fields of `union bpf_attr` for each command; given the size of these
    // only, the kernel reads the rest as zeros (as `lb_userspace::tables` relies on too).
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let create = Create {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<NatEntry>() as u32,
        max_entries,
        map_flags: BPF_F_NO_PREALLOC,
    };
    // SAFETY: the attribute outlives the call, and its size is passed with it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const create,
            size_of::<Create>(),
        )
    };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor, ours alone.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let pin = Pin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: as above; the path outlives the call.
    let pinned =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &raw const pin, size_of::<Pin>()) };
    ensure!(
        pinned == 0,
        "BPF_OBJ_PIN: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
