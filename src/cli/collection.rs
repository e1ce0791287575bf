//! Collection subcommands: `add`, `sync`, `remove`, `stats`, `reindex`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::engine::{IngestOptions, IngestSummary, Ingestor, LocalModels};
use crate::index::{Collection, CollectionInfo, HnswParams, ImageId};
use crate::model::capfilt::CapFiltParams;
use crate::model::caption::Captioner;
use crate::model::preprocess::DecodeBudget;
use crate::model::{select_device, Retriever};

use super::{CaptionCheckpointArgs, RetrievalModelArgs};
use crate::engine::uploads::uploads_dir;

/// Where the collection lives.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The collection directory.
    #[arg(long, env = "BLIPSEARCH_INDEX", default_value = crate::index::DEFAULT_DIR)]
    pub index: PathBuf,
}

/// Options of `add` and `sync`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    common: IngestCommon,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Files or folders (recursive).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// `reindex`.
#[derive(Debug, Args)]
pub struct ReindexArgs {
    #[command(flatten)]
    common: IngestCommon,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
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
    /// Nucleus-sampled captions per image (CapFilt), besides the beam caption.
    #[arg(long, default_value_t = 3)]
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

pub(super) fn load_models(a: &IngestCommon) -> Result<LocalModels> {
    let device = select_device(&a.model.device)?;
    let retriever =
        Retriever::load(&a.model.source(), &device).context("loading retrieval model")?;
    let captioner = if a.no_captions {
        None
    } else {
        let source = a.caption.source();
        Some(
            Captioner::load(&source, &device)
                .context("loading caption model (use --no-captions to skip captions)")?,
        )
    };
    Ok(LocalModels {
        retriever,
        captioner,
    })
}

pub(super) fn collection_info(
    retriever: &Retriever,
    captioner: Option<&Captioner>,
) -> CollectionInfo {
    let cfg = retriever.config();
    CollectionInfo::new(
        retriever.name(),
        captioner.map(|c| c.name().to_string()),
        retriever.embedding_dim(),
        cfg.vision.num_tokens(),
        cfg.vision.hidden_size,
    )
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
        capfilt,
        progress: true,
        observer: None,
        budget: DecodeBudget::new(a.decode_memory_mb << 20),
        budget_wait: None,
    })
}

/// `add` and `sync`.
pub fn ingest(a: IngestArgs, sync: bool) -> Result<()> {
    let c = &a.common;
    let models = load_models(c)?;
    let info = collection_info(&models.retriever, models.captioner.as_ref());
    let collection = RwLock::new(Collection::open(
        &c.index.index,
        &info,
        HnswParams::default(),
    )?);
    let options = ingest_options(c)?;
    let mut ingestor = Ingestor::new(&collection, &models, options)?;
    let summary = if sync {
        ingestor.sync(&a.paths)?
    } else {
        ingestor.add(&a.paths)?
    };
    print_summary(&summary, a.json)
}

/// `reindex`: embeds every image of the collection again, from its original file, with the
/// models given now, into a new collection beside the old one; the new one replaces the old only
/// once it is complete (an interrupted reindex leaves the old collection as it was).
pub fn reindex(a: ReindexArgs) -> Result<()> {
    let c = &a.common;
    let dir = &c.index.index;
    let (paths, given, ids, next_id) = {
        let old = Collection::open_existing(dir, HnswParams::default())?;
        let mut paths = Vec::new();
        let mut given = HashMap::new();
        let mut ids = HashMap::new();
        for r in old.iter() {
            let r = r?;
            paths.push(PathBuf::from(&r.path));
            given.insert(r.path.clone(), r.given_texts.clone());
            ids.insert(r.path.clone(), r.id);
        }
        (paths, given, ids, old.next_id()?)
    };
    let (present, missing): (Vec<PathBuf>, Vec<PathBuf>) =
        paths.into_iter().partition(|p| p.exists());
    for p in &missing {
        eprintln!(
            "warning: {} is gone; it will not be in the new collection",
            p.display()
        );
    }
    let models = load_models(c)?;
    let info = collection_info(&models.retriever, models.captioner.as_ref());
    let staging = sibling(dir, "reindex");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    let summary = {
        let mut fresh = Collection::open(&staging, &info, HnswParams::default())?;
        // Every image keeps its id, and ids never given are never given later either.
        fresh.reserve_ids(next_id)?;
        let fresh = RwLock::new(fresh);
        let options = ingest_options(c)?;
        let ingestor = Ingestor::new(&fresh, &models, options)?;
        ingestor
            .with_given_texts(given)
            .with_ids(ids)
            .add(&present)?
    };
    // Uploaded files live inside the collection: they move with it (the records point to
    // `<index>/uploads/...`, which is where they are again after the swap).
    let uploads = uploads_dir(dir);
    if uploads.exists() {
        std::fs::rename(&uploads, uploads_dir(&staging))
            .with_context(|| format!("moving {} into the new collection", uploads.display()))?;
    }
    let old = sibling(dir, "old");
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if let Err(e) = std::fs::rename(dir, &old) {
        // Put the uploads back: the old collection stays as it was.
        let _ = std::fs::rename(uploads_dir(&staging), &uploads);
        return Err(e).with_context(|| format!("moving {} aside", dir.display()));
    }
    std::fs::rename(&staging, dir)
        .with_context(|| format!("moving {} into place", staging.display()))?;
    std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    print_summary(&summary, a.json)
}

/// `index` -> `index.<suffix>` in the same parent folder.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    dir.with_file_name(format!("{name}.{suffix}"))
}

fn print_summary(s: &IngestSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "added {}, updated {}, unchanged {}, duplicates {}, removed {}, unsupported {}, hidden {}, failed {}",
        s.added, s.updated, s.unchanged, s.duplicates, s.removed, s.unsupported, s.hidden, s.failed.len()
    );
    for f in &s.failed {
        println!("  failed: {}: {}", f.path, f.reason);
    }
    println!("{} images in the collection", s.total);
    Ok(())
}

/// `remove`.
/// `remove`: every target is checked first; one unknown target removes nothing.
pub fn remove(a: RemoveArgs) -> Result<()> {
    let mut c = Collection::open_existing(&a.index.index, HnswParams::default())?;
    let mut ids = Vec::new();
    let mut unknown = Vec::new();
    for t in &a.targets {
        let id = match t.parse::<u64>() {
            Ok(n) => Some(ImageId(n)).filter(|id| c.get(*id).is_ok_and(|r| r.is_some())),
            Err(_) => {
                let p = std::fs::canonicalize(t).unwrap_or_else(|_| PathBuf::from(t));
                c.by_path(&p.display().to_string())?
            }
        };
        match id {
            Some(id) if !ids.contains(&id) => ids.push(id),
            Some(_) => {}
            None => unknown.push(t.as_str()),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "no such image in {}: {}; nothing was removed",
            a.index.index.display(),
            unknown.join(", ")
        );
    }
    for id in &ids {
        c.remove(*id)?;
    }
    c.commit()?;
    println!("removed {}", ids.len());
    Ok(())
}

/// `stats`.
pub fn stats(a: StatsArgs) -> Result<()> {
    let c = Collection::open_existing(&a.index.index, HnswParams::default())?;
    let s = c.stats()?;
    let info = c.info();
    if a.json {
        let v = serde_json::json!({"stats": s, "info": info});
        println!("{v}");
        return Ok(());
    }
    println!("collection {}", path_str(&a.index.index));
    println!("  images        {}", s.images);
    println!(
        "  vectors       {} (+{} tombstones)",
        s.vectors, s.tombstones
    );
    println!("  text docs     {}", s.text_docs);
    println!(
        "  retrieval     {} ({}-d, ViT {}x{})",
        info.retrieval_model, info.embedding_dim, info.vit_tokens, info.vit_hidden
    );
    println!(
        "  captions      {}",
        info.caption_model.as_deref().unwrap_or("none")
    );
    let b = s.bytes;
    println!(
        "  disk          {} total: meta {}, vectors {}, text {}, features {}, thumbs {}",
        mb(b.total()),
        mb(b.meta),
        mb(b.vectors),
        mb(b.text),
        mb(b.features),
        mb(b.thumbs)
    );
    Ok(())
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}
