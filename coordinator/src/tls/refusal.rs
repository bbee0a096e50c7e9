//! A refused TLS handshake, told in one line on the coordinator's side: who (the peer's
//! address), why, and what the operator or the device owner can do. Repeats from one address
//! for one reason are logged once a minute with a count, so that a misconfigured device
//! retrying in a loop (or a scanner) cannot flood the log.

use fedtune_common::logging::NET;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustls::{AlertDescription, CertificateError, Error as TlsError};
use tracing::{debug, warn};

/// One line per address and reason per this long.
const QUIET_FOR: Duration = Duration::from_secs(60);

/// Why a handshake failed, in words; `kind` groups repeats.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub kind: &'static str,
    pub why: String,
}

/// `err` (what the TLS acceptor returned) as a refusal; `None` when the peer closed the
/// connection without speaking TLS at all (a port probe or a health check): not worth a line.
pub fn describe(err: &io::Error, client_ca: Option<&Path>) -> Option<Refusal> {
    let tls = err.get_ref().and_then(|e| e.downcast_ref::<TlsError>());
    let Some(tls) = tls else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => None,
            _ => Some(Refusal {
                kind: "io",
                why: format!("the connection failed during the handshake ({err})"),
            }),
        };
    };
    let ca = client_ca.map_or("the client CA".to_string(), |p| {
        format!("the client CA ({})", p.display())
    });
    let (kind, why) = match tls {
        TlsError::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                "unknown-issuer",
                format!(
                    "its client certificate is not issued by {ca} (another federation's kit?)"
                ),
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                "expired",
                format!(
                    "its client certificate has expired{}: issue the client a new kit (`provision --clients NAME` after removing its folder)",
                    expiry(c)
                ),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                "not-yet-valid",
                "its client certificate is not valid yet: check the device's clock".to_string(),
            ),
            CertificateError::Revoked => (
                "revoked",
                "its client certificate is revoked".to_string(),
            ),
            other => (
                "bad-certificate",
                format!("its client certificate was refused ({other:?})"),
            ),
        },
        TlsError::NoCertificatesPresented => (
            "no-certificate",
            "it presented no client certificate, and this coordinator requires mutual TLS: run the client with its kit (--config DIR/client.toml)"
                .to_string(),
        ),
        TlsError::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired => (
                "client-distrusts-server",
                format!(
                    "the client does not accept this coordinator's certificate ({alert:?}): give it this federation's ca.pem, have it dial a name or IP in the certificate (`provision --san`), and check the certificate's dates"
                ),
            ),
            other => (
                "alert",
                format!("the client ended the handshake ({other:?})"),
            ),
        },
        TlsError::InvalidMessage(_) => (
            "not-tls",
            "it did not speak TLS: a client with an http:// URL (--insecure)? This coordinator serves https:// only".to_string(),
        ),
        TlsError::PeerIncompatible(p) => (
            "incompatible",
            format!("its TLS is incompatible ({p:?}): fedtune needs TLS 1.2 or 1.3 with ECDHE"),
        ),
        other => ("tls", format!("the handshake failed ({other})")),
    };
    Some(Refusal { kind, why })
}

fn expiry(c: &CertificateError) -> String {
    match c {
        CertificateError::ExpiredContext { not_after, .. } => {
            let secs = not_after.as_secs() as i64;
            time::OffsetDateTime::from_unix_timestamp(secs)
                .map(|t| format!(" (on {})", t.date()))
                .unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// For one (address, reason): when it was last logged, and how many came since.
type Folded = (Instant, u64);

/// The log of refused handshakes, with repeats folded.
pub struct Refusals {
    client_ca: Option<PathBuf>,
    recent: Mutex<HashMap<(IpAddr, &'static str), Folded>>,
}

impl Refusals {
    pub fn new(client_ca: Option<PathBuf>) -> Self {
        Self {
            client_ca,
            recent: Mutex::new(HashMap::new()),
        }
    }

    pub fn handshake_failed(&self, peer: SocketAddr, err: &io::Error) {
        match describe(err, self.client_ca.as_deref()) {
            Some(refusal) => self.log(peer, refusal, Instant::now()),
            None => debug!("{peer} closed its connection before a TLS handshake ({err})"),
        }
    }

    pub fn timed_out(&self, peer: SocketAddr, after: Duration) {
        let why = format!("no TLS handshake within {} s", after.as_secs());
        self.log(
            peer,
            Refusal {
                kind: "timeout",
                why,
            },
            Instant::now(),
        );
    }

    fn log(&self, peer: SocketAddr, refusal: Refusal, now: Instant) {
        if let Some(folded) = self.due(peer.ip(), refusal.kind, now) {
            let more = if folded > 0 {
                format!(" ({folded} more like it from {} before this)", peer.ip())
            } else {
                String::new()
            };
            warn!(
                target: NET,
                "refused a TLS connection from {peer}: {}{more}",
                refusal.why
            );
        }
    }

    /// Whether to log now, and how many were folded since the last line.
    fn due(&self, ip: IpAddr, kind: &'static str, now: Instant) -> Option<u64> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() > 4096 {
            recent.retain(|_, (at, _)| now.duration_since(*at) < QUIET_FOR);
        }
        match recent.get_mut(&(ip, kind)) {
            Some((at, folded)) if now.duration_since(*at) < QUIET_FOR => {
                *folded += 1;
                None
            }
            Some((at, folded)) => {
                let n = *folded;
                *at = now;
                *folded = 0;
                Some(n)
            }
            None => {
                recent.insert((ip, kind), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(e: TlsError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn each_handshake_failure_is_told_as_what_to_do() {
        let ca = Path::new("/kits/ca.pem");
        let cases = [
            (
                tls(TlsError::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )),
                "unknown-issuer",
                "not issued by the client CA (/kits/ca.pem)",
            ),
            (
                tls(TlsError::InvalidCertificate(
                    CertificateError::ExpiredContext {
                        time: rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                            1_800_000_000,
                        )),
                        not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                            Duration::from_secs(1_700_000_000),
                        ),
                    },
                )),
                "expired",
                "has expired (on 2023-11-14)",
            ),
            (
                tls(TlsError::NoCertificatesPresented),
                "no-certificate",
                "presented no client certificate",
            ),
            (
                tls(TlsError::AlertReceived(AlertDescription::UnknownCA)),
                "client-distrusts-server",
                "does not accept this coordinator's certificate",
            ),
            (
                tls(TlsError::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "not-tls",
                "did not speak TLS",
            ),
        ];
        for (err, kind, want) in cases {
            let r = describe(&err, Some(ca)).unwrap();
            assert_eq!(r.kind, kind);
            assert!(r.why.contains(want), "{}", r.why);
        }
        let probe = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(describe(&probe, Some(ca)), None);
    }

    #[test]
    fn repeats_from_one_address_are_folded_for_a_minute() {
        let r = Refusals::new(None);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = Instant::now();
        assert_eq!(r.due(a, "not-tls", t), Some(0));
        assert_eq!(r.due(a, "not-tls", t + Duration::from_secs(1)), None);
        assert_eq!(r.due(a, "not-tls", t + Duration::from_secs(2)), None);
        assert_eq!(r.due(a, "expired", t), Some(0), "another reason is told");
        assert_eq!(r.due(b, "not-tls", t), Some(0), "another address is told");
        assert_eq!(r.due(a, "not-tls", t + QUIET_FOR), Some(2));
    }
}
