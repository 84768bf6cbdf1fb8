//! `cargo xtask setup`: makes a bare Debian machine able to build and test xlb. Every step
//! checks first and does nothing when already done, so a second run takes a second or two.

use std::process::Command;

use anyhow::Context as _;

use crate::run;

/// Debian packages: LLVM 22 for bpf-linker (the LLVM of our rustc), the tools the tests and
/// the demo drive (ip, nstat, ethtool, ping), what the benchmarks compare xlb with and
/// measure it by (nginx backends, nftables, HAProxy, wrk), and the charts' font. The
/// benchmarks run nginx and HAProxy themselves, in their namespaces: installed, their
/// system services stay off ([`SERVICES`]).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "procps",
    "ethtool",
    "iputils-ping",
    "nginx",
    "haproxy",
    "nftables",
    "wrk",
    "fonts-dejavu-core",
];
/// The packages of [`APT_PACKAGES`] whose Debian install enables and starts a system
/// service, with the service's unit. Left running, nginx's default site would listen on
/// port 80 of every address of the host.
const SERVICES: &[(&str, &str)] = &[("nginx", "nginx.service"), ("haproxy", "haproxy.service")];
/// Debian's hook that the packages' install scripts ask before they start a service: exit
/// code 101 says no.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The bpf-linker `setup` installs when none works: the one verified with LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain the eBPF crate builds with (`-Z build-std=core` needs nightly + rust-src).
const EBPF_TOOLCHAIN: &str = "nightly";

pub fn ensure() -> anyhow::Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    // One that a setup killed while it installed left behind.
    if std::fs::read_to_string(POLICY_RC_D).is_ok_and(|text| text == NO_STARTS_SCRIPT) {
        std::fs::remove_file(POLICY_RC_D).with_context(|| format!("removing {POLICY_RC_D}"))?;
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    // The units that exist already are the host's own (an nginx built by hand, say):
    // left as they are.
    let systemd = std::path::Path::new("/run/systemd/system").exists();
    let new_units: Vec<(&str, &str)> = SERVICES
        .iter()
        .filter(|(p, unit)| systemd && missing.contains(p) && !unit_exists(unit))
        .copied()
        .collect();
    let installed = {
        let _no_starts = NoServiceStarts::install()?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    // Enabled by their install even so (they would start at the next boot): disabled.
    for (package, unit) in new_units {
        eprintln!("setup: leaving {package}'s system service off (the benchmarks run their own)");
        if let Err(e) = run(Command::new("systemctl").args(["disable", "--now", "--quiet", unit])) {
            eprintln!("setup: warning: {e:#}");
        }
    }
    installed
}

/// Whether systemd knows `unit`.
fn unit_exists(unit: &str) -> bool {
    Command::new("systemctl")
        .args(["list-unit-files", "--no-legend", unit])
        .output()
        .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
}

/// The `policy-rc.d` [`NoServiceStarts`] writes: its text tells it from the host's own.
const NO_STARTS_SCRIPT: &str =
    "#!/bin/sh\n# cargo xtask setup: no service starts while it installs packages\nexit 101\n";

/// While it lives, the packages' install scripts start no service: a `policy-rc.d` (at the
/// path it holds, if it made it) that says no, unless the host has one of its own (which
/// then decides).
struct NoServiceStarts(Option<std::path::PathBuf>);

impl NoServiceStarts {
    fn install() -> anyhow::Result<NoServiceStarts> {
        NoServiceStarts::install_at(std::path::Path::new(POLICY_RC_D))
    }

    fn install_at(path: &std::path::Path) -> anyhow::Result<NoServiceStarts> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        // The host's own file (or link) stays, and is never written through.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(path);
        let mut file = match file {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok(NoServiceStarts(None));
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        let guard = NoServiceStarts(Some(path.to_path_buf()));
        file.write_all(NO_STARTS_SCRIPT.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(guard)
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .context("running rustup (is Rust installed with rustup?)")?;
    if !installed.status.success() {
        eprintln!(
            "setup: installing the {EBPF_TOOLCHAIN} toolchain with rust-src (the eBPF crate's)"
        );
        return run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to {EBPF_TOOLCHAIN}");
    run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    // The default build wants a newer LLVM than Debian has and finds LLVM 14 first; build it
    // against LLVM 22 explicitly (see shared/toolchain.md), in the version known to work
    // so (a later one may drop the feature).
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a minute or two)"
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// bpffs is not always mounted on a fresh machine; xlb's roadmap pins maps there.
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook is made, says no, and goes with the guard; a file or link of the host's at
    /// its place is left as it is, and not written through.
    #[test]
    fn no_service_starts_only_while_it_lives_and_leaves_the_hosts_own() {
        let dir = std::env::temp_dir().join(format!("xlb-setup-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hook = dir.join("policy-rc.d");
        {
            let _guard = NoServiceStarts::install_at(&hook).unwrap();
            let status = Command::new(&hook).status().unwrap();
            assert_eq!(status.code(), Some(101));
        }
        assert!(!hook.exists(), "the hook outlived its guard");

        let theirs = dir.join("theirs");
        std::fs::write(&theirs, "#!/bin/sh\nexit 0\n").unwrap();
        std::os::unix::fs::symlink(&theirs, &hook).unwrap();
        drop(NoServiceStarts::install_at(&hook).unwrap());
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "#!/bin/sh\nexit 0\n"
        );
        assert!(hook.is_symlink(), "the host's link was removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
