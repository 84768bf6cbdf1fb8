//! A memory cgroup of the test's own, with a limit, removed by the guard's `Drop` once no
//! process is left in it. Under cgroup v1 it is a child of the test process's memory
//! cgroup. Under v2 a cgroup that holds processes cannot hand the memory controller down
//! ("no internal processes"), so it is made under the nearest cgroup above that does (or
//! the root, which may).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A memory cgroup that exists as long as this guard does.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// Makes the memory cgroup `name` (see the module's doc for where), limited to `limit`
    /// bytes. `name` is one [`unique_base`](crate::netns::unique_base) made from `prefix`:
    /// cgroups of the same prefix that a killed run left there are removed first.
    pub fn create(prefix: &str, name: &str, limit: u64) -> Result<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
        let mounts =
            std::fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
        let hierarchies = lb_userspace::memory::memory_cgroups(&own, &mounts);
        let mut found = None;
        for (root, dir) in &hierarchies {
            found = parent(root, dir)?;
            if found.is_some() {
                break;
            }
        }
        let Some((parent, limit_file)) = found else {
            bail!("no memory cgroup to make a child in (/proc/self/cgroup: {own:?})");
        };
        remove_stale(&parent, prefix)?;
        let dir = parent.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
        let cgroup = MemoryCgroup { dir };
        let path = cgroup.dir.join(limit_file);
        std::fs::write(&path, limit.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(cgroup)
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a process writes its pid to, to move into the cgroup.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

/// Removes the cgroups in `parent` named from `prefix` by a process that no longer exists.
/// A killed run's cgroup is empty once its processes are gone; one that still holds a
/// process (an xlb the killed run started, say) is reported, not removed, and does not stop
/// this run, whose cgroup has a name of its own.
fn remove_stale(parent: &Path, prefix: &str) -> Result<()> {
    let entries =
        std::fs::read_dir(parent).with_context(|| format!("listing {}", parent.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if entry.path().is_dir()
            && crate::netns::is_stale(name, prefix)
            && let Err(e) = std::fs::remove_dir(entry.path())
        {
            eprintln!(
                "left the stale cgroup {} in place: {e}",
                entry.path().display()
            );
        }
    }
    Ok(())
}

/// Where in the hierarchy mounted at `root` to make a memory cgroup, for a process in
/// `dir`, and the name of its limit's file there.
fn parent(root: &Path, dir: &Path) -> Result<Option<(PathBuf, &'static str)>> {
    if dir.join("memory.limit_in_bytes").exists() {
        return Ok(Some((dir.to_path_buf(), "memory.limit_in_bytes")));
    }
    let lists_memory = |file: PathBuf| {
        std::fs::read_to_string(file)
            .is_ok_and(|text| text.split_whitespace().any(|c| c == "memory"))
    };
    let delegating = dir
        .ancestors()
        .take_while(|a| a.starts_with(root))
        .find(|a| lists_memory(a.join("cgroup.subtree_control")));
    let parent = match delegating {
        Some(a) => a.to_path_buf(),
        // The root may hand it down although it holds processes (and keeps handing it
        // down: harmless, and what systemd hosts do anyway). A container's root, which is
        // not the kernel's, may not: the kernel's EBUSY says so.
        None if lists_memory(root.join("cgroup.controllers")) => {
            let control = root.join("cgroup.subtree_control");
            std::fs::write(&control, "+memory")
                .with_context(|| format!("enabling memory in {}", control.display()))?;
            root.to_path_buf()
        }
        None => return Ok(None),
    };
    Ok(Some((parent, "memory.max")))
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // A process that just exited may take a moment to leave the cgroup.
        let until = Instant::now() + Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(&self.dir) {
            if Instant::now() >= until {
                eprintln!("could not remove the cgroup {}: {e}", self.dir.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
