//! Span export over OTLP/HTTP with JSON bodies (SPEC OPS-3): sampled requests hand their
//! finished spans (the request, route match, upstream selection, each upstream attempt)
//! to a writer thread through a bounded queue; the thread batches them and POSTs
//! `ExportTraceServiceRequest` documents to `tracing.otlp_endpoint` (e.g. an OpenTelemetry
//! Collector's `http://127.0.0.1:4318/v1/traces`).
//!
//! The request path never waits on export: a full queue drops spans and counts them, an
//! unreachable collector drops the batch and logs once per failure streak. Only plain
//! `http://` endpoints are supported (a local collector or agent does TLS onwards).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Spans queued between requests and the export thread.
const QUEUE_BATCHES: usize = 4096;
/// Largest number of spans in one export request.
const MAX_BATCH_SPANS: usize = 512;
/// Connect, write and read deadline for one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("tracing.otlp_endpoint {0:?}: expected http://host:port/path")]
    Endpoint(String),
    #[error("cannot start the span export thread: {0}")]
    Thread(std::io::Error),
}

/// What kind of span, as OTLP numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub name: &'static str,
    pub kind: SpanKind,
    pub start_nanos: u64,
    pub end_nanos: u64,
    pub attributes: Vec<(&'static str, String)>,
    pub error: bool,
}

/// Nanoseconds since the Unix epoch, the clock OTLP timestamps use.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A fresh non-zero span id.
pub fn new_span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// Where `http://host:port/path` points.
struct Endpoint {
    authority: String,
    path: String,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, OtlpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| OtlpError::Endpoint(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/v1/traces"),
    };
    if authority.is_empty() || !authority.contains(':') {
        return Err(OtlpError::Endpoint(url.into()));
    }
    Ok(Endpoint {
        authority: authority.into(),
        path: path.into(),
    })
}

/// Checks an endpoint URL (for config validation).
pub fn check_endpoint(url: &str) -> Result<(), OtlpError> {
    parse_endpoint(url).map(drop)
}

/// Handle to the export thread; requests send their spans through it.
pub struct Exporter {
    sender: SyncSender<Vec<Span>>,
    pub dropped: AtomicU64,
}

impl Exporter {
    /// Starts the export thread for `url`, flushing at least every `interval`.
    pub fn start(url: &str, interval: Duration) -> Result<Exporter, OtlpError> {
        let endpoint = parse_endpoint(url)?;
        let (sender, receiver) = sync_channel(QUEUE_BATCHES);
        std::thread::Builder::new()
            .name("gatehouse-otlp".into())
            .spawn(move || export_loop(receiver, endpoint, interval))
            .map_err(OtlpError::Thread)?;
        Ok(Exporter {
            sender,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues one request's spans; drops them (counted) when the queue is full.
    pub fn send(&self, spans: Vec<Span>) {
        let count = spans.len() as u64;
        if self.sender.try_send(spans).is_err() {
            self.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}

fn export_loop(receiver: Receiver<Vec<Span>>, endpoint: Endpoint, interval: Duration) {
    let mut batch: Vec<Span> = Vec::new();
    let mut failing = false;
    let mut last_flush = std::time::Instant::now();
    loop {
        let wait = interval.saturating_sub(last_flush.elapsed());
        let disconnected = match receiver.recv_timeout(wait) {
            Ok(spans) => {
                batch.extend(spans);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let due = last_flush.elapsed() >= interval;
        if !batch.is_empty() && (due || disconnected || batch.len() >= MAX_BATCH_SPANS) {
            match post(&endpoint, &encode(&batch)) {
                Ok(()) => {
                    if failing {
                        tracing::info!("span export works again");
                    }
                    failing = false;
                }
                Err(err) => {
                    if !failing {
                        tracing::warn!(error = %err, spans = batch.len(), "span export failed; dropping spans until the collector answers");
                    }
                    failing = true;
                }
            }
            batch.clear();
        }
        if due || batch.is_empty() {
            last_flush = std::time::Instant::now();
        }
        if disconnected {
            return;
        }
    }
}

/// One blocking HTTP/1.1 POST; any 2xx is success.
fn post(endpoint: &Endpoint, body: &str) -> std::io::Result<()> {
    let address = endpoint
        .authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, EXPORT_TIMEOUT)?;
    stream.set_write_timeout(Some(EXPORT_TIMEOUT))?;
    stream.set_read_timeout(Some(EXPORT_TIMEOUT))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        endpoint.path,
        endpoint.authority,
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    // The status line is enough; read a bounded prefix.
    let mut response = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut response[read..])?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let status = std::str::from_utf8(&response[..read])
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(()),
        other => Err(std::io::Error::other(format!(
            "collector answered {other:?}"
        ))),
    }
}

/// The spans of one request, sent when the request finishes (dropped with the response
/// body): the request's own span ends then.
pub struct PendingTrace {
    exporter: std::sync::Arc<Exporter>,
    root: Span,
    children: Vec<Span>,
}

impl PendingTrace {
    pub fn new(exporter: std::sync::Arc<Exporter>, root: Span) -> PendingTrace {
        PendingTrace {
            exporter,
            root,
            children: Vec::with_capacity(3),
        }
    }

    pub fn root(&self) -> &Span {
        &self.root
    }

    pub fn root_mut(&mut self) -> &mut Span {
        &mut self.root
    }

    /// Records a finished child of the request's span.
    pub fn child(
        &mut self,
        name: &'static str,
        kind: SpanKind,
        span_id: u64,
        start_nanos: u64,
        attributes: Vec<(&'static str, String)>,
        error: bool,
    ) {
        self.children.push(Span {
            trace_id: self.root.trace_id,
            span_id,
            parent_id: Some(self.root.span_id),
            name,
            kind,
            start_nanos,
            end_nanos: now_nanos(),
            attributes,
            error,
        });
    }
}

impl Drop for PendingTrace {
    fn drop(&mut self) {
        self.root.end_nanos = now_nanos();
        let mut spans = std::mem::take(&mut self.children);
        spans.push(self.root.clone());
        self.exporter.send(spans);
    }
}

/// The OTLP/JSON `ExportTraceServiceRequest` for `spans`.
pub fn encode(spans: &[Span]) -> String {
    let mut out = String::with_capacity(256 + spans.len() * 400);
    out.push_str(r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"gatehouse"}}]},"scopeSpans":[{"scope":{"name":"gatehouse","version":""#);
    out.push_str(env!("CARGO_PKG_VERSION"));
    out.push_str(r#""},"spans":["#);
    for (index, span) in spans.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"traceId":"{:032x}","spanId":"{:016x}","#,
            span.trace_id, span.span_id
        );
        if let Some(parent) = span.parent_id {
            let _ = write!(out, r#""parentSpanId":"{parent:016x}","#);
        }
        let _ = write!(
            out,
            r#""name":{},"kind":{},"startTimeUnixNano":"{}","endTimeUnixNano":"{}","attributes":["#,
            json_string(span.name),
            span.kind as u8,
            span.start_nanos,
            span.end_nanos.max(span.start_nanos)
        );
        for (attr_index, (key, value)) in span.attributes.iter().enumerate() {
            if attr_index > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                r#"{{"key":{},"value":{{"stringValue":{}}}}}"#,
                json_string(key),
                json_string(value)
            );
        }
        let _ = write!(
            out,
            r#"],"status":{{"code":{}}}}}"#,
            if span.error { 2 } else { 0 }
        );
    }
    out.push_str("]}]}]}");
    out
}

fn json_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_http_and_a_port() {
        assert!(check_endpoint("http://127.0.0.1:4318/v1/traces").is_ok());
        assert!(check_endpoint("http://collector:4318").is_ok());
        assert!(check_endpoint("https://collector:4318/v1/traces").is_err());
        assert!(check_endpoint("http:///v1/traces").is_err());
        assert!(check_endpoint("collector:4318").is_err());
    }

    #[test]
    fn encodes_valid_otlp_json() {
        let span = Span {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            parent_id: Some(1),
            name: "route_match",
            kind: SpanKind::Internal,
            start_nanos: 10,
            end_nanos: 20,
            attributes: vec![("gatehouse.route", "a \"quoted\" name".into())],
            error: false,
        };
        let text = encode(&[span.clone(), span]);
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        let spans = &value["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(spans.as_array().map(Vec::len), Some(2));
        assert_eq!(spans[0]["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(spans[0]["parentSpanId"], "0000000000000001");
        assert_eq!(
            spans[0]["attributes"][0]["value"]["stringValue"],
            "a \"quoted\" name"
        );
        assert_eq!(spans[0]["kind"], 1);
    }
}
