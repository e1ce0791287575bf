//! blipsearch: search image collections by text, by image and by auto-generated captions, with
//! Salesforce BLIP (<https://arxiv.org/abs/2201.12086>) running in Rust on candle.
//!
//! Every top-level module, lower layers first; each depends only on modules above it in this
//! list (`ARCHITECTURE.md` in the repository walks through them):
//! - [`model`]: BLIP itself (preprocessing, tokenizer, ViT, text encoder/decoder, ITC/ITM,
//!   captioning, CapFilt); knows nothing of storage;
//! - [`index`]: storage behind the `Store` trait (the embedded collection: sled records, HNSW
//!   vectors, tantivy text, in-memory filter columns; or a Milvus collection), filters as values,
//!   and the blob store (ViT features, thumbnails); takes vectors, texts and ids, never a model;
//! - [`progress`]: progress events of long work (ingest, training, eval), rendered by the caller;
//! - [`engine`]: the only orchestrator: ingestion, uploads, removal, reindex and search over a
//!   collection with the models; the CLI and server reach everything below through it;
//! - [`train`]: fine-tuning the retrieval (ITC + ITM) and caption (LM) models;
//! - [`eval`]: a synthetic captioned world, dataset readers, BLEU/CIDEr, retrieval and caption
//!   evaluation, CapFilt over a dataset;
//! - [`server`]: `blipsearch serve`: the HTTP API, web UI, inference queue, folder sync and
//!   metrics;
//! - [`cli`]: the command line (`src/main.rs` only parses, runs and reports errors).
#![warn(missing_docs)]

pub mod cli;
pub mod engine;
pub mod eval;
pub mod index;
pub mod model;
pub mod progress;
pub mod server;
pub mod train;
