//! `nn.Linear` for inputs of many rows (the ViT's 577 tokens per image, ITM's 35 text rows per
//! candidate) and ITM's attention over image tokens: an AVX-512 f32 matrix multiply,
//! `y = epilogue(x Wᵀ + b)`.
//!
//! candle hands these to the `gemm` crate. This is the textbook blocked layout instead (Goto and
//! van de Geijn, "Anatomy of high-performance matrix multiplication", 2008): the input is copied
//! once per call, [`KC`] columns at a time, into groups of [`MR`] rows laid out step by step; each
//! thread copies its share of the weight the same way into panels of [`NR`] output columns
//! (gathers down the weight's rows); a register-blocked `MR x NR` tile (28 of the 32 vector
//! registers accumulate) then runs a broadcast-and-FMA loop over both with every load contiguous.
//! A group of input rows (`KC x MR`, 21 KiB) stays in L1 while the weight panels stream past it
//! from L2. Each thread takes ranges of output columns, so every weight value is copied once per
//! call; the bias and the erf-GELU are applied while the finished rows are still in cache, and
//! the output is never zeroed (the first block writes it). The packs live in per-thread scratch
//! buffers ([`with_scratch`]) kept between calls: every value a tile reads was written by this
//! call's packing, so they are neither zeroed nor allocated again.

use std::cell::RefCell;
use std::thread::LocalKey;

use candle_core::{DType, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{F32Cpu, F32Input, F32Op};
use super::kernels::{fast_kernels, gelu_erf, large_m_kernel, training, Epilogue};

/// Input rows per tile.
const MR: usize = 14;
/// Output columns per tile: two 16-lane vectors.
const NR: usize = 32;
/// Input columns (the shared dimension) per block: a group of input rows, `KC x MR` floats
/// (21 KiB), stays in L1 while the weight panels stream past it.
const KC: usize = 384;
/// Output columns per block (a multiple of [`NR`]): `KC x NC` weight values, 384 KiB, in L2.
const NC: usize = 8 * NR;

/// The largest pack (in floats, 16 MiB) kept in a thread's scratch between calls; larger ones
/// (batches of several images) are allocated per call, so that an idle thread holds at most this.
const SCRATCH_MAX: usize = 1 << 22;

thread_local! {
    /// The packed input of the calls this thread makes.
    static INPUT_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The packed weight panels of the column ranges this thread computes.
    static WEIGHT_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch `key`, holding whatever an earlier call left
/// there (the caller writes before it reads). A fresh zeroed buffer stands in when `len` is over
/// [`SCRATCH_MAX`], or when the scratch is in use further up this thread's stack (a rayon worker
/// that picked up another multiply while waiting inside one).
fn with_scratch<R>(
    key: &'static LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) if len <= SCRATCH_MAX => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        _ => f(&mut vec![0f32; len]),
    })
}

/// Whether [`matmul`] runs on this CPU (AVX-512F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How the right-hand matrix of [`matmul`] is laid out (row-major either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rhs {
    /// `(n, k)`, one row per output column: an `nn.Linear` weight, `y = x wᵀ`.
    OutIn,
    /// `(k, n)`: a plain `y = x w`.
    InOut,
}

/// `y[i][j] = epilogue(sum_t x[i][t] w[j][t] + b[j])` for `x` `(m, k)` and `w` `(n, k)` row-major
/// ([`Rhs::OutIn`]; [`Rhs::InOut`]: `w[t][j]` for `w` `(k, n)`); returns `y` `(m, n)` row-major.
/// Output columns are split over `threads` threads (rayon's pool).
///
/// # Panics
/// If [`available`] is false, or the slices do not hold `m x k`, `n x k` and `n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    x: &[f32],
    w: &[f32],
    rhs: Rhs,
    b: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
    threads: usize,
) -> Vec<f32> {
    assert!(available(), "sgemm: AVX-512F required");
    assert!(x.len() == m * k && w.len() == n * k && b.is_none_or(|b| b.len() == n));
    if m == 0 || n == 0 || k == 0 {
        // No shared dimension: every output is the bias (through the epilogue).
        let mut y = vec![0f32; m * n];
        for row in y.chunks_exact_mut(n.max(1)) {
            finish(row, b, epilogue);
        }
        return y;
    }
    // Not zeroed: the first block of the shared dimension writes every output before any is
    // read (`tile` with `accumulate == false`), through `out` only; the length is set after.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // The input, packed once for every task: block `pc / KC` holds groups of MR rows, each
    // `kc` steps of MR values (`kc` the block's width).
    let block = m.div_ceil(MR) * MR * KC.min(k);
    with_scratch(&INPUT_PACK, k.div_ceil(KC) * block, |apack| {
        let pack = |(bi, dst): (usize, &mut [f32])| {
            let pc = bi * KC;
            pack_input(x, m, k, pc, KC.min(k - pc), dst);
        };
        if threads > 1 && m * k >= 1 << 16 {
            apack.par_chunks_mut(block).enumerate().for_each(pack);
        } else {
            apack.chunks_mut(block).enumerate().for_each(pack);
        }
        let product = Product {
            w,
            rhs,
            bias: b,
            m,
            n,
            k,
            epilogue,
        };
        multiply(apack, &product, threads, &mut y);
    });
    // SAFETY: every one of the `m * n` values was written by `multiply` (each of its tasks covers
    // all rows of its columns, the columns of all tasks cover `0..n`).
    unsafe { y.set_len(m * n) };
    y
}

/// What [`matmul`] computes besides its input `x`: `y = epilogue(x w + bias)`, `(m, k)` by
/// `w` (`(n, k)` or `(k, n)` as `rhs` says) into `(m, n)`.
#[derive(Clone, Copy)]
struct Product<'a> {
    w: &'a [f32],
    rhs: Rhs,
    bias: Option<&'a [f32]>,
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
}

/// The tiles of `product` over the packed input `apack`, written into `y`'s spare capacity
/// (`m * n` values).
fn multiply(apack: &[f32], product: &Product, threads: usize, y: &mut Vec<f32>) {
    let (m, n) = (product.m, product.n);
    assert!(y.capacity() >= m * n);
    // Column ranges of whole panels, two per thread so that a thread slowed by other load on the
    // machine leaves work for the other.
    let panels = n.div_ceil(NR);
    let chunks = (2 * threads.max(1)).min(panels);
    let per = panels.div_ceil(chunks) * NR;
    let out = SendPtr(y.as_mut_ptr());
    let task = |c0: usize| {
        let c1 = (c0 + per).min(n);
        // SAFETY: tasks write disjoint column ranges `c0..c1` of `y` (`m x n`); the CPU has
        // AVX-512F (asserted in `matmul`, the only caller).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::columns(apack, product, c0, c1, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (c1, &out, apack, product);
    };
    if threads <= 1 || chunks == 1 {
        (0..n).step_by(per).for_each(task);
    } else {
        (0..n)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(task);
    }
}

/// `dst[g][t][ii] = x[g MR + ii][pc + t]` (0 past row `m`): groups of `kc x MR`.
fn pack_input(x: &[f32], m: usize, k: usize, pc: usize, kc: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul` runs only where AVX-512F is available (asserted there).
    unsafe {
        x86::pack_input(x, m, k, pc, kc, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, m, k, pc, kc, dst);
}

/// `a b` for 2-D f32 tensors on the CPU through [`matmul`] (`b` given as `(k, n)`, or as its
/// transpose `(n, k)` when `b_transposed`), when both are contiguous, outside training, with
/// the kernel switched on and AVX-512 present; `None` otherwise (the caller takes candle's).
pub(crate) fn matmul_2d(
    a: &Tensor,
    b: &Tensor,
    b_transposed: bool,
) -> candle_core::Result<Option<Tensor>> {
    let applies = available()
        && large_m_kernel()
        && fast_kernels()
        && !training()
        && a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.rank() == 2
        && b.rank() == 2
        && a.is_contiguous()
        && b.is_contiguous()
        && a.dim(1)? == if b_transposed { b.dim(1)? } else { b.dim(0)? };
    if !applies {
        return Ok(None);
    }
    let op = Matmul2d {
        rhs: if b_transposed { Rhs::OutIn } else { Rhs::InOut },
    };
    a.apply_op2_no_bwd(b, &F32Cpu(op)).map(Some)
}

struct Matmul2d {
    rhs: Rhs,
}

impl F32Op for Matmul2d {
    fn name(&self) -> &'static str {
        "sgemm-matmul"
    }

    fn forward(&self, inputs: &[F32Input<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [a, b] = inputs else {
            candle_core::bail!("sgemm matmul: two inputs");
        };
        let (m, k) = a.shape.dims2()?;
        let n = match self.rhs {
            Rhs::OutIn => b.shape.dims2()?.0,
            Rhs::InOut => b.shape.dims2()?.1,
        };
        if b.values.len() != n * k {
            candle_core::bail!("sgemm matmul: {:?} by {:?}", a.shape, b.shape);
        }
        let threads = candle_core::utils::get_num_threads();
        let y = matmul(
            a.values,
            b.values,
            self.rhs,
            None,
            m,
            n,
            k,
            Epilogue::None,
            threads,
        );
        Ok((y, Shape::from((m, n))))
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at disjoint positions by the tasks of one call,
// which all end before the call returns.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `bias` and `epilogue` over one row of outputs.
#[inline(always)]
fn finish(row: &mut [f32], bias: Option<&[f32]>, e: Epilogue) {
    match (bias, e) {
        (Some(b), Epilogue::None) => row.iter_mut().zip(b).for_each(|(v, b)| *v += b),
        (Some(b), Epilogue::GeluErf) => row
            .iter_mut()
            .zip(b)
            .for_each(|(v, b)| *v = gelu_erf(*v + b)),
        (None, Epilogue::None) => {}
        (None, Epilogue::GeluErf) => row.iter_mut().for_each(|v| *v = gelu_erf(*v)),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{
        finish, with_scratch, Epilogue, Product, Rhs, SendPtr, KC, MR, NC, NR, WEIGHT_PACK,
    };

    /// Output columns `c0..c1` of every row of `y` (through `out`, `m x n`) of `product`, from
    /// the packed input `apack` (see [`super::matmul`]).
    ///
    /// # Safety
    /// The CPU has AVX-512F; no other thread writes columns `c0..c1` of `out` meanwhile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns(
        apack: &[f32],
        product: &Product,
        c0: usize,
        c1: usize,
        out: SendPtr,
    ) {
        with_scratch(&WEIGHT_PACK, NC * KC.min(product.k), |bpack| {
            // SAFETY: the caller's guarantees, passed on.
            unsafe { columns_with(apack, product, c0, c1, out, bpack) }
        })
    }

    /// [`columns`] with `bpack` (`NC x min(KC, k)` floats) to pack the weight panels into.
    ///
    /// # Safety
    /// As [`columns`].
    #[target_feature(enable = "avx512f")]
    unsafe fn columns_with(
        apack: &[f32],
        product: &Product,
        c0: usize,
        c1: usize,
        out: SendPtr,
        bpack: &mut [f32],
    ) {
        let Product {
            w,
            rhs,
            bias,
            m,
            n,
            k,
            epilogue,
        } = *product;
        let groups = m.div_ceil(MR);
        for jc in (c0..c1).step_by(NC) {
            let jc1 = (jc + NC).min(c1);
            let panels = (jc1 - jc).div_ceil(NR);
            let mut pc = 0;
            while pc < k {
                let kc = KC.min(k - pc);
                let block = WeightBlock {
                    c0: jc,
                    c1: jc1,
                    pc,
                    kc,
                };
                match rhs {
                    Rhs::OutIn => pack_weight(w, k, block, bpack),
                    Rhs::InOut => pack_plain(w, n, block, bpack),
                }
                let ablock = &apack[(pc / KC) * groups * MR * KC.min(k)..];
                let last = pc + kc == k;
                // Each group of input rows stays in L1 while the weight panels stream past it.
                for g in 0..groups {
                    let i = g * MR;
                    let rows = MR.min(m - i);
                    let ap = ablock[g * kc * MR..].as_ptr();
                    for p in 0..panels {
                        let j = jc + p * NR;
                        // SAFETY: rows `i..i + rows` and columns `j..` (at most `jc1 - j`) are
                        // inside `y` and in this task's columns; the packs hold `kc` steps of
                        // MR and NR values.
                        unsafe {
                            tile(
                                kc,
                                ap,
                                bpack[p * kc * NR..].as_ptr(),
                                out.0.add(i * n + j),
                                n,
                                rows,
                                NR.min(jc1 - j),
                                pc > 0,
                            )
                        };
                    }
                    if last && (bias.is_some() || epilogue != Epilogue::None) {
                        for r in i..i + rows {
                            // SAFETY: row `r`, columns `jc..jc1` belong to this task.
                            let row = unsafe {
                                std::slice::from_raw_parts_mut(out.0.add(r * n + jc), jc1 - jc)
                            };
                            finish(row, bias.map(|b| &b[jc..jc1]), epilogue);
                        }
                    }
                }
                pc += kc;
            }
        }
    }

    /// The part of the weight one packing copies: output columns `c0..c1`, steps `pc..pc + kc` of
    /// the shared dimension.
    #[derive(Clone, Copy)]
    struct WeightBlock {
        c0: usize,
        c1: usize,
        pc: usize,
        kc: usize,
    }

    /// Offsets of 16 consecutive rows of `k` values, for gathers.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn row_offsets(k: usize) -> __m512i {
        let k = k as i32;
        _mm512_setr_epi32(
            0,
            k,
            2 * k,
            3 * k,
            4 * k,
            5 * k,
            6 * k,
            7 * k,
            8 * k,
            9 * k,
            10 * k,
            11 * k,
            12 * k,
            13 * k,
            14 * k,
            15 * k,
        )
    }

    /// Lanes `0..count` (at most 16).
    #[inline(always)]
    fn lanes(count: usize) -> __mmask16 {
        if count >= 16 {
            !0
        } else {
            (1u16 << count) - 1
        }
    }

    /// `dst[g][t][ii] = x[g MR + ii][pc + t]` (0 past row `m`): groups of `kc x MR`, each step
    /// one gather down the group's rows.
    ///
    /// # Safety
    /// AVX-512F; `x` holds `m x k` values, `pc + kc <= k`, `dst` `ceil(m / MR) x kc x MR`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_input(
        x: &[f32],
        m: usize,
        k: usize,
        pc: usize,
        kc: usize,
        dst: &mut [f32],
    ) {
        assert!(pc + kc <= k && x.len() >= m * k && dst.len() >= m.div_ceil(MR) * kc * MR);
        let offsets = row_offsets(k);
        let store = lanes(MR);
        for g in 0..m.div_ceil(MR) {
            let rows = lanes(MR.min(m - g * MR));
            let base = x.as_ptr().wrapping_add(g * MR * k + pc);
            let out = dst[g * kc * MR..].as_mut_ptr();
            for t in 0..kc {
                // SAFETY: the gathered lanes are rows `< m` of `x` at column `pc + t < k`; the
                // store writes the MR values of step `t` of group `g`.
                unsafe {
                    let v = _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        rows,
                        offsets,
                        base.wrapping_add(t) as _,
                    );
                    _mm512_mask_storeu_ps(out.add(t * MR), store, v);
                }
            }
        }
    }

    /// `bpack[p][t][jj] = w[c0 + p NR + jj][pc + t]` (0 past `c1`), panels of `kc x NR`, each
    /// step two gathers down the panel's weight rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn pack_weight(w: &[f32], k: usize, block: WeightBlock, bpack: &mut [f32]) {
        let WeightBlock { c0, c1, pc, kc } = block;
        assert!(
            pc + kc <= k && w.len() >= c1 * k && bpack.len() >= (c1 - c0).div_ceil(NR) * kc * NR
        );
        let offsets = row_offsets(k);
        for p in 0..(c1 - c0).div_ceil(NR) {
            let j0 = c0 + p * NR;
            let valid = NR.min(c1 - j0);
            let (m0, m1) = (lanes(valid), lanes(valid.saturating_sub(16)));
            let b0 = w.as_ptr().wrapping_add(j0 * k + pc);
            let b1 = b0.wrapping_add(16 * k);
            let out = bpack[p * kc * NR..].as_mut_ptr();
            for t in 0..kc {
                // SAFETY: the gathered lanes are weight rows `< c1` at column `pc + t < k`
                // (masked-off lanes read nothing); the stores write step `t` of panel `p`.
                unsafe {
                    let zero = _mm512_setzero_ps();
                    let v0 =
                        _mm512_mask_i32gather_ps::<4>(zero, m0, offsets, b0.wrapping_add(t) as _);
                    let v1 =
                        _mm512_mask_i32gather_ps::<4>(zero, m1, offsets, b1.wrapping_add(t) as _);
                    _mm512_storeu_ps(out.add(t * NR), v0);
                    _mm512_storeu_ps(out.add(t * NR + 16), v1);
                }
            }
        }
    }

    /// `bpack[p][t][jj] = w[pc + t][c0 + p NR + jj]` (0 past `c1`) for `w` `(k, n)`: panels of
    /// `kc x NR`, each step two (masked) loads along a row of `w`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn pack_plain(w: &[f32], n: usize, block: WeightBlock, bpack: &mut [f32]) {
        let WeightBlock { c0, c1, pc, kc } = block;
        assert!(
            c1 <= n && w.len() >= (pc + kc) * n && bpack.len() >= (c1 - c0).div_ceil(NR) * kc * NR
        );
        for p in 0..(c1 - c0).div_ceil(NR) {
            let j0 = c0 + p * NR;
            let valid = NR.min(c1 - j0);
            let (m0, m1) = (lanes(valid), lanes(valid.saturating_sub(16)));
            let out = bpack[p * kc * NR..].as_mut_ptr();
            for t in 0..kc {
                let src = w.as_ptr().wrapping_add((pc + t) * n + j0);
                // SAFETY: the loaded lanes are columns `j0.. < c1 <= n` of row `pc + t` of `w`
                // (masked-off lanes read nothing); the stores write step `t` of panel `p`.
                unsafe {
                    let v0 = _mm512_maskz_loadu_ps(m0, src);
                    let v1 = _mm512_maskz_loadu_ps(m1, src.wrapping_add(16));
                    _mm512_storeu_ps(out.add(t * NR), v0);
                    _mm512_storeu_ps(out.add(t * NR + 16), v1);
                }
            }
        }
    }

    /// One `MR x NR` tile: `c[i][j] (+)= sum_t a[t][i] b[t][j]` for `i < rows`, `j < cols`.
    ///
    /// # Safety
    /// `a` holds `kc x MR`, `b` `kc x NR` values; `c` rows `0..rows` (stride `ldc`) have `cols`
    /// writable values; AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: every read is within the `kc` steps of the packs.
        unsafe {
            for t in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(t * NR));
                let b1 = _mm512_loadu_ps(b.add(t * NR + 16));
                let at = a.add(t * MR);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*at.add(i));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
            }
        }
        let m0: __mmask16 = if cols >= 16 { !0 } else { (1u16 << cols) - 1 };
        let m1: __mmask16 = if cols >= NR {
            !0
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        for (i, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: row `i < rows` of `c` has `cols` values; the masks cover only those.
            unsafe {
                let cp = c.add(i * ldc);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.add(16)));
                }
                _mm512_mask_storeu_ps(cp, m0, v0);
                _mm512_mask_storeu_ps(cp.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::lcg;

    /// Against an f64 reference on shapes that leave every remainder: rows not a multiple of the
    /// tile, columns not a multiple of a panel or block, the shared dimension over several
    /// blocks and not a multiple of one; with and without bias and GELU, on 1 and 2 threads, the
    /// right-hand matrix as a weight `(n, k)` and as a plain `(k, n)`.
    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        if !available() {
            return;
        }
        let mut seed = 3;
        for &(m, n, k) in &[
            (1, 1, 1),
            (15, 33, 7),
            (113, 70, 300),
            (57, 97, 513),
            (200, 300, 800),
            // Smaller again: the scratch packs still hold the larger call's values.
            (15, 33, 7),
            (57, 97, 513),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            for bias in [None, Some(&b[..])] {
                for epilogue in [Epilogue::None, Epilogue::GeluErf] {
                    for (threads, rhs) in [(1, Rhs::OutIn), (2, Rhs::OutIn), (2, Rhs::InOut)] {
                        let got = match rhs {
                            Rhs::OutIn => matmul(&x, &w, rhs, bias, m, n, k, epilogue, threads),
                            Rhs::InOut => {
                                let wt: Vec<f32> =
                                    (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                                matmul(&x, &wt, rhs, bias, m, n, k, epilogue, threads)
                            }
                        };
                        for i in 0..m {
                            for j in 0..n {
                                let dot: f64 = (0..k)
                                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                                    .sum::<f64>()
                                    + bias.map_or(0.0, |b| b[j] as f64);
                                let want = match epilogue {
                                    Epilogue::None => dot,
                                    Epilogue::GeluErf => gelu_erf(dot as f32) as f64,
                                };
                                let g = got[i * n + j] as f64;
                                assert!(
                                    (g - want).abs() <= 2e-5,
                                    "{m}x{n}x{k} {epilogue:?} bias {} ({i},{j}): {g} vs {want}",
                                    bias.is_some()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
