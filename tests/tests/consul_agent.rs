//! The Consul client and the dev server held to what a real Consul agent does: session
//! node checks and gossip flaps, Consul's session TTL limits, error classes, the agent's
//! service endpoints, TLS and unix-socket addresses, ACL tokens.
use std::time::Duration;

use overlay_ctl::store::{
    consul::{ConsulClient, SessionBehavior},
    devserver::{ConsulDev, DevConfig},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A dev server with Consul's limits lowered for short test TTLs.
async fn dev() -> (ConsulDev, ConsulClient) {
    let config = DevConfig {
        session_ttl_min: Duration::from_secs(1),
        ..DevConfig::default()
    };
    let server = ConsulDev::start_with("127.0.0.1:0", config)
        .await
        .expect("start dev server");
    let client = ConsulClient::new(&server.http_addr(), None).expect("client");
    (server, client)
}

/// One raw HTTP/1.1 exchange: the status code and the body.
async fn raw(server: &ConsulDev, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: dev\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    (code, body.to_string())
}

#[tokio::test]
async fn sessions_without_node_checks_survive_a_serf_flap() {
    let (server, c) = dev().await;
    let ttl = Duration::from_secs(10);
    let ours = c
        .session_create("ours", ttl, SessionBehavior::Delete, Duration::ZERO)
        .await
        .unwrap();
    let info = c.session_info(&ours).await.unwrap().expect("session");
    assert_eq!(info.node_checks.as_deref(), Some(&[][..]), "{info:?}");
    // A session created as most clients do (no NodeChecks) is tied to serfHealth.
    let (code, body) = raw(
        &server,
        "PUT",
        "/v1/session/create",
        r#"{"Name":"naive","TTL":"10s","Behavior":"delete"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let naive: serde_json::Value = serde_json::from_str(&body).unwrap();
    let naive = naive["ID"].as_str().unwrap().to_string();
    let info = c.session_info(&naive).await.unwrap().expect("session");
    assert_eq!(info.node_checks, Some(vec!["serfHealth".to_string()]));
    assert!(c.acquire("nodes/ours", b"o", &ours).await.unwrap());
    assert!(c.acquire("nodes/naive", b"n", &naive).await.unwrap());

    let (code, body) = raw(&server, "PUT", "/v1/dev/serf-flap", "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""Invalidated":1"#), "{body}");
    assert!(
        c.get("nodes/naive").await.unwrap().is_none(),
        "naive key kept"
    );
    assert_eq!(c.session_info(&naive).await.unwrap(), None);
    let kept = c
        .get("nodes/ours")
        .await
        .unwrap()
        .expect("our key survives");
    assert_eq!(kept.session.as_deref(), Some(ours.as_str()));
    assert!(c.session_renew(&ours).await.unwrap());
    // A flap of another node touches nothing here.
    assert_eq!(server.serf_flap(Some("elsewhere")), 0);
}

#[tokio::test]
async fn unknown_node_checks_are_refused() {
    let (server, _c) = dev().await;
    let (code, body) = raw(
        &server,
        "PUT",
        "/v1/session/create",
        r#"{"TTL":"10s","NodeChecks":["service:web"]}"#,
    )
    .await;
    assert_eq!(code, 500);
    assert!(
        body.contains("Missing check 'service:web' registration"),
        "{body}"
    );
}

#[tokio::test]
async fn the_dev_server_defaults_to_consuls_session_ttl_limits() {
    let server = ConsulDev::start("127.0.0.1:0").await.unwrap();
    let c = ConsulClient::new(&server.http_addr(), None).unwrap();
    let create = |ttl| {
        let c = c.clone();
        async move {
            c.session_create("s", ttl, SessionBehavior::Delete, Duration::ZERO)
                .await
        }
    };
    let error = create(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(error.status(), Some(500), "{error}");
    assert!(
        error
            .to_string()
            .contains("Invalid Session TTL '5s', must be between [10s=24h0m0s]"),
        "{error}"
    );
    assert!(create(Duration::from_secs(86_401)).await.is_err());
    assert!(create(Duration::from_secs(10)).await.is_ok());
}

/// A one-trick HTTP server: answers the n-th request with `answers[n]` (the last one
/// repeated), closing each connection. Returns its address and the request count.
async fn scripted_server(
    answers: Vec<&'static str>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let answer = answers[n.min(answers.len() - 1)];
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => request.extend_from_slice(&buf[..k]),
                }
            }
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (addr, count)
}

const RATE_LIMITED: &str = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 19\r\nConnection: close\r\n\r\nrate limit exceeded";
const DENIED: &str =
    "HTTP/1.1 403 Forbidden\r\nContent-Length: 17\r\nConnection: close\r\n\r\nPermission denied";
const CAS_DONE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ntrue";

#[tokio::test]
async fn rate_limits_are_retried_after_the_pause_consul_asks_for() {
    use overlay_ctl::store::consul::ErrorClass;
    let (addr, count) = scripted_server(vec![RATE_LIMITED, CAS_DONE]).await;
    let c = ConsulClient::new(&addr, None).unwrap();
    let start = std::time::Instant::now();
    // Even a check-and-set (not idempotent) is retried: a 429 was never handled.
    assert!(c.put_cas("k", b"v", 0).await.unwrap());
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "Retry-After ignored"
    );
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);

    let (addr, _) = scripted_server(vec![RATE_LIMITED]).await;
    let c = ConsulClient::new(&addr, None).unwrap().with_retry(
        overlay_ctl::store::consul::RetryPolicy {
            max_attempts: 2,
            ..Default::default()
        },
    );
    let error = c.put_cas("k", b"v", 0).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::RateLimited, "{error}");
    assert!(error.to_string().contains("rate-limited"), "{error}");

    let (addr, count) = scripted_server(vec![DENIED]).await;
    let c = ConsulClient::new(&addr, None).unwrap();
    let error = c.put("overlay/nodes/n1", b"v").await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::AclDenied, "{error}");
    assert!(
        error
            .to_string()
            .contains("key:write on \"overlay/nodes/n1\""),
        "{error}"
    );
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a denial is not retried"
    );
}

#[tokio::test]
async fn a_value_above_consuls_limit_is_refused_as_too_large() {
    use overlay_ctl::store::consul::ErrorClass;
    let (_server, c) = dev().await;
    let error = c.put("big", &vec![b'x'; 512 * 1024 + 1]).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::TooLarge, "{error}");
    assert!(error.to_string().contains("too large"), "{error}");
}

#[tokio::test]
async fn services_register_with_the_agent_and_catalog_writes_to_its_node_are_undone() {
    use overlay_ctl::store::consul::{AgentService, CatalogService};
    let (server, c) = dev().await;
    let agent_node = DevConfig::default().node_name;
    let web = AgentService {
        id: "overlay-net1-web".into(),
        name: "web".into(),
        address: "10.100.0.5".into(),
        port: 80,
        tags: vec!["overlay".into()],
    };
    c.agent_service_register(&web).await.unwrap();
    let entries = c.catalog_service("web").await.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].node, agent_node);
    assert_eq!(
        entries[0].address, "127.0.0.1",
        "the node's address changed"
    );
    assert_eq!(entries[0].service_address, "10.100.0.5");
    assert_eq!(entries[0].service_id, "overlay-net1-web");

    // What a real agent's anti-entropy would undo is not applied.
    let sneaky = CatalogService {
        id: "sneaky".into(),
        name: "sneaky".into(),
        address: "10.100.0.6".into(),
        port: 0,
        tags: vec![],
    };
    c.catalog_register(&agent_node, "192.0.2.9", &sneaky)
        .await
        .unwrap();
    assert!(c.catalog_service("sneaky").await.unwrap().is_empty());
    assert_eq!(
        c.catalog_service("web").await.unwrap()[0].address,
        "127.0.0.1"
    );

    c.agent_service_deregister("overlay-net1-web")
        .await
        .unwrap();
    assert!(c.catalog_service("web").await.unwrap().is_empty());
    // Already gone: 404 from the agent, fine for a clean-up.
    c.agent_service_deregister("overlay-net1-web")
        .await
        .unwrap();
    let (code, _) = raw(
        &server,
        "PUT",
        "/v1/agent/service/register",
        r#"{"ID":"x"}"#,
    )
    .await;
    assert_eq!(code, 400, "a service without a name");
}

#[tokio::test]
async fn acl_tokens_are_enforced_with_consuls_403() {
    use overlay_ctl::store::{consul::ErrorClass, devserver::AclTokens};
    let mut acl = AclTokens::default();
    acl.add("overlay=key:write:overlay/,session:write,service:write")
        .unwrap();
    acl.add("reader=key:read:overlay/").unwrap();
    let config = DevConfig {
        acl,
        ..DevConfig::default()
    };
    let server = ConsulDev::start_with("127.0.0.1:0", config).await.unwrap();
    let client = |token: Option<&str>| {
        ConsulClient::new(&server.http_addr(), token.map(str::to_string)).unwrap()
    };
    let ttl = Duration::from_secs(10);

    let good = client(Some("overlay"));
    let session = good
        .session_create("n1", ttl, SessionBehavior::Delete, Duration::ZERO)
        .await
        .unwrap();
    assert!(good
        .acquire("overlay/nodes/n1", b"{}", &session)
        .await
        .unwrap());
    assert_eq!(good.list("overlay/").await.unwrap().len(), 1);

    let reader = client(Some("reader"));
    assert_eq!(reader.list("overlay/").await.unwrap().len(), 1);
    let error = reader.put("overlay/nodes/n2", b"{}").await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::AclDenied, "{error}");
    assert!(
        error
            .to_string()
            .contains("key:write on \"overlay/nodes/n2\""),
        "{error}"
    );
    let error = reader
        .session_create("n2", ttl, SessionBehavior::Delete, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("session:write"), "{error}");

    let anonymous = client(None).get("overlay/nodes/n1").await.unwrap_err();
    assert_eq!(anonymous.class(), ErrorClass::AclDenied);
    assert!(
        anonymous.to_string().contains("CONSUL_HTTP_TOKEN"),
        "{anonymous}"
    );
    assert_eq!(client(None).leader().await.unwrap(), "127.0.0.1:8300");
    let unknown = client(Some("stolen")).get("overlay/x").await.unwrap_err();
    assert!(unknown.to_string().contains("ACL not found"), "{unknown}");
}

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(overlay_tests::harness::unique_name("consul-tls-"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn https_with_a_ca_and_client_certificates_end_to_end() {
    use overlay_ctl::store::{
        consul::{ConsulConfig, ErrorClass},
        devserver::DevTls,
        etcd::TlsFiles,
    };
    let scratch = Scratch::new();
    let tls = overlay_tests::etcd::make_tls_material(&scratch.0);
    let config = DevConfig {
        tls: Some(DevTls {
            cert: tls.server_cert.clone(),
            key: tls.server_key.clone(),
            client_ca: Some(tls.ca.clone()),
        }),
        ..DevConfig::default()
    };
    let server = ConsulDev::start_with("127.0.0.1:0", config).await.unwrap();
    let url = server.http_addr();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let files = TlsFiles {
        ca: Some(tls.ca.clone()),
        cert: Some(tls.client_cert.clone()),
        key: Some(tls.client_key.clone()),
    };
    let c = ConsulClient::from_config(&ConsulConfig::resolve(Some(&url), &files).unwrap()).unwrap();
    c.put("over/tls", b"yes").await.unwrap();
    assert_eq!(c.get("over/tls").await.unwrap().unwrap().value, b"yes");

    // Without a client certificate the server's handshake refuses us.
    let no_cert = TlsFiles {
        ca: Some(tls.ca.clone()),
        cert: None,
        key: None,
    };
    let c = ConsulClient::from_config(&ConsulConfig::resolve(Some(&url), &no_cert).unwrap())
        .unwrap()
        .with_retry(overlay_ctl::store::consul::RetryPolicy::none());
    let error = c.get("over/tls").await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Unreachable, "{error}");
    // Without our CA the server's certificate is not trusted.
    let c = ConsulClient::new(&url, None)
        .unwrap()
        .with_retry(overlay_ctl::store::consul::RetryPolicy::none());
    let error = c.get("over/tls").await.unwrap_err();
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
}

#[tokio::test]
async fn unix_socket_addresses_end_to_end() {
    let scratch = Scratch::new();
    let socket = scratch.0.join("consul.sock");
    let listen = format!("unix://{}", socket.display());
    let server = ConsulDev::start_with(&listen, DevConfig::default())
        .await
        .unwrap();
    assert_eq!(server.http_addr(), listen);
    let c = ConsulClient::new(&listen, None).unwrap();
    assert_eq!(c.addr(), listen);
    c.put("over/unix", b"yes").await.unwrap();
    assert_eq!(c.get("over/unix").await.unwrap().unwrap().value, b"yes");
    assert_eq!(c.leader().await.unwrap(), "127.0.0.1:8300");
}

/// `overlay-ctl ARGS`: exit code and stderr.
fn cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_overlay-cli"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn the_agent_refuses_a_session_ttl_consul_would_refuse() {
    let (code, stderr) = cli(&["agent", "--node", "n1", "--session-ttl", "2s"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("below Consul's minimum of 10s"), "{stderr}");
    assert!(stderr.contains("--dev-store"), "{stderr}");
    let (code, stderr) = cli(&["agent", "--node", "n1", "--session-ttl", "25h"]);
    assert_eq!(code, 2, "bad usage: {stderr}");
    let (code, stderr) = cli(&["agent", "--node", "n1", "--session-ttl", "1500m"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("maximum of 24h"), "{stderr}");
}

#[test]
fn the_dev_server_refuses_a_bad_acl_rule() {
    let (code, stderr) = cli(&[
        "dev-server",
        "--listen",
        "127.0.0.1:0",
        "--acl-token",
        "t=key:admin",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--acl-token") && stderr.contains("read or write"),
        "{stderr}"
    );
}
