//! One-line summaries of authorization rules, as `explain` prints them.
//!
//! `from <callers>; to <requests>`, each list `, `-separated and alternatives `|`-separated:
//! `from spiffe://cluster.local/ns/shop/sa/web, namespace ops; to port 8080, method GET|HEAD,
//! path /api/*`. Paths: `/health` exact, `/api/*` a prefix on a segment boundary, `~re` a
//! regular expression; headers `name=value` exact, `name~re` a regular expression.

use tandem_crds::contract::{
    AuthorizationRule, Callers, HeaderMatch, Operations, PathMatch, ValueMatch,
};

/// The rule in one line.
pub fn rule(rule: &AuthorizationRule) -> String {
    let from = rule.from.as_ref().map_or("any caller".to_owned(), callers);
    let to = rule
        .to
        .as_ref()
        .map_or("any request".to_owned(), operations);
    format!("from {from}; to {to}")
}

/// The ports a policy covers: `all` or `8080, 9090`.
pub fn ports(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "all".to_owned();
    }
    join(ports.iter().map(u16::to_string), ", ")
}

fn callers(from: &Callers) -> String {
    let mut parts: Vec<String> = from.principals.clone();
    parts.extend(from.namespaces.iter().map(|ns| format!("namespace {ns}")));
    if from.authenticated {
        parts.push("any authenticated caller".to_owned());
    }
    if from.unauthenticated {
        parts.push("any caller, unauthenticated too".to_owned());
    }
    if parts.is_empty() {
        // Validation refuses this; say so rather than print nothing.
        return "no caller".to_owned();
    }
    parts.join(", ")
}

fn operations(to: &Operations) -> String {
    let mut parts = Vec::new();
    if !to.ports.is_empty() {
        parts.push(format!(
            "port {}",
            join(to.ports.iter().map(u16::to_string), "|")
        ));
    }
    if !to.methods.is_empty() {
        parts.push(format!("method {}", to.methods.join("|")));
    }
    if !to.paths.is_empty() {
        parts.push(format!("path {}", join(to.paths.iter().map(path), "|")));
    }
    parts.extend(to.headers.iter().map(|h| format!("header {}", header(h))));
    if parts.is_empty() {
        return "any request".to_owned();
    }
    parts.join(", ")
}

fn path(path: &PathMatch) -> String {
    match path {
        PathMatch::Exact(p) => p.clone(),
        PathMatch::Prefix(p) => format!("{}/*", p.trim_end_matches('/')),
        PathMatch::Regex(re) => format!("~{re}"),
    }
}

fn header(header: &HeaderMatch) -> String {
    match &header.value {
        ValueMatch::Exact(v) => format!("{}={v}", header.name),
        ValueMatch::Regex(re) => format!("{}~{re}", header.name),
    }
}

fn join(items: impl Iterator<Item = String>, separator: &str) -> String {
    items.collect::<Vec<_>>().join(separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_rule_matches_anything_and_says_so() {
        assert_eq!(
            rule(&AuthorizationRule::default()),
            "from any caller; to any request"
        );
    }

    #[test]
    fn every_condition_appears_in_one_line() {
        let r = AuthorizationRule {
            from: Some(Callers {
                principals: vec![
                    "spiffe://cluster.local/ns/shop/sa/web".into(),
                    "spiffe://cluster.local/ns/ops/*".into(),
                ],
                namespaces: vec!["batch".into()],
                authenticated: true,
                unauthenticated: false,
            }),
            to: Some(Operations {
                ports: vec![8080, 9090],
                paths: vec![
                    PathMatch::Exact("/health".into()),
                    PathMatch::Prefix("/api/".into()),
                    PathMatch::Regex("/v[0-9]+/.*".into()),
                ],
                methods: vec!["GET".into(), "HEAD".into()],
                headers: vec![
                    HeaderMatch {
                        name: "x-team".into(),
                        value: ValueMatch::Exact("blue".into()),
                    },
                    HeaderMatch {
                        name: "x-env".into(),
                        value: ValueMatch::Regex("prod|stage".into()),
                    },
                ],
            }),
        };
        assert_eq!(
            rule(&r),
            "from spiffe://cluster.local/ns/shop/sa/web, spiffe://cluster.local/ns/ops/*, \
             namespace batch, any authenticated caller; \
             to port 8080|9090, method GET|HEAD, path /health|/api/*|~/v[0-9]+/.*, \
             header x-team=blue, header x-env~prod|stage"
        );
    }

    #[test]
    fn ports_are_all_or_listed() {
        assert_eq!(ports(&[]), "all");
        assert_eq!(ports(&[80, 8080]), "80, 8080");
    }
}
