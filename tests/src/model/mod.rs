//! The reference model the XDP program is checked against:
//! * [`rewrite`]: what a NAT rewrite must make of a frame, checksums recomputed from scratch;
//! * [`flows`]: which flow a frame belongs to, what it must be rewritten to, and the flow's
//!   state, learned from the config and the program's outputs, never from its maps.

pub mod flows;
pub mod rewrite;

pub use flows::FlowModel;
pub use rewrite::{
    echo_key_v6, echo_reply_v4, echo_reply_v6, echo_rewrite_v4, echo_rewrite_v6, echo_v6, flow_key,
    flow_key_v4, icmp_error_v4, icmp_error_v6, icmp_layout_v4, icmp_quote_v4, icmp_quote_v6,
    icmp_quoted_check_off, icmp6_quoted_check_off, is_icmp_error, nat_rewrite, nat_rewrite_v4,
    nat_rewrite_v6, too_big_v4,
};
