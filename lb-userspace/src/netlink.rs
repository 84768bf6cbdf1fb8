//! The route-netlink socket and the small queries that more than one module needs (through
//! `rtnetlink`).

use anyhow::Context as _;
use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;

/// A route netlink socket in the calling thread's network namespace, its connection driven
/// by a task on the current tokio runtime for as long as this lives.
pub struct Netlink {
    pub handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    pub fn open() -> anyhow::Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a route netlink socket")?;
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
        })
    }
}

/// The link `iface` (RTM_GETLINK by name), in the namespace `handle`'s socket belongs to.
pub async fn link_by_name(handle: &Handle, iface: &str) -> anyhow::Result<LinkMessage> {
    handle
        .link()
        .get()
        .match_name(iface.to_string())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("RTM_GETLINK {iface}"))?
        .with_context(|| format!("RTM_GETLINK {iface}: no answer"))
}

/// The link with `ifindex` (RTM_GETLINK by index).
pub async fn link_by_index(handle: &Handle, ifindex: u32) -> anyhow::Result<LinkMessage> {
    handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("RTM_GETLINK ifindex {ifindex}"))?
        .with_context(|| format!("RTM_GETLINK ifindex {ifindex}: no answer"))
}

/// A link's name (IFLA_IFNAME).
pub fn link_name(link: &LinkMessage) -> anyhow::Result<String> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .with_context(|| format!("ifindex {}: no name (IFLA_IFNAME)", link.header.index))
}

/// The mode of the XDP program attached to `iface` (IFLA_XDP_ATTACHED): "native",
/// "generic", "offload", or None when there is none.
pub async fn xdp_mode(iface: &str) -> anyhow::Result<Option<&'static str>> {
    use netlink_packet_route::link::{LinkXdp, XdpAttached};
    let netlink = Netlink::open()?;
    let link = link_by_name(&netlink.handle, iface).await?;
    Ok(link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::Attached(XdpAttached::Driver) => Some("native"),
                LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("generic"),
                LinkXdp::Attached(XdpAttached::Hardware) => Some("offload"),
                _ => None,
            }),
            _ => None,
        }))
}
