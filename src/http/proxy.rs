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

use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, LOCATION, SERVER, TE,
    TRANSFER_ENCODING, UPGRADE, USER_AGENT,
};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::body::{BodyProgress, ClientBody, Hold, RequestBody, ResponseBody, Timers};
use super::error::{error_response, is_grpc, ProxyError};
use super::headers::{self, ForwardInfo};
use crate::config::RetryOn;
use crate::config::{ListenerConfig, UpstreamProtocol};
use crate::route::{normalize_host, RequestFacts};
use crate::snapshot::{Action, PathRewrite, Publisher, Route, Snapshot};
use crate::telemetry::metrics::{self, UpstreamFailure};
use crate::telemetry::otlp::{self, PendingTrace, SpanKind};
use crate::telemetry::trace::{TraceContext, TRACEPARENT};
use crate::telemetry::{AccessLog, AccessRecord, LogGuard, RequestObserver, RouteMetrics};
use crate::upstream::{
    h1, Admission, ClientAddrs, Endpoint, InFlight, Outcome, PickContext, Pool, Reuse, SendFailure,
    UpstreamBody, UpstreamError, UpstreamRequest,
};

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
    /// The client's IP as a header value (`X-Forwarded-For`, `X-Real-IP`), formatted once.
    pub peer_value: HeaderValue,
    /// The gateway address the client connected to.
    pub local: SocketAddr,
    pub listener: Arc<ListenerConfig>,
    pub listener_name: Arc<str>,
    pub scheme: &'static str,
    pub requests: AtomicU64,
    /// Signalled when the first request arrives (a drain waits for it; see `serve_connection`).
    pub first_request: tokio::sync::Notify,
    /// Negotiated TLS version and the client's SNI, on terminated TLS (for the log).
    pub tls_version: Option<&'static str>,
    pub sni: Option<Arc<str>>,
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
    /// Boxed: only sampled requests have one, and it is large inline in every future.
    spans: Option<Box<PendingTrace>>,
    /// The pool the request was forwarded to (a split decides per request).
    pool: Option<Arc<str>>,
}

impl Proxy {
    /// hyper's service entry point: never fails; every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<Connection>,
        request: Request<ClientBody>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let snapshot = self.publisher.load();
        let started = Instant::now();
        let method = metrics::method_index(request.method());
        let served = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if served == 1 {
            conn.first_request.notify_one();
        }
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
            (Some(exporter), Some(trace)) if trace.sampled => Some(Box::new(PendingTrace::new(
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
            ))),
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
            pool: None,
        };
        // Both Content-Length and Transfer-Encoding: RFC 9112 §6.1 makes it a smuggling
        // attempt until proven otherwise.
        let ambiguous = request
            .extensions()
            .get::<super::h1::AmbiguousFraming>()
            .is_some();
        let outcome = if ambiguous {
            Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ))
        } else {
            self.route_and_forward(&conn, request, &client_ip, &mut exchange, started)
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
            headers::request_id_field(&exchange.request_id),
        );
        let limit = conn.listener.limits.max_requests_per_connection;
        let limit_reached =
            limit > 0 && served >= limit && response.status() != StatusCode::SWITCHING_PROTOCOLS;
        // (An ambiguous request, or a body left unread, closes the connection too: the
        // HTTP/1 server sees those itself, `h1::Server::exchange`.)
        if limit_reached {
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
            started.into_std(),
        )
        .with_trace(spans);
        response.body_mut().set_observer(observer);
        if let Some(mut log) = exchange.log.take() {
            log.record().status = response.status().as_u16();
            response.body_mut().set_log(log);
        }
        Ok(response)
    }

    async fn route_and_forward(
        &self,
        conn: &Connection,
        request: Request<ClientBody>,
        // By reference: a one-byte-aligned argument would make building this future copy
        // most of it (see `upstream::Reuse`); the same for `forward`.
        client_ip: &std::net::IpAddr,
        exchange: &mut Exchange,
        started: Instant,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let client_ip = *client_ip;
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
        let match_started = exchange.spans.as_ref().map_or(0, |_| otlp::now_nanos());
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
        if let Some(limit) = &snapshot.rate_limit {
            let facts = crate::policy::RequestFacts {
                client_ip,
                host: &host,
                path: request.uri().path(),
                headers: request.headers(),
            };
            limit.check(&facts, found)?;
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
        // CORS preflights are the gateway's to answer, ahead of the policies (a preflight
        // carries no credentials); they never reach the upstream.
        if let Some(cors) = route.filters.as_ref().and_then(|f| f.cors.as_ref()) {
            if let Some(answer) = cors.preflight(request.method(), request.headers()) {
                let mut response = Response::new(ResponseBody::empty());
                *response.status_mut() = answer.status;
                *response.headers_mut() = answer.headers;
                flag(exchange, "cors_preflight");
                return Ok(response);
            }
        }
        // Route filters (SPEC POLICY-1..4); a route without policies skips this branch.
        let request = match &route.policy {
            None => request,
            Some(filters) => {
                let (mut parts, body) = request.into_parts();
                let context = crate::policy::Context {
                    client_ip,
                    host: &host,
                    scheme: conn.scheme,
                    request_id: (&snapshot.http.request_id_header, &exchange.request_id),
                };
                // Boxed: the chain's state (auth, ext-authz calls) would otherwise widen
                // the future of every request, policies or not.
                Box::pin(filters.run(&mut parts, &context)).await?;
                Request::from_parts(parts, body)
            }
        };
        let captured = route.filters.as_ref().and_then(|filters| {
            filters.capture(
                request.method(),
                request.headers(),
                client_ip,
                &exchange.request_id,
                host_raw.as_deref().unwrap_or(""),
                request.uri().path(),
            )
        });
        let result = match &route.action {
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
                let choice = route
                    .split
                    .as_ref()
                    .map(|split| split.choose(request.headers(), client_ip));
                let result = self
                    .forward(
                        conn, request, &route, choice, &client_ip, host_raw, exchange, started,
                    )
                    .await;
                if let (Some(split), Some(index)) = (&route.split, choice) {
                    split.record(index, failed_for_split(&result));
                }
                result
            }
        };
        match (&route.filters, captured) {
            (Some(filters), Some(captured)) => result.map(|response| {
                let pool = exchange.pool.as_deref().unwrap_or("");
                filters.apply(captured, &route.name, pool, response)
            }),
            _ => result,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        conn: &Connection,
        request: Request<ClientBody>,
        route: &Arc<Route>,
        split_choice: Option<usize>,
        client_ip: &std::net::IpAddr,
        host_raw: Option<String>,
        exchange: &mut Exchange,
        started: Instant,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let client_ip = *client_ip;
        let Action::Forward(pool) = &route.action else {
            return Err(ProxyError::NoRoute);
        };
        let pool = match (&route.split, split_choice) {
            (Some(split), Some(index)) => split.targets.get(index).map_or(pool, |t| &t.pool),
            _ => pool,
        };
        if route.filters.is_some() {
            exchange.pool = Some(pool.name.clone());
        }
        let snapshot = exchange.snapshot.clone();
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
            .and_then(|_| parts.extensions.remove::<super::h1::OnUpgrade>());
        let te_trailers = headers::remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(EXPECT);
        let host_value = parts.headers.remove(HOST);
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

        headers::set_forwarding(
            &mut parts.headers,
            &ForwardInfo {
                peer: conn.peer.ip(),
                peer_value: &conn.peer_value,
                client: client_ip,
                proto: conn.scheme,
                host: host_raw.as_deref(),
                host_value: host_value.as_ref(),
            },
            &snapshot.http,
            downstream_version,
        );
        parts.headers.insert(
            &snapshot.http.request_id_header,
            headers::request_id_field(&exchange.request_id),
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
        if let Some(transform) = route
            .filters
            .as_ref()
            .and_then(|f| f.request_headers.as_ref())
        {
            let context = crate::policy::transform::Context {
                client_ip,
                request_id: &exchange.request_id,
                host: host_raw.as_deref().unwrap_or(""),
                path: parts.uri.path(),
                method: &parts.method,
                route: &route.name,
                pool: &pool.name,
            };
            transform.apply(&mut parts.headers, &context);
        }
        let path_and_query = rewritten_path(&route.rewrite, &parts.uri)?;
        if let Some(log) = exchange.log.as_mut() {
            log.record().pool = Some(pool.name.clone());
        }

        // Overload protection first: a queued request holds nothing else yet.
        let slot = match &pool.resilience.concurrency {
            Some(limits) => match pool
                .state
                .limiter(limits)
                .acquire(&pool.state.counters)
                .await
            {
                Ok(permit) => Some(permit),
                Err(reason) => {
                    pool.state
                        .counters
                        .overload_rejections
                        .fetch_add(1, Ordering::Relaxed);
                    flag(exchange, "overloaded");
                    return Err(ProxyError::Overloaded {
                        pool: pool.name.clone(),
                        reason,
                    });
                }
            },
            None => None,
        };

        // A body can be sent again only if it is kept: no body, or a small one buffered
        // here. A streamed body (large, unknown length, or an upgrade) gets one attempt.
        let retry = &route.retry;
        let mut replay: Option<Bytes> = None;
        let mut streamed = Some(body);
        // A mirrored request's body is kept the same way, up to the mirror's cap.
        let mirror = route
            .mirror
            .as_ref()
            .filter(|mirror| upgrade.is_none() && mirror.wanted());
        let keep = mirror.map_or(retry.max_replay_body.0, |mirror| {
            mirror.max_body.max(retry.max_replay_body.0)
        });
        if upgrade.is_none() && (retry.max_retries > 0 || route.hedge.is_some() || mirror.is_some())
        {
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let small = declared.is_some_and(|length| length <= keep);
            match streamed.take() {
                Some(body) if body.is_end_stream() => replay = Some(Bytes::new()),
                Some(body) if small => {
                    replay = Some(body.buffer(keep).await?);
                }
                other => streamed = other,
            }
        }
        let idempotent = is_idempotent(&parts.method) || retry.non_idempotent;
        pool.state.budget_request(&pool.resilience.budget);
        let pick_context = PickContext {
            client_ip,
            headers: &parts.headers,
        };
        if let Some(mirror) = mirror {
            match &replay {
                Some(bytes) if bytes.len() as u64 <= mirror.max_body => {
                    spawn_mirror(
                        mirror,
                        conn,
                        &parts,
                        &path_and_query,
                        route,
                        &host_raw,
                        &pick_context,
                        bytes.clone(),
                    );
                    flag(exchange, "mirrored");
                }
                _ => mirror.skip_body(),
            }
        }
        let per_try = retry
            .per_try_timeout
            .non_zero()
            .map_or(route.timeouts.response_header, |t| {
                t.min(route.timeouts.response_header)
            });
        // The route's own breaker for this pool when it has one, else the pool's.
        let breaker = match &route.breaker {
            Some(own) => Some(Breaker {
                config: &own.config,
                state: &own.state,
                route: Some(&route.name),
            }),
            None => pool.resilience.breaker.as_ref().map(|config| Breaker {
                config,
                state: &pool.state.breaker,
                route: None,
            }),
        };
        // Endpoints tried so far; inline up to four (no allocation per request).
        let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        let (response, endpoint, in_flight, sent_at) = loop {
            let admission = match &breaker {
                Some(breaker) => match breaker.state.lock().admit(breaker.config) {
                    Ok(admission) => Some((admission, breaker)),
                    Err(retry_after) => {
                        pool.state
                            .counters
                            .circuit_rejections
                            .fetch_add(1, Ordering::Relaxed);
                        flag(exchange, "circuit_open");
                        return Err(ProxyError::CircuitOpen {
                            pool: pool.name.clone(),
                            retry_after,
                        });
                    }
                },
                None => None,
            };
            let select_started = exchange.spans.as_ref().map_or(0, |_| otlp::now_nanos());
            let picked = pool.reserve(&pick_context, &tried).await;
            if let Some(spans) = exchange.spans.as_mut() {
                let mut attributes = vec![("gatehouse.pool", pool.name.to_string())];
                if let Ok((picked, _)) = &picked {
                    attributes.push(("gatehouse.endpoint", picked.endpoint.address.to_string()));
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
            if let Err(error) = &picked {
                if let UpstreamError::AtLimit { .. } = error {
                    flag(exchange, "endpoints_at_limit");
                }
                // The admission never reached a backend: a half-open probe slot goes back.
                if let Some((admission, breaker)) = &admission {
                    breaker.state.lock().release(*admission);
                }
            }
            let (picked, reserved) = picked?;
            let attempt_started = exchange.spans.as_ref().map_or(0, |_| otlp::now_nanos());
            if picked.panic {
                flag(exchange, "panic");
            }
            let endpoint = picked.endpoint;
            tried.push(picked.index);
            if let Some(log) = exchange.log.as_mut() {
                log.record().endpoint = Some(endpoint.address.clone());
                log.record().attempts = Some(tried.len() as u32);
            }
            let body = |streamed: &mut Option<RequestBody>| match (&replay, streamed.take()) {
                (Some(bytes), _) => RequestBody::replay(bytes.clone()),
                (None, Some(body)) => body,
                (None, None) => RequestBody::empty(),
            };
            let attempt = Attempt {
                conn,
                parts: &parts,
                path_and_query: &path_and_query,
                route,
                pool,
                host_raw: &host_raw,
                per_try,
                deadline,
                replay: replay.as_ref(),
                idempotent,
                unsent: parking_lot::Mutex::new(None),
            };
            // Hedging (SPEC UP-8): a safe read whose first attempt is slow gets a second
            // one on another endpoint; the first good response head wins and the other
            // attempt is dropped, which closes its connection.
            let hedge = route
                .hedge
                .as_ref()
                .filter(|_| tried.len() == 1 && replay.is_some() && is_safe(&parts.method));
            let (result, endpoint, in_flight, sent_at) = match hedge {
                None => {
                    let (result, in_flight, sent_at) =
                        attempt.run(endpoint, reserved, body(&mut streamed)).await;
                    (result, endpoint, in_flight, sent_at)
                }
                // Boxed: two attempts' state held at once would otherwise widen the future
                // of every request, and each request's future is moved when it starts.
                Some(hedge) => Box::pin(async {
                    let first = attempt.run(endpoint, reserved, body(&mut streamed));
                    let mut first = std::pin::pin!(first);
                    tokio::select! {
                        (result, in_flight, sent_at) = first.as_mut() => (result, endpoint, in_flight, sent_at),
                        () = tokio::time::sleep(hedge_delay(hedge, pool)) => {
                            let second = pool.try_reserve(&pick_context, &tried).ok().filter(|(p, _)| !tried.contains(&p.index));
                            match second {
                                None => {
                                    let (result, in_flight, sent_at) = first.await;
                                    (result, endpoint, in_flight, sent_at)
                                }
                                Some((second, reserved)) => {
                                    tried.push(second.index);
                                    route.metrics.hedges_sent.fetch_add(1, Ordering::Relaxed);
                                    flag(exchange, "hedged");
                                    let other = second.endpoint;
                                    let mut hedged = std::pin::pin!(attempt.run(other, reserved, body(&mut streamed)));
                                    let good = |r: &Result<Response<UpstreamBody>, ProxyError>| {
                                        r.as_ref().is_ok_and(|r| !r.status().is_server_error())
                                    };
                                    tokio::select! {
                                        (result, in_flight, sent_at) = first.as_mut() => {
                                            if good(&result) {
                                                (result, endpoint, in_flight, sent_at)
                                            } else {
                                                report(pool, endpoint, &result, None);
                                                let (result, in_flight, sent_at) = hedged.await;
                                                route.metrics.hedges_won.fetch_add(1, Ordering::Relaxed);
                                                (result, other, in_flight, sent_at)
                                            }
                                        }
                                        (result, in_flight, sent_at) = hedged.as_mut() => {
                                            if good(&result) {
                                                route.metrics.hedges_won.fetch_add(1, Ordering::Relaxed);
                                                (result, other, in_flight, sent_at)
                                            } else {
                                                report(pool, other, &result, None);
                                                let (result, in_flight, sent_at) = first.await;
                                                (result, endpoint, in_flight, sent_at)
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                })
                .await,
            };
            if let Some(log) = exchange.log.as_mut() {
                log.record().endpoint = Some(endpoint.address.clone());
                log.record().attempts = Some(tried.len() as u32);
            }
            let (_, condition) = classify(&result);
            report(pool, endpoint, &result, admission);
            // A connect failure hands a streamed body back unread: it can go elsewhere.
            if let Some(unsent) = attempt.unsent.lock().take() {
                streamed = Some(unsent);
            }
            if let Some(spans) = exchange.spans.as_mut() {
                let mut attributes = vec![
                    ("gatehouse.pool", pool.name.to_string()),
                    ("server.address", endpoint.address.to_string()),
                ];
                match &result {
                    Ok(response) => attributes.push((
                        "http.response.status_code",
                        response.status().as_str().to_owned(),
                    )),
                    Err(error) => attributes.push(("error.type", error.code().to_owned())),
                }
                // Retries share the request's attempt span id, which the upstream saw as
                // its parent in `traceparent`.
                spans.child(
                    "upstream_attempt",
                    SpanKind::Client,
                    attempt_span,
                    attempt_started,
                    attributes,
                    result
                        .as_ref()
                        .map_or(true, |r| r.status().is_server_error()),
                );
            }
            let status_listed = result.as_ref().is_ok_and(|response| {
                retry.on.contains(&RetryOn::RetriableStatus)
                    && retry.statuses.contains(&response.status().as_u16())
            });
            let retryable =
                status_listed || condition.is_some_and(|condition| retry.on.contains(&condition));
            let safe = idempotent || condition == Some(RetryOn::ConnectFailure);
            let replayable = replay.is_some()
                || (condition == Some(RetryOn::ConnectFailure) && streamed.is_some());
            let may_retry = retryable
                && safe
                && replayable
                && (tried.len() as u32) <= retry.max_retries
                && deadline.is_none_or(|deadline| Instant::now() < deadline);
            if !may_retry {
                match result {
                    Ok(response) => break (response, endpoint, in_flight, sent_at),
                    Err(err) => return Err(err),
                }
            }
            if !pool.state.budget_retry(&pool.resilience.budget) {
                route
                    .metrics
                    .budget_exhausted
                    .fetch_add(1, Ordering::Relaxed);
                flag(exchange, "retry_budget_exhausted");
                tracing::debug!(pool = %pool.name, "retry budget exhausted");
                match result {
                    Ok(response) => break (response, endpoint, in_flight, sent_at),
                    Err(err) => return Err(err),
                }
            }
            let reason = if status_listed {
                RetryOn::RetriableStatus
            } else {
                condition.unwrap_or(RetryOn::ServerError)
            };
            route.metrics.retries[metrics::retry_reason(reason)].fetch_add(1, Ordering::Relaxed);
            flag(exchange, "retried");
            // The failed attempt's response (a 5xx head) is dropped unread: nothing of it has
            // reached the client, and its connection closes instead of returning to the pool.
            drop(result);
            drop(in_flight);
            let pause = backoff(
                tried.len() as u32 - 1,
                retry.backoff_base.0,
                retry.backoff_max.0,
                &mut fastrand::Rng::new(),
            );
            match deadline {
                Some(deadline) => {
                    tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await
                }
                None => tokio::time::sleep(pause).await,
            }
        };
        if let Some(log) = exchange.log.as_mut() {
            log.record().upstream_ms = Some(sent_at.elapsed().as_secs_f64() * 1000.0);
            log.record().endpoint = Some(endpoint.address.clone());
        }

        let (mut parts, body) = response.into_parts();
        if let (Some(protocol), Some(downstream), StatusCode::SWITCHING_PROTOCOLS) =
            (&upgrade, downstream_upgrade, parts.status)
        {
            let upstream = parts
                .extensions
                .remove::<crate::upstream::h1::Upgrade>()
                .and_then(|upgrade| upgrade.take());
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
        let grpc = exchange.grpc && is_grpc(&parts.headers);
        let body = ResponseBody::upstream(body, timers, Hold { slot, in_flight }, grpc);
        Ok(Response::from_parts(parts, body))
    }
}

/// Whether a forwarded request counts as an error for the canary brake: a 5xx answer, or
/// no answer from the upstream (connect failure, timeout, reset, open circuit, overload).
/// Failures of the client's own request (4xx) do not count.
fn failed_for_split(result: &Result<Response<ResponseBody>, ProxyError>) -> bool {
    match result {
        Ok(response) => response.status().is_server_error(),
        Err(error) => error.status().is_server_error(),
    }
}

/// Sends a copy of the request to the mirror's pool in a detached task (SPEC TRAFFIC-4).
#[allow(clippy::too_many_arguments)]
fn spawn_mirror(
    mirror: &crate::traffic::mirror::Mirror,
    conn: &Connection,
    parts: &http::request::Parts,
    path_and_query: &PathAndQuery,
    route: &Route,
    host_raw: &Option<String>,
    pick_context: &PickContext<'_>,
    body: Bytes,
) {
    let Ok(picked) = mirror.pool.pick_for(pick_context, &[]) else {
        mirror.state.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let endpoint = picked.endpoint;
    let request = upstream_request(
        parts,
        path_and_query,
        route,
        &mirror.pool,
        host_raw,
        endpoint,
        RequestBody::replay(body),
    );
    match request {
        Ok((request, _)) => mirror.spawn(
            endpoint.connections.clone(),
            mirror.pool.settings.clone(),
            ClientAddrs {
                client: conn.peer,
                local: conn.local,
            },
            request,
        ),
        Err(_) => {
            mirror.state.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One attempt's upstream request: the prepared head with the endpoint's `Host` or
/// `:authority`, and the body to send. For HTTP/1.1 the head is encoded here, from the
/// client's head as it stands.
fn upstream_request(
    parts: &http::request::Parts,
    path_and_query: &PathAndQuery,
    route: &Route,
    pool: &Pool,
    host_raw: &Option<String>,
    endpoint: &Endpoint,
    mut body: RequestBody,
) -> Result<(UpstreamRequest, BodyProgress), ProxyError> {
    let upstream_host: HeaderValue = match (&route.host_rewrite, route.preserve_host, host_raw) {
        (Some(rewrite), _, _) => rewrite.clone(),
        (None, true, Some(original)) => {
            HeaderValue::from_str(original).map_err(|_| ProxyError::BadRequest("invalid host"))?
        }
        _ => endpoint
            .host_header
            .clone()
            .ok_or(ProxyError::BadRequest("invalid host"))?,
    };
    let progress = body.track_progress();
    let scheme = match pool.protocol {
        UpstreamProtocol::Http1 => {
            let outgoing =
                h1::Outgoing::encode(parts, path_and_query.as_str(), &upstream_host, body);
            return Ok((UpstreamRequest::Encoded(outgoing), progress));
        }
        UpstreamProtocol::H2 => "https",
        UpstreamProtocol::H2c => "http",
    };
    let authority = upstream_host
        .to_str()
        .map_err(|_| ProxyError::BadRequest("invalid host"))?;
    // Built in place rather than with `Request::builder()`, whose every step moves the
    // whole head.
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.headers_mut() = parts.headers.clone();
    *request.version_mut() = Version::HTTP_2;
    *request.uri_mut() = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path_and_query.clone())
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    Ok((UpstreamRequest::Request(request), progress))
}

/// Records a resilience event on the request's access-log line.
fn flag(exchange: &mut Exchange, name: &'static str) {
    if let Some(log) = exchange.log.as_mut() {
        let flags = &mut log.record().flags;
        if !flags.contains(&name) {
            flags.push(name);
        }
    }
}

/// Feeds an attempt's result to the endpoint's health and outlier tracking and, for the
/// attempt the breaker admitted, to the breaker. A result that says nothing about the
/// upstream (the client's body failed, the request was invalid) counts as a success for
/// the breaker, so a half-open probe slot is never lost.
fn report(
    pool: &Pool,
    endpoint: &Endpoint,
    result: &Result<Response<UpstreamBody>, ProxyError>,
    admission: Option<(Admission, &Breaker<'_>)>,
) {
    let (outcome, _) = classify(result);
    if let Some(outcome) = outcome {
        pool.report(endpoint, outcome);
    }
    if let Some((admission, breaker)) = admission {
        let failed = outcome.is_some_and(|outcome| outcome != Outcome::Success);
        let changed = breaker
            .state
            .lock()
            .record(breaker.config, admission, failed);
        if let Some(state) = changed {
            let route = breaker.route.map_or("", |route| &**route);
            tracing::warn!(pool = %pool.name, route, state = ?state, "circuit breaker changed state");
        }
    }
}

/// The circuit breaker a request goes through: the route's own or its pool's.
struct Breaker<'a> {
    config: &'a crate::config::CircuitBreakerConfig,
    state: &'a parking_lot::Mutex<crate::upstream::state::Breaker>,
    /// Set for a route's own breaker (for the log).
    route: Option<&'a Arc<str>>,
}

/// Everything one upstream attempt needs besides its endpoint and body.
struct Attempt<'a> {
    conn: &'a Connection,
    parts: &'a http::request::Parts,
    path_and_query: &'a PathAndQuery,
    route: &'a Route,
    pool: &'a Pool,
    host_raw: &'a Option<String>,
    per_try: Duration,
    deadline: Option<Instant>,
    /// The kept body, when the request can be sent again.
    replay: Option<&'a Bytes>,
    /// Whether the request may be repeated (method, or the route's `non_idempotent`).
    idempotent: bool,
    /// A streamed body handed back unread because the connection never came up.
    unsent: parking_lot::Mutex<Option<RequestBody>>,
}

impl Attempt<'_> {
    /// Sends the request to `endpoint` and waits for the response head under the per-try
    /// wait and the deadline. `in_flight` counts the request at the endpoint until it drops
    /// (with the response body, for the winning attempt).
    async fn run(
        &self,
        endpoint: &Endpoint,
        in_flight: InFlight,
        body: RequestBody,
    ) -> (
        Result<Response<UpstreamBody>, ProxyError>,
        InFlight,
        Instant,
    ) {
        endpoint.metrics.attempts.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        // A reused keep-alive connection that the backend closed just as the request went
        // out fails before any response byte; a repeatable request then goes out once more
        // on a fresh connection, as nginx and HAProxy do. Not a retry: the route's
        // conditions and the retry budget are not involved.
        let again = match self.idempotent {
            true => self
                .replay
                .cloned()
                .or_else(|| body.is_end_stream().then(Bytes::new)),
            false => None,
        };
        let mut result = self.send(endpoint, body, Reuse::Pooled).await;
        if let (Err(ProxyError::Upstream(UpstreamError::Stale(_))), Some(again)) = (&result, again)
        {
            endpoint
                .metrics
                .stale_retries
                .fetch_add(1, Ordering::Relaxed);
            result = self
                .send(endpoint, RequestBody::replay(again), Reuse::Fresh)
                .await;
        }
        match &result {
            Ok(response) => {
                let latency = sent_at.elapsed();
                endpoint.metrics.response.observe(latency);
                if !response.status().is_server_error() {
                    self.pool.state.latencies.record(latency);
                    self.pool.report_latency(endpoint, latency);
                }
            }
            Err(error) => {
                if let Some(kind) = upstream_failure(error) {
                    endpoint.metrics.failed(kind);
                }
            }
        }
        (result, in_flight, sent_at)
    }

    async fn send(
        &self,
        endpoint: &Endpoint,
        body: RequestBody,
        reuse: Reuse,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (request, progress) = upstream_request(
            self.parts,
            self.path_and_query,
            self.route,
            self.pool,
            self.host_raw,
            endpoint,
            body,
        )?;
        // Pinned here and lent to `response_head`: an owned future would be stored twice
        // (argument and pinned local), and this future holds the whole upstream exchange.
        let send = std::pin::pin!(endpoint.connections.send_returning(
            request,
            &self.pool.settings,
            ClientAddrs {
                client: self.conn.peer,
                local: self.conn.local,
            },
            reuse,
        ));
        response_head(send, &progress, self.per_try, self.deadline)
            .await
            .map_err(|failure| {
                if let Some(request) = failure.unsent {
                    *self.unsent.lock() = Some(request.into_body());
                }
                ProxyError::from_upstream(failure.error)
            })
    }
}

/// The hedge delay: the pool's latency percentile when configured and known, else the
/// fixed delay.
fn hedge_delay(hedge: &crate::config::HedgeConfig, pool: &Pool) -> Duration {
    hedge
        .percentile
        .and_then(|percentile| pool.state.latencies.percentile(percentile))
        .unwrap_or(hedge.delay.0)
}

/// Methods safe to hedge: reads with no effect (RFC 9110 §9.2.1), sent twice at once.
fn is_safe(method: &http::Method) -> bool {
    method == http::Method::GET || method == http::Method::HEAD
}

/// RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// What an attempt's result means for health tracking and which retry condition it meets.
/// Failures of the client's own request body count for neither.
fn classify(
    result: &Result<Response<UpstreamBody>, ProxyError>,
) -> (Option<Outcome>, Option<RetryOn>) {
    match result {
        Ok(response) if response.status().is_server_error() => {
            (Some(Outcome::Failure), Some(RetryOn::ServerError))
        }
        Ok(_) => (Some(Outcome::Success), None),
        Err(ProxyError::Upstream(
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Handshake { .. }
            | UpstreamError::Tls { .. },
        )) => (Some(Outcome::ConnectFailure), Some(RetryOn::ConnectFailure)),
        Err(ProxyError::Upstream(UpstreamError::Request(_) | UpstreamError::Stale(_))) => {
            (Some(Outcome::Failure), Some(RetryOn::Reset))
        }
        Err(ProxyError::Upstream(UpstreamError::ResponseTimeout(_))) => {
            (Some(Outcome::Failure), Some(RetryOn::PerTryTimeout))
        }
        Err(_) => (None, None),
    }
}

/// "Full jitter" exponential backoff (AWS architecture blog): a uniformly random pause in
/// [0, min(max, base × 2ⁿ)] before retry n (0-based), so synchronized clients spread out.
pub fn backoff(retry: u32, base: Duration, max: Duration, rng: &mut fastrand::Rng) -> Duration {
    let ceiling = base.saturating_mul(1u32 << retry.min(20)).min(max);
    let ceiling_us = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.u64(..=ceiling_us))
}

/// Waits for the upstream's response head. `timeouts.response_header` runs from the request
/// body's last progress rather than from the start: a slow client's big upload is not cut
/// off while it still moves (nginx and Envoy likewise start that clock once the request is
/// sent), yet a body the upstream stopped reading still times out. The deadline is absolute.
async fn response_head(
    mut send: std::pin::Pin<
        &mut impl std::future::Future<Output = Result<Response<UpstreamBody>, SendFailure>>,
    >,
    progress: &BodyProgress,
    wait: Duration,
    deadline: Option<Instant>,
) -> Result<Response<UpstreamBody>, SendFailure> {
    let started = crate::clock::coarse_now();
    let expiry = |last: Instant| {
        let at = last.max(started) + wait;
        deadline.map_or(at, |deadline| at.min(deadline))
    };
    let mut at = expiry(progress.last());
    loop {
        tokio::select! {
            // The response first: one that is ready when the wait ends still counts, and
            // the timer is only polled (filed) once the response is not ready.
            biased;
            response = send.as_mut() => return response,
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
                return Err(UpstreamError::ResponseTimeout(waited).into());
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

fn rewritten_path(rewrite: &PathRewrite, uri: &Uri) -> Result<PathAndQuery, ProxyError> {
    let path = uri.path();
    let new_path = match rewrite {
        // The request's own target, shared rather than copied.
        PathRewrite::None => match uri.path_and_query() {
            Some(path_and_query) => return Ok(path_and_query.clone()),
            None => None,
        },
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
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    PathAndQuery::try_from(target).map_err(|_| ProxyError::BadRequest("invalid request target"))
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
async fn tunnel(downstream: super::h1::OnUpgrade, mut upstream: crate::upstream::h1::Upgraded) {
    let mut downstream = match downstream.await {
        Ok(downstream) => downstream,
        Err(err) => {
            tracing::debug!(error = %err, "the client connection was not handed over");
            return;
        }
    };
    if let Err(err) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(error = %err, "upgraded tunnel closed with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        let mut rng = fastrand::Rng::with_seed(42);
        for retry in 0..8u32 {
            let ceiling = (base * 2u32.pow(retry)).min(max);
            let pauses: Vec<Duration> = (0..200)
                .map(|_| backoff(retry, base, max, &mut rng))
                .collect();
            assert!(pauses.iter().all(|p| *p <= ceiling), "retry {retry}");
            // Jitter: 200 draws from [0, ceiling] spread out (a fixed backoff would give one
            // value); the mean is within 20 % of ceiling / 2.
            let distinct: std::collections::HashSet<_> = pauses.iter().collect();
            assert!(
                distinct.len() > 150,
                "retry {retry}: {} distinct",
                distinct.len()
            );
            let mean = pauses.iter().sum::<Duration>() / 200;
            let half = ceiling / 2;
            assert!(
                mean > half * 4 / 5 && mean < half * 6 / 5,
                "retry {retry}: mean {mean:?}"
            );
        }
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&http::Method::GET));
        assert!(is_idempotent(&http::Method::PUT));
        assert!(!is_idempotent(&http::Method::POST));
        assert!(!is_idempotent(&http::Method::PATCH));
    }

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
        let rewritten = |rewrite: &PathRewrite| rewritten_path(rewrite, &uri).unwrap();
        assert_eq!(rewritten(&PathRewrite::None), "/api/users?id=1");
        assert_eq!(
            rewritten(&PathRewrite::StripPrefix("/api".into())),
            "/users?id=1"
        );
        assert_eq!(
            rewritten(&PathRewrite::StripPrefix("/api/users".into())),
            "/?id=1"
        );
        let replace = PathRewrite::ReplacePrefix {
            from: "/api".into(),
            to: "/v2".into(),
        };
        assert_eq!(rewritten(&replace), "/v2/users?id=1");
        let regex = PathRewrite::Regex {
            pattern: regex::Regex::new("^/api/(.*)$").unwrap(),
            replacement: "/x/$1".into(),
        };
        assert_eq!(rewritten(&regex), "/x/users?id=1");
        let invalid = PathRewrite::Regex {
            pattern: regex::Regex::new("^/api/(.*)$").unwrap(),
            replacement: "/x y/$1".into(),
        };
        assert!(rewritten_path(&invalid, &uri).is_err());
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
