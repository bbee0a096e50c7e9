//! Reading the coordinator's plain-HTTP endpoint the way Prometheus and Kubernetes probes do:
//! one HTTP/1.1 GET over a fresh connection, and the OpenMetrics text parsed into series.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET path` on 127.0.0.1:`port`: the status code and body, or `None` when nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// One scrape of `/metrics`.
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes 127.0.0.1:`port`, `None` when the endpoint does not answer 200.
    pub fn of(port: u16) -> Option<Self> {
        match get(port, "/metrics")? {
            (200, body) => Some(Self(body)),
            _ => None,
        }
    }

    /// The value of one series, written as it appears: `fedtune_round` or
    /// `fedtune_transfer_bytes_total{direction="up"}`.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// The metric families the scrape describes (its `# TYPE` lines): counters without
    /// their `_total`, e.g. `fedtune_refused`, which is listed even before anything was refused.
    pub fn families(&self) -> Vec<&str> {
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
            .collect()
    }
}
