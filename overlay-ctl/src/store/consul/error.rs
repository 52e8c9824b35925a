//! The Consul client's one error type, and how callers classify a failure the way
//! Consul's answers mean it: unreachable (or timed out), ACL denied (403), value too
//! large (413), rate limited (429), server error (5xx), or another refusal. Each class
//! has its own operator-facing message; [`ConsulError::class`] names it for logs and
//! `status`.
use std::time::Duration;

use hyper::Method;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("invalid Consul address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("Consul configuration: {0}")]
    Config(String),
    #[error("cannot reach Consul at {addr}: {message}")]
    Transport { addr: String, message: String },
    #[error("Consul at {addr} did not answer {method} {path} within {timeout:?}")]
    Timeout {
        addr: String,
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("Consul's ACL denied {request}: the token {token} lacks {right} (HTTP 403: {body})")]
    AclDenied {
        /// `METHOD /path` (one string keeps the error small).
        request: String,
        /// Which token was sent, for the message ("given" or how to give one).
        token: &'static str,
        /// The right the call needs, as Consul's ACL rules name it.
        right: String,
        body: String,
    },
    #[error("Consul refused {request} as too large (HTTP 413: {body}); its kv_max_value_size is 512 KiB by default")]
    TooLarge { request: String, body: String },
    #[error("Consul rate-limited {request} (HTTP 429{}: {body}); retried with backoff, still limited", retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        request: String,
        retry_after: Option<Duration>,
        body: String,
    },
    #[error("Consul failed {request} with a server error (HTTP {code}: {body})")]
    ServerError {
        code: u16,
        request: String,
        body: String,
    },
    #[error("Consul refused {method} {path} with HTTP {code}: {body}")]
    Status {
        code: u16,
        method: Method,
        path: String,
        body: String,
    },
    #[error("cannot decode Consul's answer to {path}: {message}")]
    Decode { path: String, message: String },
    #[error("Consul refused {op} on key {key:?}")]
    Rejected { op: &'static str, key: String },
}

/// What kind of failure an error is, for the one-line summaries of logs and `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// No answer: connection refused or lost, DNS, TLS handshake, timeout.
    Unreachable,
    /// 403: the ACL token lacks a right.
    AclDenied,
    /// 413: a value above Consul's limit.
    TooLarge,
    /// 429: Consul's rate limit.
    RateLimited,
    /// 5xx: Consul answered with a server error (no leader, a refused TTL, ...).
    ServerError,
    /// Another answer Consul gave (4xx, a refused check-and-set) or that we could not
    /// read.
    Refused,
    /// Our own configuration or arguments are wrong; nothing was sent.
    Invalid,
}

impl ErrorClass {
    /// A few words for log lines and `status`.
    pub fn summary(self) -> &'static str {
        match self {
            ErrorClass::Unreachable => "Consul unreachable",
            ErrorClass::AclDenied => "Consul's ACL denies the token a right it needs",
            ErrorClass::TooLarge => "Consul refuses a value as too large",
            ErrorClass::RateLimited => "Consul rate-limits this client",
            ErrorClass::ServerError => "Consul answers with server errors",
            ErrorClass::Refused => "Consul refuses a request",
            ErrorClass::Invalid => "the Consul client is misconfigured",
        }
    }
}

/// Where a token comes from, for the 403 message.
pub(super) fn token_note(sent: bool) -> &'static str {
    if sent {
        "given"
    } else {
        "(none given: set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE)"
    }
}

impl ConsulError {
    /// The error for an HTTP answer the caller does not accept: classified by status.
    pub(super) fn from_answer(
        code: u16,
        method: &Method,
        path: &str,
        body: &[u8],
        retry_after: Option<Duration>,
        token_sent: bool,
    ) -> Self {
        let request = format!("{method} {path}");
        let body = String::from_utf8_lossy(body).trim().to_string();
        match code {
            403 => ConsulError::AclDenied {
                right: required_right(method, path),
                token: token_note(token_sent),
                request,
                body,
            },
            413 => ConsulError::TooLarge { request, body },
            429 => ConsulError::RateLimited {
                request,
                retry_after,
                body,
            },
            500..=599 => ConsulError::ServerError {
                code,
                request,
                body,
            },
            _ => ConsulError::Status {
                code,
                method: method.clone(),
                path: path.to_string(),
                body,
            },
        }
    }

    /// The HTTP status Consul answered with, for errors that are an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConsulError::Status { code, .. } | ConsulError::ServerError { code, .. } => Some(*code),
            ConsulError::AclDenied { .. } => Some(403),
            ConsulError::TooLarge { .. } => Some(413),
            ConsulError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// The failure's class.
    pub fn class(&self) -> ErrorClass {
        match self {
            ConsulError::Transport { .. } | ConsulError::Timeout { .. } => ErrorClass::Unreachable,
            ConsulError::AclDenied { .. } => ErrorClass::AclDenied,
            ConsulError::TooLarge { .. } => ErrorClass::TooLarge,
            ConsulError::RateLimited { .. } => ErrorClass::RateLimited,
            ConsulError::ServerError { .. } => ErrorClass::ServerError,
            ConsulError::Status { .. }
            | ConsulError::Decode { .. }
            | ConsulError::Rejected { .. } => ErrorClass::Refused,
            ConsulError::InvalidAddress { .. }
            | ConsulError::InvalidArgument(_)
            | ConsulError::Config(_) => ErrorClass::Invalid,
        }
    }

    /// True for errors that say Consul could not be reached, timed out, is overloaded
    /// or failed (retry later), as opposed to Consul refusing the request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.class(),
            ErrorClass::Unreachable | ErrorClass::RateLimited | ErrorClass::ServerError
        )
    }

    /// A failed JSON (or base64) decoding of the answer to `path`.
    pub(super) fn decode(path: &str, message: impl std::fmt::Display) -> Self {
        ConsulError::Decode {
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}

/// The ACL right a call to `path` needs, as Consul's rules name it (what an operator
/// adds to the token's policy).
pub fn required_right(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    let read = *method == Method::GET;
    let access = if read { "read" } else { "write" };
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        let key = super::transport::decode_path(key);
        return format!("key:{access} on {key:?} (key_prefix rule of the overlay prefix)");
    }
    if path == "/v1/txn" {
        return "key:write on every key of the transaction (key_prefix rule of the overlay prefix)"
            .to_string();
    }
    if path.starts_with("/v1/session/") {
        return format!("session:{access} on the Consul agent's node");
    }
    if let Some(name) = path.strip_prefix("/v1/catalog/service/") {
        return format!("service:read on {name:?}");
    }
    if path.starts_with("/v1/agent/service/") || path.starts_with("/v1/catalog/register") {
        return "service:write on the service (and node:read)".to_string();
    }
    if path.starts_with("/v1/catalog/") {
        return "node:read".to_string();
    }
    if path.starts_with("/v1/agent/") {
        return format!("agent:{access}");
    }
    format!("the right for {path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: u16, method: Method, path: &str) -> ConsulError {
        ConsulError::from_answer(code, &method, path, b"Permission denied\n", None, false)
    }

    #[test]
    fn answers_are_classified_as_consul_means_them() {
        let denied = answer(403, Method::PUT, "/v1/kv/overlay/nodes/n1?acquire=x");
        assert_eq!(denied.class(), ErrorClass::AclDenied);
        let text = denied.to_string();
        assert!(text.contains("key:write on \"overlay/nodes/n1\""), "{text}");
        assert!(text.contains("CONSUL_HTTP_TOKEN"), "{text}");
        assert!(!denied.is_unavailable());

        let read = answer(403, Method::GET, "/v1/kv/overlay/?recurse");
        assert!(
            read.to_string().contains("key:read on \"overlay/\""),
            "{read}"
        );
        let session = answer(403, Method::PUT, "/v1/session/create");
        assert!(session.to_string().contains("session:write"), "{session}");
        let service = answer(403, Method::PUT, "/v1/agent/service/register");
        assert!(service.to_string().contains("service:write"), "{service}");

        let large = answer(413, Method::PUT, "/v1/kv/k");
        assert_eq!(large.class(), ErrorClass::TooLarge);
        assert!(large.to_string().contains("too large"), "{large}");

        let limited = ConsulError::from_answer(
            429,
            &Method::GET,
            "/v1/kv/k",
            b"rate limit exceeded",
            Some(Duration::from_secs(3)),
            true,
        );
        assert_eq!(limited.class(), ErrorClass::RateLimited);
        assert!(limited.to_string().contains("Retry-After 3s"), "{limited}");
        assert!(limited.is_unavailable());

        let failed = ConsulError::from_answer(
            500,
            &Method::PUT,
            "/v1/session/create",
            b"Invalid Session TTL '5s', must be between [10s=24h0m0s]",
            None,
            true,
        );
        assert_eq!(failed.class(), ErrorClass::ServerError);
        assert_eq!(failed.status(), Some(500));
        assert!(
            failed.to_string().contains("Invalid Session TTL"),
            "{failed}"
        );

        let bad = answer(400, Method::PUT, "/v1/kv/k");
        assert_eq!(bad.class(), ErrorClass::Refused);
        let gone = ConsulError::Transport {
            addr: "x:1".into(),
            message: "connection refused".into(),
        };
        assert_eq!(gone.class(), ErrorClass::Unreachable);
        assert_eq!(gone.class().summary(), "Consul unreachable");
        for class in [
            denied.class(),
            large.class(),
            limited.class(),
            failed.class(),
        ] {
            assert_ne!(class.summary(), "Consul unreachable");
        }
    }
}
