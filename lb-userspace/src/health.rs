//! Health checks from the daemon: one task per backend of every service with a
//! `[service.health]`, which connects (`tcp`) or sends `GET path` (`http`, 2xx or 3xx is
//! healthy) every `interval_ms`, each within `timeout_ms`. `fall` failures in a row mark an
//! up backend down, which takes it out of its service's Maglev table; `rise` successes in a
//! row bring it back. Backends start up, so a restart does not empty a table while the
//! first checks run. Checks go from the daemon's network namespace straight to the
//! backend's address; open flows are untouched either way (conntrack keeps them).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

use crate::{
    api::Shared,
    config::{HealthConfig, HealthKind},
    registry::ServiceName,
};

/// The running checkers, kept in step with the registry by [`Checks::follow`]: one per
/// backend, by its service, address and id (a backend removed and added again between two
/// follows is a new backend, with a new id: its checker starts afresh).
pub struct Checks {
    shared: Arc<Shared>,
    running: HashMap<(ServiceName, SocketAddr, u32), (HealthConfig, JoinHandle<()>)>,
}

impl Checks {
    pub fn start(shared: Arc<Shared>) -> Checks {
        let mut checks = Checks {
            shared,
            running: HashMap::new(),
        };
        checks.follow();
        checks
    }

    /// Starts checkers for new backends (or changed settings), stops those of backends that
    /// are gone, and brings back up a down backend whose service stopped checking.
    pub fn follow(&mut self) {
        let mut wanted = HashMap::new();
        let mut unchecked_down = Vec::new();
        {
            // Not on the async threads' time: if a change holds the registry, next tick.
            let registry = match self.shared.registry.try_lock() {
                Ok(registry) => registry,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            for s in registry.services() {
                for b in &s.backends {
                    match &s.config.health {
                        Some(h) => {
                            wanted.insert((s.name, b.config.address, b.id), h.clone());
                        }
                        None if b.down => unchecked_down.push((s.name, b.config.address)),
                        None => {}
                    }
                }
            }
        }
        self.running.retain(|key, (config, task)| {
            let keep = wanted.get(key) == Some(config);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, config) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(check_loop(
                self.shared.clone(),
                key.0,
                key.1,
                config.clone(),
            ));
            self.running.insert(key, (config, task));
        }
        for (name, address) in unchecked_down {
            let shared = self.shared.clone();
            tokio::spawn(async move { set_down(&shared, name, address, false).await });
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, task) in self.running.values() {
            task.abort();
        }
    }
}

async fn check_loop(shared: Arc<Shared>, name: ServiceName, address: SocketAddr, h: HealthConfig) {
    let interval = Duration::from_millis(h.interval_ms as u64);
    let timeout = Duration::from_millis(h.timeout_ms as u64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut down = false;
    let mut latency_us = 0u32;
    loop {
        ticker.tick().await;
        // The registry says what state the backend is in (after a restart, a re-add, a
        // checker restarted with new settings): go on from there.
        if let Some(now) = registry_down(&shared, &name, address) {
            down = now;
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, probe(&h, address)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", h.timeout_ms)),
        };
        match result {
            Ok(()) => {
                successes += 1;
                failures = 0;
                // The response time, smoothed (weight 1/4 to the newest), for
                // least-response-time and the stats.
                let sample = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                latency_us = match latency_us {
                    0 => sample.max(1),
                    old => ((old as u64 * 3 + sample as u64) / 4).max(1) as u32,
                };
                set_latency(&shared, name, address, latency_us).await;
                if down && successes >= h.rise {
                    down = false;
                    log::info!(
                        "backend {address} of {name} is up: {successes} check(s) passed \
                         (last in {:?})",
                        started.elapsed()
                    );
                    set_down(&shared, name, address, false).await;
                }
            }
            Err(why) => {
                failures += 1;
                successes = 0;
                if !down && failures >= h.fall {
                    down = true;
                    log::warn!(
                        "backend {address} of {name} is down: {failures} check(s) failed, the last: {why}"
                    );
                    set_down(&shared, name, address, true).await;
                }
            }
        }
    }
}

/// Records the backend's smoothed response time in the registry, off the async threads.
async fn set_latency(shared: &Arc<Shared>, name: ServiceName, address: SocketAddr, us: u32) {
    let shared = shared.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut registry = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.set_latency(&name, address, us)
    })
    .await;
    if let Ok(Err(e)) = done {
        log::error!("recording backend {address}'s response time: {e:#}");
    }
}

/// Whether the registry has the backend down, if the registry is free to say.
fn registry_down(shared: &Shared, name: &ServiceName, address: SocketAddr) -> Option<bool> {
    let registry = match shared.registry.try_lock() {
        Ok(registry) => registry,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return None,
    };
    registry
        .service(name)
        .and_then(|s| s.backends.iter().find(|b| b.config.address == address))
        .map(|b| b.down)
}

/// Marks the backend down or up in the registry (a table rebuild), off the async threads;
/// returns once done, so one checker's verdicts land in order.
async fn set_down(shared: &Arc<Shared>, name: ServiceName, address: SocketAddr, down: bool) {
    let shared = shared.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut registry = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.set_down(&name, address, down)
    })
    .await;
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::error!("marking backend {address} of {name} down={down}: {e:#}"),
        Err(e) => log::error!("marking backend {address} of {name} down={down}: {e}"),
    }
}

/// One check; `Err` says why it failed.
async fn probe(h: &HealthConfig, address: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match h.kind {
        HealthKind::Tcp | HealthKind::None => Ok(()),
        HealthKind::Http => {
            let request = http_request(&h.path, address);
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("sending the request: {e}"))?;
            let mut head = [0u8; 32];
            let mut got = 0;
            while got < 12 {
                let n = stream
                    .read(&mut head[got..])
                    .await
                    .map_err(|e| format!("reading the answer: {e}"))?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            http_status_ok(&head[..got])
        }
    }
}

/// The check's request to the backend at `address`. The Host header is the address and port
/// as a URL has them (RFC 9110, 7.2): an IPv6 address in brackets, which `SocketAddr`'s
/// Display gives.
fn http_request(path: &str, address: SocketAddr) -> String {
    format!(
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nUser-Agent: xlb-health\r\nConnection: \
         close\r\n\r\n"
    )
}

/// Whether an HTTP answer's status line says 2xx or 3xx.
fn http_status_ok(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let code = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP status {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_brackets_an_ipv6_address() {
        let v6 = http_request("/healthz", "[2001:db8:20::2]:8080".parse().unwrap());
        assert!(
            v6.starts_with("GET /healthz HTTP/1.0\r\nHost: [2001:db8:20::2]:8080\r\n"),
            "{v6:?}"
        );
        let v4 = http_request("/", "10.20.0.2:80".parse().unwrap());
        assert!(
            v4.starts_with("GET / HTTP/1.0\r\nHost: 10.20.0.2:80\r\n"),
            "{v4:?}"
        );
    }

    #[test]
    fn http_status_lines() {
        assert!(http_status_ok(b"HTTP/1.1 200 OK\r\n").is_ok());
        assert!(http_status_ok(b"HTTP/1.0 302 Found\r\n").is_ok());
        assert!(http_status_ok(b"HTTP/1.1 404 Not Found").is_err());
        assert!(http_status_ok(b"HTTP/1.1 503 Unavailable").is_err());
        assert!(http_status_ok(b"SSH-2.0-OpenSSH").is_err());
        assert!(http_status_ok(b"").is_err());
    }
}
