//! The connections the client's pool makes, by address kind: plain TCP, TLS over TCP
//! (rustls, the TLS stack already in the tree through etcd-client), or a unix socket.
use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{rt::ReadBufCursor, Uri};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::{
    client::TlsStream,
    rustls::{
        self,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName},
        ClientConfig, RootCertStore,
    },
    TlsConnector,
};

use super::{
    config::{ConsulAddress, ConsulTls},
    ConsulError,
};

/// Where Debian keeps the system's trusted CAs (used when no CA is given).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to the agent whatever URI the pool asks for (the client only ever talks to
/// one agent).
#[derive(Clone)]
pub(super) struct ConsulConnector {
    http: HttpConnector,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Tcp,
    Tls {
        connector: TlsConnector,
        server_name: ServerName<'static>,
    },
    Unix(PathBuf),
}

impl ConsulConnector {
    pub(super) fn new(address: &ConsulAddress, tls: &ConsulTls) -> Result<Self, ConsulError> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        // The pool's URIs say https for TLS agents; the TCP part is ours.
        http.enforce_http(false);
        let kind = match address {
            ConsulAddress::Http(_) => Kind::Tcp,
            ConsulAddress::Https(host_port) => Kind::Tls {
                connector: TlsConnector::from(Arc::new(client_config(tls)?)),
                server_name: server_name(host_port)?,
            },
            ConsulAddress::Unix(path) => Kind::Unix(path.clone()),
        };
        Ok(Self { http, kind })
    }
}

/// The host part of `host:port` as the name the agent's certificate must carry.
fn server_name(host_port: &str) -> Result<ServerName<'static>, ConsulError> {
    let host = match host_port.rfind(':') {
        Some(i) if !host_port[i..].contains(']') => &host_port[..i],
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| ConsulError::Config(format!("{host:?} is not a TLS server name: {e}")))
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> ConsulError {
    ConsulError::Config(format!("{what} {}: {e}", path.display()))
}

/// The certificates of one PEM file.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConsulError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error("cannot read certificates from", path, e))?;
    if certs.is_empty() {
        return Err(tls_error("no certificate in", path, "empty"));
    }
    Ok(certs)
}

/// The CAs to trust: the CA file and directory given, else the system's bundle.
fn root_store(tls: &ConsulTls) -> Result<RootCertStore, ConsulError> {
    let mut files: Vec<PathBuf> = tls.ca_file.iter().cloned().collect();
    if let Some(dir) = &tls.ca_path {
        let entries =
            std::fs::read_dir(dir).map_err(|e| tls_error("cannot read CA directory", dir, e))?;
        let mut pems: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem" || x == "crt"))
            .collect();
        pems.sort();
        files.extend(pems);
    }
    if files.is_empty() {
        files.push(PathBuf::from(SYSTEM_CA_BUNDLE));
    }
    let mut roots = RootCertStore::empty();
    for file in &files {
        for cert in read_certs(file)? {
            roots
                .add(cert)
                .map_err(|e| tls_error("not a usable CA certificate in", file, e))?;
        }
    }
    Ok(roots)
}

fn client_config(tls: &ConsulTls) -> Result<ClientConfig, ConsulError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConsulError::Config(format!("TLS: {e}")))?
        .with_root_certificates(root_store(tls)?);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_error("cannot read the private key", key, e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_error("client certificate", cert, e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

impl tower_service::Service<Uri> for ConsulConnector {
    type Response = ConsulStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ConsulStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let kind = self.kind.clone();
        Box::pin(async move {
            match kind {
                Kind::Tcp => Ok(ConsulStream::Tcp(http.call(uri).await?)),
                Kind::Tls {
                    connector,
                    server_name,
                } => {
                    let tcp = http.call(uri).await?.into_inner();
                    let tls = connector.connect(server_name, tcp).await?;
                    Ok(ConsulStream::Tls(Box::new(TokioIo::new(tls))))
                }
                Kind::Unix(path) => {
                    let stream = UnixStream::connect(&path).await.map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    Ok(ConsulStream::Unix(TokioIo::new(stream)))
                }
            }
        })
    }
}

/// One connection to the agent.
pub(super) enum ConsulStream {
    Tcp(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
    Unix(TokioIo<UnixStream>),
}

impl Connection for ConsulStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ConsulStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConsulStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ConsulStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ConsulStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ConsulStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConsulStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ConsulStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ConsulStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConsulStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ConsulStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ConsulStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConsulStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ConsulStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ConsulStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
