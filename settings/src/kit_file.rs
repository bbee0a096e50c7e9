//! A client's kit file (`fedtune-client train --config client.toml`): the connection settings
//! a provisioned kit carries (coordinator URL, name, CA, certificate and key). Its relative
//! paths are taken from the file's folder, so the kit works wherever it is copied; flags given
//! on the command line win.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{FileKind, ParseError, SettingsError};

const KIND: FileKind = FileKind {
    flag: "--config",
    what: "client.toml",
    keys: "keys: coordinator, name, ca_cert, cert, key, tls_server_name, token_file, insecure",
};

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
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
    /// Reads `path`, with its relative paths taken from the file's folder.
    pub fn read(path: &Path) -> Result<Self, SettingsError> {
        let text = crate::read_text(KIND.flag, path)?;
        let kit = Self::parse(&text).map_err(|e| e.at(path, &KIND))?;
        Ok(kit.relative_to(path.parent().unwrap_or(Path::new("."))))
    }

    /// Parses the text of a kit file; its paths stay as written.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        toml::from_str(text).map_err(|e| ParseError::Toml(Box::new(e)))
    }

    /// The kit with its relative paths joined to `dir`.
    pub fn relative_to(mut self, dir: &Path) -> Self {
        for p in [
            &mut self.ca_cert,
            &mut self.cert,
            &mut self.key,
            &mut self.token_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_taken_from_the_kit_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(
            &path,
            "coordinator = \"https://10.0.0.5:50051\"\nca_cert = \"ca.pem\"\nkey = \"/etc/k.pem\"\n",
        )
        .unwrap();
        let kit = KitFile::read(&path).unwrap();
        assert_eq!(kit.ca_cert, Some(dir.path().join("ca.pem")));
        assert_eq!(kit.key, Some(PathBuf::from("/etc/k.pem")));
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_file_and_the_keys_it_takes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(&path, "coordinatr = \"https://x:1\"\n").unwrap();
        let e = KitFile::read(&path).unwrap_err().to_string();
        assert!(e.contains("client.toml") && e.contains("coordinatr"), "{e}");
        assert!(e.contains("tls_server_name"), "{e}");
    }
}
