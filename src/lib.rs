//! blipsearch: search image collections by text, by image and by auto-generated captions, with
//! Salesforce BLIP (<https://arxiv.org/abs/2201.12086>) running in Rust on candle.
//!
//! Layers, each depending only on those above it in this list:
//! - [`model`]: BLIP itself (preprocessing, tokenizer, ViT, text encoder/decoder, ITC/ITM);
//! - [`progress`]: progress events of long work, rendered by the caller;
//! - [`index`]: storage behind the `Store` trait (the embedded collection: sled records, HNSW
//!   vectors, tantivy text, in-memory filter columns) and the blob store (ViT features,
//!   thumbnails); takes vectors, texts and ids, never a model;
//! - [`engine`]: the only orchestrator: ingestion, uploads, removal, reindex and search over a
//!   collection with the models; the CLI and server reach everything below through it;
//! - [`train`]: fine-tuning the retrieval and caption models;
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
