//! Caption datasets for training, read by [`super::dataset_file`]: JSON lines `{"image": path,
//! "caption": text}`, BLIP's annotation arrays (`coco_karpathy_train.json`) or Karpathy's
//! `dataset_coco.json`, of which the `train` and `restval` splits are used.
//!
//! A record may carry an `"image_id"` (string or number), as BLIP's own annotation files do: pairs
//! that share one are the same picture for training (BLIP's `idx`), so they are one another's ITC
//! positives and never one another's ITM negatives. Without it, the image path is the id.
//!
//! A caption that truly describes more pictures than its own (a partial description such as "a
//! red circle") may list them as `"also_matches": [image_id, ...]`: those pictures are then its
//! ITC positives too and never its ITM negatives, nor it theirs. Without the list such a caption
//! would teach ITM that it does not match every other picture it describes.
//!
//! Images are decoded and preprocessed once, up front: a missing or unreadable image is reported
//! (with its path and the reason) and its pairs are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::dataset_file::{DatasetFile, DatasetFormat};
use super::{Result, TrainError};
use crate::model::preprocess::{load_image, pixel_values, DecodeLimits};
use candle_core::{Device, Tensor};

/// One (image, caption) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Index of the image in [`Dataset::images`].
    pub image: usize,
    /// What the pair shows, as a dense index: pairs with one `image_id` (or, without ids, of one
    /// image) share it. ITC positives; never ITM negatives of one another.
    pub group: usize,
    /// The caption as written in the file.
    pub caption: String,
    /// Other groups the caption also truly describes (`"also_matches"`).
    pub also: Vec<usize>,
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

/// One record of a dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Image path as written.
    pub image: String,
    /// Caption.
    pub caption: String,
    /// The `image_id` given, as text (numbers written in decimal); `None`: the image path.
    pub image_id: Option<String>,
    /// The `also_matches` ids, as text.
    pub also_matches: Vec<String>,
}

impl Record {
    /// The key pairs are grouped by: the `image_id` when given, else the image path (the flag
    /// keeps an id from ever equalling a path).
    pub fn group_key(&self) -> (bool, &str) {
        match &self.image_id {
            Some(id) => (true, id),
            None => (false, &self.image),
        }
    }
}

/// Reads the records of a dataset file, in file order: one per caption, of the `train` and
/// `restval` images of a Karpathy split file (images without a split count as `train`).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = fs_err::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file = DatasetFile::parse(&text, path)?;
    let karpathy = file.format == DatasetFormat::Karpathy;
    let mut out = Vec::new();
    for entry in file.entries {
        if karpathy
            && !matches!(
                entry.split.as_deref().unwrap_or("train"),
                "train" | "restval"
            )
        {
            continue;
        }
        for caption in entry.captions {
            out.push(Record {
                image: entry.image.clone(),
                caption,
                image_id: entry.image_id.clone(),
                also_matches: entry.also_matches.clone(),
            });
        }
    }
    if out.is_empty() {
        let reason = if karpathy {
            "no (image, caption) pairs (in the train/restval splits)"
        } else {
            "no (image, caption) pairs"
        };
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            reason: reason.into(),
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
        let mut groups: HashMap<(bool, String), usize> = HashMap::new();
        for record in records {
            let key = record.group_key();
            let key = (key.0, key.1.to_string());
            let also_keys: Vec<(bool, String)> = record
                .also_matches
                .iter()
                .map(|id| (true, id.clone()))
                .collect();
            let Record { image, caption, .. } = record;
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
                let mut dense = |key: (bool, String)| {
                    let next = groups.len();
                    *groups.entry(key).or_insert(next)
                };
                let group = dense(key);
                let mut also: Vec<usize> = also_keys
                    .into_iter()
                    .map(&mut dense)
                    .filter(|&g| g != group)
                    .collect();
                also.sort_unstable();
                also.dedup();
                pairs.push(Pair {
                    image,
                    group,
                    caption,
                    also,
                });
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

    /// A temporary folder with blank 8x8 PNGs of these names, and the path of a dataset file in
    /// it (not written).
    fn images_and_dataset(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            image::RgbImage::new(8, 8)
                .save(dir.path().join(name))
                .unwrap();
        }
        let p = dir.path().join("d.jsonl");
        (dir, p)
    }

    #[test]
    fn image_ids_group_pairs() {
        let (_dir, p) = images_and_dataset(&["a.png", "b.png", "c.png"]);
        std::fs::write(
            &p,
            concat!(
                "{\"image\": \"a.png\", \"caption\": \"x\", \"image_id\": \"s1\"}\n",
                "{\"image\": \"b.png\", \"caption\": \"y\", \"image_id\": \"s1\"}\n",
                "{\"image\": \"c.png\", \"caption\": \"z\", \"image_id\": 7}\n",
                "{\"image\": \"c.png\", \"caption\": \"w\"}\n",
                "{\"image\": \"a.png\", \"caption\": \"v\"}\n",
            ),
        )
        .unwrap();
        let d = Dataset::load(&p, None, 16, &Device::Cpu).unwrap();
        let groups: Vec<usize> = d.pairs.iter().map(|p| p.group).collect();
        let images: Vec<usize> = d.pairs.iter().map(|p| p.image).collect();
        // Two images under one id share a group; the id-less pairs group by their image, apart
        // from the ids.
        assert_eq!(groups, vec![0, 0, 1, 2, 3]);
        assert_eq!(images, vec![0, 1, 2, 2, 0]);

        std::fs::write(
            &p,
            "{\"image\": \"a.png\", \"caption\": \"x\", \"image_id\": [1]}\n",
        )
        .unwrap();
        let e = read_records(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1:") && e.contains("image_id"), "{e}");
    }

    #[test]
    fn also_matches_name_more_groups() {
        let (_dir, p) = images_and_dataset(&["a.png", "b.png"]);
        std::fs::write(
            &p,
            concat!(
                "{\"image\": \"a.png\", \"caption\": \"x\", \"image_id\": \"s1\"}\n",
                "{\"image\": \"a.png\", \"caption\": \"part\", \"image_id\": \"s1\", ",
                "\"also_matches\": [\"s2\", \"s1\", 9, \"s2\"]}\n",
                "{\"image\": \"b.png\", \"caption\": \"y\", \"image_id\": \"s2\"}\n",
            ),
        )
        .unwrap();
        let d = Dataset::load(&p, None, 16, &Device::Cpu).unwrap();
        let groups: Vec<usize> = d.pairs.iter().map(|p| p.group).collect();
        assert_eq!(groups, vec![0, 0, 1]);
        // Its own group is left out, duplicates merged; an id no record carries still counts.
        assert_eq!(d.pairs[1].also, vec![1, 2]);
        assert!(d.pairs[0].also.is_empty() && d.pairs[2].also.is_empty());

        for bad in ["\"s2\"", "[[1]]"] {
            std::fs::write(
                &p,
                format!("{{\"image\": \"a.png\", \"caption\": \"x\", \"also_matches\": {bad}}}\n"),
            )
            .unwrap();
            let e = read_records(&p).unwrap_err().to_string();
            assert!(
                e.contains("d.jsonl:1:") && e.contains("also_matches"),
                "{e}"
            );
        }
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
        assert_eq!(r[1].image, "a.jpg");
        assert_eq!(r[1].caption, "two");
        assert_eq!(r[1].image_id.as_deref(), Some("1"));
        assert_eq!(r[2].image_id, None);
        std::fs::write(
            &p,
            r#"{"images": [{"filepath": "train2014", "filename": "a.jpg", "split": "train",
                 "sentences": [{"raw": "A cat."}]},
                {"filepath": "val2014", "filename": "b.jpg", "split": "test",
                 "sentences": [{"raw": "A dog."}]}]}"#,
        )
        .unwrap();
        let r = read_records(&p).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].image.as_str(), r[0].caption.as_str()),
            ("train2014/a.jpg", "A cat.")
        );
    }
}
