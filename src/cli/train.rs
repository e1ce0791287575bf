//! `blipsearch train`: fine-tune or train from scratch a retrieval (ITC + ITM) or captioning
//! (LM) model on a caption dataset, writing HF checkpoints.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::engine::models::{select_device, BlipArchitecture};
use crate::train::data::Dataset;
use crate::train::trainer::can_resume;
use crate::train::{Objective, ParamStore, TrainConfig, Trainer};

/// What `--objective` trains.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ObjectiveArg {
    /// ITC + ITM (a BlipForImageTextRetrieval checkpoint).
    Retrieval,
    /// LM (a BlipForConditionalGeneration checkpoint).
    Caption,
}

/// `blipsearch train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// retrieval (ITC + ITM) or caption (LM).
    #[arg(long, value_enum)]
    objective: ObjectiveArg,
    /// Dataset: JSON lines {"image": path, "caption": text}, or a COCO Karpathy-style JSON.
    #[arg(long)]
    data: PathBuf,
    /// Folder the dataset's image paths are relative to (default: the dataset file's folder).
    #[arg(long)]
    images_root: Option<PathBuf>,
    /// Start from this HF checkpoint directory (fine-tuning).
    #[arg(long, conflicts_with = "config", required_unless_present_any = ["config", "resume"])]
    init: Option<PathBuf>,
    /// Start from scratch with this config.json (BLIP/HF initialisation).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokenizer files for a from-scratch run (default: the folder of --config).
    #[arg(long)]
    tokenizer_dir: Option<PathBuf>,
    /// Output directory: the latest checkpoint (HF format) and the training state.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run whose state is in --out.
    #[arg(long)]
    resume: bool,
    /// Passes over the data.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Pairs per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (BLIP fine-tuning: 1e-5 retrieval, 1e-5 captions).
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Learning rate at the end of the cosine.
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// ITC feature queue length (BLIP: 57600 on COCO; keep it below the dataset size).
    #[arg(long, default_value_t = 57600)]
    queue_size: usize,
    /// Weight of the momentum model's soft targets in ITC.
    #[arg(long, default_value_t = 0.4)]
    alpha: f64,
    /// Momentum of the ITC momentum encoders (BLIP: 0.995; lower learns faster from scratch).
    #[arg(long, default_value_t = 0.995)]
    momentum: f64,
    /// ITC positives are only the pair itself (BLIP's released code), not every caption of the
    /// same image.
    #[arg(long)]
    diagonal_itc_targets: bool,
    /// Caption prompt (excluded from the LM loss).
    #[arg(long, default_value = crate::engine::models::DEFAULT_PROMPT)]
    prompt: String,
    /// Also checkpoint every N steps (0: after each epoch only).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Stop after this many steps of this invocation, with a checkpoint (as if interrupted;
    /// `--resume` continues the run).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Seed of initialisation, shuffling, queues and negative sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// auto, cpu or cuda:N (cuda needs the `cuda` feature).
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "cpu")]
    device: String,
}

/// Runs `blipsearch train`.
pub fn train(a: TrainArgs) -> Result<()> {
    let device = select_device(&a.device)?;
    let (objective, arch) = match a.objective {
        ObjectiveArg::Retrieval => (Objective::Retrieval, BlipArchitecture::Retrieval),
        ObjectiveArg::Caption => (Objective::Caption, BlipArchitecture::Captioning),
    };
    let resume = a.resume && can_resume(&a.out);
    if a.resume && !resume && a.init.is_none() && a.config.is_none() {
        bail!(
            "--resume: {} holds no training state, and neither --init nor --config says how to start",
            a.out.display()
        );
    }
    let store = if resume {
        eprintln!("resuming from {}", a.out.display());
        ParamStore::from_checkpoint(&a.out, arch, &device)
            .with_context(|| format!("loading {}", a.out.display()))?
    } else if let Some(init) = &a.init {
        ParamStore::from_checkpoint(init, arch, &device)
            .with_context(|| format!("loading {}", init.display()))?
    } else if let Some(config) = &a.config {
        let side = match &a.tokenizer_dir {
            Some(d) => d.clone(),
            None => config.parent().map(PathBuf::from).unwrap_or_default(),
        };
        ParamStore::from_config(config, &side, arch, &device, a.seed)
            .with_context(|| format!("initialising from {}", config.display()))?
    } else {
        bail!("give --init CHECKPOINT_DIR or --config config.json");
    };
    let size = store.config.vision.image_size;
    let data = Dataset::load(&a.data, a.images_root.as_deref(), size, &device)
        .with_context(|| format!("reading {}", a.data.display()))?;
    if !data.skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable or missing image(s) (first: {}: {})",
            data.skipped.len(),
            data.skipped[0].0.display(),
            data.skipped[0].1
        );
    }
    eprintln!(
        "{} pairs, {} images at {size}x{size}",
        data.pairs.len(),
        data.images.len()
    );
    let cfg = TrainConfig {
        objective,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        queue_size: a.queue_size,
        alpha: a.alpha,
        momentum: a.momentum,
        same_image_positives: !a.diagonal_itc_targets,
        prompt: a.prompt.clone(),
        save_every: a.save_every,
        seed: a.seed,
    };
    let mut trainer = Trainer::new(store, data, cfg, &a.out, resume)?;
    let summary = trainer.run_for(a.stop_after, &super::progress::ProgressRenderer::new())?;
    eprintln!(
        "trained {} steps ({} in all) in {:.1} s; last epoch mean loss {:.4}; checkpoint in {}",
        summary.steps,
        summary.total_steps,
        summary.seconds,
        summary.last_epoch_loss,
        a.out.display()
    );
    Ok(())
}
