//! The per-request pipeline: begin (snapshot, client address, request id) → route →
//! answer directly or forward upstream → stream the response back → log once.
//!
//! Later features attach as route filters between routing and forwarding; this file keeps
//! the phases explicit so they have one place to go.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, LOCATION, SERVER, TE,
    TRANSFER_ENCODING, UPGRADE, USER_AGENT,
};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::body::{BodyProgress, RequestBody, ResponseBody, Timers};
use super::error::{error_response, is_grpc, ProxyError};
use super::headers::{self, ForwardInfo};
use crate::config::{ListenerConfig, UpstreamProtocol};
use crate::route::{normalize_host, RequestFacts};
use crate::snapshot::{Action, PathRewrite, Publisher, Route, Snapshot};
use crate::telemetry::metrics::{self, UpstreamFailure};
use crate::telemetry::otlp::{self, PendingTrace, SpanKind};
use crate::telemetry::trace::{TraceContext, TRACEPARENT};
use crate::telemetry::{AccessLog, AccessRecord, LogGuard, RequestObserver, RouteMetrics};
use crate::upstream::{ClientAddrs, UpstreamError};

const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// State shared by every connection of every HTTP listener.
pub struct Proxy {
    pub publisher: Arc<Publisher>,
    pub access_log: AccessLog,
    /// Span export (`tracing.otlp_endpoint`); none when off.
    pub spans: Option<Arc<otlp::Exporter>>,
    /// Upgraded tunnels (WebSocket) outlive their HTTP connection; drain waits for them.
    pub tunnels: TaskTracker,
    /// Responses by outcome and time to the response head, for guarded applies.
    pub stats: Arc<crate::telemetry::RequestStats>,
}

/// One downstream connection.
pub struct Connection {
    /// The client address (from a trusted PROXY header when one was received).
    pub peer: SocketAddr,
    /// The gateway address the client connected to.
    pub local: SocketAddr,
    pub listener: Arc<ListenerConfig>,
    pub listener_name: Arc<str>,
    pub scheme: &'static str,
    pub requests: AtomicU64,
    /// Negotiated TLS version and the client's SNI, on terminated TLS (for the log).
    pub tls_version: Option<&'static str>,
    pub sni: Option<Arc<str>>,
    /// Framing facts hyper does not expose, by request position (HTTP/1 only).
    pub framing: Arc<super::framing::FramingReport>,
    /// Verified client certificate subject (mTLS).
    pub client_subject: Option<Arc<str>>,
    pub client_cert_header: Option<http::HeaderName>,
    pub redirect_https: Option<crate::config::RedirectHttpsConfig>,
}

/// What the pipeline learned before forwarding, shared by the log and error paths.
struct Exchange {
    snapshot: Arc<Snapshot>,
    request_id: HeaderValue,
    grpc: bool,
    log: Option<LogGuard>,
    /// The matched route's metrics (none: no route matched).
    metrics: Option<Arc<RouteMetrics>>,
    /// The request's trace context when `tracing.enabled`.
    trace: Option<TraceContext>,
    /// Its spans, when the trace is sampled and spans are exported.
    spans: Option<PendingTrace>,
}

impl Proxy {
    /// hyper's service entry point: never fails; every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<Connection>,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let snapshot = self.publisher.load();
        let observed_from = std::time::Instant::now();
        let method = metrics::method_index(request.method());
        let served = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let request_id = request
            .headers()
            .get(&snapshot.http.request_id_header)
            .filter(|value| headers::valid_request_id(value))
            .cloned()
            .unwrap_or_else(headers::new_request_id);
        let client_ip = headers::client_ip(conn.peer.ip(), request.headers(), &snapshot.http);
        let mut log = self
            .access_log
            .begin(|| begin_record(&conn, &request, &request_id, client_ip));
        let trace = snapshot
            .http
            .tracing
            .map(|ratio| TraceContext::for_request(request.headers(), ratio));
        if let (Some(log), Some(trace)) = (log.as_mut(), &trace) {
            log.record().trace_id = Some(trace.trace_id_hex());
        }
        let spans = match (&self.spans, &trace) {
            (Some(exporter), Some(trace)) if trace.sampled => Some(PendingTrace::new(
                exporter.clone(),
                otlp::Span {
                    trace_id: trace.trace_id,
                    span_id: trace.span_id,
                    parent_id: trace.parent_id,
                    name: "gatehouse.request",
                    kind: SpanKind::Server,
                    start_nanos: otlp::now_nanos(),
                    end_nanos: 0,
                    attributes: vec![
                        ("http.request.method", request.method().as_str().to_owned()),
                        ("url.path", request.uri().path().to_owned()),
                        ("gatehouse.listener", conn.listener_name.to_string()),
                    ],
                    error: false,
                },
            )),
            _ => None,
        };
        let mut exchange = Exchange {
            grpc: is_grpc(request.headers()),
            snapshot,
            request_id,
            log,
            metrics: None,
            trace,
            spans,
        };
        let started = Instant::now();
        // hyper dropped Content-Length from this request and kept Transfer-Encoding, so
        // only the raw-head scanner knows it had both (RFC 9112 §6.1: a smuggling attempt
        // until proven otherwise).
        let ambiguous = conn.framing.is_ambiguous(served);
        let outcome = if ambiguous {
            Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ))
        } else {
            self.route_and_forward(&conn, request, client_ip, &mut exchange, started)
                .await
        };
        let mut response = match outcome {
            Ok(response) => response,
            Err(error) => {
                if let Some(log) = exchange.log.as_mut() {
                    log.record().error = Some(error.to_string());
                }
                if error.status().is_server_error() {
                    tracing::warn!(request_id = ?exchange.request_id, error = %error, "proxy error");
                }
                error_response(&error, &exchange.request_id, exchange.grpc)
            }
        };
        let headers = response.headers_mut();
        headers.insert(
            &exchange.snapshot.http.request_id_header,
            exchange.request_id.clone(),
        );
        let limit = conn.listener.limits.max_requests_per_connection;
        let limit_reached =
            limit > 0 && served >= limit && response.status() != StatusCode::SWITCHING_PROTOCOLS;
        // The rest of an ambiguous request's bytes cannot be trusted as a next request.
        if ambiguous || limit_reached {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        self.stats
            .record(response.status().as_u16(), started.elapsed());
        let route_metrics = exchange
            .metrics
            .take()
            .unwrap_or_else(|| self.publisher.registries.metrics.unmatched());
        let mut spans = exchange.spans.take();
        if let Some(spans) = spans.as_mut() {
            let status = response.status();
            let root = spans.root_mut();
            root.attributes
                .push(("http.response.status_code", status.as_str().to_owned()));
            root.error = status.is_server_error();
        }
        let observer = RequestObserver::new(
            route_metrics,
            method,
            response.status().as_u16(),
            observed_from,
        )
        .with_trace(spans);
        let (parts, mut body) = response.into_parts();
        body = body.with_observer(observer);
        if let Some(mut log) = exchange.log.take() {
            log.record().status = parts.status.as_u16();
            body = body.with_log(log);
        }
        Ok(Response::from_parts(parts, body))
    }

    async fn route_and_forward(
        &self,
        conn: &Connection,
        request: Request<Incoming>,
        client_ip: std::net::IpAddr,
        exchange: &mut Exchange,
        started: Instant,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let limits = &conn.listener.limits;
        let uri_len = request
            .uri()
            .path_and_query()
            .map_or(0, |pq| pq.as_str().len()) as u64;
        if uri_len > limits.max_uri_bytes.0 {
            return Err(ProxyError::UriTooLong(limits.max_uri_bytes.0));
        }
        let snapshot = exchange.snapshot.clone();
        let host_raw = request_host(&request).map(str::to_owned);
        // ACME HTTP-01 answers go ahead of the HTTPS redirect and of every route.
        if let Some(token) = request.uri().path().strip_prefix(ACME_CHALLENGE_PATH) {
            if let Some(answer) = self.publisher.registries.certs.http_challenge(token) {
                let mut response = Response::new(ResponseBody::full(bytes::Bytes::from(answer)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                return Ok(response);
            }
        }
        if let Some(redirect) = &conn.redirect_https {
            return https_redirect(redirect, host_raw.as_deref(), request.uri());
        }
        let host = normalize_host(host_raw.as_deref().unwrap_or(""));
        let facts = RequestFacts {
            host: &host,
            path: request.uri().path(),
            query: request.uri().query(),
            method: request.method(),
            headers: request.headers(),
            client_ip,
        };
        let match_started = otlp::now_nanos();
        let found = snapshot.router.lookup(&facts);
        if let Some(spans) = exchange.spans.as_mut() {
            let route = found.map_or("none".to_owned(), |index| {
                snapshot.routes[index].name.to_string()
            });
            spans
                .root_mut()
                .attributes
                .push(("gatehouse.route", route.clone()));
            spans.child(
                "route_match",
                SpanKind::Internal,
                otlp::new_span_id(),
                match_started,
                vec![("gatehouse.route", route)],
                found.is_none(),
            );
        }
        let index = found.ok_or(ProxyError::NoRoute)?;
        let route = &snapshot.routes[index];
        exchange.metrics = Some(route.metrics.clone());
        if let Some(log) = exchange.log.as_mut() {
            log.record().route = Some(route.name.clone());
        }
        if route.require_client_cert && conn.client_subject.is_none() {
            return Err(ProxyError::Forbidden(
                "this route requires a client certificate",
            ));
        }
        match &route.action {
            Action::Direct {
                status,
                body,
                content_type,
            } => {
                let mut response = Response::new(ResponseBody::full(body.clone()));
                *response.status_mut() = *status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, content_type.clone());
                Ok(response)
            }
            Action::Redirect { status, location } => {
                let target = expand_location(
                    location,
                    conn.scheme,
                    host_raw.as_deref().unwrap_or(""),
                    request.uri(),
                );
                let mut response = Response::new(ResponseBody::empty());
                *response.status_mut() = *status;
                let value = HeaderValue::from_str(&target)
                    .map_err(|_| ProxyError::BadRequest("redirect target is not a valid header"))?;
                response.headers_mut().insert(LOCATION, value);
                Ok(response)
            }
            Action::Forward(_) => {
                let route = route.clone();
                self.forward(
                    conn, request, &route, client_ip, host_raw, exchange, started,
                )
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        conn: &Connection,
        request: Request<Incoming>,
        route: &Arc<Route>,
        client_ip: std::net::IpAddr,
        host_raw: Option<String>,
        exchange: &mut Exchange,
        started: Instant,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Action::Forward(pool) = &route.action else {
            return Err(ProxyError::NoRoute);
        };
        let snapshot = &exchange.snapshot;
        let (mut parts, body) = request.into_parts();
        let downstream_version = parts.version;

        let body_limit = route
            .max_request_body
            .unwrap_or_else(|| conn.listener.limits.max_request_body.non_zero());
        if let Some(limit) = body_limit {
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|length| length > limit) {
                return Err(ProxyError::Body(super::body::BodyError::TooLarge { limit }));
            }
        }
        let deadline = request_deadline(&parts.headers, exchange.grpc, route.timeouts.total)
            .map(|d| started + d);
        let chunked = parts.headers.contains_key(TRANSFER_ENCODING);
        let mut body =
            RequestBody::new(body, body_limit, Timers::new(route.timeouts.idle, deadline))
                .count_into(route.metrics.clone());
        if let Some(log) = exchange.log.as_ref() {
            body = body.report_bytes_to(log.bytes_in_counter());
        }
        if chunked && downstream_version <= Version::HTTP_11 {
            let wait = route.timeouts.idle.unwrap_or(Duration::from_secs(60));
            match tokio::time::timeout(wait, body.peek_first()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(ProxyError::Body(err)),
                Err(_) => return Err(ProxyError::Body(super::body::BodyError::IdleTimeout(wait))),
            }
        }

        let upgrade = if downstream_version == Version::HTTP_11 {
            headers::upgrade_requested(&parts.headers)
        } else {
            None
        };
        let downstream_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<OnUpgrade>());
        let te_trailers = headers::remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(EXPECT);
        parts.headers.remove(HOST);
        if te_trailers {
            parts
                .headers
                .insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, protocol.clone());
        }

        let select_started = otlp::now_nanos();
        let picked = pool.pick();
        if let Some(spans) = exchange.spans.as_mut() {
            let mut attributes = vec![("gatehouse.pool", pool.name.to_string())];
            if let Ok(endpoint) = &picked {
                attributes.push(("gatehouse.endpoint", endpoint.address.to_string()));
            }
            spans.child(
                "upstream_select",
                SpanKind::Internal,
                otlp::new_span_id(),
                select_started,
                attributes,
                picked.is_err(),
            );
        }
        let endpoint = picked?;
        endpoint.metrics.attempts.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = exchange.log.as_mut() {
            log.record().pool = Some(pool.name.clone());
            log.record().endpoint = Some(endpoint.address.clone());
        }
        let upstream_host: HeaderValue = match (&route.host_rewrite, route.preserve_host, &host_raw)
        {
            (Some(rewrite), _, _) => rewrite.clone(),
            (None, true, Some(original)) => HeaderValue::from_str(original)
                .map_err(|_| ProxyError::BadRequest("invalid host"))?,
            _ => HeaderValue::from_str(&endpoint.address)
                .map_err(|_| ProxyError::BadRequest("invalid host"))?,
        };
        headers::set_forwarding(
            &mut parts.headers,
            &ForwardInfo {
                peer: conn.peer.ip(),
                client: client_ip,
                proto: conn.scheme,
                host: host_raw.as_deref(),
            },
            &snapshot.http,
            downstream_version,
        );
        parts.headers.insert(
            &snapshot.http.request_id_header,
            exchange.request_id.clone(),
        );
        // Each attempt is its own client span: the upstream's parent.
        let attempt_span = otlp::new_span_id();
        if let Some(trace) = &exchange.trace {
            let value = if exchange.spans.is_some() {
                trace.header_value_with_parent(attempt_span)
            } else {
                trace.header_value()
            };
            parts.headers.insert(&TRACEPARENT, value);
        }
        if let Some(header) = &conn.client_cert_header {
            parts.headers.remove(header);
            if let Some(value) = conn
                .client_subject
                .as_deref()
                .and_then(|subject| HeaderValue::from_str(subject).ok())
            {
                parts.headers.insert(header, value);
            }
        }

        let path_and_query = rewritten_path(&route.rewrite, &parts.uri);
        parts.uri = match pool.protocol {
            UpstreamProtocol::Http1 => {
                parts.version = Version::HTTP_11;
                parts.headers.insert(HOST, upstream_host);
                Uri::try_from(path_and_query)
                    .map_err(|_| ProxyError::BadRequest("invalid request target"))?
            }
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
                parts.version = Version::HTTP_2;
                let authority = upstream_host
                    .to_str()
                    .map_err(|_| ProxyError::BadRequest("invalid host"))?;
                Uri::builder()
                    .scheme(if pool.protocol == UpstreamProtocol::H2 {
                        "https"
                    } else {
                        "http"
                    })
                    .authority(authority)
                    .path_and_query(path_and_query)
                    .build()
                    .map_err(|_| ProxyError::BadRequest("invalid request target"))?
            }
        };

        let progress = body.track_progress();
        let upstream_request = Request::from_parts(parts, body);
        let sent_at = Instant::now();
        let attempt_started = otlp::now_nanos();
        let response = response_head(
            endpoint.connections.send(
                upstream_request,
                &pool.settings,
                ClientAddrs {
                    client: conn.peer,
                    local: conn.local,
                },
            ),
            &progress,
            route.timeouts.response_header,
            deadline,
        )
        .await;
        if let Some(spans) = exchange.spans.as_mut() {
            let mut attributes = vec![
                ("gatehouse.pool", pool.name.to_string()),
                ("server.address", endpoint.address.to_string()),
            ];
            match &response {
                Ok(response) => attributes.push((
                    "http.response.status_code",
                    response.status().as_str().to_owned(),
                )),
                Err(error) => attributes.push(("error.type", error.code().to_owned())),
            }
            spans.child(
                "upstream_attempt",
                SpanKind::Client,
                attempt_span,
                attempt_started,
                attributes,
                response
                    .as_ref()
                    .map_or(true, |r| r.status().is_server_error()),
            );
        }
        let response = response.inspect_err(|error| {
            if let Some(kind) = upstream_failure(error) {
                endpoint.metrics.failed(kind);
            }
        })?;
        let upstream_elapsed = sent_at.elapsed();
        endpoint.metrics.response.observe(upstream_elapsed);
        if let Some(log) = exchange.log.as_mut() {
            log.record().upstream_ms = Some(upstream_elapsed.as_secs_f64() * 1000.0);
        }

        let (mut parts, body) = response.into_parts();
        if let (Some(protocol), Some(downstream), StatusCode::SWITCHING_PROTOCOLS) =
            (&upgrade, downstream_upgrade, parts.status)
        {
            let upstream = parts.extensions.remove::<OnUpgrade>();
            headers::remove_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, protocol.clone());
            if let Some(upstream) = upstream {
                self.tunnels.spawn(tunnel(downstream, upstream));
            }
            return Ok(Response::from_parts(parts, ResponseBody::empty()));
        }
        headers::remove_hop_by_hop(&mut parts.headers);
        if snapshot.http.hide_upstream_server {
            parts.headers.remove(SERVER);
        }
        if snapshot.http.add_via {
            headers::append_via(&mut parts.headers, parts.version);
        }
        let timers = Timers::new(route.timeouts.idle, deadline);
        let mut body = ResponseBody::upstream(body, timers);
        if exchange.grpc && is_grpc(&parts.headers) {
            body = body.with_grpc_status_on_error();
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// Waits for the upstream's response head. `timeouts.response_header` runs from the request
/// body's last progress rather than from the start: a slow client's big upload is not cut
/// off while it still moves (nginx and Envoy likewise start that clock once the request is
/// sent), yet a body the upstream stopped reading still times out. The deadline is absolute.
async fn response_head(
    send: impl std::future::Future<Output = Result<Response<Incoming>, UpstreamError>>,
    progress: &BodyProgress,
    wait: Duration,
    deadline: Option<Instant>,
) -> Result<Response<Incoming>, ProxyError> {
    let started = Instant::now();
    let expiry = |last: Instant| {
        let at = last.max(started) + wait;
        deadline.map_or(at, |deadline| at.min(deadline))
    };
    let mut send = std::pin::pin!(send);
    let mut at = expiry(progress.last());
    loop {
        tokio::select! {
            response = send.as_mut() => return response.map_err(ProxyError::from_upstream),
            () = tokio::time::sleep_until(at) => {
                let next = expiry(progress.last());
                if next > at {
                    at = next;
                    continue;
                }
                let waited = match deadline {
                    Some(deadline) if deadline <= at => at.saturating_duration_since(started),
                    _ => wait,
                };
                return Err(ProxyError::Upstream(UpstreamError::ResponseTimeout(waited)));
            }
        }
    }
}

/// How an upstream attempt failed, for `gatehouse_upstream_errors_total`; none when the
/// client's side (its request body) ended the exchange.
fn upstream_failure(error: &ProxyError) -> Option<UpstreamFailure> {
    match error {
        ProxyError::Upstream(UpstreamError::ResponseTimeout(_))
        | ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => {
            Some(UpstreamFailure::Timeout)
        }
        ProxyError::Upstream(
            UpstreamError::Connect { .. }
            | UpstreamError::Handshake { .. }
            | UpstreamError::Tls { .. },
        ) => Some(UpstreamFailure::Connect),
        ProxyError::Upstream(_) | ProxyError::Body(super::body::BodyError::Upstream(_)) => {
            Some(UpstreamFailure::Request)
        }
        _ => None,
    }
}

/// The answer of a listener that only redirects to HTTPS: same host (its port replaced),
/// path and query.
fn https_redirect(
    settings: &crate::config::RedirectHttpsConfig,
    host: Option<&str>,
    uri: &Uri,
) -> Result<Response<ResponseBody>, ProxyError> {
    let host = host.ok_or(ProxyError::BadRequest("no host to redirect to"))?;
    // Drop the port (the client's, for plain HTTP); `[::1]:8080` keeps its brackets.
    let name = match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    };
    let authority = match settings.port {
        Some(port) if port != 443 => format!("{name}:{port}"),
        _ => name.to_string(),
    };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = HeaderValue::from_str(&format!("https://{authority}{path}"))
        .map_err(|_| ProxyError::BadRequest("invalid host"))?;
    let status = StatusCode::from_u16(settings.status).unwrap_or(StatusCode::PERMANENT_REDIRECT);
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

fn request_host<B>(request: &Request<B>) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| request.headers().get(HOST).and_then(|v| v.to_str().ok()))
}

fn begin_record<B>(
    conn: &Connection,
    request: &Request<B>,
    request_id: &HeaderValue,
    client_ip: std::net::IpAddr,
) -> AccessRecord {
    AccessRecord {
        request_id: request_id.to_str().unwrap_or_default().to_owned(),
        client_ip: Some(client_ip),
        listener: conn.listener_name.clone(),
        protocol: match request.version() {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            _ => "HTTP/1.1",
        },
        tls_version: conn.tls_version,
        sni: conn.sni.clone(),
        method: request.method().as_str().to_owned(),
        host: request_host(request).unwrap_or_default().to_owned(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        user_agent: request
            .headers()
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        client_cert_subject: conn.client_subject.clone(),
        ..AccessRecord::now()
    }
}

/// The deadline for the whole exchange: the route's total timeout, tightened by a gRPC
/// client's `grpc-timeout`.
fn request_deadline(
    headers: &http::HeaderMap,
    grpc: bool,
    total: Option<Duration>,
) -> Option<Duration> {
    let grpc_timeout = if grpc {
        headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
    } else {
        None
    };
    match (total, grpc_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `grpc-timeout` is at most 8 digits and a unit: H, M, S, m, u or n.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn rewritten_path(rewrite: &PathRewrite, uri: &Uri) -> String {
    let path = uri.path();
    let new_path = match rewrite {
        PathRewrite::None => None,
        PathRewrite::StripPrefix(prefix) => path.strip_prefix(prefix.as_str()).map(|rest| {
            if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            }
        }),
        PathRewrite::ReplacePrefix { from, to } => path.strip_prefix(from.as_str()).map(|rest| {
            let joined = format!("{}{}", to.trim_end_matches('/'), rest);
            if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            }
        }),
        PathRewrite::Regex {
            pattern,
            replacement,
        } => Some(pattern.replace(path, replacement.as_str()).into_owned()),
    };
    let path = new_path.as_deref().unwrap_or(path);
    match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    }
}

fn expand_location(template: &str, scheme: &str, host: &str, uri: &Uri) -> String {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let request_uri = uri.path_and_query().map_or("/", |pq| pq.as_str());
    template
        .replace("{scheme}", scheme)
        .replace("{host}", host)
        .replace("{path}", uri.path())
        .replace("{query}", &query)
        .replace("{request_uri}", request_uri)
}

/// Relays an upgraded connection (WebSocket) byte for byte until either side closes.
async fn tunnel(downstream: OnUpgrade, upstream: OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    if let Err(err) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(error = %err, "upgraded tunnel closed with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn path_rewrites_keep_the_query() {
        let uri: Uri = "/api/users?id=1".parse().unwrap();
        assert_eq!(
            rewritten_path(&PathRewrite::StripPrefix("/api".into()), &uri),
            "/users?id=1"
        );
        assert_eq!(
            rewritten_path(&PathRewrite::StripPrefix("/api/users".into()), &uri),
            "/?id=1"
        );
        let replace = PathRewrite::ReplacePrefix {
            from: "/api".into(),
            to: "/v2".into(),
        };
        assert_eq!(rewritten_path(&replace, &uri), "/v2/users?id=1");
        let regex = PathRewrite::Regex {
            pattern: regex::Regex::new("^/api/(.*)$").unwrap(),
            replacement: "/x/$1".into(),
        };
        assert_eq!(rewritten_path(&regex, &uri), "/x/users?id=1");
    }

    #[test]
    fn redirect_templates_expand() {
        let uri: Uri = "/a/b?c=d".parse().unwrap();
        assert_eq!(
            expand_location("https://{host}{request_uri}", "http", "ex.test", &uri),
            "https://ex.test/a/b?c=d"
        );
        assert_eq!(
            expand_location("{scheme}://x{path}{query}", "http", "h", &uri),
            "http://x/a/b?c=d"
        );
    }
}
