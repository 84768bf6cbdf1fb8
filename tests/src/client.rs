//! Clients for the [line servers](crate::servers): send a line, read the
//! `"<name> <peer-ip>:<peer-port>"` answer, and report who answered and what it saw.
//!
//! The batch functions create every socket inside the given namespace (through
//! [`NetNs::enter`]). Nothing is retried: a lost packet shows up as a failed request.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::netns::NetNs;

/// Connect, read and write timeout of every client socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// What the TCP clients send.
pub const REQUEST: &str = "hello\n";
/// Longest answer a client reads.
const MAX_ANSWER: usize = 1024;
/// A batch stops starting new requests after this many failures. When the load balancer
/// is broken every request runs into its timeout; without this, 300 connections at 5 s
/// each would take minutes to report what the first few failures already show.
pub const STOP_AFTER_FAILURES: usize = 8;

/// A parsed server answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Which server answered (`b1`, ...).
    pub server: String,
    /// The source address the server saw.
    pub seen_peer: SocketAddr,
}

impl Answer {
    /// Parses `"<name> <ip>:<port>"` (one trailing newline allowed).
    pub fn parse(line: &str) -> Result<Answer> {
        let trimmed = line.strip_suffix('\n').unwrap_or(line);
        let (server, peer) = trimmed
            .split_once(' ')
            .ok_or_else(|| anyhow!("answer {line:?} is not `<name> <ip>:<port>`"))?;
        let seen_peer = peer
            .parse()
            .with_context(|| format!("answer {line:?}: bad peer address"))?;
        ensure!(!server.is_empty(), "answer {line:?} has no server name");
        Ok(Answer {
            server: server.to_string(),
            seen_peer,
        })
    }
}

/// One completed TCP exchange.
#[derive(Debug, Clone)]
pub struct TcpReply {
    /// The client socket's address (its source port was picked by the kernel).
    pub local: SocketAddr,
    /// The client socket's peer: the address it connected to.
    pub peer: SocketAddr,
    pub answer: Answer,
}

/// Connects to `target`, sends [`REQUEST`], reads the answer until the server closes.
/// Must run on a thread inside the client's namespace; see [`tcp_requests`].
pub fn tcp_request(target: SocketAddr) -> Result<TcpReply> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    stream
        .write_all(REQUEST.as_bytes())
        .with_context(|| format!("{local} -> {target}: sending the request"))?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .with_context(|| format!("{local} -> {target}: reading the answer"))?;
    let text = String::from_utf8_lossy(&answer);
    let answer = Answer::parse(&text).with_context(|| format!("{local} -> {target}"))?;
    Ok(TcpReply {
        local,
        peer,
        answer,
    })
}

/// Makes `count` TCP requests to `target` from inside `ns`, at most `concurrency` at a
/// time. Returns one result per request, in request order; after
/// [`STOP_AFTER_FAILURES`] failures the remaining requests are not attempted and report
/// that as their error.
pub fn tcp_requests(
    ns: &NetNs,
    target: SocketAddr,
    count: usize,
    concurrency: usize,
) -> Result<Vec<Result<TcpReply>>> {
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<TcpReply>>>> =
        Mutex::new((0..count).map(|_| None).collect());
    thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..concurrency.clamp(1, count.max(1)))
            .map(|_| {
                s.spawn(|| {
                    ns.enter(|| {
                        loop {
                            if failures.load(Ordering::SeqCst) >= STOP_AFTER_FAILURES {
                                break;
                            }
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= count {
                                break;
                            }
                            let r = tcp_request(target).with_context(|| format!("request {i}"));
                            if r.is_err() {
                                failures.fetch_add(1, Ordering::SeqCst);
                            }
                            results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                        }
                    })
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(entered) => entered?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    })?;
    Ok(results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| Err(not_attempted(i))))
        .collect())
}

fn not_attempted(i: usize) -> anyhow::Error {
    anyhow!("request {i} not attempted: the batch stopped after {STOP_AFTER_FAILURES} failures")
}

/// One completed UDP exchange.
#[derive(Debug, Clone)]
pub struct UdpReply {
    /// The client socket's address.
    pub local: SocketAddr,
    /// Where the reply came from (must be the address the request went to).
    pub from: SocketAddr,
    pub answer: Answer,
}

/// Sends one datagram to `target` from a fresh socket (so a fresh source port, hence a new
/// flow) and waits up to `timeout` for the reply. Must run inside the client's namespace.
pub fn udp_request(target: SocketAddr, timeout: Duration) -> Result<UdpReply> {
    udp_request_with(target, REQUEST.as_bytes(), timeout)
}

/// Like [`udp_request`], with `payload` for the datagram (the servers answer any). The
/// socket is of `target`'s family, bound to its unspecified address.
pub fn udp_request_with(target: SocketAddr, payload: &[u8], timeout: Duration) -> Result<UdpReply> {
    let any = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(any).context("binding a UDP client socket")?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    socket
        .send_to(payload, target)
        .with_context(|| format!("sending to {target}"))?;
    // `local_addr` after the send: the send bound the ephemeral port.
    let local = socket.local_addr()?;
    let mut buf = [0u8; MAX_ANSWER];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("{local} -> {target}: no reply within {timeout:?}"))?;
    let answer = Answer::parse(&String::from_utf8_lossy(&buf[..n]))
        .with_context(|| format!("{local} -> {target}"))?;
    Ok(UdpReply {
        local,
        from,
        answer,
    })
}

/// Makes `count` UDP requests to `target` from inside `ns`, one after another, each from
/// its own socket. Returns one result per request, in order; after
/// [`STOP_AFTER_FAILURES`] failures the remaining requests are not attempted.
pub fn udp_requests(
    ns: &NetNs,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Result<UdpReply>>> {
    ns.enter(|| {
        let mut failures = 0;
        (0..count)
            .map(|i| {
                if failures >= STOP_AFTER_FAILURES {
                    return Err(not_attempted(i));
                }
                let r = udp_request(target, timeout).with_context(|| format!("UDP request {i}"));
                failures += usize::from(r.is_err());
                r
            })
            .collect()
    })
}

/// Splits results into successes and error messages.
pub fn partition<T>(results: Vec<Result<T>>) -> (Vec<T>, Vec<String>) {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (ok, errors)
}

/// Fails unless every result succeeded; the error lists the first few failures.
pub fn all_ok<T>(what: &str, results: Vec<Result<T>>) -> Result<Vec<T>> {
    let total = results.len();
    let (ok, errors) = partition(results);
    if !errors.is_empty() {
        let shown: Vec<_> = errors.iter().take(10).collect();
        bail!(
            "{what}: {} of {total} failed; first failures: {shown:#?}",
            errors.len()
        );
    }
    Ok(ok)
}

/// Checks an answer that came back through a `fullnat` service at `vip`: from the VIP
/// (`from`: a TCP socket's peer, a UDP reply's source), answered by one of the topology's
/// backends, which saw `snat` as the source. `local` is the client socket, for messages.
pub fn check_fullnat(
    local: SocketAddr,
    from: SocketAddr,
    answer: &Answer,
    vip: SocketAddr,
    snat: std::net::IpAddr,
) -> Result<()> {
    anyhow::ensure!(
        from == vip,
        "{local}: the answer came from {from}, not the VIP {vip}"
    );
    anyhow::ensure!(
        crate::topology::BACKEND_NAMES.contains(&answer.server.as_str()),
        "{local}: answered by unknown server {:?}",
        answer.server
    );
    anyhow::ensure!(
        answer.seen_peer.ip() == snat,
        "{local}: backend {} saw source {}, expected the SNAT address {snat}",
        answer.server,
        answer.seen_peer
    );
    Ok(())
}

/// Checks an answer that came back through a `dnat` service at `vip`: from the VIP
/// (`from`: a TCP socket's peer, a UDP reply's source), and the backend saw the client
/// itself, its address `client` and the socket's port. `local` is the client socket (bound
/// to any address, so its port is what identifies it).
pub fn check_dnat(
    local: SocketAddr,
    from: SocketAddr,
    answer: &Answer,
    vip: SocketAddr,
    client: std::net::IpAddr,
) -> Result<()> {
    let seen_as = SocketAddr::new(client, local.port());
    anyhow::ensure!(
        answer.seen_peer == seen_as,
        "{} saw {} for the client socket {local}, not the client's own {seen_as}",
        answer.server,
        answer.seen_peer
    );
    // From the VIP, not from the backend's own address.
    anyhow::ensure!(
        from == vip,
        "{local}: the answer came from {from}, not the VIP {vip}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let a = Answer::parse("b2 10.20.0.1:40001\n").unwrap();
        assert_eq!(a.server, "b2");
        assert_eq!(a.seen_peer, "10.20.0.1:40001".parse().unwrap());
        assert!(Answer::parse("b2").is_err());
        assert!(Answer::parse("b2 nonsense").is_err());
        assert!(Answer::parse(" 10.20.0.1:1").is_err());
        let a = Answer::parse("b3 [2001:db8:20::1]:40002\n").unwrap();
        assert_eq!(a.seen_peer, "[2001:db8:20::1]:40002".parse().unwrap());
    }
}
