//! The xlb control plane, as a library so the integration tests and fixtures can reuse the
//! loader and the map writer. The `xlb` binary (main.rs) is the CLI over these modules:
//!
//! * [`config`]: the TOML file, parsed and validated;
//! * [`loader`]: the embedded XDP object, loading and attaching it;
//! * [`tables`]: writing services, backends and Maglev tables into the maps;
//! * [`conntrack`]: reading the conntrack table and the sweeper that expires flows;
//! * [`neighbours`]: kernel-managed neighbour entries that keep the backends' next hops resolved;
//! * [`netlink`]: route-netlink queries shared by those two;
//! * [`veth`]: the start-up check that veth peers will not drop or corrupt what xlb sends;
//! * [`ethtool`]: an interface's `ethtool -S` counters and offload flags (SIOCETHTOOL);
//! * [`stats`]: reading and printing the counters;
//! * [`cli`]: the `xlb` commands.
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod ethtool;
pub mod loader;
pub mod neighbours;
pub mod netlink;
pub mod stats;
pub mod tables;
pub mod veth;
