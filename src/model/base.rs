//! What every loaded BLIP model holds: its config, tokenizer, device and name, and the ViT that
//! turns pixels into image tokens. [`super::Retriever`] and [`super::Captioner`] are a
//! [`BlipBase`] plus their own heads, and reach it through `Deref`: its accessors are theirs.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;

use super::config::{BlipArchitecture, BlipConfig};
use super::error::{ModelError, Result};
use super::preprocess::pixel_values;
use super::tokenizer::BlipTokenizer;
use super::vision::VisionModel;
use super::weights::{explain_load_error, ModelFiles};

/// A checkpoint's config, tokenizer and ViT, on a device.
pub struct BlipBase {
    vision: VisionModel,
    tokenizer: BlipTokenizer,
    config: BlipConfig,
    device: Device,
    name: String,
}

impl BlipBase {
    /// Opens `files` as a checkpoint of `arch` and builds the ViT, then the model's own parts
    /// with `heads` (over the whole checkpoint); `name` is kept for reporting.
    pub(crate) fn load<H>(
        files: &ModelFiles,
        arch: BlipArchitecture,
        name: &str,
        device: &Device,
        heads: impl FnOnce(&BlipConfig, &VarBuilder) -> candle_core::Result<H>,
    ) -> Result<(Self, H)> {
        let (config, tokenizer, vb) = files.open(arch, device)?;
        let build = || -> candle_core::Result<_> {
            let vision = VisionModel::new(&config.vision, vb.pp("vision_model"))?;
            Ok((vision, heads(&config, &vb)?))
        };
        let (vision, heads) = build().map_err(|e| explain_load_error(files.weights.path(), e))?;
        let base = Self {
            vision,
            tokenizer,
            config,
            device: device.clone(),
            name: name.to_string(),
        };
        Ok((base, heads))
    }

    /// The checkpoint's config.
    pub fn config(&self) -> &BlipConfig {
        &self.config
    }

    /// Where the model was loaded from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &BlipTokenizer {
        &self.tokenizer
    }

    /// Preprocesses images into the ViT's input, pixel values `(N, 3, S, S)`.
    pub(crate) fn pixel_values(&self, images: &[DynamicImage]) -> Result<Tensor> {
        pixel_values(images, self.config.vision.image_size, &self.device)
    }

    /// The ViT's last hidden state `(N, tokens, hidden)` for pixel values `(N, 3, S, S)`.
    pub(crate) fn image_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let s = self.config.vision.image_size;
        match pixels.dims() {
            [_, 3, h, w] if *h == s && *w == s => {}
            d => {
                return Err(ModelError::InvalidInput(format!(
                    "pixel values of shape {d:?}, expected (N, 3, {s}, {s})"
                )))
            }
        }
        Ok(self.vision.forward(pixels)?)
    }
}
