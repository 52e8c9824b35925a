//! Convergence: each agent records the KV index whose state its maps hold
//! (`applied/<node>`), so a writer can wait until every peer applied its change.
use std::{collections::BTreeMap, time::Duration};

use super::{
    backend::{KvBackend as _, Record as _},
    check_segment, Store, StoreError,
};

impl Store {
    /// Records that `node`'s maps hold the cluster state as of KV index `index`.
    pub async fn put_applied(&self, node: &str, index: u64) -> Result<(), StoreError> {
        check_segment("node name", node)?;
        self.kv()
            .put(&self.keys().applied(node), index.to_string().as_bytes())
            .await?;
        Ok(())
    }

    /// The index each node last reported applied.
    pub async fn applied_indexes(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        Ok(self
            .kv()
            .list(&self.keys().applied_all())
            .await?
            .iter()
            .filter_map(|p| {
                let node = self.keys().parse_applied(&p.key)?.to_string();
                Some((node, p.value_str().trim().parse().ok()?))
            })
            .collect())
    }

    /// Waits until every live node with an agent (a node that has reported an applied
    /// index at least once; a foreign VTEP written by hand never does) other than
    /// `except` reports having applied KV index `index`, up to `timeout`; returns the
    /// nodes that had not.
    pub async fn wait_applied(
        &self,
        index: u64,
        timeout: Duration,
        except: &str,
    ) -> Result<Vec<String>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let applied = self.applied_indexes().await?;
            let behind: Vec<String> = self
                .list_nodes()
                .await?
                .into_iter()
                .map(|n| n.name)
                .filter(|n| n != except)
                .filter(|n| applied.get(n).is_some_and(|i| *i < index))
                .collect();
            if behind.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(behind);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}
