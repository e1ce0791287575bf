//! The dot product behind every vector score: kernels for AVX-512F, AVX2+FMA and portable code,
//! the best one for this CPU chosen once.
//!
//! [`dot`] takes any two slices. The graph search ([`super::flat`]) calls the kernel itself, on
//! rows padded to whole blocks of [`LANES`] floats, so that it needs no tail loop.

use std::sync::OnceLock;

/// Floats per block: one AVX-512 register, one 64-byte cache line.
pub(crate) const LANES: usize = 16;

/// A dot product over `n` floats (`n` a multiple of [`LANES`]) at two pointers.
pub(crate) type DotFn = unsafe fn(*const f32, *const f32, usize) -> f32;

/// The fastest dot product kernel this CPU runs, picked on first use.
pub(crate) fn kernel() -> DotFn {
    static KERNEL: OnceLock<DotFn> = OnceLock::new();
    *KERNEL.get_or_init(pick)
}

fn pick() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return dot_avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return dot_avx2;
        }
    }
    dot_portable
}

/// The dot product of `a` and `b`, over the shorter of the two (as `a.iter().zip(b)` would).
///
/// ```
/// let (a, b) = ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]);
/// assert_eq!(blipsearch::index::dot(&a, &b), 32.0);
/// ```
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let body = n - n % LANES;
    // SAFETY: both slices hold at least `body` floats, a multiple of LANES; the kernel suits
    // this CPU.
    let head = unsafe { kernel()(a.as_ptr(), b.as_ptr(), body) };
    let tail: f32 = a[body..n].iter().zip(&b[body..n]).map(|(x, y)| x * y).sum();
    head + tail
}

/// # Safety
/// `a` and `b` must be valid for `n` reads; `n` is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: *const f32, b: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): `i + 16 <= n` for every load, and the caller guarantees `n` reads.
    unsafe {
        while i + 4 * LANES <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + j * LANES;
                *acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(o)), _mm512_loadu_ps(b.add(o)), *acc);
            }
            i += 4 * LANES;
        }
        while i < n {
            acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), acc[0]);
            i += LANES;
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}

/// # Safety
/// As [`dot_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: *const f32, b: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): `i + 8 <= n` for every load, and the caller guarantees `n` reads.
    unsafe {
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + j * 8;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(o)), _mm256_loadu_ps(b.add(o)), *acc);
            }
            i += 32;
        }
        while i < n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
            acc[1] = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.add(i + 8)),
                _mm256_loadu_ps(b.add(i + 8)),
                acc[1],
            );
            i += LANES;
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Portable dot product, in 16 independent lanes so that the compiler vectorises it.
///
/// # Safety
/// As [`dot_avx512`].
unsafe fn dot_portable(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: the caller guarantees `n` reads at both pointers.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, n),
            std::slice::from_raw_parts(b, n),
        )
    };
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::Rng;

    fn f64_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn every_dot_kernel_agrees_with_f64() {
        let mut rng = Rng::new(5);
        for dim in [1, 7, 16, 17, 64, 100, 256, 768] {
            let (a, b) = (rng.unit_vector(dim), rng.unit_vector(dim));
            let want = f64_dot(&a, &b);
            let n = dim.next_multiple_of(LANES);
            let padded = |v: &[f32]| {
                let mut p = v.to_vec();
                p.resize(n, 0.0);
                p
            };
            let (pa, pb) = (padded(&a), padded(&b));
            let mut kernels: Vec<(&str, DotFn)> = vec![("portable", dot_portable)];
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    kernels.push(("avx512", dot_avx512));
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    kernels.push(("avx2", dot_avx2));
                }
            }
            for (name, k) in kernels {
                // SAFETY: both vectors hold `n` floats; the kernel was checked against the CPU.
                let got = unsafe { k(pa.as_ptr(), pb.as_ptr(), n) };
                assert!(
                    (got as f64 - want).abs() < 1e-5,
                    "{name} dim {dim}: {got} vs {want}"
                );
            }
            let got = dot(&a, &b);
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "dot dim {dim}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn dot_runs_over_the_shorter_slice() {
        let a: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let b = vec![1.0f32; 35];
        assert_eq!(dot(&a, &b), (0..35).sum::<i32>() as f32);
        assert_eq!(dot(&b, &a), dot(&a, &b));
        assert_eq!(dot(&[], &a), 0.0);
    }
}
