//! Garbage collection: what a crashed `run`/`attach`/`network create`, or a store outage
//! in the middle of one, left behind.
//!
//! Two passes, each run by the agent every collection period:
//!
//! - **Local** ([`collect_local`]): a record of [`crate::agent::local_state`] whose owner and
//!   command are gone (pid and start time), or a completed `attach` whose veth is gone,
//!   is collected: its veth and `run` namespace (names generated from the record, never
//!   read from the store), then its endpoint entry and addresses in the store (only
//!   entries naming this node and this endpoint), then the record itself, last, so a
//!   failed step is retried next period. It does not depend on what the store says, so
//!   it also runs while the store is away or untrusted (the store steps then wait).
//! - **Store** ([`Sweeper::sweep`]): entries nobody will ever remove, seen unchanged
//!   (same modify index) for a whole grace period, are deleted with check-and-set on
//!   that index: addresses whose endpoint never came (on this node: no local record;
//!   of a node that is gone: no endpoint entry), endpoint entries naming this node that
//!   this node has no record of, addresses and endpoint entries of a network that does
//!   not exist (a killed `network delete`), VNI and subnet claims without their network.
//!   It only runs while the store is trusted (see [`crate::store::identity`]).
//!
//! Everything collected is logged with what it was and why.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    str::FromStr,
    time::{Duration, Instant},
};

use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tracing::{info, warn};

use crate::{
    agent::local_state::{LocalEndpoint, LocalState, LocalStateError},
    dataplane::netlink::{self, NetlinkError},
    dataplane::netns::NetNs,
    store::backend::{KvBackend as _, KvPair, Record as _},
    store::consul::ConsulError,
    store::{decode, Endpoint, IpAllocation, Network, Store, StoreError, SubnetClaims},
};

pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Local(#[from] LocalStateError),
    #[error("namespace {name}: {source}")]
    Netns {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// What kind of thing was collected (the metric's label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A local endpoint (veth, namespace, its entries) whose owner is gone.
    LocalEndpoint,
    /// An address without its endpoint.
    Address,
    /// An endpoint entry naming this node that this node did not create.
    Endpoint,
    /// A VNI claim without its network.
    Vni,
    /// A subnet claim without its network.
    Subnet,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::LocalEndpoint,
        Kind::Address,
        Kind::Endpoint,
        Kind::Vni,
        Kind::Subnet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::LocalEndpoint => "local_endpoint",
            Kind::Address => "address",
            Kind::Endpoint => "endpoint",
            Kind::Vni => "vni",
            Kind::Subnet => "subnet",
        }
    }
}

/// Every interface of the namespace. A dump that the kernel interrupted because links
/// changed meanwhile (EBUSY, common while many containers start) is repeated.
pub async fn list_links_retrying(handle: &Handle) -> Result<Vec<netlink::LinkInfo>, NetlinkError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(2);
    loop {
        match netlink::list_links(handle).await {
            Err(NetlinkError::Request(rtnetlink::Error::NetlinkError(e)))
                if e.raw_code() == -libc::EBUSY && Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// The first process found in the network namespace mounted at `path`.
fn process_in_netns(path: &std::path::Path) -> Option<crate::agent::local_state::ProcessId> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = std::fs::metadata(path).ok()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if meta.ino() == ns.ino() && meta.dev() == ns.dev() {
            if let Ok(process) = crate::agent::local_state::ProcessId::of(pid) {
                return Some(process);
            }
        }
    }
    None
}

/// Once, when an agent first runs where an older one created endpoints without local
/// records (an upgrade): an endpoint entry naming this node is adopted only if the veth
/// this node would have generated for it exists here (proof that this node made it). A
/// `run` container (its `ovl-NETWORK-ID` namespace exists) gets the first process found
/// in that namespace as its command, so it is collected once that ends; an attached one
/// lives until its veth goes. Returns how many were adopted.
pub async fn adopt_unrecorded(
    handle: &Handle,
    node: &str,
    local: &LocalState,
    endpoints: &[Endpoint],
) -> usize {
    let links: BTreeSet<String> = match list_links_retrying(handle).await {
        Ok(links) => links.into_iter().map(|l| l.name).collect(),
        Err(e) => {
            warn!(error = %e, "cannot list interfaces to adopt older endpoints");
            return 0;
        }
    };
    let mut adopted = 0;
    for entry in endpoints.iter().filter(|e| e.node == node) {
        if local.get(&entry.network, &entry.id).is_some() {
            continue;
        }
        let Ok(mut record) = LocalEndpoint::new(
            &entry.network,
            &entry.id,
            crate::agent::local_state::Kind::Attach,
        ) else {
            continue;
        };
        if !links.contains(&record.host_ifname()) {
            continue;
        }
        record.owner = None;
        let netns = crate::agent::local_state::run_netns_name(&entry.network, &entry.id);
        let netns_path = std::path::Path::new(crate::dataplane::netns::NETNS_RUN_DIR).join(&netns);
        if netns_path.exists() {
            record.kind = crate::agent::local_state::Kind::Run;
            record.command = process_in_netns(&netns_path);
        }
        let mut endpoint = entry.clone();
        endpoint.ifname = record.host_ifname();
        record.ip = Some(endpoint.ip);
        record.endpoint = Some(endpoint);
        match local.create(&record) {
            Ok(()) => {
                adopted += 1;
                info!(network = %record.network, endpoint = %record.id, kind = ?record.kind, command = ?record.command, "adopted an endpoint created before local records existed");
            }
            Err(e) => {
                warn!(network = %record.network, endpoint = %record.id, error = %e, "cannot adopt an older endpoint")
            }
        }
    }
    adopted
}

/// The IPAM key prefix of a network (layout in [`crate::store`]).
fn ipam_prefix(store: &Store, network: &str) -> String {
    format!("{}ipam/{network}/", store.prefix())
}

/// Removes everything `record` covers, the record last. `why` goes to the log.
pub async fn collect_local(
    store: &Store,
    handle: &Handle,
    node: &str,
    local: &LocalState,
    record: &LocalEndpoint,
    why: &str,
) -> Result<(), GcError> {
    // Local resources first: they go whatever the store's state.
    let ifname = record.host_ifname();
    let mut removed = Vec::new();
    if let Ok(link) = netlink::link_by_name(handle, &ifname).await {
        netlink::delete_link(handle, link.index).await?;
        removed.push(format!("veth {ifname}"));
    }
    if let Some(name) = record.netns_name() {
        if let Ok(ns) = NetNs::open(&name) {
            ns.delete().map_err(|source| GcError::Netns {
                name: name.clone(),
                source,
            })?;
            removed.push(format!("namespace {name}"));
        }
        // The resolv.conf `run` wrote for it (a killed `run` could not remove it).
        if let Err(e) = crate::agent::dns::remove_netns_resolv_conf(&name) {
            warn!(error = %e, "cannot remove the container's resolv.conf");
        }
    }
    // Then its entries: only those naming this node and this endpoint.
    if let Some(entry) = store.get_endpoint(&record.network, &record.id).await? {
        if entry.node == node {
            store.delete_endpoint(&record.network, &record.id).await?;
            removed.push("endpoint entry".to_string());
        }
    }
    let prefix = ipam_prefix(store, &record.network);
    for pair in store.kv().list(&prefix).await? {
        let Ok(allocation) = decode::<IpAllocation>(&pair) else {
            continue;
        };
        if allocation.endpoint == record.id
            && allocation.node == node
            && store.kv().delete_cas(&pair.key, pair.modify_index).await?
        {
            removed.push(format!(
                "address {}",
                pair.key.strip_prefix(&prefix).unwrap_or(&pair.key)
            ));
        }
    }
    local.remove(&record.network, &record.id)?;
    info!(
        network = %record.network,
        endpoint = %record.id,
        kind = ?record.kind,
        removed = ?removed,
        "collected a left-over local endpoint: {why}"
    );
    Ok(())
}

/// Why a record is left over, if it is (None: in use, or `veth_gone` unknown).
pub fn left_over(record: &LocalEndpoint, veth_exists: bool) -> Option<&'static str> {
    if record.committed() {
        (!veth_exists).then_some("its container is gone (veth removed)")
    } else if record.has_live_process() {
        None
    } else if record.owner.is_some() && record.endpoint.is_none() && record.command.is_none() {
        Some("the command that was setting it up died before it finished")
    } else {
        Some("its `run`/`attach` process and its command are gone")
    }
}

/// The store pass, with what it has seen so far (key -> modify index, first seen).
#[derive(Debug, Default)]
pub struct Sweeper {
    seen: HashMap<String, (u64, Instant)>,
    /// Completed `attach`es whose endpoint entry is gone from the store: since when.
    unlisted: HashMap<(String, String), Instant>,
}

/// One store entry that may be garbage.
struct Candidate {
    key: String,
    index: u64,
    kind: Kind,
    what: String,
    why: &'static str,
}

impl Sweeper {
    /// Whether `key` at `index` has been a candidate for at least `grace`.
    fn ripe(&mut self, key: &str, index: u64, now: Instant, grace: Duration) -> bool {
        let entry = self.seen.entry(key.to_string()).or_insert((index, now));
        if entry.0 != index {
            *entry = (index, now);
        }
        now.duration_since(entry.1) >= grace
    }

    /// Completed `attach`es (veth still there) whose endpoint entry has been absent from
    /// a trusted store for `grace`: removed by hand or with its network; nothing else
    /// would ever remove their veth and record. `listed` holds the (network, id) of the
    /// store's endpoint entries naming this node.
    pub fn unlisted_attachments<'a>(
        &mut self,
        records: impl Iterator<Item = &'a LocalEndpoint>,
        listed: &BTreeSet<(String, String)>,
        now: Instant,
        grace: Duration,
    ) -> Vec<&'a LocalEndpoint> {
        let mut ripe = Vec::new();
        let mut still = BTreeSet::new();
        for record in records.filter(|r| r.committed()) {
            let key = (record.network.clone(), record.id.clone());
            if listed.contains(&key) {
                continue;
            }
            let since = *self.unlisted.entry(key.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                ripe.push(record);
            }
            still.insert(key);
        }
        self.unlisted.retain(|key, _| still.contains(key));
        ripe
    }

    /// One pass over the store. Returns what was collected.
    pub async fn sweep(
        &mut self,
        store: &Store,
        node: &str,
        local: &LocalState,
        grace: Duration,
    ) -> Result<Vec<Kind>, GcError> {
        let prefix = store.prefix().to_string();
        let pairs = store.kv().list(&prefix).await?;
        let (records, _) = local.load_all();
        let inventory = Inventory::read(&prefix, node, &pairs, &records);
        let (candidates, subnet_orphans) = inventory.candidates(&pairs);
        let now = Instant::now();
        let mut alive_keys: BTreeSet<String> = BTreeSet::new();
        let mut collected = Vec::new();
        for candidate in candidates {
            alive_keys.insert(candidate.key.clone());
            if self.ripe(&candidate.key, candidate.index, now, grace)
                && collect_candidate(store, &candidate).await
            {
                collected.push(candidate.kind);
            }
        }
        for (cidr, owner) in subnet_orphans {
            let key = format!("subnet:{cidr}={owner}");
            alive_keys.insert(key.clone());
            if !self.ripe(&key, 0, now, grace) {
                continue;
            }
            let Ok(subnet) = Ipv4Network::from_str(&cidr) else {
                continue;
            };
            store.unclaim_subnet(subnet, &owner).await;
            warn!(subnet = %cidr, network = %owner, "collected a left-over subnet claim: no such network holds it");
            collected.push(Kind::Subnet);
        }
        self.seen.retain(|key, _| alive_keys.contains(key));
        Ok(collected)
    }
}

/// Deletes a ripe candidate if it is still unchanged; returns whether it was deleted.
async fn collect_candidate(store: &Store, candidate: &Candidate) -> bool {
    match store.kv().delete_cas(&candidate.key, candidate.index).await {
        Ok(true) => {
            warn!(what = %candidate.what, key = %candidate.key, "collected a left-over store entry: {}", candidate.why);
            true
        }
        Ok(false) => false,
        Err(e) => {
            warn!(key = %candidate.key, error = %e, "cannot collect a left-over store entry");
            false
        }
    }
}

/// What one read of the store holds that its entries are judged against.
struct Inventory<'a> {
    prefix: &'a str,
    node: &'a str,
    /// (network, id) of this node's local records.
    recorded: BTreeSet<(&'a str, &'a str)>,
    networks: BTreeMap<String, Network>,
    live_nodes: BTreeSet<String>,
    endpoints: BTreeMap<(String, String), Endpoint>,
}

impl<'a> Inventory<'a> {
    fn read(
        prefix: &'a str,
        node: &'a str,
        pairs: &[KvPair],
        records: &'a [LocalEndpoint],
    ) -> Self {
        let mut inventory = Inventory {
            prefix,
            node,
            recorded: records
                .iter()
                .map(|r| (r.network.as_str(), r.id.as_str()))
                .collect(),
            networks: BTreeMap::new(),
            live_nodes: BTreeSet::new(),
            endpoints: BTreeMap::new(),
        };
        for pair in pairs {
            let rest = &pair.key[prefix.len()..];
            if let Some(name) = rest.strip_prefix("networks/") {
                if let Ok(network) = decode::<Network>(pair) {
                    if network.name == name {
                        inventory.networks.insert(name.to_string(), network);
                    }
                }
            } else if let Some(name) = rest.strip_prefix("nodes/") {
                if pair.session.is_some() {
                    inventory.live_nodes.insert(name.to_string());
                }
            } else if rest.starts_with("endpoints/") {
                if let Ok(endpoint) = decode::<Endpoint>(pair) {
                    let key = (endpoint.network.clone(), endpoint.id.clone());
                    inventory.endpoints.insert(key, endpoint);
                }
            }
        }
        inventory
    }

    /// The entries that look left over, and the subnet claims (cidr, owner) without
    /// their network.
    fn candidates(&self, pairs: &[KvPair]) -> (Vec<Candidate>, Vec<(String, String)>) {
        let mut candidates = Vec::new();
        let mut subnet_orphans = Vec::new();
        for pair in pairs {
            let rest = &pair.key[self.prefix.len()..];
            let candidate = if let Some(path) = rest.strip_prefix("endpoints/") {
                self.endpoint_candidate(pair, path)
            } else if let Some(path) = rest.strip_prefix("ipam/") {
                self.address_candidate(pair, path)
            } else if let Some(vni) = rest.strip_prefix("vni/") {
                self.vni_candidate(pair, vni)
            } else {
                if rest == "subnets" {
                    subnet_orphans.extend(self.subnet_orphans(pair));
                }
                None
            };
            candidates.extend(candidate);
        }
        (candidates, subnet_orphans)
    }

    fn endpoint_candidate(&self, pair: &KvPair, path: &str) -> Option<Candidate> {
        let (network, id) = path.split_once('/')?;
        let endpoint = decode::<Endpoint>(pair).ok()?;
        let why = if !self.networks.contains_key(network) {
            "its network does not exist"
        } else if endpoint.node == self.node && !self.recorded.contains(&(network, id)) {
            "it names this node, which has no record of creating it"
        } else {
            return None;
        };
        Some(Candidate {
            key: pair.key.clone(),
            index: pair.modify_index,
            kind: Kind::Endpoint,
            what: format!("endpoint {network}/{id} (node {})", endpoint.node),
            why,
        })
    }

    fn address_candidate(&self, pair: &KvPair, path: &str) -> Option<Candidate> {
        let (network, ip) = path.split_once('/')?;
        let ip = Ipv4Addr::from_str(ip).ok()?;
        let allocation = decode::<IpAllocation>(pair).ok()?;
        let why = if !self.networks.contains_key(network) {
            "its network does not exist"
        } else if allocation.node == self.node {
            (!self
                .recorded
                .contains(&(network, allocation.endpoint.as_str())))
            .then_some("it names this node, which has no record of its endpoint")?
        } else {
            let has_endpoint = self
                .endpoints
                .get(&(network.to_string(), allocation.endpoint.clone()))
                .is_some_and(|e| e.ip == ip);
            (!has_endpoint && !self.live_nodes.contains(&allocation.node))
                .then_some("its endpoint never came and its node is gone")?
        };
        Some(Candidate {
            key: pair.key.clone(),
            index: pair.modify_index,
            kind: Kind::Address,
            what: format!(
                "address {network}/{ip} (endpoint {}, node {})",
                allocation.endpoint, allocation.node
            ),
            why,
        })
    }

    fn vni_candidate(&self, pair: &KvPair, vni: &str) -> Option<Candidate> {
        let owner = pair.value_str();
        let held = (self.networks.get(&owner)).is_some_and(|n| n.vni.to_string() == vni);
        (!held).then(|| Candidate {
            key: pair.key.clone(),
            index: pair.modify_index,
            kind: Kind::Vni,
            what: format!("VNI {vni} claimed by {owner:?}"),
            why: "no such network holds it",
        })
    }

    fn subnet_orphans(&self, pair: &KvPair) -> Vec<(String, String)> {
        let Ok(claims) = decode::<SubnetClaims>(pair) else {
            return Vec::new();
        };
        claims
            .into_iter()
            .filter(|(cidr, owner)| {
                let holder = self.networks.get(owner);
                holder.is_none_or(|n| n.subnet.to_string() != *cidr)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::local_state::{Kind as RecordKind, ProcessId};

    #[test]
    fn candidates_ripen_after_the_grace_period_unless_they_change() {
        let mut sweeper = Sweeper::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        assert!(!sweeper.ripe("k", 7, t0, grace));
        assert!(!sweeper.ripe("k", 7, t0 + Duration::from_secs(4), grace));
        // Written again: the clock starts over.
        assert!(!sweeper.ripe("k", 8, t0 + Duration::from_secs(6), grace));
        assert!(sweeper.ripe("k", 8, t0 + Duration::from_secs(11), grace));
    }

    #[test]
    fn attachments_missing_from_the_store_ripen_after_the_grace_period() {
        let mut attached = LocalEndpoint::new("net1", "x", RecordKind::Attach).unwrap();
        attached.owner = None;
        let running = LocalEndpoint::new("net1", "y", RecordKind::Run).unwrap();
        let records = [attached.clone(), running];
        let mut sweeper = Sweeper::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let none = BTreeSet::new();
        assert!(sweeper
            .unlisted_attachments(records.iter(), &none, t0, grace)
            .is_empty());
        let ripe = sweeper.unlisted_attachments(records.iter(), &none, t0 + grace, grace);
        assert_eq!(ripe, vec![&attached], "only the completed attach");
        // Listed again: the clock starts over.
        let listed = BTreeSet::from([("net1".to_string(), "x".to_string())]);
        assert!(sweeper
            .unlisted_attachments(records.iter(), &listed, t0 + grace, grace)
            .is_empty());
        assert!(sweeper
            .unlisted_attachments(records.iter(), &none, t0 + grace * 2, grace)
            .is_empty());
    }

    #[test]
    fn a_record_is_left_over_only_without_a_live_process() {
        let mut record = LocalEndpoint::new("net1", "web", RecordKind::Run).unwrap();
        assert_eq!(left_over(&record, false), None, "owner (this test) lives");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = ProcessId::of(child.id()).unwrap();
        child.wait().unwrap();
        record.owner = Some(dead);
        assert!(left_over(&record, true).is_some());
        record.command = Some(ProcessId::current().unwrap());
        assert_eq!(left_over(&record, true), None, "its command lives");
        let mut attach = LocalEndpoint::new("net1", "x", RecordKind::Attach).unwrap();
        attach.owner = None;
        assert_eq!(left_over(&attach, true), None);
        assert!(left_over(&attach, false).is_some());
    }
}
