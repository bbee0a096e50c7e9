//! The coordinator's accept loop under TLS: each TCP connection's handshake runs in its own
//! task (a slow or stalled peer never holds up the others) with the configuration current at
//! that moment, and only completed handshakes reach the gRPC server. tonic implements
//! `Connected` for the resulting `TlsStream`, so the service still sees the peer's address
//! and certificate.

use fedtune_common::logging::NET;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;

use super::config::ServerTls;
use super::refusal::Refusals;

/// A handshake that takes longer is dropped (a peer that opens connections and stalls).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completed TLS connections from `listener`, for `serve_with_incoming`. Ends when the
/// receiving server does.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let refusals = Arc::new(Refusals::new(tls.client_ca.clone()));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: say so, give the system a moment.
                    warn!(target: NET, "accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let (tx, refusals) = (tx.clone(), refusals.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => refusals.handshake_failed(peer, &e),
                    Err(_) => refusals.timed_out(peer, HANDSHAKE_TIMEOUT),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
