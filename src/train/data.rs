//! Caption datasets: JSON lines `{"image": path, "caption": text}`, or one JSON document in the
//! COCO Karpathy style (BLIP's `coco_karpathy_train.json`: a list of `{"image", "caption"}` with
//! one caption or a list; or Karpathy's `dataset_coco.json`: `{"images": [{"filepath",
//! "filename", "sentences": [{"raw"}], "split"}]}`, of which the `train` and `restval` splits are
//! used).
//!
//! Images are decoded and preprocessed once, up front: a missing or unreadable image is reported
//! (with its path and the reason) and its pairs are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::{Result, TrainError};
use crate::model::preprocess::{load_image, pixel_values, DecodeLimits};

/// One (image, caption) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Index of the image in [`Dataset::images`] (pairs of one image share it: ITC positives).
    pub image: usize,
    /// The caption as written in the file.
    pub caption: String,
}

/// A caption dataset with its images preprocessed.
pub struct Dataset {
    /// Image paths (resolved against the images root).
    pub images: Vec<PathBuf>,
    /// Preprocessed pixels `(3, S, S)` per image.
    pub pixels: Vec<Tensor>,
    /// The pairs whose image could be read.
    pub pairs: Vec<Pair>,
    /// Images that could not be used, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

#[derive(Deserialize)]
struct Line {
    image: String,
    caption: String,
}

/// Reads the (image, caption) records of a dataset file, in file order.
pub fn read_records(path: &Path) -> Result<Vec<(String, String)>> {
    let text = fs_err::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !is_jsonl {
        if let Ok(doc) = serde_json::from_str::<Value>(&text) {
            if doc.is_array() || doc.get("images").is_some() {
                return karpathy(path, &doc);
            }
        }
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: Line = serde_json::from_str(line).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("expected {{\"image\": path, \"caption\": text}}: {e}"),
        })?;
        out.push((rec.image, rec.caption));
    }
    if out.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            reason: "no (image, caption) pairs".into(),
        });
    }
    Ok(out)
}

fn karpathy(path: &Path, doc: &Value) -> Result<Vec<(String, String)>> {
    let bad = |i: usize, what: &str| TrainError::Data {
        path: path.to_path_buf(),
        line: 0,
        reason: format!("entry {i}: {what}"),
    };
    let mut out = Vec::new();
    if let Some(list) = doc.as_array() {
        for (i, e) in list.iter().enumerate() {
            let image = e
                .get("image")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(i, "no \"image\" string"))?;
            match e.get("caption") {
                Some(Value::String(c)) => out.push((image.to_string(), c.clone())),
                Some(Value::Array(cs)) => {
                    for c in cs {
                        let c = c
                            .as_str()
                            .ok_or_else(|| bad(i, "a caption is not a string"))?;
                        out.push((image.to_string(), c.to_string()));
                    }
                }
                _ => return Err(bad(i, "no \"caption\" string or list")),
            }
        }
    } else if let Some(list) = doc.get("images").and_then(Value::as_array) {
        for (i, e) in list.iter().enumerate() {
            let split = e.get("split").and_then(Value::as_str).unwrap_or("train");
            if split != "train" && split != "restval" {
                continue;
            }
            let file = e
                .get("filename")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(i, "no \"filename\""))?;
            let image = match e.get("filepath").and_then(Value::as_str) {
                Some(dir) => format!("{dir}/{file}"),
                None => file.to_string(),
            };
            let sentences = e
                .get("sentences")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(i, "no \"sentences\" list"))?;
            for s in sentences {
                let raw = s
                    .get("raw")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(i, "a sentence has no \"raw\" text"))?;
                out.push((image.clone(), raw.to_string()));
            }
        }
    }
    if out.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            reason: "no (image, caption) pairs (in the train/restval splits)".into(),
        });
    }
    Ok(out)
}

impl Dataset {
    /// Reads `path` and preprocesses its images to `image_size` (relative image paths are taken
    /// from `images_root`, else from the dataset file's folder). Unusable images are logged and
    /// skipped; it is an error only when none is usable.
    pub fn load(
        path: &Path,
        images_root: Option<&Path>,
        image_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let records = read_records(path)?;
        let root = match images_root {
            Some(r) => r.to_path_buf(),
            None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let mut index: HashMap<String, Option<usize>> = HashMap::new();
        let mut images = Vec::new();
        let mut pixels = Vec::new();
        let mut skipped = Vec::new();
        let mut pairs = Vec::new();
        for (image, caption) in records {
            let slot = match index.get(&image) {
                Some(s) => *s,
                None => {
                    let full = root.join(&image);
                    let loaded = load_image(&full, DecodeLimits::default())
                        .and_then(|img| pixel_values(&[img], image_size, device));
                    let slot = match loaded {
                        Ok(px) => {
                            images.push(full);
                            pixels.push(px.squeeze(0)?);
                            Some(images.len() - 1)
                        }
                        Err(e) => {
                            tracing::warn!("skipping image {}: {e}", full.display());
                            skipped.push((full, e.to_string()));
                            None
                        }
                    };
                    index.insert(image, slot);
                    slot
                }
            };
            if let Some(image) = slot {
                pairs.push(Pair { image, caption });
            }
        }
        if pairs.is_empty() {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("none of the {} images could be read", skipped.len()),
            });
        }
        Ok(Self {
            images,
            pixels,
            pairs,
            skipped,
        })
    }

    /// Stacks the pixels of `images` into `(B, 3, S, S)`.
    pub fn batch_pixels(&self, images: &[usize]) -> Result<Tensor> {
        let ts: Vec<&Tensor> = images.iter().map(|&i| &self.pixels[i]).collect();
        Ok(Tensor::stack(&ts, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"image\": \"a.png\", \"caption\": \"x\"}\n\n{\"image\": \"b.png\"\n",
        )
        .unwrap();
        let e = read_records(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:3:"), "{e}");
    }

    #[test]
    fn karpathy_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        std::fs::write(
            &p,
            r#"[{"image": "a.jpg", "caption": ["one", "two"], "image_id": "1"},
                {"image": "b.jpg", "caption": "three"}]"#,
        )
        .unwrap();
        let r = read_records(&p).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], ("a.jpg".into(), "two".into()));
        std::fs::write(
            &p,
            r#"{"images": [{"filepath": "train2014", "filename": "a.jpg", "split": "train",
                 "sentences": [{"raw": "A cat."}]},
                {"filepath": "val2014", "filename": "b.jpg", "split": "test",
                 "sentences": [{"raw": "A dog."}]}]}"#,
        )
        .unwrap();
        let r = read_records(&p).unwrap();
        assert_eq!(r, vec![("train2014/a.jpg".into(), "A cat.".into())]);
    }
}
