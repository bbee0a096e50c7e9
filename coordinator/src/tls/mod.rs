//! The coordinator's TLS: its configuration from the certificate files, re-read when they
//! change ([`config`]); its own accept loop, so that each refused handshake is logged naming
//! the peer and the reason ([`acceptor`], [`refusal`]). tonic's built-in TLS would do the
//! handshakes but log refusals only at debug level, and could not pick up a renewed
//! certificate without a restart.

mod acceptor;
mod config;
mod refusal;

pub use acceptor::incoming;
pub use config::ServerTls;
