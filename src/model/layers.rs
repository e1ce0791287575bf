//! Small building blocks shared by the vision and text transformers.

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, Layout, Module, Shape, Tensor, D};
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

/// `act(lin(xs))`: the feed-forward block's first half. On the CPU in f32 the bias add and the
/// activation run fused, in one pass over the output split across threads (candle runs both as
/// separate single-threaded passes); the arithmetic is the same, so the result is bit-identical.
pub(crate) fn linear_act(
    lin: &Linear,
    xs: &Tensor,
    act: Activation,
) -> candle_core::Result<Tensor> {
    // The fused op has no backward pass: training takes the plain (differentiable) path.
    let fusable = !training()
        && xs.device().is_cpu()
        && xs.dtype() == candle_core::DType::F32
        && xs.is_contiguous()
        && act == Activation::Gelu
        && xs.rank() >= 2;
    let Some(bias) = lin.bias().filter(|_| fusable) else {
        return activate(&lin.forward(xs)?, act);
    };
    // The matmul as `Linear::forward` does it for contiguous inputs: rows stacked, no broadcast.
    let dims = xs.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows = xs.elem_count() / k.max(1);
    let y = xs.reshape((rows, k))?.matmul(&lin.weight().t()?)?;
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = y.dim(1)?;
    y.apply_op2_no_bwd(bias, &BiasGelu)?.reshape(out_dims)
}

/// `gelu_erf(y + bias)` over the rows of a contiguous `(rows, n)` f32 matrix, in parallel.
struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(y), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bias-gelu: f32 only");
        };
        let (Some((y0, y1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias-gelu: contiguous inputs only");
        };
        let (y, b) = (&y[y0..y1], &b[b0..b1]);
        let n = b.len();
        if n == 0 || y.len() % n != 0 {
            candle_core::bail!("bias-gelu: {} values for a bias of {n}", y.len());
        }
        let mut out = vec![0f32; y.len()];
        let rows = y.len() / n;
        let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
        let per = rows.div_ceil(threads) * n;
        let work = |(src, dst): (&[f32], &mut [f32])| {
            for (src, dst) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                for ((d, &v), &bias) in dst.iter_mut().zip(src).zip(b) {
                    // candle's `broadcast_add` then `gelu_erf`, term for term.
                    let v = v + bias;
                    *d = (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.)
                        * 0.5
                        * v;
                }
            }
        };
        if threads == 1 {
            work((y, &mut out));
        } else {
            std::thread::scope(|s| {
                for pair in y.chunks(per).zip(out.chunks_mut(per)) {
                    s.spawn(move || work(pair));
                }
            });
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
