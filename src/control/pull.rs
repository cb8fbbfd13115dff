//! Pull mode (SPEC CTRL-8): one task that fetches the latest bundle from `pull.url` every
//! `pull.interval` (HTTP/1.1 over TCP, or TLS with rustls), bounded by `pull.timeout` and
//! `pull.max_size`, and applies it through `Control::apply_bundle` as the actor `pull` —
//! the same verification, replay check and store-first, audited path as an apply through
//! the admin API. Its state (last check, last applied bundle, last error) is kept on
//! `Control` for `/status` and the gRPC status.
//!
//! A bundle whose version equals the last applied one is "up to date", not an error: the
//! server keeps serving the current bundle between releases.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::bundle::Bundle;
use super::{Change, Control, ControlError};
use crate::config::PullConfig;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pull.url: {0}")]
    Url(String),
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the server answered {0}")]
    Status(http::StatusCode),
    #[error("the bundle is larger than pull.max_size ({0} bytes)")]
    TooLarge(u64),
    #[error("no answer within pull.timeout ({0:?})")]
    Timeout(Duration),
    #[error("the bundle is not UTF-8")]
    NotUtf8,
    #[error("refused: {0}")]
    Refused(#[from] ControlError),
    #[error("the apply task failed: {0}")]
    Internal(String),
}

/// What pull mode reports in `/status` (`pull`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PullStatus {
    pub url: Option<String>,
    /// RFC 3339 time of the last fetch attempt.
    pub last_check: Option<String>,
    /// RFC 3339 time of the last fetch that found nothing wrong (applied or up to date).
    pub last_success: Option<String>,
    /// The highest bundle version applied (by pull or through the admin API).
    pub last_applied_version: Option<i64>,
    /// The config version the last applied bundle became.
    pub last_config_version: Option<i64>,
    /// The last attempt's error; cleared by a successful one.
    pub last_error: Option<String>,
    pub checks: u64,
    pub failures: u64,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Starts the pull task when `[pull]` is configured.
pub fn start(control: Arc<Control>) {
    let Some(settings) = control.pull_config() else {
        return;
    };
    let last = control.last_bundle_version();
    control.update_pull_status(|status| {
        status.url = Some(settings.url.clone());
        status.last_applied_version = last;
    });
    tracing::info!(url = %settings.url, interval = ?settings.interval.0, "pull mode on");
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(settings.interval.0);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if control.gateway().is_draining() {
                return;
            }
            check_once(&control, &settings).await;
        }
    });
}

/// One fetch-verify-apply round; the outcome goes into the pull status and the log.
pub async fn check_once(control: &Arc<Control>, settings: &PullConfig) {
    let result = match tokio::time::timeout(settings.timeout.0, fetch(settings)).await {
        Err(_) => Err(PullError::Timeout(settings.timeout.0)),
        Ok(result) => result,
    };
    let result = match result {
        Ok(text) => {
            let control = control.clone();
            tokio::task::spawn_blocking(move || apply(&control, &text))
                .await
                .unwrap_or_else(|err| Err(PullError::Internal(err.to_string())))
        }
        Err(err) => Err(err),
    };
    let at = now();
    match &result {
        Ok(Some(outcome)) => tracing::info!(
            version = outcome.info.version,
            changed = outcome.changed,
            "pull: bundle applied"
        ),
        Ok(None) => tracing::debug!("pull: up to date"),
        Err(err) => tracing::warn!(error = %err, url = %settings.url, "pull: no bundle applied"),
    }
    let last = control.last_bundle_version();
    control.update_pull_status(|status| {
        status.checks += 1;
        status.last_check = Some(at.clone());
        status.last_applied_version = last;
        match result {
            Ok(outcome) => {
                status.last_success = Some(at);
                status.last_error = None;
                if let Some(outcome) = outcome {
                    status.last_config_version = Some(outcome.info.version);
                }
            }
            Err(err) => {
                status.failures += 1;
                status.last_error = Some(err.to_string());
            }
        }
    });
}

/// Applies a fetched bundle; `None` when it is the one already applied.
fn apply(control: &Control, text: &str) -> Result<Option<super::Outcome>, PullError> {
    // The same version as the last applied one is the normal steady state, not a replay.
    if let Ok(bundle) = Bundle::parse(text) {
        if control.last_bundle_version() == Some(bundle.version) {
            return Ok(None);
        }
    }
    control
        .apply_bundle(
            text,
            &Change {
                actor: "pull",
                action: "apply_bundle",
                message: "",
                if_match: None,
            },
        )
        .map(Some)
        .map_err(PullError::Refused)
}

/// GETs the bundle, bounded by `max_size`, with the gateway's own HTTP client.
async fn fetch(settings: &PullConfig) -> Result<String, PullError> {
    use crate::policy::client::{self, ClientError};
    let target = client::Target::parse(&settings.url).map_err(PullError::Url)?;
    let tls = match target.tls {
        true => {
            let verify = crate::config::UpstreamTls {
                ca: settings.ca.clone(),
                ..Default::default()
            };
            Some(
                crate::tls::UpstreamTlsConnector::new(&verify, &[b"http/1.1"])
                    .map_err(|err| PullError::Tls(format!("pull.ca: {err}")))?,
            )
        }
        false => None,
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("gatehouse-pull"),
    );
    headers.insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/json"),
    );
    let max = settings.max_size.0;
    let answer = client::get_with(
        &target,
        headers,
        settings.timeout.0,
        max,
        true,
        tls.as_ref(),
    )
    .await
    .map_err(|err| match err {
        ClientError::Connect(address, source) => PullError::Connect { address, source },
        ClientError::Tls(_, message) => PullError::Tls(message),
        ClientError::Http(err) => PullError::Http(err),
        ClientError::Timeout(after) => PullError::Timeout(after),
        ClientError::TooLarge(max) => PullError::TooLarge(max),
        ClientError::Request(message) => PullError::Url(message),
    })?;
    if !answer.status.is_success() {
        return Err(PullError::Status(answer.status));
    }
    String::from_utf8(answer.body.to_vec()).map_err(|_| PullError::NotUtf8)
}
