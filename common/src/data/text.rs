//! Labelled text from CSV, TSV or JSONL files: a text column and a label column (by default
//! `text` and `label`). Labels are class numbers, or names mapped through the run's label list
//! (`--labels neg,pos`) so that every client numbers classes the same way. Errors name the
//! file, the line and the column.

use std::path::Path;

use super::DataError;

pub const DEFAULT_TEXT_COLUMN: &str = "text";

/// Texts and their labels as written in the file.
#[derive(Debug, Clone)]
pub struct TextDataset {
    pub texts: Vec<String>,
    /// The label field of each example, as written.
    pub raw_labels: Vec<String>,
    /// The file line of each example (1-based), for messages.
    pub lines: Vec<usize>,
    pub source: String,
}

/// Which file formats hold text: by extension.
pub fn is_text_file(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("tsv" | "jsonl" | "ndjson")
    )
}

/// Whether a CSV file holds text rather than a numeric table: its header names `text_column`,
/// or its first row has a field besides `label_column` that is not a number.
pub fn csv_holds_text(path: &Path, text_column: &str, label_column: &str) -> bool {
    let Ok(mut reader) = csv::ReaderBuilder::new().has_headers(true).from_path(path) else {
        return false;
    };
    let Ok(headers) = reader.headers().cloned() else {
        return false;
    };
    if headers.iter().any(|c| c.trim() == text_column) {
        return true;
    }
    let mut first = csv::StringRecord::new();
    if !reader.read_record(&mut first).unwrap_or(false) {
        return false;
    }
    headers
        .iter()
        .zip(first.iter())
        .any(|(h, v)| h.trim() != label_column && v.trim().parse::<f64>().is_err())
}

impl TextDataset {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Reads `path` by its extension: `.jsonl`/`.ndjson` (one JSON object a line), `.tsv`
    /// (tab-separated, header row), anything else as CSV (header row).
    pub fn read(path: &Path, text_column: &str, label_column: &str) -> Result<Self, DataError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        let data = match ext.as_deref() {
            Some("jsonl" | "ndjson") => read_jsonl(path, text_column, label_column)?,
            Some("tsv") => read_delimited(path, b'\t', text_column, label_column)?,
            _ => read_delimited(path, b',', text_column, label_column)?,
        };
        if data.is_empty() {
            return Err(file_err(path, "no examples in the file".into()));
        }
        Ok(data)
    }

    /// Class numbers for every example: through `names` (the run's label list) when it is not
    /// empty, else each label must be a number below `num_classes`.
    pub fn class_numbers(&self, names: &[String], num_classes: u32) -> Result<Vec<u8>, DataError> {
        let mut out = Vec::with_capacity(self.len());
        for (raw, line) in self.raw_labels.iter().zip(&self.lines) {
            let class = if names.is_empty() {
                raw.parse::<u32>().ok().filter(|c| *c < num_classes).ok_or_else(|| {
                    self.err(format!(
                        "line {line}: label `{raw}` is not a class number below {num_classes}; give the coordinator --labels NAME,NAME,… to use label names"
                    ))
                })?
            } else if let Some(i) = names.iter().position(|n| n == raw) {
                i as u32
            } else {
                // A class number is accepted too, when it names one of the classes.
                raw.parse::<u32>()
                    .ok()
                    .filter(|c| (*c as usize) < names.len())
                    .ok_or_else(|| {
                        self.err(format!(
                            "line {line}: unknown label `{raw}`; the run's labels are {} (or their numbers 0..{})",
                            names.join(", "),
                            names.len() - 1
                        ))
                    })?
            };
            let class = u8::try_from(class).map_err(|_| {
                self.err(format!(
                    "line {line}: class {class}: fedtune handles at most 256 classes"
                ))
            })?;
            out.push(class);
        }
        Ok(out)
    }

    fn err(&self, reason: String) -> DataError {
        DataError::File {
            path: self.source.clone(),
            reason,
        }
    }
}

fn file_err(path: &Path, reason: String) -> DataError {
    DataError::File {
        path: path.display().to_string(),
        reason,
    }
}

fn read_delimited(
    path: &Path,
    delimiter: u8,
    text_column: &str,
    label_column: &str,
) -> Result<TextDataset, DataError> {
    let err = |reason: String| file_err(path, reason);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delimiter)
        // TSV corpora quote freely inside texts; only CSV uses quoting.
        .quoting(delimiter == b',')
        .flexible(false)
        .from_path(path)
        .map_err(|e| err(format!("cannot open: {e}")))?;
    let headers = reader
        .headers()
        .map_err(|e| err(format!("line 1: cannot read the header row: {e}")))?
        .clone();
    let column = |name: &str, flag: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                err(format!(
                    "line 1: no column named `{name}` (columns: {}); choose it with {flag}",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ))
            })
    };
    let text_at = column(text_column, "--text-column")?;
    let label_at = column(label_column, "--label-column")?;
    let mut data = TextDataset {
        texts: vec![],
        raw_labels: vec![],
        lines: vec![],
        source: path.display().to_string(),
    };
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            err(format!("line {line}: {e}"))
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let text = record.get(text_at).unwrap_or("").trim();
        let label = record.get(label_at).unwrap_or("").trim();
        if label.is_empty() {
            return Err(err(format!(
                "line {line}, column `{label_column}`: empty label"
            )));
        }
        data.texts.push(text.to_string());
        data.raw_labels.push(label.to_string());
        data.lines.push(line);
    }
    Ok(data)
}

fn read_jsonl(
    path: &Path,
    text_column: &str,
    label_column: &str,
) -> Result<TextDataset, DataError> {
    let err = |reason: String| file_err(path, reason);
    let content = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut data = TextDataset {
        texts: vec![],
        raw_labels: vec![],
        lines: vec![],
        source: path.display().to_string(),
    };
    for (i, raw) in content.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| err(format!("line {line}: not a JSON object: {e}")))?;
        let field = |name: &str, flag: &str| {
            value.get(name).ok_or_else(|| {
                let keys = value
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                err(format!(
                    "line {line}: no field `{name}` (fields: {keys}); choose it with {flag}"
                ))
            })
        };
        let text = match field(text_column, "--text-column")? {
            serde_json::Value::String(s) => s.trim().to_string(),
            other => {
                return Err(err(format!(
                    "line {line}, field `{text_column}`: expected a string, found {other}"
                )));
            }
        };
        let label = match field(label_column, "--label-column")? {
            serde_json::Value::String(s) => s.trim().to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(err(format!(
                    "line {line}, field `{label_column}`: expected a string or a number, found {other}"
                )));
            }
        };
        data.texts.push(text);
        data.raw_labels.push(label);
        data.lines.push(line);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn csv_tsv_and_jsonl_read_the_same_examples() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            write(
                dir.path(),
                "a.csv",
                "label,text\npos,\"Great, really\"\nneg,bad\n",
            ),
            write(
                dir.path(),
                "a.tsv",
                "text\tlabel\nGreat, really\tpos\nbad\tneg\n",
            ),
            write(
                dir.path(),
                "a.jsonl",
                "{\"text\": \"Great, really\", \"label\": \"pos\"}\n\n{\"text\": \"bad\", \"label\": \"neg\"}\n",
            ),
        ];
        for f in files {
            let d = TextDataset::read(&f, "text", "label").unwrap();
            assert_eq!(d.texts, ["Great, really", "bad"], "{}", f.display());
            let names = vec!["neg".to_string(), "pos".to_string()];
            assert_eq!(d.class_numbers(&names, 2).unwrap(), [1, 0]);
        }
    }

    #[test]
    fn a_csv_of_numbers_is_a_table_and_one_of_sentences_is_text() {
        let dir = tempfile::tempdir().unwrap();
        let table = write(dir.path(), "t.csv", "f1,f2,label\n0.5,3,1\n");
        let named = write(dir.path(), "n.csv", "text,label\n12,1\n");
        let other = write(dir.path(), "o.csv", "review,label\nnice one,1\n");
        assert!(!csv_holds_text(&table, "text", "label"));
        assert!(csv_holds_text(&named, "text", "label"));
        assert!(
            csv_holds_text(&other, "text", "label"),
            "words are not features"
        );
    }

    #[test]
    fn bad_files_name_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["neg".to_string(), "pos".to_string()];
        let f = write(dir.path(), "b.csv", "label,sentence\npos,fine\n");
        let e = TextDataset::read(&f, "text", "label")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.csv") && e.contains("no column named `text`") && e.contains("sentence"),
            "{e}"
        );
        let f = write(dir.path(), "c.csv", "label,text\npos,fine\nmeh,hmm\n");
        let d = TextDataset::read(&f, "text", "label").unwrap();
        let e = d.class_numbers(&names, 2).unwrap_err().to_string();
        assert!(
            e.contains("c.csv") && e.contains("line 3") && e.contains("`meh`"),
            "{e}"
        );
        let e = d.class_numbers(&[], 2).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("--labels"), "{e}");
        let f = write(dir.path(), "d.jsonl", "{\"text\": 3, \"label\": 1}\n");
        let e = TextDataset::read(&f, "text", "label")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("expected a string"),
            "{e}"
        );
        let f = write(dir.path(), "e.jsonl", "not json\n");
        let e = TextDataset::read(&f, "text", "label")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("not a JSON object"),
            "{e}"
        );
    }
}
