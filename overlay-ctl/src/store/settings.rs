//! The cluster-wide settings under `<prefix>config/`, the same for every node: today the
//! VXLAN UDP port, `config/vxlan-port` (a JSON number).
//!
//! The port is chosen at bootstrap (`agent --bootstrap --vxlan-port N`, else
//! [`DEFAULT_VXLAN_PORT`]), changed with `overlay-ctl cluster set vxlan-port N`, and read
//! back through [`records`](crate::store::records) like every other record: every agent
//! writes it into its `CLUSTER` map on its next reconcile, where the programs read it per
//! packet. A cluster whose store has no such key (one bootstrapped before the setting
//! existed) uses the default, as it always did.
use overlay_common::proto::{LINUX_VXLAN_PORT, VXLAN_PORT};
use tracing::{info, warn};

use super::{backend::KvBackend as _, records, Store, StoreError};

/// The port of a cluster that names none: IANA's 4789, what this overlay always used,
/// so existing clusters and their Linux `vxlan` peers keep working.
pub const DEFAULT_VXLAN_PORT: u16 = VXLAN_PORT;
/// Ports accepted for VXLAN. Below 1024 lie the well-known services, and from 32768 on
/// the kernel's ephemeral range: every UDP datagram between nodes to the VXLAN port is
/// taken by the data plane, so such a port would swallow a service's traffic, or the
/// replies to this node's own UDP clients. Both common VXLAN ports (4789 and Linux's
/// 8472) lie inside.
pub const VXLAN_PORTS: std::ops::RangeInclusive<u16> = 1024..=32767;

/// Why a VXLAN port is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "VXLAN port {port} is outside {}-{}: below are the well-known services, above the \
     ephemeral ports of the nodes' own UDP clients, whose traffic the data plane would \
     take for VXLAN (the usual ports are {VXLAN_PORT}, IANA's, and {LINUX_VXLAN_PORT}, Linux's)",
    VXLAN_PORTS.start(),
    VXLAN_PORTS.end()
)]
pub struct BadVxlanPort {
    pub port: u64,
}

/// The rule for a VXLAN port, applied to what the CLI writes and what the store holds.
pub fn check_vxlan_port(port: u64) -> Result<u16, BadVxlanPort> {
    u16::try_from(port)
        .ok()
        .filter(|p| VXLAN_PORTS.contains(p))
        .ok_or(BadVxlanPort { port })
}

/// What bootstrapping did about the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAtBootstrap {
    /// This bootstrap stored the port.
    Chosen(u16),
    /// The cluster was bootstrapped already: its port stays as it is (the store's, or
    /// the default when it names none).
    Kept(u16),
}

impl Store {
    /// The cluster's VXLAN port as stored: `None` when the store names none (the
    /// default applies); an invalid record is an error.
    pub async fn vxlan_port(&self) -> Result<Option<u16>, StoreError> {
        match self.kv().get(&self.keys().vxlan_port()).await? {
            Some(pair) => Ok(Some(records::parse_vxlan_port(self.prefix(), &pair)?)),
            None => Ok(None),
        }
    }

    /// Sets the cluster's VXLAN port (every agent applies it on its next reconcile);
    /// returns the port in force before.
    pub async fn set_vxlan_port(&self, port: u64) -> Result<u16, StoreError> {
        let port = check_vxlan_port(port)?;
        let before = self.vxlan_port().await.ok().flatten();
        self.kv()
            .put(&self.keys().vxlan_port(), port.to_string().as_bytes())
            .await?;
        info!(port, "cluster VXLAN port set");
        Ok(before.unwrap_or(DEFAULT_VXLAN_PORT))
    }

    /// At bootstrap: stores `requested` (or the default) as the cluster's port, unless
    /// the cluster was bootstrapped already, whose port no restart of its first agent
    /// may change behind the operator's back (`cluster set vxlan-port` does that).
    /// Call it before [`Store::bootstrap`], so that a bootstrap interrupted in between
    /// still stores its port on the next try. Create-only: of two agents bootstrapping
    /// at once, the first one's port wins.
    pub async fn bootstrap_vxlan_port(
        &self,
        requested: Option<u16>,
    ) -> Result<PortAtBootstrap, StoreError> {
        let wanted = check_vxlan_port(requested.unwrap_or(DEFAULT_VXLAN_PORT).into())?;
        let key = self.keys().vxlan_port();
        let bootstrapped = self.kv().get(&self.keys().bootstrap()).await?.is_some();
        if !bootstrapped
            && self
                .kv()
                .put_cas(&key, wanted.to_string().as_bytes(), 0)
                .await?
        {
            info!(port = wanted, "cluster VXLAN port chosen at bootstrap");
            return Ok(PortAtBootstrap::Chosen(wanted));
        }
        let port = self.vxlan_port().await?.unwrap_or(DEFAULT_VXLAN_PORT);
        if requested.is_some_and(|r| r != port) {
            warn!(
                port,
                requested = requested.unwrap_or_default(),
                "the cluster already uses VXLAN port {port}; --vxlan-port is ignored \
                 (change it with `overlay-ctl cluster set vxlan-port`)"
            );
        }
        Ok(PortAtBootstrap::Kept(port))
    }

    /// Into a store that lost its data: the port this node last trusted, unless one is
    /// there (create-only); returns how many keys it wrote. Without it the restored
    /// cluster would fall back to the default port, away from its Linux peers.
    pub(crate) async fn republish_vxlan_port(
        &self,
        last: Option<u16>,
    ) -> Result<usize, StoreError> {
        let Some(port) = last else {
            return Ok(0);
        };
        let key = self.keys().vxlan_port();
        let written = self
            .kv()
            .put_cas(&key, port.to_string().as_bytes(), 0)
            .await?;
        Ok(usize::from(written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usual_ports_pass_and_service_or_ephemeral_ports_do_not() {
        assert_eq!(check_vxlan_port(4789), Ok(4789));
        assert_eq!(check_vxlan_port(8472), Ok(8472));
        for bad in [0, 53, 1023, 32768, 49152, 65535, 65536, u64::MAX] {
            assert_eq!(check_vxlan_port(bad), Err(BadVxlanPort { port: bad }));
        }
        let message = check_vxlan_port(53).unwrap_err().to_string();
        assert!(message.contains("1024-32767") && message.contains("8472"));
    }
}
