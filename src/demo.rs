//! The built-in demo upstream: a tiny HTTP server the gateway can start next to itself so
//! the example config shows a real proxy hop with nothing else installed. It answers every
//! request with a JSON description of what it received.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Binds the demo upstream and serves it in the background. Returns the bound address.
pub async fn start(bind: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    Ok::<_, hyper::Error>(describe(request).await)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    tracing::info!(addr = %addr, "demo upstream listening");
    Ok(addr)
}

/// Most body bytes the demo upstream reads back to the caller.
const MAX_ECHO_BODY: usize = 64 * 1024;

async fn describe(request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes())
                    .into_owned()
                    .into(),
            )
        })
        .collect();
    let body = http_body_util::Limited::new(body, MAX_ECHO_BODY)
        .collect()
        .await
        .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
        .unwrap_or_else(|_| format!("(body larger than {MAX_ECHO_BODY} bytes or unreadable)"));
    let answer = serde_json::json!({
        "message": "Hello from the Gatehouse demo upstream",
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": body,
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{answer:#}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
