//! blipsearch: search image collections by text, by image and by auto-generated captions, with
//! Salesforce BLIP (<https://arxiv.org/abs/2201.12086>) running in Rust on candle.
//!
//! Layers, each depending only on those above it in this list:
//! - [`model`]: BLIP itself (preprocessing, tokenizer, ViT, text encoder/decoder, ITC/ITM);
//! - [`index`]: on-disk collection storage (sled metadata, HNSW vectors, tantivy text, ViT
//!   features, thumbnails); takes vectors and ids, never a model;
//! - [`eval`]: a synthetic captioned world, caption metrics, dataset readers, evaluation;
//! - `cli`: the command-line front end.
#![warn(missing_docs)]

pub mod cli;
pub mod engine;
pub mod eval;
pub mod index;
pub mod model;
pub mod train;
