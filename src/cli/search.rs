//! `blipsearch search`: text or image queries against the collection.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::engine::models::{
    load_image, retriever_info, select_device, ModelSource, NoModels, Retriever,
};
use crate::engine::search::{Fusion, SearchMode, SearchParams, SearchResults};
use crate::engine::{Filter, ImageId};

use super::collection::{open_existing, IndexArgs, Instead};
use super::recorded_source;

/// `search`.
#[derive(Debug, Args)]
pub struct SearchArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// What to look for, in words.
    #[arg(required_unless_present_any = ["image", "similar_to"])]
    query: Option<String>,
    /// Search by an image file instead.
    #[arg(long, conflicts_with_all = ["query", "similar_to"])]
    image: Option<PathBuf>,
    /// Search for images like an indexed one (its id).
    #[arg(long, conflicts_with_all = ["query", "image"])]
    similar_to: Option<u64>,
    /// With --similar-to: keep that image in the results (left out by default).
    #[arg(long, requires = "similar_to")]
    include_self: bool,
    /// Candidates from each retriever.
    #[arg(long, default_value_t = 100)]
    k: usize,
    /// Candidates reranked with ITM (0: off) [default: 16 for a text query; a search by image
    /// cannot rerank].
    #[arg(long)]
    rerank_k: Option<usize>,
    /// Where candidates come from: hybrid (ITC vectors and BM25, fused), vector (ITC only) or
    /// text (BM25 over captions, given texts and file names only). In every mode the best
    /// --rerank-k candidates are then reranked with ITM.
    #[arg(long, default_value = "hybrid")]
    mode: String,
    /// Fuse with weights `VECTOR,TEXT` instead of reciprocal rank fusion.
    #[arg(long, value_name = "VECTOR,TEXT")]
    weighted: Option<String>,
    /// HNSW search breadth.
    #[arg(long)]
    ef: Option<usize>,
    /// Results shown.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Results skipped.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Return only reranked results with ITM p(match) at least this (absent things: no results).
    #[arg(long)]
    min_itm_prob: Option<f32>,
    /// Only images in this folder (an existing folder, relative or not, means the images inside
    /// it; anything else is a prefix of the absolute path). Also accepted as --path-prefix.
    #[arg(long = "folder", alias = "path-prefix", value_name = "PATH")]
    path_prefix: Option<String>,
    /// Only images taken (EXIF) on or after YYYY-MM-DD.
    #[arg(long)]
    date_from: Option<String>,
    /// Only images taken (EXIF) on or before YYYY-MM-DD.
    #[arg(long)]
    date_to: Option<String>,
    /// Minimum width in pixels.
    #[arg(long)]
    min_width: Option<u32>,
    /// Minimum height in pixels.
    #[arg(long)]
    min_height: Option<u32>,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "auto")]
    device: String,
    /// The retrieval model's directory, when it is no longer where the collection recorded it
    /// (the same weights anywhere are accepted, and remembered) [default: the collection's].
    #[arg(long, env = "BLIPSEARCH_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `search`.
pub fn search(a: SearchArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Search)?;
    let fusion = match &a.weighted {
        None => Fusion::default(),
        Some(w) => {
            let parts: Vec<f32> = w
                .split(',')
                .map(|x| x.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .context("--weighted takes two numbers, VECTOR,TEXT")?;
            if parts.len() != 2 {
                bail!("--weighted takes two numbers, VECTOR,TEXT");
            }
            Fusion::Weighted {
                vector: parts[0],
                text: parts[1],
            }
        }
    };
    let params = SearchParams {
        k: a.k,
        rerank_k: a.rerank_k,
        mode: a.mode.parse::<SearchMode>()?,
        fusion,
        ef: a.ef,
        limit: a.limit,
        offset: a.offset,
        min_itm_prob: a.min_itm_prob,
        include_self: a.include_self,
        filter: Filter {
            path_prefix: a.path_prefix.as_deref().map(folder_prefix),
            date_from: a.date_from.clone(),
            date_to: a.date_to.clone(),
            min_width: a.min_width,
            min_height: a.min_height,
            attributes: Vec::new(),
        },
        facets: Vec::new(),
        group_by: None,
    };
    // More like this compares stored vectors, and BM25 without rerank reads no model.
    let text_only = params.mode == SearchMode::Text && params.rerank_k == Some(0);
    if a.similar_to.is_some() || (a.image.is_none() && text_only) {
        let results = match a.similar_to {
            Some(id) => engine.search_similar(&NoModels, ImageId(id), &params)?,
            None => {
                engine.search_text(&NoModels, a.query.as_deref().unwrap_or_default(), &params)?
            }
        };
        return print(&results, a.json);
    }
    let name = engine.info()?.retrieval_model;
    let source = match &a.model_dir {
        Some(dir) => ModelSource::Dir(dir.clone()),
        None => recorded_source(&name)?,
    };
    let device = select_device(&a.device)?;
    let retriever = Retriever::load(&source, &device)
        .with_context(|| format!("loading {name}, the model this collection was built with"))?;
    engine.adopt_models(&retriever_info(&retriever))?;
    let results = match &a.image {
        Some(p) => {
            let img = load_image(p, Default::default())?;
            engine.search_image(&retriever, &img, &params)?
        }
        None => engine.search_text(&retriever, a.query.as_deref().unwrap_or_default(), &params)?,
    };
    print(&results, a.json)
}

/// The path prefix `--folder` means: an existing folder's canonical path with a separator (its
/// images, not those of a sibling whose name starts the same), else the absolute form of what
/// was given, as every stored path is absolute and canonical.
fn folder_prefix(given: &str) -> String {
    let p = std::path::Path::new(given);
    if p.is_dir() {
        if let Ok(c) = std::fs::canonicalize(p) {
            let mut s = c.display().to_string();
            if !s.ends_with(std::path::MAIN_SEPARATOR) {
                s.push(std::path::MAIN_SEPARATOR);
            }
            return s;
        }
    }
    std::path::absolute(p)
        .map(|a| a.display().to_string())
        .unwrap_or_else(|_| given.to_string())
}

fn print(r: &SearchResults, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    for n in &r.notices {
        eprintln!("note: {n}");
    }
    if r.hits.is_empty() {
        println!("no results");
        return Ok(());
    }
    println!(
        "{:>4}  {:>8}  {:<5}  {:>8}  {:<40}  caption",
        "rank", "score", "by", "p(match)", "path"
    );
    for (i, h) in r.hits.iter().enumerate() {
        let p = h
            .itm_prob
            .map(|p| format!("{p:.3}"))
            .unwrap_or_else(|| "-".into());
        // Reranked scores (ITM logit + ITC) and fused scores are on different scales.
        let by = if h.reranked { "itm" } else { "fused" };
        let cap = h.captions.first().map(|c| c.text.as_str()).unwrap_or("");
        println!(
            "{:>4}  {:>8.4}  {:<5}  {:>8}  {:<40}  {}",
            i + 1,
            h.score,
            by,
            p,
            h.path,
            cap
        );
    }
    Ok(())
}

/// `duplicates`.
#[derive(Debug, Args)]
pub struct DuplicatesArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// Images whose ITC cosine is at least this are grouped.
    #[arg(long, default_value_t = 0.95)]
    threshold: f32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `duplicates`.
pub fn duplicates(a: DuplicatesArgs) -> Result<()> {
    let groups = open_existing(&a.index, Instead::StopFirst)?.duplicates(a.threshold)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "groups": groups }))?
        );
        return Ok(());
    }
    if groups.is_empty() {
        println!("no near-duplicates at cosine >= {}", a.threshold);
    }
    for (i, g) in groups.iter().enumerate() {
        println!(
            "group {} ({} images, max cosine {:.4})",
            i + 1,
            g.images.len(),
            g.max_cosine
        );
        for (id, path) in &g.images {
            println!("  {id:>8}  {path}");
        }
    }
    Ok(())
}
