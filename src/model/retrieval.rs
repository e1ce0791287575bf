//! `BlipForImageTextRetrieval`: ITC embeddings (unimodal encoders + projections, normalised) and
//! ITM scores (text encoder cross-attending to the image tokens + `itm_head`).
//!
//! Model card: <https://huggingface.co/Salesforce/blip-itm-base-coco>.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;

use super::base::BlipBase;
use super::config::{BlipArchitecture, BlipConfig};
use super::error::{ModelError, Result};
use super::layers::{l2_normalize, linear};
use super::linear::Linear;
use super::text::{ImageKv, TextModel};
use super::tokenizer::{TextBatch, CLS, ENC, MAX_TEXT_TOKENS};
use super::weights::{ModelFiles, ModelSource};

/// The first token of the ITM text input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ItmFirstToken {
    /// [ENC] = 30523, what the Salesforce checkpoints were trained with (original BLIP).
    #[default]
    Enc,
    /// [CLS] = 101, what HF transformers' `BlipForImageTextRetrieval` feeds.
    Cls,
}

impl ItmFirstToken {
    fn id(self) -> u32 {
        match self {
            Self::Enc => ENC,
            Self::Cls => CLS,
        }
    }
}

/// How ITM's cross-attention reads the image tokens (the same result up to rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrossAttention {
    /// Whichever takes fewer multiply-adds for the texts' length ([`TextModel::image_context`]).
    #[default]
    Auto,
    /// Project every image's tokens to keys and values in each layer, then attend.
    Projected,
    /// Attend to the image tokens directly, with the key and value weights folded into the
    /// queries and outputs ([`ImageKv::unprojected`]).
    Unprojected,
}

/// The ITM verdict on one (text, image) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ItmScore {
    /// `[no match, match]` logits of `itm_head`.
    pub logits: [f32; 2],
    /// `p(match) = softmax(logits)[1]`.
    pub prob: f32,
}

impl ItmScore {
    fn from_logits(no: f32, yes: f32) -> Self {
        // softmax over two classes, written to stay finite for any logits.
        let prob = 1.0 / (1.0 + (no - yes).exp());
        Self {
            logits: [no, yes],
            prob,
        }
    }
}

/// Image encoder output for a batch.
pub struct ImageEmbeddings {
    /// Normalised ITC vectors `(N, 256)`.
    pub itc: Tensor,
    /// The ViT's last hidden state `(N, tokens, hidden)`: what ITM cross-attends to.
    pub tokens: Tensor,
}

/// Text encoder output for a batch.
pub struct TextEmbeddings {
    /// Normalised ITC vectors `(N, 256)`.
    pub itc: Tensor,
    /// Whether each text was cut to the 35-token limit.
    pub truncated: Vec<bool>,
}

/// BLIP's retrieval model: ITC for candidate search, ITM for reranking.
pub struct Retriever {
    base: BlipBase,
    text: TextModel,
    vision_proj: Linear,
    text_proj: Linear,
    itm_head: Linear,
    fingerprint: String,
}

/// The config, tokenizer, device, name and ViT.
impl std::ops::Deref for Retriever {
    type Target = BlipBase;

    fn deref(&self) -> &BlipBase {
        &self.base
    }
}

impl Retriever {
    /// Loads a `BlipForImageTextRetrieval` checkpoint.
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        let files = source.resolve()?;
        Self::from_files(&files, &source.name(), device)
    }

    /// Loads from resolved files; `name` is kept for reporting.
    pub fn from_files(files: &ModelFiles, name: &str, device: &Device) -> Result<Self> {
        let heads = |config: &BlipConfig, vb: &VarBuilder| -> candle_core::Result<_> {
            let text = TextModel::new(&config.text, true, vb.pp("text_encoder"))?;
            let e = config.image_text_hidden_size;
            let vision_proj = linear(config.vision.hidden_size, e, vb.pp("vision_proj"))?;
            let text_proj = linear(config.text.hidden_size, e, vb.pp("text_proj"))?;
            let itm_head = linear(config.text.hidden_size, 2, vb.pp("itm_head"))?;
            Ok((text, vision_proj, text_proj, itm_head))
        };
        let (base, (text, vision_proj, text_proj, itm_head)) =
            BlipBase::load(files, BlipArchitecture::Retrieval, name, device, heads)?;
        Ok(Self {
            base,
            text,
            vision_proj,
            text_proj,
            itm_head,
            fingerprint: files.fingerprint()?,
        })
    }

    /// The checkpoint's identity by content (see [`ModelFiles::fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Width of the ITC vectors (256 for every released checkpoint).
    pub fn embedding_dim(&self) -> usize {
        self.config().image_text_hidden_size
    }

    /// Preprocesses and encodes images (one forward pass for the batch).
    pub fn embed_images(&self, images: &[DynamicImage]) -> Result<ImageEmbeddings> {
        self.embed_pixels(&self.pixel_values(images)?)
    }

    /// Encodes preprocessed pixels `(N, 3, S, S)`.
    pub fn embed_pixels(&self, pixels: &Tensor) -> Result<ImageEmbeddings> {
        let tokens = self.image_tokens(pixels)?;
        let cls = tokens.i((.., 0))?;
        let itc = l2_normalize(&self.vision_proj.forward(&cls)?)?;
        Ok(ImageEmbeddings { itc, tokens })
    }

    /// Cleans, tokenises and encodes texts for ITC (one forward pass for the batch).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<TextEmbeddings> {
        let batch = self.encode(texts)?;
        let (ids, mask) = batch.tensors(None, self.device())?;
        let hidden = self.text_hidden(&ids, &mask)?;
        let itc = l2_normalize(&self.text_proj.forward(&hidden.i((.., 0))?)?)?;
        Ok(TextEmbeddings {
            itc,
            truncated: batch.truncated,
        })
    }

    /// Tokenises texts with BLIP's cleaning and the 35-token limit.
    pub fn encode(&self, texts: &[&str]) -> Result<TextBatch> {
        if texts.is_empty() {
            return Err(ModelError::InvalidInput("no texts given".into()));
        }
        self.tokenizer().encode_batch(texts, MAX_TEXT_TOKENS)
    }

    /// The unimodal text encoder's last hidden state for token ids `(N, L)`.
    pub fn text_hidden(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self.text.forward(ids, Some(mask), None, false, None)?)
    }

    /// ITC text vectors for token ids.
    pub fn text_itc(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.text_hidden(ids, mask)?;
        Ok(l2_normalize(&self.text_proj.forward(&hidden.i((.., 0))?)?)?)
    }

    /// ITM on pairs: text `p` is matched against image `image_of_text[p]` of `image_tokens`
    /// `(N, tokens, hidden)`. Each image's cross-attention keys/values are computed once however
    /// many texts read it; all pairs run in one forward pass.
    pub fn itm(
        &self,
        texts: &[&str],
        image_tokens: &Tensor,
        image_of_text: &[usize],
        first: ItmFirstToken,
    ) -> Result<Vec<ItmScore>> {
        let batch = self.encode(texts)?;
        let (ids, mask) = batch.tensors(Some(first.id()), self.device())?;
        let logits = self.itm_logits(&ids, &mask, image_tokens, image_of_text)?;
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(rows
            .iter()
            .map(|r| ItmScore::from_logits(r[0], r[1]))
            .collect())
    }

    /// ITM logits `(P, 2)` for token ids `(P, L)` (first token as given) against
    /// `image_tokens[image_of_text[p]]`.
    pub fn itm_logits(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        image_tokens: &Tensor,
        image_of_text: &[usize],
    ) -> Result<Tensor> {
        self.itm_logits_with(ids, mask, image_tokens, image_of_text, CrossAttention::Auto)
    }

    /// [`Retriever::itm_logits`] with the cross-attention's form chosen by the caller (the same
    /// logits up to rounding; for tests and measurements).
    pub fn itm_logits_with(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        image_tokens: &Tensor,
        image_of_text: &[usize],
        form: CrossAttention,
    ) -> Result<Tensor> {
        let (p, _) = ids.dims2()?;
        let (n, _, width) = image_tokens.dims3()?;
        if width != self.config().vision.hidden_size {
            return Err(ModelError::InvalidInput(format!(
                "image tokens of width {width}, this model's ViT gives {}",
                self.config().vision.hidden_size
            )));
        }
        if image_of_text.len() != p || image_of_text.iter().any(|&i| i >= n) {
            return Err(ModelError::InvalidInput(format!(
                "{} image indices for {p} texts and {n} images",
                image_of_text.len()
            )));
        }
        // Text p reads image p (reranking one query against N candidates), or runs of equal
        // length per image: the keys/values are used as they are, without a gathered copy.
        let rows = p / n.max(1);
        let shared = rows >= 1
            && rows * n == p
            && image_of_text
                .iter()
                .enumerate()
                .all(|(t, &i)| i == t / rows);
        let per_image = if shared { rows } else { 1 };
        let kv = match form {
            CrossAttention::Auto => self
                .text
                .image_context(image_tokens, per_image * ids.dim(1)?)?,
            CrossAttention::Unprojected => ImageKv::unprojected(image_tokens)?,
            CrossAttention::Projected => self.text.image_kv(image_tokens)?,
        };
        let kv = if shared {
            if rows == 1 {
                kv
            } else {
                kv.shared_by(rows)
            }
        } else {
            let index: Vec<u32> = image_of_text.iter().map(|&i| i as u32).collect();
            kv.select(&Tensor::new(index.as_slice(), self.device())?)?
        };
        let hidden = self.text.forward(ids, Some(mask), Some(&kv), false, None)?;
        Ok(self.itm_head.forward(&hidden.i((.., 0))?)?)
    }
}

/// Rows of a 2-D tensor as vectors (for JSON output and stores).
pub fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itm_prob_is_softmax() {
        let s = ItmScore::from_logits(1.0, 3.0);
        let e = (3f32.exp()) / (1f32.exp() + 3f32.exp());
        assert!((s.prob - e).abs() < 1e-6);
        assert!(ItmScore::from_logits(-1e30, 1e30).prob.is_finite());
    }
}
