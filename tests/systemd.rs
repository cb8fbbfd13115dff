//! systemd `Type=notify` (SPEC OPS-5) through a real Unix datagram socket standing in for
//! systemd's: READY=1 once the listeners accept, RELOADING=1 (with MONOTONIC_USEC) and
//! READY=1 around a SIGHUP reload, WATCHDOG=1 pings at half WATCHDOG_USEC, STOPPING=1 at
//! drain.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::Instant;

use support::{Gateway, PATIENCE};

/// Receives notify datagrams, skipping WATCHDOG=1 pings (counted) until one satisfies
/// `want`; fails after `PATIENCE`.
fn next_state(socket: &UnixDatagram, pings: &mut usize, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no matching notification within {PATIENCE:?}"
        );
        socket.set_read_timeout(Some(left)).expect("timeout");
        let length = socket.recv(&mut buffer).expect("notification");
        let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
        if message == "WATCHDOG=1" {
            *pings += 1;
            continue;
        }
        if want(&message) {
            return message;
        }
        panic!("unexpected notification {message:?}");
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

#[test]
fn notify_socket_hears_ready_reloading_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    let config = "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = { body = \"ok\" }\n";
    let mut gateway = Gateway::start_with_env(
        config,
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("path")),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut pings = 0;
    let ready = next_state(&socket, &mut pings, |m| has_line(m, "READY=1"));
    assert!(ready.contains("STATUS="), "{ready:?}");
    // READY=1 came after the listeners were bound: the data listener accepts now.
    std::net::TcpStream::connect(gateway.addr("public")).expect("listener accepts");

    // The watchdog is fed every 100 ms (half of WATCHDOG_USEC).
    let started = Instant::now();
    while pings < 3 {
        let left = PATIENCE.saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "watchdog pings stopped");
        socket.set_read_timeout(Some(left)).expect("timeout");
        let mut buffer = [0u8; 256];
        let length = socket.recv(&mut buffer).expect("ping");
        assert_eq!(&buffer[..length], b"WATCHDOG=1");
        pings += 1;
    }

    let outcome = gateway.reload_with(config);
    assert!(outcome.contains("reload succeeded"), "{outcome}");
    let reloading = next_state(&socket, &mut pings, |m| has_line(m, "RELOADING=1"));
    let usec: u64 = reloading
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    next_state(&socket, &mut pings, |m| has_line(m, "READY=1"));

    gateway.signal(libc::SIGTERM);
    let stopping = next_state(&socket, &mut pings, |m| has_line(m, "STOPPING=1"));
    assert!(stopping.contains("STATUS=draining"));
    assert!(gateway.wait_exit(PATIENCE).success());
}

#[test]
fn without_notify_socket_the_gateway_runs_as_before() {
    let config = "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = { body = \"ok\" }\n";
    let mut gateway = Gateway::start_with_env(config, &[("NOTIFY_SOCKET", "relative")]);
    std::net::TcpStream::connect(gateway.addr("public")).expect("listener accepts");
    assert!(gateway
        .stderr
        .snapshot()
        .iter()
        .any(|line| line.contains("systemd notifications are off")));
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(PATIENCE).success());
}
