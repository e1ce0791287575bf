//! Small building blocks shared by the vision and text transformers.

use std::cell::Cell;

use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::Activation;

thread_local! {
    static TRAINING: Cell<bool> = const { Cell::new(false) };
}

/// While a `TrainingMode` guard is alive, the model code on this thread uses differentiable
/// formulations of softmax and LayerNorm (candle's fused kernels have no backward pass). Inference
/// never enters it, so its results and speed are unchanged.
#[must_use = "training mode ends when the guard is dropped"]
pub struct TrainingMode {
    previous: bool,
}

impl TrainingMode {
    /// Switches this thread to training mode until the guard is dropped.
    pub fn enter() -> Self {
        let previous = TRAINING.with(|t| t.replace(true));
        Self { previous }
    }
}

impl Drop for TrainingMode {
    fn drop(&mut self) {
        TRAINING.with(|t| t.set(self.previous));
    }
}

fn training() -> bool {
    TRAINING.with(Cell::get)
}

/// A `nn.LayerNorm`: candle's fused kernel for inference, a differentiable composition of tensor
/// ops in [`TrainingMode`].
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if !training() {
            return self.inner.forward(xs);
        }
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let normed = normed.broadcast_mul(self.inner.weight())?;
        match self.inner.bias() {
            Some(b) => normed.broadcast_add(b),
            None => Ok(normed),
        }
    }
}

/// Softmax over the last dimension, differentiable (the max is subtracted as a constant).
pub fn softmax_diff(xs: &Tensor) -> candle_core::Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, differentiable and stable.
pub fn log_softmax_diff(xs: &Tensor) -> candle_core::Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// A `nn.Linear` with bias, named as in the checkpoint.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

/// A `nn.LayerNorm` (weight and bias), named as in the checkpoint.
pub(crate) fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        inner: candle_nn::layer_norm(dim, eps, vb)?,
        eps,
    })
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
    let probs = if training() {
        softmax_diff(&scores)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs.matmul(v)
}

/// L2-normalises the last dimension (torch `normalize(x, dim=-1)`, eps 1e-12).
pub fn l2_normalize(xs: &Tensor) -> candle_core::Result<Tensor> {
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    xs.broadcast_div(&norm)
}
