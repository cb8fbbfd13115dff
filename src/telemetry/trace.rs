//! W3C Trace Context propagation (SPEC OPS-3): a valid incoming `traceparent` is continued
//! (same trace id and sampled flag, the gateway's own span id as the new parent), anything
//! else starts a new trace whose sampled flag follows `tracing.sample_ratio`. The result
//! goes upstream as `traceparent`; `tracestate` passes through untouched. The trace id is
//! written to the access log; sampled requests' spans are exported by `otlp`.

use http::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The trace context the gateway sends upstream for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The gateway's span: the parent of whatever the upstream records.
    pub span_id: u64,
    pub sampled: bool,
    /// Whether the trace came from the client's `traceparent`.
    pub continued: bool,
    /// The caller's span (the parent of the gateway's), for a continued trace.
    pub parent_id: Option<u64>,
}

impl TraceContext {
    /// Continues the request's trace or starts one. `sample_ratio` (0.0–1.0) decides the
    /// sampled flag of new traces only: a continued trace keeps its caller's decision.
    pub fn for_request(headers: &HeaderMap, sample_ratio: f64) -> TraceContext {
        let span_id = new_span_id();
        match headers
            .get(&TRACEPARENT)
            .and_then(|value| parse(value.as_bytes()))
        {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id,
                sampled: flags & 1 == 1,
                continued: true,
                parent_id: Some(parent),
            },
            None => TraceContext {
                trace_id: new_trace_id(),
                span_id,
                sampled: sample_ratio >= 1.0 || fastrand::f64() < sample_ratio,
                continued: false,
                parent_id: None,
            },
        }
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// `00-<trace id>-<span id>-<flags>`, naming the gateway's span as the parent.
    pub fn header_value(&self) -> HeaderValue {
        self.header_value_with_parent(self.span_id)
    }

    /// The same, naming `parent` (an upstream attempt's span) as the parent.
    pub fn header_value_with_parent(&self, parent: u64) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            parent,
            u8::from(self.sampled)
        );
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

fn new_trace_id() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn new_span_id() -> u64 {
    super::otlp::new_span_id()
}

/// Parses a `traceparent` value: `version-traceid-parentid-flags`, lower-case hex. Version
/// `ff` is invalid; for version `00` nothing may follow; later versions may append fields
/// after a dash, which are ignored (W3C Trace Context §3.2.4). All-zero ids are invalid.
pub fn parse(value: &[u8]) -> Option<(u128, u64, u8)> {
    if value.len() < 55 {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let (version, rest) = text.split_at(2);
    if !lower_hex(version) || version == "ff" {
        return None;
    }
    let rest = rest.strip_prefix('-')?;
    let (trace, rest) = rest.split_at_checked(32)?;
    let rest = rest.strip_prefix('-')?;
    let (parent, rest) = rest.split_at_checked(16)?;
    let rest = rest.strip_prefix('-')?;
    let (flags, tail) = rest.split_at_checked(2)?;
    if version == "00" && !tail.is_empty() {
        return None;
    }
    if !tail.is_empty() && !tail.starts_with('-') {
        return None;
    }
    if !lower_hex(trace) || !lower_hex(parent) || !lower_hex(flags) {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|id| *id != 0)?;
    let parent_id = u64::from_str_radix(parent, 16).ok().filter(|id| *id != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, parent_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_rejects_malformed_values() {
        assert_eq!(
            parse(VALID.as_bytes()),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }

    #[test]
    fn continues_or_starts_a_trace() {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        let continued = TraceContext::for_request(&headers, 0.0);
        assert!(continued.continued && continued.sampled);
        assert_eq!(continued.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(continued.span_id, 0x00f067aa0ba902b7);
        let sent = continued.header_value();
        assert!(parse(sent.as_bytes()).is_some());
        assert!(sent
            .to_str()
            .unwrap()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));

        let fresh = TraceContext::for_request(&HeaderMap::new(), 1.0);
        assert!(!fresh.continued && fresh.sampled);
        assert!(!TraceContext::for_request(&HeaderMap::new(), 0.0).sampled);
        let sampled = (0..2000)
            .filter(|_| TraceContext::for_request(&HeaderMap::new(), 0.25).sampled)
            .count();
        assert!((300..700).contains(&sampled), "{sampled} of 2000 at 0.25");
    }
}
