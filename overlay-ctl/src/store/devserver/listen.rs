//! Where the dev server listens: TCP (`host:port`), TCP with TLS (`--tls-cert`,
//! `--tls-key`, and `--tls-client-ca` to require client certificates, as Consul's
//! `verify_incoming`), or a unix socket (`unix:///path`, as Consul's
//! `addresses.http = "unix:///..."`).
use std::{convert::Infallible, future::Future, path::PathBuf, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};
use tracing::{debug, warn};

use super::{http::handle, shared::Shared, DevError};

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

/// Serves the API over TLS on `listener` until `shutdown` completes; a failed
/// handshake (a client without a valid certificate) only ends its connection.
pub(super) async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                connections.spawn(async move {
                    let stream = match acceptor.accept(stream).await {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    };
                    let service = service_fn(move |req| {
                        let response = handle(shared.clone(), req);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    if let Err(e) = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}
