//! CapFilt (BLIP §3.3, <https://arxiv.org/abs/2201.12086>): the captioner writes synthetic
//! captions for an image, the ITM head of the retrieval model filters them together with the texts
//! that came with the image (alt text, a product title, a sidecar file), and only the texts it
//! judges to match are kept.
//!
//! Here the synthetic captions are the captioner's beam-search caption plus `num_samples` nucleus
//! samples (top-p 0.9, repetition penalty 1.1, as BLIP's CapFilt captioner), and a text is kept
//! when ITM's p(match) (first token `[ENC]`, as BLIP was trained) reaches the threshold (0.5: BLIP
//! drops a text when ITM predicts "no match"). The two models encode the image with their own ViT:
//! their weights differ.

use candle_core::Tensor;
use image::DynamicImage;

use super::caption::{
    BeamParams, CaptionParams, Captioner, GenerationMode, SampleParams, DEFAULT_PROMPT,
};
use super::error::{ModelError, Result};
use super::retrieval::{ItmFirstToken, Retriever};
use super::tokenizer::pre_caption;

/// CapFilt options.
#[derive(Debug, Clone, PartialEq)]
pub struct CapFiltParams {
    /// Prompt of the synthetic captions (stripped from them).
    pub prompt: String,
    /// Longest decoder sequence, `[DEC]` and prompt included (BLIP: 20).
    pub max_length: usize,
    /// Shortest decoder sequence, `[DEC]` and prompt included (BLIP: 5).
    pub min_length: usize,
    /// Beam search of the one deterministic caption.
    pub beam: BeamParams,
    /// Nucleus sampling of the diverse captions; `num_samples` may be 0 (beam caption only).
    pub sampling: SampleParams,
    /// Keep a text when p(match) >= this.
    pub threshold: f32,
}

impl Default for CapFiltParams {
    fn default() -> Self {
        Self {
            prompt: DEFAULT_PROMPT.to_string(),
            max_length: 20,
            min_length: 5,
            beam: BeamParams::default(),
            sampling: SampleParams::default(),
            threshold: 0.5,
        }
    }
}

impl CapFiltParams {
    fn caption_params(&self, mode: GenerationMode) -> CaptionParams {
        CaptionParams {
            prompt: self.prompt.clone(),
            max_length: self.max_length,
            min_length: self.min_length,
            mode,
        }
    }
}

/// Where a CapFilt candidate text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateSource {
    /// Supplied with the image (alt text, title, sidecar).
    Given,
    /// The captioner's beam-search caption.
    Beam,
    /// A nucleus sample of the captioner.
    Sample,
}

/// One text judged by the filter.
#[derive(Debug, Clone, PartialEq)]
pub struct CapFiltCandidate {
    /// Where the text came from.
    pub source: CandidateSource,
    /// The text as given or generated.
    pub text: String,
    /// ITM p(match); 0 for a text with nothing left after BLIP's cleaning (never scored).
    pub p_match: f32,
    /// ITM `[no match, match]` logits; `None` when the text was not scored.
    pub itm_logits: Option<[f32; 2]>,
    /// Whether the filter keeps the text (`p_match >= threshold`).
    pub kept: bool,
}

/// CapFilt for one image. Candidates come in order: given texts, the beam caption, the samples.
pub fn capfilt_image(
    captioner: &Captioner,
    filter: &Retriever,
    image: &DynamicImage,
    given: &[String],
    params: &CapFiltParams,
) -> Result<Vec<CapFiltCandidate>> {
    let mut out = capfilt_images(
        captioner,
        filter,
        std::slice::from_ref(image),
        &[given.to_vec()],
        params,
    )?;
    Ok(out.pop().unwrap_or_default())
}

/// CapFilt for a batch of images; `given[i]` are image `i`'s own texts (`given` may be empty:
/// no texts for any image). One list of candidates per image, as [`capfilt_image`].
pub fn capfilt_images(
    captioner: &Captioner,
    filter: &Retriever,
    images: &[DynamicImage],
    given: &[Vec<String>],
    params: &CapFiltParams,
) -> Result<Vec<Vec<CapFiltCandidate>>> {
    capfilt_images_with_tokens(captioner, filter, images, None, given, params)
}

/// [`capfilt_images`] reusing the filter's image tokens when the caller has them already
/// (ingestion embeds every image with the retrieval ViT anyway): `itm_tokens` is
/// `filter.embed_images(images)?.tokens`.
pub fn capfilt_images_with_tokens(
    captioner: &Captioner,
    filter: &Retriever,
    images: &[DynamicImage],
    itm_tokens: Option<&Tensor>,
    given: &[Vec<String>],
    params: &CapFiltParams,
) -> Result<Vec<Vec<CapFiltCandidate>>> {
    if images.is_empty() {
        return Err(ModelError::InvalidInput("no images given".into()));
    }
    if !given.is_empty() && given.len() != images.len() {
        return Err(ModelError::InvalidInput(format!(
            "{} lists of given texts for {} images",
            given.len(),
            images.len()
        )));
    }
    if !(0.0..=1.0).contains(&params.threshold) {
        return Err(ModelError::InvalidInput(format!(
            "threshold {} is not a probability",
            params.threshold
        )));
    }
    let beam_params = params.caption_params(GenerationMode::Beam(params.beam.clone()));
    let sample_params = params.caption_params(GenerationMode::Sample(params.sampling.clone()));
    // Validate everything before the expensive part.
    beam_params.validate(captioner.config().text.max_position_embeddings)?;
    if params.sampling.num_samples > 0 {
        sample_params.validate(captioner.config().text.max_position_embeddings)?;
    }

    let cap_tokens = captioner.embed_images(images)?;
    let beams = captioner.generate(&cap_tokens, &beam_params)?;
    let samples = if params.sampling.num_samples > 0 {
        captioner.generate(&cap_tokens, &sample_params)?
    } else {
        vec![Vec::new(); images.len()]
    };

    let mut candidates: Vec<Vec<CapFiltCandidate>> = Vec::with_capacity(images.len());
    for i in 0..images.len() {
        let mut list = Vec::new();
        let mut add = |source, text: &str| {
            list.push(CapFiltCandidate {
                source,
                text: text.to_string(),
                p_match: 0.0,
                itm_logits: None,
                kept: false,
            })
        };
        for t in given.get(i).into_iter().flatten() {
            add(CandidateSource::Given, t);
        }
        for c in &beams[i] {
            add(CandidateSource::Beam, &c.text);
        }
        for c in &samples[i] {
            add(CandidateSource::Sample, &c.text);
        }
        candidates.push(list);
    }

    // Score every text that has words left after BLIP's cleaning, all pairs in one ITM pass.
    let mut texts = Vec::new();
    let mut owners = Vec::new();
    for (i, list) in candidates.iter().enumerate() {
        for (j, c) in list.iter().enumerate() {
            if !filter.tokenizer().pieces(&pre_caption(&c.text))?.is_empty() {
                texts.push(c.text.as_str());
                owners.push((i, j));
            }
        }
    }
    if texts.is_empty() {
        return Ok(candidates);
    }
    let computed;
    let itm_tokens = match itm_tokens {
        Some(t) => t,
        None => {
            computed = filter.embed_images(images)?.tokens;
            &computed
        }
    };
    if itm_tokens.dims().first() != Some(&images.len()) {
        return Err(ModelError::InvalidInput(format!(
            "ITM image tokens of shape {:?} for {} images",
            itm_tokens.dims(),
            images.len()
        )));
    }
    let image_of_text: Vec<usize> = owners.iter().map(|&(i, _)| i).collect();
    let scores = filter.itm(&texts, itm_tokens, &image_of_text, ItmFirstToken::Enc)?;
    for ((i, j), s) in owners.into_iter().zip(scores) {
        let c = &mut candidates[i][j];
        c.p_match = s.prob;
        c.itm_logits = Some(s.logits);
        c.kept = s.prob >= params.threshold;
    }
    Ok(candidates)
}
