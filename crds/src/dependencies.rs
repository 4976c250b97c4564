//! The `tandem.dev/dependencies` pod annotation ([`crate::names::DEPENDENCIES_ANNOTATION`]):
//! the Services a workload calls, named up front so its scoped config carries them before the
//! first call (as Istio's `Sidecar.egress.hosts`).
//!
//! Entries are separated by commas or white space: `<service>` (in the pod's namespace),
//! `<namespace>/<service>`, or `<namespace>/*` (every Service of the namespace). A bad entry is
//! reported and skipped; the others still count.

use std::fmt;

/// One entry of the annotation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dependency {
    /// One Service.
    Service {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Every Service of a namespace.
    Namespace(String),
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Namespace(namespace) => write!(f, "{namespace}/*"),
        }
    }
}

/// An entry that is not a dependency.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not <service>, <namespace>/<service> or <namespace>/*: {why}")]
pub struct BadDependency {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses the annotation of a pod in `namespace`: the dependencies it names, and the entries
/// that name none.
pub fn parse(value: &str, namespace: &str) -> (Vec<Dependency>, Vec<BadDependency>) {
    let mut found = Vec::new();
    let mut bad = Vec::new();
    for entry in value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
    {
        match parse_entry(entry, namespace) {
            Ok(dependency) => found.push(dependency),
            Err(why) => bad.push(BadDependency {
                entry: entry.to_owned(),
                why,
            }),
        }
    }
    found.sort();
    found.dedup();
    (found, bad)
}

fn parse_entry(entry: &str, namespace: &str) -> Result<Dependency, &'static str> {
    let (ns, name) = match entry.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (namespace, entry),
    };
    if !is_dns_label(ns) {
        return Err("the namespace is not a DNS label");
    }
    if name == "*" {
        return Ok(Dependency::Namespace(ns.to_owned()));
    }
    if !is_dns_label(name) {
        return Err("the Service name is not a DNS label");
    }
    Ok(Dependency::Service {
        namespace: ns.to_owned(),
        name: name.to_owned(),
    })
}

/// An RFC 1123 label, as Service and Namespace names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: &str, name: &str) -> Dependency {
        Dependency::Service {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn services_namespaces_and_bare_names_in_the_pods_namespace() {
        let (found, bad) = parse("payments, shop/cart  billing/*,payments", "shop");
        assert!(bad.is_empty());
        assert_eq!(
            found,
            [
                service("shop", "cart"),
                service("shop", "payments"),
                Dependency::Namespace("billing".into()),
            ]
        );
    }

    #[test]
    fn a_bad_entry_is_reported_and_the_others_still_count() {
        let (found, bad) = parse("cart,Shop/x,a/b/c,/x,ok/-no", "shop");
        assert_eq!(found, [service("shop", "cart")]);
        let entries: Vec<&str> = bad.iter().map(|b| b.entry.as_str()).collect();
        assert_eq!(entries, ["Shop/x", "a/b/c", "/x", "ok/-no"]);
        assert!(bad[0].to_string().contains("not <service>"));
        assert_eq!(parse("", "shop"), (vec![], vec![]));
    }
}
