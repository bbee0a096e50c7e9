//! What the targets share: the fuzz input as a file (the readers take paths, as fedtune
//! opens them), and the input cut into length-prefixed messages.

#![allow(dead_code)]

use std::path::PathBuf;

/// A folder of this process's own, emptied.
pub fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedtune-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the fuzz folder");
    dir
}

/// `data` written to `name` in a fresh folder.
pub fn file_with(data: &[u8], name: &str) -> PathBuf {
    let path = fresh_dir().join(name);
    std::fs::write(&path, data).expect("write the fuzz input");
    path
}

/// The input as messages, each a little-endian u16 length then that many bytes (a short last
/// one is cut).
pub fn messages(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        data = &data[2..];
        let n = len.min(data.len());
        out.push(&data[..n]);
        data = &data[n..];
    }
    out
}
