//! `config.json` of HF BLIP checkpoints, with transformers' defaults for every key a file leaves out
//! (recent `save_pretrained` writes only non-default keys).

use std::path::Path;

use serde::Deserialize;

use super::error::{ModelError, Result};

/// The activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), transformers' `"gelu"`.
    Gelu,
    /// tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// ReLU.
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// An `int` or `[h, w]` in the config (transformers accepts both for sizes).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeField {
    One(usize),
    Two([usize; 2]),
}

fn square(field: &SizeField, name: &str) -> std::result::Result<usize, String> {
    match field {
        SizeField::One(n) => Ok(*n),
        SizeField::Two([h, w]) if h == w => Ok(*h),
        SizeField::Two([h, w]) => Err(format!(
            "{name} {h}x{w} is not square; only square inputs are supported"
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: SizeField,
    patch_size: SizeField,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawVision {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: SizeField::One(384),
            patch_size: SizeField::One(16),
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    sep_token_id: Option<u32>,
}

impl Default for RawText {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            bos_token_id: Some(30522),
            pad_token_id: Some(0),
            sep_token_id: Some(102),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    text_config: Option<RawText>,
    #[serde(default)]
    vision_config: Option<RawVision>,
    #[serde(default = "default_image_text_hidden")]
    image_text_hidden_size: usize,
}

fn default_image_text_hidden() -> usize {
    256
}

/// The vision transformer's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipVisionConfig {
    /// Width of every token.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input side in pixels (square).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl BlipVisionConfig {
    /// Patches plus the `[CLS]` token.
    pub fn num_tokens(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side + 1
    }
}

/// The BERT text model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipTextConfig {
    /// Vocabulary size (30524 for BLIP: BERT's plus `[DEC]` and `[ENC]`).
    pub vocab_size: usize,
    /// Width of every token.
    pub hidden_size: usize,
    /// Width of the image tokens the cross-attention reads (the ViT's hidden size).
    pub encoder_hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Longest input.
    pub max_position_embeddings: usize,
    /// Feed-forward activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Decoder start token, `[DEC]`.
    pub bos_token_id: u32,
    /// Padding token.
    pub pad_token_id: u32,
    /// `[SEP]`: where captions end.
    pub sep_token_id: u32,
}

/// Which HF class a checkpoint was saved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlipArchitecture {
    /// `BlipForImageTextRetrieval`: ViT + text encoder + projections + ITM head.
    Retrieval,
    /// `BlipForConditionalGeneration`: ViT + text decoder.
    Captioning,
}

impl BlipArchitecture {
    /// The HF class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Retrieval => "BlipForImageTextRetrieval",
            Self::Captioning => "BlipForConditionalGeneration",
        }
    }
}

/// A BLIP checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipConfig {
    /// The class the checkpoint was saved from.
    pub architecture: BlipArchitecture,
    /// Text model shape.
    pub text: BlipTextConfig,
    /// Vision model shape.
    pub vision: BlipVisionConfig,
    /// Width of the ITC embeddings (256).
    pub image_text_hidden_size: usize,
}

impl BlipConfig {
    /// Reads `config.json` and checks that it describes `expected`.
    pub fn from_file(path: &Path, expected: BlipArchitecture) -> Result<Self> {
        let text = fs_err::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text, path, expected)
    }

    /// Parses the text of a `config.json` (`path` is only used in errors).
    pub fn from_json(json: &str, path: &Path, expected: BlipArchitecture) -> Result<Self> {
        let bad = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let arch = match (&raw.architectures, &raw.model_type) {
            (Some(list), _) if !list.is_empty() => list[0].clone(),
            (_, Some(t)) => t.clone(),
            _ => String::new(),
        };
        let found = match arch.as_str() {
            "BlipForImageTextRetrieval" => Some(BlipArchitecture::Retrieval),
            "BlipForConditionalGeneration" => Some(BlipArchitecture::Captioning),
            _ => None,
        };
        if found != Some(expected) {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: if arch.is_empty() {
                    "<none>".into()
                } else {
                    arch
                },
                expected: expected.class_name().into(),
            });
        }
        let v = raw.vision_config.unwrap_or_default();
        let t = raw.text_config.unwrap_or_default();
        let act = |name: &str| {
            Activation::parse(name).ok_or_else(|| bad(format!("unsupported hidden_act {name:?}")))
        };
        let vision = BlipVisionConfig {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            image_size: square(&v.image_size, "image_size").map_err(bad)?,
            patch_size: square(&v.patch_size, "patch_size").map_err(bad)?,
            hidden_act: act(&v.hidden_act)?,
            layer_norm_eps: v.layer_norm_eps,
        };
        let text = BlipTextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            // transformers' BlipConfig.__post_init__ ties this to the ViT width.
            encoder_hidden_size: vision.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            max_position_embeddings: t.max_position_embeddings,
            hidden_act: act(&t.hidden_act)?,
            layer_norm_eps: t.layer_norm_eps,
            bos_token_id: t.bos_token_id.unwrap_or(30522),
            pad_token_id: t.pad_token_id.unwrap_or(0),
            sep_token_id: t.sep_token_id.unwrap_or(102),
        };
        let cfg = Self {
            architecture: expected,
            text,
            vision,
            image_text_hidden_size: raw.image_text_hidden_size,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision;
        let t = &self.text;
        if v.patch_size == 0 || v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        for (name, hidden, heads) in [
            ("vision", v.hidden_size, v.num_attention_heads),
            ("text", t.hidden_size, t.num_attention_heads),
        ] {
            if heads == 0 || hidden % heads != 0 {
                return Err(format!(
                    "{name} hidden_size {hidden} is not divisible by num_attention_heads {heads}"
                ));
            }
        }
        if t.vocab_size <= 30523 {
            return Err(format!(
                "text vocab_size {} has no room for BLIP's [DEC]=30522 and [ENC]=30523 tokens",
                t.vocab_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_keys() {
        let json = r#"{"architectures":["BlipForImageTextRetrieval"],"text_config":{},"vision_config":{}}"#;
        let c =
            BlipConfig::from_json(json, Path::new("c.json"), BlipArchitecture::Retrieval).unwrap();
        assert_eq!(c.vision.image_size, 384);
        assert_eq!(c.vision.num_tokens(), 577);
        assert_eq!(c.text.num_attention_heads, 8);
        assert_eq!(c.text.encoder_hidden_size, 768);
        assert_eq!(c.image_text_hidden_size, 256);
        assert_eq!(c.text.layer_norm_eps, 1e-12);
        assert_eq!(c.vision.layer_norm_eps, 1e-5);
    }

    #[test]
    fn large_vision_sets_cross_attention_width() {
        let json = r#"{"architectures":["BlipForImageTextRetrieval"],
            "vision_config":{"hidden_size":1024,"num_hidden_layers":24,"num_attention_heads":16,"intermediate_size":4096}}"#;
        let c =
            BlipConfig::from_json(json, Path::new("c.json"), BlipArchitecture::Retrieval).unwrap();
        assert_eq!(c.text.encoder_hidden_size, 1024);
    }

    #[test]
    fn wrong_architecture_is_refused() {
        let json = r#"{"architectures":["BlipForQuestionAnswering"]}"#;
        let e = BlipConfig::from_json(json, Path::new("c.json"), BlipArchitecture::Retrieval)
            .unwrap_err();
        assert!(e.to_string().contains("BlipForQuestionAnswering"), "{e}");
        let json = r#"{"architectures":["BlipForConditionalGeneration"]}"#;
        assert!(
            BlipConfig::from_json(json, Path::new("c.json"), BlipArchitecture::Retrieval).is_err()
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        let json = r#"{"architectures":["BlipForImageTextRetrieval"],"vision_config":{"image_size":30,"patch_size":8}}"#;
        assert!(
            BlipConfig::from_json(json, Path::new("c.json"), BlipArchitecture::Retrieval).is_err()
        );
        let json =
            r#"{"architectures":["BlipForImageTextRetrieval"],"text_config":{"hidden_size":30}}"#;
        assert!(
            BlipConfig::from_json(json, Path::new("c.json"), BlipArchitecture::Retrieval).is_err()
        );
    }
}
