//! The reference model the XDP program is checked against:
//! * [`rewrite`]: what a NAT rewrite must make of a frame, checksums recomputed from scratch;
//! * [`flows`]: which flow a frame belongs to, what it must be rewritten to, and the flow's
//!   state, learned from the config and the program's outputs, never from its maps.

pub mod flows;
pub mod rewrite;

pub use flows::FlowModel;
pub use rewrite::nat_rewrite_v4;
