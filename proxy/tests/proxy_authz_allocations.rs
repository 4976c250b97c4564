//! The allow path of inbound authorization allocates nothing: deciding a request (facts read
//! in place from Pingora's header, the caller from the peer identity, 100 rules tried) and
//! counting it, counted by a global allocator that tallies this thread's allocations. A
//! deterministic property, not a timing: the benchmark (`benches/authz.rs`) has the costs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    unsafe_code,
    reason = "a global allocator is an unsafe trait; this one only forwards to System and counts"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use pingora::http::RequestHeader;
use tandem_crds::contract::{
    Authorization, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Callers,
    DefaultPolicy, HeaderMatch, Operations, PathMatch, ProxyConfig, Request, ValueMatch, Workload,
};
use tandem_crds::identity::SpiffeId;
use tandem_proxy::authz::{self, Authz};
use tandem_proxy::metrics::{AuthzProtocol, Metrics};
use tandem_proxy::tls::PeerIdentity;

/// The system allocator, counting the allocations of threads that asked to be counted.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTED.with(|c| c.set(true));
    f();
    COUNTED.with(|c| c.set(false));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

fn rules(n: usize) -> Vec<AuthorizationRule> {
    (0..n)
        .map(|i| AuthorizationRule {
            from: Some(Callers {
                principals: vec![format!("spiffe://cluster.local/ns/shop/sa/caller-{i}")],
                namespaces: vec![format!("team-{i}")],
                ..Callers::default()
            }),
            to: Some(Operations {
                paths: vec![
                    PathMatch::Prefix(format!("/api/v{i}")),
                    PathMatch::Regex(format!("/legacy/{i}/[a-z]+")),
                ],
                methods: vec!["GET".into()],
                headers: vec![HeaderMatch {
                    name: "x-team".into(),
                    value: ValueMatch::Regex("blue|green".into()),
                }],
                ..Operations::default()
            }),
        })
        .collect()
}

fn compile(default_policy: DefaultPolicy, policies: Vec<AuthorizationPolicy>) -> Authz {
    let mut config = ProxyConfig::new(Workload {
        namespace: "shop".into(),
        service_account: "api".into(),
        ..Workload::default()
    });
    config.authorization = Authorization {
        default_policy,
        cluster_networks: vec!["10.244.0.0/16".parse().unwrap()],
        policies,
    };
    config.validate().unwrap();
    Authz::compile(&config, "cluster.local", &Metrics::new().authz).unwrap()
}

fn decide(authz: &Authz, req: &RequestHeader, peer: &PeerIdentity) -> bool {
    let facts = authz::RequestFacts(req);
    let request = Request {
        port: 8080,
        caller: authz::caller(Some(peer), Some("10.244.1.7".parse().unwrap())),
        http: Some(&facts),
    };
    let (decision, verdict) = authz.authorize(&request, AuthzProtocol::Http);
    std::hint::black_box(verdict);
    decision.allowed
}

#[test]
fn deciding_and_counting_a_request_allocates_nothing_allowed_or_denied() {
    let authz = compile(
        DefaultPolicy::Deny,
        vec![
            AuthorizationPolicy {
                name: "shop/deny-batch".into(),
                action: AuthorizationAction::Deny,
                ports: vec![],
                rules: vec![AuthorizationRule {
                    from: Some(Callers {
                        principals: vec!["spiffe://cluster.local/ns/shop/sa/batch".into()],
                        ..Callers::default()
                    }),
                    to: None,
                }],
            },
            AuthorizationPolicy {
                name: "shop/allow-callers".into(),
                action: AuthorizationAction::Allow,
                ports: vec![8080],
                rules: rules(100),
            },
        ],
    );
    let mut req = RequestHeader::build("GET", b"/api/v99/items?page=2", None).unwrap();
    req.insert_header("x-team", "green").unwrap();
    let allowed = PeerIdentity::new(SpiffeId::new("cluster.local", "shop", "caller-99"));
    let stranger = PeerIdentity::new(SpiffeId::new("cluster.local", "shop", "stranger"));
    // The regex engines build their caches on first use; the steady state is what matters.
    assert!(decide(&authz, &req, &allowed));
    assert!(!decide(&authz, &req, &stranger));

    let n = allocations(|| {
        for _ in 0..1_000 {
            assert!(decide(&authz, &req, &allowed));
        }
    });
    assert_eq!(n, 0, "the allow path allocated {n} times in 1,000 requests");
    let n = allocations(|| {
        for _ in 0..1_000 {
            assert!(!decide(&authz, &req, &stranger));
        }
    });
    assert_eq!(
        n, 0,
        "deciding a denial allocated {n} times in 1,000 requests"
    );
    let n = allocations(|| {
        std::hint::black_box(authz.record_probe());
    });
    assert_eq!(n, 0, "counting a probe allocated");
}

#[test]
fn with_no_policy_deciding_allocates_nothing() {
    let authz = compile(DefaultPolicy::AllUnauthenticated, vec![]);
    let req = RequestHeader::build("POST", b"/anything", None).unwrap();
    let peer = PeerIdentity::new(SpiffeId::new("cluster.local", "shop", "web"));
    assert!(authz.allows_everything());
    let n = allocations(|| {
        for _ in 0..1_000 {
            assert!(decide(&authz, &req, &peer));
        }
    });
    assert_eq!(n, 0);
}
