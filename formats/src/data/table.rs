//! Tabular data from a CSV file with a header row: every column but the label is a numeric
//! feature, used as it is (scale features beforehand); the label column holds class numbers
//! 0..K-1. Errors name the file, the line and the column.

use std::path::Path;

use super::{DataError, ImageDataset};

pub const DEFAULT_LABEL_COLUMN: &str = "label";

pub fn read_csv(path: &Path, label_column: &str) -> Result<ImageDataset, DataError> {
    let err = |reason: String| DataError::File {
        path: path.display().to_string(),
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| err(format!("cannot open: {e}")))?;
    let headers = reader
        .headers()
        .map_err(|e| err(format!("line 1: cannot read the header row: {e}")))?
        .clone();
    let label_at = headers.iter().position(|h| h == label_column).ok_or_else(|| {
        err(format!(
            "line 1: no column named `{label_column}` (columns: {}); choose the label column with --label-column",
            headers.iter().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let features = headers.len() - 1;
    if features == 0 {
        return Err(err(
            "line 1: there is no feature column besides the label".into()
        ));
    }
    let (mut values, mut labels) = (Vec::new(), Vec::new());
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| err(format!("line {line}: {e}")))?;
        if record.len() != headers.len() {
            return Err(err(format!(
                "line {line}: {} fields, the header has {}",
                record.len(),
                headers.len()
            )));
        }
        for (col, field) in record.iter().enumerate() {
            if col == label_at {
                let label: u8 = field.parse().map_err(|_| {
                    err(format!(
                        "line {line}, column `{label_column}`: label `{field}` is not a class number 0..255"
                    ))
                })?;
                labels.push(label);
            } else {
                let v: f32 = field
                    .parse()
                    .ok()
                    .filter(|v: &f32| v.is_finite())
                    .ok_or_else(|| {
                        err(format!(
                            "line {line}, column `{}`: `{field}` is not a finite number",
                            &headers[col]
                        ))
                    })?;
                values.push(v);
            }
        }
    }
    if labels.is_empty() {
        return Err(err("no data rows after the header".into()));
    }
    Ok(ImageDataset {
        images: Vec::new(),
        labels,
        rows: 1,
        cols: features,
        source: path.display().to_string(),
        tabular: Some(values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_features_and_labels_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("iris.csv");
        std::fs::write(&p, "sepal, species, petal\n1.5, 0, -2\n3, 2, 4.25\n").unwrap();
        let set = read_csv(&p, "species").unwrap();
        assert_eq!(set.labels, vec![0, 2]);
        assert_eq!((set.rows, set.cols), (1, 2));
        assert_eq!(set.features(1).unwrap(), [3.0, 4.25]);

        let e = read_csv(&p, "label").unwrap_err().to_string();
        assert!(
            e.contains("no column named `label`") && e.contains("species"),
            "{e}"
        );
        std::fs::write(&p, "a,label\n1,0\nx,1\n").unwrap();
        let e = read_csv(&p, "label").unwrap_err().to_string();
        assert!(e.contains("line 3, column `a`") && e.contains("`x`"), "{e}");
        std::fs::write(&p, "a,label\n1,cat\n").unwrap();
        let e = read_csv(&p, "label").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`cat`"), "{e}");
        std::fs::write(&p, "a,label\n1,0,9\n").unwrap();
        let e = read_csv(&p, "label").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
