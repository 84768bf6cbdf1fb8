//! The next-hop cache (`NEXT_HOPS`, 4,096 slots per CPU) at capacity: with more
//! destinations than it has slots, keys share slots and replace each other, and every
//! packet must still leave with its own destination's MAC, which the test wrote into the
//! neighbour table itself.
//!
//! The replies of 5,000 IPv6 flows, each from a client of its own: a reply goes from the
//! VIP to its client, so each is a different key of the cache. Each client's neighbour
//! entry has a MAC of its own. The replies go through twice, in opposite orders, so the
//! second pass meets slots held by other keys as well as its own.

use std::net::{Ipv6Addr, SocketAddrV6};

use anyhow::{Context as _, Result, ensure};
use lb_common::maps::{Endpoint, FlowKey, PROTO_TCP};
use xlb_tests::{
    lab::{
        self, BACKEND, BACKEND_MAC, BACKEND6, CLIENT, CLIENT_MAC, FX0, FX0_MAC, FX1_MAC, SNAT, VIP,
        VIP6,
    },
    packet::{ETH_HLEN, Frame, TCP_ACK, TCP_SYN},
};

/// More than the cache's 4,096 slots.
const CLIENTS: u16 = 5_000;

const CONFIG: &str = r#"
[dataplane]
interfaces = ["fx0", "fx1"]
[conntrack]
entries = 20000

[[service]]
vip = "[2001:db8:10::100]:80"
protocol = "tcp"
snat = "2001:db8:20::1"
[[service.backend]]
address = "[2001:db8:20:1::2]:8080"
"#;

/// Client `i`, on fx0's subnet.
fn client(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 1, i)
}

/// Client `i`'s MAC: no two alike, none the lab's own.
fn client_mac(i: u16) -> [u8; 6] {
    let [hi, lo] = i.to_be_bytes();
    [0x02, 0, 0, 0xcc, hi, lo]
}

#[test]
fn more_destinations_than_slots_each_leave_to_their_own_mac() -> Result<()> {
    lab::in_lab("xlbhops", |ns| {
        // One `ip -batch` for the 5,000 neighbours (5,000 processes take a minute).
        let batch = std::env::temp_dir().join(format!("{}-neighbours", ns.name()));
        let lines: String = (0..CLIENTS)
            .map(|i| {
                let mac = client_mac(i).map(|b| format!("{b:02x}")).join(":");
                format!(
                    "neigh replace {} lladdr {mac} dev {FX0} nud permanent\n",
                    client(i)
                )
            })
            .collect();
        std::fs::write(&batch, lines)?;
        let added = ns.ip(&["-batch", &batch.to_string_lossy()]);
        std::fs::remove_file(&batch)?;
        added.context("adding the clients' neighbours")?;

        let checked = lab::checked(CONFIG)?;
        let lab::Program { ebpf, fx0, fx1 } = lab::load(&checked)?;
        let vip = SocketAddrV6::new(VIP6, 80, 0, 0);

        // Each client's flow, and where its backend's replies are addressed.
        let mut snat = Vec::with_capacity(CLIENTS as usize);
        for i in 0..CLIENTS {
            let from = SocketAddrV6::new(client(i), 40000, 0, 0);
            let syn = Frame::tcp6((client(i), 40000), (VIP6, 80), TCP_SYN)
                .with_macs(CLIENT_MAC, FX0_MAC)
                .build();
            lab::run_forwarded(&ebpf, &syn, fx0.ifindex, &format!("client {i}'s SYN"))?;
            let key = FlowKey {
                src: Endpoint::from_socket(from.into()),
                dst: Endpoint::from_socket(vip.into()),
                proto: PROTO_TCP,
                _pad: 0,
            };
            let entry = lab::conntrack_entry(&ebpf, &key)?
                .with_context(|| format!("client {i}'s flow was not made"))?;
            snat.push(entry.rewrite.src.to_socket());
        }

        let reply = |i: u16| -> Result<()> {
            let to = snat[i as usize];
            let Some((to_ip, to_port)) = (match to {
                std::net::SocketAddr::V6(a) => Some((*a.ip(), a.port())),
                _ => None,
            }) else {
                anyhow::bail!("client {i}'s flow has an IPv4 SNAT endpoint: {to}");
            };
            let frame = Frame::tcp6((BACKEND6, 8080), (to_ip, to_port), TCP_ACK)
                .with_macs(BACKEND_MAC, FX1_MAC)
                .build();
            let run = lab::run_forwarded(
                &ebpf,
                &frame,
                fx1.ifindex,
                &format!("the reply to client {i}"),
            )?;
            let out = &run.frame;
            ensure!(out.len() > ETH_HLEN + 40, "the reply to client {i} is cut");
            let dmac: [u8; 6] = out[0..6].try_into()?;
            let smac: [u8; 6] = out[6..12].try_into()?;
            let dst: [u8; 16] = out[ETH_HLEN + 24..ETH_HLEN + 40].try_into()?;
            ensure!(
                Ipv6Addr::from(dst) == client(i),
                "the reply to client {i} went to {}",
                Ipv6Addr::from(dst)
            );
            ensure!(
                dmac == client_mac(i) && smac == FX0_MAC,
                "the reply to client {i} left from {smac:02x?} to {dmac:02x?}, not from \
                 fx0 {FX0_MAC:02x?} to the client's {:02x?}",
                client_mac(i)
            );
            Ok(())
        };
        for i in 0..CLIENTS {
            reply(i)?;
        }
        for i in (0..CLIENTS).rev() {
            reply(i)?;
        }
        Ok(())
    })
}

/// A hop is kept with its way's MTU, not the length of the packet that made it: after a
/// SYN, a full-sized packet of the flow uses the kept hop too. Seen from outside through a
/// neighbour change: within the second a hop is kept, the kept hop still has the old MAC,
/// where a packet that asked the FIB anew would get the new one.
#[test]
fn a_kept_hop_serves_every_length_its_way_takes() -> Result<()> {
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x99];
    lab::in_lab("xlbhopmtu", |_| {
        let config = format!(
            "[dataplane]\ninterfaces = [\"fx0\", \"fx1\"]\n[[service]]\nvip = \"{VIP}:80\"\n\
             protocol = \"tcp\"\nsnat = \"{SNAT}\"\n[[service.backend]]\naddress = \
             \"{BACKEND}:8080\"\n"
        );
        let checked = lab::checked(&config)?;
        let lab::Program { ebpf, fx0, .. } = lab::load(&checked)?;
        let to_backend = |flags: u8, payload: usize| -> Result<[u8; 6]> {
            let mut frame = Frame::tcp((CLIENT, 40000), (VIP, 80), flags);
            frame.payload = vec![0x5a; payload];
            let run = lab::run_forwarded(
                &ebpf,
                &frame.with_macs(CLIENT_MAC, FX0_MAC).build(),
                fx0.ifindex,
                &format!("a packet of {payload} bytes"),
            )?;
            Ok(run.frame[0..6].try_into()?)
        };
        ensure!(to_backend(TCP_SYN, 0)? == BACKEND_MAC, "the SYN's MAC");
        lab::set_neighbour(BACKEND.into(), NEW_MAC, lab::FX1)?;
        let kept = to_backend(TCP_ACK, 1400)?;
        ensure!(
            kept == BACKEND_MAC,
            "a 1,454-byte packet right after the SYN went to {kept:02x?}: it asked the FIB \
             again instead of using the hop kept for its way (MTU 1,500)"
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let fresh = to_backend(TCP_ACK, 1400)?;
        ensure!(
            fresh == NEW_MAC,
            "a second on, the packet went to {fresh:02x?}"
        );
        Ok(())
    })
}
