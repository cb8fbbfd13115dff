//! Response compression (SPEC POLICY-6): br, zstd or gzip, chosen from `Accept-Encoding`
//! with q-values, applied as the body streams. Whatever the encoder holds is flushed
//! whenever the upstream has nothing more ready, so a slow stream (server-sent events, a
//! long poll, chunks with pauses) reaches the client chunk by chunk, not at the end.
//!
//! Skipped: HEAD, 1xx/204/206/304, responses already carrying `Content-Encoding`,
//! `Cache-Control: no-transform`, media types outside `types`, and a known
//! `Content-Length` below `min_size`.

use std::collections::HashSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body::{Body, Frame};
use tokio::io::AsyncWrite;

use crate::config::{CompressionConfig, Encoding};
use crate::http::body::BodyError;

/// Output collected before a frame is emitted even while input keeps coming.
const EMIT_BYTES: usize = 32 * 1024;
/// Brotli's default (11) is for static assets; 4 is close to gzip's speed with a better
/// ratio, which suits compressing on the fly.
const BROTLI_QUALITY: i32 = 4;

/// A compiled `compression` table.
#[derive(Debug)]
pub struct Compression {
    algorithms: Vec<Encoding>,
    min_size: u64,
    exact: HashSet<String>,
    /// `text/` for `text/*`.
    families: Vec<String>,
}

impl Compression {
    pub fn compile(config: &CompressionConfig) -> Compression {
        let mut exact = HashSet::new();
        let mut families = Vec::new();
        for media in &config.types {
            let media = media.to_ascii_lowercase();
            match media.strip_suffix('*') {
                Some(family) => families.push(family.to_string()),
                None => {
                    exact.insert(media);
                }
            }
        }
        Compression {
            algorithms: config.algorithms.clone(),
            min_size: config.min_size.0,
            exact,
            families,
        }
    }

    fn compressible_type(&self, headers: &HeaderMap) -> bool {
        let Some(media) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let media = media.split(';').next().unwrap_or("").trim();
        let media = media.to_ascii_lowercase();
        self.exact.contains(&media)
            || self
                .families
                .iter()
                .any(|family| media.starts_with(family.as_str()))
    }

    /// Whether this response could be compressed for some client: then caches must key
    /// it by `Accept-Encoding` whatever this client accepts.
    pub fn eligible(&self, method: &Method, status: StatusCode, headers: &HeaderMap) -> bool {
        if method == Method::HEAD
            || status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
            )
            || headers.contains_key(CONTENT_RANGE)
        {
            return false;
        }
        let encoded = headers
            .get_all(CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded {
            return false;
        }
        let no_transform = headers.get_all(CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
            })
        });
        if no_transform || !self.compressible_type(headers) {
            return false;
        }
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        length.is_none_or(|length| length >= self.min_size)
    }

    /// The encoding this client prefers among ours, by q-value, ties in config order.
    pub fn negotiate(&self, accept: Option<&HeaderValue>) -> Option<Encoding> {
        let accept = accept?.to_str().ok()?;
        let mut best: Option<(u16, Encoding)> = None;
        for &encoding in &self.algorithms {
            let q = q_value(accept, encoding);
            if q > 0 && best.is_none_or(|(top, _)| q > top) {
                best = Some((q, encoding));
            }
        }
        best.map(|(_, encoding)| encoding)
    }

    /// Decides for one response and, when compressing, rewrites its headers and returns
    /// the encoding to wrap the body in.
    pub fn prepare(
        &self,
        method: &Method,
        accept: Option<&HeaderValue>,
        status: StatusCode,
        headers: &mut HeaderMap,
    ) -> Option<Encoding> {
        if !self.eligible(method, status, headers) {
            return None;
        }
        super::append_vary(headers, "Accept-Encoding");
        let encoding = self.negotiate(accept)?;
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
        headers.remove(CONTENT_LENGTH);
        headers.remove(ACCEPT_RANGES);
        // The bytes differ from the identity representation, so a strong validator
        // would be a lie (RFC 9110 §8.8.1); nginx weakens it the same way.
        if let Some(etag) = headers.get(ETAG) {
            if !etag.as_bytes().starts_with(b"W/") {
                let mut weak = b"W/".to_vec();
                weak.extend_from_slice(etag.as_bytes());
                match HeaderValue::from_bytes(&weak) {
                    Ok(value) => {
                        headers.insert(ETAG, value);
                    }
                    Err(_) => {
                        headers.remove(ETAG);
                    }
                }
            }
        }
        Some(encoding)
    }
}

/// The q-value (in thousandths) `accept` gives `encoding`: its own entry, else `*`'s,
/// else 0. `x-gzip` counts as gzip. Malformed entries are ignored.
fn q_value(accept: &str, encoding: Encoding) -> u16 {
    let mut own: Option<u16> = None;
    let mut any: Option<u16> = None;
    for item in accept.split(',') {
        let mut pieces = item.split(';');
        let coding = pieces.next().unwrap_or("").trim();
        let mut q = Some(1000);
        for param in pieces {
            if let Some((key, value)) = param.split_once('=') {
                if key.trim().eq_ignore_ascii_case("q") {
                    q = parse_q(value.trim());
                }
            }
        }
        let Some(q) = q else { continue };
        let matches = coding.eq_ignore_ascii_case(encoding.token())
            || (encoding == Encoding::Gzip && coding.eq_ignore_ascii_case("x-gzip"));
        if matches {
            own = Some(own.map_or(q, |old| old.max(q)));
        } else if coding == "*" {
            any = Some(q);
        }
    }
    own.or(any).unwrap_or(0)
}

/// RFC 9110 §12.4.2: `0`, `0.5`, `1`, `1.000`: at most three decimals, at most 1.
fn parse_q(text: &str) -> Option<u16> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let mut scale = 100;
    for digit in frac.bytes() {
        thousandths += u16::from(digit - b'0') * scale;
        scale /= 10;
    }
    (thousandths <= 1000).then_some(thousandths)
}

enum Codec {
    Gzip(GzipEncoder<Vec<u8>>),
    // Boxed: brotli's state is kilobytes, the others' a pointer or two.
    Brotli(Box<BrotliEncoder<Vec<u8>>>),
    Zstd(ZstdEncoder<Vec<u8>>),
}

impl Codec {
    fn new(encoding: Encoding) -> Codec {
        match encoding {
            Encoding::Gzip => Codec::Gzip(GzipEncoder::new(Vec::new())),
            Encoding::Br => Codec::Brotli(Box::new(BrotliEncoder::with_quality(
                Vec::new(),
                Level::Precise(BROTLI_QUALITY),
            ))),
            Encoding::Zstd => Codec::Zstd(ZstdEncoder::new(Vec::new())),
        }
    }

    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Unpin)> {
        match self {
            Codec::Gzip(w) => Pin::new(w),
            Codec::Brotli(w) => Pin::new(w.as_mut()),
            Codec::Zstd(w) => Pin::new(w),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Codec::Gzip(w) => w.get_mut(),
            Codec::Brotli(w) => w.get_mut(),
            Codec::Zstd(w) => w.get_mut(),
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        let out = self.output();
        (!out.is_empty()).then(|| Bytes::from(std::mem::take(out)))
    }

    /// The writer is a `Vec`, so every poll completes at once; `Pending` cannot happen
    /// but is passed on rather than assumed away.
    fn write_all(&mut self, mut data: &[u8], cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !data.is_empty() {
            match self.writer().poll_write(cx, data) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => data = &data[n..],
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

enum State {
    Streaming,
    Finishing(Option<HeaderMap>),
    Trailers(HeaderMap),
    Done,
}

/// Compresses the data frames of `B`; trailers pass through after the last data.
pub struct Encoder<B> {
    inner: B,
    codec: Codec,
    state: State,
    /// Input written since the last flush.
    unflushed: bool,
}

impl<B> Encoder<B> {
    pub fn new(inner: B, encoding: Encoding) -> Encoder<B> {
        Encoder {
            inner,
            codec: Codec::new(encoding),
            state: State::Streaming,
            unflushed: false,
        }
    }
}

impl<B> Body for Encoder<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Trailers(_) => {
                    let State::Trailers(trailers) = std::mem::replace(&mut this.state, State::Done)
                    else {
                        return Poll::Ready(None);
                    };
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                State::Finishing(trailers) => {
                    let trailers = trailers.take();
                    match this.codec.writer().poll_shutdown(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(err)) => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(BodyError::Encode(err))));
                        }
                        Poll::Pending => {
                            this.state = State::Finishing(trailers);
                            return Poll::Pending;
                        }
                    }
                    this.state = match trailers {
                        Some(trailers) => State::Trailers(trailers),
                        None => State::Done,
                    };
                    if let Some(bytes) = this.codec.take() {
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                }
                State::Streaming => match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if data.is_empty() {
                                continue;
                            }
                            match this.codec.write_all(&data, cx) {
                                Poll::Ready(Ok(())) => {}
                                Poll::Ready(Err(err)) => {
                                    this.state = State::Done;
                                    return Poll::Ready(Some(Err(BodyError::Encode(err))));
                                }
                                Poll::Pending => return Poll::Pending,
                            }
                            this.unflushed = true;
                            if this.codec.output().len() >= EMIT_BYTES {
                                if let Some(bytes) = this.codec.take() {
                                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                                }
                            }
                        }
                        Err(frame) => {
                            this.state = State::Finishing(frame.into_trailers().ok());
                        }
                    },
                    Poll::Ready(Some(Err(err))) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(err)));
                    }
                    Poll::Ready(None) => this.state = State::Finishing(None),
                    Poll::Pending => {
                        // Nothing more ready upstream: hand over what the encoder holds.
                        if this.unflushed {
                            match this.codec.writer().poll_flush(cx) {
                                Poll::Ready(Ok(())) => this.unflushed = false,
                                Poll::Ready(Err(err)) => {
                                    this.state = State::Done;
                                    return Poll::Ready(Some(Err(BodyError::Encode(err))));
                                }
                                Poll::Pending => return Poll::Pending,
                            }
                        }
                        return match this.codec.take() {
                            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                            None => Poll::Pending,
                        };
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compression() -> Compression {
        Compression::compile(&CompressionConfig::default())
    }

    #[test]
    fn negotiation_follows_q_values_then_preference() {
        let c = compression();
        let pick = |accept: &'static str| c.negotiate(Some(&HeaderValue::from_static(accept)));
        assert_eq!(pick("gzip, br, zstd"), Some(Encoding::Br));
        assert_eq!(pick("gzip;q=1, br;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(pick("br;q=0, gzip"), Some(Encoding::Gzip));
        assert_eq!(pick("*"), Some(Encoding::Br));
        assert_eq!(pick("*;q=0.1, zstd;q=0.9"), Some(Encoding::Zstd));
        assert_eq!(pick("br;q=0, zstd;q=0, gzip;q=0"), None);
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("*;q=0"), None);
        assert_eq!(pick("x-gzip"), Some(Encoding::Gzip));
        assert_eq!(pick("gzip;q=2"), None);
        assert_eq!(pick("gzip;q=0.0001"), None);
        assert_eq!(c.negotiate(None), None);
    }

    #[test]
    fn eligibility() {
        let c = compression();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let get = Method::GET;
        let ok = StatusCode::OK;
        let text = headers(&[("content-type", "text/html; charset=utf-8")]);
        assert!(c.eligible(&get, ok, &text));
        assert!(!c.eligible(&Method::HEAD, ok, &text));
        assert!(!c.eligible(&get, StatusCode::NO_CONTENT, &text));
        assert!(!c.eligible(&get, StatusCode::NOT_MODIFIED, &text));
        assert!(!c.eligible(&get, ok, &headers(&[("content-type", "image/png")])));
        assert!(!c.eligible(&get, ok, &headers(&[])));
        assert!(!c.eligible(
            &get,
            ok,
            &headers(&[("content-type", "text/plain"), ("content-encoding", "gzip")])
        ));
        assert!(!c.eligible(
            &get,
            ok,
            &headers(&[
                ("content-type", "text/plain"),
                ("cache-control", "public, no-transform")
            ])
        ));
        assert!(!c.eligible(
            &get,
            ok,
            &headers(&[("content-type", "text/plain"), ("content-length", "100")])
        ));
        assert!(c.eligible(
            &get,
            ok,
            &headers(&[
                ("content-type", "application/json"),
                ("content-length", "5000")
            ])
        ));
    }
}
