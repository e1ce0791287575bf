//! What the engine asks of BLIP, as one trait: [`Encoders`]. The command line runs the models
//! in-process ([`LocalModels`]); the server implements the same trait with a client of its
//! inference queue, so search and ingestion code is the same in both, and only the thread that
//! owns the models ever runs a forward pass.

use candle_core::{Device, Tensor};
use image::DynamicImage;

use super::error::{EngineError, Result};
use crate::index::CollectionInfo;
use crate::model::capfilt::capfilt_images_with_tokens;
use crate::model::ModelError;

// The model vocabulary the edges use (the CLI's model commands, the server's decode checks):
// they reach the model layer through the engine only.
pub use crate::model::capfilt::{capfilt_images, CandidateSource, CapFiltCandidate, CapFiltParams};
pub use crate::model::caption::Captioner;
pub use crate::model::config::BlipArchitecture;
pub use crate::model::preprocess::{
    decode_admitted, decode_cost, load_image, Admitted, DecodeBudget, DecodeLimits,
};
pub use crate::model::retrieval::rows;
pub use crate::model::weights::{DEFAULT_CAPTION_MODEL, DEFAULT_RETRIEVAL_MODEL};
pub use crate::model::{
    select_device, BeamParams, CaptionParams, GenerationMode, ItmFirstToken, ItmScore, ModelSource,
    Retriever, SampleParams, DEFAULT_PROMPT,
};

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

/// Images to caption and filter with CapFilt.
pub struct CapFiltJob {
    /// The decoded images.
    pub images: Vec<DynamicImage>,
    /// The retrieval ViT features of `images` `(N, tokens, hidden)`, when the caller has them
    /// (else they are computed).
    pub tokens: Option<Tensor>,
    /// The texts that came with each image (file names, sidecar captions), judged with the
    /// generated ones.
    pub given: Vec<Vec<String>>,
    /// Caption modes and the ITM threshold.
    pub params: CapFiltParams,
}

/// The model operations search and ingestion need.
pub trait Encoders {
    /// ITC vectors and ViT features of images.
    fn encode_images(&self, images: Vec<DynamicImage>) -> Result<EncodedImages>;
    /// ITC vectors of texts.
    fn encode_texts(&self, texts: Vec<String>) -> Result<Vec<EncodedText>>;
    /// ITM of one text against each image of `tokens` `(N, tokens, hidden)`, with `[ENC]` first
    /// as BLIP was trained.
    fn itm(&self, text: String, tokens: Tensor) -> Result<Vec<ItmScore>>;
    /// CapFilt candidates (given texts, beam caption, samples) per image of `job`.
    fn capfilt(&self, job: CapFiltJob) -> Result<Vec<Vec<CapFiltCandidate>>>;
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

    fn capfilt(&self, _: CapFiltJob) -> Result<Vec<Vec<CapFiltCandidate>>> {
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

    fn capfilt(&self, job: CapFiltJob) -> Result<Vec<Vec<CapFiltCandidate>>> {
        let captioner = self
            .captioner
            .as_ref()
            .ok_or_else(|| EngineError::InvalidInput("no caption model loaded".into()))?;
        Ok(capfilt_images_with_tokens(
            captioner,
            &self.retriever,
            &job.images,
            job.tokens.as_ref(),
            &job.given,
            &job.params,
        )?)
    }

    fn can_caption(&self) -> bool {
        self.captioner.is_some()
    }
}

/// What a collection built with `retriever` records about it (no caption model).
pub fn retriever_info(retriever: &Retriever) -> CollectionInfo {
    let cfg = retriever.config();
    let mut info = CollectionInfo::new(
        retriever.name(),
        None,
        retriever.embedding_dim(),
        cfg.vision.num_tokens(),
        cfg.vision.hidden_size,
    );
    info.retrieval_fingerprint = Some(retriever.fingerprint().to_string());
    info
}

/// Models for searches that need none (text-only without rerank, more like this): any call is an
/// error, which says the search needed a model after all.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoModels;

impl NoModels {
    fn refuse<T>() -> Result<T> {
        Err(EngineError::Internal(
            "this search needs the retrieval model, and none was loaded".into(),
        ))
    }
}

impl Encoders for NoModels {
    fn encode_images(&self, _: Vec<DynamicImage>) -> Result<EncodedImages> {
        Self::refuse()
    }
    fn encode_texts(&self, _: Vec<String>) -> Result<Vec<EncodedText>> {
        Self::refuse()
    }
    fn itm(&self, _: String, _: Tensor) -> Result<Vec<ItmScore>> {
        Self::refuse()
    }
    fn capfilt(&self, _: CapFiltJob) -> Result<Vec<Vec<CapFiltCandidate>>> {
        Self::refuse()
    }
    fn can_caption(&self) -> bool {
        false
    }
}

impl LocalModels {
    /// Loads the retrieval model and, when `caption` is given, the caption model, on `device`.
    pub fn load(
        retrieval: &ModelSource,
        caption: Option<&ModelSource>,
        device: &Device,
    ) -> Result<Self> {
        let retriever = Retriever::load(retrieval, device)?;
        let captioner = caption.map(|c| Captioner::load(c, device)).transpose()?;
        Ok(Self {
            retriever,
            captioner,
        })
    }

    /// What a collection built with these models records about them.
    pub fn collection_info(&self) -> CollectionInfo {
        let mut info = retriever_info(&self.retriever);
        info.caption_model = self.captioner.as_ref().map(|c| c.name().to_string());
        info
    }

    /// The device the models run on, as `cpu`, `cuda:N` or `metal:N`.
    pub fn device_name(&self) -> String {
        match self.retriever.device().location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    /// ITM for several searches in one forward pass: each job is a query text and the features
    /// of its candidates `(N, tokens, hidden)`; the answer holds each job's scores, in order.
    pub fn itm_batch(&self, jobs: Vec<(String, Tensor)>) -> Result<Vec<Vec<ItmScore>>> {
        let device = self.retriever.device();
        let mut counts = Vec::with_capacity(jobs.len());
        let mut parts = Vec::with_capacity(jobs.len());
        let mut pair_texts: Vec<&str> = Vec::new();
        for (text, t) in &jobs {
            let n = t.dim(0).map_err(ModelError::from)?;
            counts.push(n);
            parts.push(t.to_device(device).map_err(ModelError::from)?);
            // Pair p is (text of its search, its own image row).
            pair_texts.extend(std::iter::repeat_n(text.as_str(), n));
        }
        if pair_texts.is_empty() {
            return Ok(counts.iter().map(|_| Vec::new()).collect());
        }
        let all = Tensor::cat(&parts, 0).map_err(ModelError::from)?;
        let index: Vec<usize> = (0..pair_texts.len()).collect();
        let scores = self
            .retriever
            .itm(&pair_texts, &all, &index, ItmFirstToken::Enc)?;
        let mut it = scores.into_iter();
        Ok(counts
            .iter()
            .map(|n| it.by_ref().take(*n).collect())
            .collect())
    }
}
