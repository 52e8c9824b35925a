//! Sessions (`/v1/session`): what holds a node's key alive. A session with a TTL must
//! be renewed; when it is invalidated Consul releases or deletes the keys it locked
//! ([`SessionBehavior`]).
use std::time::Duration;

use hyper::Method;
use serde::{Deserialize, Serialize};

use super::{
    format_duration,
    transport::{encode_query, json, Missing},
    ConsulClient, ConsulError,
};

/// What Consul does to the locks a session holds when the session is invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionBehavior {
    /// Release the locks; the keys stay.
    Release,
    /// Delete the keys the session holds.
    Delete,
}

/// A session as `GET /v1/session/info/:id` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionInfo {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub node: String,
    #[serde(default = "default_behavior")]
    pub behavior: SessionBehavior,
    /// As Consul reports it, e.g. `"15s"`; empty for sessions without a TTL.
    #[serde(default, rename = "TTL")]
    pub ttl: String,
    /// Nanoseconds (Consul reports a Go `time.Duration`).
    #[serde(default)]
    pub lock_delay: u64,
    /// The node health checks the session is tied to (`None` when Consul reports null).
    #[serde(default)]
    pub node_checks: Option<Vec<String>>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

fn default_behavior() -> SessionBehavior {
    SessionBehavior::Release
}

impl ConsulClient {
    /// `PUT /v1/session/create` with a TTL: returns the session ID. The session must be
    /// renewed within the TTL ([`ConsulClient::session_renew`]); Consul may wait up to
    /// twice the TTL before invalidating it. Real Consul refuses TTLs below its
    /// `session_ttl_min` (10s by default) and above 24h.
    ///
    /// The session belongs to the node of the Consul agent this client talks to and is
    /// created with no node checks (`"NodeChecks": []`, as the official client's
    /// `CreateNoChecks`): without that, Consul ties it to the node's `serfHealth` check,
    /// and a restart of that Consul agent or a gossip flap would invalidate it (deleting
    /// the keys it holds) although our agent is alive. Only the TTL decides.
    pub async fn session_create(
        &self,
        name: &str,
        ttl: Duration,
        behavior: SessionBehavior,
        lock_delay: Duration,
    ) -> Result<String, ConsulError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Body<'a> {
            name: &'a str,
            #[serde(rename = "TTL")]
            ttl: String,
            behavior: SessionBehavior,
            lock_delay: String,
            /// Always empty: see above.
            node_checks: [&'a str; 0],
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        if ttl.is_zero() {
            return Err(ConsulError::InvalidArgument(
                "session TTL must be positive".to_string(),
            ));
        }
        let body = serde_json::to_vec(&Body {
            name,
            ttl: format_duration(ttl),
            behavior,
            lock_delay: format_duration(lock_delay),
            node_checks: [],
        })
        .map_err(|e| ConsulError::InvalidArgument(e.to_string()))?;
        let req = self
            .req(Method::PUT, "/v1/session/create")
            .body(body)
            .not_idempotent();
        let created: Created = self.request(req, Missing::Fails, json).await?;
        Ok(created.id)
    }

    /// `PUT /v1/session/renew/:id`: false when the session no longer exists (404), in
    /// which case its locks are gone and a new session is needed.
    pub async fn session_renew(&self, id: &str) -> Result<bool, ConsulError> {
        let path = format!("/v1/session/renew/{}", encode_query(id));
        self.request(
            self.req(Method::PUT, path),
            Missing::Means(false),
            |_, _| Ok(true),
        )
        .await
    }

    /// `PUT /v1/session/destroy/:id`.
    pub async fn session_destroy(&self, id: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/session/destroy/{}", encode_query(id));
        self.request(self.req(Method::PUT, path), Missing::Fails, |_, _| Ok(()))
            .await
    }

    /// `GET /v1/session/info/:id`; `None` when no such session exists.
    pub async fn session_info(&self, id: &str) -> Result<Option<SessionInfo>, ConsulError> {
        let path = format!("/v1/session/info/{}", encode_query(id));
        let sessions: Option<Vec<SessionInfo>> = self
            .request(self.req(Method::GET, path), Missing::Means(None), json)
            .await?;
        Ok(sessions.unwrap_or_default().into_iter().next())
    }
}
