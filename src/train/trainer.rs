//! The training loop: shuffled batches, one optimiser step per batch, progress events, and
//! checkpoints that an interrupted run resumes from.
//!
//! The output directory holds the latest model as an HF checkpoint (`config.json`,
//! `model.safetensors`, tokenizer files) plus `train_state.safetensors` (optimiser moments,
//! temperature, momentum encoders, queues) and `train_state.json` (step counters and options),
//! written last so that a checkpoint is complete once it exists. `train_log.jsonl` gets one line
//! of losses per step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::data::Dataset;
use super::objectives::{
    caption_loss, retrieval_losses, scalar, CaptionBatch, ItcTargets, Negatives, RetrievalBatch,
    RetrievalState, ALPHA, MOMENTUM,
};
use super::optim::{AdamW, AdamWParams, LrSchedule};
use super::params::{ParamStore, TEMP};
use super::{Result, TrainError};
use crate::model::tokenizer::BlipTokenizer;
use crate::model::TrainingMode;
use crate::progress::{Event, Progress};

/// What to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// ITC + ITM on a `BlipForImageTextRetrieval` model.
    Retrieval,
    /// LM on a `BlipForConditionalGeneration` model.
    Caption,
}

/// Training options.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// What to train.
    pub objective: Objective,
    /// Passes over the data.
    pub epochs: usize,
    /// Pairs per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// ITC queue length.
    pub queue_size: usize,
    /// Weight of the momentum targets in ITC (ramped up over the first epoch, as BLIP does).
    pub alpha: f64,
    /// Momentum of the ITC momentum encoders (BLIP: 0.995).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Positives of the ITC targets: same image (true) or the pair only.
    pub same_image_positives: bool,
    /// Caption prompt, excluded from the LM loss.
    pub prompt: String,
    /// Also checkpoint every this many steps (0: at the end of each epoch only).
    pub save_every: u64,
    /// Seed of shuffling, negative sampling, queues and initialisation.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Retrieval,
            epochs: 6,
            batch_size: 32,
            lr: 1e-5,
            min_lr: 0.0,
            warmup_steps: 0,
            weight_decay: 0.05,
            queue_size: 57600,
            alpha: ALPHA,
            momentum: MOMENTUM,
            same_image_positives: true,
            prompt: crate::model::DEFAULT_PROMPT.to_string(),
            save_every: 0,
            seed: 42,
        }
    }
}

fn default_momentum() -> f64 {
    MOMENTUM
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    step: u64,
    epoch: usize,
    config: TrainConfig,
}

const STATE_JSON: &str = "train_state.json";
const STATE_TENSORS: &str = "train_state.safetensors";

/// Whether `dir` holds a training state to resume from.
pub fn can_resume(dir: &Path) -> bool {
    dir.join(STATE_JSON).is_file() && dir.join("model.safetensors").is_file()
}

/// A training run.
pub struct Trainer {
    store: ParamStore,
    state: Option<RetrievalState>,
    opt: AdamW,
    schedule: LrSchedule,
    cfg: TrainConfig,
    tokenizer: BlipTokenizer,
    data: Dataset,
    out: PathBuf,
    step: u64,
    steps_per_epoch: u64,
}

/// What a finished run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Optimiser steps taken in this invocation.
    pub steps: u64,
    /// Steps of the whole run (after resuming, counting the earlier ones).
    pub total_steps: u64,
    /// Wall time of this invocation in seconds.
    pub seconds: f64,
    /// Mean loss of the last epoch.
    pub last_epoch_loss: f64,
}

impl Trainer {
    /// Sets up a run over `data` writing into `out`. With `resume`, the parameters, optimiser
    /// state and counters come from `out` (the options must describe the same run).
    pub fn new(
        store: ParamStore,
        data: Dataset,
        cfg: TrainConfig,
        out: &Path,
        resume: bool,
    ) -> Result<Self> {
        if cfg.batch_size < 2 && cfg.objective == Objective::Retrieval {
            return Err(TrainError::InvalidInput(
                "retrieval needs --batch-size of at least 2".into(),
            ));
        }
        if cfg.batch_size == 0 || cfg.epochs == 0 {
            return Err(TrainError::InvalidInput(
                "batch size and epochs must be positive".into(),
            ));
        }
        let side = |name: &str| Some(store.side_files_dir.join(name)).filter(|p| p.is_file());
        let tokenizer = BlipTokenizer::from_files(
            side("tokenizer.json").as_deref(),
            side("vocab.txt").as_deref(),
        )?;
        let n = data.pairs.len();
        let steps_per_epoch = if n >= cfg.batch_size {
            (n / cfg.batch_size) as u64
        } else {
            1
        };
        let total = steps_per_epoch * cfg.epochs as u64;
        let mut state = match cfg.objective {
            Objective::Retrieval => {
                if !(0.0..=1.0).contains(&cfg.momentum) {
                    return Err(TrainError::InvalidInput(
                        "momentum must be in [0, 1]".into(),
                    ));
                }
                let mut s = RetrievalState::new(&store, cfg.queue_size, cfg.seed)?;
                s.momentum_coef = cfg.momentum;
                s.targets = if cfg.same_image_positives {
                    ItcTargets::SameImage
                } else {
                    ItcTargets::Diagonal
                };
                Some(s)
            }
            Objective::Caption => None,
        };
        let vars = store
            .names()?
            .into_iter()
            .map(|n| Ok((n.clone(), store.var(&n)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut opt = AdamW::new(
            vars,
            AdamWParams {
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        );
        let mut step = 0;
        if resume {
            let path = out.join(STATE_JSON);
            let text = fs_err::read_to_string(&path).map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
            let saved: SavedState =
                serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if saved.config.objective != cfg.objective || saved.config.batch_size != cfg.batch_size
            {
                return Err(TrainError::Checkpoint {
                    path,
                    reason: "the saved run used another objective or batch size".into(),
                });
            }
            let tpath = out.join(STATE_TENSORS);
            let tensors = candle_core::safetensors::load(&tpath, &store.device).map_err(|e| {
                TrainError::Checkpoint {
                    path: tpath.clone(),
                    reason: e.to_string(),
                }
            })?;
            opt.load_state(&tensors, saved.step);
            if let Some(t) = tensors.get("param.temp") {
                store.var(TEMP)?.set(t)?;
            }
            if let Some(s) = state.as_mut() {
                s.load_tensors(&tensors)?;
            }
            step = saved.step;
        }
        let schedule = LrSchedule {
            peak: cfg.lr,
            min: cfg.min_lr,
            warmup: cfg.warmup_steps,
            total,
        };
        fs_err::create_dir_all(out).map_err(|source| TrainError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        Ok(Self {
            store,
            state,
            opt,
            schedule,
            cfg,
            tokenizer,
            data,
            out: out.to_path_buf(),
            step,
            steps_per_epoch,
        })
    }

    /// Total steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch * self.cfg.epochs as u64
    }

    /// The order of pairs in `epoch` (a function of the seed and the epoch only, so that a
    /// resumed run sees the same batches).
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.pairs.len()).collect();
        let mut rng = StdRng::seed_from_u64(
            self.cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as u64),
        );
        order.shuffle(&mut rng);
        order
    }

    /// Runs to the end, checkpointing after every epoch (and every `save_every` steps).
    pub fn run(&mut self, progress: &dyn Progress) -> Result<TrainSummary> {
        self.run_for(None, progress)
    }

    /// Like [`Trainer::run`], but stops (after a checkpoint) once this invocation has taken
    /// `max_steps` steps, as an interrupted run would; `--resume` continues it.
    pub fn run_for(
        &mut self,
        max_steps: Option<u64>,
        progress: &dyn Progress,
    ) -> Result<TrainSummary> {
        let _training = TrainingMode::enter();
        let total = self.total_steps();
        let start_step = self.step;
        progress.event(Event::Started {
            what: "steps",
            total,
            done: self.step,
        });
        let log_path = self.out.join("train_log.jsonl");
        let mut log = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| TrainError::Io {
                path: log_path.clone(),
                source,
            })?;
        let started = Instant::now();
        let mut last_epoch_loss = f64::NAN;
        let bs = self.cfg.batch_size;
        for epoch in 0..self.cfg.epochs {
            let epoch_start = epoch as u64 * self.steps_per_epoch;
            if self.step >= epoch_start + self.steps_per_epoch {
                continue;
            }
            let order = self.epoch_order(epoch);
            let mut sum = 0.0;
            let mut count = 0usize;
            for i in (self.step - epoch_start) as usize..self.steps_per_epoch as usize {
                // Whole batches only (BLIP drops the last partial one); a dataset smaller
                // than a batch is one batch.
                let chosen: Vec<usize> = if order.len() < bs {
                    order.clone()
                } else {
                    order[i * bs..(i + 1) * bs].to_vec()
                };
                let t0 = Instant::now();
                let lr = self.schedule.at(self.step);
                let (loss, parts) = self.step_on(&chosen, epoch, i)?;
                let grads = loss.backward()?;
                self.opt.step(&grads, lr)?;
                self.step += 1;
                let value = f64::from(scalar(&loss)?);
                if !value.is_finite() {
                    return Err(TrainError::InvalidInput(format!(
                        "loss became {value} at step {}: lower --lr",
                        self.step
                    )));
                }
                sum += value;
                count += 1;
                let secs = t0.elapsed().as_secs_f64();
                let rate = chosen.len() as f64 / secs.max(1e-9);
                progress.event(Event::Working {
                    item: &format!("loss {value:.4}{parts} lr {lr:.2e} {rate:.1} pairs/s"),
                });
                progress.event(Event::Done { n: 1 });
                let line = serde_json::json!({
                    "step": self.step, "epoch": epoch, "loss": value, "lr": lr, "seconds": secs,
                    "parts": parts.trim(),
                });
                writeln!(log, "{line}").map_err(|source| TrainError::Io {
                    path: log_path.clone(),
                    source,
                })?;
                if self.cfg.save_every > 0 && self.step.is_multiple_of(self.cfg.save_every) {
                    self.save(epoch)?;
                }
                if max_steps.is_some_and(|m| self.step - start_step >= m) {
                    self.save(epoch)?;
                    progress.event(Event::Finished);
                    return Ok(TrainSummary {
                        steps: self.step - start_step,
                        total_steps: self.step,
                        seconds: started.elapsed().as_secs_f64(),
                        last_epoch_loss: sum / count.max(1) as f64,
                    });
                }
            }
            last_epoch_loss = sum / count.max(1) as f64;
            self.save(epoch + 1)?;
            progress.event(Event::Note {
                line: &format!("epoch {} mean loss {last_epoch_loss:.4}", epoch + 1),
            });
        }
        progress.event(Event::Finished);
        Ok(TrainSummary {
            steps: self.step - start_step,
            total_steps: self.step,
            seconds: started.elapsed().as_secs_f64(),
            last_epoch_loss,
        })
    }

    fn step_on(&mut self, chosen: &[usize], epoch: usize, i: usize) -> Result<(Tensor, String)> {
        let pairs: Vec<_> = chosen.iter().map(|&k| &self.data.pairs[k]).collect();
        let images: Vec<usize> = pairs.iter().map(|p| p.image).collect();
        let captions: Vec<&str> = pairs.iter().map(|p| p.caption.as_str()).collect();
        let pixels = self.data.batch_pixels(&images)?;
        match self.cfg.objective {
            Objective::Retrieval => {
                let idx = pairs.iter().map(|p| p.group as i64).collect();
                let also = pairs
                    .iter()
                    .map(|p| p.also.iter().map(|&g| g as i64).collect())
                    .collect();
                let batch = RetrievalBatch::from_texts(&self.tokenizer, pixels, &captions, idx)?
                    .with_also(also)?;
                // BLIP ramps alpha up over the first epoch.
                let alpha = if epoch == 0 {
                    self.cfg.alpha * (i as f64 / self.steps_per_epoch as f64).min(1.0)
                } else {
                    self.cfg.alpha
                };
                let state = self
                    .state
                    .as_mut()
                    .ok_or_else(|| TrainError::InvalidInput("retrieval state missing".into()))?;
                let seed =
                    self.cfg.seed ^ (self.step.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let l =
                    retrieval_losses(&self.store, state, &batch, alpha, &Negatives::Sample(seed))?;
                let parts = format!(" (itc {:.4} itm {:.4})", scalar(&l.itc)?, scalar(&l.itm)?);
                Ok(((l.itc + l.itm)?, parts))
            }
            Objective::Caption => {
                let batch =
                    CaptionBatch::from_texts(&self.tokenizer, pixels, &captions, &self.cfg.prompt)?;
                Ok((caption_loss(&self.store, &batch)?, String::new()))
            }
        }
    }

    /// Writes the HF checkpoint and the training state into the output directory.
    pub fn save(&self, epoch: usize) -> Result<()> {
        // The state JSON marks a complete checkpoint: remove it while the files change.
        let json = self.out.join(STATE_JSON);
        if json.exists() {
            fs_err::remove_file(&json).map_err(|source| TrainError::Io {
                path: json.clone(),
                source,
            })?;
        }
        self.store.save_hf(&self.out)?;
        let mut tensors = self.opt.state_tensors();
        if let Ok(t) = self.store.var(TEMP) {
            tensors.insert("param.temp".into(), t.as_tensor().detach());
        }
        if let Some(s) = &self.state {
            tensors.extend(s.to_tensors()?);
        }
        let tpath = self.out.join(STATE_TENSORS);
        let tmp = self.out.join("train_state.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        fs_err::rename(&tmp, &tpath).map_err(|source| TrainError::Io {
            path: tpath.clone(),
            source,
        })?;
        let saved = SavedState {
            step: self.step,
            epoch,
            config: self.cfg.clone(),
        };
        let text = serde_json::to_string_pretty(&saved)
            .map_err(|e| TrainError::InvalidInput(e.to_string()))?;
        fs_err::write(&json, text).map_err(|source| TrainError::Io {
            path: json.clone(),
            source,
        })?;
        Ok(())
    }

    /// The parameters being trained.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }
}
