//! The CNI results the `overlay-cni` plugin prints: ADD's (merged into a `prevResult`
//! when chained after another interface plugin), the addresses a `prevResult` holds (for
//! CHECK) and VERSION's. Pure functions, unit-tested.
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};

use super::cni::{DEFAULT_VERSION, SUPPORTED_VERSIONS};

/// What ADD created, for its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub host_ifname: String,
    pub host_mac: String,
    pub container_ifname: String,
    pub container_mac: String,
    pub mtu: u32,
    pub sandbox: String,
    pub address: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// Whether the container's default route goes via this network's gateway (ADD keeps
    /// a default route the container already had).
    pub default_route: bool,
}

/// The ADD result in `version`'s format, appended to `prev` when chained after another
/// interface plugin (its interfaces, IPs, routes and DNS are kept).
pub fn add_result(
    version: &str,
    attachment: &Attachment,
    dns: Option<&Value>,
    prev: Option<&Value>,
) -> Value {
    let mut result = prev
        .filter(|p| p.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    result["cniVersion"] = json!(version);
    let mut interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let container_index = interfaces.len() + 1;
    interfaces.push(json!({
        "name": attachment.host_ifname,
        "mac": attachment.host_mac,
    }));
    let mut container = json!({
        "name": attachment.container_ifname,
        "mac": attachment.container_mac,
        "sandbox": attachment.sandbox,
    });
    if version != "0.4.0" {
        container["mtu"] = json!(attachment.mtu);
    }
    interfaces.push(container);
    result["interfaces"] = Value::Array(interfaces);

    let mut ip = json!({
        "address": attachment.address.to_string(),
        "gateway": attachment.gateway.to_string(),
        "interface": container_index,
    });
    if version == "0.4.0" {
        ip["version"] = json!("4");
    }
    let mut ips = result["ips"].as_array().cloned().unwrap_or_default();
    ips.push(ip);
    result["ips"] = Value::Array(ips);

    let mut routes = result["routes"].as_array().cloned().unwrap_or_default();
    if attachment.default_route {
        routes.push(json!({"dst": "0.0.0.0/0", "gw": attachment.gateway.to_string()}));
    }
    result["routes"] = Value::Array(routes);

    let prev_dns = result
        .get("dns")
        .filter(|d| d.as_object().is_some_and(|o| !o.is_empty()))
        .cloned();
    result["dns"] = prev_dns
        .or_else(|| dns.cloned())
        .unwrap_or_else(|| json!({}));
    result
}

/// The IPv4 addresses a `prevResult` assigns to interface `ifname` in `sandbox`.
pub fn prev_addresses(prev: &Value, ifname: &str, sandbox: &str) -> Vec<Ipv4Network> {
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let ours: Vec<usize> = interfaces
        .iter()
        .enumerate()
        .filter(|(_, i)| i["name"] == ifname && i["sandbox"] == sandbox)
        .map(|(n, _)| n)
        .collect();
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| {
            ip["interface"]
                .as_u64()
                .is_some_and(|n| ours.contains(&(n as usize)))
        })
        .filter_map(|ip| ip["address"].as_str()?.parse().ok())
        .collect()
}

/// The VERSION result.
pub fn version_result(stdin: &[u8]) -> Value {
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .unwrap_or_else(|| DEFAULT_VERSION.to_string());
    json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            host_ifname: "ov0123456789".into(),
            host_mac: "aa:bb:cc:dd:ee:ff".into(),
            container_ifname: "eth0".into(),
            container_mac: "02:42:0a:64:00:02".into(),
            mtu: 1450,
            sandbox: "/run/netns/x".into(),
            address: "10.100.0.2/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 100, 0, 1),
            default_route: true,
        }
    }

    #[test]
    fn results() {
        let r = add_result("1.0.0", &attachment(), None, None);
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(r["interfaces"][1]["mtu"], 1450);
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["ips"][0]["address"], "10.100.0.2/24");
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["gw"], "10.100.0.1");
        assert_eq!(r["dns"], json!({}));
        assert_eq!(
            prev_addresses(&r, "eth0", "/run/netns/x"),
            vec!["10.100.0.2/24".parse::<Ipv4Network>().unwrap()]
        );
        assert!(prev_addresses(&r, "eth1", "/run/netns/x").is_empty());

        let old = add_result(
            "0.4.0",
            &attachment(),
            Some(&json!({"nameservers": ["10.0.0.53"]})),
            None,
        );
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["dns"]["nameservers"][0], "10.0.0.53");

        // Chained after another interface plugin: appended, indices shifted.
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "lo0"}],
            "ips": [{"address": "192.168.0.2/24", "interface": 0}], "dns": {"domain": "x"}});
        let chained = add_result("1.0.0", &attachment(), None, Some(&prev));
        assert_eq!(chained["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(chained["ips"][1]["interface"], 2);
        assert_eq!(chained["ips"][0]["address"], "192.168.0.2/24");
        assert_eq!(chained["dns"]["domain"], "x");

        let v = version_result(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0"]));
        assert_eq!(version_result(b"")["cniVersion"], "1.0.0");
    }
}
