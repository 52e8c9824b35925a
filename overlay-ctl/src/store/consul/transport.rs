//! One HTTP exchange with Consul and the policy around it: request building (token,
//! percent-encoding), timeouts, bounded retries by idempotence, and the single
//! request-and-decode helper ([`ConsulClient::request`]) every API method goes through.
use std::{fmt::Write as _, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header::HeaderValue, Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use tracing::debug;

use super::{ConsulClient, ConsulError, ENV_TOKEN, INDEX_HEADER, TOKEN_HEADER};

/// Bounded exponential backoff for retried calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 means no retries.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The pause before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Whether a call may be repeated after an answer was possibly lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Idempotence {
    /// Safe to repeat: retried on transport errors and 5xx.
    Idempotent,
    /// Retried only when no connection could be made (the request was not sent).
    NotIdempotent,
}

/// An answer with a 2xx or 404 status.
pub(super) struct RawResponse {
    pub(super) status: StatusCode,
    pub(super) index: Option<u64>,
    /// A 429's `Retry-After`, in seconds.
    pub(super) retry_after: Option<Duration>,
    pub(super) body: Bytes,
}

/// What a 404 answer means to the caller.
pub(super) enum Missing<T> {
    /// An error: the endpoint itself should always exist.
    Fails,
    /// This value: the thing asked for does not exist.
    Means(T),
}

/// One request to send through [`ConsulClient::request`]; built by
/// [`ConsulClient::req`] with the defaults (idempotent, no body, the client's timeout).
pub(super) struct Req {
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    idempotence: Idempotence,
    timeout: Duration,
}

impl Req {
    pub(super) fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }

    pub(super) fn not_idempotent(mut self) -> Self {
        self.idempotence = Idempotence::NotIdempotent;
        self
    }

    pub(super) fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Consul's `Retry-After` (seconds) is honoured up to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

impl ConsulClient {
    /// The error for a response whose status the caller does not accept.
    fn status_error(&self, method: &Method, path: &str, resp: &RawResponse) -> ConsulError {
        ConsulError::from_answer(
            resp.status.as_u16(),
            method,
            path,
            &resp.body,
            resp.retry_after,
            self.token.is_some(),
        )
    }
}

/// Whether an answer with `status` may be retried: 429 always (Consul's rate limiter
/// refused it before handling it), 5xx only when the call is idempotent.
fn retryable_status(status: StatusCode, idempotence: Idempotence) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && idempotence == Idempotence::Idempotent)
}

/// Decodes a JSON answer.
pub(super) fn json<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ConsulError> {
    serde_json::from_slice(body).map_err(|e| ConsulError::decode(path, e))
}

/// Percent-encodes a key for use in a URL path, keeping `/` separators.
pub(super) fn encode_path(key: &str) -> String {
    encode(key, true)
}

/// Undoes [`encode_path`] (for messages that name a key).
pub(super) fn decode_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a query-string value.
pub(super) fn encode_query(value: &str) -> String {
    encode(value, false)
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Formats a duration the way Consul (Go's `time.ParseDuration`) reads it: whole seconds
/// as `"15s"`, anything else in milliseconds.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

/// A transport failure and whether it happened before the request was sent.
type SendError = (ConsulError, bool);

impl ConsulClient {
    /// A request to `path` (which includes its query string) with the defaults.
    pub(super) fn req(&self, method: Method, path: impl Into<String>) -> Req {
        Req {
            method,
            path: path.into(),
            body: None,
            idempotence: Idempotence::Idempotent,
            timeout: self.timeout,
        }
    }

    /// Sends `req` (with the retry policy) and decodes the answer's body with `decode`;
    /// a 404 answer is what `missing` says.
    pub(super) async fn request<T>(
        &self,
        req: Req,
        missing: Missing<T>,
        decode: impl FnOnce(&str, &[u8]) -> Result<T, ConsulError>,
    ) -> Result<T, ConsulError> {
        let (_, value) = self.request_indexed(req, missing, decode).await?;
        Ok(value)
    }

    /// As [`ConsulClient::request`], also returning the answer's `X-Consul-Index`
    /// (`None` when it carried none).
    pub(super) async fn request_indexed<T>(
        &self,
        req: Req,
        missing: Missing<T>,
        decode: impl FnOnce(&str, &[u8]) -> Result<T, ConsulError>,
    ) -> Result<(Option<u64>, T), ConsulError> {
        let resp = self.call(&req).await?;
        if resp.status == StatusCode::NOT_FOUND {
            return match missing {
                Missing::Means(value) => Ok((resp.index, value)),
                Missing::Fails => Err(self.status_error(&req.method, &req.path, &resp)),
            };
        }
        Ok((resp.index, decode(&req.path, &resp.body)?))
    }

    /// Sends a request with the retry policy. Answers other than 2xx and 404 are returned
    /// as [`ConsulError::Status`]; 404 is returned to the caller, which decides what it
    /// means.
    async fn call(&self, req: &Req) -> Result<RawResponse, ConsulError> {
        let mut attempt = 1;
        loop {
            let mut asked_pause = None;
            let (err, retryable) = match self.send_once(req).await {
                Ok(resp) if resp.status.is_success() || resp.status == StatusCode::NOT_FOUND => {
                    return Ok(resp)
                }
                Ok(resp) => {
                    asked_pause = resp.retry_after.map(|d| d.min(MAX_RETRY_AFTER));
                    let retryable = retryable_status(resp.status, req.idempotence);
                    (self.status_error(&req.method, &req.path, &resp), retryable)
                }
                Err((err, connect_failed)) => {
                    let retryable = match err {
                        ConsulError::Transport { .. } | ConsulError::Timeout { .. } => {
                            connect_failed || req.idempotence == Idempotence::Idempotent
                        }
                        _ => false,
                    };
                    (err, retryable)
                }
            };
            if !retryable || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let pause = asked_pause.unwrap_or_else(|| self.retry.backoff(attempt));
            debug!(method = %req.method, path = %req.path, attempt, ?pause, error = %err, "retrying Consul call");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    fn build_request(&self, req: &Req) -> Result<Request<Full<Bytes>>, SendError> {
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(format!("{}{}", self.base, req.path));
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(token).map_err(|_| {
                let message =
                    format!("{ENV_TOKEN} contains characters not allowed in an HTTP header");
                (ConsulError::InvalidArgument(message), false)
            })?;
            builder = builder.header(TOKEN_HEADER, value);
        }
        if req.body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(req.body.clone().unwrap_or_default())))
            .map_err(|e| (ConsulError::InvalidArgument(e.to_string()), false))
    }

    /// One attempt, within the request's timeout.
    async fn send_once(&self, req: &Req) -> Result<RawResponse, SendError> {
        let request = self.build_request(req)?;
        match tokio::time::timeout(req.timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err((
                ConsulError::Timeout {
                    addr: self.addr.clone(),
                    method: req.method.clone(),
                    path: req.path.clone(),
                    timeout: req.timeout,
                },
                false,
            )),
        }
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<RawResponse, SendError> {
        let transport = |message: String| ConsulError::Transport {
            addr: self.addr.clone(),
            message,
        };
        let response = self.http.request(request).await.map_err(|e| {
            let connect = e.is_connect();
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let _ = write!(message, ": {s}");
                source = s.source();
            }
            (transport(message), connect)
        })?;
        let status = response.status();
        let index = response
            .headers()
            .get(INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| (transport(format!("reading the answer: {e}")), false))?
            .to_bytes();
        let read = u64::try_from(body.len()).unwrap_or(u64::MAX);
        self.bytes_read
            .fetch_add(read, std::sync::atomic::Ordering::Relaxed);
        Ok(RawResponse {
            status,
            index,
            retry_after,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_format_for_go() {
        assert_eq!(format_duration(Duration::from_secs(15)), "15s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_millis(0)), "0s");
    }

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(
            encode_path("overlay/ipam/a b/10.0.0.1"),
            "overlay/ipam/a%20b/10.0.0.1"
        );
        assert_eq!(encode_query("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn keys_are_percent_decoded_for_messages() {
        assert_eq!(decode_path("overlay/a%20b/%2F"), "overlay/a b//");
        assert_eq!(decode_path("100%"), "100%");
    }

    #[test]
    fn rate_limits_are_always_retried_server_errors_when_idempotent() {
        use Idempotence::*;
        assert!(retryable_status(
            StatusCode::TOO_MANY_REQUESTS,
            NotIdempotent
        ));
        assert!(retryable_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            Idempotent
        ));
        assert!(!retryable_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            NotIdempotent
        ));
        assert!(!retryable_status(StatusCode::FORBIDDEN, Idempotent));
        assert!(!retryable_status(StatusCode::PAYLOAD_TOO_LARGE, Idempotent));
    }

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(40), p.max_backoff);
    }
}
