//! The configuration schema: every field an operator can write, with its default.
//!
//! This room owns the serde types, loading from TOML / JSON / `GATEHOUSE_*` environment
//! overrides (`load`), and validation that reports every mistake with its field path
//! (`validate`). It never touches sockets or registries; `snapshot::compile` turns a
//! validated `Config` into what the data plane runs.

pub mod firewall;
mod load;
pub mod policy;
pub mod resilience;
pub mod tls;
pub mod traffic;
pub mod units;
mod validate;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use firewall::{FirewallConfig, FirewallMode, RateLimitConfig};
pub use load::{load_file, parse_str, ConfigError, ConfigErrors, Format};
pub use resilience::{
    CircuitBreakerConfig, ConcurrencyConfig, ConnectionQueueConfig, HashConfig, HashOn,
    HealthCheckConfig, HealthCheckKind, HedgeConfig, OutlierConfig, PassiveHealthConfig,
    RetryBudgetConfig, RetryConfig, RetryOn,
};
pub use tls::{
    AcmeCertificate, AcmeChallenge, AcmeConfig, CertificateConfig, ClientAuthConfig,
    ClientAuthMode, ListenerTls, PassthroughRoute, PlaintextAction, ProxyProtocolReceive,
    ProxyProtocolVersion, RedirectHttpsConfig, TcpListenerConfig, TlsConfig, TlsVersion,
    UnknownSni, UpstreamTls,
};
pub use traffic::{
    BrakeConfig, CohortRule, CompressionConfig, CorsConfig, Encoding, HeaderTransform,
    MirrorConfig, SplitTarget,
};
pub use units::{Dur, Size};

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Runtime worker threads; `None` means one per CPU core.
    pub workers: Option<usize>,
    /// How long SIGTERM waits for in-flight requests and streams before exiting.
    pub drain_timeout: DrainTimeout,
    pub log: LogConfig,
    pub access_log: AccessLogConfig,
    /// Prometheus metrics (SPEC OPS-1): on the admin listener and/or their own.
    pub metrics: MetricsConfig,
    /// W3C trace context propagation (SPEC OPS-3).
    pub tracing: TracingConfig,
    pub http: HttpConfig,
    /// Certificates for TLS listeners (SPEC TLS-2).
    pub tls: TlsConfig,
    /// Certificates obtained automatically (SPEC TLS-3).
    pub acme: Option<AcmeConfig>,
    /// Connection firewall for every listener (SPEC CONN-6); listeners add their own.
    pub firewall: FirewallConfig,
    /// How often certificate, key and GeoIP database files are checked for changes (by
    /// modification time and size); a change is loaded without a restart. 0 turns the
    /// watch off (SIGHUP and the admin API still reload).
    pub watch_interval: WatchInterval,
    /// A built-in demo upstream started by the gateway itself, so an example config shows a
    /// real proxy hop with nothing else installed.
    pub demo: Option<DemoConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    pub routes: Vec<RouteConfig>,
    /// Where config versions and the audit log are kept, and whether the file or the store
    /// wins at start (SPEC CTRL-3). A bootstrap setting: read from the file only.
    pub store: StoreConfig,
    /// The admin API listener (SPEC CTRL-4); none when absent. A bootstrap setting.
    pub admin: Option<AdminConfig>,
    /// Signed config bundles: trusted keys and whether signatures are required (SPEC
    /// CTRL-8). A bootstrap setting. Left out of the stored JSON when default, so configs
    /// stored before bundles existed keep their hashes.
    #[serde(skip_serializing_if = "BundlesConfig::is_default")]
    pub bundles: BundlesConfig,
    /// Pull mode: fetch the latest bundle from a URL on an interval (SPEC CTRL-8). A
    /// bootstrap setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullConfig>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct DrainTimeout(pub Dur);

impl Default for DrainTimeout {
    fn default() -> Self {
        DrainTimeout(Dur::secs(30))
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct WatchInterval(pub Dur);

impl Default for WatchInterval {
    fn default() -> Self {
        WatchInterval(Dur::secs(5))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter for diagnostic logs on stderr, e.g. `"info"` or `"gatehouse=debug"`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    pub enabled: bool,
    /// A file path, or `"stdout"`.
    pub path: String,
    /// `json` (one object per line) or `logfmt` (`key=value` pairs).
    pub format: AccessLogFormat,
    /// Query parameters whose values are replaced by `REDACTED` in the logged query
    /// (names compared case-insensitively, after percent-decoding).
    pub redact_query: Vec<String>,
    /// Lines buffered between the request path and the writer; when full, lines are
    /// dropped and counted rather than blocking requests.
    pub buffer_lines: usize,
}

/// The default `access_log.redact_query`: parameter names that commonly carry secrets.
pub const DEFAULT_REDACTED_QUERY: [&str; 8] = [
    "access_token",
    "api_key",
    "apikey",
    "password",
    "secret",
    "signature",
    "token",
    "x-amz-signature",
];

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            path: "stdout".into(),
            format: AccessLogFormat::Json,
            redact_query: DEFAULT_REDACTED_QUERY.map(String::from).to_vec(),
            buffer_lines: 65_536,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Logfmt,
}

/// Prometheus metrics (SPEC OPS-1).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` (on the admin listener, and on `bind` when set).
    pub enabled: bool,
    /// An extra plain-HTTP listener (`ip:port`) that serves only `/metrics` (and
    /// `/healthz`), e.g. for a Prometheus that must not reach the admin API. Bound at start.
    pub bind: Option<String>,
    /// Require a bearer token (any `admin.tokens` entry, read scope is enough) for
    /// `/metrics`. Off by default: metrics carry no secrets and scrapers are often
    /// configured without credentials.
    pub require_token: bool,
    /// Distinct (route, pool) label sets; more fold into `route="other"`.
    pub max_routes: usize,
    /// Distinct (pool, endpoint) label sets; more fold into `endpoint="other"`.
    pub max_endpoints: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            bind: None,
            require_token: false,
            max_routes: crate::telemetry::metrics::DEFAULT_MAX_ROUTES,
            max_endpoints: crate::telemetry::metrics::DEFAULT_MAX_ENDPOINTS,
        }
    }
}

/// W3C Trace Context (SPEC OPS-3).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Send a `traceparent` upstream on every forwarded request: the client's trace
    /// continued, or a new one.
    pub enabled: bool,
    /// The share of new traces marked sampled (0.0–1.0). A continued trace keeps the
    /// caller's decision.
    pub sample_ratio: f64,
    /// Export the spans of sampled requests over OTLP/HTTP (JSON) to this URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces`. None: no export. Set at start.
    pub otlp_endpoint: Option<String>,
    /// The OTLP/HTTP encoding: `http/json` or `http/protobuf`.
    pub otlp_protocol: OtlpProtocol,
    /// For an `https://` endpoint: PEM bundle of CAs to verify the collector against;
    /// none: the system's roots.
    pub otlp_ca: Option<String>,
    /// How often queued spans are sent.
    pub export_interval: Dur,
}

/// How spans are encoded for the collector (OTLP/HTTP allows both).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/json")]
    HttpJson,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            enabled: false,
            sample_ratio: 1.0,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpJson,
            otlp_ca: None,
            export_interval: Dur::secs(1),
        }
    }
}

/// Global HTTP behaviour: forwarding headers and request ids (SPEC HTTP-6, HTTP-7).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub x_forwarded_for: XffMode,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    pub request_id_header: String,
    /// Add an RFC 7239 `Forwarded` header upstream.
    pub add_forwarded: bool,
    /// Add `Via: <proto> gatehouse` both ways.
    pub add_via: bool,
    /// Remove the upstream's `Server` header from responses.
    pub hide_upstream_server: bool,
    /// A rate limit every request shares, ahead of the routes' own (SPEC POLICY-1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<policy::RequestRateLimitConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            x_forwarded_for: XffMode::Append,
            trusted_proxies: Vec::new(),
            request_id_header: "x-request-id".into(),
            add_forwarded: false,
            add_via: false,
            hide_upstream_server: false,
            rate_limit: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XffMode {
    /// Keep the incoming chain from trusted proxies and append the peer address.
    Append,
    /// Send only the client address the gateway determined.
    Replace,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    pub bind: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    /// `ip:port`; `0.0.0.0` / `[::]` must be written out to listen on every address.
    pub bind: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Set `SO_REUSEPORT` so several processes (or an upgrade) can share the port.
    #[serde(default)]
    pub reuse_port: bool,
    /// L4 relays (TCP listener, TLS passthrough) move bytes with `splice(2)` through a pipe
    /// per direction instead of a 64 KiB buffer (HAProxy's `option splice-auto`). Off by
    /// default: measured slower on loopback (docs/BENCHMARKS.md).
    #[serde(default)]
    pub splice: bool,
    /// 0 means unlimited.
    #[serde(default)]
    pub max_connections: u32,
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Checked after the global `firewall`, on the real client address.
    #[serde(default)]
    pub firewall: Option<FirewallConfig>,
    /// Accept a PROXY protocol header from these peers (SPEC CONN-4).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolReceive>,
    /// Required when `protocol = "tls"`.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Required when `protocol = "tcp"`.
    #[serde(default)]
    pub tcp: Option<TcpListenerConfig>,
    /// On an `http` listener: answer every request with a redirect to `https://`.
    #[serde(default)]
    pub redirect_https: Option<RedirectHttpsConfig>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.x and HTTP/2 with prior knowledge (h2c) on the same port.
    #[default]
    Http,
    /// TLS: SNI passthrough and termination on one port.
    Tls,
    /// Raw TCP relayed to a pool.
    Tcp,
}

/// Per-listener limits against slow and abusive clients (SPEC HTTP-9, CONN-9).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    /// A client must send a whole request header block within this time.
    pub request_header_timeout: Dur,
    /// Largest request header block (HTTP/1) or header list (HTTP/2).
    pub max_request_header_bytes: Size,
    /// Most header fields in one HTTP/1 request.
    pub max_request_headers: usize,
    pub max_uri_bytes: Size,
    /// Close a keep-alive connection after this many requests; 0 means unlimited.
    pub max_requests_per_connection: u64,
    /// Default request body limit for routes that set none; 0 means unlimited.
    pub max_request_body: Size,
    pub h2_max_concurrent_streams: u32,
    pub h2_initial_stream_window: Size,
    pub h2_initial_connection_window: Size,
    /// Maximum pending reset streams a client may cause before the connection is closed
    /// (rapid-reset protection).
    pub h2_max_pending_reset_streams: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            request_header_timeout: Dur::secs(10),
            max_request_header_bytes: Size::kib(64),
            max_request_headers: 100,
            max_uri_bytes: Size::kib(8),
            max_requests_per_connection: 0,
            max_request_body: Size(0),
            h2_max_concurrent_streams: 256,
            h2_initial_stream_window: Size::kib(1024),
            h2_initial_connection_window: Size::kib(4096),
            h2_max_pending_reset_streams: 64,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub balancer: BalancerKind,
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default = "PoolConfig::default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Idle keep-alive connections kept per endpoint (HTTP/1.1).
    #[serde(default = "PoolConfig::default_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// An idle pooled connection older than this is closed instead of reused.
    #[serde(default = "PoolConfig::default_idle_timeout")]
    pub idle_timeout: Dur,
    /// HTTP/1.1 upstream connections are closed after this many requests; 0: unlimited.
    #[serde(default)]
    pub max_requests_per_connection: u32,
    /// Upstream connections older than this take no new requests; 0: unlimited.
    #[serde(default)]
    pub max_connection_lifetime: Dur,
    /// Connect to endpoints over TLS (SPEC TLS-5); required for `protocol = "h2"`.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// Send a PROXY protocol header first on every new upstream connection. Such
    /// connections carry one client's address, so they are reused only for that client.
    #[serde(default)]
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// The key for `balancer = "consistent_hash"`.
    #[serde(default)]
    pub hash: Option<HashConfig>,
    /// Active health checks; none when absent.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Ejection after consecutive connect failures; on by default.
    #[serde(default)]
    pub passive_health: PassiveHealthConfig,
    /// Ejection of endpoints that answer 5xx; off when absent.
    #[serde(default)]
    pub outlier_detection: Option<OutlierConfig>,
    /// Off when absent.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Concurrency limit with a bounded wait queue; unlimited when absent.
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    /// Caps the retries of every route forwarding to this pool.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// When fewer than this percentage of the non-draining endpoints are available, balance
    /// over all of them instead (panic mode); 0 turns panic mode off.
    #[serde(default = "PoolConfig::default_panic_threshold")]
    pub panic_threshold: u32,
    /// Endpoints named by host name are resolved again this often; when the addresses
    /// change, pooled connections are retired. 0: resolve per new connection only.
    #[serde(default = "PoolConfig::default_dns_refresh")]
    pub dns_refresh: Dur,
    /// At most this many requests in flight to one endpoint, and (HTTP/1.1) open
    /// connections to it; 0: unlimited (SPEC UP-3, HAProxy's per-server `maxconn`).
    #[serde(default)]
    pub max_connections_per_endpoint: u32,
    /// The wait when every endpoint is at `max_connections_per_endpoint`.
    #[serde(default)]
    pub connection_queue: ConnectionQueueConfig,
}

impl PoolConfig {
    fn default_panic_threshold() -> u32 {
        50
    }
    fn default_dns_refresh() -> Dur {
        Dur::secs(30)
    }
    fn default_connect_timeout() -> Dur {
        Dur::secs(5)
    }
    fn default_max_idle() -> usize {
        64
    }
    fn default_idle_timeout() -> Dur {
        Dur::secs(60)
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP; one multiplexed connection per endpoint.
    H2c,
    /// HTTP/2 over TLS (needs `tls`); one multiplexed connection per endpoint.
    H2,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Smooth weighted round robin (nginx's algorithm).
    #[default]
    RoundRobin,
    /// Power of two choices: of two random endpoints, the one with fewer requests in
    /// flight relative to its weight.
    LeastRequest,
    /// Uniformly random, weighted.
    Random,
    /// A hash ring over `hash.on` (client IP, a header or a cookie).
    ConsistentHash,
}

/// An endpoint: `"host:port"`, or a table with a weight.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(
    untagged,
    expecting = "expected an endpoint: \"host:port\" or a table with `address` and `weight`"
)]
pub enum EndpointConfig {
    Address(String),
    Weighted {
        address: String,
        #[serde(default = "EndpointConfig::default_weight")]
        weight: u32,
        /// Take no new requests; requests in flight finish.
        #[serde(default)]
        drain: bool,
    },
}

impl EndpointConfig {
    fn default_weight() -> u32 {
        1
    }

    pub fn address(&self) -> &str {
        match self {
            EndpointConfig::Address(address) | EndpointConfig::Weighted { address, .. } => address,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            EndpointConfig::Address(_) => 1,
            EndpointConfig::Weighted { weight, .. } => *weight,
        }
    }

    pub fn draining(&self) -> bool {
        matches!(self, EndpointConfig::Weighted { drain: true, .. })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in logs and metrics; defaults to `route<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Higher wins before specificity and config order are considered.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Forward to this pool. Exactly one of `pool`, `redirect`, `direct_response`.
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub redirect: Option<RedirectConfig>,
    #[serde(default)]
    pub direct_response: Option<DirectResponseConfig>,
    /// Remove this prefix from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Replace the matched `path_prefix` with this value.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    #[serde(default)]
    pub rewrite_regex: Option<RegexRewriteConfig>,
    /// Send this `Host` upstream instead of the client's.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Keep the client's `Host` (true) or use the endpoint address (false).
    #[serde(default = "RouteConfig::default_preserve_host")]
    pub preserve_host: bool,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// Overrides the listener's `max_request_body`; 0 means unlimited.
    #[serde(default)]
    pub max_request_body: Option<Size>,
    /// Refuse (403) requests on connections without a verified client certificate
    /// (SPEC TLS-4; the listener's `tls.client_auth` verifies it).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Retries of failed attempts (SPEC UP-7).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Hedged attempts for GET and HEAD (SPEC UP-8); off when absent.
    #[serde(default)]
    pub hedge: Option<HedgeConfig>,
    /// Request rate limit (SPEC POLICY-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<policy::RequestRateLimitConfig>,
    /// Ordered L7 rules; the first match decides (SPEC POLICY-2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<policy::PolicyRuleConfig>,
    /// JWT bearer authentication (SPEC POLICY-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<policy::JwtConfig>,
    /// Basic authentication (SPEC POLICY-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<policy::BasicAuthConfig>,
    /// External authorization (SPEC POLICY-4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_authz: Option<policy::ExtAuthzConfig>,
    /// Weighted split between pools (SPEC TRAFFIC-1); exclusive with `pool`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitTarget>,
    /// Keeps a user on one split pool by a consistent hash of a key (SPEC TRAFFIC-2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_hash: Option<HashConfig>,
    /// Header or cookie values that pick a split pool, checked first (SPEC TRAFFIC-2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cohorts: Vec<CohortRule>,
    /// The canary brake over the split (SPEC TRAFFIC-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brake: Option<BrakeConfig>,
    /// Copies a share of requests to a shadow pool (SPEC TRAFFIC-4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorConfig>,
    /// Header edits on the upstream request (SPEC POLICY-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderTransform>,
    /// Header edits on the response to the client (SPEC POLICY-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderTransform>,
    /// CORS answered by the gateway (SPEC POLICY-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsConfig>,
    /// Response compression (SPEC POLICY-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionConfig>,
    /// A breaker for this route's traffic to its pool, instead of the pool's (SPEC UP-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
}

impl RouteConfig {
    fn default_preserve_host() -> bool {
        true
    }
}

/// All conditions present are AND-ed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Exact names or `*.example.com` wildcards; case- and port-insensitive. Empty: any host.
    pub hosts: Vec<String>,
    /// Exact path.
    pub path: Option<String>,
    /// Path prefix matched on segment boundaries: `/api` matches `/api` and `/api/x`, not `/apix`.
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Vec<String>,
    pub headers: Vec<ValueMatchConfig>,
    pub query: Vec<ValueMatchConfig>,
    pub source_cidrs: Vec<IpNet>,
}

/// A header or query parameter condition: exactly one of `value`, `regex`, `present`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValueMatchConfig {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: must be present; `false`: must be absent.
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    #[serde(default = "RedirectConfig::default_status")]
    pub status: u16,
    /// Template with `{scheme}`, `{host}`, `{path}`, `{query}` (with its `?`) and `{request_uri}`.
    pub location: String,
}

impl RedirectConfig {
    fn default_status() -> u16 {
        308
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseConfig {
    #[serde(default = "DirectResponseConfig::default_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "DirectResponseConfig::default_content_type")]
    pub content_type: String,
}

impl DirectResponseConfig {
    fn default_status() -> u16 {
        200
    }
    fn default_content_type() -> String {
        "text/plain; charset=utf-8".into()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteConfig {
    pub pattern: String,
    /// Replacement with `$1` / `${name}` capture references.
    pub replacement: String,
}

/// Upstream timeouts for one route (SPEC UP-9).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteTimeouts {
    /// Longest wait for the response header block, counted from the request body's last
    /// progress: a slow upload is never cut off by it, only an upstream that goes silent.
    pub response_header: Dur,
    /// Longest silence between two body chunks in either direction.
    pub idle: Dur,
    /// The whole exchange, until the response body ends; 0 means none.
    pub request: Dur,
}

impl Default for RouteTimeouts {
    fn default() -> Self {
        RouteTimeouts {
            response_header: Dur::secs(60),
            idle: Dur::secs(300),
            request: Dur::secs(0),
        }
    }
}

/// The embedded config store (SPEC CTRL-3).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite file, created on first start; relative paths are relative to the config
    /// file's directory.
    pub path: String,
    pub mode: StoreMode,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: "gatehouse.db".into(),
            mode: StoreMode::File,
        }
    }
}

/// Which source of configuration wins at start and what SIGHUP does.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// The file is the source of truth: at start and on SIGHUP it is applied (and stored
    /// as a new version when it differs from the newest one).
    #[default]
    File,
    /// The store is the source of truth: at start the newest stored version runs (the file
    /// only seeds an empty store), and SIGHUP is refused.
    Store,
}

/// Signed config bundles (SPEC CTRL-8).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BundlesConfig {
    /// Refuse bundles without a valid signature by a trusted key.
    pub require_signature: bool,
    /// Ed25519 public keys whose signatures are accepted.
    pub trusted_keys: Vec<TrustedKey>,
}

impl BundlesConfig {
    fn is_default(&self) -> bool {
        *self == BundlesConfig::default()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// Shown in logs and the audit message.
    pub name: String,
    /// The 32-byte public key in standard base64 (the `.pub` file of `gatehouse bundle
    /// keygen`).
    pub public_key: String,
}

/// Pull mode (SPEC CTRL-8).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PullConfig {
    /// `http://` or `https://` URL of the latest bundle.
    pub url: String,
    #[serde(default = "PullConfig::default_interval")]
    pub interval: Dur,
    /// For the whole fetch: connect, TLS, headers and body.
    #[serde(default = "PullConfig::default_timeout")]
    pub timeout: Dur,
    /// Largest bundle accepted.
    #[serde(default = "PullConfig::default_max_size")]
    pub max_size: Size,
    /// CA bundle (PEM) that verifies an `https` server; the system's roots when absent.
    #[serde(default)]
    pub ca: Option<String>,
}

impl PullConfig {
    fn default_interval() -> Dur {
        Dur::secs(30)
    }

    fn default_timeout() -> Dur {
        Dur::secs(10)
    }

    fn default_max_size() -> Size {
        Size(8 << 20)
    }
}

/// The admin API (SPEC CTRL-4, CTRL-5).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` of the admin listener, separate from every data-plane listener.
    pub bind: String,
    /// Bearer tokens, stored as SHA-256 hashes. Required unless `bind` is a loopback
    /// address or `tls.client_ca` is set; with neither, every request on the admin listener
    /// is allowed.
    #[serde(default)]
    pub tokens: Vec<AdminToken>,
    /// Serve the admin API over TLS (TCP `bind` only); with `client_ca`, mutual TLS.
    #[serde(default)]
    pub tls: Option<AdminTls>,
}

/// TLS for the admin listener (SPEC CTRL-5).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    /// Certificate chain (PEM), relative to the config file's directory.
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
    /// CA bundle (PEM): clients must present a certificate it issued. Without tokens, such
    /// a certificate alone grants the admin scope; with tokens, both are required.
    #[serde(default)]
    pub client_ca: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Recorded as the actor in the audit log.
    pub name: String,
    /// Lower-case hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    pub scope: AdminScope,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AdminScope {
    /// GET endpoints only.
    Read,
    /// Everything, including changes.
    Admin,
}
