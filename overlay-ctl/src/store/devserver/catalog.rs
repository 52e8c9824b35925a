//! `/v1/catalog/`: register and deregister nodes and services, and read them back
//! (`service/:name` as a blocking query, `services`, `nodes`); and the agent's own
//! `/v1/agent/service/register` and `deregister/:id`, which put services on the
//! server's node.
//!
//! A catalog write onto the server's own node (which a real Consul agent owns) is what
//! that agent's anti-entropy undoes at its next sync: the dev server does not apply it
//! (the answer is still `true`, as Consul's), so a client relying on it fails here too.
use std::{collections::BTreeMap, sync::Arc};

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::warn;

use super::{
    http::{blocking_read, Query, Reply},
    shared::Shared,
    state::{Node, Service, State},
};

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct RegisterRequest {
    node: String,
    address: String,
    service: Option<RegisterService>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct RegisterService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    address: String,
    port: u16,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct DeregisterRequest {
    node: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
}

pub(super) fn catalog_register(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: RegisterRequest = match Reply::decode(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if req.node.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing node name");
    }
    if req.address.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing node address");
    }
    if let Some(s) = &req.service {
        if s.service.is_empty() {
            return Reply::text(StatusCode::BAD_REQUEST, "Missing service name");
        }
    }
    if req.node == shared.config.node_name {
        warn!(node = %req.node, "catalog register onto the agent's own node ignored: a Consul agent's anti-entropy would undo it (use /v1/agent/service/register)");
        return Reply::json(&json!(true));
    }
    shared.write(|state| {
        let node = state.nodes.entry(req.node.clone()).or_insert_with(|| Node {
            address: req.address.clone(),
            services: BTreeMap::new(),
        });
        node.address = req.address.clone();
        if let Some(s) = req.service {
            put_service(state, &req.node, s);
        } else {
            let idx = state.bump();
            state.catalog_index = idx;
        }
    });
    Reply::json(&json!(true))
}

/// Adds (or replaces) a service on a registered node.
fn put_service(state: &mut State, node: &str, s: RegisterService) {
    let idx = state.bump();
    state.catalog_index = idx;
    let Some(node) = state.nodes.get_mut(node) else {
        return;
    };
    let id = if s.id.is_empty() {
        s.service.clone()
    } else {
        s.id
    };
    let create_index = node.services.get(&id).map_or(idx, |old| old.create_index);
    node.services.insert(
        id.clone(),
        Service {
            id,
            name: s.service,
            address: s.address,
            port: s.port,
            tags: s.tags.unwrap_or_default(),
            meta: s.meta.unwrap_or_default(),
            create_index,
            modify_index: idx,
        },
    );
}

/// The body of `PUT /v1/agent/service/register` (`Name`, where the catalog says
/// `Service`).
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct AgentServiceRequest {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    address: String,
    port: u16,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
}

/// `PUT /v1/agent/service/register`: the service on the server's own node.
pub(super) fn agent_service_register(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: AgentServiceRequest = match Reply::decode(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if req.name.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing service name");
    }
    let service = RegisterService {
        id: req.id,
        service: req.name,
        address: req.address,
        port: req.port,
        tags: req.tags,
        meta: req.meta,
    };
    shared.write(|state| put_service(state, &shared.config.node_name, service));
    Reply::text(StatusCode::OK, "")
}

/// `PUT /v1/agent/service/deregister/:id`: 404 for a service the agent does not have.
pub(super) fn agent_service_deregister(shared: &Arc<Shared>, id: &str) -> Reply {
    let removed = shared.write(|state| {
        let removed = state
            .nodes
            .get_mut(&shared.config.node_name)
            .is_some_and(|n| n.services.remove(id).is_some());
        if removed {
            let idx = state.bump();
            state.catalog_index = idx;
        }
        removed
    });
    if removed {
        Reply::text(StatusCode::OK, "")
    } else {
        Reply::text(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}"))
    }
}

pub(super) fn catalog_deregister(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: DeregisterRequest = match Reply::decode(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if req.node.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing node name");
    }
    shared.write(|state| {
        let changed = if req.service_id.is_empty() {
            state.nodes.remove(&req.node).is_some()
        } else {
            state
                .nodes
                .get_mut(&req.node)
                .is_some_and(|n| n.services.remove(&req.service_id).is_some())
        };
        if changed {
            let idx = state.bump();
            state.catalog_index = idx;
        }
    });
    Reply::json(&json!(true))
}

pub(super) async fn catalog_service(shared: &Arc<Shared>, name: &str, query: &Query) -> Reply {
    let datacenter = shared.config.datacenter.clone();
    blocking_read(shared, query, |state| {
        let mut list = Vec::new();
        for (node_name, node) in &state.nodes {
            for s in node.services.values().filter(|s| s.name == name) {
                list.push(json!({
                    "ID": "",
                    "Node": node_name,
                    "Address": node.address,
                    "Datacenter": datacenter,
                    "TaggedAddresses": Value::Null,
                    "NodeMeta": Value::Null,
                    "ServiceKind": "",
                    "ServiceID": s.id,
                    "ServiceName": s.name,
                    "ServiceTags": s.tags,
                    "ServiceAddress": s.address,
                    "ServicePort": s.port,
                    "ServiceMeta": s.meta,
                    "ServiceEnableTagOverride": false,
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                }));
            }
        }
        Reply::json(&Value::Array(list)).with_index(state.catalog_index.max(1))
    })
    .await
}

pub(super) fn catalog_services(shared: &Arc<Shared>) -> Reply {
    let state = shared.lock();
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in state.nodes.values() {
        for s in node.services.values() {
            let tags = services.entry(s.name.clone()).or_default();
            for t in &s.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
    }
    Reply::json(&json!(services)).with_index(state.catalog_index.max(1))
}

pub(super) fn catalog_nodes(shared: &Arc<Shared>) -> Reply {
    let state = shared.lock();
    let list: Vec<Value> = state
        .nodes
        .iter()
        .map(|(name, n)| json!({ "ID": "", "Node": name, "Address": n.address, "Datacenter": shared.config.datacenter }))
        .collect();
    Reply::json(&Value::Array(list)).with_index(state.catalog_index.max(1))
}
