//! Calling CNI plugins the way a runtime does (environment, configuration on stdin,
//! inside a host's network namespace) and what "nothing leaked" means for them.
use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use overlay_ctl::dataplane::netlink;
use serde_json::{json, Value};

use crate::cluster::{spawn_in, DevConsul, Node};

/// Debian's reference plugins (containernetworking-plugins).
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/cni";

/// What a plugin printed and returned.
#[derive(Debug)]
pub struct CniOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// stdout as JSON (`Value::Null` when empty or not JSON).
    pub json: Value,
}

impl CniOut {
    /// Panics with everything unless the plugin succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "plugin failed: {self:#?}");
        self
    }

    /// Asserts a spec error object with `code` on stdout and a non-zero exit.
    pub fn error(self, code: u64) -> Self {
        assert_ne!(self.code, 0, "plugin should have failed: {self:#?}");
        assert_eq!(self.json["code"], code, "wrong error code: {self:#?}");
        for key in ["cniVersion", "msg", "details"] {
            assert!(self.json[key].is_string(), "error without {key}: {self:#?}");
        }
        self
    }
}

/// Runs `plugin` in `node`'s namespace with exactly `env` (plus PATH) and `stdin`.
pub fn invoke(plugin: &str, node: &Node, env: &[(&str, &str)], stdin: &str) -> CniOut {
    let mut command = Command::new(plugin);
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("OVERLAY_CNI_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in(node.ns.ns().path(), &mut command);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    CniOut {
        code: output.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// One CNI command for (`container_id`, `ifname`) with `netns` and the plugin
/// configuration `conf`.
pub fn call(
    plugin: &str,
    node: &Node,
    command: &str,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
    conf: &Value,
) -> CniOut {
    let netns = netns.map(|p| p.display().to_string());
    let mut env = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", DEBIAN_PLUGIN_DIR),
    ];
    if let Some(path) = &netns {
        env.push(("CNI_NETNS", path));
    }
    invoke(plugin, node, &env, &conf.to_string())
}

/// The overlay plugin's configuration for `network` on `node`, as a runtime derives it
/// from a conflist (`name` and `cniVersion` from the list).
pub fn overlay_conf(node: &Node, network: &str, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "overlay",
        "type": "overlay-cni",
        "network": network,
        "stateDir": node.state_dir,
    })
}

/// What the plugin can leave behind on a node: the cluster's endpoint and address keys,
/// the host-side veths, the data-plane maps' entry counts.
#[derive(Debug, PartialEq, Eq)]
pub struct Footprint {
    pub kv: Vec<(String, String)>,
    pub veths: Vec<String>,
    pub maps: BTreeMap<String, u64>,
}

impl Footprint {
    pub fn of(consul: &DevConsul, node: &Node) -> Self {
        let mut kv = Vec::new();
        for prefix in ["overlay/endpoints/", "overlay/ipam/"] {
            kv.extend(
                consul
                    .kv_snapshot(prefix)
                    .into_iter()
                    .map(|(k, v, _)| (k, String::from_utf8_lossy(&v).into_owned())),
            );
        }
        Self {
            kv,
            veths: host_veths(node),
            maps: map_entries(node),
        }
    }
}

/// The overlay's host-side veths (`ov…`) in `node`'s namespace.
pub fn host_veths(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = node.ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::list_links(&handle)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n.starts_with("ov"))
            .collect()
    });
    names.sort();
    names
}

/// Entries of every data-plane map but the counters and the next-hop cache (which
/// follow the traffic and the kernel's neighbour table, not the containers), from the
/// agent's status.
pub fn map_entries(node: &Node) -> BTreeMap<String, u64> {
    let status = node.status().expect("agent status");
    status["maps"]
        .as_array()
        .expect("maps in status")
        .iter()
        .filter(|m| m["name"] != "COUNTERS" && m["name"] != "NEXTHOPS")
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["entries"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Interface `ifname` inside the namespace at `netns`: its first IPv4 address, or `None`
/// when there is no such interface.
pub fn interface_address(netns: &Path, ifname: &str) -> Option<Option<Ipv4Addr>> {
    let ns = overlay_ctl::dataplane::netns::NetNs::open_path("c", netns.to_path_buf()).ok()?;
    let ifname = ifname.to_string();
    ns.block_on(|| async move {
        let handle = netlink::connect().unwrap();
        let link = netlink::link_by_name(&handle, &ifname).await.ok()?;
        Some(netlink::first_ipv4(&handle, &link).await.ok())
    })
    .unwrap()
}
