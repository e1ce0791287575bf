//! What every CPU kernel of the model shares, below the layers that use them: the per-thread
//! kernel choice ([`Kernels`]) and training switch ([`TrainingMode`]), the activation fused into
//! matmuls (`Epilogue`), and the vectorisable element-wise math (GELU's erf, `exp`, softmax
//! rows). The kernels ([`super::linear`], `sgemm`, `attention`) and the layers
//! ([`super::layers`]) import this; it imports none of them.

use std::cell::Cell;

use super::cpu_op::widest_simd;

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

/// The activation fused into `Linear::forward_act`'s fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `x W^T + b`.
    None,
    /// `gelu_erf(x W^T + b)`.
    GeluErf,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
