//! The access log: one JSON object per line, per request (SPEC OPS-2).
//!
//! Request tasks never block on log I/O: each finished request formats its line and hands
//! it to a dedicated writer thread through a bounded channel. When the channel is full the
//! line is dropped and counted, which keeps memory bounded if the disk stalls.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::config::AccessLogConfig;
use crate::http::body::BodyError;

enum Message {
    Line(String),
    Reopen,
}

struct Sink {
    sender: SyncSender<Message>,
    dropped: AtomicU64,
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
            })),
        })
    }

    /// Starts a record for one request; the line is written when the guard drops.
    /// `record` is only called when the log is enabled, so a disabled log costs nothing.
    pub fn begin(&self, record: impl FnOnce() -> AccessRecord) -> Option<LogGuard> {
        let sink = self.sink.clone()?;
        Some(LogGuard {
            sink,
            started: Instant::now(),
            record: Box::new(record()),
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

/// The fields of one access-log line.
#[derive(Serialize, Default)]
pub struct AccessRecord {
    pub time: String,
    pub request_id: String,
    pub client_ip: Option<IpAddr>,
    #[serde(serialize_with = "as_str")]
    pub listener: Arc<str>,
    pub protocol: &'static str,
    pub method: String,
    pub host: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(serialize_with = "opt_as_str")]
    pub route: Option<Arc<str>>,
    #[serde(serialize_with = "opt_as_str")]
    pub pool: Option<Arc<str>>,
    #[serde(serialize_with = "opt_as_str")]
    pub endpoint: Option<Arc<str>>,
    pub status: u16,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Subject of the verified client certificate (mTLS).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_as_str")]
    pub client_cert_subject: Option<Arc<str>>,
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
}

impl LogGuard {
    pub fn record(&mut self) -> &mut AccessRecord {
        &mut self.record
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
        let Ok(mut line) = serde_json::to_string(&*self.record) else {
            return;
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
