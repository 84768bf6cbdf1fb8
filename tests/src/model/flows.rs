//! The reference model of connection tracking: which flow a frame belongs to, what it must be
//! rewritten to, and what state the flow is in. It learns flows only from what the program
//! sent out (the backend and SNAT port it chose) and from the config, never from the
//! program's maps, and holds the program to the rules a full NAT must keep:
//! * a new flow's packets leave from its service's SNAT address, with a port in the range
//!   (in `dnat` mode: from the client's own address and port), toward one of its service's
//!   backends;
//! * a flow keeps its backend and SNAT port;
//! * each (backend, SNAT address, SNAT port) belongs to one flow at a time;
//! * a reply goes from the VIP to the client whose flow owns the port it came to;
//! * a NAT gateway's flow (from its private network, not to it, to no service) keeps its
//!   destination and leaves from an address of the gateway's pool with a port (an ICMP
//!   echo: an identifier) of its range; a UDP one from the private endpoint's one public
//!   endpoint, which is no other private endpoint's (RFC 4787's endpoint-independent
//!   mapping).
//!
//! The state follows lb-common's rules ([`FlowState::of`], [`starts_anew`]): the same rules
//! the program runs, applied here to the packets the model saw, so a program that records a
//! flag in the wrong place, or in one entry only, disagrees with the model.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Result, bail, ensure};
use lb_common::{
    conntrack::{FlowSeen, FlowState, Seen, starts_anew},
    maps::{DIR_TO_BACKEND, DIR_TO_CLIENT, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP},
};
use lb_userspace::config::{Checked, Network};

/// One service, as the config says.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub vip: SocketAddr,
    pub proto: u8,
    /// The SNAT pool; empty in `dnat` mode, where the flow keeps the client's address and
    /// port.
    pub snat: Vec<IpAddr>,
    pub backends: Vec<SocketAddr>,
}

/// One NAT gateway, as the config says.
#[derive(Clone, Debug)]
pub struct GatewaySpec {
    pub source: Network,
    pub to: Vec<IpAddr>,
    pub ports: (u16, u16),
}

/// A tracked flow, as the model knows it. For a NAT gateway's flow, `vip` and `backend` are
/// both the destination.
#[derive(Clone, Debug)]
pub struct ModelFlow {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: u8,
    pub backend: SocketAddr,
    pub snat: SocketAddr,
    pub seen: FlowSeen,
    /// Through a NAT gateway (no backend of a service).
    pub gateway: bool,
}

impl ModelFlow {
    pub fn state(&self) -> FlowState {
        FlowState::of(self.proto, &self.seen)
    }

    /// The key of the flow's forward direction, client → VIP.
    pub fn forward_key(&self) -> FlowKey {
        key(self.client, self.vip, self.proto)
    }
}

/// A flow key from addresses of either family.
pub fn key(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, proto: u8) -> FlowKey {
    FlowKey {
        src: lb_common::maps::Endpoint::from_socket(src.into()),
        dst: lb_common::maps::Endpoint::from_socket(dst.into()),
        proto,
        _pad: 0,
    }
}

type Tuple = (SocketAddr, SocketAddr, u8);

fn tuple(k: &FlowKey) -> Tuple {
    (k.src.to_socket(), k.dst.to_socket(), k.proto)
}

/// The model: services from the config, flows from what the program did.
#[derive(Debug)]
pub struct FlowModel {
    services: Vec<ServiceSpec>,
    gateways: Vec<GatewaySpec>,
    ports: (u16, u16),
    /// A NAT gateway's UDP mappings: private endpoint → public endpoint.
    mappings: HashMap<SocketAddr, SocketAddr>,
    /// By forward tuple (client, VIP, protocol).
    flows: HashMap<Tuple, ModelFlow>,
    /// Reverse tuple (backend, SNAT address:port, protocol) → forward tuple.
    owners: HashMap<Tuple, Tuple>,
}

impl FlowModel {
    pub fn new(checked: &Checked) -> FlowModel {
        FlowModel {
            services: checked
                .services
                .iter()
                .map(|s| ServiceSpec {
                    vip: s.vip,
                    proto: s.protocol.number(),
                    snat: s.snat.clone(),
                    backends: s.backends.iter().map(|b| b.address).collect(),
                })
                .collect(),
            gateways: checked
                .gateways
                .iter()
                .map(|g| {
                    let ports = checked.gateway_ports(g);
                    GatewaySpec {
                        source: g.source,
                        to: g.to.clone(),
                        ports: (ports.first, ports.last),
                    }
                })
                .collect(),
            ports: (checked.snat_ports.first, checked.snat_ports.last),
            mappings: HashMap::new(),
            flows: HashMap::new(),
            owners: HashMap::new(),
        }
    }

    /// Whether some service listens on `addr` (whose pings the program answers).
    pub fn is_vip(&self, addr: IpAddr) -> bool {
        self.services.iter().any(|s| s.vip.ip() == addr)
    }

    /// The service a frame with `key` is addressed to.
    pub fn service(&self, key: &FlowKey) -> Option<&ServiceSpec> {
        let (_, dst, proto) = tuple(key);
        self.services
            .iter()
            .find(|s| s.vip == dst && s.proto == proto)
    }

    /// The NAT gateway a first frame with `key` goes out through: the one of the longest
    /// prefix that holds its source, unless one holds its destination too, or it is
    /// addressed to a service. Of ICMP and ICMPv6, only echo requests (`key` as `flow_key`
    /// makes it: the identifier in the source port) start flows.
    pub fn gateway(&self, key: &FlowKey, echo_request: bool) -> Option<&GatewaySpec> {
        let (src, dst, proto) = tuple(key);
        let icmp = proto == PROTO_ICMP || proto == PROTO_ICMPV6;
        if self.service(key).is_some() || (icmp && !echo_request) {
            return None;
        }
        if self.gateways.iter().any(|g| g.source.contains(dst.ip())) {
            return None;
        }
        self.gateways
            .iter()
            .filter(|g| g.source.contains(src.ip()))
            .max_by_key(|g| g.source.prefix)
    }

    /// The tracked flow a frame with `key` belongs to, and the direction it goes.
    pub fn flow(&self, key: &FlowKey) -> Option<(&ModelFlow, u8)> {
        let t = tuple(key);
        if let Some(f) = self.flows.get(&t) {
            return Some((f, DIR_TO_BACKEND));
        }
        let forward = self.owners.get(&t)?;
        Some((&self.flows[forward], DIR_TO_CLIENT))
    }

    /// What a frame with `key` of a tracked flow must be rewritten to: (source, destination).
    pub fn rewrite(&self, key: &FlowKey) -> Option<(SocketAddr, SocketAddr)> {
        let (f, dir) = self.flow(key)?;
        Some(if dir == DIR_TO_BACKEND {
            (f.snat, f.backend)
        } else {
            (f.vip, f.client)
        })
    }

    /// Records a frame with `key` and TCP flags `tcp_flags` (0 for UDP) that reached a
    /// tracked flow, as the program records it.
    pub fn observe(&mut self, key: &FlowKey, tcp_flags: u8) {
        let Some((_, dir)) = self.flow(key) else {
            return;
        };
        let t = tuple(key);
        let forward = if dir == DIR_TO_BACKEND {
            t
        } else {
            self.owners[&t]
        };
        let flow = self.flows.get_mut(&forward).expect("owners point at flows");
        let anew = starts_anew(key.proto, dir, tcp_flags, &flow.seen);
        flow.seen
            .record(dir, &Seen::of_packet(key.proto, tcp_flags), anew);
    }

    /// Learns the flow the program created for a first frame with `key` (and `tcp_flags`),
    /// which it sent out as `src` → `dst`; fails if that choice breaks a rule of full NAT.
    pub fn learn(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<()> {
        let t = tuple(key);
        ensure!(!self.flows.contains_key(&t), "{t:?} is tracked already");
        let Some(service) = self.service(key) else {
            return self.learn_gateway(key, tcp_flags, src, dst);
        };
        match &service.snat[..] {
            [] => ensure!(
                src == t.0,
                "a new flow to the dnat service {} leaves from {src}, not from the client {}",
                service.vip,
                t.0
            ),
            pool => {
                ensure!(
                    pool.contains(&src.ip()),
                    "a new flow to {} leaves from {src}, not from the service's SNAT pool \
                     {pool:?}",
                    service.vip,
                );
                ensure!(
                    (self.ports.0..=self.ports.1).contains(&src.port()),
                    "SNAT port {} is outside {:?}",
                    src.port(),
                    self.ports
                );
            }
        }
        ensure!(
            service.backends.contains(&dst),
            "a new flow to {} goes to {dst}, not one of its backends {:?}",
            service.vip,
            service.backends
        );
        self.insert(key, tcp_flags, src, dst, false)
    }

    /// `learn` for a flow through a NAT gateway.
    fn learn_gateway(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<()> {
        let t = tuple(key);
        // An ICMP key here is an echo request's: the caller checks that the program made a
        // flow of nothing else.
        let Some(g) = self.gateway(key, key.proto == PROTO_ICMP || key.proto == PROTO_ICMPV6)
        else {
            bail!("a new flow for {t:?}, which is addressed to no service and no gateway's");
        };
        ensure!(
            dst == t.1,
            "a flow through {} goes to {dst}, not its destination {}",
            g.source,
            t.1
        );
        ensure!(
            g.to.contains(&src.ip()) && (g.ports.0..=g.ports.1).contains(&src.port()),
            "a flow through {} leaves from {src}, not from {:?} with a port in {:?}",
            g.source,
            g.to,
            g.ports
        );
        if key.proto == PROTO_UDP {
            match self.mappings.get(&t.0) {
                Some(mapped) => ensure!(
                    *mapped == src,
                    "{} is mapped to {mapped}, but its flow to {dst} leaves from {src}",
                    t.0
                ),
                None => {
                    if let Some((other, _)) = self.mappings.iter().find(|(_, p)| **p == src) {
                        bail!("{} gets {src}, the public endpoint of {other}", t.0);
                    }
                    self.mappings.insert(t.0, src);
                }
            }
        }
        self.insert(key, tcp_flags, src, dst, true)
    }

    /// Records the new flow of `key` sent out as `src` → `dst`, whose reverse tuple must be
    /// no other flow's.
    fn insert(
        &mut self,
        key: &FlowKey,
        tcp_flags: u8,
        src: SocketAddr,
        dst: SocketAddr,
        gateway: bool,
    ) -> Result<()> {
        let t = tuple(key);
        let reverse = (dst, src, key.proto);
        if let Some(owner) = self.owners.get(&reverse) {
            bail!("{src} toward {dst} is handed to {t:?}, but {owner:?} holds it");
        }
        self.owners.insert(reverse, t);
        let facts = Seen::of_packet(key.proto, tcp_flags);
        self.flows.insert(
            t,
            ModelFlow {
                client: t.0,
                vip: t.1,
                proto: key.proto,
                backend: dst,
                snat: src,
                seen: FlowSeen::first(DIR_TO_BACKEND, facts),
                gateway,
            },
        );
        Ok(())
    }

    /// Whether a new flow with `key` to a `dnat` service finds the (backend, client address
    /// and port) it would take held by another flow already: the client used that port
    /// toward another VIP that shares a backend.
    pub fn dnat_tuple_taken(&self, key: &FlowKey) -> bool {
        let (client, _, proto) = tuple(key);
        self.service(key).is_some_and(|s| {
            s.snat.is_empty()
                && s.backends
                    .iter()
                    .any(|b| self.owners.contains_key(&(*b, client, proto)))
        })
    }

    pub fn flows(&self) -> impl Iterator<Item = &ModelFlow> {
        self.flows.values()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::conntrack::{TCP_ACK, TCP_SYN};
    use lb_common::maps::PROTO_TCP;
    use lb_userspace::config::Config;

    const CONFIG: &str = r#"
[dataplane]
interfaces = ["x"]
snat_port_range = [1000, 1999]
[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
"#;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn holds_the_program_to_the_rules_of_full_nat() {
        let checked = Config::parse(CONFIG).unwrap().validate().unwrap();
        let mut m = FlowModel::new(&checked);
        let k = key(sa("10.10.1.2:40000"), sa("10.10.0.100:80"), PROTO_TCP);
        let (snat, backend) = (sa("10.20.0.1:1500"), sa("10.20.1.2:8080"));
        // Wrong source address, port out of range, a backend of no service.
        assert!(m.learn(&k, TCP_SYN, sa("10.20.0.2:1500"), backend).is_err());
        assert!(m.learn(&k, TCP_SYN, sa("10.20.0.1:2500"), backend).is_err());
        assert!(m.learn(&k, TCP_SYN, snat, sa("10.20.1.3:8080")).is_err());
        m.learn(&k, TCP_SYN, snat, backend).unwrap();
        // A second flow on the same port toward the same backend.
        let k2 = key(sa("10.10.1.2:40001"), sa("10.10.0.100:80"), PROTO_TCP);
        assert!(m.learn(&k2, TCP_SYN, snat, backend).is_err());
        // The reply is the client's.
        let reply = key(backend, snat, PROTO_TCP);
        assert_eq!(
            m.rewrite(&reply),
            Some((sa("10.10.0.100:80"), sa("10.10.1.2:40000")))
        );
        assert_eq!(m.rewrite(&k), Some((snat, backend)));
        m.observe(&reply, TCP_SYN | TCP_ACK);
        assert_eq!(m.flow(&k).unwrap().0.state(), FlowState::New);
        m.observe(&k, TCP_ACK);
        assert_eq!(m.flow(&k).unwrap().0.state(), FlowState::Established);
    }
}
