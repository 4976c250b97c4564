//! Reaching the cluster: the kube client from the usual places, as kubectl finds them.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{Error, Result};

/// The flags every command takes to reach the cluster.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClusterArgs {
    /// The kubeconfig file; default: $KUBECONFIG, else ~/.kube/config, else the pod's service
    /// account when running in a cluster.
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use; default: its current context.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
}

/// A kube client and the namespace to use when none is named (the context's, else `default`).
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    default_namespace: String,
}

impl Cluster {
    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The namespace commands use without `-n`.
    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }
}

/// Builds the client: `--kubeconfig` (with `--context`), else `--context` in the default
/// kubeconfig, else inference (KUBECONFIG, ~/.kube/config, in-cluster).
pub async fn connect(args: &ClusterArgs) -> Result<Cluster> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(Error::Kubeconfig)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(Error::Kubeconfig)?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(Error::Kubeconfig)?,
        (None, None) => kube::Config::infer().await.map_err(Error::NoConfig)?,
    };
    let default_namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).map_err(Error::Client)?;
    Ok(Cluster {
        client,
        default_namespace,
    })
}
