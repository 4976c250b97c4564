//! Installing Tandem into a local control plane the way a user would: the CRDs, the RBAC and
//! the webhook configuration from `manifests/`, then the webhook and the operator as local
//! processes that authenticate with their own ServiceAccounts' tokens.
//!
//! The one change to the manifests is where the apiserver finds the webhook: the
//! MutatingWebhookConfiguration's `clientConfig.service` becomes
//! `url: https://127.0.0.1:<port><path>` with the cluster CA as `caBundle` (envtest does the
//! same), because nothing routes a Service's ClusterIP to a process on the host.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::{Value, json};
use tandem_crds::{identity, names};

use crate::cluster::ControlPlane;
use crate::node::forward::HostForward;
use crate::node::net;
use crate::process::{Supervised, free_port};
use crate::{Error, Result};

/// Field manager of everything the harness applies.
pub const FIELD_MANAGER: &str = "tandem-tests";
/// The proxy image the webhook injects (the node agent maps it to the tandem-proxy binary).
pub const PROXY_IMAGE: &str = concat!("tandem-proxy:", env!("CARGO_PKG_VERSION"));
/// How long tokens minted for the local processes live.
const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The repository's `manifests/` directory.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// The YAML files of a directory, sorted.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|source| Error::io(format!("read {}", dir.display()), source))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| Error::io(format!("read {}", dir.display()), source))?
            .path();
        if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The documents of a (multi-document) YAML file, as JSON values; empty documents dropped.
pub fn read_documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::io(format!("read {}", path.display()), source))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc).map_err(Error::Yaml)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// A CRD version the apiserver serves, with its schema.
#[derive(Clone, Debug)]
pub struct InstalledCrd {
    /// How to reach its objects.
    pub resource: ApiResource,
    /// Its `openAPIV3Schema`.
    pub schema: Value,
}

/// Applies every CRD in `manifests/crds/` (server-side apply) and waits until each is
/// Established.
pub async fn install_crds(client: &kube::Client) -> Result<Vec<InstalledCrd>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut installed = Vec::new();
    for path in yaml_files(&manifests_dir().join("crds"))? {
        for doc in read_documents(&path)? {
            let crd: CustomResourceDefinition =
                serde_json::from_value(doc.clone()).map_err(Error::Json)?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| Error::kube(format!("apply {}", path.display()), e))?;
            installed.extend(served_versions(&doc));
            wait_established(&crds, &name).await?;
        }
    }
    Ok(installed)
}

fn served_versions(crd: &Value) -> Vec<InstalledCrd> {
    let spec = &crd["spec"];
    let (group, kind, plural) = (
        spec["group"].as_str().unwrap_or_default(),
        spec["names"]["kind"].as_str().unwrap_or_default(),
        spec["names"]["plural"].as_str().unwrap_or_default(),
    );
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|version| InstalledCrd {
            resource: ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version["name"].as_str().unwrap_or_default(), kind),
                plural,
            ),
            schema: version["schema"]["openAPIV3Schema"].clone(),
        })
        .collect()
}

async fn wait_established(crds: &Api<CustomResourceDefinition>, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = crds
            .get(name)
            .await
            .map_err(|e| Error::kube(format!("read CRD {name}"), e))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("CRD {name} to be Established"),
                seconds: 30,
                detail: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates (or keeps) a namespace, with labels.
pub async fn ensure_namespace(
    client: &kube::Client,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<()> {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
        .await
        .map_err(|e| Error::kube(format!("apply namespace {name}"), e))?;
    Ok(())
}

/// The API resources of the kinds [`install_rbac`] applies (no discovery needed).
fn rbac_resource(kind: &str) -> Option<ApiResource> {
    let (group, version, plural) = match kind {
        "ServiceAccount" => ("", "v1", "serviceaccounts"),
        "Role" => ("rbac.authorization.k8s.io", "v1", "roles"),
        "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings"),
        "ClusterRole" => ("rbac.authorization.k8s.io", "v1", "clusterroles"),
        "ClusterRoleBinding" => ("rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
        _ => return None,
    };
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        plural,
    ))
}

/// Applies every ServiceAccount, Role, ClusterRole and binding found in the component
/// directories of `manifests/` (not `crds/`, `samples/` or `kind/`). Returns how many.
pub async fn install_rbac(client: &kube::Client) -> Result<usize> {
    let mut applied = 0;
    for dir in component_dirs()? {
        for path in yaml_files(&dir)? {
            for doc in read_documents(&path)? {
                let Some(resource) = rbac_resource(doc["kind"].as_str().unwrap_or_default()) else {
                    continue;
                };
                apply(client, &resource, &doc).await?;
                applied += 1;
            }
        }
    }
    Ok(applied)
}

/// Directories of `manifests/` that hold a component's deployment (webhook, operator, ...).
fn component_dirs() -> Result<Vec<PathBuf>> {
    let root = manifests_dir();
    let entries = std::fs::read_dir(&root)
        .map_err(|source| Error::io(format!("read {}", root.display()), source))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| Error::io(format!("read {}", root.display()), source))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() && !matches!(name, "crds" | "samples" | "kind") {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

async fn apply(client: &kube::Client, resource: &ApiResource, doc: &Value) -> Result<()> {
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(doc),
    )
    .await
    .map_err(|e| Error::kube(format!("apply {} {name}", resource.kind), e))?;
    Ok(())
}

/// Server-side applies one object of any kind (found by its apiVersion and kind through
/// discovery) as `field_manager`, taking over fields another manager holds.
pub async fn apply_object(client: &kube::Client, value: &Value, field_manager: &str) -> Result<()> {
    let unexpected = |what: String| Error::Unexpected(what);
    let object: DynamicObject = serde_json::from_value(value.clone())
        .map_err(|e| unexpected(format!("not a Kubernetes object: {e}")))?;
    let types = object
        .types
        .clone()
        .ok_or_else(|| unexpected("object without apiVersion/kind".into()))?;
    let gvk = GroupVersionKind::try_from(&types).map_err(|e| unexpected(e.to_string()))?;
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| Error::kube(format!("discover {}", types.kind), e))?;
    let name = object
        .metadata
        .name
        .clone()
        .ok_or_else(|| unexpected("object without a name".into()))?;
    let api: Api<DynamicObject> = match (caps.scope, object.metadata.namespace.as_deref()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(value),
    )
    .await
    .map_err(|e| Error::kube(format!("apply {} {name}", types.kind), e))?;
    Ok(())
}

/// The webhook configuration from `manifests/webhook/`, pointed at `https://127.0.0.1:port`.
pub fn local_webhook_configuration(port: u16, ca_pem: &str) -> Result<Value> {
    let path = manifests_dir().join("webhook/mutatingwebhookconfiguration.yaml");
    let mut doc = read_documents(&path)?
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .ok_or_else(|| {
            Error::Unexpected(format!(
                "no MutatingWebhookConfiguration in {}",
                path.display()
            ))
        })?;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let webhooks = doc["webhooks"]
        .as_array_mut()
        .ok_or_else(|| Error::Unexpected(format!("{} has no webhooks", path.display())))?;
    for webhook in webhooks {
        let path = webhook["clientConfig"]["service"]["path"]
            .as_str()
            .unwrap_or("/")
            .to_owned();
        webhook["clientConfig"] = json!({
            "url": format!("https://127.0.0.1:{port}{path}"),
            "caBundle": ca_bundle,
        });
    }
    Ok(doc)
}

/// Builds a workspace binary (a no-op when it is fresh) and returns its path. Tests call
/// this so that `cargo test` alone is enough; each binary is built once per test process.
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let target = target_dir()?;
    let path = target.join(bin);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|b| b == bin) {
        let mut cargo = Command::new(env!("CARGO"));
        // The variables cargo sets for this test process would change the fingerprints of
        // crates that read them at compile time and make this build redo what
        // `cargo build` from the command line (make e2e) already did.
        for (key, _) in std::env::vars_os() {
            if is_per_crate_cargo_var(&key.to_string_lossy()) {
                cargo.env_remove(key);
            }
        }
        let status = cargo
            .args(["build", "-p", package, "--bin", bin])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|source| Error::io(format!("cargo build -p {package}"), source))?;
        if !status.success() {
            return Err(Error::Unexpected(format!(
                "cargo build -p {package} --bin {bin}: {status}"
            )));
        }
        built.push(bin.to_owned());
    }
    Ok(path)
}

fn is_per_crate_cargo_var(key: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_CRATE_",
        "CARGO_MANIFEST_",
        "CARGO_BIN_EXE_",
    ]
    .iter()
    .any(|prefix| key.starts_with(prefix))
        || matches!(key, "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR")
}

/// `target/debug` (or whichever profile built this test): two levels above the test
/// executable in `deps/`.
fn target_dir() -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|source| Error::io("find the test executable", source))?;
    exe.parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .map(Path::to_owned)
        .ok_or_else(|| Error::Unexpected(format!("no target directory above {}", exe.display())))
}

/// Where the local cluster's processes listen, and so the flags they get: one place, so that
/// the webhook, the operator and the node's forwarders agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Addresses {
    /// The webhook's HTTPS, on loopback.
    webhook: SocketAddr,
    /// The operator's `/healthz`, `/readyz` and `/metrics`, on loopback.
    operator_http: SocketAddr,
    /// The operator's signer, on loopback; `None` while the operator has none.
    identity: SocketAddr,
}

impl Addresses {
    /// The operator's flags: the Deployment's (manifests/operator/deployment.yaml), on
    /// loopback.
    fn operator_args(&self) -> Vec<String> {
        vec![
            format!("--http-addr={}", self.operator_http),
            format!("--identity-listen={}", self.identity),
        ]
    }

    /// The webhook's flags. Pods reach the signer through the node's forwarder on the gateway
    /// address ([`Tandem::node_forwards`]) and verify it by its Service name (the webhook's
    /// default `--identity-name`), so an IP address is the right `--identity-addr`.
    fn webhook_args(&self, cert: &Path, key: &Path) -> Vec<String> {
        let signer = SocketAddr::from((net::GATEWAY, identity::SIGNER_PORT));
        vec![
            format!("--listen={}", self.webhook),
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
            format!("--proxy-image={PROXY_IMAGE}"),
            "--image-pull-policy=IfNotPresent".to_owned(),
            format!("--identity-addr={signer}"),
        ]
    }

    /// What the node must carry from pods to the machine: the signer's port.
    fn node_forwards(&self) -> Vec<HostForward> {
        vec![HostForward {
            port: identity::SIGNER_PORT,
            target: self.identity,
        }]
    }
}

/// What may differ from a user's default install.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// Extra environment for the operator, after the Deployment's (e.g. `TANDEM_CERT_TTL`).
    pub operator_env: Vec<(String, String)>,
    /// Extra flags for the operator, after the Deployment's (e.g. `--metrics-prefix=istio`).
    pub operator_args: Vec<String>,
}

/// Tandem installed into a control plane, its processes running. Dropping it stops them.
#[derive(Debug)]
pub struct Tandem {
    webhook: Component,
    operator: Component,
    addresses: Addresses,
    crds: Vec<InstalledCrd>,
    dir: tempfile::TempDir,
}

/// One of Tandem's processes, with what it takes to start it again as it was. Its
/// ServiceAccount in `tandem-system` has its name, as in `manifests/`.
#[derive(Debug)]
struct Component {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    process: Supervised,
}

impl Component {
    async fn start(
        cluster: &ControlPlane,
        name: &'static str,
        binary: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> Result<Self> {
        let process = spawn_component(cluster, name, &binary, &args, &env, dir).await?;
        Ok(Self {
            name,
            binary,
            args,
            env,
            process,
        })
    }

    /// Stops the process (SIGTERM, as a rollout does) and starts it again with a fresh token.
    async fn restart(&mut self, cluster: &ControlPlane, dir: &Path) -> Result<()> {
        self.process.stop();
        self.process =
            spawn_component(cluster, self.name, &self.binary, &self.args, &self.env, dir).await?;
        Ok(())
    }
}

async fn spawn_component(
    cluster: &ControlPlane,
    name: &str,
    binary: &Path,
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
) -> Result<Supervised> {
    let mut cmd = Command::new(binary);
    cmd.args(args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    spawn_as_service_account(cluster, names::SYSTEM_NAMESPACE, name, name, cmd, dir).await
}

impl Tandem {
    /// Installs the CRDs, the RBAC and the webhook configuration; starts the webhook with its
    /// own ServiceAccount's credentials and a serving certificate for 127.0.0.1, and the
    /// operator with its own; and waits until the webhook accepts connections and the
    /// operator's caches are synced (`/readyz`).
    pub async fn install(cluster: &ControlPlane) -> Result<Self> {
        Self::install_with(cluster, InstallOptions::default()).await
    }

    /// [`Tandem::install`], with `options`.
    pub async fn install_with(cluster: &ControlPlane, options: InstallOptions) -> Result<Self> {
        let client = cluster.client();
        let crds = install_crds(&client).await?;
        ensure_namespace(&client, names::SYSTEM_NAMESPACE, &[]).await?;
        install_rbac(&client).await?;

        let operator_binary = workspace_binary("tandem-operator", "tandem-operator")?;
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // The signer on a port of its own (the Deployment's 15030 may be taken on the machine).
        let identity = loopback(free_port()?);
        let addresses = Addresses {
            webhook: loopback(free_port()?),
            operator_http: loopback(free_port()?),
            identity,
        };
        let config = local_webhook_configuration(addresses.webhook.port(), &cluster.ca_pem())?;
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "admissionregistration.k8s.io",
                "v1",
                "MutatingWebhookConfiguration",
            ),
            "mutatingwebhookconfigurations",
        );
        apply(&client, &resource, &config).await?;

        let dir = tempfile::Builder::new()
            .prefix("tandem-install-")
            .tempdir()
            .map_err(|source| Error::io("create a temporary directory", source))?;
        let cert = cluster.loopback_serving_cert("tandem-webhook")?;
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        write(&cert_path, &cert.cert_pem)?;
        write(&key_path, &cert.key_pem)?;
        let webhook_args = addresses.webhook_args(&cert_path, &key_path);
        let mut webhook = Component::start(
            cluster,
            "tandem-webhook",
            workspace_binary("tandem-webhook", "tandem-webhook")?,
            webhook_args,
            Vec::new(),
            dir.path(),
        )
        .await?;

        let operator_env = [
            ("POD_NAME", "tandem-operator-local"),
            ("POD_NAMESPACE", names::SYSTEM_NAMESPACE),
            ("TANDEM_LOG_FORMAT", "text"),
            ("RUST_LOG", "info"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain(options.operator_env)
        .collect();
        let mut operator_args = addresses.operator_args();
        operator_args.extend(options.operator_args);
        let mut operator = Component::start(
            cluster,
            "tandem-operator",
            operator_binary,
            operator_args,
            operator_env,
            dir.path(),
        )
        .await?;
        wait_listening(&mut webhook.process, addresses.webhook).await?;
        wait_ready(&mut operator.process, addresses.operator_http).await?;
        Ok(Self {
            webhook,
            operator,
            addresses,
            crds,
            dir,
        })
    }

    /// Where the operator's signer listens on the machine.
    pub fn identity_addr(&self) -> SocketAddr {
        self.addresses.identity
    }

    /// The forwarders a node needs so its pods reach Tandem's processes on the machine (the
    /// signer, when identity is on): pass them in [`crate::node::NodeOptions::forwards`].
    pub fn node_forwards(&self) -> Vec<HostForward> {
        self.addresses.node_forwards()
    }

    /// Where the webhook listens.
    pub fn webhook_addr(&self) -> SocketAddr {
        self.addresses.webhook
    }

    /// Where the operator serves `/healthz`, `/readyz` and `/metrics`.
    pub fn operator_addr(&self) -> SocketAddr {
        self.addresses.operator_http
    }

    /// The policy CRDs, as served.
    pub fn crds(&self) -> &[InstalledCrd] {
        &self.crds
    }

    /// The directory with the processes' kubeconfigs, certificates and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails with its log's tail if the webhook or the operator has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.webhook.process.ensure_running()?;
        self.operator.process.ensure_running()
    }

    /// Stops the webhook (SIGTERM) and starts it again; returns once it accepts connections.
    pub async fn restart_webhook(&mut self, cluster: &ControlPlane) -> Result<()> {
        self.webhook.restart(cluster, self.dir.path()).await?;
        wait_listening(&mut self.webhook.process, self.addresses.webhook).await
    }

    /// Stops the operator (SIGTERM: it releases its Lease) and starts it again; returns once
    /// its caches are synced.
    pub async fn restart_operator(&mut self, cluster: &ControlPlane) -> Result<()> {
        self.operator.restart(cluster, self.dir.path()).await?;
        wait_ready(&mut self.operator.process, self.addresses.operator_http).await
    }

    /// Stops the operator (SIGTERM), and with it the signer, until [`Tandem::start_operator`].
    pub fn stop_operator(&mut self) {
        self.operator.process.stop();
    }

    /// Starts the operator again (after [`Tandem::stop_operator`]) with a fresh token;
    /// returns once its caches are synced.
    pub async fn start_operator(&mut self, cluster: &ControlPlane) -> Result<()> {
        self.restart_operator(cluster).await
    }

    /// The end of the webhook's and the operator's logs, for failure messages.
    pub fn log_tails(&self) -> String {
        [&self.webhook, &self.operator]
            .iter()
            .map(|c| {
                format!(
                    "--- {}\n{}\n",
                    c.name,
                    crate::process::log_tail(c.process.log())
                )
            })
            .collect()
    }
}

/// Starts `binary` as a local process that authenticates as ServiceAccount
/// `namespace/service_account` (a token kubeconfig in `KUBECONFIG`), logging to
/// `dir/<name>.log`: how the operator, the webhook, or any Tandem component runs against the
/// local cluster with exactly the rights its RBAC manifests grant.
pub async fn spawn_as_service_account(
    cluster: &ControlPlane,
    namespace: &str,
    service_account: &str,
    name: &str,
    mut command: Command,
    dir: &Path,
) -> Result<Supervised> {
    wait_for_service_account(&cluster.client(), namespace, service_account).await?;
    let kubeconfig = dir.join(format!("{name}.kubeconfig"));
    cluster
        .service_account_kubeconfig(namespace, service_account, TOKEN_LIFETIME, &kubeconfig)
        .await?;
    command.env("KUBECONFIG", &kubeconfig);
    Supervised::spawn(name, command, &dir.join(format!("{name}.log")))
}

async fn wait_for_service_account(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Error::Unexpected(format!(
            "ServiceAccount {namespace}/{name} is not in manifests/ (install_rbac applied none)"
        ))),
        Err(e) => Err(Error::kube(
            format!("read ServiceAccount {namespace}/{name}"),
            e,
        )),
    }
}

async fn wait_listening(process: &mut Supervised, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        process.ensure_running()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("the webhook to listen on {addr}"),
                seconds: 30,
                detail: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `GET /readyz` on `addr` answers 200 (the operator's caches are synced).
async fn wait_ready(process: &mut Supervised, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        process.ensure_running()?;
        let last = match http_status(addr, "/readyz").await {
            Ok(200) => return Ok(()),
            Ok(status) => format!("status {status}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("http://{addr}/readyz to answer 200"),
                seconds: 60,
                detail: Some(last),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status code of `GET path` on `addr` (HTTP/1.0, so the server closes the connection).
pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut head = [0_u8; 64];
        let n = stream.read(&mut head).await?;
        let text = String::from_utf8_lossy(&head[..n]);
        text.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::other(format!("no answer from {addr} within 2 s")))?
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents)
        .map_err(|source| Error::io(format!("write {}", path.display()), source))
}
