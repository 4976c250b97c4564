//! Istio's standard metrics, under the config's prefix (`tandem_` or `istio_`).
//!
//! Series: `<prefix>requests_total`, `<prefix>request_duration_milliseconds` (Envoy's buckets),
//! `<prefix>request_bytes`, `<prefix>response_bytes` (powers of ten, 1 B to 1 GB),
//! `<prefix>tcp_connections_opened_total`, `<prefix>tcp_connections_closed_total`,
//! `<prefix>tcp_sent_bytes_total`, `<prefix>tcp_received_bytes_total`. Every sample carries every
//! label of [`Labels`], `unknown` where a value is not known (Kiali skips a series that lacks
//! one); the request series add `route`.
//!
//! # Without locks on the request path
//!
//! A prometheus-client `Family` keeps its series behind a `RwLock`, keyed by an owned label
//! set. Here the label set is [`Labels`]: interned values ([`Sym`], a pointer) and small enums,
//! `Copy`, hashed in a few nanoseconds. Each request looks its series up in a [`SeriesCache`]:
//! shards of `ArcSwap<HashMap>`, read with one atomic load. Only a label set never seen before
//! takes the shard's lock, creates the series in its families (their lock, once) and publishes
//! a new map; after that, recording is atomic adds. The number of label sets is bounded by the
//! config (services, endpoints, routes), the interner's bound on callers' values, and the small
//! enums.
//!
//! # The prefix can change with a reload
//!
//! Series are stored without a name. The families are exported by a collector that names them
//! at scrape time with the prefix of the active config ([`MeshMetrics::set_prefix`], one atomic
//! store when a config is applied), so a reload that switches `tandem` to `istio` renames every
//! series, history included, and the request path never sees the prefix at all.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tandem_crds::contract::MetricsPrefix;

use super::flags::ResponseFlags;
use super::intern::{Interner, Sym};
use super::{AtomicHistogram, SecurityPolicy};

/// Istio's `canonical_revision` when a workload has no version label: `latest`.
pub const DEFAULT_REVISION: &str = "latest";

/// Which side reported a series.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The client's proxy (outbound).
    Source,
    /// The server's proxy (inbound).
    Destination,
}

/// `request_protocol`, as Istio writes it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestProtocol {
    /// HTTP/1.x or HTTP/2, not gRPC.
    Http,
    /// `content-type: application/grpc…`.
    Grpc,
    /// Opaque TCP (the TCP series).
    Tcp,
}

lower_case_label!(Reporter, Source => "source", Destination => "destination");
lower_case_label!(RequestProtocol, Http => "http", Grpc => "grpc", Tcp => "tcp");

/// One end of a request: its workload, the workload's namespace and its SPIFFE ID.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    /// `*_workload` (and `*_canonical_service`, which Istio derives from it when a pod has no
    /// `app` label).
    pub workload: Sym,
    /// `*_workload_namespace`.
    pub namespace: Sym,
    /// `*_principal`: `spiffe://…` when the hop is mutual TLS, else `unknown`.
    pub principal: Sym,
}

impl Peer {
    /// Every value `unknown`.
    pub fn unknown() -> Self {
        Self {
            workload: Sym::unknown(),
            namespace: Sym::unknown(),
            principal: Sym::unknown(),
        }
    }
}

/// The destination service: `<name>.<namespace>.svc.cluster.local`, its name and namespace.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ServiceLabels {
    /// `destination_service`.
    pub fqdn: Sym,
    /// `destination_service_name`.
    pub name: Sym,
    /// `destination_service_namespace`.
    pub namespace: Sym,
}

impl ServiceLabels {
    /// Every value `unknown` (passthrough, or an inbound request whose client did not say).
    pub fn unknown() -> Self {
        Self {
            fqdn: Sym::unknown(),
            name: Sym::unknown(),
            namespace: Sym::unknown(),
        }
    }
}

/// `grpc_response_status`: the number, or "" for a request that is not gRPC (as Istio).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct GrpcStatus(pub Option<u8>);

impl EncodeLabelValue for GrpcStatus {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"", encoder),
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for Sym {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The full label set of one series.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Labels {
    /// `reporter`.
    pub reporter: Reporter,
    /// `source_*`.
    pub source: Peer,
    /// `destination_*`.
    pub destination: Peer,
    /// `destination_service*`.
    pub service: ServiceLabels,
    /// `request_protocol`.
    pub protocol: RequestProtocol,
    /// `response_code` (0: no response was sent; always 0 on TCP series, as Envoy writes).
    pub response_code: u16,
    /// `grpc_response_status`.
    pub grpc_status: GrpcStatus,
    /// `response_flags`.
    pub flags: ResponseFlags,
    /// `connection_security_policy`.
    pub security: SecurityPolicy,
    /// `route` on request series: the matched rule's name, else `unknown`; `None` on TCP
    /// series, which have no such label.
    pub route: Option<Sym>,
}

fn label(
    encoder: &mut LabelSetEncoder,
    key: &'static str,
    value: impl EncodeLabelValue,
) -> Result<(), std::fmt::Error> {
    (key, value).encode(encoder.encode_label())
}

impl EncodeLabelSet for Labels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (s, d) = (&self.source, &self.destination);
        label(e, "reporter", self.reporter)?;
        label(e, "source_workload", s.workload)?;
        label(e, "source_workload_namespace", s.namespace)?;
        label(e, "source_principal", s.principal)?;
        label(e, "source_canonical_service", s.workload)?;
        label(e, "source_canonical_revision", DEFAULT_REVISION)?;
        label(e, "destination_workload", d.workload)?;
        label(e, "destination_workload_namespace", d.namespace)?;
        label(e, "destination_principal", d.principal)?;
        label(e, "destination_canonical_service", d.workload)?;
        label(e, "destination_canonical_revision", DEFAULT_REVISION)?;
        label(e, "destination_service", self.service.fqdn)?;
        label(e, "destination_service_name", self.service.name)?;
        label(e, "destination_service_namespace", self.service.namespace)?;
        label(e, "request_protocol", self.protocol)?;
        label(e, "response_code", self.response_code)?;
        label(e, "grpc_response_status", self.grpc_status)?;
        label(e, "response_flags", self.flags)?;
        label(e, "connection_security_policy", self.security)?;
        if let Some(route) = self.route {
            label(e, "route", route)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The lock-free cache of series handles

/// Shards, so that publishing a new label set copies a sixteenth of the map.
const SHARDS: usize = 16;

type Map<V> = HashMap<Labels, V, foldhash::fast::FixedState>;

/// Label set → series handles, read with an atomic load; a miss takes its shard's lock.
struct SeriesCache<V> {
    shards: [ArcSwap<Map<V>>; SHARDS],
    adding: [Mutex<()>; SHARDS],
    hasher: foldhash::fast::FixedState,
}

impl<V: Clone> SeriesCache<V> {
    fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| ArcSwap::from_pointee(Map::default())),
            adding: std::array::from_fn(|_| Mutex::new(())),
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    /// Runs `f` on the series of `labels`, creating them with `create` the first time.
    fn with<R>(&self, labels: &Labels, create: impl FnOnce() -> V, f: impl FnOnce(&V) -> R) -> R {
        // The shard index only needs to spread keys; the low bits of a good hash do.
        let shard = (self.hasher.hash_one(labels) as usize) % SHARDS;
        let (Some(map), Some(adding)) = (self.shards.get(shard), self.adding.get(shard)) else {
            // In bounds by construction (a remainder of SHARDS).
            return f(&create());
        };
        if let Some(series) = map.load().get(labels) {
            return f(series);
        }
        let _adding = adding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = map.load_full();
        if let Some(series) = current.get(labels) {
            return f(series);
        }
        let series = create();
        let result = f(&series);
        let mut next = Map::clone(&current);
        next.insert(*labels, series);
        map.store(Arc::new(next));
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Families and their exposition

type Histograms = Family<Labels, AtomicHistogram, fn() -> AtomicHistogram>;

/// The families, shared with the collector that names them at scrape time.
#[derive(Clone)]
struct Families {
    requests: Family<Labels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    tcp_opened: Family<Labels, Counter>,
    tcp_closed: Family<Labels, Counter>,
    tcp_sent: Family<Labels, Counter>,
    tcp_received: Family<Labels, Counter>,
}

/// The handles of one request label set.
#[derive(Clone)]
struct RequestSeries {
    requests: Counter,
    duration: AtomicHistogram,
    request_bytes: AtomicHistogram,
    response_bytes: AtomicHistogram,
}

/// The handles of one TCP label set, kept by a connection while it is open.
#[derive(Clone, Debug)]
pub struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpSeries {
    /// Counts a connection opened.
    pub fn opened(&self) {
        self.opened.inc();
    }

    /// Counts a connection closed.
    pub fn closed(&self) {
        self.closed.inc();
    }

    /// Counts bytes sent to the client (Istio's `tcp_sent_bytes`: the response direction).
    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    /// Counts bytes received from the client (`tcp_received_bytes`: the request direction).
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }
}

/// The standard metrics, their lock-free caches, the interner of their label values, the
/// active prefix and this proxy's own workload name.
pub struct MeshMetrics {
    families: Families,
    requests: SeriesCache<RequestSeries>,
    tcp: SeriesCache<TcpSeries>,
    /// Label values.
    pub interner: Interner,
    prefix: Arc<AtomicU8>,
    workload: OnceLock<Sym>,
}

impl std::fmt::Debug for MeshMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshMetrics")
            .field("prefix", &self.prefix())
            .field("workload", &self.workload())
            .finish_non_exhaustive()
    }
}

impl MeshMetrics {
    /// The families, empty, and the collector that exports them (to register once).
    pub(super) fn new() -> (Arc<Self>, MeshCollector) {
        let families = Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(AtomicHistogram::duration_ms),
            request_bytes: Family::new_with_constructor(AtomicHistogram::bytes),
            response_bytes: Family::new_with_constructor(AtomicHistogram::bytes),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
        };
        let prefix = Arc::new(AtomicU8::new(prefix_code(MetricsPrefix::default())));
        let collector = MeshCollector {
            families: families.clone(),
            prefix: prefix.clone(),
        };
        let metrics = Arc::new(Self {
            families,
            requests: SeriesCache::new(),
            tcp: SeriesCache::new(),
            interner: Interner::default(),
            prefix,
            workload: OnceLock::new(),
        });
        (metrics, collector)
    }

    /// Names the series with `prefix` from the next scrape on.
    pub fn set_prefix(&self, prefix: MetricsPrefix) {
        self.prefix.store(prefix_code(prefix), Ordering::Relaxed);
    }

    /// The prefix series are named with.
    pub fn prefix(&self) -> MetricsPrefix {
        prefix_of(self.prefix.load(Ordering::Relaxed))
    }

    /// Sets this proxy's own workload name (from `--workload-name`), once; later calls are
    /// ignored.
    pub fn set_workload(&self, name: &str) {
        let sym = self.interner.intern(name);
        let _ = self.workload.set(sym);
    }

    /// This proxy's workload name, `unknown` until set.
    pub fn workload(&self) -> Sym {
        self.workload.get().copied().unwrap_or_else(Sym::unknown)
    }

    /// Records one finished request.
    pub fn record_request(
        &self,
        labels: &Labels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let f = &self.families;
        self.requests.with(
            labels,
            || RequestSeries {
                requests: f.requests.get_or_create(labels).clone(),
                duration: f.duration.get_or_create(labels).clone(),
                request_bytes: f.request_bytes.get_or_create(labels).clone(),
                response_bytes: f.response_bytes.get_or_create(labels).clone(),
            },
            |s| {
                s.requests.inc();
                s.duration
                    .observe(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
                s.request_bytes.observe(request_bytes);
                s.response_bytes.observe(response_bytes);
            },
        );
    }

    /// The TCP series of `labels`, for a connection to keep.
    pub fn tcp(&self, labels: &Labels) -> TcpSeries {
        let f = &self.families;
        self.tcp.with(
            labels,
            || TcpSeries {
                opened: f.tcp_opened.get_or_create(labels).clone(),
                closed: f.tcp_closed.get_or_create(labels).clone(),
                sent: f.tcp_sent.get_or_create(labels).clone(),
                received: f.tcp_received.get_or_create(labels).clone(),
            },
            TcpSeries::clone,
        )
    }
}

fn prefix_code(prefix: MetricsPrefix) -> u8 {
    match prefix {
        MetricsPrefix::Tandem => 0,
        MetricsPrefix::Istio => 1,
    }
}

fn prefix_of(code: u8) -> MetricsPrefix {
    if code == 1 {
        MetricsPrefix::Istio
    } else {
        MetricsPrefix::Tandem
    }
}

/// Exports the families under the active prefix.
pub(super) struct MeshCollector {
    families: Families,
    prefix: Arc<AtomicU8>,
}

impl std::fmt::Debug for MeshCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCollector").finish_non_exhaustive()
    }
}

impl Collector for MeshCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let prefix = prefix_of(self.prefix.load(Ordering::Relaxed)).as_str();
        let f = &self.families;
        let counters: [(&str, &str, &Family<Labels, Counter>); 5] = [
            (
                "requests",
                "HTTP and gRPC requests, by Istio's labels",
                &f.requests,
            ),
            (
                "tcp_connections_opened",
                "TCP connections opened",
                &f.tcp_opened,
            ),
            (
                "tcp_connections_closed",
                "TCP connections closed",
                &f.tcp_closed,
            ),
            (
                "tcp_sent_bytes",
                "Bytes sent to the client over TCP connections",
                &f.tcp_sent,
            ),
            (
                "tcp_received_bytes",
                "Bytes received from the client over TCP connections",
                &f.tcp_received,
            ),
        ];
        let histograms: [(&str, &str, &Histograms); 3] = [
            (
                "request_duration_milliseconds",
                "Time from the request's arrival to the end of its response, in milliseconds",
                &f.duration,
            ),
            (
                "request_bytes",
                "Request body sizes, in bytes",
                &f.request_bytes,
            ),
            (
                "response_bytes",
                "Response body sizes, in bytes",
                &f.response_bytes,
            ),
        ];
        for (name, help, family) in counters {
            let name = format!("{prefix}{name}");
            family.encode(encoder.encode_descriptor(&name, help, None, MetricType::Counter)?)?;
        }
        for (name, help, family) in histograms {
            let name = format!("{prefix}{name}");
            family.encode(encoder.encode_descriptor(
                &name,
                help,
                None,
                MetricType::Histogram,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(m: &MeshMetrics) -> Labels {
        let i = &m.interner;
        Labels {
            reporter: Reporter::Source,
            source: Peer {
                workload: i.intern("client"),
                namespace: i.intern("shop"),
                principal: Sym::unknown(),
            },
            destination: Peer {
                workload: i.intern("server-v1"),
                namespace: i.intern("shop"),
                principal: Sym::unknown(),
            },
            service: ServiceLabels {
                fqdn: i.intern("server.shop.svc.cluster.local"),
                name: i.intern("server"),
                namespace: i.intern("shop"),
            },
            protocol: RequestProtocol::Http,
            response_code: 200,
            grpc_status: GrpcStatus(None),
            flags: ResponseFlags::NONE,
            security: SecurityPolicy::None,
            route: Some(Sym::unknown()),
        }
    }

    fn scrape(collector: MeshCollector) -> impl Fn() -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(collector));
        move || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        }
    }

    #[test]
    fn a_request_is_counted_once_per_label_set_with_every_label() {
        let (m, collector) = MeshMetrics::new();
        let scrape = scrape(collector);
        let l = labels(&m);
        m.record_request(&l, Duration::from_micros(700), 0, 15);
        m.record_request(&l, Duration::from_millis(3), 0, 15);
        let failed = Labels {
            response_code: 503,
            ..l
        };
        m.record_request(&failed, Duration::from_millis(1), 0, 0);
        let text = scrape();
        let want = r#"tandem_requests_total{reporter="source",source_workload="client",source_workload_namespace="shop",source_principal="unknown",source_canonical_service="client",source_canonical_revision="latest",destination_workload="server-v1",destination_workload_namespace="shop",destination_principal="unknown",destination_canonical_service="server-v1",destination_canonical_revision="latest",destination_service="server.shop.svc.cluster.local",destination_service_name="server",destination_service_namespace="shop",request_protocol="http",response_code="200",grpc_response_status="",response_flags="-",connection_security_policy="none",route="unknown"} 2"#;
        assert!(text.contains(want), "{text}");
        assert!(text.contains(r#"response_code="503""#), "{text}");
        // 0.7 ms is above Envoy's 0.5 ms bucket and within 1 ms; 3 ms within 5 ms.
        let bucket = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        r#"tandem_request_duration_milliseconds_bucket{{le="{le}","#
                    )) && l.contains(r#"response_code="200""#)
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(bucket("0.5").as_deref(), Some("0"), "{text}");
        assert_eq!(bucket("1.0").as_deref(), Some("1"), "{text}");
        assert_eq!(bucket("5.0").as_deref(), Some("2"), "{text}");
    }

    #[test]
    fn the_prefix_is_chosen_at_scrape_time() {
        let (m, collector) = MeshMetrics::new();
        let scrape = scrape(collector);
        m.record_request(&labels(&m), Duration::from_millis(1), 0, 0);
        assert!(scrape().contains("tandem_requests_total{"));
        m.set_prefix(MetricsPrefix::Istio);
        let text = scrape();
        assert!(text.contains("istio_requests_total{"), "{text}");
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(!text.contains("tandem_requests_total"), "{text}");
    }

    #[test]
    fn a_tcp_connection_counts_open_close_and_bytes_without_a_route_label() {
        let (m, collector) = MeshMetrics::new();
        let scrape = scrape(collector);
        let l = Labels {
            protocol: RequestProtocol::Tcp,
            response_code: 0,
            route: None,
            ..labels(&m)
        };
        let series = m.tcp(&l);
        series.opened();
        series.received(10);
        series.sent(20);
        series.closed();
        let text = scrape();
        assert!(
            text.contains(r#"request_protocol="tcp",response_code="0",grpc_response_status="",response_flags="-",connection_security_policy="none"} 10"#),
            "{text}"
        );
        assert!(text.contains("tandem_tcp_sent_bytes_total{"), "{text}");
        assert!(!text.contains(r#"route=""#), "{text}");
    }
}
