//! `nn.Linear` with our own kernels on the CPU: one for inputs of a few rows (below), and for
//! inputs of many rows the blocked AVX-512 matmul of `sgemm`.
//!
//! candle sends every `Linear` through `Tensor::matmul` and the `gemm` crate, which packs the
//! weight matrix on every call. For the inputs that dominate query time (a text query of ~10
//! tokens, a decoding step of 3 beams, the 768 x 30524 vocabulary head) the multiply is bound by
//! reading the weights from memory, and that packing costs more than the multiply itself. Below
//! [`SMALL_M_MAX_ROWS`] input rows we read each weight row once, straight from the checkpoint
//! layout, and dot it with every input row at once. Larger inputs (the ViT, ITM batches) go to
//! `sgemm` where the CPU has AVX-512, to candle otherwise; training keeps candle's path.

use candle_core::{DType, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::cpu_op::{F32Cpu, F32Input, F32Op};
use super::kernels::{fast_kernels, gelu_erf, large_m_kernel, training, Epilogue};
use super::sgemm::Rhs;

/// Inputs of at most this many rows (all leading dimensions together) take the small-M kernel.
/// Measured on a 2-core AVX-512 Xeon (`examples/linear_speed.rs`, BLIP-base's four linear
/// shapes): the kernel is 1.1-8x gemm up to 35 rows, even at 48, and 0.84-1.3x at 64. A text
/// query (~10 rows) and a decoding step (3 rows per image) are well inside; the ViT (577 rows
/// per image) and ITM (35 rows per candidate) take `sgemm` (or candle's gemm).
pub const SMALL_M_MAX_ROWS: usize = 48;

/// Below this many multiply-adds per call the kernel runs on the calling thread: waking the
/// thread pool costs more than it saves (and on a loaded machine a woken thread can wait
/// milliseconds for a core).
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Weight rows computed together (each loaded once per block of input rows).
const NR: usize = 4;
/// Input rows computed together.
const MR: usize = 4;

/// A `nn.Linear` (`y = x W^T + b`, `W` stored `(out, in)` as in PyTorch checkpoints).
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// A layer from its weight `(out, in)` and optional bias `(out,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias, `(out,)`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// `epilogue(x W^T + b)` through our kernels when they apply (on the CPU in f32 outside
    /// training: the small-M kernel up to [`SMALL_M_MAX_ROWS`] rows, the blocked AVX-512 matmul of
    /// [`super::sgemm`] above); `None` otherwise (the caller then takes candle's path).
    pub(crate) fn forward_fast(
        &self,
        xs: &Tensor,
        epilogue: Epilogue,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = self.weight();
        let Some(&k) = xs.dims().last() else {
            return Ok(None);
        };
        let rows = xs.elem_count() / k.max(1);
        let applies = fast_kernels()
            && !training()
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && w.dtype() == DType::F32
            && xs.rank() >= 2
            && rows > 0
            && (rows <= SMALL_M_MAX_ROWS || (large_m_kernel() && super::sgemm::available()))
            && xs.is_contiguous()
            && w.is_contiguous()
            && w.dims2()?.1 == k
            && self.bias().is_none_or(|b| b.dtype() == DType::F32);
        if !applies {
            return Ok(None);
        }
        let op = F32Cpu(SmallM { epilogue });
        let y = match self.bias() {
            Some(b) => xs.apply_op3_no_bwd(w, b, &op)?,
            None => xs.apply_op2_no_bwd(w, &op)?,
        };
        Ok(Some(y))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.forward_fast(xs, Epilogue::None)? {
            Some(y) => Ok(y),
            None => self.inner.forward(xs),
        }
    }
}

/// A `nn.Linear` with bias, named as in the checkpoint.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// The small-M op: inputs `(x, W[, b])`, output `x`'s shape with the last dimension `W`'s rows.
struct SmallM {
    epilogue: Epilogue,
}

impl F32Op for SmallM {
    fn name(&self) -> &'static str {
        "small-m-linear"
    }

    fn forward(&self, inputs: &[F32Input<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (xi, wi, b) = match inputs {
            [x, w] => (x, w, None),
            [x, w, b] => (x, w, Some(b.values)),
            _ => candle_core::bail!("small-m linear: two or three inputs"),
        };
        let (x, w) = (xi.values, wi.values);
        let (n, k) = wi.shape.dims2()?;
        if k == 0 || x.len() % k != 0 || b.is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "small-m linear: input {:?}, weight {:?}",
                xi.shape,
                wi.shape
            );
        }
        let m = x.len() / k;
        let y = if m <= SMALL_M_MAX_ROWS {
            small_m_linear(x, w, b, m, n, k, self.epilogue)
        } else {
            let threads = if m * n * k < PARALLEL_MIN_MACS {
                1
            } else {
                candle_core::utils::get_num_threads()
            };
            super::sgemm::matmul(x, w, Rhs::OutIn, b, m, n, k, self.epilogue, threads)
        };
        let mut dims = xi.shape.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((y, Shape::from(dims)))
    }
}

/// `y[i][j] = epilogue(sum_t x[i][t] * w[j][t] + b[j])` for `x` `(m, k)`, `w` `(n, k)`, both
/// row-major; returns `y` `(m, n)` row-major. The output columns are split across the thread
/// pool when the work is large enough; each thread fills a column-major block, then the blocks
/// are written into `y`.
pub(crate) fn small_m_linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let kernel = pick_kernel();
    // `yt[j][i]`: each weight row's results for every input row, contiguous per weight row.
    let mut yt = vec![0f32; n * m];
    let threads = if m * n * k < PARALLEL_MIN_MACS {
        1
    } else {
        candle_core::utils::get_num_threads().clamp(1, n.div_ceil(NR))
    };
    let fill = |j0: usize, out: &mut [f32]| {
        let cols = out.len() / m;
        // SAFETY: `x` holds `m` rows of `k`, `w[j0..j0 + cols]` rows of `k`, `out` `cols * m`.
        unsafe { kernel(x.as_ptr(), &w[j0 * k..(j0 + cols) * k], m, k, out) };
        for (j, out) in out.chunks_exact_mut(m).enumerate() {
            let bj = b.map_or(0.0, |b| b[j0 + j]);
            match epilogue {
                Epilogue::None => out.iter_mut().for_each(|v| *v += bj),
                Epilogue::GeluErf => out.iter_mut().for_each(|v| *v = gelu_erf(*v + bj)),
            }
        }
    };
    if threads == 1 {
        fill(0, &mut yt);
    } else {
        let per = n.div_ceil(threads).div_ceil(NR) * NR;
        yt.par_chunks_mut(per * m)
            .enumerate()
            .for_each(|(c, out)| fill(c * per, out));
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// Fills `out[j * m + i] = dot(x row i, w row j)` for every row `j` of `w` (`w.len() / k` rows).
///
/// # Safety
/// `x` must be valid for `m * k` reads; `out.len() == (w.len() / k) * m`; the CPU must have the
/// features the chosen kernel was compiled for ([`pick_kernel`] checks).
pub(crate) type KernelFn = unsafe fn(*const f32, &[f32], usize, usize, &mut [f32]);

pub(crate) fn pick_kernel() -> KernelFn {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return x86::kernel_avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return x86::kernel_avx2;
        }
    }
    kernel_portable
}

/// Walks `w` in blocks of [`NR`] rows and `x` in blocks of [`MR`] rows, calling `block` with the
/// block sizes (`nr <= NR`, `mr <= MR`), the rows' pointers and the output for `(j0, i0)`.
#[inline(always)]
fn for_each_block(
    x: *const f32,
    w: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    mut block: impl FnMut(usize, usize, *const f32, *const f32, &mut [[f32; MR]; NR]),
) {
    let n = w.len() / k;
    debug_assert_eq!(out.len(), n * m);
    let mut j0 = 0;
    while j0 < n {
        let nr = NR.min(n - j0);
        let mut i0 = 0;
        while i0 < m {
            let mr = MR.min(m - i0);
            let mut acc = [[0f32; MR]; NR];
            // `x` rows `i0..i0 + mr` and `w` rows `j0..j0 + nr` are in bounds.
            block(
                nr,
                mr,
                x.wrapping_add(i0 * k),
                w[j0 * k..].as_ptr(),
                &mut acc,
            );
            for (r, acc) in acc.iter().enumerate().take(nr) {
                out[(j0 + r) * m + i0..][..mr].copy_from_slice(&acc[..mr]);
            }
            i0 += mr;
        }
        j0 += nr;
    }
}

/// The same without SIMD intrinsics: eight independent partial sums per dot product, which the
/// compiler vectorises for whatever the target offers.
///
/// # Safety
/// As [`KernelFn`].
unsafe fn kernel_portable(x: *const f32, w: &[f32], m: usize, k: usize, out: &mut [f32]) {
    const L: usize = 8;
    for_each_block(x, w, m, k, out, |nr, mr, xp, wp, acc| {
        for (r, acc) in acc.iter_mut().enumerate().take(nr) {
            // SAFETY: rows `r < nr` of `w` and `i < mr` of `x` from these pointers are in bounds.
            let wr = unsafe { std::slice::from_raw_parts(wp.add(r * k), k) };
            for (i, acc) in acc.iter_mut().enumerate().take(mr) {
                let xi = unsafe { std::slice::from_raw_parts(xp.add(i * k), k) };
                let mut lanes = [0f32; L];
                let (wc, xc) = (wr.chunks_exact(L), xi.chunks_exact(L));
                let tail: f32 = wc
                    .remainder()
                    .iter()
                    .zip(xc.remainder())
                    .map(|(a, b)| a * b)
                    .sum();
                for (a, b) in wc.zip(xc) {
                    for ((s, a), b) in lanes.iter_mut().zip(a).zip(b) {
                        *s += a * b;
                    }
                }
                *acc = lanes.iter().sum::<f32>() + tail;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{for_each_block, MR, NR};

    /// `pub(super) unsafe fn $name`, a [`super::KernelFn`] compiled with `$feature` that walks the
    /// blocks ([`for_each_block`]) and calls `$block::<R, M>` on each: whole blocks of [`NR`]
    /// weight rows at once, a partial one row by row; the number of input rows as a constant.
    macro_rules! kernel {
        ($(#[$doc:meta])* $name:ident, $feature:tt, $block:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                x: *const f32,
                w: &[f32],
                m: usize,
                k: usize,
                out: &mut [f32],
            ) {
                for_each_block(x, w, m, k, out, |nr, mr, xp, wp, acc| {
                    // SAFETY: as for the kernel; the block sizes are within NR x MR.
                    unsafe {
                        match (nr, mr) {
                            (NR, 4) => $block::<NR, 4>(xp, wp, k, acc),
                            (NR, 3) => $block::<NR, 3>(xp, wp, k, acc),
                            (NR, 2) => $block::<NR, 2>(xp, wp, k, acc),
                            (NR, 1) => $block::<NR, 1>(xp, wp, k, acc),
                            (_, 4) => (0..nr).for_each(|r| {
                                $block::<1, 4>(xp, wp.add(r * k), k, &mut acc[r..])
                            }),
                            (_, 3) => (0..nr).for_each(|r| {
                                $block::<1, 3>(xp, wp.add(r * k), k, &mut acc[r..])
                            }),
                            (_, 2) => (0..nr).for_each(|r| {
                                $block::<1, 2>(xp, wp.add(r * k), k, &mut acc[r..])
                            }),
                            _ => (0..nr).for_each(|r| {
                                $block::<1, 1>(xp, wp.add(r * k), k, &mut acc[r..])
                            }),
                        }
                    }
                });
            }
        };
    }

    kernel!(
        /// # Safety
        /// As [`super::KernelFn`], on a CPU with AVX-512F.
        kernel_avx512,
        "avx512f",
        block512
    );

    /// `acc[r][i] = dot(w row r, x row i)` for `r < R`, `i < M`, 16 lanes at a time; the last
    /// `k % 16` columns through masked loads.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block512<const R: usize, const M: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        acc: &mut [[f32; MR]],
    ) {
        let mut s = [[_mm512_setzero_ps(); M]; R];
        let mut t = 0;
        // SAFETY (all loads): rows `r < R` of `w` and `i < M` of `x` have `k` values each, and
        // every load stays below `k` (the tail's mask covers only the `k - t` left).
        unsafe {
            while t + 16 <= k {
                let xv: [__m512; M] = std::array::from_fn(|i| _mm512_loadu_ps(x.add(i * k + t)));
                for (r, s) in s.iter_mut().enumerate() {
                    let wv = _mm512_loadu_ps(w.add(r * k + t));
                    for (s, &xv) in s.iter_mut().zip(&xv) {
                        *s = _mm512_fmadd_ps(wv, xv, *s);
                    }
                }
                t += 16;
            }
            if t < k {
                let mask: __mmask16 = (1u16 << (k - t)) - 1;
                let xv: [__m512; M] =
                    std::array::from_fn(|i| _mm512_maskz_loadu_ps(mask, x.add(i * k + t)));
                for (r, s) in s.iter_mut().enumerate() {
                    let wv = _mm512_maskz_loadu_ps(mask, w.add(r * k + t));
                    for (s, &xv) in s.iter_mut().zip(&xv) {
                        *s = _mm512_fmadd_ps(wv, xv, *s);
                    }
                }
            }
        }
        for (acc, s) in acc.iter_mut().zip(&s) {
            for (a, &s) in acc.iter_mut().zip(s) {
                *a = _mm512_reduce_add_ps(s);
            }
        }
    }

    kernel!(
        /// # Safety
        /// As [`super::KernelFn`], on a CPU with AVX2 and FMA.
        kernel_avx2,
        "avx2,fma",
        block256
    );

    /// As [`block512`] with 8 lanes; the last `k % 8` columns in scalar code.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block256<const R: usize, const M: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        acc: &mut [[f32; MR]],
    ) {
        let mut s = [[_mm256_setzero_ps(); M]; R];
        let mut t = 0;
        // SAFETY (all loads): as in `block512`; every vector load ends at or below `k`.
        unsafe {
            while t + 8 <= k {
                let xv: [__m256; M] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(i * k + t)));
                for (r, s) in s.iter_mut().enumerate() {
                    let wv = _mm256_loadu_ps(w.add(r * k + t));
                    for (s, &xv) in s.iter_mut().zip(&xv) {
                        *s = _mm256_fmadd_ps(wv, xv, *s);
                    }
                }
                t += 8;
            }
        }
        for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
            for (i, (a, &s)) in acc.iter_mut().zip(s).enumerate() {
                let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                let mut v = _mm_cvtss_f32(h);
                for u in t..k {
                    // SAFETY: `u < k` within row `r` of `w` and row `i` of `x`.
                    v += unsafe { *w.add(r * k + u) * *x.add(i * k + u) };
                }
                *a = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{lcg, randn};

    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                y[i * n + j] = dot + b.map_or(0.0, |b| b[j] as f64);
            }
        }
        y
    }

    /// Every kernel this CPU runs, against an f64 reference, on shapes that exercise every block
    /// remainder (rows of `x` and `w` not multiples of the block, `k` not a multiple of a vector).
    #[test]
    fn kernels_match_f64_reference_on_odd_shapes() {
        let mut kernels: Vec<(&str, KernelFn)> = vec![("portable", kernel_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", x86::kernel_avx512));
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(("avx2", x86::kernel_avx2));
            }
        }
        let mut seed = 7;
        for &k in &[1, 7, 16, 33, 100, 777] {
            for m in 1..=17 {
                for &n in &[1, 3, 5, 13] {
                    let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                    let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                    let want = reference(&x, &w, None, m, n, k);
                    for (name, kernel) in &kernels {
                        let mut yt = vec![f32::NAN; n * m];
                        // SAFETY: the shapes match; the kernel is one this CPU runs.
                        unsafe { kernel(x.as_ptr(), &w, m, k, &mut yt) };
                        for i in 0..m {
                            for j in 0..n {
                                let (got, want) = (yt[j * m + i] as f64, want[i * n + j]);
                                let tol = 1e-6 * (k as f64).sqrt() * 4.0;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{name} m={m} n={n} k={k} ({i},{j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The whole op (threads, bias, GELU, layout) against the f64 reference.
    #[test]
    fn small_m_linear_matches_reference_with_and_without_bias() {
        let mut seed = 11;
        // 2 x 513 x 2049 passes the threading threshold, 17 x 31 x 100 does not.
        for &(m, n, k) in &[(17, 31, 100), (2, 2049, 513), (5, 3, 16)] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            for bias in [None, Some(&b[..])] {
                let want = reference(&x, &w, bias, m, n, k);
                let got = small_m_linear(&x, &w, bias, m, n, k, Epilogue::None);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() <= 1e-5, "{m}x{n}x{k}: {g} vs {w}");
                }
                let got = small_m_linear(&x, &w, bias, m, n, k, Epilogue::GeluErf);
                for (g, w) in got.iter().zip(&want) {
                    let w = gelu_erf(*w as f32) as f64;
                    assert!(
                        (*g as f64 - w).abs() <= 2e-5,
                        "gelu {m}x{n}x{k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Through candle: the fast path and candle's path agree on a 3-d input, with and without
    /// bias, and training mode takes candle's path.
    #[test]
    fn forward_matches_candle() -> candle_core::Result<()> {
        let xs = randn(1, 0.0, 1.0, (3, 5, 37));
        let w = randn(2, 0.0, 0.3, (29, 37));
        let b = randn(3, 0.0, 1.0, 29);
        for bias in [None, Some(b)] {
            let lin = Linear::new(w.clone(), bias.clone());
            let fast = lin
                .forward_fast(&xs, Epilogue::None)?
                .expect("fast path applies");
            let plain = candle_nn::Linear::new(w.clone(), bias).forward(&xs)?;
            assert_eq!(fast.dims(), plain.dims());
            let diff = (fast - &plain)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "max |fast - candle| = {diff}");
            let _training = super::super::kernels::TrainingMode::enter();
            assert!(lin.forward_fast(&xs, Epilogue::None)?.is_none());
        }
        Ok(())
    }
}
