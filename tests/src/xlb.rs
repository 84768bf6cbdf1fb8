//! Runs the real `xlb` binary inside the load balancer namespace.
//!
//! xlb prints a line starting with `ready:` on stdout once its XDP program is attached and
//! its maps are filled, and prints its counters on stdout when it exits after SIGTERM (see
//! [`stats`](crate::stats)). Its stderr (logs) is forwarded to this process's stderr with
//! an `[xlb]` prefix, which the test harness shows for failing tests, and the last lines
//! are kept for error messages.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::NetNs;

/// How long xlb may take to load, attach and print `ready:`. Loading a BPF program with
/// a 65537-slot Maglev table per service takes a moment, especially in debug builds.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long xlb may take to detach and print its counters after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Last stderr lines kept for error messages.
const STDERR_TAIL: usize = 200;

static NEXT_CONFIG: AtomicU32 = AtomicU32::new(0);

/// The `xlb` binary: `$XLB_BIN` if set, else `<workspace>/target/debug/xlb`.
pub fn xlb_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("XLB_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xlb"),
    };
    if !path.is_file() {
        bail!(
            "xlb binary not found at {} (set XLB_BIN to override): build it first with \
             cargo build -p lb-userspace, or run cargo xtask test",
            path.display()
        );
    }
    Ok(path)
}

/// A running xlb. Dropping it kills xlb if it still runs; use [`stop`](Self::stop) for an
/// orderly shutdown that returns xlb's final output.
#[derive(Debug)]
pub struct XlbProcess {
    child: Child,
    ns_name: String,
    config_path: PathBuf,
    /// The daemon's API socket: next to the config, as unique as its name.
    socket: PathBuf,
    /// Where it pins the data plane (on the host's bpffs), as unique; removed on drop
    /// unless handed on by [`kill_leaving_pins`](Self::kill_leaving_pins).
    pin_path: PathBuf,
    keep_pins: bool,
    /// The `ready:` line.
    ready_line: String,
    /// What xlb printed on stdout before `ready:` (which interface, which XDP mode).
    startup: Vec<String>,
    /// Stdout lines, from the reader thread. Disconnects when xlb closes stdout (exits).
    stdout: Receiver<String>,
    /// Lines after `ready:` that [`wait_for`](Self::wait_for) read already; `stop` returns
    /// them with the rest.
    seen: Vec<String>,
    stderr_tail: Arc<Mutex<Vec<String>>>,
    /// Set by the stderr reader at end of file: once xlb has exited, its last words are in
    /// `stderr_tail` only after this.
    stderr_done: Arc<AtomicBool>,
    /// Set once the child has been waited for.
    exited: Option<ExitStatus>,
}

impl XlbProcess {
    /// Writes `config_toml` to a fresh temp file, starts
    /// `nsenter --net=<ns> <xlb> run --config <file> --socket <file>.sock`, and waits until xlb prints `ready:`.
    /// Fails with xlb's output if it exits or stays silent for [`READY_TIMEOUT`].
    ///
    /// xlb's stdout and stderr are echoed to this process's stderr (prefixed `[xlb stdout]`
    /// and `[xlb]`), which the test harness captures and shows for failing tests.
    pub fn start(ns: &NetNs, config_toml: &str) -> Result<XlbProcess> {
        Self::start_with(ns, config_toml, &[], true)
    }

    /// Like [`start`](Self::start), with more arguments after `run --config FILE` (e.g.
    /// `--stats-interval 1`).
    pub fn start_args(ns: &NetNs, config_toml: &str, args: &[&str]) -> Result<XlbProcess> {
        Self::start_with(ns, config_toml, args, true)
    }

    /// Like [`start`](Self::start), on the data plane a killed xlb left pinned (see
    /// [`kill_leaving_pins`](Self::kill_leaving_pins)), which this one then owns. If it
    /// fails to start, `pins` keeps them (for another try, and to remove them in the end).
    pub fn start_on_pins(ns: &NetNs, config_toml: &str, pins: &mut LeftPins) -> Result<XlbProcess> {
        let path = pins
            .0
            .clone()
            .context("an xlb took these pins over already")?;
        let xlb = Self::spawn(ns, config_toml, &[], true, Some(path))?;
        pins.0 = None;
        Ok(xlb)
    }

    /// Like [`start`](Self::start), but without echoing xlb's output (for the demo, which
    /// prints its own report). Errors still include xlb's output.
    pub fn start_quiet(ns: &NetNs, config_toml: &str) -> Result<XlbProcess> {
        Self::start_with(ns, config_toml, &[], false)
    }

    fn start_with(ns: &NetNs, config_toml: &str, args: &[&str], echo: bool) -> Result<XlbProcess> {
        Self::spawn(ns, config_toml, args, echo, None)
    }

    fn spawn(
        ns: &NetNs,
        config_toml: &str,
        args: &[&str],
        echo: bool,
        pin_path: Option<PathBuf>,
    ) -> Result<XlbProcess> {
        let bin = xlb_binary()?;
        remove_stale_configs();
        let config_path = write_config(config_toml)?;
        let socket = config_path.with_extension("sock");
        // A data plane handed on stays pinned if this xlb fails to start on it.
        let adopting = pin_path.is_some();
        let pin_path = pin_path.unwrap_or_else(|| {
            let stem = config_path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy();
            PathBuf::from(BPFFS).join(stem.as_ref())
        });

        // `nsenter` execs the command in place (no fork), so the child's pid is xlb's and
        // signals reach xlb directly. It enters the network namespace only: unlike
        // `ip netns exec`, which gives the command a bpffs of its own, xlb sees the host's
        // /sys/fs/bpf, where its pins outlive it, as a user's do.
        let spawned = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .arg("--")
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-path")
            .arg(&pin_path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&config_path);
                return Err(e)
                    .with_context(|| format!("starting {} in {}", bin.display(), ns.name()));
            }
        };

        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[xlb stdout] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("stderr is piped");
        let tail = stderr_tail.clone();
        let stderr_done = Arc::new(AtomicBool::new(false));
        let done = stderr_done.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[xlb] {line}");
                }
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == STDERR_TAIL {
                    t.remove(0);
                }
                t.push(line);
            }
            done.store(true, Ordering::Release);
        });

        let mut xlb = XlbProcess {
            child,
            ns_name: ns.name().to_string(),
            config_path,
            socket,
            pin_path,
            keep_pins: adopting,
            ready_line: String::new(),
            startup: Vec::new(),
            stdout,
            seen: Vec::new(),
            stderr_tail,
            stderr_done,
            exited: None,
        };
        xlb.wait_ready()?;
        xlb.keep_pins = false;
        Ok(xlb)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut before_ready = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.starts_with("ready:") => {
                    self.ready_line = line;
                    self.startup = before_ready;
                    return Ok(());
                }
                Ok(line) => before_ready.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    bail!(
                        "xlb in {} printed no `ready:` line within {READY_TIMEOUT:?}\n{}",
                        self.ns_name,
                        self.describe_output(&before_ready)
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: xlb is exiting or gone.
                    let status = self.wait_exit(Duration::from_secs(5));
                    bail!(
                        "xlb in {} exited before it was ready ({})\n{}",
                        self.ns_name,
                        status.map_or_else(|| "still running".to_string(), |s| s.to_string()),
                        self.describe_output(&before_ready)
                    );
                }
            }
        }
    }

    /// The `ready:` line xlb printed.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// The stdout lines xlb printed before `ready:`, e.g.
    /// `attached to xlb-c (ifindex 2) in native mode`.
    pub fn startup_lines(&self) -> &[String] {
        &self.startup
    }

    /// Fails unless one of the lines xlb printed before `ready:` starts with `prefix`;
    /// `what` says what such a line means, for the error.
    pub fn said_at_start(&self, prefix: &str, what: &str) -> Result<()> {
        ensure!(
            self.startup.iter().any(|l| l.starts_with(prefix)),
            "xlb did not say {what}: {:?}",
            self.startup
        );
        Ok(())
    }

    /// Reads xlb's stdout until a line for which `wanted` holds, and returns it; fails if
    /// none comes within `timeout` or xlb exits. The lines read stay part of what
    /// [`stop`](Self::stop) returns.
    pub fn wait_for(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "xlb printed no line we waited for within {timeout:?}\n{}",
                        self.describe_output(&self.seen)
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.wait_exit(Duration::from_secs(5));
                    bail!(
                        "xlb exited while we waited for a line\n{}",
                        self.describe_output(&self.seen)
                    );
                }
            }
        }
    }

    /// Reads xlb's stdout until the end of the next complete stats snapshot (printed with
    /// `--stats-interval`), and returns it.
    pub fn next_stats(&mut self, timeout: Duration) -> Result<String> {
        self.wait_for(timeout, |l| l.starts_with(crate::stats::SNAPSHOT_END))?;
        let start = self
            .seen
            .iter()
            .rposition(|l| l.starts_with(crate::stats::SNAPSHOT_START))
            .context("a stats snapshot without its first line")?;
        Ok(self.seen[start..].join("\n"))
    }

    /// Whether a line of xlb's log (its stderr, the last lines of it) contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.stderr_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(text))
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Runs `xlb ARGS -o json` against this daemon and returns its JSON; fails with its
    /// stderr.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.command(&[args, &["-o", "json"]].concat())?;
        if !out.status.success() {
            bail!(
                "xlb {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "xlb {args:?} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The backends of service `vip` (TCP) as `xlb backend ls -o json` shows them, by
    /// address.
    pub fn backends(
        &self,
        vip: &str,
    ) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
        let list = self.json(&["backend", "ls", vip])?;
        Ok(list
            .as_array()
            .context("backend ls: not a list")?
            .iter()
            .map(|b| (b["address"].as_str().unwrap_or("").to_string(), b.clone()))
            .collect())
    }

    /// SIGKILLs xlb, as a crash or `kill -9` would, leaving its data plane pinned and
    /// running; returns the pins, for [`start_on_pins`](Self::start_on_pins).
    pub fn kill_leaving_pins(mut self) -> LeftPins {
        self.keep_pins = true;
        self.kill();
        LeftPins(Some(self.pin_path.clone()))
    }

    /// Runs `xlb ARGS --socket SOCKET`, a client command against this daemon (from this
    /// process's namespace: the socket is a file), and returns what it printed.
    pub fn command(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.push("--socket".into());
        all.push(self.socket.display().to_string());
        xlb_command(&all)
    }

    /// xlb's pid (that of the `nsenter` it replaced).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, waits up to [`STOP_TIMEOUT`] for xlb to exit, and returns everything
    /// it printed on stdout after `ready:` (its counters). Fails if it has to be killed or
    /// exits with a status other than 0; the error includes its output.
    pub fn stop(mut self) -> Result<String> {
        if self.exited.is_none() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child, which
            // has not been waited for, so it cannot have been reused.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let status = self.wait_exit(STOP_TIMEOUT);
        let mut lines = std::mem::take(&mut self.seen);
        lines.extend(self.drain_stdout(Duration::from_secs(5)));
        let Some(status) = status else {
            self.kill();
            bail!(
                "xlb did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed\n{}",
                self.describe_output(&lines)
            );
        };
        if !status.success() {
            bail!(
                "xlb exited with {status} after SIGTERM (expected 0)\n{}",
                self.describe_output(&lines)
            );
        }
        let mut text = lines.join("\n");
        text.push('\n');
        Ok(text)
    }

    /// Collects stdout lines until the reader thread finishes (EOF) or `timeout` passes.
    fn drain_stdout(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => return lines,
            }
        }
    }

    /// Polls for the exit status for up to `timeout`; `None` if still running.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited.is_some() {
                return self.exited;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return self.exited;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap, if still running.
    fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
    }

    fn describe_output(&self, stdout: &[String]) -> String {
        if self.exited.is_some() {
            // The reader thread may still hold the last lines of an exited xlb (its error
            // message): wait for it to reach end of file, briefly.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !self.stderr_done.load(Ordering::Acquire) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "--- xlb stdout ---\n{}\n--- xlb stderr (last {} lines) ---\n{}",
            stdout.join("\n"),
            tail.len(),
            tail.join("\n")
        )
    }
}

impl Drop for XlbProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_file(&self.socket);
        if !self.keep_pins {
            // A clean stop removed them already; after a kill this detaches and frees.
            let _ = std::fs::remove_dir_all(&self.pin_path);
        }
    }
}

/// A data plane left pinned by a killed xlb ([`XlbProcess::kill_leaving_pins`]), or a pin
/// directory a test made: removed when dropped, unless an xlb started on it
/// ([`XlbProcess::start_on_pins`]) took it over. A test that fails in between leaves
/// nothing pinned.
#[derive(Debug)]
pub struct LeftPins(Option<PathBuf>);

impl LeftPins {
    /// A pin directory of the test's own, removed on drop likewise.
    pub fn at(path: PathBuf) -> LeftPins {
        LeftPins(Some(path))
    }

    /// Where the pins are (or were, before an xlb took them over).
    pub fn path(&self) -> Option<&std::path::Path> {
        self.0.as_deref()
    }
}

impl Drop for LeftPins {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Where the tests' daemons pin their data planes, as `xlb-test-<pid>-<n>-<nanos>`.
const BPFFS: &str = "/sys/fs/bpf";

/// What the tests' config files, sockets, pins and scratch paths are named from:
/// `xlb-test-<pid>-...` (a config `xlb-test-<pid>-<n>-<nanos>.toml`).
const TEST_PATH_PREFIX: &str = "xlb-test";

/// How long a client command may take before the test gives up on it (and kills it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `xlb ARGS` and returns what it printed; fails if it runs longer than
/// [`COMMAND_TIMEOUT`].
pub fn xlb_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<std::process::Output> {
    let bin = xlb_binary()?;
    let args: Vec<&str> = args
        .iter()
        .map(|a| a.as_ref().to_str().context("a non-UTF-8 argument"))
        .collect::<Result<_>>()?;
    let out = crate::cmd::run_unchecked(&bin.to_string_lossy(), &args, COMMAND_TIMEOUT)?;
    Ok(std::process::Output {
        status: out.status,
        stdout: out.stdout.into_bytes(),
        stderr: out.stderr.into_bytes(),
    })
}

/// A path of this test process's own under `dir` (the temp dir, or bpffs for pins):
/// `xlb-test-<pid>-<label>`. Should the process be killed before it removes it, the next
/// run that starts an xlb does (`remove_stale_configs`), as it does an xlb's own config,
/// socket and pins.
pub fn test_path(dir: &std::path::Path, label: &str) -> PathBuf {
    dir.join(format!("{TEST_PATH_PREFIX}-{}-{label}", std::process::id()))
}

/// [`test_path`] on bpffs, for pinned data planes.
pub fn test_pin_path(label: &str) -> PathBuf {
    test_path(std::path::Path::new(BPFFS), label)
}

/// Removes the files, directories and pinned data planes (named by [`test_path`], as xlb's
/// own are) left by runs that were killed before they could delete them (their pid no
/// longer exists). Best effort: errors are ignored.
pub fn remove_stale_configs() {
    remove_stale(&std::env::temp_dir());
    remove_stale(std::path::Path::new(BPFFS));
}

fn remove_stale(dir: &std::path::Path) {
    let Ok(dir) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| crate::netns::is_stale(n, TEST_PATH_PREFIX))
        {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes the config to a new file under the temp dir; the name is unique per process,
/// call and time, and the file must not exist yet.
fn write_config(config_toml: &str) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = NEXT_CONFIG.fetch_add(1, Ordering::Relaxed);
    let path = test_path(&std::env::temp_dir(), &format!("{n}-{nanos}.toml"));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating config file {}", path.display()))?;
    file.write_all(config_toml.as_bytes())
        .with_context(|| format!("writing config file {}", path.display()))?;
    Ok(path)
}
