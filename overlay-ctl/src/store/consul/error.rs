//! The Consul client's one error type, and how callers classify a failure: Consul
//! unreachable or overloaded (retry later) versus Consul answering with a refusal.
use std::time::Duration;

use hyper::Method;

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("invalid Consul address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot reach Consul at {addr}: {message}")]
    Transport { addr: String, message: String },
    #[error("Consul at {addr} did not answer {method} {path} within {timeout:?}")]
    Timeout {
        addr: String,
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("Consul answered {method} {path} with HTTP {code}: {body}")]
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

impl ConsulError {
    /// The HTTP status of a [`ConsulError::Status`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConsulError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for errors that say Consul could not be reached or timed out (as opposed to
    /// Consul answering with an error).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ConsulError::Transport { .. } | ConsulError::Timeout { .. }
        ) || self.status().is_some_and(|c| c >= 500)
    }

    /// A failed JSON (or base64) decoding of the answer to `path`.
    pub(super) fn decode(path: &str, message: impl std::fmt::Display) -> Self {
        ConsulError::Decode {
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}
