//! Header hygiene (SPEC HTTP-6, HTTP-7): hop-by-hop removal, forwarding headers, the
//! client address behind trusted proxies, and request ids.

use std::net::IpAddr;

use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::XffMode;
use crate::snapshot::HttpSettings;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still see.
/// `Upgrade` is handled by the caller, which re-adds it for an upgrade it forwards.
fn fixed_hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &http::header::TRAILER,
        &http::header::PROXY_AUTHENTICATE,
    ]
}

/// Removes hop-by-hop headers, including every field named in `Connection`.
/// Returns whether the request asked for `TE: trailers`, which gRPC needs end to end.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // One pass over the names finds which fixed ones are present (usually none on
    // requests, `Connection` alone on responses): cheaper than hashing all eight to remove.
    let fixed = fixed_hop_by_hop();
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(index) = fixed.iter().position(|fixed| *fixed == name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return false;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        // `close` and `keep-alive` are the common tokens; neither names another field.
        .filter(|token| {
            !token.eq_ignore_ascii_case("close") && !token.eq_ignore_ascii_case("keep-alive")
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"));
    for (index, name) in fixed.into_iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
    te_trailers
}

/// Whether a request asks for an HTTP/1.1 protocol upgrade (`Connection: upgrade`).
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if connection_upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    }
}

/// The client address: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, settings: &HttpSettings) -> IpAddr {
    if !settings.is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let entries = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for entry in entries.iter().rev() {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !settings.is_trusted(ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// What the forwarding headers say about the request.
pub struct ForwardInfo<'a> {
    pub peer: IpAddr,
    /// `peer` as a header value, formatted once per connection.
    pub peer_value: &'a HeaderValue,
    pub client: IpAddr,
    pub proto: &'static str,
    pub host: Option<&'a str>,
    /// The request's `Host` field when it carried one (shared instead of copied when it
    /// is `host`).
    pub host_value: Option<&'a HeaderValue>,
}

/// Sets `X-Forwarded-*`, `X-Real-IP` and optionally `Forwarded` and `Via` on a request
/// going upstream. Incoming values are kept only from trusted proxies.
pub fn set_forwarding(
    headers: &mut HeaderMap,
    info: &ForwardInfo<'_>,
    settings: &HttpSettings,
    version: http::Version,
) {
    let trusted = settings.is_trusted(info.peer);
    let client_value = || match info.client == info.peer {
        true => Some(info.peer_value.clone()),
        false => HeaderValue::from_str(&info.client.to_string()).ok(),
    };
    let xff = match (settings.xff_mode, trusted) {
        (XffMode::Append, true) => {
            let existing: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if existing.is_empty() {
                Some(info.peer_value.clone())
            } else {
                HeaderValue::from_str(&format!("{}, {}", existing.join(", "), info.peer)).ok()
            }
        }
        (XffMode::Append, false) => Some(info.peer_value.clone()),
        (XffMode::Replace, _) => client_value(),
    };
    if let Some(value) = xff {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(info.proto));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        let value = info.host.and_then(|host| match info.host_value {
            Some(value) if value.as_bytes() == host.as_bytes() => Some(value.clone()),
            _ => HeaderValue::from_str(host).ok(),
        });
        match value {
            Some(value) => {
                headers.insert(&X_FORWARDED_HOST, value);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if let Some(value) = client_value() {
        headers.insert(&X_REAL_IP, value);
    }
    if settings.add_forwarded {
        let for_value = match info.client {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        let mut forwarded = format!("for={for_value};proto={}", info.proto);
        if let Some(host) = info.host {
            forwarded.push_str(&format!(";host=\"{host}\""));
        }
        if let Ok(value) = HeaderValue::from_str(&forwarded) {
            headers.append(http::header::FORWARDED, value);
        }
    }
    if settings.add_via {
        append_via(headers, version);
    }
}

pub fn append_via(headers: &mut HeaderMap, version: http::Version) {
    let protocol = match version {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{protocol} gatehouse")) {
        headers.append(http::header::VIA, value);
    }
}

/// A request id from the client is kept when it is 1–128 visible characters from a safe
/// set; anything else is replaced, so logs and upstreams never see injected text.
pub fn valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'=' | b'/')
        })
}

/// A fresh request id: 128 random bits as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut text = [0u8; 32];
    for (index, slot) in text.iter_mut().enumerate() {
        *slot = HEX[((bits >> (index * 4)) & 0xf) as usize];
    }
    // One allocation that clones share: the id goes upstream and back to the client, and
    // a copied slice would allocate again on its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The request id as a header field: an HPACK "never indexed" literal in HTTP/2 (RFC 7541
/// §6.2.3). Each value is used once, so indexing gains nothing, and h2's encoder keeps a
/// table's entries of one name chained: every new id would be compared against each id
/// still in the table (about fifty) and then evict one: 6 % of an h2c request's instructions.
/// HTTP/1 ignores the flag. Only the copies that go out carry it: `Debug` hides sensitive
/// values, and the id is logged.
pub fn request_id_field(id: &HeaderValue) -> HeaderValue {
    let mut field = id.clone();
    field.set_sensitive(true);
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(trusted: &[&str]) -> HttpSettings {
        HttpSettings {
            xff_mode: XffMode::Append,
            trusted_proxies: trusted.iter().map(|n| n.parse().unwrap()).collect(),
            request_id_header: HeaderName::from_static("x-request-id"),
            add_forwarded: false,
            add_via: false,
            hide_upstream_server: false,
            tracing: None,
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert(TE, "trailers".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        assert!(remove_hop_by_hop(&mut headers));
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn client_ip_walks_trusted_chain_from_the_right() {
        let mut headers = HeaderMap::new();
        headers.insert(
            &X_FORWARDED_FOR,
            "1.1.1.1, 2.2.2.2, 10.0.0.2".parse().unwrap(),
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_ip(peer, &headers, &settings(&[])), peer);
        assert_eq!(
            client_ip(peer, &headers, &settings(&["10.0.0.0/8"])),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn request_ids_are_validated_and_generated() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123_x.y")));
        assert!(!valid_request_id(&HeaderValue::from_static("has space")));
        assert!(!valid_request_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        let generated = new_request_id();
        assert_eq!(generated.len(), 32);
        assert!(valid_request_id(&generated));
        // The copy sent out is never indexed by HPACK; the id itself stays loggable.
        let field = request_id_field(&generated);
        assert!(field.is_sensitive());
        assert_eq!(field, generated);
        assert!(!generated.is_sensitive());
        assert_ne!(format!("{generated:?}"), "Sensitive");
    }
}
