//! What the XDP program (`lb-ebpf`) and the control plane (`lb-userspace`) agree on.
//!
//! * [`maps`]: the keys and values of every BPF map, with their byte orders and sizes pinned
//!   by compile-time assertions, and the map names both sides use.
//! * [`conntrack`]: what a packet tells about its flow, the flow's TCP/UDP state and its
//!   timeouts, shared by the XDP program, the sweeper and the tests.
//! * [`reason`]: why a packet was forwarded, passed or dropped — one list, used as the
//!   data path's verdict and as the metric label.
//! * [`csum`] and [`hash`]: the checksum and flow-hash math the data path runs, kept here
//!   as plain functions so host tests and the reference model use the very same code.
//! * [`scheduler`]: how a new flow's slot of its service's table is chosen, per scheduler
//!   (and, userspace only, the round-robin table builder);
//! * [`quic`]: where a QUIC short-header packet carries its backend's id;
//! * [`maglev`] (userspace only): the weighted Maglev table builder.
#![cfg_attr(not(feature = "std"), no_std)]

// Host unit tests use std even when the crate is built without its `std` feature.
#[cfg(all(test, not(feature = "std")))]
extern crate std;

pub mod conntrack;
pub mod csum;
pub mod hash;
pub mod maps;
pub mod quic;
pub mod reason;
pub mod scheduler;

#[cfg(feature = "std")]
pub mod maglev;
