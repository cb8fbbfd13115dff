//! The one place that maps proxy failures to HTTP status codes (SPEC HTTP-11) and renders
//! them: a short JSON body with the request id, or a gRPC status for gRPC requests.

use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::body::{BodyError, ResponseBody};
use crate::policy::Rejection;
use crate::upstream::{LimitError, UpstreamError};

/// Everything that can stop the proxy from producing the upstream's response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request URI longer than {0} bytes")]
    UriTooLong(u64),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("request body: {0}")]
    Body(#[from] BodyError),
    /// The pool's circuit breaker is open (SPEC UP-6); the upstream was not contacted.
    #[error("circuit breaker of pool {pool} is open")]
    CircuitOpen {
        pool: std::sync::Arc<str>,
        retry_after: std::time::Duration,
    },
    /// A request policy refused the request (SPEC POLICY-1..4).
    #[error(transparent)]
    Policy(#[from] crate::policy::Rejection),
    /// The pool's concurrency limit and wait queue are full (SPEC UP-10).
    #[error("pool {pool} is overloaded: {reason}")]
    Overloaded {
        pool: std::sync::Arc<str>,
        reason: LimitError,
    },
}

impl ProxyError {
    /// The proxy error behind an upstream failure, if the failure was really the client's
    /// request body (too large, malformed, stalled).
    pub fn from_upstream(err: UpstreamError) -> ProxyError {
        if let UpstreamError::Request(cause) | UpstreamError::Stale(cause) = &err {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(cause.as_ref());
            while let Some(current) = source {
                if let Some(body) = current.downcast_ref::<BodyError>() {
                    let body = match body {
                        BodyError::TooLarge { limit } => BodyError::TooLarge { limit: *limit },
                        BodyError::IdleTimeout(period) => BodyError::IdleTimeout(*period),
                        BodyError::Deadline => BodyError::Deadline,
                        BodyError::Client(_)
                        | BodyError::ClientH1(_)
                        | BodyError::Upstream(_)
                        | BodyError::Encode(_) => {
                            return ProxyError::BadRequest("malformed or aborted request body")
                        }
                    };
                    return ProxyError::Body(body);
                }
                source = current.source();
            }
        }
        ProxyError::Upstream(err)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::Body(BodyError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Body(BodyError::IdleTimeout(_)) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Body(BodyError::Deadline) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Body(BodyError::Client(_) | BodyError::ClientH1(_)) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Body(BodyError::Upstream(_)) => StatusCode::BAD_GATEWAY,
            ProxyError::Body(BodyError::Encode(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Upstream(UpstreamError::ResponseTimeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(UpstreamError::NoEndpoint(_) | UpstreamError::AtLimit { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::CircuitOpen { .. } | ProxyError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Policy(Rejection::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Policy(Rejection::Policy { .. }) => StatusCode::FORBIDDEN,
            ProxyError::Policy(Rejection::Unauthenticated { .. }) => StatusCode::UNAUTHORIZED,
            ProxyError::Policy(Rejection::ExtAuthzDenied(denial)) => denial.status,
            ProxyError::Policy(Rejection::ExtAuthzUnavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A stable machine-readable name for the body and the access log.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::UriTooLong(_) => "uri_too_long",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::Body(BodyError::TooLarge { .. }) => "body_too_large",
            ProxyError::Body(BodyError::IdleTimeout(_)) => "request_body_timeout",
            ProxyError::Body(BodyError::Deadline) => "request_timeout",
            ProxyError::Body(_) => "bad_request_body",
            ProxyError::Upstream(UpstreamError::Connect { .. }) => "upstream_connect_failed",
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => {
                "upstream_connect_timeout"
            }
            ProxyError::Upstream(UpstreamError::Handshake { .. }) => "upstream_handshake_failed",
            ProxyError::Upstream(UpstreamError::Tls { .. }) => "upstream_tls_failed",
            ProxyError::Upstream(UpstreamError::Request(_) | UpstreamError::Stale(_)) => {
                "upstream_bad_response"
            }
            ProxyError::Upstream(UpstreamError::AtLimit { .. }) => "endpoints_at_limit",
            ProxyError::Upstream(UpstreamError::ResponseTimeout(_)) => "upstream_timeout",
            ProxyError::Upstream(UpstreamError::NoEndpoint(_)) => "no_healthy_upstream",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Policy(Rejection::RateLimited { .. }) => "rate_limited",
            ProxyError::Policy(Rejection::Policy { .. }) => "policy_denied",
            ProxyError::Policy(Rejection::Unauthenticated { .. }) => "unauthorized",
            ProxyError::Policy(Rejection::ExtAuthzDenied(_)) => "ext_authz_denied",
            ProxyError::Policy(Rejection::ExtAuthzUnavailable(_)) => "ext_authz_unavailable",
        }
    }
}

/// gRPC status codes for proxy failures (grpc/doc/statuscodes.md mapping from HTTP).
fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,       // INTERNAL
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        408 | 504 => 4,  // DEADLINE_EXCEEDED
        413 | 429 => 8,  // RESOURCE_EXHAUSTED
        502..=503 => 14, // UNAVAILABLE
        _ => 2,          // UNKNOWN
    }
}

/// Renders a proxy-generated error response.
pub fn error_response(
    error: &ProxyError,
    request_id: &HeaderValue,
    grpc: bool,
) -> Response<ResponseBody> {
    let status = error.status();
    let message = error.to_string();
    if let (ProxyError::Policy(Rejection::ExtAuthzDenied(denial)), false) = (error, grpc) {
        // The authorization service's own answer, bounded when it was read.
        let mut response = Response::new(ResponseBody::full(denial.body.clone()));
        *response.status_mut() = status;
        response.headers_mut().extend(denial.headers.clone());
        return response;
    }
    let response = if grpc {
        // Trailers-only gRPC response: HTTP 200 with the status in the header block.
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        insert_grpc_status(headers, status, &message);
        response
    } else {
        let body = serde_json::json!({
            "error": error.code(),
            "message": message,
            "status": status.as_u16(),
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let mut response = Response::new(ResponseBody::full(body.to_string()));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, retry_after(error));
        }
        response
    };
    let mut response = response;
    match error {
        ProxyError::Policy(Rejection::RateLimited { retry_after }) => {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        ProxyError::Policy(Rejection::Unauthenticated { challenge, .. }) => {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, challenge.clone());
        }
        _ => {}
    }
    if matches!(error, ProxyError::CircuitOpen { .. }) {
        response
            .headers_mut()
            .insert(CIRCUIT_HEADER, HeaderValue::from_static("open"));
    }
    response
}

/// Set on every answer of an open circuit breaker, for gRPC requests too, so a client or
/// an on-call engineer can tell "refused by the gateway" from "failed at the backend".
pub const CIRCUIT_HEADER: &str = "x-gatehouse-circuit";

/// Seconds until an open breaker lets probes through (rounded up), else one second.
fn retry_after(error: &ProxyError) -> HeaderValue {
    match error {
        ProxyError::CircuitOpen { retry_after, .. } => {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            HeaderValue::from(secs.max(1))
        }
        _ => HeaderValue::from_static("1"),
    }
}

/// The trailers that end a gRPC response whose body failed after the headers were sent.
pub fn grpc_trailers(error: BodyError) -> HeaderMap {
    // The body error's own text: `ProxyError::Body` would call it a request body.
    let message = error.to_string();
    let mut trailers = HeaderMap::new();
    insert_grpc_status(&mut trailers, ProxyError::Body(error).status(), &message);
    trailers
}

fn insert_grpc_status(headers: &mut HeaderMap, status: StatusCode, message: &str) {
    headers.insert(
        "grpc-status",
        HeaderValue::from(u16::from(grpc_code(status))),
    );
    if let Ok(value) = HeaderValue::from_str(&percent_encode_grpc(message)) {
        headers.insert("grpc-message", value);
    }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode_grpc(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(rejection: Rejection, grpc: bool) -> Response<ResponseBody> {
        error_response(
            &ProxyError::Policy(rejection),
            &HeaderValue::from_static("req-1"),
            grpc,
        )
    }

    #[test]
    fn policy_rejections_map_to_their_statuses_and_headers() {
        let response = rendered(Rejection::RateLimited { retry_after: 7 }, false);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "7");
        let challenge = HeaderValue::from_static("Bearer realm=\"gatehouse\"");
        let response = rendered(
            Rejection::Unauthenticated {
                challenge: challenge.clone(),
                reason: "no bearer token".into(),
            },
            false,
        );
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[WWW_AUTHENTICATE], challenge);
        let response = rendered(
            Rejection::Policy {
                policy: "bots".into(),
            },
            false,
        );
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let response = rendered(Rejection::ExtAuthzUnavailable("down".into()), false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let response = rendered(
            Rejection::ExtAuthzDenied(Box::new(crate::policy::Denial {
                status: StatusCode::PAYMENT_REQUIRED,
                headers,
                body: bytes::Bytes::from_static(b"pay"),
            })),
            false,
        );
        assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/plain");
        // gRPC: a status in the trailers-only answer, the challenge still there.
        let response = rendered(
            Rejection::Unauthenticated {
                challenge: challenge.clone(),
                reason: "expired".into(),
            },
            true,
        );
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "16");
        assert_eq!(response.headers()[WWW_AUTHENTICATE], challenge);
    }
}
