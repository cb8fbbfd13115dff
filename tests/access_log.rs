//! The access log (SPEC OPS-2) against the real binary: every field, JSON and logfmt,
//! query redaction, and a logrotate-style rotation (rename, SIGUSR1) under continuous
//! traffic that loses no line.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use support::{http1_client, Backend, Gateway, PATIENCE};

/// Every field OPS-2 lists, as the JSON keys of one line.
const FIELDS: [&str; 26] = [
    "time",
    "request_id",
    "client_ip",
    "listener",
    "protocol",
    "tls_version",
    "sni",
    "method",
    "host",
    "path",
    "query",
    "route",
    "pool",
    "endpoint",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_ms",
    "retries",
    "cache",
    "breaker",
    "canary",
    "trace_id",
    "error",
    "user_agent",
];

fn config(backend: std::net::SocketAddr, access_log: &str) -> String {
    format!(
        "[access_log]\n{access_log}\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{backend}\"]\n\n[[routes]]\nname = \"all\"\npool = \"app\"\n"
    )
}

/// Parses one logfmt line into key → value (quoted values unescaped).
fn parse_logfmt(line: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some('t') => value.push('\t'),
                        Some('r') => value.push('\r'),
                        Some(other) => value.push(other),
                        None => break,
                    },
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ' ' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        fields.insert(key, value);
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_every_field_and_redact_secret_query_values() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config(
        backend.addr,
        "redact_query = [\"token\", \"Session\"]",
    ));
    let response = http1_client()
        .post(gateway.url("public", "/items?token=s3cret&page=2&SESSION=abc"))
        .header("user-agent", "test-agent/1")
        .header("x-request-id", "req-json-1")
        .body("hello")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    let line = gateway.wait_access_log(|line| line["request_id"] == "req-json-1");
    let object = line.as_object().expect("object");
    for field in FIELDS {
        assert!(object.contains_key(field), "field {field} missing: {line}");
    }
    assert_eq!(line["query"], "token=REDACTED&page=2&SESSION=REDACTED");
    let raw = gateway.stdout.snapshot().join("\n");
    assert!(!raw.contains("s3cret") && !raw.contains("abc"), "{raw}");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/items");
    assert_eq!(line["route"], "all");
    assert_eq!(line["pool"], "app");
    assert_eq!(line["endpoint"], backend.addr.to_string());
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], 5);
    assert!(line["bytes_out"].as_u64().is_some_and(|bytes| bytes > 0));
    assert!(line["upstream_ms"].as_f64().is_some());
    assert_eq!(line["retries"], 0);
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(line["user_agent"], "test-agent/1");
    assert!(line["tls_version"].is_null() && line["sni"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_lines_carry_the_same_fields() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config(backend.addr, "format = \"logfmt\""));
    let response = http1_client()
        .get(gateway.url("public", "/a%20b?password=hunter2&q=two words"))
        .header("x-request-id", "req-logfmt-1")
        .header("user-agent", "agent with spaces")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    let line = gateway
        .stdout
        .wait_for(0, PATIENCE, |line| line.contains("request_id=req-logfmt-1"));
    assert!(serde_json::from_str::<serde_json::Value>(&line).is_err());
    let fields = parse_logfmt(&line);
    for field in [
        "time",
        "request_id",
        "client_ip",
        "listener",
        "protocol",
        "method",
        "host",
        "path",
        "query",
        "route",
        "pool",
        "endpoint",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream_ms",
        "retries",
        "user_agent",
    ] {
        assert!(fields.contains_key(field), "{field} missing: {line}");
    }
    assert_eq!(fields["status"], "200");
    assert_eq!(fields["path"], "/a%20b");
    assert!(fields["query"].starts_with("password=REDACTED&"), "{line}");
    assert!(!line.contains("hunter2"));
    assert_eq!(fields["user_agent"], "agent with spaces");
    assert_eq!(fields["method"], "GET");
}

/// Every request's line, by its unique path, across `files`.
fn logged_paths(files: &[&Path]) -> Vec<String> {
    let mut paths = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|_| panic!("bad line {line:?}"));
            if let Some(path) = value["path"].as_str() {
                paths.push(path.to_string());
            }
        }
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_rename_and_sigusr1_lose_no_line_under_traffic() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let gateway = Gateway::start(&config(
        backend.addr,
        &format!("path = {:?}", live.display().to_string()),
    ));
    const TOTAL: usize = 600;
    let sent = Arc::new(AtomicUsize::new(0));
    // Two clients send requests with unique paths until TOTAL have been answered.
    let mut clients = Vec::new();
    for client_index in 0..2 {
        let url = gateway.url("public", "");
        let sent = sent.clone();
        clients.push(tokio::spawn(async move {
            let client = http1_client();
            let mut index = client_index;
            while index < TOTAL {
                let response = client
                    .get(format!("{url}/req/{index}"))
                    .send()
                    .await
                    .expect("request during rotation");
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body");
                sent.fetch_add(1, Ordering::SeqCst);
                index += 2;
            }
        }));
    }
    // Rotate a third of the way in, while both clients keep going.
    let deadline = Instant::now() + PATIENCE;
    while sent.load(Ordering::SeqCst) < TOTAL / 3 {
        assert!(Instant::now() < deadline, "traffic did not start");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    std::fs::rename(&live, &rotated).expect("rename like logrotate");
    let from = gateway.stderr.len();
    gateway.signal(libc::SIGUSR1);
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("reopening the access log")
    });
    let at_signal = sent.load(Ordering::SeqCst);
    assert!(at_signal < TOTAL, "traffic ended before the reopen");
    for client in clients {
        client.await.expect("client task");
    }
    // Lines are written when each response ends; wait until all are on disk.
    let deadline = Instant::now() + PATIENCE;
    let paths = loop {
        let paths = logged_paths(&[&rotated, &live]);
        if paths.len() >= TOTAL || Instant::now() > deadline {
            break paths;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut seen = HashMap::new();
    for path in &paths {
        *seen.entry(path.as_str()).or_insert(0) += 1;
    }
    for index in 0..TOTAL {
        let path = format!("/req/{index}");
        assert_eq!(
            seen.get(path.as_str()).copied(),
            Some(1),
            "{path} logged {:?} times",
            seen.get(path.as_str())
        );
    }
    assert_eq!(paths.len(), TOTAL);
    let old = logged_paths(&[&rotated]).len();
    let new = logged_paths(&[&live]).len();
    assert!(old > 0 && new > 0, "old file {old} lines, new file {new}");
}
