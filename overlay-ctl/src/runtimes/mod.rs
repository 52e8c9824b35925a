//! Integrations with container runtimes, through their own plugin interfaces:
//! - [`cni`]: the CNI protocol (spec 1.0: configuration, environment, results, errors);
//!   [`cni_plugin`]: the `overlay-cni` plugin's ADD, DEL, CHECK and VERSION on top of
//!   [`crate::container`] (containerd, CRI-O, Kubernetes).
//! - [`docker_protocol`]: Docker's remote network and IPAM plugin protocol;
//!   [`docker`]: the `overlay-net` driver the agent serves to Docker.
pub mod cni;
pub mod cni_plugin;
pub mod docker;
pub mod docker_protocol;
