//! Containers on the overlay, however they are started:
//! - [`container`]: the lifecycle `overlay-ctl run`/`attach`/`detach` share with the
//!   plugins below (address, veth, endpoint record, the agent's attachment, undo).
//! - [`cni`]: the CNI protocol (spec 1.0: configuration, environment, results, errors);
//!   [`cni_plugin`]: the `overlay-cni` plugin's ADD, DEL, CHECK and VERSION on top of
//!   [`crate::runtimes::container`] (containerd, CRI-O, Kubernetes).
//! - [`docker_protocol`]: Docker's remote network and IPAM plugin protocol;
//!   [`docker`]: the `overlay-net` driver the agent serves to Docker.
pub mod cni;
pub mod cni_plugin;
pub mod container;
pub mod docker;
pub mod docker_protocol;
