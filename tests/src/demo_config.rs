//! The xlb configuration that the end-to-end test and the demo run against the
//! [`topology`](crate::topology). Kept in one place so both exercise the same setup.

/// xlb config: a weighted TCP service (b1 has weight 2) and an unweighted UDP service on
/// the same VIP, both full NAT with the SNAT address 10.20.0.1, over all four load
/// balancer interfaces.
pub const CONFIG_TOML: &str = r#"[dataplane]
interfaces = ["xlb-c", "xlb-b1", "xlb-b2", "xlb-b3"]
xdp_mode = "auto"

[conntrack]
entries = 32768

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
mode = "fullnat"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
weight = 2
[[service.backend]]
address = "10.20.2.2:8080"
[[service.backend]]
address = "10.20.3.2:8080"

[[service]]
vip = "10.10.0.100:53"
protocol = "udp"
mode = "fullnat"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
[[service.backend]]
address = "10.20.2.2:8080"
[[service.backend]]
address = "10.20.3.2:8080"
"#;

/// How xlb names the TCP service in its stats output (`backend service=...`).
pub const TCP_SERVICE: &str = "10.10.0.100:80/tcp";
/// How xlb names the UDP service in its stats output.
pub const UDP_SERVICE: &str = "10.10.0.100:53/udp";

/// A backend of the TCP service as configured: server name, address, weight.
#[derive(Debug, Clone, Copy)]
pub struct WeightedBackend {
    pub name: &'static str,
    pub address: &'static str,
    pub weight: u32,
}

/// The TCP service's backends and weights, matching [`CONFIG_TOML`] (weight 1 when the
/// config leaves it out).
pub const TCP_BACKENDS: [WeightedBackend; 3] = [
    WeightedBackend {
        name: "b1",
        address: "10.20.1.2:8080",
        weight: 2,
    },
    WeightedBackend {
        name: "b2",
        address: "10.20.2.2:8080",
        weight: 1,
    },
    WeightedBackend {
        name: "b3",
        address: "10.20.3.2:8080",
        weight: 1,
    },
];

/// Expected share of the TCP service's flows for `b` (weight / total weight).
pub fn expected_share(b: &WeightedBackend) -> f64 {
    let total: u32 = TCP_BACKENDS.iter().map(|b| b.weight).sum();
    f64::from(b.weight) / f64::from(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_mentions_every_backend_and_the_weight() {
        for b in TCP_BACKENDS {
            assert!(CONFIG_TOML.contains(b.address), "{}", b.address);
        }
        assert!(CONFIG_TOML.contains("weight = 2"));
        let total: f64 = TCP_BACKENDS.iter().map(expected_share).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
