//! The one reader of captioned-image dataset files, behind training's [`super::data::Dataset`],
//! evaluation's `eval::dataset::Dataset` and the files the synthetic world writes
//! (`eval::synth`). The layout is told from the content:
//!
//! - JSON lines, one `{"image": path, "caption": text or [texts]}` per line, with optional
//!   `"wrong": bool` (a text known to be wrong), `"image_id"` (string or number: what the picture
//!   shows, BLIP's `idx`) and `"also_matches": [image_id, ...]` (other pictures a partial caption
//!   describes);
//! - BLIP annotation files (`coco_karpathy_train.json`, `coco_karpathy_test.json`,
//!   `flickr30k_test.json`, ...): a JSON array of `{"image", "caption": text or [texts]}`, with
//!   the same optional `"wrong"` and `"image_id"`, other fields ignored;
//! - Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`: `{"images": [{"filepath",
//!   "filename", "split", "sentences": [{"raw"}]}]}` (`filepath` is absent in the Flickr file).
//!
//! The reader keeps every entry as written, in file order; choosing splits, merging entries of
//! one image and grouping pairs are the callers' business.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A malformed dataset file.
#[derive(Debug, thiserror::Error)]
#[error("{path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct DatasetFileError {
    /// The dataset file.
    pub path: PathBuf,
    /// The 1-based line, for JSON lines files.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// The file layouts the reader understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// One JSON object per line.
    JsonLines,
    /// A JSON array of `{"image", "caption"}` (BLIP annotations).
    Annotations,
    /// Karpathy's `{"images": [...]}` split file.
    Karpathy,
}

/// One entry of a dataset file: a line, an array element or a Karpathy image.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetEntry {
    /// The image path as written (Karpathy: `filepath/filename`).
    pub image: String,
    /// Its captions, in file order (may be empty when the file gives an empty list).
    pub captions: Vec<String>,
    /// Whether the captions are known to be wrong (`"wrong"`), when the file says.
    pub wrong: Option<bool>,
    /// The `"image_id"` given, as text (numbers written in decimal).
    pub image_id: Option<String>,
    /// The `"also_matches"` ids, as text.
    pub also_matches: Vec<String>,
    /// The Karpathy split (`train`, `restval`, `val`, `test`), when the file gives one.
    pub split: Option<String>,
    /// The 1-based line (JSON lines) or 0-based entry index (the JSON documents).
    pub origin: usize,
}

/// A dataset file as read.
#[derive(Debug, Clone)]
pub struct DatasetFile {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its layout.
    pub format: DatasetFormat,
    /// Its entries, in file order.
    pub entries: Vec<DatasetEntry>,
}

/// One caption or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Captions {
    One(String),
    Many(Vec<String>),
}

impl Captions {
    fn into_vec(self) -> Vec<String> {
        match self {
            Captions::One(s) => vec![s],
            Captions::Many(v) => v,
        }
    }
}

/// A JSON lines record or a BLIP annotation entry.
#[derive(Deserialize)]
struct Entry {
    image: String,
    caption: Captions,
    #[serde(default)]
    wrong: Option<bool>,
    #[serde(default)]
    image_id: Option<Value>,
    #[serde(default)]
    also_matches: Option<Value>,
}

/// A BLIP annotation entry as written (`[{"image", "caption": [..]}]`).
#[derive(Debug, Clone, Serialize)]
pub struct AnnotationEntry {
    /// The image path.
    pub image: String,
    /// Its captions.
    pub caption: Vec<String>,
}

/// A sentence of a Karpathy image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KarpathySentence {
    /// The caption as written.
    pub raw: String,
}

/// An image of a Karpathy split file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KarpathyImage {
    /// The folder of the image (absent in the Flickr file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filepath: Option<String>,
    /// The image file name.
    pub filename: String,
    /// `train`, `restval`, `val` or `test`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Its captions.
    pub sentences: Vec<KarpathySentence>,
}

/// A Karpathy split file (`dataset_coco.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KarpathyFile {
    /// The dataset's name (`coco`, `flickr30k`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Every image, of every split.
    pub images: Vec<KarpathyImage>,
}

/// An id as text: strings as they are, numbers in decimal; anything else is not an id.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Entry {
    /// The entry with its ids checked; errors are the reason only.
    fn into_dataset_entry(self, origin: usize) -> std::result::Result<DatasetEntry, String> {
        let image_id = match &self.image_id {
            None => None,
            Some(v) => Some(id_text(v).ok_or("\"image_id\" must be a string or a number")?),
        };
        let also_matches = match &self.also_matches {
            None => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(id_text)
                .collect::<Option<Vec<_>>>()
                .ok_or("\"also_matches\" must list strings or numbers")?,
            Some(_) => return Err("\"also_matches\" must be a list of image ids".into()),
        };
        Ok(DatasetEntry {
            image: self.image,
            captions: self.caption.into_vec(),
            wrong: self.wrong,
            image_id,
            also_matches,
            split: None,
            origin,
        })
    }
}

impl DatasetFile {
    /// Parses the text of a dataset file (the caller reads it, and reports IO errors as its layer
    /// does); `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> std::result::Result<DatasetFile, DatasetFileError> {
        let err = |line: Option<usize>, message: String| DatasetFileError {
            path: path.to_path_buf(),
            line,
            message,
        };
        let trimmed = text.trim_start();
        let (format, entries) = if trimmed.starts_with('[') {
            let values: Vec<Value> = serde_json::from_str(text)
                .map_err(|e| err(None, format!("not a JSON array of annotations: {e}")))?;
            let mut entries = Vec::with_capacity(values.len());
            for (i, v) in values.into_iter().enumerate() {
                let e: Entry = serde_json::from_value(v).map_err(|e| {
                    err(
                        None,
                        format!("entry {i}: {e} (want {{\"image\": path, \"caption\": text or [texts]}})"),
                    )
                })?;
                entries.push(
                    e.into_dataset_entry(i)
                        .map_err(|reason| err(None, format!("entry {i}: {reason}")))?,
                );
            }
            (DatasetFormat::Annotations, entries)
        } else if let Some(Ok(doc)) = trimmed
            .starts_with('{')
            .then(|| serde_json::from_str::<Value>(text))
            .filter(|v| matches!(v, Ok(Value::Object(m)) if m.contains_key("images")))
        {
            let file: KarpathyFile = serde_json::from_value(doc)
                .map_err(|e| err(None, format!("not a Karpathy split file: {e}")))?;
            let entries = file
                .images
                .into_iter()
                .enumerate()
                .map(|(i, img)| DatasetEntry {
                    image: match img.filepath.filter(|p| !p.is_empty()) {
                        Some(dir) => format!("{dir}/{}", img.filename),
                        None => img.filename,
                    },
                    captions: img.sentences.into_iter().map(|s| s.raw).collect(),
                    wrong: None,
                    image_id: None,
                    also_matches: Vec::new(),
                    split: img.split,
                    origin: i,
                })
                .collect();
            (DatasetFormat::Karpathy, entries)
        } else {
            let mut entries = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let n = i + 1;
                if line.trim().is_empty() {
                    continue;
                }
                let e: Entry = serde_json::from_str(line).map_err(|e| {
                    err(
                        Some(n),
                        format!("{e} (want {{\"image\": path, \"caption\": text}})"),
                    )
                })?;
                entries.push(e.into_dataset_entry(n).map_err(|r| err(Some(n), r))?);
            }
            (DatasetFormat::JsonLines, entries)
        };
        Ok(DatasetFile {
            path: path.to_path_buf(),
            format,
            entries,
        })
    }

    /// An error about this file, at the line of `origin` for JSON lines files.
    pub fn error(&self, origin: Option<usize>, message: String) -> DatasetFileError {
        DatasetFileError {
            path: self.path.clone(),
            line: origin.filter(|_| self.format == DatasetFormat::JsonLines),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<DatasetFile, DatasetFileError> {
        DatasetFile::parse(text, Path::new("d.json"))
    }

    #[test]
    fn the_layout_is_told_from_the_content() {
        let f = parse("{\"image\":\"a.png\",\"caption\":[\"x\",\"y\"],\"image_id\":7}\n").unwrap();
        assert_eq!(f.format, DatasetFormat::JsonLines);
        assert_eq!(f.entries[0].captions, ["x", "y"]);
        assert_eq!(f.entries[0].image_id.as_deref(), Some("7"));
        assert_eq!(f.entries[0].origin, 1);
        let f = parse(r#"[{"image":"a.png","caption":"x","wrong":true}]"#).unwrap();
        assert_eq!(f.format, DatasetFormat::Annotations);
        assert_eq!(f.entries[0].wrong, Some(true));
        let f = parse(r#"{"images":[{"filepath":"","filename":"a.png","sentences":[]}]}"#).unwrap();
        assert_eq!(f.format, DatasetFormat::Karpathy);
        assert_eq!(
            (f.entries[0].image.as_str(), f.entries[0].split.as_deref()),
            ("a.png", None)
        );
    }

    #[test]
    fn ids_must_be_strings_or_numbers() {
        let e = parse(r#"[{"image":"a.png","caption":"x","image_id":{}}]"#).unwrap_err();
        assert!(e.to_string().contains("entry 0: \"image_id\""), "{e}");
        let e = parse("{\"image\":\"a.png\",\"caption\":\"x\",\"also_matches\":7}\n").unwrap_err();
        assert!(
            e.to_string().contains("d.json line 1: \"also_matches\""),
            "{e}"
        );
    }
}
