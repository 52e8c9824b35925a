//! Where the dev server listens: TCP (`host:port`), TCP with TLS (`--tls-cert`,
//! `--tls-key`, and `--tls-client-ca` to require client certificates, as Consul's
//! `verify_incoming`), or a unix socket (`unix:///path`, as Consul's
//! `addresses.http = "unix:///..."`).
use std::{path::PathBuf, sync::Arc};

use super::DevError;
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};

/// The server's certificate and key, and the CA client certificates must chain to
/// (`None`: clients need none).
#[derive(Clone, Debug)]
pub struct DevTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn tls_error(path: &std::path::Path, e: impl std::fmt::Display) -> DevError {
    DevError::Tls(format!("{}: {e}", path.display()))
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, DevError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error(path, e))
}

/// The TLS acceptor for `tls`.
pub(super) fn acceptor(tls: &DevTls) -> Result<TlsAcceptor, DevError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DevError::Tls(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| tls_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| tls_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| tls_error(&tls.key, e))?;
    let config = builder
        .with_single_cert(read_certs(&tls.cert)?, key)
        .map_err(|e| tls_error(&tls.cert, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
