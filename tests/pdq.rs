//! PDQ against the reference implementation and on transformed copies of photos.
//!
//! `tests/fixtures/pdq/reference.json` holds, for five photos of `tests/fixtures/images` and for
//! copies of them (resized to half, JPEG at quality 40, grey, mirrored, rotated by 90 degrees, a
//! small caption written over them, an EXIF-rotated thumbnail, and 5% and 2% crops), the hash
//! and quality PyPI `pdqhash` (Meta's C++ code) gives, and the eight dihedral hashes of each
//! photo; `tests/fixtures/pdq/generate.py` wrote it.
//!
//! The pixels hashed here are the ones the engine hashes: each file is decoded by
//! `decode_admitted`, the engine's decoder (libjpeg-turbo for JPEG, as Pillow; EXIF orientation
//! applied; transparency composited on white; 8-bit RGB), and the SHA-256 of those RGB bytes
//! is checked against the one the generator recorded for the pixels it gave the reference. So a
//! difference in a hash could only come from the hashing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blipsearch::index::{PdqHash, PdqIndex, DEFAULT_PDQ_DISTANCE};
use blipsearch::model::pdq::{pdq_dihedral, pdq_hash};
use blipsearch::model::preprocess::{decode_admitted, DecodeBudget, DecodeLimits};
use common::{fixtures, load_json};
use image::DynamicImage;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn reference() -> Value {
    load_json(&fixtures().join("pdq/reference.json"))
}

fn path_of(entry: &Value) -> PathBuf {
    fixtures().join(entry["file"].as_str().unwrap())
}

/// The file decoded as the engine decodes it, after checking that its pixels are those the
/// reference hashed.
fn decode(entry: &Value) -> DynamicImage {
    let path = path_of(entry);
    let bytes = std::fs::read(&path).unwrap();
    let budget = DecodeBudget::new(1 << 30);
    let image = decode_admitted(&bytes, &path, DecodeLimits::default(), &budget, None, 1)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .image;
    let rgb = image.as_rgb8().expect("the engine decodes to 8-bit RGB");
    assert_eq!(
        (rgb.width(), rgb.height()),
        (
            entry["width"].as_u64().unwrap() as u32,
            entry["height"].as_u64().unwrap() as u32
        ),
        "{}: size",
        path.display()
    );
    let sha = format!("{:x}", Sha256::digest(rgb.as_raw()));
    assert_eq!(
        sha,
        entry["rgb_sha256"].as_str().unwrap(),
        "{}: decoded pixels differ from the ones the reference hashed",
        path.display()
    );
    image
}

fn hex(h: &[u8; 32]) -> String {
    PdqHash(*h).to_hex()
}

fn hash_of(v: &Value) -> PdqHash {
    PdqHash::from_hex(v.as_str().unwrap()).unwrap()
}

fn name(entry: &Value) -> String {
    Path::new(entry["file"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Every file's hash and quality are the reference's, bit for bit, and so are the dihedral
/// hashes of the originals.
#[test]
fn hashes_equal_the_reference() {
    let r = reference();
    let mut files: Vec<&Value> = Vec::new();
    for key in ["originals", "copies", "parity_only"] {
        files.extend(r[key].as_array().unwrap());
    }
    assert!(files.len() >= 45, "{} files", files.len());
    let mut differ = Vec::new();
    for e in &files {
        let image = decode(e);
        let (hash, quality) = pdq_hash(&image).unwrap();
        let want = e["hash"].as_str().unwrap();
        let want_q = e["quality"].as_u64().unwrap();
        if hex(&hash) != want || u64::from(quality) != want_q {
            differ.push(format!(
                "{}: {} q{} against {} q{} ({} bits)",
                name(e),
                hex(&hash),
                quality,
                want,
                want_q,
                PdqHash(hash).distance(&hash_of(&e["hash"]))
            ));
        }
    }
    for o in r["originals"].as_array().unwrap() {
        let (hashes, quality) = pdq_dihedral(&decode(o)).unwrap();
        let want: Vec<String> = o["dihedral"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect();
        let got: Vec<String> = hashes.iter().map(hex).collect();
        if got != want || u64::from(quality) != o["dihedral_quality"].as_u64().unwrap() {
            differ.push(format!("{} dihedral: {got:?} against {want:?}", name(o)));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    println!(
        "PDQ parity: {} files and {} dihedral sets identical to PyPI pdqhash {}",
        files.len(),
        r["originals"].as_array().unwrap().len(),
        r["versions"]["pdqhash"]
    );
}

/// Per transform: copies, copies found for their own original, distances to the nearest of
/// their original's variants, hits on other originals.
#[derive(Default)]
struct Row {
    copies: usize,
    found: usize,
    distances: Vec<u32>,
    false_matches: usize,
}

/// Matching the copies against the eight dihedral hashes of every original at distance 31:
/// every copy but the crops is found for its own original and no other; the crops are not
/// found (PDQ does not survive them; the ITC rule's job, `itc_on_crops_of_synthetic_scenes` below).
#[test]
fn copies_match_their_original_and_nothing_else() {
    let r = reference();
    let originals = r["originals"].as_array().unwrap();
    let mut bank = Vec::new();
    for o in originals {
        let (hashes, _) = pdq_dihedral(&decode(o)).unwrap();
        bank.extend(hashes.map(PdqHash));
    }
    let index = PdqIndex::new(bank.clone());
    let owner = |position: usize| originals[position / 8]["file"].as_str().unwrap();
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in r["copies"].as_array().unwrap() {
        let (hash, _) = pdq_hash(&decode(c)).unwrap();
        let hash = PdqHash(hash);
        let own = c["original"].as_str().unwrap();
        let own_at = originals.iter().position(|o| o["file"] == own).unwrap();
        let nearest = bank[8 * own_at..8 * own_at + 8]
            .iter()
            .map(|h| h.distance(&hash))
            .min()
            .unwrap();
        let hits = index.within(&hash, DEFAULT_PDQ_DISTANCE);
        let found = hits.iter().any(|&(p, _)| owner(p) == own);
        let false_matches = hits.iter().filter(|&&(p, _)| owner(p) != own).count();
        let transform = c["transform"].as_str().unwrap().to_string();
        let row = rows.entry(transform).or_default();
        row.copies += 1;
        row.found += found as usize;
        row.distances.push(nearest);
        row.false_matches += false_matches;
        let crop = c["crop"].as_bool().unwrap();
        if found == crop || false_matches > 0 {
            failures.push(format!(
                "{}: nearest variant of its original at {nearest}, found {found}, {false_matches} false matches",
                name(c)
            ));
        }
    }
    println!(
        "\nPDQ matching at distance {DEFAULT_PDQ_DISTANCE} against the 8 dihedral hashes of {} originals",
        originals.len()
    );
    println!(
        "{:<10} {:>7} {:>8} {:>9} {:>9} {:>14}",
        "transform", "copies", "recall", "mean dist", "max dist", "false matches"
    );
    for (t, row) in &rows {
        let mean = row.distances.iter().sum::<u32>() as f64 / row.distances.len() as f64;
        println!(
            "{:<10} {:>7} {:>8.2} {:>9.1} {:>9} {:>14}",
            t,
            row.copies,
            row.found as f64 / row.copies as f64,
            mean,
            row.distances.iter().max().unwrap(),
            row.false_matches
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // All transforms present: the table above covers what it says.
    for t in [
        "resize50", "jpeg40", "grey", "mirror", "rotate90", "text", "exif6", "crop5", "crop2",
    ] {
        assert!(rows.contains_key(t), "no {t} copies");
    }
}

/// Cosine of two normalised vectors.
fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cuts `share` of the width and height off each side, as the generator's crops do.
fn crop(img: &image::RgbImage, share: f64) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let dx = (share * f64::from(w)).round() as u32;
    let dy = (share * f64::from(h)).round() as u32;
    image::imageops::crop_imm(img, dx, dy, w - 2 * dx, h - 2 * dy).to_image()
}

/// What one crop share gives: per crop, its cosine with its own original, its highest cosine
/// with another scene's original, and its PDQ distance to the nearest variant of its original.
struct CropFigures {
    own: Vec<f32>,
    other_max: Vec<f32>,
    pdq: Vec<u32>,
}

impl CropFigures {
    /// Crops whose own original is nearer than every other scene's.
    fn nearest_own(&self) -> usize {
        self.own
            .iter()
            .zip(&self.other_max)
            .filter(|(o, m)| o > m)
            .count()
    }

    /// Crops at or above `t` with their own original, and crops at or above it with another.
    fn at(&self, t: f32) -> (usize, usize) {
        (
            self.own.iter().filter(|&&c| c >= t).count(),
            self.other_max.iter().filter(|&&c| c >= t).count(),
        )
    }

    fn pdq_found(&self) -> usize {
        self.pdq
            .iter()
            .filter(|&&d| d <= DEFAULT_PDQ_DISTANCE)
            .count()
    }
}

fn min(v: &[f32]) -> f32 {
    v.iter().copied().fold(f32::INFINITY, f32::min)
}

fn max(v: &[f32]) -> f32 {
    v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

fn median(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    s[s.len() / 2]
}

/// Crops against the ITC rule, with the retrieval model trained on the synthetic world
/// (`tests/fixtures/synth`): each of the 288 distinct shape scenes rendered once from a seed
/// the model never saw (64 x 64, the world's size), cut by 5% and 2% on each side, and the
/// crops' ITC vectors compared with the 288 originals'.
///
/// Measured (seed 2024), cosine with the own original, median / minimum: 5% crops 0.945 /
/// 0.410, 2% crops 0.988 / 0.727; highest cosine with another scene's original, median /
/// maximum: 0.940 / 0.995 (5%) and 0.940 / 0.979 (2%). The own original is the nearest of the
/// 288 for 156 of the 5% crops and 264 of the 2% crops. At 0.9791, just above every 2% crop's
/// cosine with another scene, 196 of the 2% crops are found, 149 of them missed by PDQ; 5% crops
/// cannot be told from other scenes by a threshold (at 0.98: 48 found, 9 also matching another
/// scene). PDQ finds none of the 5% crops and 68 of the 2% crops.
///
/// So this model does not catch crops as a real BLIP does: it was trained without crop or
/// scale augmentation, on scenes that differ by one attribute, and an enlargement by 10% moves
/// its ITC vector as far as a changed attribute does. BLIP trains on random resized crops (50%
/// to 100% of the area) of every image, which is what brings a real model's vectors of a crop
/// and of its original together. Asserted is what the data supports: the own original is the
/// nearest for most 2% crops and about half of the 5% crops, and at a threshold no 2% crop
/// reaches with another scene, the ITC rule finds a quarter of the 2% crops or more that PDQ
/// misses.
#[test]
fn itc_on_crops_of_synthetic_scenes() {
    use blipsearch::eval::synth::Scene;
    use blipsearch::model::retrieval::rows;
    use blipsearch::model::{ModelSource, Retriever};
    use rand::SeedableRng;

    // Candle's own kernels: this crate's are built without optimisation in a test build, and
    // several times slower here (the results differ in the last bits only).
    let _kernels = blipsearch::model::kernels::Kernels {
        fast: false,
        large_m: false,
        absorbed_cross_attention: false,
    }
    .enter();
    let retriever = Retriever::load(
        &ModelSource::Dir(fixtures().join("synth/retrieval")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let world = load_json(&fixtures().join("synth/world.json"));
    let size = world["size"].as_u64().unwrap() as u32;
    // The model was trained on the worlds of seeds 0 to 3.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let scenes = Scene::all();
    let originals: Vec<image::RgbImage> = scenes.iter().map(|s| s.render(size, &mut rng)).collect();
    let embed = |images: &[image::RgbImage]| -> Vec<Vec<f32>> {
        let images: Vec<DynamicImage> = images
            .iter()
            .cloned()
            .map(DynamicImage::ImageRgb8)
            .collect();
        images
            .chunks(96)
            .flat_map(|batch| rows(&retriever.embed_images(batch).unwrap().itc).unwrap())
            .collect()
    };
    let original_vectors = embed(&originals);
    let original_pdq: Vec<[PdqHash; 8]> = originals
        .iter()
        .map(|o| {
            pdq_dihedral(&DynamicImage::ImageRgb8(o.clone()))
                .unwrap()
                .0
                .map(PdqHash)
        })
        .collect();
    let figures = |share: f64| -> CropFigures {
        let crops: Vec<image::RgbImage> = originals.iter().map(|o| crop(o, share)).collect();
        let vectors = embed(&crops);
        let mut f = CropFigures {
            own: Vec::new(),
            other_max: Vec::new(),
            pdq: Vec::new(),
        };
        for (i, v) in vectors.iter().enumerate() {
            f.own.push(cosine(v, &original_vectors[i]));
            let other = (0..scenes.len())
                .filter(|&j| j != i)
                .map(|j| cosine(v, &original_vectors[j]))
                .fold(f32::NEG_INFINITY, f32::max);
            f.other_max.push(other);
            let (h, _) = pdq_hash(&DynamicImage::ImageRgb8(crops[i].clone())).unwrap();
            f.pdq.push(
                original_pdq[i]
                    .iter()
                    .map(|o| o.distance(&PdqHash(h)))
                    .min()
                    .unwrap(),
            );
        }
        f
    };
    let five = figures(0.05);
    let two = figures(0.02);
    let n = scenes.len();
    println!("\nCrops of the {n} synthetic scenes (seed 2024, {size} px) against their originals");
    println!(
        "{:<5} {:>15} {:>15} {:>18} {:>16} {:>8}",
        "crop", "own med / min", "other med / max", "own is nearest", "pdq <= 31", "pdq min"
    );
    for (name, f) in [("5%", &five), ("2%", &two)] {
        println!(
            "{:<5} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>11} of {n} {:>9} of {n} {:>8}",
            name,
            median(&f.own),
            min(&f.own),
            median(&f.other_max),
            max(&f.other_max),
            f.nearest_own(),
            f.pdq_found(),
            f.pdq.iter().min().unwrap(),
        );
    }
    println!("crops at or above a threshold with their own original (and with another scene's)");
    println!("{:<9} {:>16} {:>16}", "threshold", "5% crops", "2% crops");
    for t in [0.92f32, 0.95, 0.96, 0.97, 0.98, 0.99] {
        let (f5, x5) = five.at(t);
        let (f2, x2) = two.at(t);
        println!("{t:<9} {f5:>9} ({x5:>4}) {f2:>9} ({x2:>4})");
    }
    // The lowest threshold no 2% crop reaches with another scene.
    let t = max(&two.other_max) + 1e-6;
    let itc_not_pdq = (0..n)
        .filter(|&i| two.own[i] >= t && two.pdq[i] > DEFAULT_PDQ_DISTANCE)
        .count();
    println!(
        "at {t:.4} (above every 2% crop's cosine with another scene): {} 2% crops found, {itc_not_pdq} of them missed by PDQ",
        two.at(t).0
    );
    assert_eq!(five.pdq_found(), 0, "PDQ should not survive a 5% crop");
    assert!(two.nearest_own() * 100 >= 85 * n, "{}", two.nearest_own());
    assert!(five.nearest_own() * 100 >= 45 * n, "{}", five.nearest_own());
    assert!(itc_not_pdq * 100 >= 25 * n, "{itc_not_pdq}");
}
