//! The one error type of `tandemctl`, each variant with its exit code.

use crate::exit;

/// What can stop a command before it reaches an answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value makes no sense (`--from`, `--header`, a missing `--port`).
    #[error("{0}")]
    Usage(String),
    /// The pod asked about does not exist.
    #[error("pod {namespace}/{name} not found")]
    PodNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The kubeconfig named by `--kubeconfig` or `--context` cannot be used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// Neither a kubeconfig nor an in-cluster service account was found.
    #[error("no cluster to talk to (no usable kubeconfig, not in a pod): {0}")]
    NoConfig(#[source] kube::config::InferConfigError),
    /// The kube client could not be built from the configuration.
    #[error("kube client: {0}")]
    Client(#[source] kube::Error),
    /// A request to the apiserver failed or was refused.
    #[error("{what}: {}", describe(source))]
    Kube {
        /// What was being read.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// `explain --from` cannot decide: the pod's proxy config is missing or invalid.
    #[error("cannot decide: {0}")]
    Undecidable(String),
    /// The report could not be written (stdout closed).
    #[error("write the report: {0}")]
    Output(#[source] std::io::Error),
}

/// `tandemctl`'s result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::PodNotFound { .. } => exit::NOT_FOUND,
            Self::Kubeconfig(_) | Self::NoConfig(_) | Self::Client(_) | Self::Kube { .. } => {
                exit::CLUSTER
            }
            Self::Undecidable(_) => exit::UNDECIDABLE,
            // Nobody reads the report; the shell sees a failure all the same.
            Self::Output(_) => exit::CLUSTER,
        }
    }

    pub(crate) fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            what: what.into(),
            source,
        }
    }
}

/// An apiserver refusal in the words a person needs (code, reason, message); any other failure
/// as its own text (kube's `Display` of an API error repeats the whole status as Debug).
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!(
            "the apiserver answered {} {}: {}",
            status.code, status.reason, status.message
        ),
        other => other.to_string(),
    }
}

/// The error and its causes, `: `-separated, without repeating a cause its parent already shows.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // A Kube error's text already describes an API status; its source would repeat it.
    if matches!(
        error.downcast_ref::<Error>(),
        Some(Error::Kube {
            source: kube::Error::Api(_),
            ..
        })
    ) {
        return text;
    }
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
