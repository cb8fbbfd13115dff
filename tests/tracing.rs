//! W3C trace context propagation (SPEC OPS-3) through the real binary: a new trace is
//! started when the client sends none, a valid one is continued with the gateway's own
//! span id, the sampling ratio sets the flag of new traces, and the trace id is logged.

mod support;

use support::{config_with_pool, echoed_header, http1_client, json_of, Backend, Gateway};

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

/// (trace id, parent id, flags) of a traceparent value.
fn fields(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    assert!(value.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_started_or_continued_and_sent_upstream() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[tracing]\nenabled = true\nsample_ratio = 1.0\n\n[[routes]]\npool = \"app\"\n",
    ));
    let client = http1_client();

    let answer = json_of(
        client
            .get(gateway.url("public", "/new"))
            .header("x-request-id", "trace-new"),
    )
    .await;
    let sent = echoed_header(&answer, "traceparent");
    assert_eq!(sent.len(), 1, "{answer}");
    let (trace_id, _, flags) = fields(&sent[0]);
    assert_eq!(flags, "01", "ratio 1.0 samples every new trace");
    let line = gateway.wait_access_log(|line| line["request_id"] == "trace-new");
    assert_eq!(line["trace_id"], trace_id);

    let answer = json_of(
        client
            .get(gateway.url("public", "/continued"))
            .header("traceparent", INCOMING)
            .header("tracestate", "vendor=1")
            .header("x-request-id", "trace-continued"),
    )
    .await;
    let sent = echoed_header(&answer, "traceparent");
    assert_eq!(sent.len(), 1, "{answer}");
    let (trace_id, parent, flags) = fields(&sent[0]);
    assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        parent, "00f067aa0ba902b7",
        "the gateway's own span is the new parent"
    );
    assert_eq!(flags, "00", "the caller's sampling decision is kept");
    assert_eq!(echoed_header(&answer, "tracestate"), vec!["vendor=1"]);
    let line = gateway.wait_access_log(|line| line["request_id"] == "trace-continued");
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");

    // A malformed traceparent starts a new trace instead of being forwarded.
    let answer = json_of(
        client
            .get(gateway.url("public", "/bad"))
            .header("traceparent", "00-zz-00f067aa0ba902b7-01"),
    )
    .await;
    let sent = echoed_header(&answer, "traceparent");
    assert_eq!(sent.len(), 1);
    assert_ne!(fields(&sent[0]).0, "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_ratio_zero_marks_new_traces_unsampled_and_off_by_default() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[tracing]\nenabled = true\nsample_ratio = 0.0\n\n[[routes]]\npool = \"app\"\n",
    ));
    let client = http1_client();
    for _ in 0..20 {
        let answer = json_of(client.get(gateway.url("public", "/x"))).await;
        let sent = echoed_header(&answer, "traceparent");
        assert_eq!(fields(&sent[0]).2, "00");
    }
    drop(gateway);

    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\n",
    ));
    let answer = json_of(client.get(gateway.url("public", "/x"))).await;
    assert!(echoed_header(&answer, "traceparent").is_empty(), "{answer}");
}
