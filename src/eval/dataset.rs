//! Captioned image datasets, in the three formats BLIP's evaluation and fine-tuning meet:
//!
//! - JSON lines, one `{"image": path, "caption": text}` per line (`caption` may also be a list);
//!   lines naming the same image are merged, in first-appearance order. Optional `"wrong": bool`
//!   marks a text known to be wrong (the synthetic world's noise), for CapFilt precision/recall.
//! - BLIP annotation files (`coco_karpathy_test.json`, `flickr30k_test.json`, ...): a JSON array
//!   of `{"image": "val2014/x.jpg", "caption": [..] | "..."}`, other fields ignored; entries
//!   naming the same image are merged.
//! - Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`: `{"images": [{"filepath",
//!   "filename", "split", "sentences": [{"raw"}]}]}` (`filepath` is absent in the Flickr file);
//!   only the images of the chosen split are read (`restval` is a split of its own).
//!
//! Image paths are kept as written and resolved against an images root ([`Dataset::resolve`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::error::{EvalError, Result};

/// One text of a dataset item.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetText {
    /// The caption as written.
    pub text: String,
    /// Whether it is known to be wrong (JSON lines `"wrong"`), when the file says.
    pub wrong: Option<bool>,
}

/// An image and its captions.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetItem {
    /// The image path as written in the file.
    pub image: String,
    /// Its captions, in file order (at least one).
    pub texts: Vec<DatasetText>,
    /// The 1-based line (JSON lines) or 0-based entry index where the image first appears.
    pub origin: usize,
}

/// The file layouts [`Dataset::load`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// One JSON object per line.
    JsonLines,
    /// A JSON array of `{"image", "caption"}` (BLIP annotations).
    Annotations,
    /// Karpathy's `{"images": [...]}` split file.
    Karpathy,
}

/// A captioned image dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its layout.
    pub format: DatasetFormat,
    /// The images with their captions, in file order.
    pub items: Vec<DatasetItem>,
}

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

#[derive(Deserialize)]
struct Entry {
    image: String,
    caption: Captions,
    #[serde(default)]
    wrong: Option<bool>,
}

#[derive(Deserialize)]
struct KarpathySentence {
    raw: String,
}

#[derive(Deserialize)]
struct KarpathyImage {
    #[serde(default)]
    filepath: Option<String>,
    filename: String,
    split: String,
    sentences: Vec<KarpathySentence>,
}

#[derive(Deserialize)]
struct KarpathyFile {
    images: Vec<KarpathyImage>,
}

/// Items keyed by image, kept in first-appearance order.
#[derive(Default)]
struct Builder {
    items: Vec<DatasetItem>,
    by_image: HashMap<String, usize>,
}

impl Builder {
    fn push(&mut self, image: String, texts: Vec<String>, wrong: Option<bool>, origin: usize) {
        let texts = texts.into_iter().map(|text| DatasetText { text, wrong });
        match self.by_image.get(&image) {
            Some(&i) => self.items[i].texts.extend(texts),
            None => {
                self.by_image.insert(image.clone(), self.items.len());
                self.items.push(DatasetItem {
                    image,
                    texts: texts.collect(),
                    origin,
                });
            }
        }
    }
}

impl Dataset {
    /// Reads a dataset, telling the format from the content. `split` selects the images of a
    /// Karpathy file (it must be given for that format) and is refused for the others, which have
    /// no splits.
    pub fn load(path: &Path, split: Option<&str>) -> Result<Dataset> {
        let text = fs_err::read_to_string(path)?;
        Self::parse(&text, path, split)
    }

    /// [`Dataset::load`] on text already read; `path` names it in errors.
    pub fn parse(text: &str, path: &Path, split: Option<&str>) -> Result<Dataset> {
        let err = |line: Option<usize>, message: String| EvalError::Dataset {
            path: path.to_path_buf(),
            line,
            message,
        };
        let trimmed = text.trim_start();
        let (format, items) = if trimmed.starts_with('[') {
            let entries: Vec<Value> = serde_json::from_str(text)
                .map_err(|e| err(None, format!("not a JSON array of annotations: {e}")))?;
            let mut b = Builder::default();
            for (i, v) in entries.into_iter().enumerate() {
                let e: Entry = serde_json::from_value(v).map_err(|e| {
                    err(
                        None,
                        format!("entry {i}: {e} (want {{\"image\": path, \"caption\": text or [texts]}})"),
                    )
                })?;
                b.push(e.image, e.caption.into_vec(), e.wrong, i);
            }
            (DatasetFormat::Annotations, b.items)
        } else if let Some(Ok(Value::Object(map))) = trimmed
            .starts_with('{')
            .then(|| serde_json::from_str::<Value>(text))
            .filter(|v| matches!(v, Ok(Value::Object(m)) if m.contains_key("images")))
        {
            let file: KarpathyFile = serde_json::from_value(Value::Object(map))
                .map_err(|e| err(None, format!("not a Karpathy split file: {e}")))?;
            let split = split.ok_or_else(|| {
                err(
                    None,
                    "a Karpathy split file: choose the images with --split (test, val, train, restval)"
                        .into(),
                )
            })?;
            let mut b = Builder::default();
            for (i, img) in file.images.into_iter().enumerate() {
                if img.split != split {
                    continue;
                }
                let image = match img.filepath.filter(|p| !p.is_empty()) {
                    Some(dir) => format!("{dir}/{}", img.filename),
                    None => img.filename,
                };
                let texts = img.sentences.into_iter().map(|s| s.raw).collect();
                b.push(image, texts, None, i);
            }
            if b.items.is_empty() {
                return Err(err(None, format!("no images in split {split:?}")));
            }
            (DatasetFormat::Karpathy, b.items)
        } else {
            let mut b = Builder::default();
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
                b.push(e.image, e.caption.into_vec(), e.wrong, n);
            }
            (DatasetFormat::JsonLines, b.items)
        };
        if format != DatasetFormat::Karpathy {
            if let Some(s) = split {
                return Err(err(
                    None,
                    format!("--split {s:?} given, but only Karpathy split files have splits"),
                ));
            }
        }
        if items.is_empty() {
            return Err(err(None, "no images in the dataset".into()));
        }
        for item in &items {
            let line = (format == DatasetFormat::JsonLines).then_some(item.origin);
            if item.image.trim().is_empty() {
                return Err(err(line, "an entry has an empty image path".into()));
            }
            if item.texts.is_empty() {
                return Err(err(line, format!("image {} has no captions", item.image)));
            }
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            format,
            items,
        })
    }

    /// The file path of an item's image: absolute paths as they are, others under `root`.
    pub fn resolve(&self, root: &Path, item: &DatasetItem) -> PathBuf {
        let p = Path::new(&item.image);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    }

    /// Number of texts over all items.
    pub fn text_count(&self) -> usize {
        self.items.iter().map(|i| i.texts.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, split: Option<&str>) -> Result<Dataset> {
        Dataset::parse(text, Path::new("d.json"), split)
    }

    #[test]
    fn json_lines_merge_images_and_keep_labels() {
        let d = parse(
            "{\"image\":\"a.png\",\"caption\":\"one\"}\n\n{\"image\":\"b.png\",\"caption\":\"two\",\"wrong\":true}\n{\"image\":\"a.png\",\"caption\":[\"three\",\"four\"]}\n",
            None,
        )
        .unwrap();
        assert_eq!(d.format, DatasetFormat::JsonLines);
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].image, "a.png");
        let a: Vec<&str> = d.items[0].texts.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(a, ["one", "three", "four"]);
        assert_eq!(d.items[1].texts[0].wrong, Some(true));
        assert_eq!(d.items[0].texts[0].wrong, None);
        assert_eq!(d.items[1].origin, 3);
        assert_eq!(d.text_count(), 4);
    }

    #[test]
    fn a_malformed_line_is_named() {
        let e = parse(
            "{\"image\":\"a.png\",\"caption\":\"one\"}\n{\"image\":\"b.png\",\"caption\":\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("d.json line 2"), "{e}");
        let e = parse("{\"image\":\"a.png\"}\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("caption"), "{e}");
        let e = parse("{\"image\":\"a.png\",\"caption\":[]}\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("no captions"), "{e}");
        assert!(parse("\n\n", None).is_err());
    }

    #[test]
    fn blip_annotation_arrays() {
        let d = parse(
            r#"[{"image":"val2014/x.jpg","caption":["a","b"],"image_id":"x"},
                {"image":"val2014/y.jpg","caption":"c"}]"#,
            None,
        )
        .unwrap();
        assert_eq!(d.format, DatasetFormat::Annotations);
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].texts.len(), 2);
        assert_eq!(d.items[1].texts[0].text, "c");
        let e = parse(r#"[{"image":"x.jpg"}]"#, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("entry 0"), "{e}");
        assert!(parse(r#"[{"image":"x.jpg","caption":"a"}]"#, Some("test")).is_err());
        assert!(parse("[1, 2", None).is_err());
    }

    #[test]
    fn karpathy_split_files() {
        let text = r#"{"dataset":"coco","images":[
            {"filepath":"val2014","filename":"a.jpg","split":"test","sentences":[{"raw":"A cat.","tokens":["a","cat"]},{"raw":"a kitten"}]},
            {"filepath":"train2014","filename":"b.jpg","split":"train","sentences":[{"raw":"a dog"}]},
            {"filename":"c.jpg","split":"test","sentences":[{"raw":"a bird"}]}]}"#;
        let d = parse(text, Some("test")).unwrap();
        assert_eq!(d.format, DatasetFormat::Karpathy);
        let images: Vec<&str> = d.items.iter().map(|i| i.image.as_str()).collect();
        assert_eq!(images, ["val2014/a.jpg", "c.jpg"]);
        assert_eq!(d.items[0].texts[0].text, "A cat.");
        assert_eq!(parse(text, Some("train")).unwrap().items.len(), 1);
        let e = parse(text, None).unwrap_err().to_string();
        assert!(e.contains("--split"), "{e}");
        let e = parse(text, Some("val")).unwrap_err().to_string();
        assert!(e.contains("no images in split"), "{e}");
    }

    #[test]
    fn resolve_keeps_absolute_paths() {
        let d = parse("{\"image\":\"/abs/a.png\",\"caption\":\"x\"}\n{\"image\":\"rel/b.png\",\"caption\":\"y\"}", None).unwrap();
        assert_eq!(
            d.resolve(Path::new("/root"), &d.items[0]),
            Path::new("/abs/a.png")
        );
        assert_eq!(
            d.resolve(Path::new("/root"), &d.items[1]),
            Path::new("/root/rel/b.png")
        );
    }
}
