//! Process-wide request outcome counters for the control plane's guarded apply (SPEC
//! CTRL-10): how many responses, how many 5xx, and a latency histogram of the time to the
//! response head. Lock-free (relaxed atomics, one increment per bucket); a guard takes a
//! `StatsSnapshot` when its bake starts and compares later ones against it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in milliseconds; a last bucket takes the rest.
pub const BUCKETS_MS: [u64; 15] = [
    1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1_000, 2_000, 5_000, 10_000, 30_000,
];

#[derive(Default)]
pub struct RequestStats {
    total: AtomicU64,
    server_errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub total: u64,
    pub server_errors: u64,
    pub buckets: [u64; BUCKETS_MS.len() + 1],
}

impl RequestStats {
    /// Counts one response: its status and the time from request to response head.
    pub fn record(&self, status: u16, latency: Duration) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let index = BUCKETS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BUCKETS_MS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut buckets = [0; BUCKETS_MS.len() + 1];
        for (out, bucket) in buckets.iter_mut().zip(&self.buckets) {
            *out = bucket.load(Ordering::Relaxed);
        }
        StatsSnapshot {
            total: self.total.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            buckets,
        }
    }
}

impl StatsSnapshot {
    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        let mut buckets = [0; BUCKETS_MS.len() + 1];
        for (index, out) in buckets.iter_mut().enumerate() {
            *out = self.buckets[index].saturating_sub(earlier.buckets[index]);
        }
        StatsSnapshot {
            total: self.total.saturating_sub(earlier.total),
            server_errors: self.server_errors.saturating_sub(earlier.server_errors),
            buckets,
        }
    }

    /// Share of 5xx responses; 0 with no responses.
    pub fn server_error_rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.server_errors as f64 / self.total as f64
        }
    }

    /// The 95th percentile latency as the upper bound of its bucket (`None` with no
    /// responses; `Duration::MAX` when it falls in the last, open bucket).
    pub fn p95(&self) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        // The smallest bucket holding at least 95 % of the responses.
        let needed = total - total / 20;
        let mut seen = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= needed {
                return Some(
                    BUCKETS_MS
                        .get(index)
                        .map_or(Duration::MAX, |ms| Duration::from_millis(*ms)),
                );
            }
        }
        Some(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_percentiles_over_a_window() {
        let stats = RequestStats::default();
        stats.record(200, Duration::from_millis(3));
        let start = stats.snapshot();
        for _ in 0..90 {
            stats.record(200, Duration::from_millis(4));
        }
        for _ in 0..10 {
            stats.record(502, Duration::from_millis(800));
        }
        let window = stats.snapshot().since(&start);
        assert_eq!(window.total, 100);
        assert_eq!(window.server_errors, 10);
        assert!((window.server_error_rate() - 0.1).abs() < 1e-9);
        assert_eq!(window.p95(), Some(Duration::from_millis(1_000)));
        assert_eq!(StatsSnapshot::default().p95(), None);
        stats.record(200, Duration::from_secs(60));
        let last = stats.snapshot().since(&stats.snapshot());
        assert_eq!(last.total, 0);
    }
}
