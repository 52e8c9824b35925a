//! Integrations with container runtimes, through their own plugin interfaces:
//! - [`cni`]: the CNI protocol (spec 1.0: configuration, environment, results, errors);
//!   [`cni_plugin`]: the `overlay-cni` plugin's ADD, DEL, CHECK and VERSION on top of
//!   [`crate::container`] (containerd, CRI-O, Kubernetes).
pub mod cni;
pub mod cni_plugin;
