//! `fedtune-coordinator provision`: a private certificate authority, the coordinator's server
//! certificate and one kit per client, so that a federation runs over mutual TLS from zero.
//!
//! ```text
//! DIR/ca/{ca.pem, ca.key}                      the authority: stays with the operator
//! DIR/coordinator/{ca.pem, server.pem, server.key, coordinator.toml}
//! DIR/clients/NAME/{ca.pem, client.pem, client.key, client.toml}
//! ```
//!
//! Keys are written 0600 in 0700 folders and never overwritten; re-running with more clients
//! issues only the new kits (the authority is read back), and the CA key never enters a kit.
//! A client's identity is its certificate's common name, the kit's name.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// What to provision.
pub struct ProvisionPlan {
    pub out: PathBuf,
    /// DNS names and IP addresses clients dial the coordinator by.
    pub sans: Vec<String>,
    pub clients: Vec<String>,
    /// The URL written into the clients' `client.toml`.
    pub url: String,
    /// Validity of the server and client certificates.
    pub days: u32,
}

/// What a run did, for the command's summary.
#[derive(Debug, Default)]
pub struct Provisioned {
    pub created_ca: bool,
    pub created_server: bool,
    pub new_clients: Vec<String>,
    pub kept_clients: Vec<String>,
}

/// Validity of a new authority: it outlives the certificates it signs.
const CA_DAYS: i64 = 3650;
/// Certificates start an hour back so that a client clock a little behind still accepts them.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Whether `name` can be a client identity and a folder name.
pub fn check_client_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!(
            "client name `{name}`: use 1-64 letters, digits, `-`, `_` or `.` (not starting with `.`); it becomes the certificate's common name and a folder name"
        );
    }
    Ok(())
}

pub fn provision(plan: &ProvisionPlan) -> anyhow::Result<Provisioned> {
    if plan.sans.is_empty() {
        bail!(
            "give at least one --san: the DNS name or IP address clients dial the coordinator by (e.g. --san coordinator.example.org --san 10.0.0.5)"
        );
    }
    if plan.days == 0 {
        bail!("--days must be at least 1");
    }
    let mut seen = std::collections::HashSet::new();
    for c in &plan.clients {
        check_client_name(c)?;
        if !seen.insert(c) {
            bail!("client `{c}` is listed twice in --clients");
        }
    }
    let mut done = Provisioned::default();
    let ca_dir = plan.out.join("ca");
    let (ca_pem, issuer) = if ca_dir.join("ca.pem").exists() {
        read_ca(&ca_dir)?
    } else {
        done.created_ca = true;
        create_ca(&ca_dir)?
    };

    let server_dir = plan.out.join("coordinator");
    if !server_dir.join("server.pem").exists() {
        private_dir(&server_dir)?;
        let mut params = CertificateParams::new(plan.sans.clone())
            .context("--san: not a valid DNS name or IP address")?;
        params
            .distinguished_name
            .push(DnType::CommonName, plan.sans[0].clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = leaf(&mut params, plan.days)?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&server_dir.join("ca.pem"), &ca_pem, 0o644)?;
        write_new(&server_dir.join("server.pem"), &cert.pem(), 0o644)?;
        write_new(&server_dir.join("server.key"), &key.serialize_pem(), 0o600)?;
        let listen_port = plan
            .url
            .rsplit_once(':')
            .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
            .unwrap_or(50051);
        write_new(
            &server_dir.join("coordinator.toml"),
            &format!(
                "# Written by `fedtune-coordinator provision`: mutual TLS with this kit's authority.\n\
                 # Paths are relative to this file. Add the run's settings below.\n\
                 listen = \"0.0.0.0:{listen_port}\"\n\
                 tls_cert = \"server.pem\"\n\
                 tls_key = \"server.key\"\n\
                 client_ca = \"ca.pem\"\n"
            ),
            0o644,
        )?;
        done.created_server = true;
    }

    for name in &plan.clients {
        let dir = plan.out.join("clients").join(name);
        if dir.join("client.pem").exists() {
            done.kept_clients.push(name.clone());
            continue;
        }
        private_dir(&dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = leaf(&mut params, plan.days)?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&dir.join("ca.pem"), &ca_pem, 0o644)?;
        write_new(&dir.join("client.pem"), &cert.pem(), 0o644)?;
        write_new(&dir.join("client.key"), &key.serialize_pem(), 0o600)?;
        write_new(
            &dir.join("client.toml"),
            &format!(
                "# Written by `fedtune-coordinator provision` for client `{name}`.\n\
                 # Paths are relative to this file: copy the whole folder to the device.\n\
                 coordinator = \"{}\"\n\
                 name = \"{name}\"\n\
                 ca_cert = \"ca.pem\"\n\
                 cert = \"client.pem\"\n\
                 key = \"client.key\"\n",
                plan.url
            ),
            0o644,
        )?;
        done.new_clients.push(name.clone());
    }
    Ok(done)
}

/// A fresh ECDSA P-256 key for `params`, which get leaf settings and `days` of validity.
fn leaf(params: &mut CertificateParams, days: u32) -> anyhow::Result<KeyPair> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(days as i64);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(KeyPair::generate()?)
}

fn create_ca(dir: &Path) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    private_dir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own: two federations' authorities must not look like one issuer.
    let id: String = (0..4)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("fedtune federation CA {id}"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn read_ca(dir: &Path) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read the existing authority (a kit folder without its ca/ cannot issue more clients)",
                path.display()
            )
        })
    };
    let (pem, key) = (read("ca.pem")?, read("ca.key")?);
    let key = KeyPair::from_pem(&key)
        .with_context(|| format!("{}: not a PEM private key", dir.join("ca.key").display()))?;
    let issuer = Issuer::from_ca_cert_pem(&pem, key).with_context(|| {
        format!(
            "{}: not a CA certificate matching ca.key",
            dir.join("ca.pem").display()
        )
    })?;
    Ok((pem, issuer))
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes a new file with `mode`; an existing file is never overwritten.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn plan(out: &Path, clients: &[&str]) -> ProvisionPlan {
        ProvisionPlan {
            out: out.to_path_buf(),
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            clients: clients.iter().map(|s| s.to_string()).collect(),
            url: "https://127.0.0.1:50051".into(),
            days: 30,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn kits_hold_their_own_key_private_and_never_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let done = provision(&plan(dir.path(), &["site-a", "site-b"])).unwrap();
        assert!(done.created_ca && done.created_server);
        assert_eq!(done.new_clients, ["site-a", "site-b"]);
        let kit = dir.path().join("clients/site-a");
        assert_eq!(mode(&kit), 0o700);
        assert_eq!(mode(&kit.join("client.key")), 0o600);
        assert_eq!(mode(&dir.path().join("ca/ca.key")), 0o600);
        assert_eq!(mode(&dir.path().join("coordinator/server.key")), 0o600);
        for d in ["clients/site-a", "clients/site-b", "coordinator"] {
            let names: Vec<_> = fs::read_dir(dir.path().join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert!(!names.contains(&"ca.key".to_string()), "{d}: {names:?}");
        }
        let toml = fs::read_to_string(kit.join("client.toml")).unwrap();
        assert!(
            toml.contains("coordinator = \"https://127.0.0.1:50051\""),
            "{toml}"
        );
    }

    #[test]
    fn rerunning_adds_clients_without_reissuing_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        provision(&plan(dir.path(), &["site-a"])).unwrap();
        let read = |p: &str| fs::read_to_string(dir.path().join(p)).unwrap();
        let (ca, a, server) = (
            read("ca/ca.pem"),
            read("clients/site-a/client.pem"),
            read("coordinator/server.pem"),
        );
        let done = provision(&plan(dir.path(), &["site-a", "site-c"])).unwrap();
        assert!(!done.created_ca && !done.created_server);
        assert_eq!(done.new_clients, ["site-c"]);
        assert_eq!(done.kept_clients, ["site-a"]);
        assert_eq!(read("ca/ca.pem"), ca);
        assert_eq!(read("clients/site-a/client.pem"), a);
        assert_eq!(read("coordinator/server.pem"), server);
        assert_eq!(read("clients/site-c/ca.pem"), ca);
    }

    #[test]
    fn bad_plans_are_refused_naming_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&[&str], Vec<String>, &str)] = &[
            (&["../x"], vec!["localhost".into()], "client name `../x`"),
            (&["a", "a"], vec!["localhost".into()], "listed twice"),
            (&["a"], vec![], "--san"),
        ];
        for (clients, sans, want) in cases {
            let mut p = plan(dir.path(), clients);
            p.sans = sans.clone();
            let e = format!("{:#}", provision(&p).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }
}
