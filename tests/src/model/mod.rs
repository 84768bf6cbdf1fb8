//! The reference model the XDP program is checked against: what it must make of a frame.
//! * [`rewrite`]: the NAT rewrite, with checksums recomputed from scratch.

pub mod rewrite;

pub use rewrite::nat_rewrite_v4;
