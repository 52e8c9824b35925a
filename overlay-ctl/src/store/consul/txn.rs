//! `PUT /v1/txn`: several KV operations applied atomically at one index (or none of
//! them), e.g. a record and the change journal entry that announces it
//! ([`crate::store::journal`]).
use base64::Engine as _;
use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{kv::RawKvPair, transport::json, ConsulClient, ConsulError};
use crate::store::backend::KvPair;

/// One KV operation of a transaction, with Consul's verbs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// `set`: writes unconditionally.
    Set { key: String, value: Vec<u8> },
    /// `cas`: writes if the key's modify index is `index` (0: if it does not exist).
    Cas {
        key: String,
        value: Vec<u8>,
        index: u64,
    },
    /// `get`: reads the key (the transaction fails when it does not exist).
    Get { key: String },
    /// `delete`: deletes the key (a missing key is fine).
    Delete { key: String },
    /// `delete-cas`: deletes the key if its modify index is `index`.
    DeleteCas { key: String, index: u64 },
    /// `delete-tree`: deletes every key under `prefix`.
    DeleteTree { prefix: String },
}

impl TxnOp {
    fn to_json(&self) -> Value {
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let kv = match self {
            TxnOp::Set { key, value } => json!({"Verb": "set", "Key": key, "Value": b64(value)}),
            TxnOp::Cas { key, value, index } => {
                json!({"Verb": "cas", "Key": key, "Value": b64(value), "Index": index})
            }
            TxnOp::Get { key } => json!({"Verb": "get", "Key": key}),
            TxnOp::Delete { key } => json!({"Verb": "delete", "Key": key}),
            TxnOp::DeleteCas { key, index } => {
                json!({"Verb": "delete-cas", "Key": key, "Index": index})
            }
            TxnOp::DeleteTree { prefix } => json!({"Verb": "delete-tree", "Key": prefix}),
        };
        json!({ "KV": kv })
    }
}

/// Why a transaction was rolled back: the operation whose check failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnFailure {
    pub op_index: usize,
    pub what: String,
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every operation applied; the entries written or read, in order (write results
    /// carry no value, as Consul answers).
    Applied(Vec<KvPair>),
    /// Nothing applied.
    RolledBack(Vec<TxnFailure>),
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawAnswer {
    #[serde(default)]
    results: Option<Vec<RawResult>>,
    #[serde(default)]
    errors: Option<Vec<RawFailure>>,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(rename = "KV")]
    kv: Option<RawKvPair>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawFailure {
    op_index: usize,
    what: String,
}

const TXN_PATH: &str = "/v1/txn";

impl ConsulClient {
    /// `PUT /v1/txn` with `ops`: all apply at one index, or none does
    /// ([`TxnOutcome::RolledBack`], Consul's 409). Not retried after an attempt that may
    /// have applied.
    pub async fn txn(&self, ops: &[TxnOp]) -> Result<TxnOutcome, ConsulError> {
        let body = Value::Array(ops.iter().map(TxnOp::to_json).collect()).to_string();
        let req = self
            .req(Method::PUT, TXN_PATH)
            .body(body.into_bytes())
            .not_idempotent();
        let answer: RawAnswer = match self
            .request(req, super::transport::Missing::Fails, json)
            .await
        {
            Ok(answer) => answer,
            Err(ConsulError::Status {
                code: 409, body, ..
            }) => json(TXN_PATH, body.as_bytes())?,
            Err(e) => return Err(e),
        };
        if let Some(errors) = answer.errors.filter(|e| !e.is_empty()) {
            return Ok(TxnOutcome::RolledBack(
                errors
                    .into_iter()
                    .map(|e| TxnFailure {
                        op_index: e.op_index,
                        what: e.what,
                    })
                    .collect(),
            ));
        }
        let pairs = answer
            .results
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| r.kv)
            .map(|kv| kv.decode(TXN_PATH))
            .collect::<Result<_, _>>()?;
        Ok(TxnOutcome::Applied(pairs))
    }
}
