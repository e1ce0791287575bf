//! The `blipsearch` command line. Each subcommand parses its options here and calls into the
//! library; output formats (`--json`) are a stable contract other tools rely on.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::model::preprocess::{load_image, DecodeLimits};
use crate::model::retrieval::rows;
use crate::model::weights::DEFAULT_RETRIEVAL_MODEL;
use crate::model::{select_device, ItmFirstToken, ModelSource, Retriever};

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
}

/// Which retrieval checkpoint to run, and where.
#[derive(Debug, Args)]
pub struct RetrievalModelArgs {
    /// Local checkpoint directory (config.json, model.safetensors or pytorch_model.bin,
    /// tokenizer.json or vocab.txt).
    #[arg(long, env = "BLIPSEARCH_MODEL_DIR", conflicts_with = "model")]
    pub model_dir: Option<PathBuf>,
    /// Hugging Face model id, downloaded into the HF cache on first use.
    #[arg(long, env = "BLIPSEARCH_MODEL", default_value = DEFAULT_RETRIEVAL_MODEL)]
    pub model: String,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "auto")]
    pub device: String,
    /// Refuse images larger than this many megapixels.
    #[arg(long, default_value_t = 100.0)]
    pub max_megapixels: f64,
}

impl RetrievalModelArgs {
    fn source(&self) -> ModelSource {
        match &self.model_dir {
            Some(dir) => ModelSource::Dir(dir.clone()),
            None => ModelSource::Hub(self.model.clone()),
        }
    }

    fn limits(&self) -> Result<DecodeLimits> {
        if self.max_megapixels.is_nan() || self.max_megapixels <= 0.0 {
            bail!("--max-megapixels must be positive");
        }
        Ok(DecodeLimits {
            max_pixels: (self.max_megapixels * 1e6) as u64,
        })
    }

    fn load(&self) -> Result<(Retriever, Device)> {
        let device = select_device(&self.device)?;
        let source = self.source();
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

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed(a) => embed(a),
        Command::Score(a) => score(a),
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
