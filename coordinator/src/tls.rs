//! The coordinator's TLS configuration from its files, checked at start so that a wrong file
//! is an error naming it, not a failed handshake later.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::warn;

use crate::config::TlsFiles;

/// A handshake that takes longer is dropped (a peer that opens connections and stalls).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn server_config(files: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    fedtune_proto::install_crypto_provider();
    let cert = read(&files.cert, "--tls-cert")?;
    let certs = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .with_context(|| {
            format!(
                "--tls-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                files.cert.display()
            )
        })?;
    check_validity(&certs[0], &files.cert)?;
    let key = read(&files.key, "--tls-key")?;
    PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-key {}: not a PEM private key ({e})",
            files.key.display()
        )
    })?;
    warn_if_readable_by_others(&files.key);
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &files.client_ca {
        let pem = read(ca, "--client-ca")?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| format!("--client-ca {}: no PEM certificate in it", ca.display()))?;
        check_validity(&certs[0], ca)?;
        config = config.client_ca_root(Certificate::from_pem(pem));
        if files.client_tokens.is_some() {
            // Clients may prove who they are with a certificate or with a token.
            config = config.client_auth_optional(true);
        }
    }
    Ok(config)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

/// Refuses a certificate outside its validity period, naming the file and the dates.
fn check_validity(der: &CertificateDer<'_>, path: &Path) -> anyhow::Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
        anyhow::anyhow!("{}: not a readable X.509 certificate ({e})", path.display())
    })?;
    let validity = cert.validity();
    if !validity.is_valid() {
        bail!(
            "{}: the certificate is valid from {} to {}, not now; issue a new one (`fedtune-coordinator provision`)",
            path.display(),
            validity.not_before,
            validity.not_after
        );
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(
            "{}: the private key is readable by other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn missing_or_wrong_files_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let kits = dir.path().join("kits");
        crate::provision::provision(&crate::provision::ProvisionPlan {
            out: kits.clone(),
            sans: vec!["localhost".into()],
            clients: vec![],
            url: "https://localhost:50051".into(),
            days: 1,
        })
        .unwrap();
        let good = TlsFiles {
            cert: kits.join("coordinator/server.pem"),
            key: kits.join("coordinator/server.key"),
            client_ca: Some(kits.join("coordinator/ca.pem")),
            allowed_clients: None,
            client_tokens: None,
        };
        assert!(server_config(&good).is_ok());
        let missing = PathBuf::from("/nonexistent/server.key");
        let cases = [
            (
                TlsFiles {
                    key: missing.clone(),
                    ..good.clone()
                },
                "--tls-key /nonexistent/server.key: cannot read",
            ),
            (
                TlsFiles {
                    cert: kits.join("coordinator/server.key"),
                    ..good.clone()
                },
                "no PEM certificate",
            ),
            (
                TlsFiles {
                    key: kits.join("coordinator/server.pem"),
                    ..good.clone()
                },
                "not a PEM private key",
            ),
            (
                TlsFiles {
                    client_ca: Some(missing),
                    ..good.clone()
                },
                "--client-ca /nonexistent/server.key",
            ),
        ];
        for (files, want) in cases {
            let e = format!("{:#}", server_config(&files).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }
}
