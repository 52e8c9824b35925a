//! The CNI protocol as the `overlay-cni` plugin speaks it (CNI spec 1.0.0; 0.4.0
//! configurations are accepted too): the `CNI_*` environment, the plugin configuration
//! on stdin, the ADD result (merged into a `prevResult` when chained after another
//! interface plugin, in [`crate::runtimes::cni_result`]) and the error object. Pure functions: nothing here talks to the
//! system, so all of it is unit-tested.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::ipam;

pub use super::cni_result::{add_result, prev_addresses, version_result, Attachment};

/// The specification versions the plugin implements (ADD, DEL, CHECK, VERSION).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0"];
/// What errors and VERSION report when the input names no supported version.
pub const DEFAULT_VERSION: &str = "1.0.0";

/// Error codes: the spec's well-known ones (0-99) and this plugin's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// ADD for a (container, interface) that is already on the network, or an interface
    /// of that name already in the container (the spec requires an error then).
    pub const ALREADY_ADDED: u32 = 100;
    /// CHECK found the container's networking not as ADD left it.
    pub const DRIFT: u32 = 101;
    /// The cluster refused: the address is taken or outside the subnet, the pool is
    /// exhausted, the record belongs to another node.
    pub const REFUSED: u32 = 102;
    /// The local agent did not start forwarding for the new endpoint.
    pub const NOT_ATTACHED: u32 = 103;
}

/// A CNI error result: `{"cniVersion", "code", "msg", "details"}` on stdout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (CNI error {code}): {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The `CNI_*` parameters of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    /// Empty for VERSION.
    pub container_id: String,
    /// Required by ADD and CHECK, optional for DEL.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: Vec<(String, String)>,
}

/// Whether `id` is a container ID as the spec defines it: an alphanumeric character,
/// then alphanumerics, `_`, `.` or `-`.
pub fn valid_container_id(id: &str) -> bool {
    id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether Linux accepts `name` as an interface name (dev_valid_name).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Reads the invocation from the environment (`get` is `std::env::var` in the plugin).
/// Every missing or invalid variable is named in one error (code 4).
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let invalid = |problems: Vec<String>| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "invalid CNI environment variables",
            problems.join("; "),
        )
    };
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some(other) => {
            return Err(invalid(vec![format!(
                "CNI_COMMAND={other:?} is not one of ADD, DEL, CHECK, VERSION"
            )]))
        }
        None => return Err(invalid(vec!["CNI_COMMAND is not set".to_string()])),
    };
    if command == Command::Version {
        return Ok(Invocation {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: Vec::new(),
        });
    }
    let mut problems = Vec::new();
    let container_id = get("CNI_CONTAINERID").unwrap_or_default();
    if container_id.is_empty() {
        problems.push("CNI_CONTAINERID is not set".to_string());
    } else if !valid_container_id(&container_id) {
        problems.push(format!(
            "CNI_CONTAINERID={container_id:?} must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
        ));
    }
    let netns = get("CNI_NETNS").filter(|n| !n.is_empty());
    match &netns {
        None if command != Command::Del => problems.push("CNI_NETNS is not set".to_string()),
        Some(path) if !Path::new(path).is_absolute() => {
            problems.push(format!("CNI_NETNS={path:?} is not an absolute path"))
        }
        _ => {}
    }
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    if ifname.is_empty() {
        problems.push("CNI_IFNAME is not set".to_string());
    } else if !valid_ifname(&ifname) {
        problems.push(format!(
            "CNI_IFNAME={ifname:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"
        ));
    }
    let mut args = Vec::new();
    for pair in get("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => args.push((k.to_string(), v.to_string())),
            _ => problems.push(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")),
        }
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(Invocation {
        command,
        container_id,
        netns: netns.map(PathBuf::from),
        ifname,
        args,
    })
}

/// The plugin's configuration object, as the runtime hands it over on stdin.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// The conflist's name (unused: the overlay network is `network`).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "type")]
    pub plugin_type: Option<String>,
    /// The overlay network to join (`overlay-ctl network list`).
    #[serde(default)]
    pub network: Option<String>,
    /// The agent's state directory holding its control socket [default /run/overlay].
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Append the plugin's log here (besides stderr, which runtimes often drop).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// Passed through into the result's `dns`.
    #[serde(default)]
    pub dns: Option<Value>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(default)]
    pub args: Option<Value>,
}

/// A configuration that passed [`parse_config`]: a supported version and a network.
#[derive(Clone, Debug)]
pub struct Config {
    pub conf: NetConf,
    pub network: String,
}

/// The `cniVersion` of raw input if it is one this plugin speaks (for error results).
pub fn input_version(stdin: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    let version = value.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS
        .contains(&version)
        .then(|| version.to_string())
}

/// Decodes and validates the configuration (codes 6, 1, 2, 7 in that order).
pub fn parse_config(stdin: &[u8]) -> Result<Config, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(CniError::new(
            code::DECODE,
            "cannot decode the network configuration",
            "it is not a JSON object",
        ));
    };
    match object.get("cniVersion") {
        Some(Value::String(v)) if SUPPORTED_VERSIONS.contains(&v.as_str()) => {}
        other => {
            let given = other.map(Value::to_string).unwrap_or_else(|| "none".into());
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "cniVersion {given} is not supported; supported versions: {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
    }
    let conf: NetConf = serde_json::from_value(value.clone()).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if let Some(ipam) = &conf.ipam {
        if ipam.as_object().is_some_and(|o| !o.is_empty()) {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "unsupported field in the network configuration",
                format!("ipam: {ipam}: addresses come from the overlay's cluster IPAM; remove the ipam section"),
            ));
        }
    }
    let network = conf.network.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            "the \"network\" key (the overlay network to join, e.g. \"net1\") is missing",
        )
    })?;
    ipam::validate_name(&network).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            format!("network: {e}"),
        )
    })?;
    if conf.dns.as_ref().is_some_and(|d| !d.is_object()) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            "dns must be an object",
        ));
    }
    Ok(Config { conf, network })
}

/// The address asked for, if any: `CNI_ARGS` `IP=a.b.c.d` (as the `static` IPAM plugin
/// reads it) or the `ips` capability (`runtimeConfig.ips`, e.g. `["10.100.0.9/24"]`).
pub fn requested_ip(inv: &Invocation, conf: &NetConf) -> Result<Option<Ipv4Addr>, CniError> {
    let bad = |what: String| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid requested address",
            format!("{what}: expected one IPv4 address"),
        )
    };
    if let Some((_, v)) = inv.args.iter().find(|(k, _)| k == "IP") {
        let ip = v.split('/').next().unwrap_or_default();
        return ip
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("CNI_ARGS IP={v}")));
    }
    let ips = conf
        .runtime_config
        .as_ref()
        .and_then(|rc| rc.get("ips"))
        .and_then(Value::as_array);
    match ips.map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([one]) => one
            .as_str()
            .and_then(|s| s.split('/').next())
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| bad(format!("runtimeConfig.ips {one}"))),
        Some(more) => Err(bad(format!("runtimeConfig.ips has {} entries", more.len()))),
    }
}

/// The endpoint name of a (container, interface) attachment: the container ID (up to 52
/// characters, which keeps containerd's 64-hex IDs recognisable) and a hash of the whole
/// ID and the interface name, so that each attachment has its own name and DEL finds
/// it again from the same two variables.
pub fn endpoint_id(container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let prefix: String = container_id.chars().take(52).collect();
    format!("{prefix}-{:08x}", hash & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];

    #[test]
    fn environment() {
        let inv = parse_env(env(ADD)).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.netns.as_deref(), Some(Path::new("/run/netns/x")));
        let version = parse_env(env(&[("CNI_COMMAND", "VERSION")])).unwrap();
        assert_eq!(version.command, Command::Version);
        // DEL does not need the namespace.
        let del = parse_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(del.netns, None);

        let err = parse_env(env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            assert!(err.details.contains(var), "{err:?}");
        }
        assert_eq!(parse_env(env(&[])).unwrap_err().code, 4);
        assert_eq!(
            parse_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err().code,
            4
        );
        for (k, v) in [
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "averyveryverylongname"),
            ("CNI_IFNAME", "a/b"),
            ("CNI_NETNS", "relative/path"),
            ("CNI_ARGS", "novalue"),
        ] {
            let mut pairs: Vec<(&str, &str)> =
                ADD.iter().filter(|(n, _)| *n != k).copied().collect();
            pairs.push((k, v));
            let err = parse_env(env(&pairs)).unwrap_err();
            assert_eq!(err.code, 4, "{k}={v}");
            assert!(err.details.contains(k), "{err:?}");
        }
    }

    #[test]
    fn configuration() {
        let ok = parse_config(
            br#"{"cniVersion":"1.0.0","name":"n","type":"overlay-cni","network":"net1"}"#,
        )
        .unwrap();
        assert_eq!(ok.network, "net1");
        assert!(parse_config(br#"{"cniVersion":"0.4.0","network":"net1"}"#).is_ok());
        let code_of = |s: &str| parse_config(s.as_bytes()).unwrap_err().code;
        assert_eq!(code_of("not json"), code::DECODE);
        assert_eq!(code_of("[1]"), code::DECODE);
        assert_eq!(code_of(r#"{"cniVersion":"0.3.1","network":"net1"}"#), 1);
        assert_eq!(code_of(r#"{"cniVersion":"9.9.9","network":"net1"}"#), 1);
        assert_eq!(code_of(r#"{"network":"net1"}"#), 1);
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0","network":"a/b"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0","network":7}"#), 6);
        let ipam = parse_config(
            br#"{"cniVersion":"1.0.0","network":"net1","ipam":{"type":"host-local"}}"#,
        )
        .unwrap_err();
        assert_eq!(ipam.code, code::UNSUPPORTED_FIELD);
        assert!(ipam.details.contains("ipam") && ipam.details.contains("host-local"));
    }

    #[test]
    fn requested_addresses() {
        let conf = NetConf::default();
        let mut inv = parse_env(env(ADD)).unwrap();
        assert_eq!(requested_ip(&inv, &conf).unwrap(), None);
        inv.args = vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("IP".into(), "10.1.0.9".into()),
        ];
        assert_eq!(
            requested_ip(&inv, &conf).unwrap(),
            Some(Ipv4Addr::new(10, 1, 0, 9))
        );
        inv.args.clear();
        let conf = NetConf {
            runtime_config: Some(json!({"ips": ["10.1.0.7/16"]})),
            ..NetConf::default()
        };
        assert_eq!(
            requested_ip(&inv, &conf).unwrap(),
            Some(Ipv4Addr::new(10, 1, 0, 7))
        );
        let conf = NetConf {
            runtime_config: Some(json!({"ips": ["x"]})),
            ..NetConf::default()
        };
        assert_eq!(requested_ip(&inv, &conf).unwrap_err().code, 7);
    }

    #[test]
    fn endpoint_ids_are_names_and_differ() {
        let long = "a".repeat(64);
        for (cid, ifname) in [("c1", "eth0"), (long.as_str(), "eth0"), ("x.y_z-1", "net1")] {
            let id = endpoint_id(cid, ifname);
            assert!(ipam::validate_name(&id).is_ok(), "{id}");
            assert_eq!(id, endpoint_id(cid, ifname));
        }
        assert_ne!(endpoint_id("c1", "eth0"), endpoint_id("c1", "eth1"));
        assert_ne!(
            endpoint_id(&long, "eth0"),
            endpoint_id(&format!("{long}b"), "eth0")
        );
    }
}
