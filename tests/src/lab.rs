//! A one-namespace lab for running the XDP program through BPF_PROG_TEST_RUN: two veth
//! pairs with both ends inside the namespace, addresses, static neighbours with fixed MACs,
//! a blackhole route, and forwarding on, so `bpf_fib_lookup` sees a real routing table.
//! The fixtures (tests/fixtures.rs) and the benchmark (benches/xdp.rs) both run in it.
//!
//! ```text
//!   client side:  fx0 10.10.1.1/24 (peer fx0p)  neigh 10.10.1.2 → 02:00:00:00:0c:01
//!                                               neigh 10.10.1.3 → 02:00:00:00:0c:03
//!   backend side: fx1 10.20.1.1/24 (peer fx1p)  neigh 10.20.1.2 → 02:00:00:00:0b:01
//!                                               (10.20.1.9 has no neighbour entry)
//!   blackhole 10.99.0.0/16
//! ```

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{DevMapHash, MapData, PerCpuArray},
};
use lb_common::{maps::names, reason::Reason};
use lb_userspace::config::Checked;

use crate::netns::NetNs;

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

/// The VIP the lab's configs put their main services on; clients reach it through fx0.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 100);
/// The VIP of a service whose only backend is [`UNRESOLVED_BACKEND`].
pub const VIP_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 103);
/// The SNAT address toward the backends behind fx1 (assigned nowhere, as in production).
pub const SNAT: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);

/// The static neighbours: address, MAC, and the interface they sit behind.
pub const NEIGHBOURS: [(Ipv4Addr, [u8; 6], &str); 3] = [
    (CLIENT, CLIENT_MAC, FX0),
    (NEAR_BACKEND, NEAR_BACKEND_MAC, FX0),
    (BACKEND, BACKEND_MAC, FX1),
];

/// Builds the lab inside `ns` (a fresh namespace).
pub fn setup(ns: &NetNs) -> Result<()> {
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    for (name, mac, addr) in [
        (FX0, FX0_MAC, "10.10.1.1/24"),
        (FX1, FX1_MAC, "10.20.1.1/24"),
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
        ns.ip(&["link", "set", name, "up"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
    }
    for (addr, mac, dev) in NEIGHBOURS {
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
    ns.ip(&["route", "add", "blackhole", "10.99.0.0/16"])?;
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
    lb_userspace::tables::write(&mut ebpf, checked).context("filling the maps")?;
    let mut devmap: DevMapHash<_> = ebpf
        .map_mut(names::DEVMAP)
        .context("map DEVMAP")?
        .try_into()?;
    for i in [fx0, fx1] {
        devmap.insert(i.ifindex, i.ifindex, None, 0)?;
    }
    Ok(Program { ebpf, fx0, fx1 })
}

/// The `REASONS` counters, summed over CPUs, in [`Reason::ALL`] order.
pub fn reasons(ebpf: &Ebpf) -> Result<Vec<u64>> {
    let map: PerCpuArray<&MapData, u64> = ebpf
        .map(names::REASONS)
        .context("map REASONS")?
        .try_into()?;
    Reason::ALL
        .iter()
        .map(|r| Ok(map.get(&(*r as u32), 0)?.iter().sum()))
        .collect()
}
