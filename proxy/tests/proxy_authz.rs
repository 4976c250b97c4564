//! Inbound authorization over real sockets and real mutual TLS: embedded proxies whose
//! identities come from a test CA (`test/client` allowed by the policies, `test/other` not),
//! an app behind the server proxy, HTTP/1, h2c gRPC and opaque TCP, the kubelet's probes under
//! a `deny` default, a policy swapped in and out under load, and a refused authorization
//! section.
//!
//! The opaque-TCP cases need an original destination, so they run in two network namespaces
//! with iptables REDIRECT rules (root required, like `proxy_mtls`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::ca::{Leaf, TestCa, identity};
use support::mesh::{MeshProxy, config, meshed_service};
use support::netns::{Pods, SERVER_IP};
use support::upstream::{self, bind_local};
use support::{ConfigDir, H1Client, Reply, eventually, get, h2_client};
use tandem_crds::contract::{
    Authorization, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Callers,
    DefaultPolicy, MtlsMode, Operations, PathMatch, ProxyConfig, Workload,
};
use tandem_crds::names::DENIED_BY_HEADER;
use tandem_proxy::tls::probes::AppProbes;

const CLIENT: &str = "spiffe://cluster.local/ns/test/sa/client";
const OTHER: &str = "spiffe://cluster.local/ns/test/sa/other";
const SERVER: &str = "spiffe://cluster.local/ns/test/sa/server";

// ---------------------------------------------------------------------------------------------
// Configs, written with the contract's types

fn policy(
    name: &str,
    action: AuthorizationAction,
    ports: Vec<u16>,
    rules: Vec<AuthorizationRule>,
) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        action,
        ports,
        rules,
    }
}

fn from(callers: Callers) -> AuthorizationRule {
    AuthorizationRule {
        from: Some(callers),
        to: None,
    }
}

fn principals(ids: &[&str]) -> Callers {
    Callers {
        principals: ids.iter().map(|s| s.to_string()).collect(),
        ..Callers::default()
    }
}

/// `test/allow-client`: only [`CLIENT`] may call (on `ports`; empty: every port).
fn allow_client(ports: Vec<u16>) -> AuthorizationPolicy {
    policy(
        "test/allow-client",
        AuthorizationAction::Allow,
        ports,
        vec![from(principals(&[CLIENT]))],
    )
}

fn authorization(
    default_policy: DefaultPolicy,
    policies: Vec<AuthorizationPolicy>,
) -> Authorization {
    Authorization {
        default_policy,
        cluster_networks: vec![],
        policies,
    }
}

/// The server workload's config (`test/server`, permissive, no destination services).
fn server_config(version: &str, authorization: Authorization) -> String {
    let mut config = ProxyConfig::new(Workload {
        namespace: "test".into(),
        service_account: "server".into(),
        mtls: MtlsMode::Permissive,
    });
    config.version = version.into();
    config.authorization = authorization;
    config.validate().expect("a valid test config");
    config.to_json()
}

// ---------------------------------------------------------------------------------------------
// A server behind its proxy, and meshed clients

/// An HTTP app behind the server proxy, and a client proxy per calling identity whose one
/// service (`127.0.0.1:<app port>`) has the server proxy's inbound listener as its meshed
/// endpoint. A request's authority is the app's address, so the server proxy forwards it there
/// and authorizes it for the app's port.
struct Mesh {
    ca: TestCa,
    app: SocketAddr,
    server: MeshProxy,
    server_dir: ConfigDir,
    _client_dirs: Vec<ConfigDir>,
}

impl Mesh {
    fn start(authorization: Authorization) -> Self {
        Self::start_with_probes(authorization, |_| AppProbes::default())
    }

    fn start_with_probes(
        authorization: Authorization,
        probes: impl FnOnce(u16) -> AppProbes,
    ) -> Self {
        let ca = TestCa::root("root");
        let app = upstream::http("app", bind_local());
        let mut server_dir = ConfigDir::new();
        server_dir.publish(&server_config("v1", authorization));
        let server = MeshProxy::start_with_probes(
            &server_dir.path(),
            identity(ca.issue(Leaf::new("test", "server")), &[&ca]),
            probes(app.port()),
        );
        Self {
            ca,
            app,
            server,
            server_dir,
            _client_dirs: Vec::new(),
        }
    }

    /// A proxy for `test/<service_account>` calling the app over mutual TLS as `protocol`.
    fn client(&mut self, service_account: &str, protocol: &str) -> MeshProxy {
        let mut dir = ConfigDir::new();
        dir.publish(&config(
            "client",
            service_account,
            "permissive",
            vec![meshed_service(
                "app",
                "127.0.0.1",
                self.app.port(),
                protocol,
                &[(self.server.inbound, SERVER)],
            )],
        ));
        let proxy = MeshProxy::start(
            &dir.path(),
            identity(
                self.ca.issue(Leaf::new("test", service_account)),
                &[&self.ca],
            ),
        );
        self._client_dirs.push(dir);
        proxy
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.app.port())
    }

    /// GET through `client`'s proxy (mutual TLS to the server proxy).
    async fn get_via(&self, client: &MeshProxy, path: &str) -> Reply {
        get(client.outbound, &self.authority(), path, &[])
            .await
            .unwrap()
    }

    /// GET straight to the server proxy's inbound listener (plaintext, unauthenticated).
    async fn get_plain(&self, path: &str) -> Reply {
        get(self.server.inbound, &self.authority(), path, &[])
            .await
            .unwrap()
    }

    /// Publishes a new server config and waits until the server proxy runs it.
    async fn publish(&mut self, version: &str, authorization: Authorization) {
        self.server_dir
            .publish(&server_config(version, authorization));
        wait_version(&self.server, version).await;
    }
}

async fn wait_version(proxy: &MeshProxy, version: &str) {
    eventually(
        &format!("config {version} applied"),
        Duration::from_secs(10),
        async || {
            let r = get(proxy.admin, "localhost", "/config", &[]).await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            v["version"] == version
        },
    )
    .await;
}

fn decisions(proxy: &MeshProxy, decision: &str, policy: &str, protocol: &str) -> u64 {
    proxy.counter(&format!(
        r#"tandem_authz_decisions_total{{decision="{decision}",policy="{policy}",protocol="{protocol}"}}"#
    ))
}

fn denied_by(reply: &Reply) -> &str {
    reply
        .headers
        .get(DENIED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_identity_gets_200_and_another_identity_gets_403_naming_the_policy() {
    let mut mesh = Mesh::start(authorization(
        DefaultPolicy::AllUnauthenticated,
        vec![allow_client(vec![])],
    ));
    let client = mesh.client("client", "http");
    let other = mesh.client("other", "http");
    let port = mesh.app.port();

    let allowed = mesh.get_via(&client, "/orders").await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(allowed.body, "app GET /orders");

    let denied = mesh.get_via(&other, "/orders").await;
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied_by(&denied), "test/allow-client");
    assert_eq!(
        denied.body,
        format!("denied by test/allow-client: {OTHER} may not GET /orders on port {port}\n")
    );

    let plain = mesh.get_plain("/orders").await;
    assert_eq!(plain.status, 403, "{plain:?}");
    assert_eq!(
        plain.body,
        format!(
            "denied by test/allow-client: unauthenticated may not GET /orders on port {port}\n"
        )
    );

    let server = &mesh.server;
    assert_eq!(decisions(server, "allow", "test/allow-client", "http"), 1);
    assert_eq!(decisions(server, "deny", "no-allow-match", "http"), 2);
    eventually(
        "three access-log lines",
        Duration::from_secs(5),
        async || server.access_log().len() == 3,
    )
    .await;
    let log = server.access_log();
    let line = |identity: &str| {
        log.iter()
            .find(|l| l["peer_identity"] == identity)
            .unwrap_or_else(|| panic!("no line for {identity:?}: {log:?}"))
    };
    assert_eq!(line(CLIENT)["authz_decision"], "allow");
    assert_eq!(line(CLIENT)["authz_policy"], "test/allow-client");
    assert_eq!(line(CLIENT)["status"], 200);
    assert_eq!(line(OTHER)["authz_decision"], "deny");
    assert_eq!(line(OTHER)["authz_policy"], "no-allow-match");
    assert_eq!(line(OTHER)["status"], 403);
    assert_eq!(line("")["authz_decision"], "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_grpc_call_gets_permission_denied_in_a_trailers_only_response() {
    let mesh = Mesh::start(authorization(
        DefaultPolicy::AllUnauthenticated,
        vec![allow_client(vec![])],
    ));
    let sender = h2_client(mesh.server.inbound).await.unwrap();
    // A gRPC call as a client library sends it: POST, h2, a length-prefixed message.
    let call = || {
        let mut sender = sender.clone();
        let uri = format!("http://{}/shop.Orders/List", mesh.authority());
        async move {
            let frame = Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01]);
            let req = hyper::Request::post(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(
                    Full::new(frame)
                        .map_err(|n: std::convert::Infallible| match n {})
                        .boxed(),
                )
                .unwrap();
            sender.send_request(req).await.unwrap()
        }
    };
    let port = mesh.app.port();
    for _ in 0..2 {
        // Twice on one connection: the denial ends the stream, not the connection.
        let resp = call().await;
        assert_eq!(resp.status(), 200);
        let headers = resp.headers().clone();
        assert_eq!(headers["grpc-status"], "7");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers[DENIED_BY_HEADER], "test/allow-client");
        assert_eq!(
            headers["grpc-message"],
            format!(
                "denied by test/allow-client: unauthenticated may not call /shop.Orders/List on port {port}"
            )
            .as_str()
        );
        let body = resp.into_body().collect().await.unwrap();
        assert!(
            body.trailers().is_none(),
            "trailers-only: no second header block"
        );
        assert!(body.to_bytes().is_empty());
    }
    assert_eq!(decisions(&mesh.server, "deny", "no-allow-match", "grpc"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_grpc_call_over_mutual_tls_reaches_the_app() {
    let mut mesh = Mesh::start(authorization(
        DefaultPolicy::Deny,
        vec![allow_client(vec![])],
    ));
    let client = mesh.client("client", "grpc");
    let sender = h2_client(client.outbound).await.unwrap();
    let mut sender = sender.clone();
    let req = hyper::Request::post(format!("http://{}/shop.Orders/List", mesh.authority()))
        .header("content-type", "application/grpc")
        .body(
            Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
                .map_err(|n: std::convert::Infallible| match n {})
                .boxed(),
        )
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("grpc-status").is_none(), "{resp:?}");
    assert_eq!(resp.headers()["x-upstream"], "app");
    assert_eq!(
        decisions(&mesh.server, "allow", "test/allow-client", "grpc"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_beats_an_allow_rule() {
    let mut mesh = Mesh::start(authorization(
        DefaultPolicy::Deny,
        vec![
            policy(
                "test/allow-meshed",
                AuthorizationAction::Allow,
                vec![],
                vec![from(Callers {
                    authenticated: true,
                    ..Callers::default()
                })],
            ),
            policy(
                "test/deny-other",
                AuthorizationAction::Deny,
                vec![],
                vec![from(principals(&[OTHER]))],
            ),
        ],
    ));
    let client = mesh.client("client", "http");
    let other = mesh.client("other", "http");
    assert_eq!(mesh.get_via(&client, "/").await.status, 200);
    let denied = mesh.get_via(&other, "/").await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied_by(&denied), "test/deny-other");
    let plain = mesh.get_plain("/").await;
    assert_eq!(plain.status, 403);
    assert_eq!(
        denied_by(&plain),
        "test/allow-meshed",
        "no Allow rule matched"
    );
    assert_eq!(
        decisions(&mesh.server, "deny", "test/deny-other", "http"),
        1
    );
    assert_eq!(
        decisions(&mesh.server, "allow", "test/allow-meshed", "http"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_method_rules_decide_each_request_of_a_kept_alive_connection() {
    let read_only = policy(
        "test/read-only",
        AuthorizationAction::Allow,
        vec![],
        vec![AuthorizationRule {
            from: Some(Callers {
                unauthenticated: true,
                ..Callers::default()
            }),
            to: Some(Operations {
                paths: vec![PathMatch::Prefix("/public".into())],
                methods: vec!["GET".into()],
                ..Operations::default()
            }),
        }],
    );
    let mesh = Mesh::start(authorization(
        DefaultPolicy::AllUnauthenticated,
        vec![read_only],
    ));
    let mut conn = H1Client::connect(mesh.server.inbound, &mesh.authority())
        .await
        .unwrap();
    let get = conn.send("GET", "/public/a", "").await.unwrap();
    assert_eq!((get.status, get.body.as_str()), (200, "app GET /public/a"));
    let private = conn.send("GET", "/private", "").await.unwrap();
    assert_eq!(private.status, 403);
    assert_eq!(denied_by(&private), "test/read-only");
    let sibling = conn.send("GET", "/publicity", "").await.unwrap();
    assert_eq!(sibling.status, 403, "a prefix matches whole segments");
    let post = conn.send("POST", "/public/a", "").await.unwrap();
    assert_eq!(post.status, 403);
    assert!(post.body.contains("may not POST /public/a"), "{post:?}");
    // Nothing was left unread, so the connection survived every denial.
    let again = conn.send("GET", "/public/b", "").await.unwrap();
    assert_eq!(again.status, 200);

    // A denied request with a body it did not read closes the connection instead.
    let with_body = conn.send("POST", "/public/a", "payload").await.unwrap();
    assert_eq!(with_body.status, 403);
    assert_eq!(with_body.headers["connection"], "close");
    assert!(conn.send("GET", "/public/c", "").await.is_err());

    assert_eq!(
        decisions(&mesh.server, "allow", "test/read-only", "http"),
        2
    );
    assert_eq!(decisions(&mesh.server, "deny", "no-allow-match", "http"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_default_refuses_unauthenticated_callers_while_the_probes_pass() {
    let mut mesh = Mesh::start_with_probes(authorization(DefaultPolicy::Deny, vec![]), |port| {
        AppProbes::parse(&format!(r#"[{{"port":{port},"path":"/healthz"}}]"#)).unwrap()
    });
    let client = mesh.client("client", "http");

    let probe = mesh.get_plain("/healthz").await;
    assert_eq!(
        (probe.status, probe.body.as_str()),
        (200, "app GET /healthz")
    );
    let plain = mesh.get_plain("/orders").await;
    assert_eq!(plain.status, 403);
    assert_eq!(denied_by(&plain), "default:deny");
    let meshed = mesh.get_via(&client, "/orders").await;
    assert_eq!(meshed.status, 403, "deny lets in only what a policy allows");
    assert_eq!(denied_by(&meshed), "default:deny");
    // The proxy's own probes are on the admin port, outside the inbound path.
    for path in ["/live", "/ready"] {
        let r = get(mesh.server.admin, "localhost", path, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    assert_eq!(decisions(&mesh.server, "allow", "probe", "http"), 1);
    assert_eq!(decisions(&mesh.server, "deny", "default:deny", "http"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_authenticated_default_lets_meshed_callers_in_and_refuses_plaintext() {
    let mut mesh = Mesh::start(authorization(DefaultPolicy::AllAuthenticated, vec![]));
    let other = mesh.client("other", "http");
    assert_eq!(mesh.get_via(&other, "/").await.status, 200);
    let plain = mesh.get_plain("/").await;
    assert_eq!(plain.status, 403);
    assert_eq!(denied_by(&plain), "default:all-authenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_and_removing_an_allow_policy_under_load_denies_no_allowed_request() {
    let mut mesh = Mesh::start(authorization(DefaultPolicy::AllUnauthenticated, vec![]));
    let client = mesh.client("client", "http");
    let other = mesh.client("other", "http");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, served, wrong) = (stop.clone(), served.clone(), wrong.clone());
        let (outbound, authority) = (client.outbound, mesh.authority());
        workers.push(tokio::spawn(async move {
            let mut conn = H1Client::connect(outbound, &authority).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = conn.send("GET", &format!("/w{w}"), "").await.unwrap();
                if r.status == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    wrong.lock().unwrap().push(r);
                }
            }
        }));
    }
    for round in 0..3 {
        mesh.publish(
            &format!("allow-{round}"),
            authorization(DefaultPolicy::Deny, vec![allow_client(vec![])]),
        )
        .await;
        // The policy is in force: the other identity is turned away.
        let denied = mesh.get_via(&other, "/").await;
        assert_eq!(denied.status, 403, "round {round}: {denied:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        mesh.publish(
            &format!("open-{round}"),
            authorization(DefaultPolicy::AllUnauthenticated, vec![]),
        )
        .await;
        assert_eq!(mesh.get_via(&other, "/").await.status, 200, "round {round}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    let wrong = wrong.lock().unwrap();
    eprintln!(
        "{served} requests from the allowed identity across 6 swaps, {} not served",
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrongly refused: {:?}",
        wrong.len(),
        wrong.first()
    );
    assert!(served > 0);
    assert!(decisions(&mesh.server, "allow", "test/allow-client", "http") > 0);
    assert!(decisions(&mesh.server, "allow", "default:all-unauthenticated", "http") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_authorization_section_is_refused_and_the_last_good_policy_stays_in_force() {
    let mut mesh = Mesh::start(authorization(
        DefaultPolicy::AllUnauthenticated,
        vec![allow_client(vec![])],
    ));
    let client = mesh.client("client", "http");
    let other = mesh.client("other", "http");
    // Not a SPIFFE ID, and a regular expression that does not parse: written by hand, past the
    // contract's own validation.
    let mut bad: serde_json::Value = serde_json::from_str(&server_config(
        "v2",
        authorization(DefaultPolicy::AllUnauthenticated, vec![]),
    ))
    .unwrap();
    bad["authorization"]["policies"] = serde_json::json!([{
        "name": "test/broken",
        "action": "Allow",
        "rules": [{"from": {"principals": ["client"]}, "to": {"paths": [{"regex": "("}]}}],
    }]);
    mesh.server_dir.publish(&bad.to_string());
    eventually("the refusal counted", Duration::from_secs(10), async || {
        mesh.server.counter("tandem_config_reload_errors_total") >= 1
    })
    .await;
    let r = get(mesh.server.admin, "localhost", "/config", &[])
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(status["version"], "v1", "{status}");
    assert!(r.body.contains("authorization.policies[0]"), "{}", r.body);
    assert_eq!(mesh.get_via(&client, "/").await.status, 200);
    let denied = mesh.get_via(&other, "/").await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied_by(&denied), "test/allow-client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_rules_follow_the_trust_domain_of_a_certificate_that_arrives_after_the_config() {
    let ca = TestCa::root("root");
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    let same_namespace = policy(
        "test/same-namespace",
        AuthorizationAction::Allow,
        vec![],
        vec![from(Callers {
            namespaces: vec!["test".into()],
            ..Callers::default()
        })],
    );
    dir.publish(&server_config(
        "v1",
        authorization(DefaultPolicy::Deny, vec![same_namespace]),
    ));
    // No certificate yet: the config compiles for `cluster.local`.
    let server_identity = Arc::new(tandem_proxy::identity::IdentityState::default());
    let server = MeshProxy::start(&dir.path(), server_identity.clone());
    let domain = "mesh.example";
    server_identity.set_credentials(ca.issue(Leaf::new("test", "server").in_trust_domain(domain)));
    server_identity.set_trust(Arc::new(support::ca::trust_bundle(&[&ca])));
    let mut client_dir = ConfigDir::new();
    client_dir.publish(&config(
        "client",
        "client",
        "permissive",
        vec![meshed_service(
            "app",
            "127.0.0.1",
            app.port(),
            "http",
            &[(
                server.inbound,
                &format!("spiffe://{domain}/ns/test/sa/server"),
            )],
        )],
    ));
    let client = MeshProxy::start(
        &client_dir.path(),
        identity(
            ca.issue(Leaf::new("test", "client").in_trust_domain(domain)),
            &[&ca],
        ),
    );
    let authority = format!("127.0.0.1:{}", app.port());
    eventually(
        "a same-namespace caller in mesh.example allowed",
        Duration::from_secs(10),
        async || {
            get(client.outbound, &authority, "/", &[])
                .await
                .unwrap()
                .status
                == 200
        },
    )
    .await;
    assert_eq!(
        decisions(&server, "allow", "test/same-namespace", "http"),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Opaque TCP: two network namespaces, iptables REDIRECT on both sides.

/// The app's TCP port (an echo server that records every byte it receives).
const APP_PORT: u16 = 7000;
/// A server-first app's port (it greets first, like SMTP).
const GREETER_PORT: u16 = 7025;
/// Cluster IPs the two client proxies' outbound connections are redirected from.
const CLIENT_VIA: &str = "10.96.0.50";
const OTHER_VIA: &str = "10.96.0.51";

/// An echo server that records what it received.
fn recording_echo(listener: std::net::TcpListener) -> Arc<Mutex<Vec<u8>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    seen
}

/// Connects from the client pod to `addr`, sends `line` (unless empty), and reads to the end:
/// what came back, or the error that ended it.
fn call(pods: &Pods, addr: String, line: &'static [u8]) -> std::io::Result<Vec<u8>> {
    pods.client.block_on(move || async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        if !line.is_empty() {
            tcp.write_all(line).await?;
            let mut echoed = vec![0u8; line.len()];
            return match tcp.read_exact(&mut echoed).await {
                Ok(_) => Ok(echoed),
                Err(e) => Err(e),
            };
        }
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut all))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "still open"))??;
        Ok(all)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_relayed_for_the_allowed_identity_and_closed_before_any_byte_otherwise() {
    let pods = Pods::new();
    let ca = TestCa::root("root");
    let seen = recording_echo(pods.server.bind(&format!("0.0.0.0:{APP_PORT}")));
    upstream::server_first(pods.server.bind(&format!("0.0.0.0:{GREETER_PORT}")));
    let mut server_dir = ConfigDir::new();
    server_dir.publish(&server_config(
        "v1",
        authorization(DefaultPolicy::Deny, vec![allow_client(vec![APP_PORT])]),
    ));
    let server = MeshProxy::start_in(
        &pods.server,
        &server_dir.path(),
        identity(ca.issue(Leaf::new("test", "server")), &[&ca]),
    );
    for port in [APP_PORT, GREETER_PORT] {
        pods.server.redirect_tcp(
            "PREROUTING",
            &["--dport", &port.to_string()],
            server.inbound.port(),
        );
    }
    // A client proxy per identity, each reached through its own cluster IP.
    let endpoint: SocketAddr = format!("{SERVER_IP}:{APP_PORT}").parse().unwrap();
    let mut dirs = Vec::new();
    let mut proxies = Vec::new();
    for (sa, via) in [("client", CLIENT_VIA), ("other", OTHER_VIA)] {
        let mut dir = ConfigDir::new();
        dir.publish(&config(
            sa,
            sa,
            "permissive",
            vec![meshed_service(
                "echo",
                via,
                APP_PORT,
                "tcp",
                &[(endpoint, SERVER)],
            )],
        ));
        let proxy = MeshProxy::start_in(
            &pods.client,
            &dir.path(),
            identity(ca.issue(Leaf::new("test", sa)), &[&ca]),
        );
        pods.client
            .redirect_tcp("OUTPUT", &["-d", via], proxy.outbound.port());
        dirs.push(dir);
        proxies.push(proxy);
    }

    // Plaintext, unauthenticated: closed once it has spoken; the eager upstream connection
    // carried nothing.
    let plain = call(&pods, format!("{SERVER_IP}:{APP_PORT}"), b"plaintext\n");
    assert!(plain.is_err(), "{plain:?}");
    // Another identity, over mutual TLS (ALPN tandem/1): closed before connecting upstream.
    let other = call(&pods, format!("{OTHER_VIA}:{APP_PORT}"), b"other\n");
    assert!(other.is_err(), "{other:?}");
    // A server-first app: the greeting is never relayed to a caller that is not allowed.
    let greeted = call(&pods, format!("{SERVER_IP}:{GREETER_PORT}"), b"");
    assert_eq!(
        greeted.unwrap(),
        b"",
        "the greeting reached a denied caller"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "a denied caller's bytes reached the app"
    );

    let allowed = call(&pods, format!("{CLIENT_VIA}:{APP_PORT}"), b"allowed\n").unwrap();
    assert_eq!(allowed, b"allowed\n");
    assert_eq!(seen.lock().unwrap().as_slice(), b"allowed\n");

    assert_eq!(decisions(&server, "allow", "test/allow-client", "tcp"), 1);
    assert_eq!(decisions(&server, "deny", "no-allow-match", "tcp"), 2);
    assert_eq!(decisions(&server, "deny", "default:deny", "tcp"), 1);
    drop(proxies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_logged_at_info_with_the_policy_caller_port_method_and_path() {
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&server_config(
        "v1",
        authorization(DefaultPolicy::Deny, vec![]),
    ));
    // The real binary, whose log is its stdout.
    let proxy = support::Proxy::start(&dir.path());
    let authority = format!("127.0.0.1:{}", app.port());
    let r = get(proxy.inbound, &authority, "/orders", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(denied_by(&r), "default:deny");
    eventually("the denial logged", Duration::from_secs(5), async || {
        proxy
            .log_lines()
            .iter()
            .any(|l| l["message"] == "Request denied")
    })
    .await;
    let lines = proxy.log_lines();
    let line = lines
        .iter()
        .find(|l| l["message"] == "Request denied")
        .unwrap();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["policy"], "default:deny");
    assert_eq!(line["caller"], "unauthenticated");
    assert_eq!(line["port"], app.port());
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/orders");
    let access = proxy.access_log();
    assert_eq!(access.len(), 1, "{access:?}");
    assert_eq!(access[0]["authz_decision"], "deny");
    assert_eq!(access[0]["authz_policy"], "default:deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_connection_is_logged_at_info_with_the_policy_caller_client_and_port() {
    let pods = Pods::new();
    let seen = recording_echo(pods.server.bind(&format!("0.0.0.0:{APP_PORT}")));
    let mut dir = ConfigDir::new();
    dir.publish(&server_config(
        "v1",
        authorization(DefaultPolicy::AllAuthenticated, vec![]),
    ));
    // The real binary in the server pod, as the proxy's UID; its log is its stdout.
    let mut opts = support::ProxyOptions::loopback(dir.path());
    for addr in [&mut opts.outbound, &mut opts.inbound, &mut opts.admin] {
        *addr = "0.0.0.0:0".into();
    }
    opts.wrapper = pods.server.as_uid(tandem_crds::names::PROXY_UID);
    let proxy = support::Proxy::start_with(opts);
    pods.server.redirect_tcp(
        "PREROUTING",
        &["--dport", &APP_PORT.to_string()],
        proxy.inbound.port(),
    );
    let refused = call(&pods, format!("{SERVER_IP}:{APP_PORT}"), b"hello\n");
    assert!(refused.is_err(), "{refused:?}");
    assert!(seen.lock().unwrap().is_empty());
    eventually("the denial logged", Duration::from_secs(5), async || {
        proxy
            .log_lines()
            .iter()
            .any(|l| l["message"] == "Connection denied")
    })
    .await;
    let lines = proxy.log_lines();
    let line = lines
        .iter()
        .find(|l| l["message"] == "Connection denied")
        .unwrap();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["policy"], "default:all-authenticated");
    assert_eq!(line["caller"], "unauthenticated");
    assert_eq!(line["port"], APP_PORT);
    assert!(
        line["client"]
            .as_str()
            .is_some_and(|c| c.contains(support::netns::CLIENT_IP)),
        "{line}"
    );
}
