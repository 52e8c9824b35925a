//! Nodes: each agent's entry (its VTEP), written under its session's lock so that it
//! disappears with the session.
use tracing::info;

use super::{backend::KvBackend as _, check_segment, encode, records, NodeInfo, Store, StoreError};

impl Store {
    /// Registers a node under its session's lock, so the entry disappears when the
    /// session is invalidated (create the session with `SessionBehavior::Delete`).
    pub async fn register_node(&self, session: &str, node: &NodeInfo) -> Result<(), StoreError> {
        check_segment("node name", &node.name)?;
        if self
            .kv()
            .acquire(&self.keys().node(&node.name), &encode(node), session)
            .await?
        {
            info!(node = %node.name, vtep = %node.vtep, "node registered");
            Ok(())
        } else {
            Err(StoreError::NodeHeld(node.name.clone()))
        }
    }

    /// Removes a node's entry (e.g. on an orderly agent shutdown).
    pub async fn deregister_node(&self, name: &str) -> Result<(), StoreError> {
        check_segment("node name", name)?;
        self.kv().delete(&self.keys().node(name)).await?;
        Ok(())
    }

    /// The live nodes: valid records held by a session (others are skipped; see
    /// [`Store::snapshot`] for why).
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let mut nodes: Vec<NodeInfo> = self
            .kv()
            .list(&self.keys().nodes())
            .await?
            .iter()
            .filter_map(|p| records::parse_node(self.prefix(), p).ok())
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }
}
