//! A memory cgroup of the test's own, with a limit: a child of the cgroup the test process
//! is in (cgroup v1's memory hierarchy, or v2's where it has the memory controller), removed
//! by the guard's `Drop` once no process is left in it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A memory cgroup that exists as long as this guard does.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// Makes the cgroup `name` under this process's memory cgroup, limited to `limit`
    /// bytes.
    pub fn create(name: &str, limit: u64) -> Result<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        let Some((_, parent)) = lb_userspace::memory::memory_cgroups(&own, &read)
            .into_iter()
            .next()
        else {
            bail!("this process is in no memory cgroup (/proc/self/cgroup: {own:?})");
        };
        let dir = parent.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
        let cgroup = MemoryCgroup { dir };
        // v2 names the limit memory.max (there if the parent hands the memory controller
        // down); v1, memory.limit_in_bytes.
        let file = if cgroup.dir.join("memory.max").exists() {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let path = cgroup.dir.join(file);
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

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // A process that just exited may take a moment to leave the cgroup.
        let until = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
