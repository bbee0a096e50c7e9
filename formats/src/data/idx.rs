//! IDX files (the MNIST / Fashion-MNIST format), gzipped or not.
//!
//! Layout: two zero bytes, a type byte (0x08 = u8), a rank byte, `rank` big-endian u32
//! dimensions, then the values. Images are rank 3 (`n x rows x cols`), labels rank 1.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// A problem with one data file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct IdxError {
    pub path: PathBuf,
    pub reason: String,
}

fn err(path: &Path, reason: impl Into<String>) -> IdxError {
    IdxError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The dimensions and raw u8 values of one IDX file.
#[derive(Debug)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub values: Vec<u8>,
}

/// Reads an IDX file of u8 values; gzip is detected by its magic bytes, not the file name.
pub fn read(path: &Path) -> Result<IdxArray, IdxError> {
    let raw = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| err(path, format!("corrupt gzip data: {e}")))?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|reason| err(path, reason))
}

fn parse(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(
            "not an IDX file (it must start with two zero bytes, a type byte and a rank byte)"
                .into(),
        );
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX value type 0x{:02x} is not supported (only 0x08, unsigned bytes)",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(format!(
            "header declares rank {rank} but the file ends after {} bytes",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let actual = bytes.len() - header;
    if actual != expected {
        return Err(format!(
            "dimensions {dims:?} need {expected} values but the file holds {actual}"
        ));
    }
    Ok(IdxArray {
        dims,
        values: bytes[header..].to_vec(),
    })
}

/// Writes u8 values as an uncompressed IDX file.
pub fn write(path: &Path, dims: &[usize], values: &[u8]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&[0, 0, 0x08, dims.len() as u8])?;
    for &d in dims {
        f.write_all(&(d as u32).to_be_bytes())?;
    }
    f.write_all(values)?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x-images-idx3-ubyte");
        write(&p, &[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.values[11], 12);
        let gz = dir.path().join("x-images-idx3-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        enc.write_all(&std::fs::read(&p).unwrap()).unwrap();
        enc.finish().unwrap();
        assert_eq!(read(&gz).unwrap().values, a.values);
    }

    #[test]
    fn malformed_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad");
        std::fs::write(&p, [0, 0, 8, 1, 0, 0, 0, 5, 1, 2]).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad") && e.contains("need 5 values but the file holds 2"),
            "{e}"
        );
        std::fs::write(&p, b"hello world").unwrap();
        assert!(
            read(&p)
                .unwrap_err()
                .to_string()
                .contains("not an IDX file")
        );
        std::fs::write(&p, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("corrupt gzip"));
    }
}
