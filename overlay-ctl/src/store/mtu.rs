//! A network's MTU from the underlay: every node records its underlay interface's MTU in
//! its node record, and a network created without `--mtu` gets the smallest of the live
//! nodes' underlay MTUs minus the VXLAN encapsulation, so its frames cross every node's
//! underlay unfragmented (a jumbo 9000-byte underlay gives 8950, a 1460-byte cloud one
//! 1410). An explicit `--mtu` must fit that smallest underlay too. A node that joins
//! later with a smaller underlay is reported by its agent ([`shortfall`]).
//! Pure functions: the store reads the nodes and calls [`choose`].
use std::fmt;

use overlay_common::VXLAN_OVERHEAD;

use super::{
    ipam::{DEFAULT_MTU, MAX_MTU, MIN_MTU},
    NodeInfo,
};

/// Accepted underlay MTUs in node records: IPv4's minimum link MTU (RFC 791) up to the
/// largest a Linux interface has (loopback's 64 KiB).
pub const MIN_UNDERLAY_MTU: u32 = 68;
pub const MAX_UNDERLAY_MTU: u32 = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MtuError {
    #[error("underlay MTU {0} is out of range {MIN_UNDERLAY_MTU}..={MAX_UNDERLAY_MTU}")]
    UnderlayOutOfRange(u32),
    #[error("MTU {mtu} does not fit the underlay of node {node:?} (MTU {underlay_mtu}, which carries at most {max} once VXLAN's {VXLAN_OVERHEAD} bytes are added); use --mtu {max} or less")]
    ExceedsUnderlay {
        mtu: u32,
        node: String,
        underlay_mtu: u32,
        max: u32,
    },
    #[error("the underlay of node {node:?} (MTU {underlay_mtu}) carries at most {max} bytes once VXLAN's {VXLAN_OVERHEAD} are added, less than the smallest network MTU {MIN_MTU}")]
    UnderlayTooSmall {
        node: String,
        underlay_mtu: u32,
        max: u32,
    },
}

/// A node record's `underlay_mtu`, when present, must be one an interface can have.
pub fn validate_underlay_mtu(mtu: u32) -> Result<(), MtuError> {
    if (MIN_UNDERLAY_MTU..=MAX_UNDERLAY_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(MtuError::UnderlayOutOfRange(mtu))
    }
}

/// The live node with the smallest underlay MTU (ties: the first by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmallestUnderlay {
    pub node: String,
    pub mtu: u32,
}

/// How a new network's MTU was chosen, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MtuChoice {
    /// Given with `--mtu`, checked against the smallest underlay when one is known.
    Requested,
    /// The smallest underlay MTU minus the encapsulation; `capped` when that exceeded
    /// the largest network MTU.
    FromUnderlay {
        smallest: SmallestUnderlay,
        capped: bool,
    },
    /// No live node has recorded its underlay MTU: a 1500-byte underlay is assumed.
    Assumed,
}

impl fmt::Display for MtuChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requested => write!(f, "as requested with --mtu"),
            Self::FromUnderlay { smallest, capped } => {
                write!(
                    f,
                    "the smallest underlay MTU of the cluster's nodes ({} on node {}) minus {VXLAN_OVERHEAD} bytes of VXLAN",
                    smallest.mtu, smallest.node
                )?;
                if *capped {
                    write!(f, ", capped at the largest network MTU {MAX_MTU}")?;
                }
                Ok(())
            }
            Self::Assumed => write!(
                f,
                "no live node has recorded its underlay MTU, so a 1500-byte underlay is assumed ({DEFAULT_MTU} = 1500 - {VXLAN_OVERHEAD})"
            ),
        }
    }
}

/// The node with the smallest recorded underlay MTU (records without one are older
/// agents' and do not count).
pub fn smallest_underlay(nodes: &[NodeInfo]) -> Option<SmallestUnderlay> {
    nodes
        .iter()
        .filter_map(|n| Some((n.underlay_mtu?, n.name.as_str())))
        .min()
        .map(|(mtu, node)| SmallestUnderlay {
            node: node.to_string(),
            mtu,
        })
}

/// A new network's MTU: `requested` (already range-checked) when it fits the smallest
/// underlay, else the smallest underlay's MTU minus the encapsulation, else (no node
/// recorded one) [`DEFAULT_MTU`].
pub fn choose(requested: Option<u32>, nodes: &[NodeInfo]) -> Result<(u32, MtuChoice), MtuError> {
    let smallest = smallest_underlay(nodes);
    let Some(smallest) = smallest else {
        return Ok((requested.unwrap_or(DEFAULT_MTU), default_or(requested)));
    };
    let max = smallest.mtu.saturating_sub(VXLAN_OVERHEAD);
    match requested {
        Some(mtu) if mtu > max => Err(MtuError::ExceedsUnderlay {
            mtu,
            node: smallest.node,
            underlay_mtu: smallest.mtu,
            max,
        }),
        Some(mtu) => Ok((mtu, MtuChoice::Requested)),
        None if max < MIN_MTU => Err(MtuError::UnderlayTooSmall {
            node: smallest.node,
            underlay_mtu: smallest.mtu,
            max,
        }),
        None => Ok((
            max.min(MAX_MTU),
            MtuChoice::FromUnderlay {
                smallest,
                capped: max > MAX_MTU,
            },
        )),
    }
}

fn default_or(requested: Option<u32>) -> MtuChoice {
    match requested {
        Some(_) => MtuChoice::Requested,
        None => MtuChoice::Assumed,
    }
}

/// How many bytes a network of MTU `network_mtu` needs beyond what an underlay of MTU
/// `underlay_mtu` carries once encapsulated (`None`: it fits).
pub fn shortfall(network_mtu: u32, underlay_mtu: u32) -> Option<u32> {
    (network_mtu + VXLAN_OVERHEAD)
        .checked_sub(underlay_mtu)
        .filter(|&missing| missing > 0)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn node(name: &str, underlay_mtu: Option<u32>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            iface: "eth0".into(),
            underlay_mtu,
        }
    }

    #[test]
    fn default_follows_the_smallest_underlay() {
        let jumbo = [node("a", Some(9000)), node("b", Some(9000))];
        assert_eq!(choose(None, &jumbo).unwrap().0, 8950);
        let cloud = [node("a", Some(9000)), node("b", Some(1460))];
        let (mtu, why) = choose(None, &cloud).unwrap();
        assert_eq!(mtu, 1410);
        assert!(why.to_string().contains("1460 on node b"), "{why}");
        // Old records without the field do not count.
        assert_eq!(
            choose(None, &[node("a", None), node("b", Some(9000))])
                .unwrap()
                .0,
            8950
        );
    }

    #[test]
    fn no_known_underlay_assumes_1500() {
        for nodes in [vec![], vec![node("old", None)]] {
            let (mtu, why) = choose(None, &nodes).unwrap();
            assert_eq!((mtu, &why), (1450, &MtuChoice::Assumed));
            assert!(why.to_string().contains("1500-byte underlay is assumed"));
        }
        assert_eq!(choose(Some(9000), &[]).unwrap().0, 9000);
    }

    #[test]
    fn requested_mtu_must_fit_the_smallest_underlay() {
        let nodes = [node("a", Some(9000)), node("b", Some(1500))];
        assert_eq!(
            choose(Some(1450), &nodes).unwrap(),
            (1450, MtuChoice::Requested)
        );
        let err = choose(Some(1451), &nodes).unwrap_err();
        assert_eq!(
            err,
            MtuError::ExceedsUnderlay {
                mtu: 1451,
                node: "b".into(),
                underlay_mtu: 1500,
                max: 1450
            }
        );
        assert!(err.to_string().contains("--mtu 1450"), "{err}");
    }

    #[test]
    fn huge_and_tiny_underlays() {
        let (mtu, why) = choose(None, &[node("lo", Some(65_536))]).unwrap();
        assert_eq!(mtu, MAX_MTU);
        assert!(matches!(why, MtuChoice::FromUnderlay { capped: true, .. }));
        assert!(matches!(
            choose(None, &[node("tiny", Some(600))]),
            Err(MtuError::UnderlayTooSmall { max: 550, .. })
        ));
        assert!(validate_underlay_mtu(1500).is_ok());
        assert!(validate_underlay_mtu(67).is_err());
        assert!(validate_underlay_mtu(65_537).is_err());
    }

    #[test]
    fn shortfalls() {
        assert_eq!(shortfall(1450, 1500), None);
        assert_eq!(shortfall(1400, 1500), None);
        assert_eq!(shortfall(8950, 1400), Some(7600));
        assert_eq!(shortfall(1451, 1500), Some(1));
    }
}
