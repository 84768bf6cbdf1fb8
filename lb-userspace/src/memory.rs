//! How much memory xlb may still take when it starts: what the host has available, and what
//! its memory cgroups leave under their limits. The kernel charges a BPF map's memory to
//! the cgroup of the process that makes it, so under a systemd `MemoryMax` or a
//! container's limit the preallocated maps fail there, whatever the host has free.
//!
//! Both cgroup versions are read, wherever they are mounted (/proc/self/mountinfo): v2's
//! `memory.max` and `memory.current`, v1's `memory.limit_in_bytes` and
//! `memory.usage_in_bytes`, at the process's cgroup and each one above it. A cgroup's room
//! counts its inactive file cache as free (the kernel reclaims that first before it fails a
//! charge); the host's `MemAvailable` counts more of the cache as free than that.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// What xlb may take, and what limits it: the smallest of the host's and its cgroups'.
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
    /// The memory cgroup at `dir`, limited to `limit_bytes` in all.
    Cgroup { dir: PathBuf, limit_bytes: u64 },
}

impl Limit {
    /// The second remedy for a shortfall under this limit, to follow the first: under a
    /// cgroup's, raising it.
    pub fn or_raise_it(&self) -> &'static str {
        match self {
            Limit::Host => "",
            Limit::Cgroup { .. } => ", or raise the cgroup's limit",
        }
    }
}

impl std::fmt::Display for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.limit {
            Limit::Host => write!(f, "this host has {} MiB available", self.bytes >> 20),
            Limit::Cgroup { dir, limit_bytes } => write!(
                f,
                "the memory cgroup that holds xlb ({}) has {} MiB left under its limit of \
                 {} MiB",
                dir.display(),
                self.bytes >> 20,
                limit_bytes >> 20
            ),
        }
    }
}

/// The room this process has now, from /proc/meminfo, /proc/self/cgroup,
/// /proc/self/mountinfo and the cgroups' files.
pub fn room() -> anyhow::Result<Room> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    // Without them, only the host's memory limits.
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    room_from(&meminfo, &cgroups, &mounts, &|path| {
        std::fs::read_to_string(path).ok()
    })
}

/// The room given the texts of /proc/meminfo (`meminfo`), /proc/self/cgroup
/// (`self_cgroup`) and /proc/self/mountinfo (`mountinfo`), reading the cgroups' files
/// through `read`.
pub fn room_from(
    meminfo: &str,
    self_cgroup: &str,
    mountinfo: &str,
    read: &dyn Fn(&Path) -> Option<String>,
) -> anyhow::Result<Room> {
    let mut room = Room {
        bytes: available_memory(meminfo)?,
        limit: Limit::Host,
    };
    for (root, dir) in memory_cgroups(self_cgroup, mountinfo) {
        for level in dir.ancestors().take_while(|level| level.starts_with(&root)) {
            if let Some((limit_bytes, used)) = limit_and_usage(level, read)
                && limit_bytes.saturating_sub(used) < room.bytes
            {
                room = Room {
                    bytes: limit_bytes.saturating_sub(used),
                    limit: Limit::Cgroup {
                        dir: level.to_path_buf(),
                        limit_bytes,
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

/// The process's memory cgroups, each as the directory its hierarchy is mounted at and its
/// own directory there: the v1 memory controller's and the v2 hierarchy's (whose files say
/// whether it has the memory controller). `self_cgroup` is the text of /proc/self/cgroup,
/// whose paths are inside each hierarchy; `mountinfo`, of /proc/self/mountinfo, says where
/// each hierarchy, or which part of it, is mounted. A cgroup outside every mount of its
/// hierarchy (a path the process's cgroup namespace shows as `/..`) is left out.
pub fn memory_cgroups(self_cgroup: &str, mountinfo: &str) -> Vec<(PathBuf, PathBuf)> {
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
    let mut dirs = Vec::new();
    for line in self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let v2 = id == "0" && controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        let found = mounts.iter().find_map(|mount| {
            if mount.v2 != v2 || !(v2 || mount.memory) {
                return None;
            }
            let inside = Path::new(path).strip_prefix(&mount.root).ok()?;
            if inside
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                return None;
            }
            // (Joined to an empty path, the mount point would gain a trailing slash.)
            let dir = if inside.as_os_str().is_empty() {
                mount.point.clone()
            } else {
                mount.point.join(inside)
            };
            Some((mount.point.clone(), dir))
        });
        dirs.extend(found);
    }
    dirs
}

/// A cgroup hierarchy's mount, from a line of /proc/self/mountinfo.
struct Mount {
    /// The directory of the hierarchy mounted (`/` for all of it).
    root: PathBuf,
    /// Where.
    point: PathBuf,
    v2: bool,
    /// A v1 hierarchy with the memory controller.
    memory: bool,
}

impl Mount {
    /// `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS`
    fn parse(line: &str) -> Option<Mount> {
        let (mount, fs) = line.split_once(" - ")?;
        let mount: Vec<&str> = mount.split(' ').collect();
        let fs: Vec<&str> = fs.split(' ').collect();
        let (root, point) = (mount.get(3)?, mount.get(4)?);
        let (v2, memory) = match *fs.first()? {
            "cgroup2" => (true, false),
            "cgroup" => (false, fs.get(2)?.split(',').any(|o| o == "memory")),
            _ => return None,
        };
        Some(Mount {
            root: PathBuf::from(unescape(root)),
            point: PathBuf::from(unescape(point)),
            v2,
            memory,
        })
    }
}

/// A mountinfo path with its octal escapes (`\040` for a space, ...) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup's memory limit and what it uses less its inactive file cache, if it has a
/// limit (v2's "max" and v1's page-rounded `i64::MAX` are none).
fn limit_and_usage(dir: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Option<(u64, u64)> {
    let number = |file: &str| -> Option<u64> { read(&dir.join(file))?.trim().parse().ok() };
    let stat = |key: &str| -> u64 {
        read(&dir.join("memory.stat"))
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
            })
            .unwrap_or(0)
    };
    let (limit, used, cache) = if read(&dir.join("memory.max")).is_some() {
        (
            number("memory.max")?,
            number("memory.current")?,
            stat("inactive_file"),
        )
    } else {
        (
            number("memory.limit_in_bytes")?,
            number("memory.usage_in_bytes")?,
            stat("total_inactive_file"),
        )
    };
    (limit < 1 << 62).then_some((limit, used.saturating_sub(cache)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const MEMINFO: &str = "MemTotal:       24684000 kB\nMemAvailable:   1048576 kB\n";
    /// A hybrid host's mounts (v1 controllers, v2 beside them), as this machine kind has.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A v2-only host's.
    const UNIFIED: &str = "\
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
";

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
        for (cgroups, mounts) in [
            ("0::/system.slice/xlb.service\n", UNIFIED),
            ("4:memory:/a\n0::/\n", HYBRID),
            ("", UNIFIED),
            ("4:memory:/a\n", ""),
        ] {
            let room = room_from(MEMINFO, cgroups, mounts, &read).unwrap();
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
        // v2: the service has 256 MiB with 56 used; its slice 512 MiB with 400 used, 100 of
        // them inactive file cache, which leaves less (212 MiB); the service's own cgroup
        // need not have the memory controller for its slice's limit to count.
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
            (
                "/sys/fs/cgroup/system.slice/memory.stat",
                "anon 1000\nactive_file 5\ninactive_file 104857600\n",
            ),
        ]);
        let room = room_from(MEMINFO, "0::/system.slice/xlb.service\n", UNIFIED, &read).unwrap();
        assert_eq!(room.bytes, 200 << 20);
        assert_eq!(
            room.to_string(),
            "the memory cgroup that holds xlb (/sys/fs/cgroup/system.slice/xlb.service) has \
             200 MiB left under its limit of 256 MiB"
        );
        let unlimited_service = files(&[
            ("/sys/fs/cgroup/system.slice/memory.max", "536870912\n"),
            ("/sys/fs/cgroup/system.slice/memory.current", "419430400\n"),
        ]);
        let room = room_from(
            MEMINFO,
            "0::/system.slice/xlb.service\n",
            UNIFIED,
            &unlimited_service,
        )
        .unwrap();
        assert_eq!(room.bytes, 112 << 20);
        assert_eq!(
            room.limit,
            Limit::Cgroup {
                dir: PathBuf::from("/sys/fs/cgroup/system.slice"),
                limit_bytes: 512 << 20
            }
        );

        // v1 on a hybrid host: the memory controller's line, found by its mount.
        let read = files(&[
            (
                "/sys/fs/cgroup/memory/pod/memory.limit_in_bytes",
                "104857600\n",
            ),
            (
                "/sys/fs/cgroup/memory/pod/memory.usage_in_bytes",
                "8388608\n",
            ),
            (
                "/sys/fs/cgroup/memory/pod/memory.stat",
                "cache 1\ntotal_inactive_file 4194304\n",
            ),
        ]);
        let cgroups = "4:memory:/pod\n1:cpu,cpuacct:/pod\n0::/pod\n";
        let room = room_from(MEMINFO, cgroups, HYBRID, &read).unwrap();
        assert_eq!(room.bytes, 96 << 20);

        // Over its limit already: no room at all.
        let read = files(&[
            ("/sys/fs/cgroup/x/memory.max", "1000\n"),
            ("/sys/fs/cgroup/x/memory.current", "2000\n"),
        ]);
        assert_eq!(
            room_from(MEMINFO, "0::/x\n", UNIFIED, &read).unwrap().bytes,
            0
        );
    }

    #[test]
    fn a_cgroup_is_found_where_its_hierarchy_is_mounted() {
        // A container's view: the hierarchy's /kubepods/pod1 mounted at /sys/fs/cgroup, a
        // path with a space, and memory co-mounted with cpu.
        let mounts = "\
50 40 0:40 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw
51 40 0:41 /kube\\040pods /mnt/my\\040cgroups rw - cgroup cgroup rw,cpu,memory
";
        assert_eq!(
            memory_cgroups("0::/kubepods/pod1/app\n", mounts),
            [(
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/cgroup/app")
            )]
        );
        assert_eq!(
            memory_cgroups("3:cpu,memory:/kube pods/x\n", mounts),
            [(
                PathBuf::from("/mnt/my cgroups"),
                PathBuf::from("/mnt/my cgroups/x")
            )]
        );
        // Outside every mount of its hierarchy, or of a hierarchy not mounted: none.
        assert!(memory_cgroups("0::/../other\n", UNIFIED).is_empty());
        assert!(memory_cgroups("0::/elsewhere\n", mounts).is_empty());
        assert!(memory_cgroups("4:memory:/a\n", UNIFIED).is_empty());
        // In the hierarchy's root, the mount point itself.
        assert_eq!(
            memory_cgroups("0::/\n", UNIFIED),
            [(
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/cgroup")
            )]
        );
    }

    #[test]
    fn unreadable_host_memory_is_an_error() {
        for broken in ["", "MemAvailable: lots\n", "MemAvailable: 400000 MB\n"] {
            room_from(broken, "", "", &files(&[])).unwrap_err();
        }
    }
}
