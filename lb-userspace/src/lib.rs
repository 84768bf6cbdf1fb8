//! The xlb control plane, as a library so the integration tests and fixtures can reuse the
//! loader and the map writer. The `xlb` binary (main.rs) is the CLI over these modules:
//!
//! * [`config`]: the TOML file, parsed and validated;
//! * [`loader`]: the embedded XDP object, loading and attaching it;
//! * [`tables`]: writing services, backends and Maglev tables into the maps;
//! * [`stats`]: reading and printing the counters;
//! * [`ethtool`]: an interface's `ethtool -S` counters and offload flags (SIOCETHTOOL);
//! * [`veth`]: the start-up check that veth peers will not drop or corrupt what xlb sends;
//! * [`cli`]: the `xlb` commands.
pub mod cli;
pub mod config;
pub mod ethtool;
pub mod loader;
pub mod stats;
pub mod tables;
pub mod veth;
