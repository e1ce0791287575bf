//! Small building blocks shared by the vision and text transformers.

use candle_core::{Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::config::Activation;

/// A `nn.Linear` with bias, named as in the checkpoint.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

/// A `nn.LayerNorm` (weight and bias), named as in the checkpoint.
pub(crate) fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb)
}

pub(crate) fn activate(xs: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
        Activation::Relu => xs.relu(),
    }
}

/// `(B, L, H*Dh)` -> `(B, H, L, Dh)`, contiguous.
pub(crate) fn split_heads(xs: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, l, d) = xs.dims3()?;
    xs.reshape((b, l, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `(B, H, L, Dh)` -> `(B, L, H*Dh)`.
pub(crate) fn merge_heads(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, dh) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, l, h * dh))
}

/// Scaled dot-product attention. `mask` is additive and broadcasts to `(B, H, Lq, Lk)`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(v)
}

/// L2-normalises the last dimension (torch `normalize(x, dim=-1)`, eps 1e-12).
pub(crate) fn l2_normalize(xs: &Tensor) -> candle_core::Result<Tensor> {
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    xs.broadcast_div(&norm)
}
