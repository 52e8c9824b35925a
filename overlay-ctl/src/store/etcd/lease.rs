//! Leases: etcd's equivalent of a Consul session with `Behavior=delete`. A key put
//! with a lease goes when the lease expires (no keep-alive within its TTL) or is
//! revoked, so a node key held by a lease disappears when its agent dies.
use std::time::Duration;

use etcd_client::LeaseTimeToLiveOptions;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use super::{EtcdClient, EtcdError};

/// A lease's id, as etcd numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // etcdctl prints lease ids in hex.
        write!(f, "{:x}", self.0)
    }
}

/// What etcd says about a live lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: LeaseId,
    pub granted_ttl: Duration,
    /// Time left before it expires unless kept alive.
    pub remaining_ttl: Duration,
    /// The keys it holds.
    pub keys: Vec<String>,
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0).unsigned_abs())
}

impl EtcdClient {
    /// Grants a lease of `ttl` (whole seconds, at least 1; etcd may raise it to its
    /// minimum, about 1.5 times the election timeout). Retried like a read: a grant
    /// whose answer was lost leaves an unused lease that expires on its own.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, EtcdError> {
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if secs < 1 {
            return Err(EtcdError::InvalidArgument(format!(
                "lease TTL {ttl:?} is below etcd's 1 s granularity"
            )));
        }
        let resp = self
            .call("lease_grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok(LeaseId(resp.id()))
    }

    /// One keep-alive round trip: false when the lease no longer exists (it expired
    /// or was revoked, and its keys are gone).
    pub async fn lease_renew(&self, lease: LeaseId) -> Result<bool, EtcdError> {
        self.call("lease_renew", |mut c| async move {
            // Opening the keep-alive stream sends the first renewal and reads its answer.
            match c.lease_keep_alive(lease.0).await {
                Ok(_) => Ok(true),
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Revokes the lease, deleting the keys it holds. Revoking a lease that is already
    /// gone succeeds.
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        let result = self
            .call("lease_revoke", |mut c| async move {
                c.lease_revoke(lease.0).await
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { message, .. }) if message.contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The lease's TTLs and keys; `None` when it does not exist (any more).
    pub async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, EtcdError> {
        let resp = self
            .call("lease_info", |mut c| async move {
                c.lease_time_to_live(lease.0, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
            })
            .await?;
        // etcd answers a missing lease with TTL -1.
        if resp.ttl() < 0 {
            return Ok(None);
        }
        Ok(Some(LeaseInfo {
            id: lease,
            granted_ttl: secs(resp.granted_ttl()),
            remaining_ttl: secs(resp.ttl()),
            keys: resp
                .keys()
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect(),
        }))
    }

    /// Keeps `lease` alive in the background, renewing every `ttl / 3` and through
    /// reconnects, until the handle is dropped (the lease then expires within its TTL)
    /// or [`LeaseKeepAlive::revoke`] is called.
    pub fn keep_alive(&self, lease: LeaseId, ttl: Duration) -> LeaseKeepAlive {
        let (state, lost) = watch::channel(false);
        let client = self.clone();
        let interval = (ttl / 3).max(Duration::from_millis(200));
        let task =
            tokio::spawn(async move { keep_alive_loop(client, lease, interval, state).await });
        LeaseKeepAlive {
            client: self.clone(),
            lease,
            lost,
            task,
        }
    }
}

/// Renews until etcd says the lease is gone. Failures (no quorum, members down) are
/// retried at the same pace: the lease survives them as long as a renewal gets through
/// within its TTL.
async fn keep_alive_loop(
    client: EtcdClient,
    lease: LeaseId,
    interval: Duration,
    state: watch::Sender<bool>,
) {
    let mut failing = false;
    loop {
        match client.lease_renew(lease).await {
            Ok(true) => {
                if failing {
                    debug!(%lease, "etcd lease renewed again");
                }
                failing = false;
            }
            Ok(false) => {
                warn!(%lease, "etcd lease expired or was revoked; the keys it held are gone");
                let _ = state.send(true);
                return;
            }
            Err(e) => {
                if !failing {
                    warn!(%lease, error = %e, "cannot renew the etcd lease; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// A lease kept alive by a background task. Dropping it stops the renewals.
#[derive(Debug)]
pub struct LeaseKeepAlive {
    client: EtcdClient,
    lease: LeaseId,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl LeaseKeepAlive {
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// True once etcd said the lease is gone (renewals then stop).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Waits until the lease is lost (expired or revoked by someone else).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Stops renewing and revokes the lease, deleting its keys at once.
    pub async fn revoke(self) -> Result<(), EtcdError> {
        self.task.abort();
        self.client.lease_revoke(self.lease).await
    }
}

impl Drop for LeaseKeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
