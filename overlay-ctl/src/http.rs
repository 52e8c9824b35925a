//! A minimal HTTP server loop on hyper, shared by the metrics endpoint, the Docker
//! driver and the Consul dev server: accept (TCP, TLS or a unix socket), serve each
//! connection on its own task, stop (and abort open connections) when `shutdown`
//! completes.
use std::{convert::Infallible, future::Future, io, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Request, Response};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// Serves `handler` on `listener` until `shutdown` completes.
pub async fn serve<H, Fut>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let accept = || listener.accept();
    let connect = |(stream, peer): (tokio::net::TcpStream, std::net::SocketAddr)| {
        let _ = stream.set_nodelay(true);
        Some(serve_connection(stream, handler.clone(), peer.to_string()))
    };
    accept_loop(accept, connect, shutdown).await
}

/// [`serve`] over TLS: a failed handshake (say, a client without a valid certificate
/// when `acceptor` asks for one) only ends its connection.
pub async fn serve_tls<H, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let accept = || listener.accept();
    let connect = |(stream, peer): (tokio::net::TcpStream, std::net::SocketAddr)| {
        let (acceptor, handler) = (acceptor.clone(), handler.clone());
        Some(async move {
            match acceptor.accept(stream).await {
                Ok(stream) => serve_connection(stream, handler, peer.to_string()).await,
                Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
            }
        })
    };
    accept_loop(accept, connect, shutdown).await
}

/// [`serve`] on a unix socket (Docker's plugin socket): connections from peers that are
/// neither root nor this process's user are dropped unanswered, whatever the socket's
/// mode (see [`crate::private::peer_is_trusted`]).
pub async fn serve_unix<H, Fut>(
    listener: UnixListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let accept = || listener.accept();
    let connect = |(stream, _): (tokio::net::UnixStream, _)| {
        if !crate::private::peer_is_trusted(&stream) {
            warn!("refused a connection from an untrusted peer");
            return None;
        }
        Some(serve_connection(
            stream,
            handler.clone(),
            "unix".to_string(),
        ))
    };
    accept_loop(accept, connect, shutdown).await
}

/// The loop the servers share: takes connections from `accept` until `shutdown`
/// completes, and runs what `connect` makes of each (`None`: dropped) on its own task.
/// Dropping the set of tasks (when this ends or is aborted) aborts every connection.
async fn accept_loop<T, A, AFut, C, CFut>(
    mut accept: A,
    mut connect: C,
    shutdown: impl Future<Output = ()>,
) where
    A: FnMut() -> AFut,
    AFut: Future<Output = io::Result<T>>,
    C: FnMut(T) -> Option<CFut>,
    CFut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept() => match accepted {
                Ok(connection) => {
                    if let Some(task) = connect(connection) {
                        connections.spawn(task);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves `handler` on one connection (HTTP/1 or 2, as the client speaks).
async fn serve_connection<I, H, Fut>(io: I, handler: H, peer: String)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = service_fn(move |req| {
        let response = handler(req);
        async move { Ok::<_, Infallible>(response.await) }
    });
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}
