//! The overlay agent and operator CLI as a library: the data plane handle
//! ([`datapath`]), netlink helpers ([`netlink`]) and the agent ([`agent`]).
pub mod agent;
pub mod consul;
pub mod datapath;
pub mod endpoint;
pub mod ipam;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod store;
