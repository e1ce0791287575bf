//! `blipsearch search`: text or image queries against the collection.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::engine::facets::{FacetCounts, GroupBy};
use crate::engine::models::{
    load_image, retriever_info, select_device, ModelSource, NoModels, Retriever,
};
use crate::engine::search::{
    CutoffStop, Fusion, ItmCutoff, SearchHit, SearchMode, SearchParams, SearchResults,
};
use crate::engine::{AttrValue, Filter, FlagFilter, ImageId};

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
    /// Return only results that ITM judged and accepted with p(match) at least this, 0 to 1
    /// (absent things: no results). ITM then judges the candidates in rounds of --rerank-k, as
    /// deep as the matches go: it stops when every candidate is judged, when a round has no
    /// match, or at --rerank-budget; the answer says how many it judged and why it stopped.
    #[arg(long)]
    min_itm_prob: Option<f32>,
    /// With --min-itm-prob: most candidates ITM judges, 1 to 1000 (each retriever is asked for
    /// at least as many) [default: 256].
    #[arg(long, requires = "min_itm_prob")]
    rerank_budget: Option<usize>,
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
    /// Only images of products whose attribute matches: `brand:acme`, `color:red|blue` (any
    /// of), `price:10..80`, `price:..80`, `in_stock:true`, `released:2024-01-01..`,
    /// `category:shoes/*` (prefix). Repeat it for several: all must hold.
    #[arg(long = "filter", value_name = "EXPR")]
    filters: Vec<String>,
    /// Count the values of these attributes among the results: `brand,color,price`; a number
    /// takes the ranges to count, `price:..50|50..100|100..` (from inclusive, to exclusive),
    /// else automatic buckets. Repeatable.
    #[arg(long = "facet", value_name = "LIST")]
    facets: Vec<String>,
    /// One hit per product (its best image, with the product's other matching images):
    /// `product`. Paging and the total then count products.
    #[arg(long, value_name = "BY")]
    group_by: Option<String>,
    /// Only images flagged by a match list (by this list when a name is given), pending review
    /// or confirmed: not cleared.
    #[arg(long, value_name = "LIST", num_args = 0..=1, default_missing_value = "")]
    flagged: Option<String>,
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
    if let Some(list) = a.flagged.as_deref().filter(|l| !l.is_empty()) {
        if !engine.lists()?.iter().any(|l| l.name == list) {
            bail!("no match list {list:?} (`blipsearch lists` prints them)");
        }
    }
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
        rerank_budget: a.rerank_budget,
        include_self: a.include_self,
        filter: Filter {
            path_prefix: a.path_prefix.as_deref().map(folder_prefix),
            date_from: a.date_from.clone(),
            date_to: a.date_to.clone(),
            min_width: a.min_width,
            min_height: a.min_height,
            attributes: engine.parse_filters(&a.filters)?,
            flagged: a.flagged.as_deref().map(|list| FlagFilter {
                list: (!list.is_empty()).then(|| list.to_string()),
                pending_only: false,
            }),
        },
        facets: match a.facets.is_empty() {
            true => Vec::new(),
            false => engine.parse_facets(&a.facets.join(","))?,
        },
        group_by: a
            .group_by
            .as_deref()
            .map(str::parse::<GroupBy>)
            .transpose()?,
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
    let grouped = r.hits.iter().any(|h| h.group.is_some());
    if r.hits.is_empty() {
        println!("no results");
    } else {
        println!(
            "{:>4}  {:>8}  {:<5}  {:>8}  {:<40}  caption",
            "rank", "score", "by", "p(match)", "path"
        );
    }
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
        for line in hit_details(h) {
            println!("{:>6}{line}", "");
        }
    }
    let unit = if grouped { "groups" } else { "results" };
    if !r.hits.is_empty() || r.total > 0 {
        println!(
            "{} of {} {unit} (from {} candidates)",
            r.hits.len(),
            r.total,
            r.candidates
        );
    }
    if let Some(c) = &r.cutoff {
        println!("{}", cutoff_line(r.examined, r.candidates, c));
    }
    if !r.facets.is_empty() {
        println!("facets over the {} {unit}:", r.total);
        for f in &r.facets {
            println!("  {}", facet_line(f));
        }
    }
    Ok(())
}

/// What the ITM cut-off judged and why it stopped, so that an empty or short answer can be
/// trusted or not: `ITM judged 48 of 300 candidates (p(match) >= 0.5, budget 256): ...`.
fn cutoff_line(examined: usize, candidates: usize, c: &ItmCutoff) -> String {
    let why = match c.stop {
        CutoffStop::Exhausted => "every candidate judged".to_string(),
        CutoffStop::NoMatch => "stopped: its last round had no match".to_string(),
        CutoffStop::Budget => {
            "stopped at the budget while still finding matches: more may match deeper \
             (raise --rerank-budget)"
                .to_string()
        }
        CutoffStop::Deadline => {
            "stopped at the deadline while still finding matches: more may match deeper".to_string()
        }
    };
    format!(
        "ITM judged {examined} of {candidates} candidates (p(match) >= {}, budget {}): {why}",
        c.min_itm_prob, c.budget
    )
}

/// The lines under a hit: its product (id, title, attributes) and its group.
fn hit_details(h: &SearchHit) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = &h.product {
        let mut line = format!("product {}", p.id);
        if let Some(t) = &p.title {
            line.push_str(&format!(": {t}"));
        }
        let attrs: Vec<String> = p
            .attributes
            .iter()
            .map(|(k, v)| match v {
                AttrValue::Text(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        if !attrs.is_empty() {
            line.push_str(&format!("  [{}]", attrs.join(", ")));
        }
        out.push(line);
    }
    if let Some(g) = &h.group {
        let mut line = match &g.product {
            Some(id) if g.size == 1 => format!("group {id}: 1 image"),
            Some(id) => format!("group {id}: {} images", g.size),
            None => "group: this image alone".to_string(),
        };
        if !g.matching.is_empty() {
            let ids: Vec<String> = g.matching.iter().map(u64::to_string).collect();
            line.push_str(&format!(", also matching {}", ids.join(", ")));
        }
        out.push(line);
    }
    out
}

/// One facet on a line: `brand: acme 12, zenith 5 (3 without)`.
fn facet_line(f: &FacetCounts) -> String {
    let values: Vec<String> = f
        .values
        .iter()
        .map(|v| format!("{} {}", v.value, v.count))
        .collect();
    let mut line = format!(
        "{}: {}",
        f.name,
        if values.is_empty() {
            "-".to_string()
        } else {
            values.join(", ")
        }
    );
    if f.missing > 0 {
        line.push_str(&format!(" ({} without)", f.missing));
    }
    line
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
