//! DNS re-resolution of endpoints named by host name (SPEC UP-1): one task per such
//! endpoint resolves the name every `dns_refresh` and hands the answer to its
//! `Connections`, which dials those addresses and, when they changed, retires pooled
//! connections so traffic follows the new addresses (requests in flight finish on the old
//! ones). A failed lookup keeps the last good answer. Like the health checker, the task
//! holds only a weak reference and is aborted when the endpoint leaves the config.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::conn::Connections;

/// Bounds one lookup, so a hung resolver cannot stall the refresh loop for long.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts (or restarts with a new interval, or stops) the refresher of one endpoint.
pub fn ensure_refresher(pool: &Arc<str>, connections: &Arc<Connections>, every: Option<Duration>) {
    if !connections.is_name() {
        return;
    }
    let mut slot = connections.refresher.lock();
    if slot.as_ref().map(|(interval, _)| *interval) == every {
        return;
    }
    if let Some((_, task)) = slot.take() {
        task.abort();
    }
    let Some(every) = every else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let task = runtime.spawn(run(pool.clone(), Arc::downgrade(connections), every));
    *slot = Some((every, task.abort_handle()));
}

async fn run(pool: Arc<str>, connections: Weak<Connections>, every: Duration) {
    loop {
        let Some(address) = connections.upgrade().map(|c| c.address().clone()) else {
            return;
        };
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(&*address)).await;
        match lookup {
            Ok(Ok(addrs)) => {
                let Some(conns) = connections.upgrade() else {
                    return;
                };
                let addrs: Vec<_> = addrs.collect();
                if conns.update_resolved(addrs.clone()) {
                    tracing::info!(pool = %pool, endpoint = %address, addresses = ?addrs, "endpoint address changed; new connections go to the new address");
                }
            }
            Ok(Err(err)) => {
                tracing::warn!(pool = %pool, endpoint = %address, error = %err, "DNS lookup failed; keeping the last addresses");
            }
            Err(_) => {
                tracing::warn!(pool = %pool, endpoint = %address, "DNS lookup timed out; keeping the last addresses");
            }
        }
        tokio::time::sleep(every).await;
    }
}
