//! Small building blocks shared by the vision and text transformers.

use candle_core::{CpuStorage, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::cpu_op::{widest_simd, F32Cpu, F32Input, F32Op};
use super::kernels::{fast_kernels, gelu_erf, softmax_rows_inplace, training, Epilogue};
pub(crate) use super::linear::linear;
use super::linear::Linear;

/// A `nn.LayerNorm`: candle's fused kernel for inference, a differentiable composition of tensor
/// ops in [`TrainingMode`](super::kernels::TrainingMode).
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
/// erf-GELU run fused, in one vectorised pass over the output split across threads (candle runs
/// both as separate single-threaded scalar passes); inputs of a few rows take the small-M kernel
/// with the GELU applied as each output is written. The GELU's erf is a rational approximation
/// within 4.2e-7 of the exact one (see [`erf`]); elsewhere the arithmetic is candle's.
pub(crate) fn linear_act(
    lin: &Linear,
    xs: &Tensor,
    act: Activation,
) -> candle_core::Result<Tensor> {
    let epilogue = if act == Activation::Gelu {
        Epilogue::GeluErf
    } else {
        Epilogue::None
    };
    if let Some(y) = lin.forward_fast(xs, epilogue)? {
        return match epilogue {
            Epilogue::GeluErf => Ok(y),
            Epilogue::None => activate(&y, act),
        };
    }
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
    y.apply_op2_no_bwd(bias, &F32Cpu(BiasGelu))?
        .reshape(out_dims)
}

/// `gelu_erf(y + bias)` over the rows of a contiguous `(rows, n)` f32 matrix, in parallel.
struct BiasGelu;

impl F32Op for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn forward(&self, inputs: &[F32Input<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [y, b] = inputs else {
            candle_core::bail!("bias-gelu: two inputs");
        };
        let (y, b, shape) = (y.values, b.values, y.shape);
        let n = b.len();
        if n == 0 || y.len() % n != 0 {
            candle_core::bail!("bias-gelu: {} values for a bias of {n}", y.len());
        }
        let mut out = vec![0f32; y.len()];
        let rows = y.len() / n;
        // Below ~256k values (a text query, a decoding step) starting threads costs more than
        // it saves, and on a loaded machine a new thread can wait milliseconds for a core.
        let threads = if y.len() < 1 << 18 {
            1
        } else {
            candle_core::utils::get_num_threads().clamp(1, rows.max(1))
        };
        let per = rows.div_ceil(threads) * n;
        let work = |(src, dst): (&[f32], &mut [f32])| bias_gelu_rows(src, dst, b);
        if threads == 1 {
            work((y, &mut out));
        } else {
            std::thread::scope(|s| {
                for pair in y.chunks(per).zip(out.chunks_mut(per)) {
                    s.spawn(move || work(pair));
                }
            });
        }
        Ok((out, shape.clone()))
    }
}

widest_simd! {
    /// `dst = gelu_erf(src + bias)` row by row (`bias.len()` columns), with the widest SIMD the CPU
    /// has: the loop is branch-free so that it vectorises.
    fn bias_gelu_rows(src: &[f32], dst: &mut [f32], bias: &[f32]) => bias_gelu_rows_generic
}

#[inline(always)]
fn bias_gelu_rows_generic(src: &[f32], dst: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    for (src, dst) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        for ((d, &v), &b) in dst.iter_mut().zip(src).zip(bias) {
            *d = gelu_erf(v + b);
        }
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

/// Scaled dot-product attention. `mask` is additive and broadcasts to `(B, H, Lq, Lk)`. Unmasked
/// attention of a few query rows (decoding steps) reads keys and values in place
/// ([`super::attention`]).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if mask.is_none() && !training() && fast_kernels() {
        if let Some(out) = super::attention::few_query_attention(q, k, v, scale)? {
            return Ok(out);
        }
        if let Some(out) = super::attention::parallel_heads_attention(q, k, v, scale)? {
            return Ok(out);
        }
    }
    let scores = q.matmul(&k.t()?)?;
    let probs = if training() {
        let scores = (scores * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        softmax_diff(&scores)?
    } else {
        match mask {
            Some(m) => softmax_scaled((scores * scale)?.broadcast_add(m)?, 1.0)?,
            None => softmax_scaled(scores, scale)?,
        }
    };
    probs.matmul(v)
}

/// `softmax(scale * xs)` over the last dimension. On the CPU in f32 one vectorised pass per row
/// (candle's softmax calls the scalar libm `expf` per element, and the scaling is a pass of its
/// own: together 20% of a ViT forward, whose attention has 12 x 577 x 577 scores per layer),
/// written over `xs`'s own storage when it is contiguous: **`xs` must not share its storage with
/// any other tensor** (pass a fresh result such as a matmul's; 16 MB per ViT layer neither
/// allocated, zeroed nor written a second time).
pub(crate) fn softmax_scaled(xs: Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if fast_kernels() && xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
        let xs = xs.contiguous()?;
        xs.inplace_op1(&ScaledSoftmax(scale as f32))?;
        return Ok(xs);
    }
    let xs = if scale == 1.0 { xs } else { (xs * scale)? };
    candle_nn::ops::softmax_last_dim(&xs)
}

/// `softmax(scale * x)` in place over the last dimension of a contiguous f32 tensor, rows in
/// parallel.
struct ScaledSoftmax(f32);

impl candle_core::InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("scaled-softmax: f32 only");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("scaled-softmax: contiguous input only");
        };
        let x = &mut x[a..b];
        let n = l.dims().last().copied().unwrap_or(1);
        if n == 0 {
            return Ok(());
        }
        let rows = x.len() / n;
        // As for the fused bias+GELU: threads only pay off on large inputs (the ViT's scores).
        let threads = if x.len() < 1 << 18 {
            1
        } else {
            candle_core::utils::get_num_threads().clamp(1, rows.max(1))
        };
        let per = rows.div_ceil(threads) * n;
        let scale = self.0;
        if threads == 1 {
            softmax_rows_inplace(x, n, scale);
        } else {
            std::thread::scope(|s| {
                for part in x.chunks_mut(per) {
                    s.spawn(move || softmax_rows_inplace(part, n, scale));
                }
            });
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::randn;

    #[test]
    fn scaled_softmax_matches_candle() -> candle_core::Result<()> {
        // Rows of 1, 15, 16 and 577 values (remainders and the ViT's row length); the last is
        // large enough to run on threads.
        let cases: [(&[usize], f64); 4] = [
            (&[3, 1], 0.125),
            (&[7, 15], 1.0),
            (&[2, 3, 16], 0.5),
            (&[600, 577], 0.125),
        ];
        for (shape, scale) in cases {
            let xs = randn(shape.iter().product::<usize>() as u64, 0.0, 20.0, shape);
            let got = softmax_scaled(xs.copy()?, scale)?;
            let want = candle_nn::ops::softmax_last_dim(&(xs * scale)?)?;
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{shape:?}: max |ours - candle| = {diff}");
        }
        Ok(())
    }

    #[test]
    fn fused_bias_gelu_matches_candle() -> candle_core::Result<()> {
        // 15 rows take the small-M kernel, 90 the large-M kernel (candle's matmul and the fused
        // bias+GELU op without AVX-512). Outputs reach ~10 and the paths sum in different
        // orders, so the bound is 1e-5.
        for rows in [5, 30] {
            let xs = randn(rows as u64, 0.0, 2.0, (3, rows, 16));
            let w = randn(1, 0.0, 0.5, (24, 16));
            let b = randn(2, 0.0, 1.0, 24);
            let lin = Linear::new(w.clone(), Some(b.clone()));
            let fused = linear_act(&lin, &xs, Activation::Gelu)?;
            let plain = candle_nn::Linear::new(w, Some(b)).forward(&xs)?;
            let plain = activate(&plain, Activation::Gelu)?;
            assert_eq!(fused.dims(), plain.dims());
            let diff = (fused - plain)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{rows} rows: max |fused - candle| = {diff}");
        }
        Ok(())
    }
}
