//! Cluster membership: this node's session (reused across agent restarts through the
//! state directory, so peers never see the node leave), its node key held by that
//! session, renewals well within the TTL, the one-time bootstrap, a quick probe that
//! keeps `status` honest, and republishing this node's records into a restored store.
use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{local_state, lock, Agent};
use crate::{
    store::backend::KvBackend as _,
    store::identity::{self, Trust},
    store::{mtu, NodeInfo, StoreError},
};

/// How often, and how patiently, the store is probed for `status`.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
enum MembershipError {
    /// The store itself failed (unreachable, refused).
    #[error(transparent)]
    Backend(StoreError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for MembershipError {
    fn from(e: StoreError) -> Self {
        if e.is_backend() {
            Self::Backend(e)
        } else {
            Self::Store(e)
        }
    }
}

/// What the membership task knows between its steps.
#[derive(Debug)]
struct Membership {
    /// The session this node's key is held by (`None`: one is created next step).
    session: Option<String>,
    /// Whether this node's key was written under `session` and is still held by it.
    registered: bool,
    /// Whether the bootstrap (when asked for) and the cluster id check are done.
    bootstrapped: bool,
}

impl Agent {
    /// Keeps this node in the cluster: lost sessions are replaced, outages retried.
    pub(super) async fn membership_loop(self: Arc<Self>) {
        let mut membership = Membership {
            session: std::fs::read_to_string(self.session_file())
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
            registered: false,
            bootstrapped: !self.options.bootstrap,
        };
        let renew_every = (self.options.session_ttl / 3).max(Duration::from_millis(200));
        loop {
            let step = self.membership_step(&mut membership).await;
            let step_ok = step.is_ok();
            let pause = match step {
                Ok(()) => renew_every,
                Err(e) => {
                    if let MembershipError::Backend(ref e) = e {
                        self.consul_failed("membership", e);
                    } else {
                        warn!(error = %e, "cannot join the cluster yet");
                    }
                    Duration::from_secs(1).min(renew_every)
                }
            };
            self.status.send_modify(|status| {
                status.session = membership.session.clone();
                // Unknown while the store does not answer: not claimed as registered.
                status.registered = membership.registered && step_ok;
            });
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.reregister.notified() => membership.registered = false,
            }
        }
    }

    /// One round: a live session, this node's key held by it, the bootstrap once.
    async fn membership_step(&self, membership: &mut Membership) -> Result<(), MembershipError> {
        let id = self.ensure_session(membership).await?;
        self.consul_ok();
        if membership.registered && !self.node_key_held(&id).await? {
            warn!("this node's key is gone; registering again");
            membership.registered = false;
        }
        if !membership.registered && lock(&self.identity).trust() == Trust::Foreign {
            // Never write this node into another cluster's store.
            return Ok(());
        }
        if !membership.registered {
            let info = {
                let plane = lock(&self.plane);
                NodeInfo {
                    name: self.node().to_string(),
                    vtep: plane.underlay.vtep,
                    iface: plane.underlay.link.name.clone(),
                    // What networks created from now on take their default MTU from.
                    underlay_mtu: Some(plane.underlay.link.mtu.min(mtu::MAX_UNDERLAY_MTU)),
                }
            };
            self.store.register_node(&id, &info).await?;
            membership.registered = true;
            info!(node = %info.name, vtep = %info.vtep, underlay_mtu = ?info.underlay_mtu, session = %id, "joined the cluster");
        }
        if !membership.bootstrapped {
            // The port first: a bootstrap interrupted after it still stores it next time.
            self.store
                .bootstrap_vxlan_port(self.options.bootstrap_vxlan_port)
                .await?;
            if self.store.bootstrap().await? {
                info!("bootstrapped the cluster: network \"default\" created");
            }
            let known = lock(&self.identity).cluster().cloned();
            identity::ensure_cluster_id(&self.store, known.as_ref()).await?;
            membership.bootstrapped = true;
        }
        Ok(())
    }

    /// Renews the session, or creates one (saved for the next start) when there is none
    /// or it expired; returns its id.
    async fn ensure_session(&self, membership: &mut Membership) -> Result<String, StoreError> {
        if let Some(id) = &membership.session {
            if self.store.session_renew(id).await? {
                return Ok(id.clone());
            }
            warn!(session = %id, "session expired (agent or store was away longer than its TTL); rejoining");
        }
        let id = self
            .store
            .session_create(
                &format!("overlay-node:{}", self.node()),
                self.options.session_ttl,
            )
            .await?;
        if let Err(e) = local_state::write_private_file(&self.session_file(), id.as_bytes()) {
            warn!(error = %e, "cannot save the session ID; a restart will rejoin with a new one");
        }
        membership.session = Some(id.clone());
        membership.registered = false;
        Ok(id)
    }

    /// Whether this node's key exists and is held by session `id` (it may have gone:
    /// deleted by hand, a Consul that lost its state).
    async fn node_key_held(&self, id: &str) -> Result<bool, StoreError> {
        let key = format!("{}{}", self.store.nodes_prefix(), self.node());
        Ok(self
            .store
            .kv()
            .get(&key)
            .await?
            .is_some_and(|pair| pair.session.as_deref() == Some(id)))
    }

    /// Keeps `status` honest within about a second: one quick read of this node's key
    /// (short timeout, no retries) tells whether the store answers and still holds the
    /// key under this node's session.
    pub(super) async fn probe_loop(self: Arc<Self>) {
        let probe = match self.store.impatient(PROBE_TIMEOUT).await {
            Ok(store) => store,
            Err(e) => {
                warn!(error = %e, "cannot make a quick client for the store probe; probing with the agent's own");
                self.store.clone()
            }
        };
        let key = format!("{}{}", self.store.nodes_prefix(), self.node());
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match probe.kv().get(&key).await {
                Ok(pair) => {
                    self.consul_ok();
                    let mut lost = false;
                    self.status.send_modify(|status| {
                        let held = pair
                            .is_some_and(|p| p.session.is_some() && p.session == status.session);
                        lost = status.registered && !held;
                        status.registered = held;
                    });
                    if lost {
                        warn!("this node's key is gone or no longer held by its session: not registered");
                        self.reregister.notify_one();
                    }
                }
                Err(e) => {
                    self.consul_failed("probe", &e);
                    self.status.send_modify(|status| status.registered = false);
                }
            }
        }
    }

    /// Writes this node's records back into a store that was restored after losing them.
    pub(super) async fn republish_loop(self: Arc<Self>) {
        loop {
            self.republish.notified().await;
            let mut pause = Duration::from_millis(200);
            loop {
                let last = lock(&self.identity).last_trusted().cloned();
                let (records, _) = self.local.load_all();
                let local: Vec<_> = (records.into_iter())
                    .filter(|r| r.in_use())
                    .filter_map(|r| r.endpoint)
                    .collect();
                match identity::republish(&self.store, self.node(), &local, last.as_ref()).await {
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, "cannot republish this node's records yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}
