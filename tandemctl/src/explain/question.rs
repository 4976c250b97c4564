//! The question `explain --from` asks: who calls, on which port, with which HTTP facts.

use std::net::IpAddr;

use tandem_crds::contract::HttpFacts;
use tandem_crds::identity::SpiffeId;

use super::ExplainArgs;
use crate::{Error, Result};

/// A caller as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerArg {
    /// `unauthenticated`: no mesh identity (plaintext, or TLS the mesh does not terminate).
    Unauthenticated,
    /// A full SPIFFE ID.
    Spiffe(SpiffeId),
    /// `<namespace>/<serviceaccount>`: its identity in the config's trust domain.
    ServiceAccount {
        /// The namespace.
        namespace: String,
        /// The ServiceAccount.
        name: String,
    },
}

impl CallerArg {
    /// Parses `--from`.
    pub fn parse(value: &str) -> Result<Self> {
        if value == "unauthenticated" {
            return Ok(Self::Unauthenticated);
        }
        if value.starts_with("spiffe://") {
            return SpiffeId::parse(value)
                .map(Self::Spiffe)
                .map_err(|e| Error::Usage(format!("--from: {e}")));
        }
        let usage = || {
            Error::Usage(format!(
                "--from {value:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>, \
                 <namespace>/<serviceaccount> or unauthenticated"
            ))
        };
        let (namespace, name) = value.split_once('/').ok_or_else(usage)?;
        // The names must make a valid SPIFFE ID in any trust domain.
        SpiffeId::parse(&SpiffeId::new("example.org", namespace, name).uri())
            .map_err(|_| usage())?;
        Ok(Self::ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The caller's identity, with `<ns>/<sa>` placed in `trust_domain`; `None`: unauthenticated.
    pub fn identity(&self, trust_domain: &str) -> Option<SpiffeId> {
        match self {
            Self::Unauthenticated => None,
            Self::Spiffe(id) => Some(id.clone()),
            Self::ServiceAccount { namespace, name } => {
                Some(SpiffeId::new(trust_domain, namespace, name))
            }
        }
    }
}

/// The HTTP request asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpQuestion {
    /// Method, upper case.
    pub method: String,
    /// Path.
    pub path: String,
    /// Headers, names lower case, in the order given.
    pub headers: Vec<(String, String)>,
}

impl HttpFacts for HttpQuestion {
    fn method(&self) -> &str {
        &self.method
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The whole question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Who.
    pub caller: CallerArg,
    /// From which address, if known.
    pub address: Option<IpAddr>,
    /// To which port; `None`: the pod's first container port.
    pub port: Option<u16>,
    /// The HTTP request; `None`: an opaque TCP connection.
    pub http: Option<HttpQuestion>,
}

impl Question {
    /// The question the flags ask, or `None` without `--from`.
    pub fn from_args(args: &ExplainArgs) -> Result<Option<Self>> {
        let Some(from) = &args.from else {
            return Ok(None);
        };
        let caller = CallerArg::parse(from)?;
        let is_http = args.method.is_some() || args.path.is_some() || !args.headers.is_empty();
        let http = if is_http {
            Some(HttpQuestion {
                method: parse_method(args.method.as_deref().unwrap_or("GET"))?,
                path: parse_path(args.path.as_deref().unwrap_or("/"))?,
                headers: args
                    .headers
                    .iter()
                    .map(|h| parse_header(h))
                    .collect::<Result<_>>()?,
            })
        } else {
            None
        };
        Ok(Some(Self {
            caller,
            address: args.from_ip,
            port: args.port,
            http,
        }))
    }
}

fn parse_method(method: &str) -> Result<String> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(Error::Usage(format!(
            "--method {method:?}: expected an HTTP method such as GET"
        )));
    }
    Ok(method.to_ascii_uppercase())
}

fn parse_path(path: &str) -> Result<String> {
    if !path.starts_with('/') || path.contains('?') || path.contains(char::is_whitespace) {
        return Err(Error::Usage(format!(
            "--path {path:?}: expected a path starting with / (no query, no spaces)"
        )));
    }
    Ok(path.to_owned())
}

/// `name=value`; the name as HTTP/2 and the proxy see it, lower case.
fn parse_header(header: &str) -> Result<(String, String)> {
    let invalid = || Error::Usage(format!("--header {header:?}: expected NAME=VALUE"));
    let (name, value) = header.split_once('=').ok_or_else(invalid)?;
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid());
    }
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_parse_in_their_three_forms() {
        assert_eq!(
            CallerArg::parse("unauthenticated").unwrap(),
            CallerArg::Unauthenticated
        );
        assert_eq!(
            CallerArg::parse("spiffe://corp.example/ns/shop/sa/web").unwrap(),
            CallerArg::Spiffe(SpiffeId::new("corp.example", "shop", "web"))
        );
        let sa = CallerArg::parse("shop/web").unwrap();
        assert_eq!(
            sa.identity("cluster.local").unwrap().uri(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(CallerArg::Unauthenticated.identity("cluster.local"), None);
    }

    #[test]
    fn malformed_callers_are_usage_errors_that_name_the_forms() {
        for bad in [
            "web",
            "Shop/web",
            "shop/",
            "/web",
            "spiffe://td/web",
            "a/b/c",
        ] {
            let error = CallerArg::parse(bad).unwrap_err();
            assert!(matches!(error, Error::Usage(_)), "{bad}: {error}");
            assert_eq!(error.exit_code(), crate::exit::USAGE);
        }
        let message = CallerArg::parse("web").unwrap_err().to_string();
        assert!(
            message.contains("<namespace>/<serviceaccount>"),
            "{message}"
        );
    }

    fn args(from: &str) -> ExplainArgs {
        ExplainArgs {
            pod: "web-0".into(),
            from: Some(from.into()),
            ..ExplainArgs::default()
        }
    }

    #[test]
    fn without_http_flags_the_question_is_about_tcp_and_with_any_it_is_http() {
        let tcp = Question::from_args(&args("shop/web")).unwrap().unwrap();
        assert_eq!(tcp.http, None);
        let mut a = args("shop/web");
        a.headers = vec!["X-Team=blue".into()];
        let http = Question::from_args(&a).unwrap().unwrap().http.unwrap();
        assert_eq!(http.method, "GET");
        assert_eq!(http.path, "/");
        assert_eq!(http.header("x-team"), Some("blue"));
        a.method = Some("post".into());
        a.path = Some("/api/items".into());
        let http = Question::from_args(&a).unwrap().unwrap().http.unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str()),
            ("POST", "/api/items")
        );
        assert!(
            Question::from_args(&ExplainArgs::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_http_facts_are_refused() {
        for (method, path, header) in [
            (Some("GE T"), None, None),
            (None, Some("api"), None),
            (None, Some("/a?b=c"), None),
            (None, None, Some("novalue")),
            (None, None, Some("bad name=x")),
        ] {
            let mut a = args("unauthenticated");
            a.method = method.map(str::to_owned);
            a.path = path.map(str::to_owned);
            a.headers = header.into_iter().map(str::to_owned).collect();
            let error = Question::from_args(&a).unwrap_err();
            assert!(matches!(error, Error::Usage(_)), "{error}");
        }
    }
}
