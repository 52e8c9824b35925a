//! An etcd v3 client for the cluster state, offering the primitives the Consul client
//! ([`crate::store::consul`]) offers, with etcd's own semantics:
//!
//! | Consul | etcd (here) |
//! | --- | --- |
//! | `ModifyIndex`, `X-Consul-Index` | `mod_revision`, the store revision |
//! | `?cas=0` (create only) | a transaction on `create_revision == 0` ([`EtcdClient::create`]) |
//! | `?cas=N` | a transaction on `mod_revision == N` ([`EtcdClient::put_cas`]) |
//! | session with `Behavior=delete` | a lease: its keys go when it expires ([`EtcdClient::lease_grant`], [`LeaseKeepAlive`]) |
//! | `?acquire=session` | create-only put bound to the lease ([`EtcdClient::acquire`]) |
//! | blocking query from an index | a watch from a revision ([`PrefixWatch`], [`EtcdClient::list_blocking`]) |
//!
//! The client talks to one member at a time and moves on to the next endpoint when it
//! is unavailable; calls are retried with bounded backoff while the cluster
//! is unavailable, and a transaction retried after an attempt that may have applied
//! recognises its own write (see `EtcdClient::txn`). Every failure is an [`EtcdError`]; a cluster without quorum is
//! [`EtcdError::Unavailable`].
mod backend;
mod config;
mod error;
mod lease;
mod range;
mod watch;
mod wire;

pub use backend::parse_lease;
pub use config::{
    parse_address, EtcdAddress, EtcdConfig, TlsFiles, DEFAULT_PORT, ENV_CACERT, ENV_CERT,
    ENV_ENDPOINTS, ENV_KEY,
};
pub use error::EtcdError;
pub use lease::{LeaseId, LeaseInfo, LeaseKeepAlive};
pub use range::KeyRange;
pub use watch::{PrefixWatch, ResyncReason, WatchEvent, WatchUpdate};

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, KeyValue, PutOptions, TlsOptions,
    Txn, TxnOp,
};
use tracing::debug;

/// One key as etcd stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (0 never: a missing key has no entry).
    pub create_revision: i64,
    /// The revision of the last write to the key: what [`EtcdClient::put_cas`] compares.
    pub mod_revision: i64,
    /// Writes since creation.
    pub version: i64,
    /// The lease that holds the key, if any.
    pub lease: Option<LeaseId>,
}

impl KvEntry {
    fn from_kv(kv: &KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
        }
    }

    /// The value as UTF-8 text (lossy).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// The keys under a prefix as of one store revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<KvEntry>,
    /// The store revision the listing was read at; a watch from `revision + 1` misses
    /// nothing that happened after it.
    pub revision: i64,
}

/// What one member says about itself and the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub endpoint: String,
    pub member_id: u64,
    /// The member id of the raft leader as this member knows it; 0 while there is none.
    pub leader_id: u64,
    pub raft_term: u64,
    pub revision: i64,
    pub version: String,
}

impl MemberStatus {
    pub fn is_leader(&self) -> bool {
        self.leader_id != 0 && self.leader_id == self.member_id
    }
}

/// The state of a key after a transaction of ours applied, to recognise it after a
/// retry.
enum Outcome<'a> {
    Holds {
        value: &'a [u8],
        lease: Option<LeaseId>,
    },
    Gone,
}

/// The etcd v3 client. Cheap to clone (clones share the connections and the choice of
/// member).
///
/// It keeps one connection per endpoint and talks to one member at a time; when that
/// member is unavailable (down, or without a leader) the call moves on to the next
/// endpoint at once, and backs off only after every endpoint failed. (A single
/// balanced gRPC channel over all endpoints keeps sending a share of the calls to a
/// dead member: its connections fail lazily.)
#[derive(Clone)]
pub struct EtcdClient {
    members: Arc<[Client]>,
    /// Index into `members` of the member calls go to.
    current: Arc<AtomicUsize>,
    config: EtcdConfig,
    endpoints: String,
    /// Encoded bytes of the range answers and watch messages read (shared by clones).
    bytes_read: Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.endpoints)
            .field("config", &self.config)
            .finish()
    }
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_timeout(config.request_timeout)
        .with_connect_timeout(config.connect_timeout)
        // Notices a member that vanished without closing its connections.
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
        // A member without a leader refuses at once ("no leader") instead of letting a
        // request wait out its timeout: a lost quorum is reported quickly.
        .with_require_leader(true);
    if config.address.tls {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.tls.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(config::read_pem(
                "CA", ca,
            )?));
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                config::read_pem("certificate", cert)?,
                config::read_pem("key", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

impl EtcdClient {
    /// A client for the cluster `config` names. Connections are made lazily, so this
    /// succeeds while members are down; the first call reports them.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        let endpoints = config.address.display();
        let options = connect_options(&config)?;
        let mut members = Vec::new();
        for url in config.address.urls() {
            let client = Client::connect([url], Some(options.clone()))
                .await
                .map_err(|e| EtcdError::from_client(&endpoints, "connect", e))?;
            members.push(client);
        }
        Ok(Self {
            members: members.into(),
            current: Arc::new(AtomicUsize::new(0)),
            config,
            endpoints,
            bytes_read: Arc::default(),
        })
    }

    /// The member calls go to now, with its index for [`EtcdClient::failed_over`].
    fn member(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        (i, self.members[i].clone())
    }

    /// After attempt number `attempt` (1-based) failed on member `member` with `err`:
    /// false when the error is final; else moves on to the next member (unless another
    /// call already did) and waits when every member has been tried in this round.
    async fn failed_over(
        &self,
        member: usize,
        attempt: u32,
        op: &'static str,
        err: &EtcdError,
    ) -> bool {
        let n = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        if !err.is_unavailable() || attempt >= self.config.max_attempts.saturating_mul(n) {
            return false;
        }
        let next = (member + 1) % self.members.len();
        let _ = self
            .current
            .compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
        debug!(op, attempt, member, error = %err, "etcd member unavailable; trying the next");
        if attempt.is_multiple_of(n) {
            tokio::time::sleep(backoff(attempt / n)).await;
        }
        true
    }

    /// `etcd://a:2379,b:2379` (or `etcds://`), for messages.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// Runs an idempotent `call`, failing over between members and retrying while the
    /// cluster is unavailable (`max_attempts` rounds over the members, with backoff
    /// between rounds: 100 ms doubling, at most 1 s).
    async fn call<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        let mut reasons = UnavailableReasons::new(self.members.len());
        loop {
            let (member, client) = self.member();
            let err = match call(client).await {
                Ok(v) => return Ok(v),
                Err(e) => EtcdError::from_client(&self.endpoints, op, e),
            };
            reasons.note(member, &err);
            if !self.failed_over(member, attempt, op, &err).await {
                return Err(reasons.summarise(err, &self.config.address.endpoints));
            }
            attempt += 1;
        }
    }

    fn check_key(key: &str) -> Result<(), EtcdError> {
        if key.is_empty() {
            return Err(EtcdError::InvalidArgument("empty etcd key".to_string()));
        }
        Ok(())
    }

    // ---- reads ----

    /// The key, or `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<KvEntry>, EtcdError> {
        Self::check_key(key)?;
        let resp = self
            .call("get", |mut c| async move { c.get(key, None).await })
            .await?;
        self.count_read(wire::get_response_len(&resp));
        Ok(resp.kvs().first().map(KvEntry::from_kv))
    }

    /// Every key under `prefix`, sorted by key, with the revision read at. An empty
    /// prefix lists the whole keyspace.
    pub async fn list(&self, prefix: &str) -> Result<Listing, EtcdError> {
        self.read_pages(&KeyRange::prefix(prefix), false, 0).await
    }

    /// The key names under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, EtcdError> {
        let listing = self.read_pages(&KeyRange::prefix(prefix), true, 0).await?;
        Ok(listing.entries.into_iter().map(|e| e.key).collect())
    }

    // ---- writes ----

    /// Sets the value unconditionally (dropping any lease the key had); returns the
    /// revision of the write.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<i64, EtcdError> {
        Self::check_key(key)?;
        let resp = self
            .call("put", |mut c| async move { c.put(key, value, None).await })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Creates the key only if it does not exist (a transaction on
    /// `create_revision == 0`, Consul's `cas=0`). Returns whether it wrote.
    pub async fn create(&self, key: &str, value: &[u8]) -> Result<bool, EtcdError> {
        self.txn_put(
            "create",
            key,
            value,
            Compare::create_revision(key, CompareOp::Equal, 0),
            None,
        )
        .await
    }

    /// Writes only if the key's `mod_revision` is `mod_revision`; 0 means "only if the
    /// key does not exist" (as Consul's `cas=0`). Returns whether it wrote.
    pub async fn put_cas(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
    ) -> Result<bool, EtcdError> {
        if mod_revision == 0 {
            return self.create(key, value).await;
        }
        self.txn_put(
            "put_cas",
            key,
            value,
            Compare::mod_revision(key, CompareOp::Equal, mod_revision),
            None,
        )
        .await
    }

    /// Creates the key bound to `lease`, so it goes when the lease expires or is
    /// revoked (Consul's `acquire` with a `Behavior=delete` session). Acquiring a key
    /// the same lease already holds updates its value; a key that exists without that
    /// lease is not touched. Returns whether it wrote.
    pub async fn acquire(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<bool, EtcdError> {
        let created = self
            .txn_put(
                "acquire",
                key,
                value,
                Compare::create_revision(key, CompareOp::Equal, 0),
                Some(lease),
            )
            .await?;
        if created {
            return Ok(true);
        }
        self.txn_put(
            "acquire",
            key,
            value,
            Compare::lease(key, CompareOp::Equal, lease.0),
            Some(lease),
        )
        .await
    }

    async fn txn_put(
        &self,
        op: &'static str,
        key: &str,
        value: &[u8],
        compare: Compare,
        lease: Option<LeaseId>,
    ) -> Result<bool, EtcdError> {
        Self::check_key(key)?;
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, options)]);
        self.txn(op, txn, key, Outcome::Holds { value, lease })
            .await
    }

    /// Runs a conditional transaction; true when its condition held and it applied.
    ///
    /// A transaction is not idempotent: when an attempt failed after it may have been
    /// applied (a timeout, a connection lost mid-call) and the retry's condition then
    /// fails, the retry may be failing on the first attempt's own write. In that case
    /// the key is read back, and the write counts as ours when the key is in the state
    /// it would have put it in (`outcome`). Values written with these calls should
    /// identify their writer (as the cluster-state records do), so that another
    /// writer's identical value is not taken for ours.
    async fn txn(
        &self,
        op: &'static str,
        txn: Txn,
        key: &str,
        outcome: Outcome<'_>,
    ) -> Result<bool, EtcdError> {
        let mut attempt = 1;
        let mut maybe_applied = false;
        let mut reasons = UnavailableReasons::new(self.members.len());
        loop {
            let (member, mut client) = self.member();
            let err = match client.txn(txn.clone()).await {
                Ok(resp) if resp.succeeded() => return Ok(true),
                Ok(_) if !maybe_applied => return Ok(false),
                Ok(_) => return self.already_applied(key, &outcome).await,
                Err(e) => EtcdError::from_client(&self.endpoints, op, e),
            };
            reasons.note(member, &err);
            if !self.failed_over(member, attempt, op, &err).await {
                return Err(reasons.summarise(err, &self.config.address.endpoints));
            }
            maybe_applied |= !err.request_not_sent();
            attempt += 1;
        }
    }

    async fn already_applied(&self, key: &str, outcome: &Outcome<'_>) -> Result<bool, EtcdError> {
        let current = self.get(key).await?;
        let applied = match (outcome, current) {
            (Outcome::Holds { value, lease }, Some(entry)) => {
                entry.value == *value && entry.lease == *lease
            }
            (Outcome::Gone, None) => true,
            _ => false,
        };
        if applied {
            debug!(
                key,
                "an earlier attempt of the etcd transaction had applied"
            );
        }
        Ok(applied)
    }

    /// Deletes the key (deleting a missing key succeeds).
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        Self::check_key(key)?;
        self.call("delete", |mut c| async move { c.delete(key, None).await })
            .await?;
        Ok(())
    }

    /// Deletes the key only if its `mod_revision` is `mod_revision`. Returns whether it
    /// deleted (false also when the key is already gone).
    pub async fn delete_cas(&self, key: &str, mod_revision: i64) -> Result<bool, EtcdError> {
        Self::check_key(key)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn("delete_cas", txn, key, Outcome::Gone).await
    }

    /// Deletes every key under `prefix`; returns how many went. An empty prefix is
    /// refused (it would wipe the whole keyspace).
    pub async fn delete_tree(&self, prefix: &str) -> Result<i64, EtcdError> {
        if prefix.is_empty() {
            return Err(EtcdError::InvalidArgument(
                "refusing to delete the whole etcd keyspace (empty prefix)".to_string(),
            ));
        }
        let resp = self
            .call("delete_tree", |mut c| async move {
                c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                    .await
            })
            .await?;
        Ok(resp.deleted())
    }

    /// Drops the history before `revision` (watches from older revisions then fail
    /// with "compacted"). What an operator's (or etcd's auto-) compaction does.
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call(
            "compact",
            |mut c| async move { c.compact(revision, None).await },
        )
        .await?;
        Ok(())
    }

    // ---- cluster status ----

    /// What the member at `endpoint` (one `host:port` of this cluster) reports, asked
    /// over its own connection: which member it is and which it takes for the leader.
    pub async fn member_status(&self, endpoint: &str) -> Result<MemberStatus, EtcdError> {
        let single = EtcdConfig {
            address: EtcdAddress {
                endpoints: vec![endpoint.to_string()],
                tls: self.config.address.tls,
            },
            max_attempts: 1,
            ..self.config.clone()
        };
        let (_, mut client) = Self::connect(single).await?.member();
        let status = client
            .status()
            .await
            .map_err(|e| EtcdError::from_client(endpoint, "status", e))?;
        Ok(MemberStatus {
            endpoint: endpoint.to_string(),
            member_id: status.header().map_or(0, |h| h.member_id()),
            leader_id: status.leader(),
            raft_term: status.raft_term(),
            revision: status.header().map_or(0, |h| h.revision()),
            version: status.version().to_string(),
        })
    }
}

/// The last reason each member gave for being unavailable during one call, so that the
/// final error says what every member said ("a: no leader; b: connection refused")
/// rather than only what the last one tried said.
struct UnavailableReasons(Vec<Option<String>>);

impl UnavailableReasons {
    fn new(members: usize) -> Self {
        Self(vec![None; members])
    }

    fn note(&mut self, member: usize, err: &EtcdError) {
        if let (EtcdError::Unavailable { reason, .. }, Some(slot)) = (err, self.0.get_mut(member)) {
            *slot = Some(reason.clone());
        }
    }

    fn summarise(self, err: EtcdError, endpoints: &[String]) -> EtcdError {
        match err {
            EtcdError::Unavailable {
                endpoints: all, op, ..
            } if endpoints.len() > 1 => {
                let reason = endpoints
                    .iter()
                    .zip(self.0)
                    .filter_map(|(endpoint, reason)| Some(format!("{endpoint}: {}", reason?)))
                    .collect::<Vec<_>>()
                    .join("; ");
                EtcdError::Unavailable {
                    endpoints: all,
                    op,
                    reason,
                }
            }
            other => other,
        }
    }
}

/// The pause before retry number `retry` (1-based): 100 ms doubling, at most 1 s.
fn backoff(retry: u32) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1).min(10))
        .unwrap_or(u32::MAX);
    Duration::from_millis(100)
        .saturating_mul(factor)
        .min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailability_names_what_each_member_said() {
        let unavailable = |reason: &str| EtcdError::Unavailable {
            endpoints: "etcd://a:1,b:1,c:1".to_string(),
            op: "put",
            reason: reason.to_string(),
        };
        let mut reasons = UnavailableReasons::new(3);
        reasons.note(0, &unavailable("etcdserver: no leader"));
        reasons.note(1, &unavailable("connection refused"));
        let endpoints = ["a:1".to_string(), "b:1".to_string(), "c:1".to_string()];
        let err = reasons.summarise(unavailable("connection refused"), &endpoints);
        let text = err.to_string();
        assert!(err.is_unavailable());
        assert!(
            text.contains("a:1: etcdserver: no leader; b:1: connection refused"),
            "{text}"
        );
        assert!(!text.contains("c:1:"), "{text}");
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(60), Duration::from_secs(1));
    }
}
