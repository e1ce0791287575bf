//! `synth-world`, `eval` and `capfilt-dataset`: measuring models and bootstrapping datasets.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::progress::ProgressRenderer;
use super::{CaptionCheckpointArgs, FilterArgs, RetrievalModelArgs};
use crate::engine::models::{
    select_device, BeamParams, CapFiltParams, CaptionParams, Captioner, GenerationMode,
    ModelSource, SampleParams, DEFAULT_PROMPT,
};
use crate::eval::bootstrap::{capfilt_dataset as capfilt_dataset_run, BootstrapOptions};
use crate::eval::dataset::{Dataset, DatasetFormat};
use crate::eval::evaluate::{
    evaluate_captions, evaluate_retrieval, EvalOptions, RetrievalReport, RetrievalScores,
};
use crate::eval::synth::{generate, SynthParams};

/// `blipsearch synth-world`.
#[derive(Debug, Args)]
pub struct SynthWorldArgs {
    /// Folder to write (created; must be empty or absent).
    out: PathBuf,
    /// Training images (one caption each).
    #[arg(long, default_value_t = 2000)]
    train: usize,
    /// Test images (at most 288, each a distinct scene).
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of deliberately wrong captions in train.jsonl and test_noisy.jsonl.
    #[arg(long, default_value_t = 0.2)]
    wrong_share: f64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn synth_world(a: SynthWorldArgs) -> Result<()> {
    let params = SynthParams {
        train: a.train,
        test: a.test,
        seed: a.seed,
        wrong_share: a.wrong_share,
        size: a.size,
    };
    let summary = generate(&a.out, &params)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} train images ({} wrong captions), {} test images ({} wrong in test_noisy.jsonl)",
            a.out.display(),
            summary.train_images,
            summary.train_wrong,
            summary.test_images,
            summary.test_noisy_wrong
        );
    }
    Ok(())
}

/// Which captioning checkpoint `eval` scores; none: captions are not evaluated.
#[derive(Debug, Args)]
pub struct EvalCaptionArgs {
    /// Local captioning checkpoint directory (BlipForConditionalGeneration) whose captions are
    /// scored with BLEU-4 and CIDEr.
    #[arg(long, conflicts_with = "caption_model")]
    caption_model_dir: Option<PathBuf>,
    /// Hugging Face id of a captioning checkpoint to score.
    #[arg(long)]
    caption_model: Option<String>,
}

/// Where the dataset's images are and which part of it to read.
#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// Folder the dataset's relative image paths are under (default: the dataset file's folder).
    #[arg(long)]
    images_root: Option<PathBuf>,
    /// Split of a Karpathy dataset_*.json file (test, val, train, restval).
    #[arg(long)]
    split: Option<String>,
    /// Use only the first N images (quick checks).
    #[arg(long)]
    limit: Option<usize>,
}

impl DatasetArgs {
    fn load(&self, path: &std::path::Path) -> Result<(Dataset, PathBuf)> {
        let mut data = Dataset::load(path, self.split.as_deref())?;
        if let Some(n) = self.limit {
            if n == 0 {
                bail!("--limit must be at least 1");
            }
            data.items.truncate(n);
        }
        let root = match &self.images_root {
            Some(r) => r.clone(),
            None => path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default(),
        };
        Ok((data, root))
    }
}

/// `blipsearch eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The dataset: JSON lines {"image","caption"}, a BLIP annotation JSON array
    /// (coco_karpathy_test.json) or a Karpathy dataset_coco.json (with --split).
    data: PathBuf,
    #[command(flatten)]
    dataset: DatasetArgs,
    #[command(flatten)]
    model: RetrievalModelArgs,
    #[command(flatten)]
    caption: EvalCaptionArgs,
    /// Skip retrieval (captions only).
    #[arg(long)]
    no_retrieval: bool,
    /// ITM rerank depth: the top k by ITC are rescored (BLIP: 256 COCO, 128 Flickr30k; 0: ITC
    /// only).
    #[arg(long, default_value_t = 128)]
    k: usize,
    /// Images per ViT forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Text the captions continue (stripped from them).
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Beams of the caption search.
    #[arg(long, default_value_t = 3)]
    beams: usize,
    /// Longest decoder sequence in tokens, [DEC] and prompt included.
    #[arg(long, default_value_t = 20)]
    max_length: usize,
    /// Shortest decoder sequence in tokens, [DEC] and prompt included.
    #[arg(long, default_value_t = 5)]
    min_length: usize,
    /// Write each image's generated caption as JSON lines {"image","caption"} to this file.
    #[arg(long)]
    captions_out: Option<PathBuf>,
    /// Print JSON: {"dataset","format","images","texts","retrieval":{...},"captions":{...}}.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct EvalOutput<'a> {
    dataset: String,
    format: DatasetFormat,
    images: usize,
    texts: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    retrieval: Option<&'a RetrievalReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    captions: Option<CaptionSummary>,
}

#[derive(Serialize)]
struct CaptionSummary {
    images: usize,
    bleu4: f64,
    bleu: [f64; 4],
    cider: f64,
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    let caption_source = match (&a.caption.caption_model_dir, &a.caption.caption_model) {
        (Some(d), _) => Some(ModelSource::Dir(d.clone())),
        (None, Some(id)) => Some(ModelSource::Hub(id.clone())),
        (None, None) => None,
    };
    if a.no_retrieval && caption_source.is_none() {
        bail!("nothing to evaluate: --no-retrieval without --caption-model-dir/--caption-model");
    }
    if a.beams == 0 {
        bail!("--beams must be at least 1");
    }
    let (data, root) = a.dataset.load(&a.data)?;
    let opts = EvalOptions {
        images_root: root,
        k: a.k,
        batch_size: a.batch_size,
        limits: a.model.limits()?,
        caption: CaptionParams {
            prompt: a.prompt.clone(),
            max_length: a.max_length,
            min_length: a.min_length,
            mode: GenerationMode::Beam(BeamParams {
                num_beams: a.beams,
                ..BeamParams::default()
            }),
        },
        ..EvalOptions::default()
    };
    let retrieval = if a.no_retrieval {
        None
    } else {
        let (model, _) = a.model.load()?;
        Some(evaluate_retrieval(
            &model,
            &data,
            &opts,
            &ProgressRenderer::new(),
        )?)
    };
    let captions = match &caption_source {
        Some(source) => {
            let device = select_device(&a.model.device)?;
            let model = Captioner::load(source, &device)
                .with_context(|| format!("loading caption model {}", source.name()))?;
            Some(evaluate_captions(
                &model,
                &data,
                &opts,
                &ProgressRenderer::new(),
            )?)
        }
        None => None,
    };
    if let (Some(path), Some(c)) = (&a.captions_out, &captions) {
        let mut text = String::new();
        for (item, caption) in data.items.iter().zip(&c.captions) {
            text.push_str(&serde_json::to_string(
                &serde_json::json!({"image": item.image, "caption": caption}),
            )?);
            text.push('\n');
        }
        fs_err::write(path, text)?;
    }
    let out = EvalOutput {
        dataset: a.data.display().to_string(),
        format: data.format,
        images: data.items.len(),
        texts: data.text_count(),
        retrieval: retrieval.as_ref(),
        captions: captions.as_ref().map(|c| CaptionSummary {
            images: c.images,
            bleu4: c.bleu4,
            bleu: c.bleu,
            cider: c.cider,
        }),
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!(
        "{} ({}): {} images, {} texts",
        out.dataset,
        serde_json::to_value(out.format)?.as_str().unwrap_or(""),
        out.images,
        out.texts
    );
    if let Some(r) = &retrieval {
        println!();
        println!(
            "{:<24} {:>22}   {:>22}",
            "", "image->text (TR)", "text->image (IR)"
        );
        println!(
            "{:<24} {:>6} {:>7} {:>7}   {:>6} {:>7} {:>7}",
            "", "R@1", "R@5", "R@10", "R@1", "R@5", "R@10"
        );
        let row = |name: &str, s: &RetrievalScores| {
            let (t, i) = (s.text_retrieval, s.image_retrieval);
            println!(
                "{name:<24} {:>6.1} {:>7.1} {:>7.1}   {:>6.1} {:>7.1} {:>7.1}",
                t.r1, t.r5, t.r10, i.r1, i.r5, i.r10
            );
        };
        row("ITC", &r.itc);
        if let Some(s) = &r.itm_rerank {
            row(&format!("ITC top-{} + ITM", r.k), s);
        }
    }
    if let Some(c) = &out.captions {
        println!();
        println!(
            "captions ({} images): BLEU-4 {:.1}  CIDEr {:.1}  (BLEU-1..3 {:.1} {:.1} {:.1})",
            c.images, c.bleu4, c.cider, c.bleu[0], c.bleu[1], c.bleu[2]
        );
    }
    Ok(())
}

/// `blipsearch capfilt-dataset`.
#[derive(Debug, Args)]
pub struct CapfiltDatasetArgs {
    /// The input dataset (JSON lines, BLIP annotation array, or Karpathy file with --split).
    input: PathBuf,
    /// The bootstrapped dataset to write: JSON lines {"image","caption","source","p_match",
    /// "kept"[,"wrong"]}, every text judged (kept or not).
    output: PathBuf,
    #[command(flatten)]
    dataset: DatasetArgs,
    #[command(flatten)]
    caption: CaptionCheckpointArgs,
    #[command(flatten)]
    filter: FilterArgs,
    /// Text the captions continue (stripped from them).
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print the summary as JSON: {"images","skipped","threshold","given","beam","sample",
    /// "kept","quality"}.
    #[arg(long)]
    json: bool,
}

pub(crate) fn capfilt_dataset(a: CapfiltDatasetArgs) -> Result<()> {
    let f = &a.filter;
    let limits = f.limits()?;
    let (data, root) = a.dataset.load(&a.input)?;
    let params = CapFiltParams {
        prompt: a.prompt.clone(),
        beam: BeamParams {
            num_beams: f.beams,
            ..BeamParams::default()
        },
        sampling: SampleParams {
            num_samples: f.samples,
            seed: f.seed,
            ..SampleParams::default()
        },
        threshold: f.threshold,
        ..CapFiltParams::default()
    };
    let device = select_device(&f.device)?;
    let cap_source = a.caption.source_or(None)?;
    let captioner = Captioner::load(&cap_source, &device)
        .with_context(|| format!("loading caption model {}", cap_source.name()))?;
    let filter = f.load_filter(&device)?;
    let opts = BootstrapOptions {
        images_root: root,
        batch_size: a.batch_size,
        limits,
        params,
    };
    let s = capfilt_dataset_run(
        &captioner,
        &filter,
        &data,
        &a.output,
        &opts,
        &ProgressRenderer::new(),
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    for sk in &s.skipped {
        eprintln!("skipped {}: {}", sk.image, sk.error);
    }
    println!(
        "{}: {} images ({} skipped), threshold {}",
        a.output.display(),
        s.images,
        s.skipped.len(),
        s.threshold
    );
    println!(
        "{:<8} {:>7} {:>7} {:>7}",
        "source", "texts", "kept", "dropped"
    );
    for (name, c) in [("given", s.given), ("beam", s.beam), ("sample", s.sample)] {
        println!("{name:<8} {:>7} {:>7} {:>7}", c.total, c.kept, c.dropped);
    }
    if let Some(q) = &s.quality {
        let pct = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{:.1}%", 100.0 * v));
        println!(
            "filter on marked texts: {} wrong, {} right; dropped {} wrong and {} right: precision {}, recall {}",
            q.wrong,
            q.right,
            q.dropped_wrong,
            q.dropped_right,
            pct(q.precision),
            pct(q.recall)
        );
    }
    Ok(())
}
