//! Binding a node to its underlay interface: which hook decapsulates VXLAN there, the
//! underlay entry the programs read, and the host settings the overlay needs. The agent
//! and the tests' simulated hosts both come through here, so a test host is set up
//! exactly as a user's node is.
//!
//! Nothing here changes how the interface itself behaves (offloads, MTU, addresses):
//! the choice of hook is what keeps inner checksums and GSO correct. Native XDP on a
//! veth rebuilds every skb from a bare frame, which throws away a peer's
//! "checksum still to be done" state and its GSO metadata, so TCP from a veth peer
//! arrives with unfinished checksums; TC ingress sees the skb as it came. NICs deliver
//! finished checksums from the wire, and there XDP is the fastest hook.
use std::net::Ipv4Addr;

use overlay_common::UnderlayConfig;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    dataplane::datapath::{Datapath, DatapathError, UnderlayHook, XdpAttachMode},
    dataplane::netlink::LinkInfo,
};

/// Where the underlay's VXLAN decapsulation runs (`agent --decap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
pub enum DecapMode {
    /// Native XDP on devices with a driver of their own (NICs, virtio_net); TC ingress
    /// on virtual devices (veth, bridge, bond, ...) and on drivers without native XDP.
    #[default]
    Auto,
    /// XDP always, in the `--xdp-mode` mode. On a veth this breaks TCP/UDP from veth
    /// peers unless their TX checksum offload is off.
    Xdp,
    /// TC ingress always.
    Tc,
}

/// What [`attach`] chose, for the log and `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlaySetup {
    /// `xdp (native)`, `tc ingress`, ...
    pub decap_hook: String,
    /// Why that hook.
    pub reason: String,
}

/// Points the data plane at `link`: the underlay entry (VTEP, MTU, MAC) and the
/// decapsulation program at the hook `decap` asks for.
pub fn attach(
    datapath: &mut Datapath,
    link: &LinkInfo,
    vtep: Ipv4Addr,
    decap: DecapMode,
    xdp_mode: XdpAttachMode,
) -> Result<UnderlaySetup, DatapathError> {
    datapath.set_underlay(&UnderlayConfig::new(link.index, vtep, link.mtu, link.mac))?;
    let (hook, reason) = match (decap, link.kind.as_deref()) {
        (DecapMode::Xdp, _) => (UnderlayHook::Xdp(xdp_mode), "--decap xdp".to_string()),
        (DecapMode::Tc, _) => (UnderlayHook::TcIngress, "--decap tc".to_string()),
        (DecapMode::Auto, Some(kind)) => (
            UnderlayHook::TcIngress,
            format!(
                "{kind} device: its XDP path would lose the checksum and GSO state of the skbs its peer hands over"
            ),
        ),
        (DecapMode::Auto, None) => {
            let hook = UnderlayHook::Xdp(XdpAttachMode::Native);
            match datapath.attach_underlay(link.index, hook) {
                Ok(()) => {
                    return Ok(announce(
                        link,
                        hook,
                        "a NIC driver: native XDP, the earliest hook".into(),
                    ))
                }
                Err(e) => {
                    warn!(iface = %link.name, error = %e, "native XDP refused by the driver; decapsulating at TC ingress instead");
                    (
                        UnderlayHook::TcIngress,
                        format!("the driver refused native XDP ({e})"),
                    )
                }
            }
        }
    };
    datapath.attach_underlay(link.index, hook)?;
    Ok(announce(link, hook, reason))
}

fn announce(link: &LinkInfo, hook: UnderlayHook, reason: String) -> UnderlaySetup {
    info!(iface = %link.name, hook = %hook, %reason, "VXLAN decapsulation attached");
    UnderlaySetup {
        decap_hook: hook.to_string(),
        reason,
    }
}

/// A host setting the agent changed, with the value it had, so that an `--ephemeral`
/// agent can put it back and `status` can show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostChange {
    /// The sysctl, e.g. `net.ipv4.ip_forward`.
    pub setting: String,
    pub before: String,
    pub after: String,
}

const IP_FORWARD: &str = "ipv4.ip_forward";

/// Turns IPv4 forwarding on: encapsulated packets leave through a FIB lookup on behalf
/// of the containers' veths, which the kernel only answers for a forwarding host (and
/// containers' traffic to the outside world is routed by the host), as with Docker.
/// Returns the change made, if any.
pub fn enable_forwarding() -> std::io::Result<Option<HostChange>> {
    let before = crate::dataplane::netns::read_net_sysctl(IP_FORWARD)?;
    if before == "1" {
        return Ok(None);
    }
    crate::dataplane::netns::write_net_sysctl(IP_FORWARD, "1")?;
    let change = HostChange {
        setting: format!("net.{IP_FORWARD}"),
        before,
        after: "1".into(),
    };
    info!(setting = %change.setting, before = %change.before, after = %change.after, "host setting changed for the overlay");
    Ok(Some(change))
}

/// Puts back what [`enable_forwarding`] changed.
pub fn restore(changes: &[HostChange]) {
    for change in changes {
        let key = change
            .setting
            .strip_prefix("net.")
            .unwrap_or(&change.setting);
        match crate::dataplane::netns::write_net_sysctl(key, &change.before) {
            Ok(()) => {
                info!(setting = %change.setting, value = %change.before, "host setting put back")
            }
            Err(e) => {
                warn!(setting = %change.setting, error = %e, "cannot put the host setting back")
            }
        }
    }
}
