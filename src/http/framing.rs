//! Raw request-head inspection on HTTP/1 connections (SPEC HTTP-10).
//!
//! hyper resolves a request that carries both `Content-Length` and `Transfer-Encoding` the
//! way RFC 9112 §6.3 allows: it drops `Content-Length`, reads the body as chunked and closes
//! the connection afterwards. The service then sees a request that looks clean, so the
//! proxy cannot find the ambiguity in the parsed headers. The spec wants such requests
//! rejected, never forwarded, so this wrapper watches the bytes hyper reads, follows HTTP/1
//! message framing the same way hyper does, and records which request (by its 1-based
//! position on the connection) had both headers. The proxy asks per request.
//!
//! The scanner fails open: when it cannot follow the stream (an HTTP/2 preface, an upgrade
//! or CONNECT whose outcome it cannot see, a head it cannot parse or that exceeds the limit)
//! it stops and flags nothing more. hyper still parses, and rejects, everything itself.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the scanner learned about one connection's requests.
#[derive(Debug, Default)]
pub struct FramingReport {
    /// Position of the first request with both `Content-Length` and `Transfer-Encoding`;
    /// 0 when none. One is enough: hyper closes the connection after such a request, so
    /// no later request on it is ever served.
    first_ambiguous: AtomicU64,
}

impl FramingReport {
    /// Whether request number `ordinal` (1-based) on this connection had ambiguous framing.
    pub fn is_ambiguous(&self, ordinal: u64) -> bool {
        ordinal != 0 && self.first_ambiguous.load(Ordering::Acquire) == ordinal
    }

    fn flag(&self, ordinal: u64) {
        let _ =
            self.first_ambiguous
                .compare_exchange(0, ordinal, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Where the scanner is in the byte stream. Line and head bytes live in `Scanner::buf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    /// Bytes left in a `Content-Length` body.
    Fixed(u64),
    ChunkSize,
    /// Bytes left in the current chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkDataEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    Stopped,
}

/// Follows HTTP/1 request framing over the bytes read from a connection.
#[derive(Debug)]
struct Scanner {
    state: State,
    buf: Vec<u8>,
    /// Heads parsed so far; the next head gets `heads + 1`.
    heads: u64,
    max_head: usize,
    max_headers: usize,
    report: Arc<FramingReport>,
}

impl Scanner {
    fn new(max_head: usize, max_headers: usize, report: Arc<FramingReport>) -> Scanner {
        Scanner {
            state: State::Head,
            buf: Vec::new(),
            heads: 0,
            max_head,
            max_headers,
            report,
        }
    }

    fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            let used = match self.state {
                State::Stopped => return,
                // hyper (httparse) skips empty lines before a request line.
                State::Head if self.buf.is_empty() && matches!(input[0], b'\r' | b'\n') => 1,
                State::Head => self.head(input),
                State::Fixed(left) => {
                    let used = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - used as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Fixed(left)
                    };
                    used
                }
                State::ChunkData(left) => {
                    let used = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - used as u64;
                    self.state = if left == 0 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(left)
                    };
                    used
                }
                State::ChunkSize | State::ChunkDataEnd | State::Trailers => self.line(input),
            };
            input = &input[used..];
        }
    }

    /// Accumulates a request head; once complete, flags it and picks the body framing.
    fn head(&mut self, input: &[u8]) -> usize {
        let old = self.buf.len();
        if old == 0 {
            // The usual case: a whole head in one read, parsed where it lies (no copy).
            match parse_head(input, self.max_headers) {
                Parsed::Complete(length, _) if length > self.max_head => {
                    self.stop();
                    return input.len();
                }
                Parsed::Complete(length, framing) => return self.start_body(length, &framing),
                Parsed::Partial => {}
                Parsed::Invalid => {
                    self.stop();
                    return input.len();
                }
            }
        }
        let room = self.max_head.saturating_sub(old);
        if room == 0 {
            self.stop();
            return input.len();
        }
        let take = input.len().min(room);
        self.buf.extend_from_slice(&input[..take]);
        // Parse only when a blank line may have arrived, so a trickled head costs one parse.
        let from = old.saturating_sub(2);
        let tail = &self.buf[from..];
        if !contains(tail, b"\n\r\n") && !contains(tail, b"\n\n") {
            return take;
        }
        let (length, framing) = match parse_head(&self.buf, self.max_headers) {
            Parsed::Complete(length, framing) => (length, framing),
            Parsed::Partial => return take,
            Parsed::Invalid => {
                self.stop();
                return input.len();
            }
        };
        // Every blank line is seen as its last byte arrives, so a complete head always ends
        // inside this input; anything else means the scanner lost track.
        let Some(used) = length.checked_sub(old).filter(|&used| used > 0) else {
            self.stop();
            return input.len();
        };
        self.start_body(used, &framing)
    }

    /// Counts a complete head, flags it when ambiguous and follows its body's framing.
    /// Returns `used`, or all of `used` when the scanner stops following the stream.
    fn start_body(&mut self, used: usize, framing: &Framing) -> usize {
        self.heads += 1;
        if framing.content_length.is_some() && framing.transfer_encoding {
            self.report.flag(self.heads);
        }
        self.state = if framing.tunnel {
            State::Stopped
        } else if framing.transfer_encoding {
            if framing.chunked {
                State::ChunkSize
            } else {
                State::Stopped
            }
        } else {
            match framing.content_length {
                Some(Some(0)) | None => State::Head,
                Some(Some(length)) => State::Fixed(length),
                // hyper rejects differing or malformed lengths and closes the connection.
                Some(None) => State::Stopped,
            }
        };
        self.buf.clear();
        if self.state == State::Stopped {
            self.stop();
        }
        used
    }

    /// Accumulates one line of chunked framing and acts on it when it ends.
    fn line(&mut self, input: &[u8]) -> usize {
        let (used, complete) = match input.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (input.len(), false),
        };
        self.buf.extend_from_slice(&input[..used]);
        if self.buf.len() > self.max_head {
            self.stop();
            return input.len();
        }
        if !complete {
            return used;
        }
        let next = match self.state {
            State::ChunkSize => match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((_, 0))) => State::Trailers,
                Ok(httparse::Status::Complete((_, size))) => State::ChunkData(size),
                Ok(httparse::Status::Partial) | Err(_) => State::Stopped,
            },
            State::ChunkDataEnd if self.buf == b"\r\n" => State::ChunkSize,
            State::Trailers if self.buf == b"\r\n" || self.buf == b"\n" => State::Head,
            State::Trailers => State::Trailers,
            _ => State::Stopped,
        };
        self.buf.clear();
        self.state = next;
        if next == State::Stopped {
            self.stop();
            return input.len();
        }
        used
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.buf = Vec::new();
    }
}

enum Parsed {
    /// The head's length in bytes and its framing.
    Complete(usize, Framing),
    Partial,
    Invalid,
}

/// Header slots on the stack; a listener allowing more headers gets a heap vector.
const STACK_HEADERS: usize = 128;

fn parse_head(bytes: &[u8], max_headers: usize) -> Parsed {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut request = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        bytes,
        slots,
    ) {
        Ok(httparse::Status::Complete(length)) => Parsed::Complete(length, Framing::of(&request)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The framing-relevant facts of one request head, decided as hyper decides them.
struct Framing {
    /// `None`: no `Content-Length`; `Some(None)`: present but invalid or conflicting.
    content_length: Option<Option<u64>>,
    transfer_encoding: bool,
    /// Whether the last `Transfer-Encoding` field ends in `chunked`.
    chunked: bool,
    /// An upgrade or CONNECT: what follows may not be HTTP/1 at all.
    tunnel: bool,
}

impl Framing {
    fn of(request: &httparse::Request<'_, '_>) -> Framing {
        let mut framing = Framing {
            content_length: None,
            transfer_encoding: false,
            chunked: false,
            tunnel: request.method == Some("CONNECT"),
        };
        for header in request.headers.iter() {
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                framing.transfer_encoding = true;
                framing.chunked = header
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if header.name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(header.value)
                    .ok()
                    .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|text| text.parse::<u64>().ok());
                framing.content_length = Some(match framing.content_length {
                    None => value,
                    Some(previous) if previous == value => value,
                    Some(_) => None,
                });
            } else if header.name.eq_ignore_ascii_case("upgrade") {
                framing.tunnel = true;
            }
        }
        framing
    }
}

/// A connection's byte stream with the HTTP/1 framing scanner on its read side.
pub struct Inspected<S> {
    inner: S,
    /// Dropped once it stops following the stream, so its buffer goes too.
    scanner: Option<Scanner>,
}

/// Wraps `stream` and returns the report its scanner fills.
pub fn inspect<S>(
    stream: S,
    max_head: usize,
    max_headers: usize,
) -> (Inspected<S>, Arc<FramingReport>) {
    let report = Arc::new(FramingReport::default());
    let scanner = Scanner::new(max_head, max_headers, report.clone());
    (
        Inspected {
            inner: stream,
            scanner: Some(scanner),
        },
        report,
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Inspected<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(scanner)) = (&result, this.scanner.as_mut()) {
            scanner.feed(&buf.filled()[before..]);
            if scanner.state == State::Stopped {
                this.scanner = None;
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inspected<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> (Scanner, Arc<FramingReport>) {
        let report = Arc::new(FramingReport::default());
        let mut scanner = Scanner::new(8192, 100, report.clone());
        for chunk in chunks {
            scanner.feed(chunk);
        }
        (scanner, report)
    }

    const AMBIGUOUS: &[u8] =
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n";

    #[test]
    fn both_length_headers_are_flagged_in_either_order() {
        let (_, report) = scan(&[AMBIGUOUS]);
        assert!(report.is_ambiguous(1));
        let (_, report) = scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ]);
        assert!(report.is_ambiguous(1));
        assert!(!report.is_ambiguous(2));
    }

    #[test]
    fn bodies_are_skipped_so_pipelined_requests_are_numbered_right() {
        // The first body looks like an ambiguous head but is only data.
        let body = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "\r\nPOST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
              GET /c HTTP/1.1\r\n\r\n",
        );
        stream.extend_from_slice(AMBIGUOUS);
        let (scanner, report) = scan(&[&stream]);
        assert_eq!(scanner.heads, 4);
        assert!(report.is_ambiguous(4));
        assert!(!report.is_ambiguous(1));

        // Byte by byte, the result is the same.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (scanner, report) = scan(&bytes);
        assert_eq!(scanner.heads, 4);
        assert_eq!(scanner.state, State::Head);
        assert!(report.is_ambiguous(4));
    }

    #[test]
    fn scanner_stops_where_the_stream_may_not_be_http1() {
        let (scanner, _) = scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert_eq!(scanner.state, State::Stopped);
        let (scanner, _) =
            scan(&[b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"]);
        assert_eq!(scanner.state, State::Stopped);
        let (scanner, _) = scan(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]);
        assert_eq!(scanner.state, State::Stopped);
        let (scanner, _) = scan(&[&[b'a'; 9000]]);
        assert_eq!(scanner.state, State::Stopped);
    }
}
