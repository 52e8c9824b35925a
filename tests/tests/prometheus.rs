//! The agent's metrics as an operator sees them: a real Prometheus server (Debian's
//! `prometheus` package) scrapes a running agent, known traffic is sent, and Prometheus's
//! own query API must report exactly that traffic.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use overlay_tests::{
    bins,
    cluster::{start_cluster, Bins, Node},
    harness::{require_root, unique_name, wait_until},
    net,
};

const BINS: Bins = bins!();
const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMETHEUS_PORT: u16 = 9090;

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query through Prometheus's HTTP API (`None` while it has no
/// sample).
fn query(node: &Node, promql: &str) -> Option<f64> {
    let body = node.http_get(
        PROMETHEUS_PORT,
        &format!("/api/v1/query?query={}", encode(promql)),
    )?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = json["data"]["result"].as_array()?;
    let [series] = result.as_slice() else {
        return None;
    };
    series["value"][1].as_str()?.parse().ok()
}

/// Waits until the query returns `expected`, and fails with the last value seen.
fn wait_for_value(node: &Node, promql: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        last = query(node, promql);
        if last == Some(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{promql}: expected {expected}, Prometheus last said {last:?}");
}

/// Sends `count` datagrams from a container, each received before the next burst, so
/// the counts are exact.
fn send_udp(
    from: &overlay_tests::cluster::Background,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    count: usize,
    len: usize,
) {
    let ns = from.open_netns().expect("container namespace");
    ns.run(|| net::udp_send(src, SocketAddrV4::new(dst, 7000), count, len))
        .unwrap();
}

#[test]
fn prometheus_reports_exactly_the_traffic_sent() {
    require_root();
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: run `cargo xtask setup` (Debian package prometheus)"
    );
    let underlay = overlay_tests::topology::Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    node.cli(&["network", "create", "net2", "10.200.0.0/24"])
        .ok();

    // Prometheus beside the agent (same host namespace), scraping every second.
    let dir = std::env::temp_dir().join(unique_name("prometheus-"));
    std::fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveDir(dir.clone());
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: overlay\n    static_configs:\n      - targets: ['127.0.0.1:9465']\n",
    )
    .unwrap();
    let _prometheus = node.spawn_process(
        PROMETHEUS,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"),
        ],
    );
    wait_until(
        "Prometheus scraping the agent",
        Duration::from_secs(60),
        || query(node, r#"up{job="overlay"}"#) == Some(1.0),
    );

    let a = node.spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let other = node.spawn_run("net2", &unique_name("x"), &["sleep", "600"]);
    let b = nodes[1].spawn_run("net1", &unique_name("b"), &["sleep", "600"]);
    let a_ip = node.wait_endpoint("net1", &a.netns["ovl-net1-".len()..]);
    let b_ip = node.wait_endpoint("net1", &b.netns["ovl-net1-".len()..]);
    let x_ip = node.wait_endpoint("net2", &other.netns["ovl-net2-".len()..]);

    // Settle ARP first (answered locally, counted as arp_reply, not encapsulated).
    send_udp(&a, a_ip, b_ip, 1, 100);
    let encap_packets =
        r#"overlay_packets_total{job="overlay",network="net1",direction="encapsulated"}"#;
    let encap_bytes =
        r#"overlay_bytes_total{job="overlay",network="net1",direction="encapsulated"}"#;
    wait_for_value(node, encap_packets, 1.0);
    let bytes_before = {
        let mut v = None;
        wait_until("encapsulated bytes", Duration::from_secs(10), || {
            v = query(node, encap_bytes);
            v.is_some()
        });
        v.unwrap()
    };

    const SENT: usize = 120;
    const PAYLOAD: usize = 100;
    // The TC program counts the container's whole frame: Ethernet + IPv4 + UDP + payload.
    const FRAME: usize = 14 + 20 + 8 + PAYLOAD;
    for _ in 0..SENT / 10 {
        send_udp(&a, a_ip, b_ip, 10, PAYLOAD);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_value(node, encap_packets, (1 + SENT) as f64);
    wait_for_value(node, encap_bytes, bytes_before + (SENT * FRAME) as f64);

    // Another network's address is dropped at the sender, with its reason.
    const CROSS: usize = 7;
    send_udp(&other, x_ip, b_ip, CROSS, PAYLOAD);
    wait_for_value(
        node,
        r#"overlay_dropped_packets_total{job="overlay",network="net2",reason="cross_network"}"#,
        CROSS as f64,
    );

    // Control-plane series are there too.
    wait_for_value(node, r#"overlay_members{job="overlay"}"#, 2.0);
    wait_for_value(
        node,
        r#"overlay_endpoints{job="overlay",location="local"}"#,
        2.0,
    );
    wait_for_value(
        node,
        r#"overlay_endpoints{job="overlay",location="remote"}"#,
        1.0,
    );
    assert!(query(node, r#"overlay_reconcile_runs_total{job="overlay"}"#).unwrap_or(0.0) >= 1.0);
    wait_for_value(
        node,
        r#"overlay_map_capacity{job="overlay",map="ENDPOINTS"}"#,
        f64::from(overlay_common::capacity::ENDPOINTS),
    );
}
