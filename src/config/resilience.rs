//! Config schema for upstream resilience (SPEC UP-2, UP-4..UP-7, UP-10, UP-11): hashing
//! keys, active and passive health checks, outlier detection, circuit breakers, retries
//! with their budget, and per-pool overload protection. Defaults follow what an operator
//! coming from Envoy or nginx expects; `docs/CONFIG.md` lists each one.

use serde::{Deserialize, Serialize};

use super::units::{Dur, Size};

/// What consistent hashing hashes (`balancer = "consistent_hash"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HashConfig {
    pub on: HashOn,
    /// The header or cookie name; required for `header` and `cookie`.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    ClientIp,
    Header,
    Cookie,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// `GET <path>`; healthy when the status is in `expected_status`.
    #[default]
    Http,
    /// A TCP connect (plus TLS when the pool uses it) that succeeds in time.
    Tcp,
}

/// Active health checking (SPEC UP-4).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub path: String,
    /// `Host` sent with HTTP checks; the endpoint address when unset.
    pub host: Option<String>,
    /// Inclusive range `[low, high]` of statuses counted as healthy.
    pub expected_status: [u16; 2],
    pub interval: Dur,
    pub timeout: Dur,
    /// A random delay up to this long is added to every interval so checks of many
    /// gateways do not arrive in lock step.
    pub jitter: Dur,
    /// Consecutive failures that take a healthy endpoint out of rotation.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that bring an unhealthy endpoint back.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Http,
            path: "/health".into(),
            host: None,
            expected_status: [200, 399],
            interval: Dur::secs(5),
            timeout: Dur::secs(2),
            jitter: Dur(std::time::Duration::from_millis(0)),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// Passive health: consecutive connect failures or connect timeouts eject an endpoint for
/// a fixed period (nginx's `max_fails` / `fail_timeout`). On by default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthConfig {
    /// 0 turns passive ejection off.
    pub consecutive_failures: u32,
    pub ejection_time: Dur,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            consecutive_failures: 5,
            ejection_time: Dur::secs(10),
        }
    }
}

/// Outlier detection on responses (SPEC UP-5), Envoy's consecutive-5xx detector.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive 5xx responses (or resets) that eject an endpoint.
    pub consecutive_5xx: u32,
    /// First ejection lasts this long; each further ejection doubles it.
    pub base_ejection_time: Dur,
    pub max_ejection_time: Dur,
    /// Never eject more than this share of the pool at once.
    pub max_ejection_percent: u32,
    /// Eject when at least this share of an endpoint's attempts in `interval` failed; 0
    /// turns the failure-rate detector off.
    pub failure_percent: u32,
    /// The failure-rate detector judges an endpoint only with this many attempts.
    pub failure_min_requests: u32,
    /// The failure-rate and latency window.
    pub interval: Dur,
    /// Eject an endpoint whose mean response-head latency in `interval` is at least this
    /// percentage of the pool's median endpoint mean (300: three times); 0: off.
    pub latency_percent: u32,
    /// The latency detector judges an endpoint only with this many responses in `interval`.
    pub latency_min_requests: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 5,
            base_ejection_time: Dur::secs(30),
            max_ejection_time: Dur::secs(300),
            max_ejection_percent: 10,
            failure_percent: 0,
            failure_min_requests: 20,
            interval: Dur::secs(10),
            latency_percent: 0,
            latency_min_requests: 20,
        }
    }
}

/// A per-pool circuit breaker (SPEC UP-6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Opens when at least this share of the requests in `window` failed…
    pub error_percent: u32,
    /// …and the window holds at least this many requests.
    pub min_requests: u32,
    pub window: Dur,
    /// How long an open breaker refuses before it lets probes through (half-open).
    pub open_for: Dur,
    /// Requests admitted while half-open; when all succeed the breaker closes, one
    /// failure opens it again.
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            error_percent: 50,
            min_requests: 20,
            window: Dur::secs(10),
            open_for: Dur::secs(30),
            half_open_probes: 3,
        }
    }
}

/// Per-pool overload protection (SPEC UP-10): HAProxy's `maxconn` with `timeout queue`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConcurrencyConfig {
    /// Requests in flight to the pool at once (until their response body ends).
    pub max_concurrent: u32,
    /// Requests that may wait for a slot; beyond it they are refused at once.
    pub max_queue: u32,
    pub queue_timeout: Dur,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            max_concurrent: 100,
            max_queue: 100,
            queue_timeout: Dur::secs(1),
        }
    }
}

/// Where requests wait when every endpoint of a pool is at `max_connections_per_endpoint`
/// (SPEC UP-3): HAProxy's backend queue with `timeout queue`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionQueueConfig {
    /// Requests that may wait for an endpoint below its limit; beyond it they are refused.
    pub max_queue: u32,
    pub queue_timeout: Dur,
}

impl Default for ConnectionQueueConfig {
    fn default() -> Self {
        ConnectionQueueConfig {
            max_queue: 100,
            queue_timeout: Dur::secs(1),
        }
    }
}

/// What failures a retry may follow.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// TCP connect refused or timed out, TLS failed: the request never left the gateway.
    ConnectFailure,
    /// The connection failed after the request was sent, before a response head.
    Reset,
    /// No response head within `per_try_timeout`.
    PerTryTimeout,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// A status in `statuses`.
    RetriableStatus,
}

/// Per-route retries (SPEC UP-7).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first attempt; 0 turns retries off.
    pub max_retries: u32,
    pub on: Vec<RetryOn>,
    /// Statuses retried with `on = ["retriable_status"]`.
    pub statuses: Vec<u16>,
    /// Retry methods that are not idempotent (POST, PATCH, …) too. Connect failures are
    /// retried for every method: such a request never reached a backend.
    pub non_idempotent: bool,
    /// The response-head wait of one attempt; 0 means only the route's timeouts apply.
    pub per_try_timeout: Dur,
    /// Backoff before retry n is a random time in [0, min(max, base × 2ⁿ)] ("full jitter").
    pub backoff_base: Dur,
    pub backoff_max: Dur,
    /// Request bodies up to this size are buffered so they can be sent again; a larger or
    /// unknown-length body is streamed and its request is never retried after it was sent.
    pub max_replay_body: Size,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 1,
            on: vec![RetryOn::ConnectFailure],
            statuses: Vec::new(),
            non_idempotent: false,
            per_try_timeout: Dur::secs(0),
            backoff_base: Dur(std::time::Duration::from_millis(25)),
            backoff_max: Dur(std::time::Duration::from_millis(250)),
            max_replay_body: Size::kib(64),
        }
    }
}

/// Retries may not exceed `percent` of the requests a pool saw in the last `window`, plus
/// `min_retries` (Linkerd's retry budget), so retries cannot multiply an outage.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    pub percent: u32,
    pub min_retries: u32,
    pub window: Dur,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20,
            min_retries: 10,
            window: Dur::secs(10),
        }
    }
}

/// Hedged requests for safe reads (SPEC UP-8): when the first attempt has no response head
/// after the hedge delay, a second goes to another endpoint; the first good head wins.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// The fixed delay; with `percentile`, the delay used until enough samples exist.
    pub delay: Dur,
    /// Hedge after this percentile (1–99) of the pool's recent response-head latencies.
    pub percentile: Option<u32>,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            delay: Dur(std::time::Duration::from_millis(50)),
            percentile: None,
        }
    }
}
