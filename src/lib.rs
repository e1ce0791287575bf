//! blipsearch: search image collections by text, by image and by auto-generated captions, with
//! Salesforce BLIP (<https://arxiv.org/abs/2201.12086>) running in Rust on candle.
//!
//! Layers, each depending only on those above it in this list:
//! - [`model`]: BLIP itself (preprocessing, tokenizer, ViT, text encoder/decoder, ITC/ITM);
//! - [`index`]: on-disk collection storage (sled metadata, HNSW vectors, tantivy text, ViT
//!   features, thumbnails); takes vectors and ids, never a model;
//! - [`engine`]: ingestion and search over a collection with the models;
//! - [`eval`]: a synthetic captioned world, caption metrics, dataset readers, evaluation;
//! - [`server`]: the HTTP API, web UI and metrics (`blipsearch serve`);
//! - `cli`: the command-line front end.
#![warn(missing_docs)]

pub mod cli;
pub mod engine;
pub mod eval;
pub mod index;
pub mod model;
pub mod progress;
pub mod server;
pub mod train;
