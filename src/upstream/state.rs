//! Resilience state that outlives snapshots (SPEC UP-4..UP-7, UP-10, CTRL-2): per endpoint
//! its health, ejections and requests in flight; per pool its circuit breaker, retry budget,
//! concurrency limiter and counters. The `UpstreamRegistry` owns these, keyed by pool name
//! (and endpoint), so a reload that keeps a pool keeps its state; the settings that act on
//! the state are read from the snapshot in force at each call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{
    CircuitBreakerConfig, ConcurrencyConfig, HealthCheckConfig, RetryBudgetConfig,
};

/// Milliseconds since the first call: a cheap monotonic clock that fits in an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How one attempt at an endpoint ended, as health and outlier tracking see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint could not be reached (refused, connect timeout, TLS failure).
    ConnectFailure,
    /// Reached, but it failed: reset before a response, no response in time, or a 5xx.
    Failure,
    /// A response below 500.
    Success,
}

/// Health and load of one endpoint.
pub struct EndpointState {
    pub address: Arc<str>,
    /// Set by the active checker; endpoints start healthy (HAProxy's default), so a new
    /// config never begins with an outage while the first checks run.
    active_healthy: AtomicBool,
    /// Passive (connect failure) ejection: ms timestamp until which it is out.
    passive_until: AtomicU64,
    /// Outlier (5xx) ejection: ms timestamp until which it is out.
    outlier_until: AtomicU64,
    connect_failures: AtomicU32,
    consecutive_5xx: AtomicU32,
    /// Outlier ejections so far; each one doubles the next ejection time.
    ejections: AtomicU32,
    in_flight: AtomicUsize,
    /// Attempts and failures, for outlier detection by failure rate.
    outcomes: Window,
    /// Responses and the sum of their head latencies (µs), for latency outliers.
    latencies: Window,
    /// The running active checker and the settings it was started with.
    pub(super) checker: Mutex<Option<(HealthCheckConfig, tokio::task::AbortHandle)>>,
    /// The pool's waiters for an endpoint below its connection limit, woken when a request
    /// here finishes.
    capacity: Arc<Capacity>,
}

/// Requests of one pool waiting for an endpoint below `max_connections_per_endpoint`.
#[derive(Default)]
pub struct Capacity {
    freed: tokio::sync::Notify,
    waiting: AtomicU32,
}

impl EndpointState {
    pub fn new(address: Arc<str>) -> EndpointState {
        EndpointState::in_pool(address, Arc::default())
    }

    /// An endpoint whose finished requests wake the pool's `capacity` waiters.
    pub fn in_pool(address: Arc<str>, capacity: Arc<Capacity>) -> EndpointState {
        EndpointState {
            capacity,
            address,
            active_healthy: AtomicBool::new(true),
            passive_until: AtomicU64::new(0),
            outlier_until: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            outcomes: Window::default(),
            latencies: Window::default(),
            checker: Mutex::new(None),
        }
    }

    /// In rotation: passing active checks and not ejected.
    pub fn available(&self, now: u64) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
            && self.passive_until.load(Ordering::Relaxed) <= now
            && self.outlier_until.load(Ordering::Relaxed) <= now
    }

    pub fn is_outlier_ejected(&self, now: u64) -> bool {
        self.outlier_until.load(Ordering::Relaxed) > now
    }

    pub fn set_active_healthy(&self, healthy: bool) -> bool {
        self.active_healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    pub fn active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops (for least-request balancing).
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Like `start_request`, unless `cap` requests are in flight already (per-endpoint
    /// connection limit): the check and the count are one atomic step, so concurrent
    /// requests can never overshoot the cap.
    pub fn try_start_request(self: &Arc<Self>, cap: usize) -> Option<InFlight> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < cap).then_some(now + 1)
            })
            .ok()
            .map(|_| InFlight(self.clone()))
    }

    /// Passive health: returns the ejection period when this failure ejected the endpoint.
    pub fn record_connect(&self, ok: bool, threshold: u32, period: Duration) -> Option<Duration> {
        if ok {
            self.connect_failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || failures < threshold {
            return None;
        }
        self.connect_failures.store(0, Ordering::Relaxed);
        self.passive_until
            .store(now_ms().saturating_add(millis(period)), Ordering::Relaxed);
        Some(period)
    }

    /// Outlier detection by failure rate: whether at least `percent` % of at least
    /// `min_requests` attempts in `window` failed. A breach starts a fresh window, so an
    /// endpoint back from ejection is judged on new traffic only.
    pub fn rate_breached(
        &self,
        failed: bool,
        window: Duration,
        percent: u32,
        min_requests: u32,
    ) -> bool {
        if percent == 0 {
            return false;
        }
        let now = now_ms();
        self.outcomes.add(window, now, 1, u64::from(failed));
        let (attempts, failures) = self.outcomes.totals(window, now);
        let breached = failed
            && attempts >= u64::from(min_requests.max(1))
            && failures * 100 >= attempts * u64::from(percent);
        if breached {
            self.outcomes.clear();
        }
        breached
    }

    /// Latency outlier detection: records a response-head latency and returns this
    /// endpoint's mean over `window` once it has `min_requests` responses there.
    pub fn record_latency(
        &self,
        latency: Duration,
        window: Duration,
        min_requests: u32,
    ) -> Option<u64> {
        let now = now_ms();
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latencies.add(window, now, 1, micros);
        self.mean_latency(window, min_requests)
    }

    /// The mean response-head latency (µs) over `window`, with at least `min_requests`.
    pub fn mean_latency(&self, window: Duration, min_requests: u32) -> Option<u64> {
        let (count, sum) = self.latencies.totals(window, now_ms());
        (count >= u64::from(min_requests.max(1))).then(|| sum / count)
    }

    /// Ejects the endpoint as an outlier now (latency detector), unless it is already out
    /// or `may_eject` says no; returns the ejection period. Its latency record starts
    /// afresh, so it is judged on new traffic when it returns.
    pub fn eject_outlier(
        &self,
        base: Duration,
        max: Duration,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let now = now_ms();
        if self.is_outlier_ejected(now) || !may_eject() {
            return None;
        }
        let previous = self.ejections.fetch_add(1, Ordering::Relaxed).min(30);
        let period = base.saturating_mul(1 << previous).min(max);
        self.outlier_until
            .store(now.saturating_add(millis(period)), Ordering::Relaxed);
        self.latencies.clear();
        Some(period)
    }

    /// Outlier detection: counts consecutive failures; returns the ejection period when
    /// this one reached the threshold (or `rate_breached` says the failure rate did) and
    /// `may_eject` allowed it.
    pub fn record_response(
        &self,
        failed: bool,
        rate_breached: bool,
        threshold: u32,
        base: Duration,
        max: Duration,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let now = now_ms();
        if !failed {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
            // Forgive earlier ejections after a quiet spell as long as the longest one, so
            // the multiplier reflects recent behaviour (Envoy decrements it likewise).
            let until = self.outlier_until.load(Ordering::Relaxed);
            if until != 0 && now > until.saturating_add(millis(max)) {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let count = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let consecutive = threshold != 0 && count >= threshold;
        if !(consecutive || rate_breached) || self.is_outlier_ejected(now) || !may_eject() {
            return None;
        }
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        let previous = self.ejections.fetch_add(1, Ordering::Relaxed).min(30);
        let period = base.saturating_mul(1 << previous).min(max);
        self.outlier_until
            .store(now.saturating_add(millis(period)), Ordering::Relaxed);
        Some(period)
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        if let Some((_, task)) = self.checker.get_mut().take() {
            task.abort();
        }
    }
}

/// A request counted in flight at an endpoint.
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        // One load when nobody waits: pools without connection limits never have waiters.
        if self.0.capacity.waiting.load(Ordering::Acquire) > 0 {
            self.0.capacity.freed.notify_waiters();
        }
    }
}

impl Capacity {
    /// Joins the queue of requests waiting for capacity, unless `max_queue` already wait.
    pub fn enqueue(self: &Arc<Self>, max_queue: u32) -> Option<Queued> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < max_queue).then_some(now + 1)
            })
            .ok()
            .map(|_| Queued(self.clone()))
    }

    /// Resolves when a request at one of the pool's endpoints finishes. Create it (and
    /// `enable` it) before checking for capacity, so a finish in between is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

/// A request counted as waiting for capacity until dropped.
pub struct Queued(Arc<Capacity>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counters per pool, for the access log's flags and diagnostic logs.
#[derive(Default)]
pub struct PoolCounters {
    pub panic_picks: AtomicU64,
    pub retries: AtomicU64,
    pub budget_exhausted: AtomicU64,
    pub circuit_rejections: AtomicU64,
    pub overload_rejections: AtomicU64,
    /// Requests that waited in the `concurrency` queue, and those it refused.
    pub overload_queue_waits: AtomicU64,
    pub overload_queue_full: AtomicU64,
    pub overload_queue_timeouts: AtomicU64,
    /// Times the pool entered panic mode.
    pub panic_events: AtomicU64,
    /// Requests that waited for an endpoint below its connection limit.
    pub connection_queue_waits: AtomicU64,
    /// Requests refused because every endpoint stayed at its connection limit.
    pub connection_limit_rejections: AtomicU64,
}

/// State of one pool that survives reloads.
#[derive(Default)]
pub struct PoolState {
    pub breaker: Mutex<Breaker>,
    /// Requests and retries, for the retry budget.
    budget: Window,
    limiter: Mutex<Option<(ConcurrencyConfig, Arc<Limiter>)>>,
    pub counters: PoolCounters,
    /// Whether the last pick was in panic mode, to log transitions rather than every pick.
    pub panicking: AtomicBool,
    /// Recent response-head latencies, for percentile hedge delays.
    pub latencies: LatencyRing,
    /// Requests waiting for an endpoint below `max_connections_per_endpoint`.
    pub capacity: Arc<Capacity>,
}

/// The last `LATENCY_SAMPLES` response-head latencies of a pool, in microseconds, in a ring
/// of atomics: recording costs two atomic operations and never blocks a request.
pub struct LatencyRing {
    samples: Box<[AtomicU64]>,
    next: AtomicUsize,
}

const LATENCY_SAMPLES: usize = 1024;
/// Fewer samples than this say too little; the configured delay is used instead.
const MIN_LATENCY_SAMPLES: usize = 20;

impl Default for LatencyRing {
    fn default() -> Self {
        LatencyRing {
            samples: (0..LATENCY_SAMPLES).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl LatencyRing {
    pub fn record(&self, latency: Duration) {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % LATENCY_SAMPLES;
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.samples[slot].store(micros, Ordering::Relaxed);
    }

    /// The `percentile` of the recorded latencies, or `None` with too few samples.
    pub fn percentile(&self, percentile: u32) -> Option<Duration> {
        let recorded = self.next.load(Ordering::Relaxed).min(LATENCY_SAMPLES);
        if recorded < MIN_LATENCY_SAMPLES {
            return None;
        }
        let mut values: Vec<u64> = self
            .samples
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| *v > 0)
            .collect();
        if values.is_empty() {
            return None;
        }
        let rank = (values.len() * percentile.min(100) as usize / 100).min(values.len() - 1);
        let (_, value, _) = values.select_nth_unstable(rank);
        Some(Duration::from_micros(*value))
    }
}

impl PoolState {
    /// The limiter for `config`; a changed limit starts a new one (requests holding slots
    /// of the old one finish on it).
    pub fn limiter(&self, config: &ConcurrencyConfig) -> Arc<Limiter> {
        let mut slot = self.limiter.lock();
        match &*slot {
            Some((current, limiter)) if current == config => limiter.clone(),
            _ => {
                let limiter = Arc::new(Limiter::new(config));
                *slot = Some((config.clone(), limiter.clone()));
                limiter
            }
        }
    }

    /// Counts an original request toward the retry budget.
    pub fn budget_request(&self, config: &RetryBudgetConfig) {
        self.budget.add(config.window.0, now_ms(), 1, 0);
    }

    /// Takes a retry from the budget; false when the budget is spent.
    pub fn budget_retry(&self, config: &RetryBudgetConfig) -> bool {
        let budget = &self.budget;
        let now = now_ms();
        let (requests, retries) = budget.totals(config.window.0, now);
        let allowed = u64::from(config.min_retries) + requests * u64::from(config.percent) / 100;
        if retries >= allowed {
            self.counters
                .budget_exhausted
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        budget.add(config.window.0, now, 0, 1);
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Two counters over a sliding window of ten buckets, lock-free: every forwarded request
/// touches the retry budget and its endpoint's outlier window, so neither may serialize
/// requests on a lock. Races at a bucket boundary can lose a count or two, which a rate
/// (not a ledger) tolerates.
#[derive(Default)]
pub struct Window {
    buckets: [WindowBucket; 10],
}

#[derive(Default)]
struct WindowBucket {
    /// Bucket number (time / width) plus one; 0 means never used.
    epoch: AtomicU64,
    first: AtomicU64,
    second: AtomicU64,
}

impl Window {
    fn width(window: Duration) -> u64 {
        (millis(window) / 10).max(1)
    }

    pub fn add(&self, window: Duration, now: u64, first: u64, second: u64) {
        let number = now / Window::width(window) + 1;
        let bucket = &self.buckets[(number % 10) as usize];
        let seen = bucket.epoch.load(Ordering::Acquire);
        if seen != number
            && bucket
                .epoch
                .compare_exchange(seen, number, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.first.store(0, Ordering::Release);
            bucket.second.store(0, Ordering::Release);
        }
        bucket.first.fetch_add(first, Ordering::AcqRel);
        bucket.second.fetch_add(second, Ordering::AcqRel);
    }

    pub fn totals(&self, window: Duration, now: u64) -> (u64, u64) {
        let number = now / Window::width(window) + 1;
        self.buckets
            .iter()
            .filter(|bucket| {
                let epoch = bucket.epoch.load(Ordering::Acquire);
                epoch != 0 && epoch + 10 > number
            })
            .fold((0, 0), |(first, second), bucket| {
                (
                    first + bucket.first.load(Ordering::Acquire),
                    second + bucket.second.load(Ordering::Acquire),
                )
            })
    }

    fn clear(&self) {
        for bucket in &self.buckets {
            bucket.epoch.store(0, Ordering::Release);
        }
    }
}

/// Circuit breaker states (SPEC UP-6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { until: u64 },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// How a request got through the breaker; reported back with its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

/// A breaker: a sliding window of ten buckets counting requests and failures.
pub struct Breaker {
    pub state: BreakerState,
    buckets: VecDeque<(u64, u64, u64)>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            buckets: VecDeque::new(),
        }
    }
}

impl Breaker {
    /// The state for metrics: 0 closed, 1 open, 2 half-open (an open breaker past its
    /// `open_for` admits probes at its next request).
    pub fn code(&self) -> u8 {
        match self.state {
            BreakerState::Closed => 0,
            BreakerState::Open { until } if until > now_ms() => 1,
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => 2,
        }
    }

    /// Admits a request, or returns how long the breaker stays open.
    pub fn admit(&mut self, config: &CircuitBreakerConfig) -> Result<Admission, Duration> {
        let now = now_ms();
        match self.state {
            BreakerState::Closed => Ok(Admission::Normal),
            BreakerState::Open { until } if now < until => Err(Duration::from_millis(until - now)),
            BreakerState::Open { .. } => {
                tracing::info!("circuit breaker half-open: admitting probes");
                self.state = BreakerState::HalfOpen {
                    admitted: 1,
                    succeeded: 0,
                };
                Ok(Admission::Probe)
            }
            BreakerState::HalfOpen {
                admitted,
                succeeded,
            } => {
                if admitted < config.half_open_probes.max(1) {
                    self.state = BreakerState::HalfOpen {
                        admitted: admitted + 1,
                        succeeded,
                    };
                    Ok(Admission::Probe)
                } else {
                    // Probes are out; refuse until they report back.
                    Err(Duration::from_secs(1))
                }
            }
        }
    }

    /// Gives back an admission that never reached the upstream (no endpoint could be
    /// picked), so a half-open breaker does not wait forever for a probe that never ran.
    pub fn release(&mut self, admission: Admission) {
        if let (
            Admission::Probe,
            BreakerState::HalfOpen {
                admitted,
                succeeded,
            },
        ) = (admission, self.state)
        {
            self.state = BreakerState::HalfOpen {
                admitted: admitted.saturating_sub(1).max(succeeded),
                succeeded,
            };
        }
    }

    /// Records an outcome; returns the new state when it changed.
    pub fn record(
        &mut self,
        config: &CircuitBreakerConfig,
        admission: Admission,
        failed: bool,
    ) -> Option<BreakerState> {
        let now = now_ms();
        let open = |now: u64| BreakerState::Open {
            until: now.saturating_add(millis(config.open_for.0)),
        };
        match (self.state, admission) {
            (BreakerState::HalfOpen { .. }, Admission::Probe) if failed => {
                self.state = open(now);
                self.buckets.clear();
                Some(self.state)
            }
            (
                BreakerState::HalfOpen {
                    admitted,
                    succeeded,
                },
                Admission::Probe,
            ) => {
                let succeeded = succeeded + 1;
                if succeeded >= config.half_open_probes.max(1) {
                    self.state = BreakerState::Closed;
                    self.buckets.clear();
                    Some(self.state)
                } else {
                    self.state = BreakerState::HalfOpen {
                        admitted,
                        succeeded,
                    };
                    None
                }
            }
            (BreakerState::Closed, Admission::Normal) => {
                let width = (millis(config.window.0) / 10).max(1);
                let bucket = now / width;
                while self
                    .buckets
                    .front()
                    .is_some_and(|(b, _, _)| b + 10 <= bucket)
                {
                    self.buckets.pop_front();
                }
                if self.buckets.back().is_none_or(|(b, _, _)| *b != bucket) {
                    self.buckets.push_back((bucket, 0, 0));
                }
                if let Some(last) = self.buckets.back_mut() {
                    last.1 += 1;
                    last.2 += u64::from(failed);
                }
                let (total, failures) = self
                    .buckets
                    .iter()
                    .fold((0, 0), |(t, f), (_, total, fails)| (t + total, f + fails));
                if total >= u64::from(config.min_requests)
                    && failures * 100 >= total * u64::from(config.error_percent)
                {
                    self.state = open(now);
                    self.buckets.clear();
                    return Some(self.state);
                }
                None
            }
            // Late reports from requests admitted under an earlier state change nothing.
            _ => None,
        }
    }
}

/// Why the limiter refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{0} requests are already queued")]
    QueueFull(u32),
    #[error("no slot within the queue timeout of {0:?}")]
    QueueTimeout(Duration),
}

/// A concurrency limit with a bounded FIFO wait queue (tokio's semaphore is fair).
pub struct Limiter {
    slots: Arc<Semaphore>,
    queued: AtomicU32,
    max_queue: u32,
    queue_timeout: Duration,
}

impl Limiter {
    fn new(config: &ConcurrencyConfig) -> Limiter {
        Limiter {
            slots: Arc::new(Semaphore::new(config.max_concurrent as usize)),
            queued: AtomicU32::new(0),
            max_queue: config.max_queue,
            queue_timeout: config.queue_timeout.0,
        }
    }

    /// Takes a slot, waiting in the queue when none is free; waits and refusals are
    /// counted in `counters`.
    pub async fn acquire(
        &self,
        counters: &PoolCounters,
    ) -> Result<OwnedSemaphorePermit, LimitError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            counters.overload_queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(LimitError::QueueFull(self.max_queue));
        }
        counters
            .overload_queue_waits
            .fetch_add(1, Ordering::Relaxed);
        let waited =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => {
                counters
                    .overload_queue_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                Err(LimitError::QueueTimeout(self.queue_timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[test]
    fn breaker_opens_at_threshold_with_minimum_then_half_opens_and_closes() {
        let config = CircuitBreakerConfig {
            error_percent: 50,
            min_requests: 4,
            window: Dur::secs(10),
            open_for: Dur(Duration::from_millis(0)),
            half_open_probes: 2,
        };
        let mut breaker = Breaker::default();
        // Three failures: 100 % errors but below the minimum count.
        for _ in 0..3 {
            assert_eq!(breaker.admit(&config), Ok(Admission::Normal));
            assert_eq!(breaker.record(&config, Admission::Normal, true), None);
        }
        assert!(matches!(
            breaker.record(&config, Admission::Normal, true),
            Some(BreakerState::Open { .. })
        ));
        // open_for is zero: the next admission is the first probe, then a second, then no more.
        assert_eq!(breaker.admit(&config), Ok(Admission::Probe));
        assert_eq!(breaker.admit(&config), Ok(Admission::Probe));
        assert!(breaker.admit(&config).is_err());
        assert_eq!(breaker.record(&config, Admission::Probe, false), None);
        assert_eq!(
            breaker.record(&config, Admission::Probe, false),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn a_probe_that_found_no_endpoint_gives_its_slot_back() {
        let config = CircuitBreakerConfig {
            min_requests: 1,
            open_for: Dur(Duration::from_millis(0)),
            half_open_probes: 1,
            ..CircuitBreakerConfig::default()
        };
        let mut breaker = Breaker::default();
        breaker.record(&config, Admission::Normal, true);
        assert_eq!(breaker.admit(&config), Ok(Admission::Probe));
        assert!(breaker.admit(&config).is_err(), "the only probe is out");
        breaker.release(Admission::Probe);
        assert_eq!(breaker.admit(&config), Ok(Admission::Probe));
        assert_eq!(
            breaker.record(&config, Admission::Probe, false),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn a_failed_probe_reopens() {
        let config = CircuitBreakerConfig {
            min_requests: 1,
            open_for: Dur(Duration::from_millis(0)),
            ..CircuitBreakerConfig::default()
        };
        let mut breaker = Breaker::default();
        breaker.record(&config, Admission::Normal, true);
        assert_eq!(breaker.admit(&config), Ok(Admission::Probe));
        assert!(matches!(
            breaker.record(&config, Admission::Probe, true),
            Some(BreakerState::Open { .. })
        ));
    }

    #[test]
    fn latency_percentiles_need_enough_samples() {
        let ring = LatencyRing::default();
        for ms in 1..=10 {
            ring.record(Duration::from_millis(ms));
        }
        assert_eq!(ring.percentile(50), None);
        for ms in 11..=100 {
            ring.record(Duration::from_millis(ms));
        }
        assert_eq!(ring.percentile(50), Some(Duration::from_millis(51)));
        assert_eq!(ring.percentile(95), Some(Duration::from_millis(96)));
    }

    #[test]
    fn budget_allows_percent_of_requests_plus_minimum() {
        let config = RetryBudgetConfig {
            percent: 20,
            min_retries: 3,
            window: Dur::secs(60),
        };
        let state = PoolState::default();
        for _ in 0..50 {
            state.budget_request(&config);
        }
        let granted = (0..100).filter(|_| state.budget_retry(&config)).count();
        assert_eq!(granted, 3 + 10);
        assert_eq!(state.counters.budget_exhausted.load(Ordering::Relaxed), 87);
    }

    #[test]
    fn outlier_ejection_doubles_up_to_the_maximum() {
        let state = EndpointState::new("x:1".into());
        let base = Duration::from_millis(0);
        // A zero base keeps the endpoint eligible for the next ejection immediately.
        let mut periods = Vec::new();
        for _ in 0..4 {
            periods.push(state.record_response(true, false, 1, base, base, || true));
        }
        assert!(periods.iter().all(Option::is_some));
        assert_eq!(state.ejections.load(Ordering::Relaxed), 4);
        let long = EndpointState::new("y:1".into());
        let first = long.record_response(
            true,
            false,
            1,
            Duration::from_secs(1),
            Duration::from_secs(3),
            || true,
        );
        assert_eq!(first, Some(Duration::from_secs(1)));
        long.outlier_until.store(0, Ordering::Relaxed);
        let second = long.record_response(
            true,
            false,
            1,
            Duration::from_secs(1),
            Duration::from_secs(3),
            || true,
        );
        assert_eq!(second, Some(Duration::from_secs(2)));
        long.outlier_until.store(0, Ordering::Relaxed);
        let third = long.record_response(
            true,
            false,
            1,
            Duration::from_secs(1),
            Duration::from_secs(3),
            || true,
        );
        assert_eq!(third, Some(Duration::from_secs(3)));
        // max_ejection_percent says no: no ejection.
        long.outlier_until.store(0, Ordering::Relaxed);
        assert_eq!(
            long.record_response(
                true,
                false,
                1,
                Duration::from_secs(1),
                Duration::from_secs(3),
                || false
            ),
            None
        );
    }
}
