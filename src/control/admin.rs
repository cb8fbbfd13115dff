//! The REST admin API (SPEC CTRL-4, CTRL-5, OPS-4) on its own listener (TCP, TLS with
//! optional client certificates, or a Unix socket), never on a data-plane one: health and
//! readiness, the current config, validate, diff, apply with `If-Match`, versions,
//! rollback, status with listener and firewall counters, the audit log, listener limits,
//! routes / pools / firewall rules as resources, certificates, store backups and its own
//! OpenAPI document. JSON in and out (configs also as TOML).
//!
//! The route table `ROUTES` is the single list of endpoints; a test holds it and
//! `docs/openapi.json` together. Admin errors map to statuses in one place,
//! `ApiError::status`. Every request body is bounded in size and time, and so is the number
//! of admin connections; wrong tokens are rate-limited per source (`FailureLimiter`).

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, ETAG, IF_MATCH, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use super::auth::{AuthError, Caller, FailureLimiter};
use super::bundle::BundleError;
use super::diff::{diff, FieldChange};
use super::{guard, resources, Change, Control, ControlError, Outcome};
use crate::config::{AdminScope, ConfigError, Format};

/// Largest request body (a config).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// A request body must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// A request header block must arrive within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// Concurrent HTTP/2 streams (gRPC calls) per admin connection.
const MAX_STREAMS: u32 = 32;
/// Longest `x-gatehouse-message` kept in the audit log.
const MAX_MESSAGE_BYTES: usize = 1024;
const MAX_LIST_LIMIT: u32 = 1000;
const DEFAULT_LIST_LIMIT: u32 = 100;
/// Wrong tokens one source may send per window before it must wait (429).
const MAX_AUTH_FAILURES: u32 = 10;
const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Sources the failure limiter tracks at most.
const MAX_AUTH_SOURCES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Tls(String),
    #[error("admin.bind: cannot bind {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a request can fail with, mapped to a status in `status`.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no such admin endpoint")]
    NotFound,
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(String),
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
    #[error("too many failed authentications from this address; retry in {0} s")]
    TooManyFailures(u64),
}

impl ApiError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(
                AuthError::Missing | AuthError::Invalid | AuthError::NoClientCertificate,
            ) => StatusCode::UNAUTHORIZED,
            ApiError::Auth(AuthError::Forbidden) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooManyFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Control(err) => match err {
                ControlError::Invalid(_) | ControlError::Rejected(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ControlError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
                ControlError::Bundle(BundleError::Malformed(_) | BundleError::Key(_)) => {
                    StatusCode::BAD_REQUEST
                }
                ControlError::Bundle(
                    BundleError::Unsigned | BundleError::UnknownKey | BundleError::BadSignature(_),
                ) => StatusCode::UNPROCESSABLE_ENTITY,
                ControlError::Bundle(BundleError::Replay { .. }) => StatusCode::CONFLICT,
                ControlError::UnknownVersion(_) | ControlError::UnknownName { .. } => {
                    StatusCode::NOT_FOUND
                }
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
            ApiError::Auth(
                AuthError::Missing | AuthError::Invalid | AuthError::NoClientCertificate,
            ) => "unauthorized",
            ApiError::Auth(AuthError::Forbidden) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::TooLarge => "body_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::Internal(_) => "internal",
            ApiError::TooManyFailures(_) => "too_many_auth_failures",
            ApiError::Control(err) => match err {
                ControlError::Invalid(_) => "invalid_config",
                ControlError::Rejected(_) => "rejected",
                ControlError::Stale { .. } => "stale_version",
                ControlError::UnknownVersion(_) => "unknown_version",
                ControlError::UnknownName { .. } => "unknown_name",
                ControlError::Bundle(BundleError::Malformed(_) | BundleError::Key(_)) => {
                    "invalid_bundle"
                }
                ControlError::Bundle(BundleError::Unsigned) => "bundle_unsigned",
                ControlError::Bundle(BundleError::UnknownKey) => "bundle_unknown_key",
                ControlError::Bundle(BundleError::BadSignature(_)) => "bundle_bad_signature",
                ControlError::Bundle(BundleError::Replay { .. }) => "bundle_replay",
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
            ApiError::TooManyFailures(seconds) => {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(*seconds));
            }
            ApiError::MethodNotAllowed(allowed) => {
                if let Ok(value) = HeaderValue::from_str(allowed) {
                    response.headers_mut().insert(http::header::ALLOW, value);
                }
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

/// What an admin request asks for. The route table below maps paths to these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Healthz,
    Ready,
    /// Prometheus exposition; its scope depends on `metrics.require_token`.
    Metrics,
    OpenApi,
    GetConfig,
    PutConfig,
    Validate,
    Diff,
    Versions,
    Version,
    Rollback,
    Status,
    Audit,
    Certificates,
    SetMaxConnections,
    ListRoutes,
    GetRoute,
    PutRoute,
    DeleteRoute,
    ListPolicies,
    GetPolicy,
    PutPolicies,
    PutPolicy,
    DeletePolicy,
    ListPools,
    GetPool,
    PutPool,
    DeletePool,
    GetFirewall,
    PutFirewall,
    Backup,
    GetTraffic,
    PutSplitWeights,
    ResetBrake,
    ApplyBundle,
    Breakers,
}

impl Op {
    /// The scope a caller needs; `None` for the public probes and the API document.
    fn scope(self) -> Option<AdminScope> {
        match self {
            Op::Healthz | Op::Ready | Op::OpenApi => None,
            // Checked in `Admin::metrics`: `metrics.require_token` decides.
            Op::Metrics => None,
            Op::GetConfig
            | Op::Versions
            | Op::Version
            | Op::Status
            | Op::Audit
            | Op::Certificates
            | Op::ListRoutes
            | Op::GetRoute
            | Op::ListPolicies
            | Op::GetPolicy
            | Op::ListPools
            | Op::GetPool
            | Op::GetFirewall
            | Op::GetTraffic
            | Op::Breakers
            // Validate and diff change nothing.
            | Op::Validate
            | Op::Diff => Some(AdminScope::Read),
            Op::PutConfig
            | Op::Rollback
            | Op::SetMaxConnections
            | Op::PutRoute
            | Op::DeleteRoute
            | Op::PutPolicies
            | Op::PutPolicy
            | Op::DeletePolicy
            | Op::PutPool
            | Op::DeletePool
            | Op::PutFirewall
            | Op::PutSplitWeights
            | Op::ResetBrake
            | Op::ApplyBundle
            // The stored configs hold the token hashes.
            | Op::Backup => Some(AdminScope::Admin),
        }
    }
}

/// One row of the route table: method, path template (`{name}` matches one segment), op.
struct RouteEntry {
    method: &'static str,
    template: &'static str,
    op: Op,
}

const fn entry(method: &'static str, template: &'static str, op: Op) -> RouteEntry {
    RouteEntry {
        method,
        template,
        op,
    }
}

/// The route table, the single list of admin endpoints. A test checks that it and the
/// OpenAPI document (`docs/openapi.json`, served at `/openapi.json`) name the same
/// methods and paths.
const ROUTES: &[RouteEntry] = &[
    entry("GET", "/healthz", Op::Healthz),
    entry("GET", "/ready", Op::Ready),
    entry("GET", "/metrics", Op::Metrics),
    entry("GET", "/openapi.json", Op::OpenApi),
    entry("GET", "/config", Op::GetConfig),
    entry("PUT", "/config", Op::PutConfig),
    entry("POST", "/config/validate", Op::Validate),
    entry("POST", "/config/diff", Op::Diff),
    entry("GET", "/config/versions", Op::Versions),
    entry("GET", "/config/versions/{version}", Op::Version),
    entry("POST", "/config/rollback/{version}", Op::Rollback),
    entry("POST", "/config/bundle", Op::ApplyBundle),
    entry("GET", "/status", Op::Status),
    entry("GET", "/audit", Op::Audit),
    entry("GET", "/certificates", Op::Certificates),
    entry(
        "PUT",
        "/listeners/{name}/max_connections",
        Op::SetMaxConnections,
    ),
    entry("GET", "/routes", Op::ListRoutes),
    entry("GET", "/routes/{name}", Op::GetRoute),
    entry("PUT", "/routes/{name}", Op::PutRoute),
    entry("DELETE", "/routes/{name}", Op::DeleteRoute),
    entry("GET", "/routes/{name}/policies", Op::ListPolicies),
    entry("PUT", "/routes/{name}/policies", Op::PutPolicies),
    entry("GET", "/routes/{name}/policies/{policy}", Op::GetPolicy),
    entry("PUT", "/routes/{name}/policies/{policy}", Op::PutPolicy),
    entry(
        "DELETE",
        "/routes/{name}/policies/{policy}",
        Op::DeletePolicy,
    ),
    entry("GET", "/breakers", Op::Breakers),
    entry("GET", "/pools", Op::ListPools),
    entry("GET", "/pools/{name}", Op::GetPool),
    entry("PUT", "/pools/{name}", Op::PutPool),
    entry("DELETE", "/pools/{name}", Op::DeletePool),
    entry("GET", "/firewall", Op::GetFirewall),
    entry("PUT", "/firewall", Op::PutFirewall),
    entry("POST", "/store/backup", Op::Backup),
    entry("GET", "/traffic", Op::GetTraffic),
    entry("PUT", "/traffic/{route}/weights", Op::PutSplitWeights),
    entry("POST", "/traffic/{route}/brake/reset", Op::ResetBrake),
];

/// The OpenAPI 3 document of this API.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// A routed request: the op and the path parameters in template order.
struct Routed<'a> {
    op: Op,
    params: Vec<&'a str>,
}

impl Routed<'_> {
    fn param(&self, index: usize) -> Result<&str, ApiError> {
        self.params
            .get(index)
            .copied()
            .ok_or_else(|| ApiError::Internal("route parameter missing".into()))
    }
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_end_matches('/').split('/').skip(1).collect()
}

/// Matches `path` against `template`, returning the parameters.
fn match_template<'a>(template: &str, path: &[&'a str]) -> Option<Vec<&'a str>> {
    let parts = segments(template);
    if parts.len() != path.len() {
        return None;
    }
    let mut params = Vec::new();
    for (part, segment) in parts.iter().zip(path) {
        if part.starts_with('{') && part.ends_with('}') {
            if segment.is_empty() {
                return None;
            }
            params.push(*segment);
        } else if part != segment {
            return None;
        }
    }
    Some(params)
}

/// Finds the route for a request: 404 for an unknown path, 405 (with the allowed methods)
/// for a known path with another method.
fn route<'a>(method: &Method, path: &'a str) -> Result<Routed<'a>, ApiError> {
    let path = segments(path);
    let mut allowed: Vec<&str> = Vec::new();
    for entry in ROUTES {
        if let Some(params) = match_template(entry.template, &path) {
            if entry.method == method.as_str() {
                return Ok(Routed {
                    op: entry.op,
                    params,
                });
            }
            allowed.push(entry.method);
        }
    }
    if allowed.is_empty() {
        Err(ApiError::NotFound)
    } else {
        Err(ApiError::MethodNotAllowed(allowed.join(", ")))
    }
}

fn parse_version(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|version| *version > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("version {text:?} is not a positive integer")))
}

pub(super) struct Admin {
    pub(super) control: Arc<Control>,
    /// The separate `metrics.bind` listener: only `/metrics` and `/healthz`.
    metrics_only: bool,
    /// `metrics.require_token`, as at start.
    metrics_token: bool,
    failures: FailureLimiter,
    /// The gRPC services; none on the metrics-only listener.
    grpc: Option<super::grpc::Grpc>,
}

/// Where the admin API listens; TCP optionally with TLS.
enum AdminListener {
    Tcp(TcpListener, Option<tokio_rustls::TlsAcceptor>),
    Unix(UnixListener),
}

/// Who is on the other end of an admin connection.
#[derive(Clone, Default)]
pub(super) struct Peer {
    /// `None` on the Unix socket.
    ip: Option<IpAddr>,
    /// The subject of the client certificate the TLS handshake verified.
    client: Option<Arc<str>>,
}

/// The rustls server config of the admin listener: its certificate, and with `client_ca`
/// client certificates verified against it. A client without a certificate still
/// completes the handshake (so probes work) and gets 401 on everything that needs auth;
/// a certificate the CA did not issue fails the handshake.
fn tls_acceptor(tls: &crate::config::AdminTls) -> Result<tokio_rustls::TlsAcceptor, AdminError> {
    let error = |message: String| AdminError::Tls(message);
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| error(format!("admin.tls.cert: {}: {err}", tls.cert)))?;
    if chain.is_empty() {
        return Err(error(format!(
            "admin.tls.cert: {}: no certificate in the file",
            tls.cert
        )));
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|err| error(format!("admin.tls.key: {}: {err}", tls.key)))?;
    let provider = Arc::new(crate::tls::provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| error(format!("admin.tls: {err}")))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = crate::tls::load_roots(ca)
                .map_err(|err| error(format!("admin.tls.client_ca: {err}")))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|err| error(format!("admin.tls.client_ca: {err}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| error(format!("admin.tls: {err}")))?;
    // h2 for gRPC clients, which speak only HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The `unix:` prefix of `admin.bind` for a Unix domain socket.
pub const UNIX_PREFIX: &str = "unix:";

/// Binds the admin listener (when `admin` is configured) and serves it until the process
/// exits; it keeps answering during a drain so `/ready` can say so. Logs
/// `listener bound name=admin addr=…` like the data-plane listeners (`path=…` for a Unix
/// socket).
pub async fn start(control: Arc<Control>) -> Result<(), AdminError> {
    let Some(config) = control.admin_config() else {
        return Ok(());
    };
    let bind_error = |source| AdminError::Bind {
        address: config.bind.clone(),
        source,
    };
    let auth = control.auth();
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
            let acceptor = config.tls.as_ref().map(tls_acceptor).transpose()?;
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
            tracing::info!(name = %"admin", addr = %local, tls = acceptor.is_some(), "listener bound");
            AdminListener::Tcp(listener, acceptor)
        }
    };
    let metrics_token = control.current().config.metrics.require_token;
    let admin = Arc::new(Admin {
        grpc: Some(super::grpc::Grpc::start(control.clone()).await),
        control,
        metrics_only: false,
        metrics_token,
        failures: FailureLimiter::new(MAX_AUTH_FAILURES, AUTH_FAILURE_WINDOW, MAX_AUTH_SOURCES),
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
    // The admin API's tokens (`Control::auth`, rotated on SIGHUP) guard it too.
    let admin = Arc::new(Admin {
        control,
        metrics_only: true,
        metrics_token: metrics.require_token,
        failures: FailureLimiter::new(MAX_AUTH_FAILURES, AUTH_FAILURE_WINDOW, MAX_AUTH_SOURCES),
        grpc: None,
    });
    tokio::spawn(accept_loop(admin, AdminListener::Tcp(listener, None)));
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
            AdminListener::Tcp(listener, _) => listener
                .accept()
                .await
                .map(|(stream, peer)| (Either::Left(stream), Some(peer.ip()))),
            AdminListener::Unix(listener) => listener
                .accept()
                .await
                .map(|(stream, _)| (Either::Right(stream), None)),
        };
        let (stream, peer) = match accepted {
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
        let acceptor = match &listener {
            AdminListener::Tcp(_, acceptor) => acceptor.clone(),
            AdminListener::Unix(_) => None,
        };
        tokio::spawn(async move {
            let peer = Peer {
                ip: peer,
                client: None,
            };
            let result = match (stream, acceptor) {
                (Either::Left(tcp), Some(acceptor)) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let client = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(|leaf| crate::tls::certificate_subject(leaf))
                                .map(Arc::from);
                            serve(tls, admin, Peer { client, ..peer }).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(peer = ?peer.ip, error = %err, "admin TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    }
                }
                (Either::Left(tcp), None) => serve(tcp, admin, peer).await,
                (Either::Right(unix), _) => serve(unix, admin, peer).await,
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

/// The body of an admin response: REST JSON, or a gRPC stream.
type AdminBody = http_body_util::Either<Full<Bytes>, tonic::body::Body>;

/// Serves one admin connection, HTTP/1.1 or HTTP/2 (gRPC clients speak only HTTP/2).
/// Requests with `Content-Type: application/grpc…` go to the gRPC services, the rest to
/// the REST API.
async fn serve<S>(
    stream: S,
    admin: Arc<Admin>,
    peer: Peer,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let admin = admin.clone();
        let peer = peer.clone();
        async move {
            let grpc = request
                .headers()
                .get(CONTENT_TYPE)
                .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
            let response: Response<AdminBody> = match (&admin.grpc, grpc) {
                (Some(services), true) => services
                    .call(admin.clone(), request, peer)
                    .await
                    .map(http_body_util::Either::Right),
                _ => admin
                    .handle(request, &peer)
                    .await
                    .map(http_body_util::Either::Left),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(HEADER_TIMEOUT))
        .keep_alive_timeout(HEADER_TIMEOUT);
    builder
        .serve_connection(TokioIo::new(stream), service)
        .await
}

impl Admin {
    /// `GET /metrics`: the Prometheus text format (SPEC OPS-1).
    fn metrics(&self, headers: &HeaderMap, peer: &Peer) -> Result<Response<Full<Bytes>>, ApiError> {
        let current = self.control.current();
        if !current.config.metrics.enabled {
            return Err(ApiError::NotFound);
        }
        if self.metrics_token {
            self.authenticate(headers, AdminScope::Read, peer)?;
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

    async fn handle(&self, request: Request<Incoming>, peer: &Peer) -> Response<Full<Bytes>> {
        match self.dispatch(request, peer).await {
            Ok(response) => response,
            Err(err) => err.response(),
        }
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        peer: &Peer,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let path = request.uri().path().to_string();
        let routed = route(request.method(), &path)?;
        if self.metrics_only && !matches!(routed.op, Op::Metrics | Op::Healthz) {
            return Err(ApiError::NotFound);
        }
        let caller = match routed.op.scope() {
            Some(scope) => Some(self.authenticate(request.headers(), scope, peer)?),
            None => None,
        };
        let control = &self.control;
        match routed.op {
            Op::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
            Op::Metrics => self.metrics(request.headers(), peer),
            Op::Ready => {
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
            Op::GetConfig => {
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
            Op::Version => {
                let version = parse_version(routed.param(0)?)?;
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
            Op::Validate => {
                let config = self.read_config(request).await?;
                control.check(&config)?;
                Ok(json_response(StatusCode::OK, &json!({"valid": true})))
            }
            Op::Diff => {
                let config = self.read_config(request).await?;
                let current = control.current();
                Ok(json_response(
                    StatusCode::OK,
                    &diff_body(&current, &config)?,
                ))
            }
            Op::PutConfig => {
                let if_match = if_match(request.headers())?;
                let message = change_message(request.headers())?;
                let gates = gates(request.uri().query())?;
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
                let mut body = serde_json::to_value(&outcome).map_err(ControlError::from)?;
                if let Some(status) = start_guard(&self.control, &outcome, gates) {
                    body["guard"] = serde_json::to_value(status).map_err(ControlError::from)?;
                }
                let mut response = json_response(StatusCode::OK, &body);
                set_etag(&mut response, outcome.info.version);
                Ok(response)
            }
            Op::Rollback => {
                let version = parse_version(routed.param(0)?)?;
                let meta = ChangeMeta::of(&request, caller)?;
                let outcome = rollback(self.control.clone(), meta, version).await?;
                let mut response = json_response(StatusCode::OK, &outcome);
                set_etag(&mut response, outcome.info.version);
                Ok(response)
            }
            Op::Versions => {
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
            Op::Audit => {
                let limit = list_limit(request.uri().query())?;
                let control = self.control.clone();
                let records = blocking(move || control.audit(limit)).await??;
                Ok(json_response(StatusCode::OK, &json!({"records": records})))
            }
            Op::Status => Ok(json_response(StatusCode::OK, &status(control))),
            Op::OpenApi => {
                let mut response =
                    Response::new(Full::new(Bytes::from_static(OPENAPI_JSON.as_bytes())));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(response)
            }
            Op::Certificates => Ok(json_response(StatusCode::OK, &certificates(control))),
            Op::ListRoutes | Op::ListPools => {
                let kind = if routed.op == Op::ListRoutes {
                    Kind::Route
                } else {
                    Kind::Pool
                };
                let (version, body) = kind.list(control)?;
                versioned(version, body)
            }
            Op::GetRoute | Op::GetPool => {
                let kind = if routed.op == Op::GetRoute {
                    Kind::Route
                } else {
                    Kind::Pool
                };
                let (version, body) = kind.get(control, routed.param(0)?)?;
                versioned(version, body)
            }
            Op::PutRoute | Op::PutPool => {
                let kind = if routed.op == Op::PutRoute {
                    Kind::Route
                } else {
                    Kind::Pool
                };
                let name = routed.param(0)?.to_string();
                let meta = ChangeMeta::of(&request, caller)?;
                let body: Value = read_json(request).await?;
                let edit = kind.put(name, body)?;
                self.edit(meta, edit).await
            }
            Op::DeleteRoute | Op::DeletePool => {
                let kind = if routed.op == Op::DeleteRoute {
                    Kind::Route
                } else {
                    Kind::Pool
                };
                let meta = ChangeMeta::of(&request, caller)?;
                let edit = kind.delete(routed.param(0)?.to_string())?;
                self.edit(meta, edit).await
            }
            Op::ListPolicies => {
                let name = routed.param(0)?;
                let current = control.current();
                let (_, route) = resources::find_route(&current.config, name)
                    .ok_or_else(|| unknown("route", name))?;
                versioned(
                    current.info.version,
                    json!({"version": current.info.version, "route": name, "policies": route.policies}),
                )
            }
            Op::GetPolicy => {
                let name = format!("{}/{}", routed.param(0)?, routed.param(1)?);
                let (version, body) = Kind::Policy.get(control, &name)?;
                versioned(version, body)
            }
            Op::PutPolicies => {
                let name = routed.param(0)?.to_string();
                let meta = ChangeMeta::of(&request, caller)?;
                // Either the list itself or `{"policies": [...]}` (what GET returns).
                let mut body: Value = read_json(request).await?;
                if let Some(list) = body.get_mut("policies") {
                    body = list.take();
                }
                let policies: Vec<crate::config::policy::PolicyRuleConfig> = from_value(body)?;
                self.edit(
                    meta,
                    ResourceEdit {
                        action: "put_policies",
                        message: format!("route {name}: put policies"),
                        edit: Box::new(move |config| {
                            resources::put_policies(config, &name, policies)
                        }),
                    },
                )
                .await
            }
            Op::PutPolicy => {
                let name = format!("{}/{}", routed.param(0)?, routed.param(1)?);
                let meta = ChangeMeta::of(&request, caller)?;
                let body: Value = read_json(request).await?;
                self.edit(meta, Kind::Policy.put(name, body)?).await
            }
            Op::DeletePolicy => {
                let name = format!("{}/{}", routed.param(0)?, routed.param(1)?);
                let meta = ChangeMeta::of(&request, caller)?;
                self.edit(meta, Kind::Policy.delete(name)?).await
            }
            Op::GetFirewall => {
                let current = control.current();
                versioned(
                    current.info.version,
                    serde_json::to_value(&current.config.firewall).map_err(ControlError::from)?,
                )
            }
            Op::PutFirewall => {
                let meta = ChangeMeta::of(&request, caller)?;
                let body: Value = read_json(request).await?;
                self.edit(meta, put_firewall(body)?).await
            }
            Op::Breakers => Ok(json_response(StatusCode::OK, &breakers(control))),
            Op::ApplyBundle => {
                let meta = ChangeMeta::of(&request, caller)?;
                let text = read_body(request).await?;
                let outcome = apply_bundle(self.control.clone(), meta, text).await?;
                let mut response = json_response(StatusCode::OK, &outcome);
                set_etag(&mut response, outcome.info.version);
                Ok(response)
            }
            Op::GetTraffic => Ok(json_response(
                StatusCode::OK,
                &control.gateway().traffic_status(),
            )),
            Op::ResetBrake => {
                let name = routed.param(0)?;
                let released = control
                    .gateway()
                    .reset_brakes(name)
                    .ok_or_else(|| unknown("split route", name))?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"route": name, "released": released}),
                ))
            }
            Op::PutSplitWeights => {
                let name = routed.param(0)?.to_string();
                let meta = ChangeMeta::of(&request, caller)?;
                let body: SplitWeightsBody = read_json(request).await?;
                let edit = ResourceEdit {
                    action: "put_split_weights",
                    message: format!("route {name}: split weights"),
                    edit: Box::new(move |config| {
                        set_split_weights(config, &name, &body.weights).map(|()| false)
                    }),
                };
                self.edit(meta, edit).await
            }
            Op::Backup => {
                let control = self.control.clone();
                let bytes = blocking(move || backup_bytes(&control)).await??;
                let mut response = Response::new(Full::new(Bytes::from(bytes)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/vnd.sqlite3"),
                );
                response.headers_mut().insert(
                    http::header::CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment; filename=\"gatehouse-backup.db\""),
                );
                Ok(response)
            }
            Op::SetMaxConnections => {
                let name = routed.param(0)?.to_string();
                let meta = ChangeMeta::of(&request, caller)?;
                let body: MaxConnectionsBody = read_json(request).await?;
                let outcome =
                    set_max_connections(self.control.clone(), meta, name, body.max_connections)
                        .await?;
                let mut response = json_response(StatusCode::OK, &outcome);
                set_etag(&mut response, outcome.info.version);
                Ok(response)
            }
        }
    }

    /// Runs a resource edit as a new version (`Control::edit`) off the async workers and
    /// answers with the outcome: 201 when `edit` created something, else 200.
    async fn edit(
        &self,
        meta: ChangeMeta,
        edit: ResourceEdit,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let (outcome, created) = run_edit(self.control.clone(), meta, edit).await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let mut response = json_response(status, &outcome);
        set_etag(&mut response, outcome.info.version);
        Ok(response)
    }

    /// Checks the caller's token, refusing sources with too many recent failures (429)
    /// before looking at the token. Only wrong tokens count as failures. Shared by REST and
    /// gRPC, so both count against the same per-source limit.
    pub(super) fn authenticate(
        &self,
        headers: &HeaderMap,
        scope: AdminScope,
        peer: &Peer,
    ) -> Result<Caller, ApiError> {
        let now = Instant::now();
        if let Err(wait) = self.failures.check(peer.ip, now) {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(ApiError::TooManyFailures(seconds.max(1)));
        }
        match self
            .control
            .auth()
            .check(headers, scope, peer.client.as_deref())
        {
            Err(AuthError::Invalid) => {
                self.failures.record_failure(peer.ip, now);
                tracing::warn!(peer = ?peer.ip, "admin API: invalid bearer token");
                Err(AuthError::Invalid.into())
            }
            other => Ok(other?),
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
        let text = read_body(request).await?;
        let text = text.as_str();
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

/// Reads a request body as UTF-8 text, bounded in size and time.
async fn read_body(request: Request<Incoming>) -> Result<String, ApiError> {
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => return Err(ApiError::BodyTimeout),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::TooLarge)
        }
        Ok(Err(err)) => return Err(ApiError::BadRequest(format!("cannot read the body: {err}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    String::from_utf8(bytes.to_vec())
        .map_err(|err| ApiError::BadRequest(format!("the body is not UTF-8: {err}")))
}

/// Reads a small JSON request body (`Content-Type: application/json`) into `T`; errors name
/// the field.
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, ApiError> {
    let is_json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.to_ascii_lowercase().contains("json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let text = read_body(request).await?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." || path.is_empty() {
            ApiError::BadRequest(format!("invalid body: {inner}"))
        } else {
            ApiError::BadRequest(format!("invalid body: {path}: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|err| ApiError::BadRequest(format!("invalid body: {err}")))?;
    Ok(value)
}

/// Takes an online backup of the store into a private temporary file and returns its
/// bytes (stores are small: configs and audit records).
fn backup_bytes(control: &Control) -> Result<Vec<u8>, ApiError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("gatehouse-backup-{}-{n}.db", std::process::id()));
    let result = control
        .backup(&path)
        .map_err(ApiError::from)
        .and_then(|()| {
            std::fs::read(&path)
                .map_err(|err| ApiError::Internal(format!("cannot read the backup: {err}")))
        });
    let _ = std::fs::remove_file(&path);
    result
}

/// The change headers of a mutation and who sends it.
pub(super) struct ChangeMeta {
    pub(super) actor: String,
    pub(super) if_match: Option<i64>,
    pub(super) message: String,
}

impl ChangeMeta {
    fn of(request: &Request<Incoming>, caller: Option<Caller>) -> Result<ChangeMeta, ApiError> {
        Ok(ChangeMeta {
            actor: actor(caller),
            if_match: if_match(request.headers())?,
            message: change_message(request.headers())?,
        })
    }

    pub(super) fn message_or(&self, default: String) -> String {
        if self.message.is_empty() {
            default
        } else {
            self.message.clone()
        }
    }
}

fn unknown(kind: &'static str, name: &str) -> ApiError {
    ApiError::Control(ControlError::UnknownName {
        kind,
        name: name.to_string(),
    })
}

/// A `name` in a resource body must be the one in the path.
fn check_body_name(given: Option<&str>, path_name: &str) -> Result<(), ApiError> {
    match given {
        Some(given) if given != path_name => Err(ApiError::BadRequest(format!(
            "name: {given:?} in the body differs from {path_name:?} in the path"
        ))),
        _ => Ok(()),
    }
}

/// A route as JSON with its (possibly default) name filled in.
fn named(name: String, route: &crate::config::RouteConfig) -> Result<Value, ApiError> {
    let mut value = serde_json::to_value(route).map_err(ControlError::from)?;
    value["name"] = json!(name);
    Ok(value)
}

/// A 200 JSON answer with `ETag` set to the config version it was read from.
fn versioned(version: i64, body: Value) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut response = json_response(StatusCode::OK, &body);
    set_etag(&mut response, version);
    Ok(response)
}

/// Deserializes an already-parsed JSON body, naming the failing field.
fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." || path.is_empty() {
            ApiError::BadRequest(format!("invalid body: {inner}"))
        } else {
            ApiError::BadRequest(format!("invalid body: {path}: {inner}"))
        }
    })
}

/// Body of `PUT /traffic/{route}/weights`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitWeightsBody {
    /// Pool name → new weight; pools not named keep theirs.
    weights: std::collections::BTreeMap<String, u32>,
}

/// Sets the weights of a route's split pools (SPEC TRAFFIC-1); validated and stored like
/// any edit.
fn set_split_weights(
    config: &mut crate::config::Config,
    route: &str,
    weights: &std::collections::BTreeMap<String, u32>,
) -> Result<(), ControlError> {
    let index = resources::find_route(config, route)
        .map(|(index, _)| index)
        .ok_or_else(|| ControlError::UnknownName {
            kind: "route",
            name: route.to_string(),
        })?;
    let split = &mut config.routes[index].split;
    for (pool, weight) in weights {
        let target = split
            .iter_mut()
            .find(|target| &target.pool == pool)
            .ok_or_else(|| ControlError::UnknownName {
                kind: "split pool",
                name: pool.clone(),
            })?;
        target.weight = *weight;
    }
    Ok(())
}

/// Body of `PUT /listeners/{name}/max_connections`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MaxConnectionsBody {
    /// 0 means unlimited.
    max_connections: u32,
}

/// `GET /certificates`: what new handshakes are served with, soonest expiry first.
fn certificates(control: &Control) -> Value {
    let table = control.gateway().certificates();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    let mut certificates: Vec<Value> = table
        .loaded
        .iter()
        .map(|cert| {
            json!({
                "names": cert.names,
                "cert_path": cert.cert_path,
                "not_after": cert.not_after,
                "not_after_rfc3339": rfc3339(cert.not_after),
                "expires_in_seconds": cert.not_after - now,
                "expired": cert.not_after <= now,
            })
        })
        .collect();
    certificates.sort_by_key(|cert| cert["not_after"].as_i64());
    json!({
        "certificates": certificates,
        "acme": control.gateway().acme_status(),
    })
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC); `None` out of range.
fn rfc3339(seconds: i64) -> Option<String> {
    let seconds = u64::try_from(seconds).ok()?;
    let time = std::time::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))?;
    Some(humantime::format_rfc3339_seconds(time).to_string())
}

fn control_version(control: &Control) -> i64 {
    control.current().info.version
}

fn actor(caller: Option<Caller>) -> String {
    caller.map_or_else(|| "anonymous".to_string(), |caller| caller.actor)
}

pub(super) fn status(control: &Control) -> Value {
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
        "firewall": firewall_stats(&gateway.firewall_stats()),
        "guard": control.guard(),
        "pools": gateway.upstream_status(),
        "traffic": gateway.traffic_status(),
        "bundles": {
            "require_signature": control.bundle_settings().require_signature,
            "last_applied_version": control.last_bundle_version(),
        },
        "pull": control.pull_config().map(|_| control.pull_status()),
    })
}

/// The body of `POST /config/diff`: the running config against `config`.
pub(super) fn diff_body(
    current: &super::Current,
    config: &crate::config::Config,
) -> Result<Value, ApiError> {
    let before = serde_json::to_value(&*current.config).map_err(ControlError::from)?;
    let after = serde_json::to_value(config).map_err(ControlError::from)?;
    let changes = diff(&before, &after);
    let text: Vec<String> = changes.iter().map(FieldChange::line).collect();
    Ok(json!({
        "from_version": current.info.version,
        "changes": changes,
        "text": text.join("\n"),
    }))
}

/// `GET /breakers`: every pool's circuit breaker (`disabled` when the pool has none), its
/// settings and how many requests it refused.
pub(super) fn breakers(control: &Control) -> Value {
    let current = control.current();
    let breakers: Vec<Value> = control
        .gateway()
        .upstream_status()
        .into_iter()
        .map(|pool| {
            let name = pool["name"].as_str().unwrap_or_default().to_string();
            let settings = resources::find_pool(&current.config, &name)
                .and_then(|config| serde_json::to_value(&config.circuit_breaker).ok())
                .unwrap_or(Value::Null);
            json!({
                "pool": name,
                "state": pool["circuit_breaker"].as_str().unwrap_or("disabled"),
                "rejections": pool["counters"]["circuit_rejections"],
                "settings": settings,
            })
        })
        .collect();
    json!({"version": current.info.version, "breakers": breakers})
}

/// The named parts of the config the admin APIs list, read, replace and remove, by the
/// same code for REST and gRPC. A new kind is a new variant here plus its REST routes; gRPC
/// takes it by name (`kind`) with no proto change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Route,
    Pool,
    /// A route's L7 policy, named `ROUTE/POLICY` over gRPC (REST has the two in its path).
    Policy,
}

/// Splits a `ROUTE/POLICY` name.
fn policy_name(name: &str) -> Result<(String, String), ApiError> {
    match name.split_once('/') {
        Some((route, policy)) if !route.is_empty() && !policy.is_empty() => {
            Ok((route.to_string(), policy.to_string()))
        }
        _ => Err(ApiError::BadRequest(format!(
            "name: {name:?} is not ROUTE/POLICY"
        ))),
    }
}

/// A prepared change of the config: audit action, default message, and the edit itself.
pub(super) struct ResourceEdit {
    pub(super) action: &'static str,
    pub(super) message: String,
    pub(super) edit: Box<EditFn>,
}

/// Changes a copy of the running config; returns whether it created something.
pub(super) type EditFn =
    dyn FnOnce(&mut crate::config::Config) -> Result<bool, ControlError> + Send + 'static;

impl Kind {
    pub(super) fn parse(text: &str) -> Result<Kind, ApiError> {
        match text {
            "route" | "routes" => Ok(Kind::Route),
            "pool" | "pools" => Ok(Kind::Pool),
            "policy" | "policies" => Ok(Kind::Policy),
            other => Err(ApiError::BadRequest(format!(
                "kind: {other:?} is not one of route, pool, policy"
            ))),
        }
    }

    pub(super) fn list(self, control: &Control) -> Result<(i64, Value), ApiError> {
        let current = control.current();
        let version = current.info.version;
        let body = match self {
            Kind::Route => {
                let routes: Vec<Value> = current
                    .config
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(index, route)| named(resources::route_name(index, route), route))
                    .collect::<Result<_, _>>()?;
                json!({"version": version, "routes": routes})
            }
            Kind::Pool => json!({"version": version, "pools": current.config.pools}),
            Kind::Policy => {
                let routes: Vec<Value> = current
                    .config
                    .routes
                    .iter()
                    .enumerate()
                    .filter(|(_, route)| !route.policies.is_empty())
                    .map(|(index, route)| {
                        json!({"route": resources::route_name(index, route), "policies": route.policies})
                    })
                    .collect();
                json!({"version": version, "routes": routes})
            }
        };
        Ok((version, body))
    }

    pub(super) fn get(self, control: &Control, name: &str) -> Result<(i64, Value), ApiError> {
        let current = control.current();
        let body = match self {
            Kind::Route => {
                let (_, route) = resources::find_route(&current.config, name)
                    .ok_or_else(|| unknown("route", name))?;
                named(name.to_string(), route)?
            }
            Kind::Pool => {
                let pool = resources::find_pool(&current.config, name)
                    .ok_or_else(|| unknown("pool", name))?;
                serde_json::to_value(pool).map_err(ControlError::from)?
            }
            Kind::Policy => {
                let (route_name, policy) = policy_name(name)?;
                let (_, route) = resources::find_route(&current.config, &route_name)
                    .ok_or_else(|| unknown("route", &route_name))?;
                let found = route
                    .policies
                    .iter()
                    .find(|p| p.name == policy)
                    .ok_or_else(|| unknown("policy", &policy))?;
                serde_json::to_value(found).map_err(ControlError::from)?
            }
        };
        Ok((current.info.version, body))
    }

    /// Replaces or adds `name` with `body` (its `name` may be omitted; when given it must
    /// match).
    pub(super) fn put(self, name: String, mut body: Value) -> Result<ResourceEdit, ApiError> {
        let route_and_policy = match self {
            Kind::Policy => Some(policy_name(&name)?),
            Kind::Route | Kind::Pool => None,
        };
        let own_name = route_and_policy
            .as_ref()
            .map_or(name.as_str(), |(_, policy)| policy.as_str());
        if let Some(object) = body.as_object_mut() {
            match object.get("name") {
                None => {
                    object.insert("name".into(), json!(own_name));
                }
                Some(given) => check_body_name(given.as_str(), own_name)?,
            }
        }
        Ok(match self {
            Kind::Route => {
                let route: crate::config::RouteConfig = from_value(body)?;
                ResourceEdit {
                    action: "put_route",
                    message: format!("route {name}: put"),
                    edit: Box::new(move |config| resources::put_route(config, &name, route)),
                }
            }
            Kind::Pool => {
                let pool: crate::config::PoolConfig = from_value(body)?;
                ResourceEdit {
                    action: "put_pool",
                    message: format!("pool {name}: put"),
                    edit: Box::new(move |config| resources::put_pool(config, &name, pool)),
                }
            }
            Kind::Policy => {
                let policy: crate::config::policy::PolicyRuleConfig = from_value(body)?;
                let (route, policy_name) = route_and_policy.unwrap_or_default();
                ResourceEdit {
                    action: "put_policy",
                    message: format!("route {route}: put policy {policy_name}"),
                    edit: Box::new(move |config| {
                        resources::put_policy(config, &route, &policy_name, policy)
                    }),
                }
            }
        })
    }

    pub(super) fn delete(self, name: String) -> Result<ResourceEdit, ApiError> {
        Ok(match self {
            Kind::Route => ResourceEdit {
                action: "delete_route",
                message: format!("route {name}: delete"),
                edit: Box::new(move |config| {
                    resources::delete_route(config, &name).map(|()| false)
                }),
            },
            Kind::Pool => ResourceEdit {
                action: "delete_pool",
                message: format!("pool {name}: delete"),
                edit: Box::new(move |config| resources::delete_pool(config, &name).map(|()| false)),
            },
            Kind::Policy => {
                let (route, policy) = policy_name(&name)?;
                ResourceEdit {
                    action: "delete_policy",
                    message: format!("route {route}: delete policy {policy}"),
                    edit: Box::new(move |config| {
                        resources::delete_policy(config, &route, &policy).map(|()| false)
                    }),
                }
            }
        })
    }
}

/// The edit of `PUT /firewall` (and gRPC `PutFirewall`).
pub(super) fn put_firewall(body: Value) -> Result<ResourceEdit, ApiError> {
    let firewall: crate::config::FirewallConfig = from_value(body)?;
    Ok(ResourceEdit {
        action: "put_firewall",
        message: "firewall: put".into(),
        edit: Box::new(move |config| {
            config.firewall = firewall;
            Ok(false)
        }),
    })
}

/// Rolls back to `version` as a new version (REST and gRPC).
pub(super) async fn rollback(
    control: Arc<Control>,
    meta: ChangeMeta,
    version: i64,
) -> Result<Outcome, ApiError> {
    let message = meta.message_or(format!("rollback to version {version}"));
    Ok(blocking(move || {
        control.rollback(
            version,
            &Change {
                actor: &meta.actor,
                action: "rollback",
                message: &message,
                if_match: meta.if_match,
            },
        )
    })
    .await??)
}

/// Sets a listener's connection limit as a new version (REST and gRPC).
pub(super) async fn set_max_connections(
    control: Arc<Control>,
    meta: ChangeMeta,
    listener: String,
    limit: u32,
) -> Result<Outcome, ApiError> {
    let message = meta.message_or(format!("listener {listener}: max_connections = {limit}"));
    Ok(blocking(move || {
        control.set_max_connections(
            &listener,
            limit,
            &Change {
                actor: &meta.actor,
                action: "set_max_connections",
                message: &message,
                if_match: meta.if_match,
            },
        )
    })
    .await??)
}

/// Runs an edit as a new version (`Control::edit`) off the async workers; returns the
/// outcome and whether it created something.
pub(super) async fn run_edit(
    control: Arc<Control>,
    meta: ChangeMeta,
    edit: ResourceEdit,
) -> Result<(Outcome, bool), ApiError> {
    let message = meta.message_or(edit.message);
    let action = edit.action;
    let edit = edit.edit;
    Ok(blocking(move || {
        control.edit(
            &Change {
                actor: &meta.actor,
                action,
                message: &message,
                if_match: meta.if_match,
            },
            edit,
        )
    })
    .await??)
}

/// Applies a bundle file through `Control::apply_bundle` off the async workers.
pub(super) async fn apply_bundle(
    control: Arc<Control>,
    meta: ChangeMeta,
    text: String,
) -> Result<Outcome, ApiError> {
    Ok(blocking(move || {
        control.apply_bundle(
            &text,
            &Change {
                actor: &meta.actor,
                action: "apply_bundle",
                message: &meta.message,
                if_match: meta.if_match,
            },
        )
    })
    .await??)
}

/// Firewall blocks since start, in total and by reason.
fn firewall_stats(stats: &crate::firewall::FirewallStats) -> Value {
    let mut by_reason = serde_json::Map::new();
    for reason in crate::firewall::BlockReason::ALL {
        by_reason.insert(reason.as_str().to_string(), json!(stats.blocked(reason)));
    }
    json!({
        "blocked_total": stats.blocked_total(),
        "blocked": by_reason,
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

/// Starts the bake of a guarded apply that changed something (REST and gRPC).
pub(super) fn start_guard(
    control: &Arc<Control>,
    outcome: &Outcome,
    gates: Option<guard::Gates>,
) -> Option<guard::GuardStatus> {
    let (gates, previous) = (gates?, outcome.previous_version?);
    let baseline = control.gateway().request_stats();
    Some(guard::start(
        control.clone(),
        outcome.info.version,
        previous,
        gates,
        baseline,
    ))
}

/// The guarded-apply query of `PUT /config`: `bake` with at least one gate
/// (`max_5xx_rate`, `max_p95`), and optionally `min_requests` (default 20).
pub(super) fn gates(query: Option<&str>) -> Result<Option<guard::Gates>, ApiError> {
    let bad = |message: String| ApiError::BadRequest(message);
    let duration = |key: &str, value: &str| {
        crate::config::units::parse_duration(value)
            .map_err(|err| bad(format!("{key}: {err}")))
            .and_then(|duration| {
                if duration.is_zero() || duration > guard::MAX_BAKE {
                    Err(bad(format!("{key}: must be between 1ms and 1h")))
                } else {
                    Ok(duration)
                }
            })
    };
    let (mut bake, mut max_5xx_rate, mut max_p95, mut min_requests) = (None, None, None, None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "bake" => bake = Some(duration("bake", &value)?),
            "max_p95" => max_p95 = Some(duration("max_p95", &value)?),
            "max_5xx_rate" => {
                let rate = value
                    .parse::<f64>()
                    .ok()
                    .filter(|rate| (0.0..=1.0).contains(rate))
                    .ok_or_else(|| bad("max_5xx_rate: must be a number from 0 to 1".into()))?;
                max_5xx_rate = Some(rate);
            }
            "min_requests" => {
                let count = value
                    .parse::<u64>()
                    .ok()
                    .filter(|count| *count >= 1)
                    .ok_or_else(|| bad("min_requests: must be a positive integer".into()))?;
                min_requests = Some(count);
            }
            other => return Err(bad(format!("unknown query parameter {other:?}"))),
        }
    }
    match bake {
        None if max_5xx_rate.is_some() || max_p95.is_some() || min_requests.is_some() => Err(bad(
            "max_5xx_rate, max_p95 and min_requests need bake (a duration such as 30s)".into(),
        )),
        None => Ok(None),
        Some(_) if max_5xx_rate.is_none() && max_p95.is_none() => Err(bad(
            "bake needs at least one gate: max_5xx_rate or max_p95".into(),
        )),
        Some(bake) => Ok(Some(guard::Gates {
            bake,
            max_5xx_rate,
            max_p95,
            min_requests: min_requests.unwrap_or(20),
        })),
    }
}

/// `?limit=N`, 1–1000, default 100.
pub(super) fn list_limit(query: Option<&str>) -> Result<u32, ApiError> {
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
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ApiError::Internal(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_of(method: Method, path: &str) -> Result<(Op, Vec<String>), ApiError> {
        route(&method, path).map(|routed| {
            (
                routed.op,
                routed.params.iter().map(ToString::to_string).collect(),
            )
        })
    }

    #[test]
    fn routes_known_paths_and_reports_wrong_methods_and_unknown_paths() {
        assert!(matches!(
            op_of(Method::GET, "/config"),
            Ok((Op::GetConfig, _))
        ));
        assert!(matches!(
            op_of(Method::PUT, "/config/"),
            Ok((Op::PutConfig, _))
        ));
        let (op, params) = op_of(Method::POST, "/config/rollback/3").unwrap();
        assert_eq!((op, params), (Op::Rollback, vec!["3".to_string()]));
        let (op, params) = op_of(Method::PUT, "/listeners/public/max_connections").unwrap();
        assert_eq!(
            (op, params),
            (Op::SetMaxConnections, vec!["public".to_string()])
        );
        match op_of(Method::DELETE, "/config") {
            Err(ApiError::MethodNotAllowed(allowed)) => assert_eq!(allowed, "GET, PUT"),
            _ => panic!("DELETE /config must be 405"),
        }
        assert!(parse_version("x").is_err());
        assert!(parse_version("0").is_err());
        assert!(matches!(
            op_of(Method::GET, "/nope"),
            Err(ApiError::NotFound)
        ));
        assert!(matches!(
            op_of(Method::GET, "/config/versions/"),
            Ok((Op::Versions, _))
        ));
        assert!(matches!(
            op_of(Method::PUT, "/listeners//max_connections"),
            Err(ApiError::NotFound)
        ));
    }

    /// The OpenAPI document and the route table name exactly the same operations, and every
    /// operation documents its success and error statuses.
    #[test]
    fn openapi_document_matches_the_route_table() {
        let document: Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
        assert!(document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")));
        let mut documented = std::collections::BTreeSet::new();
        let paths = document["paths"].as_object().expect("paths");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                if method == "parameters" {
                    continue;
                }
                let responses = operation["responses"].as_object().expect("responses");
                assert!(!responses.is_empty(), "{method} {path}: no responses");
                assert!(
                    operation["operationId"].is_string(),
                    "{method} {path}: no operationId"
                );
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        let routed: std::collections::BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|entry| (entry.method.to_string(), entry.template.to_string()))
            .collect();
        let missing: Vec<_> = routed.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi.json: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "openapi.json documents unknown routes: {extra:?}"
        );
        // Endpoints needing a token say so; public ones do not.
        for entry in ROUTES {
            let operation = &document["paths"][entry.template][entry.method.to_ascii_lowercase()];
            let public = operation["security"]
                .as_array()
                .is_some_and(|security| security.is_empty());
            assert_eq!(
                public,
                entry.op.scope().is_none(),
                "{} {}: security does not match the scope",
                entry.method,
                entry.template
            );
        }
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
