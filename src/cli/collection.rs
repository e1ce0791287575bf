//! Collection subcommands: `add`, `sync`, `import`, `remove`, `stats`, `reindex`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::progress::ProgressRenderer;
use super::{CaptionCheckpointArgs, RetrievalModelArgs};
use crate::engine::models::{select_device, CapFiltParams, DecodeBudget};
use crate::engine::{
    CollectionInfo, Engine, EngineError, ErrorKind, ImportSummary, IngestOptions, IngestSummary,
    LocalModels, Location, StoreLocation, Target,
};

/// Where the collection lives.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The collection directory.
    #[arg(long, env = "BLIPSEARCH_INDEX", default_value = crate::engine::DEFAULT_DIR)]
    pub index: PathBuf,
    /// Where the records live: `embedded` (in --index, one process at a time) or
    /// milvus://HOST:PORT/COLLECTION (shared by any number of processes; --index then holds
    /// only thumbnails, rerank features and uploads, and must be the same folder for all).
    #[arg(long, env = "BLIPSEARCH_STORE", default_value = "embedded")]
    pub store: StoreLocation,
}

impl IndexArgs {
    /// The collection's directory and store.
    pub fn location(&self) -> Location {
        Location {
            dir: self.index.clone(),
            store: self.store.clone(),
        }
    }

    /// How the collection is named in messages.
    pub fn describe(&self) -> String {
        match &self.store {
            StoreLocation::Embedded => self.index.display().to_string(),
            milvus => format!("{milvus} (blobs in {})", self.index.display()),
        }
    }
}

/// Options of `add` and `sync`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    common: IngestCommon,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// `sync` only: a folder given that no longer exists has its images removed (without it,
    /// such a folder is an error, as it may have moved: sync its new place instead and its
    /// images keep their ids).
    #[arg(long)]
    drop_vanished: bool,
    /// Files or folders (recursive).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    common: IngestCommon,
    /// Image paths of the catalogue are relative to this folder [default: the catalogue's
    /// folder].
    #[arg(long)]
    images_root: Option<PathBuf>,
    /// Also remove the products the catalogue does not name.
    #[arg(long)]
    sync: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// The catalogue: JSON lines (.jsonl, .ndjson), one product a line, or CSV (.csv), one
    /// image a row.
    catalogue: PathBuf,
}

/// `reindex`.
#[derive(Debug, Args)]
pub struct ReindexArgs {
    #[command(flatten)]
    common: IngestCommon,
    /// Only this part, in place: `pdq` computes the PDQ hash of every image that has none,
    /// from its file (no model runs), and checks those images against the match lists.
    #[arg(long, value_enum)]
    only: Option<ReindexPart>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// What `reindex --only` redoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReindexPart {
    /// PDQ hashes of images that have none.
    Pdq,
}

/// What every ingesting command takes: collection, models and batching.
#[derive(Debug, Args)]
pub struct IngestCommon {
    #[command(flatten)]
    pub(super) index: IndexArgs,
    #[command(flatten)]
    pub(super) model: RetrievalModelArgs,
    #[command(flatten)]
    caption: CaptionCheckpointArgs,
    /// Skip captions: vectors only (much faster).
    #[arg(long)]
    pub(super) no_captions: bool,
    /// Nucleus-sampled captions per image besides the beam caption (CapFilt; 0: beam caption
    /// only).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Keep a caption when ITM p(match) is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Commit (make durable and searchable) after this many new images.
    #[arg(long, default_value_t = 64)]
    commit_every: usize,
    /// Memory for decoded images, in MiB, shared by everything that decodes at once (a batch;
    /// under `serve`, every request and the folder ingest). An image that needs more alone is
    /// refused; otherwise work waits (requests: up to a few seconds, then 429).
    #[arg(long, env = "BLIPSEARCH_DECODE_MEMORY_MB", default_value_t = 2048)]
    pub(super) decode_memory_mb: u64,
}

/// `remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// Image ids or file paths.
    #[arg(required = true)]
    targets: Vec<String>,
}

/// `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What a command refused by the lock of a collection that a server has open can do instead.
#[derive(Debug, Clone, Copy)]
pub(super) enum Instead {
    Search,
    Add,
    Import,
    Remove,
    Stats,
    Moderate,
    StopFirst,
}

/// Opens the existing collection of `at`; when a running server has it open, the error says
/// how to do the same through that server.
pub(super) fn open_existing(at: &IndexArgs, instead: Instead) -> Result<Engine> {
    Engine::open_existing(at.location()).map_err(|e| explain_lock(e, &at.index, instead))
}

/// `e`, or when it is the lock of a collection a server announced, how to go through the server.
pub(super) fn explain_lock(e: EngineError, dir: &Path, instead: Instead) -> anyhow::Error {
    let url = match (e.kind(), Engine::serving_url(dir)) {
        (ErrorKind::Locked, Some(url)) => url,
        _ => return e.into(),
    };
    let how = match instead {
        Instead::Search => format!(
            "search through it: open {url}/ in a browser, or curl '{url}/api/search?q=a+red+bicycle'"
        ),
        Instead::Add => format!(
            "add through it: curl -F image=@photo.jpg {url}/api/images for a file, or give the \
             folder to the server (serve --images FOLDER) to keep it in sync"
        ),
        Instead::Import => format!(
            "send products through it: curl -F 'product={{\"product\":\"SKU-1\",\"title\":\"...\"}}' \
             -F image=@a.jpg {url}/api/products, or stop the server to import the whole catalogue"
        ),
        Instead::Remove => format!("remove through it: curl -X DELETE {url}/api/images/ID"),
        Instead::Stats => format!("ask it: curl {url}/api/status"),
        Instead::Moderate => format!(
            "go through its API (the routes are in {url}/api/openapi.json) or its web UI"
        ),
        Instead::StopFirst => "stop the server first".to_string(),
    };
    anyhow::anyhow!(
        "{e}. The server at {url} has this collection open; {how} (with -H 'Authorization: \
         Bearer KEY' when it runs with --api-key)"
    )
}

/// Loads the models `a` asks for; a model not asked for is the one `recorded` (an existing
/// collection's) was built with, else the default.
pub(super) fn load_models(
    a: &IngestCommon,
    recorded: Option<&CollectionInfo>,
) -> Result<LocalModels> {
    let device = select_device(&a.model.device)?;
    let retrieval = a
        .model
        .source_or(recorded.map(|i| i.retrieval_model.as_str()))?;
    let caption = match a.no_captions {
        true => None,
        false => Some(
            a.caption
                .source_or(recorded.and_then(|i| i.caption_model.as_deref()))?,
        ),
    };
    LocalModels::load(&retrieval, caption.as_ref(), &device).with_context(|| {
        if a.no_captions {
            "loading the retrieval model".to_string()
        } else {
            "loading the models (use --no-captions to skip the caption model)".to_string()
        }
    })
}

pub(super) fn ingest_options(a: &IngestCommon) -> Result<IngestOptions> {
    let capfilt = if a.no_captions {
        None
    } else {
        let mut p = CapFiltParams::default();
        p.sampling.num_samples = a.samples;
        p.threshold = a.threshold;
        Some(p)
    };
    if a.decode_memory_mb == 0 {
        bail!("--decode-memory-mb must be at least 1");
    }
    Ok(IngestOptions {
        batch_size: a.batch_size,
        commit_every: a.commit_every,
        limits: a.model.limits()?,
        drop_vanished: false,
        capfilt,
        budget: DecodeBudget::new(a.decode_memory_mb << 20),
        budget_wait: None,
        actor: "cli".into(),
    })
}

/// Opens the collection of `c` (created when new) with its models: the ones it was built with
/// unless `c` names others, which must then be compatible with it.
pub(super) fn open_with_models(
    c: &IngestCommon,
    instead: Instead,
) -> Result<(Engine, LocalModels)> {
    if Engine::exists(c.index.location())? {
        let engine = open_existing(&c.index, instead)?;
        let info = engine.info()?;
        let models = load_models(c, Some(&info))?;
        engine.adopt_models(&models.collection_info())?;
        Ok((engine, models))
    } else {
        let models = load_models(c, None)?;
        let engine = Engine::open(c.index.location(), &models.collection_info())?;
        Ok((engine, models))
    }
}

/// `add` and `sync`.
pub fn ingest(a: IngestArgs, sync: bool) -> Result<()> {
    let c = &a.common;
    if a.drop_vanished && !sync {
        bail!("--drop-vanished applies to sync");
    }
    let (engine, models) = open_with_models(c, Instead::Add)?;
    let summary = engine.ingest(
        &models,
        IngestOptions {
            drop_vanished: a.drop_vanished,
            ..ingest_options(c)?
        },
        &a.paths,
        sync,
        &ProgressRenderer::new(),
    )?;
    print_summary(&summary, a.json)
}

/// `import`: upserts the products of a catalogue (see [`Engine::import`]).
pub fn import(a: ImportArgs) -> Result<()> {
    let c = &a.common;
    if !a.catalogue.is_file() {
        bail!("no catalogue file {}", a.catalogue.display());
    }
    let (engine, models) = open_with_models(c, Instead::Import)?;
    let summary = engine.import_file(
        &models,
        ingest_options(c)?,
        &a.catalogue,
        a.images_root.as_deref(),
        a.sync,
        &ProgressRenderer::new(),
    )?;
    print_import(&summary, a.json)
}

fn print_import(s: &ImportSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "products: added {}, updated {}, unchanged {}, removed {}, failed {}",
        s.products_added,
        s.products_updated,
        s.products_unchanged,
        s.products_removed,
        s.products_failed
    );
    println!(
        "images: embedded {}, updated {}, unchanged {}, removed {}, failed {}",
        s.images_embedded,
        s.images_updated,
        s.images_unchanged,
        s.images_removed,
        s.failed.len()
    );
    for f in &s.failed {
        println!("  failed: {}: {}", f.path, f.reason);
    }
    if !s.malformed.is_empty() {
        println!("malformed lines: {} (skipped)", s.malformed.len());
        for m in &s.malformed {
            println!("  line {}: {}", m.line, m.reason);
        }
    }
    if let Some(why) = &s.sync_skipped {
        println!("sync removed nothing: {why}");
    }
    if !s.attributes.is_empty() {
        let types: Vec<String> = s
            .attributes
            .iter()
            .map(|(name, ty)| format!("{name} ({ty})"))
            .collect();
        println!("attributes: {}", types.join(", "));
    }
    println!("{} images in the collection", s.total);
    Ok(())
}

/// `reindex`: embeds every image of the collection again, from its original file, with the
/// models given now (see [`Engine::reindex`]).
pub fn reindex(a: ReindexArgs) -> Result<()> {
    let c = &a.common;
    if !Engine::exists(c.index.location())? {
        bail!("no collection in {}", c.index.describe());
    }
    if a.only == Some(ReindexPart::Pdq) {
        let engine = open_existing(&c.index, Instead::StopFirst)?;
        let s = engine.backfill_pdq(c.model.limits()?, "cli", &ProgressRenderer::new())?;
        if a.json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            println!(
                "PDQ: hashed {}, had a hash {}, too small {}, failed {}; {} images newly flagged",
                s.hashed,
                s.had_hash,
                s.too_small,
                s.failed.len(),
                s.flagged
            );
            for f in &s.failed {
                println!("  failed: {}: {}", f.path, f.reason);
            }
            println!("{} images in the collection", s.total);
        }
        return Ok(());
    }
    // The models asked for, else the ones it was built with (re-embedding with the same).
    let recorded = open_existing(&c.index, Instead::StopFirst)?.info()?;
    let models = load_models(c, Some(&recorded))?;
    let summary = Engine::reindex(
        c.index.location(),
        &models,
        &models.collection_info(),
        ingest_options(c)?,
        &ProgressRenderer::new(),
    )?;
    print_summary(&summary, a.json)
}

fn print_summary(s: &IngestSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "added {}, updated {}, unchanged {}, moved {}, duplicates {}, excluded {}, removed {}, unsupported {}, hidden {}, failed {}",
        s.added, s.updated, s.unchanged, s.moved, s.duplicates, s.excluded, s.removed, s.unsupported, s.hidden, s.failed.len()
    );
    for f in &s.failed {
        println!("  failed: {}: {}", f.path, f.reason);
    }
    println!("{} images in the collection", s.total);
    Ok(())
}

/// `remove`: every target is checked first; one unknown target removes nothing.
pub fn remove(a: RemoveArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Remove)?;
    let targets: Vec<Target> = a
        .targets
        .iter()
        .map(|t| t.parse().unwrap_or_else(|e| match e {}))
        .collect();
    let removed = engine.remove_all(&targets, "cli")?;
    println!("removed {removed}");
    Ok(())
}

/// `stats`.
pub fn stats(a: StatsArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Stats)?;
    let s = engine.stats()?;
    let info = engine.info()?;
    if a.json {
        let v = serde_json::json!({"stats": s, "info": info});
        println!("{v}");
        return Ok(());
    }
    let st = &s.store;
    println!("collection {}", a.index.describe());
    println!("  images        {}", st.images);
    println!(
        "  vectors       {} (+{} tombstones)",
        st.vectors, st.tombstones
    );
    println!("  text docs     {}", st.text_docs);
    println!(
        "  retrieval     {} ({}-d, ViT {}x{})",
        info.retrieval_model, info.embedding_dim, info.vit_tokens, info.vit_hidden
    );
    println!(
        "  captions      {}",
        info.caption_model.as_deref().unwrap_or("none")
    );
    let parts: Vec<String> = st
        .bytes
        .iter()
        .map(|(name, b)| format!("{name} {}", mb(*b)))
        .chain([
            format!("features {}", mb(s.features_bytes)),
            format!("thumbs {}", mb(s.thumbs_bytes)),
        ])
        .collect();
    println!(
        "  disk          {} total: {}",
        mb(s.total_bytes()),
        parts.join(", ")
    );
    Ok(())
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}
