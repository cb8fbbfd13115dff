//! Header transforms on the upstream request and on the response (SPEC POLICY-5): per
//! route `remove`, `set` and `add`, with values from templates such as
//! `"{client_ip} via {route}"`. Templates are parsed once per snapshot; a value with no
//! placeholder is a ready `HeaderValue`, so rendering it costs a clone.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::HeaderTransform;

#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// The request facts a template can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Var {
    ClientIp,
    RequestId,
    Host,
    Path,
    Method,
    Route,
    Pool,
}

impl Var {
    const ALL: [(&'static str, Var); 7] = [
        ("client_ip", Var::ClientIp),
        ("request_id", Var::RequestId),
        ("host", Var::Host),
        ("path", Var::Path),
        ("method", Var::Method),
        ("route", Var::Route),
        ("pool", Var::Pool),
    ];
}

#[derive(Debug)]
enum Part {
    Literal(String),
    Var(Var),
}

/// A parsed header value template. `{{` and `}}` stand for literal braces.
#[derive(Debug)]
pub struct Template {
    parts: Vec<Part>,
    /// The value when the template has no placeholder.
    fixed: Option<HeaderValue>,
}

/// What templates are rendered from, borrowed from the request being served.
pub struct Context<'a> {
    pub client_ip: IpAddr,
    pub request_id: &'a HeaderValue,
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub route: &'a str,
    pub pool: &'a str,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("{{") {
                literal.push('{');
                rest = after;
            } else if let Some(after) = tail.strip_prefix("}}") {
                literal.push('}');
                rest = after;
            } else if tail.starts_with('}') {
                return Err("unmatched \"}\" (write \"}}\" for a literal brace)".into());
            } else {
                let close = tail
                    .find('}')
                    .ok_or("unclosed \"{\" (write \"{{\" for a literal brace)")?;
                let name = &tail[1..close];
                let var = Var::ALL
                    .iter()
                    .find(|(known, _)| *known == name)
                    .map(|(_, var)| *var)
                    .ok_or_else(|| {
                        let names: Vec<String> =
                            Var::ALL.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                        format!(
                            "unknown placeholder {{{name}}}; known: {}",
                            names.join(", ")
                        )
                    })?;
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Var(var));
                rest = &tail[close + 1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let literals_ok = parts.iter().all(|part| match part {
            Part::Literal(text) => HeaderValue::from_str(text).is_ok(),
            Part::Var(_) => true,
        });
        if !literals_ok {
            return Err("is not a valid header value".into());
        }
        let fixed = match parts.as_slice() {
            [] => Some(HeaderValue::from_static("")),
            [Part::Literal(text)] => HeaderValue::from_str(text).ok(),
            _ => None,
        };
        Ok(Template { parts, fixed })
    }

    /// The value for this request; none when a substituted fact makes it an invalid
    /// header value (then the header is left out rather than the request failed).
    pub fn render(&self, context: &Context<'_>) -> Option<HeaderValue> {
        if let Some(fixed) = &self.fixed {
            return Some(fixed.clone());
        }
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Var(Var::ClientIp) => {
                    let _ = write!(out, "{}", context.client_ip);
                }
                Part::Var(Var::RequestId) => out.push_str(context.request_id.to_str().ok()?),
                Part::Var(Var::Host) => out.push_str(context.host),
                Part::Var(Var::Path) => out.push_str(context.path),
                Part::Var(Var::Method) => out.push_str(context.method.as_str()),
                Part::Var(Var::Route) => out.push_str(context.route),
                Part::Var(Var::Pool) => out.push_str(context.pool),
            }
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// One compiled `request_headers` or `response_headers` table.
#[derive(Debug)]
pub struct Transform {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, Template)>,
    add: Vec<(HeaderName, Template)>,
}

impl Transform {
    /// `field` is the config path of the table, for errors.
    pub fn compile(config: &HeaderTransform, field: &str) -> Result<Transform, TransformError> {
        let name = |name: &str, at: String| {
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| TransformError::Invalid {
                field: at,
                message: format!("{name:?} is not a valid header name"),
            })
        };
        let pairs = |kind: &str, map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(header, template)| {
                    let at = format!("{field}.{kind}.{header}");
                    let parsed =
                        Template::parse(template).map_err(|message| TransformError::Invalid {
                            field: at.clone(),
                            message,
                        })?;
                    Ok((name(header, at)?, parsed))
                })
                .collect::<Result<Vec<_>, TransformError>>()
        };
        Ok(Transform {
            remove: config
                .remove
                .iter()
                .enumerate()
                .map(|(index, header)| name(header, format!("{field}.remove[{index}]")))
                .collect::<Result<_, _>>()?,
            set: pairs("set", &config.set)?,
            add: pairs("add", &config.add)?,
        })
    }

    /// `remove`, then `set` (replacing every value), then `add` (appending).
    pub fn apply(&self, headers: &mut HeaderMap, context: &Context<'_>) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, template) in &self.set {
            match template.render(context) {
                Some(value) => {
                    headers.insert(name.clone(), value);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
        for (name, template) in &self.add {
            if let Some(value) = template.render(context) {
                headers.append(name.clone(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context<'a>(request_id: &'a HeaderValue, method: &'a Method) -> Context<'a> {
        Context {
            client_ip: "192.0.2.7".parse().unwrap(),
            request_id,
            host: "app.test",
            path: "/a/b",
            method,
            route: "web",
            pool: "canary",
        }
    }

    #[test]
    fn templates_render_every_placeholder() {
        let id = HeaderValue::from_static("req-1");
        let method = Method::POST;
        let template =
            Template::parse("{client_ip} {request_id} {host} {path} {method} {route} {pool}")
                .unwrap();
        assert_eq!(
            template.render(&context(&id, &method)).unwrap(),
            "192.0.2.7 req-1 app.test /a/b POST web canary"
        );
        let braces = Template::parse("{{x}} {route}").unwrap();
        assert_eq!(braces.render(&context(&id, &method)).unwrap(), "{x} web");
        let fixed = Template::parse("plain").unwrap();
        assert!(fixed.fixed.is_some());
    }

    #[test]
    fn bad_templates_say_why() {
        let err = Template::parse("x {user}").unwrap_err();
        assert!(err.contains("unknown placeholder {user}"), "{err}");
        assert!(err.contains("{client_ip}"), "{err}");
        assert!(Template::parse("{host").unwrap_err().contains("unclosed"));
        assert!(Template::parse("a}").unwrap_err().contains("unmatched"));
        assert!(Template::parse("a\nb").is_err());
    }

    #[test]
    fn remove_then_set_then_add() {
        let mut config = HeaderTransform::default();
        config.remove.push("x-secret".into());
        config.set.insert("x-route".into(), "{route}".into());
        config.add.insert("x-via".into(), "gh".into());
        let transform = Transform::compile(&config, "routes[0].request_headers").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-route", HeaderValue::from_static("old"));
        headers.insert("x-via", HeaderValue::from_static("first"));
        let id = HeaderValue::from_static("r");
        let method = Method::GET;
        transform.apply(&mut headers, &context(&id, &method));
        assert!(headers.get("x-secret").is_none());
        assert_eq!(headers.get("x-route").unwrap(), "web");
        let via: Vec<_> = headers.get_all("x-via").iter().collect();
        assert_eq!(via, ["first", "gh"]);
    }
}
