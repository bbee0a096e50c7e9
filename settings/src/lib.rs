//! The settings files people write, and the grammars of the values in them: the coordinator's
//! `serve --config` TOML ([`ServeFile`]), a client's kit (`client.toml`, [`KitFile`]), and the
//! names and small languages their keys take (strategies, optimisers, learning-rate schedules,
//! log formats).
//!
//! This crate only parses: the coordinator merges a [`ServeFile`] with its flags and validates
//! the result against the model (which needs burn). Keeping the parsing here, free of burn, lets
//! `fuzz/` run it under a sanitizer in seconds rather than building burn with one.

mod kit_file;
mod log_format;
mod recipe;
mod serve_file;
mod strategy_kind;

use std::path::{Path, PathBuf};

pub use kit_file::KitFile;
pub use log_format::LogFormat;
pub use recipe::{LrSchedule, OptimizerKind};
pub use serve_file::{InitFile, InitTable, OnRoundFailure, ServeFile};
pub use strategy_kind::StrategyKind;

/// Why a settings file could not be used. Every variant names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{flag} {path}: cannot read: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type; `keys` lists what the file takes.
    #[error("{flag} {path}: not a valid {what} ({keys}): {source}")]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        what: &'static str,
        keys: &'static str,
        source: Box<toml::de::Error>,
    },
    /// A value parsed as TOML but not as what its key takes.
    #[error("{flag} {path}: {message}")]
    BadValue {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// Why the text of a settings file was refused, before it is tied to a path.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Toml(Box<toml::de::Error>),
    #[error("{0}")]
    Value(String),
}

/// Which file a [`ParseError`] came from, for its message.
struct FileKind {
    flag: &'static str,
    what: &'static str,
    keys: &'static str,
}

impl ParseError {
    fn at(self, path: &Path, kind: &FileKind) -> SettingsError {
        match self {
            Self::Toml(source) => SettingsError::Invalid {
                flag: kind.flag,
                path: path.to_path_buf(),
                what: kind.what,
                keys: kind.keys,
                source,
            },
            Self::Value(message) => SettingsError::BadValue {
                flag: kind.flag,
                path: path.to_path_buf(),
                message,
            },
        }
    }
}

/// Reads a UTF-8 text file for [`SettingsError::Read`]'s message.
fn read_text(flag: &'static str, path: &Path) -> Result<String, SettingsError> {
    std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}
