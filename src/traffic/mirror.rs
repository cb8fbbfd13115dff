//! Request mirroring (SPEC TRAFFIC-4): a share of a route's requests is copied to a shadow
//! pool in a detached task. The client's exchange never waits for it: the copy is sent
//! after the primary request has been prepared, its answer is read and thrown away, and a
//! full in-flight bound drops the copy (counted) instead of queueing. Only bodies that the
//! gateway holds anyway are copied: none, or a known length up to `max_body`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;

use crate::config::MirrorConfig;
use crate::upstream::{ClientAddrs, ConnSettings, Connections, Pool, UpstreamRequest};

/// Bytes of a mirror response read (and discarded) at most.
const MAX_DRAIN_BYTES: usize = 1 << 20;

/// Counters and the in-flight bound of one route's mirror; survives config swaps.
pub struct MirrorState {
    limit: AtomicU32,
    in_flight: AtomicU32,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub skipped_body: AtomicU64,
    pub failed: AtomicU64,
}

/// A snapshot of a mirror's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct MirrorCounts {
    pub sent: u64,
    pub dropped: u64,
    pub skipped_body: u64,
    pub failed: u64,
    pub in_flight: u32,
}

impl MirrorState {
    pub fn new(limit: u32) -> MirrorState {
        MirrorState {
            limit: AtomicU32::new(limit),
            in_flight: AtomicU32::new(0),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            skipped_body: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// A slot for one mirror request, or none (counted as dropped) when all are taken.
    fn try_start(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit.load(Ordering::Relaxed);
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(Slot(self.clone())),
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn counts(&self) -> MirrorCounts {
        MirrorCounts {
            sent: self.sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            skipped_body: self.skipped_body.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// One in-flight mirror request; frees its slot when dropped.
struct Slot(Arc<MirrorState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A compiled `mirror` table.
pub struct Mirror {
    pub pool: Arc<Pool>,
    /// Requests mirrored per million.
    per_million: u32,
    pub max_body: u64,
    timeout: Duration,
    pub state: Arc<MirrorState>,
}

impl Mirror {
    pub fn compile(config: &MirrorConfig, pool: Arc<Pool>, state: Arc<MirrorState>) -> Mirror {
        Mirror {
            pool,
            per_million: (config.percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
            max_body: config.max_body.0,
            timeout: config.timeout.0,
            state,
        }
    }

    /// Whether this request is one of the mirrored share.
    pub fn wanted(&self) -> bool {
        self.per_million > 0 && fastrand::u32(..1_000_000) < self.per_million
    }

    /// Counts a request that was chosen but whose body cannot be copied.
    pub fn skip_body(&self) {
        self.state.skipped_body.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `request` to `connections` in a detached task, if a slot is free. The task
    /// gives up after the mirror's timeout, head and body included.
    pub fn spawn(
        &self,
        connections: Arc<Connections>,
        settings: ConnSettings,
        addrs: ClientAddrs,
        request: UpstreamRequest,
    ) {
        let Some(slot) = self.state.try_start() else {
            return;
        };
        let state = self.state.clone();
        let timeout = self.timeout;
        state.sent.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _slot = slot;
            let exchange = async {
                let response = connections.send(request, &settings, addrs).await.ok()?;
                let failed = response.status().is_server_error();
                let mut body = response.into_body();
                let mut read = 0usize;
                while let Some(frame) = body.frame().await {
                    let frame = frame.ok()?;
                    if let Some(data) = frame.data_ref() {
                        read += data.len();
                        if read > MAX_DRAIN_BYTES {
                            break;
                        }
                    }
                }
                Some(failed)
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Some(false)) => {}
                Ok(Some(true)) | Ok(None) | Err(_) => {
                    state.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}
