//! The tc program that sends what the XDP program hands over (`lb-ebpf/src/handoff.rs`),
//! run with BPF_PROG_TEST_RUN in the namespace lab as if each frame had arrived on fx0:
//! only a frame with the handoff mark and the data plane's own secret is taken, and it is
//! sent (TC_ACT_REDIRECT) where the FIB has a way for it, to a resolved neighbour or not,
//! IPv4 or IPv6, and dropped and counted where it has none; anything else goes on to the
//! stack untouched (TC_ACT_UNSPEC). The verdicts are the kernel's `TC_ACT_*` values
//! (include/uapi/linux/pkt_cls.h), the frames built by hand.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::maps::{names, programs};
use xlb_tests::{
    lab::{
        self, BACKEND, BACKEND6, CLIENT, CLIENT_MAC, FX0, FX0_MAC, HANDOFF_DMAC, HANDOFF_SECRET,
        SNAT, SNAT6, UNRESOLVED_BACKEND,
    },
    packet::{Frame, TCP_ACK},
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
/// `struct __sk_buff` (include/uapi/linux/bpf.h): 192 bytes, `ifindex` at byte 40.
const SKB_LEN: usize = 192;
const SKB_IFINDEX: usize = 40;

/// What a case is, its frame, the verdict it must get, and the (sent, failed) counts it
/// must add to `HANDOFFS`.
type Case = (&'static str, Vec<u8>, i32, (u64, u64));

const CONFIG: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]

[[service]]
vip = "10.10.0.100:80"
protocol = "tcp"
snat = "10.20.0.1"
[[service.backend]]
address = "10.20.1.2:8080"
"#;

#[test]
fn only_marked_frames_are_sent_and_each_where_the_fib_says() -> Result<()> {
    lab::in_lab("xlbho", |_| {
        let checked = lab::checked(CONFIG)?;
        let lab::Program { ebpf, .. } = lab::load(&checked)?;
        let fx0 = lab::ifindex(FX0)?;
        let marked = |f: Frame| f.with_macs(HANDOFF_SECRET, HANDOFF_DMAC).build();
        let tcp = |dst: Ipv4Addr| Frame::tcp((SNAT, 40000), (dst, 8080), TCP_ACK);
        let mut forged_secret = HANDOFF_SECRET;
        forged_secret[5] ^= 1;

        let cases: [Case; 7] = [
            (
                "a frame from the wire",
                tcp(BACKEND).with_macs(CLIENT_MAC, FX0_MAC).build(),
                TC_ACT_UNSPEC,
                (0, 0),
            ),
            (
                "the mark's destination MAC with another secret",
                tcp(BACKEND).with_macs(forged_secret, HANDOFF_DMAC).build(),
                TC_ACT_UNSPEC,
                (0, 0),
            ),
            (
                "the secret without the mark's destination MAC",
                tcp(BACKEND).with_macs(HANDOFF_SECRET, FX0_MAC).build(),
                TC_ACT_UNSPEC,
                (0, 0),
            ),
            (
                "marked, to a backend with a neighbour entry",
                marked(tcp(BACKEND)),
                TC_ACT_REDIRECT,
                (1, 0),
            ),
            (
                "marked, to a backend without one (the kernel resolves it)",
                marked(tcp(UNRESOLVED_BACKEND)),
                TC_ACT_REDIRECT,
                (1, 0),
            ),
            (
                "marked, IPv6",
                marked(Frame::tcp6((SNAT6, 40000), (BACKEND6, 8080), TCP_ACK)),
                TC_ACT_REDIRECT,
                (1, 0),
            ),
            (
                "marked, to a blackholed destination: no way on",
                marked(Frame::tcp(
                    (CLIENT, 40000),
                    (Ipv4Addr::new(10, 99, 0, 1), 80),
                    TCP_ACK,
                )),
                TC_ACT_SHOT,
                (0, 1),
            ),
        ];
        let mut problems = Vec::new();
        for (what, frame, want, (sent, failed)) in cases {
            let before = handoffs(&ebpf)?;
            let verdict = run(&ebpf, &frame, fx0).with_context(|| what.to_string())?;
            let after = handoffs(&ebpf)?;
            let counted = (after[0] - before[0], after[1] - before[1]);
            if verdict != want || counted != (sent, failed) {
                problems.push(format!(
                    "{what}: verdict {verdict}, expected {want}; counted (sent, failed) \
                     {counted:?}, expected {:?}",
                    (sent, failed)
                ));
            }
        }
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    })
}

/// Runs the tc program once on `frame` as if it had arrived on `ingress`; its verdict.
fn run(ebpf: &Ebpf, frame: &[u8], ingress: u32) -> Result<i32> {
    let prog: &SchedClassifier = ebpf
        .program(programs::TC_HANDOFF)
        .context("program xlb_handoff")?
        .try_into()?;
    let mut skb = [0u8; SKB_LEN];
    skb[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ingress.to_ne_bytes());
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&skb),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok(result.return_value as i32)
}

/// `HANDOFFS` (sent, failed), summed over CPUs.
fn handoffs(ebpf: &Ebpf) -> Result<[u64; 2]> {
    let map: PerCpuArray<&MapData, u64> = ebpf
        .map(names::HANDOFFS)
        .context("map HANDOFFS")?
        .try_into()?;
    let mut out = [0; 2];
    for (i, total) in out.iter_mut().enumerate() {
        *total = map.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}
