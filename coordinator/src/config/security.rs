//! The transport-security part of `serve` settings: TLS by default, mutual TLS with a client
//! CA, an allow-list, or plaintext only when asked for by name (`--insecure`).

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;

use crate::limits::Limits;

/// Flags for TLS (TOML keys: the same with `_`; paths in the file are relative to the file).
#[derive(Debug, Clone, Default, Args)]
pub struct SecurityArgs {
    /// The server certificate (PEM, chain allowed), e.g. the provisioned coordinator/server.pem.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The CA that issued the clients' certificates: every client must present one (mutual
    /// TLS) and is named by its certificate's common name.
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// With --client-ca or --client-tokens: a file of allowed client names or certificate
    /// SHA-256 fingerprints, one per line; re-read when it changes [default: every client the
    /// CA or the token file names].
    #[arg(long)]
    pub allowed_clients: Option<PathBuf>,
    /// Client tokens for devices without a client certificate (`fedtune-coordinator token
    /// add`): clients present one over TLS and are named by its owner; re-read when it changes.
    #[arg(long)]
    pub client_tokens: Option<PathBuf>,
    /// With --client-ca or --client-tokens: identities (certificate or token names) that may
    /// read the run's status (`fedtune-coordinator status`), comma-separated [default: none;
    /// without client authentication status is open to whoever may join].
    #[arg(long, value_delimiter = ',')]
    pub admins: Vec<String>,
    /// Serve plaintext HTTP/2 without TLS: anyone who reaches the port can read the model and
    /// submit updates. For a trusted network or a local test only.
    #[arg(long)]
    pub insecure: bool,
    /// Live clients at once; a Join beyond is refused (RESOURCE_EXHAUSTED) [default: 10000].
    #[arg(long)]
    pub max_clients: Option<usize>,
    /// Downloads and uploads one client may have open at once [default: 4].
    #[arg(long)]
    pub max_streams_per_client: Option<usize>,
    /// Join attempts from one IP address per minute [default: 60].
    #[arg(long)]
    pub max_joins_per_minute: Option<u32>,
}

/// The same keys from the TOML file.
#[derive(Debug, Clone, Default)]
pub struct SecurityFile {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub allowed_clients: Option<PathBuf>,
    pub client_tokens: Option<PathBuf>,
    pub admins: Vec<String>,
    pub insecure: bool,
    pub max_clients: Option<usize>,
    pub max_streams_per_client: Option<usize>,
    pub max_joins_per_minute: Option<u32>,
}

/// The abuse limits: flags over the file over the defaults; each at least 1.
pub fn limits(args: &SecurityArgs, file: &SecurityFile) -> anyhow::Result<Limits> {
    let d = Limits::default();
    let l = Limits {
        max_clients: args
            .max_clients
            .or(file.max_clients)
            .unwrap_or(d.max_clients),
        streams_per_client: args
            .max_streams_per_client
            .or(file.max_streams_per_client)
            .unwrap_or(d.streams_per_client),
        joins_per_minute: args
            .max_joins_per_minute
            .or(file.max_joins_per_minute)
            .unwrap_or(d.joins_per_minute),
    };
    for (key, v) in [
        ("max_clients", l.max_clients),
        ("max_streams_per_client", l.streams_per_client),
        ("max_joins_per_minute", l.joins_per_minute as usize),
    ] {
        if v == 0 {
            bail!("`{key}` must be at least 1");
        }
    }
    Ok(l)
}

/// How the coordinator talks to clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Security {
    /// Plaintext (`--insecure`).
    Insecure,
    Tls(TlsFiles),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS when set.
    pub client_ca: Option<PathBuf>,
    pub allowed_clients: Option<PathBuf>,
    /// Bearer tokens naming clients without certificates.
    pub client_tokens: Option<PathBuf>,
    /// Authenticated identities that may call the `Admin` service.
    pub admins: Vec<String>,
}

impl Security {
    pub fn is_mutual(&self) -> bool {
        matches!(
            self,
            Security::Tls(TlsFiles {
                client_ca: Some(_),
                ..
            })
        )
    }
}

/// Flags win over the file; the file's relative paths are taken from the file's folder, so a
/// provisioned `coordinator.toml` works from anywhere.
pub fn resolve(
    args: &SecurityArgs,
    file: &SecurityFile,
    file_dir: Option<&Path>,
) -> anyhow::Result<Security> {
    let from_file = |p: &Option<PathBuf>| {
        p.as_ref().map(|p| match file_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.clone(),
        })
    };
    let pick = |flag: &Option<PathBuf>, key: &Option<PathBuf>| flag.clone().or(from_file(key));
    let cert = pick(&args.tls_cert, &file.tls_cert);
    let key = pick(&args.tls_key, &file.tls_key);
    let client_ca = pick(&args.client_ca, &file.client_ca);
    let allowed_clients = pick(&args.allowed_clients, &file.allowed_clients);
    let client_tokens = pick(&args.client_tokens, &file.client_tokens);
    let insecure = args.insecure || file.insecure;
    let admins = if args.admins.is_empty() {
        file.admins.clone()
    } else {
        args.admins.clone()
    };
    if admins.iter().any(|a| a.trim().is_empty()) {
        bail!("`admins`: an empty name; list certificate or token names, e.g. --admins ops,alice");
    }
    let authenticated = client_ca.is_some() || client_tokens.is_some();
    if !admins.is_empty() && (insecure || !authenticated) {
        bail!(
            "`admins` names authenticated identities, so it needs `client_ca` (mutual TLS) or `client_tokens`; without them status is open to whoever may join"
        );
    }
    if insecure {
        if client_tokens.is_some() {
            bail!(
                "`client_tokens` with `insecure` would send the tokens in clear: serve TLS (--tls-cert, --tls-key)"
            );
        }
        if cert.is_some() || client_ca.is_some() {
            bail!(
                "`insecure` serves plaintext, but TLS files are also given (`tls_cert` / `client_ca`): drop one or the other"
            );
        }
        return Ok(Security::Insecure);
    }
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => bail!(
            "the coordinator serves TLS: give --tls-cert and --tls-key (and --client-ca for mutual TLS); `fedtune-coordinator provision --out DIR --san HOST --clients a,b` creates them and a coordinator.toml for --config. For a local test only, --insecure serves plaintext"
        ),
        (Some(_), None) => {
            bail!("--tls-cert is given without --tls-key (the certificate's private key)")
        }
        (None, Some(_)) => bail!("--tls-key is given without --tls-cert"),
    };
    if allowed_clients.is_some() && client_ca.is_none() && client_tokens.is_none() {
        bail!(
            "`allowed_clients` names authenticated clients, so it needs `client_ca` (mutual TLS) or `client_tokens`"
        );
    }
    Ok(Security::Tls(TlsFiles {
        cert,
        key,
        client_ca,
        allowed_clients,
        client_tokens,
        admins,
    }))
}
