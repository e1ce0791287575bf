//! Captioned image datasets for evaluation, read by [`crate::train::dataset_file`] in the three
//! formats BLIP's evaluation and fine-tuning meet (JSON lines, BLIP annotation arrays, Karpathy
//! split files), as images with their texts:
//!
//! - entries naming the same image are merged, in first-appearance order;
//! - `"wrong": bool` marks a text known to be wrong (the synthetic world's noise), for CapFilt
//!   precision/recall;
//! - of a Karpathy file only the images of the chosen split are read (`restval` is a split of
//!   its own); the other formats have no splits.
//!
//! Image paths are kept as written and resolved against an images root ([`Dataset::resolve`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::Result;
use crate::train::dataset_file::DatasetFile;
pub use crate::train::dataset_file::DatasetFormat;

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
        let file = DatasetFile::parse(text, path)?;
        let format = file.format;
        let mut b = Builder::default();
        if format == DatasetFormat::Karpathy {
            let split = split.ok_or_else(|| {
                file.error(
                    None,
                    "a Karpathy split file: choose the images with --split (test, val, train, restval)"
                        .into(),
                )
            })?;
            for e in file
                .entries
                .iter()
                .filter(|e| e.split.as_deref() == Some(split))
            {
                b.push(e.image.clone(), e.captions.clone(), None, e.origin);
            }
            if b.items.is_empty() {
                return Err(file
                    .error(None, format!("no images in split {split:?}"))
                    .into());
            }
        } else {
            if let Some(s) = split {
                return Err(file
                    .error(
                        None,
                        format!("--split {s:?} given, but only Karpathy split files have splits"),
                    )
                    .into());
            }
            for e in &file.entries {
                b.push(e.image.clone(), e.captions.clone(), e.wrong, e.origin);
            }
        }
        let items = b.items;
        if items.is_empty() {
            return Err(file.error(None, "no images in the dataset".into()).into());
        }
        for item in &items {
            let line = Some(item.origin);
            if item.image.trim().is_empty() {
                return Err(file
                    .error(line, "an entry has an empty image path".into())
                    .into());
            }
            if item.texts.is_empty() {
                return Err(file
                    .error(line, format!("image {} has no captions", item.image))
                    .into());
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
