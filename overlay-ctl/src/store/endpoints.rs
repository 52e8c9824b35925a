//! Endpoints: a container's interface on a network (its address, MAC, node), written
//! only while the network exists and within the data plane's capacity.
use std::collections::BTreeMap;

use overlay_common::{capacity, map_names};

use super::{
    backend::KvBackend as _, check_segment, encode, ipam, records, skip_invalid, Endpoint, Network,
    Store, StoreError,
};

impl Store {
    /// Refuses a new endpoint when every node's ENDPOINTS map (which holds every
    /// endpoint of the cluster) would overflow. Counts endpoint keys (one cheap read, and
    /// an endpoint of a node that is away still counts: it comes back with its node).
    /// Not atomic with the creation: concurrent creators can go a few over, which the
    /// agents survive (reconcile reports the entries that did not fit).
    pub async fn check_endpoint_capacity(&self) -> Result<(), StoreError> {
        let count = self.kv().keys(&self.keys().endpoints()).await?.len();
        if count >= capacity::ENDPOINTS as usize {
            return Err(StoreError::Capacity {
                what: "the cluster has its maximum number of endpoints",
                count,
                limit: capacity::ENDPOINTS,
                map: map_names::ENDPOINTS,
            });
        }
        Ok(())
    }

    /// Writes (creates or replaces) an endpoint; its network must exist.
    pub async fn put_endpoint(&self, endpoint: &Endpoint) -> Result<(), StoreError> {
        check_segment("endpoint id", &endpoint.id)?;
        check_segment("node name", &endpoint.node)?;
        self.require_network(&endpoint.network).await?;
        let key = self.keys().endpoint(&endpoint.network, &endpoint.id);
        self.kv().put(&key, &encode(endpoint)).await?;
        Ok(())
    }

    /// Creates an endpoint; refused (with nothing written) when one with the same ID
    /// exists on its network, also when two callers race for the name.
    pub async fn create_endpoint(&self, endpoint: &Endpoint) -> Result<(), StoreError> {
        check_segment("endpoint id", &endpoint.id)?;
        check_segment("node name", &endpoint.node)?;
        self.require_network(&endpoint.network).await?;
        let key = self.keys().endpoint(&endpoint.network, &endpoint.id);
        if self.kv().put_cas(&key, &encode(endpoint), 0).await? {
            Ok(())
        } else {
            Err(StoreError::EndpointExists {
                network: endpoint.network.clone(),
                id: endpoint.id.clone(),
            })
        }
    }

    pub async fn get_endpoint(
        &self,
        network: &str,
        id: &str,
    ) -> Result<Option<Endpoint>, StoreError> {
        ipam::validate_name(network)?;
        check_segment("endpoint id", id)?;
        let Some(pair) = self.kv().get(&self.keys().endpoint(network, id)).await? else {
            return Ok(None);
        };
        // Validated like every record read (`detach` acts on its interface name).
        let net = match self.kv().get(&self.keys().network(network)).await? {
            Some(p) => Some(records::parse_network(self.prefix(), &p)?),
            None => None,
        };
        Ok(Some(records::parse_endpoint(
            self.prefix(),
            &pair,
            net.as_ref(),
        )?))
    }

    /// The endpoints of one network, or of all networks with `None`, whose records are
    /// valid on their own (invalid ones are skipped with a warning; [`Store::snapshot`]
    /// also checks addresses against their IPAM keys and each other).
    pub async fn list_endpoints(&self, network: Option<&str>) -> Result<Vec<Endpoint>, StoreError> {
        let (prefix, networks) = match network {
            Some(n) => {
                ipam::validate_name(n)?;
                let network = match self.kv().get(&self.keys().network(n)).await? {
                    Some(pair) => skip_invalid(records::parse_network(self.prefix(), &pair)),
                    None => None,
                };
                (self.keys().endpoints_of(n), network.into_iter().collect())
            }
            None => (self.keys().endpoints(), self.list_networks().await?),
        };
        let by_name: BTreeMap<&str, &Network> =
            networks.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut endpoints: Vec<Endpoint> = self
            .kv()
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|pair| {
                let network = self
                    .keys()
                    .parse_endpoint_network(&pair.key)
                    .and_then(|name| by_name.get(name).copied());
                skip_invalid(records::parse_endpoint(self.prefix(), pair, network))
            })
            .collect();
        endpoints.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
        Ok(endpoints)
    }

    /// Deletes an endpoint (deleting a missing one is not an error).
    pub async fn delete_endpoint(&self, network: &str, id: &str) -> Result<(), StoreError> {
        ipam::validate_name(network)?;
        check_segment("endpoint id", id)?;
        self.kv().delete(&self.keys().endpoint(network, id)).await?;
        Ok(())
    }

    /// The modify index of an endpoint's entry (for waiting until peers applied it).
    pub async fn endpoint_index(&self, network: &str, id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .kv()
            .get(&self.keys().endpoint(network, id))
            .await?
            .map(|p| p.modify_index))
    }
}
