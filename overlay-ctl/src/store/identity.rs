//! The cluster's identity in the store, so that a store which lost its data (a server
//! restarted without its data directory, a wrong address, a restored old snapshot of
//! another cluster) is not mistaken for a cluster whose every network, node and endpoint
//! was deleted.
//!
//! `<prefix>config/cluster-id` holds `{"cluster": C, "incarnation": I}`: `C` is created
//! once, at bootstrap; `I` changes each time an agent restores the key into a store that
//! lost it. Every agent remembers the pair it last trusted in `<state-dir>/cluster-id`
//! (0600) and judges each full read of the prefix against it:
//!
//! | the store holds | verdict |
//! | --- | --- |
//! | the remembered pair | trusted: applied as read |
//! | no id, agent remembers none | unknown (a cluster not bootstrapped yet, or one from before ids): applied as read |
//! | no id, agent remembers one | **missing**: the store lost its data. The maps keep the last state; the agent restores the id (create-only) with a new incarnation |
//! | another cluster id | **foreign**: the maps keep the last state, the agent writes nothing there |
//! | the remembered cluster, another incarnation | **healing**: the store was restored (by this agent or another). Every agent republishes what it is the source of truth for (its node, its local endpoints and their addresses, and the networks it knew) with create-only writes; for a heal period the maps get the union of the last trusted state and the store's, so nothing is removed while the others republish |
//!
//! Missing and foreign are logged as errors, shown by `status` and exported as the metric
//! `overlay_store_state`.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    store::ClusterState,
    store::{
        backend::{KvBackend as _, Record},
        keys::Keys,
        Endpoint, IpAllocation, Network, Store, StoreError,
    },
};

pub const CLUSTER_ID_FILE: &str = "cluster-id";

/// The value of `<prefix>config/cluster-id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterId {
    pub cluster: String,
    pub incarnation: String,
}

impl ClusterId {
    /// A new cluster.
    pub fn generate() -> Self {
        Self {
            cluster: random_hex(),
            incarnation: random_hex(),
        }
    }

    /// The same cluster, restored into a store that lost it.
    pub fn restored(&self) -> Self {
        Self {
            cluster: self.cluster.clone(),
            incarnation: random_hex(),
        }
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ u128::from(std::process::id()).rotate_left(64)).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn cluster_id_key(store: &Store) -> String {
    store.keys().cluster_id()
}

/// The cluster id in one full read of the prefix (`None`: absent or unreadable).
pub fn find<'p, R: Record + 'p>(
    prefix: &str,
    pairs: impl IntoIterator<Item = &'p R>,
) -> Option<ClusterId> {
    let key = Keys::new(prefix).cluster_id();
    let pair = pairs.into_iter().find(|p| p.key() == key)?;
    serde_json::from_slice(pair.value()).ok()
}

/// Creates the cluster id unless one exists (the bootstrapping agent does this): a new
/// one, or the one this agent already belongs to (`known`) restored.
pub async fn ensure_cluster_id(store: &Store, known: Option<&ClusterId>) -> Result<(), StoreError> {
    let key = cluster_id_key(store);
    if store.kv().get(&key).await?.is_none() {
        let id = known
            .map(ClusterId::restored)
            .unwrap_or_else(ClusterId::generate);
        if store
            .kv()
            .put_cas(&key, &serde_json::to_vec(&id).unwrap_or_default(), 0)
            .await?
        {
            info!(cluster = %id.cluster, "cluster id created");
        }
    }
    Ok(())
}

/// How far the agent trusts the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    /// No cluster id known on either side yet.
    Unknown,
    Trusted,
    /// The store lost its data: the maps keep the last state.
    Missing,
    /// The store is another cluster's: the maps keep the last state.
    Foreign,
    /// The store was restored: own records republished, nothing removed for a while.
    Healing,
}

impl Trust {
    pub const ALL: [Trust; 5] = [
        Trust::Unknown,
        Trust::Trusted,
        Trust::Missing,
        Trust::Foreign,
        Trust::Healing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Trust::Unknown => "unknown",
            Trust::Trusted => "trusted",
            Trust::Missing => "missing",
            Trust::Foreign => "foreign",
            Trust::Healing => "healing",
        }
    }

    /// Whether store entries may be garbage-collected on what the store says.
    pub fn allows_gc(self) -> bool {
        matches!(self, Trust::Unknown | Trust::Trusted)
    }
}

/// What to do with one full read of the store.
#[derive(Debug)]
pub enum Judgement {
    /// Apply this state (shared with the identity's last trusted copy: one copy of a
    /// 20,000-endpoint state, not two).
    Apply(Arc<ClusterState>),
    /// Keep the maps as they are (the store is not this cluster's state).
    Hold,
}

/// What the agent should do besides applying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// Write this id into the store (create-only): it lost it.
    pub restore: Option<ClusterId>,
    /// Republish this node's records.
    pub republish: bool,
}

/// The agent's side of the identity check.
#[derive(Debug)]
pub struct Identity {
    file: PathBuf,
    remembered: Option<ClusterId>,
    trust: Trust,
    heal_until: Option<Instant>,
    heal_period: Duration,
    last_trusted: Option<Arc<ClusterState>>,
    detail: Option<String>,
}

impl Identity {
    /// Reads the remembered id from the state directory.
    pub fn load(state_dir: &Path, heal_period: Duration) -> Self {
        let file = state_dir.join(CLUSTER_ID_FILE);
        let remembered = std::fs::read(&file)
            .ok()
            .and_then(|data| serde_json::from_slice(&data).ok());
        Self {
            file,
            remembered,
            trust: Trust::Unknown,
            heal_until: None,
            heal_period,
            last_trusted: None,
            detail: None,
        }
    }

    pub fn trust(&self) -> Trust {
        self.trust
    }

    pub fn cluster(&self) -> Option<&ClusterId> {
        self.remembered.as_ref()
    }

    /// A one-line explanation while the store is not trusted.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The last state applied from a trusted store (what is republished).
    pub fn last_trusted(&self) -> Option<&ClusterState> {
        self.last_trusted.as_deref()
    }

    fn remember(&mut self, id: ClusterId) {
        if let Err(e) =
            crate::private::write_file(&self.file, &serde_json::to_vec(&id).unwrap_or_default())
        {
            warn!(error = %e, file = %self.file.display(), "cannot save the cluster id");
        }
        self.remembered = Some(id);
    }

    fn set(&mut self, trust: Trust, detail: Option<String>) {
        self.trust = trust;
        self.detail = detail;
    }

    /// Judges one full read: `found` is the id it holds, `read` its decoded state.
    pub fn judge(
        &mut self,
        found: Option<ClusterId>,
        read: ClusterState,
        now: Instant,
    ) -> (Judgement, Actions) {
        let Some(remembered) = self.remembered.clone() else {
            return self.first_sight(found, read);
        };
        match found {
            None => self.store_lost_its_data(&remembered, &read),
            Some(found) if found.cluster != remembered.cluster => {
                self.store_is_foreign(&found, &remembered)
            }
            Some(found) => self.same_cluster(found, &remembered, read, now),
        }
    }

    /// No id remembered yet: learn the store's (if any) and apply what it holds.
    fn first_sight(
        &mut self,
        found: Option<ClusterId>,
        read: ClusterState,
    ) -> (Judgement, Actions) {
        if let Some(found) = found {
            info!(cluster = %found.cluster, "cluster id learnt from the store");
            self.remember(found);
            self.set(Trust::Trusted, None);
        } else {
            self.set(Trust::Unknown, None);
        }
        let read = Arc::new(read);
        self.last_trusted = Some(read.clone());
        (Judgement::Apply(read), Actions::default())
    }

    /// The store has no id but this agent remembers one: hold, and restore the id.
    fn store_lost_its_data(
        &mut self,
        remembered: &ClusterId,
        read: &ClusterState,
    ) -> (Judgement, Actions) {
        if self.trust != Trust::Missing {
            error!(
                cluster = %remembered.cluster,
                networks = read.networks.len(),
                nodes = read.nodes.len(),
                endpoints = read.endpoints.len(),
                "THE STORE HAS LOST THE CLUSTER'S DATA (its cluster id is gone): the data plane keeps the last known state; restoring the cluster id and republishing this node's records"
            );
        }
        self.set(
            Trust::Missing,
            Some(format!(
                "the store has no cluster id (this node knows {}): it lost its data; keeping the last state",
                remembered.cluster
            )),
        );
        let actions = Actions {
            restore: Some(remembered.restored()),
            ..Actions::default()
        };
        (Judgement::Hold, actions)
    }

    /// The store holds another cluster's id: hold, write nothing.
    fn store_is_foreign(
        &mut self,
        found: &ClusterId,
        remembered: &ClusterId,
    ) -> (Judgement, Actions) {
        if self.trust != Trust::Foreign {
            error!(
                found = %found.cluster,
                expected = %remembered.cluster,
                "THE STORE BELONGS TO ANOTHER CLUSTER: ignoring it; the data plane keeps the last known state (point the agent at its own store)"
            );
        }
        self.set(
            Trust::Foreign,
            Some(format!(
                "the store is cluster {}, this node belongs to {}; keeping the last state",
                found.cluster, remembered.cluster
            )),
        );
        (Judgement::Hold, Actions::default())
    }

    /// This agent's cluster: trusted, or healing (merged with the last trusted state)
    /// for a while after the store was restored under a new incarnation.
    fn same_cluster(
        &mut self,
        found: ClusterId,
        remembered: &ClusterId,
        read: ClusterState,
        now: Instant,
    ) -> (Judgement, Actions) {
        let mut actions = Actions::default();
        if found.incarnation != remembered.incarnation {
            warn!(
                cluster = %found.cluster,
                "the store was restored after losing its data: republishing this node's records; nothing is removed from the data plane for {:?}",
                self.heal_period
            );
            self.remember(found);
            self.heal_until = Some(now + self.heal_period);
            actions.republish = true;
        }
        if self.heal_until.is_some_and(|until| now < until) {
            self.set(
                Trust::Healing,
                Some("the store was restored; nodes are republishing their records".into()),
            );
            let merged = merge(self.last_trusted.as_deref(), read);
            return (Judgement::Apply(Arc::new(merged)), actions);
        }
        let was_untrusted = self.heal_until.take().is_some()
            || matches!(self.trust, Trust::Missing | Trust::Foreign);
        if was_untrusted {
            info!(cluster = %found_cluster(&self.remembered), "the store is trusted again");
        }
        self.set(Trust::Trusted, None);
        let read = Arc::new(read);
        self.last_trusted = Some(read.clone());
        (Judgement::Apply(read), actions)
    }
}

fn found_cluster(id: &Option<ClusterId>) -> String {
    id.as_ref().map(|i| i.cluster.clone()).unwrap_or_default()
}

/// The union of the last trusted state and a fresh read (the read wins per record).
pub fn merge(last: Option<&ClusterState>, read: ClusterState) -> ClusterState {
    let Some(last) = last else {
        return read;
    };
    let mut out = read;
    out.vxlan_port = out.vxlan_port.or(last.vxlan_port);
    for network in &last.networks {
        if !out.networks.iter().any(|n| n.name == network.name) {
            out.networks.push(network.clone());
        }
    }
    for node in &last.nodes {
        if !out.nodes.iter().any(|n| n.name == node.name) {
            out.nodes.push(node.clone());
        }
    }
    for endpoint in &last.endpoints {
        if !out
            .endpoints
            .iter()
            .any(|e| e.network == endpoint.network && e.id == endpoint.id)
        {
            out.endpoints.push(endpoint.clone());
        }
    }
    out.networks.sort_by(|a, b| a.name.cmp(&b.name));
    out.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    out.endpoints
        .sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
    out
}

/// Writes the id back into a store that lost it, with the bootstrap marker (create-only:
/// another agent may be doing the same).
pub async fn restore(store: &Store, id: &ClusterId) -> Result<bool, StoreError> {
    let written = store
        .kv()
        .put_cas(
            &cluster_id_key(store),
            &serde_json::to_vec(id).unwrap_or_default(),
            0,
        )
        .await?;
    store
        .kv()
        .put_cas(&store.keys().bootstrap(), b"true", 0)
        .await?;
    if written {
        warn!(cluster = %id.cluster, incarnation = %id.incarnation, "restored the cluster id into the store");
    }
    Ok(written)
}

/// Republishes, with create-only writes, what this node is the source of truth for: the
/// networks it knew (with their VNI and subnet claims), the VXLAN port, its local
/// endpoints and their addresses (`local`: the endpoints of this node's own records, see
/// `agent::local_state`). (Its node key is the membership task's.) Returns how many
/// entries it wrote.
pub async fn republish(
    store: &Store,
    node: &str,
    local: &[Endpoint],
    last: Option<&ClusterState>,
) -> Result<usize, StoreError> {
    let mut written = 0;
    for network in last.map(|l| l.networks.as_slice()).unwrap_or_default() {
        written += republish_network(store, network).await?;
    }
    written += store
        .republish_vxlan_port(last.and_then(|l| l.vxlan_port))
        .await?;
    for endpoint in local {
        written += republish_endpoint(store, node, endpoint).await?;
    }
    info!(written, "republished this node's records");
    Ok(written)
}

/// A network's record, VNI claim and subnet claim, each unless present.
async fn republish_network(store: &Store, network: &Network) -> Result<usize, StoreError> {
    let (kv, keys) = (store.kv(), store.keys());
    let mut written = 0;
    let record = serde_json::to_vec(network).unwrap_or_default();
    if kv.put_cas(&keys.network(&network.name), &record, 0).await? {
        written += 1;
    }
    if kv
        .put_cas(&keys.vni(network.vni), network.name.as_bytes(), 0)
        .await?
    {
        written += 1;
    }
    match store.claim_subnet(&network.name, network.subnet).await {
        Ok(true) => written += 1,
        Ok(false) => {}
        Err(e) if e.is_backend() => return Err(e),
        Err(e) => {
            warn!(network = %network.name, error = %e, "cannot republish the subnet claim")
        }
    }
    Ok(written)
}

/// A local endpoint's address allocation and record (as this node's), each unless
/// present.
async fn republish_endpoint(
    store: &Store,
    node: &str,
    endpoint: &Endpoint,
) -> Result<usize, StoreError> {
    let (kv, keys) = (store.kv(), store.keys());
    let mut written = 0;
    let allocation = IpAllocation {
        endpoint: endpoint.id.clone(),
        node: node.to_string(),
    };
    let ipam = keys.allocation(&endpoint.network, endpoint.ip);
    let value = serde_json::to_vec(&allocation).unwrap_or_default();
    if kv.put_cas(&ipam, &value, 0).await? {
        written += 1;
    }
    let mut endpoint = endpoint.clone();
    endpoint.node = node.to_string();
    let key = keys.endpoint(&endpoint.network, &endpoint.id);
    let value = serde_json::to_vec(&endpoint).unwrap_or_default();
    if kv.put_cas(&key, &value, 0).await? {
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("overlay-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn state(networks: &[&str]) -> ClusterState {
        ClusterState {
            networks: networks
                .iter()
                .enumerate()
                .map(|(i, name)| crate::store::Network {
                    name: name.to_string(),
                    subnet: format!("10.{i}.0.0/24").parse().unwrap(),
                    gateway: format!("10.{i}.0.1").parse().unwrap(),
                    vni: i as u32 + 1,
                    mtu: 1450,
                    egress: Default::default(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_store_that_lost_its_id_or_is_foreign_is_held_then_heals() {
        let dir = dir("judge");
        let mut identity = Identity::load(&dir, Duration::from_secs(10));
        let t0 = Instant::now();
        let id = ClusterId::generate();
        // First sight: learnt and remembered (0600).
        let (j, a) = identity.judge(Some(id.clone()), state(&["a", "b"]), t0);
        assert!(matches!(j, Judgement::Apply(_)));
        assert_eq!(a, Actions::default());
        assert_eq!(identity.trust(), Trust::Trusted);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(CLUSTER_ID_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Empty store: held, restore asked for.
        let (j, a) = identity.judge(None, state(&[]), t0);
        assert!(matches!(j, Judgement::Hold));
        assert_eq!(identity.trust(), Trust::Missing);
        let restored = a.restore.expect("restore");
        assert_eq!(restored.cluster, id.cluster);
        assert_ne!(restored.incarnation, id.incarnation);
        // Another cluster: held, nothing written.
        let (j, a) = identity.judge(Some(ClusterId::generate()), state(&[]), t0);
        assert!(matches!(j, Judgement::Hold));
        assert_eq!(a, Actions::default());
        assert_eq!(identity.trust(), Trust::Foreign);
        // Restored: republish, and the union is applied while healing.
        let (j, a) = identity.judge(Some(restored.clone()), state(&["a"]), t0);
        assert!(a.republish);
        assert_eq!(identity.trust(), Trust::Healing);
        let Judgement::Apply(merged) = j else {
            panic!("not applied")
        };
        assert_eq!(merged.networks.len(), 2, "nothing removed while healing");
        // After the heal period the store is the truth again.
        let later = t0 + Duration::from_secs(11);
        let (j, a) = identity.judge(Some(restored.clone()), state(&["a"]), later);
        assert!(!a.republish);
        assert_eq!(identity.trust(), Trust::Trusted);
        let Judgement::Apply(read) = j else {
            panic!("not applied")
        };
        assert_eq!(read.networks.len(), 1);
        // A restarted agent remembers the restored id.
        let again = Identity::load(&dir, Duration::from_secs(10));
        assert_eq!(again.cluster(), Some(&restored));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_agent_without_an_id_applies_what_it_reads() {
        let dir = dir("unknown");
        let mut identity = Identity::load(&dir, Duration::from_secs(10));
        let (j, _) = identity.judge(None, state(&["a"]), Instant::now());
        assert!(matches!(j, Judgement::Apply(_)));
        assert_eq!(identity.trust(), Trust::Unknown);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
