//! The veth start-up check and the ethtool readers against real veth pairs.
//!
//! Needs root: every test creates its own network namespaces (`xlbvt-<pid>-<n>-<role>`),
//! builds its veth pairs inside them and deletes the namespaces when it ends, also when it
//! fails (a Drop guard). Nothing here touches the root namespace's interfaces, addresses
//! or routes, and no test assigns an address: the frames that one test sends are raw
//! Ethernet frames of a local experimental EtherType, between two veths it made.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lb_userspace::ethtool;
use lb_userspace::veth::{self, VethProblem, VethProblemKind};

use VethProblemKind::{DropsRedirects, TxChecksumOffload};

// ---------------------------------------------------------------------------------------
// Namespaces and commands

/// A network namespace that `ip netns del` removes when this guard is dropped.
struct Ns {
    name: String,
}

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

impl Ns {
    /// A new namespace `xlbvt-<pid>-<n>-<role>`.
    fn new(role: &str) -> Ns {
        require_root();
        static CLEANUP: std::sync::Once = std::sync::Once::new();
        CLEANUP.call_once(|| {
            // Best effort: a namespace a concurrent run is deleting may be gone already.
            let _ = xlb_tests::netns::cleanup_stale("xlbvt");
        });
        let n = NEXT_NS.fetch_add(1, Ordering::Relaxed);
        let name = format!("xlbvt-{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No IPv6 autoconfiguration: its router solicitations would add to the packet
        // counts that the tests compare.
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        ns
    }

    /// `ip -n NAME args...`
    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// `ip netns exec NAME program args...`
    fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a new thread that entered this namespace; the test's thread stays.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).expect("open the namespace file");
                    // SAFETY: setns takes no pointers; this thread is ours and ends with `f`.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `veth::check(ifaces)` as xlb would run it in this namespace.
    fn check(&self, ifaces: &[&str]) -> Vec<VethProblem> {
        let ifaces: Vec<String> = ifaces.iter().map(|s| s.to_string()).collect();
        self.enter(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(veth::check(&ifaces))
                .expect("veth::check")
        })
    }

    fn ifindex(&self, iface: &str) -> u32 {
        let name = CString::new(iface).unwrap();
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let index = self.enter(|| unsafe { libc::if_nametoindex(name.as_ptr()) });
        assert_ne!(index, 0, "{iface} not found in {}", self.name);
        index
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete namespace {}", self.name);
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces: run them as root"
    );
}

/// Runs a command, fails the test unless it exits 0 (within `cmd::COMMAND_TIMEOUT`), and
/// returns its stdout.
fn run(program: &str, args: &[&str]) -> String {
    xlb_tests::cmd::run(program, args)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .stdout
}

/// `sh -c command` (the fix command a problem suggests), in the root namespace.
fn sh(command: &str) {
    run("sh", &["-c", command]);
}

fn problem(iface: &str, peer: &str, ns: Option<&Ns>, kind: VethProblemKind) -> VethProblem {
    VethProblem {
        iface: iface.into(),
        peer: peer.into(),
        peer_namespace: ns.map(|ns| ns.name.clone()),
        kind,
    }
}

/// `va` in `a`, its peer `vb` in `b`, both up.
fn pair_across(a: &Ns, b: &Ns) {
    a.ip(&[
        "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b.name,
    ]);
    a.ip(&["link", "set", "va", "up"]);
    b.ip(&["link", "set", "vb", "up"]);
}

// ---------------------------------------------------------------------------------------
// veth::check

#[test]
fn peer_in_another_namespace_without_gro_and_with_tx_checksum_offload() {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    pair_across(&a, &b);
    b.exec("ethtool", &["-K", "vb", "gro", "off", "tx", "on"]);

    let problems = a.check(&["va"]);
    assert_eq!(
        problems,
        [
            problem("va", "vb", Some(&b), DropsRedirects),
            problem("va", "vb", Some(&b), TxChecksumOffload),
        ]
    );
    assert_eq!(
        problems[0].fix_command(),
        format!("ip netns exec {} ethtool -K vb gro on", b.name)
    );
    assert_eq!(
        problems[1].fix_command(),
        format!("ip netns exec {} ethtool -K vb tx off", b.name)
    );
    sh(&problems[0].fix_command());
    sh(&problems[1].fix_command());
    assert_eq!(a.check(&["va"]), []);
}

#[test]
fn peer_in_the_same_namespace_is_checked_too() {
    let a = Ns::new("a");
    a.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    a.ip(&["link", "set", "va", "up"]);
    a.ip(&["link", "set", "vb", "up"]);
    a.exec("ethtool", &["-K", "vb", "gro", "off", "tx", "on"]);
    a.exec("ethtool", &["-K", "va", "gro", "on", "tx", "on"]);
    let pass = bpf::load_xdp(bpf::XDP_PASS);
    let _on_va = a.enter(|| bpf::attach_xdp(&pass, "va", bpf::XDP_FLAGS_DRV_MODE));

    let problems = a.check(&["va", "vb"]);
    assert_eq!(
        problems,
        [
            problem("va", "vb", None, DropsRedirects),
            problem("va", "vb", None, TxChecksumOffload),
            problem("vb", "va", None, TxChecksumOffload),
        ]
    );
    assert_eq!(problems[0].fix_command(), "ethtool -K vb gro on");
    assert_eq!(problems[2].fix_command(), "ethtool -K va tx off");
    // "None" means the namespace check ran in: the fixes run there.
    for problem in &problems {
        a.exec("sh", &["-c", &problem.fix_command()]);
    }
    assert_eq!(a.check(&["va", "vb"]), []);
}

/// A process of ours in a network namespace that has no `/run/netns` name (`unshare --net
/// sleep`); killed when dropped.
struct Unnamed(std::process::Child);

impl Unnamed {
    fn new() -> Unnamed {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .expect("unshare --net sleep 60");
        let unnamed = Unnamed(child);
        // Wait until it has left our namespace.
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let its = std::fs::metadata(format!("/proc/{}/ns/net", unnamed.pid()));
            if its.is_ok_and(|its| its.ino() != ours.ino()) {
                return unnamed;
            }
            assert!(Instant::now() < deadline, "unshare did not start");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Unnamed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn peer_in_a_namespace_known_only_by_a_process() {
    let a = Ns::new("a");
    let unnamed = Unnamed::new();
    let pid = unnamed.pid().to_string();
    a.ip(&[
        "link", "add", "va", "type", "veth", "peer", "name", "vc", "netns", &pid,
    ]);
    a.ip(&["link", "set", "va", "up"]);
    let nsenter = ["--target", &pid, "--net"];
    let in_unnamed = |args: &[&str]| run("nsenter", &[&nsenter[..], args].concat());
    in_unnamed(&["ip", "link", "set", "vc", "up"]);
    in_unnamed(&["ethtool", "-K", "vc", "gro", "off", "tx", "off"]);

    let problems = a.check(&["va"]);
    let label = Some(format!("pid {pid}"));
    assert_eq!(
        problems,
        [VethProblem {
            iface: "va".into(),
            peer: "vc".into(),
            peer_namespace: label.clone(),
            kind: DropsRedirects,
        }]
    );
    assert_eq!(
        problems[0].fix_command(),
        format!("nsenter --target {pid} --net ethtool -K vc gro on")
    );
    sh(&problems[0].fix_command());
    assert_eq!(a.check(&["va"]), []);
}

#[test]
fn a_peer_in_a_namespace_that_cannot_be_found_is_skipped() {
    let a = Ns::new("a");
    // A namespace that only one thread of this process is in: neither /run/netns nor
    // /proc/<pid>/ns/net shows it. `ip`, started from that thread, runs in it.
    let (created, created_rx) = std::sync::mpsc::channel();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let name = a.name.clone();
    let holder = thread::spawn(move || {
        // SAFETY: unshare takes no pointers; it moves only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        run(
            "ip",
            &[
                "link", "add", "vh", "type", "veth", "peer", "name", "va", "netns", &name,
            ],
        );
        created.send(()).unwrap();
        done_rx.recv().unwrap();
        // Now a process that the check can find: it inherits this thread's namespace.
        let sleeper = Command::new("sleep").arg("60").spawn().unwrap();
        created.send(()).unwrap();
        let _ = done_rx.recv();
        Unnamed(sleeper)
    });
    created_rx.recv().expect("the namespace holder failed");
    a.ip(&["link", "set", "va", "up"]);
    assert_eq!(a.check(&["va"]), []);

    // The same set-up, findable: the peer is reported (veth defaults: GRO off, TX
    // checksum offload on).
    done.send(()).unwrap();
    created_rx.recv().expect("the namespace holder failed");
    let problems = a.check(&["va"]);
    drop(done);
    let sleeper = holder.join().unwrap();
    assert_eq!(
        problems,
        [DropsRedirects, TxChecksumOffload].map(|kind| VethProblem {
            iface: "va".into(),
            peer: "vh".into(),
            peer_namespace: Some(format!("pid {}", sleeper.pid())),
            kind,
        })
    );
}

#[test]
fn interfaces_that_are_not_veths_or_do_not_exist_are_no_problem() {
    let a = Ns::new("a");
    a.ip(&["link", "add", "br0", "type", "bridge"]);
    assert_eq!(a.check(&["lo", "br0", "nosuch0"]), []);
}

#[test]
fn a_native_xdp_program_on_the_peer_counts_a_generic_one_does_not() {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    pair_across(&a, &b);
    b.exec("ethtool", &["-K", "vb", "gro", "off", "tx", "off"]);
    let pass = bpf::load_xdp(bpf::XDP_PASS);
    let all_lost = [problem("va", "vb", Some(&b), DropsRedirects)];

    let link = b.enter(|| bpf::attach_xdp(&pass, "vb", bpf::XDP_FLAGS_SKB_MODE));
    assert_eq!(a.check(&["va"]), all_lost);
    detach(link, &b, "vb");

    let link = b.enter(|| bpf::attach_xdp(&pass, "vb", bpf::XDP_FLAGS_DRV_MODE));
    assert_eq!(a.check(&["va"]), []);
    detach(link, &b, "vb");
    assert_eq!(a.check(&["va"]), all_lost);
}

// ---------------------------------------------------------------------------------------
// ethtool

/// `ethtool -S IFACE` as (name, value) pairs.
fn ethtool_s(ns: &Ns, iface: &str) -> Vec<(String, u64)> {
    ns.exec("ethtool", &["-S", iface])
        .lines()
        .skip(1) // "NIC statistics:"
        .map(|line| {
            let (name, value) = line.trim().rsplit_once(':').expect("name: value");
            (name.to_string(), value.trim().parse().expect("a number"))
        })
        .collect()
}

#[test]
fn stats_and_send_errors_of_a_veth() {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    pair_across(&a, &b);
    let stats = a.enter(|| ethtool::stats("va")).unwrap();
    let names: Vec<&str> = stats.iter().map(|(name, _)| name.as_str()).collect();
    for expected in [
        "peer_ifindex",
        "rx_queue_0_xdp_drops",
        "rx_queue_0_xdp_tx_errors",
        "tx_queue_0_xdp_xmit_errors",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let peer_ifindex = stats.iter().find(|(n, _)| n == "peer_ifindex").unwrap().1;
    assert_eq!(peer_ifindex, u64::from(b.ifindex("vb")));
    // The same names, in the same order, with the same values as ethtool(8) shows.
    assert_eq!(stats, ethtool_s(&a, "va"));
    assert_eq!(a.enter(|| ethtool::xdp_send_errors("va")).unwrap(), 0);

    // Flags, as `ethtool -k` shows them, both ways.
    for on in ["off", "on"] {
        b.exec("ethtool", &["-K", "vb", "gro", on, "tx", on]);
        let want = on == "on";
        assert_eq!(b.enter(|| ethtool::gro_enabled("vb")).unwrap(), want);
        assert_eq!(
            b.enter(|| ethtool::tx_checksum_enabled("vb")).unwrap(),
            want
        );
    }
}

#[test]
fn lo_has_no_stats_and_no_send_errors() {
    let a = Ns::new("a");
    assert_eq!(a.enter(|| ethtool::stats("lo")).unwrap(), []);
    assert_eq!(a.enter(|| ethtool::xdp_send_errors("lo")).unwrap(), 0);
}

#[test]
fn errors_name_the_interface_and_the_ioctl() {
    let a = Ns::new("a");
    let err = a.enter(|| ethtool::gro_enabled("nosuch0")).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("nosuch0") && text.contains("ETHTOOL_GGRO"),
        "{text}"
    );
    let err = a.enter(|| ethtool::stats("nosuch0")).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("nosuch0") && text.contains("ETHTOOL_GSSET_INFO"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// What the kernel really does with frames that XDP sends into a veth

/// The EtherType of the test frames (IEEE 802 local experimental 1).
const ETHERTYPE: u16 = 0x88b5;

/// A packet socket that counts the test frames the stack receives on one interface.
///
/// Interface counters cannot tell: veth accounts frames that XDP put into its ring by
/// where they came from (XDP_TX frames do not appear in the receiver's rx_packets).
struct Receiver(OwnedFd);

impl Receiver {
    fn open(ns: &Ns, iface: &str) -> Receiver {
        let ifindex = ns.ifindex(iface);
        ns.enter(|| {
            let protocol = ETHERTYPE.to_be();
            // SAFETY: socket() takes no pointers; the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(protocol),
                )
            };
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            // SAFETY: a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Room for every test frame however large the kernel's per-frame overhead.
            let size: libc::c_int = 16 << 20;
            // SAFETY: the option value is a c_int that outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            // SAFETY: all-zero is a valid sockaddr_ll; the fields we need are set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: `addr` is a sockaddr_ll of the length we pass.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            Receiver(fd)
        })
    }

    /// Reads every frame waiting and returns how many arrived (frames the interface sent,
    /// which a packet socket sees too, are not counted).
    fn drain(&self) -> u64 {
        let mut buf = [0u8; 2048];
        let mut count = 0;
        loop {
            // SAFETY: all-zero is a valid sockaddr_ll, which recvfrom fills in.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are writable for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &raw mut len,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                // ENETDOWN: the interface went down (once), nothing to read.
                assert!(
                    matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::ENETDOWN)),
                    "recv: {err}"
                );
                return count;
            }
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                count += 1;
            }
        }
    }
}

/// Sends `count` test frames out of `iface` (in `ns`) through a packet socket: they arrive
/// on its veth peer, whose XDP program, if it has one, gets them first.
fn send_frames(ns: &Ns, iface: &str, count: u32) {
    let ifindex = ns.ifindex(iface);
    ns.enter(|| {
        // Protocol 0: a socket that only sends.
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll; the fields we need are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        let frame = test_frame();
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        for _ in 0..count {
            // SAFETY: `frame` and `to` are readable for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(
                n,
                frame.len() as isize,
                "sendto {iface}: {}",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// A minimal broadcast frame of the test EtherType.
fn test_frame() -> [u8; 64] {
    let mut frame = [0u8; 64];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame
}

const FRAMES: u32 = 100;

/// Makes `FRAMES` frames arrive on `xa` (in `a`), whose XDP program sends them on, and
/// returns how many `receiver` received and how many `ethtool::xdp_send_errors("xa")`
/// counted.
fn send_via_xa(a: &Ns, receiver: &Receiver) -> (u64, u64) {
    let errors = || a.enter(|| ethtool::xdp_send_errors("xa")).unwrap();
    receiver.drain();
    let errors_before = errors();
    // Sent out of xp, xa's peer.
    send_frames(a, "xp", FRAMES);
    // Each veth hop runs in NAPI (softirq), after the syscall has returned: wait until
    // every frame is accounted for and the counts hold still, or for two seconds when some
    // are lost without a trace.
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut received, mut last, mut still) = (0, None, 0);
    loop {
        received += receiver.drain();
        let counts = (received, errors() - errors_before);
        still = if last == Some(counts) { still + 1 } else { 0 };
        last = Some(counts);
        let accounted = counts.0 + counts.1 >= u64::from(FRAMES);
        if (accounted && still >= 3) || Instant::now() > deadline {
            return counts;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `xp`/`xa` in `a` (xa stands for the interface xlb runs on), and `va` (in `a`) / `vb`
/// (in `b`), the veth that xa redirects into.
fn redirect_lab(a: &Ns, b: &Ns) {
    a.ip(&["link", "add", "xa", "type", "veth", "peer", "name", "xp"]);
    a.ip(&["link", "set", "xa", "up"]);
    a.ip(&["link", "set", "xp", "up"]);
    pair_across(a, b);
    b.exec("ethtool", &["-K", "vb", "tx", "off"]);
}

#[test]
fn redirects_into_a_veth_arrive_exactly_when_check_says_so() {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    redirect_lab(&a, &b);
    let pass = bpf::load_xdp(bpf::XDP_PASS);
    let redirect = bpf::load_redirect(a.ifindex("va"));
    let _on_xa = a.enter(|| bpf::attach_xdp(&redirect, "xa", bpf::XDP_FLAGS_DRV_MODE));
    let vb = Receiver::open(&b, "vb");
    let all = u64::from(FRAMES);
    let problems = |kinds: &[VethProblemKind]| {
        kinds
            .iter()
            .map(|&kind| problem("va", "vb", Some(&b), kind))
            .collect::<Vec<_>>()
    };

    // (received by vb, send errors counted on xa, where the program runs)
    b.exec("ethtool", &["-K", "vb", "gro", "off"]);
    assert_eq!(a.check(&["va"]), problems(&[DropsRedirects]));
    assert_eq!(send_via_xa(&a, &vb), (0, all), "GRO off");

    let link = b.enter(|| bpf::attach_xdp(&pass, "vb", bpf::XDP_FLAGS_SKB_MODE));
    assert_eq!(a.check(&["va"]), problems(&[DropsRedirects]));
    assert_eq!(send_via_xa(&a, &vb), (0, all), "generic XDP");
    detach(link, &b, "vb");

    let link = b.enter(|| bpf::attach_xdp(&pass, "vb", bpf::XDP_FLAGS_DRV_MODE));
    assert_eq!(a.check(&["va"]), []);
    assert_eq!(send_via_xa(&a, &vb), (all, 0), "native XDP");
    detach(link, &b, "vb");

    b.exec("ethtool", &["-K", "vb", "gro", "on"]);
    assert_eq!(a.check(&["va"]), []);
    assert_eq!(send_via_xa(&a, &vb), (all, 0), "GRO on");

    // Not something check reports (va has no carrier then): the frames are lost, and
    // only va's tx_dropped counts them, no ethtool counter.
    b.ip(&["link", "set", "vb", "down"]);
    assert_eq!(send_via_xa(&a, &vb), (0, 0), "peer down");
}

/// Why xlb never uses XDP_TX on a veth (it redirects instead, see `NO_XDP_TX`), so `check`
/// asks the peer for GRO only: XDP_TX frames arrive only when the peer has a native XDP
/// program, and GRO does not help.
#[test]
fn xdp_tx_out_of_a_veth_needs_an_xdp_program_on_the_peer() {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    redirect_lab(&a, &b);
    let tx = bpf::load_xdp(bpf::XDP_TX);
    let pass = bpf::load_xdp(bpf::XDP_PASS);
    let _on_xa = a.enter(|| bpf::attach_xdp(&tx, "xa", bpf::XDP_FLAGS_DRV_MODE));
    let xp = Receiver::open(&a, "xp");
    let all = u64::from(FRAMES);
    a.exec("ethtool", &["-K", "xp", "tx", "off"]);

    a.exec("ethtool", &["-K", "xp", "gro", "off"]);
    assert_eq!(send_via_xa(&a, &xp), (0, all), "GRO off");

    // GRO is not enough for XDP_TX: the veth only wakes its peer's NAPI after an XDP_TX
    // when the peer has an XDP program, so the frames wait in the peer's ring (256
    // places); once it is full, the rest are dropped (and counted).
    a.exec("ethtool", &["-K", "xp", "gro", "on"]);
    assert_eq!(send_via_xa(&a, &xp), (0, 0), "GRO on");
    assert_eq!(send_via_xa(&a, &xp), (0, 0), "GRO on, 200 waiting");
    assert_eq!(
        send_via_xa(&a, &xp),
        (0, 3 * all - 256),
        "GRO on, ring full"
    );

    // A native XDP program wakes the ring: the 256 that waited arrive with the new ones.
    let _on_xp = a.enter(|| bpf::attach_xdp(&pass, "xp", bpf::XDP_FLAGS_DRV_MODE));
    // Some of the new ones may still find the ring full and be dropped (counted).
    let (received, errors) = send_via_xa(&a, &xp);
    assert_eq!(
        received + errors,
        256 + all,
        "native XDP: {received} + {errors}"
    );
    assert!(received > 256, "native XDP: {received} received");
    assert_eq!(send_via_xa(&a, &xp), (all, 0), "native XDP");
}

/// Drops an XDP link and waits until the kernel has detached the program: the last
/// reference to the link may be held a moment longer by a child process that another
/// test is starting (fork copies the fd table before exec closes it).
fn detach(link: OwnedFd, ns: &Ns, iface: &str) {
    drop(link);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns.exec("ip", &["link", "show", iface]).contains(" xdp") {
        assert!(Instant::now() < deadline, "{iface}: XDP still attached");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Just enough of bpf(2) to load a two-instruction XDP program and attach it.
mod bpf {
    use super::*;

    pub const XDP_PASS: i32 = 2;
    pub const XDP_TX: i32 = 3;
    pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
    pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;

    /// The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    /// The head of `union bpf_attr` for BPF_LINK_CREATE.
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
        // SAFETY: `attr` is a live, writable bpf_attr head of the size we pass.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        }
    }

    fn fd(rc: libc::c_long, what: &str) -> OwnedFd {
        assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
        // SAFETY: bpf() returned a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(rc as i32) }
    }

    /// An XDP program that returns `verdict` for every frame.
    pub fn load_xdp(verdict: i32) -> OwnedFd {
        // r0 = verdict; exit
        load(&[0xb7 | (u64::from(verdict as u32) << 32), 0x95])
    }

    fn load(insns: &[u64]) -> OwnedFd {
        let license = c"GPL";
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: *b"xlbvt\0\0\0\0\0\0\0\0\0\0\0",
            prog_ifindex: 0,
            expected_attach_type: BPF_XDP,
        };
        fd(bpf(BPF_PROG_LOAD, &mut attr), "BPF_PROG_LOAD")
    }

    /// An XDP program that redirects every frame to `ifindex` (bpf_redirect).
    pub fn load_redirect(ifindex: u32) -> OwnedFd {
        // r1 = ifindex; r2 = 0; call bpf_redirect (23); exit
        let insns: [u64; 4] = [
            0xb7 | (1 << 8) | (u64::from(ifindex) << 32),
            0xb7 | (2 << 8),
            0x85 | (23 << 32),
            0x95,
        ];
        load(&insns)
    }

    /// Attaches `prog` to `iface` of the calling thread's namespace, until the returned
    /// link is dropped.
    pub fn attach_xdp(prog: &OwnedFd, iface: &str, flags: u32) -> OwnedFd {
        let name = CString::new(iface).unwrap();
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "{iface}");
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags,
        };
        fd(bpf(BPF_LINK_CREATE, &mut attr), "BPF_LINK_CREATE (XDP)")
    }
}
