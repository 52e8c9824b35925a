//! The node agent: loads the data plane, binds it to the underlay interface and keeps it
//! running until told to stop.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use overlay_common::{ipv4_to_map, Counter, CounterValue, UnderlayConfig, VtepInfo};
use tracing::{info, warn};

use crate::{
    datapath::{self, Datapath, DatapathError, XdpAttachMode},
    netlink::{self, NetlinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Underlay interface; the default route's when `None`.
    pub iface: Option<String>,
    pub pin_root: PathBuf,
    pub xdp_mode: XdpAttachMode,
    /// Detach everything and remove the pins on exit (development runs).
    pub ephemeral: bool,
    /// How often data-plane counters are logged when they changed.
    pub stats_interval: Duration,
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    options: AgentOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let handle = netlink::connect()?;
    let link = match &options.iface {
        Some(name) => netlink::link_by_name(&handle, name).await?,
        None => {
            info!(
                "identifying the underlay interface from the default route (use --iface to choose)"
            );
            netlink::default_route_link(&handle).await?
        }
    };
    let vtep = netlink::first_ipv4(&handle, &link).await?;
    info!(iface = %link.name, ifindex = link.index, %vtep, mtu = link.mtu, "binding to underlay");

    if link.is_veth {
        match crate::endpoint::set_tx_checksum(&link.name, false) {
            Ok(()) => {
                info!(iface = %link.name, "veth underlay: TX checksum offload turned off so inner checksums are complete on the wire")
            }
            Err(e) => {
                warn!(iface = %link.name, error = %e, "cannot turn off TX checksum offload on the veth underlay; TCP/UDP across nodes may fail")
            }
        }
    }
    let mut datapath = Datapath::load(&options.pin_root)?;
    datapath.set_underlay(&UnderlayConfig {
        ifindex: link.index,
        vtep: ipv4_to_map(vtep.octets()),
        mtu: link.mtu,
        mac: link.mac,
        _pad: [0; 2],
    })?;
    datapath.upsert_vtep(
        vtep,
        &VtepInfo {
            flags: VtepInfo::LOCAL,
        },
    )?;
    datapath.attach_underlay(link.index, options.xdp_mode)?;
    info!(
        programs = ?datapath.program_ids(),
        pins = %options.pin_root.display(),
        "data plane attached; Ctrl-C to stop"
    );

    let mut last = BTreeMap::new();
    let mut ticker = tokio::time::interval(options.stats_interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => match datapath.counters() {
                Ok(now) => {
                    log_counter_changes(&last, &now);
                    last = now;
                }
                Err(e) => warn!(error = %e, "cannot read counters"),
            },
        }
    }

    info!("stopping: detaching the data plane");
    datapath.detach_underlay()?;
    if options.ephemeral {
        drop(datapath);
        if let Err(e) = datapath::remove_pins(&options.pin_root) {
            warn!(error = %e, "cannot remove pins");
        }
    }
    info!("stopped");
    Ok(())
}

fn log_counter_changes(
    before: &BTreeMap<(u32, Counter), CounterValue>,
    now: &BTreeMap<(u32, Counter), CounterValue>,
) {
    for ((vni, counter), value) in now {
        let previous = before.get(&(*vni, *counter)).copied().unwrap_or_default();
        if previous != *value {
            info!(
                vni,
                counter = counter.name(),
                packets = value.packets,
                bytes = value.bytes,
                "counter"
            );
        }
    }
}
