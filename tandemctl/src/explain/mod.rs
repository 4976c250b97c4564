//! `tandemctl explain <pod>`: the chain from AuthorizationPolicy objects through their status
//! to the pod's proxy config, and, for a given caller, the proxy's decision.
//!
//! - [`gather`]: reads the pod, its Namespace, its ConfigMap, the Services and the
//!   AuthorizationPolicies of its namespace (the only I/O).
//! - [`question`]: the caller and request asked about (`--from`, `--port`, HTTP facts).
//! - [`report`]: the pure core: what applies, what does not and why.
//! - [`decision`]: the decision for `--from`, made by the proxy's own evaluator
//!   ([`tandem_crds::contract::Authorizer`]).
//! - [`summary`]: one-line summaries of rules; [`table`]: the text rendering.

pub mod decision;
pub mod gather;
pub mod question;
pub mod report;
pub mod summary;
pub mod table;

use std::io::Write;

use crate::cluster::ClusterArgs;
use crate::output::Format;
use crate::{Error, Outcome, Result};

/// `tandemctl explain` flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ExplainArgs {
    /// The pod.
    pub pod: String,

    /// Its namespace; default: the kubeconfig context's, else `default`.
    #[arg(short, long)]
    pub namespace: Option<String>,

    /// The workload port asked about; default: the pod's first container port.
    #[arg(long)]
    pub port: Option<u16>,

    /// The caller: `spiffe://<td>/ns/<ns>/sa/<sa>`, `<namespace>/<serviceaccount>` (that
    /// ServiceAccount's identity in the config's trust domain), or `unauthenticated`.
    #[arg(long, value_name = "CALLER")]
    pub from: Option<String>,

    /// The caller's IP address (only `cluster-authenticated` looks at it); default: unknown,
    /// which counts as outside the cluster networks.
    #[arg(long, value_name = "IP", requires = "from")]
    pub from_ip: Option<std::net::IpAddr>,

    /// HTTP method; with --path or --header and no --method: GET. Without any of the three the
    /// question is about an opaque TCP connection.
    #[arg(long, requires = "from")]
    pub method: Option<String>,

    /// HTTP path (without the query); default with --method or --header: `/`.
    #[arg(long, requires = "from")]
    pub path: Option<String>,

    /// An HTTP request header, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", requires = "from")]
    pub headers: Vec<String>,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Runs `explain` against the cluster and writes the report.
pub async fn run(
    cluster: &ClusterArgs,
    args: &ExplainArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    // A malformed question is refused before the cluster is asked anything.
    let question = question::Question::from_args(args)?;
    let cluster = crate::cluster::connect(cluster).await?;
    let namespace = args
        .namespace
        .as_deref()
        .unwrap_or(cluster.default_namespace());
    let inputs = gather::gather(cluster.client(), namespace, &args.pod).await?;
    let explanation = report::explain(&inputs, question.as_ref())?;
    let text = match args.output {
        Format::Table => table::render(&explanation),
        Format::Json => report::to_json(&explanation),
    };
    out.write_all(text.as_bytes()).map_err(Error::Output)?;
    out.flush().map_err(Error::Output)?;
    Ok(match &explanation.decision {
        Some(decision) if !decision.allowed => Outcome::Denied,
        _ => Outcome::Ok,
    })
}
