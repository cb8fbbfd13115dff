//! Guarded apply (SPEC CTRL-10): an apply may carry a bake period and gates — the share of
//! 5xx responses and the p95 time to the response head, measured over the responses since
//! the apply (`telemetry::RequestStats`). While the bake runs, a task checks the gates
//! every 100 ms once `min_requests` responses are in; if one is crossed, the previous
//! version is restored as a new, audited version (actor `guard`, action
//! `guard_rollback`). A change made during the bake supersedes the guard. The last guard's
//! state is shown in `/status`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Change, Control, ControlError};
use crate::telemetry::StatsSnapshot;

/// How often the gates are checked during the bake.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Longest bake accepted.
pub const MAX_BAKE: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq)]
pub struct Gates {
    pub bake: Duration,
    /// Roll back when the share of 5xx responses exceeds this (0–1).
    pub max_5xx_rate: Option<f64>,
    /// Roll back when the p95 time to the response head exceeds this.
    pub max_p95: Option<Duration>,
    /// Gates are judged only once this many responses have been seen.
    pub min_requests: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardState {
    Baking,
    Passed,
    RolledBack,
    /// Another change was made during the bake.
    Superseded,
    /// A gate was crossed but the rollback failed (see `reason`).
    Failed,
}

/// What `/status` shows about the last guarded apply.
#[derive(Clone, Debug, Serialize)]
pub struct GuardStatus {
    pub version: i64,
    pub previous_version: i64,
    pub state: GuardState,
    pub bake_seconds: f64,
    pub max_5xx_rate: Option<f64>,
    pub max_p95_ms: Option<u128>,
    pub min_requests: u64,
    /// Responses seen since the apply, and what the gates measured.
    pub requests: u64,
    pub server_error_rate: f64,
    pub p95_ms: Option<u128>,
    pub reason: Option<String>,
}

/// The first gate `window` crosses, as a message for the audit log.
pub fn crossed(gates: &Gates, window: &StatsSnapshot) -> Option<String> {
    if window.total < gates.min_requests {
        return None;
    }
    let rate = window.server_error_rate();
    if let Some(max) = gates.max_5xx_rate {
        if rate > max {
            return Some(format!(
                "guard: 5xx rate {:.3} > {max} over {} responses",
                rate, window.total
            ));
        }
    }
    if let (Some(max), Some(p95)) = (gates.max_p95, window.p95()) {
        if p95 > max {
            let shown = if p95 == Duration::MAX {
                "over 30s".to_string()
            } else {
                format!("{}ms", p95.as_millis())
            };
            return Some(format!(
                "guard: p95 {shown} > {}ms over {} responses",
                max.as_millis(),
                window.total
            ));
        }
    }
    None
}

/// Starts watching `version` (just applied over `previous`) from `baseline`.
pub fn start(
    control: Arc<Control>,
    version: i64,
    previous: i64,
    gates: Gates,
    baseline: StatsSnapshot,
) -> GuardStatus {
    let status = GuardStatus {
        version,
        previous_version: previous,
        state: GuardState::Baking,
        bake_seconds: gates.bake.as_secs_f64(),
        max_5xx_rate: gates.max_5xx_rate,
        max_p95_ms: gates.max_p95.map(|p95| p95.as_millis()),
        min_requests: gates.min_requests,
        requests: 0,
        server_error_rate: 0.0,
        p95_ms: None,
        reason: None,
    };
    control.set_guard(status.clone());
    tracing::info!(version, previous, bake = ?gates.bake, "guarded apply: baking");
    tokio::spawn(watch(control, status.clone(), gates, baseline));
    status
}

async fn watch(
    control: Arc<Control>,
    mut status: GuardStatus,
    gates: Gates,
    baseline: StatsSnapshot,
) {
    let deadline = tokio::time::Instant::now() + gates.bake;
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let window = control.gateway().request_stats().since(&baseline);
        status.requests = window.total;
        status.server_error_rate = window.server_error_rate();
        status.p95_ms = window.p95().map(|p95| {
            if p95 == Duration::MAX {
                u128::MAX
            } else {
                p95.as_millis()
            }
        });
        if control.current().info.version != status.version {
            status.state = GuardState::Superseded;
            let version = status.version;
            control.set_guard(status);
            tracing::info!(version, "guarded apply: superseded by a newer change");
            return;
        }
        if let Some(reason) = crossed(&gates, &window) {
            tracing::warn!(version = status.version, reason = %reason, "guarded apply: gate crossed; rolling back");
            let rollback = {
                let control = control.clone();
                let (version, previous, message) =
                    (status.version, status.previous_version, reason.clone());
                tokio::task::spawn_blocking(move || {
                    control.rollback(
                        previous,
                        &Change {
                            actor: "guard",
                            action: "guard_rollback",
                            message: &message,
                            if_match: Some(version),
                        },
                    )
                })
                .await
            };
            status.reason = Some(reason);
            let mut restored_as = None;
            status.state = match rollback {
                Ok(Ok(outcome)) => {
                    restored_as = Some(outcome.info.version);
                    GuardState::RolledBack
                }
                Ok(Err(ControlError::Stale { .. })) => GuardState::Superseded,
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "guarded apply: the rollback failed");
                    status.reason = Some(format!("rollback failed: {err}"));
                    GuardState::Failed
                }
                Err(err) => {
                    status.reason = Some(format!("rollback failed: {err}"));
                    GuardState::Failed
                }
            };
            let restored = status.previous_version;
            // The state first, then the log line: whoever reads the line sees the state.
            control.set_guard(status);
            if let Some(version) = restored_as {
                tracing::warn!(version, restored, "guarded apply rolled back");
            }
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            status.state = GuardState::Passed;
            let (version, requests) = (status.version, status.requests);
            control.set_guard(status);
            tracing::info!(version, requests, "guarded apply passed");
            return;
        }
        control.set_guard(status.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::RequestStats;

    #[test]
    fn gates_judge_only_after_min_requests_and_report_the_crossing() {
        let gates = Gates {
            bake: Duration::from_secs(10),
            max_5xx_rate: Some(0.1),
            max_p95: Some(Duration::from_millis(200)),
            min_requests: 10,
        };
        let stats = RequestStats::default();
        let start = stats.snapshot();
        for _ in 0..5 {
            stats.record(502, Duration::from_millis(1));
        }
        assert_eq!(crossed(&gates, &stats.snapshot().since(&start)), None);
        for _ in 0..5 {
            stats.record(200, Duration::from_millis(1));
        }
        let reason = crossed(&gates, &stats.snapshot().since(&start)).unwrap();
        assert!(reason.contains("5xx rate 0.500"), "{reason}");

        let slow = RequestStats::default();
        let start = slow.snapshot();
        for _ in 0..20 {
            slow.record(200, Duration::from_millis(450));
        }
        let reason = crossed(&gates, &slow.snapshot().since(&start)).unwrap();
        assert!(reason.contains("p95 500ms > 200ms"), "{reason}");
    }
}
