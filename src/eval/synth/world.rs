//! Drawing a synthetic world (training scenes at random, distinct test scenes, a share of wrong
//! captions, partial descriptions) and writing its images and dataset files ([`generate`]).

use std::path::Path;

use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::scene::{Scene, PARTIAL_FORMS, TEMPLATES};
use crate::eval::error::{EvalError, Result};
use crate::train::dataset_file::{AnnotationEntry, KarpathyFile, KarpathyImage, KarpathySentence};

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct SynthParams {
    /// Training images.
    pub train: usize,
    /// Test images (at most 288: each distinct scene once).
    pub test: usize,
    /// Random seed.
    pub seed: u64,
    /// Share of wrong captions in `train.jsonl` and `test_noisy.jsonl` (0 to 1).
    pub wrong_share: f64,
    /// Image side in pixels.
    pub size: u32,
}

impl Default for SynthParams {
    fn default() -> Self {
        SynthParams {
            train: 2000,
            test: 200,
            seed: 0,
            wrong_share: 0.2,
            size: 64,
        }
    }
}

/// One line of the JSON lines files the generator writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthRecord {
    /// Image path relative to the world's folder.
    pub image: String,
    /// The caption given with the image (wrong when `wrong`).
    pub caption: String,
    /// What the image shows, as an id ([`Scene::id`]): every rendering of one scene shares it,
    /// so training treats them as one picture (BLIP's `idx`: ITC positives of one another, never
    /// ITM negatives), however the caption reads.
    pub image_id: String,
    /// The other scenes a partial caption also describes (`train_partial.jsonl` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_matches: Vec<String>,
    /// Whether the caption was deliberately corrupted.
    pub wrong: bool,
    /// The right caption (same template) when `wrong`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_caption: Option<String>,
    /// What the image shows.
    pub scene: Scene,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    /// Training images (one caption each, in `train.jsonl`).
    pub train_images: usize,
    /// Wrong captions in `train.jsonl`.
    pub train_wrong: usize,
    /// Test images.
    pub test_images: usize,
    /// Wrong captions in `test_noisy.jsonl`.
    pub test_noisy_wrong: usize,
}

/// The record of an image of `scene` captioned with `template`: the true caption, or when
/// `wrong` the caption of a corrupted scene, with the true one kept.
fn captioned(
    image: String,
    scene: Scene,
    template: usize,
    wrong: bool,
    rng: &mut StdRng,
) -> SynthRecord {
    let truth = scene.caption(template);
    let (caption, true_caption) = if wrong {
        (scene.corrupt(rng).caption(template), Some(truth))
    } else {
        (truth, None)
    };
    SynthRecord {
        image,
        caption,
        image_id: scene.id(),
        also_matches: Vec::new(),
        wrong,
        true_caption,
        scene,
    }
}

/// The Karpathy entry of image `i` of `split`, with every reference caption of its scene.
fn karpathy_image(split: &str, i: usize, scene: &Scene) -> KarpathyImage {
    KarpathyImage {
        filepath: Some(format!("images/{split}")),
        filename: format!("{i:05}.png"),
        split: Some(split.to_string()),
        sentences: scene
            .references()
            .into_iter()
            .map(|raw| KarpathySentence { raw })
            .collect(),
    }
}

/// Picks exactly `round(share * n)` indices of `0..n` to corrupt.
fn wrong_set(n: usize, share: f64, rng: &mut StdRng) -> Vec<bool> {
    let k = ((share * n as f64).round() as usize).min(n);
    let mut flags: Vec<bool> = (0..n).map(|i| i < k).collect();
    flags.shuffle(rng);
    flags
}

/// Writes JSON lines; returns the SHA-256 of what was written (recorded in `world.json`, so that
/// a regenerated world can be checked against the one a model was trained on).
fn write_jsonl(path: &Path, records: &[SynthRecord]) -> Result<String> {
    let mut text = String::new();
    for r in records {
        text.push_str(
            &serde_json::to_string(r)
                .map_err(|e| EvalError::InvalidInput(format!("cannot serialise a record: {e}")))?,
        );
        text.push('\n');
    }
    fs_err::write(path, &text)?;
    let digest = Sha256::digest(text.as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| {
        EvalError::InvalidInput(format!("cannot serialise {}: {e}", path.display()))
    })?;
    fs_err::write(path, text + "\n")?;
    Ok(())
}

/// Writes a synthetic world into `out` (created; must be empty or absent):
/// - `images/train/NNNNN.png`, `images/test/NNNNN.png`;
/// - `train.jsonl`: one [`SynthRecord`] per training image, a random template, `wrong_share`
///   of them wrong;
/// - `test.jsonl`: one clean record per test image (template 0); every test scene is distinct;
/// - `train_partial.jsonl`: a partial description of each correct training caption's image
///   ([`Scene::partial`]), with the other scenes it describes as `"also_matches"`;
/// - `test_noisy.jsonl`: the test images again, `wrong_share` of the captions wrong (CapFilt);
/// - `test.json`: BLIP annotation style `[{"image", "caption": [3 references]}]`;
/// - `dataset_synth.json`: Karpathy `dataset_coco.json` style, both splits, true captions;
/// - `world.json`: the parameters and the counts.
pub fn generate(out: &Path, params: &SynthParams) -> Result<SynthSummary> {
    let distinct = Scene::all();
    if params.test > distinct.len() {
        return Err(EvalError::InvalidInput(format!(
            "--test {} is more than the {} distinct scenes (test scenes must be unique)",
            params.test,
            distinct.len()
        )));
    }
    if !(0.0..=1.0).contains(&params.wrong_share) {
        return Err(EvalError::InvalidInput(
            "--wrong-share must be between 0 and 1".into(),
        ));
    }
    if !(16..=1024).contains(&params.size) {
        return Err(EvalError::InvalidInput(
            "--size must be between 16 and 1024 pixels".into(),
        ));
    }
    if out.exists() && fs_err::read_dir(out)?.next().is_some() {
        return Err(EvalError::InvalidInput(format!(
            "{} exists and is not empty",
            out.display()
        )));
    }
    fs_err::create_dir_all(out.join("images/train"))?;
    fs_err::create_dir_all(out.join("images/test"))?;
    let mut rng = StdRng::seed_from_u64(params.seed);

    let mut karpathy = Vec::new();
    let save = |img: &RgbImage, rel: &str| -> Result<()> {
        let path = out.join(rel);
        img.save(&path)
            .map_err(|source| EvalError::ImageWrite { path, source })
    };

    // Train.
    let wrong = wrong_set(params.train, params.wrong_share, &mut rng);
    let mut train = Vec::with_capacity(params.train);
    for (i, &is_wrong) in wrong.iter().enumerate() {
        let scene = Scene::random(&mut rng);
        let rel = format!("images/train/{i:05}.png");
        save(&scene.render(params.size, &mut rng), &rel)?;
        let template = rng.random_range(0..TEMPLATES);
        let record = captioned(rel, scene, template, is_wrong, &mut rng);
        karpathy.push(karpathy_image("train", i, &scene));
        train.push(record);
    }

    // Test: distinct scenes.
    let mut scenes = distinct;
    scenes.shuffle(&mut rng);
    scenes.truncate(params.test);
    let mut test = Vec::with_capacity(params.test);
    let mut annotations = Vec::with_capacity(params.test);
    for (i, scene) in scenes.iter().enumerate() {
        let rel = format!("images/test/{i:05}.png");
        save(&scene.render(params.size, &mut rng), &rel)?;
        test.push(captioned(rel, *scene, 0, false, &mut rng));
        karpathy.push(karpathy_image("test", i, scene));
    }
    for r in &test {
        annotations.push(AnnotationEntry {
            image: r.image.clone(),
            caption: r.scene.references(),
        });
    }
    let wrong = wrong_set(params.test, params.wrong_share, &mut rng);
    let noisy: Vec<SynthRecord> = test
        .iter()
        .zip(&wrong)
        .map(|(r, &is_wrong)| {
            let template = rng.random_range(0..TEMPLATES);
            captioned(r.image.clone(), r.scene, template, is_wrong, &mut rng)
        })
        .collect();

    // Partial descriptions of the correctly captioned training images, from a generator of their
    // own, so that they leave the draws behind every other file alone.
    let mut prng = StdRng::seed_from_u64(params.seed ^ 0x7061_7274_6961_6c73);
    let partial: Vec<SynthRecord> = train
        .iter()
        .filter(|r| !r.wrong)
        .map(|r| {
            let (caption, described) = r.scene.partial(prng.random_range(0..PARTIAL_FORMS));
            SynthRecord {
                image: r.image.clone(),
                caption,
                image_id: r.image_id.clone(),
                also_matches: described
                    .iter()
                    .filter(|s| **s != r.scene)
                    .map(Scene::id)
                    .collect(),
                wrong: false,
                true_caption: None,
                scene: r.scene,
            }
        })
        .collect();

    let train_sha = write_jsonl(&out.join("train.jsonl"), &train)?;
    write_jsonl(&out.join("train_partial.jsonl"), &partial)?;
    let test_sha = write_jsonl(&out.join("test.jsonl"), &test)?;
    write_jsonl(&out.join("test_noisy.jsonl"), &noisy)?;
    write_json(&out.join("test.json"), &annotations)?;
    write_json(
        &out.join("dataset_synth.json"),
        &KarpathyFile {
            dataset: Some("synth".into()),
            images: karpathy,
        },
    )?;
    let summary = SynthSummary {
        train_images: train.len(),
        train_wrong: train.iter().filter(|r| r.wrong).count(),
        test_images: test.len(),
        test_noisy_wrong: noisy.iter().filter(|r| r.wrong).count(),
    };
    write_json(
        &out.join("world.json"),
        &serde_json::json!({
            "seed": params.seed,
            "size": params.size,
            "wrong_share": params.wrong_share,
            "summary": &summary,
            "train_jsonl_sha256": train_sha,
            "test_jsonl_sha256": test_sha,
            "generator": concat!("blipsearch ", env!("CARGO_PKG_VERSION"), " synth-world"),
        }),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_is_seeded_and_marks_wrong_captions() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let params = SynthParams {
            train: 20,
            test: 10,
            seed: 7,
            wrong_share: 0.2,
            size: 32,
        };
        let sa = generate(a.path(), &params).unwrap();
        generate(b.path(), &params).unwrap();
        assert_eq!(sa.train_wrong, 4);
        assert_eq!(sa.test_noisy_wrong, 2);
        for f in [
            "train.jsonl",
            "train_partial.jsonl",
            "test.jsonl",
            "test_noisy.jsonl",
            "test.json",
            "dataset_synth.json",
            "images/train/00019.png",
            "images/test/00009.png",
        ] {
            let x = std::fs::read(a.path().join(f)).unwrap();
            let y = std::fs::read(b.path().join(f)).unwrap();
            assert!(x == y, "{f} differs between two runs with one seed");
        }
        let train = std::fs::read_to_string(a.path().join("train.jsonl")).unwrap();
        for line in train.lines() {
            let r: SynthRecord = serde_json::from_str(line).unwrap();
            match &r.true_caption {
                Some(t) => {
                    assert!(r.wrong);
                    assert_ne!(t, &r.caption);
                    assert!(r.scene.references().contains(t));
                }
                None => {
                    assert!(!r.wrong);
                    assert!(r.scene.references().contains(&r.caption));
                }
            }
        }
        // One partial caption per correct training caption, of the same image; its
        // also-matches are the other scenes it describes.
        let partial = std::fs::read_to_string(a.path().join("train_partial.jsonl")).unwrap();
        let partial: Vec<SynthRecord> = partial
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(partial.len(), 20 - 4);
        for r in &partial {
            assert!(!r.wrong && !r.also_matches.is_empty());
            assert!(!r.also_matches.contains(&r.image_id));
            assert!(!r.scene.references().contains(&r.caption));
        }
        // Every file reads back through the datasets' reader, in its layout.
        use crate::train::dataset_file::{DatasetFile, DatasetFormat};
        for (f, format, entries) in [
            ("train.jsonl", DatasetFormat::JsonLines, 20),
            ("train_partial.jsonl", DatasetFormat::JsonLines, 16),
            ("test.jsonl", DatasetFormat::JsonLines, 10),
            ("test_noisy.jsonl", DatasetFormat::JsonLines, 10),
            ("test.json", DatasetFormat::Annotations, 10),
            ("dataset_synth.json", DatasetFormat::Karpathy, 30),
        ] {
            let path = a.path().join(f);
            let file = DatasetFile::parse(&std::fs::read_to_string(&path).unwrap(), &path)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((file.format, file.entries.len()), (format, entries), "{f}");
        }
        let c = tempfile::tempdir().unwrap();
        generate(c.path(), &SynthParams { seed: 8, ..params }).unwrap();
        assert_ne!(
            std::fs::read(a.path().join("train.jsonl")).unwrap(),
            std::fs::read(c.path().join("train.jsonl")).unwrap()
        );
        assert!(
            generate(a.path(), &SynthParams::default()).is_err(),
            "not empty"
        );
    }
}
