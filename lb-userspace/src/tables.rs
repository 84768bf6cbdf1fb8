//! Writes a checked config into the maps: CONFIG, BACKENDS, MAGLEV, then SERVICES — in that
//! order, so the data path never sees a service whose table is not filled yet.

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use lb_common::{
    maglev,
    maps::{self, Endpoint, MODE_FULLNAT, NO_BACKEND, ServiceKey, names},
};

use crate::config::Checked;

/// Ids given to services and backends, in config order: the indices of their stats entries.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// For each service (config order), the backend ids of its backends (config order).
    pub backend_ids: Vec<Vec<u32>>,
}

pub fn write(ebpf: &mut Ebpf, cfg: &Checked) -> anyhow::Result<Layout> {
    let mut config: Array<&mut MapData, maps::Config> = array(ebpf, names::CONFIG)?;
    config.set(0, cfg.map_config(), 0)?;

    let mut layout = Layout::default();
    let mut next_backend = 0u32;
    for (sid, service) in cfg.services.iter().enumerate() {
        let sid = sid as u32;
        let ids: Vec<u32> = (next_backend..next_backend + service.backends.len() as u32).collect();
        next_backend += service.backends.len() as u32;

        let mut backends: Array<&mut MapData, maps::Backend> = array(ebpf, names::BACKENDS)?;
        for (id, b) in ids.iter().zip(&service.backends) {
            backends
                .set(
                    *id,
                    maps::Backend {
                        endpoint: Endpoint::from_socket_v4(b.address),
                        _pad: [0; 2],
                        service_id: sid,
                    },
                    0,
                )
                .with_context(|| format!("writing backend {} of {service}", b.address))?;
        }

        let names: Vec<String> = service
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        let entries: Vec<maglev::Entry<'_>> = names
            .iter()
            .zip(&service.backends)
            .map(|(n, b)| maglev::Entry {
                name: n.as_bytes(),
                weight: b.weight,
            })
            .collect();
        let table = maglev::build(&entries, cfg.dataplane.maglev_table_size);
        let mut maglev_map: Array<&mut MapData, u32> = array(ebpf, names::MAGLEV)?;
        let base = sid * cfg.dataplane.maglev_table_size;
        for (slot, index) in table.iter().enumerate() {
            let id = if *index == NO_BACKEND {
                NO_BACKEND
            } else {
                ids[*index as usize]
            };
            maglev_map
                .set(base + slot as u32, id, 0)
                .with_context(|| format!("writing the Maglev table of {service}"))?;
        }

        let mut services: HashMap<&mut MapData, ServiceKey, maps::Service> = ebpf
            .map_mut(names::SERVICES)
            .context("map SERVICES")?
            .try_into()?;
        let mut snat = [0u8; 16];
        snat.copy_from_slice(&Endpoint::v4(service.snat.octets(), [0; 2]).addr);
        services
            .insert(
                ServiceKey {
                    vip: Endpoint::from_socket_v4(service.vip),
                    proto: service.protocol.number(),
                    _pad: 0,
                },
                maps::Service {
                    snat,
                    id: sid,
                    mode: MODE_FULLNAT,
                },
                0,
            )
            .with_context(|| format!("writing service {service}"))?;
        layout.backend_ids.push(ids);
    }
    Ok(layout)
}

fn array<'a, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<Array<&'a mut MapData, V>> {
    Ok(ebpf
        .map_mut(name)
        .with_context(|| format!("map {name}"))?
        .try_into()?)
}
