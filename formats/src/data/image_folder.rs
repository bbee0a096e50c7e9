//! An image-folder data set: `<dir>/<class>/<file>.png|jpg|jpeg`, read with the `image` crate,
//! converted to grey and resized to the model's size.
//!
//! Labels: class folders named `0`, `1`, ... take that number; otherwise classes are numbered in
//! alphabetical order of their folder names — then every client must hold the same set of class
//! folders (empty ones are fine), or the numbers would disagree between clients.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::{DataError, ImageDataset};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn class_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .filter(|p| {
                    !p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Whether `dir` holds class folders with images in them.
pub fn looks_like_one(dir: &Path) -> bool {
    class_dirs(dir).iter().any(|d| {
        std::fs::read_dir(d)
            .map(|es| es.flatten().any(|e| is_image(&e.path())))
            .unwrap_or(false)
    })
}

/// Reads every image under `dir`'s class folders as `size × size` grey.
pub fn read(dir: &Path, size: usize) -> Result<ImageDataset, DataError> {
    let err = |path: &Path, reason: String| DataError::File {
        path: path.display().to_string(),
        reason,
    };
    let classes = class_dirs(dir);
    if classes.is_empty() {
        return Err(err(
            dir,
            "no class folders (expected <class>/<file>.png|jpg)".into(),
        ));
    }
    if classes.len() > 256 {
        return Err(err(
            dir,
            format!("{} class folders; at most 256 are supported", classes.len()),
        ));
    }
    let names: Vec<String> = classes
        .iter()
        .map(|c| {
            c.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let numeric: Option<Vec<u8>> = names.iter().map(|n| n.parse::<u8>().ok()).collect();
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for (k, class) in classes.iter().enumerate() {
        let label = match &numeric {
            Some(numbers) => numbers[k],
            None => k as u8,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(class)
            .map_err(|e| err(class, format!("cannot read the class folder: {e}")))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_image(p))
            .collect();
        files.sort();
        for f in files {
            let img = image::open(&f)
                .map_err(|e| err(&f, format!("cannot decode the image: {e}")))?
                .to_luma8();
            let img = if (img.width() as usize, img.height() as usize) == (size, size) {
                img
            } else {
                image::imageops::resize(&img, size as u32, size as u32, FilterType::Triangle)
            };
            images.extend_from_slice(img.as_raw());
            labels.push(label);
        }
    }
    if labels.is_empty() {
        return Err(err(
            dir,
            "the class folders hold no .png or .jpg files".into(),
        ));
    }
    if numeric.is_none() {
        tracing::info!(
            "{}: classes numbered alphabetically: {}",
            dir.display(),
            names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{i}={n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ImageDataset {
        images,
        labels,
        rows: size,
        cols: size,
        source: dir.display().to_string(),
        tabular: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resizes_labels_and_names_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("boot", 2), ("shirt", 1)] {
            let d = dir.path().join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let img =
                    image::RgbImage::from_fn(56, 40, |x, _| image::Rgb([(x * 4) as u8, 0, 0]));
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
        std::fs::write(dir.path().join("shirt/notes.txt"), "ignored").unwrap();
        assert!(looks_like_one(dir.path()));
        let set = read(dir.path(), 28).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.labels, vec![0, 0, 1], "alphabetical: boot=0, shirt=1");
        assert_eq!((set.rows, set.cols), (28, 28));
        assert_eq!(set.images.len(), 3 * 28 * 28);
        // A red gradient becomes a grey gradient: brighter to the right.
        assert!(set.image(0)[27] > set.image(0)[0]);

        std::fs::write(dir.path().join("boot/broken.jpg"), b"not a jpeg").unwrap();
        let e = read(dir.path(), 28).unwrap_err().to_string();
        assert!(
            e.contains("broken.jpg") && e.contains("cannot decode"),
            "{e}"
        );

        // Numeric class folders keep their numbers.
        let num = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(num.path().join("7")).unwrap();
        image::GrayImage::new(28, 28)
            .save(num.path().join("7/a.png"))
            .unwrap();
        assert_eq!(read(num.path(), 28).unwrap().labels, vec![7]);
    }
}
