//! Attention for a few query rows: a decoding step's self-attention over the KV cache and its
//! cross-attention over the image tokens (3 beams of one image read 577 keys per head).
//!
//! candle's batched matmul packs each head's keys and values for gemm on every call; with 1-3
//! query rows that packing is most of the work. Here each head's keys and values are read once,
//! in place: the scores by the small-M dot kernel of [`super::linear`], the softmax in one pass,
//! the weighted sum of values row by row.

use candle_core::{DType, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_op::{widest_simd, F32Cpu, F32Input, F32Op};
use super::kernels::{large_m_kernel, softmax_rows_inplace, Epilogue};
use super::linear::{pick_kernel, KernelFn};
use super::sgemm::{matmul, Rhs};

/// At most this many query rows per head take this path.
pub(crate) const FEW_QUERIES_MAX: usize = 8;

/// Below this many multiply-adds per call the heads run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `softmax(scale q kᵀ) v` for `q` `(B, H, Lq, Dh)`, `k` and `v` `(B, H, T, Dh)`, without a mask,
/// when `Lq <= FEW_QUERIES_MAX` and all are contiguous f32 on the CPU; `None` otherwise.
pub(crate) fn few_query_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    let applies = q.device().is_cpu()
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.rank() == 4)
        && (1..=FEW_QUERIES_MAX).contains(&q.dim(2)?)
        && q.dim(3)? > 0
        && q.dims()[..2] == k.dims()[..2]
        && k.dims() == v.dims()
        && q.dim(3)? == k.dim(3)?
        && k.dim(2)? > 0
        && [q, k, v].iter().all(|t| t.is_contiguous());
    if !applies {
        return Ok(None);
    }
    let op = Attention {
        scale: scale as f32,
        form: Form::FewQueries,
    };
    q.apply_op3_no_bwd(k, v, &F32Cpu(op)).map(Some)
}

/// `softmax(scale q kᵀ) v` for `q` `(B, H, Lq, Dh)`, `k` and `v` `(B, H, T, Dh)`, without a mask,
/// with the heads in parallel and each head's two matmuls ([`super::sgemm`]) and softmax on one
/// thread: no hand-off between threads inside a head, and one head's scores (577 x 577 in the
/// ViT: 1.3 MB) stay in cache between the three steps. Applies to contiguous f32 on the CPU
/// with at least two heads and more than [`FEW_QUERIES_MAX`] query rows where the CPU has
/// AVX-512; `None` otherwise.
pub(crate) fn parallel_heads_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    let applies = super::sgemm::available()
        && large_m_kernel()
        && q.device().is_cpu()
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.rank() == 4 && t.is_contiguous())
        && q.dim(2)? > FEW_QUERIES_MAX
        && q.dim(0)? * q.dim(1)? >= 2
        && q.dim(3)? > 0
        && q.dims()[..2] == k.dims()[..2]
        && k.dims() == v.dims()
        && q.dim(3)? == k.dim(3)?
        && k.dim(2)? > 0;
    if !applies {
        return Ok(None);
    }
    let op = Attention {
        scale: scale as f32,
        form: Form::ParallelHeads,
    };
    q.apply_op3_no_bwd(k, v, &F32Cpu(op)).map(Some)
}

/// `softmax(scale q kᵀ) v`, head by head, in one of the two forms above.
struct Attention {
    scale: f32,
    form: Form,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// [`few_query_attention`]: the small-M dot kernel, heads on threads above
    /// [`PARALLEL_MIN_MACS`].
    FewQueries,
    /// [`parallel_heads_attention`]: two single-threaded [`super::sgemm`] matmuls per head, heads
    /// always on threads.
    ParallelHeads,
}

impl F32Op for Attention {
    fn name(&self) -> &'static str {
        match self.form {
            Form::FewQueries => "few-query-attention",
            Form::ParallelHeads => "parallel-heads-attention",
        }
    }

    fn forward(&self, inputs: &[F32Input<'_>]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [q, k, v] = inputs else {
            candle_core::bail!("{}: three inputs", self.name());
        };
        let (b, h, lq, dh) = q.shape.dims4()?;
        let t = k.shape.dims4()?.2;
        let mut out = vec![0f32; b * h * lq * dh];
        let kernel = pick_kernel();
        let head = |(i, out): (usize, &mut [f32])| {
            let q = &q.values[i * lq * dh..][..lq * dh];
            let k = &k.values[i * t * dh..][..t * dh];
            let v = &v.values[i * t * dh..][..t * dh];
            match self.form {
                Form::FewQueries => one_head(kernel, q, k, v, lq, t, dh, self.scale, out),
                Form::ParallelHeads => {
                    let mut scores = matmul(q, k, Rhs::OutIn, None, lq, t, dh, Epilogue::None, 1);
                    softmax_rows_inplace(&mut scores, t, self.scale);
                    let o = matmul(&scores, v, Rhs::InOut, None, lq, dh, t, Epilogue::None, 1);
                    out.copy_from_slice(&o);
                }
            }
        };
        if self.form == Form::FewQueries && b * h * lq * t * dh < PARALLEL_MIN_MACS {
            out.chunks_mut(lq * dh).enumerate().for_each(head);
        } else {
            out.par_chunks_mut(lq * dh).enumerate().for_each(head);
        }
        Ok((out, q.shape.clone()))
    }
}

/// One head: `out (lq, dh) = softmax(scale q kᵀ) v`.
#[allow(clippy::too_many_arguments)]
fn one_head(
    kernel: KernelFn,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lq: usize,
    t: usize,
    dh: usize,
    scale: f32,
    out: &mut [f32],
) {
    // Scores key-major (`st[j * lq + i]`, as the kernel writes them), then query-major.
    let mut st = vec![0f32; t * lq];
    // SAFETY: `q` holds `lq` rows of `dh`, `k` `t` rows of `dh`, `st` `t * lq` values.
    unsafe { kernel(q.as_ptr(), k, lq, dh, &mut st) };
    let mut scores = vec![0f32; lq * t];
    for (j, col) in st.chunks_exact(lq).enumerate() {
        for (i, &s) in col.iter().enumerate() {
            scores[i * t + j] = s;
        }
    }
    softmax_rows_inplace(&mut scores, t, scale);
    weighted_sum(&scores, v, lq, t, dh, out);
}

widest_simd! {
    /// `out[i] = sum_j p[i][j] v[j]` for `lq` rows of `p` (`t` each) and `v` `(t, dh)`.
    fn weighted_sum(p: &[f32], v: &[f32], lq: usize, t: usize, dh: usize, out: &mut [f32])
        => weighted_sum_generic
}

/// Row by row of `v`, so that each value row is read once for every query (the inner loop over
/// `dh` vectorises).
#[inline(always)]
fn weighted_sum_generic(p: &[f32], v: &[f32], lq: usize, t: usize, dh: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (j, vj) in v.chunks_exact(dh).enumerate().take(t) {
        for (i, o) in out.chunks_exact_mut(dh).enumerate().take(lq) {
            let pij = p[i * t + j];
            for (o, &x) in o.iter_mut().zip(vj) {
                *o += pij * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::randn;

    /// The parallel-heads form against candle's, on a ViT-like shape and odd ones.
    #[test]
    fn parallel_heads_match_candle_attention() -> candle_core::Result<()> {
        if !crate::model::sgemm::available() {
            return Ok(());
        }
        assert_matches_candle(
            parallel_heads_attention,
            &[(1, 12, 197, 197, 64), (2, 3, 33, 50, 17), (1, 2, 9, 1, 8)],
        )
    }

    /// Against candle's formulation on decoding shapes (1 and 3 queries, 577 image keys, a
    /// short KV cache) and odd ones.
    #[test]
    fn matches_candle_attention() -> candle_core::Result<()> {
        assert_matches_candle(
            few_query_attention,
            &[
                (1, 12, 3, 577, 64),
                (3, 12, 1, 7, 64),
                (2, 3, 5, 33, 17),
                (1, 1, 8, 1, 16),
            ],
        )
    }

    /// `attention` on random `(batch, heads, queries, keys, head_dim)` shapes against candle's
    /// softmax(q kᵀ scale) v, to 2e-5.
    fn assert_matches_candle(
        attention: impl Fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Option<Tensor>>,
        shapes: &[(usize, usize, usize, usize, usize)],
    ) -> candle_core::Result<()> {
        for &(b, h, lq, t, dh) in shapes {
            let q = randn(1, 0.0, 1.0, (b, h, lq, dh));
            let k = randn(2, 0.0, 1.0, (b, h, t, dh));
            let v = randn(3, 0.0, 1.0, (b, h, t, dh));
            let scale = 1.0 / (dh as f64).sqrt();
            let got = attention(&q, &k, &v, scale)?.expect("applies");
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 2e-5,
                "{:?}: max |ours - candle| = {diff}",
                (b, h, lq, t, dh)
            );
        }
        Ok(())
    }
}
