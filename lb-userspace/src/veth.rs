//! The start-up check of the veth interfaces xlb sends through.
//!
//! Frames that XDP sends out of a veth skip the stack: they go straight into the *peer's*
//! receive ring, and only the peer's NAPI takes them out. What that needs, as measured by
//! sending frames on Linux 6.18 (`tests/tests/veth.rs` does it again on every run):
//!
//! | peer has | XDP_REDIRECT into the veth | XDP_TX out of the veth |
//! | --- | --- | --- |
//! | neither GRO nor XDP, or XDP in generic mode | dropped | dropped |
//! | GRO on | delivered | never delivered: the first 256 frames wait in the peer's ring, the rest are dropped |
//! | an XDP program in native mode | delivered | delivered |
//!
//! The kernel's reasons (`drivers/net/veth.c`): a veth advertises that it can take
//! redirected frames (`NETDEV_XDP_ACT_NDO_XMIT`) only while its peer has GRO or an XDP
//! program, and the redirect core refuses the frame otherwise; after an XDP_TX the veth
//! wakes the peer's NAPI only if the peer has an XDP program (`veth_xdp_flush`). Where the
//! losses are counted: see [`ethtool::xdp_send_errors`].
//!
//! So xlb never uses XDP_TX on a veth: a frame that leaves by the veth it came in on is
//! redirected instead (the loader marks veths in the `NO_XDP_TX` map), and only GRO on the
//! peer is needed.
//!
//! The other rule is about what the peer sends: with TX checksum offload on, its packets
//! arrive with only the pseudo-header sum in the checksum field (CHECKSUM_PARTIAL); XDP
//! sees that unfinished value, the NAT rewrite updates it incrementally, and the packet
//! leaves with a wrong checksum.
//!
//! [`check`] looks at each interface, and when it is a veth, at its peer, also in another
//! network namespace. It runs once, at start-up: it reads state that the operator may
//! change later, and it scans `/proc` to find the peer's namespace.
//!
//! Not checked: a peer that is down (the veth then has no carrier, and every frame sent
//! through it is lost, counted only in its `tx_dropped`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use log::{debug, warn};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached,
};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use rtnetlink::Handle;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};

use crate::ethtool;
use crate::netlink::{Netlink, link_by_index, link_by_name, link_name};

/// A veth set-up that will lose or corrupt what xlb sends through `iface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethProblem {
    /// The interface xlb uses.
    pub iface: String,
    /// Its veth peer's name, in the peer's namespace.
    pub peer: String,
    /// Where the peer is: the name of a namespace in `/run/netns` (as `ip netns` shows
    /// it), `"pid N"` for a namespace known only as that of process N, or `None` when the
    /// peer is in the namespace `check` was called in.
    pub peer_namespace: Option<String>,
    pub kind: VethProblemKind,
}

/// What is wrong with a veth's peer, in the order [`check`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VethProblemKind {
    /// The peer has neither GRO on nor a native XDP program: frames that xlb redirects
    /// into `iface` are dropped. Fixed by GRO on the peer.
    DropsRedirects,
    /// The peer offloads TX checksums: packets from it reach xlb with unfinished
    /// checksums, and xlb's rewrite makes them wrong. Fixed by TX checksum offload off.
    TxChecksumOffload,
}

impl VethProblem {
    /// A shell command that fixes the problem, run where `check` ran.
    pub fn fix_command(&self) -> String {
        let peer = shell_word(&self.peer);
        let command = match self.kind {
            VethProblemKind::DropsRedirects => format!("ethtool -K {peer} gro on"),
            VethProblemKind::TxChecksumOffload => format!("ethtool -K {peer} tx off"),
        };
        match self.peer_namespace.as_deref() {
            None => command,
            Some(ns) => match pid_namespace(ns) {
                Some(pid) => format!("nsenter --target {pid} --net {command}"),
                None => format!("ip netns exec {} {command}", shell_word(ns)),
            },
        }
    }
}

/// "in namespace NAME", for a [`VethProblem::peer_namespace`].
fn place(namespace: Option<&str>) -> String {
    match namespace {
        None => "in this namespace".to_string(),
        Some(ns) => match pid_namespace(ns) {
            Some(pid) => format!("in the namespace of pid {pid}"),
            None => format!("in namespace {ns}"),
        },
    }
}

impl fmt::Display for VethProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (iface, peer, place, fix) = (
            &self.iface,
            &self.peer,
            place(self.peer_namespace.as_deref()),
            self.fix_command(),
        );
        match self.kind {
            VethProblemKind::DropsRedirects => write!(
                f,
                "{iface}: frames redirected into it will be dropped, because its veth peer \
                 {peer} ({place}) has neither GRO on nor a native XDP program; fix: {fix}"
            ),
            VethProblemKind::TxChecksumOffload => write!(
                f,
                "{iface}: packets from its veth peer {peer} ({place}) arrive with unfinished \
                 checksums (TX checksum offload is on there) and will leave xlb with wrong \
                 ones; fix: {fix}"
            ),
        }
    }
}

/// `Some(N)` for a namespace label `"pid N"`.
fn pid_namespace(label: &str) -> Option<u32> {
    label.strip_prefix("pid ")?.parse().ok()
}

/// `word` quoted for a POSIX shell when it holds anything but safe characters.
fn shell_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-.,:+=@%/".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Finds the veth problems of `ifaces`. Runs once, at start-up.
///
/// The interfaces are looked up in the network namespace of the calling thread, and
/// "this namespace" in [`VethProblem::peer_namespace`] means that one. Interfaces that are
/// not veths are fine. What cannot be read (an interface that does not exist, a peer in a
/// namespace that no process and no `/run/netns` name holds, a namespace we may not
/// enter) is skipped with a warning in the log: this check never stops xlb. It fails only
/// when it cannot open a netlink socket.
///
/// Peers are read on short-lived threads that enter their namespace (`setns`); the calling
/// thread's namespace never changes.
pub async fn check(ifaces: &[String]) -> anyhow::Result<Vec<VethProblem>> {
    // Opened first, while we surely run on the calling thread: peers in "this" namespace
    // are read from a thread that enters it, whichever worker thread we are on later.
    let here = File::open("/proc/thread-self/ns/net")
        .context("opening /proc/thread-self/ns/net (this thread's network namespace)")?;
    let mut netlink = Netlink::open()?;
    Ok(check_with(&mut netlink.handle, here, ifaces).await)
}

/// A veth of `ifaces` and where its peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Veth {
    iface: String,
    peer_ifindex: u32,
    /// The peer namespace's id as our namespace knows it; `None` when it is ours.
    peer_nsid: Option<i32>,
}

/// What a peer looks like from its own namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerState {
    name: String,
    gro: bool,
    native_xdp: bool,
    tx_checksum: bool,
}

/// A namespace we can enter: the file that names it, and the label for [`VethProblem`].
struct Namespace {
    file: File,
    label: Option<String>,
}

async fn check_with(handle: &mut Handle, here: File, ifaces: &[String]) -> Vec<VethProblem> {
    let mut veths = Vec::new();
    for iface in ifaces {
        match link_by_name(handle, iface).await {
            Ok(link) => veths.extend(veth_peer(iface, &link)),
            Err(err) => warn!("veth check: skipping {iface}: {err:#}"),
        }
    }
    if veths.is_empty() {
        return Vec::new();
    }

    let wanted: HashSet<i32> = veths.iter().filter_map(|v| v.peer_nsid).collect();
    let mut namespaces = find_namespaces(handle, &wanted).await;
    namespaces.insert(
        None,
        Namespace {
            file: here,
            label: None,
        },
    );

    // Every peer of one namespace is read on one thread that enters it.
    let mut by_namespace: BTreeMap<Option<i32>, Vec<u32>> = BTreeMap::new();
    for veth in &veths {
        if namespaces.contains_key(&veth.peer_nsid) {
            by_namespace
                .entry(veth.peer_nsid)
                .or_default()
                .push(veth.peer_ifindex);
        } else {
            warn!(
                "veth check: skipping {}: its peer (ifindex {}) is in the namespace with \
                 nsid {} (see `ip netns list-id`), which no /run/netns name and no process \
                 holds",
                veth.iface,
                veth.peer_ifindex,
                veth.peer_nsid.unwrap_or(-1),
            );
        }
    }
    let mut peers = BTreeMap::new();
    for (nsid, ifindexes) in by_namespace {
        let namespace = &namespaces[&nsid];
        match read_peers_in(&namespace.file, ifindexes.clone()).await {
            Ok(states) => {
                for (ifindex, state) in states {
                    peers.insert((nsid, ifindex), state);
                }
            }
            Err(err) => warn!(
                "veth check: cannot read the peers with ifindex {ifindexes:?} {}: {err:#}",
                place(namespace.label.as_deref()),
            ),
        }
    }

    let mut problems = Vec::new();
    for veth in &veths {
        let Some(state) = peers.get(&(veth.peer_nsid, veth.peer_ifindex)) else {
            continue;
        };
        match state {
            Ok(state) => {
                let label = namespaces[&veth.peer_nsid].label.clone();
                problems.extend(problems_of(state).into_iter().map(|kind| VethProblem {
                    iface: veth.iface.clone(),
                    peer: state.name.clone(),
                    peer_namespace: label.clone(),
                    kind,
                }));
            }
            Err(err) => warn!(
                "veth check: skipping {}: cannot read its peer (ifindex {}): {err}",
                veth.iface, veth.peer_ifindex
            ),
        }
    }
    problems
}

/// The problems a peer in this state causes, in [`VethProblemKind`] order.
fn problems_of(peer: &PeerState) -> Vec<VethProblemKind> {
    let mut kinds = Vec::new();
    if !peer.gro && !peer.native_xdp {
        kinds.push(VethProblemKind::DropsRedirects);
    }
    if peer.tx_checksum {
        kinds.push(VethProblemKind::TxChecksumOffload);
    }
    kinds
}

/// `Some` when `link` is a veth: its peer's ifindex (IFLA_LINK) and, when the peer is in
/// another namespace, that namespace's id (IFLA_LINK_NETNSID).
fn veth_peer(iface: &str, link: &LinkMessage) -> Option<Veth> {
    let mut is_veth = false;
    let mut peer_ifindex = None;
    let mut peer_nsid = None;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                is_veth |= infos
                    .iter()
                    .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Link(ifindex) => peer_ifindex = Some(*ifindex),
            LinkAttribute::LinkNetNsId(nsid) => peer_nsid = Some(*nsid),
            _ => {}
        }
    }
    if !is_veth {
        return None;
    }
    let Some(peer_ifindex) = peer_ifindex.filter(|&i| i != 0) else {
        warn!("veth check: skipping {iface}: the kernel names no peer (IFLA_LINK)");
        return None;
    };
    Some(Veth {
        iface: iface.to_string(),
        peer_ifindex,
        peer_nsid,
    })
}

/// Whether the link has an XDP program in native (driver) mode: the only kind that makes a
/// veth run NAPI. Generic (skb) mode does not.
fn has_native_xdp(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|attribute| match attribute {
        LinkAttribute::Xdp(xdp) => xdp.iter().any(|x| match x {
            LinkXdp::Attached(attached) => *attached == XdpAttached::Driver,
            LinkXdp::DrvProgId(id) => *id != 0,
            _ => false,
        }),
        _ => false,
    })
}

/// Namespaces that this process can open, each once: the `/run/netns` names first (they
/// give the friendliest label), then every process's namespace, by pid.
fn namespace_candidates() -> Vec<(PathBuf, String)> {
    let mut candidates = Vec::new();
    let mut names: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        candidates.push((Path::new("/run/netns").join(&name), name));
    }
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort();
    for pid in pids {
        candidates.push((
            PathBuf::from(format!("/proc/{pid}/ns/net")),
            format!("pid {pid}"),
        ));
    }
    candidates
}

/// Finds the namespaces whose id (as our namespace knows them) is in `wanted`. Asks the
/// kernel about each namespace once (deduplicated by inode) and stops when all are found.
async fn find_namespaces(
    handle: &mut Handle,
    wanted: &HashSet<i32>,
) -> BTreeMap<Option<i32>, Namespace> {
    let mut found = BTreeMap::new();
    if wanted.is_empty() {
        return found;
    }
    let mut seen = HashSet::new();
    // Our own namespace has no id among the wanted ones; skip it.
    if let Ok(meta) = fs::metadata("/proc/thread-self/ns/net") {
        seen.insert((meta.dev(), meta.ino()));
    }
    for (path, label) in namespace_candidates() {
        // stat() follows the magic link to the namespace's own inode.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match nsid_of(handle, &file).await {
            Ok(Some(nsid)) if wanted.contains(&nsid) => {
                debug!(
                    "veth check: namespace nsid {nsid} is {} ({label})",
                    path.display()
                );
                found.insert(
                    Some(nsid),
                    Namespace {
                        file,
                        label: Some(label),
                    },
                );
                if found.len() == wanted.len() {
                    break;
                }
            }
            Ok(_) => {}
            // A stale /run/netns file (not a namespace) and a process that just exited
            // end here.
            Err(err) => debug!("veth check: {}: {err:#}", path.display()),
        }
    }
    found
}

/// The id that our namespace gives the namespace `ns` (RTM_GETNSID with NETNSA_FD), or
/// `None` when it has none, which means that no link of ours has its peer there.
async fn nsid_of(handle: &mut Handle, ns: &File) -> anyhow::Result<Option<i32>> {
    let mut message = NsidMessage::default();
    // The fd stays open (we hold `ns`) until the answer is in.
    let fd = u32::try_from(ns.as_raw_fd()).context("a negative fd")?;
    message.attributes = vec![NsidAttribute::Fd(fd)];
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut answers = handle.request(request).context("RTM_GETNSID")?;
    let mut nsid = None;
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::Error(err) if err.code.is_some() => {
                bail!("RTM_GETNSID: {}", err.to_io())
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(answer)) => {
                for attribute in answer.attributes {
                    if let NsidAttribute::Id(id) = attribute
                        && id >= 0
                    {
                        nsid = Some(id);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(nsid)
}

/// Reads the peers `ifindexes` on a new thread that enters the namespace `ns`.
async fn read_peers_in(
    ns: &File,
    ifindexes: Vec<u32>,
) -> anyhow::Result<Vec<(u32, Result<PeerState, String>)>> {
    let ns = ns.try_clone().context("duplicating a namespace fd")?;
    let (send, receive) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("xlb-veth-check".to_string())
        .spawn(move || {
            let _ = send.send(read_peers_on_this_thread(&ns, &ifindexes));
        })
        .context("starting a thread to enter the peer's namespace")?;
    receive
        .await
        .context("the thread that read the peers ended without an answer")?
}

/// Enters `ns` (this thread only, for good: call it on a thread of its own) and reads
/// each peer with a netlink socket and ethtool ioctls of that namespace.
fn read_peers_on_this_thread(
    ns: &File,
    ifindexes: &[u32],
) -> anyhow::Result<Vec<(u32, Result<PeerState, String>)>> {
    // SAFETY: setns takes no pointers; `ns` is an open namespace file. CLONE_NEWNET
    // changes only this thread's network namespace, which the caller dedicated to this.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("a tokio runtime for the peer's namespace")?;
    runtime.block_on(async {
        let netlink = Netlink::open().context("in the peer's namespace")?;
        let mut states = Vec::new();
        for &ifindex in ifindexes {
            let state = read_peer(&netlink.handle, ifindex)
                .await
                .map_err(|err| format!("{err:#}"));
            states.push((ifindex, state));
        }
        Ok(states)
    })
}

/// Reads one peer; the calling thread must be in the peer's namespace.
async fn read_peer(handle: &Handle, ifindex: u32) -> anyhow::Result<PeerState> {
    let link = link_by_index(handle, ifindex).await?;
    let name = link_name(&link)?;
    Ok(PeerState {
        gro: ethtool::gro_enabled(&name)?,
        tx_checksum: ethtool::tx_checksum_enabled(&name)?,
        native_xdp: has_native_xdp(&link),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(ns: Option<&str>, kind: VethProblemKind) -> VethProblem {
        VethProblem {
            iface: "lb0".into(),
            peer: "bk0".into(),
            peer_namespace: ns.map(str::to_string),
            kind,
        }
    }

    #[test]
    fn fix_commands_name_the_peer_and_its_namespace() {
        use VethProblemKind::*;
        assert_eq!(
            problem(None, DropsRedirects).fix_command(),
            "ethtool -K bk0 gro on"
        );
        assert_eq!(
            problem(Some("xlbt-123-0-b1"), DropsRedirects).fix_command(),
            "ip netns exec xlbt-123-0-b1 ethtool -K bk0 gro on"
        );
        assert_eq!(
            problem(Some("pid 4242"), TxChecksumOffload).fix_command(),
            "nsenter --target 4242 --net ethtool -K bk0 tx off"
        );
        assert_eq!(
            problem(Some("it's"), TxChecksumOffload).fix_command(),
            r"ip netns exec 'it'\''s' ethtool -K bk0 tx off"
        );
    }

    #[test]
    fn display_says_what_happens_and_how_to_fix_it() {
        let text = problem(Some("ns-b"), VethProblemKind::DropsRedirects).to_string();
        assert_eq!(
            text,
            "lb0: frames redirected into it will be dropped, because its veth peer bk0 (in \
             namespace ns-b) has neither GRO on nor a native XDP program; fix: ip netns exec \
             ns-b ethtool -K bk0 gro on"
        );
        let text = problem(Some("pid 7"), VethProblemKind::TxChecksumOffload).to_string();
        assert!(text.contains("(in the namespace of pid 7)"), "{text}");
        assert!(
            text.ends_with("fix: nsenter --target 7 --net ethtool -K bk0 tx off"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn which_peer_states_are_problems() {
        use VethProblemKind::*;
        let peer = |gro, native_xdp, tx_checksum| PeerState {
            name: "p".into(),
            gro,
            native_xdp,
            tx_checksum,
        };
        assert_eq!(
            problems_of(&peer(false, false, true)),
            [DropsRedirects, TxChecksumOffload]
        );
        assert_eq!(problems_of(&peer(false, false, false)), [DropsRedirects]);
        assert_eq!(problems_of(&peer(true, false, true)), [TxChecksumOffload]);
        assert_eq!(problems_of(&peer(true, false, false)), []);
        assert_eq!(problems_of(&peer(false, true, false)), []);
        assert_eq!(problems_of(&peer(true, true, true)), [TxChecksumOffload]);
    }

    fn link(attributes: Vec<LinkAttribute>) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.attributes = attributes;
        message
    }

    #[test]
    fn veth_peer_reads_ifindex_and_nsid() {
        let veth = || LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]);
        assert_eq!(
            veth_peer(
                "va",
                &link(vec![
                    veth(),
                    LinkAttribute::Link(7),
                    LinkAttribute::LinkNetNsId(2)
                ])
            ),
            Some(Veth {
                iface: "va".into(),
                peer_ifindex: 7,
                peer_nsid: Some(2),
            })
        );
        assert_eq!(
            veth_peer("va", &link(vec![veth(), LinkAttribute::Link(7)])),
            Some(Veth {
                iface: "va".into(),
                peer_ifindex: 7,
                peer_nsid: None,
            })
        );
        let bridge = LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]);
        assert_eq!(
            veth_peer("br0", &link(vec![bridge, LinkAttribute::Link(7)])),
            None
        );
        assert_eq!(veth_peer("lo", &link(vec![])), None);
    }

    #[test]
    fn only_native_xdp_counts() {
        let xdp = |x: Vec<LinkXdp>| link(vec![LinkAttribute::Xdp(x)]);
        assert!(has_native_xdp(&xdp(vec![
            LinkXdp::Attached(XdpAttached::Driver),
            LinkXdp::ProgId(5)
        ])));
        assert!(has_native_xdp(&xdp(vec![
            LinkXdp::Attached(XdpAttached::Multiple),
            LinkXdp::SkbProgId(4),
            LinkXdp::DrvProgId(5)
        ])));
        assert!(!has_native_xdp(&xdp(vec![
            LinkXdp::Attached(XdpAttached::SocketBuffer),
            LinkXdp::ProgId(5)
        ])));
        assert!(!has_native_xdp(&xdp(vec![LinkXdp::Attached(
            XdpAttached::None
        )])));
        assert!(!has_native_xdp(&link(vec![])));
    }
}
