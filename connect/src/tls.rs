//! The client's side of TLS: the endpoint's TLS settings from the kit's files, and TLS failures
//! told in one line that says what to do (a certificate problem does not mend by retrying).

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::{AlertDescription, CertificateError};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How the client reaches the coordinator.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Plaintext `http://` allowed.
    pub insecure: bool,
    /// The CA that issued the coordinator's certificate (the kit's ca.pem).
    pub ca_cert: Option<PathBuf>,
    /// This client's certificate and key, for coordinators that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Check the coordinator's certificate for this name instead of the URL's host.
    pub server_name: Option<String>,
    /// A file holding this client's token (`fedtune-coordinator token add`), for coordinators
    /// with client tokens instead of client certificates.
    pub token_file: Option<PathBuf>,
}

/// Adds the client token, if any, to every call as `authorization: Bearer …`.
#[derive(Clone)]
pub struct ClientAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for ClientAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The token of `sec.token_file`, checked; refused over plaintext, where it would travel in
/// clear.
pub fn client_auth(url: &str, sec: &ClientSecurity) -> anyhow::Result<ClientAuth> {
    let Some(path) = &sec.token_file else {
        return Ok(ClientAuth(None));
    };
    if !url.starts_with("https://") {
        bail!("--token-file: a client token only travels over TLS (https://), never in clear");
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file {}: cannot read", path.display()))?;
    let token = token.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!(
            "--token-file {}: expected the one token `fedtune-coordinator token add` printed",
            path.display()
        );
    }
    let value = format!("Bearer {token}").parse().map_err(|_| {
        anyhow::anyhow!(
            "--token-file {}: the token holds characters a header cannot carry",
            path.display()
        )
    })?;
    Ok(ClientAuth(Some(value)))
}

/// `endpoint` with TLS set up for `url`; refuses plaintext unless insecure.
pub fn secure(endpoint: Endpoint, url: &str, sec: &ClientSecurity) -> anyhow::Result<Endpoint> {
    let https = url.starts_with("https://");
    if !https {
        if sec.insecure {
            tracing::warn!(
                "connecting without TLS (--insecure): the model and updates cross the network in clear"
            );
            return Ok(endpoint);
        }
        bail!(
            "coordinator URL `{url}` is plaintext: use https:// with the client's kit (--config DIR/client.toml, or --ca-cert), or --insecure for a trusted local test"
        );
    }
    if sec.insecure {
        bail!("--insecure is for http:// URLs; `{url}` is https://");
    }
    fedtune_proto::install_crypto_provider();
    let ca = sec.ca_cert.as_deref().with_context(|| {
        format!(
            "`{url}` is TLS: give --ca-cert (the kit's ca.pem, the authority that issued the coordinator's certificate)"
        )
    })?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca, "--ca-cert")?))
        .timeout(Duration::from_secs(10));
    match (&sec.cert, &sec.key) {
        (Some(cert), Some(key)) => {
            let pem = read(cert, "--cert")?;
            check_own_certificate(&pem, cert)?;
            tls = tls.identity(Identity::from_pem(pem, read(key, "--key")?));
        }
        (None, None) => {}
        (Some(_), None) => bail!("--cert is given without --key (the certificate's private key)"),
        (None, Some(_)) => bail!("--key is given without --cert"),
    }
    if let Some(name) = &sec.server_name {
        tls = tls.domain_name(name.clone());
    }
    endpoint
        .tls_config(tls)
        .with_context(|| format!("TLS settings for `{url}`"))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))?;
    if !bytes.starts_with(b"-----BEGIN") {
        bail!(
            "{flag} {}: not a PEM file (expected -----BEGIN ...)",
            path.display()
        );
    }
    Ok(bytes)
}

/// Refuses this client's own certificate when it is outside its validity period: the
/// coordinator would refuse it at every handshake, so say so before dialing, naming the file.
fn check_own_certificate(pem: &[u8], path: &Path) -> anyhow::Result<()> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .with_context(|| format!("--cert {}: no PEM certificate in it", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
        anyhow::anyhow!(
            "--cert {}: not a readable X.509 certificate ({e})",
            path.display()
        )
    })?;
    let validity = cert.validity();
    if validity.time_to_expiration().is_none() {
        let now = x509_parser::time::ASN1Time::now();
        if now < validity.not_before {
            bail!(
                "--cert {}: this client's certificate is not valid until {}: check this device's clock",
                path.display(),
                validity.not_before
            );
        }
        bail!(
            "--cert {}: this client's certificate expired on {}: ask the coordinator's operator for a new kit",
            path.display(),
            validity.not_after
        );
    }
    Ok(())
}

/// A TLS failure somewhere in `err`'s chain, told as what went wrong and what to do; `None`
/// when the failure is not about TLS (then retrying may help).
pub fn explain(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(describe(tls));
        }
        // Below hyper an alert from the server arrives as text only.
        let text = e.to_string();
        if let Some(alert) = text.split("received fatal alert: ").nth(1) {
            let end = alert
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(alert.len());
            let alert = &alert[..end];
            return Some(describe(&rustls::Error::AlertReceived(alert_named(alert))));
        }
        cur = e.source();
    }
    None
}

/// The alert rustls names `name` (its Debug form).
fn alert_named(name: &str) -> AlertDescription {
    use AlertDescription as A;
    [
        A::UnknownCA,
        A::BadCertificate,
        A::CertificateUnknown,
        A::CertificateRequired,
        A::CertificateExpired,
        A::CertificateRevoked,
        A::AccessDenied,
        A::HandshakeFailure,
    ]
    .into_iter()
    .find(|a| format!("{a:?}") == name)
    .unwrap_or(A::Unknown(0))
}

fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    let what = match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "the coordinator's certificate is not issued by the CA in --ca-cert (another federation's kit?)".to_string(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the coordinator's certificate does not name the host in the URL: dial a name or IP given to `provision --san`, or set --tls-server-name".to_string()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the coordinator's certificate has expired: provision a new one".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the coordinator's certificate is not valid yet: check this device's clock".to_string()
            }
            other => format!("the coordinator's certificate was refused ({other:?})"),
        },
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown => {
                "the coordinator refused this client's certificate (issued by another CA?)".to_string()
            }
            AlertDescription::CertificateRequired => {
                "the coordinator requires a client certificate (mutual TLS): use the kit (--config DIR/client.toml, or --cert and --key)".to_string()
            }
            AlertDescription::CertificateExpired => {
                "the coordinator refused this client's certificate: it has expired".to_string()
            }
            other => format!("the coordinator ended the TLS handshake ({other:?})"),
        },
        E::InvalidMessage(_) => {
            "the coordinator did not answer in TLS: it may serve plaintext (--insecure), then use http://".to_string()
        }
        other => format!("TLS failed: {other}"),
    };
    format!("TLS: {what}")
}
