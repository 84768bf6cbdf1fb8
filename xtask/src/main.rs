//! Project tasks: `cargo xtask setup | build | test | demo`.
//!
//! `setup` installs, idempotently, everything a bare Debian machine lacks to build and test
//! xlb; `test` and `demo` run it first, so the README's two commands work on a fresh machine.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "xlb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker, bpffs).
    Setup,
    /// Build the XDP program and the workspace.
    Build,
    /// The whole suite: formatting, clippy, unit tests, BPF_PROG_TEST_RUN fixtures and the
    /// network-namespace end-to-end test (needs root).
    Test,
    /// Build a small network in namespaces, balance traffic through xlb, print the result.
    Demo,
    /// The benchmarks (needs root): per-packet cost of the XDP program's paths side by
    /// side, the sweeper, table switches, Maglev; live forwarding rates and TCP against a
    /// null forwarder, nftables and HAProxy.
    /// Writes docs/benchmarks/<date>.json.
    Bench {
        /// Small sizes only, in a couple of minutes; writes docs/benchmarks/quick.json.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            build()
        }
        Task::Test => {
            require_root("cargo xtask test")?;
            setup::ensure()?;
            test(&root)
        }
        Task::Demo => {
            require_root("cargo xtask demo")?;
            setup::ensure()?;
            demo(&root)
        }
        Task::Bench { quick } => {
            require_root("cargo xtask bench")?;
            setup::ensure()?;
            // The forwarding and TCP benchmarks drive the xlb binary, as an operator would.
            build()?;
            let benches = ["xdp", "forwarding", "tcp"];
            let mut compile = cargo();
            compile.args(["bench", "-p", "xlb-tests", "--no-run"]);
            for bench in benches {
                compile.args(["--bench", bench]);
            }
            run(&mut compile)?;
            // One at a time, in this order (cargo would run them by name): the per-packet
            // benchmark first, before the others leave maps and namespaces for the kernel
            // to free. Run right after the TCP benchmark, its part with a million flows in
            // the table took 35% longer per tracked packet, and 19% for the null program,
            // than the same benchmark's later part or a run of it alone.
            let command = if quick {
                "cargo xtask bench --quick"
            } else {
                "cargo xtask bench"
            };
            for bench in benches {
                let mut cmd = cargo();
                cmd.args(["bench", "-p", "xlb-tests", "--bench", bench])
                    .env("XLB_BIN", root.join("target/debug/xlb"))
                    .env("XLB_BENCH_COMMAND", command);
                if quick {
                    cmd.args(["--", "--quick"]);
                }
                run(&mut cmd)?;
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// Runs a command, echoing it first; fails with the command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the default members: everything but lb-ebpf, which only links for the BPF target
/// and which lb-userspace's build.rs builds (and embeds) as part of this.
fn build() -> anyhow::Result<()> {
    run(cargo().args(["build", "--all-targets"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root: it installs what is missing, loads XDP programs and creates \
             network namespaces"
        );
    }
    Ok(())
}

fn test(root: &Path) -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build()?;
    // One run covers every crate: host unit tests (lb-common gets its `user` feature through
    // lb-userspace), the BPF_PROG_TEST_RUN fixtures and the namespace tests, which are each
    // one test binary and serialise themselves.
    let (passed, failed) = cargo_test(
        cargo()
            .args(["test", "--all-targets"])
            .env("XLB_BIN", root.join("target/debug/xlb")),
    )?;
    println!("xtask: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn cargo_test(cmd: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("+ {}", show(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", show(cmd)))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{} failed: {status} ({passed} passed, {failed} failed)",
            show(cmd)
        );
    }
    Ok((passed, failed))
}

/// In `ok. 16 passed; 0 failed; ...`, the number before `word`.
fn count_before(text: &str, word: &str) -> u64 {
    text.split(';')
        .find_map(|part| part.trim().strip_suffix(word))
        .and_then(|n| n.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn demo(root: &Path) -> anyhow::Result<()> {
    run(cargo().args(["build", "-p", "lb-userspace", "-p", "xlb-tests", "--bins"]))?;
    run(Command::new(root.join("target/debug/xlb-demo"))
        .env("XLB_BIN", root.join("target/debug/xlb")))
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_cargo_test_result_lines() {
        let line =
            "ok. 16 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.4s";
        assert_eq!(count_before(line, " passed"), 16);
        assert_eq!(count_before(line, " failed"), 2);
        assert_eq!(count_before("garbage", " passed"), 0);
    }
}
