//! What a container is told about its resolver: the gateway address of its network as the
//! nameserver and the network's name as the search domain (so `web` is tried as
//! `web.NETWORK` first).
//!
//! `run` containers get it the `ip netns` way: `/etc/netns/NETNS/resolv.conf`, which
//! `ip netns exec NETNS` (and a runtime doing the same in the container's own mount
//! namespace) bind-mounts over `/etc/resolv.conf`. CNI containers get the result's `dns`.
use std::{
    fmt::Write as _,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

use super::DnsError;

/// Where `ip netns` looks for a namespace's own copies of files of `/etc`.
pub const NETNS_ETC_DIR: &str = "/etc/netns";
const RESOLV_CONF: &str = "resolv.conf";

/// A container's resolver settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDns {
    /// The network's gateway address, where the node's responder listens.
    pub nameserver: Ipv4Addr,
    /// The network's name.
    pub search: String,
}

impl ContainerDns {
    pub fn new(gateway: Ipv4Addr, network: &str) -> Self {
        Self {
            nameserver: gateway,
            search: network.to_owned(),
        }
    }

    /// The resolv.conf text.
    pub fn resolv_conf(&self) -> String {
        let mut text = String::from("# Written by overlay-ctl: the overlay network's resolver.\n");
        let _ = writeln!(text, "nameserver {}", self.nameserver);
        let _ = writeln!(text, "search {}", self.search);
        // Glibc's default is 5 s x 2 attempts per server; a local responder answers in
        // microseconds, so a lost datagram is better retried sooner.
        text.push_str("options timeout:2 attempts:3\n");
        text
    }
}

/// Writes `/etc/netns/NETNS/resolv.conf` and returns its path.
pub fn write_netns_resolv_conf(netns: &str, dns: &ContainerDns) -> Result<PathBuf, DnsError> {
    write_netns_resolv_conf_under(Path::new(NETNS_ETC_DIR), netns, dns)
}

/// Removes what [`write_netns_resolv_conf`] wrote (and its directory when it is then
/// empty); a file already gone is not an error, so teardown can run twice.
pub fn remove_netns_resolv_conf(netns: &str) -> Result<(), DnsError> {
    remove_netns_resolv_conf_under(Path::new(NETNS_ETC_DIR), netns)
}

/// [`write_netns_resolv_conf`] with another root than `/etc/netns` (tests).
pub fn write_netns_resolv_conf_under(
    root: &Path,
    netns: &str,
    dns: &ContainerDns,
) -> Result<PathBuf, DnsError> {
    let dir = netns_dir(root, netns)?;
    let path = dir.join(RESOLV_CONF);
    let failed = |source| DnsError::ContainerFile {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(failed)?;
    // Written aside and renamed, so a container starting meanwhile never reads half a file.
    let partial = dir.join(format!(".{RESOLV_CONF}.tmp"));
    std::fs::write(&partial, dns.resolv_conf()).map_err(failed)?;
    std::fs::rename(&partial, &path).map_err(failed)?;
    Ok(path)
}

/// [`remove_netns_resolv_conf`] with another root than `/etc/netns` (tests).
pub fn remove_netns_resolv_conf_under(root: &Path, netns: &str) -> Result<(), DnsError> {
    let dir = netns_dir(root, netns)?;
    let path = dir.join(RESOLV_CONF);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(DnsError::ContainerFile { path, source }),
    }
    // Only an empty directory goes: other files there are someone else's.
    match std::fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(source) => Err(DnsError::ContainerFile { path: dir, source }),
    }
}

/// A netns name is one path component: no separators, no `.`/`..`.
fn netns_dir(root: &Path, netns: &str) -> Result<PathBuf, DnsError> {
    let plain = !netns.is_empty() && netns != "." && netns != ".." && !netns.contains(['/', '\0']);
    if !plain {
        return Err(DnsError::NetnsName(netns.to_owned()));
    }
    Ok(root.join(netns))
}

/// The CNI result's `dns` object (CNI spec, "DNS" of the result): the gateway as
/// nameserver, the network as domain and search domain.
pub fn cni_dns(dns: &ContainerDns) -> Value {
    json!({
        "nameservers": [dns.nameserver.to_string()],
        "domain": dns.search,
        "search": [dns.search],
    })
}
