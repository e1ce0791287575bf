//! The `blipsearch` command line. Each subcommand parses its options here and calls into the
//! library; output formats (`--json`) are a stable contract other tools rely on.

mod collection;
mod eval;
mod moderation;
mod progress;
mod search;
mod serve;
mod train;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::engine::models::{
    capfilt_images, load_image, rows, select_device, BeamParams, CapFiltParams, CaptionParams,
    Captioner, DecodeLimits, GenerationMode, ItmFirstToken, ModelSource, Retriever, SampleParams,
    DEFAULT_CAPTION_MODEL, DEFAULT_PROMPT, DEFAULT_RETRIEVAL_MODEL,
};

/// Search your photos by describing them, with BLIP.
#[derive(Debug, Parser)]
#[command(name = "blipsearch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print ITC embeddings (256-d, normalised) of images and texts.
    Embed(EmbedArgs),
    /// Score texts against one image: ITC cosine and ITM match probability.
    Score(ScoreArgs),
    /// Add images (files or folders, recursively) to the collection.
    Add(collection::IngestArgs),
    /// Add new and changed images under folders, and drop those whose files are gone.
    Sync(collection::IngestArgs),
    /// Import a product catalogue (JSON lines or CSV): products with their images, titles,
    /// descriptions and attributes; a re-import updates what changed.
    Import(collection::ImportArgs),
    /// Remove images (by id or path) from the collection.
    Remove(collection::RemoveArgs),
    /// Counts, disk use and models of the collection.
    Stats(collection::StatsArgs),
    /// Search the collection by text, by an image file or by an indexed image.
    Search(search::SearchArgs),
    /// Serve the web UI and JSON API over the collection, indexing --images folders in the
    /// background.
    Serve(serve::ServeArgs),
    /// List groups of near-duplicate images (ITC cosine above a threshold).
    Duplicates(search::DuplicatesArgs),
    /// Embed every image again from its file with the models given now (after a model change);
    /// `--only pdq` computes the PDQ hashes images lack, without the models.
    Reindex(collection::ReindexArgs),
    // Moderation.
    /// Match lists of known material: reference images and PDQ hashes that images of the
    /// collection are checked against (at ingest, and when entries are added).
    List(moderation::ListArgs),
    /// Print every match list with its size (as `list ls`).
    Lists(moderation::ListsArgs),
    /// Every image of the collection that matches a list entry, by PDQ distance or ITC cosine.
    Matches(moderation::MatchesArgs),
    /// The review queue: flagged images waiting for a decision; `review decide ID
    /// confirmed|cleared` records one.
    Review(moderation::ReviewArgs),
    /// The audit log: list changes, matches, decisions and deletions of flagged images.
    Audit(moderation::AuditArgs),
    // Model commands on images, without a collection.
    /// Write captions for images with a BLIP captioning checkpoint.
    Caption(CaptionArgs),
    /// CapFilt: caption an image, then keep the texts (given and generated) that ITM matches to it.
    Capfilt(CapfiltArgs),
    /// Train a retrieval (ITC + ITM) or caption (LM) model on image-caption pairs.
    Train(train::TrainArgs),
    // Datasets and evaluation.
    /// Write a seeded synthetic world of captioned shape scenes (train/test splits, wrong captions).
    SynthWorld(eval::SynthWorldArgs),
    /// Measure retrieval (recall@1/5/10, ITC and ITC + ITM rerank) and captions (BLEU-4, CIDEr) on
    /// a captioned dataset, as the BLIP paper does.
    Eval(eval::EvalArgs),
    /// Bootstrap a captioned dataset with CapFilt: caption every image, keep the texts ITM
    /// matches, and count kept and dropped texts by source.
    CapfiltDataset(eval::CapfiltDatasetArgs),
}

/// Which retrieval checkpoint to run, and where.
#[derive(Debug, Args)]
pub struct RetrievalModelArgs {
    /// Local checkpoint directory (config.json, model.safetensors or pytorch_model.bin,
    /// tokenizer.json or vocab.txt).
    #[arg(long, env = "BLIPSEARCH_MODEL_DIR", conflicts_with = "model")]
    pub model_dir: Option<PathBuf>,
    /// Hugging Face model id, downloaded into the HF cache on first use [default: the model an
    /// existing collection was built with, else Salesforce/blip-itm-base-coco].
    #[arg(long, env = "BLIPSEARCH_MODEL")]
    pub model: Option<String>,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "auto")]
    pub device: String,
    /// Refuse images larger than this many megapixels.
    #[arg(long, default_value_t = 100.0)]
    pub max_megapixels: f64,
}

/// A model as a collection records it: a directory (recorded canonical, so absolute) or a hub
/// id. A recorded directory that is gone is an error saying how to point to where it is now.
fn recorded_source(name: &str) -> Result<ModelSource> {
    let path = std::path::Path::new(name);
    if path.is_dir() {
        Ok(ModelSource::Dir(path.to_path_buf()))
    } else if path.is_absolute() {
        bail!(
            "this collection's model was loaded from {name}, which is gone: pass --model-dir (or \
             --caption-model-dir) with where it is now; the same weights anywhere are accepted"
        )
    } else {
        Ok(ModelSource::Hub(name.to_string()))
    }
}

/// The model a directory or a hub id names, if either is given.
fn asked_source(dir: &Option<PathBuf>, id: &Option<String>) -> Option<ModelSource> {
    match (dir, id) {
        (Some(dir), _) => Some(ModelSource::Dir(dir.clone())),
        (None, Some(id)) => Some(ModelSource::Hub(id.clone())),
        (None, None) => None,
    }
}

/// The model asked for, else `recorded` (an existing collection's, when given), else the hub's
/// `default`.
fn chosen_source(
    asked: Option<ModelSource>,
    recorded: Option<&str>,
    default: &str,
) -> Result<ModelSource> {
    match (asked, recorded) {
        (Some(source), _) => Ok(source),
        (None, Some(name)) => recorded_source(name),
        (None, None) => Ok(ModelSource::Hub(default.to_string())),
    }
}

impl RetrievalModelArgs {
    /// The model asked for, else `recorded` (an existing collection's), else the default.
    fn source_or(&self, recorded: Option<&str>) -> Result<ModelSource> {
        let asked = asked_source(&self.model_dir, &self.model);
        chosen_source(asked, recorded, DEFAULT_RETRIEVAL_MODEL)
    }

    pub(crate) fn limits(&self) -> Result<DecodeLimits> {
        if self.max_megapixels.is_nan() || self.max_megapixels <= 0.0 {
            bail!("--max-megapixels must be positive");
        }
        Ok(DecodeLimits {
            max_pixels: (self.max_megapixels * 1e6) as u64,
        })
    }

    fn load(&self) -> Result<(Retriever, Device)> {
        let device = select_device(&self.device)?;
        let source = self.source_or(None)?;
        let model = Retriever::load(&source, &device)
            .with_context(|| format!("loading retrieval model {}", source.name()))?;
        Ok((model, device))
    }
}

/// `blipsearch embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: RetrievalModelArgs,
    /// An image to embed (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print JSON: {"images":[{"path","embedding"}],"texts":[{"text","embedding"}]}.
    #[arg(long)]
    json: bool,
}

/// `blipsearch score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: RetrievalModelArgs,
    /// The image.
    image: PathBuf,
    /// Texts to score against it.
    #[arg(required = true)]
    texts: Vec<String>,
    /// First token of the ITM input: enc (as BLIP was trained) or cls (as HF transformers does).
    #[arg(long, value_enum, default_value_t = FirstToken::Enc)]
    itm_first_token: FirstToken,
    /// Print JSON: {"image","results":[{"text","itc","itm_logits","itm_prob"}]}.
    #[arg(long)]
    json: bool,
}

/// `--itm-first-token` values.
// The doc comments of clap items are `--help` text, written for a terminal: `[ENC]` is a token.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FirstToken {
    /// [ENC] (30523).
    Enc,
    /// [CLS] (101).
    Cls,
}

#[derive(Serialize)]
struct EmbeddedImage {
    path: String,
    embedding: Vec<f32>,
}

#[derive(Serialize)]
struct EmbeddedText {
    text: String,
    embedding: Vec<f32>,
}

#[derive(Serialize)]
struct EmbedOutput {
    images: Vec<EmbeddedImage>,
    texts: Vec<EmbeddedText>,
}

#[derive(Serialize)]
struct ScoreResult {
    text: String,
    itc: f32,
    itm_logits: [f32; 2],
    itm_prob: f32,
}

#[derive(Serialize)]
struct ScoreOutput {
    image: String,
    results: Vec<ScoreResult>,
}

/// The message of `e` and of each cause below it, joined by `: `, leaving out a cause whose
/// text the message already holds (many errors print their cause and also return it as their
/// source, which would say it twice).
pub fn error_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed(a) => embed(a),
        Command::Score(a) => score(a),
        Command::Add(a) => collection::ingest(a, false),
        Command::Sync(a) => collection::ingest(a, true),
        Command::Import(a) => collection::import(a),
        Command::Remove(a) => collection::remove(a),
        Command::Stats(a) => collection::stats(a),
        Command::Reindex(a) => collection::reindex(a),
        Command::List(a) => moderation::list(a),
        Command::Lists(a) => moderation::lists(a),
        Command::Matches(a) => moderation::matches(a),
        Command::Review(a) => moderation::review(a),
        Command::Audit(a) => moderation::audit(a),
        Command::Search(a) => search::search(a),
        Command::Serve(a) => serve::serve(a),
        Command::Duplicates(a) => search::duplicates(a),
        Command::Caption(a) => caption(a),
        Command::Capfilt(a) => capfilt(a),
        Command::Train(a) => train::train(a),
        Command::SynthWorld(a) => eval::synth_world(a),
        Command::Eval(a) => eval::eval(a),
        Command::CapfiltDataset(a) => eval::capfilt_dataset(a),
    }
}

fn embed(a: EmbedArgs) -> Result<()> {
    if a.images.is_empty() && a.texts.is_empty() {
        bail!("nothing to embed: give --image PATH and/or --text TEXT");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let limits = a.model.limits()?;
    // Decode everything first, so that a bad file fails before minutes of inference.
    let decoded = a
        .images
        .iter()
        .map(|p| load_image(p, limits))
        .collect::<Result<Vec<_>, _>>()?;
    let (model, _) = a.model.load()?;
    let mut out = EmbedOutput {
        images: Vec::new(),
        texts: Vec::new(),
    };
    for (paths, imgs) in a
        .images
        .chunks(a.batch_size)
        .zip(decoded.chunks(a.batch_size))
    {
        let emb = model.embed_images(imgs)?;
        for (p, v) in paths.iter().zip(rows(&emb.itc)?) {
            out.images.push(EmbeddedImage {
                path: p.display().to_string(),
                embedding: v,
            });
        }
    }
    if !a.texts.is_empty() {
        let texts: Vec<&str> = a.texts.iter().map(String::as_str).collect();
        let emb = model.embed_texts(&texts)?;
        for (i, (t, v)) in a.texts.iter().zip(rows(&emb.itc)?).enumerate() {
            if emb.truncated[i] {
                tracing::warn!("text {:?} was cut to BLIP's 35-token limit", t);
            }
            out.texts.push(EmbeddedText {
                text: t.clone(),
                embedding: v,
            });
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for i in &out.images {
            println!("{}\t[{}]", i.path, preview(&i.embedding));
        }
        for t in &out.texts {
            println!("{:?}\t[{}]", t.text, preview(&t.embedding));
        }
    }
    Ok(())
}

fn preview(v: &[f32]) -> String {
    let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.4}")).collect();
    format!("{}, ... ({} values)", head.join(", "), v.len())
}

fn score(a: ScoreArgs) -> Result<()> {
    let limits = a.model.limits()?;
    let image = load_image(&a.image, limits)?;
    let (model, _) = a.model.load()?;
    let texts: Vec<&str> = a.texts.iter().map(String::as_str).collect();
    let img = model.embed_images(std::slice::from_ref(&image))?;
    let txt = model.embed_texts(&texts)?;
    let cos: Vec<f32> = txt.itc.matmul(&img.itc.t()?)?.flatten_all()?.to_vec1()?;
    let first = match a.itm_first_token {
        FirstToken::Enc => ItmFirstToken::Enc,
        FirstToken::Cls => ItmFirstToken::Cls,
    };
    let itm = model.itm(&texts, &img.tokens, &vec![0; texts.len()], first)?;
    let results: Vec<ScoreResult> = a
        .texts
        .iter()
        .zip(cos)
        .zip(itm)
        .map(|((t, c), s)| ScoreResult {
            text: t.clone(),
            itc: c,
            itm_logits: s.logits,
            itm_prob: s.prob,
        })
        .collect();
    let out = ScoreOutput {
        image: a.image.display().to_string(),
        results,
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.image);
        println!("{:>8}  {:>8}  text", "itc", "p(match)");
        for r in &out.results {
            println!("{:>8.4}  {:>8.4}  {}", r.itc, r.itm_prob, r.text);
        }
    }
    Ok(())
}

// `caption` and `capfilt`.

/// Which captioning checkpoint to run, and where.
#[derive(Debug, Args)]
pub struct CaptionModelArgs {
    /// Local captioning checkpoint directory (config.json, model.safetensors or
    /// pytorch_model.bin, tokenizer.json or vocab.txt). Also accepted as --model-dir.
    #[arg(
        long = "caption-model-dir",
        alias = "model-dir",
        env = "BLIPSEARCH_CAPTION_MODEL_DIR",
        conflicts_with = "model"
    )]
    pub model_dir: Option<PathBuf>,
    /// Hugging Face model id of a BlipForConditionalGeneration checkpoint, downloaded into the HF
    /// cache on first use. Also accepted as --model.
    #[arg(
        long = "caption-model",
        alias = "model",
        env = "BLIPSEARCH_CAPTION_MODEL",
        default_value = DEFAULT_CAPTION_MODEL
    )]
    pub model: String,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "auto")]
    pub device: String,
    /// Refuse images larger than this many megapixels.
    #[arg(long, default_value_t = 100.0)]
    pub max_megapixels: f64,
}

/// Prompt and lengths shared by `caption` and `capfilt`.
// The doc comments of clap items are `--help` text, written for a terminal: `[DEC]` is a token.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Args)]
pub struct GenerationArgs {
    /// Text the captions continue (stripped from the output); may be empty.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Longest decoder sequence in tokens, [DEC] and prompt included (as HF and BLIP count).
    #[arg(long, default_value_t = 20)]
    pub max_length: usize,
    /// Shortest decoder sequence before [SEP] may end it, [DEC] and prompt included.
    #[arg(long, default_value_t = 5)]
    pub min_length: usize,
}

/// `blipsearch caption`.
#[derive(Debug, Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    model: CaptionModelArgs,
    /// Images to caption.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Greedy decoding instead of beam search.
    #[arg(long, conflicts_with_all = ["beams", "sample"])]
    greedy: bool,
    /// Beam search with N beams (the default, with 3).
    #[arg(long, value_name = "N", conflicts_with = "sample")]
    beams: Option<usize>,
    /// Nucleus sampling instead of beam search (BLIP's CapFilt captioner).
    #[arg(long)]
    sample: bool,
    /// Sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.9, requires = "sample")]
    top_p: f32,
    /// Sampling: keep at most this many tokens before top-p (0: no limit; 50 is HF's default).
    #[arg(long, default_value_t = 50, requires = "sample")]
    top_k: usize,
    /// Sampling: HF repetition penalty on every token already in the sequence.
    #[arg(long, default_value_t = 1.1, requires = "sample")]
    repetition_penalty: f32,
    /// Sampling: random seed.
    #[arg(long, default_value_t = 0, requires = "sample")]
    seed: u64,
    /// Sampling: captions per image.
    #[arg(long, default_value_t = 1, requires = "sample")]
    samples: usize,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Images per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Print JSON: {"captions":[{"image","text","token_ids"}]}, one entry per caption.
    #[arg(long)]
    json: bool,
}

/// Which captioning checkpoint to run (`capfilt`, `add`, `sync`, `reindex`).
#[derive(Debug, Args)]
pub struct CaptionCheckpointArgs {
    /// Local captioning checkpoint directory (BlipForConditionalGeneration).
    #[arg(
        long,
        env = "BLIPSEARCH_CAPTION_MODEL_DIR",
        conflicts_with = "caption_model"
    )]
    caption_model_dir: Option<PathBuf>,
    /// Hugging Face id of the captioning checkpoint [default: the one an existing collection
    /// was built with, else Salesforce/blip-image-captioning-base].
    #[arg(long, env = "BLIPSEARCH_CAPTION_MODEL")]
    caption_model: Option<String>,
}

impl CaptionCheckpointArgs {
    /// The model asked for, else `recorded` (an existing collection's), else the default.
    fn source_or(&self, recorded: Option<&str>) -> Result<ModelSource> {
        let asked = asked_source(&self.caption_model_dir, &self.caption_model);
        chosen_source(asked, recorded, DEFAULT_CAPTION_MODEL)
    }
}

/// What `capfilt` and `capfilt-dataset` share: the filter's checkpoint, the device, the image
/// limit, and how many captions are written and judged.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Local retrieval checkpoint directory (BlipForImageTextRetrieval), whose ITM head filters.
    /// Also accepted as --itm-model-dir.
    #[arg(
        long = "model-dir",
        alias = "itm-model-dir",
        env = "BLIPSEARCH_MODEL_DIR",
        conflicts_with = "itm_model"
    )]
    itm_model_dir: Option<PathBuf>,
    /// Hugging Face id of the retrieval checkpoint. Also accepted as --itm-model.
    #[arg(
        long = "model",
        alias = "itm-model",
        env = "BLIPSEARCH_MODEL",
        default_value = DEFAULT_RETRIEVAL_MODEL
    )]
    itm_model: String,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "auto")]
    device: String,
    /// Refuse images larger than this many megapixels.
    #[arg(long, default_value_t = 100.0)]
    max_megapixels: f64,
    /// Nucleus-sampled captions per image besides the beam caption (0: beam caption only).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Keep a text when ITM's p(match) is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Beams of the beam-search caption.
    #[arg(long, default_value_t = 3)]
    beams: usize,
    /// Sampling: random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl FilterArgs {
    /// Checks the values and returns the image decoding limits.
    fn limits(&self) -> Result<DecodeLimits> {
        if self.beams == 0 {
            bail!("--beams must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            bail!("--threshold must be between 0 and 1");
        }
        megapixel_limits(self.max_megapixels)
    }

    /// Loads the filtering retrieval model.
    fn load_filter(&self, device: &Device) -> Result<Retriever> {
        let source = source_of(&self.itm_model_dir, &self.itm_model);
        Retriever::load(&source, device)
            .with_context(|| format!("loading retrieval model {}", source.name()))
    }
}

/// `blipsearch capfilt`.
#[derive(Debug, Args)]
pub struct CapfiltArgs {
    #[command(flatten)]
    caption: CaptionCheckpointArgs,
    #[command(flatten)]
    filter: FilterArgs,
    /// The image.
    image: PathBuf,
    /// A text that came with the image (alt text, title...), filtered like the captions
    /// (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Sampling: keep at most this many tokens before top-p (0: no limit).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Sampling: HF repetition penalty.
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f32,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Print JSON: {"image","threshold","candidates":[{"source","text","p_match","kept"}]}.
    #[arg(long)]
    json: bool,
}

fn megapixel_limits(max_megapixels: f64) -> Result<DecodeLimits> {
    if max_megapixels.is_nan() || max_megapixels <= 0.0 {
        bail!("--max-megapixels must be positive");
    }
    Ok(DecodeLimits {
        max_pixels: (max_megapixels * 1e6) as u64,
    })
}

fn source_of(dir: &Option<PathBuf>, id: &str) -> ModelSource {
    match dir {
        Some(dir) => ModelSource::Dir(dir.clone()),
        None => ModelSource::Hub(id.to_string()),
    }
}

fn load_captioner(source: &ModelSource, device: &Device) -> Result<Captioner> {
    Captioner::load(source, device)
        .with_context(|| format!("loading caption model {}", source.name()))
}

#[derive(Serialize)]
struct CaptionEntry {
    image: String,
    text: String,
    token_ids: Vec<u32>,
}

#[derive(Serialize)]
struct CaptionOutput {
    captions: Vec<CaptionEntry>,
}

fn caption(a: CaptionArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mode = if a.greedy {
        GenerationMode::Greedy
    } else if a.sample {
        if a.samples == 0 {
            bail!("--samples must be at least 1");
        }
        GenerationMode::Sample(SampleParams {
            top_p: a.top_p,
            top_k: a.top_k,
            repetition_penalty: a.repetition_penalty,
            num_samples: a.samples,
            seed: a.seed,
        })
    } else {
        let num_beams = a.beams.unwrap_or(3);
        if num_beams == 0 {
            bail!("--beams must be at least 1");
        }
        GenerationMode::Beam(BeamParams {
            num_beams,
            ..BeamParams::default()
        })
    };
    let params = CaptionParams {
        prompt: a.generation.prompt.clone(),
        max_length: a.generation.max_length,
        min_length: a.generation.min_length,
        mode,
    };
    let limits = megapixel_limits(a.model.max_megapixels)?;
    // Decode everything first, so that a bad file fails before minutes of inference.
    let decoded = a
        .images
        .iter()
        .map(|p| load_image(p, limits))
        .collect::<Result<Vec<_>, _>>()?;
    let device = select_device(&a.model.device)?;
    let model = load_captioner(&source_of(&a.model.model_dir, &a.model.model), &device)?;
    let mut out = CaptionOutput {
        captions: Vec::new(),
    };
    for (paths, imgs) in a
        .images
        .chunks(a.batch_size)
        .zip(decoded.chunks(a.batch_size))
    {
        for (p, caps) in paths.iter().zip(model.caption_images(imgs, &params)?) {
            for c in caps {
                out.captions.push(CaptionEntry {
                    image: p.display().to_string(),
                    text: c.text,
                    token_ids: c.token_ids,
                });
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for c in &out.captions {
            println!("{}\t{}", c.image, c.text);
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct CapfiltEntry {
    source: crate::engine::models::CandidateSource,
    text: String,
    p_match: f32,
    kept: bool,
}

#[derive(Serialize)]
struct CapfiltOutput {
    image: String,
    threshold: f32,
    candidates: Vec<CapfiltEntry>,
}

fn capfilt(a: CapfiltArgs) -> Result<()> {
    let f = &a.filter;
    let limits = f.limits()?;
    let params = CapFiltParams {
        prompt: a.generation.prompt.clone(),
        max_length: a.generation.max_length,
        min_length: a.generation.min_length,
        beam: BeamParams {
            num_beams: f.beams,
            ..BeamParams::default()
        },
        sampling: SampleParams {
            top_p: a.top_p,
            top_k: a.top_k,
            repetition_penalty: a.repetition_penalty,
            num_samples: f.samples,
            seed: f.seed,
        },
        threshold: f.threshold,
    };
    let image = load_image(&a.image, limits)?;
    let device = select_device(&f.device)?;
    let captioner = load_captioner(&a.caption.source_or(None)?, &device)?;
    let filter = f.load_filter(&device)?;
    let candidates = capfilt_images(
        &captioner,
        &filter,
        std::slice::from_ref(&image),
        std::slice::from_ref(&a.texts),
        &params,
    )?
    .pop()
    .unwrap_or_default();
    let out = CapfiltOutput {
        image: a.image.display().to_string(),
        threshold: f.threshold,
        candidates: candidates
            .into_iter()
            .map(|c| CapfiltEntry {
                source: c.source,
                text: c.text,
                p_match: c.p_match,
                kept: c.kept,
            })
            .collect(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.image);
        println!("{:>8}  {:>4}  {:<6}  text", "p(match)", "keep", "source");
        for c in &out.candidates {
            let source = serde_json::to_value(c.source)?;
            println!(
                "{:>8.4}  {:>4}  {:<6}  {}",
                c.p_match,
                if c.kept { "yes" } else { "no" },
                source.as_str().unwrap_or(""),
                c.text
            );
        }
    }
    Ok(())
}
