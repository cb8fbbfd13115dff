//! Active health checks (SPEC UP-4): one task per endpoint that probes it every interval
//! (plus jitter) over a fresh connection and flips the endpoint's `active_healthy` flag
//! after `unhealthy_threshold` consecutive failures or `healthy_threshold` consecutive
//! successes. The task holds only weak references, and the endpoint's state aborts it when
//! the endpoint leaves the config, so checks never outlive their endpoint.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::conn::{ConnSettings, Connections};
use super::state::EndpointState;
use crate::config::HealthCheckConfig;

/// Starts (or restarts, when the settings changed) the checker of one endpoint.
pub fn ensure_checker(
    pool: &Arc<str>,
    state: &Arc<EndpointState>,
    connections: &Arc<Connections>,
    config: Option<&HealthCheckConfig>,
    settings: &ConnSettings,
) {
    let mut slot = state.checker.lock();
    match (config, slot.as_ref()) {
        (Some(config), Some((running, _))) if running == config => return,
        (None, None) => return,
        _ => {}
    }
    if let Some((_, task)) = slot.take() {
        task.abort();
    }
    let Some(config) = config else {
        // Checks were turned off: the endpoint counts as healthy again.
        state.set_active_healthy(true);
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let task = runtime.spawn(run(
        pool.clone(),
        Arc::downgrade(state),
        Arc::downgrade(connections),
        config.clone(),
        settings.clone(),
    ));
    *slot = Some((config.clone(), task.abort_handle()));
}

async fn run(
    pool: Arc<str>,
    state: Weak<EndpointState>,
    connections: Weak<Connections>,
    config: HealthCheckConfig,
    settings: ConnSettings,
) {
    let mut successes = 0u32;
    let mut failures = 0u32;
    loop {
        let jitter = match u64::try_from(config.jitter.0.as_millis()) {
            Ok(0) | Err(_) => Duration::ZERO,
            Ok(max) => Duration::from_millis(fastrand::u64(..=max)),
        };
        tokio::time::sleep(config.interval.0 + jitter).await;
        let Some(conns) = connections.upgrade() else {
            return;
        };
        let healthy = conns.probe(&config, &settings).await;
        drop(conns);
        let Some(state) = state.upgrade() else {
            return;
        };
        if healthy {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let currently = state.active_healthy();
        if currently && failures >= config.unhealthy_threshold.max(1) {
            state.set_active_healthy(false);
            tracing::warn!(pool = %pool, endpoint = %state.address, failures, "endpoint failed its health checks; out of rotation");
        } else if !currently && successes >= config.healthy_threshold.max(1) {
            state.set_active_healthy(true);
            tracing::info!(pool = %pool, endpoint = %state.address, successes, "endpoint passed its health checks; back in rotation");
        }
    }
}
