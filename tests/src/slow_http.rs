//! A backend that answers HTTP after a set delay: what least-response-time must steer new
//! flows away from. Every connection gets a thread of its own, which reads a request (up
//! to its blank line), waits, answers `200 OK` and closes; a connection that sends nothing
//! is held open until its client closes it. Connections are counted by peer address, so
//! the daemon's health checks (from the load balancer's own address) and the clients'
//! flows (from the SNAT address) can be told apart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::NetNs;

#[derive(Debug)]
pub struct SlowHttpServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<BTreeMap<IpAddr, u64>>>,
    thread: Option<JoinHandle<()>>,
}

/// How long a connection may take to send its request, or to take the answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl SlowHttpServer {
    /// Listens on `addr` in `ns`, answering each request `delay` after it came.
    pub fn start(ns: &NetNs, addr: SocketAddr, delay: Duration) -> Result<SlowHttpServer> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("slow HTTP server: binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        *a.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(peer.ip())
                            .or_default() += 1;
                        thread::spawn(move || answer(stream, delay));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(SlowHttpServer {
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far from `peer`.
    pub fn accepted_from(&self, peer: IpAddr) -> u64 {
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .copied()
            .unwrap_or(0)
    }
}

fn answer(mut stream: TcpStream, delay: Duration) {
    let _ = stream.set_nonblocking(false);
    // Bounded, so a client that never finishes its request cannot keep the thread, and
    // with it the socket and its namespace, once the test is over.
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
    let mut request = Vec::new();
    let mut buf = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    thread::sleep(delay);
    let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
}

impl Drop for SlowHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
