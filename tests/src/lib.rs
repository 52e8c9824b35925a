//! The overlay integration tests' harness (the tests themselves are in `tests/`):
//! namespaces, links and pins that clean up after themselves ([`harness`]), simulated
//! hosts on an underlay ([`topology`]), a control-plane cluster of real agents against
//! the Consul dev server ([`cluster`]), traffic helpers ([`net`]), hand-built frames
//! ([`frames`]), pinned-map readers ([`pinned`]), the CNI, Docker and two-VM fixtures
//! ([`cni`], [`docker`], [`vm_pair`]).
//!
//! The demo (`xtask/demo/`) and the benchmark driver (`bench/driver/`) build their labs
//! with this harness too; the Consul dev server is `overlay-ctl dev-server`
//! (`overlay-ctl/src/store/devserver/`).
pub mod cluster;
pub mod cni;
pub mod docker;
pub mod etcd;
pub mod frames;
pub mod harness;
pub mod net;
pub mod pinned;
pub mod topology;
pub mod vm_pair;
