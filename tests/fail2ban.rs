//! CONN-6: the firewall's block lines, as the gateway writes them through `tracing`, are
//! matched by `contrib/fail2ban/filter.d/gatehouse.conf`. Runs `fail2ban-regex` when it is
//! on PATH (Debian package `fail2ban`) and skips with a note otherwise.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use gatehouse::config::FirewallConfig;
use gatehouse::firewall::{BlockReason, Firewall, FirewallRegistries};

/// A `tracing` writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut out) => out.extend_from_slice(buf),
            Err(poisoned) => poisoned.into_inner().extend_from_slice(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        let bytes = match self.0.lock() {
            Ok(out) => out.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn fail2ban_regex_available() -> bool {
    Command::new("fail2ban-regex")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|err| panic!("bad address {text}: {err}"))
}

#[test]
fn fail2ban_filter_matches_firewall_block_lines() {
    if !fail2ban_regex_available() {
        println!("note: fail2ban-regex not on PATH; skipping (apt-get install fail2ban)");
        return;
    }

    let registries = FirewallRegistries::default();
    let config = FirewallConfig {
        deny_ips: vec![ip("203.0.113.7")],
        deny_cidrs: vec!["2001:db8:bad::/48".parse().expect("cidr")],
        ..FirewallConfig::default()
    };
    let firewall = Firewall::compile(&config, "global", &registries).expect("compile");

    let capture = Capture::default();
    let mut expected: Vec<String> = Vec::new();
    let mut block = |source: &str, listener: &str| {
        assert!(firewall.check(ip(source), listener).is_some(), "{source}");
        expected.push(source.to_string());
    };

    // tracing's default text format, with the target (as in the brief's example).
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        block("203.0.113.7", "edge");
        tracing::info!("accepted 198.51.100.9");
        // Client-controlled text in another line must not be taken for a block.
        tracing::warn!("bad path \"/gatehouse firewall: blocked 192.0.2.66 listener=x reason=ip\"");
        let span = tracing::info_span!("conn", peer = "2001:db8:bad::1");
        span.in_scope(|| block("2001:db8:bad::1", "api"));
    });

    // What `telemetry::init_logging` installs: text without the target.
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_target(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        block("203.0.113.7", "internal");
        tracing::warn!("gatehouse firewall: blocked 192.0.2.67 listener=x reason=ip extra");
    });

    // `log.format = "json"`, also as `init_logging` sets it up.
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .json()
        .flatten_event(true)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        block("2001:db8:bad::2", "edge");
        tracing::warn!(
            path = "gatehouse firewall: blocked 192.0.2.68 listener=x reason=ip",
            "bad path"
        );
    });

    let log = capture.text();
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("gatehouse.log");
    std::fs::write(&log_path, &log).expect("write log");
    let filter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/fail2ban/filter.d/gatehouse.conf");

    let summary = Command::new("fail2ban-regex")
        .arg(&log_path)
        .arg(&filter)
        .output()
        .expect("run fail2ban-regex");
    let summary_text = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{summary_text}\n{log}");
    let matched = summary_text
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("Lines: ")?;
            let (_, after) = rest.split_once(" ignored, ")?;
            after.split_whitespace().next()?.parse::<usize>().ok()
        })
        .unwrap_or_else(|| panic!("no summary line in:\n{summary_text}"));
    assert_eq!(matched, expected.len(), "{summary_text}\nlog:\n{log}");

    let ips = Command::new("fail2ban-regex")
        .args(["--out", "ip"])
        .arg(&log_path)
        .arg(&filter)
        .output()
        .expect("run fail2ban-regex --out ip");
    let found: Vec<String> = String::from_utf8_lossy(&ips.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(found, expected, "log:\n{log}");

    assert_eq!(registries.stats.blocked(BlockReason::Ip), 2);
    assert_eq!(registries.stats.blocked(BlockReason::Cidr), 2);
}
