//! What the gateway reports about itself: diagnostic logs (`tracing` on stderr), the
//! access log (one JSON or logfmt line per request), Prometheus metrics, W3C trace
//! context, and request outcome counters for guarded applies (`request_stats`). It
//! observes; it never decides anything.

mod access_log;
pub mod metrics;
pub mod otlp;
pub mod request_stats;
pub mod trace;

pub use access_log::{AccessLog, AccessRecord, LogGuard};
pub use metrics::{EndpointMetrics, Metrics, RequestObserver, RouteMetrics, Scrape};
pub use request_stats::{RequestStats, StatsSnapshot};

use crate::config::{LogConfig, LogFormat};

/// Installs the diagnostic logger. `override_filter` (from `GATEHOUSE_LOG`) wins over the
/// config's level. Safe to call more than once: later calls are ignored.
pub fn init_logging(config: &LogConfig, override_filter: Option<&str>) {
    let filter_text = override_filter.unwrap_or(&config.level);
    let filter = tracing_subscriber::EnvFilter::try_new(filter_text)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match config.format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
