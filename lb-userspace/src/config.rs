//! The TOML configuration: parsed with serde, then [`Config::validate`]d into the checked
//! form the loader uses. Every error names the field it is about.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
};

use lb_common::maps::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
    MAX_INTERFACES, PROTO_TCP, PROTO_UDP,
};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and how the XDP program runs.
    #[serde(default)]
    pub dataplane: Dataplane,
    /// The services to balance (`[[service]]` tables).
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[dataplane]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Dataplane {
    /// Interfaces the program attaches to; `xlb run --iface` replaces this list.
    pub interfaces: Vec<String>,
    /// `auto` (native, falling back to generic), `native` or `generic`.
    pub xdp_mode: XdpModeConfig,
    /// Capacity of the connection-tracking LRU map; each flow takes two entries.
    pub conntrack_entries: u32,
    /// Slots per service in the Maglev table; must be a prime.
    pub maglev_table_size: u32,
    /// Most services the maps can hold.
    pub max_services: u32,
    /// Most backends, over all services, the maps can hold.
    pub max_backends: u32,
    /// SNAT source ports handed out to flows, `[first, last]` inclusive.
    pub snat_port_range: [u16; 2],
    /// Seed of the flow hash; nodes sharing traffic behind ECMP must use the same one.
    pub hash_seed: u32,
    /// Seconds a TCP flow may be idle before its SNAT port may go to a new flow (the flow
    /// itself keeps working until then, and after, unless its port was taken).
    pub tcp_idle_timeout: u32,
    /// The same for UDP, where every new client port is a new flow.
    pub udp_idle_timeout: u32,
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            interfaces: Vec::new(),
            xdp_mode: XdpModeConfig::Auto,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            maglev_table_size: DEFAULT_MAGLEV_SIZE,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            snat_port_range: [1024, 65535],
            hash_seed: 0x786c_6221,
            tcp_idle_timeout: 7200,
            udp_idle_timeout: 60,
        }
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
    /// What clients connect to: "address:port".
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Only `fullnat` for now.
    #[serde(default)]
    pub mode: Mode,
    /// Source address used toward backends (full NAT). Backends must route it back through
    /// xlb.
    pub snat: Option<String>,
    /// `[[service.backend]]` tables.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
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

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rewrite destination to the backend and source to the SNAT address and a port.
    #[default]
    Fullnat,
}

/// `[[service.backend]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// "address:port" of the backend.
    pub address: String,
    /// Relative share of new flows; 0 takes no new flows but keeps its existing ones.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// A config that passed [`Config::validate`]: addresses parsed, limits checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub dataplane: Dataplane,
    pub services: Vec<Service>,
}

impl Checked {
    /// The data path's settings, as the XDP program reads them from `CONFIG`.
    pub fn map_config(&self) -> lb_common::maps::Config {
        let dp = &self.dataplane;
        let [first, last] = dp.snat_port_range;
        lb_common::maps::Config {
            maglev_size: dp.maglev_table_size,
            hash_seed: dp.hash_seed,
            snat_port_first: first as u32,
            snat_port_count: (last - first) as u32 + 1,
            tcp_idle_timeout_s: dp.tcp_idle_timeout,
            udp_idle_timeout_s: dp.udp_idle_timeout,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    pub snat: Ipv4Addr,
    pub backends: Vec<Backend>,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.protocol)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddrV4,
    pub weight: u32,
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
        if dp.conntrack_entries < 2 {
            err(
                "dataplane.conntrack_entries".into(),
                format!(
                    "must be at least 2 (each flow takes two), got {}",
                    dp.conntrack_entries
                ),
            );
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
        let [first, last] = dp.snat_port_range;
        if first == 0 || first > last {
            err(
                "dataplane.snat_port_range".into(),
                format!("must be [first, last] with 1 <= first <= last, got [{first}, {last}]"),
            );
        }

        for (field, value) in [
            ("tcp_idle_timeout", dp.tcp_idle_timeout),
            ("udp_idle_timeout", dp.udp_idle_timeout),
        ] {
            if value == 0 {
                err(
                    format!("dataplane.{field}"),
                    "must be at least 1 second".into(),
                );
            }
        }

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
            let snat = match &s.snat {
                None => {
                    err(at("snat"), "mode fullnat needs a snat address".into());
                    None
                }
                Some(text) => parse_ipv4(text).map_err(|p| err(at("snat"), p)).ok(),
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
                backends.push(Backend {
                    address,
                    weight: b.weight,
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
            if let (Some(vip), Some(snat)) = (vip, snat) {
                services.push(Service {
                    vip,
                    protocol: s.protocol,
                    snat,
                    backends,
                });
            }
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

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Checked {
            dataplane: dp.clone(),
            services,
        })
    }
}

fn parse_endpoint(text: &str) -> Result<SocketAddrV4, String> {
    match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(sa)) if sa.port() == 0 => Err(format!("{text:?}: port 0 is not a port")),
        Ok(SocketAddr::V4(sa)) if sa.ip().is_unspecified() || sa.ip().is_broadcast() => {
            Err(format!("{text:?}: not a unicast address"))
        }
        Ok(SocketAddr::V4(sa)) => Ok(sa),
        Ok(SocketAddr::V6(_)) => Err(format!("{text:?}: IPv6 is not supported yet")),
        Err(_) => Err(format!(
            "{text:?} is not \"address:port\" (for example \"10.0.0.1:80\")"
        )),
    }
}

fn parse_ipv4(text: &str) -> Result<Ipv4Addr, String> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) if a.is_unspecified() || a.is_broadcast() => {
            Err(format!("{text:?}: not a unicast address"))
        }
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(format!("{text:?}: IPv6 is not supported yet")),
        Err(_) => Err(format!("{text:?} is not an IPv4 address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
interfaces = ["xlb-lb0"]
xdp_mode = "auto"
conntrack_entries = 1048576

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
    fn the_readme_example_is_valid() {
        let c = Config::parse(GOOD).unwrap().validate().unwrap();
        assert_eq!(c.dataplane.interfaces, ["xlb-lb0"]);
        assert_eq!(c.dataplane.maglev_table_size, 65537);
        let s = &c.services[0];
        assert_eq!(s.vip, "10.10.0.100:80".parse().unwrap());
        assert_eq!(s.backends[0].weight, 2);
        assert_eq!(s.backends[1].weight, 1, "weight defaults to 1");
    }

    #[test]
    fn every_error_names_its_field() {
        let text = GOOD
            .replace("10.10.0.100:80", "10.10.0.100")
            .replace("snat = \"10.20.0.1\"", "snat = \"ten\"")
            .replace("10.20.0.12:8080", "10.20.0.11:8080")
            .replace("conntrack_entries = 1048576", "maglev_table_size = 65536");
        let p = problems(&text);
        let expect = [
            "service[0].vip: \"10.10.0.100\" is not \"address:port\"",
            "service[0].snat: \"ten\" is not an IPv4 address",
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
        let p = problems(&GOOD.replace("[dataplane]", "[dataplane]\nudp_idle_timeout = 0"));
        assert!(
            p.iter()
                .any(|p| p.starts_with("dataplane.udp_idle_timeout")),
            "{p:?}"
        );
        let p = problems(&GOOD.replace("10.20.0.11:8080", "[::1]:8080"));
        assert!(
            p.iter().any(|p| p.contains("IPv6 is not supported yet")),
            "{p:?}"
        );
        let p = problems(
            &GOOD
                .replace("[[service]]", "[[service]]\n")
                .replace("snat = \"10.20.0.1\"", ""),
        );
        assert!(p.iter().any(|p| p.starts_with("service[0].snat")), "{p:?}");
    }
}
