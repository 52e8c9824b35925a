//! One endpoint of this node from its first record to its removal: the lifecycle that
//! `overlay-ctl run`/`attach`/`detach`, the CNI plugin and the Docker driver share.
//!
//! [`EndpointSession::begin`] checks the request once ([`container::validate`]) and then
//! writes this node's local record of the endpoint, owned by the calling process, before
//! anything else exists: from then on, whatever a kill leaves behind (namespace,
//! address, veth, the store's endpoint entry) is named by a record the agent reaps once
//! neither the owner nor a recorded command lives. [`EndpointSession::start`] joins the
//! network ([`container::join_validated`]); then the endpoint is either committed (it
//! outlives its creator: `attach`, CNI ADD, Docker) or torn down by its creator (`run`).
use std::path::PathBuf;

use tracing::warn;

use super::container::{self, ContainerError, Context, JoinSpec, Joined, Result, Target};
use crate::{
    agent::local_state::{Kind, LocalEndpoint, ProcessId},
    dataplane::netns::NetNs,
    store::{Endpoint, Network},
};

/// An endpoint being set up, run or torn down by this process.
pub struct EndpointSession<'a> {
    ctx: &'a Context,
    record: LocalEndpoint,
    /// The network as [`container::validate`] found it.
    network: Network,
}

impl<'a> EndpointSession<'a> {
    /// Checks `spec` (nothing changes when it is refused), then records the endpoint on
    /// this node, owned by the calling process: the first write of every endpoint, so the
    /// agent can reap whatever follows.
    pub async fn begin(ctx: &'a Context, spec: &JoinSpec<'_>, kind: Kind) -> Result<Self> {
        let network = container::validate(ctx, spec).await?;
        let record = LocalEndpoint::new(spec.network, spec.id, kind)?;
        ctx.local.create(&record)?;
        Ok(Self {
            ctx,
            record,
            network,
        })
    }

    /// The context the session works in.
    pub fn context(&self) -> &'a Context {
        self.ctx
    }

    /// Joins the network (`spec` as given to [`begin`](Self::begin)). On failure the
    /// steps taken are undone; the caller then [`abandon`](Self::abandon)s.
    pub async fn start(&mut self, target: Target<'_>, spec: &JoinSpec<'_>) -> Result<Joined> {
        let network = self.network.clone();
        container::join_validated(self.ctx, network, target, spec, &mut self.record).await
    }

    /// Gives the endpoint up after a failed step: the record goes if it covers nothing
    /// any more (else it stays, and the agent collects what it names).
    pub fn abandon(self) {
        if self.record.ip.is_none() && self.record.endpoint.is_none() {
            let _ = self.ctx.local.remove(&self.record.network, &self.record.id);
        }
    }

    /// The endpoint outlives this process (until `detach`, CNI DEL, Docker's
    /// DeleteEndpoint, or its container's veth disappearing): the owner is dropped.
    pub fn commit(mut self) -> Result<()> {
        self.record.owner = None;
        self.ctx.local.update(&self.record)?;
        Ok(())
    }

    /// Names the container's command in the record (`run`): the container stays while
    /// the command lives, also if this process is killed.
    pub fn record_command(&mut self, command: ProcessId) -> Result<()> {
        self.record.command = Some(command);
        self.ctx.local.update(&self.record)?;
        Ok(())
    }

    /// Removes a started endpoint ([`container::leave`]); the record stays until
    /// [`close`](Self::close), for what the caller removes besides.
    pub async fn leave(&self, endpoint: &Endpoint) -> Result<()> {
        container::leave(self.ctx, endpoint).await
    }

    /// Removes the record once everything it covers is gone.
    pub fn close(self) {
        if let Err(e) = self.ctx.local.remove(&self.record.network, &self.record.id) {
            warn!(error = %e, "cannot remove the endpoint's local record");
        }
    }

    /// Removes a started endpoint and, if that worked, its record: the undo of a start
    /// whose caller failed afterwards (CNI ADD).
    pub async fn teardown(self, endpoint: &Endpoint) -> Result<()> {
        self.leave(endpoint).await?;
        self.close();
        Ok(())
    }
}

/// `overlay-ctl attach`: joins the existing namespace at `path` to `spec.network`; the
/// endpoint stays until `detach` (or until its container ends).
pub async fn attach(ctx: &Context, path: PathBuf, spec: &JoinSpec<'_>) -> Result<Joined> {
    let mut session = EndpointSession::begin(ctx, spec, Kind::Attach).await?;
    let netns = match NetNs::open_path(spec.id, path.clone()) {
        Ok(netns) => netns,
        Err(source) => {
            session.abandon();
            return Err(ContainerError::Io {
                what: format!("cannot open network namespace {}", path.display()),
                source,
            });
        }
    };
    match session.start(Target::Netns(&netns), spec).await {
        Ok(joined) => {
            session.commit()?;
            Ok(joined)
        }
        Err(e) => {
            session.abandon();
            Err(e)
        }
    }
}

/// Removes an endpoint of this node and then its local record: `detach`, CNI DEL and
/// Docker's DeleteEndpoint. With `release_address` false the address stays held (for a
/// runtime whose IPAM releases it in a call of its own).
pub async fn remove(ctx: &Context, endpoint: &Endpoint, release_address: bool) -> Result<()> {
    container::leave_with(ctx, endpoint, release_address).await?;
    ctx.local.remove(&endpoint.network, &endpoint.id)?;
    Ok(())
}

/// The endpoint `detach` names: by its id, or by the namespace path it was attached with.
pub async fn find_attached(
    ctx: &Context,
    network: &str,
    id: Option<&str>,
    netns: Option<PathBuf>,
) -> Result<Endpoint> {
    let no_such = |id: &str| ContainerError::NoSuchEndpoint {
        network: network.to_string(),
        id: id.to_string(),
    };
    match (id, netns) {
        (Some(id), _) => ctx
            .store
            .get_endpoint(network, id)
            .await?
            .ok_or_else(|| no_such(id)),
        (None, Some(path)) => {
            let wanted = path.display().to_string();
            ctx.store
                .list_endpoints(Some(network))
                .await?
                .into_iter()
                .find(|e| e.container.as_deref() == Some(wanted.as_str()))
                .ok_or(ContainerError::NotAttachedWith {
                    network: network.to_string(),
                    netns: wanted,
                })
        }
        (None, None) => Err(ContainerError::NoTarget),
    }
}
