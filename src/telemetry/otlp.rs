//! Span export over OTLP/HTTP (SPEC OPS-3): sampled requests hand their
//! finished spans (the request, route match, upstream selection, each upstream attempt)
//! to a writer thread through a bounded queue; the thread batches them and POSTs
//! `ExportTraceServiceRequest` documents to `tracing.otlp_endpoint` (e.g. an OpenTelemetry
//! Collector's `http://127.0.0.1:4318/v1/traces`), as JSON or protobuf
//! (`tracing.otlp_protocol`), over plain HTTP or HTTPS (rustls; `tracing.otlp_ca`).
//!
//! The request path never waits on export: a full queue drops spans and counts them, an
//! unreachable collector drops the batch and logs once per failure streak.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::OtlpProtocol;

/// Spans queued between requests and the export thread.
const QUEUE_BATCHES: usize = 4096;
/// Largest number of spans in one export request.
const MAX_BATCH_SPANS: usize = 512;
/// Connect, write and read deadline for one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "tracing.otlp_endpoint {0:?}: expected http://host:port/path or https://host:port/path"
    )]
    Endpoint(String),
    #[error("tracing.otlp_ca: {0}")]
    Tls(#[source] crate::tls::TlsError),
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

/// Where `http(s)://host:port/path` points.
struct Endpoint {
    authority: String,
    path: String,
    /// For `https://`: the TLS settings and the name to verify.
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// The endpoint's parts; `https` tells whether it wants TLS.
fn parse_endpoint(url: &str) -> Result<(Endpoint, bool), OtlpError> {
    let (rest, https) = match url.strip_prefix("https://") {
        Some(rest) => (rest, true),
        None => (
            url.strip_prefix("http://")
                .ok_or_else(|| OtlpError::Endpoint(url.into()))?,
            false,
        ),
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/v1/traces"),
    };
    if authority.is_empty() || !authority.contains(':') {
        return Err(OtlpError::Endpoint(url.into()));
    }
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    if https && rustls::pki_types::ServerName::try_from(host).is_err() {
        return Err(OtlpError::Endpoint(url.into()));
    }
    Ok((
        Endpoint {
            authority: authority.into(),
            path: path.into(),
            tls: None,
        },
        https,
    ))
}

/// Checks an endpoint URL (for config validation).
pub fn check_endpoint(url: &str) -> Result<(), OtlpError> {
    parse_endpoint(url).map(drop)
}

/// The endpoint with its TLS settings loaded (`ca`: PEM bundle; none: system roots).
fn endpoint(url: &str, ca: Option<&str>) -> Result<Endpoint, OtlpError> {
    let (mut endpoint, https) = parse_endpoint(url)?;
    if https {
        let config = crate::tls::client_config(ca).map_err(OtlpError::Tls)?;
        let host = match endpoint.authority.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => endpoint
                .authority
                .rsplit_once(':')
                .map_or(&*endpoint.authority, |(host, _)| host),
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| OtlpError::Endpoint(url.into()))?;
        endpoint.tls = Some((config, name));
    }
    Ok(endpoint)
}

/// Handle to the export thread; requests send their spans through it.
pub struct Exporter {
    sender: SyncSender<Vec<Span>>,
    pub dropped: AtomicU64,
}

impl Exporter {
    /// Starts the export thread for `url`, flushing at least every `interval`.
    pub fn start(
        url: &str,
        interval: Duration,
        protocol: OtlpProtocol,
        ca: Option<&str>,
    ) -> Result<Exporter, OtlpError> {
        let endpoint = endpoint(url, ca)?;
        let (sender, receiver) = sync_channel(QUEUE_BATCHES);
        std::thread::Builder::new()
            .name("gatehouse-otlp".into())
            .spawn(move || export_loop(receiver, endpoint, interval, protocol))
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

fn export_loop(
    receiver: Receiver<Vec<Span>>,
    endpoint: Endpoint,
    interval: Duration,
    protocol: OtlpProtocol,
) {
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
            let (content_type, body) = match protocol {
                OtlpProtocol::HttpJson => ("application/json", encode(&batch).into_bytes()),
                OtlpProtocol::HttpProtobuf => ("application/x-protobuf", proto::encode(&batch)),
            };
            match post(&endpoint, content_type, &body) {
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

/// One blocking HTTP/1.1 POST (over TLS for `https://`); any 2xx is success.
fn post(endpoint: &Endpoint, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    let address = endpoint
        .authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let stream = TcpStream::connect_timeout(&address, EXPORT_TIMEOUT)?;
    // The timeouts bound the TLS handshake too: it runs inside the first write.
    stream.set_write_timeout(Some(EXPORT_TIMEOUT))?;
    stream.set_read_timeout(Some(EXPORT_TIMEOUT))?;
    match &endpoint.tls {
        None => exchange(stream, endpoint, content_type, body),
        Some((config, name)) => {
            let connection = rustls::ClientConnection::new(config.clone(), name.clone())
                .map_err(std::io::Error::other)?;
            exchange(
                rustls::StreamOwned::new(connection, stream),
                endpoint,
                content_type,
                body,
            )
        }
    }
}

fn exchange(
    mut stream: impl Read + Write,
    endpoint: &Endpoint,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        endpoint.path,
        endpoint.authority,
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
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

/// OTLP/HTTP protobuf: the `ExportTraceServiceRequest` messages of
/// `opentelemetry/proto/collector/trace/v1` with the fields Gatehouse sets, declared with
/// prost's derive (field numbers as in the `.proto` files) so no code generator or `protoc`
/// is needed.
pub mod proto {
    use prost::Message;

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
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
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
        #[prost(int32, tag = "6")]
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
        #[prost(string, tag = "2")]
        pub message: String,
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

    /// Only the `string_value` arm of the `AnyValue` oneof is used.
    #[derive(Clone, PartialEq, Message)]
    pub struct AnyValue {
        #[prost(string, tag = "1")]
        pub string_value: String,
    }

    fn string(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                string_value: value.to_owned(),
            }),
        }
    }

    /// The protobuf `ExportTraceServiceRequest` for `spans`.
    pub fn encode(spans: &[super::Span]) -> Vec<u8> {
        let spans = spans
            .iter()
            .map(|span| Span {
                trace_id: span.trace_id.to_be_bytes().to_vec(),
                span_id: span.span_id.to_be_bytes().to_vec(),
                parent_span_id: span
                    .parent_id
                    .map_or_else(Vec::new, |parent| parent.to_be_bytes().to_vec()),
                name: span.name.to_owned(),
                kind: i32::from(span.kind as u8),
                start_time_unix_nano: span.start_nanos,
                end_time_unix_nano: span.end_nanos.max(span.start_nanos),
                attributes: span
                    .attributes
                    .iter()
                    .map(|(key, value)| string(key, value))
                    .collect(),
                status: Some(Status {
                    message: String::new(),
                    code: if span.error { 2 } else { 0 },
                }),
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![string("service.name", "gatehouse")],
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "gatehouse".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            }],
        }
        .encode_to_vec()
    }
}

fn json_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_http_or_https_and_a_port() {
        assert!(check_endpoint("http://127.0.0.1:4318/v1/traces").is_ok());
        assert!(check_endpoint("http://collector:4318").is_ok());
        assert!(check_endpoint("https://collector:4318/v1/traces").is_ok());
        assert!(check_endpoint("https://[::1]:4318/v1/traces").is_ok());
        assert!(check_endpoint("ftp://collector:4318/v1/traces").is_err());
        assert!(check_endpoint("https://collector/v1/traces").is_err());
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
