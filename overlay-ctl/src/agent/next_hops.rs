//! The task that keeps the `NEXTHOPS` map in step with the kernel's routes and
//! neighbours (the resolution itself is [`crate::dataplane::nexthops`]): it resolves
//! every remote VTEP again on each link, neighbour or route event, and once a second
//! besides (new VTEPs, a missed event), so a changed neighbour reaches the map well
//! within a second and a removed one leaves it, handing its VTEP back to the FIB.
use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use futures_util::StreamExt;
use tracing::{debug, warn};

use super::{lock, Agent};
use crate::dataplane::{forwarding::DataPlane, netlink, nexthops};

/// How often the next hops are resolved without an event.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

impl Agent {
    pub(super) async fn next_hop_loop(self: Arc<Self>) {
        // A netlink socket of its own: the kernel refuses a second dump on a socket
        // whose first one is still running (EBUSY), and the reconcile dumps links and
        // addresses on the agent's socket at any time.
        let handle = match netlink::connect() {
            Ok(handle) => handle,
            Err(e) => {
                warn!(error = %e, "no netlink socket for the next-hop cache: encapsulation looks every next hop up in the FIB");
                return;
            }
        };
        let mut events = match nexthops::subscribe() {
            Ok(events) => Some(events),
            Err(e) => {
                warn!(error = %e, "no netlink events for the next-hop cache: resolving once a second only");
                None
            }
        };
        let mut ticker = tokio::time::interval(RESYNC_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            match events.as_mut() {
                Some(stream) => tokio::select! {
                    event = stream.next() => {
                        if event.is_none() {
                            warn!("the netlink event socket closed: resolving next hops once a second only");
                            events = None;
                        }
                    }
                    _ = ticker.tick() => {}
                },
                None => {
                    ticker.tick().await;
                }
            }
            self.sync_next_hops(&handle).await;
        }
    }

    /// Resolves every remote VTEP's next hop and writes what changed.
    async fn sync_next_hops(&self, handle: &rtnetlink::Handle) {
        let vteps: Vec<Ipv4Addr> = {
            let mut plane = lock(&self.plane);
            let Some(datapath) = plane.datapath.as_mut().and_then(DataPlane::bpf) else {
                return;
            };
            match datapath.vteps() {
                Ok(vteps) => vteps
                    .into_iter()
                    .filter(|(_, info)| !info.is_local())
                    .map(|(vtep, _)| vtep)
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "cannot read the VTEPs for the next-hop cache");
                    return;
                }
            }
        };
        let desired = match nexthops::resolve_all(handle, vteps).await {
            Ok(desired) => desired,
            Err(e) => {
                warn!(error = %e, "cannot resolve the next hops towards the VTEPs");
                return;
            }
        };
        let mut plane = lock(&self.plane);
        let Some(datapath) = plane.datapath.as_mut().and_then(DataPlane::bpf) else {
            return;
        };
        match nexthops::apply(datapath, &desired) {
            Ok(0) => {}
            Ok(changed) => debug!(changed, cached = desired.len(), "next hops updated"),
            Err(e) => warn!(error = %e, "cannot write the next-hop cache"),
        }
    }
}
