//! systemd's notify protocol (SPEC OPS-5), written by hand on std's `UnixDatagram`: one
//! datagram per state change to the socket named by `NOTIFY_SOCKET` — `READY=1` once the
//! listeners are bound, `RELOADING=1` (with `MONOTONIC_USEC`, as `Type=notify-reload`
//! requires) and `READY=1` around a SIGHUP reload, `STOPPING=1` when the drain starts, and
//! `WATCHDOG=1` every half `WATCHDOG_USEC` while the runtime is responsive.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. Send errors
//! are logged at debug level and otherwise ignored: systemd being gone must never stop
//! the gateway.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where state changes go; cheap to share by reference.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract name (@…)")]
    BadAddress(String),
    #[error("cannot open the notify socket: {0}")]
    Io(#[from] std::io::Error),
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as systemd sets them. A
    /// malformed socket address is logged and leaves notifications off.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok();
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        match Notifier::new(socket.as_deref(), usec.as_deref(), pid.as_deref()) {
            Ok(notifier) => notifier,
            Err(err) => {
                tracing::warn!(error = %err, "systemd notifications are off");
                Notifier::disabled()
            }
        }
    }

    fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Result<Notifier, NotifyError> {
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let address = if let Some(name) = socket.strip_prefix('@') {
            abstract_address(name)?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket)?
        } else {
            return Err(NotifyError::BadAddress(socket.to_string()));
        };
        let datagram = UnixDatagram::unbound()?;
        // The watchdog is ours only if WATCHDOG_PID is unset or names this process.
        let ours = watchdog_pid
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = watchdog_usec
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(Duration::from_micros);
        Ok(Notifier {
            target: Some((datagram, address)),
            watchdog,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often systemd expects a watchdog ping (half of it is used), if at all.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one state message (newline-separated `KEY=value` assignments).
    pub fn notify(&self, state: &str) {
        if let Some((socket, address)) = &self.target {
            if let Err(err) = socket.send_to_addr(state.as_bytes(), address) {
                tracing::debug!(error = %err, "systemd notification not sent");
            }
        }
    }

    pub fn ready(&self) {
        self.notify("READY=1\nSTATUS=serving");
    }

    /// Before a reload. systemd wants the monotonic clock with it to tell reloads apart.
    pub fn reloading(&self) {
        if self.is_enabled() {
            self.notify(&format!(
                "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
                monotonic_usec()
            ));
        }
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=draining");
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> Result<SocketAddr, NotifyError> {
    use std::os::linux::net::SocketAddrExt;
    Ok(SocketAddr::from_abstract_name(name.as_bytes())?)
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(name: &str) -> Result<SocketAddr, NotifyError> {
    Err(NotifyError::BadAddress(format!("@{name}")))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_watchdog_from_the_environment() {
        assert!(!Notifier::new(None, None, None).unwrap().is_enabled());
        assert!(Notifier::new(Some("relative/path"), None, None).is_err());
        let notifier = Notifier::new(Some("/run/notify"), Some("3000000"), None).unwrap();
        assert!(notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(3)));
        let other_pid = Notifier::new(Some("/run/notify"), Some("3000000"), Some("1")).unwrap();
        assert_eq!(other_pid.watchdog_interval(), None);
        let abstract_name = Notifier::new(Some("@gatehouse-test"), None, None).unwrap();
        assert!(abstract_name.is_enabled());
        assert!(monotonic_usec() > 0);
    }
}
