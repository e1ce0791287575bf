//! `BlipForConditionalGeneration`: image captions from the ViT and the image-grounded text
//! decoder, with greedy search, beam search and nucleus sampling that follow HF transformers'
//! `generate` step for step, so that greedy and beam outputs are token-identical to it.
//!
//! Paper: <https://arxiv.org/abs/2201.12086> (§3.1 image-grounded decoder, §3.3 CapFilt); model
//! card: <https://huggingface.co/Salesforce/blip-image-captioning-base>.
//!
//! Conventions, as in BLIP and HF `BlipForConditionalGeneration.generate`:
//! - the decoder input is [DEC] followed by the prompt's word pieces (no [SEP]); a caption ends at
//!   [SEP];
//! - `max_length` and `min_length` count the whole decoder sequence, [DEC] and prompt included (HF
//!   semantics of an explicit `max_length`, which BLIP passes: max 20 / min 5 with the 4-token
//!   `[DEC] a picture of`); [SEP] cannot be chosen while the sequence is shorter than
//!   `min_length`;
//! - returned token ids are what HF `generate` returns ([DEC], prompt, caption, final [SEP] if
//!   reached); the returned text is the caption alone, prompt stripped.
//!
//! Several images, and the beams or samples of each, run as one batch: the image keys and values
//! of the decoder's cross-attention are computed once per image and shared by its rows (see
//! [`ImageKv::shared_by`]); the self-attention keys and values are cached between steps.

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::base::BlipBase;
use super::config::BlipArchitecture;
use super::error::{ModelError, Result};
use super::text::{ImageKv, KvCache, TextDecoder};
use super::tokenizer::{DEC, PAD, SEP};
use super::weights::{ModelFiles, ModelSource};

/// BLIP's caption prompt. The model continues it; it is stripped from the returned text.
pub const DEFAULT_PROMPT: &str = "a picture of ";

/// The score HF gives to a beam it has set aside (`-1e9`).
const NEG_LARGE: f32 = -1.0e9;

/// Beam search options.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamParams {
    /// Beams per image (BLIP: 3).
    pub num_beams: usize,
    /// A finished beam scores `sum of log-probabilities / generated_len ^ length_penalty`, where
    /// `generated_len` counts the tokens after the prompt, [SEP] included (HF's rule; 1.0).
    pub length_penalty: f32,
}

impl Default for BeamParams {
    fn default() -> Self {
        Self {
            num_beams: 3,
            length_penalty: 1.0,
        }
    }
}

/// Nucleus sampling options (BLIP's CapFilt captioner: top-p 0.9, repetition penalty 1.1).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    /// Keep the smallest set of most likely tokens whose probability mass reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens before top-p (ties kept); 0 disables. 50 is HF's
    /// default, so BLIP's CapFilt, which does not set it, sampled with top-k 50 as well.
    pub top_k: usize,
    /// Every token already in the sequence (prompt and [DEC] included) has its logit divided by
    /// this when positive and multiplied when negative (HF's `RepetitionPenaltyLogitsProcessor`).
    pub repetition_penalty: f32,
    /// Captions drawn per image.
    pub num_samples: usize,
    /// Seed. Sample `j` of an image draws from its own stream derived from `(seed, j)`, so an
    /// image's samples do not depend on the other images in the batch.
    pub seed: u64,
}

impl Default for SampleParams {
    fn default() -> Self {
        Self {
            top_p: 0.9,
            top_k: 50,
            repetition_penalty: 1.1,
            num_samples: 1,
            seed: 0,
        }
    }
}

/// How to choose the next token.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationMode {
    /// The most likely token at every step.
    Greedy,
    /// Beam search (BLIP's captions for evaluation and display).
    Beam(BeamParams),
    /// Nucleus sampling (BLIP's CapFilt: diverse synthetic captions).
    Sample(SampleParams),
}

impl Default for GenerationMode {
    fn default() -> Self {
        Self::Beam(BeamParams::default())
    }
}

/// Caption generation options. The default is BLIP's: prompt `"a picture of "`, 3 beams,
/// max 20 / min 5 tokens counting [DEC] and the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionParams {
    /// Text the caption continues (may be empty); stripped from the output.
    pub prompt: String,
    /// Longest decoder sequence, [DEC] and prompt included.
    pub max_length: usize,
    /// [SEP] is not allowed while the sequence is shorter than this ([DEC] and prompt included).
    pub min_length: usize,
    /// Greedy, beam search or sampling.
    pub mode: GenerationMode,
}

impl Default for CaptionParams {
    fn default() -> Self {
        Self {
            prompt: DEFAULT_PROMPT.to_string(),
            max_length: 20,
            min_length: 5,
            mode: GenerationMode::default(),
        }
    }
}

impl CaptionParams {
    /// BLIP's defaults with another generation mode.
    pub fn with_mode(mode: GenerationMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// Checks the options that do not depend on the prompt's tokens.
    pub fn validate(&self, max_positions: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidInput(m));
        if self.max_length > max_positions {
            return bad(format!(
                "max_length {} exceeds the decoder's {max_positions} positions",
                self.max_length
            ));
        }
        if self.min_length > self.max_length {
            return bad(format!(
                "min_length {} is greater than max_length {}",
                self.min_length, self.max_length
            ));
        }
        match &self.mode {
            GenerationMode::Greedy => {}
            GenerationMode::Beam(b) => {
                if b.num_beams == 0 {
                    return bad("the number of beams must be at least 1".into());
                }
                if !b.length_penalty.is_finite() {
                    return bad(format!("length penalty {} is not finite", b.length_penalty));
                }
            }
            GenerationMode::Sample(s) => {
                if s.num_samples == 0 {
                    return bad("the number of samples must be at least 1".into());
                }
                if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                    return bad(format!("top_p {} is not in (0, 1]", s.top_p));
                }
                if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
                    return bad(format!(
                        "repetition penalty {} is not a positive number",
                        s.repetition_penalty
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One generated caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// The caption, prompt stripped, special tokens dropped.
    pub text: String,
    /// The decoder sequence as HF `generate` returns it: [DEC], prompt, caption, and [SEP] when
    /// the caption ended before `max_length`.
    pub token_ids: Vec<u32>,
    /// Beam search only: the beam's score as HF reports it (`sequences_scores`).
    pub score: Option<f32>,
}

impl Caption {
    /// Whether the caption ended with [SEP] (rather than being cut at `max_length`).
    pub fn complete(&self) -> bool {
        self.token_ids.last() == Some(&SEP)
    }
}

/// BLIP's captioner: a ViT and the image-grounded text decoder.
pub struct Captioner {
    base: BlipBase,
    decoder: TextDecoder,
}

/// The config, tokenizer, device, name and ViT.
impl std::ops::Deref for Captioner {
    type Target = BlipBase;

    fn deref(&self) -> &BlipBase {
        &self.base
    }
}

impl Captioner {
    /// Loads a `BlipForConditionalGeneration` checkpoint.
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        let files = source.resolve()?;
        Self::from_files(&files, &source.name(), device)
    }

    /// Loads from resolved files; `name` is kept for reporting.
    pub fn from_files(files: &ModelFiles, name: &str, device: &Device) -> Result<Self> {
        let (base, decoder) = BlipBase::load(
            files,
            BlipArchitecture::Captioning,
            name,
            device,
            |config, vb| TextDecoder::new(&config.text, vb.pp("text_decoder")),
        )?;
        Ok(Self { base, decoder })
    }

    /// The text decoder (for tests and custom decoding loops).
    pub fn decoder(&self) -> &TextDecoder {
        &self.decoder
    }

    /// The decoder input for a prompt: [DEC] followed by the prompt's word pieces (no [SEP]),
    /// as `BlipForConditionalGeneration.generate` builds it.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![DEC];
        ids.extend(self.tokenizer().pieces(prompt)?);
        Ok(ids)
    }

    /// Preprocesses and encodes images with the captioner's ViT: `(N, tokens, hidden)`.
    pub fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        self.embed_pixels(&self.pixel_values(images)?)
    }

    /// Encodes preprocessed pixels `(N, 3, S, S)` with the captioner's ViT.
    pub fn embed_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        self.image_tokens(pixels)
    }

    /// Teacher-forced decoder logits `(N, L, vocab)` for token ids `(N, L)` (u32, starting with
    /// [DEC]) given image tokens `(N, tokens, hidden)` from [`Captioner::embed_pixels`].
    pub fn decoder_logits(&self, ids: &Tensor, image_tokens: &Tensor) -> Result<Tensor> {
        self.check_image_tokens(image_tokens)?;
        let kv = self.decoder.bert.image_kv(image_tokens)?;
        Ok(self.decoder.forward(ids, &kv, None)?)
    }

    /// Captions for images: one list per image, with one caption (greedy, beam) or
    /// `num_samples` captions (sampling).
    pub fn caption_images(
        &self,
        images: &[DynamicImage],
        params: &CaptionParams,
    ) -> Result<Vec<Vec<Caption>>> {
        self.check_params(params)?;
        let tokens = self.embed_images(images)?;
        self.generate(&tokens, params)
    }

    /// Captions from image tokens `(N, tokens, hidden)` given by [`Captioner::embed_images`]: one
    /// list per image, as [`Captioner::caption_images`].
    pub fn generate(
        &self,
        image_tokens: &Tensor,
        params: &CaptionParams,
    ) -> Result<Vec<Vec<Caption>>> {
        let prompt = self.check_params(params)?;
        self.check_image_tokens(image_tokens)?;
        let n = image_tokens.dims()[0];
        if n == 0 {
            return Err(ModelError::InvalidInput("no images given".into()));
        }
        let kv = self.decoder.bert.image_kv(image_tokens)?;
        let mut stepper = ModelStepper {
            decoder: &self.decoder,
            images: kv,
            rows_per_image: 1,
            cache: KvCache::new(self.config().text.num_hidden_layers),
            device: self.device().clone(),
        };
        let plan = Plan {
            prompt,
            max_length: params.max_length,
            min_length: params.min_length,
        };
        let raw = match &params.mode {
            GenerationMode::Greedy => decode_rows(&mut stepper, n, &plan, None)?,
            GenerationMode::Sample(s) => decode_rows(&mut stepper, n, &plan, Some(s))?,
            GenerationMode::Beam(b) => beam_search(&mut stepper, n, &plan, b)?
                .into_iter()
                .map(|h| vec![h])
                .collect(),
        };
        let p = plan.prompt.len();
        raw.into_iter()
            .map(|per_image| {
                per_image
                    .into_iter()
                    .map(|g| {
                        Ok(Caption {
                            text: self.tokenizer().decode(&g.ids[p..])?.trim().to_string(),
                            token_ids: g.ids,
                            score: g.score,
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Validates `params` and returns the prompt's decoder ids.
    fn check_params(&self, params: &CaptionParams) -> Result<Vec<u32>> {
        params.validate(self.config().text.max_position_embeddings)?;
        let prompt = self.prompt_ids(&params.prompt)?;
        if prompt.len() >= params.max_length {
            return Err(ModelError::InvalidInput(format!(
                "prompt {:?} is {} tokens with [DEC], which leaves no room under max_length {}",
                params.prompt,
                prompt.len(),
                params.max_length
            )));
        }
        Ok(prompt)
    }

    fn check_image_tokens(&self, image_tokens: &Tensor) -> Result<()> {
        let want = self.config().text.encoder_hidden_size;
        match image_tokens.dims() {
            [_, _, w] if *w == want => Ok(()),
            d => Err(ModelError::InvalidInput(format!(
                "image tokens of shape {d:?}, this decoder reads (N, tokens, {want})"
            ))),
        }
    }
}

/// Next-token logits, one row per decoder row.
struct Logits {
    data: Vec<f32>,
    vocab: usize,
}

impl Logits {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// Each row repeated `times` times, consecutively.
    fn repeat_rows(&self, times: usize) -> Self {
        let rows = self.data.len() / self.vocab.max(1);
        let mut data = Vec::with_capacity(self.data.len() * times);
        for r in 0..rows {
            for _ in 0..times {
                data.extend_from_slice(self.row(r));
            }
        }
        Self {
            data,
            vocab: self.vocab,
        }
    }
}

/// What the search loops need from a decoder. Rows are laid out image by image,
/// `rows_per_image` consecutive rows each, all of the same length.
trait Stepper {
    /// Runs the prompt once per image (one row per image) and returns the next-token logits.
    fn prefill(&mut self, prompt: &[u32]) -> Result<Logits>;
    /// Keeps rows `rows` (indices into the current rows) and images `images` (indices into the
    /// current images), `rows_per_image` rows per image afterwards.
    fn select(&mut self, rows: &[u32], images: &[u32], rows_per_image: usize) -> Result<()>;
    /// Appends one token per row and returns the next-token logits.
    fn step(&mut self, tokens: &[u32]) -> Result<Logits>;
}

/// [`Stepper`] over the BLIP text decoder with a KV cache.
struct ModelStepper<'a> {
    decoder: &'a TextDecoder,
    images: ImageKv,
    rows_per_image: usize,
    cache: KvCache,
    device: Device,
}

impl ModelStepper<'_> {
    fn run(&mut self, ids: &Tensor) -> Result<Logits> {
        let image = self.images.shared_by(self.rows_per_image);
        let h = self
            .decoder
            .bert
            .forward(ids, None, Some(&image), true, Some(&mut self.cache))?;
        let l = h.dims()[1];
        let logits = self
            .decoder
            .head
            .forward(&h.narrow(1, l - 1, 1)?.contiguous()?)?
            .squeeze(1)?;
        let (_, vocab) = logits.dims2()?;
        Ok(Logits {
            data: logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            vocab,
        })
    }
}

fn is_identity(index: &[u32], len: usize) -> bool {
    index.len() == len && index.iter().enumerate().all(|(i, &j)| i as u32 == j)
}

impl Stepper for ModelStepper<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Logits> {
        let n = self.images.batch();
        let ids: Vec<u32> = (0..n).flat_map(|_| prompt.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (n, prompt.len()), &self.device)?;
        self.rows_per_image = 1;
        self.run(&ids)
    }

    fn select(&mut self, rows: &[u32], images: &[u32], rows_per_image: usize) -> Result<()> {
        let current_rows = self.images.batch() * self.rows_per_image;
        if !is_identity(rows, current_rows) {
            self.cache.select(&Tensor::new(rows, &self.device)?)?;
        }
        if !is_identity(images, self.images.batch()) {
            self.images = self.images.select(&Tensor::new(images, &self.device)?)?;
        }
        self.rows_per_image = rows_per_image;
        Ok(())
    }

    fn step(&mut self, tokens: &[u32]) -> Result<Logits> {
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &self.device)?;
        self.run(&ids)
    }
}

/// Decoder input and length limits of one generation call.
struct Plan {
    prompt: Vec<u32>,
    max_length: usize,
    min_length: usize,
}

/// A finished decoder sequence.
#[derive(Debug, Clone)]
struct Generated {
    ids: Vec<u32>,
    score: Option<f32>,
}

/// HF's `MinLengthLogitsProcessor`: no [SEP] while the sequence is shorter than `min_length`.
fn mask_early_sep(scores: &mut [f32], len: usize, min_length: usize) {
    if len < min_length {
        if let Some(s) = scores.get_mut(SEP as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The first index of the largest value (torch `argmax`); NaN never wins.
fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() && !s.is_nan() {
            best = i;
        }
    }
    best as u32
}

/// HF's `RepetitionPenaltyLogitsProcessor`: each distinct token of `seq` has its score divided by
/// `penalty` when positive and multiplied by it otherwise.
fn apply_repetition_penalty(scores: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(seq.len());
    for &t in seq {
        if !seen.insert(t) {
            continue;
        }
        if let Some(s) = scores.get_mut(t as usize) {
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

/// The tokens that survive HF's top-k then top-p filters, with their renormalised
/// probabilities, most likely first (ties: lower id first).
///
/// Top-k keeps every token scoring at least the k-th best score. Top-p keeps a token when the
/// probability mass of the tokens ranked before it is below `top_p`: the smallest set of most
/// likely tokens whose mass reaches `top_p`, and always at least one token.
fn nucleus(scores: &[f32], top_k: usize, top_p: f32) -> Vec<(u32, f64)> {
    let mut order: Vec<u32> = (0..scores.len() as u32)
        .filter(|&i| scores[i as usize] > f32::NEG_INFINITY)
        .collect();
    let by_score = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if top_k > 0 && top_k < order.len() {
        order.select_nth_unstable_by(top_k - 1, by_score);
        let kth = scores[order[top_k - 1] as usize];
        order.retain(|&i| scores[i as usize] >= kth);
    }
    order.sort_unstable_by(by_score);
    let Some(&first) = order.first() else {
        return Vec::new();
    };
    let max = f64::from(scores[first as usize]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (f64::from(scores[i as usize]) - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let top_p = f64::from(top_p);
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (&i, &w) in order.iter().zip(&weights) {
        if !kept.is_empty() && mass >= top_p {
            break;
        }
        let p = w / total;
        kept.push((i, p));
        mass += p;
    }
    let kept_mass: f64 = kept.iter().map(|(_, p)| p).sum();
    kept.into_iter().map(|(i, p)| (i, p / kept_mass)).collect()
}

/// Draws one token from `dist` (probabilities summing to 1).
fn draw(dist: &[(u32, f64)], rng: &mut StdRng) -> Option<u32> {
    let u: f64 = rng.random();
    let mut cum = 0.0;
    for &(t, p) in dist {
        cum += p;
        if u < cum {
            return Some(t);
        }
    }
    dist.last().map(|&(t, _)| t)
}

/// The random stream of sample `j` (independent of which other images share the batch).
fn sample_rng(seed: u64, j: usize) -> StdRng {
    StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(j as u64),
    )
}

/// One sampling step as HF `generate(do_sample=True)` does it: repetition penalty, min length,
/// top-k, top-p, then a draw from the softmax of what is left.
fn sample_token(
    logits: &[f32],
    seq: &[u32],
    min_length: usize,
    params: &SampleParams,
    rng: &mut StdRng,
) -> u32 {
    let mut scores = logits.to_vec();
    apply_repetition_penalty(&mut scores, seq, params.repetition_penalty);
    mask_early_sep(&mut scores, seq.len(), min_length);
    let dist = nucleus(&scores, params.top_k, params.top_p);
    draw(&dist, rng).unwrap_or_else(|| argmax(&scores))
}

/// Greedy search or sampling: `rows` rows per image (1, or the number of samples), each decoded
/// on its own. A finished row keeps its place (fed [PAD], as HF does) until every row of its
/// image is done; then the image leaves the batch.
fn decode_rows(
    st: &mut dyn Stepper,
    n: usize,
    plan: &Plan,
    sampling: Option<&SampleParams>,
) -> Result<Vec<Vec<Generated>>> {
    let g = sampling.map_or(1, |s| s.num_samples);
    let mut seqs = vec![vec![plan.prompt.clone(); g]; n];
    let mut done = vec![vec![false; g]; n];
    let mut rngs: Vec<Vec<StdRng>> = (0..n)
        .map(|_| {
            (0..g)
                .map(|j| sample_rng(sampling.map_or(0, |s| s.seed), j))
                .collect()
        })
        .collect();
    let mut active: Vec<usize> = (0..n).collect();
    let mut logits = st.prefill(&plan.prompt)?;
    if g > 1 {
        let rows: Vec<u32> = (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, g))
            .collect();
        let images: Vec<u32> = (0..n as u32).collect();
        st.select(&rows, &images, g)?;
        logits = logits.repeat_rows(g);
    }
    loop {
        for (a, &img) in active.iter().enumerate() {
            for j in 0..g {
                if done[img][j] {
                    continue;
                }
                let row = logits.row(a * g + j);
                let seq = &mut seqs[img][j];
                let token = match sampling {
                    None => {
                        let mut scores = row.to_vec();
                        mask_early_sep(&mut scores, seq.len(), plan.min_length);
                        argmax(&scores)
                    }
                    Some(s) => sample_token(row, seq, plan.min_length, s, &mut rngs[img][j]),
                };
                seq.push(token);
                done[img][j] = token == SEP || seq.len() >= plan.max_length;
            }
        }
        let keep: Vec<usize> = (0..active.len())
            .filter(|&a| done[active[a]].iter().any(|d| !d))
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            let rows: Vec<u32> = keep
                .iter()
                .flat_map(|&a| (0..g).map(move |j| (a * g + j) as u32))
                .collect();
            let images: Vec<u32> = keep.iter().map(|&a| a as u32).collect();
            st.select(&rows, &images, g)?;
            active = keep.iter().map(|&a| active[a]).collect();
        }
        let tokens: Vec<u32> = active
            .iter()
            .flat_map(|&img| (0..g).map(move |j| (img, j)))
            .map(|(img, j)| {
                if done[img][j] {
                    PAD
                } else {
                    seqs[img][j].last().copied().unwrap_or(PAD)
                }
            })
            .collect();
        logits = st.step(&tokens)?;
    }
    Ok(seqs
        .into_iter()
        .map(|rows| {
            rows.into_iter()
                .map(|ids| Generated { ids, score: None })
                .collect()
        })
        .collect())
}

/// A finished-hypothesis slot of HF's beam search.
#[derive(Debug, Clone)]
struct Hypothesis {
    score: f32,
    ids: Vec<u32>,
    finished: bool,
}

/// A running beam.
#[derive(Debug, Clone)]
struct Beam {
    score: f32,
    ids: Vec<u32>,
}

/// The beam search state of one image, following HF transformers' `_beam_search` (v4.50+ / v5):
/// each step takes the best `2 * num_beams` continuations over all beams; those among the first
/// `num_beams` that end with [SEP] or reach `max_length` become hypotheses, the best `num_beams`
/// that do not continue; the search stops when `max_length` is reached or, all hypothesis slots
/// being filled, the best running beam (length-normalised by its current generated length) cannot
/// beat the worst hypothesis (`early_stopping=False`).
struct BeamState {
    running: Vec<Beam>,
    hypotheses: Vec<Hypothesis>,
    /// HF's `is_early_stop_heuristic_unsatisfied`.
    improvable: bool,
    done: bool,
}

/// `(score, beam, token)` candidates, best first.
type Candidates = Vec<(f32, usize, u32)>;

/// Keeps the `k` best of `(score, beam, token)` seen so far, best first; on equal scores the
/// earlier one (lower beam, then lower token) ranks first.
fn push_candidate(top: &mut Candidates, k: usize, cand: (f32, usize, u32)) {
    if top.len() == k
        && top
            .last()
            .is_some_and(|last| cand.0.partial_cmp(&last.0) != Some(std::cmp::Ordering::Greater))
    {
        return;
    }
    let pos = top.iter().position(|c| cand.0 > c.0).unwrap_or(top.len());
    top.insert(pos, cand);
    top.truncate(k);
}

/// Log-softmax of a row (f64 accumulation, f32 result).
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    row.iter().map(|&x| (f64::from(x) - lse) as f32).collect()
}

/// Indices of the `k` largest values, best first; ties keep the earlier index first.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl BeamState {
    fn new(num_beams: usize, prompt: &[u32]) -> Self {
        let running = (0..num_beams)
            .map(|b| Beam {
                score: if b == 0 { 0.0 } else { NEG_LARGE },
                ids: prompt.to_vec(),
            })
            .collect();
        let hypotheses = (0..num_beams)
            .map(|_| Hypothesis {
                score: NEG_LARGE,
                ids: prompt.to_vec(),
                finished: false,
            })
            .collect();
        Self {
            running,
            hypotheses,
            improvable: true,
            done: false,
        }
    }

    /// One step from the logits of this image's beams (`rows[b]` for beam `b`). Returns, for each
    /// new running beam, the index of the beam it continues.
    fn advance(&mut self, rows: &[&[f32]], plan: &Plan, params: &BeamParams) -> Vec<usize> {
        let k = self.running.len();
        let prompt_len = plan.prompt.len();
        let cur_len = self.running[0].ids.len();
        let mut top: Candidates = Vec::with_capacity(2 * k + 1);
        for (b, row) in rows.iter().enumerate() {
            let mut lp = log_softmax(row);
            mask_early_sep(&mut lp, cur_len, plan.min_length);
            let base = self.running[b].score;
            for (t, &x) in lp.iter().enumerate() {
                push_candidate(&mut top, 2 * k, (x + base, b, t as u32));
            }
        }
        let cands: Vec<(f32, Vec<u32>, bool)> = top
            .iter()
            .map(|&(score, b, t)| {
                let mut ids = self.running[b].ids.clone();
                ids.push(t);
                let hit = t == SEP || ids.len() >= plan.max_length;
                (score, ids, hit)
            })
            .collect();

        // Beams that go on: the best k continuations that did not finish.
        let adjusted: Vec<f32> = cands
            .iter()
            .map(|(s, _, hit)| if *hit { s + NEG_LARGE } else { *s })
            .collect();
        let next = top_indices(&adjusted, k);
        let sources: Vec<usize> = next.iter().map(|&j| top[j].1).collect();

        // Hypotheses: finished continuations ranked within the first k, length-normalised.
        let gen_len = (cur_len + 1 - prompt_len) as f32;
        let norm = gen_len.powf(params.length_penalty);
        let mut merged = std::mem::take(&mut self.hypotheses);
        for (j, (score, ids, hit)) in cands.iter().enumerate() {
            let eligible = *hit && j < k;
            let mut s = score / norm;
            if !self.improvable {
                s += NEG_LARGE;
            }
            if !eligible {
                s += NEG_LARGE;
            }
            merged.push(Hypothesis {
                score: s,
                ids: ids.clone(),
                finished: eligible,
            });
        }
        let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        self.hypotheses = top_indices(&scores, k)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        self.running = next
            .iter()
            .map(|&j| Beam {
                score: adjusted[j],
                ids: cands[j].1.clone(),
            })
            .collect();

        // Can a running beam still beat the worst hypothesis?
        let new_len = cur_len + 1;
        let best_running =
            self.running[0].score / ((new_len - prompt_len) as f32).powf(params.length_penalty);
        let worst = self
            .hypotheses
            .iter()
            .map(|h| h.score)
            .fold(f32::INFINITY, f32::min);
        let improvable = self
            .hypotheses
            .iter()
            .any(|h| best_running > if h.finished { worst } else { NEG_LARGE });
        self.improvable &= improvable;
        self.done = !self.improvable || new_len >= plan.max_length;
        sources
    }

    fn best(&self) -> Generated {
        let h = &self.hypotheses[0];
        Generated {
            ids: h.ids.clone(),
            score: Some(h.score),
        }
    }
}

/// Beam search over `n` images at once, `params.num_beams` rows per image.
fn beam_search(
    st: &mut dyn Stepper,
    n: usize,
    plan: &Plan,
    params: &BeamParams,
) -> Result<Vec<Generated>> {
    let k = params.num_beams;
    let mut states: Vec<BeamState> = (0..n).map(|_| BeamState::new(k, &plan.prompt)).collect();
    let first = st.prefill(&plan.prompt)?;
    let rows: Vec<u32> = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, k))
        .collect();
    let all: Vec<u32> = (0..n as u32).collect();
    st.select(&rows, &all, k)?;
    let mut logits = first.repeat_rows(k);
    let mut active: Vec<usize> = (0..n).collect();
    loop {
        let mut rows = Vec::with_capacity(active.len() * k);
        let mut keep = Vec::with_capacity(active.len());
        for (a, &img) in active.iter().enumerate() {
            let beam_rows: Vec<&[f32]> = (0..k).map(|b| logits.row(a * k + b)).collect();
            let sources = states[img].advance(&beam_rows, plan, params);
            if !states[img].done {
                keep.push(a);
                rows.extend(sources.iter().map(|&b| (a * k + b) as u32));
            }
        }
        if keep.is_empty() {
            break;
        }
        let images: Vec<u32> = keep.iter().map(|&a| a as u32).collect();
        st.select(&rows, &images, k)?;
        active = keep.iter().map(|&a| active[a]).collect();
        let tokens: Vec<u32> = active
            .iter()
            .flat_map(|&img| {
                states[img]
                    .running
                    .iter()
                    .map(|b| b.ids.last().copied().unwrap_or(PAD))
            })
            .collect();
        logits = st.step(&tokens)?;
    }
    Ok(states.iter().map(BeamState::best).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let scores = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let ids = |p: f32| -> Vec<u32> { nucleus(&scores, 0, p).iter().map(|x| x.0).collect() };
        assert_eq!(ids(0.4), vec![1]);
        assert_eq!(ids(0.75), vec![1, 3]);
        assert_eq!(ids(0.85), vec![1, 3, 2]);
        assert_eq!(ids(0.99), vec![1, 3, 2, 0]);
        assert_eq!(ids(1.0), vec![1, 3, 2, 0]);
        // Kept mass >= p, and dropping the least likely kept token falls below p.
        for p in [0.1f32, 0.3, 0.55, 0.7, 0.9, 0.96] {
            let kept = nucleus(&scores, 0, p);
            let probs = [0.05, 0.5, 0.15, 0.3];
            let mass: f64 = kept.iter().map(|(i, _)| probs[*i as usize]).sum();
            let last = probs[kept.last().unwrap().0 as usize];
            assert!(
                mass >= f64::from(p) - 1e-9 && mass - last < f64::from(p),
                "p {p}"
            );
        }
        // Renormalised over the kept tokens.
        let kept = nucleus(&scores, 0, 0.75);
        assert!((kept[0].1 - 0.5 / 0.8).abs() < 1e-6 && (kept[1].1 - 0.3 / 0.8).abs() < 1e-6);
        // A single dominant token is always kept, even for tiny p.
        assert_eq!(nucleus(&scores, 0, 1e-6).len(), 1);
    }

    #[test]
    fn top_k_keeps_ties_and_runs_before_top_p() {
        let scores = [1.0f32, 3.0, 2.0, 2.0, -1.0, f32::NEG_INFINITY];
        let ids: Vec<u32> = nucleus(&scores, 2, 1.0).iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 2, 3], "the 2nd best score is tied: both kept");
        let ids: Vec<u32> = nucleus(&scores, 1, 1.0).iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1]);
        // Masked tokens never survive.
        assert!(nucleus(&scores, 0, 1.0).iter().all(|x| x.0 != 5));
        // top-p mass is computed over the top-k survivors: with k=2 (3 tokens kept), token 1
        // has e^3 / (e^3 + 2 e^2) = 0.576 of the mass.
        let ids: Vec<u32> = nucleus(&scores, 2, 0.55).iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1]);
        let ids: Vec<u32> = nucleus(&scores, 0, 0.55).iter().map(|x| x.0).collect();
        assert_eq!(
            ids,
            vec![1, 2],
            "without top-k, token 1 holds less than 0.55"
        );
    }

    #[test]
    fn repetition_penalty_as_hf() {
        let mut s = [2.0f32, -1.0, 0.5, 3.0, 0.0];
        apply_repetition_penalty(&mut s, &[0, 1, 0, 4, 0], 1.1);
        assert_eq!(s, [2.0 / 1.1, -1.1, 0.5, 3.0, 0.0]);
        let mut t = [2.0f32, -1.0];
        apply_repetition_penalty(&mut t, &[0, 1], 1.0);
        assert_eq!(t, [2.0, -1.0]);
        // Ids outside the vocabulary are ignored, not a panic.
        apply_repetition_penalty(&mut t, &[99], 2.0);
    }

    #[test]
    fn min_length_masks_sep_and_argmax_takes_the_first_max() {
        let mut s = vec![0.0f32; 200];
        s[SEP as usize] = 5.0;
        s[7] = 1.0;
        s[9] = 1.0;
        assert_eq!(argmax(&s), SEP);
        mask_early_sep(&mut s, 3, 4);
        assert_eq!(argmax(&s), 7);
        let mut s2 = vec![0.0f32; 200];
        s2[SEP as usize] = 5.0;
        mask_early_sep(&mut s2, 4, 4);
        assert_eq!(argmax(&s2), SEP);
    }

    #[test]
    fn draws_follow_the_nucleus() {
        let dist = nucleus(&logits_of(&[0.05, 0.5, 0.15, 0.3]), 0, 0.75);
        let mut rng = sample_rng(7, 0);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[draw(&dist, &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(
            counts[0] + counts[2],
            0,
            "tokens outside the nucleus are never drawn"
        );
        let f1 = counts[1] as f64 / n as f64;
        assert!((f1 - 0.625).abs() < 0.02, "frequency {f1}");
    }

    /// A decoder whose next-token logits depend only on the last token: a small Markov chain over
    /// a few word ids, with [SEP] reachable.
    struct Chain {
        vocab: usize,
        rows: Vec<u32>,
        per_image: usize,
        images: usize,
    }

    impl Chain {
        fn new(vocab: usize) -> Self {
            Self {
                vocab,
                rows: Vec::new(),
                per_image: 1,
                images: 0,
            }
        }

        fn logits_after(&self, last: u32) -> Vec<f32> {
            let mut l = vec![-20.0f32; self.vocab];
            match last {
                DEC => {
                    l[10] = 2.0;
                    l[11] = 1.9;
                    l[12] = 1.0;
                }
                10 => {
                    l[SEP as usize] = 0.5;
                    l[13] = 0.4;
                    l[14] = 0.3;
                }
                11 => {
                    l[15] = 4.0;
                }
                15 => {
                    l[SEP as usize] = 4.0;
                }
                _ => {
                    l[SEP as usize] = 1.0;
                    l[10] = 0.5;
                    l[16] = 0.9;
                }
            }
            l
        }

        fn emit(&self) -> Logits {
            Logits {
                data: self
                    .rows
                    .iter()
                    .flat_map(|&t| self.logits_after(t))
                    .collect(),
                vocab: self.vocab,
            }
        }
    }

    impl Stepper for Chain {
        fn prefill(&mut self, prompt: &[u32]) -> Result<Logits> {
            self.rows = vec![*prompt.last().unwrap(); self.images];
            self.per_image = 1;
            Ok(self.emit())
        }

        fn select(&mut self, rows: &[u32], images: &[u32], rows_per_image: usize) -> Result<()> {
            assert_eq!(rows.len(), images.len() * rows_per_image);
            self.rows = rows.iter().map(|&r| self.rows[r as usize]).collect();
            self.images = images.len();
            self.per_image = rows_per_image;
            Ok(())
        }

        fn step(&mut self, tokens: &[u32]) -> Result<Logits> {
            assert_eq!(tokens.len(), self.images * self.per_image);
            self.rows = tokens.to_vec();
            Ok(self.emit())
        }
    }

    fn plan(max_length: usize, min_length: usize) -> Plan {
        Plan {
            prompt: vec![DEC],
            max_length,
            min_length,
        }
    }

    #[test]
    fn greedy_follows_the_argmax_and_respects_lengths() {
        let mut chain = Chain::new(200);
        chain.images = 2;
        let out = decode_rows(&mut chain, 2, &plan(20, 0), None).unwrap();
        assert_eq!(out[0][0].ids, vec![DEC, 10, SEP]);
        assert_eq!(out[1][0].ids, vec![DEC, 10, SEP]);
        // min_length 3 forbids [SEP] as the 3rd token: 10 -> 13 (0.4) -> [SEP].
        let mut chain = Chain::new(200);
        chain.images = 1;
        let out = decode_rows(&mut chain, 1, &plan(20, 3), None).unwrap();
        assert_eq!(out[0][0].ids, vec![DEC, 10, 13, SEP]);
        // max_length cuts without [SEP].
        let mut chain = Chain::new(200);
        chain.images = 1;
        let out = decode_rows(&mut chain, 1, &plan(2, 0), None).unwrap();
        assert_eq!(out[0][0].ids, vec![DEC, 10]);
    }

    #[test]
    fn beam_search_finds_the_better_sequence_greedy_misses() {
        // Greedy takes 10 (p=.46) then [SEP] (p=.37); beams also explore 11 (p=.42), after which
        // 15 and [SEP] are near-certain: "11 15 [SEP]" wins on length-normalised log-probability.
        let mut chain = Chain::new(200);
        chain.images = 2;
        let out = beam_search(&mut chain, 2, &plan(20, 0), &BeamParams::default()).unwrap();
        for g in &out {
            assert_eq!(g.ids, vec![DEC, 11, 15, SEP]);
            let l = Chain::new(200);
            let lp = |prev: u32, t: u32| log_softmax(&l.logits_after(prev))[t as usize];
            let want = (lp(DEC, 11) + lp(11, 15) + lp(15, SEP)) / 3.0;
            assert!((g.score.unwrap() - want).abs() < 1e-5);
        }
        // With one beam, beam search is greedy.
        let mut chain = Chain::new(200);
        chain.images = 1;
        let params = BeamParams {
            num_beams: 1,
            length_penalty: 1.0,
        };
        let out = beam_search(&mut chain, 1, &plan(20, 0), &params).unwrap();
        assert_eq!(out[0].ids, vec![DEC, 10, SEP]);
    }

    fn sample_params(seed: u64, n: usize) -> SampleParams {
        SampleParams {
            top_p: 0.95,
            top_k: 0,
            repetition_penalty: 1.0,
            num_samples: n,
            seed,
        }
    }

    #[test]
    fn sampling_is_seeded_and_batch_independent() {
        let run = |seed: u64, images: usize| {
            let mut chain = Chain::new(200);
            chain.images = images;
            decode_rows(
                &mut chain,
                images,
                &plan(12, 0),
                Some(&sample_params(seed, 8)),
            )
            .unwrap()
        };
        let ids = |out: &Vec<Vec<Generated>>, i: usize| -> Vec<Vec<u32>> {
            out[i].iter().map(|g| g.ids.clone()).collect()
        };
        let a = run(1, 1);
        let b = run(1, 1);
        assert_eq!(ids(&a, 0), ids(&b, 0), "same seed, same samples");
        let c = run(2, 1);
        assert_ne!(ids(&a, 0), ids(&c, 0), "another seed, other samples");
        assert_eq!(a[0].len(), 8);
        let distinct: std::collections::HashSet<_> = ids(&a, 0).into_iter().collect();
        assert!(distinct.len() > 1, "8 samples should not all be equal");
        // An image's samples do not depend on the batch it is in.
        let batch = run(1, 3);
        for i in 0..3 {
            assert_eq!(ids(&batch, i), ids(&a, 0));
        }
        // Every sample starts with the prompt and stays within max_length.
        for s in ids(&a, 0) {
            assert_eq!(s[0], DEC);
            assert!(s.len() <= 12);
        }
    }

    #[test]
    fn invalid_params_are_errors() {
        let p = CaptionParams::default();
        assert!(p.validate(512).is_ok());
        assert!(
            p.validate(10).is_err(),
            "max_length beyond the position table"
        );
        let mut q = p.clone();
        q.min_length = 30;
        assert!(q.validate(512).is_err());
        for mode in [
            GenerationMode::Beam(BeamParams {
                num_beams: 0,
                length_penalty: 1.0,
            }),
            GenerationMode::Sample(SampleParams {
                num_samples: 0,
                ..SampleParams::default()
            }),
            GenerationMode::Sample(SampleParams {
                top_p: 0.0,
                ..SampleParams::default()
            }),
            GenerationMode::Sample(SampleParams {
                top_p: 1.5,
                ..SampleParams::default()
            }),
            GenerationMode::Sample(SampleParams {
                repetition_penalty: -1.0,
                ..SampleParams::default()
            }),
        ] {
            let e = CaptionParams::with_mode(mode.clone()).validate(512);
            assert!(matches!(e, Err(ModelError::InvalidInput(_))), "{mode:?}");
        }
    }
}
