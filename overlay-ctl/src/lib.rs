//! The overlay agent and operator CLI as a library, grouped by role:
//! - [`dataplane`]: the kernel programs as user space sees them (loading, pinning, maps,
//!   the underlay binding, veth plumbing, egress NAT, netlink and namespaces).
//! - [`store`]: the cluster state: the interface and key layout, the Consul client, the
//!   etcd client, the Consul-compatible dev server, validation of every record read, IPAM
//!   rules, the cluster id.
//! - [`agent`]: the node agent (membership, watch, reconcile, local records and
//!   collection, the control socket, status, metrics, logs, the container-name resolver).
//! - [`runtimes`]: containers on the overlay: one endpoint lifecycle (`session`) behind
//!   `run`/`attach`, the CNI plugin and the Docker driver.
//! - [`cli`]: the operator commands (parse, call, print); [`http`]: the small HTTP server loop the metrics
//!   endpoint and the Docker driver share; [`testhook`]: test-only pause points.
pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod http;
pub mod private;
pub mod runtimes;
pub mod store;
pub mod testhook;
