//! A seeded synthetic captioned world: small PNG scenes of a few coloured shapes with captions
//! derived from the scene, so that tiny BLIP models can be trained in minutes and their retrieval,
//! captions and CapFilt filter measured against a known truth.
//!
//! Each scene holds one group of identical shapes: a shape (circle, square, triangle), a colour
//! (red, green, blue, yellow), a size (small, large), a count (one to three) and a position (left,
//! right, top, bottom half of the image), on a light plain or lightly noisy background. That is
//! 288 distinct scenes; the test split uses each at most once, so every test caption has exactly
//! one matching test image. Captions come from three templates ("two large red circles on the
//! left", "there are two large red circles on the left", "on the left two large red circles").
//!
//! A share of the training captions, and of a separate copy of the test split
//! (`test_noisy.jsonl`), is deliberately wrong (one or two attributes changed) and marked with
//! `"wrong": true` and the `"true_caption"`, so that CapFilt's filter can be scored. The mark is
//! for measurement only: a trainer should treat such lines as the noisy web text they imitate.
//!
//! `train_partial.jsonl` describes each correctly captioned training image once more, partially
//! ("a red circle", "two large blue squares", "three small triangles at the top"), as people type
//! queries; each such caption lists every other scene it also describes as `"also_matches"`, so
//! that training counts those pictures as matches rather than negatives.
//!
//! The generator uses `rand`'s `StdRng`, so a seed gives the same world for a given `Cargo.lock`.

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{EvalError, Result};

/// A shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upward-pointing triangle.
    Triangle,
}

/// A colour, far apart from the others in RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
}

/// The size of every shape of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// About a seventh of the image side across.
    Small,
    /// About two sevenths of the image side across.
    Large,
}

/// Which half of the image the shapes are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// The left half.
    Left,
    /// The right half.
    Right,
    /// The top half.
    Top,
    /// The bottom half.
    Bottom,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The caption word (singular).
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }

    /// The RGB value the shapes are painted with (before a small jitter).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 35, 35],
            Colour::Green => [35, 160, 50],
            Colour::Blue => [40, 70, 215],
            Colour::Yellow => [235, 200, 25],
        }
    }
}

impl Size {
    /// Every size.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

impl Position {
    /// Every position.
    pub const ALL: [Position; 4] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
    ];

    /// The caption phrase ("on the left", "at the top").
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
        }
    }
}

/// Counts a scene may have.
pub const COUNTS: [u8; 3] = [1, 2, 3];

/// Number of caption templates ([`Scene::caption`]).
pub const TEMPLATES: usize = 3;

/// Number of partial-description forms ([`Scene::partial`]).
pub const PARTIAL_FORMS: usize = 4;

/// What a synthetic image shows: `count` identical shapes in one half of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scene {
    /// The shape.
    pub shape: Shape,
    /// The colour.
    pub colour: Colour,
    /// The size.
    pub size: Size,
    /// How many shapes (1 to 3).
    pub count: u8,
    /// Where they are.
    pub position: Position,
}

impl Scene {
    /// Every distinct scene (288), in a fixed order.
    pub fn all() -> Vec<Scene> {
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for size in Size::ALL {
                    for count in COUNTS {
                        for position in Position::ALL {
                            out.push(Scene {
                                shape,
                                colour,
                                size,
                                count,
                                position,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// A uniformly random scene.
    pub fn random(rng: &mut StdRng) -> Scene {
        Scene {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
            size: Size::ALL[rng.random_range(0..Size::ALL.len())],
            count: COUNTS[rng.random_range(0..COUNTS.len())],
            position: Position::ALL[rng.random_range(0..Position::ALL.len())],
        }
    }

    /// A stable id of the scene: "2-large-red-circle-left".
    pub fn id(&self) -> String {
        format!(
            "{}-{}-{}-{}-{:?}",
            self.count,
            self.size.word(),
            self.colour.word(),
            self.shape.word(),
            self.position
        )
        .to_lowercase()
    }

    /// The count word and the plural ending: ("a", ""), ("two", "s"), ("three", "s").
    fn count_words(&self) -> (&'static str, &'static str) {
        match self.count {
            1 => ("a", ""),
            2 => ("two", "s"),
            _ => ("three", "s"),
        }
    }

    /// The noun phrase: "a small red circle", "three large blue squares".
    pub fn noun_phrase(&self) -> String {
        let (count, plural) = self.count_words();
        format!(
            "{count} {} {} {}{plural}",
            self.size.word(),
            self.colour.word(),
            self.shape.word()
        )
    }

    /// The caption of template `template` (0 to [`TEMPLATES`] - 1; larger values wrap):
    /// 0 "two large red circles on the left", 1 "there are two large red circles on the left",
    /// 2 "on the left two large red circles".
    pub fn caption(&self, template: usize) -> String {
        let np = self.noun_phrase();
        let pos = self.position.phrase();
        match template % TEMPLATES {
            0 => format!("{np} {pos}"),
            1 => {
                let verb = if self.count > 1 { "are" } else { "is" };
                format!("there {verb} {np} {pos}")
            }
            _ => format!("{pos} {np}"),
        }
    }

    /// Every reference caption of the scene, one per template.
    pub fn references(&self) -> Vec<String> {
        (0..TEMPLATES).map(|t| self.caption(t)).collect()
    }

    /// A partial description: form 0 to [`PARTIAL_FORMS`] - 1 (larger values wrap) leaves out
    /// some attributes, the count word always kept: 0 "a red circle" (size and position left
    /// out), 1 "two large red circles" (position), 2 "two red circles on the left" (size), 3 "two
    /// large circles on the left" (colour). Returns the caption and every scene it describes
    /// (this one included).
    pub fn partial(&self, form: usize) -> (String, Vec<Scene>) {
        let (count, plural) = self.count_words();
        let (shape, colour, size, pos) = (
            self.shape.word(),
            self.colour.word(),
            self.size.word(),
            self.position.phrase(),
        );
        // (caption, keeps size, keeps colour, keeps position)
        let (text, keep_size, keep_colour, keep_pos) = match form % PARTIAL_FORMS {
            0 => (
                format!("{count} {colour} {shape}{plural}"),
                false,
                true,
                false,
            ),
            1 => (
                format!("{count} {size} {colour} {shape}{plural}"),
                true,
                true,
                false,
            ),
            2 => (
                format!("{count} {colour} {shape}{plural} {pos}"),
                false,
                true,
                true,
            ),
            _ => (
                format!("{count} {size} {shape}{plural} {pos}"),
                true,
                false,
                true,
            ),
        };
        let described = Scene::all()
            .into_iter()
            .filter(|o| {
                o.shape == self.shape
                    && o.count == self.count
                    && (!keep_size || o.size == self.size)
                    && (!keep_colour || o.colour == self.colour)
                    && (!keep_pos || o.position == self.position)
            })
            .collect();
        (text, described)
    }

    /// The scene with one or two attributes changed to another value (a wrong caption's scene).
    pub fn corrupt(&self, rng: &mut StdRng) -> Scene {
        let mut attrs = [0usize, 1, 2, 3, 4];
        attrs.shuffle(rng);
        let changes = rng.random_range(1..=2);
        let mut out = *self;
        for &a in &attrs[..changes] {
            match a {
                0 => out.shape = other(&Shape::ALL, self.shape, rng),
                1 => out.colour = other(&Colour::ALL, self.colour, rng),
                2 => out.size = other(&Size::ALL, self.size, rng),
                3 => out.count = other(&COUNTS, self.count, rng),
                _ => out.position = other(&Position::ALL, self.position, rng),
            }
        }
        out
    }

    /// Paints the scene on a `size` x `size` canvas.
    pub fn render(&self, size: u32, rng: &mut StdRng) -> RgbImage {
        const BACKGROUNDS: [[u8; 3]; 4] = [
            [245, 245, 245],
            [232, 232, 226],
            [250, 244, 232],
            [234, 240, 246],
        ];
        let bg = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
        let noise: i32 = if rng.random_bool(0.5) { 10 } else { 0 };
        let mut img = RgbImage::from_fn(size, size, |_, _| {
            let d = if noise > 0 {
                rng.random_range(-noise..=noise)
            } else {
                0
            };
            Rgb(bg.map(|c| (c as i32 + d).clamp(0, 255) as u8))
        });
        let s = size as f32;
        let base = self.colour.rgb();
        let fill: [u8; 3] =
            base.map(|c| (c as i32 + rng.random_range(-12..=12)).clamp(0, 255) as u8);
        // Radius (half the width) of every shape.
        let r = match self.size {
            Size::Small => s * 0.07,
            Size::Large => s * 0.14,
        } * rng.random_range(0.9..1.1);
        // The half the shapes live in, as (x0, y0, width, height), and whether slots run along y.
        let half = s / 2.0;
        let (x0, y0, w, h, vertical) = match self.position {
            Position::Left => (0.0, 0.0, half, s, true),
            Position::Right => (half, 0.0, half, s, true),
            Position::Top => (0.0, 0.0, s, half, false),
            Position::Bottom => (0.0, half, s, half, false),
        };
        let n = self.count as f32;
        for i in 0..self.count {
            let slot = (i as f32 + 0.5) / n;
            let (long, short) = if vertical { (h, w) } else { (w, h) };
            let slot_len = long / n;
            // Small jitter, so that a lone shape "on the left" never sits in a corner where it
            // could as well be "at the top": the caption must be decidable from the pixels.
            let jitter_long = (slot_len / 2.0 - r - 1.0).max(0.0).min(0.15 * slot_len);
            let jitter_short = (short / 2.0 - r - 1.0).max(0.0) * 0.5;
            let a = slot * long + sym(rng, jitter_long);
            let b = short / 2.0 + sym(rng, jitter_short);
            let (cx, cy) = if vertical {
                (x0 + b, y0 + a)
            } else {
                (x0 + a, y0 + b)
            };
            paint(&mut img, self.shape, cx, cy, r, fill);
        }
        img
    }
}

fn sym(rng: &mut StdRng, amplitude: f32) -> f32 {
    if amplitude <= 0.0 {
        0.0
    } else {
        rng.random_range(-amplitude..amplitude)
    }
}

fn other<T: Copy + PartialEq>(all: &[T], not: T, rng: &mut StdRng) -> T {
    let rest: Vec<T> = all.iter().copied().filter(|&v| v != not).collect();
    rest[rng.random_range(0..rest.len())]
}

/// Whether (x, y) lies inside `shape` centred at (cx, cy) with radius `r`.
fn inside(shape: Shape, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        // Same area as the circle would be too small to tell apart at 4 px: 0.85 r half-side.
        Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        Shape::Triangle => {
            // Apex (0, -r), base corners (-r, 0.8r) and (r, 0.8r).
            let top = -r;
            let bottom = 0.8 * r;
            if dy < top || dy > bottom {
                return false;
            }
            let half_width = r * (dy - top) / (bottom - top);
            dx.abs() <= half_width
        }
    }
}

/// Paints one shape with 4x4 supersampled coverage (soft edges, as a photo would have).
fn paint(img: &mut RgbImage, shape: Shape, cx: f32, cy: f32, r: f32, fill: [u8; 3]) {
    let (w, h) = img.dimensions();
    let x_lo = ((cx - r - 1.0).floor().max(0.0)) as u32;
    let x_hi = ((cx + r + 1.0).ceil() as u32).min(w);
    let y_lo = ((cy - r - 1.0).floor().max(0.0)) as u32;
    let y_hi = ((cy + r + 1.0).ceil() as u32).min(h);
    for y in y_lo..y_hi {
        for x in x_lo..x_hi {
            let mut hits = 0u32;
            for sy in 0..4 {
                for sx in 0..4 {
                    let px = x as f32 + (sx as f32 + 0.5) / 4.0;
                    let py = y as f32 + (sy as f32 + 0.5) / 4.0;
                    if inside(shape, px, py, cx, cy, r) {
                        hits += 1;
                    }
                }
            }
            if hits == 0 {
                continue;
            }
            let a = hits as f32 / 16.0;
            let p = img.get_pixel_mut(x, y);
            for (v, f) in p.0.iter_mut().zip(fill) {
                *v = (*v as f32 * (1.0 - a) + f as f32 * a).round() as u8;
            }
        }
    }
}

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

#[derive(Serialize)]
struct AnnotationEntry<'a> {
    image: &'a str,
    caption: Vec<String>,
}

#[derive(Serialize)]
struct KarpathySentence {
    raw: String,
}

#[derive(Serialize)]
struct KarpathyImage {
    filepath: String,
    filename: String,
    split: &'static str,
    sentences: Vec<KarpathySentence>,
}

#[derive(Serialize)]
struct KarpathyFile {
    dataset: &'static str,
    images: Vec<KarpathyImage>,
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
        let truth = scene.caption(template);
        let record = if is_wrong {
            SynthRecord {
                image: rel.clone(),
                image_id: scene.id(),
                caption: scene.corrupt(&mut rng).caption(template),
                also_matches: Vec::new(),
                wrong: true,
                true_caption: Some(truth),
                scene,
            }
        } else {
            SynthRecord {
                image: rel.clone(),
                image_id: scene.id(),
                caption: truth,
                also_matches: Vec::new(),
                wrong: false,
                true_caption: None,
                scene,
            }
        };
        karpathy.push(KarpathyImage {
            filepath: "images/train".into(),
            filename: format!("{i:05}.png"),
            split: "train",
            sentences: scene
                .references()
                .into_iter()
                .map(|raw| KarpathySentence { raw })
                .collect(),
        });
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
        test.push(SynthRecord {
            image: rel.clone(),
            image_id: scene.id(),
            caption: scene.caption(0),
            also_matches: Vec::new(),
            wrong: false,
            true_caption: None,
            scene: *scene,
        });
        karpathy.push(KarpathyImage {
            filepath: "images/test".into(),
            filename: format!("{i:05}.png"),
            split: "test",
            sentences: scene
                .references()
                .into_iter()
                .map(|raw| KarpathySentence { raw })
                .collect(),
        });
    }
    for r in &test {
        annotations.push(AnnotationEntry {
            image: &r.image,
            caption: r.scene.references(),
        });
    }
    let wrong = wrong_set(params.test, params.wrong_share, &mut rng);
    let noisy: Vec<SynthRecord> = test
        .iter()
        .zip(&wrong)
        .map(|(r, &is_wrong)| {
            let template = rng.random_range(0..TEMPLATES);
            let truth = r.scene.caption(template);
            if is_wrong {
                SynthRecord {
                    image: r.image.clone(),
                    image_id: r.scene.id(),
                    caption: r.scene.corrupt(&mut rng).caption(template),
                    also_matches: Vec::new(),
                    wrong: true,
                    true_caption: Some(truth),
                    scene: r.scene,
                }
            } else {
                SynthRecord {
                    image: r.image.clone(),
                    image_id: r.scene.id(),
                    caption: truth,
                    also_matches: Vec::new(),
                    wrong: false,
                    true_caption: None,
                    scene: r.scene,
                }
            }
        })
        .collect();

    // Partial descriptions of the correctly captioned training images, from a generator of their
    // own so that every other file stays as it was before they existed.
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
            dataset: "synth",
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

    fn two_large_red_circles_left() -> Scene {
        Scene {
            shape: Shape::Circle,
            colour: Colour::Red,
            size: Size::Large,
            count: 2,
            position: Position::Left,
        }
    }

    #[test]
    fn captions_follow_the_scene() {
        let s = two_large_red_circles_left();
        assert_eq!(s.caption(0), "two large red circles on the left");
        assert_eq!(s.caption(1), "there are two large red circles on the left");
        assert_eq!(s.caption(2), "on the left two large red circles");
        let one = Scene { count: 1, ..s };
        assert_eq!(one.caption(1), "there is a large red circle on the left");
    }

    #[test]
    fn there_are_288_distinct_scenes() {
        let all = Scene::all();
        let set: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), 288);
        assert_eq!(set.len(), 288);
        let captions: std::collections::HashSet<_> = all.iter().map(|s| s.caption(0)).collect();
        assert_eq!(captions.len(), 288);
    }

    #[test]
    fn partial_captions_describe_their_scenes() {
        let s = two_large_red_circles_left();
        let (text, described) = s.partial(0);
        assert_eq!(text, "two red circles");
        assert_eq!(described.len(), 8); // 2 sizes x 4 positions
        assert!(described.contains(&s));
        assert!(described
            .iter()
            .all(|o| o.colour == s.colour && o.shape == s.shape && o.count == 2));
        assert_eq!(s.partial(1).0, "two large red circles");
        assert_eq!(s.partial(1).1.len(), 4);
        assert_eq!(s.partial(2).0, "two red circles on the left");
        assert_eq!(s.partial(2).1.len(), 2);
        let one = Scene { count: 1, ..s };
        assert_eq!(one.partial(3).0, "a large circle on the left");
        assert_eq!(one.partial(3).1.len(), 4); // 4 colours
    }

    #[test]
    fn corrupt_changes_the_caption() {
        let mut rng = StdRng::seed_from_u64(1);
        for s in Scene::all() {
            let c = s.corrupt(&mut rng);
            assert_ne!(c, s);
            assert_ne!(c.caption(0), s.caption(0));
        }
    }

    #[test]
    fn shapes_are_painted_in_their_half() {
        let mut rng = StdRng::seed_from_u64(3);
        for position in Position::ALL {
            let s = Scene {
                shape: Shape::Square,
                colour: Colour::Blue,
                size: Size::Large,
                count: 3,
                position,
            };
            let img = s.render(64, &mut rng);
            let blue = |x: u32, y: u32| {
                let p = img.get_pixel(x, y).0;
                p[2] > 150 && p[0] < 120
            };
            let mut inside = 0;
            let mut outside = 0;
            for y in 0..64 {
                for x in 0..64 {
                    if !blue(x, y) {
                        continue;
                    }
                    let in_half = match position {
                        Position::Left => x < 32,
                        Position::Right => x >= 32,
                        Position::Top => y < 32,
                        Position::Bottom => y >= 32,
                    };
                    if in_half {
                        inside += 1
                    } else {
                        outside += 1
                    }
                }
            }
            // Three large squares of side ~15 px.
            assert!(inside > 3 * 150, "{position:?}: {inside}");
            assert_eq!(outside, 0, "{position:?}");
        }
    }

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
