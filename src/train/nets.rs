//! The trainable networks as candle modules over a `VarBuilder` under HF tensor names: the
//! retrieval model, its momentum encoders and the captioner. Building one over a `VarMap`
//! declares its variables; over a checkpoint, it checks that every tensor is there.

use candle_nn::VarBuilder;

use crate::model::config::{BlipArchitecture, BlipConfig};
use crate::model::layers::linear;
use crate::model::linear::Linear;
use crate::model::text::{TextDecoder, TextModel};
use crate::model::vision::VisionModel;

/// `BlipForImageTextRetrieval` as a trainable network.
pub struct RetrievalNet {
    /// The ViT.
    pub vision: VisionModel,
    /// The text encoder (with cross-attention for ITM).
    pub text: TextModel,
    /// Image features to the ITC space.
    pub vision_proj: Linear,
    /// Text features to the ITC space.
    pub text_proj: Linear,
    /// ITM classifier (index 1 = match).
    pub itm_head: Linear,
}

impl RetrievalNet {
    /// Builds the network over `vb` (HF names).
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let Encoders {
            vision,
            text,
            vision_proj,
            text_proj,
        } = Encoders::new(cfg, vb.clone(), true)?;
        Ok(Self {
            vision,
            text,
            vision_proj,
            text_proj,
            itm_head: linear(cfg.text.hidden_size, 2, vb.pp("itm_head"))?,
        })
    }
}

/// The image and text encoders of [`RetrievalNet`] with their ITC projections; without
/// cross-attention they are the momentum encoders.
pub(super) struct Encoders {
    pub(super) vision: VisionModel,
    pub(super) text: TextModel,
    pub(super) vision_proj: Linear,
    pub(super) text_proj: Linear,
}

impl Encoders {
    pub(super) fn new(
        cfg: &BlipConfig,
        vb: VarBuilder,
        cross_attention: bool,
    ) -> candle_core::Result<Self> {
        let e = cfg.image_text_hidden_size;
        Ok(Self {
            vision: VisionModel::new(&cfg.vision, vb.pp("vision_model"))?,
            text: TextModel::new(&cfg.text, cross_attention, vb.pp("text_encoder"))?,
            vision_proj: linear(cfg.vision.hidden_size, e, vb.pp("vision_proj"))?,
            text_proj: linear(cfg.text.hidden_size, e, vb.pp("text_proj"))?,
        })
    }
}

/// Whether a parameter has a momentum copy.
pub(super) fn has_momentum_copy(name: &str) -> bool {
    [
        "vision_model.",
        "vision_proj.",
        "text_proj.",
        "text_encoder.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        && !name.contains(".crossattention.")
}

/// `BlipForConditionalGeneration` as a trainable network.
pub struct CaptionNet {
    /// The ViT.
    pub vision: VisionModel,
    /// The image-grounded decoder.
    pub decoder: TextDecoder,
}

impl CaptionNet {
    /// Builds the network over `vb` (HF names).
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            vision: VisionModel::new(&cfg.vision, vb.pp("vision_model"))?,
            decoder: TextDecoder::new(&cfg.text, vb.pp("text_decoder"))?,
        })
    }
}

/// Builds the network of `arch` over `vb` and drops it: every variable it needs is then created
/// (over a `VarMap`) or checked present with its shape (over a checkpoint).
pub fn declare(
    arch: BlipArchitecture,
    cfg: &BlipConfig,
    vb: VarBuilder,
) -> candle_core::Result<()> {
    match arch {
        BlipArchitecture::Retrieval => RetrievalNet::new(cfg, vb).map(drop),
        BlipArchitecture::Captioning => CaptionNet::new(cfg, vb).map(drop),
    }
}
