//! The registry's ids across a restart: a new `Registry` over the maps an earlier one
//! filled (as a daemon that adopts the pinned maps makes one) must give each live object
//! the id its flows and counters are under, and keep the ids that flows still hold from
//! new objects.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    maps::{FlowStats, NO_GATEWAYS, Settings, names},
    reason::Reason,
};
use lb_userspace::{
    config::Checked,
    conntrack::SweepReport,
    registry::{Registry, ServiceName},
};
use xlb_tests::{
    lab::{self, CLIENT, CLIENT_MAC},
    netns::NetNs,
    packet::Frame,
};

const PREFIX: &str = "xlbrg";

fn in_lab<T: Send>(test: impl FnOnce(&NetNs) -> Result<T> + Send) -> T {
    lab::in_lab(PREFIX, test).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The lab's interfaces, a small table, and `rest` (services, gateways).
fn checked(rest: &str) -> Checked {
    lab::checked(&format!(
        "[dataplane]\ninterfaces = [\"fx0\", \"fx1\"]\nmaglev_table_size = 13\n\
         [conntrack]\nentries = 4096\n{rest}"
    ))
    .expect("a valid config")
}

/// One service with these backends (TOML tables, each "address = ..." and more).
fn service(backends: &[&str]) -> Checked {
    let mut text = String::from(
        "[[service]]\nvip = \"10.10.0.100:80\"\nprotocol = \"tcp\"\nsnat = \"10.20.0.1\"\n",
    );
    for b in backends {
        text += &format!("[[service.backend]]\n{b}\n");
    }
    checked(&text)
}

/// A NAT gateway for the client subnet, out as 10.20.0.5 with ports 40000 to 40999.
fn gateway_config() -> Checked {
    checked(
        "[[nat_gateway]]\nsource = \"10.10.1.0/24\"\nto = \"10.20.0.5\"\n\
         ports = [40000, 40999]\n",
    )
}

fn name(cfg: &Checked) -> ServiceName {
    ServiceName::of(&cfg.services[0])
}

/// The id the registry runs the backend at `address` under.
fn backend_id(registry: &Registry, service: &ServiceName, address: &str) -> Result<u32> {
    let address: SocketAddr = address.parse()?;
    registry
        .service(service)
        .context("the service")?
        .backends
        .iter()
        .find(|b| b.config.address == address)
        .map(|b| b.id)
        .with_context(|| format!("no backend {address}"))
}

/// A sweep that found no flows, begun after everything retired so far: frees those ids.
fn empty_sweep() -> SweepReport {
    std::thread::sleep(Duration::from_millis(2));
    SweepReport {
        started: Some(Instant::now()),
        ..SweepReport::default()
    }
}

/// A backend removed while flows are on it (its id retired), then added again, drained,
/// takes a lower id than its retired one. A restart finds two entries for its address,
/// neither in the table: it must keep the live one, whose counters and open flows are the
/// backend's now, and keep the other retired.
#[test]
fn a_restart_keeps_the_live_id_of_a_backend_added_again() {
    in_lab(|_| {
        const X: &str = "10.20.1.2:8080";
        const B: &str = "10.20.1.3:8080";
        let both = service(&[&format!("address = \"{X}\""), &format!("address = \"{B}\"")]);
        let s = name(&both);
        let lab::Program { ebpf, .. } = lab::load(&both)?;
        let mut registry = Registry::load(&ebpf, &both)?;
        let (x0, b0) = (backend_id(&registry, &s, X)?, backend_id(&registry, &s, B)?);
        ensure!(x0 < b0, "ids {x0} and {b0}: the test needs X's below B's");
        // X goes, and its id is free again (no flow held it).
        registry.apply(&service(&[&format!("address = \"{B}\"")]))?;
        registry.release_ids(&empty_sweep())?;
        // B goes while its flows would hold its id: no sweep frees it.
        registry.apply(&service(&[]))?;
        // B comes back drained: the lowest free id, X's.
        let drained = service(&[&format!("address = \"{B}\"\ndrain = true")]);
        registry.apply(&drained)?;
        let live = backend_id(&registry, &s, B)?;
        ensure!(live == x0, "B came back as {live}, not {x0}");
        drop(registry);

        let restarted = Registry::load(&ebpf, &drained)?;
        let adopted = backend_id(&restarted, &s, B)?;
        ensure!(
            adopted == live,
            "after the restart B runs as {adopted}, its retired id, not {live}"
        );
        ensure!(
            restarted.retired().1 == 1,
            "retired backend ids after the restart: {} (B's old one, {b0}, is)",
            restarted.retired().1
        );
        Ok(())
    });
}

/// A NAT gateway removed while its flows live leaves no entry behind, only the flows and
/// the counters under its id. A restart must not give that id to a new service, whose
/// counters the old flows would then add to.
#[test]
fn a_restart_does_not_give_a_removed_gateways_id_to_a_new_service() {
    in_lab(|_| {
        let gateway = gateway_config();
        let lab::Program { ebpf, fx0, .. } = lab::load(&gateway)?;
        let mut registry = Registry::load(&ebpf, &gateway)?;
        let old = registry.gateways().next().context("the gateway")?.id;
        // A flow through it, counted under its id.
        let frame =
            Frame::udp((CLIENT, 5000), (lab::BACKEND, 53), b"q").with_macs(CLIENT_MAC, fx0.mac);
        lab::run_forwarded(&ebpf, &frame.build(), fx0.ifindex, "a datagram")?;
        // The gateway goes; its flow stays.
        let none = checked("");
        registry.apply(&none)?;
        ensure!(registry.retired().0 == 1, "the gateway's id is not retired");
        drop(registry);

        // A daemon started again, with a new service in its config.
        let one = service(&["address = \"10.20.1.2:8080\""]);
        let restarted = Registry::load(&ebpf, &one)?;
        let new = restarted.service(&name(&one)).context("the service")?.id;
        ensure!(
            new != old,
            "the new service took id {new}, the removed gateway's, which its flow still holds"
        );
        ensure!(
            restarted.retired().0 == 1,
            "retired service ids after the restart: {}",
            restarted.retired().0
        );
        // Freed once a sweep finds no flow on it, and then free after a restart too.
        let mut restarted = restarted;
        restarted.release_ids(&empty_sweep())?;
        ensure!(restarted.retired().0 == 0, "the id was not freed");
        drop(restarted);
        let again = Registry::load(&ebpf, &one)?;
        ensure!(
            again.retired().0 == 0,
            "a freed id is retired again after a restart"
        );
        Ok(())
    });
}

/// The data plane skips the NAT gateways' lookups while there are none: a gateway added to
/// a daemon that ran none must take its private hosts' packets from the next one on, once
/// the last is gone they must pass untouched again, and a daemon started over such maps
/// with a gateway in its config must take them too, even over maps that say there is none.
#[test]
fn gateways_added_and_removed_live_are_seen_at_once() {
    in_lab(|_| {
        let none = checked("");
        let gateway = gateway_config();
        let lab::Program { ebpf, fx0, .. } = lab::load(&none)?;
        let datagram = |port: u16| {
            Frame::udp((CLIENT, port), (lab::BACKEND, 53), b"q")
                .with_macs(CLIENT_MAC, fx0.mac)
                .build()
        };
        let passes = |port: u16, when: &str| -> Result<()> {
            let run = lab::run(&ebpf, &datagram(port), fx0.ifindex, None)?;
            ensure!(
                run.counted == [(Reason::PassNoService, 1)],
                "{when}: counted {:?}, not one pass/no_service",
                run.counted
            );
            Ok(())
        };
        let translated = |port: u16, when: &str| -> Result<()> {
            let run = lab::run_forwarded(&ebpf, &datagram(port), fx0.ifindex, when)?;
            // The IPv4 source, after the 14-byte Ethernet header and 12 bytes of IPv4's.
            ensure!(
                run.frame[26..30] == [10, 20, 0, 5],
                "{when}: the datagram left from {:?}, not the gateway's 10.20.0.5",
                &run.frame[26..30]
            );
            Ok(())
        };
        // And the lookups are skipped exactly while the config has no gateway.
        let noted = |gateways: bool, when: &str| -> Result<()> {
            let config: Array<_, Settings> =
                Array::try_from(ebpf.map(names::CONFIG).context("CONFIG")?)?;
            let flags = config.get(&0, 0)?.flags;
            ensure!(
                (flags & NO_GATEWAYS == 0) == gateways,
                "{when}: CONFIG's flags are {flags:#x}, with {} gateway",
                if gateways { "a" } else { "no" }
            );
            Ok(())
        };
        let mut registry = Registry::load(&ebpf, &none)?;
        passes(5000, "no gateway")?;
        noted(false, "no gateway")?;
        registry.apply(&gateway)?;
        translated(5001, "the gateway added")?;
        noted(true, "the gateway added")?;
        registry.apply(&none)?;
        passes(5002, "the gateway removed")?;
        noted(false, "the gateway removed")?;
        drop(registry);
        let restarted = Registry::load(&ebpf, &gateway)?;
        translated(5003, "a daemon started again with the gateway")?;
        noted(true, "a daemon started again with the gateway")?;
        drop(restarted);

        // The data plane reads the flag: set by hand beside the gateway, the gateway's
        // packets pass. And a daemon that starts over such maps clears it, the gateway
        // unchanged (adopted, not written again).
        let mut config: Array<MapData, Settings> = Array::try_from(aya::maps::Map::Array(
            lb_userspace::loader::map_handle(&ebpf, names::CONFIG)?,
        ))?;
        let settings = config.get(&0, 0)?;
        config.set(
            0,
            Settings {
                flags: settings.flags | NO_GATEWAYS,
                ..settings
            },
            0,
        )?;
        passes(5004, "the flag set by hand beside the gateway")?;
        let _restarted = Registry::load(&ebpf, &gateway)?;
        translated(5005, "a daemon started again over the flag set by hand")?;
        noted(true, "a daemon started again over the flag set by hand")?;
        Ok(())
    });
}

/// Maps an older xlb wrote: it left a freed id's counters as they were. Adopting them must
/// not take such counters for a removed gateway's flows (retired, that id and every other
/// would wait for a sweep, and a config that needs them all would be refused), but clear
/// them, so that the next restart, under this xlb, can trust what it finds.
#[test]
fn an_older_xlbs_counters_under_free_ids_are_cleared_not_taken_for_flows() {
    in_lab(|_| {
        let one = service(&["address = \"10.20.1.2:8080\""]);
        let lab::Program { mut ebpf, .. } = lab::load(&one)?;
        let held = Registry::load(&ebpf, &one)?
            .service(&name(&one))
            .context("the service")?
            .id;
        let stale = held + 1;
        // What the older xlb left: counters under an id it freed, and no flag.
        {
            let mut stats: PerCpuArray<_, FlowStats> = ebpf
                .map_mut(names::SERVICE_STATS)
                .context("SERVICE_STATS")?
                .try_into()?;
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            let counted = FlowStats {
                packets_in: 7,
                ..FlowStats::default()
            };
            stats.set(stale, PerCpuValues::try_from(vec![counted; cpus])?, 0)?;
            let mut config: Array<_, Settings> =
                ebpf.map_mut(names::CONFIG).context("CONFIG")?.try_into()?;
            let settings = config.get(&0, 0)?;
            config.set(
                0,
                Settings {
                    flags: 0,
                    ..settings
                },
                0,
            )?;
        }
        let adopted = Registry::load(&ebpf, &one)?;
        ensure!(
            adopted.retired().0 == 0,
            "an older xlb's stale counters retired {} id(s)",
            adopted.retired().0
        );
        ensure!(
            adopted.tables().service_stats(stale)? == FlowStats::default(),
            "the stale counters were not cleared"
        );
        drop(adopted);
        ensure!(
            Registry::load(&ebpf, &one)?.retired().0 == 0,
            "the next restart retired an id"
        );
        Ok(())
    });
}
