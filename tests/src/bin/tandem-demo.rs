//! `tandem-demo`: what `make demo` runs. It brings up the local cluster (control plane, Tandem's
//! webhook and operator, a node agent), deploys the sample app, measures each route before and
//! after its sample policy through the injected sidecars, prints the table, and then keeps the
//! cluster running for kubectl until SIGTERM or SIGINT (`make demo-down`), when it stops every
//! pod, removes their network namespaces and stops the control plane.
//!
//! Every measurement is a bounded burst sent by the sample `client` pod (`/burst` of
//! `tandem-testapp client`) through its own proxy; every wait is bounded.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use serde_json::Value;
use tandem_crds::contract::ProxyConfig;
use tandem_tests::demo::{Burst, RouteReport, retarget, table};
use tandem_tests::install::{PROXY_IMAGE, Tandem, apply_object, manifests_dir, read_documents};
use tandem_tests::node::{Image, Images, NodeAgent, NodeOptions, net};
use tandem_tests::{ControlPlane, ControlPlaneOptions};

/// Run Tandem's demo on a local cluster and keep the cluster up until interrupted.
#[derive(Debug, Parser)]
struct Args {
    /// Where the cluster (PKI, admin kubeconfig, logs, etcd) and the node's pods live. Its
    /// `cluster/` and `node/` are emptied at start: every run is a fresh cluster.
    #[arg(long, env = "TANDEM_DEMO_DIR")]
    dir: PathBuf,
    /// Seconds each control-plane component, and each wait for pods or policies, may take.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// The test app's image in the sample manifests.
const TESTAPP_IMAGE: &str = "tandem-testapp:dev";
/// The client pod's `/stats` and `/burst` port.
const CLIENT_PORT: u16 = 9090;

/// The running cluster. Fields drop in order: pods, then Tandem, then the control plane.
struct Demo {
    node: NodeAgent,
    tandem: Tandem,
    cluster: ControlPlane,
    timeout: Duration,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube=error,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let ready = args.dir.join("ready");
    let _ = std::fs::remove_file(&ready);
    let mut shutdown = Shutdown::listen()?;
    let demo = tokio::select! {
        demo = start(&args) => demo?,
        () = shutdown.wait() => {
            progress("interrupted: stopped everything started so far");
            return Ok(());
        }
    };
    let report = tokio::select! {
        report = measure(&demo) => report,
        () = shutdown.wait() => {
            progress("interrupted: stopping");
            demo.stop().await;
            return Ok(());
        }
    };
    let routes = match report {
        Ok(routes) => routes,
        Err(e) => {
            demo.stop().await;
            return Err(e);
        }
    };
    println!("\n{}", table(&routes));
    println!(
        "Sent by the sample client pod through its tandem-proxy sidecar, answered through the\n\
         server pods' sidecars, over mutual TLS between the two. Without a policy the client's\n\
         proxy balances over the Service's meshed endpoints; with one, it also applies the\n\
         policy's routes, splits, retries and breaker per request. Debug builds on a small\n\
         shared machine: compare before with after, not with other meshes.\n\
         server and breaker: 1,000 requests, 8 at a time, right after the policy loaded; the\n\
         breaker's balancer (peak EWMA) shuns an endpoint that fails, and ejects it after 5\n\
         consecutive 5xx. flaky: 100 GET /api/items paced at 10/s; every failure's retry takes the\n\
         next, good answer, so nearly every request is retried, within the sample's budget\n\
         (20 % of requests + 10/s over 10 s; at 20/s it would refuse some, by design)."
    );
    println!(
        "\nLogs: containers {}, control plane {}, Tandem's webhook and operator {}",
        args.dir.join("node/logs").display(),
        demo.cluster.dir().join("logs").display(),
        demo.tandem.dir().display()
    );
    std::fs::write(
        &ready,
        format!("kubeconfig={}\n", demo.cluster.admin_kubeconfig().display()),
    )
    .with_context(|| format!("write {}", ready.display()))?;
    shutdown.wait().await;
    progress("stopping the pods, Tandem and the control plane");
    let _ = std::fs::remove_file(&ready);
    demo.stop().await;
    progress("stopped");
    Ok(())
}

/// A progress line, flushed at once (stdout goes to a log file `make demo` follows).
fn progress(line: &str) {
    use std::io::Write as _;
    println!("==> {line}");
    let _ = std::io::stdout().flush();
}

/// SIGTERM or SIGINT.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// A binary built beside this one (`cargo build -p tandem-tests --bins`, and the proxy by
/// `make e2e-bins`).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find the tandem-demo executable")?;
    let path = exe
        .parent()
        .context("tandem-demo has no directory")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} not found: run `make demo`, which builds it",
            path.display()
        );
    }
    Ok(path)
}

fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("empty {}", path.display()))?;
    }
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))
}

/// Control plane, Tandem, node agent; then the sample app, Ready.
async fn start(args: &Args) -> anyhow::Result<Demo> {
    net::require_root()?;
    let timeout = Duration::from_secs(args.timeout);
    let (proxy, testapp, shim) = (
        sibling("tandem-proxy")?,
        sibling("tandem-testapp")?,
        sibling("tandem-container")?,
    );
    let (cluster_dir, node_dir) = (args.dir.join("cluster"), args.dir.join("node"));
    fresh_dir(&cluster_dir)?;
    fresh_dir(&node_dir)?;

    progress("starting the control plane: etcd, kube-apiserver, kube-controller-manager");
    let cluster = ControlPlane::start(ControlPlaneOptions {
        dir: Some(cluster_dir),
        start_timeout: timeout,
    })
    .await?;
    progress(&format!(
        "control plane ready in {:.1} s at {}",
        cluster.started_in().as_secs_f64(),
        cluster.server()
    ));

    progress("installing Tandem from manifests/: CRDs, RBAC, webhook, operator");
    let tandem = Tandem::install(&cluster).await?;

    progress("starting the node agent");
    let images = Images(BTreeMap::from([
        (
            PROXY_IMAGE.to_owned(),
            Image {
                entrypoint: vec!["/usr/local/bin/tandem-proxy".into()],
                cmd: vec!["run".into()],
                user: 2102,
                programs: [("tandem-proxy".to_owned(), proxy)].into(),
            },
        ),
        (
            TESTAPP_IMAGE.to_owned(),
            Image {
                entrypoint: vec!["tandem-testapp".into()],
                cmd: vec![],
                user: 65532,
                programs: [("tandem-testapp".to_owned(), testapp)].into(),
            },
        ),
    ]));
    let node = NodeAgent::start(
        cluster.client(),
        NodeOptions {
            name: "tandem-node".into(),
            dir: node_dir,
            images,
            shim,
            forwards: tandem.node_forwards(),
            config_map_refresh: None,
        },
    )
    .await?;
    let demo = Demo {
        node,
        tandem,
        cluster,
        timeout,
    };

    progress("deploying the sample app (manifests/samples/app.yaml) and two failing services");
    let repo = manifests_dir().join("..");
    for doc in read_documents(&repo.join("manifests/samples/app.yaml"))? {
        demo.apply(&doc).await?;
    }
    // flaky (fails every second request) and breaker (one healthy pod, one failing every
    // request), from the end-to-end fixtures; their load generator is not needed here.
    for doc in read_documents(&repo.join("tests/fixtures/e2e/workloads.yaml"))? {
        if doc["metadata"]["name"] != "loadgen" {
            demo.apply(&doc).await?;
        }
    }
    for (selector, count) in [
        ("app=server", 2),
        ("app=client", 1),
        ("app=flaky", 1),
        ("app=breaker", 2),
    ] {
        demo.ready_pods(selector, count).await?;
    }
    progress("6 pods injected with tandem-init and the tandem-proxy sidecar, and Ready");
    Ok(demo)
}

impl Demo {
    async fn stop(self) {
        self.node.shutdown().await;
        // Tandem and the control plane stop on drop, in that order.
    }

    async fn apply(&self, value: &Value) -> anyhow::Result<()> {
        Ok(apply_object(&self.cluster.client(), value, "tandem-demo").await?)
    }

    async fn ready_pods(&self, selector: &str, count: usize) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.cluster.client(), "shop");
        let deadline = Instant::now() + self.timeout;
        loop {
            let pods = api
                .list(&ListParams::default().labels(selector))
                .await?
                .items;
            let ready: Vec<Pod> = pods.into_iter().filter(is_ready).collect();
            if ready.len() >= count {
                return Ok(ready);
            }
            if Instant::now() > deadline {
                bail!(
                    "{count} Ready pods {selector} not seen in {:?} ({} Ready); the node's logs: {}",
                    self.timeout,
                    ready.len(),
                    self.cluster.dir().join("../node/logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn cluster_ip(&self, service: &str) -> anyhow::Result<String> {
        let api: Api<Service> = Api::namespaced(self.cluster.client(), "shop");
        api.get(service)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .with_context(|| format!("Service {service} has no cluster IP"))
    }

    /// `n` requests from the client pod, through its proxy, to `target`.
    async fn burst(
        &self,
        client: Ipv4Addr,
        target: &str,
        n: u64,
        concurrency: u64,
        rps: Option<u32>,
    ) -> anyhow::Result<Burst> {
        let mut path = format!("/burst?n={n}&concurrency={concurrency}&target={target}");
        if let Some(rps) = rps {
            path.push_str(&format!("&rps={rps}"));
        }
        let paced = rps.map_or(0, |r| n / u64::from(r.max(1)));
        let limit = Duration::from_secs(30 + paced);
        let response = net::http_get_in(
            &self.node.netns(),
            SocketAddr::from((client, CLIENT_PORT)),
            &path,
            limit,
        )
        .await?;
        if response.status != 200 {
            bail!("burst {path}: {} {}", response.status, response.body);
        }
        Ok(serde_json::from_str(&response.body)?)
    }

    /// The client proxy's admin `/config`: the config it loaded and its policies' state.
    async fn admin(&self, client: Ipv4Addr) -> anyhow::Result<Value> {
        let response = self
            .node
            .http_get(
                SocketAddr::from((client, tandem_crds::names::ADMIN_PORT)),
                "/config",
            )
            .await?;
        Ok(serde_json::from_str(&response.body)?)
    }

    /// The config the client's proxy has loaded, if any.
    async fn loaded(&self, client: Ipv4Addr) -> anyhow::Result<Option<ProxyConfig>> {
        let admin = self.admin(client).await?;
        if admin["config"].is_null() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_value(admin["config"].clone())?))
    }

    /// Applies a policy and waits until the client's proxy has loaded a config satisfying
    /// `check`; returns how long that took.
    async fn apply_policy(
        &self,
        client: Ipv4Addr,
        policy: &Value,
        check: impl Fn(&ProxyConfig) -> bool,
    ) -> anyhow::Result<Duration> {
        let applied = Instant::now();
        self.apply(policy).await?;
        loop {
            if let Ok(Some(config)) = self.loaded(client).await
                && check(&config)
            {
                return Ok(applied.elapsed());
            }
            if applied.elapsed() > self.timeout {
                bail!(
                    "the client's proxy did not load {} within {:?}",
                    policy["metadata"]["name"],
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Per route: measure, apply the sample policy, wait until the client's proxy has it, measure.
async fn measure(demo: &Demo) -> anyhow::Result<Vec<RouteReport>> {
    let client_pod = demo.ready_pods("app=client", 1).await?.remove(0);
    let client: Ipv4Addr = client_pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .context("the client pod has no IP")?
        .parse()?;
    let samples = manifests_dir().join("samples");
    let sample = |file: &str| -> anyhow::Result<Value> {
        read_documents(&samples.join(file))?
            .into_iter()
            .next()
            .with_context(|| format!("manifests/samples/{file} is empty"))
    };
    let server = format!("http://{}/", demo.cluster_ip("server").await?);
    let flaky = format!("http://{}/api/items", demo.cluster_ip("flaky").await?);
    let breaker = format!("http://{}/", demo.cluster_ip("breaker").await?);

    // Published endpoints reach the node's Service rules a moment after the pods are Ready.
    let deadline = Instant::now() + demo.timeout;
    while !matches!(demo.burst(client, &server, 20, 1, None).await, Ok(b) if b.ok == b.total) {
        if Instant::now() > deadline {
            bail!("requests from the client to the server Service did not succeed");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut routes = Vec::new();

    progress("server: 1,000 requests with no policy");
    let before = demo.burst(client, &server, 1000, 8, None).await?;
    progress("server: applying manifests/samples/canary-split.yaml (90 % v1, 10 % v2)");
    let took = demo
        .apply_policy(client, &sample("canary-split.yaml")?, |c| {
            weights(c, "server") == Some(vec![90, 10])
        })
        .await?;
    progress(&format!(
        "server: the split is in the client's proxy {:.1} s after apply; 1,000 requests",
        took.as_secs_f64()
    ));
    let after = demo.burst(client, &server, 1000, 8, None).await?;
    routes.push(RouteReport {
        route: "shop/server  GET /".into(),
        policy: "canary-split (90/10)".into(),
        before,
        after,
    });

    progress("flaky (fails every 2nd request): 100 requests with no policy");
    let before = demo.burst(client, &flaky, 100, 1, Some(10)).await?;
    progress("flaky: applying manifests/samples/retries-with-budget.yaml, pointed at flaky");
    let policy = retarget(
        &sample("retries-with-budget.yaml")?,
        "flaky-retries",
        "flaky",
    )
    .context("retries-with-budget.yaml has no metadata.name or spec.targetRef")?;
    let took = demo
        .apply_policy(client, &policy, |c| {
            c.services
                .iter()
                .any(|s| s.name == "flaky" && s.routes.iter().any(|r| r.retries.is_some()))
        })
        .await?;
    progress(&format!(
        "flaky: retries are in the client's proxy {:.1} s after apply; 100 requests",
        took.as_secs_f64()
    ));
    let after = demo.burst(client, &flaky, 100, 1, Some(10)).await?;
    let admin = demo.admin(client).await?;
    let policy = admin["policies"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["service"] == "shop/flaky")
        .cloned()
        .unwrap_or_default();
    progress(&format!(
        "flaky: the client's proxy retried {} times; the budget refused {}",
        policy["retriesTotal"], policy["retryBudgetExhaustedTotal"]
    ));
    routes.push(RouteReport {
        route: "shop/flaky   GET /api/items".into(),
        policy: "retries-with-budget".into(),
        before,
        after,
    });

    progress("breaker (one of two pods fails every request): 1,000 requests with no policy");
    let before = demo.burst(client, &breaker, 1000, 8, None).await?;
    progress("breaker: applying manifests/samples/circuit-breaker.yaml, pointed at breaker");
    let policy = retarget(&sample("circuit-breaker.yaml")?, "breaker", "breaker")
        .context("circuit-breaker.yaml has no metadata.name or spec.targetRef")?;
    let took = demo
        .apply_policy(client, &policy, |c| {
            c.services
                .iter()
                .any(|s| s.name == "breaker" && s.circuit_breaker.is_some())
        })
        .await?;
    progress(&format!(
        "breaker: the breaker is in the client's proxy {:.1} s after apply; 1,000 requests",
        took.as_secs_f64()
    ));
    let after = demo.burst(client, &breaker, 1000, 8, None).await?;
    let bad = demo
        .ready_pods("app=breaker,health=bad", 1)
        .await?
        .remove(0)
        .status
        .and_then(|s| s.pod_ip)
        .context("the failing breaker pod has no IP")?;
    let admin = demo.admin(client).await?;
    let endpoint = admin["policies"]["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["service"] == "shop/breaker")
        .flat_map(|d| d["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == format!("{bad}:8080").as_str())
        .unwrap_or_default();
    progress(&format!(
        "breaker: {} errors; the client's proxy sees {bad} as {} ({} consecutive 5xx, ejected {} times)",
        after.total - after.ok,
        endpoint["state"].as_str().unwrap_or("unknown"),
        endpoint["consecutive5xx"],
        endpoint["timesEjected"]
    ));
    routes.push(RouteReport {
        route: "shop/breaker GET /".into(),
        policy: "circuit-breaker".into(),
        before,
        after,
    });
    Ok(routes)
}

/// The weights of the first route of `shop/<service>` in a proxy config.
fn weights(config: &ProxyConfig, service: &str) -> Option<Vec<u32>> {
    let route = config
        .services
        .iter()
        .find(|s| s.namespace == "shop" && s.name == service)?
        .routes
        .first()?;
    Some(route.backends.iter().map(|b| b.weight).collect())
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
