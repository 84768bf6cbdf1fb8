//! `xlb doctor [--config FILE]`: what a host needs before traffic flows, checked one by one,
//! each with what to do about a failure. It changes nothing on the host.

use std::path::Path;

use aya::util::KernelVersion;

use crate::{
    client::Client,
    config::{Checked, DEFAULT_PIN_PATH, DEFAULT_SOCKET},
    ethtool, loader, pins, veth,
};

/// How one check went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but worse than it could.
    Warn,
    /// xlb will not work until this is fixed.
    Fail,
}

pub struct Check {
    pub verdict: Verdict,
    pub what: String,
    /// What was found, and for a warning or failure, what to do.
    pub detail: String,
}

fn check(verdict: Verdict, what: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        verdict,
        what: what.into(),
        detail: detail.into(),
    }
}

/// Runs every check; those about interfaces, SNAT ports and the pin path need the config.
pub async fn run(cfg: Option<&Checked>, socket: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match KernelVersion::current() {
        Ok(v) if v >= KernelVersion::new(6, 6, 0) => check(Verdict::Ok, "kernel", format!("{v}")),
        Ok(v) => check(
            Verdict::Fail,
            "kernel",
            format!("{v}: xlb needs Linux 6.6 or later (TCX links for its tc program)"),
        ),
        Err(e) => check(
            Verdict::Fail,
            "kernel",
            format!("cannot read the version: {e}"),
        ),
    });
    checks.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check(Verdict::Ok, "BTF", "/sys/kernel/btf/vmlinux")
    } else {
        check(
            Verdict::Warn,
            "BTF",
            "no /sys/kernel/btf/vmlinux: a kernel built with CONFIG_DEBUG_INFO_BTF is \
             recommended",
        )
    });
    let pin_path = cfg.map_or(Path::new(DEFAULT_PIN_PATH), |c| {
        c.dataplane.pin_path.as_path()
    });
    checks.push(bpffs(pin_path));

    if let Some(cfg) = cfg {
        for interface in &cfg.dataplane.interfaces {
            checks.push(interface_check(interface, loader::forwarded_families(cfg)));
        }
        match veth::check(&cfg.dataplane.interfaces).await {
            Ok(problems) if problems.is_empty() => {
                checks.push(check(Verdict::Ok, "veth peers", "nothing to fix"))
            }
            Ok(problems) => {
                for p in problems {
                    checks.push(check(Verdict::Warn, "veth peer", p.to_string()));
                }
            }
            Err(e) => checks.push(check(Verdict::Warn, "veth peers", format!("{e:#}"))),
        }
        checks.push(check(
            Verdict::Ok,
            "SNAT ports",
            format!(
                "{} (clear of the host's ephemeral ports where a SNAT address is the host's \
                 own)",
                cfg.snat_ports
            ),
        ));
    }
    checks.push(rp_filter());
    checks.push(daemon(socket).await);
    checks
}

fn bpffs(pin_path: &Path) -> Check {
    if pins::on_bpffs(pin_path) {
        check(
            Verdict::Ok,
            "bpffs",
            format!("{} is on bpffs", pin_path.display()),
        )
    } else {
        check(
            Verdict::Fail,
            "bpffs",
            format!(
                "{} is not on bpffs, so the data plane cannot be pinned there: mount -t bpf \
                 bpf /sys/fs/bpf, and give a pin_path under it",
                pin_path.display()
            ),
        )
    }
}

fn interface_check(interface: &str, families: &[&str]) -> Check {
    if let Err(e) = loader::ifindex(interface) {
        return check(
            Verdict::Fail,
            format!("interface {interface}"),
            format!("{e:#}"),
        );
    }
    for family in families {
        if let Err(e) = loader::check_forwarding(interface, family) {
            return check(
                Verdict::Fail,
                format!("interface {interface}"),
                format!("{e:#}"),
            );
        }
    }
    let driver = ethtool::driver(interface)
        .ok()
        .flatten()
        .unwrap_or_default();
    // Drivers with native XDP (XDP_REDIRECT target too) in mainline Linux.
    const NATIVE: &[&str] = &[
        "veth",
        "virtio_net",
        "mlx5_core",
        "mlx4_en",
        "i40e",
        "ice",
        "ixgbe",
        "igb",
        "igc",
        "bnxt_en",
        "ena",
        "nfp",
        "qede",
        "tun",
        "gve",
        "stmmac",
        "mvneta",
        "sfc",
        "hv_netvsc",
    ];
    if NATIVE.contains(&driver.as_str()) {
        check(
            Verdict::Ok,
            format!("interface {interface}"),
            format!(
                "driver {driver}: native XDP; forwarding on ({})",
                families.join(", ")
            ),
        )
    } else {
        check(
            Verdict::Warn,
            format!("interface {interface}"),
            format!(
                "driver {driver:?} is not known to have native XDP: xlb falls back to generic \
                 mode (xdp_mode = \"auto\"), which is slower"
            ),
        )
    }
}

fn rp_filter() -> Check {
    let value = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    check(
        Verdict::Ok,
        "rp_filter",
        format!(
            "net.ipv4.conf.all.rp_filter = {value}: any value works, since what xlb forwards \
             skips the kernel's input checks"
        ),
    )
}

async fn daemon(socket: &Path) -> Check {
    match Client::new(socket.to_path_buf())
        .with_timeout(std::time::Duration::from_secs(5))
        .call(hyper::Method::GET, "/v1/status", None)
        .await
    {
        Ok(status) => check(
            Verdict::Ok,
            "daemon",
            format!(
                "running (pid {}) on {}: `xlb run` would be refused until it stops",
                status["pid"],
                socket.display()
            ),
        ),
        Err(e) if format!("{e:#}").contains("permission denied") => check(
            Verdict::Warn,
            "daemon",
            format!(
                "{} exists but this user may not use it (the API is root's): run doctor as \
                 root to know whether a daemon runs",
                socket.display()
            ),
        ),
        Err(e) if format!("{e:#}").contains("no answer within") => check(
            Verdict::Fail,
            "daemon",
            format!(
                "one on {} takes connections but does not answer: stopped (SIGSTOP; `kill \
                 -CONT` it) or stuck (its log says why); `xlb run` would be refused",
                socket.display()
            ),
        ),
        Err(_) => check(
            Verdict::Ok,
            "daemon",
            format!(
                "none on {} (default {DEFAULT_SOCKET}): `xlb run` may start",
                socket.display()
            ),
        ),
    }
}
