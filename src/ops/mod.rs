//! Process signals: SIGHUP reloads the config file, SIGUSR1 reopens the access log,
//! SIGTERM / SIGINT drain and exit (SPEC CTRL-9, OPS-6).

use tokio::signal::unix::{signal, SignalKind};

use crate::gateway::{Gateway, GatewayError};

/// Serves until SIGTERM or SIGINT, then drains. Returns whether the drain finished in time.
pub async fn run_until_stopped(gateway: &Gateway) -> std::io::Result<bool> {
    run_until_stopped_with(gateway, &|| reload(gateway)).await
}

/// Like `run_until_stopped`, with SIGHUP handled by `on_hangup` (the control plane's
/// reload, which records the change in the store).
pub async fn run_until_stopped_with(
    gateway: &Gateway,
    on_hangup: &dyn Fn(),
) -> std::io::Result<bool> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut user1 = signal(SignalKind::user_defined1())?;
    tracing::info!(version = gateway.version(), "gatehouse ready");
    loop {
        tokio::select! {
            _ = hangup.recv() => on_hangup(),
            _ = user1.recv() => {
                tracing::info!("reopening the access log");
                gateway.reopen_access_log();
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let timeout = gateway.drain_timeout();
    tracing::info!(timeout = ?timeout, "draining");
    let clean = gateway.drain(timeout).await;
    if clean {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    }
    Ok(clean)
}

fn reload(gateway: &Gateway) {
    match gateway.reload() {
        Ok(version) => tracing::info!(version, "reload succeeded"),
        Err(GatewayError::Config(errors)) => {
            for error in &errors.0 {
                tracing::error!(error = %error, "reload rejected; keeping the running configuration");
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "reload rejected; keeping the running configuration")
        }
    }
}
