//! The etcd client's error, classified the way an operator acts on it: the cluster is
//! unavailable (no quorum, every endpoint down: wait or fix the cluster), a revision
//! was compacted (re-read everything), etcd refused the request (fix the credentials,
//! the request or the cluster's alarms), or the input was bad.
use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("invalid etcd address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot read the etcd TLS {what} {}: {source}", path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// No member answered, or the members that answered have no leader.
    #[error("etcd is unavailable at {endpoints} ({op}): {reason}; no quorum or every endpoint down, retry once a majority of members is back")]
    Unavailable {
        endpoints: String,
        op: &'static str,
        reason: String,
    },
    /// A read or watch asked for a revision etcd no longer keeps (a
    /// [`super::PrefixWatch`] handles this itself with a resync).
    #[error("etcd at {endpoints} no longer keeps the revision {op} asked for ({message}); a full re-read is needed")]
    Compacted {
        endpoints: String,
        op: &'static str,
        message: String,
    },
    /// etcd answered and said no: permissions, authentication, a bad request, a full
    /// database (NOSPACE alarm)...
    #[error("etcd at {endpoints} refused {op} ({code:?}): {message}")]
    Refused {
        endpoints: String,
        op: &'static str,
        code: Code,
        message: String,
    },
    #[error("etcd {op} failed at {endpoints}: {message}")]
    Other {
        endpoints: String,
        op: &'static str,
        message: String,
    },
}

impl EtcdError {
    /// True when the cluster could not serve the request at all (as opposed to etcd
    /// answering with an error): retry later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EtcdError::Unavailable { .. })
    }

    /// Classifies an etcd-client error from `op` against `endpoints`.
    pub fn from_client(endpoints: &str, op: &'static str, err: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        let unavailable = |reason: String| EtcdError::Unavailable {
            endpoints: endpoints.to_string(),
            op,
            reason,
        };
        match err {
            E::TransportError(e) => unavailable(error_chain(&e)),
            E::IoError(e) => unavailable(e.to_string()),
            E::GRpcStatus(status) => Self::from_status(endpoints, op, &status),
            other => EtcdError::Other {
                endpoints: endpoints.to_string(),
                op,
                message: other.to_string(),
            },
        }
    }

    fn from_status(endpoints: &str, op: &'static str, status: &Status) -> Self {
        let message = status_message(status);
        // A status the channel made from a broken connection (tonic reports some as
        // Unknown) carries the transport error as its source; etcd's own answers do not.
        let from_transport = std::error::Error::source(status).is_some();
        match status.code() {
            _ if from_transport => EtcdError::Unavailable {
                endpoints: endpoints.to_string(),
                op,
                reason: message,
            },
            // etcd answers "no leader", "request timed out" and "leader changed" with
            // Unavailable; the channel answers a refused or reset connection the same way.
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                EtcdError::Unavailable {
                    endpoints: endpoints.to_string(),
                    op,
                    reason: message,
                }
            }
            Code::OutOfRange if message.contains("compacted") => EtcdError::Compacted {
                endpoints: endpoints.to_string(),
                op,
                message,
            },
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::NotFound
            | Code::OutOfRange => EtcdError::Refused {
                endpoints: endpoints.to_string(),
                op,
                code: status.code(),
                message,
            },
            _ => EtcdError::Other {
                endpoints: endpoints.to_string(),
                op,
                message: format!("{:?}: {message}", status.code()),
            },
        }
    }

    /// True when the request certainly never reached a member (the connection could not
    /// be made), so even a request that is not idempotent may be sent again.
    pub(super) fn request_not_sent(&self) -> bool {
        match self {
            EtcdError::Unavailable { reason, .. } => {
                let r = reason.to_ascii_lowercase();
                // Not "connection error": a connection lost mid-call may have delivered it.
                [
                    "tcp connect error",
                    "error trying to connect",
                    "connection refused",
                    "no leader",
                ]
                .iter()
                .any(|never_sent| r.contains(never_sent))
            }
            _ => false,
        }
    }
}

/// The status message with its transport cause, on one line.
fn status_message(status: &Status) -> String {
    join_causes(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

/// An error and its sources joined with ": ".
fn error_chain(err: &dyn std::error::Error) -> String {
    join_causes(err.to_string(), err.source())
}

/// `first` and the chain from `source` joined with ": ", without repeats or tonic's
/// uninformative "transport error" wrapper.
fn join_causes(first: String, mut source: Option<&dyn std::error::Error>) -> String {
    let mut parts = vec![first];
    while let Some(s) = source {
        let text = s.to_string();
        if text != "transport error" && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(Status::new(code, message))
    }

    #[test]
    fn errors_are_classified() {
        let eps = "etcd://a:2379";
        let e = EtcdError::from_client(
            eps,
            "put",
            status(Code::Unavailable, "etcdserver: no leader"),
        );
        assert!(e.is_unavailable());
        assert!(e.request_not_sent());
        let text = e.to_string();
        assert!(text.contains("unavailable") && text.contains("no leader") && !text.contains('\n'));
        let e = EtcdError::from_client(
            eps,
            "put",
            status(Code::Unavailable, "etcdserver: request timed out"),
        );
        assert!(e.is_unavailable() && !e.request_not_sent());
        let e = EtcdError::from_client(
            eps,
            "txn",
            status(
                Code::Unavailable,
                "connection error: stream closed because of a broken pipe",
            ),
        );
        assert!(
            e.is_unavailable() && !e.request_not_sent(),
            "a lost connection is ambiguous"
        );
        let e = EtcdError::from_client(
            eps,
            "get",
            status(Code::PermissionDenied, "etcdserver: permission denied"),
        );
        assert!(matches!(e, EtcdError::Refused { .. }));
        let e = EtcdError::from_client(
            eps,
            "watch",
            status(
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
        );
        assert!(matches!(e, EtcdError::Compacted { .. }));
    }
}
