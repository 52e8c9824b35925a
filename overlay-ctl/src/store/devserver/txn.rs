//! `PUT /v1/txn` with KV operations, as Consul documents it: the operations apply
//! atomically (every one or none), in order, at one index; on success 200 with one
//! result per operation (write results carry no value), on a failed check 409 with the
//! failing operation's index and nothing written. Verbs: `set`, `cas` (index 0:
//! create-only), `get`, `delete`, `delete-tree`, `delete-cas`, `check-index`,
//! `check-not-exists`.
use std::{collections::HashMap, sync::Arc};

use base64::Engine as _;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    http::Reply,
    kv::entry_json,
    shared::Shared,
    state::{Entry, State},
    MAX_VALUE_SIZE,
};

/// Consul's limit on the operations of one transaction.
pub(super) const MAX_TXN_OPS: usize = 128;

#[derive(Deserialize)]
pub(super) struct TxnOp {
    #[serde(rename = "KV")]
    pub(super) kv: Option<KvOp>,
}

#[derive(Deserialize)]
pub(super) struct KvOp {
    #[serde(rename = "Verb")]
    verb: String,
    #[serde(rename = "Key")]
    pub(super) key: String,
    #[serde(rename = "Value", default)]
    value: Option<String>,
    #[serde(rename = "Flags", default)]
    flags: u64,
    #[serde(rename = "Index", default)]
    index: u64,
}

impl KvOp {
    /// Whether the operation only reads (what an ACL check needs to know).
    pub(super) fn is_read(&self) -> bool {
        matches!(
            Verb::parse(&self.verb),
            Some(Verb::Get | Verb::CheckIndex | Verb::CheckNotExists)
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Set,
    Cas,
    Get,
    Delete,
    DeleteTree,
    DeleteCas,
    CheckIndex,
    CheckNotExists,
}

impl Verb {
    fn parse(verb: &str) -> Option<Self> {
        Some(match verb {
            "set" => Self::Set,
            "cas" => Self::Cas,
            "get" => Self::Get,
            "delete" => Self::Delete,
            "delete-tree" => Self::DeleteTree,
            "delete-cas" => Self::DeleteCas,
            "check-index" => Self::CheckIndex,
            "check-not-exists" => Self::CheckNotExists,
            _ => return None,
        })
    }

    fn writes(self) -> bool {
        matches!(
            self,
            Self::Set | Self::Cas | Self::Delete | Self::DeleteTree | Self::DeleteCas
        )
    }
}

/// One decoded operation.
struct Op {
    verb: Verb,
    key: String,
    value: Vec<u8>,
    flags: u64,
    index: u64,
}

/// The operations of a request body, or the 400/413 Consul answers.
pub(super) fn decode_ops(body: &[u8]) -> Result<Vec<TxnOp>, Reply> {
    let ops: Vec<TxnOp> = Reply::decode(body)?;
    if ops.len() > MAX_TXN_OPS {
        return Err(Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                ops.len()
            ),
        ));
    }
    Ok(ops)
}

fn validate(ops: Vec<TxnOp>) -> Result<Vec<Op>, Reply> {
    let bad = |what: String| Reply::text(StatusCode::BAD_REQUEST, what);
    ops.into_iter()
        .map(|op| {
            let kv = op
                .kv
                .ok_or_else(|| bad("only KV operations are supported".into()))?;
            let verb = Verb::parse(&kv.verb)
                .ok_or_else(|| bad(format!("Invalid KV verb {:?}", kv.verb)))?;
            let value = match kv.value.as_deref() {
                None | Some("") => Vec::new(),
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| bad(format!("Invalid Value for key {:?}: {e}", kv.key)))?,
            };
            if value.len() > MAX_VALUE_SIZE {
                return Err(Reply::text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Value for key {:?} is too large", kv.key),
                ));
            }
            if kv.key.is_empty() {
                return Err(bad("Missing key name".into()));
            }
            Ok(Op {
                verb,
                key: kv.key,
                value,
                flags: kv.flags,
                index: kv.index,
            })
        })
        .collect()
}

/// Why `op` fails against the keys as the earlier operations left them (`view`: the
/// modify index of each key they touched, `None` for deleted), if it does.
fn check(op: &Op, state: &State, view: &HashMap<String, Option<u64>>) -> Option<String> {
    let current = match view.get(&op.key) {
        Some(touched) => *touched,
        None => state.kv.get(&op.key).map(|e| e.modify_index),
    };
    let key = &op.key;
    match op.verb {
        Verb::Cas if op.index == 0 && current.is_some() => {
            Some(format!("failed to set key {key:?}, index is stale"))
        }
        Verb::Cas if op.index != 0 && current != Some(op.index) => {
            Some(format!("failed to set key {key:?}, index is stale"))
        }
        Verb::DeleteCas if current.is_some_and(|m| m != op.index) => {
            Some(format!("failed to delete key {key:?}, index is stale"))
        }
        Verb::Get if current.is_none() => Some(format!("key {key:?} doesn't exist")),
        Verb::CheckIndex if current != Some(op.index) => Some(format!(
            "current modify index {} != {}",
            current.unwrap_or(0),
            op.index
        )),
        Verb::CheckNotExists if current.is_some() => Some(format!("key {key:?} exists")),
        _ => None,
    }
}

/// A write result: the entry as Consul reports it, without its value.
fn write_result(key: &str, entry: &Entry) -> Value {
    let mut v = entry_json(key, entry);
    v["Value"] = Value::Null;
    json!({ "KV": v })
}

/// Applies checked operations at one new index; returns the results.
fn apply(ops: &[Op], state: &mut State) -> Vec<Value> {
    let idx = if ops.iter().any(|op| op.verb.writes()) {
        state.bump()
    } else {
        0
    };
    let mut results = Vec::new();
    for op in ops {
        match op.verb {
            Verb::Set | Verb::Cas => {
                state.kv_set_at(&op.key, op.value.clone(), op.flags, idx);
                if let Some(entry) = state.kv.get(&op.key) {
                    results.push(write_result(&op.key, entry));
                }
            }
            Verb::Delete | Verb::DeleteCas => {
                state.kv_delete(&op.key, idx);
            }
            Verb::DeleteTree => {
                let doomed: Vec<String> = state
                    .kv
                    .range(op.key.clone()..)
                    .take_while(|(k, _)| k.starts_with(&op.key))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    state.kv_delete(&k, idx);
                }
            }
            Verb::Get => {
                if let Some(entry) = state.kv.get(&op.key) {
                    results.push(json!({ "KV": entry_json(&op.key, entry) }));
                }
            }
            Verb::CheckIndex | Verb::CheckNotExists => {}
        }
    }
    results
}

/// `PUT /v1/txn`.
pub(super) fn txn(shared: &Arc<Shared>, ops: Vec<TxnOp>) -> Reply {
    let ops = match validate(ops) {
        Ok(ops) => ops,
        Err(reply) => return reply,
    };
    shared.write(|state| {
        let mut view: HashMap<String, Option<u64>> = HashMap::new();
        let mut errors = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if let Some(what) = check(op, state, &view) {
                errors.push(json!({ "OpIndex": i, "What": what }));
            }
            match op.verb {
                // Any index distinct from every real one stands for "written here".
                Verb::Set | Verb::Cas => {
                    view.insert(op.key.clone(), Some(u64::MAX));
                }
                Verb::Delete | Verb::DeleteCas => {
                    view.insert(op.key.clone(), None);
                }
                Verb::DeleteTree => {
                    let under: Vec<String> = state
                        .kv
                        .range(op.key.clone()..)
                        .take_while(|(k, _)| k.starts_with(&op.key))
                        .map(|(k, _)| k.clone())
                        .chain(view.keys().filter(|k| k.starts_with(&op.key)).cloned())
                        .collect();
                    for k in under {
                        view.insert(k, None);
                    }
                }
                _ => {}
            }
        }
        if !errors.is_empty() {
            let mut reply = Reply::json(&json!({ "Results": null, "Errors": errors }));
            reply.status = StatusCode::CONFLICT;
            return reply;
        }
        let results = apply(&ops, state);
        Reply::json(&json!({ "Results": results, "Errors": null }))
    })
}
