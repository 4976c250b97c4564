//! A real Kubernetes control plane on loopback: etcd, kube-apiserver (TLS, client-certificate
//! authentication, RBAC, ServiceAccount tokens, the default admission chain including the
//! mutating webhook) and kube-controller-manager (ServiceAccounts, tokens, Deployments,
//! ReplicaSets, EndpointSlices, garbage collection, namespace deletion, node CIDRs).
//!
//! There is no scheduler and no kubelet: the node agent binds pods and runs them.
//!
//! Every port is picked free at start, every file lives in one directory (a temporary one
//! removed on drop unless the caller names one), and the processes stop when the
//! [`ControlPlane`] is dropped.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::binaries::Binaries;
use crate::kubeconfig::{self, Credentials};
use crate::pki::{CertPair, Pki};
use crate::process::{Supervised, free_port};
use crate::{Error, Result};

/// The Service ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The pod address range; kube-controller-manager gives each Node a /24 of it.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The prefix length of each Node's pod range.
pub const NODE_CIDR_MASK: u8 = 24;
/// The issuer in ServiceAccount tokens, as in a kubeadm cluster.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How a control plane is started.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Keep all state here, and leave it after stopping (for a cluster a person uses). `None`
    /// means a temporary directory removed on drop.
    pub dir: Option<PathBuf>,
    /// How long each component may take to become ready.
    pub start_timeout: Duration,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            dir: None,
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// The files of a running control plane.
#[derive(Clone, Debug)]
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn pki(&self, name: &str) -> PathBuf {
        self.root.join("pki").join(name)
    }
    fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }
    fn admin_kubeconfig(&self) -> PathBuf {
        self.root.join("admin.kubeconfig")
    }
    fn kcm_kubeconfig(&self) -> PathBuf {
        self.root.join("kube-controller-manager.kubeconfig")
    }
    fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }
}

/// A running control plane. Dropping it stops the processes (controller-manager, apiserver,
/// etcd, in that order: the field order below) and removes a temporary directory.
pub struct ControlPlane {
    kube_controller_manager: Supervised,
    kube_apiserver: Supervised,
    etcd: Supervised,
    apiserver_command: (PathBuf, Vec<String>),
    pki: Pki,
    layout: Layout,
    api_port: u16,
    client: kube::Client,
    started_in: Duration,
    start_timeout: Duration,
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server())
            .field("dir", &self.layout.root)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the apiserver
    /// is ready and the controller-manager has created the `default` ServiceAccount.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self> {
        let started = Instant::now();
        let bins = Binaries::locate()?;
        let (temp, root) = match &options.dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("tandem-cluster-")
                    .tempdir()
                    .map_err(|source| Error::io("create a temporary directory", source))?;
                let root = temp.path().to_owned();
                (Some(temp), root)
            }
        };
        let layout = Layout { root };
        for sub in ["pki", "logs"] {
            create_dir(&layout.root.join(sub))?;
        }
        let pki = Pki::new()?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        write_pki(&layout, &pki)?;

        let timeout = options.start_timeout;
        let mut etcd = start_etcd(&bins, &layout)?;
        let etcd_url = etcd.1.clone();
        wait_until("etcd /health", timeout, &mut [&mut etcd.0], || {
            etcd_healthy(etcd_url.clone())
        })
        .await?;
        let mut etcd = etcd.0;

        let apiserver_command = apiserver_command(&bins, &layout, api_port, &etcd_url);
        let mut kube_apiserver = spawn(&apiserver_command, "kube-apiserver", &layout)?;

        let admin = pki.client_cert("tandem-admin", Some("system:masters"))?;
        let admin_yaml = kubeconfig::render(&server, &pki.ca_pem(), "admin", &admin.into())?;
        write_file(&layout.admin_kubeconfig(), &admin_yaml)?;
        let client = client_from_kubeconfig(&admin_yaml).await?;
        wait_until(
            "kube-apiserver /readyz",
            timeout,
            &mut [&mut etcd, &mut kube_apiserver],
            || apiserver_ready(client.clone()),
        )
        .await?;

        let kcm = pki.client_cert("system:kube-controller-manager", None)?;
        let kcm_yaml = kubeconfig::render(
            &server,
            &pki.ca_pem(),
            "kube-controller-manager",
            &kcm.into(),
        )?;
        write_file(&layout.kcm_kubeconfig(), &kcm_yaml)?;
        let mut kube_controller_manager = spawn(
            &controller_manager_command(&bins, &layout),
            "kube-controller-manager",
            &layout,
        )?;
        wait_until(
            "kube-controller-manager to create ServiceAccount default/default",
            timeout,
            &mut [&mut etcd, &mut kube_apiserver, &mut kube_controller_manager],
            || default_service_account_exists(client.clone()),
        )
        .await?;

        let started_in = started.elapsed();
        tracing::info!(?started_in, dir = %layout.root.display(), %server, "Control plane ready");
        Ok(Self {
            kube_controller_manager,
            kube_apiserver,
            etcd,
            apiserver_command,
            pki,
            layout,
            api_port,
            client,
            started_in,
            start_timeout: timeout,
            _temp: temp,
        })
    }

    /// A client with cluster-admin rights (group `system:masters`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The apiserver's URL.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The admin kubeconfig file (for kubectl).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.layout.admin_kubeconfig()
    }

    /// A kubectl command with the admin kubeconfig (for checks that are about kubectl itself,
    /// such as `apply --dry-run=server`; tests otherwise use [`ControlPlane::client`]).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(kubectl_binary());
        cmd.arg(format!(
            "--kubeconfig={}",
            self.admin_kubeconfig().display()
        ));
        cmd
    }

    /// The directory holding the PKI, kubeconfigs, logs and etcd data.
    pub fn dir(&self) -> &Path {
        &self.layout.root
    }

    /// The cluster CA, PEM.
    pub fn ca_pem(&self) -> String {
        self.pki.ca_pem()
    }

    /// How long [`ControlPlane::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// A serving certificate for a process on 127.0.0.1 that the apiserver calls (the
    /// webhook), signed by the cluster CA, which is then the webhook's `caBundle`.
    pub fn loopback_serving_cert(&self, common_name: &str) -> Result<CertPair> {
        self.pki.serving_cert(
            common_name,
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )
    }

    /// Writes a kubeconfig at `path` that authenticates as ServiceAccount `namespace/name`
    /// with a token from the TokenRequest API, valid for `lifetime`, so a process (the
    /// operator, the webhook) runs with exactly the rights its RBAC grants. The
    /// ServiceAccount must exist.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        lifetime: Duration,
        path: &Path,
    ) -> Result<()> {
        let token = self
            .service_account_token(namespace, name, lifetime)
            .await?;
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let yaml = kubeconfig::render(
            &self.server(),
            &self.ca_pem(),
            &user,
            &Credentials::Token(token),
        )?;
        write_file(path, &yaml)
    }

    /// A token for ServiceAccount `namespace/name` from the TokenRequest API.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        lifetime: Duration,
    ) -> Result<String> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![SERVICE_ACCOUNT_ISSUER.to_owned()],
                expiration_seconds: Some(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let created: TokenRequest = api
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .map_err(|e| Error::kube(format!("request a token for {namespace}/{name}"), e))?;
        created.status.map(|status| status.token).ok_or_else(|| {
            Error::Unexpected(format!(
                "token request for {namespace}/{name} returned no token"
            ))
        })
    }

    /// Fails with the log's tail if any control-plane process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.etcd.ensure_running()?;
        self.kube_apiserver.ensure_running()?;
        self.kube_controller_manager.ensure_running()
    }

    /// Stops kube-apiserver and starts it again with the same flags, then waits until it is
    /// ready: what an apiserver upgrade or crash looks like to clients.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver().await
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after a grace period): clients get connection
    /// refused until [`Self::start_apiserver`]. Idempotent.
    pub fn stop_apiserver(&mut self) {
        self.kube_apiserver.stop();
    }

    /// Starts a stopped kube-apiserver again with the same flags and waits until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        self.kube_apiserver = spawn(&self.apiserver_command, "kube-apiserver", &self.layout)?;
        let client = self.client();
        wait_until(
            "kube-apiserver /readyz after restart",
            self.start_timeout,
            &mut [&mut self.etcd, &mut self.kube_apiserver],
            || apiserver_ready(client.clone()),
        )
        .await
    }
}

impl From<CertPair> for Credentials {
    fn from(pair: CertPair) -> Self {
        Credentials::ClientCert {
            cert_pem: pair.cert_pem,
            key_pem: pair.key_pem,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and their flags

fn write_pki(layout: &Layout, pki: &Pki) -> Result<()> {
    let serving = pki.serving_cert(
        "kube-apiserver",
        &[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        &[
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            // The `kubernetes` Service's ClusterIP: the first address of SERVICE_CIDR.
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
        ],
    )?;
    write_file(&layout.pki("ca.crt"), &pki.ca_pem())?;
    write_file(&layout.pki("ca.key"), &pki.ca_key_pem())?;
    write_file(&layout.pki("apiserver.crt"), &serving.cert_pem)?;
    write_file(&layout.pki("apiserver.key"), &serving.key_pem)?;
    write_file(&layout.pki("sa.key"), &pki.service_account_key_pem())?;
    write_file(&layout.pki("sa.pub"), &pki.service_account_public_key_pem())
}

fn start_etcd(bins: &Binaries, layout: &Layout) -> Result<(Supervised, String)> {
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(&bins.etcd);
    cmd.args([
        "--name=tandem".to_owned(),
        format!("--data-dir={}", layout.etcd_data().display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=tandem={peer_url}"),
        // A throwaway store: durability buys nothing and fsync costs a lot on shared disks.
        "--unsafe-no-fsync=true".to_owned(),
        "--log-level=warn".to_owned(),
        "--quota-backend-bytes=2147483648".to_owned(),
    ]);
    let proc = Supervised::spawn("etcd", cmd, &layout.log("etcd"))?;
    Ok((proc, client_url))
}

fn apiserver_command(
    bins: &Binaries,
    layout: &Layout,
    port: u16,
    etcd_url: &str,
) -> (PathBuf, Vec<String>) {
    let pki = |name: &str| layout.pki(name).display().to_string();
    let args = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        format!("--secure-port={port}"),
        format!(
            "--cert-dir={}",
            layout.root.join("apiserver-certs").display()
        ),
        format!("--tls-cert-file={}", pki("apiserver.crt")),
        format!("--tls-private-key-file={}", pki("apiserver.key")),
        format!("--client-ca-file={}", pki("ca.crt")),
        "--authorization-mode=RBAC".to_owned(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", pki("sa.pub")),
        format!("--service-account-signing-key-file={}", pki("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        // The proxy's init container needs NET_ADMIN; the node agent runs it for real.
        "--allow-privileged=true".to_owned(),
        // The built-in reconciler would publish 127.0.0.1 as the `kubernetes` endpoint,
        // which endpoint validation forbids; nothing here reaches the apiserver that way.
        "--endpoint-reconciler-type=none".to_owned(),
        "--profiling=false".to_owned(),
    ];
    (bins.kube_apiserver.clone(), args)
}

fn controller_manager_command(bins: &Binaries, layout: &Layout) -> (PathBuf, Vec<String>) {
    let pki = |name: &str| layout.pki(name).display().to_string();
    let kubeconfig = layout.kcm_kubeconfig().display().to_string();
    let args = vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        // Each controller acts with its own ServiceAccount and RBAC role, as in kubeadm.
        "--use-service-account-credentials=true".to_owned(),
        format!("--service-account-private-key-file={}", pki("sa.key")),
        format!("--root-ca-file={}", pki("ca.crt")),
        format!("--cluster-signing-cert-file={}", pki("ca.crt")),
        format!("--cluster-signing-key-file={}", pki("ca.key")),
        "--leader-elect=false".to_owned(),
        "--bind-address=127.0.0.1".to_owned(),
        // No health endpoint needed: readiness is judged by what the controllers do.
        "--secure-port=0".to_owned(),
        // The node agent does not renew a node Lease; without this controller the node
        // would be marked unreachable and its pods evicted.
        "--controllers=*,-node-lifecycle-controller".to_owned(),
        "--allocate-node-cidrs=true".to_owned(),
        format!("--cluster-cidr={CLUSTER_CIDR}"),
        format!("--node-cidr-mask-size={NODE_CIDR_MASK}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
    ];
    (bins.kube_controller_manager.clone(), args)
}

fn spawn(command: &(PathBuf, Vec<String>), name: &str, layout: &Layout) -> Result<Supervised> {
    let mut cmd = Command::new(&command.0);
    cmd.args(&command.1);
    Supervised::spawn(name, cmd, &layout.log(name))
}

// ---------------------------------------------------------------------------------------------
// Readiness

/// Polls `probe` every 100 ms until it yields a value, failing early if a process exits.
async fn wait_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    processes: &mut [&mut Supervised],
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        for process in processes.iter_mut() {
            process.ensure_running()?;
        }
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(message) => message,
        };
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                seconds: timeout.as_secs(),
                detail: Some(last),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn etcd_healthy(url: String) -> std::result::Result<(), String> {
    let addr = url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    if response.contains(r#""health":"true""#) {
        Ok(())
    } else {
        Err(response)
    }
}

async fn apiserver_ready(client: kube::Client) -> std::result::Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let body = client
        .request_text(request)
        .await
        .map_err(|e| e.to_string())?;
    if body.trim() == "ok" {
        Ok(())
    } else {
        Err(body)
    }
}

async fn default_service_account_exists(client: kube::Client) -> std::result::Result<(), String> {
    let api: Api<ServiceAccount> = Api::namespaced(client, "default");
    match api.get_opt("default").await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("not yet created".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Files and clients

/// The kubectl to run: `$KUBECTL`, else the newest versioned build the Google Cloud SDK
/// ships (/usr/bin/kubectl there is a dispatcher without a 1.34 build; 1.33 is within
/// kubectl's one-minor skew of a 1.34 apiserver), else `kubectl` from `PATH`.
pub fn kubectl_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return PathBuf::from(path);
    }
    let sdk = Path::new("/usr/lib/google-cloud-sdk/bin/kubectl.1.33");
    if sdk.is_file() {
        return sdk.to_owned();
    }
    PathBuf::from("kubectl")
}

/// A kube client for a kubeconfig document.
pub async fn client_from_kubeconfig(yaml: &str) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).map_err(Error::Kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(Error::Kubeconfig)?;
    kube::Client::try_from(config).map_err(|e| Error::kube("build a client", e))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path)
        .map_err(|source| Error::io(format!("create {}", path.display()), source))
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents)
        .map_err(|source| Error::io(format!("write {}", path.display()), source))
}
