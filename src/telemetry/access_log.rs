//! The access log: one line per request, JSON or logfmt (SPEC OPS-2), with secret query
//! parameters redacted.
//!
//! Request tasks never block on log I/O: each finished request formats its line and hands
//! it to a dedicated writer thread through a bounded channel. When the channel is full the
//! line is dropped and counted, which keeps memory bounded if the disk stalls. SIGUSR1
//! queues a reopen behind the lines already sent, so after logrotate renames the file
//! every line lands in the old file or the new one.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::http::body::BodyError;

enum Message {
    Line(String),
    Reopen,
}

struct Sink {
    sender: SyncSender<Message>,
    dropped: AtomicU64,
    format: AccessLogFormat,
    /// `access_log.redact_query`, lower-cased.
    redact: Vec<String>,
}

/// Handle to the access log; cheap to clone. A disabled log hands out no guards.
#[derive(Clone)]
pub struct AccessLog {
    sink: Option<Arc<Sink>>,
}

impl AccessLog {
    pub fn disabled() -> AccessLog {
        AccessLog { sink: None }
    }

    /// Opens the destination and starts the writer thread.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        if !config.enabled {
            return Ok(AccessLog::disabled());
        }
        let destination = if config.path == "stdout" {
            None
        } else {
            Some(PathBuf::from(&config.path))
        };
        let writer = open(destination.as_ref())?;
        let (sender, receiver) = sync_channel(config.buffer_lines);
        std::thread::Builder::new()
            .name("gatehouse-access-log".into())
            .spawn(move || write_lines(receiver, writer, destination))?;
        Ok(AccessLog {
            sink: Some(Arc::new(Sink {
                sender,
                dropped: AtomicU64::new(0),
                format: config.format,
                redact: config
                    .redact_query
                    .iter()
                    .map(|name| name.to_ascii_lowercase())
                    .collect(),
            })),
        })
    }

    /// Starts a record for one request; the line is written when the guard drops.
    /// `record` is only called when the log is enabled, so a disabled log costs nothing.
    /// A query in the record is redacted here.
    pub fn begin(&self, record: impl FnOnce() -> AccessRecord) -> Option<LogGuard> {
        let sink = self.sink.clone()?;
        let mut record = record();
        if let Some(query) = record.query.take() {
            record.query = Some(redact_query(&query, &sink.redact));
        }
        Some(LogGuard {
            sink,
            started: Instant::now(),
            record: Box::new(record),
            bytes_in: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Asks the writer to reopen its file (after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(sink) = &self.sink {
            let _ = sink.sender.try_send(Message::Reopen);
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.sink
            .as_ref()
            .map_or(0, |sink| sink.dropped.load(Ordering::Relaxed))
    }
}

fn open(destination: Option<&PathBuf>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match destination {
        None => Box::new(std::io::stdout()),
        Some(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
    })
}

fn write_lines(
    receiver: Receiver<Message>,
    writer: Box<dyn Write + Send>,
    destination: Option<PathBuf>,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, writer);
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        // Drain whatever is queued before flushing, so bursts cost one write.
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(line.as_bytes());
                }
                Message::Reopen => {
                    let _ = out.flush();
                    match open(destination.as_ref()) {
                        Ok(writer) => out = BufWriter::with_capacity(64 * 1024, writer),
                        Err(err) => {
                            tracing::error!(error = %err, "cannot reopen the access log; keeping the old file")
                        }
                    }
                }
            }
            next = receiver.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// The fields of one access-log line, in the order they are written. Fields for features
/// a request did not use are `null` (JSON) or left out (logfmt).
#[derive(Serialize, Default)]
pub struct AccessRecord {
    pub time: String,
    pub request_id: String,
    pub client_ip: Option<IpAddr>,
    #[serde(serialize_with = "as_str")]
    pub listener: Arc<str>,
    pub protocol: &'static str,
    pub tls_version: Option<&'static str>,
    #[serde(serialize_with = "opt_as_str")]
    pub sni: Option<Arc<str>>,
    pub method: String,
    pub host: String,
    pub path: String,
    /// With `access_log.redact_query` values replaced by `REDACTED`.
    pub query: Option<String>,
    #[serde(serialize_with = "opt_as_str")]
    pub route: Option<Arc<str>>,
    #[serde(serialize_with = "opt_as_str")]
    pub pool: Option<Arc<str>>,
    #[serde(serialize_with = "opt_as_str")]
    pub endpoint: Option<Arc<str>>,
    pub status: u16,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    pub duration_ms: f64,
    /// Until the upstream response head arrived.
    pub upstream_ms: Option<f64>,
    /// Upstream attempts after the first (no retry policy exists yet: always 0).
    pub retries: u32,
    /// Cache result (`hit`, `miss`, …) once a cache exists.
    pub cache: Option<&'static str>,
    /// The endpoint's breaker state once breakers exist.
    pub breaker: Option<&'static str>,
    /// The canary variant that served the request once canaries exist.
    pub canary: Option<String>,
    /// The W3C trace id, when the request carried or was given a `traceparent`.
    pub trace_id: Option<String>,
    pub error: Option<String>,
    pub user_agent: Option<String>,
    /// Subject of the verified client certificate (mTLS).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_as_str")]
    pub client_cert_subject: Option<Arc<str>>,
    /// Upstream attempts made (more than one when retried or hedged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Resilience events on this request: `retried`, `retry_budget_exhausted`, `panic`,
    /// `circuit_open`, `overloaded`, `hedged`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<&'static str>,
}

fn as_str<S: serde::Serializer>(value: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value)
}

fn opt_as_str<S: serde::Serializer>(
    value: &Option<Arc<str>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.serialize_str(value),
        None => serializer.serialize_none(),
    }
}

impl AccessRecord {
    pub fn now() -> AccessRecord {
        AccessRecord {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ..AccessRecord::default()
        }
    }
}

/// Writes its record when dropped: at the end of the response body, or when the client
/// goes away, so every request is logged exactly once.
pub struct LogGuard {
    sink: Arc<Sink>,
    started: Instant,
    record: Box<AccessRecord>,
    /// Shared with the request body, which may outlive the response head.
    bytes_in: Arc<AtomicU64>,
}

impl LogGuard {
    pub fn record(&mut self) -> &mut AccessRecord {
        &mut self.record
    }

    /// The counter the request body adds its bytes to.
    pub fn bytes_in_counter(&self) -> Arc<AtomicU64> {
        self.bytes_in.clone()
    }

    pub fn add_bytes_out(&mut self, bytes: u64) {
        self.record.bytes_out += bytes;
    }

    pub fn body_error(&mut self, error: &BodyError) {
        self.record.error = Some(error.to_string());
    }

    pub fn mark_upstream_done(&mut self) {
        self.record.upstream_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.record.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let mut line = match self.sink.format {
            AccessLogFormat::Json => match serde_json::to_string(&*self.record) {
                Ok(line) => line,
                Err(_) => return,
            },
            AccessLogFormat::Logfmt => logfmt(&self.record),
        };
        line.push('\n');
        match self.sink.sender.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.sink.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Replaces the values of the named parameters (`names` lower-cased) with `REDACTED`,
/// leaving everything else byte for byte.
pub fn redact_query(query: &str, names: &[String]) -> String {
    if names.is_empty() {
        return query.to_string();
    }
    let mut out = String::with_capacity(query.len());
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            out.push('&');
        }
        let (raw_key, value) = match pair.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (pair, None),
        };
        let key: String = form_urlencoded::parse(raw_key.as_bytes())
            .next()
            .map(|(key, _)| key.to_ascii_lowercase())
            .unwrap_or_default();
        out.push_str(raw_key);
        match value {
            Some(_) if names.contains(&key) => out.push_str("=REDACTED"),
            Some(value) => {
                out.push('=');
                out.push_str(value);
            }
            None => {}
        }
    }
    out
}

/// One logfmt line: `key=value` pairs in field order; values with spaces, quotes, `=` or
/// control characters are quoted with Go-style escapes; absent fields are left out.
fn logfmt(record: &AccessRecord) -> String {
    let mut out = String::with_capacity(512);
    let mut field = |key: &str, value: &str| {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(key);
        out.push('=');
        let plain = !value.is_empty()
            && !value
                .chars()
                .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
        if plain {
            out.push_str(value);
        } else {
            out.push('"');
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
    };
    field("time", &record.time);
    field("request_id", &record.request_id);
    if let Some(ip) = record.client_ip {
        field("client_ip", &ip.to_string());
    }
    field("listener", &record.listener);
    field("protocol", record.protocol);
    if let Some(version) = record.tls_version {
        field("tls_version", version);
    }
    if let Some(sni) = &record.sni {
        field("sni", sni);
    }
    field("method", &record.method);
    field("host", &record.host);
    field("path", &record.path);
    if let Some(query) = &record.query {
        field("query", query);
    }
    for (key, value) in [
        ("route", &record.route),
        ("pool", &record.pool),
        ("endpoint", &record.endpoint),
    ] {
        if let Some(value) = value {
            field(key, value);
        }
    }
    field("status", &record.status.to_string());
    field("bytes_in", &record.bytes_in.to_string());
    field("bytes_out", &record.bytes_out.to_string());
    field("duration_ms", &format!("{:.3}", record.duration_ms));
    if let Some(upstream) = record.upstream_ms {
        field("upstream_ms", &format!("{upstream:.3}"));
    }
    field("retries", &record.retries.to_string());
    for (key, value) in [("cache", record.cache), ("breaker", record.breaker)] {
        if let Some(value) = value {
            field(key, value);
        }
    }
    for (key, value) in [
        ("canary", &record.canary),
        ("trace_id", &record.trace_id),
        ("error", &record.error),
        ("user_agent", &record.user_agent),
    ] {
        if let Some(value) = value {
            field(key, value);
        }
    }
    if let Some(subject) = &record.client_cert_subject {
        field("client_cert_subject", subject);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_only_named_values() {
        let names = vec!["token".to_string(), "api_key".to_string()];
        assert_eq!(
            redact_query("a=1&TOKEN=s3cret&b&api%5Fkey=x&c=2", &names),
            "a=1&TOKEN=REDACTED&b&api%5Fkey=REDACTED&c=2"
        );
        assert_eq!(redact_query("token", &names), "token");
        assert_eq!(redact_query("x=token", &names), "x=token");
    }

    #[test]
    fn logfmt_quotes_what_needs_quoting() {
        let record = AccessRecord {
            method: "GET".into(),
            path: "/a b".into(),
            query: Some("x=\"1\"".into()),
            user_agent: Some("curl/8".into()),
            ..AccessRecord::default()
        };
        let line = logfmt(&record);
        assert!(line.contains("method=GET "), "{line}");
        assert!(line.contains("path=\"/a b\" "), "{line}");
        assert!(line.contains("query=\"x=\\\"1\\\"\" "), "{line}");
        assert!(line.contains("host=\"\" "), "{line}");
        assert!(line.ends_with("user_agent=curl/8"), "{line}");
    }
}
