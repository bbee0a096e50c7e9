//! `fedtune-coordinator probe URL`: a plain-HTTP GET of the metrics endpoint's `/readyz` (or
//! `/healthz`), succeeding only on 200. For container health checks in images that hold no
//! shell or curl (distroless): `HEALTHCHECK CMD ["/fedtune-coordinator", "probe", ...]`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};

/// How long the whole probe may take.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The endpoint, e.g. http://127.0.0.1:9464/readyz (the address `--metrics-listen` serves).
    pub url: String,
}

/// GETs `url`; Ok when it answers 200, else why not.
pub fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let rest = args.url.strip_prefix("http://").with_context(|| {
        format!(
            "`{}`: give an http:// URL (the metrics endpoint serves plain HTTP)",
            args.url
        )
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("`{host}` is not a host:port"))?
        .next()
        .with_context(|| format!("`{host}` resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    // A status line is enough; the body is a word.
    stream.take(4096).read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => bail!("{} answered `{status}`", args.url),
    }
}
