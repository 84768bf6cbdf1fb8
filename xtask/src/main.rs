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
            setup::ensure()?;
            test(&root)
        }
        Task::Demo => {
            setup::ensure()?;
            demo(&root)
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

fn build() -> anyhow::Result<()> {
    run(cargo().args(["build", "--workspace", "--all-targets"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} needs root (it loads XDP programs and creates network namespaces)");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn test(root: &Path) -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
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
    // Host unit tests in parallel; the namespace and BPF tests are each one test binary and
    // serialise themselves. lb-common's std-only modules need the `user` feature.
    run(cargo()
        .args(["test", "--workspace", "--all-targets"])
        .env("XLB_BIN", root.join("target/debug/xlb")))?;
    run(cargo().args(["test", "-p", "lb-common", "--features", "user"]))?;
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    run(cargo().args(["build", "-p", "lb-userspace", "-p", "xlb-tests", "--bins"]))?;
    run(Command::new(root.join("target/debug/xlb-demo"))
        .env("XLB_BIN", root.join("target/debug/xlb")))
}
