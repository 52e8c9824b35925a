//! The `overlay-cni` plugin called directly, as a runtime calls it, against a real agent
//! and the Consul dev server: the spec's ADD, CHECK, DEL and VERSION, every error with
//! its code, chaining with Debian's portmap, tuning and bandwidth, and nothing leaked
//! (cluster keys, host veths, map entries) whatever the outcome.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::TryStreamExt as _;
use overlay_ctl::dataplane::netlink;
use overlay_tests::{
    bins,
    cluster::{start_cluster, Bins, DevConsul, Node},
    cni::{self, call, interface_address, invoke, overlay_conf, CniOut, Footprint},
    harness::{require_root, unique_name, wait_until, TestNs},
    net,
    topology::Underlay,
};
use serde_json::{json, Value};

const BINS: Bins = bins!();
const PLUGIN: &str = env!("CARGO_BIN_EXE_overlay-cni-test");
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

/// One node with its agent, and network net1 10.100.0.0/24.
fn one_node(underlay: &Underlay) -> (DevConsul, Node) {
    let (consul, mut nodes) = start_cluster(&BINS, underlay, 1, None, &[]);
    let node = nodes.remove(0);
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    // The baseline is taken once the agent forwards for both networks.
    wait_until("the agent to apply net1", Duration::from_secs(10), || {
        cni::map_entries(&node).get("NETWORKS") == Some(&2)
    });
    (consul, node)
}

/// Waits until the node's footprint is `want` again (map entries follow the agent's
/// reconcile; keys and veths are checked at once by the caller when it matters).
fn assert_back_to(consul: &DevConsul, node: &Node, want: &Footprint, after: &str) {
    let mut last = None;
    let converged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(after, Duration::from_secs(10), || {
            let now = Footprint::of(consul, node);
            let same = &now == want;
            last = Some(now);
            same
        })
    }));
    assert!(
        converged.is_ok(),
        "something leaked {after}:\nbefore: {want:#?}\nnow: {last:#?}"
    );
}

fn add(node: &Node, cid: &str, netns: &Path, version: &str) -> CniOut {
    call(
        PLUGIN,
        node,
        "ADD",
        cid,
        Some(netns),
        "eth0",
        &overlay_conf(node, "net1", version),
    )
}

fn with_prev(mut conf: Value, prev: &Value) -> Value {
    conf["prevResult"] = prev.clone();
    conf
}

/// The address an ADD result gave the container.
fn result_ip(result: &Value) -> Ipv4Addr {
    let address = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    address.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn add_check_del_and_a_second_add() {
    require_root();
    let underlay = Underlay::new();
    let (consul, node) = one_node(&underlay);
    let container = TestNs::new("cnic");
    let netns = container.ns().path();
    let before = Footprint::of(&consul, &node);

    let added = add(&node, "c1", netns, "1.0.0").ok();
    let result = &added.json;
    assert_eq!(result["cniVersion"], "1.0.0", "{result:#}");
    let interfaces = result["interfaces"].as_array().expect("interfaces");
    assert_eq!(interfaces.len(), 2, "{result:#}");
    let host_veth = interfaces[0]["name"].as_str().unwrap().to_string();
    assert!(interfaces[0].get("sandbox").is_none(), "{result:#}");
    assert_eq!(interfaces[1]["name"], "eth0");
    assert_eq!(interfaces[1]["sandbox"], netns.display().to_string());
    assert_eq!(interfaces[1]["mtu"], 1450);
    let ip = result_ip(result);
    assert_eq!(result["ips"][0]["address"], format!("{ip}/24"));
    assert_eq!(result["ips"][0]["gateway"], GATEWAY.to_string());
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.100.0.1"}])
    );
    // No `dns` in the config: the result names the agent's responder on the gateway.
    assert_eq!(
        result["dns"],
        json!({"nameservers": [GATEWAY.to_string()], "domain": "net1", "search": ["net1"]}),
        "{result:#}"
    );
    // The MAC in the result is the container interface's, derived from its address.
    let o = ip.octets();
    assert_eq!(
        interfaces[1]["mac"],
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    );

    // What the result says is what is there.
    assert_eq!(interface_address(netns, "eth0"), Some(Some(ip)));
    assert!(cni::host_veths(&node).contains(&host_veth));
    let listed = node.cli(&["endpoint", "list", "-n", "net1", "--json"]).ok();
    let endpoints: Value = serde_json::from_str(&listed.stdout).unwrap();
    let endpoint = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == ip.to_string())
        .unwrap_or_else(|| panic!("no endpoint with {ip}: {endpoints:#}"));
    assert_eq!(endpoint["container"], "cni:c1:eth0");
    assert_eq!(endpoint["ifname"], host_veth.as_str());
    // Forwarded for at once: the gateway answers from inside the container.
    assert!(
        container.run(|| net::ping_until_reply(GATEWAY, Duration::from_secs(5))),
        "no reply from the gateway inside the container"
    );

    let conf = overlay_conf(&node, "net1", "1.0.0");
    let checked = call(
        PLUGIN,
        &node,
        "CHECK",
        "c1",
        Some(netns),
        "eth0",
        &with_prev(conf.clone(), result),
    )
    .ok();
    assert!(checked.stdout.trim().is_empty(), "{checked:#?}");

    // A second ADD of the same attachment, and one with another container ID for an
    // interface name the namespace already has: refused, nothing changes.
    let added_once = Footprint::of(&consul, &node);
    let again = add(&node, "c1", netns, "1.0.0").error(100);
    assert!(
        again.json["details"]
            .as_str()
            .unwrap()
            .contains("DEL it first"),
        "{again:#?}"
    );
    add(&node, "other", netns, "1.0.0").error(100);
    assert_eq!(Footprint::of(&consul, &node), added_once);
    // Another container asking for the address c1 holds: refused before any plumbing.
    let second = TestNs::new("cnic");
    let taken = format!("IP={ip}");
    let second_ns = second.ns().path().display().to_string();
    let out = invoke(
        PLUGIN,
        &node,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c2"),
            ("CNI_NETNS", second_ns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", taken.as_str()),
        ],
        &overlay_conf(&node, "net1", "1.0.0").to_string(),
    )
    .error(102);
    assert!(
        out.json["details"]
            .as_str()
            .unwrap()
            .contains("already allocated"),
        "{out:#?}"
    );
    assert_eq!(interface_address(second.ns().path(), "eth0"), None);
    assert_eq!(Footprint::of(&consul, &node), added_once);
    assert_eq!(interface_address(netns, "eth0"), Some(Some(ip)));

    // Drift: the address removed inside the container.
    container.block_on(|| async {
        let handle = netlink::connect().unwrap();
        let link = netlink::link_by_name(&handle, "eth0").await.unwrap();
        let mut addresses = handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(message) = addresses.try_next().await.unwrap() {
            handle.address().del(message).execute().await.unwrap();
        }
    });
    let drift = call(
        PLUGIN,
        &node,
        "CHECK",
        "c1",
        Some(netns),
        "eth0",
        &with_prev(conf.clone(), result),
    )
    .error(101);
    let details = drift.json["details"].as_str().unwrap();
    assert!(details.contains(&format!("expected {ip}/24")), "{drift:#?}");
    assert!(
        details.contains(&format!("address {ip}/24 of prevResult")),
        "{drift:#?}"
    );

    // With logFile, the log goes there (stdout keeps only the result).
    let log = std::env::temp_dir().join(unique_name("ovl-cni-log-"));
    let mut logged = conf.clone();
    logged["logFile"] = json!(log);
    let del = call(PLUGIN, &node, "DEL", "c1", Some(netns), "eth0", &logged).ok();
    assert!(del.stdout.trim().is_empty(), "{del:#?}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(log_text.contains("DEL: detached"), "log file: {log_text:?}");
    assert_eq!(interface_address(netns, "eth0"), None);
    assert_back_to(&consul, &node, &before, "after DEL");
    // DEL is idempotent.
    let twice = call(PLUGIN, &node, "DEL", "c1", Some(netns), "eth0", &conf).ok();
    assert!(twice.stdout.trim().is_empty(), "{twice:#?}");
    assert_eq!(Footprint::of(&consul, &node), before);

    // CHECK now sees no record and no interface.
    let gone = call(
        PLUGIN,
        &node,
        "CHECK",
        "c1",
        Some(netns),
        "eth0",
        &with_prev(conf, result),
    )
    .error(101);
    let details = gone.json["details"].as_str().unwrap();
    assert!(details.contains("no endpoint record"), "{gone:#?}");
    assert!(details.contains("interface eth0 is missing"), "{gone:#?}");
}

#[test]
fn errors_have_the_spec_codes_and_leave_nothing() {
    require_root();
    let underlay = Underlay::new();
    let (consul, node) = one_node(&underlay);
    let container = TestNs::new("cnic");
    let netns = container.ns().path().display().to_string();
    let before = Footprint::of(&consul, &node);
    let conf = overlay_conf(&node, "net1", "1.0.0").to_string();
    let full = |command: &'static str| {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    let without = |var: &str| -> Vec<(&str, &str)> {
        full("ADD").into_iter().filter(|(k, _)| *k != var).collect()
    };
    let replaced = |var: &'static str, value: &'static str| -> Vec<(&str, &str)> {
        let mut env = without(var);
        env.push((var, value));
        env
    };

    // DEL of an attachment that was never added.
    let del = invoke(PLUGIN, &node, &full("DEL"), &conf).ok();
    assert!(del.stdout.trim().is_empty(), "{del:#?}");

    // Missing or bad CNI_* variables: code 4, naming the variable.
    for (env, var) in [
        (without("CNI_COMMAND"), "CNI_COMMAND"),
        (replaced("CNI_COMMAND", "FROB"), "CNI_COMMAND"),
        (without("CNI_CONTAINERID"), "CNI_CONTAINERID"),
        (replaced("CNI_CONTAINERID", "-bad/id"), "CNI_CONTAINERID"),
        (without("CNI_NETNS"), "CNI_NETNS"),
        (replaced("CNI_NETNS", "relative/ns"), "CNI_NETNS"),
        (without("CNI_IFNAME"), "CNI_IFNAME"),
        (replaced("CNI_IFNAME", "much-too-long-name"), "CNI_IFNAME"),
    ] {
        let out = invoke(PLUGIN, &node, &env, &conf).error(4);
        assert!(
            out.json["details"].as_str().unwrap().contains(var),
            "{var}: {out:#?}"
        );
    }
    // A namespace that does not exist: the container is unknown.
    invoke(
        PLUGIN,
        &node,
        &replaced("CNI_NETNS", "/run/netns/overlay-no-such-ns"),
        &conf,
    )
    .error(3);
    // An unknown network: invalid configuration, for ADD and CHECK; DEL has nothing to do.
    let unknown = overlay_conf(&node, "nosuch", "1.0.0").to_string();
    let out = invoke(PLUGIN, &node, &full("ADD"), &unknown).error(7);
    assert!(
        out.json["details"]
            .as_str()
            .unwrap()
            .contains("\"nosuch\" does not exist"),
        "{out:#?}"
    );
    invoke(PLUGIN, &node, &full("DEL"), &unknown).ok();
    // Versions this plugin does not speak, and undecodable input.
    for version in ["0.3.1", "2.0.0", "x"] {
        let old = overlay_conf(&node, "net1", version).to_string();
        let out = invoke(PLUGIN, &node, &full("ADD"), &old).error(1);
        assert_eq!(out.json["cniVersion"], "1.0.0", "{out:#?}");
    }
    invoke(PLUGIN, &node, &full("ADD"), "{not json").error(6);
    let mut with_ipam = overlay_conf(&node, "net1", "1.0.0");
    with_ipam["ipam"] = json!({"type": "host-local"});
    let out = invoke(PLUGIN, &node, &full("ADD"), &with_ipam.to_string()).error(2);
    assert!(
        out.json["details"].as_str().unwrap().contains("ipam"),
        "{out:#?}"
    );
    let mut no_network = overlay_conf(&node, "net1", "1.0.0");
    no_network.as_object_mut().unwrap().remove("network");
    invoke(PLUGIN, &node, &full("ADD"), &no_network.to_string()).error(7);
    // An address outside the subnet, asked for through CNI_ARGS.
    let mut env = full("ADD");
    env.push(("CNI_ARGS", "IgnoreUnknown=1;IP=10.200.0.5"));
    invoke(PLUGIN, &node, &env, &conf).error(102);

    // VERSION.
    let version = invoke(
        PLUGIN,
        &node,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"0.4.0"}"#,
    )
    .ok();
    assert_eq!(
        version.json,
        json!({"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0"]})
    );

    assert_eq!(interface_address(container.ns().path(), "eth0"), None);
    assert_eq!(Footprint::of(&consul, &node), before);
}

#[test]
fn del_after_the_namespace_is_gone() {
    require_root();
    let underlay = Underlay::new();
    let (consul, node) = one_node(&underlay);
    let before = Footprint::of(&consul, &node);
    let conf = overlay_conf(&node, "net1", "1.0.0");
    for with_netns in [true, false] {
        let container = TestNs::new("cnic");
        let netns = container.ns().path().to_path_buf();
        add(&node, "gone", &netns, "1.0.0").ok();
        assert_ne!(Footprint::of(&consul, &node), before);
        drop(container); // the namespace and the veth pair with it
        assert!(!netns.exists());
        let netns_arg = with_netns.then_some(netns.as_path());
        call(PLUGIN, &node, "DEL", "gone", netns_arg, "eth0", &conf).ok();
        assert_back_to(&consul, &node, &before, "after DEL of a gone namespace");
    }
}

#[test]
fn add_fails_cleanly_and_del_succeeds_while_the_agent_is_down() {
    require_root();
    let underlay = Underlay::new();
    let (consul, mut node) = one_node(&underlay);
    let container = TestNs::new("cnic");
    let netns = container.ns().path();
    let earlier = TestNs::new("cnic");
    let before = Footprint::of(&consul, &node);
    let conf = overlay_conf(&node, "net1", "1.0.0");
    // A container added while the agent ran.
    add(&node, "c0", earlier.ns().path(), "1.0.0").ok();
    let kv_with_c0 =
        consul.kv_snapshot("overlay/endpoints/").len() + consul.kv_snapshot("overlay/ipam/").len();
    let veths_with_c0 = cni::host_veths(&node);
    node.stop_agent().expect("the agent stops");

    let out = add(&node, "c1", netns, "1.0.0").error(11);
    assert!(
        out.json["msg"]
            .as_str()
            .unwrap()
            .contains("agent is not reachable"),
        "{out:#?}"
    );
    assert!(
        out.json["details"]
            .as_str()
            .unwrap()
            .contains("nothing was changed"),
        "{out:#?}"
    );
    assert_eq!(interface_address(netns, "eth0"), None);
    assert_eq!(cni::host_veths(&node), veths_with_c0);
    let kv_now = || {
        consul.kv_snapshot("overlay/endpoints/").len() + consul.kv_snapshot("overlay/ipam/").len()
    };
    assert_eq!(kv_now(), kv_with_c0);

    // DEL is best effort: the veth goes now, the record and address once the agent is
    // back and sees it gone.
    call(
        PLUGIN,
        &node,
        "DEL",
        "c0",
        Some(earlier.ns().path()),
        "eth0",
        &conf,
    )
    .ok();
    assert_eq!(interface_address(earlier.ns().path(), "eth0"), None);
    assert_eq!(cni::host_veths(&node), before.veths);
    assert_eq!(kv_now(), kv_with_c0);

    node.start_agent(&[]);
    node.wait_registered(Duration::from_secs(20));
    assert_back_to(&consul, &node, &before, "after the agent came back");
    // And the ADD that was refused works now.
    let added = add(&node, "c1", netns, "1.0.0").ok();
    assert_eq!(
        interface_address(netns, "eth0"),
        Some(Some(result_ip(&added.json)))
    );
    call(PLUGIN, &node, "DEL", "c1", Some(netns), "eth0", &conf).ok();
    assert_back_to(&consul, &node, &before, "after DEL");
}

/// The chain a conflist with portmap, tuning and bandwidth after overlay-cni runs: each
/// plugin gets the previous one's result as prevResult and must accept it.
#[test]
fn debian_plugins_chain_after_it() {
    require_root();
    let underlay = Underlay::new();
    let (consul, node) = one_node(&underlay);
    let before = Footprint::of(&consul, &node);
    for (n, version) in ["1.0.0", "0.4.0"].into_iter().enumerate() {
        let container = TestNs::new("cnic");
        let netns = container.ns().path();
        let cid = format!("chain{n}");
        let host_port = 18080 + n as u16;
        let first = call(
            PLUGIN,
            &node,
            "ADD",
            &cid,
            Some(netns),
            "eth0",
            &overlay_conf(&node, "net1", version),
        )
        .ok();
        let ip = result_ip(&first.json);
        if version == "0.4.0" {
            assert_eq!(first.json["ips"][0]["version"], "4", "{:#}", first.json);
        }
        let chained = [
            json!({"type": "portmap", "capabilities": {"portMappings": true},
                "runtimeConfig": {"portMappings": [
                    {"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]}}),
            json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "321"}}),
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true},
                "runtimeConfig": {"bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000}}}),
        ];
        let mut prev = first.json.clone();
        let mut confs = Vec::new();
        for plugin_conf in &chained {
            let mut conf = plugin_conf.clone();
            conf["cniVersion"] = json!(version);
            conf["name"] = json!("overlay");
            let binary = format!(
                "{}/{}",
                cni::DEBIAN_PLUGIN_DIR,
                conf["type"].as_str().unwrap()
            );
            let out = call(
                &binary,
                &node,
                "ADD",
                &cid,
                Some(netns),
                "eth0",
                &with_prev(conf.clone(), &prev),
            )
            .ok();
            assert_eq!(
                result_ip(&out.json),
                ip,
                "{} lost the address: {out:#?}",
                conf["type"]
            );
            assert_eq!(out.json["cniVersion"], version);
            prev = out.json;
            confs.push((binary, conf));
        }
        // Each did its job with what it read from prevResult.
        let rules = iptables_save(&node);
        assert!(
            rules.contains(&format!("--dport {host_port}")) && rules.contains(&format!("{ip}:80")),
            "no portmap DNAT rule for {ip}:80:\n{rules}"
        );
        assert_eq!(
            container.run(|| std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap()),
            "321\n"
        );
        // CHECK of the whole chain with its final result.
        call(
            PLUGIN,
            &node,
            "CHECK",
            &cid,
            Some(netns),
            "eth0",
            &with_prev(overlay_conf(&node, "net1", version), &prev),
        )
        .ok();
        // DEL in reverse order, as runtimes do.
        for (binary, conf) in confs.iter().rev() {
            call(
                binary,
                &node,
                "DEL",
                &cid,
                Some(netns),
                "eth0",
                &with_prev(conf.clone(), &prev),
            )
            .ok();
        }
        call(
            PLUGIN,
            &node,
            "DEL",
            &cid,
            Some(netns),
            "eth0",
            &with_prev(overlay_conf(&node, "net1", version), &prev),
        )
        .ok();
        assert!(
            !iptables_save(&node).contains(&format!("{ip}:80")),
            "portmap's rule outlived DEL"
        );
        assert_back_to(&consul, &node, &before, "after the chain's DEL");
    }
}

/// A stand-in for the agent on its own socket: answers `status` with the real agent's
/// status (so the plugin finds Consul and the node) and refuses `reconcile`, the last
/// step of an ADD, after the address, the veth and the endpoint record exist.
struct RefusingAgent {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RefusingAgent {
    fn start(real: &Node) -> Self {
        let status = real.status().expect("the real agent's status");
        let dir = std::env::temp_dir().join(unique_name("ovl-fake-"));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("agent.sock")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let request: Value = serde_json::from_str(&line).unwrap_or_default();
                let reply = match request["op"].as_str() {
                    Some("status") => json!({"Ok": status}),
                    _ => json!({"Err": "injected failure"}),
                };
                let _ = writeln!(reader.get_mut(), "{reply}");
            }
        });
        Self {
            dir,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RefusingAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_failure_after_plumbing_is_undone() {
    require_root();
    let underlay = Underlay::new();
    let (consul, node) = one_node(&underlay);
    let container = TestNs::new("cnic");
    let netns = container.ns().path();
    let before = Footprint::of(&consul, &node);
    let fake = RefusingAgent::start(&node);
    let mut conf = overlay_conf(&node, "net1", "1.0.0");
    conf["stateDir"] = json!(fake.dir);

    let out = call(PLUGIN, &node, "ADD", "c1", Some(netns), "eth0", &conf).error(103);
    assert!(
        out.json["details"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{out:#?}"
    );
    // The address, the veth (and with it the container's end) and the record are gone;
    // the real agent, which may have seen the record for a moment, lets go of it too.
    assert_eq!(interface_address(netns, "eth0"), None);
    assert_back_to(&consul, &node, &before, "after the failed ADD");
}

fn iptables_save(node: &Node) -> String {
    let mut command = std::process::Command::new("iptables-save");
    command
        .arg("-t")
        .arg("nat")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let child = overlay_tests::cluster::spawn_in(node.ns.ns().path(), &mut command);
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}
