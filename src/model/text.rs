//! The BLIP text transformer (BERT-base layout, HF `BlipTextModel`): a bidirectional encoder for
//! ITC, the same with cross-attention over image tokens for ITM, and, with a causal mask, KV cache
//! and LM head, the image-grounded decoder that writes captions.
//!
//! Paper: <https://arxiv.org/abs/2201.12086> (§3.1, "multimodal mixture of encoder-decoder").

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use rayon::prelude::*;

use super::config::BlipTextConfig;
use super::kernels::{absorbed_cross_attention, training};
use super::layers::{
    activate, attention, layer_norm, linear, linear_act, merge_heads, softmax_diff, softmax_scaled,
    split_heads, LayerNorm,
};
use super::linear::Linear;
use super::sgemm::matmul_2d;

/// Additive value of a masked position, as in transformers' BLIP text model.
const MASKED: f64 = -10000.0;

struct Embeddings {
    word: Embedding,
    position: Embedding,
    layer_norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &BlipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, ids: &Tensor, past: usize) -> candle_core::Result<Tensor> {
        let (_, l) = ids.dims2()?;
        let positions = Tensor::arange(past as u32, (past + l) as u32, ids.device())?;
        let pos = self.position.forward(&positions)?;
        let xs = self.word.forward(ids)?.broadcast_add(&pos)?;
        self.layer_norm.forward(&xs)
    }
}

/// Multi-head attention followed by `output.dense` + residual + LayerNorm (`BlipTextAttention`).
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    heads: usize,
    scale: f64,
}

impl AttentionBlock {
    fn new(cfg: &BlipTextConfig, kv_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let s = vb.pp("self");
        Ok(Self {
            query: linear(d, d, s.pp("query"))?,
            key: linear(kv_dim, d, s.pp("key"))?,
            value: linear(kv_dim, d, s.pp("value"))?,
            dense: linear(d, d, vb.pp("output").pp("dense"))?,
            layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            scale: 1.0 / ((d / cfg.num_attention_heads) as f64).sqrt(),
        })
    }

    fn kv(&self, source: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.key.forward(source)?, self.heads)?,
            split_heads(&self.value.forward(source)?, self.heads)?,
        ))
    }

    fn forward(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let q = split_heads(&self.query.forward(xs)?, self.heads)?;
        let ctx = merge_heads(&attention(&q, k, v, mask, self.scale)?)?;
        self.layer_norm.forward(&(self.dense.forward(&ctx)? + xs)?)
    }

    /// Cross-attention where each of the `n` images in `k`/`v` is read by `rows` consecutive text
    /// rows: the rows' queries are stacked along the query axis, so the image keys and values are
    /// neither copied nor repeated (no mask: every image token is real).
    fn forward_shared(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: usize,
    ) -> candle_core::Result<Tensor> {
        if rows == 1 {
            return self.forward(xs, k, v, None);
        }
        let (b, l, _) = xs.dims3()?;
        let (n, h, _, dh) = k.dims4()?;
        if b != n * rows {
            return Err(candle_core::Error::Msg(format!(
                "{b} text rows cannot share {n} images {rows} rows each"
            )));
        }
        let q = split_heads(&self.query.forward(xs)?, self.heads)?
            .reshape((n, rows, h, l, dh))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, h, rows * l, dh))?;
        let ctx = attention(&q, k, v, None, self.scale)?
            .reshape((n, h, rows, l, dh))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, h, l, dh))?;
        let ctx = merge_heads(&ctx)?;
        self.layer_norm.forward(&(self.dense.forward(&ctx)? + xs)?)
    }

    /// Cross-attention straight from the image tokens `x` `(n, T, kv_dim)`, without projecting
    /// them to keys and values; `rows` consecutive text rows read each image. For head `h`, with
    /// `Wk_h`, `Wv_h` its `(head_dim, kv_dim)` slices of the key and value weights:
    ///
    /// - scores `Q_h K_hᵀ = (Q_h Wk_h) xᵀ + (Q_h bk_h) 1ᵀ`; the second term is the same for every
    ///   key, so softmax cancels it and the key bias is never read;
    /// - output `P_h (x Wv_hᵀ + 1 bv_hᵀ) = (P_h x) Wv_hᵀ + bv_h`, since each row of `P_h` sums to 1.
    ///
    /// All heads' `Q_h Wk_h` are stacked into one `(heads * L', kv_dim)` matrix per image (`L'`
    /// the image's text rows), so the image is read by two large matmuls per layer. That is
    /// `2 heads L' T kv_dim` multiply-adds against `2 T kv_dim d` for the projection: cheaper while
    /// `heads * L' < d` (see [`absorbed_pays`]). Same math as [`AttentionBlock::forward_shared`]
    /// up to summation order.
    fn forward_absorbed(
        &self,
        xs: &Tensor,
        x: &Tensor,
        rows: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let (n, _, kv_dim) = x.dims3()?;
        let h = self.heads;
        let dh = d / h;
        if b != n * rows {
            return Err(candle_core::Error::Msg(format!(
                "{b} text rows cannot share {n} images {rows} rows each"
            )));
        }
        let t = rows * l;
        let q = self.query.forward(xs)?;
        // `(heads, head_dim, kv_dim)`: row block `h` of the weights, a view.
        let wk = self.key.weight().reshape((h, dh, kv_dim))?;
        let wv_t = self
            .value
            .weight()
            .reshape((h, dh, kv_dim))?
            .transpose(1, 2)?;
        let one = |i: usize| -> candle_core::Result<Tensor> {
            let xi = x.get(i)?;
            // `(heads, L', head_dim)`: the image's text rows, head by head.
            let qi = q
                .narrow(0, i * rows, rows)?
                .reshape((t, h, dh))?
                .transpose(0, 1)?
                .contiguous()?;
            let a = qi.matmul(&wk)?.reshape((h * t, kv_dim))?;
            let scores = match matmul_2d(&a, &xi, true)? {
                Some(s) => s,
                None => a.matmul(&xi.t()?)?,
            };
            let probs = if training() {
                softmax_diff(&(scores * self.scale)?)?
            } else {
                softmax_scaled(scores, self.scale)?
            };
            let mixed = match matmul_2d(&probs, &xi, false)? {
                Some(m) => m,
                None => probs.matmul(&xi)?,
            }
            .reshape((h, t, kv_dim))?;
            mixed.matmul(&wv_t)?.transpose(0, 1)?.reshape((rows, l, d))
        };
        // Images in parallel on the CPU (each one's matmuls then mostly run on one thread,
        // without a hand-off per matmul); training mode is per thread, so it stays sequential.
        let outs: Vec<Tensor> = if n > 1 && !training() && x.device().is_cpu() {
            (0..n)
                .into_par_iter()
                .map(one)
                .collect::<candle_core::Result<_>>()?
        } else {
            (0..n).map(one).collect::<candle_core::Result<_>>()?
        };
        let ctx = Tensor::cat(&outs, 0)?;
        let ctx = match self.value.bias() {
            Some(bv) => ctx.broadcast_add(bv)?,
            None => ctx,
        };
        self.layer_norm.forward(&(self.dense.forward(&ctx)? + xs)?)
    }
}

/// Whether [`AttentionBlock::forward_absorbed`] does fewer multiply-adds than projecting the
/// image's keys and values and attending to them, for `text_rows` text rows per image, `tokens`
/// image tokens of width `kv_dim`, text width `d` and `heads` heads. Per layer and image:
///
/// - absorbed: `2 heads L' T kv_dim` (scores against the tokens, weighted sum of the tokens)
///   plus `2 L' d kv_dim` (the queries through `Wk`, the mixed tokens through `Wv`);
/// - projected: `2 T kv_dim d` (keys and values) plus `2 L' T d` (scores, weighted sum of the
///   values).
///
/// With BLIP-base (`d = kv_dim = 768`, 12 heads, 577 tokens) that holds up to 62 text rows per
/// image; a 35-token ITM text takes 0.58 of the work.
pub(crate) fn absorbed_pays(
    text_rows: usize,
    tokens: usize,
    kv_dim: usize,
    d: usize,
    heads: usize,
) -> bool {
    let [l, t, kv, d, h] = [text_rows, tokens, kv_dim, d, heads].map(|v| v as u128);
    h * l * t * kv + l * d * kv < t * kv * d + l * t * d
}

struct Layer {
    attention: AttentionBlock,
    crossattention: Option<AttentionBlock>,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    cfg: BlipTextConfig,
}

impl Layer {
    fn new(cfg: &BlipTextConfig, with_cross: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            attention: AttentionBlock::new(cfg, d, vb.pp("attention"))?,
            crossattention: if with_cross {
                Some(AttentionBlock::new(
                    cfg,
                    cfg.encoder_hidden_size,
                    vb.pp("crossattention"),
                )?)
            } else {
                None
            },
            intermediate: linear(d, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(cfg.intermediate_size, d, vb.pp("output").pp("dense"))?,
            output_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            cfg: cfg.clone(),
        })
    }
}

/// What the cross-attention reads of each image.
#[derive(Clone)]
enum ImageSource {
    /// Per-layer keys and values, `(N, heads, T, head_dim)`.
    Projected(Vec<(Tensor, Tensor)>),
    /// The image tokens themselves, `(N, T, encoder_hidden)`: every layer attends to them
    /// through its key and value weights without projecting them
    /// ([`AttentionBlock::forward_absorbed`]).
    Tokens(Tensor),
}

/// The image side of the cross-attention: per-layer keys and values of the image tokens,
/// computed once per image and shared by every text (caption beams, CapFilt texts) that reads
/// it, or, for texts of a few tokens read once (ITM), the image tokens alone
/// ([`ImageKv::unprojected`]).
#[derive(Clone)]
pub struct ImageKv {
    source: ImageSource,
    /// How many consecutive text rows read each image (see [`ImageKv::shared_by`]).
    rows_per_image: usize,
}

impl ImageKv {
    /// Image tokens `(N, T, encoder_hidden)` read without projecting them: the cross-attention
    /// folds its key and value weights into the queries and outputs instead. Cheaper than
    /// [`TextModel::image_kv`] when each image is read by few text rows, once
    /// ([`TextModel::image_context`] chooses).
    pub fn unprojected(image_tokens: &Tensor) -> candle_core::Result<Self> {
        image_tokens.dims3()?;
        Ok(Self {
            source: ImageSource::Tokens(image_tokens.clone()),
            rows_per_image: 1,
        })
    }

    /// Rows `index` (a `u32` tensor) of the batch: e.g. `[0, 0, 0, 1, 1, 1]` gives 3 beams per image.
    /// This copies the keys and values; [`ImageKv::shared_by`] avoids that when every image is
    /// read by the same number of consecutive rows.
    pub fn select(&self, index: &Tensor) -> candle_core::Result<Self> {
        let source = match &self.source {
            ImageSource::Projected(layers) => ImageSource::Projected(
                layers
                    .iter()
                    .map(|(k, v)| Ok((k.index_select(index, 0)?, v.index_select(index, 0)?)))
                    .collect::<candle_core::Result<_>>()?,
            ),
            ImageSource::Tokens(x) => ImageSource::Tokens(x.index_select(index, 0)?),
        };
        Ok(Self {
            source,
            rows_per_image: self.rows_per_image,
        })
    }

    /// The same images, each read by `rows` consecutive text rows (text row `r` attends to image
    /// `r / rows`), without copying: beams and samples of one image share its keys and values.
    pub fn shared_by(&self, rows: usize) -> Self {
        Self {
            source: self.source.clone(),
            rows_per_image: rows.max(1),
        }
    }

    /// How many consecutive text rows read each image (1 unless set by [`ImageKv::shared_by`]).
    pub fn rows_per_image(&self) -> usize {
        self.rows_per_image
    }

    /// Number of images.
    pub fn batch(&self) -> usize {
        match &self.source {
            ImageSource::Projected(layers) => layers.first().map_or(0, |(k, _)| k.dims()[0]),
            ImageSource::Tokens(x) => x.dims()[0],
        }
    }

    /// Whether the image tokens are read without projection ([`ImageKv::unprojected`]).
    pub fn is_unprojected(&self) -> bool {
        matches!(self.source, ImageSource::Tokens(_))
    }
}

/// Self-attention keys and values of the tokens decoded so far.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps rows `index` of the batch (beam reordering).
    pub fn select(&mut self, index: &Tensor) -> candle_core::Result<()> {
        for kv in self.layers.iter_mut().flatten() {
            *kv = (kv.0.index_select(index, 0)?, kv.1.index_select(index, 0)?);
        }
        Ok(())
    }
}

/// `BlipTextModel` without pooler.
pub struct TextModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    cfg: BlipTextConfig,
}

impl TextModel {
    /// Builds the model from the tensors under `vb` (`text_encoder` or `text_decoder.bert`).
    /// `with_cross` loads the cross-attention layers.
    pub fn new(
        cfg: &BlipTextConfig,
        with_cross: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, with_cross, vb.pp("encoder").pp("layer").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// The config this model was built with.
    pub fn config(&self) -> &BlipTextConfig {
        &self.cfg
    }

    /// Projects image tokens `(N, T, encoder_hidden)` into every layer's cross-attention K/V.
    pub fn image_kv(&self, image_tokens: &Tensor) -> candle_core::Result<ImageKv> {
        let layers = self
            .layers
            .iter()
            .map(|l| match &l.crossattention {
                Some(c) => c.kv(image_tokens),
                None => Err(candle_core::Error::Msg(
                    "this text model was built without cross-attention".into(),
                )),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(ImageKv {
            source: ImageSource::Projected(layers),
            rows_per_image: 1,
        })
    }

    /// The cross-attention's view of image tokens `(N, T, encoder_hidden)` that are each read
    /// once by texts of `text_rows` tokens: [`ImageKv::unprojected`] when that takes fewer
    /// multiply-adds (short texts: a 35-token ITM text with BLIP-base), [`TextModel::image_kv`]
    /// otherwise. Texts that read one image many times over (caption beams, decoding steps)
    /// should project once with [`TextModel::image_kv`] instead.
    pub fn image_context(
        &self,
        image_tokens: &Tensor,
        text_rows: usize,
    ) -> candle_core::Result<ImageKv> {
        let (_, tokens, width) = image_tokens.dims3()?;
        let cfg = &self.cfg;
        let absorb = absorbed_cross_attention()
            && !training()
            && absorbed_pays(
                text_rows,
                tokens,
                width,
                cfg.hidden_size,
                cfg.num_attention_heads,
            );
        if absorb {
            ImageKv::unprojected(image_tokens)
        } else {
            self.image_kv(image_tokens)
        }
    }

    /// Runs the transformer.
    ///
    /// - `ids`: `(B, L)` u32 token ids (the new tokens only when `cache` holds earlier ones);
    /// - `attention_mask`: `(B, L)` with 1 for real tokens and 0 for padding (`None`: all real);
    ///   ignored with a cache (decoding never pads);
    /// - `image`: cross-attend to these image tokens (ITM, captions); `None` for the unimodal
    ///   text encoder (ITC); row `r` reads image `r / image.rows_per_image()`;
    /// - `causal`: decoder masking; `cache`: incremental decoding.
    ///
    /// Returns the last hidden state `(B, L, hidden)`.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        image: Option<&ImageKv>,
        causal: bool,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let mask = self_attention_mask(b, l, past, attention_mask, causal, ids.device())?;
        let mut xs = self.embeddings.forward(ids, past)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (mut k, mut v) = layer.attention.kv(&xs)?;
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &cache.layers[i] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                cache.layers[i] = Some((k.clone(), v.clone()));
            }
            xs = layer.attention.forward(&xs, &k, &v, mask.as_ref())?;
            if let Some(image) = image {
                let cross = layer.crossattention.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("this text model has no cross-attention".into())
                })?;
                xs = match &image.source {
                    ImageSource::Projected(layers) => {
                        let (ik, iv) = &layers[i];
                        cross.forward_shared(&xs, ik, iv, image.rows_per_image)?
                    }
                    ImageSource::Tokens(x) => {
                        cross.forward_absorbed(&xs, x, image.rows_per_image)?
                    }
                };
            }
            let h = linear_act(&layer.intermediate, &xs, layer.cfg.hidden_act)?;
            xs = layer
                .output_norm
                .forward(&(layer.output.forward(&h)? + xs)?)?;
        }
        if let Some(cache) = cache {
            cache.len += l;
        }
        Ok(xs)
    }
}

/// The additive self-attention mask, `(B, 1, 1|L, past + L)`, or `None` when nothing is masked.
fn self_attention_mask(
    b: usize,
    l: usize,
    past: usize,
    padding: Option<&Tensor>,
    causal: bool,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let total = past + l;
    let padding = match padding {
        Some(m) if past == 0 => Some(m.to_dtype(DType::F32)?.reshape((b, 1, 1, total))?),
        _ => None,
    };
    let keep = match (causal, padding) {
        (false, None) => return Ok(None),
        // One new token sees everything cached before it and itself.
        (true, None) if l == 1 => return Ok(None),
        (false, Some(p)) => p,
        (true, p) => {
            let rows: Vec<f32> = (0..l)
                .flat_map(|i| (0..total).map(move |j| if j <= past + i { 1.0 } else { 0.0 }))
                .collect();
            let c = Tensor::from_vec(rows, (1, 1, l, total), device)?;
            match p {
                Some(p) => c.broadcast_mul(&p)?,
                None => c,
            }
        }
    };
    Ok(Some(((keep - 1.0)? * -MASKED)?))
}

/// `cls.predictions`: dense + activation + LayerNorm, then the vocabulary projection.
pub struct LmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    decoder: Linear,
    cfg: BlipTextConfig,
}

impl LmHead {
    /// Builds the head from `cls.predictions` tensors; the vocabulary projection falls back to the
    /// word embeddings (`tied`) when the checkpoint stores it only once.
    pub fn new(cfg: &BlipTextConfig, vb: VarBuilder, tied: &Tensor) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let t = vb.pp("transform");
        let weight = if vb.contains_tensor("decoder.weight") {
            vb.get((cfg.vocab_size, d), "decoder.weight")?
        } else {
            tied.clone()
        };
        let bias = if vb.contains_tensor("decoder.bias") {
            vb.get(cfg.vocab_size, "decoder.bias")?
        } else {
            vb.get(cfg.vocab_size, "bias")?
        };
        Ok(Self {
            dense: linear(d, d, t.pp("dense"))?,
            layer_norm: layer_norm(d, cfg.layer_norm_eps, t.pp("LayerNorm"))?,
            decoder: Linear::new(weight, Some(bias)),
            cfg: cfg.clone(),
        })
    }

    /// Hidden states `(B, L, hidden)` to logits `(B, L, vocab)`.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = activate(&self.dense.forward(xs)?, self.cfg.hidden_act)?;
        self.decoder.forward(&self.layer_norm.forward(&h)?)
    }
}

/// `BlipTextLMHeadModel`: the image-grounded text decoder (`text_decoder.*`).
pub struct TextDecoder {
    /// The transformer, run with a causal mask and cross-attention.
    pub bert: TextModel,
    /// The vocabulary head.
    pub head: LmHead,
}

impl TextDecoder {
    /// Builds the decoder from the tensors under `vb` (`text_decoder`).
    pub fn new(cfg: &BlipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let bert = TextModel::new(cfg, true, vb.pp("bert"))?;
        let tied = vb
            .pp("bert")
            .pp("embeddings")
            .pp("word_embeddings")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let head = LmHead::new(cfg, vb.pp("cls").pp("predictions"), &tied)?;
        Ok(Self { bert, head })
    }

    /// Logits `(B, L, vocab)` of the next token after each position.
    pub fn forward(
        &self,
        ids: &Tensor,
        image: &ImageKv,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let h = self.bert.forward(ids, None, Some(image), true, cache)?;
        self.head.forward(&h)
    }
}
