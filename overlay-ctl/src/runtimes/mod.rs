//! Containers on the overlay, however they are started:
//! - [`session`]: the one lifecycle of an endpoint of this node (local record first,
//!   start, then commit or teardown) that `run`, `attach`/`detach`, the CNI plugin and
//!   the Docker driver share; [`container`]: its steps (validate, join, leave).
//! - [`run`]: `overlay-ctl run` ([`run::ContainerRun`]: start, wait, teardown);
//!   [`command`]: the container's command, started only once it is recorded.
//! - [`cni`]: the CNI protocol (spec 1.0: configuration, environment, errors) and
//!   [`cni_result`] (results); [`cni_plugin`]: the `overlay-cni` plugin's ADD, DEL and
//!   VERSION, [`cni_check`] its CHECK (containerd, CRI-O, Kubernetes).
//! - [`docker_protocol`]: Docker's remote network and IPAM plugin protocol;
//!   [`docker`]: the `overlay-net` driver; [`docker_server`]: served on Docker's plugin
//!   socket beside the agent (an agent companion).
pub mod cni;
pub mod cni_check;
pub mod cni_plugin;
pub mod cni_result;
pub mod command;
pub mod container;
pub mod docker;
pub mod docker_protocol;
pub mod docker_server;
pub mod run;
pub mod session;
