//! The KV endpoints (`/v1/kv`): reads (plain, recursive, key names, blocking), writes
//! (plain, check-and-set, lock acquire/release) and deletes, with the decoding of
//! Consul's base64 entries into [`KvPair`]s.
use std::{fmt::Write as _, time::Duration};

use base64::Engine as _;
use hyper::Method;
use serde::Deserialize;

use super::{
    format_duration,
    transport::{encode_path, encode_query, json, Missing, Req},
    ConsulClient, ConsulError, INDEX_HEADER, MAX_WAIT,
};
use crate::store::{backend::KvPair, journal::JournaledWrite};

/// A KV entry as Consul's JSON carries it (value in base64).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawKvPair {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
}

impl RawKvPair {
    pub(super) fn decode(self, path: &str) -> Result<KvPair, ConsulError> {
        let value = match self.value {
            None => Vec::new(),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|e| {
                    ConsulError::decode(path, format!("value of {:?} is not base64: {e}", self.key))
                })?,
        };
        Ok(KvPair {
            key: self.key,
            value,
            create_index: self.create_index,
            modify_index: self.modify_index,
            lock_index: self.lock_index,
            flags: self.flags,
            session: self.session.filter(|s| !s.is_empty()),
        })
    }
}

/// Decodes a KV answer (a JSON array of entries, or `null`).
pub(super) fn decode_pairs(path: &str, body: &[u8]) -> Result<Vec<KvPair>, ConsulError> {
    let raw: Option<Vec<RawKvPair>> = json(path, body)?;
    raw.unwrap_or_default()
        .into_iter()
        .map(|r| r.decode(path))
        .collect()
}

fn decode_first(path: &str, body: &[u8]) -> Result<Option<KvPair>, ConsulError> {
    Ok(decode_pairs(path, body)?.into_iter().next())
}

/// `/v1/kv/<key>` for one key (an empty key is refused).
fn key_path(key: &str) -> Result<String, ConsulError> {
    let key = key.trim_start_matches('/');
    if key.is_empty() {
        return Err(ConsulError::InvalidArgument("empty KV key".to_string()));
    }
    Ok(format!("/v1/kv/{}", encode_path(key)))
}

/// `/v1/kv/<prefix>?<query>` for a prefix (an empty prefix is the whole store).
fn prefix_path(prefix: &str, query: &str) -> String {
    format!(
        "/v1/kv/{}?{query}",
        encode_path(prefix.trim_start_matches('/'))
    )
}

fn blocking_query(index: u64, wait: Duration) -> String {
    let wait = wait.min(MAX_WAIT);
    format!("index={index}&wait={}", format_duration(wait))
}

impl ConsulClient {
    fn blocking_timeout(&self, wait: Duration) -> Duration {
        // Consul adds up to wait/16 of jitter; leave room for that and the transfer.
        wait + wait / 16 + self.timeout
    }

    /// Sends a blocking read and returns its value with the answer's index (required).
    async fn blocking<T>(
        &self,
        path: String,
        wait: Duration,
        missing: T,
        decode: impl FnOnce(&str, &[u8]) -> Result<T, ConsulError>,
    ) -> Result<(T, u64), ConsulError> {
        let req = self
            .req(Method::GET, path.clone())
            .timeout(self.blocking_timeout(wait));
        let (index, value) = self
            .request_indexed(req, Missing::Means(missing), decode)
            .await?;
        let index = index.ok_or_else(|| {
            ConsulError::decode(&path, format!("answer has no {INDEX_HEADER} header"))
        })?;
        Ok((value, index))
    }

    /// `GET /v1/kv/:key`; `None` when the key does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<KvPair>, ConsulError> {
        let req = self.req(Method::GET, key_path(key)?);
        self.request(req, Missing::Means(None), decode_first).await
    }

    /// Blocking `GET /v1/kv/:key?index=&wait=`: returns when the key changed past
    /// `index` or `wait` expired, with the new `X-Consul-Index`.
    pub async fn get_blocking(
        &self,
        key: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<KvPair>, u64), ConsulError> {
        let path = format!("{}?{}", key_path(key)?, blocking_query(index, wait));
        self.blocking(path, wait, None, decode_first).await
    }

    /// `GET /v1/kv/:prefix?recurse`: every entry under `prefix` (empty when none).
    pub async fn list(&self, prefix: &str) -> Result<Vec<KvPair>, ConsulError> {
        let req = self.req(Method::GET, prefix_path(prefix, "recurse"));
        self.request(req, Missing::Means(Vec::new()), decode_pairs)
            .await
    }

    /// Blocking `GET /v1/kv/:prefix?recurse&index=&wait=`: returns as soon as anything
    /// under `prefix` changed past `index` (including deletions), or when `wait` expired,
    /// with the entries and the new `X-Consul-Index`. `index` 0 does not block.
    pub async fn list_blocking(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<KvPair>, u64), ConsulError> {
        let query = format!("recurse&{}", blocking_query(index, wait));
        self.blocking(prefix_path(prefix, &query), wait, Vec::new(), decode_pairs)
            .await
    }

    /// `GET /v1/kv/:prefix?keys`: the key names under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, ConsulError> {
        self.keys_inner(prefix, None).await
    }

    /// `GET /v1/kv/:prefix?keys&separator=`: key names under `prefix` up to the first
    /// `separator` after it (so `a/b/c` under `a/` with `/` lists `a/b/`).
    pub async fn keys_with_separator(
        &self,
        prefix: &str,
        separator: &str,
    ) -> Result<Vec<String>, ConsulError> {
        self.keys_inner(prefix, Some(separator)).await
    }

    /// Blocking `GET /v1/kv/:prefix?keys&separator=&index=&wait=`: the names under
    /// `prefix` up to `separator` (e.g. the folders), once anything under `prefix`
    /// changed past `index` (Consul's index covers every key below, not only the names
    /// listed), with the new `X-Consul-Index`.
    pub async fn keys_blocking(
        &self,
        prefix: &str,
        separator: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<String>, u64), ConsulError> {
        let query = format!(
            "keys&separator={}&{}",
            encode_query(separator),
            blocking_query(index, wait)
        );
        let decode = |path: &str, body: &[u8]| -> Result<Vec<String>, ConsulError> {
            Ok(json::<Option<Vec<String>>>(path, body)?.unwrap_or_default())
        };
        self.blocking(prefix_path(prefix, &query), wait, Vec::new(), decode)
            .await
    }

    async fn keys_inner(
        &self,
        prefix: &str,
        separator: Option<&str>,
    ) -> Result<Vec<String>, ConsulError> {
        let mut path = prefix_path(prefix, "keys");
        if let Some(sep) = separator {
            let _ = write!(path, "&separator={}", encode_query(sep));
        }
        let req = self.req(Method::GET, path);
        let keys: Option<Vec<String>> = self.request(req, Missing::Means(None), json).await?;
        Ok(keys.unwrap_or_default())
    }

    /// A write answered with `true`/`false` (a 404 is an error).
    async fn write_bool(&self, req: Req) -> Result<bool, ConsulError> {
        self.request(req, Missing::Fails, json::<bool>).await
    }

    /// `PUT /v1/kv/:key?<query>` with `value` as the body.
    fn put_req(&self, key: &str, query: Option<String>, value: &[u8]) -> Result<Req, ConsulError> {
        let mut path = key_path(key)?;
        if let Some(q) = query {
            path.push('?');
            path.push_str(&q);
        }
        Ok(self.req(Method::PUT, path).body(value.to_vec()))
    }

    /// `PUT /v1/kv/:key`: sets the value unconditionally.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), ConsulError> {
        let wrote = match self.journal_for(key) {
            Some(journal) => {
                journal
                    .write(self, JournaledWrite::Put { key, value })
                    .await?
            }
            None => self.write_bool(self.put_req(key, None, value)?).await?,
        };
        if wrote {
            Ok(())
        } else {
            Err(ConsulError::Rejected {
                op: "put",
                key: key.to_string(),
            })
        }
    }

    /// `PUT /v1/kv/:key?cas=N`: writes only if the key's `ModifyIndex` is `cas_index`;
    /// `cas_index` 0 writes only if the key does not exist. Returns whether it wrote.
    pub async fn put_cas(
        &self,
        key: &str,
        value: &[u8],
        cas_index: u64,
    ) -> Result<bool, ConsulError> {
        if let Some(journal) = self.journal_for(key) {
            let write = JournaledWrite::PutCas {
                key,
                value,
                index: cas_index,
            };
            return journal.write(self, write).await;
        }
        let req = self.put_req(key, Some(format!("cas={cas_index}")), value)?;
        self.write_bool(req.not_idempotent()).await
    }

    /// `PUT /v1/kv/:key?acquire=session`: takes the lock on `key` for `session` and sets
    /// the value. False when another session holds it or the key is in its lock-delay.
    pub async fn acquire(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> Result<bool, ConsulError> {
        // Acquiring again with the same session succeeds, so a retry is harmless.
        let query = format!("acquire={}", encode_query(session));
        self.write_bool(self.put_req(key, Some(query), value)?)
            .await
    }

    /// `PUT /v1/kv/:key?release=session`: gives the lock up and sets the value (Consul
    /// replaces the value with the request body on release too). False when `session`
    /// does not hold the lock.
    pub async fn release(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> Result<bool, ConsulError> {
        let query = format!("release={}", encode_query(session));
        self.write_bool(self.put_req(key, Some(query), value)?)
            .await
    }

    /// `DELETE /v1/kv/:key` (deleting a missing key succeeds).
    pub async fn delete(&self, key: &str) -> Result<(), ConsulError> {
        if let Some(journal) = self.journal_for(key) {
            journal.write(self, JournaledWrite::Delete { key }).await?;
            return Ok(());
        }
        self.write_bool(self.req(Method::DELETE, key_path(key)?))
            .await?;
        Ok(())
    }

    /// `DELETE /v1/kv/:key?cas=N`: deletes only if the key's `ModifyIndex` is `index`.
    pub async fn delete_cas(&self, key: &str, index: u64) -> Result<bool, ConsulError> {
        if let Some(journal) = self.journal_for(key) {
            return journal
                .write(self, JournaledWrite::DeleteCas { key, index })
                .await;
        }
        let path = format!("{}?cas={index}", key_path(key)?);
        self.write_bool(self.req(Method::DELETE, path).not_idempotent())
            .await
    }

    /// `DELETE /v1/kv/:prefix?recurse`: deletes every key under `prefix`. An empty
    /// prefix is refused (it would wipe the whole store).
    pub async fn delete_tree(&self, prefix: &str) -> Result<(), ConsulError> {
        if prefix.trim_start_matches('/').is_empty() {
            return Err(ConsulError::InvalidArgument(
                "refusing to delete the whole KV store (empty prefix)".to_string(),
            ));
        }
        if let Some(journal) = self.journal_for(prefix) {
            // A tree delete makes every follower re-read: not for an empty tree (a
            // refused `network create` cleaning up what it never wrote). A key created
            // meanwhile is journaled by its own writer.
            if self.keys(prefix).await?.is_empty() {
                return Ok(());
            }
            journal
                .write(self, JournaledWrite::DeleteTree { prefix })
                .await?;
            return Ok(());
        }
        self.write_bool(self.req(Method::DELETE, prefix_path(prefix, "recurse")))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_json_decodes() {
        let body = br#"[{"Key":"a","Value":"aGk=","CreateIndex":3,"ModifyIndex":4,"LockIndex":1,"Flags":0,"Session":"s1"},{"Key":"b","Value":null,"CreateIndex":5,"ModifyIndex":5,"LockIndex":0,"Flags":2}]"#;
        let pairs = decode_pairs("/x", body).unwrap();
        assert_eq!(pairs[0].value, b"hi");
        assert_eq!(pairs[0].session.as_deref(), Some("s1"));
        assert_eq!(pairs[1].value, b"");
        assert_eq!(pairs[1].flags, 2);
        assert!(decode_pairs("/x", br#"[{"Key":"a","Value":"!!"}]"#).is_err());
    }
}
