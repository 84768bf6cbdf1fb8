//! Kernel SNMP counters of a namespace, read with `nstat -asz`: absolute values (`-a`),
//! without touching nstat's history file (`-s`), zero counters included (`-z`). Tests take
//! a snapshot before and after the traffic and compare, so whatever history file an earlier
//! run left behind does not matter.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use crate::netns::NetNs;

/// Counters that must not move while traffic goes through xlb: a receiver found a bad
/// TCP, UDP, IPv4 header, ICMP, UDP/IPv6 or ICMPv6 checksum, i.e. the XDP rewrite got a
/// checksum wrong (TCP's counter is both families').
pub const CHECKSUM_COUNTERS: [&str; 6] = [
    "TcpInCsumErrors",
    "UdpInCsumErrors",
    "IpExtInCsumErrors",
    "IcmpInCsumErrors",
    "Udp6InCsumErrors",
    "Icmp6InCsumErrors",
];

/// One snapshot of a namespace's counters.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    values: BTreeMap<String, u64>,
}

impl Counters {
    /// Reads the counters of `ns`.
    pub fn read(ns: &NetNs) -> Result<Counters> {
        let out = ns
            .exec("nstat", &["-asz"])
            .context("reading SNMP counters (is iproute2's nstat installed?)")?;
        Ok(Counters::parse(&out.stdout))
    }

    /// Parses nstat output: `#kernel` header, then `Name  value  rate` lines.
    pub fn parse(text: &str) -> Counters {
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let name = words.next()?;
                let value = words.next()?.parse().ok()?;
                Some((name.to_string(), value))
            })
            .collect();
        Counters { values }
    }

    /// The counter's value. A counter the kernel does not report is an error, not 0: a
    /// misspelt name would otherwise make every check on it pass.
    pub fn get(&self, name: &str) -> Result<u64> {
        self.values
            .get(name)
            .copied()
            .with_context(|| format!("nstat reports no counter {name:?}"))
    }

    /// How much `name` grew from `before` to `self`; an error if either lacks it.
    pub fn delta(&self, before: &Counters, name: &str) -> Result<u64> {
        Ok(self.get(name)?.saturating_sub(before.get(name)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_diffs() {
        let before = Counters::parse("#kernel\nTcpInCsumErrors   3   0.0\nUdpInCsumErrors 0 0.0\n");
        let after = Counters::parse("#kernel\nTcpInCsumErrors   5   0.0\nIpInReceives 100 0.0\n");
        assert_eq!(after.delta(&before, "TcpInCsumErrors").unwrap(), 2);
        assert_eq!(after.get("IpInReceives").unwrap(), 100);
        // Missing on either side: an error, never a silent 0.
        assert!(after.delta(&before, "UdpInCsumErrors").is_err());
        assert!(after.get("Missing").is_err());
    }
}

/// Every namespace's counters at one moment, to compare with later.
#[derive(Debug)]
pub struct Snapshot(Vec<(String, Counters)>);

impl Snapshot {
    pub fn take(namespaces: &[&NetNs]) -> Result<Snapshot> {
        namespaces
            .iter()
            .map(|ns| Ok((ns.name().to_string(), Counters::read(ns)?)))
            .collect::<Result<_>>()
            .map(Snapshot)
    }

    /// Fails, naming each namespace and counter, if any of [`CHECKSUM_COUNTERS`] grew in
    /// `namespaces` (the same, in the same order) since the snapshot. Receivers verify every
    /// checksum (TX offload is off on all veths, see the topology), so a single wrong
    /// checksum from the XDP rewrite shows up here.
    pub fn no_checksum_errors_since(&self, namespaces: &[&NetNs]) -> Result<()> {
        let now = Snapshot::take(namespaces)?;
        let mut errors = Vec::new();
        for ((ns, before), (_, after)) in self.0.iter().zip(&now.0) {
            for counter in CHECKSUM_COUNTERS {
                let delta = after
                    .delta(before, counter)
                    .with_context(|| format!("checksum counters of {ns}"))?;
                if delta != 0 {
                    errors.push(format!("{ns}: {counter} +{delta}"));
                }
            }
        }
        anyhow::ensure!(errors.is_empty(), "checksum errors: {errors:?}");
        Ok(())
    }
}
