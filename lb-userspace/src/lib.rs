//! The xlb control plane, as a library so the integration tests and fixtures can reuse the
//! loader and the map writers. The `xlb` binary (main.rs) is the CLI over these modules:
//!
//! * [`cli`]: the `xlb` commands; [`client`]: the API client the commands other than
//!   `run` and `check` use, and what they print;
//! * [`daemon`]: `xlb run` — load, attach, serve, sweep, check, detach; [`doctor`]:
//!   `xlb doctor`, what a host needs;
//! * [`api`]: the daemon's HTTP/JSON API on a unix socket; [`metrics`]: Prometheus metrics;
//! * [`config`]: the TOML file, parsed and validated;
//! * [`registry`]: the running services and backends, their stable ids, and `apply`, the
//!   one way they change; [`tables`]: the maps it writes (atomic Maglev table switches);
//!   [`mapped`]: the arrays it and the sweeper reach through memory maps;
//! * [`health`]: the daemon's health checks;
//! * [`loader`]: the embedded XDP object, loading and attaching it; [`pins`]: the pinned
//!   maps and links that let the data plane outlive the daemon; [`footprint`]: the kernel
//!   memory the maps take; [`memory`]: how much xlb may take (the host's, the memory
//!   cgroup's);
//! * [`conntrack`]: reading the conntrack table and the sweeper that expires flows;
//! * [`neighbours`]: kernel-managed neighbour entries that keep the backends' next hops resolved;
//! * [`netlink`]: route-netlink queries shared by those two;
//! * [`veth`]: the start-up check that veth peers will not drop or corrupt what xlb sends;
//! * [`ethtool`]: an interface's `ethtool -S` counters and offload flags (SIOCETHTOOL);
//! * [`stats`]: reading the counters, and the `stats begin`/`stats end` lines.
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod doctor;
pub mod ethtool;
pub mod footprint;
pub mod health;
pub mod loader;
pub mod mapped;
pub mod memory;
pub mod metrics;
pub mod neighbours;
pub mod netlink;
pub mod pins;
pub mod registry;
pub mod stats;
pub mod tables;
pub mod veth;
