//! The gateway's small HTTP/1.1 client for reaching its own services (JWKS documents,
//! external authorization, pull mode's bundle server): one connection per call, a deadline
//! over the whole exchange and a cap on the body read.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS to {0}: {1}")]
    Tls(String, String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("response body over {0} bytes")]
    TooLarge(u64),
    #[error("bad request: {0}")]
    Request(String),
}

/// A parsed `http://` or `https://` URL.
#[derive(Clone, Debug)]
pub struct Target {
    pub tls: bool,
    /// `host:port` to dial.
    pub address: String,
    pub host: String,
    /// Path and query.
    pub path: String,
    pub authority: HeaderValue,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?}: must start with http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
        let host = authority.host().trim_matches(['[', ']']).to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target {
            tls,
            address,
            host,
            path: uri
                .path_and_query()
                .map_or("/".into(), |pq| pq.as_str().to_string()),
            authority: HeaderValue::from_str(authority.as_str())
                .map_err(|_| format!("{url:?}: bad host"))?,
        })
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most the cap; `truncated` tells whether more was sent.
    pub body: Bytes,
    pub truncated: bool,
}

/// `GET target` with `headers`, all within `timeout`. A body longer than `max_body` is an
/// error when `strict`, else cut to `max_body`.
pub async fn get(
    target: &Target,
    headers: HeaderMap,
    timeout: Duration,
    max_body: u64,
    strict: bool,
) -> Result<Answer, ClientError> {
    get_with(target, headers, timeout, max_body, strict, None).await
}

/// [`get`], with `https://` verified by `tls` instead of the system's roots.
pub async fn get_with(
    target: &Target,
    headers: HeaderMap,
    timeout: Duration,
    max_body: u64,
    strict: bool,
    tls: Option<&crate::tls::UpstreamTlsConnector>,
) -> Result<Answer, ClientError> {
    tokio::time::timeout(
        timeout,
        exchange(target, headers, timeout, max_body, strict, tls),
    )
    .await
    .map_err(|_| ClientError::Timeout(timeout))?
}

async fn exchange(
    target: &Target,
    headers: HeaderMap,
    timeout: Duration,
    max_body: u64,
    strict: bool,
    tls: Option<&crate::tls::UpstreamTlsConnector>,
) -> Result<Answer, ClientError> {
    let tcp = tokio::net::TcpStream::connect(&target.address)
        .await
        .map_err(|e| ClientError::Connect(target.address.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    let mut request = Request::get(target.path.as_str())
        .header(http::header::HOST, target.authority.clone())
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Request(e.to_string()))?;
    request.headers_mut().extend(headers);
    let response = if target.tls {
        let tls = match tls {
            Some(tls) => tls,
            None => connector().map_err(|e| ClientError::Tls(target.host.clone(), e.clone()))?,
        };
        let name = tls
            .server_name_for(&target.address)
            .map_err(|e| ClientError::Tls(target.host.clone(), e.to_string()))?;
        let stream = tls
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(target.host.clone(), e.to_string()))?;
        send(TokioIo::new(stream), request, timeout).await?
    } else {
        send(TokioIo::new(tcp), request, timeout).await?
    };
    let (parts, mut body) = response.into_parts();
    let mut buffer = BytesMut::new();
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = (max_body as usize).saturating_sub(buffer.len());
            if data.len() > room {
                if strict {
                    return Err(ClientError::TooLarge(max_body));
                }
                buffer.extend_from_slice(&data[..room]);
                truncated = true;
                break;
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: buffer.freeze(),
        truncated,
    })
}

/// One TLS client config (system roots) for the process: loading the roots is file I/O,
/// not something to repeat per call.
fn connector() -> Result<&'static crate::tls::UpstreamTlsConnector, &'static String> {
    static CONNECTOR: std::sync::OnceLock<Result<crate::tls::UpstreamTlsConnector, String>> =
        std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            crate::tls::UpstreamTlsConnector::new(&Default::default(), &[b"http/1.1"])
                .map_err(|e| e.to_string())
        })
        .as_ref()
}

async fn send<S>(
    io: TokioIo<S>,
    request: Request<Empty<Bytes>>,
    timeout: Duration,
) -> Result<http::Response<hyper::body::Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    // Bounded like the exchange, so a stalled service cannot keep the task alive.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(timeout, connection).await;
    });
    Ok(sender.send_request(request).await?)
}
