//! Upstream resilience over real sockets (SPEC UP-1..UP-11, REL-3): the real binary in
//! front of fault-injecting backends whose behaviour is switched while traffic flows.
//! Statistical assertions state their tolerance; waits poll a condition until a deadline.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::faults::{Fault, FaultBackend};
use support::{Gateway, PATIENCE};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// A listener `public`, pool `app` over `backends` with `pool_extra` settings, then `rest`
/// (routes; one catch-all route to `app` when empty).
fn config(backends: &[&FaultBackend], pool_extra: &str, rest: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let routes = if rest.is_empty() {
        "[[routes]]\npool = \"app\"\n"
    } else {
        rest
    };
    format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [{}]\n{pool_extra}\n\n{routes}\n",
        list.join(", ")
    )
}

struct Answer {
    status: u16,
    backend: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let backend = headers
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.text().await.unwrap_or_default();
    Answer {
        status,
        backend,
        headers,
        body,
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Answer {
    send(client.get(url)).await
}

/// Polls `check` every 20 ms until it holds, failing the test after `PATIENCE`.
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `n` GETs one after the other and counts answers by backend name (or status).
async fn tally(client: &reqwest::Client, url: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let answer = get(client, url).await;
        let key = answer
            .backend
            .unwrap_or_else(|| format!("status {}", answer.status));
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

// ---- (1) balancers ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smooth_wrr_respects_weights_over_real_traffic() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    let config = format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}]\n\n[[routes]]\npool = \"app\"\n",
        a.addr, b.addr
    );
    let gateway = Gateway::start(&config);
    let counts = tally(&client(), &gateway.url("public", "/"), 40).await;
    // Smooth WRR is exact per cycle: no tolerance needed.
    assert_eq!(counts.get("a"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_the_less_loaded_endpoint() {
    let slow = FaultBackend::start("slow").await;
    let fast = FaultBackend::start("fast").await;
    // Slow enough that its first request is still in flight when the last one is sent.
    slow.set(Fault::Latency(Duration::from_secs(1)));
    let gateway = Gateway::start(&config(&[&slow, &fast], "balancer = \"least_request\"", ""));
    let client = client();
    let url = gateway.url("public", "/");
    // A request every 10 ms: the slow endpoint keeps requests in flight, the fast one
    // none, so P2C (which compares both of two endpoints) sends nearly all to the fast one.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&client, &url).await }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().status, 200);
    }
    // Round robin would give the slow endpoint 20 of 40; allow it at most 8 (20 %): only
    // ties (both idle) can send it one.
    assert!(slow.requests() <= 8, "slow got {} of 40", slow.requests());
}

fn hash_config(backends: &[&FaultBackend], hash: &str) -> String {
    config(
        backends,
        &format!("balancer = \"consistent_hash\"\nhash = {hash}"),
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_header_key_on_one_endpoint_and_moves_about_one_nth() {
    let backends = [
        FaultBackend::start("a").await,
        FaultBackend::start("b").await,
        FaultBackend::start("c").await,
        FaultBackend::start("d").await,
    ];
    let three: Vec<&FaultBackend> = backends[..3].iter().collect();
    let hash = "{ on = \"header\", name = \"x-user\" }";
    let gateway = Gateway::start(&hash_config(&three, hash));
    let client = client();
    let url = gateway.url("public", "/");
    let mut placed = HashMap::new();
    for key in 0..200 {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let answer = send(client.get(&url).header("x-user", format!("user-{key}"))).await;
            seen.push(answer.backend.expect("backend"));
        }
        assert!(
            seen.iter().all(|b| *b == seen[0]),
            "key {key} moved: {seen:?}"
        );
        placed.insert(key, seen[0].clone());
    }
    let all: Vec<&FaultBackend> = backends.iter().collect();
    assert!(gateway
        .reload_with(&hash_config(&all, hash))
        .contains("reload succeeded"));
    let mut moved = 0;
    for key in 0..200 {
        let answer = send(client.get(&url).header("x-user", format!("user-{key}"))).await;
        let now = answer.backend.expect("backend");
        if now != placed[&key] {
            assert_eq!(now, "d", "key {key} moved between old endpoints");
            moved += 1;
        }
    }
    // Ideal 1/4 of 200 = 50; ±25 keys covers ring imbalance and sampling noise.
    assert!((25..=75).contains(&moved), "moved {moved} of 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_cookie_and_client_ip() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    let gateway = Gateway::start(&hash_config(
        &[&a, &b],
        "{ on = \"cookie\", name = \"sid\" }",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    for key in 0..20 {
        let cookie = format!("theme=dark; sid=s{key}");
        let first = send(client.get(&url).header("cookie", &cookie))
            .await
            .backend;
        for _ in 0..3 {
            let again = send(client.get(&url).header("cookie", &cookie))
                .await
                .backend;
            assert_eq!(again, first, "cookie {cookie}");
        }
    }
    drop(gateway);
    let gateway = Gateway::start(&hash_config(&[&a, &b], "{ on = \"client_ip\" }"));
    let counts = tally(&client, &gateway.url("public", "/"), 20).await;
    // Every request comes from 127.0.0.1: one endpoint takes them all.
    assert_eq!(counts.len(), 1, "{counts:?}");
}

// ---- (2) health checks ----------------------------------------------------------------

const FAST_CHECKS: &str = "health_check = { path = \"/health\", interval = \"50ms\", timeout = \"500ms\", unhealthy_threshold = 3, healthy_threshold = 2 }";

/// Whether `n` consecutive requests all avoid backend `name`.
async fn avoids(client: &reqwest::Client, url: &str, name: &str, n: usize) -> bool {
    !tally(client, url, n).await.contains_key(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_path_leaves_rotation_after_threshold_and_returns() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    let gateway = Gateway::start(&config(&[&a, &b], FAST_CHECKS, ""));
    let client = client();
    let url = gateway.url("public", "/");
    eventually("checks run", || async { b.health_checks() >= 2 }).await;
    let counts = tally(&client, &url, 10).await;
    assert_eq!(counts.get("b"), Some(&5), "{counts:?}");

    let from = gateway.stderr.len();
    let checks_at_failure = b.health_checks();
    b.set_health(false);
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("failed its health checks") && line.contains(&b.addr.to_string())
    });
    // Out only after `unhealthy_threshold` (3) failed checks; one check may have been
    // counted just before the switch and answered just after it.
    assert!(b.health_checks() >= checks_at_failure + 2);
    assert!(avoids(&client, &url, "b", 20).await);

    let from = gateway.stderr.len();
    b.set_health(true);
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("passed its health checks") && line.contains(&b.addr.to_string())
    });
    let counts = tally(&client, &url, 10).await;
    assert_eq!(counts.get("b"), Some(&5), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_follows_a_closed_port() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    let gateway = Gateway::start(&config(
        &[&a, &b],
        "passive_health = { consecutive_failures = 0 }\nhealth_check = { kind = \"tcp\", interval = \"50ms\", timeout = \"500ms\", unhealthy_threshold = 2, healthy_threshold = 2 }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let from = gateway.stderr.len();
    b.refuse();
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("failed its health checks")
    });
    // Connect failures in the meantime were retried on `a` (the default retry): no errors.
    let counts = tally(&client, &url, 10).await;
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
    let from = gateway.stderr.len();
    b.resume().await;
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("passed its health checks")
    });
    let counts = tally(&client, &url, 10).await;
    assert_eq!(counts.get("b"), Some(&5), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_after_consecutive_connect_failures() {
    let a = FaultBackend::start("a").await;
    let dead = FaultBackend::start("dead").await;
    dead.refuse();
    let gateway = Gateway::start(&config(
        &[&a, &dead],
        "passive_health = { consecutive_failures = 2, ejection_time = \"60s\" }",
        "[[routes]]\npool = \"app\"\nretry = { max_retries = 0 }\n",
    ));
    let counts = tally(&client(), &gateway.url("public", "/"), 20).await;
    // Alternation sends requests 2 and 4 to the dead endpoint; the second failure ejects it.
    assert_eq!(counts.get("status 502"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("a"), Some(&18), "{counts:?}");
    gateway.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("consecutive connect failures")
    });
}

// ---- (4) circuit breaker --------------------------------------------------------------

const BREAKER: &str = "passive_health = { consecutive_failures = 0 }\ncircuit_breaker = { error_percent = 50, min_requests = 5, window = \"10s\", open_for = \"300ms\", half_open_probes = 2 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_at_threshold_refuses_without_the_backend_then_probes_and_closes() {
    let backend = FaultBackend::start("b").await;
    backend.set(Fault::Status(500));
    let gateway = Gateway::start(&config(&[&backend], BREAKER, ""));
    let client = client();
    let url = gateway.url("public", "/");
    // Below the minimum request count, 100 % errors do not open it.
    for _ in 0..4 {
        assert_eq!(get(&client, &url).await.status, 500);
    }
    // The fifth reaches the minimum and opens it.
    assert_eq!(get(&client, &url).await.status, 500);
    assert_eq!(backend.requests(), 5);
    for _ in 0..10 {
        let answer = get(&client, &url).await;
        assert_eq!(answer.status, 503);
        assert_eq!(answer.headers["x-gatehouse-circuit"], "open");
        assert!(answer.headers.contains_key("retry-after"));
        assert!(answer.body.contains("circuit_open"));
    }
    assert_eq!(backend.requests(), 5, "an open breaker touched the backend");

    // Half-open admits exactly `half_open_probes` (2) of 6 concurrent requests.
    // Probes last long enough that all six requests arrive while they are out.
    backend.set(Fault::Latency(Duration::from_secs(1)));
    // open_for (300 ms) has to pass: elapsed time is the behaviour under test here.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let answers = futures_util::future::join_all((0..6).map(|_| get(&client, &url))).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers
        .iter()
        .filter(|a| a.status == 503 && a.headers.contains_key("x-gatehouse-circuit"))
        .count();
    assert_eq!((ok, refused), (2, 4));
    assert_eq!(backend.requests(), 7);
    // Both probes succeeded: closed.
    backend.set(Fault::Ok);
    for _ in 0..5 {
        assert_eq!(get(&client, &url).await.status, 200);
    }
    gateway
        .stderr
        .wait_for(0, PATIENCE, |line| line.contains("state=Closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_state_survives_a_reload() {
    let backend = FaultBackend::start("b").await;
    backend.set(Fault::Status(500));
    let slow_to_close = BREAKER.replace("open_for = \"300ms\"", "open_for = \"60s\"");
    let gateway = Gateway::start(&config(&[&backend], &slow_to_close, ""));
    let client = client();
    let url = gateway.url("public", "/");
    for _ in 0..5 {
        get(&client, &url).await;
    }
    assert_eq!(get(&client, &url).await.status, 503);
    let reloaded = config(
        &[&backend],
        &slow_to_close,
        "[[routes]]\nmatch = { path = \"/other\" }\ndirect_response = { body = \"x\" }\n\n[[routes]]\npool = \"app\"\n",
    );
    assert!(gateway.reload_with(&reloaded).contains("reload succeeded"));
    let answer = get(&client, &url).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["x-gatehouse-circuit"], "open");
    assert_eq!(backend.requests(), 5);
}

// ---- (5) retries ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_on_another_endpoint() {
    let a = FaultBackend::start("a").await;
    let dead = FaultBackend::start("dead").await;
    dead.refuse();
    // Passive ejection off so every other request meets the dead endpoint first, and a
    // budget that does not run out (half the requests need a retry here).
    let gateway = Gateway::start(&config(
        &[&dead, &a],
        "passive_health = { consecutive_failures = 0 }\nretry_budget = { percent = 100 }",
        "",
    ));
    let counts = tally(&client(), &gateway.url("public", "/"), 10).await;
    assert_eq!(
        counts.get("a"),
        Some(&10),
        "{counts:?} {:?}",
        gateway.access_log()
    );
    let line = gateway.wait_access_log(|line| line["attempts"] == 2);
    assert_eq!(line["status"], 200);
    assert!(line["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|v| v == "retried")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_not_retried_unless_the_route_allows_it() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    a.set(Fault::Status(503));
    b.set(Fault::Status(503));
    let routes = "[[routes]]\nmatch = { path_prefix = \"/allow\" }\npool = \"app\"\nretry = { max_retries = 2, on = [\"5xx\"], non_idempotent = true, backoff_base = \"1ms\", backoff_max = \"5ms\" }\n\n[[routes]]\npool = \"app\"\nretry = { max_retries = 2, on = [\"5xx\"], backoff_base = \"1ms\", backoff_max = \"5ms\" }\n";
    let budget = "retry_budget = { percent = 100, min_retries = 100 }";
    let gateway = Gateway::start(&config(&[&a, &b], budget, routes));
    let client = client();
    let total = || a.requests() + b.requests();

    assert_eq!(
        send(client.get(gateway.url("public", "/x"))).await.status,
        503
    );
    assert_eq!(total(), 3, "GET: first attempt and two retries");
    let answer = send(client.post(gateway.url("public", "/x")).body("payload")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(total(), 4, "POST was retried");
    let answer = send(client.post(gateway.url("public", "/allow")).body("payload")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(total(), 7, "POST on a route that allows it: three attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_retried_after_response_bytes_reached_the_client() {
    let backend = FaultBackend::start("b").await;
    backend.set(Fault::ResetMidResponse);
    let gateway = Gateway::start(&config(
        &[&backend],
        "",
        "[[routes]]\npool = \"app\"\nretry = { max_retries = 3, on = [\"reset\", \"5xx\", \"connect_failure\"] }\n",
    ));
    let response = client()
        .get(gateway.url("public", "/"))
        .send()
        .await
        .expect("head arrives");
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "the body must fail, not be completed"
    );
    assert_eq!(backend.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_response_is_retried_when_configured() {
    let bad = FaultBackend::start("bad").await;
    let good = FaultBackend::start("good").await;
    bad.set(Fault::ResetBeforeResponse);
    let gateway = Gateway::start(&config(
        &[&bad, &good],
        "",
        "[[routes]]\npool = \"app\"\nretry = { max_retries = 1, on = [\"reset\"] }\n",
    ));
    let counts = tally(&client(), &gateway.url("public", "/"), 6).await;
    assert_eq!(counts.get("good"), Some(&6), "{counts:?}");
    assert_eq!(bad.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_upstream_attempts_in_a_total_outage() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    a.set(Fault::Status(503));
    b.set(Fault::Status(503));
    let gateway = Gateway::start(&config(
        &[&a, &b],
        "retry_budget = { percent = 20, min_retries = 2, window = \"60s\" }",
        "[[routes]]\npool = \"app\"\nretry = { max_retries = 3, on = [\"5xx\"], backoff_base = \"1ms\", backoff_max = \"2ms\" }\n",
    ));
    let counts = tally(&client(), &gateway.url("public", "/"), 50).await;
    assert_eq!(
        counts.get("status 503").copied().unwrap_or(0)
            + counts.get("a").copied().unwrap_or(0)
            + counts.get("b").copied().unwrap_or(0),
        50
    );
    let attempts = a.requests() + b.requests();
    // Without a budget: 50 × 4 = 200. With it: 50 originals + 20 % of 50 + 2 = 62 at most.
    assert!((50..=62).contains(&attempts), "{attempts} attempts");
    assert!(attempts > 50, "some retries were allowed");
    gateway.wait_access_log(|line| {
        line["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|v| v == "retry_budget_exhausted"))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_on_and_the_total_timeout_holds() {
    let stalled = FaultBackend::start("stalled").await;
    let good = FaultBackend::start("good").await;
    stalled.set(Fault::Stall);
    let routes = "[[routes]]\nmatch = { path = \"/total\" }\npool = \"app\"\ntimeouts = { request = \"600ms\" }\nretry = { max_retries = 10, on = [\"per_try_timeout\"], per_try_timeout = \"200ms\", backoff_base = \"1ms\", backoff_max = \"2ms\" }\n\n[[routes]]\npool = \"app\"\nretry = { max_retries = 1, on = [\"per_try_timeout\"], per_try_timeout = \"200ms\" }\n";
    let gateway = Gateway::start(&config(&[&stalled, &good], "", routes));
    let client = client();
    for _ in 0..4 {
        let started = Instant::now();
        let answer = get(&client, &gateway.url("public", "/")).await;
        assert_eq!(answer.status, 200);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // The stalled endpoint saw (and then lost) every other first attempt.
    eventually("stalled attempts were abandoned", || async {
        stalled.counters().cancelled.load(Ordering::SeqCst) >= 2
    })
    .await;

    good.set(Fault::Stall);
    let started = Instant::now();
    let answer = get(&client, &gateway.url("public", "/total")).await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status, 504);
    assert!(
        elapsed >= Duration::from_millis(550) && elapsed < Duration::from_secs(3),
        "total timeout 600ms, took {elapsed:?}"
    );
}

// ---- (7) overload -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_limits_concurrency_queues_then_sheds_with_retry_after() {
    let backend = FaultBackend::start("b").await;
    // Long enough that all eight arrive while the first two are still being served.
    backend.set(Fault::Latency(Duration::from_secs(1)));
    let gateway = Gateway::start(&config(
        &[&backend],
        "concurrency = { max_concurrent = 2, max_queue = 2, queue_timeout = \"5s\" }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let answers = futures_util::future::join_all((0..8).map(|_| get(&client, &url))).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let shed: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!((ok, shed.len()), (4, 4), "2 served, 2 queued, 4 shed");
    for answer in shed {
        assert!(answer.headers.contains_key("retry-after"));
        assert!(answer.body.contains("overloaded"));
    }
    assert!(backend.counters().max_in_flight.load(Ordering::SeqCst) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_wait_at_most_the_queue_timeout() {
    let backend = FaultBackend::start("b").await;
    backend.set(Fault::Latency(Duration::from_secs(2)));
    let gateway = Gateway::start(&config(
        &[&backend],
        "concurrency = { max_concurrent = 1, max_queue = 5, queue_timeout = \"200ms\" }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let first = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { get(&client, &url).await }
    });
    eventually("the first request holds the slot", || async {
        backend.counters().in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = Instant::now();
    let answer = get(&client, &url).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 503);
    assert!(answer.headers.contains_key("retry-after"));
    assert!(
        waited >= Duration::from_millis(180) && waited < Duration::from_millis(1500),
        "queue timeout 200ms, waited {waited:?}"
    );
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(backend.counters().max_in_flight.load(Ordering::SeqCst), 1);
}

// ---- (3) outlier detection ----------------------------------------------------------------

/// The `ejection_ms` values of outlier ejection log lines, in order.
fn outlier_ejections(gateway: &Gateway) -> Vec<(String, u64)> {
    gateway
        .stderr
        .snapshot()
        .iter()
        .filter(|line| line.contains("endpoint ejected: outlier"))
        .filter_map(|line| {
            let value = |key: &str| {
                let start = line.find(key)? + key.len();
                let rest = &line[start..];
                Some(
                    rest.split_whitespace()
                        .next()?
                        .trim_matches('"')
                        .to_string(),
                )
            };
            Some((value("endpoint=")?, value("ejection_ms=")?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_5xx_endpoint_for_growing_times() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    b.set(Fault::Status(500));
    let gateway = Gateway::start(&config(
        &[&a, &b],
        "outlier_detection = { consecutive_5xx = 3, base_ejection_time = \"200ms\", max_ejection_time = \"10s\", max_ejection_percent = 50 }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let deadline = Instant::now() + PATIENCE;
    while outlier_ejections(&gateway).len() < 3 {
        assert!(Instant::now() < deadline, "no repeated ejections");
        get(&client, &url).await;
    }
    let ejections = outlier_ejections(&gateway);
    let b_addr = b.addr.to_string();
    assert!(ejections.iter().all(|(endpoint, _)| *endpoint == b_addr));
    let times: Vec<u64> = ejections.iter().map(|(_, ms)| *ms).take(3).collect();
    assert_eq!(times, vec![200, 400, 800]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_never_ejects_more_than_max_ejection_percent() {
    let backends = [
        FaultBackend::start("a").await,
        FaultBackend::start("b").await,
        FaultBackend::start("c").await,
        FaultBackend::start("d").await,
    ];
    for backend in &backends[1..] {
        backend.set(Fault::Status(500));
    }
    let all: Vec<&FaultBackend> = backends.iter().collect();
    let gateway = Gateway::start(&config(
        &all,
        "outlier_detection = { consecutive_5xx = 2, base_ejection_time = \"60s\", max_ejection_time = \"60s\", max_ejection_percent = 50 }",
        "",
    ));
    let counts = tally(&client(), &gateway.url("public", "/"), 60).await;
    // 50 % of four: two ejected, the third failing endpoint keeps receiving traffic.
    eventually("two ejections are logged", || async {
        outlier_ejections(&gateway).len() >= 2
    })
    .await;
    let late = tally(&client(), &gateway.url("public", "/"), 20).await;
    let ejected = outlier_ejections(&gateway);
    assert_eq!(ejected.len(), 2, "{ejected:?}");
    let failing_names: Vec<&str> = ["b", "c", "d"]
        .into_iter()
        .filter(|name| late.contains_key(*name))
        .collect();
    assert_eq!(failing_names.len(), 1, "{counts:?} then {late:?}");
}

// ---- (8) panic mode --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_balances_over_all_endpoints_when_too_few_are_healthy() {
    let backends = [
        FaultBackend::start("a").await,
        FaultBackend::start("b").await,
        FaultBackend::start("c").await,
    ];
    let all: Vec<&FaultBackend> = backends.iter().collect();
    let gateway = Gateway::start(&config(
        &all,
        &format!("{FAST_CHECKS}\npanic_threshold = 50"),
        "",
    ));
    let from = gateway.stderr.len();
    backends[1].set_health(false);
    backends[2].set_health(false);
    for backend in &backends[1..] {
        let addr = backend.addr.to_string();
        gateway.stderr.wait_for(from, PATIENCE, |line| {
            line.contains("failed its health checks") && line.contains(&addr)
        });
    }
    // One of three healthy (33 %) is below the 50 % threshold: all three serve.
    let counts = tally(&client(), &gateway.url("public", "/"), 30).await;
    for name in ["a", "b", "c"] {
        assert_eq!(counts.get(name), Some(&10), "{counts:?}");
    }
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("panic mode"));
    gateway.wait_access_log(|line| {
        line["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|v| v == "panic"))
    });
}

// ---- (9) runtime endpoint changes ------------------------------------------------------

fn weighted_config(endpoints: &[(&FaultBackend, bool)]) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|(b, drain)| format!("{{ address = \"{}\", drain = {drain} }}", b.addr))
        .collect();
    format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [{}]\n\n[[routes]]\npool = \"app\"\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_endpoint_finishes_its_requests_and_sends_it_no_new_ones() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    b.set(Fault::Latency(Duration::from_millis(500)));
    let gateway = Gateway::start(&weighted_config(&[(&a, false), (&b, false)]));
    let client = client();
    let url = gateway.url("public", "/");
    assert_eq!(get(&client, &url).await.backend.as_deref(), Some("a"));
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { get(&client, &url).await }
    });
    eventually("a request is in flight at b", || async {
        b.counters().in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(gateway
        .reload_with(&weighted_config(&[(&a, false), (&b, true)]))
        .contains("reload succeeded"));
    let answer = in_flight.await.unwrap();
    assert_eq!((answer.status, answer.backend.as_deref()), (200, Some("b")));
    let counts = tally(&client, &url, 10).await;
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_and_removed_at_runtime_without_failing_requests_in_flight() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    let c = FaultBackend::start("c").await;
    for backend in [&a, &b] {
        backend.set(Fault::Latency(Duration::from_millis(400)));
    }
    let gateway = Gateway::start(&config(&[&a, &b], "", ""));
    let client = client();
    let url = gateway.url("public", "/");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    eventually("four requests in flight", || async {
        a.counters().in_flight.load(Ordering::SeqCst)
            + b.counters().in_flight.load(Ordering::SeqCst)
            == 4
    })
    .await;
    // Remove b and add c while b still works on two requests.
    assert!(gateway
        .reload_with(&config(&[&a, &c], "", ""))
        .contains("reload succeeded"));
    for task in tasks {
        assert_eq!(task.await.unwrap().status, 200);
    }
    a.set(Fault::Ok);
    let counts = tally(&client, &url, 10).await;
    assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&5), "{counts:?}");
}

// ---- (10) fault storm --------------------------------------------------------------------

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Every fault kind gives its documented status (docs/OPERATIONS.md, "Failure semantics").
async fn check_fault(client: &reqwest::Client, url: &str, backend: &FaultBackend, fault: Fault) {
    backend.set(fault.clone());
    let response = client.get(url).send().await.expect("a response head");
    let status = response.status().as_u16();
    let body = response.bytes().await;
    match fault {
        Fault::Ok | Fault::Latency(_) | Fault::CloseReused => {
            assert_eq!((status, body.is_ok()), (200, true))
        }
        Fault::Drip(period) if period < Duration::from_millis(100) => {
            assert_eq!(status, 200);
            assert_eq!(&body.expect("dripped body")[..], b"0123456789");
        }
        // Slower than the idle timeout: the head went out, the body is cut off.
        Fault::Drip(_) | Fault::ResetMidResponse => {
            assert_eq!(status, 200);
            assert!(body.is_err(), "{fault:?}: truncated body must fail");
        }
        Fault::Status(code) => assert_eq!(status, code),
        Fault::Stall => assert_eq!(status, 504),
        Fault::ResetBeforeResponse | Fault::Garbage => assert_eq!(status, 502),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_storm_gives_documented_statuses_and_leaks_nothing() {
    let backend = FaultBackend::start("b").await;
    let gateway = Gateway::start(&config(
        &[&backend],
        "passive_health = { consecutive_failures = 0 }",
        "[[routes]]\npool = \"app\"\ntimeouts = { response_header = \"300ms\", idle = \"300ms\" }\n",
    ));
    let url = gateway.url("public", "/");
    let baseline = open_fds(gateway.pid());
    let faults = [
        Fault::Ok,
        Fault::Status(503),
        Fault::Latency(Duration::from_millis(30)),
        Fault::Stall,
        Fault::ResetBeforeResponse,
        Fault::ResetMidResponse,
        Fault::Garbage,
        Fault::Drip(Duration::from_millis(5)),
        Fault::Drip(Duration::from_millis(400)),
    ];
    for round in 0..3 {
        let client = client();
        for fault in &faults {
            check_fault(&client, &url, &backend, fault.clone()).await;
        }
        // Refused connections: the listener closed.
        backend.refuse();
        // A pooled connection the backend just closed can still carry the next request
        // (502 `upstream_bad_response`); once those are gone, connects are refused.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let answer = get(&client, &url).await;
            assert_eq!(answer.status, 502, "round {round}: {}", answer.body);
            if answer.body.contains("upstream_connect_failed") {
                break;
            }
            assert!(
                answer.body.contains("upstream_bad_response"),
                "{}",
                answer.body
            );
            assert!(Instant::now() < deadline, "connects never refused");
        }
        backend.resume().await;
        backend.set(Fault::Ok);
        // Concurrent mixed faults.
        let mixed = futures_util::future::join_all((0..20).map(|i| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let request = client.get(&url).header("x-i", i.to_string());
                request.send().await.map(|r| r.status().as_u16())
            }
        }))
        .await;
        assert!(mixed.iter().all(|r| matches!(r, Ok(200))));
    }
    // Drop every connection on both sides, then the gateway must come back to where it
    // started: no socket, timer task or connection left behind.
    backend.refuse();
    eventually(
        "the gateway's descriptors return to the baseline",
        || async { open_fds(gateway.pid()) <= baseline },
    )
    .await;
    let panicked = gateway
        .stderr
        .snapshot()
        .iter()
        .any(|line| line.contains("panicked"));
    assert!(!panicked, "the gateway panicked");
}

// ---- (6) hedging -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_tail_and_cancels_the_losing_attempt() {
    let fast_a = FaultBackend::start("a").await;
    let fast_b = FaultBackend::start("b").await;
    let slow = FaultBackend::start("slow").await;
    slow.set(Fault::Latency(Duration::from_secs(2)));
    let gateway = Gateway::start(&config(
        &[&fast_a, &fast_b, &slow],
        "",
        // Retries off: hedging does not depend on them.
        "[[routes]]\npool = \"app\"\nhedge = { delay = \"50ms\" }\nretry = { max_retries = 0 }\n",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let mut latencies = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        let answer = get(&client, &url).await;
        latencies.push(started.elapsed());
        assert_eq!(answer.status, 200);
        assert_ne!(answer.backend.as_deref(), Some("slow"));
    }
    latencies.sort();
    // Round robin sends 10 of 30 to the 2 s endpoint: without hedging p99 would be 2 s.
    // With a 50 ms hedge it is the delay plus a fast answer; 500 ms leaves room for a
    // loaded test machine.
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    assert_eq!(slow.requests(), 10);
    // Every losing attempt was cancelled: the slow endpoint saw its connection closed.
    eventually(
        "the slow endpoint saw every losing attempt closed",
        || async { slow.counters().cancelled.load(Ordering::SeqCst) == 10 },
    )
    .await;
    gateway.wait_access_log(|line| {
        line["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|v| v == "hedged"))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_never_hedged() {
    let slow = FaultBackend::start("slow").await;
    let fast = FaultBackend::start("fast").await;
    slow.set(Fault::Latency(Duration::from_millis(300)));
    let gateway = Gateway::start(&config(
        &[&slow, &fast],
        "",
        "[[routes]]\npool = \"app\"\nhedge = { delay = \"20ms\" }\n",
    ));
    let answer = send(client().post(gateway.url("public", "/")).body("x")).await;
    assert_eq!(answer.backend.as_deref(), Some("slow"));
    assert_eq!(fast.requests(), 0);
}

// ---- status in the admin API -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_shows_breaker_health_and_counters() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    a.set(Fault::Status(500));
    b.set(Fault::Status(500));
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        config(
            &[&a, &b],
            &BREAKER.replace("open_for = \"300ms\"", "open_for = \"60s\""),
            ""
        )
    );
    let gateway = Gateway::start(&text);
    let client = client();
    let url = gateway.url("public", "/");
    for _ in 0..5 {
        get(&client, &url).await;
    }
    assert_eq!(get(&client, &url).await.status, 503);
    let status: serde_json::Value = client
        .get(format!("http://{}/status", gateway.addr("admin")))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    let pool = &status["pools"][0];
    assert_eq!(pool["name"], "app");
    assert_eq!(pool["circuit_breaker"], "open");
    assert_eq!(pool["counters"]["circuit_rejections"], 1);
    assert_eq!(pool["endpoints"][0]["address"], a.addr.to_string());
    assert_eq!(pool["endpoints"][0]["in_rotation"], true);
    assert_eq!(pool["endpoints"][1]["healthy"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_named_by_host_are_resolved_and_refreshed() {
    let backend = FaultBackend::start("named").await;
    let text = format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"localhost:{}\"]\ndns_refresh = \"20ms\"\n\n[[routes]]\npool = \"app\"\n",
        backend.addr.port()
    );
    let gateway = Gateway::start(&text);
    let client = client();
    let url = gateway.url("public", "/");
    // Across many refreshes of an unchanged answer, traffic keeps flowing on pooled
    // connections (a changed answer is covered by the unit test in upstream::conn).
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert_eq!(get(&client, &url).await.backend.as_deref(), Some("named"));
    }
    // 25 refreshes: retiring on each would open 25 connections. A few are allowed for
    // a pooled connection not yet flagged reusable when the next request came.
    let connections = backend.counters().connections.load(Ordering::SeqCst);
    assert!(
        connections <= 5,
        "an unchanged answer must not retire connections: {connections}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_on_a_latency_percentile_adapts_the_delay() {
    let fast_a = FaultBackend::start("a").await;
    let fast_b = FaultBackend::start("b").await;
    let slow = FaultBackend::start("slow").await;
    slow.set(Fault::Latency(Duration::from_secs(2)));
    let gateway = Gateway::start(&config(
        &[&fast_a, &fast_b, &slow],
        "",
        "[[routes]]\npool = \"app\"\nhedge = { percentile = 50, delay = \"300ms\" }\n",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    // Warm-up: until 20 latencies are recorded the fixed 300 ms applies.
    for _ in 0..30 {
        assert_eq!(get(&client, &url).await.status, 200);
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let started = Instant::now();
        assert_eq!(get(&client, &url).await.status, 200);
        slowest = slowest.max(started.elapsed());
    }
    // Now the delay is the pool's median head latency (a millisecond or two): every
    // request, including the ten that first went to the slow endpoint, is well under the
    // fixed 300 ms; 250 ms leaves room for a loaded machine.
    assert!(slowest < Duration::from_millis(250), "slowest {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_by_failure_rate_over_a_window() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    b.set(Fault::Status(502));
    // Consecutive detection off: only the failure rate (≥ 50 % of ≥ 6 attempts) ejects.
    let gateway = Gateway::start(&config(
        &[&a, &b],
        "outlier_detection = { consecutive_5xx = 0, failure_percent = 50, failure_min_requests = 6, interval = \"10s\", base_ejection_time = \"60s\", max_ejection_time = \"60s\", max_ejection_percent = 50 }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let first = tally(&client, &url, 12).await;
    // Alternation: b's sixth attempt is request 12; it breaches the rate and ejects b.
    assert_eq!(first.get("b"), Some(&6), "{first:?}");
    gateway.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("endpoint ejected: outlier")
    });
    let later = tally(&client, &url, 10).await;
    assert_eq!(later.get("a"), Some(&10), "{later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_relay_ejects_an_endpoint_that_refuses_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dead = FaultBackend::start("dead").await;
    dead.refuse();
    let alive = FaultBackend::start("alive").await;
    let gateway = Gateway::start(&format!(
        "[[listeners]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ntcp = {{ pool = \"raw\" }}\n\n[[pools]]\nname = \"raw\"\nendpoints = [\"{}\", \"{}\"]\npassive_health = {{ consecutive_failures = 1, ejection_time = \"60s\" }}\n",
        dead.addr, alive.addr
    ));
    let mut answers = Vec::new();
    for _ in 0..6 {
        let Ok(mut stream) = tokio::net::TcpStream::connect(gateway.addr("tcp")).await else {
            answers.push(false);
            continue;
        };
        if stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .is_err()
        {
            answers.push(false);
            continue;
        }
        // The fault backend keeps connections alive: read until the answer or EOF.
        let mut answer = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut chunk = [0u8; 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("the relay neither answered nor closed"),
            }
            if answer.ends_with(b"ok alive") {
                break;
            }
        }
        answers.push(answer.ends_with(b"ok alive"));
    }
    // The first connection met the dead endpoint and ejected it; the rest reach `alive`.
    assert_eq!(
        answers,
        [false, true, true, true, true, true],
        "{}",
        gateway.stderr.snapshot().join("\n")
    );
    assert_eq!(alive.requests(), 5);
}

// ---- per-endpoint connection limits (SPEC UP-3) ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_endpoint_connection_limit_caps_backend_connections_and_queues_the_rest() {
    let a = FaultBackend::start("a").await;
    let b = FaultBackend::start("b").await;
    for backend in [&a, &b] {
        backend.set(Fault::Latency(Duration::from_millis(150)));
    }
    let gateway = Gateway::start(&config(
        &[&a, &b],
        "max_connections_per_endpoint = 2\nconnection_queue = { max_queue = 100, queue_timeout = \"15s\" }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    // 24 at once against 2 × 2 slots: 20 of them must wait for a slot to free up.
    let answers = futures_util::future::join_all((0..24).map(|_| get(&client, &url))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(a.requests() + b.requests(), 24);
    for backend in [&a, &b] {
        let counters = backend.counters();
        // Connections are kept alive (never closed here), so the number ever accepted is
        // the most that were open at once.
        let connections = counters.connections.load(Ordering::SeqCst);
        let concurrent = counters.max_in_flight.load(Ordering::SeqCst);
        assert!(
            connections <= 2 && concurrent <= 2,
            "{}: {connections} connections, {concurrent} concurrent requests (cap 2)",
            backend.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_at_its_limit_answers_503_with_retry_after() {
    let backend = FaultBackend::start("b").await;
    backend.set(Fault::Latency(Duration::from_secs(2)));
    let gateway = Gateway::start(&config(
        &[&backend],
        "max_connections_per_endpoint = 1\nconnection_queue = { max_queue = 1, queue_timeout = \"200ms\" }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let first = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { get(&client, &url).await }
    });
    eventually(
        "the first request holds the endpoint's only slot",
        || async { backend.counters().in_flight.load(Ordering::SeqCst) == 1 },
    )
    .await;
    // Two more at once: one waits in the queue (and times out), the other finds it full.
    let started = Instant::now();
    let (queued, refused) = tokio::join!(get(&client, &url), get(&client, &url));
    let waited = started.elapsed();
    for answer in [&queued, &refused] {
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert_eq!(
            answer.headers.get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert!(
            answer.body.contains("endpoints_at_limit"),
            "{}",
            answer.body
        );
    }
    assert!(
        waited >= Duration::from_millis(180) && waited < Duration::from_millis(1800),
        "queue timeout 200ms, waited {waited:?}"
    );
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(backend.requests(), 1);
    assert_eq!(backend.counters().connections.load(Ordering::SeqCst), 1);
}

// ---- keep-alive reuse race ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_the_backend_closes_is_resent_on_a_fresh_one() {
    let backend = FaultBackend::start("b").await;
    // The worst case of a backend keep-alive timeout racing new requests: every request
    // that arrives on an already used connection finds it closed.
    backend.set(Fault::CloseReused);
    // No retry conditions at all: the resend does not depend on them.
    let gateway = Gateway::start(&config(
        &[&backend],
        "",
        "[[routes]]\npool = \"app\"\nretry = { max_retries = 0 }\n",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let counts = tally(&client, &url, 60).await;
    assert_eq!(counts.get("b"), Some(&60), "{counts:?}");
    let dropped = backend.counters().dropped.load(Ordering::SeqCst);
    assert!(dropped > 0, "no request met a closed reused connection");
    // A POST is not repeated by itself: the backend may have acted on it. Send until one
    // lands on a reused connection (the backend drops it) and check it was not resent.
    let mut seen = false;
    for _ in 0..20 {
        let before = backend.counters().dropped.load(Ordering::SeqCst);
        let requests = backend.requests();
        let answer = send(client.post(&url).body("x")).await;
        if backend.counters().dropped.load(Ordering::SeqCst) > before {
            assert_eq!(answer.status, 502, "{}", answer.body);
            assert_eq!(backend.requests(), requests, "the POST went out again");
            seen = true;
            break;
        }
        assert_eq!(answer.status, 200);
    }
    assert!(seen, "no POST met a reused connection");
}

// ---- connect-failure retries of streamed bodies ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_post_goes_to_another_endpoint_after_a_connect_failure() {
    let dead = FaultBackend::start("dead").await;
    dead.refuse();
    let good = FaultBackend::start("good").await;
    let gateway = Gateway::start(&config(
        &[&dead, &good],
        "passive_health = { consecutive_failures = 0 }\nretry_budget = { percent = 100 }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/upload");
    // 1 MiB: far above `max_replay_body`, so the body is streamed, never buffered. Round
    // robin sends every other request to the refusing endpoint first.
    let size = 1 << 20;
    for _ in 0..4 {
        let answer = send(client.post(&url).body(vec![b'z'; size])).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.backend.as_deref(), Some("good"));
    }
    assert_eq!(good.requests(), 4);
    assert_eq!(
        good.counters().body_bytes.load(Ordering::SeqCst),
        4 * size,
        "every body arrived whole"
    );
    let line = gateway.wait_access_log(|line| line["attempts"] == 2);
    assert_eq!(line["status"], 200);
}

// ---- per-route × pool breakers ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_own_breaker_opens_without_blocking_another_route_to_the_pool() {
    let backend = FaultBackend::start("b").await;
    backend.set(Fault::Status(500));
    let routes = "[[routes]]\nname = \"guarded\"\npool = \"app\"\ncircuit_breaker = { error_percent = 50, min_requests = 2, open_for = \"60s\" }\n[routes.match]\npath_prefix = \"/guarded\"\n\n[[routes]]\nname = \"open\"\npool = \"app\"\n[routes.match]\npath_prefix = \"/open\"\n";
    // The pool has a breaker too, with a threshold this test never reaches: the route's
    // breaker replaces it for its own traffic.
    let config = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        config(
            &[&backend],
            "circuit_breaker = { error_percent = 50, min_requests = 1000 }",
            routes,
        )
    );
    let gateway = Gateway::start(&config);
    let client = client();
    let guarded = gateway.url("public", "/guarded");
    let open = gateway.url("public", "/open");
    for _ in 0..2 {
        assert_eq!(get(&client, &guarded).await.status, 500);
    }
    let refused = get(&client, &guarded).await;
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused
            .headers
            .get("x-gatehouse-circuit")
            .map(|v| v.as_bytes()),
        Some(&b"open"[..])
    );
    assert_eq!(
        backend.requests(),
        2,
        "the open breaker kept the backend out"
    );
    // The other route to the same pool is unaffected: it reaches the backend.
    backend.set(Fault::Ok);
    for _ in 0..5 {
        assert_eq!(get(&client, &open).await.status, 200);
    }
    assert_eq!(backend.requests(), 7);
    // The route's breaker state survives a reload that keeps the route and pool (with
    // another route added, so a new snapshot is compiled).
    let reloaded = format!(
        "{config}\n[[routes]]\nmatch = {{ path = \"/other\" }}\ndirect_response = {{ body = \"x\" }}\n"
    );
    assert!(gateway.reload_with(&reloaded).contains("reload succeeded"));
    assert_eq!(
        get(&client, &gateway.url("public", "/other")).await.status,
        200
    );
    assert_eq!(get(&client, &guarded).await.status, 503);
    assert_eq!(get(&client, &open).await.status, 200);
    assert_eq!(backend.requests(), 8);
    let metrics = client
        .get(format!("http://{}/metrics", gateway.addr("admin")))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains(
            "gatehouse_upstream_route_circuit_breaker_state{route=\"guarded\",pool=\"app\"} 1\n"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("gatehouse_upstream_circuit_breaker_state{pool=\"app\"} 0\n"));
}

// ---- latency outliers (SPEC UP-5) -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_is_ejected_as_a_latency_outlier_within_max_ejection_percent() {
    let mut backends = Vec::new();
    for name in ["f1", "f2", "f3", "s1", "s2"] {
        backends.push(FaultBackend::start(name).await);
    }
    for slow in &backends[3..] {
        slow.set(Fault::Latency(Duration::from_millis(100)));
    }
    let refs: Vec<&FaultBackend> = backends.iter().collect();
    // Two slow endpoints of five, but at most 20 % (one) may be ejected at once.
    let gateway = Gateway::start(&config(
        &refs,
        "outlier_detection = { consecutive_5xx = 0, latency_percent = 300, latency_min_requests = 3, interval = \"60s\", max_ejection_percent = 20, base_ejection_time = \"60s\" }",
        "",
    ));
    let client = client();
    let url = gateway.url("public", "/");
    let latency_ejections = || -> Vec<String> {
        gateway
            .stderr
            .snapshot()
            .into_iter()
            .filter(|line| line.contains("endpoint ejected: latency outlier"))
            .collect()
    };
    // Round robin: after three rounds every endpoint has three responses to judge.
    tally(&client, &url, 25).await;
    eventually("a latency ejection is logged", || async {
        !latency_ejections().is_empty()
    })
    .await;
    let ejected: Vec<&FaultBackend> = backends[3..]
        .iter()
        .filter(|slow| {
            latency_ejections()
                .iter()
                .any(|line| line.contains(&slow.addr.to_string()))
        })
        .collect();
    assert_eq!(ejected.len(), 1, "{:?}", latency_ejections());
    let out = ejected[0];
    let before = out.requests();
    let counts = tally(&client, &url, 20).await;
    assert_eq!(
        out.requests(),
        before,
        "the ejected endpoint got traffic: {counts:?}"
    );
    // The other slow endpoint stays in rotation: ejecting it too would exceed 20 %.
    assert_eq!(latency_ejections().len(), 1, "{:?}", latency_ejections());
    assert_eq!(counts.values().sum::<usize>(), 20);
    assert_eq!(counts.len(), 4, "{counts:?}");
    // No fast endpoint was ever ejected.
    for fast in &backends[..3] {
        assert!(!latency_ejections()
            .iter()
            .any(|line| line.contains(&fast.addr.to_string())));
    }
}
