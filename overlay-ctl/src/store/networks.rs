//! Networks: creating one (validated, then its subnet and VNI claimed with
//! check-and-set before its record is written, rolled back on a lost race), reading,
//! listing, updating (the egress mode, check-and-set on the record) and deleting them,
//! and bootstrapping the `default` network.
use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use overlay_common::{capacity, map_names};
use tracing::{debug, info, warn};

use super::{
    backend::{KvBackend as _, Record as _},
    decode, encode, ipam,
    mtu::{self, MtuChoice},
    records, skip_invalid, EgressMode, Network, Store, StoreError, SubnetClaims, DEFAULT_GATEWAY,
    DEFAULT_NETWORK, DEFAULT_SUBNET,
};

/// How often [`Store::update_network_egress`] re-reads a record that changed under it
/// before it gives up.
const UPDATE_ATTEMPTS: u32 = 10;

/// A network definition that passed validation, before anything is written.
struct NewNetwork {
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    vni: Option<u32>,
    /// As requested (its value checked; whether it fits the underlay, [`mtu::choose`]).
    mtu: Option<u32>,
}

impl NewNetwork {
    /// Validates a `network create`; `gateway` defaults to the first address.
    fn validate(
        name: &str,
        cidr: &str,
        gateway: Option<Ipv4Addr>,
        vni: Option<u64>,
        mtu: Option<u32>,
    ) -> Result<Self, StoreError> {
        ipam::validate_name(name)?;
        let subnet = ipam::parse_subnet(cidr)?;
        let gateway = gateway.unwrap_or_else(|| ipam::default_gateway(subnet));
        ipam::validate_gateway(subnet, gateway)?;
        let vni = vni.map(ipam::validate_vni).transpose()?;
        mtu.map(ipam::validate_mtu).transpose()?;
        Ok(Self {
            subnet,
            gateway,
            vni,
            mtu,
        })
    }
}

impl Store {
    /// Creates a network with the default egress (masquerade); see
    /// [`Store::create_network_explained`].
    pub async fn create_network(
        &self,
        name: &str,
        cidr: &str,
        gateway: Option<Ipv4Addr>,
        vni: Option<u64>,
        mtu: Option<u32>,
    ) -> Result<Network, StoreError> {
        let (network, _) = self
            .create_network_explained(name, cidr, gateway, vni, mtu, EgressMode::default())
            .await?;
        Ok(network)
    }

    /// Creates a network with egress mode `egress`; see
    /// [`Store::create_network_explained`].
    pub async fn create_network_with_egress(
        &self,
        name: &str,
        cidr: &str,
        gateway: Option<Ipv4Addr>,
        vni: Option<u64>,
        mtu: Option<u32>,
        egress: EgressMode,
    ) -> Result<Network, StoreError> {
        let (network, _) = self
            .create_network_explained(name, cidr, gateway, vni, mtu, egress)
            .await?;
        Ok(network)
    }

    /// Creates a network and says how its MTU was chosen. Everything is validated
    /// before anything is written; `gateway` defaults to the first address, `vni` to the
    /// lowest free one, `mtu` to the smallest underlay's ([`mtu::choose`]). On a lost
    /// race nothing stays written.
    pub async fn create_network_explained(
        &self,
        name: &str,
        cidr: &str,
        gateway: Option<Ipv4Addr>,
        vni: Option<u64>,
        mtu: Option<u32>,
        egress: EgressMode,
    ) -> Result<(Network, MtuChoice), StoreError> {
        let new = NewNetwork::validate(name, cidr, gateway, vni, mtu)?;
        self.check_new_network(name, &new).await?;
        let (mtu, mtu_choice) = mtu::choose(new.mtu, &self.list_nodes().await?)?;
        // The check that decides: the subnet is added to the claims with check-and-set.
        // Only a claim this call added is rolled back (a concurrent create of the same
        // name may hold it).
        let claimed = self.claim_subnet(name, new.subnet).await?;
        crate::testhook::pause("subnet-claimed");
        let vni = match self.claim_vni(name, new.vni).await {
            Ok(vni) => vni,
            Err(e) => {
                if claimed {
                    self.unclaim_subnet(new.subnet, name).await;
                }
                return Err(e);
            }
        };
        crate::testhook::pause("vni-claimed");
        let network = Network {
            name: name.to_string(),
            subnet: new.subnet,
            gateway: new.gateway,
            vni,
            mtu,
            egress,
        };
        let created = self
            .kv()
            .put_cas(&self.keys().network(name), &encode(&network), 0)
            .await;
        if let Ok(true) = created {
            let (subnet, gateway, mtu) = (network.subnet, network.gateway, network.mtu);
            info!(network = name, %subnet, %gateway, vni, mtu, %egress, "network created (MTU: {mtu_choice})");
            return Ok((network, mtu_choice));
        }
        self.unclaim_vni(vni, name).await;
        if claimed {
            self.unclaim_subnet(network.subnet, name).await;
        }
        match created {
            Err(e) => Err(e),
            Ok(_) => Err(StoreError::NetworkExists(name.to_string())),
        }
    }

    /// Refuses a new network against what the store visibly holds: its name, the
    /// network capacity, an overlapping subnet, a requested VNI that is taken. (The
    /// create-only claims still decide a race.)
    async fn check_new_network(&self, name: &str, new: &NewNetwork) -> Result<(), StoreError> {
        let existing = self.list_networks().await?;
        if existing.iter().any(|n| n.name == name) {
            return Err(StoreError::NetworkExists(name.to_string()));
        }
        // Every node's NETWORKS and SUBNETS maps hold one entry per network.
        let limit = capacity::NETWORKS.min(capacity::SUBNETS);
        if existing.len() >= limit as usize {
            return Err(StoreError::Capacity {
                what: "the cluster has its maximum number of networks",
                count: existing.len(),
                limit,
                map: map_names::NETWORKS,
            });
        }
        if let Some(other) = existing.iter().find(|n| n.subnet.overlaps(new.subnet)) {
            return Err(StoreError::SubnetOverlap {
                subnet: new.subnet,
                other: other.name.clone(),
                other_subnet: other.subnet,
            });
        }
        if let Some(vni) = new.vni {
            if let Some(pair) = self.kv().get(&self.keys().vni(vni)).await? {
                return Err(StoreError::VniTaken {
                    vni,
                    owner: pair.value_str(),
                });
            }
        }
        Ok(())
    }

    /// The subnet claims and the modify index to update them with (0: no key yet).
    pub async fn subnet_claims(&self) -> Result<(SubnetClaims, u64), StoreError> {
        match self.kv().get(&self.keys().subnets()).await? {
            Some(pair) => Ok((decode(&pair)?, pair.modify_index)),
            None => Ok((SubnetClaims::new(), 0)),
        }
    }

    /// Adds `subnet` for `name` to the claims unless a claimed subnet overlaps it: one
    /// check-and-set write on the claims' modify index, re-read and re-checked when a
    /// concurrent writer got there first. Returns whether it was added now (false: it
    /// was already `name`'s).
    pub async fn claim_subnet(&self, name: &str, subnet: Ipv4Network) -> Result<bool, StoreError> {
        loop {
            let (mut claims, index) = self.subnet_claims().await?;
            for (cidr, owner) in &claims {
                let Ok(other_subnet) = cidr.parse::<Ipv4Network>() else {
                    continue;
                };
                if owner == name && other_subnet == subnet {
                    return Ok(false);
                }
                if other_subnet.overlaps(subnet) {
                    return Err(StoreError::SubnetOverlap {
                        subnet,
                        other: owner.clone(),
                        other_subnet,
                    });
                }
            }
            claims.insert(subnet.to_string(), name.to_string());
            if self
                .kv()
                .put_cas(&self.keys().subnets(), &encode(&claims), index)
                .await?
            {
                return Ok(true);
            }
            debug!(%subnet, "subnet claims changed concurrently; checking again");
        }
    }

    /// Removes `subnet` from the claims if it is still `name`'s and no network `name` with
    /// that subnet exists (best effort, logged).
    pub async fn unclaim_subnet(&self, subnet: Ipv4Network, name: &str) {
        let result = async {
            if let Some(pair) = self.kv().get(&self.keys().network(name)).await? {
                if decode::<Network>(&pair).is_ok_and(|n| n.subnet == subnet) {
                    return Ok(());
                }
            }
            loop {
                let (mut claims, index) = self.subnet_claims().await?;
                if claims.get(&subnet.to_string()).map(String::as_str) != Some(name) {
                    return Ok(());
                }
                claims.remove(&subnet.to_string());
                if self
                    .kv()
                    .put_cas(&self.keys().subnets(), &encode(&claims), index)
                    .await?
                {
                    return Ok::<_, StoreError>(());
                }
            }
        }
        .await;
        if let Err(e) = result {
            warn!(%subnet, network = name, error = %e, "could not remove a subnet claim");
        }
    }

    /// Takes `vni` (or the lowest free one) for `name` with a create-only write.
    async fn claim_vni(&self, name: &str, wanted: Option<u32>) -> Result<u32, StoreError> {
        if let Some(vni) = wanted {
            if self
                .kv()
                .put_cas(&self.keys().vni(vni), name.as_bytes(), 0)
                .await?
            {
                return Ok(vni);
            }
            let owner = self
                .kv()
                .get(&self.keys().vni(vni))
                .await?
                .map(|p| p.value_str())
                .unwrap_or_default();
            return Err(StoreError::VniTaken { vni, owner });
        }
        let mut taken: BTreeSet<u32> = self
            .kv()
            .keys(&self.keys().vnis())
            .await?
            .iter()
            .filter_map(|k| self.keys().parse_vni(k))
            .collect();
        let mut candidate = ipam::MIN_VNI;
        loop {
            while taken.contains(&candidate) {
                candidate = candidate.checked_add(1).ok_or(StoreError::NoFreeVni)?;
            }
            if candidate > ipam::MAX_VNI {
                return Err(StoreError::NoFreeVni);
            }
            if self
                .kv()
                .put_cas(&self.keys().vni(candidate), name.as_bytes(), 0)
                .await?
            {
                return Ok(candidate);
            }
            debug!(vni = candidate, "VNI taken concurrently; trying the next");
            taken.insert(candidate);
        }
    }

    /// Best-effort removal of a VNI claim, only if it is still `name`'s.
    pub async fn unclaim_vni(&self, vni: u32, name: &str) {
        let key = self.keys().vni(vni);
        let result = async {
            if let Some(pair) = self.kv().get(&key).await? {
                if pair.value == name.as_bytes() {
                    self.kv().delete_cas(&key, pair.modify_index).await?;
                }
            }
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = result {
            warn!(%key, error = %e, "could not roll back a VNI claim");
        }
    }

    pub async fn get_network(&self, name: &str) -> Result<Option<Network>, StoreError> {
        ipam::validate_name(name)?;
        match self.kv().get(&self.keys().network(name)).await? {
            Some(pair) => Ok(Some(records::parse_network(self.prefix(), &pair)?)),
            None => Ok(None),
        }
    }

    pub(super) async fn require_network(&self, name: &str) -> Result<Network, StoreError> {
        self.get_network(name)
            .await?
            .ok_or_else(|| StoreError::NoSuchNetwork(name.to_string()))
    }

    /// All networks whose records are valid, by name (invalid ones are skipped with a
    /// warning; [`Store::snapshot`] says why, with the cross-record rules).
    pub async fn list_networks(&self) -> Result<Vec<Network>, StoreError> {
        let mut networks: Vec<Network> = self
            .kv()
            .list(&self.keys().networks())
            .await?
            .iter()
            .filter_map(|p| skip_invalid(records::parse_network(self.prefix(), p)))
            .collect();
        networks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(networks)
    }

    /// Sets a network's egress mode with a check-and-set write on its record, so a
    /// concurrent update of another field is never lost (the record is read again and
    /// the change re-applied). Returns the network as written, and whether it changed
    /// (the mode was already `egress`: nothing is written).
    pub async fn update_network_egress(
        &self,
        name: &str,
        egress: EgressMode,
    ) -> Result<(Network, bool), StoreError> {
        ipam::validate_name(name)?;
        let key = self.keys().network(name);
        for _ in 0..UPDATE_ATTEMPTS {
            let pair = (self.kv().get(&key).await?)
                .ok_or_else(|| StoreError::NoSuchNetwork(name.to_string()))?;
            let mut network = records::parse_network(self.prefix(), &pair)?;
            if network.egress == egress {
                return Ok((network, false));
            }
            let before = std::mem::replace(&mut network.egress, egress);
            if self
                .kv()
                .put_cas(&key, &encode(&network), pair.modify_index)
                .await?
            {
                info!(network = name, from = %before, to = %egress, "network egress changed");
                return Ok((network, true));
            }
            debug!(
                network = name,
                "network record changed concurrently; updating again"
            );
        }
        Err(StoreError::UpdateContended {
            name: name.to_string(),
            attempts: UPDATE_ATTEMPTS,
        })
    }

    /// Deletes a network with its VNI claim, address allocations and (with `force`)
    /// endpoints. Refused while endpoints exist unless `force`.
    /// An invalid network record is deleted too, with `force` (its VNI claim stays).
    pub async fn delete_network(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let network = match self.require_network(name).await {
            Ok(network) => Some(network),
            Err(StoreError::Rejected(r)) if force => {
                warn!(key = %r.key, "deleting an invalid network record: {}", r.detail);
                None
            }
            Err(StoreError::Rejected(r)) => {
                return Err(StoreError::InvalidNetworkRecord(r));
            }
            Err(e) => return Err(e),
        };
        // Every endpoint record counts here, valid or not: they all go with the network.
        let endpoints = self.kv().keys(&self.keys().endpoints_of(name)).await?;
        if !endpoints.is_empty() && !force {
            return Err(StoreError::NetworkInUse {
                name: name.to_string(),
                count: endpoints.len(),
            });
        }
        // The network key first, so no new allocation can start on it.
        self.kv().delete(&self.keys().network(name)).await?;
        self.kv()
            .delete_tree(&self.keys().endpoints_of(name))
            .await?;
        self.kv()
            .delete_tree(&self.keys().allocations(name))
            .await?;
        if let Some(network) = network {
            self.unclaim_vni(network.vni, name).await;
            self.unclaim_subnet(network.subnet, name).await;
        }
        info!(
            network = name,
            endpoints = endpoints.len(),
            "network deleted"
        );
        Ok(())
    }

    /// Creates the `default` network (10.1.0.0/16, gateway 10.1.0.1) and the
    /// bootstrapped marker, once per cluster; later and concurrent calls do nothing.
    /// Returns whether this call bootstrapped.
    pub async fn bootstrap(&self) -> Result<bool, StoreError> {
        let marker = self.keys().bootstrap();
        if self.kv().get(&marker).await?.is_some() {
            return Ok(false);
        }
        match self
            .create_network(
                DEFAULT_NETWORK,
                DEFAULT_SUBNET,
                Some(DEFAULT_GATEWAY),
                None,
                None,
            )
            .await
        {
            Ok(_) | Err(StoreError::NetworkExists(_)) => {}
            Err(e) => return Err(e),
        }
        let done = self.kv().put_cas(&marker, b"true", 0).await?;
        if done {
            info!(prefix = %self.prefix(), "cluster state bootstrapped");
        }
        Ok(done)
    }
}
