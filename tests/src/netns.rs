//! Named network namespaces (`ip netns`) as RAII guards.
//!
//! A [`NetNs`] is created with `ip netns add` and deleted with `ip netns del` when dropped,
//! which also happens while a panicking test unwinds. Runs that were killed outright (no
//! unwinding: SIGKILL, Ctrl-C) leave namespaces behind; [`cleanup_stale`] removes those at
//! the next start. Namespace names carry the creating process's pid for that reason.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd::{self, COMMAND_TIMEOUT, Output};

/// Counter that makes namespace names unique within this process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A unique base name for a set of namespaces: `<prefix>-<pid>-<n>`. Append a role
/// (`-lb`, `-client`, ...) for each namespace of the set.
///
/// The pid makes names unique across concurrent runs and lets [`cleanup_stale`] tell a
/// leftover (its pid is gone) from a namespace another live run is using; the counter makes
/// them unique within one run. Use a fixed prefix per program (`xlbt` for the tests,
/// `xlb-demo` for the demo) and pass the same one to [`cleanup_stale`].
pub fn unique_base(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A network namespace that exists as long as this guard does.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    deleted: AtomicBool,
}

impl NetNs {
    /// Creates the namespace `name` (`ip netns add`). Fails if it already exists.
    pub fn create(name: &str) -> Result<NetNs> {
        cmd::run("ip", &["netns", "add", name])
            .with_context(|| format!("creating network namespace {name}"))?;
        Ok(NetNs {
            name: name.to_string(),
            deleted: AtomicBool::new(false),
        })
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file `ip netns` bind-mounts; opening it yields a namespace fd.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip netns exec <name> program args...` (time-limited) and fails unless it exits
    /// with status 0; the error names the namespace and the command and shows its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        cmd::run("ip", &full)
            .with_context(|| format!("in namespace {}: {}", self.name, cmd::show(program, args)))
    }

    /// Like [`exec`](Self::exec) but returns the output whatever the exit status.
    pub fn exec_unchecked(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        cmd::run_unchecked("ip", &full, timeout)
            .with_context(|| format!("in namespace {}: {}", self.name, cmd::show(program, args)))
    }

    /// Runs `ip -n <name> args...`: configures links, addresses and routes of this
    /// namespace without entering it.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        cmd::run("ip", &full).with_context(|| format!("configuring namespace {}", self.name))
    }

    /// Runs `f` on a fresh thread that has joined this namespace (`setns(CLONE_NEWNET)`).
    ///
    /// Sockets created inside `f` belong to this namespace for their whole life, whichever
    /// thread uses them later, so the usual pattern is to create (bind/connect) sockets in
    /// here and return them. Only the new thread switches namespace; the caller's thread
    /// and the rest of the process stay where they are. A panic in `f` is propagated.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        let name = &self.name;
        thread::scope(|s| {
            let handle = s.spawn(move || -> Result<T> {
                let file = File::open(&path).with_context(|| {
                    format!("opening {} to enter namespace {name}", path.display())
                })?;
                // SAFETY: plain syscall on a valid fd we own for the duration of the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into namespace {name}"));
                }
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Pids of the processes whose network namespace is this one (`ip netns pids`), without
    /// this test process itself.
    pub fn pids(&self) -> Result<Vec<i32>> {
        pids_in(&self.name)
    }

    /// SIGKILLs every process that lives in this namespace (xlb, ping, ...), and waits up to
    /// 2 s for them to be gone.
    ///
    /// This looks processes up by namespace rather than keeping a registry of children: it
    /// covers everything started in here, and cannot hit an unrelated process that reused
    /// the pid of a child that already exited.
    pub fn kill_processes(&self) {
        kill_all_in(&self.name);
    }

    /// Kills the processes in the namespace and deletes it. Idempotent; `Drop` calls it.
    pub fn delete(&self) -> Result<()> {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        kill_all_in(&self.name);
        delete_ns(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            // Drop may run while a test panics: report, don't panic again.
            eprintln!("warning: {e:#}");
        }
    }
}

/// Whether `/run/netns/<name>` exists.
fn exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}

/// `ip netns del name`; a namespace that is already gone (e.g. removed by a concurrent
/// [`cleanup_stale`]) counts as deleted.
fn delete_ns(name: &str) -> Result<()> {
    match cmd::run("ip", &["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !exists(name) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting network namespace {name}")),
    }
}

fn pids_in(name: &str) -> Result<Vec<i32>> {
    let out = cmd::run("ip", &["netns", "pids", name])
        .with_context(|| format!("listing processes in namespace {name}"))?;
    let me = std::process::id() as i32;
    Ok(out
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| p != me && p > 1)
        .collect())
}

fn kill_all_in(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if !exists(name) {
            return;
        }
        let pids = match pids_in(name) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("warning: {e:#}");
                return;
            }
        };
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("warning: processes {pids:?} still in namespace {name} after SIGKILL");
            return;
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions. The pid was just listed as a
            // member of our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Names of all namespaces `ip netns list` shows.
pub fn list() -> Result<Vec<String>> {
    let out = cmd::run_unchecked("ip", &["netns", "list"], COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!("`ip netns list` failed: {}", out.stderr.trim());
    }
    // Lines look like `name` or `name (id: 3)`.
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Whether `name` is `<prefix>-<pid>-...` (a name [`unique_base`] made) of a process that
/// no longer exists.
pub fn is_stale(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists()
}

/// Deletes namespaces named `<prefix>-<pid>-...` whose creating process `pid` no longer
/// exists: leftovers of runs that were killed before their guards could clean up. Returns
/// the names it deleted. Namespaces of live processes (including this one) are left alone.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for name in list()? {
        if !is_stale(&name, prefix) {
            continue;
        }
        if !exists(&name) {
            continue; // A concurrent run cleaned it up first.
        }
        kill_all_in(&name);
        delete_ns(&name).map_err(|e| anyhow!("deleting stale namespace: {e:#}"))?;
        deleted.push(name);
    }
    Ok(deleted)
}
