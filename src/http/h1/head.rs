//! HTTP/1 message heads: a client's request head parsed into `http` types with its body
//! framing (RFC 9112 §6), and a response head written out with the framing the client
//! gets.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};

/// Why a request head was refused before it reached the proxy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("request head larger than {0} bytes or with too many fields")]
    TooLarge(usize),
    #[error("unsupported HTTP version")]
    Version,
}

impl HeadError {
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
            HeadError::TooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        }
    }
}

/// How a request's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head and what the connection needs to know about it.
pub struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client asked to keep the connection open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1: the client waits for an interim answer.
    pub expect_continue: bool,
    /// Both `Content-Length` and `Transfer-Encoding` were sent (RFC 9112 §6.1). The body
    /// is read as chunked so the connection stays in step, and the proxy refuses it.
    pub ambiguous: bool,
    /// Wants the connection handed over after a `101 Switching Protocols`.
    pub upgrade: bool,
}

/// Parses one request head from the front of `buf`. `Ok(None)`: incomplete, read more.
/// On success the head's bytes are split off `buf`; header values share them.
pub fn parse(
    buf: &mut BytesMut,
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Head>, HeadError> {
    // Stack slots: the common request fits, and a per-request heap array would be one more
    // allocation on the hot path. Larger limits fall back to the heap.
    const STACK_SLOTS: usize = 128;
    let mut stack: [MaybeUninit<httparse::Header<'_>>; STACK_SLOTS] =
        [const { MaybeUninit::uninit() }; STACK_SLOTS];
    let mut heap: Vec<MaybeUninit<httparse::Header<'_>>> = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_SLOTS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut parsed = httparse::Request::new(&mut []);
    let status = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        slots,
    );
    let len = match status {
        Ok(httparse::Status::Complete(len)) => {
            if len > max_head {
                return Err(HeadError::TooLarge(max_head));
            }
            len
        }
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head {
                Err(HeadError::TooLarge(max_head))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge(max_head)),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Malformed("invalid request line or header field")),
    };
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    // Offsets into `buf` survive the split below; the parsed slices do not.
    let base = buf.as_ptr() as usize;
    let path = parsed.path.unwrap_or("").as_bytes();
    let target = (path.as_ptr() as usize - base, path.len());
    let mut spans = FieldSpans::new();
    field_spans(parsed.headers, base, &mut spans).map_err(HeadError::Malformed)?;
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    // Room for the forwarding headers the proxy adds: growing a HeaderMap rehashes it.
    let (headers, fields) = header_map(&head, &mut spans, 8).map_err(HeadError::Malformed)?;
    let mut framing = Framing::None;
    if fields.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(HeadError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if !fields.chunked {
            return Err(HeadError::Malformed(
                "Transfer-Encoding does not end in chunked",
            ));
        }
        framing = Framing::Chunked;
    } else if let Some(length) = fields.content_length.filter(|&length| length > 0) {
        framing = Framing::Length(length);
    }
    let expect_continue = headers
        .get_all(http::header::EXPECT)
        .iter()
        .next_back()
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = version == Version::HTTP_11
        && fields.upgrade
        && headers.contains_key(http::header::UPGRADE);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        framing,
        keep_alive: fields.keep_alive(version),
        expect_continue: expect_continue && version == Version::HTTP_11,
        ambiguous: fields.transfer_encoding && fields.content_length.is_some(),
        upgrade,
    }))
}

/// A head's header fields as (name, value offset, value length) in the head's bytes,
/// taken before the head is split off its buffer.
pub type FieldSpans = smallvec::SmallVec<[(HeaderName, usize, usize); 24]>;

/// Fills `spans` with the spans of `fields`, whose values lie in a buffer starting at
/// address `base`. The spans are filled and drained in place, never returned or passed by
/// value: at 24 inline slots they are over a KiB, and each move was a `memcpy`.
pub fn field_spans(
    fields: &[httparse::Header<'_>],
    base: usize,
    spans: &mut FieldSpans,
) -> Result<(), &'static str> {
    spans.clear();
    for field in fields {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| "invalid header name")?;
        spans.push((
            name,
            field.value.as_ptr() as usize - base,
            field.value.len(),
        ));
    }
    Ok(())
}

/// What a message's header fields say about its framing and its connection (RFC 9112 §6
/// and §9.6): the same rules for requests and responses.
#[derive(Default)]
pub struct FramingFields {
    pub content_length: Option<u64>,
    pub transfer_encoding: bool,
    /// The final transfer coding is `chunked` (elsewhere it is invalid framing).
    pub chunked: bool,
    pub close: bool,
    keep_alive_token: bool,
    pub upgrade: bool,
}

impl FramingFields {
    /// Whether the message lets the connection stay open after it.
    pub fn keep_alive(&self, version: Version) -> bool {
        match version {
            Version::HTTP_10 => self.keep_alive_token && !self.close,
            _ => !self.close,
        }
    }
}

/// The header map of a head whose bytes are `head`, values sharing them, with room for
/// `room` more fields; and what the fields say about framing. `spans` come from fields
/// httparse accepted (`field_value` relies on it).
pub fn header_map(
    head: &Bytes,
    spans: &mut FieldSpans,
    room: usize,
) -> Result<(HeaderMap, FramingFields), &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    let mut fields = FramingFields::default();
    for (name, start, len) in spans.drain(..) {
        let value = field_value(head.slice(start..start + len))?;
        if name == CONTENT_LENGTH {
            let length = parse_content_length(value.as_bytes()).ok_or("invalid Content-Length")?;
            if fields
                .content_length
                .is_some_and(|earlier| earlier != length)
            {
                return Err("differing Content-Length values");
            }
            fields.content_length = Some(length);
        } else if name == TRANSFER_ENCODING {
            fields.transfer_encoding = true;
            fields.chunked = value
                .to_str()
                .ok()
                .and_then(|codings| codings.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                fields.close |= token.eq_ignore_ascii_case(b"close");
                fields.keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
                fields.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
            }
        }
        headers.append(name, value);
    }
    Ok((headers, fields))
}

/// A field value httparse accepted, as a `HeaderValue`. httparse refuses control
/// characters other than HTAB, and DEL, in values (RFC 9110 §5.5): exactly the bytes
/// `HeaderValue` refuses, so `HeaderValue`'s own byte-by-byte check (1.3 % of a proxied
/// request's instructions) is skipped for values that are ASCII, the usual case. A value
/// with other bytes (obs-text) takes the checked path.
fn field_value(bytes: Bytes) -> Result<HeaderValue, &'static str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8, the function's stated contract; `HeaderValue`'s
        // own invariant (no control character but HTAB) httparse guarantees, and debug
        // builds check it inside this call.
        return Ok(unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) });
    }
    HeaderValue::from_maybe_shared(bytes).map_err(|_| "invalid header value")
}

/// Digits only, as RFC 9110 §8.6 has it (no sign, no spaces inside); a comma-separated
/// list of one repeated value is accepted like repeated fields are.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut result = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() {
            return None;
        }
        // Digit by digit: no UTF-8 check and no general-purpose parser on a path that
        // every request and response head takes.
        let mut length: u64 = 0;
        for &byte in part {
            if !byte.is_ascii_digit() {
                return None;
            }
            length = length
                .checked_mul(10)?
                .checked_add(u64::from(byte - b'0'))?;
        }
        if result.is_some_and(|earlier| earlier != length) {
            return None;
        }
        result = Some(length);
    }
    result
}

/// How a response body is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// Nothing follows the head (HEAD requests, 1xx, 204, 304).
    Nothing,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    UntilClose,
}

/// What the request means for how its response is written.
pub struct ResponseContext {
    pub version: Version,
    pub head_request: bool,
    pub keep_alive: bool,
}

/// Writes `status` and `headers` into `out`, adding the framing, `Connection` and `Date`
/// headers the exchange needs. Returns the body framing and whether the connection may be
/// kept open afterwards.
pub fn encode_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &mut HeaderMap,
    body_hint: http_body::SizeHint,
    body_empty: bool,
    context: &ResponseContext,
) -> (BodyFraming, bool) {
    let mut keep_alive = context.keep_alive;
    if headers
        .get_all(CONNECTION)
        .iter()
        .any(|value| has_token(value.as_bytes(), b"close"))
    {
        keep_alive = false;
    }
    let no_body = context.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| parse_content_length(value.as_bytes()));
    headers.remove(TRANSFER_ENCODING);
    let framing = if status.is_informational() || status == StatusCode::NO_CONTENT {
        headers.remove(CONTENT_LENGTH);
        BodyFraming::Nothing
    } else if no_body {
        BodyFraming::Nothing
    } else if let Some(length) = declared {
        BodyFraming::Length(length)
    } else if body_empty {
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        BodyFraming::Length(0)
    } else if let Some(exact) = body_hint.exact() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(exact));
        BodyFraming::Length(exact)
    } else if context.version == Version::HTTP_11 {
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        BodyFraming::Chunked
    } else {
        keep_alive = false;
        BodyFraming::UntilClose
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !keep_alive {
            if !headers.contains_key(CONNECTION) || context.version == Version::HTTP_11 {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
        } else if context.version == Version::HTTP_10 {
            headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        }
    }
    if !headers.contains_key(DATE) {
        headers.insert(DATE, date_value());
    }

    let reason = status.canonical_reason().unwrap_or("");
    let size = 32
        + reason.len()
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    // The body too, when it is small and its size known: it is copied in behind the head.
    let body_room = match framing {
        BodyFraming::Length(length) if length <= super::COALESCE as u64 => length as usize,
        _ => 0,
    };
    out.reserve(size + body_room);
    out.extend_from_slice(match context.version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        push_field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// A complete answer for a head that never reached the proxy, after which the connection
/// closes.
pub fn refusal(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut headers = HeaderMap::new();
    encode_response(
        &mut out,
        status,
        &mut headers,
        http_body::SizeHint::with_exact(0),
        true,
        &ResponseContext {
            version: Version::HTTP_11,
            head_request: false,
            keep_alive: false,
        },
    );
    out
}

/// Appends one `name: value` line.
pub fn push_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the end of a chunked body: the last chunk, `trailers`, and the final CRLF.
pub fn push_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        push_field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a chunk-size line (`1a2b\r\n`) without formatting machinery.
pub fn push_chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(HEX[(len >> (shift * 4)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

/// The `Date` header value, formatted once per second per thread: formatting a date per
/// response showed up in profiles of every HTTP server that did it.
fn date_value() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        match &cached.1 {
            Some(value) if cached.0 == second => value.clone(),
            _ => {
                let text = httpdate::fmt_http_date(now);
                let value = HeaderValue::from_maybe_shared(Bytes::from(text))
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
                *cached = (second, Some(value.clone()));
                value
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Option<Head>, HeadError> {
        parse(&mut BytesMut::from(text), 8192, 100)
    }

    #[test]
    fn a_complete_head_is_split_off_and_the_rest_stays() {
        let mut buf = BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nNEXT");
        let head = parse(&mut buf, 8192, 100).unwrap().unwrap();
        assert_eq!(&buf[..], b"NEXT");
        assert_eq!(head.request.uri(), "/a?b=1");
        assert_eq!(head.request.headers()["x-a"], "1");
        assert_eq!(head.framing, Framing::None);
        assert!(head.keep_alive);
    }

    #[test]
    fn field_values_keep_their_bytes_and_control_characters_are_refused() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nX-A: a\tb c\r\nX-B: caf\xe9\r\n\r\n"[..]);
        let head = parse(&mut buf, 8192, 100).unwrap().unwrap();
        let headers = head.request.headers();
        assert_eq!(headers["x-a"].as_bytes(), b"a\tb c");
        assert_eq!(headers["x-a"].to_str().unwrap(), "a\tb c");
        // obs-text: kept as bytes, not text.
        assert_eq!(headers["x-b"].as_bytes(), b"caf\xe9");
        assert!(headers["x-b"].to_str().is_err());
        for bad in [&b"X-C: a\x01b"[..], b"X-C: a\x7fb", b"X-C: a\rb"] {
            let mut text = b"GET / HTTP/1.1\r\n".to_vec();
            text.extend_from_slice(bad);
            text.extend_from_slice(b"\r\n\r\n");
            assert!(
                parse(&mut BytesMut::from(&text[..]), 8192, 100).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_partial_head_asks_for_more_until_the_limit() {
        assert!(parse_text("GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        let mut long = BytesMut::from(format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(200)).as_str());
        assert_eq!(
            parse(&mut long, 100, 100).err(),
            Some(HeadError::TooLarge(100))
        );
    }

    #[test]
    fn content_lengths_are_digits_only_and_repeats_must_agree() {
        for (text, expected) in [
            ("0", Some(0)),
            ("43", Some(43)),
            (" 7 ", Some(7)),
            ("5, 5", Some(5)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("5,6", None),
            ("", None),
            ("5,", None),
            ("+5", None),
            ("-1", None),
            ("1a", None),
            ("1 2", None),
        ] {
            assert_eq!(parse_content_length(text.as_bytes()), expected, "{text:?}");
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let length = parse_text("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(length.framing, Framing::Length(5));
        let chunked = parse_text("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(chunked.framing, Framing::Chunked);
        let both = parse_text(
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(both.ambiguous);
        assert_eq!(both.framing, Framing::Chunked);
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse_text(bad), Err(HeadError::Malformed(_))),
                "{bad:?} was accepted"
            );
        }
        let same = parse_text("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(same.unwrap().unwrap().framing, Framing::Length(5));
    }

    #[test]
    fn keep_alive_and_upgrade_follow_the_version_and_connection_tokens() {
        let old = parse_text("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!old.keep_alive);
        let old_ka = parse_text("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(old_ka.keep_alive);
        let close = parse_text("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close.keep_alive);
        let upgrade =
            parse_text("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(upgrade.upgrade);
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex_lines() {
        for (len, line) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (4096, "1000\r\n"),
            (0x1f2e, "1f2e\r\n"),
        ] {
            let mut out = Vec::new();
            push_chunk_size(&mut out, len);
            assert_eq!(out, line.as_bytes());
        }
    }

    #[test]
    fn responses_get_the_framing_the_client_can_read() {
        let context = |version, keep_alive| ResponseContext {
            version,
            head_request: false,
            keep_alive,
        };
        let mut out = Vec::new();
        let mut headers = HeaderMap::new();
        let (framing, keep) = encode_response(
            &mut out,
            StatusCode::OK,
            &mut headers,
            http_body::SizeHint::new(),
            false,
            &context(Version::HTTP_11, true),
        );
        assert_eq!((framing, keep), (BodyFraming::Chunked, true));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");

        let mut out = Vec::new();
        let (framing, keep) = encode_response(
            &mut out,
            StatusCode::OK,
            &mut HeaderMap::new(),
            http_body::SizeHint::new(),
            false,
            &context(Version::HTTP_10, true),
        );
        assert_eq!((framing, keep), (BodyFraming::UntilClose, false));
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("connection: close\r\n"));

        let mut out = Vec::new();
        let (framing, _) = encode_response(
            &mut out,
            StatusCode::NO_CONTENT,
            &mut HeaderMap::new(),
            http_body::SizeHint::with_exact(0),
            true,
            &context(Version::HTTP_11, true),
        );
        assert_eq!(framing, BodyFraming::Nothing);
        assert!(!String::from_utf8(out).unwrap().contains("content-length"));
    }
}
