//! Services: registered through the local Consul agent (`/v1/agent/service`, where
//! `--service` containers go), read from the catalog (`/v1/catalog`); and the status
//! probe (`/v1/status/leader`).
//!
//! Why the agent endpoints: a service written with `/v1/catalog/register` onto a node
//! that a Consul agent owns is removed by that agent's anti-entropy at its next sync
//! (and the node's address is overwritten meanwhile). A service registered with the
//! agent belongs to the agent's node, keeps its address, and is synced by the agent.
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::{
    transport::{encode_query, json, Missing},
    ConsulClient, ConsulError,
};

/// A service to put in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService {
    #[serde(rename = "ID")]
    pub id: String,
    /// The service name (`Service` in Consul's register body).
    #[serde(rename = "Service")]
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
}

/// A service to register with the local Consul agent (`PUT /v1/agent/service/register`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
}

/// One instance of a service as `GET /v1/catalog/service/:name` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogEntry {
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    #[serde(default)]
    pub service_address: String,
    #[serde(default)]
    pub service_port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_tags: Vec<String>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl ConsulClient {
    /// `PUT /v1/catalog/register` of one service on `node` (registering the node at
    /// `address` if needed).
    pub async fn catalog_register(
        &self,
        node: &str,
        address: &str,
        service: &CatalogService,
    ) -> Result<(), ConsulError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Body<'a> {
            node: &'a str,
            address: &'a str,
            service: &'a CatalogService,
        }
        let body = serde_json::to_vec(&Body {
            node,
            address,
            service,
        })
        .map_err(|e| ConsulError::InvalidArgument(e.to_string()))?;
        self.catalog_write("/v1/catalog/register", body).await
    }

    /// `PUT /v1/catalog/deregister` of one service of `node`.
    pub async fn catalog_deregister(
        &self,
        node: &str,
        service_id: &str,
    ) -> Result<(), ConsulError> {
        let body = serde_json::json!({ "Node": node, "ServiceID": service_id });
        self.catalog_write("/v1/catalog/deregister", body.to_string().into_bytes())
            .await
    }

    async fn catalog_write(&self, path: &str, body: Vec<u8>) -> Result<(), ConsulError> {
        let req = self.req(Method::PUT, path).body(body);
        self.request(req, Missing::Fails, |_, _| Ok(())).await
    }

    /// `PUT /v1/agent/service/register`: the service on the node of the Consul agent this
    /// client talks to (replacing one with the same ID).
    pub async fn agent_service_register(&self, service: &AgentService) -> Result<(), ConsulError> {
        let body =
            serde_json::to_vec(service).map_err(|e| ConsulError::InvalidArgument(e.to_string()))?;
        let req = self
            .req(Method::PUT, "/v1/agent/service/register")
            .body(body);
        self.request(req, Missing::Fails, |_, _| Ok(())).await
    }

    /// `PUT /v1/agent/service/deregister/:id`; a service already gone is not an error.
    pub async fn agent_service_deregister(&self, service_id: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/service/deregister/{}", encode_query(service_id));
        self.request(self.req(Method::PUT, path), Missing::Means(()), |_, _| {
            Ok(())
        })
        .await
    }

    /// `GET /v1/catalog/service/:name`: the registered instances of a service.
    pub async fn catalog_service(&self, name: &str) -> Result<Vec<CatalogEntry>, ConsulError> {
        let path = format!("/v1/catalog/service/{}", encode_query(name));
        let entries: Option<Vec<CatalogEntry>> = self
            .request(self.req(Method::GET, path), Missing::Means(None), json)
            .await?;
        Ok(entries.unwrap_or_default())
    }

    /// `GET /v1/status/leader`: the raft leader's address; empty while there is none.
    /// Also the cheapest "is Consul there" probe.
    pub async fn leader(&self) -> Result<String, ConsulError> {
        let req = self.req(Method::GET, "/v1/status/leader");
        self.request(req, Missing::Fails, json).await
    }
}
