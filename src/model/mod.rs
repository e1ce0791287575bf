//! BLIP (Li et al. 2022, <https://arxiv.org/abs/2201.12086>) in candle: everything needed to turn
//! images and texts into ITC embeddings, ITM scores and captions.
//!
//! This layer knows nothing of indexes or servers. Entry points: [`Retriever`] (ITC + ITM, from a
//! `BlipForImageTextRetrieval` checkpoint), [`Captioner`] (from a `BlipForConditionalGeneration`
//! checkpoint) and [`capfilt_images`] (BLIP's caption-and-filter, using both).

mod attention;
pub mod base;
pub mod capfilt;
pub mod caption;
pub mod config;
mod cpu_op;
pub mod device;
pub mod error;
pub mod kernels;
pub mod layers;
pub mod linear;
pub mod pdq;
pub mod preprocess;
pub mod resample;
pub mod retrieval;
pub(crate) mod sgemm;
#[cfg(test)]
mod testing;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use base::BlipBase;
pub use capfilt::{
    capfilt_image, capfilt_images, capfilt_images_with_tokens, CandidateSource, CapFiltCandidate,
    CapFiltParams,
};
pub use caption::{
    BeamParams, Caption, CaptionParams, Captioner, GenerationMode, SampleParams, DEFAULT_PROMPT,
};
pub use config::{BlipConfig, BlipTextConfig, BlipVisionConfig};
pub use device::select_device;
pub use error::{ModelError, Result};
pub use kernels::TrainingMode;
pub use retrieval::{CrossAttention, ItmFirstToken, ItmScore, Retriever};
pub use weights::ModelSource;
