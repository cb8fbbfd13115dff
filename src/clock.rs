//! A cheap, coarse monotonic clock for bookkeeping on hot paths: activity stamps, idle
//! expiry of pooled connections, per-request deadlines that are minutes long.
//!
//! Why not `Instant::now()`: a precise read costs about 40 ns on the KVM guests we measure
//! on (TSC through the vDSO), and a proxied request used to make fifteen of them.
//! `CLOCK_MONOTONIC_COARSE` costs a quarter of that; its resolution (one scheduler tick,
//! 1–4 ms) is far finer than any timeout it serves. Latencies that are reported (metrics,
//! logs, load balancing) keep using the precise clock.
//!
//! [`coarse_now`] does not run behind the precise clock: it is anchored to it once and
//! shifted by one coarse resolution (a coarse reading lags by at most that), so it reads
//! between the true time and two resolutions after it. An idle timeout measured from a
//! coarse stamp can therefore end a few milliseconds late, never early.

use std::sync::LazyLock;
use std::time::Duration;

use tokio::time::Instant;

/// The precise clock and the coarse one read together, and the coarse resolution.
struct Anchor {
    precise: std::time::Instant,
    coarse: Duration,
    resolution: Duration,
}

// The coarse clock is read first: then the anchor itself can only err on the late side.
static ANCHOR: LazyLock<Anchor> = LazyLock::new(|| Anchor {
    coarse: imp::coarse(),
    precise: std::time::Instant::now(),
    resolution: imp::resolution(),
});

/// The current time from the coarse clock, at or up to two resolutions after the true
/// time (see the module docs).
pub fn coarse_now() -> Instant {
    // Unit tests run timers on tokio's paused clock, which only `Instant::now` follows.
    if cfg!(test) {
        return Instant::now();
    }
    from_coarse_clock()
}

fn from_coarse_clock() -> Instant {
    let anchor = &*ANCHOR;
    let since = imp::coarse().saturating_sub(anchor.coarse);
    Instant::from_std(anchor.precise + since + anchor.resolution)
}

/// Nanoseconds from `origin` to the coarse now, for activity stamps kept in an atomic.
pub fn coarse_nanos_since(origin: Instant) -> u64 {
    let since = coarse_now().saturating_duration_since(origin);
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::time::Duration;

    /// Readings above this are not believed (a broken clock would otherwise make every
    /// stamp far in the future).
    const MAX_RESOLUTION: Duration = Duration::from_millis(20);

    /// `clock_gettime` or `clock_getres` on the coarse clock.
    fn read(
        call: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    ) -> Option<Duration> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        let rc = unsafe { call(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u32::try_from(ts.tv_nsec).ok()?;
        (rc == 0).then(|| Duration::new(secs, nanos))
    }

    pub(super) fn coarse() -> Duration {
        read(libc::clock_gettime).unwrap_or_default()
    }

    pub(super) fn resolution() -> Duration {
        read(libc::clock_getres)
            .unwrap_or(MAX_RESOLUTION)
            .min(MAX_RESOLUTION)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::sync::LazyLock;
    use std::time::{Duration, Instant};

    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

    /// Elsewhere the precise clock stands in for the coarse one.
    pub(super) fn coarse() -> Duration {
        ORIGIN.elapsed()
    }

    pub(super) fn resolution() -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_time_is_never_behind_and_close_to_the_precise_time() {
        // Two resolutions, and room for a preemption between the anchor's two reads.
        let slack = ANCHOR.resolution * 2 + Duration::from_millis(1);
        for _ in 0..10_000 {
            let before = Instant::now();
            let coarse = from_coarse_clock();
            let after = Instant::now();
            assert!(coarse >= before, "coarse clock behind the precise one");
            assert!(
                coarse <= after + slack,
                "coarse clock {:?} ahead of the precise one by more than {slack:?}",
                coarse - after
            );
        }
    }

    #[test]
    fn coarse_time_advances() {
        let start = from_coarse_clock();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while from_coarse_clock() <= start {
            assert!(std::time::Instant::now() < deadline, "coarse clock stuck");
            std::hint::spin_loop();
        }
    }
}
