//! A minimal HTTP/1 server loop on hyper, shared by the metrics endpoint and the Consul
//! dev server of the tests: accept, serve each connection on its own task, stop (and
//! abort open connections) when `shutdown` completes.
use std::{convert::Infallible, future::Future, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Request, Response};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{debug, warn};

/// Serves `handler` on `listener` until `shutdown` completes.
pub async fn serve<H, Fut>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    // Dropping the set (when this ends or is aborted) aborts every connection.
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
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let response = handler(req);
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

/// [`serve`] on a unix socket (Docker's plugin socket): connections from peers that are
/// neither root nor this process's user are dropped unanswered, whatever the socket's
/// mode (see [`crate::private::peer_is_trusted`]).
pub async fn serve_unix<H, Fut>(
    listener: tokio::net::UnixListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !crate::private::peer_is_trusted(&stream) {
                    warn!("refused a connection from an untrusted peer");
                    continue;
                }
                let handler = handler.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let response = handler(req);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    if let Err(e) = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}
