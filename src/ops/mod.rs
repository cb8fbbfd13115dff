//! Process signals and the service manager: SIGHUP reloads the config file, SIGUSR1
//! reopens the access log, SIGTERM / SIGINT drain and exit (SPEC CTRL-9, OPS-6); systemd
//! hears about each stage through `systemd::Notifier` (SPEC OPS-5).

pub mod systemd;
pub mod upgrade;

use tokio::signal::unix::{signal, SignalKind};

use systemd::Notifier;

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
    let mut user2 = signal(SignalKind::user_defined2())?;
    let (upgraded, mut upgrade_done) = tokio::sync::mpsc::channel::<u32>(1);
    // Every listener (and the admin API) is bound by now: a previous process that handed
    // its sockets over may drain, and systemd may consider us started.
    upgrade::confirm_ready();
    let notifier = Notifier::from_env();
    notifier.ready();
    let watchdog = notifier
        .watchdog_interval()
        .map(|every| (every / 2).max(std::time::Duration::from_millis(1)));
    let mut ping = tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(version = gateway.version(), "gatehouse ready");
    loop {
        tokio::select! {
            _ = ping.tick(), if watchdog.is_some() => notifier.watchdog(),
            _ = hangup.recv() => {
                notifier.reloading();
                on_hangup();
                notifier.ready();
            }
            _ = user1.recv() => {
                tracing::info!("reopening the access log");
                gateway.reopen_access_log();
            }
            _ = user2.recv() => {
                tracing::info!("upgrade requested: starting the new binary");
                let upgraded = upgraded.clone();
                tokio::spawn(async move {
                    match upgrade::hand_over().await {
                        Ok(pid) => {
                            let _ = upgraded.send(pid).await;
                        }
                        Err(err) => tracing::error!(error = %err, "upgrade failed; still serving"),
                    }
                });
            }
            Some(pid) = upgrade_done.recv() => {
                tracing::info!(pid, "upgrade complete: the new process serves; draining");
                notifier.notify(&format!("MAINPID={pid}"));
                break;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    notifier.stopping();
    let timeout = gateway.drain_timeout();
    tracing::info!(timeout = ?timeout, "draining");
    // Keep the watchdog fed while draining: a long drain is not a hang.
    let drain = gateway.drain(timeout);
    let mut drain = std::pin::pin!(drain);
    let clean = loop {
        tokio::select! {
            clean = drain.as_mut() => break clean,
            _ = ping.tick(), if watchdog.is_some() => notifier.watchdog(),
        }
    };
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
