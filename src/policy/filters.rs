//! The response-side filters of a route (SPEC POLICY-5, POLICY-6): header transforms
//! (`transform.rs`), CORS (`cors.rs`) and compression (`compress.rs`), compiled once per
//! snapshot into `Filters` on the route. A route without any of them carries `None` and
//! pays nothing.
//!
//! Order on the response: header transforms → CORS headers → compression. CORS preflights
//! are answered before forwarding.

use std::net::IpAddr;

use http::header::{ACCEPT_ENCODING, ORIGIN, VARY};
use http::{HeaderMap, HeaderValue, Method, Response};

use crate::config::RouteConfig;
use crate::http::body::ResponseBody;

use super::PolicyError;
use super::{compress, cors, transform};

/// Appends `token` to `Vary` unless it (or `*`) is already there.
pub fn append_vary(headers: &mut HeaderMap, token: &'static str) {
    let present = headers.get_all(VARY).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|item| item.trim() == "*" || item.trim().eq_ignore_ascii_case(token))
        })
    });
    if !present {
        headers.append(VARY, HeaderValue::from_static(token));
    }
}

/// A route's compiled response-side filters (and its request header transform).
pub struct Filters {
    pub request_headers: Option<transform::Transform>,
    pub response_headers: Option<transform::Transform>,
    pub cors: Option<cors::Cors>,
    pub compression: Option<compress::Compression>,
}

/// What the response filters need from the request, taken before it is forwarded.
pub struct Captured {
    method: Method,
    origin: Option<HeaderValue>,
    accept_encoding: Option<HeaderValue>,
    /// For response templates only.
    template: Option<(IpAddr, HeaderValue, String, String)>,
}

impl Filters {
    /// None when the route uses none of these filters.
    pub fn compile(route: &RouteConfig, path: &str) -> Result<Option<Filters>, PolicyError> {
        let filters = Filters {
            request_headers: route
                .request_headers
                .as_ref()
                .filter(|t| !t.is_empty())
                .map(|t| transform::Transform::compile(t, &format!("{path}.request_headers")))
                .transpose()?,
            response_headers: route
                .response_headers
                .as_ref()
                .filter(|t| !t.is_empty())
                .map(|t| transform::Transform::compile(t, &format!("{path}.response_headers")))
                .transpose()?,
            cors: route
                .cors
                .as_ref()
                .map(|c| cors::Cors::compile(c, &format!("{path}.cors")))
                .transpose()?,
            compression: route
                .compression
                .as_ref()
                .map(compress::Compression::compile),
        };
        let used = filters.request_headers.is_some()
            || filters.response_headers.is_some()
            || filters.cors.is_some()
            || filters.compression.is_some();
        Ok(used.then_some(filters))
    }

    /// Whether anything runs on the response.
    fn on_response(&self) -> bool {
        self.response_headers.is_some() || self.cors.is_some() || self.compression.is_some()
    }

    pub fn capture(
        &self,
        method: &Method,
        headers: &HeaderMap,
        client_ip: IpAddr,
        request_id: &HeaderValue,
        host: &str,
        path: &str,
    ) -> Option<Captured> {
        if !self.on_response() {
            return None;
        }
        Some(Captured {
            method: method.clone(),
            origin: self
                .cors
                .as_ref()
                .and_then(|_| headers.get(ORIGIN).cloned()),
            accept_encoding: self
                .compression
                .as_ref()
                .and_then(|_| headers.get(ACCEPT_ENCODING).cloned()),
            template: self.response_headers.as_ref().map(|_| {
                (
                    client_ip,
                    request_id.clone(),
                    host.to_owned(),
                    path.to_owned(),
                )
            }),
        })
    }

    /// Runs the response filters in their order: header transforms, CORS, compression.
    pub fn apply(
        &self,
        captured: Captured,
        route: &str,
        pool: &str,
        response: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        let (mut parts, mut body) = response.into_parts();
        if let (Some(transform), Some((client_ip, request_id, host, path))) =
            (&self.response_headers, &captured.template)
        {
            let context = transform::Context {
                client_ip: *client_ip,
                request_id,
                host,
                path,
                method: &captured.method,
                route,
                pool,
            };
            transform.apply(&mut parts.headers, &context);
        }
        if let Some(cors) = &self.cors {
            cors.apply(captured.origin.as_ref(), &mut parts.headers);
        }
        if let Some(compression) = &self.compression {
            if let Some(encoding) = compression.prepare(
                &captured.method,
                captured.accept_encoding.as_ref(),
                parts.status,
                &mut parts.headers,
            ) {
                body = body.encoded(encoding);
            }
        }
        Response::from_parts(parts, body)
    }
}
