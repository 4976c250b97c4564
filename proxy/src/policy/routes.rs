//! Route matching and weighted splits, compiled once when a config loads.
//!
//! A request is matched against a service's routes in order; the first route with a matching
//! [`RequestMatch`](tandem_crds::contract::RequestMatch) wins. Paths are compared as `&str`,
//! methods as `&str`, header names are pre-parsed [`HeaderName`]s and regular expressions are
//! compiled here, anchored, so that matching a request allocates nothing and compiles nothing.

use http::HeaderName;
use http::request::Parts;
use tandem_crds::contract::{self, PathMatch, ValueMatch};

use super::PolicyError;

/// Bound on the compiled size of one regular expression, as the config validation applies.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The routes of one service, in order, each leading to weighted targets of type `T` and
/// carrying per-route data of type `E` (timeouts, retries).
#[derive(Debug)]
pub struct RouteTable<T, E> {
    routes: Vec<CompiledRoute<T, E>>,
}

/// One compiled route.
#[derive(Debug)]
pub struct CompiledRoute<T, E> {
    /// The route's name, for metrics and logs.
    pub name: String,
    /// The request matches when any of these does; empty matches everything.
    matches: Vec<Matcher>,
    /// Where matching requests go.
    pub split: Split<T>,
    /// Per-route data derived when compiling (timeouts, retries).
    pub extra: E,
}

impl<T, E> RouteTable<T, E> {
    /// Compiles `routes`; `backend` turns each contract backend into a target (or refuses it),
    /// `extra` derives per-route data.
    pub fn compile(
        routes: &[contract::Route],
        mut backend: impl FnMut(&contract::Route, &contract::Backend) -> Result<T, PolicyError>,
        mut extra: impl FnMut(&contract::Route) -> Result<E, PolicyError>,
    ) -> Result<Self, PolicyError> {
        let mut compiled = Vec::with_capacity(routes.len());
        for route in routes {
            let matches = route
                .matches
                .iter()
                .map(|m| Matcher::compile(m).map_err(|reason| invalid(route, reason)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut targets = Vec::with_capacity(route.backends.len());
            for b in &route.backends {
                targets.push((backend(route, b)?, b.weight));
            }
            compiled.push(CompiledRoute {
                name: route.name.clone(),
                matches,
                split: Split::new(targets),
                extra: extra(route)?,
            });
        }
        Ok(Self { routes: compiled })
    }

    /// The first route the request matches, if any.
    pub fn find(&self, request: &Parts) -> Option<&CompiledRoute<T, E>> {
        self.routes.iter().find(|r| r.matches_request(request))
    }

    /// Index of the first route the request matches, if any.
    pub fn position(&self, request: &Parts) -> Option<usize> {
        self.routes.iter().position(|r| r.matches_request(request))
    }

    /// Every compiled route, in order.
    pub fn routes(&self) -> &[CompiledRoute<T, E>] {
        &self.routes
    }
}

impl<T, E> CompiledRoute<T, E> {
    fn matches_request(&self, request: &Parts) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(request))
    }
}

fn invalid(route: &contract::Route, reason: String) -> PolicyError {
    PolicyError::Route {
        route: route.name.clone(),
        reason,
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

/// All conditions of one [`contract::RequestMatch`].
#[derive(Debug)]
struct Matcher {
    path: Option<PathMatcher>,
    method: Option<String>,
    headers: Vec<HeaderMatcher>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// The prefix without a trailing slash, so that `/api` and `/api/` mean the same; empty for
    /// the root prefix, which matches every path.
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    value: ValueMatcher,
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(Vec<u8>),
    /// Over bytes, because header values need not be UTF-8.
    Regex(regex::bytes::Regex),
}

impl Matcher {
    fn compile(m: &contract::RequestMatch) -> Result<Self, String> {
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact(p)) => Some(PathMatcher::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => {
                Some(PathMatcher::Prefix(p.trim_end_matches('/').to_owned()))
            }
            Some(PathMatch::Regex(re)) => Some(PathMatcher::Regex(
                regex::RegexBuilder::new(&anchored(re))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("path regex {re:?}: {e}"))?,
            )),
        };
        let headers = m
            .headers
            .iter()
            .map(HeaderMatcher::compile)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            path,
            method: m.method.clone(),
            headers,
        })
    }

    fn matches(&self, request: &Parts) -> bool {
        if let Some(method) = &self.method
            && request.method.as_str() != method
        {
            return false;
        }
        if let Some(path) = &self.path
            && !path.matches(request.uri.path())
        {
            return false;
        }
        self.headers.iter().all(|h| h.matches(&request.headers))
    }
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => {
                // On a segment boundary: `/api` matches `/api` and `/api/x`, never `/apix`.
                path.strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::Regex(re) => re.is_match(path),
        }
    }
}

impl HeaderMatcher {
    fn compile(h: &contract::HeaderMatch) -> Result<Self, String> {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|e| format!("header name {:?}: {e}", h.name))?;
        let value = match &h.value {
            ValueMatch::Exact(v) => ValueMatcher::Exact(v.as_bytes().to_vec()),
            ValueMatch::Regex(re) => ValueMatcher::Regex(
                regex::bytes::RegexBuilder::new(&anchored(re))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("header {:?} regex {re:?}: {e}", h.name))?,
            ),
        };
        Ok(Self { name, value })
    }

    /// True when any value of the header matches (a header may be repeated).
    fn matches(&self, headers: &http::HeaderMap) -> bool {
        headers
            .get_all(&self.name)
            .iter()
            .any(|v| match &self.value {
                ValueMatcher::Exact(want) => v.as_bytes() == want.as_slice(),
                ValueMatcher::Regex(re) => re.is_match(v.as_bytes()),
            })
    }
}

/// Wraps a pattern so it must match the whole input, whatever alternations it holds.
fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

// ---------------------------------------------------------------------------------------------
// Weighted splits

/// Targets with relative weights; a pick maps a random number onto the cumulative weights.
#[derive(Debug)]
pub struct Split<T> {
    targets: Vec<T>,
    /// Running sum of the weights: target `i` owns `cumulative[i-1]..cumulative[i]`.
    cumulative: Vec<u64>,
}

impl<T> Split<T> {
    /// Builds a split; targets of weight 0 are kept (for `/config`) but never picked.
    pub fn new(targets: Vec<(T, u32)>) -> Self {
        let mut sum = 0u64;
        let mut cumulative = Vec::with_capacity(targets.len());
        let mut kept = Vec::with_capacity(targets.len());
        for (target, weight) in targets {
            sum += u64::from(weight);
            cumulative.push(sum);
            kept.push(target);
        }
        Self {
            targets: kept,
            cumulative,
        }
    }

    /// Sum of the weights.
    pub fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// Whether no target can be picked (no targets, or all of weight 0).
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// The target owning `random % total`, or `None` when the split is empty.
    pub fn pick(&self, random: u64) -> Option<&T> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let point = random % total;
        // The first target whose running sum exceeds the point; zero weights own no range.
        let index = self.cumulative.partition_point(|&c| c <= point);
        self.targets.get(index)
    }

    /// Every target, including those of weight 0.
    pub fn targets(&self) -> &[T] {
        &self.targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sources::{Random, SeededRandom};
    use tandem_crds::contract::{Backend, HeaderMatch, RequestMatch, Route, ServiceRef};

    /// Targets are the backend's service name; routes carry nothing extra.
    #[derive(Debug, PartialEq)]
    struct Name(String);

    fn table(routes: &[Route]) -> RouteTable<Name, ()> {
        RouteTable::compile(routes, |_, b| Ok(Name(b.service.name.clone())), |_| Ok(())).unwrap()
    }

    fn route(name: &str, matches: Vec<RequestMatch>, backend: &str) -> Route {
        Route {
            name: name.into(),
            matches,
            backends: vec![Backend {
                service: ServiceRef {
                    name: backend.into(),
                    namespace: "shop".into(),
                },
                port: 80,
                weight: 1,
            }],
            ..Route::default()
        }
    }

    fn path(p: PathMatch) -> RequestMatch {
        RequestMatch {
            path: Some(p),
            ..RequestMatch::default()
        }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn routed(t: &RouteTable<Name, ()>, req: &Parts) -> Option<String> {
        t.find(req).map(|r| r.name.clone())
    }

    #[test]
    fn prefix_matches_only_on_a_segment_boundary() {
        let t = table(&[route(
            "api",
            vec![path(PathMatch::Prefix("/api".into()))],
            "a",
        )]);
        assert_eq!(routed(&t, &request("GET", "/api", &[])), Some("api".into()));
        assert_eq!(
            routed(&t, &request("GET", "/api/", &[])),
            Some("api".into())
        );
        assert_eq!(
            routed(&t, &request("GET", "/api/x?q=1", &[])),
            Some("api".into())
        );
        assert_eq!(routed(&t, &request("GET", "/apix", &[])), None);
        assert_eq!(routed(&t, &request("GET", "/", &[])), None);
    }

    #[test]
    fn a_prefix_with_a_trailing_slash_means_the_same_segment() {
        let t = table(&[route(
            "api",
            vec![path(PathMatch::Prefix("/api/".into()))],
            "a",
        )]);
        assert_eq!(routed(&t, &request("GET", "/api", &[])), Some("api".into()));
        assert_eq!(
            routed(&t, &request("GET", "/api/v1", &[])),
            Some("api".into())
        );
        assert_eq!(routed(&t, &request("GET", "/apiv1", &[])), None);
    }

    #[test]
    fn root_prefix_matches_every_path() {
        let t = table(&[route("all", vec![path(PathMatch::Prefix("/".into()))], "a")]);
        assert_eq!(routed(&t, &request("GET", "/", &[])), Some("all".into()));
        assert_eq!(
            routed(&t, &request("GET", "/deep/x", &[])),
            Some("all".into())
        );
    }

    #[test]
    fn exact_path_ignores_the_query_and_nothing_else() {
        let t = table(&[route(
            "login",
            vec![path(PathMatch::Exact("/login".into()))],
            "a",
        )]);
        assert_eq!(
            routed(&t, &request("GET", "/login?next=/", &[])),
            Some("login".into())
        );
        assert_eq!(routed(&t, &request("GET", "/login/", &[])), None);
    }

    #[test]
    fn regex_path_is_anchored_at_both_ends() {
        let t = table(&[route(
            "items",
            vec![path(PathMatch::Regex("/items/[0-9]+|/legacy".into()))],
            "a",
        )]);
        assert_eq!(
            routed(&t, &request("GET", "/items/42", &[])),
            Some("items".into())
        );
        assert_eq!(
            routed(&t, &request("GET", "/legacy", &[])),
            Some("items".into())
        );
        assert_eq!(routed(&t, &request("GET", "/items/42/x", &[])), None);
        assert_eq!(routed(&t, &request("GET", "/x/legacy", &[])), None);
    }

    #[test]
    fn method_and_headers_must_all_hold() {
        let m = RequestMatch {
            path: None,
            method: Some("POST".into()),
            headers: vec![
                HeaderMatch {
                    name: "x-canary".into(),
                    value: ValueMatch::Exact("yes".into()),
                },
                HeaderMatch {
                    name: "user-agent".into(),
                    value: ValueMatch::Regex("curl/.*".into()),
                },
            ],
        };
        let t = table(&[route("canary", vec![m], "a")]);
        let both = [("x-canary", "yes"), ("user-agent", "curl/8.0")];
        assert_eq!(
            routed(&t, &request("POST", "/", &both)),
            Some("canary".into())
        );
        assert_eq!(routed(&t, &request("GET", "/", &both)), None);
        assert_eq!(
            routed(&t, &request("POST", "/", &[("x-canary", "yes")])),
            None
        );
        assert_eq!(
            routed(
                &t,
                &request(
                    "POST",
                    "/",
                    &[("x-canary", "yes"), ("user-agent", "wget curl/8")]
                )
            ),
            None,
            "header regex is anchored"
        );
    }

    #[test]
    fn a_repeated_header_matches_when_any_value_does() {
        let m = RequestMatch {
            headers: vec![HeaderMatch {
                name: "x-tier".into(),
                value: ValueMatch::Exact("gold".into()),
            }],
            ..RequestMatch::default()
        };
        let t = table(&[route("gold", vec![m], "a")]);
        let req = request("GET", "/", &[("x-tier", "silver"), ("x-tier", "gold")]);
        assert_eq!(routed(&t, &req), Some("gold".into()));
    }

    #[test]
    fn first_matching_route_wins_and_any_of_its_matches_suffices() {
        let t = table(&[
            route(
                "specific",
                vec![
                    path(PathMatch::Exact("/a".into())),
                    path(PathMatch::Exact("/b".into())),
                ],
                "x",
            ),
            route("catch-all", vec![], "y"),
            route("never", vec![path(PathMatch::Exact("/c".into()))], "z"),
        ]);
        assert_eq!(
            routed(&t, &request("GET", "/b", &[])),
            Some("specific".into())
        );
        assert_eq!(
            routed(&t, &request("GET", "/c", &[])),
            Some("catch-all".into())
        );
    }

    #[test]
    fn an_invalid_regex_is_refused_with_the_route_name() {
        let routes = [route("bad", vec![path(PathMatch::Regex("(".into()))], "a")];
        let err = RouteTable::<Name, ()>::compile(
            &routes,
            |_, b| Ok(Name(b.service.name.clone())),
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }

    #[test]
    fn split_is_within_two_points_of_the_weights_over_10000_picks() {
        let split = Split::new(vec![("v1", 80), ("v2", 15), ("v3", 5), ("off", 0)]);
        let random = SeededRandom::new(42);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            let i = match *split.pick(random.next_u64()).unwrap() {
                "v1" => 0,
                "v2" => 1,
                "v3" => 2,
                _ => 3,
            };
            counts[i] += 1;
        }
        for (i, want) in [80.0, 15.0, 5.0, 0.0].into_iter().enumerate() {
            let got = f64::from(counts[i]) / 100.0;
            assert!((got - want).abs() <= 2.0, "target {i}: {got}% vs {want}%");
        }
        assert_eq!(counts[3], 0, "weight 0 is never picked");
    }

    #[test]
    fn an_all_zero_split_picks_nothing() {
        let split = Split::new(vec![("a", 0), ("b", 0)]);
        assert!(split.is_empty());
        assert_eq!(split.pick(12345), None);
        assert_eq!(Split::<&str>::new(vec![]).pick(1), None);
    }
}
