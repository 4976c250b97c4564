//! `tandem-cluster`: runs the local control plane in the foreground for a person (and for
//! `make cluster-up` / `make demo`) until SIGINT or SIGTERM, then stops it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tandem_tests::{ControlPlane, ControlPlaneOptions};

/// Run a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on
/// loopback until interrupted.
#[derive(Debug, Parser)]
struct Args {
    /// Directory for the PKI, kubeconfigs, logs and etcd data. Emptied at start: every run is
    /// a fresh cluster.
    #[arg(long, env = "TANDEM_CLUSTER_DIR")]
    dir: PathBuf,
    /// Seconds each component may take to become ready.
    #[arg(long, default_value_t = 120)]
    start_timeout: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("empty {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let cluster = ControlPlane::start(ControlPlaneOptions {
        dir: Some(args.dir.clone()),
        start_timeout: Duration::from_secs(args.start_timeout),
    })
    .await?;
    let ready = args.dir.join("ready");
    std::fs::write(
        &ready,
        format!(
            "server={}\nkubeconfig={}\nstarted_in_ms={}\n",
            cluster.server(),
            cluster.admin_kubeconfig().display(),
            cluster.started_in().as_millis()
        ),
    )
    .with_context(|| format!("write {}", ready.display()))?;
    println!(
        "Cluster ready in {:.1}s at {}\n  export KUBECONFIG={}\n  logs: {}/logs/",
        cluster.started_in().as_secs_f64(),
        cluster.server(),
        cluster.admin_kubeconfig().display(),
        args.dir.display()
    );
    wait_for_shutdown_signal().await?;
    println!("Stopping the cluster");
    let _ = std::fs::remove_file(&ready);
    drop(cluster);
    Ok(())
}

async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
