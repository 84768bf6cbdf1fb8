//! Line-answering servers: each TCP connection or UDP datagram is answered with
//! `"<name> <peer-ip>:<peer-port>\n"`, where `<peer>` is the source address the server saw.
//! That tells the client which backend served it and whether the backend saw the SNAT
//! address. Servers count what they served, so the test can compare with xlb's counters.
//!
//! Sockets are created inside the server's namespace (through [`NetNs::enter`]) and then
//! served from ordinary threads. Dropping a server stops and joins its threads.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::NetNs;
use crate::topology::{BACKEND_PORT, Topology};

/// Read/write timeout of every server-side socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept and receive loops look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Longest request line a server reads.
const MAX_REQUEST: usize = 1024;

/// What a server has served so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// UDP datagrams answered.
    pub udp_datagrams: u64,
    /// Every source IP seen, TCP and UDP.
    pub peer_ips: BTreeSet<IpAddr>,
    /// TCP connections that failed after accept (read/write error or timeout).
    pub tcp_errors: u64,
}

/// A TCP and/or UDP line server in one namespace.
#[derive(Debug)]
pub struct LineServer {
    name: String,
    stats: Arc<Mutex<ServerStats>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LineServer {
    /// Starts a server called `name` in `ns`, listening on `tcp` and/or `udp`.
    pub fn start(
        ns: &NetNs,
        name: &str,
        tcp: Option<SocketAddr>,
        udp: Option<SocketAddr>,
    ) -> Result<LineServer> {
        Self::start_on(ns, name, tcp.as_slice(), udp.as_slice())
    }

    /// Starts a server called `name` in `ns`, listening on every address of `tcp` and `udp`
    /// (e.g. an IPv4 and an IPv6 one), all counted in the one [`ServerStats`].
    pub fn start_on(
        ns: &NetNs,
        name: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<LineServer> {
        let mut server = LineServer {
            name: name.to_string(),
            stats: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for &addr in tcp {
            let listener = ns
                .enter(|| TcpListener::bind(addr))?
                .with_context(|| format!("server {name}: binding TCP {addr} in {}", ns.name()))?;
            // Non-blocking accept so the loop can notice the stop flag.
            listener.set_nonblocking(true)?;
            let (name, stats, stop) = server.shared();
            server.threads.push(thread::spawn(move || {
                tcp_loop(listener, &name, &stats, &stop)
            }));
        }
        for &addr in udp {
            let socket = ns
                .enter(|| UdpSocket::bind(addr))?
                .with_context(|| format!("server {name}: binding UDP {addr} in {}", ns.name()))?;
            socket.set_read_timeout(Some(POLL))?;
            socket.set_write_timeout(Some(IO_TIMEOUT))?;
            let (name, stats, stop) = server.shared();
            server.threads.push(thread::spawn(move || {
                udp_loop(socket, &name, &stats, &stop)
            }));
        }
        Ok(server)
    }

    fn shared(&self) -> (String, Arc<Mutex<ServerStats>>, Arc<AtomicBool>) {
        (self.name.clone(), self.stats.clone(), self.stop.clone())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A snapshot of what the server has served.
    pub fn stats(&self) -> ServerStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_loop(listener: TcpListener, name: &str, stats: &Arc<Mutex<ServerStats>>, stop: &AtomicBool) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                {
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    s.tcp_connections += 1;
                    s.peer_ips.insert(peer.ip());
                }
                // One thread per connection, bounded in time by the socket timeouts, so
                // one stuck connection does not hold up the others.
                let name = name.to_string();
                let stats = stats.clone();
                handlers.push(thread::spawn(move || {
                    if let Err(e) = answer_tcp(stream, &name, peer) {
                        eprintln!("server {name}: connection from {peer}: {e:#}");
                        stats.lock().unwrap_or_else(|e| e.into_inner()).tcp_errors += 1;
                    }
                }));
                handlers.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(&listener, POLL),
            Err(e) => {
                eprintln!("server {name}: accept: {e}");
                thread::sleep(POLL);
            }
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

/// Reads one request line (up to `\n`, EOF or [`MAX_REQUEST`] bytes), answers, closes.
fn answer_tcp(mut stream: TcpStream, name: &str, peer: SocketAddr) -> Result<()> {
    // The accepted socket must block (with timeouts), whatever the listener's mode.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 256];
    while !request.contains(&b'\n') && request.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).context("reading the request")?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    stream
        .write_all(answer(name, peer).as_bytes())
        .context("writing the answer")?;
    Ok(())
}

fn udp_loop(socket: UdpSocket, name: &str, stats: &Arc<Mutex<ServerStats>>, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                {
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    s.udp_datagrams += 1;
                    s.peer_ips.insert(peer.ip());
                }
                if let Err(e) = socket.send_to(answer(name, peer).as_bytes(), peer) {
                    eprintln!("server {name}: UDP answer to {peer}: {e}");
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("server {name}: UDP receive: {e}");
                thread::sleep(POLL);
            }
        }
    }
}

/// The answer line: `"<name> <peer-ip>:<peer-port>\n"`.
pub fn answer(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

/// The TCP and UDP servers on port 8080 of every backend of a [`Topology`], both families.
#[derive(Debug)]
pub struct BackendServers {
    pub servers: Vec<LineServer>,
}

impl BackendServers {
    /// Starts a server named after each backend (`b1`, ...) on `0.0.0.0:8080` and on its
    /// IPv6 address's port 8080 (`[2001:db8:20:N::2]:8080`), TCP and UDP. (The IPv6 socket
    /// is bound to the address, not to `[::]`, which would also take IPv4 and clash with the
    /// IPv4 socket.)
    pub fn start(topology: &Topology) -> Result<BackendServers> {
        let any: SocketAddr = ([0, 0, 0, 0], BACKEND_PORT).into();
        let mut servers = Vec::new();
        for b in &topology.backends {
            let addrs = [any, b.service_addr6()];
            servers.push(LineServer::start_on(&b.ns, &b.name, &addrs, &addrs)?);
        }
        Ok(BackendServers { servers })
    }

    /// The stats of the backend called `name`, if there is one.
    pub fn stats(&self, name: &str) -> Option<ServerStats> {
        self.servers
            .iter()
            .find(|s| s.name() == name)
            .map(LineServer::stats)
    }

    /// Every source IP any backend saw.
    pub fn all_peer_ips(&self) -> BTreeSet<IpAddr> {
        self.servers
            .iter()
            .flat_map(|s| s.stats().peer_ips)
            .collect()
    }

    /// TCP connections accepted by all backends together.
    pub fn total_tcp_connections(&self) -> u64 {
        self.servers.iter().map(|s| s.stats().tcp_connections).sum()
    }

    /// UDP datagrams answered by all backends together.
    pub fn total_udp_datagrams(&self) -> u64 {
        self.servers.iter().map(|s| s.stats().udp_datagrams).sum()
    }
}

/// Waits until `listener` has a connection to accept, or `timeout` passes: so the accept
/// loop answers at once, yet still looks at its stop flag now and then.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, as the count says.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}
