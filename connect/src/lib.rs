//! How a program reaches a coordinator, shared by the edge client and the coordinator's own
//! `status` command (an operator's client of the `Admin` service):
//!
//! - [`connection`]: the endpoint (HTTP/2 windows, keep-alive), which gRPC failures are worth
//!   retrying, and the backoff between retries;
//! - [`tls`]: TLS from a kit's files (CA, client certificate, server name), client tokens, and
//!   TLS failures told in one line that says what to do.

pub mod connection;
pub mod tls;
