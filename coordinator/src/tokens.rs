//! Client tokens, for devices that cannot hold a client certificate: each client presents a
//! bearer token over server-side TLS, and the coordinator names it by the token's owner. The
//! file holds `NAME SHA256(token)` lines only (the token itself is printed once, by
//! `fedtune-coordinator token add`), is re-read when it changes (deleting a line revokes), and
//! is written 0600.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::provision::check_client_name;
use crate::watched::Watched;

/// Hash of a token → the client it names.
pub struct ClientTokens(Watched<HashMap<String, String>>);

/// What goes before a token, so that one pasted in the wrong place is recognisable.
const PREFIX: &str = "fedtune_";

fn hash(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut by_hash = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(h), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "line {}: expected `NAME SHA256`, as `fedtune-coordinator token add` writes",
                i + 1
            ));
        };
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {}: `{h}` is not a SHA-256 in hex", i + 1));
        }
        by_hash.insert(h.to_ascii_lowercase(), name.to_string());
    }
    Ok(by_hash)
}

impl ClientTokens {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self(Watched::open(path, "client tokens", parse)?))
    }

    /// The client `token` belongs to.
    pub fn owner(&self, token: &str) -> Option<String> {
        self.0.current().get(&hash(token)).cloned()
    }

    /// Whether `name` still has a token in the file.
    pub fn names(&self, name: &str) -> bool {
        self.0.current().values().any(|n| n == name)
    }
}

/// Issues a token for `name` into the file at `path` (created 0600 if missing) and returns it;
/// the file keeps only its hash. A name already in the file is refused.
pub fn add(path: &Path, name: &str) -> anyhow::Result<String> {
    check_client_name(name)?;
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
        Err(e) => bail!("{}: cannot read ({e})", path.display()),
    };
    if existing.values().any(|n| n == name) {
        bail!(
            "{}: client `{name}` already has a token; delete its line to revoke it, then add it again",
            path.display()
        );
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!(
        "{PREFIX}{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(file, "{name} {}", hash(&token))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_client_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.txt");
        let a = add(&path, "site-a").unwrap();
        let b = add(&path, "site-b").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a[PREFIX.len()..]), "{text}");
        let tokens = ClientTokens::open(&path).unwrap();
        assert_eq!(tokens.owner(&a).as_deref(), Some("site-a"));
        assert_eq!(tokens.owner(&b).as_deref(), Some("site-b"));
        assert_eq!(tokens.owner("fedtune_guess"), None);
        let again = add(&path, "site-a").unwrap_err().to_string();
        assert!(again.contains("already has a token"), "{again}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
