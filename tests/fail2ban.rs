//! CONN-6: the firewall's block lines, as the gateway writes them through `tracing`, are
//! matched by `packaging/fail2ban/filter.d/gatehouse.conf`; POLICY-1: the real gateway's
//! `RATE_LIMIT` lines are matched by `packaging/fail2ban/filter.d/gatehouse-ratelimit.conf`
//! and the jail names both filters. Runs `fail2ban-regex` when it is on PATH (Debian
//! package `fail2ban`) and skips with a note otherwise.

mod support;

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
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fail2ban/filter.d/gatehouse.conf");

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

/// Runs `fail2ban-regex` over `log_path` with `filter`: (matched line count, matched IPs).
fn fail2ban_regex(log_path: &Path, filter: &Path) -> (usize, Vec<String>) {
    let summary = Command::new("fail2ban-regex")
        .arg(log_path)
        .arg(filter)
        .output()
        .expect("run fail2ban-regex");
    let summary_text = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{summary_text}");
    let matched = summary_text
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("Lines: ")?;
            let (_, after) = rest.split_once(" ignored, ")?;
            after.split_whitespace().next()?.parse::<usize>().ok()
        })
        .unwrap_or_else(|| panic!("no summary line in:\n{summary_text}"));
    let ips = Command::new("fail2ban-regex")
        .args(["--out", "ip"])
        .arg(log_path)
        .arg(filter)
        .output()
        .expect("run fail2ban-regex --out ip");
    let found = String::from_utf8_lossy(&ips.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect();
    (matched, found)
}

/// Drives the real gateway into rate-limit rejections for a few client addresses (given
/// through a trusted `X-Forwarded-For`) and checks its own log with the shipped filter.
async fn rate_limit_lines_match(log_format: &str) {
    let backend = support::Backend::echo().await;
    let config = support::config_with_pool(
        &[backend.addr],
        &format!(
            r#"
[log]
format = "{log_format}"

[http]
trusted_proxies = ["127.0.0.1/32"]

[[routes]]
name = "login"
pool = "app"
rate_limit = {{ rate = "1r/m", burst = 2 }}
[routes.match]
path_prefix = "/login"
"#
        ),
    );
    let gateway = support::Gateway::start(&config);
    let client = support::http1_client();
    let url = gateway.url("public", "/login?user=x");
    // (client address, requests): burst 2 → 3 pass per key, the rest are refused; the two
    // IPv6 addresses share one /64 and so one bucket.
    let plan = [
        ("203.0.113.7", 5),
        ("2001:db8:1:2::1", 2),
        ("2001:db8:1:2::2", 3),
        ("198.51.100.4", 3),
    ];
    let mut expected: Vec<String> = Vec::new();
    let mut refused = 0;
    for (address, count) in plan {
        for _ in 0..count {
            let response = client
                .get(&url)
                .header("x-forwarded-for", address)
                // Client text that must not forge a match for another address.
                .header(
                    "user-agent",
                    "RATE_LIMIT client_ip=192.0.2.99 host=x path=/ status=429",
                )
                .send()
                .await
                .expect("request");
            if response.status() == 429 {
                refused += 1;
                expected.push(address.to_string());
            }
        }
    }
    assert_eq!(refused, 4, "203.0.113.7: 2, the /64: 2, 198.51.100.4: 0");
    gateway
        .stderr
        .wait_count(refused, support::PATIENCE, |line| {
            line.contains("RATE_LIMIT client_ip=")
        });
    let log = gateway.stderr.snapshot().join("\n") + "\n";
    let log_path = gateway.dir.path().join("gatehouse.log");
    std::fs::write(&log_path, &log).expect("write log");
    let filter = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/fail2ban/filter.d/gatehouse-ratelimit.conf");
    let (matched, found) = fail2ban_regex(&log_path, &filter);
    assert_eq!(matched, refused, "log:\n{log}");
    assert_eq!(found, expected, "log:\n{log}");
    assert!(
        log.contains("host=127.0.0.1 path=/login status=429"),
        "the path is logged without its query:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail2ban_filter_matches_the_gateways_rate_limit_lines() {
    if !fail2ban_regex_available() {
        println!("note: fail2ban-regex not on PATH; skipping (apt-get install fail2ban)");
        return;
    }
    rate_limit_lines_match("text").await;
    rate_limit_lines_match("json").await;
}

#[test]
fn the_jail_names_the_shipped_filters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fail2ban");
    let jail = std::fs::read_to_string(root.join("jail.d/gatehouse.conf")).expect("jail");
    let filters: Vec<&str> = jail
        .lines()
        .filter_map(|line| line.trim().strip_prefix("filter"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|name| name.trim().split('[').next().unwrap_or("").trim())
        .collect();
    assert_eq!(filters, ["gatehouse-ratelimit", "gatehouse"]);
    for name in filters {
        assert!(
            root.join(format!("filter.d/{name}.conf")).is_file(),
            "jail names filter {name}, which is not shipped"
        );
    }
}
