//! Test support for the overlay integration tests: namespaces, links and pins that clean
//! up after themselves ([`harness`]) and
//! hand-built frames ([`frames`]).
pub mod bench;
pub mod cluster;
pub mod cni;
pub mod consul_dev;
pub mod control_bench;
pub mod docker;
pub mod etcd;
pub mod frames;
pub mod harness;
pub mod net;
pub mod pinned;
pub mod topology;
pub mod vm_pair;
