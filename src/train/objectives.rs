//! The networks over the trainable parameters and BLIP's three losses.
//!
//! Retrieval (`BLIP_Retrieval.forward` in `salesforce/BLIP` `models/blip_retrieval.py`):
//! - **ITC**: image and text features are matched against the momentum encoders' features of the
//!   batch and of the feature queues; the targets mix the momentum model's softmax (weight
//!   `alpha`) with the ground truth; temperature learnable, clamped to [0.001, 0.5];
//! - **ITM**: the text encoder with cross-attention over the image tokens and [ENC] as first
//!   token classifies the positive pairs, one hard negative image per text and one hard negative
//!   text per image, each drawn in proportion to softmax(ITC similarity) with the pairs of the
//!   same image excluded.
//!
//! Captioning (`BLIP_Decoder.forward` in `models/blip.py`, loss in `models/med.py`): **LM**, the
//! cross-entropy of the next token with label smoothing 0.1, [DEC] first, the prompt and padding
//! excluded (label -100).
//!
//! One deliberate difference from the released BLIP code: its `blip_retrieval.py` computes ITC
//! targets from the image ids (so that two captions of one image are both positives, as in the
//! paper and in ALBEF) and then overwrites them with the identity by mistake; we keep the id
//! targets ([`ItcTargets::SameImage`]). [`ItcTargets::Diagonal`] reproduces the released code.

use std::collections::HashMap;

use candle_core::{DType, IndexOp, Module, Tensor, D};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::nets::{has_momentum_copy, Encoders};
pub use super::nets::{CaptionNet, RetrievalNet};
use super::params::{ParamStore, TEMP};
use super::{Result, TrainError};
use crate::model::layers::{l2_normalize, log_softmax_diff, softmax_diff};
use crate::model::tokenizer::{BlipTokenizer, DEC, ENC, MAX_TEXT_TOKENS};

/// BLIP's momentum coefficient.
pub const MOMENTUM: f64 = 0.995;
/// BLIP's weight of the momentum distillation targets.
pub const ALPHA: f64 = 0.4;
/// Label smoothing of the LM loss.
pub const LABEL_SMOOTHING: f64 = 0.1;
/// Longest caption in tokens for LM training (BLIP's decoder: 40).
pub const MAX_CAPTION_TOKENS: usize = 40;
/// The label of a position left out of the LM loss.
pub const IGNORE: i64 = -100;

/// One retrieval batch.
pub struct RetrievalBatch {
    /// Preprocessed images `(B, 3, S, S)`.
    pub pixels: Tensor,
    /// `[CLS] caption [SEP]` token ids `(B, L)` u32, padded with `[PAD]`.
    pub ids: Tensor,
    /// 1 for tokens, 0 for padding, `(B, L)` u32.
    pub mask: Tensor,
    /// Image id of each pair: pairs with the same id are positives of each other.
    pub idx: Vec<i64>,
    /// Further image ids each caption truly describes (`"also_matches"`; usually none).
    pub also: Vec<Vec<i64>>,
}

impl RetrievalBatch {
    /// Tokenises captions (BLIP cleaning, 35 tokens at most).
    pub fn from_texts(
        tokenizer: &BlipTokenizer,
        pixels: Tensor,
        captions: &[&str],
        idx: Vec<i64>,
    ) -> Result<Self> {
        let batch = tokenizer.encode_batch(captions, MAX_TEXT_TOKENS)?;
        let (ids, mask) = batch.tensors(None, pixels.device())?;
        let also = vec![Vec::new(); idx.len()];
        Ok(Self {
            pixels,
            ids,
            mask,
            idx,
            also,
        })
    }

    /// Sets the further image ids each caption describes (one list per pair).
    pub fn with_also(mut self, also: Vec<Vec<i64>>) -> Result<Self> {
        if also.len() != self.idx.len() {
            return Err(TrainError::InvalidInput(format!(
                "{} also-match lists for a batch of {}",
                also.len(),
                self.idx.len()
            )));
        }
        self.also = also;
        Ok(self)
    }

    /// Whether caption `text` describes a picture of image id `image`.
    fn describes(&self, text: usize, image: i64) -> bool {
        self.idx[text] == image || self.also[text].contains(&image)
    }
}

/// One captioning batch.
pub struct CaptionBatch {
    /// Preprocessed images `(B, 3, S, S)`.
    pub pixels: Tensor,
    /// `[DEC] prompt caption [SEP]` token ids `(B, L)` u32, padded with `[PAD]`.
    pub ids: Tensor,
    /// 1 for tokens, 0 for padding.
    pub mask: Tensor,
    /// Target of each position `(B, L)` i64: the id, or [`IGNORE`] for the prompt and padding.
    pub labels: Tensor,
}

impl CaptionBatch {
    /// Tokenises `prompt + caption` (BLIP cleaning, [`MAX_CAPTION_TOKENS`] at most) with [DEC]
    /// first; the [DEC] and prompt positions and the padding get label [`IGNORE`].
    pub fn from_texts(
        tokenizer: &BlipTokenizer,
        pixels: Tensor,
        captions: &[&str],
        prompt: &str,
    ) -> Result<Self> {
        let texts: Vec<String> = captions.iter().map(|c| format!("{prompt}{c}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let batch = tokenizer.encode_batch(&refs, MAX_CAPTION_TOKENS)?;
        let prompt_len = tokenizer.pieces(prompt)?.len() + 1;
        let (ids, mask) = batch.tensors(Some(DEC), pixels.device())?;
        let (b, l) = ids.dims2()?;
        let mut labels = vec![IGNORE; b * l];
        for (row, seq) in batch.ids.iter().enumerate() {
            for (j, &t) in seq.iter().enumerate().skip(prompt_len) {
                labels[row * l + j] = i64::from(t);
            }
        }
        let labels = Tensor::from_vec(labels, (b, l), pixels.device())?;
        Ok(Self {
            pixels,
            ids,
            mask,
            labels,
        })
    }
}

/// How the ITM hard negatives are chosen.
#[derive(Debug, Clone)]
pub enum Negatives {
    /// Drawn in proportion to softmax(ITC similarity / temp), same-image pairs excluded, from a
    /// generator seeded with this value.
    Sample(u64),
    /// Given: `image_for_text[b]` is the negative image of text `b`, `text_for_image[b]` the
    /// negative text of image `b` (for deterministic comparisons).
    Given {
        /// Negative image index per text.
        image_for_text: Vec<usize>,
        /// Negative text index per image.
        text_for_image: Vec<usize>,
    },
}

/// Which pairs count as positives in the ITC targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ItcTargets {
    /// Every pair (batch and queue) with the same image id (BLIP's intent, ALBEF).
    #[default]
    SameImage,
    /// Only the pair itself (what BLIP's released `blip_retrieval.py` ends up using).
    Diagonal,
}

/// The state of ITC beyond the parameters: momentum encoders and feature queues.
pub struct RetrievalState {
    /// Momentum copies of the unimodal parameters, by HF name.
    pub momentum: HashMap<String, Tensor>,
    /// Momentum image features of past batches `(E, Q)`.
    pub image_queue: Tensor,
    /// Momentum text features of past batches `(E, Q)`.
    pub text_queue: Tensor,
    /// Image ids of the queued features (-100: empty slot).
    pub idx_queue: Vec<i64>,
    /// The further image ids each queued caption describes (see [`RetrievalBatch::also`]).
    pub also_queue: Vec<Vec<i64>>,
    /// Next queue slot to overwrite.
    pub ptr: usize,
    /// Momentum coefficient (0.995).
    pub momentum_coef: f64,
    /// Which pairs are positives in the ITC targets.
    pub targets: ItcTargets,
}

impl RetrievalState {
    /// Momentum encoders copied from the parameters; queues of `queue_size` random unit vectors
    /// with empty ids, as BLIP starts.
    pub fn new(store: &ParamStore, queue_size: usize, seed: u64) -> Result<Self> {
        if queue_size == 0 {
            return Err(TrainError::InvalidInput(
                "queue size must be positive".into(),
            ));
        }
        let momentum = store
            .tensors()?
            .into_iter()
            .filter(|(k, _)| has_momentum_copy(k))
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let e = store.config.image_text_hidden_size;
        let dev = &store.device;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut queue = || -> Result<Tensor> {
            let v: Vec<f32> = (0..e * queue_size)
                .map(|_| {
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect();
            let q = Tensor::from_vec(v, (e, queue_size), dev)?;
            Ok(l2_normalize(&q.t()?)?.t()?.contiguous()?)
        };
        let image_queue = queue()?;
        let text_queue = queue()?;
        Ok(Self {
            momentum,
            image_queue,
            text_queue,
            idx_queue: vec![-100; queue_size],
            also_queue: vec![Vec::new(); queue_size],
            ptr: 0,
            momentum_coef: MOMENTUM,
            targets: ItcTargets::default(),
        })
    }

    /// Queue length.
    pub fn queue_size(&self) -> usize {
        self.idx_queue.len()
    }

    /// `m = m * momentum + p * (1 - momentum)` for every momentum parameter.
    pub fn momentum_update(&mut self, store: &ParamStore) -> Result<()> {
        let k = self.momentum_coef;
        for (name, m) in self.momentum.iter_mut() {
            let p = store.var(name)?.as_tensor().detach();
            *m = ((&*m * k)? + (p * (1.0 - k))?)?;
        }
        Ok(())
    }

    fn enqueue(
        &mut self,
        image_feat: &Tensor,
        text_feat: &Tensor,
        batch: &RetrievalBatch,
    ) -> Result<()> {
        let q = self.queue_size();
        let idx = &batch.idx;
        let b = idx.len();
        if b > q {
            return Err(TrainError::InvalidInput(format!(
                "batch of {b} is larger than the queue ({q})"
            )));
        }
        let mut img = self.image_queue.t()?.contiguous()?.to_vec2::<f32>()?;
        let mut txt = self.text_queue.t()?.contiguous()?.to_vec2::<f32>()?;
        let fi = image_feat.to_vec2::<f32>()?;
        let ft = text_feat.to_vec2::<f32>()?;
        for j in 0..b {
            let slot = (self.ptr + j) % q;
            img[slot] = fi[j].clone();
            txt[slot] = ft[j].clone();
            self.idx_queue[slot] = idx[j];
            self.also_queue[slot] = batch.also[j].clone();
        }
        self.ptr = (self.ptr + b) % q;
        let e = fi.first().map_or(0, Vec::len);
        let dev = self.image_queue.device().clone();
        let back = |rows: Vec<Vec<f32>>| -> Result<Tensor> {
            let flat: Vec<f32> = rows.into_iter().flatten().collect();
            Ok(Tensor::from_vec(flat, (q, e), &dev)?.t()?.contiguous()?)
        };
        self.image_queue = back(img)?;
        self.text_queue = back(txt)?;
        Ok(())
    }

    /// Everything as named tensors, for the training state file.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .momentum
            .iter()
            .map(|(k, t)| (format!("momentum.{k}"), t.clone()))
            .collect();
        out.insert("queue.image".into(), self.image_queue.clone());
        out.insert("queue.text".into(), self.text_queue.clone());
        out.insert(
            "queue.idx".into(),
            Tensor::new(self.idx_queue.as_slice(), self.image_queue.device())?,
        );
        // The also-match lists as a (Q, W) matrix padded with -100 (W at least 1).
        let w = self
            .also_queue
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut also = vec![-100i64; self.also_queue.len() * w];
        for (row, ids) in self.also_queue.iter().enumerate() {
            also[row * w..row * w + ids.len()].copy_from_slice(ids);
        }
        out.insert(
            "queue.also".into(),
            Tensor::from_vec(also, (self.also_queue.len(), w), self.image_queue.device())?,
        );
        out.insert(
            "queue.ptr".into(),
            Tensor::new(&[self.ptr as i64], self.image_queue.device())?,
        );
        Ok(out)
    }

    /// Restores what [`RetrievalState::to_tensors`] saved into a state created for the same model.
    pub fn load_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            t.get(k)
                .cloned()
                .ok_or_else(|| TrainError::InvalidInput(format!("training state lacks {k}")))
        };
        for (name, m) in self.momentum.iter_mut() {
            *m = get(&format!("momentum.{name}"))?;
        }
        self.image_queue = get("queue.image")?;
        self.text_queue = get("queue.text")?;
        self.idx_queue = get("queue.idx")?.to_vec1::<i64>()?;
        // A state file may lack the also-match lists (`queue.also`): then the queue has none.
        self.also_queue = match t.get("queue.also") {
            Some(a) => a
                .to_vec2::<i64>()?
                .into_iter()
                .map(|row| row.into_iter().filter(|&x| x != -100).collect())
                .collect(),
            None => vec![Vec::new(); self.idx_queue.len()],
        };
        if self.also_queue.len() != self.idx_queue.len() {
            return Err(TrainError::InvalidInput(
                "training state: queue.also does not fit queue.idx".into(),
            ));
        }
        self.ptr = get("queue.ptr")?
            .to_vec1::<i64>()?
            .first()
            .copied()
            .unwrap_or(0) as usize;
        Ok(())
    }
}

/// The two retrieval losses of one batch (scalars, differentiable).
pub struct RetrievalLosses {
    /// ITC: (i2t + t2i) / 2.
    pub itc: Tensor,
    /// ITM: cross-entropy over B positives and 2B hard negatives.
    pub itm: Tensor,
    /// The negatives used: (negative image per text, negative text per image).
    pub negatives: (Vec<usize>, Vec<usize>),
}

/// Cross-entropy of `logits (N, C)` against `targets`, mean over rows, with torch's label
/// smoothing: `(1 - s) * nll + s * mean_c(-log p_c)`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], smoothing: f64) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n != targets.len() || n == 0 {
        return Err(TrainError::InvalidInput(format!(
            "{} targets for {n} rows",
            targets.len()
        )));
    }
    let logp = log_softmax_diff(logits)?;
    let idx = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let nll = logp.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let loss = if smoothing > 0.0 {
        let smooth = logp.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?
    } else {
        nll
    };
    Ok(loss.mean_all()?)
}

fn sample_row(weights: &[f32], rng: &mut StdRng, own: usize) -> usize {
    let total: f64 = weights.iter().map(|&w| f64::from(w.max(0.0))).sum();
    if total <= 0.0 || !total.is_finite() {
        // Every other pair is of the same image: any other row (a false negative, as rare as
        // a batch made of one image's captions).
        return (own + 1) % weights.len().max(1);
    }
    let mut r = rng.random::<f64>() * total;
    for (j, &w) in weights.iter().enumerate() {
        r -= f64::from(w.max(0.0));
        if r < 0.0 {
            return j;
        }
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(own)
}

/// ITC + ITM of one batch, as `BLIP_Retrieval.forward`: clamps the temperature, updates the
/// momentum encoders, computes both losses and enqueues the batch's momentum features.
pub fn retrieval_losses(
    store: &ParamStore,
    state: &mut RetrievalState,
    batch: &RetrievalBatch,
    alpha: f64,
    negatives: &Negatives,
) -> Result<RetrievalLosses> {
    let cfg = &store.config;
    let b = batch.idx.len();
    if b < 2 {
        return Err(TrainError::InvalidInput(
            "ITM needs at least 2 pairs per batch".into(),
        ));
    }
    let temp_var = store.var(TEMP)?;
    temp_var.set(&temp_var.as_tensor().clamp(0.001f32, 0.5f32)?)?;
    let temp = temp_var.as_tensor();
    let temp_c = temp.detach();
    let net = RetrievalNet::new(cfg, store.var_builder())?;

    let image_embeds = net.vision.forward(&batch.pixels)?;
    let image_feat = l2_normalize(&net.vision_proj.forward(&image_embeds.i((.., 0))?)?)?;
    let text_hidden = net
        .text
        .forward(&batch.ids, Some(&batch.mask), None, false, None)?;
    let text_feat = l2_normalize(&net.text_proj.forward(&text_hidden.i((.., 0))?)?)?;

    // ITC targets from the image ids of the batch and the queue: caption t describes image i
    // when they share an id or i's id is among t's also-matches. Rows are normalised.
    let q = state.queue_size();
    let idx_all: Vec<i64> = batch.idx.iter().chain(&state.idx_queue).copied().collect();
    let also_all: Vec<&Vec<i64>> = batch.also.iter().chain(&state.also_queue).collect();
    let targets = |positive: &dyn Fn(usize, usize) -> bool| -> Vec<f32> {
        let mut out = vec![0f32; b * (b + q)];
        for (i, row) in out.chunks_mut(b + q).enumerate() {
            match state.targets {
                ItcTargets::SameImage => {
                    let n = (0..b + q).filter(|&j| positive(i, j)).count().max(1) as f32;
                    for (j, x) in row.iter_mut().enumerate() {
                        if positive(i, j) {
                            *x = 1.0 / n;
                        }
                    }
                }
                ItcTargets::Diagonal => row[i] = 1.0,
            }
        }
        out
    };
    // Image i of the batch against every text j (batch, then queue).
    let i2t = targets(&|i, j| idx_all[j] == batch.idx[i] || also_all[j].contains(&batch.idx[i]));
    // Text i of the batch against every image j.
    let t2i = targets(&|i, j| batch.describes(i, idx_all[j]));
    let dev = batch.pixels.device();
    let i2t_sim_targets = Tensor::from_vec(i2t, (b, b + q), dev)?;
    let t2i_sim_targets = Tensor::from_vec(t2i, (b, b + q), dev)?;

    // Momentum features (no gradient).
    state.momentum_update(store)?;
    let mvb = VarBuilder::from_tensors(state.momentum.clone(), DType::F32, dev);
    let mnet = Encoders::new(cfg, mvb, false)?;
    let image_embeds_m = mnet.vision.forward(&batch.pixels)?;
    let image_feat_m =
        l2_normalize(&mnet.vision_proj.forward(&image_embeds_m.i((.., 0))?)?)?.detach();
    let text_hidden_m = mnet
        .text
        .forward(&batch.ids, Some(&batch.mask), None, false, None)?;
    let text_feat_m = l2_normalize(&mnet.text_proj.forward(&text_hidden_m.i((.., 0))?)?)?.detach();
    let image_feat_m_all = Tensor::cat(&[&image_feat_m.t()?, &state.image_queue], 1)?;
    let text_feat_m_all = Tensor::cat(&[&text_feat_m.t()?, &state.text_queue], 1)?;
    let sim_i2t_m = image_feat_m
        .matmul(&text_feat_m_all)?
        .broadcast_div(&temp_c)?;
    let sim_t2i_m = text_feat_m
        .matmul(&image_feat_m_all)?
        .broadcast_div(&temp_c)?;
    let mix = |sim_m: &Tensor, sim_targets: &Tensor| -> Result<Tensor> {
        Ok(((softmax_diff(sim_m)? * alpha)? + (sim_targets * (1.0 - alpha))?)?.detach())
    };
    let i2t_targets = mix(&sim_i2t_m, &i2t_sim_targets)?;
    let t2i_targets = mix(&sim_t2i_m, &t2i_sim_targets)?;

    let sim_i2t = image_feat.matmul(&text_feat_m_all)?.broadcast_div(temp)?;
    let sim_t2i = text_feat.matmul(&image_feat_m_all)?.broadcast_div(temp)?;
    let soft_ce = |sim: &Tensor, t: &Tensor| -> Result<Tensor> {
        Ok((log_softmax_diff(sim)? * t)?.sum(1)?.mean_all()?.neg()?)
    };
    let itc = ((soft_ce(&sim_i2t, &i2t_targets)? + soft_ce(&sim_t2i, &t2i_targets)?)? / 2.0)?;
    state.enqueue(&image_feat_m, &text_feat_m, batch)?;

    // ITM hard negatives.
    let (neg_image, neg_text) = match negatives {
        Negatives::Given {
            image_for_text,
            text_for_image,
        } => {
            if image_for_text.len() != b
                || text_for_image.len() != b
                || image_for_text.iter().chain(text_for_image).any(|&j| j >= b)
            {
                return Err(TrainError::InvalidInput(format!(
                    "given negatives do not fit a batch of {b}"
                )));
            }
            (image_for_text.clone(), text_for_image.clone())
        }
        Negatives::Sample(seed) => {
            let imf = image_feat.detach();
            let txf = text_feat.detach();
            // Row i, column j: `matches(i, j)` pairs are never negatives of each other.
            let weights = |a: &Tensor,
                           c: &Tensor,
                           matches: &dyn Fn(usize, usize) -> bool|
             -> Result<Vec<Vec<f32>>> {
                let w = softmax_diff(&a.matmul(&c.t()?)?.broadcast_div(&temp_c)?)?;
                let mut w = w.to_vec2::<f32>()?;
                for (i, row) in w.iter_mut().enumerate() {
                    for (j, x) in row.iter_mut().enumerate() {
                        if matches(i, j) {
                            *x = 0.0;
                        }
                    }
                }
                Ok(w)
            };
            let w_i2t = weights(&imf, &txf, &|i, j| batch.describes(j, batch.idx[i]))?;
            let w_t2i = weights(&txf, &imf, &|i, j| batch.describes(i, batch.idx[j]))?;
            let mut rng = StdRng::seed_from_u64(*seed);
            let neg_image: Vec<usize> =
                (0..b).map(|i| sample_row(&w_t2i[i], &mut rng, i)).collect();
            let neg_text: Vec<usize> = (0..b).map(|i| sample_row(&w_i2t[i], &mut rng, i)).collect();
            (neg_image, neg_text)
        }
    };

    let mut enc_ids = batch.ids.to_vec2::<u32>()?;
    for row in &mut enc_ids {
        row[0] = ENC;
    }
    let l = enc_ids.first().map_or(0, Vec::len);
    let mask = batch.mask.to_vec2::<u32>()?;
    let rows: Vec<usize> = (0..b).chain(0..b).chain(neg_text.iter().copied()).collect();
    let ids_all: Vec<u32> = rows.iter().flat_map(|&r| enc_ids[r].clone()).collect();
    let mask_all: Vec<u32> = rows.iter().flat_map(|&r| mask[r].clone()).collect();
    let ids_all = Tensor::from_vec(ids_all, (3 * b, l), dev)?;
    let mask_all = Tensor::from_vec(mask_all, (3 * b, l), dev)?;
    let images: Vec<u32> = (0..b)
        .chain(neg_image.iter().copied())
        .chain(0..b)
        .map(|i| i as u32)
        .collect();
    let images_all = image_embeds.index_select(&Tensor::new(images.as_slice(), dev)?, 0)?;
    let kv = net.text.image_kv(&images_all)?;
    let vl = net
        .text
        .forward(&ids_all, Some(&mask_all), Some(&kv), false, None)?;
    let logits = net.itm_head.forward(&vl.i((.., 0))?)?;
    let labels: Vec<u32> = std::iter::repeat_n(1, b)
        .chain(std::iter::repeat_n(0, 2 * b))
        .collect();
    let itm = cross_entropy(&logits, &labels, 0.0)?;
    Ok(RetrievalLosses {
        itc,
        itm,
        negatives: (neg_image, neg_text),
    })
}

/// The LM loss of one captioning batch (mean over the labelled positions).
pub fn caption_loss(store: &ParamStore, batch: &CaptionBatch) -> Result<Tensor> {
    let net = CaptionNet::new(&store.config, store.var_builder())?;
    let image_embeds = net.vision.forward(&batch.pixels)?;
    let kv = net.decoder.bert.image_kv(&image_embeds)?;
    let hidden = net
        .decoder
        .bert
        .forward(&batch.ids, Some(&batch.mask), Some(&kv), true, None)?;
    let (b, l, d) = hidden.dims3()?;
    if l < 2 {
        return Err(TrainError::InvalidInput("captions too short".into()));
    }
    let labels = batch.labels.to_vec2::<i64>()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate() {
        for (j, &t) in row.iter().enumerate().skip(1) {
            if t != IGNORE {
                // Position j - 1 predicts token j.
                rows.push((i * l + j - 1) as u32);
                targets.push(t as u32);
            }
        }
    }
    if rows.is_empty() {
        return Err(TrainError::InvalidInput(
            "no caption token to learn (only prompt and padding)".into(),
        ));
    }
    // The vocabulary projection only where there is a label (row-wise, so the same values).
    let picked = hidden
        .reshape((b * l, d))?
        .index_select(&Tensor::new(rows.as_slice(), hidden.device())?, 0)?;
    let logits = net.decoder.head.forward(&picked)?;
    cross_entropy(&logits, &targets, LABEL_SMOOTHING)
}

/// A scalar tensor as `f32`.
pub fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}
