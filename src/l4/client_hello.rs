//! Peeking at the TLS ClientHello without consuming it (SPEC CONN-7): bounded in size and
//! in time, so a passthrough route can be chosen by SNI and the very same bytes replayed to
//! the backend.
//!
//! Why hand-written rather than rustls' `LazyConfigAcceptor`:
//!
//! * The acceptor *consumes* the bytes it reads into its own state. For TLS passthrough the
//!   backend must receive the ClientHello byte for byte, so we have to keep the raw bytes
//!   (`read_client_hello` appends everything it reads to the caller's buffer).
//! * We need an incremental parser that tells "need more bytes" apart from "this is not TLS
//!   at all" (e.g. plaintext HTTP on a TLS port) and from "this is TLS but malformed", and
//!   that stops at a hard size limit before buffering more than `max_bytes`.
//! * A handshake message may span several TLS records (large hellos with post-quantum key
//!   shares, or deliberately fragmented ones), so records are reassembled here, with a cap on
//!   the number of records.
//!
//! Only the fields routing needs are extracted: SNI `host_name` (lower-cased), ALPN protocol
//! names and the legacy version. Everything else is length-checked and skipped. Parsing never
//! panics and never indexes past a bound: every read goes through [`Reader`], which returns
//! `Malformed` instead.

use std::borrow::Cow;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A sensible cap for a ClientHello: real ones are 0.2–2 KiB; post-quantum key shares push
/// them towards 2 KiB; 16 KiB leaves ample headroom while bounding per-connection memory.
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Record content type for handshake messages.
const CONTENT_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// Record header: type (1), legacy version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake header: type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
/// RFC 8446 §5.1: a plaintext record fragment MUST NOT exceed 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// More records than this for a single ClientHello is not something a real client does;
/// the cap keeps re-parsing on each read cheap against one-byte-record floods.
const MAX_RECORDS: usize = 64;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// RFC 6066 §3: name type of a DNS host name.
const SNI_HOST_NAME: u8 = 0;
/// DNS limit on a full name (without the trailing dot).
const MAX_HOST_NAME: usize = 253;

/// What routing needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The SNI `host_name` entry, lower-cased; `None` without a server_name extension (or
    /// with one that carries no `host_name` entry).
    pub server_name: Option<String>,
    /// ALPN protocol names in the client's order of preference; empty without ALPN.
    pub alpn: Vec<Vec<u8>>,
    /// `legacy_version` of the ClientHello body (0x0303 for TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
}

/// The verdict on the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    /// A valid prefix of a ClientHello: read more.
    NeedMore,
    /// The first byte is not a TLS handshake record (0x16), e.g. plaintext HTTP.
    NotTls,
    /// A complete, well-formed ClientHello.
    Hello(ClientHelloInfo),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientHelloError {
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    #[error("no ClientHello before the deadline")]
    Timeout,
    #[error("connection closed before the ClientHello ended")]
    Closed,
    #[error(transparent)]
    Hello(#[from] ClientHelloError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

use ClientHelloError::{Malformed, TooLarge};

/// Inspects the bytes received so far (records from the start of the connection).
/// Reassembles the handshake message across up to 64 records; `Err(TooLarge)` as soon as
/// the records needed for the ClientHello would go past `max_bytes` (record headers
/// included), so a caller never has to buffer more than that.
///
/// Bytes after the ClientHello (in the same record or later) are ignored.
pub fn sniff(buf: &[u8], max_bytes: usize) -> Result<Sniff, ClientHelloError> {
    match buf.first() {
        None => return Ok(Sniff::NeedMore),
        Some(&CONTENT_HANDSHAKE) => {}
        Some(_) => return Ok(Sniff::NotTls),
    }
    match reassemble(buf, max_bytes)? {
        None => Ok(Sniff::NeedMore),
        Some(message) => parse_client_hello(&message).map(Sniff::Hello),
    }
}

/// Collects the ClientHello handshake message (header included) from the records at the
/// start of `buf`; `None` while incomplete. Borrows when the message sits in one record,
/// which is the common case, so repeated calls on a growing buffer do not allocate.
fn reassemble(buf: &[u8], max_bytes: usize) -> Result<Option<Cow<'_, [u8]>>, ClientHelloError> {
    let mut pos = 0usize;
    let mut records = 0usize;
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    loop {
        if records == MAX_RECORDS {
            return Err(Malformed("ClientHello fragmented into too many records"));
        }
        // Even an empty next record would not fit: no point waiting for it.
        if pos.saturating_add(RECORD_HEADER) > max_bytes {
            return Err(TooLarge(max_bytes));
        }
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            // Check what we have of the header so "\x16GET ..." is not left waiting.
            check_record_header_prefix(buf.get(pos..).unwrap_or_default())?;
            return Ok(None);
        };
        check_record_header_prefix(header)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let end = pos + RECORD_HEADER + len;
        if end > max_bytes {
            return Err(TooLarge(max_bytes));
        }
        if len == 0 {
            // RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
            return Err(Malformed("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(Malformed("record longer than 2^14 bytes"));
        }
        let Some(fragment) = buf.get(pos + RECORD_HEADER..end) else {
            return Ok(None);
        };
        records += 1;
        pos = end;
        if message.is_empty() {
            message = Cow::Borrowed(fragment);
        } else {
            message.to_mut().extend_from_slice(fragment);
        }

        let Some(hs) = message.get(..HANDSHAKE_HEADER) else {
            continue;
        };
        if hs[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(Malformed("first handshake message is not a ClientHello"));
        }
        let body_len = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
        let total = HANDSHAKE_HEADER + body_len;
        // Lower bound on the bytes this hello occupies on the wire: the headers of the
        // records seen so far plus the whole message. Fail early rather than buffer on.
        if (records * RECORD_HEADER).saturating_add(total) > max_bytes {
            return Err(TooLarge(max_bytes));
        }
        if message.len() >= total {
            return Ok(Some(match message {
                Cow::Borrowed(b) => Cow::Borrowed(b.get(..total).unwrap_or(b)),
                Cow::Owned(mut v) => {
                    v.truncate(total);
                    Cow::Owned(v)
                }
            }));
        }
    }
}

/// Validates whatever part of a record header is present: handshake content type and a
/// 3.x legacy record version (0x0300–0x0304 in practice; SSLv2-compatible hellos are not
/// supported, no client sends them any more).
fn check_record_header_prefix(header: &[u8]) -> Result<(), ClientHelloError> {
    if let Some(&t) = header.first() {
        if t != CONTENT_HANDSHAKE {
            return Err(Malformed(
                "non-handshake record before the ClientHello ended",
            ));
        }
    }
    if let Some(&major) = header.get(1) {
        if major != 3 {
            return Err(Malformed("record version is not 3.x"));
        }
    }
    Ok(())
}

/// Parses a complete ClientHello handshake message (4-byte header included).
fn parse_client_hello(message: &[u8]) -> Result<ClientHelloInfo, ClientHelloError> {
    let mut r = Reader::new(message.get(HANDSHAKE_HEADER..).unwrap_or_default());
    let legacy_version = r.u16("truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec_u8("truncated legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(Malformed("legacy_session_id longer than 32 bytes"));
    }
    let suites = r.vec_u16("truncated cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed("bad cipher_suites length"));
    }
    if r.vec_u8("truncated compression_methods")?.is_empty() {
        return Err(Malformed("empty compression_methods"));
    }

    let mut info = ClientHelloInfo {
        server_name: None,
        alpn: Vec::new(),
        legacy_version,
    };
    // RFC 5246 §7.4.1.2: a TLS 1.2 hello may end right after the compression methods.
    if r.is_empty() {
        return Ok(info);
    }
    let mut exts = Reader::new(r.vec_u16("extensions length runs past the message")?);
    if !r.is_empty() {
        return Err(Malformed("trailing bytes after the extensions"));
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension type")?;
        let data = exts.vec_u16("extension length runs past the extensions")?;
        match ext_type {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(Malformed("duplicate server_name extension"));
                }
                info.server_name = parse_sni(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(Malformed("duplicate ALPN extension"));
                }
                info.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

/// RFC 6066 §3 `ServerNameList`. Returns the `host_name` entry, validated and lower-cased.
fn parse_sni(data: &[u8]) -> Result<Option<String>, ClientHelloError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec_u16("truncated server_name list")?);
    if !outer.is_empty() {
        return Err(Malformed("trailing bytes in server_name extension"));
    }
    if list.is_empty() {
        return Err(Malformed("empty server_name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated server_name entry")?;
        // Every name type defined or reserved so far is a 16-bit-length opaque value.
        let name = list.vec_u16("server_name entry runs past the list")?;
        if name_type != SNI_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(Malformed("more than one host_name in server_name"));
        }
        host = Some(validate_host_name(name)?);
    }
    Ok(host)
}

/// A host name we are willing to route on: ASCII letters, digits, '-', '_' and dots between
/// non-empty labels, at most 253 bytes. No trailing dot (RFC 6066 forbids it) so that
/// "example.com." cannot be used to slip past a route for "example.com".
fn validate_host_name(name: &[u8]) -> Result<String, ClientHelloError> {
    if name.is_empty() || name.len() > MAX_HOST_NAME {
        return Err(Malformed("bad SNI host_name length"));
    }
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(Malformed("SNI host_name is not an ASCII DNS name"));
    }
    if name
        .split(|&b| b == b'.')
        .any(|label| label.is_empty() || label.len() > 63)
    {
        return Err(Malformed("SNI host_name has an empty or overlong label"));
    }
    // All bytes are ASCII, so this is a plain byte-to-char mapping.
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// RFC 7301 §3.1 `ProtocolNameList`.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, ClientHelloError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec_u16("truncated ALPN list")?);
    if !outer.is_empty() {
        return Err(Malformed("trailing bytes in ALPN extension"));
    }
    if list.is_empty() {
        return Err(Malformed("empty ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec_u8("ALPN protocol runs past the list")?;
        if name.is_empty() {
            return Err(Malformed("empty ALPN protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// A bounds-checked cursor: every accessor returns `Malformed(what)` instead of panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        if n > self.rest.len() {
            return Err(Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ClientHelloError> {
        let b = self.take(1, what)?;
        Ok(b.first().copied().unwrap_or_default())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ClientHelloError> {
        match *self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([a, b])),
            _ => Err(Malformed(what)),
        }
    }

    /// An opaque vector with a one-byte length prefix.
    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// An opaque vector with a two-byte length prefix.
    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// Reads into `buf` (appending) until [`sniff`] returns something other than `NeedMore`,
/// or the deadline passes: `Err(Timeout)`. Keeps every byte read in `buf`, including any
/// that follow the ClientHello, so the caller can replay them to a passthrough backend.
///
/// Memory stays bounded: `sniff` fails with `TooLarge` before the records it waits for
/// would exceed `max_bytes`, so `buf` grows to at most about `max_bytes` plus one read.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
    max_bytes: usize,
) -> Result<Sniff, SniffError> {
    loop {
        match sniff(buf, max_bytes)? {
            Sniff::NeedMore => {}
            done => return Ok(done),
        }
        // Typical hellos fit in one read of this size.
        buf.reserve(4096);
        let n = tokio::time::timeout_at(deadline, stream.read_buf(buf))
            .await
            .map_err(|_| SniffError::Timeout)??;
        if n == 0 {
            return Err(SniffError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// The first flight of a real rustls client: a ClientHello in one record.
    fn rustls_hello(server_name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .expect("valid server name");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write to a Vec");
        }
        out
    }

    fn example_hello() -> Vec<u8> {
        rustls_hello("Example.COM", &[b"h2", b"http/1.1"])
    }

    /// Re-frames a single-record hello's handshake message into records of the given sizes
    /// (the last one takes the remainder).
    fn reframe(hello: &[u8], sizes: &[usize]) -> Vec<u8> {
        assert_eq!(hello[0], 0x16);
        let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), 5 + len, "expected exactly one record");
        let mut message = &hello[5..];
        let mut out = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let take = if i + 1 == sizes.len() {
                message.len()
            } else {
                size
            };
            let (chunk, rest) = message.split_at(take);
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
            message = rest;
        }
        out
    }

    #[test]
    fn parses_rustls_hello_with_sni_and_alpn() {
        let hello = example_hello();
        let got = sniff(&hello, DEFAULT_MAX_CLIENT_HELLO).unwrap();
        assert_eq!(
            got,
            Sniff::Hello(ClientHelloInfo {
                server_name: Some("example.com".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                legacy_version: 0x0303,
            })
        );
    }

    #[test]
    fn ip_address_server_name_sends_no_sni() {
        let hello = rustls_hello("192.0.2.7", &[]);
        let got = sniff(&hello, DEFAULT_MAX_CLIENT_HELLO).unwrap();
        assert_eq!(
            got,
            Sniff::Hello(ClientHelloInfo {
                server_name: None,
                alpn: vec![],
                legacy_version: 0x0303,
            })
        );
    }

    #[test]
    fn every_prefix_needs_more() {
        for hello in [example_hello(), reframe(&example_hello(), &[3, 40, 0])] {
            for end in 0..hello.len() {
                assert_eq!(
                    sniff(&hello[..end], DEFAULT_MAX_CLIENT_HELLO),
                    Ok(Sniff::NeedMore),
                    "prefix of {end} bytes"
                );
            }
        }
    }

    #[test]
    fn reassembles_hello_split_across_records() {
        let hello = example_hello();
        let want = sniff(&hello, DEFAULT_MAX_CLIENT_HELLO).unwrap();
        // Splits inside the handshake header and inside the extensions.
        for sizes in [[2, 100, 0], [50, 1, 0], [1, 1, 0]] {
            let split = reframe(&hello, &sizes);
            assert_eq!(
                sniff(&split, DEFAULT_MAX_CLIENT_HELLO).unwrap(),
                want,
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn trailing_bytes_after_the_hello_are_ignored() {
        let mut hello = example_hello();
        let want = sniff(&hello, DEFAULT_MAX_CLIENT_HELLO).unwrap();
        hello.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0xff]);
        assert_eq!(sniff(&hello, DEFAULT_MAX_CLIENT_HELLO).unwrap(), want);
    }

    #[test]
    fn plaintext_http_is_not_tls() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n", 16384), Ok(Sniff::NotTls));
        assert_eq!(sniff(b"G", 16384), Ok(Sniff::NotTls));
    }

    #[test]
    fn oversized_records_are_rejected_early() {
        // Only the header has arrived; the declared length alone exceeds the cap.
        let header = [0x16, 0x03, 0x01, 0x40, 0x00];
        assert_eq!(sniff(&header, 1024), Err(TooLarge(1024)));
        // A hello needing more than the cap, even though every record is small.
        let hello = example_hello();
        assert_eq!(
            sniff(&hello, hello.len() - 1),
            Err(TooLarge(hello.len() - 1))
        );
        let split = reframe(&hello, &[10, 10, 0]);
        assert!(matches!(sniff(&split[..30], 100), Err(TooLarge(100))));
        // Exactly at the cap is fine.
        assert!(matches!(sniff(&hello, hello.len()), Ok(Sniff::Hello(_))));
    }

    #[test]
    fn extension_length_past_the_message_is_malformed() {
        let hello = example_hello();
        let mut r = Reader::new(&hello[9..]);
        r.take(2 + 32, "").unwrap();
        r.vec_u8("").unwrap();
        r.vec_u16("").unwrap();
        r.vec_u8("").unwrap();
        // r now sits at the extensions length; the first extension follows it.
        let first_ext = hello.len() - r.rest.len() + 2;
        let mut bad = hello.clone();
        bad[first_ext + 2] = 0xff;
        bad[first_ext + 3] = 0xff;
        assert!(matches!(
            sniff(&bad, DEFAULT_MAX_CLIENT_HELLO),
            Err(Malformed(_))
        ));
        // The same for the extensions block as a whole.
        let mut bad = hello.clone();
        bad[first_ext - 2] = 0xff;
        assert!(matches!(
            sniff(&bad, DEFAULT_MAX_CLIENT_HELLO),
            Err(Malformed(_))
        ));
    }

    /// Builds a minimal hello around the given extensions block.
    fn hello_with_extensions(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut msg = vec![0x01, 0, 0, 0];
        msg[1..4].copy_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        rec.extend_from_slice(&msg);
        rec
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        let mut ext = vec![0x00, 0x00];
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn sni_host_names_are_validated() {
        let ok = hello_with_extensions(&sni_ext(b"A-b_c.Example.org"));
        match sniff(&ok, 16384) {
            Ok(Sniff::Hello(info)) => {
                assert_eq!(info.server_name.as_deref(), Some("a-b_c.example.org"))
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"caf\xc3\xa9.example"[..],
            b"",
            b"example.com.",
            b".example.com",
            b"a..b",
            b"exa mple.com",
            b"exa\0mple.com",
        ] {
            let hello = hello_with_extensions(&sni_ext(bad));
            assert!(
                matches!(sniff(&hello, 16384), Err(Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Duplicate server_name extensions.
        let mut two = sni_ext(b"a.example");
        two.extend_from_slice(&sni_ext(b"b.example"));
        assert!(matches!(
            sniff(&hello_with_extensions(&two), 16384),
            Err(Malformed(_))
        ));
    }

    #[test]
    fn tls12_hello_without_extensions() {
        let mut hello = hello_with_extensions(&[]);
        // Drop the (empty) extensions length and fix up the lengths.
        hello.truncate(hello.len() - 2);
        let msg_len = hello.len() - 5;
        hello[3..5].copy_from_slice(&(msg_len as u16).to_be_bytes());
        hello[6..9].copy_from_slice(&((msg_len - 4) as u32).to_be_bytes()[1..]);
        assert_eq!(
            sniff(&hello, 16384),
            Ok(Sniff::Hello(ClientHelloInfo {
                server_name: None,
                alpn: vec![],
                legacy_version: 0x0303
            }))
        );
    }

    #[test]
    fn other_handshake_or_record_types_are_malformed() {
        let mut hello = example_hello();
        hello[5] = 0x02; // ServerHello
        assert!(matches!(sniff(&hello, 16384), Err(Malformed(_))));
        // A change_cipher_spec record between fragments.
        let split = reframe(&example_hello(), &[20, 0]);
        let mut bad = split[..25].to_vec();
        bad.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
        assert!(matches!(sniff(&bad, 16384), Err(Malformed(_))));
        // Not a 3.x record version: rejected after two bytes, not left waiting.
        assert!(matches!(sniff(b"\x16\x47", 16384), Err(Malformed(_))));
    }

    #[test]
    fn random_input_and_mutations_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x6761_7465);
        for i in 0..10_000 {
            let len = rng.usize(0..600);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Make most inputs look like a handshake record so the parser goes deep.
            if i % 4 != 0 && bytes.len() >= 6 {
                bytes[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
                bytes[5] = 0x01;
            }
            let _ = sniff(&bytes, rng.usize(0..20_000));
        }
        let hellos = [
            example_hello(),
            rustls_hello("192.0.2.7", &[]),
            reframe(&example_hello(), &[7, 60, 0]),
        ];
        for _ in 0..10_000 {
            let mut bytes = hellos[rng.usize(..hellos.len())].clone();
            for _ in 0..rng.usize(1..8) {
                let at = rng.usize(..bytes.len());
                match rng.u8(..4) {
                    0 => bytes[at] = rng.u8(..),
                    1 => bytes[at] ^= 1 << rng.u8(..8),
                    2 => bytes.truncate(at.max(1)),
                    _ => bytes.insert(at, rng.u8(..)),
                }
            }
            let _ = sniff(&bytes, DEFAULT_MAX_CLIENT_HELLO);
        }
    }

    #[tokio::test]
    async fn read_client_hello_keeps_all_bytes() {
        let hello = example_hello();
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            // Small writes so the reader sees the hello arrive piecemeal, plus early data.
            for chunk in sent.chunks(37) {
                client.write_all(chunk).await.unwrap();
            }
            client.write_all(b"tail").await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let got = read_client_hello(&mut server, &mut buf, deadline, DEFAULT_MAX_CLIENT_HELLO)
            .await
            .unwrap();
        assert!(
            matches!(got, Sniff::Hello(ref i) if i.server_name.as_deref() == Some("example.com"))
        );
        assert!(buf.starts_with(&hello));
        let _client = writer.await.unwrap();
    }

    #[tokio::test]
    async fn read_client_hello_times_out_on_half_a_hello() {
        let hello = example_hello();
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&hello[..hello.len() / 2]).await.unwrap();
        let mut buf = BytesMut::new();
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_millis(100);
        let got =
            read_client_hello(&mut server, &mut buf, deadline, DEFAULT_MAX_CLIENT_HELLO).await;
        assert!(matches!(got, Err(SniffError::Timeout)), "{got:?}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(&buf[..], &hello[..hello.len() / 2]);
        drop(client);
    }

    #[tokio::test]
    async fn read_client_hello_reports_close_and_plaintext() {
        let hello = example_hello();
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&hello[..10]).await.unwrap();
        drop(client);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let got = read_client_hello(&mut server, &mut BytesMut::new(), deadline, 16384).await;
        assert!(matches!(got, Err(SniffError::Closed)), "{got:?}");

        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = BytesMut::new();
        let got = read_client_hello(&mut server, &mut buf, deadline, 16384).await;
        assert!(matches!(got, Ok(Sniff::NotTls)), "{got:?}");
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }
}
