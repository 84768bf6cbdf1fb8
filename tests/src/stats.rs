//! Parses the counters xlb prints (on exit, and every N seconds with `--stats-interval`).
//! Each snapshot sits between a `stats begin` and a `stats end` line, one record per line, a
//! leading word, then space-separated `key=value` fields:
//!
//! ```text
//! stats begin
//! service vip=10.10.0.100:80 proto=tcp flows=300 packets_in=1800 bytes_in=123 packets_out=1500 bytes_out=456
//! backend service=10.10.0.100:80/tcp address=10.20.1.2:8080 weight=2 flows=150 packets_in=900 bytes_in=1 packets_out=700 bytes_out=2
//! reason name=forward/redirect packets=3300
//! handoff name=sent packets=12
//! interface name=xlb-b1 xdp_send_errors=0
//! conntrack flows=2 entries=4 capacity=1024 expired=298 pruned=0 sweep_ms=0.4
//! conntrack_state name=established flows=2
//! stats end
//! ```
//!
//! Counters count from xlb's start, so only the last snapshot is parsed. A line is a record
//! when its leading word is one of the above and every other word is `key=value`; anything
//! else (log lines, the `ready:` line, blank lines) is ignored. A record that lacks a field or
//! has a non-numeric counter is an error: that is a format mismatch between xlb and this
//! parser, which should fail loudly.

use std::collections::{BTreeMap, HashMap};

/// The first line of each snapshot xlb prints.
pub const SNAPSHOT_START: &str = "stats begin";
/// Its last line.
pub const SNAPSHOT_END: &str = "stats end";

use anyhow::{Context, Result, anyhow};
use lb_common::maps::Handoff;

/// Packet and byte counters of one service or backend, in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Flows created.
    pub flows: u64,
    /// Client → backend.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend → client.
    pub packets_out: u64,
    pub bytes_out: u64,
}

/// A `service` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStats {
    /// `10.10.0.100:80`.
    pub vip: String,
    /// `tcp` or `udp`.
    pub proto: String,
    pub traffic: Traffic,
}

impl ServiceStats {
    /// The name backend records use for this service: `<vip>/<proto>`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.vip, self.proto)
    }
}

/// A `backend` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStats {
    /// The service it belongs to: `10.10.0.100:80/tcp`.
    pub service: String,
    /// `10.20.1.2:8080`.
    pub address: String,
    pub weight: u64,
    pub traffic: Traffic,
}

/// Everything parsed from one xlb run's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub backends: Vec<BackendStats>,
    /// Packets per reason name (`forward/redirect`, `drop/truncated`, ...).
    pub reasons: BTreeMap<String, u64>,
    /// Frames per handoff outcome (`sent`, `failed`).
    pub handoffs: BTreeMap<String, u64>,
    /// Frames the kernel failed to send for XDP, per interface, since xlb started.
    pub send_errors: BTreeMap<String, u64>,
    /// The `conntrack` record's fields (`flows`, `entries`, `capacity`, `expired`, ...).
    pub conntrack: BTreeMap<String, u64>,
    /// Flows per state name.
    pub states: BTreeMap<String, u64>,
}

impl Stats {
    /// Parses xlb's output; see the module docs for the format.
    pub fn parse(text: &str) -> Result<Stats> {
        let mut stats = Stats::default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .rposition(|l| l.starts_with(SNAPSHOT_START))
            .unwrap_or(0);
        for (n, line) in lines.iter().enumerate().skip(start) {
            let mut words = line.split_whitespace();
            let Some(kind) = words.next() else { continue };
            if !matches!(
                kind,
                "service"
                    | "backend"
                    | "reason"
                    | "handoff"
                    | "interface"
                    | "conntrack"
                    | "conntrack_state"
            ) {
                continue;
            }
            let Some(fields) = words
                .map(|w| w.split_once('='))
                .collect::<Option<HashMap<&str, &str>>>()
            else {
                continue; // Not all key=value: a log line that happens to start with the word.
            };
            if fields.is_empty() {
                continue;
            }
            let record = Record { fields: &fields };
            let parsed = match kind {
                "service" => record.service().map(|s| stats.services.push(s)),
                "backend" => record.backend().map(|b| stats.backends.push(b)),
                "reason" => record.named("packets").map(|(name, n)| {
                    stats.reasons.insert(name, n);
                }),
                "handoff" => record.named("packets").map(|(name, n)| {
                    stats.handoffs.insert(name, n);
                }),
                "interface" => record.named("xdp_send_errors").map(|(name, n)| {
                    stats.send_errors.insert(name, n);
                }),
                "conntrack_state" => record.named("flows").map(|(name, n)| {
                    stats.states.insert(name, n);
                }),
                _ => record.numbers().map(|fields| stats.conntrack = fields),
            };
            parsed.with_context(|| format!("xlb stats line {}: {line:?}", n + 1))?;
        }
        Ok(stats)
    }

    /// The service on `vip` (`10.10.0.100:80`) with `proto` (`tcp`).
    pub fn service(&self, vip: &str, proto: &str) -> Option<&ServiceStats> {
        self.services
            .iter()
            .find(|s| s.vip == vip && s.proto == proto)
    }

    /// Flows of the service on `vip` with `proto`; `None` if xlb printed no such service.
    pub fn service_flows(&self, vip: &str, proto: &str) -> Option<u64> {
        self.service(vip, proto).map(|s| s.traffic.flows)
    }

    /// The backend `address` of `service` (`10.10.0.100:80/tcp`). The service matters: the
    /// same address can be a backend of several services.
    pub fn backend(&self, service: &str, address: &str) -> Option<&BackendStats> {
        self.backends
            .iter()
            .find(|b| b.service == service && b.address == address)
    }

    /// Flows of backend `address` of `service`; `None` if xlb printed no such backend.
    pub fn backend_flows(&self, service: &str, address: &str) -> Option<u64> {
        self.backend(service, address).map(|b| b.traffic.flows)
    }

    /// Packets counted under reason `name`; 0 if xlb did not print it.
    pub fn reason(&self, name: &str) -> u64 {
        self.reasons.get(name).copied().unwrap_or(0)
    }

    /// Frames the tc program counted under `outcome`; 0 if xlb did not print it.
    pub fn handoff(&self, outcome: Handoff) -> u64 {
        self.handoffs.get(outcome.name()).copied().unwrap_or(0)
    }

    /// Reasons starting with `prefix` (e.g. `drop/`) that counted packets.
    pub fn nonzero_reasons(&self, prefix: &str) -> Vec<(&str, u64)> {
        self.reasons
            .iter()
            .filter(|(name, packets)| name.starts_with(prefix) && **packets > 0)
            .map(|(name, packets)| (name.as_str(), *packets))
            .collect()
    }
}

/// The `key=value` fields of one record.
struct Record<'a> {
    fields: &'a HashMap<&'a str, &'a str>,
}

impl Record<'_> {
    fn text(&self, key: &str) -> Result<String> {
        self.fields
            .get(key)
            .map(|v| v.to_string())
            .ok_or_else(|| anyhow!("missing field `{key}`"))
    }

    fn number(&self, key: &str) -> Result<u64> {
        let v = self
            .fields
            .get(key)
            .ok_or_else(|| anyhow!("missing field `{key}`"))?;
        v.parse()
            .with_context(|| format!("field `{key}={v}` is not a number"))
    }

    fn traffic(&self) -> Result<Traffic> {
        Ok(Traffic {
            flows: self.number("flows")?,
            packets_in: self.number("packets_in")?,
            bytes_in: self.number("bytes_in")?,
            packets_out: self.number("packets_out")?,
            bytes_out: self.number("bytes_out")?,
        })
    }

    fn service(&self) -> Result<ServiceStats> {
        Ok(ServiceStats {
            vip: self.text("vip")?,
            proto: self.text("proto")?,
            traffic: self.traffic()?,
        })
    }

    fn backend(&self) -> Result<BackendStats> {
        Ok(BackendStats {
            service: self.text("service")?,
            address: self.text("address")?,
            weight: self.number("weight")?,
            traffic: self.traffic()?,
        })
    }

    /// A `name=... <counter>=N` record.
    fn named(&self, counter: &str) -> Result<(String, u64)> {
        Ok((self.text("name")?, self.number(counter)?))
    }

    /// Every field, as a number.
    fn numbers(&self) -> Result<BTreeMap<String, u64>> {
        self.fields
            .keys()
            .map(|k| {
                // sweep_ms and the like may have a fraction: keep the whole part.
                let v = self.fields[k];
                let whole = v.split('.').next().unwrap_or(v);
                whole
                    .parse()
                    .map(|n| (k.to_string(), n))
                    .with_context(|| format!("field `{k}={v}` is not a number"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ready: attached to xlb-c xlb-b1 xlb-b2 xlb-b3
stats begin
reason name=forward/redirect packets=1
stats end
stats begin
some log line, ignored
service vip=10.10.0.100:80 proto=tcp flows=300 packets_in=1800 bytes_in=123 packets_out=1500 bytes_out=456
service vip=10.10.0.100:53 proto=udp flows=50 packets_in=50 bytes_in=10 packets_out=50 bytes_out=20
backend service=10.10.0.100:80/tcp address=10.20.1.2:8080 weight=2 flows=150 packets_in=900 bytes_in=1 packets_out=700 bytes_out=2
backend service=10.10.0.100:80/tcp address=10.20.2.2:8080 weight=1 flows=75 packets_in=450 bytes_in=1 packets_out=400 bytes_out=2
backend service=10.10.0.100:53/udp address=10.20.1.2:8080 weight=1 flows=17 packets_in=17 bytes_in=1 packets_out=17 bytes_out=2

reason name=forward/redirect packets=3300
reason name=drop/truncated packets=0
reason name=pass/no_service packets=12
handoff name=sent packets=7
interface name=xlb-b1 xdp_send_errors=3
conntrack flows=2 entries=4 capacity=1024 expired=298 pruned=0 sweep_ms=0.4
conntrack_state name=established flows=2
stats end
";

    #[test]
    fn parses_all_record_kinds() {
        let s = Stats::parse(SAMPLE).unwrap();
        assert_eq!(s.services.len(), 2);
        assert_eq!(s.backends.len(), 3);
        assert_eq!(s.service_flows("10.10.0.100:80", "tcp"), Some(300));
        assert_eq!(s.service_flows("10.10.0.100:53", "udp"), Some(50));
        assert_eq!(s.service_flows("10.10.0.100:81", "tcp"), None);
        let tcp = s.service("10.10.0.100:80", "tcp").unwrap();
        assert_eq!(tcp.label(), "10.10.0.100:80/tcp");
        assert_eq!(
            tcp.traffic,
            Traffic {
                flows: 300,
                packets_in: 1800,
                bytes_in: 123,
                packets_out: 1500,
                bytes_out: 456
            }
        );
    }

    #[test]
    fn backends_are_looked_up_per_service() {
        let s = Stats::parse(SAMPLE).unwrap();
        assert_eq!(
            s.backend_flows("10.10.0.100:80/tcp", "10.20.1.2:8080"),
            Some(150)
        );
        assert_eq!(
            s.backend_flows("10.10.0.100:53/udp", "10.20.1.2:8080"),
            Some(17)
        );
        assert_eq!(
            s.backend_flows("10.10.0.100:80/tcp", "10.20.3.2:8080"),
            None
        );
        let b = s.backend("10.10.0.100:80/tcp", "10.20.1.2:8080").unwrap();
        assert_eq!(b.weight, 2);
        assert_eq!(b.traffic.packets_out, 700);
    }

    #[test]
    fn the_last_snapshot_counts() {
        let s = Stats::parse(SAMPLE).unwrap();
        assert_eq!(
            s.reason("forward/redirect"),
            3300,
            "not 3301: snapshots are not added"
        );
        assert_eq!(s.handoffs["sent"], 7);
        assert_eq!(s.send_errors["xlb-b1"], 3);
        assert_eq!(s.conntrack["flows"], 2);
        assert_eq!(s.conntrack["expired"], 298);
        assert_eq!(s.conntrack["sweep_ms"], 0);
        assert_eq!(s.states["established"], 2);
    }

    #[test]
    fn reasons_default_to_zero() {
        let s = Stats::parse(SAMPLE).unwrap();
        assert_eq!(s.reason("forward/redirect"), 3300);
        assert_eq!(s.reason("drop/truncated"), 0);
        assert_eq!(s.reason("drop/internal"), 0);
        assert_eq!(s.nonzero_reasons("drop/"), vec![]);
        assert_eq!(s.nonzero_reasons("pass/"), vec![("pass/no_service", 12)]);
    }

    #[test]
    fn ignores_other_lines() {
        let s = Stats::parse("service started on 4 interfaces\nreason\nhello=1\n").unwrap();
        assert_eq!(s, Stats::default());
    }

    #[test]
    fn rejects_incomplete_records() {
        let err = Stats::parse("service vip=10.10.0.100:80 proto=tcp flows=1\n").unwrap_err();
        assert!(format!("{err:#}").contains("packets_in"), "{err:#}");
        let err = Stats::parse("reason name=drop/internal packets=many\n").unwrap_err();
        assert!(format!("{err:#}").contains("not a number"), "{err:#}");
    }

    #[test]
    fn empty_output_parses_to_nothing() {
        let s = Stats::parse("").unwrap();
        assert!(s.services.is_empty() && s.backends.is_empty() && s.reasons.is_empty());
        assert_eq!(s.reason("forward/redirect"), 0);
    }
}
