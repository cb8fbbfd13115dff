//! Upstream pools: endpoints, load balancing, health, and connections.
//!
//! A `Pool` is compiled into each snapshot; the per-endpoint `Connections` and
//! `EndpointState` (health, ejections, load) it points to live in the `UpstreamRegistry`,
//! keyed by (pool name, address, protocol, transport), and the per-pool `PoolState`
//! (breaker, retry budget, limiter) by pool name, so connections and resilience state
//! survive config swaps and are released when an endpoint or pool leaves the config.

mod balancer;
mod conn;
mod dns;
pub mod h1;
mod health;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::http::body::BoxError;
use balancer::Balancer;
pub use balancer::{hash64, HashRing, PickContext};
pub use conn::{
    ClientAddrs, ConnSettings, Connections, Reuse, SendFailure, Transport, UpstreamRequest,
};
pub use state::{
    Admission, BreakerState, Capacity, EndpointState, InFlight, LimitError, Outcome, PoolState,
};

use crate::config::{
    CircuitBreakerConfig, ConcurrencyConfig, ConnectionQueueConfig, HealthCheckConfig,
    OutlierConfig, PassiveHealthConfig, PoolConfig, RetryBudgetConfig, UpstreamProtocol,
};
use crate::tls::{TlsError, UpstreamTlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {address} failed: {source}")]
    Connect {
        address: Arc<str>,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {address} timed out")]
    ConnectTimeout { address: Arc<str> },
    #[error("handshake with {address} failed: {source}")]
    Handshake {
        address: Arc<str>,
        #[source]
        source: hyper::Error,
    },
    #[error("TLS to {address} failed: {message}")]
    Tls { address: Arc<str>, message: String },
    #[error("upstream request failed: {0}")]
    Request(#[source] BoxError),
    /// A reused keep-alive connection failed before any response byte: the backend closed
    /// it as the request arrived. Safe requests go out again on a fresh connection.
    #[error("reused upstream connection closed before a response: {0}")]
    Stale(#[source] BoxError),
    #[error("no response header within {0:?}")]
    ResponseTimeout(std::time::Duration),
    #[error("pool {0} has no endpoint")]
    NoEndpoint(Arc<str>),
    #[error("every endpoint of pool {pool} is at its connection limit: {reason}")]
    AtLimit { pool: Arc<str>, reason: LimitError },
}

/// A response body from a backend: HTTP/1.1 from the gateway's own client (`h1`), HTTP/2
/// from hyper's. The HTTP/1 body comes boxed (`h1::send` says why).
pub enum UpstreamBody {
    H1(Box<h1::Body>),
    H2(hyper::body::Incoming),
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            UpstreamBody::H2(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.is_end_stream(),
            UpstreamBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::H1(body) => body.size_hint(),
            UpstreamBody::H2(body) => body.size_hint(),
        }
    }
}

pub struct Endpoint {
    pub address: Arc<str>,
    /// `address` as the default upstream `Host` value (none if it cannot be one).
    pub host_header: Option<http::HeaderValue>,
    pub weight: u32,
    /// Takes no new requests (SPEC UP-1 drain); requests in flight finish.
    pub draining: bool,
    pub connections: Arc<Connections>,
    /// Attempts, errors and latencies, labelled by pool and endpoint.
    pub metrics: Arc<crate::telemetry::EndpointMetrics>,
    pub state: Arc<EndpointState>,
}

/// The resilience settings of a pool, as written in this snapshot's config.
pub struct Resilience {
    pub health_check: Option<HealthCheckConfig>,
    pub passive: PassiveHealthConfig,
    pub outlier: Option<OutlierConfig>,
    pub breaker: Option<CircuitBreakerConfig>,
    pub concurrency: Option<ConcurrencyConfig>,
    pub budget: RetryBudgetConfig,
    pub panic_threshold: u32,
    /// How often endpoint host names are resolved again; `None`: per new connection only.
    pub dns_refresh: Option<Duration>,
    /// Requests in flight per endpoint (and HTTP/1.1 connections); 0: unlimited.
    pub max_per_endpoint: usize,
    pub connection_queue: ConnectionQueueConfig,
}

pub struct Pool {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub settings: ConnSettings,
    pub resilience: Resilience,
    /// Breaker, budget, limiter and counters; shared with every snapshot naming this pool.
    pub state: Arc<PoolState>,
    endpoints: Vec<Endpoint>,
    balancer: Balancer,
}

/// An endpoint chosen for one attempt.
pub struct Picked<'a> {
    pub index: usize,
    pub endpoint: &'a Endpoint,
    /// Chosen in panic mode: too few endpoints were available, so all were candidates.
    pub panic: bool,
}

impl Pool {
    /// Picks an endpoint for a request without context (L4 relay, tests).
    pub fn pick(&self) -> Result<&Endpoint, UpstreamError> {
        let headers = http::HeaderMap::new();
        let ctx = PickContext {
            client_ip: std::net::IpAddr::from([0, 0, 0, 0]),
            headers: &headers,
        };
        self.pick_for(&ctx, &[]).map(|picked| picked.endpoint)
    }

    /// Picks an endpoint among those in rotation (healthy, not ejected, not draining),
    /// preferring ones not in `tried`. When fewer than `panic_threshold` percent of the
    /// non-draining endpoints are in rotation, all non-draining ones are candidates (SPEC
    /// UP-11); with panic mode off and none in rotation, the pool has no endpoint.
    pub fn pick_for(
        &self,
        ctx: &PickContext<'_>,
        tried: &[usize],
    ) -> Result<Picked<'_>, UpstreamError> {
        let now = state::now_ms();
        let mut serving = 0usize;
        let mut available = 0usize;
        for endpoint in &self.endpoints {
            if !endpoint.draining {
                serving += 1;
                available += usize::from(endpoint.state.available(now));
            }
        }
        if serving == 0 {
            return Err(UpstreamError::NoEndpoint(self.name.clone()));
        }
        let threshold = self.resilience.panic_threshold as usize;
        let panic = threshold > 0 && available * 100 < threshold * serving;
        if available == 0 && !panic {
            return Err(UpstreamError::NoEndpoint(self.name.clone()));
        }
        if panic != self.state.panicking.swap(panic, Ordering::Relaxed) {
            if panic {
                self.state
                    .counters
                    .panic_events
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pool = %self.name, available, serving, "panic mode: too few endpoints available; balancing over all of them");
            } else {
                tracing::info!(pool = %self.name, available, serving, "panic mode over");
            }
        }
        if panic {
            self.state
                .counters
                .panic_picks
                .fetch_add(1, Ordering::Relaxed);
        }
        let endpoints = &self.endpoints;
        let cap = self.resilience.max_per_endpoint;
        let has_room = |i: usize| cap == 0 || endpoints[i].state.in_flight() < cap;
        let eligible =
            |i: usize| !endpoints[i].draining && (panic || endpoints[i].state.available(now));
        let in_rotation = |i: usize| eligible(i) && has_room(i);
        let untried = |i: usize| in_rotation(i) && !tried.contains(&i);
        let index = if self.endpoints.len() == 1 {
            in_rotation(0).then_some(0)
        } else {
            let fresh = (0..endpoints.len()).any(untried);
            if fresh {
                self.balancer.pick(endpoints, ctx, &untried)
            } else {
                self.balancer.pick(endpoints, ctx, &in_rotation)
            }
        };
        let index = index.ok_or_else(|| {
            if cap > 0 && (0..endpoints.len()).any(eligible) {
                UpstreamError::AtLimit {
                    pool: self.name.clone(),
                    reason: LimitError::QueueFull(0),
                }
            } else {
                UpstreamError::NoEndpoint(self.name.clone())
            }
        })?;
        Ok(Picked {
            index,
            endpoint: &self.endpoints[index],
            panic,
        })
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Picks an endpoint and counts the request in flight there, within the endpoint's
    /// connection limit; `AtLimit` when every candidate is at it.
    pub fn try_reserve(
        &self,
        ctx: &PickContext<'_>,
        tried: &[usize],
    ) -> Result<(Picked<'_>, InFlight), UpstreamError> {
        let cap = self.resilience.max_per_endpoint;
        if cap == 0 {
            let picked = self.pick_for(ctx, tried)?;
            let in_flight = picked.endpoint.state.start_request();
            return Ok((picked, in_flight));
        }
        // Another request may take the last slot between the pick and the count; pick again
        // (a bounded number of times: each loss means some endpoint just filled up).
        for _ in 0..=self.endpoints.len() {
            let picked = self.pick_for(ctx, tried)?;
            if let Some(in_flight) = picked.endpoint.state.try_start_request(cap) {
                return Ok((picked, in_flight));
            }
        }
        Err(UpstreamError::AtLimit {
            pool: self.name.clone(),
            reason: LimitError::QueueFull(0),
        })
    }

    /// `try_reserve`, waiting in the pool's bounded connection queue while every endpoint is
    /// at its connection limit (SPEC UP-3, HAProxy's `maxconn` + `timeout queue`).
    pub async fn reserve(
        &self,
        ctx: &PickContext<'_>,
        tried: &[usize],
    ) -> Result<(Picked<'_>, InFlight), UpstreamError> {
        match self.try_reserve(ctx, tried) {
            Err(UpstreamError::AtLimit { .. }) => {}
            other => return other,
        }
        let queue = &self.resilience.connection_queue;
        let counters = &self.state.counters;
        let full = |reason| {
            counters
                .connection_limit_rejections
                .fetch_add(1, Ordering::Relaxed);
            UpstreamError::AtLimit {
                pool: self.name.clone(),
                reason,
            }
        };
        let capacity = &self.state.capacity;
        let Some(_queued) = capacity.enqueue(queue.max_queue) else {
            return Err(full(LimitError::QueueFull(queue.max_queue)));
        };
        counters
            .connection_queue_waits
            .fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + queue.queue_timeout.0;
        loop {
            let freed = capacity.freed();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            match self.try_reserve(ctx, tried) {
                Err(UpstreamError::AtLimit { .. }) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(full(LimitError::QueueTimeout(queue.queue_timeout.0)));
            }
        }
    }

    /// The breaker's state for metrics: 0 closed, 1 open, 2 half-open (an open breaker
    /// whose `open_for` has passed admits probes at its next request); `None` without one.
    pub fn breaker_code(&self) -> Option<u8> {
        self.resilience.breaker.as_ref()?;
        Some(self.state.breaker.lock().code())
    }

    /// Why an endpoint is or is not in rotation: `healthy` (in rotation), `draining`,
    /// `unhealthy` (failing active checks) or `ejected` (passive or outlier).
    pub fn endpoint_condition(endpoint: &Endpoint, now: u64) -> &'static str {
        if endpoint.draining {
            "draining"
        } else if !endpoint.state.active_healthy() {
            "unhealthy"
        } else if !endpoint.state.available(now) {
            "ejected"
        } else {
            "healthy"
        }
    }

    /// The pool's live state for the admin API's `/status`: breaker, counters, and per
    /// endpoint whether it is in rotation and why not.
    pub fn status(&self) -> serde_json::Value {
        let now = state::now_ms();
        let counters = &self.state.counters;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let breaker = match self.state.breaker.lock().state {
            BreakerState::Closed => "closed",
            BreakerState::Open { until } if until > now => "open",
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => "half_open",
        };
        let endpoints: Vec<serde_json::Value> = self
            .endpoints
            .iter()
            .map(|endpoint| {
                serde_json::json!({
                    "address": &*endpoint.address,
                    "weight": endpoint.weight,
                    "draining": endpoint.draining,
                    "healthy": endpoint.state.active_healthy(),
                    "ejected": !endpoint.state.available(now) && endpoint.state.active_healthy(),
                    "in_rotation": !endpoint.draining && endpoint.state.available(now),
                    "in_flight": endpoint.state.in_flight(),
                })
            })
            .collect();
        serde_json::json!({
            "name": &*self.name,
            "circuit_breaker": self.resilience.breaker.as_ref().map(|_| breaker),
            "panic": self.state.panicking.load(Ordering::Relaxed),
            "counters": {
                "retries": load(&counters.retries),
                "retry_budget_exhausted": load(&counters.budget_exhausted),
                "circuit_rejections": load(&counters.circuit_rejections),
                "overload_rejections": load(&counters.overload_rejections),
                "connection_queue_waits": load(&counters.connection_queue_waits),
                "connection_limit_rejections": load(&counters.connection_limit_rejections),
                "panic_picks": load(&counters.panic_picks),
            },
            "endpoints": endpoints,
        })
    }

    /// Latency outlier detection (SPEC UP-5): records a response's head latency and ejects
    /// the endpoint when its mean over the interval reaches `latency_percent` of the
    /// median of the pool's endpoint means (the lower median; at least two endpoints with
    /// `latency_min_requests` responses each are needed to judge).
    pub fn report_latency(&self, endpoint: &Endpoint, latency: Duration) {
        let Some(outlier) = self
            .resilience
            .outlier
            .as_ref()
            .filter(|outlier| outlier.latency_percent > 0)
        else {
            return;
        };
        let window = outlier.interval.0;
        let Some(mean) =
            endpoint
                .state
                .record_latency(latency, window, outlier.latency_min_requests)
        else {
            return;
        };
        let mut means: Vec<u64> = self
            .endpoints
            .iter()
            .filter_map(|e| e.state.mean_latency(window, outlier.latency_min_requests))
            .collect();
        if means.len() < 2 {
            return;
        }
        let rank = (means.len() - 1) / 2;
        let (_, median, _) = means.select_nth_unstable(rank);
        let median = (*median).max(1);
        if u128::from(mean) * 100 < u128::from(median) * u128::from(outlier.latency_percent) {
            return;
        }
        let now = state::now_ms();
        let may_eject = || {
            let ejected = self
                .endpoints
                .iter()
                .filter(|e| e.state.is_outlier_ejected(now))
                .count();
            (ejected + 1) * 100 <= outlier.max_ejection_percent as usize * self.endpoints.len()
        };
        if let Some(period) = endpoint.state.eject_outlier(
            outlier.base_ejection_time.0,
            outlier.max_ejection_time.0,
            may_eject,
        ) {
            endpoint
                .metrics
                .ejected(crate::telemetry::metrics::Ejection::Outlier);
            tracing::warn!(pool = %self.name, endpoint = %endpoint.address, mean_ms = mean / 1000, median_ms = median / 1000, ejection_ms = period.as_millis() as u64, "endpoint ejected: latency outlier");
        }
    }

    /// Feeds one attempt's outcome to passive health and outlier detection.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        let passive = &self.resilience.passive;
        match outcome {
            Outcome::ConnectFailure => {
                if let Some(period) = endpoint.state.record_connect(
                    false,
                    passive.consecutive_failures,
                    passive.ejection_time.0,
                ) {
                    endpoint
                        .metrics
                        .ejected(crate::telemetry::metrics::Ejection::Passive);
                    tracing::warn!(pool = %self.name, endpoint = %endpoint.address, ejection_ms = period.as_millis() as u64, "endpoint ejected: consecutive connect failures");
                }
            }
            Outcome::Failure | Outcome::Success => {
                endpoint.state.record_connect(true, 0, Duration::ZERO);
            }
        }
        let Some(outlier) = &self.resilience.outlier else {
            return;
        };
        if outcome == Outcome::ConnectFailure {
            return;
        }
        let may_eject = || {
            let now = state::now_ms();
            let ejected = self
                .endpoints
                .iter()
                .filter(|e| e.state.is_outlier_ejected(now))
                .count();
            // Strictly enforced, unlike Envoy which always allows one: a small pool with a
            // low percentage then never ejects, which is what the percentage says.
            (ejected + 1) * 100 <= outlier.max_ejection_percent as usize * self.endpoints.len()
        };
        let failed = outcome == Outcome::Failure;
        let rate_breached = endpoint.state.rate_breached(
            failed,
            outlier.interval.0,
            outlier.failure_percent,
            outlier.failure_min_requests,
        );
        if let Some(period) = endpoint.state.record_response(
            failed,
            rate_breached,
            outlier.consecutive_5xx,
            outlier.base_ejection_time.0,
            outlier.max_ejection_time.0,
            may_eject,
        ) {
            endpoint
                .metrics
                .ejected(crate::telemetry::metrics::Ejection::Outlier);
            tracing::warn!(pool = %self.name, endpoint = %endpoint.address, ejection_ms = period.as_millis() as u64, "endpoint ejected: outlier (consecutive failures or failure rate)");
        }
    }
}

/// Pool name, endpoint address, protocol, and the transport settings (TLS, PROXY) as
/// written: a change to any of them starts fresh connections.
type EndpointKey = (Arc<str>, Arc<str>, UpstreamProtocol, String);

fn transport_key(config: &PoolConfig) -> String {
    if config.tls.is_none() && config.send_proxy_protocol.is_none() {
        return String::new();
    }
    serde_json::to_string(&(&config.tls, &config.send_proxy_protocol)).unwrap_or_default()
}

/// One endpoint's long-lived state: its connections and its health.
struct Slot {
    connections: Arc<Connections>,
    state: Arc<EndpointState>,
}

/// Route name and pool name.
type RouteBreakerKey = (Arc<str>, Arc<str>);

/// A route's own circuit breaker for its pool (`routes[].circuit_breaker`): the settings
/// of this snapshot, the state kept in the registry by (route, pool).
pub struct RouteBreaker {
    pub config: CircuitBreakerConfig,
    pub state: Arc<Mutex<state::Breaker>>,
}

/// Long-lived per-endpoint and per-pool state, shared by every snapshot that names it.
#[derive(Default)]
pub struct UpstreamRegistry {
    endpoints: Mutex<HashMap<EndpointKey, Slot>>,
    pools: Mutex<HashMap<Arc<str>, Arc<PoolState>>>,
    /// Per-route breakers by (route name, pool name) (SPEC UP-6 "per route × pool").
    route_breakers: Mutex<HashMap<RouteBreakerKey, Arc<Mutex<state::Breaker>>>>,
}

impl UpstreamRegistry {
    /// Builds a snapshot's pool, reusing the state of endpoints and pools already known.
    pub fn pool(
        &self,
        config: &PoolConfig,
        metrics: &crate::telemetry::Metrics,
    ) -> Result<Pool, TlsError> {
        let name: Arc<str> = config.name.as_str().into();
        let tls = match &config.tls {
            Some(settings) => {
                if settings.insecure_skip_verify {
                    tracing::warn!(
                        pool = %config.name,
                        "tls.insecure_skip_verify: endpoint certificates are not verified"
                    );
                }
                let alpn: &[&[u8]] = match config.protocol {
                    UpstreamProtocol::H2 | UpstreamProtocol::H2c => &[b"h2"],
                    UpstreamProtocol::Http1 => &[b"http/1.1"],
                };
                Some(Arc::new(UpstreamTlsConnector::new(settings, alpn)?))
            }
            None => None,
        };
        let transport_key = transport_key(config);
        let state = self.pools.lock().entry(name.clone()).or_default().clone();
        let mut registry = self.endpoints.lock();
        let endpoints: Vec<Endpoint> = config
            .endpoints
            .iter()
            .map(|endpoint| {
                let address: Arc<str> = endpoint.address().into();
                let key = (
                    name.clone(),
                    address.clone(),
                    config.protocol,
                    transport_key.clone(),
                );
                let slot = registry.entry(key).or_insert_with(|| {
                    let transport = Transport {
                        tls: tls.clone(),
                        proxy_protocol: config.send_proxy_protocol,
                    };
                    let endpoint_metrics = metrics.endpoint(&name, &address);
                    let connections = Arc::new(
                        Connections::new(address.clone(), config.protocol, transport)
                            .with_metrics(endpoint_metrics.clone()),
                    );
                    endpoint_metrics.set_connections(&connections);
                    Slot {
                        connections,
                        state: Arc::new(EndpointState::in_pool(
                            address.clone(),
                            state.capacity.clone(),
                        )),
                    }
                });
                let endpoint_metrics = metrics.endpoint(&name, &address);
                Endpoint {
                    host_header: http::HeaderValue::from_str(&address).ok(),
                    address,
                    weight: endpoint.weight(),
                    draining: endpoint.draining(),
                    connections: slot.connections.clone(),
                    state: slot.state.clone(),
                    metrics: endpoint_metrics,
                }
            })
            .collect();
        drop(registry);
        Ok(Pool {
            name,
            protocol: config.protocol,
            settings: ConnSettings {
                connect_timeout: config.connect_timeout.0,
                max_idle: config.max_idle_per_endpoint,
                idle_timeout: config.idle_timeout.0,
                max_requests: (config.max_requests_per_connection > 0)
                    .then_some(config.max_requests_per_connection),
                max_lifetime: config.max_connection_lifetime.non_zero(),
                max_connections: config.max_connections_per_endpoint as usize,
            },
            resilience: Resilience {
                health_check: config.health_check.clone(),
                passive: config.passive_health.clone(),
                outlier: config.outlier_detection.clone(),
                breaker: config.circuit_breaker.clone(),
                concurrency: config.concurrency.clone(),
                budget: config.retry_budget.clone(),
                panic_threshold: config.panic_threshold,
                dns_refresh: config.dns_refresh.non_zero(),
                max_per_endpoint: config.max_connections_per_endpoint as usize,
                connection_queue: config.connection_queue.clone(),
            },
            state,
            balancer: Balancer::new(config.balancer, config.hash.as_ref(), &endpoints),
            endpoints,
        })
    }

    /// The breaker of `route`'s traffic to `pool`, kept across snapshots.
    pub fn route_breaker(
        &self,
        route: &Arc<str>,
        pool: &Arc<str>,
        config: &CircuitBreakerConfig,
    ) -> RouteBreaker {
        let state = self
            .route_breakers
            .lock()
            .entry((route.clone(), pool.clone()))
            .or_default()
            .clone();
        RouteBreaker {
            config: config.clone(),
            state,
        }
    }

    /// Drops route breakers no route in `routes` has any more.
    pub fn retain_route_breakers(&self, routes: &[crate::config::RouteConfig]) {
        let live: HashSet<(String, &str)> = routes
            .iter()
            .enumerate()
            .filter(|(_, route)| route.circuit_breaker.is_some())
            .filter_map(|(index, route)| {
                let name = route
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("route{index}"));
                route.pool.as_deref().map(|pool| (name, pool))
            })
            .collect();
        self.route_breakers
            .lock()
            .retain(|(route, pool), _| live.contains(&(route.to_string(), &**pool)));
    }

    /// Starts, restarts or stops the active health checks of a snapshot gone live.
    pub fn start_checks<'a>(&self, pools: impl IntoIterator<Item = &'a Arc<Pool>>) {
        for pool in pools {
            for endpoint in &pool.endpoints {
                health::ensure_checker(
                    &pool.name,
                    &endpoint.state,
                    &endpoint.connections,
                    pool.resilience.health_check.as_ref(),
                    &pool.settings,
                );
                dns::ensure_refresher(
                    &pool.name,
                    &endpoint.connections,
                    pool.resilience.dns_refresh,
                );
            }
        }
    }

    /// Drops the state of endpoints and pools no pool in `pools` names any more. Requests
    /// still running on an older snapshot keep their own references until they finish.
    pub fn retain(&self, pools: &[PoolConfig]) {
        let keys: Vec<String> = pools.iter().map(transport_key).collect();
        let live: HashSet<(&str, &str, UpstreamProtocol, &str)> = pools
            .iter()
            .zip(&keys)
            .flat_map(|(pool, key)| {
                pool.endpoints
                    .iter()
                    .map(move |e| (pool.name.as_str(), e.address(), pool.protocol, key.as_str()))
            })
            .collect();
        self.endpoints
            .lock()
            .retain(|(pool, address, protocol, key), _| {
                live.contains(&(&**pool, &**address, *protocol, key.as_str()))
            });
        let names: HashSet<&str> = pools.iter().map(|pool| pool.name.as_str()).collect();
        self.pools.lock().retain(|name, _| names.contains(&**name));
    }

    pub fn len(&self) -> usize {
        self.endpoints.lock().len()
    }

    /// Closes every idle upstream connection (the last stage of a drain). Returns how many.
    pub fn close_idle(&self) -> usize {
        let endpoints: Vec<Arc<Connections>> = self
            .endpoints
            .lock()
            .values()
            .map(|slot| slot.connections.clone())
            .collect();
        endpoints.iter().map(|c| c.close_idle()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_with(weights: &[u32], extra: &str) -> Pool {
        let endpoints: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ address = \"127.0.0.1:{}\", weight = {w} }}", 9000 + i))
            .collect();
        let config: PoolConfig = toml::from_str(&format!(
            "name = \"p\"\nendpoints = [{}]\n{extra}",
            endpoints.join(", ")
        ))
        .unwrap();
        UpstreamRegistry::default()
            .pool(&config, &crate::telemetry::Metrics::default())
            .unwrap()
    }

    fn pool(weights: &[u32]) -> Pool {
        pool_with(weights, "")
    }

    fn counts(pool: &Pool, picks: usize, ctx: &PickContext<'_>) -> Vec<usize> {
        let mut counts = vec![0; pool.endpoints.len()];
        for _ in 0..picks {
            counts[pool.pick_for(ctx, &[]).unwrap().index] += 1;
        }
        counts
    }

    fn no_context(headers: &http::HeaderMap) -> PickContext<'_> {
        PickContext {
            client_ip: std::net::IpAddr::from([10, 0, 0, 1]),
            headers,
        }
    }

    #[test]
    fn smooth_wrr_respects_weights_exactly() {
        let pool = pool(&[3, 1, 6]);
        let headers = http::HeaderMap::new();
        // Smooth WRR is deterministic: 1000 picks are exactly 300 / 100 / 600.
        assert_eq!(
            counts(&pool, 1000, &no_context(&headers)),
            vec![300, 100, 600]
        );
    }

    #[test]
    fn random_respects_weights_within_tolerance() {
        let pool = pool_with(&[1, 3], "balancer = \"random\"");
        let headers = http::HeaderMap::new();
        fastrand::seed(7);
        let counts = counts(&pool, 20_000, &no_context(&headers));
        // Expected 5000 / 15000; ±5 % of the total is over 15 standard deviations.
        assert!((4_000..=6_000).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn least_request_prefers_the_less_loaded_endpoint() {
        let pool = pool_with(&[1, 1, 1], "balancer = \"least_request\"");
        let headers = http::HeaderMap::new();
        fastrand::seed(11);
        // Endpoint 0 has 10 requests in flight, endpoint 1 has 5, endpoint 2 none.
        let _busy: Vec<InFlight> = (0..10)
            .map(|_| pool.endpoints[0].state.start_request())
            .chain((0..5).map(|_| pool.endpoints[1].state.start_request()))
            .collect();
        let counts = counts(&pool, 3_000, &no_context(&headers));
        // P2C never picks the most loaded of three (it loses every pair it is in), and the
        // least loaded wins both of its pairs: 2/3 of picks, ±5 %.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!((1_850..=2_150).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn consistent_hash_keeps_keys_and_moves_about_one_nth() {
        let extra = "balancer = \"consistent_hash\"\nhash = { on = \"header\", name = \"x-user\" }";
        let ten = pool_with(&[1; 10], extra);
        let eleven = pool_with(&[1; 11], extra);
        let mut moved = 0;
        let keys = 10_000;
        for key in 0..keys {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-user", http::HeaderValue::from(key));
            let ctx = no_context(&headers);
            let before = ten.pick_for(&ctx, &[]).unwrap().index;
            // The same key always lands on the same endpoint.
            assert_eq!(before, ten.pick_for(&ctx, &[]).unwrap().index);
            let after = eleven.pick_for(&ctx, &[]).unwrap().index;
            if before != after {
                // A key only ever moves to the new endpoint.
                assert_eq!(after, 10);
                moved += 1;
            }
        }
        // Ideal: 1/11 ≈ 9.1 % of the keys. 160 points per endpoint keep it within ±3 %.
        let share = f64::from(moved) / f64::from(keys);
        assert!((0.061..=0.121).contains(&share), "moved {share}");
    }

    #[test]
    fn hash_without_its_key_falls_back_to_round_robin() {
        let extra = "balancer = \"consistent_hash\"\nhash = { on = \"cookie\", name = \"sid\" }";
        let pool = pool_with(&[1, 1], extra);
        let headers = http::HeaderMap::new();
        assert_eq!(counts(&pool, 10, &no_context(&headers)), vec![5, 5]);
    }

    #[test]
    fn draining_and_ejected_endpoints_leave_rotation_and_panic_mode_brings_them_back() {
        let config: PoolConfig = toml::from_str(
            "name = \"p\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\", { address = \"127.0.0.1:4\", drain = true }]",
        )
        .unwrap();
        let pool = UpstreamRegistry::default()
            .pool(&config, &crate::telemetry::Metrics::default())
            .unwrap();
        let headers = http::HeaderMap::new();
        let ctx = no_context(&headers);
        assert_eq!(counts(&pool, 30, &ctx), vec![10, 10, 10, 0]);
        // One of three unhealthy: 67 % available, above the 50 % panic threshold.
        pool.endpoints[0].state.set_active_healthy(false);
        assert_eq!(counts(&pool, 30, &ctx), vec![0, 15, 15, 0]);
        assert!(!pool.pick_for(&ctx, &[]).unwrap().panic);
        // Two of three unhealthy: panic, all non-draining endpoints take traffic again.
        pool.endpoints[1].state.set_active_healthy(false);
        assert_eq!(counts(&pool, 30, &ctx), vec![10, 10, 10, 0]);
        assert!(pool.pick_for(&ctx, &[]).unwrap().panic);
        assert!(pool.state.counters.panic_picks.load(Ordering::Relaxed) >= 30);
    }

    #[test]
    fn retries_prefer_untried_endpoints() {
        let pool = pool(&[1, 1, 1]);
        let headers = http::HeaderMap::new();
        let ctx = no_context(&headers);
        for _ in 0..10 {
            let picked = pool.pick_for(&ctx, &[0, 2]).unwrap().index;
            assert_eq!(picked, 1);
        }
        // Everything tried: any endpoint in rotation.
        assert!(pool.pick_for(&ctx, &[0, 1, 2]).is_ok());
    }

    #[test]
    fn smooth_wrr_is_exact_per_cycle_and_interleaved() {
        let pool = pool(&[5, 1, 1]);
        let picks: Vec<&str> = (0..7).map(|_| &*pool.pick().unwrap().address).collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        let a = "127.0.0.1:9000";
        let b = "127.0.0.1:9001";
        let c = "127.0.0.1:9002";
        assert_eq!(picks, vec![a, a, b, a, c, a, a]);
    }

    #[test]
    fn registry_reuses_and_releases_endpoints() {
        let registry = UpstreamRegistry::default();
        let config: PoolConfig =
            toml::from_str("name = \"p\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\"]").unwrap();
        let metrics = crate::telemetry::Metrics::default();
        let first = registry.pool(&config, &metrics).unwrap();
        let second = registry.pool(&config, &metrics).unwrap();
        assert!(Arc::ptr_eq(
            &first.endpoints[0].connections,
            &second.endpoints[0].connections
        ));
        assert_eq!(registry.len(), 2);
        let smaller: PoolConfig =
            toml::from_str("name = \"p\"\nendpoints = [\"127.0.0.1:2\"]").unwrap();
        registry.retain(std::slice::from_ref(&smaller));
        assert_eq!(registry.len(), 1);
    }
}
