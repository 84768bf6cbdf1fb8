//! BPF arrays made with `BPF_F_MMAPABLE`, mapped into our memory: the Maglev tables, which
//! userspace writes with one copy, and the open-flow counters, which the XDP program and
//! the sweeper change with atomic adds on the same memory.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::AtomicU64,
};

use anyhow::{Context as _, bail};
use aya::maps::MapData;

/// A whole array map, mapped shared and writable.
pub struct MappedArray {
    base: NonNull<u8>,
    bytes: usize,
    /// Keeps the map open while it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, owned by this value alone on our side; the
// kernel's readers and writers are the XDP program's runs, which the users of each array
// keep off what they write (table switches) or share by atomics (counters).
unsafe impl Send for MappedArray {}
// SAFETY: shared access goes only through `read_u32s` (plain reads of data no one on our
// side writes meanwhile: writes take `&mut self`) and atomics.
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps `map` (named `name`, for messages), whose values must be `value_size` bytes.
    /// The kernel lays values out `round_up(value_size, 8)` bytes apart; `value_size` is 8
    /// here, so the mapping is the values back to back.
    pub fn map(map: MapData, name: &str, value_size: u32) -> anyhow::Result<MappedArray> {
        let info = map
            .info()
            .with_context(|| format!("map {name}: its info"))?;
        if info.value_size() != value_size || !value_size.is_multiple_of(8) {
            bail!(
                "map {name} has {}-byte values, expected {value_size}",
                info.value_size()
            );
        }
        let bytes = info.max_entries() as usize * value_size as usize;
        // SAFETY: a shared mapping of the whole map, which the kernel checks fits it; the
        // pointer is used only within `bytes` of it, and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!("memory-mapping map {name} (it must be made with BPF_F_MMAPABLE)")
            });
        }
        Ok(MappedArray {
            base: NonNull::new(ptr.cast()).context("mmap returned null")?,
            bytes,
            _map: map,
        })
    }

    /// How many u32s the array holds.
    pub fn u32s(&self) -> usize {
        self.bytes / 4
    }

    /// Writes `values` from u32 number `first` on.
    pub fn write_u32s(&mut self, first: usize, values: &[u32]) -> anyhow::Result<()> {
        if first
            .checked_add(values.len())
            .is_none_or(|end| end > self.u32s())
        {
            bail!("u32s {first}.. are outside the map");
        }
        // SAFETY: checked above to lie within the mapping; nothing else on our side holds a
        // reference into it (`&mut self`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.base.as_ptr().cast::<u32>().add(first),
                values.len(),
            )
        };
        Ok(())
    }

    pub fn read_u32s(&self, first: usize, len: usize) -> anyhow::Result<Vec<u32>> {
        if first.checked_add(len).is_none_or(|end| end > self.u32s()) {
            bail!("u32s {first}.. are outside the map");
        }
        // SAFETY: checked above to lie within the mapping.
        let slice =
            unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast::<u32>().add(first), len) };
        Ok(slice.to_vec())
    }

    /// The `index`th u64 as an atomic, shared with the XDP program's atomic adds.
    pub fn counter(&self, index: usize) -> Option<&AtomicU64> {
        if index >= self.bytes / 8 {
            return None;
        }
        // SAFETY: within the mapping, 8-aligned (the mapping is page-aligned), and only ever
        // accessed atomically, here and in the XDP program.
        Some(unsafe { AtomicU64::from_ptr(self.base.as_ptr().cast::<u64>().add(index)) })
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
