//! ACL enforcement, as a Consul with `acl.enabled = true` and `default_policy = "deny"`:
//! every request but the status endpoints needs a token (`X-Consul-Token` or `?token=`)
//! whose rules grant the right the endpoint needs; otherwise 403, with Consul's text.
//! Tokens are given at start (`--acl-token TOKEN[=RULE,...]`): without rules a token
//! may do everything (a management token); a rule is `KIND:ACCESS[:PREFIX]` with KIND
//! key, session, service, node or agent and ACCESS read or write (write implies read),
//! e.g. `key:write:overlay/,session:write,service:write`.
use std::collections::BTreeMap;

use hyper::{Method, StatusCode};

use super::http::{Query, Reply};

/// The tokens the server knows and their rules (`None`: every right).
#[derive(Clone, Debug, Default)]
pub struct AclTokens(BTreeMap<String, Option<Vec<AclRule>>>);

/// One right of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclRule {
    kind: String,
    write: bool,
    prefix: String,
}

/// The right a request needs.
struct Needed {
    kind: &'static str,
    write: bool,
    resource: String,
}

const KINDS: [&str; 5] = ["key", "session", "service", "node", "agent"];

impl AclTokens {
    /// Adds `TOKEN` (every right) or `TOKEN=RULE,RULE...`.
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (token, rules) = match spec.split_once('=') {
            None => (spec, None),
            Some((token, rules)) => {
                let rules = rules
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(parse_rule)
                    .collect::<Result<Vec<_>, _>>()?;
                (token, Some(rules))
            }
        };
        if token.is_empty() {
            return Err("empty ACL token".to_string());
        }
        self.0.insert(token.to_string(), rules);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when ACLs are off or `token` grants what `method path` needs.
    pub(super) fn authorize(
        &self,
        method: &Method,
        path: &str,
        query: &Query,
        header_token: Option<&str>,
    ) -> Result<(), Reply> {
        if self.0.is_empty() {
            return Ok(());
        }
        let Some(needed) = needed(method, path) else {
            return Ok(());
        };
        let denied = |who: &str| {
            let access = if needed.write { "write" } else { "read" };
            Reply::text(
                StatusCode::FORBIDDEN,
                format!(
                    "Permission denied: {who} lacks permission '{}:{access}' on {:?}",
                    needed.kind, needed.resource
                ),
            )
        };
        let token = header_token
            .filter(|t| !t.is_empty())
            .or(query.get("token").filter(|t| !t.is_empty()));
        let Some(token) = token else {
            return Err(denied("anonymous token"));
        };
        match self.0.get(token) {
            None => Err(Reply::text(StatusCode::FORBIDDEN, "ACL not found")),
            Some(None) => Ok(()),
            Some(Some(rules)) if rules.iter().any(|r| r.grants(&needed)) => Ok(()),
            Some(Some(_)) => Err(denied("token")),
        }
    }
}

impl AclTokens {
    /// A transaction needs, for each of its operations, what the same operation on
    /// `/v1/kv/KEY` needs (as Consul checks a transaction op by op). A body that does not
    /// decode is left to the handler's 400.
    pub(super) fn authorize_txn(
        &self,
        body: &[u8],
        query: &Query,
        header_token: Option<&str>,
    ) -> Result<(), Reply> {
        let Ok(ops) = super::txn::decode_ops(body) else {
            return Ok(());
        };
        for op in ops.iter().filter_map(|op| op.kv.as_ref()) {
            let method = if op.is_read() {
                Method::GET
            } else {
                Method::PUT
            };
            let path = format!("/v1/kv/{}", op.key);
            self.authorize(&method, &path, query, header_token)?;
        }
        Ok(())
    }
}

impl AclRule {
    fn grants(&self, needed: &Needed) -> bool {
        self.kind == needed.kind
            && (self.write || !needed.write)
            && needed.resource.starts_with(&self.prefix)
    }
}

fn parse_rule(rule: &str) -> Result<AclRule, String> {
    let mut parts = rule.splitn(3, ':');
    let (kind, access, prefix) = (parts.next(), parts.next(), parts.next());
    let kind = kind.filter(|k| KINDS.contains(k)).ok_or_else(|| {
        format!(
            "ACL rule {rule:?}: the kind must be one of {}",
            KINDS.join(", ")
        )
    })?;
    let write = match access {
        Some("read") => false,
        Some("write") => true,
        _ => {
            return Err(format!(
                "ACL rule {rule:?}: the access must be read or write"
            ))
        }
    };
    Ok(AclRule {
        kind: kind.to_string(),
        write,
        prefix: prefix.unwrap_or("").to_string(),
    })
}

/// The right `method path` needs (`None`: none, as the status endpoints).
fn needed(method: &Method, path: &str) -> Option<Needed> {
    let write = *method != Method::GET;
    let need = |kind, write, resource: &str| {
        Some(Needed {
            kind,
            write,
            resource: resource.to_string(),
        })
    };
    if let Some(key) = path
        .strip_prefix("/v1/kv/")
        .or((path == "/v1/kv").then_some(""))
    {
        return need("key", write, &super::http::percent_decode(key));
    }
    if let Some(op) = path.strip_prefix("/v1/session/") {
        let write =
            op.starts_with("create") || op.starts_with("renew") || op.starts_with("destroy");
        return need("session", write, "");
    }
    if let Some(name) = path.strip_prefix("/v1/catalog/service/") {
        return need("service", false, &super::http::percent_decode(name));
    }
    if path.starts_with("/v1/catalog/register") || path.starts_with("/v1/catalog/deregister") {
        return need("node", true, "");
    }
    if path.starts_with("/v1/catalog/") {
        return need("node", false, "");
    }
    if path.starts_with("/v1/agent/service/") {
        return need("service", true, "");
    }
    if path.starts_with("/v1/agent/") {
        return need("agent", write, "");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> AclTokens {
        let mut t = AclTokens::default();
        t.add("root").unwrap();
        t.add("overlay=key:write:overlay/,session:write").unwrap();
        t
    }

    fn check(token: Option<&str>, method: Method, path: &str) -> Result<(), String> {
        tokens()
            .authorize(&method, path, &Query::parse(None), token)
            .map_err(|r| String::from_utf8_lossy(&r.body).into_owned())
    }

    #[test]
    fn tokens_grant_what_their_rules_say() {
        assert!(check(Some("root"), Method::PUT, "/v1/kv/x").is_ok());
        assert!(check(Some("overlay"), Method::PUT, "/v1/kv/overlay/nodes/a").is_ok());
        assert!(check(Some("overlay"), Method::GET, "/v1/kv/overlay/").is_ok());
        assert!(check(Some("overlay"), Method::PUT, "/v1/session/create").is_ok());
        let denied = check(Some("overlay"), Method::PUT, "/v1/kv/other").unwrap_err();
        assert!(denied.contains("'key:write' on \"other\""), "{denied}");
        let denied = check(Some("overlay"), Method::PUT, "/v1/agent/service/register");
        assert!(denied.unwrap_err().contains("service:write"));
        assert!(check(None, Method::GET, "/v1/kv/overlay/")
            .unwrap_err()
            .contains("anonymous"));
        assert_eq!(
            check(Some("nope"), Method::GET, "/v1/kv/a").unwrap_err(),
            "ACL not found"
        );
        assert!(check(None, Method::GET, "/v1/status/leader").is_ok());
        assert!(AclTokens::default()
            .authorize(&Method::PUT, "/v1/kv/x", &Query::parse(None), None)
            .is_ok());
        assert!(AclTokens::default().add("t=bogus:write").is_err());
    }
}
