//! Frames for tests, built and read independently of the XDP program:
//! * [`frame`]: the [`Frame`](frame::Frame) builder (checksums from scratch, malformed on
//!   purpose when asked), ICMP echo and ARP requests;
//! * [`checksum`]: checksums from scratch, and a verifier for every checksum of a frame;
//! * [`layout`]: where the headers of a TCP/UDP-over-IPv4 or -IPv6 frame are;
//! * [`diff`]: a one-line summary of a frame and a hex diff, for failure messages.

pub mod checksum;
pub mod diff;
pub mod frame;
pub mod layout;

pub use checksum::{verify_checksums, verify_checksums_v4, verify_checksums_v6};
pub use diff::{hex_diff, summary};
pub use frame::*;
pub use layout::{Layout, layout, layout_v4, layout_v6, parse_v6};
