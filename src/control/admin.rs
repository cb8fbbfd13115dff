//! The REST admin API (SPEC CTRL-4, OPS-4) on its own listener, never on a data-plane one:
//! health and readiness, the current config, validate, diff, apply with `If-Match`,
//! versions, rollback, status and the audit log. JSON in and out (configs also as TOML).
//!
//! Admin errors map to statuses in one place, `ApiError::status`. Every request body is
//! bounded in size and time, and so is the number of admin connections.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, ETAG, IF_MATCH, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use super::auth::{Auth, AuthError, Caller};
use super::diff::{diff, FieldChange};
use super::{Change, Control, ControlError};
use crate::config::{AdminScope, ConfigError, Format};

/// Largest request body (a config).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// A request body must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// A request header block must arrive within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// Longest `x-gatehouse-message` kept in the audit log.
const MAX_MESSAGE_BYTES: usize = 1024;
const MAX_LIST_LIMIT: u32 = 1000;
const DEFAULT_LIST_LIMIT: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.bind: cannot bind {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a request can fail with, mapped to a status in `status`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no such admin endpoint")]
    NotFound,
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("send the config with Content-Type application/json or application/toml")]
    UnsupportedMediaType,
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("request body not received within {}s", BODY_TIMEOUT.as_secs())]
    BodyTimeout,
    #[error("the admin task failed: {0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => StatusCode::UNAUTHORIZED,
            ApiError::Auth(AuthError::Forbidden) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Control(err) => match err {
                ControlError::Invalid(_) | ControlError::Rejected(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ControlError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
                ControlError::UnknownVersion(_) => StatusCode::NOT_FOUND,
                ControlError::Store(_)
                | ControlError::Gateway(_)
                | ControlError::StoredInvalid { .. }
                | ControlError::ReloadInStoreMode
                | ControlError::NoConfigFile
                | ControlError::Serialize(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => "unauthorized",
            ApiError::Auth(AuthError::Forbidden) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::TooLarge => "body_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::Internal(_) => "internal",
            ApiError::Control(err) => match err {
                ControlError::Invalid(_) => "invalid_config",
                ControlError::Rejected(_) => "rejected",
                ControlError::Stale { .. } => "stale_version",
                ControlError::UnknownVersion(_) => "unknown_version",
                _ => "internal",
            },
        }
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut body = json!({
            "error": self.code(),
            "message": self.to_string(),
            "status": status.as_u16(),
        });
        match self {
            ApiError::Control(ControlError::Invalid(errors)) => {
                body["message"] = json!(format!("{} error(s) in the config", errors.0.len()));
                body["errors"] = errors_json(&errors.0);
            }
            ApiError::Control(ControlError::Stale { current, .. }) => {
                body["current_version"] = json!(current);
            }
            _ => {}
        }
        if status.is_server_error() {
            tracing::error!(error = %self, "admin request failed");
        }
        let mut response = json_response(status, &body);
        match self {
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => {
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed(allowed) => {
                response
                    .headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allowed));
            }
            _ => {}
        }
        response
    }
}

fn errors_json(errors: &[ConfigError]) -> Value {
    Value::Array(
        errors
            .iter()
            .map(|error| json!({"path": error.path, "message": error.message}))
            .collect(),
    )
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The admin endpoints. `Public` ones (probes) need no token.
enum Endpoint {
    Healthz,
    Ready,
    /// Prometheus exposition; its scope depends on `metrics.require_token`.
    Metrics,
    GetConfig,
    PutConfig,
    Validate,
    Diff,
    Versions,
    Version(i64),
    Rollback(i64),
    Status,
    Audit,
}

impl Endpoint {
    fn scope(&self) -> Option<AdminScope> {
        match self {
            Endpoint::Healthz | Endpoint::Ready | Endpoint::Metrics => None,
            Endpoint::GetConfig
            | Endpoint::Versions
            | Endpoint::Version(_)
            | Endpoint::Status
            | Endpoint::Audit
            // Validate and diff change nothing.
            | Endpoint::Validate
            | Endpoint::Diff => Some(AdminScope::Read),
            Endpoint::PutConfig | Endpoint::Rollback(_) => Some(AdminScope::Admin),
        }
    }
}

/// The route table: path → the methods it takes. Kept in one place so the table and the
/// documentation in OPERATIONS.md are easy to compare.
fn route(method: &Method, path: &str) -> Result<Endpoint, ApiError> {
    let only = |allowed: &'static str, expected: Method, endpoint: Endpoint| {
        if *method == expected {
            Ok(endpoint)
        } else {
            Err(ApiError::MethodNotAllowed(allowed))
        }
    };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["healthz"] => only("GET", Method::GET, Endpoint::Healthz),
        ["ready"] => only("GET", Method::GET, Endpoint::Ready),
        ["metrics"] => only("GET", Method::GET, Endpoint::Metrics),
        ["status"] => only("GET", Method::GET, Endpoint::Status),
        ["audit"] => only("GET", Method::GET, Endpoint::Audit),
        ["config"] => match *method {
            Method::GET => Ok(Endpoint::GetConfig),
            Method::PUT => Ok(Endpoint::PutConfig),
            _ => Err(ApiError::MethodNotAllowed("GET, PUT")),
        },
        ["config", "validate"] => only("POST", Method::POST, Endpoint::Validate),
        ["config", "diff"] => only("POST", Method::POST, Endpoint::Diff),
        ["config", "versions"] => only("GET", Method::GET, Endpoint::Versions),
        ["config", "versions", version] => only(
            "GET",
            Method::GET,
            Endpoint::Version(parse_version(version)?),
        ),
        ["config", "rollback", version] => only(
            "POST",
            Method::POST,
            Endpoint::Rollback(parse_version(version)?),
        ),
        _ => Err(ApiError::NotFound),
    }
}

fn parse_version(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|version| *version > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("version {text:?} is not a positive integer")))
}

struct Admin {
    control: Arc<Control>,
    auth: Auth,
    /// The separate `metrics.bind` listener: only `/metrics` and `/healthz`.
    metrics_only: bool,
    /// `metrics.require_token`, as at start.
    metrics_token: bool,
}

/// Where the admin API listens.
enum AdminListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The `unix:` prefix of `admin.bind` for a Unix domain socket.
pub const UNIX_PREFIX: &str = "unix:";

/// Binds the admin listener (when `admin` is configured) and serves it until the process
/// exits; it keeps answering during a drain so `/ready` can say so. Logs
/// `listener bound name=admin addr=…` like the data-plane listeners (`path=…` for a Unix
/// socket).
pub async fn start(control: Arc<Control>) -> Result<(), AdminError> {
    let Some(config) = control.admin_config().cloned() else {
        return Ok(());
    };
    let bind_error = |source| AdminError::Bind {
        address: config.bind.clone(),
        source,
    };
    let auth = Auth::new(&config);
    let inherited = crate::ops::upgrade::take("admin");
    let listener = match config.bind.strip_prefix(UNIX_PREFIX) {
        Some(path) => {
            let listener = match inherited {
                Some(fd) => crate::ops::upgrade::unix_listener(fd)
                    .and_then(UnixListener::from_std)
                    .map_err(bind_error)?,
                None => bind_unix(Path::new(path)).map_err(bind_error)?,
            };
            crate::ops::upgrade::register("admin", std::os::fd::AsRawFd::as_raw_fd(&listener));
            tracing::info!(name = %"admin", path = %path, "listener bound");
            AdminListener::Unix(listener)
        }
        None => {
            let listener = match inherited {
                Some(fd) => crate::ops::upgrade::tcp_listener(fd)
                    .and_then(TcpListener::from_std)
                    .map_err(bind_error)?,
                None => TcpListener::bind(&config.bind).await.map_err(bind_error)?,
            };
            crate::ops::upgrade::register("admin", std::os::fd::AsRawFd::as_raw_fd(&listener));
            let local = listener.local_addr().map_err(bind_error)?;
            if auth.is_open() {
                tracing::warn!(addr = %local, "admin API has no tokens: every local client may change the config");
            }
            tracing::info!(name = %"admin", addr = %local, "listener bound");
            AdminListener::Tcp(listener)
        }
    };
    let metrics_token = control.current().config.metrics.require_token;
    let admin = Arc::new(Admin {
        control,
        auth,
        metrics_only: false,
        metrics_token,
    });
    tokio::spawn(accept_loop(admin, listener));
    Ok(())
}

/// Binds `metrics.bind` when set: a listener that serves only `/metrics` (and `/healthz`),
/// with the admin API's tokens when `metrics.require_token` is on. Logs
/// `listener bound name=metrics addr=…`.
pub async fn start_metrics(control: Arc<Control>) -> Result<(), AdminError> {
    let metrics = control.current().config.metrics.clone();
    let Some(bind) = metrics.bind.clone().filter(|_| metrics.enabled) else {
        return Ok(());
    };
    let bind_error = |source| AdminError::Bind {
        address: bind.clone(),
        source,
    };
    let listener = match crate::ops::upgrade::take("metrics") {
        Some(fd) => crate::ops::upgrade::tcp_listener(fd)
            .and_then(TcpListener::from_std)
            .map_err(bind_error)?,
        None => TcpListener::bind(&bind).await.map_err(bind_error)?,
    };
    crate::ops::upgrade::register("metrics", std::os::fd::AsRawFd::as_raw_fd(&listener));
    let local = listener.local_addr().map_err(bind_error)?;
    tracing::info!(name = %"metrics", addr = %local, "listener bound");
    let auth = match control.admin_config() {
        Some(config) => Auth::new(config),
        None => Auth::new(&crate::config::AdminConfig {
            bind: String::new(),
            tokens: Vec::new(),
        }),
    };
    let admin = Arc::new(Admin {
        control,
        auth,
        metrics_only: true,
        metrics_token: metrics.require_token,
    });
    tokio::spawn(accept_loop(admin, AdminListener::Tcp(listener)));
    Ok(())
}

/// Binds a Unix socket readable and writable by the gateway's user only (0600). A socket
/// file left by a previous run is replaced; one another process still answers on is not.
fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is serving on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn accept_loop(admin: Arc<Admin>, listener: AdminListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = match &listener {
            AdminListener::Tcp(listener) => listener
                .accept()
                .await
                .map(|(stream, _)| Either::Left(stream)),
            AdminListener::Unix(listener) => listener
                .accept()
                .await
                .map(|(stream, _)| Either::Right(stream)),
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("admin connection limit reached; closing a new connection");
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let result = match stream {
                Either::Left(tcp) => serve(tcp, admin).await,
                Either::Right(unix) => serve(unix, admin).await,
            };
            if let Err(err) = result {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
            drop(slot);
        });
    }
}

enum Either<A, B> {
    Left(A),
    Right(B),
}

async fn serve<S>(stream: S, admin: Arc<Admin>) -> hyper::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(admin.handle(request).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

impl Admin {
    /// `GET /metrics`: the Prometheus text format (SPEC OPS-1).
    fn metrics(&self, headers: &HeaderMap) -> Result<Response<Full<Bytes>>, ApiError> {
        let current = self.control.current();
        if !current.config.metrics.enabled {
            return Err(ApiError::NotFound);
        }
        if self.metrics_token {
            self.auth.check(headers, AdminScope::Read)?;
        }
        let version = u64::try_from(current.info.version).unwrap_or(0);
        let text = self.control.gateway().render_metrics(version);
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        Ok(response)
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.dispatch(request).await {
            Ok(response) => response,
            Err(err) => err.response(),
        }
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let endpoint = route(request.method(), request.uri().path())?;
        if self.metrics_only && !matches!(endpoint, Endpoint::Metrics | Endpoint::Healthz) {
            return Err(ApiError::NotFound);
        }
        if matches!(endpoint, Endpoint::Metrics) {
            return self.metrics(request.headers());
        }
        let caller = match endpoint.scope() {
            Some(scope) => Some(self.auth.check(request.headers(), scope)?),
            None => None,
        };
        let control = &self.control;
        match endpoint {
            Endpoint::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
            Endpoint::Metrics => self.metrics(request.headers()),
            Endpoint::Ready => {
                let draining = control.gateway().is_draining();
                let status = if draining {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                let mut body = json!({"ready": !draining});
                if draining {
                    body["reason"] = json!("draining");
                }
                Ok(json_response(status, &body))
            }
            Endpoint::GetConfig => {
                let current = control.current();
                let mut response = json_response(
                    StatusCode::OK,
                    &json!({
                        "version": current.info.version,
                        "hash": current.info.hash,
                        "author": current.info.author,
                        "created_at": current.info.created_at,
                        "message": current.info.message,
                        "config": &*current.config,
                    }),
                );
                set_etag(&mut response, current.info.version);
                Ok(response)
            }
            Endpoint::Version(version) => {
                let control = self.control.clone();
                let (info, config) = blocking(move || control.version(version)).await??;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "version": info.version,
                        "hash": info.hash,
                        "author": info.author,
                        "created_at": info.created_at,
                        "message": info.message,
                        "config": config,
                    }),
                ))
            }
            Endpoint::Validate => {
                let config = self.read_config(request).await?;
                control.check(&config)?;
                Ok(json_response(StatusCode::OK, &json!({"valid": true})))
            }
            Endpoint::Diff => {
                let config = self.read_config(request).await?;
                let current = control.current();
                let before = serde_json::to_value(&*current.config).map_err(ControlError::from)?;
                let after = serde_json::to_value(&config).map_err(ControlError::from)?;
                let changes = diff(&before, &after);
                let text: Vec<String> = changes.iter().map(FieldChange::line).collect();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "from_version": current.info.version,
                        "changes": changes,
                        "text": text.join("\n"),
                    }),
                ))
            }
            Endpoint::PutConfig => {
                let if_match = if_match(request.headers())?;
                let message = change_message(request.headers())?;
                let config = self.read_config(request).await?;
                let actor = actor(caller);
                let control = self.control.clone();
                let outcome = blocking(move || {
                    control.apply(
                        config,
                        &Change {
                            actor: &actor,
                            action: "apply",
                            message: &message,
                            if_match,
                        },
                    )
                })
                .await??;
                let mut response = json_response(StatusCode::OK, &outcome);
                set_etag(&mut response, outcome.info.version);
                Ok(response)
            }
            Endpoint::Rollback(version) => {
                let if_match = if_match(request.headers())?;
                let message = change_message(request.headers())?;
                let message = if message.is_empty() {
                    format!("rollback to version {version}")
                } else {
                    message
                };
                let actor = actor(caller);
                let control = self.control.clone();
                let outcome = blocking(move || {
                    control.rollback(
                        version,
                        &Change {
                            actor: &actor,
                            action: "rollback",
                            message: &message,
                            if_match,
                        },
                    )
                })
                .await??;
                let mut response = json_response(StatusCode::OK, &outcome);
                set_etag(&mut response, outcome.info.version);
                Ok(response)
            }
            Endpoint::Versions => {
                let limit = list_limit(request.uri().query())?;
                let control = self.control.clone();
                let versions = blocking(move || control.versions(limit)).await??;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "current": control_version(&self.control),
                        "versions": versions,
                    }),
                ))
            }
            Endpoint::Audit => {
                let limit = list_limit(request.uri().query())?;
                let control = self.control.clone();
                let records = blocking(move || control.audit(limit)).await??;
                Ok(json_response(StatusCode::OK, &json!({"records": records})))
            }
            Endpoint::Status => Ok(json_response(StatusCode::OK, &status(control))),
        }
    }

    /// Reads and validates a config body: JSON or TOML by `Content-Type`.
    async fn read_config(
        &self,
        request: Request<Incoming>,
    ) -> Result<crate::config::Config, ApiError> {
        let format = match request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.to_ascii_lowercase())
        {
            Some(value) if value.contains("json") => Format::Json,
            Some(value) if value.contains("toml") => Format::Toml,
            _ => return Err(ApiError::UnsupportedMediaType),
        };
        let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
        let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
            Err(_) => return Err(ApiError::BodyTimeout),
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
                return Err(ApiError::TooLarge)
            }
            Ok(Err(err)) => {
                return Err(ApiError::BadRequest(format!("cannot read the body: {err}")))
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let text = std::str::from_utf8(&bytes)
            .map_err(|err| ApiError::BadRequest(format!("the body is not UTF-8: {err}")))?;
        // Syntax errors are the client's malformed request (400); a config that parses
        // but is wrong is unprocessable (422, every error with its path).
        match format {
            Format::Json => serde_json::from_str::<Value>(text)
                .map(drop)
                .map_err(|err| ApiError::BadRequest(format!("invalid JSON: {err}")))?,
            Format::Toml => toml::from_str::<toml::Table>(text)
                .map(drop)
                .map_err(|err| {
                    ApiError::BadRequest(format!("invalid TOML: {}", err.to_string().trim_end()))
                })?,
        }
        Ok(self.control.parse_submitted(text, format)?)
    }
}

fn control_version(control: &Control) -> i64 {
    control.current().info.version
}

fn actor(caller: Option<Caller>) -> String {
    caller.map_or_else(|| "anonymous".to_string(), |caller| caller.actor)
}

fn status(control: &Control) -> Value {
    let current = control.current();
    let gateway = control.gateway();
    let addrs = gateway.local_addrs();
    let mut listeners: Vec<Value> = current
        .config
        .listeners
        .iter()
        .map(|listener| {
            let stats = gateway.listener_stats(&listener.name);
            let load = |read: &dyn Fn(&crate::listener::ListenerStats) -> u64| {
                stats.as_deref().map_or(0, read)
            };
            json!({
                "name": listener.name,
                "bind": listener.bind,
                "addr": addrs.get(&listener.name).map(ToString::to_string),
                "active_connections": load(&|s| s.active.load(std::sync::atomic::Ordering::Relaxed) as u64),
                "max_connections": listener.max_connections,
                "accepted": load(&|s| s.accepted.load(std::sync::atomic::Ordering::Relaxed)),
                "rejected_limit": load(&|s| s.rejected_limit.load(std::sync::atomic::Ordering::Relaxed)),
            })
        })
        .collect();
    listeners.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "version": current.info.version,
        "hash": current.info.hash,
        "uptime_seconds": control.uptime().as_secs(),
        "ready": !gateway.is_draining(),
        "store_mode": control.mode(),
        "listeners": listeners,
        "pools": gateway.upstream_status(),
    })
}

fn set_etag(response: &mut Response<Full<Bytes>>, version: i64) {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(ETAG, value);
    }
}

/// `If-Match: "7"` (or `7`); `*` or no header means any version.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("If-Match is not ASCII".into()))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    let unquoted = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    unquoted.parse::<i64>().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match {text:?} is not a config version such as \"7\" (the ETag of GET /config)"
        ))
    })
}

/// The optional `x-gatehouse-message` header, recorded with the change.
fn change_message(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get("x-gatehouse-message") else {
        return Ok(String::new());
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ApiError::BadRequest("x-gatehouse-message is not UTF-8".into()))?;
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ApiError::BadRequest(format!(
            "x-gatehouse-message is longer than {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    Ok(text.to_string())
}

/// `?limit=N`, 1–1000, default 100.
fn list_limit(query: Option<&str>) -> Result<u32, ApiError> {
    let mut limit = DEFAULT_LIST_LIMIT;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key == "limit" {
            limit = value
                .parse::<u32>()
                .ok()
                .filter(|limit| (1..=MAX_LIST_LIMIT).contains(limit))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("limit must be between 1 and {MAX_LIST_LIMIT}"))
                })?;
        }
    }
    Ok(limit)
}

/// Store access and applies block (SQLite, socket binds); keep them off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ApiError::Internal(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_known_paths_and_reports_wrong_methods_and_unknown_paths() {
        assert!(matches!(
            route(&Method::GET, "/config"),
            Ok(Endpoint::GetConfig)
        ));
        assert!(matches!(
            route(&Method::PUT, "/config/"),
            Ok(Endpoint::PutConfig)
        ));
        assert!(matches!(
            route(&Method::POST, "/config/rollback/3"),
            Ok(Endpoint::Rollback(3))
        ));
        assert!(matches!(
            route(&Method::DELETE, "/config"),
            Err(ApiError::MethodNotAllowed("GET, PUT"))
        ));
        assert!(matches!(
            route(&Method::POST, "/config/rollback/x"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            route(&Method::POST, "/config/rollback/0"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            route(&Method::GET, "/nope"),
            Err(ApiError::NotFound)
        ));
    }

    #[test]
    fn if_match_takes_quoted_bare_and_star() {
        let mut headers = HeaderMap::new();
        assert_eq!(if_match(&headers).unwrap(), None);
        headers.insert(IF_MATCH, HeaderValue::from_static("\"7\""));
        assert_eq!(if_match(&headers).unwrap(), Some(7));
        headers.insert(IF_MATCH, HeaderValue::from_static("7"));
        assert_eq!(if_match(&headers).unwrap(), Some(7));
        headers.insert(IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(if_match(&headers).unwrap(), None);
        headers.insert(IF_MATCH, HeaderValue::from_static("\"abc\""));
        assert!(if_match(&headers).is_err());
    }

    #[test]
    fn list_limit_is_bounded() {
        assert_eq!(list_limit(None).unwrap(), DEFAULT_LIST_LIMIT);
        assert_eq!(list_limit(Some("limit=5")).unwrap(), 5);
        assert!(list_limit(Some("limit=0")).is_err());
        assert!(list_limit(Some("limit=1001")).is_err());
    }
}
