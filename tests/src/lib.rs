//! Test harness for xlb: builds a small network out of network namespaces and veth pairs,
//! runs real TCP/UDP servers and clients in it, and drives the real `xlb` binary.
//!
//! Where to find what:
//! * [`netns`]: the [`NetNs`](netns::NetNs) guard (create, run commands in, enter, delete
//!   a namespace) and [`cleanup_stale`](netns::cleanup_stale) for leftovers of killed runs.
//! * [`topology`]: the client / load balancer / three backends network, and its addresses.
//! * [`demo_config`]: the xlb config the end-to-end test and the demo both run.
//! * [`lab`]: the one-namespace lab where the fixtures and the benchmark run the program.
//! * [`echo`]: long-lived TCP connections: an echo server and its client.
//! * [`flood`]: a SYN flood from spoofed sources of the client's own subnet.
//! * [`servers`]: the backends' line-answering TCP and UDP servers; [`slow_http`]: a
//!   backend that answers HTTP after a delay.
//! * [`client`]: the clients that talk to the VIP from the client namespace.
//! * [`xlb`]: starting and stopping the `xlb` process inside the load balancer namespace.
//! * [`stats`]: parsing the counters xlb prints when it exits.
//! * [`nstat`]: kernel SNMP counters (checksum errors) of a namespace.
//! * [`packet`]: frames built from scratch, checksums, layouts and hex diffs.
//! * [`model`]: the reference model of the XDP program's rewrite.
//! * [`cmd`]: running a command with a time limit and an error that shows its stderr.
//! * [`cgroup`]: a memory cgroup with a limit, for `xlb run` under one.
//! * [`figures`]: where the benchmarks record their figures.
//!
//! Safety: nothing here touches the root namespace's interfaces. Every interface is created
//! directly inside a namespace this crate made, and every namespace is deleted by a guard's
//! `Drop`, also when a test panics.

pub mod cgroup;
pub mod client;
pub mod cmd;
pub mod demo_config;
pub mod echo;
pub mod figures;
pub mod flood;
pub mod lab;
pub mod model;
pub mod netns;
pub mod nstat;
pub mod packet;
pub mod servers;
pub mod slow_http;
pub mod stats;
pub mod topology;
pub mod xlb;

/// Fails with a clear message unless the process runs as root (network namespaces, veths
/// and XDP all need it).
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    anyhow::ensure!(
        euid == 0,
        "these tests create network namespaces and attach XDP programs: run as root: cargo xtask test"
    );
    Ok(())
}
