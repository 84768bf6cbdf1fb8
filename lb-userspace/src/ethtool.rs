//! What `ethtool -S`, `ethtool -k` would show for an interface, read with the SIOCETHTOOL
//! ioctl.
//!
//! Every function works in the network namespace of the *calling thread*: the ioctl goes
//! through a socket, and a socket belongs to the namespace its creator was in. To read an
//! interface of another namespace, call these from a thread that has entered it (as
//! [`crate::veth`] does).
//!
//! The structs below mirror `include/uapi/linux/ethtool.h` and `include/uapi/linux/if.h`.

use std::ffi::c_void;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use anyhow::{Context as _, bail};

/// `SIOCETHTOOL` from `include/uapi/linux/sockios.h`.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `IFNAMSIZ` from `include/uapi/linux/if.h`, counting the terminating NUL.
const IFNAMSIZ: usize = 16;

/// Ethtool sub-commands (`ETHTOOL_*` in `include/uapi/linux/ethtool.h`).
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// The string set of the `ethtool -S` counters.
const ETH_SS_STATS: u32 = 1;
/// Every ethtool string is a NUL-padded array of this many bytes.
const ETH_GSTRING_LEN: usize = 32;

/// `struct ifreq` with the `ifr_data` member of its union, padded to the union's size
/// (that of `struct ifmap`, 24 bytes on 64-bit targets), so the kernel's copy of a whole
/// `ifreq` stays inside this struct.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; IFNAMSIZ],
    data: *mut c_void,
    _union_rest: [u8; 24 - size_of::<*mut c_void>()],
}

/// `struct ethtool_value`: the request and answer of the one-flag commands.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}
const _: () = assert!(size_of::<EthtoolDrvinfo>() == 196);
const _: () = assert!(size_of::<IfReq>() == 40);

/// `struct ethtool_sset_info` asking about exactly one string set: the kernel answers with
/// at most one `data` word per bit of the `sset_mask` we send, so one word is enough.
#[repr(C)]
struct EthtoolSsetInfo {
    cmd: u32,
    reserved: u32,
    sset_mask: u64,
    data: [u32; 1],
}

/// The fixed head of `struct ethtool_gstrings`; `len * ETH_GSTRING_LEN` bytes follow.
#[repr(C)]
struct EthtoolGstringsHead {
    cmd: u32,
    string_set: u32,
    len: u32,
}

/// The fixed head of `struct ethtool_stats`; `n_stats` `u64`s follow.
#[repr(C)]
struct EthtoolStatsHead {
    cmd: u32,
    n_stats: u32,
}

/// Every `ethtool -S` counter of `iface`, in the driver's order, with the driver's names.
///
/// An interface whose driver has no such counters (`lo`, a bridge) gives an empty list.
pub fn stats(iface: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let socket = EthtoolSocket::new(iface)?;
    // The driver may change how many counters it has between our calls (veth does when
    // its queue count changes); then the answers disagree and we ask again.
    for _ in 0..3 {
        let Some(count) = socket.stats_count()? else {
            return Ok(Vec::new());
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let names = socket.stat_names(count)?;
        let values = socket.stat_values(count)?;
        if let (Some(names), Some(values)) = (names, values) {
            return Ok(names.into_iter().zip(values).collect());
        }
    }
    bail!("{iface}: the number of ethtool counters kept changing while they were read")
}

/// The frames lost while XDP on `iface` sent them, summed over its queues: the
/// `ethtool -S` counters that [`is_xdp_send_error`] accepts for `iface`'s driver.
/// 0 for an interface without ethtool counters (`lo`).
///
/// Where the kernel counts a loss depends on where it happens, so sum this over every
/// interface the program runs on. Seen on veth (Linux 6.18):
///
/// * XDP_TX that the peer cannot take: `rx_queue_N_xdp_tx_errors` of the interface the
///   program runs on. When the peer has GRO but no XDP program, the first 256 frames wait
///   in its ring uncounted (see [`crate::veth`]); the ones after that are counted here.
/// * XDP_REDIRECT (devmap or `bpf_redirect`) into a veth whose peer has neither GRO nor a
///   native XDP program: the redirect core refuses the frame before any driver sees it
///   (the target does not advertise `NETDEV_XDP_ACT_NDO_XMIT`), and the *ingress* veth
///   counts it in `rx_queue_N_drops`. Nothing is counted on the target.
/// * A redirect the target accepted but could not queue (its peer's ring full):
///   `tx_queue_N_xdp_xmit_errors` of the target (from the driver's source; the tests do
///   not reproduce it).
/// * A redirect into a veth whose peer is down: only the target's `tx_dropped`
///   (`ip -s link`), which is not an ethtool counter and is not included here.
pub fn xdp_send_errors(iface: &str) -> anyhow::Result<u64> {
    let driver = driver(iface)?.unwrap_or_default();
    Ok(stats(iface)?
        .iter()
        .filter(|(name, _)| is_xdp_send_error(&driver, name))
        .map(|(_, value)| *value)
        .fold(0u64, |sum, value| sum.wrapping_add(value)))
}

/// Whether an `ethtool -S` counter of a `driver` interface counts frames lost while XDP
/// sent them (XDP_TX, XDP_REDIRECT), rather than frames the program chose to drop.
///
/// The general rule, on the name split into words at `_`, `.`, `-` and spaces,
/// lower-cased: a word that starts with `xdp`, followed later by a word that starts with
/// `err`, `drop`, `full` or `fail` — except when the only word after the `xdp` word is
/// `drop`/`drops`, which counts the program's own XDP_DROP verdicts.
///
/// One driver rule on top: veth's `rx_queue_N_drops` counts the frames whose XDP_REDIRECT
/// failed (and the rare frame that could not be converted for XDP); veth counts the
/// program's XDP_DROP verdicts separately, in `rx_queue_N_xdp_drops`.
///
/// | driver | counted | not counted |
/// | --- | --- | --- |
/// | veth | `tx_queue_0_xdp_xmit_errors`, `rx_queue_0_xdp_tx_errors`, `rx_queue_0_drops` | `rx_queue_0_xdp_drops`, `peer_ifindex` |
/// | virtio_net | `tx_queue_0_xdp_tx_drops` | `rx_queue_0_xdp_drops` |
/// | mlx5_core | `rx_xdp_tx_err`, `rx_xdp_tx_full`, `tx_xdp_err`, `tx_xdp_full` | `rx_xdp_drop` |
pub fn is_xdp_send_error(driver: &str, name: &str) -> bool {
    if driver == "veth" && is_veth_rx_drops(name) {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(['_', '.', '-', ' '])
        .filter(|word| !word.is_empty())
        .collect();
    let Some(xdp) = words.iter().position(|word| word.starts_with("xdp")) else {
        return false;
    };
    let after = &words[xdp + 1..];
    if matches!(after, ["drop" | "drops"]) {
        return false;
    }
    after.iter().any(|word| {
        ["err", "drop", "full", "fail"]
            .iter()
            .any(|stem| word.starts_with(stem))
    })
}

/// `rx_queue_<N>_drops`.
fn is_veth_rx_drops(name: &str) -> bool {
    name.strip_prefix("rx_queue_")
        .and_then(|rest| rest.strip_suffix("_drops"))
        .is_some_and(|queue| !queue.is_empty() && queue.bytes().all(|b| b.is_ascii_digit()))
}

/// The name of `iface`'s driver (`ethtool -i` → `driver`), e.g. `veth`; `None` when the
/// interface has no ethtool driver information (`lo`).
pub fn driver(iface: &str) -> anyhow::Result<Option<String>> {
    let socket = EthtoolSocket::new(iface)?;
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: ETHTOOL_GDRVINFO reads and writes exactly one `struct ethtool_drvinfo`.
    match unsafe { socket.ioctl((&raw mut info).cast()) } {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(None),
        Err(err) => {
            return Err(err).with_context(|| format!("{iface}: SIOCETHTOOL ETHTOOL_GDRVINFO"));
        }
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(Some(
        String::from_utf8_lossy(&info.driver[..end]).into_owned(),
    ))
}

/// Whether generic receive offload is on (`ethtool -k IFACE` → `generic-receive-offload`).
pub fn gro_enabled(iface: &str) -> anyhow::Result<bool> {
    EthtoolSocket::new(iface)?.flag(ETHTOOL_GGRO, "ETHTOOL_GGRO")
}

/// Whether TX checksum offload is on (`ethtool -k IFACE` → `tx-checksumming`).
pub fn tx_checksum_enabled(iface: &str) -> anyhow::Result<bool> {
    EthtoolSocket::new(iface)?.flag(ETHTOOL_GTXCSUM, "ETHTOOL_GTXCSUM")
}

/// A datagram socket of the calling thread's namespace and the interface name, ready
/// for SIOCETHTOOL requests.
struct EthtoolSocket {
    fd: OwnedFd,
    iface: String,
    name: [libc::c_char; IFNAMSIZ],
}

impl EthtoolSocket {
    fn new(iface: &str) -> anyhow::Result<EthtoolSocket> {
        if iface.is_empty() || iface.len() >= IFNAMSIZ || iface.contains('\0') {
            bail!("{iface:?} is not an interface name (1 to 15 bytes, no NUL)");
        }
        let mut name = [0 as libc::c_char; IFNAMSIZ];
        for (dst, src) in name.iter_mut().zip(iface.bytes()) {
            *dst = src as libc::c_char;
        }
        // Any socket family will do: the kernel hands SIOCETHTOOL to the device layer.
        // AF_UNIX is the fallback for a kernel without IPv4.
        let mut fd = -1;
        for family in [libc::AF_INET, libc::AF_UNIX] {
            // SAFETY: socket() takes no pointers; the result is checked below.
            fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd >= 0 {
                break;
            }
        }
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("{iface}: opening a socket for SIOCETHTOOL"));
        }
        Ok(EthtoolSocket {
            // SAFETY: `fd` is a socket that socket() just returned and nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            iface: iface.to_string(),
            name,
        })
    }

    /// Sends SIOCETHTOOL with `ifr_data = data`.
    ///
    /// # Safety
    /// `data` must point to a writable buffer that starts with the `u32` command and that
    /// is as large as what the kernel writes back for that command.
    unsafe fn ioctl(&self, data: *mut c_void) -> io::Result<()> {
        let mut req = IfReq {
            name: self.name,
            data,
            _union_rest: [0; 24 - size_of::<*mut c_void>()],
        };
        // SAFETY: `req` is a complete, writable `struct ifreq` that lives across the call;
        // the buffer it points to is the caller's promise.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCETHTOOL, &mut req) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn flag(&self, cmd: u32, cmd_name: &str) -> anyhow::Result<bool> {
        let mut value = EthtoolValue { cmd, data: 0 };
        // SAFETY: the one-flag commands read and write exactly one `struct ethtool_value`.
        unsafe { self.ioctl((&raw mut value).cast()) }
            .with_context(|| format!("{}: SIOCETHTOOL {cmd_name}", self.iface))?;
        Ok(value.data != 0)
    }

    /// How many `ethtool -S` counters the driver has; `None` when it has none at all.
    fn stats_count(&self) -> anyhow::Result<Option<usize>> {
        let mut info = EthtoolSsetInfo {
            cmd: ETHTOOL_GSSET_INFO,
            reserved: 0,
            sset_mask: 1 << ETH_SS_STATS,
            data: [0],
        };
        // SAFETY: the kernel writes back the head and one `u32` per bit it leaves set in
        // `sset_mask`, a subset of the one bit we set: `data` has room for it.
        match unsafe { self.ioctl((&raw mut info).cast()) } {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(None),
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("{}: SIOCETHTOOL ETHTOOL_GSSET_INFO", self.iface));
            }
        }
        if info.sset_mask & (1 << ETH_SS_STATS) == 0 {
            return Ok(None);
        }
        Ok(Some(info.data[0] as usize))
    }

    /// The names of the `count` counters, or `None` if the driver now has another count.
    fn stat_names(&self, count: usize) -> anyhow::Result<Option<Vec<String>>> {
        let head = size_of::<EthtoolGstringsHead>();
        let mut buf = GuardedBuffer::new(head + count * ETH_GSTRING_LEN)
            .with_context(|| format!("{}: a buffer for {count} counter names", self.iface))?;
        let ptr = buf.as_mut_ptr();
        // SAFETY: the buffer is at least `head` bytes, 8-aligned, and ours.
        unsafe {
            ptr.cast::<EthtoolGstringsHead>()
                .write(EthtoolGstringsHead {
                    cmd: ETHTOOL_GSTRINGS,
                    string_set: ETH_SS_STATS,
                    len: count as u32,
                });
        }
        // SAFETY: the kernel writes the head and as many strings as the driver has *now*
        // (it ignores `len`). If that is more than `count`, the copy runs into
        // GuardedBuffer's inaccessible page and the ioctl fails with EFAULT instead of
        // writing past our memory.
        match unsafe { self.ioctl(ptr.cast()) } {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EFAULT) => return Ok(None),
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("{}: SIOCETHTOOL ETHTOOL_GSTRINGS", self.iface));
            }
        }
        let bytes = buf.bytes();
        let len = u32::from_ne_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if len != count {
            return Ok(None);
        }
        let names = bytes[head..head + count * ETH_GSTRING_LEN]
            .chunks_exact(ETH_GSTRING_LEN)
            .map(|raw| {
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                String::from_utf8_lossy(&raw[..end]).into_owned()
            })
            .collect();
        Ok(Some(names))
    }

    /// The values of the `count` counters, or `None` if the driver now has another count.
    fn stat_values(&self, count: usize) -> anyhow::Result<Option<Vec<u64>>> {
        let head = size_of::<EthtoolStatsHead>();
        let mut buf = GuardedBuffer::new(head + count * size_of::<u64>())
            .with_context(|| format!("{}: a buffer for {count} counters", self.iface))?;
        let ptr = buf.as_mut_ptr();
        // SAFETY: the buffer is at least `head` bytes, 8-aligned, and ours.
        unsafe {
            ptr.cast::<EthtoolStatsHead>().write(EthtoolStatsHead {
                cmd: ETHTOOL_GSTATS,
                n_stats: count as u32,
            });
        }
        // SAFETY: as for ETHTOOL_GSTRINGS: the kernel writes as many values as the driver
        // has now, and a larger count than ours ends in the guard page (EFAULT).
        match unsafe { self.ioctl(ptr.cast()) } {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EFAULT) => return Ok(None),
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("{}: SIOCETHTOOL ETHTOOL_GSTATS", self.iface));
            }
        }
        let bytes = buf.bytes();
        let n_stats = u32::from_ne_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        if n_stats != count {
            return Ok(None);
        }
        let values = bytes[head..head + count * size_of::<u64>()]
            .chunks_exact(size_of::<u64>())
            .map(|raw| u64::from_ne_bytes(raw.try_into().expect("8 bytes")))
            .collect();
        Ok(Some(values))
    }
}

/// Memory for an ethtool answer whose size the kernel decides.
///
/// ETHTOOL_GSTRINGS and ETHTOOL_GSTATS write as many entries as the driver has at the
/// moment of the call, whatever size the request says (`net/ethtool/ioctl.c`). So the
/// buffer is placed at the end of its own mapping, right before a page that is mapped
/// with no access: if the count grew since we asked, the kernel's copy faults there and
/// the ioctl returns EFAULT, rather than the kernel writing over memory that is not ours.
struct GuardedBuffer {
    map: NonNull<u8>,
    map_len: usize,
    /// Offset of the buffer in the mapping; 8-aligned.
    start: usize,
    len: usize,
}

impl GuardedBuffer {
    fn new(len: usize) -> io::Result<GuardedBuffer> {
        // SAFETY: sysconf takes no pointers.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let data_pages = len.div_ceil(page).max(1);
        let map_len = (data_pages + 1) * page;
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(map.cast::<u8>()).expect("mmap does not return NULL");
        let guard_at = data_pages * page;
        // SAFETY: the last page of the mapping we just made.
        let rc =
            unsafe { libc::mprotect(map.as_ptr().add(guard_at).cast(), page, libc::PROT_NONE) };
        let buffer = GuardedBuffer {
            map,
            map_len,
            // Round the length up to 8 so that the start is 8-aligned; the few slack bytes
            // between the buffer's end and the guard page are ours too.
            start: guard_at - len.next_multiple_of(8),
            len,
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buffer)
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start` is inside the mapping.
        unsafe { self.map.as_ptr().add(self.start) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `start..start + len` lies in the readable part of the mapping, which
        // mmap zero-filled and which only we (and the kernel, during our ioctl) write.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.start), self.len) }
    }
}

impl Drop for GuardedBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows any more.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

/// The interfaces' counters of frames the kernel failed to send for XDP (see
/// [`xdp_send_errors`]), as they grew since start-up: what xlb counted as sent but
/// the kernel dropped.
pub struct SendErrors {
    baseline: Vec<(String, u64)>,
}

impl SendErrors {
    pub fn new(interfaces: &[String]) -> SendErrors {
        SendErrors {
            baseline: interfaces
                .iter()
                .map(|i| (i.clone(), xdp_send_errors(i).unwrap_or(0)))
                .collect(),
        }
    }

    pub fn read(&self) -> Vec<(String, u64)> {
        self.baseline
            .iter()
            .map(|(iface, base)| {
                let now = xdp_send_errors(iface).unwrap_or(*base);
                (iface.clone(), now.saturating_sub(*base))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_counters_that_count_send_errors() {
        // All of veth's counters (drivers/net/veth.c), as `ethtool -S` names them.
        let counted = [
            "rx_queue_0_xdp_tx_errors",
            "tx_queue_0_xdp_xmit_errors",
            "rx_queue_0_drops",
            "rx_queue_11_xdp_tx_errors",
            "rx_queue_11_drops",
        ];
        let not_counted = [
            "peer_ifindex",
            "rx_queue_0_xdp_packets",
            "rx_queue_0_xdp_bytes",
            "rx_queue_0_xdp_redirect",
            "rx_queue_0_xdp_drops",
            "rx_queue_0_xdp_tx",
            "tx_queue_0_xdp_xmit",
            "rx_queue__drops",
            "rx_queue_x_drops",
        ];
        for name in counted {
            assert!(is_xdp_send_error("veth", name), "{name} should count");
        }
        for name in not_counted {
            assert!(!is_xdp_send_error("veth", name), "{name} should not count");
        }
    }

    #[test]
    fn other_drivers_counters_that_count_send_errors() {
        for (driver, name) in [
            ("virtio_net", "tx_queue_3_xdp_tx_drops"),
            ("mlx5_core", "rx_xdp_tx_err"),
            ("mlx5_core", "rx_xdp_tx_full"),
            ("mlx5_core", "tx_xdp_err"),
            ("mlx5_core", "tx_xdp_full"),
            ("", "rx-0.xdp_redirect_fail"),
            ("", "XDP_TX_ERRORS"),
        ] {
            assert!(is_xdp_send_error(driver, name), "{name} should count");
        }
        for (driver, name) in [
            ("mlx5_core", "rx_xdp_drop"),
            ("virtio_net", "rx_queue_0_xdp_drops"),
            // Only veth's rx_queue_N_drops is known to count failed redirects.
            ("virtio_net", "rx_queue_0_drops"),
            ("", "rx-3.xdp.drop"),
            ("mlx5_core", "rx_xdp_redirect"),
            ("mlx5_core", "rx_xdp_tx_xmit"),
            ("", "tx_errors"),
            ("", "rx_dropped"),
            ("", "xdp_aborted"),
            ("", ""),
        ] {
            assert!(
                !is_xdp_send_error(driver, name),
                "{name:?} should not count"
            );
        }
    }

    #[test]
    fn interface_names_are_checked_before_any_ioctl() {
        for bad in ["", "a-name-of-16-byt", "nul\0inside"] {
            let err = EthtoolSocket::new(bad).err().expect("should be refused");
            assert!(err.to_string().contains("not an interface name"), "{err}");
        }
    }

    #[test]
    fn guarded_buffer_ends_at_the_guard_page_and_is_aligned() {
        for len in [1, 12, 12 + 32 * 3, 4096, 4097] {
            let mut buf = GuardedBuffer::new(len).unwrap();
            assert_eq!(buf.as_mut_ptr() as usize % 8, 0);
            assert_eq!(buf.bytes().len(), len);
            assert!(buf.bytes().iter().all(|&b| b == 0));
            assert!(buf.start + len.next_multiple_of(8) + 4096 <= buf.map_len);
        }
    }
}
