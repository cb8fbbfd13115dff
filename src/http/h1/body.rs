//! A client's HTTP/1 request body, read straight from the connection by whoever polls it.
//!
//! The connection's read half and its buffer move into the body for the body's life and
//! come back to the connection when it ends or is dropped. Reading in the consumer's task
//! (the upstream connection sending it) needs no channel between tasks and no copy: data
//! frames are slices of the read buffer.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, ReadHalf};
use tokio::sync::Notify;

use super::head::Framing;
use super::BoxedIo;

/// Largest chunk-size line, extensions included, and largest trailer section.
const MAX_CHUNK_LINE: usize = 4096;
/// How much is read from the socket at a time while a body streams.
const BODY_READ: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error("the client closed the connection before the body ended")]
    Incomplete,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("reading the body: {0}")]
    Io(#[from] std::io::Error),
}

/// The connection's read side: the socket's read half and bytes read but not yet used.
pub struct ReadSide {
    /// Wrapped so bodies holding it are `Sync` (response futures hold bodies across awaits
    /// by reference); it is only ever used through `&mut`.
    pub reader: SyncWrapper<ReadHalf<BoxedIo>>,
    pub buf: BytesMut,
}

/// Reads more from `reader` into `buf`, reserving `want` bytes first; `Ok(0)` is the end
/// of stream. Shared by the server's and the upstream client's reads.
pub fn poll_fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<std::io::Result<usize>> {
    buf.reserve(want);
    tokio_util::io::poll_read_buf(Pin::new(reader), cx, buf)
}

/// State a connection shares with the bodies of its requests.
#[derive(Default)]
pub struct Shared {
    returned: Mutex<Option<(ReadSide, bool)>>,
    /// Signalled when a body gives the read side back.
    pub back: Notify,
    /// Signalled by a body's first read when the client waits for `100 Continue`.
    pub continue_wanted: Notify,
}

impl Shared {
    /// The read side, if a body gave it back, and whether that body was read to its end.
    pub fn take(&self) -> Option<(ReadSide, bool)> {
        self.returned.lock().ok().and_then(|mut slot| slot.take())
    }

    fn give_back(&self, side: ReadSide, complete: bool) {
        if let Ok(mut slot) = self.returned.lock() {
            *slot = Some((side, complete));
        }
        self.back.notify_one();
    }
}

/// Where a message body decoder is; shared by the server's request bodies and the
/// upstream client's response bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    /// Everything until the connection closes (responses only).
    UntilClose,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        match framing {
            Framing::None | Framing::Length(0) => Decoder::Done,
            Framing::Length(length) => Decoder::Length(length),
            Framing::Chunked => Decoder::ChunkSize,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match *self {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }

    /// The next frame, read from `reader` through `buf` as needed; `Ready(None)` at the end
    /// (for `UntilClose`, when the reader ends). A reader that ends early is `Incomplete`.
    pub fn poll_frame<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
        max_trailers: usize,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        loop {
            if let Some(frame) = self.decode(buf, max_trailers).transpose() {
                return Poll::Ready(Some(frame));
            }
            if self.is_done() {
                return Poll::Ready(None);
            }
            match std::task::ready!(poll_fill(reader, buf, cx, BODY_READ)) {
                Ok(0) if *self == Decoder::UntilClose => {
                    *self = Decoder::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(BodyReadError::Incomplete))),
                Ok(_) => {}
                Err(err) => return Poll::Ready(Some(Err(err.into()))),
            }
        }
    }

    /// Decodes the next frame from `buf`; `Ok(None)` when more must be read (or, once
    /// `is_done`, at the end). Data frames share `buf`'s memory.
    fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
    ) -> Result<Option<Frame<Bytes>>, BodyReadError> {
        loop {
            match *self {
                Decoder::Done => return Ok(None),
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(buf.split().freeze())));
                }
                Decoder::Length(left) | Decoder::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    *self = match *self {
                        Decoder::Length(_) if left == 0 => Decoder::Done,
                        Decoder::Length(_) => Decoder::Length(left),
                        _ if left == 0 => Decoder::ChunkDataEnd,
                        _ => Decoder::ChunkData(left),
                    };
                    return Ok(Some(Frame::data(data)));
                }
                Decoder::ChunkSize => {
                    let Some(end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Decoder::Trailers
                    } else {
                        Decoder::ChunkData(size)
                    };
                }
                Decoder::ChunkDataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyReadError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Decoder::ChunkSize;
                }
                Decoder::Trailers => {
                    if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                        buf.advance(2);
                        *self = Decoder::Done;
                        continue;
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() > max_trailers {
                            return Err(BodyReadError::Chunked("trailer section too large"));
                        }
                        return Ok(None);
                    };
                    let section = buf.split_to(end + 4);
                    *self = Decoder::Done;
                    if let Some(trailers) = parse_trailers(&section)? {
                        return Ok(Some(Frame::trailers(trailers)));
                    }
                }
            }
        }
    }
}

/// A request body being read from an HTTP/1 connection.
pub struct Body {
    side: Option<ReadSide>,
    decoder: Decoder,
    shared: Arc<Shared>,
    expect_continue: bool,
    max_trailers: usize,
}

impl Body {
    pub fn new(
        side: ReadSide,
        framing: Framing,
        shared: Arc<Shared>,
        expect_continue: bool,
        max_trailers: usize,
    ) -> Body {
        let mut body = Body {
            side: Some(side),
            decoder: Decoder::new(framing),
            shared,
            expect_continue,
            max_trailers,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(side) = self.side.take() {
            self.shared.give_back(side, self.decoder.is_done());
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = &mut *self;
        if std::mem::take(&mut this.expect_continue) {
            this.shared.continue_wanted.notify_one();
        }
        let Some(side) = this.side.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(this.decoder.poll_frame(
            side.reader.get_mut(),
            &mut side.buf,
            cx,
            this.max_trailers
        ));
        // Ended, failed, or its last frame: the read side goes back to the connection.
        if this.decoder.is_done() || !matches!(frame, Some(Ok(_))) {
            this.finish();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// The position of the first CRLF, if it is within `max` bytes.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, BodyReadError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end <= max => Ok(Some(end)),
        Some(_) => Err(BodyReadError::Chunked("chunk-size line too long")),
        None if buf.len() > max => Err(BodyReadError::Chunked("chunk-size line too long")),
        None => Ok(None),
    }
}

/// `1a;name=value` → 26. Hex digits, then optional whitespace and extensions (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, BodyReadError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyReadError::Chunked("missing chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(BodyReadError::Chunked("invalid chunk size"));
    }
    let mut size: u64 = 0;
    for &digit in &line[..digits] {
        let value = (digit as char).to_digit(16).unwrap_or(0);
        size = size
            .checked_mul(16)
            .and_then(|size| size.checked_add(u64::from(value)))
            .ok_or(BodyReadError::Chunked("chunk size overflows"))?;
    }
    Ok(size)
}

fn parse_trailers(section: &[u8]) -> Result<Option<HeaderMap>, BodyReadError> {
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let fields = match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        _ => return Err(BodyReadError::Chunked("malformed trailer section")),
    };
    let mut trailers = HeaderMap::new();
    for field in fields {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(field.name.as_bytes()),
            http::HeaderValue::from_bytes(field.value),
        ) else {
            return Err(BodyReadError::Chunked("malformed trailer field"));
        };
        trailers.append(name, value);
    }
    Ok((!trailers.is_empty()).then_some(trailers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"1A ;ext=1").unwrap(), 26);
        assert_eq!(chunk_size(b"0").unwrap(), 0);
        for bad in [&b""[..], b"-1", b"0x10", b"g", b"1 2", b"11111111111111111"] {
            assert!(chunk_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn long_chunk_lines_are_refused() {
        assert!(find_crlf(&[b'1'; MAX_CHUNK_LINE + 1], MAX_CHUNK_LINE).is_err());
        assert_eq!(find_crlf(b"12", MAX_CHUNK_LINE).unwrap(), None);
    }
}
