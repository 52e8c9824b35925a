//! The cluster-wide IPAM bookkeeping: one create-only key per allocated address, so
//! concurrent allocators on any host never get the same one. (Which address is free
//! and valid is [`super::ipam`]'s pure rules.)
use std::{collections::BTreeSet, net::Ipv4Addr};

use tracing::debug;

use super::{
    backend::KvBackend as _, check_segment, encode, ipam, records, skip_invalid, IpAllocation,
    Network, Store, StoreError,
};

impl Store {
    /// Allocates an address on `network` for `endpoint` on `node`: `requested` if it is
    /// valid and free, else the lowest free one. Concurrent allocators (on any host)
    /// never get the same address: each address is taken by a create-only write.
    pub async fn allocate_ip(
        &self,
        network: &str,
        requested: Option<Ipv4Addr>,
        endpoint: &str,
        node: &str,
    ) -> Result<Ipv4Addr, StoreError> {
        check_segment("endpoint id", endpoint)?;
        check_segment("node name", node)?;
        let net = self.require_network(network).await?;
        let value = encode(&IpAllocation {
            endpoint: endpoint.to_string(),
            node: node.to_string(),
        });
        let ip = match requested {
            Some(ip) => self.take_requested(&net, ip, &value).await?,
            None => self.take_lowest_free(&net, &value).await?,
        };
        // The network may have been deleted (and its allocations wiped) meanwhile; do
        // not leave an orphan allocation behind.
        if self.get_network(network).await?.as_ref() != Some(&net) {
            let _ = self.kv().delete(&self.keys().allocation(network, ip)).await;
            return Err(StoreError::NoSuchNetwork(network.to_string()));
        }
        debug!(network, %ip, endpoint, node, "address allocated");
        Ok(ip)
    }

    /// Takes `ip` on `net` if it is valid and free.
    async fn take_requested(
        &self,
        net: &Network,
        ip: Ipv4Addr,
        value: &[u8],
    ) -> Result<Ipv4Addr, StoreError> {
        ipam::validate_address(net.subnet, net.gateway, ip)?;
        let key = self.keys().allocation(&net.name, ip);
        if !self.kv().put_cas(&key, value, 0).await? {
            return Err(StoreError::AddressInUse {
                network: net.name.clone(),
                ip,
            });
        }
        Ok(ip)
    }

    /// Takes the lowest free address of `net`, skipping those taken concurrently.
    async fn take_lowest_free(&self, net: &Network, value: &[u8]) -> Result<Ipv4Addr, StoreError> {
        let mut taken = self.allocated_set(&net.name).await?;
        loop {
            let Some(ip) = ipam::next_free(net.subnet, net.gateway, &taken) else {
                return Err(StoreError::Exhausted {
                    network: net.name.clone(),
                    subnet: net.subnet,
                });
            };
            let key = self.keys().allocation(&net.name, ip);
            if self.kv().put_cas(&key, value, 0).await? {
                return Ok(ip);
            }
            // Someone else took it since we listed; that address is out.
            taken.insert(ip);
        }
    }

    async fn allocated_set(&self, network: &str) -> Result<BTreeSet<Ipv4Addr>, StoreError> {
        Ok(self
            .kv()
            .keys(&self.keys().allocations(network))
            .await?
            .iter()
            .filter_map(|k| self.keys().parse_allocation(network, k))
            .collect())
    }

    /// Frees an address (freeing a free address is not an error).
    pub async fn release_ip(&self, network: &str, ip: Ipv4Addr) -> Result<(), StoreError> {
        ipam::validate_name(network)?;
        self.kv()
            .delete(&self.keys().allocation(network, ip))
            .await?;
        debug!(network, %ip, "address released");
        Ok(())
    }

    /// The allocated addresses of a network, in address order.
    pub async fn list_allocations(
        &self,
        network: &str,
    ) -> Result<Vec<(Ipv4Addr, IpAllocation)>, StoreError> {
        ipam::validate_name(network)?;
        let mut out: Vec<(Ipv4Addr, IpAllocation)> = self
            .kv()
            .list(&self.keys().allocations(network))
            .await?
            .iter()
            .filter_map(|pair| skip_invalid(records::parse_allocation(self.prefix(), pair)))
            .map(|((_, ip), allocation)| (ip, allocation))
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }
}
