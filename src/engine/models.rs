//! What the engine asks of BLIP, as one trait: [`Encoders`]. The command line runs the models
//! in-process ([`LocalModels`]); the server implements the same trait with a client of its
//! inference queue, so search and ingestion code is the same in both, and only the thread that
//! owns the models ever runs a forward pass.

use candle_core::Tensor;
use image::DynamicImage;

use super::error::{EngineError, Result};
use crate::model::capfilt::{capfilt_images_with_tokens, CapFiltCandidate, CapFiltParams};
use crate::model::caption::Captioner;
use crate::model::retrieval::rows;
use crate::model::{ItmFirstToken, ItmScore, Retriever};

/// ITC vectors and ViT features of a batch of images.
pub struct EncodedImages {
    /// One normalised ITC vector per image.
    pub itc: Vec<Vec<f32>>,
    /// The retrieval ViT's last hidden state `(N, tokens, hidden)`, for ITM.
    pub tokens: Tensor,
}

/// An encoded text query.
pub struct EncodedText {
    /// The normalised ITC vector.
    pub itc: Vec<f32>,
    /// Whether the text was cut to BLIP's 35-token limit.
    pub truncated: bool,
}

/// The model operations search and ingestion need.
pub trait Encoders {
    /// ITC vectors and ViT features of images.
    fn encode_images(&self, images: Vec<DynamicImage>) -> Result<EncodedImages>;
    /// ITC vectors of texts.
    fn encode_texts(&self, texts: Vec<String>) -> Result<Vec<EncodedText>>;
    /// ITM of one text against each image of `tokens` `(N, tokens, hidden)`, with [ENC] first
    /// as BLIP was trained.
    fn itm(&self, text: String, tokens: Tensor) -> Result<Vec<ItmScore>>;
    /// CapFilt candidates (given texts, beam caption, samples) per image; `tokens` are the
    /// retrieval ViT features of `images` when the caller has them.
    fn capfilt(
        &self,
        images: Vec<DynamicImage>,
        tokens: Option<Tensor>,
        given: Vec<Vec<String>>,
        params: CapFiltParams,
    ) -> Result<Vec<Vec<CapFiltCandidate>>>;
    /// Whether a caption model is loaded (else [`Encoders::capfilt`] fails).
    fn can_caption(&self) -> bool;
}

/// The retrieval model alone, run on the calling thread: search, and ingestion without captions.
impl Encoders for Retriever {
    fn encode_images(&self, images: Vec<DynamicImage>) -> Result<EncodedImages> {
        let emb = self.embed_images(&images)?;
        Ok(EncodedImages {
            itc: rows(&emb.itc)?,
            tokens: emb.tokens,
        })
    }

    fn encode_texts(&self, texts: Vec<String>) -> Result<Vec<EncodedText>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let emb = self.embed_texts(&refs)?;
        Ok(rows(&emb.itc)?
            .into_iter()
            .zip(emb.truncated)
            .map(|(itc, truncated)| EncodedText { itc, truncated })
            .collect())
    }

    fn itm(&self, text: String, tokens: Tensor) -> Result<Vec<ItmScore>> {
        let tokens = tokens
            .to_device(self.device())
            .map_err(crate::model::ModelError::from)?;
        let n = tokens.dim(0).map_err(crate::model::ModelError::from)?;
        let texts = vec![text.as_str(); n];
        let index: Vec<usize> = (0..n).collect();
        Ok(Retriever::itm(
            self,
            &texts,
            &tokens,
            &index,
            ItmFirstToken::Enc,
        )?)
    }

    fn capfilt(
        &self,
        _images: Vec<DynamicImage>,
        _tokens: Option<Tensor>,
        _given: Vec<Vec<String>>,
        _params: CapFiltParams,
    ) -> Result<Vec<Vec<CapFiltCandidate>>> {
        Err(EngineError::InvalidInput("no caption model loaded".into()))
    }

    fn can_caption(&self) -> bool {
        false
    }
}

/// The retrieval model and, when captions are wanted, the caption model, run on the calling
/// thread.
pub struct LocalModels {
    /// The retrieval model (ITC, ITM).
    pub retriever: Retriever,
    /// The caption model, when captions are wanted.
    pub captioner: Option<Captioner>,
}

impl Encoders for LocalModels {
    fn encode_images(&self, images: Vec<DynamicImage>) -> Result<EncodedImages> {
        self.retriever.encode_images(images)
    }

    fn encode_texts(&self, texts: Vec<String>) -> Result<Vec<EncodedText>> {
        self.retriever.encode_texts(texts)
    }

    fn itm(&self, text: String, tokens: Tensor) -> Result<Vec<ItmScore>> {
        Encoders::itm(&self.retriever, text, tokens)
    }

    fn capfilt(
        &self,
        images: Vec<DynamicImage>,
        tokens: Option<Tensor>,
        given: Vec<Vec<String>>,
        params: CapFiltParams,
    ) -> Result<Vec<Vec<CapFiltCandidate>>> {
        let captioner = self
            .captioner
            .as_ref()
            .ok_or_else(|| EngineError::InvalidInput("no caption model loaded".into()))?;
        Ok(capfilt_images_with_tokens(
            captioner,
            &self.retriever,
            &images,
            tokens.as_ref(),
            &given,
            &params,
        )?)
    }

    fn can_caption(&self) -> bool {
        self.captioner.is_some()
    }
}
