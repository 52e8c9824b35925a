//! The data plane as user space drives it:
//! - [`datapath`]: loading, pinning and attaching the kernel programs; typed map access.
//! - [`forwarding`]: the maps as the reconcile writes them, in the kernel or in memory
//!   (`agent --dataplane none`).
//! - [`map_values`]: store records (networks, endpoints) as map keys and values.
//! - [`underlay`]: binding a node to its underlay (which hook decapsulates, host settings).
//! - [`endpoint`]: a container's veth pair, addresses and routes.
//! - [`egress`]: the nftables table that masquerades containers' traffic to the outside.
//! - [`nexthops`]: the next hop towards every remote VTEP, cached for the encap program.
//! - [`netlink`] and [`netns`]: interfaces, addresses and routes over rtnetlink; network
//!   namespaces and the threads that work inside them.
pub mod datapath;
pub mod egress;
pub mod endpoint;
pub mod forwarding;
pub mod map_values;
pub mod netlink;
pub mod netns;
pub mod nexthops;
pub mod underlay;
