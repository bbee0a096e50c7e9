//! `--config client.toml`: the connection settings of a provisioned kit (coordinator URL,
//! name, CA, certificate and key). Its relative paths are taken from the file's folder, so the
//! kit works wherever it is copied; flags given on the command line win.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitFile {
    pub coordinator: Option<String>,
    pub name: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
}

impl KitFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config {}: cannot read", path.display()))?;
        let mut kit: Self = toml::from_str(&text).with_context(|| {
            format!(
                "--config {}: not a client.toml (keys: coordinator, name, ca_cert, cert, key, tls_server_name, token_file, insecure)",
                path.display()
            )
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut kit.ca_cert,
            &mut kit.cert,
            &mut kit.key,
            &mut kit.token_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(kit)
    }
}
