//! Programs for `cargo xtask bench` only; xlb never attaches them. They measure what any XDP
//! program costs, and what forwarding costs at its cheapest, beside xlb, on the same frames.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use crate::{DEVMAP, parse::ptr_at};

/// The interface `forward` sends to (the benchmark sets it at load time).
#[unsafe(no_mangle)]
static BENCH_FORWARD_TO: u32 = 0;

/// The frame `transmit` sends (the benchmark sets it at load time).
#[unsafe(no_mangle)]
static BENCH_FRAME: [u8; BENCH_FRAME_LEN] = [0; BENCH_FRAME_LEN];
/// A minimal Ethernet frame (without the FCS).
const BENCH_FRAME_LEN: usize = 60;

/// How many flows `transmit` spreads its frames over, a power of two (0 or 1: one flow):
/// the benchmark sets it at load time.
#[unsafe(no_mangle)]
static BENCH_FLOWS: u32 = 0;
/// Frames `transmit` has sent (on the one CPU a test run uses).
static mut BENCH_SENT: u32 = 0;
/// Where an IPv4 (no options) UDP frame's source port is.
const UDP_SOURCE_PORT_AT: usize = 14 + 20;

/// Writes `BENCH_FRAME` over the frame it is given and transmits it back out of the
/// interface it ran on (XDP_TX): run with BPF_PROG_TEST_RUN in live-frames mode, a packet
/// generator. Written every time, because in that mode a frame's page comes back from
/// wherever it went (and whatever rewrote it) to be sent again.
#[inline(always)]
pub fn transmit(ctx: &XdpContext) -> u32 {
    let Ok(frame) = ptr_at::<[u8; BENCH_FRAME_LEN]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the whole frame is there; the global is plain bytes.
    let frame = unsafe { &mut *frame };
    // SAFETY: as above.
    *frame = unsafe { core::ptr::read_volatile(&BENCH_FRAME) };
    // SAFETY: a global the loader may set.
    let flows = unsafe { core::ptr::read_volatile(&BENCH_FLOWS) };
    if flows > 1 {
        // Frame i comes from source port 1024 + i mod flows. The frame's UDP checksum is 0
        // (none), so nothing else changes.
        let sent = core::ptr::addr_of_mut!(BENCH_SENT);
        // SAFETY: a global of this program's, touched by this CPU's run alone.
        let i = unsafe {
            let i = core::ptr::read_volatile(sent);
            core::ptr::write_volatile(sent, i.wrapping_add(1));
            i
        };
        let port = (1024 + (i & (flows - 1))) as u16;
        frame[UDP_SOURCE_PORT_AT..UDP_SOURCE_PORT_AT + 2].copy_from_slice(&port.to_be_bytes());
    }
    xdp_action::XDP_TX
}

/// The null forwarder, the ceiling of any XDP forwarder: swaps the MACs and redirects the
/// frame through the devmap to `BENCH_FORWARD_TO`, looking at nothing else.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    let Ok(macs) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked both MACs are inside the frame.
    let macs = unsafe { &mut *macs };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    *macs = swapped;
    // SAFETY: a global the loader may set; read as the verifier sees it, not as a constant.
    let ifindex = unsafe { core::ptr::read_volatile(&BENCH_FORWARD_TO) };
    DEVMAP
        .redirect(ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}
