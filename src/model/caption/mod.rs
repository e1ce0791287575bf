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
//! [`ImageKv::shared_by`](crate::model::text::ImageKv::shared_by)); the self-attention keys and
//! values are cached between steps.
//!
//! The files: `params` (the options), `stepper` (the decoder as the search loops drive it),
//! `logits` (next-token scores and HF's processors over them), `sampling` (greedy search and
//! nucleus sampling), `beam` (beam search).

mod beam;
mod logits;
mod params;
mod sampling;
mod stepper;
#[cfg(test)]
mod tests;

use candle_core::{Device, Tensor};
use image::DynamicImage;

use super::base::BlipBase;
use super::config::BlipArchitecture;
use super::error::{ModelError, Result};
use super::text::{KvCache, TextDecoder};
use super::tokenizer::{DEC, SEP};
use super::weights::{ModelFiles, ModelSource};
use beam::beam_search;
use sampling::decode_rows;
use stepper::{ModelStepper, Plan};

pub use params::{BeamParams, CaptionParams, GenerationMode, SampleParams, DEFAULT_PROMPT};

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
