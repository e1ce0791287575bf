//! A seeded synthetic captioned world: small PNG scenes of a few coloured shapes with captions
//! derived from the scene, so that tiny BLIP models can be trained in minutes and their retrieval,
//! captions and CapFilt filter measured against a known truth.
//!
//! Each scene holds one group of identical shapes: a shape (circle, square, triangle), a colour
//! (red, green, blue, yellow), a size (small, large), a count (one to three) and a position (left,
//! right, top, bottom half of the image), on a light plain or lightly noisy background. That is
//! 288 distinct scenes; the test split uses each at most once, so every test caption has exactly
//! one matching test image. Training scenes are drawn from the same 288 uniformly at random, so
//! the test scenes are training scenes too, in other renderings: the default world (2000
//! training images, seed 0) holds all 200 of its test scenes among its training scenes, and 180
//! of its 200 test captions verbatim. The held-out test measures recognising new pictures of known
//! scenes, not unseen combinations of attributes. Captions come from three templates ("two large
//! red circles on the left", "there are two large red circles on the left", "on the left two
//! large red circles").
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
//! - [`scene`]: what a picture shows and the words for it (captions, partial descriptions,
//!   corruptions);
//! - [`render`]: painting a scene into pixels;
//! - [`world`]: drawing the train and test scenes and writing the world's files.
//!
//! The generator uses `rand`'s `StdRng`, so a seed gives the same world for a given `Cargo.lock`.

pub mod render;
pub mod scene;
pub mod world;

pub use scene::{Colour, Position, Scene, Shape, Size, COUNTS, PARTIAL_FORMS, TEMPLATES};
pub use world::{generate, SynthParams, SynthRecord, SynthSummary};
