//! CORS answered by the gateway (SPEC POLICY-6): preflights (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) get a 204 here and never reach the upstream; other
//! responses of the route get `Access-Control-*` headers when their `Origin` is allowed,
//! and `Vary: Origin` always. The gateway is the only source of these headers on such a
//! route: the upstream's `Access-Control-*` response headers are removed.

use std::collections::HashSet;

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::config::CorsConfig;

#[derive(Debug, thiserror::Error)]
pub enum CorsError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// Checks one `allow_origins` entry: `*`, `scheme://host[:port]`, or
/// `scheme://*.domain[:port]`.
pub fn check_origin_pattern(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or_else(|| format!("{origin:?} is not an origin like \"https://app.example.com\""))?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+')
    {
        return Err(format!("{origin:?} has an invalid scheme"));
    }
    let host = rest.strip_prefix("*.").unwrap_or(rest);
    if host.is_empty() || host.contains(['/', '*', '?', '#', ' ']) {
        return Err(format!(
            "{origin:?} must be scheme://host[:port] with no path; a wildcard only as \"*.\" before the domain"
        ));
    }
    Ok(())
}

/// A compiled `cors` table.
#[derive(Debug)]
pub struct Cors {
    any_origin: bool,
    /// Lower-cased exact origins.
    exact: HashSet<String>,
    /// `(scheme "://" prefix, ".domain[:port]" suffix)` for `scheme://*.domain` entries.
    wildcard: Vec<(String, String)>,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    /// `None`: any requested header is allowed (`*`).
    allow_headers: Option<(HashSet<String>, HeaderValue)>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

fn joined(items: &[String], field: &str) -> Result<HeaderValue, CorsError> {
    HeaderValue::from_str(&items.join(", ")).map_err(|_| CorsError::Invalid {
        field: field.into(),
        message: "is not a valid header value".into(),
    })
}

impl Cors {
    pub fn compile(config: &CorsConfig, field: &str) -> Result<Cors, CorsError> {
        let mut cors = Cors {
            any_origin: false,
            exact: HashSet::new(),
            wildcard: Vec::new(),
            methods: Vec::new(),
            allow_methods: joined(&config.allow_methods, &format!("{field}.allow_methods"))?,
            allow_headers: None,
            expose_headers: None,
            credentials: config.allow_credentials,
            max_age: config
                .max_age
                .non_zero()
                .map(|age| HeaderValue::from(age.as_secs())),
        };
        for (index, origin) in config.allow_origins.iter().enumerate() {
            check_origin_pattern(origin).map_err(|message| CorsError::Invalid {
                field: format!("{field}.allow_origins[{index}]"),
                message,
            })?;
            let origin = origin.to_ascii_lowercase();
            if origin == "*" {
                cors.any_origin = true;
            } else if let Some((scheme, host)) = origin.split_once("://*.") {
                cors.wildcard
                    .push((format!("{scheme}://"), format!(".{host}")));
            } else {
                cors.exact.insert(origin);
            }
        }
        for (index, method) in config.allow_methods.iter().enumerate() {
            let method = Method::from_bytes(method.as_bytes()).map_err(|_| CorsError::Invalid {
                field: format!("{field}.allow_methods[{index}]"),
                message: format!("{method:?} is not a method"),
            })?;
            cors.methods.push(method);
        }
        if !config.allow_headers.iter().any(|name| name == "*") {
            let set = config
                .allow_headers
                .iter()
                .map(|name| name.to_ascii_lowercase())
                .collect();
            let value = joined(&config.allow_headers, &format!("{field}.allow_headers"))?;
            cors.allow_headers = Some((set, value));
        }
        if !config.expose_headers.is_empty() {
            cors.expose_headers = Some(joined(
                &config.expose_headers,
                &format!("{field}.expose_headers"),
            )?);
        }
        Ok(cors)
    }

    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        if self.any_origin {
            return true;
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.to_ascii_lowercase();
        if self.exact.contains(&origin) {
            return true;
        }
        self.wildcard.iter().any(|(scheme, suffix)| {
            origin.strip_prefix(scheme.as_str()).is_some_and(|host| {
                // At least one label before the suffix, and no path or port smuggled in.
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host[..host.len() - suffix.len()].contains([':', '/'])
            })
        })
    }

    /// `Access-Control-Allow-Origin`: the origin itself, or `*` for any origin without
    /// credentials (a browser refuses `*` with credentials).
    fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any_origin && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// The gateway's answer to a preflight, or none when `method`/`headers` are not one.
    /// A preflight from a disallowed origin, or asking for a method or header that is not
    /// allowed, gets a 204 with no `Access-Control-*` headers, which the browser treats
    /// as a refusal.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<PreflightAnswer> {
        if method != Method::OPTIONS {
            return None;
        }
        let origin = headers.get(ORIGIN)?;
        let requested = headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
        let mut out = HeaderMap::new();
        out.append(VARY, HeaderValue::from_static("Origin"));
        out.append(
            VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        let method_ok = Method::from_bytes(requested.as_bytes())
            .is_ok_and(|requested| self.methods.contains(&requested));
        let requested_headers = headers.get(ACCESS_CONTROL_REQUEST_HEADERS);
        let headers_ok = match (&self.allow_headers, requested_headers) {
            (None, _) | (_, None) => true,
            (Some((allowed, _)), Some(asked)) => asked.to_str().is_ok_and(|asked| {
                asked
                    .split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .all(|name| allowed.contains(&name.to_ascii_lowercase()))
            }),
        };
        if self.allows_origin(origin) && method_ok && headers_ok {
            out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin_value(origin));
            out.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
            match (&self.allow_headers, requested_headers) {
                (Some((_, value)), _) => {
                    out.insert(ACCESS_CONTROL_ALLOW_HEADERS, value.clone());
                }
                (None, Some(asked)) => {
                    out.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
                }
                (None, None) => {}
            }
            if self.credentials {
                out.insert(
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            if let Some(age) = &self.max_age {
                out.insert(ACCESS_CONTROL_MAX_AGE, age.clone());
            }
        }
        Some(PreflightAnswer {
            status: StatusCode::NO_CONTENT,
            headers: out,
        })
    }

    /// Sets the CORS headers of an actual (non-preflight) response.
    pub fn apply(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        for name in [
            ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            ACCESS_CONTROL_EXPOSE_HEADERS,
            ACCESS_CONTROL_ALLOW_METHODS,
            ACCESS_CONTROL_ALLOW_HEADERS,
            ACCESS_CONTROL_MAX_AGE,
        ] {
            headers.remove(name);
        }
        super::append_vary(headers, "Origin");
        let Some(origin) = origin.filter(|origin| self.allows_origin(origin)) else {
            return;
        };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin_value(origin));
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

/// A preflight response: its status and headers.
pub struct PreflightAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        let config = CorsConfig {
            allow_origins: origins.iter().map(|o| o.to_string()).collect(),
            allow_headers: vec!["X-Token".into()],
            ..CorsConfig::default()
        };
        Cors::compile(&config, "routes[0].cors").unwrap()
    }

    #[test]
    fn origins_exact_and_wildcard() {
        let cors = cors(&["https://app.example.com", "https://*.example.org"]);
        let ok = |o: &'static str| cors.allows_origin(&HeaderValue::from_static(o));
        assert!(ok("https://app.example.com"));
        assert!(ok("HTTPS://APP.EXAMPLE.COM"));
        assert!(!ok("http://app.example.com"));
        assert!(!ok("https://evil.com"));
        assert!(ok("https://a.example.org"));
        assert!(ok("https://a.b.example.org"));
        assert!(!ok("https://example.org"));
        assert!(!ok("https://evilexample.org"));
        assert!(!ok("https://a.example.org.evil.com"));
    }

    #[test]
    fn origin_patterns_are_checked() {
        assert!(check_origin_pattern("*").is_ok());
        assert!(check_origin_pattern("https://a.test:8443").is_ok());
        assert!(check_origin_pattern("https://*.a.test").is_ok());
        assert!(check_origin_pattern("a.test").is_err());
        assert!(check_origin_pattern("https://a.test/path").is_err());
        assert!(check_origin_pattern("https://a.*.test").is_err());
    }

    #[test]
    fn preflight_checks_method_and_headers() {
        let cors = cors(&["https://app.test"]);
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, HeaderValue::from_static("https://app.test"));
        headers.insert(
            ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        headers.insert(
            ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("x-token"),
        );
        let answer = cors.preflight(&Method::OPTIONS, &headers).unwrap();
        assert_eq!(
            answer.headers.get(ACCESS_CONTROL_ALLOW_ORIGIN).unwrap(),
            "https://app.test"
        );
        headers.insert(
            ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("x-other"),
        );
        let answer = cors.preflight(&Method::OPTIONS, &headers).unwrap();
        assert!(answer.headers.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        headers.remove(ACCESS_CONTROL_REQUEST_METHOD);
        assert!(cors.preflight(&Method::OPTIONS, &headers).is_none());
    }
}
