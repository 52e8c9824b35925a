//! What the benchmark writes: one network, endpoints spread round-robin over the
//! agents' nodes, each with the IPAM key that gives it its address (agents reject an
//! endpoint without one), in the key layout and JSON of the product's store code
//! (`Store::keys`, its record types), as `overlay-ctl run` writes them.
//!
//! Endpoint `i` is `s000123`, at 10.128.0.10 + i.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use futures_util::StreamExt as _;
use overlay_ctl::store::{
    backend::{KvBackend as _, StoreBackend},
    etcd::{PrefixWatch, WatchEvent, WatchUpdate},
    identity, Endpoint, IpAllocation, Store,
};

pub const NETWORK: &str = "scale";
/// 65,534 addresses: room for 20,000 endpoints and the churn's new ones.
const SUBNET: &str = "10.128.0.0/16";
const FIRST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 10);
/// How long reading back one write's index may take.
const INDEX_TIMEOUT: Duration = Duration::from_secs(10);

/// One measured endpoint write: when it was sent, and the store index it got.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    pub at: Instant,
    pub index: u64,
}

/// Endpoints and where they live.
pub struct Workload {
    store: Store,
    nodes: Vec<String>,
    /// Writes in flight during the bulk load.
    writers: usize,
}

impl Workload {
    pub fn new(store: Store, nodes: Vec<String>, writers: usize) -> Self {
        Self {
            store,
            nodes,
            writers: writers.max(1),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What the bootstrapping agent and `network create` would have written.
    pub async fn prepare(&self) -> Result<()> {
        self.store.bootstrap().await?;
        identity::ensure_cluster_id(&self.store, None).await?;
        self.store
            .create_network(NETWORK, SUBNET, None, None, Some(1450))
            .await
            .context("create the benchmark's network")?;
        Ok(())
    }

    fn id(i: usize) -> String {
        format!("s{i:06}")
    }

    fn ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(FIRST_ADDRESS) + i as u32)
    }

    fn node(&self, i: usize) -> &str {
        &self.nodes[i % self.nodes.len()]
    }

    /// How many of endpoints `0..total` are on `node`.
    pub fn count_on(&self, node: &str, total: usize) -> usize {
        (0..total).filter(|i| self.node(*i) == node).count()
    }

    /// Endpoint `i`'s IPAM key and value.
    fn allocation(&self, i: usize) -> (String, Vec<u8>) {
        let value = IpAllocation {
            endpoint: Self::id(i),
            node: self.node(i).to_string(),
        };
        (
            self.store.keys().allocation(NETWORK, Self::ip(i)),
            serde_json::to_vec(&value).unwrap_or_default(),
        )
    }

    /// Endpoint `i`'s key and record.
    fn endpoint(&self, i: usize) -> (String, Vec<u8>) {
        let ip = Self::ip(i);
        let id = Self::id(i);
        let record = Endpoint {
            ifname: overlay_ctl::store::ipam::host_ifname(NETWORK, &id),
            network: NETWORK.into(),
            ip,
            mac: overlay_ctl::dataplane::endpoint::mac_for(ip),
            node: self.node(i).to_string(),
            container: None,
            pid: None,
            netns: None,
            id,
        };
        (
            self.store.keys().endpoint(NETWORK, &record.id),
            serde_json::to_vec(&record).unwrap_or_default(),
        )
    }

    /// Writes the IPAM keys of endpoints `range`.
    pub async fn allocate(&self, range: std::ops::Range<usize>) -> Result<()> {
        self.put_all(range.map(|i| self.allocation(i))).await
    }

    /// Writes the endpoint records of `range` (their IPAM keys must exist).
    pub async fn create_endpoints(&self, range: std::ops::Range<usize>) -> Result<()> {
        self.put_all(range.map(|i| self.endpoint(i))).await
    }

    /// What an agent reading the store now would hold: how many endpoint records, and
    /// the highest modify index under the prefix but the acknowledgements (the index it
    /// would acknowledge at least). One read of the whole prefix for both.
    pub async fn loaded(&self) -> Result<(usize, u64)> {
        let keys = self.store.keys();
        let (applied, endpoints) = (keys.applied_all(), keys.endpoints());
        let pairs = self.store.kv().list(keys.prefix()).await?;
        let followed = pairs.iter().filter(|p| !p.key.starts_with(&applied));
        let held = followed
            .clone()
            .filter(|p| p.key.starts_with(&endpoints))
            .count();
        let last = followed.map(|p| p.modify_index).max().unwrap_or(0);
        Ok((held, last))
    }

    /// The highest modify index among the endpoint records.
    pub async fn last_endpoint_index(&self) -> Result<u64> {
        let prefix = self.store.keys().endpoints();
        let pairs = self.store.kv().list(&prefix).await?;
        Ok(pairs.iter().map(|p| p.modify_index).max().unwrap_or(0))
    }

    async fn put_all(&self, records: impl Iterator<Item = (String, Vec<u8>)>) -> Result<()> {
        let mut pending = futures_util::stream::FuturesUnordered::new();
        for (key, value) in records {
            let kv = self.store.kv().clone();
            pending.push(async move { kv.put(&key, &value).await });
            if pending.len() >= self.writers {
                if let Some(result) = pending.next().await {
                    result?;
                }
            }
        }
        while let Some(result) = pending.next().await {
            result?;
        }
        Ok(())
    }

    /// Creates endpoint `i` as `run` does (address, then endpoint); returns when the
    /// endpoint write started and its store index, read back exactly.
    pub async fn create_one(&self, i: usize) -> Result<Write> {
        let (ipam_key, ipam_value) = self.allocation(i);
        self.store.kv().put(&ipam_key, &ipam_value).await?;
        let (key, value) = self.endpoint(i);
        let at = Instant::now();
        let index = match self.store.kv() {
            StoreBackend::Etcd(client) => client.put(&key, &value).await? as u64,
            kv @ StoreBackend::Consul(_) => {
                kv.put(&key, &value).await?;
                self.consul_index(&key).await?
            }
        };
        Ok(Write { at, index })
    }

    /// Removes endpoint `i` as `run` does when its container exits (endpoint, then
    /// address); returns when the deletion started and its store index.
    pub async fn delete_one(&self, i: usize) -> Result<Write> {
        let (key, _) = self.endpoint(i);
        let mut at = Instant::now();
        let index = match self.store.kv() {
            StoreBackend::Etcd(client) => {
                let Some(before) = client.get(&key).await? else {
                    bail!("{key} is not there to delete");
                };
                at = Instant::now();
                client.delete(&key).await?;
                deletion_revision(client.clone(), &key, before.mod_revision).await?
            }
            kv @ StoreBackend::Consul(_) => {
                kv.delete(&key).await?;
                self.consul_index(&key).await?
            }
        };
        let (ipam_key, _) = self.allocation(i);
        self.store.kv().delete(&ipam_key).await?;
        Ok(Write { at, index })
    }

    /// The index Consul reports for a read of `key` alone: its modify index, or the
    /// index of its deletion (the dev server keeps it, as Consul keeps tombstones).
    async fn consul_index(&self, key: &str) -> Result<u64> {
        let StoreBackend::Consul(client) = self.store.kv() else {
            bail!("not a Consul store");
        };
        let (_, index) = client.get_blocking(key, 0, INDEX_TIMEOUT).await?;
        Ok(index)
    }
}

/// The revision at which `key` (last written at `after`) was deleted: the first event
/// of a watch on the key from that revision on (the ids have a fixed width, so the key
/// is the prefix of no other).
async fn deletion_revision(
    client: overlay_ctl::store::etcd::EtcdClient,
    key: &str,
    after: i64,
) -> Result<u64> {
    let mut watch = PrefixWatch::resume(client, key, after);
    let update = tokio::time::timeout(INDEX_TIMEOUT, watch.next())
        .await
        .context("no deletion event")??;
    match update {
        WatchUpdate::Changes { events, .. } => events
            .iter()
            .find_map(|e| match e {
                WatchEvent::Delete { revision, .. } => Some(*revision as u64),
                WatchEvent::Put(_) => None,
            })
            .context("the watch saw no deletion"),
        WatchUpdate::Snapshot { .. } => bail!("the deletion's revision was compacted"),
    }
}
