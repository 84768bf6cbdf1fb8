//! A SYN flood from spoofed sources, for the tests that check a flood cannot push real flows
//! out. Sent from a namespace of the test's own through a raw socket (`IP_HDRINCL`), with
//! source addresses inside that namespace's own subnet only.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::netns::NetNs;
use crate::packet::{ETH_HLEN, Frame, TCP_SYN};

/// Where the spoofed sources come from: `prefix.first ..= prefix.last` (a /24 of the
/// sending namespace), with any port.
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    pub prefix: [u8; 3],
    pub first: u8,
    pub last: u8,
}

/// Sends `count` TCP SYNs to `target` from `ns`, each from a pseudo-random source of
/// `sources` (deterministic for a given `seed`). Returns how long sending took.
pub fn syn_flood(
    ns: &NetNs,
    target: SocketAddrV4,
    sources: Sources,
    count: usize,
    seed: u64,
) -> Result<Duration> {
    ensure!(sources.first <= sources.last, "empty source range");
    ns.enter(|| send(target, sources, count, seed))?
}

fn send(target: SocketAddrV4, sources: Sources, count: usize, seed: u64) -> Result<Duration> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(
        fd >= 0,
        "raw socket: {} (needs root)",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_in is valid; the fields are set below.
    let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dst.sin_family = libc::AF_INET as libc::sa_family_t;
    dst.sin_addr.s_addr = u32::from(*target.ip()).to_be();
    let span = u64::from(sources.last - sources.first) + 1;
    let mut state = seed | 1;
    let started = Instant::now();
    for i in 0..count {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let [a, b, c] = sources.prefix;
        let src = Ipv4Addr::new(a, b, c, sources.first + (r % span) as u8);
        let sport = 1024 + ((r >> 16) % 64000) as u16;
        let frame = Frame {
            id: i as u16,
            ..Frame::tcp((src, sport), (*target.ip(), target.port()), TCP_SYN)
        }
        .build();
        let packet = &frame[ETH_HLEN..];
        // SAFETY: `packet` and `dst` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            // The socket buffer is full: let it drain.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            return Err(e).context(format!("sending SYN {i} of the flood"));
        }
    }
    Ok(started.elapsed())
}
