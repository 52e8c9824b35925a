//! Where the etcd cluster is and how to talk to it: the `etcd://`/`etcds://` address
//! with several endpoints, the TLS files, and etcdctl's environment variables.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::EtcdError;

/// etcd's client port, used when an endpoint names none.
pub const DEFAULT_PORT: u16 = 2379;
/// etcdctl's own variables, honoured the way `etcdctl` reads them.
pub const ENV_ENDPOINTS: &str = "ETCDCTL_ENDPOINTS";
pub const ENV_CACERT: &str = "ETCDCTL_CACERT";
pub const ENV_CERT: &str = "ETCDCTL_CERT";
pub const ENV_KEY: &str = "ETCDCTL_KEY";

/// The endpoints of one etcd cluster, all plaintext or all TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdAddress {
    /// `host:port` of each member the client may talk to, in the given order.
    pub endpoints: Vec<String>,
    pub tls: bool,
}

impl EtcdAddress {
    /// The endpoints as URLs, the form the gRPC channel wants.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    /// `etcd://a:2379,b:2379` (or `etcds://`), for messages.
    pub fn display(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints.join(","))
    }
}

/// Parses a cluster address. Accepted forms:
/// - `etcd://h1:2379,h2:2379` (plaintext) and `etcds://h1:2379,...` (TLS);
/// - etcdctl's `http://h1:2379,http://h2:2379` and `https://...` lists;
/// - a bare `h1:2379,h2` list (plaintext).
///
/// The port defaults to 2379. Mixing TLS and plaintext endpoints is refused.
pub fn parse_address(addr: &str) -> Result<EtcdAddress, EtcdError> {
    let invalid = |reason: String| EtcdError::InvalidAddress {
        addr: addr.to_string(),
        reason,
    };
    let trimmed = addr.trim();
    let (cluster_tls, rest) = if let Some(rest) = trimmed.strip_prefix("etcds://") {
        (Some(true), rest)
    } else if let Some(rest) = trimmed.strip_prefix("etcd://") {
        (Some(false), rest)
    } else {
        (None, trimmed)
    };
    let mut endpoints = Vec::new();
    let mut tls_seen = Vec::new();
    for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (tls, host_port) = split_scheme(part).map_err(&invalid)?;
        if cluster_tls.is_some() && tls.is_some() {
            return Err(invalid(format!(
                "{part:?}: an etcd:// or etcds:// address lists host:port endpoints without a scheme"
            )));
        }
        tls_seen.push(tls.or(cluster_tls).unwrap_or(false));
        endpoints.push(parse_host_port(host_port).map_err(|r| invalid(format!("{part:?}: {r}")))?);
    }
    if endpoints.is_empty() {
        return Err(invalid("no endpoint given".to_string()));
    }
    let tls = tls_seen[0];
    if tls_seen.iter().any(|t| *t != tls) {
        return Err(invalid(
            "mixes TLS (https) and plaintext (http) endpoints".to_string(),
        ));
    }
    Ok(EtcdAddress { endpoints, tls })
}

/// `Some(tls)` when the endpoint has an http:// or https:// scheme.
fn split_scheme(part: &str) -> Result<(Option<bool>, &str), String> {
    if let Some(rest) = part.strip_prefix("https://") {
        Ok((Some(true), rest.trim_end_matches('/')))
    } else if let Some(rest) = part.strip_prefix("http://") {
        Ok((Some(false), rest.trim_end_matches('/')))
    } else if part.contains("://") {
        Err(format!(
            "{part:?}: unsupported scheme (use etcd://, etcds://, http:// or https://)"
        ))
    } else {
        Ok((None, part))
    }
}

/// Normalises `host`, `host:port`, `[v6]` or `[v6]:port` to `host:port`.
fn parse_host_port(s: &str) -> Result<String, String> {
    if s.contains('/') {
        return Err("expected host:port without a path".to_string());
    }
    let (host, port) = match s.rfind(':') {
        Some(i) if !s[i..].contains(']') => (&s[..i], Some(&s[i + 1..])),
        _ => (s, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !host_ok {
        return Err("not a host name or IP address (an IPv6 address needs [brackets])".to_string());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err("the port must be a number in 1..=65535".to_string()),
        },
    };
    Ok(format!("{host}:{port}"))
}

/// The client's certificate files for TLS (PEM).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// The client certificate and its key, for clusters that check client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Each file from the flag when given, else from etcdctl's variable.
    pub fn or_env(self) -> Self {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            ca: self.ca.or_else(|| env(ENV_CACERT)),
            cert: self.cert.or_else(|| env(ENV_CERT)),
            key: self.key.or_else(|| env(ENV_KEY)),
        }
    }
}

/// Everything needed to connect to one etcd cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    pub address: EtcdAddress,
    pub tls: TlsFiles,
    /// The deadline of one unary call (a blocked write during a quorum loss ends here).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts of a retried call, the first included.
    pub max_attempts: u32,
}

impl EtcdConfig {
    /// A configuration for `address` (see [`parse_address`]) with the given TLS files,
    /// checked for consistency: TLS files need a TLS address and the reverse, and a
    /// client certificate needs its key.
    pub fn new(address: &str, tls: TlsFiles) -> Result<Self, EtcdError> {
        let address = parse_address(address)?;
        check_tls(&address, &tls)?;
        Ok(Self {
            address,
            tls,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_attempts: 4,
        })
    }

    /// The address from `cli_addr` (what `--store` names), else `ETCDCTL_ENDPOINTS`; TLS files from the flags, else `ETCDCTL_CACERT`,
    /// `ETCDCTL_CERT`, `ETCDCTL_KEY`. An `https://` endpoint in `ETCDCTL_ENDPOINTS` turns
    /// TLS on as it does for etcdctl.
    pub fn from_env(cli_addr: Option<&str>, tls: TlsFiles) -> Result<Self, EtcdError> {
        let env_addr = std::env::var(ENV_ENDPOINTS)
            .ok()
            .filter(|a| !a.trim().is_empty());
        let addr =
            cli_addr
                .map(str::to_string)
                .or(env_addr)
                .ok_or_else(|| EtcdError::InvalidAddress {
                    addr: String::new(),
                    reason: format!(
                        "no etcd endpoint given (--store etcd://host:2379 or {ENV_ENDPOINTS})"
                    ),
                })?;
        Self::new(&addr, tls.or_env())
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
}

fn check_tls(address: &EtcdAddress, tls: &TlsFiles) -> Result<(), EtcdError> {
    let refuse = |reason: &str| EtcdError::InvalidArgument(reason.to_string());
    if !address.tls && !tls.is_empty() {
        return Err(refuse(
            "TLS files (--ca/--cert/--key) were given for a plaintext address; use etcds:// or https://",
        ));
    }
    if address.tls && tls.ca.is_none() {
        return Err(refuse(
            "a TLS address (etcds:// or https://) needs the cluster's CA: --ca or ETCDCTL_CACERT",
        ));
    }
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(refuse(
            "a client certificate needs its key and the reverse (--cert with --key)",
        ));
    }
    Ok(())
}

/// Reads one PEM file, naming it in the error.
pub(super) fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(a: &EtcdAddress) -> Vec<&str> {
        a.endpoints.iter().map(String::as_str).collect()
    }

    #[test]
    fn cluster_addresses_parse() {
        let a = parse_address("etcd://10.0.0.1:2379,10.0.0.2:2379, 10.0.0.3").unwrap();
        assert_eq!(eps(&a), ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]);
        assert!(!a.tls);
        let a = parse_address("etcds://h1:2380,[::1]:2379").unwrap();
        assert!(a.tls);
        assert_eq!(a.urls(), ["https://h1:2380", "https://[::1]:2379"]);
        assert_eq!(a.display(), "etcds://h1:2380,[::1]:2379");
        let a = parse_address("http://a:1,http://b:2/").unwrap();
        assert_eq!(eps(&a), ["a:1", "b:2"]);
        assert!(!a.tls);
        assert!(parse_address("https://a:1").unwrap().tls);
        assert_eq!(eps(&parse_address("a").unwrap()), ["a:2379"]);
    }

    #[test]
    fn bad_addresses_are_refused() {
        for bad in [
            "",
            "etcd://",
            "etcd://,",
            "consul://a:8500",
            "http://a:1,https://b:2",
            "etcd://http://a:1",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1/v3",
            "etcd://::1",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn tls_files_must_match_the_scheme() {
        let ca = TlsFiles {
            ca: Some("/ca.pem".into()),
            ..TlsFiles::default()
        };
        assert!(EtcdConfig::new("etcds://a", ca.clone()).is_ok());
        assert!(EtcdConfig::new("etcd://a", ca.clone()).is_err());
        assert!(EtcdConfig::new("etcds://a", TlsFiles::default()).is_err());
        let half = TlsFiles {
            cert: Some("/c.pem".into()),
            ..ca
        };
        assert!(EtcdConfig::new("etcds://a", half).is_err());
    }
}
