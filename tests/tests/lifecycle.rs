//! The agent's own state, lifecycle and recovery (issue #12): what a SIGKILL of `run` or
//! `network create`, or a store outage in the middle of one, leaves is collected within
//! one collection period; records in the store never make the agent touch an interface
//! or a path; concurrent overlapping `network create`s cannot all succeed; a store that
//! comes back empty does not wipe the data plane and is refilled by the agents.
//!
//! Real agents and CLI processes against the dev server, as in `cluster.rs`. The pauses
//! at named points come from the test-only `OVERLAY_TEST_PAUSE` hook
//! (`overlay_ctl::testhook`); the clean-up observed is the product's own.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use overlay_tests::{
    bins,
    cluster::{start_cluster, Bins, DevConsul, Node},
    harness::{require_root, unique_name, wait_until},
    net,
    topology::Underlay,
};

const BINS: Bins = bins!();
const JOIN: Duration = Duration::from_secs(20);
/// Agents collect every second, store entries after 2 s unchanged.
const GC_ARGS: &[&str] = &[
    "--gc-interval",
    "1s",
    "--gc-grace",
    "2s",
    "--resync-interval",
    "1s",
];
/// One collection period (interval + grace) with a generous margin for a loaded machine.
const COLLECTED: Duration = Duration::from_secs(15);

/// A pause file: removed on drop, which lets a paused process go on.
struct Pause(PathBuf);

impl Pause {
    fn new() -> Self {
        Self(std::env::temp_dir().join(unique_name("overlay-pause-")))
    }

    fn env(&self, point: &str) -> String {
        format!("{point}:{}", self.0.display())
    }

    fn wait_reached(&self, what: &str) {
        wait_until(&format!("{what} to pause"), JOIN, || self.0.exists());
    }

    fn release(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.release();
    }
}

fn map_entries(node: &Node, map: &str) -> Option<u64> {
    let status = node.status()?;
    status["maps"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == map)?["entries"]
        .as_u64()
}

fn link_names(node: &Node) -> BTreeSet<String> {
    node.ns.block_on(|| async {
        let handle = overlay_ctl::dataplane::netlink::connect().unwrap();
        overlay_ctl::dataplane::netlink::list_links(&handle)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect()
    })
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn record_path(node: &Node, network: &str, name: &str) -> PathBuf {
    node.state_dir
        .join(format!("endpoints/{network}+{name}.json"))
}

/// Everything of endpoint `network/name` still present anywhere: KV keys, the local
/// record, the namespace, the host veth. Empty when it was collected.
fn leftovers(node: &Node, consul: &DevConsul, network: &str, name: &str) -> Vec<String> {
    let mut left = Vec::new();
    for (key, value, _) in consul.kv_snapshot("overlay/") {
        let value = String::from_utf8_lossy(&value);
        if key == format!("overlay/endpoints/{network}/{name}")
            || (key.starts_with(&format!("overlay/ipam/{network}/"))
                && value.contains(&format!("\"endpoint\":\"{name}\"")))
        {
            left.push(format!("key {key}"));
        }
    }
    if record_path(node, network, name).exists() {
        left.push("local record".into());
    }
    let netns = format!("ovl-{network}-{name}");
    if netns_exists(&netns) {
        left.push(format!("namespace {netns}"));
    }
    let veth = overlay_ctl::runtimes::container::host_ifname(network, name);
    if link_names(node).contains(&veth) {
        left.push(format!("veth {veth}"));
    }
    left
}

fn wait_collected(node: &Node, consul: &DevConsul, network: &str, name: &str, what: &str) {
    let started = Instant::now();
    let deadline = started + COLLECTED;
    loop {
        let mut last = leftovers(node, consul, network, name);
        let maps_clean = map_entries(node, "ENDPOINTS") == Some(0)
            && map_entries(node, "LOCAL_IFACES") == Some(0);
        if last.is_empty() && maps_clean {
            eprintln!("{what}: collected after {:?}", started.elapsed());
            return;
        }
        if !maps_clean {
            last.push("map entries".into());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still left after {COLLECTED:?}: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What must exist when `run` pauses at `point` (so a kill there leaves something).
fn assert_evidence(node: &Node, consul: &DevConsul, name: &str, point: &str) {
    let left = leftovers(node, consul, "net1", name);
    let expected: &[&str] = match point {
        "recorded" => &["local record"],
        "netns" => &["local record", "namespace"],
        "allocated" => &["local record", "namespace", "key overlay/ipam/"],
        "plumbed" => &["local record", "namespace", "key overlay/ipam/", "veth"],
        _ => &[
            "local record",
            "namespace",
            "key overlay/ipam/",
            "veth",
            "key overlay/endpoints/",
        ],
    };
    for thing in expected {
        assert!(
            left.iter().any(|l| l.starts_with(thing)),
            "paused at {point}: expected {thing} to exist, found {left:?}"
        );
    }
}

#[test]
fn a_run_killed_at_any_point_leaves_nothing_after_one_collection_period() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, GC_ARGS);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    for point in [
        "recorded",
        "netns",
        "allocated",
        "plumbed",
        "endpoint",
        "started",
    ] {
        let name = unique_name("k");
        let pause = Pause::new();
        let env = pause.env(point);
        let mut run = node.spawn_run_env(
            "net1",
            &name,
            &[("OVERLAY_TEST_PAUSE", env.as_str())],
            &["true"],
        );
        pause.wait_reached(&format!("run at {point}"));
        assert_evidence(node, &consul, &name, point);
        run.kill_cli();
        pause.release();
        wait_collected(node, &consul, "net1", &name, &format!("killed at {point}"));
    }
    let log = node.agent_log();
    assert!(
        log.contains("collected a left-over local endpoint"),
        "the agent logs what it collected"
    );
    let metrics = node.metrics().unwrap_or_default();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("overlay_gc_collected_total{kind=\"local_endpoint\"}")
            && !l.ends_with(" 0")),
        "collections are counted:\n{metrics}"
    );
    // The network is usable afterwards: no address or name was left taken.
    let out = node.cli(&["run", "-n", "net1", "--", "true"]);
    assert_eq!(out.code, 0, "{out:#?}");
}

/// Pids of the processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// `run` killed after its command's process exists but before this node's record names
/// it: the command never starts (no process is left that the agent could not account
/// for), and everything else is collected as after any other kill.
#[test]
fn a_run_killed_before_its_command_is_recorded_never_starts_it() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, GC_ARGS);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let name = unique_name("s");
    let marker = std::env::temp_dir().join(unique_name("overlay-ran-"));
    let marker_arg = marker.display().to_string();
    let pause = Pause::new();
    let env = pause.env("spawned");
    let mut run = node.spawn_run_env(
        "net1",
        &name,
        &[("OVERLAY_TEST_PAUSE", env.as_str())],
        &["touch", &marker_arg],
    );
    pause.wait_reached("run with its command's process created");
    assert_evidence(node, &consul, &name, "spawned");
    let record = std::fs::read_to_string(record_path(node, "net1", &name)).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert!(
        record["command"].is_null() && !record["owner"].is_null(),
        "owned by run, the command not recorded yet: {record}"
    );
    run.kill_cli();
    pause.release();
    wait_until("the unrecorded command's process to end", JOIN, || {
        processes_naming(&marker_arg).is_empty()
    });
    wait_collected(
        node,
        &consul,
        "net1",
        &name,
        "killed before its command started",
    );
    assert!(
        !marker.exists(),
        "the command ran although `run` died before recording it"
    );
}

#[test]
fn a_store_outage_during_run_leaves_nothing_once_it_is_back() {
    require_root();
    let underlay = Underlay::new();
    let data_dir = std::env::temp_dir().join(unique_name("consul-data-"));
    std::fs::create_dir_all(&data_dir).unwrap();
    let _remove = RemoveDir(data_dir.clone());
    let (mut consul, nodes) = start_cluster(&BINS, &underlay, 1, Some(&data_dir), GC_ARGS);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    for point in ["allocated", "plumbed", "endpoint"] {
        let name = unique_name("o");
        let pause = Pause::new();
        let env = pause.env(point);
        let run = node.spawn_run_env(
            "net1",
            &name,
            &[("OVERLAY_TEST_PAUSE", env.as_str())],
            &["true"],
        );
        pause.wait_reached(&format!("run at {point}"));
        assert_evidence(node, &consul, &name, point);
        consul.kill();
        pause.release();
        // `run` cannot finish or undo its work without the store; it gives up.
        let out = run.wait(Duration::from_secs(60));
        assert_ne!(out.code, -1, "run did not end without the store: {out:#?}");
        consul.restart();
        wait_collected(
            node,
            &consul,
            "net1",
            &name,
            &format!("store killed at {point}"),
        );
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The VNI and subnet claims of network `name`, and the network key, if any.
fn network_traces(consul: &DevConsul, name: &str) -> Vec<String> {
    let mut traces = Vec::new();
    for (key, value, _) in consul.kv_snapshot("overlay/") {
        let value = String::from_utf8_lossy(&value).to_string();
        if key == format!("overlay/networks/{name}")
            || (key.starts_with("overlay/vni/") && value == name)
            || (key == "overlay/subnets" && value.contains(&format!("\"{name}\"")))
        {
            traces.push(key);
        }
    }
    traces
}

#[test]
fn a_network_create_killed_or_cut_off_midway_leaves_no_claim() {
    require_root();
    let underlay = Underlay::new();
    let data_dir = std::env::temp_dir().join(unique_name("consul-data-"));
    std::fs::create_dir_all(&data_dir).unwrap();
    let _remove = RemoveDir(data_dir.clone());
    let (mut consul, nodes) = start_cluster(&BINS, &underlay, 1, Some(&data_dir), GC_ARGS);
    let node = &nodes[0];
    let mut third = 50;
    for point in ["subnet-claimed", "vni-claimed"] {
        for store_outage in [false, true] {
            third += 1;
            let name = unique_name("n");
            let subnet = format!("10.{third}.0.0/24");
            let pause = Pause::new();
            let env = pause.env(point);
            let mut create = node.spawn_cli_env(
                &["network", "create", &name, &subnet],
                &[("OVERLAY_TEST_PAUSE", env.as_str())],
            );
            pause.wait_reached(&format!("network create at {point}"));
            assert!(
                !network_traces(&consul, &name).is_empty(),
                "paused at {point}: nothing claimed yet"
            );
            if store_outage {
                consul.kill();
                pause.release();
                let out = create.wait(Duration::from_secs(60));
                assert_eq!(out.code, 1, "{out:#?}");
                consul.restart();
            } else {
                create.kill();
                pause.release();
            }
            let what = format!(
                "network create {} at {point}",
                if store_outage {
                    "cut off from the store"
                } else {
                    "killed"
                }
            );
            let started = Instant::now();
            wait_until(&format!("{what}: claims collected"), COLLECTED, || {
                network_traces(&consul, &name).is_empty()
            });
            eprintln!("{what}: collected after {:?}", started.elapsed());
            // The subnet is free again.
            node.cli(&["network", "create", &format!("{name}b"), &subnet])
                .ok();
        }
    }
    assert!(
        node.agent_log()
            .contains("collected a left-over subnet claim"),
        "the agent logs what it collected"
    );
}

#[test]
fn concurrent_overlapping_network_creates_never_both_succeed() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 3, None, &[]);
    for trial in 0..20u8 {
        let third = 100 + trial;
        // Pairwise overlapping, different names.
        let subnets = [
            format!("10.{third}.0.0/16"),
            format!("10.{third}.0.0/24"),
            format!("10.{third}.0.0/25"),
        ];
        let names: Vec<String> = (0..3).map(|i| format!("race{trial}x{i}")).collect();
        let creates: Vec<_> = nodes
            .iter()
            .zip(&names)
            .zip(&subnets)
            .map(|((node, name), subnet)| {
                node.spawn_cli_env(&["network", "create", name, subnet], &[])
            })
            .collect();
        let outputs: Vec<_> = creates
            .into_iter()
            .map(|c| c.wait(Duration::from_secs(30)))
            .collect();
        let succeeded = outputs.iter().filter(|o| o.code == 0).count();
        assert_eq!(succeeded, 1, "trial {trial}: {outputs:#?}");
        for out in outputs.iter().filter(|o| o.code != 0) {
            assert!(out.stderr.contains("overlaps"), "trial {trial}: {out:#?}");
        }
        let keys: Vec<String> = consul
            .kv_snapshot("overlay/networks/")
            .into_iter()
            .map(|(k, _, _)| k)
            .filter(|k| names.iter().any(|n| k.ends_with(&format!("/{n}"))))
            .collect();
        assert_eq!(keys.len(), 1, "trial {trial}: {keys:?}");
        let vnis = consul
            .kv_snapshot("overlay/vni/")
            .into_iter()
            .filter(|(_, v, _)| names.iter().any(|n| n.as_bytes() == v.as_slice()))
            .count();
        assert_eq!(vnis, 1, "trial {trial}: only the winner holds a VNI");
    }
}

/// A veth pair in `node`'s namespace standing for an interface the agent must never
/// touch.
fn add_canary(node: &Node, name: &str) {
    let name = name.to_string();
    node.ns.block_on(|| async move {
        let handle = overlay_ctl::dataplane::netlink::connect().unwrap();
        let (link, _) =
            overlay_ctl::dataplane::netlink::create_veth(&handle, &name, &format!("{name}p"))
                .await
                .unwrap();
        overlay_ctl::dataplane::netlink::set_up(&handle, link.index)
            .await
            .unwrap();
    });
}

fn mounted(path: &Path) -> bool {
    let path = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(path.as_str()))
}

/// Unmounts and removes the canary directory however the test ends.
struct Canaries(PathBuf);

impl Drop for Canaries {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0.join("mnt"), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn endpoint_records_naming_interfaces_and_paths_touch_nothing() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, GC_ARGS);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let a = nodes[0].spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let b_name = unique_name("b");
    let _b = nodes[1].spawn_run("net1", &b_name, &["sleep", "600"]);
    let b_ip = nodes[1].wait_endpoint("net1", &b_name);
    let ping_b = || {
        a.open_netns().is_some_and(|ns| {
            ns.run(|| net::ping_until_reply(b_ip, Duration::from_secs(10)))
                .unwrap()
        })
    };
    wait_until("container a", JOIN, || a.open_netns().is_some());
    assert!(ping_b());

    // Canaries: an interface, a root-owned file and a mount.
    let canary_dir = std::env::temp_dir().join(unique_name("canary-"));
    std::fs::create_dir_all(canary_dir.join("mnt")).unwrap();
    let _canaries = Canaries(canary_dir.clone());
    std::fs::write(canary_dir.join("file"), b"canary").unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &canary_dir.join("mnt"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    add_canary(&nodes[0], "canary0");
    let relative = |p: &str| format!("../..{}/{p}", canary_dir.display());
    // A process that is gone, as a stale `pid` would name.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();

    let endpoints_before = map_entries(&nodes[0], "ENDPOINTS").unwrap();
    let local_before = map_entries(&nodes[0], "LOCAL_IFACES").unwrap();
    let hostile = [
        ("evil-eth0", "eth0", relative("file"), 60),
        ("evil-canary", "canary0", relative("mnt"), 61),
        (
            "evil-path",
            "canary0p",
            "../../../../".to_string() + "tmp",
            62,
        ),
    ];
    consul.with_client(|client| {
        let hostile = hostile.clone();
        async move {
            for (id, ifname, netns, last) in hostile {
                let record = serde_json::json!({
                    "id": id, "network": "net1", "ip": format!("10.100.0.{last}"),
                    "mac": format!("02:42:0a:64:00:{last:02x}"), "node": "node1",
                    "vtep": "192.0.2.1", "ifname": ifname, "netns": netns,
                    "pid": gone_pid, "container": "hostile",
                });
                client
                    .put(
                        &format!("overlay/endpoints/net1/{id}"),
                        record.to_string().as_bytes(),
                    )
                    .await
                    .unwrap();
            }
        }
    });
    // The agent sees them (they name its node) and, holding no record of creating them,
    // never forwards for them and collects them after the grace period.
    wait_until("the hostile records collected", COLLECTED, || {
        consul.kv_snapshot("overlay/endpoints/net1/evil").is_empty()
    });
    assert!(nodes[0]
        .agent_log()
        .contains("it names this node, which has no record of creating it"));
    assert_eq!(map_entries(&nodes[0], "ENDPOINTS"), Some(endpoints_before));
    assert_eq!(map_entries(&nodes[0], "LOCAL_IFACES"), Some(local_before));
    let links = link_names(&nodes[0]);
    assert!(
        links.contains("canary0") && links.contains("canary0p"),
        "{links:?}"
    );
    assert!(links.contains("eth0"));
    assert_eq!(
        std::fs::read(canary_dir.join("file")).ok().as_deref(),
        Some(&b"canary"[..])
    );
    assert!(mounted(&canary_dir.join("mnt")), "the canary mount is gone");
    // The node is not cut off: still in the cluster and forwarding.
    let status = nodes[0].status().unwrap();
    assert_eq!(status["consul"]["registered"], true);
    assert_eq!(status["consul"]["reachable"], true);
    assert!(ping_b());
}

#[test]
fn a_finished_run_is_removed_by_run_alone() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, GC_ARGS);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    for _ in 0..5 {
        let out = node.cli(&["run", "-n", "net1", "--", "true"]);
        assert_eq!(out.code, 0, "{out:#?}");
    }
    // The deterministic case: `run` stays paused after its command ended, while the agent
    // completes two collection passes; the container is `run`'s to remove, not the agent's.
    let name = unique_name("own");
    let pause = Pause::new();
    let env = pause.env("exited");
    let run = node.spawn_run_env(
        "net1",
        &name,
        &[("OVERLAY_TEST_PAUSE", env.as_str())],
        &["true"],
    );
    pause.wait_reached("run after its command ended");
    let passes = gc_runs(node);
    wait_until("two collection passes", JOIN, || {
        gc_runs(node) >= passes + 2
    });
    assert_evidence(node, &consul, &name, "exited");
    assert_eq!(map_entries(node, "LOCAL_IFACES"), Some(1));
    pause.release();
    let out = run.wait(Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:#?}");
    // The agent never collected anything here (its old race would be in the log), and
    // `run` left nothing behind.
    let log = node.agent_log();
    assert!(
        !log.contains("collected a left-over") && !log.contains("whose container is gone"),
        "the agent removed a container that `run` was removing:\n{log}"
    );
    assert!(consul.kv_snapshot("overlay/endpoints/").is_empty());
    assert!(consul.kv_snapshot("overlay/ipam/net1/").is_empty());
    assert_eq!(map_entries(node, "ENDPOINTS"), Some(0));
    assert!(std::fs::read_dir(node.state_dir.join("endpoints"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
}

/// `overlay_gc_runs_total`: collection passes the agent completed.
fn gc_runs(node: &Node) -> u64 {
    node.metrics()
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("overlay_gc_runs_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn state_is_private_and_status_follows_the_store_within_seconds() {
    require_root();
    let underlay = Underlay::new();
    let (mut consul, nodes) = start_cluster(&BINS, &underlay, 1, None, &[]);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let name = unique_name("p");
    let _run = node.spawn_run("net1", &name, &["sleep", "60"]);
    node.wait_endpoint("net1", &name);
    // The harness made the directory with the default umask; the agent tightens it.
    assert_eq!(mode(&node.state_dir), 0o700);
    assert_eq!(mode(&node.state_dir.join("session")), 0o600);
    assert_eq!(mode(&node.state_dir.join("agent.sock")), 0o600);
    wait_until("the cluster id remembered", JOIN, || {
        node.state_dir.join("cluster-id").exists()
    });
    assert_eq!(mode(&node.state_dir.join("cluster-id")), 0o600);
    assert_eq!(mode(&node.state_dir.join("endpoints")), 0o700);
    assert_eq!(mode(&record_path(node, "net1", &name)), 0o600);

    // The store stops answering (connections still accepted, as when the network cuts
    // it off): `status` says so within a few seconds, not after request timeouts.
    consul.freeze();
    let started = Instant::now();
    wait_until(
        "status shows the frozen store unreachable",
        Duration::from_secs(5),
        || {
            node.status().is_some_and(|s| {
                s["consul"]["reachable"] == false && s["consul"]["registered"] == false
            })
        },
    );
    eprintln!("frozen store shown after {:?}", started.elapsed());
    consul.resume();
    wait_until("reachable again", JOIN, || {
        node.status()
            .is_some_and(|s| s["consul"]["reachable"] == true && s["consul"]["registered"] == true)
    });
    // The store goes away: `status` says so within a few seconds.
    consul.kill();
    let started = Instant::now();
    wait_until(
        "status shows the store unreachable",
        Duration::from_secs(5),
        || {
            node.status().is_some_and(|s| {
                s["consul"]["reachable"] == false && s["consul"]["registered"] == false
            })
        },
    );
    eprintln!("unreachable shown after {:?}", started.elapsed());
    consul.restart();
    wait_until("registered again", JOIN, || {
        node.status()
            .is_some_and(|s| s["consul"]["reachable"] == true && s["consul"]["registered"] == true)
    });
    // The node key deleted behind its back: shown, then repaired.
    let (key_index, session) = consul.with_client(|client| async move {
        let pair = client.get("overlay/nodes/node1").await.unwrap().unwrap();
        client.delete("overlay/nodes/node1").await.unwrap();
        (pair.modify_index, pair.session)
    });
    assert!(session.is_some());
    let started = Instant::now();
    wait_until("the node registered again", Duration::from_secs(5), || {
        consul
            .kv_snapshot("overlay/nodes/node1")
            .iter()
            .any(|(_, _, index)| *index > key_index)
    });
    eprintln!("re-registered after {:?}", started.elapsed());
}

#[test]
fn a_store_restarted_empty_keeps_traffic_and_is_refilled() {
    require_root();
    let underlay = Underlay::new();
    let (mut consul, nodes) = start_cluster(
        &BINS,
        &underlay,
        2,
        None,
        &[
            "--session-ttl",
            "3s",
            "--dev-store",
            "--resync-interval",
            "1s",
            "--gc-interval",
            "1s",
            "--gc-grace",
            "2s",
        ],
    );
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let target_name = unique_name("tgt");
    let _target = nodes[1].spawn_run("net1", &target_name, &["sleep", "600"]);
    let target_ip: Ipv4Addr = nodes[1].wait_endpoint("net1", &target_name);
    for node in &nodes {
        wait_until("the cluster id known", JOIN, || {
            node.status().is_some_and(|s| s["store_trust"] == "trusted")
        });
    }
    // A measured stream of pings, one every 30 ms or so, across the store's loss and
    // until every check below is done (a fixed count could end before the agents even
    // notice the loss on a slow machine, and the container's own exit then removes its
    // entries, as it should).
    let stop = Pause::new();
    let script = format!(
        "until ping -c 1 -W 1 {target_ip} >/dev/null; do sleep 0.1; done; \
         echo warm; sent=0; lost=0; \
         until [ -e {stop} ]; do \
           sent=$((sent+1)); ping -c 1 -W 1 {target_ip} >/dev/null || lost=$((lost+1)); \
           sleep 0.03; \
         done; \
         echo \"probes=$sent lost=$lost\"",
        stop = stop.0.display()
    );
    let pinger_name = unique_name("png");
    let pinger = nodes[0].spawn_run("net1", &pinger_name, &["sh", "-c", &script]);
    nodes[0].wait_endpoint("net1", &pinger_name);
    std::thread::sleep(Duration::from_millis(1500));
    let before: Vec<(String, Vec<u8>)> = consul
        .kv_snapshot("overlay/")
        .into_iter()
        .filter(|(k, _, _)| {
            k.starts_with("overlay/networks/")
                || k.starts_with("overlay/endpoints/")
                || k.starts_with("overlay/ipam/")
                || k.starts_with("overlay/vni/")
        })
        .map(|(k, v, _)| (k, v))
        .collect();
    assert_eq!(
        before
            .iter()
            .filter(|(k, _)| k.starts_with("overlay/endpoints/"))
            .count(),
        2
    );

    // The dev server comes back without its data (no data dir).
    let log_offsets: Vec<usize> = nodes.iter().map(|n| n.agent_log().len()).collect();
    consul.restart();
    // Every record is back, without anyone doing anything.
    wait_until("the records republished", JOIN, || {
        let now: BTreeSet<(String, Vec<u8>)> = consul
            .kv_snapshot("overlay/")
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        before.iter().all(|kv| now.contains(kv))
    });
    for node in &nodes {
        wait_until("registered again", JOIN, || {
            node.status()
                .is_some_and(|s| s["consul"]["registered"] == true)
        });
        assert!(
            node.agent_log()
                .contains("THE STORE HAS LOST THE CLUSTER'S DATA")
                || node.agent_log().contains("the store was restored"),
            "{} said nothing about the store's loss",
            node.name
        );
    }
    // No agent removed anything from its maps on account of the empty store.
    for (node, offset) in nodes.iter().zip(&log_offsets) {
        let log = node.agent_log();
        let removals: Vec<&str> = log[*offset..]
            .lines()
            .filter(|l| l.contains("data plane maps updated"))
            .filter(|l| {
                l.split("removed=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .is_some_and(|n| n != "0")
            })
            .collect();
        assert!(
            removals.is_empty(),
            "{} removed entries while the store was empty: {removals:#?}",
            node.name
        );
        // One restore is one new incarnation, noticed once (not an agent flipping
        // between the fresh store and a stale copy of the old one).
        let restored = log[*offset..]
            .matches("the store was restored after losing its data")
            .count();
        assert!(
            restored <= 2,
            "{} noticed the restore {restored} times:\n{}",
            node.name,
            &log[*offset..]
        );
    }
    std::fs::write(&stop.0, b"").unwrap();
    let out = pinger.wait(Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:#?}");
    let count = |name: &str| -> u32 {
        (out.stdout.split_whitespace())
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the pinger's output:\n{}", out.stdout))
    };
    let (probes, lost) = (count("probes="), count("lost="));
    // The outage and its healing last several seconds: at least that many probes.
    assert!(probes >= 50, "only {probes} probes: {}", out.stdout);
    assert_eq!(
        lost, 0,
        "pings lost while the store was empty ({probes} sent)"
    );
    for node in &nodes {
        wait_until("the store trusted again", JOIN, || {
            node.status().is_some_and(|s| s["store_trust"] == "trusted")
        });
    }

    // A store of another cluster: held, loudly, and nothing of it is applied.
    let networks_before = map_entries(&nodes[0], "NETWORKS");
    consul.with_client(|client| async move {
        client
            .put(
                "overlay/config/cluster-id",
                br#"{"cluster":"someone-else","incarnation":"x"}"#,
            )
            .await
            .unwrap();
        client.delete("overlay/networks/net1").await.unwrap();
    });
    let changed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for node in &nodes {
        wait_until("the foreign store noticed", JOIN, || {
            node.status().is_some_and(|s| s["store_trust"] == "foreign")
                && node
                    .metrics()
                    .is_some_and(|m| m.contains("overlay_store_state{state=\"foreign\"} 1"))
        });
    }
    // A full resync that read the foreign store (with net1 gone) has run since.
    wait_until("a resync after the change", JOIN, || {
        nodes[0].status().is_some_and(|s| {
            s["last_reconcile"]["at_unix_ms"]
                .as_u64()
                .is_some_and(|t| t > changed_at + 1000)
        })
    });
    assert_eq!(map_entries(&nodes[0], "NETWORKS"), networks_before);
    assert!(nodes[0]
        .agent_log()
        .contains("THE STORE BELONGS TO ANOTHER CLUSTER"));
}

#[test]
fn attachments_are_collected_when_their_cli_dies_or_their_entry_goes() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, GC_ARGS);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    // Someone else's namespace (a Docker or podman container stands for it).
    let existing = overlay_tests::harness::TestNs::new("ext");
    let path = existing.ns().path().display().to_string();
    let ns_links = || -> BTreeSet<String> {
        existing.block_on(|| async {
            let handle = overlay_ctl::dataplane::netlink::connect().unwrap();
            overlay_ctl::dataplane::netlink::list_links(&handle)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.name)
                .collect()
        })
    };
    for point in ["allocated", "plumbed", "endpoint"] {
        let name = unique_name("att");
        let pause = Pause::new();
        let env = pause.env(point);
        let mut attach = node.spawn_cli_env(
            &["attach", "-n", "net1", "--netns", &path, "--name", &name],
            &[("OVERLAY_TEST_PAUSE", env.as_str())],
        );
        pause.wait_reached(&format!("attach at {point}"));
        assert!(record_path(node, "net1", &name).exists());
        attach.kill();
        pause.release();
        wait_collected(
            node,
            &consul,
            "net1",
            &name,
            &format!("attach killed at {point}"),
        );
        assert!(
            !ns_links().contains("ovl0"),
            "the container side went with the veth"
        );
        assert!(
            existing.ns().path().exists(),
            "the namespace is not ours to remove"
        );
    }
    // A completed attachment whose entry is removed from the store (by hand, or with its
    // network) is collected after the grace period: nothing else would remove its veth.
    let name = unique_name("att");
    node.cli(&["attach", "-n", "net1", "--netns", &path, "--name", &name])
        .ok();
    assert!(ns_links().contains("ovl0"));
    consul.with_client(|client| {
        let key = format!("overlay/endpoints/net1/{name}");
        async move { client.delete(&key).await.unwrap() }
    });
    wait_collected(node, &consul, "net1", &name, "attachment without its entry");
    assert!(!ns_links().contains("ovl0"));
    assert!(existing.ns().path().exists());
}

#[test]
fn endpoints_from_before_local_records_are_adopted_not_dropped() {
    require_root();
    let underlay = Underlay::new();
    let (consul, mut nodes) = start_cluster(&BINS, &underlay, 1, None, GC_ARGS);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let name = unique_name("old");
    let run = nodes[0].spawn_run("net1", &name, &["sleep", "600"]);
    nodes[0].wait_endpoint("net1", &name);
    let record = record_path(&nodes[0], "net1", &name);
    assert!(record.exists());
    wait_until("the container's command started", JOIN, || {
        std::fs::read_to_string(&record).is_ok_and(|r| r.contains("\"command\": {"))
    });
    // As an agent of the previous version left it: the container, no local record.
    nodes[0].kill_agent();
    std::fs::remove_file(&record).unwrap();
    nodes[0].start_agent(GC_ARGS);
    nodes[0].wait_registered(JOIN);
    // A record is claimed empty (create-only), then filled in by a rename.
    wait_until("the endpoint adopted", JOIN, || {
        std::fs::metadata(&record).is_ok_and(|m| m.len() > 0)
    });
    let adopted = std::fs::read_to_string(&record).unwrap();
    assert!(
        adopted.contains("\"kind\": \"run\"") && adopted.contains("\"command\": {"),
        "{adopted}\n{}",
        nodes[0]
            .agent_log()
            .lines()
            .filter(|l| l.contains("adopt"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Forwarded for, and still there after more than a grace period of collection.
    let passes = gc_runs(&nodes[0]);
    wait_until("four collection passes", JOIN, || {
        gc_runs(&nodes[0]) >= passes + 4
    });
    assert_eq!(map_entries(&nodes[0], "LOCAL_IFACES"), Some(1));
    assert_eq!(
        consul
            .kv_snapshot(&format!("overlay/endpoints/net1/{name}"))
            .len(),
        1
    );
    let out = run.stop();
    assert_eq!(out.code, 143, "{out:#?}");
    wait_collected(&nodes[0], &consul, "net1", &name, "adopted container ended");
}
