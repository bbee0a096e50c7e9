//! The coordinator's rustls configuration from its files, checked at start so that a wrong
//! file is an error naming it, not a failed handshake later; and re-read when a file changes,
//! so that a renewed certificate (or a rotated client CA) takes effect without a restart while
//! live connections keep the one they started with.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tracing::warn;

use crate::config::TlsFiles;
use crate::watched::Watched;

/// Warn at start and at each reload when the server certificate expires sooner than this.
const EXPIRY_WARNING: time::Duration = time::Duration::days(14);

/// The current rustls configuration, rebuilt when the certificate, key or client CA file
/// changes. A change that does not load (a half-copied key, an expired certificate) keeps the
/// previous configuration, logged.
pub struct ServerTls {
    config: Watched<ServerConfig>,
    /// The client CA, for telling refusals.
    pub client_ca: Option<std::path::PathBuf>,
}

impl ServerTls {
    pub fn load(files: &TlsFiles) -> anyhow::Result<Self> {
        fedtune_proto::install_crypto_provider();
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.iter().cloned());
        let owned = files.clone();
        let config = Watched::over(paths, "TLS files", move || {
            build(&owned).map_err(|e| format!("{e:#}"))
        })?;
        warn_if_readable_by_others(&files.key);
        Ok(Self {
            config,
            client_ca: files.client_ca.clone(),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.current()
    }
}

fn build(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let certs = certificates(&files.cert, "--tls-cert")?;
    check_validity(&certs[0], &files.cert)?;
    warn_if_expiring(&certs[0], &files.cert);
    let key = read(&files.key, "--tls-key")?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-key {}: not a PEM private key ({e})",
            files.key.display()
        )
    })?;
    let builder = ServerConfig::builder();
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let cas = certificates(ca, "--client-ca")?;
            check_validity(&cas[0], ca)?;
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                bail!(
                    "--client-ca {}: no usable CA certificate in it",
                    ca.display()
                );
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            // With client tokens too, a client may prove who it is with either.
            let verifier = if files.client_tokens.is_some() {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                anyhow::anyhow!("--client-ca {}: cannot verify with it ({e})", ca.display())
            })?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-cert {} and --tls-key {}: not a certificate and its key ({e})",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

/// The PEM certificates of `path`: at least one.
fn certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, flag)?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .with_context(|| {
            format!(
                "{flag} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            )
        })
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

fn warn_if_expiring(der: &CertificateDer<'_>, path: &Path) {
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref())
        && let Some(left) = cert.validity().time_to_expiration()
        && left < EXPIRY_WARNING
    {
        warn!(
            "{}: the certificate expires on {} ({} days left); put a renewed one in its place (no restart needed)",
            path.display(),
            cert.validity().not_after,
            left.whole_days()
        );
    }
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

    fn kits(dir: &Path, name: &str) -> PathBuf {
        let kits = dir.join(name);
        crate::provision::provision(&crate::provision::ProvisionPlan {
            out: kits.clone(),
            sans: vec!["localhost".into()],
            clients: vec![],
            url: "https://localhost:50051".into(),
            days: 1,
        })
        .unwrap();
        kits
    }

    fn files(kits: &Path) -> TlsFiles {
        TlsFiles {
            cert: kits.join("coordinator/server.pem"),
            key: kits.join("coordinator/server.key"),
            client_ca: Some(kits.join("coordinator/ca.pem")),
            allowed_clients: None,
            client_tokens: None,
            admins: Vec::new(),
        }
    }

    #[test]
    fn missing_or_wrong_files_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let (kits, other) = (kits(dir.path(), "kits"), kits(dir.path(), "other"));
        let good = files(&kits);
        assert!(ServerTls::load(&good).is_ok());
        let missing = PathBuf::from("/nonexistent/server.key");
        let expired = dir.path().join("expired.pem");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&expired, params.self_signed(&key).unwrap().pem()).unwrap();
        let cases = [
            (
                TlsFiles {
                    cert: expired.clone(),
                    ..good.clone()
                },
                "expired.pem: the certificate is valid from",
            ),
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
                    key: other.join("coordinator/server.key"),
                    ..good.clone()
                },
                "not a certificate and its key",
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
            let e = format!("{:#}", ServerTls::load(&files).err().unwrap());
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_renewed_certificate_is_picked_up_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (kits, other) = (kits(dir.path(), "kits"), kits(dir.path(), "other"));
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let put = |from: &Path, secs: u64| {
            for name in ["server.pem", "server.key", "ca.pem"] {
                let to = live.join(name);
                std::fs::copy(from.join("coordinator").join(name), &to).unwrap();
                let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                std::fs::File::options()
                    .write(true)
                    .open(&to)
                    .unwrap()
                    .set_modified(when)
                    .unwrap();
            }
        };
        put(&kits, 1_000);
        let tls = ServerTls::load(&TlsFiles {
            cert: live.join("server.pem"),
            key: live.join("server.key"),
            client_ca: Some(live.join("ca.pem")),
            allowed_clients: None,
            client_tokens: None,
            admins: Vec::new(),
        })
        .unwrap();
        let first = Arc::as_ptr(&tls.current());
        assert_eq!(
            first,
            Arc::as_ptr(&tls.current()),
            "unchanged files: no rebuild"
        );
        put(&other, 2_000);
        let second = Arc::as_ptr(&tls.current());
        assert_ne!(first, second, "renewed files are loaded");
        // A key that does not match the certificate keeps the configuration that works.
        std::fs::copy(kits.join("coordinator/server.key"), live.join("server.key")).unwrap();
        assert_eq!(second, Arc::as_ptr(&tls.current()));
    }
}
