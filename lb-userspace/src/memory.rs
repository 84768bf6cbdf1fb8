//! How much memory xlb may still take when it starts: what the host has available, and what
//! its memory cgroup (and each cgroup above it) leaves under its limit. The kernel charges
//! a BPF map's memory to the cgroup of the process that makes it, so under a systemd
//! `MemoryMax` or a container's limit a preallocated conntrack table fails there, whatever
//! the host has free.
//!
//! Both cgroup versions are read: v2 (`memory.max`, `memory.current` in the unified
//! hierarchy, at /sys/fs/cgroup or, on hybrid hosts, /sys/fs/cgroup/unified) and v1
//! (`memory.limit_in_bytes`, `memory.usage_in_bytes` under /sys/fs/cgroup/memory).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// What limits the memory xlb may take: the smaller of the host's and its cgroups'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    /// Bytes xlb may still take.
    pub bytes: u64,
    /// Where that figure comes from.
    pub limit: Limit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The host's `MemAvailable`.
    Host,
    /// A memory cgroup's limit, `bytes` in all, at `dir`.
    Cgroup { dir: PathBuf, bytes: u64 },
}

impl std::fmt::Display for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.limit {
            Limit::Host => write!(f, "this host has {} MiB available", self.bytes >> 20),
            Limit::Cgroup { dir, bytes } => write!(
                f,
                "xlb's memory cgroup ({}) has {} MiB left under its limit of {} MiB",
                dir.display(),
                self.bytes >> 20,
                bytes >> 20
            ),
        }
    }
}

/// The room this process has now (reads /proc/meminfo, /proc/self/cgroup and the cgroup
/// files).
pub fn room() -> anyhow::Result<Room> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    // Without cgroups (or /proc/self/cgroup), only the host's memory limits.
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    room_from(&meminfo, &cgroups, &|path| {
        std::fs::read_to_string(path).ok()
    })
}

/// The room given the texts of /proc/meminfo (`meminfo`) and /proc/self/cgroup
/// (`self_cgroup`), reading cgroup files through `read`.
pub fn room_from(
    meminfo: &str,
    self_cgroup: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> anyhow::Result<Room> {
    let mut room = Room {
        bytes: available_memory(meminfo)?,
        limit: Limit::Host,
    };
    for (root, dir) in memory_cgroups(self_cgroup, read) {
        for level in dir.ancestors().take_while(|level| level.starts_with(&root)) {
            if let Some((limit, used)) = limit_and_usage(level, read)
                && limit.saturating_sub(used) < room.bytes
            {
                room = Room {
                    bytes: limit.saturating_sub(used),
                    limit: Limit::Cgroup {
                        dir: level.to_path_buf(),
                        bytes: limit,
                    },
                };
            }
        }
    }
    Ok(room)
}

/// The memory the host has available, in bytes: `MemAvailable` in `meminfo`, the text of
/// /proc/meminfo.
pub fn available_memory(meminfo: &str) -> anyhow::Result<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .context("/proc/meminfo has no MemAvailable line in kB")?;
    Ok(kib * 1024)
}

/// The memory cgroups the process is in, as /proc/self/cgroup names them (`self_cgroup`),
/// each as its hierarchy's root and its own directory: the v1 memory controller's, and the
/// unified hierarchy's where it has the memory controller (a `memory.max` is there to
/// read).
pub fn memory_cgroups(
    self_cgroup: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Vec<(PathBuf, PathBuf)> {
    let mut dirs = Vec::new();
    for line in self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            // Unified: at /sys/fs/cgroup, or next to the v1 hierarchies on a hybrid host.
            if let Some(found) = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .iter()
                .map(|root| (PathBuf::from(root), Path::new(root).join(path)))
                .find(|(_, dir)| read(&dir.join("memory.max")).is_some())
            {
                dirs.push(found);
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let root = PathBuf::from("/sys/fs/cgroup/memory");
            dirs.push((root.clone(), root.join(path)));
        }
    }
    dirs
}

/// A cgroup's memory limit and what it uses, if it has a limit (v2 `memory.max` "max" and
/// v1's page-rounded `i64::MAX` are none).
fn limit_and_usage(dir: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Option<(u64, u64)> {
    let number = |file: &str| -> Option<u64> { read(&dir.join(file))?.trim().parse().ok() };
    let (limit, used) = match number("memory.max") {
        Some(limit) => (limit, number("memory.current")?),
        None => (
            number("memory.limit_in_bytes")?,
            number("memory.usage_in_bytes")?,
        ),
    };
    (limit < 1 << 62).then_some((limit, used))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const MEMINFO: &str = "MemTotal:       24684000 kB\nMemAvailable:   1048576 kB\n";

    fn files(entries: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = entries
            .iter()
            .map(|(p, v)| (PathBuf::from(p), v.to_string()))
            .collect();
        move |path: &Path| map.get(path).cloned()
    }

    #[test]
    fn without_a_limited_cgroup_the_host_limits() {
        // A v2 cgroup with no limit, and a v1 memory cgroup whose limit is "none".
        let read = files(&[
            (
                "/sys/fs/cgroup/system.slice/xlb.service/memory.max",
                "max\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/xlb.service/memory.current",
                "1000\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "max\n"),
            (
                "/sys/fs/cgroup/memory/a/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            ("/sys/fs/cgroup/memory/a/memory.usage_in_bytes", "5000\n"),
        ]);
        for cgroups in ["0::/system.slice/xlb.service\n", "4:memory:/a\n0::/\n", ""] {
            let room = room_from(MEMINFO, cgroups, &read).unwrap();
            assert_eq!(
                room,
                Room {
                    bytes: 1 << 30,
                    limit: Limit::Host
                },
                "{cgroups:?}"
            );
            assert_eq!(room.to_string(), "this host has 1024 MiB available");
        }
    }

    #[test]
    fn the_tightest_cgroup_on_the_way_up_limits() {
        // v2: the service has 256 MiB with 56 used; its slice 512 MiB with 400 used, which
        // leaves less.
        let read = files(&[
            (
                "/sys/fs/cgroup/system.slice/xlb.service/memory.max",
                "268435456\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/xlb.service/memory.current",
                "58720256\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "536870912\n"),
            ("/sys/fs/cgroup/system.slice/memory.current", "419430400\n"),
        ]);
        let room = room_from(MEMINFO, "0::/system.slice/xlb.service\n", &read).unwrap();
        assert_eq!(room.bytes, 112 << 20);
        assert_eq!(
            room.to_string(),
            "xlb's memory cgroup (/sys/fs/cgroup/system.slice) has 112 MiB left under its \
             limit of 512 MiB"
        );
        // v1 on a hybrid host: the memory controller's line, and a unified hierarchy
        // without the memory controller (no memory.max) beside it.
        let read = files(&[
            (
                "/sys/fs/cgroup/memory/pod/memory.limit_in_bytes",
                "104857600\n",
            ),
            (
                "/sys/fs/cgroup/memory/pod/memory.usage_in_bytes",
                "4194304\n",
            ),
        ]);
        let room = room_from(
            MEMINFO,
            "4:memory:/pod\n1:cpu,cpuacct:/pod\n0::/pod\n",
            &read,
        )
        .unwrap();
        assert_eq!(room.bytes, 96 << 20);
        assert_eq!(
            room.limit,
            Limit::Cgroup {
                dir: PathBuf::from("/sys/fs/cgroup/memory/pod"),
                bytes: 100 << 20
            }
        );
        // Over its limit already: no room at all.
        let read = files(&[
            ("/sys/fs/cgroup/unified/x/memory.max", "1000\n"),
            ("/sys/fs/cgroup/unified/x/memory.current", "2000\n"),
        ]);
        assert_eq!(room_from(MEMINFO, "0::/x\n", &read).unwrap().bytes, 0);
    }

    #[test]
    fn unreadable_host_memory_is_an_error() {
        for broken in ["", "MemAvailable: lots\n", "MemAvailable: 400000 MB\n"] {
            room_from(broken, "", &files(&[])).unwrap_err();
        }
    }
}
