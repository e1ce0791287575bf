//! The BLIP image encoder: a pre-norm ViT with 16x16 (config: `patch_size`) patches and a `[CLS]`
//! token, as in HF transformers' `BlipVisionModel` (`vision_model.*` tensors).
//!
//! Paper: <https://arxiv.org/abs/2201.12086>; model card:
//! <https://huggingface.co/Salesforce/blip-itm-base-coco>.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::config::BlipVisionConfig;
use super::layers::{attention, layer_norm, linear, linear_act, merge_heads, LayerNorm};
use super::linear::Linear;

struct Embeddings {
    class_embedding: Tensor,
    /// The patch convolution as a matrix `(hidden, 3 * patch * patch)`: with stride equal to the
    /// kernel, a conv is a patchify followed by one matmul.
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    patch: usize,
    hidden: usize,
}

impl Embeddings {
    fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let class_embedding = vb.get((1, 1, d), "class_embedding")?;
        let patch_weight = vb
            .pp("patch_embedding")
            .get((d, 3, p, p), "weight")?
            .reshape((d, 3 * p * p))?
            .t()?
            .contiguous()?;
        let patch_bias = vb.pp("patch_embedding").get(d, "bias")?;
        let position_embedding = vb.get((1, cfg.num_tokens(), d), "position_embedding")?;
        Ok(Self {
            class_embedding,
            patch_weight,
            patch_bias,
            position_embedding,
            patch: p,
            hidden: d,
        })
    }

    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let embeds = patches
            .matmul(&self.patch_weight)?
            .broadcast_add(&self.patch_bias)?
            .reshape((b, gh * gw, self.hidden))?;
        let cls = self.class_embedding.broadcast_as((b, 1, self.hidden))?;
        Tensor::cat(&[&cls, &embeds], 1)?.broadcast_add(&self.position_embedding)
    }
}

struct Attention {
    qkv: Linear,
    projection: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let dh = d / self.heads;
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, l, 3, self.heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let ctx = attention(&q, &k, &v, None, self.scale)?;
        self.projection.forward(&merge_heads(&ctx)?)
    }
}

struct EncoderLayer {
    attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    cfg: BlipVisionConfig,
}

impl EncoderLayer {
    fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let sa = vb.pp("self_attn");
        Ok(Self {
            attn: Attention {
                qkv: linear(d, 3 * d, sa.pp("qkv"))?,
                projection: linear(d, d, sa.pp("projection"))?,
                heads: cfg.num_attention_heads,
                scale: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
            },
            layer_norm1: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = (self.attn.forward(&self.layer_norm1.forward(xs)?)? + xs)?;
        let m = linear_act(
            &self.fc1,
            &self.layer_norm2.forward(&h)?,
            self.cfg.hidden_act,
        )?;
        let m = self.fc2.forward(&m)?;
        m + h
    }
}

/// `BlipVisionModel`: pixels `(B, 3, S, S)` to image tokens `(B, 1 + (S/P)^2, hidden)`.
pub struct VisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: BlipVisionConfig,
}

impl VisionModel {
    /// Builds the model from the tensors under `vb` (`vision_model` in BLIP checkpoints).
    pub fn new(cfg: &BlipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let post_layernorm =
            layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self {
            embeddings,
            layers,
            post_layernorm,
            cfg: cfg.clone(),
        })
    }

    /// The config this model was built with.
    pub fn config(&self) -> &BlipVisionConfig {
        &self.cfg
    }

    /// The last hidden state after `post_layernorm` (`vision_model(...)[0]`); token 0 is `[CLS]`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.embeddings.forward(pixels)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.post_layernorm.forward(&xs)
    }
}
