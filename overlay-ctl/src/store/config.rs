//! Which store holds the cluster state, from `--store URL` (or `$OVERLAY_STORE`):
//!
//! | URL | store |
//! | --- | --- |
//! | `consul://host:port`, `http://host:port` | Consul's HTTP API |
//! | `https://host:port`, `unix:///path` | Consul over TLS, or its unix socket (passed on to the Consul client) |
//! | `etcd://a:2379,b:2379,c:2379` | an etcd v3 cluster, failing over between the endpoints |
//! | `etcds://a:2379,...` | the same over TLS (`--ca`, `--cert`, `--key`, else `ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`) |
//! | `etcd://` (no endpoint) | the endpoints of `ETCDCTL_ENDPOINTS` |
//!
//! Without `--store` the Consul address comes from `--consul`/`CONSUL_HTTP_ADDR` as
//! before, else `127.0.0.1:8500` (the dev server): `ETCDCTL_ENDPOINTS` alone never moves
//! a node to etcd, so a shell that has it set for `etcdctl` changes nothing.
use super::etcd::{EtcdConfig, EtcdError, TlsFiles, ENV_ENDPOINTS};

/// `--store`'s environment variable.
pub const ENV_STORE: &str = "OVERLAY_STORE";

#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    #[error("invalid --store {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    /// Not a `#[source]`: the message already carries it (a chain would repeat it).
    #[error("invalid --store: {0}")]
    Etcd(EtcdError),
}

impl From<EtcdError> for StoreConfigError {
    fn from(e: EtcdError) -> Self {
        Self::Etcd(e)
    }
}

/// Where the cluster state is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// Consul's HTTP API. `addr` is passed on to the Consul client as `--consul` is
    /// (`None`: `CONSUL_HTTP_ADDR`, else 127.0.0.1:8500); `tls` holds `--ca`/`--cert`/
    /// `--key` for an `https://` agent.
    Consul { addr: Option<String>, tls: TlsFiles },
    /// An etcd v3 cluster.
    Etcd(EtcdConfig),
}

impl Default for StoreConfig {
    /// The dev server (or a Consul agent) at 127.0.0.1:8500, as without any option.
    fn default() -> Self {
        Self::Consul {
            addr: None,
            tls: TlsFiles::default(),
        }
    }
}

impl StoreConfig {
    /// The store the options name: `--store` when given (it wins over `--consul`), else
    /// the Consul at `--consul`, else the default.
    pub fn select(
        store: Option<&str>,
        consul: Option<&str>,
        tls: TlsFiles,
    ) -> Result<Self, StoreConfigError> {
        match store.map(str::trim).filter(|s| !s.is_empty()) {
            Some(url) => Self::parse(url, tls),
            None => Ok(Self::Consul {
                addr: consul.map(str::to_string),
                tls,
            }),
        }
    }

    /// Parses one `--store` URL (see the module documentation for the forms).
    pub fn parse(url: &str, tls: TlsFiles) -> Result<Self, StoreConfigError> {
        let invalid = |reason: &str| StoreConfigError::Invalid {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid(
                "name the store with a scheme: consul://host:port, etcd://host:2379,... (or http://, https://, unix://, etcds://)",
            ));
        };
        match scheme {
            "consul" => {
                if rest.is_empty() || rest.contains('/') {
                    return Err(invalid("expected consul://host:port"));
                }
                Ok(Self::Consul {
                    addr: Some(rest.to_string()),
                    tls,
                })
            }
            "http" | "https" | "unix" => {
                if rest.is_empty() {
                    return Err(invalid("no address after the scheme"));
                }
                Ok(Self::Consul {
                    addr: Some(url.to_string()),
                    tls,
                })
            }
            "etcd" | "etcds" => Ok(Self::Etcd(etcd_config(scheme, rest, tls)?)),
            _ => Err(invalid(
                "unknown scheme (consul://, http://, https://, unix:// for Consul; etcd://, etcds:// for etcd)",
            )),
        }
    }

    /// The store a local agent reports in its status (`store`: the URL, empty from an
    /// agent before `--store`; `consul_addr`: its Consul address), to follow it.
    pub fn of_agent(
        store: &str,
        consul_addr: &str,
        tls: TlsFiles,
    ) -> Result<Self, StoreConfigError> {
        if store.is_empty() {
            Self::select(None, Some(consul_addr), tls)
        } else {
            Self::parse(store, tls)
        }
    }

    /// The store as a URL, for status and messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Consul { addr: Some(a), .. } if a.contains("://") => a.clone(),
            Self::Consul { addr: Some(a), .. } => format!("consul://{a}"),
            Self::Consul { addr: None, .. } => "consul (default address)".to_string(),
            Self::Etcd(config) => config.address.display(),
        }
    }
}

/// An etcd configuration for `scheme://rest`; an empty endpoint list takes etcdctl's
/// `ETCDCTL_ENDPOINTS`.
fn etcd_config(scheme: &str, rest: &str, tls: TlsFiles) -> Result<EtcdConfig, StoreConfigError> {
    let address = if rest.trim().is_empty() {
        let env = std::env::var(ENV_ENDPOINTS)
            .ok()
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| StoreConfigError::Invalid {
                url: format!("{scheme}://"),
                reason: format!("no endpoint given, and {ENV_ENDPOINTS} is not set"),
            })?;
        if env.contains("://") {
            env
        } else {
            format!("{scheme}://{env}")
        }
    } else {
        format!("{scheme}://{rest}")
    };
    Ok(EtcdConfig::new(&address, tls.or_env())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<StoreConfig, StoreConfigError> {
        StoreConfig::parse(url, TlsFiles::default())
    }

    fn consul_addr(config: StoreConfig) -> Option<String> {
        match config {
            StoreConfig::Consul { addr, .. } => addr,
            StoreConfig::Etcd(c) => panic!("expected Consul, got {c:?}"),
        }
    }

    #[test]
    fn consul_forms() {
        assert_eq!(
            consul_addr(parse("consul://10.0.0.1:8500").unwrap()).as_deref(),
            Some("10.0.0.1:8500")
        );
        for url in [
            "http://127.0.0.1:8500",
            "https://consul.example:8501",
            "unix:///var/run/consul.sock",
        ] {
            assert_eq!(consul_addr(parse(url).unwrap()).as_deref(), Some(url));
        }
        assert_eq!(
            parse("consul://10.0.0.1:8500").unwrap().describe(),
            "consul://10.0.0.1:8500"
        );
    }

    #[test]
    fn etcd_forms() {
        let StoreConfig::Etcd(c) = parse("etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3").unwrap()
        else {
            panic!("expected etcd");
        };
        assert_eq!(
            c.address.endpoints,
            ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
        );
        assert!(!c.address.tls);
        let tls = TlsFiles {
            ca: Some("/ca.pem".into()),
            ..TlsFiles::default()
        };
        let config = StoreConfig::parse("etcds://a:2379,b:2379", tls).unwrap();
        assert_eq!(config.describe(), "etcds://a:2379,b:2379");
        let StoreConfig::Etcd(c) = config else {
            panic!("expected etcd");
        };
        assert!(c.address.tls);
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for (url, says) in [
            ("10.0.0.1:8500", "scheme"),
            ("", "scheme"),
            ("zookeeper://a:2181", "unknown scheme"),
            ("consul://", "consul://host:port"),
            ("consul://a:8500/v1", "consul://host:port"),
            ("http://", "no address"),
            ("etcd://a:0", "port"),
            ("etcd://a:1,http://b:2", "without a scheme"),
            ("etcd://a/v3", "path"),
        ] {
            let err = parse(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url:?}: {err}");
        }
        // etcds:// without a CA.
        let err = parse("etcds://a:2379").unwrap_err().to_string();
        assert!(err.contains("CA"), "{err}");
        // TLS files for a plaintext etcd address.
        let tls = TlsFiles {
            ca: Some("/ca.pem".into()),
            ..TlsFiles::default()
        };
        assert!(StoreConfig::parse("etcd://a", tls).is_err());
    }

    #[test]
    fn an_empty_etcd_url_takes_etcdctl_endpoints() {
        // The only test that touches ETCDCTL_ENDPOINTS.
        std::env::set_var(ENV_ENDPOINTS, "10.0.0.7:2379,10.0.0.8");
        let config = parse("etcd://");
        let tls_config = parse("etcds://");
        std::env::remove_var(ENV_ENDPOINTS);
        let missing = parse("etcd://").unwrap_err().to_string();
        assert_eq!(
            config.unwrap().describe(),
            "etcd://10.0.0.7:2379,10.0.0.8:2379"
        );
        // etcds:// asks for TLS, and TLS for the CA.
        assert!(tls_config.unwrap_err().to_string().contains("CA"));
        assert!(missing.contains(ENV_ENDPOINTS), "{missing}");
    }

    #[test]
    fn store_wins_over_consul_and_the_default_is_consul() {
        let none = StoreConfig::select(None, None, TlsFiles::default()).unwrap();
        assert_eq!(none, StoreConfig::default());
        let consul = StoreConfig::select(None, Some("c:8500"), TlsFiles::default()).unwrap();
        assert_eq!(consul_addr(consul).as_deref(), Some("c:8500"));
        let etcd = StoreConfig::select(Some("etcd://e:2379"), Some("c:8500"), TlsFiles::default())
            .unwrap();
        assert!(matches!(etcd, StoreConfig::Etcd(_)));
    }
}
