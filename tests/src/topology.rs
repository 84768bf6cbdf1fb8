//! The test network: one client, the load balancer, three backends, each in its own
//! network namespace, wired with veth pairs.
//!
//! Every link is dual-stack: each interface with an IPv4 address has an IPv6 one in a
//! parallel scheme (`10.10.1.0/24` ↔ `2001:db8:10:1::/64`, `10.20.N.0/24` ↔
//! `2001:db8:20:N::/64`), added without duplicate address detection so it is usable at once.
//!
//! Two layouts:
//!
//! [`Layout::Routed`] (the default): each backend on a link and subnet of its own.
//! ```text
//!  ns client                   ns lb (xlb attaches XDP to all four)       ns b1 / b2 / b3
//!  cli0 10.10.1.2/24       ─── xlb-c  10.10.1.1/24
//!       2001:db8:10:1::2/64           2001:db8:10:1::1/64
//!                              xlb-b1 10.20.1.1/24 ──────────────────── bk0 10.20.1.2/24
//!                                     2001:db8:20:1::1/64                   2001:db8:20:1::2/64
//!                              xlb-b2 10.20.2.1/24 ──────────────────── bk0 10.20.2.2/24
//!                                     2001:db8:20:2::1/64                   2001:db8:20:2::2/64
//!                              xlb-b3 10.20.3.1/24 ──────────────────── bk0 10.20.3.2/24
//!                                     2001:db8:20:3::1/64                   2001:db8:20:3::2/64
//! ```
//! * The VIPs 10.10.0.100 and 2001:db8:10::100 and the SNAT addresses 10.20.0.1 and
//!   2001:db8:20::1 are assigned to no interface. The client's default routes (both
//!   families) send VIP traffic to the load balancer, and each backend's default routes send
//!   replies to the SNAT address back to the load balancer, where XDP catches both
//!   directions. The load balancer forwards both families.
//!
//! [`Layout::Flat`]: the backends share one subnet with the load balancer, behind a bridge
//! in a namespace of its own, as a Kubernetes node's pods or a rack's servers do.
//! ```text
//!  ns client                 ns lb (XDP on both)         ns switch (bridge br0)   ns b1 / b2 / b3
//!  cli0 10.10.1.2/24     ─── xlb-c 10.10.1.1/24
//!       2001:db8:10:1::2/64        2001:db8:10:1::1/64
//!                            xlb-s 10.20.0.1/24 ──────── sw-lb ┐
//!                                  2001:db8:20::1/64           │
//!                                                              br0 ── sw-bN ──── bk0 10.20.0.1N/24
//!                                                                                    2001:db8:20::1N/64
//! ```
//! * There the SNAT address is naturally the load balancer's own 10.20.0.1 (2001:db8:20::1),
//!   as kube-proxy's NodePort does: backends reach it on the link, with no route at all.
//!
//! With [`Options::router_mtu`], a router sits between the client and the load balancer, and
//! its link toward the client has that (smaller) MTU, while the client and the backends keep
//! 1500: a path MTU that only ICMP "fragmentation needed" from the router reveals.
//! ```text
//!  ns client                   ns router                            ns lb
//!  cli0 10.10.1.2/24       ─── rt-c 10.10.1.1/24 (MTU 1280)
//!       2001:db8:10:1::2/64           2001:db8:10:1::1/64
//!                              rt-l 10.10.9.2/24 ─────────────── xlb-c 10.10.9.1/24
//!                                   2001:db8:10:9::2/64                2001:db8:10:9::1/64
//! ```
//!
//! Either way no interface is ever created in the root namespace: each veth pair is created
//! inside one of the test's namespaces with its peer placed straight into another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::cmd;
use crate::netns::{self, NetNs};

/// The service address clients connect to.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 100);
/// Source address xlb gives packets toward backends. Assigned nowhere.
pub const SNAT: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);
/// The client's address (on `cli0`).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
/// The load balancer's own address on the client side (`xlb-c`); the client's gateway.
/// With a router, the router's address there.
pub const LB_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
/// With a router: the load balancer's address on the link to it (`xlb-c`).
pub const LB_ROUTER_SIDE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 9, 1);
/// With a router: the router's address on its link to the load balancer (`rt-l`).
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 9, 2);
/// Port the backends' servers listen on (TCP and UDP).
pub const BACKEND_PORT: u16 = 8080;
/// The TCP service port on the VIP.
pub const VIP_TCP_PORT: u16 = 80;
/// The UDP service port on the VIP.
pub const VIP_UDP_PORT: u16 = 53;
/// The load balancer's interfaces in the routed layout, in the order of the config's
/// `interfaces` list.
pub const LB_INTERFACES: [&str; 4] = ["xlb-c", "xlb-b1", "xlb-b2", "xlb-b3"];
/// The load balancer's interfaces in the flat layout.
pub const FLAT_LB_INTERFACES: [&str; 2] = ["xlb-c", "xlb-s"];
/// The load balancer's own address toward the backends in the flat layout: its SNAT address.
pub const FLAT_LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);

/// The IPv6 service address clients connect to ([`VIP`]'s counterpart). Assigned nowhere.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x100);
/// The IPv6 source address xlb gives packets toward backends ([`SNAT`]'s counterpart).
/// Assigned nowhere in the routed layout; the load balancer's own in the flat one.
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 1);
/// The client's IPv6 address (on `cli0`).
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 2);
/// The load balancer's own IPv6 address on the client side (`xlb-c`); the client's IPv6
/// gateway. With a router, the router's address there.
pub const LB_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 1);
/// With a router: the load balancer's IPv6 address on the link to it (`xlb-c`).
pub const LB_ROUTER_SIDE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 9, 0, 0, 0, 1);
/// With a router: the router's IPv6 address on its link to the load balancer (`rt-l`).
pub const ROUTER_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 9, 0, 0, 0, 2);
/// The load balancer's own IPv6 address toward the backends in the flat layout: [`SNAT6`].
pub const FLAT_LB_ADDR6: Ipv6Addr = SNAT6;

/// How the backends are wired to the load balancer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// A link and subnet per backend.
    #[default]
    Routed,
    /// One subnet behind a bridge.
    Flat,
}

/// What to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub layout: Layout,
    /// Set the veth offloads the README asks for (GRO on and TX checksum offload off on
    /// the peers); off, to test that xlb notices.
    pub veth_rules: bool,
    /// A router between the client and the load balancer, whose link toward the client
    /// has this MTU.
    pub router_mtu: Option<u32>,
    /// The MTU of the load balancer's own client-side interface (`xlb-c`), the client's
    /// staying 1500: then xlb itself is the narrowest link.
    pub lb_client_mtu: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            layout: Layout::Routed,
            veth_rules: true,
            router_mtu: None,
            lb_client_mtu: None,
        }
    }
}
/// Client-side interface name, in the client namespace.
pub const CLIENT_IFACE: &str = "cli0";
/// Interface name in every backend namespace.
pub const BACKEND_IFACE: &str = "bk0";
/// Backend names; backend `bN` lives in 10.20.N.0/24.
pub const BACKEND_NAMES: [&str; 3] = ["b1", "b2", "b3"];

/// `VIP:80`.
pub fn vip_tcp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_TCP_PORT))
}

/// `VIP:53`.
pub fn vip_udp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_UDP_PORT))
}

/// `[VIP6]:80`.
pub fn vip6_tcp() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(VIP6, VIP_TCP_PORT, 0, 0))
}

/// `[VIP6]:53`.
pub fn vip6_udp() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(VIP6, VIP_UDP_PORT, 0, 0))
}

/// One backend host.
#[derive(Debug)]
pub struct BackendNode {
    /// `b1`, `b2` or `b3`; also what its servers answer with.
    pub name: String,
    pub ns: NetNs,
    /// 10.20.N.2 (flat: 10.20.0.1N), on `bk0`.
    pub addr: Ipv4Addr,
    /// The load balancer's address on the link, the backend's default gateway: 10.20.N.1
    /// (flat: 10.20.0.1).
    pub gateway: Ipv4Addr,
    /// 2001:db8:20:N::2 (flat: 2001:db8:20::1N), on `bk0`.
    pub addr6: Ipv6Addr,
    /// The load balancer's IPv6 address on the link, the backend's default IPv6 gateway:
    /// 2001:db8:20:N::1 (flat: 2001:db8:20::1).
    pub gateway6: Ipv6Addr,
    /// The load balancer side of the link: `xlb-bN` (flat: `xlb-s`).
    pub lb_iface: String,
}

impl BackendNode {
    /// `10.20.N.2:8080`, as written in the xlb config.
    pub fn service_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.addr, BACKEND_PORT))
    }

    /// `[2001:db8:20:N::2]:8080`, as written in the xlb config.
    pub fn service_addr6(&self) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(self.addr6, BACKEND_PORT, 0, 0))
    }
}

/// The whole network. Dropping it kills every process in its namespaces and deletes them.
#[derive(Debug)]
pub struct Topology {
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<BackendNode>,
    /// The flat layout's bridge.
    pub switch: Option<NetNs>,
    /// The router between client and load balancer ([`Options::router_mtu`]).
    pub router: Option<NetNs>,
    pub options: Options,
}

impl Topology {
    /// Builds the routed network with the README's veth settings (see [`Topology::build`]).
    pub fn new(prefix: &str) -> Result<Topology> {
        Self::build(prefix, Options::default())
    }

    /// Builds the network with namespaces named `<prefix>-<pid>-<n>-<role>`. On error the
    /// namespaces created so far are deleted again (their guards drop).
    pub fn build(prefix: &str, options: Options) -> Result<Topology> {
        cmd::require_tool("ip", "iproute2")?;
        cmd::require_tool("sysctl", "procps")?;
        cmd::require_tool("ethtool", "ethtool")?;

        let base = netns::unique_base(prefix);
        let client = NetNs::create(&format!("{base}-client"))?;
        let lb = NetNs::create(&format!("{base}-lb"))?;
        let flat = options.layout == Layout::Flat;
        let switch = flat
            .then(|| NetNs::create(&format!("{base}-switch")))
            .transpose()?;
        let router = options
            .router_mtu
            .map(|_| NetNs::create(&format!("{base}-router")))
            .transpose()?;
        let mut backends = Vec::new();
        for (i, name) in BACKEND_NAMES.iter().enumerate() {
            let n = i as u8 + 1;
            backends.push(BackendNode {
                name: name.to_string(),
                ns: NetNs::create(&format!("{base}-{name}"))?,
                addr: if flat {
                    Ipv4Addr::new(10, 20, 0, 10 + n)
                } else {
                    Ipv4Addr::new(10, 20, n, 2)
                },
                gateway: if flat {
                    FLAT_LB_ADDR
                } else {
                    Ipv4Addr::new(10, 20, n, 1)
                },
                // `1N` as written, i.e. hexadecimal 0x1N: 2001:db8:20::11, ::12, ::13.
                addr6: if flat {
                    Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10 + u16::from(n))
                } else {
                    Ipv6Addr::new(0x2001, 0xdb8, 0x20, u16::from(n), 0, 0, 0, 2)
                },
                gateway6: if flat {
                    FLAT_LB_ADDR6
                } else {
                    Ipv6Addr::new(0x2001, 0xdb8, 0x20, u16::from(n), 0, 0, 0, 1)
                },
                lb_iface: if flat {
                    FLAT_LB_INTERFACES[1].to_string()
                } else {
                    format!("xlb-{name}")
                },
            });
        }
        let topo = Topology {
            client,
            lb,
            backends,
            switch,
            router,
            options,
        };
        topo.configure()
            .with_context(|| format!("building the test topology {base}-*"))?;
        Ok(topo)
    }

    /// The load balancer's interfaces, as xlb's config lists them.
    pub fn lb_interfaces(&self) -> Vec<String> {
        let names: &[&str] = match self.options.layout {
            Layout::Routed => &LB_INTERFACES,
            Layout::Flat => &FLAT_LB_INTERFACES,
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    fn configure(&self) -> Result<()> {
        for ns in self.namespaces() {
            // IPv6 on (whatever the host's defaults), and without duplicate address
            // detection, also for the link-local addresses the interfaces get: a tentative
            // link-local address would keep the kernel from soliciting neighbours for the
            // packets it forwards for a second or two. Set before creating links so new
            // interfaces inherit it from `default`.
            for setting in [
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ] {
                sysctl(ns, setting)?;
            }
            ns.ip(&["link", "set", "lo", "up"])?;
        }

        // Strict reverse-path filtering, as many distributions set it: xlb must work with it
        // (what it hands to the kernel goes through the tc program's neighbour output,
        // which the filter does not see).
        let lb = &self.lb;
        sysctl(lb, "net.ipv4.ip_forward=1")?;
        sysctl(lb, "net.ipv6.conf.all.forwarding=1")?;
        sysctl(lb, "net.ipv4.conf.all.rp_filter=1")?;
        sysctl(lb, "net.ipv4.conf.default.rp_filter=1")?;

        // Client link: straight to the load balancer, or through the router.
        let (lb_addr, lb_addr6, gateway) = match &self.router {
            None => (LB_CLIENT_ADDR, LB_CLIENT_ADDR6, &self.client),
            Some(router) => (LB_ROUTER_SIDE_ADDR, LB_ROUTER_SIDE_ADDR6, router),
        };
        veth(lb, LB_INTERFACES[0], gateway, self.lb_client_peer())?;
        add_addr(lb, LB_INTERFACES[0], lb_addr.into())?;
        add_addr(lb, LB_INTERFACES[0], lb_addr6.into())?;
        lb.ip(&["link", "set", LB_INTERFACES[0], "up"])?;
        if let Some(mtu) = self.options.lb_client_mtu {
            lb.ip(&["link", "set", LB_INTERFACES[0], "mtu", &mtu.to_string()])?;
        }
        if let (Some(router), Some(mtu)) = (&self.router, self.options.router_mtu) {
            sysctl(router, "net.ipv4.ip_forward=1")?;
            sysctl(router, "net.ipv6.conf.all.forwarding=1")?;
            add_addr(router, "rt-l", ROUTER_ADDR.into())?;
            add_addr(router, "rt-l", ROUTER_ADDR6.into())?;
            router.ip(&["link", "set", "rt-l", "up"])?;
            self.peer_offloads(router, "rt-l")?;
            veth(router, "rt-c", &self.client, CLIENT_IFACE)?;
            add_addr(router, "rt-c", LB_CLIENT_ADDR.into())?;
            add_addr(router, "rt-c", LB_CLIENT_ADDR6.into())?;
            router.ip(&["link", "set", "rt-c", "mtu", &mtu.to_string(), "up"])?;
            default_route(router, LB_ROUTER_SIDE_ADDR.into())?;
            default_route(router, LB_ROUTER_SIDE_ADDR6.into())?;
            lb.ip(&[
                "route",
                "add",
                "10.10.1.0/24",
                "via",
                &ROUTER_ADDR.to_string(),
            ])?;
            lb.ip(&[
                "-6",
                "route",
                "add",
                "2001:db8:10:1::/64",
                "via",
                &ROUTER_ADDR6.to_string(),
            ])?;
        }
        let c = &self.client;
        add_addr(c, CLIENT_IFACE, CLIENT_ADDR.into())?;
        add_addr(c, CLIENT_IFACE, CLIENT_ADDR6.into())?;
        c.ip(&["link", "set", CLIENT_IFACE, "up"])?;
        default_route(c, LB_CLIENT_ADDR.into())?;
        default_route(c, LB_CLIENT_ADDR6.into())?;
        self.peer_offloads(c, CLIENT_IFACE)?;

        // Backend links.
        if let Some(sw) = &self.switch {
            sw.ip(&["link", "add", "br0", "type", "bridge"])?;
            sw.ip(&["link", "set", "br0", "up"])?;
            let lb_if = FLAT_LB_INTERFACES[1];
            veth(lb, lb_if, sw, "sw-lb")?;
            add_addr(lb, lb_if, FLAT_LB_ADDR.into())?;
            add_addr(lb, lb_if, FLAT_LB_ADDR6.into())?;
            lb.ip(&["link", "set", lb_if, "up"])?;
            sw.ip(&["link", "set", "sw-lb", "master", "br0", "up"])?;
            self.peer_offloads(sw, "sw-lb")?;
        }
        for b in &self.backends {
            if let Some(sw) = &self.switch {
                let port = format!("sw-{}", b.name);
                veth(sw, &port, &b.ns, BACKEND_IFACE)?;
                sw.ip(&["link", "set", &port, "master", "br0", "up"])?;
            } else {
                veth(lb, &b.lb_iface, &b.ns, BACKEND_IFACE)?;
                add_addr(lb, &b.lb_iface, b.gateway.into())?;
                add_addr(lb, &b.lb_iface, b.gateway6.into())?;
                lb.ip(&["link", "set", &b.lb_iface, "up"])?;
            }
            add_addr(&b.ns, BACKEND_IFACE, b.addr.into())?;
            add_addr(&b.ns, BACKEND_IFACE, b.addr6.into())?;
            b.ns.ip(&["link", "set", BACKEND_IFACE, "up"])?;
            default_route(&b.ns, b.gateway.into())?;
            default_route(&b.ns, b.gateway6.into())?;
            if self.switch.is_none() {
                self.peer_offloads(&b.ns, BACKEND_IFACE)?;
            }
        }

        for iface in self.lb_interfaces() {
            // Interfaces inherit `default`, but the effective value is max(all, iface):
            // set it explicitly so nothing depends on the inheritance rules.
            sysctl(lb, &format!("net.ipv4.conf.{iface}.rp_filter=1"))?;
            // See `peer_offloads` for why checksums must be complete on the wire.
            if self.options.veth_rules {
                lb.exec("ethtool", &["-K", &iface, "tx", "off"])?;
            }
        }
        Ok(())
    }

    /// The README's veth settings on the peer of one of the load balancer's interfaces,
    /// unless the options leave them out (see the free function [`peer_offloads`]).
    fn peer_offloads(&self, ns: &NetNs, iface: &str) -> Result<()> {
        if self.options.veth_rules {
            peer_offloads(ns, iface)?;
        }
        Ok(())
    }

    /// The interface at the other end of the load balancer's client-side link.
    fn lb_client_peer(&self) -> &'static str {
        if self.router.is_some() {
            "rt-l"
        } else {
            CLIENT_IFACE
        }
    }

    /// Pings the load balancer from the client and each backend's gateway from the backend,
    /// over IPv4 and IPv6, so a broken topology is reported as such and not as an xlb
    /// failure.
    pub fn check_connectivity(&self) -> Result<()> {
        cmd::require_tool("ping", "iputils-ping")?;
        let (lb_addr, lb_addr6) = if self.router.is_some() {
            (LB_ROUTER_SIDE_ADDR, LB_ROUTER_SIDE_ADDR6)
        } else {
            (LB_CLIENT_ADDR, LB_CLIENT_ADDR6)
        };
        ping(&self.client, lb_addr).context("client cannot reach the load balancer")?;
        ping(&self.client, lb_addr6).context("client cannot reach the load balancer over IPv6")?;
        for b in &self.backends {
            ping(&b.ns, b.gateway)
                .with_context(|| format!("backend {} cannot reach the load balancer", b.name))?;
            ping(&b.ns, b.gateway6).with_context(|| {
                format!(
                    "backend {} cannot reach the load balancer over IPv6",
                    b.name
                )
            })?;
        }
        Ok(())
    }

    /// The backend called `name` (`b1`, `b2`, `b3`).
    pub fn backend(&self, name: &str) -> Option<&BackendNode> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// All namespaces: client, lb, the switch (flat layout), the router, then the backends.
    pub fn namespaces(&self) -> Vec<&NetNs> {
        let mut v = vec![&self.client, &self.lb];
        v.extend(&self.switch);
        v.extend(&self.router);
        v.extend(self.backends.iter().map(|b| &b.ns));
        v
    }

    /// Names of all namespaces, e.g. to check after the drop that they are gone.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces()
            .iter()
            .map(|ns| ns.name().to_string())
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // First stop everything running anywhere in the network, then take it apart, so no
        // process sees its links disappear under it.
        for ns in self.namespaces() {
            ns.kill_processes();
        }
        for ns in self.namespaces() {
            if let Err(e) = ns.delete() {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// `ping -c 1 -W 2 addr` from inside `ns` (`ping -6` for an IPv6 address).
pub fn ping(ns: &NetNs, addr: impl Into<IpAddr>) -> Result<()> {
    let addr = addr.into();
    let family = if addr.is_ipv6() { "-6" } else { "-4" };
    ns.exec("ping", &[family, "-c", "1", "-W", "2", &addr.to_string()])?;
    Ok(())
}

/// Adds `addr` to `iface` in `ns` with this network's prefix lengths: /24 for IPv4, /64 for
/// IPv6, the latter without duplicate address detection (`nodad`), so it is usable at once.
fn add_addr(ns: &NetNs, iface: &str, addr: IpAddr) -> Result<()> {
    match addr {
        IpAddr::V4(a) => ns.ip(&["addr", "add", &format!("{a}/24"), "dev", iface])?,
        IpAddr::V6(a) => ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            iface,
            "nodad",
        ])?,
    };
    Ok(())
}

/// The default route of `gateway`'s family in `ns`, via `gateway`.
fn default_route(ns: &NetNs, gateway: IpAddr) -> Result<()> {
    let family = if gateway.is_ipv6() { "-6" } else { "-4" };
    ns.ip(&[
        family,
        "route",
        "add",
        "default",
        "via",
        &gateway.to_string(),
    ])?;
    Ok(())
}

fn sysctl(ns: &NetNs, setting: &str) -> Result<()> {
    ns.exec("sysctl", &["-q", "-w", setting])?;
    Ok(())
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`. The peer is created directly
/// in `b` (`peer ... netns b`), so neither end ever exists in the root namespace.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .with_context(|| {
        format!(
            "creating veth {a_if} ({}) <-> {b_if} ({})",
            a.name(),
            b.name()
        )
    })?;
    Ok(())
}

/// Offloads on the non-XDP end of a veth pair.
///
/// * GRO on: a veth only receives frames that its peer's XDP program sends with XDP_TX or
///   XDP_REDIRECT if it runs NAPI, which it does when it has GRO enabled (or an XDP program
///   of its own). Without it those frames are dropped silently.
/// * TX checksum offload off: otherwise the kernel hands veth packets with only the
///   pseudo-header checksum filled in (CHECKSUM_PARTIAL), XDP would update that unfinished
///   value incrementally, and the result would be wrong. With it off, packets carry real
///   checksums, and the receivers verify them (their nstat checksum error counters would
///   show any mistake of the XDP rewrite).
pub fn peer_offloads(ns: &NetNs, iface: &str) -> Result<()> {
    ns.exec("ethtool", &["-K", iface, "tx", "off"])?;
    ns.exec("ethtool", &["-K", iface, "gro", "on"])?;
    Ok(())
}

/// Namespace tests must not overlap in one test binary (their logs and timings would); every
/// test that builds a topology takes this lock through [`with_topology`].
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` on a fresh topology built with `options` and namespaces named
/// `<prefix>-<pid>-<n>-<role>`, one test at a time; then checks that every namespace is
/// gone, also when `test` failed or panicked. Panics with `test`'s error.
pub fn with_topology(prefix: &str, options: Options, test: impl FnOnce(&Topology) -> Result<()>) {
    if let Err(e) = crate::require_root() {
        panic!("{e}");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    match netns::cleanup_stale(prefix) {
        Ok(stale) if !stale.is_empty() => eprintln!("removed stale namespaces: {stale:?}"),
        Ok(_) => {}
        Err(e) => panic!("cleaning up stale namespaces: {e:#}"),
    }

    // Everything that lives in the namespaces (servers, xlb, the topology itself) is owned
    // inside this block, so it is torn down by the guards' Drop before the checks below, and
    // also when anything in `test` panics.
    let (names, result) = {
        let topo = Topology::build(prefix, options).expect("building the namespace topology");
        let names = topo.namespace_names();
        let result = test(&topo);
        drop(topo);
        (names, result)
    };

    let leftover = remaining_namespaces(&names);
    if let Err(e) = result {
        panic!("{e:#}\n(namespaces still present after cleanup: {leftover:?})");
    }
    assert!(
        leftover.is_empty(),
        "namespaces still present after the topology was dropped: {leftover:?}"
    );
}

/// Which of `names` `ip netns list` still shows.
fn remaining_namespaces(names: &[String]) -> Vec<String> {
    match netns::list() {
        Ok(present) => names
            .iter()
            .filter(|n| present.contains(n))
            .cloned()
            .collect(),
        Err(e) => vec![format!("(cannot list namespaces: {e:#})")],
    }
}
