//! This node's underlay against the networks' MTUs. A network's MTU is chosen from the
//! smallest underlay of the nodes live when it was created ([`crate::store::mtu`]); a
//! node that joins later with a smaller underlay cannot carry that network's largest
//! frames. Such a node says so: in `status` (text and JSON), once in the log when it
//! starts and when it ends (not on every reconcile), and in the metrics. Its data plane
//! answers its containers' too-large packets with ICMP "fragmentation needed" carrying
//! the size that fits ([`overlay_common::tunnel_mtu`]).
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{lock, metrics::Family, Agent};
use crate::{
    dataplane::netlink,
    store::{mtu::shortfall, Network},
};

/// This node's underlay MTU and the networks it is too small for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayMtuStatus {
    /// The underlay interface's MTU (0: not known yet).
    pub underlay_mtu: u32,
    /// Networks whose MTU does not fit this underlay once encapsulated, by name.
    pub too_small_for: Vec<MtuShortfall>,
}

/// A network whose MTU this node's underlay cannot carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtuShortfall {
    pub network: String,
    pub vni: u32,
    /// The network's MTU, the containers' interface MTU.
    pub mtu: u32,
    /// The largest inner packet this node's underlay carries: what its containers'
    /// larger packets get ICMP "fragmentation needed" with.
    pub fits: u32,
    /// Bytes missing: the network's MTU plus the encapsulation minus the underlay MTU.
    pub shortfall: u32,
}

/// Which of `networks` an underlay of `underlay_mtu` is too small for.
pub fn check(networks: &[Network], underlay_mtu: u32) -> UnderlayMtuStatus {
    let mut too_small_for: Vec<MtuShortfall> = networks
        .iter()
        .filter_map(|n| {
            Some(MtuShortfall {
                network: n.name.clone(),
                vni: n.vni,
                mtu: n.mtu,
                fits: overlay_common::tunnel_mtu(n.mtu, underlay_mtu),
                shortfall: shortfall(n.mtu, underlay_mtu)?,
            })
        })
        .collect();
    too_small_for.sort_by(|a, b| a.network.cmp(&b.network));
    UnderlayMtuStatus {
        underlay_mtu,
        too_small_for,
    }
}

impl Agent {
    /// Checks the underlay against `networks` (the state a reconcile applies), publishes
    /// the result and logs what changed since the last check.
    pub(super) async fn check_underlay_mtu(&self, networks: &[Network]) {
        let underlay_mtu = self.follow_underlay_mtu().await;
        let now = check(networks, underlay_mtu);
        let mut before = None;
        self.status.send_if_modified(|status| {
            if status.mtu == now {
                return false;
            }
            before = Some(std::mem::replace(&mut status.mtu, now.clone()));
            true
        });
        if let Some(before) = before {
            log_changes(&before, &now);
        }
    }

    /// The underlay's MTU can change under the agent (`ip link set eth0 mtu 9000`): the
    /// data plane's limit and this node's record follow it. Returns the current MTU.
    async fn follow_underlay_mtu(&self) -> u32 {
        let (index, known) = {
            let plane = lock(&self.plane);
            (plane.underlay.link.index, plane.underlay.link.mtu)
        };
        let current = match netlink::link_by_index(&self.handle, index).await {
            Ok(link) => link.mtu,
            Err(e) => {
                debug!(error = %e, "cannot read the underlay's MTU; keeping {known}");
                return known;
            }
        };
        if current == known {
            return known;
        }
        {
            let mut plane = lock(&self.plane);
            if plane.underlay.link.index != index {
                // `cluster bind` moved the underlay meanwhile and read its MTU itself.
                return plane.underlay.link.mtu;
            }
            plane.underlay.link.mtu = current;
            if let Some(datapath) = plane.datapath.as_mut().and_then(|d| d.bpf()) {
                let updated = datapath.underlay_config().and_then(|mut config| {
                    config.mtu = current;
                    datapath.set_underlay(&config)
                });
                if let Err(e) = updated {
                    warn!(error = %e, "cannot give the data plane the underlay's new MTU");
                }
            }
        }
        info!(
            from = known,
            to = current,
            "the underlay's MTU changed; the data plane and this node's record follow"
        );
        // The membership task writes the node record again, with the new MTU.
        self.reregister.notify_one();
        current
    }
}

/// One line per network that became too large for the underlay, or fits again.
fn log_changes(before: &UnderlayMtuStatus, now: &UnderlayMtuStatus) {
    for s in &now.too_small_for {
        if !before.too_small_for.contains(s) || before.underlay_mtu != now.underlay_mtu {
            warn!(
                network = %s.network, mtu = s.mtu, underlay_mtu = now.underlay_mtu, fits = s.fits,
                "this node's underlay (MTU {}) is {} bytes too small for network {}'s MTU {}: its containers' larger packets get ICMP fragmentation-needed with MTU {}, and larger frames from other nodes cannot reach it",
                now.underlay_mtu, s.shortfall, s.network, s.mtu, s.fits
            );
        }
    }
    for s in &before.too_small_for {
        if !now.too_small_for.iter().any(|n| n.network == s.network) {
            info!(network = %s.network, underlay_mtu = now.underlay_mtu, "network {}'s MTU fits this node's underlay now", s.network);
        }
    }
}

/// The underlay MTU and the networks it is too small for, as Prometheus gauges.
pub(super) fn render_metrics(out: &mut String, status: &UnderlayMtuStatus) {
    let name = "overlay_underlay_mtu";
    Family::new(out, name, "gauge", "MTU of this node's underlay interface.").sample(
        name,
        &[],
        status.underlay_mtu,
    );
    let name = "overlay_networks_mtu_exceeding_underlay";
    Family::new(
        out,
        name,
        "gauge",
        "Networks whose MTU plus the VXLAN encapsulation exceeds this node's underlay MTU.",
    )
    .sample(name, &[], status.too_small_for.len());
    let name = "overlay_network_mtu_shortfall_bytes";
    let mut family = Family::new(
        out,
        name,
        "gauge",
        "Bytes a network's MTU plus the encapsulation exceeds this node's underlay MTU by (only networks that do not fit).",
    );
    for s in &status.too_small_for {
        let vni = s.vni.to_string();
        let labels = [("network", s.network.as_str()), ("vni", vni.as_str())];
        family.sample(name, &labels, s.shortfall);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, vni: u32, mtu: u32) -> Network {
        Network {
            name: name.into(),
            subnet: format!("10.{vni}.0.0/24").parse().unwrap(),
            gateway: format!("10.{vni}.0.1").parse().unwrap(),
            vni,
            mtu,
            egress: Default::default(),
        }
    }

    #[test]
    fn reports_only_networks_that_do_not_fit() {
        let networks = [network("jumbo", 2, 8950), network("small", 3, 1350)];
        let status = check(&networks, 1400);
        assert_eq!(status.underlay_mtu, 1400);
        assert_eq!(
            status.too_small_for,
            [MtuShortfall {
                network: "jumbo".into(),
                vni: 2,
                mtu: 8950,
                fits: 1350,
                shortfall: 7600,
            }]
        );
        assert!(check(&networks, 9000).too_small_for.is_empty());
    }

    #[test]
    fn metrics_name_each_network_that_does_not_fit() {
        let status = check(&[network("jumbo", 2, 8950)], 1400);
        let mut out = String::new();
        render_metrics(&mut out, &status);
        assert!(out.contains("overlay_underlay_mtu 1400\n"), "{out}");
        assert!(
            out.contains("overlay_networks_mtu_exceeding_underlay 1\n"),
            "{out}"
        );
        assert!(
            out.contains("overlay_network_mtu_shortfall_bytes{network=\"jumbo\",vni=\"2\"} 7600\n"),
            "{out}"
        );
    }
}
