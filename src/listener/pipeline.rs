//! The connection pipeline, in the order SPEC CONN-2 fixes: (connection limit, checked
//! by the accept loop) → PROXY header → firewall on the real client address → protocol
//! detection (TLS ClientHello or plaintext) → SNI routing → L4 relay or L7 termination.
//!
//! Every stage that waits on the client has a deadline, and every refusal is a reset
//! (RST, no bytes, no TLS alert) counted in the listener's stats.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::prefixed::Prefixed;
use super::proxy_protocol;
use super::ListenerStats;
use crate::config::{ListenerProtocol, PlaintextAction};
use crate::http::{serve_connection, ConnInfo, Proxy, TlsInfo};
use crate::l4::client_hello::{self, Sniff};
use crate::l4::relay;
use crate::snapshot::{CompiledListener, RelayTarget, Snapshot, SniDecision};
use crate::upstream::Outcome;

/// Why the pipeline closed a connection before serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ProxyUntrusted,
    ProxyHeader,
    Firewall,
    ClientHello,
    Plaintext,
    UnknownSni,
    Handshake,
    Upstream,
}

/// Everything one connection needs from its listener.
pub(super) struct Accepted {
    pub proxy: Arc<Proxy>,
    pub listener: Arc<CompiledListener>,
    pub stats: Arc<ListenerStats>,
    pub drain: CancellationToken,
}

/// `snapshot` is the one in force at accept; it is let go after the firewall, so a
/// connection that lives for hours does not keep an old configuration alive (HTTP
/// requests load the current one each time).
pub(super) async fn run(
    accepted: Accepted,
    snapshot: Arc<Snapshot>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let config = accepted.listener.config.clone();
    let mut buffered = BytesMut::new();
    let mut client = peer;
    let mut destination = local;

    if let Some(receive) = &config.proxy_protocol {
        if !receive
            .trusted_cidrs
            .iter()
            .any(|net| net.contains(&peer.ip()))
        {
            return refuse(&accepted, stream, peer, Refusal::ProxyUntrusted);
        }
        let deadline = Instant::now() + receive.timeout.0;
        match proxy_protocol::read_header(
            &mut stream,
            &mut buffered,
            deadline,
            proxy_protocol::DEFAULT_MAX_V2_LEN,
        )
        .await
        {
            Ok(header) => {
                client = header.source.unwrap_or(peer);
                destination = header.destination.unwrap_or(local);
            }
            Err(err) => {
                tracing::debug!(peer = %peer, error = %err, "bad PROXY header");
                return refuse(&accepted, stream, peer, Refusal::ProxyHeader);
            }
        }
    }

    let blocked = firewall_blocks(&accepted, &snapshot, client);
    drop(snapshot);
    if blocked {
        return refuse(&accepted, stream, client, Refusal::Firewall);
    }

    let mut info = ConnInfo {
        client,
        local: destination,
        tls: None,
        redirect_https: None,
        client_cert_header: accepted.listener.client_cert_header.clone(),
    };
    match config.protocol {
        ListenerProtocol::Http => {
            info.redirect_https = config.redirect_https.clone();
            serve_http(&accepted, Prefixed::new(buffered, stream), info).await;
        }
        // Boxed: every connection task is as large as its largest branch, and the TLS and
        // relay states (rustls buffers, splice pipes) would otherwise make plain HTTP
        // connections pay for them.
        ListenerProtocol::Tcp => {
            if let Some(target) = &accepted.listener.relay {
                Box::pin(relay_to(
                    &accepted,
                    target,
                    stream,
                    buffered,
                    client,
                    destination,
                ))
                .await;
            }
        }
        ListenerProtocol::Tls => {
            Box::pin(serve_tls(&accepted, stream, buffered, info)).await;
        }
    }
}

async fn serve_tls(
    accepted: &Accepted,
    mut stream: TcpStream,
    mut buffered: BytesMut,
    mut info: ConnInfo,
) {
    let config = &accepted.listener.config;
    let (Some(settings), Some(plan)) = (&config.tls, &accepted.listener.tls) else {
        return;
    };
    let deadline = Instant::now() + settings.client_hello_timeout.0;
    let sniff = client_hello::read_client_hello(
        &mut stream,
        &mut buffered,
        deadline,
        client_hello::DEFAULT_MAX_CLIENT_HELLO,
    )
    .await;
    let hello = match sniff {
        Ok(Sniff::Hello(hello)) => hello,
        Ok(Sniff::NotTls) => {
            match settings.plaintext {
                PlaintextAction::Reset => {
                    refuse(accepted, stream, info.client, Refusal::Plaintext);
                }
                PlaintextAction::Http => {
                    serve_http(accepted, Prefixed::new(buffered, stream), info).await;
                }
                PlaintextAction::Redirect => {
                    info.redirect_https = Some(config.redirect_https.clone().unwrap_or_default());
                    serve_http(accepted, Prefixed::new(buffered, stream), info).await;
                }
            }
            return;
        }
        Ok(Sniff::NeedMore) | Err(_) => {
            return refuse(accepted, stream, info.client, Refusal::ClientHello);
        }
    };
    let certs = &accepted.proxy.publisher.registries.certs;
    match plan.decide(hello.server_name.as_deref(), certs) {
        SniDecision::Reset => refuse(accepted, stream, info.client, Refusal::UnknownSni),
        SniDecision::Passthrough(target) => {
            relay_to(accepted, target, stream, buffered, info.client, info.local).await;
        }
        SniDecision::Terminate => {
            let handshake = plan.acceptor.accept(Prefixed::new(buffered, stream));
            let tls = match tokio::time::timeout(settings.handshake_timeout.0, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(client = %info.client, error = %err, "TLS handshake failed");
                    count(accepted, Refusal::Handshake);
                    return;
                }
                Err(_) => {
                    tracing::debug!(client = %info.client, "TLS handshake timed out");
                    count(accepted, Refusal::Handshake);
                    return;
                }
            };
            accepted
                .stats
                .tls_handshakes
                .fetch_add(1, Ordering::Relaxed);
            let (_, session) = tls.get_ref();
            if session.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) {
                // A TLS-ALPN-01 validation: the handshake was the whole answer (RFC 8737).
                return;
            }
            let client_subject = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::tls::certificate_subject(leaf))
                .map(Arc::from);
            let version = session.protocol_version().map(|version| match version {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
                _ => "TLS",
            });
            info.tls = Some(TlsInfo {
                sni: hello.server_name.as_deref().map(Arc::from),
                version,
                client_subject,
            });
            serve_http(accepted, tls, info).await;
        }
    }
}

/// The global rules first, then the listener's; the firewall counts and logs the block.
fn firewall_blocks(accepted: &Accepted, snapshot: &Snapshot, client: SocketAddr) -> bool {
    let name = &accepted.listener.config.name;
    let global = snapshot.firewall.as_ref();
    [global, accepted.listener.firewall.as_ref()]
        .into_iter()
        .flatten()
        .any(|firewall| firewall.check(client.ip(), name).is_some())
}

async fn serve_http<S>(accepted: &Accepted, stream: S, info: ConnInfo)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(
        accepted.proxy.clone(),
        stream,
        info,
        accepted.listener.config.clone(),
        accepted.drain.clone(),
    )
    .await;
}

/// Connects to an endpoint of the target pool, sends the PROXY header and the bytes read
/// so far (a replayed ClientHello), then relays until either side is done.
async fn relay_to(
    accepted: &Accepted,
    target: &RelayTarget,
    client_stream: TcpStream,
    buffered: BytesMut,
    client: SocketAddr,
    destination: SocketAddr,
) {
    let pool = &target.pool;
    let backend = match connect_backend(target, &buffered, client, destination).await {
        Ok(backend) => backend,
        Err(err) => {
            tracing::warn!(pool = %pool.name, client = %client, error = %err, "L4 relay: backend unreachable");
            return refuse(accepted, client_stream, client, Refusal::Upstream);
        }
    };
    let stats = &accepted.stats;
    stats.relays.fetch_add(1, Ordering::Relaxed);
    // An L4 relay cannot be asked to finish early; it runs until the drain timeout ends
    // the process, so it gets its own token rather than the HTTP drain signal.
    let (moved, result) = relay::relay(
        client_stream,
        backend,
        target.idle_timeout,
        target.splice,
        CancellationToken::new(),
    )
    .await;
    stats
        .relayed_from_clients
        .fetch_add(moved.client_to_backend, Ordering::Relaxed);
    stats
        .relayed_to_clients
        .fetch_add(moved.backend_to_client, Ordering::Relaxed);
    if let Err(err) = result {
        tracing::debug!(client = %client, error = %err, "L4 relay ended");
    }
}

async fn connect_backend(
    target: &RelayTarget,
    buffered: &[u8],
    client: SocketAddr,
    destination: SocketAddr,
) -> std::io::Result<TcpStream> {
    let endpoint = target
        .pool
        .pick()
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let timeout = target.pool.settings.connect_timeout;
    let address: &str = &endpoint.address;
    let connect = async {
        let mut backend = TcpStream::connect(address).await?;
        let _ = backend.set_nodelay(true);
        if let Some(version) = target.send_proxy_protocol {
            let header = proxy_protocol::encode(version, client, destination);
            backend.write_all(&header).await?;
        }
        backend.write_all(buffered).await?;
        Ok(backend)
    };
    let result = tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    // Relayed connections feed passive health like proxied requests, so a dead endpoint
    // of an L4 pool is ejected too.
    let outcome = match &result {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::ConnectFailure,
    };
    target.pool.report(endpoint, outcome);
    result
}

fn count(accepted: &Accepted, reason: Refusal) {
    accepted.stats.refused(reason);
}

/// Closes with a reset: `SO_LINGER` 0 makes close send RST and discard unsent data, so a
/// refused client gets no bytes (and no TLS alert).
fn refuse(accepted: &Accepted, stream: TcpStream, client: SocketAddr, reason: Refusal) {
    count(accepted, reason);
    tracing::debug!(client = %client, listener = %accepted.listener.config.name, ?reason, "connection refused");
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
