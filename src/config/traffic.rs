//! Per-route traffic management and response filters in the config: weighted splits,
//! cohorts, the canary brake, mirroring (SPEC TRAFFIC-1..4), header transforms, CORS and
//! compression (SPEC POLICY-5, POLICY-6), with their defaults and semantic checks.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{Dur, HashConfig, HashOn, RouteConfig, Size};

/// Largest split weight; with at most `MAX_SPLIT_TARGETS` targets the sum fits easily.
pub const MAX_SPLIT_WEIGHT: u32 = 1_000_000;
pub const MAX_SPLIT_TARGETS: usize = 16;
/// Upper bounds that keep the mirror's memory bounded whatever the config says.
pub const MAX_MIRROR_BODY: u64 = 16 << 20;
pub const MAX_MIRROR_IN_FLIGHT: u32 = 10_000;

/// One pool of a weighted split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitTarget {
    pub pool: String,
    /// Relative share; 0 keeps the pool named (for cohorts) without random traffic.
    pub weight: u32,
}

/// Sends requests whose header or cookie has `value` to `pool`, before the weighted split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CohortRule {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
    pub value: String,
    pub pool: String,
}

/// The canary brake (SPEC TRAFFIC-3): the first split target is the baseline; every other
/// target whose error rate over `window` exceeds the baseline's by `factor` (with at least
/// `min_requests` on it) gets weight 0 until `cool_off` has passed or an operator resets it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrakeConfig {
    pub factor: f64,
    pub window: Dur,
    pub min_requests: u32,
    pub cool_off: Dur,
    /// The canary's error rate must also exceed this fraction (0.0–1.0), so a baseline
    /// with no errors does not make a single canary failure trip the brake.
    pub min_error_rate: f64,
}

impl Default for BrakeConfig {
    fn default() -> Self {
        BrakeConfig {
            factor: 2.0,
            window: Dur::secs(60),
            min_requests: 20,
            cool_off: Dur::secs(300),
            min_error_rate: 0.0,
        }
    }
}

/// Copies a share of requests to a shadow pool (SPEC TRAFFIC-4).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub pool: String,
    /// Share of requests mirrored, 0–100 (fractions allowed).
    pub percent: f64,
    /// Requests with a larger (or unknown-length) body are not mirrored.
    #[serde(default = "MirrorConfig::default_max_body")]
    pub max_body: Size,
    /// Mirror requests in flight at once for this route; more are dropped and counted.
    #[serde(default = "MirrorConfig::default_max_in_flight")]
    pub max_in_flight: u32,
    /// A mirror request (head and body) is abandoned after this long.
    #[serde(default = "MirrorConfig::default_timeout")]
    pub timeout: Dur,
}

impl MirrorConfig {
    fn default_max_body() -> Size {
        Size::kib(64)
    }
    fn default_max_in_flight() -> u32 {
        64
    }
    fn default_timeout() -> Dur {
        Dur::secs(5)
    }
}

/// Header edits: `remove` first, then `set` (replace), then `add` (append).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderTransform {
    pub add: BTreeMap<String, String>,
    pub set: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

impl HeaderTransform {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

/// Cross-origin resource sharing answered by the gateway (SPEC POLICY-6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// `*`, exact origins (`https://app.example.com`) or one-label-or-more wildcards
    /// (`https://*.example.com`).
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    /// Request headers allowed in preflights; `*` allows whatever is asked for.
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    /// `Access-Control-Max-Age`; none when zero.
    pub max_age: Dur,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allow_origins: Vec::new(),
            allow_methods: vec!["GET".into(), "HEAD".into(), "POST".into()],
            allow_headers: Vec::new(),
            expose_headers: Vec::new(),
            allow_credentials: false,
            max_age: Dur::secs(0),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Br,
    Zstd,
    Gzip,
}

impl Encoding {
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }
}

/// Response compression (SPEC POLICY-6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// In order of preference when the client accepts several with equal q-values.
    pub algorithms: Vec<Encoding>,
    /// Responses with a known `Content-Length` below this are sent as they are.
    pub min_size: Size,
    /// Media types compressed: exact (`application/json`) or a `type/*` family.
    pub types: Vec<String>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            algorithms: vec![Encoding::Br, Encoding::Zstd, Encoding::Gzip],
            min_size: Size::kib(1),
            types: [
                "text/*",
                "application/json",
                "application/javascript",
                "application/xml",
                "application/xhtml+xml",
                "application/rss+xml",
                "application/atom+xml",
                "application/wasm",
                "application/manifest+json",
                "application/x-ndjson",
                "image/svg+xml",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        }
    }
}

fn valid_header_name(name: &str) -> bool {
    http::HeaderName::from_bytes(name.as_bytes()).is_ok()
}

/// The checks for the traffic and response-filter fields of one route (`path` is
/// `routes[i]`); `pools` are the configured pool names.
pub fn validate_route(
    route: &RouteConfig,
    path: &str,
    pools: &HashSet<&str>,
) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut push = |field: String, message: String| errors.push((field, message));
    let known = |pool: &str| pools.contains(pool);

    if !route.split.is_empty() {
        if route.split.len() > MAX_SPLIT_TARGETS {
            push(
                format!("{path}.split"),
                format!("at most {MAX_SPLIT_TARGETS} pools"),
            );
        }
        let mut seen = HashSet::new();
        for (index, target) in route.split.iter().enumerate() {
            if !known(&target.pool) {
                push(
                    format!("{path}.split[{index}].pool"),
                    format!("unknown pool {:?}", target.pool),
                );
            }
            if !seen.insert(target.pool.as_str()) {
                push(
                    format!("{path}.split[{index}].pool"),
                    format!("pool {:?} is listed twice", target.pool),
                );
            }
            if target.weight > MAX_SPLIT_WEIGHT {
                push(
                    format!("{path}.split[{index}].weight"),
                    format!("must be at most {MAX_SPLIT_WEIGHT}"),
                );
            }
        }
        if route.split.iter().all(|target| target.weight == 0) {
            push(
                format!("{path}.split"),
                "needs at least one pool with a weight above 0".into(),
            );
        }
    }
    let split_only = |field: &str, push: &mut dyn FnMut(String, String)| {
        if route.split.is_empty() {
            push(format!("{path}.{field}"), "needs split".into());
        }
    };
    if let Some(hash) = &route.split_hash {
        split_only("split_hash", &mut push);
        if hash.on != HashOn::ClientIp && hash.name.as_deref().is_none_or(str::is_empty) {
            push(
                format!("{path}.split_hash.name"),
                "required for header and cookie".into(),
            );
        }
        if hash.on == HashOn::Header
            && !hash.name.as_deref().is_some_and(valid_header_name)
            && hash.name.as_deref().is_some_and(|n| !n.is_empty())
        {
            push(
                format!("{path}.split_hash.name"),
                "is not a valid header name".into(),
            );
        }
    }
    for (index, cohort) in route.cohorts.iter().enumerate() {
        let at = format!("{path}.cohorts[{index}]");
        if index == 0 {
            split_only("cohorts", &mut push);
        }
        match (&cohort.header, &cohort.cookie) {
            (Some(header), None) => {
                if !valid_header_name(header) {
                    push(format!("{at}.header"), "is not a valid header name".into());
                }
            }
            (None, Some(cookie)) => {
                if cookie.is_empty() {
                    push(format!("{at}.cookie"), "must not be empty".into());
                }
            }
            _ => push(at.clone(), "needs exactly one of header or cookie".into()),
        }
        if !route.split.iter().any(|target| target.pool == cohort.pool) {
            push(
                format!("{at}.pool"),
                format!("{:?} is not one of this route's split pools", cohort.pool),
            );
        }
    }
    if let Some(brake) = &route.brake {
        split_only("brake", &mut push);
        if route.split.len() < 2 && !route.split.is_empty() {
            push(
                format!("{path}.brake"),
                "needs a split with a baseline and at least one canary".into(),
            );
        }
        if !(brake.factor.is_finite() && brake.factor >= 1.0) {
            push(
                format!("{path}.brake.factor"),
                "must be at least 1.0".into(),
            );
        }
        if !(0.0..=1.0).contains(&brake.min_error_rate) {
            push(
                format!("{path}.brake.min_error_rate"),
                "must be between 0.0 and 1.0".into(),
            );
        }
        if brake.window.0.as_millis() < 10 {
            push(
                format!("{path}.brake.window"),
                "must be at least 10ms".into(),
            );
        }
        if brake.min_requests == 0 {
            push(
                format!("{path}.brake.min_requests"),
                "must be at least 1".into(),
            );
        }
        if brake.cool_off.0.is_zero() {
            push(
                format!("{path}.brake.cool_off"),
                "must be greater than zero".into(),
            );
        }
    }
    if let Some(mirror) = &route.mirror {
        if !known(&mirror.pool) {
            push(
                format!("{path}.mirror.pool"),
                format!("unknown pool {:?}", mirror.pool),
            );
        }
        if !(mirror.percent.is_finite() && (0.0..=100.0).contains(&mirror.percent)) {
            push(
                format!("{path}.mirror.percent"),
                "must be between 0 and 100".into(),
            );
        }
        if mirror.max_body.0 > MAX_MIRROR_BODY {
            push(
                format!("{path}.mirror.max_body"),
                format!("must be at most {MAX_MIRROR_BODY} bytes"),
            );
        }
        if mirror.max_in_flight == 0 || mirror.max_in_flight > MAX_MIRROR_IN_FLIGHT {
            push(
                format!("{path}.mirror.max_in_flight"),
                format!("must be between 1 and {MAX_MIRROR_IN_FLIGHT}"),
            );
        }
        if mirror.timeout.0.is_zero() {
            push(
                format!("{path}.mirror.timeout"),
                "must be greater than zero".into(),
            );
        }
    }
    for (field, transform) in [
        ("request_headers", &route.request_headers),
        ("response_headers", &route.response_headers),
    ] {
        let Some(transform) = transform else { continue };
        for (index, name) in transform.remove.iter().enumerate() {
            if !valid_header_name(name) {
                push(
                    format!("{path}.{field}.remove[{index}]"),
                    format!("{name:?} is not a valid header name"),
                );
            }
        }
        for (kind, map) in [("add", &transform.add), ("set", &transform.set)] {
            for (name, template) in map {
                let at = format!("{path}.{field}.{kind}.{name}");
                if !valid_header_name(name) {
                    push(at.clone(), format!("{name:?} is not a valid header name"));
                }
                if let Err(message) = crate::policy::transform::Template::parse(template) {
                    push(at, message);
                }
            }
        }
    }
    if let Some(cors) = &route.cors {
        let at = format!("{path}.cors");
        if cors.allow_origins.is_empty() {
            push(
                format!("{at}.allow_origins"),
                "must name at least one origin or \"*\"".into(),
            );
        }
        for (index, origin) in cors.allow_origins.iter().enumerate() {
            if let Err(message) = crate::policy::cors::check_origin_pattern(origin) {
                push(format!("{at}.allow_origins[{index}]"), message);
            }
        }
        for (index, method) in cors.allow_methods.iter().enumerate() {
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                push(
                    format!("{at}.allow_methods[{index}]"),
                    format!("{method:?} is not a method"),
                );
            }
        }
        for (list, names) in [
            ("allow_headers", &cors.allow_headers),
            ("expose_headers", &cors.expose_headers),
        ] {
            for (index, name) in names.iter().enumerate() {
                if name != "*" && !valid_header_name(name) {
                    push(
                        format!("{at}.{list}[{index}]"),
                        format!("{name:?} is not a valid header name"),
                    );
                }
            }
        }
    }
    if let Some(compression) = &route.compression {
        let at = format!("{path}.compression");
        if compression.algorithms.is_empty() {
            push(
                format!("{at}.algorithms"),
                "must list at least one of \"br\", \"zstd\", \"gzip\"".into(),
            );
        }
        let mut seen = HashSet::new();
        for (index, algorithm) in compression.algorithms.iter().enumerate() {
            if !seen.insert(*algorithm) {
                push(
                    format!("{at}.algorithms[{index}]"),
                    format!("{:?} is listed twice", algorithm.token()),
                );
            }
        }
        for (index, media) in compression.types.iter().enumerate() {
            let ok = media
                .split_once('/')
                .is_some_and(|(kind, sub)| !kind.is_empty() && !sub.is_empty() && kind != "*");
            if !ok {
                push(
                    format!("{at}.types[{index}]"),
                    format!("{media:?} is not a media type like \"text/html\" or \"text/*\""),
                );
            }
        }
    }
    errors
}

/// Whether a route forwards (to a pool or a split).
pub fn forwards(route: &RouteConfig) -> bool {
    route.pool.is_some() || !route.split.is_empty()
}

/// `HashConfig` is shared with the pool balancer; re-exported here for the split.
pub type SplitHash = HashConfig;
