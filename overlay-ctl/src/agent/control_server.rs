//! The agent's side of the control socket (the protocol and the CLI's client are in
//! [`super::control`]): one task per connection, answering `status`, `reconcile`,
//! `bind` (moving the underlay at runtime) and `logs`.
use std::{io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{
    control::{self, BindReply, ReconcileReply, Request},
    lock,
    reconciler::{Fetch, ReconcileOutcome},
    Agent, Underlay,
};
use crate::{dataplane::netlink, dataplane::underlay};

impl Agent {
    pub(super) async fn control_loop(self: Arc<Self>, listener: UnixListener) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let agent = self.clone();
                        connections.spawn(async move { agent.serve_control(stream).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn serve_control(&self, stream: UnixStream) {
        let mut stream = BufReader::new(stream);
        if !control::peer_is_trusted(stream.get_ref()) {
            let refused =
                Err("the control socket is root's (and the agent's user's) only".to_string());
            if let Err(e) = control::write_reply::<()>(&mut stream, refused).await {
                debug!(error = %e, "cannot refuse a control connection (peer gone)");
            }
            return;
        }
        let request = control::read_request(&mut stream).await;
        let written = match request {
            Err(e) => control::write_reply::<()>(&mut stream, Err(e)).await,
            Ok(Request::Status) => control::write_reply(&mut stream, Ok(self.status())).await,
            Ok(Request::Reconcile) => {
                let reply = self.reconcile(Fetch::Now).await.map(|o| self.reply(o));
                control::write_reply(&mut stream, reply).await
            }
            Ok(Request::Bind { iface }) => {
                let reply = self.bind(&iface).await;
                control::write_reply(&mut stream, reply).await
            }
            Ok(Request::Logs { lines, follow }) => self.stream_logs(stream, lines, follow).await,
        };
        if let Err(e) = written {
            debug!(error = %e, "control connection closed before the answer was written");
        }
    }

    /// A reconcile's answer on the socket.
    fn reply(&self, outcome: ReconcileOutcome) -> ReconcileReply {
        let attached = match outcome.applied {
            Some(applied) => applied.attached,
            // Nothing applied: what the data plane forwarded for before still holds.
            None => self.status.borrow().forwarding.attached.clone(),
        };
        ReconcileReply {
            report: outcome.report,
            attached,
            fresh: outcome.fresh,
        }
    }

    async fn stream_logs(
        &self,
        mut stream: BufReader<UnixStream>,
        lines: usize,
        follow: bool,
    ) -> io::Result<()> {
        control::write_reply(&mut stream, Ok(())).await?;
        let (recent, mut live) = self.logs.follow(lines);
        let out = stream.get_mut();
        for line in recent {
            out.write_all(format!("{line}\n").as_bytes()).await?;
        }
        if !follow {
            return Ok(());
        }
        loop {
            use tokio::sync::broadcast::error::RecvError;
            let line = match live.recv().await {
                Ok(line) => line,
                Err(RecvError::Lagged(n)) => format!("... {n} lines skipped (reader too slow)"),
                Err(RecvError::Closed) => return Ok(()),
            };
            out.write_all(format!("{line}\n").as_bytes()).await?;
        }
    }

    /// Moves the underlay to `iface` at runtime: the XDP program, the underlay settings,
    /// this node's VTEP in the maps and in its cluster entry.
    async fn bind(&self, iface: &str) -> Result<BindReply, String> {
        if !self.has_host() {
            return Err("this agent has no data plane (--dataplane none): nothing to bind".into());
        }
        let link = netlink::link_by_name(&self.handle, iface)
            .await
            .map_err(|e| e.to_string())?;
        let vtep = netlink::first_ipv4(&self.handle, &link)
            .await
            .map_err(|e| e.to_string())?;
        let reply = BindReply {
            iface: link.name.clone(),
            ifindex: link.index,
            vtep,
        };
        let old_iface = {
            let mut plane = lock(&self.plane);
            let datapath = (plane.datapath.as_mut())
                .and_then(|d| d.bpf())
                .ok_or("the agent is stopping")?;
            let setup = underlay::attach(
                datapath,
                &link,
                vtep,
                self.options.decap,
                self.options.xdp_mode,
            )
            .map_err(|e| e.to_string())?;
            let host_changes = std::mem::take(&mut plane.underlay.host_changes);
            let new = Underlay {
                link,
                vtep,
                setup,
                host_changes,
            };
            std::mem::replace(&mut plane.underlay, new).link.name
        };
        info!(from = %old_iface, to = %reply.iface, %vtep, "underlay moved");
        self.reregister.notify_one();
        self.reconcile(Fetch::No).await?;
        Ok(reply)
    }
}
