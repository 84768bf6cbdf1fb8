//! Running helper commands (`ip`, `sysctl`, `ethtool`, `nstat`, `ping`) with a time limit,
//! so a hung tool fails the test instead of hanging it, and with errors that show what
//! the tool printed.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Default time limit for a helper command. All of them finish in milliseconds normally.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a command's output may stay open after it exited.
const PIPES_GRACE: Duration = Duration::from_secs(5);

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args...`, waits at most `timeout` (then kills it), and returns its output
/// whatever the exit status. Use [`run`] to also require success.
pub fn run_unchecked(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let shown = show(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}` (is {program} installed?)"))?;

    // Drain both pipes on threads: a tool that fills a pipe buffer would otherwise block
    // forever while we wait for it to exit.
    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{shown}`"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {timeout:?} and was killed");
        }
        thread::sleep(Duration::from_millis(5));
    };
    // The pipes close when the last process holding them does: a daemon the command started
    // that kept them would hold the readers forever.
    let closed_by = Instant::now() + PIPES_GRACE;
    while !(out_reader.is_finished() && err_reader.is_finished()) {
        if Instant::now() >= closed_by {
            bail!(
                "`{shown}` exited ({status}), but something it started still holds its \
                 output open after {PIPES_GRACE:?} (a daemon that did not let go of it?)"
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `program args...` with [`COMMAND_TIMEOUT`] and fails unless it exits with status 0;
/// the error names the command and includes its stderr and stdout.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = run_unchecked(program, args, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): stderr: {} stdout: {}",
            show(program, args),
            out.status,
            out.stderr.trim(),
            out.stdout.trim()
        );
    }
    Ok(out)
}

/// Fails with an install hint unless `program` is found on `PATH`.
pub fn require_tool(program: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("`{program}` not found on PATH; install it: apt-get install -y {package}");
    }
    Ok(())
}

/// The command line as one string, for messages.
pub fn show(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}
