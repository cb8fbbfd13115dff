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

/// The OTLP trace messages a receiver decodes, declared here from the field numbers of
/// `opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto` (independently
/// of the gateway's own declarations), with only the fields the tests read.
mod pb {
    use prost::Message;
    use serde_json::{json, Value};

    #[derive(Clone, PartialEq, Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(enumeration = "i32", tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Status {
        #[prost(int32, tag = "3")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct AnyValue {
        #[prost(oneof = "Any", tags = "1, 3")]
        pub value: Option<Any>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Any {
        #[prost(string, tag = "1")]
        String(String),
        #[prost(int64, tag = "3")]
        Int(i64),
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The spans in the OTLP/JSON shape the JSON receiver stores, so one set of assertions
    /// serves both encodings.
    pub fn to_json(request: &ExportTraceServiceRequest) -> Vec<Value> {
        let mut spans = Vec::new();
        for resource in &request.resource_spans {
            for scope in &resource.scope_spans {
                for span in &scope.spans {
                    let attributes: Vec<Value> = span
                        .attributes
                        .iter()
                        .map(|attr| {
                            let value = match attr.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Any::String(s)) => json!({ "stringValue": s }),
                                Some(Any::Int(i)) => json!({ "intValue": i.to_string() }),
                                None => json!({}),
                            };
                            json!({ "key": attr.key, "value": value })
                        })
                        .collect();
                    let mut value = json!({
                        "traceId": hex(&span.trace_id),
                        "spanId": hex(&span.span_id),
                        "name": span.name,
                        "kind": span.kind,
                        "startTimeUnixNano": span.start_time_unix_nano.to_string(),
                        "endTimeUnixNano": span.end_time_unix_nano.to_string(),
                        "attributes": attributes,
                        "status": { "code": span.status.as_ref().map_or(0, |s| s.code) },
                    });
                    if !span.parent_span_id.is_empty() {
                        value["parentSpanId"] = json!(hex(&span.parent_span_id));
                    }
                    spans.push(value);
                }
            }
        }
        spans
    }
}

use prost::Message as _;

/// An OTLP/HTTP receiver: every POSTed JSON or protobuf document's spans, flattened.
struct Receiver {
    backend: Backend,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        Receiver::start_with(None).await
    }

    /// A receiver speaking HTTPS with `pair` as its certificate when given.
    async fn start_with(pair: Option<&support::tls::Pair>) -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        let handler: support::Handler = Arc::new(move |request| {
            let sink = sink.clone();
            Box::pin(async move {
                let path = request.uri().path().to_string();
                let protobuf = request
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "application/x-protobuf");
                let bytes = request
                    .into_body()
                    .collect()
                    .await
                    .map(|body| body.to_bytes())
                    .unwrap_or_default();
                if path == "/v1/traces" && protobuf {
                    let decoded = pb::ExportTraceServiceRequest::decode(bytes.as_ref())
                        .expect("a valid protobuf ExportTraceServiceRequest");
                    sink.lock().expect("lock").extend(pb::to_json(&decoded));
                } else if path == "/v1/traces" {
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
        });
        let backend = match pair {
            Some(pair) => support::tls::tls_backend(pair, handler).await,
            None => Backend::start(handler).await,
        };
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
    exports_request_route_selection_and_attempt_spans("http/json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_as_otlp_protobuf() {
    exports_request_route_selection_and_attempt_spans("http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_https_verified_against_the_configured_ca() {
    let ca = support::tls::Ca::new("otlp test ca");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = ca.write(dir.path(), "ca.pem");
    let receiver = Receiver::start_with(Some(&ca.server(&["127.0.0.1"]))).await;
    let backend = Backend::echo().await;
    let port = receiver.backend.addr.port();
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        &format!(
            "[tracing]\nenabled = true\notlp_endpoint = \"https://127.0.0.1:{port}/v1/traces\"\notlp_protocol = \"http/protobuf\"\notlp_ca = \"{}\"\nexport_interval = \"50ms\"\n\n[[routes]]\npool = \"app\"\n",
            ca_path.display()
        ),
    ));
    json_of(http1_client().get(gateway.url("public", "/tls")).header(
        "traceparent",
        "00-33333333333333333333333333333333-4444444444444444-01",
    ))
    .await;
    let spans = receiver
        .trace("33333333333333333333333333333333", &["gatehouse.request"])
        .await;
    assert!(spans
        .iter()
        .any(|span| attribute(span, "url.path") == Some("/tls")));
    // Without the CA (system roots only) the collector's certificate is not trusted: the
    // export fails and nothing is delivered.
    let untrusting = Gateway::start(&config_with_pool(
        &[backend.addr],
        &format!(
            "[tracing]\nenabled = true\notlp_endpoint = \"https://127.0.0.1:{port}/v1/traces\"\notlp_protocol = \"http/protobuf\"\nexport_interval = \"50ms\"\n\n[[routes]]\npool = \"app\"\n"
        ),
    ));
    json_of(
        http1_client()
            .get(untrusting.url("public", "/untrusted"))
            .header(
                "traceparent",
                "00-55555555555555555555555555555555-6666666666666666-01",
            ),
    )
    .await;
    untrusting.stderr.wait_for(0, support::PATIENCE, |line| {
        line.contains("span export failed")
    });
    assert!(receiver
        .spans
        .lock()
        .expect("lock")
        .iter()
        .all(|span| span["traceId"] != "55555555555555555555555555555555"));
}

async fn exports_request_route_selection_and_attempt_spans(protocol: &str) {
    let receiver = Receiver::start().await;
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        &format!(
            "[tracing]\nenabled = true\nsample_ratio = 1.0\notlp_endpoint = \"http://{}/v1/traces\"\notlp_protocol = \"{protocol}\"\nexport_interval = \"50ms\"\n\n[[routes]]\nname = \"api\"\npool = \"app\"\n",
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

#[tokio::test]
async fn otlp_settings_are_validated_with_field_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[tracing]\nenabled = true\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\notlp_ca = \"ca.pem\"\n\n[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\n",
    )
    .expect("write");
    let output = support::run_to_exit(&["validate", path.to_str().expect("path")], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tracing.otlp_ca: only for an https:// tracing.otlp_endpoint"),
        "{stderr}"
    );
    std::fs::write(
        &path,
        "[tracing]\notlp_protocol = \"grpc\"\n\n[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\n",
    )
    .expect("write");
    let output = support::run_to_exit(&["validate", path.to_str().expect("path")], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tracing.otlp_protocol"), "{stderr}");
}
