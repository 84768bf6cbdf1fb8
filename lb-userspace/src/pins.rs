//! The pinned data plane: what lets it outlive the daemon. Under `[dataplane] pin_path`
//! (default `/sys/fs/bpf/xlb`) live the maps of [`names::PINNED`] by name, and one link per
//! interface for the XDP program (`xdp@IF`) and one for the tc handoff program (`tc@IF`).
//! While the links are pinned the program stays attached, with no daemon running; a new
//! daemon loads its program onto the pinned maps and swaps it into the links in place
//! (`bpf_link_update`), so no packet goes unprocessed and no flow is lost.
//!
//! Before reusing pinned maps the daemon checks that they are the ones it would make: the
//! layout version in `CONFIG`, and every map's key size, value size and capacity. A
//! mismatch is refused with what to do, never misread; a difference that changes how well
//! the maps work, not what they mean (a conntrack table that is not preallocated), is
//! adopted with a warning. The directory is locked (`flock`) while a daemon owns it, so two
//! daemons never drive one data plane.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData};
use lb_common::{
    maps::{
        BackendEntry, FlowKey, FlowStats, LAYOUT_VERSION, Mapping, MappingKey, NatEntry,
        ServiceEntry, ServiceKey, Settings, names,
    },
    reason::Reason,
};

use crate::config::Checked;

/// The pin directory, locked for this daemon.
pub struct PinDir {
    path: PathBuf,
    /// Holds the `flock`; released when the daemon exits, however it exits.
    _lock: File,
    /// Whether the maps were pinned already when the daemon started.
    pub adopted: bool,
    /// What the adopted maps lack that this xlb would make, for the daemon to print.
    pub warnings: Vec<String>,
}

/// How long [`PinDir::open`] waits for the pin directory's lock.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

impl PinDir {
    /// Creates (or opens) the directory, locks it, and checks what is pinned there against
    /// `cfg`.
    pub fn open(cfg: &Checked) -> anyhow::Result<PinDir> {
        let path = cfg.dataplane.pin_path.clone();
        if !on_bpffs(&path) {
            bail!(
                "dataplane.pin_path {} is not on bpffs, where BPF maps and links can be \
                 pinned: give a directory under /sys/fs/bpf (is bpffs mounted there? `mount \
                 -t bpf bpf /sys/fs/bpf`; `xlb doctor` checks)",
                path.display()
            );
        }
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "creating the pin directory {} (is bpffs mounted on /sys/fs/bpf? `mount -t \
                 bpf bpf /sys/fs/bpf`; `xlb doctor` checks)",
                path.display()
            )
        })?;
        let lock = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // Asked again for a moment before giving up: a lock let go of stays held while a
        // process forked in the meantime (to exec a command) still shares its file.
        let until = std::time::Instant::now() + LOCK_PATIENCE;
        // SAFETY: flock on an fd we own.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
            if std::time::Instant::now() >= until {
                bail!(
                    "another xlb daemon owns the data plane pinned at {} (stop it first, or \
                     give this one another dataplane.pin_path)",
                    path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let adopted = check(&path, cfg)?;
        Ok(PinDir {
            path,
            _lock: lock,
            adopted: adopted.is_some(),
            warnings: adopted.unwrap_or_default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn xdp_link(&self, interface: &str) -> PathBuf {
        self.path.join(format!("xdp@{interface}"))
    }

    pub fn tc_link(&self, interface: &str) -> PathBuf {
        self.path.join(format!("tc@{interface}"))
    }

    /// The links pinned for interfaces other than `interfaces`, by interface.
    pub fn links_except(
        &self,
        interfaces: &[String],
    ) -> anyhow::Result<std::collections::BTreeMap<String, Vec<PathBuf>>> {
        let mut stale: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(interface) = link_interface(&name) else {
                continue;
            };
            if !interfaces.iter().any(|i| i == interface) {
                stale
                    .entry(interface.to_string())
                    .or_default()
                    .push(entry.path());
            }
        }
        Ok(stale)
    }

    /// Unpins what is xlb's: the links (which detaches the programs once our own handles
    /// close) and the maps (freed once nothing uses them), and removes the directory if
    /// that leaves it empty. Whatever else is there (a directory shared with other tools,
    /// bpffs's root) is left alone.
    pub fn remove(&self) -> anyhow::Result<()> {
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let mut others = 0;
        for entry in entries.flatten() {
            if !is_ours(&entry.file_name().to_string_lossy()) {
                others += 1;
                continue;
            }
            std::fs::remove_file(entry.path())
                .with_context(|| format!("unpinning {}", entry.path().display()))?;
        }
        if others > 0 {
            log::info!(
                "left {}: it holds {others} file(s) that are not xlb's",
                self.path.display()
            );
            return Ok(());
        }
        match std::fs::remove_dir(&self.path) {
            // A mount point (bpffs's root itself) stays.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            removed => removed.with_context(|| format!("removing {}", self.path.display())),
        }
    }
}

/// The interface a pinned link is for, from its name (`xdp@IF` or `tc@IF`); `None` for
/// anything else.
fn link_interface(name: &str) -> Option<&str> {
    name.strip_prefix("xdp@")
        .or_else(|| name.strip_prefix("tc@"))
        .filter(|interface| !interface.is_empty())
}

/// Whether xlb pins a file of this name: one of its maps, or a link.
fn is_ours(name: &str) -> bool {
    names::PINNED.contains(&name) || link_interface(name).is_some()
}

/// Whether `path`, or where it would be made (its nearest existing ancestor), is on bpffs:
/// the only file system the kernel pins BPF objects in.
pub fn on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes one struct statfs, which `st` is.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path; `st` is writable.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// What a pinned map must be: key size, value size, capacity.
fn expected(cfg: &Checked) -> Vec<(&'static str, u32, u32, u32)> {
    let dp = &cfg.dataplane;
    let size = |n: usize| n as u32;
    vec![
        (
            names::SERVICES,
            size(size_of::<ServiceKey>()),
            size(size_of::<ServiceEntry>()),
            dp.max_services,
        ),
        (names::MAGLEV, 4, 8, dp.max_services * dp.maglev_table_size),
        (
            names::BACKENDS,
            4,
            size(size_of::<BackendEntry>()),
            dp.max_backends,
        ),
        (
            names::CONNTRACK,
            size(size_of::<FlowKey>()),
            size(size_of::<NatEntry>()),
            cfg.conntrack.map_entries(),
        ),
        (names::CONFIG, 4, size(size_of::<Settings>()), 1),
        (names::REASONS, 4, 8, Reason::COUNT),
        (
            names::SERVICE_STATS,
            4,
            size(size_of::<FlowStats>()),
            dp.max_services,
        ),
        (
            names::BACKEND_STATS,
            4,
            size(size_of::<FlowStats>()),
            dp.max_backends,
        ),
        (names::HANDOFFS, 4, 8, lb_common::maps::Handoff::COUNT),
        (names::ACTIVE, 4, 8, dp.max_backends),
        (
            names::RELEASED,
            size(size_of::<FlowKey>()),
            4,
            cfg.conntrack.entries,
        ),
        (
            names::GATEWAYS,
            // The trie's key: a prefix length, then the address.
            4 + 16,
            size(size_of::<ServiceEntry>()),
            dp.max_services,
        ),
        (
            names::MAPPINGS,
            size(size_of::<MappingKey>()),
            size(size_of::<Mapping>()),
            cfg.conntrack.map_entries(),
        ),
    ]
}

/// The config settings a pinned map's capacity follows, for the message.
fn setting_of(name: &str) -> &'static str {
    match name {
        names::SERVICES | names::SERVICE_STATS | names::GATEWAYS => "dataplane.max_services",
        names::MAGLEV => "dataplane.max_services × dataplane.maglev_table_size",
        names::BACKENDS | names::BACKEND_STATS | names::ACTIVE => "dataplane.max_backends",
        names::CONNTRACK | names::RELEASED | names::MAPPINGS => "conntrack.entries",
        _ => "the map layout (another xlb version)",
    }
}

/// Whether every map is pinned and fits `cfg` (with what they lack that a fresh start would
/// make, as warnings), or none is (`None`); anything else is refused.
fn check(dir: &Path, cfg: &Checked) -> anyhow::Result<Option<Vec<String>>> {
    let present: Vec<&str> = names::PINNED
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let refuse = |problem: String| -> anyhow::Error {
        anyhow::anyhow!(
            "the data plane pinned at {dir} does not fit this xlb and config: {problem}. Its \
             maps hold the open flows. Run xlb with the settings it was made with; or start \
             afresh, losing every open flow: stop the daemon that owns it with SIGTERM, or \
             `rm -r {dir}` if none runs",
            dir = dir.display()
        )
    };
    if present.len() != names::PINNED.len() {
        let missing: Vec<&str> = names::PINNED
            .iter()
            .copied()
            .filter(|n| !present.contains(n))
            .collect();
        return Err(refuse(format!("maps {missing:?} are missing")));
    }
    let mut warnings = Vec::new();
    for (name, key, value, entries) in expected(cfg) {
        let map = MapData::from_pin(dir.join(name))
            .with_context(|| format!("opening the pinned map {}", dir.join(name).display()))?;
        let info = map
            .info()
            .with_context(|| format!("pinned map {name}: its info"))?;
        if info.key_size() != key || info.value_size() != value {
            return Err(refuse(format!(
                "map {name} has {}-byte keys and {}-byte values, this xlb uses {key} and {value}",
                info.key_size(),
                info.value_size()
            )));
        }
        if info.max_entries() != entries {
            return Err(refuse(format!(
                "map {name} holds {} entries, the config asks for {entries} ({})",
                info.max_entries(),
                setting_of(name)
            )));
        }
        // A conntrack table made by an xlb from before it was preallocated grows with use.
        // It works, and keeps its flows, but a new flow's inserts allocate (slower, and they
        // can fail for want of memory below the capacity); only a data plane made afresh is
        // preallocated.
        if name == names::CONNTRACK && info.map_flags() & NO_PREALLOC != 0 {
            warnings.push(format!(
                "the adopted conntrack table ({}) was made by an older xlb and is not \
                 preallocated: new flows allocate its entries, which is slower and can fail \
                 for want of memory. It keeps its flows; to have it preallocated, start afresh \
                 once the open flows may go (stop xlb with SIGTERM, which unpins the data \
                 plane, then start it)",
                dir.join(name).display()
            ));
        }
        if name == names::CONFIG {
            let settings: Array<MapData, Settings> = Map::Array(map).try_into()?;
            let version = settings.get(&0, 0)?.layout_version;
            if version != LAYOUT_VERSION {
                return Err(refuse(format!(
                    "its layout version is {version}, this xlb's is {LAYOUT_VERSION}"
                )));
            }
        }
    }
    Ok(Some(warnings))
}

/// `BPF_F_NO_PREALLOC`, a hash map's flag (linux/bpf.h).
const NO_PREALLOC: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_xlbs_own_files_are_its_pins() {
        for name in names::PINNED {
            assert!(is_ours(name), "{name}");
        }
        assert_eq!(link_interface("xdp@eth1"), Some("eth1"));
        assert_eq!(link_interface("tc@xlb0"), Some("xlb0"));
        for other in ["xlb.toml", "xlb.sock", "cilium@eth0", "xdp@", "tc", "mymap"] {
            assert!(!is_ours(other), "{other}");
        }
    }

    #[test]
    fn a_directory_off_bpffs_is_no_pin_path() {
        let dir = std::env::temp_dir();
        assert!(!on_bpffs(&dir));
        assert!(!on_bpffs(&dir.join("not/made/yet")));
        // Where bpffs is mounted (`cargo xtask setup` mounts it), a path under it is.
        let bpf = Path::new("/sys/fs/bpf");
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        assert_eq!(on_bpffs(&bpf.join("xlb-not-made-yet")), mounted);
    }
}
