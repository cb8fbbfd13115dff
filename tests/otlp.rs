//! OpenTelemetry span export (SPEC OPS-3) to an OTLP/HTTP receiver in the test: sampled
//! requests produce a request span with route-match, upstream-selection and
//! upstream-attempt children; the attempt is the parent the backend sees in
//! `traceparent`; unsampled requests export nothing.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::Value;
use support::{config_with_pool, echoed_header, full, http1_client, json_of, Backend, Gateway};

/// An OTLP/HTTP receiver: every POSTed JSON document's spans, flattened.
struct Receiver {
    backend: Backend,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        let backend = Backend::start(Arc::new(move |request| {
            let sink = sink.clone();
            Box::pin(async move {
                let path = request.uri().path().to_string();
                let bytes = request
                    .into_body()
                    .collect()
                    .await
                    .map(|body| body.to_bytes())
                    .unwrap_or_default();
                if path == "/v1/traces" {
                    if let Ok(document) = serde_json::from_slice::<Value>(&bytes) {
                        let mut sink = sink.lock().expect("lock");
                        for resource in document["resourceSpans"].as_array().into_iter().flatten() {
                            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                                sink.extend(
                                    scope["spans"].as_array().into_iter().flatten().cloned(),
                                );
                            }
                        }
                    }
                }
                http::Response::new(full("{}"))
            })
        }))
        .await;
        Receiver { backend, spans }
    }

    /// Waits until spans of `trace_id` include every name in `names`.
    async fn trace(&self, trace_id: &str, names: &[&str]) -> Vec<Value> {
        let deadline = Instant::now() + support::PATIENCE;
        loop {
            let spans: Vec<Value> = self
                .spans
                .lock()
                .expect("lock")
                .iter()
                .filter(|span| span["traceId"] == trace_id)
                .cloned()
                .collect();
            if names
                .iter()
                .all(|name| spans.iter().any(|span| span["name"] == *name))
            {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans of {trace_id} not exported: {spans:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|attr| attr["key"] == key)?["value"]["stringValue"]
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_requests_export_request_route_selection_and_attempt_spans() {
    let receiver = Receiver::start().await;
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        &format!(
            "[tracing]\nenabled = true\nsample_ratio = 1.0\notlp_endpoint = \"http://{}/v1/traces\"\nexport_interval = \"50ms\"\n\n[[routes]]\nname = \"api\"\npool = \"app\"\n",
            receiver.backend.addr
        ),
    ));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/orders/7"))
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
    )
    .await;
    let sent = echoed_header(&answer, "traceparent");
    assert_eq!(sent.len(), 1);
    let upstream_parent = sent[0].split('-').nth(2).expect("parent id").to_string();

    let spans = receiver
        .trace(
            "0af7651916cd43dd8448eb211c80319c",
            &[
                "gatehouse.request",
                "route_match",
                "upstream_select",
                "upstream_attempt",
            ],
        )
        .await;
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|span| span["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span"))
    };
    let root = by_name("gatehouse.request");
    assert_eq!(
        root["parentSpanId"], "b7ad6b7169203331",
        "continues the caller's span"
    );
    assert_eq!(root["kind"], 2);
    assert_eq!(attribute(root, "http.request.method"), Some("GET"));
    assert_eq!(attribute(root, "url.path"), Some("/orders/7"));
    assert_eq!(attribute(root, "http.response.status_code"), Some("200"));
    assert_eq!(attribute(root, "gatehouse.route"), Some("api"));
    let root_id = root["spanId"].as_str().expect("span id");
    for name in ["route_match", "upstream_select", "upstream_attempt"] {
        assert_eq!(
            by_name(name)["parentSpanId"],
            root_id,
            "{name} is a child of the request"
        );
    }
    assert_eq!(
        attribute(by_name("route_match"), "gatehouse.route"),
        Some("api")
    );
    let select = by_name("upstream_select");
    assert_eq!(attribute(select, "gatehouse.pool"), Some("app"));
    assert_eq!(
        attribute(select, "gatehouse.endpoint"),
        Some(&*backend.addr.to_string())
    );
    let attempt = by_name("upstream_attempt");
    assert_eq!(attempt["kind"], 3);
    assert_eq!(
        attempt["spanId"],
        upstream_parent.as_str(),
        "the backend's parent is the attempt"
    );
    assert_eq!(attribute(attempt, "http.response.status_code"), Some("200"));
    for span in &spans {
        let start: u64 = span["startTimeUnixNano"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("start");
        let end: u64 = span["endTimeUnixNano"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("end");
        assert!(start > 0 && end >= start, "{span}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_ratio_decides_which_new_traces_are_exported() {
    let receiver = Receiver::start().await;
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        &format!(
            "[tracing]\nenabled = true\nsample_ratio = 0.0\notlp_endpoint = \"http://{}/v1/traces\"\nexport_interval = \"50ms\"\n\n[[routes]]\npool = \"app\"\n",
            receiver.backend.addr
        ),
    ));
    let client = http1_client();
    for _ in 0..20 {
        let answer = json_of(client.get(gateway.url("public", "/unsampled"))).await;
        assert!(echoed_header(&answer, "traceparent")[0].ends_with("-00"));
    }
    // A caller's sampled trace is still exported (parent-based sampling); once it is, the
    // unsampled ones before it would have been too.
    json_of(client.get(gateway.url("public", "/sampled")).header(
        "traceparent",
        "00-11111111111111111111111111111111-2222222222222222-01",
    ))
    .await;
    receiver
        .trace("11111111111111111111111111111111", &["gatehouse.request"])
        .await;
    let exported = receiver.spans.lock().expect("lock").clone();
    assert!(
        exported
            .iter()
            .all(|span| span["traceId"] == "11111111111111111111111111111111"),
        "unsampled traces were exported: {exported:?}"
    );
}
