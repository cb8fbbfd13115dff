//! Traffic management between pools (SPEC TRAFFIC-1..4): the compiled weighted split with
//! cohorts and consistent hashing (`Split`), the canary brake, and mirroring to a shadow
//! pool (`mirror.rs`). State that must outlive a config swap — the brake's window and
//! whether it is engaged, the mirror's in-flight bound, the counters — lives in the
//! `TrafficRegistry`, keyed by route and pool name, like the upstream registry's breakers.

pub mod mirror;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{BrakeConfig, Config, HashOn, RouteConfig};
use crate::upstream::Pool;

/// Brake events kept for the admin API.
const MAX_EVENTS: usize = 64;
/// Buckets of the brake's sliding window.
const BUCKETS: usize = 10;
/// Longest cookie header scanned for a cohort or hash cookie.
const MAX_COOKIE_SCAN: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("{path}: unknown pool {pool:?}")]
    UnknownPool { path: String, pool: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Where a key for cohorts and hashing comes from.
#[derive(Debug)]
enum Key {
    Header(HeaderName),
    Cookie(String),
    ClientIp,
}

impl Key {
    /// The key's value in this request; none when absent.
    fn read<'a>(&self, headers: &'a HeaderMap, client_ip: IpAddr) -> Option<KeyValue<'a>> {
        match self {
            Key::Header(name) => headers.get(name).map(|v| KeyValue::Bytes(v.as_bytes())),
            Key::Cookie(name) => cookie(headers, name).map(KeyValue::Bytes),
            Key::ClientIp => Some(KeyValue::Ip(client_ip)),
        }
    }
}

enum KeyValue<'a> {
    Bytes(&'a [u8]),
    Ip(IpAddr),
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter(|value| value.len() <= MAX_COOKIE_SCAN)
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// A fixed hasher: the same key maps to the same pool in every process and after restarts.
fn stable_hash(value: &KeyValue<'_>) -> u64 {
    let mut hasher = foldhash::fast::FixedState::with_seed(0x6761_7465_686f_7573).build_hasher();
    match value {
        KeyValue::Bytes(bytes) => bytes.hash(&mut hasher),
        KeyValue::Ip(ip) => ip.hash(&mut hasher),
    }
    hasher.finish()
}

/// Scales a 64-bit hash onto `[0, total)` (multiply-shift keeps the order of hashes, so
/// each target owns a contiguous slice of the hash space).
fn hash_point(hash: u64, total: u64) -> u64 {
    ((u128::from(hash) * u128::from(total)) >> 64) as u64
}

/// The target whose range holds `point`, the ranges laid out in config order: raising a
/// later target's weight moves only the keys at the boundary, the rest keep their pool.
fn range_of(weights: &[u64], point: u64) -> usize {
    let mut upto = 0;
    for (index, weight) in weights.iter().enumerate() {
        upto += weight;
        if point < upto {
            return index;
        }
    }
    0
}

struct Cohort {
    key: Key,
    value: Vec<u8>,
    target: usize,
}

/// One pool of a compiled split.
pub struct Target {
    pub pool: Arc<Pool>,
    pub weight: u32,
    pub state: Arc<TargetState>,
}

/// A compiled `split` with its cohorts, hash key and brake.
pub struct Split {
    pub route: Arc<str>,
    pub targets: Vec<Target>,
    cohorts: Vec<Cohort>,
    hash: Option<Key>,
    brake: Option<BrakeConfig>,
    registry: Arc<TrafficShared>,
}

impl Split {
    pub fn compile(
        route_name: &Arc<str>,
        route: &RouteConfig,
        path: &str,
        pools: &HashMap<String, Arc<Pool>>,
        registry: &TrafficRegistry,
    ) -> Result<Option<Split>, TrafficError> {
        if route.split.is_empty() {
            return Ok(None);
        }
        let invalid = |path: String, message: &str| TrafficError::Invalid {
            path,
            message: message.into(),
        };
        let mut targets = Vec::with_capacity(route.split.len());
        for (index, target) in route.split.iter().enumerate() {
            let pool = pools
                .get(&target.pool)
                .ok_or_else(|| TrafficError::UnknownPool {
                    path: format!("{path}.split[{index}].pool"),
                    pool: target.pool.clone(),
                })?;
            targets.push(Target {
                pool: pool.clone(),
                weight: target.weight,
                state: registry.target(route_name, &target.pool),
            });
        }
        let mut cohorts = Vec::with_capacity(route.cohorts.len());
        for (index, rule) in route.cohorts.iter().enumerate() {
            let at = format!("{path}.cohorts[{index}]");
            let key = match (&rule.header, &rule.cookie) {
                (Some(header), None) => Key::Header(
                    HeaderName::from_bytes(header.as_bytes())
                        .map_err(|_| invalid(format!("{at}.header"), "is not a header name"))?,
                ),
                (None, Some(cookie)) => Key::Cookie(cookie.clone()),
                _ => return Err(invalid(at, "needs exactly one of header or cookie")),
            };
            let target = route
                .split
                .iter()
                .position(|t| t.pool == rule.pool)
                .ok_or_else(|| invalid(format!("{at}.pool"), "is not a split pool"))?;
            cohorts.push(Cohort {
                key,
                value: rule.value.as_bytes().to_vec(),
                target,
            });
        }
        let hash = match &route.split_hash {
            None => None,
            Some(hash) => Some(match hash.on {
                HashOn::ClientIp => Key::ClientIp,
                HashOn::Header => Key::Header(
                    hash.name
                        .as_deref()
                        .and_then(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                        .ok_or_else(|| {
                            invalid(format!("{path}.split_hash.name"), "is not a header name")
                        })?,
                ),
                HashOn::Cookie => Key::Cookie(hash.name.clone().ok_or_else(|| {
                    invalid(format!("{path}.split_hash.name"), "required for cookie")
                })?),
            }),
        };
        Ok(Some(Split {
            route: route_name.clone(),
            targets,
            cohorts,
            hash,
            brake: route.brake.clone(),
            registry: registry.shared.clone(),
        }))
    }

    /// The target for this request: a matching cohort first, then the weighted choice —
    /// by the hash key when configured (so one user stays on one pool while the weights
    /// stay the same), else at random. A braked canary's weight is 0. With every weight
    /// at 0 the first target (the baseline) serves.
    pub fn choose(&self, headers: &HeaderMap, client_ip: IpAddr) -> usize {
        let now = self.registry.now_ms();
        for cohort in &self.cohorts {
            if let Some(KeyValue::Bytes(value)) = cohort.key.read(headers, client_ip) {
                if value == cohort.value.as_slice() && !self.braked(cohort.target, now) {
                    return cohort.target;
                }
            }
        }
        let mut weights = [0u64; crate::config::traffic::MAX_SPLIT_TARGETS];
        let mut total = 0u64;
        for (index, target) in self.targets.iter().enumerate() {
            let weight = if self.braked(index, now) {
                0
            } else {
                u64::from(target.weight)
            };
            weights[index] = weight;
            total += weight;
        }
        if total == 0 {
            return 0;
        }
        let point = match self
            .hash
            .as_ref()
            .and_then(|key| key.read(headers, client_ip))
        {
            Some(value) => hash_point(stable_hash(&value), total),
            None => fastrand::u64(..total),
        };
        range_of(&weights[..self.targets.len()], point)
    }

    /// Whether target `index`'s brake is engaged now; releases it once the cool-off has
    /// passed (logged, and its window cleared so old errors do not trip it again at once).
    fn braked(&self, index: usize, now_ms: u64) -> bool {
        let state = &self.targets[index].state;
        let until = state.braked_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now_ms < until {
            return true;
        }
        if state
            .braked_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            state.window.lock().clear();
            tracing::warn!(route = %self.route, pool = %self.targets[index].pool.name, "canary brake released after cool-off");
            self.registry.event(
                &self.route,
                &self.targets[index].pool.name,
                "released",
                None,
            );
        }
        false
    }

    /// Records the outcome of a request sent to target `index` and checks the brake.
    pub fn record(&self, index: usize, failed: bool) {
        let Some(target) = self.targets.get(index) else {
            return;
        };
        target.state.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            target.state.errors.fetch_add(1, Ordering::Relaxed);
        }
        let Some(brake) = &self.brake else {
            return;
        };
        let now = Instant::now();
        let (canary_requests, canary_errors) =
            target
                .state
                .window
                .lock()
                .record(now, brake.window.0, failed);
        if index == 0 || target.state.braked_until.load(Ordering::Relaxed) != 0 {
            return;
        }
        if canary_requests < u64::from(brake.min_requests) {
            return;
        }
        let (base_requests, base_errors) = self.targets[0]
            .state
            .window
            .lock()
            .totals(now, brake.window.0);
        let canary_rate = canary_errors as f64 / canary_requests as f64;
        let base_rate = if base_requests == 0 {
            0.0
        } else {
            base_errors as f64 / base_requests as f64
        };
        if canary_rate > brake.factor * base_rate && canary_rate > brake.min_error_rate {
            let until = self
                .registry
                .now_ms()
                .saturating_add(u64::try_from(brake.cool_off.0.as_millis()).unwrap_or(u64::MAX))
                .max(1);
            if target
                .state
                .braked_until
                .compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                target.state.trips.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    route = %self.route,
                    pool = %target.pool.name,
                    canary_error_rate = canary_rate,
                    baseline_error_rate = base_rate,
                    canary_requests,
                    cool_off = ?brake.cool_off.0,
                    "CANARY_BRAKE tripped: canary weight set to 0"
                );
                self.registry.event(
                    &self.route,
                    &target.pool.name,
                    "tripped",
                    Some(json!({
                        "canary_error_rate": canary_rate,
                        "baseline_error_rate": base_rate,
                        "canary_requests": canary_requests,
                        "baseline_requests": base_requests,
                    })),
                );
            }
        }
    }

    /// Live state for the admin API.
    pub fn status(&self) -> Value {
        let now = self.registry.now_ms();
        let targets: Vec<Value> = self
            .targets
            .iter()
            .enumerate()
            .map(|(index, target)| {
                let braked = self.braked(index, now);
                let until = target.state.braked_until.load(Ordering::Relaxed);
                let (requests, errors) = match &self.brake {
                    Some(brake) => target
                        .state
                        .window
                        .lock()
                        .totals(Instant::now(), brake.window.0),
                    None => (0, 0),
                };
                json!({
                    "pool": &*target.pool.name,
                    "weight": target.weight,
                    "effective_weight": if braked { 0 } else { target.weight },
                    "braked": braked,
                    "braked_for_ms": if braked { until.saturating_sub(now) } else { 0 },
                    "window_requests": requests,
                    "window_errors": errors,
                    "requests_total": target.state.requests.load(Ordering::Relaxed),
                    "errors_total": target.state.errors.load(Ordering::Relaxed),
                    "brake_trips_total": target.state.trips.load(Ordering::Relaxed),
                })
            })
            .collect();
        json!({
            "route": &*self.route,
            "brake": self.brake,
            "targets": targets,
        })
    }
}

/// Per-bucket counts of a sliding window.
#[derive(Default)]
struct Window {
    /// (bucket number since `start`, requests, errors)
    buckets: [(u64, u64, u64); BUCKETS],
    start: Option<Instant>,
}

impl Window {
    fn bucket_of(&mut self, now: Instant, window: Duration) -> u64 {
        let start = *self.start.get_or_insert(now);
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(start).as_nanos() / width.as_nanos()) as u64
    }

    fn record(&mut self, now: Instant, window: Duration, failed: bool) -> (u64, u64) {
        let bucket = self.bucket_of(now, window);
        let slot = &mut self.buckets[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u64::from(failed);
        self.sum(bucket)
    }

    fn totals(&mut self, now: Instant, window: Duration) -> (u64, u64) {
        let bucket = self.bucket_of(now, window);
        self.sum(bucket)
    }

    fn sum(&self, current: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|(bucket, _, _)| *bucket + (BUCKETS as u64) > current && *bucket <= current)
            .fold((0, 0), |(r, e), (_, requests, errors)| {
                (r + requests, e + errors)
            })
    }

    fn clear(&mut self) {
        *self = Window::default();
    }
}

/// The state of one (route, pool) split target that survives config swaps.
#[derive(Default)]
pub struct TargetState {
    window: Mutex<Window>,
    /// Registry clock milliseconds until which the brake holds the weight at 0; 0: off.
    braked_until: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub trips: AtomicU64,
}

impl TargetState {
    /// Whether the brake holds this target at `now_ms` (the registry clock); a passed
    /// cool-off counts as released even before the next request notices it.
    fn braked_at(&self, now_ms: u64) -> bool {
        let until = self.braked_until.load(Ordering::Relaxed);
        until != 0 && now_ms < until
    }
}

/// A recorded brake event.
#[derive(Clone, Serialize)]
pub struct BrakeEvent {
    pub unix_ms: u64,
    pub route: String,
    pub pool: String,
    /// `tripped`, `released` (cool-off over) or `reset` (operator).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// Shared by compiled splits and the registry: the clock and the event log.
pub struct TrafficShared {
    epoch: Instant,
    events: Mutex<VecDeque<BrakeEvent>>,
}

impl TrafficShared {
    /// Milliseconds since the registry started, never 0 (0 means "not braked").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn event(&self, route: &str, pool: &str, kind: &'static str, detail: Option<Value>) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut events = self.events.lock();
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(BrakeEvent {
            unix_ms,
            route: route.into(),
            pool: pool.into(),
            kind,
            detail,
        });
    }
}

/// Registry entries by (route name, pool name).
type ByRoutePool<T> = Mutex<HashMap<(Arc<str>, String), Arc<T>>>;

/// State that outlives snapshots: split targets and mirrors by route (and pool) name.
pub struct TrafficRegistry {
    shared: Arc<TrafficShared>,
    targets: ByRoutePool<TargetState>,
    mirrors: ByRoutePool<mirror::MirrorState>,
}

impl Default for TrafficRegistry {
    fn default() -> Self {
        TrafficRegistry {
            shared: Arc::new(TrafficShared {
                epoch: Instant::now(),
                events: Mutex::new(VecDeque::new()),
            }),
            targets: Mutex::new(HashMap::new()),
            mirrors: Mutex::new(HashMap::new()),
        }
    }
}

impl TrafficRegistry {
    fn target(&self, route: &Arc<str>, pool: &str) -> Arc<TargetState> {
        self.targets
            .lock()
            .entry((route.clone(), pool.to_string()))
            .or_default()
            .clone()
    }

    pub fn mirror(&self, route: &Arc<str>, pool: &str, limit: u32) -> Arc<mirror::MirrorState> {
        let mut mirrors = self.mirrors.lock();
        let entry = mirrors
            .entry((route.clone(), pool.to_string()))
            .or_insert_with(|| Arc::new(mirror::MirrorState::new(limit)));
        entry.set_limit(limit);
        entry.clone()
    }

    /// Forgets the state of routes and pools `config` no longer names.
    pub fn retain(&self, config: &Config) {
        let mut splits = HashSet::new();
        let mut mirrors = HashSet::new();
        for (index, route) in config.routes.iter().enumerate() {
            let name = crate::control::resources::route_name(index, route);
            for target in &route.split {
                splits.insert((name.clone(), target.pool.clone()));
            }
            if let Some(mirror) = &route.mirror {
                mirrors.insert((name.clone(), mirror.pool.clone()));
            }
        }
        self.targets
            .lock()
            .retain(|(route, pool), _| splits.contains(&(route.to_string(), pool.clone())));
        self.mirrors
            .lock()
            .retain(|(route, pool), _| mirrors.contains(&(route.to_string(), pool.clone())));
    }

    /// Releases every engaged brake of `route` (an operator action); returns how many.
    pub fn reset(&self, route: &str) -> usize {
        let mut released = 0;
        for ((name, pool), state) in self.targets.lock().iter() {
            if &**name == route && state.braked_until.swap(0, Ordering::Relaxed) != 0 {
                state.window.lock().clear();
                released += 1;
                tracing::warn!(route = %name, pool = %pool, "canary brake reset by an operator");
                self.shared.event(name, pool, "reset", None);
            }
        }
        released
    }

    pub fn events(&self) -> Vec<BrakeEvent> {
        self.shared.events.lock().iter().cloned().collect()
    }

    /// One row per split target and mirror for the metrics exposition.
    pub fn metric_rows(&self) -> Vec<crate::telemetry::metrics::TrafficRow> {
        let now = self.shared.now_ms();
        let mut rows: Vec<_> = self
            .targets
            .lock()
            .iter()
            .map(
                |((route, pool), state)| crate::telemetry::metrics::TrafficRow {
                    route: route.to_string(),
                    pool: pool.clone(),
                    kind: crate::telemetry::metrics::TrafficKind::Split {
                        requests: state.requests.load(Ordering::Relaxed),
                        errors: state.errors.load(Ordering::Relaxed),
                        trips: state.trips.load(Ordering::Relaxed),
                        braked: state.braked_at(now),
                    },
                },
            )
            .collect();
        rows.extend(self.mirrors.lock().iter().map(|((route, pool), state)| {
            crate::telemetry::metrics::TrafficRow {
                route: route.to_string(),
                pool: pool.clone(),
                kind: crate::telemetry::metrics::TrafficKind::Mirror(state.counts()),
            }
        }));
        rows.sort_by(|a, b| (&a.route, &a.pool).cmp(&(&b.route, &b.pool)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_forgets_old_buckets() {
        let mut window = Window::default();
        let start = Instant::now();
        let width = Duration::from_secs(10);
        for _ in 0..5 {
            window.record(start, width, true);
        }
        assert_eq!(window.totals(start, width), (5, 5));
        let later = start + Duration::from_secs(5);
        assert_eq!(window.record(later, width, false), (6, 5));
        assert_eq!(
            window.totals(start + Duration::from_secs(11), width),
            (1, 0)
        );
        assert_eq!(
            window.totals(start + Duration::from_secs(30), width),
            (0, 0)
        );
    }

    #[test]
    fn raising_a_canary_weight_moves_only_boundary_users() {
        let users: Vec<u64> = (0..10_000u64)
            .map(|user| stable_hash(&KeyValue::Bytes(format!("user-{user}").as_bytes())))
            .collect();
        let place = |weights: &[u64]| -> Vec<usize> {
            let total = weights.iter().sum();
            users
                .iter()
                .map(|&hash| range_of(weights, hash_point(hash, total)))
                .collect()
        };
        let before = place(&[90, 10]);
        let after = place(&[80, 20]);
        let canary_before = before.iter().filter(|&&pool| pool == 1).count();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Nobody leaves the canary; about 10 % move onto it (binomial, n = 10 000,
        // p = 0.1: sd = 30, 5σ = ±150). The share before is 10 % ± 150 likewise.
        assert!(before
            .iter()
            .zip(&after)
            .all(|(a, b)| !(*a == 1 && *b == 0)));
        assert!((850..=1150).contains(&moved), "{moved} moved");
        assert!(
            (850..=1150).contains(&canary_before),
            "{canary_before} on canary"
        );
        // The same key always lands in the same place.
        assert_eq!(place(&[90, 10]), before);
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            "a=1; cohort=beta; xcohort=no".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, "cohort"), Some(&b"beta"[..]));
        assert_eq!(cookie(&headers, "missing"), None);
    }
}
