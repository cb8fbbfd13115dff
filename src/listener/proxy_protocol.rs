//! PROXY protocol v1 (text) and v2 (binary), both directions: the bounded, deadline-guarded
//! receive at the front of the connection pipeline and the encoders used when sending the
//! header upstream. Everything here treats the peer's bytes as hostile: every header is capped
//! (107 bytes for v1, `max_v2_len` for the v2 length field), reads stop at a deadline, and any
//! malformed, truncated, oversized or late header becomes a [`ProxyProtocolError`] whose
//! [`reason`](ProxyProtocolError::reason) the listener counts before closing the connection.
//!
//! Which parts use the `ppp` crate and why:
//! - v2 receive: `ppp::v2::Header` parses addresses and iterates TLVs with bounds checks. We
//!   check the signature, version, command and the length cap ourselves first, because `ppp`
//!   only looks at them once 16 bytes are present and would otherwise wait for (and make us
//!   buffer) whatever length the peer announces.
//! - v1 receive is hand-written: `ppp::v1` cannot tell an incomplete line from a malformed one
//!   (a partial `PROXY TCP4 1.2.3.4` reports a missing address), accepts `+`-signed ports
//!   (through `u16::from_str`), and rejects `UNKNOWN` lines with trailing fields, which the
//!   specification says a receiver must ignore.
//! - v1 send uses `ppp::v1::Addresses`' `Display`, which is exactly the wire format.
//! - v2 send is hand-written: `ppp::v2::Builder` is fallible (`io::Result`) while our encoder
//!   is infallible by contract; writing the fixed layout directly lets us drop TLVs that cannot
//!   fit the 16-bit length up front instead of carrying an impossible error path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Hard cap on the v2 length field (bytes after the fixed 16-byte preamble). The field itself
/// allows 65,535; real senders put addresses (at most 216 bytes for UNIX) plus a few small
/// TLVs (ALPN, authority, SSL with a CN, a unique ID of at most 128 bytes), so 4 KiB is
/// generous while keeping the per-connection buffer small.
pub const DEFAULT_MAX_V2_LEN: usize = 4096;

/// The v1 line, CRLF included, may not exceed 107 bytes (specification section 2.1).
const V1_MAX_LEN: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
/// The 12-byte v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, 16-bit length.
const V2_FIXED_LEN: usize = 16;
/// One socket read; the buffer never grows past the largest possible header plus this.
const READ_CHUNK: usize = 4096;

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;

/// A received PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// None for v1 UNKNOWN and v2 LOCAL (and v2 UNSPEC/UNIX families): the caller keeps the socket peer address.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// All top-level v2 TLVs in order, raw (empty for v1).
    pub tlvs: Vec<(u8, Bytes)>,
    /// PP2_TYPE_ALPN (0x01).
    pub alpn: Option<Bytes>,
    /// PP2_TYPE_AUTHORITY (0x02), the SNI the sender saw.
    pub authority: Option<String>,
    /// PP2_TYPE_SSL (0x20) with its sub-TLVs.
    pub ssl: Option<SslInfo>,
}

/// The PP2_TYPE_SSL TLV: the sender's TLS session facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslInfo {
    /// PP2_CLIENT_SSL (0x01), PP2_CLIENT_CERT_CONN (0x02), PP2_CLIENT_CERT_SESS (0x04).
    pub client_flags: u8,
    /// 0 when the client presented a certificate that verified.
    pub verify: u32,
    /// PP2_SUBTYPE_SSL_VERSION (0x21), e.g. "TLSv1.3".
    pub version: Option<String>,
    /// PP2_SUBTYPE_SSL_CN (0x22), the client certificate's Common Name.
    pub common_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("no PROXY header before the deadline")]
    Timeout,
    #[error("connection closed inside the PROXY header")]
    Truncated,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header longer than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ProxyProtocolError {
    /// A fixed label for counters: "timeout", "truncated", "malformed", "too_large" or "io".
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyProtocolError::Timeout => "timeout",
            ProxyProtocolError::Truncated => "truncated",
            ProxyProtocolError::Malformed(_) => "malformed",
            ProxyProtocolError::TooLarge(_) => "too_large",
            ProxyProtocolError::Io(_) => "io",
        }
    }
}

type ParseResult = Result<Option<(ProxyHeader, usize)>, ProxyProtocolError>;

/// Parses a header at the start of `buf`. Ok(None): not enough bytes yet (but what is there is a valid prefix).
/// Ok(Some((header, consumed))). Err when the bytes can't be a header (including: does not start with either signature,
/// v1 line longer than 107 bytes without CRLF, v2 length above `max_v2_len`, TLV running past the header, truncated TLV).
pub fn parse(buf: &[u8], max_v2_len: usize) -> ParseResult {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf, max_v2_len),
        Some(_) => Err(ProxyProtocolError::Malformed("no PROXY signature")),
    }
}

/// True when `have` is a prefix of `want` or `want` is a prefix of `have`.
fn prefix_matches(have: &[u8], want: &[u8]) -> bool {
    let n = have.len().min(want.len());
    have.get(..n) == want.get(..n)
}

fn parse_v1(buf: &[u8]) -> ParseResult {
    if !prefix_matches(buf, V1_PREFIX) {
        return Err(ProxyProtocolError::Malformed("no PROXY signature"));
    }
    let window = buf.get(..buf.len().min(V1_MAX_LEN)).unwrap_or(buf);
    // Validate byte by byte so garbage fails as soon as it arrives rather than after 107 bytes.
    let mut end = None;
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\n' => {
                if i == 0 || window.get(i - 1) != Some(&b'\r') {
                    return Err(ProxyProtocolError::Malformed("v1 line ends without CRLF"));
                }
                end = Some(i + 1);
                break;
            }
            b'\r' => {
                if window.get(i + 1).is_some_and(|&next| next != b'\n') {
                    return Err(ProxyProtocolError::Malformed("v1 CR not followed by LF"));
                }
            }
            0x20..=0x7e => {}
            _ => return Err(ProxyProtocolError::Malformed("v1 non-printable byte")),
        }
    }
    let Some(end) = end else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyProtocolError::TooLarge(V1_MAX_LEN))
        } else {
            Ok(None)
        };
    };
    // `end >= 2` (an LF preceded by CR), and everything before the CR is printable ASCII.
    let line = window
        .get(..end - 2)
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(ProxyProtocolError::Malformed("v1 line"))?;
    let (source, destination) = parse_v1_line(line)?;
    Ok(Some((
        ProxyHeader {
            version: 1,
            source,
            destination,
            tlvs: Vec::new(),
            alpn: None,
            authority: None,
            ssl: None,
        },
        end,
    )))
}

type Addrs = (Option<SocketAddr>, Option<SocketAddr>);

/// Parses the line without its CRLF: `PROXY TCP4 src dst sport dport`, `PROXY TCP6 ...` or
/// `PROXY UNKNOWN[ anything]`. Fields are separated by exactly one space (specification).
fn parse_v1_line(line: &str) -> Result<Addrs, ProxyProtocolError> {
    let rest = line
        .strip_prefix("PROXY ")
        .ok_or(ProxyProtocolError::Malformed("no PROXY signature"))?;
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        // The receiver must ignore whatever follows UNKNOWN.
        return Ok((None, None));
    }
    let mut fields = rest.split(' ');
    let family = fields.next().unwrap_or_default();
    let mut next = |what: &'static str| fields.next().ok_or(ProxyProtocolError::Malformed(what));
    let (src, dst, sport, dport) = (
        next("v1 missing source address")?,
        next("v1 missing destination address")?,
        next("v1 missing source port")?,
        next("v1 missing destination port")?,
    );
    if fields.next().is_some() {
        return Err(ProxyProtocolError::Malformed("v1 trailing fields"));
    }
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            IpAddr::V4(parse_ip::<Ipv4Addr>(src)?),
            IpAddr::V4(parse_ip::<Ipv4Addr>(dst)?),
        ),
        "TCP6" => (
            IpAddr::V6(parse_ip::<Ipv6Addr>(src)?),
            IpAddr::V6(parse_ip::<Ipv6Addr>(dst)?),
        ),
        _ => return Err(ProxyProtocolError::Malformed("v1 unknown protocol")),
    };
    Ok((
        Some(SocketAddr::new(src, parse_port(sport)?)),
        Some(SocketAddr::new(dst, parse_port(dport)?)),
    ))
}

fn parse_ip<T: std::str::FromStr>(s: &str) -> Result<T, ProxyProtocolError> {
    s.parse()
        .map_err(|_| ProxyProtocolError::Malformed("v1 bad address"))
}

/// Decimal 0..=65535 without sign or leading zeros (`u16::from_str` alone would accept "+80").
fn parse_port(s: &str) -> Result<u16, ProxyProtocolError> {
    let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = s.len() > 1 && s.starts_with('0');
    if !digits_only || leading_zero {
        return Err(ProxyProtocolError::Malformed("v1 bad port"));
    }
    s.parse()
        .map_err(|_| ProxyProtocolError::Malformed("v1 bad port"))
}

fn parse_v2(buf: &[u8], max_v2_len: usize) -> ParseResult {
    use ppp::v2;

    if !prefix_matches(buf, V2_SIGNATURE) {
        return Err(ProxyProtocolError::Malformed("no PROXY signature"));
    }
    // Fail fast on the fixed fields as soon as each byte arrives.
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(ProxyProtocolError::Malformed("v2 version is not 2"));
        }
        if ver_cmd & 0x0f > 1 {
            return Err(ProxyProtocolError::Malformed("v2 unknown command"));
        }
    }
    if let Some(&fam_proto) = buf.get(13) {
        if fam_proto >> 4 > 3 || fam_proto & 0x0f > 2 {
            return Err(ProxyProtocolError::Malformed(
                "v2 unknown address family or protocol",
            ));
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > max_v2_len {
        return Err(ProxyProtocolError::TooLarge(max_v2_len));
    }
    let total = V2_FIXED_LEN + len;
    let Some(bytes) = buf.get(..total) else {
        return Ok(None);
    };
    let header = v2::Header::try_from(bytes).map_err(|e| match e {
        v2::ParseError::InvalidAddresses(..) => {
            ProxyProtocolError::Malformed("v2 length too short for the addresses")
        }
        _ => ProxyProtocolError::Malformed("v2 header"),
    })?;

    // Like HAProxy: only PROXY over TCP (STREAM) on IPv4/IPv6 replaces the socket addresses;
    // LOCAL, UNSPEC, UNIX and DGRAM keep the connection's own (the addresses are ignored).
    let (source, destination) = match (header.command, header.protocol, header.addresses) {
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        _ => (None, None),
    };

    let mut out = ProxyHeader {
        version: 2,
        source,
        destination,
        tlvs: Vec::new(),
        alpn: None,
        authority: None,
        ssl: None,
    };
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|e| match e {
            v2::ParseError::Leftovers(_) => ProxyProtocolError::Malformed("v2 truncated TLV"),
            _ => ProxyProtocolError::Malformed("v2 TLV runs past the header"),
        })?;
        let value = Bytes::copy_from_slice(&tlv.value);
        // A duplicate of a TLV we interpret is rejected rather than picking one: another
        // component picking the other one would be a confusion attack.
        let duplicate = match tlv.kind {
            PP2_TYPE_ALPN => out.alpn.replace(value.clone()).is_some(),
            PP2_TYPE_AUTHORITY => {
                let authority = utf8(&value, "v2 authority is not UTF-8")?;
                out.authority.replace(authority).is_some()
            }
            PP2_TYPE_SSL => out.ssl.replace(parse_ssl(&value)?).is_some(),
            _ => false,
        };
        if duplicate {
            return Err(ProxyProtocolError::Malformed(
                "v2 duplicate ALPN, authority or SSL TLV",
            ));
        }
        out.tlvs.push((tlv.kind, value));
    }
    Ok(Some((out, total)))
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, ProxyProtocolError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ProxyProtocolError::Malformed(what))
}

/// PP2_TYPE_SSL value: client flags (1 byte), verify (4 bytes, big-endian), then sub-TLVs.
fn parse_ssl(value: &[u8]) -> Result<SslInfo, ProxyProtocolError> {
    let too_short = || ProxyProtocolError::Malformed("v2 SSL TLV too short");
    let (&client_flags, rest) = value.split_first().ok_or_else(too_short)?;
    let (verify, subs) = rest.split_first_chunk::<4>().ok_or_else(too_short)?;
    let mut info = SslInfo {
        client_flags,
        verify: u32::from_be_bytes(*verify),
        version: None,
        common_name: None,
    };
    for sub in ppp::v2::TypeLengthValues::from(subs) {
        let sub = sub.map_err(|_| ProxyProtocolError::Malformed("v2 SSL sub-TLV truncated"))?;
        match sub.kind {
            PP2_SUBTYPE_SSL_VERSION => {
                info.version = Some(utf8(&sub.value, "v2 SSL version is not UTF-8")?);
            }
            PP2_SUBTYPE_SSL_CN => {
                info.common_name = Some(utf8(&sub.value, "v2 SSL CN is not UTF-8")?);
            }
            // Cipher, signature and key algorithms: kept raw in `tlvs` only.
            _ => {}
        }
    }
    Ok(info)
}

/// Reads from `stream` into `buf` (appending; `buf` may already hold bytes) until a whole header is parsed or
/// `deadline` passes; then removes the header bytes from the front of `buf` (bytes after the header stay in `buf`
/// for the next stage — e.g. a TLS ClientHello). Reads in chunks, never more than needed to bound memory (cap the
/// buffer at max header size + one read chunk of 4 KiB).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
    max_v2_len: usize,
) -> Result<ProxyHeader, ProxyProtocolError> {
    match tokio::time::timeout_at(deadline, read_until_header(stream, buf, max_v2_len)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ProxyProtocolError::Timeout),
    }
}

async fn read_until_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_v2_len: usize,
) -> Result<ProxyHeader, ProxyProtocolError> {
    // `parse` returns Ok(None) only while the buffer is shorter than the largest header it
    // would accept, so this cap is never the reason a valid header fails.
    let max_header = V1_MAX_LEN.max(V2_FIXED_LEN.saturating_add(max_v2_len.min(0xffff)));
    let cap = max_header + READ_CHUNK;
    loop {
        if let Some((header, consumed)) = parse(buf, max_v2_len)? {
            buf.advance(consumed);
            return Ok(header);
        }
        let room = cap.saturating_sub(buf.len()).min(READ_CHUNK);
        if room == 0 {
            // Unreachable given the invariant above; kept so a future change cannot turn
            // this loop into unbounded buffering.
            return Err(ProxyProtocolError::TooLarge(max_header));
        }
        buf.reserve(room);
        let n = (&mut *stream).take(room as u64).read_buf(buf).await?;
        if n == 0 {
            return Err(ProxyProtocolError::Truncated);
        }
    }
}

/// Encodes a v2 PROXY header, TCP over IPv4 or IPv6 (mixed families: the IPv4 side is written
/// as a v4-mapped IPv6 address). TLVs are written in order; a TLV that would push the length
/// past the 16-bit field is dropped (callers send small ALPN/authority values, so this is only
/// a guard against an impossible-to-encode input, not a path that happens).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut addrs = Vec::with_capacity(36);
    let fam_proto = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
            0x11
        }
        _ => {
            addrs.extend_from_slice(&v6(source.ip()).octets());
            addrs.extend_from_slice(&v6(destination.ip()).octets());
            0x21
        }
    };
    addrs.extend_from_slice(&source.port().to_be_bytes());
    addrs.extend_from_slice(&destination.port().to_be_bytes());

    let mut out = v2_preamble(0x21, fam_proto);
    out.extend_from_slice(&addrs);
    let mut len = addrs.len();
    for (kind, value) in tlvs {
        let Ok(value_len) = u16::try_from(value.len()) else {
            continue;
        };
        if len + 3 + value.len() > usize::from(u16::MAX) {
            continue;
        }
        out.push(*kind);
        out.extend_from_slice(&value_len.to_be_bytes());
        out.extend_from_slice(value);
        len += 3 + value.len();
    }
    set_v2_len(&mut out, len);
    out
}

/// Encodes a v2 LOCAL header (health checks and other connections made on the sender's own
/// behalf): no addresses, no TLVs.
pub fn encode_v2_local() -> Vec<u8> {
    v2_preamble(0x20, 0x00)
}

/// The header a pool or relay is configured to send before any other byte.
pub fn encode(
    version: crate::config::ProxyProtocolVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    match version {
        crate::config::ProxyProtocolVersion::V1 => encode_v1(source, destination),
        crate::config::ProxyProtocolVersion::V2 => encode_v2(source, destination, &[]),
    }
}

/// Encodes a v1 line: `PROXY TCP4 ...\r\n` or `PROXY TCP6 ...\r\n`; mixed families cannot be
/// expressed in v1 and give `PROXY UNKNOWN\r\n`.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    ppp::v1::Addresses::from((source, destination))
        .to_string()
        .into_bytes()
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Signature, version/command, family/protocol and a zero length to be filled in.
fn v2_preamble(ver_cmd: u8, fam_proto: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 64);
    out.extend_from_slice(V2_SIGNATURE);
    out.extend_from_slice(&[ver_cmd, fam_proto, 0, 0]);
    out
}

fn set_v2_len(out: &mut [u8], len: usize) {
    let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
    if let Some(field) = out.get_mut(14..16) {
        field.copy_from_slice(&len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const SIG: [u8; 12] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    ];
    const MAX: usize = DEFAULT_MAX_V2_LEN;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf, MAX) {
            Ok(Some(found)) => found,
            other => panic!("expected a header, got {other:?}"),
        }
    }

    fn malformed(buf: &[u8]) {
        match parse(buf, MAX) {
            Err(ProxyProtocolError::Malformed(_)) => {}
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn v2(bytes_after_sig: &[u8]) -> Vec<u8> {
        let mut v = SIG.to_vec();
        v.extend_from_slice(bytes_after_sig);
        v
    }

    /// v2 PROXY TCP4 127.0.0.1:56324 -> 192.168.1.1:443, then `tlvs` raw.
    fn v2_tcp4_with(tlvs: &[u8]) -> Vec<u8> {
        let len = u16::try_from(12 + tlvs.len()).unwrap().to_be_bytes();
        let mut v = v2(&[0x21, 0x11, len[0], len[1]]);
        v.extend_from_slice(&[
            127, 0, 0, 1, // source
            192, 168, 1, 1, // destination
            0xdc, 0x04, // 56324
            0x01, 0xbb, // 443
        ]);
        v.extend_from_slice(tlvs);
        v
    }

    #[test]
    fn v1_tcp4() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /";
        let (h, n) = complete(line);
        assert_eq!(n, 47);
        assert_eq!(h.version, 1);
        assert_eq!(h.source, Some(sa("192.168.0.1:56324")));
        assert_eq!(h.destination, Some(sa("192.168.0.11:443")));
        assert!(h.tlvs.is_empty() && h.alpn.is_none() && h.ssl.is_none());
    }

    #[test]
    fn v1_tcp6() {
        let line = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 65535 0\r\n";
        let (h, n) = complete(line);
        assert_eq!(n, line.len());
        assert_eq!(h.source, Some(sa("[2001:db8::1]:65535")));
        assert_eq!(h.destination, Some(sa("[::ffff:10.0.0.1]:0")));
    }

    #[test]
    fn v1_unknown_with_and_without_addresses() {
        let (h, n) = complete(b"PROXY UNKNOWN\r\nrest");
        assert_eq!((h.version, h.source, h.destination, n), (1, None, None, 15));
        let line = b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n";
        let (h, n) = complete(line);
        assert_eq!((h.source, h.destination, n), (None, None, line.len()));
    }

    #[test]
    fn v1_worst_case_107_bytes_is_accepted() {
        let line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), 104);
        assert_eq!(complete(line).1, 104);
        // UNKNOWN padded to exactly 107 bytes including CRLF.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(105, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(complete(&long).1, 107);
    }

    #[test]
    fn v1_too_long_without_crlf() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(108, b'x');
        assert!(matches!(
            parse(&long, MAX),
            Err(ProxyProtocolError::TooLarge(107))
        ));
        // CR at byte 107 (LF would be the 108th byte) is too long as well.
        long.truncate(106);
        long.push(b'\r');
        assert!(matches!(
            parse(&long, MAX),
            Err(ProxyProtocolError::TooLarge(107))
        ));
        long.push(b'\n');
        assert!(matches!(
            parse(&long, MAX),
            Err(ProxyProtocolError::TooLarge(107))
        ));
    }

    #[test]
    fn v1_bad_fields() {
        for line in [
            &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 65536\r\n"[..],
            b"PROXY TCP4 192.168.0.1 192.168.0.11 +80 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 080 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11  443\r\n",
            b"PROXY TCP4 192.168.0.256 192.168.0.11 1 443\r\n",
            b"PROXY TCP4 ::1 192.168.0.11 1 443\r\n",
            b"PROXY TCP6 192.168.0.1 ::1 1 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2 3\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2 \r\n",
            b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY tcp4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2\rX",
            b"PROXY TCP4 192.168.0.1\t192.168.0.11 1 2\r\n",
            b"PROXY TCP4 \xc3\xa9 192.168.0.11 1 2\r\n",
            b"PROXYTCP4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"proxy TCP4",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
        ] {
            malformed(line);
        }
    }

    #[test]
    fn v1_partial_is_none() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        for n in 0..line.len() {
            assert!(matches!(parse(&line[..n], MAX), Ok(None)), "{n}");
        }
    }

    #[test]
    fn v2_proxy_ipv4() {
        let mut wire = v2_tcp4_with(&[]);
        assert_eq!(
            wire,
            [
                0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
                0x00, 0x0c, 0x7f, 0x00, 0x00, 0x01, 0xc0, 0xa8, 0x01, 0x01, 0xdc, 0x04, 0x01, 0xbb,
            ]
        );
        wire.extend_from_slice(b"\x16\x03\x01");
        let (h, n) = complete(&wire);
        assert_eq!(n, 28);
        assert_eq!(h.version, 2);
        assert_eq!(h.source, Some(sa("127.0.0.1:56324")));
        assert_eq!(h.destination, Some(sa("192.168.1.1:443")));
        assert!(h.tlvs.is_empty());
    }

    #[test]
    fn v2_proxy_ipv6() {
        let mut wire = v2(&[0x21, 0x21, 0x00, 0x24]);
        wire.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2, // ::ffff:10.0.0.2
            0x30, 0x39, // 12345
            0x00, 0x50, // 80
        ]);
        let (h, n) = complete(&wire);
        assert_eq!(n, 52);
        assert_eq!(h.source, Some(sa("[2001:db8::1]:12345")));
        assert_eq!(h.destination, Some(sa("[::ffff:10.0.0.2]:80")));
    }

    #[test]
    fn v2_local_and_non_tcp_keep_socket_addresses() {
        let local = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00,
            0x00, 0x00,
        ];
        let (h, n) = complete(&local);
        assert_eq!((h.version, h.source, h.destination, n), (2, None, None, 16));
        // LOCAL carrying IPv4 addresses: they are ignored.
        let mut wire = v2_tcp4_with(&[]);
        wire[12] = 0x20;
        assert_eq!(complete(&wire).0.source, None);
        // PROXY over UDP and PROXY UNSPEC: ignored too.
        wire[12] = 0x21;
        wire[13] = 0x12;
        assert_eq!(complete(&wire).0.source, None);
        assert_eq!(complete(&v2(&[0x21, 0x00, 0x00, 0x00])).0.source, None);
        // UNIX family needs 216 bytes of addresses.
        let mut unix = v2(&[0x21, 0x31, 0x00, 0xd8]);
        unix.extend_from_slice(&[0u8; 216]);
        assert_eq!(complete(&unix).1, 232);
        malformed(&v2(&[
            0x21, 0x31, 0x00, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]));
    }

    #[test]
    fn v2_tlvs() {
        let tlvs = [
            0x01, 0x00, 0x02, b'h', b'2', // ALPN "h2"
            0x02, 0x00, 0x0b, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o',
            b'm', // AUTHORITY "example.com"
            0x20, 0x00, 0x15, // SSL, 21 bytes:
            0x07, // client flags: SSL | CERT_CONN | CERT_SESS
            0x00, 0x00, 0x00, 0x00, // verify ok
            0x21, 0x00, 0x07, b'T', b'L', b'S', b'v', b'1', b'.', b'3', // version
            0x22, 0x00, 0x03, b'b', b'o', b'b', // CN
            0x04, 0x00, 0x01, 0x2a, // NOOP
            0xe0, 0x00, 0x00, // unknown (custom range), empty
        ];
        let wire = v2_tcp4_with(&tlvs);
        let (h, n) = complete(&wire);
        assert_eq!(n, wire.len());
        assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(h.authority.as_deref(), Some("example.com"));
        assert_eq!(
            h.ssl,
            Some(SslInfo {
                client_flags: 7,
                verify: 0,
                version: Some("TLSv1.3".into()),
                common_name: Some("bob".into()),
            })
        );
        let kinds: Vec<u8> = h.tlvs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x01, 0x02, 0x20, 0x04, 0xe0]);
        assert_eq!(h.tlvs[2].1.len(), 21);
        assert_eq!(&h.tlvs[3].1[..], &[0x2a]);
        assert!(h.tlvs[4].1.is_empty());
    }

    #[test]
    fn v2_bad_tlvs() {
        // Length runs past the header.
        malformed(&v2_tcp4_with(&[0x01, 0x00, 0x05, b'h', b'2']));
        // Fewer than 3 bytes left for a TLV.
        malformed(&v2_tcp4_with(&[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00]));
        malformed(&v2_tcp4_with(&[0x04]));
        // Authority not UTF-8.
        malformed(&v2_tcp4_with(&[0x02, 0x00, 0x02, 0xc3, 0x28]));
        // SSL shorter than flags + verify, and with a truncated sub-TLV.
        malformed(&v2_tcp4_with(&[0x20, 0x00, 0x04, 1, 0, 0, 0]));
        malformed(&v2_tcp4_with(&[
            0x20, 0x00, 0x07, 1, 0, 0, 0, 0, 0x22, 0x00,
        ]));
        malformed(&v2_tcp4_with(&[
            0x20, 0x00, 0x09, 1, 0, 0, 0, 0, 0x22, 0x00, 0x05, b'x',
        ]));
        // Duplicate ALPN.
        malformed(&v2_tcp4_with(&[0x01, 0, 1, b'a', 0x01, 0, 1, b'b']));
    }

    #[test]
    fn v2_length_above_cap_is_too_large() {
        let wire = v2(&[0x21, 0x11, 0x10, 0x01]); // 4097 > 4096
        assert!(matches!(
            parse(&wire, MAX),
            Err(ProxyProtocolError::TooLarge(4096))
        ));
        let wire = v2(&[0x21, 0x11, 0x00, 0x0d]);
        assert!(matches!(
            parse(&wire, 12),
            Err(ProxyProtocolError::TooLarge(12))
        ));
    }

    #[test]
    fn v2_partial_is_none() {
        let wire = v2_tcp4_with(&[0x01, 0x00, 0x02, b'h', b'2']);
        for n in 0..wire.len() {
            assert!(matches!(parse(&wire[..n], MAX), Ok(None)), "{n}");
        }
    }

    #[test]
    fn v2_bad_fixed_fields() {
        malformed(&[
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0b,
        ]);
        malformed(&[0x0d, 0x0a, 0x0d, 0x0b]);
        malformed(&v2(&[0x11])); // version 1 in a binary header
        malformed(&v2(&[0x31]));
        malformed(&v2(&[0x22])); // command 2
        malformed(&v2(&[0x2f, 0x11, 0x00, 0x00]));
        malformed(&v2(&[0x21, 0x41])); // family 4
        malformed(&v2(&[0x21, 0x13])); // protocol 3
        malformed(&v2(&[0x21, 0x11, 0x00, 0x08, 0, 0, 0, 0, 0, 0, 0, 0])); // too short for IPv4
    }

    #[tokio::test]
    async fn read_header_leaves_trailing_bytes() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut wire = v2_tcp4_with(&[0x01, 0x00, 0x02, b'h', b'2']);
        wire.extend_from_slice(b"hello");
        client.write_all(&wire).await.unwrap();
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let h = read_header(&mut server, &mut buf, deadline, MAX)
            .await
            .unwrap();
        assert_eq!(h.source, Some(sa("127.0.0.1:56324")));
        assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(&buf[..], b"hello");
    }

    #[tokio::test]
    async fn read_header_over_tcp_with_prefilled_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 443\r\n";
        // The first 10 bytes were already read by an earlier stage.
        let mut buf = BytesMut::from(&line[..10]);
        client.write_all(&line[10..]).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let h = read_header(&mut server, &mut buf, deadline, MAX)
            .await
            .unwrap();
        assert_eq!(h.source, Some(sa("10.0.0.1:1000")));
        // The rest may not have arrived in the same read; read it to the end.
        let mut rest = buf.to_vec();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello");
    }

    #[tokio::test]
    async fn read_header_times_out_on_half_a_header() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let wire = v2_tcp4_with(&[]);
        client.write_all(&wire[..10]).await.unwrap();
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        let err = read_header(&mut server, &mut buf, deadline, MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyProtocolError::Timeout));
        assert_eq!(err.reason(), "timeout");
        drop(client);
    }

    #[tokio::test]
    async fn read_header_truncated_when_peer_closes() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2")
            .await
            .unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let err = read_header(&mut server, &mut buf, deadline, MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyProtocolError::Truncated));
        assert_eq!(err.reason(), "truncated");
    }

    #[tokio::test]
    async fn read_header_rejects_garbage_without_waiting() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"\x16\x03\x01\x02\x00").await.unwrap();
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let err = read_header(&mut server, &mut buf, deadline, MAX)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "malformed");
        drop(client);
    }

    #[tokio::test]
    async fn read_header_bounds_the_buffer_on_an_endless_v1_line() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut junk = b"PROXY UNKNOWN ".to_vec();
        junk.resize(20_000, b'x');
        client.write_all(&junk).await.unwrap();
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let err = read_header(&mut server, &mut buf, deadline, MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyProtocolError::TooLarge(107)));
        assert!(buf.len() <= 16 + MAX + READ_CHUNK);
    }

    #[test]
    fn encode_v2_vectors() {
        let wire = encode_v2(
            sa("127.0.0.1:56324"),
            sa("192.168.1.1:443"),
            &[(0x01, b"h2")],
        );
        assert_eq!(wire, v2_tcp4_with(&[0x01, 0x00, 0x02, b'h', b'2']));
        assert_eq!(
            encode_v2_local(),
            [
                0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00,
                0x00, 0x00,
            ]
        );
        // Mixed families: IPv6 with the v4 side mapped.
        let wire = encode_v2(sa("10.0.0.1:1"), sa("[2001:db8::2]:2"), &[]);
        assert_eq!(&wire[12..16], &[0x21, 0x21, 0x00, 0x24]);
        let (h, _) = complete(&wire);
        assert_eq!(h.source, Some(sa("[::ffff:10.0.0.1]:1")));
        assert_eq!(h.destination, Some(sa("[2001:db8::2]:2")));
        // A TLV too large for the 16-bit length is dropped rather than corrupting the header.
        let huge = vec![0u8; 70_000];
        let wire = encode_v2(sa("10.0.0.1:1"), sa("10.0.0.2:2"), &[(0x04, &huge)]);
        assert_eq!(wire.len(), 28);
    }

    #[test]
    fn encode_v1_vectors() {
        assert_eq!(
            encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(
            encode_v1(sa("[2001:db8::1]:1"), sa("[::1]:2")),
            b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
        );
        assert_eq!(
            encode_v1(sa("10.0.0.1:1"), sa("[::1]:2")),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn round_trips() {
        let pairs = [
            (sa("10.1.2.3:4567"), sa("10.9.8.7:443")),
            (sa("[2001:db8::1]:65535"), sa("[fe80::1]:0")),
        ];
        for (s, d) in pairs {
            let wire = encode_v1(s, d);
            let (h, n) = complete(&wire);
            assert_eq!(
                (h.version, h.source, h.destination, n),
                (1, Some(s), Some(d), wire.len())
            );

            let tlvs: [(u8, &[u8]); 3] = [
                (0x01, b"http/1.1"),
                (0x02, "bücher.example".as_bytes()),
                (0xee, b"\x00\x01\x02"),
            ];
            let wire = encode_v2(s, d, &tlvs);
            let (h, n) = complete(&wire);
            assert_eq!(
                (h.version, h.source, h.destination, n),
                (2, Some(s), Some(d), wire.len())
            );
            assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]));
            assert_eq!(h.authority.as_deref(), Some("bücher.example"));
            let got: Vec<(u8, &[u8])> = h.tlvs.iter().map(|(k, v)| (*k, &v[..])).collect();
            assert_eq!(got, tlvs);
            // Cross-check our encoder against ppp's parser.
            let theirs = ppp::v2::Header::try_from(&wire[..]).unwrap();
            assert_eq!(theirs.len(), wire.len());
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_9a7e);
        let valid: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2_tcp4_with(&[
                0x01, 0x00, 0x02, b'h', b'2', 0x20, 0x00, 0x0b, 1, 0, 0, 0, 0, 0x22, 0x00, 0x03,
                b'b', b'o', b'b',
            ]),
            encode_v2(sa("[::1]:1"), sa("[::2]:2"), &[(0x02, b"a.example")]),
            encode_v2_local(),
        ];
        for i in 0..10_000 {
            let input: Vec<u8> = match i % 4 {
                // Pure noise.
                0 => (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect(),
                // A signature followed by noise, to get past the first checks.
                1 => {
                    let mut v = if rng.bool() {
                        SIG.to_vec()
                    } else {
                        b"PROXY ".to_vec()
                    };
                    v.extend((0..rng.usize(0..300)).map(|_| rng.u8(..)));
                    v
                }
                // A truncation of a valid header.
                2 => {
                    let v = &valid[rng.usize(..valid.len())];
                    v[..rng.usize(0..=v.len())].to_vec()
                }
                // A valid header with a few bytes flipped.
                _ => {
                    let mut v = valid[rng.usize(..valid.len())].clone();
                    for _ in 0..rng.usize(1..4) {
                        let at = rng.usize(..v.len());
                        v[at] = rng.u8(..);
                    }
                    v
                }
            };
            let max = if rng.bool() { MAX } else { rng.usize(0..64) };
            if let Ok(Some((_, n))) = parse(&input, max) {
                assert!(n <= input.len());
            }
        }
        for v in &valid {
            for n in 0..v.len() {
                assert!(matches!(parse(&v[..n], MAX), Ok(None)));
            }
            assert_eq!(complete(v).1, v.len());
        }
    }
}
