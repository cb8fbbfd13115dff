//! Prometheus metrics (SPEC OPS-1): the counters and histograms the data plane updates,
//! and the text exposition format rendered at scrape time.
//!
//! The hot path only touches atomics: `snapshot::compile` resolves each route's
//! [`RouteMetrics`] and each endpoint's [`EndpointMetrics`] once, by label set, and the
//! request carries the `Arc`. Label sets are created on first use and kept for the life of
//! the process (so counters never reset on reload); their number is capped
//! (`metrics.max_routes`, `metrics.max_endpoints`) and label sets beyond the cap share one
//! series labelled `other`. Connection, firewall and config counters that other rooms
//! already keep are read at scrape time, not duplicated.
//!
//! Hand-written rather than the `prometheus-client` crate: the families are fixed, the
//! route and endpoint handles must be plain structs of atomics held by the compiled
//! snapshot, and the format is small; a test parses the output with a real parser.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is implied.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Request methods with their own label value; everything else is `other`.
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];

/// Status classes, by the first digit of the status code.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The label value for series folded together beyond a cap.
pub const OTHER: &str = "other";

/// The route label of requests no route matched.
pub const UNMATCHED: &str = "none";

/// The index into `METHODS` of a request method.
pub fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// A latency histogram: per-bucket counts (made cumulative when rendered), sum and count.
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (index, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[index].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Why a retry was made, as the `reason` label (the route's `retry.on` conditions).
pub const RETRY_REASONS: [&str; 5] = [
    "connect_failure",
    "reset",
    "per_try_timeout",
    "5xx",
    "retriable_status",
];

/// The index into `RETRY_REASONS` of a retry condition.
pub fn retry_reason(on: crate::config::RetryOn) -> usize {
    use crate::config::RetryOn;
    match on {
        RetryOn::ConnectFailure => 0,
        RetryOn::Reset => 1,
        RetryOn::PerTryTimeout => 2,
        RetryOn::ServerError => 3,
        RetryOn::RetriableStatus => 4,
    }
}

/// The series of one (route, pool) label set.
pub struct RouteMetrics {
    route: Arc<str>,
    pool: Arc<str>,
    requests: [[AtomicU64; STATUS_CLASSES.len()]; METHODS.len()],
    pub duration: Histogram,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Retries made, by `RETRY_REASONS` index.
    pub retries: [AtomicU64; RETRY_REASONS.len()],
    /// Retries the pool's retry budget refused.
    pub budget_exhausted: AtomicU64,
    /// Hedged second attempts sent, and those whose response was used.
    pub hedges_sent: AtomicU64,
    pub hedges_won: AtomicU64,
}

impl RouteMetrics {
    fn new(route: Arc<str>, pool: Arc<str>) -> RouteMetrics {
        RouteMetrics {
            route,
            pool,
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            duration: Histogram::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            retries: std::array::from_fn(|_| AtomicU64::new(0)),
            budget_exhausted: AtomicU64::new(0),
            hedges_sent: AtomicU64::new(0),
            hedges_won: AtomicU64::new(0),
        }
    }

    /// Requests answered with `status` for `method` (an index from [`method_index`]).
    pub fn requests(&self, method: usize, status: u16) -> u64 {
        self.requests[method.min(METHODS.len() - 1)][class_index(status)].load(Ordering::Relaxed)
    }

    /// Counts one finished request.
    pub fn finish(&self, method: usize, status: u16, elapsed: Duration, bytes_out: u64) {
        self.requests[method.min(METHODS.len() - 1)][class_index(status)]
            .fetch_add(1, Ordering::Relaxed);
        self.duration.observe(elapsed);
        if bytes_out > 0 {
            self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        }
    }
}

/// Why an upstream attempt failed, as the `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// TCP connect, PROXY header, TLS or HTTP handshake failed.
    Connect,
    /// Connect or response-header timeout.
    Timeout,
    /// The exchange failed after the connection was up (reset, bad response).
    Request,
}

impl UpstreamFailure {
    const ALL: [UpstreamFailure; 3] = [
        UpstreamFailure::Connect,
        UpstreamFailure::Timeout,
        UpstreamFailure::Request,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Request => "request",
        }
    }
}

/// A per-pool counter family: name, type, help, and the counter it reads.
type PoolCounterFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::upstream::state::PoolCounters) -> &AtomicU64,
);

/// Why an endpoint was ejected, as the `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// Passive health: consecutive connect failures.
    Passive,
    /// Outlier detection: consecutive failures or failure rate.
    Outlier,
}

/// The series of one (pool, endpoint) label set.
pub struct EndpointMetrics {
    pool: Arc<str>,
    endpoint: Arc<str>,
    pub attempts: AtomicU64,
    errors: [AtomicU64; 3],
    /// Requests sent again on a fresh connection after a reused one failed before a
    /// response (the backend closed it as the request arrived).
    pub stale_retries: AtomicU64,
    /// Ejections, passive and outlier.
    ejections: [AtomicU64; 2],
    /// From sending the request to its response head.
    pub response: Histogram,
    /// New connections: TCP connect plus PROXY header and TLS handshake.
    pub connect: Histogram,
    /// Reads the endpoint's idle connections at scrape time.
    idle: Mutex<std::sync::Weak<crate::upstream::Connections>>,
}

impl EndpointMetrics {
    fn new(pool: Arc<str>, endpoint: Arc<str>) -> EndpointMetrics {
        EndpointMetrics {
            pool,
            endpoint,
            attempts: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            stale_retries: AtomicU64::new(0),
            ejections: std::array::from_fn(|_| AtomicU64::new(0)),
            response: Histogram::default(),
            connect: Histogram::default(),
            idle: Mutex::new(std::sync::Weak::new()),
        }
    }

    pub fn failed(&self, kind: UpstreamFailure) {
        let index = UpstreamFailure::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.errors[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn ejected(&self, kind: Ejection) {
        self.ejections[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether this endpoint has its own label set (not folded into `other` by the cap).
    pub fn is_own(&self) -> bool {
        !(&*self.pool == OTHER && &*self.endpoint == OTHER)
    }

    pub fn errors(&self, kind: UpstreamFailure) -> u64 {
        let index = UpstreamFailure::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.errors[index].load(Ordering::Relaxed)
    }

    /// Registers the endpoint's connections, to count idle ones at scrape time (the newest
    /// registration wins; held weakly so it never keeps connections alive).
    pub fn set_connections(&self, connections: &Arc<crate::upstream::Connections>) {
        *self.idle.lock() = Arc::downgrade(connections);
    }

    fn idle(&self) -> Option<usize> {
        self.idle.lock().upgrade().map(|c| c.idle_count())
    }
}

/// A capped set of labelled series: the first `cap` label sets get their own, the rest
/// share `other`.
struct Capped<T> {
    by_key: HashMap<(Arc<str>, Arc<str>), Arc<T>>,
    order: Vec<Arc<T>>,
    other: Arc<T>,
    folded: u64,
}

impl<T> Capped<T> {
    fn get(
        &mut self,
        a: &str,
        b: &str,
        cap: usize,
        make: impl FnOnce(Arc<str>, Arc<str>) -> T,
    ) -> Arc<T> {
        if let Some(found) = self.by_key.get(&(Arc::from(a), Arc::from(b))) {
            return found.clone();
        }
        if self.order.len() >= cap {
            self.folded += 1;
            return self.other.clone();
        }
        let (a, b): (Arc<str>, Arc<str>) = (a.into(), b.into());
        let series = Arc::new(make(a.clone(), b.clone()));
        self.by_key.insert((a, b), series.clone());
        self.order.push(series.clone());
        series
    }
}

/// Default cap on route label sets.
pub const DEFAULT_MAX_ROUTES: usize = 500;
/// Default cap on endpoint label sets.
pub const DEFAULT_MAX_ENDPOINTS: usize = 500;

/// Every metric the gateway keeps itself; lives in the publisher's registries, so it
/// outlives snapshots.
pub struct Metrics {
    started: Instant,
    max_routes: AtomicUsize,
    max_endpoints: AtomicUsize,
    routes: Mutex<Capped<RouteMetrics>>,
    unmatched: Arc<RouteMetrics>,
    endpoints: Mutex<Capped<EndpointMetrics>>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Unix time of the last successful config change.
    pub last_reload_success: AtomicU64,
    /// Request-policy counters, one capped set per [`PolicyFamily`].
    policy: [Mutex<Capped<Labeled>>; PolicyFamily::ALL.len()],
}

/// A counter of one (route, label) pair of a policy family.
pub struct Labeled {
    route: Arc<str>,
    label: Arc<str>,
    pub count: AtomicU64,
}

impl Labeled {
    fn new(route: Arc<str>, label: Arc<str>) -> Labeled {
        Labeled {
            route,
            label,
            count: AtomicU64::new(0),
        }
    }
}

/// The request-policy counter families (SPEC POLICY-1..4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyFamily {
    /// `gatehouse_rate_limited_total{route}`.
    RateLimited,
    /// `gatehouse_policy_blocks_total{route,policy}`.
    PolicyBlocks,
    /// `gatehouse_auth_failures_total{route,scheme}`.
    AuthFailures,
    /// `gatehouse_ext_authz_total{route,result}`.
    ExtAuthz,
}

impl PolicyFamily {
    pub const ALL: [PolicyFamily; 4] = [
        PolicyFamily::RateLimited,
        PolicyFamily::PolicyBlocks,
        PolicyFamily::AuthFailures,
        PolicyFamily::ExtAuthz,
    ];

    /// Name, help, and the second label (none for `route` alone).
    fn describe(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            PolicyFamily::RateLimited => (
                "gatehouse_rate_limited_total",
                "Requests refused with 429 by a rate limit, by route.",
                None,
            ),
            PolicyFamily::PolicyBlocks => (
                "gatehouse_policy_blocks_total",
                "Requests refused with 403 by an L7 policy, by route and policy.",
                Some("policy"),
            ),
            PolicyFamily::AuthFailures => (
                "gatehouse_auth_failures_total",
                "Requests refused with 401 by JWT or basic authentication, by route and scheme.",
                Some("scheme"),
            ),
            PolicyFamily::ExtAuthz => (
                "gatehouse_ext_authz_total",
                "External authorization decisions, by route and result.",
                Some("result"),
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let other: Arc<str> = OTHER.into();
        Metrics {
            started: Instant::now(),
            max_routes: AtomicUsize::new(DEFAULT_MAX_ROUTES),
            max_endpoints: AtomicUsize::new(DEFAULT_MAX_ENDPOINTS),
            routes: Mutex::new(Capped {
                by_key: HashMap::new(),
                order: Vec::new(),
                other: Arc::new(RouteMetrics::new(other.clone(), other.clone())),
                folded: 0,
            }),
            unmatched: Arc::new(RouteMetrics::new(UNMATCHED.into(), "".into())),
            endpoints: Mutex::new(Capped {
                by_key: HashMap::new(),
                order: Vec::new(),
                other: Arc::new(EndpointMetrics::new(other.clone(), other)),
                folded: 0,
            }),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_success: AtomicU64::new(0),
            policy: std::array::from_fn(|_| {
                let other: Arc<str> = OTHER.into();
                Mutex::new(Capped {
                    by_key: HashMap::new(),
                    order: Vec::new(),
                    other: Arc::new(Labeled::new(other.clone(), other)),
                    folded: 0,
                })
            }),
        }
    }
}

/// Values other rooms keep, read at scrape time.
#[derive(Default)]
pub struct Scrape {
    pub config_version: u64,
    pub snapshot_version: u64,
    pub draining: bool,
    pub listeners: Vec<(String, Arc<crate::listener::ListenerStats>)>,
    pub firewall: Option<Arc<crate::firewall::FirewallStats>>,
    pub access_log_dropped: u64,
    /// Split targets and mirrors (`traffic::TrafficRegistry::metric_rows`).
    pub traffic: Vec<TrafficRow>,
    /// The running snapshot's pools, for their live resilience state.
    pub pools: Vec<Arc<crate::upstream::Pool>>,
    /// Routes with their own circuit breaker: (route, pool, state code as in
    /// `Breaker::code`).
    pub route_breakers: Vec<(Arc<str>, Arc<str>, u8)>,
}

/// One (route, pool) of a weighted split or a mirror, for the exposition.
pub struct TrafficRow {
    pub route: String,
    pub pool: String,
    pub kind: TrafficKind,
}

pub enum TrafficKind {
    Split {
        requests: u64,
        errors: u64,
        trips: u64,
        braked: bool,
    },
    Mirror(crate::traffic::mirror::MirrorCounts),
}

/// Split, canary brake and mirror series (SPEC TRAFFIC-1..4).
fn render_traffic(out: &mut String, rows: &[TrafficRow]) {
    if rows.is_empty() {
        return;
    }
    let families: [(&str, &str, &str); 5] = [
        (
            "gatehouse_split_requests_total",
            "counter",
            "Requests a weighted split sent to each pool.",
        ),
        (
            "gatehouse_split_errors_total",
            "counter",
            "Split requests that failed (5xx or no upstream answer), by pool.",
        ),
        (
            "gatehouse_canary_brake_trips_total",
            "counter",
            "Times the canary brake set a pool's weight to 0.",
        ),
        (
            "gatehouse_canary_brake_engaged",
            "gauge",
            "1 while the canary brake holds the pool's weight at 0.",
        ),
        (
            "gatehouse_mirror_requests_total",
            "counter",
            "Mirrored requests by outcome: sent, dropped (in-flight bound full), skipped_body (body not copyable), failed (shadow error or timeout).",
        ),
    ];
    for (name, kind, help) in families {
        family(out, name, kind, help);
        for row in rows {
            let labels = format!(
                "route=\"{}\",pool=\"{}\"",
                escape(&row.route),
                escape(&row.pool)
            );
            match (&row.kind, name) {
                (TrafficKind::Split { requests, .. }, "gatehouse_split_requests_total") => {
                    let _ = writeln!(out, "{name}{{{labels}}} {requests}");
                }
                (TrafficKind::Split { errors, .. }, "gatehouse_split_errors_total") => {
                    let _ = writeln!(out, "{name}{{{labels}}} {errors}");
                }
                (TrafficKind::Split { trips, .. }, "gatehouse_canary_brake_trips_total") => {
                    let _ = writeln!(out, "{name}{{{labels}}} {trips}");
                }
                (TrafficKind::Split { braked, .. }, "gatehouse_canary_brake_engaged") => {
                    let _ = writeln!(out, "{name}{{{labels}}} {}", u8::from(*braked));
                }
                (TrafficKind::Mirror(counts), "gatehouse_mirror_requests_total") => {
                    for (outcome, value) in [
                        ("sent", counts.sent),
                        ("dropped", counts.dropped),
                        ("skipped_body", counts.skipped_body),
                        ("failed", counts.failed),
                    ] {
                        let _ = writeln!(out, "{name}{{{labels},outcome=\"{outcome}\"}} {value}");
                    }
                }
                _ => {}
            }
        }
    }
}

impl Metrics {
    /// Sets the label caps (from `metrics.max_routes` / `max_endpoints`). Label sets already
    /// created keep their series.
    pub fn set_caps(&self, max_routes: usize, max_endpoints: usize) {
        self.max_routes.store(max_routes, Ordering::Relaxed);
        self.max_endpoints.store(max_endpoints, Ordering::Relaxed);
    }

    /// The series for a route (and the pool it forwards to, `""` when it answers itself).
    pub fn route(&self, route: &str, pool: &str) -> Arc<RouteMetrics> {
        let cap = self.max_routes.load(Ordering::Relaxed);
        self.routes.lock().get(route, pool, cap, RouteMetrics::new)
    }

    /// The series of requests no route matched.
    pub fn unmatched(&self) -> Arc<RouteMetrics> {
        self.unmatched.clone()
    }

    pub fn endpoint(&self, pool: &str, endpoint: &str) -> Arc<EndpointMetrics> {
        let cap = self.max_endpoints.load(Ordering::Relaxed);
        self.endpoints
            .lock()
            .get(pool, endpoint, cap, EndpointMetrics::new)
    }

    /// The counter of `route` (and `label`, `""` for families with the route alone) in a
    /// policy family; capped like the route series.
    pub fn policy_counter(&self, family: PolicyFamily, route: &str, label: &str) -> Arc<Labeled> {
        let cap = self.max_routes.load(Ordering::Relaxed);
        let index = PolicyFamily::ALL
            .iter()
            .position(|f| *f == family)
            .unwrap_or(0);
        self.policy[index]
            .lock()
            .get(route, label, cap, Labeled::new)
    }

    fn render_policy(&self, out: &mut String) {
        for (index, family_kind) in PolicyFamily::ALL.iter().enumerate() {
            let series: Vec<Arc<Labeled>> = {
                let set = self.policy[index].lock();
                let mut all = set.order.clone();
                if set.folded > 0 {
                    all.push(set.other.clone());
                }
                all
            };
            let (name, help, second) = family_kind.describe();
            family(out, name, "counter", help);
            for counter in series {
                let value = counter.count.load(Ordering::Relaxed);
                let route = escape(&counter.route);
                let _ = match second {
                    None => writeln!(out, "{name}{{route=\"{route}\"}} {value}"),
                    Some(label) => writeln!(
                        out,
                        "{name}{{route=\"{route}\",{label}=\"{}\"}} {value}",
                        escape(&counter.label)
                    ),
                };
            }
        }
    }

    /// Counts a config change attempt (SIGHUP, admin API, rollback).
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_reload_success.store(now, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every family.
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.render_process(&mut out, scrape);
        render_listeners(&mut out, &scrape.listeners);
        if let Some(firewall) = &scrape.firewall {
            family(
                &mut out,
                "gatehouse_firewall_blocks_total",
                "counter",
                "Connections the firewall refused, by reason.",
            );
            for reason in crate::firewall::BlockReason::ALL {
                let _ = writeln!(
                    out,
                    "gatehouse_firewall_blocks_total{{reason=\"{}\"}} {}",
                    reason.as_str(),
                    firewall.blocked(reason)
                );
            }
        }
        self.render_routes(&mut out);
        self.render_endpoints(&mut out);
        self.render_policy(&mut out);
        render_traffic(&mut out, &scrape.traffic);
        self.render_pools(&mut out, &scrape.pools);
        family(
            &mut out,
            "gatehouse_upstream_route_circuit_breaker_state",
            "gauge",
            "State of routes' own circuit breakers (routes[].circuit_breaker): 0 closed, 1 open, 2 half-open.",
        );
        let cap = self.max_routes.load(Ordering::Relaxed);
        for (route, pool, code) in scrape.route_breakers.iter().take(cap) {
            let _ = writeln!(
                out,
                "gatehouse_upstream_route_circuit_breaker_state{{route=\"{}\",pool=\"{}\"}} {code}",
                escape(route),
                escape(pool)
            );
        }
        out
    }

    /// Live pool state read at scrape time (SPEC OPS-1: endpoint health, breaker state,
    /// panic mode, overload). Pools come from the config, and at most `max_endpoints` of
    /// them (by name) are shown; endpoint series follow the endpoint label cap.
    fn render_pools(&self, out: &mut String, pools: &[Arc<crate::upstream::Pool>]) {
        let mut pools: Vec<&Arc<crate::upstream::Pool>> = pools.iter().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools.truncate(self.max_endpoints.load(Ordering::Relaxed));
        let now = crate::upstream::state::now_ms();
        family(
            out,
            "gatehouse_upstream_endpoint_state",
            "gauge",
            "Endpoint condition, one-hot: healthy (in rotation), unhealthy (failing active checks), ejected (passive or outlier), draining.",
        );
        for pool in &pools {
            for endpoint in pool.endpoints() {
                if !endpoint.metrics.is_own() {
                    continue;
                }
                let current = crate::upstream::Pool::endpoint_condition(endpoint, now);
                for state in ["healthy", "unhealthy", "ejected", "draining"] {
                    let _ = writeln!(
                        out,
                        "gatehouse_upstream_endpoint_state{{pool=\"{}\",endpoint=\"{}\",state=\"{state}\"}} {}",
                        escape(&pool.name),
                        escape(&endpoint.address),
                        u8::from(state == current)
                    );
                }
            }
        }
        family(
            out,
            "gatehouse_upstream_endpoint_in_flight",
            "gauge",
            "Requests in flight to an endpoint (until their response body ends).",
        );
        for pool in &pools {
            for endpoint in pool.endpoints() {
                if endpoint.metrics.is_own() {
                    let _ = writeln!(
                        out,
                        "gatehouse_upstream_endpoint_in_flight{{pool=\"{}\",endpoint=\"{}\"}} {}",
                        escape(&pool.name),
                        escape(&endpoint.address),
                        endpoint.state.in_flight()
                    );
                }
            }
        }
        family(
            out,
            "gatehouse_upstream_circuit_breaker_state",
            "gauge",
            "Circuit breaker state of pools that have one: 0 closed, 1 open, 2 half-open.",
        );
        for pool in &pools {
            if let Some(code) = pool.breaker_code() {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_circuit_breaker_state{{pool=\"{}\"}} {code}",
                    escape(&pool.name)
                );
            }
        }
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let per_pool: [PoolCounterFamily; 3] = [
            (
                "gatehouse_upstream_circuit_rejections_total",
                "counter",
                "Requests answered 503 by an open (or probing) circuit breaker.",
                |c| &c.circuit_rejections,
            ),
            (
                "gatehouse_upstream_panic_events_total",
                "counter",
                "Times the pool entered panic mode (too few endpoints in rotation).",
                |c| &c.panic_events,
            ),
            (
                "gatehouse_upstream_panic_picks_total",
                "counter",
                "Endpoints picked in panic mode (over all non-draining endpoints).",
                |c| &c.panic_picks,
            ),
        ];
        for (name, kind, help, counter) in per_pool {
            family(out, name, kind, help);
            for pool in &pools {
                let _ = writeln!(
                    out,
                    "{name}{{pool=\"{}\"}} {}",
                    escape(&pool.name),
                    load(counter(&pool.state.counters))
                );
            }
        }
        family(
            out,
            "gatehouse_upstream_panic_mode",
            "gauge",
            "1 while the pool is in panic mode.",
        );
        for pool in &pools {
            let _ = writeln!(
                out,
                "gatehouse_upstream_panic_mode{{pool=\"{}\"}} {}",
                escape(&pool.name),
                u8::from(pool.state.panicking.load(Ordering::Relaxed))
            );
        }
        family(
            out,
            "gatehouse_upstream_overload_rejections_total",
            "counter",
            "Requests answered 503 by overload protection, by reason: queue_full / queue_timeout (the pool's concurrency limit), endpoints_at_limit (every endpoint at max_connections_per_endpoint).",
        );
        for pool in &pools {
            let counters = &pool.state.counters;
            for (reason, counter) in [
                ("queue_full", &counters.overload_queue_full),
                ("queue_timeout", &counters.overload_queue_timeouts),
                ("endpoints_at_limit", &counters.connection_limit_rejections),
            ] {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_overload_rejections_total{{pool=\"{}\",reason=\"{reason}\"}} {}",
                    escape(&pool.name),
                    load(counter)
                );
            }
        }
        family(
            out,
            "gatehouse_upstream_queue_waits_total",
            "counter",
            "Requests that had to wait in a queue, by queue: concurrency (the pool's limit) or connection (max_connections_per_endpoint).",
        );
        for pool in &pools {
            let counters = &pool.state.counters;
            for (queue, counter) in [
                ("concurrency", &counters.overload_queue_waits),
                ("connection", &counters.connection_queue_waits),
            ] {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_queue_waits_total{{pool=\"{}\",queue=\"{queue}\"}} {}",
                    escape(&pool.name),
                    load(counter)
                );
            }
        }
    }

    fn render_process(&self, out: &mut String, scrape: &Scrape) {
        family(
            out,
            "gatehouse_build_info",
            "gauge",
            "Always 1; the version is a label.",
        );
        let _ = writeln!(
            out,
            "gatehouse_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        gauge(
            out,
            "gatehouse_uptime_seconds",
            "Seconds since the process started.",
            self.started.elapsed().as_secs_f64(),
        );
        gauge(
            out,
            "gatehouse_draining",
            "1 while shutting down (drain in progress).",
            u8::from(scrape.draining),
        );
        gauge(
            out,
            "gatehouse_config_version",
            "The stored config version running now.",
            scrape.config_version,
        );
        gauge(
            out,
            "gatehouse_config_snapshot_version",
            "The compiled snapshot generation running now (counts every swap since start).",
            scrape.snapshot_version,
        );
        family(
            out,
            "gatehouse_config_reloads_total",
            "counter",
            "Config changes attempted (SIGHUP, admin API, rollback), by result.",
        );
        let _ = writeln!(
            out,
            "gatehouse_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "gatehouse_config_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        gauge(
            out,
            "gatehouse_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config change (0: none since start).",
            self.last_reload_success.load(Ordering::Relaxed),
        );
        counter(
            out,
            "gatehouse_access_log_dropped_lines_total",
            "Access-log lines dropped because the writer could not keep up.",
            scrape.access_log_dropped,
        );
        let (routes_folded, endpoints_folded) =
            (self.routes.lock().folded, self.endpoints.lock().folded);
        family(
            out,
            "gatehouse_metrics_label_sets_folded_total",
            "counter",
            "Route or endpoint label sets folded into `other` because their cap was reached.",
        );
        let _ = writeln!(
            out,
            "gatehouse_metrics_label_sets_folded_total{{family=\"route\"}} {routes_folded}"
        );
        let _ = writeln!(
            out,
            "gatehouse_metrics_label_sets_folded_total{{family=\"endpoint\"}} {endpoints_folded}"
        );
    }

    fn render_routes(&self, out: &mut String) {
        let routes = {
            let routes = self.routes.lock();
            let mut all: Vec<Arc<RouteMetrics>> = routes.order.clone();
            all.push(routes.other.clone());
            all.push(self.unmatched.clone());
            all
        };
        let labels: Vec<String> = routes
            .iter()
            .map(|r| {
                format!(
                    "route=\"{}\",pool=\"{}\"",
                    escape(&r.route),
                    escape(&r.pool)
                )
            })
            .collect();
        family(
            out,
            "gatehouse_requests_total",
            "counter",
            "Requests answered, by route, pool, method and status class.",
        );
        for (series, labels) in routes.iter().zip(&labels) {
            for (m, method) in METHODS.iter().enumerate() {
                for (c, class) in STATUS_CLASSES.iter().enumerate() {
                    let value = series.requests[m][c].load(Ordering::Relaxed);
                    if value > 0 {
                        let _ = writeln!(out, "gatehouse_requests_total{{{labels},method=\"{method}\",status_class=\"{class}\"}} {value}");
                    }
                }
            }
        }
        family(
            out,
            "gatehouse_request_duration_seconds",
            "histogram",
            "Time from the request head to the last response byte, by route and pool.",
        );
        for (series, labels) in routes.iter().zip(&labels) {
            if series.duration.count() > 0 {
                series
                    .duration
                    .render(out, "gatehouse_request_duration_seconds", labels);
            }
        }
        family(
            out,
            "gatehouse_request_bytes_total",
            "counter",
            "Request body bytes received from clients, by route and pool.",
        );
        for (series, labels) in routes.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "gatehouse_request_bytes_total{{{labels}}} {}",
                series.bytes_in.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "gatehouse_response_bytes_total",
            "counter",
            "Response body bytes sent to clients, by route and pool.",
        );
        for (series, labels) in routes.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "gatehouse_response_bytes_total{{{labels}}} {}",
                series.bytes_out.load(Ordering::Relaxed)
            );
        }
        // Upstream resilience per route: only routes that forward (their pool is named).
        let forwarding: Vec<(&Arc<RouteMetrics>, &String)> = routes
            .iter()
            .zip(&labels)
            .filter(|(series, _)| !series.pool.is_empty())
            .collect();
        family(
            out,
            "gatehouse_upstream_retries_total",
            "counter",
            "Retries made, by route, pool and reason (the retry condition met).",
        );
        for (series, labels) in &forwarding {
            for (index, reason) in RETRY_REASONS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_retries_total{{{labels},reason=\"{reason}\"}} {}",
                    series.retries[index].load(Ordering::Relaxed)
                );
            }
        }
        family(
            out,
            "gatehouse_upstream_retry_budget_exhausted_total",
            "counter",
            "Retries refused because the pool's retry budget was spent, by route and pool.",
        );
        for (series, labels) in &forwarding {
            let _ = writeln!(
                out,
                "gatehouse_upstream_retry_budget_exhausted_total{{{labels}}} {}",
                series.budget_exhausted.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "gatehouse_upstream_hedges_total",
            "counter",
            "Hedged second attempts, by route, pool and result: sent, won (its response was used).",
        );
        for (series, labels) in &forwarding {
            let _ = writeln!(
                out,
                "gatehouse_upstream_hedges_total{{{labels},result=\"sent\"}} {}",
                series.hedges_sent.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "gatehouse_upstream_hedges_total{{{labels},result=\"won\"}} {}",
                series.hedges_won.load(Ordering::Relaxed)
            );
        }
    }

    fn render_endpoints(&self, out: &mut String) {
        let endpoints = {
            let endpoints = self.endpoints.lock();
            let mut all = endpoints.order.clone();
            all.push(endpoints.other.clone());
            all
        };
        let labels: Vec<String> = endpoints
            .iter()
            .map(|e| {
                format!(
                    "pool=\"{}\",endpoint=\"{}\"",
                    escape(&e.pool),
                    escape(&e.endpoint)
                )
            })
            .collect();
        family(
            out,
            "gatehouse_upstream_requests_total",
            "counter",
            "Requests sent to an upstream endpoint (attempts).",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "gatehouse_upstream_requests_total{{{labels}}} {}",
                series.attempts.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "gatehouse_upstream_errors_total",
            "counter",
            "Upstream attempts that failed, by kind (connect, timeout, request).",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            for kind in UpstreamFailure::ALL {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_errors_total{{{labels},kind=\"{}\"}} {}",
                    kind.as_str(),
                    series.errors(kind)
                );
            }
        }
        family(
            out,
            "gatehouse_upstream_ejections_total",
            "counter",
            "Endpoint ejections, by kind: passive (consecutive connect failures) or outlier (outlier detection).",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            for (index, kind) in ["passive", "outlier"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_ejections_total{{{labels},kind=\"{kind}\"}} {}",
                    series.ejections[index].load(Ordering::Relaxed)
                );
            }
        }
        family(
            out,
            "gatehouse_upstream_stale_connection_retries_total",
            "counter",
            "Requests sent again on a fresh connection after a reused keep-alive connection failed before any response byte.",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "gatehouse_upstream_stale_connection_retries_total{{{labels}}} {}",
                series.stale_retries.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "gatehouse_upstream_response_duration_seconds",
            "histogram",
            "Time from sending a request upstream to its response head.",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            if series.response.count() > 0 {
                series
                    .response
                    .render(out, "gatehouse_upstream_response_duration_seconds", labels);
            }
        }
        family(
            out,
            "gatehouse_upstream_connect_duration_seconds",
            "histogram",
            "Time to open a new upstream connection (TCP, PROXY header, TLS).",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            if series.connect.count() > 0 {
                series
                    .connect
                    .render(out, "gatehouse_upstream_connect_duration_seconds", labels);
            }
        }
        family(
            out,
            "gatehouse_upstream_idle_connections",
            "gauge",
            "Idle keep-alive connections pooled per endpoint (HTTP/1.1) or open (HTTP/2).",
        );
        for (series, labels) in endpoints.iter().zip(&labels) {
            if let Some(idle) = series.idle() {
                let _ = writeln!(
                    out,
                    "gatehouse_upstream_idle_connections{{{labels}}} {idle}"
                );
            }
        }
    }
}

fn render_listeners(out: &mut String, listeners: &[(String, Arc<crate::listener::ListenerStats>)]) {
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let named: Vec<(String, &crate::listener::ListenerStats)> = listeners
        .iter()
        .map(|(name, stats)| (format!("listener=\"{}\"", escape(name)), &**stats))
        .collect();
    family(
        out,
        "gatehouse_connections_accepted_total",
        "counter",
        "Connections accepted, by listener.",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_connections_accepted_total{{{labels}}} {}",
            load(&stats.accepted)
        );
    }
    family(
        out,
        "gatehouse_connections_active",
        "gauge",
        "Connections open now, by listener.",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_connections_active{{{labels}}} {}",
            stats.active.load(Ordering::Relaxed)
        );
    }
    family(
        out,
        "gatehouse_listener_max_connections",
        "gauge",
        "The connection limit in force (0: unlimited).",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_listener_max_connections{{{labels}}} {}",
            stats.limit.load(Ordering::Relaxed)
        );
    }
    family(
        out,
        "gatehouse_connections_rejected_total",
        "counter",
        "Connections closed before being served, by listener and reason.",
    );
    for (labels, stats) in &named {
        let reasons = [
            ("limit", &stats.rejected_limit),
            ("proxy_untrusted", &stats.rejected_proxy_untrusted),
            ("proxy_header", &stats.rejected_proxy_header),
            ("firewall", &stats.rejected_firewall),
            ("client_hello", &stats.rejected_client_hello),
            ("plaintext", &stats.rejected_plaintext),
            ("unknown_sni", &stats.rejected_unknown_sni),
            ("upstream", &stats.failed_upstream),
        ];
        for (reason, counter) in reasons {
            let _ = writeln!(
                out,
                "gatehouse_connections_rejected_total{{{labels},reason=\"{reason}\"}} {}",
                load(counter)
            );
        }
    }
    family(
        out,
        "gatehouse_tls_handshakes_total",
        "counter",
        "TLS handshakes completed (terminated TLS), by listener.",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_tls_handshakes_total{{{labels}}} {}",
            load(&stats.tls_handshakes)
        );
    }
    family(
        out,
        "gatehouse_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed or timed out, by listener.",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_tls_handshake_failures_total{{{labels}}} {}",
            load(&stats.failed_handshakes)
        );
    }
    family(
        out,
        "gatehouse_relay_connections_total",
        "counter",
        "L4 relays (TCP listeners and TLS passthrough) started, by listener.",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_relay_connections_total{{{labels}}} {}",
            load(&stats.relays)
        );
    }
    family(
        out,
        "gatehouse_relay_bytes_total",
        "counter",
        "Bytes relayed by finished L4 relays, by listener and direction.",
    );
    for (labels, stats) in &named {
        let _ = writeln!(
            out,
            "gatehouse_relay_bytes_total{{{labels},direction=\"client_to_backend\"}} {}",
            load(&stats.relayed_from_clients)
        );
        let _ = writeln!(
            out,
            "gatehouse_relay_bytes_total{{{labels},direction=\"backend_to_client\"}} {}",
            load(&stats.relayed_to_clients)
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// Records one request when dropped: at the end of the response body, or when the client
/// goes away, so every request is counted exactly once.
pub struct RequestObserver {
    route: Arc<RouteMetrics>,
    method: usize,
    status: u16,
    started: Instant,
    bytes_out: u64,
    /// A sampled request's spans, exported when this observer drops (boxed: rare, and
    /// large inline in every response body).
    trace: Option<Box<super::otlp::PendingTrace>>,
}

impl RequestObserver {
    pub fn new(route: Arc<RouteMetrics>, method: usize, status: u16, started: Instant) -> Self {
        RequestObserver {
            route,
            method,
            status,
            started,
            bytes_out: 0,
            trace: None,
        }
    }

    /// Carries the request's spans to the end of the response.
    pub fn with_trace(mut self, trace: Option<Box<super::otlp::PendingTrace>>) -> Self {
        self.trace = trace;
        self
    }

    pub fn add_bytes_out(&mut self, bytes: u64) {
        self.bytes_out += bytes;
    }
}

impl Drop for RequestObserver {
    fn drop(&mut self) {
        self.route.finish(
            self.method,
            self.status,
            self.started.elapsed(),
            self.bytes_out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_beyond_the_cap_fold_into_other() {
        let metrics = Metrics::default();
        metrics.set_caps(2, 2);
        let a = metrics.route("a", "p");
        let b = metrics.route("b", "p");
        let c = metrics.route("c", "p");
        let d = metrics.route("d", "p");
        assert!(Arc::ptr_eq(&c, &d));
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&metrics.route("a", "p"), &a));
        assert_eq!(&*c.route, OTHER);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_millis(20));
        histogram.observe(Duration::from_secs(60));
        let mut out = String::new();
        histogram.render(&mut out, "h", "a=\"b\"");
        assert!(out.contains("h_bucket{a=\"b\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("h_bucket{a=\"b\",le=\"0.025\"} 2\n"));
        assert!(out.contains("h_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("h_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("h_count{a=\"b\"} 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape("plain"), "plain");
    }
}
