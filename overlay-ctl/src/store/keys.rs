//! The key layout of the cluster state under its prefix (default `overlay/`): every key
//! the store writes is built here, and the keys whose last segment carries data are
//! parsed back here. Values are JSON:
//!
//! | key | value |
//! | --- | --- |
//! | `overlay/networks/<name>` | [`Network`](crate::store::Network) |
//! | `overlay/vni/<N>` | the network name owning VNI N (created with cas=0) |
//! | `overlay/ipam/<network>/<ip>` | [`IpAllocation`](crate::store::IpAllocation) (created with cas=0) |
//! | `overlay/nodes/<node>` | [`NodeInfo`](crate::store::NodeInfo), held by the node's session |
//! | `overlay/endpoints/<network>/<id>` | [`Endpoint`](crate::store::Endpoint) |
//! | `overlay/config/bootstrapped` | marker written by [`Store::bootstrap`](crate::store::Store::bootstrap) |
//! | `overlay/config/cluster-id` | the cluster's identity, see [`crate::store::identity`] |
//! | `overlay/config/vxlan-port` | the cluster's VXLAN UDP port, see [`crate::store::settings`] |
//! | `overlay/subnets` | [`SubnetClaims`](crate::store::SubnetClaims): every network's subnet, updated with cas=index |
//! | `overlay/applied/<node>` | the KV index whose state the node's maps hold |
//! | `overlay/journal/head` | Consul only: the number of the last change journal entry (decimal), see [`crate::store::journal`] |
//! | `overlay/journal/<slot>` | Consul only: [`JournalEntry`](crate::store::journal::JournalEntry) number `n` in slot `n % 1024` |
//!
//! (Validating a record read at one of these keys is [`crate::store::records`]' job.)
use std::net::Ipv4Addr;

/// The prefix used when none is given.
pub const DEFAULT_PREFIX: &str = "overlay/";

/// The keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` is normalised to end with `/` (an empty prefix is `overlay/`).
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.trim_matches('/').to_string();
        if prefix.is_empty() {
            prefix = DEFAULT_PREFIX.trim_end_matches('/').to_string();
        }
        prefix.push('/');
        Self { prefix }
    }

    /// The prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn networks(&self) -> String {
        format!("{}networks/", self.prefix)
    }

    pub fn network(&self, name: &str) -> String {
        format!("{}networks/{name}", self.prefix)
    }

    pub fn vnis(&self) -> String {
        format!("{}vni/", self.prefix)
    }

    pub fn vni(&self, vni: u32) -> String {
        format!("{}vni/{vni}", self.prefix)
    }

    /// The VNI a key under [`Keys::vnis`] names.
    pub fn parse_vni(&self, key: &str) -> Option<u32> {
        key.strip_prefix(&self.vnis())?.parse().ok()
    }

    /// Where a network's address allocations live.
    pub fn allocations(&self, network: &str) -> String {
        format!("{}ipam/{network}/", self.prefix)
    }

    pub fn allocation(&self, network: &str, ip: Ipv4Addr) -> String {
        format!("{}ipam/{network}/{ip}", self.prefix)
    }

    /// The address a key under [`Keys::allocations`] of `network` names.
    pub fn parse_allocation(&self, network: &str, key: &str) -> Option<Ipv4Addr> {
        key.strip_prefix(&self.allocations(network))?.parse().ok()
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    /// Where every network's endpoints live.
    pub fn endpoints(&self) -> String {
        format!("{}endpoints/", self.prefix)
    }

    /// Where one network's endpoints live.
    pub fn endpoints_of(&self, network: &str) -> String {
        format!("{}endpoints/{network}/", self.prefix)
    }

    pub fn endpoint(&self, network: &str, id: &str) -> String {
        format!("{}endpoints/{network}/{id}", self.prefix)
    }

    /// The network segment of a key under [`Keys::endpoints`].
    pub fn parse_endpoint_network<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.endpoints())?.split('/').next()
    }

    pub fn applied_all(&self) -> String {
        format!("{}applied/", self.prefix)
    }

    pub fn applied(&self, node: &str) -> String {
        format!("{}applied/{node}", self.prefix)
    }

    /// The node a key under [`Keys::applied_all`] names.
    pub fn parse_applied<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.applied_all())
    }

    /// Where the change journal lives (Consul only, [`crate::store::journal`]).
    pub fn journal(&self) -> String {
        format!("{}journal/", self.prefix)
    }

    pub fn journal_head(&self) -> String {
        format!("{}journal/head", self.prefix)
    }

    pub fn journal_slot(&self, slot: u64) -> String {
        format!("{}journal/{slot}", self.prefix)
    }

    pub fn bootstrap(&self) -> String {
        format!("{}config/bootstrapped", self.prefix)
    }

    pub fn cluster_id(&self) -> String {
        format!("{}config/cluster-id", self.prefix)
    }

    /// The cluster's VXLAN UDP port (a cluster-wide setting).
    pub fn vxlan_port(&self) -> String {
        format!("{}config/vxlan-port", self.prefix)
    }

    /// The one key holding every network's subnet.
    pub fn subnets(&self) -> String {
        format!("{}subnets", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_normalise() {
        assert_eq!(Keys::new("").prefix(), "overlay/");
        assert_eq!(Keys::new("/x/y").prefix(), "x/y/");
        assert_eq!(Keys::new("overlay/").network("a"), "overlay/networks/a");
    }

    #[test]
    fn keys_parse_back() {
        let keys = Keys::new("o");
        assert_eq!(keys.parse_vni(&keys.vni(42)), Some(42));
        assert_eq!(keys.parse_vni("o/vni/x"), None);
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(
            keys.parse_allocation("web", &keys.allocation("web", ip)),
            Some(ip)
        );
        assert_eq!(
            keys.parse_allocation("db", &keys.allocation("web", ip)),
            None
        );
        assert_eq!(
            keys.parse_endpoint_network(&keys.endpoint("web", "c1")),
            Some("web")
        );
        assert_eq!(keys.parse_applied(&keys.applied("n1")), Some("n1"));
        assert_eq!(keys.parse_applied("o/nodes/n1"), None);
    }
}
