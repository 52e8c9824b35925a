//! The overlay agent and operator CLI as a library. Where things are:
//! - [`datapath`]: loading, pinning and attaching the kernel programs; typed map access.
//! - [`consul`]: the Consul HTTP API client; [`store`]: the cluster state's key layout;
//!   [`ipam`]: address and network validation and the free-address search.
//! - [`agent`]: the node agent; [`reconcile`]: cluster state -> map contents and the diff.
//! - [`container`]: `run`/`attach`/`detach` of containers; [`endpoint`]: veth plumbing.
//! - [`local_state`]: this node's records of what it created; [`gc`]: collection of
//!   what crashed commands and outages left; [`identity`]: the cluster id that tells a
//!   store that lost its data from the real one.
//! - [`control`]: the CLI <-> agent socket; [`logs`]: the agent's log ring;
//!   [`metrics`]: Prometheus exposition.
pub mod agent;
pub mod cli;
pub mod consul;
pub mod container;
pub mod control;
pub mod datapath;
pub mod endpoint;
pub mod gc;
pub mod http;
pub mod identity;
pub mod ipam;
pub mod local_state;
pub mod logs;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod reconcile;
pub mod store;
pub mod testhook;
