//! Where the Consul agent is and how to talk to it, resolved once from the command line
//! and Consul's own environment variables (as the `consul` CLI reads them): the address
//! (`http://`, `https://` or `unix://`), the ACL token, the TLS files.
use std::path::PathBuf;

use super::{parse_addr, ConsulError};
use crate::store::etcd::TlsFiles;

/// Consul's environment variables.
pub const ENV_ADDR: &str = "CONSUL_HTTP_ADDR";
pub const ENV_TOKEN: &str = "CONSUL_HTTP_TOKEN";
pub const ENV_TOKEN_FILE: &str = "CONSUL_HTTP_TOKEN_FILE";
pub const ENV_SSL: &str = "CONSUL_HTTP_SSL";
pub const ENV_CACERT: &str = "CONSUL_CACERT";
pub const ENV_CAPATH: &str = "CONSUL_CAPATH";
pub const ENV_CLIENT_CERT: &str = "CONSUL_CLIENT_CERT";
pub const ENV_CLIENT_KEY: &str = "CONSUL_CLIENT_KEY";
/// The address used when neither `--consul` nor `CONSUL_HTTP_ADDR` names one.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8500";

/// How to reach the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsulAddress {
    /// `host:port` over plain HTTP.
    Http(String),
    /// `host:port` over TLS; the host is the name checked in the certificate.
    Https(String),
    /// A unix socket (`unix:///path`).
    Unix(PathBuf),
}

impl ConsulAddress {
    /// Reads `host:port`, `http://host:port`, `https://host:port` or `unix:///path`;
    /// `ssl` (`CONSUL_HTTP_SSL`) makes a bare `host:port` https.
    pub fn parse(addr: &str, ssl: bool) -> Result<Self, ConsulError> {
        let trimmed = addr.trim();
        if let Some(path) = trimmed.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(ConsulError::InvalidAddress {
                    addr: addr.to_string(),
                    reason: "a unix socket needs an absolute path (unix:///path)".to_string(),
                });
            }
            return Ok(ConsulAddress::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = trimmed.strip_prefix("https://") {
            return Ok(ConsulAddress::Https(parse_addr(rest)?));
        }
        let host_port = parse_addr(trimmed)?;
        if ssl && !trimmed.starts_with("http://") {
            Ok(ConsulAddress::Https(host_port))
        } else {
            Ok(ConsulAddress::Http(host_port))
        }
    }

    /// For messages: `host:port` or the socket's path.
    pub fn display(&self) -> String {
        match self {
            ConsulAddress::Http(a) => a.clone(),
            ConsulAddress::Https(a) => format!("https://{a}"),
            ConsulAddress::Unix(p) => format!("unix://{}", p.display()),
        }
    }
}

/// TLS settings for an https address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsulTls {
    /// A CA certificate file (PEM) to verify the agent with.
    pub ca_file: Option<PathBuf>,
    /// A directory of CA certificates (PEM).
    pub ca_path: Option<PathBuf>,
    /// The client certificate and its key, for agents that verify clients.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Everything the client needs to reach and authenticate to a Consul agent.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    pub address: ConsulAddress,
    pub token: Option<String>,
    pub tls: ConsulTls,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl ConsulConfig {
    /// The configuration from `address` (`--consul`) and `tls` (`--ca`, `--cert`,
    /// `--key`), each falling back to Consul's variables: `CONSUL_HTTP_ADDR` (else
    /// [`DEFAULT_ADDR`]), `CONSUL_HTTP_SSL`, `CONSUL_CACERT`, `CONSUL_CAPATH`,
    /// `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, and the token from `CONSUL_HTTP_TOKEN`
    /// or the file `CONSUL_HTTP_TOKEN_FILE` names.
    pub fn resolve(address: Option<&str>, tls: &TlsFiles) -> Result<Self, ConsulError> {
        let addr = address
            .map(str::to_string)
            .or_else(|| env(ENV_ADDR))
            .unwrap_or_else(|| DEFAULT_ADDR.to_string());
        let ssl = match env(ENV_SSL).as_deref().map(str::trim) {
            None | Some("0" | "false" | "FALSE" | "False") => false,
            Some("1" | "true" | "TRUE" | "True") => true,
            Some(other) => {
                return Err(ConsulError::Config(format!(
                    "{ENV_SSL}={other:?} is neither true nor false"
                )))
            }
        };
        let address = ConsulAddress::parse(&addr, ssl)?;
        // Consul's variables apply to https addresses only (as the consul CLI ignores
        // CONSUL_CACERT for http); files given as flags must fit the address (check).
        let https = matches!(address, ConsulAddress::Https(_));
        let from_env = |var: &str| env(var).filter(|_| https).map(PathBuf::from);
        let path = |flag: &Option<PathBuf>, var: &str| flag.clone().or_else(|| from_env(var));
        let config = Self {
            address,
            token: resolve_token()?,
            tls: ConsulTls {
                ca_file: path(&tls.ca, ENV_CACERT),
                ca_path: from_env(ENV_CAPATH),
                cert: path(&tls.cert, ENV_CLIENT_CERT),
                key: path(&tls.key, ENV_CLIENT_KEY),
            },
        };
        config.check()?;
        Ok(config)
    }

    /// A plain configuration for `address` with `token` and no TLS files.
    pub fn plain(address: &str, token: Option<String>) -> Result<Self, ConsulError> {
        Ok(Self {
            address: ConsulAddress::parse(address, false)?,
            token: token.filter(|t| !t.is_empty()),
            tls: ConsulTls::default(),
        })
    }

    /// TLS files need an https address, and a client certificate its key.
    fn check(&self) -> Result<(), ConsulError> {
        let tls = &self.tls;
        let has_files = tls.ca_file.is_some() || tls.ca_path.is_some() || tls.cert.is_some();
        if has_files && !matches!(self.address, ConsulAddress::Https(_)) {
            return Err(ConsulError::Config(format!(
                "--ca, --cert or --key is given but {} is not an https:// address (or set {ENV_SSL}=true)",
                self.address.display()
            )));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(ConsulError::Config(
                "a client certificate needs its key and the reverse (--cert with --key, or CONSUL_CLIENT_CERT with CONSUL_CLIENT_KEY)".to_string(),
            ));
        }
        Ok(())
    }
}

/// `CONSUL_HTTP_TOKEN`, else the contents of the file `CONSUL_HTTP_TOKEN_FILE` names.
fn resolve_token() -> Result<Option<String>, ConsulError> {
    token_from(env(ENV_TOKEN), env(ENV_TOKEN_FILE))
}

fn token_from(token: Option<String>, file: Option<String>) -> Result<Option<String>, ConsulError> {
    if let Some(token) = token {
        return Ok(Some(token.trim().to_string()));
    }
    let Some(file) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| ConsulError::Config(format!("{ENV_TOKEN_FILE} {file}: {e}")))?;
    Ok(Some(text.trim().to_string()).filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_by_scheme() {
        assert_eq!(
            ConsulAddress::parse("127.0.0.1:8500", false).unwrap(),
            ConsulAddress::Http("127.0.0.1:8500".into())
        );
        assert_eq!(
            ConsulAddress::parse("https://consul.local:8501", false).unwrap(),
            ConsulAddress::Https("consul.local:8501".into())
        );
        assert_eq!(
            ConsulAddress::parse("10.0.0.1:8501", true).unwrap(),
            ConsulAddress::Https("10.0.0.1:8501".into())
        );
        assert_eq!(
            ConsulAddress::parse("http://10.0.0.1:8500", true).unwrap(),
            ConsulAddress::Http("10.0.0.1:8500".into())
        );
        assert_eq!(
            ConsulAddress::parse("unix:///run/consul.sock", false).unwrap(),
            ConsulAddress::Unix("/run/consul.sock".into())
        );
        assert!(ConsulAddress::parse("unix://relative.sock", false).is_err());
        assert!(ConsulAddress::parse("ftp://x", false).is_err());
    }

    #[test]
    fn the_token_comes_from_the_variable_else_the_file() {
        let dir = std::env::temp_dir().join(format!("consul-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let file = Some(file.display().to_string());
        assert_eq!(
            token_from(None, file.clone()).unwrap().as_deref(),
            Some("from-file")
        );
        assert_eq!(
            token_from(Some("direct".into()), file).unwrap().as_deref(),
            Some("direct")
        );
        let missing = token_from(None, Some("/nonexistent/token".into())).unwrap_err();
        assert!(
            missing.to_string().contains("CONSUL_HTTP_TOKEN_FILE"),
            "{missing}"
        );
        assert_eq!(token_from(None, None).unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tls_files_need_an_https_address_and_pairs() {
        let files = TlsFiles {
            ca: Some("/ca.pem".into()),
            cert: None,
            key: None,
        };
        let error = ConsulConfig::resolve(Some("http://127.0.0.1:8500"), &files).unwrap_err();
        assert!(error.to_string().contains("not an https"), "{error}");
        assert!(ConsulConfig::resolve(Some("https://127.0.0.1:8501"), &files).is_ok());
        let half = TlsFiles {
            ca: None,
            cert: Some("/c.pem".into()),
            key: None,
        };
        let error = ConsulConfig::resolve(Some("https://127.0.0.1:8501"), &half).unwrap_err();
        assert!(error.to_string().contains("needs its key"), "{error}");
    }
}
