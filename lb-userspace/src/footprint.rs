//! What the data plane's maps take of the kernel's memory when xlb makes them: the figures
//! `xlb check` prints and `xlb run` holds against the room it has ([`crate::memory`]).
//!
//! Each kind of map is counted as Linux accounts it (the kind's `map_mem_usage`, shown as
//! `memlock` in a map's fdinfo), less what does not grow with the map: its own structure,
//! the page that holds it when it is memory-mapped, and a preallocated hash map's spare
//! element and lock counters per CPU (a few hundred bytes each). Pages are taken to be
//! 4 KiB. These are the kernel's internals, not an interface: the suite compares the
//! figures with the kernel's account of loaded maps, map by map
//! (`tests/tests/conntrack.rs`).

use anyhow::Context as _;
use aya_obj::generated::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, bpf_map_type};
use lb_common::maps::names;

use crate::{config::Checked, loader};

/// A page: memory-mapped arrays and ring buffers take whole ones.
const PAGE: u64 = 4096;

/// A hash map's element header (`struct htab_elem`).
const HASH_ELEMENT_HEADER: u64 = 48;

/// A hash map's bucket (`struct bucket`).
const HASH_BUCKET: u64 = 16;

/// The maps whose memory [`Footprint`] counts by name, with the config's settings that
/// size them: the conntrack table, the maps sized with it, the Maglev tables.
pub const NAMED: [&str; 4] = [
    names::CONNTRACK,
    names::MAPPINGS,
    names::RELEASED,
    names::MAGLEV,
];

/// A hash map of `entries` entries: a bucket per entry, their number rounded up to a
/// power of two, made with the map; and, preallocated, every entry's element (a header,
/// the key and the value each rounded up to 8 bytes).
pub fn hash_map_bytes(entries: u64, key_size: u64, value_size: u64, preallocated: bool) -> u64 {
    let buckets = entries.next_power_of_two() * HASH_BUCKET;
    if !preallocated {
        return buckets;
    }
    let element =
        HASH_ELEMENT_HEADER + key_size.next_multiple_of(8) + value_size.next_multiple_of(8);
    buckets + entries * element
}

/// An array of `entries` values, each rounded up to 8 bytes; memory-mappable, in whole
/// pages.
pub fn array_bytes(entries: u64, value_size: u64, mmapable: bool) -> u64 {
    let values = entries * value_size.next_multiple_of(8);
    if mmapable {
        values.next_multiple_of(PAGE)
    } else {
        values
    }
}

/// A per-CPU array of `entries` values: each value, rounded up to 8 bytes, once for each of
/// `cpus` possible CPUs, and a pointer to them.
pub fn per_cpu_array_bytes(entries: u64, value_size: u64, cpus: u64) -> u64 {
    entries * (8 + value_size.next_multiple_of(8) * cpus)
}

/// What the data plane's maps take when xlb makes them, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// The conntrack table and the buckets of the maps sized with it
    /// ([`ConntrackConfig::kernel_bytes`](crate::config::ConntrackConfig::kernel_bytes)).
    pub conntrack: u64,
    /// The Maglev tables ([`Dataplane::maglev_bytes`](crate::config::Dataplane::maglev_bytes)).
    pub maglev: u64,
    /// Every other map; a per-CPU one once for each possible CPU.
    pub others: u64,
    /// The possible CPUs the per-CPU maps were counted for.
    pub cpus: u64,
}

impl Footprint {
    /// The maps of the embedded object sized for `cfg`, on this host's possible CPUs.
    pub fn of(cfg: &Checked) -> anyhow::Result<Footprint> {
        Footprint::on(cfg, possible_cpus()?)
    }

    /// The maps of the embedded object sized for `cfg`, on `cpus` possible CPUs.
    pub fn on(cfg: &Checked, cpus: u64) -> anyhow::Result<Footprint> {
        Ok(Footprint {
            conntrack: cfg.conntrack.kernel_bytes(),
            maglev: cfg.dataplane.maglev_bytes(),
            others: other_maps(cfg, cpus)?.iter().map(|(_, bytes)| bytes).sum(),
            cpus,
        })
    }

    pub fn total(&self) -> u64 {
        self.conntrack + self.maglev + self.others
    }
}

/// The host's possible CPUs, each of which has its own copy of a per-CPU map's values.
pub fn possible_cpus() -> anyhow::Result<u64> {
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| {
        anyhow::anyhow!(
            "reading {path}, the host's possible CPUs, each of which takes its own copy of \
             the per-CPU maps: {e}"
        )
    })?;
    Ok(cpus as u64)
}

/// Each map of the embedded object but the [`NAMED`] ones, with what it takes when made
/// with the sizes `cfg` gives, on `cpus` possible CPUs.
pub fn other_maps(cfg: &Checked, cpus: u64) -> anyhow::Result<Vec<(String, u64)>> {
    let object = aya_obj::Object::parse(loader::XDP_OBJECT).context("parsing the XDP object")?;
    let sizes = loader::map_sizes(cfg);
    Ok(object
        .maps
        .iter()
        .filter(|(name, _)| !NAMED.contains(&name.as_str()))
        .map(|(name, map)| {
            let entries = sizes
                .iter()
                .find(|(sized, _)| sized == name)
                .map_or(map.max_entries(), |&(_, entries)| entries);
            (name.clone(), map_bytes(map, u64::from(entries), cpus))
        })
        .collect())
}

/// What the maps a restart that adopts the pinned ones makes anew take (those not in
/// `names::PINNED`, all among [`other_maps`]), on `cpus` possible CPUs.
pub fn unpinned_bytes(cfg: &Checked, cpus: u64) -> anyhow::Result<u64> {
    Ok(other_maps(cfg, cpus)?
        .into_iter()
        .filter(|(name, _)| !names::PINNED.contains(&name.as_str()))
        .map(|(_, bytes)| bytes)
        .sum())
}

/// What `map`, made with `entries` entries, takes when it is made, on `cpus` possible CPUs.
fn map_bytes(map: &aya_obj::Map, entries: u64, cpus: u64) -> u64 {
    let (key, value) = (u64::from(map.key_size()), u64::from(map.value_size()));
    let flags = map.map_flags();
    match map.map_type() {
        t if t == bpf_map_type::BPF_MAP_TYPE_HASH as u32 => {
            hash_map_bytes(entries, key, value, flags & BPF_F_NO_PREALLOC == 0)
        }
        t if t == bpf_map_type::BPF_MAP_TYPE_ARRAY as u32 => {
            array_bytes(entries, value, flags & BPF_F_MMAPABLE != 0)
        }
        t if t == bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32 => {
            per_cpu_array_bytes(entries, value, cpus)
        }
        // Its entries are its size in bytes; three pages hold its positions and header.
        t if t == bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32 => entries + 3 * PAGE,
        // Buckets of 8 bytes; the interfaces come later.
        t if t == bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH as u32 => entries.next_power_of_two() * 8,
        // Its prefixes come later.
        t if t == bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as u32 => 0,
        // No other kind is in the object today; a new one is counted in full.
        _ => entries * (key + value).next_multiple_of(8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn each_kind_of_map_is_counted_as_the_kernel_does() {
        // 1,000 entries: 1,024 buckets of 16 bytes; elements of 48 + 16 + 8 bytes.
        assert_eq!(hash_map_bytes(1000, 12, 4, true), 1024 * 16 + 1000 * 72);
        assert_eq!(hash_map_bytes(1000, 12, 4, false), 1024 * 16);
        assert_eq!(array_bytes(10, 4, false), 80);
        assert_eq!(array_bytes(10, 4, true), 4096);
        assert_eq!(array_bytes(1025, 4, true), 3 * 4096);
        // 4,096 values of 40 bytes on 128 CPUs, and their pointers: 20 MiB.
        assert_eq!(
            per_cpu_array_bytes(4096, 40, 128),
            4096 * 8 + 4096 * 40 * 128
        );
    }

    /// The named maps' figures, which `config.rs` computes from the types and flags it
    /// knows them by, are what their definitions in the object give; and every map the
    /// loader sizes is in the object, under that name.
    #[test]
    fn the_named_maps_figures_follow_the_objects_definitions() {
        let cfg = Config::parse("[dataplane]\ninterfaces = [\"xlb0\"]\n")
            .unwrap()
            .validate()
            .unwrap();
        let object = aya_obj::Object::parse(loader::XDP_OBJECT).unwrap();
        let sizes = loader::map_sizes(&cfg);
        for name in sizes.iter().map(|(name, _)| *name).chain(NAMED) {
            assert!(
                object.maps.contains_key(name),
                "no map {name} in the object"
            );
        }
        let made = |name: &str| {
            let (_, entries) = sizes.iter().find(|(sized, _)| *sized == name).unwrap();
            map_bytes(&object.maps[name], u64::from(*entries), 2)
        };
        assert_eq!(made(names::CONNTRACK), cfg.conntrack.table_bytes());
        assert_eq!(
            made(names::MAPPINGS) + made(names::RELEASED),
            cfg.conntrack.companions_bytes()
        );
        assert_eq!(made(names::MAGLEV), cfg.dataplane.maglev_bytes());
    }

    /// A restart that adopts the pinned maps makes the others anew: the named maps are all
    /// pinned, so the others hold every unpinned one; the next-hop cache (4,096 slots of
    /// 64 bytes per CPU) and the QUIC server ids (a preallocated hash map of 4,096) are
    /// among them, the pinned counters are not.
    #[test]
    fn a_restart_counts_the_maps_it_makes_anew() {
        assert!(NAMED.iter().all(|name| names::PINNED.contains(name)));
        let cfg = Config::parse("[dataplane]\ninterfaces = [\"xlb0\"]\n")
            .unwrap()
            .validate()
            .unwrap();
        let unpinned = |cpus| unpinned_bytes(&cfg, cpus).unwrap();
        let others = other_maps(&cfg, 2).unwrap();
        let of = |name: &str| others.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(unpinned(2) >= of(names::QUIC_SERVERS) + 2 * 4096 * 64);
        assert!(unpinned(2) < Footprint::on(&cfg, 2).unwrap().others - of(names::BACKEND_STATS));
        // Per CPU: the next-hop cache and a few KiB of scratch.
        let per_cpu = unpinned(3) - unpinned(2);
        assert!(
            (4096 * 64..4096 * 64 + 8192).contains(&per_cpu),
            "{per_cpu}"
        );
    }

    #[test]
    fn per_cpu_maps_grow_with_the_cpus() {
        let cfg = Config::parse("[dataplane]\ninterfaces = [\"xlb0\"]\n")
            .unwrap()
            .validate()
            .unwrap();
        let (two, many) = (
            Footprint::on(&cfg, 2).unwrap(),
            Footprint::on(&cfg, 128).unwrap(),
        );
        assert_eq!((two.conntrack, two.maglev), (many.conntrack, many.maglev));
        // The next-hop cache alone is 4,096 slots of 64 bytes per CPU, and the backends'
        // counters 4,096 of 40.
        let per_cpu = 4096 * 64 + 4096 * 40;
        assert!(
            many.others - two.others >= 126 * per_cpu,
            "{two:?} against {many:?}"
        );
        assert_eq!(many.total(), many.conntrack + many.maglev + many.others);
    }
}
