//! Prometheus metrics (SPEC OPS-1) against the real binary: every family is exposed and
//! the output parses with a real Prometheus text parser; counters follow the traffic;
//! route label sets are capped (shown with 1,000 routes); the optional token and the
//! separate `metrics.bind` listener.

mod support;

use std::collections::{HashMap, HashSet};

use prometheus_parse::{LineInfo, Sample, Scrape, Value};
use support::{http1_client, Backend, Gateway, PATIENCE};

const TOKEN: &str = "metrics-secret-token";

/// Fetches `url` and returns (status, body).
async fn fetch(url: &str, token: Option<&str>) -> (u16, String) {
    let client = http1_client();
    let mut request = client.get(url).timeout(PATIENCE);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Parses an exposition with `prometheus-parse`, first checking that the parser
/// recognises every line (it skips lines it cannot read, so that check makes it strict).
fn parse(text: &str) -> Scrape {
    for line in text.lines() {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "line the Prometheus parser does not recognise: {line:?}"
        );
    }
    Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("valid exposition")
}

fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape.samples.iter().find(|sample| {
        sample.metric == metric
            && labels
                .iter()
                .all(|(name, value)| sample.labels.get(name) == Some(*value))
    })
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(scrape, metric, labels).map(|sample| &sample.value) {
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        Some(Value::Histogram(buckets)) => buckets
            .iter()
            .find(|bucket| bucket.less_than.is_infinite())
            .map_or(0.0, |bucket| bucket.count),
        other => panic!("no sample {metric} {labels:?}: {other:?}"),
    }
}

fn hash(secret: &str) -> String {
    gatehouse::control::sha256_hex(secret.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_family_in_the_prometheus_text_format() {
    let backend = Backend::echo().await;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:0"
[[admin.tokens]]
name = "ops"
sha256 = "{token}"
scope = "admin"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"
max_connections = 100

[[pools]]
name = "app"
endpoints = ["{backend}"]

[[pools]]
name = "dead"
endpoints = ["127.0.0.1:1"]

[[routes]]
name = "api"
pool = "app"
[routes.match]
path_prefix = "/api"

[[routes]]
name = "dead"
pool = "dead"
[routes.match]
path_prefix = "/dead"

[[routes]]
name = "hello"
direct_response = {{ body = "hi" }}
[routes.match]
path = "/hello"
"#,
        token = hash(TOKEN),
        backend = backend.addr,
    );
    let gateway = Gateway::start(&config);
    let client = http1_client();
    for _ in 0..2 {
        let response = client
            .get(gateway.url("public", "/api/a"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let posted = client
        .post(gateway.url("public", "/api/upload"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), 200);
    posted.bytes().await.expect("body");
    assert_eq!(
        client
            .get(gateway.url("public", "/nowhere"))
            .send()
            .await
            .expect("request")
            .status(),
        404
    );
    assert_eq!(
        client
            .get(gateway.url("public", "/dead"))
            .send()
            .await
            .expect("request")
            .status(),
        502
    );
    // One good reload and one rejected one.
    assert!(gateway.reload_with(&config).contains("reload succeeded"));
    assert!(gateway
        .reload_with("[[listeners]]\nname = 1\n")
        .contains("reload rejected"));

    let metrics_url = format!("http://{}/metrics", gateway.addr("admin"));
    // Counters are recorded when a response body ends; wait until the last one is in.
    let deadline = std::time::Instant::now() + PATIENCE;
    let (scrape, text) = loop {
        let (status, text) = fetch(&metrics_url, None).await;
        assert_eq!(status, 200, "metrics need no token by default: {text}");
        let scrape = parse(&text);
        let done = find(
            &scrape,
            "gatehouse_requests_total",
            &[("route", "dead"), ("status_class", "5xx")],
        )
        .is_some();
        if done {
            break (scrape, text);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "requests never counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    let families = [
        "gatehouse_build_info",
        "gatehouse_uptime_seconds",
        "gatehouse_draining",
        "gatehouse_config_version",
        "gatehouse_config_snapshot_version",
        "gatehouse_config_reloads_total",
        "gatehouse_config_last_reload_success_timestamp_seconds",
        "gatehouse_access_log_dropped_lines_total",
        "gatehouse_metrics_label_sets_folded_total",
        "gatehouse_connections_accepted_total",
        "gatehouse_connections_active",
        "gatehouse_listener_max_connections",
        "gatehouse_connections_rejected_total",
        "gatehouse_tls_handshakes_total",
        "gatehouse_tls_handshake_failures_total",
        "gatehouse_relay_connections_total",
        "gatehouse_relay_bytes_total",
        "gatehouse_firewall_blocks_total",
        "gatehouse_requests_total",
        "gatehouse_request_duration_seconds",
        "gatehouse_request_bytes_total",
        "gatehouse_response_bytes_total",
        "gatehouse_upstream_requests_total",
        "gatehouse_upstream_errors_total",
        "gatehouse_upstream_response_duration_seconds",
        "gatehouse_upstream_connect_duration_seconds",
        "gatehouse_upstream_idle_connections",
    ];
    for family in families {
        assert!(
            scrape.docs.contains_key(family),
            "family {family} missing:\n{text}"
        );
        assert!(
            scrape.samples.iter().any(|sample| sample.metric == family),
            "family {family} has no sample:\n{text}"
        );
    }

    let api_get = [
        ("route", "api"),
        ("pool", "app"),
        ("method", "GET"),
        ("status_class", "2xx"),
    ];
    assert_eq!(value(&scrape, "gatehouse_requests_total", &api_get), 2.0);
    assert_eq!(
        value(
            &scrape,
            "gatehouse_requests_total",
            &[
                ("route", "api"),
                ("method", "POST"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_requests_total",
            &[("route", "none"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_request_duration_seconds",
            &[("route", "api"), ("pool", "app")]
        ),
        3.0
    );
    assert!(
        value(
            &scrape,
            "gatehouse_request_bytes_total",
            &[("route", "api")]
        ) >= 1000.0
    );
    assert!(
        value(
            &scrape,
            "gatehouse_response_bytes_total",
            &[("route", "api")]
        ) > 0.0
    );
    let app = [("pool", "app"), ("endpoint", &*backend.addr.to_string())];
    assert_eq!(
        value(&scrape, "gatehouse_upstream_requests_total", &app),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_response_duration_seconds",
            &app
        ),
        3.0
    );
    assert!(value(&scrape, "gatehouse_upstream_connect_duration_seconds", &app) >= 1.0);
    assert!(value(&scrape, "gatehouse_upstream_idle_connections", &app) >= 1.0);
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_errors_total",
            &[("pool", "dead"), ("kind", "connect")]
        ),
        // One request: the first attempt and the default retry of a connect failure.
        2.0
    );
    assert!(
        value(
            &scrape,
            "gatehouse_connections_accepted_total",
            &[("listener", "public")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_listener_max_connections",
            &[("listener", "public")]
        ),
        100.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_connections_rejected_total",
            &[("listener", "public"), ("reason", "limit")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_firewall_blocks_total",
            &[("reason", "rate")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_config_reloads_total",
            &[("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_config_reloads_total",
            &[("result", "failed")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "gatehouse_config_version", &[]), 1.0);
    assert_eq!(value(&scrape, "gatehouse_draining", &[]), 0.0);
    // Histogram buckets are cumulative and end with +Inf.
    let Some(Value::Histogram(buckets)) = find(
        &scrape,
        "gatehouse_request_duration_seconds",
        &[("route", "api")],
    )
    .map(|sample| &sample.value) else {
        panic!("no histogram");
    };
    assert!(buckets
        .windows(2)
        .all(|pair| pair[0].count <= pair[1].count));
    // The admin API itself still needs its token.
    let (status, _) = fetch(&format!("http://{}/config", gateway.addr("admin")), None).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resilience_families_follow_induced_faults() {
    use support::faults::{Fault, FaultBackend};
    let dead = FaultBackend::start("dead").await;
    dead.refuse();
    let ok = FaultBackend::start("ok").await;
    let failing = FaultBackend::start("failing").await;
    failing.set(Fault::Status(500));
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[pools]]
name = "app"
endpoints = ["{dead}", "{ok}"]
passive_health = {{ consecutive_failures = 1, ejection_time = "60s" }}
max_connections_per_endpoint = 10

[[pools]]
name = "broken"
endpoints = ["{failing}"]
circuit_breaker = {{ error_percent = 50, min_requests = 2, window = "60s", open_for = "60s" }}
concurrency = {{ max_concurrent = 10 }}

[[routes]]
name = "r"
pool = "app"
[routes.match]
path_prefix = "/app"

[[routes]]
name = "b"
pool = "broken"
[routes.match]
path_prefix = "/broken"
"#,
        dead = dead.addr,
        ok = ok.addr,
        failing = failing.addr,
    );
    let gateway = Gateway::start(&config);
    let client = http1_client();
    // Round robin starts at the first endpoint: the refused connect ejects it (threshold
    // 1) and the request is retried on the other one.
    for _ in 0..2 {
        let response = client
            .get(gateway.url("public", "/app"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    // Two 500s open the breaker (2 requests, 100 % errors); the third is refused by it.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client
            .get(gateway.url("public", "/broken"))
            .send()
            .await
            .expect("request");
        statuses.push(response.status().as_u16());
        response.bytes().await.expect("body");
    }
    assert_eq!(statuses, [500, 500, 503]);

    let metrics_url = format!("http://{}/metrics", gateway.addr("admin"));
    let (status, text) = fetch(&metrics_url, None).await;
    assert_eq!(status, 200);
    let scrape = parse(&text);
    for family in [
        "gatehouse_upstream_endpoint_state",
        "gatehouse_upstream_endpoint_in_flight",
        "gatehouse_upstream_circuit_breaker_state",
        "gatehouse_upstream_circuit_rejections_total",
        "gatehouse_upstream_retries_total",
        "gatehouse_upstream_retry_budget_exhausted_total",
        "gatehouse_upstream_ejections_total",
        "gatehouse_upstream_panic_mode",
        "gatehouse_upstream_panic_events_total",
        "gatehouse_upstream_panic_picks_total",
        "gatehouse_upstream_overload_rejections_total",
        "gatehouse_upstream_queue_waits_total",
        "gatehouse_upstream_hedges_total",
        "gatehouse_upstream_stale_connection_retries_total",
    ] {
        assert!(
            scrape.docs.contains_key(family),
            "family {family} missing:\n{text}"
        );
        assert!(
            scrape.samples.iter().any(|sample| sample.metric == family),
            "family {family} has no sample:\n{text}"
        );
    }
    let dead_addr = dead.addr.to_string();
    let ok_addr = ok.addr.to_string();
    let state = |endpoint: &str, state: &str| {
        value(
            &scrape,
            "gatehouse_upstream_endpoint_state",
            &[("pool", "app"), ("endpoint", endpoint), ("state", state)],
        )
    };
    assert_eq!(state(&dead_addr, "ejected"), 1.0);
    assert_eq!(state(&dead_addr, "healthy"), 0.0);
    assert_eq!(state(&ok_addr, "healthy"), 1.0);
    assert_eq!(state(&ok_addr, "ejected"), 0.0);
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_ejections_total",
            &[
                ("pool", "app"),
                ("endpoint", &dead_addr),
                ("kind", "passive")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_retries_total",
            &[
                ("route", "r"),
                ("pool", "app"),
                ("reason", "connect_failure")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_retries_total",
            &[("route", "r"), ("pool", "app"), ("reason", "5xx")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_circuit_breaker_state",
            &[("pool", "broken")]
        ),
        1.0,
        "open"
    );
    assert!(
        find(
            &scrape,
            "gatehouse_upstream_circuit_breaker_state",
            &[("pool", "app")]
        )
        .is_none(),
        "a pool without a breaker has no breaker series"
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_circuit_rejections_total",
            &[("pool", "broken")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "gatehouse_upstream_panic_mode", &[("pool", "app")]),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_overload_rejections_total",
            &[("pool", "broken"), ("reason", "queue_full")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_upstream_hedges_total",
            &[("route", "r"), ("result", "sent")]
        ),
        0.0
    );
    // The breaker answered without touching the backend.
    assert_eq!(failing.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_labels_are_capped_with_a_thousand_routes() {
    let mut config = String::from(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[metrics]\nmax_routes = 100\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n",
    );
    for index in 0..1000 {
        config.push_str(&format!(
            "[[routes]]\nname = \"r{index}\"\ndirect_response = {{ body = \"{index}\" }}\n[routes.match]\npath = \"/r{index}\"\n\n"
        ));
    }
    let gateway = Gateway::start(&config);
    let client = http1_client();
    for path in ["/r5", "/r900", "/r901", "/r999"] {
        let response = client
            .get(gateway.url("public", path))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let metrics_url = format!("http://{}/metrics", gateway.addr("admin"));
    let deadline = std::time::Instant::now() + PATIENCE;
    let scrape = loop {
        let (status, text) = fetch(&metrics_url, None).await;
        assert_eq!(status, 200);
        let scrape = parse(&text);
        let other: f64 = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "gatehouse_requests_total")
            .filter(|s| s.labels.get("route") == Some("other"))
            .map(|s| match s.value {
                Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum();
        if other >= 3.0 {
            break scrape;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "folded requests never counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let routes: HashSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "gatehouse_response_bytes_total")
        .filter_map(|s| s.labels.get("route"))
        .collect();
    // 100 own label sets, `other`, and `none` (no route matched).
    assert_eq!(routes.len(), 102, "{routes:?}");
    assert!(routes.contains("r5") && routes.contains("other") && routes.contains("none"));
    assert!(!routes.contains("r900"));
    assert_eq!(
        value(
            &scrape,
            "gatehouse_requests_total",
            &[("route", "r5"), ("status_class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "gatehouse_metrics_label_sets_folded_total",
            &[("family", "route")]
        ),
        900.0
    );
    // The whole exposition stays small: series per family are bounded by the caps.
    let mut per_family: HashMap<&str, usize> = HashMap::new();
    for sample in &scrape.samples {
        *per_family.entry(sample.metric.as_str()).or_default() += 1;
    }
    assert!(
        per_family.values().all(|count| *count <= 102 * 40),
        "{per_family:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_token_when_required_and_the_separate_metrics_listener() {
    let config = format!(
        r#"
[metrics]
bind = "127.0.0.1:0"
require_token = true

[admin]
bind = "127.0.0.1:0"
[[admin.tokens]]
name = "prometheus"
sha256 = "{token}"
scope = "read"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
direct_response = {{ body = "ok" }}
"#,
        token = hash(TOKEN),
    );
    let gateway = Gateway::start(&config);
    for listener in ["admin", "metrics"] {
        let url = format!("http://{}/metrics", gateway.addr(listener));
        assert_eq!(fetch(&url, None).await.0, 401, "{listener}: no token");
        assert_eq!(
            fetch(&url, Some("wrong")).await.0,
            401,
            "{listener}: wrong token"
        );
        let (status, text) = fetch(&url, Some(TOKEN)).await;
        assert_eq!(status, 200, "{listener}");
        parse(&text);
        assert!(text.contains("gatehouse_requests_total"));
    }
    // The metrics listener serves nothing of the admin API.
    let other = format!("http://{}/config", gateway.addr("metrics"));
    assert_eq!(fetch(&other, Some(TOKEN)).await.0, 404);
    let health = format!("http://{}/healthz", gateway.addr("metrics"));
    assert_eq!(fetch(&health, None).await.0, 200);
}

#[tokio::test]
async fn metrics_settings_are_validated_with_field_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[metrics]\nrequire_token = true\nmax_routes = 0\nbind = \"nowhere\"\n\n[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\n",
    )
    .expect("write");
    let output = support::run_to_exit(&["validate", path.to_str().expect("path")], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for field in [
        "metrics.require_token",
        "metrics.max_routes",
        "metrics.bind",
    ] {
        assert!(stderr.contains(field), "{field} not reported:\n{stderr}");
    }
}
