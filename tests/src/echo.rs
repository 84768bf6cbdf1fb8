//! Long-lived TCP connections: an echo server that holds thousands of connections in one
//! thread (`poll`), and a client connection that sends a line and waits for it to come back.
//! For the tests that need flows to stay open while something else happens (a SYN flood, a
//! full table, an idle timeout).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::netns::NetNs;

/// How long a client waits for its line to come back.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(3);

/// Echoes back whatever each connection sends, on every connection it accepts, until
/// dropped. One thread, whatever the number of connections.
#[derive(Debug)]
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `addr` in `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<EchoServer> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("echo server: binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || serve(listener, &s, &a));
        Ok(EchoServer {
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// One echo server on every backend of `topo`, on `port` of its address, in backend
    /// order.
    pub fn on_backends(topo: &crate::topology::Topology, port: u16) -> Result<Vec<EchoServer>> {
        topo.backends
            .iter()
            .map(|b| EchoServer::start(&b.ns, SocketAddr::from((b.addr, port))))
            .collect()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool, accepted: &AtomicU64) {
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|c| c.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        let mut closed = Vec::new();
        for (i, pfd) in fds.iter().enumerate().skip(1) {
            if pfd.revents == 0 {
                continue;
            }
            let conn = &mut conns[i - 1];
            match conn.read(&mut buf) {
                Ok(0) => closed.push(i - 1),
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        closed.push(i - 1);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => closed.push(i - 1),
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if fds[0].revents != 0 {
            while let Ok((conn, _)) = listener.accept() {
                // Blocking writes (small echoes), reads only when poll says so.
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_write_timeout(Some(ECHO_TIMEOUT));
                accepted.fetch_add(1, Ordering::SeqCst);
                conns.push(conn);
            }
        }
    }
}

/// One client connection to an echo server.
#[derive(Debug)]
pub struct EchoConn {
    stream: TcpStream,
    pub local: SocketAddr,
}

impl EchoConn {
    /// Connects to `target` from inside `ns` (the socket stays in that namespace), waiting
    /// at most `timeout` for the handshake.
    pub fn connect(ns: &NetNs, target: SocketAddr, timeout: Duration) -> Result<EchoConn> {
        let stream = ns
            .enter(|| TcpStream::connect_timeout(&target, timeout))?
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
        stream.set_write_timeout(Some(ECHO_TIMEOUT))?;
        let local = stream.local_addr()?;
        Ok(EchoConn { stream, local })
    }

    /// Like [`connect`](Self::connect), from the address `source` (of `ns`).
    pub fn connect_from(
        ns: &NetNs,
        source: std::net::Ipv4Addr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<EchoConn> {
        use socket2::{Domain, Socket, Type};
        let stream = ns
            .enter(|| -> std::io::Result<TcpStream> {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                socket.bind(&SocketAddr::from((source, 0)).into())?;
                socket.connect_timeout(&target.into(), timeout)?;
                Ok(socket.into())
            })?
            .with_context(|| format!("connecting to {target} from {source}"))?;
        stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
        stream.set_write_timeout(Some(ECHO_TIMEOUT))?;
        let local = stream.local_addr()?;
        Ok(EchoConn { stream, local })
    }

    /// Sends `line` and checks that exactly it comes back.
    pub fn echo(&mut self, line: &str) -> Result<()> {
        let sent = format!("{line}\n");
        self.stream
            .write_all(sent.as_bytes())
            .with_context(|| format!("{}: sending {line:?}", self.local))?;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\n") {
            match self.stream.read(&mut byte) {
                Ok(0) => bail!("{}: the connection closed before the echo", self.local),
                Ok(_) => got.push(byte[0]),
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: waiting for the echo", self.local));
                }
            }
        }
        ensure!(
            got == sent.as_bytes(),
            "{}: sent {sent:?}, got {:?} back",
            self.local,
            String::from_utf8_lossy(&got)
        );
        Ok(())
    }
}

/// Opens `n` connections to `target` from `client` one by one, from the address `source`
/// when given (each echoes once and closes), and returns how many each of `servers`
/// accepted meanwhile: where a scheduler sent new flows.
pub fn spread(
    client: &NetNs,
    servers: &[EchoServer],
    target: SocketAddr,
    source: Option<std::net::Ipv4Addr>,
    n: usize,
) -> Result<Vec<u64>> {
    let before: Vec<u64> = servers.iter().map(EchoServer::accepted).collect();
    for i in 0..n {
        let mut c = match source {
            None => EchoConn::connect(client, target, Duration::from_secs(3)),
            Some(addr) => EchoConn::connect_from(client, addr, target, Duration::from_secs(3)),
        }
        .with_context(|| format!("new connection {i} to {target}"))?;
        c.echo("hello")
            .with_context(|| format!("new connection {i} to {target}"))?;
    }
    // The servers count an accept when they poll it; give them a moment.
    thread::sleep(Duration::from_millis(200));
    Ok(servers
        .iter()
        .zip(before)
        .map(|(s, b)| s.accepted() - b)
        .collect())
}

/// Checks that each backend's share of `counts` is within `tolerance` of its share of
/// `weights` (per backend index), and that a backend of weight 0 took nothing.
pub fn check_shares(counts: &[u64], weights: &[u32], tolerance: f64, what: &str) -> Result<()> {
    let total: u64 = counts.iter().sum();
    let weight_sum: u32 = weights.iter().sum();
    for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
        let share = c as f64 / total.max(1) as f64;
        let want = f64::from(w) / f64::from(weight_sum);
        ensure!(
            w > 0 || c == 0,
            "{what}: backend {i} has weight 0 but took {c} new connections ({counts:?})"
        );
        ensure!(
            (share - want).abs() <= tolerance,
            "{what}: backend {i} took {share:.3} of new connections, its weight gives {want:.3} \
             ({counts:?})"
        );
    }
    Ok(())
}

/// Raises this process's open-file limit to at least `n` (up to the hard limit): the tests
/// that hold thousands of connections need more than the usual 1024.
pub fn raise_fd_limit(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= n {
        return Ok(());
    }
    ensure!(
        lim.rlim_max >= n,
        "need {n} open files, but the hard limit is {}",
        lim.rlim_max
    );
    lim.rlim_cur = n;
    // SAFETY: setrlimit reads one rlimit, which `lim` is.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(())
}
