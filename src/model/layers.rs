//! Small building blocks shared by the vision and text transformers.

use std::cell::Cell;

use candle_core::{CpuStorage, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::cpu_op::{widest_simd, F32Cpu, F32Input, F32Op};
pub(crate) use super::linear::linear;
use super::linear::{Epilogue, Linear};

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

pub(crate) fn training() -> bool {
    TRAINING.with(Cell::get)
}

/// Which of this crate's own kernels the model code uses, against candle's generic ones. All on
/// by default; the others exist only to measure each kernel against candle's path in one
/// process (`examples/linear_speed.rs`), and results differ in the last bits only.
///
/// The choice is explicit and scoped: [`Kernels::enter`] applies it to the model code on the
/// calling thread until the guard is dropped (every kernel is picked on the calling thread),
/// so no other thread, such as a server's inference worker, is affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// The small-M linear kernel ([`super::linear`]), the few-query attention and the fused
    /// scaled softmax (off: candle's matmul and softmax).
    pub fast: bool,
    /// The blocked AVX-512 matmul of `Linear` for inputs of many rows, where the CPU has
    /// AVX-512 (off: candle's matmul).
    pub large_m: bool,
    /// The unprojected cross-attention of ITM (off: every image's keys and values projected).
    pub absorbed_cross_attention: bool,
}

impl Default for Kernels {
    fn default() -> Self {
        Self {
            fast: true,
            large_m: true,
            absorbed_cross_attention: true,
        }
    }
}

thread_local! {
    static KERNELS: Cell<Kernels> = Cell::new(Kernels::default());
}

/// Restores the previous [`Kernels`] of its thread when dropped.
#[must_use = "the kernel choice ends when the guard is dropped"]
pub struct KernelScope {
    previous: Kernels,
}

impl Kernels {
    /// Uses these kernels on this thread until the guard is dropped.
    pub fn enter(self) -> KernelScope {
        KernelScope {
            previous: KERNELS.with(|k| k.replace(self)),
        }
    }
}

impl Drop for KernelScope {
    fn drop(&mut self) {
        KERNELS.with(|k| k.set(self.previous));
    }
}

pub(crate) fn fast_kernels() -> bool {
    KERNELS.with(Cell::get).fast
}

pub(crate) fn large_m_kernel() -> bool {
    KERNELS.with(Cell::get).large_m
}

pub(crate) fn absorbed_cross_attention() -> bool {
    KERNELS.with(Cell::get).absorbed_cross_attention
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

/// `x * (1 + erf(x / sqrt 2)) / 2`, with [`erf`]'s approximation.
#[inline(always)]
pub(crate) fn gelu_erf(v: f32) -> f32 {
    (erf(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
}

/// erf for f32 as a rational function, `x·P(x²)/Q(x²)` on `x` clamped to ±4 (beyond, erf is ±1
/// in f32): the minimax approximation XLA and Eigen use for f32. Branch-free, so it vectorises;
/// at most 4.2e-7 from the exact erf (libm's `erff`, which candle uses, is within 1e-7 but is a
/// scalar call with branches: it was 15% of a ViT forward). See the test below.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_4e-10,
        2.770_681_5e-8,
        -2.101_024e-6,
        -5.692_506_2e-5,
        -7.349_906_4e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_15e-5,
        -2.133_740_5e-4,
        -1.682_827e-3,
        -7.373_329_3e-3,
        -1.426_473_9e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0.0f32, |acc, &a| acc * x2 + a);
    let q = BETA.iter().fold(0.0f32, |acc, &b| acc * x2 + b);
    x * p / q
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

widest_simd! {
    /// `x = softmax(scale * x)` for each row of `n` values, with the widest SIMD the CPU has.
    pub(crate) fn softmax_rows_inplace(x: &mut [f32], n: usize, scale: f32) => softmax_rows_generic
}

#[inline(always)]
fn softmax_rows_generic(x: &mut [f32], n: usize, scale: f32) {
    const L: usize = 16;
    for row in x.chunks_exact_mut(n) {
        // Lane-wise max and sum (a plain fold would not vectorise: float order is kept).
        let mut lanes = [f32::NEG_INFINITY; L];
        let chunks = row.chunks_exact(L);
        let mut max = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = m.max(v);
            }
        }
        max = lanes.iter().fold(max, |m, &v| m.max(v));
        // `scale > 0`, so the largest scaled value is `scale * max`.
        let shift = scale * max;
        for v in row.iter_mut() {
            *v = exp(*v * scale - shift);
        }
        let mut lanes = [0f32; L];
        let chunks = row.chunks_exact(L);
        let mut sum: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (s, &v) in lanes.iter_mut().zip(c) {
                *s += v;
            }
        }
        sum += lanes.iter().sum::<f32>();
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|d| *d *= inv);
    }
}

/// `e^x` for f32, branch-free so that it vectorises: `x = n ln 2 + r` with `|r| <= ln 2 / 2`
/// (Cody-Waite: `ln 2` in two parts), `e^r` by its degree-7 Taylor polynomial (truncation error
/// below 3e-9), `2^n` built in the exponent bits. Within 2 ulp of the exact value on [-87, 88];
/// 0 below -87 (where f32 would be denormal: a softmax weight that small is 0 anyway), and
/// saturates at `e^88` above. See the test below.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let two_n = f32::from_bits(((ni + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        p * two_n
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
    fn erf_is_within_5e7_of_libm() {
        let mut worst = (0.0f32, 0.0f32);
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            let d = (erf(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 5e-7, "erf off by {} at {}", worst.0, worst.1);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(-1e30), -1.0);
        assert_eq!(erf(0.0), 0.0);
    }

    #[test]
    fn exp_is_within_2_ulp() {
        let mut worst = (0.0f64, 0.0f32);
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            if rel > worst.0 {
                worst = (rel, x);
            }
        }
        // 2 ulp of f32 is 2^-22 relative.
        assert!(
            worst.0 <= 2.4e-7,
            "exp off by {} relative at {}",
            worst.0,
            worst.1
        );
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

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
