//! What `explain` reads from the apiserver: the only I/O of the command.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{Api, ListParams};
use tandem_crds::contract::ProxyConfig;
use tandem_crds::v1alpha1::AuthorizationPolicy;
use tandem_crds::{names, pods};

use crate::error::chain;
use crate::{Error, Result};

/// Everything the report is made from.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The pod.
    pub pod: Pod,
    /// The pod Namespace's `tandem.dev/default-policy` annotation.
    pub namespace_default: NamespaceDefault,
    /// The pod's proxy config, as its ConfigMap holds it.
    pub config: ConfigState,
    /// The Services of the pod's namespace (to find those selecting it).
    pub services: Vec<Service>,
    /// The AuthorizationPolicies of the pod's namespace.
    pub policies: Vec<AuthorizationPolicy>,
}

/// The Namespace annotation choosing the default policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceDefault {
    /// The Namespace has no such annotation.
    Absent,
    /// Its value, as written (maybe not a valid policy).
    Set(String),
    /// The Namespace could not be read (a namespaced user may not read Namespaces): why.
    Unreadable(String),
}

/// The pod's proxy config.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigState {
    /// The ConfigMap does not exist.
    Missing {
        /// Its name.
        name: String,
    },
    /// It exists but the proxy would refuse it.
    Invalid {
        /// Its name.
        name: String,
        /// Why.
        error: String,
    },
    /// It holds a valid config.
    Loaded {
        /// Its name.
        name: String,
        /// The config.
        config: Box<ProxyConfig>,
    },
}

impl ConfigState {
    /// The ConfigMap's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Missing { name } | Self::Invalid { name, .. } | Self::Loaded { name, .. } => name,
        }
    }
}

/// Reads the pod, then the rest of what the report needs, at once.
pub async fn gather(client: &kube::Client, namespace: &str, pod_name: &str) -> Result<Inputs> {
    let pod = read_pod(client, namespace, pod_name).await?;
    let config_map = names::config_map_name(pods::service_account(&pod));
    let (namespace_default, config, services, policies) = tokio::join!(
        read_namespace_default(client, namespace),
        read_config(client, namespace, config_map),
        list::<Service>(client, namespace, "Services"),
        list::<AuthorizationPolicy>(
            client,
            namespace,
            "AuthorizationPolicies (is Tandem's CRD installed?)"
        ),
    );
    Ok(Inputs {
        pod,
        namespace_default,
        config: config?,
        services: services?,
        policies: policies?,
    })
}

async fn read_pod(client: &kube::Client, namespace: &str, name: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.get(name).await {
        Ok(pod) => Ok(pod),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(Error::PodNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }),
        Err(source) => Err(Error::kube(format!("read pod {namespace}/{name}"), source)),
    }
}

/// The annotation; a Namespace that cannot be read only costs the "where from" of the default.
async fn read_namespace_default(client: &kube::Client, namespace: &str) -> NamespaceDefault {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get(namespace).await {
        Ok(ns) => ns
            .metadata
            .annotations
            .and_then(|a| a.get(names::DEFAULT_POLICY_ANNOTATION).cloned())
            .map_or(NamespaceDefault::Absent, NamespaceDefault::Set),
        Err(error) => NamespaceDefault::Unreadable(
            Error::kube(format!("read Namespace {namespace}"), error).to_string(),
        ),
    }
}

async fn read_config(client: &kube::Client, namespace: &str, name: String) -> Result<ConfigState> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config_map = match config_maps.get_opt(&name).await {
        Ok(Some(config_map)) => config_map,
        Ok(None) => return Ok(ConfigState::Missing { name }),
        Err(source) => {
            return Err(Error::kube(
                format!("read ConfigMap {namespace}/{name}"),
                source,
            ));
        }
    };
    let Some(json) = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(names::CONFIG_KEY))
    else {
        let error = format!("it has no key {}", names::CONFIG_KEY);
        return Ok(ConfigState::Invalid { name, error });
    };
    Ok(match ProxyConfig::from_json(json.as_bytes()) {
        Ok(config) => ConfigState::Loaded {
            name,
            config: Box::new(config),
        },
        Err(error) => ConfigState::Invalid {
            name,
            error: chain(&error),
        },
    })
}

async fn list<K>(client: &kube::Client, namespace: &str, what: &str) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|source| Error::kube(format!("list {what} in {namespace}"), source))
}
