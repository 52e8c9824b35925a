//! The agent's copy of the followed keys ([`Mirror`]): a feed snapshot replaces it, a
//! batch of changes edits it, and every full judgement after the first read is made from
//! it (never from a new read of the store). Besides the records it keeps the one index a
//! changed endpoint needs to be judged on its own: which endpoint records claim each
//! (network, address), so that the one-endpoint-per-address rule is applied to that
//! address's claimants only ([`Mirror::take_changes`] says which addresses and node
//! records a batch touched, or that it needs the full path).
//!
//! It is most of an agent's memory (two records per endpoint), so it keeps of each
//! record only what the record rules read ([`Stored`]), the index shares the records'
//! keys, and a snapshot is built into full tree nodes.
use std::{
    borrow::Borrow,
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use crate::{
    store::backend::{KvPair, Record},
    store::feed::{KvChange, Versions},
    store::keys::Keys,
};

/// The sections under the prefix that the record rules read
/// ([`crate::store::records::parse_snapshot`]); other keys (`applied/`, a store's own
/// bookkeeping) change nothing an agent applies.
const JUDGED_SECTIONS: [&str; 6] = ["config", "endpoints", "ipam", "networks", "nodes", "vni"];

/// A (network, address) that endpoint records claim.
pub(super) type Address = (String, Ipv4Addr);

/// One followed record as the mirror keeps it: what the record rules read
/// ([`Record`]), ordered and looked up by its key. A [`KvPair`] as decoded takes 104
/// bytes before its key and value, with spare capacity in both.
#[derive(Debug)]
pub(super) struct Stored {
    /// Shared with the claims index.
    key: Arc<str>,
    value: Box<[u8]>,
    create_index: u64,
    modify_index: u64,
    session: Option<Box<str>>,
}

impl From<KvPair> for Stored {
    fn from(pair: KvPair) -> Self {
        Self {
            key: pair.key.into(),
            value: pair.value.into_boxed_slice(),
            create_index: pair.create_index,
            modify_index: pair.modify_index,
            session: pair.session.map(String::into_boxed_str),
        }
    }
}

#[cfg(test)]
impl Stored {
    /// The record as a pair (what a snapshot is made of).
    pub fn to_pair(&self) -> KvPair {
        KvPair {
            key: self.key.to_string(),
            value: self.value.to_vec(),
            create_index: self.create_index,
            modify_index: self.modify_index,
            lock_index: 0,
            flags: 0,
            session: self.session.as_deref().map(str::to_string),
        }
    }
}

impl Record for Stored {
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
    fn create_index(&self) -> u64 {
        self.create_index
    }
    fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Stored {}
impl PartialOrd for Stored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Stored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}
impl Borrow<str> for Stored {
    fn borrow(&self) -> &str {
        &self.key
    }
}

/// The keys of the endpoint records claiming one address (in any network: the
/// network is in the key). Almost always one.
#[derive(Debug)]
enum Claimants {
    One(Arc<str>),
    Many(Vec<Arc<str>>),
}

impl Claimants {
    fn keys(&self) -> &[Arc<str>] {
        match self {
            Self::One(key) => std::slice::from_ref(key),
            Self::Many(keys) => keys,
        }
    }

    fn add(&mut self, key: Arc<str>) {
        match self {
            Self::One(first) => *self = Self::Many(vec![first.clone(), key]),
            Self::Many(keys) => keys.push(key),
        }
    }

    /// Takes `key` out; `false` when none is left.
    fn remove(&mut self, key: &str) -> bool {
        match self {
            Self::One(only) => &**only != key,
            Self::Many(keys) => {
                keys.retain(|k| &**k != key);
                match keys.as_slice() {
                    [] => false,
                    [last] => {
                        *self = Self::One(last.clone());
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

/// The part of an endpoint record that says which address it claims (the rest is
/// judged by the record rules).
#[derive(serde::Deserialize)]
struct Claim {
    ip: Ipv4Addr,
}

/// What a batch of changes touched.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Scope {
    /// Something only the full path can judge (a network, config or VNI key, this
    /// node's own node record).
    pub full: bool,
    /// The (network, id) of records naming this node that the batch touched: the full
    /// path judges them when this node created them (it forwards for its own containers
    /// from its local records); a record naming this node that it did not create gets
    /// no entry on either path.
    pub own: BTreeSet<(String, String)>,
    /// Addresses whose claimants must be judged again.
    pub addresses: BTreeSet<Address>,
    /// Every endpoint and IPAM key the batch changed.
    pub keys: BTreeSet<String>,
    /// Every record of another node the batch changed (joined, left, re-registered).
    pub nodes: BTreeSet<String>,
}

impl Scope {
    /// Whether the batch changed nothing an agent applies.
    pub fn is_empty(&self) -> bool {
        !self.full && self.keys.is_empty() && self.nodes.is_empty()
    }
}

/// A key that this copy and the store hold at different indexes (`None`: not held).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Difference {
    pub key: String,
    pub held: Option<u64>,
    pub stored: Option<u64>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |index: Option<u64>| index.map_or("absent".to_string(), |i| format!("index {i}"));
        write!(
            f,
            "{}: {} here, {} in the store",
            self.key,
            at(self.held),
            at(self.stored)
        )
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Mirror {
    keys: Keys,
    records: BTreeSet<Stored>,
    /// address -> the keys of the endpoint records claiming it, in any network (a
    /// network name per entry would cost more than the rest of the entry).
    claims: HashMap<Ipv4Addr, Claimants>,
    synced: bool,
}

impl Mirror {
    pub fn new(prefix: &str) -> Self {
        Self {
            keys: Keys::new(prefix),
            records: BTreeSet::new(),
            claims: HashMap::new(),
            synced: false,
        }
    }

    /// Whether a snapshot was taken yet.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Forgets everything until the next snapshot: a fresh read showed the store is not
    /// what this copy was taken from (until then nothing is judged from it, and the
    /// changes that arrive are dropped: the snapshot covers them).
    pub fn invalidate(&mut self) {
        self.replace(Vec::new());
        self.synced = false;
    }

    /// Replaces everything with a snapshot.
    pub fn replace(&mut self, pairs: Vec<KvPair>) {
        // The old copy goes first: never two copies of the cluster at once.
        self.records = BTreeSet::new();
        self.claims = HashMap::new();
        // Collected, not inserted one by one: a set built from a whole sequence fills
        // its tree nodes (inserted in key order, they stay about half full).
        self.records = (pairs.into_iter())
            .filter(|pair| JUDGED_SECTIONS.contains(&self.section(&pair.key)))
            .map(Stored::from)
            .collect();
        for record in &self.records {
            if let Some(ip) = claimed_ip(&self.keys, record) {
                add_claim(&mut self.claims, ip, record.key.clone());
            }
        }
        self.claims.shrink_to_fit();
        self.synced = true;
    }

    /// Applies a batch of changes and says what it touched; `node` is this node (the
    /// records naming it are listed in [`Scope::own`]).
    pub fn take_changes(&mut self, changes: Vec<KvChange>, node: &str) -> Scope {
        let mut scope = Scope::default();
        if !self.synced {
            return scope;
        }
        for change in changes {
            let key = change.key().to_string();
            if !JUDGED_SECTIONS.contains(&self.section(&key)) {
                continue;
            }
            let old = self.remove(&key);
            if let KvChange::Put(pair) = change {
                self.put(pair);
            }
            let section = self.section(&key);
            match section {
                "endpoints" => {
                    for record in old.iter().chain(self.records.get(key.as_str())) {
                        scope.own.extend(own_endpoint(record, node));
                        scope.addresses.extend(self.claim(record));
                    }
                    scope.keys.insert(key);
                }
                "ipam" => {
                    // A key that names no address is only a rejected record.
                    if let Some(address) = self.allocation_address(&key) {
                        scope.addresses.insert(address);
                    }
                    scope.keys.insert(key);
                }
                // This node's own record keeps the full path: it changes only when this
                // agent registers, once per start or lost session.
                "nodes" if key != self.keys.node(node) => {
                    scope.nodes.insert(key);
                }
                _ => scope.full = true,
            }
        }
        scope
    }

    /// The first key (in key order) on which this copy and the store's `versions` of
    /// the followed keys disagree (`None`: it holds exactly the judged records the
    /// store held at their index, but for what changed since). The copy may be ahead
    /// of the versions' index: a record written after it (its index is newer), and a
    /// key in `deleted_since` (a delete applied after it), do not count. Both are
    /// sorted by key.
    pub fn first_difference(
        &self,
        versions: &Versions,
        deleted_since: &BTreeSet<String>,
    ) -> Option<Difference> {
        let difference = |key: &str, held, stored| {
            Some(Difference {
                key: key.to_string(),
                held,
                stored,
            })
        };
        let mut held = (self.records.iter())
            .map(|r| (&*r.key, r.modify_index))
            .filter(|(_, index)| *index <= versions.index)
            .peekable();
        let mut stored = (versions.keys.iter())
            .filter(|(key, _)| JUDGED_SECTIONS.contains(&self.section(key)))
            .map(|(key, index)| (key.as_str(), *index))
            .peekable();
        loop {
            match (held.peek().copied(), stored.peek().copied()) {
                (None, None) => return None,
                (Some((key, index)), Some((stored_key, stored_index))) if key == stored_key => {
                    if index != stored_index {
                        return difference(key, Some(index), Some(stored_index));
                    }
                    held.next();
                    stored.next();
                }
                (Some((key, index)), Some((stored_key, _))) if key < stored_key => {
                    return difference(key, Some(index), None)
                }
                (Some((key, index)), None) => return difference(key, Some(index), None),
                (_, Some((stored_key, stored_index))) => {
                    // Held with a newer index (rewritten since), or deleted since.
                    let newer = self.records.get(stored_key).map(|r| r.modify_index);
                    if newer.is_none_or(|index| index <= versions.index)
                        && !deleted_since.contains(stored_key)
                    {
                        return difference(stored_key, newer, Some(stored_index));
                    }
                    stored.next();
                }
            }
        }
    }

    /// Every record, for a full judgement.
    pub fn pairs(&self) -> impl Iterator<Item = &Stored> + Clone {
        self.records.iter()
    }

    pub fn get(&self, key: &str) -> Option<&Stored> {
        self.records.get(key)
    }

    /// The records under one section (`networks`, `vni`, ...).
    pub fn section_pairs<'a>(&'a self, section: &str) -> impl Iterator<Item = &'a Stored> + 'a {
        let start = format!("{}{section}/", self.keys.prefix());
        self.records
            .range::<str, _>((
                std::ops::Bound::Included(start.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |r| r.key.starts_with(&start))
    }

    /// The keys of the endpoint records claiming `address`.
    pub fn claimants<'a>(&'a self, address: &'a Address) -> impl Iterator<Item = &'a str> {
        let claimants = self.claims.get(&address.1).map(Claimants::keys);
        (claimants.into_iter().flatten())
            .map(|key| &**key)
            .filter(|key| self.keys.parse_endpoint_network(key) == Some(address.0.as_str()))
    }

    /// The IPAM key of `address`.
    pub fn allocation_key(&self, address: &Address) -> String {
        self.keys.allocation(&address.0, address.1)
    }

    /// Stores `pair` (only what the record rules judge: not the `applied/`
    /// acknowledgements, nor anything else outside [`JUDGED_SECTIONS`]).
    fn put(&mut self, pair: KvPair) {
        if !JUDGED_SECTIONS.contains(&self.section(&pair.key)) {
            return;
        }
        let record = Stored::from(pair);
        if let Some(ip) = claimed_ip(&self.keys, &record) {
            add_claim(&mut self.claims, ip, record.key.clone());
        }
        self.records.replace(record);
    }

    fn remove(&mut self, key: &str) -> Option<Stored> {
        let old = self.records.take(key)?;
        if let Some(ip) = claimed_ip(&self.keys, &old) {
            if let Some(claimants) = self.claims.get_mut(&ip) {
                if !claimants.remove(key) {
                    self.claims.remove(&ip);
                }
            }
        }
        Some(old)
    }

    fn section<'k>(&self, key: &'k str) -> &'k str {
        let rest = key.strip_prefix(self.keys.prefix()).unwrap_or_default();
        rest.split('/').next().unwrap_or_default()
    }

    /// The address an endpoint record claims (`None`: not an endpoint record, or one
    /// whose address cannot be read, which the record rules reject on its own).
    fn claim(&self, record: &Stored) -> Option<Address> {
        let network = self.keys.parse_endpoint_network(&record.key)?;
        Some((network.to_string(), claimed_ip(&self.keys, record)?))
    }

    fn allocation_address(&self, key: &str) -> Option<Address> {
        let rest = key.strip_prefix(&format!("{}ipam/", self.keys.prefix()))?;
        let (network, _) = rest.split_once('/')?;
        let ip = self.keys.parse_allocation(network, key)?;
        Some((network.to_string(), ip))
    }
}

/// The address an endpoint record claims, without its network (the claims index's key;
/// `None` as for [`Mirror::claim`]).
fn claimed_ip(keys: &Keys, record: &Stored) -> Option<Ipv4Addr> {
    keys.parse_endpoint_network(&record.key)?;
    let claim: Claim = serde_json::from_slice(&record.value).ok()?;
    Some(claim.ip)
}

fn add_claim(claims: &mut HashMap<Ipv4Addr, Claimants>, ip: Ipv4Addr, key: Arc<str>) {
    match claims.entry(ip) {
        std::collections::hash_map::Entry::Occupied(mut claimants) => claimants.get_mut().add(key),
        std::collections::hash_map::Entry::Vacant(entry) => {
            entry.insert(Claimants::One(key));
        }
    }
}

/// The (network, id) of an endpoint record that places its endpoint on `node`.
fn own_endpoint(record: &Stored, node: &str) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Placement {
        node: String,
        network: String,
        id: String,
    }
    let placement = serde_json::from_slice::<Placement>(&record.value).ok()?;
    (placement.node == node).then_some((placement.network, placement.id))
}
