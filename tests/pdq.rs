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
/// found (PDQ does not survive them; the ITC rule's job, `itc_finds_what_pdq_misses` below).
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
