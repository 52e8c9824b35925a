//! Node sessions: what holds a node's key while its agent lives, and deletes it when
//! the agent is gone for longer than the TTL. On Consul it is a session with
//! `Behavior=delete`; on etcd a lease (the node key is put with it, and renewing the
//! lease is etcd's keep-alive). Either way the agent sees an opaque id (a Consul
//! session UUID, or the lease id in hex), creates it with a TTL, renews it well within
//! the TTL, acquires its node key with it ([`super::backend::KvBackend::acquire`]) and
//! destroys it when it leaves.
use std::time::Duration;

use super::{
    backend::StoreBackend,
    consul::{RetryPolicy, SessionBehavior},
    etcd::{parse_lease, EtcdClient},
    Store, StoreError,
};

impl Store {
    /// A new session of `ttl` named `name` (Consul shows the name; etcd leases have
    /// none); returns its id.
    pub async fn session_create(&self, name: &str, ttl: Duration) -> Result<String, StoreError> {
        match self.backend() {
            StoreBackend::Consul(c) => Ok(c
                .session_create(name, ttl, SessionBehavior::Delete, Duration::ZERO)
                .await?),
            StoreBackend::Etcd(e) => Ok(e.lease_grant(ttl).await?.to_string()),
        }
    }

    /// Renews the session; false when it no longer exists (it expired or was
    /// destroyed, and the keys it held are gone) or `id` is not one of this store's.
    pub async fn session_renew(&self, id: &str) -> Result<bool, StoreError> {
        match self.backend() {
            StoreBackend::Consul(c) => Ok(c.session_renew(id).await?),
            StoreBackend::Etcd(e) => match parse_lease(id) {
                Some(lease) => Ok(e.lease_renew(lease).await?),
                None => Ok(false),
            },
        }
    }

    /// Destroys the session: the keys it holds go at once.
    pub async fn session_destroy(&self, id: &str) -> Result<(), StoreError> {
        match self.backend() {
            StoreBackend::Consul(c) => Ok(c.session_destroy(id).await?),
            StoreBackend::Etcd(e) => match parse_lease(id) {
                Some(lease) => Ok(e.lease_revoke(lease).await?),
                None => Ok(()),
            },
        }
    }

    /// The same store, impatient: one attempt per member with a short `timeout`, for a
    /// probe that must answer quickly whether the store is reachable.
    pub async fn impatient(&self, timeout: Duration) -> Result<Store, StoreError> {
        let backend = match self.backend() {
            StoreBackend::Consul(c) => StoreBackend::Consul(
                c.clone()
                    .with_retry(RetryPolicy::none())
                    .with_timeout(timeout),
            ),
            StoreBackend::Etcd(e) => {
                let config = e
                    .config()
                    .clone()
                    .with_request_timeout(timeout)
                    .with_max_attempts(1);
                StoreBackend::Etcd(EtcdClient::connect(config).await?)
            }
        };
        Ok(Store::with_backend(backend, self.prefix()))
    }
}
